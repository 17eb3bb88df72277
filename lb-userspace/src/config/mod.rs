//! The configuration file (TOML) and the persisted state, which share one
//! schema: datapath settings plus `[[vip]]` tables with `[[vip.backend]]`s.
//!
//! ```toml
//! hash_seed = 7          # same on every balancer that shares the VIPs; default: random, kept in the state
//! table_size = 65537     # a prime
//! max_vips = 64
//! max_backends = 4096
//! flow_table_size = 1048576
//! udp_idle_timeout_ms = 30000
//! tcp_idle_timeout_ms = 3600000
//! announce_table = 100   # publish VIP routes here for BIRD/FRR; default off
//!
//! [sync]                 # optional: share flows with peer balancers
//! listen = "198.18.2.1:9470"
//! peers = ["198.18.2.2", "198.18.2.3:9470"]
//! key_file = "/etc/lb/sync.key"
//!
//! [[vip]]
//! address = "198.18.0.10:80"
//! protocol = "tcp"       # default tcp
//! affinity = "flow"      # or "client-ip"
//! scheduler = "maglev"   # or "least-connections": new flows to the least loaded
//!
//! [vip.check]            # optional; default: a tcp connect to the VIP port
//! type = "http"          # tcp, http, ws or none
//! path = "/health"
//! status = "200-399"
//! interval_ms = 300
//! timeout_ms = 250
//! rise = 2
//! fall = 3
//!
//! [[vip.backend]]
//! address = "198.18.1.1"
//! weight = 1             # 1 to 256, default 1
//! draining = false       # true: no new flows, established ones continue
//! ```

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{DatapathConfig, DesiredState, Limits, Vip};
use crate::store::StoreConfig;

mod file;
#[cfg(test)]
mod tests;

pub use file::{parse, parse_with, render};

/// Everything `lb run` needs besides its command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub datapath: DatapathConfig,
    pub desired: DesiredState,
    /// Flow sync with peer balancers, when configured.
    pub sync: Option<SyncConfig>,
    /// Kernel routing table where serving VIPs are published, when set.
    pub announce_table: Option<u32>,
    /// Which fleet-wide settings the file set (a state file sets them all).
    /// A seed left out keeps the state's or is picked; with a store, a
    /// setting left out is the store's, and one set must match it.
    pub explicit: Explicit,
    /// In the state file only: the configuration file last applied as a
    /// whole (at start, by `lb config apply` or SIGHUP). `lb run --config`
    /// restores the state instead of the file while the file is unchanged.
    pub source: Option<ConfigSource>,
    /// `[store]`: the fleet store the desired state lives in, when set.
    pub store: Option<StoreConfig>,
    /// In the state file only, with a store: the store revision the desired
    /// state is a copy of, so a restart while the store is unreachable
    /// starts from it.
    pub store_copy: Option<StoreCopy>,
}

/// The fleet-wide settings a file set rather than left to their defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Explicit {
    pub hash_seed: bool,
    pub table_size: bool,
    pub max_vips: bool,
    pub max_backends: bool,
}

/// Where the state file's desired state came from, with a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreCopy {
    /// The store's prefix: a copy of another prefix is not used.
    pub prefix: String,
    /// The etcd cluster's id, in hex.
    pub cluster_id: String,
    pub revision: i64,
    /// Backends registered by `lb agent`, with their leases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentLease>,
}

impl StoreCopy {
    pub fn new(
        prefix: &str,
        cluster_id: u64,
        revision: i64,
        leases: &BTreeMap<(Vip, IpAddr), i64>,
    ) -> Self {
        let agents = leases
            .iter()
            .map(|((vip, backend), lease)| AgentLease {
                vip: vip.to_string(),
                backend: *backend,
                lease: format!("{lease:x}"),
            })
            .collect();
        Self { prefix: prefix.to_owned(), cluster_id: format!("{cluster_id:x}"), revision, agents }
    }

    /// The agents' leases, by VIP and backend (entries that do not parse are left out).
    pub fn leases(&self) -> BTreeMap<(Vip, IpAddr), i64> {
        self.agents
            .iter()
            .filter_map(|agent| {
                let vip = crate::model::parse_vip(&agent.vip, None).ok()?;
                let lease = i64::from_str_radix(&agent.lease, 16).ok()?;
                Some(((vip, agent.backend), lease))
            })
            .collect()
    }
}

/// A backend that `lb agent` registered under a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLease {
    pub vip: String,
    pub backend: IpAddr,
    /// The lease, in hex as etcdctl prints it.
    pub lease: String,
}

/// A configuration file as it was when applied: its path and a digest of
/// its text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// xxh3-64 of the file's bytes, in hex.
    pub digest: String,
}

impl ConfigSource {
    pub fn of(path: &Path, text: &str) -> Self {
        let digest = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()));
        Self { path: path.to_owned(), digest }
    }
}

/// The `[sync]` table (or `--sync-*`): where to listen, which peers, and
/// the file holding the fleet's shared key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    pub listen: SocketAddr,
    #[serde(serialize_with = "peers_out", deserialize_with = "peers_in")]
    pub peers: Vec<SocketAddr>,
    pub key_file: PathBuf,
}

fn peers_out<S: serde::Serializer>(peers: &[SocketAddr], out: S) -> Result<S::Ok, S::Error> {
    out.collect_seq(peers.iter().map(ToString::to_string))
}

