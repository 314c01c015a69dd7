//! Scenarios 1, 2 and 5: the raw producer baseline and the relay draining a pre-filled backlog,
//! in alternating rounds so that their ratio is taken in the same run; the drain runs in a child
//! process whose peak RSS (VmHWM) is the relay's memory figure.

use std::process::Stdio;
use std::str::FromStr as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use outbox::{Message, Outbox, OutboxConfig, SchemaName};
use outbox_kafka_relay::diagnostics;
use outbox_kafka_relay::{Completion, Delivery, Relay, RelayConfig};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::Connection as _;

use crate::util::{bar, cpu_seconds, key, payload, proc_status_kb, say, CpuSample, Spread};
use crate::{kafka, Ctx};

/// Arguments of the hidden `drain-child` subcommand.
#[derive(Debug, Clone, Args)]
pub(crate) struct DrainChildArgs {
    /// The pre-filled schema.
    #[arg(long)]
    schema: String,
    /// Relay batch size.
    #[arg(long)]
    batch_size: usize,
    /// A variant of the relay's configuration, for diagnosis.
    #[arg(long, value_enum)]
    diagnostic: Option<Diagnostic>,
    /// Producer property overrides, KEY=VALUE.
    #[arg(long)]
    relay_kafka: Vec<String>,
    /// Give up after this long.
    #[arg(long, default_value_t = 900)]
    timeout_seconds: u64,
    /// Exactly-once delivery (each batch a Kafka transaction).
    #[arg(long)]
    exactly_once: bool,
}

/// A drain run once after the alternating rounds, with `pg_stat_activity` sampled to show where
/// the relay's time goes, in the default configuration or a variant of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Diagnostic {
    /// The default configuration, again, while being profiled.
    Keep,
    /// `Completion::Delete` instead of the default `Completion::Keep`.
    Delete,
    /// The relay's sessions with `synchronous_commit = off` (a lost completion after a database
    /// crash means a duplicate, never a loss).
    AsyncCommit,
    /// 10,000 of the backlog's messages, spread through it, held with distinct keys (a topic
    /// that is missing or not authorised): the others must drain as fast as without them.
    HeldKeys,
    /// The default configuration on a backlog written just before the relay starts, no
    /// maintenance (see `Backlog::Fresh`).
    Fresh,
}

impl Diagnostic {
    fn label(self) -> &'static str {
        match self {
            Diagnostic::Keep => "default (Completion::Keep)",
            Diagnostic::Delete => "Completion::Delete",
            Diagnostic::AsyncCommit => "synchronous_commit=off for the relay",
            Diagnostic::HeldKeys => "10,000 held keys spread through the backlog",
            Diagnostic::Fresh => "a freshly written backlog, no maintenance",
        }
    }
}

