//! The file's TOML schema, shared by configuration files and the state
//! file: what is read ([`parse`], which validates every value and names the
//! line of a mistake) and what is written ([`render`]).

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{
    Config, ConfigError, ConfigSource, Explicit, StoreCopy, SyncConfig, check_announce_table,
};
use crate::maglev::is_valid_table_size;
use crate::model::{
    Affinity, BackendSpec, CheckOptions, CheckSpec, DEFAULT_WEIGHT, DatapathConfig, DesiredState,
    Forwarding, ForwardingMode, ForwardingOptions, Limits, Protocol, Rebalance, RebalanceMode,
    RebalanceOptions, Scheduler, Vip, parse_address, parse_endpoint,
};
use crate::store::StoreConfig;

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
    store: Option<Spanned<StoreConfig>>,
    source: Option<ConfigSource>,
    store_copy: Option<StoreCopy>,
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
    rebalance: Option<Spanned<RebalanceMode>>,
    rebalance_band: Option<Spanned<u32>>,
    rebalance_rate: Option<Spanned<u32>>,
    rebalance_quiet: Option<Spanned<u32>>,
    forwarding: Option<ForwardingMode>,
    gue_port: Option<Spanned<u16>>,
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
    store: Option<StoreConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<ConfigSource>,
    #[serde(skip_serializing_if = "Option::is_none")]
    store_copy: Option<StoreCopy>,
    vip: Vec<VipOut>,
}

#[derive(Serialize)]
struct VipOut {
    address: String,
    protocol: Protocol,
    affinity: Affinity,
    scheduler: Scheduler,
    #[serde(skip_serializing_if = "Option::is_none")]
    rebalance: Option<RebalanceMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rebalance_band: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rebalance_rate: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rebalance_quiet: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    forwarding: Option<ForwardingMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gue_port: Option<u16>,
    check: CheckSpec,
    backend: Vec<BackendSpec>,
}

/// Parses config text; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    parse_with(text, path, DatapathConfig::default(), None)
}

/// [`parse`], with `defaults` for what the file leaves out (a fleet's
/// settings, which the store holds, for a file applied to it), and VIPs
/// and backends counted against `limits` instead of the file's own when
/// given (the CLI's early check, which leaves the limits to the daemon).
pub fn parse_with(
    text: &str,
    path: &Path,
    defaults: DatapathConfig,
    limits: Option<Limits>,
) -> Result<Config, ConfigError> {
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

    // Every mistake is collected, so that one check names them all.
    let mut mistakes = Vec::new();
    let mut datapath =
        DatapathConfig { hash_seed: file.hash_seed.unwrap_or(defaults.hash_seed), ..defaults };
    if let Some(size) = &file.table_size {
        if !is_valid_table_size(*size.get_ref()) {
            mistakes.push(invalid(
                size.span(),
                "table_size",
                format!(
                    "{} is not a prime of at least 3 (the default is {})",
                    size.get_ref(),
                    defaults.table_size
                ),
            ));
        } else {
            datapath.table_size = *size.get_ref();
        }
    }
    for (value, field, target) in [
        (&file.max_vips, "max_vips", &mut datapath.max_vips),
        (&file.max_backends, "max_backends", &mut datapath.max_backends),
        (&file.flow_table_size, "flow_table_size", &mut datapath.flow_table_size),
    ] {
        if let Some(value) = value {
            if *value.get_ref() == 0 {
                mistakes.push(invalid(value.span(), field, "must be at least 1".to_owned()));
                continue;
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
                mistakes.push(invalid(value.span(), field, message));
                continue;
            }
            *target = *value.get_ref();
        }
    }
    if datapath.maglev_entries().is_none_or(|entries| entries.checked_mul(4).is_none()) {
        mistakes.push(invalid(
            0..0,
            "max_vips",
            format!(
                "max_vips x 2 x table_size ({} x 2 x {}) is too large for one BPF array",
                datapath.max_vips, datapath.table_size
            ),
        ));
    }

    let announce_table = file.announce_table.as_ref().and_then(|table| {
        check_announce_table(*table.get_ref())
            .map_err(|message| mistakes.push(invalid(table.span(), "announce_table", message)))
            .ok()
    });
    let sync = match file.sync {
        None => None,
        Some(sync) => {
            if sync.get_ref().peers.is_empty() {
                mistakes.push(invalid(
                    sync.span(),
                    "sync.peers",
                    "list at least one peer".to_owned(),
                ));
            }
            Some(sync.into_inner())
        }
    };
    let store = match file.store {
        None => None,
        Some(store) => {
            if let Err(message) = store.get_ref().validate() {
                mistakes.push(invalid(store.span(), "store", message));
            }
            Some(store.into_inner())
        }
    };
    let mut config = Config {
        datapath,
        desired: DesiredState::default(),
        sync,
        announce_table,
        explicit: Explicit {
            hash_seed: file.hash_seed.is_some(),
            table_size: file.table_size.is_some(),
            max_vips: file.max_vips.is_some(),
            max_backends: file.max_backends.is_some(),
        },
        source: file.source,
        store,
        store_copy: file.store_copy,
    };
    let limits = limits.unwrap_or_else(|| config.limits());
    for vip_in in &file.vip {
        let endpoint = match parse_endpoint(vip_in.address.get_ref()) {
            Ok(endpoint) => endpoint,
            Err(message) => {
                mistakes.push(invalid(vip_in.address.span(), "vip.address", message));
                continue;
            }
        };
        let protocol = match vip_in.protocol.as_ref().map(|text| (text, text.get_ref().parse())) {
            None => Protocol::Tcp,
            Some((_, Ok(protocol))) => protocol,
            Some((text, Err(message))) => {
                mistakes.push(invalid(text.span(), "vip.protocol", message));
                continue;
            }
        };
        let vip = Vip::new(endpoint, protocol);
        let check = vip_in.check.as_ref().map_or_else(CheckSpec::default, |check| {
            check.get_ref().applied_to(&CheckSpec::default())
        });
        if let (Err(message), Some(check_in)) = (check.validate(), &vip_in.check) {
            mistakes.push(invalid(check_in.span(), "vip.check", message));
            continue;
        }
        let affinity = vip_in.affinity.unwrap_or_default();
        let added = config
            .desired
            .add_vip(vip, check, affinity, limits)
            .and_then(|()| config.desired.set_scheduling(&vip, None, vip_in.scheduler));
        if let Err(error) = added {
            mistakes.push(invalid(vip_in.address.span(), "vip.address", error.to_string()));
            continue;
        }
        let forwarding = ForwardingOptions {
            mode: vip_in.forwarding,
            gue_port: vip_in.gue_port.as_ref().map(|port| *port.get_ref()),
        }
        .applied_to(&Forwarding::default());
        if let Err(error) = config.desired.configure(&vip, None, None, None, Some(forwarding)) {
            let span = vip_in.gue_port.as_ref().map_or(vip_in.address.span(), |port| port.span());
            mistakes.push(invalid(span, "vip.gue_port", error.to_string()));
        }
        if let Err(mistake) = rebalance_of(vip_in, &vip, &mut config.desired, &invalid) {
            mistakes.push(mistake);
        }
        for backend_in in &vip_in.backend {
            let address = match parse_address(backend_in.address.get_ref()) {
                Ok(address) => address,
                Err(message) => {
                    let span = backend_in.address.span();
                    mistakes.push(invalid(span, "vip.backend.address", message));
                    continue;
                }
            };
            let weight = backend_in.weight.as_ref().map_or(DEFAULT_WEIGHT, |w| *w.get_ref());
            let backend = BackendSpec { address, weight, draining: backend_in.draining };
            if let Err(error) = config.desired.add_backend(&vip, backend, limits) {
                let (span, field) = match &backend_in.weight {
                    Some(w) if matches!(error, crate::model::ChangeError::WeightOutOfRange(_)) => {
                        (w.span(), "vip.backend.weight")
                    }
                    _ => (backend_in.address.span(), "vip.backend.address"),
                };
                mistakes.push(invalid(span, field, error.to_string()));
            }
        }
    }
    match mistakes.len() {
        0 => Ok(config),
        1 => Err(mistakes.remove(0)),
        _ => Err(ConfigError::Mistakes { path: path.to_owned(), mistakes }),
    }
}

