//! One conformance suite, run against every PostgreSQL client library the writer supports
//! (`outbox::ClientTransaction`, and diesel's blocking connection through
//! `outbox::BlockingClientTransaction`): each saves in the caller's transaction, and the relay publishes
//! what it saved, through the real PostgreSQL and Kafka started by `dev/up`.
//!
//! Each client runs the same cases: a committed business row and its message, saved together
//! (in one round trip where the client can: sqlx's `execute_and_save`, tokio-postgres's pipelining); a rolled-back transaction; a batch whose
//! order is kept; an invalid message refused before anything is written, leaving the
//! transaction usable. Then what reached Kafka is checked record by record, and every client's
//! rows are compared byte for byte with sqlx's.

use std::time::Duration;

use outbox::{Error, InvalidMessage, Message, Outbox};
use outbox_kafka_relay::{Relay, RelayConfig};
use outbox_test_support::{
    create_topic, database_url, kafka_bootstrap_servers, unique_topic, Fault, TcpProxy, TestOutbox,
    TopicReader,
};

const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One of the client libraries, driven the same way for every case.
trait Client: Sized {
    const NAME: &'static str;
    /// Whether `transact` saves a single message of `save` with `save_all_for_publishing`, not
    /// with the client's one-round-trip form.
    const ONE_AS_BATCH: bool = true;

    async fn connect() -> Self;

    /// In one transaction: inserts business row `thing`, saves `save` (one message through the
    /// one-round-trip form where the client has one, see `ONE_AS_BATCH`; else through
    /// `save_all_for_publishing`), then saves each of `more` on its own, keeping going after a
    /// refusal; commits if `commit`. Returns the result of the first save and of each of `more`.
    async fn transact(
        &mut self,
        outbox: &Outbox,
        schema: &str,
        thing: i64,
        save: Vec<Message>,
        more: Vec<Message>,
        commit: bool,
    ) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>);
}

struct Sqlx(sqlx::PgConnection);

impl Client for Sqlx {
    const NAME: &'static str = "sqlx";
    const ONE_AS_BATCH: bool = false;

    async fn connect() -> Self {
        use sqlx::Connection as _;
        Sqlx(sqlx::PgConnection::connect(&database_url()).await.unwrap())
    }

    async fn transact(
        &mut self,
        outbox: &Outbox,
        schema: &str,
        thing: i64,
        save: Vec<Message>,
        more: Vec<Message>,
        commit: bool,
    ) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>) {
        use sqlx::Connection as _;
        let mut tx = self.0.begin().await.unwrap();
        let first = if let [message] = &save[..] {
            // sqlx's one-round-trip form: the business statement and the message together.
            let insert = format!("INSERT INTO {schema}.thing (id) VALUES ($1) RETURNING id");
            outbox
                .execute_and_save(&mut tx, sqlx::query(&insert).bind(thing), message.clone())
                .await
                .map(|sequence| sequence.into_iter().collect())
        } else {
            sqlx::query(&format!("INSERT INTO {schema}.thing (id) VALUES ($1)"))
                .bind(thing)
                .execute(&mut *tx)
                .await
                .unwrap();
            outbox.save_all_for_publishing(&mut tx, save).await
        };
        let mut results = Vec::new();
        for message in more {
            results.push(outbox.save_for_publishing(&mut tx, message).await);
        }
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        (first, results)
    }
}

struct TokioPostgres(tokio_postgres::Client);

impl Client for TokioPostgres {
    const NAME: &'static str = "tokio-postgres";
    const ONE_AS_BATCH: bool = false;

    async fn connect() -> Self {
        let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        TokioPostgres(client)
    }

    async fn transact(
        &mut self,
        outbox: &Outbox,
        schema: &str,
        thing: i64,
        save: Vec<Message>,
        more: Vec<Message>,
        commit: bool,
    ) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>) {
        transact_on(&mut self.0, outbox, schema, thing, save, more, commit).await
    }
}

/// `Client::transact` on a tokio-postgres client (bb8's pooled connections dereference to one).
async fn transact_on(
    client: &mut tokio_postgres::Client,
    outbox: &Outbox,
    schema: &str,
    thing: i64,
    save: Vec<Message>,
    more: Vec<Message>,
    commit: bool,
) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>) {
    let tx = client.transaction().await.unwrap();
    let results = tokio_postgres_transact(&tx, outbox, schema, thing, save, more).await;
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
    results
}

