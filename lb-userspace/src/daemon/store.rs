//! The daemon's side of the fleet store. A change accepted here (validated
//! against the revision it last applied) is written to the store as one
//! transaction, off the loop; its reply waits until that revision comes back
//! through the follower and is installed here like every other balancer's
//! change: one path. A write that lost a race is validated again once the
//! revision that beat it is seen, and written again; it fails only if the
//! change itself is no longer valid, or the store cannot be reached.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::Daemon;
use super::dispatch::Outcome;
use super::start::StoreStart;
use crate::api::{Body, Reply, Request, StoreView};
use crate::config::{Config, StoreCopy};
use crate::model::Vip;
use crate::store::{
    self, Follow, Followed, Refused, Revision, StoreConfig, StoreStatus, WriteError, Writer,
};

/// How long a reply waits for its own revision to come back before it says
/// the change is written but not yet applied here.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Writes of one change that lose a race before it gives up.
const MOST_ATTEMPTS: u32 = 20;

/// A commit's outcome, sent back to the loop: (write id, result).
pub(super) type Committed = (u64, Result<i64, WriteError>);

/// Everything the daemon knows of the store.
pub(super) struct StoreLink {
    pub config: StoreConfig,
    pub writer: Writer,
    pub status: watch::Receiver<StoreStatus>,
    /// The revision whose desired state is installed.
    pub applied: i64,
    /// Every change up to this revision has reached the daemon.
    pub seen: i64,
    pub cluster_id: u64,
    pub refused: Vec<Refused>,
    pub leases: BTreeMap<(Vip, IpAddr), i64>,
    /// Started from the state's copy of this revision; None once the store's
    /// own revisions arrive.
    pub restored: Option<i64>,
    pub apply_error: Option<String>,
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
    committed: mpsc::Sender<Committed>,
}

/// A change waiting for the store.
struct Pending {
    request: Request,
    reply: oneshot::Sender<Reply>,
    /// The reply once the change is installed.
    done: Body,
    attempts: u32,
    waiting: Waiting,
    since: Instant,
}

enum Waiting {
    /// The transaction is on its way.
    Commit,
    /// Written at this revision: replied once it is installed here.
    Applied(i64),
    /// Lost a race with a change up to this revision: validated again once seen.
    Retry(i64),
}

impl StoreLink {
    pub fn new(
        config: StoreConfig,
        writer: Writer,
        status: watch::Receiver<StoreStatus>,
        committed: mpsc::Sender<Committed>,
    ) -> Self {
        Self {
            config,
            writer,
            status,
            applied: 0,
            seen: 0,
            cluster_id: 0,
            refused: Vec::new(),
            leases: BTreeMap::new(),
            restored: None,
            apply_error: None,
            pending: BTreeMap::new(),
            next_id: 0,
            committed,
        }
    }

    pub fn view(&self) -> StoreView {
        let status = self.status.borrow();
        StoreView {
            url: self.config.url(),
            state: status.state,
            applied_revision: self.applied,
            store_revision: status.revision.max(self.seen),
            seconds_since_contact: status
                .last_contact
                .map(|contact| (store::unix_now() - contact).max(0.0)),
            last_error: status.last_error.clone(),
            restored_from_local: self.restored,
            refused: self.refused.clone(),
            pending_writes: self.pending.len(),
            apply_error: self.apply_error.clone(),
        }
    }
}

/// The daemon's link to the store and the follower's inputs, from what
/// start-up found.
pub(super) fn link(start: StoreStart) -> (StoreLink, FollowStart) {
    let (followed_tx, followed) = mpsc::channel(64);
    let (committed_tx, committed) = mpsc::channel(64);
    let (status_tx, status) = watch::channel(StoreStatus::default());
    let (client, cache) = match start.joined {
        Some((client, cache)) => {
            status_tx.send_modify(|status| status.contact(cache.revision));
            (Some(client), cache)
        }
        None => (None, store::Cache::default()),
    };
    let (connection_tx, connection) = watch::channel(client.clone());
    let writer = Writer { config: start.config.clone(), connection };
    let mut link = StoreLink::new(start.config.clone(), writer, status, committed_tx);
    link.applied = start.restored.unwrap_or(cache.revision);
    link.seen = link.applied.max(cache.revision);
    link.cluster_id = cache.cluster_id;
    link.refused = start.refused;
    link.leases = start.leases;
    link.restored = start.restored;
    let follow = Follow {
        config: start.config,
        fleet: start.fleet,
        cache: Arc::new(Mutex::new(cache)),
        client,
        revisions: followed_tx,
        status: status_tx,
        connection: connection_tx,
    };
    (link, FollowStart { follow, followed, committed })
}

/// The follower task's inputs and the channels the loop reads.
pub(super) struct FollowStart {
    pub follow: Follow,
    pub followed: mpsc::Receiver<Followed>,
    pub committed: mpsc::Receiver<Committed>,
}

impl Daemon {
    /// Writes `next` (a change accepted against the applied revision) to
    /// the store; `reply` gets `done` once it is installed here.
    pub(super) fn submit(
        &mut self,
        request: Request,
        reply: oneshot::Sender<Reply>,
        next: Config,
        done: Body,
        attempts: u32,
    ) {
        let link = self.store.as_mut().expect("submit is for store-backed daemons");
        let plan = store::keys::plan(
            &link.config.keys(),
            &self.config.desired,
            &next.desired,
            link.applied,
        );
        let id = link.next_id;
        link.next_id += 1;
        let since = Instant::now();
        link.pending.insert(
            id,
            Pending { request, reply, done, attempts, waiting: Waiting::Commit, since },
        );
        let (writer, committed) = (link.writer.clone(), link.committed.clone());
        tokio::spawn(async move {
            let result = writer.commit(plan).await;
            let _ = committed.send((id, result)).await;
        });
    }

