//! A Kafka consumer loop for effectively-once processing with the [`outbox::Inbox`].
//!
//! For each record, in one database transaction: record (`x-source`, `x-sequence`) in the inbox;
//! if the record is new, run the handler; commit. Only then is the record's offset stored for
//! Kafka's commit. So:
//! - a redelivered record (relay duplicate, consumer restart, rebalance) finds its inbox row and
//!   is skipped without running the handler;
//! - a handler error rolls back the inbox row and the handler's writes, the offset is not
//!   stored, and the record is retried (with backoff) until it succeeds: a partition does not
//!   move past a record that was not applied;
//! - a crash anywhere loses nothing: what was not committed in the database is redelivered;
//! - a rebalance never stops the consumer: storing the offset of a record whose partition
//!   librdkafka no longer counts as this consumer's (`__STATE`, unknown partition) is ignored,
//!   and so is a commit at shutdown that has nothing to commit or is refused because the group
//!   moved on. That is safe because the record is already committed in the database: the
//!   partition's new owner starts from the last committed offset, is redelivered the record, and
//!   the inbox skips it. Any other Kafka error ends [`run`] with [`ConsumerError::Kafka`].
//!
//! **Exactly-once relays.** The consumer reads with `isolation.level=read_committed` (librdkafka's
//! default, set explicitly; it cannot be overridden): records of aborted Kafka transactions are
//! never delivered. Against a relay with `delivery = "exactly-once"` the relay publishes no
//! duplicates, so the inbox becomes a safety net (an operator's `outbox republish`, a consumer
//! that restarts before its offset was committed) rather than a necessity. A read_committed
//! consumer sees a transaction's records once it commits; Kafka answers a waiting fetch when the
//! high watermark moves, not when a commit moves the last stable offset, so committed records
//! can wait up to `fetch.wait.max.ms` (500 ms by default): lower it (say 10 ms) for latency.
//!
//! Records without a well-formed `x-sequence` or `x-source` cannot be deduplicated; they are
//! reported (log and [`ConsumerStats::malformed`]) and skipped, never a panic.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use outbox::{Inbox, SchemaName};
//! use outbox_consumer::{ConsumerConfig, ConsumerStats, Record};
//! use sqlx::{Postgres, Transaction};
//! use tokio_util::sync::CancellationToken;
//!
//! /// Applies one record to the read model; runs at most once per (`x-source`, `x-sequence`).
//! async fn apply(tx: &mut Transaction<'static, Postgres>, record: &Record) -> Result<(), sqlx::Error> {
//!     sqlx::query("INSERT INTO thing_view (source_sequence, payload) VALUES ($1, $2)")
//!         .bind(record.sequence)
//!         .bind(record.payload.as_deref())
//!         .execute(&mut **tx)
//!         .await?;
//!     Ok(())
//! }
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = sqlx::PgPool::connect("postgres://localhost/things_view").await?;
//! let inbox = Inbox::new(SchemaName::default());
//! inbox.migrate(&pool).await?;
//! let mut config = ConsumerConfig::new("kafka:9092", "thing-view", ["thing_topic"]);
//! config.retry_initial = Duration::from_millis(200);
//! let stats = Arc::new(ConsumerStats::default());
//! let cancel = CancellationToken::new(); // cancel it to stop
//! outbox_consumer::run(config, pool, inbox, stats, cancel, apply).await?;
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox::{headers, is_secret_property, Header, Inbox, Sequence};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message as _};
use rdkafka::ClientConfig;
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

/// A consumed record, owned, with its outbox identity parsed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Record {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key.
    pub key: Option<Vec<u8>>,
    /// Value.
    pub payload: Option<Vec<u8>>,
    /// Headers in order.
    pub headers: Vec<Header>,
    /// `x-source`.
    pub source: String,
    /// `x-sequence`.
    pub sequence: Sequence,
}

