//! What an operator reads and does: the backlog, held keys, dead letters, republishing, leases,
//! retention. The `outbox` command, the relay's health and metrics, and any console are built on
//! these; none of them changes what the relay is publishing except through the documented
//! effects (a message put back keeps its sequence, and lowers the relay's claim floor so the
//! running relay finds it at once).
//!
//! Every statement takes a connection, so an operator's tool can run it on a pool connection,
//! in a transaction of its own, or with its own `statement_timeout`.

use std::time::Duration;

use sqlx::postgres::PgArguments;
use sqlx::query::QueryAs;
use sqlx::{PgConnection, Postgres};

use crate::error::Error;
use crate::schema::SchemaName;
use crate::writer::Sequence;

/// Whether `c` changes how the text around it reads without showing itself: bidirectional
/// marks and overrides, zero-width characters. What shows stored keys, topics and errors (any SQL
/// writer chose them) escapes these, and control characters: the `outbox` command and the
/// console both.
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{061c}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{feff}'
    )
}

/// Operator statements on one outbox schema.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), outbox::Error> {
/// use outbox::admin::Admin;
///
/// let admin = Admin::new(&outbox::SchemaName::default_schema());
/// let mut conn = pool.acquire().await?;
/// let backlog = admin.backlog(&mut conn).await?;
/// println!("{} pending, {} dead letters", backlog.pending, backlog.dead_letters);
/// for key in admin.held_keys(&mut conn, 20).await? {
///     println!("{} held by message {}: {:?}", key.topic, key.head, key.last_error);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    schema: SchemaName,
    /// See [`Admin::transaction_pooling`].
    persistent: bool,
    backlog: String,
    activity: String,
    held_keys: String,
    dead_letters: String,
    requeue_dead_letters: String,
    drop_dead_letters: String,
    republish_count: String,
    republish_batch: String,
    leases: String,
    cleanup: String,
    dead_letter_previews: String,
    publish_history: String,
}

/// Backlog figures for status and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Backlog {
    /// Messages not yet published.
    pub pending: i64,
    /// Age of the oldest pending message; `None` when nothing is pending.
    pub oldest_age: Option<Duration>,
    /// Pending messages held after a failed delivery (waiting for their retry).
    pub held: i64,
    /// Messages in the dead-letter table.
    pub dead_letters: i64,
}

/// What has happened lately, for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Activity {
    /// Time since the last message was published (kept completions only).
    pub since_last_publish: Option<Duration>,
    /// Pending messages with at least one failed delivery attempt.
    pub failing: i64,
    /// The oldest failing message.
    pub oldest_failure: Option<Failure>,
}

/// A pending message whose deliveries failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failure {
    /// Its sequence.
    pub sequence: Sequence,
    /// Failed attempts so far.
    pub attempts: i32,
    /// The last error (cut as [`SHOWN_ERROR_CHARS`] says).
    pub error: String,
}

/// How much of a key the listings read ([`Admin::held_keys`], [`Admin::dead_letters`],
/// [`Admin::dead_letter_previews`]): any SQL writer can store a key of up to 1 GB, which would
/// otherwise be read whole into an operator's terminal or page. A longer key is cut in the
/// statement and flagged (`key_cut`).
pub const SHOWN_KEY_BYTES: usize = 1024;

/// How much of an error the listings read, for the same reason: a longer one is cut in the
/// statement and ends with "…" after this many characters.
pub const SHOWN_ERROR_CHARS: usize = 4096;

/// What the statements read: one more than is shown, to tell a cut from an exact fit.
const READ_KEY_BYTES: i32 = SHOWN_KEY_BYTES as i32 + 1;
const READ_ERROR_CHARS: i32 = SHOWN_ERROR_CHARS as i32 + 1;

/// A key as read: at most [`SHOWN_KEY_BYTES`], and whether it was longer.
fn shown_key(key: Option<Vec<u8>>) -> (Option<Vec<u8>>, bool) {
    match key {
        Some(mut key) if key.len() > SHOWN_KEY_BYTES => {
            key.truncate(SHOWN_KEY_BYTES);
            (Some(key), true)
        }
        key => (key, false),
    }
}

