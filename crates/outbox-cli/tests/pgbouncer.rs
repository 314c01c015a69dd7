//! The `outbox` command through Debian's PgBouncer (started by `dev/up`) in transaction pooling
//! mode, as scripts and operators reach a database that sits behind one.

use std::process::{Command, Output, Stdio};

use outbox_test_support::{kafka_bootstrap_servers, pgbouncer_transaction_url, TestOutbox};

fn outbox_cmd(schema: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
        .env("DATABASE_URL", pgbouncer_transaction_url())
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap_servers())
        .env("OUTBOX_SCHEMA", schema)
        .env_remove("OUTBOX_CONFIG")
        .env_remove("OUTBOX_DATABASE_URL")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the outbox binary")
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Five processes enqueueing at once: each command's transaction may land on any server
/// connection, one another process's statements were just prepared on (before, 27 of 50 failed
/// with `prepared statement "sqlx_s_1" already exists`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_from_five_processes_through_a_transaction_pooler_saves_every_message() {
    let outbox = TestOutbox::new().await;
    let schema = outbox.schema.to_string();
    let processes: Vec<_> = (0..5)
        .map(|process| {
            let schema = schema.clone();
            std::thread::spawn(move || {
                for n in 0..10 {
                    let payload = format!("{process}-{n}");
                    let output = outbox_cmd(
                        &schema,
                        &["enqueue", "--topic", "things", "--key", "k", &payload],
                    );
                    assert_success(&output, &format!("enqueue {payload}"));
                }
            })
        })
        .collect();
    for process in processes {
        process.join().unwrap();
    }
    assert_eq!(outbox.pending().await, 50);
    outbox.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_work_through_a_transaction_pooler() {
    let outbox = TestOutbox::unmigrated().await;
    let schema = outbox.schema.to_string();
    assert_success(&outbox_cmd(&schema, &["migrate"]), "migrate");
    assert_success(&outbox_cmd(&schema, &["migrate"]), "migrate again");
    assert_success(
        &outbox_cmd(&schema, &["enqueue", "--topic", "things", "x"]),
        "enqueue",
    );
    let status = outbox_cmd(&schema, &["status", "--json"]);
    assert_success(&status, "status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["pending"], 1, "{status}");
    assert_success(&outbox_cmd(&schema, &["status"]), "status");
    assert_success(
        &outbox_cmd(&schema, &["dead-letters", "list"]),
        "dead-letters list",
    );
    assert_success(
        &outbox_cmd(&schema, &["cleanup", "--retention-hours", "1"]),
        "cleanup",
    );
    assert_success(
        &outbox_cmd(&schema, &["republish", "--from-id", "1", "--yes"]),
        "republish",
    );
    outbox.drop_schema().await;
}

/// The relay needs sessions of its own; through a pooler in transaction mode it stops at once
/// and says what to do, instead of retrying with session settings that would reach other
/// clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_command_refuses_a_transaction_pooler() {
    let outbox = TestOutbox::new().await;
    let output = outbox_cmd(outbox.schema.as_str(), &["relay"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("pooler in transaction mode") && stderr.contains("session mode"),
        "{stderr}"
    );
    outbox.drop_schema().await;
}
