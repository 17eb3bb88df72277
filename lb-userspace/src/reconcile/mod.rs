//! The reconcile step: the only code that writes the datapath's maps. It
//! compares the desired state (and the resolved MACs) with what is installed,
//! rebuilds the Maglev table of every VIP whose usable backend set changed
//! (or, under least-connections, whose backends' share of new flows did),
//! and installs it without a packet ever seeing a half-written table.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use lb_common::{
    BACKEND_FLAG_DOWN, Backend, VIP_FLAG_CLIENT_IP_AFFINITY, VipAddressKey, VipInfo, address_bytes,
};

use crate::datapath::{Datapath, DatapathError, Maps};
use crate::model::{
    Affinity, BackendHealth, DesiredState, Forwarding, HealthMap, Mac, NextHop, Scheduler, Vip,
    address_from_bytes,
};

mod install;
mod read;
mod schedule;
#[cfg(test)]
mod tests;

pub use read::{FlowOwners, InstalledBackend, InstalledVipStatus, LookupResult};
pub use schedule::FlowCounts;

/// A table slot that stopped being read is not rewritten before this long:
/// far beyond the microseconds a packet that read the old slot index needs.
const SLOT_QUIET_TIME: Duration = Duration::from_millis(5);

/// What is installed for one VIP.
#[derive(Debug)]
struct InstalledVip {
    vip_index: u32,
    active_slot: u32,
    /// When `active_slot` last changed.
    flipped_at: Instant,
    /// Backend address -> its slot in LB_BACKENDS (every configured backend).
    slots: BTreeMap<IpAddr, u32>,
    /// The table's members in table order: (address, weight, serving).
    members: Vec<Member>,
    /// No member was up, so the ones that were up earlier serve (fail-open).
    fail_open: bool,
    /// `VipInfo::flags` as installed.
    flags: u32,
}

impl InstalledVip {
    fn address_of(&self, slot: u32) -> Option<IpAddr> {
        self.slots.iter().find(|(_, s)| **s == slot).map(|(address, _)| *address)
    }
}

/// A backend in a VIP's table: configured and with a resolved MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Member {
    address: IpAddr,
    weight: u32,
    serving: bool,
}

/// FIFO slot allocator: a freed slot goes to the back, so it is reused as
/// late as possible.
#[derive(Debug)]
struct Slots {
    free: VecDeque<u32>,
}

impl Slots {
    fn new(count: u32) -> Self {
        Self { free: (0..count).collect() }
    }
    fn take(&mut self) -> Option<u32> {
        self.free.pop_front()
    }
    fn give_back(&mut self, slot: u32) {
        self.free.push_back(slot);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("no free {0} left in the datapath maps")]
    Exhausted(&'static str),
}

/// The installed state of the maps, and the only writer of them. `M` is the
/// real [`Datapath`] except in unit tests.
pub struct Reconciler<M: Maps = Datapath> {
    datapath: M,
    installed: BTreeMap<Vip, InstalledVip>,
    vip_indexes: Slots,
    backend_slots: Slots,
    /// Backend slot in use -> its `Backend::generation`.
    generations: HashMap<u32, u32>,
    /// Each backend address's next hop on the interface, as last resolved.
    macs: HashMap<IpAddr, NextHop>,
    vip_addresses: BTreeMap<VipAddressKey, u32>,
    /// The port prefilter as last written; None until the first write, which
    /// writes every word (adopted maps may hold an older one).
    vip_port_words: Option<Vec<u64>>,
    flow_counts: FlowCounts,
    tables_built: u64,
    table_rebuild_time: Duration,
}

impl<M: Maps> Reconciler<M> {
    /// Takes over a datapath. When its maps were adopted from an earlier
    /// `lb run`, the VIP indexes, table slots, backend slots and MACs found
    /// in them are kept, so established flows (which name backend slots)
    /// still reach the same backends, and every table in use stays intact.
    pub fn new(datapath: M) -> Self {
        let config = datapath.config();
        let mut reconciler = Self {
            installed: BTreeMap::new(),
            vip_indexes: Slots::new(config.max_vips),
            backend_slots: Slots::new(config.max_backends),
            generations: HashMap::new(),
            macs: HashMap::new(),
            vip_addresses: BTreeMap::new(),
            vip_port_words: None,
            flow_counts: FlowCounts::default(),
            tables_built: 0,
            table_rebuild_time: Duration::ZERO,
            datapath,
        };
        if reconciler.datapath.adopted() {
            reconciler.adopt();
        }
        reconciler
    }

