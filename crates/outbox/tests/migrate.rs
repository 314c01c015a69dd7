//! Migrations against the real PostgreSQL started by `dev/up`.

use outbox_test_support::TestOutbox;

/// Since migration 0005 every row of `message` is pending (published rows move to `published`),
/// yet the claim, the backlog and the held-key lookups still filtered on `processed_at IS NULL`:
/// a raw INSERT that set it stored a message that no relay would publish and no status counted.
#[tokio::test]
async fn a_writer_cannot_hide_a_message_from_the_relay_with_processed_at() {
    let outbox = TestOutbox::new().await;
    let refused = sqlx::query(&format!(
        "INSERT INTO {}.message (topic, payload, processed_at) VALUES ('t', 'x', now())",
        outbox.schema
    ))
    .execute(&outbox.pool)
    .await
    .expect_err("message.processed_at is gone");
    assert_eq!(
        refused
            .as_database_error()
            .and_then(|e| e.code())
            .as_deref(),
        Some("42703"),
        "undefined column: {refused}"
    );
    outbox.drop_schema().await;
}
