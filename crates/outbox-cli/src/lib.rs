//! The `outbox` command: migrate the schema, run the relay as a daemon, enqueue from scripts,
//! and inspect the outbox. Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration.
//!
//! `cargo install outbox-cli` installs it; `outbox --help` lists the commands, and the operations
//! guide (`docs/operations.md` in the repository) covers every command and setting. The same
//! commands run from Rust, e.g. in a service's own binary:
//!
//! ```no_run
//! use clap::Parser as _;
//! use outbox_cli::{Cli, Command};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let cli = Cli::try_parse_from(["outbox", "--config", "outbox.toml", "migrate"])?;
//! assert!(matches!(cli.command, Command::Migrate));
//! outbox_cli::run(cli).await?; // what `outbox --config outbox.toml migrate` does
//! # Ok(())
//! # }
//! ```

pub mod config;

use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use outbox::{Message, Outbox, OutboxConfig};
use std::net::SocketAddr;
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use outbox::admin::RepublishFilter;
use outbox_kafka_relay::{Completion, Health, HealthReport, Relay};
use std::str::FromStr;

use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};

use crate::config::{retention_from_hours, Config, ConfigError, Flags, RelaySettings, Settings};

/// Transactional outbox for PostgreSQL and Apache Kafka.
#[derive(Debug, Parser)]
#[command(name = "outbox", version, about, long_about = None)]
pub struct Cli {
    /// TOML configuration file; environment variables and flags override it.
    #[arg(long, short, env = "OUTBOX_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Settings that override the file and the environment.
    #[command(flatten)]
    pub flags: Flags,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the outbox schema (idempotent).
    Migrate,
    /// Run the relay until SIGTERM or SIGINT, then shut down gracefully: stop claiming, wait
    /// for in-flight deliveries, complete what Kafka acknowledged, release the lease.
    Relay {
        /// Print the effective configuration (secrets masked) and exit.
        #[arg(long)]
        print_config: bool,
        /// Serve /metrics (Prometheus), /health/live and /health/ready on HOST:PORT.
        #[arg(long, env = "OUTBOX_METRICS_ADDR", value_name = "HOST:PORT")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Serve the operator console (web pages: backlog, blocked keys, dead letters,
        /// republish) on HOST:PORT, a private address: reading needs no login. Read-only unless
        /// the `[console]` table sets write = true and a token (OUTBOX_CONSOLE_WRITE,
        /// OUTBOX_CONSOLE_TOKEN).
        #[arg(long, env = "OUTBOX_CONSOLE_ADDR", value_name = "HOST:PORT")]
        console_addr: Option<std::net::SocketAddr>,
        /// Settings that override the file's `[relay]` table and the environment.
        #[command(flatten)]
        settings: Box<RelaySettings>,
    },
    /// Publish already processed messages again, keeping their original x-sequence (for a
    /// consumer that lost data). Needs `completion = "keep"` (deleted rows are gone).
    Republish {
        /// One sequence.
        #[arg(long, conflicts_with_all = ["from_id", "to_id"])]
        id: Option<i64>,
        /// Lowest sequence, inclusive.
        #[arg(long)]
        from_id: Option<i64>,
        /// Highest sequence, inclusive.
        #[arg(long)]
        to_id: Option<i64>,
        /// Only messages with this key (UTF-8).
        #[arg(long)]
        key: Option<String>,
        /// Only messages of this topic.
        #[arg(long)]
        topic: Option<String>,
        /// Only messages created at or after this time (e.g. 2026-11-28T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Only messages created at or before this time.
        #[arg(long)]
        until: Option<String>,
        /// Do not ask for confirmation.
        #[arg(long, short)]
        yes: bool,
        /// Ask for confirmation when more than this many messages match.
        #[arg(long, default_value_t = 1000)]
        confirm_above: u64,
    },
    /// Inspect and handle messages that failed permanently under the dead-letter policy.
    DeadLetters {
        /// What to do.
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Run retention cleanup now: delete processed messages older than the retention, in
    /// bounded batches.
    Cleanup {
        /// Override the configured retention, in hours.
        #[arg(long)]
        retention_hours: Option<f64>,
    },
    /// Save one message for publishing, in a transaction of its own (for scripts and smoke tests;
    /// services enqueue inside their own transactions).
    Enqueue {
        /// Kafka topic.
        #[arg(long)]
        topic: String,
        /// Message key (UTF-8).
        #[arg(long)]
        key: Option<String>,
        /// Header NAME=VALUE (repeatable).
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// Payload (UTF-8).
        payload: String,
    },
    /// Show the backlog, the oldest pending message, failing messages, the last publish and
    /// the lease holders.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Refresh every SECONDS until interrupted.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<f64>,
    },
}

