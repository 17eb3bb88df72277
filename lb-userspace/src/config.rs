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

use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::maglev::is_valid_table_size;
#[cfg(test)]
use crate::model::CheckKind;
use crate::model::{
    Affinity, BackendSpec, CheckOptions, CheckSpec, DEFAULT_WEIGHT, DatapathConfig, DesiredState,
    Limits, Protocol, Scheduler, Vip, parse_address, parse_endpoint,
};

/// Everything `lb run` needs besides its command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub datapath: DatapathConfig,
    pub desired: DesiredState,
    /// Flow sync with peer balancers, when configured.
    pub sync: Option<SyncConfig>,
    /// Kernel routing table where serving VIPs are published, when set.
    pub announce_table: Option<u32>,
    /// Whether the file set `hash_seed` (a state file always does). When it
    /// did not, `lb run` keeps the seed of its state or picks a random one.
    pub hash_seed_set: bool,
    /// In the state file only: the configuration file last applied as a
    /// whole (at start, by `lb config apply` or SIGHUP). `lb run --config`
    /// restores the state instead of the file while the file is unchanged.
    pub source: Option<ConfigSource>,
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
    #[error("{path}: writing the state failed: {error}")]
    Write { path: PathBuf, error: std::io::Error },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    hash_seed: Option<u32>,
    table_size: Option<Spanned<u32>>,
    max_vips: Option<Spanned<u32>>,
    max_backends: Option<Spanned<u32>>,
    flow_table_size: Option<Spanned<u32>>,
    udp_idle_timeout_ms: Option<Spanned<u64>>,
    tcp_idle_timeout_ms: Option<Spanned<u64>>,
    announce_table: Option<Spanned<u32>>,
    sync: Option<Spanned<SyncConfig>>,
    source: Option<ConfigSource>,
    #[serde(default)]
    vip: Vec<VipIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VipIn {
    address: Spanned<String>,
    protocol: Option<Spanned<String>>,
    affinity: Option<Affinity>,
    scheduler: Option<Scheduler>,
    check: Option<Spanned<CheckOptions>>,
    #[serde(default)]
    backend: Vec<BackendIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendIn {
    address: Spanned<String>,
    weight: Option<Spanned<u32>>,
    #[serde(default)]
    draining: bool,
}

#[derive(Serialize)]
struct FileOut {
    hash_seed: u32,
    table_size: u32,
    max_vips: u32,
    max_backends: u32,
    flow_table_size: u32,
    udp_idle_timeout_ms: u64,
    tcp_idle_timeout_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    announce_table: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sync: Option<SyncConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<ConfigSource>,
    vip: Vec<VipOut>,
}

#[derive(Serialize)]
struct VipOut {
    address: String,
    protocol: Protocol,
    affinity: Affinity,
    scheduler: Scheduler,
    check: CheckSpec,
    backend: Vec<BackendSpec>,
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

/// Parses config text; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let file: FileIn = toml::from_str(text).map_err(|error| ConfigError::Syntax {
        path: path.to_owned(),
        message: error.to_string().trim_end().replace('\n', "\n  "),
    })?;
    let invalid = |span: Range<usize>, field: &str, message: String| ConfigError::Invalid {
        path: path.to_owned(),
        line: text[..span.start.min(text.len())].matches('\n').count() + 1,
        field: field.to_owned(),
        message,
    };

    let defaults = DatapathConfig::default();
    let mut datapath =
        DatapathConfig { hash_seed: file.hash_seed.unwrap_or(defaults.hash_seed), ..defaults };
    if let Some(size) = &file.table_size {
        if !is_valid_table_size(*size.get_ref()) {
            return Err(invalid(
                size.span(),
                "table_size",
                format!(
                    "{} is not a prime of at least 3 (the default is {})",
                    size.get_ref(),
                    defaults.table_size
                ),
            ));
        }
        datapath.table_size = *size.get_ref();
    }
    for (value, field, target) in [
        (&file.max_vips, "max_vips", &mut datapath.max_vips),
        (&file.max_backends, "max_backends", &mut datapath.max_backends),
        (&file.flow_table_size, "flow_table_size", &mut datapath.flow_table_size),
    ] {
        if let Some(value) = value {
            if *value.get_ref() == 0 {
                return Err(invalid(value.span(), field, "must be at least 1".to_owned()));
            }
            *target = *value.get_ref();
        }
    }
    for (value, field, target) in [
        (&file.udp_idle_timeout_ms, "udp_idle_timeout_ms", &mut datapath.udp_idle_timeout_ms),
        (&file.tcp_idle_timeout_ms, "tcp_idle_timeout_ms", &mut datapath.tcp_idle_timeout_ms),
    ] {
        if let Some(value) = value {
            if !(1_000..=86_400_000).contains(value.get_ref()) {
                let message =
                    format!("{} ms is out of range: expected 1000 to 86400000", value.get_ref());
                return Err(invalid(value.span(), field, message));
            }
            *target = *value.get_ref();
        }
    }
    if datapath.maglev_entries().is_none_or(|entries| entries.checked_mul(4).is_none()) {
        return Err(invalid(
            0..0,
            "max_vips",
            format!(
                "max_vips x 2 x table_size ({} x 2 x {}) is too large for one BPF array",
                datapath.max_vips, datapath.table_size
            ),
        ));
    }

    let announce_table = match &file.announce_table {
        None => None,
        Some(table) => Some(
            check_announce_table(*table.get_ref())
                .map_err(|message| invalid(table.span(), "announce_table", message))?,
        ),
    };
    let sync = match file.sync {
        None => None,
        Some(sync) => {
            if sync.get_ref().peers.is_empty() {
                return Err(invalid(
                    sync.span(),
                    "sync.peers",
                    "list at least one peer".to_owned(),
                ));
            }
            Some(sync.into_inner())
        }
    };
    let mut config = Config {
        datapath,
        desired: DesiredState::default(),
        sync,
        announce_table,
        hash_seed_set: file.hash_seed.is_some(),
        source: file.source,
    };
    let limits = config.limits();
    for vip_in in &file.vip {
        let endpoint = parse_endpoint(vip_in.address.get_ref())
            .map_err(|message| invalid(vip_in.address.span(), "vip.address", message))?;
        let protocol = match &vip_in.protocol {
            None => Protocol::Tcp,
            Some(text) => text
                .get_ref()
                .parse()
                .map_err(|message| invalid(text.span(), "vip.protocol", message))?,
        };
        let vip = Vip::new(endpoint, protocol);
        let check = vip_in.check.as_ref().map_or_else(CheckSpec::default, |check| {
            check.get_ref().applied_to(&CheckSpec::default())
        });
        if let (Err(message), Some(check_in)) = (check.validate(), &vip_in.check) {
            return Err(invalid(check_in.span(), "vip.check", message));
        }
        let affinity = vip_in.affinity.unwrap_or_default();
        config
            .desired
            .add_vip(vip, check, affinity, limits)
            .and_then(|()| config.desired.set_scheduling(&vip, None, vip_in.scheduler))
            .map_err(|error| invalid(vip_in.address.span(), "vip.address", error.to_string()))?;
        for backend_in in &vip_in.backend {
            let address = parse_address(backend_in.address.get_ref()).map_err(|message| {
                invalid(backend_in.address.span(), "vip.backend.address", message)
            })?;
            let weight = backend_in.weight.as_ref().map_or(DEFAULT_WEIGHT, |w| *w.get_ref());
            let backend = BackendSpec { address, weight, draining: backend_in.draining };
            config.desired.add_backend(&vip, backend, limits).map_err(|error| {
                let (span, field) = match &backend_in.weight {
                    Some(w) if matches!(error, crate::model::ChangeError::WeightOutOfRange(_)) => {
                        (w.span(), "vip.backend.weight")
                    }
                    _ => (backend_in.address.span(), "vip.backend.address"),
                };
                invalid(span, field, error.to_string())
            })?;
        }
    }
    Ok(config)
}