/// An error as read: at most [`SHOWN_ERROR_CHARS`], then "…" if it was longer.
fn shown_error(mut error: String) -> String {
    if let Some((end, _)) = error.char_indices().nth(SHOWN_ERROR_CHARS) {
        error.truncate(end);
        error.push('…');
    }
    error
}

/// A key whose head message failed and holds back the key's later messages.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldKey {
    /// Topic.
    pub topic: String,
    /// Key (`None`: a single message without key), at most [`SHOWN_KEY_BYTES`] of it.
    pub key: Option<Vec<u8>>,
    /// The key is longer than [`SHOWN_KEY_BYTES`]: `key` is its start.
    pub key_cut: bool,
    /// Sequence of the failed head message.
    pub head: Sequence,
    /// Its attempts so far.
    pub attempts: i32,
    /// Pending messages of the key that have failed at least once.
    pub failed_messages: i64,
    /// The head's last error (cut as [`SHOWN_ERROR_CHARS`] says).
    pub last_error: Option<String>,
    /// Time until the head's next attempt (zero: due now).
    pub retry_in: Option<Duration>,
}

/// A dead letter, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Original sequence.
    pub id: Sequence,
    /// Topic.
    pub topic: String,
    /// Key, at most [`SHOWN_KEY_BYTES`] of it.
    pub key: Option<Vec<u8>>,
    /// The key is longer than [`SHOWN_KEY_BYTES`]: `key` is its start.
    pub key_cut: bool,
    /// Delivery attempts.
    pub attempts: i32,
    /// The permanent error (cut as [`SHOWN_ERROR_CHARS`] says).
    pub error: String,
    /// Time since it was dead-lettered.
    pub age: Duration,
}

impl DeadLetter {
    /// From a listing's row: key and error as read, the age in milliseconds.
    fn new(
        id: Sequence,
        topic: String,
        key: Option<Vec<u8>>,
        attempts: i32,
        error: String,
        age_ms: i64,
    ) -> Self {
        let (key, key_cut) = shown_key(key);
        DeadLetter {
            id,
            topic,
            key,
            key_cut,
            attempts,
            error: shown_error(error),
            age: Duration::from_millis(age_ms.max(0) as u64),
        }
    }
}

/// A dead letter with the start of its payload and headers, for a console's preview.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetterPreview {
    /// The dead letter.
    pub letter: DeadLetter,
    /// The payload's first bytes (`None`: no payload).
    pub payload: Option<Vec<u8>>,
    /// The whole payload's size in bytes.
    pub payload_size: i64,
    /// The headers' JSON text, cut to the same size (`None`: no headers).
    pub headers: Option<String>,
}

/// Messages published in one interval of [`Admin::publish_history`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishedInterval {
    /// Messages completed in it.
    pub published: i64,
    /// Their mean time from insert to completion (`None`: none published).
    pub mean_lag: Option<Duration>,
}

/// Which published messages to publish again. Unset fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RepublishFilter {
    /// Lowest sequence, inclusive.
    pub from_id: Option<Sequence>,
    /// Highest sequence, inclusive.
    pub to_id: Option<Sequence>,
    /// Exact key.
    pub key: Option<Vec<u8>>,
    /// Exact topic.
    pub topic: Option<String>,
    /// Created at or after (PostgreSQL timestamptz text).
    pub since: Option<String>,
    /// Created at or before (PostgreSQL timestamptz text).
    pub until: Option<String>,
}

impl RepublishFilter {
    /// Matches every published message.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only sequences `from..=to`.
    pub fn ids(mut self, from: Option<Sequence>, to: Option<Sequence>) -> Self {
        (self.from_id, self.to_id) = (from, to);
        self
    }

