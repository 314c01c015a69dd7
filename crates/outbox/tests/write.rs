//! The write side and the inbox against the real PostgreSQL started by `dev/up`.

use std::time::Duration;

use outbox::admin::Admin;
use outbox::{Error, Inbox, InvalidMessage, Message};
use outbox_test_support::TestOutbox;

#[tokio::test]
async fn invalid_message_is_a_typed_error_and_the_transaction_stays_usable() {
    let outbox = TestOutbox::new().await;
    let mut tx = outbox.pool.begin().await.unwrap();
    let error = outbox
        .outbox
        .save_for_publishing(&mut tx, Message::new("bad topic!", b"x".to_vec()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidMessage(InvalidMessage::IllegalTopic { .. })
        ),
        "{error}"
    );
    let error = outbox
        .outbox
        .save_all_for_publishing(
            &mut tx,
            [
                Message::new("ok", b"x".to_vec()),
                Message::new("ok", vec![0; 2_000_000]),
            ],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            Error::InvalidMessage(InvalidMessage::TooLarge { .. })
        ),
        "{error}"
    );
    // Nothing was written, and the caller may go on with the same transaction.
    outbox
        .outbox
        .save_for_publishing(&mut tx, Message::new("ok", b"x".to_vec()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outbox.pending().await, 1);
    outbox.drop_schema().await;
}

/// `execute_and_save`: the business statement and the message in one statement, the message
/// only when the statement returned a row, both or neither committed.
#[tokio::test]
async fn execute_and_save_runs_the_statement_and_saves_the_message_together() {
    let outbox = TestOutbox::new().await;
    let schema = &outbox.schema;
    sqlx::raw_sql(&format!(
        "CREATE TABLE {schema}.orders (id bigint PRIMARY KEY, state text NOT NULL)"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let insert = format!("INSERT INTO {schema}.orders (id, state) VALUES ($1, $2) RETURNING id;");
    let ship = format!(
        "UPDATE {schema}.orders SET state = 'shipped' WHERE id = $1 AND state = 'packed' RETURNING id"
    );
    let orders = |state: &'static str| {
        let sql = format!("SELECT count(*) FROM {schema}.orders WHERE state = '{state}'");
        let pool = outbox.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let event = |n: &str| Message::new("orders", n.as_bytes().to_vec()).key("order-1");

    // Both, with the statement's parameters and the message's in one statement.
    let mut tx = outbox.pool.begin().await.unwrap();
    let created = outbox
        .outbox
        .execute_and_save(
            &mut tx,
            sqlx::query(&insert).bind(1_i64).bind("packed"),
            event("created"),
        )
        .await
        .unwrap()
        .expect("the insert returned a row");
    tx.commit().await.unwrap();
    assert_eq!(orders("packed").await, 1);
    let (payload, key): (Vec<u8>, Vec<u8>) = sqlx::query_as(&format!(
        "SELECT payload, key FROM {schema}.message WHERE id = $1"
    ))
    .bind(created)
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(
        (payload.as_slice(), key.as_slice()),
        (&b"created"[..], &b"order-1"[..])
    );

    // A statement that changes nothing saves nothing.
    let mut tx = outbox.pool.begin().await.unwrap();
    let nothing = outbox
        .outbox
        .execute_and_save(&mut tx, sqlx::query(&ship).bind(2_i64), event("shipped 2"))
        .await
        .unwrap();
    assert_eq!(nothing, None);
    // Rolled back: neither the update nor the message.
    let shipped = outbox
        .outbox
        .execute_and_save(&mut tx, sqlx::query(&ship).bind(1_i64), event("shipped 1"))
        .await
        .unwrap();
    assert!(shipped.is_some_and(|id| id > created));
    tx.rollback().await.unwrap();
    assert_eq!((orders("packed").await, orders("shipped").await), (1, 0));
    assert_eq!(outbox.pending().await, 1);

    // A failing statement saves nothing; an invalid message runs nothing.
    let mut tx = outbox.pool.begin().await.unwrap();
    let duplicate = outbox
        .outbox
        .execute_and_save(
            &mut tx,
            sqlx::query(&insert).bind(1_i64).bind("packed"),
            event("again"),
        )
        .await
        .unwrap_err();
    assert!(matches!(duplicate, Error::Database(_)), "{duplicate}");
    tx.rollback().await.unwrap();
    let mut tx = outbox.pool.begin().await.unwrap();
    let invalid = outbox
        .outbox
        .execute_and_save(
            &mut tx,
            sqlx::query(&insert).bind(2_i64).bind("packed"),
            Message::new("bad topic!", b"x".to_vec()),
        )
        .await
        .unwrap_err();
    assert!(matches!(invalid, Error::InvalidMessage(_)), "{invalid}");
    tx.commit().await.unwrap();
    assert_eq!((orders("packed").await, outbox.pending().await), (1, 1));
    outbox.drop_schema().await;
}

#[tokio::test]
async fn batch_insert_keeps_the_input_order() {
    let outbox = TestOutbox::new().await;
    let mut tx = outbox.pool.begin().await.unwrap();
    let sequences = outbox
        .outbox
        .save_all_for_publishing(
            &mut tx,
            (0..500).map(|i| Message::new("t", format!("{i}")).key("k")),
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]));
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(&format!(
        "SELECT payload FROM {}.message ORDER BY id",
        outbox.schema
    ))
    .fetch_all(&outbox.pool)
    .await
    .unwrap();
    let expected: Vec<Vec<u8>> = (0..500).map(|i| format!("{i}").into_bytes()).collect();
    assert_eq!(payloads, expected);
    outbox.drop_schema().await;
}

