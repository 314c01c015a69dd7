//! The PostgreSQL driver: every SQL statement of the outbox, one function per statement.
//!
//! Nothing outside this module and the migrations (`crate::migrate`) builds SQL. The only text
//! placed into statements is the [`SchemaName`], validated as a plain identifier before it gets
//! here; every value is a bind parameter. All times come from the database clock (`now()`), so
//! relays on hosts whose clocks disagree still agree on who holds a lease.

use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use sqlx::postgres::PgArguments;
use sqlx::query::QueryScalar;
use sqlx::{Arguments as _, PgConnection, Postgres, Row};

use crate::message::{Header, Message};
use crate::schema::SchemaName;

pub use crate::migrate::SCHEMA_VERSION;

/// The statements of one outbox schema, rendered once.
#[derive(Debug, Clone)]
pub struct Statements {
    schema: SchemaName,
    insert_one: String,
    insert_many: String,
    claim: String,
    complete_keep: String,
    complete_keep_replacing: String,
    complete_delete: String,
    record_failures: String,
    lease_acquire: String,
    lease_other: String,
    release_topics: String,
    lease_renew: String,
    lease_release: String,
    lease_set_idle: String,
    cleanup: String,
    backlog: String,
    leases: String,
    oldest_snapshot: String,
    inbox_record: String,
    dead_letter: String,
    dead_letters_list: String,
    dead_letters_requeue: String,
    dead_letters_drop: String,
    held_keys: String,
    activity: String,
    republish_count: String,
    republish_batch: String,
}

/// What has happened lately, for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activity {
    /// Time since the last message was published (keep mode only).
    pub since_last_publish: Option<Duration>,
    /// Pending messages with at least one failed delivery attempt.
    pub failing: i64,
    /// The oldest failing message: sequence, attempts, last error.
    pub oldest_failure: Option<(i64, i32, String)>,
}

/// Which processed messages to publish again. Unset fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepublishFilter {
    /// Lowest sequence, inclusive.
    pub from_id: Option<i64>,
    /// Highest sequence, inclusive.
    pub to_id: Option<i64>,
    /// Exact key.
    pub key: Option<Vec<u8>>,
    /// Exact topic.
    pub topic: Option<String>,
    /// Created at or after (PostgreSQL timestamptz text).
    pub since: Option<String>,
    /// Created at or before (PostgreSQL timestamptz text).
    pub until: Option<String>,
}

/// The session whose snapshot is oldest: while it holds it, vacuum cannot remove the index
/// entries of completed messages, and every claim walks over them.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A committed, not yet published message, as the relay claims it.
#[derive(Debug, Clone)]
pub struct PendingMessage {
    /// The sequence (x-sequence).
    pub id: i64,
    /// Kafka topic.
    pub topic: String,
    /// Kafka key.
    pub key: Option<Vec<u8>>,
    /// Kafka value; `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// User headers, in order.
    pub headers: Vec<Header>,
    /// How long the message has waited since its insert, per the database clock.
    pub age: Duration,
    /// Failed delivery attempts so far.
    pub attempts: i32,
    /// Why the stored row cannot be published as it is (headers of another shape, or naming a
    /// header the relay sets): a row written by a raw INSERT. The relay never sends it; it
    /// treats it as a permanent failure of this message alone.
    pub invalid: Option<MalformedHeaders>,
}

/// What a claim returned.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The batch, in sequence order.
    pub messages: Vec<PendingMessage>,
    /// What the claim saw, for the next floor candidate; `None` when it found nothing.
    pub horizon: Option<ClaimHorizon>,
}

/// What a claim leaves out: the ids in flight (sent and not yet acknowledged, or their
/// completion running), and the keys of messages Kafka has not acknowledged yet (a topic that
/// does not exist yet, a partition without a leader), whose other messages the claim holds
/// back, so that a destination that does not answer collects no more than one batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Skip<'a> {
    /// Ids to skip.
    pub ids: &'a [i64],
    /// Topics of the waiting keyed messages.
    pub topics: &'a [&'a str],
    /// Their keys, pairwise with `topics`.
    pub keys: &'a [&'a [u8]],
    /// Topics with a waiting message without a key: their other keyless messages wait too.
    pub keyless_topics: &'a [&'a str],
    /// Topics with many waiting messages (a partition without a leader, with many keys): all
    /// their messages wait, so that what waits stays bounded.
    pub stalled_topics: &'a [&'a str],
}

/// The floor a claim started at, and what the next floor rise is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimHorizon {
    /// The id the claim's scan started at.
    pub floor: i64,
    /// The id sequence's last value, read during the claim (`None` before the first insert).
    pub last_id: Option<i64>,
    /// The claim snapshot's xmin: no transaction with a lower id was still running.
    pub xmin: u64,
}

/// A possible rise of the claim floor: every id up to `last_id` was handed out to a transaction
/// with an id below `xid`. Writers take their transaction id before their ids (migration 0008),
/// and `xid` is the relay's own completion transaction, which began after the claim that read
/// `last_id` had returned. (A snapshot's xmax would not do: it is one past the newest
/// *completed* transaction, and a running one may be at or above it.) Once a claim's xmin is
/// above `xid`, all those transactions have ended and every id up to `last_id` is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorCandidate {
    /// Highest id covered.
    pub last_id: i64,
    /// The completion's transaction id.
    pub xid: u64,
}

/// What a claim does with its floor: raise it with a candidate (see [`FloorCandidate`]), or
/// lower it to `lower_to`, to cover again messages that left flight without being completed or
/// held. `lower_to` wins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FloorRequest {
    /// A candidate for raising the floor.
    pub candidate: Option<FloorCandidate>,
    /// The lowest id to cover again.
    pub lower_to: Option<i64>,
}

impl From<Option<FloorCandidate>> for FloorRequest {
    fn from(candidate: Option<FloorCandidate>) -> Self {
        FloorRequest {
            candidate,
            lower_to: None,
        }
    }
}

/// Holds at most one floor candidate at a time, from a completed batch, and the lowest id to
/// cover again.
#[derive(Debug, Clone, Default)]
pub struct FloorTracker {
    candidate: Option<FloorCandidate>,
    lower_to: Option<i64>,
}

impl FloorTracker {
    /// Messages `ids` left flight without being completed or held: they are pending, maybe
    /// below the floor, and the next claim must cover them again.
    pub fn uncovered(&mut self, ids: impl IntoIterator<Item = i64>) {
        self.lower_to = ids.into_iter().chain(self.lower_to).min();
    }

    /// What the next claim does with its floor; `raise` lets it use the candidate.
    pub fn request(&self, raise: bool) -> FloorRequest {
        FloorRequest {
            candidate: self.candidate.filter(|_| raise),
            lower_to: self.lower_to,
        }
    }

    /// A claim made with `request` succeeded: what it lowered the floor to is covered.
    pub fn claimed(&mut self, request: FloorRequest) {
        if self.lower_to == request.lower_to {
            self.lower_to = None;
        }
    }

