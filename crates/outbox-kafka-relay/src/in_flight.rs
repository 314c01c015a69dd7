//! The messages handed to the producer and not yet decided, across batches: how long a batch
//! is waited for, which messages can be completed, failed or dropped, and what a claim must
//! hold back meanwhile. Per-key order is argued on [`InFlight`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::postgres::PendingMessage;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use rdkafka::error::KafkaError;
use rdkafka::producer::DeliveryFuture;
use tokio::time::Instant;

use crate::kafka::DeliveryError;

/// What can be decided about the messages in flight.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// Acknowledged by Kafka, and no earlier message of the same key is unsettled or failed:
    /// safe to complete. In send order, with the time since their claim.
    pub(crate) delivered: Vec<(PendingMessage, Duration)>,
    /// Not delivered, with the reason; they stay pending, counted as a failed attempt.
    pub(crate) failed: Vec<(PendingMessage, DeliveryError)>,
    /// Refused with an error shared by their whole produce request: to be sent again alone
    /// ([`Publisher::publish_alone`](crate::kafka::Publisher::publish_alone)) before the error is blamed on them.
    pub(crate) suspects: Vec<PendingMessage>,
    /// Topics whose probe was delivered: they exist now (a broker that creates topics on first
    /// use created them).
    pub(crate) created_topics: Vec<String>,
    /// Left pending without a failure of their own: behind a failed message of their key (they
    /// may or may not have reached Kafka), or not attempted.
    pub(crate) dropped: Vec<i64>,
}

/// What an aborted transaction leaves (see [`InFlight::take_aborted`]).
#[derive(Debug, Default)]
pub(crate) struct Aborted {
    pub(crate) failed: Vec<(PendingMessage, DeliveryError)>,
    pub(crate) alone: Vec<PendingMessage>,
    pub(crate) pending: Vec<i64>,
}

/// How waiting for a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchWait {
    /// Every message was acknowledged (or failed).
    Acknowledged,
    /// Some stay in flight: a few were left, or acknowledgements stopped coming.
    Stragglers,
    /// Many were still unacknowledged at the last moment.
    GaveUp,
}

/// One message handed to the producer. It is kept whole, payload included, in case it has to
/// be sent again alone (bounded: at most `MAX_BATCHES_IN_FLIGHT` batches are in flight).
struct Entry {
    message: PendingMessage,
    /// When its batch was claimed, for the publish latency.
    claimed_at: Instant,
    /// Its failure is its own: refused before it joined a produce request, or sent as the only
    /// record in flight (see [`Publisher::publish_alone`](crate::kafka::Publisher::publish_alone)).
    alone: bool,
    /// Sent to a topic the cluster did not list, to find out whether it gets created.
    probe: bool,
    result: Option<Result<(), DeliveryError>>,
}

/// Unacknowledged messages of one topic beyond which all its messages wait.
const STALLED_TOPIC: usize = 100;

/// What a claim holds back while messages are unacknowledged (see [`InFlight::waiting`]).
#[derive(Default)]
pub(crate) struct Waiting<'a> {
    pub(crate) topics: Vec<&'a str>,
    pub(crate) keys: Vec<&'a [u8]>,
    pub(crate) keyless_topics: Vec<&'a str>,
    pub(crate) stalled_topics: Vec<&'a str>,
}

/// How a message was handed over.
pub(crate) struct Sent {
    pub(crate) outcome: Outcome,
    pub(crate) alone: bool,
    pub(crate) probe: bool,
}

pub(crate) enum Outcome {
    InFlight(DeliveryFuture),
    Settled(Result<(), DeliveryError>),
}

/// A delivery tagged with its send number.
struct Delivery {
    number: u64,
    /// Counted among the latest batch's unsettled deliveries (a probe is not waited for).
    counted: bool,
    future: DeliveryFuture,
}

impl Future for Delivery {
    type Output = (u64, bool, Result<(), DeliveryError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (number, counted) = (self.number, self.counted);
        self.future
            .poll_unpin(cx)
            .map(|result| (number, counted, delivery_result(result)))
    }
}

