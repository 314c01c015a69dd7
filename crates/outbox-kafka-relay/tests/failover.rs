//! `wait_for_standbys` against a real streaming standby (a PostgreSQL primary and a standby of
//! its own, made with `pg_basebackup`), its replication stream through a proxy that can stall it.

use std::time::Duration;

use outbox::{Message, Outbox, OutboxConfig};
use outbox_kafka_relay::{Relay, RelayConfig, RelayHandle};
use outbox_test_support::{
    create_topic, kafka_bootstrap_servers, unique_topic, wait_until, Fault, PostgresServer,
    TcpProxy, TopicReader,
};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

async fn connect(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(url)
        .await
        .expect("connect to the throwaway server")
}

async fn streaming_standbys(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Connects to `primary`, waits until `standbys` stream from it, migrates the outbox and makes a
/// topic.
async fn outbox_on(primary: &PostgresServer, standbys: i64) -> (PgPool, Outbox, String) {
    let pool = connect(&primary.url()).await;
    wait_until(Duration::from_secs(30), "the standbys stream", || async {
        streaming_standbys(&pool).await == standbys
    })
    .await;
    let outbox = Outbox::new(OutboxConfig::default());
    outbox.migrate(&pool).await.unwrap();
    let topic = unique_topic("standby");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    (pool, outbox, topic)
}

/// Waits until the relay's health gives a reason containing `what` (with `given` false: until
/// it no longer does).
async fn wait_for_reason(relay: &RelayHandle, what: &str, given: bool) {
    let health = relay.health();
    wait_until(Duration::from_secs(30), what, || {
        let report = health.report();
        async move { report.reasons.iter().any(|r| r.contains(what)) == given }
    })
    .await;
}

async fn commit(pool: &PgPool, outbox: &Outbox, topic: &str, payload: &str) {
    let mut tx = pool.begin().await.unwrap();
    outbox
        .save_for_publishing(&mut tx, Message::new(topic, payload.to_owned()).key("k"))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_published_only_once_the_standby_flushed_its_commit() {
    let primary = PostgresServer::primary();
    let replication = TcpProxy::start(&primary.addr()).await;
    let _standby = PostgresServer::standby_of(&replication.addr());
    let (pool, outbox, topic) = outbox_on(&primary, 1).await;
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "failover-test");
    config.lease_ttl = Duration::from_secs(2);
    config.lease_renew_interval = Duration::from_millis(500);
    config.wait_for_standbys = 1;
    let relay = Relay::start(pool.clone(), config).unwrap();
    let mut reader = TopicReader::new(&topic);
    commit(&pool, &outbox, &topic, "replicated").await;
    reader.read_at_least(1, Duration::from_secs(30)).await;

    // The standby receives nothing more: the next message waits, and health says why.
    replication.set(Fault::Blackhole);
    commit(&pool, &outbox, &topic, "not yet on the standby").await;
    wait_for_reason(&relay, "wait_for_standbys", true).await;
    assert_eq!(
        reader.read_for(Duration::from_secs(1)).await.len(),
        1,
        "published before the standby had its commit"
    );

    replication.set(Fault::Pass);
    let received = reader.read_at_least(2, Duration::from_secs(30)).await;
    assert_eq!(received[1].payload_str(), "not yet on the standby");
    wait_for_reason(&relay, "wait_for_standbys", false).await;
    relay.shutdown().await.unwrap();
}

/// Asking for more standbys than stream: nothing is published, and health says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fewer_standbys_streaming_than_required_nothing_is_published() {
    let primary = PostgresServer::primary();
    let (pool, outbox, topic) = outbox_on(&primary, 0).await;
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "failover-test");
    config.wait_for_standbys = 1;
    let relay = Relay::start(pool.clone(), config).unwrap();
    commit(&pool, &outbox, &topic, "no standby").await;
    wait_for_reason(&relay, "fewer are connected", true).await;
    let mut reader = TopicReader::new(&topic);
    assert!(reader.read_for(Duration::from_secs(1)).await.is_empty());
    relay.shutdown().await.unwrap();
}

/// A role without `pg_monitor` sees the standbys but not their positions: the relay says so,
/// and publishes once it is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_read_the_standbys_positions_is_told_to_get_pg_monitor() {
    let primary = PostgresServer::primary();
    let _standby = PostgresServer::standby_of(&primary.addr());
    let (pool, outbox, topic) = outbox_on(&primary, 1).await;
    sqlx::raw_sql(
        "CREATE ROLE relay LOGIN PASSWORD 'relay';
         GRANT USAGE ON SCHEMA outbox TO relay;
         GRANT ALL ON ALL TABLES IN SCHEMA outbox TO relay;
         GRANT ALL ON ALL SEQUENCES IN SCHEMA outbox TO relay",
    )
    .execute(&pool)
    .await
    .unwrap();
    let relay_pool = connect(&primary.url().replace("outbox:outbox@", "relay:relay@")).await;
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "failover-test");
    config.wait_for_standbys = 1;
    let relay = Relay::start(relay_pool, config).unwrap();
    commit(&pool, &outbox, &topic, "waits for pg_monitor").await;
    wait_for_reason(&relay, "pg_monitor", true).await;
    let mut reader = TopicReader::new(&topic);
    assert!(reader.read_for(Duration::from_millis(500)).await.is_empty());
    sqlx::query("GRANT pg_monitor TO relay")
        .execute(&pool)
        .await
        .unwrap();
    reader.read_at_least(1, Duration::from_secs(30)).await;
    relay.shutdown().await.unwrap();
}
