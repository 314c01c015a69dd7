//! The Kafka side: producer settings and publishing one batch.
//!
//! Producer properties pass through to librdkafka verbatim; the relay only insists on what its
//! guarantees need:
//! - `enable.idempotence=true` and `acks=all`: no duplicates or reordering from the producer's
//!   own retries, and an acknowledgement means the record is on all in-sync replicas.
//! - `enable.gapless.guarantee=true`: if librdkafka ever has to give up on a record in a way that
//!   would let a later record of the same partition through, it raises a fatal error instead;
//!   the relay then rebuilds its producer and publishes again from the oldest pending message.
//! - `message.timeout.ms=0` (default, overridable): librdkafka retries a record until it is
//!   delivered or fails permanently. A finite timeout would let a record of a partition expire
//!   while a later one gets through after the broker recovers, which is a gap the relay could
//!   only repair by publishing out of order.
//! - `partitioner=murmur2_random` (default, overridable): a keyed record goes to the partition
//!   Java's producer picks for its key (murmur2), a keyless one to a random partition, so a key's
//!   events stay on one partition alongside Java producers or after moving from a Java relay.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use crate::postgres::PendingMessage;
use outbox::headers;
use outbox::headers::MalformedHeaders;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders, ToBytes};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext};
use tokio::time::Instant;

use crate::config::InvalidConfig;
use crate::in_flight::{delivery_result, InFlight, Outcome, Sent};
use crate::topics::Topics;

/// Librdkafka producer properties, passed through verbatim. `Debug` masks secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    properties: BTreeMap<String, String>,
}

use outbox::is_secret_property;

/// librdkafka's refusal of a property echoes its value, in its own text too (`Invalid value
/// "..." for configuration property "..."`): mask it when the property is a secret.
pub(crate) fn redact_config_error(error: KafkaError) -> KafkaError {
    match error {
        KafkaError::ClientConfig(code, description, key, value) if is_secret_property(&key) => {
            let description = if value.is_empty() {
                description
            } else {
                description.replace(&value, "********")
            };
            KafkaError::ClientConfig(code, description, key, "********".to_owned())
        }
        other => other,
    }
}

