//! Answering a packet too big for its tunnel: instead of dropping it, the
//! client gets ICMP "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet
//! too big" from the VIP, carrying the MTU that fits with the tunnel's
//! overhead, and quoting the packet's IP header (and extension headers) and
//! the first 8 bytes of its transport header, which is what the client's
//! stack matches the error to its connection with. Built in place: the
//! room made for the outer headers is resized to the error's headers, so
//! the quote is already where it goes.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FAMILY_IPV4, ICMP_TOO_BIG_PER_SECOND, PROTO_ICMP, PROTO_ICMPV6, Reason};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use super::headers::{Inner, OUTER_TTL, OuterV4, copy_l2_down, word_sum, write_ipv4};
use crate::checksum::{fold, word_at};
use crate::maps::LB_ICMP_BUDGET;
use crate::parse::{ptr_at, ptr_at_mut};

/// Bytes of the transport header quoted (RFC 792's 64 bits).
const QUOTED_TRANSPORT: usize = 8;
/// The longest IP header (with IPv6 extension headers) quoted.
const MAX_QUOTED_HEADER: usize = 40 + 64;
/// Words of the longest quote.
const MAX_QUOTE_WORDS: usize = (MAX_QUOTED_HEADER + QUOTED_TRANSPORT) / 2;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;

/// This CPU's answers in the current second.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpBudget {
    second: u64,
    sent: u64,
}

