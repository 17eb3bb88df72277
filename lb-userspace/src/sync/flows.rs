//! Translating flows between this balancer's maps and the sync protocol,
//! and writing peers' flows into the flow table. VIP indexes and backend
//! slots are local to one balancer, so records name addresses; a record
//! whose VIP or backend is not configured here is refused, so a peer can
//! never send a flow to a backend this balancer would not use for that VIP.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use aya::maps::MapData;
use lb_common::{
    FLOW_FLAG_CLOSING, FLOW_FLAG_RESET, FlowEntry, FlowKey, FlowSyncEvent, FlowSyncKind,
};

use super::wire::{FlowRecord, FlowState};
use crate::datapath::monotonic_ns;
use crate::model::address_from_bytes;

/// The flow table, opened a second time for the sync task.
pub type FlowTable = aya::maps::HashMap<MapData, FlowKey, FlowEntry>;

/// Which VIP index and backend slots stand for which addresses, as the
/// reconcile step last installed them. Published by the daemon after every
/// change; the sync task only reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Directory {
    by_index: HashMap<u32, DirectoryVip>,
    by_vip: HashMap<(SocketAddr, u8), u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct DirectoryVip {
    vip: SocketAddr,
    protocol: u8,
    /// Backend address -> (slot, slot generation), for every backend
    /// configured for the VIP.
    slots: HashMap<IpAddr, (u32, u32)>,
}

impl Directory {
    /// Adds a VIP with its backends' slots: (address, slot, generation).
    pub fn insert(
        &mut self,
        vip: SocketAddr,
        protocol: u8,
        vip_index: u32,
        slots: impl IntoIterator<Item = (IpAddr, u32, u32)>,
    ) {
        let slots = slots
            .into_iter()
            .map(|(address, slot, generation)| (address, (slot, generation)))
            .collect();
        self.by_index.insert(vip_index, DirectoryVip { vip, protocol, slots });
        self.by_vip.insert((vip, protocol), vip_index);
    }

    /// The VIP, and the address and generation of the backend in `slot`.
    fn backend_of(&self, vip_index: u32, slot: u32) -> Option<(&DirectoryVip, IpAddr, u32)> {
        let vip = self.by_index.get(&vip_index)?;
        let (address, (_, generation)) = vip.slots.iter().find(|(_, (s, _))| *s == slot)?;
        Some((vip, *address, *generation))
    }
}

/// A datapath event as a record for peers; None when its VIP or backend is
/// gone already (removed between the event and now).
pub fn record_of(directory: &Directory, event: &FlowSyncEvent) -> Option<FlowRecord> {
    let state = match FlowSyncKind::from_u32(event.kind)? {
        FlowSyncKind::Open => FlowState::Open,
        FlowSyncKind::Closing => FlowState::Closing,
        FlowSyncKind::Reset => FlowState::Reset,
    };
    record(directory, &event.flow, event.vip_index, event.backend_slot, state)
}

fn record(
    directory: &Directory,
    flow: &FlowKey,
    vip_index: u32,
    slot: u32,
    state: FlowState,
) -> Option<FlowRecord> {
    let (vip, backend, _) = directory.backend_of(vip_index, slot)?;
    let family = if vip.vip.is_ipv4() { lb_common::FAMILY_IPV4 } else { lb_common::FAMILY_IPV6 };
    let client = address_from_bytes(flow.client_address, family)?;
    Some(FlowRecord {
        vip: vip.vip,
        protocol: vip.protocol,
        client: SocketAddr::new(client, u16::from_be_bytes(flow.client_port)),
        backend,
        state,
    })
}

/// Where a peer's record goes in our flow table: the key, and the entry
/// naming our VIP index and our slot for its backend.
pub fn resolve(directory: &Directory, record: &FlowRecord) -> Option<(FlowKey, FlowEntry)> {
    let vip_index = *directory.by_vip.get(&(record.vip, record.protocol))?;
    let vip = &directory.by_index[&vip_index];
    let (backend_slot, generation) = *vip.slots.get(&record.backend)?;
    if record.client.is_ipv4() != record.vip.is_ipv4() {
        return None;
    }
    let key = FlowKey::new(
        record.client.ip(),
        record.client.port(),
        record.vip.ip(),
        record.vip.port(),
        record.protocol,
    );
    let flags = match record.state {
        FlowState::Open => 0,
        FlowState::Closing => FLOW_FLAG_CLOSING,
        FlowState::Reset => FLOW_FLAG_CLOSING | FLOW_FLAG_RESET,
    };
    Some((key, FlowEntry { backend_slot, vip_index, last_seen_ns: 0, flags, generation }))
}

/// What applying a record did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Recorded (or closed) here.
    Written,
    /// Our own entry is newer news (an open flow this balancer already
    /// follows): kept as it is.
    Kept,
    /// The VIP or the backend is not configured here.
    Refused,
}

