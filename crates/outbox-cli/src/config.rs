//! One configuration for the CLI: a TOML file, then environment variables, then flags (later
//! wins). Unknown keys are rejected, and every error names the key, variable or flag the user
//! wrote. Passwords never print: not in `--print-config`, errors or `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use outbox::is_secret_property;
use outbox::SchemaName;
use outbox_kafka_relay::config::MAX_RETENTION;
use outbox_kafka_relay::{Completion, KafkaConfig, PoisonPolicy, RelayConfig};
use serde::Deserialize;
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

/// The configuration file's shape.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// PostgreSQL URL.
    pub database_url: Option<DatabaseUrl>,
    /// Outbox schema.
    pub schema: Option<String>,
    /// Relay settings.
    #[serde(default)]
    pub relay: RelayFile,
    /// librdkafka producer properties, verbatim.
    #[serde(default)]
    pub kafka: BTreeMap<String, toml::Value>,
    /// The keys ([`Names`]) that environment variables set, with the variables' names.
    #[serde(skip)]
    env_names: BTreeMap<String, String>,
}

impl fmt::Debug for FileConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kafka: BTreeMap<&str, String> = self
            .kafka
            .iter()
            .map(|(key, value)| (key.as_str(), masked_value(key, &value.to_string())))
            .collect();
        f.debug_struct("FileConfig")
            .field("database_url", &self.database_url)
            .field("schema", &self.schema)
            .field("relay", &self.relay)
            .field("kafka", &kafka)
            .finish()
    }
}

fn masked_value(key: &str, value: &str) -> String {
    if is_secret_property(key) {
        "********".to_owned()
    } else {
        value.to_owned()
    }
}

/// `[relay]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    /// x-source header value.
    pub source: Option<String>,
    /// Lease name shared by relays that take turns.
    pub lease_name: Option<String>,
    /// Lease term in milliseconds.
    pub lease_ttl_ms: Option<u64>,
    /// Lease renewal interval in milliseconds (at most a third of the term).
    pub lease_renew_interval_ms: Option<u64>,
    /// Messages per batch.
    pub batch_size: Option<usize>,
    /// Bytes of keys and payloads per batch (a larger single message still goes alone).
    pub max_batch_bytes: Option<usize>,
    /// Fallback poll interval in milliseconds.
    pub poll_interval_ms: Option<u64>,
    /// How long a batch may fill while traffic is light, in milliseconds.
    pub batch_linger_ms: Option<u64>,
    /// `keep` (default) or `delete`.
    pub completion: Option<String>,
    /// `block` (default) or `dead-letter`.
    pub poison_policy: Option<String>,
    /// How long processed messages are kept (with `completion = "keep"`).
    pub retention_hours: Option<f64>,
    /// Retention cleanup interval in milliseconds.
    pub cleanup_interval_ms: Option<u64>,
    /// Rows deleted per cleanup statement.
    pub cleanup_batch_size: Option<usize>,
    /// First retry delay in milliseconds.
    pub backoff_initial_ms: Option<u64>,
    /// Retry delay cap in milliseconds.
    pub backoff_max_ms: Option<u64>,
    /// How long shutdown waits for in-flight deliveries, in milliseconds.
    pub shutdown_timeout_ms: Option<u64>,
    /// A leader whose backlog does not shrink for this long reports not ready, in milliseconds.
    pub stall_timeout_ms: Option<u64>,
    /// How often backlog and Kafka reachability are sampled, in milliseconds.
    pub monitor_interval_ms: Option<u64>,
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

/// Environment variables of the form `OUTBOX_<RELAY KEY>` (e.g. `OUTBOX_BATCH_SIZE`) and
/// `OUTBOX_KAFKA_<PROPERTY>` (dots as underscores, e.g. `OUTBOX_KAFKA_LINGER_MS`), applied over
/// the file. Variables the CLI reads through flags, and `OUTBOX_DEV_*` (the dev scripts'), are
/// left alone; any other `OUTBOX_*` name is a typo and rejected by name.
const FLAG_VARIABLES: [&str; 5] = [
    "OUTBOX_CONFIG",
    "OUTBOX_SCHEMA",
    "OUTBOX_SOURCE",
    "OUTBOX_LOG",
    "OUTBOX_METRICS_ADDR",
];

