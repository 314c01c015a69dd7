//! Scenario 8: steady traffic as a service in another language produces it. Writer processes
//! (this binary, `writer-child`, see `children.rs`) each hold one connection and call `outbox.enqueue` in a
//! transaction of its own per message, at a fixed offered rate; the relay is the `outbox relay`
//! daemon with its defaults, in its own process; a consumer thread in the bench process reads
//! the topic. Every process's CPU is read from `/proc` (PostgreSQL's as the sum over its
//! processes), so that the relay's cost per message is the one an operator sees.
//!
//! Latency is commit → consumer receipt: each writer notes when its commit returned, by
//! sequence, and the consumer when it polled the record.
//!
//! The baselines, in the same rounds: the same messages produced straight to Kafka, with the
//! relay's producer settings and `linger.ms` at the relay's `batch_linger`, no database, no
//! writers and no relay (see `children.rs`): by one process handing over each message as it
//! becomes due (a service producing in its request handler); by as many such processes as
//! there are writers (the services producing directly, each with its own producer); and by one
//! process handing over what is due every `batch_linger` (batches, as the relay hands them over:
//! what librdkafka spends on this traffic when fed as the relay feeds it). Their latency is from
//! when a message became due to the consumer. Their CPU is counted from the start of their loop
//! to their last acknowledgement; the relay's from before the writers start until the consumer
//! has every message (its idle time included). And the writers alone, no relay and
//! no consumer (the table emptied after each phase): the rate and the PostgreSQL CPU they reach
//! without a relay, so that what the relay costs them is measured, not guessed.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde_json::json;
use tokio::process::Child;

use crate::children::{
    daemon_beside_bench, kafka_override_env, Daemon, Produce, WriterLine, WriterSpec,
};
use crate::kafka::ConsumerThread;
use crate::util::{histogram, histogram_json, quantile_ms, say, CpuSample, Spread};
use crate::Ctx;

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

async fn start_daemon(ctx: &Ctx, variant: Variant) -> anyhow::Result<Daemon> {
    let mut env = kafka_override_env(&ctx.args.relay_kafka);
    env.push((
        "OUTBOX_BATCH_LINGER_MS".to_owned(),
        variant.linger_ms.to_string(),
    ));
    env.push((
        "OUTBOX_WAIT_FOR_STANDBYS".to_owned(),
        variant.wait_for_standbys.to_string(),
    ));
    if let Some(delivery) = variant.delivery {
        env.push(("OUTBOX_DELIVERY".to_owned(), delivery.to_owned()));
        env.push((
            "OUTBOX_PROGRESS_TOPIC".to_owned(),
            format!("bench-progress-{}", ctx.schema),
        ));
    }
    Daemon::start(
        &daemon_beside_bench()?,
        &ctx.pool,
        &ctx.bootstrap,
        &ctx.schema,
        &env,
    )
    .await
}

