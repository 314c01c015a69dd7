//! One configuration for the CLI: a TOML file, then environment variables, then flags (later
//! wins). Unknown keys are rejected, and every error names the key at fault.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use outbox::SchemaName;
use outbox_relay::{Completion, KafkaConfig, PoisonPolicy, RelayConfig};
use serde::Deserialize;

/// The configuration file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// PostgreSQL URL.
    pub database_url: Option<String>,
    /// Outbox schema.
    pub schema: Option<String>,
    /// Relay settings.
    #[serde(default)]
    pub relay: RelayFile,
    /// librdkafka producer properties, verbatim.
    #[serde(default)]
    pub kafka: BTreeMap<String, toml::Value>,
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
        /// The key at fault.
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
                self.kafka.insert(key, toml::Value::String(value));
                continue;
            }
            let key = rest.to_ascii_lowercase();
            let number = |value: &str| -> Result<u64, ConfigError> {
                value.parse().map_err(|_| {
                    ConfigError::invalid(&name, format!("expected a whole number, got {value:?}"))
                })
            };
            let r = &mut self.relay;
            match key.as_str() {
                "database_url" => self.database_url = Some(value),
                "lease_name" => r.lease_name = Some(value),
                "completion" => r.completion = Some(value),
                "poison_policy" => r.poison_policy = Some(value),
                "lease_ttl_ms" => r.lease_ttl_ms = Some(number(&value)?),
                "lease_renew_interval_ms" => r.lease_renew_interval_ms = Some(number(&value)?),
                "batch_size" => r.batch_size = Some(number(&value)? as usize),
                "max_batch_bytes" => r.max_batch_bytes = Some(number(&value)? as usize),
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
                "cleanup_batch_size" => r.cleanup_batch_size = Some(number(&value)? as usize),
                "backoff_initial_ms" => r.backoff_initial_ms = Some(number(&value)?),
                "backoff_max_ms" => r.backoff_max_ms = Some(number(&value)?),
                "shutdown_timeout_ms" => r.shutdown_timeout_ms = Some(number(&value)?),
                "stall_timeout_ms" => r.stall_timeout_ms = Some(number(&value)?),
                "monitor_interval_ms" => r.monitor_interval_ms = Some(number(&value)?),
                _ => return Err(ConfigError::invalid(&name, "unknown environment variable")),
            }
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
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Overrides {
    /// PostgreSQL URL [env: DATABASE_URL] (default: the dev/up database).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
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

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// PostgreSQL URL.
    pub database_url: String,
    /// Outbox schema.
    pub schema: SchemaName,
    /// Relay settings.
    pub relay: RelayConfig,
    /// No source was configured: the relay derives one from the database at startup
    /// ([`outbox::postgres::Statements::default_source`]), unique per outbox.
    pub derive_source: bool,
}

const DEFAULT_DATABASE_URL: &str = "postgres://outbox:outbox@127.0.0.1:55432/outbox";
const DEFAULT_BOOTSTRAP: &str = "127.0.0.1:19092";

impl Settings {
    /// Merges defaults, the file (if any) and the overrides, and validates the result.
    pub fn resolve(file: FileConfig, overrides: &Overrides) -> Result<Self, ConfigError> {
        let schema_text = overrides
            .schema
            .clone()
            .or(file.schema)
            .unwrap_or_else(|| "outbox".to_owned());
        let schema = SchemaName::new(schema_text)
            .map_err(|e| ConfigError::invalid("schema", e.to_string()))?;
        let database_url = overrides
            .database_url
            .clone()
            .or(file.database_url)
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());

