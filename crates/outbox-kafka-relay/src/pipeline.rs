//! Claim → publish → complete, while this relay holds the lease.

use std::sync::Arc;
use std::time::Duration;

use crate::postgres::{Completed, Fenced, FloorTracker, PendingMessage, Skip, Statements};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::PoisonPolicy;
use crate::config::{Completion, Delivery, RelayConfig};
use crate::exactly_once::{Progress, Transactions};
use crate::health::Health;
use crate::in_flight::{message_bytes, BatchWait, InFlight, Settled, Waiting};
use crate::kafka::{DeliveryError, ErrorClass, Publisher};
use crate::lease::Term;
use crate::metrics as m;
use crate::sessions::Kept;
use crate::wakeup::Wakeups;
use crate::RelayError;

/// How long before its local deadline a term stops being used to start a batch: a batch
/// claimed this close to expiry would likely be completed by nobody but the next holder.
const TERM_MARGIN: Duration = Duration::from_millis(50);

pub(crate) struct Pipeline {
    pub(crate) pool: PgPool,
    /// The claims' and idle flag's session, and the completions' (moved into the completion
    /// task while one runs).
    pub(crate) session: Kept,
    pub(crate) completer: Option<Kept>,
    pub(crate) statements: Arc<Statements>,
    pub(crate) config: RelayConfig,
    pub(crate) publisher: Publisher,
    pub(crate) term: watch::Receiver<Option<Term>>,
    pub(crate) wakeups: Arc<Wakeups>,
    pub(crate) health: Arc<Health>,
    /// What this relay last told writers (`relay_lease.idle`): while busy, they skip NOTIFY.
    pub(crate) idle: bool,
    /// When this relay last set (or, its role lacking the privilege, tried to set) the busy
    /// mark ahead in this busy spell (migration 0018).
    pub(crate) busy_marked_at: Option<Instant>,
    /// The mark may be ahead: a statement set it (even one that failed, as the mark is not
    /// transactional) and none reset it since.
    pub(crate) mark_maybe_ahead: bool,
    /// Warn once when the role may not set the mark.
    pub(crate) mark_warning: bool,
    /// Consecutive empty claims while idle, for the short grace polls after going idle.
    pub(crate) idle_rounds: u32,
    /// The lease term the flags above belong to.
    pub(crate) term_token: Option<i64>,
    /// The previous batch's completion, running while the next batch is claimed and published.
    pub(crate) completing: Option<Completing>,
    /// Candidates for raising the claim floor, from this term's claims.
    pub(crate) floor: FloorTracker,
    /// When the floor last rose, and whether the last claim filled a batch: raising the floor
    /// is a write (a commit), so without a backlog it is done at most every `FLOOR_INTERVAL`.
    pub(crate) floor_raised_at: Instant,
    pub(crate) backlog: bool,
    /// Exactly-once: whether the next claim may take messages that failed before and are due
    /// again; claims alternate (see `exactly_once`).
    pub(crate) retries_turn: bool,
    /// The id sequence's last value read by the latest claim that found messages.
    pub(crate) claimed_last_id: Option<i64>,
    /// The WAL position the latest claim that found messages read, and the session it ran on
    /// (see `RelayConfig::wait_for_standbys`).
    pub(crate) claimed_wal_lsn: i64,
    pub(crate) claimed_session: Option<u64>,
    /// Messages handed to the producer and not yet decided, across batches.
    pub(crate) in_flight: InFlight,
    /// Exactly-once delivery's state (see the `exactly_once` module).
    pub(crate) transactions: Transactions,
    /// How long a batch usually takes to be acknowledged (a moving average).
    pub(crate) typical_ack: Duration,
    /// After a batch that was not full: the next claim waits until then (`batch_linger`).
    pub(crate) next_claim_at: Option<Instant>,
}

