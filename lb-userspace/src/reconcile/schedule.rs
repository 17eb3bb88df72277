//! Least-connections in the reconcile step: each VIP's members get the
//! share of new flows that evens out their open flows (see
//! [`crate::scheduler`]), from the counts the daemon last took.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::{Member, Reconciler};
use crate::datapath::Maps;
use crate::model::Vip;
use crate::scheduler::{Load, arrivals, horizon, new_flow_weights};

/// What least-connections VIPs are scheduled by, as last counted off the
/// daemon's loop.
#[derive(Clone, Debug, Default)]
pub struct FlowCounts {
    /// Backend slot -> its active flows.
    pub active: Arc<HashMap<u32, u64>>,
    /// Flows confirmed (all VIPs) between the last two counts: each VIP
    /// plans for its part of as many new flows until the next.
    pub recently_confirmed: u64,
    /// Backend slots the rebalancer is closing connections on: each takes
    /// only its floor of new flows, so that the clients it closes reconnect
    /// to the backends that are short, not back to where they were closed.
    pub closing: HashSet<u32>,
}

impl<M: Maps> Reconciler<M> {
    /// Records a new count of active flows; the next [`Self::apply`]
    /// reschedules the least-connections VIPs by it.
    pub fn set_flow_counts(&mut self, counts: FlowCounts) {
        self.flow_counts = counts;
    }

    /// Least-connections: replaces the members' weights with the share of
    /// new flows that evens out their active flows for their weights (see
    /// [`crate::scheduler`]). Flows of a member that takes no new ones
    /// (down, draining) are left out: they are leaving. Those of a member
    /// that is down are also planned for as new flows: its clients are
    /// about to reconnect all at once, and that storm must be shared as
    /// evenly as it is large, not thrown at whoever was owed a few.
    pub(super) fn schedule_by_active_flows(
        &self,
        vip: &Vip,
        members: &mut [Member],
        is_down: impl Fn(IpAddr) -> bool,
    ) {
        let slots = &self.installed[vip].slots;
        let active = |member: &Member| {
            self.flow_counts.active.get(&slots[&member.address]).copied().unwrap_or(0)
        };
        let loads: Vec<Load> = members
            .iter()
            .map(|member| match member.serving {
                true => Load {
                    weight: member.weight,
                    active: active(member),
                    closing: self.flow_counts.closing.contains(&slots[&member.address]),
                },
                false => Load { weight: 0, active: 0, closing: false },
            })
            .collect();
        let reconnecting: u64 = members
            .iter()
            .filter(|member| !member.serving && is_down(member.address))
            .map(active)
            .sum();
        let open = loads.iter().map(|load| load.active).sum();
        let open_everywhere = self.flow_counts.active.values().sum();
        let arrivals = arrivals(open, open_everywhere, self.flow_counts.recently_confirmed);
        let horizon = horizon(open, arrivals + reconnecting);
        for (member, weight) in members.iter_mut().zip(new_flow_weights(&loads, horizon)) {
            member.weight = weight;
        }
    }
}
