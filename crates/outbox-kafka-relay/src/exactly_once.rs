//! Exactly-once publication ([`Delivery::ExactlyOnce`](crate::config::Delivery)): a consumer
//! reading with `isolation.level=read_committed` sees every committed outbox message once, in
//! per-key order, through relay crashes, lease handovers and broker restarts.
//!
//! # How
//! - **Two transactional producers per term**, whose `transactional.id`s are derived from the
//!   lease name and the source ([`RelayConfig::transactional_id`](crate::RelayConfig::transactional_id)
//!   and the same with `.1`), so the same for every holder. A holder that takes the lease creates
//!   its producers and calls `init_transactions` on both, which aborts any transaction the
//!   previous holder left open and fences its producers: from then on, nothing the deposed
//!   holder sends can ever commit. Transactions alternate between the two: a transaction that
//!   starts right after the previous commit on the same id finds the coordinator still writing
//!   that commit's markers, and librdkafka retries its AddPartitionsToTxn only after 20 ms.
//!   Order holds across the two: a transaction is sent only after the previous one committed.
//! - **One Kafka transaction per batch**, which carries the batch's records and one *progress
//!   record*, in the progress topic (one partition, compacted, keyed by the transactional id),
//!   naming exactly the outbox ids of the records in the transaction (as ranges: claims are not
//!   contiguous) and the batch's number.
//! - **The database completion follows the Kafka commit**, and stores the batch's number with
//!   the completed rows, in the same database transaction (`relay_progress`, migration 0015),
//!   committed synchronously. A holder that starts (or reconnects to the database) reads the
//!   last committed progress record of each id (read_committed) and, if the newer one's number
//!   is above the stored one, completes its ids before it claims anything.
//!
//! # Why it holds: each crash point
//! - **Before the Kafka commit** (claimed, some records sent): the transaction is open. The next
//!   holder's `init_transactions` aborts it (or the broker does, after `transaction.timeout.ms`),
//!   so read_committed consumers never see its records. The rows are still pending in the
//!   database and go out in a later transaction: once.
//! - **Between the Kafka commit and the database completion**: Kafka has the records and the
//!   progress record, the rows are pending. The next holder runs `init_transactions` first, so
//!   any commit of the previous holder has happened before it reads the progress topic to its
//!   end, finds that batch's number above the stored one, and completes those ids; only then
//!   does it claim. They are never claimed again.
//! - **During the completion**: the completion is one database transaction, fenced by the lease
//!   token. If it committed, the stored number equals the progress record's and recovery does
//!   nothing; if not, recovery completes the ids. A completion the deposed holder tries after
//!   the lease moved on changes nothing (the fence).
//! - **Only the last batch can be in doubt**: a holder completes each batch (synchronously)
//!   before it claims the next, and retries a failed completion before anything else, so at
//!   most one committed batch is uncompleted at any time, the one the last progress record
//!   names.
//! - **Republish and dead-letter retry** put rows back with their old ids. The stored number is
//!   what keeps an old progress record from completing them unpublished: recovery applies only
//!   a record newer than the last completion.
//!
//! # Isolation
//! A Kafka transaction commits all its records or none, so one refused record aborts the batch.
//! A record that may be over its topic's size limit (before compression; the limit is learned
//! before the topic's first batch) is therefore set aside and sent after the batch, in a
//! transaction of its own: a refusal aborts only that one, and keeps its producer (see
//! `commit`: its next transaction to that partition is aborted once more). Its key's later
//! messages wait for it.
//! After an abort, the records that failed for themselves (too large, not authorized, a topic
//! that does not exist) are held or dead-lettered as in at-least-once mode, and the rest of the
//! batch is claimed again at once, without them and their keys. A refusal shared by a produce
//! request (a record over the topic's size limit fails its whole request) is sorted out by
//! sending the messages of the keys concerned one per transaction, in order, each key up to its
//! first failure, so the culprit fails alone and nothing overtakes an earlier message of its
//! key. A message refused before it is sent ends the claims into its transaction: it is held
//! only when the transaction ends, and a claim before that would take its key's next message.
//! Records that are not acknowledged before the commit's deadline (a partition without a
//! leader) are held with backoff as failed attempts, and the batch goes again without them.
//! But a transaction that includes a partition which then loses every replica cannot be
//! aborted either (its markers cannot be written), and every later transaction waits until the
//! partition is back: Kafka's transactions assume replicated partitions. Measured: the chaos
//! scenario "a partition without a leader" (its only broker killed) run in this mode left the
//! healthy topic's messages unpublished for the whole 120 s it waits; with replication
//! (scenario 3, the leader killed, RF 3) a new leader is elected and nothing stalls.
//!
//! # What it costs and does not cover
//! - No probing of unknown topics: a message for a topic the cluster does not list is held
//!   (retried with backoff) until the topic exists; a broker's auto-creation is not triggered.
//! - A database failover that loses commits (asynchronous replication, `wait_for_standbys = 0`)
//!   can hand the ids of lost messages out again; a progress record naming such an id would then
//!   complete the new message unpublished. Set `wait_for_standbys` with replicas.
//! - `outbox republish` publishes again on purpose: its messages are new transactions, so
//!   read_committed consumers see them again.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::config::Completion;
use crate::kafka::{DeliveryError, KafkaConfig};
use crate::lease::Term;
use crate::metrics as m;
use crate::pipeline::{record_published, Pipeline, Step, MAX_BATCHES_IN_FLIGHT};
use crate::postgres::{Completed, Fenced, PendingMessage};
use tokio::time::Instant;