impl KafkaConfig {
    /// Properties for `bootstrap_servers` with the relay's defaults.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        let mut properties = BTreeMap::new();
        properties.insert("bootstrap.servers".to_owned(), bootstrap_servers.into());
        for (key, value) in [
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("enable.gapless.guarantee", "true"),
            ("message.timeout.ms", "0"),
            // The relay hands librdkafka a whole batch at once, so lingering only adds latency
            // (outbox-bench: p50 at 500 msg/s 14 ms with 5, 3 ms with 0; drain not slower).
            ("linger.ms", "0"),
            ("compression.type", "lz4"),
            // Java's murmur2, so keys land where Java producers put them (librdkafka's is CRC32).
            ("partitioner", "murmur2_random"),
            // Feeds the producer queue metrics.
            ("statistics.interval.ms", "5000"),
        ] {
            properties.insert(key.to_owned(), value.to_owned());
        }
        // The writers' default limit, counted the same way (`outbox::record_wire_size`).
        properties.insert(
            "message.max.bytes".to_owned(),
            outbox::DEFAULT_MAX_PAYLOAD_BYTES.to_string(),
        );
        KafkaConfig { properties }
    }

    /// Sets a librdkafka property (overriding a default).
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// A property's value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.properties.get(key).map(String::as_str)
    }

    /// The properties with secret values masked, for display.
    pub fn masked(&self) -> BTreeMap<String, String> {
        self.properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret_property(k) {
                    "********".to_owned()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }

    /// Rejects settings that would break the relay's delivery guarantees.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let required = [("enable.idempotence", "true"), ("acks", "all")];
        for (key, value) in required {
            match self.get(key) {
                Some(v) if v.eq_ignore_ascii_case(value) || (key == "acks" && v == "-1") => {}
                other => {
                    return Err(InvalidConfig::new(
                        format!("kafka.{key}"),
                        format!(
                            "must be {value} for at-least-once, in-order delivery (found {})",
                            other.unwrap_or("nothing")
                        ),
                    ))
                }
            }
        }
        if self.get("bootstrap.servers").is_none_or(str::is_empty) {
            return Err(InvalidConfig::new("kafka.bootstrap.servers", "must be set"));
        }
        if self.get("transactional.id").is_some() {
            return Err(InvalidConfig::new(
                "kafka.transactional.id",
                "is set by the relay itself with delivery = \"exactly-once\" (from lease_name and source); remove it",
            ));
        }
        Ok(())
    }

    /// `text` (librdkafka's words about a failure), or a stand-in when it quotes any part of a
    /// secret property's value: librdkafka quotes what it cannot parse (`sasl.oauthbearer.config`
    /// from where parsing stopped), and the text goes to health reports anyone may read.
    pub(crate) fn without_secrets(&self, text: &str) -> String {
        const WINDOW: usize = 6;
        let quotes_a_secret = self
            .properties
            .iter()
            .filter(|(key, _)| is_secret_property(key))
            .any(|(_, value)| {
                let chars: Vec<char> = value.chars().collect();
                if chars.len() < WINDOW {
                    return !value.is_empty() && text.contains(value.as_str());
                }
                chars
                    .windows(WINDOW)
                    .any(|window| text.contains(&window.iter().collect::<String>()))
            });
        match quotes_a_secret {
            true => "(librdkafka's message is withheld: it quotes a secret setting)".to_owned(),
            false => text.to_owned(),
        }
    }

    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// The exactly-once producer: transactional, as `id`. A record's delivery may time out
    /// (librdkafka requires it within the transaction's timeout): that aborts its transaction, so
    /// it leaves no gap. The gapless guarantee is for non-transactional producers.
    fn transactional_client_config(&self, id: &str) -> ClientConfig {
        let mut config = self.client_config();
        config.remove("enable.gapless.guarantee");
        let timeout = self
            .get("transaction.timeout.ms")
            .unwrap_or(DEFAULT_TRANSACTION_TIMEOUT_MS)
            .to_owned();
        if self.get("message.timeout.ms").is_none_or(|t| t == "0") {
            config.set("message.timeout.ms", &timeout);
        }
        config
            .set("transaction.timeout.ms", timeout)
            .set("transactional.id", id);
        config
    }

    /// The lane's producer (see [`Publisher`]): one record in flight at a time, awaited, so it
    /// needs neither idempotence nor the gapless guarantee, without which a refused record
    /// fails alone instead of failing the producer.
    pub(crate) fn lane_client_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config.remove("enable.gapless.guarantee");
        config
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1");
        config
    }

    /// The same connection and security settings, for a client that only reads metadata.
    pub(crate) fn metadata_client_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        for key in [
            "enable.idempotence",
            "enable.gapless.guarantee",
            "acks",
            "statistics.interval.ms",
        ] {
            config.remove(key);
        }
        config
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.masked()).finish()
    }
}

/// Whether retrying a failed delivery can succeed without anyone changing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// Broker down, leader election, timeouts, throttling, a topic not (yet) created: retry.
    Retriable,
    /// Kafka rejects this record as it is (too large, invalid, not authorized): retrying the
    /// same bytes fails the same way until an operator changes something.
    Permanent,
}

/// Classifies a delivery error by librdkafka's error code (never by message text).
pub(crate) fn classify(error: &KafkaError) -> ErrorClass {
    use RDKafkaErrorCode::*;
    match error.rdkafka_error_code() {
        Some(
            MessageSizeTooLarge
            | InvalidMessageSize
            | InvalidMessage
            | InvalidRecord
            | InvalidTopic
            | TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | PolicyViolation
            | UnsupportedForMessageFormat
            | InvalidTimestamp,
        ) => ErrorClass::Permanent,
        _ => ErrorClass::Retriable,
    }
}

/// Why one message was not delivered.
#[derive(Debug)]
pub(crate) enum DeliveryError {
    /// librdkafka or the broker refused or failed the record.
    Kafka(KafkaError),
    /// The stored row cannot be published as it is; it was never sent.
    Invalid(MalformedHeaders),
    /// The cluster does not list the topic, and another message is probing it (or too many
    /// topics are probed already); it was not sent.
    UnknownTopic(String),
    /// The partition of the message's key had no leader at the last listing; it was not sent
    /// (librdkafka would hold it, and its key, until one is elected).
    NoLeader(String, i32),
}

