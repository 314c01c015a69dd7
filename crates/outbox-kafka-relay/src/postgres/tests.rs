//! The relay's statements against the real PostgreSQL started by `dev/up`: fencing, the claim's
//! budgets and floor, completions.

use outbox::admin::{Admin, RepublishFilter};
use outbox::Message;
use outbox_test_support::{wait_until, TestOutbox};

use super::*;

/// Takes the lease "relay" as holder "me" on `conn`, as a relay would; returns its fence.
async fn take_lease(outbox: &TestOutbox, conn: &mut PgConnection) -> Fence {
    let LeaseState::Held { token, .. } = Statements::new(&outbox.schema)
        .lease_acquire(conn, "relay", "me", Duration::from_secs(30))
        .await
        .expect("lease_acquire")
    else {
        panic!("lease not acquired")
    };
    Fence {
        lease: "relay".into(),
        holder: "me".into(),
        token,
    }
}

/// The ids a plain claim (nothing to skip, no floor change) of up to `limit` messages and
/// `max_bytes` returns under `fence`.
async fn claim_ids(
    sql: &Statements,
    conn: &mut PgConnection,
    limit: i64,
    max_bytes: i64,
    fence: &Fence,
) -> Vec<i64> {
    let claimed = sql
        .claim(
            conn,
            limit,
            max_bytes,
            &Skip::default(),
            FloorRequest::default(),
            fence,
        )
        .await
        .unwrap();
    claimed.messages.iter().map(|m| m.id).collect()
}

#[test]
fn a_floor_candidate_settles_only_once_xmin_is_past_the_completion() {
    let horizon = |xmin| ClaimHorizon {
        floor: 0,
        last_id: Some(99),
        xmin,
        wal_lsn: 0,
    };
    let mut tracker = FloorTracker::default();
    tracker.completed(None, 100);
    assert_eq!(tracker.candidate(), None, "nothing was claimed yet");
    tracker.completed(Some(10), 100);
    let first = FloorCandidate {
        last_id: 10,
        xid: 100,
    };
    assert_eq!(tracker.candidate(), Some(first));
    tracker.completed(Some(20), 105);
    assert_eq!(tracker.candidate(), Some(first), "one candidate at a time");
    // The completion itself (or a writer older than it) may still run at xmin = 100.
    assert!(!tracker.observe(&horizon(100), Some(first)));
    assert_eq!(tracker.candidate(), Some(first));
    // Settled but held back by the caller: nothing was raised, the candidate stays.
    assert!(!tracker.observe(&horizon(101), None));
    assert_eq!(tracker.candidate(), Some(first));
    assert!(tracker.observe(&horizon(101), Some(first)));
    assert_eq!(tracker.candidate(), None);
    tracker.completed(Some(20), 105);
    assert_eq!(
        tracker.candidate(),
        Some(FloorCandidate {
            last_id: 20,
            xid: 105
        })
    );
}

#[test]
fn id_ranges_merge_consecutive_ids_in_any_order() {
    assert_eq!(id_ranges(&[]), "{}");
    assert_eq!(id_ranges(&[7]), "{[7,8)}");
    assert_eq!(id_ranges(&[3, 1, 2, 9, 5, 6, 2]), "{[1,4),[5,7),[9,10)}");
    assert_eq!(
        id_ranges(&[i64::MAX, 4, i64::MAX - 1]),
        format!("{{[4,5),[{},)}}", i64::MAX - 1)
    );
}

