//! What `lb vip list`, `lb backend list` and `lb stats` show: the desired
//! state joined with what is installed, health, counters and rates.

use std::time::SystemTime;

use anyhow::Context as _;

use super::Daemon;
use super::rates::Counted;
use crate::api::{BackendView, StatsView, VipView};
use crate::health::Health;
use crate::model::{Vip, format_mac};

impl Daemon {
    /// The name of egress interface `egress` (0: the one `lb run` runs on).
    fn interface_name(&self, egress: u32) -> Option<String> {
        match egress {
            0 => Some(self.iface.clone()),
            n => self.egress.get(n as usize - 1).cloned(),
        }
    }

    pub(super) fn stats_view(&self) -> anyhow::Result<StatsView> {
        Ok(StatsView {
            vips: self.vip_views()?,
            backends: self.backend_views(None)?,
            reasons: self
                .reconciler
                .datapath()
                .reason_counters()?
                .into_iter()
                .map(|(reason, count)| (reason.name().to_owned(), count))
                .collect(),
            tables_built: self.reconciler.tables_built(),
            table_rebuild_seconds: self.reconciler.table_rebuild_time().as_secs_f64(),
            flow_events: self
                .reconciler
                .datapath()
                .flow_event_counters()?
                .into_iter()
                .map(|(event, count)| (event.name().to_owned(), count))
                .collect(),
            flow_table_size: self.config.datapath.flow_table_size,
            flow_table_entries: self.flow_counter.entries(),
            max_vips: self.config.datapath.max_vips,
            max_backends: self.config.datapath.max_backends,
            attach_mode: self.attach_mode.to_owned(),
            flow_table_memory_bytes: self.reconciler.datapath().flow_table_memory(),
            map_memory_bytes: self.map_memory,
            announce_table: self.announce_table,
            announced: match self.announce_table {
                Some(_) => self.announcements().into_iter().collect(),
                None => Vec::new(),
            },
            sync: self.sync_on.then(|| Box::new(self.sync_status.borrow().clone())),
            store: self.store.as_ref().map(|link| Box::new(link.view())),
        })
    }

    pub(super) fn vip_views(&self) -> anyhow::Result<Vec<VipView>> {
        let mut views = Vec::new();
        for (vip, spec) in &self.config.desired.vips {
            let status = self.reconciler.vip_status(vip).context("VIP not installed")?;
            let counters = self.reconciler.datapath().vip_counters(status.vip_index)?;
            let rate = self.rates.get(Counted::Vip(status.vip_index));
            views.push(VipView {
                vip: vip.to_string(),
                address: vip.address,
                port: vip.port,
                protocol: vip.protocol,
                backends: spec.backends.len(),
                active_backends: status.members,
                serving_backends: if status.fail_open { 0 } else { status.serving },
                all_down: status.fail_open,
                affinity: spec.affinity,
                scheduler: spec.scheduler,
                rebalance: spec.rebalance,
                rebalancing: self.rebalancing(vip, spec.rebalance),
                rebalance_skew: self.rebalancer.vips.get(vip).map_or(0.0, |state| state.skew),
                forwarding: spec.forwarding,
                check: spec.check.clone(),
                packets: counters.packets,
                bytes: counters.bytes,
                icmp_errors: counters.icmp_errors,
                dropped: counters.dropped,
                packets_per_second: rate.packets,
                bytes_per_second: rate.bytes,
                dropped_per_second: rate.dropped,
            });
        }
        Ok(views)
    }

    pub(super) fn backend_views(&self, only: Option<&Vip>) -> anyhow::Result<Vec<BackendView>> {
        let mut views = Vec::new();
        let active_flows = self.active_flows.borrow().clone();
        let table_size = f64::from(self.config.datapath.table_size);
        for (vip, spec) in &self.config.desired.vips {
            if only.is_some_and(|only| only != vip) {
                continue;
            }
            let rebalancing = self.rebalancer.vips.get(vip).filter(|_| spec.rebalance.is_on());
            for installed in self.reconciler.backends(vip) {
                let counters = self.reconciler.datapath().backend_counters(installed.slot)?;
                let rate = self.rates.get(Counted::Backend(installed.slot));
                let health = self.checks.state(vip, installed.address);
                let draining = spec.backends.get(&installed.address).is_some_and(|b| b.draining);
                let lease = self
                    .store
                    .as_ref()
                    .and_then(|link| link.leases.get(&(*vip, installed.address)).copied());
                let state = match (installed.mac, health.map(|h| h.health)) {
                    (None, _) => "resolving",
                    (Some(_), Some(Health::Down)) => "down",
                    (Some(_), _) if draining => "draining",
                    (Some(_), _) => "up",
                };
                views.push(BackendView {
                    vip: vip.to_string(),
                    address: installed.address,
                    weight: spec.backends.get(&installed.address).map_or(0, |b| b.weight),
                    state: state.to_owned(),
                    active_flows: active_flows.get(&installed.slot).copied().unwrap_or(0),
                    since: health.map_or(0.0, |h| {
                        h.since
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs_f64()
                    }),
                    last_error: health.and_then(|h| h.last_error.clone()),
                    last_check_seconds: self
                        .checks
                        .last_check(vip, installed.address)
                        .map(|took| took.as_secs_f64()),
                    mac: installed.mac.map(format_mac),
                    via: installed.mac.and(self.interface_name(installed.egress)),
                    table_entries: installed.table_entries,
                    new_flow_share: f64::from(installed.table_entries) / table_size,
                    rebalance_target: rebalancing
                        .and_then(|state| state.shares.get(&installed.address).copied()),
                    rebalance_closed: rebalancing
                        .and_then(|state| state.closed.get(&installed.address).copied())
                        .unwrap_or(0),
                    rebalance_would_close: rebalancing
                        .and_then(|state| state.would_close.get(&installed.address).copied())
                        .unwrap_or(0),
                    packets: counters.packets,
                    bytes: counters.bytes,
                    icmp_errors: counters.icmp_errors,
                    packets_per_second: rate.packets,
                    bytes_per_second: rate.bytes,
                    origin: if lease.is_some() { "agent" } else { "operator" }.to_owned(),
                    lease: lease.map(|lease| format!("{lease:x}")),
                });
            }
        }
        Ok(views)
    }
}