#[tokio::test]
async fn sql_enqueue_function_stores_a_message_with_text_headers() {
    let outbox = TestOutbox::new().await;
    let mut tx = outbox.pool.begin().await.unwrap();
    let sequence: i64 = sqlx::query_scalar(&format!(
        "SELECT {}.enqueue('thing_topic', '42', convert_to('{{\"id\":42}}', 'UTF8'), '{{\"x-value-type\": \"ThingCreated\"}}')",
        outbox.schema
    ))
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let (topic, key, headers): (String, Vec<u8>, serde_json::Value) = sqlx::query_as(&format!(
        "SELECT topic, key, headers FROM {}.message WHERE id = $1",
        outbox.schema
    ))
    .bind(sequence)
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(
        (topic.as_str(), key.as_slice()),
        ("thing_topic", &b"42"[..])
    );
    assert_eq!(
        headers,
        serde_json::json!([{"name": "x-value-type", "text": "ThingCreated"}])
    );

    let bad = sqlx::query(&format!(
        "SELECT {}.enqueue('no/slashes', NULL, NULL)",
        outbox.schema
    ))
    .execute(&outbox.pool)
    .await
    .unwrap_err();
    assert!(bad.to_string().contains("message_topic_is_legal"), "{bad}");
    outbox.drop_schema().await;
}

#[tokio::test]
async fn migrating_twice_changes_nothing() {
    let outbox = TestOutbox::new().await;
    let report = outbox.outbox.migrate(&outbox.pool).await.unwrap();
    assert!(report.applied.is_empty(), "{report}");
    assert_eq!(report.current_version(), outbox::SCHEMA_VERSION);
    outbox.drop_schema().await;
}

