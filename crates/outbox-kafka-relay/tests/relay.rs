//! The relay against the real PostgreSQL and Apache Kafka started by `dev/up`.

use std::collections::HashMap;
use std::time::Duration;

use outbox::admin::{Admin, RepublishFilter};
use outbox::Message;
use outbox_kafka_relay::{Completion, Relay, RelayConfig};
use outbox_test_support::{
    create_topic, kafka_bootstrap_servers, record_count, unique_topic, wait_until, KafkaBroker,
    Received, TestOutbox, TopicReader,
};

const SOURCE: &str = "relay-tests";
const READ_TIMEOUT: Duration = Duration::from_secs(60);

fn config(outbox: &TestOutbox) -> RelayConfig {
    config_for(outbox, &kafka_bootstrap_servers())
}

fn config_for(outbox: &TestOutbox, bootstrap: &str) -> RelayConfig {
    let mut config = RelayConfig::new(bootstrap, SOURCE);
    config.schema = outbox.schema.clone();
    config.lease_ttl = Duration::from_secs(2);
    config.lease_renew_interval = Duration::from_millis(500);
    config.poll_interval = Duration::from_millis(500);
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config.shutdown_timeout = Duration::from_secs(5);
    config
}

async fn topic(partitions: i32) -> String {
    let topic = unique_topic("relay");
    create_topic(&kafka_bootstrap_servers(), &topic, partitions).await;
    topic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_message_is_published_with_compatible_headers() {
    let outbox = TestOutbox::new().await;
    let topic = topic(1).await;
    let relay = Relay::start(outbox.pool.clone(), config(&outbox)).unwrap();

    let mut tx = outbox.pool.begin().await.unwrap();
    let sequence = outbox
        .outbox
        .save_for_publishing(
            &mut tx,
            Message::new(&topic, b"{\"id\":1}".to_vec())
                .key("thing-1")
                .header("x-value-type", "ThingCreated")
                .header("binary", vec![0u8, 255, 1]),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let mut reader = TopicReader::new(&topic);
    let record = reader.read_at_least(1, READ_TIMEOUT).await[0].clone();
    assert_eq!(record.key_str(), "thing-1");
    assert_eq!(record.payload_str(), "{\"id\":1}");
    let x_sequence = record.header("x-sequence").unwrap();
    assert_eq!(x_sequence.len(), 8, "x-sequence is 8 bytes");
    assert_eq!(i64::from_be_bytes(x_sequence.try_into().unwrap()), sequence);
    assert_eq!(record.header("x-source"), Some(SOURCE.as_bytes()));
    assert_eq!(record.header("x-value-type"), Some(&b"ThingCreated"[..]));
    assert_eq!(record.header("binary"), Some(&[0u8, 255, 1][..]));
    outbox.wait_until_drained(Duration::from_secs(10)).await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_transaction_publishes_nothing() {
    let outbox = TestOutbox::new().await;
    let topic = topic(1).await;
    let relay = Relay::start(outbox.pool.clone(), config(&outbox)).unwrap();

    let mut tx = outbox.pool.begin().await.unwrap();
    outbox
        .outbox
        .save_for_publishing(&mut tx, Message::new(&topic, b"rolled back".to_vec()))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // A later committed message: once it is out, the rolled-back one (lower id) would be too.
    outbox
        .commit_each([Message::new(&topic, b"committed".to_vec())])
        .await;

    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(1, READ_TIMEOUT).await;
    let received = reader.read_for(Duration::from_millis(500)).await;
    let payloads: Vec<&str> = received.iter().map(|r| r.payload_str()).collect();
    assert_eq!(payloads, ["committed"]);
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_messages_over_several_keys_arrive_in_per_key_order() {
    let outbox = TestOutbox::new().await;
    let topic = topic(3).await;
    let mut config = config(&outbox);
    config.batch_size = 64; // many batches, so ordering across batches is exercised
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();

    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for chunk in 0..20 {
        let messages: Vec<Message> = (0..50)
            .map(|i| {
                let n = chunk * 50 + i;
                let key = format!("key-{}", n % 7);
                let payload = format!("{key}:{n}");
                expected
                    .entry(key.clone())
                    .or_default()
                    .push(payload.clone());
                Message::new(&topic, payload).key(key)
            })
            .collect();
        outbox.commit_all(messages).await;
    }

    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(1000, READ_TIMEOUT).await;
    reader.assert_per_key_order();
    let mut actual: HashMap<String, Vec<String>> = HashMap::new();
    for record in &reader.received {
        actual
            .entry(record.key_str().to_owned())
            .or_default()
            .push(record.payload_str().to_owned());
    }
    assert_eq!(actual, expected, "every message once, in per-key order");
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// Commits `messages` as one backlog, lets a relay with `config` drain it, and checks that each
/// reached `topic` exactly once (nothing failed, so nothing may have been sent twice), in
/// per-key order.
async fn drain_backlog_exactly_once(
    outbox: &TestOutbox,
    topic: &str,
    messages: Vec<Message>,
    config: RelayConfig,
) {
    let count = messages.len();
    outbox.commit_all(messages).await;
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    outbox.wait_until_drained(Duration::from_secs(60)).await;
    relay.shutdown().await.unwrap();

    assert_eq!(
        record_count(&kafka_bootstrap_servers(), topic),
        count as i64
    );
    let mut reader = TopicReader::new(topic);
    reader.read_at_least(count, READ_TIMEOUT).await;
    reader.assert_per_key_order();
    assert_eq!(reader.distinct_sequences().len(), count);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drained_in_overlapping_batches_is_published_exactly_once_in_order() {
    let outbox = TestOutbox::new().await;
    let topic = topic(3).await;
    // A backlog first, so that every claim runs while the previous batch's completion is in
    // flight and must skip exactly those messages.
    let messages = (0..3000)
        .map(|n| Message::new(&topic, format!("{n}")).key(format!("key-{}", n % 11)))
        .collect();
    let mut config = config(&outbox);
    config.batch_size = 100;
    drain_backlog_exactly_once(&outbox, &topic, messages, config).await;
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_budget_splits_large_messages_into_small_batches_losing_nothing() {
    let outbox = TestOutbox::new().await;
    let topic = topic(3).await;
    let messages = (0..300)
        .map(|n| {
            let mut payload = format!("{n}:").into_bytes();
            payload.resize(1000, b'.');
            Message::new(&topic, payload).key(format!("key-{}", n % 7))
        })
        .collect();
    let mut config = config(&outbox);
    config.max_batch_bytes = 10_000; // ~10 messages per batch, ~30 batches
    drain_backlog_exactly_once(&outbox, &topic, messages, config).await;
    let batches: i64 = sqlx::query_scalar(&format!(
        "SELECT count(DISTINCT processed_at) FROM {}.published",
        outbox.schema
    ))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert!(
        batches >= 25,
        "{batches} completions for 300 KB in 10 KB batches"
    );
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_locking_entity_rows_publish_versions_in_increasing_order_per_key() {
    let outbox = TestOutbox::new().await;
    let topic = topic(3).await;
    let table = format!("{}.entity", outbox.schema);
    sqlx::query(&format!(
        "CREATE TABLE {table} (id text PRIMARY KEY, version bigint NOT NULL)"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    for id in ["hot-a", "hot-b", "hot-c"] {
        sqlx::query(&format!("INSERT INTO {table} VALUES ($1, 0)"))
            .bind(id)
            .execute(&outbox.pool)
            .await
            .unwrap();
    }
    let relay = Relay::start(outbox.pool.clone(), config(&outbox)).unwrap();

    const WRITERS: usize = 12;
    const UPDATES: usize = 25;
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let (pool, writer_outbox, table, topic) = (
            outbox.pool.clone(),
            outbox.outbox.clone(),
            table.clone(),
            topic.clone(),
        );
        writers.spawn(async move {
            for update in 0..UPDATES {
                let id = ["hot-a", "hot-b", "hot-c"][(writer + update) % 3];
                let mut tx = pool.begin().await.unwrap();
                let version: i64 = sqlx::query_scalar(&format!(
                    "UPDATE {table} SET version = version + 1 WHERE id = $1 RETURNING version"
                ))
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
                writer_outbox
                    .save_for_publishing(&mut tx, Message::new(&topic, version.to_string()).key(id))
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }
        });
    }
    while let Some(result) = writers.join_next().await {
        result.unwrap();
    }

    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(WRITERS * UPDATES, READ_TIMEOUT).await;
    let mut last: HashMap<String, i64> = HashMap::new();
    for record in &reader.received {
        let version: i64 = record.payload_str().parse().unwrap();
        let previous = last
            .insert(record.key_str().to_owned(), version)
            .unwrap_or(0);
        assert_eq!(
            version,
            previous + 1,
            "key {} jumped from version {previous} to {version}",
            record.key_str()
        );
    }
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_whose_transaction_commits_late_is_not_skipped() {
    let outbox = TestOutbox::new().await;
    let topic = topic(1).await;
    let relay = Relay::start(outbox.pool.clone(), config(&outbox)).unwrap();

    // The slow transaction takes the lower sequence and holds it open.
    let mut slow = outbox.pool.begin().await.unwrap();
    let slow_sequence = outbox
        .outbox
        .save_for_publishing(
            &mut slow,
            Message::new(&topic, b"late".to_vec()).key("late"),
        )
        .await
        .unwrap();
    let later = outbox
        .commit_each((0..20).map(|i| Message::new(&topic, format!("early-{i}")).key("early")))
        .await;
    assert!(later.iter().all(|s| *s > slow_sequence));

    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(20, READ_TIMEOUT).await;
    assert!(
        !reader.distinct_sequences().contains(&slow_sequence),
        "uncommitted message published"
    );

    slow.commit().await.unwrap();
    reader
        .read_until(READ_TIMEOUT, |r| {
            r.iter().any(|r| r.payload_str() == "late")
        })
        .await;
    assert_eq!(reader.distinct_sequences().len(), 21);
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// Republishing and dead-letter retry put messages back with their old sequence, below the
/// claim floor of the running relay; they lower it, so the relay publishes them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_put_back_below_the_claim_floor_are_published_by_the_running_relay() {
    let outbox = TestOutbox::new().await;
    let topic = topic(1).await;
    let relay = Relay::start(outbox.pool.clone(), config(&outbox)).unwrap();
    let admin = Admin::new(&outbox.schema);
    let filler = || Message::new(&topic, b"filler".to_vec()).key("filler");
    let sent = outbox
        .commit_each([Message::new(&topic, b"old".to_vec()).key("old"), filler()])
        .await;
    let (old, second) = (sent[0], sent[1]);
    let floor_passes = |id: i64| {
        let (outbox, filler) = (&outbox, &filler);
        async move {
            wait_until(
                Duration::from_secs(30),
                "the claim floor rises past the message",
                || async move {
                    outbox.commit_each([filler()]).await;
                    // No row until the relay has taken its lease for the first time.
                    let floor: Option<i64> = sqlx::query_scalar(&format!(
                        "SELECT floor FROM {}.relay_lease",
                        outbox.schema
                    ))
                    .fetch_optional(&outbox.pool)
                    .await
                    .unwrap();
                    floor.is_some_and(|floor| floor > id)
                },
            )
            .await
        }
    };
    let mut reader = TopicReader::new(&topic);
    let twice = |id: i64| {
        move |received: &[Received]| received.iter().filter(|r| r.sequence() == id).count() == 2
    };

    floor_passes(second).await;
    let mut conn = outbox.pool.acquire().await.unwrap();
    let filter = RepublishFilter::all().ids(Some(old), Some(old));
    let (republished, _) = admin
        .republish_batch(&mut conn, &filter, 0, 10)
        .await
        .unwrap();
    assert_eq!(republished, 1);
    reader.read_until(READ_TIMEOUT, twice(old)).await;

    // The second message, dead-lettered by hand (out of the history, into the dead letters).
    floor_passes(second).await;
    outbox.dead_letter_by_hand(second).await;
    assert_eq!(
        admin
            .requeue_dead_letters(&mut conn, Some(second))
            .await
            .unwrap(),
        [second]
    );
    reader.read_until(READ_TIMEOUT, twice(second)).await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_with_an_aggressive_lease_deliver_everything_in_order() {
    let outbox = TestOutbox::new().await;
    let topic = topic(3).await;
    let mut relays = Vec::new();
    for _ in 0..3 {
        let mut config = config(&outbox);
        config.lease_ttl = Duration::from_millis(300);
        config.lease_renew_interval = Duration::from_millis(100);
        config.batch_size = 25;
        relays.push(Relay::start(outbox.pool.clone(), config).unwrap());
    }
    const COUNT: usize = 600;
    for round in 0..12 {
        let messages: Vec<Message> = (0..COUNT / 12)
            .map(|i| Message::new(&topic, format!("{round}-{i}")).key(format!("k{}", i % 5)))
            .collect();
        outbox.commit_all(messages).await;
        tokio::time::sleep(Duration::from_millis(50)).await; // spread writes over lease changes
    }

    let mut reader = TopicReader::new(&topic);
    reader
        .read_until(READ_TIMEOUT, |r| {
            r.iter()
                .map(|r| r.sequence())
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= COUNT
        })
        .await;
    let duplicates = reader.assert_per_key_order();
    println!("three relays: {COUNT} messages, {duplicates} duplicate deliveries");
    for relay in relays {
        relay.shutdown().await.unwrap();
    }
    assert_eq!(outbox.pending().await, 0);
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_finishes_the_job_when_the_leader_is_aborted_mid_stream() {
    let outbox = TestOutbox::new().await;
    let topic = topic(3).await;
    let mut leader_config = config(&outbox);
    leader_config.batch_size = 50;
    let leader = Relay::start(outbox.pool.clone(), leader_config.clone()).unwrap();
    leader.wait_until_leader().await;
    let standby = Relay::start(outbox.pool.clone(), leader_config).unwrap();

    const COUNT: usize = 3000;
    let messages: Vec<Message> = (0..COUNT)
        .map(|i| Message::new(&topic, format!("{i}")).key(format!("k{}", i % 11)))
        .collect();
    outbox.commit_all(messages).await;

    wait_until(
        Duration::from_secs(30),
        "the leader has published some",
        || async { outbox.pending().await < COUNT as i64 },
    )
    .await;
    assert!(!standby.is_leader());
    leader.abort();

    let mut reader = TopicReader::new(&topic);
    reader
        .read_until(READ_TIMEOUT, |r| {
            r.iter()
                .map(|r| r.sequence())
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= COUNT
        })
        .await;
    assert!(standby.is_leader());
    let duplicates = reader.assert_per_key_order();
    println!("failover: {COUNT} messages, {duplicates} duplicate deliveries");
    outbox.wait_until_drained(Duration::from_secs(10)).await;
    standby.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_shutdown_hands_the_lease_over_at_once() {
    let outbox = TestOutbox::new().await;
    let mut long_lease = config(&outbox);
    long_lease.lease_ttl = Duration::from_secs(60);
    long_lease.lease_renew_interval = Duration::from_secs(20);
    let first = Relay::start(outbox.pool.clone(), long_lease.clone()).unwrap();
    first.wait_until_leader().await;
    let second = Relay::start(outbox.pool.clone(), long_lease).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_leader(), "two leaders at once");

    let released_at = std::time::Instant::now();
    first.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), second.wait_until_leader())
        .await
        .expect("the standby took over well within the 60 s lease");
    println!("takeover after clean release: {:?}", released_at.elapsed());
    second.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_started_while_kafka_is_down_delivers_once_it_is_up() {
    let outbox = TestOutbox::new().await;
    let mut broker = KafkaBroker::new();
    let topic = unique_topic("down");
    outbox
        .commit_each(
            (0..50).map(|i| Message::new(&topic, format!("{i}")).key(format!("k{}", i % 3))),
        )
        .await;
    let relay = Relay::start(
        outbox.pool.clone(),
        config_for(&outbox, &broker.bootstrap_servers()),
    )
    .unwrap();
    relay.wait_until_leader().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        outbox.pending().await,
        50,
        "nothing may be completed while Kafka is down"
    );

    broker.start();
    // The broker is up but the topic is missing: deliveries fail and are retried with backoff.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        outbox.pending().await,
        50,
        "nothing may be completed while the topic is missing"
    );
    create_topic(&broker.bootstrap_servers(), &topic, 2).await;

    let mut reader = TopicReader::on(&broker.bootstrap_servers(), &topic);
    reader
        .read_until(Duration::from_secs(90), |r| {
            r.iter()
                .map(|r| r.sequence())
                .collect::<std::collections::HashSet<_>>()
                .len()
                >= 50
        })
        .await;
    reader.assert_per_key_order();
    outbox.wait_until_drained(Duration::from_secs(10)).await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_removes_only_processed_rows_older_than_the_retention() {
    let outbox = TestOutbox::new().await;
    let topic = topic(1).await;
    let ids = outbox
        .commit_each((0..6).map(|i| Message::new(&topic, format!("{i}"))))
        .await;
    let table = format!("{}.message", outbox.schema);
    let published = format!("{}.published", outbox.schema);
    // 0,1: published long ago; 2,3: published recently; 4,5: pending (old, but unpublished).
    let publish_at = |ids: Vec<i64>, at: &'static str| {
        let sql = format!(
            "WITH m AS (DELETE FROM {table} WHERE id = ANY($1) RETURNING *)
             INSERT INTO {published} (id, topic, key, payload, headers, created_at, processed_at, attempts)
             SELECT id, topic, key, payload, headers, created_at, {at}, attempts FROM m"
        );
        let pool = outbox.pool.clone();
        async move { sqlx::query(&sql).bind(ids).execute(&pool).await.unwrap() }
    };
    publish_at(ids[0..2].to_vec(), "now() - interval '2 days'").await;
    publish_at(ids[2..4].to_vec(), "now()").await;
    sqlx::query(&format!(
        "UPDATE {table} SET created_at = now() - interval '3 days' WHERE id = ANY($1)"
    ))
    .bind(&ids[4..6])
    .execute(&outbox.pool)
    .await
    .unwrap();

    let mut config = config(&outbox);
    config.completion = Completion::Keep {
        retention: Duration::from_secs(24 * 3600),
    };
    config.cleanup_interval = Duration::from_millis(100);
    config.cleanup_batch_size = 1; // several bounded rounds
                                   // The relay also publishes 4 and 5 meanwhile; they are then processed too recently to go.
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    let remaining = || async {
        sqlx::query_scalar::<_, i64>(&format!(
            "SELECT id FROM {table} UNION ALL SELECT id FROM {published} ORDER BY id"
        ))
        .fetch_all(&outbox.pool)
        .await
        .unwrap()
    };
    wait_until(
        Duration::from_secs(20),
        "old processed rows are gone",
        || async { remaining().await.len() == 4 },
    )
    .await;
    assert_eq!(remaining().await, ids[2..6].to_vec());
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_on_completion_leaves_no_rows() {
    let outbox = TestOutbox::new().await;
    let topic = topic(1).await;
    let mut config = config(&outbox);
    config.completion = Completion::Delete;
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    outbox
        .commit_each((0..10).map(|i| Message::new(&topic, format!("{i}"))))
        .await;
    TopicReader::new(&topic)
        .read_at_least(10, READ_TIMEOUT)
        .await;
    wait_until(
        Duration::from_secs(10),
        "published rows are deleted",
        || async { outbox.pending().await == 0 },
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// Rows of `message` read so far (sequential and index/bitmap fetches), from the statistics of
/// sessions that have ended.
async fn message_rows_read(outbox: &TestOutbox) -> i64 {
    sqlx::query_scalar(
        "SELECT (coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::bigint
           FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'message'",
    )
    .bind(outbox.schema.as_str())
    .fetch_one(&outbox.pool)
    .await
    .unwrap()
}

/// A relay back after an outage meets a backlog written moments ago, without planner statistics.
/// Without them PostgreSQL took the claim's candidates for a handful of rows, so every claim read
/// and sorted the whole rest of the backlog (a drain reading ~n²/2b rows). The claim must read
/// about what it returns, however the statistics look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_without_statistics_is_claimed_without_rereading_it() {
    let outbox = TestOutbox::new().await;
    let topic = topic(3).await;
    let count = 30_000;
    sqlx::raw_sql(&format!(
        "ALTER TABLE {schema}.message SET (autovacuum_enabled = false);
         INSERT INTO {schema}.message (topic, key, payload)
         SELECT '{topic}', convert_to('key-' || n % 50, 'UTF8'), convert_to(repeat('x', 100), 'UTF8')
           FROM generate_series(1, {count}) AS n",
        schema = outbox.schema
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let never_analyzed: bool =
        sqlx::query_scalar("SELECT reltuples < 0 FROM pg_class WHERE oid = $1::regclass")
            .bind(format!("{}.message", outbox.schema))
            .fetch_one(&outbox.pool)
            .await
            .unwrap();
    assert!(never_analyzed, "the backlog has no statistics");
    let before = message_rows_read(&outbox).await;

    let mut config = config(&outbox);
    config.batch_size = 100;
    config.completion = Completion::Delete;
    // The monitor's backlog count reads the pending rows too: once, at start.
    config.monitor_interval = Duration::from_secs(600);
    config.stall_timeout = Duration::from_secs(1200);
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    // Watched in Kafka: counting what is pending would read the table too.
    wait_until(
        Duration::from_secs(120),
        "the backlog is published",
        || async { record_count(&kafka_bootstrap_servers(), &topic) >= count },
    )
    .await;
    // The relay's sessions end with it, and report their statistics as they do.
    relay.shutdown().await.unwrap();
    let mut read = 0;
    for _ in 0..50 {
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&outbox.pool)
            .await
            .unwrap();
        read = message_rows_read(&outbox).await - before;
        if read >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each row is read by the claim that returns it, by its completion, and by every claim
    // (and floor check) that walks over it while it is in flight: with up to four batches
    // publishing and more completing, up to ~15 reads per row (89k-292k measured here). Claims
    // that reread the backlog read n/2 per row on average: 30000 / (2 * 100) = 150 reads per row.
    assert!(
        (count..=30 * count).contains(&read),
        "{read} rows read to drain {count}"
    );
    assert_eq!(record_count(&kafka_bootstrap_servers(), &topic), count);
    outbox.drop_schema().await;
}

/// The relay keeps the busy mark about one lease term ahead while it works, and resets it before
/// it waits for a wake-up, also when it finds one a predecessor left far ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_relay_keeps_the_busy_mark_ahead_and_resets_it_before_it_waits() {
    let outbox = TestOutbox::new().await;
    let topic = topic(3).await;
    // A predecessor's mark, an hour ahead.
    outbox.set_busy_mark(Some(3_600_000)).await;
    outbox
        .commit_all(
            (0..20_000)
                .map(|n| Message::new(&topic, format!("{n}")).key(format!("key-{}", n % 7)))
                .collect(),
        )
        .await;
    let config = config(&outbox);
    let lease_ttl = config.lease_ttl.as_millis() as i64;
    let relay = Relay::start(outbox.pool.clone(), config.clone()).unwrap();
    let marked_while_busy = std::cell::Cell::new(false);
    wait_until(Duration::from_secs(60), "the backlog drained", || async {
        let ahead = outbox.busy_mark_ahead().await;
        if (0..=lease_ttl).contains(&ahead) {
            marked_while_busy.set(true);
        }
        outbox.pending().await == 0
    })
    .await;
    assert!(
        marked_while_busy.get(),
        "the mark was never one lease term ahead"
    );
    wait_until(Duration::from_secs(10), "the relay waits", || async {
        sqlx::query_scalar::<_, bool>(&format!(
            "SELECT idle FROM {}.relay_lease WHERE name = $1",
            outbox.schema
        ))
        .bind(&config.lease_name)
        .fetch_one(&outbox.pool)
        .await
        .unwrap()
    })
    .await;
    assert!(outbox.busy_mark_ahead().await < 0, "reset before it waits");
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}
