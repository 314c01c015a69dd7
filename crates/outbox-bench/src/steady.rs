//! Scenario 8: steady traffic as a service in another language produces it. Writer processes
//! (this binary, `writer-child`) each hold one connection and call `outbox.enqueue` in a
//! transaction of its own per message, at a fixed offered rate; the relay is the `outbox relay`
//! daemon with its defaults, in its own process; a consumer thread in the bench process reads
//! the topic. Every process's CPU is read from `/proc` (PostgreSQL's as the sum over its
//! processes), so that the relay's cost per message is the one an operator sees.
//!
//! Latency is commit → consumer receipt: each writer notes when its commit returned, by
//! sequence, and the consumer when it polled the record.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use outbox::SchemaName;
use serde_json::{json, Value};
use sqlx::Connection as _;
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;

use crate::kafka::ConsumerThread;
use crate::util::{
    cpu_seconds, histogram, histogram_json, key, now_micros, payload, quantile_ms, say, CpuSample,
    Spread,
};
use crate::Ctx;

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
    /// Where to write one "sequence commit_us" line per committed message.
    #[arg(long)]
    out: PathBuf,
}

/// Runs in a writer process: open loop (message n is due at start + n / rate; a late writer
/// sends at once, so a slow database shows as a lower achieved rate, not as hidden waits).
pub(crate) async fn writer_child(args: WriterChildArgs) -> anyhow::Result<()> {
    let schema = SchemaName::new(args.schema)?;
    let mut conn = sqlx::PgConnection::connect(&outbox_test_support::database_url()).await?;
    let sql = format!("SELECT {schema}.enqueue($1, $2, $3)");
    let count = (args.rate * args.seconds).round() as u64;
    let mut lines = String::with_capacity(count as usize * 24);
    let started = Instant::now();
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
    }
    let seconds = started.elapsed().as_secs_f64();
    tokio::fs::File::create(&args.out)
        .await?
        .write_all(lines.as_bytes())
        .await?;
    let cpu = cpu_seconds(std::process::id());
    println!(
        "{}",
        json!({"sent": count, "seconds": seconds, "cpu_seconds": cpu})
    );
    Ok(())
}

/// One rate in one round.
#[derive(Debug)]
struct Phase {
    offered: u64,
    committed: u64,
    writer_seconds: f64,
    /// (relay, postgres, kafka, bench process (the consumer), writers) CPU seconds.
    cpu: [f64; 5],
    commits: Vec<(i64, u64)>,
}

/// The `outbox relay` daemon, stopped with SIGTERM when dropped.
struct Daemon(tokio::process::Child);

impl Daemon {
    fn pid(&self) -> u32 {
        self.0.id().unwrap_or(0)
    }

