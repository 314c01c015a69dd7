//! sqlx: the writer's statements on the caller's `sqlx::Transaction`, and the single statement
//! of [`Outbox::execute_and_save`](crate::Outbox::execute_and_save).

use sqlx::postgres::PgArguments;
use sqlx::{Arguments as _, PgConnection, Postgres, Transaction};

use super::{sealed, ClientTransaction, Columns, Row, Statements};
use crate::error::Error;
use crate::message::Message;

impl ClientTransaction for &mut Transaction<'_, Postgres> {}

impl sealed::Sealed for &mut Transaction<'_, Postgres> {
    async fn insert_one(self, statements: &Statements, message: &Message) -> Result<i64, Error> {
        let row = Row::new(message);
        sqlx::query_scalar(&statements.insert_one)
            .bind(row.topic)
            .bind(row.key)
            .bind(row.payload)
            .bind(row.headers)
            .persistent(statements.persistent)
            .fetch_optional(&mut **self)
            .await?
            .ok_or(Error::NotSaved)
    }

    async fn insert_many(
        self,
        statements: &Statements,
        messages: &[Message],
    ) -> Result<Vec<i64>, Error> {
        let columns = Columns::new(messages);
        let ids: Vec<i64> = sqlx::query_scalar(&statements.insert_many)
            .bind(columns.topics)
            .bind(columns.keys)
            .bind(columns.payloads)
            .bind(columns.headers)
            .persistent(statements.persistent)
            .fetch_all(&mut **self)
            .await?;
        Ok(ids)
    }
}

impl Statements {
    /// Runs `statement` (the caller's INSERT, UPDATE or DELETE with a RETURNING clause, its
    /// parameters in `arguments`) and inserts `message` in the same statement, only if the
    /// statement returned a row. Returns the message's sequence, `None` when nothing was saved.
    pub(crate) async fn insert_with_statement(
        &self,
        conn: &mut PgConnection,
        statement: &str,
        arguments: PgArguments,
        message: &Message,
    ) -> Result<Option<i64>, sqlx::Error> {
        // The caller's parameters keep their numbers; the message's follow them. The newline
        // ends a trailing `-- comment` of the statement before the closing parenthesis.
        let first = arguments.len() + 1;
        let sql = format!(
            "WITH business AS ({statement}\n)
             INSERT INTO {schema}.message (topic, key, payload, headers)
             SELECT ${first}, ${}, ${}, ${} WHERE EXISTS (SELECT 1 FROM business)
             RETURNING id",
            first + 1,
            first + 2,
            first + 3,
            schema = self.schema.as_str(),
        );
        let row = Row::new(message);
        sqlx::query_scalar_with(&sql, arguments)
            .bind(row.topic)
            .bind(row.key)
            .bind(row.payload)
            .bind(row.headers)
            .persistent(self.persistent)
            .fetch_optional(conn)
            .await
    }
}
