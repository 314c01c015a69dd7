//! What the relay knows of the cluster's topics: which exist, and each one's size limit
//! (`max.message.bytes`).
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

/// What is known of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Topic {
    /// The last listing of the cluster did not have it.
    pub(crate) unlisted: bool,
    /// Its `max.message.bytes`, once described.
    pub(crate) limit: Option<usize>,
}

#[derive(Default)]
struct State {
    /// The cluster's topics at the last listing (`None`: not listed yet, or it failed).
    listed: Option<HashSet<String>>,
    /// Described topics' limits (`usize::MAX` when the description failed).
    limits: HashMap<String, usize>,
    /// A listing or these descriptions were asked for and are not done yet.
    listing_asked: bool,
    describing: HashSet<String>,
}

enum Ask {
    List,
    Describe(String),
}

/// The cluster's topics as last learned; cheap to query.
pub(crate) struct Topics {
    state: Arc<Mutex<State>>,
    asks: mpsc::UnboundedSender<Ask>,
    /// Becomes true once the first listing was tried.
    tried: watch::Receiver<bool>,
}

impl Topics {
    /// Starts learning in the background, on the current Tokio runtime; the task ends when
    /// this is dropped.
    pub(crate) fn start(config: &KafkaConfig) -> Result<Self, KafkaError> {
        let admin: AdminClient<DefaultClientContext> = config.metadata_client_config().create()?;
        let state = Arc::new(Mutex::new(State {
            listing_asked: true,
            ..State::default()
        }));
        let (asks, requests) = mpsc::unbounded_channel();
        let _ = asks.send(Ask::List);
        let (tried_tx, tried) = watch::channel(false);
        tokio::spawn(learn(admin, state.clone(), requests, tried_tx));
        Ok(Topics { state, asks, tried })
    }

    /// Waits (at most `timeout`) until the first listing was tried, so that a relay that starts
    /// with a backlog already knows which of its topics exist.
    pub(crate) async fn first_listing(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.tried.wait_for(|tried| *tried)).await;
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What is known of `topic`; asks for what is not known yet.
    pub(crate) fn get(&self, topic: &str) -> Topic {
        let mut state = self.state();
        let listed = state.listed.as_ref().map(|listed| listed.contains(topic));
        if listed != Some(true) && !state.listing_asked {
            state.listing_asked = true;
            let _ = self.asks.send(Ask::List);
        }
        let limit = state.limits.get(topic).copied();
        if listed == Some(true) && limit.is_none() && state.describing.insert(topic.to_owned()) {
            let _ = self.asks.send(Ask::Describe(topic.to_owned()));
        }
        Topic {
            unlisted: listed == Some(false),
            limit,
        }
    }

    /// Topics found to exist by publishing to them (created on first use).
    pub(crate) fn created(&self, topics: &[String]) {
        if let Some(listed) = &mut self.state().listed {
            listed.extend(topics.iter().cloned());
        }
    }
}

async fn learn(
    admin: AdminClient<DefaultClientContext>,
    state: Arc<Mutex<State>>,
    mut asks: mpsc::UnboundedReceiver<Ask>,
    tried: watch::Sender<bool>,
) {
    let admin = Arc::new(admin);
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let mut listed_at: Option<Instant> = None;
    while let Some(first) = asks.recv().await {
        let mut list = false;
        let mut describe = Vec::new();
        let mut ask = Some(first);
        while let Some(next) = ask {
            match next {
                Ask::List => list = true,
                Ask::Describe(topic) => describe.push(topic),
            }
            ask = asks.try_recv().ok();
        }
        if list {
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
                            .map(|t| t.name().to_owned())
                            .collect::<HashSet<_>>()
                    })
            })
            .await;
            listed_at = Some(Instant::now());
            let mut state = lock();
            state.listing_asked = false;
            match listing {
                Ok(Ok(topics)) => state.listed = Some(topics),
                Ok(Err(error)) => tracing::debug!(%error, "cannot list the cluster's topics"),
                Err(_) => {}
            }
            drop(state);
            tried.send_replace(true);
        }
        if !describe.is_empty() {
            let limits = describe_limits(&admin, &describe).await;
            let mut state = lock();
            for topic in describe {
                state.describing.remove(&topic);
                // A topic this relay may not describe: no limit known, nothing predicted.
                let limit = limits.get(&topic).copied().unwrap_or(usize::MAX);
                state.limits.insert(topic, limit);
            }
        }
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