/// The cases' statements on a tokio-postgres transaction, the business statement pipelined with
/// the first save (typed, so it needs no round trip of its own to be prepared).
async fn tokio_postgres_transact(
    tx: &tokio_postgres::Transaction<'_>,
    outbox: &Outbox,
    schema: &str,
    thing: i64,
    save: Vec<Message>,
    more: Vec<Message>,
) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>) {
    let insert = format!("INSERT INTO {schema}.thing (id) VALUES ($1)");
    let business = async {
        tx.query_typed(&insert, &[(&thing, tokio_postgres::types::Type::INT8)])
            .await
            .unwrap()
    };
    let first = if let [message] = &save[..] {
        let (_, saved) = tokio::join!(business, outbox.save_for_publishing(tx, message.clone()));
        saved.map(|sequence| vec![sequence])
    } else {
        let (_, saved) = tokio::join!(business, outbox.save_all_for_publishing(tx, save));
        saved
    };
    let mut results = Vec::new();
    for message in more {
        results.push(outbox.save_for_publishing(tx, message).await);
    }
    (first, results)
}

/// deadpool-postgres: its transaction dereferences to tokio-postgres's (`&*tx`).
struct Deadpool(deadpool_postgres::Pool);

impl Client for Deadpool {
    const NAME: &'static str = "deadpool-postgres";
    const ONE_AS_BATCH: bool = false;

    async fn connect() -> Self {
        let config: tokio_postgres::Config = database_url().parse().unwrap();
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        Deadpool(
            deadpool_postgres::Pool::builder(manager)
                .max_size(2)
                .build()
                .unwrap(),
        )
    }

    async fn transact(
        &mut self,
        outbox: &Outbox,
        schema: &str,
        thing: i64,
        save: Vec<Message>,
        more: Vec<Message>,
        commit: bool,
    ) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>) {
        let mut client = self.0.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let results = tokio_postgres_transact(&tx, outbox, schema, thing, save, more).await;
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        results
    }
}

/// bb8-postgres: its pooled connection dereferences to tokio-postgres's `Client`, whose
/// transaction is tokio-postgres's own (`&tx`).
struct Bb8(bb8::Pool<bb8_postgres::PostgresConnectionManager<tokio_postgres::NoTls>>);

impl Client for Bb8 {
    const NAME: &'static str = "bb8-postgres";
    const ONE_AS_BATCH: bool = false;

    async fn connect() -> Self {
        let config: tokio_postgres::Config = database_url().parse().unwrap();
        let manager = bb8_postgres::PostgresConnectionManager::new(config, tokio_postgres::NoTls);
        Bb8(bb8::Pool::builder()
            .max_size(2)
            .build(manager)
            .await
            .unwrap())
    }

    async fn transact(
        &mut self,
        outbox: &Outbox,
        schema: &str,
        thing: i64,
        save: Vec<Message>,
        more: Vec<Message>,
        commit: bool,
    ) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>) {
        let mut client = self.0.get().await.unwrap();
        transact_on(&mut client, outbox, schema, thing, save, more, commit).await
    }
}

struct SeaOrm(sea_orm::DatabaseConnection);

impl Client for SeaOrm {
    const NAME: &'static str = "sea-orm";

    async fn connect() -> Self {
        SeaOrm(sea_orm::Database::connect(database_url()).await.unwrap())
    }

    async fn transact(
        &mut self,
        outbox: &Outbox,
        schema: &str,
        thing: i64,
        save: Vec<Message>,
        more: Vec<Message>,
        commit: bool,
    ) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>) {
        use sea_orm::{ConnectionTrait as _, TransactionTrait as _};
        let tx = self.0.begin().await.unwrap();
        tx.execute(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            format!("INSERT INTO {schema}.thing (id) VALUES ($1)"),
            [thing.into()],
        ))
        .await
        .unwrap();
        // One message too: `more` goes through `save_for_publishing`.
        let first = outbox.save_all_for_publishing(&tx, save).await;
        let mut results = Vec::new();
        for message in more {
            results.push(outbox.save_for_publishing(&tx, message).await);
        }
        if commit {
            tx.commit().await.unwrap();
        } else {
            tx.rollback().await.unwrap();
        }
        (first, results)
    }
}

/// diesel-async: the connection, in a transaction.
struct DieselAsync(diesel_async::AsyncPgConnection);

impl Client for DieselAsync {
    const NAME: &'static str = "diesel-async";