    /// The candidate to pass to the next claim.
    pub fn candidate(&self) -> Option<FloorCandidate> {
        self.candidate
    }

    /// A completion ran in transaction `xid`, after the claim that read `last_id` returned.
    pub fn completed(&mut self, last_id: Option<i64>, xid: u64) {
        if self.candidate.is_none() {
            self.candidate = last_id.map(|last_id| FloorCandidate { last_id, xid });
        }
    }

    /// Records what a claim saw that was passed `passed` (the candidate, or `None` to hold it
    /// back). Returns whether that claim raised the floor (or found it already as high).
    pub fn observe(&mut self, horizon: &ClaimHorizon, passed: Option<FloorCandidate>) -> bool {
        let settled = matches!(passed, Some(c) if horizon.xmin > c.xid);
        if settled && passed == self.candidate {
            self.candidate = None;
        }
        settled
    }
}

/// The fencing identity of a lease term: only statements carrying the current holder and token,
/// while the lease is unexpired, may change messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// Lease name.
    pub lease: String,
    /// Holder id (unique per relay process run).
    pub holder: String,
    /// Fencing token, incremented on every acquisition.
    pub token: i64,
}

/// What an acquisition attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// We hold the lease for `remaining` (database clock) under `token`.
    Held {
        /// Fencing token of this term.
        token: i64,
        /// Time left until expiry.
        remaining: Duration,
    },
    /// A lease of another name is held on this outbox: two lease names would each publish
    /// everything, so this one is not taken while the other is.
    OtherLease {
        /// The other lease's name.
        lease: String,
        /// Its holder.
        holder: String,
    },
    /// Someone else holds it for `remaining`.
    HeldByOther {
        /// The other holder.
        holder: String,
        /// Time left until it expires unless renewed.
        remaining: Duration,
    },
}

/// What a completion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Messages completed.
    pub count: u64,
    /// The completing transaction's id.
    pub xid: u64,
}

/// Outcome of a fenced statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fenced<T> {
    /// The lease was still ours; the statement took effect.
    Done(T),
    /// The lease was lost; nothing was changed.
    LeaseLost,
}

impl<T> Fenced<T> {
    /// Maps the result of a statement that took effect.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Fenced<U> {
        match self {
            Fenced::Done(value) => Fenced::Done(f(value)),
            Fenced::LeaseLost => Fenced::LeaseLost,
        }
    }
}

/// Backlog figures for status and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Messages not yet published.
    pub pending: i64,
    /// Age of the oldest pending message.
    pub oldest_age: Option<Duration>,
    /// Pending messages held after a failed delivery (waiting for their retry).
    pub held: i64,
    /// Messages in the dead-letter table.
    pub dead_letters: i64,
}

/// A dead letter, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Original sequence.
    pub id: i64,
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Delivery attempts.
    pub attempts: i32,
    /// The permanent error.
    pub error: String,
    /// Time since it was dead-lettered.
    pub age: Duration,
}

/// A key whose head message failed and holds back the key's later messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldKey {
    /// Topic.
    pub topic: String,
    /// Key (`None`: a single message without key).
    pub key: Option<Vec<u8>>,
    /// Sequence of the failed head message.
    pub head: i64,
    /// Its attempts so far.
    pub attempts: i32,
    /// Pending messages of the key that have failed at least once.
    pub failed_messages: i64,
    /// The head's last error.
    pub last_error: Option<String>,
}

const REPUBLISH_FILTER: &str = "($1::bigint IS NULL OR id >= $1)
     AND ($2::bigint IS NULL OR id <= $2)
     AND ($3::bytea IS NULL OR key = $3)
     AND ($4::text IS NULL OR topic = $4)
     AND ($5::text IS NULL OR created_at >= $5::timestamptz)
     AND ($6::text IS NULL OR created_at <= $6::timestamptz)";

/// `id` is in the multirange `$1` (see [`id_ranges`]): one index range scan with a binary
/// search per row, where `id = ANY(array)` descends the index once per id (3x slower for 5,000).
/// The casts sit in sub-selects, evaluated once: a multirange's input function is not immutable,
/// so a bare `$1::text::int8multirange` is parsed again for every row it is compared with.
/// An id of `i64::MAX` has no exclusive upper bound: its range is unbounded above.
const IN_IDS: &str = "id >= lower((SELECT $1::text::int8multirange))
     AND id <= coalesce(upper((SELECT $1::text::int8multirange)) - 1, 9223372036854775807)
     AND (SELECT $1::text::int8multirange) @> id";

/// A CTE that lowers every lease's claim floor to the lowest id in CTE `inserted`: messages put
/// back with their old ids must not sit below it. It always writes the row and bumps the
/// generation, even when the floor is already lower: a claim raising it concurrently must meet
/// the lock and the new generation and give up.
const LOWER_FLOOR: &str = "lowered AS (UPDATE {schema}.relay_lease
                          SET floor = least(floor, (SELECT min(id) FROM inserted)),
                              floor_generation = floor_generation + 1
                        WHERE EXISTS (SELECT 1 FROM inserted))";

/// A pending message the claim may take, with its age and size, before the test of where it
/// is found (at or above the floor, or held below it); continues with `AND`.
const CANDIDATE: &str = "id, topic, key, payload, headers, attempts,
        CASE WHEN isfinite(created_at)
             THEN (least(greatest(date_part('epoch', now() - created_at), 0), 1e9) * 1000000)::bigint
             ELSE 0 END AS age_us,
        coalesce(octet_length(key), 0) + coalesce(octet_length(payload), 0)
          + coalesce(octet_length(headers::text), 0) AS size
   FROM {schema}.message m
  WHERE EXISTS (SELECT 1 FROM lease)
    AND NOT (SELECT $3::text::int8multirange) @> m.id
    AND (m.key IS NULL OR cardinality($9::text[]) = 0
         OR (m.topic, m.key) NOT IN (SELECT * FROM unnest($9::text[], $10::bytea[])))
    AND (m.key IS NOT NULL OR m.topic <> ALL($11::text[]))
    AND m.topic <> ALL($12::text[])
    AND (m.key IS NULL OR NOT (SELECT yes FROM any_held) OR NOT EXISTS (
           SELECT 1 FROM {schema}.message h
            WHERE h.topic = m.topic AND h.key = m.key
              AND h.retry_at IS NOT NULL AND h.retry_at > now()))";

const FENCE: &str = "EXISTS (SELECT 1 FROM {schema}.relay_lease l
     WHERE l.name = $F1 AND l.holder = $F2 AND l.token = $F3 AND l.expires_at > now())";

