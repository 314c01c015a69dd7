//! Fault-injection support: a ledger of what writers committed or rolled back, checked against
//! what Kafka holds, and the report lines that `dev/chaos` renders into docs/reliability.md.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox::{Message, Outbox};
use sqlx::PgPool;

use crate::TopicReader;

/// What a fault-injection run wrote: committed messages (by sequence), rolled-back payloads, and
/// commits whose outcome is unknown (the connection failed during COMMIT).
#[derive(Default)]
pub struct Ledger {
    committed: BTreeMap<i64, (String, String)>,
    /// Every commit the database acknowledged, in order: after a failover the promoted primary
    /// may hand a sequence out again, which `committed` then holds for the later message only.
    acknowledged: Vec<(i64, String)>,
    rolled_back: HashSet<String>,
    uncertain: HashSet<String>,
}

/// The figures a run reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    /// Messages committed.
    pub committed: usize,
    /// Messages written in transactions that rolled back.
    pub rolled_back: usize,
    /// Committed messages missing from Kafka.
    pub lost: usize,
    /// Rolled-back messages found in Kafka.
    pub rolled_back_published: usize,
    /// First deliveries out of per-key sequence order.
    pub order_violations: usize,
    /// Redeliveries (at-least-once allows them).
    pub duplicates: usize,
    /// After a failover: published messages the promoted primary does not have (an event
    /// whose data does not exist); `None` where no failover happened.
    pub phantoms: Option<usize>,
}

impl Ledger {
    /// Shared, for writer tasks.
    pub fn shared() -> Arc<Mutex<Ledger>> {
        Arc::new(Mutex::new(Ledger::default()))
    }

    /// Compares what Kafka holds with what was written.
    pub fn verify(&self, reader: &TopicReader) -> Figures {
        let mut seen = HashSet::new();
        let mut last_first: HashMap<String, i64> = HashMap::new();
        let mut figures = Figures {
            committed: self.committed.len(),
            rolled_back: self.rolled_back.len(),
            ..Figures::default()
        };
        for record in &reader.received {
            let payload = record.payload_str().to_owned();
            if self.rolled_back.contains(&payload) {
                figures.rolled_back_published += 1;
            }
            let sequence = record.sequence();
            // Order and duplicates among committed messages; anything else (rolled back,
            // phantoms after a failover) is counted on its own.
            if self.committed.get(&sequence).map(|(_, p)| p) != Some(&payload) {
                continue;
            }
            if !seen.insert(sequence) {
                figures.duplicates += 1;
                continue;
            }
            let key = record.key_str().to_owned();
            if let Some(previous) = last_first.insert(key, sequence) {
                if previous > sequence {
                    figures.order_violations += 1;
                }
            }
        }
        figures.lost = self
            .committed
            .len()
            .saturating_sub(self.received_of(reader));
        figures
    }

    /// How many committed messages were received, each matched by sequence and payload (after
    /// a failover, the promoted primary may hand out a sequence again, to another message).
    fn received_of(&self, reader: &TopicReader) -> usize {
        let seen: HashSet<(i64, &str)> = reader
            .received
            .iter()
            .map(|r| (r.sequence(), r.payload_str()))
            .collect();
        self.committed
            .iter()
            .filter(|(sequence, (_, payload))| seen.contains(&(**sequence, payload.as_str())))
            .count()
    }

    /// What the database at `pool` holds of this run, as a ledger: its committed messages are
    /// the rows of `schema`'s `message` and `published` tables (after a failover, the promoted
    /// primary's), its rolled-back ones this ledger's.
    pub async fn as_committed_in(&self, pool: &PgPool, schema: &str) -> Ledger {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(&format!(
            "SELECT id, convert_from(key, 'UTF8'), convert_from(payload, 'UTF8') FROM {schema}.message
             UNION ALL
             SELECT id, convert_from(key, 'UTF8'), convert_from(payload, 'UTF8') FROM {schema}.published"
        ))
        .fetch_all(pool)
        .await
        .expect("read the committed messages");
        Ledger {
            committed: rows
                .into_iter()
                .map(|(id, key, payload)| (id, (key, payload)))
                .collect(),
            acknowledged: Vec::new(),
            rolled_back: self.rolled_back.clone(),
            uncertain: HashSet::new(),
        }
    }

    /// Commits this ledger recorded (the database acknowledged them) that `truth` does not
    /// hold: lost by the database, as asynchronous replication loses them in a failover.
    pub fn lost_by_the_database(&self, truth: &Ledger) -> usize {
        self.acknowledged
            .iter()
            .filter(|(id, payload)| truth.committed.get(id).map(|(_, p)| p) != Some(payload))
            .count()
    }