impl DeliveryError {
    /// Kafka refused the relay's principal the record's topic (or the cluster): an ACL.
    pub(crate) fn not_authorized(&self) -> bool {
        matches!(
            self,
            DeliveryError::Kafka(error) if matches!(
                error.rdkafka_error_code(),
                Some(RDKafkaErrorCode::TopicAuthorizationFailed | RDKafkaErrorCode::ClusterAuthorizationFailed)
            )
        )
    }

    pub(crate) fn class(&self) -> ErrorClass {
        match self {
            DeliveryError::Kafka(error) => classify(error),
            DeliveryError::Invalid(_) => ErrorClass::Permanent,
            DeliveryError::UnknownTopic(_) | DeliveryError::NoLeader(..) => ErrorClass::Retriable,
        }
    }

    /// The producer dropped the record without trying it: purged (lease lost, shutdown) or
    /// abandoned with a producer that failed fatally because of another record. Not an attempt
    /// at this message, so it is not counted or recorded against it.
    pub(crate) fn not_attempted(&self) -> bool {
        use RDKafkaErrorCode::*;
        match self {
            DeliveryError::Kafka(KafkaError::Canceled) => true,
            DeliveryError::Kafka(error) => matches!(
                error.rdkafka_error_code(),
                Some(PurgeQueue | PurgeInflight | Fatal)
            ),
            DeliveryError::Invalid(_)
            | DeliveryError::UnknownTopic(_)
            | DeliveryError::NoLeader(..) => false,
        }
    }

    /// A failure that retrying cannot cure until an operator acts: a record Kafka refuses, a
    /// topic that does not exist.
    pub(crate) fn needs_an_operator(&self) -> bool {
        self.class() == ErrorClass::Permanent || matches!(self, DeliveryError::UnknownTopic(_))
    }

    /// A broker refusal that applies to a whole produce request, so the record that caused it
    /// may be another one of the same request.
    pub(crate) fn shared_by_request(&self) -> bool {
        use RDKafkaErrorCode::*;
        matches!(self, DeliveryError::Kafka(error) if matches!(
            error.rdkafka_error_code(),
            Some(MessageSizeTooLarge | InvalidMessageSize | InvalidRecord | InvalidMessage)
        ))
    }
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryError::Kafka(error) => error.fmt(f),
            DeliveryError::Invalid(error) => error.fmt(f),
            DeliveryError::NoLeader(topic, partition) => write!(
                f,
                "partition {partition} of topic {topic:?} has no leader (its brokers are down)"
            ),
            DeliveryError::UnknownTopic(topic) => write!(
                f,
                "topic {topic:?} does not exist (the cluster does not list it; or this relay may not describe it)"
            ),
        }
    }
}

/// Bridges librdkafka's statistics into metrics.
pub(crate) struct StatsContext;

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        crate::metrics::producer_queue(statistics.msg_cnt, statistics.msg_size);
    }
}

/// librdkafka's default, stated so that `message.timeout.ms` can follow it.
const DEFAULT_TRANSACTION_TIMEOUT_MS: &str = "60000";

/// How long the first batch waits for the cluster's topics to be listed.
const FIRST_LISTING_WAIT: Duration = Duration::from_millis(500);
/// Topics the relay probes at once (see [`Publisher::send`]).
const MAX_PROBES: usize = 16;

