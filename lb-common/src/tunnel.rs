//! Forwarding modes and the tunnel settings of L3 forwarding: how a backend
//! slot's packets leave ([`crate::Backend::forwarding`]), the outer headers
//! each mode adds, and the load-time globals that give the outer source
//! addresses and the egress MTU.

use crate::FlowKey;

/// [`crate::Backend::forwarding`]: L2 direct server return, only the
/// Ethernet addresses change (the default; a zeroed entry is DSR).
pub const FORWARDING_DSR: u8 = 0;
/// IPv4-in-IPv4 (RFC 2003) to an IPv4 backend, IPv6-in-IPv6 (RFC 2473) to
/// an IPv6 backend: one outer IP header, protocol 4 or next header 41.
pub const FORWARDING_IPIP: u8 = 1;
/// The inner IP packet right after an outer IP and UDP header (GUE
/// variant 1: the first nibble is the inner IP version; Linux's fou in
/// `gue` mode takes both families on one port), to
/// [`crate::Backend::gue_port`]. The outer UDP source
/// port comes from the flow, so a backend's NIC spreads flows over its
/// receive queues.
pub const FORWARDING_GUE: u8 = 2;

/// The port a GUE VIP sends to unless configured: 6080, IANA's port for GUE.
pub const DEFAULT_GUE_PORT: u16 = 6080;

/// Outer UDP source ports of GUE: the flow's 14 bits of entropy in the
/// dynamic range 49152-65535, so no backend service port is ever a source.
pub const GUE_SOURCE_PORT_BASE: u16 = 0xc000;

/// Bytes a mode adds in front of an inner packet of `family`
/// ([`crate::FAMILY_IPV4`] or [`crate::FAMILY_IPV6`]): the outer IP header,
/// and for GUE the UDP header. 0 for DSR.
#[inline(always)]
pub const fn encap_overhead(forwarding: u8, family: u8) -> u32 {
    let ip = if family == crate::FAMILY_IPV6 { 40 } else { 20 };
    match forwarding {
        FORWARDING_IPIP => ip,
        FORWARDING_GUE => ip + 8,
        _ => 0,
    }
}

/// Global (`u32`): the outer source address of IPv4 tunnels, its four
/// bytes in network order read as a native-endian u32
/// (`u32::from_ne_bytes(octets)`); zero while the balancer has none, and
/// then IPv4 packets of `ipip`/`gue` VIPs are dropped as `drop_no_tunnel_source`.
pub const GLOBAL_TUNNEL_SOURCE_V4: &str = "LB_TUNNEL_SOURCE_V4";
/// Global (`[u32; 4]`): the outer source address of IPv6 tunnels, four
/// such words, as [`GLOBAL_TUNNEL_SOURCE_V4`].
pub const GLOBAL_TUNNEL_SOURCE_V6: &str = "LB_TUNNEL_SOURCE_V6";
/// Global (`u32`): which bits of the IPv4 tunnel source come from the flow
/// ([`spread_source_word`]), as a mask in the same word layout as
/// [`GLOBAL_TUNNEL_SOURCE_V4`]: the host bits of `--tunnel-source
/// PREFIX/LEN`, so a backend's NIC, which hashes an IPIP packet by its
/// addresses alone, spreads one balancer's flows over its queues. Zero: one
/// address.
pub const GLOBAL_TUNNEL_SPREAD_V4: &str = "LB_TUNNEL_SPREAD_V4";
/// Global (`u32`): the same for the last word of the IPv6 tunnel source.
pub const GLOBAL_TUNNEL_SPREAD_V6: &str = "LB_TUNNEL_SPREAD_V6";
/// The most bits a tunnel source prefix takes from the flow: all of
/// [`tunnel_entropy`]'s.
pub const TUNNEL_SPREAD_MAX_BITS: u8 = 20;

/// A word of a tunnel source address (network order, read native-endian)
/// with the bits of `mask` (same layout) taken from the low bits of the
/// flow's `entropy`: `source | (entropy & mask)` as addresses.
#[inline(always)]
pub const fn spread_source_word(source: u32, mask: u32, entropy: u32) -> u32 {
    source | (entropy.to_be() & mask)
}

