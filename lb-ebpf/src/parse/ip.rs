//! IPv4 (IHL honoured, options allowed) and IPv6 (bounded extension-header walk).

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_IPV4, FAMILY_IPV6, Reason};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use super::ptr_at;

/// What the rest of the pipeline needs from the IP header.
pub struct L3 {
    pub family: u8,
    pub source: Address,
    pub destination: Address,
    /// The transport protocol once extension headers are skipped.
    pub protocol: u8,
    pub l4_offset: usize,
    /// Where the IP packet ends by its own length field (the frame may be
    /// longer: Ethernet pads short frames). Headers are read only before it.
    pub l3_end: usize,
    /// Set when the destination is known but the packet cannot be hashed
    /// (a fragment, or an IPv6 header chain we do not walk to its end).
    pub unhashable: Option<Reason>,
}

/// An address as read from the packet: 16 bytes in network order, held
/// as words so that it moves into map keys in four loads and stores (as
/// bytes, LLVM moves it a byte at a time).
pub type Address = [u32; 4];

/// An IPv4 address as `L3` and the map keys hold it: its four bytes, then zeros.
#[inline(always)]
pub fn ipv4_address(bytes: [u8; 4]) -> Address {
    [u32::from_ne_bytes(bytes), 0, 0, 0]
}

/// An IPv6 address from the packet, as words.
#[inline(always)]
pub fn ipv6_address(bytes: &[u8; 16]) -> Address {
    // SAFETY: [u8; 16] and [u32; 4] have the same size and every bit pattern
    // is valid for both; the read is unaligned.
    unsafe { core::ptr::read_unaligned(bytes as *const [u8; 16] as *const Address) }
}

/// An address in the byte layout of the lb-common map keys.
#[inline(always)]
pub fn key_bytes(address: Address) -> [u8; 16] {
    // SAFETY: as in ipv6_address: same size, any bit pattern valid.
    unsafe { core::mem::transmute::<Address, [u8; 16]>(address) }
}

#[inline(always)]
pub fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<L3, Reason> {
    let ip = ptr_at::<Ipv4Hdr>(ctx, offset).ok_or(Reason::PassMalformed)?;
    // SAFETY: ptr_at checked the fixed header is within the packet.
    let ip = unsafe { &*ip };
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    if ip.vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(Reason::PassMalformed);
    }
    // Options are allowed; they only have to be present in full. The total
    // length must cover the header and fit in the frame.
    let total_len = usize::from(u16::from_be_bytes(ip.tot_len));
    if total_len < header_len || ctx.data() + offset + total_len > ctx.data_end() {
        return Err(Reason::PassMalformed);
    }
    // More-fragments flag or a non-zero offset: either way the ports of the
    // flow are missing from all but one piece.
    let is_fragment = u16::from_be_bytes(ip.frags) & 0x3fff != 0;
    Ok(L3 {
        family: FAMILY_IPV4,
        source: ipv4_address(ip.src_addr),
        destination: ipv4_address(ip.dst_addr),
        protocol: ip.proto,
        l4_offset: offset + header_len,
        l3_end: offset + total_len,
        unhashable: if is_fragment { Some(Reason::DropFragment) } else { None },
    })
}

const NEXT_HOP_BY_HOP: u8 = 0;
const NEXT_ROUTING: u8 = 43;
const NEXT_FRAGMENT: u8 = 44;
const NEXT_ESP: u8 = 50;
const NEXT_AUTH: u8 = 51;
const NEXT_DESTINATION_OPTIONS: u8 = 60;

/// Extension headers walked before giving up. Real traffic carries zero or
/// one; a longer chain to a VIP is dropped as unhashable.
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 4;

#[inline(always)]
pub fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<L3, Reason> {
    let ip = ptr_at::<Ipv6Hdr>(ctx, offset).ok_or(Reason::PassMalformed)?;
    // SAFETY: ptr_at checked the fixed header is within the packet.
    let ip = unsafe { &*ip };
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    if ip.vcf[0] >> 4 != 6 || ctx.data() + offset + Ipv6Hdr::LEN + payload_len > ctx.data_end() {
        return Err(Reason::PassMalformed);
    }
    let mut l3 = L3 {
        family: FAMILY_IPV6,
        source: ipv6_address(&ip.src_addr),
        destination: ipv6_address(&ip.dst_addr),
        protocol: ip.next_hdr,
        l4_offset: offset + Ipv6Hdr::LEN,
        l3_end: offset + Ipv6Hdr::LEN + payload_len,
        unhashable: None,
    };
    for _ in 0..MAX_IPV6_EXTENSION_HEADERS {
        let header_len = match l3.protocol {
            NEXT_HOP_BY_HOP | NEXT_ROUTING | NEXT_DESTINATION_OPTIONS | NEXT_AUTH => {
                // Every one of these starts with (next header, length).
                let inside = l3.l4_offset + 2 <= l3.l3_end;
                let Some(ext) = ptr_at::<[u8; 2]>(ctx, l3.l4_offset).filter(|_| inside) else {
                    l3.unhashable = Some(Reason::DropMalformedL4);
                    return Ok(l3);
                };
                // SAFETY: ptr_at checked both bytes are within the packet.
                let [next, length] = unsafe { *ext };
                let header_len = if l3.protocol == NEXT_AUTH {
                    (usize::from(length) + 2) * 4
                } else {
                    (usize::from(length) + 1) * 8
                };
                l3.protocol = next;
                header_len
            }
            NEXT_FRAGMENT => {
                l3.unhashable = Some(Reason::DropFragment);
                return Ok(l3);
            }
            NEXT_ESP => {
                l3.unhashable = Some(Reason::DropUnhashable);
                return Ok(l3);
            }
            _ => return Ok(l3),
        };
        l3.l4_offset += header_len;
    }
    if is_extension_header(l3.protocol) {
        l3.unhashable = Some(Reason::DropUnhashable);
    }
    Ok(l3)
}

#[inline(always)]
fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        NEXT_HOP_BY_HOP
            | NEXT_ROUTING
            | NEXT_FRAGMENT
            | NEXT_ESP
            | NEXT_AUTH
            | NEXT_DESTINATION_OPTIONS
    )
}
