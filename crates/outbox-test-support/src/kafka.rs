use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::metadata::Metadata;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::{kafka_bootstrap_servers, short_id};

/// A topic name no other test uses. Under `dev/test` it carries the run's tag
/// (`DEV_TEST_RUN`, hex digits), so that the script deletes this run's topics at its end and
/// no one else's.
pub fn unique_topic(prefix: &str) -> String {
    match std::env::var("DEV_TEST_RUN") {
        Ok(run) if (1..=16).contains(&run.len()) && run.bytes().all(|b| b.is_ascii_hexdigit()) => {
            format!("{prefix}-{run}-{}", short_id())
        }
        _ => format!("{prefix}-{}", short_id()),
    }
}

/// Creates `topic` with `partitions` partitions on `bootstrap` (replication 1). Panics with
/// instructions when Kafka is unreachable.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    create_replicated_topic(bootstrap, topic, partitions, 1).await;
}

/// Creates `topic` with `partitions` partitions, each on `replication` brokers.
pub async fn create_replicated_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
) {
    create_topic_with_config(bootstrap, topic, partitions, replication, &[]).await;
}

/// Creates `topic` with topic-level settings such as `("max.message.bytes", "10000")`.
pub async fn create_topic_with_config(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
    config: &[(&str, &str)],
) {
    create(
        bootstrap,
        NewTopic::new(topic, partitions, TopicReplication::Fixed(replication)),
        config,
    )
    .await;
}

/// Creates `topic` with its partitions on the given brokers: `replicas[p]` lists partition
/// `p`'s replicas by node id, the first one its preferred leader.
pub async fn create_topic_on(bootstrap: &str, topic: &str, replicas: &[&[i32]]) {
    create(
        bootstrap,
        NewTopic::new(
            topic,
            replicas.len() as i32,
            TopicReplication::Variable(replicas),
        ),
        &[],
    )
    .await;
}

async fn create(bootstrap: &str, topic: NewTopic<'_>, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let results = admin
        .create_topics(
            &[config
                .iter()
                .fold(topic, |new, (key, value)| new.set(key, value))],
            &options,
        )
        .await
        .unwrap_or_else(|error| {
            panic!("cannot reach Kafka at {bootstrap}: {error}\nStart the services with: eval \"$(dev/up)\"")
        });
    for result in results {
        result.unwrap_or_else(|(name, code)| panic!("cannot create topic {name}: {code:?}"));
    }
}

/// Sets topic-level settings of an existing `topic`, such as `("max.message.bytes", "1000000")`
/// (the others keep their values).
pub async fn alter_topic_config(bootstrap: &str, topic: &str, config: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let alter = config.iter().fold(
        AlterConfig::new(ResourceSpecifier::Topic(topic)),
        |alter, (key, value)| alter.set(key, value),
    );
    let results = admin
        .alter_configs(&[alter], &options)
        .await
        .unwrap_or_else(|error| panic!("cannot reach Kafka at {bootstrap}: {error}"));
    for result in results {
        result.unwrap_or_else(|(name, code)| panic!("cannot alter topic {name:?}: {code:?}"));
    }
}

/// A client for metadata queries, and `topic`'s metadata.
fn topic_metadata(bootstrap: &str, topic: &str) -> (BaseConsumer, Metadata) {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("metadata client");
    let metadata = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("topic metadata");
    (client, metadata)
}

/// Records ever written to `topic`: the sum of its partitions' high watermarks (offsets are
/// contiguous without transactions), duplicates included.
pub fn record_count(bootstrap: &str, topic: &str) -> i64 {
    let (client, metadata) = topic_metadata(bootstrap, topic);
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (low, high) = client
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            assert_eq!(low, 0, "records were deleted from {topic}");
            high
        })
        .sum()
}

/// The node id leading `partition` of `topic`.
pub fn partition_leader(bootstrap: &str, topic: &str, partition: i32) -> i32 {
    let (_, metadata) = topic_metadata(bootstrap, topic);
    metadata.topics()[0]
        .partitions()
        .iter()
        .find(|p| p.id() == partition)
        .expect("partition")
        .leader()
}

/// A record as read back from Kafka.
#[derive(Debug, Clone)]
pub struct Received {
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Received {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The decoded `x-sequence` header; panics when absent or malformed.
    pub fn sequence(&self) -> i64 {
        outbox::headers::decode_sequence(
            self.header(outbox::headers::SEQUENCE)
                .expect("x-sequence header"),
        )
        .expect("well-formed x-sequence")
    }

    /// The key as UTF-8.
    pub fn key_str(&self) -> &str {
        std::str::from_utf8(self.key.as_deref().expect("key")).expect("utf-8 key")
    }

    /// The payload as UTF-8.
    pub fn payload_str(&self) -> &str {
        std::str::from_utf8(self.payload.as_deref().expect("payload")).expect("utf-8 payload")
    }
}

/// Reads a topic from the beginning of every partition, without a consumer group.
pub struct TopicReader {
    consumer: BaseConsumer,
    /// Everything read so far, in arrival order per partition.
    pub received: Vec<Received>,
}

impl TopicReader {
    /// Reads `topic` (which must exist) on the default broker.
    pub fn new(topic: &str) -> Self {
        Self::on(&kafka_bootstrap_servers(), topic)
    }

