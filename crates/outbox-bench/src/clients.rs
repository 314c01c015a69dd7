//! Scenario 10: the write path of each client library the writer supports, against the physical
//! floor of "write one more row".
//!
//! One writer per client library (sqlx, tokio-postgres, SeaORM, diesel-async, blocking diesel),
//! on one connection, closed loop; per client, four
//! transactions, rotated within every round:
//! - the business transaction alone (one INSERT);
//! - plus a plain INSERT of the message's bytes into a table with only a primary key (the floor:
//!   what any second row costs), as a second statement;
//! - plus the outbox message, as a second statement;
//! - plus the outbox message in the same round trip: sqlx's `execute_and_save` (one statement),
//!   tokio-postgres's pipelining (two statements awaited together); SeaORM and diesel have none.
//!
//! The outbox's cost is its transaction's latency over the floor's, same client, same round. No
//! relay runs, but the busy mark a working relay keeps is set (migration 0018).

use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use outbox::{Message, Outbox};
use serde_json::json;
use sqlx::Connection as _;
use tokio::time::Instant;

use crate::enqueue::BUSY_FOR_MS;
use crate::util::{histogram, histogram_json, key, payload, quantile_ms, record, spinner, Spread};
use crate::Ctx;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Library {
    Sqlx,
    TokioPostgres,
    SeaOrm,
    DieselAsync,
    /// diesel's blocking `PgConnection`, in `block_in_place`.
    Diesel,
}

impl Library {
    /// SeaORM and diesel run a transaction's statements one at a time: no one-round-trip form.
    fn variants(self) -> &'static [Variant] {
        match self {
            Library::SeaOrm | Library::DieselAsync | Library::Diesel => &VARIANTS[..3],
            Library::Sqlx | Library::TokioPostgres => &VARIANTS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Business,
    Floor,
    Outbox,
    OutboxOneTrip,
}

const VARIANTS: [Variant; 4] = [
    Variant::Business,
    Variant::Floor,
    Variant::Outbox,
    Variant::OutboxOneTrip,
];

impl Variant {
    fn name(self, library: Library) -> &'static str {
        match (self, library) {
            (Variant::Business, _) => "business tx alone",
            (Variant::Floor, _) => "business tx + plain INSERT of the same bytes (floor)",
            (Variant::Outbox, _) => "business tx + outbox message",
            (Variant::OutboxOneTrip, Library::Sqlx) => {
                "business tx + outbox message, one statement (execute_and_save)"
            }
            (Variant::OutboxOneTrip, _) => "business tx + outbox message, pipelined",
        }
    }
}

/// One connection of each library, and the statements.
struct Writers {
    sqlx: sqlx::PgConnection,
    tokio_postgres: tokio_postgres::Client,
    sea_orm: sea_orm::DatabaseConnection,
    diesel_async: diesel_async::AsyncPgConnection,
    diesel: diesel::PgConnection,
    /// The business and floor statements, prepared once on the tokio-postgres connection, as a
    /// service would (sqlx caches its own).
    prepared: [tokio_postgres::Statement; 2],
    outbox: Outbox,
    topic: String,
    business: String,
    business_returning: String,
    floor: String,
    payload_bytes: usize,
    keys: usize,
}

