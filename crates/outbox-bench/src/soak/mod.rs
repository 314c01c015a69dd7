//! The soak (issue 16): steady traffic for a long time, watching for anything that grows
//! without bound, and for lost messages.
//!
//! Writer processes (`writer-child`, as in the steady scenario) call `outbox.enqueue` at a fixed
//! offered rate for the whole run; the relay is the `outbox relay` daemon with completion
//! "keep" and a short retention, so that its cleanup runs all along and the `published` table
//! levels off; a consumer thread reads the topic. Every `--sample-interval` the soak samples the
//! relay's resident memory (`VmRSS`) and open file descriptors from `/proc`, its CPU time, the
//! size (`pg_total_relation_size`: heap, indexes, TOAST) and dead tuples (`n_dead_tup`) of the
//! `message` and `published` tables, the published rows and the backlog. Commit → consumer
//! latency is bucketed by commit time into windows of `--latency-window` (a minute by default)
//! and reported as p50/p99 per window.
//!
//! Every commit (sequence and commit time, printed by its writer) is matched with the first
//! receipt of its sequence as both stream in, so memory stays flat however long the run: what
//! is kept is the unmatched pairs, a histogram per window and a bit per sequence seen. After the
//! writers stop, the soak waits up to `--drain-timeout` for the unmatched commits; those still
//! missing are lost.
//!
//! The run fails when a message is lost, a writer or the daemon fails, or a series grows: the
//! growth rule is in [`slope`]. Each series' allowance, the growth over the run that is not yet
//! evidence of a leak:
//!
//! | series | allowance: the larger of | why |
//! |---|---|---|
//! | relay RSS | 10% of its level, 4 MiB | allocator arenas and librdkafka's buffers settle in steps |
//! | relay open fds | 10%, 4 | a reconnecting pool opens a socket before closing one |
//! | `message`, `published` size | 25%, one autovacuum naptime of rows | a table is extended when vacuum is one cycle late, and stays so |
//! | `message`, `published` dead tuples | 50%, one autovacuum naptime of rows | dead rows pile up for up to a naptime between vacuums |
//! | backlog | 50%, 5 s of traffic | the backlog is a few batches; a falling-behind relay adds `rate` a second |
//! | commit → consumer p99 | 100%, 10 ms | a window's p99 is its few slowest messages |
//!
//! A naptime of rows is `rate × autovacuum_naptime` (read from the server), in bytes at the
//! `published` table's measured bytes per row. The short form of the run (the integration test
//! `tests/soak.rs`) is shorter than a naptime, so there these floors carry the verdict; in the
//! 30-minute run a leak of more than the larger of them fails.
//!
//! Outputs, in `--out`: `soak.json` (settings, every sample, the latency windows, the verdicts,
//! the outcome), `soak.csv` (the samples), `soak-latency.csv` (the windows) and `soak.png`
//! (gnuplot, one panel per series with its fitted line and verdict).

mod output;
pub(crate) mod slope;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use outbox::SchemaName;
use sqlx::PgPool;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::children::{daemon_beside_bench, Daemon, WriterLine, WriterSpec, WriterTotals};
use crate::kafka::ReceiptStream;
use crate::util::{cpu_seconds, histogram, now_micros, proc_status_kb, quantile_ms, say, Spread};
use slope::{judge, Allowance, Verdict};

/// Arguments of `outbox-bench soak`.
#[derive(Debug, Clone, Args)]
pub(crate) struct SoakArgs {
    /// Offered rate in messages per second, split evenly between the writer processes.
    #[arg(long, default_value_t = 2000.0, value_parser = parse_rate)]
    pub(crate) rate: f64,
    /// How long the writers run: 30m, 90s, 1h30m (a bare number is seconds).
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Samples before this are not tested for growth [default: a fifth of the duration].
    #[arg(long, value_parser = parse_duration)]
    pub(crate) warm_up: Option<Duration>,
    /// How often the relay's process and the tables are sampled.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) sample_interval: Duration,
    /// Commit → consumer latency is reported per window of this length, by commit time.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub(crate) latency_window: Duration,
    /// Writer processes, each with one connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) writers: u32,
    /// The relay's retention of published messages (completion "keep"): short, so that its
    /// cleanup deletes all along.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub(crate) retention: Duration,
    /// How often the relay's retention cleanup runs.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) cleanup_interval: Duration,
    /// How long to wait after the writers stop for every committed message to be received.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    pub(crate) drain_timeout: Duration,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(18..=1_000_000))]
    pub(crate) payload_bytes: u32,
    /// Distinct keys.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) keys: u32,
    /// Partitions of the soak's topic.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub(crate) partitions: i32,
    /// Where to write soak.json, soak.csv, soak-latency.csv and soak.png.
    #[arg(long, default_value = "target/soak")]
    pub(crate) out: PathBuf,
    /// The `outbox` binary to run as the relay daemon [default: the one beside this binary].
    #[arg(long)]
    pub(crate) relay_bin: Option<PathBuf>,
    /// No PNG (it needs gnuplot: Debian's gnuplot-nox, which dev/soak installs).
    #[arg(long)]
    pub(crate) no_plot: bool,
}

