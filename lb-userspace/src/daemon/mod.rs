//! `lb run`: owns the desired state, persists it, and is the only writer of
//! the BPF maps. Every change (a CLI request, a health transition, a
//! neighbour update) is handled on the one task that runs [`run`]'s loop and
//! goes through [`Daemon::change`] or the reconcile step, so changes never
//! interleave. Answering requests is in `dispatch`, building what `lb`
//! shows in `views`, the socket in `control`, rates in `rates`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};

use crate::api::Call;
use crate::config::{self, Config, SyncConfig};
use crate::datapath::{self, AttachMode, Datapath, Maps as _};
use crate::health::{Checks, Health, HealthReport, Start};
use crate::model::{ChangeError, DesiredState, Scheduler, format_mac};
use crate::neighbour::{self, Neighbours};
use crate::publish;
use crate::reconcile::{FlowCounts, Reconciler};
use crate::sync::{self, SyncOptions, SyncStatus};

mod active_flows;
mod control;
mod dispatch;
mod flows;
mod rates;
mod supervise;
mod views;

use rates::{Counted, Rates};
use supervise::Supervised;

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
    /// `--sync-peer`, `--sync-listen`, `--sync-key-file`: each replaces the
    /// config's `[sync]` setting of the same name.
    pub sync_peers: Vec<std::net::SocketAddr>,
    pub sync_listen: Option<std::net::SocketAddr>,
    pub sync_key_file: Option<PathBuf>,
    /// `--announce-table`: replaces the config's `announce_table`.
    pub announce_table: Option<u32>,
    /// `--hash-seed`: replaces the config's `hash_seed`.
    pub hash_seed: Option<u32>,
}

/// Sync as the command line and the config file set it together, if on.
fn sync_config(options: &RunOptions, config: &Config) -> anyhow::Result<Option<SyncConfig>> {
    let file = config.sync.as_ref();
    let peers = if options.sync_peers.is_empty() {
        file.map(|sync| sync.peers.clone()).unwrap_or_default()
    } else {
        options.sync_peers.clone()
    };
    let listen = options.sync_listen.or(file.map(|sync| sync.listen));
    let key_file = options.sync_key_file.clone().or(file.map(|sync| sync.key_file.clone()));
    match (peers.is_empty(), listen, key_file) {
        (true, None, None) => Ok(None),
        (false, Some(listen), Some(key_file)) => Ok(Some(SyncConfig { listen, peers, key_file })),
        (true, _, _) => {
            anyhow::bail!("flow sync needs at least one --sync-peer (or peers in [sync])")
        }
        (false, _, _) => anyhow::bail!(
            "flow sync needs both --sync-listen ADDR:PORT and --sync-key-file PATH (or listen and key_file in [sync])"
        ),
    }
}

/// Where the configuration comes from: `--config` when given (see
/// [`from_file`]), else the state file when it exists, else empty defaults;
/// then the hash seed (see [`hash_seed`]).
fn initial_config(options: &RunOptions) -> anyhow::Result<Config> {
    let mut config = if let Some(path) = &options.config {
        from_file(path, &options.state)?
    } else if options.state.exists() {
        let config = config::load(&options.state)?;
        tracing::info!(state = %options.state.display(), vips = config.desired.vips.len(), "state restored");
        config
    } else {
        tracing::info!(state = %options.state.display(), "no state yet: starting empty");
        Config::default()
    };
    config.datapath.hash_seed = hash_seed(options, &config)?;
    Ok(config)
}

/// `--config FILE` at start. The state wins while it holds FILE as last
/// applied (same digest): it is FILE plus the changes made with `lb` since,
/// which a restart must not undo. A FILE that changed since is applied, and
/// the state it replaces is copied to `STATE.replaced` first, so that
/// nothing made with `lb` is lost without a trace.
fn from_file(path: &std::path::Path, state_path: &std::path::Path) -> anyhow::Result<Config> {
    let file = config::load_source(path)?;
    if state_path.exists() {
        let state = config::load(state_path)?;
        let digest = |config: &Config| config.source.as_ref().map(|source| source.digest.clone());
        if digest(&state) == digest(&file) {
            let changes = crate::model::diff::diff(&file.desired, &state.desired);
            tracing::info!(
                config = %path.display(), state = %state_path.display(), changes_since = changes.len(),
                "the configuration file is unchanged since it was applied: restoring the state, with the changes made with lb since"
            );
            return Ok(state);
        }
        let changes = crate::model::diff::diff(&state.desired, &file.desired);
        if !changes.is_empty() {
            let mut kept = state_path.as_os_str().to_owned();
            kept.push(".replaced");
            std::fs::copy(state_path, &kept)
                .with_context(|| format!("keeping the state as {}", kept.display()))?;
            tracing::warn!(
                config = %path.display(), replaced_state = %std::path::Path::new(&kept).display(), changes = changes.len(),
                "the configuration file changed since it was last applied: applying it; the state it replaces is kept"
            );
            for change in &changes {
                tracing::info!(%change, "configuration file applied at start");
            }
        }
    }
    tracing::info!(config = %path.display(), vips = file.desired.vips.len(), "configuration loaded");
    Ok(file)
}

