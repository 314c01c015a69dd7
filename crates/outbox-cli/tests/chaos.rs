//! The chaos suite: faults injected for real while messages are written, then Kafka is read back
//! and checked against what committed: nothing lost, nothing from rolled-back transactions, per-key
//! order intact; duplicates and recovery times are reported. `dev/chaos` runs it and renders the
//! figures into docs/reliability.md. Scenarios run one at a time (they stop shared services).

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox::Message;
use outbox_kafka_relay::{Delivery, Relay, RelayConfig};
use outbox_test_support::chaos::{report, report_note, write_messages, Ledger};
use outbox_test_support::{
    create_replicated_topic, create_topic, create_topic_on, create_topic_with_config, database_url,
    kafka_bootstrap_servers, partition_leader, unique_topic, wait_until, Fault, KafkaBroker,
    PostgresServer, TcpProxy, TestOutbox, TopicReader,
};
use rand::Rng;
use tokio_util::sync::CancellationToken;

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

fn relay_config(outbox: &TestOutbox, bootstrap: &str, delivery: Delivery) -> RelayConfig {
    let mut config = RelayConfig::new(bootstrap, "chaos");
    config.schema = outbox.schema.clone();
    config.delivery = delivery;
    // Its own transactional id and progress topic.
    config.lease_name = format!("chaos-{}", outbox.schema);
    config.progress_topic = format!("chaos-progress-{}", outbox.schema);
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
    delivery: Delivery,
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
    let scenario = format!("{scenario}{}", mode(delivery));
    report(&scenario, faults, &figures, Some(recovery));
    if delivery == Delivery::ExactlyOnce {
        assert_eq!(figures.duplicates, 0, "{scenario}: duplicates: {figures:?}");
    }
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

fn relay_process(schema: &str, delivery: Delivery) -> Child {
    let delivery = match delivery {
        Delivery::AtLeastOnce => "at-least-once",
        _ => "exactly-once",
    };
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env("OUTBOX_DELIVERY", delivery)
        .env("OUTBOX_LEASE_NAME", format!("chaos-{schema}"))
        .env("OUTBOX_PROGRESS_TOPIC", format!("chaos-progress-{schema}"))
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

async fn relay_process_sigkilled_twenty_times_mid_stream(delivery: Delivery) {
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
        let mut relay = relay_process(outbox.schema.as_str(), delivery);
        let lifetime = rand::rng().random_range(300..1500);
        tokio::time::sleep(Duration::from_millis(lifetime)).await;
        if let Some(status) = relay.try_wait().unwrap() {
            panic!("the relay exited on its own before it was killed: {status}");
        }
        relay.kill().expect("SIGKILL the relay");
        relay.wait().unwrap();
    }
    writer.await.unwrap();
    let mut survivor = relay_process(outbox.schema.as_str(), delivery);
    let mut reader = TopicReader::new(&topic);
    settle_and_check(
        &outbox,
        delivery,
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

async fn kafka_broker_killed_and_restarted_mid_stream(delivery: Delivery) {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let mut broker = KafkaBroker::new();
    broker.start();
    let topic = unique_topic("chaos-broker");
    create_topic(&broker.bootstrap_servers(), &topic, 3).await;
    let relay = Relay::start(
        outbox.pool.clone(),
        relay_config(&outbox, &broker.bootstrap_servers(), delivery),
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
        delivery,
        "2. Kafka broker SIGKILLed and restarted",
        1,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

async fn relay_database_connections_terminated_repeatedly(delivery: Delivery) {
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
        relay_config(&outbox, &kafka_bootstrap_servers(), delivery),
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
        delivery,
        "4a. relay's PostgreSQL connections terminated (pg_terminate_backend)",
        terminated,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

async fn postgresql_restarted_mid_stream(delivery: Delivery) {
    let _serial = serial().await;
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("chaos-pgrestart");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;
    let relay = Relay::start(
        outbox.pool.clone(),
        relay_config(&outbox, &kafka_bootstrap_servers(), delivery),
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
    settle_and_check(
        &outbox,
        delivery,
        "4b. PostgreSQL restarted",
        1,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

async fn network_to_postgresql_delayed_and_blackholed(delivery: Delivery) {
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
        relay_config(&outbox, &kafka_bootstrap_servers(), delivery),
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
        delivery,
        "5a. network relay→PostgreSQL: delay, blackhole, drop",
        3,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

async fn network_to_kafka_delayed_blackholed_and_dropped(delivery: Delivery) {
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
        relay_config(&outbox, &broker.bootstrap_servers(), delivery),
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
        delivery,
        "5b. network relay→Kafka: delay, blackhole, drop",
        3,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

async fn two_relays_with_a_lease_shorter_than_the_stall_never_publish_at_once(delivery: Delivery) {
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
    let mut config = relay_config(&outbox, &kafka_bootstrap_servers(), delivery);
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
        delivery,
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

async fn partition_leader_killed_in_a_three_broker_cluster(delivery: Delivery) {
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
    let relay = Relay::start(
        outbox.pool.clone(),
        relay_config(&outbox, &bootstrap, delivery),
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
        delivery,
        "3. partition leader SIGKILLed, 3 brokers, RF 3, min.insync 2",
        1,
        &ledger,
        &mut reader,
    )
    .await;
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

/// A child process killed when dropped, also when the test fails: a relay left running would
/// skew every later measurement.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `outbox relay` daemon with its defaults (the chaos-tuned `relay_process` claims in
/// batches of 50).
fn default_relay_process(schema: &str, delivery: Delivery) -> KillOnDrop {
    let delivery = match delivery {
        Delivery::AtLeastOnce => "at-least-once",
        _ => "exactly-once",
    };
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .env("OUTBOX_DELIVERY", delivery)
            // The source is fixed ("chaos"), so the transactional id is the same for every
            // schema: a progress topic of its own keeps one run's progress from another's.
            .env("OUTBOX_PROGRESS_TOPIC", format!("chaos-progress-{schema}"))
            .env("DATABASE_URL", database_url())
            .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap_servers())
            .env("OUTBOX_SCHEMA", schema)
            .env("OUTBOX_SOURCE", "chaos")
            .env(
                "OUTBOX_LOG",
                std::env::var("CHAOS_RELAY_LOG").unwrap_or("error".into()),
            )
            .env_remove("OUTBOX_CONFIG")
            .arg("relay")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outbox relay"),
    )
}

/// Commit-to-publish latency of `topic`'s messages, from the database's own clock: the writing
/// transaction's start (`created_at`; each transaction writes one message and commits at once)
/// to the relay's completion after Kafka's acknowledgement (`processed_at`). (p50, p99) in ms.
async fn publish_latency(outbox: &TestOutbox, topic: &str) -> (f64, f64) {
    sqlx::query_as(&format!(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
           FROM (SELECT extract(epoch FROM processed_at - created_at) * 1000 AS ms
                   FROM {}.published WHERE topic = $1) l",
        outbox.schema
    ))
    .bind(topic)
    .fetch_one(&outbox.pool)
    .await
    .unwrap()
}

/// Holds 10,000 keys: messages with distinct keys for a topic that does not exist, enqueued and
/// held by the relay before the steady load starts (a topic not created, or not authorised
/// yet). Returns their sequences.
async fn hold_ten_thousand_keys(outbox: &TestOutbox) -> Vec<i64> {
    let schema = outbox.schema.as_str();
    let held: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT {schema}.enqueue($1, 'held-' || i, 'x') FROM generate_series(1, 10000) i"
    ))
    .bind(unique_topic("chaos-hostile-missing"))
    .fetch_all(&outbox.pool)
    .await
    .unwrap();
    // All but the one probing the topic.
    let admin = outbox::admin::Admin::new(&outbox.schema);
    wait_until(Duration::from_secs(60), "10,000 keys are held", || async {
        let mut conn = outbox.pool.acquire().await.unwrap();
        let backlog = admin.backlog(&mut conn).await.unwrap();
        backlog.held >= 9_999
    })
    .await;
    held
}

/// A topic that refuses records over 20,000 bytes.
async fn small_topic() -> String {
    let topic = unique_topic("chaos-hostile-small");
    create_topic_with_config(
        &kafka_bootstrap_servers(),
        &topic,
        1,
        1,
        &[("max.message.bytes", "20000")],
    )
    .await;
    topic
}

/// Writes the messages of every kind a careless or malicious writer can produce, one of each
/// every `PAUSE`, until `stop`; the oversized ones to `oversized_topic`. Returns the sequences
/// of the messages stored, and the enqueue calls refused.
async fn hostile_writers(
    outbox: &TestOutbox,
    oversized_topic: &str,
    stop: CancellationToken,
) -> (Vec<i64>, usize) {
    const PAUSE: Duration = Duration::from_millis(100);
    let schema = outbox.schema.as_str();
    let pool = &outbox.pool;
    let held_topic = unique_topic("chaos-hostile-missing");
    let mut stored = Vec::new();
    let mut refused = 0;
    let insert = format!(
        "INSERT INTO {schema}.message (topic, key, payload, headers)
         VALUES ($1, convert_to(gen_random_uuid()::text, 'UTF8'), $2, $3::jsonb) RETURNING id"
    );
    let raw = |headers: Option<&'static str>, topic: String, payload: Vec<u8>| {
        sqlx::query_scalar::<_, i64>(&insert)
            .bind(topic)
            .bind(payload)
            .bind(headers)
    };
    let mut round = 0u64;
    while !stop.is_cancelled() {
        round += 1;
        // Headers of another shape, and the relay's own headers spoofed, by raw INSERTs.
        stored.push(
            raw(
                Some(r#"{"x-trace": null}"#),
                held_topic.clone(),
                b"h".to_vec(),
            )
            .fetch_one(pool)
            .await
            .unwrap(),
        );
        stored.push(
            raw(
                Some(r#"[{"name": "x-sequence", "text": "1"}]"#),
                held_topic.clone(),
                b"s".to_vec(),
            )
            .fetch_one(pool)
            .await
            .unwrap(),
        );
        // The same through enqueue(): refused.
        for headers in [r#"{"x-sequence": "1"}"#, r#"{"x-trace": null}"#] {
            let result = sqlx::query(&format!(
                "SELECT {schema}.enqueue('t', 'k', 'x', $1::jsonb)"
            ))
            .bind(headers)
            .execute(pool)
            .await;
            refused += usize::from(result.is_err());
        }
        // A fresh missing topic name every round.
        stored.push(
            sqlx::query_scalar(&format!("SELECT {schema}.enqueue($1, 'k', 'x')"))
                .bind(unique_topic("chaos-hostile-fresh"))
                .fetch_one(pool)
                .await
                .unwrap(),
        );
        // A record the broker refuses (incompressible, over the topic's limit), every 2nd round.
        if round % 2 == 0 {
            let noise: Vec<u8> = (0..60_000).map(|_| rand::random::<u8>()).collect();
            stored.push(
                raw(None, oversized_topic.to_owned(), noise)
                    .fetch_one(pool)
                    .await
                    .unwrap(),
            );
        }
        tokio::time::sleep(PAUSE).await;
    }
    (stored, refused)
}

/// One run of the steady healthy load with the daemon, with or without hostile writers beside
/// it. Returns the healthy load's (p50, p99) commit-to-publish latency.
async fn steady_load(hostile: bool, delivery: Delivery) -> (f64, f64) {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("chaos-steady");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;
    // Before the relay starts, so that it lists the topic: it does not probe topics it does not
    // list with exactly-once delivery, and would hold the first records as for a missing topic.
    let oversized_topic = small_topic().await;
    let relay = default_relay_process(outbox.schema.as_str(), delivery);
    // The load starts on a running relay: its start (with exactly-once delivery, producers
    // registered and the progress read, ~1 s) is not the load's latency.
    let warm_up = outbox
        .commit_each([Message::new(&oversized_topic, "warm-up")])
        .await[0];
    wait_until(Duration::from_secs(60), "the relay publishes", || async {
        sqlx::query_scalar::<_, bool>(&format!(
            "SELECT EXISTS (SELECT 1 FROM {}.published WHERE id = $1)",
            outbox.schema
        ))
        .bind(warm_up)
        .fetch_one(&outbox.pool)
        .await
        .unwrap()
    })
    .await;
    let held = match hostile {
        true => hold_ten_thousand_keys(&outbox).await,
        false => Vec::new(),
    };
    let ledger = Ledger::shared();
    let stop = CancellationToken::new();
    let (bad, ()) = tokio::join!(
        async {
            match hostile {
                true => Some(hostile_writers(&outbox, &oversized_topic, stop.clone()).await),
                false => None,
            }
        },
        async {
            let writer = spawn_writer(
                &outbox,
                &topic,
                scale(1500),
                Duration::from_millis(4),
                &ledger,
            );
            writer.await.unwrap();
            stop.cancel();
        }
    );
    let mut reader = TopicReader::new(&topic);
    let scenario = if hostile {
        "8b. hostile writers beside a steady load (malformed and spoofed headers, fresh missing topics, oversized records, 10,000 held keys)"
    } else {
        "8a. steady load alone (the baseline of 8b)"
    };
    settle_and_check(
        &outbox,
        delivery,
        scenario,
        bad.as_ref().map_or(0, |b| b.0.len()),
        &ledger,
        &mut reader,
    )
    .await;
    let latency = publish_latency(&outbox, &topic).await;
    if let Some((mut stored, refused)) = bad {
        stored.extend(held);
        assert!(
            refused > 0,
            "enqueue() refused no spoofed or malformed header"
        );
        // Every bad message is held with its own error or dead-lettered, none published, and
        // no healthy message was blamed.
        let admin = outbox::admin::Admin::new(&outbox.schema);
        wait_until(
            Duration::from_secs(60),
            "every bad message carries its own error",
            || async {
                let unblamed: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM {}.message WHERE id = ANY($1) AND last_error IS NULL",
                    outbox.schema
                ))
                .bind(&stored)
                .fetch_one(&outbox.pool)
                .await
                .unwrap();
                unblamed == 0
            },
        )
        .await;
        let published: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}.published WHERE id = ANY($1)",
            outbox.schema
        ))
        .bind(&stored)
        .fetch_one(&outbox.pool)
        .await
        .unwrap();
        assert_eq!(published, 0, "a bad message was published");
        let mut conn = outbox.pool.acquire().await.unwrap();
        let held = admin.held_keys(&mut conn, 100_000).await.unwrap();
        assert_eq!(
            held.len(),
            stored.len(),
            "each bad message holds its own key"
        );
        for key in &held {
            let error = key.last_error.as_deref().unwrap_or_default();
            // Probes get librdkafka's "Unknown topic", the others the relay's "does not exist".
            let own_error = if key.topic.starts_with("chaos-hostile-small") {
                error.contains("too large")
            } else if key.topic.starts_with("chaos-hostile-fresh") {
                error.contains("does not exist") || error.contains("Unknown topic")
            } else {
                !error.is_empty()
            };
            assert!(own_error, "sequence {} ({}): {error}", key.head, key.topic);
        }
    }
    drop(relay);
    outbox.drop_schema().await;
    latency
}

/// In exactly-once mode too, where a refused record aborts its whole transaction: the oversized
/// records go in transactions of their own, the held keys' retries in transactions apart.
/// (Before, the healthy messages waited ~40 s at the median.)
async fn hostile_writers_neither_stop_nor_slow_a_steady_healthy_load(delivery: Delivery) {
    let _serial = serial().await;
    // The median must stay within 2x (plus 2 ms of scheduling noise): a real slowdown of every
    // healthy message shows there (a change that cost the relay 5 ms per cycle under hostile
    // writers measured 7.1-8.0 ms against 2.1-2.5; one that delayed the relay's start by six
    // authentications, 12-21 ms against 2-3, in every run). The p99 of ~1,350 commits is a
    // dozen samples: on this 2-core machine the baseline's alone ranged 13-120 ms between runs
    // of the same code, and the hostile run's 45-80 ms, so the tail is held to 2x the
    // baseline's p99 but never to less than 100 ms. A slowdown the code causes shows in every
    // pair of runs; one the machine causes (the suite's previous test still settling: in CI a
    // first pair measured 12.7 and 15.3 ms against 2.6-2.7, the same code 3.4-3.9 alone) does
    // not: a pair that misses is measured once more, and the second decides.
    let within = |p50: f64, p99: f64, base_p50: f64, base_p99: f64| {
        p50 <= 2.0 * base_p50 + 2.0 && p99 <= 2.0 * base_p99.max(50.0)
    };
    let mut pairs = Vec::new();
    for _ in 0..2 {
        let (base_p50, base_p99) = steady_load(false, delivery).await;
        let (p50, p99) = steady_load(true, delivery).await;
        println!(
            "healthy commit-to-publish latency: p50 {p50:.1} ms, p99 {p99:.1} ms with hostile writers; p50 {base_p50:.1} ms, p99 {base_p99:.1} ms without"
        );
        pairs.push((p50, p99, base_p50, base_p99));
        if within(p50, p99, base_p50, base_p99) {
            break;
        }
    }
    let (p50, p99, base_p50, base_p99) = pairs[pairs.len() - 1];
    let mode = mode(delivery);
    report_note(&format!(
        "Scenario 8b{mode}: the steady load's commit-to-publish latency (writer's transaction start to \
         the relay's completion after Kafka's acknowledgement, database clock) was p50 {p50:.1} ms, \
         p99 {p99:.1} ms with the hostile writers, and p50 {base_p50:.1} ms, p99 {base_p99:.1} ms \
         without them (8a), the same daemon with its default settings in both{}.",
        match pairs.len() {
            1 => String::new(),
            _ => format!(
                " (a first pair, measured while the machine settled, gave p50 {:.1} against {:.1} ms and was measured again)",
                pairs[0].0, pairs[0].2
            ),
        }
    ));
    assert!(
        within(p50, p99, base_p50, base_p99),
        "p50 {p50:.1} ms, p99 {p99:.1} ms with hostile writers; p50 {base_p50:.1} ms, p99 {base_p99:.1} ms without"
    );
}

/// A partition without a leader (its only replica's broker SIGKILLed): librdkafka keeps its
/// records queued for as long as that lasts (`message.timeout.ms=0`). Writers go on sending to
/// that topic with ever new keys, some of which land on the dead partition; a healthy topic on
/// the other brokers must keep flowing at its normal latency, in order, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_without_a_leader_delays_only_its_own_messages() {
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
    // The healthy topic lives on brokers 1 and 2; partition 0 of the other only on broker 3.
    let healthy = unique_topic("chaos-leaderless-healthy");
    create_topic_on(&bootstrap, &healthy, &[&[1, 2], &[2, 1], &[1, 2]]).await;
    let orphaned = unique_topic("chaos-leaderless");
    create_topic_on(&bootstrap, &orphaned, &[&[3], &[1], &[2]]).await;
    let mut config = relay_config(&outbox, &bootstrap, Delivery::AtLeastOnce);
    config.batch_size = 5000;
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    // A running relay: its producer has its id and both topics' metadata before the fault.
    let warm_up = outbox
        .commit_each([
            Message::new(&healthy, "warm-up").key("warm-up"),
            Message::new(&orphaned, "warm-up").key("warm-up"),
        ])
        .await;
    outbox.wait_until_drained(Duration::from_secs(60)).await;
    cluster
        .iter_mut()
        .find(|b| b.node_id() == 3)
        .expect("broker 3")
        .kill();

    let ledger = Ledger::shared();
    let stop = CancellationToken::new();
    let orphans = async {
        let mut n = 0;
        while !stop.is_cancelled() {
            outbox
                .commit_each([Message::new(&orphaned, "o").key(format!("orphan-{n}"))])
                .await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        n
    };
    let healthy_load = async {
        spawn_writer(
            &outbox,
            &healthy,
            scale(1000),
            Duration::from_millis(5),
            &ledger,
        )
        .await
        .unwrap();
        stop.cancel();
    };
    let (orphans, ()) = tokio::join!(orphans, healthy_load);
    let survivors = cluster
        .iter()
        .filter(|b| b.node_id() != 3)
        .map(KafkaBroker::bootstrap_servers)
        .collect::<Vec<_>>()
        .join(",");
    let mut reader = TopicReader::on(&survivors, &healthy);
    reader.read_at_least(1, Duration::from_secs(30)).await;
    reader.received.retain(|r| r.sequence() != warm_up[0]);
    settle_and_check(&outbox, Delivery::AtLeastOnce,
        "9. a partition without a leader (its only broker SIGKILLed), written with new keys all along",
        1,
        &ledger,
        &mut reader,
    )
    .await;
    let (p50, p99) = publish_latency(&outbox, &healthy).await;
    report_note(&format!(
        "Scenario 9: the healthy topic's commit-to-publish latency was p50 {p50:.1} ms, p99 \
         {p99:.1} ms while {orphans} messages were written to the topic with a leaderless partition."
    ));
    assert!(p99 < 500.0, "healthy p99 {p99:.1} ms");
    relay.abort();
    outbox.drop_schema().await;
}

/// The relay daemon through `endpoint`, publishing only what `wait_for_standbys` standbys have.
fn failover_relay_process(
    endpoint: &str,
    wait_for_standbys: u32,
    delivery: Delivery,
) -> KillOnDrop {
    let delivery = match delivery {
        Delivery::AtLeastOnce => "at-least-once",
        _ => "exactly-once",
    };
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .env("OUTBOX_DELIVERY", delivery)
            // Each run's progress apart (the source, hence the transactional id, is fixed).
            .env(
                "OUTBOX_PROGRESS_TOPIC",
                unique_topic("chaos-failover-progress"),
            )
            .env(
                "DATABASE_URL",
                format!("postgres://outbox:outbox@{endpoint}/outbox"),
            )
            .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap_servers())
            .env("OUTBOX_SOURCE", "chaos-failover")
            .env("OUTBOX_LEASE_TTL_MS", "1000")
            .env("OUTBOX_LEASE_RENEW_INTERVAL_MS", "300")
            .env("OUTBOX_POLL_INTERVAL_MS", "100")
            .env("OUTBOX_BACKOFF_MAX_MS", "500")
            .env("OUTBOX_WAIT_FOR_STANDBYS", wait_for_standbys.to_string())
            .env(
                "OUTBOX_LOG",
                std::env::var("CHAOS_RELAY_LOG").unwrap_or("error".into()),
            )
            .env_remove("OUTBOX_CONFIG")
            .env_remove("OUTBOX_SCHEMA")
            .arg("relay")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outbox relay"),
    )
}

/// A primary streaming asynchronously to a standby whose replication crosses a 20 ms link (a
/// standby in another zone); writers at a steady rate and the relay daemon reach the primary
/// through an endpoint that follows it (a proxy here; HAProxy with Patroni's health check, a
/// floating IP or a cloud DNS name in production). The primary's zone fails mid-stream (the
/// replication link stalls, then drops what it carries, the primary is SIGKILLed), the
/// standby promoted, the endpoint pointed at it and a new standby made from it (as Patroni
/// rebuilds a failed primary); writers and relay go on by themselves. Kafka is then checked
/// against what the promoted primary holds.
async fn primary_failover(scenario: &str, wait_for_standbys: u32, delivery: Delivery) -> usize {
    let primary = PostgresServer::primary();
    let replication = TcpProxy::start(&primary.addr()).await;
    replication.set(Fault::Delay(20));
    let standby = PostgresServer::standby_of(&replication.addr());
    let endpoint = TcpProxy::start(&primary.addr()).await;
    let url = format!("postgres://outbox:outbox@{}/outbox", endpoint.addr());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&url)
        .await
        .expect("connect through the endpoint");
    let outbox = outbox::Outbox::new(outbox::OutboxConfig::default());
    outbox.migrate(&pool).await.unwrap();
    let topic = unique_topic("chaos-failover");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;
    let streaming = |server: &PostgresServer| {
        let url = server.url();
        async move {
            let Ok(pool) = sqlx::PgPool::connect(&url).await else {
                return false;
            };
            let streaming: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
            pool.close().await;
            streaming == 1
        }
    };
    wait_until(Duration::from_secs(30), "the standby streams", || {
        streaming(&primary)
    })
    .await;

    let _relay = failover_relay_process(&endpoint.addr(), wait_for_standbys, delivery);
    let ledger = Ledger::shared();
    let writer = tokio::spawn(write_messages(
        pool.clone(),
        outbox,
        topic.clone(),
        outbox_test_support::short_id(),
        scale(600),
        7,
        Duration::from_millis(10),
        10,
        ledger.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The primary's zone fails: its link to the standby stalls for 300 ms, then drops (the WAL
    // on it never arrives), then the server dies. The commits of those 300 ms are lost, for sure.
    replication.set(Fault::Blackhole);
    tokio::time::sleep(Duration::from_millis(300)).await;
    replication.set(Fault::Drop);
    tokio::task::block_in_place(|| {
        primary.kill();
        standby.promote();
    });
    endpoint.retarget(&standby.addr());
    let _new_standby = tokio::task::block_in_place(|| PostgresServer::standby_of(&standby.addr()));
    writer.await.unwrap();

    let promoted = sqlx::PgPool::connect(&standby.url()).await.unwrap();
    let written = ledger.lock().unwrap().clone_committed();
    let truth = written.as_committed_in(&promoted, "outbox").await;
    let lost_by_replication = written.lost_by_the_database(&truth);
    // librdkafka's default isolation: read_committed.
    let mut reader = TopicReader::new(&topic);
    let started = Instant::now();
    while !truth.all_received(&reader) {
        assert!(
            started.elapsed() < RECOVERY_LIMIT,
            "{scenario}: committed messages still missing after {RECOVERY_LIMIT:?}"
        );
        reader.read_for(Duration::from_millis(200)).await;
    }
    let recovery = started.elapsed();
    reader.read_for(Duration::from_millis(500)).await;
    let mut figures = truth.verify(&reader);
    let phantoms = truth.phantoms(&reader);
    let reused = truth.phantoms_with_reused_sequences(&reader);
    figures.phantoms = Some(phantoms);
    report(scenario, 1, &figures, Some(recovery));
    report_note(&format!(
        "{scenario}: the database lost {lost_by_replication} acknowledged commits in the failover (asynchronous replication, its link stalled for the last 300 ms); {phantoms} of them had been published, and the promoted primary handed {reused} of their sequences out again, to other messages (a consumer deduplicating on x-source/x-sequence would drop those)."
    ));
    assert!(
        lost_by_replication > 0,
        "{scenario}: the failover lost no commit, so it tested nothing"
    );
    assert_eq!(figures.lost, 0, "{scenario}: lost messages: {figures:?}");
    assert_eq!(figures.rolled_back_published, 0, "{scenario}: {figures:?}");
    assert_eq!(figures.order_violations, 0, "{scenario}: {figures:?}");
    if delivery == Delivery::ExactlyOnce {
        assert_eq!(figures.duplicates, 0, "{scenario}: {figures:?}");
    }
    assert!(figures.committed > 0);
    promoted.close().await;
    phantoms
}

async fn primary_killed_and_standby_promoted_publishes_no_phantom_with_wait_for_standbys(
    delivery: Delivery,
) {
    let _serial = serial().await;
    let phantoms = primary_failover(
        &format!(
            "10a. PostgreSQL primary killed, standby promoted (wait_for_standbys = 1){}",
            mode(delivery)
        ),
        1,
        delivery,
    )
    .await;
    assert_eq!(
        phantoms, 0,
        "events published whose data the new primary lacks"
    );
}

/// The control: without the setting, the commits the failover lost had been published. (Exactly
/// once, a progress record may also name ids the promoted primary handed out again, and
/// complete those messages unpublished: documented, not run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_and_standby_promoted_without_wait_for_standbys() {
    let _serial = serial().await;
    let phantoms = primary_failover(
        "10b. PostgreSQL primary killed, standby promoted (wait_for_standbys = 0)",
        0,
        Delivery::AtLeastOnce,
    )
    .await;
    assert!(phantoms > 0, "the scenario could not tell a phantom event");
}

/// In a scenario's name in docs/reliability.md.
fn mode(delivery: Delivery) -> &'static str {
    match delivery {
        Delivery::AtLeastOnce => "",
        _ => " (exactly-once)",
    }
}

// Each scenario at least once (duplicates allowed, and counted) and exactly once (none allowed,
// read with `isolation.level=read_committed`).
outbox_test_support::in_both_modes!(
    relay_process_sigkilled_twenty_times_mid_stream,
    kafka_broker_killed_and_restarted_mid_stream,
    relay_database_connections_terminated_repeatedly,
    postgresql_restarted_mid_stream,
    network_to_postgresql_delayed_and_blackholed,
    network_to_kafka_delayed_blackholed_and_dropped,
    two_relays_with_a_lease_shorter_than_the_stall_never_publish_at_once,
    partition_leader_killed_in_a_three_broker_cluster,
    primary_killed_and_standby_promoted_publishes_no_phantom_with_wait_for_standbys,
    hostile_writers_neither_stop_nor_slow_a_steady_healthy_load,
);