/// Answers the packet in the frame `[overhead bytes of room][L2][inner IP
/// packet]`; `mtu` is the egress MTU. XDP_TX, or why it was dropped.
#[inline(always)]
pub fn answer(
    ctx: &XdpContext,
    inner: Inner,
    overhead: usize,
    mtu: u32,
) -> Result<(Reason, u32), Reason> {
    let v4 = inner.family == FAMILY_IPV4;
    let l3 = inner.l3_offset;
    let header_len = inner.l4_offset.checked_sub(l3).ok_or(Reason::DropInternal)?;
    let (room, ip_len) =
        if v4 { (Ipv4Hdr::LEN + 8, Ipv4Hdr::LEN) } else { (Ipv6Hdr::LEN + 8, Ipv6Hdr::LEN) };
    if header_len > MAX_QUOTED_HEADER || overhead + 8 < room {
        return Err(Reason::DropTooBig);
    }
    let quote_len = header_len + QUOTED_TRANSPORT;
    // The client's addresses (and for IPv4 its DF bit), read before
    // anything moves, each header with one bounds check.
    let mut source = [0u32; 4];
    let mut destination = [0u32; 4];
    if v4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, overhead + l3).ok_or(Reason::DropInternal)?;
        // SAFETY: ptr_at checked the header lies within the frame.
        let (frags, from, to) = unsafe { ((*ip).frags, (*ip).src_addr, (*ip).dst_addr) };
        if frags[0] & 0x40 == 0 {
            // Without DF the client allowed fragments, which a balancer
            // does not make: dropped, as before there were answers.
            return Err(Reason::DropTooBig);
        }
        source[0] = u32::from_ne_bytes(from);
        destination[0] = u32::from_ne_bytes(to);
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, overhead + l3).ok_or(Reason::DropInternal)?;
        // SAFETY: ptr_at checked the header lies within the frame; word by
        // word (a 16-byte copy would be a memcpy call).
        unsafe {
            let from = (*ip).src_addr.as_ptr() as *const u32;
            let to = (*ip).dst_addr.as_ptr() as *const u32;
            for index in 0..4 {
                source[index] = core::ptr::read_unaligned(from.add(index));
                destination[index] = core::ptr::read_unaligned(to.add(index));
            }
        }
    }
    if !within_budget() {
        return Err(Reason::DropTooBig);
    }

    // The room becomes the error's IP and ICMP headers.
    // SAFETY: the helper only moves the start of the frame; every pointer
    // is taken again (and bounds-checked) after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, overhead as i32 - room as i32) } != 0 {
        return Err(Reason::DropInternal);
    }
    copy_l2_down(ctx, l3, room)?;
    let eth = ptr_at_mut::<EthHdr>(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: ptr_at_mut checked the header lies within the frame. Back to
    // where the frame came from (the client's router), from us.
    #[expect(
        clippy::manual_swap,
        reason = "plain loads and stores; mem::swap may call memcpy, which BPF cannot"
    )]
    unsafe {
        let client = (*eth).src_addr;
        (*eth).src_addr = (*eth).dst_addr;
        (*eth).dst_addr = client;
    }
    // Through the stack: compared as it is, the compiler turns the length
    // into pointer arithmetic on the packet's end, which the verifier refuses.
    let length = ctx.data_end() - ctx.data();
    // SAFETY: a read of a local.
    let length = unsafe { core::ptr::read_volatile(&length) };
    let wanted = l3 + room + quote_len;
    if length < wanted {
        return Err(Reason::DropInternal);
    }
    // SAFETY: as above; the frame only shrinks.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, wanted as i32 - length as i32) } != 0 {
        return Err(Reason::DropInternal);
    }

    let icmp_len = 8 + quote_len;
    let fits = mtu.saturating_sub(overhead as u32);
    let mut sum = 0u32;
    for index in 0..MAX_QUOTE_WORDS {
        if index * 2 >= quote_len {
            break;
        }
        sum += word_at(ctx, l3 + room + index * 2).ok_or(Reason::DropInternal)?;
    }
    let (kind, code, rest) = if v4 {
        let header = OuterV4 {
            tos: 0,
            total_len: (ip_len + icmp_len) as u16,
            frags: 0,
            protocol: PROTO_ICMP,
        };
        // From the VIP (the packet's destination) to the client.
        write_ipv4(ctx, l3, header, destination[0], source[0])?;
        (ICMP_DEST_UNREACHABLE, ICMP_FRAG_NEEDED, fits.min(0xffff))
    } else {
        let ip = ptr_at_mut::<Ipv6Hdr>(ctx, l3).ok_or(Reason::DropInternal)?;
        // SAFETY: ptr_at_mut checked the header lies within the frame.
        unsafe {
            (*ip).vcf = (6u32 << 28).to_be_bytes();
            (*ip).payload_len = (icmp_len as u16).to_be_bytes();
            (*ip).next_hdr = PROTO_ICMPV6;
            (*ip).hop_limit = OUTER_TTL;
            let from = (*ip).src_addr.as_mut_ptr() as *mut u32;
            let to = (*ip).dst_addr.as_mut_ptr() as *mut u32;
            for index in 0..4 {
                core::ptr::write_unaligned(from.add(index), destination[index]);
                core::ptr::write_unaligned(to.add(index), source[index]);
                sum += word_sum(source[index]) + word_sum(destination[index]);
            }
        }
        sum += icmp_len as u32 + u32::from(PROTO_ICMPV6);
        (ICMPV6_PACKET_TOO_BIG, 0, fits)
    };
    sum += u32::from(kind) << 8 | u32::from(code);
    sum += (rest >> 16) + (rest & 0xffff);
    let [c0, c1] = (!fold(sum)).to_be_bytes();
    let [r0, r1, r2, r3] = rest.to_be_bytes();
    let icmp = ptr_at_mut::<[u8; 8]>(ctx, l3 + ip_len).ok_or(Reason::DropInternal)?;
    // SAFETY: ptr_at_mut checked the header lies within the frame.
    unsafe { *icmp = [kind, code, c0, c1, r0, r1, r2, r3] };
    Ok((Reason::AnsweredTooBig, xdp_action::XDP_TX))
}

/// Whether this CPU may send another answer this second (and counts it).
#[inline(always)]
fn within_budget() -> bool {
    let Some(budget) = LB_ICMP_BUDGET.get_ptr_mut(0) else { return false };
    // SAFETY: a per-CPU value, owned by this CPU for the program's run;
    // bpf_ktime_get_ns has no preconditions (a rare path: one call is fine).
    let (budget, second) = unsafe { (&mut *budget, bpf_ktime_get_ns() / 1_000_000_000) };
    if budget.second != second {
        budget.second = second;
        budget.sent = 0;
    }
    if budget.sent >= ICMP_TOO_BIG_PER_SECOND {
        return false;
    }
    budget.sent += 1;
    true
}
