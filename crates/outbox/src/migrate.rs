use sqlx::PgPool;

use crate::error::Error;
use crate::postgres::{Statements, MIGRATIONS};

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
    let (applied, previous_version) = statements.migrate(&mut tx).await?;
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
