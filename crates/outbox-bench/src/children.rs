//! The processes the steady and soak scenarios run beside the bench: writer processes (this
//! binary's hidden `writer-child` subcommand), which enqueue through `outbox.enqueue` as a service
//! in another language would, and the `outbox relay` daemon, found beside this binary. With
//! `--produce-to`, a writer process produces the same messages straight to Kafka instead: the
//! steady scenario's baseline, what a service's own producer spends on the same traffic.
//!
//! A writer prints one `<sequence> <commit µs>` line per committed message (produced: handed to
//! the producer) on its stdout, in chunks about once a second (so a long run can be followed
//! while it goes, and no file is left behind), then one JSON line with its totals.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use outbox::SchemaName;
use serde_json::{json, Value};
use sqlx::{Connection as _, PgPool};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureRecord;

use crate::util::{cpu_seconds, key, now_micros, payload};

/// Arguments of the hidden `writer-child` subcommand.
#[derive(Debug, Clone, Args)]
pub(crate) struct WriterChildArgs {
    #[arg(long)]
    schema: String,
    #[arg(long)]
    topic: String,
    /// Messages per second this writer offers.
    #[arg(long)]
    rate: f64,
    #[arg(long)]
    seconds: f64,
    #[arg(long)]
    payload_bytes: usize,
    #[arg(long)]
    keys: usize,
    /// First message number (keys and payloads differ between writers).
    #[arg(long)]
    first: u64,
    /// The phase carried in the payload.
    #[arg(long)]
    phase: u16,
    /// Produce to Kafka at these bootstrap servers instead of enqueueing (see [`produce_child`]).
    #[arg(long)]
    produce_to: Option<String>,
    /// Producer properties over the relay's defaults, KEY=VALUE (with `--produce-to`).
    #[arg(long, value_delimiter = ',')]
    kafka: Vec<String>,
    /// With `--produce-to`: hand over the messages due every this many milliseconds, not each
    /// as it becomes due.
    #[arg(long)]
    produce_every_ms: Option<u64>,
}

/// Where the sequences of produced messages start, far above any outbox id of a bench run, so
/// that the consumer tells them apart.
const PRODUCED_SEQUENCES: i64 = 1 << 40;

/// How often a writer hands its commit lines to its parent.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Runs in a writer process: open loop (message n is due at start + n / rate; a late writer
/// sends at once, so a slow database shows as a lower achieved rate, not as hidden waits).
pub(crate) async fn writer_child(args: WriterChildArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0 && (0.0..=1e6).contains(&args.seconds),
        "--rate must be positive and --seconds between 0 and 1,000,000"
    );
    anyhow::ensure!(
        args.produce_every_ms
            .is_none_or(|ms| (1..=60_000).contains(&ms)),
        "--produce-every-ms must be between 1 and 60,000"
    );
    if let Some(bootstrap) = &args.produce_to {
        return produce_child(bootstrap, &args).await;
    }
    let schema = SchemaName::new(args.schema)?;
    let mut conn = sqlx::PgConnection::connect(&outbox_test_support::database_url()).await?;
    let sql = format!("SELECT {schema}.enqueue($1, $2, $3)");
    let count = (args.rate * args.seconds).round() as u64;
    // Blocking writes, about once a second: this process has nothing else to do meanwhile.
    let mut stdout = std::io::stdout().lock();
    let mut lines = String::new();
    let (started, cpu) = (Instant::now(), cpu_seconds(std::process::id()));
    let mut flushed = started;
    for i in 0..count {
        let due = started + Duration::from_secs_f64(i as f64 / args.rate);
        tokio::time::sleep_until(due).await;
        let n = args.first + i;
        let sequence: i64 = sqlx::query_scalar(&sql)
            .bind(&args.topic)
            .bind(key(n, args.keys))
            .bind(payload(args.payload_bytes, now_micros(), args.phase, n))
            .fetch_one(&mut conn)
            .await?;
        lines.push_str(&format!("{sequence} {}\n", now_micros()));
        if flushed.elapsed() >= FLUSH_EVERY {
            stdout.write_all(lines.as_bytes())?;
            stdout.flush()?;
            lines.clear();
            flushed = Instant::now();
        }
    }
    finish(stdout, lines, count, (started, cpu))
}

