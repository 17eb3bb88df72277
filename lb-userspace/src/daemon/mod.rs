//! `lb run`: owns the desired state, persists it, and is the only writer of
//! the BPF maps. Every change (a CLI request, a health transition, a
//! neighbour update) is handled on the one task that runs [`Daemon::serve`]'s
//! loop and goes through [`Daemon::change`] or the reconcile step, so
//! changes never interleave. [`run`] reads as its steps; each lives in the
//! room that owns it: the starting configuration in `start`, changes in
//! `changes`, requests in `dispatch`, task reports in `events`, the tasks in
//! `tasks`, views in `views`, the socket in `control`, rates in `rates`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};

use crate::api::{Call, Reply, Request};
use crate::config::{self, Config};
use crate::datapath::{self, AttachMode, Maps as _};
use crate::health::{Checks, HealthReport, Start};
use crate::model::{ChangeError, Vip};
use crate::neighbour;
use crate::publish;
use crate::reconcile::{FlowCounts, Reconciler};
use crate::sync::SyncStatus;

mod active_flows;
mod attach;
mod changes;
mod control;
mod dispatch;
mod egress;
mod events;
mod flows;
mod placement;
mod rates;
mod rebalance;
mod removals;
mod start;
mod store;
mod supervise;
mod tasks;
mod views;

use rates::Rates;
use tasks::{Inbox, Published, Tasks};

pub const DEFAULT_STATE: &str = "/var/lib/lb/state.toml";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

pub struct RunOptions {
    pub iface: String,
    pub config: Option<PathBuf>,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub xdp_mode: AttachMode,
    /// Program link and maps are pinned in `pin_dir/IFACE`.
    pub pin_dir: PathBuf,
    /// Unpin on exit, so the program detaches (default: keep forwarding).
    pub detach_on_exit: bool,
    /// Where the Prometheus endpoint listens; None turns it off.
    pub metrics: Option<std::net::SocketAddr>,
    /// Group allowed to use the control socket (mode 0660); None: root only (0600).
    pub socket_group: Option<String>,
    /// `--tunnel-source`: outer sources of tunnelled VIPs, at most one per family.
    pub tunnel_sources: Vec<crate::model::TunnelSource>,
    /// `--egress`: other interfaces backends may be routed out of, in
    /// egress order (egress 1 first).
    pub egress: Vec<String>,
    /// `--sync-peer`, `--sync-listen`, `--sync-key-file`: each replaces the
    /// config's `[sync]` setting of the same name.
    pub sync_peers: Vec<std::net::SocketAddr>,
    pub sync_listen: Option<std::net::SocketAddr>,
    pub sync_key_file: Option<PathBuf>,
    /// `--announce-table`: replaces the config's `announce_table`.
    pub announce_table: Option<u32>,
    /// `--hash-seed`: replaces the config's `hash_seed`.
    pub hash_seed: Option<u32>,
    /// `--store` and `--store-*`: replace the config's `[store]`.
    pub store: crate::store::StoreOptions,
}

/// Loads (or adopts) and attaches the datapath, then serves until SIGINT or
/// SIGTERM.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let (mut config, store) = start::configuration(&options).await?;
    let ifindex = neighbour::interface_index(&options.iface)
        .with_context(|| format!("interface '{}' not found (see `ip link`)", options.iface))?;
    datapath::ensure_bpffs(&options.pin_dir)?;
    let pins = datapath::pin_dir_for(&options.pin_dir, &options.iface);
    // One daemon per interface, checked first: a second one is told so,
    // not that its sync port is taken. Held until this function returns;
    // the kernel drops it if we die.
    let _lock = datapath::lock_interface(&pins)?;
    // Fleet settings are checked before anything is attached.
    let fleet = start::join_fleet(&options, &config).await?;
    config.datapath.sync_flows = fleet.sync.is_some();
    config.datapath.own_mac = neighbour::interface_mac(&options.iface)?;
    config.datapath.tunnel =
        crate::interface::tunnel_config(&options.iface, &options.tunnel_sources)?;
    let egress = egress::describe(&options.iface, &options.egress, &options.tunnel_sources)?;
    let interfaces: Vec<u32> =
        std::iter::once(ifindex).chain(egress.iter().map(|each| each.ifindex)).collect();
    // The sockets before the datapath: a port in use is refused before
    // anything is attached or pinned.
    let listener = control::bind_socket(&options.socket, options.socket_group.as_deref())?;
    let mut rollback = attach::Rollback::new(&pins, &options.socket);
    let metrics_listener = match options.metrics {
        Some(address) => Some((crate::metrics::bind(address).await?, address)),
        None => None,
    };
    let loaded = attach::load_datapath(config.datapath, &pins, ifindex, &egress, &options).await?;
    let (calls_tx, calls) = mpsc::channel::<Call>(64);
    let metrics_task = metrics_listener.map(|(listener, address)| {
        tracing::info!(%address, "serving Prometheus metrics on /metrics");
        tokio::spawn(crate::metrics::serve(listener, calls_tx.clone()))
    });
    let accept_task = tokio::spawn(control::serve(listener, calls_tx));

    let (mut daemon, tasks, inbox) =
        Daemon::start(config, loaded, fleet, store, interfaces, &options)?;
    // Started: from here on the datapath forwards, and an error must not
    // take it away.
    rollback.disarm();
    tracing::info!(socket = %options.socket.display(), "serving the control socket");
    daemon.serve(calls, inbox, tasks).await?;

    accept_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&options.socket);
    daemon.stop(&options, ifindex, &pins).await
}

