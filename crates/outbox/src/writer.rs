use std::sync::Arc;

use sqlx::{Execute, PgPool, Postgres, Transaction};

#[cfg(feature = "diesel")]
use crate::client::BlockingClientTransaction;
use crate::client::{ClientTransaction, Statements};
use crate::error::Error;
use crate::message::Message;
use crate::migrate::MigrationReport;
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
#[non_exhaustive]
pub struct OutboxConfig {
    /// Schema holding the outbox objects (default `outbox`).
    pub schema: SchemaName,
    /// Largest message accepted, as a Kafka record ([`crate::record_wire_size`]); `None` for
    /// [`DEFAULT_MAX_PAYLOAD_BYTES`]. Keep it at or below the relay's `message.max.bytes`.
    pub max_message_bytes: Option<usize>,
    /// The service reaches PostgreSQL through a pooler in transaction mode (see
    /// [`OutboxConfig::transaction_pooling`]).
    pub transaction_pooling: bool,
}

impl OutboxConfig {
    /// Writes to `schema` instead of `outbox`.
    pub fn schema(mut self, schema: SchemaName) -> Self {
        self.schema = schema;
        self
    }

    /// Accepts messages up to `bytes` as Kafka records instead of
    /// [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub fn max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = Some(bytes);
        self
    }

    /// For services that reach PostgreSQL through a pooler in transaction mode (PgBouncer's
    /// `pool_mode = transaction` before 1.21, which does not track prepared statements): the
    /// outbox's statements are sent unnamed and prepared anew each time, instead of being
    /// cached on the connection as sqlx does by default. A pooler in that mode hands each
    /// transaction to any of its server connections, so a cached statement is missing on the
    /// next one, or meets another client's of the same name (`prepared statement "sqlx_s_1"
    /// already exists`, [`Error::TransactionPooler`]), or is another client's statement, run with
    /// this one's parameters (see [`crate::pooler`]). Unnamed statements are safe because the
    /// outbox only writes inside the caller's transaction, which the pooler keeps on one server
    /// connection. It costs one more round trip and a parse per statement; leave it off on
    /// direct connections and session-mode pools. The service's own queries in those
    /// transactions need `.persistent(false)` for the same reason.
    pub fn transaction_pooling(mut self, enabled: bool) -> Self {
        self.transaction_pooling = enabled;
        self
    }
}

/// The write side of the outbox: saves messages inside the caller's transaction.
///
/// Cheap to clone; build one at startup and share it.
#[derive(Debug, Clone)]
pub struct Outbox {
    statements: Arc<Statements>,
    max_message_bytes: usize,
    #[cfg(feature = "otel")]
    trace_context: bool,
}

