//! `lb run`: owns the desired state, persists it, and is the only writer of
//! the BPF maps. Every change (a CLI request, a neighbour update) goes
//! through [`Daemon::reconcile`] on one task, so changes never interleave.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use lb_common::TrafficCounters;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

use crate::api::{BackendView, Body, LookupView, Reply, Request, StatsView, VipView};
use crate::config::{self, Config};
use crate::datapath::{AttachMode, Datapath};
use crate::health::{self, CheckKind, CheckSpec, Health, HealthState};
use crate::model::{BackendSpec, ChangeError, Vip};
use crate::neighbour::{self, Neighbours};
use crate::reconcile::{BackendHealth, HealthMap, Reconciler};

pub const DEFAULT_STATE: &str = "/var/lib/lb/state.toml";

/// The longest request line accepted on the control socket.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

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
}

/// Where one interface's datapath is pinned.
pub fn pin_dir_for(pin_dir: &Path, iface: &str) -> PathBuf {
    pin_dir.join(iface)
}

/// Mounts bpffs on /sys/fs/bpf when the pin directory is below it and it is
/// missing (as inside `ip netns exec`, which remounts /sys).
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) || crate::datapath::is_bpffs(root) {
        return Ok(());
    }
    let target = std::ffi::CString::new("/sys/fs/bpf")?;
    let kind = std::ffi::CString::new("bpf")?;
    // SAFETY: mount with valid C strings and no data; it changes only this
    // process's mount namespace view of /sys/fs/bpf.
    let result =
        unsafe { libc::mount(kind.as_ptr(), target.as_ptr(), kind.as_ptr(), 0, std::ptr::null()) };
    if result != 0 {
        anyhow::bail!("mounting bpffs on /sys/fs/bpf failed: {}", std::io::Error::last_os_error());
    }
    tracing::info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

type Call = (Request, oneshot::Sender<Reply>);

/// Where the configuration comes from: `--config` when given (it replaces the
/// persisted state), else the state file when it exists, else empty defaults.
fn initial_config(options: &RunOptions) -> anyhow::Result<Config> {
    if let Some(path) = &options.config {
        let config = config::load(path)?;
        tracing::info!(config = %path.display(), vips = config.desired.vips.len(), "configuration loaded");
        return Ok(config);
    }
    if options.state.exists() {
        let config = config::load(&options.state)?;
        tracing::info!(state = %options.state.display(), vips = config.desired.vips.len(), "state restored");
        return Ok(config);
    }
    tracing::info!(state = %options.state.display(), "no state yet: starting empty");
    Ok(Config::default())
}

pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = initial_config(&options)?;
    let ifindex = neighbour::interface_index(&options.iface)
        .with_context(|| format!("interface '{}' not found (see `ip link`)", options.iface))?;
    ensure_bpffs(&options.pin_dir)?;
    let pins = pin_dir_for(&options.pin_dir, &options.iface);
    let mut datapath = Datapath::load_pinned(config.datapath, &pins)?;
    let adopted = datapath.adopted();
    if adopted {
        let forwarded = datapath
            .reason_counters()?
            .into_iter()
            .find(|(reason, _)| *reason == lb_common::Reason::Forwarded)
            .map_or(0, |(_, count)| count);
        let flows: u64 = datapath.active_flows().values().sum();
        tracing::info!(
            pins = %pins.display(), active_flows = flows, forwarded_packets = forwarded,
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

    let listener = bind_socket(&options.socket, options.socket_group.as_deref())?;
    let metrics_listener = match options.metrics {
        Some(address) => Some((crate::metrics::bind(address).await?, address)),
        None => None,
    };
    let (wanted_tx, wanted_rx) = watch::channel(Vec::new());
    let (neighbours_tx, mut neighbours_rx) = mpsc::channel(4);
    let neighbour_task = tokio::spawn(neighbour::run(ifindex, wanted_rx, neighbours_tx));
    let (calls_tx, mut calls_rx) = mpsc::channel::<Call>(64);
    let metrics_task = metrics_listener.map(|(listener, address)| {
        tracing::info!(%address, "serving Prometheus metrics on /metrics");
        tokio::spawn(crate::metrics::serve(listener, calls_tx.clone()))
    });
    let accept_task = tokio::spawn(serve(listener, calls_tx));

    let (reports_tx, mut reports_rx) = mpsc::channel::<HealthReport>(256);
    let mut daemon = Daemon {
        config,
        reconciler: Reconciler::new(datapath),
        state_path: options.state.clone(),
        rates: Rates::default(),
        checks: HashMap::new(),
        reports: reports_tx,
        next_generation: 0,
    };
    daemon.sync_checks(if adopted { Start::Adopted } else { Start::Fresh });
    daemon.reconciler.apply(&daemon.config.desired, &daemon.health_map())?;
    config::save(&daemon.config, &daemon.state_path)?;
    wanted_tx.send_replace(daemon.reconciler.wanted_neighbours());

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tracing::info!(socket = %options.socket.display(), "serving the control socket");
    loop {
        tokio::select! {
            Some((request, reply)) = calls_rx.recv() => {
                let answer = daemon.handle(request);
                wanted_tx.send_if_modified(|wanted| {
                    let now = daemon.reconciler.wanted_neighbours();
                    let changed = *wanted != now;
                    *wanted = now;
                    changed
                });
                let _ = reply.send(answer);
            }
            Some(found) = neighbours_rx.recv() => daemon.neighbours_changed(found),
            Some(report) = reports_rx.recv() => daemon.health_report(report),
            _ = tick.tick() => daemon.sample_rates(),
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: detaching"); break; }
            _ = terminate.recv() => { tracing::info!("SIGTERM: detaching"); break; }
        }
    }
    accept_task.abort();
    neighbour_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    for checker in daemon.checks.values() {
        checker.task.abort();
    }
    let _ = std::fs::remove_file(&options.socket);
    if options.detach_on_exit {
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

/// Binds the control socket: mode 0600 (root only), or 0660 owned by
/// `group`. Anyone else is refused by the kernel before reaching us. A
/// socket file left by a daemon that died is replaced; one that still
/// answers means another daemon runs.
fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<UnixListener> {
    let gid = group.map(group_id).transpose()?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another `lb run` is serving {} (stop it, or pass another --socket)",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    match gid {
        None => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?,
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        }
    }
    Ok(listener)
}

/// The id of a group, by name (or number).
fn group_id(name: &str) -> anyhow::Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c_name = std::ffi::CString::new(name).context("group name has a NUL byte")?;
    // SAFETY: getgrnam reads the C string we own and returns a pointer to a
    // static buffer (or null), which we read at once on this thread.
    let entry = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if entry.is_null() {
        anyhow::bail!("--socket-group: no group named '{name}' (see /etc/group)");
    }
    // SAFETY: entry is non-null and points to a valid struct group.
    Ok(unsafe { (*entry).gr_gid })
}

async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, calls.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a control connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Answers request lines until the client closes. Garbage gets an error reply
/// and never reaches the daemon's state; an over-long line ends the connection.
async fn connection(stream: UnixStream, calls: mpsc::Sender<Call>) {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let mut line = Vec::new();
        match (&mut reader).take(MAX_REQUEST_BYTES as u64 + 1).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = line.len() > MAX_REQUEST_BYTES;
        let reply = if too_long {
            Reply::Error(format!("request longer than {MAX_REQUEST_BYTES} bytes"))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Err(error) => Reply::Error(format!("malformed request: {error}")),
                Ok(request) => {
                    let (reply_tx, reply_rx) = oneshot::channel();
                    if calls.send((request, reply_tx)).await.is_err() {
                        return;
                    }
                    reply_rx.await.unwrap_or_else(|_| Reply::Error("the daemon is stopping".into()))
                }
            }
        };
        let mut text = serde_json::to_string(&reply).expect("replies serialize");
        text.push('\n');
        if writer.write_all(text.as_bytes()).await.is_err() || too_long {
            return;
        }
    }
}

/// Rates over the last sampling interval, per VIP index and backend slot.
#[derive(Default)]
struct Rates {
    last: HashMap<(bool, u32), (Instant, TrafficCounters)>,
    current: HashMap<(bool, u32), (f64, f64)>,
}

impl Rates {
    fn sample(&mut self, key: (bool, u32), counters: TrafficCounters) {
        let now = Instant::now();
        if let Some((then, before)) = self.last.get(&key) {
            let seconds = now.duration_since(*then).as_secs_f64().max(1e-3);
            let packets = counters.packets.saturating_sub(before.packets) as f64 / seconds;
            let bytes = counters.bytes.saturating_sub(before.bytes) as f64 / seconds;
            self.current.insert(key, (packets, bytes));
        }
        self.last.insert(key, (now, counters));
    }

    fn get(&self, key: (bool, u32)) -> (f64, f64) {
        self.current.get(&key).copied().unwrap_or_default()
    }
}