/// Prints the last commit lines and the totals: the time and CPU since `since` (the start of
/// the loop, so that connecting is not counted).
fn finish(
    mut stdout: std::io::StdoutLock<'_>,
    mut lines: String,
    count: u64,
    since: (Instant, Option<f64>),
) -> anyhow::Result<()> {
    let seconds = since.0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(std::process::id())
        .zip(since.1)
        .map(|(now, then)| now - then);
    lines.push_str(&format!(
        "{}\n",
        json!({"sent": count, "seconds": seconds, "cpu_seconds": cpu})
    ));
    stdout.write_all(lines.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Produces the writer's messages straight to Kafka, open loop like the writers, with the
/// relay's headers and producer settings (and `--kafka` over them), acknowledgements awaited
/// alongside: each message as it becomes due, as a service producing in its request handler
/// does, or with `--produce-every-ms`, every message due by then at each tick, as a relay hands
/// over a claimed batch. A line is printed per message with the time it became due (the
/// consumer's latency is measured from then); every acknowledgement is awaited before the
/// totals.
async fn produce_child(bootstrap: &str, args: &WriterChildArgs) -> anyhow::Result<()> {
    let producer = crate::kafka::producer(bootstrap, &args.kafka)?;
    // A service's producer is long-lived: connected, with its producer id, before the clock
    // starts. A record without the bench's headers, which the consumer ignores, proves it.
    let warm_up = FutureRecord::<str, str>::to(&args.topic).key("warm-up");
    match producer.send_result(warm_up) {
        Ok(delivery) => crate::kafka::delivered(delivery.await)?,
        Err((error, _)) => bail!("cannot hand a message to the producer: {error}"),
    }
    let count = (args.rate * args.seconds).round() as u64;
    let every = args.produce_every_ms.map(Duration::from_millis);
    let mut deliveries = FuturesUnordered::new();
    let mut stdout = std::io::stdout().lock();
    let mut lines = String::new();
    let (started, cpu) = (Instant::now(), cpu_seconds(std::process::id()));
    let started_us = now_micros();
    let due = |i: u64| Duration::from_secs_f64(i as f64 / args.rate);
    let mut flushed = started;
    let mut next = 0;
    while next < count {
        let wake = match every {
            None => due(next),
            Some(every) => every * (due(next).as_nanos().div_ceil(every.as_nanos()) as u32),
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(started + wake) => break,
                Some(result) = deliveries.next() => crate::kafka::delivered(result)?,
            }
        }
        let now = started.elapsed();
        while next < count && due(next) <= now {
            let n = args.first + next;
            let sequence = PRODUCED_SEQUENCES + n as i64;
            let due_us = started_us + due(next).as_micros() as u64;
            let value = payload(args.payload_bytes, due_us, args.phase, n);
            let key = key(n, args.keys);
            let mut record = FutureRecord::to(&args.topic)
                .headers(crate::kafka::wire_headers(sequence))
                .key(key.as_bytes())
                .payload(&value[..]);
            loop {
                match producer.send_result(record) {
                    Ok(delivery) => break deliveries.push(delivery),
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        match deliveries.next().await {
                            Some(result) => crate::kafka::delivered(result)?,
                            None => bail!("the producer's queue is full with nothing in flight"),
                        }
                    }
                    Err((error, _)) => bail!("cannot hand a message to the producer: {error}"),
                }
            }
            lines.push_str(&format!("{sequence} {due_us}\n"));
            next += 1;
        }
        if flushed.elapsed() >= FLUSH_EVERY {
            stdout.write_all(lines.as_bytes())?;
            stdout.flush()?;
            lines.clear();
            flushed = Instant::now();
        }
    }
    while let Some(result) = deliveries.next().await {
        crate::kafka::delivered(result)?;
    }
    finish(stdout, lines, count, (started, cpu))
}

/// A line a writer printed.
#[derive(Debug, PartialEq)]
pub(crate) enum WriterLine {
    /// A committed message: its sequence and when the commit returned (µs since the epoch).
    Commit(i64, u64),
    /// The writer's totals, its last line.
    Totals(WriterTotals),
}

/// What a writer reports when it is done.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct WriterTotals {
    pub(crate) sent: u64,
    pub(crate) seconds: f64,
    pub(crate) cpu_seconds: f64,
}

impl WriterLine {
    pub(crate) fn parse(line: &str) -> anyhow::Result<WriterLine> {
        if line.starts_with('{') {
            let totals: Value = serde_json::from_str(line)?;
            return Ok(WriterLine::Totals(WriterTotals {
                sent: totals["sent"]
                    .as_u64()
                    .context("a writer's totals lack `sent`")?,
                seconds: totals["seconds"].as_f64().unwrap_or(f64::NAN),
                cpu_seconds: totals["cpu_seconds"].as_f64().unwrap_or(0.0),
            }));
        }
        let (sequence, at) = line
            .split_once(' ')
            .with_context(|| format!("a writer printed {line:?}"))?;
        Ok(WriterLine::Commit(sequence.parse()?, at.parse()?))
    }
}

/// What a writer process is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct WriterSpec<'a> {
    pub(crate) schema: &'a SchemaName,
    pub(crate) topic: &'a str,
    /// Messages per second this writer offers.
    pub(crate) rate: f64,
    pub(crate) seconds: f64,
    pub(crate) payload_bytes: usize,
    pub(crate) keys: usize,
    pub(crate) first: u64,
    pub(crate) phase: u16,
    /// Produce to Kafka instead of enqueueing (see [`Produce`]).
    pub(crate) produce: Option<Produce<'a>>,
}

