//! The write side and the inbox against the real PostgreSQL started by `dev/up`.

use std::time::Duration;

use outbox::postgres::{
    Claimed, Fence, Fenced, FloorTracker, LeaseState, RepublishFilter, Statements,
};
use outbox::{Error, Inbox, InvalidMessage, Message};
use outbox_test_support::{wait_until, TestOutbox};

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
    assert_eq!(outbox.message_rows().await, 1);
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
    assert_eq!(outbox.message_rows().await, 1);

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
    assert_eq!(
        (orders("packed").await, outbox.message_rows().await),
        (1, 1)
    );
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
    assert_eq!(report.current_version(), 13);
    outbox.drop_schema().await;
}

#[tokio::test]
async fn fenced_statements_do_nothing_for_a_deposed_holder() {
    let outbox = TestOutbox::new().await;
    let ids = outbox.commit_each([Message::new("t", b"x".to_vec())]).await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let ttl = Duration::from_secs(30);
    let LeaseState::Held { token, .. } = sql
        .lease_acquire(&mut conn, "relay", "old", ttl)
        .await
        .unwrap()
    else {
        panic!("free lease not acquired")
    };
    let old = Fence {
        lease: "relay".into(),
        holder: "old".into(),
        token,
    };
    assert!(matches!(
        sql.lease_acquire(&mut conn, "relay", "new", ttl)
            .await
            .unwrap(),
        LeaseState::HeldByOther { .. }
    ));
    // The old holder's term expires (as after a long pause) and a new holder takes over.
    sqlx::query(&format!(
        "UPDATE {}.relay_lease SET expires_at = now()",
        outbox.schema
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let LeaseState::Held {
        token: new_token, ..
    } = sql
        .lease_acquire(&mut conn, "relay", "new", ttl)
        .await
        .unwrap()
    else {
        panic!("expired lease not taken over")
    };
    assert_eq!(new_token, token + 1);

    assert_eq!(
        sql.complete(&mut conn, &ids, false, &old).await.unwrap(),
        Fenced::LeaseLost
    );
    assert!(sql
        .claim(
            &mut conn,
            10,
            1 << 20,
            &Default::default(),
            Default::default(),
            &old
        )
        .await
        .unwrap()
        .messages
        .is_empty());
    assert_eq!(
        sql.lease_renew(&mut conn, &old, ttl).await.unwrap(),
        Fenced::LeaseLost
    );
    assert_eq!(
        outbox.pending().await,
        1,
        "the deposed holder changed nothing"
    );

    let new = Fence {
        lease: "relay".into(),
        holder: "new".into(),
        token: new_token,
    };
    assert_eq!(
        sql.claim(
            &mut conn,
            10,
            1 << 20,
            &Default::default(),
            Default::default(),
            &new
        )
        .await
        .unwrap()
        .messages
        .len(),
        1
    );
    assert_eq!(
        sql.complete(&mut conn, &ids, false, &new)
            .await
            .unwrap()
            .map(|done| done.count),
        Fenced::Done(1)
    );
    drop(conn);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_notify_only_while_a_relay_waits_for_it() {
    let outbox = TestOutbox::new().await;
    let channel = outbox.schema.channel();
    let mut listener = sqlx::postgres::PgListener::connect_with(&outbox.pool)
        .await
        .unwrap();
    listener.listen(&channel).await.unwrap();
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    // Notifications arrive in commit order: commit a message, then send a marker; the first
    // thing received tells whether the writer notified.
    let next_notification = async |listener: &mut sqlx::postgres::PgListener, body: &[u8]| {
        outbox.commit_each([Message::new("t", body.to_vec())]).await;
        sqlx::query("SELECT pg_notify($1, 'marker')")
            .bind(&channel)
            .execute(&outbox.pool)
            .await
            .unwrap();
        let received = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
        let payload = received
            .expect("a notification")
            .unwrap()
            .payload()
            .to_owned();
        if payload == "message" {
            // Consume the marker too, so the next round starts clean.
            let marker = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
            assert_eq!(marker.expect("the marker").unwrap().payload(), "marker");
        }
        payload
    };

    // No relay at all: nobody would listen, so nobody pays for NOTIFY.
    assert_eq!(
        next_notification(&mut listener, b"1").await,
        "marker",
        "no relay: no NOTIFY"
    );

    // A relay holds the lease and is busy: no NOTIFY (and no commit-time lock).
    let fence = outbox.take_lease(&mut conn).await;
    assert_eq!(
        next_notification(&mut listener, b"2").await,
        "marker",
        "busy relay: no NOTIFY"
    );

    // The relay goes idle and waits: writers wake it.
    sql.lease_set_idle(&mut conn, &fence, true).await.unwrap();
    assert_eq!(
        next_notification(&mut listener, b"3").await,
        "message",
        "idle relay: NOTIFY"
    );

    // It releases the lease (idle, but expired): no NOTIFY again.
    sql.lease_release(&mut conn, &fence).await.unwrap();
    let released = tokio::time::timeout(Duration::from_secs(5), listener.recv()).await;
    assert_eq!(
        released.expect("released").unwrap().payload(),
        "lease-released"
    );
    assert_eq!(
        next_notification(&mut listener, b"4").await,
        "marker",
        "released lease: no NOTIFY"
    );
    drop(conn);
    drop(listener);
    outbox.drop_schema().await;
}

#[tokio::test]
async fn claim_stops_at_the_byte_budget_and_never_below_one_message() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    // Keys of 1 byte and payloads of 99: 100 bytes per message.
    let ids = outbox
        .commit_each((0..5).map(|i| Message::new("t", vec![b'x'; 99]).key(format!("{i}"))))
        .await;
    let fence = outbox.take_lease(&mut conn).await;
    let claimed = |limit: i64, max_bytes: i64, skip: Vec<i64>| {
        let (sql, fence, pool) = (&sql, &fence, &outbox.pool);
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let claimed = sql
                .claim(
                    &mut conn,
                    limit,
                    max_bytes,
                    &outbox::postgres::Skip {
                        ids: &skip,
                        ..Default::default()
                    },
                    Default::default(),
                    fence,
                )
                .await
                .unwrap();
            claimed.messages.iter().map(|m| m.id).collect::<Vec<_>>()
        }
    };
    // A message is taken while the bytes before it are under the budget.
    assert_eq!(claimed(10, 250, vec![]).await, ids[..3]);
    assert_eq!(claimed(10, 300, vec![]).await, ids[..3]);
    assert_eq!(claimed(10, 301, vec![]).await, ids[..4]);
    // The message count still applies.
    assert_eq!(claimed(2, 1 << 20, vec![]).await, ids[..2]);
    // A message larger than the budget goes alone.
    assert_eq!(claimed(10, 1, vec![]).await, ids[..1]);
    // Skipped ids (a completion in flight) count against neither budget.
    let skip = vec![ids[0], ids[2]];
    assert_eq!(claimed(2, 1 << 20, skip.clone()).await, [ids[1], ids[3]]);
    assert_eq!(claimed(10, 150, skip.clone()).await, [ids[1], ids[3]]);
    assert_eq!(claimed(10, 1 << 20, ids.clone()).await, Vec::<i64>::new());
    drop(conn);
    outbox.drop_schema().await;
}

/// Headers weigh in the byte budget like keys and payloads: header-heavy messages were once
/// claimed thousands at a time whatever their size.
#[tokio::test]
async fn header_bytes_count_against_the_byte_budget() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let ids = outbox
        .commit_each((0..5).map(|_| Message::new("t", vec![]).header("h", vec![b'v'; 10_000])))
        .await;
    let fence = outbox.take_lease(&mut conn).await;
    let claimed = sql
        .claim(
            &mut conn,
            100,
            25_000,
            &Default::default(),
            Default::default(),
            &fence,
        )
        .await
        .unwrap();
    let claimed: Vec<i64> = claimed.messages.iter().map(|m| m.id).collect();
    assert_eq!(claimed, ids[..3]);
    drop(conn);
    outbox.drop_schema().await;
}