/// The flow-hash seed: `--hash-seed`, else the configuration's, else the
/// state's, else a random one (saved in the state at start). A predictable
/// seed would let anyone choose source ports that all land on one backend.
fn hash_seed(options: &RunOptions, config: &Config) -> anyhow::Result<u32> {
    if let Some(seed) = options.hash_seed {
        return Ok(seed);
    }
    if config.hash_seed_set {
        return Ok(config.datapath.hash_seed);
    }
    if options.config.is_some() && options.state.exists() {
        return Ok(config::load(&options.state)?.datapath.hash_seed);
    }
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).map_err(|error| anyhow::anyhow!("no random hash seed: {error}"))?;
    let seed = u32::from_ne_bytes(bytes);
    tracing::info!(
        hash_seed = seed,
        state = %options.state.display(),
        "no hash_seed configured: picked a random one, kept in the state (balancers sharing VIPs must share it: set hash_seed or --hash-seed on all)"
    );
    Ok(seed)
}

/// Loads (or adopts) and attaches the datapath, then serves until SIGINT or
/// SIGTERM.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let mut config = initial_config(&options)?;
    let ifindex = neighbour::interface_index(&options.iface)
        .with_context(|| format!("interface '{}' not found (see `ip link`)", options.iface))?;
    datapath::ensure_bpffs(&options.pin_dir)?;
    let pins = datapath::pin_dir_for(&options.pin_dir, &options.iface);
    // One daemon per interface, checked first: a second one is told so,
    // not that its sync port is taken. Held until this function returns;
    // the kernel drops it if we die.
    let _lock = datapath::lock_interface(&pins)?;
    // Fleet settings are checked before anything is attached.
    let sync_options = match sync_config(&options, &config)? {
        Some(sync) => {
            let key = sync::load_key(&sync.key_file)?;
            let socket = sync::bind(sync.listen).await?;
            Some((socket, SyncOptions { listen: sync.listen, peers: sync.peers, key }))
        }
        None => None,
    };
    let announce_table = options.announce_table.or(config.announce_table);
    config.datapath.sync_flows = sync_options.is_some();
    config.datapath.own_mac = neighbour::interface_mac(&options.iface)?;
    let mut datapath = Datapath::load_pinned(config.datapath, &pins)?;
    let adopted = datapath.adopted();
    // What least-connections VIPs start from: the adopted flows, counted by
    // a walk of the whole flow table (about two seconds per million flows).
    // It delays start-up, never the loop, while the pinned program keeps
    // forwarding.
    let mut first_count = active_flows::ActiveFlows::default();
    if adopted {
        let forwarded =
            datapath::total_of(&datapath.reason_counters()?, lb_common::Reason::Forwarded);
        first_count = Arc::new(datapath.active_flows());
        tracing::info!(
            pins = %pins.display(), active_flows = first_count.values().sum::<u64>(), forwarded_packets = forwarded,
            "found a pinned datapath still forwarding: adopting its maps, flows and counters"
        );
    }
    let mode = datapath.attach(&options.iface, options.xdp_mode)?;
    tracing::info!(iface = %options.iface, mode, pins = %pins.display(), "XDP program attached");
    tracing::info!(
        flows = datapath.config().flow_table_size,
        memory_bytes = datapath.flow_table_memory(),
        "flow table created"
    );

    let listener = control::bind_socket(&options.socket, options.socket_group.as_deref())?;
    let metrics_listener = match options.metrics {
        Some(address) => Some((crate::metrics::bind(address).await?, address)),
        None => None,
    };
    let (wanted_tx, wanted_rx) = watch::channel(Vec::new());
    let (neighbours_tx, mut neighbours_rx) = mpsc::channel(4);
    let mut neighbour_task =
        Supervised::start("neighbours", "backend MACs are not followed", move || {
            neighbour::run(ifindex, wanted_rx.clone(), neighbours_tx.clone())
        });
    let flow_counter = Arc::new(datapath.flow_counter()?);
    let counting = Arc::clone(&flow_counter);
    let (active_flows_tx, active_flows) = watch::channel(Arc::clone(&first_count));
    let mut counted = active_flows.clone();
    let mut counting_task =
        Supervised::start("active-flows", "active-flow counts are not updated", move || {
            active_flows::run(Arc::clone(&counting), active_flows_tx.clone())
        });
    let (calls_tx, mut calls_rx) = mpsc::channel::<Call>(64);
    let metrics_task = metrics_listener.map(|(listener, address)| {
        tracing::info!(%address, "serving Prometheus metrics on /metrics");
        tokio::spawn(crate::metrics::serve(listener, calls_tx.clone()))
    });
    let accept_task = tokio::spawn(control::serve(listener, calls_tx));

    let sync_parts = match sync_options {
        Some((socket, sync_options)) => {
            let sync_datapath = datapath.take_sync()?.expect("the ring is taken once, here");
            Some((socket, sync_options, Arc::new(sync_datapath)))
        }
        None => None,
    };
    let (reports_tx, mut reports_rx) = mpsc::channel::<HealthReport>(256);
    let (sync_status_tx, sync_status) = watch::channel(SyncStatus::default());
    let (mut initial_sync, mut initial_sync_seen) = (sync_status.clone(), false);
    let mut reconciler = Reconciler::new(datapath);
    reconciler.set_flow_counts(FlowCounts { active: first_count, recently_confirmed: 0 });
    let mut daemon = Daemon {
        config,
        reconciler,
        state_path: options.state.clone(),
        rates: Rates::default(),
        checks: Checks::new(reports_tx),
        sync_status,
        sync_on: sync_parts.is_some(),
        announce_table,
        active_flows,
        last_confirmed: None,
        flow_counter,
        attach_mode: mode,
    };
    daemon.checks.sync(&daemon.config.desired, if adopted { Start::Adopted } else { Start::Fresh });
    daemon.reconciler.apply(&daemon.config.desired, &daemon.checks.health_map())?;
    config::save(&daemon.config, &daemon.state_path)?;
    wanted_tx.send_replace(daemon.reconciler.wanted_neighbours());

    let (directory_tx, directory_rx) = watch::channel(Arc::new(daemon.reconciler.directory()));
    let mut sync_task = sync_parts.map(|(socket, options, datapath)| {
        let inputs = sync::Inputs {
            socket: Arc::new(socket),
            options,
            settings: sync::Settings {
                hash_seed: daemon.config.datapath.hash_seed,
                table_size: daemon.config.datapath.table_size,
            },
            datapath,
            directory: directory_rx,
            status: sync_status_tx,
        };
        Supervised::start("flow-sync", "peers do not learn our flows", move || {
            sync::run(inputs.clone())
        })
    });
    let (announce_tx, announce_rx) = watch::channel(daemon.announcements());
    let mut announce_task = announce_table.map(|table| {
        tracing::info!(table, "announcing serving VIPs as routes in kernel table {table}");
        let announcements = announce_rx.clone();
        Supervised::start("announce", "VIP routes are not updated", move || {
            crate::announce::run(table, ifindex, announcements.clone())
        })
    });

    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tracing::info!(socket = %options.socket.display(), "serving the control socket");
    loop {
        tokio::select! {
            Some((request, reply)) = calls_rx.recv() => {
                if let crate::api::Request::Flows { vip, limit } = request {
                    daemon.list_flows(vip, limit, reply);
                    continue;
                }
                let answer = daemon.handle(request);
                daemon.publish_backends(&wanted_tx, &directory_tx);
                let _ = reply.send(answer);
            }
            _ = hangup.recv() => {
                daemon.reload(options.config.as_deref());
                daemon.publish_backends(&wanted_tx, &directory_tx);
            }
            Some(found) = neighbours_rx.recv() => daemon.neighbours_changed(found),
            Some(report) = reports_rx.recv() => daemon.health_report(report),
            Ok(()) = counted.changed() => daemon.flows_counted(),
            _ = tick.tick() => {
                daemon.sample_rates();
                daemon.checks.restart_dead();
            }
            // The status changes with every datagram; only the end of the
            // initial sync matters here (it lets the VIPs be announced).
            _ = initial_sync.wait_for(|status| status.initial_sync_done), if sync_task.is_some() && !initial_sync_seen => {
                initial_sync_seen = true;
            }
            () = async { sync_task.as_mut().expect("guarded").restart_when_ended().await }, if sync_task.is_some() => {}
            () = async { announce_task.as_mut().expect("guarded").restart_when_ended().await }, if announce_task.is_some() => {}
            () = neighbour_task.restart_when_ended() => {}
            () = counting_task.restart_when_ended() => {}
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); break; }
            _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); break; }
        }
        // Requests, health, neighbours and the initial sync all change what is announced.
        publish::if_changed(&announce_tx, &daemon.announcements());
    }
    accept_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&options.socket);
    // Dropping a supervised task aborts it.
    drop((neighbour_task, counting_task, sync_task, announce_task));
    if options.detach_on_exit {
        let withdrawn = crate::announce::withdraw_all(ifindex).await?;
        if withdrawn > 0 {
            tracing::info!(routes = withdrawn, "--detach-on-exit: VIP routes withdrawn");
        }
        daemon.reconciler.datapath_mut().unpin()?;
        tracing::info!("--detach-on-exit: pins removed; the program detaches now");
    } else {
        tracing::info!(
            pins = %pins.display(),
            "the XDP program keeps forwarding with its last tables; `lb run` adopts it, `lb unload --iface {}` removes it",
            options.iface
        );
    }
    drop(daemon);
    Ok(())
}

