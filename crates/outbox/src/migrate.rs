//! Schema migrations: what creates and upgrades an outbox schema.
//!
//! - A new schema is created by one script, the *baseline* (`migrations/baseline.sql`), and
//!   recorded at its version ([`BASELINE_VERSION`]); migrations after it, if any, follow.
//! - A schema made by an earlier version applies the migrations after its version, in order
//!   ([`MIGRATIONS`]); nothing in it is lost. The test
//!   `the_baseline_builds_the_schema_the_migrations_build` keeps both paths equal.
//! - A run is one transaction under an advisory lock on the schema: concurrent migrators (many
//!   instances starting at once) take turns, and a failure leaves the schema as it was.
//! - Every applied migration's checksum is recorded in `schema_version` (the column comes with
//!   version 14; the run that applies it fills it in for the migrations applied before). A run
//!   first compares the checksum of every applied migration with this build's copy, and refuses
//!   ([`Error::MigrationChanged`]) when one differs: a migration edited after it ran somewhere
//!   would leave schemas that differ under one version number. A schema created by the baseline
//!   records the checksum of the migration of the baseline's version, so it is checked as any
//!   other.

use sha2::{Digest as _, Sha256};
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::error::Error;
use crate::schema::SchemaName;

/// One embedded migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// The schema version it brings the schema to.
    pub version: i32,
    /// What it does, as recorded in `schema_version`.
    pub description: &'static str,
    /// Its file, under `crates/outbox/src/migrations/`.
    pub file: &'static str,
    /// Its text, with `{schema}` and `{channel}` where the schema name and its notification
    /// channel go (see [`Migration::sql`]).
    pub template: &'static str,
}

impl Migration {
    /// The statements for `schema`.
    pub fn sql(&self, schema: &SchemaName) -> String {
        fill_in(self.template, schema)
    }

    /// The SHA-256 of its text before the schema name is filled in, in hex. Line ends count as
    /// `\n` whatever the checkout made of them (a Windows checkout may turn them into `\r\n`,
    /// which must not read as an edited migration).
    pub fn checksum(&self) -> String {
        checksum(self.template)
    }
}

