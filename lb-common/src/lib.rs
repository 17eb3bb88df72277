//! Everything that crosses the kernel/user boundary: map names and layouts,
//! load-time globals, counter reasons and the flow hash.
//!
//! Both the XDP program (`lb-ebpf`) and the control plane (`lb-userspace`)
//! use these definitions; nothing here is declared a second time elsewhere.
//! With the `user` feature the map types implement `aya::Pod`.
#![no_std]

use core::mem::size_of;
use core::net::IpAddr;

mod counters;
mod decap;
mod egress;
mod flows;
mod hash;
mod tunnel;

pub use counters::*;
pub use decap::*;
pub use egress::*;
pub use flows::*;
pub use hash::*;
pub use tunnel::*;

// ---------------------------------------------------------------------------
// Map and global names.
// ---------------------------------------------------------------------------

/// `HashMap<VipKey, VipInfo>`: the configured VIPs.
pub const MAP_VIPS: &str = "LB_VIPS";
/// `HashMap<VipAddressKey, u32>`: every address that carries at least one VIP.
pub const MAP_VIP_ADDRESSES: &str = "LB_VIP_ADDRESSES";
/// `Array<MaglevChunk>` (mmap-able): the Maglev tables, two slots of
/// `table_size` entries per VIP, stored densely in chunks.
pub const MAP_MAGLEV: &str = "LB_MAGLEV";
/// `Array<Backend>`: where each backend slot forwards to.
pub const MAP_BACKENDS: &str = "LB_BACKENDS";
/// `PerCpuArray<TrafficCounters>`: per VIP, indexed by `VipInfo::vip_index`.
pub const MAP_VIP_STATS: &str = "LB_VIP_STATS";
/// `PerCpuArray<TrafficCounters>`: per backend slot.
pub const MAP_BACKEND_STATS: &str = "LB_BACKEND_STATS";
/// `PerCpuArray<u64>`: one counter per [`Reason`].
pub const MAP_REASONS: &str = "LB_REASONS";
/// `LruHashMap<FlowKey, FlowEntry>`: confirmed flows and their backend.
pub const MAP_FLOWS: &str = "LB_FLOWS";
/// `Array<PendingFlow>`: flows not confirmed yet (a SYN without its
/// handshake's ACK, a first packet without an entry), each in one of the
/// [`PENDING_WAYS`] slots of the bucket its flow hash selects
/// ([`pending_bucket`]). Kept apart so that a flood of spoofed tuples
/// overwrites this table and never [`MAP_FLOWS`].
pub const MAP_NEW_FLOWS: &str = "LB_NEW_FLOWS";
/// `PerCpuArray<u64>`: one counter per [`FlowEvent`].
pub const MAP_FLOW_EVENTS: &str = "LB_FLOW_EVENTS";
/// `Array<Layout>` (one entry): the sizes and seed the maps were made with,
/// so that a restarted daemon adopting pinned maps can check they fit.
pub const MAP_LAYOUT: &str = "LB_LAYOUT";

/// `RingBuf` of [`FlowSyncEvent`]: flows the datapath created or closed, for
/// the daemon to tell the balancer's peers. Written only while
/// [`GLOBAL_SYNC_FLOWS`] is set.
pub const MAP_FLOW_SYNC: &str = "LB_FLOW_SYNC";

/// `Array` of `u64` words, [`VIP_PORT_WORDS`] of them: one bit per
/// (protocol, destination port) that some VIP listens on. The datapath's
/// prefilter: a packet whose bit is clear is the host's, and skips every
/// hash lookup. Written by the daemon on every VIP change.
pub const MAP_VIP_PORTS: &str = "LB_VIP_PORTS";

/// Words of [`MAP_VIP_PORTS`]: 65,536 ports for each of TCP and UDP.
pub const VIP_PORT_WORDS: u32 = 2 * 65_536 / 64;

/// The word of [`MAP_VIP_PORTS`] holding the bit of (`protocol`, `port`)
/// (host byte order), and that bit; None for a protocol no VIP can have.
#[inline(always)]
pub fn vip_port_bit(protocol: u8, port: u16) -> Option<(u32, u64)> {
    let base = match protocol {
        PROTO_TCP => 0,
        PROTO_UDP => VIP_PORT_WORDS / 2,
        _ => return None,
    };
    Some((base + u32::from(port >> 6), 1 << (port & 63)))
}