/// Dead-letter operations.
#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// List dead letters with their errors.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// Put dead letters back into the outbox with their original sequence, to be published
    /// again (after fixing the cause).
    Retry {
        /// One dead letter, by sequence.
        #[arg(long, required_unless_present = "all")]
        id: Option<i64>,
        /// All of them.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete dead letters for good.
    Drop {
        /// One dead letter, by sequence.
        #[arg(long, required_unless_present = "all")]
        id: Option<i64>,
        /// All of them.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

/// A failure, classified for the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Exit code 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Exit code 1.
    #[error("{0}")]
    Runtime(String),
}

/// Parses the command line, runs the command and returns the exit code.
pub async fn main() -> ExitCode {
    let matches = config::document(Cli::command()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let logging = std::env::var_os("OUTBOX_LOG");
    if let Err(error) = init_logging(cli.log_format, logging.as_deref()) {
        eprintln!("outbox: {error}");
        return ExitCode::from(2);
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("outbox: {error}");
            match error {
                CliError::Config(_) => ExitCode::from(2),
                CliError::Runtime(_) => ExitCode::from(1),
            }
        }
    }
}

fn init_logging(format: LogFormat, directives: Option<&OsStr>) -> Result<(), ConfigError> {
    let filter = log_filter(directives)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// `OUTBOX_LOG`'s filter, or the default when it is unset or empty. An invalid directive is an
/// error naming it: dropping it would silently drop the whole filter.
fn log_filter(directives: Option<&OsStr>) -> Result<tracing_subscriber::EnvFilter, ConfigError> {
    use tracing_subscriber::filter::Directive;
    let invalid = |reason: String| ConfigError::Invalid {
        key: "OUTBOX_LOG".into(),
        reason,
    };
    let directives = match directives {
        None => "",
        Some(text) => text
            .to_str()
            .ok_or_else(|| invalid(format!("not UTF-8: {text:?}")))?,
    };
    if directives.trim().is_empty() {
        return Ok(tracing_subscriber::EnvFilter::new(
            "info,sqlx=warn,rdkafka=warn",
        ));
    }
    for directive in directives.split(',').filter(|d| !d.is_empty()) {
        Directive::from_str(directive)
            .map_err(|e| invalid(format!("invalid directive {directive:?}: {e}")))?;
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(directives)
        .map_err(|e| invalid(format!("{directives:?}: {e}")))
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let file = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let read_elsewhere = [clap_variables(&Cli::command()), vec!["OUTBOX_LOG".into()]].concat();
    let vars = std::env::vars_os().filter(|(name, _)| !read_elsewhere.contains(name));
    let relay_flags = match &cli.command {
        Command::Relay { settings, .. } => Some(&**settings),
        _ => None,
    };
    let settings = Settings::resolve(file, vars, &cli.flags, relay_flags)?;
    match cli.command {
        Command::Relay {
            print_config: true, ..
        } => {
            print!("{}", settings.to_masked_toml());
            Ok(())
        }
        Command::Migrate => {
            let pool = connect(&settings).await?;
            let report = writer(&settings)
                .migrate(&pool)
                .await
                .map_err(|e| CliError::Runtime(format!("migration failed: {e}")))?;
            println!("{report}");
            Ok(())
        }
        Command::Relay {
            print_config: false,
            metrics_addr,
            console_addr,
            ..
        } => run_relay(settings, metrics_addr, console_addr).await,
        Command::Republish {
            id,
            from_id,
            to_id,
            key,
            topic,
            since,
            until,
            yes,
            confirm_above,
        } => {
            let mut filter = RepublishFilter::all()
                .ids(id.or(from_id), id.or(to_id))
                .created(since, until);
            if let Some(key) = key {
                filter = filter.key(key);
            }
            if let Some(topic) = topic {
                filter = filter.topic(topic);
            }
            republish(&settings, filter, yes, confirm_above).await
        }
        Command::Cleanup { retention_hours } => cleanup(&settings, retention_hours).await,
        Command::DeadLetters { action } => dead_letters(&settings, action).await,
        Command::Enqueue {
            topic,
            key,
            headers,
            payload,
        } => {
            let mut message = Message::new(topic, payload);
            if let Some(key) = key {
                message = message.key(key);
            }
            for header in headers {
                let (name, value) = header.split_once('=').ok_or_else(|| ConfigError::Invalid {
                    key: "--header".into(),
                    reason: format!("expected NAME=VALUE, got {header:?}"),
                })?;
                message = message.header(name, value);
            }
            let pool = connect(&settings).await?;
            let mut tx = pool.begin().await.map_err(db_error)?;
            let sequence = writer(&settings)
                .save_for_publishing(&mut tx, message)
                .await
                .map_err(|e| match e {
                    outbox::Error::InvalidMessage(invalid) => {
                        CliError::Config(ConfigError::Invalid {
                            key: "message".into(),
                            reason: invalid.to_string(),
                        })
                    }
                    other => CliError::Runtime(other.to_string()),
                })?;
            tx.commit().await.map_err(db_error)?;
            println!("{sequence}");
            Ok(())
        }
        Command::Status { json, watch } => match watch {
            None => status(&settings, json).await,
            Some(seconds) => {
                let interval = watch_interval(seconds)?;
                loop {
                    if !json {
                        print!("\x1b[2J\x1b[H"); // clear the screen between refreshes
                    }
                    status(&settings, json).await?;
                    tokio::select! {
                        _ = shutdown_signal() => return Ok(()),
                        _ = tokio::time::sleep(interval) => {}
                    }
                }
            }
        },
    }
}

/// The variables clap reads (`OUTBOX_CONFIG`, `OUTBOX_METRICS_ADDR`): not settings.
fn clap_variables(command: &clap::Command) -> Vec<OsString> {
    let own = command
        .get_arguments()
        .filter_map(|arg| Some(arg.get_env()?.to_owned()));
    own.chain(command.get_subcommands().flat_map(clap_variables))
        .collect()
}

/// `--watch`'s refresh interval: positive, and at most a day.
fn watch_interval(seconds: f64) -> Result<Duration, ConfigError> {
    const MAX_SECONDS: f64 = 86_400.0;
    if seconds.is_finite() && seconds > 0.0 && seconds <= MAX_SECONDS {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(ConfigError::Invalid {
            key: "--watch".into(),
            reason: format!(
                "must be a number of seconds above 0 and at most {MAX_SECONDS}, not {seconds:?}"
            ),
        })
    }
}

// The command's statements run once per process: sent unnamed, inside transactions, they work
// the same on a direct connection and through a pooler in transaction mode (docs/operations.md).
fn writer(settings: &Settings) -> Outbox {
    Outbox::new(
        OutboxConfig::default()
            .schema(settings.schema.clone())
            .transaction_pooling(true),
    )
}

fn admin(settings: &Settings) -> outbox::admin::Admin {
    outbox::admin::Admin::new(&settings.schema).transaction_pooling(true)
}

fn db_error(error: impl Into<outbox::Error>) -> CliError {
    match error.into() {
        outbox::Error::Database(error) => CliError::Runtime(format!("database error: {error}")),
        other => CliError::Runtime(other.to_string()),
    }
}

/// A pool on the configured database. No startup `options` (PgBouncer refuses them): the relay
/// bounds its statements on its own sessions.
async fn connect(settings: &Settings) -> Result<PgPool, CliError> {
    // Validated with the user's names when the settings were resolved.
    let url = &settings.database_url;
    let options = settings.database_url.connect_options("database_url")?;
    // One direct attempt first: a pool would only report "timed out", not why.
    let attempt = tokio::time::timeout(
        Duration::from_secs(10),
        PgConnection::connect_with(&options),
    );
    match attempt.await {
        Ok(Ok(conn)) => drop(conn),
        Ok(Err(e)) => {
            return Err(CliError::Runtime(format!(
                "cannot connect to PostgreSQL at {url}: {e}"
            )))
        }
        Err(_) => {
            return Err(CliError::Runtime(format!(
                "cannot connect to PostgreSQL at {url}: no answer within 10s"
            )))
        }
    }
    Ok(PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_lazy_with(options))
}

async fn run_relay(
    mut settings: Settings,
    metrics_addr: Option<SocketAddr>,
    console_addr: Option<SocketAddr>,
) -> Result<(), CliError> {
    if settings.console.write && console_addr.is_none() {
        return Err(ConfigError::Invalid {
            key: "console.write".into(),
            reason: "the console is not served: set --console-addr (OUTBOX_CONSOLE_ADDR)".into(),
        }
        .into());
    }
    let pool = connect(&settings).await?;
    // Fail at start, not in a retry loop, when the relay cannot have sessions of its own.
    Relay::check_connection(&pool)
        .await
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    if settings.derive_source {
        // Two services that both leave `source` unset must not publish the same
        // (x-source, x-sequence) pairs: consumers' inboxes would drop one's events.
        let admin = outbox::admin::Admin::new(&settings.schema);
        let mut conn = pool.acquire().await.map_err(|e| {
            CliError::Runtime(format!(
                "cannot derive the relay's source from the database: {e}"
            ))
        })?;
        settings.relay.source = admin.default_source(&mut conn).await.map_err(|e| {
            CliError::Runtime(format!(
                "cannot derive the relay's source from the database: {e}"
            ))
        })?;
    }
    let metrics = match metrics_addr {
        Some(addr) => Some((addr, install_metrics_recorder()?)),
        None => None,
    };
    tracing::info!(
        schema = %settings.schema,
        source = %settings.relay.source,
        kafka = ?settings.relay.kafka,
        "starting the relay"
    );
    let console_admin = outbox::admin::Admin::new(&settings.schema);
    let mut relay =
        Relay::start(pool.clone(), settings.relay).map_err(|e| CliError::Runtime(e.to_string()))?;
    if let Some((addr, handle)) = metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError::Runtime(format!("cannot listen on {addr} for metrics: {e}")))?;
        tracing::info!(%addr, "serving /metrics, /health/live and /health/ready");
        tokio::spawn(serve_http(listener, handle, relay.health()));
    }
    if let Some(addr) = console_addr {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::Runtime(format!("cannot listen on {addr} for the console: {e}"))
        })?;
        let mut console = outbox_console::Console::new(pool, console_admin)
            .health(relay.health())
            .hosts(settings.console.hosts.clone());
        match settings.console.token.filter(|_| settings.console.write) {
            Some(token) => {
                tracing::info!(%addr, "serving the operator console, write actions enabled");
                console = console.writes(token);
            }
            None => tracing::info!(%addr, "serving the operator console, read-only"),
        }
        let app =
            outbox_console::router(console).into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "the console stopped");
            }
        });
    }
    let stopped = tokio::select! {
        signal = shutdown_signal() => {
            tracing::info!(%signal, "shutting down");
            None
        }
        result = relay.stopped() => Some(result),
    };
    match stopped {
        None => relay
            .shutdown()
            .await
            .map_err(|e| CliError::Runtime(format!("relay failed during shutdown: {e}"))),
        Some(result) => result
            .map_err(|e| CliError::Runtime(format!("relay stopped: {e}")))
            .and(Err(CliError::Runtime("relay stopped unexpectedly".into()))),
    }
}

