//! `outbox-bench`: the performance benchmark of issue 5, against the `dev/up` services.
//!
//! One command measures, in the same run so that compared figures share the machine's noise:
//! the raw producer baseline and the relay's drain of a backlog (alternating rounds), the relay's
//! peak memory while draining (in a child process), live end-to-end latency at several offered
//! rates, the write-path cost of enqueuing, writers with and without the wake-up NOTIFY, the
//! effect of a transaction holding an old snapshot, and the CPU per row of each way of enqueueing
//! against a plain INSERT. It prints a table and writes it as JSON.
//! See `docs/performance.md`.
//!
//! `outbox-bench soak` (issue 16) runs steady traffic for a long time and fails if a message is
//! lost or anything grows without bound: see the `soak` module and `docs/reliability.md`.

mod children;
mod clients;
mod enqueue;
mod kafka;
mod live;
mod report;
mod soak;
mod steady;
mod throughput;
mod util;
mod writes;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use outbox::{Outbox, OutboxConfig, SchemaName};
use outbox_kafka_relay::{Relay, RelayConfig, RelayHandle};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use crate::report::Report;
use crate::util::say;

#[derive(Debug, Parser)]
#[command(
    name = "outbox-bench",
    about = "Benchmarks the outbox and its relay against the dev/up PostgreSQL and Kafka",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Steady traffic for a long time; fails on a lost message or unbounded growth.
    ///
    /// Writers at a fixed rate (default 2,000 msg/s for 30 minutes) through the relay daemon,
    /// with retention cleanup running, and a consumer. Fails if a message is lost or the relay's
    /// memory or file descriptors, the tables' size or dead tuples, the backlog or the latency
    /// grow without bound. Writes JSON, CSV and a PNG plot.
    Soak(soak::SoakArgs),
    /// Internal: drains a pre-filled schema with a relay and reports time and peak RSS.
    #[command(hide = true)]
    DrainChild(throughput::DrainChildArgs),
    /// Internal: one writer process of the steady scenario.
    #[command(hide = true)]
    WriterChild(children::WriterChildArgs),
}

