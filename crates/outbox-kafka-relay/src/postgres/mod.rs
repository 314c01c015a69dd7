//! The relay's statements: lease, claim, complete, failures. Every SQL statement the relay runs
//! on the outbox tables is here, each next to the function that binds it; the operator's
//! statements are `outbox::admin`, the writer's and the migrations live in the `outbox` crate.
//!
//! The only text placed into statements is the validated [`SchemaName`]; every value is a bind
//! parameter. All times come from the database clock (`now()`), so relays on hosts whose clocks
//! disagree still agree on who holds a lease. Every statement that changes messages is fenced:
//! it takes effect only while the lease term it carries ([`Fence`]) is current and unexpired,
//! so a deposed relay can change nothing.

use std::fmt::Write as _;
use std::time::Duration;

use outbox::headers::{decode_stored, MalformedHeaders};
use outbox::Header;
use outbox::SchemaName;
use serde_json::Value;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres, Row};

/// A committed, not yet published message, as the relay claims it.
#[derive(Debug, Clone)]
pub(crate) struct PendingMessage {
    /// The sequence (x-sequence).
    pub(crate) id: i64,
    /// Kafka topic.
    pub(crate) topic: String,
    /// Kafka key.
    pub(crate) key: Option<Vec<u8>>,
    /// Kafka value; `None` is a tombstone.
    pub(crate) payload: Option<Vec<u8>>,
    /// User headers, in order.
    pub(crate) headers: Vec<Header>,
    /// How long the message has waited since its insert, per the database clock.
    pub(crate) age: Duration,
    /// Failed delivery attempts so far.
    pub(crate) attempts: i32,
    /// Held after a failed delivery and due again (`retry_at` set): what the claim's `$14`
    /// leaves out, and exactly-once sends in transactions apart. Not `attempts > 0`: a dead
    /// letter put back keeps its attempts with no hold, and is a new message to every claim.
    pub(crate) due_retry: bool,
    /// Why the stored row cannot be published as it is (headers of another shape, or naming a
    /// header the relay sets): a row written by a raw INSERT. The relay never sends it; it
    /// treats it as a permanent failure of this message alone.
    pub(crate) invalid: Option<MalformedHeaders>,
}

/// What a claim returned.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    /// The batch, in sequence order.
    pub(crate) messages: Vec<PendingMessage>,
    /// What the claim saw, for the next floor candidate; `None` when it found nothing.
    pub(crate) horizon: Option<ClaimHorizon>,
}

/// What a claim leaves out: the ids in flight (sent and not yet acknowledged, or their
/// completion running), and the keys of messages Kafka has not acknowledged yet (a topic that
/// does not exist yet, a partition without a leader), whose other messages the claim holds
/// back, so that a destination that does not answer collects no more than one batch.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Skip<'a> {
    /// Ids to skip.
    pub(crate) ids: &'a [i64],
    /// Topics of the waiting keyed messages.
    pub(crate) topics: &'a [&'a str],
    /// Their keys, pairwise with `topics`.
    pub(crate) keys: &'a [&'a [u8]],
    /// Topics with a waiting message without a key: their other keyless messages wait too.
    pub(crate) keyless_topics: &'a [&'a str],
    /// Topics with many waiting messages (a partition without a leader, with many keys): all
    /// their messages wait, so that what waits stays bounded.
    pub(crate) stalled_topics: &'a [&'a str],
    /// Whether to leave out the messages that failed before and are due again, and every other
    /// message of their keys (exactly-once claims new messages without them every other time:
    /// see `Pipeline::claim_in_turn`).
    pub(crate) retries: bool,
}

/// The floor a claim started at, and what the next floor rise is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClaimHorizon {
    /// The id the claim's scan started at.
    pub(crate) floor: i64,
    /// The id sequence's last value, read during the claim (`None` before the first insert).
    pub(crate) last_id: Option<i64>,
    /// The claim snapshot's xmin: no transaction with a lower id was still running.
    pub(crate) xmin: u64,
    /// The WAL insert position during the claim, in bytes: past the commit record of every
    /// message the claim saw (committed before its snapshot), asynchronous commits included
    /// (their records are inserted, if not yet written).
    pub(crate) wal_lsn: i64,
}

