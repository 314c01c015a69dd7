//! Test support: the `dev/up` services (failing loudly when they are absent), a unique schema
//! and topic per test so tests run in parallel, a Kafka reader, a throwaway Kafka broker for
//! tests that stop one, and condition waits with deadlines instead of sleeps.

mod broker;
pub mod chaos;
mod kafka;
mod postgres_server;
mod proxy;

use std::future::Future;
use std::time::Duration;

use outbox::{Outbox, OutboxConfig, SchemaName};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, PgConnection, PgPool};

pub use broker::{free_port, KafkaBroker};
pub use kafka::{
    alter_topic_config, create_replicated_topic, create_topic, create_topic_on,
    create_topic_with_config, partition_leader, record_count, unique_topic, Received, TopicReader,
};
pub use postgres_server::PostgresServer;
pub use proxy::{Fault, TcpProxy};

/// The `dev/up` PostgreSQL unless `DATABASE_URL` says otherwise.
pub const DEFAULT_DATABASE_URL: &str = "postgres://outbox:outbox@127.0.0.1:55432/outbox";
/// The `dev/up` Kafka unless `KAFKA_BOOTSTRAP_SERVERS` says otherwise.
pub const DEFAULT_KAFKA_BOOTSTRAP_SERVERS: &str = "127.0.0.1:19092";

/// `DATABASE_URL`, defaulting to the `dev/up` database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// `KAFKA_BOOTSTRAP_SERVERS`, defaulting to the `dev/up` broker.
pub fn kafka_bootstrap_servers() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .unwrap_or_else(|_| DEFAULT_KAFKA_BOOTSTRAP_SERVERS.to_owned())
}

/// The `dev/up` Kafka's SASL_SSL listener unless `KAFKA_SASL_BOOTSTRAP_SERVERS` says otherwise.
pub fn kafka_sasl_bootstrap_servers() -> String {
    std::env::var("KAFKA_SASL_BOOTSTRAP_SERVERS").unwrap_or_else(|_| "127.0.0.1:19094".to_owned())
}

