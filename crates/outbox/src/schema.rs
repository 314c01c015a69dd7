use std::fmt;

/// The name of the PostgreSQL schema that holds the outbox objects, validated once so that it
/// can be placed into SQL text safely (it is never raw configuration).
///
/// Accepted: lower-case ASCII letters, digits and `_`, starting with a letter or `_`, at most 48
/// characters (the notification channel `<schema>_outbox` must fit PostgreSQL's 63-byte limit).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

/// The configured schema name is not a plain SQL identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid outbox schema name {name:?}: use 1 to 48 lower-case ASCII letters, digits or '_', not starting with a digit")]
pub struct InvalidSchemaName {
    /// The rejected name.
    pub name: String,
}

impl SchemaName {
    /// The default schema, `outbox`.
    pub fn default_schema() -> Self {
        SchemaName("outbox".to_owned())
    }

    /// Validates `name` as a schema identifier.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidSchemaName> {
        let name = name.into();
        let mut chars = name.chars();
        let valid_start = matches!(chars.next(), Some('a'..='z' | '_'));
        let valid_rest = chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
        if valid_start && valid_rest && name.len() <= 48 && !name.starts_with("pg_") {
            Ok(SchemaName(name))
        } else {
            Err(InvalidSchemaName { name })
        }
    }

    /// The bare name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The LISTEN/NOTIFY channel on which new messages and lease releases are announced.
    pub fn channel(&self) -> String {
        format!("{}_outbox", self.0)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self::default_schema()
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for SchemaName {
    type Err = InvalidSchemaName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchemaName::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_identifiers() {
        for name in ["outbox", "_private", "tenant_42", "a"] {
            assert_eq!(SchemaName::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn rejects_anything_that_would_need_quoting() {
        let long = "a".repeat(49);
        for name in [
            "",
            "Outbox",
            "9lives",
            "out-box",
            "x; drop table y",
            "\"q\"",
            "pg_catalog",
            &long,
        ] {
            assert!(SchemaName::new(name).is_err(), "{name:?} was accepted");
        }
    }
}
