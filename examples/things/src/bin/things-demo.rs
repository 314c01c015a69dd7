//! Runs the whole scenario and checks the outcome: exits 0 only when the consumer's read model
//! equals the service's table.
//!
//! Usage: `things-demo [--commands N] [--concurrency C] [--secured]` (after `eval "$(dev/up)"`;
//! `dev/demo` does both). With `--secured`, the service's relay and the consumer reach Kafka
//! through `dev/up`'s SASL_SSL listener, each as its own user with only the rights its ACLs
//! grant (SCRAM-SHA-512, TLS with the CA `dev/up` made).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use serde_json::{json, Value};
use sqlx::PgPool;
use things::{CONSUMER_SCHEMA, SERVICE_OUTBOX_SCHEMA, SERVICE_SCHEMA};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

const SERVICE_ADDR: &str = "127.0.0.1:18080";
const CONSUMER_ADDR: &str = "127.0.0.1:18081";

struct Options {
    commands: usize,
    concurrency: usize,
    secured: bool,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        commands: 1500,
        concurrency: 16,
        secured: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<usize> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} must be a positive number"))
        };
        match arg.as_str() {
            "--commands" => options.commands = value("--commands")?,
            "--concurrency" => options.concurrency = value("--concurrency")?.max(1),
            "--secured" => options.secured = true,
            other => bail!(
                "unknown argument {other:?}; usage: things-demo [--commands N] [--concurrency C] [--secured]"
            ),
        }
    }
    Ok(options)
}

/// A command and whether the service should accept it.
struct ThingCommand {
    body: String,
    valid: bool,
}

fn commands(count: usize) -> Vec<ThingCommand> {
    let mut rng = rand::rng();
    let invalid = [
        json!({"name": "", "quantity": 1}).to_string(),
        json!({"name": "   ", "quantity": 1}).to_string(),
        json!({"name": "x".repeat(101), "quantity": 1}).to_string(),
        json!({"name": "negative", "quantity": -1}).to_string(),
        json!({"name": "too many", "quantity": 5000}).to_string(),
        json!({"name": "wrong type", "quantity": "seven"}).to_string(),
        json!({"name": "extra field", "quantity": 1, "color": "red"}).to_string(),
        json!({"quantity": 1}).to_string(),
        "{not json".to_owned(),
    ];
    let mut list: Vec<ThingCommand> = (0..count)
        .map(|i| {
            if i % 8 == 7 {
                ThingCommand {
                    body: invalid[(i / 8) % invalid.len()].clone(),
                    valid: false,
                }
            } else {
                ThingCommand {
                    body: json!({"name": format!("thing {i}"), "quantity": (i % 1000) as i32})
                        .to_string(),
                    valid: true,
                }
            }
        })
        .collect();
    list.shuffle(&mut rng);
    list
}

#[derive(Default)]
struct Tally {
    accepted: AtomicU64,
    rejected: AtomicU64,
    unexpected: AtomicU64,
    retried: AtomicU64,
}

struct Service {
    child: Mutex<Option<Child>>,
    up: AtomicBool,
    log: PathBuf,
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} is missing; build it with `cargo build -p things`",
            path.display()
        );
    }
    Ok(path)
}

