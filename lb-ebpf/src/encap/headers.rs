//! The outer headers of `ipip` and `gue`: the client's IP packet, untouched,
//! in front of which go an outer IP header from the balancer to the backend
//! (IPv4 in IPv4, IPv6 in IPv6) and for GUE a UDP header; the Ethernet
//! header (VLAN tags kept) moves to the new front and goes to the next hop.
//! The backend takes the outer headers off and answers the client from the
//! VIP, as with direct server return.
//!
//! Outer headers are complete: the IPv4 header checksum, and over IPv6 the
//! UDP checksum, summed without reading the payload: a valid L4 checksum
//! makes the inner segment sum to the complement of its pseudo-header, so
//! only the inner IP header (and extension headers, up to
//! [`MAX_EXTENSION_WORDS`] words) is read. Over IPv4 the UDP checksum is
//! zero, as RFC 768 allows.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Backend, Egress, FAMILY_IPV4, GUE_SOURCE_PORT_BASE, PROTO_IPIP, PROTO_IPV6_INSIDE, PROTO_UDP,
    Reason, spread_source_word,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::checksum::{fold, word_at};
use crate::parse::{ethernet::MAX_L2_WORDS, ptr_at, ptr_at_mut};

/// Where the packet to encapsulate lies in the frame, and its flow's
/// tunnel entropy (lb_common::tunnel_entropy). Plain values, passed by
/// value (see reset::TcpPacket).
#[derive(Clone, Copy)]
pub struct Inner {
    pub family: u8,
    /// The IP header (after Ethernet and VLAN tags).
    pub l3_offset: usize,
    /// The transport header, after any IPv6 extension headers.
    pub l4_offset: usize,
    /// The transport protocol.
    pub protocol: u8,
    pub entropy: u32,
}

/// Outer source of IPv4 tunnels: its four bytes in network order, read as
/// a native u32; set at load time, zero: none.
#[unsafe(no_mangle)]
static LB_TUNNEL_SOURCE_V4: u32 = 0;

/// Outer source of IPv6 tunnels, as four such words; set at load time,
/// zero: none.
#[unsafe(no_mangle)]
static LB_TUNNEL_SOURCE_V6: [u32; 4] = [0; 4];

/// The host bits of a tunnel source prefix, which come from the flow
/// (lb_common::GLOBAL_TUNNEL_SPREAD_V4); set at load time, zero: none.
#[unsafe(no_mangle)]
static LB_TUNNEL_SPREAD_V4: u32 = 0;

/// The same for the last word of the IPv6 source.
#[unsafe(no_mangle)]
static LB_TUNNEL_SPREAD_V6: u32 = 0;

/// The egress MTU tunnelled packets must fit, set at load time; 0: unchecked.
#[unsafe(no_mangle)]
static LB_TUNNEL_MTU: u32 = 0;

/// What a tunnelled packet leaves with: its outer sources (network order,
/// read native-endian; zero: none) and the MTU it must fit (0: unchecked).
#[derive(Clone, Copy)]
pub struct Tunnel {
    pub source_v4: u32,
    pub source_v6: [u32; 4],
    pub mtu: u32,
}

impl Tunnel {
    /// The tunnel of packets sent out of `egress` (crate::dsr::egress_of):
    /// the load-time globals for the program's own interface (None), else
    /// the daemon's LB_EGRESS_INFO entry.
    #[inline(always)]
    pub fn of(egress: Option<&Egress>) -> Self {
        if let Some(egress) = egress {
            return Self {
                source_v4: egress.source_v4,
                source_v6: egress.source_v6,
                mtu: egress.mtu,
            };
        }
        // SAFETY: read_volatile keeps the compiler from folding the
        // load-time globals to their compile-time defaults; the IPv6 word
        // index is below 4.
        unsafe {
            use core::ptr::read_volatile;
            let v6 = &raw const LB_TUNNEL_SOURCE_V6 as *const u32;
            Self {
                source_v4: read_volatile(&LB_TUNNEL_SOURCE_V4),
                source_v6: [
                    read_volatile(v6),
                    read_volatile(v6.add(1)),
                    read_volatile(v6.add(2)),
                    read_volatile(v6.add(3)),
                ],
                mtu: read_volatile(&LB_TUNNEL_MTU),
            }
        }
    }
}

