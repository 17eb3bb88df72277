//! The balancer's XDP program. The pipeline, in order: parse, the port
//! prefilter (the host's traffic leaves here), the confirmed flow table (an
//! established packet leaves here, after one hash lookup), VIP lookup,
//! backend choice through the VIP's Maglev table, rewrite, transmit. Every
//! exit counts exactly one `Reason`.
// Built for the BPF target by lb-userspace's build.rs; on the host (cargo
// build/clippy --workspace) it compiles to an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

mod checksum;
mod clock;
mod dsr;
mod encap;
mod flows;
mod icmp;
mod maps;
mod parse;
mod reset;
mod runtime;
mod stats;
mod sync;

use aya_ebpf::{macros::xdp, programs::XdpContext};
use lb_common::{
    FAMILY_IPV6, FORWARDING_DSR, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Reason,
    VipAddressKey,
};

use flows::{Confirmed, Hit, Segment};
use maps::{LB_VIP_ADDRESSES, LB_VIP_PORTS, LB_VIPS};
use parse::{
    ethernet::{ETH_P_IPV4, parse_ethernet},
    ip::{L3, key_bytes, parse_ipv4, parse_ipv6},
    transport::parse_ports,
};

/// Flow-hash seed, set by the control plane at load time.
#[unsafe(no_mangle)]
static LB_HASH_SEED: u32 = 0;

/// Entries per Maglev table, set by the control plane at load time.
#[unsafe(no_mangle)]
static LB_TABLE_SIZE: u32 = lb_common::DEFAULT_TABLE_SIZE;

/// Slots of LB_NEW_FLOWS (a power of two), set by the control plane at load
/// time to match the map's size.
#[unsafe(no_mangle)]
static LB_NEW_FLOW_SLOTS: u32 = lb_common::new_flow_table_size(lb_common::DEFAULT_FLOW_TABLE_SIZE);

/// Idle time after which a UDP flow is forgotten, set at load time.
#[unsafe(no_mangle)]
static LB_UDP_IDLE_NS: u64 = lb_common::DEFAULT_UDP_IDLE_NS;

/// Idle time after which a SYN on a TCP flow's entry takes the current
/// table, set at load time.
#[unsafe(no_mangle)]
static LB_TCP_IDLE_NS: u64 = lb_common::DEFAULT_TCP_IDLE_NS;

/// This interface's MAC (lb_common::mac_word), set at load time; 0: any.
#[unsafe(no_mangle)]
static LB_OWN_MAC: u64 = 0;

/// 1 when flow changes are reported for peer balancers, set at load time.
#[unsafe(no_mangle)]
static LB_SYNC_FLOWS: u32 = 0;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    stats::verdict(try_lb_xdp(&ctx))
}

/// The reason and action of a forwarded packet, or why it was not forwarded.
#[inline(always)]
fn try_lb_xdp(ctx: &XdpContext) -> Result<(Reason, u32), Reason> {
    // SAFETY: read_volatile keeps the compiler from folding the load-time
    // global to its compile-time default.
    let l2 = parse_ethernet(ctx, unsafe { core::ptr::read_volatile(&LB_OWN_MAC) })?;
    let l3 = if l2.ether_type == ETH_P_IPV4 {
        parse_ipv4(ctx, l2.l3_offset)?
    } else {
        parse_ipv6(ctx, l2.l3_offset)?
    };
    if let Some(reason) = l3.unhashable {
        return Err(refuse_if_ours(&l3, reason));
    }
    // SAFETY: read_volatile keeps the compiler from folding the load-time
    // globals to their compile-time defaults.
    let settings = unsafe {
        flows::Settings {
            hash_seed: core::ptr::read_volatile(&LB_HASH_SEED),
            table_size: core::ptr::read_volatile(&LB_TABLE_SIZE),
            new_flow_slots: core::ptr::read_volatile(&LB_NEW_FLOW_SLOTS),
            udp_idle_ns: core::ptr::read_volatile(&LB_UDP_IDLE_NS),
            tcp_idle_ns: core::ptr::read_volatile(&LB_TCP_IDLE_NS),
            sync_flows: core::ptr::read_volatile(&LB_SYNC_FLOWS) != 0,
        }
    };
    let ipv6 = l3.family == FAMILY_IPV6;
    if l3.protocol == if ipv6 { PROTO_ICMPV6 } else { PROTO_ICMP } {
        if !is_vip_address(&l3) {
            return Err(Reason::PassNotVip);
        }
        let action = icmp::forward_error(ctx, &l3, l2.l3_offset, ipv6, &settings)?;
        return Ok((Reason::ForwardedIcmp, action));
    }
    if l3.protocol != PROTO_TCP && l3.protocol != PROTO_UDP {
        return Err(Reason::PassNotVip);
    }
    let Some(ports) = parse_ports(ctx, l3.l4_offset, l3.l3_end, l3.protocol) else {
        return Err(refuse_if_ours(&l3, Reason::DropMalformedL4));
    };

    if !is_vip_port(l3.protocol, ports.destination) {
        return Err(Reason::PassNotVip);
    }

    let (vip_key, flow) = flows::keys(
        l3.source,
        ports.source,
        l3.destination,
        ports.destination,
        l3.protocol,
        l3.family,
    );
    let segment = Segment::of(l3.protocol, ports.tcp_flags);
    let now = clock::now();
    let packet = Packet {
        family: l3.family,
        l3_offset: l2.l3_offset,
        l4_offset: l3.l4_offset,
        protocol: l3.protocol,
    };
    let hash = segment.syn.then(|| flows::warm_pin(&flow, &settings));
    let (stale, hash) = match flows::confirmed(&flow, &segment, now, &settings) {
        Confirmed::Follow(hit) => return forward(ctx, hit, packet, &flow),
        Confirmed::Shed(hit) => {
            let tcp = reset::TcpPacket {
                family: l3.family,
                l3_offset: l2.l3_offset,
                l4_offset: l3.l4_offset,
                l3_end: l3.l3_end,
            };
            return shed(ctx, tcp, packet, &flow, hit, &settings);
        }
        Confirmed::Stale(entry) => (Some(entry), hash),
        Confirmed::Missing => {
            (None, Some(hash.unwrap_or_else(|| flows::warm_pin(&flow, &settings))))
        }
    };
    // SAFETY: the value is copied out at once; the daemon replaces entries
    // whole, so the copy is one consistent version.
    let vip = *unsafe { LB_VIPS.get(vip_key) }.ok_or(Reason::PassNotVip)?;
    let chosen = flows::choose(&flow, hash, stale, &vip, &segment, now, &settings);
    let (slot, backend) = chosen.inspect_err(|reason| {
        if reason.is_drop() {
            stats::count_vip_drop(vip.vip_index);
        }
    })?;
    forward(ctx, Hit { vip_index: vip.vip_index, slot, backend }, packet, &flow)
}