    /// Only this key.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Only this topic.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Only messages created in this window (PostgreSQL timestamptz text, either end open).
    pub fn created(mut self, since: Option<String>, until: Option<String>) -> Self {
        (self.since, self.until) = (since, until);
        self
    }
}

/// Relay sessions from one client address, for a console's "relays seen".
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayClient {
    /// The client's address (`local socket` for Unix-socket sessions).
    pub address: String,
    /// Its sessions.
    pub sessions: i64,
    /// How long its oldest session has been connected (`None`: not visible to this role).
    pub connected: Option<Duration>,
}

/// The session whose snapshot is oldest: while it holds it, vacuum cannot remove the index
/// entries of completed messages, and every claim walks over them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct OldestSnapshot {
    /// Backend process id (`pg_terminate_backend` takes it).
    pub pid: i32,
    /// How long its transaction (or, outside one, its statement) has been running.
    pub age: Duration,
    /// `active`, `idle in transaction`, ... (`None` when the role may not see it).
    pub state: Option<String>,
    /// The client's `application_name`.
    pub application_name: String,
}

/// A lease row, for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseRow {
    /// Lease name.
    pub name: String,
    /// Current or last holder.
    pub holder: String,
    /// Fencing token of the current or last term.
    pub token: i64,
    /// Milliseconds until expiry; zero or negative when free.
    pub expires_in_ms: i64,
}

// least() ignores NULLs: the age of an empty outbox must stay NULL, not 1e9 s.
const BACKLOG: &str = "SELECT count(*),
        CASE WHEN min(created_at) FILTER (WHERE isfinite(created_at)) IS NOT NULL
             THEN (least(extract(epoch FROM now() - min(created_at) FILTER (WHERE isfinite(created_at))), 1e9)
                   * 1000000)::bigint
        END,
        count(*) FILTER (WHERE retry_at > now()),
        (SELECT count(*) FROM {schema}.dead_letter)
   FROM {schema}.message";

// Finite times only, clamped: a row written by hand with `processed_at = 'infinity'` made the
// subtraction fail, and `outbox status` with it.
const ACTIVITY: &str = "SELECT (least(extract(epoch FROM now() - (SELECT max(processed_at) FILTER (WHERE isfinite(processed_at))
                                                        FROM {schema}.published)), 1e9) * 1000000)::bigint,
        (SELECT count(*) FROM {schema}.message WHERE attempts > 0),
        f.id, f.attempts, left(f.last_error, $1)
   FROM (SELECT 1) one
   LEFT JOIN LATERAL (SELECT id, attempts, last_error FROM {schema}.message
                       WHERE attempts > 0
                       ORDER BY id LIMIT 1) f ON true";

const HELD_KEYS: &str =
    "SELECT topic, substring(key FROM 1 FOR $2), min(id), max(attempts), count(*),
        (SELECT left(last_error, $3) FROM {schema}.message x WHERE x.id = min(h.id)),
        (SELECT CASE WHEN isfinite(retry_at)
                     THEN (greatest(least(extract(epoch FROM retry_at - now()), 1e9), -1e9)
                           * 1000000)::bigint END
           FROM {schema}.message x WHERE x.id = min(h.id))
   FROM {schema}.message h
  WHERE retry_at IS NOT NULL
  GROUP BY topic, key
  ORDER BY min(id)
  LIMIT $1";

const DEAD_LETTERS: &str =
    "SELECT id, topic, substring(key FROM 1 FOR $2), attempts, left(error, $3),
        {dead_for}
   FROM {schema}.dead_letter ORDER BY id LIMIT $1";

/// How long a dead letter has been one, in ms: finite and clamped (a row written by hand may
/// say `infinity`, which the subtraction refuses).
const DEAD_FOR: &str = "CASE WHEN isfinite(dead_at)
             THEN (greatest(least(extract(epoch FROM now() - dead_at), 1e9), 0) * 1000)::bigint
             ELSE 0 END";

