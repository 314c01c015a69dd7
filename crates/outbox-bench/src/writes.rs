//! Writers, and the scenarios about them: 4 (the write path: business transaction alone, with an
//! enqueued message, and the naive dual write) and 6 (writers with the relay running, with and
//! without the wake-up NOTIFY).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use indicatif::ProgressBar;
use outbox::{Message, Outbox};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::report::Report;
use crate::util::{
    histogram, histogram_json, key, now_micros, payload, quantile_ms, record, say, spinner, Spread,
};
use crate::{kafka, Ctx};

/// What one writer transaction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Insert one business row and commit.
    Business,
    /// As `Enqueue`, with the insert trigger (wake-up NOTIFY, transaction id for the claim floor)
    /// disabled, to split the enqueue's cost. Only while no relay runs.
    EnqueueNoTrigger,
    /// Insert one business row, enqueue one message (`save_for_publishing`), commit.
    Enqueue,
    /// Insert one business row, commit, then send the message to Kafka and await its ack.
    DualWrite,
    /// The business insert and the message in one statement (`execute_and_save`), commit.
    EnqueueInStatement,
    /// Enqueue one message alone and commit.
    MessageOnly,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Business => "business tx alone",
            Op::Enqueue => "business tx + enqueue",
            Op::EnqueueNoTrigger => "business tx + enqueue, insert trigger off",
            Op::DualWrite => "naive dual write",
            Op::EnqueueInStatement => "business tx + enqueue in the same statement",
            Op::MessageOnly => "enqueue alone",
        }
    }
}

/// Everything a writer needs.
#[derive(Clone)]
pub(crate) struct Writes {
    pool: PgPool,
    outbox: Outbox,
    producer: Option<FutureProducer>,
    topic: String,
    business_sql: String,
    business_returning_sql: String,
    payload_bytes: usize,
    keys: usize,
}

impl Writes {
    pub(crate) fn new(ctx: &Ctx, topic: &str, producer: Option<FutureProducer>) -> Arc<Writes> {
        Arc::new(Writes {
            pool: ctx.pool.clone(),
            outbox: ctx.outbox.clone(),
            producer,
            topic: topic.to_owned(),
            business_sql: format!(
                "INSERT INTO {}.business (account, amount, note) VALUES ($1, $2, $3)",
                ctx.schema
            ),
            business_returning_sql: format!(
                "INSERT INTO {}.business (account, amount, note) VALUES ($1, $2, $3) RETURNING id",
                ctx.schema
            ),
            payload_bytes: ctx.args.payload_bytes,
            keys: ctx.args.keys,
        })
    }

    /// One transaction of `op` for message number `n`, whose payload carries `sent_us` and
    /// `phase`. Returns the message's sequence when one was enqueued.
    pub(crate) async fn execute(
        &self,
        op: Op,
        n: u64,
        phase: u16,
        sent_us: u64,
    ) -> anyhow::Result<Option<i64>> {
        let value = payload(self.payload_bytes, sent_us, phase, n);
        let key = key(n, self.keys);
        let mut tx = self.pool.begin().await?;
        let business = |sql| {
            sqlx::query(sql)
                .bind((n % 10_000) as i32)
                .bind(n as i64)
                .bind("an order line, as a service would store it, of a modest size")
        };
        let message = || Message::new(self.topic.as_str(), value.clone()).key(key.as_str());
        if !matches!(op, Op::MessageOnly | Op::EnqueueInStatement) {
            business(&self.business_sql).execute(&mut *tx).await?;
        }
        let sequence = match op {
            Op::Enqueue | Op::EnqueueNoTrigger | Op::MessageOnly => {
                Some(self.outbox.save_for_publishing(&mut tx, message()).await?)
            }
            Op::EnqueueInStatement => {
                let statement = business(&self.business_returning_sql);
                let sequence = self
                    .outbox
                    .execute_and_save(&mut tx, statement, message())
                    .await?;
                Some(sequence.context("the business insert returned no row")?)
            }
            Op::Business | Op::DualWrite => None,
        };
        tx.commit().await?;
        if op == Op::DualWrite {
            let producer = self.producer.as_ref().context("no producer")?;
            let headers = kafka::wire_headers(n as i64);
            let record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.topic)
                .key(key.as_str())
                .payload(&value[..])
                .headers(headers);
            producer
                .send(record, Timeout::Never)
                .await
                .map_err(|(error, _)| error)
                .context("dual write: Kafka send")?;
        }
        Ok(sequence)
    }
}

