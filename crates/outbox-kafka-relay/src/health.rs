//! Health: what `/health/ready` and `outbox status` report about a running relay.
//!
//! A relay is **ready** while it can reach PostgreSQL and Kafka and, when it holds the lease, is
//! not stalled: a backlog that has not shrunk (no batch completed) for longer than
//! `stall_timeout` while this relay holds the lease marks it not ready, so an orchestrator
//! restarts it and a standby takes over. A standby that can reach both services is ready: it is
//! ready to take over.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
struct State {
    database_ok: bool,
    kafka_ok: bool,
    /// Why Kafka did not answer the last probe, as far as librdkafka said.
    kafka_problem: Option<KafkaProblem>,
    /// Topics Kafka refused the relay's principal to write, and when it last did.
    not_authorized: HashMap<String, Instant>,
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
    /// Exactly-once delivery cannot start its transactions (no transactional id ACL, a broker
    /// without transactions, the progress topic).
    transaction_problem: Option<String>,
}

/// Shared health state, updated by the relay's tasks.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    stall_timeout: Duration,
    /// How long a topic Kafka refused stays reported (see [`Health::not_authorized`]).
    authorization_memory: Duration,
}

/// What keeps Kafka from taking the relay's records.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KafkaProblem {
    /// No broker answers (down, unreachable, a wrong address); librdkafka's last error.
    Unreachable(String),
    /// The brokers refuse the relay's SASL credentials (`sasl.username`, `sasl.password`).
    Authentication(String),
    /// The TLS handshake failed: the broker's certificate is not trusted (`ssl.ca.location`),
    /// expired or for another name, or the broker refused the relay's.
    Tls(String),
    /// Kafka refuses the relay's principal to write this topic: an ACL is missing. The topic's
    /// messages are held (or dead-lettered, by the poison policy); other topics flow.
    NotAuthorized {
        /// The topic.
        topic: String,
    },
}

impl fmt::Display for KafkaProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detail = |detail: &str| match detail {
            "" => String::new(),
            detail => format!(": {detail}"),
        };
        match self {
            KafkaProblem::Unreachable(why) => write!(f, "Kafka is unreachable{}", detail(why)),
            KafkaProblem::Authentication(why) => write!(
                f,
                "Kafka refuses the relay's credentials (check sasl.username and sasl.password){}",
                detail(why)
            ),
            KafkaProblem::Tls(why) => write!(
                f,
                "the TLS handshake with Kafka fails (check ssl.ca.location and the broker's certificate){}",
                detail(why)
            ),
            KafkaProblem::NotAuthorized { topic } => write!(
                f,
                "Kafka refuses the relay's principal to write topic {topic:?} (a missing ACL); its messages are held"
            ),
        }
    }
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
    /// What keeps Kafka from taking the relay's records: why it does not answer, and the
    /// topics it refuses the relay's principal to write.
    pub kafka_problems: Vec<KafkaProblem>,
    /// Pending messages at the last sample.
    pub backlog: Option<i64>,
    /// Age of the oldest pending message at the last sample.
    pub oldest_pending_age: Option<Duration>,
    /// Time since this relay last completed a batch.
    pub since_last_publish: Option<Duration>,
}

impl Health {
    pub(crate) fn new(stall_timeout: Duration, backoff_max: Duration) -> Self {
        Health {
            state: Mutex::new(State {
                database_ok: false,
                kafka_ok: false,
                kafka_problem: None,
                not_authorized: HashMap::new(),
                leader: false,
                backlog: None,
                oldest_pending_age: None,
                last_progress: Instant::now(),
                last_publish: None,
                schema_problem: None,
                lease_problem: None,
                session_problem: None,
                standby_problem: None,
                transaction_problem: None,
            }),
            stall_timeout,
            authorization_memory: backoff_max * 2 + Duration::from_secs(1),
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

    pub(crate) fn transaction_problem(&self, reason: Option<String>) {
        self.update(|s| s.transaction_problem = reason);
    }

    pub(crate) fn standby_problem(&self, reason: Option<String>) {
        self.update(|s| s.standby_problem = reason);
    }

    /// The probe's outcome: `None` when Kafka answered.
    pub(crate) fn kafka(&self, problem: Option<KafkaProblem>) {
        self.update(|s| {
            s.kafka_ok = problem.is_none();
            s.kafka_problem = problem;
        });
    }

    /// Kafka refused to let the relay's principal write `topic` (a missing ACL). Reported while
    /// it keeps happening: a held message is retried at least every `backoff_max`, so a refusal
    /// older than twice that is one an operator fixed (or whose message was set aside).
    pub(crate) fn not_authorized(&self, topic: &str) {
        self.update(|s| {
            s.not_authorized.insert(topic.to_owned(), Instant::now());
        });
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
            &s.transaction_problem,
        ]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
        if !s.database_ok {
            reasons.push("PostgreSQL is unreachable".to_owned());
        }
        let mut kafka_problems: Vec<KafkaProblem> = s.kafka_problem.iter().cloned().collect();
        if !s.kafka_ok && s.kafka_problem.is_none() {
            kafka_problems.push(KafkaProblem::Unreachable(String::new()));
        }
        let mut refused: Vec<&String> = s
            .not_authorized
            .iter()
            .filter(|(_, at)| at.elapsed() <= self.authorization_memory)
            .map(|(topic, _)| topic)
            .collect();
        refused.sort();
        kafka_problems.extend(
            refused
                .into_iter()
                .map(|topic| KafkaProblem::NotAuthorized {
                    topic: topic.clone(),
                }),
        );
        reasons.extend(kafka_problems.iter().map(ToString::to_string));
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
            kafka_problems,
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
        let health = Health::new(Duration::ZERO, Duration::from_secs(1));
        health.database(true);
        health.kafka(None);
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
        let health = Health::new(Duration::from_secs(60), Duration::from_secs(30));
        health.database(true);
        let report = health.report();
        assert!(!report.ready);
        assert_eq!(report.reasons, ["Kafka is unreachable"]);
    }
}
