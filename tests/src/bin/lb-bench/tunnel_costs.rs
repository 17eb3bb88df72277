//! Section 1, continued: what tunnelled forwarding costs per packet. The
//! established row and the first packet of new flows (a fresh source port
//! every repeat), TCP over IPv4 and IPv6, on VIPs in each mode (`dsr`,
//! `ipip`, `gue`), all through `bench_strip` so that every repeat meets the
//! client's frame again (BPF_PROG_TEST_RUN repeats on the frame the last
//! run left, which `ipip` and `gue` grew). The strip's own work stays in the
//! tunnelled rows, so they are upper bounds.

use lb_userspace::model::{Forwarding, ForwardingMode, HealthMap, Protocol, TunnelConfig, Vip};
use lb_userspace::reconcile::Reconciler;
use tests::packets::Segment;

use crate::bench_harness::Harness;

use crate::costs::{
    CostRow, NEW_FLOW_REPEAT, REPEAT, RUNS, config, established, establishing, kinds, packet,
    prime, row,
};
use crate::ip;

/// The row of the harness's own round trip in the tunnelled rows.
pub const STRIP_ROUND_TRIP: &str = "floor: tunnel round trip (bench_strip, 20-byte grow, XDP_TX)";

/// The VIPs of `costs::balancer`, every one in `mode`.
fn tunnel_balancer(mode: ForwardingMode) -> anyhow::Result<Reconciler> {
    let v4: Vec<_> = (1..=10).map(|i| ip(&format!("198.18.1.{i}"))).collect();
    let v6: Vec<_> = (1..=10).map(|i| ip(&format!("fd00:198:18:1::{i}"))).collect();
    let vips = [
        ("198.18.0.10:80", Protocol::Tcp, &v4),
        ("198.18.0.10:53", Protocol::Udp, &v4),
        ("[fd00:198:18::10]:80", Protocol::Tcp, &v6),
        ("[fd00:198:18::10]:53", Protocol::Udp, &v6),
    ];
    let tunnel = TunnelConfig {
        source_v4: Some("198.18.0.2".parse()?),
        source_v6: Some("fd00:198:18::2".parse()?),
        mtu: 1500,
        ..TunnelConfig::NONE
    };
    let settings = lb_userspace::model::DatapathConfig { tunnel, ..config(None, false) };
    let decls: Vec<_> =
        vips.iter().map(|(vip, protocol, backends)| (*vip, *protocol, &backends[..])).collect();
    let (mut reconciler, mut desired) =
        tests::fixture::balancer(settings, &decls, tests::fixture::backend_mac)?;
    for (endpoint, protocol, _) in vips {
        let vip = Vip::new(endpoint.parse()?, protocol);
        desired.configure(&vip, None, None, None, Some(Forwarding::new(mode, None)))?;
    }
    reconciler.apply(&desired, &HealthMap::new())?;
    Ok(reconciler)
}

pub fn tunnel_costs(harness: &mut Harness) -> anyhow::Result<Vec<CostRow>> {
    let floor = harness.floor;
    let repeats = u64::from(REPEAT) * RUNS as u64;
    let fresh = u64::from(NEW_FLOW_REPEAT) * RUNS as u64;
    let [(v4_name, tcp4), _, (v6_name, tcp6), _] = kinds(98);
    let round_trip = harness.strip_round_trip(&established(tcp4))?;
    let mut rows = vec![CostRow {
        path: STRIP_ROUND_TRIP.into(),
        ns_per_packet: round_trip,
        vs_xdp_tx_floor: round_trip / floor,
        proof: "-".into(),
        proven: true,
    }];
    for mode in [ForwardingMode::Dsr, ForwardingMode::Ipip, ForwardingMode::Gue] {
        let reconciler = tunnel_balancer(mode)?;
        let lb = reconciler.datapath().program();
        for (name, flow) in [(v4_name, tcp4), (v6_name, tcp6)] {
            let first = packet(flow, Segment::Syn);
            let path = format!("new flow, {name}, {mode} (fresh port, through bench_strip)");
            rows.push(row(&reconciler, path, floor, "flow_created", fresh, || {
                harness.fresh_through_strip(lb, &first)
            })?);
            prime(lb, &establishing(flow))?;
            let frame = established(flow);
            let path = format!("established, {name}, {mode} (through bench_strip)");
            rows.push(row(&reconciler, path, floor, "flow_hit", repeats, || {
                harness.through_strip(lb, &frame)
            })?);
        }
    }
    Ok(rows)
}
