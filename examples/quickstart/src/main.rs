//! The whole path in one program: migrate, save messages in a business transaction, run the
//! relay until they are published, and print them as consumed back from Kafka.
//!
//! Run with `dev/quickstart` (which starts PostgreSQL and Kafka first), or against services of
//! your own with `DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` set. A package of its own, so that
//! it can use only what a user has: the published crates, sqlx, rdkafka and tokio.

use std::time::Duration;

use outbox::{headers, Message, Outbox, OutboxConfig};
use outbox_kafka_relay::{Relay, RelayConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

type Error = Box<dyn std::error::Error>;

const PARTITIONS: i32 = 3;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let database_url = env_or(
        "DATABASE_URL",
        "postgres://outbox:outbox@127.0.0.1:55432/outbox",
    );
    let bootstrap = env_or("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092");

    let pool = sqlx::PgPool::connect(&database_url).await?;
    let outbox = Outbox::new(OutboxConfig::default());
    println!("{}", outbox.migrate(&pool).await?);
    sqlx::query("CREATE TABLE IF NOT EXISTS quickstart_thing (id bigserial PRIMARY KEY, name text NOT NULL)")
        .execute(&pool)
        .await?;
    // A topic of this run's own, so that only its five events are read back.
    let topic = format!("quickstart-things-{}", uuid::Uuid::new_v4().simple());
    create_topic(&bootstrap, &topic).await?;

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

    let relay = Relay::start(pool.clone(), RelayConfig::new(&bootstrap, "quickstart"))?;
    let consumer = read_from_the_beginning(&bootstrap, &topic)?;
    println!("consumed from Kafka topic {topic}:");
    for _ in 0..5 {
        let record = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .map_err(|_| "no record within 60 s")??;
        let header = |name: &str| {
            record
                .headers()
                .and_then(|headers| headers.iter().find(|header| header.key == name))
                .and_then(|header| header.value)
                .unwrap_or_default()
        };
        println!(
            "  partition {} offset {} key {} x-sequence {} x-source {} value {}",
            record.partition(),
            record.offset(),
            String::from_utf8_lossy(record.key().unwrap_or_default()),
            headers::decode_sequence(header(headers::SEQUENCE))?,
            String::from_utf8_lossy(header(headers::SOURCE)),
            String::from_utf8_lossy(record.payload().unwrap_or_default()),
        );
    }
    relay.shutdown().await?;
    Ok(())
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

async fn create_topic(bootstrap: &str, topic: &str) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(20)));
    let new_topic = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    for result in admin.create_topics([&new_topic], &options).await? {
        result.map_err(|(name, code)| format!("cannot create topic {name}: {code}"))?;
    }
    Ok(())
}

/// A consumer of every partition of `topic` from its first record, without joining a group.
fn read_from_the_beginning(bootstrap: &str, topic: &str) -> Result<StreamConsumer, Error> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "quickstart")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..PARTITIONS {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}
