//! Reporting flow-table changes for sync with peer balancers: one ring
//! buffer record per created or closed entry, never one per packet, so the
//! established path pays nothing.

use lb_common::{FlowEvent, FlowKey, FlowSyncEvent, FlowSyncKind};

use crate::maps::LB_FLOW_SYNC;
use crate::stats::count_flow_event;

/// `BPF_RB_NO_WAKEUP`: the daemon polls the ring on a timer, so waking it on
/// every record would only cost the datapath an interrupt.
const NO_WAKEUP: u64 = 1;

#[inline(always)]
pub fn report(
    enabled: bool,
    flow: &FlowKey,
    vip_index: u32,
    backend_slot: u32,
    kind: FlowSyncKind,
) {
    if !enabled {
        return;
    }
    let event = FlowSyncEvent { flow: *flow, vip_index, backend_slot, kind: kind as u32, _pad: 0 };
    if LB_FLOW_SYNC.output::<FlowSyncEvent>(&event, NO_WAKEUP).is_err() {
        count_flow_event(FlowEvent::SyncLost);
    }
}