/// Every map, in the order they are pinned and adopted.
pub const ALL_MAPS: [&str; 14] = [
    MAP_VIPS,
    MAP_VIP_ADDRESSES,
    MAP_MAGLEV,
    MAP_BACKENDS,
    MAP_VIP_STATS,
    MAP_BACKEND_STATS,
    MAP_REASONS,
    MAP_FLOWS,
    MAP_NEW_FLOWS,
    MAP_FLOW_EVENTS,
    MAP_LAYOUT,
    MAP_FLOW_SYNC,
    MAP_VIP_PORTS,
    MAP_PROGRAMS,
];

/// Bumped whenever a map's key or value layout changes: pinned maps of
/// another version are refused rather than misread.
pub const LAYOUT_VERSION: u32 = 8;

/// Value of [`MAP_LAYOUT`]. Written by the daemon that creates the maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Layout {
    pub version: u32,
    pub hash_seed: u32,
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    pub flow_table_size: u32,
    pub udp_idle_timeout_ms: u64,
}

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "lb_xdp";

/// Global (`u32`): seed of the flow hash; must match on every balancer that shares VIPs.
pub const GLOBAL_HASH_SEED: &str = "LB_HASH_SEED";
/// Global (`u32`): slots of [`MAP_NEW_FLOWS`] ([`new_flow_table_size`]).
pub const GLOBAL_NEW_FLOW_SLOTS: &str = "LB_NEW_FLOW_SLOTS";
/// Global (`u32`): entries in one Maglev table (a prime).
pub const GLOBAL_TABLE_SIZE: &str = "LB_TABLE_SIZE";
/// Global (`u64`): nanoseconds after which an idle UDP flow is forgotten.
pub const GLOBAL_UDP_IDLE_NS: &str = "LB_UDP_IDLE_NS";
/// Global (`u64`): nanoseconds after which a TCP flow counts as idle: a SYN
/// on an idle entry takes the current table (the port was reused).
pub const GLOBAL_TCP_IDLE_NS: &str = "LB_TCP_IDLE_NS";

/// Global (`u64`): the MAC of the interface the program is attached to, in
/// the low six bytes as [`mac_word`] packs it; frames for any other
/// destination are passed. 0 checks nothing (test runs without an interface).
pub const GLOBAL_OWN_MAC: &str = "LB_OWN_MAC";

/// A MAC as one integer: its six bytes in order, big-endian, in the low 48 bits.
#[inline(always)]
pub const fn mac_word(mac: [u8; 6]) -> u64 {
    (mac[0] as u64) << 40
        | (mac[1] as u64) << 32
        | (mac[2] as u64) << 24
        | (mac[3] as u64) << 16
        | (mac[4] as u64) << 8
        | mac[5] as u64
}

/// Global (`u32`): 1 when `lb run` shares flows with peers, so the datapath
/// reports every flow it creates or closes in [`MAP_FLOW_SYNC`]; 0 otherwise.
pub const GLOBAL_SYNC_FLOWS: &str = "LB_SYNC_FLOWS";

/// Bytes of [`MAP_FLOW_SYNC`] (a power of two): 65,536 events of 64 bytes
/// with their ring header, far more than the daemon lets pile up between two
/// reads 10 ms apart.
pub const FLOW_SYNC_RING_BYTES: u32 = 4 << 20;

/// Defaults for the sizes the control plane sets at load time.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
pub const DEFAULT_MAX_VIPS: u32 = 64;
pub const DEFAULT_MAX_BACKENDS: u32 = 4_096;
/// Flows the flow table holds before the least recently used are evicted.
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 1 << 20;
pub const DEFAULT_UDP_IDLE_NS: u64 = 30_000_000_000;
pub const DEFAULT_TCP_IDLE_NS: u64 = 3_600_000_000_000;
/// A Maglev table entry that points at no backend (a VIP without backends).
pub const NO_BACKEND: u32 = u32::MAX;

/// Each VIP owns two table slots: one the datapath reads, one the control plane fills.
pub const SLOTS_PER_VIP: u32 = 2;

// ---------------------------------------------------------------------------
// Keys and values.
// ---------------------------------------------------------------------------

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv4 inside: IPIP (RFC 2003), an IPv4 protocol or IPv6 next header.
pub const PROTO_IPIP: u8 = 4;
/// IPv6 inside (RFC 2473, and 6in4), an IPv6 next header or IPv4 protocol.
pub const PROTO_IPV6_INSIDE: u8 = 41;

