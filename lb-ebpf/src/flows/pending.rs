//! The unconfirmed table, LB_NEW_FLOWS: a new flow's pin in a slot of the
//! bucket its flow hash selects, until its handshake's ACK (or a packet a
//! second later) confirms it into LB_FLOWS.

use lb_common::{
    Backend, FLOW_CONFIRM_NS, FLOW_FLAG_SYN, FlowEntry, FlowEvent, FlowKey, FlowSyncKind,
    PENDING_WAYS, PendingFlow, VipInfo,
};

use super::{Segment, Settings, closing_flags};
use crate::maps::{LB_FLOWS, LB_NEW_FLOWS};
use crate::stats::count_flow_event;
use crate::sync;

/// The flow hash, after starting to load the LB_NEW_FLOWS bucket that pins
/// (or will pin) the flow, so that the bucket's cache and TLB misses overlap
/// the lookup that follows instead of coming after it. For a SYN, most
/// likely a new flow, before the flow-table lookup; for any other packet
/// only once that lookup missed, before the VIP lookup: most packets hit
/// the flow table and never pay for it.
#[inline(always)]
pub fn warm_pin(flow: &FlowKey, settings: &Settings) -> u32 {
    let hash = lb_common::flow_hash(flow, settings.hash_seed);
    let bucket = lb_common::pending_bucket(hash, settings.new_flow_slots);
    for way in 0..PENDING_WAYS {
        if let Some(entry) = LB_NEW_FLOWS.get_ptr(bucket + way) {
            // SAFETY: the pointer from a map lookup is valid for this run;
            // the value is discarded, the load is what counts.
            unsafe { core::ptr::read_volatile(&raw const (*entry).created_ns) };
        }
    }
    hash
}

/// The flow's unconfirmed pin (its LB_NEW_FLOWS slot, and a copy of it),
/// when a slot of its bucket holds it whole: a newer flow may have taken its
/// slot, or be writing it on another CPU.
#[inline(always)]
pub(super) fn pending(
    flow: &FlowKey,
    hash: u32,
    settings: &Settings,
) -> Option<(*mut PendingFlow, PendingFlow)> {
    let bucket = lb_common::pending_bucket(hash, settings.new_flow_slots);
    for way in 0..PENDING_WAYS {
        let Some(entry) = LB_NEW_FLOWS.get_ptr_mut(bucket + way) else { continue };
        // SAFETY: the pointer from a map lookup is valid for this run. The
        // copy may mix two writers' fields; `check` tells.
        let pending = unsafe { *entry };
        if pending.key != *flow {
            continue;
        }
        let check = PendingFlow::check_of(
            hash,
            pending.backend_slot,
            pending.generation,
            pending.created_ns,
            pending.flags,
        );
        if pending.check == check {
            return Some((entry, pending));
        }
    }
    None
}

/// Pins a new flow to `slot` in its LB_NEW_FLOWS bucket: in the slot that
/// holds this flow already (a repeated SYN takes the current choice), else
/// in the oldest or free one. `created_ns` stays its first packet's time
/// until it is confirmed.
#[inline(always)]
pub(super) fn pin(
    flow: &FlowKey,
    hash: u32,
    slot: u32,
    backend: &Backend,
    now: u64,
    flags: u32,
    settings: &Settings,
) {
    let bucket = lb_common::pending_bucket(hash, settings.new_flow_slots);
    let mut victim: Option<*mut PendingFlow> = None;
    let mut oldest = u64::MAX;
    for way in 0..PENDING_WAYS {
        let Some(entry) = LB_NEW_FLOWS.get_ptr_mut(bucket + way) else { continue };
        // SAFETY: the pointer from a map lookup is valid for this run; only
        // read to choose the slot.
        let (key, created_ns) = unsafe { ((*entry).key, (*entry).created_ns) };
        if key == *flow {
            victim = Some(entry);
            break;
        }
        if created_ns < oldest {
            oldest = created_ns;
            victim = Some(entry);
        }
    }
    let Some(entry) = victim else { return };
    let generation = backend.generation;
    let check = PendingFlow::check_of(hash, slot, generation, now, flags);
    let pending =
        PendingFlow { key: *flow, backend_slot: slot, generation, created_ns: now, flags, check };
    // SAFETY: the pointer from a map lookup is valid for this run; a reader
    // of a half-written slot rejects it by its check.
    unsafe { *entry = pending };
}

/// A packet other than a SYN of an unconfirmed flow whose entry is usable:
/// the handshake's ACK, or any packet but a RST a second after the first,
/// confirms it.
#[inline(always)]
pub(super) fn confirm_or_follow(
    flow: &FlowKey,
    entry: *mut PendingFlow,
    pending: &PendingFlow,
    segment: &Segment,
    now: u64,
    vip: &VipInfo,
    settings: &Settings,
) {
    let handshake_done = pending.flags & FLOW_FLAG_SYN != 0;
    let seen_again = now.saturating_sub(pending.created_ns) >= FLOW_CONFIRM_NS;
    if segment.rst || !(handshake_done || seen_again) {
        count_flow_event(FlowEvent::NewHit);
        return;
    }
    let confirmed = FlowEntry {
        backend_slot: pending.backend_slot,
        vip_index: vip.vip_index,
        last_seen_ns: now,
        flags: closing_flags(segment),
        generation: pending.generation,
    };
    if LB_FLOWS.insert(flow, confirmed, 0).is_ok() {
        // Unpinned, and the slot free for the next new flow of the bucket:
        // the flow follows its confirmed entry from now on. Were the slot
        // rewritten meanwhile, that flow is unpinned instead (its check no
        // longer matches), and its next packet takes the Maglev choice.
        // SAFETY: the pointer from a map lookup is valid for this run.
        unsafe { (*entry).created_ns = 0 };
        let slot = pending.backend_slot;
        sync::report(settings.sync_flows, flow, vip.vip_index, slot, FlowSyncKind::Open);
    }
    count_flow_event(FlowEvent::Confirmed);
}
