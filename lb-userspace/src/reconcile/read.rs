//! What the reconcile step can say of what it installed: VIP and backend
//! status for the daemon's views, and `lb lookup`'s answer, read from the
//! maps the kernel reads with the kernel's hash.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use lb_common::{FlowKey, VIP_FLAG_CLIENT_IP_AFFINITY};

use super::Reconciler;
use crate::datapath::Maps;
use crate::model::{Mac, Vip};

/// Where a flow goes, computed with the kernel's hash from the installed table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LookupResult {
    /// Where a new connection of this flow goes (the Maglev choice).
    pub backend: Option<IpAddr>,
    /// Where the flow's established connection goes, if the flow table has it.
    pub established_backend: Option<IpAddr>,
    pub hash: u32,
    pub table_entry: u32,
}

/// A configured backend as installed.
#[derive(Clone, Debug)]
pub struct InstalledBackend {
    pub address: IpAddr,
    pub slot: u32,
    pub mac: Option<Mac>,
    /// The interface its packets leave by: 0, the balancer's own; n, its
    /// n-th `--egress` interface (meaningful once `mac` is known).
    pub egress: u32,
    /// Entries of the active table that point at it.
    pub table_entries: u32,
}

/// Who a VIP's flows belong to, as installed.
pub struct FlowOwners {
    pub vip_index: u32,
    /// (backend slot, generation) -> the configured backend's address.
    pub backends: HashMap<(u32, u32), IpAddr>,
}

/// A VIP as installed.
#[derive(Clone, Copy, Debug)]
pub struct InstalledVipStatus {
    pub vip_index: u32,
    /// Backends in the table with a resolved MAC.
    pub members: usize,
    /// Members receiving new flows.
    pub serving: usize,
    pub fail_open: bool,
}

impl<M: Maps> Reconciler<M> {
    /// Which VIP indexes and backend slots stand for which addresses, for
    /// flow sync (every configured backend, serving or not).
    pub fn directory(&self) -> crate::sync::Directory {
        let mut directory = crate::sync::Directory::default();
        for (vip, installed) in &self.installed {
            let slots = installed
                .slots
                .iter()
                .map(|(address, slot)| (*address, *slot, self.generation(*slot)));
            directory.insert(vip.endpoint(), vip.protocol.number(), installed.vip_index, slots);
        }
        directory
    }

    /// Addresses of the VIPs with at least one backend that is up (with
    /// its MAC resolved): those a balancer may announce. A draining backend
    /// counts, since its established flows still need this balancer.
    pub fn serving_addresses(&self) -> std::collections::BTreeSet<IpAddr> {
        self.installed
            .iter()
            .filter(|(_, installed)| !installed.fail_open && !installed.members.is_empty())
            .map(|(vip, _)| vip.address)
            .collect()
    }

    /// The VIP's index and who its flows belong to, for `lb flows`.
    pub fn flow_owners(&self, vip: &Vip) -> Option<FlowOwners> {
        let installed = self.installed.get(vip)?;
        let backends = installed
            .slots
            .iter()
            .map(|(address, slot)| ((*slot, self.generation(*slot)), *address))
            .collect();
        Some(FlowOwners { vip_index: installed.vip_index, backends })
    }

    pub fn vip_index(&self, vip: &Vip) -> Option<u32> {
        self.installed.get(vip).map(|installed| installed.vip_index)
    }

    pub fn vip_status(&self, vip: &Vip) -> Option<InstalledVipStatus> {
        self.installed.get(vip).map(|installed| InstalledVipStatus {
            vip_index: installed.vip_index,
            members: installed.members.len(),
            serving: installed.members.iter().filter(|member| member.serving).count(),
            fail_open: installed.fail_open,
        })
    }

    /// The backend slots of `vip`, without counting table entries (which
    /// [`Self::backends`] does by scanning the whole table).
    pub fn backend_slots(&self, vip: &Vip) -> Vec<u32> {
        self.installed
            .get(vip)
            .map(|installed| installed.slots.values().copied().collect())
            .unwrap_or_default()
    }

    /// The slot of `vip`'s backend `address`, when installed.
    pub fn backend_slot(&self, vip: &Vip, address: IpAddr) -> Option<u32> {
        self.installed.get(vip).and_then(|installed| installed.slots.get(&address).copied())
    }

    /// Configured backends of `vip` with their slots and table shares.
    pub fn backends(&self, vip: &Vip) -> Vec<InstalledBackend> {
        let Some(installed) = self.installed.get(vip) else {
            return Vec::new();
        };
        let mut entries: HashMap<u32, u32> = HashMap::new();
        if let Some(info) = self.datapath.vip(&vip.key()) {
            for slot in self.datapath.table(info.vip_index, info.active_slot) {
                *entries.entry(*slot).or_default() += 1;
            }
        }
        installed
            .slots
            .iter()
            .map(|(address, slot)| {
                let hop = self.macs.get(address);
                InstalledBackend {
                    address: *address,
                    slot: *slot,
                    mac: hop.map(|hop| hop.mac),
                    egress: hop.map_or(0, |hop| hop.egress),
                    table_entries: entries.get(slot).copied().unwrap_or(0),
                }
            })
            .collect()
    }

    /// Which backend the datapath sends `client`'s flow to, read from the
    /// maps the kernel reads, with the kernel's hash.
    pub fn lookup(&self, vip: &Vip, client: SocketAddr) -> Option<LookupResult> {
        let installed = self.installed.get(vip)?;
        let info = self.datapath.vip(&vip.key())?;
        let config = self.datapath.config();
        let flow =
            FlowKey::new(client.ip(), client.port(), vip.address, vip.port, vip.protocol.number());
        let hash = if info.flags & VIP_FLAG_CLIENT_IP_AFFINITY != 0 {
            lb_common::client_hash(&flow, config.hash_seed)
        } else {
            lb_common::flow_hash(&flow, config.hash_seed)
        };
        let table_entry = hash % config.table_size;
        let backend = if info.backend_count == 0 {
            None
        } else {
            let index =
                lb_common::table_index(info.vip_index, info.active_slot, config.table_size, hash);
            let slot = self.datapath.maglev_entry(index);
            installed.address_of(slot)
        };
        let established_backend = self
            .datapath
            .flow(&flow)
            .filter(|entry| entry.vip_index == info.vip_index)
            .and_then(|entry| installed.address_of(entry.backend_slot));
        Some(LookupResult { backend, established_backend, hash, table_entry })
    }
}
