//! Periodic sampling for health and metrics: the backlog (one indexed count), the oldest snapshot
//! held in the database, and whether Kafka answers a metadata request.

use std::sync::Arc;
use std::time::Duration;

use outbox::admin::Admin;
use outbox::SCHEMA_VERSION;
use rdkafka::producer::{BaseProducer, Producer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::kafka::KafkaConfig;
use crate::metrics as m;

pub(crate) async fn run(
    pool: PgPool,
    admin: Arc<Admin>,
    kafka: KafkaConfig,
    health: Arc<Health>,
    interval: Duration,
    cancel: CancellationToken,
) {
    // A plain client for metadata only: the publishing producer must not be shared with a
    // blocking call, and an idempotent one would register a producer id for nothing.
    let probe: Option<BaseProducer> = match kafka.metadata_client_config().create() {
        Ok(client) => Some(client),
        Err(error) => {
            tracing::error!(%error, "cannot create the Kafka health probe");
            None
        }
    };
    let probe = probe.map(Arc::new);
    loop {
        let backlog = async {
            let mut conn = pool.acquire().await.map_err(outbox::Error::from)?;
            let version = admin.schema_version(&mut conn).await?;
            if version < SCHEMA_VERSION {
                return Ok(Err(version));
            }
            let backlog = admin.backlog(&mut conn).await?;
            let snapshot = admin.oldest_snapshot(&mut conn).await?;
            Ok::<_, outbox::Error>(Ok((backlog, snapshot)))
        }
        .await;
        match backlog {
            Ok(Err(version)) => {
                let reason = format!(
                    "schema {} is not migrated (version {version}, this relay needs {SCHEMA_VERSION}): run `outbox migrate`",
                    admin.schema()
                );
                tracing::error!("{reason}");
                health.database(true);
                health.schema_problem(Some(reason));
            }
            Ok(Ok((backlog, snapshot))) => {
                health.schema_problem(None);
                m::oldest_snapshot(snapshot.map(|s| s.age));
                health.backlog(backlog.pending, backlog.oldest_age);
                m::backlog(
                    backlog.pending,
                    backlog.oldest_age,
                    backlog.held,
                    backlog.dead_letters,
                );
            }
            Err(error) => {
                tracing::warn!(%error, "cannot sample the backlog");
                health.database(false);
            }
        }
        let kafka_ok = match &probe {
            Some(probe) => {
                let probe = probe.clone();
                let timeout = interval.min(Duration::from_secs(5));
                tokio::task::spawn_blocking(move || {
                    probe.client().fetch_metadata(None, timeout).is_ok()
                })
                .await
                .unwrap_or(false)
            }
            None => false,
        };
        health.kafka(kafka_ok);
        m::ready(health.report().ready);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
