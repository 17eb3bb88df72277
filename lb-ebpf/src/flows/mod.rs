//! Backend choice through two flow tables and the VIP's Maglev table.
//!
//! A new flow takes the Maglev choice and is recorded in LB_NEW_FLOWS (in
//! the bucket its flow hash selects), where it is pinned but unconfirmed. It
//! moves to LB_FLOWS (confirmed) on its handshake's ACK (a flow that began
//! with a SYN) or on a packet `FLOW_CONFIRM_NS` after its first (UDP, TCP
//! picked up mid-stream). A spoofed flood, which never answers a SYN-ACK and
//! sends its tuples in a burst, overwrites LB_NEW_FLOWS only: confirmed
//! flows, idle WebSockets among them, are never evicted to make room for it.
//!
//! A confirmed flow follows its entry after the table changes. FIN and RST
//! mark it closing and never delete it (the balancer cannot check their
//! sequence numbers); a SYN on a closing or idle entry takes the current
//! table. An entry whose backend is down, gone or replaced (another slot
//! generation) is given the Maglev choice, and an idle UDP entry expires.

mod pending;

use lb_common::{
    Backend, FLOW_FLAG_CLOSING, FLOW_FLAG_RESET, FLOW_FLAG_SHED, FLOW_FLAG_SYN, FLOW_REFRESH_NS,
    FlowEntry, FlowEvent, FlowKey, FlowSyncKind, MAGLEV_CHUNK, NO_BACKEND, PROTO_TCP, Reason,
    SHED_TTL_NS, VIP_FLAG_CLIENT_IP_AFFINITY, VipInfo, VipKey,
};

pub use pending::warm_pin;
use pending::{confirm_or_follow, pending, pin};

use crate::maps::{LB_BACKENDS, LB_FLOWS, LB_MAGLEV};
use crate::parse::ip::{Address, key_bytes};
use crate::parse::transport::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use crate::stats::count_flow_event;
use crate::sync;

/// Load-time settings the choice needs.
pub struct Settings {
    pub hash_seed: u32,
    pub table_size: u32,
    /// Slots of LB_NEW_FLOWS, a power of two.
    pub new_flow_slots: u32,
    pub udp_idle_ns: u64,
    pub tcp_idle_ns: u64,
    /// Report confirmed and closed flows for peer balancers.
    pub sync_flows: bool,
}

/// The keys of a flow from `client` to `vip`: its VIP's and its own.
/// Addresses as in `L3`, ports in network byte order.
#[inline(always)]
pub fn keys(
    client: Address,
    client_port: [u8; 2],
    vip: Address,
    vip_port: [u8; 2],
    protocol: u8,
    family: u8,
) -> (VipKey, FlowKey) {
    let vip_key = VipKey { address: key_bytes(vip), port: vip_port, protocol, family };
    let flow = FlowKey {
        client_address: key_bytes(client),
        vip_address: key_bytes(vip),
        client_port,
        vip_port,
        protocol: u32::from(protocol),
    };
    (vip_key, flow)
}

/// What the TCP flags of a packet mean here (all false for UDP).
pub struct Segment {
    is_tcp: bool,
    /// A SYN without ACK: a client opening a connection.
    pub syn: bool,
    rst: bool,
    fin: bool,
}

impl Segment {
    #[inline(always)]
    pub fn of(protocol: u8, tcp_flags: u8) -> Self {
        let is_tcp = protocol == PROTO_TCP;
        Self {
            is_tcp,
            syn: is_tcp && tcp_flags & TCP_SYN != 0 && tcp_flags & TCP_ACK == 0,
            rst: is_tcp && tcp_flags & TCP_RST != 0,
            fin: is_tcp && tcp_flags & TCP_FIN != 0,
        }
    }
}

/// Where a packet of an established flow goes, found without its VIP.
pub struct Hit {
    pub vip_index: u32,
    pub slot: u32,
    pub backend: &'static Backend,
}

/// What the confirmed flow table says of a packet's flow.
pub enum Confirmed {
    /// A usable entry, now followed: the packet goes to its backend.
    Follow(Hit),
    /// An entry that needs the VIP's current table: its backend is no longer
    /// usable, it is idle, or a SYN reopens it after a close.
    Stale(*mut FlowEntry),
    /// A usable entry the rebalancer marked: the packet goes to its backend
    /// as a RST ([`crate::reset`]), and then [`shed`] deletes the entry.
    Shed(Hit),
    Missing,
}

