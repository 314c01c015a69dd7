use std::sync::Arc;

use sqlx::{Execute, PgPool, Postgres, Transaction};

use crate::error::Error;
use crate::message::Message;
use crate::migrate::MigrationReport;
use crate::postgres::Statements;
use crate::schema::SchemaName;

/// A message's outbox sequence: its row id, sent to Kafka as the `x-sequence` header.
pub type Sequence = i64;

/// Default limit on a message's size as a Kafka record ([`crate::record_wire_size`], the
/// relay's headers included). The relay's producer is given the same limit
/// (`message.max.bytes`), so a message the writer accepts is one the relay's producer accepts;
/// and the broker's default (1,048,588) leaves room for the batch framing.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1_000_000;

/// Write-side configuration.
#[derive(Debug, Clone, Default)]
pub struct OutboxConfig {
    /// Schema holding the outbox objects (default `outbox`).
    pub schema: SchemaName,
    /// Largest message accepted, as a Kafka record ([`crate::record_wire_size`]); `None` for
    /// [`DEFAULT_MAX_PAYLOAD_BYTES`]. Keep it at or below the relay's `message.max.bytes`.
    pub max_message_bytes: Option<usize>,
}

/// The write side of the outbox: saves messages inside the caller's transaction.
///
/// Cheap to clone; build one at startup and share it.
#[derive(Debug, Clone)]
pub struct Outbox {
    statements: Arc<Statements>,
    max_message_bytes: usize,
}

impl Outbox {
    /// An outbox writing to the configured schema.
    pub fn new(config: OutboxConfig) -> Self {
        Outbox {
            statements: Arc::new(Statements::new(&config.schema)),
            max_message_bytes: config
                .max_message_bytes
                .unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES),
        }
    }

    /// The schema this outbox writes to.
    pub fn schema(&self) -> &SchemaName {
        self.statements.schema()
    }

    /// Creates or upgrades the outbox schema (idempotent, safe to run from many instances at
    /// once; see [`crate::migrate`]).
    pub async fn migrate(&self, pool: &PgPool) -> Result<MigrationReport, Error> {
        crate::migrate::run(self.schema(), pool).await
    }

    /// Saves `message` for publishing as part of `tx`: it is published if and only if `tx`
    /// commits. Returns the message's sequence (`x-sequence`).
    ///
    /// An invalid message is rejected with [`Error::InvalidMessage`] before anything is written;
    /// the transaction stays usable and is the caller's to roll back or continue.
    pub async fn save_for_publishing(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        message: Message,
    ) -> Result<Sequence, Error> {
        let message = with_current_trace(message);
        message.validate(self.max_message_bytes)?;
        Ok(self.statements.insert_one(tx, &message).await?)
    }

    /// Runs `statement` and saves `message` for publishing in one statement, as part of `tx`:
    /// one round trip instead of two, which is most of what an enqueue costs a small
    /// transaction. `statement` is one INSERT, UPDATE or DELETE with a `RETURNING` clause (any
    /// columns), with its parameters bound as usual; the message is saved only if it returned
    /// at least one row, so an UPDATE that matched nothing publishes nothing. Returns the
    /// message's sequence, or `None` when nothing was saved.
    ///
    /// ```no_run
    /// # async fn f(outbox: outbox::Outbox, pool: sqlx::PgPool) -> Result<(), outbox::Error> {
    /// let mut tx = pool.begin().await?;
    /// let shipped = sqlx::query("UPDATE orders SET state = 'shipped' WHERE id = $1 AND state = 'packed' RETURNING id")
    ///     .bind(42_i64);
    /// let event = outbox::Message::new("orders", br#"{"id":42,"state":"shipped"}"#.to_vec()).key("42");
    /// if outbox.execute_and_save(&mut tx, shipped, event).await?.is_none() {
    ///     // Not packed (or no such order): nothing changed, nothing will be published.
    /// }
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// An invalid message is rejected with [`Error::InvalidMessage`] before anything runs. The
    /// statement runs inside a `WITH` clause, so it cannot itself contain data-modifying `WITH`
    /// queries.
    pub async fn execute_and_save<'q, E>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        mut statement: E,
        message: Message,
    ) -> Result<Option<Sequence>, Error>
    where
        E: Execute<'q, Postgres>,
    {
        let message = with_current_trace(message);
        message.validate(self.max_message_bytes)?;
        let arguments = statement
            .take_arguments()
            .map_err(sqlx::Error::Encode)?
            .unwrap_or_default();
        Ok(self
            .statements
            .insert_with_statement(tx, statement.sql(), arguments, &message)
            .await?)
    }

    /// Saves many messages as part of `tx` in one statement. Sequences follow the input order,
    /// so messages of one key are published in the order given. Nothing is written if any
    /// message is invalid.
    pub async fn save_all_for_publishing(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<Sequence>, Error> {
        let messages: Vec<Message> = messages.into_iter().map(with_current_trace).collect();
        for message in &messages {
            message.validate(self.max_message_bytes)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        Ok(self.statements.insert_many(tx, &messages).await?)
    }
}

/// With the `otel` feature, messages carry the current OpenTelemetry trace context.
fn with_current_trace(message: Message) -> Message {
    #[cfg(feature = "otel")]
    let message = message.with_trace_context(&opentelemetry::Context::current());
    message
}