    fn adopt(&mut self) {
        let backends = self.datapath.backend_entries();
        for (key, info) in self.datapath.vip_entries() {
            let Some(vip) = Vip::from_key(&key) else { continue };
            let mut slots = BTreeMap::new();
            for (slot, backend) in backends.iter().filter(|(_, b)| b.vip_index == info.vip_index) {
                let Some(address) = address_from_bytes(backend.address, backend.family) else {
                    continue;
                };
                slots.insert(address, *slot);
                self.generations.insert(*slot, backend.generation);
                if backend.has_mac() {
                    // A tunnelled slot's MAC may be a router's: a DSR slot of
                    // the same address (on-link for certain) wins.
                    let routed = backend.forwarding != lb_common::FORWARDING_DSR;
                    let gateway = routed.then_some(address);
                    let hop = NextHop { mac: backend.mac, gateway, egress: backend.egress };
                    if routed {
                        self.macs.entry(address).or_insert(hop);
                    } else {
                        self.macs.insert(address, hop);
                    }
                }
            }
            self.vip_indexes.free.retain(|index| *index != info.vip_index);
            self.backend_slots.free.retain(|slot| !slots.values().any(|s| s == slot));
            self.installed.insert(
                vip,
                InstalledVip {
                    vip_index: info.vip_index,
                    active_slot: info.active_slot,
                    // The old daemon may have flipped just now.
                    flipped_at: Instant::now(),
                    slots,
                    // Unknown: the first apply rebuilds (the same) table.
                    members: Vec::new(),
                    fail_open: false,
                    flags: info.flags,
                },
            );
        }
        tracing::info!(
            vips = self.installed.len(),
            backends = backends.len(),
            macs = self.macs.len(),
            "adopted the pinned datapath of an earlier lb run"
        );
    }

    pub fn datapath(&self) -> &M {
        &self.datapath
    }

    pub fn datapath_mut(&mut self) -> &mut M {
        &mut self.datapath
    }

    pub fn tables_built(&self) -> u64 {
        self.tables_built
    }

    /// Time spent building and installing tables (excluding the slot quiet wait).
    pub fn table_rebuild_time(&self) -> Duration {
        self.table_rebuild_time
    }

    /// Backend addresses whose MAC the datapath needs.
    pub fn wanted_neighbours(&self) -> Vec<IpAddr> {
        let mut wanted: Vec<IpAddr> =
            self.installed.values().flat_map(|vip| vip.slots.keys().copied()).collect();
        wanted.sort();
        wanted.dedup();
        wanted
    }

    pub fn mac(&self, address: IpAddr) -> Option<Mac> {
        self.macs.get(&address).map(|hop| hop.mac)
    }

    /// The next hop a VIP forwarding by `forwarding` sends `address`'s
    /// packets to: the router's or the backend's for a tunnel; for DSR only
    /// an on-link backend's own (a router would send the VIP's packets
    /// straight back here).
    fn usable_hop(&self, address: IpAddr, forwarding: Forwarding) -> Option<NextHop> {
        let hop = self.macs.get(&address)?;
        (forwarding.is_tunnel() || hop.gateway.is_none()).then_some(*hop)
    }

    /// Records an on-link backend's resolved MAC ([`Self::set_next_hop`]).
    pub fn set_mac(&mut self, address: IpAddr, mac: Mac) -> bool {
        self.set_next_hop(address, NextHop { mac, gateway: None, egress: 0 })
    }

    /// Records how `address` is reached. A next hop is never forgotten, only
    /// replaced: a neighbour entry that expires must not stop traffic to a
    /// live backend. Returns whether anything changed (then call [`Self::apply`]).
    pub fn set_next_hop(&mut self, address: IpAddr, hop: NextHop) -> bool {
        self.macs.insert(address, hop) != Some(hop)
    }