/// What a closed loop of writers achieved.
pub(crate) struct LoopResult {
    pub(crate) count: u64,
    pub(crate) seconds: f64,
    pub(crate) latency: Histogram<u64>,
}

impl LoopResult {
    pub(crate) fn rate(&self) -> f64 {
        self.count as f64 / self.seconds
    }
}

/// `concurrency` writers doing `op` back to back for `duration`.
pub(crate) async fn closed_loop(
    writes: &Arc<Writes>,
    op: Op,
    concurrency: usize,
    duration: Duration,
    progress: &ProgressBar,
) -> anyhow::Result<LoopResult> {
    let started = Instant::now();
    let end = started + duration;
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (writes, counter, progress) = (writes.clone(), counter.clone(), progress.clone());
        tasks.spawn(async move {
            let mut latency = histogram();
            let mut count = 0u64;
            while Instant::now() < end {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                writes.execute(op, n, 0, now_micros()).await?;
                record(&mut latency, t0.elapsed());
                count += 1;
                progress.inc(1);
            }
            anyhow::Ok((count, latency))
        });
    }
    let mut result = LoopResult {
        count: 0,
        seconds: 0.0,
        latency: histogram(),
    };
    while let Some(joined) = tasks.join_next().await {
        let (count, latency) = joined??;
        result.count += count;
        result.latency.add(latency).expect("same bounds");
    }
    result.seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

