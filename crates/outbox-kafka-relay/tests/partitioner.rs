//! Keys are partitioned like Java's producer does, so a key's events stay on one partition when
//! a team moves from a Java relay to this one or shares a topic with Java producers.

use std::time::Duration;

use outbox::Message;
use outbox_kafka_relay::{Relay, RelayConfig};
use outbox_test_support::{
    create_topic, kafka_bootstrap_servers, unique_topic, TestOutbox, TopicReader,
};

const PARTITIONS: i32 = 6;
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Kafka's `Utils.murmur2`: MurmurHash2 with the Java client's seed, reading little-endian words.
fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut words = data.chunks_exact(4);
    for word in &mut words {
        let mut k = u32::from_le_bytes(word.try_into().expect("4 bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, &byte) in tail.iter().enumerate() {
            h ^= u32::from(byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Java's default partitioner picks for a keyed record:
/// `Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions`.
fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions
}

/// The vectors of `testMurmur2` in Kafka's
/// `clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java` (apache/kafka).
#[test]
fn murmur2_matches_kafkas_test_vectors() {
    let cases: [(&[u8], i32); 6] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
    ];
    for (key, expected) in cases {
        assert_eq!(
            murmur2(key),
            expected,
            "murmur2({:?})",
            String::from_utf8_lossy(key)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_messages_land_on_the_partition_a_java_producer_would_choose() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("partitioner");
    create_topic(&kafka_bootstrap_servers(), &topic, PARTITIONS).await;
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "partitioner-tests");
    config.schema = outbox.schema.clone();
    config.poll_interval = Duration::from_millis(100);
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();

    // Key lengths 7 to 12 bytes exercise every tail length of the hash; "ø" is two bytes, one
    // of them above 0x7f (Java's bytes are signed).
    let keys: Vec<String> = (0..200)
        .map(|i| format!("{}-{i}", ["order", "customer", "kunde-ø"][i % 3]))
        .collect();
    outbox
        .commit_all(
            keys.iter()
                .map(|key| Message::new(&topic, "event").key(key.as_str()))
                .collect(),
        )
        .await;

    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(keys.len(), READ_TIMEOUT).await;
    let misplaced: Vec<String> = reader
        .received
        .iter()
        .filter_map(|record| {
            let expected = java_partition(record.key.as_deref().expect("key"), PARTITIONS);
            (record.partition != expected).then(|| {
                format!(
                    "{} on {} (Java: {expected})",
                    record.key_str(),
                    record.partition
                )
            })
        })
        .collect();
    assert!(
        misplaced.is_empty(),
        "{} of {} keys are on another partition than a Java producer would choose, e.g. {:?}",
        misplaced.len(),
        reader.received.len(),
        &misplaced[..misplaced.len().min(5)]
    );
    outbox.wait_until_drained(Duration::from_secs(10)).await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}