const VIP_KEY: bool = true;
const BACKEND_KEY: bool = false;

/// When check tasks are created.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// `lb run` with a fresh datapath.
    Fresh,
    /// `lb run` adopting a pinned datapath that is forwarding.
    Adopted,
    /// A change while running.
    Running,
}

struct Daemon {
    config: Config,
    reconciler: Reconciler,
    state_path: PathBuf,
    rates: Rates,
    /// One check task and health state per (VIP, backend).
    checks: HashMap<(Vip, IpAddr), Checker>,
    reports: mpsc::Sender<HealthReport>,
    next_generation: u64,
}

/// A backend's check task and what its reports have established.
struct Checker {
    spec: CheckSpec,
    /// Reports from an older task (before a spec change) carry another
    /// generation and are ignored.
    generation: u64,
    task: tokio::task::JoinHandle<()>,
    state: HealthState,
}

struct HealthReport {
    vip: Vip,
    backend: IpAddr,
    generation: u64,
    outcome: Result<(), String>,
}

/// Checks `backend` every interval until aborted, reporting each outcome.
async fn check_loop(
    vip: Vip,
    backend: IpAddr,
    spec: CheckSpec,
    generation: u64,
    reports: mpsc::Sender<HealthReport>,
) {
    let mut interval = tokio::time::interval(spec.interval());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let outcome = health::check_once(&spec, backend, vip.port).await;
        if reports.send(HealthReport { vip, backend, generation, outcome }).await.is_err() {
            return;
        }
    }
}

impl Daemon {
    fn handle(&mut self, request: Request) -> Reply {
        match self.answer(request) {
            Ok(body) => Reply::Ok(body),
            Err(error) => Reply::Error(format!("{error:#}")),
        }
    }

    fn answer(&mut self, request: Request) -> anyhow::Result<Body> {
        let limits = self.config.limits();
        let done = |message: String| Ok(Body::Done { message });
        match request {
            Request::VipAdd { vip, check, affinity } => {
                let check = check.applied_to(&CheckSpec::default());
                self.change(|state| state.add_vip(vip, check, affinity, limits))?;
                done(format!("VIP {vip} added"))
            }
            Request::CheckSet { vip, check } => {
                let current =
                    self.config.desired.vips.get(&vip).ok_or(ChangeError::UnknownVip(vip))?;
                let check = check.applied_to(&current.check);
                let summary = serde_json::to_string(&check)?;
                self.change(|state| state.set_check(&vip, check))?;
                done(format!("VIP {vip} check set to {summary}"))
            }
            Request::VipRemove { vip } => {
                self.change(|state| state.remove_vip(&vip))?;
                done(format!("VIP {vip} removed"))
            }
            Request::BackendAdd { vip, address, weight } => {
                self.change(|state| {
                    state.add_backend(&vip, BackendSpec::new(address, weight), limits)
                })?;
                done(format!("backend {address} (weight {weight}) added to VIP {vip}"))
            }
            Request::BackendDrain { vip, address, draining } => {
                self.change(|state| state.set_draining(&vip, address, draining))?;
                if draining {
                    done(format!(
                        "backend {address} of VIP {vip} is draining: no new flows, established ones continue (watch ACTIVE FLOWS in `lb backend list`)"
                    ))
                } else {
                    done(format!("backend {address} of VIP {vip} takes new flows again"))
                }
            }
            Request::BackendSet { vip, address, weight } => {
                self.change(|state| state.set_weight(&vip, address, weight))?;
                done(format!(
                    "backend {address} of VIP {vip} now has weight {weight}; established flows stay where they are"
                ))
            }
            Request::BackendRemove { vip, address } => {
                self.change(|state| state.remove_backend(&vip, address))?;
                done(format!("backend {address} removed from VIP {vip}"))
            }
            Request::VipList => Ok(Body::Vips { vips: self.vip_views()? }),
            Request::BackendList { vip } => {
                if let Some(vip) = vip
                    && !self.config.desired.vips.contains_key(&vip)
                {
                    anyhow::bail!(ChangeError::UnknownVip(vip));
                }
                Ok(Body::Backends { backends: self.backend_views(vip.as_ref())? })
            }
            Request::Stats => Ok(Body::Stats(StatsView {
                vips: self.vip_views()?,
                backends: self.backend_views(None)?,
                reasons: self
                    .reconciler
                    .datapath()
                    .reason_counters()?
                    .into_iter()
                    .map(|(reason, count)| (reason.name().to_owned(), count))
                    .collect(),
                tables_built: self.reconciler.tables_built(),
                table_rebuild_seconds: self.reconciler.table_rebuild_time().as_secs_f64(),
                flow_events: self
                    .reconciler
                    .datapath()
                    .flow_event_counters()?
                    .into_iter()
                    .map(|(event, count)| (event.name().to_owned(), count))
                    .collect(),
                flow_table_size: self.config.datapath.flow_table_size,
                flow_table_memory_bytes: self.reconciler.datapath().flow_table_memory(),
            })),
            Request::Lookup { vip, client } => {
                let result =
                    self.reconciler.lookup(&vip, client).ok_or(ChangeError::UnknownVip(vip))?;
                Ok(Body::Lookup(LookupView {
                    vip: vip.to_string(),
                    client,
                    backend: result.backend,
                    established_backend: result.established_backend,
                    hash: result.hash,
                    table_entry: result.table_entry,
                }))
            }
        }
    }