impl Writers {
    /// One transaction of `variant` through `library`, for message number `n`.
    async fn transact(&mut self, library: Library, variant: Variant, n: u64) -> anyhow::Result<()> {
        let value = payload(self.payload_bytes, 0, 0, n);
        let key = key(n, self.keys);
        let message = Message::new(self.topic.as_str(), value.clone()).key(key.as_str());
        let (account, amount, note) = (
            (n % 10_000) as i32,
            n as i64,
            "an order line, as a service would store it, of a modest size",
        );
        match library {
            Library::Sqlx => {
                let mut tx = self.sqlx.begin().await?;
                let business = |sql| sqlx::query(sql).bind(account).bind(amount).bind(note);
                if variant == Variant::OutboxOneTrip {
                    self.outbox
                        .execute_and_save(&mut tx, business(&self.business_returning), message)
                        .await?
                        .context("the business insert returned no row")?;
                } else {
                    business(&self.business).execute(&mut *tx).await?;
                    match variant {
                        Variant::Floor => {
                            sqlx::query(&self.floor)
                                .bind(&self.topic)
                                .bind(key.as_bytes())
                                .bind(&value)
                                .execute(&mut *tx)
                                .await?;
                        }
                        Variant::Outbox => {
                            self.outbox.save_for_publishing(&mut tx, message).await?;
                        }
                        Variant::Business | Variant::OutboxOneTrip => {}
                    }
                }
                tx.commit().await?;
            }
            Library::SeaOrm => {
                use sea_orm::{ConnectionTrait as _, DbBackend, Statement, TransactionTrait as _};
                let tx = self.sea_orm.begin().await?;
                tx.execute(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    self.business.as_str(),
                    [account.into(), amount.into(), note.into()],
                ))
                .await?;
                match variant {
                    Variant::Floor => {
                        tx.execute(Statement::from_sql_and_values(
                            DbBackend::Postgres,
                            self.floor.as_str(),
                            [
                                self.topic.as_str().into(),
                                key.as_bytes().to_vec().into(),
                                value.into(),
                            ],
                        ))
                        .await?;
                    }
                    Variant::Outbox => {
                        self.outbox.save_for_publishing(&tx, message).await?;
                    }
                    Variant::Business | Variant::OutboxOneTrip => {}
                }
                tx.commit().await?;
            }
            Library::DieselAsync => {
                use diesel::sql_types::{BigInt, Bytea, Integer, Text};
                use diesel_async::{AnsiTransactionManager, RunQueryDsl, TransactionManager};
                let conn = &mut self.diesel_async;
                AnsiTransactionManager::begin_transaction(conn).await?;
                diesel::sql_query(&self.business)
                    .bind::<Integer, _>(account)
                    .bind::<BigInt, _>(amount)
                    .bind::<Text, _>(note)
                    .execute(conn)
                    .await?;
                match variant {
                    Variant::Floor => {
                        diesel::sql_query(&self.floor)
                            .bind::<Text, _>(&self.topic)
                            .bind::<Bytea, _>(key.as_bytes())
                            .bind::<Bytea, _>(&value)
                            .execute(conn)
                            .await?;
                    }
                    Variant::Outbox => {
                        self.outbox.save_for_publishing(&mut *conn, message).await?;
                    }
                    Variant::Business | Variant::OutboxOneTrip => {}
                }
                AnsiTransactionManager::commit_transaction(conn).await?;
            }
            Library::Diesel => {
                use diesel::connection::{AnsiTransactionManager, TransactionManager};
                use diesel::sql_types::{BigInt, Bytea, Integer, Text};
                use diesel::RunQueryDsl;
                let conn = &mut self.diesel;
                tokio::task::block_in_place(|| -> anyhow::Result<()> {
                    AnsiTransactionManager::begin_transaction(conn)?;
                    diesel::sql_query(&self.business)
                        .bind::<Integer, _>(account)
                        .bind::<BigInt, _>(amount)
                        .bind::<Text, _>(note)
                        .execute(conn)?;
                    match variant {
                        Variant::Floor => {
                            diesel::sql_query(&self.floor)
                                .bind::<Text, _>(&self.topic)
                                .bind::<Bytea, _>(key.as_bytes())
                                .bind::<Bytea, _>(&value)
                                .execute(conn)?;
                        }
                        Variant::Outbox => {
                            self.outbox
                                .save_for_publishing_blocking(&mut *conn, message)?;
                        }
                        Variant::Business | Variant::OutboxOneTrip => {}
                    }
                    AnsiTransactionManager::commit_transaction(conn)?;
                    Ok(())
                })?;
            }
            Library::TokioPostgres => {
                let tx = self.tokio_postgres.transaction().await?;
                let [business, floor] = &self.prepared;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                    [&account, &amount, &note];
                let business = tx.execute(business, &params);
                match variant {
                    Variant::Business => {
                        business.await?;
                    }
                    Variant::Floor => {
                        business.await?;
                        tx.execute(floor, &[&self.topic, &key.as_bytes(), &value])
                            .await?;
                    }
                    Variant::Outbox => {
                        business.await?;
                        self.outbox.save_for_publishing(&tx, message).await?;
                    }
                    Variant::OutboxOneTrip => {
                        let (business, saved) =
                            tokio::join!(business, self.outbox.save_for_publishing(&tx, message));
                        business?;
                        saved?;
                    }
                }
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// `variant` through `library`, back to back for `duration`: transactions per second and
    /// latencies.
    async fn run(
        &mut self,
        library: Library,
        variant: Variant,
        duration: Duration,
        n: &mut u64,
    ) -> anyhow::Result<(f64, Histogram<u64>)> {
        let started = Instant::now();
        let mut latency = histogram();
        let mut count = 0u64;
        while started.elapsed() < duration {
            let t0 = Instant::now();
            self.transact(library, variant, *n).await?;
            record(&mut latency, t0.elapsed());
            *n += 1;
            count += 1;
        }
        Ok((count as f64 / started.elapsed().as_secs_f64(), latency))
    }
}

pub(crate) async fn clients(ctx: &Ctx) -> anyhow::Result<()> {
    let args = &ctx.args;
    let schema = &ctx.schema;
    let topic = ctx.topic("bench-clients").await;
    sqlx::raw_sql(&format!(
        "CREATE TABLE IF NOT EXISTS {schema}.floor (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             topic text NOT NULL, key bytea, payload bytea, headers jsonb)"
    ))
    .execute(&ctx.pool)
    .await?;
    let url = outbox_test_support::database_url();
    let (tokio_postgres, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let business =
        format!("INSERT INTO {schema}.business (account, amount, note) VALUES ($1, $2, $3)");
    let floor = format!("INSERT INTO {schema}.floor (topic, key, payload) VALUES ($1, $2, $3)");
    let prepared = [
        tokio_postgres.prepare(&business).await?,
        tokio_postgres.prepare(&floor).await?,
    ];
    let mut writers = Writers {
        sqlx: sqlx::PgConnection::connect(&url).await?,
        tokio_postgres,
        sea_orm: sea_orm::Database::connect(&url).await?,
        diesel_async: {
            use diesel_async::AsyncConnection as _;
            diesel_async::AsyncPgConnection::establish(&url).await?
        },
        diesel: {
            use diesel::Connection as _;
            diesel::PgConnection::establish(&url)?
        },
        prepared,
        outbox: ctx.outbox.clone(),
        topic,
        business_returning: format!("{business} RETURNING id"),
        business,
        floor,
        payload_bytes: args.payload_bytes,
        keys: args.keys,
    };
    // Writers beside a working relay: the busy mark it keeps lets them skip the wake-up
    // trigger's function. Reset after, for the scenarios that run a relay in this schema.
    outbox_test_support::set_busy_mark(&ctx.pool, schema, Some(BUSY_FOR_MS)).await;
    let measured = measure(ctx, &mut writers).await;
    outbox_test_support::set_busy_mark(&ctx.pool, schema, None).await;
    measured
}

async fn measure(ctx: &Ctx, writers: &mut Writers) -> anyhow::Result<()> {
    let args = &ctx.args;
    let duration = Duration::from_secs(args.write_seconds);
    let progress = spinner("client libraries");
    let mut n = 0u64;
    let mut details = Vec::new();
    for library in [
        Library::Sqlx,
        Library::TokioPostgres,
        Library::SeaOrm,
        Library::DieselAsync,
        Library::Diesel,
    ] {
        let variants = library.variants();
        for &variant in variants {
            writers
                .run(library, variant, Duration::from_millis(500), &mut n)
                .await?;
        }
        // [variant][round] -> (tx/s, p50 ms, p99 ms)
        let mut figures = vec![Vec::new(); variants.len()];
        for round in 0..args.rounds {
            for k in 0..variants.len() {
                let i = (round + k) % variants.len();
                let variant = variants[i];
                progress.set_message(format!("round {}: {library:?}, {variant:?}", round + 1));
                let (rate, latency) = writers.run(library, variant, duration, &mut n).await?;
                figures[i].push((
                    rate,
                    quantile_ms(&latency, 0.5),
                    quantile_ms(&latency, 0.99),
                ));
                details.push(json!({
                    "library": format!("{library:?}"), "variant": variant.name(library),
                    "round": round + 1, "rate": rate, "latency": histogram_json(&latency),
                }));
            }
        }
        let mut report = ctx.report();
        let scenario = format!("10 client library {library:?}, 1 writer");
        for (i, variant) in variants.iter().enumerate() {
            let column =
                |f: fn(&(f64, f64, f64)) -> f64| -> Vec<f64> { figures[i].iter().map(f).collect() };
            let name = variant.name(library);
            report.row(
                &scenario,
                &format!("{name}: throughput"),
                "tx/s",
                &column(|f| f.0),
            );
            report.row(
                &scenario,
                &format!("{name}: latency p50"),
                "ms",
                &column(|f| f.1),
            );
            report.row(
                &scenario,
                &format!("{name}: latency p99"),
                "ms",
                &column(|f| f.2),
            );
        }
        // Same-round ratios of p50 latencies.
        let ratio = |a: usize, b: usize| -> Vec<f64> {
            figures[a]
                .iter()
                .zip(&figures[b])
                .map(|(x, y)| x.1 / y.1)
                .collect()
        };
        let outbox = ratio(2, 1);
        report.row(&scenario, "outbox p50 ÷ floor p50", "x", &outbox);
        let outbox = Spread::of(&outbox);
        report.target(
            &format!("{library:?}: business tx + outbox message within 1.05x the floor"),
            "<= 1.05x the floor's p50",
            format!(
                "{:.3}x ({:.3}-{:.3})",
                outbox.median, outbox.min, outbox.max
            ),
            outbox.median <= 1.05,
        );
        if variants.len() == VARIANTS.len() {
            let one_trip = ratio(3, 1);
            report.row(
                &scenario,
                "outbox in one round trip p50 ÷ floor p50",
                "x",
                &one_trip,
            );
            let one_trip = Spread::of(&one_trip);
            report.target(
                &format!("{library:?}: the one-round-trip form beats the floor's two round trips"),
                "< 1x the floor's p50",
                format!(
                    "{:.3}x ({:.3}-{:.3})",
                    one_trip.median, one_trip.min, one_trip.max
                ),
                one_trip.median < 1.0,
            );
        }
    }
    progress.finish_and_clear();
    ctx.report().detail(
        "clients",
        json!({"seconds_per_run": args.write_seconds, "runs": details}),
    );
    Ok(())
}