impl FileConfig {
    /// Applies `OUTBOX_*` variables from `vars` over the file's values.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (name, value) in vars {
            let Some(rest) = name.strip_prefix("OUTBOX_") else {
                continue;
            };
            if FLAG_VARIABLES.contains(&name.as_str()) || rest.starts_with("DEV_") {
                continue;
            }
            if let Some(property) = rest.strip_prefix("KAFKA_") {
                let key = property.to_ascii_lowercase().replace('_', ".");
                self.env_names.insert(format!("kafka.{key}"), name.clone());
                self.kafka.insert(key, toml::Value::String(value));
                continue;
            }
            let key = rest.to_ascii_lowercase();
            let number = |value: &str| -> Result<u64, ConfigError> {
                value.parse().map_err(|_| {
                    ConfigError::invalid(&name, format!("expected a whole number, got {value:?}"))
                })
            };
            let size = |value: &str| -> Result<usize, ConfigError> {
                usize::try_from(number(value)?)
                    .map_err(|_| ConfigError::invalid(&name, format!("{value} is too large")))
            };
            let r = &mut self.relay;
            match key.as_str() {
                "database_url" => {
                    self.database_url = Some(DatabaseUrl(value));
                    self.env_names.insert(key, name);
                    continue;
                }
                "lease_name" => r.lease_name = Some(value),
                "completion" => r.completion = Some(value),
                "poison_policy" => r.poison_policy = Some(value),
                "lease_ttl_ms" => r.lease_ttl_ms = Some(number(&value)?),
                "lease_renew_interval_ms" => r.lease_renew_interval_ms = Some(number(&value)?),
                "batch_size" => r.batch_size = Some(size(&value)?),
                "max_batch_bytes" => r.max_batch_bytes = Some(size(&value)?),
                "poll_interval_ms" => r.poll_interval_ms = Some(number(&value)?),
                "batch_linger_ms" => r.batch_linger_ms = Some(number(&value)?),
                "retention_hours" => {
                    r.retention_hours = Some(value.parse().map_err(|_| {
                        ConfigError::invalid(
                            &name,
                            format!("expected a number of hours, got {value:?}"),
                        )
                    })?)
                }
                "cleanup_interval_ms" => r.cleanup_interval_ms = Some(number(&value)?),
                "cleanup_batch_size" => r.cleanup_batch_size = Some(size(&value)?),
                "backoff_initial_ms" => r.backoff_initial_ms = Some(number(&value)?),
                "backoff_max_ms" => r.backoff_max_ms = Some(number(&value)?),
                "shutdown_timeout_ms" => r.shutdown_timeout_ms = Some(number(&value)?),
                "stall_timeout_ms" => r.stall_timeout_ms = Some(number(&value)?),
                "monitor_interval_ms" => r.monitor_interval_ms = Some(number(&value)?),
                _ => return Err(ConfigError::invalid(&name, "unknown environment variable")),
            }
            self.env_names.insert(format!("relay.{key}"), name);
        }
        Ok(())
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.message().to_owned()
                + &e.span()
                    .map(|span| format!(" (at {})", line_of(&text, span.start)))
                    .unwrap_or_default(),
        })
    }
}

fn line_of(text: &str, offset: usize) -> String {
    let line = text[..offset.min(text.len())].lines().count().max(1);
    format!("line {line}")
}

/// Settings given on the command line or in the environment (they override the file).
#[derive(Default, Clone, clap::Args)]
pub struct Overrides {
    /// PostgreSQL URL [env: DATABASE_URL] (default: the dev/up database).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<DatabaseUrl>,
    /// Schema holding the outbox objects [default: outbox].
    #[arg(long, env = "OUTBOX_SCHEMA", global = true)]
    pub schema: Option<String>,
    /// Kafka bootstrap servers (librdkafka `bootstrap.servers`).
    #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS", global = true)]
    pub kafka_bootstrap_servers: Option<String>,
    /// The x-source header value: the name of the publishing service [default: outbox].
    #[arg(long, env = "OUTBOX_SOURCE", global = true)]
    pub source: Option<String>,
    /// Extra librdkafka producer property, KEY=VALUE (repeatable), e.g. `linger.ms=10`.
    #[arg(long = "kafka", value_name = "KEY=VALUE", global = true)]
    pub kafka_properties: Vec<String>,
}