/// Runs in the child: starts a relay on the pre-filled schema, polls until nothing is pending,
/// and prints one JSON line: the drain time (from `Relay::start` until no message is pending)
/// and the process's RSS before the relay started and its peak (VmHWM) while draining.
pub(crate) async fn drain_child(args: DrainChildArgs) -> anyhow::Result<()> {
    let schema = SchemaName::new(args.schema)?;
    let pool = if args.diagnostic == Some(Diagnostic::AsyncCommit) {
        let options = PgConnectOptions::from_str(&outbox_test_support::database_url())?
            .options([("synchronous_commit", "off")]);
        PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?
    } else {
        outbox_test_support::pool().await
    };
    let mut config = RelayConfig::new(
        outbox_test_support::kafka_bootstrap_servers(),
        kafka::SOURCE,
    );
    config.schema = schema.clone();
    config.batch_size = args.batch_size;
    if args.exactly_once {
        config.delivery = Delivery::ExactlyOnce;
        config.progress_topic = format!("bench-progress-{schema}");
    }
    if args.diagnostic == Some(Diagnostic::Delete) {
        config.completion = Completion::Delete;
    }
    crate::apply_overrides(&mut config, &args.relay_kafka);
    // The completion check finds the lowest pending id, searching from the previous one (nothing
    // is inserted during a drain, so every id below it is done). Searched from the start instead,
    // every check would walk everything completed so far (dead rows until vacuum): at a check
    // every 10 ms, PostgreSQL CPU taken from the relay being measured.
    if args.diagnostic == Some(Diagnostic::HeldKeys) {
        sqlx::raw_sql(&format!(
            "UPDATE {schema}.message
                SET topic = 'bench-held', key = convert_to('held-' || id, 'UTF8'), attempts = 1,
                    last_error = 'held by the bench', retry_at = now() + interval '1 hour'
              WHERE id % greatest((SELECT count(*) FROM {schema}.message) / 10000, 1) = 0;
             ANALYZE {schema}.message"
        ))
        .execute(&pool)
        .await?;
    }
    // Held messages stay pending: the drain is done once every other one is.
    let lowest_pending =
        format!("SELECT min(id) FROM {schema}.message WHERE id >= $1 AND retry_at IS NULL");
    let mut pending_from = 0i64;
    let unheld = format!("SELECT count(*) FROM {schema}.message WHERE retry_at IS NULL");
    let total: i64 = sqlx::query_scalar(&unheld).fetch_one(&pool).await?;
    anyhow::ensure!(total > 0, "nothing to drain");
    let rss_before_kb = proc_status_kb("self", "VmRSS");
    let cpu_before = cpu_seconds(std::process::id());
    let hwm_before_kb = proc_status_kb("self", "VmHWM");
    let started = Instant::now();
    let relay = Relay::start(pool.clone(), config)?;
    let deadline = started + Duration::from_secs(args.timeout_seconds);
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        match sqlx::query_scalar::<_, Option<i64>>(&lowest_pending)
            .bind(pending_from)
            .fetch_one(&pool)
            .await?
        {
            Some(id) => pending_from = id,
            None => break,
        }
        if Instant::now() > deadline {
            bail!("the drain did not finish within {}s", args.timeout_seconds);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let hwm_kb = proc_status_kb("self", "VmHWM");
    relay.shutdown().await?;
    let pending: i64 = sqlx::query_scalar(&unheld).fetch_one(&pool).await?;
    println!(
        "{}",
        json!({
            "seconds": seconds,
            "drained": total - pending,
            "pending": pending,
            "rss_before_kb": rss_before_kb,
            "hwm_before_kb": hwm_before_kb,
            "hwm_kb": hwm_kb,
            "cpu_seconds": cpu_seconds(std::process::id()).zip(cpu_before).map(|(a, b)| a - b),
            "hwm_after_shutdown_kb": proc_status_kb("self", "VmHWM"),
        })
    );
    Ok(())
}

#[derive(Debug, Clone)]
struct Drain {
    messages: f64,
    seconds: f64,
    hwm_mb: f64,
    rss_before_mb: f64,
    /// CPU seconds while draining: the relay's process, PostgreSQL, the Kafka broker.
    cpu: [f64; 3],
}

impl Drain {
    /// CPU microseconds per message: the relay's process, PostgreSQL, the broker, all three.
    fn cpu_per_message(&self) -> [f64; 4] {
        let us = |s: f64| 1e6 * s / self.messages;
        let [relay, postgres, kafka] = self.cpu;
        [
            us(relay),
            us(postgres),
            us(kafka),
            us(relay + postgres + kafka),
        ]
    }
}

impl Drain {
    fn rate(&self) -> f64 {
        self.messages / self.seconds
    }
}

/// Scenarios 1, 2 and 5.
pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let args = &ctx.args;
    let count = args.drain_messages;
    let raw_topic = ctx.topic("bench-raw").await;
    let drain_topic = ctx.topic("bench-drain").await;
    let stop_and_wait = ctx.batch_size();
    // Per round: each variant's rate, and the best of them.
    let mut raw_rounds: Vec<Vec<f64>> = Vec::new();
    let mut raw_cpu: Vec<Vec<f64>> = Vec::new();
    let mut raw = Vec::new();
    let mut drains: Vec<Vec<Drain>> = vec![Vec::new(); args.batch_sizes.len()];
    let mut fresh: Vec<Vec<Drain>> = vec![Vec::new(); args.fresh_messages.len()];
    let mut exactly_once: Vec<Drain> = Vec::new();
    let mut prefill_rates = Vec::new();
    let mut explains = json!({});
    for round in 0..args.rounds {
        let raw_first = round % 2 == 0;
        let label = format!("round {}/{}", round + 1, args.rounds);
        if raw_first {
            let (rates, cpu) = raw_round(ctx, &raw_topic, &label).await?;
            raw_rounds.push(rates);
            raw_cpu.push(cpu);
        }
        for (i, &batch_size) in args.batch_sizes.iter().enumerate() {
            prefill_rates.push(
                prefill(
                    ctx,
                    &ctx.schema,
                    Backlog::Vacuumed,
                    &drain_topic,
                    count,
                    &label,
                )
                .await?,
            );
            if round == 0 && i == 0 {
                explains = explain_backlog(ctx, &ctx.schema, batch_size).await?;
            }
            let drain = drain_in_child(
                ctx,
                &ctx.schema,
                batch_size,
                count,
                None,
                DrainVariant::default(),
                &label,
            )
            .await?;
            drains[i].push(drain);
            if args.drain_exactly_once && i == 0 {
                prefill(
                    ctx,
                    &ctx.schema,
                    Backlog::Vacuumed,
                    &drain_topic,
                    count,
                    &label,
                )
                .await?;
                let label = format!("exactly-once, {label}");
                let drain = drain_in_child(
                    ctx,
                    &ctx.schema,
                    batch_size,
                    count,
                    None,
                    DrainVariant {
                        exactly_once: true,
                        ..DrainVariant::default()
                    },
                    &label,
                )
                .await?;
                exactly_once.push(drain);
            }
        }
        for (i, &size) in args.fresh_messages.iter().enumerate() {
            let schema = fresh_schema(ctx).await?;
            let label = format!("fresh {size}, {label}");
            let drain = async {
                prefill(ctx, &schema, Backlog::Fresh, &drain_topic, size, &label).await?;
                drain_in_child(
                    ctx,
                    &schema,
                    ctx.batch_size(),
                    size,
                    None,
                    DrainVariant::default(),
                    &label,
                )
                .await
            }
            .await;
            drop_schema(ctx, &schema).await?;
            fresh[i].push(drain?);
        }
        if !raw_first {
            let (rates, cpu) = raw_round(ctx, &raw_topic, &label).await?;
            raw_rounds.push(rates);
            raw_cpu.push(cpu);
        }
        raw.push(raw_rounds[round].iter().copied().fold(0.0, f64::max));
        let mut line = format!(
            "{label}: raw {} msg/s (best {:.0})",
            raw_rounds[round]
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
            raw[round]
        );
        for (i, batch_size) in args.batch_sizes.iter().enumerate() {
            let d = &drains[i][round];
            line.push_str(&format!(
                ", drain(batch {batch_size}) {:.0} msg/s = {:.0}% of raw, peak RSS {:.1} MB",
                d.rate(),
                100.0 * d.rate() / raw[round],
                d.hwm_mb
            ));
        }
        if let Some(d) = exactly_once.get(round) {
            line.push_str(&format!(
                ", exactly-once {:.0} msg/s = {:.0}% of at-least-once",
                d.rate(),
                100.0 * d.rate() / drains[0][round].rate(),
            ));
        }
        for (i, size) in args.fresh_messages.iter().enumerate() {
            let d = &fresh[i][round];
            line.push_str(&format!(
                ", fresh {size}: {:.0} msg/s = {:.0}% of raw",
                d.rate(),
                100.0 * d.rate() / raw[round],
            ));
        }
        say(line);
    }

    let mut diagnostics = Vec::new();
    for &diagnostic in &args.drain_diagnostics {
        let backlog = if diagnostic == Diagnostic::Fresh {
            Backlog::Fresh
        } else {
            Backlog::Vacuumed
        };
        let schema = fresh_schema(ctx).await?;
        prefill(
            ctx,
            &schema,
            backlog,
            &drain_topic,
            count,
            diagnostic.label(),
        )
        .await?;
        let samples = Arc::new(ProfileSamples::default());
        let drain = drain_in_child(
            ctx,
            &schema,
            ctx.batch_size(),
            count,
            Some(samples.clone()),
            DrainVariant {
                diagnostic: Some(diagnostic),
                exactly_once: false,
            },
            diagnostic.label(),
        )
        .await;
        drop_schema(ctx, &schema).await?;
        let drain = drain?;
        say(format!(
            "diagnostic drain, {}: {:.0} msg/s",
            diagnostic.label(),
            drain.rate()
        ));
        let profile = samples.json(&drain, ctx.batch_size());
        diagnostics.push((diagnostic, drain, profile));
    }

    let mut report = ctx.report();
    let raw_spread = Spread::of(&raw);
    let mut raw_json = Vec::new();
    for (i, (name, _, overrides)) in raw_variants(ctx).into_iter().enumerate() {
        let rates: Vec<f64> = raw_rounds.iter().map(|r| r[i]).collect();
        let cpu: Vec<f64> = raw_cpu.iter().map(|r| r[i]).collect();
        report.row(
            "1 raw producer",
            &format!("throughput, {name}"),
            "msg/s",
            &rates,
        );
        report.row(
            "1 raw producer",
            &format!("CPU per message (producer + broker), {name}"),
            "µs",
            &cpu,
        );
        raw_json.push(json!({"variant": name, "overrides": overrides,
                             "rate": Spread::of(&rates).json(&rates),
                             "cpu_us_per_message": Spread::of(&cpu).json(&cpu)}));
    }
    report.row(
        "1 raw producer",
        "throughput, best variant of each round (the baseline)",
        "msg/s",
        &raw,
    );
    let mut details_drains = Vec::new();
    for (i, &batch_size) in args.batch_sizes.iter().enumerate() {
        let rates: Vec<f64> = drains[i].iter().map(Drain::rate).collect();
        let ratios: Vec<f64> = rates.iter().zip(&raw).map(|(d, r)| 100.0 * d / r).collect();
        let hwm: Vec<f64> = drains[i].iter().map(|d| d.hwm_mb).collect();
        let before: Vec<f64> = drains[i].iter().map(|d| d.rss_before_mb).collect();
        let scenario = format!("2 drain, batch {batch_size}");
        report.row(&scenario, "throughput", "msg/s", &rates);
        report.row(
            &scenario,
            "ratio to the best raw producer (same round)",
            "%",
            &ratios,
        );
        cpu_rows(&mut report, &scenario, &drains[i]);
        let memory = format!("5 memory, batch {batch_size}");
        report.row(
            &memory,
            "relay process peak RSS (VmHWM) while draining",
            "MB",
            &hwm,
        );
        report.row(&memory, "RSS before Relay::start", "MB", &before);
        let ratio = Spread::of(&ratios);
        let rate = Spread::of(&rates);
        report.target(
            &format!("vacuumed backlog drain >= 85% of the best raw producer (batch {batch_size})"),
            ">= 85%",
            format!(
                "{:.0}% (median of per-round ratios; {:.0}-{:.0}%); {:.0} vs {:.0} msg/s",
                ratio.median, ratio.min, ratio.max, rate.median, raw_spread.median
            ),
            ratio.median >= 85.0,
        );
        let peak = Spread::of(&hwm);
        report.target(
            &format!("relay peak RSS while draining (batch {batch_size})"),
            "< 100 MB",
            format!(
                "{:.1} MB max over {} drains of {count} messages",
                peak.max, peak.rounds
            ),
            peak.max < 100.0,
        );
        details_drains.push(json!({
            "batch_size": batch_size,
            "rate": rate.json(&rates),
            "ratio_to_raw_percent": ratio.json(&ratios),
            "peak_rss_mb": peak.json(&hwm),
            "rss_before_start_mb": Spread::of(&before).json(&before),
            "seconds": drains[i].iter().map(|d| d.seconds).collect::<Vec<_>>(),
        }));
    }
    let mut details_exactly_once = json!(null);
    if !exactly_once.is_empty() {
        let rates: Vec<f64> = exactly_once.iter().map(Drain::rate).collect();
        let at_least_once: Vec<f64> = drains[0].iter().map(Drain::rate).collect();
        let ratios: Vec<f64> = rates
            .iter()
            .zip(&at_least_once)
            .map(|(e, a)| 100.0 * e / a)
            .collect();
        let to_raw: Vec<f64> = rates.iter().zip(&raw).map(|(d, r)| 100.0 * d / r).collect();
        let scenario = format!(
            "2 drain, batch {}, exactly-once (a Kafka transaction per batch)",
            args.batch_sizes[0]
        );
        report.row(&scenario, "throughput", "msg/s", &rates);
        report.row(
            &scenario,
            "ratio to the at-least-once drain (same round)",
            "%",
            &ratios,
        );
        report.row(
            &scenario,
            "ratio to the best raw producer (same round)",
            "%",
            &to_raw,
        );
        cpu_rows(&mut report, &scenario, &exactly_once);
        let ratio = Spread::of(&ratios);
        report.target(
            "exactly-once drain >= 0.8x the at-least-once drain",
            ">= 80%",
            format!(
                "{:.0}% (median of per-round ratios; {:.0}-{:.0}%); {:.0} msg/s",
                ratio.median,
                ratio.min,
                ratio.max,
                Spread::of(&rates).median
            ),
            ratio.median >= 80.0,
        );
        details_exactly_once = json!({
            "batch_size": args.batch_sizes[0],
            "rate": Spread::of(&rates).json(&rates),
            "ratio_to_at_least_once_percent": ratio.json(&ratios),
            "ratio_to_raw_percent": Spread::of(&to_raw).json(&to_raw),
            "seconds": exactly_once.iter().map(|d| d.seconds).collect::<Vec<_>>(),
        });
    }
    let mut details_fresh = Vec::new();
    for (i, &size) in args.fresh_messages.iter().enumerate() {
        let rates: Vec<f64> = fresh[i].iter().map(Drain::rate).collect();
        let ratios: Vec<f64> = rates.iter().zip(&raw).map(|(d, r)| 100.0 * d / r).collect();
        let scenario = format!(
            "2 drain, batch {stop_and_wait}, {size} messages written just before the relay starts (no vacuum, no statistics)"
        );
        report.row(&scenario, "throughput", "msg/s", &rates);
        report.row(
            &scenario,
            "ratio to the best raw producer (same round)",
            "%",
            &ratios,
        );
        cpu_rows(&mut report, &scenario, &fresh[i]);
        let hwm: Vec<f64> = fresh[i].iter().map(|d| d.hwm_mb).collect();
        report.row(&scenario, "relay process peak RSS", "MB", &hwm);
        let ratio = Spread::of(&ratios);
        report.target(
            &format!("fresh backlog of {size} drains >= 85% of the best raw producer"),
            ">= 85%",
            format!(
                "{:.0}% ({:.0}-{:.0}%); {:.0} msg/s",
                ratio.median,
                ratio.min,
                ratio.max,
                Spread::of(&rates).median
            ),
            ratio.median >= 85.0,
        );
        details_fresh.push(json!({
            "messages": size,
            "rate": Spread::of(&rates).json(&rates),
            "ratio_to_raw_percent": ratio.json(&ratios),
            "peak_rss_mb": Spread::of(&hwm).json(&hwm),
            "seconds": fresh[i].iter().map(|d| d.seconds).collect::<Vec<_>>(),
        }));
    }
    if let (Some(small), Some(large)) = (details_fresh.first(), details_fresh.last()) {
        if details_fresh.len() > 1 {
            let rate = |d: &Value| d["rate"]["median"].as_f64().unwrap_or(f64::NAN);
            let flat = rate(large) / rate(small);
            report.target(
                "fresh backlogs: cost per message flat in the backlog's size",
                "largest drains >= 90% of the smallest's rate",
                format!(
                    "{} messages at {:.0}% of the rate of {}",
                    large["messages"],
                    100.0 * flat,
                    small["messages"]
                ),
                flat >= 0.9,
            );
        }
    }
    let scenario = format!(
        "2 drain: statements on the full backlog of {count}, before the relay starts (1 run)"
    );
    report.row(
        &scenario,
        &format!("relay's claim of {stop_and_wait}, as the relay runs it"),
        "ms",
        &[explains["claim"]["statement_ms"]
            .as_f64()
            .unwrap_or(f64::NAN)],
    );
    report.row(
        &scenario,
        "same, EXPLAIN ANALYZE execution time",
        "ms",
        &[explains["claim"]["execution_ms"]
            .as_f64()
            .unwrap_or(f64::NAN)],
    );
    report.row(
        &scenario,
        &format!(
            "completion of {stop_and_wait} (Completion::Keep: move to published), EXPLAIN ANALYZE"
        ),
        "ms",
        &[explains["complete_copy"]["execution_ms"]
            .as_f64()
            .unwrap_or(f64::NAN)],
    );
    for (diagnostic, drain, profile) in &diagnostics {
        let scenario = format!(
            "2 drain, batch {}, {} (diagnostic, 1 run)",
            ctx.batch_size(),
            diagnostic.label()
        );
        report.row(&scenario, "throughput", "msg/s", &[drain.rate()]);
        report.row(
            &scenario,
            "ratio to raw (median of rounds)",
            "%",
            &[100.0 * drain.rate() / raw_spread.median],
        );
        report.row(&scenario, "relay process peak RSS", "MB", &[drain.hwm_mb]);
        for (part, key) in [
            ("claim", "claim_ms_per_batch"),
            ("completion", "complete_ms_per_batch"),
            (
                "outside the database (publish + acks)",
                "outside_database_ms_per_batch",
            ),
        ] {
            report.row(
                &scenario,
                &format!("time per batch: {part} (pg_stat_activity samples)"),
                "ms",
                &[profile[key].as_f64().unwrap_or(f64::NAN)],
            );
        }
    }
    let diagnostics: Vec<Value> = diagnostics
        .iter()
.map(|(d, drain, profile)| {
            json!({"variant": d.label(), "rate": drain.rate(), "seconds": drain.seconds, "peak_rss_mb": drain.hwm_mb, "profile": profile})
        })
        .collect();
    report.detail(
        "raw_and_drain",
        json!({
            "messages": count,
            "payload_bytes": args.payload_bytes,
            "keys": args.keys,
            "partitions": args.partitions,
            "raw_best_rate": raw_spread.json(&raw),
            "raw_variants": raw_json,
            "stop_and_wait_batch": stop_and_wait,
            "drains": details_drains,
            "fresh_drains": details_fresh,
            "exactly_once_drains": details_exactly_once,
            "prefill_rate": Spread::of(&prefill_rates).json(&prefill_rates),
            "explain_on_full_backlog": explains,
            "diagnostic_drains": diagnostics,
        }),
    );
    Ok(())
}

