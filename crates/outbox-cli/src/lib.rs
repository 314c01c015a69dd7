//! The `outbox` command: migrate the schema, run the relay as a daemon, enqueue from scripts,
//! and inspect the outbox. Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration.

pub mod config;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use outbox::{Message, Outbox, OutboxConfig};
use outbox_relay::Relay;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::config::{mask_url, ConfigError, FileConfig, Overrides, Settings};

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
    /// Settings that override the file.
    #[command(flatten)]
    pub overrides: Overrides,
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
    /// Run the relay until SIGTERM or SIGINT, then shut down gracefully.
    Relay {
        /// Print the effective configuration (secrets masked) and exit.
        #[arg(long)]
        print_config: bool,
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
    /// Show the backlog and the lease holder.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
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
    let cli = Cli::parse();
    init_logging(cli.log_format);
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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OUTBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs a parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let settings = Settings::resolve(file, &cli.overrides)?;
    match cli.command {
        Command::Relay { print_config: true } => {
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
        } => run_relay(settings).await,
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
        Command::Status { json } => status(&settings, json).await,
    }
}

fn writer(settings: &Settings) -> Outbox {
    Outbox::new(OutboxConfig {
        schema: settings.schema.clone(),
        ..OutboxConfig::default()
    })
}

fn db_error(error: sqlx::Error) -> CliError {
    CliError::Runtime(format!("database error: {error}"))
}

async fn connect(settings: &Settings) -> Result<PgPool, CliError> {
    let url = mask_url(&settings.database_url);
    let options =
        PgConnectOptions::from_str(&settings.database_url).map_err(|e| ConfigError::Invalid {
            key: "database_url".into(),
            reason: format!("{url}: {e}"),
        })?;
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

async fn run_relay(settings: Settings) -> Result<(), CliError> {
    let pool = connect(&settings).await?;
    tracing::info!(
        schema = %settings.schema,
        source = %settings.relay.source,
        kafka = ?settings.relay.kafka,
        "starting the relay"
    );
    let mut relay =
        Relay::start(pool, settings.relay).map_err(|e| CliError::Runtime(e.to_string()))?;
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
    let statements = outbox::postgres::Statements::new(&settings.schema);
    let mut conn = pool.acquire().await.map_err(db_error)?;
    let backlog = statements.backlog(&mut conn).await.map_err(|e| {
        CliError::Runtime(format!(
            "cannot read the outbox in schema {} (run `outbox migrate`?): {e}",
            settings.schema
        ))
    })?;
    let leases = statements.leases(&mut conn).await.map_err(db_error)?;
    if json {
        let leases: Vec<serde_json::Value> = leases
            .iter()
            .map(|l| serde_json::json!({"name": l.name, "holder": l.holder, "token": l.token, "expires_in_ms": l.expires_in_ms}))
            .collect();
        let value = serde_json::json!({
            "schema": settings.schema.as_str(),
            "pending": backlog.pending,
            "oldest_pending_age_ms": backlog.oldest_age.map(|a| a.as_millis() as u64),
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
        for lease in leases {
            let state = if lease.expires_in_ms > 0 {
                format!(
                    "held by {} (token {}, expires in {} ms)",
                    lease.holder, lease.token, lease.expires_in_ms
                )
            } else {
                format!("free (last holder {}, token {})", lease.holder, lease.token)
            };
            println!("lease {:<14} {state}", format!("{}:", lease.name));
        }
    }
    Ok(())
}
