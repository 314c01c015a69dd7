//! The writer's statements. The migrations are [`crate::migrate`], the operator's statements
//! [`crate::admin`], the relay's live in the relay crate.
//!
//! The only text placed into statements is the [`SchemaName`], validated as a plain identifier
//! before it gets here; every value is a bind parameter.

use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryScalar;
use sqlx::{Arguments as _, PgConnection, Postgres};

use crate::headers::encode_stored;
use crate::message::Message;
use crate::schema::SchemaName;

/// The writer's statements on one outbox schema, rendered once.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    schema: SchemaName,
    /// Cached as named prepared statements on each connection (sqlx's default), or sent
    /// unnamed, prepared anew each time (see [`crate::OutboxConfig::transaction_pooling`]).
    persistent: bool,
    insert_one: String,
    insert_many: String,
}

/// Binds `message` as the next four parameters: topic, key, payload, headers.
fn bind_message<'q>(
    query: QueryScalar<'q, Postgres, i64, PgArguments>,
    message: &'q Message,
) -> QueryScalar<'q, Postgres, i64, PgArguments> {
    query
        .bind(&message.topic)
        .bind(message.key.as_deref())
        .bind(message.payload.as_deref())
        .bind(encode_stored(&message.headers))
}

impl Statements {
    pub(crate) fn new(schema: &SchemaName, persistent: bool) -> Self {
        let render = |sql: &str| sql.replace("{schema}", schema.as_str());
        Statements {
            schema: schema.clone(),
            persistent,
            insert_one: render(Self::INSERT_ONE),
            insert_many: render(Self::INSERT_MANY),
        }
    }

    /// The schema these statements address.
    pub(crate) fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// Whether the statements are cached on the connection.
    pub(crate) fn persistent(&self) -> bool {
        self.persistent
    }

    const INSERT_ONE: &'static str = "INSERT INTO {schema}.message (topic, key, payload, headers)
         VALUES ($1, $2, $3, $4) RETURNING id";

    // Ids follow the input order (ORDER BY ordinality), so a batch keeps its order.
    const INSERT_MANY: &'static str = "INSERT INTO {schema}.message (topic, key, payload, headers)
         SELECT topic, key, payload, headers
           FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::jsonb[])
                WITH ORDINALITY AS m(topic, key, payload, headers, n)
          ORDER BY n
         RETURNING id";

    /// Inserts one message; returns its sequence.
    pub(crate) async fn insert_one(
        &self,
        conn: &mut PgConnection,
        message: &Message,
    ) -> Result<i64, sqlx::Error> {
        bind_message(sqlx::query_scalar(&self.insert_one), message)
            .persistent(self.persistent)
            .fetch_one(conn)
            .await
    }

    /// Runs `statement` (the caller's INSERT, UPDATE or DELETE with a RETURNING clause, its
    /// parameters in `arguments`) and inserts `message` in the same statement, only if the
    /// statement returned a row. Returns the message's sequence, `None` when nothing was saved.
    pub(crate) async fn insert_with_statement(
        &self,
        conn: &mut PgConnection,
        statement: &str,
        arguments: PgArguments,
        message: &Message,
    ) -> Result<Option<i64>, sqlx::Error> {
        // The caller's parameters keep their numbers; the message's follow them. The newline
        // ends a trailing `-- comment` of the statement before the closing parenthesis.
        let first = arguments.len() + 1;
        let sql = format!(
            "WITH business AS ({statement}\n)
             INSERT INTO {schema}.message (topic, key, payload, headers)
             SELECT ${first}, ${}, ${}, ${} WHERE EXISTS (SELECT 1 FROM business)
             RETURNING id",
            first + 1,
            first + 2,
            first + 3,
            schema = self.schema.as_str(),
        );
        bind_message(sqlx::query_scalar_with(&sql, arguments), message)
            .persistent(self.persistent)
            .fetch_optional(conn)
            .await
    }

    /// Inserts many messages in one statement; returns their sequences in input order.
    pub(crate) async fn insert_many(
        &self,
        conn: &mut PgConnection,
        messages: &[Message],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
        let keys: Vec<Option<&[u8]>> = messages.iter().map(|m| m.key.as_deref()).collect();
        let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload.as_deref()).collect();
        let headers: Vec<Option<Value>> =
            messages.iter().map(|m| encode_stored(&m.headers)).collect();
        sqlx::query_scalar(&self.insert_many)
            .bind(topics)
            .bind(keys)
            .bind(payloads)
            .bind(headers)
            .persistent(self.persistent)
            .fetch_all(conn)
            .await
    }
}