impl Outbox {
    /// An outbox writing to the configured schema.
    pub fn new(config: OutboxConfig) -> Self {
        Outbox {
            statements: Arc::new(Statements::new(&config.schema, !config.transaction_pooling)),
            max_message_bytes: config
                .max_message_bytes
                .unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES),
            #[cfg(feature = "otel")]
            trace_context: false,
        }
    }

    /// Messages saved through this outbox carry the current OpenTelemetry trace context
    /// (`traceparent`/`tracestate`, see [`crate::trace`]), so the relay records its spans in the
    /// trace that saved them and consumers can continue it. A choice per outbox, not per build:
    /// enabling the `otel` feature alone changes nothing that is saved.
    #[cfg(feature = "otel")]
    pub fn saving_trace_context(mut self) -> Self {
        self.trace_context = true;
        self
    }

    /// Checks that `pool` suits this configuration: fails with [`Error::TransactionPooler`]
    /// when its connections go through a pooler in transaction mode and
    /// [`OutboxConfig::transaction_pooling`] is off, where cached statements would fail or run
    /// as another client's (see [`crate::pooler`]). Call it at startup; it opens two
    /// connections of its own.
    pub async fn check_connection(&self, pool: &PgPool) -> Result<(), Error> {
        if self.statements.persistent()
            && crate::pooler::transaction_pooled(pool.connect_options().as_ref()).await?
        {
            return Err(Error::TransactionPooler { statement: None });
        }
        Ok(())
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
    /// commits. Returns the message's sequence (`x-sequence`). `tx` is the transaction of any
    /// supported client library ([`ClientTransaction`]): `&mut tx` for sqlx, `&tx` for
    /// tokio-postgres and SeaORM.
    ///
    /// An invalid message is rejected with [`Error::InvalidMessage`] before anything is written;
    /// the transaction stays usable and is the caller's to roll back or continue. On any other
    /// error, roll the transaction back.
    ///
    /// With tokio-postgres, the save and the service's own statement share one round trip when
    /// they are awaited together and the service's statement is typed (`query_typed`) or
    /// prepared: tokio-postgres pipelines them on the connection. (A statement given as text is
    /// prepared first, a round trip of its own.) Unlike [`Outbox::execute_and_save`], the
    /// message is saved whatever the service's statement does, and that statement is already
    /// sent when the save refuses an invalid message: on any error, roll back.
    ///
    /// ```no_run
    /// # #[cfg(feature = "tokio-postgres")]
    /// # async fn f(outbox: outbox::Outbox, client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// use tokio_postgres::types::Type;
    /// let tx = client.transaction().await?;
    /// let event = outbox::Message::new("things", br#"{"id":42}"#.to_vec()).key("42");
    /// let (inserted, sequence) = tokio::join!(
    ///     async { tx.query_typed("INSERT INTO thing (id) VALUES ($1)", &[(&42_i64, Type::INT8)]).await },
    ///     outbox.save_for_publishing(&tx, event),
    /// );
    /// inserted?;
    /// sequence?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn save_for_publishing(
        &self,
        tx: impl ClientTransaction,
        message: Message,
    ) -> Result<Sequence, Error> {
        let message = self.prepare(message)?;
        tx.insert_one(&self.statements, &message).await
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
        let message = self.prepare(message)?;
        let sql = single_statement(statement.sql())?;
        let arguments = statement
            .take_arguments()
            .map_err(sqlx::Error::Encode)?
            .unwrap_or_default();
        Ok(self
            .statements
            .insert_with_statement(tx, sql, arguments, &message)
            .await?)
    }

    /// Saves many messages as part of `tx` in one statement (with SeaORM, one per 1,000
    /// messages). Sequences follow the input order, so messages of one key are published in the
    /// order given. Nothing is written if any message is invalid; on any other error, roll the
    /// transaction back.
    pub async fn save_all_for_publishing(
        &self,
        tx: impl ClientTransaction,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<Sequence>, Error> {
        match self.prepare_all(messages)?.as_slice() {
            [] => Ok(Vec::new()),
            // The one-row statement: a set-based insert of one row costs the server more (its
            // arrays unnested, its rows ordered).
            [message] => Ok(vec![tx.insert_one(&self.statements, message).await?]),
            messages => all_saved(messages, tx.insert_many(&self.statements, messages).await?),
        }
    }

    /// [`Outbox::save_for_publishing`] through a blocking client: diesel's `PgConnection`
    /// inside its `transaction(..)` ([`BlockingClientTransaction`]). Blocks the thread for the
    /// round trip: on an async runtime, call it where blocking is allowed (`spawn_blocking`,
    /// deadpool-diesel's `interact`).
    ///
    /// ```no_run
    /// # fn f(outbox: &outbox::Outbox, conn: &mut diesel::PgConnection) -> Result<(), Box<dyn std::error::Error>> {
    /// use diesel::{Connection, RunQueryDsl};
    /// conn.transaction(|conn| {
    ///     diesel::sql_query("INSERT INTO thing (id) VALUES (42)").execute(conn)?;
    ///     let event = outbox::Message::new("things", br#"{"id":42}"#.to_vec()).key("42");
    ///     outbox.save_for_publishing_blocking(conn, event)?;
    ///     Ok::<_, Box<dyn std::error::Error>>(())
    /// })?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "diesel")]
    pub fn save_for_publishing_blocking(
        &self,
        tx: impl BlockingClientTransaction,
        message: Message,
    ) -> Result<Sequence, Error> {
        let message = self.prepare(message)?;
        tx.insert_one(&self.statements, &message)
    }

    /// [`Outbox::save_all_for_publishing`] through a blocking client (see
    /// [`Outbox::save_for_publishing_blocking`]).
    #[cfg(feature = "diesel")]
    pub fn save_all_for_publishing_blocking(
        &self,
        tx: impl BlockingClientTransaction,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<Sequence>, Error> {
        match self.prepare_all(messages)?.as_slice() {
            [] => Ok(Vec::new()),
            // The one-row statement, as in `save_all_for_publishing`.
            [message] => Ok(vec![tx.insert_one(&self.statements, message)?]),
            messages => all_saved(messages, tx.insert_many(&self.statements, messages)?),
        }
    }
}

impl Outbox {
    /// The message as saved (with the current trace context if this outbox saves it), if it is
    /// valid.
    fn prepare(&self, message: Message) -> Result<Message, Error> {
        #[cfg(feature = "otel")]
        let message = match self.trace_context {
            true => message.with_trace_context(&opentelemetry::Context::current()),
            false => message,
        };
        message.validate(self.max_message_bytes)?;
        Ok(message)
    }

    /// The messages as saved, if every one is valid.
    fn prepare_all(
        &self,
        messages: impl IntoIterator<Item = Message>,
    ) -> Result<Vec<Message>, Error> {
        messages.into_iter().map(|m| self.prepare(m)).collect()
    }
}

/// `sequences` of the rows a batch insert returned, if it saved every one of `messages`: fewer
/// rows than messages means a trigger suppressed some, whatever the client.
fn all_saved(messages: &[Message], sequences: Vec<Sequence>) -> Result<Vec<Sequence>, Error> {
    match sequences.len() == messages.len() {
        true => Ok(sequences),
        false => Err(Error::NotSaved),
    }
}

/// `sql` without its final `;` and what follows it, when that is only whitespace and comments:
/// the statement is wrapped in a `WITH` clause, where a terminator is a syntax error. Text in
/// quotes (`'...'`, `"..."`, `$tag$...$tag$`) and comments (`--`, nested `/* */`) is skipped, so
/// a `;` there is not taken for one; a `;` followed by more SQL is more than one statement.
fn single_statement(sql: &str) -> Result<&str, Error> {
    let bytes = sql.as_bytes();
    let mut terminator: Option<usize> = None;
    let mut i = 0;
    while i < bytes.len() {
        let rest = &sql[i..];
        let skip = if rest.starts_with("--") {
            rest.find('\n').unwrap_or(rest.len())
        } else if rest.starts_with("/*") {
            block_comment_len(rest).ok_or_else(|| unterminated("/* comment"))?
        } else if bytes[i] == b'\'' || bytes[i] == b'"' {
            quoted_len(rest, bytes[i]).ok_or_else(|| unterminated("quoted text"))?
        } else if let Some(tag) = dollar_tag(rest) {
            rest[tag.len()..]
                .find(tag)
                .map(|end| 2 * tag.len() + end)
                .ok_or_else(|| unterminated("dollar-quoted text"))?
        } else {
            if bytes[i] == b';' {
                terminator.get_or_insert(i);
            } else if !bytes[i].is_ascii_whitespace() && terminator.is_some() {
                return Err(Error::InvalidStatement(
                    "more SQL follows a `;`: pass one statement".into(),
                ));
            }
            // A whole character: the next slice must start on a character boundary.
            rest.chars().next().map_or(1, char::len_utf8)
        };
        i += skip;
    }
    Ok(&sql[..terminator.unwrap_or(sql.len())])
}

fn unterminated(what: &str) -> Error {
    Error::InvalidStatement(format!("unterminated {what}"))
}

/// Length of the `/* */` comment `text` starts with (PostgreSQL nests them).
fn block_comment_len(text: &str) -> Option<usize> {
    let mut depth = 0;
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with("/*") {
            depth += 1;
            i += 2;
        } else if text[i..].starts_with("*/") {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    None
}

/// Length of the quoted text `text` starts with; a doubled quote is an escaped one.
fn quoted_len(text: &str, quote: u8) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// The `$tag$` opening dollar-quoted text at the start of `text` (a parameter such as `$1`
/// is not one).
fn dollar_tag(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('$')?;
    let end = inner.find('$')?;
    let tag = &inner[..end];
    let valid = tag
        .chars()
        .enumerate()
        .all(|(n, c)| c == '_' || c.is_alphabetic() || (n > 0 && c.is_ascii_digit()));
    valid.then(|| &text[..end + 2])
}

#[cfg(test)]
mod tests {
    use super::single_statement;

    #[test]
    fn a_final_terminator_and_trailing_comments_are_cut() {
        for (sql, want) in [
            (
                "UPDATE t SET a = 1 RETURNING id",
                "UPDATE t SET a = 1 RETURNING id",
            ),
            (
                "UPDATE t SET a = 1 RETURNING id;",
                "UPDATE t SET a = 1 RETURNING id",
            ),
            (
                "UPDATE t SET a = 1 RETURNING id; -- done",
                "UPDATE t SET a = 1 RETURNING id",
            ),
            (
                "UPDATE t RETURNING id ; /* a; b */\n",
                "UPDATE t RETURNING id ",
            ),
            (
                "UPDATE t RETURNING id -- no; terminator",
                "UPDATE t RETURNING id -- no; terminator",
            ),
            (
                "UPDATE t SET a = ';' RETURNING id",
                "UPDATE t SET a = ';' RETURNING id",
            ),
            (
                "UPDATE t SET a = 'it''s;' RETURNING id;",
                "UPDATE t SET a = 'it''s;' RETURNING id",
            ),
            (
                "UPDATE \"a;b\" SET a = $q$;$q$ RETURNING $1;",
                "UPDATE \"a;b\" SET a = $q$;$q$ RETURNING $1",
            ),
            (
                "UPDATE t /* /* ; */ ; */ SET a = 1 RETURNING id",
                "UPDATE t /* /* ; */ ; */ SET a = 1 RETURNING id",
            ),
            (
                "UPDATE café SET é = 'ü' RETURNING id; -- fin ✓",
                "UPDATE café SET é = 'ü' RETURNING id",
            ),
            (
                "UPDATE t SET a = $é$;$é$ RETURNING id",
                "UPDATE t SET a = $é$;$é$ RETURNING id",
            ),
        ] {
            assert_eq!(single_statement(sql).unwrap(), want, "{sql}");
        }
    }

    #[test]
    fn more_than_one_statement_or_an_open_quote_is_refused() {
        for sql in [
            "UPDATE t SET a = 1 RETURNING id; DELETE FROM t",
            "UPDATE t SET a = 'open RETURNING id",
            "UPDATE t SET a = $x$open RETURNING id",
            "UPDATE t /* open RETURNING id",
        ] {
            let error = single_statement(sql).unwrap_err().to_string();
            assert!(
                error.starts_with("execute_and_save takes one SQL statement"),
                "{sql}: {error}"
            );
        }
    }
}
