//! SeaORM: the writer's statements on the caller's `sea_orm::DatabaseTransaction` (PostgreSQL).
//!
//! SeaORM binds arrays without NULL elements, and a message's key, payload and headers may each
//! be NULL, so a batch is a multi-row `VALUES` list (1,000 messages per statement, in input
//! order: rows are inserted, and take their ids, in the order listed) instead of the other
//! clients' `unnest` of arrays. The rows are the same.

use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement, Value};

use super::{sealed, ClientTransaction, Row, Statements};
use crate::error::Error;
use crate::message::Message;

/// Messages per statement: 4 parameters each, well under PostgreSQL's 65,535.
const CHUNK: usize = 1_000;

impl ClientTransaction for &DatabaseTransaction {}

impl sealed::Sealed for &DatabaseTransaction {
    async fn insert_one(self, statements: &Statements, message: &Message) -> Result<i64, Error> {
        postgres(self)?;
        let statement = Statement::from_sql_and_values(
            DbBackend::Postgres,
            statements.insert_one.as_str(),
            values(&Row::new(message)),
        );
        match self.query_one(statement).await? {
            Some(row) => Ok(row.try_get_by_index(0)?),
            None => Err(Error::NotSaved),
        }
    }

    async fn insert_many(
        self,
        statements: &Statements,
        messages: &[Message],
    ) -> Result<Vec<i64>, Error> {
        postgres(self)?;
        let mut ids = Vec::with_capacity(messages.len());
        for chunk in messages.chunks(CHUNK) {
            let rows: Vec<String> = (0..chunk.len())
                .map(|i| {
                    let n = 4 * i;
                    format!("(${}, ${}, ${}, ${})", n + 1, n + 2, n + 3, n + 4)
                })
                .collect();
            let sql = format!(
                "INSERT INTO {}.message (topic, key, payload, headers) VALUES {} RETURNING id",
                statements.schema.as_str(),
                rows.join(", ")
            );
            let values = chunk.iter().flat_map(|message| values(&Row::new(message)));
            let statement = Statement::from_sql_and_values(DbBackend::Postgres, sql, values);
            let mut chunk_ids = self
                .query_all(statement)
                .await?
                .iter()
                .map(|row| row.try_get_by_index(0))
                .collect::<Result<Vec<i64>, _>>()?;
            // RETURNING lists rows as inserted, which is the order listed; sorted, to rely on
            // nothing but the ids' own order.
            chunk_ids.sort_unstable();
            ids.extend(chunk_ids);
        }
        Ok(ids)
    }
}

/// The outbox's statements are PostgreSQL's.
fn postgres(tx: &DatabaseTransaction) -> Result<(), Error> {
    match tx.get_database_backend() {
        DbBackend::Postgres => Ok(()),
        other => Err(Error::UnsupportedDatabase(format!("{other:?}"))),
    }
}

/// A message's four parameters, typed as the statements' columns: text, bytea, bytea, jsonb.
fn values(row: &Row<'_>) -> [Value; 4] {
    [
        Value::String(Some(Box::new(row.topic.to_owned()))),
        Value::Bytes(row.key.map(|key| Box::new(key.to_vec()))),
        Value::Bytes(row.payload.map(|payload| Box::new(payload.to_vec()))),
        Value::Json(row.headers.clone().map(Box::new)),
    ]
}
