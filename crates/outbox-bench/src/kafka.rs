//! Kafka without the outbox: the raw producer baseline (same records, same producer settings as
//! the relay), the consumers that timestamp receipts, topic creation and cleanup.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use indicatif::ProgressBar;
use outbox_kafka_relay::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::util::{key, now_micros, payload};

/// The source name the relay sends as `x-source`; the raw producer sends the same header.
pub(crate) const SOURCE: &str = "bench";

/// Producer properties copied from the relay's defaults (`KafkaConfig::new`): idempotence,
/// `acks=all`, gapless guarantee, no message timeout, `linger.ms=0`, lz4.
pub(crate) fn relay_producer_config(bootstrap: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in KafkaConfig::new(bootstrap).masked() {
        config.set(key, value);
    }
    config
}

/// A producer with the relay's settings, and `overrides` over them.
pub(crate) fn producer(bootstrap: &str, overrides: &[String]) -> anyhow::Result<FutureProducer> {
    let mut config = relay_producer_config(bootstrap);
    for item in overrides {
        if let Some((key, value)) = item.split_once('=') {
            config.set(key.trim(), value.trim());
        }
    }
    config.create().context("create a Kafka producer")
}

/// How the raw producer sends: with `batch`, like the relay's publish loop (hands `batch`
/// records to librdkafka, waits for all of them, then the next batch); without, keeping
/// librdkafka's queue full. `overrides` are producer properties over the relay's.
pub(crate) struct RawMode<'a> {
    pub(crate) batch: Option<usize>,
    pub(crate) overrides: &'a [String],
}

/// Sends `count` records shaped like the relay's (key `key-<n mod keys>`, `payload_bytes` payload,
/// `x-sequence` and `x-source` headers) to `topic` with a new producer in `mode`, and waits for
/// every acknowledgement. Returns the time from creating the producer to the last
/// acknowledgement.
pub(crate) async fn produce(
    bootstrap: &str,
    topic: &str,
    (count, payload_bytes, keys): (u64, usize, usize),
    mode: RawMode<'_>,
    bar: &ProgressBar,
) -> anyhow::Result<Duration> {
    let RawMode { batch, overrides } = mode;
    let keys: Vec<String> = (0..keys as u64).map(|n| key(n, keys)).collect();
    let started = Instant::now();
    let producer = producer(bootstrap, overrides)?;
    let mut pending: std::collections::VecDeque<DeliveryFuture> = std::collections::VecDeque::new();
    let batch = batch.unwrap_or(usize::MAX);
    let mut in_batch = 0;
    for n in 0..count {
        // Built per record, as the relay has each payload fresh from its claim.
        let value = payload(payload_bytes, 0, 0, n);
        let headers = wire_headers(n as i64 + 1);
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic)
            .headers(headers)
            .key(keys[(n % keys.len() as u64) as usize].as_bytes())
            .payload(&value[..]);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match pending.pop_front() {
                        Some(oldest) => {
                            await_delivery(oldest).await?;
                            bar.inc(1);
                        }
                        None => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
                Err((error, _)) => bail!("cannot send to Kafka: {error}"),
            }
        }
        in_batch += 1;
        if in_batch == batch {
            in_batch = 0;
            while let Some(delivery) = pending.pop_front() {
                await_delivery(delivery).await?;
                bar.inc(1);
            }
        }
    }
    while let Some(delivery) = pending.pop_front() {
        await_delivery(delivery).await?;
        bar.inc(1);
    }
    Ok(started.elapsed())
}

/// The headers the relay puts on a record: `x-sequence` and `x-source`.
pub(crate) fn wire_headers(sequence: i64) -> OwnedHeaders {
    let sequence = outbox::headers::encode_sequence(sequence);
    OwnedHeaders::new_with_capacity(2)
        .insert(Header {
            key: outbox::headers::SEQUENCE,
            value: Some(&sequence[..]),
        })
        .insert(Header {
            key: outbox::headers::SOURCE,
            value: Some(SOURCE.as_bytes()),
        })
}

async fn await_delivery(delivery: DeliveryFuture) -> anyhow::Result<()> {
    delivered(delivery.await)
}

/// A delivery's outcome as an error when it failed.
pub(crate) fn delivered(
    result: <DeliveryFuture as std::future::Future>::Output,
) -> anyhow::Result<()> {
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => bail!("delivery failed: {error}"),
        Err(_) => bail!("delivery canceled"),
    }
}

/// A first receipt: the record's `x-sequence` and when it was polled (µs since the epoch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Receipt {
    pub(crate) sequence: i64,
    pub(crate) received_us: u64,
    /// Send time carried in the payload.
    pub(crate) sent_us: u64,
}