fn install_metrics_recorder() -> Result<PrometheusHandle, CliError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let latency_buckets = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        300.0,
    ];
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(outbox_kafka_relay::metrics::PUBLISH_LATENCY.to_owned()),
            &latency_buckets,
        )
        .and_then(|builder| builder.install_recorder())
        .map_err(|e| CliError::Runtime(format!("cannot install the metrics recorder: {e}")))
}

async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let ready_health = health.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .route("/health/live", get(|| std::future::ready("live")))
        .route(
            "/health/ready",
            get(move || {
                let report = ready_health.report();
                let status = if report.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                std::future::ready((status, axum::Json(health_json(&report))))
            }),
        );
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "the metrics endpoint stopped");
    }
}

fn health_json(report: &HealthReport) -> serde_json::Value {
    serde_json::json!({
        "ready": report.ready,
        "reasons": report.reasons,
        "leader": report.leader,
        "database_ok": report.database_ok,
        "kafka_ok": report.kafka_ok,
        "backlog": report.backlog,
        "oldest_pending_age_ms": report.oldest_pending_age.map(|a| a.as_millis() as u64),
        "since_last_publish_ms": report.since_last_publish.map(|a| a.as_millis() as u64),
    })
}

async fn republish(
    settings: &Settings,
    filter: RepublishFilter,
    yes: bool,
    confirm_above: u64,
) -> Result<(), CliError> {
    let pool = connect(settings).await?;
    let mut conn = pool.acquire().await.map_err(db_error)?;
    let admin = admin(settings);
    if let Some((name, value)) = admin
        .unreadable_time(&mut conn, &filter)
        .await
        .map_err(db_error)?
    {
        return Err(ConfigError::Invalid {
            key: format!("--{name}"),
            reason: format!("{value:?} is not a timestamp (e.g. 2026-11-28T10:00:00Z)"),
        }
        .into());
    }
    let mut tx = conn.begin().await.map_err(db_error)?;
    let total = admin
        .republish_count(&mut tx, &filter)
        .await
        .map_err(db_error)? as u64;
    tx.commit().await.map_err(db_error)?;
    if total == 0 {
        println!("no processed messages match; nothing to republish");
        return Ok(());
    }
    if total > confirm_above && !yes {
        use std::io::{BufRead, IsTerminal, Write};
        if !std::io::stdin().is_terminal() {
            return Err(ConfigError::Invalid {
                key: "--yes".into(),
                reason: format!(
                    "{total} messages match (more than {confirm_above}); confirm with --yes"
                ),
            }
            .into());
        }
        print!("Republish {total} messages? Type 'yes' to continue: ");
        std::io::stdout().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).ok();
        if answer.trim() != "yes" {
            println!("cancelled");
            return Ok(());
        }
    }
    let bar = progress_bar(total, "republish")?;
    let done = admin
        .republish(&mut conn, &filter, 10_000, |done| bar.set_position(done))
        .await
        .map_err(db_error)?;
    bar.finish_and_clear();
    println!("marked {done} messages for publishing again (original sequences kept); the relay sends them next");
    Ok(())
}

