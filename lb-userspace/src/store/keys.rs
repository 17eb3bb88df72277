//! The fleet's keys in etcd and what their values hold. Pure: turning keys
//! into a desired state ([`assemble`]) and a change of the desired state into
//! one transaction's operations ([`plan`]); talking to etcd is elsewhere.
//!
//! ```text
//! PREFIX/fleet                                  {"format":1,"hash_seed":..,"table_size":..,"max_vips":..,"max_backends":..}
//! PREFIX/vips/198.18.0.10:80/tcp                {"check":{"type":"http","path":"/health",..},"affinity":"flow","scheduler":"maglev"}
//! PREFIX/backends/198.18.0.10:80/tcp/198.18.1.1 {"weight":1,"draining":false}
//! PREFIX/vips/[fd00:198:18::10]:80/tcp          (IPv6 as lb prints it)
//! ```
//!
//! Names are exactly as `lb` prints VIPs and addresses, so each VIP and
//! backend has one key; a value is JSON with only the fields shown (fields
//! left out take their defaults). A backend key registered by `lb agent`
//! carries the agent's lease.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::model::{
    Affinity, BackendSpec, ChangeError, CheckOptions, CheckSpec, DEFAULT_WEIGHT, DesiredState,
    Forwarding, Limits, Rebalance, Scheduler, Vip, VipSpec, parse_address, parse_vip,
};

/// The format of the values under a prefix, in the fleet key; a balancer
/// refuses a store written in a format it does not know.
pub const FORMAT: u32 = 1;

/// The key names under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` as [`super::StoreConfig`] holds it: `/NAME[/NAME...]`.
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Everything of this fleet: `PREFIX/`.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn fleet(&self) -> String {
        format!("{}/fleet", self.prefix)
    }

    pub fn vips(&self) -> String {
        format!("{}/vips/", self.prefix)
    }

    pub fn backends(&self) -> String {
        format!("{}/backends/", self.prefix)
    }

    pub fn vip(&self, vip: &Vip) -> String {
        format!("{}{vip}", self.vips())
    }

    /// The prefix of every backend key of `vip`.
    pub fn backends_of(&self, vip: &Vip) -> String {
        format!("{}{vip}/", self.backends())
    }

    pub fn backend(&self, vip: &Vip, address: IpAddr) -> String {
        format!("{}{address}", self.backends_of(vip))
    }

    /// What a key under the prefix names, or why it names nothing.
    pub fn parse(&self, key: &str) -> Result<Named, String> {
        let unknown = || {
            format!(
                "not a key lb knows: expected {}, {}VIP or {}VIP/ADDRESS",
                self.fleet(),
                self.vips(),
                self.backends()
            )
        };
        if key == self.fleet() {
            return Ok(Named::Fleet);
        }
        if let Some(name) = key.strip_prefix(&self.vips()) {
            let vip = canonical_vip(name)?;
            return Ok(Named::Vip(vip));
        }
        let name = key.strip_prefix(&self.backends()).ok_or_else(unknown)?;
        let (vip, address) = name.rsplit_once('/').ok_or_else(unknown)?;
        let vip = canonical_vip(vip)?;
        let address = parse_address(address)?;
        if address.to_string() != name.rsplit_once('/').map_or("", |(_, text)| text) {
            return Err(format!("write the address as {address}"));
        }
        Ok(Named::Backend(vip, address))
    }
}

/// A VIP named as `lb` prints it, protocol included.
fn canonical_vip(name: &str) -> Result<Vip, String> {
    if !name.contains('/') {
        return Err(format!("'{name}' has no protocol: write ADDRESS:PORT/tcp or /udp"));
    }
    let vip = parse_vip(name, None)?;
    if vip.to_string() != name {
        return Err(format!("write the VIP as {vip}"));
    }
    Ok(vip)
}

/// What a key stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Named {
    Fleet,
    Vip(Vip),
    Backend(Vip, IpAddr),
}

/// The settings every balancer of a fleet must share, created once in the
/// fleet key by the first balancer: the same seed and table size give every
/// balancer the same Maglev tables, and the same limits make every balancer
/// accept and refuse the same keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSettings {
    pub format: u32,
    pub hash_seed: u32,
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
}

