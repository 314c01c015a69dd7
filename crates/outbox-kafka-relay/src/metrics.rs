//! Metric names and recording, through the `metrics` facade: nothing is recorded unless the
//! application installs a recorder (the `outbox` daemon installs a Prometheus one).

use std::time::Duration;

use metrics::{counter, gauge, histogram};

/// Messages acknowledged by Kafka, by topic.
pub const PUBLISHED: &str = "outbox_messages_published_total";
/// Failed delivery attempts, by topic and whether the error is retriable.
pub const FAILED: &str = "outbox_delivery_failures_total";
/// Seconds from the message's insert to Kafka's acknowledgement.
pub const PUBLISH_LATENCY: &str = "outbox_publish_latency_seconds";
/// Pending messages.
pub const BACKLOG: &str = "outbox_backlog_messages";
/// Age of the oldest pending message, in seconds.
pub const OLDEST_PENDING: &str = "outbox_oldest_pending_age_seconds";
/// 1 while this relay holds the lease.
pub const LEASE_HELD: &str = "outbox_lease_held";
/// Lease terms acquired.
pub const LEASE_ACQUIRED: &str = "outbox_lease_acquired_total";
/// Lease terms lost (expired or taken over while held).
pub const LEASE_LOST: &str = "outbox_lease_lost_total";
/// Back-offs after failures.
pub const RETRIES: &str = "outbox_retries_total";
/// Retention cleanup runs, and rows they deleted.
pub const CLEANUP_RUNS: &str = "outbox_cleanup_runs_total";
/// Rows deleted by retention cleanup.
pub const CLEANUP_DELETED: &str = "outbox_cleanup_deleted_total";
/// Messages in librdkafka's queue (librdkafka statistics).
pub const PRODUCER_QUEUE_MESSAGES: &str = "outbox_producer_queue_messages";
/// Bytes in librdkafka's queue (librdkafka statistics).
pub const PRODUCER_QUEUE_BYTES: &str = "outbox_producer_queue_bytes";
/// Pending messages held after a failed delivery.
pub const HELD: &str = "outbox_held_messages";
/// Messages in the dead-letter table.
pub const DEAD_LETTERS: &str = "outbox_dead_letters";
/// Messages moved to the dead-letter table by this relay.
pub const DEAD_LETTERED: &str = "outbox_dead_lettered_total";
/// Age of the oldest snapshot another session of the database holds, in seconds (0: none).
/// While it is held, completed messages leave index entries that every claim walks over.
pub const OLDEST_SNAPSHOT: &str = "outbox_oldest_snapshot_age_seconds";
/// Seconds each batch waited for standbys to flush its WAL (`wait_for_standbys`).
pub const STANDBY_WAIT: &str = "outbox_standby_wait_seconds";
/// Kafka transactions of exactly-once delivery, by outcome: `committed`, `aborted`.
pub const TRANSACTIONS: &str = "outbox_transactions_total";
/// 1 while the relay is ready (see `health`).
pub const READY: &str = "outbox_ready";

/// Every series whose labels are known at start, at zero: a counter that first appears with its
/// first event hides that event from `rate()` and `increase()`, and a dashboard or alert on it
/// has nothing to show until then. (Series labelled by topic appear with their topic.)
pub(crate) fn register(lease: &str) {
    for name in [LEASE_ACQUIRED, LEASE_LOST] {
        counter!(name, "lease" => lease.to_owned()).increment(0);
    }
    for name in [RETRIES, CLEANUP_RUNS, CLEANUP_DELETED, DEAD_LETTERED] {
        counter!(name).increment(0);
    }
    for outcome in ["committed", "aborted"] {
        counter!(TRANSACTIONS, "outcome" => outcome).increment(0);
    }
    lease_held(lease, false);
    ready(false);
}

pub(crate) fn oldest_snapshot(age: Option<Duration>) {
    gauge!(OLDEST_SNAPSHOT).set(age.map_or(0.0, |d| d.as_secs_f64()));
}

pub(crate) fn published(topic: &str, count: u64) {
    counter!(PUBLISHED, "topic" => topic.to_owned()).increment(count);
}

pub(crate) fn failed(topic: &str, retriable: bool) {
    counter!(FAILED, "topic" => topic.to_owned(), "retriable" => retriable.to_string())
        .increment(1);
}

pub(crate) fn transaction(committed: bool) {
    let outcome = if committed { "committed" } else { "aborted" };
    counter!(TRANSACTIONS, "outcome" => outcome).increment(1);
}

pub(crate) fn standby_wait(waited: Duration) {
    histogram!(STANDBY_WAIT).record(waited.as_secs_f64());
}

pub(crate) fn publish_latency(latency: Duration) {
    histogram!(PUBLISH_LATENCY).record(latency.as_secs_f64());
}

pub(crate) fn backlog(pending: i64, oldest: Option<Duration>, held: i64, dead_letters: i64) {
    gauge!(BACKLOG).set(pending as f64);
    gauge!(HELD).set(held as f64);
    gauge!(DEAD_LETTERS).set(dead_letters as f64);
    gauge!(OLDEST_PENDING).set(oldest.map_or(0.0, |d| d.as_secs_f64()));
}

pub(crate) fn lease_held(lease: &str, held: bool) {
    gauge!(LEASE_HELD, "lease" => lease.to_owned()).set(if held { 1.0 } else { 0.0 });
}

pub(crate) fn lease_acquired(lease: &str) {
    counter!(LEASE_ACQUIRED, "lease" => lease.to_owned()).increment(1);
}

pub(crate) fn lease_lost(lease: &str) {
    counter!(LEASE_LOST, "lease" => lease.to_owned()).increment(1);
}

pub(crate) fn dead_lettered(count: u64) {
    counter!(DEAD_LETTERED).increment(count);
}

pub(crate) fn retry() {
    counter!(RETRIES).increment(1);
}

pub(crate) fn cleanup(deleted: u64) {
    counter!(CLEANUP_RUNS).increment(1);
    counter!(CLEANUP_DELETED).increment(deleted);
}

pub(crate) fn producer_queue(messages: u64, bytes: u64) {
    gauge!(PRODUCER_QUEUE_MESSAGES).set(messages as f64);
    gauge!(PRODUCER_QUEUE_BYTES).set(bytes as f64);
}

pub(crate) fn ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}