/// Writes a peer's record into the flow table. An open entry of our own is
/// never replaced by a peer's (both balancers hash a new flow alike; ours
/// is what packets here already follow); a closing or missing one is. A
/// close (FIN or RST) only marks the entry, as the datapath does: the next
/// packet other than a RST or FIN reopens a reset one.
pub fn apply(table: &mut FlowTable, directory: &Directory, record: &FlowRecord) -> Applied {
    let Some((key, mut entry)) = resolve(directory, record) else {
        return Applied::Refused;
    };
    let existing = table.get(&key, 0).ok();
    match record.state {
        FlowState::Closing | FlowState::Reset => {
            if let Some(mut existing) = existing.filter(|e| e.vip_index == entry.vip_index) {
                if existing.flags & FLOW_FLAG_CLOSING == 0 {
                    existing.flags |= entry.flags;
                }
                let _ = table.insert(key, existing, 0);
            } else {
                entry.last_seen_ns = monotonic_ns();
                let _ = table.insert(key, entry, 0);
            }
            Applied::Written
        }
        FlowState::Open => {
            if existing.is_some_and(|existing| {
                existing.flags & FLOW_FLAG_CLOSING == 0 && existing.vip_index == entry.vip_index
            }) {
                return Applied::Kept;
            }
            entry.last_seen_ns = monotonic_ns();
            let _ = table.insert(key, entry, 0);
            Applied::Written
        }
    }
}

/// Every flow in the table that this balancer can name, for a full resync.
/// Walks the whole table: run it off the async threads.
pub fn dump(table: &FlowTable, directory: &Directory) -> Vec<FlowRecord> {
    table
        .iter()
        .filter_map(Result::ok)
        .filter_map(|(key, entry)| {
            let state = if entry.flags & FLOW_FLAG_RESET != 0 {
                FlowState::Reset
            } else if entry.flags & FLOW_FLAG_CLOSING != 0 {
                FlowState::Closing
            } else {
                FlowState::Open
            };
            // An entry of an earlier occupant of the slot is not this backend's.
            let (_, _, generation) = directory.backend_of(entry.vip_index, entry.backend_slot)?;
            if generation != entry.generation {
                return None;
            }
            record(directory, &key, entry.vip_index, entry.backend_slot, state)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> Directory {
        let mut directory = Directory::default();
        let backends =
            [("198.18.1.1".parse().unwrap(), 4, 1), ("198.18.1.2".parse().unwrap(), 9, 3)];
        directory.insert("198.18.0.10:80".parse().unwrap(), 6, 2, backends);
        directory
    }

    #[test]
    fn an_event_becomes_a_record_and_resolves_to_the_same_flow() {
        let directory = directory();
        let flow = FlowKey::new(
            "198.19.0.7".parse().unwrap(),
            40_000,
            "198.18.0.10".parse().unwrap(),
            80,
            6,
        );
        let event = FlowSyncEvent {
            flow,
            vip_index: 2,
            backend_slot: 9,
            kind: FlowSyncKind::Open as u32,
            _pad: 0,
        };
        let record = record_of(&directory, &event).unwrap();
        assert_eq!(record.client, "198.19.0.7:40000".parse().unwrap());
        assert_eq!(record.backend, "198.18.1.2".parse::<IpAddr>().unwrap());
        let (key, entry) = resolve(&directory, &record).unwrap();
        let resolved = (key, entry.vip_index, entry.backend_slot, entry.generation, entry.flags);
        assert_eq!(resolved, (flow, 2, 9, 3, 0), "the slot's generation comes from the directory");

        let gone = FlowSyncEvent { backend_slot: 5, ..event };
        assert_eq!(record_of(&directory, &gone), None, "a slot no backend holds");
    }

    #[test]
    fn a_record_for_a_backend_or_vip_not_configured_here_is_refused() {
        let directory = directory();
        let record = FlowRecord {
            vip: "198.18.0.10:80".parse().unwrap(),
            protocol: 6,
            client: "198.19.0.7:40000".parse().unwrap(),
            backend: "198.18.1.1".parse().unwrap(),
            state: FlowState::Closing,
        };
        assert_eq!(resolve(&directory, &record).unwrap().1.flags, FLOW_FLAG_CLOSING);
        let stranger = FlowRecord { backend: "198.18.1.66".parse().unwrap(), ..record };
        assert_eq!(resolve(&directory, &stranger), None);
        let other_vip = FlowRecord { vip: "198.18.0.10:81".parse().unwrap(), ..record };
        assert_eq!(resolve(&directory, &other_vip), None);
        let udp = FlowRecord { protocol: 17, ..record };
        assert_eq!(resolve(&directory, &udp), None);
        let mixed = FlowRecord { client: "[fd00::1]:1".parse().unwrap(), ..record };
        assert_eq!(resolve(&directory, &mixed), None);
    }
}
