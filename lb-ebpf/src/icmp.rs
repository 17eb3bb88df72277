//! ICMP errors about VIP flows. With direct server return a backend's
//! replies leave from the VIP, so a router on the way to the client sends
//! "fragmentation needed" or "packet too big" to the VIP, which routes here.
//! The error goes to the backend whose reply it quotes, found as a packet of
//! that flow would find it (its flow entries, else the Maglev choice), so
//! that backend's TCP learns the path MTU instead of stalling.

use aya_ebpf::programs::XdpContext;
use lb_common::Reason;

use crate::flows::{self, Hit, Settings};
use crate::maps::LB_VIPS;
use crate::parse::{icmp::parse_icmp_error, ip::L3};

/// Forwards an ICMP error addressed to a VIP address (the caller checked
/// that) to its flow's backend: `Ok(XDP_TX)`, or the reason it was not.
#[inline(always)]
pub fn forward_error(
    ctx: &XdpContext,
    l3: &L3,
    l3_offset: usize,
    ipv6: bool,
    settings: &Settings,
) -> Result<u32, Reason> {
    let quoted = parse_icmp_error(ctx, l3, ipv6)?;
    // The quoted packet left from the VIP the error is sent back to.
    if quoted.source != l3.destination {
        return Err(Reason::DropIcmpUnmatched);
    }
    // The quote is the reply, so its destination is the flow's client.
    let (vip_key, flow) = flows::keys(
        quoted.destination,
        quoted.destination_port,
        quoted.source,
        quoted.source_port,
        quoted.protocol,
        l3.family,
    );
    // SAFETY: copied out at once, as in the main path.
    let vip = *unsafe { LB_VIPS.get(vip_key) }.ok_or(Reason::DropIcmpUnmatched)?;
    let (slot, backend) = flows::find(&flow, &vip, settings).map_err(|reason| match reason {
        Reason::DropInternal => Reason::DropInternal,
        _ => Reason::DropIcmpUnmatched,
    })?;
    // Encapsulated (if the VIP's mode does) as the ICMP packet it is, with
    // the quoted flow's entropy, so it takes that flow's path and queue.
    let packet = crate::Packet {
        family: l3.family,
        l3_offset,
        l4_offset: l3.l4_offset,
        protocol: l3.protocol,
    };
    crate::send(ctx, Hit { vip_index: vip.vip_index, slot, backend }, packet, &flow, true)
}
