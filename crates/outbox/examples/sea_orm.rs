//! Saving a message through SeaORM (feature `sea-orm`): the business row and the message in one
//! transaction.
//!
//! `cargo run -p outbox --features sea-orm --example sea_orm`, with `DATABASE_URL` pointing at a
//! PostgreSQL database the outbox is migrated in (`outbox migrate`).

use outbox::{Message, Outbox, OutboxConfig};
use sea_orm::{ConnectionTrait, Database, DbBackend, Statement, TransactionTrait};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let db = Database::connect(std::env::var("DATABASE_URL")?).await?;
    db.execute_unprepared("CREATE TABLE IF NOT EXISTS thing (id bigint PRIMARY KEY, name text)")
        .await?;
    let outbox = Outbox::new(OutboxConfig::default()); // once, at startup

    let id: i64 = std::process::id().into();
    let txn = db.begin().await?;
    txn.execute(Statement::from_sql_and_values(
        DbBackend::Postgres,
        "INSERT INTO thing (id, name) VALUES ($1, $2)",
        [id.into(), "a thing".into()],
    ))
    .await?;
    let event = Message::new("thing_topic", format!(r#"{{"id":{id}}}"#)).key(id.to_string());
    let sequence = outbox.save_for_publishing(&txn, event).await?;
    txn.commit().await?;
    println!("thing {id} saved with message {sequence}");
    Ok(())
}