/// The daemon's state, owned by the loop in [`run`].
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
}

impl Daemon {
    /// VIP addresses to announce: those with a backend up, once the first
    /// flow sync is done (a balancer that knows no flows yet must not take
    /// over connections).
    pub(super) fn announcements(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        if self.sync_on && !self.sync_status.borrow().initial_sync_done {
            return Default::default();
        }
        self.reconciler.serving_addresses()
    }

    /// Publishes which MACs are wanted and which slots stand for which
    /// backend. Only a request or a reload can add or remove backends, so
    /// only they call this.
    fn publish_backends(
        &self,
        wanted: &watch::Sender<Vec<std::net::IpAddr>>,
        directory: &watch::Sender<Arc<crate::sync::Directory>>,
    ) {
        publish::if_changed(wanted, &self.reconciler.wanted_neighbours());
        publish::if_changed(directory, &Arc::new(self.reconciler.directory()));
    }

    /// Applies one change of the desired state; see [`Self::change_config`].
    fn change(
        &mut self,
        edit: impl FnOnce(&mut DesiredState) -> Result<(), ChangeError>,
    ) -> anyhow::Result<()> {
        self.change_config(|config| edit(&mut config.desired))
    }

    /// Applies one change: validated on a copy, persisted, then installed. A
    /// refused or failed change leaves the running and saved state as before.
    fn change_config(
        &mut self,
        edit: impl FnOnce(&mut Config) -> Result<(), ChangeError>,
    ) -> anyhow::Result<()> {
        let mut next = self.config.clone();
        edit(&mut next)?;
        config::save(&next, &self.state_path)?;
        let previous = std::mem::replace(&mut self.config, next);
        self.checks.sync(&self.config.desired, Start::Running);
        if let Err(error) = self.reconciler.apply(&self.config.desired, &self.checks.health_map()) {
            // Put back what was running and what was saved.
            self.config = previous;
            self.checks.sync(&self.config.desired, Start::Running);
            let _ = self.reconciler.apply(&self.config.desired, &self.checks.health_map());
            let _ = config::save(&self.config, &self.state_path);
            return Err(error.into());
        }
        tracing::info!(state = %self.state_path.display(), "configuration changed and saved");
        Ok(())
    }