/// The [`GLOBAL_TUNNEL_SPREAD_V4`] / [`GLOBAL_TUNNEL_SPREAD_V6`] mask of
/// the lowest `bits` bits of an address word.
pub const fn spread_mask(bits: u8) -> u32 {
    match bits {
        0 => 0,
        bits if bits >= 32 => u32::MAX,
        bits => (u32::MAX >> (32 - bits as u32)).to_be(),
    }
}

/// Global (`u32`): the egress interface's MTU. An encapsulated packet whose
/// outer IP packet would exceed it is not sent: the client is told the
/// MTU that fits (ICMP "fragmentation needed" / "packet too big"). 0 checks
/// nothing (test runs without an interface).
pub const GLOBAL_TUNNEL_MTU: &str = "LB_TUNNEL_MTU";

/// A flow's tunnel entropy (20 bits): the outer IPv6 flow label, and in its
/// low 14 bits the GUE source port's. A function of the client's address
/// and port alone, so every packet of a flow (and ICMP errors about it)
/// carries the same outer headers, and cheap: one multiply, no table.
#[inline(always)]
pub fn tunnel_entropy(key: &FlowKey) -> u32 {
    let a = key.client_address;
    let words = [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ];
    let port = u32::from(u16::from_be_bytes(key.client_port));
    let mixed =
        (words[0] ^ words[1] ^ words[2] ^ words[3] ^ (port << 16 | port)).wrapping_mul(0x9e37_79b1);
    mixed >> 12
}

/// The XDP program that encapsulates: the balancer's program hands a
/// tunnelled packet to it by tail call through [`MAP_PROGRAMS`], so the
/// kernel's verifier walks the encapsulation once, not once for every path
/// that reaches it (which took the balancer's program past the verifier's
/// limit once flow sync was on).
pub const ENCAP_PROGRAM_NAME: &str = "lb_encap";
/// `ProgramArray` of [`TAIL_CALL_SLOTS`] entries: the programs the
/// balancer's program tail-calls, [`TAIL_CALL_ENCAP`] among them. Pinned
/// with the other maps: the kernel empties a program array once no file
/// or pin holds it, which would stop tunnelled VIPs while the daemon restarts.
pub const MAP_PROGRAMS: &str = "LB_PROGRAMS";
/// Entries of [`MAP_PROGRAMS`].
pub const TAIL_CALL_SLOTS: u32 = 1;
/// The entry of [`MAP_PROGRAMS`] holding [`ENCAP_PROGRAM_NAME`].
pub const TAIL_CALL_ENCAP: u32 = 0;

/// What the balancer's program tells the encapsulating one about a packet,
/// written into the first bytes of the room it made in front of the frame
/// for the outer headers (so it travels with the packet, and a program of
/// another version never reads it from a shared map). 16 bytes: no mode's
/// overhead is smaller (20 bytes, IPv4 in IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncapRequest {
    /// The backend slot ([`crate::MAP_BACKENDS`] index) and its VIP's index.
    pub slot: u32,
    pub vip_index: u32,
    /// [`tunnel_entropy`] of the flow (of the quoted flow for ICMP errors).
    pub entropy: u32,
    /// The transport header's offset in the frame as the client sent it.
    pub l4_offset: u16,
    /// The transport protocol of the inner packet.
    pub protocol: u8,
    /// [`ENCAP_IPV6`], [`ENCAP_ICMP_ERROR`], [`ENCAP_GUE`] and the number of
    /// VLAN tags in bits 3-4 ([`ENCAP_TAGS_SHIFT`]).
    pub flags: u8,
}

/// [`EncapRequest::flags`]: the inner packet is IPv6.
pub const ENCAP_IPV6: u8 = 1;
/// [`EncapRequest::flags`]: the packet is an ICMP error about the flow.
pub const ENCAP_ICMP_ERROR: u8 = 2;
/// [`EncapRequest::flags`]: GUE, else IPIP (the mode when the room was
/// made, which decided its size).
pub const ENCAP_GUE: u8 = 4;
/// [`EncapRequest::flags`]: the VLAN tag count's shift (0, 1 or 2 tags).
pub const ENCAP_TAGS_SHIFT: u8 = 3;

/// The most "fragmentation needed" / "packet too big" answers one CPU sends
/// in a second (each CPU counts its own): beyond it, packets too big for
/// the tunnel are dropped as [`crate::Reason::DropTooBig`], so a flood of
/// large packets cannot turn the balancer into an ICMP source.
pub const ICMP_TOO_BIG_PER_SECOND: u64 = 100;
