//! ICMP and ICMPv6 errors: the header of the packet they quote. Only the
//! errors a path sends about a flow are read (IPv4 destination unreachable,
//! fragmentation needed among them, and time exceeded; ICMPv6 destination
//! unreachable, packet too big and time exceeded); anything else (echo,
//! neighbour discovery) is the kernel's.

use aya_ebpf::programs::XdpContext;
use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use super::ip::{Address, L3, ipv4_address, ipv6_address};
use super::ptr_at;

const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;

/// Type, code, checksum and four bytes (unused, or the MTU): the quoted
/// packet follows.
const ICMP_HEADER_LEN: usize = 8;

/// The packet an ICMP error quotes: a backend's reply, from VIP:port to
/// client:port. Addresses as in `L3`, ports in network byte order.
pub struct Quoted {
    pub source: Address,
    pub destination: Address,
    pub protocol: u8,
    pub source_port: [u8; 2],
    pub destination_port: [u8; 2],
}

/// The quoted packet of an ICMP error at `l3.l4_offset`. `PassIcmp` for
/// ICMP that is not such an error; `DropIcmpMalformed` when the quote is
/// truncated (by the frame or the outer IP length), a later fragment, or
/// not TCP or UDP right after the IP header.
#[inline(always)]
pub fn parse_icmp_error(ctx: &XdpContext, l3: &L3, ipv6: bool) -> Result<Quoted, Reason> {
    let inside = |offset: usize, len: usize| offset + len <= l3.l3_end;
    let header = ptr_at::<[u8; 2]>(ctx, l3.l4_offset)
        .filter(|_| inside(l3.l4_offset, ICMP_HEADER_LEN))
        .ok_or(Reason::DropIcmpMalformed)?;
    // SAFETY: ptr_at checked both bytes are within the packet.
    let [kind, _code] = unsafe { *header };
    let is_error = if ipv6 {
        matches!(kind, ICMPV6_DEST_UNREACHABLE | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED)
    } else {
        matches!(kind, ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED)
    };
    if !is_error {
        return Err(Reason::PassIcmp);
    }
    let quoted_offset = l3.l4_offset + ICMP_HEADER_LEN;
    let (mut quoted, ports_offset) =
        if ipv6 { quoted_ipv6(ctx, quoted_offset)? } else { quoted_ipv4(ctx, quoted_offset)? };
    if !inside(quoted_offset, ports_offset - quoted_offset + 4)
        || (quoted.protocol != PROTO_TCP && quoted.protocol != PROTO_UDP)
    {
        return Err(Reason::DropIcmpMalformed);
    }
    // Only the ports are needed of the quoted TCP or UDP header: an IPv4
    // error is only sure to quote 8 bytes of it.
    let ports = ptr_at::<[u8; 4]>(ctx, ports_offset).ok_or(Reason::DropIcmpMalformed)?;
    // SAFETY: ptr_at checked the four bytes are within the packet.
    let [s0, s1, d0, d1] = unsafe { *ports };
    quoted.source_port = [s0, s1];
    quoted.destination_port = [d0, d1];
    Ok(quoted)
}

/// The quoted IPv4 header at `offset`, and where its ports start.
#[inline(always)]
fn quoted_ipv4(ctx: &XdpContext, offset: usize) -> Result<(Quoted, usize), Reason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, offset).ok_or(Reason::DropIcmpMalformed)?;
    // SAFETY: ptr_at checked the fixed header is within the packet.
    let ip = unsafe { &*ip };
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    // A later fragment quotes no ports.
    let later_fragment = u16::from_be_bytes(ip.frags) & 0x1fff != 0;
    if ip.vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN || later_fragment {
        return Err(Reason::DropIcmpMalformed);
    }
    let quoted = Quoted {
        source: ipv4_address(ip.src_addr),
        destination: ipv4_address(ip.dst_addr),
        protocol: ip.proto,
        source_port: [0; 2],
        destination_port: [0; 2],
    };
    Ok((quoted, offset + header_len))
}

/// The quoted IPv6 header at `offset`, and where its ports start. Replies
/// from a backend carry no extension headers; a quote with one is refused.
#[inline(always)]
fn quoted_ipv6(ctx: &XdpContext, offset: usize) -> Result<(Quoted, usize), Reason> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, offset).ok_or(Reason::DropIcmpMalformed)?;
    // SAFETY: ptr_at checked the fixed header is within the packet.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::DropIcmpMalformed);
    }
    let quoted = Quoted {
        source: ipv6_address(&ip.src_addr),
        destination: ipv6_address(&ip.dst_addr),
        protocol: ip.next_hdr,
        source_port: [0; 2],
        destination_port: [0; 2],
    };
    Ok((quoted, offset + Ipv6Hdr::LEN))
}