/// The raw producer's variants, each measured in every round; the best of them in a round is
/// the baseline the drains of that round are compared with.
fn raw_variants(ctx: &Ctx) -> [(String, Option<usize>, Vec<String>); 3] {
    let stop_and_wait = ctx.batch_size();
    [
        ("queue kept full, the relay's settings".into(), None, vec![]),
        (
            format!("stop-and-wait batches of {stop_and_wait}, the relay's settings"),
            Some(stop_and_wait),
            vec![],
        ),
        (
            format!("queue kept full, tuned: {}", ctx.args.raw_tuned.join(", ")),
            None,
            ctx.args.raw_tuned.clone(),
        ),
    ]
}

/// One round of every raw variant; returns their rates in `raw_variants` order, and their CPU
/// per message (µs, the producing process and the broker together).
async fn raw_round(ctx: &Ctx, topic: &str, label: &str) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let count = ctx.args.drain_messages;
    let mut rates = Vec::new();
    let mut cpu = Vec::new();
    for (i, (_, batch, overrides)) in raw_variants(ctx).into_iter().enumerate() {
        let progress = bar(&format!("raw {} {label}", i + 1), count);
        let before = CpuSample::now(0);
        let elapsed = kafka::produce(
            &ctx.bootstrap,
            topic,
            (count, ctx.args.payload_bytes, ctx.args.keys),
            kafka::RawMode {
                batch,
                overrides: &overrides,
            },
            &progress,
        )
        .await?;
        progress.finish_and_clear();
        let after = CpuSample::now(0);
        rates.push(count as f64 / elapsed.as_secs_f64());
        cpu.push(1e6 * (after.bench - before.bench + after.kafka - before.kafka) / count as f64);
    }
    Ok((rates, cpu))
}

