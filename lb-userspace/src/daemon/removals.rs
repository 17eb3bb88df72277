//! Removals that would break established flows. Removing a backend (or a
//! VIP) ends every flow to it at once: its clients see resets or silence.
//! Such a removal is refused, naming the count and the way that breaks
//! nothing (drain, wait, remove), unless the operator says `--force`. The
//! counts are this balancer's, as last counted (about once a second).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use super::Daemon;
use crate::model::Vip;
use crate::model::diff::Change;

impl Daemon {
    /// Active flows to `vip`'s backend `address`, or to all its backends.
    pub(super) fn flows_through(&self, vip: &Vip, address: Option<IpAddr>) -> u64 {
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
}

fn flows(count: u64) -> String {
    match count {
        1 => "1 active flow".to_owned(),
        count => format!("{count} active flows"),
    }
}

/// `lb backend remove` of a backend that carries flows.
pub(super) fn backend_refusal(vip: &Vip, address: IpAddr, count: u64) -> String {
    format!(
        "backend {address} of VIP {vip} carries {}, which removing it would break: drain it first (`lb backend drain {vip} {address}`) and remove it once they have ended (`lb backend remove --when-drained` does both), or remove it now with --force",
        flows(count)
    )
}

/// `lb vip remove` of a VIP whose backends carry flows.
pub(super) fn vip_refusal(vip: &Vip, count: u64) -> String {
    format!(
        "VIP {vip} carries {}, which removing it would break: drain its backends first (`lb backend drain`) and remove it once they have ended, or remove it now with --force",
        flows(count)
    )
}

/// A configuration file whose removals carry flows, each named.
pub(super) fn file_refusal(file: &Path, changes: &[Change]) -> Option<String> {
    let mut breaking = changes.to_vec();
    breaking.retain_mut(|change| change.removal().is_some_and(|(_, _, count)| *count > 0));
    if breaking.is_empty() {
        return None;
    }
    let total: u64 =
        breaking.iter_mut().filter_map(|change| change.removal().map(|(_, _, n)| *n)).sum();
    let listed: Vec<String> = breaking.iter().map(|change| format!("  {change}")).collect();
    Some(format!(
        "{}: applying it would break {} (nothing applied):\n{}\ndrain them first (draining = true in the file, applied), remove them once `lb backend list` shows 0 active flows, or apply it now with --force",
        file.display(),
        flows(total),
        listed.join("\n")
    ))
}
