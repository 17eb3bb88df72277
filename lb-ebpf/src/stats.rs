//! Counter updates: the only place the datapath writes its statistics maps.

use aya_ebpf::{bindings::xdp_action, maps::PerCpuArray};
use lb_common::{FlowEvent, Reason, TrafficCounters};

use crate::maps::{LB_BACKEND_STATS, LB_FLOW_EVENTS, LB_REASONS, LB_VIP_STATS};

/// A program's exit: its one reason counted, and the action: the one
/// chosen for a sent packet, XDP_DROP for a drop reason, else XDP_PASS.
#[inline(always)]
pub fn verdict(result: Result<(Reason, u32), Reason>) -> u32 {
    let (reason, action) = match result {
        Ok(sent) => sent,
        Err(reason) if reason.is_drop() => (reason, xdp_action::XDP_DROP),
        Err(reason) => (reason, xdp_action::XDP_PASS),
    };
    count_reason(reason);
    action
}

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(counter) = LB_REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from a per-CPU map lookup, so it is valid
        // for this program run and no other CPU writes this copy.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count_flow_event(event: FlowEvent) {
    if let Some(counter) = LB_FLOW_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: as in count_reason, a per-CPU value owned by this CPU.
        unsafe { *counter += 1 };
    }
}

/// One packet of `bytes` forwarded for the VIP `vip_index` to the backend in
/// `slot`: a packet of a flow, or an ICMP error about one (`icmp_error`).
#[inline(always)]
pub fn count_forwarded(vip_index: u32, slot: u32, bytes: u64, icmp_error: bool) {
    let icmp_errors = u64::from(icmp_error);
    count_traffic(&LB_VIP_STATS, vip_index, bytes, icmp_errors);
    count_traffic(&LB_BACKEND_STATS, slot, bytes, icmp_errors);
}

/// A packet of the VIP `vip_index` dropped after its lookup.
#[inline(always)]
pub fn count_vip_drop(vip_index: u32) {
    if let Some(counters) = LB_VIP_STATS.get_ptr_mut(vip_index) {
        // SAFETY: as in count_reason, a per-CPU value owned by this CPU.
        unsafe { (*counters).dropped += 1 };
    }
}

#[inline(always)]
fn count_traffic(map: &PerCpuArray<TrafficCounters>, index: u32, bytes: u64, icmp_errors: u64) {
    if let Some(counters) = map.get_ptr_mut(index) {
        // SAFETY: as in count_reason, a per-CPU value owned by this CPU.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes;
            (*counters).icmp_errors += icmp_errors;
        }
    }
}