/// Scenario 4: the write path, side by side, at each concurrency level, variants rotated within
/// every round. No relay runs: this is the cost to the writer alone.
pub(crate) async fn write_path(ctx: &Ctx) -> anyhow::Result<()> {
    let args = &ctx.args;
    let topic = ctx.topic("bench-write").await;
    let producer = kafka::producer(&ctx.bootstrap, &[])?;
    // Warm the producer (metadata, idempotent producer id) before anything is timed.
    producer
        .send(
            FutureRecord::<str, str>::to(&topic)
                .key("warm")
                .payload("up"),
            Timeout::Never,
        )
        .await
        .map_err(|(error, _)| error)?;
    let all_writes = Writes::new(ctx, &topic, Some(producer));
    // Indexed below: 0 business, 1 enqueue, 2 dual write, 3 trigger off, 4 same statement.
    let ops = [
        Op::Business,
        Op::Enqueue,
        Op::DualWrite,
        Op::EnqueueNoTrigger,
        Op::EnqueueInStatement,
    ];
    let duration = Duration::from_secs(args.write_seconds);
    let mut details = Vec::new();
    for &concurrency in &args.write_concurrency {
        // A pool sized to the concurrency, as a service sizes its pool. The bench's shared pool
        // (36 connections) hands a lone writer a different backend every time (sqlx queues idle
        // connections first in, first out), and on cache-cold backends the message insert cost
        // three times as much as on a warm one (docs/performance.md). One spare connection: a
        // released connection goes back to the pool in a task of its own, which the next
        // transaction would otherwise wait for.
        let pool = PgPoolOptions::new()
            .max_connections(concurrency as u32 + 1)
            .test_before_acquire(false)
            .connect(&outbox_test_support::database_url())
            .await?;
        let writes = Arc::new(Writes {
            pool,
            ..(*all_writes).clone()
        });
        let progress = spinner(&format!("write path c={concurrency}"));
        // Not the trigger-off variant: it needs the trigger toggled, and warms nothing new.
        for op in ops.into_iter().filter(|&op| op != Op::EnqueueNoTrigger) {
            progress.set_message(format!("warm-up: {}", op.name()));
            closed_loop(
                &writes,
                op,
                concurrency,
                Duration::from_millis(500),
                &progress,
            )
            .await?;
        }
        // [op][round] -> (rate, p50, p99)
        let mut figures: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); ops.len()];
        let mut histograms: Vec<Value> = Vec::new();
        for round in 0..args.rounds {
            for k in 0..ops.len() {
                let i = (round + k) % ops.len();
                progress.set_message(format!("round {}: {}", round + 1, ops[i].name()));
                if ops[i] == Op::EnqueueNoTrigger {
                    set_insert_trigger(ctx, false).await?;
                }
                let result = closed_loop(&writes, ops[i], concurrency, duration, &progress).await;
                if ops[i] == Op::EnqueueNoTrigger {
                    set_insert_trigger(ctx, true).await?;
                }
                let result = result?;
                figures[i].push((
                    result.rate(),
                    quantile_ms(&result.latency, 0.5),
                    quantile_ms(&result.latency, 0.99),
                ));
                histograms.push(json!({
                    "round": round + 1, "op": ops[i].name(),
                    "rate": result.rate(), "latency": histogram_json(&result.latency),
                }));
            }
        }
        progress.finish_and_clear();
        writes.pool.close().await;
        let scenario = format!("4 write path, {concurrency} writer(s)");
        let mut report = ctx.report();
        for (i, op) in ops.iter().enumerate() {
            let rates: Vec<f64> = figures[i].iter().map(|f| f.0).collect();
            let p50: Vec<f64> = figures[i].iter().map(|f| f.1).collect();
            let p99: Vec<f64> = figures[i].iter().map(|f| f.2).collect();
            report.row(
                &scenario,
                &format!("{}: throughput", op.name()),
                "tx/s",
                &rates,
            );
            report.row(
                &scenario,
                &format!("{}: latency p50", op.name()),
                "ms",
                &p50,
            );
            report.row(
                &scenario,
                &format!("{}: latency p99", op.name()),
                "ms",
                &p99,
            );
        }
        // Same-round ratios of variants a and b.
        let per_round = |a: usize, b: usize, f: fn(&(f64, f64, f64)) -> f64| -> Vec<f64> {
            figures[a]
                .iter()
                .zip(&figures[b])
                .map(|(x, y)| f(x) / f(y))
                .collect()
        };
        // A variant's cost over the business transaction alone (variant 0), per round, in
        // percent: throughput, then p50 latency.
        let cost = |variant: usize| -> (Vec<f64>, Vec<f64>) {
            let percent = |ratio: f64| 100.0 * (ratio - 1.0);
            (
                per_round(0, variant, |f| f.0)
                    .into_iter()
                    .map(percent)
                    .collect(),
                per_round(variant, 0, |f| f.1)
                    .into_iter()
                    .map(percent)
                    .collect(),
            )
        };
        let overhead_target =
            |report: &mut Report, name: &str, (tps, p50): &(Vec<f64>, Vec<f64>)| {
                let (tps, p50) = (Spread::of(tps), Spread::of(p50));
                report.target(
                    &format!("{name}, {concurrency} writer(s)"),
                    "<= 25%",
                    format!(
                    "throughput cost {:.0}% ({:.0}..{:.0}), p50 latency cost {:.0}% ({:.0}..{:.0})",
                    tps.median, tps.min, tps.max, p50.median, p50.min, p50.max
                ),
                    tps.median <= 25.0 && p50.median <= 25.0,
                );
            };
        // The enqueue's cost without its trigger, to split the overhead.
        report.row(
            &scenario,
            "enqueue cost with the insert trigger off: business tx/s ÷ enqueue tx/s − 1",
            "%",
            &cost(3).0,
        );
        let enqueue = cost(1);
        let vs_dual_tps = per_round(1, 2, |f| f.0);
        let vs_dual_p50 = per_round(1, 2, |f| f.1);
        report.row(
            &scenario,
            "enqueue cost: business tx/s ÷ enqueue tx/s − 1",
            "%",
            &enqueue.0,
        );
        report.row(
            &scenario,
            "enqueue cost: enqueue p50 ÷ business p50 − 1",
            "%",
            &enqueue.1,
        );
        report.row(
            &scenario,
            "enqueue tx/s ÷ dual-write tx/s",
            "x",
            &vs_dual_tps,
        );
        report.row(&scenario, "enqueue p50 ÷ dual-write p50", "x", &vs_dual_p50);
        overhead_target(&mut report, "enqueue overhead over business tx", &enqueue);
        // The same, with the message saved by the business statement itself (one round trip).
        let in_statement = cost(4);
        report.row(
            &scenario,
            "enqueue in the same statement, cost: business tx/s ÷ its tx/s − 1",
            "%",
            &in_statement.0,
        );
        report.row(
            &scenario,
            "enqueue in the same statement, cost: its p50 ÷ business p50 − 1",
            "%",
            &in_statement.1,
        );
        overhead_target(
            &mut report,
            "enqueue overhead over business tx, in the same statement (execute_and_save)",
            &in_statement,
        );
        let (dual_tps, dual_p50) = (Spread::of(&vs_dual_tps), Spread::of(&vs_dual_p50));
        report.target(
            &format!("enqueue beats the naive dual write, {concurrency} writer(s)"),
            "more tx/s and lower p50",
            format!(
                "{:.2}x the dual write's tx/s, {:.2}x its p50 latency",
                dual_tps.median, dual_p50.median
            ),
            dual_tps.median > 1.0 && dual_p50.median < 1.0,
        );
        details.push(json!({"concurrency": concurrency, "runs": histograms}));
    }
    ctx.report().detail(
        "write_path",
        json!({"seconds_per_run": args.write_seconds, "relay_running": false, "levels": details}),
    );
    Ok(())
}