impl fmt::Debug for Overrides {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kafka: Vec<String> = self
            .kafka_properties
            .iter()
            .map(|property| match property.split_once('=') {
                Some((key, value)) => format!("{key}={}", masked_value(key.trim(), value)),
                None => masked_value(property, property),
            })
            .collect();
        f.debug_struct("Overrides")
            .field("database_url", &self.database_url)
            .field("schema", &self.schema)
            .field("kafka_bootstrap_servers", &self.kafka_bootstrap_servers)
            .field("source", &self.source)
            .field("kafka_properties", &kafka)
            .finish()
    }
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
}

const DEFAULT_DATABASE_URL: &str = "postgres://outbox:outbox@127.0.0.1:55432/outbox";
const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:19092";
const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How the user named each setting they gave, so that an error names what they wrote: the
/// file's key (`relay.lease_ttl_ms`), the environment variable (`OUTBOX_LEASE_TTL_MS`) or the
/// flag. Settings are identified by their file key.
struct Names {
    env: BTreeMap<String, String>,
    given: BTreeMap<String, String>,
}

impl Names {
    /// `value` came from the file or its environment variable; passes it through.
    fn given<T>(&mut self, key: &str, value: Option<T>) -> Option<T> {
        if value.is_some() {
            let name = self.env.get(key).cloned().unwrap_or_else(|| key.to_owned());
            self.given.insert(key.to_owned(), name);
        }
        value
    }

    fn flag(&mut self, key: &str, flag: &str) {
        self.given.insert(key.to_owned(), flag.to_owned());
    }

    fn is_given(&self, key: &str) -> bool {
        self.given.contains_key(key)
    }

    fn name(&self, key: &str) -> String {
        self.given
            .get(key)
            .cloned()
            .unwrap_or_else(|| key.to_owned())
    }
}

/// [`RelayConfig`]'s settings, as its validation names them, and their file keys.
const RELAY_KEYS: [(&str, &str); 17] = [
    ("source", "relay.source"),
    ("lease_name", "relay.lease_name"),
    ("lease_ttl", "relay.lease_ttl_ms"),
    ("lease_renew_interval", "relay.lease_renew_interval_ms"),
    ("batch_size", "relay.batch_size"),
    ("max_batch_bytes", "relay.max_batch_bytes"),
    ("poll_interval", "relay.poll_interval_ms"),
    ("batch_linger", "relay.batch_linger_ms"),
    ("retention", "relay.retention_hours"),
    ("cleanup_interval", "relay.cleanup_interval_ms"),
    ("cleanup_batch_size", "relay.cleanup_batch_size"),
    ("backoff_initial", "relay.backoff_initial_ms"),
    ("backoff_max", "relay.backoff_max_ms"),
    ("shutdown_timeout", "relay.shutdown_timeout_ms"),
    ("stall_timeout", "relay.stall_timeout_ms"),
    ("monitor_interval", "relay.monitor_interval_ms"),
    ("schema", "schema"),
];

