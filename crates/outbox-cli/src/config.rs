//! One configuration for the CLI: a TOML file, then environment variables, then flags (later
//! wins). Unknown keys and `OUTBOX_*` variables are refused, errors name the key, variable or
//! flag the user wrote, and passwords never print (`--print-config`, errors, `Debug`).
//!
//! Each setting is one field of a `settings!` block ([`Config`], [`RelaySettings`]): its name is
//! the file key (serde's derive), the `--flag` (clap's) and `OUTBOX_<KEY>`, its doc the help, and
//! `=> field` the [`RelayConfig`] field it sets and `--print-config` shows. A macro around the
//! two derives, not clap's `env` or figment: clap reads variables as it builds the command and
//! blames a bad one's value on the flag, and neither could fill or print `RelayConfig` (another
//! crate's type, without serde). Defaults and ranges stay in [`RelayConfig::new`] and
//! [`RelayConfig::validate`], shared with the embedded relay; `--help` shows the defaults.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use outbox::SchemaName;
use outbox_kafka_relay::config::MAX_RETENTION;
use outbox_kafka_relay::{Completion, Delivery, PoisonPolicy, RelayConfig};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;

/// A PostgreSQL connection URL. `Debug` and `Display` mask its passwords ([`mask_url`]).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL itself, passwords included: for connecting, never for display.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Connect options; an error names `name` (how the user set it) and masks passwords.
    pub fn connect_options(&self, name: &str) -> Result<PgConnectOptions, ConfigError> {
        if !self.0.contains("://") {
            return Err(ConfigError::invalid(
                name,
                format!(
                    "expected a URL such as postgres://user:password@host:5432/database \
                     (key=value connection strings are not supported), got {:?}",
                    mask_url(&self.0)
                ),
            ));
        }
        PgConnectOptions::from_str(&self.0)
            .map_err(|e| ConfigError::invalid(name, format!("{}: {e}", mask_url(&self.0))))
    }
}

impl FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(DatabaseUrl(s.to_owned()))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_url(&self.0))
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&mask_url(&self.0), f)
    }
}

