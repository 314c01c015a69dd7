//! The operator console in a real browser: headless Chromium, driven through chromedriver
//! (WebDriver, with fantoccini), against the real `outbox relay` process on the `dev/up`
//! PostgreSQL and Kafka. Chromium and chromedriver must be installed (dev/up installs Debian's
//! `chromium` and `chromium-driver`); without them the test fails, it never skips.
//!
//! With `OUTBOX_CONSOLE_SCREENSHOTS=docs/console` (relative to the repository) it also saves
//! the main pages as PNG files there, for docs/operations.md.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use outbox::Message;
use outbox_test_support::{
    alter_topic_config, create_topic, create_topic_with_config, database_url, free_port,
    kafka_bootstrap_servers, short_id, unique_topic, TestOutbox, TopicReader,
};

const TOKEN: &str = "browser-test-token-0123456789";
const WAIT: Duration = Duration::from_secs(60);

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `name` on the PATH, or a panic saying how to install it.
fn installed(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: the console's browser test needs Debian's chromium and \
                 chromium-driver (dev/up installs them: apt-get install chromium chromium-driver)"
            )
        })
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Chromium through a chromedriver of its own; the browser profile in a fresh directory.
async fn browser(profile: &Path) -> (Process, Client) {
    let chromium = installed("chromium");
    let port = free_port();
    let driver = Process(
        Command::new(installed("chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !port_open(port) {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not open port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The machine has no internet: without these, Chromium waits on the network at start.
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        &format!("--user-data-dir={}", profile.display()),
    ];
    let capabilities = serde_json::json!({
        "goog:chromeOptions": {"binary": chromium, "args": args}
    });
    let serde_json::Value::Object(capabilities) = capabilities else {
        unreachable!("an object")
    };
    let client = ClientBuilder::native()
        .capabilities(capabilities)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap_or_else(|e| panic!("chromedriver did not start Chromium: {e}"));
    (driver, client)
}

/// Loads `url` again until `css` matches an element whose text contains `text`; panics with
/// the page after `WAIT`.
async fn wait_for(client: &Client, url: &str, css: &str, text: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        client.goto(url).await.expect("load the page");
        if let Ok(element) = client.find(Locator::Css(css)).await {
            let shown = element.text().await.unwrap_or_default();
            if shown.contains(text) {
                return shown;
            }
        }
        if Instant::now() > deadline {
            let page = client.source().await.unwrap_or_default();
            panic!("{url} did not show {text:?} in {css} within {WAIT:?}:\n{page}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Saves the page as `name`.png when `OUTBOX_CONSOLE_SCREENSHOTS` names a directory.
async fn screenshot(client: &Client, name: &str) {
    let Some(dir) = std::env::var_os("OUTBOX_CONSOLE_SCREENSHOTS") else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join(dir);
    std::fs::create_dir_all(&dir).expect("create the screenshot directory");
    let png = client.screenshot().await.expect("take a screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("save the screenshot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_a_blocked_key_and_retries_a_dead_letter_into_kafka() {
    let outbox = TestOutbox::new().await;
    let bootstrap = kafka_bootstrap_servers();
    let healthy = unique_topic("console-healthy");
    let small = unique_topic("console-small");
    let missing = unique_topic("console-missing");
    create_topic(&bootstrap, &healthy, 1).await;
    // The broker refuses records above 2,000 bytes on this topic: a permanent failure.
    create_topic_with_config(&bootstrap, &small, 1, 1, &[("max.message.bytes", "2000")]).await;

    let port = free_port();
    let mut relay = Process(
        Command::new(env!("CARGO_BIN_EXE_outbox"))
            .env("DATABASE_URL", database_url())
            .env("KAFKA_BOOTSTRAP_SERVERS", &bootstrap)
            .env("OUTBOX_SCHEMA", outbox.schema.as_str())
            .env("OUTBOX_POISON_POLICY", "dead-letter")
            .env("OUTBOX_POLL_INTERVAL_MS", "100")
            .env("OUTBOX_BACKOFF_INITIAL_MS", "100")
            .env("OUTBOX_BACKOFF_MAX_MS", "1000")
            // A missing topic fails after this, not librdkafka's 30 s.
            .env("OUTBOX_KAFKA_TOPIC_METADATA_PROPAGATION_MAX_MS", "1000")
            .env("OUTBOX_CONSOLE_WRITE", "true")
            .env("OUTBOX_CONSOLE_TOKEN", TOKEN)
            .env_remove("OUTBOX_CONFIG")
            // The test's own setting, not the daemon's (which refuses unknown OUTBOX_*).
            .env_remove("OUTBOX_CONSOLE_SCREENSHOTS")
            .args(["relay", "--console-addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start outbox relay"),
    );
    let console = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + WAIT;
    while !port_open(port) {
        if let Some(status) = relay.0.try_wait().unwrap() {
            panic!("outbox relay exited before serving the console: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the console did not open port {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let profile = std::env::temp_dir().join(format!("outbox-console-chromium-{}", short_id()));
    std::fs::create_dir_all(&profile).unwrap();
    let (_driver, client) = browser(&profile).await;

    // Traffic for the chart, then a message to a topic that does not exist (held: it blocks
    // its key) and one the broker refuses for good (dead-lettered).
    outbox
        .commit_each(
            (0..20)
                .map(|i| Message::new(&healthy, format!("order {i}")).key(format!("k{}", i % 4))),
        )
        .await;
    TopicReader::new(&healthy).read_at_least(20, WAIT).await;
    outbox
        .commit_each([Message::new(&missing, "waiting for its topic").key("blocked-key")])
        .await;
    // Random hex: the relay compresses (lz4), and a repeated byte would fit the limit.
    let payload: String = (0..5000)
        .map(|_| char::from(b"0123456789abcdef"[rand::random_range(0..16)]))
        .collect();
    let big = outbox
        .commit_each([Message::new(&small, payload.clone()).key("big")])
        .await[0];

    let blocked = wait_for(
        &client,
        &format!("{console}/blocked"),
        "#blocked",
        "blocked-key",
    )
    .await;
    assert!(
        blocked.contains(&missing) && blocked.contains("Unknown topic"),
        "{blocked}"
    );
    screenshot(&client, "blocked-keys").await;

    // Log in with the token; the overview follows.
    client.goto(&format!("{console}/login")).await.unwrap();
    let field = client.find(Locator::Id("token")).await.unwrap();
    field.send_keys(TOKEN).await.unwrap();
    client
        .find(Locator::Id("login"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // A form's submission returns before the next page has loaded: wait for it.
    if client
        .wait()
        .at_most(WAIT)
        .for_element(Locator::Css("header form button"))
        .await
        .is_err()
    {
        let page = client.source().await.unwrap_or_default();
        panic!("not logged in: no log-out button on {page}");
    }

    let row = format!("#letter-{big}");
    let letter = wait_for(
        &client,
        &format!("{console}/dead-letters"),
        &row,
        "too large",
    )
    .await;
    assert!(
        letter.contains(&payload[..100]),
        "the payload preview: {letter}"
    );
    screenshot(&client, "dead-letters").await;
    wait_for(&client, &format!("{console}/"), "#pending", "").await;
    screenshot(&client, "overview").await;

    // Fix the cause, then retry from the console: the row's link, the confirmation page.
    alter_topic_config(&bootstrap, &small, &[("max.message.bytes", "1000000")]).await;
    client
        .goto(&format!("{console}/dead-letters"))
        .await
        .unwrap();
    let retry = format!("{row} a[href*='action=retry']");
    client
        .find(Locator::Css(&retry))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let next = |id| client.wait().at_most(WAIT).for_element(Locator::Id(id));
    next("confirm").await.unwrap().click().await.unwrap();
    next("do").await.unwrap().click().await.unwrap();
    let result = next("result").await.expect("the action's result");
    let result = result.text().await.unwrap();
    assert!(result.contains("Requeued 1 dead letter"), "{result}");

    let mut reader = TopicReader::new(&small);
    reader
        .read_until(WAIT, |received| {
            received.iter().any(|r| r.sequence() == big)
        })
        .await;
    let delivered = reader
        .received
        .iter()
        .find(|r| r.sequence() == big)
        .unwrap();
    assert_eq!(delivered.payload_str(), payload);

    // Creating the missing topic unblocks the key.
    create_topic(&bootstrap, &missing, 1).await;
    wait_for(
        &client,
        &format!("{console}/blocked"),
        "#none",
        "No blocked keys",
    )
    .await;
    TopicReader::new(&missing).read_at_least(1, WAIT).await;

    let preview = format!(
        "{console}/republish?preview=1&topic={healthy}&from_id=&to_id=&key=k1&since=&until="
    );
    let count = wait_for(&client, &preview, "#count", "published messages match").await;
    assert!(count.starts_with("5 "), "{count}");
    screenshot(&client, "republish-preview").await;

    client.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    outbox.drop_schema().await;
}
