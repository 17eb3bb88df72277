//! What the daemon's replies show, field by field: the bodies `--json`
//! prints, so their names are a stable interface (fields are only added).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::model::{Affinity, CheckSpec, Forwarding, Protocol, Rebalance, Scheduler};

/// `lb flows VIP`: flows of the VIP found in the flow table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowsView {
    pub vip: String,
    pub flows: Vec<FlowView>,
    /// The walk stopped at the limit: the VIP may have more flows.
    pub truncated: bool,
}

/// One flow of the flow table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowView {
    pub client: SocketAddr,
    /// The backend it is pinned to; None when its backend was removed
    /// since (its next packet takes the Maglev choice).
    pub backend: Option<IpAddr>,
    /// `active`, `closing` (FIN or RST seen) or `idle` (past the idle timeout).
    pub state: String,
    /// Seconds since its last packet, to within the datapath's refresh
    /// interval.
    pub idle_seconds: f64,
}

/// A VIP as `lb vip list --json` and `lb stats --json` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipView {
    /// `ADDRESS:PORT/PROTOCOL`, IPv6 in brackets.
    pub vip: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Configured backends.
    pub backends: usize,
    /// Backends in the installed Maglev table (MAC resolved).
    pub active_backends: usize,
    /// Backends receiving new flows: the healthy ones.
    pub serving_backends: usize,
    /// No backend passes its checks, so the ones that did earlier keep
    /// receiving traffic rather than the VIP black-holing it.
    pub all_down: bool,
    pub affinity: Affinity,
    #[serde(default)]
    pub scheduler: Scheduler,
    /// The rebalancer's settings.
    #[serde(default)]
    pub rebalance: Rebalance,
    /// What the rebalancer is doing: `off`, `balanced`, `closing`,
    /// `dry-run: would close N`, or `paused: why`.
    #[serde(default)]
    pub rebalancing: String,
    /// How far the serving backend furthest from its share of the VIP's
    /// open connections is from it, above or below (0.25: 25% off), at the
    /// rebalancer's last look.
    #[serde(default)]
    pub rebalance_skew: f64,
    /// How packets reach the backends: DSR, or a tunnel (IPIP, GUE).
    #[serde(default)]
    pub forwarding: Forwarding,
    pub check: CheckSpec,
    pub packets: u64,
    pub bytes: u64,
    /// Of `packets`, ICMP errors about its flows (path MTU, unreachable,
    /// time exceeded) forwarded to the flow's backend.
    #[serde(default)]
    pub icmp_errors: u64,
    /// Packets of the VIP dropped after its lookup (no backend, backend MAC
    /// unresolved, internal); not in `packets`.
    #[serde(default)]
    pub dropped: u64,
    /// Over the last second.
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
    #[serde(default)]
    pub dropped_per_second: f64,
}

/// A backend of one VIP, as `lb backend list --json` and `lb stats --json` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub vip: String,
    pub address: IpAddr,
    pub weight: u32,
    /// `up` (passing checks, receiving new flows), `draining` (passing
    /// checks, no new flows), `down` (failing checks), or `resolving`
    /// (waiting for its MAC).
    pub state: String,
    /// Flows in the flow table that are neither closing nor idle: when a
    /// draining backend reaches 0, it can be removed without breaking any.
    pub active_flows: u64,
    /// Unix time (seconds) of the last up/down transition.
    pub since: f64,
    /// The last failed check's error, until a check passes.
    pub last_error: Option<String>,
    /// How long the last health check took; None before the first (or
    /// for check type none).
    #[serde(default)]
    pub last_check_seconds: Option<f64>,
    pub mac: Option<String>,
    /// The interface its packets leave by (`lb run --iface`, or one of its
    /// `--egress` interfaces); None while resolving.
    #[serde(default)]
    pub via: Option<String>,
    /// Entries of the VIP's Maglev table that point at it.
    pub table_entries: u32,
    /// The part of new flows it gets now (`table_entries` over the table
    /// size): the weights' part under maglev, or what least-connections
    /// gives it to even out the active flows.
    #[serde(default)]
    pub new_flow_share: f64,
    /// Its share of the VIP's open connections, which the rebalancer brings
    /// it back to once it is above the band; None unless the VIP rebalances.
    #[serde(default)]
    pub rebalance_target: Option<f64>,
    /// Connections the rebalancer closed on it since the daemon started.
    #[serde(default)]
    pub rebalance_closed: u64,
    /// In dry-run: connections the rebalancer would close on it now.
    #[serde(default)]
    pub rebalance_would_close: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Of `packets`, ICMP errors about its flows (path MTU, unreachable,
    /// time exceeded) forwarded to the flow's backend.
    #[serde(default)]
    pub icmp_errors: u64,
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
    /// Who declared it: `operator` (the CLI, a file, the store by hand) or
    /// `agent` (`lb agent` on the backend, under `lease`).
    #[serde(default = "operator")]
    pub origin: String,
    /// The agent's lease in the store, in hex as etcdctl prints it.
    #[serde(default)]
    pub lease: Option<String>,
}