#[test]
fn fenced_statements_number_their_fence_parameters() {
    let sql = Statements::new(&SchemaName::default_schema());
    assert!(sql
        .claim
        .contains("l.name = $4 AND l.holder = $5 AND l.token = $6"));
    assert!(sql
        .complete
        .keep
        .contains("l.name = $2 AND l.holder = $3 AND l.token = $4"));
    assert!(sql
        .record_failures
        .contains("l.name = $4 AND l.holder = $5 AND l.token = $6"));
    assert!(sql
        .dead_letter
        .contains("l.name = $3 AND l.holder = $4 AND l.token = $5"));
    for completions in [&sql.complete, &sql.complete_durable] {
        for statement in [
            &completions.keep,
            &completions.keep_replacing,
            &completions.delete,
        ] {
            assert!(!statement.contains("$F") && !statement.contains('{'));
        }
    }
    assert!(sql.complete_durable.keep.contains("relay_progress"));
    assert!(!sql.complete.keep.contains("relay_progress"));
    assert!(sql.complete.delete.contains("'synchronous_commit', 'off'"));
    assert!(sql
        .complete_durable
        .delete
        .contains("'synchronous_commit', 'on'"));
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
        sql.complete(&mut conn, &ids, false, None, &old)
            .await
            .unwrap(),
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
        sql.complete(&mut conn, &ids, false, None, &new)
            .await
            .unwrap()
            .map(|done| done.count),
        Fenced::Done(1)
    );
    drop(conn);
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
    let fence = take_lease(&outbox, &mut conn).await;
    assert_eq!(
        next_notification(&mut listener, b"2").await,
        "marker",
        "busy relay: no NOTIFY"
    );

    // The relay goes idle and waits: writers wake it.
    sql.lease_set_idle(&mut conn, &fence, true, Duration::from_secs(10))
        .await
        .unwrap();
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
    let fence = take_lease(&outbox, &mut conn).await;
    let claimed = |limit: i64, max_bytes: i64, skip: Vec<i64>| {
        let (sql, fence, pool) = (&sql, &fence, &outbox.pool);
        async move {
            let mut conn = pool.acquire().await.unwrap();
            let claimed = sql
                .claim(
                    &mut conn,
                    limit,
                    max_bytes,
                    &Skip {
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
    let fence = take_lease(&outbox, &mut conn).await;
    let claimed = claim_ids(&sql, &mut conn, 100, 25_000, &fence).await;
    assert_eq!(claimed, ids[..3]);
    drop(conn);
    outbox.drop_schema().await;
}

/// With many keys held (messages for a topic that is missing or not authorised), the held-key
/// test must stay a lookup in the held messages' index: once it compared every candidate with
/// every held message, and a claim of 5,000 behind 8,000 held keys took 3.5 s instead of 10 ms.
/// Once `processed_at` went (migration 0014) the planner's estimates changed, and on a table
/// without statistics it hashed every held message per claim and walked every id below the
/// floor for the due ones: claims of 10 ms, and the hostile-writers chaos scenario's healthy
/// p50 went from 2 to 20 ms.
#[tokio::test]
async fn the_held_key_test_is_an_index_lookup_whatever_is_held() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    // A relay session: the plans are the relay's (see `sessions`).
    let relay_sessions = crate::sessions::pool(
        &outbox.pool,
        Duration::from_secs(30),
        std::sync::Arc::new(crate::health::Health::new(
            Duration::from_secs(60),
            Duration::from_secs(30),
        )),
    );
    let mut conn = relay_sessions.acquire().await.unwrap();
    sqlx::raw_sql(&format!(
        "INSERT INTO {0}.message (topic, key, payload, retry_at, attempts)
         SELECT 'held', convert_to('k' || i, 'UTF8'), 'x', now() + interval '1 hour', 1
           FROM generate_series(1, 2000) i;
         INSERT INTO {0}.message (topic, key, payload)
         SELECT 'healthy', convert_to('k' || i, 'UTF8'), 'x' FROM generate_series(1, 2000) i",
        outbox.schema
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    let fence = take_lease(&outbox, &mut conn).await;
    // The held messages below the claim floor, as after the relay has moved past them, and no
    // statistics, as on a table just written.
    sqlx::query(&format!(
        "UPDATE {0}.relay_lease SET floor = (SELECT max(id) FROM {0}.message WHERE topic = 'held') + 1",
        outbox.schema
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    // Whatever the batch size: at small ones the planner preferred hashing every held message
    // once per claim (EXISTS turned into a hashed ANY), 10,000 rows read for a batch of ten.
    for limit in [10_i64, 5000] {
        let plan = sql.explain_claim(&mut conn, limit, &fence).await.unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using message_held on message h")
                && !plan.contains("using message_due on message h")
                && !plan.contains("CTE Scan on held"),
            "limit {limit}: {plan}"
        );
        // The due held messages below the floor are found through their own index, not by
        // walking every id below the floor.
        assert!(
            plan.contains("Index Scan using message_due on message m_1"),
            "limit {limit}: {plan}"
        );
    }
    // Statistics that say every held message is due (analyzed while they were, as after an
    // outage of their topic ended), now stale: the planner expects thousands of due rows, and
    // walked every id below the floor rather than read them through `message_due` and sort
    // them (the hostile-writers chaos scenario: claims of 10 ms instead of 0.3).
    for sql in [
        "UPDATE {0}.message SET retry_at = now() - interval '1 hour' WHERE topic = 'held'",
        "ANALYZE {0}.message",
        "UPDATE {0}.message SET retry_at = now() + interval '1 hour' WHERE topic = 'held'",
    ] {
        sqlx::raw_sql(&sql.replace("{0}", outbox.schema.as_str()))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    for limit in [10_i64, 5000] {
        let plan = sql.explain_claim(&mut conn, limit, &fence).await.unwrap();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using message_due on message m_1")
                && plan.contains("Index Scan using message_held on message h")
                && !plan.contains("using message_due on message h"),
            "stale statistics, limit {limit}: {plan}"
        );
    }
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
    let fence = take_lease(&outbox, &mut conn).await;
    assert_eq!(
        sql.complete(&mut conn, &ids, false, None, &fence)
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

/// The claim floor never passes a message whose transaction is still open (its id is lower
/// than messages already claimed and completed), even when two such transactions are the newest
/// in the database and one commits first; it rises to them once both have committed, and a
/// republished message lowers it again.
#[tokio::test]
async fn claim_floor_waits_for_open_transactions_and_republish_lowers_it() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let fence = take_lease(&outbox, &mut conn).await;
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
        .complete(&mut conn, &early, false, None, &fence)
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
    let (republished, _) = Admin::new(&outbox.schema)
        .republish_batch(
            &mut conn,
            &RepublishFilter::all().ids(Some(early[0]), Some(early[0])),
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
    let fence = take_lease(&outbox, &mut conn).await;
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
    let Fenced::Done(done) = sql
        .complete(&mut conn, &ids, false, None, &fence)
        .await
        .unwrap()
    else {
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
        Admin::new(&outbox.schema)
            .requeue_dead_letters(&mut retry, Some(ids[1]))
            .await
            .unwrap(),
        [ids[1]]
    );
    // A claim that would raise the floor past "b" waits for the retry's lock on the lease row.
    let rising = tokio::spawn({
        let (sql, pool, fence) = (
            Statements::new(&outbox.schema),
            outbox.pool.clone(),
            fence.clone(),
        );
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
    let claimed = claim_ids(&sql, &mut conn, 100, 1 << 20, &fence).await;
    assert_eq!(
        claimed,
        [ids[1]],
        "the retried message is above the floor: {claimed:?}"
    );
    drop(conn);
    outbox.drop_schema().await;
}

/// Held messages do not hold the claim floor back: it rises past them, so a claim does not walk
/// over thousands of held messages, and the claim still finds them below it once they are due,
/// in order with the later messages of their key.
#[tokio::test]
async fn the_floor_rises_past_held_messages_and_due_ones_are_still_claimed() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let fence = take_lease(&outbox, &mut conn).await;
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
        .complete(&mut conn, &other, false, None, &fence)
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

/// A writer may use any key up to the message size limit. Holding a message whose key is
/// larger than a btree entry can be (~2.7 kB, incompressible) failed the whole failure record
/// ("index row size exceeds btree maximum"), so the relay could neither hold it nor move on.
#[tokio::test]
async fn a_message_with_a_key_larger_than_an_index_entry_is_held_like_any_other() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let ids: Vec<i64> = sqlx::query_scalar(&format!(
        "INSERT INTO {0}.message (topic, key, payload)
         VALUES ('t', decode((SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 250)), 'hex'), 'big'),
                ('t', 'small', 'small')
         RETURNING id",
        outbox.schema
    ))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let fence = take_lease(&outbox, &mut conn).await;
    sql.record_failures(
        &mut conn,
        &[(ids[0], "refused".to_owned(), Duration::from_secs(3600))],
        &fence,
    )
    .await
    .expect("the failure of a message with a 4,000-byte key is recorded");
    let claimed = claim_ids(&sql, &mut conn, 10, 1 << 30, &fence).await;
    assert_eq!(
        claimed,
        [ids[1]],
        "the held message waits, the other key flows"
    );
    let held = Admin::new(&outbox.schema)
        .held_keys(&mut conn, 10)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].head, ids[0]);
    drop(conn);
    outbox.drop_schema().await;
}

/// Rows written by hand into `published`: `outbox status` failed on an infinite time, and a
/// cleanup batch of 0 never finished.
#[tokio::test]
async fn operator_statements_survive_rows_written_by_hand() {
    let outbox = TestOutbox::new().await;
    let admin = Admin::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    sqlx::query(&format!(
        "INSERT INTO {}.published (id, topic, payload, created_at, processed_at, attempts)
         VALUES (1, 't', 'x', now(), 'infinity', 0), (2, 't', 'x', now(), '-infinity', 0)",
        outbox.schema
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    admin.activity(&mut conn).await.expect("activity");
    let deleted = tokio::time::timeout(
        Duration::from_secs(10),
        crate::cleanup::run_once(&outbox.pool, &admin, Duration::ZERO, 0, |_| {}),
    )
    .await
    .expect("a cleanup batch of 0 finishes")
    .unwrap();
    assert_eq!(
        deleted, 1,
        "the row processed at -infinity is past any retention"
    );
    drop(conn);
    outbox.drop_schema().await;
}

/// Only the lease holder sets the busy mark, never past the end of its term, and a role without
/// UPDATE on it sets nothing and is told so, its idle flag updated all the same; a release resets
/// the mark.
#[tokio::test]
async fn the_busy_mark_is_the_holders_within_its_term_and_needs_the_privilege() {
    let outbox = TestOutbox::new().await;
    let sql = Statements::new(&outbox.schema);
    let mut conn = outbox.pool.acquire().await.unwrap();
    let fence = take_lease(&outbox, &mut conn).await; // a 30 s term
    let hour = Duration::from_secs(3600);
    let marked = sql.lease_set_idle(&mut conn, &fence, false, hour).await;
    assert_eq!(marked.unwrap(), Some(true));
    let ahead = outbox.busy_mark_ahead().await;
    assert!(
        (25_000..=30_000).contains(&ahead),
        "capped at the term: {ahead} ms"
    );

    let deposed = Fence {
        token: fence.token + 1,
        ..fence.clone()
    };
    let marked = sql.lease_set_idle(&mut conn, &deposed, true, hour).await;
    assert_eq!(marked.unwrap(), None, "not the holder");
    assert!(
        outbox.busy_mark_ahead().await > 0,
        "a deposed holder changes nothing"
    );
    let marked = sql.lease_set_idle(&mut conn, &fence, true, hour).await;
    assert_eq!(marked.unwrap(), Some(true));
    assert!(outbox.busy_mark_ahead().await < 0, "reset before waiting");

    let role = format!("no_mark_{}", outbox_test_support::short_id());
    sqlx::raw_sql(&format!(
        "CREATE ROLE {role} NOLOGIN;
         GRANT USAGE ON SCHEMA {schema} TO {role};
         GRANT SELECT, UPDATE ON {schema}.relay_lease TO {role};",
        schema = outbox.schema
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(&format!("SET ROLE {role}"))
        .execute(&mut *conn)
        .await
        .unwrap();
    let marked = sql.lease_set_idle(&mut conn, &fence, false, hour).await;
    sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
    assert_eq!(marked.unwrap(), Some(false), "no privilege, said so");
    assert!(outbox.busy_mark_ahead().await < 0, "nothing set");
    let idle: bool = sqlx::query_scalar(&format!(
        "SELECT idle FROM {}.relay_lease WHERE name = 'relay'",
        outbox.schema
    ))
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert!(!idle, "the idle flag is updated all the same");

    sql.lease_set_idle(&mut conn, &fence, false, hour)
        .await
        .unwrap();
    assert!(outbox.busy_mark_ahead().await > 0);
    sql.lease_release(&mut conn, &fence).await.unwrap();
    assert!(outbox.busy_mark_ahead().await < 0, "reset at release");
    sqlx::raw_sql(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    outbox.drop_schema().await;
}