    /// Applies one change: validated on a copy, persisted, then installed. A
    /// refused or failed change leaves the running and saved state as before.
    fn change(
        &mut self,
        edit: impl FnOnce(&mut crate::model::DesiredState) -> Result<(), ChangeError>,
    ) -> anyhow::Result<()> {
        let mut next = self.config.clone();
        edit(&mut next.desired)?;
        config::save(&next, &self.state_path)?;
        let previous = std::mem::replace(&mut self.config, next);
        self.sync_checks(Start::Running);
        if let Err(error) = self.reconciler.apply(&self.config.desired, &self.health_map()) {
            // Put back what was running and what was saved.
            self.config = previous;
            self.sync_checks(Start::Running);
            let _ = self.reconciler.apply(&self.config.desired, &self.health_map());
            let _ = config::save(&self.config, &self.state_path);
            return Err(error.into());
        }
        tracing::info!(state = %self.state_path.display(), "configuration changed and saved");
        Ok(())
    }

    /// Starts, restarts and stops check tasks to match the configuration.
    /// Backends present at start are decided by their first check (those of
    /// an adopted datapath keep serving meanwhile); backends added later
    /// start down and must pass `rise` checks.
    fn sync_checks(&mut self, start: Start) {
        let now = SystemTime::now();
        let mut wanted: HashMap<(Vip, IpAddr), CheckSpec> = HashMap::new();
        for (vip, spec) in &self.config.desired.vips {
            for address in spec.backends.keys() {
                wanted.insert((*vip, *address), spec.check.clone());
            }
        }
        self.checks.retain(|key, checker| {
            let keep = wanted.contains_key(key);
            if !keep {
                checker.task.abort();
            }
            keep
        });
        for (key, spec) in wanted {
            if self.checks.get(&key).is_some_and(|checker| checker.spec == spec) {
                continue;
            }
            let state = match self.checks.remove(&key) {
                // A changed spec keeps the backend's health; its counts restart.
                Some(old) => {
                    old.task.abort();
                    HealthState { successes: 0, failures: 0, ..old.state }
                }
                None if spec.kind == CheckKind::None => HealthState::new_unchecked(now),
                None if start == Start::Adopted => HealthState::new_adopted(now),
                None if start == Start::Fresh => HealthState::new_at_start(now),
                None => HealthState::new_added(now),
            };
            let state =
                if spec.kind == CheckKind::None { HealthState::new_unchecked(now) } else { state };
            self.next_generation += 1;
            let generation = self.next_generation;
            let task = if spec.kind == CheckKind::None {
                tokio::spawn(async {})
            } else {
                tokio::spawn(check_loop(
                    key.0,
                    key.1,
                    spec.clone(),
                    generation,
                    self.reports.clone(),
                ))
            };
            self.checks.insert(key, Checker { spec, generation, task, state });
        }
    }

    fn health_map(&self) -> HealthMap {
        self.checks
            .iter()
            .map(|(key, checker)| {
                let up = checker.state.health == Health::Up;
                (*key, BackendHealth { up, ever_up: checker.state.ever_up })
            })
            .collect()
    }

