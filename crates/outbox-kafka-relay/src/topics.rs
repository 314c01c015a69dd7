//! What the relay knows of the cluster's topics: which exist, which of their partitions have no
//! leader, and each one's size limit (`max.message.bytes`).
//!
//! Learned in the background, at most once a second for the listing, so that a slow or partly
//! dead cluster never holds up publishing (describing a topic through a dead broker waits for
//! its timeout). Until an answer arrives, a topic counts as existing and without a known limit,
//! which is how the relay behaved before it knew anything.

use std::collections::{HashMap, HashSet};

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, OwnedResourceSpecifier, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::kafka::KafkaConfig;

/// How often, at most, the relay lists the cluster's topics.
const LISTING_INTERVAL: Duration = Duration::from_secs(1);
/// How long a listing or a description may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A listing older than this is renewed when asked about a topic (leaders move).
const LISTING_MAX_AGE: Duration = Duration::from_secs(10);

/// What is known of one topic, for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Topic {
    /// The last listing of the cluster did not have it.
    pub(crate) unlisted: bool,
    /// Its `max.message.bytes`, once described.
    pub(crate) limit: Option<usize>,
    /// The partition the message's key goes to had no leader at the last listing.
    pub(crate) no_leader: Option<i32>,
    /// For a message without a key, when some partition has no leader: one that has.
    pub(crate) partition: Option<i32>,
}

#[derive(Default)]
struct State {
    /// The cluster's topics at the last listing (`None`: not listed yet, or it failed), each
    /// with whether each of its partitions has a leader.
    listed: Option<HashMap<String, Vec<bool>>>,
    listed_at: Option<Instant>,
    /// Some partition had no leader at the last listing: list again soon.
    leaderless: bool,
    /// Described topics' limits (`usize::MAX` when the description failed).
    limits: HashMap<String, usize>,
    /// A listing or these descriptions were asked for and are not done yet.
    listing_asked: bool,
    describing: HashSet<String>,
}

/// The cluster's topics as last learned; cheap to query.
pub(crate) struct Topics {
    state: Arc<Mutex<State>>,
    list_asks: mpsc::UnboundedSender<()>,
    describe_asks: mpsc::UnboundedSender<String>,
    /// Keys are partitioned as Java's producer does (`murmur2_random`), so the relay knows a
    /// keyed message's partition before sending it.
    murmur2: bool,
    /// Becomes true once the first listing was tried.
    tried: watch::Receiver<bool>,
    /// Counts the descriptions that landed.
    described: watch::Receiver<u64>,
}

impl Topics {
    /// Starts learning in the background, on the current Tokio runtime; the tasks end when
    /// this is dropped.
    pub(crate) fn start(config: &KafkaConfig) -> Result<Self, KafkaError> {
        let admin: AdminClient<DefaultClientContext> = config.metadata_client_config().create()?;
        let state = Arc::new(Mutex::new(State {
            listing_asked: true,
            ..State::default()
        }));
        let admin = Arc::new(admin);
        let (list_asks, asked) = mpsc::unbounded_channel();
        let _ = list_asks.send(());
        let (tried_tx, tried) = watch::channel(false);
        tokio::spawn(list(admin.clone(), state.clone(), asked, tried_tx));
        let (describe_asks, asked) = mpsc::unbounded_channel();
        let (described_tx, described) = watch::channel(0);
        tokio::spawn(describe(admin, state.clone(), asked, described_tx));
        let murmur2 = config.get("partitioner") == Some("murmur2_random");
        Ok(Topics {
            state,
            list_asks,
            describe_asks,
            tried,
            described,
            murmur2,
        })
    }