#[tokio::test]
async fn inbox_applies_the_same_message_once_across_transactions() {
    let outbox = TestOutbox::new().await;
    let inbox = Inbox::new(outbox.schema.clone());
    let mut first = outbox.pool.begin().await.unwrap();
    assert!(inbox.try_record(&mut first, "svc", 7).await.unwrap());
    first.commit().await.unwrap();
    let mut second = outbox.pool.begin().await.unwrap();
    assert!(!inbox.try_record(&mut second, "svc", 7).await.unwrap());
    assert!(
        inbox.try_record(&mut second, "other-svc", 7).await.unwrap(),
        "sources are separate"
    );
    second.rollback().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_lets_one_of_two_racing_consumers_apply_a_message() {
    let outbox = TestOutbox::new().await;
    let inbox = Inbox::new(outbox.schema.clone());
    let mut first = outbox.pool.begin().await.unwrap();
    assert!(inbox.try_record(&mut first, "svc", 1).await.unwrap());

    // The second consumer blocks on the first one's uncommitted row...
    let (pool, racing_inbox) = (outbox.pool.clone(), inbox.clone());
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        let new = racing_inbox.try_record(&mut tx, "svc", 1).await.unwrap();
        tx.commit().await.unwrap();
        new
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the racing insert must wait for the first transaction"
    );
    // ...and sees the message as processed once the first commits.
    first.commit().await.unwrap();
    assert!(!second.await.unwrap());

    // Had the first rolled back, the second would apply it.
    let mut first = outbox.pool.begin().await.unwrap();
    assert!(inbox.try_record(&mut first, "svc", 2).await.unwrap());
    let (pool, racing_inbox) = (outbox.pool.clone(), inbox.clone());
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        racing_inbox.try_record(&mut tx, "svc", 2).await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.rollback().await.unwrap();
    assert!(second.await.unwrap());
    outbox.drop_schema().await;
}

