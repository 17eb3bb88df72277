//! The typed readers and writers of the datapath's maps, and its counters.
//! [`Maps`] is what the reconcile step needs of them, so that it can be
//! tested against a fake; [`Datapath`] is the real implementation.

use std::os::fd::AsFd as _;

use aya::maps::{MapData, PerCpuArray};
use lb_common::{
    Backend, FLOW_FLAG_CLOSING, FlowEntry, FlowEvent, FlowKey, MAP_BACKEND_STATS, MAP_BACKENDS,
    MAP_FLOW_EVENTS, MAP_REASONS, MAP_VIP_ADDRESSES, MAP_VIP_PORTS, MAP_VIP_STATS, MAP_VIPS,
    PROTO_TCP, Reason, SLOTS_PER_VIP, TrafficCounters, VipAddressKey, VipInfo, VipKey,
};

use super::{Datapath, DatapathError, map_error};
use crate::model::DatapathConfig;

/// What the reconcile step reads and writes: the VIP, VIP-address and backend
/// maps, the Maglev tables, and single flow-table entries.
pub trait Maps {
    /// The sizes and seed the maps were created with.
    fn config(&self) -> DatapathConfig;
    /// Whether the maps were adopted from an earlier `lb run`.
    fn adopted(&self) -> bool;
    /// Every VIP entry in the map (for adopting pinned maps).
    fn vip_entries(&self) -> Vec<(VipKey, VipInfo)>;
    /// Every backend slot in use (family set), with its entry.
    fn backend_entries(&self) -> Vec<(u32, Backend)>;
    /// Fills one table slot. The caller installs it with [`Self::set_vip`]
    /// only after this returns, and never writes the slot the datapath reads.
    fn write_table(&mut self, vip_index: u32, slot: u32, table: &[u32]);
    /// The backend slot at `index` of LB_MAGLEV (see `lb_common::table_index`).
    fn maglev_entry(&self, index: u32) -> u32;
    /// A whole installed table, as the datapath reads it.
    fn table(&self, vip_index: u32, slot: u32) -> &[u32];
    /// Publishes a VIP (or moves it to another table slot) in one map update.
    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError>;
    fn vip(&self, key: &VipKey) -> Option<VipInfo>;
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DatapathError>;
    /// Records how many VIPs use `address` (0 removes it).
    fn set_vip_address(&mut self, key: VipAddressKey, count: u32) -> Result<(), DatapathError>;
    /// Writes one word of the port prefilter (see `lb_common::vip_port_bit`).
    fn set_vip_port_word(&mut self, word: u32, bits: u64) -> Result<(), DatapathError>;
    fn set_backend(&mut self, slot: u32, backend: Backend) -> Result<(), DatapathError>;
    /// The entry of one backend slot, used or free (a free slot keeps the
    /// generation of its last occupant).
    fn backend(&self, slot: u32) -> Option<Backend>;
    /// Zeroes the counters of a VIP index that is being reused.
    fn reset_vip_stats(&mut self, vip_index: u32) -> Result<(), DatapathError>;
    /// Zeroes the counters of a backend slot that is being reused.
    fn reset_backend_stats(&mut self, slot: u32) -> Result<(), DatapathError>;
    /// The flow-table entry of one flow, as the datapath recorded it.
    fn flow(&self, key: &FlowKey) -> Option<FlowEntry>;
}

impl Maps for Datapath {
    fn config(&self) -> DatapathConfig {
        self.config
    }

    fn adopted(&self) -> bool {
        self.adopted
    }

    fn vip_entries(&self) -> Vec<(VipKey, VipInfo)> {
        self.vips.iter().filter_map(Result::ok).collect()
    }

    fn backend_entries(&self) -> Vec<(u32, Backend)> {
        used_backends(&self.backends, self.config.max_backends)
    }

    fn write_table(&mut self, vip_index: u32, slot: u32, table: &[u32]) {
        assert_eq!(table.len(), self.config.table_size as usize, "table of the wrong size");
        let range = table_range(&self.config, vip_index, slot);
        self.maglev[range].copy_from_slice(bytemuck::cast_slice(table));
    }