/// The established path, and the only lookup most packets make: the
/// confirmed entry of the flow, followed when usable. A usable entry needs no
/// VIP lookup: its backend slot still holds the same backend (generation) of
/// the same VIP, and a removed VIP's slots are freed, so the entry's VIP is
/// the one the flow's key names.
#[inline(always)]
pub fn confirmed(flow: &FlowKey, segment: &Segment, now: u64, settings: &Settings) -> Confirmed {
    let Some(entry) = LB_FLOWS.get_ptr_mut(flow) else {
        return Confirmed::Missing;
    };
    // SAFETY: the pointer from a map lookup is valid for this run. Another
    // CPU may write the same entry meanwhile; the copy below is checked as a
    // whole (slot, VIP and generation must agree) before it is used.
    let current = unsafe { *entry };
    let idle = is_idle(&current, segment, now, settings);
    let reopened = segment.syn && (current.flags & FLOW_FLAG_CLOSING != 0 || idle);
    let expired = idle && !segment.is_tcp;
    match usable_backend(&current, current.vip_index) {
        Some(backend) if !reopened && !expired => {
            let hit = Hit { vip_index: current.vip_index, slot: current.backend_slot, backend };
            let mut current = current;
            if current.flags & FLOW_FLAG_SHED != 0 && segment.is_tcp && !segment.rst && !segment.syn
            {
                if now.saturating_sub(current.last_seen_ns) <= SHED_TTL_NS {
                    return Confirmed::Shed(hit);
                }
                // A stale mark: the client was silent since; it stays.
                current.flags &= !FLOW_FLAG_SHED;
                // SAFETY: as above.
                unsafe { (*entry).flags = current.flags };
            }
            // SAFETY: as above; the entry's fields are rewritten one by one.
            follow(unsafe { &mut *entry }, &current, segment, now, flow, settings);
            Confirmed::Follow(hit)
        }
        _ => Confirmed::Stale(entry),
    }
}

/// A marked flow whose packet went to its backend as a RST: its entry is
/// deleted (the client's next packet finds no pin, and whichever backend it
/// reaches answers with a RST), and peers hear it was reset.
#[inline(always)]
pub fn shed(flow: &FlowKey, hit: &Hit, settings: &Settings) {
    if LB_FLOWS.remove(flow).is_ok() {
        count_flow_event(FlowEvent::Shed);
        sync::report(settings.sync_flows, flow, hit.vip_index, hit.slot, FlowSyncKind::Reset);
    }
}

/// Whether the entry has seen no packet for its protocol's idle timeout.
#[inline(always)]
fn is_idle(entry: &FlowEntry, segment: &Segment, now: u64, settings: &Settings) -> bool {
    is_idle_since(entry.last_seen_ns, segment, now, settings)
}

/// Whether a flow last seen at `last_seen_ns` is idle now.
#[inline(always)]
pub(super) fn is_idle_since(
    last_seen_ns: u64,
    segment: &Segment,
    now: u64,
    settings: &Settings,
) -> bool {
    let idle_ns = if segment.is_tcp { settings.tcp_idle_ns } else { settings.udp_idle_ns };
    now.saturating_sub(last_seen_ns) > idle_ns
}

/// The backend slot for a packet of `vip` that [`confirmed`] did not
/// forward (its flow's `stale` entry, if any), and the backend itself.
/// `hash` is the flow hash when [`warm_pin`] computed it.
#[inline(always)]
pub fn choose(
    flow: &FlowKey,
    hash: Option<u32>,
    stale: Option<*mut FlowEntry>,
    vip: &VipInfo,
    segment: &Segment,
    now: u64,
    settings: &Settings,
) -> Result<(u32, &'static Backend), Reason> {
    let hash = hash.unwrap_or_else(|| lb_common::flow_hash(flow, settings.hash_seed));
    if let Some(entry) = stale {
        // SAFETY: as in `confirmed`, copied out and checked as a whole.
        let current = unsafe { *entry };
        let event = match usable_backend(&current, vip.vip_index) {
            Some(_) if !segment.is_tcp => FlowEvent::Expired,
            Some(_) => FlowEvent::Renewed,
            None => FlowEvent::Rescued,
        };
        count_flow_event(event);
        // The flow was confirmed once: it stays confirmed, on the current
        // choice. A TCP connection rescued mid-stream is closing: the new
        // backend has no socket for it and resets it (out of our sight), so
        // it must not count as active there.
        let (slot, backend) = maglev_choice(flow, hash, vip, settings)?;
        let rescued_mid_stream = event == FlowEvent::Rescued && segment.is_tcp && !segment.syn;
        let flags = if rescued_mid_stream { FLOW_FLAG_CLOSING } else { closing_flags(segment) };
        let renewed = new_entry(slot, backend, vip, now, flags);
        if LB_FLOWS.insert(flow, renewed, 0).is_ok() {
            let kind = if flags & FLOW_FLAG_CLOSING != 0 {
                FlowSyncKind::Closing
            } else {
                FlowSyncKind::Open
            };
            sync::report(settings.sync_flows, flow, vip.vip_index, slot, kind);
        }
        return Ok((slot, backend));
    }

    // A SYN without a confirmed entry is a new connection: it takes the
    // current table even over an unconfirmed entry of the same tuple.
    let pending = if segment.syn { None } else { pending(flow, hash, settings) };
    if let Some((entry, pending)) = pending {
        let expired = !segment.is_tcp && is_idle_since(pending.created_ns, segment, now, settings);
        match usable_slot(pending.backend_slot, pending.generation, vip.vip_index) {
            Some(backend) if !expired => {
                confirm_or_follow(flow, entry, &pending, segment, now, vip, settings);
                return Ok((pending.backend_slot, backend));
            }
            _ if expired => count_flow_event(FlowEvent::Expired),
            _ => count_flow_event(FlowEvent::Rescued),
        }
    } else if segment.is_tcp && !segment.syn {
        count_flow_event(FlowEvent::MissFallback);
    } else {
        count_flow_event(FlowEvent::Created);
    }

    let (slot, backend) = maglev_choice(flow, hash, vip, settings)?;
    // A reset needs no entry; anything else is pinned from now on.
    if !segment.rst {
        let flags = if segment.syn { FLOW_FLAG_SYN } else { closing_flags(segment) };
        pin(flow, hash, slot, backend, now, flags, settings);
    }
    Ok((slot, backend))
}