/// Runs `writers` writer processes offering `rate` in total for `seconds`, with `relay` running
/// (or, producing, with none); with neither, the writers alone, whose messages nobody reads.
async fn phase(
    ctx: &Ctx,
    (topic, consumer): (&str, &ConsumerThread),
    relay: Option<&Daemon>,
    (rate, id, first): (f64, u16, u64),
    writers: usize,
    produce: Option<Produce<'_>>,
) -> anyhow::Result<Phase> {
    let args = &ctx.args;
    let seconds = args.steady_seconds as f64;
    let expected = consumer.distinct();
    let relay_pid = relay.map_or(0, Daemon::pid);
    let before = CpuSample::now(relay_pid);
    let mut children = Vec::new();
    for w in 0..writers {
        let spec = WriterSpec {
            schema: &ctx.schema,
            topic,
            rate: rate / writers as f64,
            seconds,
            payload_bytes: args.payload_bytes,
            keys: args.keys,
            first: first + w as u64 * 10_000_000,
            phase: id,
            produce,
        };
        children.push(spec.spawn()?);
    }
    let mut commits = Vec::new();
    let mut writer_seconds: f64 = 0.0;
    let mut writers_cpu = 0.0;
    // Every writer's output is read while they run: one whose pipe is not read blocks on its
    // next flush (a pipe holds 64 KiB, about 2,500 lines) and falls behind its schedule. A
    // stalled broker or database must not hang the bench.
    let deadline = Duration::from_secs_f64(seconds) + Duration::from_secs(120);
    let outputs = tokio::time::timeout(
        deadline,
        futures::future::join_all(children.into_iter().map(Child::wait_with_output)),
    )
    .await
    .context("the writers did not finish within 120 s of their end")?;
    for output in outputs {
        let output = output?;
        anyhow::ensure!(
            output.status.success(),
            "a writer failed: {}",
            output.status
        );
        let mut totals = None;
        for line in String::from_utf8(output.stdout)?.lines() {
            match WriterLine::parse(line)? {
                WriterLine::Commit(sequence, at) => commits.push((sequence, at)),
                WriterLine::Totals(t) => totals = Some(t),
            }
        }
        let totals = totals.context("a writer printed no totals")?;
        writer_seconds = writer_seconds.max(totals.seconds);
        writers_cpu += totals.cpu_seconds;
    }
    let committed = commits.len() as u64;
    let read = relay.is_some() || produce.is_some();
    if read
        && !consumer
            .wait_for(expected + committed, Duration::from_secs(60))
            .await
    {
        bail!("the consumer did not receive every message within 60 s of the writers' end");
    }
    let after = CpuSample::now(relay_pid);
    if !read {
        ctx.truncate().await?;
    }
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

/// What runs in a phase.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    /// The writers and the relay daemon.
    Relay,
    /// This many processes produce straight to Kafka with `linger.ms` = `linger_ms`, each
    /// message as it is due or, `batched`, what is due every `linger_ms`.
    Producers { processes: usize, batched: bool },
    /// The writers alone.
    WritersAlone,
}

/// The relay daemon's settings compared, or a baseline.
#[derive(Debug, Clone, Copy)]
struct Variant {
    kind: Kind,
    linger_ms: u64,
    wait_for_standbys: u32,
    /// `delivery`, when compared.
    delivery: Option<&'static str>,
}