/// "30m", "90s", "1h30m", "500ms", or a bare number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("expected a duration such as 30m, 90s or 1h30m, not {text:?}");
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit] {
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "m" | "min" => number.checked_mul(60).map(Duration::from_secs),
            "s" => Some(Duration::from_secs(number)),
            "ms" => Some(Duration::from_millis(number)),
            _ => None,
        };
        total = part
            .and_then(|part| total.checked_add(part))
            .ok_or_else(invalid)?;
        rest = &rest[unit..];
    }
    Ok(total)
}

/// A positive, finite rate of at most a million messages per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 1e6 => Ok(rate),
        _ => Err(format!(
            "expected messages per second, more than 0 and at most 1000000, not {text:?}"
        )),
    }
}

/// The settings, checked against each other.
#[derive(Debug, Clone)]
struct Plan {
    args: SoakArgs,
    warm_up: Duration,
    relay_bin: PathBuf,
}

impl Plan {
    fn new(args: SoakArgs) -> anyhow::Result<Plan> {
        let warm_up = args.warm_up.unwrap_or(args.duration / 5);
        anyhow::ensure!(
            args.duration >= Duration::from_secs(1),
            "--duration must be at least 1s"
        );
        anyhow::ensure!(
            args.sample_interval >= Duration::from_millis(100),
            "--sample-interval must be at least 100ms"
        );
        anyhow::ensure!(
            args.latency_window >= Duration::from_secs(1),
            "--latency-window must be at least 1s"
        );
        anyhow::ensure!(
            args.cleanup_interval >= Duration::from_millis(1),
            "--cleanup-interval must be at least 1ms"
        );
        anyhow::ensure!(
            warm_up < args.duration,
            "--warm-up ({warm_up:?}) must be shorter than --duration ({:?})",
            args.duration
        );
        let tested = args.duration - warm_up;
        for (name, every) in [
            ("--sample-interval", args.sample_interval),
            ("--latency-window", args.latency_window),
        ] {
            anyhow::ensure!(
                tested >= every * slope::MIN_SAMPLES as u32,
                "the {tested:?} after the warm-up must hold at least {} of {name} ({every:?})",
                slope::MIN_SAMPLES
            );
        }
        let relay_bin = match &args.relay_bin {
            Some(path) => path.clone(),
            None => daemon_beside_bench()?,
        };
        anyhow::ensure!(
            relay_bin.is_file(),
            "{} is missing: build it beside the bench (cargo build --release -p outbox-cli -p outbox-bench) or pass --relay-bin",
            relay_bin.display()
        );
        Ok(Plan {
            args,
            warm_up,
            relay_bin,
        })
    }

    fn rate_per_writer(&self) -> f64 {
        self.args.rate / f64::from(self.args.writers)
    }

    /// What the relay daemon runs with beyond the bench's defaults.
    fn daemon_env(&self) -> Vec<(String, String)> {
        vec![
            ("OUTBOX_COMPLETION".to_owned(), "keep".to_owned()),
            (
                "OUTBOX_RETENTION_HOURS".to_owned(),
                (self.args.retention.as_secs_f64() / 3600.0).to_string(),
            ),
            (
                "OUTBOX_CLEANUP_INTERVAL_MS".to_owned(),
                self.args.cleanup_interval.as_millis().to_string(),
            ),
        ]
    }
}

