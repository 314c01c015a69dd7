//! Relay configuration, validated before anything starts.

use std::time::Duration;

use outbox::SchemaName;

use crate::kafka::KafkaConfig;

/// What happens to a message once Kafka acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Move the row to the `published` table with its `processed_at` time (for republishing
    /// and audits); the leader deletes rows older than `retention` in bounded batches.
    Keep {
        /// How long published rows are kept.
        retention: Duration,
    },
    /// Delete the row as soon as it is acknowledged.
    Delete,
}

/// What happens to a message Kafka rejects permanently (too large, invalid, not authorized).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoisonPolicy {
    /// Keep it, and every later message of its key, in the outbox, retrying with capped backoff
    /// until the cause is fixed; other keys keep flowing. Preserves order. The default.
    Block,
    /// Move it to the dead-letter table with its error and attempts; later messages of its key
    /// continue. `outbox dead-letters retry` puts it back with its original sequence.
    DeadLetter,
}

/// What a consumer reading with `isolation.level=read_committed` sees of each committed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// At least once: a relay killed after Kafka acknowledged a batch and before the database
    /// marked it complete publishes that batch again. Consumers deduplicate (the inbox). The
    /// default.
    AtLeastOnce,
    /// Exactly once, through relay crashes, lease handovers and broker restarts: each batch is
    /// one Kafka transaction that also records its outbox ids in the progress topic, and a
    /// holder completes what Kafka already has before it claims (see the `exactly_once`
    /// module). Consumers must read with `isolation.level=read_committed` (librdkafka's
    /// default; Java's is `read_uncommitted`). The broker must support transactions, and the
    /// relay's principal needs `Write` and `Describe` on its transactional ids
    /// ([`RelayConfig::transactional_id`] and the same with `.1`) and on the progress topic.
    ExactlyOnce,
}

/// Relay settings. [`RelayConfig::new`] gives production defaults; [`RelayConfig::validate`]
/// names the setting at fault.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Schema holding the outbox objects.
    pub schema: SchemaName,
    /// Sent as `x-source` on every record; identifies the publishing service to consumers.
    pub source: String,
    /// Name of the lease row: relays sharing a name take turns (one active at a time).
    pub lease_name: String,
    /// How long a lease term lasts without renewal. A standby takes over at most this long after
    /// the holder stops renewing.
    pub lease_ttl: Duration,
    /// How often the holder renews; must be well under `lease_ttl` (at most a third of it).
    pub lease_renew_interval: Duration,
    /// Messages claimed and sent per batch.
    pub batch_size: usize,
    /// Bytes of keys and payloads per batch: a batch ends at `batch_size` messages or here,
    /// whichever comes first (a single larger message still goes alone). Bounds the relay's
    /// memory whatever the payload sizes.
    pub max_batch_bytes: usize,
    /// Fallback poll when no notification arrives (notifications can be lost on reconnects).
    pub poll_interval: Duration,
    /// How long a batch may fill while traffic is light: after a claim that did not fill a
    /// batch, the next claim starts no sooner than this after it. Adds at most this much
    /// latency; saves a claim and a completion (and their commits) per few messages. Zero
    /// claims again at once.
    pub batch_linger: Duration,
    /// Keep-and-clean-up or delete-on-ack.
    pub completion: Completion,
    /// What to do with messages Kafka rejects permanently.
    pub poison_policy: PoisonPolicy,
    /// How often the leader runs retention cleanup (with [`Completion::Keep`]).
    pub cleanup_interval: Duration,
    /// Rows deleted per cleanup statement, so cleanup never holds long locks.
    pub cleanup_batch_size: usize,
    /// First retry delay after a failure; doubles per consecutive failure, with jitter.
    pub backoff_initial: Duration,
    /// Cap of the retry delay.
    pub backoff_max: Duration,
    /// On shutdown, how long to wait for in-flight deliveries before giving up on them (they
    /// stay pending and are published again by the next holder).
    pub shutdown_timeout: Duration,
    /// A leader whose backlog has not shrunk for this long reports itself not ready.
    pub stall_timeout: Duration,
    /// How often the backlog and Kafka's reachability are sampled for health and metrics.
    pub monitor_interval: Duration,
    /// No phantom events after a failover: publish a message only once at least this many
    /// streaming standbys have flushed the WAL that commits it (0, the default: publish at
    /// once). With asynchronous replication a commit the standby never received is lost when
    /// the standby is promoted; published, it would be an event whose data does not exist. Set
    /// it to the number of standbys a failover may promote; like synchronous replication,
    /// publishing waits while fewer are streaming. See the crate docs, "Failover".
    pub wait_for_standbys: u32,
    /// Which walsenders count for `wait_for_standbys`, by `application_name` (as in
    /// `synchronous_standby_names`; give each standby its own, `cluster_name` or
    /// `application_name` in its `primary_conninfo`). Empty (the default): every physical
    /// walsender but `pg_basebackup`, `pg_receivewal` and Barman's `barman_receive_wal`.
    pub standby_names: Vec<String>,
    /// At-least-once (the default) or exactly-once publication.
    pub delivery: Delivery,
    /// With [`Delivery::ExactlyOnce`]: the compacted one-partition topic where each batch's
    /// transaction records the outbox ids it published, keyed by the transactional id. The
    /// relay creates it if it is missing. Give each outbox relay group its own.
    pub progress_topic: String,
    /// Kafka producer properties, passed to librdkafka verbatim.
    pub kafka: KafkaConfig,
}