pub(super) const OUTER_TTL: u8 = 64;
const IPV4_DONT_FRAGMENT: u16 = 0x4000;
/// IPv6 extension headers summed for the GUE checksum: 64 bytes.
pub const MAX_EXTENSION_WORDS: usize = 32;

/// Writes the outer headers into the `overhead` bytes of room made in
/// front of the frame (the request that was there has been read), moving
/// the L2 header to the new front. The Ethernet addresses are left for
/// dsr::forward to set.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    backend: &Backend,
    tunnel: &Tunnel,
    inner: Inner,
    gue: bool,
    overhead: usize,
) -> Result<(), Reason> {
    let v4 = inner.family == FAMILY_IPV4;
    let l3 = inner.l3_offset;
    let (inner_len, class, dont_fragment) = inner_header(ctx, overhead + l3, v4)?;
    let (mtu, source_v4, source_v6) = (tunnel.mtu, tunnel.source_v4, tunnel.source_v6);
    // SAFETY: read_volatile keeps the compiler from folding the load-time
    // globals to their compile-time defaults.
    let (spread_v4, spread_v6) = unsafe {
        use core::ptr::read_volatile;
        (read_volatile(&LB_TUNNEL_SPREAD_V4), read_volatile(&LB_TUNNEL_SPREAD_V6))
    };
    if mtu != 0 && inner_len + overhead > mtu as usize {
        return Err(Reason::DropTooBig);
    }
    let no_source = if v4 {
        source_v4 == 0
    } else {
        source_v6[0] | source_v6[1] | source_v6[2] | source_v6[3] == 0
    };
    if no_source {
        return Err(Reason::DropNoTunnelSource);
    }
    let payload_sum = if gue && !v4 { inner_sum(ctx, inner, overhead, inner_len)? } else { 0 };

    // Its EtherType stays: the outer packet has the inner's family.
    copy_l2_down(ctx, l3, overhead)?;
    let outer_len = inner_len + overhead;
    let udp_len = (inner_len + 8) as u16;
    let source_port = GUE_SOURCE_PORT_BASE | (inner.entropy & 0x3fff) as u16;
    // The tunnel source, its prefix's host bits (if any) from the flow.
    let source_word = |index: usize| {
        let mask = if index == 3 { spread_v6 } else { 0 };
        spread_source_word(source_v6[index], mask, inner.entropy)
    };
    // The backend's address, word by word (a 16-byte copy would be a
    // memmove call, which BPF cannot make).
    let backend_word = |index: usize| {
        // SAFETY: the address is 16 bytes long and index below 4.
        unsafe { core::ptr::read_unaligned((backend.address.as_ptr() as *const u32).add(index)) }
    };
    let ip_len = if v4 {
        let protocol = if gue { PROTO_UDP } else { PROTO_IPIP };
        let frags = if dont_fragment { IPV4_DONT_FRAGMENT } else { 0 };
        let header = OuterV4 { tos: class, total_len: outer_len as u16, frags, protocol };
        let source = spread_source_word(source_v4, spread_v4, inner.entropy);
        write_ipv4(ctx, l3, header, source, backend_word(0))?;
        Ipv4Hdr::LEN
    } else {
        let next = if gue { PROTO_UDP } else { PROTO_IPV6_INSIDE };
        let payload = (outer_len - Ipv6Hdr::LEN) as u16;
        let ip = ptr_at_mut::<Ipv6Hdr>(ctx, l3).ok_or(Reason::DropInternal)?;
        let vcf = 6 << 28 | u32::from(class) << 20 | (inner.entropy & 0x000f_ffff);
        // SAFETY: ptr_at_mut checked the header lies within the frame.
        unsafe {
            (*ip).vcf = vcf.to_be_bytes();
            (*ip).payload_len = payload.to_be_bytes();
            (*ip).next_hdr = next;
            (*ip).hop_limit = OUTER_TTL;
            let source = (*ip).src_addr.as_mut_ptr() as *mut u32;
            let destination = (*ip).dst_addr.as_mut_ptr() as *mut u32;
            for index in 0..4 {
                core::ptr::write_unaligned(source.add(index), source_word(index));
                core::ptr::write_unaligned(destination.add(index), backend_word(index));
            }
        }
        Ipv6Hdr::LEN
    };
    if gue {
        let check = if v4 {
            0
        } else {
            let mut sum = u32::from(PROTO_UDP) + 2 * u32::from(udp_len);
            for index in 0..4 {
                sum += word_sum(source_word(index)) + word_sum(backend_word(index));
            }
            sum += u32::from(source_port) + u32::from(backend.gue_port) + payload_sum;
            // RFC 768: a computed zero is sent as all ones.
            match !fold(sum) {
                0 => 0xffff,
                check => check,
            }
        };
        let udp = ptr_at_mut::<[u8; 8]>(ctx, l3 + ip_len).ok_or(Reason::DropInternal)?;
        let [sp0, sp1] = source_port.to_be_bytes();
        let [dp0, dp1] = backend.gue_port.to_be_bytes();
        let [l0, l1] = udp_len.to_be_bytes();
        let [c0, c1] = check.to_be_bytes();
        // SAFETY: ptr_at_mut checked the header lies within the frame.
        unsafe { *udp = [sp0, sp1, dp0, dp1, l0, l1, c0, c1] };
    }
    Ok(())
}

