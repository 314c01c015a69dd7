//! The SQL write API (`enqueue`, `enqueue_all`), the topic check every writer meets, and the
//! insert trigger's work per statement, against the real PostgreSQL started by `dev/up`.

use std::time::Duration;

use outbox_test_support::TestOutbox;
use sqlx::postgres::PgListener;
use sqlx::{Acquire as _, Postgres, Transaction};

/// The database error's code and message of a failed statement.
fn database_error(error: sqlx::Error) -> (String, String) {
    let error = error.as_database_error().expect("a database error");
    (
        error.code().expect("an SQLSTATE").into_owned(),
        error.message().to_owned(),
    )
}

/// How many times this transaction has read the lease table so far: the insert trigger reads it
/// to learn whether a relay waits for a wake-up.
async fn lease_reads(outbox: &TestOutbox, tx: &mut Transaction<'_, Postgres>) -> i64 {
    sqlx::query_scalar(
        "SELECT seq_scan + coalesce(idx_scan, 0) FROM pg_stat_xact_user_tables
          WHERE relid = $1::text::regclass",
    )
    .bind(format!("{}.relay_lease", outbox.schema))
    .fetch_one(&mut **tx)
    .await
    .unwrap()
}

/// Whether the transactions committed since the last call sent the wake-up: notifications arrive
/// in commit order, so a marker sent now comes first unless one did.
async fn woken(outbox: &TestOutbox, listener: &mut PgListener) -> bool {
    sqlx::query("SELECT pg_notify($1, 'marker')")
        .bind(outbox.schema.channel())
        .execute(&outbox.pool)
        .await
        .unwrap();
    let mut woken = false;
    loop {
        let received = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("a notification")
            .unwrap();
        match received.payload() {
            "marker" => return woken,
            _ => woken = true,
        }
    }
}

async fn enqueue(outbox: &TestOutbox, tx: &mut Transaction<'_, Postgres>, payload: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT {}.enqueue('t', 'k', $1)", outbox.schema))
        .bind(payload.as_bytes())
        .fetch_one(&mut **tx)
        .await
        .unwrap()
}

#[tokio::test]
async fn enqueue_all_keeps_the_input_order_and_stores_what_enqueue_stores() {
    let outbox = TestOutbox::new().await;
    let n = 300;
    let topics: Vec<String> = (0..n).map(|i| format!("topic-{}", i % 3)).collect();
    // Keys and headers are sometimes absent, payloads sometimes tombstones.
    let keys: Vec<Option<String>> = (0..n)
        .map(|i| (i % 4 != 0).then(|| format!("key-{}", i % 7)))
        .collect();
    let payloads: Vec<Option<Vec<u8>>> = (0..n)
        .map(|i| (i % 5 != 0).then(|| format!("payload {i}").into_bytes()))
        .collect();
    let headers: Vec<Option<serde_json::Value>> = (0..n)
        .map(|i| (i % 2 == 0).then(|| serde_json::json!({"x-value-type": format!("T{i}")})))
        .collect();
    let mut tx = outbox.pool.begin().await.unwrap();
    let sequences: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT * FROM {}.enqueue_all($1, $2, $3, $4)",
        outbox.schema
    ))
    .bind(&topics)
    .bind(&keys)
    .bind(&payloads)
    .bind(&headers)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    // enqueue() of the same message, for comparison.
    let single: i64 =
        sqlx::query_scalar(&format!("SELECT {}.enqueue($1, $2, $3, $4)", outbox.schema))
            .bind(&topics[2])
            .bind(&keys[2])
            .bind(&payloads[2])
            .bind(&headers[2])
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    tx.commit().await.unwrap();

    assert_eq!(sequences.len(), n);
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    type Stored = (
        String,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Option<serde_json::Value>,
    );
    let stored: Vec<Stored> = sqlx::query_as(&format!(
        "SELECT topic, key, payload, headers FROM {}.message ORDER BY id",
        outbox.schema
    ))
    .fetch_all(&outbox.pool)
    .await
    .unwrap();
    for (i, row) in stored[..n].iter().enumerate() {
        assert_eq!(row.0, topics[i], "message {i}");
        assert_eq!(
            row.1,
            keys[i].clone().map(String::into_bytes),
            "message {i}"
        );
        assert_eq!(row.2, payloads[i], "message {i}");
        let expected = headers[i]
            .as_ref()
            .map(|h| serde_json::json!([{"name": "x-value-type", "text": h["x-value-type"]}]));
        assert_eq!(row.3, expected, "message {i}");
    }
    assert_eq!(stored[n], stored[2], "enqueue() stores message 2 alike");
    assert!(single > sequences[n - 1]);
    outbox.drop_schema().await;
}