        let r = file.relay;
        let source = overrides.source.clone().or(r.source);
        let derive_source = source.is_none();
        // Replaced at startup when derived; validated like a configured one meanwhile.
        let mut relay = RelayConfig::new(
            DEFAULT_BOOTSTRAP,
            source.unwrap_or_else(|| "outbox".to_owned()),
        );
        relay.schema = schema.clone();
        let ms = Duration::from_millis;
        if let Some(v) = r.lease_name {
            relay.lease_name = v;
        }
        if let Some(v) = r.lease_ttl_ms {
            relay.lease_ttl = ms(v);
        }
        if let Some(v) = r.lease_renew_interval_ms {
            relay.lease_renew_interval = ms(v);
        }
        if let Some(v) = r.batch_size {
            relay.batch_size = v;
        }
        if let Some(v) = r.max_batch_bytes {
            relay.max_batch_bytes = v;
        }
        if let Some(v) = r.poll_interval_ms {
            relay.poll_interval = ms(v);
        }
        if let Some(v) = r.batch_linger_ms {
            relay.batch_linger = ms(v);
        }
        if let Some(v) = r.cleanup_interval_ms {
            relay.cleanup_interval = ms(v);
        }
        if let Some(v) = r.cleanup_batch_size {
            relay.cleanup_batch_size = v;
        }
        if let Some(v) = r.backoff_initial_ms {
            relay.backoff_initial = ms(v);
        }
        if let Some(v) = r.backoff_max_ms {
            relay.backoff_max = ms(v);
        }
        if let Some(v) = r.shutdown_timeout_ms {
            relay.shutdown_timeout = ms(v);
        }
        let retention = match r.retention_hours {
            Some(h) if !(h.is_finite() && h >= 0.0) => {
                return Err(ConfigError::invalid(
                    "relay.retention_hours",
                    "must be a non-negative number of hours",
                ))
            }
            Some(h) => Duration::from_secs_f64(h * 3600.0),
            None => Duration::from_secs(7 * 24 * 3600),
        };
        relay.completion = match r.completion.as_deref() {
            None | Some("keep") => Completion::Keep { retention },
            Some("delete") => Completion::Delete,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "relay.completion",
                    format!("must be \"keep\" or \"delete\", not {other:?}"),
                ))
            }
        };

        relay.poison_policy = match r.poison_policy.as_deref() {
            None | Some("block") => PoisonPolicy::Block,
            Some("dead-letter") => PoisonPolicy::DeadLetter,
            Some(other) => {
                return Err(ConfigError::invalid(
                    "relay.poison_policy",
                    format!("must be \"block\" or \"dead-letter\", not {other:?}"),
                ))
            }
        };
        let mut kafka = KafkaConfig::new(DEFAULT_BOOTSTRAP);
        for (key, value) in file.kafka {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    return Err(ConfigError::invalid(
                        &format!("kafka.{key}"),
                        "must be a string, number or boolean",
                    ))
                }
            };
            kafka.set(key, value);
        }
        if let Some(servers) = &overrides.kafka_bootstrap_servers {
            kafka.set("bootstrap.servers", servers.clone());
        }
        for property in &overrides.kafka_properties {
            let (key, value) = property.split_once('=').ok_or_else(|| {
                ConfigError::invalid("--kafka", format!("expected KEY=VALUE, got {property:?}"))
            })?;
            kafka.set(key.trim(), value.trim());
        }
        relay.kafka = kafka;
        relay
            .validate()
            .map_err(|e| ConfigError::invalid(&relay_key(&e.key), e.reason))?;
        Ok(Settings {
            database_url,
            schema,
            relay,
            derive_source,
        })
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        let r = &self.relay;
        let mut out = String::new();
        out.push_str(&format!(
            "database_url = {:?}\n",
            mask_url(&self.database_url)
        ));
        out.push_str(&format!("schema = {:?}\n\n[relay]\n", self.schema.as_str()));
        if self.derive_source {
            out.push_str(
                "# source: not set; derived at startup from the database, unique per outbox:\n\
                 # \"outbox:<cluster system identifier>:<database>:<schema>\"\n",
            );
        } else {
            out.push_str(&format!("source = {:?}\n", r.source));
        }
        out.push_str(&format!("lease_name = {:?}\n", r.lease_name));
        out.push_str(&format!("lease_ttl_ms = {}\n", r.lease_ttl.as_millis()));
        out.push_str(&format!(
            "lease_renew_interval_ms = {}\n",
            r.lease_renew_interval.as_millis()
        ));
        out.push_str(&format!("batch_size = {}\n", r.batch_size));
        out.push_str(&format!("max_batch_bytes = {}\n", r.max_batch_bytes));
        out.push_str(&format!(
            "poll_interval_ms = {}\n",
            r.poll_interval.as_millis()
        ));
        out.push_str(&format!(
            "batch_linger_ms = {}\n",
            r.batch_linger.as_millis()
        ));
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
            r.cleanup_interval.as_millis()
        ));
        out.push_str(&format!("cleanup_batch_size = {}\n", r.cleanup_batch_size));
        out.push_str(&format!(
            "backoff_initial_ms = {}\n",
            r.backoff_initial.as_millis()
        ));
        out.push_str(&format!("backoff_max_ms = {}\n", r.backoff_max.as_millis()));
        out.push_str(&format!(
            "shutdown_timeout_ms = {}\n\n[kafka]\n",
            r.shutdown_timeout.as_millis()
        ));
        for (key, value) in r.kafka.masked() {
            out.push_str(&format!("{key:?} = {value:?}\n"));
        }
        out
    }
}

fn relay_key(key: &str) -> String {
    if key.starts_with("kafka.") {
        key.to_owned()
    } else {
        format!("relay.{key}")
    }
}

/// Hides the password of a database URL.
pub fn mask_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    match (rest.find('@'), rest.find(':')) {
        (Some(at), Some(colon)) if colon < at => {
            format!(
                "{}://{}:********{}",
                &url[..scheme_end],
                &rest[..colon],
                &rest[at..]
            )
        }
        _ => url.to_owned(),
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
