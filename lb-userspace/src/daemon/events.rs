//! What the daemon's tasks report, handled on its loop: health
//! transitions, resolved MACs and counted flows (each may rebuild tables
//! through the reconcile step), and the one-second rate samples.

use super::Daemon;
use super::rates::Counted;
use crate::datapath;
use crate::health::{Health, HealthReport};
use crate::model::{Scheduler, format_mac};
use crate::neighbour::Neighbours;
use crate::reconcile::FlowCounts;

impl Daemon {
    pub(super) fn health_report(&mut self, report: HealthReport) {
        let (vip, backend) = (report.vip, report.backend);
        let Some(transition) = self.checks.observe(report) else { return };
        match transition.to {
            Health::Up => {
                tracing::info!(%vip, %backend, reason = %transition.reason, "backend up")
            }
            Health::Down => {
                tracing::warn!(%vip, %backend, reason = %transition.reason, "backend down")
            }
        }
        let was_all_down = self.reconciler.vip_status(&vip).is_some_and(|status| status.fail_open);
        if let Err(error) = self.reconciler.apply(&self.config.desired, &self.checks.health_map()) {
            tracing::error!(%error, "installing tables after a health change failed");
        }
        let status = self.reconciler.vip_status(&vip);
        let all_down = status.is_some_and(|status| status.fail_open);
        if all_down && !was_all_down {
            tracing::error!(
                %vip,
                forwarding_to = status.map_or(0, |status| status.serving),
                "every backend of the VIP is down: forwarding to those that were up before (fail-open) rather than dropping"
            );
        } else if was_all_down && !all_down {
            tracing::info!(%vip, "a backend of the VIP is up again: fail-open ended");
        }
    }

    pub(super) fn neighbours_changed(&mut self, found: Neighbours) {
        let mut changed = false;
        for (address, hop) in found {
            if self.reconciler.set_next_hop(address, hop) {
                let mac = format_mac(hop.mac);
                match hop.gateway {
                    None => tracing::info!(%address, %mac, "backend MAC resolved"),
                    Some(router) => tracing::info!(
                        %address, %router, %mac,
                        "backend reached through a router (tunnelled VIPs only; DSR needs it on-link)"
                    ),
                }
                changed = true;
            }
        }
        if changed
            && let Err(error) =
                self.reconciler.apply(&self.config.desired, &self.checks.health_map())
        {
            tracing::error!(%error, "installing tables after a MAC change failed");
        }
    }

    /// A new count of active flows: the least-connections VIPs get new
    /// shares of new flows from it.
    pub(super) fn flows_counted(&mut self) {
        let confirmed = match self.reconciler.datapath().flow_event_counters() {
            Ok(counters) => datapath::total_of(&counters, lb_common::FlowEvent::Confirmed),
            Err(error) => {
                tracing::warn!(%error, "reading the flow counters failed: planning for the least new flows");
                self.last_confirmed.unwrap_or_default()
            }
        };
        let recently_confirmed = confirmed.saturating_sub(self.last_confirmed.unwrap_or(confirmed));
        self.last_confirmed = Some(confirmed);
        let active = self.active_flows.borrow().clone();
        let closing = self.rebalancer.closing();
        self.reconciler.set_flow_counts(FlowCounts { active, recently_confirmed, closing });
        let scheduled = self
            .config
            .desired
            .vips
            .values()
            .any(|spec| spec.scheduler == Scheduler::LeastConnections);
        if scheduled
            && let Err(error) =
                self.reconciler.apply(&self.config.desired, &self.checks.health_map())
        {
            tracing::error!(%error, "installing least-connections tables after a flow count failed");
        }
    }

    pub(super) fn sample_rates(&mut self) {
        let datapath = self.reconciler.datapath();
        for vip in self.config.desired.vips.keys() {
            if let Some(index) = self.reconciler.vip_index(vip)
                && let Ok(counters) = datapath.vip_counters(index)
            {
                self.rates.sample(Counted::Vip(index), counters);
            }
            for slot in self.reconciler.backend_slots(vip) {
                if let Ok(counters) = datapath.backend_counters(slot) {
                    self.rates.sample(Counted::Backend(slot), counters);
                }
            }
        }
    }
}
