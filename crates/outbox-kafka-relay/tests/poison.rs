//! Messages Kafka rejects permanently, under each poison policy, against the real services.
//!
//! The rejection is real: the relay's producer is limited to 2,000-byte records
//! (`message.max.bytes`), so librdkafka refuses a 5,000-byte record with MSG_SIZE_TOO_LARGE,
//! exactly as it would a record over the broker's limit. "Fixing" it means restarting the relay
//! with the default limit, as an operator would.

use std::time::Duration;

use outbox::admin::Admin;
use outbox::Message;
use outbox_kafka_relay::{Delivery, PoisonPolicy, Relay, RelayConfig};
use outbox_test_support::chaos::{report, Figures};
use outbox_test_support::{
    create_topic, kafka_bootstrap_servers, unique_topic, TestOutbox, TopicReader,
};

const READ: Duration = Duration::from_secs(60);

fn config(
    outbox: &TestOutbox,
    policy: PoisonPolicy,
    small_limit: bool,
    delivery: Delivery,
) -> RelayConfig {
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "poison-tests");
    config.schema = outbox.schema.clone();
    config.poison_policy = policy;
    config.delivery = delivery;
    // A transactional id and a progress topic of the test's own.
    config.lease_name = format!("lease-{}", outbox.schema);
    config.progress_topic = format!("poison-progress-{}", outbox.schema);
    config.poll_interval = Duration::from_millis(100);
    config.backoff_initial = Duration::from_millis(100);
    config.backoff_max = Duration::from_millis(500);
    if small_limit {
        config
            .kafka
            .set("message.max.bytes", "2000")
            .set("batch.size", "2000");
    }
    config
}

/// Writes `poison:0..3` (the second one too large) interleaved with `healthy:0..5`, each in a
/// transaction of its own. Returns the poison message's sequence.
async fn write_messages(outbox: &TestOutbox, topic: &str) -> i64 {
    let mut poison_sequence = 0;
    for i in 0..5 {
        if i < 4 {
            let payload = if i == 1 {
                "x".repeat(5000)
            } else {
                format!("poison:{i}")
            };
            let sequence = outbox
                .commit_each([Message::new(topic, payload).key("poison")])
                .await[0];
            if i == 1 {
                poison_sequence = sequence;
            }
        }
        outbox
            .commit_each([Message::new(topic, format!("healthy:{i}")).key("healthy")])
            .await;
    }
    poison_sequence
}

fn payloads_of(reader: &TopicReader, key: &str) -> Vec<String> {
    reader
        .received
        .iter()
        .filter(|r| r.key_str() == key)
        .map(|r| {
            let payload = r.payload_str();
            if payload.len() > 100 {
                "BIG".to_owned()
            } else {
                payload.to_owned()
            }
        })
        .collect()
}

/// In a scenario's name in docs/reliability.md.
fn mode(delivery: Delivery) -> &'static str {
    match delivery {
        Delivery::AtLeastOnce => "",
        _ => " (exactly-once)",
    }
}

async fn block_policy_holds_the_key_while_others_flow_and_resumes_in_order_once_fixed(
    delivery: Delivery,
) {
    block_policy(false, delivery).await;
}

/// The same with a backlog drained in batches of two: the poison message fails in one batch
/// while the next is claimed as soon as it is settled; that claim must already see the hold.
async fn block_policy_holds_the_key_across_batches_of_a_backlog(delivery: Delivery) {
    block_policy(true, delivery).await;
}