    async fn connect() -> Self {
        use diesel_async::AsyncConnection as _;
        DieselAsync(
            diesel_async::AsyncPgConnection::establish(&database_url())
                .await
                .unwrap(),
        )
    }

    async fn transact(
        &mut self,
        outbox: &Outbox,
        schema: &str,
        thing: i64,
        save: Vec<Message>,
        more: Vec<Message>,
        commit: bool,
    ) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>) {
        use diesel_async::{AnsiTransactionManager, RunQueryDsl as _, TransactionManager as _};
        let conn = &mut self.0;
        AnsiTransactionManager::begin_transaction(conn)
            .await
            .unwrap();
        diesel::sql_query(format!("INSERT INTO {schema}.thing (id) VALUES ($1)"))
            .bind::<diesel::sql_types::BigInt, _>(thing)
            .execute(conn)
            .await
            .unwrap();
        // One message too: `more` goes through `save_for_publishing`.
        let first = outbox.save_all_for_publishing(&mut *conn, save).await;
        let mut results = Vec::new();
        for message in more {
            results.push(outbox.save_for_publishing(&mut *conn, message).await);
        }
        if commit {
            AnsiTransactionManager::commit_transaction(conn)
                .await
                .unwrap();
        } else {
            AnsiTransactionManager::rollback_transaction(conn)
                .await
                .unwrap();
        }
        (first, results)
    }
}

/// diesel (blocking): the connection, in a transaction, on a blocking thread.
struct Diesel(Option<diesel::PgConnection>);

impl Client for Diesel {
    const NAME: &'static str = "diesel";

    async fn connect() -> Self {
        use diesel::Connection as _;
        let url = database_url();
        let conn = tokio::task::spawn_blocking(move || diesel::PgConnection::establish(&url))
            .await
            .unwrap()
            .unwrap();
        Diesel(Some(conn))
    }

    async fn transact(
        &mut self,
        outbox: &Outbox,
        schema: &str,
        thing: i64,
        save: Vec<Message>,
        more: Vec<Message>,
        commit: bool,
    ) -> (Result<Vec<i64>, Error>, Vec<Result<i64, Error>>) {
        let mut conn = self.0.take().expect("connected");
        let (outbox, schema) = (outbox.clone(), schema.to_owned());
        let (conn, results) = tokio::task::spawn_blocking(move || {
            use diesel::connection::{AnsiTransactionManager, TransactionManager as _};
            use diesel::RunQueryDsl as _;
            AnsiTransactionManager::begin_transaction(&mut conn).unwrap();
            diesel::sql_query(format!("INSERT INTO {schema}.thing (id) VALUES ($1)"))
                .bind::<diesel::sql_types::BigInt, _>(thing)
                .execute(&mut conn)
                .unwrap();
            // One message too: `more` goes through `save_for_publishing_blocking`.
            let first = outbox.save_all_for_publishing_blocking(&mut conn, save);
            let results = more
                .into_iter()
                .map(|message| outbox.save_for_publishing_blocking(&mut conn, message))
                .collect();
            if commit {
                AnsiTransactionManager::commit_transaction(&mut conn).unwrap();
            } else {
                AnsiTransactionManager::rollback_transaction(&mut conn).unwrap();
            }
            (conn, (first, results))
        })
        .await
        .unwrap();
        self.0 = Some(conn);
        results
    }
}

