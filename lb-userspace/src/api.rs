//! The control API between `lb` commands and `lb run`: one JSON object per
//! line over a Unix socket, a request then its reply. The reply bodies are
//! also what `--json` prints, so their field names are a stable interface.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::health::{CheckOptions, CheckSpec};
use crate::model::{Affinity, Protocol, Vip};

pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    VipAdd {
        vip: Vip,
        check: CheckOptions,
        #[serde(default)]
        affinity: Affinity,
    },
    /// Changes the given fields of a VIP's check.
    CheckSet {
        vip: Vip,
        check: CheckOptions,
    },
    VipRemove {
        vip: Vip,
    },
    VipList,
    BackendAdd {
        vip: Vip,
        address: IpAddr,
        weight: u32,
    },
    /// Stops (`draining: true`) or resumes new flows to a backend.
    BackendDrain {
        vip: Vip,
        address: IpAddr,
        draining: bool,
    },
    /// Changes a backend's weight.
    BackendSet {
        vip: Vip,
        address: IpAddr,
        weight: u32,
    },
    BackendRemove {
        vip: Vip,
        address: IpAddr,
    },
    BackendList {
        vip: Option<Vip>,
    },
    Stats,
    Lookup {
        vip: Vip,
        client: SocketAddr,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(Body),
    Error(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    Done { message: String },
    Vips { vips: Vec<VipView> },
    Backends { backends: Vec<BackendView> },
    Stats(StatsView),
    Lookup(LookupView),
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
    pub check: CheckSpec,
    pub packets: u64,
    pub bytes: u64,
    /// Over the last second.
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
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
    pub mac: Option<String>,
    /// Entries of the VIP's Maglev table that point at it.
    pub table_entries: u32,
    pub packets: u64,
    pub bytes: u64,
    pub packets_per_second: f64,
    pub bytes_per_second: f64,
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
    /// Memory the kernel charges for the flow table, when it says.
    pub flow_table_memory_bytes: Option<u64>,
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

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon at {path}: {error} (is `lb run` running? use --socket to point elsewhere)"
    )]
    Connect { path: String, error: std::io::Error },
    #[error("talking to the daemon at {path} failed: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("the daemon's reply was not understood")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request and waits for its reply.
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    let path = socket.display().to_string();
    let io = |error| ClientError::Io { path: path.clone(), error };
    let mut stream = UnixStream::connect(socket)
        .map_err(|error| ClientError::Connect { path: path.clone(), error })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    Ok(serde_json::from_str(&reply)?)
}