fn checksum(text: &str) -> String {
    Sha256::digest(text.replace("\r\n", "\n"))
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

macro_rules! migration {
    ($version:literal, $file:literal, $description:literal) => {
        Migration {
            version: $version,
            description: $description,
            file: $file,
            template: include_str!(concat!("migrations/", $file)),
        }
    };
}

/// The embedded migrations, in order; version `n` is at index `n - 1`. Never edit one that was
/// released: add a new one (and change the baseline to match).
#[doc(hidden)] // for upgrade tests; not part of the API
pub const MIGRATIONS: &[Migration] = &[
    migration!(
        1,
        "0001_outbox.sql",
        "outbox table, lease table, notify trigger, enqueue()"
    ),
    migration!(2, "0002_inbox.sql", "inbox table"),
    migration!(3, "0003_poison.sql", "per-message retry, dead letters"),
    migration!(
        4,
        "0004_notify_when_idle.sql",
        "notify only while no relay is busy"
    ),
    migration!(
        5,
        "0005_published_table.sql",
        "published messages move to their own table"
    ),
    migration!(
        6,
        "0006_notify_only_idle.sql",
        "notify only while a relay waits"
    ),
    migration!(
        7,
        "0007_notify_before_insert.sql",
        "wake-up trigger before the insert"
    ),
    migration!(8, "0008_claim_floor.sql", "claim floor"),
    migration!(9, "0009_floor_generation.sql", "claim floor generation"),
    migration!(
        10,
        "0010_leaner_insert.sql",
        "one insert trigger, no duplicate pending index"
    ),
    migration!(11, "0011_untrusted_rows.sql", "enqueue() validates headers"),
    migration!(
        12,
        "0012_held_by_retry_time.sql",
        "held messages by retry time"
    ),
    migration!(
        13,
        "0013_cheaper_enqueue.sql",
        "cheaper topic check and insert trigger, enqueue_all()"
    ),
    migration!(
        14,
        "0014_no_processed_at.sql",
        "message.processed_at dropped, migration checksums"
    ),
    migration!(
        15,
        "0015_relay_progress.sql",
        "exactly-once delivery's completed batch per lease"
    ),
    migration!(
        16,
        "0016_cheaper_topic_check.sql",
        "the topic check without a counted repetition"
    ),
    migration!(
        17,
        "0017_topic_domain.sql",
        "the topic check as a domain, planned once per session"
    ),
    migration!(
        18,
        "0018_busy_mark.sql",
        "writers skip the wake-up trigger while the relay is busy"
    ),
    migration!(
        19,
        "0019_mark_read_in_the_function.sql",
        "the busy mark read in the trigger's function, not at every statement"
    ),
    migration!(
        20,
        "0020_trigger_function_names_pg_catalog.sql",
        "the trigger's function names PostgreSQL's functions with their schema"
    ),
];

/// The schema version these statements are written for: the last embedded migration.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// The version a new schema is created at: `migrations/baseline.sql` builds what migrations 1 to
/// this one build.
pub const BASELINE_VERSION: i32 = 20;

const BASELINE: &str = include_str!("migrations/baseline.sql");

/// The first version that records checksums (migration 0014 adds the column).
const CHECKSUMS_SINCE: i32 = 14;

/// What a migration run did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
        } else if self.previous_version == 0 {
            write!(
                f,
                "schema {} created at version {}",
                self.schema,
                self.current_version()
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

/// Creates or upgrades `schema` (see the module docs).
///
/// Every statement runs inside the one transaction and is sent unnamed (`persistent(false)`):
/// each runs once per process, and so migrations run the same through a pooler in transaction
/// mode, which keeps a transaction on one server connection but not a cached statement.
pub(crate) async fn run(schema: &SchemaName, pool: &PgPool) -> Result<MigrationReport, Error> {
    let mut tx = pool.begin().await?;
    let version: String = sqlx::query_scalar("SHOW server_version_num")
        .persistent(false)
        .fetch_one(&mut *tx)
        .await?;
    let found = version.trim().parse().unwrap_or(0);
    if found < MIN_SERVER_VERSION_NUM {
        return Err(Error::ServerTooOld { found: version });
    }
    let report = migrate(schema, &mut tx).await?;
    tx.commit().await?;
    Ok(report)
}

/// Applies what `schema` lacks within `tx`, under an advisory lock so that concurrent migrators
/// take turns.
async fn migrate(
    schema: &SchemaName,
    tx: &mut Transaction<'_, Postgres>,
) -> Result<MigrationReport, Error> {
    let name = schema.as_str();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outbox-migrate:' || $1))")
        .bind(name)
        .persistent(false)
        .execute(&mut **tx)
        .await?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {name}"))
        .persistent(false)
        .execute(&mut **tx)
        .await?;
    sqlx::query(&format!(
        "CREATE TABLE IF NOT EXISTS {name}.schema_version (
             version integer PRIMARY KEY,
             description text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .persistent(false)
    .execute(&mut **tx)
    .await?;
    let previous_version: i32 = sqlx::query_scalar(&format!(
        "SELECT coalesce(max(version), 0) FROM {name}.schema_version"
    ))
    .persistent(false)
    .fetch_one(&mut **tx)
    .await?;
    if previous_version > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            schema: name.to_owned(),
            found: previous_version,
            known: SCHEMA_VERSION,
        });
    }
    if previous_version >= CHECKSUMS_SINCE {
        verify_checksums(schema, tx).await?;
    }

    let mut applied = Vec::new();
    let mut version = previous_version;
    if version == 0 {
        sqlx::raw_sql(&fill_in(BASELINE, schema))
            .execute(&mut **tx)
            .await?;
        let description = format!("baseline: migrations 1 to {BASELINE_VERSION} in one script");
        record(tx, schema, BASELINE_VERSION, &description).await?;
        applied.push(BASELINE_VERSION);
        version = BASELINE_VERSION;
    }
    for migration in MIGRATIONS.iter().filter(|m| m.version > version) {
        sqlx::raw_sql(&migration.sql(schema))
            .execute(&mut **tx)
            .await?;
        record(tx, schema, migration.version, migration.description).await?;
        applied.push(migration.version);
    }
    if !applied.is_empty() {
        // The rows of this run, and those written before there were checksums (the migrations
        // before 0014), get the checksum of this build's copy of their migration.
        let (versions, checksums): (Vec<i32>, Vec<String>) =
            MIGRATIONS.iter().map(|m| (m.version, m.checksum())).unzip();
        sqlx::query(&format!(
            "UPDATE {name}.schema_version s SET checksum = e.checksum
               FROM unnest($1::integer[], $2::text[]) AS e(version, checksum)
              WHERE s.version = e.version AND s.checksum IS NULL"
        ))
        .bind(versions)
        .bind(checksums)
        .persistent(false)
        .execute(&mut **tx)
        .await?;
    }
    Ok(MigrationReport {
        schema: name.to_owned(),
        previous_version,
        applied,
    })
}

/// `template` with the schema name and its notification channel filled in.
fn fill_in(template: &str, schema: &SchemaName) -> String {
    template
        .replace("{schema}", schema.as_str())
        .replace("{channel}", &schema.channel())
}

async fn record(
    tx: &mut Transaction<'_, Postgres>,
    schema: &SchemaName,
    version: i32,
    description: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {}.schema_version (version, description) VALUES ($1, $2)",
        schema.as_str()
    ))
    .bind(version)
    .bind(description)
    .persistent(false)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Refuses the schema when the checksum recorded for an applied migration is not that of this