/// Where a VIP packet's headers lie, for the forwarding modes that put
/// headers in front of it. Plain offsets, passed by value (as reset::TcpPacket).
#[derive(Clone, Copy)]
pub struct Packet {
    pub family: u8,
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub protocol: u8,
}

/// A packet of a flow, sent to its backend and counted.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    hit: Hit,
    packet: Packet,
    flow: &FlowKey,
) -> Result<(Reason, u32), Reason> {
    Ok((Reason::Forwarded, send(ctx, hit, packet, flow, false)?))
}

/// A packet of a flow the rebalancer closes: sent to its backend as a RST,
/// after which the flow has no entry.
#[inline(always)]
fn shed(
    ctx: &XdpContext,
    tcp: reset::TcpPacket,
    packet: Packet,
    flow: &FlowKey,
    hit: Hit,
    settings: &flows::Settings,
) -> Result<(Reason, u32), Reason> {
    if reset::into_reset(ctx, tcp)? {
        flows::shed(flow, &hit, settings);
    }
    forward(ctx, hit, packet, flow)
}

/// Sends the frame to `hit`'s backend, in its VIP's forwarding mode, and
/// counts it for the VIP and the backend: a packet of `flow`, or an ICMP
/// error about it (`icmp_error`). Bytes are counted as the client sent them.
#[inline(always)]
fn send(
    ctx: &XdpContext,
    hit: Hit,
    packet: Packet,
    flow: &FlowKey,
    icmp_error: bool,
) -> Result<u32, Reason> {
    if hit.backend.forwarding != FORWARDING_DSR {
        let entropy = lb_common::tunnel_entropy(flow);
        return Err(encap::hand_off(ctx, &hit, packet, entropy, icmp_error));
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let action = dsr::forward(ctx, hit.backend)?;
    stats::count_forwarded(hit.vip_index, hit.slot, bytes, icmp_error);
    Ok(action)
}

/// Whether some VIP listens on this protocol and destination port (network
/// byte order): the prefilter that lets the host's traffic skip every hash
/// lookup.
#[inline(always)]
fn is_vip_port(protocol: u8, port: [u8; 2]) -> bool {
    let Some((word, bit)) = lb_common::vip_port_bit(protocol, u16::from_be_bytes(port)) else {
        return false;
    };
    LB_VIP_PORTS.get(word).is_some_and(|listening| listening & bit != 0)
}

/// A packet that cannot be hashed is dropped when it is addressed to one of
/// our VIP addresses (it must not reach a wrong backend) and passed otherwise
/// (it is the host's traffic).
#[inline(always)]
fn refuse_if_ours(l3: &L3, reason: Reason) -> Reason {
    if is_vip_address(l3) { reason } else { Reason::PassNotVip }
}

/// Whether the packet is addressed to one of our VIP addresses (any port).
#[inline(always)]
fn is_vip_address(l3: &L3) -> bool {
    let key = VipAddressKey { address: key_bytes(l3.destination), family: u32::from(l3.family) };
    // SAFETY: only the presence of the key is used.
    unsafe { LB_VIP_ADDRESSES.get(key) }.is_some()
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