/// A batch is waited for until it is acknowledged; after this many times the usual time (at
/// least `MIN_BATCH_WAIT`) only until the rest are stragglers, and after this many times that
/// not at all (see `InFlight::settle_batch`). What is still unacknowledged then stays in flight
/// while later batches go on, and holds back only its own keys.
const BATCH_WAIT_FACTOR: u32 = 4;
const MIN_BATCH_WAIT: Duration = Duration::from_millis(5);
/// At most this many batches' worth of messages in flight: beyond it the relay waits for
/// acknowledgements before it claims more.
pub(crate) const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// Polls of the standbys' positions: first after this, doubling up to `STANDBY_POLL_MAX`
/// (a standby on the same network flushes within a millisecond or so); health reports a wait
/// longer than `STANDBY_REPORT_AFTER`.
const STANDBY_POLL_FIRST: Duration = Duration::from_micros(250);
const STANDBY_POLL_MAX: Duration = Duration::from_millis(50);
const STANDBY_REPORT_AFTER: Duration = Duration::from_secs(1);

/// How often the claim floor rises while batches are not full.
const FLOOR_INTERVAL: Duration = Duration::from_secs(1);

/// A completion statement in flight for acknowledged messages. Until it has settled, claims
/// skip these ids (they may or may not be visible as completed yet); skipping acknowledged
/// messages keeps the ordering argument intact, a high-water mark would not.
pub(crate) struct Completing {
    /// In sequence order.
    ids: Vec<i64>,
    /// With exactly-once delivery, their transaction's batch number.
    batch: Option<i64>,
    /// The id sequence's last value read by the claim of this batch, for the floor candidate.
    claimed_last_id: Option<i64>,
    task: tokio::task::JoinHandle<(Kept, Result<Fenced<Completed>, sqlx::Error>)>,
}

pub(crate) enum Step {
    /// Claim again at once (work was found, or the idle flag was just set).
    More,
    /// Idle and nothing found: wait for a wake-up or a poll.
    Idle,
    /// Something failed: back off before trying again.
    Failed,
    /// The lease was lost or not held.
    NotLeader,
}

impl Pipeline {
    pub(crate) async fn run(mut self, cancel: CancellationToken) -> Result<(), RelayError> {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        while !cancel.is_cancelled() {
            let term = self.term.borrow_and_update().clone();
            let step = match term {
                Some(term) if term.valid_for(TERM_MARGIN) => {
                    if self.term_token != Some(term.fence.token) {
                        // Acquiring the lease cleared the idle flag and the claim floor.
                        self.term_token = Some(term.fence.token);
                        self.idle = false;
                        self.busy_marked_at = None;
                        self.floor = FloorTracker::default();
                        self.claimed_last_id = None;
                    }
                    self.step(&term, &cancel).await
                }
                _ => Step::NotLeader,
            };
            match step {
                Step::More => {
                    backoff.reset();
                    self.idle_rounds = 0;
                }
                Step::Idle => {
                    backoff.reset();
                    // A writer whose transaction read `idle = false` just before we set it may
                    // commit after our last claim without notifying: poll soon a few times
                    // (25 ms, 100 ms, 400 ms) before relying on NOTIFY and the fallback poll.
                    let grace =
                        Duration::from_millis(25) * 4u32.saturating_pow(self.idle_rounds.min(8));
                    self.idle_rounds += 1;
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = self.wakeups.messages.notified() => {}
                        _ = tokio::time::sleep(grace.min(self.config.poll_interval)) => {}
                        _ = self.term.changed() => {}
                        _ = self.in_flight.next_settled(), if self.in_flight.unsettled() => {}
                    }
                }
                Step::Failed => {
                    m::retry();
                    let delay = backoff.next_delay();
                    tracing::debug!(?delay, "backing off");
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Step::NotLeader => {
                    // Whatever is still in flight was sent under a term that is over.
                    if !self.in_flight.is_empty() {
                        self.publisher.purge();
                        self.in_flight.forget();
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        // The keeper publishes every renewal and every change of holder.
                        changed = self.term.changed() => if changed.is_err() { break },
                    }
                }
            }
            if !matches!(step, Step::More) {
                // Before waiting, let the completion in flight land.
                self.settle_completion().await;
            }
            self.replace_failed_producer()?;
        }
        // Let what is in flight be acknowledged and completed, but not for longer than a
        // shutdown may take: what is not completed is published again by the next holder.
        let deadline = Instant::now() + self.config.shutdown_timeout;
        let term = self.term.borrow().clone();
        let _ = tokio::time::timeout_at(deadline, async {
            while self.in_flight.unsettled() {
                self.in_flight.next_settled().await;
            }
            if let Some(term) = term.filter(|t| t.valid_for(Duration::ZERO)) {
                self.decide(&term).await;
            }
            self.settle_completion().await;
        })
        .await;
        self.publisher.purge();
        Ok(())
    }

