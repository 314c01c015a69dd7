//! The relay: publishes committed outbox messages to Apache Kafka.
//!
//! Run it embedded ([`Relay::start`]) or as the standalone `outbox relay` command (the
//! `outbox-cli` crate). Any number of relays may run against one outbox; they share a lease, and
//! only its holder publishes.
//!
//! ```no_run
//! use outbox_kafka_relay::{Relay, RelayConfig};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://localhost/things").await?;
//! // The schema must be migrated first: `outbox::Outbox::migrate` or `outbox migrate`.
//! let mut config = RelayConfig::new("kafka:9092", "thing-service");
//! config.kafka.set("compression.type", "lz4"); // librdkafka properties, verbatim
//! let relay = Relay::start(pool, config)?;
//!
//! // ... until the service shuts down:
//! relay.shutdown().await?; // stop claiming, complete what Kafka acknowledged, release the lease
//! # Ok(())
//! # }
//! ```
//!
//! # What is guaranteed, and why it holds
//!
//! **At-least-once.** A message is completed (moved to `published`, or deleted) only after Kafka
//! acknowledged it with `acks=all`. Whatever was not acknowledged stays pending and is sent again
//! by the same or the next holder, so a crash at any point yields at most duplicates, never a
//! loss.
//!
//! **Exactly-once, by choice.** With [`Delivery::ExactlyOnce`] each batch is one Kafka
//! transaction that also records its outbox ids in a progress topic; the database completion
//! follows the commit, and a holder completes what Kafka committed before it claims. Consumers
//! reading with `isolation.level=read_committed` then see each committed message once. The
//! argument, crash point by crash point, is in the `exactly_once` module
//! (`src/exactly_once.rs`).
//!
//! **Only committed messages, and every one of them.** The relay reads with ordinary snapshots,
//! so it never sees an uncommitted row. It claims *all* pending rows in sequence order, never
//! "rows above the last sequence seen": a transaction that took sequence 10 but commits after 11
//! was published is still found on the next claim. There is no high-water mark a late commit
//! could fall under.
//!
//! **Per-key order.** For messages A and B with the same topic and key, where A's transaction
//! committed before B was enqueued, the first delivery of A to Kafka precedes the first delivery
//! of B. This is causal order: a service that locks its entity row before enqueuing gets its
//! events in entity-version order. Why:
//! 1. Sequences come from an identity with `CACHE 1`, i.e. in `nextval` order. A committed before
//!    B's insert, so A's sequence is lower, and any snapshot that sees B also sees A.
//! 2. The single active relay claims the lowest pending sequences first, so a batch containing B
//!    contains A, unless A was acknowledged before (completed, or its completion still in
//!    flight: the next batch is claimed while the previous one is completed, and skips exactly
//!    those acknowledged ids, never "everything below" some sequence). Claims start at a floor
//!    (migration 0008) only so that they do not walk over completed rows' index entries: every
//!    id below it is settled, held (found through its own index once due, migration 0012), or
//!    in flight (and covered again by lowering the floor if it leaves flight without being
//!    completed or held). It rises past an id only once the sequence had handed that id
//!    out before the relay's own completion transaction X began (writers take their
//!    transaction id before their sequences, by a statement trigger, so theirs are below X)
//!    and a later snapshot's xmin is above X, i.e. none of those writers still runs; a
//!    transaction that commits late is never below it. Republishing and dead-letter retry,
//!    which put messages back with their old sequences, lower it in the same transaction and
//!    bump its generation, which cancels any rise in progress (a compare-and-set on it).
//! 3. Records are sent in sequence order to one idempotent producer (all of a key's records to
//!    one partition), which keeps per-partition order across its retries; with
//!    `enable.gapless.guarantee` and no message timeout it never lets a later record of a
//!    partition through after giving up on an earlier one. The relay does not wait for a whole
//!    batch: what is unacknowledged after the usual time stays in flight, and while it is, the
//!    claim holds back the other messages of its key. A delivered message is completed only
//!    once every earlier message of its key in flight was delivered. When a record fails (a
//!    topic that does not exist, a record Kafka refuses), no later record of its key in the
//!    batch is sent, and any that were delivered are not completed (see `kafka::InFlight`). The
//!    failed message is held in the database (`retry_at`, capped jittered backoff) and the
//!    claim skips every other message of its key until it is retried, so the hold survives
//!    restarts and failovers, and other keys keep flowing meanwhile.
//! 4. Duplicates (redeliveries after a crash, or a deposed relay's in-flight batch landing late)
//!    are copies of records whose first delivery was already in order: each producer's stream is
//!    in order, and every producer that sent B had sent A before it or found A complete.
//!
//! Two routes keep a destination that does not answer from holding back others: a keyed
//! message whose partition has no leader (keys are partitioned as Java's producer does, so the
//! relay knows the partition) is held at once, as a failed attempt, without being sent; and a
//! record over its topic's size limit goes alone through a second producer, so
//! the broker's refusal never fails the producer that has everything else in flight.
//!
//! The one exception is chosen by configuration: under [`PoisonPolicy::DeadLetter`], a message
//! Kafka refuses permanently is moved aside and the later messages of its key go on without it.
//!
//! Consumers that need exactly-once *effects* deduplicate on (`x-source`, `x-sequence`); see
//! [`outbox::headers`] for what the sequence does and does not promise.
//!
//! **One publisher at a time, fenced** (the lease module keeps it): a relay publishes a new batch
//! only while its local, conservative lease deadline is ahead, claims and completes only with the
//! fence (holder, token, unexpired) checked in the same statement, and purges its producer as soon
//! as it learns the lease is gone. A deposed relay (GC pause, network cut) therefore cannot mark
//! anything complete or start another batch; at worst the batch it had in flight lands as
//! duplicates. A standby takes over once the lease expires, or at once after a clean release.
//!
//! **Wake-ups.** While the relay waits for work, inserting messages sends a NOTIFY in the
//! writing transaction, delivered at commit; the relay LISTENs, and also polls every
//! `poll_interval`. While it is busy it claims again at once after a full batch, and
//! `batch_linger` after the previous claim began when the batch was not full (so that at light
//! traffic a claim and a completion carry a few messages, not one), and writers skip the NOTIFY
//! (it serializes committing transactions on a global lock): the relay keeps an
//! `idle` flag on its lease row, sets it and claims once more before it waits, and polls
//! shortly after going idle to catch a writer that read the flag just before it changed.
//!
//! **Failover.** The relay follows the primary through whatever endpoint the service uses to
//! reach it (a proxy such as HAProxy with Patroni's health check, a floating IP, a cloud DNS
//! name): its sessions fail when the primary dies, and it reconnects, retakes the lease on the
//! promoted server and claims what that server holds. sqlx does not parse libpq's multi-host
//! URLs (`host=a,b target_session_attrs=read-write`), so the endpoint must be one address.
//! The guarantees above hold against the promoted server's data: what it lost (its WAL never
//! reached it) is, for the relay, never committed; what it kept and the old primary had
//! completed is published again (duplicates).
//!
//! With asynchronous replication a promoted standby lacks the last commits the old primary
//! acknowledged. Had the relay published them, consumers would hold **phantom events**, whose
//! data does not exist; worse, the promoted server hands their sequences out again, to other
//! messages, which consumers deduplicating on (`x-source`, `x-sequence`) then drop.
//! [`RelayConfig::wait_for_standbys`] (`n` > 0) closes this: the claim reads the WAL insert
//! position `L`, which is past the commit record of every message it returns (they committed
//! before its snapshot, and a commit record is inserted before the commit is visible, even an
//! asynchronous one); the batch is sent only once `n` physical standbys report a flushed
//! position of at least `L` (`pg_stat_replication.flush_lsn`), read on the claim's own
//! session, so on the same server. A standby that flushed `L` has every commit of the batch and
//! the sequence records before them, and a promotion replays all it flushed. So after a
//! failover to one of those standbys, every published message exists and no published sequence
//! is handed out again, provided the standby promoted is one of those `n` (give the others
//! other names, [`RelayConfig::standby_names`]; a cascaded standby is not seen by the primary
//! and never counts). A batch that is not confirmed is not sent; it stays pending.
//! PostgreSQL's synchronous replication does the same for writers that commit with it (the
//! commit becomes visible only once the standby confirmed it), but not for a commit whose wait
//! was cancelled (a cancelled query, a terminated backend: visible without the standby) or a
//! writer that sets `synchronous_commit` to `local` or `off`, and it makes every writer wait for
//! the standby; this setting holds for every message and delays only publishing.
//!
//! **Shutdown.** [`RelayHandle::shutdown`] (the CLI calls it on SIGTERM/SIGINT) stops claiming,
//! waits up to `shutdown_timeout` for in-flight deliveries, completes what was acknowledged and
//! releases the lease so a standby takes over immediately.