/// A sampled column: `soak.csv`'s columns after the time, and `soak.json`'s sample fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Column {
    RelayRss,
    RelayFds,
    RelayCpu,
    MessageBytes,
    PublishedBytes,
    MessageDead,
    PublishedDead,
    PublishedRows,
    Backlog,
    Committed,
    Received,
}

impl Column {
    pub(crate) const ALL: [Column; 11] = [
        Column::RelayRss,
        Column::RelayFds,
        Column::RelayCpu,
        Column::MessageBytes,
        Column::PublishedBytes,
        Column::MessageDead,
        Column::PublishedDead,
        Column::PublishedRows,
        Column::Backlog,
        Column::Committed,
        Column::Received,
    ];

    pub(crate) fn key(self) -> &'static str {
        match self {
            Column::RelayRss => "relay_rss_bytes",
            Column::RelayFds => "relay_fds",
            Column::RelayCpu => "relay_cpu_seconds",
            Column::MessageBytes => "message_bytes",
            Column::PublishedBytes => "published_bytes",
            Column::MessageDead => "message_dead_tuples",
            Column::PublishedDead => "published_dead_tuples",
            Column::PublishedRows => "published_rows",
            Column::Backlog => "backlog",
            Column::Committed => "committed",
            Column::Received => "received",
        }
    }

    /// The column's position in a sample (and, after the time, in the CSV).
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One sample: seconds since the writers started, and a value per [`Column`] (NaN when it
/// could not be read).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) values: [f64; Column::ALL.len()],
}

impl Sample {
    pub(crate) fn get(&self, column: Column) -> f64 {
        self.values[column.index()]
    }
}

/// Commit → consumer latency of the messages committed in one window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Window {
    /// Seconds since the writers started.
    pub(crate) start: f64,
    pub(crate) count: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

/// What a judged series is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Column(Column),
    /// The p99 of each latency window, at the window's middle.
    P99,
}

/// A series and its verdict.
#[derive(Debug, Clone)]
pub(crate) struct Judged {
    pub(crate) source: Source,
    pub(crate) name: &'static str,
    pub(crate) unit: &'static str,
    pub(crate) allowance: Allowance,
    pub(crate) verdict: Verdict,
}

/// How the run ended, beside the series.
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    pub(crate) committed: u64,
    pub(crate) received: u64,
    pub(crate) lost: u64,
    /// A few lost sequences, for the report.
    pub(crate) lost_examples: Vec<i64>,
    pub(crate) duplicates: u64,
    /// Received sequences no writer reported committing (a writer that died between its
    /// commit and its line; never expected).
    pub(crate) unreported: u64,
    /// Seconds the writers ran (the longest of them).
    pub(crate) writer_seconds: f64,
    /// Seconds from the writers' end until every committed message was received.
    pub(crate) drain_seconds: Option<f64>,
    /// Why the run stopped early, if it did.
    pub(crate) aborted: Option<String>,
}

/// Everything the run produced.
#[derive(Debug, Clone)]
pub(crate) struct Soak {
    pub(crate) machine: serde_json::Value,
    pub(crate) args: SoakArgs,
    pub(crate) warm_up: Duration,
    pub(crate) autovacuum_naptime: f64,
    pub(crate) relay_bin: PathBuf,
    pub(crate) samples: Vec<Sample>,
    pub(crate) windows: Vec<Window>,
    pub(crate) judged: Vec<Judged>,
    pub(crate) outcome: Outcome,
}

impl Soak {
    pub(crate) fn passed(&self) -> bool {
        self.outcome.lost == 0
            && self.outcome.aborted.is_none()
            && self.judged.iter().all(|j| j.verdict.judgement.passed())
    }
}