/// A relay setting that cannot work, named by its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid relay configuration: {key}: {reason}")]
pub struct InvalidConfig {
    /// The setting at fault, as named in configuration files (`lease_ttl`, `kafka.acks`, ...).
    pub key: String,
    /// Why it is rejected.
    pub reason: String,
    /// For a rule between two settings, the other one.
    counterpart: Option<&'static str>,
}

impl InvalidConfig {
    pub(crate) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        InvalidConfig {
            key: key.into(),
            reason: reason.into(),
            counterpart: None,
        }
    }

    /// A rule between `key` and `counterpart`; `reason` names both.
    fn between(key: &str, counterpart: &'static str, reason: String) -> Self {
        InvalidConfig {
            counterpart: Some(counterpart),
            ..InvalidConfig::new(key, reason)
        }
    }

    /// For a rule between two settings, the other one involved (`lease_ttl` when
    /// `lease_renew_interval` is more than a third of it), so that a caller can name the one
    /// its user set.
    pub fn counterpart(&self) -> Option<&str> {
        self.counterpart
    }
}

impl RelayConfig {
    /// Defaults for a relay publishing to `bootstrap_servers` as `source`.
    pub fn new(bootstrap_servers: impl Into<String>, source: impl Into<String>) -> Self {
        RelayConfig {
            schema: SchemaName::default_schema(),
            source: source.into(),
            lease_name: "relay".to_owned(),
            lease_ttl: Duration::from_secs(10),
            lease_renew_interval: Duration::from_secs(3),
            // outbox-bench drains of 256-byte messages: 1000 → 88k msg/s, 5000 → 126k msg/s
            // (later ~160k; 38 MB peak RSS). 10000 was ahead of 5000 in only 7 of 12 interleaved
            // rounds (medians +3% on average, 55 MB), 20000 no faster, so 5000 stays.
            // max_batch_bytes keeps large payloads from multiplying the memory.
            batch_size: 5000,
            max_batch_bytes: 8 * 1024 * 1024,
            poll_interval: Duration::from_secs(1),
            // outbox-bench `steady --steady-linger-ms 0,2,5,10` (writer processes at 500 and
            // 2,000 msg/s, the daemon; docs/performance.md): 2 ms keeps commit → consumer p99
            // at 6.5 / 12.8 ms and cuts the relay's CPU per message by a quarter at 500 msg/s
            // (0 ms: 7.7 / 20.1 ms); 5 ms saves a quarter more and costs p99 10 / 14-24 ms.
            batch_linger: Duration::from_millis(2),
            completion: Completion::Keep {
                retention: Duration::from_secs(7 * 24 * 3600),
            },
            poison_policy: PoisonPolicy::Block,
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch_size: 10_000,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            monitor_interval: Duration::from_secs(5),
            wait_for_standbys: 0,
            standby_names: Vec::new(),
            delivery: Delivery::AtLeastOnce,
            progress_topic: "outbox-progress".to_owned(),
            kafka: KafkaConfig::new(bootstrap_servers),
        }
    }

    /// The Kafka transactional id with [`Delivery::ExactlyOnce`]: `outbox:` followed by the
    /// lease name and the source. Stable across holders, so that a new holder's producer fences
    /// the previous one; unique per outbox, as `source` is.
    pub fn transactional_id(&self) -> String {
        format!("outbox:{}:{}", self.lease_name, self.source)
    }

