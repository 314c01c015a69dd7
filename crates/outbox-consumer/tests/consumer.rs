//! The inbox consumer loop against the real PostgreSQL and Kafka.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outbox::headers;
use outbox::Inbox;
use outbox_consumer::{ConsumerConfig, ConsumerStats, Record};
use outbox_test_support::{
    create_topic, kafka_bootstrap_servers, short_id, unique_topic, wait_until, TestOutbox,
};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

async fn produce(topic: &str, records: &[(i64, &str)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap_servers())
        .create()
        .unwrap();
    for (sequence, payload) in records {
        produce_to(&producer, topic, None, *sequence, payload).await;
    }
    // One record without an outbox identity.
    producer
        .send(
            FutureRecord::<str, str>::to(topic)
                .payload("no headers")
                .key("k"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_skipped_and_a_failed_handler_is_retried_until_applied() {
    let outbox = TestOutbox::new().await;
    let table = format!("{}.applied", outbox.schema);
    sqlx::query(&format!(
        "CREATE TABLE {table} (sequence bigint, payload text)"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let topic = unique_topic("inbox");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    // Sequence 2 is delivered twice, as after a relay crash.
    produce(
        &topic,
        &[(1, "one"), (2, "two"), (2, "two"), (3, "fails once")],
    )
    .await;

    let stats = Arc::new(ConsumerStats::default());
    let cancel = CancellationToken::new();
    let mut config = ConsumerConfig::new(
        kafka_bootstrap_servers(),
        format!("inbox-test-{}", short_id()),
        [&topic],
    );
    config.retry_initial = Duration::from_millis(50);
    let mut failed_once = false;
    let handler_table = table.clone();
    // Not spawned: the handler borrows the transaction, so the loop runs on this task.
    let consumer = outbox_consumer::run(
        config,
        outbox.pool.clone(),
        Inbox::new(outbox.schema.clone()),
        stats.clone(),
        cancel.clone(),
        async move |tx: &mut sqlx::Transaction<'static, sqlx::Postgres>, record: &Record| {
            let payload =
                String::from_utf8_lossy(record.payload.as_deref().unwrap_or_default()).into_owned();
            sqlx::query(&format!("INSERT INTO {handler_table} VALUES ($1, $2)"))
                .bind(record.sequence)
                .bind(&payload)
                .execute(&mut **tx)
                .await?;
            if payload == "fails once" && !failed_once {
                failed_once = true;
                // The insert above must be rolled back with the inbox row.
                return Err(sqlx::Error::Protocol("handler failed".into()));
            }
            Ok::<(), sqlx::Error>(())
        },
    );
    let check = async {
        wait_until(
            Duration::from_secs(60),
            "all records are processed",
            || async {
                stats.applied.load(Ordering::Relaxed) == 3
                    && stats.malformed.load(Ordering::Relaxed) == 1
            },
        )
        .await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(consumer, check);
    result.unwrap();

    let applied: Vec<(i64, String)> = sqlx::query_as(&format!(
        "SELECT sequence, payload FROM {table} ORDER BY sequence"
    ))
    .fetch_all(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(
        applied,
        [
            (1, "one".to_owned()),
            (2, "two".to_owned()),
            (3, "fails once".to_owned())
        ],
        "each applied exactly once; the failed attempt left nothing behind"
    );
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 1);
    assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
    outbox.drop_schema().await;
}

/// Produces one record with an outbox identity, to `partition` or the partitioner's choice.
async fn produce_to(
    producer: &FutureProducer,
    topic: &str,
    partition: Option<i32>,
    sequence: i64,
    payload: &str,
) {
    let encoded = headers::encode_sequence(sequence);
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: headers::SEQUENCE,
            value: Some(&encoded[..]),
        })
        .insert(Header {
            key: headers::SOURCE,
            value: Some("producer-svc"),
        });
    let mut record = FutureRecord::<str, str>::to(topic)
        .payload(payload)
        .key("k")
        .headers(headers);
    if let Some(partition) = partition {
        record = record.partition(partition);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .unwrap();
}

/// Rows of `table` per sequence, as (sequence, count).
async fn applied_per_sequence(pool: &sqlx::PgPool, table: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(&format!(
        "SELECT sequence, count(*) FROM {table} GROUP BY sequence ORDER BY sequence"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Two consumers in one group; the first one's handler blocks until the second one has taken over
/// the partition of the record being handled. The first one then finishes the record, stores an
/// offset for a partition the group gave away, rejoins and consumes again; every record takes
/// effect exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_revoked_during_a_slow_handler_does_not_stop_the_consumer() {
    let outbox = TestOutbox::new().await;
    let table = format!("{}.applied", outbox.schema);
    sqlx::query(&format!(
        "CREATE TABLE {table} (consumer text, sequence bigint)"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let topic = unique_topic("inbox-rebalance");
    create_topic(&kafka_bootstrap_servers(), &topic, 2).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap_servers())
        .create()
        .unwrap();
    // The record the first consumer's handler blocks on.
    produce_to(&producer, &topic, Some(0), 1, "event").await;

    let group_id = format!("inbox-rebalance-{}", short_id());
    let config = |properties: Vec<(String, String)>| {
        let mut config = ConsumerConfig::new(kafka_bootstrap_servers(), &group_id, [&topic]);
        config.retry_initial = Duration::from_millis(50);
        config.properties = properties;
        config
    };
    // A member busy in its handler does not rejoin; the group reassigns its partitions once
    // `max.poll.interval.ms` (the rebalance timeout) has passed, the shortest the broker allows.
    let slow_member = vec![
        ("session.timeout.ms".to_owned(), "6000".to_owned()),
        ("max.poll.interval.ms".to_owned(), "6000".to_owned()),
        ("heartbeat.interval.ms".to_owned(), "500".to_owned()),
    ];
    let insert = format!("INSERT INTO {table} VALUES ($1, $2)");

    let stats_a = Arc::new(ConsumerStats::default());
    let stats_b = Arc::new(ConsumerStats::default());
    let cancel = CancellationToken::new();
    let a_stopped = CancellationToken::new();
    let start_b = CancellationToken::new();
    let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let mut entered = Some(entered_tx);
    let mut release = Some(release_rx);
    let insert_a = insert.clone();
    let consumer_a = async {
        let result = outbox_consumer::run(
            config(slow_member.clone()),
            outbox.pool.clone(),
            Inbox::new(outbox.schema.clone()),
            stats_a.clone(),
            cancel.clone(),
            async move |tx: &mut sqlx::Transaction<'static, sqlx::Postgres>, record: &Record| {
                sqlx::query(&insert_a)
                    .bind("a")
                    .bind(record.sequence)
                    .execute(&mut **tx)
                    .await?;
                if let (Some(entered), Some(release)) = (entered.take(), release.take()) {
                    entered.send(()).unwrap();
                    release.await.unwrap();
                }
                Ok::<(), sqlx::Error>(())
            },
        )
        .await;
        a_stopped.cancel();
        result
    };
    let insert_b = insert.clone();
    let consumer_b = async {
        start_b.cancelled().await;
        outbox_consumer::run(
            config(slow_member.clone()),
            outbox.pool.clone(),
            Inbox::new(outbox.schema.clone()),
            stats_b.clone(),
            cancel.clone(),
            async move |tx: &mut sqlx::Transaction<'static, sqlx::Postgres>, record: &Record| {
                sqlx::query(&insert_b)
                    .bind("b")
                    .bind(record.sequence)
                    .execute(&mut **tx)
                    .await?;
                Ok::<(), sqlx::Error>(())
            },
        )
        .await
    };
    let check = async {
        tokio::time::timeout(Duration::from_secs(60), entered_rx)
            .await
            .expect("the first consumer's handler was not called within 60s")
            .unwrap();
        start_b.cancel();
        // The second consumer waits on the inbox row of the record the first one is still
        // handling: the partition is now the second consumer's.
        wait_until(
            Duration::from_secs(60),
            "the second consumer consumes the partition of the blocked record",
            || async {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '.inbox%'",
                )
                .bind(outbox.schema.to_string())
                .fetch_one(&outbox.pool)
                .await
                .unwrap();
                waiting > 0
            },
        )
        .await;
        release_tx.send(()).unwrap();
        // One record at a time, alternating partitions, each once the previous ones are applied,
        // until the first consumer, back in the group, applies one again.
        let produced = AtomicI64::new(1);
        wait_until(
            Duration::from_secs(90),
            "the first consumer applies records again",
            || async {
                let sequence = produced.load(Ordering::Relaxed);
                if a_stopped.is_cancelled() {
                    return true;
                }
                if (applied_per_sequence(&outbox.pool, &table).await.len() as i64) < sequence {
                    return false;
                }
                if stats_a.applied.load(Ordering::Relaxed) > 1 {
                    return true;
                }
                produce_to(
                    &producer,
                    &topic,
                    Some((sequence % 2) as i32),
                    sequence + 1,
                    "event",
                )
                .await;
                produced.store(sequence + 1, Ordering::Relaxed);
                false
            },
        )
        .await;
        cancel.cancel();
        produced.into_inner()
    };
    let (result_a, result_b, produced) = tokio::join!(consumer_a, consumer_b, check);
    result_a.expect("a rebalance must not stop the consumer");
    result_b.unwrap();

    assert!(
        stats_b.duplicates.load(Ordering::Relaxed) >= 1,
        "the second consumer was redelivered the record the first one applied, and skipped it"
    );
    assert_eq!(
        applied_per_sequence(&outbox.pool, &table).await,
        (1..=produced)
            .map(|sequence| (sequence, 1))
            .collect::<Vec<_>>(),
        "each record applied exactly once across the group"
    );
    outbox.drop_schema().await;
}

/// The consumer as the `dev/up` broker's SASL_SSL user `outbox-consumer` (SCRAM-SHA-512 over
/// TLS, reading `secured-*` topics in `secured-*` groups, nothing else).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumes_over_sasl_ssl_with_its_users_rights() {
    use outbox_test_support::{kafka_sasl_ca, kafka_sasl_properties, SASL_CONSUMER};
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("secured");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    produce(&topic, &[(1, "one"), (2, "two")]).await;

    let stats = Arc::new(ConsumerStats::default());
    let cancel = CancellationToken::new();
    let properties =
        kafka_sasl_properties(&SASL_CONSUMER, SASL_CONSUMER.password, &kafka_sasl_ca());
    let bootstrap = properties[0].1.clone();
    let mut config = ConsumerConfig::new(bootstrap, format!("secured-{}", short_id()), [&topic]);
    for (key, value) in properties.into_iter().skip(1) {
        config.set(key, value);
    }
    assert!(
        !format!("{config:?}").contains(SASL_CONSUMER.password),
        "Debug shows the password"
    );
    let consumer = outbox_consumer::run(
        config,
        outbox.pool.clone(),
        Inbox::new(outbox.schema.clone()),
        stats.clone(),
        cancel.clone(),
        async |_: &mut sqlx::Transaction<'static, sqlx::Postgres>, _: &Record| {
            Ok::<(), sqlx::Error>(())
        },
    );
    let check = async {
        wait_until(
            Duration::from_secs(60),
            "both records are applied",
            || async { stats.applied.load(Ordering::Relaxed) == 2 },
        )
        .await;
        cancel.cancel();
    };
    let (result, ()) = tokio::join!(consumer, check);
    result.unwrap();
    outbox.drop_schema().await;
}