/// `outbox-bench soak`.
pub(crate) async fn soak(args: SoakArgs) -> anyhow::Result<()> {
    let plan = Plan::new(args)?;
    let out = &plan.args.out;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    if !plan.args.no_plot {
        output::check_gnuplot()?;
    }
    let pool = crate::connect(4).await?;
    let bootstrap = outbox_test_support::kafka_bootstrap_servers();
    let (schema, _outbox) = crate::create_schema(&pool).await?;
    let topic = outbox_test_support::unique_topic("soak");
    say(format!(
        "soak: {} msg/s from {} writers for {:?} (warm-up {:?}), schema {schema}, topic {topic}, relay {}",
        plan.args.rate,
        plan.args.writers,
        plan.args.duration,
        plan.warm_up,
        plan.relay_bin.display()
    ));
    let ran = match crate::kafka::create_topic(&bootstrap, &topic, plan.args.partitions).await {
        Ok(()) => run(&plan, &pool, &bootstrap, &schema, &topic).await,
        Err(error) => Err(error),
    };
    crate::drop_schema(&pool, &schema).await;
    crate::kafka::delete_topics(&bootstrap, std::slice::from_ref(&topic)).await;
    let soak = ran?;

    let written = output::write(&soak)?;
    for path in &written {
        say(format!("soak: wrote {}", path.display()));
    }
    println!("{}", output::summary(&soak));
    if soak.passed() {
        Ok(())
    } else {
        anyhow::bail!(
            "the soak failed (see the summary above and {})",
            out.display()
        )
    }
}