/// With many keys held (messages for a topic that is missing or not authorised), the held-key
/// test must stay a lookup in the held messages' index: once it compared every candidate with
/// every held message, and a claim of 5,000 behind 8,000 held keys took 3.5 s instead of 10 ms.
#[tokio::test]
async fn the_held_key_test_is_an_index_lookup_whatever_is_held() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "INSERT INTO {0}.message (topic, key, payload, retry_at, attempts)
         SELECT 'held', convert_to('k' || i, 'UTF8'), 'x', now() + interval '1 hour', 1
           FROM generate_series(1, 2000) i;
         INSERT INTO {0}.message (topic, key, payload)
         SELECT 'healthy', convert_to('k' || i, 'UTF8'), 'x' FROM generate_series(1, 2000) i;
         ANALYZE {0}.message",
        outbox.schema
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let fence = outbox.take_lease(&mut conn).await;
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", sql.claim_sql()))
        .bind(5000_i64)
        .bind(1_i64 << 30)
        .bind("{}")
        .bind(&fence.lease)
        .bind(&fence.holder)
        .bind(fence.token)
        .bind(None::<String>)
        .bind(None::<i64>)
        .bind(Vec::<String>::new())
        .bind(Vec::<Vec<u8>>::new())
        .bind(Vec::<String>::new())
        .bind(Vec::<String>::new())
        .bind(None::<i64>)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using message_held") && !plan.contains("CTE Scan on held"),
        "{plan}"
    );
    let claimed = sql
        .claim(
            &mut conn,
            5000,
            1 << 30,
            &Default::default(),
            Default::default(),
            &fence,
        )
        .await
        .unwrap();
    assert_eq!(claimed.messages.len(), 2000);
    assert!(claimed.messages.iter().all(|m| m.topic == "healthy"));
    drop(conn);
    outbox.drop_schema().await;
}

