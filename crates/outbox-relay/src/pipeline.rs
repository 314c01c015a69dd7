//! Claim → publish → complete, while this relay holds the lease.

use std::sync::Arc;
use std::time::Duration;

use outbox::postgres::{Completed, Fenced, FloorTracker, PendingMessage, Statements};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::PoisonPolicy;
use crate::config::{Completion, RelayConfig};
use crate::health::Health;
use crate::kafka::{classify, BatchOutcome, ErrorClass, Publisher};
use crate::lease::Term;
use crate::metrics as m;
use crate::wakeup::Wakeups;
use crate::RelayError;
use rdkafka::error::KafkaError;

/// How long before its local deadline a term stops being used to start a batch: a batch
/// claimed this close to expiry would likely be completed by nobody but the next holder.
const TERM_MARGIN: Duration = Duration::from_millis(50);

pub(crate) struct Pipeline {
    pub(crate) pool: PgPool,
    pub(crate) statements: Arc<Statements>,
    pub(crate) config: RelayConfig,
    pub(crate) publisher: Publisher,
    pub(crate) term: watch::Receiver<Option<Term>>,
    pub(crate) wakeups: Arc<Wakeups>,
    pub(crate) health: Arc<Health>,
    /// What this relay last told writers (`relay_lease.idle`): while busy, they skip NOTIFY.
    pub(crate) idle: bool,
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
    /// The id sequence's last value read by the latest claim that found messages.
    pub(crate) claimed_last_id: Option<i64>,
}

/// How often the claim floor rises while batches are not full.
const FLOOR_INTERVAL: Duration = Duration::from_secs(1);

/// A completion statement in flight for acknowledged messages. Until it has settled, claims
/// skip these ids (they may or may not be visible as completed yet); skipping acknowledged
/// messages keeps the ordering argument intact, a high-water mark would not.
pub(crate) struct Completing {
    /// In sequence order.
    ids: Vec<i64>,
    /// The id sequence's last value read by the claim of this batch, for the floor candidate.
    claimed_last_id: Option<i64>,
    task: tokio::task::JoinHandle<Result<Fenced<Completed>, sqlx::Error>>,
}