/// The scenarios of issue 5 (the drain and the relay's memory are measured together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// 1, 2 and 5: raw producer baseline vs relay drain, in alternating rounds; peak RSS.
    Drain,
    /// 4: business transaction alone, with one enqueued message, and the naive dual write.
    WritePath,
    /// 6: 32 writers with the relay running, with and without the NOTIFY trigger.
    Notify,
    /// 3: live end-to-end at fixed offered rates.
    Live,
    /// 7: a live run while a REPEATABLE READ transaction holds an old snapshot.
    Snapshot,
    /// 8: steady rates from writer processes through `outbox.enqueue`, the `outbox relay`
    /// daemon, per-process CPU.
    Steady,
    /// 9: CPU per saved row of each way of enqueueing, against a plain INSERT.
    Enqueue,
    /// 10: each client library's write path (sqlx, tokio-postgres, SeaORM, diesel-async,
    /// diesel) against the floor of a plain second INSERT.
    Clients,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct RunArgs {
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/performance.json")]
    pub(crate) json: PathBuf,
    /// Which scenarios to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "drain,steady,write-path,notify,live,snapshot,enqueue,clients"
    )]
    pub(crate) scenarios: Vec<Scenario>,
    /// Rounds of the alternating comparisons (raw vs drain, write path, NOTIFY, enqueue cost).
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Messages in the drained backlog, and sent by the raw producer baseline.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) drain_messages: u64,
    /// Sizes of the backlogs written just before the relay starts, no maintenance, drained in
    /// every round beside the vacuumed one (the flag without values skips them).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100000,2000000")]
    pub(crate) fresh_messages: Vec<u64>,
    /// Relay batch sizes for the drain, each measured in every round; the first one is also the
    /// relay's batch size in the other scenarios.
    #[arg(long, value_delimiter = ',', default_value = "5000,10000")]
    pub(crate) batch_sizes: Vec<usize>,
    /// Messages per transaction when pre-filling the backlog.
    #[arg(long, default_value_t = 5000)]
    pub(crate) prefill_chunk: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    pub(crate) payload_bytes: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 500)]
    pub(crate) keys: usize,
    /// Partitions of each benchmark topic.
    #[arg(long, default_value_t = 6)]
    pub(crate) partitions: i32,
    /// Extra drains, once each after the rounds, with pg_stat_activity sampled every 10 ms to
    /// show where the relay's time goes: `keep` is the default configuration, the others are
    /// variants of it (the flag without values skips them).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        num_args = 0..,
        default_value = "keep,delete,async-commit"
    )]
    pub(crate) drain_diagnostics: Vec<throughput::Diagnostic>,
    /// Offered rates of the live scenario, messages per second; `max` runs the writers flat out.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000,5000,max")]
    pub(crate) live_rates: Vec<String>,
    /// Seconds per live rate per round.
    #[arg(long, default_value_t = 8)]
    pub(crate) live_seconds: u64,
    /// Rounds of the live scenario (every rate once per round).
    #[arg(long, default_value_t = 3)]
    pub(crate) live_rounds: usize,
    /// Concurrent writers in the live and snapshot scenarios.
    #[arg(long, default_value_t = 32)]
    pub(crate) live_writers: usize,
    /// Concurrency levels of the write-path scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    pub(crate) write_concurrency: Vec<usize>,
    /// Seconds per write-path variant per round.
    #[arg(long, default_value_t = 3)]
    pub(crate) write_seconds: u64,
    /// Concurrent writers in the NOTIFY scenario.
    #[arg(long, default_value_t = 32)]
    pub(crate) notify_writers: usize,
    /// Seconds per NOTIFY variant per round.
    #[arg(long, default_value_t = 5)]
    pub(crate) notify_seconds: u64,
    /// How long the old snapshot is held.
    #[arg(long, default_value_t = 30)]
    pub(crate) snapshot_seconds: u64,
    /// Seconds of live traffic before and after the snapshot is held.
    #[arg(long, default_value_t = 10)]
    pub(crate) snapshot_margin_seconds: u64,
    /// Overrides a producer property of every relay the bench starts, as KEY=VALUE (repeatable;
    /// for experiments: the default run uses the relay's defaults). The raw producer baseline
    /// and the dual write keep the defaults.
    #[arg(long, value_name = "KEY=VALUE")]
    pub(crate) relay_kafka: Vec<String>,
    /// The raw producer's tuned variant: producer properties over the relay's, KEY=VALUE.
    #[arg(long, value_delimiter = ',', default_value = "linger.ms=5")]
    pub(crate) raw_tuned: Vec<String>,
    /// Offered rates of the steady scenario (writer processes, the relay daemon), msg/s.
    #[arg(long, value_delimiter = ',', default_value = "500,2000")]
    pub(crate) steady_rates: Vec<f64>,
    /// Writer processes in the steady scenario (the offered rate is split between them).
    #[arg(long, default_value_t = 4)]
    pub(crate) steady_writers: usize,
    /// The relay daemon's `batch_linger_ms` values the steady scenario compares (a daemon per
    /// value, rotated within each round); without, the relay's default.
    #[arg(long, value_delimiter = ',')]
    pub(crate) steady_linger_ms: Vec<u64>,
    /// The relay daemon's `wait_for_standbys` values the steady scenario compares (with each
    /// linger); with any, a streaming standby of the database (`pg_basebackup`, loopback) runs
    /// through the whole scenario, whatever the value.
    #[arg(long, value_delimiter = ',')]
    pub(crate) steady_wait_for_standbys: Vec<u32>,
    /// The relay daemon's delivery modes the steady scenario compares ("at-least-once",
    /// "exactly-once"; with each linger); without, the default.
    #[arg(long, value_delimiter = ',')]
    pub(crate) steady_delivery: Vec<String>,
    /// Also drain each round's vacuumed backlog with exactly-once delivery (at the first batch
    /// size), beside the at-least-once drain.
    #[arg(long)]
    pub(crate) drain_exactly_once: bool,
    /// Seconds per steady rate per round.
    #[arg(long, default_value_t = 10)]
    pub(crate) steady_seconds: u64,
    /// Offered rate during the snapshot scenario.
    #[arg(long, default_value_t = 1000.0)]
    pub(crate) snapshot_rate: f64,
    /// Seconds per enqueue-cost case per round.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) enqueue_seconds: f64,
}

/// What every scenario shares.
pub(crate) struct Ctx {
    pub(crate) args: RunArgs,
    pub(crate) bootstrap: String,
    pub(crate) schema: SchemaName,
    pub(crate) outbox: Outbox,
    /// The writers' pool (large enough for every concurrency level).
    pub(crate) pool: PgPool,
    topics: Mutex<Vec<String>>,
    pub(crate) report: Mutex<Report>,
}

impl Ctx {
    /// A new topic for a scenario, deleted at the end of the run.
    pub(crate) async fn topic(&self, prefix: &str) -> String {
        let topic = outbox_test_support::unique_topic(prefix);
        outbox_test_support::create_topic(&self.bootstrap, &topic, self.args.partitions).await;
        self.topics.lock().expect("topics").push(topic.clone());
        topic
    }