impl FleetSettings {
    pub fn limits(&self) -> Limits {
        Limits { max_vips: self.max_vips, max_backends: self.max_backends }
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("settings serialize")
    }

    pub fn decode(value: &[u8]) -> Result<Self, String> {
        let settings: Self = serde_json::from_slice(value).map_err(|error| error.to_string())?;
        if settings.format != FORMAT {
            return Err(format!(
                "format {} is not one this lb reads ({FORMAT}): upgrade lb",
                settings.format
            ));
        }
        if !crate::maglev::is_valid_table_size(settings.table_size) {
            return Err(format!("table_size {} is not a prime of at least 3", settings.table_size));
        }
        if settings.max_vips == 0 || settings.max_backends == 0 {
            return Err("max_vips and max_backends must be at least 1".to_owned());
        }
        Ok(settings)
    }
}

/// A VIP key's value.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VipValue {
    #[serde(default)]
    check: CheckOptions,
    #[serde(default)]
    affinity: Affinity,
    #[serde(default)]
    scheduler: Scheduler,
    /// Absent (off) unless set, so that a VIP without it reads the same on
    /// balancers that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rebalance: Option<Rebalance>,
    /// Absent (DSR) unless tunnelled. A balancer that predates it refuses
    /// a VIP key that has it (unknown field) rather than forward by DSR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    forwarding: Option<Forwarding>,
}

/// A backend key's value.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendValue {
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    draining: bool,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

/// A VIP's value as written: every check field spelled out, so balancers
/// agree whatever their defaults.
pub fn vip_value(spec: &VipSpec) -> String {
    let check = &spec.check;
    let value = VipValue {
        check: CheckOptions {
            kind: Some(check.kind),
            port: check.port,
            path: Some(check.path.clone()),
            interval_ms: Some(check.interval_ms),
            timeout_ms: Some(check.timeout_ms),
            rise: Some(check.rise),
            fall: Some(check.fall),
            status: Some(check.status.clone()),
        },
        affinity: spec.affinity,
        scheduler: spec.scheduler,
        rebalance: spec.rebalance.is_on().then_some(spec.rebalance),
        forwarding: spec.forwarding.is_tunnel().then_some(spec.forwarding),
    };
    serde_json::to_string(&value).expect("values serialize")
}

pub fn backend_value(backend: &BackendSpec) -> String {
    let value = BackendValue { weight: backend.weight, draining: backend.draining };
    serde_json::to_string(&value).expect("values serialize")
}

/// One key as read from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// The lease the key lives under (an agent's), 0 for none.
    pub lease: i64,
}

/// A key that was refused, and why: reported, never applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub key: String,
    pub reason: String,
}

/// The desired state the keys describe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assembled {
    pub state: DesiredState,
    /// Backends registered under a lease (by `lb agent`), with the lease.
    pub leases: BTreeMap<(Vip, IpAddr), i64>,
    pub refused: Vec<Refused>,
}

/// Builds the desired state from every key under the prefix (in key order,
/// so every balancer refuses the same keys), through the same rules as a
/// change typed at the CLI. A key that does not parse, or that those rules
/// refuse (a backend of an unknown VIP, a weight out of range, one backend
/// too many), is refused alone; nothing else changes because of it.
pub fn assemble(keys: &Keys, entries: &BTreeMap<String, Entry>, limits: Limits) -> Assembled {
    let mut assembled = Assembled::default();
    let mut backends = Vec::new();
    let mut refused = Vec::new();
    for (key, entry) in entries {
        match keys.parse(key) {
            Ok(Named::Fleet) => {}
            Ok(Named::Vip(vip)) => {
                let added = serde_json::from_slice::<VipValue>(&entry.value)
                    .map_err(|error| format!("value: {error}"))
                    .and_then(|value| {
                        let check = value.check.applied_to(&CheckSpec::default());
                        let state = &mut assembled.state;
                        state
                            .add_vip(vip, check, value.affinity, limits)
                            .map_err(|e| e.to_string())?;
                        let rebalance = value.rebalance.unwrap_or_default();
                        let configured = state.configure(
                            &vip,
                            None,
                            Some(value.scheduler),
                            Some(rebalance),
                            Some(value.forwarding.unwrap_or_default()),
                        );
                        configured.map_err(|error| {
                            state.vips.remove(&vip);
                            error.to_string()
                        })
                    });
                if let Err(reason) = added {
                    refused.push(refusal(key, reason));
                }
            }
            Ok(Named::Backend(vip, address)) => backends.push((key, vip, address, entry)),
            Err(reason) => refused.push(refusal(key, reason)),
        }
    }
    for (key, vip, address, entry) in backends {
        let added = serde_json::from_slice::<BackendValue>(&entry.value)
            .map_err(|error| format!("value: {error}"))
            .and_then(|value| {
                let backend = BackendSpec { address, weight: value.weight, draining: value.draining };
                assembled.state.add_backend(&vip, backend, limits).map_err(|error| match error {
                    ChangeError::UnknownVip(_) => format!(
                        "a backend of VIP {vip}, which the store does not hold (or whose key is refused)"
                    ),
                    other => other.to_string(),
                })
            });
        match added {
            Ok(()) if entry.lease != 0 => {
                assembled.leases.insert((vip, address), entry.lease);
            }
            Ok(()) => {}
            Err(reason) => refused.push(refusal(key, reason)),
        }
    }
    assembled.refused = refused;
    assembled
}