/// A CTE that lowers every lease's claim floor to the lowest id in CTE `inserted`: messages put
/// back with their old ids must not sit below it. It always writes the row and bumps the
/// generation, even when the floor is already lower: a claim raising it concurrently must meet
/// the lock and the new generation and give up.
const LOWER_FLOOR: &str = "lowered AS (UPDATE {schema}.relay_lease
                          SET floor = least(floor, (SELECT min(id) FROM inserted)),
                              floor_generation = floor_generation + 1
                        WHERE EXISTS (SELECT 1 FROM inserted))";

// Back into the outbox with the original sequence, so x-sequence is kept.
const REQUEUE_DEAD_LETTERS: &str = "WITH moved AS (
         DELETE FROM {schema}.dead_letter WHERE $1::bigint IS NULL OR id = $1
      RETURNING id, topic, key, payload, headers, created_at, attempts, error),
      inserted AS (INSERT INTO {schema}.message
                          (id, topic, key, payload, headers, created_at, attempts, last_error)
                   OVERRIDING SYSTEM VALUE
                   SELECT id, topic, key, payload, headers, created_at, attempts, error FROM moved
                   RETURNING id),
      {lower_floor}
 SELECT id FROM inserted";

const DROP_DEAD_LETTERS: &str =
    "DELETE FROM {schema}.dead_letter WHERE $1::bigint IS NULL OR id = $1";

/// Parameters $1-$6, bound by [`bind_filter`].
const REPUBLISH_FILTER: &str = "($1::bigint IS NULL OR id >= $1)
     AND ($2::bigint IS NULL OR id <= $2)
     AND ($3::bytea IS NULL OR key = $3)
     AND ($4::text IS NULL OR topic = $4)
     AND ($5::text IS NULL OR created_at >= $5::timestamptz)
     AND ($6::text IS NULL OR created_at <= $6::timestamptz)";

const REPUBLISH_COUNT: &str = "SELECT count(*) FROM {schema}.published WHERE {filter}";

// Back into the outbox with the original sequence. Keyset-paginated by id ($7: the last id
// done, $8: the page size) so each statement stays bounded.
const REPUBLISH_BATCH: &str = "WITH moved AS (
         DELETE FROM {schema}.published
          WHERE id IN (SELECT id FROM {schema}.published
                        WHERE {filter} AND id > $7
                          AND NOT EXISTS (SELECT 1 FROM {schema}.message m WHERE m.id = published.id)
                        ORDER BY id LIMIT $8)
      RETURNING id, topic, key, payload, headers, created_at),
      inserted AS (INSERT INTO {schema}.message (id, topic, key, payload, headers, created_at)
                   OVERRIDING SYSTEM VALUE
                   SELECT id, topic, key, payload, headers, created_at FROM moved
                   RETURNING id),
      {lower_floor}
 SELECT id FROM inserted";

const LEASES: &str =
    "SELECT name, holder, token, (extract(epoch FROM expires_at - now()) * 1000)::bigint
   FROM {schema}.relay_lease ORDER BY name";

// The payload and headers cut in the statement, so a 100 MB payload never leaves the database
// for a preview (keys and errors as in every listing: see `SHOWN_KEY_BYTES`); NULL id: all of
// them.
const DEAD_LETTER_PREVIEWS: &str =
    "SELECT id, topic, substring(key FROM 1 FOR $4), attempts, left(error, $5),
        {dead_for},
        substring(payload FROM 1 FOR $3), coalesce(octet_length(payload), 0)::bigint,
        left(headers::text, $3)
   FROM {schema}.dead_letter
  WHERE $1::bigint IS NULL OR id = $1
  ORDER BY id LIMIT $2";

