//! diesel-async: the writer's statements on the caller's `AsyncPgConnection`, inside its
//! `transaction(..)` (or between `begin_test_transaction` and its end). The statements and the
//! transaction check are diesel's (see the `diesel` module).

use diesel_async::{AnsiTransactionManager, AsyncPgConnection, RunQueryDsl, TransactionManager};

use super::diesel::{in_transaction, insert_many, insert_one, Id};
use super::{sealed, ClientTransaction, Columns, Row, Statements};
use crate::error::Error;
use crate::message::Message;

impl ClientTransaction for &mut AsyncPgConnection {}

impl sealed::Sealed for &mut AsyncPgConnection {
    async fn insert_one(self, statements: &Statements, message: &Message) -> Result<i64, Error> {
        in_transaction(AnsiTransactionManager::transaction_manager_status_mut(self))?;
        let ids: Vec<Id> = insert_one(statements, Row::new(message))
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
        in_transaction(AnsiTransactionManager::transaction_manager_status_mut(self))?;
        let ids: Vec<Id> = insert_many(statements, Columns::new(messages))
            .load(self)
            .await
            .map_err(Error::Diesel)?;
        Ok(ids.into_iter().map(|row| row.id).collect())
    }
}