/// A configuration error: exit code 2, one line naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("invalid configuration file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong, and where.
        message: String,
    },
    /// A value is invalid.
    #[error("invalid configuration: {key}: {reason}")]
    Invalid {
        /// The key, variable or flag at fault, as the user wrote it.
        key: String,
        /// Why.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Declares settings, each once: an `Option` field, named by its file key, documented by its
/// `--help` text, read from `--<key>`, `OUTBOX_<KEY>` and the file; with `=> field`, the
/// [`RelayConfig`] field it sets through [`Field`]. `tables` are the file's sub-tables.
macro_rules! settings {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $( $(#[$meta:meta])* $key:ident: $ty:ty $(=> $field:ident)?, )*
        }
        $(tables { $( $(#[$table_meta:meta])* $table:ident: $table_ty:ty, )* })?
    ) => {
        #[derive(Debug, Default, Clone, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        $(#[$attr])*
        pub struct $name {
            $( $(#[$meta])* #[arg(long)] pub $key: Option<$ty>, )*
            $($( $(#[$table_meta])* #[arg(skip)] #[serde(default)] pub $table: $table_ty, )*)?
        }

        impl $name {
            /// The settings' file keys.
            pub const KEYS: &[&str] = &[$(stringify!($key)),*];

            /// Takes the settings `upper` sets, telling `given` their keys.
            fn overlay(&mut self, upper: &Self, mut given: impl FnMut(&'static str)) {
                $(if let Some(value) = &upper.$key {
                    self.$key = Some(value.clone());
                    given(stringify!($key));
                })*
            }

            /// Sets `key` from an environment variable's text; `None` if no setting is `key`.
            fn set_text(&mut self, key: &str, text: &str) -> Option<Result<(), String>> {
                match key {
                    $(stringify!($key) => Some(text.parse().map(|value| self.$key = Some(value))
                        .map_err(|e| format!("{e} (found {text:?})"))),)*
                    _ => None,
                }
            }

            /// Sets the [`RelayConfig`] fields; an error names the setting `name(key)`.
            fn apply(
                &self,
                relay: &mut RelayConfig,
                name: impl Fn(&str) -> String,
            ) -> Result<(), ConfigError> {
                $($(if let Some(value) = &self.$key {
                    Field::set(value.clone(), &mut relay.$field)
                        .map_err(|reason| ConfigError::invalid(&name(stringify!($key)), reason))?;
                })?)*
                Ok(())
            }

            /// The settings' values in `relay`, as TOML values, for `--print-config`.
            fn show(relay: &RelayConfig) -> Vec<(&'static str, String)> {
                let mut shown = Vec::new();
                $($(if let Some(value) = <$ty as Field<_>>::show(&relay.$field) {
                    shown.push((stringify!($key), value));
                })?)*
                shown
            }
        }
    };
}

settings! {
    /// Settings of every command: the file's top level, and flags of every command.
    pub struct Config {
        /// PostgreSQL URL, e.g. postgres://user:password@host:5432/database; also DATABASE_URL
        /// [default: the dev/up database]
        #[arg(global = true)]
        database_url: DatabaseUrl,
        /// Schema holding the outbox objects: a lower-case identifier, not an SQL keyword
        #[arg(global = true)]
        schema: String => schema,
    }
    tables {
        /// `[relay]`.
        relay: RelaySettings,
        /// `[kafka]`: librdkafka producer properties, verbatim.
        kafka: KafkaTable,
        /// `[console]`: the operator console's write actions.
        console: ConsoleTable,
    }
}

settings! {
    /// The relay's settings: the file's `[relay]` table, and flags of `outbox relay`.
    #[command(next_help_heading = "Relay settings (also the file's [relay] table)")]
    pub struct RelaySettings {
        /// The x-source header value, at most 255 bytes [default: "outbox:CLUSTER-ID:DATABASE:SCHEMA",
        /// from the cluster's system identifier, so unique per outbox]
        source: String => source,
        /// Relays sharing a lease name take turns, one publishing at a time
        lease_name: String => lease_name,
        /// Lease term: a standby takes over at most this long after the holder dies
        lease_ttl_ms: u64 => lease_ttl,
        /// How often the holder renews its lease: at most a third of the term
        lease_renew_interval_ms: u64 => lease_renew_interval,
        /// Messages per claim/publish/complete round
        batch_size: usize => batch_size,
        /// Bytes of keys, payloads and headers per round (a larger message goes alone)
        max_batch_bytes: usize => max_batch_bytes,
        /// Fallback poll interval, for when no notification arrives
        poll_interval_ms: u64 => poll_interval,
        /// Under light traffic, claim at most this often, so that batches fill
        batch_linger_ms: u64 => batch_linger,
        /// "keep" (move published messages to the `published` table) or "delete"
        completion: String => completion,
        /// How long published messages are kept, with completion "keep"
        retention_hours: f64 => completion,
        /// How often the retention cleanup runs
        cleanup_interval_ms: u64 => cleanup_interval,
        /// Rows deleted per cleanup statement
        cleanup_batch_size: usize => cleanup_batch_size,
        /// A message Kafka refuses for good: "block" (retried, holding its key) or "dead-letter"
        poison_policy: String => poison_policy,
        /// First retry delay after a failed delivery (doubled per failure, with jitter)
        backoff_initial_ms: u64 => backoff_initial,
        /// Longest retry delay
        backoff_max_ms: u64 => backoff_max,
        /// How long shutdown waits for in-flight deliveries
        shutdown_timeout_ms: u64 => shutdown_timeout,
        /// A leader with a backlog and no progress this long reports not ready
        stall_timeout_ms: u64 => stall_timeout,
        /// How often the backlog and Kafka's reachability are sampled (health, metrics)
        monitor_interval_ms: u64 => monitor_interval,
        /// Publish a message only once this many streaming standbys flushed its commit: no
        /// phantom events after a failover (0: publish at once)
        wait_for_standbys: u32 => wait_for_standbys,
        /// The standbys that count for wait_for_standbys, by application_name, comma-separated
        /// [default: every physical walsender but backups' and WAL archivers']
        standby_names: String => standby_names,
        /// "at-least-once", or "exactly-once": each batch one Kafka transaction, no duplicates
        /// for consumers reading with isolation.level=read_committed
        delivery: String => delivery,
        /// With exactly-once: the topic recording each transaction's outbox ids (created if
        /// missing; one per outbox)
        progress_topic: String => progress_topic,
    }
}

/// How a setting's value, as written, sets its [`RelayConfig`] field, and how `--print-config`
/// writes that field (`None`: not at all).
trait Field<T> {
    fn set(self, field: &mut T) -> Result<(), String>;
    fn show(field: &T) -> Option<String>;
}

/// Milliseconds.
impl Field<Duration> for u64 {
    fn set(self, field: &mut Duration) -> Result<(), String> {
        *field = Duration::from_millis(self);
        Ok(())
    }
    fn show(field: &Duration) -> Option<String> {
        Some(field.as_millis().to_string())
    }
}

/// A value the field takes as it is.
impl<T: Serialize> Field<T> for T {
    fn set(self, field: &mut T) -> Result<(), String> {
        *field = self;
        Ok(())
    }
    fn show(field: &T) -> Option<String> {
        toml::Value::try_from(field)
            .ok()
            .map(|value| value.to_string())
    }
}

impl Field<SchemaName> for String {
    fn set(self, field: &mut SchemaName) -> Result<(), String> {
        SchemaName::new(self)
            .map(|schema| *field = schema)
            .map_err(|e| e.to_string())
    }
    fn show(field: &SchemaName) -> Option<String> {
        Some(toml_string(field.as_str()))
    }
}

impl Field<PoisonPolicy> for String {
    fn set(self, field: &mut PoisonPolicy) -> Result<(), String> {
        *field = match self.as_str() {
            "block" => PoisonPolicy::Block,
            "dead-letter" => PoisonPolicy::DeadLetter,
            _ => {
                return Err(format!(
                    "must be \"block\" or \"dead-letter\", not {self:?}"
                ))
            }
        };
        Ok(())
    }
    fn show(field: &PoisonPolicy) -> Option<String> {
        Some(toml_string(match field {
            PoisonPolicy::Block => "block",
            PoisonPolicy::DeadLetter => "dead-letter",
        }))
    }
}

impl Field<Delivery> for String {
    fn set(self, field: &mut Delivery) -> Result<(), String> {
        *field = match self.as_str() {
            "at-least-once" => Delivery::AtLeastOnce,
            "exactly-once" => Delivery::ExactlyOnce,
            _ => {
                return Err(format!(
                    "must be \"at-least-once\" or \"exactly-once\", not {self:?}"
                ))
            }
        };
        Ok(())
    }
    fn show(field: &Delivery) -> Option<String> {
        Some(toml_string(match field {
            Delivery::AtLeastOnce => "at-least-once",
            Delivery::ExactlyOnce => "exactly-once",
        }))
    }
}

/// A comma-separated list (`standby_names`).
impl Field<Vec<String>> for String {
    fn set(self, field: &mut Vec<String>) -> Result<(), String> {
        *field = self
            .split(',')
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .collect();
        Ok(())
    }
    fn show(field: &Vec<String>) -> Option<String> {
        Some(toml_string(&field.join(",")))
    }
}

/// `completion`: "keep" leaves [`RelayConfig::new`]'s `Keep` and its retention as they are.
impl Field<Completion> for String {
    fn set(self, field: &mut Completion) -> Result<(), String> {
        match self.as_str() {
            "keep" => {}
            "delete" => *field = Completion::Delete,
            _ => return Err(format!("must be \"keep\" or \"delete\", not {self:?}")),
        }
        Ok(())
    }
    fn show(field: &Completion) -> Option<String> {
        Some(toml_string(match field {
            Completion::Keep { .. } => "keep",
            Completion::Delete => "delete",
        }))
    }
}

/// `retention_hours`: checked whatever the completion, used with `Keep`.
impl Field<Completion> for f64 {
    fn set(self, field: &mut Completion) -> Result<(), String> {
        let hours = retention_from_hours(self)?;
        if let Completion::Keep { retention } = field {
            *retention = hours;
        }
        Ok(())
    }
    fn show(field: &Completion) -> Option<String> {
        match field {
            Completion::Keep { retention } => Some((retention.as_secs_f64() / 3600.0).to_string()),
            Completion::Delete => None,
        }
    }
}

/// The `[kafka]` table: librdkafka producer properties, verbatim. `Debug` masks secrets.
#[derive(Default, Clone, Deserialize)]
#[serde(transparent)]
pub struct KafkaTable(BTreeMap<String, toml::Value>);

/// Only the keys: values may be secrets.
impl fmt::Debug for KafkaTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// The `[console]` table: whether the operator console (served with `outbox relay
/// --console-addr`) may act, and the token that authorises it (docs/operations.md, "Console").
/// No flags: a token on the command line shows in every process listing, and write access is
/// a decision for the deployment's configuration.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleTable {
    /// Enable write actions (retry and drop dead letters, republish); also OUTBOX_CONSOLE_WRITE.
    pub write: Option<bool>,
    /// The token that authorises them (at least 16 characters); also OUTBOX_CONSOLE_TOKEN.
    pub token: Option<Secret>,
    /// Names the console is reached by (behind a proxy, say), besides addresses and localhost:
    /// requests for other hosts are refused; also OUTBOX_CONSOLE_HOSTS (comma-separated).
    pub hosts: Option<Vec<String>>,
}

impl ConsoleTable {
    /// Sets `key` from an environment variable's text; `None` if there is no such key. A bad
    /// token is not echoed.
    fn set_text(&mut self, key: &str, text: &str) -> Option<Result<(), String>> {
        match key {
            "write" => Some(
                text.parse()
                    .map(|write| self.write = Some(write))
                    .map_err(|_| format!("must be true or false, not {text:?}")),
            ),
            "token" => {
                self.token = Some(Secret(text.to_owned()));
                Some(Ok(()))
            }
            "hosts" => {
                let hosts = text.split(',').map(str::trim).filter(|h| !h.is_empty());
                self.hosts = Some(hosts.map(str::to_owned).collect());
                Some(Ok(()))
            }
            _ => None,
        }
    }
}

/// A secret setting's value. `Debug` never shows it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("********")
    }
}

/// The command line's settings of every command: [`Config`]'s, and Kafka's.
#[derive(Default, Clone, clap::Args)]
pub struct Flags {
    /// The declared settings' flags.
    #[command(flatten)]
    pub config: Config,
    /// Kafka bootstrap servers (librdkafka `bootstrap.servers`); also KAFKA_BOOTSTRAP_SERVERS
    #[arg(long, global = true)]
    pub kafka_bootstrap_servers: Option<String>,
    /// Extra librdkafka producer property, KEY=VALUE (repeatable), e.g. `linger.ms=10`; also
    /// OUTBOX_KAFKA_PROPERTY_NAME (dots as underscores) and the file's `[kafka]` table
    #[arg(long = "kafka", value_name = "KEY=VALUE", global = true)]
    pub kafka: Vec<String>,
}

/// The Kafka flags' values may be secrets.
impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let f = &mut f.debug_struct("Flags");
        f.field("config", &self.config).finish_non_exhaustive()
    }
}

/// Conventional variables, read as the `OUTBOX_` one they stand for (which wins if both are set).
const ALIASES: [(&str, &str); 2] = [
    ("DATABASE_URL", "OUTBOX_DATABASE_URL"),
    ("KAFKA_BOOTSTRAP_SERVERS", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS"),
];

/// What the user wrote for each setting they gave, by file key (`relay.lease_ttl_ms`): the
/// key, the variable (`OUTBOX_LEASE_TTL_MS`) or the flag (`--lease-ttl-ms`).
type Names = BTreeMap<String, String>;

fn name(names: &Names, key: &str) -> String {
    names.get(key).cloned().unwrap_or_else(|| key.to_owned())
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|at| text[..at.start.min(text.len())].lines().count());
            let at = line.map(|line| format!(" (at line {})", line.max(1)));
            ConfigError::Parse {
                path: path.display().to_string(),
                message: e.message().to_owned() + &at.unwrap_or_default(),
            }
        })
    }

    /// Takes what `upper` sets, its tables included; `name(key, file key)` is what the user
    /// wrote for it.
    fn layer(&mut self, upper: &Config, names: &mut Names, name: impl Fn(&str, &str) -> String) {
        let mut given = |key: &str, path: String| {
            let name = name(key, &path);
            names.insert(path, name);
        };
        self.overlay(upper, |key| given(key, key.to_owned()));
        self.relay
            .overlay(&upper.relay, |key| given(key, format!("relay.{key}")));
        if let Some(write) = upper.console.write {
            self.console.write = Some(write);
            given("write", "console.write".into());
        }
        if let Some(token) = &upper.console.token {
            self.console.token = Some(token.clone());
            given("token", "console.token".into());
        }
        if let Some(hosts) = &upper.console.hosts {
            self.console.hosts = Some(hosts.clone());
            given("hosts", "console.hosts".into());
        }
        for (key, value) in &upper.kafka.0 {
            given(key, format!("kafka.{key}"));
            self.kafka.0.insert(key.clone(), value.clone());
        }
    }

    /// Applies the `OUTBOX_*` variables among `vars` (and their [`ALIASES`]): `OUTBOX_<KEY>` for
    /// each setting, `OUTBOX_KAFKA_<PROPERTY>` for Kafka's (dots as underscores). `OUTBOX_DEV_*`
    /// are the dev scripts'; any other `OUTBOX_*` is a mistake, refused by name.
    fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (OsString, OsString)>,
        names: &mut Names,
    ) -> Result<(), ConfigError> {
        let mut vars: Vec<(String, OsString)> = vars
            .into_iter()
            .map(|(name, value)| (name.to_string_lossy().into_owned(), value))
            .collect();
        vars.sort_by_key(|(name, _)| name.starts_with("OUTBOX_")); // the aliases first
        let upper_case = |b: u8| matches!(b, b'A'..=b'Z' | b'0'..=b'9' | b'_');
        for (name, value) in vars {
            let alias = ALIASES.iter().find(|(alias, _)| *alias == name);
            let variable = alias.map_or(name.as_str(), |(_, variable)| variable);
            let rest = variable.strip_prefix("OUTBOX_");
            let Some(rest) = rest.filter(|rest| !rest.starts_with("DEV_")) else {
                continue; // not ours, or the dev scripts'
            };
            if kubernetes_service_link(rest) {
                continue;
            }
            let invalid = |reason: &str| ConfigError::invalid(&name, reason);
            let value = value
                .into_string()
                .map_err(|_| invalid("not valid UTF-8"))?;
            if !rest.bytes().all(upper_case) {
                return Err(invalid("unknown environment variable"));
            }
            let key = rest.to_ascii_lowercase();
            let property = key.strip_prefix("kafka_").filter(|p| !p.is_empty());
            let path = if let Some(property) = property {
                let property = property.replace('_', ".");
                self.kafka.0.insert(property.clone(), value.into());
                format!("kafka.{property}")
            } else if let Some(set) = self.set_text(&key, &value) {
                set.map_err(|reason| invalid(&reason))?;
                key
            } else if let Some(set) = key
                .strip_prefix("console_")
                .and_then(|rest| self.console.set_text(rest, &value))
            {
                set.map_err(|reason| invalid(&reason))?;
                key.replacen("console_", "console.", 1)
            } else {
                let set = self.relay.set_text(&key, &value);
                set.ok_or_else(|| invalid("unknown environment variable"))?
                    .map_err(|reason| invalid(&reason))?;
                format!("relay.{key}")
            };
            names.insert(path, name);
        }
        Ok(())
    }
}

/// Whether `OUTBOX_<rest>` is one of the variables Kubernetes puts in every pod for each Service
/// of its namespace (`<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT[_<PORT NAME>]`, `<NAME>_PORT`,
/// `<NAME>_PORT_<N>_<PROTOCOL>[_ADDR|_PORT|_PROTO]`): a Service named `outbox` or `outbox-kafka`
/// must not make every `outbox` command refuse to start, nor set librdkafka properties.
fn kubernetes_service_link(rest: &str) -> bool {
    let tokens: Vec<&str> = rest.split('_').collect();
    tokens
        .iter()
        .enumerate()
        .any(|(i, token)| match (*token, &tokens[i + 1..]) {
            ("SERVICE", ["HOST"]) | ("SERVICE", ["PORT", ..]) | ("PORT", []) => true,
            ("PORT", [number, protocol, field @ ..]) => {
                number.bytes().all(|b| b.is_ascii_digit())
                    && matches!(*protocol, "TCP" | "UDP" | "SCTP")
                    && matches!(field, [] | ["ADDR" | "PORT" | "PROTO"])
            }
            _ => false,
        })
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PostgreSQL URL (validated).
    pub database_url: DatabaseUrl,
    /// Outbox schema.
    pub schema: SchemaName,
    /// Relay settings.
    pub relay: RelayConfig,
    /// No source was configured: the relay derives one from the database at startup
    /// ([`outbox::admin::Admin::default_source`]), unique per outbox.
    pub derive_source: bool,
    /// The operator console's write access.
    pub console: ConsoleSettings,
}

/// The operator console's settings (the `[console]` table, validated).
#[derive(Debug, Clone, Default)]
pub struct ConsoleSettings {
    /// Write actions are enabled.
    pub write: bool,
    /// The token that authorises them; set whenever `write` is.
    pub token: Option<outbox_console::Token>,
    /// Names the console answers to, besides addresses and localhost.
    pub hosts: Vec<String>,
}

const DEFAULT_DATABASE_URL: &str = "postgres://outbox:outbox@127.0.0.1:55432/outbox";
const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:19092";

/// The file key of a setting as [`RelayConfig::validate`] names it, which is its field's name:
/// the key adds the unit (`lease_ttl` is `relay.lease_ttl_ms`, `retention` is
/// `relay.retention_hours`); Kafka's keys are the same (`kafka.acks`).
fn file_key(setting: &str) -> String {
    ["", "_ms", "_hours"]
        .iter()
        .map(|unit| format!("{setting}{unit}"))
        .find(|key| RelaySettings::KEYS.contains(&key.as_str()))
        .map_or_else(|| setting.to_owned(), |key| format!("relay.{key}"))
}

/// A retention given in hours: finite, not negative, and not beyond what cleanup can compute.
pub fn retention_from_hours(hours: f64) -> Result<Duration, String> {
    let max_hours = MAX_RETENTION.as_secs() / 3600;
    if hours.is_finite() && (0.0..=max_hours as f64).contains(&hours) {
        Ok(Duration::from_secs_f64(hours * 3600.0))
    } else {
        Err(format!(
            "must be a number of hours from 0 to {max_hours} (100 years), not {hours:?}"
        ))
    }
}

/// `command` with each setting's variable and default ([`RelayConfig::new`]'s) in its help.
pub fn document(command: clap::Command) -> clap::Command {
    let defaults = RelayConfig::new(DEFAULT_BOOTSTRAP, "outbox");
    let mut shown = Config::show(&defaults);
    shown.extend(RelaySettings::show(&defaults));
    let keys: Vec<&str> = Config::KEYS
        .iter()
        .chain(RelaySettings::KEYS)
        .copied()
        .collect();
    let describe = move |arg: clap::Arg| {
        let key = arg.get_id().to_string();
        if !keys.contains(&key.as_str()) {
            return arg;
        }
        let default = match shown.iter().find(|(shown, _)| *shown == key) {
            Some((_, value)) if key != "source" => {
                format!(" [default: {}]", value.trim_matches('"'))
            }
            _ => String::new(),
        };
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let variable = key.to_ascii_uppercase();
        arg.help(format!("{help}{default} [env: OUTBOX_{variable}]"))
    };
    command
        .mut_args(describe.clone())
        .mut_subcommand("relay", |relay| relay.mut_args(describe))
}

impl Settings {
    /// Merges the defaults, the `file`, the environment `vars` (less those the caller reads
    /// itself) and the command line's `flags` (`outbox relay`'s in `relay_flags`), later over
    /// earlier, and validates the result.
    pub fn resolve(
        file: Config,
        vars: impl IntoIterator<Item = (OsString, OsString)>,
        flags: &Flags,
        relay_flags: Option<&RelaySettings>,
    ) -> Result<Self, ConfigError> {
        let mut names = Names::default();
        let mut config = Config::default();
        config.layer(&file, &mut names, |_, path| path.to_owned());
        config.apply_env(vars, &mut names)?;
        if let Some(servers) = &flags.kafka_bootstrap_servers {
            let servers = servers.clone().into();
            config.kafka.0.insert("bootstrap.servers".into(), servers);
            let flag = "--kafka-bootstrap-servers";
            names.insert("kafka.bootstrap.servers".into(), flag.into());
        }
        let mut upper = flags.config.clone();
        upper.relay = relay_flags.cloned().unwrap_or_default();
        for property in &flags.kafka {
            let Some((key, value)) = property.split_once('=') else {
                // Not echoed: a secret with a typo would be.
                return Err(ConfigError::invalid("--kafka", "expected KEY=VALUE"));
            };
            let value = value.trim().to_owned().into();
            upper.kafka.0.insert(key.trim().to_owned(), value);
        }
        config.layer(&upper, &mut names, |key, path| {
            match path.strip_prefix("kafka.") {
                Some(_) => format!("--kafka {key}=..."),
                None => format!("--{}", key.replace('_', "-")),
            }
        });

        // Replaced at startup when derived; validated like a configured one meanwhile.
        let mut relay = RelayConfig::new(DEFAULT_BOOTSTRAP, "outbox");
        config.apply(&mut relay, |key| name(&names, key))?;
        let relay_name = |key: &str| name(&names, &format!("relay.{key}"));
        config.relay.apply(&mut relay, relay_name)?;
        let database_url = config
            .database_url
            .unwrap_or_else(|| DatabaseUrl(DEFAULT_DATABASE_URL.to_owned()));
        database_url.connect_options(&name(&names, "database_url"))?;
        for (key, value) in config.kafka.0 {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Table(_) | toml::Value::Array(_) | toml::Value::Datetime(_) => {
                    let key = name(&names, &format!("kafka.{key}"));
                    let reason = "must be a string, number or boolean";
                    return Err(ConfigError::invalid(&key, reason));
                }
                value => value.to_string(),
            };
            relay.kafka.set(key, value);
        }
        relay.validate().map_err(|e| {
            let key = file_key(&e.key);
            // A rule between two settings blames the one(s) the user set.
            let mut blamed: Vec<String> = [Some(key.clone()), e.counterpart().map(file_key)]
                .into_iter()
                .flatten()
                .filter_map(|k| names.get(&k).cloned())
                .collect();
            if blamed.is_empty() {
                blamed.push(name(&names, &key));
            }
            ConfigError::invalid(&blamed.join(" and "), e.reason)
        })?;
        let token = match config.console.token {
            Some(Secret(token)) => Some(outbox_console::Token::new(token).map_err(|e| {
                ConfigError::invalid(&name(&names, "console.token"), e.to_string())
            })?),
            None => None,
        };
        let write = config.console.write.unwrap_or(false);
        if write && token.is_none() {
            return Err(ConfigError::invalid(
                &name(&names, "console.write"),
                "write actions need a token: set console.token or OUTBOX_CONSOLE_TOKEN",
            ));
        }
        Ok(Settings {
            console: ConsoleSettings {
                write,
                token,
                hosts: config.console.hosts.unwrap_or_default(),
            },
            database_url,
            schema: relay.schema.clone(),
            derive_source: config.relay.source.is_none(),
            relay,
        })
    }

    /// The effective configuration as TOML, secrets masked. Read back, it configures the same.
    pub fn to_masked_toml(&self) -> String {
        let url = toml_string(&self.database_url.to_string());
        let mut out = format!("database_url = {url}\n");
        let tables = [
            ("", Config::show(&self.relay)),
            ("\n[relay]\n", RelaySettings::show(&self.relay)),
        ];
        for (header, shown) in tables {
            out.push_str(header);
            for (key, value) in shown {
                if key == "source" && self.derive_source {
                    out.push_str(
                        "# source: not set; derived at startup from the database, unique per \
                         outbox:\n# \"outbox:<cluster system identifier>:<database>:<schema>\"\n",
                    );
                } else {
                    out.push_str(&format!("{key} = {value}\n"));
                }
            }
        }
        out.push_str(&format!("\n[console]\nwrite = {}\n", self.console.write));
        let hosts: Vec<String> = self.console.hosts.iter().map(|h| toml_string(h)).collect();
        out.push_str(&format!("hosts = [{}]\n", hosts.join(", ")));
        if self.console.token.is_some() {
            out.push_str("# token: set, not shown\n");
        }
        out.push_str("\n[kafka]\n");
        for (key, value) in self.relay.kafka.masked() {
            let (key, value) = (toml_string(&key), toml_string(&value));
            out.push_str(&format!("{key} = {value}\n"));
        }
        out
    }
}

/// `text` as a TOML string (quoted and escaped).
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// A connection string for display, passwords masked: in a URL the user info's password (up to
/// the last `@`: a password may contain more) and any query parameter named like `password`; in
/// libpq's `key=value` form every value of a key named like `password`. A string that cannot be
/// read is masked from where reading failed: masking too much beats leaking.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return mask_key_values(url);
    };
    let rest = &url[scheme_end..];
    let mut masked = url[..scheme_end].to_owned();
    let after_userinfo = match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.split_once(':') {
                Some((user, _)) => masked.push_str(&format!("{user}:********")),
                None => masked.push_str(userinfo),
            }
            &rest[at..]
        }
        None => rest,
    };
    masked.push_str(after_userinfo);
    match masked.split_once('?') {
        Some((base, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|parameter| match parameter.split_once('=') {
                    Some((name, _)) if is_password_key(name) => format!("{name}=********"),
                    _ => parameter.to_owned(),
                })
                .collect();
            format!("{base}?{}", query.join("&"))
        }
        None => masked,
    }
}