fn file_key(relay_key: &str) -> &str {
    RELAY_KEYS
        .iter()
        .find(|(setting, _)| *setting == relay_key)
        .map_or(relay_key, |(_, key)| key)
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

impl Settings {
    /// Merges defaults, the file (if any) and the overrides, and validates the result.
    pub fn resolve(file: FileConfig, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut names = Names {
            env: file.env_names,
            given: BTreeMap::new(),
        };
        let schema_text = match &overrides.schema {
            Some(schema) => {
                names.flag("schema", "--schema (OUTBOX_SCHEMA)");
                schema.clone()
            }
            None => names
                .given("schema", file.schema)
                .unwrap_or_else(|| "outbox".to_owned()),
        };
        let schema = SchemaName::new(schema_text)
            .map_err(|e| ConfigError::invalid(&names.name("schema"), e.to_string()))?;
        let database_url = match &overrides.database_url {
            Some(url) => {
                names.flag("database_url", "--database-url (DATABASE_URL)");
                url.clone()
            }
            None => names
                .given("database_url", file.database_url)
                .unwrap_or_else(|| DatabaseUrl(DEFAULT_DATABASE_URL.to_owned())),
        };
        database_url.connect_options(&names.name("database_url"))?;

        let r = file.relay;
        let source = match &overrides.source {
            Some(source) => {
                names.flag("relay.source", "--source (OUTBOX_SOURCE)");
                Some(source.clone())
            }
            None => names.given("relay.source", r.source),
        };
        let derive_source = source.is_none();
        // Replaced at startup when derived; validated like a configured one meanwhile.
        let mut relay = RelayConfig::new(
            DEFAULT_BOOTSTRAP,
            source.unwrap_or_else(|| "outbox".to_owned()),
        );
        relay.schema = schema.clone();
        let ms = Duration::from_millis;
        if let Some(v) = names.given("relay.lease_name", r.lease_name) {
            relay.lease_name = v;
        }
        if let Some(v) = names.given("relay.lease_ttl_ms", r.lease_ttl_ms) {
            relay.lease_ttl = ms(v);
        }
        if let Some(v) = names.given("relay.lease_renew_interval_ms", r.lease_renew_interval_ms) {
            relay.lease_renew_interval = ms(v);
        }
        if let Some(v) = names.given("relay.batch_size", r.batch_size) {
            relay.batch_size = v;
        }
        if let Some(v) = names.given("relay.max_batch_bytes", r.max_batch_bytes) {
            relay.max_batch_bytes = v;
        }
        if let Some(v) = names.given("relay.poll_interval_ms", r.poll_interval_ms) {
            relay.poll_interval = ms(v);
        }
        if let Some(v) = names.given("relay.batch_linger_ms", r.batch_linger_ms) {
            relay.batch_linger = ms(v);
        }
        if let Some(v) = names.given("relay.cleanup_interval_ms", r.cleanup_interval_ms) {
            relay.cleanup_interval = ms(v);
        }
        if let Some(v) = names.given("relay.cleanup_batch_size", r.cleanup_batch_size) {
            relay.cleanup_batch_size = v;
        }
        if let Some(v) = names.given("relay.backoff_initial_ms", r.backoff_initial_ms) {
            relay.backoff_initial = ms(v);
        }
        if let Some(v) = names.given("relay.backoff_max_ms", r.backoff_max_ms) {
            relay.backoff_max = ms(v);
        }
        if let Some(v) = names.given("relay.shutdown_timeout_ms", r.shutdown_timeout_ms) {
            relay.shutdown_timeout = ms(v);
        }
        if let Some(v) = names.given("relay.stall_timeout_ms", r.stall_timeout_ms) {
            relay.stall_timeout = ms(v);
        }
        if let Some(v) = names.given("relay.monitor_interval_ms", r.monitor_interval_ms) {
            relay.monitor_interval = ms(v);
        }
        let retention = match names.given("relay.retention_hours", r.retention_hours) {
            Some(hours) => retention_from_hours(hours).map_err(|reason| {
                ConfigError::invalid(&names.name("relay.retention_hours"), reason)
            })?,
            None => DEFAULT_RETENTION,
        };
        relay.completion = match names.given("relay.completion", r.completion).as_deref() {
            None | Some("keep") => Completion::Keep { retention },
            Some("delete") => Completion::Delete,
            Some(other) => {
                return Err(ConfigError::invalid(
                    &names.name("relay.completion"),
                    format!("must be \"keep\" or \"delete\", not {other:?}"),
                ))
            }
        };
        relay.poison_policy = match names
            .given("relay.poison_policy", r.poison_policy)
            .as_deref()
        {
            None | Some("block") => PoisonPolicy::Block,
            Some("dead-letter") => PoisonPolicy::DeadLetter,
            Some(other) => {
                return Err(ConfigError::invalid(
                    &names.name("relay.poison_policy"),
                    format!("must be \"block\" or \"dead-letter\", not {other:?}"),
                ))
            }
        };

        let mut kafka = KafkaConfig::new(DEFAULT_BOOTSTRAP);
        for (key, value) in file.kafka {
            let name = format!("kafka.{key}");
            names.given(&name, Some(()));
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    return Err(ConfigError::invalid(
                        &names.name(&name),
                        "must be a string, number or boolean",
                    ))
                }
            };
            kafka.set(key, value);
        }
        if let Some(servers) = &overrides.kafka_bootstrap_servers {
            names.flag(
                "kafka.bootstrap.servers",
                "--kafka-bootstrap-servers (KAFKA_BOOTSTRAP_SERVERS)",
            );
            kafka.set("bootstrap.servers", servers.clone());
        }
        for property in &overrides.kafka_properties {
            let Some((key, value)) = property.split_once('=') else {
                return Err(ConfigError::invalid(
                    "--kafka",
                    format!(
                        "expected KEY=VALUE, got {:?}",
                        masked_value(property, property)
                    ),
                ));
            };
            let key = key.trim();
            names.flag(&format!("kafka.{key}"), &format!("--kafka {key}=..."));
            kafka.set(key, value.trim());
        }
        relay.kafka = kafka;
        relay.validate().map_err(|e| {
            let key = file_key(&e.key);
            // A rule between two settings blames the one(s) the user set.
            let mut blamed: Vec<String> = [Some(key), e.counterpart().map(file_key)]
                .into_iter()
                .flatten()
                .filter(|k| names.is_given(k))
                .map(|k| names.name(k))
                .collect();
            if blamed.is_empty() {
                blamed.push(names.name(key));
            }
            ConfigError::invalid(&blamed.join(" and "), e.reason)
        })?;
        Ok(Settings {
            database_url,
            schema,
            relay,
            derive_source,
        })
    }

    /// The effective configuration as TOML, secrets masked. Read back, it configures the same.
    pub fn to_masked_toml(&self) -> String {
        let r = &self.relay;
        let ms = |d: Duration| d.as_millis();
        let mut out = String::new();
        out.push_str(&format!(
            "database_url = {}\n",
            toml_string(&self.database_url.to_string())
        ));
        out.push_str(&format!(
            "schema = {}\n\n[relay]\n",
            toml_string(self.schema.as_str())
        ));
        if self.derive_source {
            out.push_str(
                "# source: not set; derived at startup from the database, unique per outbox:\n\
                 # \"outbox:<cluster system identifier>:<database>:<schema>\"\n",
            );
        } else {
            out.push_str(&format!("source = {}\n", toml_string(&r.source)));
        }
        out.push_str(&format!("lease_name = {}\n", toml_string(&r.lease_name)));
        out.push_str(&format!("lease_ttl_ms = {}\n", ms(r.lease_ttl)));
        out.push_str(&format!(
            "lease_renew_interval_ms = {}\n",
            ms(r.lease_renew_interval)
        ));
        out.push_str(&format!("batch_size = {}\n", r.batch_size));
        out.push_str(&format!("max_batch_bytes = {}\n", r.max_batch_bytes));
        out.push_str(&format!("poll_interval_ms = {}\n", ms(r.poll_interval)));
        out.push_str(&format!("batch_linger_ms = {}\n", ms(r.batch_linger)));
        match r.completion {
            Completion::Keep { retention } => {
                out.push_str("completion = \"keep\"\n");
                out.push_str(&format!(
                    "retention_hours = {}\n",
                    retention.as_secs_f64() / 3600.0
                ));
            }
            Completion::Delete => out.push_str("completion = \"delete\"\n"),
        }
        out.push_str(match r.poison_policy {
            PoisonPolicy::Block => "poison_policy = \"block\"\n",
            PoisonPolicy::DeadLetter => "poison_policy = \"dead-letter\"\n",
        });
        out.push_str(&format!(
            "cleanup_interval_ms = {}\n",
            ms(r.cleanup_interval)
        ));
        out.push_str(&format!("cleanup_batch_size = {}\n", r.cleanup_batch_size));
        out.push_str(&format!("backoff_initial_ms = {}\n", ms(r.backoff_initial)));
        out.push_str(&format!("backoff_max_ms = {}\n", ms(r.backoff_max)));
        out.push_str(&format!(
            "shutdown_timeout_ms = {}\n",
            ms(r.shutdown_timeout)
        ));
        out.push_str(&format!("stall_timeout_ms = {}\n", ms(r.stall_timeout)));
        out.push_str(&format!(
            "monitor_interval_ms = {}\n\n[kafka]\n",
            ms(r.monitor_interval)
        ));
        for (key, value) in r.kafka.masked() {
            out.push_str(&format!(
                "{} = {}\n",
                toml_string(&key),
                toml_string(&value)
            ));
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

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "test".into(),
            message: e.to_string(),
        })?;
        Settings::resolve(file, &Overrides::default())
    }

    #[test]
    fn file_values_apply_and_flags_override_them() {
        let file: FileConfig = toml::from_str(
            "schema = \"from_file\"\n[relay]\nbatch_size = 10\n[kafka]\n\"linger.ms\" = 20\n",
        )
        .unwrap();
        let overrides = Overrides {
            schema: Some("from_flag".into()),
            kafka_properties: vec!["linger.ms=1".into()],
            ..Overrides::default()
        };
        let settings = Settings::resolve(file, &overrides).unwrap();
        assert_eq!(settings.schema.as_str(), "from_flag");
        assert_eq!(settings.relay.batch_size, 10);
        assert_eq!(settings.relay.kafka.get("linger.ms"), Some("1"));
    }

    #[test]
    fn environment_overrides_the_file_and_typos_are_named() {
        let mut file: FileConfig = toml::from_str("[relay]\nbatch_size = 10\n").unwrap();
        file.apply_env([
            ("OUTBOX_BATCH_SIZE".to_owned(), "20".to_owned()),
            ("OUTBOX_KAFKA_LINGER_MS".to_owned(), "7".to_owned()),
            ("OUTBOX_DEV_CACHE".to_owned(), "/x".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ])
        .unwrap();
        let settings = Settings::resolve(file, &Overrides::default()).unwrap();
        assert_eq!(settings.relay.batch_size, 20);
        assert_eq!(settings.relay.kafka.get("linger.ms"), Some("7"));
        let error = FileConfig::default()
            .apply_env([("OUTBOX_BATCH_SISE".to_owned(), "1".to_owned())])
            .unwrap_err()
            .to_string();
        assert!(error.contains("OUTBOX_BATCH_SISE"), "{error}");
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let error = parse("[relay]\nbatch_sise = 10\n").unwrap_err().to_string();
        assert!(error.contains("batch_sise"), "{error}");
    }

    #[test]
    fn lease_shorter_than_renewal_is_rejected_by_name() {
        let error = parse("[relay]\nlease_ttl_ms = 1000\nlease_renew_interval_ms = 900\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("relay.lease_renew_interval"), "{error}");
    }

    #[test]
    fn negative_retention_is_rejected_by_name() {
        let error = parse("[relay]\nretention_hours = -1\n")
            .unwrap_err()
            .to_string();
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
}

#[cfg(test)]
mod documented_keys {
    //! docs/operations.md's configuration example is the list of keys users are told about:
    //! each must be accepted, reach the relay's configuration, come from its environment
    //! variable, and be printed by `--print-config`.

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

    fn resolve_table(table: &toml::Table) -> Result<Settings, ConfigError> {
        let file: FileConfig =
            toml::from_str(&table.to_string()).map_err(|e| ConfigError::Parse {
                path: "docs".into(),
                message: e.to_string(),
            })?;
        Settings::resolve(file, &Overrides::default())
    }

    /// A valid value other than `value`, of the same type.
    fn another(key: &str, value: &toml::Value) -> toml::Value {
        match (key, value) {
            ("completion", _) => "delete".into(),
            ("poison_policy", _) => "dead-letter".into(),
            (_, toml::Value::String(s)) => format!("{s}x").into(),
            (_, toml::Value::Integer(i)) => (i + 1).into(),
            (_, toml::Value::Float(f)) => (f + 1.0).into(),
            (key, other) => panic!("no other value for {key} = {other}"),
        }
    }

    fn relay_keys() -> Vec<(String, toml::Value)> {
        let table = documented_table();
        let relay = table["relay"].as_table().expect("a [relay] table");
        relay.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    #[test]
    fn documented_example_is_accepted() {
        let settings = resolve_table(&documented_table()).unwrap();
        assert_eq!(settings.schema.as_str(), "outbox");
    }

    #[test]
    fn every_documented_relay_key_reaches_the_relay_config() {
        let base = resolve_table(&documented_table()).unwrap().relay;
        for (key, value) in relay_keys() {
            let mut table = documented_table();
            table["relay"][&key] = another(&key, &value);
            let changed = resolve_table(&table)
                .unwrap_or_else(|e| panic!("relay.{key}: {e}"))
                .relay;
            assert_ne!(
                format!("{base:?}"),
                format!("{changed:?}"),
                "relay.{key} = {} did not reach RelayConfig",
                table["relay"][&key]
            );
        }
    }

    #[test]
    fn every_documented_relay_key_is_read_from_its_environment_variable() {
        for (key, value) in relay_keys() {
            if key == "source" {
                continue; // OUTBOX_SOURCE is the --source flag's variable
            }
            let other = another(&key, &value);
            let mut table = documented_table();
            table["relay"][&key] = other.clone();
            let from_file = resolve_table(&table).unwrap().relay;

            let mut file: FileConfig = toml::from_str(&documented_example()).unwrap();
            let text = match &other {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let variable = format!("OUTBOX_{}", key.to_ascii_uppercase());
            file.apply_env([(variable.clone(), text)])
                .unwrap_or_else(|e| panic!("{variable}: {e}"));
            let from_env = Settings::resolve(file, &Overrides::default())
                .unwrap_or_else(|e| panic!("{variable}: {e}"))
                .relay;
            assert_eq!(
                format!("{from_file:?}"),
                format!("{from_env:?}"),
                "{variable} is not read like relay.{key}"
            );
        }
    }

    #[test]
    fn printed_configuration_names_every_documented_key_and_reads_back_the_same() {
        let settings = resolve_table(&documented_table()).unwrap();
        let printed = settings.to_masked_toml();
        let reread: toml::Table = printed.parse().unwrap_or_else(|e| panic!("{e}\n{printed}"));
        for key in documented_table().keys() {
            assert!(reread.contains_key(key), "{key} not printed:\n{printed}");
        }
        for (key, _) in relay_keys() {
            assert!(
                reread["relay"].as_table().unwrap().contains_key(&key),
                "relay.{key} not printed:\n{printed}"
            );
        }
        // And the other way round: no printed key is missing from the documentation.
        let documented: Vec<String> = relay_keys().into_iter().map(|(k, _)| k).collect();
        for key in reread["relay"].as_table().unwrap().keys() {
            assert!(documented.contains(key), "relay.{key} is not documented");
        }
        let again = resolve_table(&reread).unwrap();
        assert_eq!(
            format!("{:?}", settings.relay),
            format!("{:?}", again.relay),
            "{printed}"
        );
    }
}

#[cfg(test)]
mod user_errors {
    //! Errors name what the user wrote (the file's key or the variable), values that cannot work
    //! are refused at startup, and secrets never show.

    use super::*;

    fn resolve(file: &str, env: &[(&str, &str)]) -> Result<Settings, String> {
        let mut config: FileConfig = toml::from_str(file).map_err(|e| e.to_string())?;
        config
            .apply_env(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .map_err(|e| e.to_string())?;
        Settings::resolve(config, &Overrides::default()).map_err(|e| e.to_string())
    }

    fn error(file: &str, env: &[(&str, &str)]) -> String {
        match resolve(file, env) {
            Ok(settings) => panic!("accepted {file:?} {env:?}: {:?}", settings.relay),
            Err(error) => error,
        }
    }

    #[test]
    fn errors_name_the_variable_or_key_the_user_set() {
        let e = error("", &[("OUTBOX_LEASE_TTL_MS", "50")]);
        assert!(e.contains("OUTBOX_LEASE_TTL_MS"), "{e}");
        assert!(!e.contains("relay.lease_ttl:"), "{e}");

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
        let overrides = Overrides {
            schema: Some("order".into()),
            ..Overrides::default()
        };
        let e = Settings::resolve(FileConfig::default(), &overrides)
            .unwrap_err()
            .to_string();
        assert!(e.contains("OUTBOX_SCHEMA"), "{e}");

        let e = error("", &[("OUTBOX_MONITOR_INTERVAL_MS", "120000")]);
        assert!(e.contains("OUTBOX_MONITOR_INTERVAL_MS"), "{e}");
        let e = error("[kafka]\nacks = \"1\"\n", &[("OUTBOX_KAFKA_ACKS", "0")]);
        assert!(e.contains("OUTBOX_KAFKA_ACKS"), "{e}");
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
            let settings = resolve(&format!("database_url = {url:?}\n"), &[])
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
    fn debug_output_of_the_configuration_masks_secrets() {
        let text = "database_url = \"postgres://me:db-secret@db/app\"\n\
                    [kafka]\n\"sasl.password\" = \"kafka-secret\"\n";
        let file: FileConfig = toml::from_str(text).unwrap();
        let overrides = Overrides {
            database_url: Some("postgres://me:db-secret@db/app".parse().unwrap()),
            kafka_properties: vec!["sasl.password=kafka-secret".into()],
            ..Overrides::default()
        };
        let shown = format!("{file:?} {overrides:?}");
        let settings = Settings::resolve(file, &overrides).unwrap();
        let shown = format!("{shown} {settings:?}");
        assert!(
            !shown.contains("db-secret") && !shown.contains("kafka-secret"),
            "{shown}"
        );
    }
}