/// A possible rise of the claim floor: every id up to `last_id` was handed out to a transaction
/// with an id below `xid`. Writers take their transaction id before their ids (migration 0008),
/// and `xid` is the relay's own completion transaction, which began after the claim that read
/// `last_id` had returned. (A snapshot's xmax would not do: it is one past the newest
/// *completed* transaction, and a running one may be at or above it.) Once a claim's xmin is
/// above `xid`, all those transactions have ended and every id up to `last_id` is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FloorCandidate {
    /// Highest id covered.
    pub(crate) last_id: i64,
    /// The completion's transaction id.
    pub(crate) xid: u64,
}

/// What a claim does with its floor: raise it with a candidate (see [`FloorCandidate`]), or
/// lower it to `lower_to`, to cover again messages that left flight without being completed or
/// held. `lower_to` wins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FloorRequest {
    /// A candidate for raising the floor.
    pub(crate) candidate: Option<FloorCandidate>,
    /// The lowest id to cover again.
    pub(crate) lower_to: Option<i64>,
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
pub(crate) struct FloorTracker {
    candidate: Option<FloorCandidate>,
    lower_to: Option<i64>,
}

impl FloorTracker {
    /// Messages `ids` left flight without being completed or held: they are pending, maybe
    /// below the floor, and the next claim must cover them again.
    pub(crate) fn uncovered(&mut self, ids: impl IntoIterator<Item = i64>) {
        self.lower_to = ids.into_iter().chain(self.lower_to).min();
    }

    /// What the next claim does with its floor; `raise` lets it use the candidate.
    pub(crate) fn request(&self, raise: bool) -> FloorRequest {
        FloorRequest {
            candidate: self.candidate.filter(|_| raise),
            lower_to: self.lower_to,
        }
    }

    /// A claim made with `request` succeeded: what it lowered the floor to is covered.
    pub(crate) fn claimed(&mut self, request: FloorRequest) {
        if self.lower_to == request.lower_to {
            self.lower_to = None;
        }
    }

    /// The candidate to pass to the next claim.
    #[cfg(test)]
    pub(crate) fn candidate(&self) -> Option<FloorCandidate> {
        self.candidate
    }

    /// A completion ran in transaction `xid`, after the claim that read `last_id` returned.
    pub(crate) fn completed(&mut self, last_id: Option<i64>, xid: u64) {
        if self.candidate.is_none() {
            self.candidate = last_id.map(|last_id| FloorCandidate { last_id, xid });
        }
    }