fn is_password_key(name: &str) -> bool {
    name.to_ascii_lowercase().contains("password")
}

/// libpq's `keyword = value ...`, where a value is a word or a single-quoted string with
/// backslash escapes.
fn mask_key_values(text: &str) -> String {
    fn skip_spaces(rest: &mut &str, masked: &mut String) {
        let trimmed = rest.trim_start();
        masked.push_str(&rest[..rest.len() - trimmed.len()]);
        *rest = trimmed;
    }
    let mut masked = String::new();
    let mut rest = text;
    loop {
        skip_spaces(&mut rest, &mut masked);
        if rest.is_empty() {
            return masked;
        }
        let keyword_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let keyword = &rest[..keyword_end];
        masked.push_str(keyword);
        rest = &rest[keyword_end..];
        skip_spaces(&mut rest, &mut masked);
        let Some(value) = rest.strip_prefix('=') else {
            masked.push_str("********");
            return masked;
        };
        masked.push('=');
        rest = value;
        skip_spaces(&mut rest, &mut masked);
        let value_end = if let Some(quoted) = rest.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|&(_, c)| match c {
                    _ if escaped => {
                        escaped = false;
                        false
                    }
                    '\\' => {
                        escaped = true;
                        false
                    }
                    c => c == '\'',
                })
                .map_or(rest.len(), |(i, _)| i + 2)
        } else {
            rest.find(char::is_whitespace).unwrap_or(rest.len())
        };
        if is_password_key(keyword) {
            masked.push_str("********");
        } else {
            masked.push_str(&rest[..value_end]);
        }
        rest = &rest[value_end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::os::unix::ffi::OsStringExt;

    /// Resolves the file `text`, the environment `env` and `outbox relay <args>`.
    pub(super) fn resolve_with(
        text: &str,
        env: Vec<(OsString, OsString)>,
        args: &[&str],
    ) -> Result<Settings, String> {
        let file: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        let command_line = ["outbox", "relay"].iter().chain(args);
        let cli = crate::Cli::try_parse_from(command_line).map_err(|e| e.to_string())?;
        let crate::Command::Relay { settings, .. } = &cli.command else {
            unreachable!("parsed as `outbox relay`")
        };
        Settings::resolve(file, env, &cli.flags, Some(settings)).map_err(|e| e.to_string())
    }

    pub(super) fn resolve(
        text: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Settings, String> {
        let env = env.iter().map(|(k, v)| (k.into(), v.into())).collect();
        resolve_with(text, env, args)
    }

    fn parse(text: &str) -> Result<Settings, String> {
        resolve(text, &[], &[])
    }

    #[test]
    fn the_environment_overrides_the_file_and_flags_override_both() {
        let file = "schema = \"from_file\"\n[relay]\nbatch_size = 10\nlease_name = \"file\"\n\
                    [kafka]\n\"linger.ms\" = 20\n\"acks\" = \"all\"\n";
        let env = [
            ("OUTBOX_BATCH_SIZE", "20"),
            ("OUTBOX_LEASE_NAME", "env"),
            ("OUTBOX_KAFKA_LINGER_MS", "7"),
            ("OUTBOX_KAFKA_ACKS", "-1"),
            ("DATABASE_URL", "postgres://me@db/alias"),
            ("OUTBOX_DATABASE_URL", "postgres://me@db/outbox"),
        ];
        let args = [
            "--schema=from_flag",
            "--lease-name=flag",
            "--kafka=linger.ms=1",
        ];
        let settings = resolve(file, &env, &args).unwrap();
        assert_eq!(settings.schema.as_str(), "from_flag");
        assert_eq!(settings.relay.lease_name, "flag");
        assert_eq!(settings.relay.batch_size, 20);
        assert_eq!(settings.relay.kafka.get("linger.ms"), Some("1"));
        assert_eq!(settings.relay.kafka.get("acks"), Some("-1"));
        assert_eq!(settings.database_url.expose(), "postgres://me@db/outbox");
    }

    /// A mistyped or misplaced variable once configured nothing, silently: `OUTBOX_Batch_Size`
    /// was read as `OUTBOX_BATCH_SIZE`, `OUTBOX_KAFKA_` set a property named "".
    #[test]
    fn unknown_outbox_variables_are_refused_by_name() {
        let not_utf8 = OsString::from_vec(b"OUTBOX_BATCH_\xff".to_vec());
        for name in [
            "OUTBOX_BATCH_SISE".into(),
            "OUTBOX_Batch_Size".into(),
            "OUTBOX_RELAY_BATCH_SIZE".into(),
            "OUTBOX_KAFKA_".into(),
            "OUTBOX_".into(),
            not_utf8,
        ] {
            let shown = name.to_string_lossy().into_owned();
            let error = resolve_with("", vec![(name, "1".into())], &[]).unwrap_err();
            assert!(
                error.starts_with(&format!("invalid configuration: {shown}: ")),
                "{error}"
            );
        }
        // Values that are not UTF-8: refused in a setting, ignored elsewhere.
        let value = OsString::from_vec(b"\xff".to_vec());
        let error = resolve_with("", vec![("OUTBOX_SOURCE".into(), value.clone())], &[]);
        assert!(error
            .unwrap_err()
            .contains("OUTBOX_SOURCE: not valid UTF-8"));
        let ignored = vec![
            ("PATH".into(), value),
            (OsString::from_vec(b"OTHER_\xff".to_vec()), "x".into()),
            ("OUTBOX_DEV_CACHE".into(), "/x".into()),
        ];
        resolve_with("", ignored, &[]).unwrap();
    }

    /// Kubernetes gives every pod variables for each Service of its namespace: Services named
    /// `outbox` and `outbox-kafka` made every command refuse to start (a crash loop), and set
    /// librdkafka properties such as `service.host`.
    #[test]
    fn kubernetes_service_link_variables_are_not_settings() {
        let links = [
            "OUTBOX_SERVICE_HOST",
            "OUTBOX_SERVICE_PORT",
            "OUTBOX_SERVICE_PORT_METRICS",
            "OUTBOX_PORT",
            "OUTBOX_PORT_9090_TCP",
            "OUTBOX_PORT_9090_TCP_ADDR",
            "OUTBOX_PORT_9090_TCP_PORT",
            "OUTBOX_PORT_9090_TCP_PROTO",
            "OUTBOX_KAFKA_SERVICE_HOST",
            "OUTBOX_KAFKA_SERVICE_PORT",
            "OUTBOX_KAFKA_PORT_9092_TCP_ADDR",
        ];
        let env = links
            .iter()
            .map(|name| (OsString::from(name), OsString::from("10.0.0.1")))
            .collect();
        let settings = resolve_with("", env, &[]).unwrap();
        let properties: Vec<String> = settings.relay.kafka.masked().into_keys().collect();
        assert!(
            properties
                .iter()
                .all(|p| !p.contains("service") && !p.starts_with("port")),
            "{properties:?}"
        );
        // Not a pattern of theirs: still refused.
        for name in [
            "OUTBOX_PORTS",
            "OUTBOX_PORT_X_TCP",
            "OUTBOX_SERVICE_HOSTNAME",
        ] {
            let env = vec![(OsString::from(name), OsString::from("1"))];
            assert!(resolve_with("", env, &[]).is_err(), "{name}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let error = parse("[relay]\nbatch_sise = 10\n").unwrap_err();
        assert!(error.contains("batch_sise"), "{error}");
        let error = parse("relay_batch_size = 10\n").unwrap_err();
        assert!(error.contains("relay_batch_size"), "{error}");
    }

    #[test]
    fn lease_shorter_than_renewal_is_rejected_by_name() {
        let error =
            parse("[relay]\nlease_ttl_ms = 1000\nlease_renew_interval_ms = 900\n").unwrap_err();
        assert!(error.contains("relay.lease_renew_interval"), "{error}");
    }

    #[test]
    fn negative_retention_is_rejected_by_name() {
        let error = parse("[relay]\nretention_hours = -1\n").unwrap_err();
        assert!(error.contains("relay.retention_hours"), "{error}");
    }

    #[test]
    fn printed_configuration_masks_secrets() {
        let settings = parse(
            "database_url = \"postgres://u:pw@h/db\"\n[kafka]\n\"sasl.password\" = \"hunter2\"\n",
        )
        .unwrap();
        let shown = settings.to_masked_toml();
        assert!(
            !shown.contains("hunter2") && !shown.contains(":pw@"),
            "{shown}"
        );
        assert!(shown.contains("sasl.password"));
    }

    #[test]
    fn help_shows_each_settings_variable_and_default() {
        use clap::CommandFactory;
        let mut command = document(crate::Cli::command());
        command.build();
        let help = command
            .find_subcommand_mut("relay")
            .unwrap()
            .render_long_help()
            .to_string();
        for expected in [
            "--lease-ttl-ms <LEASE_TTL_MS>",
            "[default: 10000] [env: OUTBOX_LEASE_TTL_MS]",
            "[default: keep] [env: OUTBOX_COMPLETION]",
            "[default: outbox] [env: OUTBOX_SCHEMA]",
        ] {
            assert!(help.contains(expected), "{expected}:\n{help}");
        }
    }
}

#[cfg(test)]
mod documented_keys {
    //! docs/operations.md's configuration example is the list of keys users are told about:
    //! they are the declared settings, and each is accepted, reaches the relay's configuration
    //! the same way from the file, its variable and its flag, and is printed by
    //! `--print-config`.

    use super::tests::resolve;
    use super::*;

    const OPERATIONS: &str = include_str!("../../../docs/operations.md");

    /// The example under "## Configuration".
    fn documented_example() -> String {
        let section = OPERATIONS
            .split("## Configuration")
            .nth(1)
            .expect("docs/operations.md has a Configuration section");
        let block = section
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the Configuration section has a TOML example");
        block.to_owned()
    }

    fn documented_table() -> toml::Table {
        documented_example()
            .parse()
            .expect("the documented example is valid TOML")
    }

    /// The settings in `table`: (file key, key, value), the `[kafka]` table aside.
    fn settings_in(table: &toml::Table) -> Vec<(String, String, toml::Value)> {
        let mut settings = Vec::new();
        for (key, value) in table {
            match value {
                toml::Value::Table(relay) if key == "relay" => settings.extend(
                    relay
                        .iter()
                        .map(|(k, v)| (format!("relay.{k}"), k.clone(), v.clone())),
                ),
                toml::Value::Table(_) => {}
                value => settings.push((key.clone(), key.clone(), value.clone())),
            }
        }
        settings
    }

    fn sorted<T: Ord>(mut items: Vec<T>) -> Vec<T> {
        items.sort();
        items
    }

    /// A valid value other than `value`, of the same type.
    fn another(key: &str, value: &toml::Value) -> toml::Value {
        match (key, value) {
            ("completion", _) => "delete".into(),
            ("poison_policy", _) => "dead-letter".into(),
            ("delivery", _) => "exactly-once".into(),
            (_, toml::Value::String(s)) => format!("{s}x").into(),
            (_, toml::Value::Integer(i)) => (i + 1).into(),
            (_, toml::Value::Float(f)) => (f + 1.0).into(),
            (key, other) => panic!("no other value for {key} = {other}"),
        }
    }

    /// What a setting can change: the database URL (masked) and the relay's configuration.
    fn effect(settings: Result<Settings, String>, what: &str) -> String {
        let settings = settings.unwrap_or_else(|e| panic!("{what}: {e}"));
        format!("{:?} {:?}", settings.database_url, settings.relay)
    }

    #[test]
    fn documented_example_is_accepted() {
        let settings = resolve(&documented_example(), &[], &[]).unwrap();
        assert_eq!(settings.schema.as_str(), "outbox");
    }

    #[test]
    fn the_documented_keys_are_the_declared_settings() {
        let documented = settings_in(&documented_table())
            .into_iter()
            .map(|(_, key, _)| key);
        let declared = Config::KEYS.iter().chain(RelaySettings::KEYS);
        assert_eq!(
            sorted(documented.collect()),
            sorted(declared.map(|key| key.to_string()).collect())
        );
    }

    #[test]
    fn every_documented_key_reaches_the_relay_config_from_the_file_its_variable_and_its_flag() {
        let example = documented_example();
        let base = effect(resolve(&example, &[], &[]), "the example");
        for (path, key, value) in settings_in(&documented_table()) {
            let other = another(&key, &value);
            let mut table = documented_table();
            match path.strip_prefix("relay.") {
                Some(_) => table["relay"][&key] = other.clone(),
                None => table[&key] = other.clone(),
            }
            let from_file = effect(resolve(&table.to_string(), &[], &[]), &path);
            assert_ne!(
                base, from_file,
                "{path} = {other} did not reach RelayConfig"
            );

            let text = match &other {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let variable = format!("OUTBOX_{}", key.to_ascii_uppercase());
            let from_env = effect(resolve(&example, &[(&variable, &text)], &[]), &variable);
            assert_eq!(from_file, from_env, "{variable} is not read like {path}");
            let flag = format!("--{}", key.replace('_', "-"));
            let from_flag = effect(resolve(&example, &[], &[&flag, &text]), &flag);
            assert_eq!(from_file, from_flag, "{flag} is not read like {path}");
        }
    }

    #[test]
    fn printed_configuration_names_every_documented_key_and_reads_back_the_same() {
        let settings = resolve(&documented_example(), &[], &[]).unwrap();
        let printed = settings.to_masked_toml();
        let reread: toml::Table = printed.parse().unwrap_or_else(|e| panic!("{e}\n{printed}"));
        let keys = |table: &toml::Table| {
            sorted(
                settings_in(table)
                    .into_iter()
                    .map(|(path, ..)| path)
                    .collect(),
            )
        };
        assert_eq!(keys(&documented_table()), keys(&reread), "{printed}");
        let again = resolve(&printed, &[], &[]).unwrap();
        assert_eq!(
            format!("{:?}", settings.relay),
            format!("{:?}", again.relay),
            "{printed}"
        );
    }
}

#[cfg(test)]
mod user_errors {
    //! Errors name what the user wrote (the file's key, the variable or the flag), values that
    //! cannot work are refused at startup, and secrets never show.

    use super::tests::resolve;
    use super::*;

    fn error(file: &str, env: &[(&str, &str)]) -> String {
        error_with(file, env, &[])
    }

    fn error_with(file: &str, env: &[(&str, &str)], args: &[&str]) -> String {
        match resolve(file, env, args) {
            Ok(settings) => panic!("accepted {file:?} {env:?} {args:?}: {:?}", settings.relay),
            Err(error) => error,
        }
    }

    #[test]
    fn errors_name_the_variable_key_or_flag_the_user_set() {
        let e = error("", &[("OUTBOX_LEASE_TTL_MS", "50")]);
        assert!(e.contains("OUTBOX_LEASE_TTL_MS"), "{e}");
        assert!(!e.contains("relay.lease_ttl:"), "{e}");
        let e = error_with("", &[], &["--lease-ttl-ms", "50"]);
        assert!(
            e.starts_with("invalid configuration: --lease-ttl-ms: "),
            "{e}"
        );

        let e = error("[relay]\nlease_ttl_ms = 50\n", &[]);
        assert!(e.contains("relay.lease_ttl_ms"), "{e}");

        // The user lowered the cap below the default first delay: blame the cap.
        let e = error("", &[("OUTBOX_BACKOFF_MAX_MS", "50")]);
        assert!(e.contains("OUTBOX_BACKOFF_MAX_MS"), "{e}");
        let e = error("[relay]\nbackoff_max_ms = 50\n", &[]);
        assert!(e.contains("relay.backoff_max_ms"), "{e}");
        assert!(!e.contains("relay.backoff_initial"), "{e}");

        // A term shorter than three default renewals: the term is what the user wrote.
        let e = error("[relay]\nlease_ttl_ms = 1000\n", &[]);
        assert!(e.contains("relay.lease_ttl_ms"), "{e}");

        let e = error("schema = \"order\"\n", &[]);
        assert!(e.starts_with("invalid configuration: schema: "), "{e}");
        let e = error("", &[("OUTBOX_SCHEMA", "order")]);
        assert!(
            e.starts_with("invalid configuration: OUTBOX_SCHEMA: "),
            "{e}"
        );
        let e = error_with("", &[], &["--schema", "order"]);
        assert!(e.starts_with("invalid configuration: --schema: "), "{e}");

        let e = error("", &[("OUTBOX_MONITOR_INTERVAL_MS", "120000")]);
        assert!(e.contains("OUTBOX_MONITOR_INTERVAL_MS"), "{e}");
        let e = error("[kafka]\nacks = \"1\"\n", &[("OUTBOX_KAFKA_ACKS", "0")]);
        assert!(e.contains("OUTBOX_KAFKA_ACKS"), "{e}");
        let e = error_with("", &[], &["--kafka", "acks=0"]);
        assert!(e.contains("--kafka acks="), "{e}");
        let e = error("", &[("DATABASE_URL", "host=db")]);
        assert!(
            e.starts_with("invalid configuration: DATABASE_URL: "),
            "{e}"
        );
    }

    #[test]
    fn impossible_and_absurd_values_are_refused_by_name() {
        for (file, env, name) in [
            (
                "[relay]\nmonitor_interval_ms = 0\n",
                vec![],
                "relay.monitor_interval_ms",
            ),
            (
                "",
                vec![("OUTBOX_MONITOR_INTERVAL_MS", "0")],
                "OUTBOX_MONITOR_INTERVAL_MS",
            ),
            (
                "[relay]\nstall_timeout_ms = 10\n",
                vec![],
                "relay.stall_timeout_ms",
            ),
            (
                "",
                vec![("OUTBOX_RETENTION_HOURS", "1e300")],
                "OUTBOX_RETENTION_HOURS",
            ),
            (
                "",
                vec![("OUTBOX_RETENTION_HOURS", "inf")],
                "OUTBOX_RETENTION_HOURS",
            ),
            (
                "[relay]\nretention_hours = 1e300\n",
                vec![],
                "relay.retention_hours",
            ),
            (
                "",
                vec![("OUTBOX_CLEANUP_BATCH_SIZE", "18446744073709551615")],
                "OUTBOX_CLEANUP_BATCH_SIZE",
            ),
            (
                "",
                vec![("OUTBOX_LEASE_TTL_MS", "18446744073709551615")],
                "OUTBOX_LEASE_TTL_MS",
            ),
            (
                "",
                vec![("OUTBOX_SHUTDOWN_TIMEOUT_MS", "18446744073709551615")],
                "OUTBOX_SHUTDOWN_TIMEOUT_MS",
            ),
            (
                "",
                vec![("OUTBOX_POLL_INTERVAL_MS", "18446744073709551615")],
                "OUTBOX_POLL_INTERVAL_MS",
            ),
            (
                "",
                vec![("OUTBOX_BATCH_SIZE", "99999999999999999999999")],
                "OUTBOX_BATCH_SIZE",
            ),
        ] {
            let e = error(file, &env);
            assert!(e.contains(name), "{file:?} {env:?}: {e}");
        }
    }

    #[test]
    fn database_passwords_never_show() {
        for (url, secret) in [
            ("postgres://me@db/app?password=query-secret", "query-secret"),
            (
                "postgres://me@db/app?sslmode=disable&password=query-secret&x=1",
                "query-secret",
            ),
            ("postgres://me:half@masked@db/app", "masked"),
            ("postgres://me:p%40ss-secret@db/app", "ss-secret"),
        ] {
            let settings = resolve(&format!("database_url = {url:?}\n"), &[], &[])
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            for shown in [
                settings.to_masked_toml(),
                format!("{settings:?}"),
                mask_url(url),
            ] {
                assert!(!shown.contains(secret), "{url}: {shown}");
            }
            assert!(mask_url(url).contains("db/app"), "{}", mask_url(url));
        }
        // libpq's key=value form is not a URL: refused by name, the password masked.
        for conninfo in [
            "host=db user=me password=kv-secret dbname=app",
            "host=db password = 'kv-secret with spaces' dbname=app",
        ] {
            let e = error(&format!("database_url = {conninfo:?}\n"), &[]);
            assert!(e.contains("database_url"), "{e}");
            assert!(!e.contains("kv-secret"), "{e}");
            assert!(
                !mask_url(conninfo).contains("kv-secret"),
                "{}",
                mask_url(conninfo)
            );
        }
    }

    #[test]
    fn console_writes_need_a_token_which_never_shows() {
        let e = error("[console]\nwrite = true\n", &[]);
        assert!(e.contains("console.write") && e.contains("token"), "{e}");
        let e = error("", &[("OUTBOX_CONSOLE_WRITE", "true")]);
        assert!(e.contains("OUTBOX_CONSOLE_WRITE"), "{e}");
        let e = error("", &[("OUTBOX_CONSOLE_WRITE", "yes")]);
        assert!(e.contains("OUTBOX_CONSOLE_WRITE"), "{e}");
        let e = error("[console]\ntoken = \"short-secret\"\n", &[]);
        assert!(
            e.contains("console.token") && !e.contains("short-secret"),
            "{e}"
        );
        let e = error("", &[("OUTBOX_CONSOLE_TOKEN", "short-secret")]);
        assert!(
            e.contains("OUTBOX_CONSOLE_TOKEN") && !e.contains("short-secret"),
            "{e}"
        );
        let e = error("[console]\nwritable = true\n", &[]);
        assert!(e.contains("writable"), "{e}");

        let file = "[console]\nwrite = true\ntoken = \"file-console-secret\"\n";
        let settings =
            resolve(file, &[("OUTBOX_CONSOLE_TOKEN", "env-console-secret")], &[]).unwrap();
        assert!(settings.console.write && settings.console.token.is_some());
        let parsed: Config = toml::from_str(file).unwrap();
        let shown = format!("{} {settings:?} {parsed:?}", settings.to_masked_toml());
        assert!(!shown.contains("console-secret"), "{shown}");
        assert!(settings.to_masked_toml().contains("write = true"));
        let hosts = "[console]\nhosts = [\"console.example\"]\n";
        let settings = resolve(hosts, &[], &[]).unwrap();
        assert_eq!(settings.console.hosts, ["console.example"]);
        let shown = settings.to_masked_toml();
        assert!(shown.contains("hosts = [\"console.example\"]"), "{shown}");
        let settings = resolve(
            hosts,
            &[("OUTBOX_CONSOLE_HOSTS", "a.example, b.example:8443")],
            &[],
        );
        assert_eq!(
            settings.unwrap().console.hosts,
            ["a.example", "b.example:8443"]
        );
        let off = resolve("", &[("OUTBOX_CONSOLE_WRITE", "false")], &[]).unwrap();
        assert!(!off.console.write && off.console.token.is_none());
    }

    #[test]
    fn debug_output_of_the_configuration_masks_secrets() {
        let text = "database_url = \"postgres://me:db-secret@db/app\"\n\
                    [kafka]\n\"sasl.password\" = \"kafka-secret\"\n";
        let file: Config = toml::from_str(text).unwrap();
        let cli = <crate::Cli as clap::Parser>::try_parse_from([
            "outbox",
            "--database-url=postgres://me:db-secret@db/app",
            "--kafka=sasl.password=kafka-secret",
            "relay",
        ])
        .unwrap();
        let shown = format!("{file:?} {cli:?}");
        let settings = Settings::resolve(file, Vec::new(), &cli.flags, None).unwrap();
        let shown = format!("{shown} {settings:?}");
        assert!(
            !shown.contains("db-secret") && !shown.contains("kafka-secret"),
            "{shown}"
        );
    }
}