    /// Waits (at most `timeout`) until the first listing was tried, so that a relay that starts
    /// with a backlog already knows which of its topics exist.
    pub(crate) async fn first_listing(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.tried.wait_for(|tried| *tried)).await;
    }

    /// Waits (at most `timeout`) until the size limits of those of `topics` that are listed are
    /// known, asking for them: with exactly-once delivery, a record over its topic's limit
    /// must be known as such before it joins a transaction (see [`Publisher::send`](crate::kafka::Publisher::send)).
    pub(crate) async fn limits(&mut self, topics: &[&str], timeout: Duration) {
        for topic in topics {
            self.get(topic, None);
        }
        let state = self.state.clone();
        let known = move |_: &u64| {
            let state = state.lock().unwrap_or_else(|e| e.into_inner());
            topics.iter().all(|topic| {
                state.limits.contains_key(*topic)
                    || state
                        .listed
                        .as_ref()
                        .is_none_or(|l| !l.contains_key(*topic))
            })
        };
        let _ = tokio::time::timeout(timeout, self.described.wait_for(known)).await;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What is known of `topic` for a message with `key`; asks for what is not known yet.
    pub(crate) fn get(&self, topic: &str, key: Option<&[u8]>) -> Topic {
        let mut state = self.state();
        // Decided on the borrowed listing first: nothing is copied per message.
        let (listed, no_leader, partition) = match &state.listed {
            None => (None, None, None),
            Some(listed) => match listed.get(topic) {
                None => (Some(false), None, None),
                Some(leaders) => {
                    let (no_leader, partition) = self.route(leaders, key);
                    (Some(true), no_leader, partition)
                }
            },
        };
        let max_age = match state.leaderless {
            true => LISTING_INTERVAL,
            false => LISTING_MAX_AGE,
        };
        let stale = state.listed_at.is_none_or(|at| at.elapsed() > max_age);
        if (stale || listed != Some(true)) && !state.listing_asked {
            state.listing_asked = true;
            let _ = self.list_asks.send(());
        }
        let limit = state.limits.get(topic).copied();
        if listed == Some(true) && limit.is_none() && state.describing.insert(topic.to_owned()) {
            let _ = self.describe_asks.send(topic.to_owned());
        }
        Topic {
            unlisted: listed == Some(false),
            limit,
            no_leader,
            partition,
        }
    }

    /// Where a message with `key` goes, when a partition of its topic has no leader (`leaders`
    /// by partition): its key's partition if that one has none, or, without a key, a partition
    /// that has one.
    fn route(&self, leaders: &[bool], key: Option<&[u8]>) -> (Option<i32>, Option<i32>) {
        if leaders.iter().all(|has| *has) {
            return (None, None);
        }
        match key {
            Some(key) if self.murmur2 => {
                let p = java_partition(key, leaders.len());
                ((!leaders[p]).then_some(p as i32), None)
            }
            Some(_) => (None, None),
            None => {
                let available: Vec<usize> = (0..leaders.len()).filter(|p| leaders[*p]).collect();
                if available.is_empty() {
                    return (None, None);
                }
                let pick = available[rand::random_range(0..available.len())];
                (None, Some(pick as i32))
            }
        }
    }

    /// Something is not acknowledged in time: learn the cluster's topics and leaders again
    /// (at most once a second).
    pub(crate) fn refresh(&self) {
        let mut state = self.state();
        if !state.listing_asked {
            state.listing_asked = true;
            let _ = self.list_asks.send(());
        }
    }

    /// Topics found to exist by publishing to them (created on first use): listed from now
    /// on (their partitions are learned at the next listing).
    pub(crate) fn created(&self, topics: &[String]) {
        if let Some(listed) = &mut self.state().listed {
            for topic in topics {
                listed.entry(topic.clone()).or_default();
            }
        }
    }
}