/// The CA that signed the SASL_SSL listener's certificate (`KAFKA_SASL_CA`, or where `dev/up`
/// makes it); panics with instructions when it is missing.
pub fn kafka_sasl_ca() -> String {
    let path = std::env::var("KAFKA_SASL_CA").unwrap_or_else(|_| {
        format!(
            "{}/.cache/outbox-dev/kafka/tls/ca.pem",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    assert!(
        std::path::Path::new(&path).exists(),
        "the SASL_SSL listener's CA {path} is missing: run eval \"$(dev/up)\""
    );
    path
}

/// A user of the SASL_SSL listener (`dev/up` creates them, SCRAM-SHA-512): `outbox-relay` may
/// write and describe topics named `secured-*`; `outbox-consumer` may read them, in groups named
/// `secured-*`.
pub struct SaslUser {
    /// The user name.
    pub name: &'static str,
    /// Its password: dev only, and distinctive, so that tests can look for it in output.
    pub password: &'static str,
}

/// The relay's user of the SASL_SSL listener.
pub const SASL_RELAY: SaslUser = SaslUser {
    name: "outbox-relay",
    password: "dev-only-relay-secret",
};

/// The consumer's user of the SASL_SSL listener.
pub const SASL_CONSUMER: SaslUser = SaslUser {
    name: "outbox-consumer",
    password: "dev-only-consumer-secret",
};

/// librdkafka properties for `user` on the SASL_SSL listener, trusting `ca`.
pub fn kafka_sasl_properties(user: &SaslUser, password: &str, ca: &str) -> Vec<(String, String)> {
    [
        ("bootstrap.servers", kafka_sasl_bootstrap_servers()),
        ("security.protocol", "SASL_SSL".to_owned()),
        ("sasl.mechanisms", "SCRAM-SHA-512".to_owned()),
        ("sasl.username", user.name.to_owned()),
        ("sasl.password", password.to_owned()),
        ("ssl.ca.location", ca.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The `dev/up` PgBouncer's database in transaction pooling mode, unless
/// `PGBOUNCER_TRANSACTION_URL` says otherwise.
pub fn pgbouncer_transaction_url() -> String {
    std::env::var("PGBOUNCER_TRANSACTION_URL").unwrap_or_else(|_| {
        "postgres://outbox:outbox@127.0.0.1:56432/outbox_transaction".to_owned()
    })
}

/// The `dev/up` PgBouncer's database in session pooling mode, unless `PGBOUNCER_SESSION_URL`
/// says otherwise.
pub fn pgbouncer_session_url() -> String {
    std::env::var("PGBOUNCER_SESSION_URL")
        .unwrap_or_else(|_| "postgres://outbox:outbox@127.0.0.1:56432/outbox_session".to_owned())
}

/// A pool of up to `max_connections` on `url` (one of the PgBouncer URLs above), each
/// connection a client of its own. Panics with instructions when it is unreachable.
pub async fn pool_on(url: &str, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "cannot reach {}: {error}\nStart the services (PgBouncer included) with: eval \"$(dev/up)\"",
                redact(url)
            )
        })
}

/// A pool on the test database. Panics with instructions when PostgreSQL is unreachable: a test
/// that needs the database fails, it never skips.
pub async fn pool() -> PgPool {
    let url = database_url();
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "cannot reach PostgreSQL at {}: {error}\nStart the services with: eval \"$(dev/up)\"",
                redact(&url)
            )
        })
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***{}", &url[..scheme], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// An outbox in a schema of its own, migrated, so that tests do not see each other's messages.
///
/// A test ends with [`TestOutbox::drop_schema`]; a test that fails (or returns) before it still
/// has its schema dropped when the `TestOutbox` is dropped.
pub struct TestOutbox {
    /// Pool on the test database.
    pub pool: PgPool,
    /// Writer for the test schema.
    pub outbox: Outbox,
    /// The test schema.
    pub schema: SchemaName,
    guard: SchemaGuard,
}

impl TestOutbox {
    /// Creates and migrates a fresh schema (from the baseline).
    pub async fn new() -> Self {
        let outbox = Self::unmigrated().await;
        outbox
            .outbox
            .migrate(&outbox.pool)
            .await
            .expect("migrate the test schema");
        outbox
    }

    /// A fresh schema name, not created yet.
    pub async fn unmigrated() -> Self {
        let pool = pool().await;
        let schema = SchemaName::new(format!("t_{}", short_id())).expect("valid schema name");
        // Before anything is created, so that a schema left half-migrated is dropped too.
        let guard = SchemaGuard {
            schema: Some(schema.clone()),
        };
        let outbox = Outbox::new(OutboxConfig::default().schema(schema.clone()));
        TestOutbox {
            pool,
            outbox,
            schema,
            guard,
        }
    }

    /// How far the busy mark a working relay keeps (migration 0018) is ahead of the database's
    /// clock, in ms: negative once it has passed or was reset.
    pub async fn busy_mark_ahead(&self) -> i64 {
        sqlx::query_scalar(&format!(
            "SELECT pg_sequence_last_value('{}.relay_busy_until')
                    - (extract(epoch FROM now()) * 1000)::bigint",
            self.schema
        ))
        .fetch_one(&self.pool)
        .await
        .expect("read the busy mark")
    }

    /// Sets the busy mark (see [`set_busy_mark`]).
    pub async fn set_busy_mark(&self, ahead_ms: Option<i64>) {
        set_busy_mark(&self.pool, &self.schema, ahead_ms).await;
    }

    /// Writes the lease row of a relay that holds the lease and, with `idle`, waits for work:
    /// what writers' insert trigger reads to decide whether to wake it. For tests of the write
    /// side without a relay.
    pub async fn relay_waits(&self, idle: bool) {
        sqlx::query(&format!(
            "INSERT INTO {}.relay_lease AS l
                    (name, holder, token, idle, acquired_at, renewed_at, expires_at)
             VALUES ('relay', 'test', 1, $1, now(), now(), now() + interval '1 hour')
             ON CONFLICT (name) DO UPDATE SET idle = $1, expires_at = excluded.expires_at",
            self.schema
        ))
        .bind(idle)
        .execute(&self.pool)
        .await
        .expect("write the lease row");
    }

    /// A fresh schema as a build of schema version `version` left it, for upgrade tests: the
    /// embedded migrations 1 to `version` applied one by one, in one transaction, and recorded
    /// in `schema_version` as that build recorded them (from version 14 on, with checksums).
    /// Not migrated further. Panics unless `version` is below the current one.
    pub async fn at_version(version: i32) -> Self {
        let current = outbox::migrate::SCHEMA_VERSION;
        assert!(
            (1..current).contains(&version),
            "at_version({version}): versions 1 to {} only",
            current - 1
        );
        let outbox = Self::unmigrated().await;
        let schema = &outbox.schema;
        let mut tx = outbox.pool.begin().await.expect("begin");
        sqlx::raw_sql(&format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.schema_version (
                 version integer PRIMARY KEY,
                 description text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .execute(&mut *tx)
        .await
        .expect("create the schema and its version table");
        for migration in outbox::migrate::MIGRATIONS
            .iter()
            .take_while(|m| m.version <= version)
        {
            sqlx::raw_sql(&migration.sql(schema))
                .execute(&mut *tx)
                .await
                .unwrap_or_else(|e| panic!("migration {}: {e}", migration.version));
            sqlx::query(&format!(
                "INSERT INTO {schema}.schema_version (version, description) VALUES ($1, $2)"
            ))
            .bind(migration.version)
            .bind(migration.description)
            .execute(&mut *tx)
            .await
            .expect("record the migration");
        }
        if version >= 14 {
            for migration in outbox::migrate::MIGRATIONS
                .iter()
                .take_while(|m| m.version <= version)
            {
                sqlx::query(&format!(
                    "UPDATE {schema}.schema_version SET checksum = $2 WHERE version = $1"
                ))
                .bind(migration.version)
                .bind(migration.checksum())
                .execute(&mut *tx)
                .await
                .expect("record the checksum");
            }
        }
        tx.commit().await.expect("commit");
        outbox
    }

    /// Saves and commits each message in a transaction of its own; returns the sequences.
    pub async fn commit_each(
        &self,
        messages: impl IntoIterator<Item = outbox::Message>,
    ) -> Vec<i64> {
        let mut sequences = Vec::new();
        for message in messages {
            let mut tx = self.pool.begin().await.expect("begin");
            sequences.push(
                self.outbox
                    .save_for_publishing(&mut tx, message)
                    .await
                    .expect("save"),
            );
            tx.commit().await.expect("commit");
        }
        sequences
    }

    /// Saves and commits all `messages` in one transaction; returns the sequences.
    pub async fn commit_all(&self, messages: Vec<outbox::Message>) -> Vec<i64> {
        let mut tx = self.pool.begin().await.expect("begin");
        let sequences = self
            .outbox
            .save_all_for_publishing(&mut tx, messages)
            .await
            .expect("save");
        tx.commit().await.expect("commit");
        sequences
    }

    /// Rows in the `message` table: messages not yet published (pending, held or in flight).
    pub async fn pending(&self) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {}.message", self.schema))
            .fetch_one(&self.pool)
            .await
            .expect("count pending")
    }

    /// Waits until nothing is pending: the relay completed every message. Panics after `timeout`.
    pub async fn wait_until_drained(&self, timeout: Duration) {
        wait_until(timeout, "nothing is pending", || async {
            self.pending().await == 0
        })
        .await;
    }

    /// Moves published message `id` from the history into the dead letters, as if the relay had
    /// dead-lettered it, for tests of `dead-letters retry`.
    pub async fn dead_letter_by_hand(&self, id: i64) {
        let moved = sqlx::query(&format!(
            "WITH moved AS (DELETE FROM {0}.published WHERE id = $1
                            RETURNING id, topic, key, payload, headers, created_at)
             INSERT INTO {0}.dead_letter
                    (id, topic, key, payload, headers, created_at, attempts, error)
             SELECT id, topic, key, payload, headers, created_at, 1, 'by hand' FROM moved",
            self.schema
        ))
        .bind(id)
        .execute(&self.pool)
        .await
        .expect("dead-letter a published message");
        assert_eq!(
            moved.rows_affected(),
            1,
            "message {id} is not in the history"
        );
    }

    /// Removes the schema and everything in it.
    pub async fn drop_schema(mut self) {
        sqlx::query(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .execute(&self.pool)
            .await
            .expect("drop the test schema");
        self.guard.schema = None;
    }
}

/// Drops a test schema that [`TestOutbox::drop_schema`] did not: the test failed or returned
/// early. `Drop` cannot await, and cannot `block_on` inside the test's runtime (or rely on that
/// runtime, which is blocked meanwhile), so a thread with a runtime and a connection of its own
/// does it, and the drop waits for that thread.
struct SchemaGuard {
    schema: Option<SchemaName>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let Some(schema) = self.schema.take() else {
            return;
        };
        let dropped = std::thread::spawn(move || -> Result<(), BoxError> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(60), drop_schema_of_failed_test(&schema))
                    .await
                    .map_err(|_| format!("DROP SCHEMA {schema} took over 60 s"))?
            })
        })
        .join();
        // Never a panic here: a panic while the failed test unwinds would abort the process.
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("could not drop a test schema: {error}"),
            Err(_) => eprintln!("could not drop a test schema: the dropping thread panicked"),
        }
    }
}