impl Record {
    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_slice())
    }

    /// The `x-value-type` header, if present and UTF-8.
    pub fn value_type(&self) -> Option<&str> {
        self.header(headers::VALUE_TYPE)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// Why a record lacks an outbox identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedRecord {
    /// No `x-sequence` header.
    #[error("no x-sequence header")]
    MissingSequence,
    /// `x-sequence` is not 8 bytes.
    #[error(transparent)]
    BadSequence(#[from] headers::MalformedSequence),
    /// No `x-source` header, or not UTF-8.
    #[error("no UTF-8 x-source header")]
    MissingSource,
}

impl Record {
    /// Parses a Kafka message; headers are read leniently (a malformed one is an error value).
    pub fn from_message(message: &BorrowedMessage<'_>) -> Result<Self, MalformedRecord> {
        let headers: Vec<Header> = message
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| Header {
                        name: h.key.to_owned(),
                        value: h.value.unwrap_or_default().to_vec(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let find = |name: &str| headers.iter().find(|h| h.name == name).map(|h| &h.value);
        let sequence = headers::decode_sequence(
            find(headers::SEQUENCE).ok_or(MalformedRecord::MissingSequence)?,
        )?;
        let source = find(headers::SOURCE)
            .and_then(|v| String::from_utf8(v.clone()).ok())
            .ok_or(MalformedRecord::MissingSource)?;
        Ok(Record {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().map(<[u8]>::to_vec),
            headers,
            source,
            sequence,
        })
    }
}

/// Counters of a running consumer, shared with the caller.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Records applied (new, handler succeeded, committed).
    pub applied: AtomicU64,
    /// Records skipped because the inbox had them.
    pub duplicates: AtomicU64,
    /// Handler or database failures (each retried).
    pub failures: AtomicU64,
    /// Records skipped for lack of an outbox identity.
    pub malformed: AtomicU64,
}

/// Consumer settings. `Debug` masks secret properties.
#[derive(Clone)]
#[non_exhaustive]
pub struct ConsumerConfig {
    /// Kafka bootstrap servers.
    pub bootstrap_servers: String,
    /// Consumer group.
    pub group_id: String,
    /// Topics to subscribe to.
    pub topics: Vec<String>,
    /// Delay before retrying a failed record (doubles up to 30 s).
    pub retry_initial: Duration,
    /// Extra librdkafka consumer properties, verbatim.
    pub properties: Vec<(String, String)>,
}

impl ConsumerConfig {
    /// A consumer in group `group_id` of `topics` on `bootstrap_servers`, retrying a failed
    /// record after 100 ms at first, with no extra properties.
    pub fn new(
        bootstrap_servers: impl Into<String>,
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ConsumerConfig {
            bootstrap_servers: bootstrap_servers.into(),
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            retry_initial: Duration::from_millis(100),
            properties: Vec::new(),
        }
    }

    /// Sets a librdkafka consumer property (`security.protocol`, `sasl.password`, ...).
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.properties.push((key.into(), value.into()));
        self
    }
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(key, value)| (key.as_str(), masked(key, value)))
            .collect();
        f.debug_struct("ConsumerConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("topics", &self.topics)
            .field("retry_initial", &self.retry_initial)
            .field("properties", &properties)
            .finish()
    }
}

fn masked<'a>(key: &str, value: &'a str) -> &'a str {
    if is_secret_property(key) {
        "********"
    } else {
        value
    }
}

/// librdkafka's refusal of a property echoes its value, in its own text too: mask it when the
/// property is a secret.
fn redact_config_error(error: KafkaError) -> KafkaError {
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

/// Why the consumer stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// Kafka client failure.
    #[error("Kafka consumer error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A property in `ConsumerConfig::properties` would break the at-least-once promise (offsets
    /// stored before the database commit) or contradicts a field of the config.
    #[error("the consumer property {0:?} is set by the consumer itself and cannot be overridden")]
    ReservedProperty(String),
}

/// Properties the consumer sets itself: the first two keep offsets behind the database commit,
/// the next two are fields of [`ConsumerConfig`], the last keeps records of aborted
/// transactions out.
const RESERVED_PROPERTIES: [&str; 5] = [
    "enable.auto.offset.store",
    "enable.auto.commit",
    "group.id",
    "bootstrap.servers",
    "isolation.level",
];

