//! Scenario 8: what saving a message costs the writer, per row, against the floor: a plain INSERT
//! of the same bytes (topic, key, 256-byte payload, NULL headers) into a table with only a primary
//! key. Every way of saving is measured in 1-row and 1,000-row transactions: `outbox.enqueue`
//! (one SQL call per message), `outbox.enqueue_all` (one call per transaction),
//! `save_for_publishing` and `save_all_for_publishing`. Per-message ways are compared with one
//! plain INSERT per row, set-based ones in 1,000-row transactions with one plain INSERT of all the
//! rows (`unnest`).
//!
//! The cost is CPU, not time: the writer's backend (its process's run time, utime + stime, from
//! `/proc/<pid>/schedstat`, so the database must run on this machine) plus the client's (the
//! thread that runs the writer: a current-thread runtime, so sqlx's work stays on it). Each case
//! has a connection of its own, warmed up before the rounds; within a round the cases take turns
//! in short slices, and the ratios to the floor are taken round by round. The outbox table is
//! emptied between rounds. No relay runs, but the lease table holds a busy relay's lease and the
//! busy mark a working relay keeps (migration 0018), so the insert trigger does what it does
//! beside a relay that is working.

use std::str::FromStr as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use outbox::{Message, Outbox, OutboxConfig, SchemaName};
use serde_json::{json, Value};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection as _, PgConnection};

use crate::util::{key, payload, spinner, Spread};
use crate::Ctx;

/// How far ahead the busy mark is set: beyond any run.
pub(crate) const BUSY_FOR_MS: i64 = 86_400_000;
/// Rows per transaction in the bulk case.
const BULK: usize = 1000;
/// The topic of every message (no Kafka is involved).
const TOPIC: &str = "bench-enqueue";
/// Turns each case takes per round.
const SLICES: u32 = 4;
/// The client's CPU time: the writer's thread.
const CLIENT_PATH: &str = "/proc/thread-self/schedstat";

/// A way of writing rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// One plain `INSERT ... VALUES` per row into the primary-key-only table.
    Floor,
    /// One plain `INSERT ... SELECT FROM unnest(...)` per transaction into the same table.
    FloorSet,
    /// `SELECT outbox.enqueue(...)` per row.
    Enqueue,
    /// `SELECT * FROM outbox.enqueue_all(...)` per transaction.
    EnqueueAll,
    /// `Outbox::save_for_publishing` per row.
    Save,
    /// `Outbox::save_all_for_publishing` per transaction.
    SaveAll,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Floor => "floor: plain INSERT per row",
            Way::FloorSet => "floor: plain INSERT of all rows",
            Way::Enqueue => "outbox.enqueue per row",
            Way::EnqueueAll => "outbox.enqueue_all",
            Way::Save => "save_for_publishing per row",
            Way::SaveAll => "save_all_for_publishing",
        }
    }

    /// The floor this way is compared with, in transactions of `rows`.
    fn floor(self, rows: usize) -> Option<Way> {
        match self {
            Way::Floor | Way::FloorSet => None,
            Way::EnqueueAll | Way::SaveAll if rows > 1 => Some(Way::FloorSet),
            _ => Some(Way::Floor),
        }
    }
}

/// One measured configuration: a way of writing, in transactions of `rows` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Case {
    way: Way,
    rows: usize,
}

impl Case {
    fn label(self) -> String {
        format!("{}, {}-row tx", self.way.name(), self.rows)
    }
}

fn cases() -> Vec<Case> {
    let single = [
        Way::Floor,
        Way::Enqueue,
        Way::EnqueueAll,
        Way::Save,
        Way::SaveAll,
    ]
    .map(|way| Case { way, rows: 1 });
    let bulk = [
        Way::Floor,
        Way::FloorSet,
        Way::Enqueue,
        Way::EnqueueAll,
        Way::Save,
        Way::SaveAll,
    ]
    .map(|way| Case { way, rows: BULK });
    single.into_iter().chain(bulk).collect()
}

/// What a case measured in one round.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    rows: u64,
    seconds: f64,
    /// CPU seconds of the writer's backend.
    backend: f64,
    /// CPU seconds of the client thread.
    client: f64,
}