/// The cases every client passes; returns the rows it saved, as the relay's input.
async fn conformance<C: Client>() {
    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.as_str().to_owned();
    sqlx::raw_sql(&format!(
        "CREATE TABLE {schema}.thing (id bigint PRIMARY KEY)"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let topic = unique_topic("clients");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "clients-tests");
    config.schema = outbox.schema.clone();
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();
    let mut client = C::connect().await;
    let name = C::NAME;
    let things = |sql: String| {
        let pool = outbox.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    // A business row and its message, committed together.
    let created = Message::new(&topic, br#"{"id":1}"#.to_vec())
        .key("thing-1")
        .header("x-value-type", "ThingCreated")
        .header("binary", vec![0u8, 255, 1]);
    let (saved, _) = client
        .transact(&outbox.outbox, &schema, 1, vec![created], vec![], true)
        .await;
    let created = saved.unwrap()[0];

    // Rolled back: neither the row nor its messages, saved one by one and as a batch.
    let (saved, more) = client
        .transact(
            &outbox.outbox,
            &schema,
            2,
            vec![
                Message::new(&topic, b"rolled back 1".to_vec()).key("thing-2"),
                Message::new(&topic, b"rolled back 2".to_vec()).key("thing-2"),
            ],
            vec![Message::new(&topic, b"rolled back 3".to_vec()).key("thing-2")],
            false,
        )
        .await;
    saved.unwrap();
    more[0].as_ref().unwrap();
    let (saved, _) = client
        .transact(
            &outbox.outbox,
            &schema,
            2,
            vec![Message::new(&topic, b"rolled back 4".to_vec()).key("thing-2")],
            vec![],
            false,
        )
        .await;
    saved.unwrap();

    // A batch on one key keeps its order, and ids follow it.
    let batch: Vec<Message> = (0..50)
        .map(|n| Message::new(&topic, format!("batch {n}")).key("thing-3"))
        .collect();
    let (saved, _) = client
        .transact(&outbox.outbox, &schema, 3, batch, vec![], true)
        .await;
    let batch = saved.unwrap();
    assert_eq!(batch.len(), 50, "{name}");
    assert!(batch.windows(2).all(|w| w[0] < w[1]), "{name}: {batch:?}");

    // A batch larger than one statement of any client (SeaORM's hold 1,000), rolled back.
    let large: Vec<Message> = (0..2_500)
        .map(|n| Message::new(&topic, format!("large {n}")).key("thing-5"))
        .collect();
    let (saved, _) = client
        .transact(&outbox.outbox, &schema, 5, large, vec![], false)
        .await;
    let large = saved.unwrap();
    assert_eq!(large.len(), 2_500, "{name}");
    assert!(large.windows(2).all(|w| w[0] < w[1]), "{name}");

    // An invalid message is refused before anything is written, and the transaction goes on.
    let (saved, more) = client
        .transact(
            &outbox.outbox,
            &schema,
            4,
            vec![
                Message::new(&topic, b"valid".to_vec()).key("thing-4"),
                Message::new(&topic, vec![0; 2_000_000]).key("thing-4"),
            ],
            vec![
                Message::new("bad topic!", b"x".to_vec()),
                Message::new(&topic, b"after the refusals".to_vec()).key("thing-4"),
            ],
            true,
        )
        .await;
    assert!(
        matches!(
            saved,
            Err(Error::InvalidMessage(InvalidMessage::TooLarge { .. }))
        ),
        "{name}: {saved:?}"
    );
    assert!(
        matches!(
            more[0],
            Err(Error::InvalidMessage(InvalidMessage::IllegalTopic { .. }))
        ),
        "{name}: {:?}",
        more[0]
    );
    let after = *more[1].as_ref().unwrap();

    // A trigger that suppresses the inserts of one topic: the save fails, never succeeds short.
    let suppressed = unique_topic("suppressed");
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION {schema}.suppress() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RETURN CASE WHEN NEW.topic = '{suppressed}' THEN NULL ELSE NEW END; END $$;
         CREATE TRIGGER suppress BEFORE INSERT ON {schema}.message
            FOR EACH ROW EXECUTE FUNCTION {schema}.suppress()"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let (saved, more) = client
        .transact(
            &outbox.outbox,
            &schema,
            6,
            vec![
                Message::new(&topic, b"kept".to_vec()),
                Message::new(&suppressed, b"suppressed".to_vec()),
            ],
            vec![Message::new(&suppressed, b"suppressed".to_vec())],
            false,
        )
        .await;
    assert!(matches!(saved, Err(Error::NotSaved)), "{name}: {saved:?}");
    assert!(
        matches!(more[0], Err(Error::NotSaved)),
        "{name}: {:?}",
        more[0]
    );
    if C::ONE_AS_BATCH {
        let (saved, _) = client
            .transact(
                &outbox.outbox,
                &schema,
                7,
                vec![Message::new(&suppressed, b"suppressed".to_vec())],
                vec![],
                false,
            )
            .await;
        assert!(matches!(saved, Err(Error::NotSaved)), "{name}: {saved:?}");
    }
    sqlx::raw_sql(&format!("DROP TRIGGER suppress ON {schema}.message"))
        .execute(&outbox.pool)
        .await
        .unwrap();

    assert_eq!(
        things(format!("SELECT count(*) FROM {schema}.thing")).await,
        3,
        "{name}: things 1, 3 and 4, not the rolled-back 2"
    );

    // What reached Kafka: exactly the committed messages, in order, with their headers.
    let mut reader = TopicReader::new(&topic);
    let expected = 1 + 50 + 1;
    reader.read_at_least(expected, READ_TIMEOUT).await;
    // A record after the last one would have been published in the same batches.
    outbox.wait_until_drained(Duration::from_secs(10)).await;
    let received = reader.read_for(Duration::from_millis(300)).await;
    let sequences: Vec<i64> = received.iter().map(|r| r.sequence()).collect();
    let mut want = vec![created];
    want.extend(&batch);
    want.push(after);
    assert_eq!(sequences, want, "{name}");
    let first = &received[0];
    assert_eq!(first.key_str(), "thing-1", "{name}");
    assert_eq!(first.payload_str(), r#"{"id":1}"#, "{name}");
    assert_eq!(
        first.header("x-value-type"),
        Some(&b"ThingCreated"[..]),
        "{name}"
    );
    assert_eq!(first.header("binary"), Some(&[0u8, 255, 1][..]), "{name}");
    let payloads: Vec<&str> = received[1..=50].iter().map(|r| r.payload_str()).collect();
    let want: Vec<String> = (0..50).map(|n| format!("batch {n}")).collect();
    assert_eq!(payloads, want, "{name}");
    assert_eq!(received[51].payload_str(), "after the refusals", "{name}");

    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlx_conforms() {
    conformance::<Sqlx>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_conforms() {
    conformance::<TokioPostgres>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadpool_postgres_conforms() {
    conformance::<Deadpool>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bb8_postgres_conforms() {
    conformance::<Bb8>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diesel_async_conforms() {
    conformance::<DieselAsync>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diesel_conforms() {
    conformance::<Diesel>().await;
}

/// diesel has no transaction type: a connection outside a transaction is refused, and nothing
/// is written (the message would commit at once, apart from the business data).
#[tokio::test]
async fn a_diesel_connection_outside_a_transaction_is_refused() {
    let outbox = TestOutbox::new().await;
    let mut client = Diesel::connect().await;
    let conn = client.0.as_mut().expect("connected");
    let error = outbox
        .outbox
        .save_for_publishing_blocking(&mut *conn, Message::new("t", b"x".to_vec()))
        .unwrap_err();
    assert!(matches!(error, Error::NotInTransaction), "{error}");
    for count in [1, 2] {
        let error = outbox
            .outbox
            .save_all_for_publishing_blocking(
                &mut *conn,
                vec![Message::new("t", b"x".to_vec()); count],
            )
            .unwrap_err();
        assert!(matches!(error, Error::NotInTransaction), "{count}: {error}");
    }
    let mut client = DieselAsync::connect().await;
    let error = outbox
        .outbox
        .save_for_publishing(&mut client.0, Message::new("t", b"x".to_vec()))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NotInTransaction), "{error}");
    for count in [1, 2] {
        let error = outbox
            .outbox
            .save_all_for_publishing(&mut client.0, vec![Message::new("t", b"x".to_vec()); count])
            .await
            .unwrap_err();
        assert!(matches!(error, Error::NotInTransaction), "{count}: {error}");
    }
    assert_eq!(outbox.pending().await, 0);
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sea_orm_conforms() {
    conformance::<SeaOrm>().await;
}

/// The same messages saved through each client are the same rows, byte for byte: the relay
/// cannot tell which library wrote them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_writes_byte_identical_rows() {
    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.as_str().to_owned();
    sqlx::raw_sql(&format!(
        "CREATE TABLE {schema}.thing (id bigint PRIMARY KEY)"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let messages = || {
        vec![
            Message::new("identical", vec![0u8, 1, 2, 255]).key(vec![0u8, 200]),
            Message::new("identical", Vec::new())
                .header("h", "v")
                .header("bin", vec![0u8, 10, 255])
                .header("h", "second"),
            Message::tombstone("identical", "gone"),
        ]
    };
    let rows = |from: i64| {
        let sql = format!(
            "SELECT topic, key, payload, headers::text, attempts FROM {schema}.message
              WHERE id >= $1 ORDER BY id"
        );
        let pool = outbox.pool.clone();
        async move {
            sqlx::query_as::<
                _,
                (
                    String,
                    Option<Vec<u8>>,
                    Option<Vec<u8>>,
                    Option<String>,
                    i32,
                ),
            >(&sql)
            .bind(from)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let mut sqlx = Sqlx::connect().await;
    let (saved, singles) = sqlx
        .transact(&outbox.outbox, &schema, 1, messages(), messages(), true)
        .await;
    let from = saved.unwrap()[0];
    let by_sqlx = rows(from).await;
    assert_eq!(by_sqlx.len(), 6);
    assert!(singles.iter().all(Result::is_ok));

    let mut tokio_postgres = TokioPostgres::connect().await;
    let (saved, singles) = tokio_postgres
        .transact(&outbox.outbox, &schema, 2, messages(), messages(), true)
        .await;
    let from = saved.unwrap()[0];
    assert!(singles.iter().all(Result::is_ok));
    assert_eq!(rows(from).await, by_sqlx, "tokio-postgres against sqlx");

    let mut sea_orm = SeaOrm::connect().await;
    let (saved, singles) = sea_orm
        .transact(&outbox.outbox, &schema, 3, messages(), messages(), true)
        .await;
    let from = saved.unwrap()[0];
    assert!(singles.iter().all(Result::is_ok));
    assert_eq!(rows(from).await, by_sqlx, "SeaORM against sqlx");

    let mut diesel = DieselAsync::connect().await;
    let (saved, singles) = diesel
        .transact(&outbox.outbox, &schema, 4, messages(), messages(), true)
        .await;
    let from = saved.unwrap()[0];
    assert!(singles.iter().all(Result::is_ok));
    assert_eq!(rows(from).await, by_sqlx, "diesel-async against sqlx");

    let mut diesel = Diesel::connect().await;
    let (saved, singles) = diesel
        .transact(&outbox.outbox, &schema, 5, messages(), messages(), true)
        .await;
    let from = saved.unwrap()[0];
    assert!(singles.iter().all(Result::is_ok));
    assert_eq!(rows(from).await, by_sqlx, "diesel against sqlx");
    outbox.drop_schema().await;
}

/// tokio-postgres pipelines a save with the service's statement when both are awaited together
/// and the statement is typed: on a link with 50 ms of latency each way, the pair takes one round
/// trip, where one after the other they take two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_awaited_with_a_typed_statement_shares_its_round_trip() {
    use std::time::Instant;
    use tokio_postgres::types::Type;

    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.as_str().to_owned();
    sqlx::raw_sql(&format!(
        "CREATE TABLE {schema}.thing (id bigint PRIMARY KEY)"
    ))
    .execute(&outbox.pool)
    .await
    .unwrap();
    let direct: tokio_postgres::Config = database_url().parse().unwrap();
    let port = direct.get_ports().first().copied().unwrap_or(5432);
    let proxy = TcpProxy::start(&format!("127.0.0.1:{port}")).await;
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(proxy.port());
    config.user(direct.get_user().unwrap_or("postgres"));
    config.dbname(direct.get_dbname().unwrap_or("postgres"));
    if let Some(password) = direct.get_password() {
        config.password(password);
    }
    let (mut client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    proxy.set(Fault::Latency(50));

    let tx = client.transaction().await.unwrap();
    let insert = format!("INSERT INTO {schema}.thing (id) VALUES ($1)");
    let event = |n: i64| Message::new("pipelined", n.to_string()).key("k");
    let started = Instant::now();
    tx.query_typed("SELECT 1", &[]).await.unwrap();
    let round_trip = started.elapsed();

    let started = Instant::now();
    tx.query_typed(&insert, &[(&1_i64, Type::INT8)])
        .await
        .unwrap();
    outbox
        .outbox
        .save_for_publishing(&tx, event(1))
        .await
        .unwrap();
    let one_after_the_other = started.elapsed();

    let started = Instant::now();
    let (inserted, saved) = tokio::join!(
        tx.query_typed(&insert, &[(&2_i64, Type::INT8)]),
        outbox.outbox.save_for_publishing(&tx, event(2)),
    );
    let together = started.elapsed();
    inserted.unwrap();
    saved.unwrap();
    tx.commit().await.unwrap();

    assert!(
        one_after_the_other >= round_trip * 2 - round_trip / 4,
        "one after the other: {one_after_the_other:?}, a round trip: {round_trip:?}"
    );
    assert!(
        together < round_trip + round_trip / 2,
        "awaited together: {together:?}, a round trip: {round_trip:?}"
    );
    assert!(
        round_trip >= Duration::from_millis(100),
        "not through the proxy: {round_trip:?}"
    );
    assert_eq!(outbox.pending().await, 2);
    outbox.drop_schema().await;
}