    /// Records in Kafka that are no committed message of this ledger (by sequence and payload):
    /// phantom events, when this ledger is what the database holds.
    pub fn phantoms(&self, reader: &TopicReader) -> usize {
        reader
            .received
            .iter()
            .filter(|r| {
                self.committed
                    .get(&r.sequence())
                    .map(|(_, payload)| payload.as_str())
                    != Some(r.payload_str())
            })
            .count()
    }

    /// Of [`Ledger::phantoms`], those whose sequence this ledger has for another message: the
    /// database handed the sequence out again (after a failover lost it).
    pub fn phantoms_with_reused_sequences(&self, reader: &TopicReader) -> usize {
        reader
            .received
            .iter()
            .filter(|r| {
                self.committed
                    .get(&r.sequence())
                    .is_some_and(|(_, payload)| payload != r.payload_str())
            })
            .count()
    }

    /// Every committed sequence has been received at least once.
    pub fn all_received(&self, reader: &TopicReader) -> bool {
        self.received_of(reader) == self.committed.len()
    }

    /// A copy, for checking while writers may still record.
    pub fn clone_committed(&self) -> Ledger {
        Ledger {
            committed: self.committed.clone(),
            acknowledged: self.acknowledged.clone(),
            rolled_back: self.rolled_back.clone(),
            uncertain: self.uncertain.clone(),
        }
    }

    /// Committed messages.
    pub fn committed(&self) -> usize {
        self.committed.len()
    }
}

/// Writes `count` single-message transactions on `keys` keys, one every `pause`, rolling back
/// every `rollback_every`-th; database errors are tolerated (the transaction is retried as a new
/// one; a failed COMMIT is recorded as uncertain). Payloads are `<tag>-<n>`.
#[allow(clippy::too_many_arguments)]
pub async fn write_messages(
    pool: PgPool,
    outbox: Outbox,
    topic: String,
    tag: String,
    count: usize,
    keys: usize,
    pause: Duration,
    rollback_every: usize,
    ledger: Arc<Mutex<Ledger>>,
) {
    for n in 0..count {
        let key = format!("key-{}", n % keys);
        let payload = format!("{tag}-{n}");
        let rollback = rollback_every > 0 && n % rollback_every == rollback_every - 1;
        loop {
            let attempt = async {
                let mut tx = pool.begin().await?;
                let sequence = outbox
                    .save_for_publishing(
                        &mut tx,
                        Message::new(&topic, payload.clone()).key(key.clone()),
                    )
                    .await
                    .map_err(|e| match e {
                        outbox::Error::Database(e) => e,
                        other => panic!("unexpected write error: {other}"),
                    })?;
                Ok::<_, sqlx::Error>((tx, sequence))
            }
            .await;
            let Ok((tx, sequence)) = attempt else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if rollback {
                let _ = tx.rollback().await;
                ledger.lock().unwrap().rolled_back.insert(payload.clone());
            } else {
                match tx.commit().await {
                    Ok(()) => {
                        let mut ledger = ledger.lock().unwrap();
                        ledger
                            .committed
                            .insert(sequence, (key.clone(), payload.clone()));
                        ledger.acknowledged.push((sequence, payload.clone()));
                    }
                    Err(_) => {
                        ledger.lock().unwrap().uncertain.insert(payload.clone());
                    }
                }
            }
            break;
        }
        tokio::time::sleep(pause).await;
    }
}

/// Appends a sentence for the notes under the figures (`dev/chaos` renders it), when
/// `$CHAOS_REPORT_FILE` is set.
pub fn report_note(note: &str) {
    println!("{note}");
    append_report_line(&format!("{{\"note\":{note:?}}}\n"));
}

fn append_report_line(line: &str) {
    let Ok(path) = std::env::var("CHAOS_REPORT_FILE") else {
        return;
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the chaos report");
    file.write_all(line.as_bytes())
        .expect("write the chaos report");
}

/// Appends one scenario's figures as a JSON line to `$CHAOS_REPORT_FILE`, when set (the
/// `dev/chaos` command renders them into docs/reliability.md).
pub fn report(scenario: &str, faults: usize, figures: &Figures, recovery: Option<Duration>) {
    println!("{scenario}: faults {faults}, {figures:?}, recovery {recovery:?}");
    append_report_line(&format!(
        "{{\"scenario\":{:?},\"faults\":{},\"committed\":{},\"rolled_back\":{},\"lost\":{},\"rolled_back_published\":{},\"order_violations\":{},\"duplicates\":{},\"phantoms\":{},\"recovery_ms\":{}}}\n",
        scenario,
        faults,
        figures.committed,
        figures.rolled_back,
        figures.lost,
        figures.rolled_back_published,
        figures.order_violations,
        figures.duplicates,
        figures
            .phantoms
            .map_or("null".to_owned(), |p| p.to_string()),
        recovery.map_or("null".to_owned(), |d| d.as_millis().to_string()),
    ));
}