impl Variant {
    fn name(&self, standby: bool) -> String {
        match self.kind {
            Kind::Producers { processes, batched } => {
                let feed = match batched {
                    true => format!("batches every {} ms", self.linger_ms),
                    false => "each message as due".to_owned(),
                };
                return format!(
                    "{processes} producer process(es), {feed}, linger.ms {}",
                    self.linger_ms
                );
            }
            Kind::WritersAlone => return "the writers alone, no relay".to_owned(),
            Kind::Relay => {}
        }
        let mut name = format!("batch_linger {} ms", self.linger_ms);
        if standby {
            name.push_str(&format!(
                ", standby, wait_for_standbys {}",
                self.wait_for_standbys
            ));
        }
        if let Some(delivery) = self.delivery {
            name.push_str(&format!(", {delivery}"));
        }
        name
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
    let mut deliveries: Vec<Option<&'static str>> = Vec::new();
    for delivery in &args.steady_delivery {
        deliveries.push(Some(match delivery.as_str() {
            "at-least-once" => "at-least-once",
            "exactly-once" => "exactly-once",
            other => {
                bail!("--steady-delivery: \"at-least-once\" or \"exactly-once\", not {other:?}")
            }
        }));
    }
    if deliveries.is_empty() {
        deliveries.push(None);
    }
    let mut variants = Vec::new();
    for &linger_ms in &lingers_ms {
        for &wait_for_standbys in &waits {
            for &delivery in &deliveries {
                variants.push(Variant {
                    kind: Kind::Relay,
                    linger_ms,
                    wait_for_standbys,
                    delivery,
                });
            }
        }
    }
    // The baselines, at the first linger compared; the relay is compared with the two
    // single-process producers.
    let (per_message_baseline, batched_baseline) = (variants.len(), variants.len() + 1);
    let writers = args.steady_writers.max(1);
    let mut baselines = vec![
        Kind::Producers {
            processes: 1,
            batched: false,
        },
        Kind::Producers {
            processes: 1,
            batched: true,
        },
    ];
    if writers > 1 {
        baselines.push(Kind::Producers {
            processes: writers,
            batched: false,
        });
    }
    baselines.push(Kind::WritersAlone);
    for kind in baselines {
        variants.push(Variant {
            kind,
            linger_ms: lingers_ms[0],
            wait_for_standbys: 0,
            delivery: None,
        });
    }
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
    let mut producing = ctx.args.relay_kafka.clone();
    producing.push(format!("linger.ms={}", lingers_ms[0]));
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
            let relay = match variant.kind {
                Kind::Relay => Some(start_daemon(ctx, variant).await?),
                _ => None,
            };
            let (processes, produce) = match variant.kind {
                Kind::Producers { processes, batched } => {
                    let produce = Produce {
                        bootstrap: &ctx.bootstrap,
                        kafka: &producing,
                        every_ms: batched.then_some(variant.linger_ms),
                    };
                    (processes, Some(produce))
                }
                _ => (writers, None),
            };
            let run = (&topic[..], &consumer);
            // Warm-up, not reported: connections, the producer's metadata, the consumer's
            // fetches.
            let warm_up = (200.0, 0, first);
            phase(ctx, run, relay.as_ref(), warm_up, processes, produce).await?;
            first += 100_000_000;
            let mut order: Vec<usize> = (0..args.steady_rates.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let rate = args.steady_rates[i];
                let id = (phases.len() + 1) as u16;
                let run = phase(
                    ctx,
                    run,
                    relay.as_ref(),
                    (rate, id, first),
                    processes,
                    produce,
                )
                .await?;
                first += 100_000_000;
                let per_message = |k: usize| 1e6 * run.cpu[k] / run.committed as f64;
                let relay = match variant.kind {
                    Kind::Relay => format!("relay {:.1}, ", per_message(0)),
                    _ => String::new(),
                };
                say(format!(
                    "steady round {}/{}, {}: {rate} msg/s offered, {:.0} achieved; CPU µs per message: {relay}PostgreSQL {:.1}, writers {:.1}",
                    round + 1,
                    args.rounds,
                    variant.name(standby),
                    run.committed as f64 / run.writer_seconds,
                    per_message(1),
                    per_message(4),
                ));
                phases.push((l, i, run));
            }
            if let Some(relay) = relay {
                relay.stop().await?;
            }
        }
    }
    let (receipts, duplicates) = consumer.stop();
    let received: HashMap<i64, u64> = receipts
        .iter()
        .map(|r| (r.sequence, r.received_us))
        .collect();

    let mut report = ctx.report();
    let mut details = Vec::new();
    let runs_of = |l: usize, i: usize| -> Vec<&Phase> {
        phases
            .iter()
            .filter(|(m, j, _)| (*m, *j) == (l, i))
            .map(|(_, _, p)| p)
            .collect()
    };
    for ((l, variant), (i, &rate)) in variants
        .iter()
        .enumerate()
        .flat_map(|l| args.steady_rates.iter().enumerate().map(move |r| (l, r)))
    {
        let runs = runs_of(l, i);
        let mut p50 = Vec::new();
        let mut p99 = Vec::new();
        let mut per_round = Vec::new();
        for run in &runs {
            let mut latency = histogram();
            let mut missing = 0u64;
            // Nobody reads what the writers alone write.
            let read = variant.kind != Kind::WritersAlone;
            for (sequence, commit_us) in run.commits.iter().filter(|_| read) {
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
        let per_message = |runs: &[&Phase], k: usize| -> Vec<f64> {
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
        if variant.kind == Kind::WritersAlone {
            report.row(
                &scenario,
                "PostgreSQL CPU per message (all its processes)",
                "µs",
                &per_message(&runs, 1),
            );
            report.row(
                &scenario,
                "writer processes' CPU per message",
                "µs",
                &per_message(&runs, 4),
            );
            details.push(json!({"rate": rate, "writers_alone": true, "rounds": per_round}));
            continue;
        }
        if let Kind::Producers { processes, batched } = variant.kind {
            report.row(&scenario, "due → consumer p50", "ms", &p50);
            report.row(&scenario, "due → consumer p99", "ms", &p99);
            report.row(
                &scenario,
                "producer processes' CPU per message",
                "µs",
                &per_message(&runs, 4),
            );
            report.row(
                &scenario,
                "Kafka broker CPU per message",
                "µs",
                &per_message(&runs, 2),
            );
            details.push(json!({
                "rate": rate, "producer_processes": processes, "batched": batched,
                "producer_linger_ms": variant.linger_ms, "rounds": per_round,
            }));
            continue;
        }
        report.row(&scenario, "commit → consumer p50", "ms", &p50);
        report.row(&scenario, "commit → consumer p99", "ms", &p99);
        let relay_cpu = per_message(&runs, 0);
        let postgres_cpu = per_message(&runs, 1);
        report.row(&scenario, "relay daemon CPU per message", "µs", &relay_cpu);
        // Round by round against the single producers, and the writers alone, at the same rate.
        let ratios = |ours: &[f64], theirs: &[f64]| -> Vec<f64> {
            ours.iter().zip(theirs).map(|(a, b)| a / b).collect()
        };
        let over_each = ratios(
            &relay_cpu,
            &per_message(&runs_of(per_message_baseline, i), 4),
        );
        let over_batched = ratios(&relay_cpu, &per_message(&runs_of(batched_baseline, i), 4));
        let alone = runs_of(variants.len() - 1, i);
        let alone_rate: Vec<f64> = alone
            .iter()
            .map(|r| r.committed as f64 / r.writer_seconds)
            .collect();
        report.row(
            &scenario,
            "writers' rate / the writers' rate alone (same round)",
            "x",
            &ratios(&achieved, &alone_rate),
        );
        let beyond_alone: Vec<f64> = postgres_cpu
            .iter()
            .zip(per_message(&alone, 1))
            .map(|(with, without)| with - without)
            .collect();
        report.row(
            &scenario,
            "relay CPU per message / a producer fed each message's (same round)",
            "x",
            &over_each,
        );
        report.row(
            &scenario,
            "relay CPU per message / a producer fed batches' (same round)",
            "x",
            &over_batched,
        );
        report.row(
            &scenario,
            "PostgreSQL CPU per message (all its processes)",
            "µs",
            &postgres_cpu,
        );
        report.row(
            &scenario,
            "PostgreSQL CPU per message beyond the writers alone (same round)",
            "µs",
            &beyond_alone,
        );
        report.row(
            &scenario,
            "Kafka broker CPU per message",
            "µs",
            &per_message(&runs, 2),
        );
        report.row(
            &scenario,
            "writer processes' CPU per message",
            "µs",
            &per_message(&runs, 4),
        );
        let p99s = Spread::of(&p99);
        let relay = Spread::of(&relay_cpu);
        let over_batched_spread = Spread::of(&over_batched);
        let rate_ok = Spread::of(&achieved).median >= 0.98 * rate;
        let wanted_p99 = match (variant.delivery, rate <= 500.0) {
            (Some("exactly-once"), _) => 25.0,
            (_, true) => 10.0,
            (_, false) => 15.0,
        };
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
                format!(
                    "{:.1} µs ({:.1}-{:.1}); {:.2}x a producer fed batches ({:.2}-{:.2})",
                    relay.median,
                    relay.min,
                    relay.max,
                    over_batched_spread.median,
                    over_batched_spread.min,
                    over_batched_spread.max
                ),
                relay.median <= 20.0,
            );
        }
        details.push(json!({
            "rate": rate, "batch_linger_ms": variant.linger_ms,
            "wait_for_standbys": standby.then_some(variant.wait_for_standbys),
            "delivery": variant.delivery, "rounds": per_round,
            "relay_cpu_us_per_message": relay.json(&relay_cpu),
            "relay_cpu_over_producer_fed_each_message": Spread::of(&over_each).json(&over_each),
            "relay_cpu_over_producer_fed_batches": over_batched_spread.json(&over_batched),
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