/// A consumer of every partition of `topic` from the beginning, polled on a thread of its own
/// until `stop`: each record carrying an `x-sequence` and a bench payload is timestamped as it
/// is polled and handed to `on_receipt` with `state`, which the thread returns.
fn consume<S: Send + 'static>(
    bootstrap: &str,
    topic: &str,
    stop: Arc<AtomicBool>,
    mut state: S,
    mut on_receipt: impl FnMut(&mut S, Receipt) + Send + 'static,
) -> anyhow::Result<JoinHandle<S>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("bench-{}", outbox_test_support::short_id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        // Return fetches as soon as any data is there (the defaults already do; explicit).
        .set("fetch.min.bytes", "1")
        // Read committed (librdkafka's default, stated), and a short long-poll: the broker
        // answers a waiting fetch when the high watermark moves, not when a transaction's
        // commit moves the last stable offset, so each exactly-once transaction reached this
        // consumer up to fetch.wait.max.ms late (p99 108-117 ms at 100 ms).
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("create the consumer")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("read the metadata of {topic}"))?;
    let mut assignment = TopicPartitionList::new();
    for partition in metadata
        .topics()
        .first()
        .with_context(|| format!("no metadata for {topic}"))?
        .partitions()
    {
        assignment.add_partition_offset(topic, partition.id(), Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(std::thread::Builder::new()
        .name("bench-consumer".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(result) = consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let received_us = now_micros();
                let Ok(message) = result else { continue };
                let sequence = message
                    .headers()
                    .and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == outbox::headers::SEQUENCE)
                            .and_then(|h| h.value)
                    })
                    .and_then(|v| outbox::headers::decode_sequence(v).ok());
                let (Some(sequence), Some((sent_us, _phase))) = (
                    sequence,
                    message.payload().and_then(crate::util::decode_payload),
                ) else {
                    continue;
                };
                on_receipt(
                    &mut state,
                    Receipt {
                        sequence,
                        received_us,
                        sent_us,
                    },
                );
            }
            state
        })?)
}

/// A consumer on its own thread that keeps the first receipt of every sequence and counts
/// duplicates.
pub(crate) struct ConsumerThread {
    stop: Arc<AtomicBool>,
    distinct: Arc<AtomicU64>,
    duplicates: Arc<AtomicU64>,
    handle: JoinHandle<(HashSet<i64>, Vec<Receipt>)>,
}

impl ConsumerThread {
    pub(crate) fn start(bootstrap: &str, topic: &str) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let distinct = Arc::new(AtomicU64::new(0));
        let duplicates = Arc::new(AtomicU64::new(0));
        let handle = {
            let (distinct, duplicates) = (distinct.clone(), duplicates.clone());
            consume(
                bootstrap,
                topic,
                stop.clone(),
                (HashSet::new(), Vec::new()),
                move |(seen, receipts), receipt| {
                    if seen.insert(receipt.sequence) {
                        distinct.fetch_add(1, Ordering::Relaxed);
                        receipts.push(receipt);
                    } else {
                        duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                },
            )?
        };
        Ok(ConsumerThread {
            stop,
            distinct,
            duplicates,
            handle,
        })
    }

    /// Distinct sequences received so far.
    pub(crate) fn distinct(&self) -> u64 {
        self.distinct.load(Ordering::Relaxed)
    }

    /// Waits until `count` distinct sequences arrived; false after `timeout`.
    pub(crate) async fn wait_for(&self, count: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.distinct() < count {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops the thread; returns the first receipt of every sequence and the duplicate count.
    pub(crate) fn stop(self) -> (Vec<Receipt>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let receipts = self
            .handle
            .join()
            .map(|(_, receipts)| receipts)
            .unwrap_or_default();
        (receipts, self.duplicates.load(Ordering::Relaxed))
    }
}

/// A consumer on its own thread that hands every receipt, duplicates included, to a channel as
/// it is polled: for runs too long to keep every receipt.
pub(crate) struct ReceiptStream {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl ReceiptStream {
    pub(crate) fn start(
        bootstrap: &str,
        topic: &str,
    ) -> anyhow::Result<(Self, mpsc::UnboundedReceiver<Receipt>)> {
        let stop = Arc::new(AtomicBool::new(false));
        let (sender, receiver) = mpsc::unbounded_channel();
        let handle = consume(bootstrap, topic, stop.clone(), (), move |(), receipt| {
            // The receiver is gone only when the run is over.
            let _ = sender.send(receipt);
        })?;
        Ok((
            ReceiptStream {
                stop,
                handle: Some(handle),
            },
            receiver,
        ))
    }
}

impl Drop for ReceiptStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Creates `topic` with `partitions` partitions (replication 1, the `dev/up` broker).
pub(crate) async fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("create a Kafka admin client")?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &options,
        )
        .await
        .with_context(|| {
            format!(
                "cannot reach Kafka at {bootstrap} (start the services with: eval \"$(dev/up)\")"
            )
        })?;
    for result in results {
        if let Err((name, code)) = result {
            bail!("cannot create topic {name}: {code}");
        }
    }
    Ok(())
}

/// Deletes the benchmark's topics (best effort).
pub(crate) async fn delete_topics(bootstrap: &str, topics: &[String]) {
    if topics.is_empty() {
        return;
    }
    let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create();
    let Ok(admin) = admin else { return };
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    if let Err(error) = admin.delete_topics(&names, &options).await {
        crate::util::say(format!("warning: cannot delete the bench topics: {error}"));
    }
}
