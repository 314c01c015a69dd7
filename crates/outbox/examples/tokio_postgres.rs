//! Saving a message through tokio-postgres (feature `tokio-postgres`): the business row and the
//! message in one transaction, their two statements pipelined in one round trip.
//!
//! `cargo run -p outbox --features tokio-postgres --example tokio_postgres`, with `DATABASE_URL`
//! pointing at a database the outbox is migrated in (`outbox migrate`).

use outbox::{Message, Outbox, OutboxConfig};
use tokio_postgres::types::Type;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")?;
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS thing (id bigint PRIMARY KEY, name text)")
        .await?;
    let outbox = Outbox::new(OutboxConfig::default()); // once, at startup

    let id: i64 = std::process::id().into();
    let tx = client.transaction().await?;
    let event = Message::new("thing_topic", format!(r#"{{"id":{id}}}"#)).key(id.to_string());
    let name = "a thing";
    // Awaited together, so tokio-postgres sends both before waiting for either. The business
    // statement is typed, not text: text would be prepared first, a round trip of its own.
    let (inserted, sequence) = tokio::join!(
        async {
            let insert = "INSERT INTO thing (id, name) VALUES ($1, $2)";
            tx.query_typed(insert, &[(&id, Type::INT8), (&name, Type::TEXT)])
                .await
        },
        outbox.save_for_publishing(&tx, event),
    );
    // On either error, `?` returns and dropping `tx` rolls both back.
    inserted?;
    let sequence = sequence?;
    tx.commit().await?;
    println!("thing {id} saved with message {sequence}");
    Ok(())
}