#[tokio::test]
async fn enqueue_all_rejects_an_invalid_message_by_its_position_and_writes_nothing() {
    let outbox = TestOutbox::new().await;
    let call = |headers: Option<Vec<Option<&'static str>>>, keys: Option<Vec<&'static str>>| {
        let schema = outbox.schema.clone();
        let pool = outbox.pool.clone();
        async move {
            sqlx::query(&format!(
                "SELECT * FROM {schema}.enqueue_all(ARRAY['t', 't', 't'], $1, ARRAY['a', 'b', 'c']::bytea[], $2::jsonb[])"
            ))
            .bind(keys)
            .bind(headers)
            .execute(&pool)
            .await
            .unwrap_err()
        }
    };
    for (headers, expected) in [
        (
            [None, Some(r#"{"x-sequence": "1"}"#), None],
            r#"outbox.enqueue_all: message 2: header "x-sequence" is reserved: the relay sets it"#,
        ),
        (
            [None, None, Some(r#"{"a": "b", "n": 1}"#)],
            r#"outbox.enqueue_all: message 3: header "n" must be a JSON string, not number"#,
        ),
        (
            [Some(r#"["a"]"#), None, None],
            "outbox.enqueue_all: message 1: headers must be a JSON object of text values, not array",
        ),
        (
            [Some(r#"{"": "v"}"#), None, None],
            "outbox.enqueue_all: message 1: a header name is empty",
        ),
    ] {
        let error = call(Some(headers.to_vec()), None).await;
        assert_eq!(
            database_error(error),
            ("22023".to_owned(), expected.to_owned())
        );
    }
    let (code, message) = database_error(call(None, Some(vec!["k1", "k2"])).await);
    assert_eq!(
        (code.as_str(), message.as_str()),
        (
            "2202E",
            "outbox.enqueue_all: the arrays differ in length (topics 3, keys 2, payloads 3, headers <NULL>)"
        )
    );
    let (code, _) = database_error(
        sqlx::query(&format!(
            "SELECT * FROM {}.enqueue_all(NULL, NULL, ARRAY['a']::bytea[])",
            outbox.schema
        ))
        .execute(&outbox.pool)
        .await
        .unwrap_err(),
    );
    assert_eq!(code, "22004");
    // The topic is the table's check: the statement fails as a whole.
    let (code, message) = database_error(
        sqlx::query(&format!(
            "SELECT * FROM {}.enqueue_all(ARRAY['t', 'no/slash'], NULL, ARRAY['a', 'b']::bytea[])",
            outbox.schema
        ))
        .execute(&outbox.pool)
        .await
        .unwrap_err(),
    );
    assert_eq!(code, "23514");
    assert!(message.contains("message_topic_is_legal"), "{message}");
    assert_eq!(outbox.pending().await, 0);
    outbox.drop_schema().await;
}

/// enqueue() refuses headers the relay could not publish (not a JSON object of strings, an empty
/// name) or that would spoof its own (x-sequence, x-source), with the messages of migration 0011,
/// now that enqueue_all() shares the rules.
#[tokio::test]
async fn enqueue_rejects_the_headers_it_rejected_with_the_same_messages() {
    let outbox = TestOutbox::new().await;
    for (headers, expected) in [
        (
            r#"{"x-trace": null}"#,
            r#"outbox.enqueue: header "x-trace" must be a JSON string, not null"#,
        ),
        (
            r#"{"n": 1}"#,
            r#"outbox.enqueue: header "n" must be a JSON string, not number"#,
        ),
        (
            r#"{"x-sequence": "1"}"#,
            r#"outbox.enqueue: header "x-sequence" is reserved: the relay sets it"#,
        ),
        (
            r#"{"x-source": "billing"}"#,
            r#"outbox.enqueue: header "x-source" is reserved: the relay sets it"#,
        ),
        (r#"{"": "v"}"#, "outbox.enqueue: a header name is empty"),
        (
            r#"["a"]"#,
            "outbox.enqueue: headers must be a JSON object of text values, not array",
        ),
        (
            "null",
            "outbox.enqueue: headers must be a JSON object of text values, not null",
        ),
    ] {
        let error = sqlx::query(&format!(
            "SELECT {}.enqueue('t', 'k', NULL, $1::jsonb)",
            outbox.schema
        ))
        .bind(headers)
        .execute(&outbox.pool)
        .await
        .unwrap_err();
        assert_eq!(
            database_error(error),
            ("22023".to_owned(), expected.to_owned()),
            "{headers}"
        );
    }
    // An empty object is no headers at all, as before.
    let id: i64 = sqlx::query_scalar(&format!(
        "SELECT {}.enqueue('t', 'k', NULL, '{{}}')",
        outbox.schema
    ))
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    let stored: Option<serde_json::Value> = sqlx::query_scalar(&format!(
        "SELECT headers FROM {}.message WHERE id = $1",
        outbox.schema
    ))
    .bind(id)
    .fetch_one(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(stored, None);
    assert_eq!(outbox.pending().await, 1);
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_enqueue_all_publishes_nothing() {
    let outbox = TestOutbox::new().await;
    let mut listener = PgListener::connect_with(&outbox.pool).await.unwrap();
    listener.listen(&outbox.schema.channel()).await.unwrap();
    outbox.relay_waits(true).await;
    let mut tx = outbox.pool.begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT * FROM {}.enqueue_all(ARRAY['t', 't'], NULL, ARRAY['a', 'b']::bytea[])",
        outbox.schema
    ))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(outbox.pending().await, 0);
    assert!(!woken(&outbox, &mut listener).await, "no wake-up");
    drop(listener);
    outbox.drop_schema().await;
}

/// One enqueue_all() is one insert statement: the trigger reads the lease table once for all its
/// messages, and not at all for none.
#[tokio::test]
async fn enqueue_all_runs_the_insert_trigger_once() {
    let outbox = TestOutbox::new().await;
    let mut tx = outbox.pool.begin().await.unwrap();
    let before = lease_reads(&outbox, &mut tx).await;
    let none: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT * FROM {}.enqueue_all('{{}}', '{{}}', '{{}}')",
        outbox.schema
    ))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert!(none.is_empty());
    assert_eq!(lease_reads(&outbox, &mut tx).await, before);
    let sequences: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT * FROM {}.enqueue_all(array_fill('t'::text, ARRAY[100]), NULL, array_fill('p'::bytea, ARRAY[100]))",
        outbox.schema
    ))
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    assert_eq!(sequences.len(), 100);
    assert_eq!(lease_reads(&outbox, &mut tx).await, before + 1);
    tx.commit().await.unwrap();
    outbox.drop_schema().await;
}

/// Once a transaction has queued its wake-up, its later inserts skip the trigger's work; until
/// then (no relay waits) every insert looks for a waiting relay again, so one that starts to wait
/// while the transaction runs is still woken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_insert_trigger_looks_for_a_waiting_relay_until_the_transaction_has_woken_it() {
    let outbox = TestOutbox::new().await;
    let mut listener = PgListener::connect_with(&outbox.pool).await.unwrap();
    listener.listen(&outbox.schema.channel()).await.unwrap();
    outbox.relay_waits(false).await;

    // A busy relay: every insert looks again, and nothing wakes it.
    let mut tx = outbox.pool.begin().await.unwrap();
    let before = lease_reads(&outbox, &mut tx).await;
    for i in 0..5 {
        enqueue(&outbox, &mut tx, &format!("busy {i}")).await;
    }
    assert_eq!(lease_reads(&outbox, &mut tx).await, before + 5);
    // The relay starts to wait meanwhile: the next insert wakes it.
    outbox.relay_waits(true).await;
    enqueue(&outbox, &mut tx, "now idle").await;
    assert_eq!(lease_reads(&outbox, &mut tx).await, before + 6);
    tx.commit().await.unwrap();
    assert!(woken(&outbox, &mut listener).await, "woken once it waits");

    // A waiting relay: the first insert wakes it, the others have nothing left to do.
    let mut tx = outbox.pool.begin().await.unwrap();
    let before = lease_reads(&outbox, &mut tx).await;
    for i in 0..5 {
        enqueue(&outbox, &mut tx, &format!("idle {i}")).await;
    }
    assert_eq!(lease_reads(&outbox, &mut tx).await, before + 1);
    tx.commit().await.unwrap();
    assert!(woken(&outbox, &mut listener).await, "woken");
    drop(listener);
    outbox.drop_schema().await;
}

/// A wake-up queued by a statement whose savepoint is rolled back is discarded with it; the
/// transaction's later inserts queue it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_rolled_back_with_a_savepoint_is_queued_again() {
    let outbox = TestOutbox::new().await;
    let mut listener = PgListener::connect_with(&outbox.pool).await.unwrap();
    listener.listen(&outbox.schema.channel()).await.unwrap();
    outbox.relay_waits(true).await;

    let mut tx = outbox.pool.begin().await.unwrap();
    let mut savepoint = tx.begin().await.unwrap();
    enqueue(&outbox, &mut savepoint, "rolled back").await;
    savepoint.rollback().await.unwrap();
    enqueue(&outbox, &mut tx, "kept").await;
    tx.commit().await.unwrap();
    assert!(woken(&outbox, &mut listener).await, "woken");
    assert_eq!(outbox.pending().await, 1);
    drop(listener);
    outbox.drop_schema().await;
}

/// The topic check (without a counted repetition since migration 0016) lets through exactly Kafka's topic names, for
/// writers that bypass the library: ASCII letters, digits, '.', '_' and '-', 1 to 249 of them,
/// not "." or "..".
#[tokio::test]
async fn the_message_table_accepts_exactly_kafkas_topic_names() {
    let outbox = TestOutbox::new().await;
    let legal = [
        "a".to_owned(),
        "-".to_owned(),
        "_".to_owned(),
        "...".to_owned(),
        ".a".to_owned(),
        "..a".to_owned(),
        "a.".to_owned(),
        "a..".to_owned(),
        ".-".to_owned(),
        "Orders.v2_EU-west".to_owned(),
        "a".repeat(249),
        ".".repeat(249),
    ];
    let illegal = [
        String::new(),
        ".".to_owned(),
        "..".to_owned(),
        "a/b".to_owned(),
        "a b".to_owned(),
        "é".to_owned(),
        "a\n".to_owned(),
        "\u{212A}".to_owned(),
        "a".repeat(250),
        ".".repeat(250),
    ];
    let sql = format!(
        "INSERT INTO {}.message (topic, payload) VALUES ($1, 'x')",
        outbox.schema
    );
    let insert = |topic: &String| sqlx::query(&sql).bind(topic.clone()).execute(&outbox.pool);
    for topic in &legal {
        insert(topic)
            .await
            .unwrap_or_else(|e| panic!("{topic:?}: {e}"));
    }
    for topic in &illegal {
        let (code, message) = database_error(insert(topic).await.unwrap_err());
        assert_eq!(code, "23514", "{topic:?}: {message}");
        assert!(message.contains("message_topic_is_legal"), "{message}");
    }
    assert_eq!(outbox.pending().await, legal.len() as i64);
    outbox.drop_schema().await;
}

/// While the busy mark is ahead of the clock, inserts skip the trigger's function: no read of the
/// lease table, no wake-up (the relay that keeps the mark resets it before it waits). Once the
/// mark has passed (its relay died) or is reset, inserts look for a waiting relay again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_skip_the_trigger_function_while_the_busy_mark_is_ahead() {
    let outbox = TestOutbox::new().await;
    let mut listener = PgListener::connect_with(&outbox.pool).await.unwrap();
    listener.listen(&outbox.schema.channel()).await.unwrap();
    outbox.relay_waits(true).await;

    outbox.set_busy_mark(Some(3_600_000)).await;
    let mut tx = outbox.pool.begin().await.unwrap();
    let before = lease_reads(&outbox, &mut tx).await;
    for i in 0..3 {
        enqueue(&outbox, &mut tx, &format!("busy {i}")).await;
    }
    assert_eq!(
        lease_reads(&outbox, &mut tx).await,
        before,
        "the function ran"
    );
    tx.commit().await.unwrap();
    assert!(
        !woken(&outbox, &mut listener).await,
        "no wake-up while busy"
    );

    for (mark, case) in [(Some(-1_000), "passed"), (None, "reset")] {
        outbox.set_busy_mark(mark).await;
        let mut tx = outbox.pool.begin().await.unwrap();
        let before = lease_reads(&outbox, &mut tx).await;
        enqueue(&outbox, &mut tx, case).await;
        assert_eq!(lease_reads(&outbox, &mut tx).await, before + 1, "{case}");
        tx.commit().await.unwrap();
        assert!(
            woken(&outbox, &mut listener).await,
            "woken once the mark is {case}"
        );
    }
    assert_eq!(outbox.pending().await, 5);
    drop(listener);
    outbox.drop_schema().await;
}
