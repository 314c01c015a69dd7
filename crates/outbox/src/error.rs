use crate::schema::InvalidSchemaName;

/// Errors of the write side: invalid messages and database failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The message cannot be published as given; nothing was written. The caller's transaction
    /// is untouched and remains the caller's to roll back or to continue.
    #[error("invalid outbox message: {0}")]
    InvalidMessage(#[from] InvalidMessage),
    /// [`crate::Outbox::execute_and_save`] was given something other than one SQL statement;
    /// nothing ran.
    #[error("execute_and_save takes one SQL statement: {0}")]
    InvalidStatement(String),
    /// The configured schema name is not a plain SQL identifier.
    #[error(transparent)]
    InvalidSchemaName(#[from] InvalidSchemaName),
    /// The database rejected or failed a statement.
    #[error("outbox database error: {0}")]
    Database(sqlx::Error),
    /// The database rejected or failed a statement run through tokio-postgres.
    #[cfg(feature = "tokio-postgres")]
    #[error("outbox database error: {}", crate::client::tokio_postgres::describe(.0))]
    TokioPostgres(#[source] tokio_postgres::Error),
    /// The database rejected or failed a statement run through SeaORM.
    #[cfg(feature = "sea-orm")]
    #[error("outbox database error: {0}")]
    SeaOrm(#[from] sea_orm::DbErr),
    /// The database rejected or failed a statement run through diesel or diesel-async.
    #[cfg(any(feature = "diesel", feature = "diesel-async"))]
    #[error("outbox database error: {0}")]
    Diesel(#[source] diesel::result::Error),
    /// The diesel (or diesel-async) connection given is not in a transaction: the message would commit at
    /// once, apart from the business data. Nothing was written; save inside
    /// `conn.transaction(..)`.
    #[error("the connection is not in a transaction: save outbox messages inside the transaction that writes the business data")]
    NotInTransaction,
    /// The caller's transaction is on a database other than PostgreSQL (a SeaORM connection to
    /// MySQL or SQLite, say); nothing was written.
    #[error("the outbox runs on PostgreSQL; the transaction given is on {0}")]
    UnsupportedDatabase(String),
    /// The database saved fewer rows than it was given messages: something (a trigger on the
    /// outbox table returning NULL) suppressed an insert. Roll the transaction back: committed,
    /// it would lose those messages.
    #[error("outbox database error: a message's insert returned no row (does a trigger on the outbox table suppress it?)")]
    NotSaved,
    /// The connection goes through a pooler in transaction mode (PgBouncer's
    /// `pool_mode = transaction` before 1.21), which hands each transaction to any server
    /// connection, while this outbox caches its statements on the connection (see
    /// [`crate::pooler`]). Either a statement failed on it (`statement`: its prepared statement
    /// was missing from the server connection, taken by another client's of the same name, or
    /// another statement with other parameters; nothing of it was written), or
    /// [`crate::Outbox::check_connection`] found the pooler (`statement` is `None`). Set
    /// [`crate::OutboxConfig::transaction_pooling`] (and
    /// [`crate::admin::Admin::transaction_pooling`]), make the service's own queries in those
    /// transactions `.persistent(false)`, or connect through a session-mode pool.
    #[error("{}the connection goes through a pooler in transaction mode (PgBouncer pool_mode = transaction), which hands each transaction to any server connection, so prepared statements are not kept and may run as another client's; enable transaction_pooling in the outbox's configuration and run the service's own queries with persistent(false), or connect through a session-mode pool", statement.as_ref().map(|e| format!("{e}: ")).unwrap_or_default())]
    TransactionPooler {
        /// The statement's error, when a statement failed.
        #[source]
        statement: Option<sqlx::Error>,
    },
    /// The PostgreSQL server is older than 14, the oldest the outbox runs on.
    #[error("PostgreSQL 14 or later is required; the server reports server_version_num {found}")]
    ServerTooOld {
        /// The server's `server_version_num`.
        found: String,
    },
    /// The database holds a newer outbox schema than this build knows.
    #[error("the outbox schema {schema} is at version {found}, newer than this build's {known}; upgrade the library")]
    SchemaTooNew {
        /// Schema name.
        schema: String,
        /// Version found in the database.
        found: i32,
        /// Newest version this build knows.
        known: i32,
    },
    /// A migration applied to the schema is not this build's copy of it: the checksum recorded
    /// when it ran differs. Nothing was changed. A migration must not change once it ran
    /// somewhere; restore its released text, and make the change a new migration.
    #[error("migration {version} ({file}) applied to the outbox schema {schema} differs from this build's copy (recorded checksum {}, this build's {embedded}); nothing was changed: restore the migration as it was released and put the change in a new migration", recorded.as_deref().unwrap_or("none"))]
    MigrationChanged {
        /// Schema name.
        schema: String,
        /// The migration's version.
        version: i32,
        /// Its file, under `crates/outbox/src/migrations/`.
        file: &'static str,
        /// The checksum recorded when it was applied (`None`: none recorded).
        recorded: Option<String>,
        /// The checksum of this build's copy.
        embedded: String,
    },
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        // A statement cache that the server connection does not have: the name is taken
        // (42P05 duplicate_prepared_statement), missing (26000 invalid_sql_statement_name), or
        // another client's statement with other parameters (08P01, "bind message supplies 4
        // parameters, but prepared statement "sqlx_s_1" requires 1"). Only a pooler that moves
        // transactions between server connections gives these for the outbox's statements.
        let pooled = match &error {
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("42P05") | Some("26000") => true,
                Some("08P01") => db.message().contains("prepared statement"),
                _ => false,
            },
            _ => false,
        };
        if pooled {
            Error::TransactionPooler {
                statement: Some(error),
            }
        } else {
            Error::Database(error)
        }
    }
}

/// Why a message was rejected at save time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// Kafka rejects empty topic names.
    #[error("the topic name is empty")]
    EmptyTopic,
    /// Kafka rejects topic names over 249 characters.
    #[error("the topic name is {len} characters long; Kafka allows at most 249")]
    TopicTooLong {
        /// Length of the rejected name.
        len: usize,
    },
    /// Kafka topic names are made of ASCII letters, digits, '.', '_' and '-', and are not "." or "..".
    #[error("the topic name {topic:?} is not a legal Kafka topic name (allowed: ASCII letters, digits, '.', '_', '-'; not \".\" or \"..\")")]
    IllegalTopic {
        /// The rejected name.
        topic: String,
    },
    /// Header names must be non-empty.
    #[error("a header name is empty")]
    EmptyHeaderName,
    /// PostgreSQL cannot store a NUL character in the text of a header name.
    #[error("the header name {name:?} contains a NUL character")]
    NulInHeaderName {
        /// The name, escaped.
        name: String,
    },
    /// The relay sets these headers itself; a message may not carry its own.
    #[error("the header {name:?} is reserved: the relay sets it")]
    ReservedHeader {
        /// The reserved name.
        name: String,
    },
    /// A header the outbox or its consumers interpret has a value of the wrong form.
    #[error("the header {name:?} has an invalid value: {reason}")]
    InvalidHeaderValue {
        /// The header.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Kafka would reject the record as too large.
    #[error(
        "the message is {size} bytes (payload, key and headers); the configured maximum is {max}"
    )]
    TooLarge {
        /// Size of payload + key + headers.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
}
