//! The writer's statements and the migrations. The relay's statements live in the relay crate,
//! the operator's in [`crate::admin`].
//!
//! Nothing else in this crate builds SQL. The only text placed into statements is the
//! [`SchemaName`], validated as a plain identifier before it gets here; every value is a bind
//! parameter. All times come from the database clock (`now()`), so relays on hosts whose clocks
//! disagree still agree on who holds a lease.

use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryScalar;
use sqlx::{Arguments as _, PgConnection, Postgres, Transaction};

use crate::headers::encode_stored;
use crate::message::Message;
use crate::schema::SchemaName;

/// Embedded migrations, in order. `{schema}` and `{channel}` are replaced by the validated
/// schema name and its notification channel.
pub(crate) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "outbox table, lease table, notify trigger, enqueue()",
        include_str!("migrations/0001_outbox.sql"),
    ),
    (2, "inbox table", include_str!("migrations/0002_inbox.sql")),
    (
        3,
        "per-message retry, dead letters",
        include_str!("migrations/0003_poison.sql"),
    ),
    (
        4,
        "notify only while no relay is busy",
        include_str!("migrations/0004_notify_when_idle.sql"),
    ),
    (
        5,
        "published messages move to their own table",
        include_str!("migrations/0005_published_table.sql"),
    ),
    (
        6,
        "notify only while a relay waits",
        include_str!("migrations/0006_notify_only_idle.sql"),
    ),
    (
        7,
        "wake-up trigger before the insert",
        include_str!("migrations/0007_notify_before_insert.sql"),
    ),
    (
        8,
        "claim floor",
        include_str!("migrations/0008_claim_floor.sql"),
    ),
    (
        9,
        "claim floor generation",
        include_str!("migrations/0009_floor_generation.sql"),
    ),
    (
        10,
        "one insert trigger, no duplicate pending index",
        include_str!("migrations/0010_leaner_insert.sql"),
    ),
    (
        11,
        "enqueue() validates headers",
        include_str!("migrations/0011_untrusted_rows.sql"),
    ),
    (
        12,
        "held messages by retry time",
        include_str!("migrations/0012_held_by_retry_time.sql"),
    ),
    (
        13,
        "cheaper topic check and insert trigger, enqueue_all()",
        include_str!("migrations/0013_cheaper_enqueue.sql"),
    ),
];

/// The schema version these statements are written for: the last embedded migration.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The writer's statements on one outbox schema, rendered once.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    schema: SchemaName,
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
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let render = |sql: &str| sql.replace("{schema}", schema.as_str());
        Statements {
            schema: schema.clone(),
            insert_one: render(Self::INSERT_ONE),
            insert_many: render(Self::INSERT_MANY),
        }
    }

    /// The schema these statements address.
    pub(crate) fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// Applies the embedded migrations that are missing, under an advisory lock so that
    /// concurrent migrators (several service instances starting at once) take turns. Returns the
    /// versions applied now.
    pub(crate) async fn migrate(
        &self,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<(Vec<i32>, i32), sqlx::Error> {
        let schema = self.schema.as_str();
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outbox-migrate:' || $1))")
            .bind(schema)
            .execute(&mut **tx)
            .await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .execute(&mut **tx)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {schema}.schema_version (
                 version integer PRIMARY KEY,
                 description text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .execute(&mut **tx)
        .await?;
        let current: i32 = sqlx::query_scalar(&format!(
            "SELECT coalesce(max(version), 0) FROM {schema}.schema_version"
        ))
        .fetch_one(&mut **tx)
        .await?;
        let mut applied = Vec::new();
        for (version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            let sql = sql
                .replace("{schema}", schema)
                .replace("{channel}", &self.schema.channel());
            sqlx::raw_sql(&sql).execute(&mut **tx).await?;
            sqlx::query(&format!(
                "INSERT INTO {schema}.schema_version (version, description) VALUES ($1, $2)"
            ))
            .bind(version)
            .bind(description)
            .execute(&mut **tx)
            .await?;
            applied.push(*version);
        }
        Ok((applied, current))
    }

    /// The schema's migration version; 0 when it was never migrated (no such schema or table).
    pub(crate) async fn schema_version(&self, conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
        let table = format!("{}.schema_version", self.schema.as_str());
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .fetch_one(&mut *conn)
            .await?;
        if !exists {
            return Ok(0);
        }
        sqlx::query_scalar(&format!("SELECT coalesce(max(version), 0) FROM {table}"))
            .fetch_one(conn)
            .await
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
            .fetch_all(conn)
            .await
    }
}
