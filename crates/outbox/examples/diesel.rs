//! Saving a message through diesel's blocking `PgConnection` (feature `diesel`): the business
//! row and the message inside the connection's transaction.
//!
//! `cargo run -p outbox --features diesel --example diesel`, with `DATABASE_URL` pointing at a
//! database the outbox is migrated in (`outbox migrate`).

use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, PgConnection, RunQueryDsl};
use outbox::{Message, Outbox, OutboxConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut conn = PgConnection::establish(&std::env::var("DATABASE_URL")?)?;
    diesel::sql_query("CREATE TABLE IF NOT EXISTS thing (id bigint PRIMARY KEY, name text)")
        .execute(&mut conn)?;
    let outbox = Outbox::new(OutboxConfig::default()); // once, at startup

    let id: i64 = std::process::id().into();
    let sequence = conn.transaction::<_, Box<dyn std::error::Error>, _>(|conn| {
        diesel::sql_query("INSERT INTO thing (id, name) VALUES ($1, $2)")
            .bind::<BigInt, _>(id)
            .bind::<Text, _>("a thing")
            .execute(conn)?;
        let event = Message::new("thing_topic", format!(r#"{{"id":{id}}}"#)).key(id.to_string());
        Ok(outbox.save_for_publishing_blocking(conn, event)?)
    })?;
    println!("thing {id} saved with message {sequence}");
    Ok(())
}