// Completions per interval ($1 intervals of $2 microseconds, ending now), from the history that
// `completion = keep` writes (empty with `delete`). Reads the processed_at index over the window
// only. The lag is insert (created_at: the writer's transaction time) to completion, which
// follows Kafka's acknowledgement.
const PUBLISH_HISTORY: &str = "WITH bounds AS (
         SELECT now() - ($1 - n) * $2 * interval '1 microsecond' AS starts, n
           FROM generate_series(0, $1 - 1) AS n),
      done AS (
         SELECT processed_at, extract(epoch FROM processed_at - created_at) AS lag
           FROM {schema}.published
          WHERE processed_at > now() - $1 * $2 * interval '1 microsecond'
            AND isfinite(created_at))
 SELECT count(d.processed_at), (avg(d.lag) * 1000000)::bigint
   FROM bounds b
   LEFT JOIN done d ON d.processed_at > b.starts AND d.processed_at <= b.starts + $2 * interval '1 microsecond'
  GROUP BY b.n ORDER BY b.n";

// Unfenced: rows published before the retention are never in flight, so deleting them is safe
// from anywhere; the relay's leader runs it periodically.
const CLEANUP: &str = "DELETE FROM {schema}.published
  WHERE id IN (SELECT id FROM {schema}.published
                WHERE processed_at < now() - $1 * interval '1 microsecond'
                ORDER BY processed_at
                LIMIT $2)";

// What holds back vacuum of this database's tables: its sessions' snapshots (backend_xmin) and
// open write transactions (backend_xid, also when idle in transaction), and standbys' feedback
// through walsenders (no datname). Without pg_read_all_stats, other roles' sessions show
// neither and are missed.
const OLDEST_SNAPSHOT: &str = "SELECT pid,
        (extract(epoch FROM now() - coalesce(xact_start, query_start, backend_start)) * 1000000)::bigint,
        state, coalesce(application_name, '')
   FROM pg_stat_activity
  WHERE (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
    AND (datname = current_database() OR datname IS NULL)
    AND pid <> pg_backend_pid()
  ORDER BY greatest(age(backend_xmin), age(backend_xid)) DESC NULLS LAST
  LIMIT 1";

// Without pg_read_all_stats, other roles' sessions show with NULL client and start: counted
// apart, not taken for Unix-socket sessions.
const RELAY_SESSIONS: &str = "SELECT CASE WHEN backend_start IS NULL
                 THEN 'not visible (another role; grant pg_read_all_stats)'
                 ELSE coalesce(host(client_addr), 'local socket') END,
        count(*),
        (extract(epoch FROM now() - min(backend_start)) * 1000000)::bigint
   FROM pg_stat_activity
  WHERE application_name = 'outbox-relay' AND datname = current_database()
  GROUP BY 1 ORDER BY 1";

fn bind_filter<'q, O>(
    query: QueryAs<'q, Postgres, O, PgArguments>,
    filter: &'q RepublishFilter,
) -> QueryAs<'q, Postgres, O, PgArguments> {
    query
        .bind(filter.from_id)
        .bind(filter.to_id)
        .bind(filter.key.as_deref())
        .bind(filter.topic.as_deref())
        .bind(filter.since.as_deref())
        .bind(filter.until.as_deref())
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

fn duration_us(us: i64) -> Duration {
    Duration::from_micros(us.max(0) as u64)
}

impl Admin {
    /// The statements for `schema`, rendered once.
    pub fn new(schema: &SchemaName) -> Self {
        let render = |sql: &str| {
            sql.replace("{filter}", REPUBLISH_FILTER)
                .replace("{lower_floor}", LOWER_FLOOR)
                .replace("{dead_for}", DEAD_FOR)
                .replace("{schema}", schema.as_str())
        };
        Admin {
            schema: schema.clone(),
            persistent: true,
            backlog: render(BACKLOG),
            activity: render(ACTIVITY),
            held_keys: render(HELD_KEYS),
            dead_letters: render(DEAD_LETTERS),
            requeue_dead_letters: render(REQUEUE_DEAD_LETTERS),
            drop_dead_letters: render(DROP_DEAD_LETTERS),
            republish_count: render(REPUBLISH_COUNT),
            republish_batch: render(REPUBLISH_BATCH),
            leases: render(LEASES),
            cleanup: render(CLEANUP),
            dead_letter_previews: render(DEAD_LETTER_PREVIEWS),
            publish_history: render(PUBLISH_HISTORY),
        }
    }