/// The keep-mode completion, with `on_conflict` as the insert's conflict clause.
fn complete_keep(on_conflict: &str) -> String {
    format!(
        "WITH fence AS (SELECT {{fence}} AS held),
              moved AS (DELETE FROM {{schema}}.message
                         WHERE {{in_ids}} AND (SELECT held FROM fence)
                     RETURNING id, topic, key, payload, headers, created_at, attempts),
              done AS (INSERT INTO {{schema}}.published
                              (id, topic, key, payload, headers, created_at, processed_at, attempts)
                       SELECT id, topic, key, payload, headers, created_at, now(), attempts
                         FROM moved
                       {on_conflict}
                       RETURNING 1)
         SELECT (SELECT held FROM fence), (SELECT count(*) FROM done), pg_current_xact_id()::text
           FROM {{async_commit}}"
    )
}

/// A FROM item that makes the statement's own transaction commit without waiting for its WAL
/// flush (`synchronous_commit` is read at commit, and the setting is local to the transaction).
/// Used by the completions only, the relay's most frequent commit: at light traffic every batch
/// of a few messages was one more fsync that writers' commits queued behind. A completion lost
/// in a crash of the database puts its messages back to pending: they are published again, a
/// duplicate that at-least-once already allows. Nothing else may rely on one being durable, and
/// nothing does: the claim raises the floor past a completion's ids only once that completion
/// committed before the claim's snapshot, so the completion's commit record precedes the
/// claim's in the WAL, and the claim commits synchronously, flushing both.
const ASYNC_COMMIT: &str = "(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit";

/// Binds `message` as the next four parameters: topic, key, payload, headers.
fn bind_message<'q>(
    query: QueryScalar<'q, Postgres, i64, PgArguments>,
    message: &'q Message,
) -> QueryScalar<'q, Postgres, i64, PgArguments> {
    query
        .bind(&message.topic)
        .bind(message.key.as_deref())
        .bind(message.payload.as_deref())
        .bind(encode_headers(&message.headers))
}

/// `ids` as the text of an `int8multirange` (`{[1,4),[7,8)}`), merging runs of consecutive ids:
/// a batch's ids are mostly consecutive, so this stays short.
fn id_ranges(ids: &[i64]) -> String {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut text = String::from("{");
    let mut runs = sorted.into_iter().peekable();
    while let Some(start) = runs.next() {
        let mut end = start;
        while runs.next_if(|&next| next == end + 1).is_some() {
            end += 1;
        }
        if text.len() > 1 {
            text.push(',');
        }
        // Half-open, as PostgreSQL prints int8 ranges; a range ending at i64::MAX (an explicit
        // id a writer chose) is unbounded above, as `end + 1` does not exist.
        match end.checked_add(1) {
            Some(after) => write!(text, "[{start},{after})"),
            None => write!(text, "[{start},)"),
        }
        .expect("writing to a String");
    }
    text.push('}');
    text
}