/// Runs until `cancel`: consumes `config.topics`, and for each new record runs `handler` inside
/// the transaction that records it in `inbox`.
pub async fn run<H, E>(
    config: ConsumerConfig,
    pool: PgPool,
    inbox: Inbox,
    stats: Arc<ConsumerStats>,
    cancel: CancellationToken,
    mut handler: H,
) -> Result<(), ConsumerError>
where
    H: AsyncFnMut(&mut Transaction<'static, Postgres>, &Record) -> Result<(), E>,
    E: std::fmt::Display,
{
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.bootstrap_servers)
        .set("group.id", &config.group_id)
        .set("auto.offset.reset", "earliest")
        // Offsets are stored only after the database commit; librdkafka commits stored offsets.
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        // Never a record of an aborted transaction (an exactly-once relay's, or any producer's).
        .set("isolation.level", "read_committed");
    for (key, value) in &config.properties {
        let key_lower = key.trim().to_ascii_lowercase();
        // Stating the consumer's own value is harmless.
        if key_lower == "isolation.level" && value.trim() == "read_committed" {
            continue;
        }
        if RESERVED_PROPERTIES.contains(&key_lower.as_str()) {
            return Err(ConsumerError::ReservedProperty(key.clone()));
        }
        client.set(key, value);
    }
    // A zero delay would retry a failing record in a tight loop.
    let retry_initial = config.retry_initial.max(Duration::from_millis(1));
    let consumer: StreamConsumer = client.create().map_err(redact_config_error)?;
    let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;

    loop {
        let message = tokio::select! {
            _ = cancel.cancelled() => break,
            message = consumer.recv() => message,
        };
        let message = match message {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "Kafka consumer error");
                continue;
            }
        };
        match Record::from_message(&message) {
            Ok(record) => {
                let applied = apply_until_done(
                    &pool,
                    &inbox,
                    &stats,
                    &cancel,
                    &mut handler,
                    &record,
                    retry_initial,
                )
                .await;
                if !applied {
                    break; // cancelled while retrying; the record stays uncommitted
                }
            }
            Err(reason) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    %reason,
                    "record without an outbox identity cannot be deduplicated; skipping it"
                );
            }
        }
        match consumer.store_offset_from_message(&message) {
            Ok(()) => {}
            Err(error) if partition_not_assigned(&error) => tracing::info!(
                topic = message.topic(),
                partition = message.partition(),
                offset = message.offset(),
                %error,
                "partition revoked while the record was handled; its new owner skips it as a duplicate"
            ),
            Err(error) => return Err(error.into()),
        }
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => Ok(()),
        Err(error) if nothing_to_commit(&error) => {
            tracing::debug!(%error, "no offsets of this consumer to commit at shutdown");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

/// Storing an offset failed only because the partition is not (or no longer) assigned to this
/// consumer: revoked or lost in a rebalance, or gone from the topic's metadata.
fn partition_not_assigned(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::State | RDKafkaErrorCode::UnknownPartition)
    )
}

/// The commit at shutdown failed only because nothing new was stored, or because the partitions
/// may be another member's now (assignment lost, group rebalancing or moved to a new generation).
fn nothing_to_commit(error: &KafkaError) -> bool {
    partition_not_assigned(error)
        || matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::NoOffset
                    | RDKafkaErrorCode::AssignmentLost
                    | RDKafkaErrorCode::RebalanceInProgress
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::UnknownMemberId
                    | RDKafkaErrorCode::FencedMemberEpoch
                    | RDKafkaErrorCode::StaleMemberEpoch
            )
        )
}

