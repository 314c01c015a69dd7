//! Periodic sampling for health and metrics: the backlog (one indexed count), the oldest snapshot
//! held in the database, and whether Kafka answers a metadata request.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::admin::Admin;
use outbox::SCHEMA_VERSION;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::health::{Health, KafkaProblem};
use crate::kafka::KafkaConfig;
use crate::metrics as m;

/// The probe's client context: keeps librdkafka's last error, which says why a metadata
/// request failed (a refused password, an untrusted certificate) where the request's own error
/// only says it timed out.
#[derive(Default)]
struct Probe {
    last_error: Mutex<Option<(Option<RDKafkaErrorCode>, String)>>,
}

impl ClientContext for Probe {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "Kafka health probe");
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((error.rdkafka_error_code(), reason.to_owned()));
    }
}

impl ProducerContext for Probe {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {}
}

impl Probe {
    fn answered(&self) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Why the request that failed with `error` failed, by librdkafka's error codes. The last
    /// error is kept until a request succeeds: librdkafka reports a repeated failure (the same
    /// refused password on every reconnect) only now and then.
    fn problem(&self, error: &KafkaError, kafka: &KafkaConfig) -> KafkaProblem {
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (code, reason) =
            last.unwrap_or_else(|| (error.rdkafka_error_code(), error.to_string()));
        let reason = kafka.without_secrets(&reason);
        match code {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                KafkaProblem::Authentication(reason)
            }
            Some(RDKafkaErrorCode::SSL) => KafkaProblem::Tls(reason),
            _ => KafkaProblem::Unreachable(reason),
        }
    }
}

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
    let probe: Option<BaseProducer<Probe>> = match kafka
        .metadata_client_config()
        .create_with_context(Probe::default())
    {
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
        let kafka_problem = match &probe {
            Some(probe) => {
                let (probe, kafka) = (probe.clone(), kafka.clone());
                let timeout = interval.min(Duration::from_secs(5));
                tokio::task::spawn_blocking(move || {
                    match probe.client().fetch_metadata(None, timeout) {
                        Ok(_) => {
                            probe.context().answered();
                            None
                        }
                        Err(error) => {
                            // Serves the error callbacks queued meanwhile (all of them:
                            // a poll serves one event per turn until its time is up).
                            probe.poll(Duration::from_millis(100));
                            Some(probe.context().problem(&error, &kafka))
                        }
                    }
                })
                .await
                .unwrap_or_else(|e| Some(KafkaProblem::Unreachable(e.to_string())))
            }
            None => Some(KafkaProblem::Unreachable(
                "the health probe could not be created".to_owned(),
            )),
        };
        health.kafka(kafka_problem);
        m::ready(health.report().ready);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
