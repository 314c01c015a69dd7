//! The inbox consumer loop against the real PostgreSQL and Kafka.

use std::sync::atomic::Ordering;
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
        let sequence = headers::encode_sequence(*sequence);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: headers::SEQUENCE,
                value: Some(&sequence[..]),
            })
            .insert(Header {
                key: headers::SOURCE,
                value: Some("producer-svc"),
            });
        producer
            .send(
                FutureRecord::<str, str>::to(topic)
                    .payload(payload)
                    .key("k")
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
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
    let config = ConsumerConfig {
        bootstrap_servers: kafka_bootstrap_servers(),
        group_id: format!("inbox-test-{}", short_id()),
        topics: vec![topic.clone()],
        retry_initial: Duration::from_millis(50),
        properties: vec![],
    };
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