/// An address as it appears in keys: IPv4 in the first four bytes, the rest zero.
#[inline(always)]
pub fn address_bytes(address: IpAddr) -> ([u8; 16], u8) {
    match address {
        IpAddr::V4(v4) => {
            let mut bytes = [0u8; 16];
            let octets = v4.octets();
            bytes[0] = octets[0];
            bytes[1] = octets[1];
            bytes[2] = octets[2];
            bytes[3] = octets[3];
            (bytes, FAMILY_IPV4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_IPV6),
    }
}

/// Key of [`MAP_VIPS`]: a VIP is (address, port, protocol).
/// Written by the daemon; looked up by the datapath for every TCP/UDP packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub address: [u8; 16],
    /// Destination port, network byte order.
    pub port: [u8; 2],
    /// IP protocol number ([`PROTO_TCP`] or [`PROTO_UDP`]).
    pub protocol: u8,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u8,
}
const _: () = assert!(size_of::<VipKey>() == 20);

impl VipKey {
    pub fn new(address: IpAddr, port: u16, protocol: u8) -> Self {
        let (address, family) = address_bytes(address);
        Self { address, port: port.to_be_bytes(), protocol, family }
    }
}

/// Value of [`MAP_VIPS`]. Replaced as a whole by the daemon, so the datapath
/// sees either the old or the new table slot, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Index of this VIP's stats entry and of its pair of table slots.
    pub vip_index: u32,
    /// Which of the two table slots (0 or 1) the datapath reads.
    pub active_slot: u32,
    /// Backends in the active table; 0 means every packet is dropped as `NoBackend`.
    pub backend_count: u32,
    /// `VIP_FLAG_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<VipInfo>() == 16);

/// Hash on the client address alone, so that all of a client's connections
/// (to any VIP with the same backend set) land on one backend.
pub const VIP_FLAG_CLIENT_IP_AFFINITY: u32 = 1;

/// Key of [`MAP_VIP_ADDRESSES`]: consulted only for packets that cannot be
/// hashed (fragments, unreadable L4), to decide between drop and pass.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipAddressKey {
    pub address: [u8; 16],
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`], widened so the key has no padding.
    pub family: u32,
}
const _: () = assert!(size_of::<VipAddressKey>() == 20);

impl VipAddressKey {
    pub fn new(address: IpAddr) -> Self {
        let (address, family) = address_bytes(address);
        Self { address, family: u32::from(family) }
    }
}

/// Value of [`MAP_BACKENDS`], indexed by backend slot. A slot is allocated by
/// the daemon per (VIP, backend address) so that statistics are per VIP.
/// Address and VIP index let a restarted daemon find its slots again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Destination MAC: the backend's own for direct server return, the
    /// next hop's towards it for `ipip`/`gue`; all zero while unresolved.
    pub mac: [u8; 6],
    pub flags: u16,
    pub address: [u8; 16],
    /// 0 for an unused slot.
    pub family: u8,
    /// How this slot's packets leave: [`FORWARDING_DSR`] (0),
    /// [`FORWARDING_IPIP`] or [`FORWARDING_GUE`], the VIP's mode.
    pub forwarding: u8,
    /// The UDP destination port of [`FORWARDING_GUE`] (host order); 0 otherwise.
    pub gue_port: u16,
    pub vip_index: u32,
    /// Bumped each time the slot is given to a backend (and kept when it is
    /// freed): a flow entry of an earlier occupant carries another generation
    /// and is never sent to the slot's new backend.
    pub generation: u32,
    /// Which interface the slot's packets leave by: 0, the one the program
    /// runs on (XDP_TX); else an index of [`MAP_EGRESS`] (XDP_REDIRECT),
    /// whose [`Egress`] gives the source MAC, MTU and tunnel source. A
    /// field that was padding before: maps pinned by an earlier version
    /// hold 0 there, their old meaning.
    pub egress: u32,
}
const _: () = assert!(size_of::<Backend>() == 40);

/// `Backend::flags` bit: the backend fails its health checks. Flows in the
/// flow table that point at it are sent to the Maglev choice instead.
pub const BACKEND_FLAG_DOWN: u16 = 1;

impl Backend {
    pub fn has_mac(&self) -> bool {
        self.mac != [0; 6]
    }

    pub fn is_down(&self) -> bool {
        self.flags & BACKEND_FLAG_DOWN != 0
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), Copy, has no implicit padding (explicit
    // `_pad` fields and size assertions above) and is valid for any bit pattern.
    unsafe impl aya::Pod for super::VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VipAddressKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TrafficCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Layout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowSyncEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Egress {}
}
