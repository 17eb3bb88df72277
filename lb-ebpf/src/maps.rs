//! Every map of the datapath. Names, key and value types come from lb-common;
//! the static's identifier is the map name (asserted by the loader, which
//! takes each map by its lb-common name). Sizes here are defaults: the
//! control plane sets the real ones at load time.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, DevMap, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use lb_common::{
    Backend, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_VIPS, DEFAULT_TABLE_SIZE,
    Egress, FLOW_SYNC_RING_BYTES, FlowEntry, FlowEvent, FlowKey, Layout, MAX_EGRESS, MaglevChunk,
    PendingFlow, Reason, SLOTS_PER_VIP, TAIL_CALL_SLOTS, TrafficCounters, VIP_PORT_WORDS,
    VipAddressKey, VipInfo, VipKey, maglev_elements, new_flow_table_size,
};

use crate::clock::Clock;
use crate::encap::IcmpBudget;

/// VipKey -> VipInfo. Written by the daemon on every VIP or table change;
/// sized to the maximum number of VIPs.
#[map]
pub static LB_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// (protocol, destination port) bit -> some VIP listens there (see
/// lb_common::vip_port_bit). Written by the daemon on every VIP change; read
/// for every TCP and UDP packet before any hash lookup, so that the host's
/// own traffic costs one array read. 16 KiB: it stays in cache.
#[map]
pub static LB_VIP_PORTS: Array<u64> = Array::with_max_entries(VIP_PORT_WORDS, 0);

/// VipAddressKey -> number of VIPs on that address. Written by the daemon;
/// read only for packets that cannot be hashed, to drop them when they are ours.
#[map]
pub static LB_VIP_ADDRESSES: HashMap<VipAddressKey, u32> =
    HashMap::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// table index / MAGLEV_CHUNK -> MAGLEV_CHUNK backend slots (or NO_BACKEND).
/// Two slots of table_size entries per VIP; the daemon fills the inactive one
/// through mmap and then flips VipInfo::active_slot. Sized for
/// max_vips * 2 * table_size entries.
#[map]
pub static LB_MAGLEV: Array<MaglevChunk> = Array::with_max_entries(
    maglev_elements(DEFAULT_MAX_VIPS * SLOTS_PER_VIP * DEFAULT_TABLE_SIZE),
    BPF_F_MMAPABLE,
);

/// backend slot -> Backend (MAC to forward to). Written by the daemon when a
/// backend is added or its MAC resolves; sized to the maximum backend slots.
#[map]
pub static LB_BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// vip_index -> packets and bytes forwarded for that VIP, per CPU.
#[map]
pub static LB_VIP_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_VIPS, 0);

/// backend slot -> packets and bytes forwarded to that backend, per CPU.
#[map]
pub static LB_BACKEND_STATS: PerCpuArray<TrafficCounters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Reason -> packets that left the program for that reason, per CPU.
#[map]
pub static LB_REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// FlowKey -> FlowEntry: the backend of every confirmed flow. Written by the
/// datapath (confirmations, refreshes at most once a second, FIN/RST marks)
/// and by the daemon (peers' flows); read by the daemon for active-flow
/// counts. One table shared by all CPUs, so a flow keeps its backend
/// whichever CPU its packets reach. Sized by flow_table_size; the least
/// recently used flows are evicted when full.
#[map]
pub static LB_FLOWS: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(DEFAULT_FLOW_TABLE_SIZE, 0);

/// lb_common::pending_bucket(flow hash) + way -> PendingFlow: flows pinned
/// but not confirmed yet. Written by the datapath only. A new flow takes the
/// oldest or free slot of its bucket, with one write and no allocation or
/// lock, so floods of spoofed tuples overwrite each other here and never a
/// confirmed flow. Sized by lb_common::new_flow_table_size(flow_table_size).
#[map]
pub static LB_NEW_FLOWS: Array<PendingFlow> =
    Array::with_max_entries(new_flow_table_size(DEFAULT_FLOW_TABLE_SIZE), 0);

/// One entry: the sizes and seed the maps were created with. Written by the
/// daemon that creates them, read by a daemon adopting them. Never read here.
#[map]
pub static LB_LAYOUT: Array<Layout> = Array::with_max_entries(1, 0);

/// FlowEvent -> packets, per CPU: which flow-table path VIP packets took.
#[map]
pub static LB_FLOW_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FlowEvent::COUNT, 0);

/// FlowSyncEvent records: every flow this program creates or closes, while
/// flow sync is on. Read by the daemon every 10 ms and sent to its peers;
/// sized so that a burst of new connections between two reads fits.
#[map]
pub static LB_FLOW_SYNC: RingBuf = RingBuf::with_byte_size(FLOW_SYNC_RING_BYTES, 0);

/// One entry, per CPU: the coarse clock as last read, and the jiffy it was
/// read in. Written and read by the datapath only (never pinned): the coarse
/// clock only moves once a jiffy, so one helper call a jiffy is enough.
#[map]
pub static LB_CLOCK: PerCpuArray<Clock> = PerCpuArray::with_max_entries(1, 0);

/// lb_common::TAIL_CALL_ENCAP -> the encapsulating program (`lb_encap`), set
/// by the daemon after it loads both. Pinned: an empty entry would drop
/// every tunnelled packet while the daemon restarts.
#[map]
pub static LB_PROGRAMS: ProgramArray = ProgramArray::with_max_entries(TAIL_CALL_SLOTS, 0);

/// One entry, per CPU: the ICMP "too big" answers sent this second
/// (lb_common::ICMP_TOO_BIG_PER_SECOND at most). Datapath only, never pinned.
#[map]
pub static LB_ICMP_BUDGET: PerCpuArray<IcmpBudget> = PerCpuArray::with_max_entries(1, 0);

/// egress index -> interface index (lb_common::MAP_EGRESS): where a backend
/// with a nonzero `Backend::egress` is sent by XDP_REDIRECT. Written by the
/// daemon after loading; never pinned.
#[map]
pub static LB_EGRESS: DevMap = DevMap::with_max_entries(MAX_EGRESS, 0);

/// egress index -> Egress: the source MAC, MTU and tunnel sources of frames
/// sent out of that interface. Written with LB_EGRESS; never pinned.
#[map]
pub static LB_EGRESS_INFO: Array<Egress> = Array::with_max_entries(MAX_EGRESS, 0);