/// Lists the cluster's topics when asked, at most once per `LISTING_INTERVAL`.
async fn list(
    admin: Arc<AdminClient<DefaultClientContext>>,
    state: Arc<Mutex<State>>,
    mut asks: mpsc::UnboundedReceiver<()>,
    tried: watch::Sender<bool>,
) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let mut listed_at: Option<Instant> = None;
    while asks.recv().await.is_some() {
        while asks.try_recv().is_ok() {}
        if let Some(at) = listed_at {
            tokio::time::sleep_until(at + LISTING_INTERVAL).await;
        }
        let client = admin.clone();
        let listing = tokio::task::spawn_blocking(move || {
            client
                .inner()
                .fetch_metadata(None, REQUEST_TIMEOUT)
                .map(|metadata| {
                    metadata
                        .topics()
                        .iter()
                        .filter(|t| t.error().is_none())
                        .map(|t| {
                            let mut partitions: Vec<_> = t.partitions().iter().collect();
                            partitions.sort_by_key(|p| p.id());
                            let leaders = partitions.iter().map(|p| p.leader() >= 0).collect();
                            (t.name().to_owned(), leaders)
                        })
                        .collect::<HashMap<_, _>>()
                })
        })
        .await;
        listed_at = Some(Instant::now());
        let mut state = lock();
        state.listing_asked = false;
        state.listed_at = listed_at;
        match listing {
            Ok(Ok(topics)) => {
                state.leaderless = topics.values().flatten().any(|has: &bool| !has);
                state.listed = Some(topics);
            }
            Ok(Err(error)) => tracing::debug!(%error, "cannot list the cluster's topics"),
            Err(_) => {}
        }
        drop(state);
        tried.send_replace(true);
    }
}

/// Describes the topics asked for, without waiting for a listing's interval: with exactly-once
/// delivery a batch waits for its topics' limits.
async fn describe(
    admin: Arc<AdminClient<DefaultClientContext>>,
    state: Arc<Mutex<State>>,
    mut asks: mpsc::UnboundedReceiver<String>,
    described: watch::Sender<u64>,
) {
    while let Some(first) = asks.recv().await {
        let mut topics = vec![first];
        while let Ok(topic) = asks.try_recv() {
            topics.push(topic);
        }
        let limits = describe_limits(&admin, &topics).await;
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        for topic in topics {
            state.describing.remove(&topic);
            // A topic this relay may not describe: no limit known, nothing predicted.
            let limit = limits.get(&topic).copied().unwrap_or(usize::MAX);
            state.limits.insert(topic, limit);
        }
        drop(state);
        described.send_modify(|count| *count += 1);
    }
}

/// The `max.message.bytes` of each of `topics` that could be described.
async fn describe_limits(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[String],
) -> HashMap<String, usize> {
    let resources: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let options = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let Ok(results) = admin.describe_configs(&resources, &options).await else {
        return HashMap::new();
    };
    results
        .into_iter()
        .flatten()
        .filter_map(|resource| {
            let OwnedResourceSpecifier::Topic(topic) = &resource.specifier else {
                return None;
            };
            let limit = resource
                .get("max.message.bytes")?
                .value
                .as_deref()?
                .parse()
                .ok()?;
            Some((topic.clone(), limit))
        })
        .collect()
}

/// The partition Java's producer (and librdkafka's `murmur2_random`) gives a key:
/// `toPositive(murmur2(key)) % partitions` (Kafka's `Utils.murmur2`).
fn java_partition(key: &[u8], partitions: usize) -> usize {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    let mut h = SEED ^ key.len() as u32;
    let mut words = key.chunks_exact(4);
    for word in &mut words {
        let mut k = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        h = h.wrapping_mul(M) ^ k.wrapping_mul(M);
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, byte) in tail.iter().enumerate() {
            h ^= u32::from(*byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    (h & 0x7fff_ffff) as usize % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kafka's own vectors (`UtilsTest.testMurmur2`), as partitions of 2^31 - 1 would not
    /// show them: compare the positive hash.
    #[test]
    fn keys_are_partitioned_as_javas_producer_does() {
        for (key, murmur2) in [
            (&b"21"[..], -973_932_308_i32),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ] {
            let positive = (murmur2 & 0x7fff_ffff) as usize;
            assert_eq!(
                java_partition(key, usize::MAX),
                positive % usize::MAX,
                "{key:?}"
            );
            assert_eq!(java_partition(key, 6), positive % 6, "{key:?}");
        }
    }
}