/// One transaction's progress record: its batch number and the outbox ids it published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Progress {
    pub(crate) batch: i64,
    /// Inclusive ranges, ascending.
    ranges: Vec<(i64, i64)>,
}

impl Progress {
    /// `ids` in any order.
    pub(crate) fn new(batch: i64, ids: &[i64]) -> Self {
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        let mut ranges: Vec<(i64, i64)> = Vec::new();
        for id in sorted {
            match ranges.last_mut() {
                Some((_, end)) if id <= end.saturating_add(1) => *end = (*end).max(id),
                _ => ranges.push((id, id)),
            }
        }
        Progress { batch, ranges }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many ranges name `ids` (sorted or not).
    pub(crate) fn ranges_of(ids: &[i64]) -> usize {
        Progress::new(0, ids).ranges.len()
    }

    pub(crate) fn ids(&self) -> Vec<i64> {
        self.ranges
            .iter()
            .flat_map(|&(start, end)| start..=end)
            .collect()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain numbers serialize")
    }

    /// `None` for anything but a record this relay writes: ranges must be ascending, disjoint
    /// and name at most `MAX_IDS` ids (a batch holds at most 100,000); the batch number is
    /// positive and below `MAX_BATCH`.
    fn decode(bytes: &[u8]) -> Option<Self> {
        let progress: Progress = serde_json::from_slice(bytes).ok()?;
        let mut count: i64 = 0;
        let mut previous_end: Option<i64> = None;
        for &(start, end) in &progress.ranges {
            if end < start || previous_end.is_some_and(|p| start <= p) {
                return None;
            }
            count = count.checked_add(end.checked_sub(start)?.checked_add(1)?)?;
            previous_end = Some(end);
        }
        (count <= MAX_IDS && (1..MAX_BATCH).contains(&progress.batch)).then_some(progress)
    }
}

const MAX_IDS: i64 = 1_000_000;
/// The most id ranges a progress record names: at ~44 bytes a range at worst (two 19-digit ids),
/// ~440 KB, under librdkafka's default `message.max.bytes` (1,000,000) with room to spare. A
/// transaction adds no claim that could pass it (ids fragmented by held keys can make every id
/// a range of its own), and `batch_size` is bounded by it in this mode.
pub(crate) const MAX_RANGES: usize = 10_000;
/// Batch numbers count transactions: a record beyond this is not the relay's (and would
/// overflow the count).
const MAX_BATCH: i64 = 1 << 62;

/// How long reading the progress topic may take before recovery is retried.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Offsets read back from the end of the progress topic before reading all of it: with one
/// writer per topic, the last record is two offsets from the end (its commit marker after it);
/// aborted transactions and other relay groups' records add to that.
const TAIL: i64 = 10_000;

/// Creates the progress topic if it is missing: one partition (the records of a transactional
/// id must stay in order), compacted (only the last record per key matters), the broker's
/// replication factor.
/// A topic that exists is left as it is: a principal without the `Create` ACL is refused even
/// a creation that would find the topic there.
pub(crate) async fn ensure_topic(config: &KafkaConfig, topic: &str) -> Result<(), KafkaError> {
    // Every topic's metadata, not the one's: asking for one by name may create it (with the
    // broker's defaults) where the broker creates topics on first use.
    let (client, name) = (reader_config(config), topic.to_owned());
    let exists = tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = client.create()?;
        let metadata = client.fetch_metadata(None, READ_TIMEOUT)?;
        let exists = metadata
            .topics()
            .iter()
            .any(|t| t.name() == name && t.error().is_none());
        Ok::<bool, KafkaError>(exists)
    })
    .await
    .map_err(|_| KafkaError::Canceled)??;
    if exists {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = config.metadata_client_config().create()?;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    let options = AdminOptions::new().operation_timeout(Some(READ_TIMEOUT));
    for result in admin.create_topics([&new], &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(KafkaError::AdminOp(code)),
        }
    }
    Ok(())
}

