//! diesel: the writer's statements on the caller's `PgConnection`, inside its
//! `transaction(..)`, blocking (see [`BlockingClientTransaction`]); and what diesel-async's
//! client shares with it: the statements bound as diesel queries, the transaction check.
//!
//! diesel has no transaction type: the connection is in a transaction or not. A connection
//! that is not is refused ([`Error::NotInTransaction`]), before anything is written, since the
//! message would commit at once, apart from the business data.

use diesel::connection::TransactionManagerStatus;
use diesel::pg::Pg;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::{Array, BigInt, Bytea, Jsonb, Nullable, Text};
use diesel::QueryableByName;

use super::{Columns, Row, Statements};
use crate::error::Error;

#[derive(QueryableByName)]
pub(super) struct Id {
    #[diesel(sql_type = BigInt)]
    pub(super) id: i64,
}

/// The one-message insert, bound.
pub(super) fn insert_one<'a>(
    statements: &'a Statements,
    row: Row<'a>,
) -> BoxedSqlQuery<'a, Pg, SqlQuery> {
    diesel::sql_query(&statements.insert_one)
        .into_boxed()
        .bind::<Text, _>(row.topic)
        .bind::<Nullable<Bytea>, _>(row.key)
        .bind::<Nullable<Bytea>, _>(row.payload)
        .bind::<Nullable<Jsonb>, _>(row.headers)
}

/// The batch insert, bound.
pub(super) fn insert_many<'a>(
    statements: &'a Statements,
    columns: Columns<'a>,
) -> BoxedSqlQuery<'a, Pg, SqlQuery> {
    diesel::sql_query(&statements.insert_many)
        .into_boxed()
        .bind::<Array<Text>, _>(columns.topics)
        .bind::<Array<Nullable<Bytea>>, _>(columns.keys)
        .bind::<Array<Nullable<Bytea>>, _>(columns.payloads)
        .bind::<Array<Nullable<Jsonb>>, _>(columns.headers)
}

/// Refuses a connection outside a transaction, as diesel counts them. (A commit cancelled
/// after it was sent leaves diesel-async's count at 1 with the transaction gone: diesel marks
/// the connection broken, and pools discard it, but the mark is not public, so a save on such a
/// connection itself would commit alone.)
pub(super) fn in_transaction(status: &mut TransactionManagerStatus) -> Result<(), Error> {
    match status.transaction_depth() {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(Error::NotInTransaction),
        Err(error) => Err(Error::Diesel(error)),
    }
}

#[cfg(feature = "diesel")]
mod blocking {
    use diesel::connection::{AnsiTransactionManager, TransactionManager};
    use diesel::{PgConnection, RunQueryDsl};

    use super::super::blocking::Sealed;
    use super::super::{BlockingClientTransaction, Columns, Row, Statements};
    use super::{in_transaction, insert_many, insert_one, Id};
    use crate::error::Error;
    use crate::message::Message;

    impl BlockingClientTransaction for &mut PgConnection {}

    impl Sealed for &mut PgConnection {
        fn insert_one(self, statements: &Statements, message: &Message) -> Result<i64, Error> {
            in_transaction(AnsiTransactionManager::transaction_manager_status_mut(self))?;
            let ids: Vec<Id> = insert_one(statements, Row::new(message))
                .load(self)
                .map_err(Error::Diesel)?;
            ids.into_iter()
                .next()
                .map(|row| row.id)
                .ok_or(Error::NotSaved)
        }

        fn insert_many(
            self,
            statements: &Statements,
            messages: &[Message],
        ) -> Result<Vec<i64>, Error> {
            in_transaction(AnsiTransactionManager::transaction_manager_status_mut(self))?;
            let ids: Vec<Id> = insert_many(statements, Columns::new(messages))
                .load(self)
                .map_err(Error::Diesel)?;
            Ok(ids.into_iter().map(|row| row.id).collect())
        }
    }
}
