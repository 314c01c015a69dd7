//! Health: what `/health/ready` and `outbox status` report about a running relay.
//!
//! A relay is **ready** while it can reach PostgreSQL and Kafka and, when it holds the lease, is
//! not stalled: a backlog that has not shrunk (no batch completed) for longer than
//! `stall_timeout` while this relay holds the lease marks it not ready, so an orchestrator
//! restarts it and a standby takes over. A standby that can reach both services is ready: it is
//! ready to take over.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
struct State {
    database_ok: bool,
    kafka_ok: bool,
    leader: bool,
    backlog: Option<i64>,
    oldest_pending_age: Option<Duration>,
    /// Last time a batch was completed, or the backlog was found empty.
    last_progress: Instant,
    last_publish: Option<Instant>,
    /// Setup problems that keep the relay from publishing: the schema is not migrated, another
    /// lease name holds the outbox.
    schema_problem: Option<String>,
    lease_problem: Option<String>,
    /// The relay's sessions would not be its own (a pooler in transaction mode).
    session_problem: Option<String>,
    /// Publishing waits for standbys (`wait_for_standbys`).
    standby_problem: Option<String>,
}

/// Shared health state, updated by the relay's tasks.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    stall_timeout: Duration,
}

/// A snapshot of the relay's health.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HealthReport {
    /// Whether the relay should receive traffic / be left running.
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub reasons: Vec<String>,
    /// Whether this relay holds the lease.
    pub leader: bool,
    /// The last database interaction succeeded.
    pub database_ok: bool,
    /// Kafka answered the last metadata request.
    pub kafka_ok: bool,
    /// Pending messages at the last sample.
    pub backlog: Option<i64>,
    /// Age of the oldest pending message at the last sample.
    pub oldest_pending_age: Option<Duration>,
    /// Time since this relay last completed a batch.
    pub since_last_publish: Option<Duration>,
}

impl Health {
    pub(crate) fn new(stall_timeout: Duration) -> Self {
        Health {
            state: Mutex::new(State {
                database_ok: false,
                kafka_ok: false,
                leader: false,
                backlog: None,
                oldest_pending_age: None,
                last_progress: Instant::now(),
                last_publish: None,
                schema_problem: None,
                lease_problem: None,
                session_problem: None,
                standby_problem: None,
            }),
            stall_timeout,
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub(crate) fn database(&self, ok: bool) {
        self.update(|s| s.database_ok = ok);
    }

    pub(crate) fn schema_problem(&self, reason: Option<String>) {
        self.update(|s| s.schema_problem = reason);
    }

    pub(crate) fn lease_problem(&self, reason: Option<String>) {
        self.update(|s| s.lease_problem = reason);
    }

    pub(crate) fn session_problem(&self, reason: Option<String>) {
        self.update(|s| s.session_problem = reason);
    }

    pub(crate) fn standby_problem(&self, reason: Option<String>) {
        self.update(|s| s.standby_problem = reason);
    }

    pub(crate) fn kafka(&self, ok: bool) {
        self.update(|s| s.kafka_ok = ok);
    }

    pub(crate) fn leader(&self, leader: bool) {
        self.update(|s| {
            if leader && !s.leader {
                // A new term starts its stall clock afresh.
                s.last_progress = Instant::now();
            }
            s.leader = leader;
        });
    }

    pub(crate) fn backlog(&self, pending: i64, oldest: Option<Duration>) {
        self.update(|s| {
            s.backlog = Some(pending);
            s.oldest_pending_age = oldest;
            s.database_ok = true;
        });
    }

    /// A batch was completed (`published`) or the backlog was found empty.
    pub(crate) fn progress(&self, published: bool) {
        self.update(|s| {
            let now = Instant::now();
            s.last_progress = now;
            if published {
                s.last_publish = Some(now);
            }
        });
    }

    /// The current report.
    pub fn report(&self) -> HealthReport {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut reasons: Vec<String> = [
            &s.schema_problem,
            &s.lease_problem,
            &s.session_problem,
            &s.standby_problem,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        if !s.database_ok {
            reasons.push("PostgreSQL is unreachable".to_owned());
        }
        if !s.kafka_ok {
            reasons.push("Kafka is unreachable".to_owned());
        }
        let stalled_for = s.last_progress.elapsed();
        if s.leader && s.backlog.unwrap_or(0) > 0 && stalled_for > self.stall_timeout {
            reasons.push(format!(
                "stalled: holding the lease with {} pending messages and nothing published for {:.0}s",
                s.backlog.unwrap_or(0),
                stalled_for.as_secs_f64()
            ));
        }
        HealthReport {
            ready: reasons.is_empty(),
            reasons,
            leader: s.leader,
            database_ok: s.database_ok,
            kafka_ok: s.kafka_ok,
            backlog: s.backlog,
            oldest_pending_age: s.oldest_pending_age,
            since_last_publish: s.last_publish.map(|t| t.elapsed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_with_a_backlog_and_no_progress_is_stalled() {
        let health = Health::new(Duration::ZERO);
        health.database(true);
        health.kafka(true);
        assert!(
            health.report().ready,
            "a standby that reaches both services is ready"
        );
        health.leader(true);
        health.backlog(10, Some(Duration::from_secs(1)));
        std::thread::sleep(Duration::from_millis(5));
        let report = health.report();
        assert!(!report.ready);
        assert!(
            report.reasons[0].starts_with("stalled"),
            "{:?}",
            report.reasons
        );
        health.backlog(0, None);
        assert!(health.report().ready, "an empty backlog is no stall");
    }

    #[test]
    fn unreachable_services_make_it_not_ready() {
        let health = Health::new(Duration::from_secs(60));
        health.database(true);
        let report = health.report();
        assert!(!report.ready);
        assert_eq!(report.reasons, ["Kafka is unreachable"]);
    }
}