async fn cleanup(settings: &Settings, retention_hours: Option<f64>) -> Result<(), CliError> {
    let retention = match (retention_hours, settings.relay.completion) {
        (Some(hours), _) => retention_from_hours(hours).map_err(|reason| ConfigError::Invalid {
            key: "--retention-hours".into(),
            reason,
        })?,
        (None, Completion::Keep { retention }) => retention,
        (None, Completion::Delete) => {
            println!("completion = \"delete\": processed messages are deleted at once; nothing to clean up");
            return Ok(());
        }
    };
    let pool = connect(settings).await?;
    let admin = admin(settings);
    let bar = indicatif::ProgressBar::new_spinner();
    let deleted = outbox_kafka_relay::cleanup::run_once(
        &pool,
        &admin,
        retention,
        settings.relay.cleanup_batch_size,
        |total| bar.set_message(format!("deleted {total} processed messages")),
    )
    .await
    .map_err(db_error)?;
    bar.finish_and_clear();
    println!(
        "deleted {deleted} messages processed more than {:.1} hours ago",
        retention.as_secs_f64() / 3600.0
    );
    Ok(())
}

async fn dead_letters(settings: &Settings, action: DeadLetterAction) -> Result<(), CliError> {
    let pool = connect(settings).await?;
    let admin = admin(settings);
    let mut conn = pool.begin().await.map_err(db_error)?;
    match action {
        DeadLetterAction::List { json, limit } => {
            let letters = admin
                .dead_letters(&mut conn, limit)
                .await
                .map_err(db_error)?;
            if json {
                let items: Vec<serde_json::Value> = letters
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "sequence": d.id, "topic": d.topic,
                            "key": d.key.as_deref().map(String::from_utf8_lossy),
                            "key_cut": d.key_cut,
                            "attempts": d.attempts, "error": d.error,
                            "age_ms": d.age.as_millis() as u64,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(items));
            } else if letters.is_empty() {
                println!("no dead letters");
            } else {
                for d in letters {
                    println!(
                        "sequence {} topic {} key {} attempts {} ({:.0}s ago): {}",
                        d.id,
                        printable(&d.topic),
                        key_text(d.key.as_deref(), d.key_cut),
                        d.attempts,
                        d.age.as_secs_f64(),
                        printable(&d.error)
                    );
                }
            }
        }
        DeadLetterAction::Retry { id, .. } => {
            let requeued = admin
                .requeue_dead_letters(&mut conn, id)
                .await
                .map_err(db_error)?;
            println!(
                "requeued {} dead letter(s) with their original sequences: {requeued:?}",
                requeued.len()
            );
        }
        DeadLetterAction::Drop { id, .. } => {
            let dropped = admin
                .drop_dead_letters(&mut conn, id)
                .await
                .map_err(db_error)?;
            println!("dropped {dropped} dead letter(s)");
        }
    }
    conn.commit().await.map_err(db_error)?;
    Ok(())
}

