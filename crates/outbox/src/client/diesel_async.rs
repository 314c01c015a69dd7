//! diesel-async: the writer's statements on the caller's `AsyncPgConnection`, inside its
//! `transaction(..)` (or between `begin_test_transaction` and its end).
//!
//! diesel has no transaction type: the connection is in a transaction or not. A connection
//! that is not is refused ([`Error::NotInTransaction`]), before anything is written, since the
//! message would commit at once, apart from the business data.

use diesel::sql_types::{Array, BigInt, Bytea, Jsonb, Nullable, Text};
use diesel::QueryableByName;
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, RunQueryDsl, TransactionManager};

use super::{sealed, ClientTransaction, Columns, Row, Statements};
use crate::error::Error;
use crate::message::Message;

impl ClientTransaction for &mut AsyncPgConnection {}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = BigInt)]
    id: i64,
}

impl sealed::Sealed for &mut AsyncPgConnection {
    async fn insert_one(self, statements: &Statements, message: &Message) -> Result<i64, Error> {
        in_transaction(self)?;
        let row = Row::new(message);
        let ids: Vec<Id> = diesel::sql_query(&statements.insert_one)
            .bind::<Text, _>(row.topic)
            .bind::<Nullable<Bytea>, _>(row.key)
            .bind::<Nullable<Bytea>, _>(row.payload)
            .bind::<Nullable<Jsonb>, _>(row.headers)
            .load(self)
            .await
            .map_err(Error::Diesel)?;
        ids.into_iter()
            .next()
            .map(|row| row.id)
            .ok_or(Error::NotSaved)
    }

    async fn insert_many(
        self,
        statements: &Statements,
        messages: &[Message],
    ) -> Result<Vec<i64>, Error> {
        in_transaction(self)?;
        let columns = Columns::new(messages);
        let ids: Vec<Id> = diesel::sql_query(&statements.insert_many)
            .bind::<Array<Text>, _>(columns.topics)
            .bind::<Array<Nullable<Bytea>>, _>(columns.keys)
            .bind::<Array<Nullable<Bytea>>, _>(columns.payloads)
            .bind::<Array<Nullable<Jsonb>>, _>(columns.headers)
            .load(self)
            .await
            .map_err(Error::Diesel)?;
        Ok(ids.into_iter().map(|row| row.id).collect())
    }
}

/// Refuses a connection outside a transaction, as diesel counts them. (A commit cancelled
/// after it was sent leaves diesel's count at 1 with the transaction gone: diesel marks the
/// connection broken, and pools discard it, but the mark is not public, so a save on such a
/// connection itself would commit alone.)
fn in_transaction(conn: &mut AsyncPgConnection) -> Result<(), Error> {
    match AnsiTransactionManager::transaction_manager_status_mut(conn).transaction_depth() {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(Error::NotInTransaction),
        Err(error) => Err(Error::Diesel(error)),
    }
}
