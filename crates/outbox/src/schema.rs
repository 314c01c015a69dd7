use std::fmt;

/// The name of the PostgreSQL schema that holds the outbox objects, validated once so that it
/// can be placed into SQL text safely (it is never raw configuration).
///
/// Accepted: lower-case ASCII letters, digits and `_`, starting with a letter or `_`, at most 48
/// characters (the notification channel `<schema>_outbox` must fit PostgreSQL's 63-byte limit),
/// and not an SQL keyword that cannot stand unquoted before a `.` (`user`, `order`, `values`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

/// The configured schema name is not a plain SQL identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSchemaName {
    /// The rejected name.
    pub name: String,
    /// Whether it was rejected for being an SQL keyword.
    pub reserved: bool,
}

impl fmt::Display for InvalidSchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = if self.reserved {
            "a reserved word in SQL, which would need quoting everywhere; choose another name"
        } else {
            "use 1 to 48 lower-case ASCII letters, digits or '_', not starting with a digit or pg_"
        };
        write!(f, "invalid outbox schema name {:?}: {why}", self.name)
    }
}

impl std::error::Error for InvalidSchemaName {}

/// PostgreSQL's keywords other than the unreserved ones (`pg_get_keywords()` with a category
/// other than `U` on PostgreSQL 15, plus `system_user`, `json`, the `json_*` functions and
/// `merge_action` that 16 and 17 added). As a schema they would fail in schema-qualified type
/// or function names (`values.t` is a syntax error there), so they are refused rather than
/// quoted everywhere. outbox-cli's tests check the list against the server's. Sorted, for the
/// binary search.
#[rustfmt::skip]
const KEYWORDS: &[&str] = &[
    "all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric", "authorization",
    "between", "bigint", "binary", "bit", "boolean", "both", "case", "cast", "char", "character",
    "check", "coalesce", "collate", "collation", "column", "concurrently", "constraint", "create",
    "cross", "current_catalog", "current_date", "current_role", "current_schema", "current_time",
    "current_timestamp", "current_user", "dec", "decimal", "default", "deferrable", "desc",
    "distinct", "do", "else", "end", "except", "exists", "extract", "false", "fetch", "float",
    "for", "foreign", "freeze", "from", "full", "grant", "greatest", "group", "grouping", "having",
    "ilike", "in", "initially", "inner", "inout", "int", "integer", "intersect", "interval",
    "into", "is", "isnull", "join", "json", "json_array", "json_arrayagg", "json_exists",
    "json_object", "json_objectagg", "json_query", "json_scalar", "json_serialize", "json_table",
    "json_value", "lateral", "leading", "least", "left", "like", "limit", "localtime",
    "localtimestamp", "merge_action", "national", "natural", "nchar", "none", "normalize", "not",
    "notnull", "null", "nullif", "numeric", "offset", "on", "only", "or", "order", "out", "outer",
    "overlaps", "overlay", "placing", "position", "precision", "primary", "real", "references",
    "returning", "right", "row", "select", "session_user", "setof", "similar", "smallint", "some",
    "substring", "symmetric", "system_user", "table", "tablesample", "then", "time", "timestamp",
    "to", "trailing", "treat", "trim", "true", "union", "unique", "user", "using", "values",
    "varchar", "variadic", "verbose", "when", "where", "window", "with", "xmlattributes",
    "xmlconcat", "xmlelement", "xmlexists", "xmlforest", "xmlnamespaces", "xmlparse", "xmlpi",
    "xmlroot", "xmlserialize", "xmltable",
];

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
        if !(valid_start && valid_rest && name.len() <= 48 && !name.starts_with("pg_")) {
            Err(InvalidSchemaName {
                name,
                reserved: false,
            })
        } else if KEYWORDS.binary_search(&name.as_str()).is_ok() {
            Err(InvalidSchemaName {
                name,
                reserved: true,
            })
        } else {
            Ok(SchemaName(name))
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

    #[test]
    fn keywords_are_sorted_for_the_binary_search() {
        assert!(KEYWORDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn rejects_sql_keywords_that_cannot_name_a_schema_unquoted() {
        for name in ["user", "order", "select", "table", "values", "time", "join"] {
            let error = SchemaName::new(name).expect_err(name).to_string();
            assert!(error.contains(&format!("{name:?}")), "{error}");
            assert!(error.contains("reserved"), "{error}");
        }
        // Unreserved keywords are ordinary identifiers.
        for name in ["data", "name", "version", "schema"] {
            assert!(SchemaName::new(name).is_ok(), "{name:?} was refused");
        }
    }
}