    /// For connections through a pooler in transaction mode: the statements are sent unnamed,
    /// as with [`crate::OutboxConfig::transaction_pooling`]. Run them inside a transaction
    /// there: outside one, such a pooler may hand the statement's execution to another server
    /// connection than its preparation.
    pub fn transaction_pooling(mut self, enabled: bool) -> Self {
        self.persistent = !enabled;
        self
    }

    /// The schema these statements address.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// The schema's migration version; 0 when it was never migrated. The relay refuses to run
    /// on a schema older than [`crate::SCHEMA_VERSION`].
    pub async fn schema_version(&self, conn: &mut PgConnection) -> Result<i32, Error> {
        Ok(crate::migrate::schema_version(&self.schema, conn).await?)
    }

    /// A source (`x-source`) unique to this outbox, for relays configured without one: the
    /// cluster's system identifier (distinct for every `initdb`), the database and the schema.
    pub async fn default_source(&self, conn: &mut PgConnection) -> Result<String, Error> {
        Ok(sqlx::query_scalar(
            "SELECT format('outbox:%s:%s:%s', system_identifier, current_database(), $1::text)
               FROM pg_control_system()",
        )
        .bind(self.schema.as_str())
        .persistent(self.persistent)
        .fetch_one(conn)
        .await?)
    }

    /// Pending, held and dead-lettered counts, and the oldest pending message's age.
    pub async fn backlog(&self, conn: &mut PgConnection) -> Result<Backlog, Error> {
        let (pending, oldest_us, held, dead_letters): (i64, Option<i64>, i64, i64) =
            sqlx::query_as(&self.backlog)
                .persistent(self.persistent)
                .fetch_one(conn)
                .await?;
        Ok(Backlog {
            pending,
            oldest_age: oldest_us.map(duration_us),
            held,
            dead_letters,
        })
    }

    /// Recent activity: the last publish, failing messages.
    pub async fn activity(&self, conn: &mut PgConnection) -> Result<Activity, Error> {
        type Row = (Option<i64>, i64, Option<i64>, Option<i32>, Option<String>);
        let (since_us, failing, id, attempts, error): Row = sqlx::query_as(&self.activity)
            .bind(READ_ERROR_CHARS)
            .persistent(self.persistent)
            .fetch_one(conn)
            .await?;
        Ok(Activity {
            since_last_publish: since_us.map(duration_us),
            failing,
            oldest_failure: id.map(|sequence| Failure {
                sequence,
                attempts: attempts.unwrap_or(0),
                error: shown_error(error.unwrap_or_default()),
            }),
        })
    }