enum Step {
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
            if let Some(reason) = self.publisher.fatal_error() {
                tracing::error!(%reason, "the Kafka producer failed fatally; creating a new one");
                self.publisher = Publisher::new(&self.config.kafka, &self.config.source)
                    .map_err(RelayError::Kafka)?;
            }
        }
        // Let the last completion land, but not for longer than a shutdown may take: what it
        // does not complete is published again by the next holder.
        let _ = tokio::time::timeout(self.config.shutdown_timeout, self.settle_completion()).await;
        Ok(())
    }

    async fn step(&mut self, term: &Term, cancel: &CancellationToken) -> Step {
        let batch = match self.claim(term).await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::warn!(%error, "cannot claim messages");
                self.health.database(false);
                return Step::Failed;
            }
        };
        let claimed_at = Instant::now();
        self.health.database(true);
        if batch.is_empty() {
            if let Some(step) = self.settle_completion().await {
                return step;
            }
            self.health.progress(false);
            if self.idle {
                return Step::Idle;
            }
            // Going idle: ask writers to notify, then claim once more, so that a commit that
            // happened before the flag was visible is not left waiting.
            return match self.set_idle(term, true).await {
                Ok(()) => Step::More,
                Err(error) => {
                    tracing::warn!(%error, "cannot update the idle flag");
                    Step::Failed
                }
            };
        }
        if self.idle {
            if let Err(error) = self.set_idle(term, false).await {
                tracing::warn!(%error, "cannot update the idle flag");
            }
        }
        // The claim may have taken long (a slow database); never start publishing on a term
        // that could have ended meanwhile.
        if !self.term_still_valid(term) {
            return Step::NotLeader;
        }
        // Deliveries are always awaited to the end, so that whatever Kafka acknowledged is
        // completed. Losing the lease, or a shutdown that outlasts its timeout, purges the
        // producer instead, which fails the outstanding deliveries at once.
        let (outcome, lost) = {
            let shutdown_deadline = async {
                cancel.cancelled().await;
                tracing::info!(
                    in_flight = batch.len(),
                    "shutting down: waiting for in-flight deliveries"
                );
                tokio::time::sleep(self.config.shutdown_timeout).await;
            };
            let publish = self.publisher.publish(&batch);
            tokio::pin!(publish, shutdown_deadline);
            let mut purged = false;
            let mut lost = false;
            loop {
                tokio::select! {
                    outcome = &mut publish => break (outcome, lost),
                    _ = self.lease_lost(term), if !purged => {
                        tracing::warn!("lost the lease with a batch in flight; abandoning it");
                        self.publisher.purge();
                        (purged, lost) = (true, true);
                    }
                    _ = &mut shutdown_deadline, if !purged => {
                        tracing::warn!("in-flight deliveries outlasted the shutdown timeout; they stay pending");
                        self.publisher.purge();
                        purged = true;
                    }
                }
            }
        };
        if lost {
            return Step::NotLeader;
        }
        self.finish(term, &batch, claimed_at, outcome).await
    }

    async fn set_idle(&mut self, term: &Term, idle: bool) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        self.statements
            .lease_set_idle(&mut conn, &term.fence, idle)
            .await?;
        self.idle = idle;
        Ok(())
    }

    /// The next batch: the lowest pending sequences, skipping the previous batch's messages
    /// while their completion is in flight; a prefix, in sequence order, of what is pending and
    /// not yet acknowledged.
    async fn claim(&mut self, term: &Term) -> Result<Vec<PendingMessage>, sqlx::Error> {
        let skip = self.completing.as_ref().map_or(&[][..], |c| &c.ids[..]);
        let candidate = self
            .floor
            .candidate()
            .filter(|_| self.backlog || self.floor_raised_at.elapsed() >= FLOOR_INTERVAL);
        let mut conn = self.pool.acquire().await?;
        let claimed = self
            .statements
            .claim(
                &mut conn,
                self.config.batch_size as i64,
                self.config.max_batch_bytes as i64,
                skip,
                candidate,
                &term.fence,
            )
            .await?;
        if let Some(horizon) = &claimed.horizon {
            if self.floor.observe(horizon, candidate) {
                self.floor_raised_at = Instant::now();
            }
            self.claimed_last_id = horizon.last_id;
        }
        let batch = claimed.messages;
        self.backlog = batch.len() >= self.config.batch_size
            || batch.iter().map(message_bytes).sum::<usize>() >= self.config.max_batch_bytes;
        Ok(batch)
    }

    /// Completes acknowledged messages in the background, after the previous completion.
    fn start_completion(&mut self, term: &Term, delivered: Vec<i64>) {
        let delete = matches!(self.config.completion, Completion::Delete);
        let (pool, statements, fence) = (
            self.pool.clone(),
            self.statements.clone(),
            term.fence.clone(),
        );
        let ids = delivered.clone();
        let task = tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            statements
                .complete(&mut conn, &delivered, delete, &fence)
                .await
        });
        // This batch's claim returned before the completion began, so its last value pairs with
        // the completion's transaction id; a later claim's would not.
        self.completing = Some(Completing {
            ids,
            claimed_last_id: self.claimed_last_id,
            task,
        });
    }

    /// Waits for the completion in flight, if any. `Some(step)` when it did not take effect:
    /// its messages stay pending and are published again (duplicates, never a loss).
    async fn settle_completion(&mut self) -> Option<Step> {
        let Completing {
            ids,
            claimed_last_id,
            task,
        } = self.completing.take()?;
        let count = ids.len();
        match task.await {
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
                Some(Step::Failed)
            }
            Err(error) => {
                tracing::error!(%error, count, "the completion task failed");
                Some(Step::Failed)
            }
        }
    }

    fn term_still_valid(&self, term: &Term) -> bool {
        matches!(&*self.term.borrow(), Some(current) if current.fence == term.fence && current.valid_for(Duration::ZERO))
    }

    /// Resolves when the term ends (lost, stepped down, or its deadline passed unrenewed).
    async fn lease_lost(&self, term: &Term) {
        let mut watch = self.term.clone();
        loop {
            let deadline = match &*watch.borrow_and_update() {
                Some(current) if current.fence == term.fence => current.deadline,
                _ => return,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    if !self.term_still_valid(term) { return }
                }
                changed = watch.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn finish(
        &mut self,
        term: &Term,
        batch: &[PendingMessage],
        claimed_at: Instant,
        outcome: BatchOutcome,
    ) -> Step {
        // One completion in flight at a time: the previous batch's lands first. If it did not
        // take effect, its messages stay pending and go out again (duplicates of messages
        // acknowledged before this batch, so first deliveries stay in order); this batch is
        // still completed, and its failures recorded, under the current term, synchronously.
        let previous_failed = self.settle_completion().await.is_some();
        if !previous_failed && outcome.failed.is_empty() && !outcome.delivered.is_empty() {
            // All acknowledged: complete them while the next batch is claimed and published.
            // Not idle yet either: writers skip NOTIFY while we are busy, so look again at once;
            // an empty claim then sets the idle flag before waiting.
            record_published(batch, &outcome.delivered, claimed_at.elapsed());
            self.start_completion(term, outcome.delivered);
            return Step::More;
        }
        let delete = matches!(self.config.completion, Completion::Delete);
        if !outcome.delivered.is_empty() {
            let completed = async {
                let mut conn = self.pool.acquire().await?;
                self.statements
                    .complete(&mut conn, &outcome.delivered, delete, &term.fence)
                    .await
            }
            .await;
            match completed {
                Ok(Fenced::Done(completed)) => {
                    tracing::debug!(completed = completed.count, "published and completed");
                    self.floor.completed(self.claimed_last_id, completed.xid);
                    self.health.progress(true);
                    record_published(batch, &outcome.delivered, claimed_at.elapsed());
                }
                Ok(Fenced::LeaseLost) => {
                    tracing::warn!(
                        count = outcome.delivered.len(),
                        "lost the lease before completing; the next holder publishes these again"
                    );
                    return Step::NotLeader;
                }
                Err(error) => {
                    self.health.database(false);
                    // They stay pending and are published again: a duplicate, never a loss.
                    tracing::warn!(%error, count = outcome.delivered.len(), "cannot mark delivered messages complete");
                    return Step::Failed;
                }
            }
        }
        if outcome.failed.is_empty() {
            // Not idle yet: writers skip NOTIFY while we are busy, so look again at once; an
            // empty claim then sets the idle flag before waiting.
            return Step::More;
        }
        match self.handle_failures(term, batch, &outcome.failed).await {
            // The failed messages (and their keys) are held; the rest flows on at once.
            Ok(Fenced::Done(())) => Step::More,
            Ok(Fenced::LeaseLost) => Step::NotLeader,
            Err(error) => {
                tracing::warn!(%error, "cannot record delivery failures");
                self.health.database(false);
                Step::Failed
            }
        }
    }

    /// Holds each failed message for its backoff, or dead-letters it (permanent errors under
    /// the dead-letter policy).
    async fn handle_failures(
        &self,
        term: &Term,
        batch: &[PendingMessage],
        failed: &[(i64, KafkaError)],
    ) -> Result<Fenced<()>, sqlx::Error> {
        let mut held = Vec::new();
        let mut dead = Vec::new();
        for (id, error) in failed {
            let Some(message) = batch.iter().find(|m| m.id == *id) else {
                continue;
            };
            let class = classify(error);
            m::failed(&message.topic, class == ErrorClass::Retriable);
            let key = message.key.as_deref().map(String::from_utf8_lossy);
            if class == ErrorClass::Permanent
                && self.config.poison_policy == PoisonPolicy::DeadLetter
            {
                tracing::error!(sequence = id, topic = %message.topic, ?key, %error, "permanent delivery failure; moving the message to the dead-letter table");
                dead.push((*id, error.to_string()));
            } else {
                let delay = Backoff::delay_after(
                    self.config.backoff_initial,
                    self.config.backoff_max,
                    message.attempts as u32 + 1,
                );
                if class == ErrorClass::Permanent {
                    tracing::error!(sequence = id, topic = %message.topic, ?key, attempts = message.attempts + 1, %error, ?delay, "permanent delivery failure; the key is blocked until it succeeds (policy: block)");
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

/// What a message weighs against the batch byte budget: its key and payload, as in the claim.
fn message_bytes(message: &PendingMessage) -> usize {
    message.key.as_ref().map_or(0, Vec::len) + message.payload.as_ref().map_or(0, Vec::len)
}

/// Counts published messages per topic and records their latency from insert to ack.
fn record_published(batch: &[PendingMessage], delivered: &[i64], since_claim: Duration) {
    // `delivered` is a subsequence of `batch` (both in sequence order): merge them.
    let mut delivered = delivered.iter().peekable();
    let mut run: Option<(&str, u64)> = None;
    for message in batch {
        if delivered.peek() != Some(&&message.id) {
            continue;
        }
        delivered.next();
        m::publish_latency(message.age + since_claim);
        #[cfg(feature = "otel")]
        crate::trace::record(message, since_claim);
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
