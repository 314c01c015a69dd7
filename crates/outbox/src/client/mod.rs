//! The PostgreSQL client libraries the writer saves through, and the statements it runs.
//!
//! Every client gets the same statements, bound to the same types, so every client writes
//! byte-identical rows; what differs is only how a library binds and runs a statement (`sqlx`,
//! `tokio_postgres`, `sea_orm`). The writer takes the caller's
//! *transaction* of each library, never a pool or a plain client, which could commit the message
//! apart from the business data.
//!
//! The only text placed into statements is the [`SchemaName`], validated as a plain identifier
//! before it gets here; every value is a bind parameter.

use std::future::Future;

use serde_json::Value;

use crate::error::Error;
use crate::headers::encode_stored;
use crate::message::Message;
use crate::schema::SchemaName;

#[cfg(any(feature = "diesel", feature = "diesel-async"))]
mod diesel;
#[cfg(feature = "diesel-async")]
mod diesel_async;
#[cfg(feature = "sea-orm")]
mod sea_orm;
pub(crate) mod sqlx;
#[cfg(feature = "tokio-postgres")]
pub(crate) mod tokio_postgres;

/// A transaction of a PostgreSQL client library that [`Outbox`](crate::Outbox) saves messages
/// in; they are published if and only if it commits:
///
/// | library | argument |
/// |---|---|
/// | sqlx | `&mut sqlx::Transaction<'_, Postgres>` |
/// | tokio-postgres (feature `tokio-postgres`) | `&tokio_postgres::Transaction<'_>` |
/// | deadpool-postgres (feature `tokio-postgres`) | `&*tx`: its transaction dereferences to tokio-postgres's |
/// | bb8-postgres (feature `tokio-postgres`) | `&tx`: its pooled connection dereferences to tokio-postgres's `Client`, whose transaction this is |
/// | SeaORM (feature `sea-orm`, PostgreSQL) | `&sea_orm::DatabaseTransaction` |
/// | diesel-async (feature `diesel-async`) | `&mut AsyncPgConnection`, inside its `transaction(..)`; outside one it is refused |
///
/// diesel's blocking `PgConnection` saves with the `_blocking` methods
/// ([`BlockingClientTransaction`], feature `diesel`).
///
/// A tokio-postgres transaction is taken by shared reference, so the save can run beside the
/// service's own statement and share its round trip (see
/// [`Outbox::save_for_publishing`](crate::Outbox::save_for_publishing)).
///
/// Only a transaction is taken, never a pool or a client, which could commit the message apart
/// from the business data. Sealed: the outbox's guarantees rest on how each library runs its
/// statements.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a transaction the outbox can save in",
    note = "pass `&mut tx` for a `sqlx::Transaction` (`&mut *tx` if you hold a `&mut Transaction`), `&tx` for a `tokio_postgres::Transaction` (`&*tx` for deadpool-postgres), `&tx` for a `sea_orm::DatabaseTransaction`, `conn` (a `&mut AsyncPgConnection`) inside diesel-async's `transaction(..)`; pools and clients are refused: the message must commit with the business data"
)]
pub trait ClientTransaction: Send + sealed::Sealed {}

/// A transaction of a blocking PostgreSQL client library that [`Outbox`](crate::Outbox) saves
/// messages in, with [`Outbox::save_for_publishing_blocking`](crate::Outbox::save_for_publishing_blocking):
///
/// | library | argument |
/// |---|---|
/// | diesel (feature `diesel`) | `&mut PgConnection`, inside its `transaction(..)`; outside one it is refused |
///
/// Sealed, like [`ClientTransaction`].
#[cfg(feature = "diesel")]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a blocking transaction the outbox can save in",
    note = "pass `conn` (a `&mut diesel::PgConnection`) inside diesel's `transaction(..)`; for async clients use `save_for_publishing`"
)]
pub trait BlockingClientTransaction: blocking::Sealed {}

#[cfg(feature = "diesel")]
pub(crate) mod blocking {
    use super::*;

