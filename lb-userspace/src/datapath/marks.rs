//! The rebalancer's side of the flow table, on its own handle and off the
//! daemon's loop: a census of a VIP's flows per backend, and the marks
//! ([`FLOW_FLAG_SHED`]) that ask the datapath to close a flow on its
//! client's next packet. The only entry field the daemon ever writes.

use std::collections::HashMap;

use aya::maps::MapData;
use lb_common::{FLOW_FLAG_CLOSING, FLOW_FLAG_SHED, FlowEntry, FlowKey, PROTO_TCP, SHED_TTL_NS};

use super::maps::{FlowState, owned_fd};
use super::{Datapath, DatapathError, map_error};
use crate::model::DatapathConfig;

/// The map-update flag that only replaces an existing entry.
const BPF_EXIST: u64 = 2;

/// A VIP's flows on one backend slot, as one walk found them.
#[derive(Clone, Debug, Default)]
pub struct SlotCensus {
    /// Active flows, marked ones included.
    pub active: u64,
    /// Flows marked to close whose mark still holds.
    pub pending: u64,
    /// Active TCP flows without a mark that sent a packet within the walk's
    /// `recent_ns`, most recently seen first (ties in flow-hash order).
    pub candidates: Vec<(FlowKey, FlowEntry)>,
}

/// A mark this marker made, until its flow closes or the mark lapses.
struct Mark {
    vip_index: u32,
    slot: u32,
    marked_ns: u64,
}

/// Marks flows to close, and tells which of its marks closed their flow.
pub struct FlowMarker {
    flows: aya::maps::HashMap<MapData, FlowKey, FlowEntry>,
    config: DatapathConfig,
    marks: Vec<(FlowKey, Mark)>,
}

impl Datapath {
    /// A marker on its own handle of the flow table.
    pub fn flow_marker(&self) -> Result<FlowMarker, DatapathError> {
        let name = lb_common::MAP_FLOWS;
        let data = MapData::from_fd(owned_fd(self.flows_fd(), name)?).map_err(map_error(name))?;
        let flows = aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data));
        Ok(FlowMarker {
            flows: flows.map_err(map_error(name))?,
            config: self.config,
            marks: Vec::new(),
        })
    }
}

impl FlowMarker {
    /// The flows of VIP `vip_index` on each of `slots` (slot, generation),
    /// walking the whole table once at `now_ns`.
    pub fn census(
        &self,
        vip_index: u32,
        slots: &[(u32, u32)],
        now_ns: u64,
        recent_ns: u64,
    ) -> HashMap<u32, SlotCensus> {
        let generations: HashMap<u32, u32> = slots.iter().copied().collect();
        let mut census: HashMap<u32, SlotCensus> =
            slots.iter().map(|(slot, _)| (*slot, SlotCensus::default())).collect();
        for (key, entry) in self.flows.iter().filter_map(Result::ok) {
            if entry.vip_index != vip_index
                || generations.get(&entry.backend_slot) != Some(&entry.generation)
                || FlowState::of(&key, &entry, now_ns, &self.config) != FlowState::Active
            {
                continue;
            }
            let Some(slot) = census.get_mut(&entry.backend_slot) else { continue };
            slot.active += 1;
            let age = now_ns.saturating_sub(entry.last_seen_ns);
            if entry.flags & FLOW_FLAG_SHED != 0 {
                slot.pending += u64::from(age <= SHED_TTL_NS);
            } else if key.protocol == u32::from(PROTO_TCP) && age <= recent_ns {
                slot.candidates.push((key, entry));
            }
        }
        for slot in census.values_mut() {
            slot.candidates.sort_by_key(|(key, entry)| {
                (std::cmp::Reverse(entry.last_seen_ns), lb_common::flow_hash(key, 0))
            });
        }
        census
    }

    /// Marks the flow `key` to close, if its entry is still the one the
    /// census saw (same VIP, backend and generation, not closing): its
    /// client's next packet closes it. Returns whether it was marked.
    pub fn mark(&mut self, key: &FlowKey, seen: &FlowEntry, now_ns: u64) -> bool {
        let Ok(current) = self.flows.get(key, 0) else { return false };
        let same = (current.vip_index, current.backend_slot, current.generation)
            == (seen.vip_index, seen.backend_slot, seen.generation);
        if !same || current.flags & (FLOW_FLAG_CLOSING | FLOW_FLAG_SHED) != 0 {
            return false;
        }
        let marked =
            FlowEntry { flags: current.flags | FLOW_FLAG_SHED, last_seen_ns: now_ns, ..current };
        // BPF_EXIST: never recreates an entry the datapath deleted meanwhile.
        if self.flows.insert(key, marked, BPF_EXIST).is_err() {
            return false;
        }
        let mark =
            Mark { vip_index: current.vip_index, slot: current.backend_slot, marked_ns: now_ns };
        self.marks.push((*key, mark));
        true
    }

    /// The (VIP index, backend slot) of each mark whose flow the datapath
    /// closed since the last call; marks that lapsed are forgotten.
    pub fn settle(&mut self, now_ns: u64) -> Vec<(u32, u32)> {
        let mut closed = Vec::new();
        let flows = &self.flows;
        self.marks.retain(|(key, mark)| match flows.get(key, 0) {
            Err(_) => {
                closed.push((mark.vip_index, mark.slot));
                false
            }
            Ok(entry) => {
                entry.flags & FLOW_FLAG_SHED != 0
                    && now_ns.saturating_sub(mark.marked_ns) <= SHED_TTL_NS
            }
        });
        closed
    }

    /// Marks made and not yet closed or lapsed.
    pub fn outstanding(&self) -> usize {
        self.marks.len()
    }
}