    /// A fatal producer error (e.g. a broken gapless guarantee) makes the producer unusable:
    /// replace it. What it had in flight settles as not attempted and is claimed again.
    fn replace_failed_producer(&mut self) -> Result<(), RelayError> {
        if let Some(reason) = self.publisher.fatal_error() {
            tracing::error!(%reason, "the Kafka producer failed fatally; creating a new one");
            self.publisher.renew().map_err(RelayError::Kafka)?;
            // A transactional one must be initialised (and the progress read) again.
            self.transactions.reinitialize();
        }
        Ok(())
    }

    async fn step(&mut self, term: &Term, cancel: &CancellationToken) -> Step {
        let exactly_once = self.config.delivery == Delivery::ExactlyOnce;
        if exactly_once {
            if let Some(step) = self.ready_for_transactions(term).await {
                return step;
            }
        }
        // Messages of earlier batches acknowledged (or failed) since: decide them first, so
        // that the claim sees their completion in flight and their failures held.
        if let Some(step) = self.decide(term).await {
            return step;
        }
        if self.in_flight.len() >= MAX_BATCHES_IN_FLIGHT * self.config.batch_size
            || self.in_flight.bytes() >= MAX_BATCHES_IN_FLIGHT * self.config.max_batch_bytes
        {
            tracing::debug!(
                in_flight = self.in_flight.len(),
                "waiting for acknowledgements before claiming more"
            );
            return self.wait_for_acks(term, cancel).await;
        }
        if let Some(at) = self.next_claim_at.take() {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = cancel.cancelled() => return Step::More,
            }
        }
        let started = Instant::now();
        let batch = match self.claim_in_turn(term).await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "cannot claim messages");
                // An error the database returned (say, an unmigrated schema) is no outage.
                self.health
                    .database(matches!(error, sqlx::Error::Database(_)));
                return Step::Failed;
            }
        };
        let claimed_at = Instant::now();
        self.health.database(true);
        if batch.is_empty() {
            if let Some(step) = self.settle_completion().await {
                return step;
            }
            if self.in_flight.is_empty() {
                self.health.progress(false);
            }
            // Idle, unless a failed statement may have left the mark ahead: writers would not
            // wake us, so going idle again resets it.
            if self.idle && !self.mark_maybe_ahead {
                return Step::Idle;
            }
            // Going idle: ask writers to notify, then claim once more, so that a commit that
            // happened before the flag was visible is not left waiting. (Polling at the linger
            // through a lull instead, ten lingers before going idle, saved a fifth of the relay's
            // CPU at a steady 500 msg/s, but with 10,000 held keys and a trickle of traffic its
            // empty claims took enough of the two cores to quadruple the healthy messages' p50:
            // 4 -> 15 ms in the hostile-writers chaos scenario.)
            return match self.set_idle(term, true).await {
                Ok(()) => Step::More,
                Err(error) => {
                    tracing::warn!(%error, "cannot update the idle flag");
                    Step::Failed
                }
            };
        }
        // Busy: say so, and keep the mark ahead while it lasts (a third of a lease term before
        // it would lapse, like the lease's renewal).
        let mark_due = self
            .busy_marked_at
            .is_none_or(|at| at.elapsed() >= self.config.lease_ttl / 3);
        if self.idle || mark_due {
            if let Err(error) = self.set_idle(term, false).await {
                tracing::warn!(%error, "cannot update the idle flag");
            }
        }
        if !self.backlog {
            // Let the next batch fill for a moment: fewer claims and completions per message.
            self.next_claim_at = Some(started + self.config.batch_linger);
        }
        if self.config.wait_for_standbys > 0 {
            if let Some(step) = self.wait_for_standbys(term, cancel).await {
                return step;
            }
        }
        // The claim may have taken long (a slow database); never start publishing on a term
        // that could have ended meanwhile.
        if !self.term_still_valid(term) {
            return Step::NotLeader;
        }
        if exactly_once {
            return self.publish_exactly_once(term, batch, claimed_at).await;
        }
        self.publisher
            .send(batch, claimed_at, &mut self.in_flight, false)
            .await;
        let wait = (self.typical_ack * BATCH_WAIT_FACTOR).max(MIN_BATCH_WAIT);
        let deadline = claimed_at + wait;
        // On shutdown, what is still in flight is waited for at the end of `run`, within the
        // shutdown timeout.
        let acked = {
            let lease_lost = lease_lost(self.term.clone(), term.clone());
            tokio::select! {
                acked = self.in_flight.settle_batch(deadline, MIN_BATCH_WAIT, claimed_at + wait * BATCH_WAIT_FACTOR) => Some(acked),
                _ = lease_lost => None,
                _ = cancel.cancelled() => Some((BatchWait::GaveUp, None)),
            }
        };
        match acked {
            None => {
                tracing::warn!("lost the lease with messages in flight; abandoning them");
                return Step::NotLeader;
            }
            Some((BatchWait::Acknowledged, _)) => self.learn_ack_time(claimed_at.elapsed()),
            Some((_, settled_at)) => {
                // Until the last acknowledgement before the rest stalled: how long a batch takes.
                if let Some(settled_at) = settled_at {
                    self.learn_ack_time(settled_at.duration_since(claimed_at));
                }
                self.publisher.refresh_topics();
                tracing::debug!(
                    in_flight = self.in_flight.len(),
                    ?wait,
                    "part of the batch is not acknowledged yet; its keys wait, others go on"
                );
            }
        }
        self.decide(term).await.unwrap_or(Step::More)
    }

    /// Waits until `wait_for_standbys` standbys have flushed the WAL up to the position the
    /// batch just claimed read: then every message of the batch is committed on them, and a
    /// failover to one of them keeps it (the crate docs, "Failover"). `Some(step)` drops the
    /// batch instead (the term ended, the database failed, shutdown): it was not sent, so it
    /// stays pending and is claimed again. The position and the standbys' are compared on the
    /// claim's own session, so on one server: when that session is gone (an error since, a
    /// failover), the batch is dropped, never checked against another server's standbys.
    async fn wait_for_standbys(&mut self, term: &Term, cancel: &CancellationToken) -> Option<Step> {
        let started = Instant::now();
        let step = self.standbys_confirm(term, cancel, started).await;
        // Whatever ended the wait, it is no longer what the relay waits for.
        self.health.standby_problem(None);
        if step.is_none() {
            m::standby_wait(started.elapsed());
        }
        step
    }

    async fn standbys_confirm(
        &mut self,
        term: &Term,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Option<Step> {
        let (needed, standbys) = (self.claimed_wal_lsn, self.config.wait_for_standbys);
        let mut pause = STANDBY_POLL_FIRST;
        let mut reported = false;
        loop {
            if self.session.session().is_none() || self.session.session() != self.claimed_session {
                tracing::debug!("the claim's session is gone; claiming the batch again");
                return Some(Step::Failed);
            }
            let flushed = match self.session.conn().await {
                Ok(conn) => {
                    self.statements
                        .standbys_flushed(conn, standbys, &self.config.standby_names)
                        .await
                }
                Err(error) => Err(error),
            };
            match self.session.checked(flushed) {
                Ok((Some(flushed), _)) if flushed >= needed => return None,
                Ok((flushed, hidden)) => {
                    if started.elapsed() >= STANDBY_REPORT_AFTER {
                        let reason = match (flushed, hidden) {
                            (Some(_), _) => format!("waiting for {standbys} standby(s) to flush the WAL of the next batch (wait_for_standbys)"),
                            (None, 0) => format!("waiting for {standbys} streaming standby(s): fewer are connected (wait_for_standbys)"),
                            (None, hidden) => format!("waiting for {standbys} streaming standby(s): {hidden} hide their position from the relay's role, which needs pg_monitor (wait_for_standbys)"),
                        };
                        if !reported {
                            tracing::warn!("{reason}");
                            reported = true;
                        }
                        self.health.standby_problem(Some(reason));
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the standbys' positions");
                    self.health.database(false);
                    return Some(Step::Failed);
                }
            }
            if !self.term_still_valid(term) {
                return Some(Step::NotLeader);
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = cancel.cancelled() => return Some(Step::More),
            }
            pause = (pause * 2).min(STANDBY_POLL_MAX);
        }
    }

    /// A moving average over the last few batches of how long one takes to be acknowledged.
    fn learn_ack_time(&mut self, took: Duration) {
        self.typical_ack = (self.typical_ack * 7 + took) / 8;
    }

    /// Waits until some message in flight is acknowledged (or the term ends).
    async fn wait_for_acks(&mut self, term: &Term, cancel: &CancellationToken) -> Step {
        let lease_lost = lease_lost(self.term.clone(), term.clone());
        tokio::pin!(lease_lost);
        tokio::select! {
            _ = self.in_flight.next_settled() => Step::More,
            _ = &mut lease_lost => Step::NotLeader,
            _ = cancel.cancelled() => Step::More,
        }
    }

    async fn set_idle(&mut self, term: &Term, idle: bool) -> Result<(), sqlx::Error> {
        // The mark changes as the statement runs, committed or not: until a later statement
        // resets it, it may be ahead, whatever the outcome here.
        self.mark_maybe_ahead |= !idle;
        let conn = self.session.conn().await?;
        let result = self
            .statements
            .lease_set_idle(conn, &term.fence, idle, self.config.lease_ttl)
            .await;
        let marked = self.session.checked(result)?;
        if marked == Some(false) && std::mem::take(&mut self.mark_warning) {
            tracing::warn!(
                schema = %self.config.schema,
                "the relay's role may not update relay_busy_until: writers run the wake-up \
                 trigger's function at every statement (grant UPDATE on that sequence to the \
                 relay's role, and to no writer, to spare them)"
            );
        }
        self.idle = idle;
        self.busy_marked_at = (!idle).then(Instant::now);
        self.mark_maybe_ahead &= !idle;
        Ok(())
    }

    /// The next batch: the lowest pending sequences, skipping the previous batch's messages
    /// while their completion is in flight; a prefix, in sequence order, of what is pending and
    /// not yet acknowledged. `hold_keys_in_flight`: also skipping the keys (and stalled topics)
    /// of unacknowledged messages; a claim that adds to an open Kafka transaction does not,
    /// as the transaction commits all of its records or none.
    /// The next batch. At least once, anything claimable. Exactly once, every other claim leaves
    /// out the messages that failed before and are due again (unless nothing else is pending):
    /// they go in transactions apart, and otherwise claims of them alone, lowest ids first,
    /// could fill every batch while they keep coming due.
    async fn claim_in_turn(&mut self, term: &Term) -> Result<Vec<PendingMessage>, sqlx::Error> {
        if self.config.delivery == Delivery::AtLeastOnce {
            return self.claim(term, true, false).await;
        }
        self.retries_turn = !self.retries_turn;
        if self.retries_turn {
            return self.claim(term, true, false).await;
        }
        let batch = self.claim(term, true, true).await?;
        match batch.is_empty() {
            true => self.claim(term, true, false).await,
            false => Ok(batch),
        }
    }

    pub(crate) async fn claim(
        &mut self,
        term: &Term,
        hold_keys_in_flight: bool,
        without_retries: bool,
    ) -> Result<Vec<PendingMessage>, sqlx::Error> {
        let mut skip: Vec<i64> = self.in_flight.ids().collect();
        if let Some(completing) = &self.completing {
            skip.extend_from_slice(&completing.ids);
        }
        let waiting = match hold_keys_in_flight {
            true => self.in_flight.waiting(),
            false => Waiting::default(),
        };
        let request = self
            .floor
            .request(self.backlog || self.floor_raised_at.elapsed() >= FLOOR_INTERVAL);
        let conn = self.session.conn().await?;
        let claimed = self
            .statements
            .claim(
                conn,
                self.config.batch_size as i64,
                self.config.max_batch_bytes as i64,
                &Skip {
                    ids: &skip,
                    topics: &waiting.topics,
                    keys: &waiting.keys,
                    keyless_topics: &waiting.keyless_topics,
                    stalled_topics: &waiting.stalled_topics,
                    retries: without_retries,
                },
                request,
                &term.fence,
            )
            .await;
        let claimed = self.session.checked(claimed)?;
        self.floor.claimed(request);
        if let Some(horizon) = &claimed.horizon {
            if self.floor.observe(horizon, request.candidate) {
                self.floor_raised_at = Instant::now();
            }
            self.claimed_last_id = horizon.last_id;
            self.claimed_wal_lsn = horizon.wal_lsn;
            self.claimed_session = self.session.session();
        }
        let batch = claimed.messages;
        self.backlog = batch.len() >= self.config.batch_size
            || batch.iter().map(message_bytes).sum::<usize>() >= self.config.max_batch_bytes;
        Ok(batch)
    }

    /// Completes acknowledged messages in the background, after the previous completion (with
    /// exactly-once delivery, those of transaction `batch`).
    pub(crate) fn start_completion(
        &mut self,
        term: &Term,
        delivered: Vec<i64>,
        batch: Option<i64>,
    ) {
        let delete = matches!(self.config.completion, Completion::Delete);
        let (statements, fence) = (self.statements.clone(), term.fence.clone());
        let mut kept = self
            .completer
            .take()
            .unwrap_or_else(|| Kept::new(self.pool.clone()));
        let ids = delivered.clone();
        let task = tokio::spawn(async move {
            // A kept connection may have been closed under it (a terminated backend, a
            // restarted server): on a connection's failure, once more on a new one. The
            // completion is idempotent; a batch left uncompleted would be published again.
            let mut result = Err(sqlx::Error::PoolClosed);
            for _ in 0..2 {
                result = match kept.conn().await {
                    Ok(conn) => {
                        statements
                            .complete(conn, &delivered, delete, batch, &fence)
                            .await
                    }
                    Err(error) => Err(error),
                };
                result = kept.checked(result);
                if !matches!(&result, Err(error) if connection_failed(error)) {
                    break;
                }
            }
            (kept, result)
        });
        // This batch's claim returned before the completion began, so its last value pairs with
        // the completion's transaction id; a later claim's would not.
        self.completing = Some(Completing {
            ids,
            batch,
            claimed_last_id: self.claimed_last_id,
            task,
        });
    }

    /// Waits for the completion in flight, if any. `Some(step)` when it did not take effect:
    /// its messages stay pending and are published again (duplicates, never a loss).
    pub(crate) async fn settle_completion(&mut self) -> Option<Step> {
        let Completing {
            ids,
            batch,
            claimed_last_id,
            task,
        } = self.completing.take()?;
        let count = ids.len();
        let result = task.await.map(|(kept, result)| {
            self.completer = Some(kept);
            result
        });
        match result {
            Ok(Ok(Fenced::Done(completed))) => {
                tracing::debug!(completed = completed.count, "published and completed");
                self.floor.completed(claimed_last_id, completed.xid);
                self.health.progress(true);
                None
            }
            Ok(Ok(Fenced::LeaseLost)) => {
                tracing::warn!(
                    count,
                    "lost the lease before completing; the next holder publishes these again"
                );
                Some(Step::NotLeader)
            }
            Ok(Err(error)) => {
                self.health.database(false);
                tracing::warn!(%error, count, "cannot mark delivered messages complete");
                self.completion_failed(ids, batch);
                Some(Step::Failed)
            }
            Err(error) => {
                tracing::error!(%error, count, "the completion task failed");
                self.completion_failed(ids, batch);
                Some(Step::Failed)
            }
        }
    }

    /// A completion did not take effect: its messages are published again (at least once), or
    /// (exactly once: Kafka committed them) completed before anything else.
    fn completion_failed(&mut self, ids: Vec<i64>, batch: Option<i64>) {
        match batch {
            Some(batch) => self.transactions.uncompleted(Progress::new(batch, &ids)),
            None => self.floor.uncovered(ids),
        }
    }

    pub(crate) fn term_still_valid(&self, term: &Term) -> bool {
        still_valid(&self.term, term)
    }

    /// Decides what has settled in flight: completes the delivered messages (in the
    /// background, after the previous completion) and holds or dead-letters the failed ones.
    /// `Some(step)` when the relay cannot go on at once.
    async fn decide(&mut self, term: &Term) -> Option<Step> {
        let mut settled = self.in_flight.take_settled();
        if !settled.suspects.is_empty() {
            // A refusal shared by a produce request (e.g. one record over the broker's size
            // limit fails its whole request): find the culprit by sending each again alone.
            if let Err(error) = self.replace_failed_producer() {
                tracing::error!(%error, "cannot create a Kafka producer");
                return Some(Step::Failed);
            }
            let suspects = std::mem::take(&mut settled.suspects);
            tracing::info!(
                count = suspects.len(),
                "a produce request was refused as a whole; sending its messages again one by one"
            );
            self.publisher
                .publish_alone(suspects, Instant::now(), &mut self.in_flight)
                .await;
            let alone = self.in_flight.take_settled();
            settled.delivered.extend(alone.delivered);
            settled.failed.extend(alone.failed);
            settled.dropped.extend(alone.dropped);
        }
        let Settled {
            delivered,
            failed,
            created_topics,
            dropped,
            ..
        } = settled;
        self.floor.uncovered(dropped);
        if !created_topics.is_empty() {
            // Their other messages were held as "does not exist": retry them now.
            self.publisher.topics_created(&created_topics);
            let released = async {
                let mut conn = self.pool.acquire().await?;
                self.statements
                    .release_topics(&mut conn, &created_topics, &term.fence)
                    .await
            }
            .await;
            if let Err(error) = released {
                tracing::warn!(%error, "cannot release the messages of created topics");
            }
        }
        if !delivered.is_empty() {
            // One completion in flight at a time: the previous one lands first. If it did not
            // take effect, its messages stay pending and go out again (duplicates of
            // acknowledged messages); so do these, as the relay backs off or steps down.
            if let Some(step) = self.settle_completion().await {
                let ids = delivered.iter().map(|(m, _)| m.id);
                self.floor
                    .uncovered(ids.chain(failed.iter().map(|(m, _)| m.id)));
                return Some(step);
            }
            record_published(&delivered);
            self.start_completion(term, delivered.iter().map(|(m, _)| m.id).collect(), None);
        }
        if failed.is_empty() {
            return None;
        }
        match self.handle_failures(term, &failed).await {
            // The failed messages (and their keys) are held; the rest flows on at once.
            Ok(Fenced::Done(())) => None,
            Ok(Fenced::LeaseLost) => Some(Step::NotLeader),
            Err(error) => {
                tracing::warn!(%error, "cannot record delivery failures");
                self.health.database(false);
                self.floor.uncovered(failed.iter().map(|(m, _)| m.id));
                Some(Step::Failed)
            }
        }
    }

    /// Holds each failed message for its backoff, or dead-letters it (permanent errors under
    /// the dead-letter policy).
    pub(crate) async fn handle_failures(
        &self,
        term: &Term,
        failed: &[(PendingMessage, DeliveryError)],
    ) -> Result<Fenced<()>, sqlx::Error> {
        let mut held = Vec::new();
        let mut dead = Vec::new();
        for (message, error) in failed {
            let id = &message.id;
            let class = error.class();
            m::failed(&message.topic, class == ErrorClass::Retriable);
            if error.not_authorized() {
                self.health.not_authorized(&message.topic);
            }
            let key = message.key.as_deref().map(String::from_utf8_lossy);
            if class == ErrorClass::Permanent
                && self.config.poison_policy == PoisonPolicy::DeadLetter
            {
                tracing::error!(sequence = id, topic = %message.topic, ?key, %error, "permanent delivery failure; moving the message to the dead-letter table");
                dead.push((*id, error.to_string()));
            } else {
                // What only an operator can change (a record Kafka refuses, a topic that does
                // not exist) is retried at the longest backoff at once: ten thousand such keys
                // must not keep the relay busy with retries that cannot succeed.
                let failures = match error.needs_an_operator() {
                    true => u32::MAX,
                    false => u32::try_from(message.attempts)
                        .unwrap_or(0)
                        .saturating_add(1),
                };
                let delay = Backoff::delay_after(
                    self.config.backoff_initial,
                    self.config.backoff_max,
                    failures,
                );
                let attempts = message.attempts.saturating_add(1);
                // Said once per message; its retries are logged at debug level.
                if message.attempts > 0 {
                    tracing::debug!(sequence = id, topic = %message.topic, ?key, attempts, %error, ?delay, "delivery failed again");
                } else if class == ErrorClass::Permanent {
                    tracing::error!(sequence = id, topic = %message.topic, ?key, %error, ?delay, "permanent delivery failure; the key is blocked until it succeeds (policy: block)");
                } else {
                    tracing::warn!(sequence = id, topic = %message.topic, ?key, %error, ?delay, "delivery failed; retrying the message, and holding later messages of its key");
                }
                held.push((*id, error.to_string(), delay));
            }
        }
        let mut conn = self.pool.acquire().await?;
        if !held.is_empty() {
            self.statements
                .record_failures(&mut conn, &held, &term.fence)
                .await?;
        }
        if !dead.is_empty() {
            match self
                .statements
                .dead_letter(&mut conn, &dead, &term.fence)
                .await?
            {
                Fenced::Done(count) => m::dead_lettered(count),
                Fenced::LeaseLost => return Ok(Fenced::LeaseLost),
            }
        }
        Ok(Fenced::Done(()))
    }
}

fn still_valid(watch: &watch::Receiver<Option<Term>>, term: &Term) -> bool {
    matches!(&*watch.borrow(), Some(current) if current.fence == term.fence && current.valid_for(Duration::ZERO))
}

/// Resolves when the term ends (lost, stepped down, or its deadline passed unrenewed).
async fn lease_lost(mut watch: watch::Receiver<Option<Term>>, term: Term) {
    loop {
        let deadline = match &*watch.borrow_and_update() {
            Some(current) if current.fence == term.fence => current.deadline,
            _ => return,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                if !still_valid(&watch, &term) { return }
            }
            changed = watch.changed() => if changed.is_err() { return },
        }
    }
}

/// Counts published messages per topic and records their latency from insert to ack.
pub(crate) fn record_published(delivered: &[(PendingMessage, Duration)]) {
    let mut run: Option<(&str, u64)> = None;
    for (message, since_claim) in delivered {
        m::publish_latency(message.age + *since_claim);
        #[cfg(feature = "otel")]
        crate::trace::record(message, *since_claim);
        run = match run {
            Some((topic, n)) if topic == message.topic => Some((topic, n + 1)),
            Some((topic, n)) => {
                m::published(topic, n);
                Some((&message.topic, 1))
            }
            None => Some((&message.topic, 1)),
        };
    }
    if let Some((topic, n)) = run {
        m::published(topic, n);
    }
}

/// Whether `error` is the connection's failure rather than the statement's: I/O, or the server
/// ending the session (SQLSTATE class 08, connection exception; 57P01-57P03, terminated by an
/// operator or a shutdown). Not 57014: a statement cancelled by its timeout is not retried.
fn connection_failed(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}
