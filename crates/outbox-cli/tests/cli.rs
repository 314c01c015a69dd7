//! The real `outbox` binary against the `dev/up` services.

use std::collections::HashMap;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use outbox::Message;
use outbox_kafka_relay::{Relay, RelayConfig};
use outbox_test_support::{
    create_topic, database_url, kafka_bootstrap_servers, unique_topic, wait_until, KafkaBroker,
    TestOutbox, TopicReader,
};

fn outbox_cmd(schema: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox"));
    command
        .env("DATABASE_URL", database_url())
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap_servers())
        .env("OUTBOX_SCHEMA", schema)
        .env_remove("OUTBOX_CONFIG");
    command
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .expect("run the outbox binary")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", outbox_test_support::free_port())
}

/// A relay process, SIGTERMed (gracefully) on drop.
struct RelayProcess(Child);

impl RelayProcess {
    /// Starts `outbox relay <relay_args>`.
    fn start(command: &mut Command, relay_args: &[&str]) -> Self {
        RelayProcess(
            command
                .arg("relay")
                .args(relay_args)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status()
            .unwrap();
        self.0.wait().unwrap()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Parses Prometheus text: `name{labels}` → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_enqueue_and_status_report_the_backlog() {
    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.as_str();
    let migrate = run(outbox_cmd(schema).arg("migrate"));
    assert!(migrate.status.success(), "{}", stderr(&migrate));
    assert!(
        stdout(&migrate).contains(&format!("up to date at version {}", outbox::SCHEMA_VERSION)),
        "{}",
        stdout(&migrate)
    );

    for i in 0..3 {
        let enqueue = run(outbox_cmd(schema)
            .args([
                "enqueue",
                "--topic",
                "cli-status",
                "--key",
                "k",
                "--header",
                "x-value-type=Note",
            ])
            .arg(format!("note {i}")));
        assert!(enqueue.status.success(), "{}", stderr(&enqueue));
        stdout(&enqueue)
            .trim()
            .parse::<i64>()
            .expect("enqueue prints the sequence");
    }
    let status = run(outbox_cmd(schema).arg("status"));
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        stdout(&status).contains("pending messages:    3"),
        "{}",
        stdout(&status)
    );

    // A session holding an old snapshot (a report, pg_dump) shows up: the oldest snapshot is
    // at least as old as this one.
    let mut report = outbox.pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .execute(&mut *report)
        .await
        .unwrap();
    let held_ms: f64 = sqlx::query_scalar(
        "SELECT (extract(epoch FROM clock_timestamp() - xact_start) * 1000)::float8
           FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&mut *report)
    .await
    .unwrap();
    let json = run(outbox_cmd(schema).args(["status", "--json"]));
    let value: serde_json::Value =
        serde_json::from_slice(&json.stdout).expect("status --json is JSON");
    assert_eq!(value["pending"], 3);
    assert!(value["oldest_pending_age_ms"].as_u64().is_some());
    let oldest_ms = value["oldest_snapshot"]["age_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no oldest snapshot in {value}"));
    assert!(oldest_ms as f64 >= held_ms.floor(), "{value}");
    let text = run(outbox_cmd(schema).arg("status"));
    assert!(
        stdout(&text).contains("oldest snapshot:     "),
        "{}",
        stdout(&text)
    );
    report.rollback().await.unwrap();

    let invalid = run(outbox_cmd(schema).args(["enqueue", "--topic", "no spaces allowed", "x"]));
    assert_eq!(invalid.status.code(), Some(2), "{}", stderr(&invalid));
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_range_arrives_again_with_the_original_sequences() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("republish");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "cli-tests");
    config.schema = outbox.schema.clone();
    config.poll_interval = Duration::from_millis(200);
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    let sequences = outbox
        .commit_each((0..6).map(|i| Message::new(&topic, format!("{i}")).key("k")))
        .await;
    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(6, Duration::from_secs(60)).await;
    outbox.wait_until_drained(Duration::from_secs(10)).await;

