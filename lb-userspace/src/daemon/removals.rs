//! Removals that would break established flows. Removing a backend (or a
//! VIP) ends every flow to it at once: its clients see resets or silence.
//! Such a removal is refused, naming the count and the way that breaks
//! nothing (drain, wait, remove), unless the operator says `--force`. The
//! counts are this balancer's, as last counted (about once a second).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use super::Daemon;
use crate::api::BREAKS;
use crate::model::Vip;
use crate::model::diff::{Change, active_flows};

impl Daemon {
    /// Active flows to `vip`'s backend `address`, or to all its backends.
    fn flows_through(&self, vip: &Vip, address: Option<IpAddr>) -> u64 {
        let counts = self.active_flows.borrow();
        let slots = match address {
            Some(address) => self.reconciler.backend_slot(vip, address).into_iter().collect(),
            None => self.reconciler.backend_slots(vip),
        };
        slots.iter().map(|slot| counts.get(slot).copied().unwrap_or(0)).sum()
    }

    /// Fills in the active flows each removal among `changes` breaks.
    pub(super) fn count_broken(&self, changes: &mut [Change]) {
        let names: HashMap<String, Vip> =
            self.config.desired.vips.keys().map(|vip| (vip.to_string(), *vip)).collect();
        for change in changes {
            if let Some((name, backend, flows)) = change.removal()
                && let Some(vip) = names.get(name)
            {
                *flows = self.flows_through(vip, backend);
            }
        }
    }

    /// The active flows removing `vip`'s backend `address` (or, for None,
    /// the whole VIP) breaks; refused while there are any, unless `force`.
    pub(super) fn breakable(
        &self,
        vip: &Vip,
        address: Option<IpAddr>,
        force: bool,
    ) -> anyhow::Result<u64> {
        let count = self.flows_through(vip, address);
        if count == 0 || force {
            return Ok(count);
        }
        let flows = active_flows(count);
        match address {
            Some(address) => anyhow::bail!(
                "backend {address} of VIP {vip} carries {flows}, {BREAKS}: drain it first (`lb backend drain {vip} {address}`) and remove it once they have ended (`lb backend remove --when-drained` does both), or remove it now with --force"
            ),
            None => anyhow::bail!(
                "VIP {vip} carries {flows}, {BREAKS}: drain its backends first (`lb backend drain`) and remove it once they have ended, or remove it now with --force"
            ),
        }
    }
}

/// What a forced removal says it broke, after its message.
pub(super) fn broke(flows: u64) -> String {
    match flows {
        0 => String::new(),
        1 => "; its 1 active flow is broken".to_owned(),
        flows => format!("; its {flows} active flows are broken"),
    }
}

/// A configuration file whose removals carry flows, each named.
pub(super) fn file_refusal(file: &Path, changes: &[Change]) -> Option<String> {
    let breaking: Vec<&Change> =
        changes.iter().filter(|change| change.broken_flows() > 0).collect();
    if breaking.is_empty() {
        return None;
    }
    let total = breaking.iter().map(|change| change.broken_flows()).sum();
    let listed: Vec<String> = breaking.iter().map(|change| format!("  {change}")).collect();
    Some(format!(
        "{}: applying it would break {} (nothing applied):\n{}\ndrain them first (draining = true in the file, applied), remove them once `lb backend list` shows 0 active flows, or apply it now with --force",
        file.display(),
        active_flows(total),
        listed.join("\n")
    ))
}