async fn block_policy(backlog_in_small_batches: bool, delivery: Delivery) {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("poison-block");
    create_topic(&kafka_bootstrap_servers(), &topic, 2).await;
    let mut relay_config = config(&outbox, PoisonPolicy::Block, true, delivery);
    let mut poison = 0;
    if backlog_in_small_batches {
        relay_config.batch_size = 2;
        poison = write_messages(&outbox, &topic).await;
    }
    let relay = Relay::start(outbox.pool.clone(), relay_config).unwrap();
    if !backlog_in_small_batches {
        poison = write_messages(&outbox, &topic).await;
    }

    let mut reader = TopicReader::new(&topic);
    reader
        .read_until(READ, |r| {
            r.iter().filter(|r| r.key_str() == "healthy").count() == 5
        })
        .await;
    reader.read_for(Duration::from_secs(1)).await;
    assert_eq!(
        payloads_of(&reader, "poison"),
        ["poison:0"],
        "the key stops at the poison message"
    );

    let admin = Admin::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let held = admin.held_keys(&mut conn, 10).await.unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].head, poison);
    assert_eq!(held[0].key.as_deref(), Some(&b"poison"[..]));
    assert!(held[0].attempts >= 1);
    assert!(
        held[0]
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("too large"),
        "{held:?}"
    );
    drop(conn);
    relay.shutdown().await.unwrap();

    // Fixed: a relay that accepts the record publishes it, and then the rest of its key, in order.
    let relay = Relay::start(
        outbox.pool.clone(),
        config(&outbox, PoisonPolicy::Block, false, delivery),
    )
    .unwrap();
    reader
        .read_until(READ, |r| {
            r.iter().filter(|r| r.key_str() == "poison").count() == 4
        })
        .await;
    assert_eq!(
        payloads_of(&reader, "poison"),
        ["poison:0", "BIG", "poison:2", "poison:3"]
    );
    let duplicates = reader.assert_per_key_order();
    if delivery == Delivery::ExactlyOnce {
        assert_eq!(duplicates, 0, "duplicates exactly once");
    }
    let scenario = if backlog_in_small_batches {
        "7c. poison message in a backlog drained in batches of 2, block policy"
    } else {
        "7a. poison message mid-stream, block policy (key resumes in order after the fix)"
    };
    report(
        &format!("{scenario}{}", mode(delivery)),
        1,
        &Figures {
            committed: 9,
            duplicates,
            ..Figures::default()
        },
        None,
    );
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

async fn dead_letter_policy_moves_the_message_aside_and_a_requeued_one_is_published(
    delivery: Delivery,
) {
    let outbox = TestOutbox::new().await;
    let topic = unique_topic("poison-dlq");
    create_topic(&kafka_bootstrap_servers(), &topic, 2).await;
    let relay = Relay::start(
        outbox.pool.clone(),
        config(&outbox, PoisonPolicy::DeadLetter, true, delivery),
    )
    .unwrap();
    let poison = write_messages(&outbox, &topic).await;

    let mut reader = TopicReader::new(&topic);
    reader.read_at_least(8, READ).await;
    assert_eq!(
        payloads_of(&reader, "poison"),
        ["poison:0", "poison:2", "poison:3"]
    );
    assert_eq!(payloads_of(&reader, "healthy").len(), 5);
    outbox.wait_until_drained(Duration::from_secs(10)).await;

    let admin = Admin::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let letters = admin.dead_letters(&mut conn, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, poison, "the dead letter keeps its sequence");
    assert!(letters[0].error.contains("too large"), "{letters:?}");
    relay.shutdown().await.unwrap();

    assert_eq!(
        admin.requeue_dead_letters(&mut conn, None).await.unwrap(),
        [poison]
    );
    drop(conn);
    let relay = Relay::start(
        outbox.pool.clone(),
        config(&outbox, PoisonPolicy::DeadLetter, false, delivery),
    )
    .unwrap();
    reader.read_at_least(9, READ).await;
    let requeued = reader.received.last().unwrap();
    assert_eq!(
        requeued.sequence(),
        poison,
        "published with its original x-sequence"
    );
    let duplicates = reader.assert_per_key_order_except(poison);
    if delivery == Delivery::ExactlyOnce {
        assert_eq!(duplicates, 0, "duplicates exactly once");
    }
    report(
        &format!(
            "7b. poison message mid-stream, dead-letter policy (requeued and published){}",
            mode(delivery)
        ),
        1,
        &Figures {
            committed: 9,
            duplicates,
            ..Figures::default()
        },
        None,
    );
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

// Each scenario at least once, and exactly once (a consumer reading with read_committed,
// librdkafka's default: it sees no duplicate).
outbox_test_support::in_both_modes!(
    block_policy_holds_the_key_while_others_flow_and_resumes_in_order_once_fixed,
    block_policy_holds_the_key_across_batches_of_a_backlog,
    dead_letter_policy_moves_the_message_aside_and_a_requeued_one_is_published,
);
