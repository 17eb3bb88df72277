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