    /// Records what a claim saw that was passed `passed` (the candidate, or `None` to hold it
    /// back). Returns whether that claim raised the floor (or found it already as high).
    pub(crate) fn observe(
        &mut self,
        horizon: &ClaimHorizon,
        passed: Option<FloorCandidate>,
    ) -> bool {
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
pub(crate) struct Fence {
    /// Lease name.
    pub(crate) lease: String,
    /// Holder id (unique per relay process run).
    pub(crate) holder: String,
    /// Fencing token, incremented on every acquisition.
    pub(crate) token: i64,
}

/// What an acquisition attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseState {
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
pub(crate) struct Completed {
    /// Messages completed.
    pub(crate) count: u64,
    /// The completing transaction's id.
    pub(crate) xid: u64,
}

/// Outcome of a fenced statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fenced<T> {
    /// The lease was still ours; the statement took effect.
    Done(T),
    /// The lease was lost; nothing was changed.
    LeaseLost,
}

#[cfg(test)]
impl<T> Fenced<T> {
    /// Maps the result of a statement that took effect.
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Fenced<U> {
        match self {
            Fenced::Done(value) => Fenced::Done(f(value)),
            Fenced::LeaseLost => Fenced::LeaseLost,
        }
    }
}

/// The end of the last WAL record before `insert_lsn`, as `pg_current_wal_insert_lsn()` reports
/// it: at the start of a page it points past the page's header (24 bytes, 40 at a segment's
/// start), where no record ends and where a standby's flush position, which stops at the end of
/// the last record, would never reach until more WAL is written. (No record is that short:
/// 24 or 40 bytes into a page is a header's end, never a record's.)
fn record_end(insert_lsn: i64) -> i64 {
    const PAGE: i64 = 8192;
    match insert_lsn % PAGE {
        24 => insert_lsn - 24,
        40 => insert_lsn - 40,
        _ => insert_lsn,
    }
}

/// `id` is in the multirange `$1` (see [`id_ranges`]): one index range scan with a binary
/// search per row, where `id = ANY(array)` descends the index once per id (3x slower for 5,000).
/// The casts sit in sub-selects, evaluated once: a multirange's input function is not immutable,
/// so a bare `$1::text::int8multirange` is parsed again for every row it is compared with.
/// An id of `i64::MAX` has no exclusive upper bound: its range is unbounded above.
const IN_IDS: &str = "id >= lower((SELECT $1::text::int8multirange))
     AND id <= coalesce(upper((SELECT $1::text::int8multirange)) - 1, 9223372036854775807)
     AND (SELECT $1::text::int8multirange) @> id";

/// A pending message the claim may take, with its age and size, before the test of where it
/// is found (at or above the floor, or held below it); continues with `AND`. The held-key test
/// is one `message_held` lookup per candidate: `OFFSET 0` keeps the planner from turning the
/// EXISTS into a hashed subplan, which reads every held message once per claim (10,000 rows
/// for a batch of ten while hostile writers held 10,000 keys: claims of 10 ms instead of 1);
/// `retry_at + interval '0 s'` keeps it from reading every held message through `message_due`
/// instead, as it did per candidate with statistics taken while they were due (claims of 318 ms
/// instead of 5).
const CANDIDATE: &str = "id, topic, key, payload, headers, attempts,
        m.retry_at IS NOT NULL AS due_retry,
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
              AND h.retry_at IS NOT NULL AND (h.retry_at + interval '0 s' > now() OR $14)
           OFFSET 0))";

const FENCE: &str = "EXISTS (SELECT 1 FROM {schema}.relay_lease l
     WHERE l.name = $F1 AND l.holder = $F2 AND l.token = $F3 AND l.expires_at > now())";

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

/// With exactly-once delivery the completion also stores its batch's number ($5), and commits
/// synchronously: recovery trusts a stored number (see the `exactly_once` module). At least
/// once, the CTE only types $5 (NULL) and, unreferenced, never runs.
const PROGRESS: &str = "progress AS (
        INSERT INTO {schema}.relay_progress AS p (lease, batch)
        SELECT $F1, $5::bigint WHERE $5::bigint IS NOT NULL AND (SELECT held FROM fence)
        ON CONFLICT (lease) DO UPDATE SET batch = greatest(p.batch, excluded.batch))";
const NO_PROGRESS: &str = "progress AS (SELECT $5::bigint)";
/// Whatever the server's or the role's default: a completion that recovery trusts is durable.
const SYNC_COMMIT: &str = "(SELECT set_config('synchronous_commit', 'on', true)) AS sync_commit";

/// The relay's statements on one outbox schema, rendered once.
#[derive(Debug)]
pub(crate) struct Statements {
    schema: SchemaName,
    lease_other: String,
    current_term: String,
    lease_acquire: String,
    lease_renew: String,
    lease_set_idle: String,
    lease_release: String,
    claim: String,
    /// Committed asynchronously (at-least-once), and synchronously (exactly-once).
    complete: Completions,
    complete_durable: Completions,
    progress_batch: String,
    record_failures: String,
    release_topics: String,
    dead_letter: String,
}