/// The daemon's state, owned by the loop in [`Daemon::serve`].
struct Daemon {
    config: Config,
    reconciler: Reconciler,
    state_path: PathBuf,
    rates: Rates,
    /// One check task and health state per (VIP, backend).
    checks: Checks,
    /// What the sync task last published (the default when sync is off).
    sync_status: watch::Receiver<SyncStatus>,
    sync_on: bool,
    /// `--announce-table` (or the config's), when announcing.
    announce_table: Option<u32>,
    /// What the active-flow counter last published.
    active_flows: watch::Receiver<active_flows::ActiveFlows>,
    /// The datapath's `confirmed` flow count at the last count of active flows.
    last_confirmed: Option<u64>,
    /// The active-flow counter (shared with its task): its handles on the
    /// flow table serve `lb flows`, and it keeps the occupancy it last counted.
    flow_counter: Arc<datapath::FlowCounter>,
    /// How the program is attached: `native` or `skb` (generic).
    attach_mode: &'static str,
    /// The kernel memory of the datapath's maps, read once they were loaded.
    map_memory: Option<u64>,
    /// What the tasks read of our state.
    published: Published,
    /// The fleet store, when the desired state lives there.
    store: Option<store::StoreLink>,
    /// `--config`, which a reload re-reads.
    config_file: Option<PathBuf>,
    /// The interface served, whose addresses new VIPs and backends are
    /// checked against (and its `--egress` interfaces' for backends).
    iface: String,
    egress: Vec<String>,
    /// Closes a few connections of crowded backends, for the VIPs that rebalance.
    rebalancer: rebalance::Rebalancer,
}

impl Daemon {
    /// Installs the configuration (checks first, so an adopted datapath's
    /// backends stay up until a check says otherwise), saves it, and starts
    /// the background tasks with what they need of it.
    fn start(
        config: Config,
        loaded: attach::Loaded,
        fleet: start::FleetStart,
        store_start: Option<start::StoreStart>,
        interfaces: Vec<u32>,
        options: &RunOptions,
    ) -> anyhow::Result<(Self, Tasks, Inbox)> {
        let attach::Loaded { mut datapath, first_count, attach_mode, map_memory } = loaded;
        let adopted = datapath.adopted();
        let flow_counter = Arc::new(datapath.flow_counter()?);
        let (rebalancer, rebalanced) = rebalance::Rebalancer::new(datapath.flow_marker()?);
        let sync = match fleet.sync {
            Some((socket, sync_options)) => Some(tasks::SyncStart {
                socket: Arc::new(socket),
                options: sync_options,
                settings: crate::sync::Settings {
                    hash_seed: config.datapath.hash_seed,
                    table_size: config.datapath.table_size,
                },
                datapath: Arc::new(datapath.take_sync()?.expect("the ring is taken once, here")),
                status: watch::channel(SyncStatus::default()).0,
            }),
            None => None,
        };
        let (reports_tx, reports) = mpsc::channel::<HealthReport>(256);
        let mut checks = Checks::new(reports_tx);
        let mut reconciler = Reconciler::new(datapath);
        reconciler.set_flow_counts(FlowCounts {
            active: Arc::clone(&first_count),
            recently_confirmed: 0,
            closing: Default::default(),
        });
        checks.sync(&config.desired, if adopted { Start::Adopted } else { Start::Fresh });
        reconciler.apply(&config.desired, &checks.health_map())?;
        placement::warn_misplaced(
            &options.iface,
            &options.egress,
            &config.datapath.tunnel,
            &config.desired,
        );
        start::keep_replaced(&config, &options.state)?;
        config::save(&config, &options.state)?;
        let sync_on = sync.is_some();
        let (store, follow) = match store_start {
            Some(start) => {
                let (link, follow) = store::link(start);
                (Some(link), Some(follow))
            }
            None => (None, None),
        };
        let (tasks, published, inbox) = Tasks::start(tasks::Start {
            interfaces,
            flow_counter: Arc::clone(&flow_counter),
            first_count,
            sync,
            announce_table: fleet.announce_table,
            wanted: reconciler.wanted_neighbours(),
            directory: Arc::new(reconciler.directory()),
            // Nothing is announced before the first flow sync is done.
            announced: if sync_on { BTreeSet::new() } else { reconciler.serving_addresses() },
            reports,
            follow,
            rebalanced,
        });
        let daemon = Self {
            config,
            reconciler,
            state_path: options.state.clone(),
            rates: Rates::default(),
            checks,
            sync_status: inbox.initial_sync.clone(),
            sync_on,
            announce_table: fleet.announce_table,
            active_flows: inbox.counted.clone(),
            last_confirmed: None,
            flow_counter,
            attach_mode,
            map_memory,
            published,
            store,
            config_file: options.config.clone(),
            iface: options.iface.clone(),
            egress: options.egress.clone(),
            rebalancer,
        };
        Ok((daemon, tasks, inbox))
    }