/// Sends messages with one idempotent producer, and a second one, the lane, for records that
/// may be refused by the broker for their size.
///
/// A broker refuses a produce request as a whole when one record in it is over the topic's
/// `max.message.bytes`, and with `enable.gapless.guarantee` that fails the producer fatally:
/// everything it had in flight is abandoned and goes out again. So a record whose size before
/// compression is over its topic's limit is sent through the lane, alone and awaited, whose
/// producer has one record in flight at a time and reports a refusal as that record's error.
/// Per-key order holds: such a record is sent only while no earlier message of its key is in
/// flight, and the next ones are sent after it was acknowledged.
///
/// With exactly-once delivery there is no lane: such a record is set aside as a suspect (see
/// [`Publisher::send`]) and goes in a transaction of its own, so that a refusal aborts nothing
/// else.
pub(crate) struct Publisher {
    config: KafkaConfig,
    /// With exactly-once delivery: the two transactional ids, the active producer's first.
    /// Then the producers are transactional, there is no lane and no probe (see the
    /// `exactly_once` module).
    transactional_ids: Option<[String; 2]>,
    producer: FutureProducer<StatsContext>,
    /// With exactly-once delivery, the other transactional producer: transactions alternate.
    alternate: Option<FutureProducer<StatsContext>>,
    lane: Option<FutureProducer<StatsContext>>,
    source: Vec<u8>,
    topics: Topics,
}

impl Publisher {
    pub(crate) fn new(
        config: &KafkaConfig,
        source: &str,
        transactional_ids: Option<[String; 2]>,
    ) -> Result<Self, KafkaError> {
        let (producer, alternate) = producers(config, transactional_ids.as_ref())?;
        Ok(Publisher {
            config: config.clone(),
            transactional_ids,
            producer,
            alternate,
            lane: None,
            source: source.as_bytes().to_vec(),
            topics: Topics::start(config)?,
        })
    }

    /// Replaces the producers (after a fatal error; transactional ones for each term); what
    /// the relay learned of the cluster stays.
    pub(crate) fn renew(&mut self) -> Result<(), KafkaError> {
        (self.producer, self.alternate) = producers(&self.config, self.transactional_ids.as_ref())?;
        Ok(())
    }

    /// Replaces the alternate transactional producer (one that aborted a transaction for a
    /// failed record) and registers it with its coordinator.
    pub(crate) async fn renew_alternate(&mut self, timeout: Duration) -> Result<(), KafkaError> {
        let Some(ids) = &self.transactional_ids else {
            return Ok(());
        };
        let producer: FutureProducer<StatsContext> = self
            .config
            .transactional_client_config(&ids[1])
            .create_with_context(StatsContext)?;
        let registered = producer.clone();
        tokio::task::spawn_blocking(move || registered.init_transactions(timeout))
            .await
            .unwrap_or(Err(KafkaError::Canceled))?;
        self.alternate = Some(producer);
        Ok(())
    }

    /// The next transaction goes through the other transactional producer: while the
    /// coordinator still writes this one's commit markers, the other's are long written.
    pub(crate) fn alternate(&mut self) {
        if let (Some(alternate), Some(ids)) = (&mut self.alternate, &mut self.transactional_ids) {
            std::mem::swap(&mut self.producer, alternate);
            ids.swap(0, 1);
        }
    }

