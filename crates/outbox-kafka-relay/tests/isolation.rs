//! Hostile and broken inputs, against the real services: whatever one writer puts in the outbox,
//! it holds back at most its own key, and every other message keeps flowing.

use std::time::Duration;

use outbox::admin::{Admin, HeldKey};
use outbox::Message;
use outbox_kafka_relay::{PoisonPolicy, Relay, RelayConfig};
use outbox_test_support::{
    create_topic, create_topic_with_config, incompressible, kafka_bootstrap_servers, unique_topic,
    wait_until, TestOutbox, TopicReader,
};

const READ: Duration = Duration::from_secs(30);

fn config(outbox: &TestOutbox, policy: PoisonPolicy) -> RelayConfig {
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "isolation-tests");
    config.schema = outbox.schema.clone();
    config.poison_policy = policy;
    config.poll_interval = Duration::from_millis(100);
    config.backoff_initial = Duration::from_secs(30);
    config.backoff_max = Duration::from_secs(60);
    config
}

/// The held keys, once there are `count` of them.
async fn held_keys(outbox: &TestOutbox, count: usize) -> Vec<HeldKey> {
    let admin = Admin::new(&outbox.schema);
    let deadline = tokio::time::Instant::now() + READ;
    loop {
        let mut conn = outbox.pool.acquire().await.unwrap();
        let held = admin.held_keys(&mut conn, 100).await.unwrap();
        if held.len() == count {
            return held;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} keys are not held after {READ:?}: {held:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Inserts a row as a writer in another language could, bypassing every check of the library.
async fn insert_raw(outbox: &TestOutbox, topic: &str, key: &str, headers: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "INSERT INTO {}.message (topic, key, payload, headers)
         VALUES ($1, convert_to($2, 'UTF8'), convert_to('raw', 'UTF8'), $3::jsonb) RETURNING id",
        outbox.schema
    ))
    .bind(topic)
    .bind(key)
    .bind(headers)
    .fetch_one(&outbox.pool)
    .await
    .expect("raw insert")
}

/// Rows whose headers the relay cannot publish (another shape, or naming the headers it sets)
/// are poison of their own: held with their error, named by `held_keys`, while every other
/// message, of their topic too, is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_rows_are_held_alone_and_everything_else_flows() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("isolation-headers");
    create_topic(&kafka_bootstrap_servers(), &topic, 2).await;
    let bad = [
        insert_raw(&outbox, &topic, "bad-1", r#"{"x-trace": null}"#).await,
        insert_raw(
            &outbox,
            &topic,
            "bad-2",
            r#"[{"name": "x-sequence", "text": "1"}]"#,
        )
        .await,
        insert_raw(
            &outbox,
            &topic,
            "bad-3",
            r#"[{"name": "h", "base64": "%%%"}]"#,
        )
        .await,
    ];
    outbox
        .commit_each((0..10).map(|i| Message::new(&topic, format!("good:{i}")).key("good")))
        .await;
    let relay = Relay::start(outbox.pool.clone(), config(&outbox, PoisonPolicy::Block)).unwrap();

    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(10, READ).await;
    assert!(reader.received.iter().all(|r| r.key_str() == "good"));
    let held = held_keys(&outbox, 3).await;
    assert_eq!(held.iter().map(|h| h.head).collect::<Vec<_>>(), bad);
    for key in &held {
        let error = key.last_error.as_deref().unwrap_or_default();
        assert!(error.contains("malformed stored outbox headers"), "{error}");
    }
    assert!(held[1].last_error.as_deref().unwrap().contains("reserved"));
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_rows_are_dead_lettered_with_their_error_under_that_policy() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("isolation-headers-dl");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let bad = insert_raw(&outbox, &topic, "bad", r#"{"x-trace": null}"#).await;
    outbox
        .commit_each([Message::new(&topic, "after").key("bad")])
        .await;
    let relay = Relay::start(
        outbox.pool.clone(),
        config(&outbox, PoisonPolicy::DeadLetter),
    )
    .unwrap();
    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(1, READ).await;
    assert_eq!(reader.received[0].payload_str(), "after");
    let admin = Admin::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let dead = admin.dead_letters(&mut conn, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, bad);
    assert!(
        dead[0].error.contains("expected an array"),
        "{}",
        dead[0].error
    );
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// An explicit id of i64::MAX once made the relay republish the message in a loop (the id had
/// no exclusive upper bound in the ranges the claim skips and the completion deletes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_with_the_largest_id_is_published_once_and_completed() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("isolation-max-id");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    sqlx::query(&format!(
        "INSERT INTO {}.message (id, topic, key, payload) OVERRIDING SYSTEM VALUE
         VALUES (9223372036854775807, $1, 'k', 'last')",
        outbox.schema
    ))
    .bind(&topic)
    .execute(&outbox.pool)
    .await
    .unwrap();
    let relay = Relay::start(outbox.pool.clone(), config(&outbox, PoisonPolicy::Block)).unwrap();
    outbox.wait_until_drained(READ).await;
    // One more message after it: once it arrives, anything republished before it has too.
    outbox
        .commit_each([Message::new(&topic, "next").key("k")])
        .await;
    let mut reader = TopicReader::new(&topic);
    reader
        .read_until(READ, |r| r.iter().any(|r| r.payload_str() == "next"))
        .await;
    let payloads: Vec<&str> = reader.received.iter().map(|r| r.payload_str()).collect();
    assert_eq!(payloads, ["last", "next"]);
    assert_eq!(reader.received[0].sequence(), i64::MAX);
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// A message to a topic that does not exist waits in librdkafka for the topic's metadata
/// (`topic.metadata.propagation.max.ms`, 30 s). It must hold back nothing but its own key:
/// messages to a healthy topic committed after it arrive as fast as without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topics_delay_only_their_own_keys() {
    let outbox = TestOutbox::new().await;
    let healthy = unique_topic("isolation-healthy");
    create_topic(&kafka_bootstrap_servers(), &healthy, 2).await;
    let relay = Relay::start(outbox.pool.clone(), config(&outbox, PoisonPolicy::Block)).unwrap();
    relay.wait_until_leader().await;
    let mut reader = TopicReader::new(&healthy);
    let started = tokio::time::Instant::now();
    for round in 0..5 {
        // A fresh missing topic name each round, as a hostile writer would.
        outbox
            .commit_each([Message::new(unique_topic("isolation-missing"), "lost?").key("m")])
            .await;
        outbox
            .commit_each([Message::new(&healthy, format!("healthy:{round}")).key("h")])
            .await;
        reader.read_until(READ, |r| r.len() > round).await;
    }
    // Before, each round waited for the missing topic's metadata: 5 x 30 s.
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "5 healthy messages took {elapsed:?}"
    );
    let payloads: Vec<&str> = reader.received.iter().map(|r| r.payload_str()).collect();
    assert_eq!(
        payloads,
        [
            "healthy:0",
            "healthy:1",
            "healthy:2",
            "healthy:3",
            "healthy:4"
        ]
    );
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// A broker refuses a produce request as a whole when one record in it is over the topic's
/// `max.message.bytes`. Only that record is the poison: the others of the request (other keys,
/// earlier messages of its own key) are published, and it is held under its own sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_fails_alone_not_its_whole_request() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("isolation-oversized");
    create_topic_with_config(
        &kafka_bootstrap_servers(),
        &topic,
        1,
        1,
        &[("max.message.bytes", "20000")],
    )
    .await;
    // A backlog, so that all of it goes out in one produce request.
    let mut messages: Vec<Message> = (0..20)
        .map(|i| Message::new(&topic, format!("small:{i}")).key(format!("k{}", i % 4)))
        .collect();
    // Incompressible, as the producer compresses (lz4) before the broker checks the size.
    messages.insert(10, Message::new(&topic, incompressible(60_000)).key("k2"));
    let sequences = outbox.commit_all(messages).await;
    let oversized = sequences[10];
    let relay = Relay::start(outbox.pool.clone(), config(&outbox, PoisonPolicy::Block)).unwrap();

    let mut reader = TopicReader::new(&topic);
    // Everything but the oversized message and the later messages of its key k2.
    reader.read_at_least(17, READ).await;
    reader.read_for(Duration::from_millis(500)).await;
    let mut published: Vec<i64> = reader.received.iter().map(|r| r.sequence()).collect();
    published.sort_unstable();
    published.dedup();
    // Small message i has key k{i % 4} and sits at index i, or i + 1 after the oversized one.
    let expected: Vec<i64> = (0..20)
        .filter(|i| !(*i >= 10 && i % 4 == 2))
        .map(|i| sequences[if i >= 10 { i + 1 } else { i }])
        .collect();
    assert_eq!(published, expected);

    let held = held_keys(&outbox, 1).await;
    assert_eq!(held[0].head, oversized);
    assert_eq!(held[0].key.as_deref(), Some(&b"k2"[..]));
    assert!(
        held[0].last_error.as_deref().unwrap().contains("too large"),
        "{held:?}"
    );
    // No other message was blamed.
    let blamed: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.message WHERE last_error IS NOT NULL",
        outbox.schema
    ))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(blamed, 1);
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// Two lease names on one outbox once meant two publishers of every message. The second relay
/// now stands by, not ready, naming the lease that holds the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_lease_name_on_one_outbox_is_refused_not_doubled() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("isolation-leases");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let mut first = config(&outbox, PoisonPolicy::Block);
    first.lease_name = "first".into();
    let mut second = config(&outbox, PoisonPolicy::Block);
    second.lease_name = "second".into();
    let first = Relay::start(outbox.pool.clone(), first).unwrap();
    first.wait_until_leader().await;
    let second = Relay::start(outbox.pool.clone(), second).unwrap();
    let health = second.health();
    wait_until(READ, "the second relay reports the other lease", || async {
        health
            .report()
            .reasons
            .iter()
            .any(|r| r.contains(r#"holds lease "first""#))
    })
    .await;
    outbox
        .commit_all(
            (0..200)
                .map(|i| Message::new(&topic, format!("m{i}")).key("k"))
                .collect(),
        )
        .await;
    outbox.wait_until_drained(READ).await;
    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(200, READ).await;
    reader.read_for(Duration::from_millis(500)).await;
    assert_eq!(reader.received.len(), 200, "published twice");
    assert!(!second.is_leader());
    second.shutdown().await.unwrap();
    first.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// A relay pointed at a schema nobody migrated once reported "PostgreSQL is unreachable"
/// forever. It now says what is wrong and how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_on_an_unmigrated_schema_says_so() {
    let outbox = TestOutbox::new().await;
    let mut config = config(&outbox, PoisonPolicy::Block);
    config.schema = outbox::SchemaName::new(format!("{}_typo", outbox.schema)).unwrap();
    config.monitor_interval = Duration::from_millis(200);
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    let health = relay.health();
    wait_until(READ, "the relay reports the unmigrated schema", || async {
        health
            .report()
            .reasons
            .iter()
            .any(|r| r.contains("is not migrated") && r.contains("outbox migrate"))
    })
    .await;
    let report = health.report();
    assert!(!report.ready);
    // (Kafka may still read as unreachable until the first probe has answered.)
    assert!(
        !report.reasons.iter().any(|r| r.contains("PostgreSQL")),
        "{report:?}"
    );
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// The writer's size limit and the relay producer's are the same number counted the same way:
/// the largest message the writer accepts is published, and a raw row one byte larger is what
/// the producer refuses. Before, the writer accepted messages the producer then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writers_size_limit_is_the_producers() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("isolation-limit");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let message = |n: usize| Message::new(&topic, vec![b'x'; n]).key("k");
    // The largest payload the writer accepts.
    let mut largest = 0;
    for n in (outbox::DEFAULT_MAX_PAYLOAD_BYTES - 1000..=outbox::DEFAULT_MAX_PAYLOAD_BYTES).rev() {
        let mut tx = outbox.pool.begin().await.unwrap();
        match outbox.outbox.save_for_publishing(&mut tx, message(n)).await {
            Ok(_) => {
                largest = n;
                break;
            }
            Err(outbox::Error::InvalidMessage(outbox::InvalidMessage::TooLarge { .. })) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert!(largest > 0);
    let accepted = outbox.commit_each([message(largest)]).await[0];
    let over = sqlx::query_scalar::<_, i64>(&format!(
        "INSERT INTO {}.message (topic, key, payload) VALUES ($1, 'k2', $2) RETURNING id",
        outbox.schema
    ))
    .bind(&topic)
    .bind(vec![b'x'; largest + 1])
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    let mut config = config(&outbox, PoisonPolicy::Block);
    config.source = "s".repeat(outbox::MAX_SOURCE_BYTES);
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(1, READ).await;
    assert_eq!(reader.received[0].sequence(), accepted);
    let held = held_keys(&outbox, 1).await;
    assert_eq!(held[0].head, over);
    assert!(held[0].last_error.as_deref().unwrap().contains("too large"));
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// A completion blocked on a lock (a writer holding the outbox rows) once kept a stopping relay
/// alive, renewing its lease, for as long as the lock was held. The shutdown is now bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_a_statement_blocks() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("isolation-shutdown");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    outbox
        .commit_each([Message::new(&topic, "locked").key("k")])
        .await;
    let mut lock = outbox.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT id FROM {}.message FOR UPDATE",
        outbox.schema
    ))
    .execute(&mut *lock)
    .await
    .unwrap();
    let mut config = config(&outbox, PoisonPolicy::Block);
    config.shutdown_timeout = Duration::from_secs(1);
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    let mut reader = TopicReader::new(&topic);
    // Published; its completion now waits for the lock.
    reader.read_at_least(1, READ).await;
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), relay.shutdown())
        .await
        .expect("the shutdown outlasted its timeout")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    lock.rollback().await.unwrap();
    outbox.drop_schema().await;
}

