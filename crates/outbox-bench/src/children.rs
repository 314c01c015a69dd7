//! The processes the steady and soak scenarios run beside the bench: writer processes (this
//! binary's hidden `writer-child` subcommand), which enqueue through `outbox.enqueue` as a service
//! in another language would, and the `outbox relay` daemon, found beside this binary.
//!
//! A writer prints one `<sequence> <commit µs>` line per committed message on its stdout, in
//! chunks about once a second (so a long run can be followed while it goes, and no file is left
//! behind), then one JSON line with its totals.

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
}

/// How often a writer hands its commit lines to its parent.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Runs in a writer process: open loop (message n is due at start + n / rate; a late writer
/// sends at once, so a slow database shows as a lower achieved rate, not as hidden waits).
pub(crate) async fn writer_child(args: WriterChildArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0 && args.seconds.is_finite() && args.seconds >= 0.0,
        "--rate must be positive and --seconds not negative"
    );
    let schema = SchemaName::new(args.schema)?;
    let mut conn = sqlx::PgConnection::connect(&outbox_test_support::database_url()).await?;
    let sql = format!("SELECT {schema}.enqueue($1, $2, $3)");
    let count = (args.rate * args.seconds).round() as u64;
    // Blocking writes, about once a second: this process has nothing else to do meanwhile.
    let mut stdout = std::io::stdout().lock();
    let mut lines = String::new();
    let started = Instant::now();
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
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(std::process::id());
    lines.push_str(&format!(
        "{}\n",
        json!({"sent": count, "seconds": seconds, "cpu_seconds": cpu})
    ));
    stdout.write_all(lines.as_bytes())?;
    stdout.flush()?;
    Ok(())
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