    /// Up to `limit` keys held back by a failed head message, oldest first.
    pub async fn held_keys(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> Result<Vec<HeldKey>, Error> {
        type Row = (
            String,
            Option<Vec<u8>>,
            i64,
            i32,
            i64,
            Option<String>,
            Option<i64>,
        );
        let rows: Vec<Row> = sqlx::query_as(&self.held_keys)
            .bind(limit)
            .bind(READ_KEY_BYTES)
            .bind(READ_ERROR_CHARS)
            .persistent(self.persistent)
            .fetch_all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(topic, key, head, attempts, failed_messages, last_error, retry_us)| {
                    let (key, key_cut) = shown_key(key);
                    HeldKey {
                        topic,
                        key,
                        key_cut,
                        head,
                        attempts,
                        failed_messages,
                        last_error: last_error.map(shown_error),
                        retry_in: retry_us.map(duration_us),
                    }
                },
            )
            .collect())
    }

    /// Up to `limit` dead letters, oldest sequence first.
    pub async fn dead_letters(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, Error> {
        type Row = (i64, String, Option<Vec<u8>>, i32, String, i64);
        let rows: Vec<Row> = sqlx::query_as(&self.dead_letters)
            .bind(limit)
            .bind(READ_KEY_BYTES)
            .bind(READ_ERROR_CHARS)
            .persistent(self.persistent)
            .fetch_all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, topic, key, attempts, error, age_ms)| {
                DeadLetter::new(id, topic, key, attempts, error, age_ms)
            })
            .collect())
    }

    /// Up to `limit` dead letters (or only `id`), oldest sequence first, each with the first
    /// `preview_bytes` of its payload and of its headers' JSON.
    pub async fn dead_letter_previews(
        &self,
        conn: &mut PgConnection,
        id: Option<i64>,
        limit: i64,
        preview_bytes: i32,
    ) -> Result<Vec<DeadLetterPreview>, Error> {
        type Row = (
            i64,
            String,
            Option<Vec<u8>>,
            i32,
            String,
            i64,
            Option<Vec<u8>>,
            i64,
            Option<String>,
        );
        let rows: Vec<Row> = sqlx::query_as(&self.dead_letter_previews)
            .bind(id)
            .bind(limit)
            .bind(preview_bytes.max(0))
            .bind(READ_KEY_BYTES)
            .bind(READ_ERROR_CHARS)
            .persistent(self.persistent)
            .fetch_all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(id, topic, key, attempts, error, age_ms, payload, payload_size, headers)| {
                    DeadLetterPreview {
                        letter: DeadLetter::new(id, topic, key, attempts, error, age_ms),
                        payload,
                        payload_size,
                        headers,
                    }
                },
            )
            .collect())
    }

    /// Messages completed in each of `intervals` intervals of `length` up to now, oldest
    /// first: what a publish-rate and lag chart shows. Needs `completion = keep` (with
    /// `delete` no history is kept, and every interval is empty).
    pub async fn publish_history(
        &self,
        conn: &mut PgConnection,
        intervals: u32,
        length: Duration,
    ) -> Result<Vec<PublishedInterval>, Error> {
        let rows: Vec<(i64, Option<i64>)> = sqlx::query_as(&self.publish_history)
            .bind(i64::from(intervals.max(1)))
            .bind(micros(length).max(1))
            .persistent(self.persistent)
            .fetch_all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(published, mean_us)| PublishedInterval {
                published,
                mean_lag: mean_us.map(duration_us),
            })
            .collect())
    }

    /// The relay sessions connected to this database (`application_name` `outbox-relay`, the
    /// relay's default), by client address: which relay hosts are up, leaders and standbys alike.
    /// Relays of every schema of the database count.
    pub async fn relay_sessions(&self, conn: &mut PgConnection) -> Result<Vec<RelayClient>, Error> {
        let rows: Vec<(String, i64, Option<i64>)> = sqlx::query_as(RELAY_SESSIONS)
            .persistent(self.persistent)
            .fetch_all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(address, sessions, oldest_us)| RelayClient {
                address,
                sessions,
                connected: oldest_us.map(duration_us),
            })
            .collect())
    }

    /// Puts one dead letter (`Some(id)`) or all of them back into the outbox with their
    /// original sequence; returns the sequences requeued.
    pub async fn requeue_dead_letters(
        &self,
        conn: &mut PgConnection,
        id: Option<i64>,
    ) -> Result<Vec<i64>, Error> {
        Ok(sqlx::query_scalar(&self.requeue_dead_letters)
            .bind(id)
            .persistent(self.persistent)
            .fetch_all(conn)
            .await?)
    }

    /// Deletes one dead letter (`Some(id)`) or all of them; returns how many.
    pub async fn drop_dead_letters(
        &self,
        conn: &mut PgConnection,
        id: Option<i64>,
    ) -> Result<u64, Error> {
        Ok(sqlx::query(&self.drop_dead_letters)
            .bind(id)
            .persistent(self.persistent)
            .execute(conn)
            .await?
            .rows_affected())
    }

    /// How many published messages match `filter`.
    pub async fn republish_count(
        &self,
        conn: &mut PgConnection,
        filter: &RepublishFilter,
    ) -> Result<i64, Error> {
        let (count,): (i64,) = bind_filter(sqlx::query_as(&self.republish_count), filter)
            .persistent(self.persistent)
            .fetch_one(conn)
            .await?;
        Ok(count)
    }

    /// The first of `filter`'s times (`"since"` or `"until"`, and its text) that PostgreSQL
    /// cannot read as a `timestamptz`, as the filter's statements would read it; checked in a
    /// transaction (or savepoint) of its own, rolled back, so a refusal leaves `conn` usable.
    pub async fn unreadable_time<'f>(
        &self,
        conn: &mut PgConnection,
        filter: &'f RepublishFilter,
    ) -> Result<Option<(&'static str, &'f str)>, Error> {
        use sqlx::Connection as _;
        for (name, value) in [("since", &filter.since), ("until", &filter.until)] {
            let Some(value) = value else { continue };
            let mut check = conn.begin().await?;
            let readable = sqlx::query("SELECT $1::timestamptz")
                .bind(value)
                .persistent(self.persistent)
                .execute(&mut *check)
                .await
                .is_ok();
            check.rollback().await?;
            if !readable {
                return Ok(Some((name, value)));
            }
        }
        Ok(None)
    }

    /// Moves every published message matching `filter` back into the outbox (they keep their
    /// sequence), `batch` per transaction, so a large republish holds no long transaction;
    /// `progress` is told the running count after each one. Returns how many moved. On an error,
    /// the batches already committed stay moved: `progress` last heard how many.
    pub async fn republish(
        &self,
        conn: &mut PgConnection,
        filter: &RepublishFilter,
        batch: i64,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, Error> {
        use sqlx::Connection as _;
        let (mut after, mut done) = (i64::MIN, 0);
        loop {
            let mut tx = conn.begin().await?;
            let (count, last) = self.republish_batch(&mut tx, filter, after, batch).await?;
            tx.commit().await?;
            done += count;
            progress(done);
            match last {
                Some(last) => after = last,
                None => return Ok(done),
            }
        }
    }

    /// Moves up to `limit` published messages matching `filter` with a sequence above `after`
    /// back into the outbox (they keep their sequence). Returns how many moved and the highest
    /// sequence moved, `None` when nothing was left: pass it as the next `after`.
    pub async fn republish_batch(
        &self,
        conn: &mut PgConnection,
        filter: &RepublishFilter,
        after: i64,
        limit: i64,
    ) -> Result<(u64, Option<i64>), Error> {
        let ids: Vec<(i64,)> = bind_filter(sqlx::query_as(&self.republish_batch), filter)
            .bind(after)
            .bind(limit)
            .persistent(self.persistent)
            .fetch_all(conn)
            .await?;
        Ok((ids.len() as u64, ids.iter().map(|r| r.0).max()))
    }

    /// Every lease row.
    pub async fn leases(&self, conn: &mut PgConnection) -> Result<Vec<LeaseRow>, Error> {
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(&self.leases)
            .persistent(self.persistent)
            .fetch_all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(name, holder, token, expires_in_ms)| LeaseRow {
                name,
                holder,
                token,
                expires_in_ms,
            })
            .collect())
    }

    /// Deletes at most `limit` messages published longer than `retention` ago; returns how
    /// many.
    pub async fn cleanup(
        &self,
        conn: &mut PgConnection,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, Error> {
        Ok(sqlx::query(&self.cleanup)
            .bind(micros(retention))
            .bind(limit)
            .persistent(self.persistent)
            .execute(conn)
            .await?
            .rows_affected())
    }

    /// The other session of this database holding the oldest snapshot, if any.
    pub async fn oldest_snapshot(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Option<OldestSnapshot>, Error> {
        let row: Option<(i32, Option<i64>, Option<String>, String)> =
            sqlx::query_as(OLDEST_SNAPSHOT)
                .persistent(self.persistent)
                .fetch_optional(conn)
                .await?;
        Ok(
            row.map(|(pid, age_us, state, application_name)| OldestSnapshot {
                pid,
                age: duration_us(age_us.unwrap_or(0)),
                state,
                application_name,
            }),
        )
    }
}