    /// What the writer needs of a blocking client (see [`super::sealed::Sealed`]).
    pub trait Sealed {
        fn insert_one(self, statements: &Statements, message: &Message) -> Result<i64, Error>;

        fn insert_many(
            self,
            statements: &Statements,
            messages: &[Message],
        ) -> Result<Vec<i64>, Error>;
    }
}

pub(crate) mod sealed {
    use super::*;

    /// What the writer needs of a client: run one of its two statements.
    pub trait Sealed {
        /// Inserts one message; returns its sequence.
        fn insert_one(
            self,
            statements: &Statements,
            message: &Message,
        ) -> impl Future<Output = Result<i64, Error>> + Send;

        /// Inserts `messages` (at least one) in one statement; returns their sequences in input
        /// order, fewer when an insert was suppressed (the writer checks the count).
        fn insert_many(
            self,
            statements: &Statements,
            messages: &[Message],
        ) -> impl Future<Output = Result<Vec<i64>, Error>> + Send;
    }
}

/// The writer's statements on one outbox schema, rendered once.
#[derive(Debug, Clone)]
pub struct Statements {
    schema: SchemaName,
    /// Cached as named prepared statements on each connection, or sent unnamed, prepared anew
    /// each time (see [`crate::OutboxConfig::transaction_pooling`]).
    persistent: bool,
    insert_one: String,
    insert_many: String,
}

impl Statements {
    pub(crate) fn new(schema: &SchemaName, persistent: bool) -> Self {
        let render = |sql: &str| sql.replace("{schema}", schema.as_str());
        Statements {
            schema: schema.clone(),
            persistent,
            insert_one: render(Self::INSERT_ONE),
            insert_many: render(Self::INSERT_MANY),
        }
    }

    /// The schema these statements address.
    pub(crate) fn schema(&self) -> &SchemaName {
        &self.schema
    }

    /// Whether the statements are cached on the connection.
    pub(crate) fn persistent(&self) -> bool {
        self.persistent
    }

    /// $1 text, $2 bytea, $3 bytea, $4 jsonb.
    const INSERT_ONE: &'static str = "INSERT INTO {schema}.message (topic, key, payload, headers)
         VALUES ($1, $2, $3, $4) RETURNING id";

    /// $1 text[], $2 bytea[], $3 bytea[], $4 jsonb[]. Ids follow the input order (ORDER BY
    /// ordinality), so a batch keeps its order.
    const INSERT_MANY: &'static str = "INSERT INTO {schema}.message (topic, key, payload, headers)
         SELECT topic, key, payload, headers
           FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::jsonb[])
                WITH ORDINALITY AS m(topic, key, payload, headers, n)
          ORDER BY n
         RETURNING id";
}

/// A message as the statements' four parameters.
struct Row<'m> {
    topic: &'m str,
    key: Option<&'m [u8]>,
    payload: Option<&'m [u8]>,
    headers: Option<Value>,
}

impl<'m> Row<'m> {
    fn new(message: &'m Message) -> Self {
        Row {
            topic: &message.topic,
            key: message.key.as_deref(),
            payload: message.payload.as_deref(),
            headers: encode_stored(&message.headers),
        }
    }
}

/// Messages as the batch statement's four array parameters.
struct Columns<'m> {
    topics: Vec<&'m str>,
    keys: Vec<Option<&'m [u8]>>,
    payloads: Vec<Option<&'m [u8]>>,
    headers: Vec<Option<Value>>,
}

impl<'m> Columns<'m> {
    fn new(messages: &'m [Message]) -> Self {
        let mut columns = Columns {
            topics: Vec::with_capacity(messages.len()),
            keys: Vec::with_capacity(messages.len()),
            payloads: Vec::with_capacity(messages.len()),
            headers: Vec::with_capacity(messages.len()),
        };
        for message in messages {
            let row = Row::new(message);
            columns.topics.push(row.topic);
            columns.keys.push(row.key);
            columns.payloads.push(row.payload);
            columns.headers.push(row.headers);
        }
        columns
    }
}