    let (from, to) = (sequences[1], sequences[3]);
    let republish = run(outbox_cmd(outbox.schema.as_str())
        .args(["republish", "--yes", "--from-id"])
        .arg(from.to_string())
        .arg("--to-id")
        .arg(to.to_string()));
    assert!(republish.status.success(), "{}", stderr(&republish));
    assert!(
        stdout(&republish).contains("marked 3 messages"),
        "{}",
        stdout(&republish)
    );

    reader.read_at_least(9, Duration::from_secs(60)).await;
    let again: Vec<i64> = reader.received[6..].iter().map(|r| r.sequence()).collect();
    assert_eq!(again, vec![sequences[1], sequences[2], sequences[3]]);
    let payloads: Vec<&str> = reader.received[6..]
        .iter()
        .map(|r| r.payload_str())
        .collect();
    assert_eq!(payloads, ["1", "2", "3"]);

    // Above the confirmation threshold without a terminal and without --yes: refused, exit 2.
    let refused =
        run(outbox_cmd(outbox.schema.as_str()).args(["republish", "--confirm-above", "1"]));
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--yes"));
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[test]
fn invalid_configuration_exits_2_naming_the_key() {
    let dir = std::env::temp_dir().join(format!("outbox-cli-{}", outbox_test_support::short_id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("[relay]\nbatch_sise = 5\n", "batch_sise"),
        (
            "[relay]\nlease_ttl_ms = 1000\nlease_renew_interval_ms = 900\n",
            "relay.lease_renew_interval",
        ),
        ("[relay]\nretention_hours = -2\n", "relay.retention_hours"),
        ("[kafka]\nacks = \"1\"\n", "kafka.acks"),
    ];
    for (i, (toml, key)) in cases.iter().enumerate() {
        let path = dir.join(format!("{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let output = run(outbox_cmd("outbox")
            .arg("--config")
            .arg(&path)
            .args(["relay", "--print-config"]));
        assert_eq!(output.status.code(), Some(2), "{toml}: {}", stderr(&output));
        let message = stderr(&output);
        assert!(message.contains(key), "{toml}: {message}");
        assert_eq!(message.trim().lines().count(), 1, "one line: {message}");
    }
    let typo = run(outbox_cmd("outbox")
        .env("OUTBOX_BATCH_SISE", "5")
        .args(["relay", "--print-config"]));
    assert_eq!(typo.status.code(), Some(2));
    assert!(stderr(&typo).contains("OUTBOX_BATCH_SISE"));
}

/// A mistyped or misplaced variable once configured nothing, silently: `OUTBOX_Batch_Size` was
/// read as `OUTBOX_BATCH_SIZE`, `OUTBOX_KAFKA_` set a librdkafka property named "".
#[test]
fn unknown_outbox_variables_are_refused_by_name() {
    for name in [
        "OUTBOX_BATCH_SISE",
        "OUTBOX_Batch_Size",
        "OUTBOX_RELAY_BATCH_SIZE",
        "OUTBOX_KAFKA_",
    ] {
        let output = run(outbox_cmd("outbox")
            .env(name, "5")
            .args(["relay", "--print-config"]));
        assert_usage_error(&output, name);
        assert!(stderr(&output).contains("unknown environment variable"));
    }
}

/// Any variable that was not UTF-8, whoever's, made every command panic.
#[test]
fn variables_that_are_not_utf8_are_no_panic() {
    use std::os::unix::ffi::OsStringExt;
    let not_utf8 = std::ffi::OsString::from_vec(b"caf\xe9".to_vec());
    let output = run(outbox_cmd("outbox")
        .env("SOMEONE_ELSES", &not_utf8)
        .args(["relay", "--print-config"]));
    assert!(output.status.success(), "{}", stderr(&output));
    let output = run(outbox_cmd("outbox")
        .env("OUTBOX_SOURCE", &not_utf8)
        .args(["relay", "--print-config"]));
    assert_usage_error(&output, "OUTBOX_SOURCE");
}

#[test]
fn settings_come_from_the_file_then_the_environment_then_flags() {
    let path = std::env::temp_dir().join(format!(
        "outbox-cli-{}.toml",
        outbox_test_support::short_id()
    ));
    std::fs::write(
        &path,
        "[relay]\nbatch_size = 10\nlease_name = \"file\"\nsource = \"file\"\n",
    )
    .unwrap();
    let printed = |args: &[&str]| {
        let output = run(outbox_cmd("outbox")
            .env("OUTBOX_BATCH_SIZE", "20")
            .env("OUTBOX_LEASE_NAME", "env")
            .env_remove("OUTBOX_SOURCE")
            .arg("--config")
            .arg(&path)
            .args(["relay", "--print-config"])
            .args(args));
        assert!(output.status.success(), "{}", stderr(&output));
        stdout(&output)
    };
    let shown = printed(&[]);
    for line in [
        "source = \"file\"",
        "lease_name = \"env\"",
        "batch_size = 20",
    ] {
        assert!(shown.contains(line), "{line}:\n{shown}");
    }
    let shown = printed(&["--batch-size", "30", "--source", "flag"]);
    for line in [
        "source = \"flag\"",
        "lease_name = \"env\"",
        "batch_size = 30",
    ] {
        assert!(shown.contains(line), "{line}:\n{shown}");
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn printed_configuration_masks_secrets() {
    let output = run(outbox_cmd("outbox")
        .env("DATABASE_URL", "postgres://me:db-secret@127.0.0.1:1/x")
        .args([
            "--kafka",
            "sasl.password=kafka-secret",
            "relay",
            "--print-config",
        ]));
    assert!(output.status.success(), "{}", stderr(&output));
    let shown = stdout(&output);
    assert!(shown.contains("sasl.password"));
    assert!(
        !shown.contains("db-secret") && !shown.contains("kafka-secret"),
        "{shown}"
    );
}

#[test]
fn unreachable_database_exits_1_with_one_clear_line() {
    let output = run(outbox_cmd("outbox")
        .env("DATABASE_URL", "postgres://me:db-secret@127.0.0.1:1/x")
        .arg("status"));
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(
        message.contains("cannot connect to PostgreSQL"),
        "{message}"
    );
    assert!(!message.contains("db-secret"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_daemon_serves_metrics_and_shuts_down_cleanly() {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("metrics");
    create_topic(&kafka_bootstrap_servers(), &topic, 2).await;
    let addr = free_addr();
    let mut relay = RelayProcess::start(
        outbox_cmd(outbox.schema.as_str())
            .env("OUTBOX_MONITOR_INTERVAL_MS", "200")
            .env("OUTBOX_POLL_INTERVAL_MS", "200"),
        &["--metrics-addr", &addr],
    );
    outbox
        .commit_each(
            (0..25).map(|i| Message::new(&topic, format!("{i}")).key(format!("k{}", i % 4))),
        )
        .await;
    TopicReader::new(&topic)
        .read_at_least(25, Duration::from_secs(60))
        .await;

    let client = reqwest::Client::new();
    let published = format!("outbox_messages_published_total{{topic=\"{topic}\"}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let metrics = loop {
        if let Ok(response) = client.get(format!("http://{addr}/metrics")).send().await {
            let metrics = parse_metrics(&response.text().await.unwrap_or_default());
            if metrics.get(&published) == Some(&25.0) {
                break metrics;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "metrics did not show {published} = 25"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        metrics.get("outbox_lease_held{lease=\"relay\"}"),
        Some(&1.0)
    );
    assert_eq!(
        metrics.get("outbox_publish_latency_seconds_count"),
        Some(&25.0)
    );
    assert!(metrics.contains_key("outbox_backlog_messages"));
    assert!(metrics.contains_key("outbox_oldest_snapshot_age_seconds"));
    let ready = client
        .get(format!("http://{addr}/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    let status = relay.terminate();
    assert!(status.success(), "graceful shutdown exits 0: {status}");
    let expires_in: i64 = sqlx::query_scalar(&format!(
        "SELECT (extract(epoch FROM expires_at - now()) * 1000)::bigint FROM {}.relay_lease",
        outbox.schema
    ))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert!(expires_in <= 0, "the lease was released on shutdown");
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_when_kafka_is_stopped() {
    let outbox = TestOutbox::new().await;
    let mut broker = KafkaBroker::new();
    broker.start();
    let addr = free_addr();
    let _relay = RelayProcess::start(
        outbox_cmd(outbox.schema.as_str())
            .env("KAFKA_BOOTSTRAP_SERVERS", broker.bootstrap_servers())
            .env("OUTBOX_MONITOR_INTERVAL_MS", "200")
            .env("OUTBOX_STALL_TIMEOUT_MS", "5000"),
        &["--metrics-addr", &addr],
    );
    let client = reqwest::Client::new();
    let ready_url = format!("http://{addr}/health/ready");
    let status_is = |code: u16| {
        let (client, url) = (client.clone(), ready_url.clone());
        move || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().as_u16() == code)
            }
        }
    };
    wait_until(
        Duration::from_secs(30),
        "the relay is ready",
        status_is(200),
    )
    .await;
    broker.kill();
    wait_until(
        Duration::from_secs(30),
        "the relay reports not ready",
        status_is(503),
    )
    .await;
    let body: serde_json::Value = client
        .get(&ready_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        body["reasons"].to_string().contains("Kafka is unreachable"),
        "{body}"
    );
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_requeued_with_their_sequence_and_dropped() {
    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.as_str();
    let topic = unique_topic("cli-dlq");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let limited_relay = |outbox: &TestOutbox| {
        let mut command = outbox_cmd(outbox.schema.as_str());
        command
            .env("OUTBOX_POISON_POLICY", "dead-letter")
            .env("OUTBOX_KAFKA_MESSAGE_MAX_BYTES", "2000")
            .env("OUTBOX_KAFKA_BATCH_SIZE", "2000")
            .env("OUTBOX_POLL_INTERVAL_MS", "100");
        RelayProcess::start(&mut command, &[])
    };
    let enqueue = run(outbox_cmd(schema)
        .args(["enqueue", "--topic", &topic, "--key", "k"])
        .arg("x".repeat(5000)));
    assert!(enqueue.status.success(), "{}", stderr(&enqueue));
    let sequence: i64 = stdout(&enqueue).trim().parse().unwrap();

    let list = || {
        let output = run(outbox_cmd(schema).args(["dead-letters", "list", "--json"]));
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    let mut relay = limited_relay(&outbox);
    wait_until(
        Duration::from_secs(30),
        "the oversized message is dead-lettered",
        || {
            let letters = list();
            async move { letters.as_array().is_some_and(|a| a.len() == 1) }
        },
    )
    .await;
    relay.terminate();
    let letters = list();
    assert_eq!(letters[0]["sequence"], sequence);
    assert!(
        letters[0]["error"].as_str().unwrap().contains("too large"),
        "{letters}"
    );
    let status = run(outbox_cmd(schema).args(["status", "--json"]));
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["dead_letters"], 1);

    let retry = run(outbox_cmd(schema)
        .args(["dead-letters", "retry", "--id"])
        .arg(sequence.to_string()));
    assert!(retry.status.success(), "{}", stderr(&retry));
    let pending: Vec<i64> = sqlx::query_scalar(&format!("SELECT id FROM {schema}.message"))
        .fetch_all(&outbox.pool)
        .await
        .unwrap();
    assert_eq!(pending, [sequence], "requeued with its original sequence");
    assert_eq!(list().as_array().unwrap().len(), 0);

    let mut relay = limited_relay(&outbox);
    wait_until(Duration::from_secs(30), "it is dead-lettered again", || {
        let letters = list();
        async move { letters.as_array().is_some_and(|a| a.len() == 1) }
    })
    .await;
    relay.terminate();
    let dropped = run(outbox_cmd(schema).args(["dead-letters", "drop", "--all"]));
    assert!(
        stdout(&dropped).contains("dropped 1"),
        "{}",
        stdout(&dropped)
    );
    assert_eq!(list().as_array().unwrap().len(), 0);
    outbox.drop_schema().await;
}

/// Two services that leave `source` unset once both published as "outbox", with the same
/// sequences: a consumer's inbox, keyed by (x-source, x-sequence), dropped one service's events
/// as duplicates of the other's. The default source is now unique per outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_default_configured_relays_never_share_a_source() {
    let topic = unique_topic("cli-default-source");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let (first, second) = (TestOutbox::new().await, TestOutbox::new().await);
    let mut relays = Vec::new();
    for outbox in [&first, &second] {
        let sequence = outbox
            .commit_each([Message::new(&topic, outbox.schema.as_str()).key("k")])
            .await[0];
        assert_eq!(sequence, 1, "each outbox numbers its messages from 1");
        relays.push(RelayProcess::start(
            outbox_cmd(outbox.schema.as_str()).env_remove("OUTBOX_SOURCE"),
            &[],
        ));
    }
    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(2, Duration::from_secs(30)).await;
    let sources: Vec<&[u8]> = reader
        .received
        .iter()
        .map(|r| r.header("x-source").unwrap())
        .collect();
    assert_ne!(sources[0], sources[1]);
    for record in &reader.received {
        // outbox:<cluster>:<database>:<schema>; each payload is its outbox's schema name.
        let source = String::from_utf8_lossy(record.header("x-source").unwrap()).into_owned();
        assert!(source.starts_with("outbox:"), "{source}");
        assert!(
            source.ends_with(&format!(":{}", record.payload_str())),
            "{source}"
        );
    }
    for mut relay in relays {
        assert!(relay.terminate().success());
    }
    first.drop_schema().await;
    second.drop_schema().await;
}

/// A relay statement blocked on a lock (a writer holding the outbox rows) once waited for as
/// long as the lock was held. The daemon's statements are bounded by the lease term: the
/// server cancels them, and the relay retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_statements_are_bounded_by_the_lease_term() {
    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.as_str();
    let topic = unique_topic("cli-statement-timeout");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    outbox
        .commit_each([Message::new(&topic, "locked").key("k")])
        .await;
    let mut lock = outbox.pool.begin().await.unwrap();
    sqlx::query(&format!("SELECT id FROM {schema}.message FOR UPDATE"))
        .execute(&mut *lock)
        .await
        .unwrap();
    let _relay = RelayProcess::start(
        outbox_cmd(schema)
            .env("OUTBOX_LEASE_TTL_MS", "1000")
            .env("OUTBOX_LEASE_RENEW_INTERVAL_MS", "300"),
        &[],
    );
    let waiting_for = || async {
        sqlx::query_scalar::<_, Option<f64>>(
            "SELECT max(extract(epoch FROM now() - query_start))::float8 FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(&outbox.pool)
        .await
        .unwrap()
    };
    wait_until(
        Duration::from_secs(30),
        "the completion waits for the lock",
        || async { waiting_for().await.is_some() },
    )
    .await;
    // For 4 s, no statement has waited longer than about a lease term.
    for _ in 0..20 {
        let waited = waiting_for().await.unwrap_or(0.0);
        assert!(waited < 2.5, "a relay statement has waited {waited:.1} s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lock.rollback().await.unwrap();
    outbox.wait_until_drained(Duration::from_secs(30)).await;
    outbox.drop_schema().await;
}

/// Exit code 2 and a first line naming `name`: a usage error, not a panic or a database error.
/// (clap adds a hint to its own errors; ours are one line.)
fn assert_usage_error(output: &Output, name: &str) {
    let message = stderr(output);
    assert_eq!(output.status.code(), Some(2), "{name}: {message}");
    let first = message.lines().next().unwrap_or_default();
    assert!(first.contains(name), "{name}: {message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_numbers_are_usage_errors_not_panics() {
    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.as_str();
    let print_config = ["relay", "--print-config"];
    assert_usage_error(
        &run(outbox_cmd(schema)
            .env("OUTBOX_RETENTION_HOURS", "1e300")
            .args(print_config)),
        "OUTBOX_RETENTION_HOURS",
    );
    assert_usage_error(
        &run(outbox_cmd(schema)
            .env("OUTBOX_CLEANUP_BATCH_SIZE", u64::MAX.to_string())
            .args(print_config)),
        "OUTBOX_CLEANUP_BATCH_SIZE",
    );
    assert_usage_error(
        &run(outbox_cmd(schema).args(["cleanup", "--retention-hours", "1e300"])),
        "--retention-hours",
    );
    assert_usage_error(
        &run(outbox_cmd(schema).args(["status", "--watch", "1e300"])),
        "--watch",
    );
    assert_usage_error(
        &run(outbox_cmd(schema).args(["dead-letters", "list", "--limit=-1"])),
        "--limit",
    );
    outbox.drop_schema().await;
}

#[test]
fn invalid_log_directive_is_an_error_naming_it() {
    let output = run(outbox_cmd("outbox")
        .env("OUTBOX_LOG", "info,outbox_kafka_relay=loud")
        .args(["relay", "--print-config"]));
    assert_usage_error(&output, "OUTBOX_LOG");
    assert!(
        stderr(&output).contains("outbox_kafka_relay=loud"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn connection_strings_never_show_passwords() {
    for (url, secret) in [
        (
            "postgres://me@127.0.0.1:1/x?password=query-secret",
            "query-secret",
        ),
        ("postgres://me:half@masked@127.0.0.1:1/x", "masked"),
        (
            "host=127.0.0.1 port=1 user=me password=kv-secret",
            "kv-secret",
        ),
    ] {
        for args in [&["relay", "--print-config"][..], &["status"]] {
            let output = run(outbox_cmd("outbox").env("DATABASE_URL", url).args(args));
            let shown = format!("{}{}", stdout(&output), stderr(&output));
            assert!(!shown.contains(secret), "{url} {args:?}: {shown}");
            assert!(!shown.contains("panicked"), "{url} {args:?}: {shown}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_topics_and_errors_are_printed_with_control_characters_escaped() {
    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.as_str();
    // Any SQL writer can store these: a screen clear and a forged status line.
    sqlx::query(&format!(
        "INSERT INTO {schema}.message (topic, key, payload, attempts, last_error, retry_at)
         VALUES ('t', convert_to(E'\\x1b[2J\\x1b[Hall good\\r', 'UTF8'), 'x', 1,
                 E'refused\\x1b]0;title\\x07', now() + interval '1 hour')"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "INSERT INTO {schema}.dead_letter (id, topic, key, created_at, attempts, error)
         VALUES (424242, 't', convert_to(E'\\x1b[2Jk\\u202e', 'UTF8'), now(), 1,
                 E'bad\\x1b[31m')"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    for args in [&["status"][..], &["dead-letters", "list"]] {
        let output = run(outbox_cmd(schema).args(args));
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        let shown = stdout(&output);
        assert!(
            !shown.contains(['\x1b', '\x07', '\r', '\u{202e}']),
            "{args:?}: {shown:?}"
        );
        assert!(shown.contains("[2J"), "{args:?}: {shown:?}");
    }
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_named_after_a_keyword_is_refused_by_name() {
    for schema in ["order", "user", "values"] {
        let output = run(outbox_cmd(schema).arg("migrate"));
        assert_usage_error(&output, "reserved word");
        assert!(
            stderr(&output).contains(&format!("{schema:?}")),
            "{}",
            stderr(&output)
        );
    }
    // Every keyword this server cannot take unquoted as a schema-qualified name.
    let pool = outbox_test_support::pool().await;
    let keywords: Vec<String> =
        sqlx::query_scalar("SELECT word FROM pg_get_keywords() WHERE catcode <> 'U'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(keywords.len() > 100, "{keywords:?}");
    for keyword in keywords {
        assert!(
            outbox::SchemaName::new(keyword.clone()).is_err(),
            "{keyword} is accepted as a schema name"
        );
    }
}

/// The alerting rules under `deploy/prometheus`.
fn alert_rules() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus")
}

/// Runs Debian's `promtool` (package `prometheus`, installed by `dev/up`); fails loudly without it.
fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(alert_rules())
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool is required (Debian package `prometheus`, installed by dev/up): {e}")
        });
    let text = format!("{}{}", stdout(&output), stderr(&output));
    assert!(output.status.success(), "promtool {args:?}:\n{text}");
    text
}

/// The alerting rules are valid, and their unit tests (each alert fires when it should, after
/// its `for`, and not on a healthy pair of relays) pass.
#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "outbox-alerts.yml"]);
    assert!(checked.contains("SUCCESS: 8 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "outbox-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The metric names a query file names (`outbox_...`).
fn queried_metrics(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("outbox_")
        .map(|(at, _)| {
            let name = &text[at..];
            let end = name
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(name.len());
            name[..end].to_owned()
        })
        .filter(|name| !name.ends_with('_') && name != "outbox_alerts")
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The Grafana dashboard under `deploy/grafana`: every panel's queries, which must be valid
/// PromQL (promtool checks them as recording rules, Grafana's `$__rate_interval` as `5m`).
#[test]
fn the_dashboards_queries_are_valid_promql() {
    let path = alert_rules().join("../grafana/outbox-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let expr = expr.replace("$__rate_interval", "5m");
            rules.push_str(&format!(
                "      - record: outbox:dashboard:{queries}\n        expr: '{}'\n",
                expr.replace('\'', "''")
            ));
            queries += 1;
        }
    }
    assert!(queries >= 15, "{queries} queries");
    let file = std::env::temp_dir().join(format!("outbox-dashboard-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let checked = promtool(&["check", "rules", file.to_str().unwrap()]);
    std::fs::remove_file(&file).ok();
    assert!(
        checked.contains(&format!("SUCCESS: {queries} rules found")),
        "{checked}"
    );
}

/// Every metric the alerting rules and the dashboard query is one the daemon exports, seen in
/// its `/metrics` (a message published, and one to a missing topic: the failure and held
/// series appear with them), and is documented in docs/operations.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alert_rules_and_the_dashboard_query_is_exported_and_documented() {
    let mut queried =
        queried_metrics(&std::fs::read_to_string(alert_rules().join("outbox-alerts.yml")).unwrap());
    queried.extend(queried_metrics(
        &std::fs::read_to_string(alert_rules().join("../grafana/outbox-dashboard.json")).unwrap(),
    ));
    queried.sort_unstable();
    queried.dedup();
    assert!(queried.len() >= 15, "{queried:?}");
    let operations = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/operations.md"),
    )
    .unwrap();
    for name in &queried {
        let documented = name
            .strip_suffix("_bucket")
            .unwrap_or(name.as_str())
            .to_owned();
        assert!(
            operations.contains(&format!("`{documented}")),
            "{name} is not documented in docs/operations.md"
        );
    }
    let queried: Vec<&str> = queried.iter().map(String::as_str).collect();

    let outbox = TestOutbox::new().await;
    let addr = free_addr();
    let _relay = RelayProcess::start(
        outbox_cmd(outbox.schema.as_str())
            .env("OUTBOX_MONITOR_INTERVAL_MS", "200")
            .env("OUTBOX_POLL_INTERVAL_MS", "200"),
        &["--metrics-addr", &addr],
    );
    // One published; one to no such topic (the dev broker creates none): its delivery fails
    // and it is held.
    let topic = unique_topic("metrics");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    outbox
        .commit_each([
            Message::new(&topic, b"x".to_vec()).key("k"),
            Message::new(unique_topic("missing"), b"x".to_vec()).key("k"),
        ])
        .await;
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let text = match client.get(format!("http://{addr}/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let exported: std::collections::HashSet<String> = parse_metrics(&text)
            .into_keys()
            .map(|series| series.split('{').next().unwrap_or("").to_owned())
            .collect();
        let missing: Vec<&str> = queried
            .iter()
            .copied()
            .filter(|name| !exported.contains(*name))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon's /metrics lacks {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    outbox.drop_schema().await;
}