    /// Brings the maps in line with `desired` and the backends' health.
    pub fn apply(
        &mut self,
        desired: &DesiredState,
        health: &HealthMap,
    ) -> Result<(), ReconcileError> {
        // VIPs that went away: unpublish first, then free their slots.
        let gone: Vec<Vip> =
            self.installed.keys().filter(|vip| !desired.vips.contains_key(vip)).copied().collect();
        for vip in gone {
            self.datapath.remove_vip(&vip.key())?;
            let installed = self.installed.remove(&vip).expect("listed above");
            for (_, slot) in installed.slots {
                self.release_backend(slot)?;
            }
            self.vip_indexes.give_back(installed.vip_index);
        }
        self.sync_vip_ports(desired)?;

        for (vip, spec) in &desired.vips {
            let backends = &spec.backends;
            if !self.installed.contains_key(vip) {
                let vip_index =
                    self.vip_indexes.take().ok_or(ReconcileError::Exhausted("VIP index"))?;
                self.datapath.reset_vip_stats(vip_index)?;
                self.installed.insert(
                    *vip,
                    InstalledVip {
                        vip_index,
                        active_slot: 0,
                        flipped_at: Instant::now() - SLOT_QUIET_TIME,
                        slots: BTreeMap::new(),
                        members: Vec::new(),
                        fail_open: false,
                        flags: 0,
                    },
                );
                // Published with no backends (drops) until its table is installed.
                self.datapath.set_vip(vip.key(), VipInfo { vip_index, ..Default::default() })?;
            }

            // Backend slots: allocate new ones, program MACs, remember removals.
            let mut released = Vec::new();
            {
                let installed = self.installed.get_mut(vip).expect("inserted above");
                installed.slots.retain(|address, slot| {
                    let keep = backends.contains_key(address);
                    if !keep {
                        released.push(*slot);
                    }
                    keep
                });
                for address in backends.keys() {
                    if !installed.slots.contains_key(address) {
                        let slot = self
                            .backend_slots
                            .take()
                            .ok_or(ReconcileError::Exhausted("backend slot"))?;
                        self.datapath.reset_backend_stats(slot)?;
                        // A new occupant: flow entries of the slot's earlier
                        // ones (another generation) are never sent to it.
                        let last = self.datapath.backend(slot).map_or(0, |b| b.generation);
                        self.generations.insert(slot, last.wrapping_add(1));
                        installed.slots.insert(*address, slot);
                    }
                }
            }

            // Only backends with a resolved MAC go in the table. New flows go to
            // those that are up and not draining; when none is up, to those that
            // were (fail-open).
            let health_of = |address: IpAddr| {
                health
                    .get(&(*vip, address))
                    .copied()
                    .unwrap_or(BackendHealth { up: true, ever_up: true })
            };
            let mut members: Vec<Member> = backends
                .values()
                .filter(|backend| self.usable_hop(backend.address, spec.forwarding).is_some())
                .map(|backend| Member {
                    address: backend.address,
                    weight: backend.weight,
                    serving: health_of(backend.address).up && !backend.draining,
                })
                .collect();
            let fail_open =
                !members.is_empty() && members.iter().all(|member| !health_of(member.address).up);
            if fail_open {
                for member in &mut members {
                    member.serving =
                        health_of(member.address).ever_up && !backends[&member.address].draining;
                }
            }
            if spec.scheduler == Scheduler::LeastConnections {
                self.schedule_by_active_flows(vip, &mut members, |address| !health_of(address).up);
            }
            let flags = match spec.affinity {
                Affinity::Flow => 0,
                Affinity::ClientIp => VIP_FLAG_CLIENT_IP_AFFINITY,
            };
            let installed = &self.installed[vip];
            if members != installed.members
                || fail_open != installed.fail_open
                || flags != installed.flags
                || !self.is_published(vip)
            {
                self.install_table(vip, members, fail_open, flags)?;
            }

            // Backend entries after the table: a backend marked down loses its
            // established flows to a table that no longer contains it.
            for (address, slot) in &self.installed[vip].slots {
                let (bytes, family) = address_bytes(*address);
                let health = health_of(*address);
                let kept_by_fail_open = fail_open && health.ever_up;
                let (forwarding, gue_port) = spec.forwarding.datapath();
                let hop = self.usable_hop(*address, spec.forwarding);
                let backend = Backend {
                    mac: hop.map(|hop| hop.mac).unwrap_or_default(),
                    flags: if health.up || kept_by_fail_open { 0 } else { BACKEND_FLAG_DOWN },
                    address: bytes,
                    family,
                    forwarding,
                    gue_port,
                    vip_index: self.installed[vip].vip_index,
                    generation: self.generation(*slot),
                    egress: hop.map_or(0, |hop| hop.egress),
                };
                self.datapath.set_backend(*slot, backend)?;
            }
            // Removed backends are freed only once no table points at them.
            for slot in released {
                self.release_backend(slot)?;
            }
        }
        self.sync_vip_addresses(desired)?;
        Ok(())
    }

    fn is_published(&self, vip: &Vip) -> bool {
        self.datapath.vip(&vip.key()).is_some()
    }
}
