//! The transactional outbox for PostgreSQL and Apache Kafka: the part a service links.
//!
//! A service saves the events it wants to publish **in the same database transaction** as its
//! business data. Either both commit or neither does; a relay (the `outbox-kafka-relay` crate, or the
//! standalone `outbox relay` command) then publishes every committed message to Kafka.
//!
//! ```no_run
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! use outbox::{Message, Outbox, OutboxConfig};
//!
//! let outbox = Outbox::new(OutboxConfig::default());
//! outbox.migrate(&pool).await?;
//!
//! let mut tx = pool.begin().await?;
//! sqlx::query("insert into thing (id, name) values ($1, $2)")
//!     .bind(42_i64)
//!     .bind("a thing")
//!     .execute(&mut *tx)
//!     .await?;
//! outbox
//!     .save_for_publishing(&mut tx, Message::new("thing_topic", br#"{"id":42}"#.to_vec()).key("42"))
//!     .await?;
//! tx.commit().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Services in other languages enqueue with the SQL function `outbox.enqueue(topic, key, payload,
//! headers)` inside their own transaction and run only the standalone relay.

pub mod admin;
mod client;
mod error;
pub mod headers;
pub mod inbox;
mod message;
pub mod migrate;
pub mod pooler;
mod schema;
#[cfg(feature = "otel")]
pub mod trace;
pub mod typed;
mod writer;

#[cfg(feature = "diesel")]
pub use client::BlockingClientTransaction;
pub use client::ClientTransaction;
pub use error::{Error, InvalidMessage};
pub use inbox::Inbox;
pub use message::{record_wire_size, Header, Message, MAX_SOURCE_BYTES};
pub use migrate::MigrationReport;
pub use migrate::SCHEMA_VERSION;
pub use schema::{InvalidSchemaName, SchemaName};
pub use writer::{Outbox, OutboxConfig, Sequence, DEFAULT_MAX_PAYLOAD_BYTES};

/// Whether a librdkafka property's value is a secret, to be masked in `Debug`, logs, errors and
/// printed configuration. One rule for the relay, the consumer and the CLI.
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("passphrase")
        || key.contains("private")
        || key.contains("secret")
        || key.ends_with(".key.pem")
        || key == "sasl.jaas.config"
        || key == "sasl.oauthbearer.config"
        || key.ends_with("token")
}

#[cfg(test)]
mod tests {
    use super::is_secret_property;

    /// Every secret property of the bundled librdkafka (2.12) is masked, and the common
    /// settings are not.
    #[test]
    fn librdkafka_secret_properties_are_secret() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.jaas.config",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.assertion.private.key.pem",
            "SASL.PASSWORD",
        ] {
            assert!(is_secret_property(key), "{key}");
        }
        for key in [
            "bootstrap.servers",
            "sasl.username",
            "sasl.mechanism",
            "ssl.ca.location",
            "ssl.certificate.pem",
            "linger.ms",
        ] {
            assert!(!is_secret_property(key), "{key}");
        }
    }
}