/// Runs the writers, the daemon and the consumer, samples, judges.
async fn run(
    plan: &Plan,
    pool: &PgPool,
    bootstrap: &str,
    schema: &SchemaName,
    topic: &str,
) -> anyhow::Result<Soak> {
    let args = &plan.args;
    let machine = crate::machine_json(pool).await;
    let naptime: f64 = sqlx::query_scalar::<_, String>(
        "SELECT setting FROM pg_settings WHERE name = 'autovacuum_naptime'",
    )
    .fetch_one(pool)
    .await?
    .parse()
    .context("autovacuum_naptime is not a number of seconds")?;
    let (consumer, mut receipts) = ReceiptStream::start(bootstrap, topic)?;
    let mut daemon = Daemon::start(&plan.relay_bin, pool, bootstrap, schema, &plan.daemon_env())
        .await
        .context("start the relay daemon")?;
    let sampler = Sampler::new(schema);

    let start_us = now_micros();
    let start = Instant::now();
    let (commit_sender, mut commits) = mpsc::unbounded_channel();
    let mut writers = JoinSet::new();
    for w in 0..args.writers {
        let child = WriterSpec {
            schema,
            topic,
            rate: plan.rate_per_writer(),
            seconds: args.duration.as_secs_f64(),
            payload_bytes: args.payload_bytes as usize,
            keys: args.keys as usize,
            first: u64::from(w) * 1_000_000_000_000,
            phase: 1,
            produce: None,
        }
        .spawn()?;
        writers.spawn(follow_writer(child, commit_sender.clone()));
    }
    drop(commit_sender);

    let mut matcher = Matcher::new(start_us, args.latency_window);
    let mut samples = Vec::new();
    let mut totals: Vec<WriterTotals> = Vec::new();
    let mut outcome = Outcome::default();
    let mut ticker = tokio::time::interval(args.sample_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported_minute = 0;
    // Until every writer's output has been read (their commit channel closes), or a failure.
    loop {
        tokio::select! {
            commit = commits.recv() => match commit {
                Some((sequence, at)) => matcher.commit(sequence, at),
                None => break,
            },
            Some(receipt) = receipts.recv() => {
                matcher.receipt(receipt.sequence, receipt.received_us);
            }
            Some(joined) = writers.join_next() => match joined {
                Ok(Ok(writer)) => totals.push(writer),
                Ok(Err(error)) => {
                    outcome.aborted = Some(format!("a writer failed: {error:#}"));
                    break;
                }
                Err(error) => {
                    outcome.aborted = Some(format!("a writer's task failed: {error}"));
                    break;
                }
            },
            _ = ticker.tick() => {
                if let Some(status) = daemon.exited()? {
                    outcome.aborted = Some(format!("the relay daemon exited: {status}"));
                    break;
                }
                let t = start.elapsed().as_secs_f64();
                match sampler.sample(pool, daemon.pid(), t, &matcher).await {
                    Ok(sample) => samples.push(sample),
                    Err(error) => {
                        outcome.aborted = Some(format!("sampling failed: {error:#}"));
                        break;
                    }
                }
                let minute = (t / 60.0) as u64;
                if minute > reported_minute {
                    reported_minute = minute;
                    say(progress(&samples, &matcher, args.duration));
                }
            }
        }
    }
    if outcome.aborted.is_none() {
        while let Some(joined) = writers.join_next().await {
            match joined {
                Ok(Ok(writer)) => totals.push(writer),
                Ok(Err(error)) => outcome.aborted = Some(format!("a writer failed: {error:#}")),
                Err(error) => outcome.aborted = Some(format!("a writer's task failed: {error}")),
            }
        }
    }
    writers.abort_all();
    outcome.writer_seconds = totals.iter().map(|t| t.seconds).fold(0.0, f64::max);

    // The drain: until every commit has been received, or the timeout.
    let writers_done = Instant::now();
    let deadline = writers_done + args.drain_timeout;
    while matcher.waiting() > 0 {
        tokio::select! {
            Some(receipt) = receipts.recv() => {
                matcher.receipt(receipt.sequence, receipt.received_us);
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    if matcher.waiting() == 0 {
        outcome.drain_seconds = Some(writers_done.elapsed().as_secs_f64());
    }
    // The daemon's exit status matters only if it stopped by itself.
    if outcome.aborted.is_none() {
        if let Some(status) = daemon.exited()? {
            outcome.aborted = Some(format!("the relay daemon exited: {status}"));
        }
    }
    daemon.stop().await?;
    drop(consumer);
    // Receipts polled before the consumer stopped.
    while let Ok(receipt) = receipts.try_recv() {
        matcher.receipt(receipt.sequence, receipt.received_us);
    }

    outcome.committed = matcher.committed;
    outcome.received = matcher.received;
    outcome.duplicates = matcher.duplicates;
    outcome.unreported = matcher.early.len() as u64;
    outcome.lost = matcher.waiting() as u64;
    let mut lost: Vec<i64> = matcher.waiting.keys().copied().collect();
    lost.sort_unstable();
    lost.truncate(20);
    outcome.lost_examples = lost;

    let windows = matcher.windows(args.duration);
    let judged = judge_all(plan, naptime, &samples, &windows);
    Ok(Soak {
        machine,
        args: args.clone(),
        warm_up: plan.warm_up,
        autovacuum_naptime: naptime,
        relay_bin: plan.relay_bin.clone(),
        samples,
        windows,
        judged,
        outcome,
    })
}

/// Reads a writer's lines, hands its commits on, and returns its totals once it exited well.
async fn follow_writer(
    mut child: Child,
    commits: mpsc::UnboundedSender<(i64, u64)>,
) -> anyhow::Result<WriterTotals> {
    let stdout = child.stdout.take().context("a writer's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut totals = None;
    while let Some(line) = lines.next_line().await? {
        match WriterLine::parse(&line)? {
            // The receiver is gone only when the run is over.
            WriterLine::Commit(sequence, at) => {
                let _ = commits.send((sequence, at));
            }
            WriterLine::Totals(t) => totals = Some(t),
        }
    }
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "a writer exited with {status}");
    totals.context("a writer printed no totals")
}

/// One line every minute while the soak runs.
fn progress(samples: &[Sample], matcher: &Matcher, duration: Duration) -> String {
    let Some(last) = samples.last() else {
        return "soak: no sample yet".to_owned();
    };
    let mib = |v: f64| v / (1024.0 * 1024.0);
    let p99 = matcher
        .last_complete_window(last.t)
        .map(|w| format!("{:.1} ms", quantile_ms(w, 0.99)))
        .unwrap_or_else(|| "-".to_owned());
    format!(
        "soak {:.0}/{:.0} min: relay {:.1} MiB, {} fds; message {:.1} MiB, published {:.1} MiB; dead tuples {}/{}; backlog {}; last window's p99 {p99}; {} committed, {} received",
        last.t / 60.0,
        duration.as_secs_f64() / 60.0,
        mib(last.get(Column::RelayRss)),
        last.get(Column::RelayFds),
        mib(last.get(Column::MessageBytes)),
        mib(last.get(Column::PublishedBytes)),
        last.get(Column::MessageDead),
        last.get(Column::PublishedDead),
        last.get(Column::Backlog),
        matcher.committed,
        matcher.received,
    )
}

/// Reads a sample's figures.
struct Sampler {
    tables: String,
}

impl Sampler {
    fn new(schema: &SchemaName) -> Sampler {
        Sampler {
            tables: format!(
                "SELECT pg_total_relation_size('{schema}.message'),
                        pg_total_relation_size('{schema}.published'),
                        coalesce((SELECT n_dead_tup FROM pg_stat_user_tables
                                   WHERE schemaname = '{schema}' AND relname = 'message'), 0),
                        coalesce((SELECT n_dead_tup FROM pg_stat_user_tables
                                   WHERE schemaname = '{schema}' AND relname = 'published'), 0),
                        coalesce((SELECT n_live_tup FROM pg_stat_user_tables
                                   WHERE schemaname = '{schema}' AND relname = 'published'), 0),
                        (SELECT count(*) FROM {schema}.message)"
            ),
        }
    }

    async fn sample(
        &self,
        pool: &PgPool,
        relay: u32,
        t: f64,
        matcher: &Matcher,
    ) -> anyhow::Result<Sample> {
        let (message, published, message_dead, published_dead, published_rows, backlog): (
            i64,
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = sqlx::query_as(&self.tables).fetch_one(pool).await?;
        let or_nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
        let fds = std::fs::read_dir(format!("/proc/{relay}/fd"))
            .ok()
            .map(|entries| entries.count() as f64);
        let mut values = [f64::NAN; Column::ALL.len()];
        for column in Column::ALL {
            values[column.index()] = match column {
                Column::RelayRss => {
                    or_nan(proc_status_kb(&relay.to_string(), "VmRSS").map(|kb| kb as f64 * 1024.0))
                }
                Column::RelayFds => or_nan(fds),
                Column::RelayCpu => or_nan(cpu_seconds(relay)),
                Column::MessageBytes => message as f64,
                Column::PublishedBytes => published as f64,
                Column::MessageDead => message_dead as f64,
                Column::PublishedDead => published_dead as f64,
                Column::PublishedRows => published_rows as f64,
                Column::Backlog => backlog as f64,
                Column::Committed => matcher.committed as f64,
                Column::Received => matcher.received as f64,
            };
        }
        Ok(Sample { t, values })
    }
}

/// The series judged, with their allowances (see the module docs).
fn judge_all(plan: &Plan, naptime: f64, samples: &[Sample], windows: &[Window]) -> Vec<Judged> {
    let warm_up = plan.warm_up.as_secs_f64();
    let points = |column: Column| -> Vec<(f64, f64)> {
        samples.iter().map(|s| (s.t, s.get(column))).collect()
    };
    // Bytes per row of `published`, the table whose rows are nearly all live, after the warm-up.
    let per_row: Vec<f64> = samples
        .iter()
        .filter(|s| s.t >= warm_up)
        .map(|s| {
            s.get(Column::PublishedBytes)
                / (s.get(Column::PublishedRows) + s.get(Column::PublishedDead)).max(1.0)
        })
        .filter(|v| v.is_finite())
        .collect();
    let bytes_per_row = Spread::of(&per_row)
        .median
        .max(f64::from(plan.args.payload_bytes));
    let naptime_rows = plan.args.rate * naptime;
    let naptime_bytes = naptime_rows * bytes_per_row;
    let allow = |relative: f64, absolute: f64| Allowance { relative, absolute };
    let series = [
        (
            Source::Column(Column::RelayRss),
            "relay RSS",
            "bytes",
            allow(0.10, 4.0 * 1024.0 * 1024.0),
        ),
        (
            Source::Column(Column::RelayFds),
            "relay open fds",
            "fds",
            allow(0.10, 4.0),
        ),
        (
            Source::Column(Column::MessageBytes),
            "message table size",
            "bytes",
            allow(0.25, naptime_bytes),
        ),
        (
            Source::Column(Column::PublishedBytes),
            "published table size",
            "bytes",
            allow(0.25, naptime_bytes),
        ),
        (
            Source::Column(Column::MessageDead),
            "message dead tuples",
            "tuples",
            allow(0.50, naptime_rows),
        ),
        (
            Source::Column(Column::PublishedDead),
            "published dead tuples",
            "tuples",
            allow(0.50, naptime_rows),
        ),
        (
            Source::Column(Column::Backlog),
            "backlog",
            "messages",
            allow(0.50, plan.args.rate * 5.0),
        ),
        (Source::P99, "commit → consumer p99", "ms", allow(1.0, 10.0)),
    ];
    series
        .into_iter()
        .map(|(source, name, unit, allowance)| {
            let points = match source {
                Source::Column(column) => points(column),
                Source::P99 => windows
                    .iter()
                    .map(|w| {
                        (
                            w.start + plan.args.latency_window.as_secs_f64() / 2.0,
                            w.p99_ms,
                        )
                    })
                    .collect(),
            };
            // A window counts once it starts after the warm-up; a sample once it is taken
            // after it.
            let from = match source {
                Source::P99 => warm_up + plan.args.latency_window.as_secs_f64() / 2.0,
                Source::Column(_) => warm_up,
            };
            Judged {
                source,
                name,
                unit,
                allowance,
                verdict: judge(&points, from, allowance),
            }
        })
        .collect()
}

/// A set of sequences: a bit each for those below 2^32 (a soak sees millions, from 1 up),
/// a hash set for any other.
#[derive(Debug, Default)]
struct SequenceSet {
    bits: Vec<u64>,
    others: HashSet<i64>,
}

impl SequenceSet {
    fn index(sequence: i64) -> Option<usize> {
        u32::try_from(sequence).ok().map(|s| s as usize)
    }

    /// Adds `sequence`; false if it was there.
    fn insert(&mut self, sequence: i64) -> bool {
        let Some(i) = Self::index(sequence) else {
            return self.others.insert(sequence);
        };
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & bit == 0;
        self.bits[word] |= bit;
        fresh
    }

    fn contains(&self, sequence: i64) -> bool {
        match Self::index(sequence) {
            Some(i) => self
                .bits
                .get(i / 64)
                .is_some_and(|word| word & (1u64 << (i % 64)) != 0),
            None => self.others.contains(&sequence),
        }
    }
}

/// Pairs each commit with the first receipt of its sequence, whichever arrives first, and
/// records the latency in the window of the commit.
#[derive(Debug)]
struct Matcher {
    start_us: u64,
    window_us: u64,
    /// Committed, not received yet: sequence → commit time.
    waiting: HashMap<i64, u64>,
    /// Received before its writer reported the commit: sequence → receipt time.
    early: HashMap<i64, u64>,
    matched: SequenceSet,
    windows: BTreeMap<u64, Histogram<u64>>,
    committed: u64,
    received: u64,
    duplicates: u64,
}

impl Matcher {
    fn new(start_us: u64, window: Duration) -> Matcher {
        Matcher {
            start_us,
            window_us: (window.as_micros() as u64).max(1),
            waiting: HashMap::new(),
            early: HashMap::new(),
            matched: SequenceSet::default(),
            windows: BTreeMap::new(),
            committed: 0,
            received: 0,
            duplicates: 0,
        }
    }

    fn commit(&mut self, sequence: i64, at: u64) {
        self.committed += 1;
        match self.early.remove(&sequence) {
            Some(received) => self.matched(sequence, at, received),
            None => {
                self.waiting.insert(sequence, at);
            }
        }
    }

    fn receipt(&mut self, sequence: i64, at: u64) {
        if self.matched.contains(sequence) || self.early.contains_key(&sequence) {
            self.duplicates += 1;
            return;
        }
        self.received += 1;
        match self.waiting.remove(&sequence) {
            Some(committed) => self.matched(sequence, committed, at),
            None => {
                self.early.insert(sequence, at);
            }
        }
    }

    fn matched(&mut self, sequence: i64, committed: u64, received: u64) {
        self.matched.insert(sequence);
        let window = committed.saturating_sub(self.start_us) / self.window_us;
        self.windows
            .entry(window)
            .or_insert_with(histogram)
            .saturating_record(received.saturating_sub(committed).max(1));
    }

    /// Committed messages not received yet.
    fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The latest window that ended before `t` seconds.
    fn last_complete_window(&self, t: f64) -> Option<&Histogram<u64>> {
        let ended = ((t * 1e6) as u64 / self.window_us).checked_sub(1)?;
        self.windows.get(&ended)
    }

    /// The windows that fit whole in the run (a last partial one would have fewer, and only
    /// the latest, messages).
    fn windows(&self, duration: Duration) -> Vec<Window> {
        let whole = duration.as_micros() as u64 / self.window_us;
        (0..whole)
            .map(|k| {
                let start = (k * self.window_us) as f64 / 1e6;
                match self.windows.get(&k) {
                    Some(h) => Window {
                        start,
                        count: h.len(),
                        p50_ms: quantile_ms(h, 0.50),
                        p99_ms: quantile_ms(h, 0.99),
                        max_ms: h.max() as f64 / 1000.0,
                    },
                    None => Window {
                        start,
                        count: 0,
                        p50_ms: f64::NAN,
                        p99_ms: f64::NAN,
                        max_ms: f64::NAN,
                    },
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2m30s"), Ok(Duration::from_secs(150)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        for bad in [
            "",
            "m",
            "10x",
            "1.5m",
            "-3s",
            "99999999999999999999h",
            "s10",
        ] {
            let error = parse_duration(bad).unwrap_err();
            assert!(error.contains("30m"), "{bad}: {error}");
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("2000"), Ok(2000.0));
        for bad in ["0", "-1", "NaN", "inf", "2e6", "fast"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    fn args(extra: &[&str]) -> Result<SoakArgs, clap::Error> {
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            soak: SoakArgs,
        }
        use clap::Parser as _;
        let relay = match extra.contains(&"--relay-bin") {
            true => &[][..],
            false => &["--relay-bin", "/bin/sh"][..],
        };
        let argv = ["soak"].iter().chain(relay).chain(extra);
        Cli::try_parse_from(argv).map(|cli| cli.soak)
    }

    #[test]
    fn settings_that_leave_nothing_to_test_are_refused() {
        let plan = Plan::new(args(&[]).unwrap()).unwrap();
        assert_eq!(plan.warm_up, Duration::from_secs(360));
        for (extra, wanted) in [
            (
                &["--duration", "60s", "--warm-up", "60s"][..],
                "shorter than",
            ),
            (
                &["--duration", "60s", "--latency-window", "30s"][..],
                "at least 3",
            ),
            (
                &["--duration", "10s", "--sample-interval", "5s"][..],
                "at least 3",
            ),
            (&["--duration", "0s"][..], "at least 1s"),
            (&["--sample-interval", "1ms"][..], "at least 100ms"),
            (&["--relay-bin", "/nonexistent/outbox"][..], "missing"),
        ] {
            let error = Plan::new(args(extra).unwrap()).unwrap_err().to_string();
            assert!(error.contains(wanted), "{extra:?}: {error}");
        }
        for bad in [
            &["--writers", "0"][..],
            &["--payload-bytes", "4"][..],
            &["--rate", "0"][..],
            &["--duration", "forever"][..],
        ] {
            assert!(args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_daemon_keeps_published_messages_briefly() {
        let plan =
            Plan::new(args(&["--retention", "36s", "--cleanup-interval", "2s"]).unwrap()).unwrap();
        let env: HashMap<String, String> = plan.daemon_env().into_iter().collect();
        assert_eq!(env["OUTBOX_COMPLETION"], "keep");
        assert_eq!(env["OUTBOX_RETENTION_HOURS"], "0.01");
        assert_eq!(env["OUTBOX_CLEANUP_INTERVAL_MS"], "2000");
    }

    #[test]
    fn commits_and_receipts_match_in_either_order() {
        let mut m = Matcher::new(1_000_000, Duration::from_secs(60));
        m.commit(1, 2_000_000);
        m.receipt(1, 2_005_000);
        m.receipt(2, 3_000_000); // before its commit line
        m.commit(2, 2_990_000);
        m.receipt(2, 3_100_000); // a duplicate
        m.commit(3, 61_500_000); // second window, never received
        assert_eq!((m.committed, m.received, m.duplicates), (3, 2, 1));
        assert_eq!(m.waiting(), 1);
        assert!(m.early.is_empty());
        let windows = m.windows(Duration::from_secs(120));
        assert_eq!(windows.len(), 2);
        assert_eq!(windows[0].count, 2);
        assert!((windows[0].p99_ms - 10.0).abs() < 0.1, "{windows:?}");
        assert_eq!(windows[1].count, 0);
        assert!(windows[1].p99_ms.is_nan());
    }

    #[test]
    fn sequence_sets_hold_small_and_large_sequences() {
        let mut set = SequenceSet::default();
        for s in [1, 64, 65, 4_000_000, -5, i64::MAX] {
            assert!(!set.contains(s));
            assert!(set.insert(s));
            assert!(!set.insert(s));
            assert!(set.contains(s));
        }
        assert!(!set.contains(2));
    }
}