    /// A configuration file's text, read as `lb run --config` reads it, that
    /// can replace the running configuration: refused when it changes a
    /// setting fixed at load.
    fn file_to_apply(&self, file: &std::path::Path, text: &str) -> anyhow::Result<Config> {
        let next = config::parse_source(text, file)?;
        let differ = config::restart_settings(&self.config, &next);
        if !differ.is_empty() {
            anyhow::bail!(
                "{} changes settings fixed when lb run started ({}): nothing applied; restart lb run to change them (sizes and timeouts also need `lb unload` first)",
                file.display(),
                differ.join(", ")
            );
        }
        Ok(next)
    }

    /// Makes a configuration file's VIPs and backends the running ones, in
    /// one change: the reconcile step touches only what differs, so flows
    /// to the backends kept stay where they are.
    fn apply_file(
        &mut self,
        file: &std::path::Path,
        text: &str,
    ) -> anyhow::Result<Vec<crate::model::diff::Change>> {
        let next = self.file_to_apply(file, text)?;
        let changes = crate::model::diff::diff(&self.config.desired, &next.desired);
        self.change_config(|config| {
            config.desired = next.desired;
            config.source = next.source;
            Ok(())
        })?;
        for change in &changes {
            tracing::info!(config = %file.display(), %change, "configuration applied");
        }
        Ok(changes)
    }