    /// Runs a blocking transaction call of the producer off the runtime's threads.
    async fn transaction_call(
        &self,
        call: impl FnOnce(&FutureProducer<StatsContext>) -> Result<(), KafkaError> + Send + 'static,
    ) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || call(&producer))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }

    /// Registers both transactional ids with their coordinator: aborts the transactions a
    /// previous holder left open and fences its producers.
    pub(crate) async fn init_transactions(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producers = [Some(self.producer.clone()), self.alternate.clone()];
        for producer in producers.into_iter().flatten() {
            tokio::task::spawn_blocking(move || producer.init_transactions(timeout))
                .await
                .unwrap_or(Err(KafkaError::Canceled))?;
        }
        Ok(())
    }

    pub(crate) fn begin_transaction(&self) -> Result<(), KafkaError> {
        self.producer.begin_transaction()
    }

    /// Commits the open transaction, after every record in it was acknowledged.
    ///
    /// rust-rdkafka flushes before it commits: while librdkafka still counts a delivery report
    /// (the polling thread is finishing it), that flush polls the queue itself for up to 100 ms,
    /// and the report goes to the polling thread, so the commit took 100 ms in most
    /// transactions. Waiting here for the count to reach zero takes microseconds.
    pub(crate) async fn commit_transaction(&self, timeout: Duration) -> Result<(), KafkaError> {
        let deadline = Instant::now() + timeout;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        self.transaction_call(move |p| p.commit_transaction(timeout))
            .await
    }

    /// Aborts the open transaction; what it had queued or in flight fails as purged.
    pub(crate) async fn abort_transaction(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.transaction_call(move |p| p.abort_transaction(timeout))
            .await
    }

    /// Adds the progress record to the open transaction: to partition 0, the one recovery
    /// reads, whatever the topic's partition count.
    pub(crate) async fn send_progress(
        &self,
        topic: &str,
        progress: &[u8],
    ) -> Result<DeliveryFuture, KafkaError> {
        let key = self
            .transactional_ids
            .as_ref()
            .map_or("", |ids| ids[0].as_str());
        let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic)
            .key(key)
            .payload(progress)
            .partition(0);
        enqueue(&self.producer, record).await
    }

    /// A fatal producer error (e.g. a broken gapless guarantee) makes the producer unusable.
    pub(crate) fn fatal_error(&self) -> Option<String> {
        [Some(&self.producer), self.alternate.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|p| p.client().fatal_error())
            .map(|(code, reason)| format!("{code:?}: {reason}"))
    }

    /// Hands `batch` to the producer in order, without waiting for deliveries: librdkafka
    /// batches and pipelines them. A record that librdkafka refuses at once (too large, an
    /// invalid row) is settled as failed, and no later message of its key in this batch is
    /// sent: they are dropped when `in_flight` is next settled.
    ///
    /// A topic the cluster does not list is probed: one message is sent (a broker that creates
    /// topics on first use creates it; otherwise librdkafka waits for it for
    /// `topic.metadata.propagation.max.ms`, 30 s by default), and the others fail at once as
    /// retriable, to be held and retried. So writers that enqueue to ever new topic names put
    /// at most `MAX_PROBES` messages in flight, not one per name.
    ///
    /// With exactly-once delivery, a record that may be over its topic's size limit is not sent
    /// but set aside as a suspect (settled as refused with its request, not blamed on it), to go
    /// in a transaction of its own, unless `own_transaction` says this is that transaction.
    pub(crate) async fn send(
        &mut self,
        batch: Vec<PendingMessage>,
        claimed_at: Instant,
        in_flight: &mut InFlight,
        own_transaction: bool,
    ) {
        in_flight.start_batch();
        self.topics.first_listing(FIRST_LISTING_WAIT).await;
        if self.transactional_ids.is_some() {
            let mut topics: Vec<&str> = batch.iter().map(|m| m.topic.as_str()).collect();
            topics.sort_unstable();
            topics.dedup();
            self.topics.limits(&topics, FIRST_LISTING_WAIT).await;
        }
        let mut probing = in_flight.probing();
        // Keys with a record refused at once (rare: keys are cloned only then).
        let mut refused: HashSet<(String, Vec<u8>)> = HashSet::new();
        let owned_key = |m: &PendingMessage| m.key.clone().map(|k| (m.topic.clone(), k));
        for message in batch {
            if !refused.is_empty() && owned_key(&message).is_some_and(|k| refused.contains(&k)) {
                continue;
            }
            let topic = self.topics.get(&message.topic, message.key.as_deref());
            let unlisted = topic.unlisted;
            // A probe cannot be part of a transaction: it may wait for its topic for long.
            let probe = unlisted
                && self.transactional_ids.is_none()
                && probing.len() < MAX_PROBES
                && probing.insert(message.topic.clone());
            let may_be_too_large = topic
                .limit
                .is_some_and(|limit| self.may_be_too_large(&message, limit));
            if may_be_too_large && self.transactional_ids.is_none() {
                // Through the lane it could overtake an earlier message of its key still in
                // flight: then it (and the rest of its key) waits for a later claim, which
                // holds the key back until that one is settled.
                if in_flight.unsettled_key(&message) {
                    refused.extend(owned_key(&message));
                    continue;
                }
                let result = self.send_alone(&message).await;
                if result.is_err() {
                    refused.extend(owned_key(&message));
                }
                let sent = Sent {
                    outcome: Outcome::Settled(result),
                    alone: true,
                    probe: false,
                };
                in_flight.push(message, claimed_at, sent);
                continue;
            }
            // Exactly once: to go in a transaction of its own (see the function's docs).
            let set_aside = may_be_too_large && !own_transaction;
            let sent = if unlisted && !probe {
                Err(DeliveryError::UnknownTopic(message.topic.clone()))
            } else if let Some(partition) = topic.no_leader {
                Err(DeliveryError::NoLeader(message.topic.clone(), partition))
            } else if set_aside {
                // As if refused with a request, so sent again alone (`InFlight::take_settled`).
                Err(DeliveryError::Kafka(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageSizeTooLarge,
                )))
            } else {
                send_with(&self.producer, &self.source, &message, topic.partition).await
            };
            // A record refused at once is refused for itself (`alone`), not for a request, but
            // for one set aside. (Only a refusal shared by a request reads `alone`.)
            let sent = match sent {
                Ok(delivery) => Sent {
                    outcome: Outcome::InFlight(delivery),
                    alone: false,
                    probe,
                },
                Err(error) => {
                    refused.extend(owned_key(&message));
                    Sent {
                        outcome: Outcome::Settled(Err(error)),
                        alone: !set_aside,
                        probe: false,
                    }
                }
            };
            in_flight.push(message, claimed_at, sent);
        }
    }

    /// Sends `message` through the lane (see [`Publisher`]), as the only record in flight there,
    /// and waits for its delivery.
    async fn send_alone(&mut self, message: &PendingMessage) -> Result<(), DeliveryError> {
        let lane = match self.lane.take() {
            Some(lane) => lane,
            None => self
                .config
                .lane_client_config()
                .create_with_context(StatsContext)
                .map_err(DeliveryError::Kafka)?,
        };
        let result = match send_with(&lane, &self.source, message, None).await {
            Ok(delivery) => delivery_result(delivery.await),
            Err(error) => Err(error),
        };
        self.lane = Some(lane);
        result
    }

    /// Messages are not acknowledged in time (a partition may have lost its leader): learn the
    /// cluster again.
    pub(crate) fn refresh_topics(&self) {
        self.topics.refresh();
    }

    /// Topics a probe found: they are listed from now on.
    pub(crate) fn topics_created(&self, topics: &[String]) {
        self.topics.created(topics);
    }

    /// Whether `message` may be over `limit`, its topic's `max.message.bytes`: its size before
    /// compression, as one record in a batch of its own (61 bytes of batch header).
    fn may_be_too_large(&self, message: &PendingMessage, limit: usize) -> bool {
        let size = outbox::record_wire_size(
            message.key.as_ref().map_or(0, Vec::len),
            message.payload.as_ref().map_or(0, Vec::len),
            message
                .headers
                .iter()
                .map(|h| (h.name.len(), h.value.len()))
                .chain([
                    (headers::SEQUENCE.len(), 8),
                    (headers::SOURCE.len(), self.source.len()),
                ]),
        );
        size + 61 > limit
    }

    /// Sends each of `suspects` again as the only record in flight, one after the other, so
    /// that the refusal falls on the record that caused it alone; the results are settled
    /// messages of `in_flight`. A suspect behind a failed one of its key is not sent.
    pub(crate) async fn publish_alone(
        &mut self,
        suspects: Vec<PendingMessage>,
        claimed_at: Instant,
        in_flight: &mut InFlight,
    ) {
        let mut failed: HashSet<(String, Vec<u8>)> = HashSet::new();
        for message in suspects {
            let key = message.key.clone().map(|k| (message.topic.clone(), k));
            if key.as_ref().is_some_and(|k| failed.contains(k)) {
                continue;
            }
            let result = self.send_alone(&message).await;
            if result.is_err() {
                failed.extend(key);
            }
            let sent = Sent {
                outcome: Outcome::Settled(result),
                alone: true,
                probe: false,
            };
            in_flight.push(message, claimed_at, sent);
        }
    }

    /// Drops everything queued or in flight: used when the lease is lost, so a deposed relay
    /// stops publishing as soon as it knows.
    pub(crate) fn purge(&self) {
        for producer in [Some(&self.producer), self.alternate.as_ref()]
            .into_iter()
            .flatten()
        {
            producer.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
        }
    }
}