#[tokio::test]
async fn completion_replaces_a_copy_already_in_published() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let ids = outbox
        .commit_each([
            Message::new("t", b"one".to_vec()),
            Message::new("t", b"two".to_vec()),
        ])
        .await;
    // A hand-made copy of the first message in the history, as a restore script might leave.
    sqlx::query(&format!(
        "INSERT INTO {0}.published (id, topic, payload, created_at, processed_at, attempts)
         SELECT id, topic, payload, created_at, now() - interval '1 day', 7
           FROM {0}.message WHERE id = $1",
        outbox.schema
    ))
    .bind(ids[0])
    .execute(&mut *conn)
    .await
    .unwrap();
    let fence = outbox.take_lease(&mut conn).await;
    assert_eq!(
        sql.complete(&mut conn, &ids, false, &fence)
            .await
            .unwrap()
            .map(|done| done.count),
        Fenced::Done(2),
        "the conflict falls back to replacing the copy instead of failing forever"
    );
    assert_eq!(outbox.pending().await, 0);
    let (attempts, recent): (i32, bool) = sqlx::query_as(&format!(
        "SELECT attempts, processed_at > now() - interval '1 minute' FROM {}.published WHERE id = $1",
        outbox.schema
    ))
    .bind(ids[0])
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!((attempts, recent), (0, true));
    drop(conn);
    outbox.drop_schema().await;
}

/// The claim floor needs every inserting transaction to hold its transaction id before the
/// identity hands out its ids (see migration 0008). A row trigger sees the row with its id built
/// and checks that the transaction already has an id, for a transaction whose first write is the
/// message, through each way of enqueueing. (Without the statement trigger nextval assigns one
/// only when it logs, once in 32 calls.)
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
    assert_eq!(outbox.message_rows().await, 4 * 7);
    outbox.drop_schema().await;
}