/// Scenario 6: commit rate of concurrent single-message writers with the relay running, with and
/// without the NOTIFY trigger (disabled in the bench schema only), alternating order per round.
/// The relay drains what the writers left before the next run.
pub(crate) async fn notify(ctx: &Ctx) -> anyhow::Result<()> {
    let args = &ctx.args;
    let topic = ctx.topic("bench-notify").await;
    let writes = Writes::new(ctx, &topic, None);
    let relay = ctx.start_relay(ctx.batch_size()).await?;
    let writers = args.notify_writers;
    let duration = Duration::from_secs(args.notify_seconds);
    let progress = spinner(&format!("notify {writers} writers"));
    progress.set_message("warm-up");
    closed_loop(
        &writes,
        Op::MessageOnly,
        writers,
        Duration::from_secs(1),
        &progress,
    )
    .await?;
    ctx.wait_drained(Duration::from_secs(120)).await?;
    // [with, without][round] -> (rate, p50, p99, backlog at end, seconds to drain it)
    let mut figures: [Vec<[f64; 5]>; 2] = [Vec::new(), Vec::new()];
    for round in 0..args.rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for with_notify in order {
            progress.set_message(format!(
                "round {}: {} NOTIFY",
                round + 1,
                if with_notify { "with" } else { "without" }
            ));
            let wake_up = if with_notify {
                None
            } else {
                Some(stop_notifying(ctx).await?)
            };
            let result = closed_loop(&writes, Op::MessageOnly, writers, duration, &progress).await;
            if let Some(definition) = wake_up {
                sqlx::raw_sql(&definition).execute(&ctx.pool).await?;
            }
            let result = result?;
            let backlog = ctx.pending().await? as f64;
            let drain_started = Instant::now();
            let drained = ctx.wait_drained(Duration::from_secs(120)).await?;
            anyhow::ensure!(
                drained,
                "the relay did not drain the NOTIFY scenario's backlog"
            );
            figures[usize::from(!with_notify)].push([
                result.rate(),
                quantile_ms(&result.latency, 0.5),
                quantile_ms(&result.latency, 0.99),
                backlog,
                drain_started.elapsed().as_secs_f64(),
            ]);
        }
    }
    progress.finish_and_clear();
    relay.shutdown().await?;
    let scenario = format!("6 {writers} writers, relay running");
    let mut report = ctx.report();
    let mut details = serde_json::Map::new();
    for (i, label) in ["with NOTIFY", "without NOTIFY"].iter().enumerate() {
        let column = |k: usize| -> Vec<f64> { figures[i].iter().map(|f| f[k]).collect() };
        let (rates, p50, p99, backlog, drain) =
            (column(0), column(1), column(2), column(3), column(4));
        report.row(&scenario, &format!("{label}: commit rate"), "tx/s", &rates);
        report.row(
            &scenario,
            &format!("{label}: commit latency p50"),
            "ms",
            &p50,
        );
        report.row(
            &scenario,
            &format!("{label}: commit latency p99"),
            "ms",
            &p99,
        );
        report.row(
            &scenario,
            &format!("{label}: backlog when writers stop"),
            "msgs",
            &backlog,
        );
        details.insert(
            (*label).to_owned(),
            json!({
                "rate": Spread::of(&rates).json(&rates),
                "p50_ms": p50, "p99_ms": p99,
                "backlog_at_stop": backlog, "seconds_to_drain_backlog": drain,
            }),
        );
    }
    let ratio: Vec<f64> = figures[1]
        .iter()
        .zip(&figures[0])
        .map(|(without, with)| without[0] / with[0])
        .collect();
    report.row(
        &scenario,
        "commit rate without ÷ with NOTIFY (same round)",
        "x",
        &ratio,
    );
    details.insert("ratio_without_over_with".into(), json!(ratio));
    details.insert("seconds_per_run".into(), json!(args.notify_seconds));
    details.insert("writers".into(), json!(writers));
    report.detail("notify", Value::Object(details));
    say(format!(
        "notify: with {:.0} tx/s, without {:.0} tx/s",
        Spread::of(&figures[0].iter().map(|f| f[0]).collect::<Vec<_>>()).median,
        Spread::of(&figures[1].iter().map(|f| f[0]).collect::<Vec<_>>()).median
    ));
    Ok(())
}