/// The connection and security settings, for a consumer (producer properties would be
/// reported as ignored).
fn reader_config(config: &KafkaConfig) -> rdkafka::ClientConfig {
    let mut client = config.metadata_client_config();
    for producer_only in [
        "linger.ms",
        "compression.type",
        "partitioner",
        "message.timeout.ms",
        "message.max.bytes",
    ] {
        client.remove(producer_only);
    }
    client
}

/// The progress reader's librdkafka context: the end of the partition, which librdkafka also
/// reports as a client error, is what the reader waits for, not something to log.
struct Reader;

impl ClientContext for Reader {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::warn!(%error, reason, "Kafka error while reading the progress topic");
        }
    }
}

impl ConsumerContext for Reader {}

/// The newest of the last committed progress records of `keys` (the transactional ids) in
/// `topic`. Call it after `init_transactions`, so that no transaction of theirs is still open.
pub(crate) fn read_last(
    config: &KafkaConfig,
    topic: &str,
    keys: &[String],
) -> Result<Option<Progress>, KafkaError> {
    let consumer: BaseConsumer<Reader> = reader_config(config)
        .set("group.id", "outbox-progress-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        .create_with_context(Reader)?;
    let (low, high) = consumer.fetch_watermarks(topic, 0, READ_TIMEOUT)?;
    let mut last = None;
    let mut from = low.max(high - TAIL);
    loop {
        if high <= from {
            return Ok(last);
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, Offset::Offset(from))?;
        consumer.assign(&assignment)?;
        // Time to read what there is, at a (slow) 50,000 records a second, on top.
        let span = u64::try_from(high - from).unwrap_or(0);
        let deadline = std::time::Instant::now() + READ_TIMEOUT + Duration::from_millis(span / 50);
        loop {
            if std::time::Instant::now() > deadline {
                return Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OperationTimedOut,
                ));
            }
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(record)) if keys.iter().any(|k| record.key() == Some(k.as_bytes())) => {
                    if let Some(progress) = record.payload().and_then(Progress::decode) {
                        if last
                            .as_ref()
                            .is_none_or(|l: &Progress| progress.batch > l.batch)
                        {
                            last = Some(progress);
                        }
                    }
                }
                Some(Ok(_)) => {}
                // The end as a read_committed consumer sees it: the last stable offset. Since
                // our own transactions are closed, everything of ours below `high` is before it,
                // unless another producer's open transaction holds it back: then read on.
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    let position = consumer
                        .position()?
                        .find_partition(topic, 0)
                        .and_then(|p| p.offset().to_raw());
                    if position.is_some_and(|p| p >= high) {
                        break;
                    }
                }
                Some(Err(error)) => return Err(error),
                None => {}
            }
        }
        if last.is_some() || from == low {
            return Ok(last);
        }
        // Another writer's records filled the tail: read the whole partition.
        from = low;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_ranges() {
        let progress = Progress::new(7, &[5, 3, 4, 10, 12, 11, 20]);
        assert_eq!(progress.ranges, vec![(3, 5), (10, 12), (20, 20)]);
        assert_eq!(progress.ids(), vec![3, 4, 5, 10, 11, 12, 20]);
        assert_eq!(Progress::decode(&progress.encode()), Some(progress));
        for hostile in [
            r#"{"batch":1,"ranges":[[1,9223372036854775807]]}"#,
            r#"{"batch":1,"ranges":[[-9223372036854775808,9223372036854775807]]}"#,
            r#"{"batch":1,"ranges":[[5,3]]}"#,
            r#"{"batch":1,"ranges":[[1,5],[3,8]]}"#,
            r#"{"batch":9223372036854775807,"ranges":[[1,5]]}"#,
            r#"{"batch":0,"ranges":[[1,5]]}"#,
            "not json",
        ] {
            assert_eq!(Progress::decode(hostile.as_bytes()), None, "{hostile}");
        }
        assert_eq!(Progress::new(1, &[]).ids(), Vec::<i64>::new());
    }

    /// The worst case: every id a range of its own, ids of 19 digits.
    #[test]
    fn the_most_ranges_fit_in_a_record_kafka_takes() {
        let ids: Vec<i64> = (0..MAX_RANGES as i64).map(|i| i64::MAX - 2 * i).collect();
        let progress = Progress::new(i64::MAX / 4, &ids);
        assert_eq!(Progress::ranges_of(&ids), MAX_RANGES);
        assert!(
            progress.encode().len() < 500_000,
            "{}",
            progress.encode().len()
        );
    }
}