/// The claim floor never passes a message whose transaction is still open (its id is lower
/// than messages already claimed and completed), even when two such transactions are the newest
/// in the database and one commits first; it rises to them once both have committed, and a
/// republished message lowers it again.
#[tokio::test]
async fn claim_floor_waits_for_open_transactions_and_republish_lowers_it() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let fence = outbox.take_lease(&mut conn).await;
    let message = |n: &str| Message::new("t", n.as_bytes().to_vec()).key(n);
    let mut tracker = FloorTracker::default();
    let claim = async |tracker: &mut FloorTracker| -> Claimed {
        let candidate = tracker.candidate();
        let mut conn = outbox.pool.acquire().await.unwrap();
        let claimed = sql
            .claim(
                &mut conn,
                100,
                1 << 20,
                &Default::default(),
                candidate.into(),
                &fence,
            )
            .await
            .unwrap();
        tracker.observe(claimed.horizon.as_ref().expect("rows"), candidate);
        claimed
    };
    let ids_of = |claimed: &Claimed| claimed.messages.iter().map(|m| m.id).collect::<Vec<_>>();
    let floor_of = |claimed: &Claimed| claimed.horizon.unwrap().floor;

    let early = outbox.commit_each([message("a"), message("b")]).await;
    // Two open transactions whose first write is the message: the newest transactions.
    let mut open = Vec::new();
    let mut late = Vec::new();
    for name in ["late-1", "late-2"] {
        let mut tx = outbox.pool.begin().await.unwrap();
        late.push(
            outbox
                .outbox
                .save_for_publishing(&mut tx, message(name))
                .await
                .unwrap(),
        );
        open.push(tx);
    }
    let first = claim(&mut tracker).await;
    assert_eq!(ids_of(&first), early);
    let Fenced::Done(done) = sql
        .complete(&mut conn, &early, false, &fence)
        .await
        .unwrap()
    else {
        panic!("lease lost")
    };
    tracker.completed(first.horizon.unwrap().last_id, done.xid);
    assert!(tracker.candidate().is_some());
    let tail = outbox.commit_each([message("d")]).await;

    // The candidate covers both late ids; while either transaction is open it is not settled.
    let claimed = claim(&mut tracker).await;
    assert_eq!((ids_of(&claimed), floor_of(&claimed)), (tail.clone(), 0));
    let second = open.pop().unwrap();
    open.pop().unwrap().commit().await.unwrap();
    for _ in 0..3 {
        let claimed = claim(&mut tracker).await;
        assert_eq!(ids_of(&claimed), [late[0], tail[0]]);
        assert!(floor_of(&claimed) <= late[0], "{claimed:?}");
    }
    second.commit().await.unwrap();
    // Once both committed (and older transactions of other tests ended), it rises to them.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let claimed = claim(&mut tracker).await;
        assert_eq!(ids_of(&claimed), [late[0], late[1], tail[0]]);
        if tracker.candidate().is_none() {
            assert_eq!(floor_of(&claimed), late[0]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the floor never rose: {claimed:?}"
        );
    }

    // A republished message goes back below the floor, which follows it down.
    let (republished, _) = sql
        .republish_batch(
            &mut conn,
            &RepublishFilter {
                from_id: Some(early[0]),
                to_id: Some(early[0]),
                ..RepublishFilter::default()
            },
            0,
            10,
        )
        .await
        .unwrap();
    assert_eq!(republished, 1);
    let claimed = claim(&mut tracker).await;
    assert_eq!(ids_of(&claimed), [early[0], late[0], late[1], tail[0]]);
    assert_eq!(floor_of(&claimed), early[0]);
    drop(conn);
    outbox.drop_schema().await;
}

/// A dead letter retried while a claim is raising the floor past its id (the claim's snapshot
/// cannot see it yet) cancels the rise, even though the floor's value did not change.
#[tokio::test]
async fn retry_concurrent_with_a_floor_rise_cancels_the_rise() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let fence = outbox.take_lease(&mut conn).await;
    let ids = outbox
        .commit_each(["a", "b", "c"].map(|n| Message::new("t", n.as_bytes().to_vec())))
        .await;
    let first = sql
        .claim(
            &mut conn,
            100,
            1 << 20,
            &Default::default(),
            Default::default(),
            &fence,
        )
        .await
        .unwrap();
    let Fenced::Done(done) = sql.complete(&mut conn, &ids, false, &fence).await.unwrap() else {
        panic!("lease lost")
    };
    let mut tracker = FloorTracker::default();
    tracker.completed(first.horizon.unwrap().last_id, done.xid);
    let candidate = tracker.candidate().expect("candidate");
    // "b" becomes a dead letter (by hand), then is retried in a transaction left open.
    outbox.dead_letter_by_hand(ids[1]).await;
    // Other tests' transactions may be older than the completion: wait until none is.
    wait_until(
        Duration::from_secs(20),
        "the candidate is settled",
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) > $1::text::xid8",
            )
            .bind(candidate.xid.to_string())
            .fetch_one(&outbox.pool)
            .await
            .unwrap()
        },
    )
    .await;
    let mut retry = outbox.pool.begin().await.unwrap();
    assert_eq!(
        sql.requeue_dead_letters(&mut retry, Some(ids[1]))
            .await
            .unwrap(),
        [ids[1]]
    );
    // A claim that would raise the floor past "b" waits for the retry's lock on the lease row.
    let rising = tokio::spawn({
        let (sql, pool, fence) = (sql.clone(), outbox.pool.clone(), fence.clone());
        async move {
            let mut conn = pool.acquire().await.unwrap();
            sql.claim(
                &mut conn,
                100,
                1 << 20,
                &Default::default(),
                Some(candidate).into(),
                &fence,
            )
            .await
            .unwrap()
        }
    });
    wait_until(
        Duration::from_secs(20),
        "the claim waits for the lock",
        || async {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND query LIKE 'WITH lease AS%'",
            )
            .fetch_one(&outbox.pool)
            .await
            .unwrap();
            waiting > 0
        },
    )
    .await;
    retry.commit().await.unwrap();
    rising.await.unwrap();
    let claimed = sql
        .claim(
            &mut conn,
            100,
            1 << 20,
            &Default::default(),
            Default::default(),
            &fence,
        )
        .await
        .unwrap();
    assert_eq!(
        claimed.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        [ids[1]],
        "the retried message is above the floor: {claimed:?}"
    );
    drop(conn);
    outbox.drop_schema().await;
}