/// The config as TOML, in the schema [`parse`] reads.
pub fn render(config: &Config) -> String {
    let file = FileOut {
        hash_seed: config.datapath.hash_seed,
        table_size: config.datapath.table_size,
        max_vips: config.datapath.max_vips,
        max_backends: config.datapath.max_backends,
        flow_table_size: config.datapath.flow_table_size,
        udp_idle_timeout_ms: config.datapath.udp_idle_timeout_ms,
        tcp_idle_timeout_ms: config.datapath.tcp_idle_timeout_ms,
        announce_table: config.announce_table,
        sync: config.sync.clone(),
        source: config.source.clone(),
        vip: config
            .desired
            .vips
            .iter()
            .map(|(vip, spec)| VipOut {
                address: vip.endpoint().to_string(),
                protocol: vip.protocol,
                affinity: spec.affinity,
                scheduler: spec.scheduler,
                check: spec.check.clone(),
                backend: spec.backends.values().cloned().collect(),
            })
            .collect(),
    };
    let body = toml::to_string_pretty(&file).expect("the state always serializes");
    format!("# Written by `lb run`: the balancer's configuration as last changed.\n{body}")
}

/// The settings fixed when the datapath is loaded (or the fleet joined)
/// that differ between the running configuration and a file's, as
/// `name running -> file`: a file that changes any cannot be applied
/// without a restart. A seed the file does not set is not a difference.
pub fn restart_settings(running: &Config, file: &Config) -> Vec<String> {
    let (now, next) = (&running.datapath, &file.datapath);
    let mut differ = Vec::new();
    let mut compare = |name: &str, now: String, next: String| {
        if now != next {
            differ.push(format!("{name} {now} -> {next}"));
        }
    };
    if file.hash_seed_set {
        compare("hash_seed", now.hash_seed.to_string(), next.hash_seed.to_string());
    }
    compare("table_size", now.table_size.to_string(), next.table_size.to_string());
    compare("max_vips", now.max_vips.to_string(), next.max_vips.to_string());
    compare("max_backends", now.max_backends.to_string(), next.max_backends.to_string());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        parse(text, Path::new("lb.toml")).unwrap_err().to_string()
    }

    #[test]
    fn a_full_config_round_trips_through_the_state_file() {
        let text = r#"
hash_seed = 7
table_size = 251
announce_table = 100

[sync]
listen = "198.18.2.1:9470"
peers = ["198.18.2.2", "[fd00:198:18::2]:7"]
key_file = "/etc/lb/sync.key"

[[vip]]
address = "198.18.0.10:80"

[[vip.backend]]
address = "198.18.1.1"
weight = 3

[[vip.backend]]
address = "198.18.1.2"
draining = true

[[vip]]
address = "[fd00:198:18::10]:53"
protocol = "udp"
affinity = "client-ip"
scheduler = "least-connections"

[vip.check]
type = "ws"
path = "/socket"
port = 9000
rise = 1
status = "101"
"#;
        let config = parse(text, Path::new("lb.toml")).unwrap();
        assert_eq!(config.datapath.hash_seed, 7);
        assert_eq!(config.datapath.table_size, 251);
        assert_eq!(config.announce_table, Some(100));
        let peers: Vec<String> =
            config.sync.as_ref().unwrap().peers.iter().map(ToString::to_string).collect();
        assert_eq!(peers, ["198.18.2.2:9470", "[fd00:198:18::2]:7"]);
        assert_eq!(config.desired.vips.len(), 2);
        let checks: Vec<&CheckSpec> =
            config.desired.vips.values().map(|spec| &spec.check).collect();
        assert_eq!(checks[0], &CheckSpec::default());
        let schedulers: Vec<Scheduler> =
            config.desired.vips.values().map(|spec| spec.scheduler).collect();
        assert_eq!(schedulers, [Scheduler::Maglev, Scheduler::LeastConnections]);
        assert_eq!(
            (checks[1].kind, checks[1].port, checks[1].path.as_str(), checks[1].rise),
            (CheckKind::Ws, Some(9000), "/socket", 1)
        );
        let reparsed = parse(&render(&config), Path::new("state.toml")).unwrap();
        assert_eq!(reparsed, config);
    }

    #[test]
    fn every_kind_of_mistake_names_file_line_and_field() {
        let vip = "[[vip]]\naddress = \"198.18.0.10:80\"\n";
        assert_eq!(
            error_of("table_size = 65536\n"),
            "lb.toml:1: table_size: 65536 is not a prime of at least 3 (the default is 65537)"
        );
        assert_eq!(
            error_of("\n[[vip]]\naddress = \"198.18.0.10\"\n"),
            "lb.toml:3: vip.address: '198.18.0.10' is not ADDRESS:PORT (examples: 198.18.0.10:80, [fd00:198:18::10]:443)"
        );
        assert_eq!(
            error_of(&format!("{vip}protocol = \"sctp\"\n")),
            "lb.toml:3: vip.protocol: unknown protocol 'sctp': expected tcp or udp"
        );
        assert_eq!(
            error_of(&format!("{vip}[[vip.backend]]\naddress = \"198.18.1.300\"\n")),
            "lb.toml:4: vip.backend.address: '198.18.1.300' is not an IP address"
        );
        assert_eq!(
            error_of(&format!("{vip}[[vip.backend]]\naddress = \"198.18.1.1\"\nweight = 0\n")),
            "lb.toml:5: vip.backend.weight: weight 0 is out of range: expected 1 to 256"
        );
        assert_eq!(
            error_of(&format!(
                "{vip}[[vip.backend]]\naddress = \"198.18.1.1\"\n[[vip.backend]]\naddress = \"198.18.1.1\"\n"
            )),
            "lb.toml:6: vip.backend.address: backend 198.18.1.1 already serves VIP 198.18.0.10:80/tcp"
        );
        assert_eq!(
            error_of(&format!("{vip}{vip}")),
            "lb.toml:4: vip.address: VIP 198.18.0.10:80/tcp already exists"
        );
        assert!(error_of("max_vips = 0\n").starts_with("lb.toml:1: max_vips: must be at least 1"));
        assert_eq!(
            error_of(&format!("{vip}\n[vip.check]\ntype = \"tcp\"\nfall = 0\n")),
            "lb.toml:4: vip.check: check fall 0 is out of range: expected 1 to 100"
        );
        let bad_scheduler = error_of(&format!("{vip}scheduler = \"leastconn\"\n"));
        assert!(
            bad_scheduler.contains("line 3")
                && bad_scheduler.contains("expected `maglev` or `least-connections`"),
            "{bad_scheduler}"
        );
        let bad_type = error_of(&format!("{vip}[vip.check]\ntype = \"icmp\"\n"));
        assert!(bad_type.contains("line 4") && bad_type.contains("icmp"), "{bad_type}");
        let unknown = error_of("tabel_size = 3\n");
        assert!(
            unknown.starts_with("lb.toml: ")
                && unknown.contains("line 1")
                && unknown.contains("tabel_size"),
            "{unknown}"
        );
        assert_eq!(
            error_of("announce_table = 254\n"),
            "lb.toml:1: announce_table: table 254 is one of the kernel's own (unspec, default, main, local): choose another, e.g. 100"
        );
        let sync = "[sync]\nlisten = \"198.18.2.1:9470\"\nkey_file = \"k\"\n";
        let bad_peer = error_of(&format!("{sync}peers = [\"balancer-2\"]\n"));
        assert!(
            bad_peer.contains("line 4") && bad_peer.contains("'balancer-2' is not ADDRESS[:PORT]"),
            "{bad_peer}"
        );
        assert!(
            error_of(&format!("{sync}peers = []\n"))
                .starts_with("lb.toml:1: sync.peers: list at least one peer")
        );
        let syntax = error_of("[[vip]\n");
        assert!(syntax.contains("line 1"), "{syntax}");
    }
}