    fn maglev_entry(&self, index: u32) -> u32 {
        let start = index as usize * size_of::<u32>();
        let bytes: [u8; 4] = self.maglev[start..start + 4].try_into().expect("four bytes");
        u32::from_ne_bytes(bytes)
    }

    fn table(&self, vip_index: u32, slot: u32) -> &[u32] {
        bytemuck::cast_slice(&self.maglev[table_range(&self.config, vip_index, slot)])
    }

    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), DatapathError> {
        self.vips.insert(key, info, 0).map_err(map_error(MAP_VIPS))
    }

    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.vips.get(key, 0).ok()
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<(), DatapathError> {
        self.vips.remove(key).map_err(map_error(MAP_VIPS))
    }

    fn set_vip_address(&mut self, key: VipAddressKey, count: u32) -> Result<(), DatapathError> {
        if count == 0 {
            self.vip_addresses.remove(&key).map_err(map_error(MAP_VIP_ADDRESSES))
        } else {
            self.vip_addresses.insert(key, count, 0).map_err(map_error(MAP_VIP_ADDRESSES))
        }
    }

    fn set_vip_port_word(&mut self, word: u32, bits: u64) -> Result<(), DatapathError> {
        self.vip_ports.set(word, bits, 0).map_err(map_error(MAP_VIP_PORTS))
    }

    fn set_backend(&mut self, slot: u32, backend: Backend) -> Result<(), DatapathError> {
        self.backends.set(slot, backend, 0).map_err(map_error(MAP_BACKENDS))
    }

    fn backend(&self, slot: u32) -> Option<Backend> {
        self.backends.get(&slot, 0).ok()
    }

    fn reset_vip_stats(&mut self, vip_index: u32) -> Result<(), DatapathError> {
        reset(&mut self.vip_stats, vip_index).map_err(map_error(MAP_VIP_STATS))
    }

    fn reset_backend_stats(&mut self, slot: u32) -> Result<(), DatapathError> {
        reset(&mut self.backend_stats, slot).map_err(map_error(MAP_BACKEND_STATS))
    }

    fn flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.flows.get(key, 0).ok()
    }
}

/// The bytes of one table slot in the memory-mapped Maglev array.
fn table_range(config: &DatapathConfig, vip_index: u32, slot: u32) -> std::ops::Range<usize> {
    let entries = config.table_size as usize;
    let start = (vip_index * SLOTS_PER_VIP + slot) as usize * entries * size_of::<u32>();
    start..start + entries * size_of::<u32>()
}

/// Counters, and what the daemon shows of the flow table.
impl Datapath {
    // --- counters ------------------------------------------------------------

    pub fn vip_counters(&self, vip_index: u32) -> Result<TrafficCounters, DatapathError> {
        sum_traffic(&self.vip_stats, vip_index).map_err(map_error(MAP_VIP_STATS))
    }

    pub fn backend_counters(&self, slot: u32) -> Result<TrafficCounters, DatapathError> {
        sum_traffic(&self.backend_stats, slot).map_err(map_error(MAP_BACKEND_STATS))
    }