impl Run {
    fn backend_us(&self) -> f64 {
        self.backend * 1e6 / self.rows as f64
    }
    fn client_us(&self) -> f64 {
        self.client * 1e6 / self.rows as f64
    }
    fn total_us(&self) -> f64 {
        self.backend_us() + self.client_us()
    }
    fn rate(&self) -> f64 {
        self.rows as f64 / self.seconds
    }
}

/// Scenario 8, in a schema of its own (its lease row must not meet the other scenarios' relays).
pub(crate) async fn enqueue(ctx: &Ctx) -> anyhow::Result<()> {
    let schema = SchemaName::new(format!("bench_enqueue_{}", outbox_test_support::short_id()))?;
    let outbox = Outbox::new(OutboxConfig::default().schema(schema.clone()));
    outbox.migrate(&ctx.pool).await?;
    sqlx::raw_sql(&format!(
        "CREATE TABLE {schema}.floor (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             topic text NOT NULL, key bytea, payload bytea, headers jsonb);
         INSERT INTO {schema}.relay_lease (name, holder, token, idle, acquired_at, renewed_at, expires_at)
         VALUES ('bench', 'busy', 1, false, now(), now(), now() + interval '1 day');"
    ))
    .execute(&ctx.pool)
    .await?;
    outbox_test_support::set_busy_mark(&ctx.pool, &schema, Some(BUSY_FOR_MS)).await;
    let seconds = ctx.args.enqueue_seconds;
    let rounds = ctx.args.rounds;
    let payloads: Vec<Vec<u8>> = (0..BULK as u64)
        .map(|n| payload(ctx.args.payload_bytes, 0, 0, n))
        .collect();
    let keys: Vec<String> = (0..BULK as u64).map(|n| key(n, ctx.args.keys)).collect();
    let writer = Writer {
        outbox,
        schema: schema.clone(),
        payloads,
        keys,
    };
    // The writer runs on a thread of its own, whose CPU time is the client's.
    let measured = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(writer.measure(rounds, Duration::from_secs_f64(seconds)))
    })
    .await?;
    let dropped = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&ctx.pool)
        .await;
    let runs = measured?;
    dropped?;
    report(ctx, &runs);
    Ok(())
}

struct Writer {
    outbox: Outbox,
    schema: SchemaName,
    payloads: Vec<Vec<u8>>,
    keys: Vec<String>,
}