    /// The two transactional ids transactions alternate between: [`Self::transactional_id`]
    /// and the same with `.1` appended (a prefixed ACL on the first covers both).
    pub(crate) fn transactional_ids(&self) -> [String; 2] {
        let id = self.transactional_id();
        let second = format!("{id}.1");
        [id, second]
    }

    /// Checks every setting; the error names the first one at fault (for a rule between two,
    /// one of them, the other in [`InvalidConfig::counterpart`]).
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        if self.source.is_empty() {
            return Err(InvalidConfig::new("source", "must not be empty"));
        }
        if self.source.len() > outbox::MAX_SOURCE_BYTES {
            // Writers reserve room for x-source in every record's size; a longer one could
            // make a record they accepted too large for the producer.
            return Err(InvalidConfig::new(
                "source",
                format!(
                    "must be at most {} bytes (found {})",
                    outbox::MAX_SOURCE_BYTES,
                    self.source.len()
                ),
            ));
        }
        if self.lease_name.is_empty() {
            return Err(InvalidConfig::new("lease_name", "must not be empty"));
        }
        for (key, value) in [
            ("lease_ttl", self.lease_ttl),
            ("lease_renew_interval", self.lease_renew_interval),
            ("poll_interval", self.poll_interval),
            ("cleanup_interval", self.cleanup_interval),
            ("backoff_initial", self.backoff_initial),
            ("backoff_max", self.backoff_max),
            ("shutdown_timeout", self.shutdown_timeout),
            ("stall_timeout", self.stall_timeout),
            ("monitor_interval", self.monitor_interval),
        ] {
            if value > MAX_INTERVAL {
                return Err(InvalidConfig::new(
                    key,
                    format!("must be at most {MAX_INTERVAL:?} (found {value:?})"),
                ));
            }
        }
        if self.lease_ttl < Duration::from_millis(100) {
            return Err(InvalidConfig::new(
                "lease_ttl",
                format!("must be at least 100ms (found {:?})", self.lease_ttl),
            ));
        }
        if self.lease_renew_interval.is_zero() || self.lease_renew_interval * 3 > self.lease_ttl {
            return Err(InvalidConfig::between(
                "lease_renew_interval",
                "lease_ttl",
                format!(
                    "lease_renew_interval ({:?}) must be positive and at most a third of lease_ttl ({:?}), so that a renewal can fail twice before the lease expires",
                    self.lease_renew_interval, self.lease_ttl
                ),
            ));
        }
        if self.wait_for_standbys > MAX_STANDBYS {
            return Err(InvalidConfig::new(
                "wait_for_standbys",
                format!(
                    "must be at most {MAX_STANDBYS} (found {})",
                    self.wait_for_standbys
                ),
            ));
        }
        if let Some(name) = self.standby_names.iter().find(|n| n.trim().is_empty()) {
            return Err(InvalidConfig::new(
                "standby_names",
                format!("names must not be empty (found {name:?})"),
            ));
        }
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return Err(InvalidConfig::new(
                "batch_size",
                format!("must be between 1 and 100000 (found {})", self.batch_size),
            ));
        }
        if self.max_batch_bytes == 0 || self.max_batch_bytes > 1 << 30 {
            return Err(InvalidConfig::new(
                "max_batch_bytes",
                format!(
                    "must be between 1 and 1073741824 (found {})",
                    self.max_batch_bytes
                ),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(InvalidConfig::new("poll_interval", "must be positive"));
        }
        if self.batch_linger > Duration::from_secs(1) {
            return Err(InvalidConfig::new(
                "batch_linger",
                format!("must be at most 1s (found {:?})", self.batch_linger),
            ));
        }
        if let Completion::Keep { retention } = self.completion {
            if retention > MAX_RETENTION {
                return Err(InvalidConfig::new(
                    "retention",
                    format!("must be at most {MAX_RETENTION_YEARS} years"),
                ));
            }
        }
        if self.cleanup_interval.is_zero() {
            return Err(InvalidConfig::new("cleanup_interval", "must be positive"));
        }
        if self.cleanup_batch_size == 0 || self.cleanup_batch_size > MAX_CLEANUP_BATCH_SIZE {
            return Err(InvalidConfig::new(
                "cleanup_batch_size",
                format!(
                    "must be between 1 and {MAX_CLEANUP_BATCH_SIZE} (found {})",
                    self.cleanup_batch_size
                ),
            ));
        }
        if self.backoff_initial.is_zero() {
            return Err(InvalidConfig::new("backoff_initial", "must be positive"));
        }
        if self.backoff_initial > self.backoff_max {
            return Err(InvalidConfig::between(
                "backoff_initial",
                "backoff_max",
                format!(
                    "backoff_initial ({:?}) must not be above backoff_max ({:?})",
                    self.backoff_initial, self.backoff_max
                ),
            ));
        }
        if self.monitor_interval.is_zero() {
            return Err(InvalidConfig::new("monitor_interval", "must be positive"));
        }
        if self.stall_timeout <= self.monitor_interval {
            return Err(InvalidConfig::between(
                "stall_timeout",
                "monitor_interval",
                format!(
                    "stall_timeout ({:?}) must be longer than monitor_interval ({:?}), or every sample would look stalled",
                    self.stall_timeout, self.monitor_interval
                ),
            ));
        }
        if self.delivery == Delivery::ExactlyOnce {
            // A transaction's progress record names its ids as ranges, one per id at worst: a
            // batch must fit in a record Kafka takes (see `exactly_once::MAX_RANGES`).
            if self.batch_size > crate::exactly_once::MAX_RANGES {
                return Err(InvalidConfig::new(
                    "batch_size",
                    format!(
                        "must be at most {} with delivery = \"exactly-once\" (found {})",
                        crate::exactly_once::MAX_RANGES,
                        self.batch_size
                    ),
                ));
            }
            let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            let topic = &self.progress_topic;
            if topic.is_empty()
                || topic.len() > 249
                || topic == "."
                || topic == ".."
                || !topic.chars().all(legal)
            {
                return Err(InvalidConfig::new(
                    "progress_topic",
                    format!("must be a Kafka topic name: 1 to 249 of a-z A-Z 0-9 . _ - (found {topic:?})"),
                ));
            }
        }
        self.kafka.validate()
    }
}

