//! Backend choice: the flow table first, the VIP's Maglev table for new
//! flows. A TCP SYN always takes the Maglev choice (a new connection follows
//! the current table) and is recorded; later packets follow their entry even
//! after the table changes. An entry whose backend is down is replaced by the
//! Maglev choice, and an idle UDP entry expires.

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use lb_common::{
    Backend, FLOW_FLAG_CLOSING, FLOW_REFRESH_NS, FlowEntry, FlowEvent, FlowKey, FlowSyncKind,
    MAGLEV_CHUNK, NO_BACKEND, PROTO_TCP, Reason, VIP_FLAG_CLIENT_IP_AFFINITY, VipInfo,
};

use crate::maps::{LB_BACKENDS, LB_FLOWS, LB_MAGLEV};
use crate::parse::transport::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::stats::count_flow_event;
use crate::sync;

/// Load-time settings the choice needs.
pub struct Settings {
    pub hash_seed: u32,
    pub table_size: u32,
    pub udp_idle_ns: u64,
    /// Report created and closed flows for peer balancers.
    pub sync_flows: bool,
}

/// The backend slot for this packet's flow, and the backend itself.
#[inline(always)]
pub fn choose(
    flow: &FlowKey,
    vip: &VipInfo,
    tcp_flags: u8,
    settings: &Settings,
) -> Result<(u32, &'static Backend), Reason> {
    // The coarse clock (a jiffy's resolution) is plenty for idle timeouts and
    // costs a fraction of bpf_ktime_get_ns on every packet.
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let is_tcp = flow.protocol == u32::from(PROTO_TCP);
    let is_syn = is_tcp && tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0;

    if !is_syn {
        if let Some(entry) = LB_FLOWS.get_ptr_mut(flow) {
            // SAFETY: the pointer from a map lookup is valid for this run; a
            // concurrent writer can only make fields stale, never invalid.
            let entry = unsafe { &mut *entry };
            let expired = !is_tcp && now.saturating_sub(entry.last_seen_ns) > settings.udp_idle_ns;
            let backend = LB_BACKENDS.get(entry.backend_slot);
            // The entry's backend must still be this VIP's, resolved and up: a
            // removed backend's slot is cleared (and may be reused later).
            match backend {
                Some(backend)
                    if !expired
                        && entry.vip_index == vip.vip_index
                        && backend.vip_index == vip.vip_index
                        && backend.has_mac()
                        && !backend.is_down() =>
                {
                    let slot = entry.backend_slot;
                    if tcp_flags & TCP_RST != 0 {
                        // The entry is not touched after its removal.
                        let _ = LB_FLOWS.remove(flow);
                        let sync_kind = FlowSyncKind::Reset;
                        sync::report(settings.sync_flows, flow, vip.vip_index, slot, sync_kind);
                        count_flow_event(FlowEvent::Hit);
                        return Ok((slot, backend));
                    }
                    if tcp_flags & TCP_FIN != 0 && entry.flags & FLOW_FLAG_CLOSING == 0 {
                        entry.flags |= FLOW_FLAG_CLOSING;
                        let sync_kind = FlowSyncKind::Closing;
                        sync::report(settings.sync_flows, flow, vip.vip_index, slot, sync_kind);
                    }
                    if now.saturating_sub(entry.last_seen_ns) > FLOW_REFRESH_NS {
                        entry.last_seen_ns = now;
                    }
                    count_flow_event(FlowEvent::Hit);
                    return Ok((slot, backend));
                }
                _ if expired => count_flow_event(FlowEvent::Expired),
                _ => count_flow_event(FlowEvent::Rescued),
            }
        } else if is_tcp {
            count_flow_event(FlowEvent::MissFallback);
        } else {
            count_flow_event(FlowEvent::Created);
        }
    } else {
        count_flow_event(FlowEvent::Created);
    }

    let (slot, backend) = maglev_choice(flow, vip, settings)?;
    // A reset needs no entry; anything else is recorded so the flow keeps
    // this backend from now on.
    if tcp_flags & TCP_RST == 0 {
        let entry = FlowEntry {
            backend_slot: slot,
            vip_index: vip.vip_index,
            last_seen_ns: now,
            flags: if tcp_flags & TCP_FIN != 0 { FLOW_FLAG_CLOSING } else { 0 },
            _pad: 0,
        };
        if LB_FLOWS.insert(flow, entry, 0).is_ok() {
            sync::report(settings.sync_flows, flow, vip.vip_index, slot, FlowSyncKind::Open);
        }
    }
    Ok((slot, backend))
}

/// The backend the VIP's current Maglev table gives this flow.
#[inline(always)]
fn maglev_choice(
    flow: &FlowKey,
    vip: &VipInfo,
    settings: &Settings,
) -> Result<(u32, &'static Backend), Reason> {
    if vip.backend_count == 0 {
        return Err(Reason::DropNoBackend);
    }
    if settings.table_size == 0 {
        return Err(Reason::DropInternal);
    }
    let hash = if vip.flags & VIP_FLAG_CLIENT_IP_AFFINITY != 0 {
        lb_common::client_hash(flow, settings.hash_seed)
    } else {
        lb_common::flow_hash(flow, settings.hash_seed)
    };
    let index = lb_common::table_index(vip.vip_index, vip.active_slot, settings.table_size, hash);
    let chunk = LB_MAGLEV.get(index / MAGLEV_CHUNK).ok_or(Reason::DropInternal)?;
    let slot = chunk[(index % MAGLEV_CHUNK) as usize];
    if slot == NO_BACKEND {
        return Err(Reason::DropNoBackend);
    }
    let backend = LB_BACKENDS.get(slot).ok_or(Reason::DropInternal)?;
    if !backend.has_mac() {
        return Err(Reason::DropBackendUnresolved);
    }
    Ok((slot, backend))
}