/// Drops `schema` from a connection of its own. A failed test may leave sessions that hold locks
/// in its schema (an open transaction, a relay still running on the blocked runtime): they would
/// block the drop for good, so after a short wait they are terminated. They can only be the
/// failed test's own: no other test uses its schema.
async fn drop_schema_of_failed_test(schema: &SchemaName) -> Result<(), BoxError> {
    let mut conn = PgConnection::connect(&database_url()).await?;
    sqlx::query("SET lock_timeout = '1s'")
        .execute(&mut conn)
        .await?;
    loop {
        match sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut conn)
            .await
        {
            Ok(_) => return Ok(()),
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03") => {
                sqlx::query(
                    "SELECT pg_terminate_backend(l.pid)
                       FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                      WHERE c.relnamespace = $1::text::regnamespace AND l.pid <> pg_backend_pid()",
                )
                .bind(schema.as_str())
                .execute(&mut conn)
                .await?;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Whether something accepts connections on loopback `port`.
pub fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// `len` bytes that lz4 cannot shrink (xorshift): a payload that stays over a size limit after
/// the producer compresses it.
pub fn incompressible(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Sets the busy mark a working relay keeps (migration 0018) in `schema` `ahead_ms` ahead of
/// the database's clock (negative: passed), or resets it (`None`), as a relay would: for tests
/// and benchmarks of writers beside a busy relay without one running.
pub async fn set_busy_mark(pool: &PgPool, schema: &SchemaName, ahead_ms: Option<i64>) {
    sqlx::query(&format!(
        "SELECT setval('{schema}.relay_busy_until',
                CASE WHEN $1::bigint IS NULL THEN 0
                     ELSE (extract(epoch FROM now()) * 1000)::bigint + $1 END)"
    ))
    .bind(ahead_ms)
    .execute(pool)
    .await
    .expect("set the busy mark");
}

/// A short random id for names.
pub fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Declares each scenario `async fn(Delivery)` given as a test in two modules, `at_least_once` and
/// `exactly_once`, run with `outbox_kafka_relay::Delivery` (a path the calling crate resolves).
#[macro_export]
macro_rules! in_both_modes {
    ($($scenario:ident),* $(,)?) => {
        mod at_least_once {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(outbox_kafka_relay::Delivery::AtLeastOnce).await
                }
            )*
        }
        mod exactly_once {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(outbox_kafka_relay::Delivery::ExactlyOnce).await
                }
            )*
        }
    };
}