/// Exactly-once delivery's state in the pipeline.
#[derive(Debug, Default)]
pub(crate) struct Transactions {
    /// The term (its token) whose producer ran `init_transactions`.
    initialized: Option<i64>,
    /// The alternate producer aborted a transaction for a failed record, and must be replaced
    /// before it runs another (see `commit`).
    alternate_spent: bool,
    topic_ready: bool,
    /// The term and database session the last progress was read for: a new session (a
    /// reconnect, a failover) reads it again, in case the database lost a completion.
    recovered: Option<(i64, Option<u64>)>,
    /// The next transaction's batch number.
    next_batch: i64,
    /// Committed in Kafka, not completed in the database: completed before anything else.
    uncompleted: Option<Progress>,
}

impl Transactions {
    /// The producers must be created and initialised again, and the progress read, before the
    /// next transaction.
    pub(crate) fn reinitialize(&mut self) {
        self.initialized = None;
    }

    /// `progress` was committed in Kafka and its completion failed.
    pub(crate) fn uncompleted(&mut self, progress: Progress) {
        self.uncompleted = Some(progress);
    }
}

const INIT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a commit (which waits for every record's acknowledgement) may take; then the
/// transaction is aborted and what held it up is held back as failed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
const ABORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long delivery reports may trail the end of their transaction.
const REPORTS_WAIT: Duration = Duration::from_secs(5);

/// What goes into a transaction besides the batch it starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// More claims while there is a backlog (see `claim_into_transaction`).
    MoreClaims,
    /// Nothing.
    AsIs,
    /// Nothing; the batch is one message, whose refusal is its own.
    Alone,
}

/// What one transaction left to do.
struct Transacted {
    step: Step,
    /// After an abort, messages to publish one per transaction (see
    /// [`InFlight::take_aborted`](crate::in_flight::InFlight::take_aborted)).
    alone: Vec<PendingMessage>,
    committed: bool,
}

impl Transacted {
    fn not_committed(step: Step) -> Self {
        Transacted {
            step,
            alone: Vec::new(),
            committed: false,
        }
    }
}

/// How one transaction ended.
enum Ended {
    Committed,
    /// Aborted because of `error` (`None`: nothing in it to commit).
    Aborted(Option<KafkaError>),
    /// Aborted, and the relay cannot go on at once: the term ended before the commit
    /// (`NotLeader`), or the previous batch's completion did not take effect, so this one must
    /// not commit before it is (see `Transactions::uncompleted`).
    Stopped(Step),
}