/// A packet of a confirmed flow whose entry is usable: closes or reopens
/// it as FIN and RST say, and refreshes it at most once a second.
#[inline(always)]
fn follow(
    entry: &mut FlowEntry,
    current: &FlowEntry,
    segment: &Segment,
    now: u64,
    flow: &FlowKey,
    settings: &Settings,
) {
    let slot = current.backend_slot;
    let flags = current.flags;
    let report = |kind| sync::report(settings.sync_flows, flow, current.vip_index, slot, kind);
    if segment.rst {
        if flags & FLOW_FLAG_CLOSING == 0 {
            entry.flags = flags | FLOW_FLAG_CLOSING | FLOW_FLAG_RESET;
            report(FlowSyncKind::Reset);
        }
    } else if segment.fin {
        if flags & FLOW_FLAG_CLOSING == 0 {
            entry.flags = flags | FLOW_FLAG_CLOSING;
            report(FlowSyncKind::Closing);
        } else if flags & FLOW_FLAG_RESET != 0 {
            // Closing by FIN now: the ACKs of the close must not reopen it.
            entry.flags = flags & !FLOW_FLAG_RESET;
        }
    } else {
        if flags & FLOW_FLAG_RESET != 0 {
            entry.flags = flags & !(FLOW_FLAG_CLOSING | FLOW_FLAG_RESET);
            count_flow_event(FlowEvent::Reopened);
            report(FlowSyncKind::Open);
        }
        if flags & FLOW_FLAG_CLOSING == 0
            && now.saturating_sub(current.last_seen_ns) > FLOW_REFRESH_NS
        {
            entry.last_seen_ns = now;
        }
    }
    count_flow_event(FlowEvent::Hit);
}

#[inline(always)]
pub(super) fn closing_flags(segment: &Segment) -> u32 {
    if segment.fin { FLOW_FLAG_CLOSING } else { 0 }
}

#[inline(always)]
fn new_entry(slot: u32, backend: &Backend, vip: &VipInfo, now: u64, flags: u32) -> FlowEntry {
    FlowEntry {
        backend_slot: slot,
        vip_index: vip.vip_index,
        last_seen_ns: now,
        flags,
        generation: backend.generation,
    }
}

/// The entry's backend when it may still be used: the entry is the VIP
/// `vip_index`'s, and its backend is [`usable_slot`].
#[inline(always)]
fn usable_backend(entry: &FlowEntry, vip_index: u32) -> Option<&'static Backend> {
    if entry.vip_index != vip_index {
        return None;
    }
    usable_slot(entry.backend_slot, entry.generation, vip_index)
}

/// The backend in `slot` when a flow given it at `generation` may still use
/// it: the VIP `vip_index`'s, the same occupant of the slot (a removed
/// backend's slot may have been reused), resolved and up.
#[inline(always)]
fn usable_slot(slot: u32, generation: u32, vip_index: u32) -> Option<&'static Backend> {
    let backend = LB_BACKENDS.get(slot)?;
    let usable = backend.vip_index == vip_index
        && backend.generation == generation
        && backend.has_mac()
        && !backend.is_down();
    if usable { Some(backend) } else { None }
}

/// Where a flow goes without creating or touching an entry: its confirmed
/// entry, else its unconfirmed one, else the Maglev choice. For ICMP errors
/// about the flow, which must reach the backend its packets reach.
#[inline(always)]
pub fn find(
    flow: &FlowKey,
    vip: &VipInfo,
    settings: &Settings,
) -> Result<(u32, &'static Backend), Reason> {
    if let Some(entry) = LB_FLOWS.get_ptr(flow) {
        // SAFETY: a pointer from a map lookup, valid for this run; copied out
        // at once and checked as a whole, as in `confirmed`.
        let entry = unsafe { *entry };
        if let Some(backend) = usable_backend(&entry, vip.vip_index) {
            return Ok((entry.backend_slot, backend));
        }
    }
    let hash = lb_common::flow_hash(flow, settings.hash_seed);
    if let Some((_, pending)) = pending(flow, hash, settings) {
        let slot = pending.backend_slot;
        if let Some(backend) = usable_slot(slot, pending.generation, vip.vip_index) {
            return Ok((slot, backend));
        }
    }
    maglev_choice(flow, hash, vip, settings)
}

/// The backend the VIP's current Maglev table gives this flow, whose
/// [`lb_common::flow_hash`] is `hash`.
#[inline(always)]
fn maglev_choice(
    flow: &FlowKey,
    hash: u32,
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
        hash
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