/// Replaces the bench schema's insert trigger function with one that does all it does except
/// NOTIFY (it still takes the transaction id, which the relay's claim floor needs, so the relay
/// stays correct). Returns the original definition, to be executed to restore it.
async fn stop_notifying(ctx: &Ctx) -> anyhow::Result<String> {
    let function = format!("{}.notify_message", ctx.schema);
    let (definition,): (String,) = sqlx::query_as("SELECT pg_get_functiondef(to_regproc($1))")
        .bind(&function)
        .fetch_one(&ctx.pool)
        .await?;
    anyhow::ensure!(
        definition.contains("pg_current_xact_id()") && definition.contains("pg_notify("),
        "{function} is not the wake-up trigger this bench knows"
    );
    sqlx::raw_sql(&format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_current_xact_id();
             RETURN NULL;
         END
         $$"
    ))
    .execute(&ctx.pool)
    .await?;
    Ok(definition)
}

/// Enables or disables the insert trigger of the bench schema's outbox table. Only while no relay
/// runs: the relay's claim floor relies on it.
async fn set_insert_trigger(ctx: &Ctx, enable: bool) -> anyhow::Result<()> {
    sqlx::query(&format!(
        "ALTER TABLE {}.message {} TRIGGER message_notify",
        ctx.schema,
        if enable { "ENABLE" } else { "DISABLE" }
    ))
    .execute(&ctx.pool)
    .await?;
    Ok(())
}
