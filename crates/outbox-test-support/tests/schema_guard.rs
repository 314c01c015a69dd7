//! A failed test's schema is dropped, against the real PostgreSQL started by `dev/up`.

use outbox::Message;
use outbox_test_support::{pool, TestOutbox};
use tokio::runtime::{Builder, Runtime};

/// Runs a test body that fails while a task of its own holds a transaction open in its schema
/// (locks the drop has to get past, held by a session the blocked runtime never ends), on
/// `runtime` as `#[tokio::test]` would; returns the schema's name.
fn run_failing_test(runtime: fn() -> Runtime) -> String {
    let (name_tx, name_rx) = std::sync::mpsc::channel();
    let failed = std::thread::spawn(move || {
        runtime().block_on(async {
            let outbox = TestOutbox::new().await;
            name_tx.send(outbox.schema.to_string()).unwrap();
            let (pool, writer) = (outbox.pool.clone(), outbox.outbox.clone());
            let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let mut open = pool.begin().await.unwrap();
                writer
                    .save_for_publishing(&mut open, Message::new("t", "never committed"))
                    .await
                    .unwrap();
                locked_tx.send(()).unwrap();
                std::future::pending::<()>().await;
            });
            locked_rx.await.unwrap();
            panic!("the test fails before drop_schema");
        })
    })
    .join();
    assert!(failed.is_err(), "the test body did not fail");
    name_rx.recv().expect("the test body created its schema")
}

async fn schema_exists(name: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)")
        .bind(name)
        .fetch_one(&pool().await)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_failed_tests_schema_is_dropped_on_a_current_thread_runtime() {
    let schema = run_failing_test(|| Builder::new_current_thread().enable_all().build().unwrap());
    assert!(!schema_exists(&schema).await, "{schema} is still there");
}

#[tokio::test]
async fn a_failed_tests_schema_is_dropped_on_a_multi_thread_runtime() {
    let schema = run_failing_test(|| {
        Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    });
    assert!(!schema_exists(&schema).await, "{schema} is still there");
}

#[tokio::test]
async fn drop_schema_drops_it_once() {
    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.to_string();
    outbox.drop_schema().await;
    assert!(!schema_exists(&schema).await, "{schema} is still there");
}
