//! Forwarding modes `ipip` and `gue`, in two programs. The balancer's
//! program makes room in front of the frame for the outer headers, writes
//! an [`EncapRequest`] into it and tail-calls `lb_encap` (entry
//! [`TAIL_CALL_ENCAP`] of [`LB_PROGRAMS`]), which writes the headers (see
//! [`headers`]), sends the frame and counts it. Apart, the kernel's
//! verifier walks the encapsulation once; inlined, it walked it again for
//! every path to a backend, and flow sync took that past its limit.

mod headers;
mod too_big;

pub use too_big::IcmpBudget;

use aya_ebpf::{helpers::bpf_xdp_adjust_head, macros::xdp, programs::XdpContext};
use lb_common::{
    ENCAP_GUE, ENCAP_ICMP_ERROR, ENCAP_IPV6, ENCAP_TAGS_SHIFT, EncapRequest, FAMILY_IPV4,
    FAMILY_IPV6, FORWARDING_GUE, FORWARDING_IPIP, Reason, TAIL_CALL_ENCAP, encap_overhead,
};
use network_types::{eth::EthHdr, vlan::VlanHdr};

use crate::flows::Hit;
use crate::maps::{LB_BACKENDS, LB_PROGRAMS};
use crate::parse::{ptr_at, ptr_at_mut};
use crate::{Packet, dsr, stats};

/// Hands a packet of a tunnelled VIP to `lb_encap`. Returns only if it
/// could not: the reason to drop the packet.
#[inline(always)]
pub fn hand_off(ctx: &XdpContext, hit: &Hit, packet: Packet, entropy: u32, icmp: bool) -> Reason {
    let forwarding = hit.backend.forwarding;
    let overhead = encap_overhead(forwarding, packet.family);
    let tags = (packet.l3_offset - EthHdr::LEN) / VlanHdr::LEN;
    if overhead == 0 || tags > 2 || packet.l4_offset > usize::from(u16::MAX) {
        return Reason::DropInternal;
    }
    let mut flags = (tags as u8) << ENCAP_TAGS_SHIFT;
    if packet.family == FAMILY_IPV6 {
        flags |= ENCAP_IPV6;
    }
    if icmp {
        flags |= ENCAP_ICMP_ERROR;
    }
    if forwarding == FORWARDING_GUE {
        flags |= ENCAP_GUE;
    }
    // SAFETY: the helper only moves the start of the frame; every pointer
    // is taken again (and bounds-checked) after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        return Reason::DropInternal;
    }
    let Some(request) = ptr_at_mut::<EncapRequest>(ctx, 0) else {
        return Reason::DropInternal;
    };
    // SAFETY: ptr_at_mut checked the request lies within the frame. Field
    // by field: a 16-byte copy would be a memcpy call, which BPF cannot make.
    unsafe {
        (*request).slot = hit.slot;
        (*request).vip_index = hit.vip_index;
        (*request).entropy = entropy;
        (*request).l4_offset = packet.l4_offset as u16;
        (*request).protocol = packet.protocol;
        (*request).flags = flags;
        // Returns only when the entry is empty (no encapsulating program
        // loaded) or the kernel's tail-call limit was reached.
        LB_PROGRAMS.tail_call(ctx, TAIL_CALL_ENCAP);
    }
    Reason::DropInternal
}

/// The encapsulating program: only ever entered by tail call from the
/// balancer's program, with an [`EncapRequest`] in front of the frame.
/// Counts the packet's one `Reason`, as the balancer's program would have.
#[xdp]
pub fn lb_encap(ctx: XdpContext) -> u32 {
    stats::verdict(try_encap(&ctx))
}

#[inline(always)]
fn try_encap(ctx: &XdpContext) -> Result<(Reason, u32), Reason> {
    let request = ptr_at::<EncapRequest>(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: ptr_at checked the request lies within the frame; read
    // field by field, as it was written.
    let (slot, vip_index, entropy, l4_offset, protocol, flags) = unsafe {
        (
            (*request).slot,
            (*request).vip_index,
            (*request).entropy,
            (*request).l4_offset,
            (*request).protocol,
            (*request).flags,
        )
    };
    let family = if flags & ENCAP_IPV6 != 0 { FAMILY_IPV6 } else { FAMILY_IPV4 };
    let gue = flags & ENCAP_GUE != 0;
    let overhead =
        encap_overhead(if gue { FORWARDING_GUE } else { FORWARDING_IPIP }, family) as usize;
    let tags = usize::from(flags >> ENCAP_TAGS_SHIFT & 3);
    if tags > 2 {
        return Err(Reason::DropInternal);
    }
    let backend = LB_BACKENDS.get(slot).ok_or(Reason::DropInternal)?;
    let bytes = (ctx.data_end() - ctx.data()).saturating_sub(overhead) as u64;
    let inner = headers::Inner {
        family,
        l3_offset: EthHdr::LEN + tags * VlanHdr::LEN,
        l4_offset: usize::from(l4_offset),
        protocol,
        entropy,
    };
    let egress = dsr::egress_of(backend)?;
    let tunnel = headers::Tunnel::of(egress);
    match headers::encapsulate(ctx, backend, &tunnel, inner, gue, overhead) {
        Err(Reason::DropTooBig) => return too_big::answer(ctx, inner, overhead, tunnel.mtu),
        result => result?,
    }
    let action = dsr::forward_via(ctx, backend, egress)?;
    let icmp = flags & ENCAP_ICMP_ERROR != 0;
    stats::count_forwarded(vip_index, slot, bytes, icmp);
    Ok((if icmp { Reason::ForwardedIcmp } else { Reason::Forwarded }, action))
}
