//! The `outbox relay` daemon against the `dev/up` broker's SASL_SSL listener (SCRAM-SHA-512,
//! TLS with a CA `dev/up` makes, ACLs): it publishes with its user's rights, a consumer user
//! reads, and a refused password, an untrusted certificate or a missing ACL is named in the
//! health report while nothing is marked complete. No secret reaches the logs (at debug
//! level), `--print-config`, `/metrics` or `/health`.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use outbox::Message;
use outbox_test_support::{
    create_topic, database_url, free_port, kafka_bootstrap_servers, kafka_sasl_ca,
    kafka_sasl_properties, short_id, unique_topic, wait_until, TestOutbox, TopicReader,
    SASL_CONSUMER, SASL_RELAY,
};

/// A relay daemon and the file its stderr goes to; SIGKILLed on drop.
struct Daemon {
    child: Child,
    log: std::path::PathBuf,
    metrics: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `OUTBOX_KAFKA_*` variables for librdkafka properties.
fn kafka_env(command: &mut Command, properties: &[(String, String)]) {
    for (key, value) in properties {
        command.env(
            format!("OUTBOX_KAFKA_{}", key.replace('.', "_").to_uppercase()),
            value,
        );
    }
}

fn relay_command(outbox: &TestOutbox, properties: &[(String, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
    command
        .env("DATABASE_URL", database_url())
        .env("OUTBOX_SCHEMA", outbox.schema.as_str())
        .env("OUTBOX_SOURCE", "secured")
        .env("OUTBOX_MONITOR_INTERVAL_MS", "500")
        .env("OUTBOX_STALL_TIMEOUT_MS", "60000")
        .env("OUTBOX_BACKOFF_MAX_MS", "2000")
        .env("OUTBOX_LOG", "debug")
        .env_remove("OUTBOX_CONFIG")
        .env_remove("KAFKA_BOOTSTRAP_SERVERS");
    kafka_env(&mut command, properties);
    command
}

fn start(outbox: &TestOutbox, properties: &[(String, String)]) -> Daemon {
    start_with(outbox, properties, &[])
}

/// [`start`], with more `OUTBOX_*` settings.
fn start_with(
    outbox: &TestOutbox,
    properties: &[(String, String)],
    env: &[(&str, &str)],
) -> Daemon {
    let log = std::env::temp_dir().join(format!("outbox-secured-{}.log", short_id()));
    let metrics = format!("127.0.0.1:{}", free_port());
    let child = relay_command(outbox, properties)
        .envs(env.iter().copied())
        .args(["relay", "--metrics-addr", &metrics])
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .expect("start outbox relay");
    Daemon {
        child,
        log,
        metrics,
    }
}

async fn get(daemon: &Daemon, path: &str) -> String {
    match reqwest::get(format!("http://{}{path}", daemon.metrics)).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until `/health/ready` gives a reason containing `what`; returns the report.
async fn wait_for_reason(daemon: &Daemon, what: &str) -> String {
    let mut last = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        last = get(daemon, "/health/ready").await;
        if last.contains(what) {
            assert!(last.contains("\"ready\":false"), "{last}");
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the health report never said {what:?}; last: {last}");
}

/// Neither the daemon's log nor its endpoints nor `--print-config` show `secret`.
async fn assert_secret_kept(
    daemon: &Daemon,
    outbox: &TestOutbox,
    properties: &[(String, String)],
    secret: &str,
) {
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(!log.is_empty(), "the daemon logged nothing");
    assert!(!log.contains(secret), "the log shows the password");
    for path in ["/metrics", "/health/ready", "/health/live"] {
        assert!(
            !get(daemon, path).await.contains(secret),
            "{path} shows the password"
        );
    }
    let printed = relay_command(outbox, properties)
        .args(["relay", "--print-config"])
        .output()
        .unwrap();
    assert!(printed.status.success());
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.contains("sasl.username"), "{printed}");
    assert!(
        !printed.contains(secret),
        "--print-config shows the password"
    );
}

async fn commit(outbox: &TestOutbox, topic: &str, payloads: &[&str]) {
    outbox
        .commit_each(
            payloads
                .iter()
                .map(|p| Message::new(topic, p.as_bytes().to_vec()).key("k")),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_publishes_over_sasl_ssl_and_the_consumer_user_reads() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("secured");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let properties = kafka_sasl_properties(&SASL_RELAY, SASL_RELAY.password, &kafka_sasl_ca());
    let daemon = start(&outbox, &properties);
    commit(&outbox, &topic, &["one", "two", "three"]).await;

    let consumer = kafka_sasl_properties(&SASL_CONSUMER, SASL_CONSUMER.password, &kafka_sasl_ca());
    let mut reader = TopicReader::with(&consumer, &topic);
    let received = reader.read_at_least(3, Duration::from_secs(60)).await;
    let payloads: Vec<&str> = received.iter().map(|r| r.payload_str()).collect();
    assert_eq!(payloads, ["one", "two", "three"]);
    outbox.wait_until_drained(Duration::from_secs(30)).await;
    wait_until(
        Duration::from_secs(30),
        "the relay reports ready",
        || async {
            get(&daemon, "/health/ready")
                .await
                .contains("\"ready\":true")
        },
    )
    .await;
    assert_secret_kept(&daemon, &outbox, &properties, SASL_RELAY.password).await;
    drop(daemon);
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_password_is_named_and_nothing_is_completed() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("secured");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    commit(&outbox, &topic, &["waits"]).await;
    let wrong = "wrong-password-7c1e";
    let properties = kafka_sasl_properties(&SASL_RELAY, wrong, &kafka_sasl_ca());
    let daemon = start(&outbox, &properties);
    wait_for_reason(&daemon, "refuses the relay's credentials").await;
    assert_eq!(outbox.pending().await, 1, "nothing was completed");
    assert_secret_kept(&daemon, &outbox, &properties, wrong).await;
    drop(daemon);
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_named_and_nothing_is_completed() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("secured");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    commit(&outbox, &topic, &["waits"]).await;
    // A CA that did not sign the broker's certificate (dev/up makes it beside the real one).
    let other_ca = kafka_sasl_ca().replace("ca.pem", "other-ca.pem");
    let properties = kafka_sasl_properties(&SASL_RELAY, SASL_RELAY.password, &other_ca);
    let daemon = start(&outbox, &properties);
    wait_for_reason(&daemon, "TLS handshake with Kafka fails").await;
    assert_eq!(outbox.pending().await, 1, "nothing was completed");
    assert_secret_kept(&daemon, &outbox, &properties, SASL_RELAY.password).await;
    drop(daemon);
    outbox.drop_schema().await;
}

/// The relay's user may write `secured-*` only: a message to another topic is held, with
/// Kafka's refusal as its error, and named in the health report; the allowed topic flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_acl_holds_only_its_topic_and_is_named() {
    let outbox = TestOutbox::new().await;
    let allowed = unique_topic("secured");
    let refused = unique_topic("unlisted");
    create_topic(&kafka_bootstrap_servers(), &allowed, 1).await;
    create_topic(&kafka_bootstrap_servers(), &refused, 1).await;
    commit(&outbox, &refused, &["refused"]).await;
    commit(&outbox, &allowed, &["allowed"]).await;
    let properties = kafka_sasl_properties(&SASL_RELAY, SASL_RELAY.password, &kafka_sasl_ca());
    let daemon = start(&outbox, &properties);
    let report = wait_for_reason(&daemon, &format!("write topic \\\"{refused}\\\"")).await;
    assert!(report.contains("missing ACL"), "{report}");
    let mut reader = TopicReader::new(&allowed);
    reader.read_at_least(1, Duration::from_secs(30)).await;
    wait_until(
        Duration::from_secs(30),
        "only the refused message is pending",
        || async { outbox.pending().await == 1 },
    )
    .await;
    let error: Option<String> = sqlx::query_scalar(&format!(
        "SELECT last_error FROM {}.message WHERE topic = $1",
        outbox.schema
    ))
    .bind(&refused)
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    let error = error.unwrap_or_default();
    assert!(error.contains("TopicAuthorizationFailed"), "{error}");
    drop(daemon);
    outbox.drop_schema().await;
}

/// Exactly-once delivery over SASL_SSL: the relay's principal may use transactional ids
/// `outbox:secured-*` (dev/up's ACLs), so a lease named `secured-*` publishes in transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_publishes_in_transactions_with_its_transactional_id_acl() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("secured");
    let progress = unique_topic("secured-progress");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    // The relay's principal may not create topics: the operator creates the progress topic.
    create_topic(&kafka_bootstrap_servers(), &progress, 1).await;
    let properties = kafka_sasl_properties(&SASL_RELAY, SASL_RELAY.password, &kafka_sasl_ca());
    let lease = format!("secured-{}", short_id());
    let daemon = start_with(
        &outbox,
        &properties,
        &[
            ("OUTBOX_DELIVERY", "exactly-once"),
            ("OUTBOX_PROGRESS_TOPIC", &progress),
            ("OUTBOX_LEASE_NAME", &lease),
        ],
    );
    commit(&outbox, &topic, &["one", "two", "three"]).await;
    let consumer = kafka_sasl_properties(&SASL_CONSUMER, SASL_CONSUMER.password, &kafka_sasl_ca());
    let mut reader = TopicReader::with(&consumer, &topic);
    let received = reader.read_at_least(3, Duration::from_secs(60)).await;
    let payloads: Vec<&str> = received.iter().map(|r| r.payload_str()).collect();
    assert_eq!(payloads, ["one", "two", "three"]);
    outbox.wait_until_drained(Duration::from_secs(30)).await;
    let metrics = get(&daemon, "/metrics").await;
    assert!(
        metrics.contains("outbox_transactions_total{outcome=\"committed\"}"),
        "{metrics}"
    );
    assert_secret_kept(&daemon, &outbox, &properties, SASL_RELAY.password).await;
    drop(daemon);
    outbox.drop_schema().await;
}

/// Without an ACL for its transactional id, an exactly-once relay publishes nothing, completes
/// nothing, and its health names the transactional id and what the principal needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_without_a_transactional_id_acl_is_named_and_nothing_is_completed() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("secured");
    let progress = unique_topic("secured-progress");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    create_topic(&kafka_bootstrap_servers(), &progress, 1).await;
    commit(&outbox, &topic, &["waits"]).await;
    let properties = kafka_sasl_properties(&SASL_RELAY, SASL_RELAY.password, &kafka_sasl_ca());
    // Lease "relay": transactional id "outbox:relay:secured", which no ACL grants.
    let daemon = start_with(
        &outbox,
        &properties,
        &[
            ("OUTBOX_DELIVERY", "exactly-once"),
            ("OUTBOX_PROGRESS_TOPIC", &progress),
        ],
    );
    let report = wait_for_reason(&daemon, "cannot initialise Kafka transactions").await;
    assert!(report.contains("outbox:relay:secured"), "{report}");
    assert!(report.contains("Write and Describe"), "{report}");
    assert_eq!(outbox.pending().await, 1, "nothing was completed");
    assert_secret_kept(&daemon, &outbox, &properties, SASL_RELAY.password).await;
    drop(daemon);
    outbox.drop_schema().await;
}
