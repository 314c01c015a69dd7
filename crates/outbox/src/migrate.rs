//! Schema migrations: the embedded migration list, and the code that applies it.

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::error::Error;
use crate::postgres::Statements;
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
    (
        14,
        "message.processed_at dropped",
        include_str!("migrations/0014_no_processed_at.sql"),
    ),
];

/// The schema version these statements are written for: the last embedded migration.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// The schema migrated.
    pub schema: String,
    /// Version before the run (0: the schema did not exist).
    pub previous_version: i32,
    /// Versions applied by this run, in order; empty when already up to date.
    pub applied: Vec<i32>,
}

impl MigrationReport {
    /// The version after the run.
    pub fn current_version(&self) -> i32 {
        self.applied
            .last()
            .copied()
            .unwrap_or(self.previous_version)
    }
}

impl std::fmt::Display for MigrationReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.applied.is_empty() {
            write!(
                f,
                "schema {} is up to date at version {}",
                self.schema, self.previous_version
            )
        } else {
            write!(
                f,
                "schema {}: applied migration(s) {:?}, now at version {}",
                self.schema,
                self.applied,
                self.current_version()
            )
        }
    }
}

/// The oldest PostgreSQL the statements run on: the relay passes id sets as `int8multirange`.
const MIN_SERVER_VERSION_NUM: i32 = 140000;

pub(crate) async fn run(statements: &Statements, pool: &PgPool) -> Result<MigrationReport, Error> {
    let version: String = sqlx::query_scalar("SHOW server_version_num")
        .fetch_one(pool)
        .await?;
    let found = version.trim().parse().unwrap_or(0);
    if found < MIN_SERVER_VERSION_NUM {
        return Err(Error::ServerTooOld { found: version });
    }
    let mut tx = pool.begin().await?;
    let (applied, previous_version) = migrate(statements.schema(), &mut tx).await?;
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if previous_version > known {
        return Err(Error::SchemaTooNew {
            schema: statements.schema().to_string(),
            found: previous_version,
            known,
        });
    }
    tx.commit().await?;
    Ok(MigrationReport {
        schema: statements.schema().to_string(),
        previous_version,
        applied,
    })
}

/// Applies the embedded migrations that are missing, under an advisory lock so that concurrent
/// migrators (several service instances starting at once) take turns. Returns the versions
/// applied now and the version before.
async fn migrate(
    schema_name: &SchemaName,
    tx: &mut Transaction<'_, Postgres>,
) -> Result<(Vec<i32>, i32), sqlx::Error> {
    let schema = schema_name.as_str();
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
            .replace("{channel}", &schema_name.channel());
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

impl Statements {
    /// The schema's migration version; 0 when it was never migrated (no such schema or table).
    pub async fn schema_version(&self, conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
        let table = format!("{}.schema_version", self.schema().as_str());
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
}