    /// A transaction's outcome.
    pub(super) fn committed(&mut self, (id, result): Committed) {
        let Some(link) = self.store.as_mut() else { return };
        let Some(mut pending) = link.pending.remove(&id) else { return };
        match result {
            Ok(revision) => {
                pending.waiting = Waiting::Applied(revision);
                link.pending.insert(id, pending);
            }
            Err(WriteError::Conflict { revision, .. }) => {
                pending.waiting = Waiting::Retry(revision);
                link.pending.insert(id, pending);
            }
            Err(error @ WriteError::Store(_)) => {
                let _ = pending.reply.send(Reply::Error(format!("{error}; nothing changed")));
            }
        }
        self.settle_writes();
    }

    /// What the follower sent: a revision to install, or how far it has seen.
    pub(super) fn followed(&mut self, followed: Followed) {
        match followed {
            Followed::Revision(revision) => self.store_revision(revision),
            Followed::Seen(revision) => {
                if let Some(link) = self.store.as_mut() {
                    link.seen = link.seen.max(revision);
                }
            }
        }
        self.settle_writes();
    }

    /// Installs the desired state of one revision through the one change
    /// path; a revision that cannot be installed leaves the previous one
    /// running, and says so.
    fn store_revision(&mut self, revision: Revision) {
        let Some(link) = self.store.as_mut() else { return };
        for refused in &revision.assembled.refused {
            if !link.refused.contains(refused) {
                tracing::error!(
                    key = %refused.key, reason = %refused.reason, revision = revision.revision,
                    "a key of the store is refused; nothing else changes because of it"
                );
            }
        }
        for cleared in link.refused.iter().filter(|r| !revision.assembled.refused.contains(r)) {
            tracing::info!(key = %cleared.key, "a key of the store refused earlier is no longer refused");
        }
        link.refused = revision.assembled.refused;
        link.leases = revision.assembled.leases;
        link.applied = revision.revision;
        link.seen = link.seen.max(revision.revision);
        link.cluster_id = revision.cluster_id;
        link.restored = None;
        let copy = StoreCopy::new(
            &link.config.prefix,
            revision.cluster_id,
            revision.revision,
            &link.leases,
        );
        let next = revision.assembled.state;
        let changes = crate::model::diff::diff(&self.config.desired, &next);
        let installed = self.change_config(|config| {
            config.desired = next;
            config.store_copy = Some(copy);
            Ok(())
        });
        let link = self.store.as_mut().expect("checked above");
        match installed {
            Ok(()) => {
                link.apply_error = None;
                for change in &changes {
                    tracing::info!(revision = revision.revision, %change, "store revision applied");
                }
            }
            Err(error) => {
                let error = format!("revision {}: {error:#}", revision.revision);
                tracing::error!(%error, "a store revision could not be installed: the previous one stays");
                link.apply_error = Some(error);
            }
        }
        self.publish_backends();
    }

    /// Replies to the writes whose revision is installed, validates again
    /// those that lost a race once the winner is seen, and gives up on
    /// writes that waited too long.
    pub(super) fn settle_writes(&mut self) {
        let Some(link) = self.store.as_mut() else { return };
        let (applied, seen) = (link.applied, link.seen);
        let due: Vec<u64> = link
            .pending
            .iter()
            .filter(|(_, pending)| match pending.waiting {
                Waiting::Commit => false,
                Waiting::Applied(revision) => {
                    revision <= applied || pending.since.elapsed() > APPLY_WAIT
                }
                Waiting::Retry(revision) => {
                    revision <= seen || pending.since.elapsed() > APPLY_WAIT
                }
            })
            .map(|(id, _)| *id)
            .collect();
        let mut retries = Vec::new();
        for id in due {
            let pending = link.pending.remove(&id).expect("listed above");
            match pending.waiting {
                Waiting::Applied(revision) => {
                    let mut done = pending.done;
                    if revision > applied
                        && let Body::Done { message, .. } = &mut done
                    {
                        message.push_str(&format!(
                            " (written to the store at revision {revision}; not installed here yet: see `lb store status`)"
                        ));
                    }
                    let _ = pending.reply.send(Reply::Ok(done));
                }
                Waiting::Retry(revision) if revision > seen => {
                    let _ = pending.reply.send(Reply::Error(format!(
                        "the store moved on to revision {revision} while this change was written, and this balancer has not seen that revision within {APPLY_WAIT:?} ({}): nothing changed; try again",
                        link.config.url()
                    )));
                }
                _ => retries.push(pending),
            }
        }
        for pending in retries {
            self.retry(pending);
        }
    }

    /// A change that lost a race, validated again against what is applied now.
    fn retry(&mut self, pending: Pending) {
        if pending.attempts >= MOST_ATTEMPTS {
            let _ = pending.reply.send(Reply::Error(format!(
                "the store changed under this change {MOST_ATTEMPTS} times in a row: nothing changed; try again"
            )));
            return;
        }
        tracing::info!(
            attempt = pending.attempts + 1,
            applied = self.store.as_ref().map_or(0, |link| link.applied),
            "a change lost a race with another write to the store: validating it again against the revision that won"
        );
        match self.outcome(&pending.request) {
            Outcome::Reply(answer) => {
                let _ = pending.reply.send(answer);
            }
            Outcome::Change { next, done } => {
                self.submit(pending.request, pending.reply, *next, done, pending.attempts + 1);
            }
        }
    }
}