fn progress_bar(total: u64, what: &str) -> Result<indicatif::ProgressBar, CliError> {
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{pos}}/{{len}} [{{bar:30}}] {{eta}}"
    ))
    .map_err(|e| CliError::Runtime(e.to_string()))?
    .progress_chars("=> ");
    Ok(indicatif::ProgressBar::new(total).with_style(style))
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

async fn status(settings: &Settings, json: bool) -> Result<(), CliError> {
    let pool = connect(settings).await?;
    let admin = admin(settings);
    // One transaction: one snapshot for every figure, and one server connection behind a pooler.
    let mut conn = pool.begin().await.map_err(db_error)?;
    let backlog = admin.backlog(&mut conn).await.map_err(|e| {
        CliError::Runtime(format!(
            "cannot read the outbox in schema {} (run `outbox migrate`?): {e}",
            settings.schema
        ))
    })?;
    let leases = admin.leases(&mut conn).await.map_err(db_error)?;
    let activity = admin.activity(&mut conn).await.map_err(db_error)?;
    let snapshot = admin.oldest_snapshot(&mut conn).await.map_err(db_error)?;
    let held = admin.held_keys(&mut conn, 20).await.map_err(db_error)?;
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    if json {
        let leases: Vec<serde_json::Value> = leases
            .iter()
            .map(|l| serde_json::json!({"name": l.name, "holder": l.holder, "token": l.token, "expires_in_ms": l.expires_in_ms}))
            .collect();
        let value = serde_json::json!({
            "schema": settings.schema.as_str(),
            "pending": backlog.pending,
            "oldest_pending_age_ms": ms(backlog.oldest_age),
            "since_last_publish_ms": ms(activity.since_last_publish),
            "failing": activity.failing,
            "held": backlog.held,
            "dead_letters": backlog.dead_letters,
            "blocked_keys": held.iter().map(|h| serde_json::json!({
                "topic": h.topic, "key": h.key.as_deref().map(String::from_utf8_lossy),
                "key_cut": h.key_cut, "head_sequence": h.head,
                "attempts": h.attempts, "failed_messages": h.failed_messages, "last_error": h.last_error,
            })).collect::<Vec<_>>(),
            "oldest_failure": activity.oldest_failure.as_ref().map(|f| {
                serde_json::json!({"sequence": f.sequence, "attempts": f.attempts, "last_error": f.error})
            }),
            "oldest_snapshot": snapshot.as_ref().map(|s| serde_json::json!({
                "pid": s.pid, "age_ms": s.age.as_millis() as u64, "state": s.state,
                "application_name": s.application_name,
            })),
            "leases": leases,
        });
        println!("{value}");
    } else {
        println!("schema:              {}", settings.schema);
        println!("pending messages:    {}", backlog.pending);
        match backlog.oldest_age {
            Some(age) => println!("oldest pending age:  {:.1}s", age.as_secs_f64()),
            None => println!("oldest pending age:  -"),
        }
        match activity.since_last_publish {
            Some(age) => println!("last publish:        {:.1}s ago", age.as_secs_f64()),
            None => println!("last publish:        - (none kept)"),
        }
        println!("failing messages:    {}", activity.failing);
        println!("held (retry wait):   {}", backlog.held);
        println!("dead letters:        {}", backlog.dead_letters);
        match &snapshot {
            // Long-held snapshots keep dead index entries alive, and every claim walks them.
            Some(s) => println!(
                "oldest snapshot:     {:.1}s (pid {}, {}, application {:?})",
                s.age.as_secs_f64(),
                s.pid,
                printable(s.state.as_deref().unwrap_or("state hidden")),
                s.application_name
            ),
            None => println!("oldest snapshot:     - (no other session holds one)"),
        }
        for h in &held {
            println!(
                "blocked key:         topic {} key {} at sequence {} ({} attempts): {}",
                printable(&h.topic),
                key_text(h.key.as_deref(), h.key_cut),
                h.head,
                h.attempts,
                printable(h.last_error.as_deref().unwrap_or("-"))
            );
        }
        if let Some(failure) = &activity.oldest_failure {
            println!(
                "oldest failing:      sequence {}, {} attempts, last error: {}",
                failure.sequence,
                failure.attempts,
                printable(&failure.error)
            );
        }
        for lease in leases {
            let holder = printable(&lease.holder);
            let state = if lease.expires_in_ms > 0 {
                format!(
                    "held by {holder} (token {}, expires in {} ms)",
                    lease.token, lease.expires_in_ms
                )
            } else {
                format!("free (last holder {holder}, token {})", lease.token)
            };
            println!(
                "lease {:<14} {state}",
                format!("{}:", printable(&lease.name))
            );
        }
    }
    Ok(())
}