    /// Packets per [`Reason`], summed over CPUs, in `Reason::ALL` order.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>, DatapathError> {
        per_cpu_totals(
            &self.reasons,
            MAP_REASONS,
            Reason::ALL.map(|reason| (reason, reason as u32)),
        )
    }

    /// Packets per [`FlowEvent`], summed over CPUs, in `FlowEvent::ALL` order.
    pub fn flow_event_counters(&self) -> Result<Vec<(FlowEvent, u64)>, DatapathError> {
        per_cpu_totals(
            &self.flow_events,
            MAP_FLOW_EVENTS,
            FlowEvent::ALL.map(|event| (event, event as u32)),
        )
    }

    /// Active flows per backend slot: confirmed entries of the slot's
    /// current occupant (same VIP and generation) neither closing nor idle
    /// past their protocol's timeout. Walks the whole flow table (about two
    /// seconds per million flows, two syscalls per entry): never on the
    /// daemon's loop.
    pub fn active_flows(&self) -> std::collections::HashMap<u32, u64> {
        count_active_flows(&self.flows, &self.backend_entries(), &self.config).0
    }

    /// Memory the kernel charges for the flow table (its `memlock`), if known.
    pub fn flow_table_memory(&self) -> Option<u64> {
        use std::os::fd::AsRawFd as _;
        let fd = self.flows_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines().find_map(|line| line.strip_prefix("memlock:")?.trim().parse().ok())
    }

    /// Its own handles on the flow table and the backend slots, for
    /// counting active flows off the daemon's loop.
    pub fn flow_counter(&self) -> Result<FlowCounter, DatapathError> {
        let duplicate = |fd, name| MapData::from_fd(owned_fd(fd, name)?).map_err(map_error(name));
        use aya::maps::IterableMap as _;
        let flows = duplicate(self.flows_fd(), lb_common::MAP_FLOWS)?;
        let backends = duplicate(self.backends.map().fd().as_fd(), MAP_BACKENDS)?;
        let flows = aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(flows));
        let backends = aya::maps::Array::try_from(aya::maps::Map::Array(backends));
        Ok(FlowCounter {
            flows: flows.map_err(map_error(lb_common::MAP_FLOWS))?,
            backends: backends.map_err(map_error(MAP_BACKENDS))?,
            config: self.config,
            entries: Default::default(),
        })
    }

    pub(super) fn flows_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use aya::maps::IterableMap as _;
        self.flows.map().fd().as_fd()
    }
}

/// Counts active flows from its own map handles, so that the walk (about two
/// seconds per million flows) runs on a blocking thread, never on the loop.
pub struct FlowCounter {
    flows: aya::maps::HashMap<MapData, FlowKey, FlowEntry>,
    backends: aya::maps::Array<MapData, Backend>,
    config: DatapathConfig,
    /// Entries of the flow table at the last count (occupancy, for /metrics).
    entries: std::sync::atomic::AtomicU64,
}

impl FlowCounter {
    /// Active flows per backend slot, as [`Datapath::active_flows`] counts
    /// them; the walk also records the table's occupancy ([`Self::entries`]).
    pub fn count(&self) -> std::collections::HashMap<u32, u64> {
        let backends = used_backends(&self.backends, self.config.max_backends);
        let (counts, entries) = count_active_flows(&self.flows, &backends, &self.config);
        self.entries.store(entries, std::sync::atomic::Ordering::Relaxed);
        counts
    }

    /// Entries of the flow table (any state) at the last [`Self::count`].
    pub fn entries(&self) -> u64 {
        self.entries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Up to `limit` flows of the VIP with index `vip_index`, and whether
    /// the walk stopped at the limit (the VIP may have more).
    pub fn flows_of(&self, vip_index: u32, limit: usize) -> (Vec<(FlowKey, FlowEntry)>, bool) {
        let mut found = Vec::new();
        for (key, entry) in self.flows.iter().filter_map(Result::ok) {
            if entry.vip_index != vip_index {
                continue;
            }
            if found.len() == limit {
                return (found, true);
            }
            found.push((key, entry));
        }
        (found, false)
    }

    /// The datapath settings the walks read timeouts from.
    pub fn config(&self) -> &DatapathConfig {
        &self.config
    }
}

/// Every backend slot in use (family set) of the first `max_backends`, with its entry.
fn used_backends<T: std::borrow::Borrow<MapData>>(
    backends: &aya::maps::Array<T, Backend>,
    max_backends: u32,
) -> Vec<(u32, Backend)> {
    (0..max_backends)
        .filter_map(|slot| backends.get(&slot, 0).ok().map(|backend| (slot, backend)))
        .filter(|(_, backend)| backend.family != 0)
        .collect()
}

/// A second descriptor of a map, for a task that needs its own handle.
pub(super) fn owned_fd(
    fd: std::os::fd::BorrowedFd<'_>,
    name: &'static str,
) -> Result<std::os::fd::OwnedFd, DatapathError> {
    fd.try_clone_to_owned()
        .map_err(|error| DatapathError::Map { name, error: aya::maps::MapError::IoError(error) })
}

/// What a flow-table entry is at `now`: one rule for the active-flow
/// counts and for `lb flows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowState {
    /// Neither closing nor past its protocol's idle timeout.
    Active,
    /// A FIN or RST was seen.
    Closing,
    /// No packet for longer than its protocol's idle timeout.
    Idle,
}