impl Statements {
    /// Renders every statement for `schema`.
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let render = |sql: &str| {
            sql.replace("{candidate}", CANDIDATE)
                .replace("{fence}", FENCE)
                .replace("{in_ids}", IN_IDS)
                .replace("{async_commit}", ASYNC_COMMIT)
                .replace("{schema}", schema.as_str())
        };
        // Fenced statements take the fence as three parameters from `first` on.
        let fenced = |sql: &str, first: usize| {
            render(sql)
                .replace("$F1", &format!("${first}"))
                .replace("$F2", &format!("${}", first + 1))
                .replace("$F3", &format!("${}", first + 2))
        };
        Statements {
            schema: schema.clone(),
            lease_other: render(Self::LEASE_OTHER),
            current_term: render(Self::CURRENT_TERM),
            lease_acquire: render(Self::LEASE_ACQUIRE),
            lease_renew: render(Self::LEASE_RENEW),
            lease_set_idle: render(Self::LEASE_SET_IDLE),
            lease_release: render(Self::LEASE_RELEASE),
            claim: fenced(Self::CLAIM, 4),
            complete: Completions::render(&|sql| {
                fenced(&sql.replace("{progress}", NO_PROGRESS), 2)
            }),
            complete_durable: Completions::render(&|sql| {
                let sql = sql.replace("{progress}", PROGRESS);
                fenced(&sql.replace("{async_commit}", SYNC_COMMIT), 2)
            }),
            progress_batch: render(Self::PROGRESS_BATCH),
            record_failures: fenced(Self::RECORD_FAILURES, 4),
            release_topics: fenced(Self::RELEASE_TOPICS, 2),
            dead_letter: fenced(Self::DEAD_LETTER, 3),
        }
    }

    const LEASE_OTHER: &'static str = "SELECT name, holder FROM {schema}.relay_lease
     WHERE name <> $1 AND expires_at > now() LIMIT 1";

    /// Takes the lease when it is free or expired; otherwise reports who holds it.
    const LEASE_ACQUIRE: &'static str = "WITH taken AS (
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
     WHERE name = $1 AND NOT EXISTS (SELECT 1 FROM taken)";

    /// Takes the lease if it is free or expired, and no lease of another name is held.
    pub(crate) async fn lease_acquire(
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

    /// Renews only an unexpired term of ours: once expired, another relay may have taken
    /// over, so the holder must step down rather than extend.
    const CURRENT_TERM: &'static str = "SELECT holder, token FROM {schema}.relay_lease
         WHERE name = $1 AND expires_at > now()";

    /// The unexpired term of `lease`, if it is held.
    pub(crate) async fn current_term(
        &self,
        conn: &mut PgConnection,
        lease: &str,
    ) -> Result<Option<Fence>, sqlx::Error> {
        let term: Option<(String, i64)> = sqlx::query_as(&self.current_term)
            .bind(lease)
            .fetch_optional(conn)
            .await?;
        Ok(term.map(|(holder, token)| Fence {
            lease: lease.to_owned(),
            holder,
            token,
        }))
    }

    const LEASE_RENEW: &'static str = "UPDATE {schema}.relay_lease
       SET renewed_at = now(), expires_at = now() + $4 * interval '1 microsecond'
     WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at > now()
    RETURNING (extract(epoch FROM expires_at - now()) * 1000000)::bigint";

    /// Extends our unexpired term; `LeaseLost` when it had expired or was taken.
    pub(crate) async fn lease_renew(
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

    /// With the busy mark (migration 0018), set by the lease holder alone: `$5` milliseconds
    /// ahead of the database's clock while busy, but never past the end of the term (a successor
    /// that does not keep the mark, or a relay of another lease name, would otherwise wait
    /// without wake-ups while it lasts); 0 when going idle. `setval` is not transactional: the
    /// mark changes at once, before the idle flag commits; writers that meet it reset call the
    /// trigger's function, which sees the flag once committed, as before the mark existed.
    /// Without `UPDATE` on the mark, nothing is set and the statement says so (false).
    const LEASE_SET_IDLE: &'static str = "UPDATE {schema}.relay_lease SET idle = $4
     WHERE name = $1 AND holder = $2 AND token = $3
    RETURNING CASE WHEN has_sequence_privilege('{schema}.relay_busy_until', 'UPDATE')
        THEN setval('{schema}.relay_busy_until',
            CASE WHEN $4 THEN 0
                 ELSE least((extract(epoch FROM now()) * 1000)::bigint + $5,
                            (extract(epoch FROM expires_at) * 1000)::bigint) END) >= 0
        ELSE false END";

    /// Tells writers whether this relay waits for work (`true`: they send NOTIFY) or is busy and
    /// claims again by itself (`false`: they skip the NOTIFY and its commit-time lock, and
    /// the trigger's function too, for `busy_for` or until the term ends). Returns whether the
    /// busy mark could be set (`None`: the lease is not ours).
    pub(crate) async fn lease_set_idle(
        &self,
        conn: &mut PgConnection,
        fence: &Fence,
        idle: bool,
        busy_for: Duration,
    ) -> Result<Option<bool>, sqlx::Error> {
        sqlx::query_scalar(&self.lease_set_idle)
            .bind(&fence.lease)
            .bind(&fence.holder)
            .bind(fence.token)
            .bind(idle)
            .bind(busy_for.as_millis().min(86_400_000) as i64)
            .fetch_optional(conn)
            .await
    }

    /// Also resets the busy mark (migration 0018): the successor takes over at once, and may be
    /// one that does not keep the mark.
    const LEASE_RELEASE: &'static str =
        "UPDATE {schema}.relay_lease SET expires_at = now(), idle = true
     WHERE name = $1 AND holder = $2 AND token = $3
     RETURNING CASE WHEN has_sequence_privilege('{schema}.relay_busy_until', 'UPDATE')
                    THEN setval('{schema}.relay_busy_until', 0) END";

    /// Ends our term now and wakes standbys, so one takes over at once.
    pub(crate) async fn lease_release(
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

    /// Held messages (a failed delivery, until retry_at) hold back every other message of
    /// their key; a message without a key holds back only itself. Each candidate looks its
    /// key up in the held messages' index (message_held), so a claim costs the same
    /// whether one key or 10,000 are held; while none is, the test is skipped.
    /// The batch ends at $1 messages or once $2 bytes of keys, payloads and headers are reached
    /// (always at least one message), so the relay's memory is bounded whatever the
    /// payload sizes; either way the result is a prefix in sequence order. The sizes come
    /// from the stored lengths (octet_length does not detoast). $3 lists the ids to skip
    /// (delivered, their completion in flight) as ranges: a multirange test is a binary
    /// search per row, and skipping in the query keeps the budgets exact.
    ///
    /// Per-row work is what a drain pays for 5,000 times a batch, so it is kept small: the
    /// multirange is cast once (a sub-select, see `IN_IDS`), the held test is skipped while
    /// nothing is held, the running sum uses ROWS framing (no peer search), and the age is
    /// float arithmetic (extract() computes in numeric). Together 10-15 ms -> 8 ms per
    /// claim of 5,000 on a 200,000 backlog.
    ///
    /// The lowest ids are found by walking the primary key in order (ORDER BY id LIMIT,
    /// never min(), which a planner without statistics reads through a bitmap of every
    /// id in range): on the relay's sessions, which read through index scans only (see
    /// `outbox_kafka_relay`'s sessions), a claim reads about what it returns on a backlog never
    /// analyzed.
    ///
    /// The scan starts at the lease row's floor (migration 0008). $7/$8 are a candidate
    /// from a completed batch (see `FloorCandidate`): every id up to $8 went to a
    /// transaction older than the relay's completion transaction $7. Once this
    /// snapshot's xmin is above $7 none of them runs, each of those ids is committed or
    /// gone, and the floor may rise to the lowest one still pending, not held and not
    /// in flight ($3), or past $8. A message that leaves flight without being completed
    /// or held (dropped behind a failure, purged, its completion failed) is covered again
    /// by $13: the claim lowers the floor to it. Held messages (`retry_at` set) may stay
    /// below it: the claim finds those that are due through their own index
    /// (migration 0012), so that ten thousand held keys are not walked over by every
    /// claim: `m.id + 0` in the bound and the order leaves the primary key nothing to offer, so
    /// the planner cannot walk every id below the floor instead, as it did whenever it expected
    /// due ones to be many (without statistics, or with statistics taken while they were due).
    /// (A new lease term starts at floor 0, so a hold an operator removes by hand with
    /// `retry_at = NULL` is found then; `retry_at = now()` is found at once.)
    /// The rise is a compare-and-set on the floor's
    /// generation: statements that lower the floor bump it, so one that is concurrent
    /// with this claim (even invisible to its snapshot) cancels the rise. Every claim
    /// reports the sequence's last value and its snapshot's xmin.
    const CLAIM: &'static str = "WITH lease AS MATERIALIZED (
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
               pg_snapshot_xmin(pg_current_snapshot())::text AS xmin,
               pg_wal_lsn_diff(pg_current_wal_insert_lsn(), '0/0')::bigint AS wal_lsn),
         any_held AS MATERIALIZED (
        SELECT EXISTS (SELECT 1 FROM {schema}.message
                        WHERE retry_at IS NOT NULL
                          AND (retry_at > now() OR $14)) AS yes)
    SELECT id, topic, key, payload, headers, attempts, due_retry, age_us,
           (SELECT floor FROM horizon) AS floor, (SELECT last_id FROM horizon) AS last_id,
           (SELECT xmin FROM horizon) AS xmin, (SELECT wal_lsn FROM horizon) AS wal_lsn
      FROM (SELECT c.*, sum(size) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) - size AS before
              FROM (SELECT * FROM (
                      (SELECT {candidate} AND m.id >= (SELECT floor FROM horizon)
                          AND (m.retry_at IS NULL OR (m.retry_at <= now() AND NOT $14))
                        ORDER BY id LIMIT $1)
                      UNION ALL
                      (SELECT {candidate} AND m.id + 0 < (SELECT floor FROM horizon)
                          AND m.retry_at IS NOT NULL AND m.retry_at <= now() AND NOT $14
                        ORDER BY m.id + 0 LIMIT $1)) u
                     ORDER BY id
                     LIMIT $1) c) b
     WHERE before < $2
     ORDER BY id";

    /// Claims up to `limit` pending messages in sequence order, stopping once their keys,
    /// payloads and headers reach `max_bytes` (at least one message), leaving out `skip`, only
    /// while `fence` holds. A single active relay needs no row locks: the fence makes it the only publisher.
    /// With a `candidate` from [`FloorTracker`], the claim also raises the floor it starts at
    /// once that is safe.
    pub(crate) async fn claim(
        &self,
        conn: &mut PgConnection,
        limit: i64,
        max_bytes: i64,
        skip: &Skip<'_>,
        floor: FloorRequest,
        fence: &Fence,
    ) -> Result<Claimed, sqlx::Error> {
        let rows = bind_claim(
            sqlx::query(&self.claim),
            limit,
            max_bytes,
            skip,
            floor,
            fence,
        )
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
                    wal_lsn: record_end(row.try_get("wal_lsn")?),
                })
            }
            None => None,
        };
        let messages = rows
            .into_iter()
            .map(|row| {
                let headers: Option<Value> = row.try_get("headers")?;
                let age_us: i64 = row.try_get("age_us")?;
                let (headers, invalid) = match decode_stored(headers) {
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
                    due_retry: row.try_get("due_retry")?,
                    invalid,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok(Claimed { messages, horizon })
    }

    /// The WAL position (in bytes) that at least `standbys` standbys have flushed: the
    /// `standbys`-th highest `flush_lsn` among the streaming ones (`None` while fewer stream),
    /// and how many walsenders hide their state from this role (only superusers and members of
    /// `pg_read_all_stats`, e.g. through `pg_monitor`, see it). What counts as a standby: a
    /// physical walsender (logical ones, CDC connectors, have a database) whose
    /// `application_name` is in `$2`, or with `$2` empty any but WAL archivers' and backups'
    /// (`pg_basebackup`, `pg_receivewal`, Barman's `barman_receive_wal`), which stream without
    /// ever being promoted; counted once per name and address, so the stale walsender a
    /// reconnected standby leaves behind until `wal_sender_timeout` is not a second standby.
    const STANDBYS_FLUSHED: &'static str = "WITH senders AS (
        SELECT r.application_name, r.client_addr, r.state, r.flush_lsn
          FROM pg_stat_replication r
         WHERE r.pid NOT IN (SELECT pid FROM pg_stat_activity
                              WHERE backend_type = 'walsender' AND datname IS NOT NULL)),
         standbys AS (
        SELECT max(flush_lsn) AS flush_lsn FROM senders
         WHERE state = 'streaming' AND flush_lsn IS NOT NULL
           AND CASE WHEN cardinality($2::text[]) > 0 THEN application_name = ANY($2::text[])
                    ELSE application_name NOT IN ('pg_basebackup', 'pg_receivewal',
                                                  'barman_receive_wal') END
         GROUP BY application_name, client_addr)
    SELECT (SELECT pg_wal_lsn_diff(flush_lsn, '0/0')::bigint FROM standbys
             ORDER BY flush_lsn DESC OFFSET $1 - 1 LIMIT 1),
           (SELECT count(*) FROM senders WHERE state IS NULL)";

    /// See [`Statements::STANDBYS_FLUSHED`].
    pub(crate) async fn standbys_flushed(
        &self,
        conn: &mut PgConnection,
        standbys: u32,
        names: &[String],
    ) -> Result<(Option<i64>, i64), sqlx::Error> {
        sqlx::query_as(Self::STANDBYS_FLUSHED)
            .bind(i64::from(standbys))
            .bind(names)
            .fetch_one(conn)
            .await
    }

    /// The claim's text, for diagnostics.
    pub(crate) fn claim_sql(&self) -> &str {
        &self.claim
    }

    /// `EXPLAIN (ANALYZE, BUFFERS)` of a claim of up to `limit` messages under `fence`.
    pub(crate) async fn explain_claim(
        &self,
        conn: &mut PgConnection,
        limit: i64,
        fence: &Fence,
    ) -> Result<Vec<String>, sqlx::Error> {
        let explain = format!("EXPLAIN (ANALYZE, BUFFERS) {}", self.claim);
        let query = sqlx::query(&explain);
        let skip = Skip::default();
        let rows = bind_claim(
            query,
            limit,
            i64::MAX,
            &skip,
            FloorRequest::default(),
            fence,
        )
        .fetch_all(conn)
        .await?;
        rows.iter().map(|row| row.try_get(0)).collect()
    }

    /// The keep-mode completion's conflict clause when a row is already in `published`. Our
    /// own statements never leave one there (republishing moves rows out), but a hand-made copy
    /// could; a plain insert is a quarter cheaper than this speculative one, so this is the
    /// fallback.
    const COMPLETE_KEEP_REPLACING: &'static str = "ON CONFLICT (id) DO UPDATE
        SET processed_at = excluded.processed_at, attempts = excluded.attempts";

    const COMPLETE_DELETE: &'static str = "WITH fence AS (SELECT {fence} AS held),
         done AS (DELETE FROM {schema}.message
                   WHERE {in_ids} AND (SELECT held FROM fence)
               RETURNING 1),
         {progress}
    SELECT (SELECT held FROM fence), (SELECT count(*) FROM done),
           pg_current_xact_id()::text
      FROM {async_commit}";

    /// Completes delivered messages: moves them to `published` (kept for retention) or deletes
    /// them, fenced. With exactly-once delivery, `batch` is their transaction's number, stored
    /// with them, and the transaction commits synchronously. Returns how many rows changed and
    /// the completing transaction's id (for [`FloorTracker::completed`]). Runs as a transaction
    /// of its own: call it outside one.
    pub(crate) async fn complete(
        &self,
        conn: &mut PgConnection,
        ids: &[i64],
        delete: bool,
        batch: Option<i64>,
        fence: &Fence,
    ) -> Result<Fenced<Completed>, sqlx::Error> {
        async fn run(
            sql: &str,
            conn: &mut PgConnection,
            ids: &[i64],
            batch: Option<i64>,
            fence: &Fence,
        ) -> Result<(bool, i64, String), sqlx::Error> {
            sqlx::query_as(sql)
                .bind(id_ranges(ids))
                .bind(&fence.lease)
                .bind(&fence.holder)
                .bind(fence.token)
                .bind(batch)
                .fetch_one(conn)
                .await
        }
        let statements = match batch {
            Some(_) => &self.complete_durable,
            None => &self.complete,
        };
        let (held, count, xid) = if delete {
            run(&statements.delete, conn, ids, batch, fence).await?
        } else {
            match run(&statements.keep, &mut *conn, ids, batch, fence).await {
                // A copy already in `published`: the statement changed nothing; replace it.
                Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
                    run(&statements.keep_replacing, conn, ids, batch, fence).await?
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

    const PROGRESS_BATCH: &'static str =
        "SELECT coalesce((SELECT batch FROM {schema}.relay_progress WHERE lease = $1), 0)";

    /// With exactly-once delivery: the number of the last batch whose completion committed
    /// (0 before the first).
    pub(crate) async fn progress_batch(
        &self,
        conn: &mut PgConnection,
        lease: &str,
    ) -> Result<i64, sqlx::Error> {
        let (batch,): (i64,) = sqlx::query_as(&self.progress_batch)
            .bind(lease)
            .fetch_one(conn)
            .await?;
        Ok(batch)
    }

    const RECORD_FAILURES: &'static str = "UPDATE {schema}.message m
       SET attempts = least(m.attempts, 2147483646) + 1, last_error = f.error,
           retry_at = now() + f.delay_us * interval '1 microsecond'
      FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS f(id, error, delay_us)
     WHERE m.id = f.id AND {fence}";

    /// Counts a failed attempt on each message, records its error, and holds it (and the later
    /// messages of its key) for its retry delay; fenced.
    pub(crate) async fn record_failures(
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

    /// Messages of these topics held for a failure become due now; fenced. Found
    /// through the held messages' index by retry time (message_due), whatever the backlog.
    const RELEASE_TOPICS: &'static str = "UPDATE {schema}.message SET retry_at = now()
     WHERE topic = ANY($1) AND retry_at IS NOT NULL
       AND retry_at > now() AND {fence}";

    /// Makes the held messages of `topics` due now (a topic that did not exist was created);
    /// fenced.
    pub(crate) async fn release_topics(
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

    const DEAD_LETTER: &'static str = "WITH fence AS (SELECT {fence} AS held),
         moved AS (DELETE FROM {schema}.message m
                    USING unnest($1::bigint[], $2::text[]) AS f(id, error)
                    WHERE m.id = f.id
                      AND (SELECT held FROM fence)
                RETURNING m.id, m.topic, m.key, m.payload, m.headers, m.created_at,
                          least(m.attempts, 2147483646) + 1 AS attempts, f.error),
         stored AS (INSERT INTO {schema}.dead_letter
                           (id, topic, key, payload, headers, created_at, attempts, error)
                    SELECT id, topic, key, payload, headers, created_at, attempts, error
                      FROM moved
                    ON CONFLICT (id) DO UPDATE
                       SET dead_at = now(), attempts = excluded.attempts, error = excluded.error
                    RETURNING 1)
    SELECT (SELECT held FROM fence), (SELECT count(*) FROM stored)";

    /// Moves permanently failed messages to the dead-letter table (keeping their sequence),
    /// fenced; returns how many moved.
    pub(crate) async fn dead_letter(
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
}

/// The keep-mode completion, with `on_conflict` as the insert's conflict clause.
/// The three completion statements, rendered by `render`.
#[derive(Debug)]
struct Completions {
    keep: String,
    keep_replacing: String,
    delete: String,
}

impl Completions {
    fn render(render: &dyn Fn(&str) -> String) -> Self {
        Completions {
            keep: render(&complete_keep("")),
            keep_replacing: render(&complete_keep(Statements::COMPLETE_KEEP_REPLACING)),
            delete: render(Statements::COMPLETE_DELETE),
        }
    }
}

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
                       RETURNING 1),
              {{progress}}
         SELECT (SELECT held FROM fence), (SELECT count(*) FROM done), pg_current_xact_id()::text
           FROM {{async_commit}}"
    )
}

/// Binds the claim's parameters from the structs that name them, in the statement's numbering.
fn bind_claim<'q>(
    query: Query<'q, Postgres, PgArguments>,
    limit: i64,
    max_bytes: i64,
    skip: &'q Skip<'q>,
    floor: FloorRequest,
    fence: &'q Fence,
) -> Query<'q, Postgres, PgArguments> {
    let candidate = floor.candidate;
    query
        .bind(limit) // $1
        .bind(max_bytes) // $2
        .bind(id_ranges(skip.ids)) // $3
        .bind(&fence.lease) // $4 ($F1)
        .bind(&fence.holder) // $5 ($F2)
        .bind(fence.token) // $6 ($F3)
        .bind(candidate.map(|c| c.xid.to_string())) // $7
        .bind(candidate.map(|c| c.last_id)) // $8
        .bind(skip.topics) // $9
        .bind(skip.keys) // $10
        .bind(skip.keyless_topics) // $11
        .bind(skip.stalled_topics) // $12
        .bind(floor.lower_to) // $13
        .bind(skip.retries) // $14
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

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