/// Moves the `l3` bytes of L2 header at `shift` to the front of the frame,
/// lowest word first (the copy moves down, so no word is read after it was
/// overwritten).
#[inline(always)]
pub(super) fn copy_l2_down(ctx: &XdpContext, l3: usize, shift: usize) -> Result<(), Reason> {
    for index in 0..MAX_L2_WORDS {
        if index * 2 >= l3 {
            break;
        }
        let from = ptr_at::<[u8; 2]>(ctx, shift + index * 2).ok_or(Reason::DropInternal)?;
        let to = ptr_at_mut::<[u8; 2]>(ctx, index * 2).ok_or(Reason::DropInternal)?;
        // SAFETY: ptr_at checked both words lie within the frame.
        unsafe { *to = *from };
    }
    Ok(())
}

/// The inner packet's length by its header, its DSCP/ECN byte, and for
/// IPv4 its don't-fragment bit.
#[inline(always)]
fn inner_header(ctx: &XdpContext, l3: usize, v4: bool) -> Result<(usize, u8, bool), Reason> {
    if v4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, l3).ok_or(Reason::DropInternal)?;
        // SAFETY: ptr_at checked the header lies within the frame.
        let (len, tos, frags) = unsafe { ((*ip).tot_len, (*ip).tos, (*ip).frags) };
        let df = u16::from_be_bytes(frags) & IPV4_DONT_FRAGMENT != 0;
        Ok((usize::from(u16::from_be_bytes(len)), tos, df))
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, l3).ok_or(Reason::DropInternal)?;
        // SAFETY: as above.
        let (vcf, payload) = unsafe { ((*ip).vcf, (*ip).payload_len) };
        let class = (u32::from_be_bytes(vcf) >> 20) as u8;
        Ok((Ipv6Hdr::LEN + usize::from(u16::from_be_bytes(payload)), class, false))
    }
}

/// The fields of an outer IPv4 header that vary.
#[derive(Clone, Copy)]
pub(super) struct OuterV4 {
    pub tos: u8,
    pub total_len: u16,
    pub frags: u16,
    pub protocol: u8,
}