/// With `--secured`: how `name` reaches `dev/up`'s SASL_SSL listener, as its own user (the
/// passwords are `dev/up`'s, for development only).
fn secured_kafka(name: &str) -> Vec<(String, String)> {
    let user = match name {
        "things-service" => "relay",
        _ => "consumer",
    };
    let ca = std::env::var("KAFKA_SASL_CA").unwrap_or_else(|_| {
        format!(
            "{}/.cache/outbox-dev/kafka/tls/ca.pem",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let bootstrap = std::env::var("KAFKA_SASL_BOOTSTRAP_SERVERS")
        .unwrap_or_else(|_| "127.0.0.1:19094".to_owned());
    [
        ("BOOTSTRAP_SERVERS", bootstrap),
        ("SECURITY_PROTOCOL", "SASL_SSL".to_owned()),
        ("SASL_MECHANISMS", "SCRAM-SHA-512".to_owned()),
        ("SASL_USERNAME", format!("outbox-{user}")),
        ("SASL_PASSWORD", format!("dev-only-{user}-secret")),
        ("SSL_CA_LOCATION", ca),
    ]
    .into_iter()
    .map(|(name, value)| (format!("THINGS_KAFKA_{name}"), value))
    .collect()
}

fn spawn(name: &str, log: &PathBuf, secured: bool) -> anyhow::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let kafka = match secured {
        true => secured_kafka(name),
        false => Vec::new(),
    };
    Ok(Command::new(sibling(name)?)
        .env("THINGS_ADDR", SERVICE_ADDR)
        .env("THINGS_CONSUMER_ADDR", CONSUMER_ADDR)
        .envs(kafka)
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()?)
}

async fn wait_ready(
    client: &reqwest::Client,
    url: &str,
    child: &mut Child,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = client.get(url).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited during startup ({status}); see its log");
        }
        if Instant::now() > deadline {
            bail!("{what} did not become ready within 60s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

/// Counts rows with `sql`, whose `$1` is the run's start (epoch seconds, database clock).
async fn count_since(pool: &PgPool, sql: &str, since: f64) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).bind(since).fetch_one(pool).await?)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    let pool = things::connect().await?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let logs = std::env::temp_dir().join(format!("things-demo-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    let started = Instant::now();
    let since: f64 = sqlx::query_scalar("SELECT extract(epoch FROM now())::float8")
        .fetch_one(&pool)
        .await?;
    println!(
        "things demo: {} commands, {} concurrent{}; logs in {}",
        options.commands,
        options.concurrency,
        if options.secured {
            ", Kafka over SASL_SSL"
        } else {
            ""
        },
        logs.display()
    );
    let secured = options.secured;

    let consumer_log = logs.join("things-consumer.log");
    let mut consumer = spawn("things-consumer", &consumer_log, options.secured)?;
    wait_ready(
        &client,
        &format!("http://{CONSUMER_ADDR}/stats"),
        &mut consumer,
        "things-consumer",
    )
    .await?;
    let service = Arc::new(Service {
        child: Mutex::new(None),
        up: AtomicBool::new(false),
        log: logs.join("things-service.log"),
    });
    {
        let mut child = spawn("things-service", &service.log, secured)?;
        wait_ready(
            &client,
            &format!("http://{SERVICE_ADDR}/health/live"),
            &mut child,
            "things-service",
        )
        .await?;
        *service.child.lock().await = Some(child);
        service.up.store(true, Ordering::SeqCst);
    }

    let commands = commands(options.commands);
    let tally = Arc::new(Tally::default());
    let sent = Arc::new(AtomicU64::new(0));
    let bar = ProgressBar::new(commands.len() as u64).with_style(
        ProgressStyle::with_template("{spinner} commands {pos}/{len} [{bar:30}] {msg}")?
            .progress_chars("=> "),
    );

    // Kill the service (and the relay inside it) with SIGKILL once 40% of the commands are out.
    let killer = {
        let (service, sent, bar, client) =
            (service.clone(), sent.clone(), bar.clone(), client.clone());
        let kill_at = (options.commands as u64 * 2) / 5;
        tokio::spawn(async move {
            while sent.load(Ordering::SeqCst) < kill_at {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            service.up.store(false, Ordering::SeqCst);
            let mut guard = service.child.lock().await;
            if let Some(mut child) = guard.take() {
                let _ = child.kill().await;
            }
            bar.set_message("service and relay SIGKILLed; restarting");
            let mut child = spawn("things-service", &service.log, secured)?;
            wait_ready(
                &client,
                &format!("http://{SERVICE_ADDR}/health/live"),
                &mut child,
                "things-service",
            )
            .await?;
            *guard = Some(child);
            service.up.store(true, Ordering::SeqCst);
            bar.set_message("service restarted");
            anyhow::Ok(())
        })
    };

    futures::stream::iter(commands)
        .for_each_concurrent(options.concurrency, |command| {
            let (client, tally, sent, bar, service) = (
                client.clone(),
                tally.clone(),
                sent.clone(),
                bar.clone(),
                service.clone(),
            );
            async move {
                sent.fetch_add(1, Ordering::SeqCst);
                let mut attempts = 0;
                let status = loop {
                    attempts += 1;
                    let response = client
                        .post(format!("http://{SERVICE_ADDR}/things"))
                        .header("content-type", "application/json")
                        .body(command.body.clone())
                        .send()
                        .await;
                    match response {
                        Ok(response) => break Some(response.status()),
                        // The service is down (killed): a client retries once it is back.
                        Err(_) if attempts < 100 => {
                            tally.retried.fetch_add(1, Ordering::Relaxed);
                            while !service.up.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => break None,
                    }
                };
                match (status.map(|s| s.as_u16()), command.valid) {
                    (Some(201), true) => tally.accepted.fetch_add(1, Ordering::Relaxed),
                    (Some(400), false) => tally.rejected.fetch_add(1, Ordering::Relaxed),
                    _ => tally.unexpected.fetch_add(1, Ordering::Relaxed),
                };
                bar.inc(1);
            }
        })
        .await;
    bar.finish_with_message("all commands sent");
    killer.await??;

    // Wait until the consumer has caught up with everything the service stored.
    let spinner =
        ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg}")?);
    let stored_sql =
        format!("SELECT count(*) FROM {SERVICE_SCHEMA}.thing WHERE created_at >= to_timestamp($1)");
    let consumed_sql = format!(
        "SELECT count(*) FROM {CONSUMER_SCHEMA}.thing c JOIN {SERVICE_SCHEMA}.thing s USING (id)
          WHERE s.created_at >= to_timestamp($1)"
    );
    let published_sql = format!(
        "SELECT count(*) FROM {SERVICE_OUTBOX_SCHEMA}.published
          WHERE created_at >= to_timestamp($1)"
    );
    let difference_sql = format!(
        "SELECT (SELECT count(*) FROM (SELECT id, name, quantity FROM {SERVICE_SCHEMA}.thing
                                       EXCEPT SELECT id, name, quantity FROM {CONSUMER_SCHEMA}.thing) a)
              + (SELECT count(*) FROM (SELECT id, name, quantity FROM {CONSUMER_SCHEMA}.thing
                                       EXCEPT SELECT id, name, quantity FROM {SERVICE_SCHEMA}.thing) b)"
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let (stored, consumed, published, difference) = loop {
        let stored = count_since(&pool, &stored_sql, since).await?;
        let consumed = count_since(&pool, &consumed_sql, since).await?;
        let published = count_since(&pool, &published_sql, since).await?;
        let difference: i64 = sqlx::query_scalar(&difference_sql).fetch_one(&pool).await?;
        spinner.set_message(format!(
            "waiting for the consumer: stored {stored}, published {published}, consumed {consumed}"
        ));
        spinner.tick();
        // All three, not only the difference: the counts are read before it, one statement
        // each, so the last event can be applied between them (a CI run saw consumed 89 of 90
        // with the difference already 0).
        let caught_up = difference == 0 && published == stored && consumed == stored;
        if caught_up || Instant::now() > deadline {
            break (stored, consumed, published, difference);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    spinner.finish_and_clear();
    let stats: Value = client
        .get(format!("http://{CONSUMER_ADDR}/stats"))
        .send()
        .await?
        .json()
        .await?;

    if let Some(mut child) = service.child.lock().await.take() {
        terminate(&mut child).await;
    }
    terminate(&mut consumer).await;

    let equal = difference == 0 && consumed == stored;
    let unexpected = tally.unexpected.load(Ordering::Relaxed);
    println!();
    println!(
        "commands accepted           {}",
        tally.accepted.load(Ordering::Relaxed)
    );
    println!(
        "commands rejected (invalid) {}",
        tally.rejected.load(Ordering::Relaxed)
    );
    println!("unexpected responses        {unexpected}");
    println!(
        "requests retried (restart)  {}",
        tally.retried.load(Ordering::Relaxed)
    );
    println!("things stored               {stored} (a command whose response was lost in the kill and was retried can store twice)");
    println!("events published            {published}");
    println!("events consumed (applied)   {consumed}");
    println!("duplicates skipped by inbox {}", stats["duplicates"]);
    println!("consumer retries            {}", stats["failures"]);
    println!("relay killed and restarted  1");
    println!(
        "read model == service table {}",
        if equal { "yes" } else { "NO" }
    );
    println!(
        "took                        {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if !equal || unexpected > 0 {
        bail!("the demo's check failed (logs in {})", logs.display());
    }
    Ok(())
}
