//! The daemon's background tasks, each supervised (started again when it
//! dies): neighbour resolution, active-flow counting, and, when configured,
//! flow sync, VIP announcements and following the store. They report to the loop through the
//! channels in [`Inbox`] and read what the loop publishes; none writes the
//! desired state.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::active_flows::{self, ActiveFlows};
use super::store::{Committed, FollowStart};
use super::supervise::Supervised;
use crate::datapath::FlowCounter;
use crate::health::HealthReport;
use crate::neighbour::{self, Neighbours};
use crate::store::{self, Followed};
use crate::sync::{self, Directory, SyncStatus};

/// What the tasks read of the daemon's state: the loop publishes on these.
pub(super) struct Published {
    /// Backend addresses whose MACs are wanted.
    pub wanted: watch::Sender<Vec<IpAddr>>,
    /// Which slot stands for which backend (for flow sync).
    pub directory: watch::Sender<Arc<Directory>>,
    /// VIP addresses to announce.
    pub announce: watch::Sender<BTreeSet<IpAddr>>,
}

/// What the tasks report to the loop.
pub(super) struct Inbox {
    pub neighbours: mpsc::Receiver<Neighbours>,
    pub counted: watch::Receiver<ActiveFlows>,
    /// The sync task's status: only the end of the initial sync is waited for.
    pub initial_sync: watch::Receiver<SyncStatus>,
    /// Health checks' outcomes.
    pub reports: mpsc::Receiver<HealthReport>,
    /// With a store: its revisions, and the outcomes of our writes.
    pub followed: Option<mpsc::Receiver<Followed>>,
    pub committed: Option<mpsc::Receiver<Committed>>,
    /// The rebalancer's rounds, done.
    pub rebalanced: mpsc::UnboundedReceiver<super::rebalance::Round>,
}

/// The next message of an optional channel; never, without one.
pub(super) async fn next<T>(channel: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match channel {
        Some(channel) => channel.recv().await,
        None => std::future::pending().await,
    }
}

/// The running tasks; dropping it aborts them.
pub(super) struct Tasks {
    neighbours: Supervised,
    counting: Supervised,
    sync: Option<Supervised>,
    announce: Option<Supervised>,
    follow: Option<Supervised>,
}

/// Everything the tasks are started with.
pub(super) struct Start {
    /// The balancer's interface, then its `--egress` ones.
    pub interfaces: Vec<u32>,
    pub flow_counter: Arc<FlowCounter>,
    pub first_count: ActiveFlows,
    /// Flow sync's inputs but the directory and status channels, when on.
    pub sync: Option<SyncStart>,
    pub announce_table: Option<u32>,
    /// What the published channels hold first.
    pub wanted: Vec<IpAddr>,
    pub directory: Arc<Directory>,
    pub announced: BTreeSet<IpAddr>,
    /// Where health checks report (their tasks belong to `Checks`).
    pub reports: mpsc::Receiver<HealthReport>,
    /// The store's follower, with a store.
    pub follow: Option<FollowStart>,
    /// Where the rebalancer's rounds report (the rounds belong to `Rebalancer`).
    pub rebalanced: mpsc::UnboundedReceiver<super::rebalance::Round>,
}

pub(super) struct SyncStart {
    pub socket: Arc<tokio::net::UdpSocket>,
    pub options: sync::SyncOptions,
    pub settings: sync::Settings,
    pub datapath: Arc<crate::datapath::SyncDatapath>,
    pub status: watch::Sender<SyncStatus>,
}

impl Tasks {
    pub fn start(start: Start) -> (Self, Published, Inbox) {
        let (wanted_tx, wanted_rx) = watch::channel(start.wanted);
        let (neighbours_tx, neighbours_rx) = mpsc::channel(4);
        let ifindex = start.interfaces[0];
        let interfaces = start.interfaces;
        let neighbours =
            Supervised::start("neighbours", "backend MACs are not followed", move || {
                neighbour::run(interfaces.clone(), wanted_rx.clone(), neighbours_tx.clone())
            });
        let (counted_tx, counted_rx) = watch::channel(start.first_count);
        let counter = start.flow_counter;
        let counting =
            Supervised::start("active-flows", "active-flow counts are not updated", move || {
                active_flows::run(Arc::clone(&counter), counted_tx.clone())
            });
        let (directory_tx, directory_rx) = watch::channel(start.directory);
        let (initial_sync, sync) = match start.sync {
            Some(parts) => {
                let initial_sync = parts.status.subscribe();
                let inputs = sync::Inputs {
                    socket: parts.socket,
                    options: parts.options,
                    settings: parts.settings,
                    datapath: parts.datapath,
                    directory: directory_rx,
                    status: parts.status,
                };
                let task =
                    Supervised::start("flow-sync", "peers do not learn our flows", move || {
                        sync::run(inputs.clone())
                    });
                (initial_sync, Some(task))
            }
            None => (watch::channel(SyncStatus::default()).1, None),
        };
        let (announce_tx, announce_rx) = watch::channel(start.announced);
        let announce = start.announce_table.map(|table| {
            tracing::info!(table, "announcing serving VIPs as routes in kernel table {table}");
            Supervised::start("announce", "VIP routes are not updated", move || {
                crate::announce::run(table, ifindex, announce_rx.clone())
            })
        });
        let (follow, followed, committed) = match start.follow {
            Some(FollowStart { follow, followed, committed }) => {
                let task =
                    Supervised::start("store", "store revisions are not applied", move || {
                        store::follow(follow.clone())
                    });
                (Some(task), Some(followed), Some(committed))
            }
            None => (None, None, None),
        };
        let tasks = Self { neighbours, counting, sync, announce, follow };
        let published =
            Published { wanted: wanted_tx, directory: directory_tx, announce: announce_tx };
        let inbox = Inbox {
            neighbours: neighbours_rx,
            counted: counted_rx,
            initial_sync,
            reports: start.reports,
            followed,
            committed,
            rebalanced: start.rebalanced,
        };
        (tasks, published, inbox)
    }

    pub fn syncing(&self) -> bool {
        self.sync.is_some()
    }

    /// Waits until one of the tasks ends, logs why and starts it again.
    /// Cancel-safe, as [`Supervised::restart_when_ended`] is.
    pub async fn restart_ended(&mut self) {
        tokio::select! {
            () = self.neighbours.restart_when_ended() => {}
            () = self.counting.restart_when_ended() => {}
            () = restart_optional(&mut self.sync) => {}
            () = restart_optional(&mut self.announce) => {}
            () = restart_optional(&mut self.follow) => {}
        }
    }
}

async fn restart_optional(task: &mut Option<Supervised>) {
    match task {
        Some(task) => task.restart_when_ended().await,
        None => std::future::pending().await,
    }
}
