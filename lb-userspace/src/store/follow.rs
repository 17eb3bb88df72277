//! Following the store: one task watches every key under the prefix and
//! sends the daemon the desired state at each revision, in order. It keeps a
//! copy of the keys (the [`Cache`]), so after a lost connection it catches
//! up from its revision; when etcd has compacted that revision away, it
//! reads everything again. A heartbeat read every second notices a member
//! that stopped answering, and dates the last contact. It never applies
//! anything itself: the daemon does, through its one change path.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse};
use tokio::sync::{mpsc, watch};

use super::keys::{self, Assembled, Entry, FleetSettings};
use super::{Client, StoreConfig, StoreError, StoreState, StoreStatus, open};

/// How often the store is asked whether it still answers.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// The longest pause between two attempts to reach an unreachable store.
const MOST_BACKOFF: Duration = Duration::from_secs(2);

/// Every key under the prefix as of `revision`.
#[derive(Clone, Debug, Default)]
pub struct Cache {
    pub entries: BTreeMap<String, Entry>,
    pub revision: i64,
    /// The etcd cluster the revision belongs to (revisions of another mean nothing).
    pub cluster_id: u64,
}

/// What the follower tells the daemon, in order.
#[derive(Clone, Debug)]
pub enum Followed {
    /// The desired state at a revision that changed keys of the prefix.
    Revision(Revision),
    /// Every change up to this revision has been sent: a write that lost a
    /// race with it can be validated again.
    Seen(i64),
}

/// The desired state at one revision of the store.
#[derive(Clone, Debug)]
pub struct Revision {
    pub revision: i64,
    pub cluster_id: u64,
    pub assembled: Assembled,
}

/// What the follower runs on; kept by the daemon, so a follower started
/// again (after a panic) resumes from the shared cache.
#[derive(Clone)]
pub struct Follow {
    pub config: StoreConfig,
    /// The fleet settings this balancer runs with: a store whose fleet key
    /// says otherwise is reported, and nothing of it applied.
    pub fleet: FleetSettings,
    pub cache: Arc<Mutex<Cache>>,
    /// A client that reached the store at start, used first.
    pub client: Option<Client>,
    pub revisions: mpsc::Sender<Followed>,
    pub status: watch::Sender<StoreStatus>,
    /// The client writers use, while the store answers.
    pub connection: watch::Sender<Option<Client>>,
}

/// Follows the store until the task is aborted; returns only if the daemon
/// stopped listening.
pub async fn follow(inputs: Follow) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(100);
    let mut client = inputs.client.clone();
    loop {
        let connected = match client.take() {
            Some(client) => Ok(client),
            None => super::connect(&inputs.config).await,
        };
        let ended = match connected {
            Ok(connected) => {
                let session = session(&inputs, &connected).await;
                // A session the store ended keeps its channel; one lost to
                // an error starts the next on a fresh one, so no member's
                // broken connection outlives it.
                if session.is_ok() {
                    client = Some(connected);
                }
                session
            }
            Err(error) => Err(Lost::Store(error)),
        };
        inputs.connection.send_replace(None);
        match ended {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(Lost::DaemonGone) => return Ok(()),
            Err(Lost::Store(error)) => {
                let refused =
                    matches!(error, StoreError::FleetConflict { .. } | StoreError::BadFleet { .. });
                inputs.status.send_modify(|status| {
                    if status.state != StoreState::Unreachable || status.last_error.is_none() {
                        tracing::warn!(error = %error, "the store is not usable: running on the last revision applied");
                    }
                    status.state = if refused { StoreState::Refused } else { StoreState::Unreachable };
                    status.last_error = Some(error.to_string());
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MOST_BACKOFF);
            }
        }
    }
}

/// Why a session ended.
enum Lost {
    Store(StoreError),
    DaemonGone,
}

impl From<StoreError> for Lost {
    fn from(error: StoreError) -> Self {
        Lost::Store(error)
    }
}

