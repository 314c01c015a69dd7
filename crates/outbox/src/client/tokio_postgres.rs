//! tokio-postgres (and the pools built on it, deadpool-postgres and bb8-postgres, whose
//! connections dereference to its `Client`): the writer's statements on the caller's
//! `tokio_postgres::Transaction`.
//!
//! Each statement is sent with its parameter types ([`query_typed`]): parse, bind and execute
//! in one round trip, with no named statement left on the connection, so it also runs behind a
//! pooler in transaction mode (and is parsed every time). tokio-postgres pipelines the requests
//! of one connection that are awaited together: a save joined with the service's own statement
//! shares its round trip, when that statement needs none of its own first (a statement given as
//! text is prepared first, a round trip: give it typed, or prepared).
//!
//! [`query_typed`]: tokio_postgres::Transaction::query_typed

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use super::{sealed, ClientTransaction, Columns, Row, Statements};
use crate::error::Error;
use crate::message::Message;

impl ClientTransaction for &Transaction<'_> {}

impl sealed::Sealed for &Transaction<'_> {
    async fn insert_one(self, statements: &Statements, message: &Message) -> Result<i64, Error> {
        let row = Row::new(message);
        let params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&row.topic, Type::TEXT),
            (&row.key, Type::BYTEA),
            (&row.payload, Type::BYTEA),
            (&row.headers, Type::JSONB),
        ];
        let rows = self
            .query_typed(&statements.insert_one, &params)
            .await
            .map_err(Error::TokioPostgres)?;
        match rows.first() {
            Some(row) => row.try_get(0).map_err(Error::TokioPostgres),
            None => Err(Error::NotSaved),
        }
    }

    async fn insert_many(
        self,
        statements: &Statements,
        messages: &[Message],
    ) -> Result<Vec<i64>, Error> {
        let columns = Columns::new(messages);
        let params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&columns.topics, Type::TEXT_ARRAY),
            (&columns.keys, Type::BYTEA_ARRAY),
            (&columns.payloads, Type::BYTEA_ARRAY),
            (&columns.headers, Type::JSONB_ARRAY),
        ];
        let rows = self
            .query_typed(&statements.insert_many, &params)
            .await
            .map_err(Error::TokioPostgres)?;
        let ids = rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(Error::TokioPostgres)?;
        Ok(ids)
    }
}

/// `error` with what the server said: tokio-postgres displays a server's error as "db error"
/// alone, and its severity, code and message only through `as_db_error`.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => error.to_string(),
    }
}