/// Returns false only when cancelled before the record was applied.
async fn apply_until_done<H, E>(
    pool: &PgPool,
    inbox: &Inbox,
    stats: &ConsumerStats,
    cancel: &CancellationToken,
    handler: &mut H,
    record: &Record,
    retry_initial: Duration,
) -> bool
where
    H: AsyncFnMut(&mut Transaction<'static, Postgres>, &Record) -> Result<(), E>,
    E: std::fmt::Display,
{
    let mut delay = retry_initial;
    loop {
        match apply_once(pool, inbox, handler, record).await {
            Ok(true) => {
                stats.applied.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(false) => {
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Err(error) => {
                stats.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    source = %record.source,
                    sequence = record.sequence,
                    %error,
                    ?delay,
                    "processing failed; rolled back, retrying"
                );
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// `Ok(true)`: applied; `Ok(false)`: duplicate; `Err`: rolled back.
async fn apply_once<H, E>(
    pool: &PgPool,
    inbox: &Inbox,
    handler: &mut H,
    record: &Record,
) -> Result<bool, String>
where
    H: AsyncFnMut(&mut Transaction<'static, Postgres>, &Record) -> Result<(), E>,
    E: std::fmt::Display,
{
    let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
    let new = inbox
        .try_record(&mut tx, &record.source, record.sequence)
        .await
        .map_err(|e| e.to_string())?;
    if !new {
        return Ok(false); // dropping tx rolls back
    }
    handler(&mut tx, record).await.map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(properties: &[(&str, &str)]) -> ConsumerConfig {
        ConsumerConfig {
            bootstrap_servers: "127.0.0.1:1".into(),
            group_id: "group".into(),
            topics: vec!["topic".into()],
            retry_initial: Duration::from_millis(10),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn debug_output_masks_secret_properties() {
        let config = config_with(&[
            ("sasl.username", "app"),
            ("sasl.password", "kafka-secret"),
            ("ssl.key.password", "key-secret"),
        ]);
        let shown = format!("{config:?}");
        assert!(
            shown.contains("sasl.password") && shown.contains("app"),
            "{shown}"
        );
        assert!(
            !shown.contains("kafka-secret") && !shown.contains("key-secret"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn secret_property_refused_by_librdkafka_is_not_echoed() {
        let config = config_with(&[(
            "sasl.jaas.config",
            "org.apache.kafka.common.security.plain.PlainLoginModule required password=\"jaas-secret\";",
        )]);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/nothing")
            .unwrap();
        let inbox = Inbox::new(outbox::SchemaName::default_schema());
        let error = run(
            config,
            pool,
            inbox,
            Arc::default(),
            CancellationToken::new(),
            async |_, _| Ok::<(), String>(()),
        )
        .await
        .expect_err("librdkafka refuses sasl.jaas.config");
        for shown in [error.to_string(), format!("{error:?}")] {
            assert!(shown.contains("sasl.jaas.config"), "{shown}");
            assert!(!shown.contains("jaas-secret"), "{shown}");
        }
    }

    /// `enable.auto.offset.store=true` stored offsets before the database commit: a crash lost
    /// records silently. `isolation.level=read_uncommitted` would deliver records of aborted
    /// transactions.
    #[tokio::test]
    async fn properties_that_break_at_least_once_are_refused() {
        for key in [
            "enable.auto.offset.store",
            "Enable.Auto.Commit",
            "group.id",
            "isolation.level",
        ] {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .connect_lazy("postgres://nobody@127.0.0.1:1/nothing")
                .unwrap();
            let error = run(
                config_with(&[(key, "true")]),
                pool,
                Inbox::new(outbox::SchemaName::default_schema()),
                Arc::default(),
                CancellationToken::new(),
                async |_, _| Ok::<(), String>(()),
            )
            .await
            .expect_err("refused");
            assert!(
                matches!(&error, ConsumerError::ReservedProperty(k) if k == key),
                "{error}"
            );
        }
    }

    #[test]
    fn only_a_partition_this_consumer_no_longer_holds_is_ignored_when_storing() {
        let store = KafkaError::StoreOffset;
        assert!(partition_not_assigned(&store(RDKafkaErrorCode::State)));
        assert!(partition_not_assigned(&store(
            RDKafkaErrorCode::UnknownPartition
        )));
        // A bad argument is a bug to surface, not a rebalance.
        assert!(!partition_not_assigned(&store(
            RDKafkaErrorCode::InvalidArgument
        )));
        assert!(!partition_not_assigned(&store(RDKafkaErrorCode::Fatal)));
    }

    #[test]
    fn only_nothing_to_commit_or_a_moved_group_is_ignored_at_shutdown() {
        let commit = KafkaError::ConsumerCommit;
        for code in [
            RDKafkaErrorCode::NoOffset,
            RDKafkaErrorCode::AssignmentLost,
            RDKafkaErrorCode::State,
            RDKafkaErrorCode::RebalanceInProgress,
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::UnknownMemberId,
        ] {
            assert!(nothing_to_commit(&commit(code)), "{code:?}");
        }
        for code in [
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::GroupAuthorizationFailed,
            RDKafkaErrorCode::TopicAuthorizationFailed,
        ] {
            assert!(!nothing_to_commit(&commit(code)), "{code:?}");
        }
    }
}
