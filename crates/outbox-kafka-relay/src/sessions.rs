//! The relay's own database sessions.
//!
//! [`Relay::start`](crate::Relay::start) takes the service's pool but runs its statements on
//! connections of its own, opened with the same connect options, for three reasons:
//!
//! - **Plans that cannot degrade.** A relay that comes back after an outage meets a backlog
//!   written moments ago: no planner statistics, no visibility map. Without statistics the
//!   planner takes the claim's candidates for a few hundred rows, reads the *whole* backlog
//!   through a bitmap scan and sorts it to return the first batch, and its cost estimate is high
//!   enough to JIT-compile the statement: measured on a fresh 300,000-row backlog, 1,034 ms per
//!   claim of 5,000 (677 ms of it JIT), against 8 ms once analyzed. The relay's sessions run with
//!   `enable_seqscan = off` and `enable_bitmapscan = off`, so the relay's tables are read through
//!   index scans only: "the lowest pending ids" walk the primary key in order and stop after the
//!   batch, held rows are found through their own indexes; and `jit = off`: 8 ms on the same
//!   fresh backlog. (`enable_sort = off` fixed the claim too, but made the lookup of due held
//!   messages below the floor walk the primary key over everything completed since the last
//!   vacuum, to avoid a sort of a handful of rows: the chaos scenario with 10,000 held keys
//!   caught it.) Every relay statement reads a batch or a few rows, so the settings fit them all;
//!   they never reach the service's sessions.
//! - **Every statement bounded.** `statement_timeout` is the lease term: a statement blocked
//!   longer (a lock a writer holds) is of no use to a holder that must renew or step down.
//! - **No ping per statement.** sqlx pings a pooled connection before handing it out; the
//!   relay runs a few statements per batch, so at light traffic the pings were a round trip
//!   per statement. A broken connection shows as the statement's error instead, which the
//!   relay retries anyway.
//!
//! These are session settings, and the relay LISTENs and caches prepared statements: its
//! sessions must be its own from connect to close. A direct connection or a pooler in session
//! mode gives that; a pooler in transaction mode (PgBouncer's `pool_mode = transaction`) hands
//! each transaction to any server connection, where the settings would reach other clients'
//! transactions and notifications would be lost. So before its first session is set up, the
//! relay checks ([`outbox::pooler::transaction_pooled`]) and refuses such a pooler with
//! [`TransactionPooled`], re-checking on each later connect until it is fixed.
//!
//! The sessions are named `outbox-relay` (`application_name`, unless the service's options set
//! one), so `pg_stat_activity` shows which they are. They run the service's connect options, not
//! its `after_connect` hooks; the relay names its schema in every statement.

use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor as _, PgConnection, PgPool, Postgres};

use crate::health::Health;

/// At most this many: the listener, the lease keeper, the pipeline's claim and decisions, the
/// completion in flight, the health monitor and cleanup, with room for one being replaced.
const MAX_CONNECTIONS: u32 = 8;

/// The relay's connections go through a pooler in transaction mode.
#[derive(Debug, thiserror::Error)]
#[error("the relay's connections go through a pooler in transaction mode (PgBouncer pool_mode = transaction): its sessions would not be its own, so its session settings would reach other clients and LISTEN would miss notifications; connect the relay directly or through a pool in session mode (docs/operations.md, \"PgBouncer\")")]
pub struct TransactionPooled;

/// A lazily connecting pool of relay sessions on `pool`'s database; it connects only where
/// [`outbox::pooler::transaction_pooled`] finds sessions of its own, and tells `health` otherwise.
pub(crate) fn pool(pool: &PgPool, statement_timeout: Duration, health: Arc<Health>) -> PgPool {
    let mut options = pool.connect_options().as_ref().clone();
    if options.get_application_name().is_none() {
        options = options.application_name("outbox-relay");
    }
    let settings = format!(
        "SET jit = off; SET enable_seqscan = off; SET enable_bitmapscan = off; SET statement_timeout = '{}ms'",
        statement_timeout.as_millis().max(1)
    );
    // Checked once it passes; until then, before every new session.
    let checked = Arc::new(tokio::sync::Mutex::new(false));
    let probe_options = options.clone();
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .test_before_acquire(false)
        .acquire_timeout(statement_timeout)
        .after_connect(move |conn, _| {
            let settings = settings.clone();
            let (checked, options, health) =
                (checked.clone(), probe_options.clone(), health.clone());
            Box::pin(async move {
                let mut checked = checked.lock().await;
                if !*checked {
                    if outbox::pooler::transaction_pooled(&options).await? {
                        health.session_problem(Some(TransactionPooled.to_string()));
                        return Err(sqlx::Error::Configuration(Box::new(TransactionPooled)));
                    }
                    health.session_problem(None);
                    *checked = true;
                }
                drop(checked);
                // No arguments: one simple-protocol query, all three settings in one round trip.
                conn.execute(settings.as_str()).await?;
                Ok(())
            })
        })
        .connect_lazy_with(options)
}

/// A session kept between statements by a task that runs one after another (the pipeline's
/// claims, the completions): taking a connection from the pool and giving it back per statement
/// costs a task spawned and a thread woken each time, which at light traffic was a large part of
/// the relay's CPU per message. After an error it is dropped, so a broken one is replaced.
pub(crate) struct Kept {
    pool: PgPool,
    conn: Option<PoolConnection<Postgres>>,
    /// Counts the connections taken: tells whether two statements ran on the same one.
    generation: u64,
}

impl Kept {
    pub(crate) fn new(pool: PgPool) -> Kept {
        Kept {
            pool,
            conn: None,
            generation: 0,
        }
    }

    /// The kept connection, taking one from the pool if there is none.
    pub(crate) async fn conn(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        if self.conn.is_none() {
            let conn = self.pool.acquire().await?;
            self.generation += 1;
            return Ok(&mut **self.conn.insert(conn));
        }
        self.conn.as_deref_mut().ok_or(sqlx::Error::PoolClosed)
    }

    /// Which connection is kept: the same value later means the same session, so the same
    /// server (a failover in between breaks the session).
    pub(crate) fn session(&self) -> Option<u64> {
        self.conn.as_ref().map(|_| self.generation)
    }

    /// Passes `result` on; after an error the connection is not kept.
    pub(crate) fn checked<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}