    /// The loop: every request, report and signal is handled here, one at a
    /// time, until SIGINT or SIGTERM.
    async fn serve(
        &mut self,
        mut calls: mpsc::Receiver<Call>,
        mut inbox: Inbox,
        mut tasks: Tasks,
    ) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut initial_sync_seen = false;
        loop {
            tokio::select! {
                Some((request, reply)) = calls.recv() => {
                    if let Request::Flows { vip, limit } = request {
                        self.list_flows(vip, limit, reply);
                        continue;
                    }
                    self.handle(request, reply);
                    self.publish_backends();
                }
                Some(followed) = tasks::next(&mut inbox.followed) => self.followed(followed),
                Some(committed) = tasks::next(&mut inbox.committed) => self.committed(committed),
                _ = hangup.recv() => {
                    self.reload();
                    self.publish_backends();
                }
                Some(found) = inbox.neighbours.recv() => self.neighbours_changed(found),
                Some(report) = inbox.reports.recv() => self.health_report(report),
                Ok(()) = inbox.counted.changed() => self.flows_counted(),
                Some(round) = inbox.rebalanced.recv() => self.rebalanced(round),
                _ = tick.tick() => {
                    self.sample_rates();
                    self.rebalance_tick();
                    self.checks.restart_dead();
                    self.settle_writes();
                }
                // The status changes with every datagram; only the end of the
                // initial sync matters here (it lets the VIPs be announced).
                _ = inbox.initial_sync.wait_for(|status| status.initial_sync_done), if tasks.syncing() && !initial_sync_seen => {
                    initial_sync_seen = true;
                }
                () = tasks.restart_ended() => {}
                _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); break; }
                _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            }
            // Requests, health, neighbours and the initial sync all change what is announced.
            publish::if_changed(&self.published.announce, &self.announcements());
        }
        // Dropping the tasks aborts them.
        drop(tasks);
        Ok(())
    }

    /// After the loop: with `--detach-on-exit`, routes withdrawn and pins
    /// removed (the program detaches); else the datapath keeps forwarding.
    async fn stop(
        mut self,
        options: &RunOptions,
        ifindex: u32,
        pins: &std::path::Path,
    ) -> anyhow::Result<()> {
        if options.detach_on_exit {
            let withdrawn = crate::announce::withdraw_all(ifindex).await?;
            if withdrawn > 0 {
                tracing::info!(routes = withdrawn, "--detach-on-exit: VIP routes withdrawn");
            }
            self.reconciler.datapath_mut().unpin()?;
            tracing::info!("--detach-on-exit: pins removed; the program detaches now");
        } else {
            tracing::info!(
                pins = %pins.display(),
                "the XDP program keeps forwarding with its last tables; `lb run` adopts it, `lb unload --iface {}` removes it",
                options.iface
            );
        }
        Ok(())
    }

    /// VIP addresses to announce: those with a backend up, once the first
    /// flow sync is done (a balancer that knows no flows yet must not take
    /// over connections).
    pub(super) fn announcements(&self) -> BTreeSet<IpAddr> {
        if self.sync_on && !self.sync_status.borrow().initial_sync_done {
            return Default::default();
        }
        self.reconciler.serving_addresses()
    }

    /// Publishes which MACs are wanted and which slots stand for which
    /// backend. Only a request or a reload can add or remove backends, so
    /// only they call this.
    fn publish_backends(&self) {
        publish::if_changed(&self.published.wanted, &self.reconciler.wanted_neighbours());
        publish::if_changed(&self.published.directory, &Arc::new(self.reconciler.directory()));
    }

    /// `lb flows`: answered on `reply` by a walk off the loop.
    fn list_flows(&self, vip: Vip, limit: u32, reply: tokio::sync::oneshot::Sender<Reply>) {
        let Some(owners) = self.reconciler.flow_owners(&vip) else {
            let _ = reply.send(Reply::NotFound(ChangeError::UnknownVip(vip).to_string()));
            return;
        };
        flows::list(Arc::clone(&self.flow_counter), vip, owners, limit, reply);
    }
}