impl FlowState {
    pub fn of(key: &FlowKey, entry: &FlowEntry, now: u64, config: &DatapathConfig) -> Self {
        let idle_ms = if key.protocol == u32::from(PROTO_TCP) {
            config.tcp_idle_timeout_ms
        } else {
            config.udp_idle_timeout_ms
        };
        if entry.flags & FLOW_FLAG_CLOSING != 0 {
            FlowState::Closing
        } else if now.saturating_sub(entry.last_seen_ns) > idle_ms.saturating_mul(1_000_000) {
            FlowState::Idle
        } else {
            FlowState::Active
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FlowState::Active => "active",
            FlowState::Closing => "closing",
            FlowState::Idle => "idle",
        }
    }
}

/// The walk behind [`Datapath::active_flows`], on any handle of the flow
/// table, given the backend slots in use: active flows per slot, and the
/// entries walked.
pub fn count_active_flows<T: std::borrow::Borrow<MapData>>(
    flows: &aya::maps::HashMap<T, FlowKey, FlowEntry>,
    backends: &[(u32, Backend)],
    config: &DatapathConfig,
) -> (std::collections::HashMap<u32, u64>, u64) {
    let now = monotonic_ns();
    let occupants: std::collections::HashMap<u32, (u32, u32)> = backends
        .iter()
        .map(|(slot, backend)| (*slot, (backend.vip_index, backend.generation)))
        .collect();
    let mut counts = std::collections::HashMap::new();
    let mut entries = 0;
    for (key, entry) in flows.iter().filter_map(Result::ok) {
        entries += 1;
        if FlowState::of(&key, &entry, now, config) == FlowState::Active
            && occupants.get(&entry.backend_slot) == Some(&(entry.vip_index, entry.generation))
        {
            *counts.entry(entry.backend_slot).or_default() += 1;
        }
    }
    (counts, entries)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_ns() -> u64 {
    // The clock exists on every Linux the datapath loads on; 0 cannot happen.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map_or(0, |now| now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

/// One label's packets in what [`Datapath::reason_counters`] or
/// [`Datapath::flow_event_counters`] returned.
pub fn total_of<L: PartialEq>(counters: &[(L, u64)], label: L) -> u64 {
    counters.iter().find(|(each, _)| *each == label).map_or(0, |(_, count)| *count)
}

/// Each labelled index of a per-CPU counter array, summed over CPUs.
fn per_cpu_totals<L, const N: usize>(
    map: &PerCpuArray<MapData, u64>,
    name: &'static str,
    indexes: [(L, u32); N],
) -> Result<Vec<(L, u64)>, DatapathError> {
    indexes
        .into_iter()
        .map(|(label, index)| {
            let values = map.get(&index, 0).map_err(map_error(name))?;
            Ok((label, values.iter().sum()))
        })
        .collect()
}

fn sum_traffic(
    map: &PerCpuArray<MapData, TrafficCounters>,
    index: u32,
) -> Result<TrafficCounters, aya::maps::MapError> {
    let values = map.get(&index, 0)?;
    Ok(values.iter().fold(TrafficCounters::default(), |total, cpu| TrafficCounters {
        packets: total.packets + cpu.packets,
        bytes: total.bytes + cpu.bytes,
        icmp_errors: total.icmp_errors + cpu.icmp_errors,
        dropped: total.dropped + cpu.dropped,
    }))
}

fn reset(
    map: &mut PerCpuArray<MapData, TrafficCounters>,
    index: u32,
) -> Result<(), aya::maps::MapError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, error)| {
        aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: error,
        })
    })?;
    let zeroes = aya::maps::PerCpuValues::try_from(vec![TrafficCounters::default(); cpus])?;
    map.set(index, zeroes, 0)
}