/// A VIP's rebalancer settings from its table, applied to `desired`; the
/// mistake names the line of the setting it is about.
fn rebalance_of(
    vip_in: &VipIn,
    vip: &Vip,
    desired: &mut DesiredState,
    invalid: &impl Fn(Range<usize>, &str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let value = |field: &Option<Spanned<u32>>| field.as_ref().map(|v| *v.get_ref());
    let options = RebalanceOptions {
        mode: vip_in.rebalance.as_ref().map(|mode| *mode.get_ref()),
        band_percent: value(&vip_in.rebalance_band),
        rate: value(&vip_in.rebalance_rate),
        quiet_s: value(&vip_in.rebalance_quiet),
    };
    if options.is_empty() {
        return Ok(());
    }
    let rebalance = options.applied_to(&Rebalance::default());
    desired.configure(vip, None, None, Some(rebalance), None).map_err(|error| {
        let message = error.to_string();
        let (field, span) = [
            ("band", "vip.rebalance_band", &vip_in.rebalance_band),
            ("rate", "vip.rebalance_rate", &vip_in.rebalance_rate),
            ("quiet", "vip.rebalance_quiet", &vip_in.rebalance_quiet),
        ]
        .into_iter()
        .find_map(|(word, field, value)| {
            let span = value.as_ref()?.span();
            message.contains(&format!("rebalance {word} ")).then_some((field, span))
        })
        .or_else(|| vip_in.rebalance.as_ref().map(|mode| ("vip.rebalance", mode.span())))
        .unwrap_or(("vip.address", vip_in.address.span()));
        invalid(span, field, message)
    })
}

/// A rebalancer setting, when it is not the default.
fn non_default(rebalance: Rebalance, field: impl Fn(&Rebalance) -> u32) -> Option<u32> {
    let value = field(&rebalance);
    (value != field(&Rebalance::default())).then_some(value)
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
        store: config.store.clone(),
        source: config.source.clone(),
        store_copy: config.store_copy.clone(),
        vip: config
            .desired
            .vips
            .iter()
            .map(|(vip, spec)| VipOut {
                address: vip.endpoint().to_string(),
                protocol: vip.protocol,
                affinity: spec.affinity,
                scheduler: spec.scheduler,
                rebalance: spec.rebalance.is_on().then_some(spec.rebalance.mode),
                rebalance_band: non_default(spec.rebalance, |r| r.band_percent),
                rebalance_rate: non_default(spec.rebalance, |r| r.rate),
                rebalance_quiet: non_default(spec.rebalance, |r| r.quiet_s),
                forwarding: spec.forwarding.is_tunnel().then_some(spec.forwarding.mode),
                gue_port: (spec.forwarding.gue_port != Forwarding::default().gue_port)
                    .then_some(spec.forwarding.gue_port),
                check: spec.check.clone(),
                backend: spec.backends.values().cloned().collect(),
            })
            .collect(),
    };
    let body = toml::to_string_pretty(&file).expect("the state always serializes");
    format!("# Written by `lb run`: the balancer's configuration as last changed.\n{body}")
}