    /// SIGTERM, then waits until it has exited (and released its lease).
    async fn stop(mut self) -> anyhow::Result<()> {
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

async fn start_daemon(ctx: &Ctx, variant: Variant) -> anyhow::Result<Daemon> {
    let exe = std::env::current_exe()?.with_file_name("outbox");
    anyhow::ensure!(
        exe.exists(),
        "{} is missing: build it beside the bench (cargo build --release -p outbox-cli -p outbox-bench)",
        exe.display()
    );
    let mut command = tokio::process::Command::new(&exe);
    // `--relay-kafka KEY=VALUE` reaches the daemon as OUTBOX_KAFKA_<KEY> (dots as underscores).
    for item in &ctx.args.relay_kafka {
        if let Some((key, value)) = item.split_once('=') {
            let name = format!(
                "OUTBOX_KAFKA_{}",
                key.trim().replace('.', "_").to_uppercase()
            );
            command.env(name, value.trim());
        }
    }
    let child = command
        .arg("relay")
        .env("DATABASE_URL", outbox_test_support::database_url())
        .env("KAFKA_BOOTSTRAP_SERVERS", &ctx.bootstrap)
        .env("OUTBOX_SCHEMA", ctx.schema.as_str())
        .env("OUTBOX_SOURCE", crate::kafka::SOURCE)
        .env("OUTBOX_LOG", "warn")
        .env("OUTBOX_BATCH_LINGER_MS", variant.linger_ms.to_string())
        .env(
            "OUTBOX_WAIT_FOR_STANDBYS",
            variant.wait_for_standbys.to_string(),
        )
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {}", exe.display()))?;
    let daemon = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let held = format!(
        "SELECT count(*) FROM {}.relay_lease WHERE expires_at > now()",
        ctx.schema
    );
    while sqlx::query_scalar::<_, i64>(&held)
        .fetch_one(&ctx.pool)
        .await?
        == 0
    {
        if Instant::now() > deadline {
            bail!("the relay daemon did not take the lease within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(daemon)
}

/// Runs `writers` writer processes offering `rate` in total for `seconds`.
async fn phase(
    ctx: &Ctx,
    topic: &str,
    relay: &Daemon,
    consumer: &ConsumerThread,
    rate: f64,
    id: u16,
    first: u64,
) -> anyhow::Result<Phase> {
    let args = &ctx.args;
    let writers = args.steady_writers.max(1);
    let seconds = args.steady_seconds as f64;
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir();
    let expected = consumer.distinct();
    let before = CpuSample::now(relay.pid());
    let mut children = Vec::new();
    for w in 0..writers {
        let out = dir.join(format!(
            "outbox-bench-writer-{}-{id}-{w}",
            std::process::id()
        ));
        let child = tokio::process::Command::new(&exe)
            .arg("writer-child")
            .args(["--schema", ctx.schema.as_str(), "--topic", topic])
            .args(["--rate", &(rate / writers as f64).to_string()])
            .args(["--seconds", &seconds.to_string()])
            .args(["--payload-bytes", &args.payload_bytes.to_string()])
            .args(["--keys", &args.keys.to_string()])
            .args(["--first", &(first + w as u64 * 10_000_000).to_string()])
            .args(["--phase", &id.to_string()])
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("start a writer process")?;
        children.push((child, out));
    }
    let mut commits = Vec::new();
    let mut writer_seconds: f64 = 0.0;
    let mut writers_cpu = 0.0;
    for (child, out) in children {
        let output = child.wait_with_output().await?;
        anyhow::ensure!(
            output.status.success(),
            "a writer failed: {}",
            output.status
        );
        let result: Value = serde_json::from_slice(
            output
                .stdout
                .split(|b| *b == b'\n')
                .find(|l| l.starts_with(b"{"))
                .context("a writer printed no result")?,
        )?;
        writer_seconds = writer_seconds.max(result["seconds"].as_f64().unwrap_or(f64::NAN));
        let text = tokio::fs::read_to_string(&out).await?;
        let _ = tokio::fs::remove_file(&out).await;
        for line in text.lines() {
            if let Some((sequence, at)) = line.split_once(' ') {
                commits.push((sequence.parse()?, at.parse()?));
            }
        }
        writers_cpu += result["cpu_seconds"].as_f64().unwrap_or(0.0);
    }
    let committed = commits.len() as u64;
    if !consumer
        .wait_for(expected + committed, Duration::from_secs(60))
        .await
    {
        bail!("the consumer did not receive every message within 60 s of the writers' end");
    }
    let after = CpuSample::now(relay.pid());
    Ok(Phase {
        offered: (rate * seconds).round() as u64,
        committed,
        writer_seconds,
        cpu: [
            after.relay - before.relay,
            after.postgres - before.postgres,
            after.kafka - before.kafka,
            after.bench - before.bench,
            writers_cpu,
        ],
        commits,
    })
}

/// The relay daemon's settings compared.
#[derive(Debug, Clone, Copy)]
struct Variant {
    linger_ms: u64,
    wait_for_standbys: u32,
}

impl Variant {
    fn name(&self, standby: bool) -> String {
        match standby {
            true => format!(
                "batch_linger {} ms, standby, wait_for_standbys {}",
                self.linger_ms, self.wait_for_standbys
            ),
            false => format!("batch_linger {} ms", self.linger_ms),
        }
    }
}

/// Scenario 8.
pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let args = &ctx.args;
    let lingers_ms = match args.steady_linger_ms.is_empty() {
        true => vec![ctx.relay_config(1).batch_linger.as_millis() as u64],
        false => args.steady_linger_ms.clone(),
    };
    let standby = !args.steady_wait_for_standbys.is_empty();
    let waits = match standby {
        true => args.steady_wait_for_standbys.clone(),
        false => vec![0],
    };
    let variants: Vec<Variant> = lingers_ms
        .iter()
        .flat_map(|&linger_ms| {
            waits.iter().map(move |&wait_for_standbys| Variant {
                linger_ms,
                wait_for_standbys,
            })
        })
        .collect();
    // For the whole scenario, so that the variants differ only in the relay's setting.
    let _standby = match standby {
        true => {
            let options = ctx.pool.connect_options();
            let source = format!("{}:{}", options.get_host(), options.get_port());
            say(format!("steady: a streaming standby of {source}"));
            Some(tokio::task::block_in_place(|| {
                outbox_test_support::PostgresServer::standby_of(&source)
            }))
        }
        false => None,
    };
    ctx.truncate().await?;
    let topic = ctx.topic("bench-steady").await;
    let consumer = ConsumerThread::start(&ctx.bootstrap, &topic)?;
    let mut first = 0;
    // (linger index, rate index, run), rotated within each round.
    let mut phases: Vec<(usize, usize, Phase)> = Vec::new();
    for round in 0..args.rounds {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        let shift = round % order.len().max(1);
        order.rotate_left(shift);
        for l in order {
            let variant = variants[l];
            let relay = start_daemon(ctx, variant).await?;
            // Warm-up, not reported: connections, the producer's metadata, the consumer's
            // fetches.
            phase(ctx, &topic, &relay, &consumer, 200.0, 0, first).await?;
            first += 100_000_000;
            let mut order: Vec<usize> = (0..args.steady_rates.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let rate = args.steady_rates[i];
                let id = (phases.len() + 1) as u16;
                let run = phase(ctx, &topic, &relay, &consumer, rate, id, first).await?;
                first += 100_000_000;
                say(format!(
                    "steady round {}/{}, {}: {rate} msg/s offered, {:.0} achieved, relay {:.1} µs CPU/msg, PostgreSQL {:.1} µs/msg",
                    round + 1,
                    args.rounds,
                    variant.name(standby),
                    run.committed as f64 / run.writer_seconds,
                    1e6 * run.cpu[0] / run.committed as f64,
                    1e6 * run.cpu[1] / run.committed as f64,
                ));
                phases.push((l, i, run));
            }
            relay.stop().await?;
        }
    }
    let (receipts, duplicates) = consumer.stop();
    let received: HashMap<i64, u64> = receipts
        .iter()
        .map(|r| (r.sequence, r.received_us))
        .collect();

    let mut report = ctx.report();
    let mut details = Vec::new();
    for ((l, variant), (i, &rate)) in variants
        .iter()
        .enumerate()
        .flat_map(|l| args.steady_rates.iter().enumerate().map(move |r| (l, r)))
    {
        let runs: Vec<&Phase> = phases
            .iter()
            .filter(|(m, j, _)| (*m, *j) == (l, i))
            .map(|(_, _, p)| p)
            .collect();
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut per_round = Vec::new();
        for run in &runs {
            let mut latency = histogram();
            let mut missing = 0u64;
            for (sequence, commit_us) in &run.commits {
                match received.get(sequence) {
                    Some(at) => {
                        latency.saturating_record(at.saturating_sub(*commit_us).max(1));
                    }
                    None => missing += 1,
                }
            }
            anyhow::ensure!(
                missing == 0,
                "{missing} committed messages never reached the consumer"
            );
            p50.push(quantile_ms(&latency, 0.50));
            p99.push(quantile_ms(&latency, 0.99));
            per_round.push(json!({
                "offered": run.offered, "committed": run.committed,
                "writer_seconds": run.writer_seconds,
                "achieved_rate": run.committed as f64 / run.writer_seconds,
                "cpu_seconds": {"relay": run.cpu[0], "postgres": run.cpu[1], "kafka": run.cpu[2],
                                 "bench_consumer": run.cpu[3], "writers": run.cpu[4]},
                "commit_to_consumer": histogram_json(&latency),
            }));
        }
        let per_message = |k: usize| -> Vec<f64> {
            runs.iter()
                .map(|r| 1e6 * r.cpu[k] / r.committed as f64)
                .collect()
        };
        let achieved: Vec<f64> = runs
            .iter()
            .map(|r| r.committed as f64 / r.writer_seconds)
            .collect();
        let name = variant.name(standby);
        let scenario = format!(
            "8 steady {rate} msg/s, {} writer processes, {name}",
            args.steady_writers
        );
        report.row(&scenario, "writers' achieved rate", "msg/s", &achieved);
        report.row(&scenario, "commit → consumer p50", "ms", &p50);
        report.row(&scenario, "commit → consumer p99", "ms", &p99);
        let relay_cpu = per_message(0);
        let postgres_cpu = per_message(1);
        report.row(&scenario, "relay daemon CPU per message", "µs", &relay_cpu);
        report.row(
            &scenario,
            "PostgreSQL CPU per message (all its processes)",
            "µs",
            &postgres_cpu,
        );
        report.row(
            &scenario,
            "Kafka broker CPU per message",
            "µs",
            &per_message(2),
        );
        report.row(
            &scenario,
            "writer processes' CPU per message",
            "µs",
            &per_message(4),
        );
        let p99s = Spread::of(&p99);
        let relay = Spread::of(&relay_cpu);
        let rate_ok = Spread::of(&achieved).median >= 0.98 * rate;
        let wanted_p99 = if rate <= 500.0 { 10.0 } else { 15.0 };
        report.target(
            &format!(
                "steady {rate} msg/s, {name}: commit → consumer p99, writers at the offered rate"
            ),
            &format!("< {wanted_p99} ms, >= 98% of offered"),
            format!(
                "p99 {:.1} ms ({:.1}-{:.1}); achieved {:.0} msg/s",
                p99s.median,
                p99s.min,
                p99s.max,
                Spread::of(&achieved).median
            ),
            p99s.median < wanted_p99 && rate_ok,
        );
        if rate >= 2000.0 {
            report.target(
                &format!("steady {rate} msg/s, {name}: relay CPU per message"),
                "<= 20 µs",
                format!("{:.1} µs ({:.1}-{:.1})", relay.median, relay.min, relay.max),
                relay.median <= 20.0,
            );
        }
        details.push(json!({
            "rate": rate, "batch_linger_ms": variant.linger_ms,
            "wait_for_standbys": standby.then_some(variant.wait_for_standbys), "rounds": per_round,
            "relay_cpu_us_per_message": relay.json(&relay_cpu),
            "postgres_cpu_us_per_message": Spread::of(&postgres_cpu).json(&postgres_cpu),
        }));
    }
    report.detail(
        "steady",
        json!({"writers": args.steady_writers, "seconds": args.steady_seconds,
               "duplicates": duplicates, "rates": details}),
    );
    Ok(())
}