    /// SIGHUP: re-reads `--config` and applies it; a file with a mistake
    /// changes nothing and says why.
    fn reload(&mut self, path: Option<&std::path::Path>) {
        let Some(path) = path else {
            tracing::warn!("SIGHUP: lb run has no --config to re-read; nothing changed");
            return;
        };
        let applied = config::read(path)
            .map_err(anyhow::Error::from)
            .and_then(|text| self.apply_file(path, &text));
        match applied {
            Ok(changes) => tracing::info!(
                config = %path.display(), changes = changes.len(),
                "SIGHUP: configuration re-read and applied"
            ),
            Err(error) => tracing::error!(
                config = %path.display(), error = format!("{error:#}"),
                "SIGHUP: configuration not applied; the running one is unchanged"
            ),
        }
    }

    /// `lb flows`: answered on `reply` by a walk off the loop.
    fn list_flows(
        &self,
        vip: crate::model::Vip,
        limit: u32,
        reply: tokio::sync::oneshot::Sender<crate::api::Reply>,
    ) {
        let Some(owners) = self.reconciler.flow_owners(&vip) else {
            let _ =
                reply.send(crate::api::Reply::NotFound(ChangeError::UnknownVip(vip).to_string()));
            return;
        };
        flows::list(Arc::clone(&self.flow_counter), vip, owners, limit, reply);
    }

    fn health_report(&mut self, report: HealthReport) {
        let (vip, backend) = (report.vip, report.backend);
        let Some(transition) = self.checks.observe(report) else { return };
        match transition.to {
            Health::Up => {
                tracing::info!(%vip, %backend, reason = %transition.reason, "backend up")
            }
            Health::Down => {
                tracing::warn!(%vip, %backend, reason = %transition.reason, "backend down")
            }
        }
        let was_all_down = self.reconciler.vip_status(&vip).is_some_and(|status| status.fail_open);
        if let Err(error) = self.reconciler.apply(&self.config.desired, &self.checks.health_map()) {
            tracing::error!(%error, "installing tables after a health change failed");
        }
        let status = self.reconciler.vip_status(&vip);
        let all_down = status.is_some_and(|status| status.fail_open);
        if all_down && !was_all_down {
            tracing::error!(
                %vip,
                forwarding_to = status.map_or(0, |status| status.serving),
                "every backend of the VIP is down: forwarding to those that were up before (fail-open) rather than dropping"
            );
        } else if was_all_down && !all_down {
            tracing::info!(%vip, "a backend of the VIP is up again: fail-open ended");
        }
    }

    fn neighbours_changed(&mut self, found: Neighbours) {
        let mut changed = false;
        for (address, mac) in found {
            if self.reconciler.set_mac(address, mac) {
                tracing::info!(%address, mac = %format_mac(mac), "backend MAC resolved");
                changed = true;
            }
        }
        if changed
            && let Err(error) =
                self.reconciler.apply(&self.config.desired, &self.checks.health_map())
        {
            tracing::error!(%error, "installing tables after a MAC change failed");
        }
    }

    /// A new count of active flows: the least-connections VIPs get new
    /// shares of new flows from it.
    fn flows_counted(&mut self) {
        let confirmed = match self.reconciler.datapath().flow_event_counters() {
            Ok(counters) => datapath::total_of(&counters, lb_common::FlowEvent::Confirmed),
            Err(error) => {
                tracing::warn!(%error, "reading the flow counters failed: planning for the least new flows");
                self.last_confirmed.unwrap_or_default()
            }
        };
        let recently_confirmed = confirmed.saturating_sub(self.last_confirmed.unwrap_or(confirmed));
        self.last_confirmed = Some(confirmed);
        let active = self.active_flows.borrow().clone();
        self.reconciler.set_flow_counts(FlowCounts { active, recently_confirmed });
        let scheduled = self
            .config
            .desired
            .vips
            .values()
            .any(|spec| spec.scheduler == Scheduler::LeastConnections);
        if scheduled
            && let Err(error) =
                self.reconciler.apply(&self.config.desired, &self.checks.health_map())
        {
            tracing::error!(%error, "installing least-connections tables after a flow count failed");
        }
    }

    fn sample_rates(&mut self) {
        let datapath = self.reconciler.datapath();
        for vip in self.config.desired.vips.keys() {
            if let Some(index) = self.reconciler.vip_index(vip)
                && let Ok(counters) = datapath.vip_counters(index)
            {
                self.rates.sample(Counted::Vip(index), counters);
            }
            for slot in self.reconciler.backend_slots(vip) {
                if let Ok(counters) = datapath.backend_counters(slot) {
                    self.rates.sample(Counted::Backend(slot), counters);
                }
            }
        }
    }
}
