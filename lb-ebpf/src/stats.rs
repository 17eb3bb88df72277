//! Counter updates: the only place the datapath writes its statistics maps.

use aya_ebpf::maps::PerCpuArray;
use lb_common::{FlowEvent, Reason, TrafficCounters};

use crate::maps::{LB_FLOW_EVENTS, LB_REASONS};

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

/// One forwarded packet of `bytes`; `icmp_errors` is 1 for an ICMP error
/// about a flow, 0 otherwise.
#[inline(always)]
pub fn count_traffic(map: &PerCpuArray<TrafficCounters>, index: u32, bytes: u64, icmp_errors: u64) {
    if let Some(counters) = map.get_ptr_mut(index) {
        // SAFETY: as in count_reason, a per-CPU value owned by this CPU.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes;
            (*counters).icmp_errors += icmp_errors;
        }
    }
}