/// Writes the outer IPv4 header with its checksum; addresses as words of
/// network-order bytes.
#[inline(always)]
pub(super) fn write_ipv4(
    ctx: &XdpContext,
    l3: usize,
    header: OuterV4,
    source: u32,
    destination: u32,
) -> Result<(), Reason> {
    let mut sum = 0x4500 | u32::from(header.tos);
    sum += u32::from(header.total_len) + u32::from(header.frags);
    sum += u32::from(OUTER_TTL) << 8 | u32::from(header.protocol);
    sum += word_sum(source) + word_sum(destination);
    let check = !fold(sum);
    let ip = ptr_at_mut::<Ipv4Hdr>(ctx, l3).ok_or(Reason::DropInternal)?;
    // SAFETY: ptr_at_mut checked the header lies within the frame.
    unsafe {
        (*ip).vihl = 0x45;
        (*ip).tos = header.tos;
        (*ip).tot_len = header.total_len.to_be_bytes();
        (*ip).id = [0, 0];
        (*ip).frags = header.frags.to_be_bytes();
        (*ip).ttl = OUTER_TTL;
        (*ip).proto = header.protocol;
        (*ip).check = check.to_be_bytes();
        core::ptr::write_unaligned((*ip).src_addr.as_mut_ptr() as *mut u32, source);
        core::ptr::write_unaligned((*ip).dst_addr.as_mut_ptr() as *mut u32, destination);
    }
    Ok(())
}

/// The one's-complement sum of an IPv6 inner packet of `inner_len` bytes:
/// its header and extension headers as read, its transport segment as the
/// complement of the segment's pseudo-header.
#[inline(always)]
fn inner_sum(
    ctx: &XdpContext,
    inner: Inner,
    overhead: usize,
    inner_len: usize,
) -> Result<u32, Reason> {
    let l3 = overhead + inner.l3_offset;
    let l4 = overhead + inner.l4_offset;
    if l4 < l3 + Ipv6Hdr::LEN {
        return Err(Reason::DropInternal);
    }
    let mut header = 0u32;
    // Words 4 to 19 are the source and destination addresses.
    let mut addresses = 0u32;
    // One bounds check for the whole header: word by word, the compiler
    // merges the checks into arithmetic on the packet's end, which the
    // verifier refuses.
    let ip = ptr_at::<[u8; Ipv6Hdr::LEN]>(ctx, l3).ok_or(Reason::DropInternal)?;
    for index in 0..Ipv6Hdr::LEN / 2 {
        // SAFETY: ptr_at checked the header lies within the frame.
        let word =
            u32::from(u16::from_be_bytes(unsafe { [(*ip)[index * 2], (*ip)[index * 2 + 1]] }));
        header += word;
        if index >= 4 {
            addresses += word;
        }
    }
    let extensions = l4 - l3 - Ipv6Hdr::LEN;
    if extensions > MAX_EXTENSION_WORDS * 2 {
        return Err(Reason::DropUnhashable);
    }
    for index in 0..MAX_EXTENSION_WORDS {
        if index * 2 >= extensions {
            break;
        }
        header += word_at(ctx, l3 + Ipv6Hdr::LEN + index * 2).ok_or(Reason::DropInternal)?;
    }
    let segment_len = inner_len.saturating_sub(l4 - l3) as u32;
    let pseudo =
        addresses + (segment_len >> 16) + (segment_len & 0xffff) + u32::from(inner.protocol);
    Ok(fold(header) as u32 + u32::from(!fold(pseudo)))
}

/// The sum of the two 16-bit words of four network-order bytes read as a
/// native u32.
#[inline(always)]
pub(super) fn word_sum(word: u32) -> u32 {
    let value = u32::from_be(word);
    (value >> 16) + (value & 0xffff)
}
