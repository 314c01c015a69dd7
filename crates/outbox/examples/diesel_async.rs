//! Saving a message through diesel-async (feature `diesel-async`): the business row and the
//! message inside the connection's transaction.
//!
//! `cargo run -p outbox --features diesel-async --example diesel_async`, with `DATABASE_URL`
//! pointing at a database the outbox is migrated in (`outbox migrate`).

use diesel::sql_types::{BigInt, Text};
use diesel_async::scoped_futures::ScopedFutureExt as _;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use outbox::{Message, Outbox, OutboxConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut conn = AsyncPgConnection::establish(&std::env::var("DATABASE_URL")?).await?;
    diesel::sql_query("CREATE TABLE IF NOT EXISTS thing (id bigint PRIMARY KEY, name text)")
        .execute(&mut conn)
        .await?;
    let outbox = Outbox::new(OutboxConfig::default()); // once, at startup

    let id: i64 = std::process::id().into();
    let sequence = conn
        .transaction::<_, Box<dyn std::error::Error + Send + Sync>, _>(|conn| {
            async move {
                diesel::sql_query("INSERT INTO thing (id, name) VALUES ($1, $2)")
                    .bind::<BigInt, _>(id)
                    .bind::<Text, _>("a thing")
                    .execute(conn)
                    .await?;
                let event =
                    Message::new("thing_topic", format!(r#"{{"id":{id}}}"#)).key(id.to_string());
                Ok(outbox.save_for_publishing(conn, event).await?)
            }
            .scope_boxed()
        })
        .await
        .map_err(|error| error.to_string())?;
    println!("thing {id} saved with message {sequence}");
    Ok(())
}