/// How a writer process produces straight to Kafka.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Produce<'a> {
    pub(crate) bootstrap: &'a str,
    /// Producer properties over the relay's.
    pub(crate) kafka: &'a [String],
    /// Hand over what is due every this many milliseconds, not each message as it is due.
    pub(crate) every_ms: Option<u64>,
}

impl WriterSpec<'_> {
    /// Starts the writer process; its stdout is piped (see [`WriterLine`]).
    pub(crate) fn spawn(&self) -> anyhow::Result<Child> {
        Command::new(std::env::current_exe()?)
            .arg("writer-child")
            .args(["--schema", self.schema.as_str(), "--topic", self.topic])
            .args(["--rate", &self.rate.to_string()])
            .args(["--seconds", &self.seconds.to_string()])
            .args(["--payload-bytes", &self.payload_bytes.to_string()])
            .args(["--keys", &self.keys.to_string()])
            .args(["--first", &self.first.to_string()])
            .args(["--phase", &self.phase.to_string()])
            .args(self.produce.iter().flat_map(|p| {
                ["--produce-to".to_owned(), p.bootstrap.to_owned()]
                    .into_iter()
                    .chain(
                        p.kafka
                            .iter()
                            .flat_map(|k| ["--kafka".to_owned(), k.clone()]),
                    )
                    .chain(
                        p.every_ms
                            .iter()
                            .flat_map(|ms| ["--produce-every-ms".to_owned(), ms.to_string()]),
                    )
            }))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start a writer process")
    }
}

/// The `outbox` binary beside this one (where `cargo build -p outbox-cli -p outbox-bench` puts
/// both).
pub(crate) fn daemon_beside_bench() -> anyhow::Result<PathBuf> {
    Ok(std::env::current_exe()?.with_file_name("outbox"))
}

/// `--relay-kafka KEY=VALUE` as the daemon reads it: `OUTBOX_KAFKA_<KEY>` (dots as underscores).
pub(crate) fn kafka_override_env(overrides: &[String]) -> Vec<(String, String)> {
    overrides
        .iter()
        .filter_map(|item| item.split_once('='))
        .map(|(key, value)| {
            (
                format!(
                    "OUTBOX_KAFKA_{}",
                    key.trim().replace('.', "_").to_uppercase()
                ),
                value.trim().to_owned(),
            )
        })
        .collect()
}

/// The `outbox relay` daemon, stopped with SIGTERM when dropped.
pub(crate) struct Daemon(Child);

impl Daemon {
    /// Starts `exe relay` on `schema` with `env` over the defaults the bench needs, and waits
    /// until it holds the lease.
    pub(crate) async fn start(
        exe: &Path,
        pool: &PgPool,
        bootstrap: &str,
        schema: &SchemaName,
        env: &[(String, String)],
    ) -> anyhow::Result<Daemon> {
        anyhow::ensure!(
            exe.exists(),
            "{} is missing: build it beside the bench (cargo build --release -p outbox-cli -p outbox-bench)",
            exe.display()
        );
        let child = Command::new(exe)
            .arg("relay")
            .env("DATABASE_URL", outbox_test_support::database_url())
            .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
            .env("OUTBOX_SCHEMA", schema.as_str())
            .env("OUTBOX_SOURCE", crate::kafka::SOURCE)
            .env("OUTBOX_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", exe.display()))?;
        let mut daemon = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let held = format!("SELECT count(*) FROM {schema}.relay_lease WHERE expires_at > now()");
        while sqlx::query_scalar::<_, i64>(&held).fetch_one(pool).await? == 0 {
            if let Some(status) = daemon.exited()? {
                bail!("the relay daemon exited before taking the lease: {status}");
            }
            if Instant::now() > deadline {
                bail!("the relay daemon did not take the lease within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(daemon)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.id().unwrap_or(0)
    }

    /// How it exited, if it has.
    pub(crate) fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.0.try_wait()?)
    }

    /// SIGTERM, then waits until it has exited (and released its lease).
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.0.id() {
            std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()?;
        }
        tokio::time::timeout(Duration::from_secs(30), self.0.wait())
            .await
            .context("the relay daemon did not exit within 30 s of SIGTERM")??;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_lines_parse() {
        assert_eq!(
            WriterLine::parse("42 1700000000000000").unwrap(),
            WriterLine::Commit(42, 1_700_000_000_000_000)
        );
        assert_eq!(
            WriterLine::parse(r#"{"sent": 3, "seconds": 1.5, "cpu_seconds": 0.25}"#).unwrap(),
            WriterLine::Totals(WriterTotals {
                sent: 3,
                seconds: 1.5,
                cpu_seconds: 0.25
            })
        );
        assert!(WriterLine::parse("garbage").is_err());
    }

    #[test]
    fn kafka_overrides_become_daemon_variables() {
        assert_eq!(
            kafka_override_env(&["linger.ms = 5".to_owned()]),
            vec![("OUTBOX_KAFKA_LINGER_MS".to_owned(), "5".to_owned())]
        );
    }
}