/// The longest interval or timeout a setting takes. Longer ones are mistakes (a lease nobody
/// can take over for days), and they would overflow the clock arithmetic and PostgreSQL's
/// `statement_timeout` (the lease term), which stops at about 24.8 days.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);

const MAX_RETENTION_YEARS: u64 = 100;

/// The longest retention with [`Completion::Keep`]: far beyond any use, and well within the
/// database's timestamp range, which cleanup computes from it.
pub const MAX_RETENTION: Duration = Duration::from_secs(MAX_RETENTION_YEARS * 365 * 24 * 3600);

/// The most rows one cleanup statement deletes (it holds their locks until it ends).
pub const MAX_CLEANUP_BATCH_SIZE: usize = 1_000_000;

/// The most standbys `wait_for_standbys` may ask for (`max_wal_senders` defaults to 10).
pub const MAX_STANDBYS: u32 = 100;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        RelayConfig::new("localhost:9092", "svc")
            .validate()
            .unwrap();
    }

    #[test]
    fn renew_interval_must_leave_room_before_expiry() {
        let mut config = RelayConfig::new("localhost:9092", "svc");
        config.lease_ttl = Duration::from_secs(3);
        config.lease_renew_interval = Duration::from_secs(2);
        let error = config.validate().unwrap_err();
        assert_eq!(error.key, "lease_renew_interval");
        assert_eq!(error.counterpart(), Some("lease_ttl"));
    }

    #[test]
    fn absurd_values_are_rejected_before_anything_overflows() {
        type Change = fn(&mut RelayConfig);
        let cases: [(&str, Change); 7] = [
            ("lease_ttl", |c| c.lease_ttl = Duration::MAX),
            ("wait_for_standbys", |c| c.wait_for_standbys = u32::MAX),
            ("standby_names", |c| c.standby_names = vec![" ".into()]),
            ("shutdown_timeout", |c| {
                c.shutdown_timeout = Duration::from_millis(u64::MAX)
            }),
            ("monitor_interval", |c| c.monitor_interval = Duration::ZERO),
            ("cleanup_batch_size", |c| c.cleanup_batch_size = usize::MAX),
            ("retention", |c| {
                c.completion = Completion::Keep {
                    retention: Duration::MAX,
                }
            }),
        ];
        for (key, set) in cases {
            let mut config = RelayConfig::new("localhost:9092", "svc");
            set(&mut config);
            assert_eq!(config.validate().unwrap_err().key, key);
        }
    }

    #[test]
    fn empty_source_is_rejected() {
        let config = RelayConfig::new("localhost:9092", "");
        assert_eq!(config.validate().unwrap_err().key, "source");
    }
}