/// One connected stretch: the fleet key checked, the cache brought up to
/// date, then every change as it comes. Ends (Ok) when the watch must start
/// over from a full read.
async fn session(inputs: &Follow, client: &Client) -> Result<(), Lost> {
    let wanted = open::FleetWanted {
        hash_seed: Some(inputs.fleet.hash_seed),
        table_size: Some(inputs.fleet.table_size),
        max_vips: Some(inputs.fleet.max_vips),
        max_backends: Some(inputs.fleet.max_backends),
        first: inputs.fleet,
    };
    open::settle(client, &wanted).await?;
    let known = inputs.cache.lock().expect("cache lock").clone();
    let (cluster_id, revision) = heartbeat(client).await?;
    let start = if known.revision > 0 && known.cluster_id == cluster_id {
        known.revision + 1
    } else {
        let cache = open::read_all(client).await?;
        tracing::info!(
            revision = cache.revision,
            keys = cache.entries.len(),
            "read every key of the store"
        );
        let fresh = revision_of(inputs, &cache);
        *inputs.cache.lock().expect("cache lock") = cache.clone();
        send(inputs, Followed::Revision(fresh)).await?;
        cache.revision + 1
    };
    inputs.status.send_modify(|status| status.contact(revision));
    inputs.connection.send_replace(Some(client.clone()));
    let options =
        WatchOptions::new().with_prefix().with_start_revision(start).with_progress_notify();
    let mut stream = client
        .etcd
        .watch_client()
        .watch(client.keys().all(), Some(options))
        .await
        .map_err(|error| super::client::describe(client.url(), &error))?;
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = stream.message() => {
                let message = message.map_err(|error| super::client::describe(client.url(), &error))?;
                let Some(response) = message else {
                    return Err(Lost::Store(StoreError::Unreachable {
                        url: client.url().to_owned(),
                        cause: "the member closed the watch".to_owned(),
                    }));
                };
                if response.canceled() {
                    if response.compact_revision() > 0 {
                        tracing::warn!(
                            from = start, compacted_to = response.compact_revision(),
                            "the store compacted the revisions this balancer missed: reading every key again"
                        );
                    }
                    *inputs.cache.lock().expect("cache lock") = Cache::default();
                    return Ok(());
                }
                apply(inputs, response).await?;
            }
            _ = beat.tick() => {
                let (_, revision) = heartbeat(client).await?;
                inputs.status.send_modify(|status| status.contact(revision));
                // Its answer moves `Seen` on even while other prefixes change.
                stream.request_progress().await.map_err(|error| super::client::describe(client.url(), &error))?;
            }
        }
    }
}

/// A linearizable read of the fleet key: the member answers only while it
/// is part of a quorum. Returns the cluster and its revision.
async fn heartbeat(client: &Client) -> Result<(u64, i64), StoreError> {
    let response = client.call(client.kv().get(client.keys().fleet(), None)).await?;
    let header = response.header();
    Ok((header.map_or(0, |h| h.cluster_id()), header.map_or(0, |h| h.revision())))
}

/// Applies a watch response's events to the cache, sending the desired
/// state at the end of each revision they hold, in order.
async fn apply(inputs: &Follow, response: WatchResponse) -> Result<(), Lost> {
    let cluster_id = response.header().map_or(0, |header| header.cluster_id());
    let revision = response.header().map_or(0, |header| header.revision());
    let mut done = Vec::new();
    {
        let mut cache = inputs.cache.lock().expect("cache lock");
        let mut current = None;
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            if current.is_some_and(|current| current != kv.mod_revision()) {
                done.push(revision_of(inputs, &cache));
            }
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match event.event_type() {
                EventType::Put => {
                    let entry = Entry {
                        value: kv.value().to_vec(),
                        mod_revision: kv.mod_revision(),
                        lease: kv.lease(),
                    };
                    cache.entries.insert(key, entry);
                }
                EventType::Delete => {
                    cache.entries.remove(&key);
                }
            }
            cache.revision = kv.mod_revision();
            cache.cluster_id = cluster_id;
            current = Some(kv.mod_revision());
        }
        if current.is_some() {
            done.push(revision_of(inputs, &cache));
        }
        // Every event up to the header's revision has been sent: a
        // progress notice moves the cache on without events.
        cache.revision = cache.revision.max(revision);
    }
    for done in done {
        send(inputs, Followed::Revision(done)).await?;
    }
    send(inputs, Followed::Seen(revision)).await?;
    inputs.status.send_modify(|status| status.contact(revision));
    Ok(())
}

/// The desired state the cache holds now.
fn revision_of(inputs: &Follow, cache: &Cache) -> Revision {
    let assembled = keys::assemble(&inputs.config.keys(), &cache.entries, inputs.fleet.limits());
    Revision { revision: cache.revision, cluster_id: cache.cluster_id, assembled }
}

async fn send(inputs: &Follow, followed: Followed) -> Result<(), Lost> {
    inputs.revisions.send(followed).await.map_err(|_| Lost::DaemonGone)
}