impl Writer {
    /// Every case in every round; returns the runs per case, in `cases()` order. A round gives
    /// each case `duration` in `SLICES` slices, the cases taking turns slice by slice (starting
    /// one further on each time), so that what else the machine does at any moment weighs on all
    /// of them alike.
    async fn measure(&self, rounds: usize, duration: Duration) -> anyhow::Result<Vec<Vec<Run>>> {
        let cases = cases();
        let mut connections = Vec::new();
        for case in &cases {
            // Named, so that pg_stat_activity (and a profiler) can tell the backends apart.
            let options = PgConnectOptions::from_str(&outbox_test_support::database_url())?
                .application_name(&format!("outbox-bench enqueue: {}", case.label()));
            let mut conn = PgConnection::connect_with(&options).await?;
            let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut conn)
                .await?;
            connections.push((conn, format!("/proc/{pid}/schedstat")));
        }
        let progress = spinner("enqueue cost");
        for (case, (conn, _)) in cases.iter().zip(&mut connections) {
            progress.set_message(format!("warm-up: {}", case.label()));
            self.run(conn, *case, Duration::from_millis(300)).await?;
        }
        let slice = duration / SLICES;
        let mut runs: Vec<Vec<Run>> = vec![Vec::new(); cases.len()];
        for round in 0..rounds {
            self.empty().await?;
            progress.set_message(format!("round {}", round + 1));
            let mut totals = vec![Run::default(); cases.len()];
            for turn in 0..SLICES as usize {
                for k in 0..cases.len() {
                    let i = (round + turn + k) % cases.len();
                    let (conn, backend_path) = &mut connections[i];
                    let backend = cpu_seconds(backend_path);
                    let client = cpu_seconds(CLIENT_PATH);
                    let started = Instant::now();
                    let rows = self.run(conn, cases[i], slice).await?;
                    let seconds = started.elapsed().as_secs_f64();
                    let backend = cpu_seconds(backend_path)
                        .zip(backend)
                        .map(|(after, before)| after - before)
                        .context(
                            "cannot read the backend's CPU time: is PostgreSQL on this machine?",
                        )?;
                    let client = cpu_seconds(CLIENT_PATH)
                        .zip(client)
                        .map(|(after, before)| after - before)
                        .context("cannot read the client thread's CPU time")?;
                    progress.inc(rows);
                    let total = &mut totals[i];
                    total.rows += rows;
                    total.seconds += seconds;
                    total.backend += backend;
                    total.client += client;
                }
            }
            for (i, total) in totals.into_iter().enumerate() {
                runs[i].push(total);
            }
        }
        progress.finish_and_clear();
        Ok(runs)
    }

    /// Empties both tables (outside the timed runs).
    async fn empty(&self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect(&outbox_test_support::database_url()).await?;
        let s = &self.schema;
        sqlx::query(&format!("TRUNCATE {s}.message, {s}.floor"))
            .execute(&mut conn)
            .await?;
        Ok(())
    }

    /// Commits transactions of `case` for `duration` (at least one); returns the rows written.
    async fn run(
        &self,
        conn: &mut PgConnection,
        case: Case,
        duration: Duration,
    ) -> anyhow::Result<u64> {
        let started = Instant::now();
        let mut rows = 0u64;
        while rows == 0 || started.elapsed() < duration {
            let mut tx = conn.begin().await?;
            self.transaction(&mut tx, case).await?;
            tx.commit().await?;
            rows += case.rows as u64;
        }
        Ok(rows)
    }

    /// The statements of one transaction of `case`.
    async fn transaction(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        case: Case,
    ) -> anyhow::Result<()> {
        let s = &self.schema;
        let n = case.rows;
        let message = |i: usize| Message::new(TOPIC, self.payloads[i].clone()).key(&*self.keys[i]);
        match case.way {
            Way::Floor => {
                let sql = format!(
                    "INSERT INTO {s}.floor (topic, key, payload, headers) VALUES ($1, $2, $3, $4)"
                );
                for i in 0..n {
                    sqlx::query(&sql)
                        .bind(TOPIC)
                        .bind(self.keys[i].as_bytes())
                        .bind(&self.payloads[i])
                        .bind(None::<Value>)
                        .execute(&mut **tx)
                        .await?;
                }
            }
            Way::FloorSet => {
                let (topics, keys, payloads) = self.arrays(n);
                let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
                sqlx::query(&format!(
                    "INSERT INTO {s}.floor (topic, key, payload, headers)
                     SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::jsonb[])"
                ))
                .bind(topics)
                .bind(keys)
                .bind(payloads)
                .bind(vec![None::<Value>; n])
                .execute(&mut **tx)
                .await?;
            }
            Way::Enqueue => {
                let sql = format!("SELECT {s}.enqueue($1, $2, $3)");
                for i in 0..n {
                    let _: i64 = sqlx::query_scalar(&sql)
                        .bind(TOPIC)
                        .bind(&self.keys[i])
                        .bind(&self.payloads[i])
                        .fetch_one(&mut **tx)
                        .await?;
                }
            }
            Way::EnqueueAll => {
                let (topics, keys, payloads) = self.arrays(n);
                let ids: Vec<i64> =
                    sqlx::query_scalar(&format!("SELECT * FROM {s}.enqueue_all($1, $2, $3)"))
                        .bind(topics)
                        .bind(keys)
                        .bind(payloads)
                        .fetch_all(&mut **tx)
                        .await?;
                anyhow::ensure!(ids.len() == n, "enqueue_all returned {} ids", ids.len());
            }
            Way::Save => {
                for i in 0..n {
                    self.outbox
                        .save_for_publishing(&mut *tx, message(i))
                        .await?;
                }
            }
            Way::SaveAll => {
                self.outbox
                    .save_all_for_publishing(tx, (0..n).map(message))
                    .await?;
            }
        }
        Ok(())
    }

    /// The first `n` messages as arrays: topics, keys (text), payloads.
    fn arrays(&self, n: usize) -> (Vec<&str>, Vec<&str>, Vec<&[u8]>) {
        (
            vec![TOPIC; n],
            self.keys[..n].iter().map(String::as_str).collect(),
            self.payloads[..n].iter().map(Vec::as_slice).collect(),
        )
    }
}