fn refusal(key: &str, reason: String) -> Refused {
    Refused { key: key.to_owned(), reason }
}

/// One put of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Put {
    pub key: String,
    pub value: String,
    /// The key exists: it keeps its lease (an agent's registration stays
    /// one), and the transaction requires it to exist still.
    pub existing: bool,
}

/// A change of the desired state as one transaction, conditioned on the
/// revision it was validated against: nothing under the VIP and backend
/// prefixes modified after `base_revision`, and every key the change
/// updates or relies on not deleted since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WritePlan {
    pub base_revision: i64,
    pub puts: Vec<Put>,
    pub deletes: Vec<String>,
    /// Deleted with every key below them (a removed VIP's backends).
    pub delete_prefixes: Vec<String>,
    /// Keys that must still exist (updated ones, and the VIP of an added backend).
    pub must_exist: Vec<String>,
}

impl WritePlan {
    /// Operations in the transaction's success branch.
    pub fn operations(&self) -> usize {
        self.puts.len() + self.deletes.len() + self.delete_prefixes.len()
    }
}

/// The transaction that turns `base` (the state at `base_revision`) into `next`.
pub fn plan(
    keys: &Keys,
    base: &DesiredState,
    next: &DesiredState,
    base_revision: i64,
) -> WritePlan {
    let mut plan = WritePlan { base_revision, ..WritePlan::default() };
    for vip in base.vips.keys().filter(|vip| !next.vips.contains_key(vip)) {
        plan.deletes.push(keys.vip(vip));
        plan.delete_prefixes.push(keys.backends_of(vip));
    }
    for (vip, spec) in &next.vips {
        let Some(old) = base.vips.get(vip) else {
            plan.puts.push(Put { key: keys.vip(vip), value: vip_value(spec), existing: false });
            for backend in spec.backends.values() {
                let key = keys.backend(vip, backend.address);
                plan.puts.push(Put { key, value: backend_value(backend), existing: false });
            }
            continue;
        };
        let vip_key = keys.vip(vip);
        let settings = |spec: &VipSpec| {
            (spec.check.clone(), spec.affinity, spec.scheduler, spec.rebalance, spec.forwarding)
        };
        if settings(old) != settings(spec) {
            plan.puts.push(Put { key: vip_key.clone(), value: vip_value(spec), existing: true });
            plan.must_exist.push(vip_key.clone());
        }
        for address in old.backends.keys().filter(|address| !spec.backends.contains_key(address)) {
            plan.deletes.push(keys.backend(vip, *address));
        }
        for (address, backend) in &spec.backends {
            let key = keys.backend(vip, *address);
            match old.backends.get(address) {
                None => {
                    plan.puts.push(Put { key, value: backend_value(backend), existing: false });
                    if !plan.must_exist.contains(&vip_key) {
                        plan.must_exist.push(vip_key.clone());
                    }
                }
                Some(before) if before != backend => {
                    plan.must_exist.push(key.clone());
                    plan.puts.push(Put { key, value: backend_value(backend), existing: true });
                }
                Some(_) => {}
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests;