/// The README's Rust examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

mod backoff;
pub mod cleanup;
pub mod config;
pub mod diagnostics;
mod exactly_once;
pub mod health;
mod in_flight;
mod kafka;
mod lease;
pub mod metrics;
mod monitor;
mod pipeline;
mod postgres;
mod sessions;
mod topics;
#[cfg(feature = "otel")]
mod trace;
mod wakeup;

use std::sync::Arc;
use std::time::Duration;

use crate::postgres::Statements;
use outbox::admin::Admin;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{Completion, Delivery, InvalidConfig, PoisonPolicy, RelayConfig};
pub use health::{Health, HealthReport, KafkaProblem};
pub use kafka::KafkaConfig;
pub use sessions::TransactionPooled;

use crate::lease::{LeaseKeeper, Term};
use crate::pipeline::Pipeline;
use crate::wakeup::Wakeups;

/// Why the relay could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// A setting cannot work.
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// The Kafka producer could not be created.
    #[error("cannot create the Kafka producer: {0}")]
    Kafka(#[source] rdkafka::error::KafkaError),
    /// A database statement failed where the relay cannot go on without it.
    #[error("outbox database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A relay task panicked (a bug).
    #[error("a relay task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The relay's connections go through a pooler in transaction mode (see
    /// [`Relay::check_connection`]).
    #[error(transparent)]
    TransactionPooled(#[from] sessions::TransactionPooled),
    /// [`Relay::start`] was called outside a Tokio runtime, which its tasks need.
    #[error("the relay must be started within a Tokio runtime")]
    NoRuntime,
}

/// Entry point: starts relays.
#[derive(Debug)]
pub struct Relay;

impl Relay {
    /// Validates `config` and starts the relay's tasks on the current Tokio runtime: the lease
    /// keeper, the listener, the pipeline and (with [`Completion::Keep`]) retention cleanup.
    /// The schema must have been migrated. Outside a Tokio runtime it fails with
    /// [`RelayError::NoRuntime`].
    ///
    /// The relay opens its own connections (at most 8) with `pool`'s connect options, so that
    /// its session settings never reach the service's sessions and a busy service never
    /// starves it of connections. They run with `jit = off`, `enable_seqscan = off` and
    /// `enable_bitmapscan = off` (claim plans that stay bounded on a backlog without planner
    /// statistics) and `statement_timeout` set to the lease term; `application_name` is
    /// `outbox-relay` unless the options name one.
    ///
    /// Those sessions must be the relay's own from connect to close: connect it directly or
    /// through a pooler in session mode. Through a pooler in transaction mode (PgBouncer's
    /// `pool_mode = transaction`) the relay opens no session: its health reports
    /// [`RelayError::TransactionPooled`] and it checks again on each retry.
    /// [`Relay::check_connection`] tells before starting.
    pub fn start(pool: PgPool, config: RelayConfig) -> Result<RelayHandle, RelayError> {
        config.validate()?;
        metrics::register(&config.lease_name);
        // Everything below spawns tasks (the session pool too), which panics without one.
        tokio::runtime::Handle::try_current().map_err(|_| RelayError::NoRuntime)?;
        let health = Arc::new(Health::new(config.stall_timeout, config.backoff_max));
        let pool = sessions::pool(&pool, config.lease_ttl, health.clone());
        let statements = Arc::new(Statements::new(&config.schema));
        let admin = Arc::new(Admin::new(&config.schema));
        let transactional_ids =
            (config.delivery == Delivery::ExactlyOnce).then(|| config.transactional_ids());
        let publisher = kafka::Publisher::new(&config.kafka, &config.source, transactional_ids)
            .map_err(|e| RelayError::Kafka(kafka::redact_config_error(e)))?;
        let holder = format!("{}-{}", hostname(), uuid::Uuid::new_v4());
        let shutdown_timeout = config.shutdown_timeout;
        let (term_tx, term_rx) = watch::channel::<Option<Term>>(None);
        let wakeups = Arc::new(Wakeups::default());
        let cancel = CancellationToken::new();
        // The lease keeper outlives the pipeline so that it can release the lease last.
        let keeper_cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();

        tasks.spawn(wakeup::listen(
            pool.clone(),
            config.schema.channel(),
            wakeups.clone(),
            cancel.clone(),
        ));
        tasks.spawn(monitor::run(
            pool.clone(),
            admin.clone(),
            config.kafka.clone(),
            health.clone(),
            config.monitor_interval,
            cancel.clone(),
        ));
        if let Completion::Keep { retention } = config.completion {
            tasks.spawn(cleanup::run_periodically(
                pool.clone(),
                admin,
                term_rx.clone(),
                retention,
                config.cleanup_interval,
                config.cleanup_batch_size,
                cancel.clone(),
            ));
        }
        let keeper = LeaseKeeper {
            pool: pool.clone(),
            statements: statements.clone(),
            lease: config.lease_name.clone(),
            holder: holder.clone(),
            ttl: config.lease_ttl,
            renew_interval: config.lease_renew_interval,
            released: wakeups.lease_released.clone(),
            term: term_tx,
            health: health.clone(),
        };
        let keeper_task = tokio::spawn(keeper.run(keeper_cancel.clone()));
        let pipeline = Pipeline {
            session: sessions::Kept::new(pool.clone()),
            completer: None,
            pool,
            statements,
            config,
            publisher,
            term: term_rx.clone(),
            wakeups,
            health: health.clone(),
            idle: false,
            busy_marked_at: None,
            mark_maybe_ahead: false,
            mark_warning: true,
            idle_rounds: 0,
            term_token: None,
            completing: None,
            floor: Default::default(),
            floor_raised_at: tokio::time::Instant::now(),
            retries_turn: false,
            backlog: false,
            claimed_last_id: None,
            claimed_wal_lsn: 0,
            claimed_session: None,
            in_flight: Default::default(),
            transactions: Default::default(),
            typical_ack: Duration::ZERO,
            next_claim_at: None,
        };
        let pipeline_task = tokio::spawn(pipeline.run(cancel.clone()));
        Ok(RelayHandle {
            holder,
            shutdown_timeout,
            cancel,
            keeper_cancel,
            tasks,
            pipeline_task: Some(pipeline_task),
            keeper_task,
            term: term_rx,
            health,
        })
    }
}

impl Relay {
    /// Fails with [`RelayError::TransactionPooled`] when `pool`'s connections go through a
    /// pooler in transaction mode, where the relay cannot run (see [`Relay::start`]); with
    /// [`RelayError::Database`] when they fail. Opens two connections of its own for the test.
    pub async fn check_connection(pool: &PgPool) -> Result<(), RelayError> {
        if outbox::pooler::transaction_pooled(pool.connect_options().as_ref()).await? {
            return Err(sessions::TransactionPooled.into());
        }
        Ok(())
    }
}

/// How long a shutdown waits for the lease release after the rest has stopped.
const LEASE_RELEASE_TIMEOUT: Duration = Duration::from_secs(1);

/// A running relay. Dropping it does not stop it; call [`RelayHandle::shutdown`].
#[derive(Debug)]
#[must_use = "dropping the handle leaves the relay running; call shutdown() to stop it"]
pub struct RelayHandle {
    holder: String,
    shutdown_timeout: Duration,
    cancel: CancellationToken,
    keeper_cancel: CancellationToken,
    tasks: JoinSet<()>,
    /// `None` once [`RelayHandle::stopped`] has returned its outcome: a finished join handle
    /// must not be polled again.
    pipeline_task: Option<tokio::task::JoinHandle<Result<(), RelayError>>>,
    keeper_task: tokio::task::JoinHandle<()>,
    term: watch::Receiver<Option<Term>>,
    health: Arc<Health>,
}

impl RelayHandle {
    /// The relay's health, shared: serve `health().report()` from a readiness endpoint.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// This relay's holder id in the lease table.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Whether this relay currently holds the lease.
    pub fn is_leader(&self) -> bool {
        matches!(&*self.term.borrow(), Some(term) if term.valid_for(Duration::ZERO))
    }

    /// Waits until this relay holds the lease.
    pub async fn wait_until_leader(&self) {
        let mut term = self.term.clone();
        let _ = term
            .wait_for(|t| t.as_ref().is_some_and(|t| t.valid_for(Duration::ZERO)))
            .await;
    }

    /// Graceful shutdown: stop claiming, wait for in-flight deliveries (up to the configured
    /// timeout), complete what was acknowledged, release the lease.
    ///
    /// Bounded: after `shutdown_timeout` (plus a second for the lease release) whatever still
    /// runs is abandoned, e.g. a statement blocked on a lock in the database, so that a standby
    /// can take over; what it had not completed is published again by the next holder.
    ///
    /// After [`RelayHandle::stopped`] returned, the pipeline's outcome was reported there; the
    /// rest still stops and the lease is released.
    pub async fn shutdown(mut self) -> Result<(), RelayError> {
        self.cancel.cancel();
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        let pipeline = match self.pipeline_task.as_mut() {
            None => Ok(Ok(())),
            Some(task) => match tokio::time::timeout_at(deadline, &mut *task).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        timeout = ?self.shutdown_timeout,
                        "the relay did not stop within the shutdown timeout (a statement blocked in the database?); abandoning it"
                    );
                    task.abort();
                    Ok(Ok(()))
                }
            },
        };
        if tokio::time::timeout_at(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            self.tasks.abort_all();
        }
        // The lease is released last, so that no standby publishes while this relay might.
        self.keeper_cancel.cancel();
        let release = deadline.max(tokio::time::Instant::now()) + LEASE_RELEASE_TIMEOUT;
        if tokio::time::timeout_at(release, &mut self.keeper_task)
            .await
            .is_err()
        {
            tracing::warn!("cannot release the lease in time; it expires on its own");
            self.keeper_task.abort();
        }
        pipeline?
    }

    /// Resolves if the relay stops on its own (a fatal error); otherwise runs forever.
    /// Cancel-safe. Once it has returned the outcome, later calls return `Ok(())` at once;
    /// call [`RelayHandle::shutdown`] to stop the remaining tasks and release the lease.
    pub async fn stopped(&mut self) -> Result<(), RelayError> {
        let Some(task) = self.pipeline_task.as_mut() else {
            return Ok(());
        };
        let outcome = task.await;
        self.pipeline_task = None;
        outcome?
    }

    /// Stops at once, as a crash would: no flush, no completion, no lease release. For tests
    /// of failover; the lease expires on its own.
    pub fn abort(mut self) {
        if let Some(task) = &self.pipeline_task {
            task.abort();
        }
        self.keeper_task.abort();
        self.tasks.abort_all();
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "relay".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy_pool() -> PgPool {
        // No maintenance tasks, so that it can be built outside a runtime too.
        sqlx::postgres::PgPoolOptions::new()
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy("postgres://nobody@127.0.0.1:1/nothing")
            .unwrap()
    }

    #[test]
    fn starting_outside_a_tokio_runtime_is_an_error_not_a_panic() {
        let started = std::panic::catch_unwind(|| {
            Relay::start(lazy_pool(), RelayConfig::new("127.0.0.1:1", "svc")).map(|_| ())
        });
        match started {
            Ok(result) => assert!(matches!(result, Err(RelayError::NoRuntime)), "{result:?}"),
            Err(_) => panic!("Relay::start panicked outside a Tokio runtime"),
        }
    }

    #[tokio::test]
    async fn secret_property_refused_by_librdkafka_is_not_echoed() {
        let mut config = RelayConfig::new("127.0.0.1:1", "svc");
        config.kafka.set(
            "sasl.jaas.config",
            "org.apache.kafka.common.security.plain.PlainLoginModule required password=\"jaas-secret\";",
        );
        let error = match Relay::start(lazy_pool(), config) {
            Ok(relay) => {
                relay.abort();
                panic!("librdkafka accepted sasl.jaas.config")
            }
            Err(error) => error,
        };
        for shown in [error.to_string(), format!("{error:?}")] {
            assert!(shown.contains("sasl.jaas.config"), "{shown}");
            assert!(!shown.contains("jaas-secret"), "{shown}");
        }
    }

    /// A handle whose pipeline has already failed, as after a fatal error.
    fn handle_of_a_failed_relay() -> RelayHandle {
        let (_term_tx, term) = watch::channel(None);
        RelayHandle {
            holder: "test".into(),
            shutdown_timeout: Duration::from_secs(1),
            cancel: CancellationToken::new(),
            keeper_cancel: CancellationToken::new(),
            tasks: JoinSet::new(),
            pipeline_task: Some(tokio::spawn(async {
                Err(RelayError::InvalidConfig(InvalidConfig::new(
                    "test", "fatal",
                )))
            })),
            keeper_task: tokio::spawn(async {}),
            term,
            health: Arc::new(Health::new(
                Duration::from_secs(60),
                Duration::from_secs(30),
            )),
        }
    }

    #[tokio::test]
    async fn shutdown_after_the_relay_stopped_on_its_own_returns() {
        let mut relay = handle_of_a_failed_relay();
        assert!(relay.stopped().await.is_err());
        let shutdown = tokio::spawn(relay.shutdown()).await;
        assert!(shutdown.is_ok(), "shutdown panicked: {shutdown:?}");
    }
}