impl Statements {
    /// Renders every statement for `schema`.
    pub fn new(schema: &SchemaName) -> Self {
        let render = |sql: &str| {
            sql.replace("{candidate}", CANDIDATE)
                .replace("{fence}", FENCE)
                .replace("{in_ids}", IN_IDS)
                .replace("{lower_floor}", LOWER_FLOOR)
                .replace("{async_commit}", ASYNC_COMMIT)
                .replace("{schema}", schema.as_str())
        };
        // Fenced statements take the fence as their last three parameters.
        let fenced = |sql: &str, first: usize| {
            render(sql)
                .replace("$F1", &format!("${first}"))
                .replace("$F2", &format!("${}", first + 1))
                .replace("$F3", &format!("${}", first + 2))
        };
        Statements {
            schema: schema.clone(),
            insert_one: render(
                "INSERT INTO {schema}.message (topic, key, payload, headers)
                 VALUES ($1, $2, $3, $4) RETURNING id",
            ),
            // Ids follow the input order (ORDER BY ordinality), so a batch keeps its order.
            insert_many: render(
                "INSERT INTO {schema}.message (topic, key, payload, headers)
                 SELECT topic, key, payload, headers
                   FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::jsonb[])
                        WITH ORDINALITY AS m(topic, key, payload, headers, n)
                  ORDER BY n
                 RETURNING id",
            ),
            // Held messages (a failed delivery, until retry_at) hold back every other message of
            // their key; a message without a key holds back only itself. Each candidate looks its
            // key up in the held messages' index (message_held), so a claim costs the same
            // whether one key or 10,000 are held; while none is, the test is skipped.
            // The batch ends at $1 messages or once $2 bytes of keys, payloads and headers are reached
            // (always at least one message), so the relay's memory is bounded whatever the
            // payload sizes; either way the result is a prefix in sequence order. The sizes come
            // from the stored lengths (octet_length does not detoast). $3 lists the ids to skip
            // (delivered, their completion in flight) as ranges: a multirange test is a binary
            // search per row, and skipping in the query keeps the budgets exact.
            //
            // Per-row work is what a drain pays for 5,000 times a batch, so it is kept small: the
            // multirange is cast once (a sub-select, see `IN_IDS`), the held test is skipped while
            // nothing is held, the running sum uses ROWS framing (no peer search), and the age is
            // float arithmetic (extract() computes in numeric). Together 10-15 ms -> 8 ms per
            // claim of 5,000 on a 200,000 backlog.
            //
            // The lowest ids are found by walking the primary key in order (ORDER BY id LIMIT,
            // never min(), which a planner without statistics reads through a bitmap of every
            // id in range): on the relay's sessions, which read through index scans only (see
            // `outbox_kafka_relay`'s sessions), a claim reads about what it returns on a backlog never
            // analyzed.
            //
            // The scan starts at the lease row's floor (migration 0008). $7/$8 are a candidate
            // from a completed batch (see `FloorCandidate`): every id up to $8 went to a
            // transaction older than the relay's completion transaction $7. Once this
            // snapshot's xmin is above $7 none of them runs, each of those ids is committed or
            // gone, and the floor may rise to the lowest one still pending, not held and not
            // in flight ($3), or past $8. A message that leaves flight without being completed
            // or held (dropped behind a failure, purged, its completion failed) is covered again
            // by $13: the claim lowers the floor to it. Held messages (`retry_at` set) may stay
            // below it: the claim finds those that are due through their own index
            // (migration 0012), so that ten thousand held keys are not walked over by every
            // claim. (A new lease term starts at floor 0, so a hold an operator removes by
            // hand with `retry_at = NULL` is found then; `retry_at = now()` is found at once.)
            // The rise is a compare-and-set on the floor's
            // generation: statements that lower the floor bump it, so one that is concurrent
            // with this claim (even invisible to its snapshot) cancels the rise. Every claim
            // reports the sequence's last value and its snapshot's xmin.
            claim: fenced(
                "WITH lease AS MATERIALIZED (
                     SELECT floor, floor_generation FROM {schema}.relay_lease l
                      WHERE l.name = $F1 AND l.holder = $F2 AND l.token = $F3
                        AND l.expires_at > now()),
                      settled AS MATERIALIZED (
                     SELECT coalesce((SELECT id FROM {schema}.message
                                       WHERE id >= (SELECT floor FROM lease) AND id <= $8
                                         AND retry_at IS NULL
                                         AND NOT (SELECT $3::text::int8multirange) @> id
                                       ORDER BY id LIMIT 1),
                                     least($8, 9223372036854775806) + 1) AS floor
                      WHERE $8::bigint IS NOT NULL AND $13::bigint IS NULL
                        AND EXISTS (SELECT 1 FROM lease)
                        AND pg_snapshot_xmin(pg_current_snapshot()) > $7::text::xid8),
                      raised AS (
                     UPDATE {schema}.relay_lease l SET floor = s.floor
                       FROM settled s
                      WHERE l.name = $F1 AND l.holder = $F2 AND l.token = $F3
                        AND l.floor_generation = (SELECT floor_generation FROM lease)
                        AND s.floor > l.floor),
                      lowered AS (
                     UPDATE {schema}.relay_lease l
                        SET floor = $13, floor_generation = l.floor_generation + 1
                      WHERE l.name = $F1 AND l.holder = $F2 AND l.token = $F3
                        AND $13::bigint IS NOT NULL AND $13 < l.floor),
                      horizon AS MATERIALIZED (
                     SELECT least(greatest((SELECT floor FROM lease), (SELECT floor FROM settled)),
                                  coalesce($13, 9223372036854775807)) AS floor,
                            pg_sequence_last_value(
                                pg_get_serial_sequence('{schema}.message', 'id')::regclass) AS last_id,
                            pg_snapshot_xmin(pg_current_snapshot())::text AS xmin),
                      any_held AS MATERIALIZED (
                     SELECT EXISTS (SELECT 1 FROM {schema}.message
                                     WHERE retry_at IS NOT NULL AND retry_at > now()) AS yes)
                 SELECT id, topic, key, payload, headers, attempts, age_us,
                        (SELECT floor FROM horizon) AS floor, (SELECT last_id FROM horizon) AS last_id,
                        (SELECT xmin FROM horizon) AS xmin
                   FROM (SELECT c.*, sum(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) - size AS before
                           FROM (SELECT * FROM (
                                   (SELECT {candidate} AND m.id >= (SELECT floor FROM horizon)
                                       AND (m.retry_at IS NULL OR m.retry_at <= now())
                                     ORDER BY id LIMIT $1)
                                   UNION ALL
                                   (SELECT {candidate} AND m.id < (SELECT floor FROM horizon)
                                       AND m.retry_at IS NOT NULL AND m.retry_at <= now()
                                     ORDER BY id LIMIT $1)) u
                                  ORDER BY id
                                  LIMIT $1) c) b
                  WHERE before < $2
                  ORDER BY id",
                4,
            ),
            // Moves the rows to `published` (append-only, for republishing and retention).
            complete_keep: fenced(&complete_keep(""), 2),
            // The same, updating a row already in `published`. Our own statements never leave
            // one there (republishing moves rows out), but a hand-made copy could; a plain
            // insert is a quarter cheaper than this speculative one, so this is the fallback.
            complete_keep_replacing: fenced(
                &complete_keep(
                    "ON CONFLICT (id) DO UPDATE
                        SET processed_at = excluded.processed_at, attempts = excluded.attempts",
                ),
                2,
            ),
            complete_delete: fenced(
                "WITH fence AS (SELECT {fence} AS held),
                      done AS (DELETE FROM {schema}.message
                                WHERE {in_ids} AND (SELECT held FROM fence)
                            RETURNING 1)
                 SELECT (SELECT held FROM fence), (SELECT count(*) FROM done),
                        pg_current_xact_id()::text
                   FROM {async_commit}",
                2,
            ),
            record_failures: fenced(
                "UPDATE {schema}.message m
                    SET attempts = least(m.attempts, 2147483646) + 1, last_error = f.error,
                        retry_at = now() + f.delay_us * interval '1 microsecond'
                   FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS f(id, error, delay_us)
                  WHERE m.id = f.id AND {fence}",
                4,
            ),
            dead_letter: fenced(
                "WITH fence AS (SELECT {fence} AS held),
                      moved AS (DELETE FROM {schema}.message m
                                 USING unnest($1::bigint[], $2::text[]) AS f(id, error)
                                 WHERE m.id = f.id AND (SELECT held FROM fence)
                             RETURNING m.id, m.topic, m.key, m.payload, m.headers, m.created_at,
                                       least(m.attempts, 2147483646) + 1 AS attempts, f.error),
                      stored AS (INSERT INTO {schema}.dead_letter
                                        (id, topic, key, payload, headers, created_at, attempts, error)
                                 SELECT id, topic, key, payload, headers, created_at, attempts, error
                                   FROM moved
                                 ON CONFLICT (id) DO UPDATE
                                    SET dead_at = now(), attempts = excluded.attempts, error = excluded.error
                                 RETURNING 1)
                 SELECT (SELECT held FROM fence), (SELECT count(*) FROM stored)",
                3,
            ),
            dead_letters_list: render(
                "SELECT id, topic, key, attempts, error,
                        (extract(epoch FROM now() - dead_at) * 1000)::bigint
                   FROM {schema}.dead_letter ORDER BY id LIMIT $1",
            ),
            // Back into the outbox with the original sequence, so x-sequence is kept.
            dead_letters_requeue: render(
                "WITH moved AS (DELETE FROM {schema}.dead_letter WHERE $1::bigint IS NULL OR id = $1
                                RETURNING id, topic, key, payload, headers, created_at, attempts, error),
                      inserted AS (INSERT INTO {schema}.message
                                          (id, topic, key, payload, headers, created_at, attempts, last_error)
                                   OVERRIDING SYSTEM VALUE
                                   SELECT id, topic, key, payload, headers, created_at, attempts, error
                                     FROM moved
                                   RETURNING id),
                      {lower_floor}
                 SELECT id FROM inserted",
            ),
            dead_letters_drop: render(
                "DELETE FROM {schema}.dead_letter WHERE $1::bigint IS NULL OR id = $1",
            ),
            held_keys: render(
                "SELECT topic, key, min(id), max(attempts), count(*),
                        (SELECT last_error FROM {schema}.message x
                          WHERE x.id = min(h.id))
                   FROM {schema}.message h
                  WHERE retry_at IS NOT NULL
                  GROUP BY topic, key
                  ORDER BY min(id)
                  LIMIT $1",
            ),
            // Takes the lease when it is free or expired; otherwise reports who holds it.
            lease_acquire: render(
                "WITH taken AS (
                     INSERT INTO {schema}.relay_lease AS l
                            (name, holder, token, idle, acquired_at, renewed_at, expires_at)
                     VALUES ($1, $2, 1, false, now(), now(), now() + $3 * interval '1 microsecond')
                     ON CONFLICT (name) DO UPDATE
                        SET holder = excluded.holder, token = l.token + 1, idle = false, floor = 0,
                            acquired_at = now(), renewed_at = now(), expires_at = excluded.expires_at
                      WHERE l.expires_at <= now()
                     RETURNING holder, token, expires_at)
                 SELECT holder, token,
                        (extract(epoch FROM expires_at - now()) * 1000000)::bigint AS remaining_us
                   FROM taken
                 UNION ALL
                 SELECT holder, token,
                        (extract(epoch FROM expires_at - now()) * 1000000)::bigint
                   FROM {schema}.relay_lease
                  WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM taken)",
            ),
            // Messages of these topics held for a failure become due now; fenced. Found
            // through the held messages' index (message_held), whatever the backlog.
            release_topics: fenced(
                "UPDATE {schema}.message SET retry_at = now()
                  WHERE topic = ANY($1) AND retry_at IS NOT NULL AND retry_at > now()
                    AND {fence}",
                2,
            ),
            lease_other: render(
                "SELECT name, holder FROM {schema}.relay_lease
                  WHERE name <> $1 AND expires_at > now() LIMIT 1",
            ),
            // Renews only an unexpired term of ours: once expired, another relay may have taken
            // over, so the holder must step down rather than extend.
            lease_renew: render(
                "UPDATE {schema}.relay_lease
                    SET renewed_at = now(), expires_at = now() + $4 * interval '1 microsecond'
                  WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at > now()
                 RETURNING (extract(epoch FROM expires_at - now()) * 1000000)::bigint",
            ),
            lease_release: render(
                "UPDATE {schema}.relay_lease SET expires_at = now(), idle = true
                  WHERE name = $1 AND holder = $2 AND token = $3",
            ),
            lease_set_idle: render(
                "UPDATE {schema}.relay_lease SET idle = $4
                  WHERE name = $1 AND holder = $2 AND token = $3",
            ),
            // Unfenced: rows processed before the retention are never in flight, so deleting
            // them is safe from anywhere; only the leader runs it periodically to avoid
            // duplicate work.
            cleanup: render(
                "DELETE FROM {schema}.published
                  WHERE id IN (SELECT id FROM {schema}.published
                                WHERE processed_at < now() - $1 * interval '1 microsecond'
                                ORDER BY processed_at
                                LIMIT $2)",
            ),
            backlog: render(
                // least() ignores NULLs: the age of an empty outbox must stay NULL, not 1e9 s.
                "SELECT count(*),
                        CASE WHEN min(created_at) FILTER (WHERE isfinite(created_at)) IS NOT NULL
                             THEN (least(extract(epoch FROM now() - min(created_at) FILTER (WHERE isfinite(created_at))), 1e9)
                                   * 1000000)::bigint
                        END,
                        count(*) FILTER (WHERE retry_at > now()),
                        (SELECT count(*) FROM {schema}.dead_letter)
                   FROM {schema}.message",
            ),
            // Waits on a concurrent insert of the same key until that transaction ends, so two
            // consumers racing on one message cannot both see it as new.
            inbox_record: render(
                "INSERT INTO {schema}.inbox (source, sequence) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
            ),
            activity: render(
                "SELECT (extract(epoch FROM now() - (SELECT max(processed_at) FROM {schema}.published)) * 1000000)::bigint,
                        (SELECT count(*) FROM {schema}.message WHERE attempts > 0),
                        f.id, f.attempts, f.last_error
                   FROM (SELECT 1) one
                   LEFT JOIN LATERAL (SELECT id, attempts, last_error FROM {schema}.message
                                       WHERE attempts > 0
                                       ORDER BY id LIMIT 1) f ON true",
            ),
            republish_count: render(&format!(
                "SELECT count(*) FROM {{schema}}.published WHERE {REPUBLISH_FILTER}"
            )),
            // Back into the outbox with the original sequence. Keyset-paginated by id ($7: last
            // id done) so each statement stays bounded.
            republish_batch: render(&format!(
                "WITH moved AS (DELETE FROM {{schema}}.published
                                 WHERE id IN (SELECT id FROM {{schema}}.published
                                               WHERE {REPUBLISH_FILTER} AND id > $7
                                                 AND NOT EXISTS (SELECT 1 FROM {{schema}}.message m
                                                                  WHERE m.id = published.id)
                                               ORDER BY id LIMIT $8)
                             RETURNING id, topic, key, payload, headers, created_at),
                      inserted AS (INSERT INTO {{schema}}.message
                                          (id, topic, key, payload, headers, created_at)
                                   OVERRIDING SYSTEM VALUE
                                   SELECT id, topic, key, payload, headers, created_at FROM moved
                                   RETURNING id),
                      {LOWER_FLOOR}
                 SELECT id FROM inserted"
            )),
            // What holds back vacuum of this database's tables: its sessions' snapshots
            // (backend_xmin) and open write transactions (backend_xid, also when idle in
            // transaction), and standbys' feedback through walsenders (no datname). Without
            // pg_read_all_stats, other roles' sessions show neither and are missed.
            oldest_snapshot: render(
                "SELECT pid,
                        (extract(epoch FROM now() - coalesce(xact_start, query_start, backend_start))
                           * 1000000)::bigint,
                        state, coalesce(application_name, '')
                   FROM pg_stat_activity
                  WHERE (backend_xmin IS NOT NULL OR backend_xid IS NOT NULL)
                    AND (datname = current_database() OR datname IS NULL)
                    AND pid <> pg_backend_pid()
                  ORDER BY greatest(age(backend_xmin), age(backend_xid)) DESC NULLS LAST
                  LIMIT 1",
            ),
            leases: render(
                "SELECT name, holder, token,
                        (extract(epoch FROM expires_at - now()) * 1000)::bigint
                   FROM {schema}.relay_lease ORDER BY name",
            ),
        }
    }

    /// The claim statement's text (parameters: limit, byte budget, lease, holder, token), for
    /// diagnostics such as EXPLAIN; `pg_stat_activity` truncates it.
    pub fn claim_sql(&self) -> &str {
        &self.claim
    }

    /// The schema these statements address.
    pub fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// A source (`x-source`) unique to this outbox, for relays configured without one: the
    /// cluster's system identifier (distinct for every `initdb`), the database and the schema.
    pub async fn default_source(&self, conn: &mut PgConnection) -> Result<String, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT format('outbox:%s:%s:%s', system_identifier, current_database(), $1::text)
               FROM pg_control_system()",
        )
        .bind(self.schema.as_str())
        .fetch_one(conn)
        .await
    }

    /// Inserts one message; returns its sequence.
    pub async fn insert_one(
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
    pub async fn insert_with_statement(
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
            statement = statement.trim_end().trim_end_matches(';'),
            schema = self.schema.as_str(),
        );
        bind_message(sqlx::query_scalar_with(&sql, arguments), message)
            .fetch_optional(conn)
            .await
    }

    /// Inserts many messages in one statement; returns their sequences in input order.
    pub async fn insert_many(
        &self,
        conn: &mut PgConnection,
        messages: &[Message],
    ) -> Result<Vec<i64>, sqlx::Error> {
        let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
        let keys: Vec<Option<&[u8]>> = messages.iter().map(|m| m.key.as_deref()).collect();
        let payloads: Vec<Option<&[u8]>> = messages.iter().map(|m| m.payload.as_deref()).collect();
        let headers: Vec<Option<Value>> = messages
            .iter()
            .map(|m| encode_headers(&m.headers))
            .collect();
        sqlx::query_scalar(&self.insert_many)
            .bind(topics)
            .bind(keys)
            .bind(payloads)
            .bind(headers)
            .fetch_all(conn)
            .await
    }

    /// Claims up to `limit` pending messages in sequence order, stopping once their keys,
    /// payloads and headers reach `max_bytes` (at least one message), leaving out `skip`, only
    /// while `fence` holds. A single active relay needs no row locks: the fence makes it the only publisher.
    /// With a `candidate` from [`FloorTracker`], the claim also raises the floor it starts at
    /// once that is safe.
    pub async fn claim(
        &self,
        conn: &mut PgConnection,
        limit: i64,
        max_bytes: i64,
        skip: &Skip<'_>,
        floor: FloorRequest,
        fence: &Fence,
    ) -> Result<Claimed, sqlx::Error> {
        let candidate = floor.candidate;
        let rows = sqlx::query(&self.claim)
            .bind(limit)
            .bind(max_bytes)
            .bind(id_ranges(skip.ids))
            .bind(&fence.lease)
            .bind(&fence.holder)
            .bind(fence.token)
            .bind(candidate.map(|c| c.xid.to_string()))
            .bind(candidate.map(|c| c.last_id))
            .bind(skip.topics)
            .bind(skip.keys)
            .bind(skip.keyless_topics)
            .bind(skip.stalled_topics)
            .bind(floor.lower_to)
            .fetch_all(conn)
            .await?;
        let horizon = match rows.first() {
            Some(row) => {
                let xid = |column: &str| -> Result<u64, sqlx::Error> {
                    let text: String = row.try_get(column)?;
                    text.parse()
                        .map_err(|e: std::num::ParseIntError| sqlx::Error::Decode(e.into()))
                };
                Some(ClaimHorizon {
                    floor: row.try_get("floor")?,
                    last_id: row.try_get("last_id")?,
                    xmin: xid("xmin")?,
                })
            }
            None => None,
        };
        let messages = rows
            .into_iter()
            .map(|row| {
                let headers: Option<Value> = row.try_get("headers")?;
                let age_us: i64 = row.try_get("age_us")?;
                let (headers, invalid) = match decode_headers(headers) {
                    Ok(headers) => (headers, None),
                    Err(malformed) => (Vec::new(), Some(malformed)),
                };
                Ok(PendingMessage {
                    id: row.try_get("id")?,
                    topic: row.try_get("topic")?,
                    key: row.try_get("key")?,
                    payload: row.try_get("payload")?,
                    headers,
                    age: Duration::from_micros(age_us.max(0) as u64),
                    attempts: row.try_get("attempts")?,
                    invalid,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(Claimed { messages, horizon })
    }

    /// Completes delivered messages: moves them to `published` (kept for retention) or deletes
    /// them, fenced. Returns how many rows changed and the completing transaction's id (for
    /// [`FloorTracker::completed`]). Runs as a transaction of its own: call it outside one.
    pub async fn complete(
        &self,
        conn: &mut PgConnection,
        ids: &[i64],
        delete: bool,
        fence: &Fence,
    ) -> Result<Fenced<Completed>, sqlx::Error> {
        async fn run(
            sql: &str,
            conn: &mut PgConnection,
            ids: &[i64],
            fence: &Fence,
        ) -> Result<(bool, i64, String), sqlx::Error> {
            sqlx::query_as(sql)
                .bind(id_ranges(ids))
                .bind(&fence.lease)
                .bind(&fence.holder)
                .bind(fence.token)
                .fetch_one(conn)
                .await
        }
        let (held, count, xid) = if delete {
            run(&self.complete_delete, conn, ids, fence).await?
        } else {
            match run(&self.complete_keep, &mut *conn, ids, fence).await {
                // A copy already in `published`: the statement changed nothing; replace it.
                Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
                    run(&self.complete_keep_replacing, conn, ids, fence).await?
                }
                other => other?,
            }
        };
        let xid = xid
            .parse()
            .map_err(|e: std::num::ParseIntError| sqlx::Error::Decode(e.into()))?;
        Ok(if held {
            Fenced::Done(Completed {
                count: count as u64,
                xid,
            })
        } else {
            Fenced::LeaseLost
        })
    }

    /// Counts a failed attempt on each message, records its error, and holds it (and the later
    /// messages of its key) for its retry delay; fenced.
    pub async fn record_failures(
        &self,
        conn: &mut PgConnection,
        failures: &[(i64, String, Duration)],
        fence: &Fence,
    ) -> Result<(), sqlx::Error> {
        let ids: Vec<i64> = failures.iter().map(|f| f.0).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.1.as_str()).collect();
        let delays: Vec<i64> = failures.iter().map(|f| micros(f.2)).collect();
        sqlx::query(&self.record_failures)
            .bind(ids)
            .bind(errors)
            .bind(delays)
            .bind(&fence.lease)
            .bind(&fence.holder)
            .bind(fence.token)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Makes the held messages of `topics` due now (a topic that did not exist was created);
    /// fenced.
    pub async fn release_topics(
        &self,
        conn: &mut PgConnection,
        topics: &[String],
        fence: &Fence,
    ) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(&self.release_topics)
            .bind(topics)
            .bind(&fence.lease)
            .bind(&fence.holder)
            .bind(fence.token)
            .execute(conn)
            .await?
            .rows_affected())
    }

    /// Moves permanently failed messages to the dead-letter table (keeping their sequence),
    /// fenced; returns how many moved.
    pub async fn dead_letter(
        &self,
        conn: &mut PgConnection,
        failures: &[(i64, String)],
        fence: &Fence,
    ) -> Result<Fenced<u64>, sqlx::Error> {
        let ids: Vec<i64> = failures.iter().map(|f| f.0).collect();
        let errors: Vec<&str> = failures.iter().map(|f| f.1.as_str()).collect();
        let (held, count): (bool, i64) = sqlx::query_as(&self.dead_letter)
            .bind(ids)
            .bind(errors)
            .bind(&fence.lease)
            .bind(&fence.holder)
            .bind(fence.token)
            .fetch_one(conn)
            .await?;
        Ok(if held {
            Fenced::Done(count as u64)
        } else {
            Fenced::LeaseLost
        })
    }

    /// Dead letters, oldest sequence first.
    pub async fn dead_letters(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, sqlx::Error> {
        type Row = (i64, String, Option<Vec<u8>>, i32, String, i64);
        let rows: Vec<Row> = sqlx::query_as(&self.dead_letters_list)
            .bind(limit)
            .fetch_all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(id, topic, key, attempts, error, age_ms)| DeadLetter {
                id,
                topic,
                key,
                attempts,
                error,
                age: Duration::from_millis(age_ms.max(0) as u64),
            })
            .collect())
    }

    /// Puts one dead letter (`Some(id)`) or all of them back into the outbox with their
    /// original sequence; returns the sequences requeued.
    pub async fn requeue_dead_letters(
        &self,
        conn: &mut PgConnection,
        id: Option<i64>,
    ) -> Result<Vec<i64>, sqlx::Error> {
        sqlx::query_scalar(&self.dead_letters_requeue)
            .bind(id)
            .fetch_all(conn)
            .await
    }

    /// Deletes one dead letter (`Some(id)`) or all of them; returns how many.
    pub async fn drop_dead_letters(
        &self,
        conn: &mut PgConnection,
        id: Option<i64>,
    ) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(&self.dead_letters_drop)
            .bind(id)
            .execute(conn)
            .await?
            .rows_affected())
    }

    /// Keys held back by a failed head message.
    pub async fn held_keys(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> Result<Vec<HeldKey>, sqlx::Error> {
        type Row = (String, Option<Vec<u8>>, i64, i32, i64, Option<String>);
        let rows: Vec<Row> = sqlx::query_as(&self.held_keys)
            .bind(limit)
            .fetch_all(conn)
            .await?;
        Ok(rows
            .into_iter()
            .map(
                |(topic, key, head, attempts, failed_messages, last_error)| HeldKey {
                    topic,
                    key,
                    head,
                    attempts,
                    failed_messages,
                    last_error,
                },
            )
            .collect())
    }

    /// Takes the lease if it is free or expired, and no lease of another name is held.
    pub async fn lease_acquire(
        &self,
        conn: &mut PgConnection,
        lease: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<LeaseState, sqlx::Error> {
        // Serialized per outbox, so that two relays with different lease names cannot both
        // see the other's lease free and take their own.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outbox-lease:' || $1))")
            .bind(self.schema.as_str())
            .execute(&mut *tx)
            .await?;
        let other: Option<(String, String)> = sqlx::query_as(&self.lease_other)
            .bind(lease)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some((lease, holder)) = other {
            return Ok(LeaseState::OtherLease { lease, holder });
        }
        let (current, token, remaining_us): (String, i64, i64) =
            sqlx::query_as(&self.lease_acquire)
                .bind(lease)
                .bind(holder)
                .bind(micros(ttl))
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        let remaining = Duration::from_micros(remaining_us.max(0) as u64);
        Ok(if current == holder {
            LeaseState::Held { token, remaining }
        } else {
            LeaseState::HeldByOther {
                holder: current,
                remaining,
            }
        })
    }

    /// Extends our unexpired term; `LeaseLost` when it had expired or was taken.
    pub async fn lease_renew(
        &self,
        conn: &mut PgConnection,
        fence: &Fence,
        ttl: Duration,
    ) -> Result<Fenced<Duration>, sqlx::Error> {
        let remaining: Option<i64> = sqlx::query_scalar(&self.lease_renew)
            .bind(&fence.lease)
            .bind(&fence.holder)
            .bind(fence.token)
            .bind(micros(ttl))
            .fetch_optional(conn)
            .await?;
        Ok(match remaining {
            Some(us) => Fenced::Done(Duration::from_micros(us.max(0) as u64)),
            None => Fenced::LeaseLost,
        })
    }

    /// Tells writers whether this relay waits for work (`true`: they send NOTIFY) or is busy and
    /// claims again by itself (`false`: they skip the NOTIFY and its commit-time lock).
    pub async fn lease_set_idle(
        &self,
        conn: &mut PgConnection,
        fence: &Fence,
        idle: bool,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&self.lease_set_idle)
            .bind(&fence.lease)
            .bind(&fence.holder)
            .bind(fence.token)
            .bind(idle)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Ends our term now and wakes standbys, so one takes over at once.
    pub async fn lease_release(
        &self,
        conn: &mut PgConnection,
        fence: &Fence,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&self.lease_release)
            .bind(&fence.lease)
            .bind(&fence.holder)
            .bind(fence.token)
            .execute(&mut *conn)
            .await?;
        sqlx::query("SELECT pg_notify($1, 'lease-released')")
            .bind(self.schema.channel())
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Deletes at most `limit` messages processed longer than `retention` ago.
    pub async fn cleanup(
        &self,
        conn: &mut PgConnection,
        retention: Duration,
        limit: i64,
    ) -> Result<u64, sqlx::Error> {
        let result = sqlx::query(&self.cleanup)
            .bind(micros(retention))
            .bind(limit)
            .execute(conn)
            .await?;
        Ok(result.rows_affected())
    }

    /// Pending count and oldest pending age.
    pub async fn backlog(&self, conn: &mut PgConnection) -> Result<Backlog, sqlx::Error> {
        let (pending, oldest_us, held, dead_letters): (i64, Option<i64>, i64, i64) =
            sqlx::query_as(&self.backlog).fetch_one(conn).await?;
        Ok(Backlog {
            pending,
            oldest_age: oldest_us.map(|us| Duration::from_micros(us.max(0) as u64)),
            held,
            dead_letters,
        })
    }
}

impl Statements {
    /// Records (`source`, `sequence`) in the inbox; `true` if it was not there yet.
    pub async fn inbox_record(
        &self,
        conn: &mut PgConnection,
        source: &str,
        sequence: i64,
    ) -> Result<bool, sqlx::Error> {
        let result = sqlx::query(&self.inbox_record)
            .bind(source)
            .bind(sequence)
            .execute(conn)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    /// Recent activity: last publish, failing messages.
    pub async fn activity(&self, conn: &mut PgConnection) -> Result<Activity, sqlx::Error> {
        let (since_us, failing, id, attempts, error): (
            Option<i64>,
            i64,
            Option<i64>,
            Option<i32>,
            Option<String>,
        ) = sqlx::query_as(&self.activity).fetch_one(conn).await?;
        Ok(Activity {
            since_last_publish: since_us.map(|us| Duration::from_micros(us.max(0) as u64)),
            failing,
            oldest_failure: id.map(|id| (id, attempts.unwrap_or(0), error.unwrap_or_default())),
        })
    }

    fn bind_filter<'q, O>(
        query: sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments>,
        filter: &'q RepublishFilter,
    ) -> sqlx::query::QueryAs<'q, Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(filter.from_id)
            .bind(filter.to_id)
            .bind(filter.key.as_deref())
            .bind(filter.topic.as_deref())
            .bind(filter.since.as_deref())
            .bind(filter.until.as_deref())
    }

    /// Processed messages matching `filter`.
    pub async fn republish_count(
        &self,
        conn: &mut PgConnection,
        filter: &RepublishFilter,
    ) -> Result<i64, sqlx::Error> {
        let (count,): (i64,) = Self::bind_filter(sqlx::query_as(&self.republish_count), filter)
            .fetch_one(conn)
            .await?;
        Ok(count)
    }

    /// Moves up to `limit` published messages matching `filter` with sequence above `after` back
    /// into the outbox (they keep their sequence); returns the highest sequence done, or `None`
    /// when nothing was left.
    pub async fn republish_batch(
        &self,
        conn: &mut PgConnection,
        filter: &RepublishFilter,
        after: i64,
        limit: i64,
    ) -> Result<(u64, Option<i64>), sqlx::Error> {
        let ids: Vec<(i64,)> = Self::bind_filter(sqlx::query_as(&self.republish_batch), filter)
            .bind(after)
            .bind(limit)
            .fetch_all(conn)
            .await?;
        Ok((ids.len() as u64, ids.iter().map(|r| r.0).max()))
    }

    /// The other session holding the oldest snapshot in this database, if any.
    pub async fn oldest_snapshot(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Option<OldestSnapshot>, sqlx::Error> {
        let row: Option<(i32, Option<i64>, Option<String>, String)> =
            sqlx::query_as(&self.oldest_snapshot)
                .fetch_optional(conn)
                .await?;
        Ok(
            row.map(|(pid, age_us, state, application_name)| OldestSnapshot {
                pid,
                age: Duration::from_micros(age_us.unwrap_or(0).max(0) as u64),
                state,
                application_name,
            }),
        )
    }

    /// All lease rows.
    pub async fn leases(&self, conn: &mut PgConnection) -> Result<Vec<LeaseRow>, sqlx::Error> {
        let rows: Vec<(String, String, i64, i64)> =
            sqlx::query_as(&self.leases).fetch_all(conn).await?;
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
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// Headers are stored as `[{"name": n, "text": v}]`, or `"base64"` for values that are not
/// UTF-8, so that operators can read them with psql and SQL writers can produce them.
fn encode_headers(headers: &[Header]) -> Option<Value> {
    if headers.is_empty() {
        return None;
    }
    let encoded = headers
        .iter()
        .map(|h| match std::str::from_utf8(&h.value) {
            Ok(text) => json!({ "name": h.name, "text": text }),
            Err(_) => json!({
                "name": h.name,
                "base64": base64::engine::general_purpose::STANDARD.encode(&h.value),
            }),
        })
        .collect();
    Some(Value::Array(encoded))
}

/// Stored headers the relay cannot publish: not the shape the writers store, or naming a
/// header the relay sets itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stored outbox headers: {0}")]
pub struct MalformedHeaders(String);

fn decode_headers(value: Option<Value>) -> Result<Vec<Header>, MalformedHeaders> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = value else {
        return Err(MalformedHeaders(format!(
            "expected an array, found {value}"
        )));
    };
    items
        .into_iter()
        .map(|item| {
            let name = item["name"]
                .as_str()
                .filter(|name| !name.is_empty())
                .ok_or_else(|| MalformedHeaders(format!("header without a name: {item}")))?;
            if crate::headers::RESERVED.contains(&name) {
                return Err(MalformedHeaders(format!(
                    "header {name:?} is reserved: the relay sets it"
                )));
            }
            let value = if let Some(text) = item["text"].as_str() {
                text.as_bytes().to_vec()
            } else if let Some(b64) = item["base64"].as_str() {
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| MalformedHeaders(format!("header {name:?}: {e}")))?
            } else {
                return Err(MalformedHeaders(format!(
                    "header {name:?} has no text or base64 value: {item}"
                )));
            };
            Ok(Header {
                name: name.to_owned(),
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_candidate_settles_only_once_xmin_is_past_the_completion() {
        let horizon = |xmin| ClaimHorizon {
            floor: 0,
            last_id: Some(99),
            xmin,
        };
        let mut tracker = FloorTracker::default();
        tracker.completed(None, 100);
        assert_eq!(tracker.candidate(), None, "nothing was claimed yet");
        tracker.completed(Some(10), 100);
        let first = FloorCandidate {
            last_id: 10,
            xid: 100,
        };
        assert_eq!(tracker.candidate(), Some(first));
        tracker.completed(Some(20), 105);
        assert_eq!(tracker.candidate(), Some(first), "one candidate at a time");
        // The completion itself (or a writer older than it) may still run at xmin = 100.
        assert!(!tracker.observe(&horizon(100), Some(first)));
        assert_eq!(tracker.candidate(), Some(first));
        // Settled but held back by the caller: nothing was raised, the candidate stays.
        assert!(!tracker.observe(&horizon(101), None));
        assert_eq!(tracker.candidate(), Some(first));
        assert!(tracker.observe(&horizon(101), Some(first)));
        assert_eq!(tracker.candidate(), None);
        tracker.completed(Some(20), 105);
        assert_eq!(
            tracker.candidate(),
            Some(FloorCandidate {
                last_id: 20,
                xid: 105
            })
        );
    }

    #[test]
    fn id_ranges_merge_consecutive_ids_in_any_order() {
        assert_eq!(id_ranges(&[]), "{}");
        assert_eq!(id_ranges(&[7]), "{[7,8)}");
        assert_eq!(id_ranges(&[3, 1, 2, 9, 5, 6, 2]), "{[1,4),[5,7),[9,10)}");
        assert_eq!(
            id_ranges(&[i64::MAX, 4, i64::MAX - 1]),
            format!("{{[4,5),[{},)}}", i64::MAX - 1)
        );
    }

    #[test]
    fn headers_round_trip_text_and_binary_in_order() {
        let headers = vec![
            Header {
                name: "traceparent".into(),
                value: b"00-abc-def-01".to_vec(),
            },
            Header {
                name: "bin".into(),
                value: vec![0, 159, 146, 150],
            },
            Header {
                name: "traceparent".into(),
                value: b"dup".to_vec(),
            },
        ];
        let stored = encode_headers(&headers);
        assert_eq!(stored.as_ref().unwrap()[0]["text"], "00-abc-def-01");
        assert!(stored.as_ref().unwrap()[1]["base64"].is_string());
        assert_eq!(decode_headers(stored).unwrap(), headers);
    }

    #[test]
    fn fenced_statements_number_their_fence_parameters() {
        let sql = Statements::new(&SchemaName::default_schema());
        assert!(sql
            .claim
            .contains("l.name = $4 AND l.holder = $5 AND l.token = $6"));
        assert!(sql
            .complete_keep
            .contains("l.name = $2 AND l.holder = $3 AND l.token = $4"));
        assert!(sql
            .record_failures
            .contains("l.name = $4 AND l.holder = $5 AND l.token = $6"));
        assert!(sql
            .dead_letter
            .contains("l.name = $3 AND l.holder = $4 AND l.token = $5"));
        for statement in [
            &sql.complete_keep,
            &sql.complete_keep_replacing,
            &sql.complete_delete,
        ] {
            assert!(!statement.contains("$F") && !statement.contains("{in_ids}"));
        }
    }
}
