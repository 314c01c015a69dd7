//! The whole path in one program: migrate, save messages in a business transaction, run the
//! relay until they are published, and print them as consumed back from Kafka.
//!
//! Run with `dev/quickstart` (which starts PostgreSQL and Kafka first).

use std::time::Duration;

use outbox::{Message, Outbox, OutboxConfig};
use outbox_kafka_relay::{Relay, RelayConfig};
use outbox_test_support::{create_topic, kafka_bootstrap_servers, pool, unique_topic, TopicReader};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = pool().await;
    let outbox = Outbox::new(OutboxConfig::default());
    println!("{}", outbox.migrate(&pool).await?);
    sqlx::query("CREATE TABLE IF NOT EXISTS quickstart_thing (id bigserial PRIMARY KEY, name text NOT NULL)")
        .execute(&pool)
        .await?;
    let topic = unique_topic("quickstart-things");
    create_topic(&kafka_bootstrap_servers(), &topic, 3).await;

    // The business write and the events commit together, or not at all.
    let mut tx = pool.begin().await?;
    for name in [
        "anvil",
        "rocket",
        "magnet",
        "tornado kit",
        "giant rubber band",
    ] {
        let id: i64 =
            sqlx::query_scalar("INSERT INTO quickstart_thing (name) VALUES ($1) RETURNING id")
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        let event = format!(r#"{{"type":"ThingCreated","id":{id},"name":"{name}"}}"#);
        let sequence = outbox
            .save_for_publishing(
                &mut tx,
                Message::new(&topic, event)
                    .key(id.to_string())
                    .header("x-value-type", "ThingCreated"),
            )
            .await?;
        println!("saved thing {id} ({name}) with outbox sequence {sequence}");
    }
    tx.commit().await?;

    let relay = Relay::start(
        pool.clone(),
        RelayConfig::new(kafka_bootstrap_servers(), "quickstart"),
    )?;
    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(5, Duration::from_secs(60)).await;
    relay.shutdown().await?;
    println!("consumed from Kafka topic {topic}:");
    for record in &reader.received {
        println!(
            "  partition {} offset {} key {} x-sequence {} x-source {} value {}",
            record.partition,
            record.offset,
            record.key_str(),
            record.sequence(),
            String::from_utf8_lossy(record.header("x-source").unwrap_or_default()),
            record.payload_str()
        );
    }
    Ok(())
}