/// The claim floor needs every inserting transaction to hold its transaction id before the
/// identity hands out its ids (see migration 0008). A row trigger sees the row with its id built
/// and checks that the transaction already has an id, for a transaction whose first write is the
/// message, through each way of enqueueing, whether or not a busy relay's mark spares the
/// trigger its wake-up (migrations 0018, 0019), a waiting relay is woken, or the transaction
/// woke it already; also for a writer whose `search_path` puts its own `pg_current_xact_id()`
/// before PostgreSQL's (migration 0020). (Without the statement trigger nextval assigns one only
/// when it logs, once in 32 calls.)
#[tokio::test]
async fn inserting_transactions_hold_a_transaction_id_before_their_message_ids() {
    let outbox = TestOutbox::new().await;
    let schema = &outbox.schema;
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION {schema}.check_xid() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF pg_current_xact_id_if_assigned() IS NULL THEN
                 RAISE EXCEPTION 'message % has its id before its transaction has one', NEW.id;
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER check_xid BEFORE INSERT ON {schema}.message
             FOR EACH ROW EXECUTE FUNCTION {schema}.check_xid();"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    for round in 0..4 {
        // A relay at work keeps its mark a lease term ahead; an idle one waits to be woken.
        outbox
            .set_busy_mark((round % 2 == 1).then_some(30_000))
            .await;
        outbox.relay_waits(round >= 2).await;
        let one = Message::new("t", format!("{round}").into_bytes());
        outbox.commit_each([one]).await;
        let many = (0..3).map(|i| Message::new("t", format!("{round}.{i}").into_bytes()));
        outbox.commit_all(many.collect()).await;
        sqlx::query(&format!("SELECT {schema}.enqueue('t', NULL, NULL)"))
            .execute(&outbox.pool)
            .await
            .unwrap();
        sqlx::query(&format!(
            "SELECT * FROM {schema}.enqueue_all(ARRAY['t', 't'], NULL, ARRAY['a', 'b']::bytea[])"
        ))
        .execute(&outbox.pool)
        .await
        .unwrap();
    }
    // Two statements in one transaction: the second finds the transaction notified.
    sqlx::raw_sql(&format!(
        "SELECT {schema}.enqueue('t', NULL, NULL); SELECT {schema}.enqueue('t', NULL, NULL)"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    // A writer that may create functions somewhere it puts before pg_catalog.
    let mimic = format!("{schema}_mimic");
    sqlx::raw_sql(&format!(
        "CREATE SCHEMA {mimic};
         CREATE FUNCTION {mimic}.pg_current_xact_id() RETURNS xid8
             LANGUAGE sql AS $$ SELECT '1'::xid8 $$;"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    for mark in [None, Some(30_000)] {
        outbox.set_busy_mark(mark).await;
        sqlx::raw_sql(&format!(
            "SET LOCAL search_path = {mimic}, pg_catalog; SELECT {schema}.enqueue('t', NULL, NULL)"
        ))
        .execute(&outbox.pool)
        .await
        .unwrap();
    }
    sqlx::raw_sql(&format!("DROP SCHEMA {mimic} CASCADE"))
        .execute(&outbox.pool)
        .await
        .unwrap();
    assert_eq!(outbox.pending().await, 4 * 7 + 2 + 2);
    outbox.drop_schema().await;
}

/// The caller's statement is placed inside the outbox's: a trailing `-- comment` must not
/// swallow what follows it.
#[tokio::test]
async fn execute_and_save_accepts_a_statement_ending_in_a_line_comment() {
    let outbox = TestOutbox::new().await;
    let schema = &outbox.schema;
    sqlx::raw_sql(&format!(
        "CREATE TABLE {schema}.orders (id bigint PRIMARY KEY, state text NOT NULL)"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let insert = format!(
        "INSERT INTO {schema}.orders (id, state) VALUES ($1, 'packed') RETURNING id -- new order"
    );
    let mut tx = outbox.pool.begin().await.unwrap();
    let saved = outbox
        .outbox
        .execute_and_save(
            &mut tx,
            sqlx::query(&insert).bind(1_i64),
            Message::new("orders", b"created".to_vec()).key("order-1"),
        )
        .await
        .unwrap();
    assert!(saved.is_some());
    // A terminator with a comment after it, and more than one statement.
    let ship = format!(
        "UPDATE {schema}.orders SET state = 'shipped' WHERE id = $1 RETURNING id; -- shipped"
    );
    let shipped = outbox
        .outbox
        .execute_and_save(
            &mut tx,
            sqlx::query(&ship).bind(1_i64),
            Message::new("orders", b"shipped".to_vec()).key("order-1"),
        )
        .await
        .unwrap();
    assert!(shipped.is_some());
    let two = format!("DELETE FROM {schema}.orders WHERE id = $1 RETURNING id; SELECT 1");
    let refused = outbox
        .outbox
        .execute_and_save(
            &mut tx,
            sqlx::query(&two).bind(1_i64),
            Message::new("orders", b"deleted".to_vec()).key("order-1"),
        )
        .await;
    assert!(
        matches!(refused, Err(Error::InvalidStatement(_))),
        "{refused:?}"
    );
    tx.commit().await.unwrap();
    assert_eq!(
        outbox.pending().await,
        2,
        "the refused statement ran nothing"
    );
    outbox.drop_schema().await;
}

/// An empty outbox has no oldest pending message: an age clamped to 1e9 s here reached
/// `outbox status` and the oldest-age gauge, which alerts watch.
#[tokio::test]
async fn an_empty_outbox_has_no_oldest_pending_age() {
    let outbox = TestOutbox::new().await;
    let admin = Admin::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let empty = admin.backlog(&mut conn).await.unwrap();
    assert_eq!((empty.pending, empty.oldest_age), (0, None));
    outbox
        .commit_each([Message::new("topic", b"one".to_vec())])
        .await;
    let one = admin.backlog(&mut conn).await.unwrap();
    assert_eq!(one.pending, 1);
    assert!(one
        .oldest_age
        .is_some_and(|age| age < Duration::from_secs(60)));
    drop(conn);
    outbox.drop_schema().await;
}

/// A header value that is valid UTF-8 but holds a NUL was stored as JSON text, which PostgreSQL
/// refuses: the insert failed and aborted the caller's transaction.
#[tokio::test]
async fn a_header_value_with_a_nul_character_is_saved_and_read_back() {
    let outbox = TestOutbox::new().await;
    let mut tx = outbox.pool.begin().await.unwrap();
    let message = Message::new("t", b"payload".to_vec()).header("h", b"a\0b".to_vec());
    outbox
        .outbox
        .save_for_publishing(&mut tx, message)
        .await
        .expect("saved");
    tx.commit().await.unwrap();
    let stored: Option<serde_json::Value> =
        sqlx::query_scalar(&format!("SELECT headers FROM {}.message", outbox.schema))
            .fetch_one(&outbox.pool)
            .await
            .unwrap();
    let headers = outbox::headers::decode_stored(stored).unwrap();
    assert_eq!(headers[0].value, b"a\0b");
    outbox.drop_schema().await;
}