    fn health_report(&mut self, report: HealthReport) {
        let key = (report.vip, report.backend);
        let Some(checker) = self.checks.get_mut(&key) else { return };
        if checker.generation != report.generation {
            return;
        }
        let (rise, fall) = (checker.spec.rise, checker.spec.fall);
        let Some(transition) = checker.state.observe(report.outcome, rise, fall, SystemTime::now())
        else {
            return;
        };
        match transition.to {
            Health::Up => {
                tracing::info!(vip = %report.vip, backend = %report.backend, reason = %transition.reason, "backend up")
            }
            Health::Down => {
                tracing::warn!(vip = %report.vip, backend = %report.backend, reason = %transition.reason, "backend down")
            }
        }
        let was_all_down =
            self.reconciler.vip_status(&report.vip).is_some_and(|status| status.fail_open);
        if let Err(error) = self.reconciler.apply(&self.config.desired, &self.health_map()) {
            tracing::error!(%error, "installing tables after a health change failed");
        }
        let status = self.reconciler.vip_status(&report.vip);
        let all_down = status.is_some_and(|status| status.fail_open);
        if all_down && !was_all_down {
            tracing::error!(
                vip = %report.vip,
                forwarding_to = status.map_or(0, |status| status.serving),
                "every backend of the VIP is down: forwarding to those that were up before (fail-open) rather than dropping"
            );
        } else if was_all_down && !all_down {
            tracing::info!(vip = %report.vip, "a backend of the VIP is up again: fail-open ended");
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
            && let Err(error) = self.reconciler.apply(&self.config.desired, &self.health_map())
        {
            tracing::error!(%error, "installing tables after a MAC change failed");
        }
    }

    fn sample_rates(&mut self) {
        for vip in self.config.desired.vips.keys() {
            if let Some(index) = self.reconciler.vip_index(vip)
                && let Ok(counters) = self.reconciler.datapath().vip_counters(index)
            {
                self.rates.sample((VIP_KEY, index), counters);
            }
            for slot in self.reconciler.backend_slots(vip) {
                if let Ok(counters) = self.reconciler.datapath().backend_counters(slot) {
                    self.rates.sample((BACKEND_KEY, slot), counters);
                }
            }
        }
    }

    fn vip_views(&self) -> anyhow::Result<Vec<VipView>> {
        let mut views = Vec::new();
        for (vip, spec) in &self.config.desired.vips {
            let status = self.reconciler.vip_status(vip).context("VIP not installed")?;
            let counters = self.reconciler.datapath().vip_counters(status.vip_index)?;
            let (packets_per_second, bytes_per_second) =
                self.rates.get((VIP_KEY, status.vip_index));
            views.push(VipView {
                vip: vip.to_string(),
                address: vip.address,
                port: vip.port,
                protocol: vip.protocol,
                backends: spec.backends.len(),
                active_backends: status.members,
                serving_backends: if status.fail_open { 0 } else { status.serving },
                all_down: status.fail_open,
                affinity: spec.affinity,
                check: spec.check.clone(),
                packets: counters.packets,
                bytes: counters.bytes,
                packets_per_second,
                bytes_per_second,
            });
        }
        Ok(views)
    }

    fn backend_views(&self, only: Option<&Vip>) -> anyhow::Result<Vec<BackendView>> {
        let mut views = Vec::new();
        let active_flows = self.reconciler.datapath().active_flows();
        for (vip, spec) in &self.config.desired.vips {
            if only.is_some_and(|only| only != vip) {
                continue;
            }
            for installed in self.reconciler.backends(vip) {
                let counters = self.reconciler.datapath().backend_counters(installed.slot)?;
                let (packets_per_second, bytes_per_second) =
                    self.rates.get((BACKEND_KEY, installed.slot));
                let health =
                    self.checks.get(&(*vip, installed.address)).map(|checker| &checker.state);
                let draining = spec.backends.get(&installed.address).is_some_and(|b| b.draining);
                let state = match (installed.mac, health.map(|h| h.health)) {
                    (None, _) => "resolving",
                    (Some(_), Some(Health::Down)) => "down",
                    (Some(_), _) if draining => "draining",
                    (Some(_), _) => "up",
                };
                views.push(BackendView {
                    vip: vip.to_string(),
                    address: installed.address,
                    weight: spec.backends.get(&installed.address).map_or(0, |b| b.weight),
                    state: state.to_owned(),
                    active_flows: active_flows.get(&installed.slot).copied().unwrap_or(0),
                    since: health.map_or(0.0, |h| {
                        h.since
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64()
                    }),
                    last_error: health.and_then(|h| h.last_error.clone()),
                    mac: installed.mac.map(format_mac),
                    table_entries: installed.table_entries,
                    packets: counters.packets,
                    bytes: counters.bytes,
                    packets_per_second,
                    bytes_per_second,
                });
            }
        }
        Ok(views)
    }
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(":")
}
