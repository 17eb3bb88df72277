//! `lb decap`'s XDP program for backends behind tunnelled VIPs: takes IPIP
//! (IPv4 protocol 4), IP6IP6 (next header 41) and GUE (UDP to the GUE port,
//! the inner IP packet right after the UDP header) packets addressed to
//! this host off their outer headers and passes the inner packet to the
//! kernel, as if it had arrived so. A backend needs no ipip or fou module.
//! Every frame counts one `DecapReason`; what is not a tunnel packet for
//! this host passes untouched.
// Built for the BPF target by lb-userspace's build.rs; on the host (cargo
// build/clippy --workspace) it compiles to an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[path = "../parse/mod.rs"]
#[allow(dead_code)]
mod parse;
#[path = "../runtime.rs"]
mod runtime;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    DECAP_MAX_ADDRESSES, DEFAULT_GUE_PORT, DecapReason, FAMILY_IPV4, PROTO_IPIP, PROTO_IPV6_INSIDE,
    PROTO_UDP, VipAddressKey,
};

use parse::ethernet::{ETH_P_IPV4, ETH_P_IPV6, MAX_L2_WORDS, parse_ethernet};
use parse::ip::{Address, L3, key_bytes, parse_ipv4, parse_ipv6};
use parse::{ptr_at, ptr_at_mut};

/// The host's addresses (lb_common::MAP_DECAP_LOCAL), written by `lb decap`.
#[map]
static LB_DECAP_LOCAL: HashMap<VipAddressKey, u32> =
    HashMap::with_max_entries(DECAP_MAX_ADDRESSES, 0);

/// DecapReason -> frames, per CPU.
#[map]
static LB_DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DecapReason::COUNT, 0);

/// The UDP port of GUE, set at load time.
#[unsafe(no_mangle)]
static LB_DECAP_GUE_PORT: u16 = DEFAULT_GUE_PORT;

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let (reason, action) = match try_decap(&ctx) {
        Ok(()) => (DecapReason::Decapsulated, xdp_action::XDP_PASS),
        Err(reason @ (DecapReason::DropMalformed | DecapReason::DropInnerNotLocal)) => {
            (reason, xdp_action::XDP_DROP)
        }
        Err(reason) => (reason, xdp_action::XDP_PASS),
    };
    if let Some(count) = LB_DECAP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU slot, written by this CPU only.
        unsafe { *count += 1 };
    }
    action
}

#[inline(always)]
fn try_decap(ctx: &XdpContext) -> Result<(), DecapReason> {
    let l2 = parse_ethernet(ctx, 0).map_err(|_| DecapReason::PassNotTunnel)?;
    let outer = if l2.ether_type == ETH_P_IPV4 {
        parse_ipv4(ctx, l2.l3_offset)
    } else {
        parse_ipv6(ctx, l2.l3_offset)
    }
    .map_err(|_| DecapReason::PassNotTunnel)?;
    if outer.unhashable.is_some() {
        // Fragments and unwalkable chains: the kernel's to deal with.
        return Err(DecapReason::PassNotTunnel);
    }
    let (inner_offset, gue) = match outer.protocol {
        PROTO_IPIP | PROTO_IPV6_INSIDE => (outer.l4_offset, false),
        PROTO_UDP => {
            let Some(udp) = ptr_at::<[u8; 8]>(ctx, outer.l4_offset) else {
                return Err(DecapReason::PassNotTunnel);
            };
            // SAFETY: ptr_at checked the header lies within the frame.
            let port = u16::from_be_bytes(unsafe { [(*udp)[2], (*udp)[3]] });
            // SAFETY: read_volatile keeps the load-time global from folding.
            if port != unsafe { core::ptr::read_volatile(&LB_DECAP_GUE_PORT) } {
                return Err(DecapReason::PassNotTunnel);
            }
            (outer.l4_offset + 8, true)
        }
        _ => return Err(DecapReason::PassNotTunnel),
    };
    if !is_local(outer.destination, outer.family) {
        return Err(DecapReason::PassNotForUs);
    }
    // The inner packet: the version its tunnel names (GUE variant 1 names
    // it in its first nibble; GUE variant 0, with its own header, starts
    // with 00 and is refused), whole within the outer packet.
    // Four bytes, though one is read: for a one-byte read the compiler's
    // bounds check takes a form the verifier does not learn a range from.
    let first = ptr_at::<[u8; 4]>(ctx, inner_offset).ok_or(DecapReason::DropMalformed)?;
    // SAFETY: ptr_at checked the bytes lie within the frame.
    let version = unsafe { (*first)[0] } >> 4;
    let expected = match (gue, outer.protocol) {
        (true, _) => version,
        (false, PROTO_IPIP) => 4,
        _ => 6,
    };
    if version != expected || (version != 4 && version != 6) {
        return Err(DecapReason::DropMalformed);
    }
    let inner =
        if version == 4 { parse_ipv4(ctx, inner_offset) } else { parse_ipv6(ctx, inner_offset) }
            .map_err(|_| DecapReason::DropMalformed)?;
    if inner.l3_end > outer.l3_end {
        return Err(DecapReason::DropMalformed);
    }
    if !is_local(inner.destination, inner.family) {
        return Err(DecapReason::DropInnerNotLocal);
    }
    strip(ctx, l2.l3_offset, inner_offset, &inner)
}

/// Moves the L2 header up to the inner packet, names the inner family in
/// its EtherType, and drops everything before it.
#[inline(always)]
fn strip(ctx: &XdpContext, l3: usize, inner_offset: usize, inner: &L3) -> Result<(), DecapReason> {
    let cut = inner_offset - l3;
    // Highest word first: the copy moves up, so no word is read after it
    // was overwritten.
    for reverse in 0..MAX_L2_WORDS {
        let index = MAX_L2_WORDS - 1 - reverse;
        if index * 2 >= l3 {
            continue;
        }
        let from = ptr_at::<[u8; 2]>(ctx, index * 2).ok_or(DecapReason::DropMalformed)?;
        let to = ptr_at_mut::<[u8; 2]>(ctx, cut + index * 2).ok_or(DecapReason::DropMalformed)?;
        // SAFETY: ptr_at checked both words lie within the frame.
        unsafe { *to = *from };
    }
    // SAFETY: the helper only moves the start of the frame; the one pointer
    // used after it is taken (and bounds-checked) again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, cut as i32) } != 0 {
        return Err(DecapReason::DropMalformed);
    }
    let ether_type = if inner.family == FAMILY_IPV4 { ETH_P_IPV4 } else { ETH_P_IPV6 };
    let field = ptr_at_mut::<[u8; 2]>(ctx, l3 - 2).ok_or(DecapReason::DropMalformed)?;
    // SAFETY: ptr_at_mut checked the field lies within the frame.
    unsafe { *field = ether_type.to_be_bytes() };
    Ok(())
}

#[inline(always)]
fn is_local(address: Address, family: u8) -> bool {
    let key = VipAddressKey { address: key_bytes(address), family: u32::from(family) };
    // SAFETY: only the presence of the key is used.
    unsafe { LB_DECAP_LOCAL.get(key) }.is_some()
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