/// A message key for a terminal: UTF-8 (invalid bytes replaced), control characters escaped,
/// `-` for none, and "…" after a key the listings cut at [`outbox::admin::SHOWN_KEY_BYTES`].
fn key_text(key: Option<&[u8]>, cut: bool) -> String {
    match key {
        None => "-".into(),
        Some(key) => {
            let text = printable(&String::from_utf8_lossy(key)).into_owned();
            if cut {
                text + "…"
            } else {
                text
            }
        }
    }
}

/// `text` safe to print on a terminal: control characters (escape sequences could clear the
/// screen or forge lines) and invisible formatting (bidirectional overrides reorder what is
/// shown, zero-width characters hide), see [`outbox::admin::is_invisible_format`], are escaped
/// as `\u{..}`. Any SQL writer can store keys, topics and errors; JSON output is escaped by the
/// serializer instead.
fn printable(text: &str) -> Cow<'_, str> {
    let unsafe_char = |c: char| c.is_control() || outbox::admin::is_invisible_format(c);
    if !text.contains(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    Cow::Owned(shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_control_and_reordering_characters_only() {
        assert_eq!(printable("plain key é"), "plain key é");
        assert_eq!(
            printable("\x1b[2Jok\r\u{202e}\u{9b}"),
            "\\u{1b}[2Jok\\u{d}\\u{202e}\\u{9b}"
        );
        assert_eq!(printable("a\u{200b}b"), "a\\u{200b}b");
    }

    #[test]
    fn invalid_log_directives_are_named() {
        let error = log_filter(Some(OsStr::new("info,outbox_kafka_relay=loud")))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("OUTBOX_LOG") && error.contains("outbox_kafka_relay=loud"),
            "{error}"
        );
        log_filter(Some(OsStr::new("info,outbox_kafka_relay=debug"))).unwrap();
        log_filter(Some(OsStr::new(""))).unwrap();
        log_filter(None).unwrap();
    }
}
