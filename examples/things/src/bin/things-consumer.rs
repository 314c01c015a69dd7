//! The consumer: applies ThingCreated to its own read model, effectively once, via the inbox.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};
use outbox::{Inbox, SchemaName};
use outbox_consumer::{ConsumerConfig, ConsumerStats, Record};
use serde_json::json;
use sqlx::{Postgres, Transaction};
use things::{ThingCreated, CONSUMER_SCHEMA, TOPIC};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
enum HandlerError {
    Database(sqlx::Error),
    Decode(outbox::typed::TypedError),
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Database(e) => write!(f, "database: {e}"),
            HandlerError::Decode(e) => write!(f, "decode: {e}"),
        }
    }
}

async fn apply(
    tx: &mut Transaction<'static, Postgres>,
    record: &Record,
) -> Result<(), HandlerError> {
    let event: ThingCreated = outbox::typed::decode_json(
        record.value_type(),
        record.payload.as_deref().unwrap_or_default(),
    )
    .map_err(HandlerError::Decode)?;
    sqlx::query(&format!(
        "INSERT INTO {CONSUMER_SCHEMA}.thing (id, name, quantity, source_sequence) VALUES ($1, $2, $3, $4)"
    ))
    .bind(event.id)
    .bind(&event.name)
    .bind(event.quantity)
    .bind(record.sequence)
    .execute(&mut **tx)
    .await
    .map_err(HandlerError::Database)?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    things::init_logging();
    let addr: SocketAddr = std::env::var("THINGS_CONSUMER_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8081".into())
        .parse()?;
    let pool = things::connect().await?;
    let schema = SchemaName::new(CONSUMER_SCHEMA)?;
    // The consumer's own schema holds its inbox and read model.
    let inbox = Inbox::new(schema);
    inbox.migrate(&pool).await?;
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {CONSUMER_SCHEMA}.thing (
             id uuid PRIMARY KEY,
             name text NOT NULL,
             quantity integer NOT NULL,
             source_sequence bigint NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(&pool)
    .await?;
    things::ensure_topic().await?;

    let stats = Arc::new(ConsumerStats::default());
    let cancel = CancellationToken::new();
    let stats_for_http = stats.clone();
    let app = Router::new().route(
        "/stats",
        get(move || {
            let s = stats_for_http.clone();
            async move {
                Json(json!({
                    "applied": s.applied.load(Ordering::Relaxed),
                    "duplicates": s.duplicates.load(Ordering::Relaxed),
                    "failures": s.failures.load(Ordering::Relaxed),
                    "malformed": s.malformed.load(Ordering::Relaxed),
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let signal_cancel = cancel.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal_cancel.cancel();
    });
    tracing::info!(%addr, kafka = %things::kafka_endpoint(), "things-consumer running");
    let mut config =
        ConsumerConfig::new(things::kafka_client_bootstrap(), "things-consumer", [TOPIC]);
    for (key, value) in things::kafka_properties() {
        config.set(key, value);
    }
    outbox_consumer::run(config, pool, inbox, stats, cancel, apply).await?;
    Ok(())
}