/// The producer, and with exactly-once delivery the alternate one, for `ids` in order.
fn producers(
    config: &KafkaConfig,
    ids: Option<&[String; 2]>,
) -> Result<
    (
        FutureProducer<StatsContext>,
        Option<FutureProducer<StatsContext>>,
    ),
    KafkaError,
> {
    let create = |config: ClientConfig| config.create_with_context(StatsContext);
    Ok(match ids {
        Some([first, second]) => (
            create(config.transactional_client_config(first))?,
            Some(create(config.transactional_client_config(second))?),
        ),
        None => (create(config.client_config())?, None),
    })
}

/// Hands `message` to `producer` (waiting while its queue is full), to `partition` if given,
/// else where the producer's partitioner puts it.
async fn send_with(
    producer: &FutureProducer<StatsContext>,
    source: &[u8],
    message: &PendingMessage,
    partition: Option<i32>,
) -> Result<DeliveryFuture, DeliveryError> {
    if let Some(invalid) = &message.invalid {
        return Err(DeliveryError::Invalid(invalid.clone()));
    }
    let sequence = headers::encode_sequence(message.id);
    let mut record_headers = OwnedHeaders::new_with_capacity(2 + message.headers.len())
        .insert(Header {
            key: headers::SEQUENCE,
            value: Some(&sequence[..]),
        })
        .insert(Header {
            key: headers::SOURCE,
            value: Some(source),
        });
    for header in &message.headers {
        record_headers = record_headers.insert(Header {
            key: &header.name,
            value: Some(&header.value[..]),
        });
    }
    let mut record: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(&message.topic).headers(record_headers);
    if let Some(key) = &message.key {
        record = record.key(&key[..]);
    }
    if let Some(payload) = &message.payload {
        record = record.payload(&payload[..]);
    }
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    enqueue(producer, record)
        .await
        .map_err(DeliveryError::Kafka)
}

