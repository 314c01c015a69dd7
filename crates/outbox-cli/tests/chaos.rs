//! The chaos suite: faults injected for real while messages are written, then Kafka is read back
//! and checked against what committed: nothing lost, nothing from rolled-back transactions, per-key
//! order intact; duplicates and recovery times are reported. `dev/chaos` runs it and renders the
//! figures into docs/reliability.md. Scenarios run one at a time (they stop shared services).

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_relay::{Relay, RelayConfig};
use outbox_test_support::chaos::{report, write_messages, Ledger};
use outbox_test_support::{
    create_replicated_topic, create_topic, database_url, kafka_bootstrap_servers, partition_leader,
    unique_topic, wait_until, Fault, KafkaBroker, TcpProxy, TestOutbox, TopicReader,
};
use rand::Rng;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

const RECOVERY_LIMIT: Duration = Duration::from_secs(120);

/// `CHAOS_SCALE` (default 1) multiplies messages and kills, for soak runs.
fn scale(n: usize) -> usize {
    n * std::env::var("CHAOS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn relay_config(outbox: &TestOutbox, bootstrap: &str) -> RelayConfig {
    let mut config = RelayConfig::new(bootstrap, "chaos");
    config.schema = outbox.schema.clone();
    config.lease_ttl = Duration::from_secs(2);
    config.lease_renew_interval = Duration::from_millis(500);
    config.poll_interval = Duration::from_millis(200);
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_secs(1);
    config.batch_size = 100;
    config
}

/// Reads until every committed message arrived; returns the time that took, then checks and
/// reports the figures.
async fn settle_and_check(
    outbox: &TestOutbox,
    scenario: &str,
    faults: usize,
    ledger: &Arc<Mutex<Ledger>>,
    reader: &mut TopicReader,
) {
    let started = Instant::now();
    let deadline = started + RECOVERY_LIMIT;
    while !ledger.lock().unwrap().all_received(reader) {
        if Instant::now() > deadline {
            let leases: Vec<(String, i64, bool, f64)> = sqlx::query_as(&format!(
                "SELECT holder, token, idle, extract(epoch FROM expires_at - now())::float8 FROM {}.relay_lease",
                outbox.schema
            ))
            .fetch_all(&outbox.pool)
            .await
            .unwrap_or_default();
            panic!(
                "{scenario}: committed messages still missing after {RECOVERY_LIMIT:?}; pending rows {}, leases {leases:?}",
                outbox.pending().await
            );
        }
        reader.read_for(Duration::from_millis(200)).await;
    }
    let recovery = started.elapsed();
    reader.read_for(Duration::from_millis(500)).await; // late duplicates, rolled-back strays
    let figures = ledger.lock().unwrap().verify(reader);
    report(scenario, faults, &figures, Some(recovery));
    assert_eq!(figures.lost, 0, "{scenario}: lost messages: {figures:?}");
    assert_eq!(
        figures.rolled_back_published, 0,
        "{scenario}: rolled-back messages published: {figures:?}"
    );
    assert_eq!(
        figures.order_violations, 0,
        "{scenario}: per-key order broken: {figures:?}"
    );
    assert!(figures.committed > 0);
}

fn spawn_writer(
    outbox: &TestOutbox,
    topic: &str,
    count: usize,
    pause: Duration,
    ledger: &Arc<Mutex<Ledger>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(write_messages(
        outbox.pool.clone(),
        outbox.outbox.clone(),
        topic.to_owned(),
        outbox_test_support::short_id(),
        count,
        7,
        pause,
        10,
        ledger.clone(),
    ))
}

fn relay_process(schema: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap_servers())
        .env("OUTBOX_SCHEMA", schema)
        .env("OUTBOX_SOURCE", "chaos")
        .env("OUTBOX_LEASE_TTL_MS", "1000")
        .env("OUTBOX_LEASE_RENEW_INTERVAL_MS", "300")
        .env("OUTBOX_POLL_INTERVAL_MS", "100")
        .env("OUTBOX_BATCH_SIZE", "50")
        .env("OUTBOX_LOG", "warn")
        .env_remove("OUTBOX_CONFIG")
        .arg("relay")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start outbox relay")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_process_sigkilled_twenty_times_mid_stream() {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("chaos-kill");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;
    let ledger = Ledger::shared();
    let writer = spawn_writer(
        &outbox,
        &topic,
        scale(1500),
        Duration::from_millis(8),
        &ledger,
    );

    let kills = scale(20);
    for _ in 0..kills {
        let mut relay = relay_process(outbox.schema.as_str());
        let lifetime = rand::rng().random_range(300..1500);
        tokio::time::sleep(Duration::from_millis(lifetime)).await;
        if let Some(status) = relay.try_wait().unwrap() {
            panic!("the relay exited on its own before it was killed: {status}");
        }
        relay.kill().expect("SIGKILL the relay");
        relay.wait().unwrap();
    }
    writer.await.unwrap();
    let mut survivor = relay_process(outbox.schema.as_str());
    let mut reader = TopicReader::new(&topic);
    settle_and_check(
        &outbox,
        "1. relay process SIGKILLed at random points",
        kills,
        &ledger,
        &mut reader,
    )
    .await;
    survivor.kill().unwrap();
    survivor.wait().unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_killed_and_restarted_mid_stream() {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let mut broker = KafkaBroker::new();
    broker.start();
    let topic = unique_topic("chaos-broker");
    create_topic(&broker.bootstrap_servers(), &topic, 3).await;
    let relay = Relay::start(
        outbox.pool.clone(),
        relay_config(&outbox, &broker.bootstrap_servers()),
    )
    .unwrap();
    let ledger = Ledger::shared();
    let writer = spawn_writer(
        &outbox,
        &topic,
        scale(600),
        Duration::from_millis(10),
        &ledger,
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.start();
    writer.await.unwrap();
    let mut reader = TopicReader::on(&broker.bootstrap_servers(), &topic);
    settle_and_check(
        &outbox,
        "2. Kafka broker SIGKILLed and restarted",
        1,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_database_connections_terminated_repeatedly() {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("chaos-pgkill");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;
    let app = format!("chaos-relay-{}", outbox_test_support::short_id());
    let relay_pool = sqlx::PgPool::connect(&format!("{}?application_name={app}", database_url()))
        .await
        .unwrap();
    let relay = Relay::start(
        relay_pool,
        relay_config(&outbox, &kafka_bootstrap_servers()),
    )
    .unwrap();
    let ledger = Ledger::shared();
    let writer = spawn_writer(
        &outbox,
        &topic,
        scale(600),
        Duration::from_millis(8),
        &ledger,
    );

    const ROUNDS: usize = 10;
    let mut terminated = 0;
    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        )
        .bind(&app)
        .fetch_all(&outbox.pool)
        .await
        .unwrap();
        terminated += killed.len();
    }
    assert!(
        terminated >= ROUNDS,
        "the relay's connections were terminated ({terminated})"
    );
    writer.await.unwrap();
    let mut reader = TopicReader::new(&topic);
    settle_and_check(
        &outbox,
        "4a. relay's PostgreSQL connections terminated (pg_terminate_backend)",
        terminated,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_restarted_mid_stream() {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("chaos-pgrestart");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;
    let relay = Relay::start(
        outbox.pool.clone(),
        relay_config(&outbox, &kafka_bootstrap_servers()),
    )
    .unwrap();
    let ledger = Ledger::shared();
    let writer = spawn_writer(
        &outbox,
        &topic,
        scale(500),
        Duration::from_millis(10),
        &ledger,
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = tokio::task::block_in_place(|| {
        Command::new("pg_ctlcluster")
            .args(["15", "outbox", "restart", "-m", "fast"])
            .status()
            .expect("pg_ctlcluster (the dev/up cluster) must be available to restart PostgreSQL")
    });
    assert!(status.success(), "restarting PostgreSQL failed");
    writer.await.unwrap();
    let mut reader = TopicReader::new(&topic);
    settle_and_check(&outbox, "4b. PostgreSQL restarted", 1, &ledger, &mut reader).await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_to_postgresql_delayed_and_blackholed() {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("chaos-pgnet");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;
    let url = url::Url::parse(&database_url()).unwrap();
    let proxy = TcpProxy::start(&format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port().unwrap_or(5432)
    ))
    .await;
    let mut proxied = url.clone();
    proxied.set_port(Some(proxy.port())).unwrap();
    let relay_pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(3))
        .connect(proxied.as_str())
        .await
        .unwrap();
    let relay = Relay::start(
        relay_pool,
        relay_config(&outbox, &kafka_bootstrap_servers()),
    )
    .unwrap();
    let ledger = Ledger::shared();
    let writer = spawn_writer(
        &outbox,
        &topic,
        scale(500),
        Duration::from_millis(10),
        &ledger,
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Delay(200));
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(Fault::Blackhole); // longer than the 2 s lease
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set(Fault::Drop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Pass);
    writer.await.unwrap();
    let mut reader = TopicReader::new(&topic);
    settle_and_check(
        &outbox,
        "5a. network relay→PostgreSQL: delay, blackhole, drop",
        3,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_to_kafka_delayed_blackholed_and_dropped() {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let mut broker = KafkaBroker::new();
    let proxy = TcpProxy::start(&format!("127.0.0.1:{}", broker.listen_port())).await;
    broker.advertise_port(proxy.port());
    broker.start();
    let topic = unique_topic("chaos-kafkanet");
    create_topic(&broker.bootstrap_servers(), &topic, 3).await;
    let relay = Relay::start(
        outbox.pool.clone(),
        relay_config(&outbox, &broker.bootstrap_servers()),
    )
    .unwrap();
    let ledger = Ledger::shared();
    let writer = spawn_writer(
        &outbox,
        &topic,
        scale(500),
        Duration::from_millis(10),
        &ledger,
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Delay(300));
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(Fault::Blackhole);
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set(Fault::Drop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Pass);
    writer.await.unwrap();
    let mut reader = TopicReader::on(&broker.bootstrap_servers(), &topic);
    settle_and_check(
        &outbox,
        "5b. network relay→Kafka: delay, blackhole, drop",
        3,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_with_a_lease_shorter_than_the_stall_never_publish_at_once() {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("chaos-fence");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;
    let url = url::Url::parse(&database_url()).unwrap();
    let proxy = TcpProxy::start(&format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port().unwrap_or(5432)
    ))
    .await;
    let mut proxied = url.clone();
    proxied.set_port(Some(proxy.port())).unwrap();
    let stalled_pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(3))
        .connect(proxied.as_str())
        .await
        .unwrap();
    let mut config = relay_config(&outbox, &kafka_bootstrap_servers());
    config.lease_ttl = Duration::from_secs(1);
    config.lease_renew_interval = Duration::from_millis(300);
    let first = Relay::start(stalled_pool, config.clone()).unwrap();
    first.wait_until_leader().await;
    let second = Relay::start(outbox.pool.clone(), config).unwrap();
    let ledger = Ledger::shared();
    let writer = spawn_writer(
        &outbox,
        &topic,
        scale(600),
        Duration::from_millis(10),
        &ledger,
    );

    // Sample both relays' view of the lease while the first one's database link stalls for
    // three lease terms.
    let both = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (sampler_stop, first, second) = (
        tokio_util::sync::CancellationToken::new(),
        Arc::new(first),
        Arc::new(second),
    );
    let sampler = {
        let (stop, both, first, second) = (
            sampler_stop.clone(),
            both.clone(),
            first.clone(),
            second.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if first.is_leader() && second.is_leader() {
                    both.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Fault::Blackhole);
    wait_until(Duration::from_secs(10), "the standby takes over", || {
        let second = second.clone();
        async move { second.is_leader() }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set(Fault::Pass);
    writer.await.unwrap();
    let mut reader = TopicReader::new(&topic);
    settle_and_check(
        &outbox,
        "6. two relays, lease (1 s) shorter than a 3 s+ stall",
        1,
        &ledger,
        &mut reader,
    )
    .await;
    sampler_stop.cancel();
    sampler.await.unwrap();
    assert_eq!(
        both.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "two relays considered themselves leader at once"
    );
    for relay in [first, second] {
        Arc::into_inner(relay)
            .expect("sole owner")
            .shutdown()
            .await
            .unwrap();
    }
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_leader_killed_in_a_three_broker_cluster() {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let mut cluster = KafkaBroker::cluster(3);
    cluster.iter_mut().for_each(KafkaBroker::spawn);
    cluster.iter_mut().for_each(KafkaBroker::wait_started);
    let bootstrap = cluster
        .iter()
        .map(KafkaBroker::bootstrap_servers)
        .collect::<Vec<_>>()
        .join(",");
    let topic = unique_topic("chaos-cluster");
    // Replication 3 and min.insync.replicas 2 (the cluster's default).
    create_replicated_topic(&bootstrap, &topic, 3, 3).await;
    let relay = Relay::start(outbox.pool.clone(), relay_config(&outbox, &bootstrap)).unwrap();
    let ledger = Ledger::shared();
    let writer = spawn_writer(
        &outbox,
        &topic,
        scale(600),
        Duration::from_millis(10),
        &ledger,
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = tokio::task::block_in_place(|| partition_leader(&bootstrap, &topic, 0));
    let victim = cluster
        .iter_mut()
        .find(|b| b.node_id() as i32 == leader)
        .expect("the leader is one of ours");
    victim.kill();
    writer.await.unwrap();
    let survivors = cluster
        .iter()
        .filter(|b| b.node_id() as i32 != leader)
        .map(KafkaBroker::bootstrap_servers)
        .collect::<Vec<_>>()
        .join(",");
    let mut reader = TopicReader::on(&survivors, &topic);
    settle_and_check(
        &outbox,
        "3. partition leader SIGKILLed, 3 brokers, RF 3, min.insync 2",
        1,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}
