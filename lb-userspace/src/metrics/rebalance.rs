//! The rebalancer's figures, per VIP and per backend of the VIPs that
//! rebalance (see `daemon::rebalance`).

use prometheus_client::encoding::DescriptorEncoder;

use super::{counter, family, gauge};
use crate::api::StatsView;

pub(super) fn encode(stats: &StatsView, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let rebalancing: Vec<&str> =
        stats.vips.iter().filter(|v| v.rebalance.is_on()).map(|v| v.vip.as_str()).collect();
    let backends = || stats.backends.iter().filter(|b| rebalancing.contains(&b.vip.as_str()));
    let labels = |b: &crate::api::BackendView| {
        vec![("vip", b.vip.clone()), ("backend", b.address.to_string())]
    };
    family(
        e,
        "lb_rebalance_closed",
        "Connections the rebalancer closed on the backend (a RST on the client's next packet) since lb run started.",
        backends().map(|b| (labels(b), counter(b.rebalance_closed))),
    )?;
    family(
        e,
        "lb_rebalance_would_close",
        "In dry-run: connections the rebalancer would close on the backend now.",
        backends().map(|b| (labels(b), gauge(b.rebalance_would_close as f64))),
    )?;
    family(
        e,
        "lb_rebalance_target_connections",
        "The backend's share of its VIP's open connections, which the rebalancer brings it back to when the VIP is out of its band.",
        backends().filter_map(|b| Some((labels(b), gauge(b.rebalance_target?)))),
    )?;
    family(
        e,
        "lb_rebalance_skew",
        "How far the VIP's serving backend furthest from its share of open connections is from it, above or below (0.25: 25% off).",
        stats
            .vips
            .iter()
            .filter(|v| v.rebalance.is_on())
            .map(|v| (vec![("vip", v.vip.clone())], gauge(v.rebalance_skew))),
    )
}