    /// The relay's configuration: `RelayConfig::new` defaults, our schema, `batch_size`.
    pub(crate) fn relay_config(&self, batch_size: usize) -> RelayConfig {
        let mut config = RelayConfig::new(self.bootstrap.clone(), kafka::SOURCE);
        config.schema = self.schema.clone();
        config.batch_size = batch_size;
        apply_overrides(&mut config, &self.args.relay_kafka);
        config
    }

    /// Starts a relay with `relay_config(batch_size)` on a runtime of its own, as the `outbox`
    /// daemon runs in a process of its own: the writers' tasks on this runtime do not queue
    /// ahead of the relay's (the drain runs its relay in a child process for the same reason).
    pub(crate) async fn start_relay(&self, batch_size: usize) -> anyhow::Result<RelayOnItsOwn> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("relay")
            .enable_all()
            .build()?;
        let config = self.relay_config(batch_size);
        let handle = runtime
            .spawn(async move {
                let pool = outbox_test_support::pool().await;
                Relay::start(pool, config)
            })
            .await??;
        handle.wait_until_leader().await;
        Ok(RelayOnItsOwn {
            handle: Some(handle),
            runtime: Some(runtime),
        })
    }

    /// The relay's batch size outside the drain comparison.
    pub(crate) fn batch_size(&self) -> usize {
        self.args.batch_sizes.first().copied().unwrap_or(5000)
    }

    /// Pending (unpublished) messages.
    pub(crate) async fn pending(&self) -> anyhow::Result<i64> {
        Ok(
            sqlx::query_scalar(&format!("SELECT count(*) FROM {}.message", self.schema))
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Waits until nothing is pending; false after `timeout`.
    pub(crate) async fn wait_drained(&self, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        while self.pending().await? > 0 {
            if std::time::Instant::now() > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(true)
    }

    /// Empties the outbox and business tables between scenarios (no relay may be running).
    pub(crate) async fn truncate(&self) -> anyhow::Result<()> {
        let s = &self.schema;
        // One statement per call: VACUUM cannot run in the implicit transaction of a
        // multi-statement query.
        for sql in [
            format!("TRUNCATE {s}.message, {s}.business"),
            format!("VACUUM (ANALYZE) {s}.message"),
            "CHECKPOINT".to_owned(),
        ] {
            sqlx::raw_sql(&sql).execute(&self.pool).await?;
        }
        Ok(())
    }

    pub(crate) fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        self.report.lock().expect("report")
    }
}

/// Applies `--relay-kafka KEY=VALUE` overrides to a relay's producer properties.
pub(crate) fn apply_overrides(config: &mut RelayConfig, overrides: &[String]) {
    for item in overrides {
        if let Some((key, value)) = item.split_once('=') {
            config.kafka.set(key.trim(), value.trim());
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A writer process does one thing at a time, like the daemon it is compared with on one
    // runtime thread.
    let mut builder = match cli.command {
        Some(Command::WriterChild(_)) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the Tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Some(Command::DrainChild(args)) => runtime.block_on(throughput::drain_child(args)),
        Some(Command::WriterChild(args)) => runtime.block_on(children::writer_child(args)),
        Some(Command::Soak(args)) => runtime.block_on(soak::soak(args)),
        None => runtime.block_on(run(cli.run)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("outbox-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        args.relay_kafka.iter().all(|o| o.contains('=')),
        "--relay-kafka takes KEY=VALUE"
    );
    anyhow::ensure!(
        !args.batch_sizes.is_empty(),
        "--batch-sizes must not be empty"
    );
    let bootstrap = outbox_test_support::kafka_bootstrap_servers();
    let max_writers = args
        .write_concurrency
        .iter()
        .chain([&args.live_writers, &args.notify_writers])
        .copied()
        .max()
        .unwrap_or(32);
    let pool = connect(max_writers as u32 + 4).await?;
    let (schema, outbox) = create_schema(&pool).await?;
    sqlx::raw_sql(&format!(
        "CREATE TABLE {schema}.business (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             account integer NOT NULL,
             amount bigint NOT NULL,
             note text NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now())"
    ))
    .execute(&pool)
    .await?;
    say(format!("outbox-bench: schema {schema}, Kafka {bootstrap}"));
    let ctx = Ctx {
        args: args.clone(),
        bootstrap,
        schema,
        outbox,
        pool,
        topics: Mutex::new(Vec::new()),
        report: Mutex::new(Report::default()),
    };
    let header = run_header(&ctx).await;
    let started = std::time::Instant::now();
    let outcome = run_scenarios(&ctx).await;
    let elapsed = started.elapsed();

    // Clean up whatever happened.
    drop_schema(&ctx.pool, &ctx.schema).await;
    let topics = ctx.topics.lock().expect("topics").clone();
    kafka::delete_topics(&ctx.bootstrap, &topics).await;

    let report = ctx.report.lock().expect("report");
    let mut header = header;
    header["duration_seconds"] = json!(elapsed.as_secs_f64());
    header["completed"] = json!(outcome.is_ok());
    let document = report.json(header);
    if let Some(parent) = args.json.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&document)? + "\n")
        .with_context(|| format!("write {}", args.json.display()))?;
    println!("{}", report.table());
    println!(
        "total {:.0} s; JSON written to {}",
        elapsed.as_secs_f64(),
        args.json.display()
    );
    outcome
}

async fn run_scenarios(ctx: &Ctx) -> anyhow::Result<()> {
    for scenario in &ctx.args.scenarios {
        match scenario {
            Scenario::Drain => throughput::run(ctx).await?,
            Scenario::WritePath => writes::write_path(ctx).await?,
            Scenario::Notify => writes::notify(ctx).await?,
            Scenario::Live => live::live(ctx).await?,
            Scenario::Snapshot => live::snapshot(ctx).await?,
            Scenario::Steady => steady::run(ctx).await?,
            Scenario::Enqueue => enqueue::enqueue(ctx).await?,
            Scenario::Clients => clients::clients(ctx).await?,
        }
        ctx.truncate().await?;
    }
    Ok(())
}

/// A pool on the `dev/up` database (or `DATABASE_URL`).
pub(crate) async fn connect(max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(30))
        .connect(&outbox_test_support::database_url())
        .await
        .context("connect to PostgreSQL (start the services with: eval \"$(dev/up)\")")
}

/// A new schema of the run's own, with the outbox migrated in it.
pub(crate) async fn create_schema(pool: &PgPool) -> anyhow::Result<(SchemaName, Outbox)> {
    let schema = SchemaName::new(format!("bench_{}", outbox_test_support::short_id()))?;
    let outbox = Outbox::new(OutboxConfig::default().schema(schema.clone()));
    outbox.migrate(pool).await?;
    Ok((schema, outbox))
}

/// Drops a schema made by [`create_schema`]; a failure is only worth a warning.
pub(crate) async fn drop_schema(pool: &PgPool, schema: &SchemaName) {
    if let Err(error) = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(pool)
        .await
    {
        say(format!("warning: cannot drop schema {schema}: {error}"));
    }
}

/// The command, the machine and PostgreSQL, for a report.
pub(crate) async fn machine_json(pool: &PgPool) -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        });
    let memory_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    });
    let setting = |name: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(&format!("SHOW {name}"))
                .fetch_one(&pool)
                .await
                .ok()
        }
    };
    json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "date_utc": crate::util::utc_now(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "memory_mb": memory_kb.map(|kb| kb / 1024),
        "postgres": {
            "server_version": setting("server_version").await,
            "synchronous_commit": setting("synchronous_commit").await,
            "shared_buffers": setting("shared_buffers").await,
            "autovacuum_naptime": setting("autovacuum_naptime").await,
        },
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// The command, the machine and the services, for the report.
async fn run_header(ctx: &Ctx) -> serde_json::Value {
    let mut header = machine_json(&ctx.pool).await;
    header["kafka_bootstrap"] = json!(ctx.bootstrap);
    header["producer_settings"] =
        json!(outbox_kafka_relay::KafkaConfig::new(ctx.bootstrap.clone()).masked());
    header["args"] = json!(format!("{:?}", ctx.args));
    header
}

/// A relay running on a runtime of its own (see [`Ctx::start_relay`]).
pub(crate) struct RelayOnItsOwn {
    handle: Option<RelayHandle>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl RelayOnItsOwn {
    /// Stops the relay gracefully, then its runtime.
    pub(crate) async fn shutdown(mut self) -> anyhow::Result<()> {
        let handle = self.handle.take().expect("running");
        let runtime = self.runtime.take().expect("running");
        let stopped = runtime.spawn(handle.shutdown()).await;
        runtime.shutdown_background();
        stopped??;
        Ok(())
    }
}

impl Drop for RelayOnItsOwn {
    fn drop(&mut self) {
        // An early return (an error) drops it inside the main runtime, where a runtime must not
        // be dropped blocking.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
