//! Upgrades end to end: messages enqueued into a schema made by an earlier build are all
//! published, once and in per-key order, by a relay of this build after `migrate`.
//!
//! Every build so far was version 0.1.0 (no release was tagged), and they left schemas at every
//! version from 1 to 13; the schemas themselves are compared with the baseline's for each of
//! those versions in the outbox crate's tests. Here: version 1 (the first build), 10 (the last
//! one before work resumed on 7 December; commit 5618a0e notes that migrations of that time
//! had already run on databases), and 12 (mid-way).

use std::time::Duration;

use outbox::migrate::SCHEMA_VERSION;
use outbox_kafka_relay::{Relay, RelayConfig};
use outbox_test_support::{
    create_topic, kafka_bootstrap_servers, record_count, unique_topic, wait_until, TestOutbox,
    TopicReader,
};

const READ_TIMEOUT: Duration = Duration::from_secs(60);
const KEYS: usize = 5;

fn config(outbox: &TestOutbox) -> RelayConfig {
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "upgrade-tests");
    config.schema = outbox.schema.clone();
    config.lease_ttl = Duration::from_secs(2);
    config.lease_renew_interval = Duration::from_millis(500);
    config.poll_interval = Duration::from_millis(500);
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config.shutdown_timeout = Duration::from_secs(5);
    config.batch_size = 32;
    config
}

/// Enqueues 200 messages over [`KEYS`] keys into a schema at `version` with that version's SQL
/// function (as a service of that build would), one of them held after a failed attempt (from
/// version 3, which added holds); upgrades; and checks that a relay publishes each message once.
async fn enqueued_before_the_upgrade_are_published_once(version: i32) {
    let outbox = TestOutbox::at_version(version).await;
    let topic = unique_topic("upgrade");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;
    let enqueue = format!("SELECT {}.enqueue($1, $2, $3, $4::jsonb)", outbox.schema);
    let mut sequences = Vec::new();
    for transaction in 0..4 {
        let mut tx = outbox.pool.begin().await.unwrap();
        for i in 0..50 {
            let n = transaction * 50 + i;
            let sequence: i64 = sqlx::query_scalar(&enqueue)
                .bind(&topic)
                .bind(format!("key-{}", n % KEYS))
                .bind(format!("{n}").into_bytes())
                .bind(r#"{"x-value-type": "ThingCreated"}"#)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            sequences.push(sequence);
        }
        tx.commit().await.unwrap();
    }
    if version >= 3 {
        sqlx::query(&format!(
            "UPDATE {}.message SET attempts = 1, last_error = 'timed out', retry_at = now()
              WHERE id = $1",
            outbox.schema
        ))
        .bind(sequences[7])
        .execute(&outbox.pool)
        .await
        .unwrap();
    }

    let report = outbox.outbox.migrate(&outbox.pool).await.unwrap();
    assert_eq!(report.previous_version, version);
    assert_eq!(
        report.applied,
        (version + 1..=SCHEMA_VERSION).collect::<Vec<_>>()
    );
    let relay = Relay::start(outbox.pool.clone(), config(&outbox)).unwrap();
    wait_until(
        Duration::from_secs(60),
        "every message is published",
        || async { outbox.pending().await == 0 },
    )
    .await;
    relay.shutdown().await.unwrap();

    assert_eq!(
        record_count(&kafka_bootstrap_servers(), &topic),
        sequences.len() as i64,
        "each message once"
    );
    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(sequences.len(), READ_TIMEOUT).await;
    assert_eq!(reader.assert_per_key_order(), 0, "no duplicates");
    assert_eq!(
        reader.distinct_sequences(),
        sequences.iter().copied().collect(),
        "the sequences enqueued"
    );
    for record in &reader.received {
        let n: usize = record.payload_str().parse().unwrap();
        assert_eq!(record.key_str(), format!("key-{}", n % KEYS));
        assert_eq!(record.header("x-value-type"), Some(&b"ThingCreated"[..]));
    }
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_of_the_first_build_upgrades_and_everything_is_published_once() {
    enqueued_before_the_upgrade_are_published_once(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_of_release_0_1_upgrades_and_everything_is_published_once() {
    enqueued_before_the_upgrade_are_published_once(10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_at_version_12_upgrades_and_everything_is_published_once() {
    enqueued_before_the_upgrade_are_published_once(12).await;
}