/// Takes the lease "relay" as holder "me" for 30 s; returns its fence.
/// Held messages do not hold the claim floor back: it rises past them, so a claim does not walk
/// over thousands of held messages, and the claim still finds them below it once they are due,
/// in order with the later messages of their key.
#[tokio::test]
async fn the_floor_rises_past_held_messages_and_due_ones_are_still_claimed() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let fence = outbox.take_lease(&mut conn).await;
    let held = outbox.commit_each([Message::new("t", "h1").key("h")]).await[0];
    let hold = |until: &'static str| {
        format!(
            "UPDATE {}.message SET attempts = 1, last_error = 'e', retry_at = {until} WHERE id = {held}",
            outbox.schema
        )
    };
    sqlx::query(&hold("now() + interval '1 hour'"))
        .execute(&mut *conn)
        .await
        .unwrap();
    let other = outbox.commit_each([Message::new("t", "o").key("o")]).await;
    let mut tracker = FloorTracker::default();
    let claimed = sql
        .claim(
            &mut conn,
            100,
            1 << 20,
            &Default::default(),
            Default::default(),
            &fence,
        )
        .await
        .unwrap();
    assert_eq!(
        claimed.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        other
    );
    let Fenced::Done(done) = sql
        .complete(&mut conn, &other, false, &fence)
        .await
        .unwrap()
    else {
        panic!("lease lost")
    };
    tracker.completed(claimed.horizon.unwrap().last_id, done.xid);
    let later = outbox.commit_each([Message::new("t", "h2").key("h")]).await[0];

    // Once the transactions before the completion have ended, the floor passes the held one.
    let floor_sql = format!("SELECT floor FROM {}.relay_lease", outbox.schema);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let candidate = tracker.candidate();
        let claimed = sql
            .claim(
                &mut conn,
                100,
                1 << 20,
                &Default::default(),
                candidate.into(),
                &fence,
            )
            .await
            .unwrap();
        assert!(claimed.messages.is_empty(), "the key is held: {claimed:?}");
        let floor: i64 = sqlx::query_scalar(&floor_sql)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        if floor > held {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the floor stays at {floor}, at or below the held message {held}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Due now: found below the floor, before the later message of its key.
    sqlx::query(&hold("now()"))
        .execute(&mut *conn)
        .await
        .unwrap();
    let claimed = sql
        .claim(
            &mut conn,
            100,
            1 << 20,
            &Default::default(),
            Default::default(),
            &fence,
        )
        .await
        .unwrap();
    assert_eq!(
        claimed.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        [held, later]
    );
    drop(conn);
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
    tx.commit().await.unwrap();
    assert!(saved.is_some());
    assert_eq!(outbox.message_rows().await, 1);
    outbox.drop_schema().await;
}

/// An empty outbox has no oldest pending message: an age clamped to 1e9 s here reached
/// `outbox status` and the oldest-age gauge, which alerts watch.
#[tokio::test]
async fn an_empty_outbox_has_no_oldest_pending_age() {
    let outbox = TestOutbox::new().await;
    let statements = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let empty = statements.backlog(&mut conn).await.unwrap();
    assert_eq!((empty.pending, empty.oldest_age), (0, None));
    outbox
        .commit_each([Message::new("topic", b"one".to_vec())])
        .await;
    let one = statements.backlog(&mut conn).await.unwrap();
    assert_eq!(one.pending, 1);
    assert!(one
        .oldest_age
        .is_some_and(|age| age < Duration::from_secs(60)));
    drop(conn);
    outbox.drop_schema().await;
}