/// Hands `record` to `producer`, waiting while its queue is full: the queue drains as
/// deliveries are reported, whether or not they are awaited.
async fn enqueue<K, P>(
    producer: &FutureProducer<StatsContext>,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, KafkaError>
where
    K: ToBytes + ?Sized,
    P: ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((error, _)) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn librdkafka_texts_that_quote_part_of_a_secret_are_withheld() {
        let mut config = KafkaConfig::new("broker:9092");
        config.set(
            "sasl.oauthbearer.config",
            "principal=relay extension_token=abc123xyz789",
        );
        config.set("sasl.password", "pw");
        let quoted =
            "Unrecognized sasl.oauthbearer.config beginning at: extension_token=abc123xyz789";
        assert!(!config.without_secrets(quoted).contains("abc123"));
        assert!(!config.without_secrets("bad password: pw").contains("pw"));
        let plain = "SASL authentication error: invalid credentials";
        assert_eq!(config.without_secrets(plain), plain);
    }

    use super::*;

    #[test]
    fn debug_masks_secrets() {
        let mut config = KafkaConfig::new("broker:9092");
        config
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "s3cret")
            .set("sasl.oauthbearer.client.secret", "abc")
            .set("client.id", "relay-1");
        let shown = format!("{config:?}");
        for secret in ["hunter2", "s3cret", "abc"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("relay-1"));
        assert!(shown.contains("sasl.password"));
    }

    #[test]
    fn errors_are_classified_by_code() {
        let produce = |code| KafkaError::MessageProduction(code);
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert_eq!(classify(&produce(code)), ErrorClass::Permanent, "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::NotEnoughReplicas,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::PurgeQueue,
        ] {
            assert_eq!(classify(&produce(code)), ErrorClass::Retriable, "{code:?}");
        }
    }

    #[test]
    fn weakening_delivery_settings_is_rejected() {
        let mut config = KafkaConfig::new("broker:9092");
        config.set("acks", "1");
        assert_eq!(config.validate().unwrap_err().key, "kafka.acks");
        let mut config = KafkaConfig::new("broker:9092");
        config.set("enable.idempotence", "false");
        assert_eq!(
            config.validate().unwrap_err().key,
            "kafka.enable.idempotence"
        );
    }
}