fn operator() -> String {
    "operator".to_owned()
}

/// The fleet store as this balancer follows it (`lb store status`, and
/// `store` in `lb stats`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoreView {
    /// `etcd://HOST:PORT,.../PREFIX`.
    pub url: String,
    /// `connecting`, `connected`, `unreachable` or `refused` (its fleet
    /// settings differ from this balancer's).
    pub state: crate::store::StoreState,
    /// The store revision whose desired state is installed here.
    pub applied_revision: i64,
    /// The store's latest revision seen.
    pub store_revision: i64,
    /// Since the store last answered; None before it ever did.
    pub seconds_since_contact: Option<f64>,
    pub last_error: Option<String>,
    /// Started from the state's copy of this revision because the store did
    /// not answer; None once the store's own revision is applied.
    pub restored_from_local: Option<i64>,
    /// Keys of the store that are refused, and why; nothing else changes
    /// because of them.
    pub refused: Vec<crate::store::Refused>,
    /// Changes accepted here that wait for the store.
    pub pending_writes: usize,
    /// The last revision that could not be installed, and why.
    pub apply_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub vips: Vec<VipView>,
    pub backends: Vec<BackendView>,
    /// Packets per datapath reason (`forwarded`, `pass_not_vip`, `drop_fragment`, ...).
    pub reasons: BTreeMap<String, u64>,
    /// Maglev tables built and installed since `lb run` started.
    pub tables_built: u64,
    /// Time spent building and installing them.
    pub table_rebuild_seconds: f64,
    /// Packets per flow-table path (`created`, `hit`, `miss_fallback`, `rescued`, `expired`).
    pub flow_events: BTreeMap<String, u64>,
    pub flow_table_size: u32,
    /// Entries in the flow table at the last count (about every second).
    #[serde(default)]
    pub flow_table_entries: u64,
    /// Most VIPs and backends the maps hold (`max_vips`, `max_backends`).
    #[serde(default)]
    pub max_vips: u32,
    #[serde(default)]
    pub max_backends: u32,
    /// How the program is attached: `native` (driver) or `skb` (generic,
    /// much slower).
    #[serde(default)]
    pub attach_mode: String,
    /// Memory the kernel charges for the flow table, when it says.
    pub flow_table_memory_bytes: Option<u64>,
    /// Memory the kernel charges for all the datapath's maps (the flow
    /// table, the unconfirmed table, the Maglev tables, the sync ring...).
    #[serde(default)]
    pub map_memory_bytes: Option<u64>,
    /// Kernel routing table VIP routes are published in (`--announce-table`).
    pub announce_table: Option<u32>,
    /// VIP addresses published there now (empty when announcing is off).
    pub announced: Vec<IpAddr>,
    /// Flow sync with peer balancers, when configured.
    pub sync: Option<Box<crate::sync::SyncStatus>>,
    /// The fleet store, when configured.
    #[serde(default)]
    pub store: Option<Box<StoreView>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LookupView {
    pub vip: String,
    pub client: SocketAddr,
    /// Where a new connection of this flow goes; None when the VIP has no
    /// backend in its table.
    pub backend: Option<IpAddr>,
    /// Where the flow's established connection goes, if the flow table has it.
    pub established_backend: Option<IpAddr>,
    pub hash: u32,
    pub table_entry: u32,
}