impl Pipeline {
    /// Before a claim: a producer initialised for this term, the last committed batch completed.
    pub(crate) async fn ready_for_transactions(&mut self, term: &Term) -> Option<Step> {
        let token = term.fence.token;
        if self.transactions.initialized != Some(token) {
            if let Err(reason) = self.initialize_transactions().await {
                tracing::warn!(%reason, "cannot start Kafka transactions");
                self.health.transaction_problem(Some(reason));
                return Some(Step::Failed);
            }
            self.health.transaction_problem(None);
            self.transactions.initialized = Some(token);
            self.transactions.alternate_spent = false;
            self.transactions.recovered = None;
        } else if self.transactions.alternate_spent {
            // Only that producer: the transaction it aborted is known to be aborted, so the
            // progress need not be read again.
            if let Err(error) = self.publisher.renew_alternate(INIT_TIMEOUT).await {
                let reason = self.config.kafka.without_secrets(&error.to_string());
                tracing::warn!(%reason, "cannot replace a transactional producer; replacing both");
                self.transactions.reinitialize();
                return Some(Step::Failed);
            }
            self.transactions.alternate_spent = false;
        }
        if let Err(error) = self.session.conn().await {
            tracing::warn!(%error, "cannot connect to the database");
            self.health.database(false);
            return Some(Step::Failed);
        }
        let session = self.session.session();
        if self.transactions.recovered != Some((token, session)) {
            // The completion in flight first: what it stores is what the progress is read against.
            if let Some(step) = self.settle_completion().await {
                return Some(step);
            }
            if let Err(reason) = self.read_progress().await {
                tracing::warn!(%reason, "cannot read the last committed batch");
                self.health.transaction_problem(Some(format!(
                    "cannot read the progress topic {:?}: {reason}",
                    self.config.progress_topic
                )));
                return Some(Step::Failed);
            }
            self.health.transaction_problem(None);
            self.transactions.recovered = Some((token, session));
        }
        let progress = self.transactions.uncompleted.take()?;
        match self.complete_batch(term, &progress).await {
            Ok(Fenced::Done(done)) => {
                tracing::info!(
                    batch = progress.batch,
                    completed = done.count,
                    "completed a batch that Kafka had committed before the relay could"
                );
                None
            }
            Ok(Fenced::LeaseLost) => Some(Step::NotLeader),
            Err(error) => {
                tracing::warn!(%error, "cannot complete a batch Kafka committed");
                self.health.database(false);
                self.transactions.uncompleted = Some(progress);
                Some(Step::Failed)
            }
        }
    }

    /// A new producer (the previous one may be fenced, or hold a transaction in an unknown
    /// state), registered with the transaction coordinator: that aborts whatever transaction the
    /// previous holder of the transactional id left open, and fences it.
    async fn initialize_transactions(&mut self) -> Result<(), String> {
        let kafka = &self.config.kafka;
        let topic = &self.config.progress_topic;
        if !self.transactions.topic_ready {
            ensure_topic(kafka, topic).await.map_err(|error| {
                kafka.without_secrets(&format!(
                    "cannot create the progress topic {topic:?} (or it has another problem): {error}"
                ))
            })?;
            self.transactions.topic_ready = true;
        }
        self.publisher
            .renew()
            .map_err(|error| kafka.without_secrets(&error.to_string()))?;
        self.publisher
            .init_transactions(INIT_TIMEOUT)
            .await
            .map_err(|error| {
                kafka.without_secrets(&format!(
                    "cannot initialise Kafka transactions as {:?} (the brokers must support transactions, and the relay's principal needs Write and Describe on that transactional id): {error}",
                    self.config.transactional_id()
                ))
            })
    }

