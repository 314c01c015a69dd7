//! The Things service: HTTP commands in, Things stored, ThingCreated published via the outbox.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outbox::{Message, Outbox, OutboxConfig, SchemaName};
use outbox_kafka_relay::{Relay, RelayConfig};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use things::{ThingCreated, SERVICE_OUTBOX_SCHEMA, SERVICE_SCHEMA, SOURCE, TOPIC};

#[derive(Clone)]
struct App {
    pool: PgPool,
    outbox: Outbox,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateThing {
    name: String,
    quantity: i32,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        ApiError(StatusCode::BAD_REQUEST, rejection.body_text())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        tracing::error!(%error, "database error");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "database unavailable".into(),
        )
    }
}

impl From<outbox::Error> for ApiError {
    fn from(error: outbox::Error) -> Self {
        match error {
            outbox::Error::InvalidMessage(invalid) => {
                ApiError(StatusCode::UNPROCESSABLE_ENTITY, invalid.to_string())
            }
            other => {
                tracing::error!(error = %other, "outbox error");
                ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database unavailable".into(),
                )
            }
        }
    }
}

fn validate(command: &CreateThing) -> Result<(), ApiError> {
    let name = command.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "name must be 1 to 100 characters, not blank".into(),
        ));
    }
    if !(0..=1000).contains(&command.quantity) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "quantity must be between 0 and 1000".into(),
        ));
    }
    Ok(())
}

async fn create_thing(
    State(app): State<App>,
    body: Result<Json<CreateThing>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(command) = body?;
    validate(&command)?;
    let event = ThingCreated {
        id: uuid::Uuid::new_v4(),
        name: command.name.trim().to_owned(),
        quantity: command.quantity,
    };
    let message = Message::json(TOPIC, &event)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .key(event.id.to_string());

    // The Thing and its event commit together, or neither does.
    let mut tx = app.pool.begin().await?;
    sqlx::query(&format!(
        "INSERT INTO {SERVICE_SCHEMA}.thing (id, name, quantity) VALUES ($1, $2, $3)"
    ))
    .bind(event.id)
    .bind(&event.name)
    .bind(event.quantity)
    .execute(&mut *tx)
    .await?;
    let sequence = app.outbox.save_for_publishing(&mut tx, message).await?;
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "id": event.id, "name": event.name, "quantity": event.quantity, "sequence": sequence }),
        ),
    ))
}

async fn get_thing(
    State(app): State<App>,
    Path(id): Path<uuid::Uuid>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let row: Option<(String, i32)> = sqlx::query_as(&format!(
        "SELECT name, quantity FROM {SERVICE_SCHEMA}.thing WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&app.pool)
    .await?;
    match row {
        Some((name, quantity)) => Ok(Json(
            json!({ "id": id, "name": name, "quantity": quantity }),
        )),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no thing {id}"))),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    things::init_logging();
    let addr: SocketAddr = std::env::var("THINGS_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8080".into())
        .parse()?;
    let pool = things::connect().await?;
    let schema = SchemaName::new(SERVICE_OUTBOX_SCHEMA)?;
    let outbox = Outbox::new(OutboxConfig::default().schema(schema.clone()));
    outbox.migrate(&pool).await?;
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA IF NOT EXISTS {SERVICE_SCHEMA};
         CREATE TABLE IF NOT EXISTS {SERVICE_SCHEMA}.thing (
             id uuid PRIMARY KEY,
             name text NOT NULL,
             quantity integer NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(&pool)
    .await?;
    things::ensure_topic().await?;

    let mut relay_config = RelayConfig::new(things::kafka_client_bootstrap(), SOURCE);
    for (key, value) in things::kafka_properties() {
        relay_config.kafka.set(key, value);
    }
    relay_config.schema = schema;
    // Short lease so a restarted instance takes over soon after a crash of the previous one.
    relay_config.lease_ttl = Duration::from_secs(3);
    relay_config.lease_renew_interval = Duration::from_secs(1);
    tracing::info!(kafka = %things::kafka_endpoint(), "starting the relay");
    let relay = Relay::start(pool.clone(), relay_config)?;

    let app = Router::new()
        .route("/things", post(create_thing))
        .route("/things/{id}", get(get_thing))
        .route("/health/live", get(|| async { "ok" }))
        .with_state(App { pool, outbox });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "things-service listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    relay.shutdown().await?;
    Ok(())
}