fn peers_in<'de, D: serde::Deserializer<'de>>(input: D) -> Result<Vec<SocketAddr>, D::Error> {
    let texts = Vec::<String>::deserialize(input)?;
    texts
        .iter()
        .map(|text| crate::sync::parse_peer(text).map_err(serde::de::Error::custom))
        .collect()
}

/// The kernel's own routing tables, which announcing must not use.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];

/// Why an announce table is refused, if it is.
pub fn check_announce_table(table: u32) -> Result<u32, String> {
    if RESERVED_TABLES.contains(&table) {
        return Err(format!(
            "table {table} is one of the kernel's own (unspec, default, main, local): choose another, e.g. 100"
        ));
    }
    Ok(table)
}

impl Config {
    /// The digest of the configuration file this was read from, if any: the
    /// same digest means the same file, unchanged since it was applied.
    pub fn source_digest(&self) -> Option<&str> {
        self.source.as_ref().map(|source| source.digest.as_str())
    }

    pub fn limits(&self) -> Limits {
        self.datapath.limits()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}:{line}: {field}: {message}")]
    Invalid { path: PathBuf, line: usize, field: String, message: String },
    /// Several mistakes in one file, each an `Invalid`, one per line.
    #[error("{}: {} mistakes:\n{}", path.display(), mistakes.len(), mistakes.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Mistakes { path: PathBuf, mistakes: Vec<ConfigError> },
    #[error("{path}: writing the state failed: {error}")]
    Write { path: PathBuf, error: std::io::Error },
}

/// Reads and validates a config or state file. Nothing is applied here: a
/// file with any error is refused as a whole.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&read(path)?, path)
}

/// A config or state file's text; an error names the file.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map_err(|error| ConfigError::Read { path: path.to_owned(), error })
}

/// Reads a configuration file to apply as a whole: [`load`], with
/// `source` naming the file and its digest.
pub fn load_source(path: &Path) -> Result<Config, ConfigError> {
    parse_source(&read(path)?, path)
}

/// [`parse`], with `source` naming the file and its digest.
pub fn parse_source(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut config = parse(text, path)?;
    config.source = Some(ConfigSource::of(path, text));
    Ok(config)
}

/// [`parse_source`] of a file applied to a fleet whose store holds its
/// VIPs: what the file leaves out is the running balancer's (`running`),
/// so its VIPs are counted against the fleet's limits and only a setting
/// the file gives otherwise is a difference.
pub fn parse_source_for_fleet(
    text: &str,
    path: &Path,
    running: &DatapathConfig,
) -> Result<Config, ConfigError> {
    let mut config = file::parse_with(text, path, *running, None)?;
    config.source = Some(ConfigSource::of(path, text));
    Ok(config)
}

/// The settings fixed when the datapath is loaded (or the fleet joined)
/// that differ between the running configuration and a file's, as
/// `name running -> file`: a file that changes any cannot be applied
/// without a restart. A seed the file does not set is not a difference,
/// nor, with a store, any fleet setting it does not set.
pub fn restart_settings(running: &Config, file: &Config) -> Vec<String> {
    let (now, next) = (&running.datapath, &file.datapath);
    let mut differ = Vec::new();
    let mut compare = |name: &str, now: String, next: String| {
        if now != next {
            differ.push(format!("{name} {now} -> {next}"));
        }
    };
    // With a store, a fleet setting the file leaves out is the store's.
    let store = running.store.is_some();
    let set = file.explicit;
    for (name, given, now, next) in [
        ("hash_seed", set.hash_seed, now.hash_seed, next.hash_seed),
        ("table_size", set.table_size || !store, now.table_size, next.table_size),
        ("max_vips", set.max_vips || !store, now.max_vips, next.max_vips),
        ("max_backends", set.max_backends || !store, now.max_backends, next.max_backends),
    ] {
        if given {
            compare(name, now.to_string(), next.to_string());
        }
    }
    compare("flow_table_size", now.flow_table_size.to_string(), next.flow_table_size.to_string());
    compare(
        "udp_idle_timeout_ms",
        now.udp_idle_timeout_ms.to_string(),
        next.udp_idle_timeout_ms.to_string(),
    );
    compare(
        "tcp_idle_timeout_ms",
        now.tcp_idle_timeout_ms.to_string(),
        next.tcp_idle_timeout_ms.to_string(),
    );
    compare(
        "announce_table",
        format!("{:?}", running.announce_table),
        format!("{:?}", file.announce_table),
    );
    compare("[sync]", format!("{:?}", running.sync), format!("{:?}", file.sync));
    // A file of VIPs to load into the store needs no [store] of its own.
    if let Some(store) = &file.store {
        let running = running.store.as_ref().map_or("none".to_owned(), StoreConfig::url);
        compare("[store]", running, store.url());
    }
    differ
}

/// Writes the state atomically: a crash leaves either the old or the new
/// file, never a partial one.
pub fn save(config: &Config, path: &Path) -> Result<(), ConfigError> {
    let write_error = |error| ConfigError::Write { path: path.to_owned(), error };
    let directory = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(directory).map_err(write_error)?;
    let mut temporary = tempfile::NamedTempFile::new_in(directory).map_err(write_error)?;
    temporary.write_all(render(config).as_bytes()).map_err(write_error)?;
    temporary.as_file().sync_all().map_err(write_error)?;
    temporary.persist(path).map_err(|error| write_error(error.error))?;
    std::fs::File::open(directory).and_then(|dir| dir.sync_all()).map_err(write_error)?;
    Ok(())
}
