//! The rebalancer's close: a client's TCP packet on a marked flow
//! ([`lb_common::FLOW_FLAG_SHED`]) rewritten in place into a RST, which
//! then goes to the flow's backend like any packet of the flow.
//!
//! The RST keeps the packet's addresses, ports, sequence number and options
//! (its timestamp among them), so the backend's socket takes it as the
//! client's: a client's next packet carries the sequence number the backend
//! expects next (RFC 5961 accepts a RST only at exactly that number). The
//! payload is cut off, the window and urgent pointer zeroed, the ACK bit
//! kept with its number, and the IP length and both checksums recomputed.

use aya_ebpf::{helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use lb_common::{FAMILY_IPV4, Reason};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::checksum::{fold, word_at};
use crate::parse::{
    ptr_at, ptr_at_mut,
    transport::{TCP_ACK, TCP_RST},
};

/// Where a TCP packet's headers lie in the frame (offsets from its start).
/// Plain offsets, passed by value: a reference to the parser's `L3` makes
/// LLVM spill it to the stack with accesses the verifier refuses.
#[derive(Clone, Copy)]
pub struct TcpPacket {
    pub family: u8,
    /// The IP header.
    pub l3_offset: usize,
    /// The TCP header.
    pub l4_offset: usize,
    /// The end of the IP packet by its length field.
    pub l3_end: usize,
}

/// The longest TCP header: data offset 15, in 16-bit words.
const MAX_TCP_WORDS: usize = 30;

/// Rewrites the TCP packet `l3` describes into a RST: Ok(false), with the
/// frame unchanged, when its TCP header is not whole within the IP packet
/// (it is then forwarded as it is).
#[inline(always)]
pub fn into_reset(ctx: &XdpContext, l3: TcpPacket) -> Result<bool, Reason> {
    let l3_offset = l3.l3_offset;
    let Some(tcp_len) = tcp_header_len(ctx, l3) else { return Ok(false) };
    let end = l3.l4_offset + tcp_len;
    let cut = (ctx.data_end() - ctx.data()).saturating_sub(end);
    // SAFETY: the helper only shrinks the frame; every pointer is taken
    // again (and bounds-checked) after it.
    if cut > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(cut as i32)) } != 0 {
        return Ok(false);
    }
    // From here on the frame is being rewritten: a header that is no
    // longer where it was checked to be is an internal error, and dropped.
    let ip_len = (end - l3_offset) as u16;
    if l3.family == FAMILY_IPV4 {
        let ip = ptr_at_mut::<Ipv4Hdr>(ctx, l3_offset).ok_or(Reason::DropInternal)?;
        // SAFETY: ptr_at_mut checked the header is within the frame.
        unsafe {
            let old = u16::from_be_bytes((*ip).tot_len);
            (*ip).tot_len = ip_len.to_be_bytes();
            let check = u16::from_be_bytes((*ip).check);
            (*ip).check = updated_checksum(check, old, ip_len).to_be_bytes();
        }
    } else {
        let ip = ptr_at_mut::<Ipv6Hdr>(ctx, l3_offset).ok_or(Reason::DropInternal)?;
        // SAFETY: as above.
        unsafe { (*ip).payload_len = (ip_len - Ipv6Hdr::LEN as u16).to_be_bytes() };
    }
    let tcp = ptr_at_mut::<[u8; 20]>(ctx, l3.l4_offset).ok_or(Reason::DropInternal)?;
    // SAFETY: as above: the fixed header, bytes 13 (flags) to 19 (urgent).
    unsafe {
        (*tcp)[13] = TCP_RST | ((*tcp)[13] & TCP_ACK);
        // Window, checksum and urgent pointer, as three 16-bit stores
        // (volatile: a loop of byte stores becomes a memset, which BPF
        // cannot call).
        let fields = (tcp as *mut u8).add(14) as *mut [u8; 2];
        for field in 0..3 {
            core::ptr::write_volatile(fields.add(field), [0, 0]);
        }
    }
    let sum = header_sum(ctx, l3, tcp_len).ok_or(Reason::DropInternal)?;
    // SAFETY: as above.
    unsafe {
        let [high, low] = (!sum).to_be_bytes();
        (*tcp)[16] = high;
        (*tcp)[17] = low;
    }
    Ok(true)
}

/// The TCP header's length by its data offset, when it lies whole within
/// the IP packet.
#[inline(always)]
fn tcp_header_len(ctx: &XdpContext, l3: TcpPacket) -> Option<usize> {
    let fixed = ptr_at::<[u8; 20]>(ctx, l3.l4_offset)?;
    // SAFETY: ptr_at checked the fixed header is within the frame.
    let tcp_len = usize::from(unsafe { (*fixed)[12] } >> 4) * 4;
    (tcp_len >= 20 && l3.l4_offset + tcp_len <= l3.l3_end).then_some(tcp_len)
}

/// The one's-complement sum of the pseudo-header (the addresses read from
/// the IP header) and the TCP header of `tcp_len` bytes (the checksum field
/// zero), folded to 16 bits.
#[inline(always)]
fn header_sum(ctx: &XdpContext, l3: TcpPacket, tcp_len: usize) -> Option<u16> {
    // Source and destination, side by side: IPv4 at 12, IPv6 at 8.
    let (addresses, address_words) =
        if l3.family == FAMILY_IPV4 { (l3.l3_offset + 12, 4) } else { (l3.l3_offset + 8, 16) };
    let mut sum = u32::from(lb_common::PROTO_TCP) + tcp_len as u32;
    for index in 0..16 {
        if index >= address_words {
            break;
        }
        sum += word_at(ctx, addresses + index * 2)?;
    }
    for index in 0..MAX_TCP_WORDS {
        if index * 2 >= tcp_len {
            break;
        }
        sum += word_at(ctx, l3.l4_offset + index * 2)?;
    }
    Some(fold(sum))
}

/// A header checksum after one 16-bit field changed from `old` to `new`
/// (RFC 1624: HC' = ~(~HC + ~m + m')).
#[inline(always)]
fn updated_checksum(check: u16, old: u16, new: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old) + u32::from(new))
}
