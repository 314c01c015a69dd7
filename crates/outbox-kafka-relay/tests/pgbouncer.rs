//! The relay through Debian's PgBouncer (started by `dev/up`): in session mode it runs as on a
//! direct connection, LISTEN included; in transaction mode it refuses to run, and none of its
//! session settings reaches the pooler's server connections.

use std::time::Duration;

use outbox::Message;
use outbox_kafka_relay::{Relay, RelayConfig, RelayError};
use outbox_test_support::{
    create_topic, kafka_bootstrap_servers, pgbouncer_session_url, pgbouncer_transaction_url,
    pool_on, unique_topic, wait_until, TestOutbox, TopicReader,
};

fn config(outbox: &TestOutbox) -> RelayConfig {
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "pgbouncer-test");
    config.schema = outbox.schema.clone();
    config.lease_ttl = Duration::from_secs(2);
    config.lease_renew_interval = Duration::from_millis(500);
    // Far longer than the test waits: only a notification can wake the relay in time.
    config.poll_interval = Duration::from_secs(60);
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config
}

async fn lease_idle(outbox: &TestOutbox) -> bool {
    sqlx::query_scalar(&format!(
        "SELECT coalesce(bool_or(idle AND expires_at > now()), false) FROM {}.relay_lease",
        outbox.schema
    ))
    .fetch_one(&outbox.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_session_pooler_the_relay_is_woken_by_notifications() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("pgbouncer");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let pool = pool_on(&pgbouncer_session_url(), 4).await;
    Relay::check_connection(&pool).await.unwrap();
    let relay = Relay::start(pool.clone(), config(&outbox)).unwrap();
    wait_until(
        Duration::from_secs(30),
        "the relay holds the lease and waits for notifications",
        || lease_idle(&outbox),
    )
    .await;

    let mut reader = TopicReader::new(&topic);
    for n in 0..3 {
        outbox
            .commit_each(vec![Message::new(&topic, format!("{n}").into_bytes())])
            .await;
        // Within 10 s, where the relay's poll would take a minute: the notification woke it.
        reader.read_at_least(n + 1, Duration::from_secs(10)).await;
        wait_until(Duration::from_secs(30), "the relay waits again", || {
            lease_idle(&outbox)
        })
        .await;
    }
    assert!(
        relay.health().report().ready,
        "{:?}",
        relay.health().report()
    );
    relay.shutdown().await.unwrap();
    pool.close().await;
    outbox.drop_schema().await;
}

/// Through a pooler in transaction mode the relay's session settings (`enable_seqscan = off`,
/// its `statement_timeout`) would reach other clients' transactions and its LISTEN would miss
/// notifications: it refuses, says why in its health, and publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_transaction_pooler_the_relay_refuses_and_leaves_nothing_behind() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("pgbouncer");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    outbox
        .commit_each(vec![Message::new(&topic, b"waits".to_vec())])
        .await;
    let pool = pool_on(&pgbouncer_transaction_url(), 4).await;

    let refused = Relay::check_connection(&pool).await.unwrap_err();
    assert!(
        matches!(refused, RelayError::TransactionPooled(_)),
        "{refused}"
    );
    assert!(refused.to_string().contains("session mode"), "{refused}");

    let relay = Relay::start(pool.clone(), config(&outbox)).unwrap();
    let health = relay.health();
    wait_until(
        Duration::from_secs(30),
        "the relay's health names the pooler",
        || {
            let report = health.report();
            async move {
                !report.ready
                    && report
                        .reasons
                        .iter()
                        .any(|r| r.contains("transaction mode"))
            }
        },
    )
    .await;
    relay.shutdown().await.unwrap();
    assert_eq!(outbox.pending().await, 1, "nothing was published");
    let holders: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}.relay_lease",
        outbox.schema
    ))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(holders, 0, "no lease was taken");
    // Every server connection of the pooler still has the defaults: as many transactions at
    // once as the pooler has server connections (default_pool_size in dev/pgbouncer) cover
    // them all.
    pool.close().await;
    let pool = pool_on(&pgbouncer_transaction_url(), 20).await;
    let mut transactions = Vec::new();
    for _ in 0..20 {
        let mut tx = pool.begin().await.unwrap();
        let settings: (String, String) = sqlx::query_as(
            "SELECT current_setting('enable_seqscan'), current_setting('statement_timeout')",
        )
        .persistent(false)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(settings, ("on".to_owned(), "0".to_owned()));
        transactions.push(tx);
    }
    drop(transactions);
    pool.close().await;
    outbox.drop_schema().await;
}