    /// Reads the last committed progress record and the last completed batch's number: the
    /// record's batch is uncompleted if it is newer.
    async fn read_progress(&mut self) -> Result<(), String> {
        let conn = self.session.conn().await.map_err(|e| e.to_string())?;
        let stored = self
            .statements
            .progress_batch(conn, &self.config.lease_name)
            .await;
        let stored = self.session.checked(stored).map_err(|e| e.to_string())?;
        let (kafka, topic, keys) = (
            self.config.kafka.clone(),
            self.config.progress_topic.clone(),
            self.config.transactional_ids(),
        );
        let last = tokio::task::spawn_blocking(move || read_last(&kafka, &topic, &keys))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| self.config.kafka.without_secrets(&e.to_string()))?;
        let committed = last.as_ref().map_or(0, |p| p.batch);
        self.transactions.next_batch = stored.max(committed).saturating_add(1);
        self.transactions.uncompleted = last.filter(|p| p.batch > stored);
        Ok(())
    }

    /// Completes `progress`'s ids and stores its batch number, on the claims' session.
    async fn complete_batch(
        &mut self,
        term: &Term,
        progress: &Progress,
    ) -> Result<Fenced<Completed>, sqlx::Error> {
        let delete = matches!(self.config.completion, Completion::Delete);
        let result = match self.session.conn().await {
            Ok(conn) => {
                self.statements
                    .complete(
                        conn,
                        &progress.ids(),
                        delete,
                        Some(progress.batch),
                        &term.fence,
                    )
                    .await
            }
            Err(error) => Err(error),
        };
        self.session.checked(result)
    }

    /// Publishes `batch` in one transaction, then completes it. Messages that failed before
    /// (held, now due) go in a transaction of their own first: one that fails again aborts only
    /// that one, not the new messages beside it (with 10,000 held keys coming due, every mixed
    /// transaction aborted, and the healthy messages in them never got through).
    pub(crate) async fn publish_exactly_once(
        &mut self,
        term: &Term,
        batch: Vec<PendingMessage>,
        claimed_at: Instant,
    ) -> Step {
        let (retries, fresh): (Vec<_>, Vec<_>) = batch.into_iter().partition(|m| m.due_retry);
        if retries.is_empty() || fresh.is_empty() {
            let fill = match fresh.is_empty() {
                true => Fill::AsIs,
                false => Fill::MoreClaims,
            };
            let batch = if fresh.is_empty() { retries } else { fresh };
            return self.publish_batch(term, batch, claimed_at, fill).await;
        }
        // A key's newer messages wait for the next claim: its retry may be held again, and
        // nothing may overtake it.
        let retried: HashSet<(&str, &[u8])> = retries
            .iter()
            .filter_map(|m| Some((m.topic.as_str(), m.key.as_deref()?)))
            .collect();
        let (later, fresh): (Vec<_>, Vec<_>) = fresh.into_iter().partition(|m| {
            m.key
                .as_deref()
                .is_some_and(|key| retried.contains(&(m.topic.as_str(), key)))
        });
        drop(retried);
        self.floor.uncovered(later.iter().map(|m| m.id));
        // The new messages first: a retry refused again costs an abort and a new producer, and
        // the new ones would wait for that.
        let step = match fresh.is_empty() {
            true => Step::More,
            false => {
                let step = self
                    .publish_batch(term, fresh, claimed_at, Fill::MoreClaims)
                    .await;
                match step {
                    // After an abort, a new producer (see `commit`).
                    Step::More => self
                        .ready_for_transactions(term)
                        .await
                        .unwrap_or(Step::More),
                    step => step,
                }
            }
        };
        if !matches!(step, Step::More) {
            self.floor.uncovered(retries.iter().map(|m| m.id));
            return step;
        }
        self.publish_batch(term, retries, claimed_at, Fill::AsIs)
            .await
    }

    /// `batch` in one transaction (filled as `fill` says). After a refusal shared by a
    /// produce request (a record over its topic's size limit fails the whole request), the
    /// messages of the keys concerned go one per transaction, in order, each key up to its
    /// first failure (that one is held, or dead-lettered); the rest stays pending.
    async fn publish_batch(
        &mut self,
        term: &Term,
        batch: Vec<PendingMessage>,
        claimed_at: Instant,
        fill: Fill,
    ) -> Step {
        let transaction = self.transact(term, batch, claimed_at, fill).await;
        if !matches!(transaction.step, Step::More) || transaction.alone.is_empty() {
            return transaction.step;
        }
        tracing::debug!(
            count = transaction.alone.len(),
            "publishing messages one per transaction (records that may be too large, or the keys of a produce request refused as a whole)"
        );
        let mut stopped: HashSet<(String, Vec<u8>)> = HashSet::new();
        let mut messages = transaction.alone.into_iter();
        while let Some(message) = messages.next() {
            let key = message.key.clone().map(|k| (message.topic.clone(), k));
            if key.as_ref().is_some_and(|k| stopped.contains(k)) {
                self.floor.uncovered([message.id]);
                continue;
            }
            // After the abort, a new producer (see `commit`).
            let step = match self.ready_for_transactions(term).await {
                Some(step) => step,
                None => {
                    let alone = self
                        .transact(term, vec![message], Instant::now(), Fill::Alone)
                        .await;
                    if !alone.committed {
                        // Held, or not published for another reason: the key's later messages
                        // must not overtake it.
                        stopped.extend(key);
                    }
                    alone.step
                }
            };
            if !matches!(step, Step::More) {
                self.floor.uncovered(messages.map(|m| m.id));
                return step;
            }
        }
        Step::More
    }

    /// One transaction: `batch`'s records (filled as `fill` says) and the progress record,
    /// committed, then completed.
    async fn transact(
        &mut self,
        term: &Term,
        batch: Vec<PendingMessage>,
        claimed_at: Instant,
        fill: Fill,
    ) -> Transacted {
        if let Err(error) = self.publisher.begin_transaction() {
            let error = self.config.kafka.without_secrets(&error.to_string());
            tracing::warn!(%error, "cannot begin a Kafka transaction");
            self.floor.uncovered(batch.iter().map(|m| m.id));
            self.transactions.reinitialize();
            return Transacted::not_committed(Step::Failed);
        }
        self.publisher
            .send(batch, claimed_at, &mut self.in_flight, fill == Fill::Alone)
            .await;
        match fill {
            Fill::Alone => self.in_flight.all_alone(),
            Fill::MoreClaims => self.claim_into_transaction(term).await,
            Fill::AsIs => {}
        }
        let ids = self.in_flight.awaited_ids();
        let progress = Progress::new(self.transactions.next_batch, &ids);
        let end = self.commit(term, &progress, fill == Fill::Alone).await;
        if !self
            .in_flight
            .settle_all(Instant::now() + REPORTS_WAIT)
            .await
        {
            // Whatever was not reported is decided as not published: it stays pending (a
            // committed transaction's messages are completed from its progress record).
            tracing::warn!("delivery reports missing after the transaction ended");
        }
        match end {
            Ended::Committed => {
                m::transaction(true);
                self.transactions.next_batch += 1;
                let settled = self.in_flight.take_settled();
                self.floor.uncovered(settled.dropped);
                record_published(&settled.delivered);
                // In the background, while the next batch is claimed and sent; it lands before
                // that batch commits (see `commit`), so at most one committed batch is ever
                // uncompleted: the last progress record's.
                self.start_completion(term, ids, Some(progress.batch));
                let step = self.hold(term, &settled.failed).await;
                Transacted {
                    step,
                    // Set aside as they may be too large (see `Publisher::send`).
                    alone: settled.suspects,
                    committed: true,
                }
            }
            Ended::Aborted(error) => {
                let aborted = self.in_flight.take_aborted();
                self.floor.uncovered(aborted.pending);
                let step = self.hold(term, &aborted.failed).await;
                let step = match error {
                    Some(error) => {
                        m::transaction(false);
                        let error = self.config.kafka.without_secrets(&error.to_string());
                        tracing::info!(%error, failed = aborted.failed.len(), "a Kafka transaction was aborted; publishing the rest of its batch again");
                        // Aborted for nothing the batch's records did (the progress record
                        // refused, the coordinator unreachable): back off before the next.
                        match aborted.failed.is_empty() && aborted.alone.is_empty() {
                            true => Step::Failed,
                            false => step,
                        }
                    }
                    None => step,
                };
                Transacted {
                    step,
                    alone: aborted.alone,
                    committed: false,
                }
            }
            Ended::Stopped(step) => {
                let aborted = self.in_flight.take_aborted();
                self.floor.uncovered(
                    aborted
                        .pending
                        .into_iter()
                        .chain(aborted.failed.iter().map(|(m, _)| m.id))
                        .chain(aborted.alone.iter().map(|m| m.id)),
                );
                Transacted::not_committed(step)
            }
        }
    }

    /// Holds each of `failed` for its backoff, or dead-letters it: the step after that.
    async fn hold(&mut self, term: &Term, failed: &[(PendingMessage, DeliveryError)]) -> Step {
        if failed.is_empty() {
            return Step::More;
        }
        match self.handle_failures(term, failed).await {
            Ok(Fenced::Done(())) => Step::More,
            Ok(Fenced::LeaseLost) => Step::NotLeader,
            Err(error) => {
                tracing::warn!(%error, "cannot record delivery failures");
                self.health.database(false);
                self.floor.uncovered(failed.iter().map(|(m, _)| m.id));
                Step::Failed
            }
        }
    }

    /// While there is a backlog, claims and sends more batches into the open transaction (up to
    /// `MAX_BATCHES_IN_FLIGHT`), so that claims overlap the acknowledgements of what was sent
    /// and one commit carries several batches. Not with `wait_for_standbys`, whose wait comes
    /// between a claim and its send.
    async fn claim_into_transaction(&mut self, term: &Term) {
        let max_messages = MAX_BATCHES_IN_FLIGHT * self.config.batch_size;
        let max_bytes = MAX_BATCHES_IN_FLIGHT * self.config.max_batch_bytes;
        // A message refused before it was sent (an invalid row, a topic not listed) is held
        // only once the transaction ends: a claim before that would take its key's next ones.
        while self.backlog
            && !self.in_flight.any_failed()
            && Progress::ranges_of(&self.in_flight.awaited_ids()) + self.config.batch_size
                <= MAX_RANGES
            && self.config.wait_for_standbys == 0
            && self.in_flight.len() < max_messages
            && self.in_flight.bytes() < max_bytes
            && self.term_still_valid(term)
        {
            // Without the messages that failed before: they go in transactions apart.
            let batch = match self.claim(term, false, true).await {
                Ok(batch) if !batch.is_empty() => batch,
                Ok(_) => break,
                Err(error) => {
                    // What was sent commits; the next step claims again.
                    tracing::warn!(%error, "cannot claim messages");
                    break;
                }
            };
            self.publisher
                .send(batch, Instant::now(), &mut self.in_flight, false)
                .await;
        }
    }

    /// Adds the progress record and commits, or aborts. Records that held the commit up until
    /// its deadline are failed (retriable), so that they and their keys are held back while the
    /// rest goes again. `alone`: the transaction is one record's.
    async fn commit(&mut self, term: &Term, progress: &Progress, alone: bool) -> Ended {
        let error = if progress.is_empty() {
            None
        } else if !self.term_still_valid(term) {
            self.abort().await;
            return Ended::Stopped(Step::NotLeader);
        } else {
            let sent = self
                .publisher
                .send_progress(&self.config.progress_topic, &progress.encode())
                .await;
            // Every record's acknowledgement first: the commit would wait for them too, but
            // rust-rdkafka's flush before it then took 100 ms per transaction, whatever the
            // batch. A record that fails makes the commit fail at once.
            let deadline = Instant::now() + COMMIT_TIMEOUT;
            match sent {
                Ok(delivery) => {
                    let acknowledged = self.in_flight.settle_all(deadline).await
                        && tokio::time::timeout_at(deadline, delivery).await.is_ok();
                    if let Some(step) = self.settle_completion().await {
                        self.abort().await;
                        return Ended::Stopped(step);
                    }
                    if acknowledged {
                        // Not bounded by the term: a commit that lands after the lease moved on
                        // is either before the next holder's init_transactions (which then
                        // reads its progress) or fenced by it.
                        match self.publisher.commit_transaction(COMMIT_TIMEOUT).await {
                            Ok(()) => {
                                self.publisher.alternate();
                                return Ended::Committed;
                            }
                            Err(error) => Some(error),
                        }
                    } else {
                        Some(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
                    }
                }
                Err(error) => Some(error),
            }
        };
        if error.as_ref().is_some_and(timed_out) {
            self.in_flight.fail_unsettled(|| {
                DeliveryError::Kafka(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageTimedOut,
                ))
            });
        }
        let aborted = self.abort().await;
        if aborted && error.as_ref().is_some_and(|e| !alone || timed_out(e)) {
            // A refused record leaves librdkafka's idempotence sequence of its partition behind
            // (a refusal is an abortable error without an epoch bump): that producer's next
            // transaction to the partition fails ("skipped sequence numbers"), is aborted, and
            // goes again after a backoff (librdkafka bumps the epoch then). After a transaction
            // of several records, or of records that timed out, the producer (now the alternate)
            // is replaced before the next transaction. After one record refused alone it is
            // kept: replacing it cost ~0.2 s per refusal, and a writer refused again and again
            // (oversized records, every 200 ms in chaos scenario 8b) held up every message
            // (healthy p50 0.5-0.8 s, against 10 ms with the producer kept); keeping it costs
            // only the next transaction to that same partition an abort.
            self.transactions.alternate_spent = true;
        }
        if !self.term_still_valid(term) {
            return Ended::Stopped(Step::NotLeader);
        }
        Ended::Aborted(error)
    }

    /// Aborts the open transaction; whether it did (else both producers are replaced, and the
    /// progress read again).
    async fn abort(&mut self) -> bool {
        match self.publisher.abort_transaction(ABORT_TIMEOUT).await {
            Ok(()) => {
                self.publisher.alternate();
                true
            }
            Err(error) => {
                // The next holder's (or this relay's next) init_transactions aborts it.
                let error = self.config.kafka.without_secrets(&error.to_string());
                tracing::warn!(%error, "cannot abort a Kafka transaction; creating new producers");
                self.publisher.purge();
                self.transactions.reinitialize();
                false
            }
        }
    }
}

fn timed_out(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::OperationTimedOut | RDKafkaErrorCode::MessageTimedOut)
    )
}