/// build's copy.
async fn verify_checksums(
    schema: &SchemaName,
    tx: &mut Transaction<'_, Postgres>,
) -> Result<(), Error> {
    let recorded: Vec<(i32, Option<String>)> = sqlx::query_as(&format!(
        "SELECT version, checksum FROM {}.schema_version ORDER BY version",
        schema.as_str()
    ))
    .persistent(false)
    .fetch_all(&mut **tx)
    .await?;
    for (version, checksum) in recorded {
        let Some(migration) = MIGRATIONS.iter().find(|m| m.version == version) else {
            continue;
        };
        let embedded = migration.checksum();
        if checksum.as_deref() != Some(embedded.as_str()) {
            return Err(Error::MigrationChanged {
                schema: schema.to_string(),
                version,
                file: migration.file,
                recorded: checksum,
                embedded,
            });
        }
    }
    Ok(())
}

/// The schema's migration version; 0 when it was never migrated (no such schema or table).
pub(crate) async fn schema_version(
    schema: &SchemaName,
    conn: &mut PgConnection,
) -> Result<i32, sqlx::Error> {
    {
        let table = format!("{}.schema_version", schema.as_str());
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&table)
            .persistent(false)
            .fetch_one(&mut *conn)
            .await?;
        if !exists {
            return Ok(0);
        }
        sqlx::query_scalar(&format!("SELECT coalesce(max(version), 0) FROM {table}"))
            .persistent(false)
            .fetch_one(conn)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_named_after_their_version() {
        for (index, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version as usize, index + 1);
            assert!(
                migration
                    .file
                    .starts_with(&format!("{:04}_", migration.version)),
                "{}",
                migration.file
            );
        }
        assert!((CHECKSUMS_SINCE..=SCHEMA_VERSION).contains(&BASELINE_VERSION));
    }

    #[test]
    fn a_checksum_does_not_depend_on_the_checkout_s_line_ends() {
        let lf = MIGRATIONS[0].template;
        let crlf = lf.replace('\n', "\r\n");
        assert_ne!(lf, crlf);
        assert_eq!(checksum(lf), checksum(&crlf));
        assert_eq!(checksum(lf), MIGRATIONS[0].checksum());
        assert_eq!(checksum(lf).len(), 64);
    }
}