    /// Reads `topic` on `bootstrap`.
    pub fn on(bootstrap: &str, topic: &str) -> Self {
        Self::with(
            &[("bootstrap.servers".to_owned(), bootstrap.to_owned())],
            topic,
        )
    }

    /// Reads `topic` with these librdkafka properties (`bootstrap.servers`, security), as a
    /// reader that is assigned every partition and commits nothing.
    pub fn with(properties: &[(String, String)], topic: &str) -> Self {
        let mut config = ClientConfig::new();
        config
            .set("group.id", format!("reader-{}", short_id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // librdkafka's default, stated: records of aborted transactions are never read.
            .set("isolation.level", "read_committed");
        for (key, value) in properties {
            config.set(key, value);
        }
        let consumer: BaseConsumer = config.create().expect("consumer");
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap_or_else(|error| panic!("cannot read metadata of {topic}: {error}"));
        let mut assignment = TopicPartitionList::new();
        for partition in metadata.topics()[0].partitions() {
            assignment
                .add_partition_offset(topic, partition.id(), Offset::Beginning)
                .expect("assignment");
        }
        assert!(assignment.count() > 0, "topic {topic} has no partitions");
        consumer.assign(&assignment).expect("assign");
        TopicReader {
            consumer,
            received: Vec::new(),
        }
    }

    /// Reads until `done(&received)` holds; panics after `timeout`.
    pub async fn read_until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !done(&self.received) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {timeout:?}; read {} records so far",
                self.received.len()
            );
            self.poll_for(Duration::from_millis(50)).await;
        }
    }

    /// Reads until at least `count` records arrived.
    pub async fn read_at_least(&mut self, count: usize, timeout: Duration) -> &[Received] {
        self.read_until(timeout, |r| r.len() >= count).await;
        &self.received
    }

    /// Keeps reading for `duration` (to prove that something does *not* arrive).
    pub async fn read_for(&mut self, duration: Duration) -> &[Received] {
        let deadline = tokio::time::Instant::now() + duration;
        while tokio::time::Instant::now() < deadline {
            self.poll_for(Duration::from_millis(50)).await;
        }
        &self.received
    }

    async fn poll_for(&mut self, duration: Duration) {
        // BaseConsumer::poll blocks; it runs on a blocking thread so the relay under test keeps
        // its share of the runtime.
        let consumer = &self.consumer;
        let batch = tokio::task::block_in_place(|| {
            let mut batch = Vec::new();
            let deadline = std::time::Instant::now() + duration;
            while let Some(now) = Some(std::time::Instant::now()).filter(|now| *now < deadline) {
                match consumer.poll(deadline - now) {
                    Some(Ok(message)) => batch.push(Received {
                        partition: message.partition(),
                        offset: message.offset(),
                        key: message.key().map(<[u8]>::to_vec),
                        payload: message.payload().map(<[u8]>::to_vec),
                        headers: message
                            .headers()
                            .map(|headers| {
                                headers
                                    .iter()
                                    .map(|h| {
                                        (h.key.to_owned(), h.value.unwrap_or_default().to_vec())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    }),
                    // Brokers going away is what chaos tests do; the read deadline still bounds
                    // the wait, so a reader only reports transient errors.
                    Some(Err(error)) => eprintln!("reader: consumer error (retrying): {error}"),
                    None => break,
                }
            }
            batch
        });
        self.received.extend(batch);
    }

    /// Checks per-key order: the first delivery of each sequence, per key, must be increasing.
    /// Returns the number of duplicate deliveries seen.
    pub fn assert_per_key_order(&self) -> usize {
        self.assert_per_key_order_except(i64::MIN)
    }

    /// As [`TopicReader::assert_per_key_order`], ignoring the sequence `requeued` (a dead letter
    /// put back by an operator lands after later messages of its key, by design).
    pub fn assert_per_key_order_except(&self, requeued: i64) -> usize {
        let mut last_first: HashMap<Option<Vec<u8>>, i64> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut duplicates = 0;
        for record in &self.received {
            let sequence = record.sequence();
            if !seen.insert(sequence) {
                duplicates += 1;
                continue;
            }
            if sequence == requeued {
                continue;
            }
            if let Some(previous) = last_first.insert(record.key.clone(), sequence) {
                assert!(
                    previous < sequence,
                    "per-key order broken for key {:?}: sequence {sequence} arrived after {previous}",
                    record.key.as_deref().map(String::from_utf8_lossy)
                );
            }
        }
        duplicates
    }

    /// Distinct sequences received.
    pub fn distinct_sequences(&self) -> std::collections::BTreeSet<i64> {
        self.received.iter().map(Received::sequence).collect()
    }
}