/// Values a raw INSERT can give that once broke every claim or failure record: a creation time
/// of 'infinity' (the age computation failed), and attempts at i32::MAX (the increment
/// overflowed). Each row is now held alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_extreme_values_do_not_stop_the_claim() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("isolation-extremes");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    sqlx::raw_sql(&format!(
        "INSERT INTO {0}.message (topic, key, payload, created_at)
         VALUES ('{1}', 'inf', 'x', 'infinity'), ('{1}', 'neg', 'x', '-infinity');
         INSERT INTO {0}.message (topic, key, payload, headers, attempts)
         VALUES ('{1}', 'max', 'x', '{{\"x\": null}}', 2147483647)",
        outbox.schema, topic
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    outbox
        .commit_each([Message::new(&topic, "good").key("good")])
        .await;
    let relay = Relay::start(outbox.pool.clone(), config(&outbox, PoisonPolicy::Block)).unwrap();
    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(3, READ).await;
    held_keys(&outbox, 1).await;
    // The status query copes with such rows too.
    wait_until(READ, "only the malformed row is pending", || async {
        let mut conn = outbox.pool.acquire().await.unwrap();
        let admin = Admin::new(&outbox.schema);
        admin.backlog(&mut conn).await.unwrap().pending == 1
    })
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// Writers enqueueing to ever new topic names that do not exist: each name once cost a message
/// in flight for 30 s (librdkafka waits for the topic's metadata). Now a bounded number of
/// them probe; the others are held at once as "does not exist", and healthy topics flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_missing_topic_names_is_held_at_once_and_healthy_topics_flow() {
    let outbox = TestOutbox::new().await;
    let healthy = unique_topic("isolation-flood-healthy");
    create_topic(&kafka_bootstrap_servers(), &healthy, 1).await;
    let relay = Relay::start(outbox.pool.clone(), config(&outbox, PoisonPolicy::Block)).unwrap();
    relay.wait_until_leader().await;
    let mut missing = Vec::new();
    for i in 0..200 {
        missing.push(Message::new(unique_topic("isolation-flood"), "x").key(format!("k{i}")));
    }
    outbox.commit_all(missing).await;
    outbox
        .commit_each((0..5).map(|i| Message::new(&healthy, format!("healthy:{i}")).key("h")))
        .await;
    let started = tokio::time::Instant::now();
    let mut reader = TopicReader::new(&healthy);
    reader.read_at_least(5, READ).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // All but the probes are held long before librdkafka's 30 s metadata wait.
    let admin = Admin::new(&outbox.schema);
    wait_until(
        Duration::from_secs(10),
        "the unprobed names are held",
        || async {
            let mut conn = outbox.pool.acquire().await.unwrap();
            admin.held_keys(&mut conn, 1000).await.unwrap().len() >= 200 - 16
        },
    )
    .await;
    let mut conn = outbox.pool.acquire().await.unwrap();
    let held = admin.held_keys(&mut conn, 1000).await.unwrap();
    assert!(
        held[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("does not exist"),
        "{:?}",
        held[0]
    );
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}