/// CPU seconds of the process or thread whose `schedstat` file is `path`: the time it ran, the
/// same count as utime + stime in its `stat` file, in nanoseconds instead of 10 ms ticks.
fn cpu_seconds(path: &str) -> Option<f64> {
    let schedstat = std::fs::read_to_string(path).ok()?;
    let ran: u64 = schedstat.split_whitespace().next()?.parse().ok()?;
    Some(ran as f64 / 1e9)
}

/// Rows per case, ratios to the floor measured in the same round, and one target per way and
/// transaction size.
fn report(ctx: &Ctx, runs: &[Vec<Run>]) {
    let cases = cases();
    let index = |case: Case| cases.iter().position(|c| *c == case);
    let mut report = ctx.report();
    let mut details = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let scenario = format!("9 enqueue cost, {}-row tx", case.rows);
        let figure = |f: fn(&Run) -> f64| -> Vec<f64> { runs[i].iter().map(f).collect() };
        let name = case.way.name();
        report.row(
            &scenario,
            &format!("{name}: writer CPU per row (backend + client)"),
            "µs",
            &figure(Run::total_us),
        );
        report.row(
            &scenario,
            &format!("{name}: backend CPU per row"),
            "µs",
            &figure(Run::backend_us),
        );
        report.row(
            &scenario,
            &format!("{name}: client CPU per row"),
            "µs",
            &figure(Run::client_us),
        );
        report.row(
            &scenario,
            &format!("{name}: throughput"),
            "rows/s",
            &figure(Run::rate),
        );
        let floor = case.way.floor(case.rows).and_then(|way| {
            index(Case {
                way,
                rows: case.rows,
            })
        });
        let mut ratios = Value::Null;
        if let Some(floor) = floor {
            // Same-round ratios: the machine's speed moves between rounds.
            let per_round = |f: fn(&Run) -> f64| -> Vec<f64> {
                runs[i]
                    .iter()
                    .zip(&runs[floor])
                    .map(|(run, base)| f(run) / f(base))
                    .collect()
            };
            let total = per_round(Run::total_us);
            let backend = per_round(Run::backend_us);
            report.row(
                &scenario,
                &format!("{name}: writer CPU ÷ floor's ({})", cases[floor].way.name()),
                "x",
                &total,
            );
            report.row(
                &scenario,
                &format!("{name}: backend CPU ÷ floor's"),
                "x",
                &backend,
            );
            let spread = Spread::of(&total);
            report.target(
                &format!("{}: writer CPU per row", case.label()),
                "<= 1.5x the floor",
                format!(
                    "{:.2}x ({:.2}..{:.2}) {}; backend alone {:.2}x",
                    spread.median,
                    spread.min,
                    spread.max,
                    cases[floor].way.name(),
                    Spread::of(&backend).median
                ),
                spread.median <= 1.5,
            );
            ratios = json!({"writer_cpu": total, "backend_cpu": backend});
        }
        details.push(json!({
            "case": case.label(),
            "runs": runs[i].iter().map(|r| json!({
                "rows": r.rows, "seconds": r.seconds,
                "backend_cpu_seconds": r.backend, "client_cpu_seconds": r.client,
                "backend_us_per_row": r.backend_us(), "client_us_per_row": r.client_us(),
                "rows_per_second": r.rate(),
            })).collect::<Vec<_>>(),
            "ratios_to_floor": ratios,
        }));
    }
    report.detail(
        "enqueue",
        json!({
            "seconds_per_run": ctx.args.enqueue_seconds,
            "payload_bytes": ctx.args.payload_bytes,
            "headers": null,
            "lease": "one busy relay (idle = false, busy mark set)",
            "cases": details,
        }),
    );
}
