//! The lease: which relay may publish, decided in the database with the database clock.
//!
//! One row per lease name holds the holder, a fencing token and an expiry. A relay acquires the
//! row only when it is free or expired, which increments the token. The holder renews every
//! `lease_renew_interval` (at most a third of the TTL, so two renewals can fail before expiry),
//! and renewal succeeds only for an unexpired term of its own: once expired it steps down
//! rather than extend a term another relay may already have taken over.
//!
//! Locally the holder keeps a conservative deadline: the instant it *sent* the acquiring or
//! renewing statement plus the remaining time the database reported. The database's expiry is
//! never earlier than that, so a holder that trusts only its local deadline never acts after the
//! database considers it expired (clock rates being equal). Every statement that changes
//! messages also carries the fence (`holder`, `token`, unexpired) and is a no-op otherwise.
//!
//! A standby sleeps until the current term would expire, or until a holder announces a clean
//! release, then tries again.

use std::sync::Arc;
use std::time::Duration;

use crate::postgres::{Fence, Fenced, LeaseState, Statements};
use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics as m;

/// A term during which this relay holds the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Term {
    pub(crate) fence: Fence,
    /// Local instant before which the database surely still considers the lease ours.
    pub(crate) deadline: Instant,
}

impl Term {
    /// Whether the lease is certainly still ours for at least `margin`.
    pub(crate) fn valid_for(&self, margin: Duration) -> bool {
        Instant::now() + margin < self.deadline
    }
}

pub(crate) struct LeaseKeeper {
    pub(crate) pool: PgPool,
    pub(crate) statements: Arc<Statements>,
    pub(crate) lease: String,
    pub(crate) holder: String,
    pub(crate) ttl: Duration,
    pub(crate) renew_interval: Duration,
    /// Woken when a holder releases the lease.
    pub(crate) released: Arc<Notify>,
    pub(crate) term: watch::Sender<Option<Term>>,
    pub(crate) health: Arc<Health>,
}

impl LeaseKeeper {
    /// Acquires, renews and, on cancellation, releases the lease.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        loop {
            let wait = match self.current() {
                None => self.try_acquire().await,
                Some(term) => self.renew(term).await,
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
                _ = self.released.notified(), if self.current().is_none() => {}
            }
        }
        if let Some(term) = self.set_term(None) {
            self.release(&term.fence).await;
        }
    }

    /// Publishes a new term (or none), keeping health and metrics in step.
    fn set_term(&self, term: Option<Term>) -> Option<Term> {
        let held = term.is_some();
        let previous = self.term.send_replace(term);
        self.health.leader(held);
        m::lease_held(&self.lease, held);
        previous
    }

    fn current(&self) -> Option<Term> {
        self.term.borrow().clone()
    }

    /// Returns how long to wait before the next attempt.
    async fn try_acquire(&self) -> Duration {
        let sent = Instant::now();
        let result = async {
            let mut conn = self.pool.acquire().await?;
            self.statements
                .lease_acquire(&mut conn, &self.lease, &self.holder, self.ttl)
                .await
        }
        .await;
        match result {
            Ok(LeaseState::Held { token, remaining }) => {
                self.health.lease_problem(None);
                tracing::info!(lease = %self.lease, holder = %self.holder, token, "acquired the lease; publishing");
                let fence = Fence {
                    lease: self.lease.clone(),
                    holder: self.holder.clone(),
                    token,
                };
                self.health.database(true);
                m::lease_acquired(&self.lease);
                self.set_term(Some(Term {
                    fence,
                    deadline: sent + remaining,
                }));
                self.renew_interval
            }
            Ok(LeaseState::OtherLease { lease, holder }) => {
                tracing::error!(
                    lease = %self.lease, other_lease = %lease, %holder,
                    "another relay publishes this outbox under another lease name; not taking \
                     this one while it is held (two lease names would publish every message \
                     twice): give all relays of one outbox the same lease_name"
                );
                self.health.database(true);
                self.health.lease_problem(Some(format!(
                    "lease {:?} is not taken: relay {holder:?} holds lease {lease:?} on the same outbox; use one lease_name per outbox",
                    self.lease
                )));
                self.renew_interval
            }
            Ok(LeaseState::HeldByOther { holder, remaining }) => {
                tracing::debug!(lease = %self.lease, %holder, ?remaining, "standing by");
                self.health.database(true);
                // Try again right after the term would expire, but never sleep longer than a
                // renewal interval (the holder may have released without our notice).
                (remaining + Duration::from_millis(20)).min(self.renew_interval)
            }
            Err(error) => {
                self.health
                    .database(matches!(error, sqlx::Error::Database(_)));
                tracing::warn!(lease = %self.lease, %error, "cannot acquire the lease");
                self.renew_interval
            }
        }
    }

    async fn renew(&self, term: Term) -> Duration {
        let sent = Instant::now();
        let result = async {
            let mut conn = self.pool.acquire().await?;
            self.statements
                .lease_renew(&mut conn, &term.fence, self.ttl)
                .await
        }
        .await;
        match result {
            Ok(Fenced::Done(remaining)) => {
                self.health.database(true);
                self.term.send_replace(Some(Term {
                    fence: term.fence,
                    deadline: sent + remaining,
                }));
                self.renew_interval
            }
            Ok(Fenced::LeaseLost) => {
                tracing::warn!(lease = %self.lease, token = term.fence.token, "lost the lease; stepping down");
                m::lease_lost(&self.lease);
                self.set_term(None);
                Duration::ZERO
            }
            Err(error) if term.valid_for(Duration::ZERO) => {
                self.health.database(false);
                tracing::warn!(lease = %self.lease, %error, "cannot renew the lease; retrying until it would expire");
                // Retry soon: the term is only good until its deadline.
                (self.renew_interval / 4).max(Duration::from_millis(50))
            }
            Err(error) => {
                tracing::warn!(lease = %self.lease, %error, "the lease expired while the database was unreachable; stepping down");
                self.health.database(false);
                m::lease_lost(&self.lease);
                self.set_term(None);
                self.renew_interval
            }
        }
    }

    async fn release(&self, fence: &Fence) {
        let result = async {
            let mut conn = self.pool.acquire().await?;
            self.statements.lease_release(&mut conn, fence).await
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(lease = %self.lease, token = fence.token, "released the lease")
            }
            Err(error) => {
                tracing::warn!(lease = %self.lease, %error, "could not release the lease; it expires on its own")
            }
        }
    }
}
