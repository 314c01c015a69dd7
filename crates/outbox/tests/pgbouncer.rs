//! Writers through Debian's PgBouncer (started by `dev/up`) in transaction pooling mode, where
//! each transaction may run on any server connection, and server connections pass from client
//! to client. Each pool below is a service of its own.

use outbox::admin::Admin;
use outbox::{Error, Inbox, Message, Outbox, OutboxConfig};
use outbox_test_support::{pgbouncer_session_url, pgbouncer_transaction_url, pool_on, TestOutbox};
use sqlx::PgPool;

const SERVICES: usize = 5;
const TRANSACTIONS: usize = 20;

fn pooled(outbox: &TestOutbox) -> Outbox {
    Outbox::new(
        OutboxConfig::default()
            .schema(outbox.schema.clone())
            .transaction_pooling(true),
    )
}

/// The service's own statement in the transaction: unnamed too.
async fn insert_thing(
    tx: &mut sqlx::PgConnection,
    schema: &str,
    service: usize,
    n: usize,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "INSERT INTO {schema}.things (service, n) VALUES ($1, $2)"
    ))
    .bind(service as i32)
    .bind(n as i32)
    .persistent(false)
    .execute(tx)
    .await?;
    Ok(())
}

/// One service's transaction: a business row and its event, by one of the three ways to save.
async fn business_transaction(
    pool: &PgPool,
    writer: &Outbox,
    schema: &str,
    service: usize,
    n: usize,
) -> Result<(), Error> {
    let mut tx = pool.begin().await?;
    let key = format!("service-{service}");
    let event = |payload: String| Message::new("things", payload.into_bytes()).key(key.clone());
    match n % 3 {
        0 => {
            insert_thing(&mut tx, schema, service, n).await?;
            writer
                .save_for_publishing(&mut tx, event(format!("{n}")))
                .await?;
        }
        1 => {
            let sql =
                format!("INSERT INTO {schema}.things (service, n) VALUES ($1, $2) RETURNING n");
            let insert = sqlx::query(&sql).bind(service as i32).bind(n as i32);
            let saved = writer
                .execute_and_save(&mut tx, insert, event(format!("{n}")))
                .await?;
            assert!(saved.is_some());
        }
        _ => {
            insert_thing(&mut tx, schema, service, n).await?;
            let ids = writer
                .save_all_for_publishing(
                    &mut tx,
                    vec![event(format!("{n}a")), event(format!("{n}b"))],
                )
                .await?;
            assert_eq!(ids.len(), 2);
            assert!(ids[0] < ids[1], "a batch keeps its order: {ids:?}");
        }
    }
    tx.commit().await?;
    Ok(())
}

