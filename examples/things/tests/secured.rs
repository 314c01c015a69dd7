//! The demo end to end against `dev/up`'s SASL_SSL listener: the service's relay and the
//! consumer each as its own Kafka user, with only what their ACLs grant; the consumer's read
//! model must equal the service's table, as in `dev/demo`.

use std::process::Command;

#[test]
fn the_demo_runs_over_sasl_ssl_with_each_users_rights() {
    let output = Command::new(env!("CARGO_BIN_EXE_things-demo"))
        .args(["--secured", "--commands", "100"])
        .output()
        .expect("run things-demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("read model == service table yes"),
        "{stdout}"
    );
    // The service and the consumer said where they reached Kafka; neither logged a password.
    let logs = stdout
        .lines()
        .find_map(|line| line.split("logs in ").nth(1))
        .expect("the demo names its log directory");
    let service = std::fs::read_to_string(format!("{logs}/things-service.log")).unwrap();
    let consumer = std::fs::read_to_string(format!("{logs}/things-consumer.log")).unwrap();
    assert!(service.contains("SASL_SSL as outbox-relay"), "{service}");
    assert!(
        consumer.contains("SASL_SSL as outbox-consumer"),
        "{consumer}"
    );
    for log in [&service, &consumer] {
        assert!(!log.contains("dev-only-"), "a password reached the logs");
    }
}