/// The messages handed to the producer and not yet decided, across batches.
///
/// The relay does not wait for a whole batch: a record for a topic that does not exist (yet), or
/// a partition without a leader, may stay unacknowledged for as long as that lasts, and it must
/// hold back only the later messages of its own key. So deliveries are settled one by one, and a
/// message is decided once it and every earlier message of its key in flight are settled.
/// Per-key order still holds: all messages of a key go to one partition of one producer, which
/// keeps their order; a delivered message is completed only after every earlier message of its
/// key was delivered, and after a failure the later ones are dropped (left pending) and held
/// back with it by the claim.
#[derive(Default)]
pub(crate) struct InFlight {
    /// In send order; `entries[i]` has send number `first + i`; `None` once decided.
    entries: VecDeque<Option<Entry>>,
    first: u64,
    deliveries: FuturesUnordered<Delivery>,
    /// The first send number of the latest batch, and how many of its deliveries are unsettled.
    batch_start: u64,
    batch_unsettled: usize,
    batch_counted: usize,
    /// Messages and bytes (see [`message_bytes`]) held.
    count: usize,
    bytes: usize,
}

impl InFlight {
    /// The next messages pushed are a new batch (see [`InFlight::settle_batch`]).
    pub(crate) fn start_batch(&mut self) {
        self.batch_start = self.next_number();
        self.batch_unsettled = 0;
        self.batch_counted = 0;
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The ids in flight, which a claim must skip.
    pub(crate) fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.entries.iter().flatten().map(|e| e.message.id)
    }

    /// Whether some delivery has not settled yet.
    pub(crate) fn unsettled(&self) -> bool {
        !self.deliveries.is_empty()
    }