async fn with_things_table(outbox: &TestOutbox) {
    sqlx::query(&format!(
        "CREATE TABLE {}.things (service int NOT NULL, n int NOT NULL, PRIMARY KEY (service, n))",
        outbox.schema
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
}

/// Services whose writes go through the pooler, concurrently; the errors they met.
async fn run_services(outbox: &TestOutbox, writer: &Outbox) -> Vec<Error> {
    let url = pgbouncer_transaction_url();
    let mut services = Vec::new();
    for service in 0..SERVICES {
        let (url, writer, schema) = (url.clone(), writer.clone(), outbox.schema.to_string());
        services.push(tokio::spawn(async move {
            let pool = pool_on(&url, 2).await;
            let mut errors = Vec::new();
            for n in 0..TRANSACTIONS {
                if let Err(error) = business_transaction(&pool, &writer, &schema, service, n).await
                {
                    errors.push(error);
                }
            }
            pool.close().await;
            errors
        }));
    }
    let mut errors = Vec::new();
    for service in services {
        errors.extend(service.await.unwrap());
    }
    errors
}

async fn count(outbox: &TestOutbox, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {}.{table}", outbox.schema))
        .fetch_one(&outbox.pool)
        .await
        .unwrap()
}

/// sqlx caches every statement under the names `sqlx_s_1`, `sqlx_s_2`, ... on each connection;
/// through the pooler, one service's cached statement is left on a server connection that the
/// next service's transaction gets. With the default configuration writes fail; most errors say
/// why and what to do, the others come from another client's statement run with the writer's
/// parameters (seen here: "relation t_….message does not exist", a dropped schema's insert).
/// `check_connection` finds the pooler before any of that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_statements_through_a_transaction_pooler_fail_and_check_connection_says_why() {
    let outbox = TestOutbox::new().await;
    with_things_table(&outbox).await;
    let errors = run_services(&outbox, &outbox.outbox).await;
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, Error::TransactionPooler { statement: Some(_) })),
        "cached statements met each other's names on the pooler's server connections: {errors:?}"
    );

    let pooler = pool_on(&pgbouncer_transaction_url(), 2).await;
    let found = outbox.outbox.check_connection(&pooler).await.unwrap_err();
    assert!(
        matches!(found, Error::TransactionPooler { statement: None }),
        "{found}"
    );
    assert!(found.to_string().contains("transaction_pooling"), "{found}");
    pooled(&outbox).check_connection(&pooler).await.unwrap();
    pooler.close().await;
    // Sessions of its own: nothing to change.
    let session = pool_on(&pgbouncer_session_url(), 2).await;
    outbox.outbox.check_connection(&session).await.unwrap();
    outbox.outbox.check_connection(&outbox.pool).await.unwrap();
    assert!(
        !outbox::pooler::transaction_pooled(session.connect_options().as_ref())
            .await
            .unwrap()
    );
    session.close().await;
    outbox.drop_schema().await;
}

/// With `transaction_pooling`, all three ways to save work from many services at once through
/// the pooler, and each transaction's row and events are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_with_transaction_pooling_save_everything_through_a_transaction_pooler() {
    let outbox = TestOutbox::new().await;
    with_things_table(&outbox).await;
    let errors = run_services(&outbox, &pooled(&outbox)).await;
    assert!(errors.is_empty(), "{errors:?}");
    let transactions = (SERVICES * TRANSACTIONS) as i64;
    assert_eq!(count(&outbox, "things").await, transactions);
    // The batch transactions (n % 3 == 2) saved two events each.
    let doubles = (SERVICES * (0..TRANSACTIONS).filter(|n| n % 3 == 2).count()) as i64;
    assert_eq!(outbox.pending().await, transactions + doubles);
    outbox.drop_schema().await;
}

/// Migrations, the SQL enqueue function, the inbox and the operator's statements (inside a
/// transaction) through the pooler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_sql_enqueue_inbox_and_admin_work_through_a_transaction_pooler() {
    let outbox = TestOutbox::unmigrated().await;
    let pool = pool_on(&pgbouncer_transaction_url(), 2).await;
    // Cached statements of other clients are left on the pooler's server connections.
    for _ in 0..3 {
        sqlx::query("SELECT $1::int")
            .bind(1)
            .execute(&pool)
            .await
            .ok();
    }
    pooled(&outbox).migrate(&pool).await.unwrap();
    pooled(&outbox).migrate(&pool).await.unwrap();

    // Other languages' writers: the SQL function, over the simple protocol as psql sends it.
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT {}.enqueue('things', 'k', 'from sql', '{{\"h\": \"v\"}}'); COMMIT",
        outbox.schema
    ))
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(outbox.pending().await, 1);

    let inbox = Inbox::new(outbox.schema.clone()).transaction_pooling(true);
    for expected in [true, false] {
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(inbox.try_record(&mut tx, "src", 7).await.unwrap(), expected);
        tx.commit().await.unwrap();
    }

    let admin = Admin::new(&outbox.schema).transaction_pooling(true);
    for _ in 0..3 {
        let mut tx = pool.begin().await.unwrap();
        assert_eq!(admin.backlog(&mut tx).await.unwrap().pending, 1);
        assert_eq!(
            admin.schema_version(&mut tx).await.unwrap(),
            outbox::SCHEMA_VERSION
        );
        assert!(admin.dead_letters(&mut tx, 10).await.unwrap().is_empty());
        tx.commit().await.unwrap();
    }
    pool.close().await;
    outbox.drop_schema().await;
}
