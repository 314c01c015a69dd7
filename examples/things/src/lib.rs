//! The Things demo: the scenario the outbox exists for.
//!
//! - `things-service`: `POST /things` validates a command, stores a Thing and saves
//!   `ThingCreated` in the same transaction; `GET /things/{id}` reads it back; the relay runs
//!   in-process and publishes the events.
//! - `things-consumer`: consumes `ThingCreated` and applies it to its own read model through the
//!   inbox, committing the Kafka offset only after the database.
//! - `things-demo`: starts both, sends a burst of commands (some invalid, many concurrent),
//!   kills and restarts the service (and so its relay) mid-way, then checks that the consumer's
//!   read model equals the service's table.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

/// The service's business schema.
pub const SERVICE_SCHEMA: &str = "things";
/// The service's outbox schema.
pub const SERVICE_OUTBOX_SCHEMA: &str = "things_outbox";
/// The consumer's schema (read model and inbox): another service's database, in effect.
pub const CONSUMER_SCHEMA: &str = "things_consumer";
/// Where `ThingCreated` is published.
pub const TOPIC: &str = "things.thing-created";
/// `x-source` of the service.
pub const SOURCE: &str = "things-service";

/// The event: a Thing was created.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThingCreated {
    /// The Thing's id.
    pub id: uuid::Uuid,
    /// Its name.
    pub name: String,
    /// How many.
    pub quantity: i32,
}

impl outbox::typed::JsonEvent for ThingCreated {
    const TYPE_NAME: &'static str = "ThingCreated";
}

/// `DATABASE_URL` or the `dev/up` default.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://outbox:outbox@127.0.0.1:55432/outbox".to_owned())
}

/// `KAFKA_BOOTSTRAP_SERVERS` or the `dev/up` default.
pub fn kafka_bootstrap_servers() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:19092".to_owned())
}

/// Where the relay and the consumer reach Kafka: `THINGS_KAFKA_BOOTSTRAP_SERVERS` (a secured
/// listener, say), else [`kafka_bootstrap_servers`], which topic creation always uses.
pub fn kafka_client_bootstrap() -> String {
    std::env::var("THINGS_KAFKA_BOOTSTRAP_SERVERS").unwrap_or_else(|_| kafka_bootstrap_servers())
}

/// librdkafka properties for the relay and the consumer from `THINGS_KAFKA_<PROPERTY>`
/// variables, dots written as underscores (`THINGS_KAFKA_SECURITY_PROTOCOL=SASL_SSL`,
/// `THINGS_KAFKA_SASL_PASSWORD=...`); `bootstrap.servers` is [`kafka_client_bootstrap`].
pub fn kafka_properties() -> Vec<(String, String)> {
    let mut properties: Vec<(String, String)> = std::env::vars()
        .filter_map(|(name, value)| {
            let property = name.strip_prefix("THINGS_KAFKA_")?.to_ascii_lowercase();
            (property != "bootstrap_servers").then(|| (property.replace('_', "."), value))
        })
        .collect();
    properties.sort();
    properties
}

/// Where and how the relay or the consumer reaches Kafka, for the logs (no secret).
pub fn kafka_endpoint() -> String {
    let properties = kafka_properties();
    let find = |key: &str| {
        properties
            .iter()
            .find(|(k, _)| k == key)
            .map_or("", |(_, v)| v.as_str())
            .to_owned()
    };
    format!(
        "{} ({}{})",
        kafka_client_bootstrap(),
        match find("security.protocol").as_str() {
            "" => "PLAINTEXT".to_owned(),
            protocol => protocol.to_owned(),
        },
        match find("sasl.username").as_str() {
            "" => String::new(),
            user => format!(" as {user}"),
        }
    )
}

/// Connects, with a clear error when PostgreSQL is not running.
pub async fn connect() -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&database_url())
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach PostgreSQL ({e}); run: eval \"$(dev/up)\""))
}

/// Creates `TOPIC` if missing (3 partitions).
pub async fn ensure_topic() -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap_servers())
        .create()?;
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(20)));
    let results = admin
        .create_topics(
            &[NewTopic::new(TOPIC, 3, TopicReplication::Fixed(1))],
            &options,
        )
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach Kafka ({e}); run: eval \"$(dev/up)\""))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