    fn next_number(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    pub(crate) fn push(&mut self, message: PendingMessage, claimed_at: Instant, sent: Sent) {
        let number = self.next_number();
        let result = match sent.outcome {
            Outcome::InFlight(future) => {
                // A probe may wait for its topic for long: the batch does not wait for it.
                let counted = !sent.probe;
                self.batch_unsettled += usize::from(counted);
                self.batch_counted += usize::from(counted);
                self.deliveries.push(Delivery {
                    number,
                    counted,
                    future,
                });
                None
            }
            Outcome::Settled(result) => Some(result),
        };
        self.count += 1;
        self.bytes += message_bytes(&message);
        self.entries.push_back(Some(Entry {
            message,
            claimed_at,
            alone: sent.alone,
            probe: sent.probe,
            result,
        }));
    }

    /// Waits until one more delivery settles; pending forever while none is outstanding.
    pub(crate) async fn next_settled(&mut self) {
        match self.deliveries.next().await {
            Some((number, counted, result)) => self.record(number, counted, result),
            None => std::future::pending().await,
        }
    }

    /// Records every delivery that has settled by now, without waiting.
    fn record_ready(&mut self) {
        while let Some(Some((number, counted, result))) = self.deliveries.next().now_or_never() {
            self.record(number, counted, result);
        }
    }

    fn record(&mut self, number: u64, counted: bool, result: Result<(), DeliveryError>) {
        if counted && number >= self.batch_start {
            self.batch_unsettled = self.batch_unsettled.saturating_sub(1);
        }
        let Some(index) = number.checked_sub(self.first) else {
            return;
        };
        // A result given before the delivery settled stands (see `fail_unsettled`).
        if let Some(Some(entry)) = self.entries.get_mut(index as usize) {
            entry.result.get_or_insert(result);
        }
    }

    /// The ids of the messages whose delivery is awaited: with exactly-once delivery, right
    /// after a batch was sent, the ids in its transaction.
    pub(crate) fn awaited_ids(&self) -> Vec<i64> {
        self.entries
            .iter()
            .flatten()
            .filter(|e| e.result.is_none())
            .map(|e| e.message.id)
            .collect()
    }

    /// Waits until every delivery has settled, or until `deadline`; whether they all did.
    pub(crate) async fn settle_all(&mut self, deadline: Instant) -> bool {
        while self.unsettled() {
            if tokio::time::timeout_at(deadline, self.next_settled())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Fails every message whose delivery has not settled yet with `error()`, whatever its
    /// delivery reports later: with exactly-once delivery, the records that held up a
    /// transaction's commit until its deadline, which is then aborted.
    pub(crate) fn fail_unsettled(&mut self, error: impl Fn() -> DeliveryError) {
        self.record_ready();
        for entry in self.entries.iter_mut().flatten() {
            if entry.result.is_none() {
                entry.result = Some(Err(error()));
            }
        }
    }

    /// Whether a message was refused before it was sent (with exactly-once delivery, a claim
    /// that adds to the transaction would not hold back the later messages of its key).
    pub(crate) fn any_failed(&self) -> bool {
        self.entries
            .iter()
            .flatten()
            .any(|e| matches!(e.result, Some(Err(_))))
    }

    /// With exactly-once delivery, after the transaction of everything in flight aborted:
    /// nothing of it was published. Takes every message out and returns those that failed for
    /// themselves (to be held; the first of each key), those to publish one per transaction (in
    /// send order, every message of a key with a record refused with its whole produce request,
    /// up to a failure of that key), and the ids of the rest, which stay pending.
    pub(crate) fn take_aborted(&mut self) -> Aborted {
        self.record_ready();
        let entries: Vec<Entry> = self.entries.iter_mut().filter_map(Option::take).collect();
        self.forget();
        // A keyless message is its own key: it orders nothing else.
        let key = |e: &Entry| {
            let m = &e.message;
            (
                m.topic.clone(),
                m.key.clone(),
                m.key.is_none().then_some(m.id),
            )
        };
        let own = |e: &Entry| match &e.result {
            Some(Err(error)) => !error.not_attempted() && (!error.shared_by_request() || e.alone),
            _ => false,
        };
        let suspect = |e: &Entry| matches!(&e.result, Some(Err(error)) if error.shared_by_request() && !e.alone);
        let suspect_keys: HashSet<_> = entries.iter().filter(|e| suspect(e)).map(key).collect();
        let mut failed_keys = HashSet::new();
        let mut aborted = Aborted::default();
        for entry in entries {
            let k = key(&entry);
            if failed_keys.contains(&k) {
                aborted.pending.push(entry.message.id);
                continue;
            }
            let is_own = own(&entry);
            match entry.result {
                Some(Err(error)) if is_own => {
                    failed_keys.insert(k);
                    aborted.failed.push((entry.message, error));
                }
                _ if suspect_keys.contains(&k) => aborted.alone.push(entry.message),
                _ => aborted.pending.push(entry.message.id),
            }
        }
        aborted
    }

    /// Marks every message as sent alone: a refusal is its own (a transaction of one record).
    pub(crate) fn all_alone(&mut self) {
        for entry in self.entries.iter_mut().flatten() {
            entry.alone = true;
        }
    }

    /// Waits until every delivery of the latest batch has settled; once `deadline` has passed,
    /// only while acknowledgements keep coming (no pause of `quiet`) and more than stragglers
    /// are left (one in twenty, at least one); and not past `last`. A batch that is slow as a
    /// whole (a long drain, a busy broker) is waited for, one with messages that do not get
    /// through is not. Returns how it ended and when the last delivery settled.
    pub(crate) async fn settle_batch(
        &mut self,
        deadline: Instant,
        quiet: Duration,
        last: Instant,
    ) -> (BatchWait, Option<Instant>) {
        let stragglers = (self.batch_counted / 20).max(1);
        let mut late = false;
        let mut settled_at = None;
        let timer = tokio::time::sleep_until(deadline);
        let give_up = tokio::time::sleep_until(last);
        tokio::pin!(timer, give_up);
        while self.batch_unsettled > 0 {
            if late && self.batch_unsettled <= stragglers {
                return (BatchWait::Stragglers, settled_at);
            }
            let pause = settled_at.unwrap_or(deadline).max(deadline) + quiet;
            tokio::select! {
                _ = self.next_settled() => {
                    self.record_ready();
                    settled_at = Some(Instant::now());
                }
                _ = &mut timer, if !late => late = true,
                _ = tokio::time::sleep_until(pause), if late => {
                    return (BatchWait::Stragglers, settled_at);
                }
                _ = &mut give_up => return (BatchWait::GaveUp, settled_at),
            }
        }
        (BatchWait::Acknowledged, settled_at)
    }

    /// What a claim holds back while messages are unacknowledged: their keys; for messages
    /// without a key, the later keyless messages of their topic; and every message of a topic
    /// with `STALLED_TOPIC` or more of them (a partition without a leader, written with ever new
    /// keys). So a destination that does not answer collects a bounded number of messages.
    pub(crate) fn waiting(&self) -> Waiting<'_> {
        let mut keyed: HashSet<(&str, &[u8])> = HashSet::new();
        let mut keyless: HashSet<&str> = HashSet::new();
        let mut per_topic: HashMap<&str, usize> = HashMap::new();
        for entry in self.entries.iter().flatten().filter(|e| e.result.is_none()) {
            let topic = entry.message.topic.as_str();
            match &entry.message.key {
                Some(key) => keyed.insert((topic, key)),
                None => keyless.insert(topic),
            };
            *per_topic.entry(topic).or_default() += 1;
        }
        let (topics, keys) = keyed.into_iter().unzip();
        Waiting {
            topics,
            keys,
            keyless_topics: keyless.into_iter().collect(),
            stalled_topics: per_topic
                .into_iter()
                .filter(|(_, count)| *count >= STALLED_TOPIC)
                .map(|(topic, _)| topic)
                .collect(),
        }
    }

    /// Whether an earlier message of `message`'s key is unacknowledged.
    pub(crate) fn unsettled_key(&self, message: &PendingMessage) -> bool {
        message.key.is_some()
            && self.entries.iter().flatten().any(|e| {
                e.result.is_none()
                    && e.message.key == message.key
                    && e.message.topic == message.topic
            })
    }

    /// Topics whose existence an unacknowledged message is probing (see [`Publisher::send`](crate::kafka::Publisher::send)).
    pub(crate) fn probing(&self) -> HashSet<String> {
        self.entries
            .iter()
            .flatten()
            .filter(|e| e.probe && e.result.is_none())
            .map(|e| e.message.topic.clone())
            .collect()
    }

    /// Takes out every message that can be decided now (see the type's docs).
    pub(crate) fn take_settled(&mut self) -> Settled {
        self.record_ready();
        // A probe the cluster has not answered within `PROBE_TIMEOUT` (librdkafka may wait
        // much longer for a topic's metadata): its topic is taken not to exist. Should
        // librdkafka deliver it later after all, that copy is a duplicate.
        for entry in self.entries.iter_mut().flatten() {
            if entry.probe && entry.result.is_none() && entry.claimed_at.elapsed() > PROBE_TIMEOUT {
                entry.result = Some(Err(DeliveryError::UnknownTopic(
                    entry.message.topic.clone(),
                )));
            }
        }
        // Which slots to take, decided on borrowed keys: no allocation per message.
        let mut take = Vec::new();
        {
            // Keys with an earlier message still unsettled, or failed in this pass.
            let mut waiting: HashSet<(&str, &[u8])> = HashSet::new();
            let mut failed: HashSet<(&str, &[u8])> = HashSet::new();
            for (index, entry) in self.entries.iter().enumerate() {
                let Some(entry) = entry else { continue };
                let key = entry
                    .message
                    .key
                    .as_deref()
                    .map(|k| (&*entry.message.topic, k));
                let behind = |set: &HashSet<_>| key.is_some_and(|k| set.contains(&k));
                let behind_failure = behind(&failed);
                if behind(&waiting) || (entry.result.is_none() && !behind_failure) {
                    waiting.extend(key);
                    continue;
                }
                if !behind_failure && matches!(entry.result, Some(Err(_))) {
                    failed.extend(key);
                }
                take.push((index, behind_failure));
            }
        }
        let mut settled = Settled::default();
        for (index, behind_failure) in take {
            let entry = self.entries[index].take().expect("decided above");
            self.count -= 1;
            self.bytes -= message_bytes(&entry.message);
            // Behind a failed message of its key: dropped, it stays pending (it may or may not
            // have reached Kafka) and is held back with the failed one by the claim.
            if behind_failure {
                settled.dropped.push(entry.message.id);
                continue;
            }
            match entry.result.expect("settled") {
                Ok(()) => {
                    if entry.probe {
                        settled.created_topics.push(entry.message.topic.clone());
                    }
                    settled
                        .delivered
                        .push((entry.message, entry.claimed_at.elapsed()));
                }
                // Not attempted: it stays pending and is claimed again, uncounted.
                Err(error) if error.not_attempted() => settled.dropped.push(entry.message.id),
                Err(error) if error.shared_by_request() && !entry.alone => {
                    settled.suspects.push(entry.message)
                }
                Err(error) => settled.failed.push((entry.message, error)),
            }
        }
        while let Some(None) = self.entries.front() {
            self.entries.pop_front();
            self.first += 1;
        }
        settled
    }

    /// Forgets every message in flight (the producer was purged or replaced): they stay
    /// pending and are claimed again.
    pub(crate) fn forget(&mut self) {
        self.first += self.entries.len() as u64;
        self.entries.clear();
        self.deliveries = FuturesUnordered::new();
        self.batch_start = self.first;
        self.batch_unsettled = 0;
        self.batch_counted = 0;
        self.count = 0;
        self.bytes = 0;
    }
}

/// What a message weighs against the batch byte budget: its key, payload and headers, as the
/// claim counts them.
pub(crate) fn message_bytes(message: &PendingMessage) -> usize {
    message.key.as_ref().map_or(0, Vec::len)
        + message.payload.as_ref().map_or(0, Vec::len)
        + message
            .headers
            .iter()
            .map(|h| h.name.len() + h.value.len())
            .sum::<usize>()
}

/// How long a probe may go unanswered before its topic is taken not to exist.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn delivery_result(
    result: <DeliveryFuture as Future>::Output,
) -> Result<(), DeliveryError> {
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => Err(DeliveryError::Kafka(error)),
        Err(_canceled) => Err(DeliveryError::Kafka(KafkaError::Canceled)),
    }
}