/// How a drained backlog was left before the relay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backlog {
    /// Vacuumed, analyzed and checkpointed: a backlog that sat long enough for autovacuum.
    Vacuumed,
    /// Written just before the relay starts into a table never analyzed, no maintenance: what a
    /// relay meets coming back after an outage or a deploy (no statistics, no visibility map,
    /// hint bits unset).
    Fresh,
}

/// Empties the outbox of `schema` and fills it with `count` messages, `prefill_chunk` per
/// transaction; a `Vacuumed` backlog is then vacuumed, analyzed and checkpointed, so that every
/// such drain starts from the same state. Returns the fill rate.
async fn prefill(
    ctx: &Ctx,
    schema: &SchemaName,
    backlog: Backlog,
    topic: &str,
    count: u64,
    label: &str,
) -> anyhow::Result<f64> {
    let outbox = Outbox::new(OutboxConfig::default().schema(schema.clone()));
    sqlx::raw_sql(&format!("TRUNCATE {schema}.message"))
        .execute(&ctx.pool)
        .await?;
    let progress = bar(&format!("prefill {label}"), count);
    let started = Instant::now();
    let chunk = ctx.args.prefill_chunk.max(1) as u64;
    // Two transactions at a time (there are two cores); the order of sequences across chunks
    // does not matter to the drain.
    let mut tasks = tokio::task::JoinSet::new();
    let mut next = 0;
    while next < count || !tasks.is_empty() {
        while next < count && tasks.len() < 2 {
            let end = (next + chunk).min(count);
            let (pool, outbox, topic) = (ctx.pool.clone(), outbox.clone(), topic.to_owned());
            let (payload_bytes, keys) = (ctx.args.payload_bytes, ctx.args.keys);
            tasks.spawn(async move {
                let messages = (next..end).map(|n| {
                    Message::new(topic.as_str(), payload(payload_bytes, 0, 0, n)).key(key(n, keys))
                });
                let mut tx = pool.begin().await?;
                outbox.save_all_for_publishing(&mut tx, messages).await?;
                tx.commit().await?;
                anyhow::Ok(end - next)
            });
            next = end;
        }
        if let Some(done) = tasks.join_next().await {
            progress.inc(done??);
        }
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    if backlog == Backlog::Vacuumed {
        progress.set_message("vacuum, checkpoint");
        sqlx::raw_sql(&format!("VACUUM (ANALYZE) {schema}.message"))
            .execute(&ctx.pool)
            .await?;
        sqlx::raw_sql("CHECKPOINT").execute(&ctx.pool).await?;
    }
    progress.finish_and_clear();
    Ok(rate)
}

/// Rows of CPU per message for a set of drains.
fn cpu_rows(report: &mut crate::report::Report, scenario: &str, drains: &[Drain]) {
    for (i, part) in [
        "relay process",
        "PostgreSQL (all its processes)",
        "Kafka broker",
        "all three",
    ]
    .iter()
    .enumerate()
    {
        let values: Vec<f64> = drains.iter().map(|d| d.cpu_per_message()[i]).collect();
        report.row(scenario, &format!("CPU per message, {part}"), "µs", &values);
    }
}

/// A new schema, migrated, for a backlog of its own: never analyzed.
async fn fresh_schema(ctx: &Ctx) -> anyhow::Result<SchemaName> {
    let schema = SchemaName::new(format!("bench_{}", outbox_test_support::short_id()))?;
    Outbox::new(OutboxConfig::default().schema(schema.clone()))
        .migrate(&ctx.pool)
        .await?;
    Ok(schema)
}

async fn drop_schema(ctx: &Ctx, schema: &SchemaName) -> anyhow::Result<()> {
    sqlx::raw_sql(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&ctx.pool)
        .await?;
    Ok(())
}

/// How a drain's relay differs from the default.
#[derive(Debug, Clone, Copy, Default)]
struct DrainVariant {
    diagnostic: Option<Diagnostic>,
    exactly_once: bool,
}

/// Runs the drain in a child process (this binary, `drain-child`) and reads its result.
async fn drain_in_child(
    ctx: &Ctx,
    schema: &SchemaName,
    batch_size: usize,
    count: u64,
    profile: Option<Arc<ProfileSamples>>,
    variant: DrainVariant,
    label: &str,
) -> anyhow::Result<Drain> {
    let DrainVariant {
        diagnostic,
        exactly_once,
    } = variant;
    let exe = std::env::current_exe().context("locate the bench binary")?;
    let updated_sql = "SELECT coalesce(sum(n_tup_upd + n_tup_del), 0)::bigint FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'message'";
    let updated_before: i64 = sqlx::query_scalar(updated_sql)
        .bind(schema.as_str())
        .fetch_one(&ctx.pool)
        .await?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("drain-child")
        .arg("--schema")
        .arg(schema.as_str())
        .arg("--batch-size")
        .arg(batch_size.to_string());
    for item in &ctx.args.relay_kafka {
        command.arg("--relay-kafka").arg(item);
    }
    if exactly_once {
        command.arg("--exactly-once");
    }
    if let Some(diagnostic) = diagnostic {
        command.arg("--diagnostic").arg(
            diagnostic
                .to_possible_value()
                .expect("not skipped")
                .get_name(),
        );
    }
    let before = CpuSample::now(0);
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("start the drain child process")?;
    let progress = bar(&format!("drain b={batch_size} {label}"), count);
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = profile.clone().map(|samples| {
        let schema = schema.clone();
        let stop = stop.clone();
        tokio::spawn(async move { samples.sample(schema, stop).await })
    });
    let output = child.wait_with_output();
    tokio::pin!(output);
    let output = loop {
        tokio::select! {
            output = &mut output => break output?,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                // Table statistics lag by up to a second: for the progress bar only.
                if let Ok(updated) = sqlx::query_scalar::<_, i64>(updated_sql)
                    .bind(schema.as_str())
                    .fetch_one(&ctx.pool)
                    .await
                {
                    progress.set_position((updated - updated_before).max(0) as u64);
                }
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    if let Some(sampler) = sampler {
        sampler.await??;
    }
    progress.finish_and_clear();
    if !output.status.success() {
        bail!("the drain child failed: {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the drain child printed no result")?;
    let result: Value = serde_json::from_str(line)?;
    let drained = result["drained"].as_f64().unwrap_or(0.0);
    anyhow::ensure!(
        result["pending"].as_i64() == Some(0)
            && (drained >= count as f64 || diagnostic == Some(Diagnostic::HeldKeys)),
        "the drain child left messages pending: {line}"
    );
    let mb = |key: &str| result[key].as_f64().unwrap_or(f64::NAN) / 1024.0;
    Ok(Drain {
        messages: count as f64,
        seconds: result["seconds"].as_f64().unwrap_or(f64::NAN),
        hwm_mb: mb("hwm_kb"),
        rss_before_mb: mb("rss_before_kb"),
        cpu: {
            let after = CpuSample::now(0);
            [
                result["cpu_seconds"].as_f64().unwrap_or(f64::NAN),
                after.postgres - before.postgres,
                after.kafka - before.kafka,
            ]
        },
    })
}

/// Samples `pg_stat_activity` every 10 ms during a drain: which of the relay's statements is
/// running, if any. A sample with neither the claim nor the completion running is time the
/// pipeline spends outside the database: publishing to Kafka and waiting for acknowledgements.
#[derive(Debug, Default)]
struct ProfileSamples {
    counts: std::sync::Mutex<[u64; 4]>,
}

impl ProfileSamples {
    async fn sample(&self, schema: SchemaName, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&outbox_test_support::database_url()).await?;
        // The claim and the completion are recognised by their leading CTEs.
        let sql = "SELECT coalesce(bool_or(query LIKE 'WITH lease AS%'), false),
                          coalesce(bool_or(query LIKE 'WITH fence AS%'), false),
                          count(*)
                     FROM pg_stat_activity
                    WHERE state = 'active' AND pid <> pg_backend_pid()
                      AND datname = current_database()
                      AND query LIKE '%' || $1 || '.message%'
                      AND query NOT LIKE 'SELECT EXISTS%'";
        let mut started = false;
        while !stop.load(Ordering::Relaxed) {
            let (claim, complete, _active): (bool, bool, i64) = sqlx::query_as(sql)
                .bind(schema.as_str())
                .fetch_one(&mut conn)
                .await?;
            started |= claim || complete;
            if started {
                let mut counts = self.counts.lock().expect("counts");
                counts[0] += 1;
                counts[1] += u64::from(claim);
                counts[2] += u64::from(complete);
                counts[3] += u64::from(!claim && !complete);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn json(&self, drain: &Drain, batch_size: usize) -> Value {
        let counts = *self.counts.lock().expect("counts");
        let total = counts[0].max(1) as f64;
        let batches = (drain.messages / batch_size as f64).ceil();
        let per_batch_ms = |n: u64| 1000.0 * drain.seconds * (n as f64 / total) / batches;
        json!({
            "note": "pg_stat_activity sampled every 10 ms during a diagnostic drain",
            "drain_rate_while_sampled": drain.rate(),
            "samples": counts[0],
            "claim_fraction": counts[1] as f64 / total,
            "complete_fraction": counts[2] as f64 / total,
            "outside_database_fraction": counts[3] as f64 / total,
            "batches": batches,
            "claim_ms_per_batch": per_batch_ms(counts[1]),
            "complete_ms_per_batch": per_batch_ms(counts[2]),
            "outside_database_ms_per_batch": per_batch_ms(counts[3]),
        })
    }
}

/// The relay's claim on the full backlog, before the relay starts (see
/// `outbox_kafka_relay::diagnostics`): timed, and EXPLAINed.
pub(crate) async fn explain_backlog(
    ctx: &Ctx,
    schema: &SchemaName,
    batch_size: usize,
) -> anyhow::Result<Value> {
    let lease = ctx.relay_config(batch_size).lease_name;
    Ok(json!({"claim": explain_claim(schema, &lease, batch_size).await?}))
}

/// The relay's claim under lease `lease`, run once (timed) and EXPLAINed, as JSON.
pub(crate) async fn explain_claim(
    schema: &SchemaName,
    lease: &str,
    batch_size: usize,
) -> anyhow::Result<Value> {
    let mut conn = sqlx::PgConnection::connect(&outbox_test_support::database_url()).await?;
    let explain = diagnostics::explain_claim(&mut conn, schema, lease, batch_size).await?;
    let statement_ms = explain.run.elapsed.as_secs_f64() * 1000.0;
    Ok(match explain.plan {
        Ok(plan) => json!({
            "statement_ms": statement_ms, "rows": explain.run.rows,
            "execution_ms": execution_ms(&plan), "plan": plan, "sql": explain.sql,
        }),
        Err(error) => json!({
            "statement_ms": statement_ms, "rows": explain.run.rows,
            "explain_error": error, "sql": explain.sql,
        }),
    })
}

fn execution_ms(plan: &[String]) -> Option<f64> {
    plan.iter().find_map(|line| {
        line.trim()
            .strip_prefix("Execution Time:")?
            .trim()
            .strip_suffix("ms")?
            .trim()
            .parse()
            .ok()
    })
}
