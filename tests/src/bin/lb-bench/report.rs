//! The report: the targets each figure is held to, and the throughput chart.

use std::path::Path;

use serde::Serialize;

use crate::connections::ConnectionRow;
use crate::control::ControlRow;
use crate::costs::{CostRow, MEMORY_FLOOR};
use crate::forwarding::ThroughputRow;
use crate::tunnel_costs::STRIP_ROUND_TRIP;

const NEW_FLOW_TARGET: &str =
    "first packet of a new TCP connection (fresh tuples) at most 6x the floor";

#[derive(Serialize)]
pub struct Target {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

pub fn targets(
    costs: &[CostRow],
    throughput: &[ThroughputRow],
    connections: &[ConnectionRow],
    control: &[ControlRow],
) -> Vec<Target> {
    let ratio = |prefix: &str| {
        costs
            .iter()
            .find(|row| row.path.starts_with(prefix))
            .map_or(f64::NAN, |row| row.vs_xdp_tx_floor)
    };
    let mpps = |system: &str, cores: usize, flows: u32| {
        throughput
            .iter()
            .find(|row| row.system == system && row.cores == cores && row.flows == flows)
            .map_or(f64::NAN, |row| row.forwarded_mpps)
    };
    let mut targets = Vec::new();
    // Per-packet rows against the XDP_TX floor: (target, row prefixes, the most allowed).
    let floors: [(&str, &[&str], f64); 3] = [
        (
            "established packet (IPv4/IPv6, TCP/UDP) at most 3x the XDP_TX floor",
            &[
                "established, TCP IPv4:",
                "established, UDP IPv4:",
                "established, TCP IPv6:",
                "established, UDP IPv6:",
            ],
            3.0,
        ),
        (NEW_FLOW_TARGET, &["new flow, TCP IPv4 (fresh", "new flow, TCP IPv6 (fresh"], 6.0),
        ("a packet that is not for a VIP at most 1.3x the floor", &["not a VIP"], 1.3),
    ];
    for (target, prefixes, most) in floors {
        let worst = prefixes.iter().map(|prefix| ratio(prefix)).fold(f64::NAN, f64::max);
        targets.push(Target {
            target: target.into(),
            measured: format!("{worst:.2}x (the worst row)"),
            met: worst <= most,
        });
    }
    // What a fresh tuple's two random reads cost alone, next to the target
    // they bound (docs/performance: "Why 6x is still out of reach").
    if let Some(new_flow) = targets.iter_mut().find(|target| target.target == NEW_FLOW_TARGET) {
        let memory = ratio(MEMORY_FLOOR);
        new_flow.measured =
            format!("{}; its two memory reads alone {memory:.2}x", new_flow.measured);
    }
    // A live row counts only if nearly every frame followed a confirmed
    // entry: a harness that sent new flows instead would measure another path.
    let established = |cores: usize| {
        throughput.iter().any(|row| {
            row.system == "lb"
                && row.cores == cores
                && row.flows == 64_000
                && row.flow_hit_share.is_some_and(|share| share >= 0.99)
        })
    };
    let share = |cores| mpps("lb", cores, 64_000) / mpps("XDP_TX reflector", cores, 64_000);
    let (one, two) = (share(1), share(2));
    let (proven_one, proven_two) = (established(1), established(2));
    let unproven = |proven| if proven { "" } else { " NOT PROVEN: under 99% flow-table hits" };
    targets.push(Target {
        target: "forwarded pps with 64k flows on 1 core at least 70% of the reflector".into(),
        measured: format!(
            "{:.0}% ({:.2} vs {:.2} Mpps){}",
            one * 100.0,
            mpps("lb", 1, 64_000),
            mpps("XDP_TX reflector", 1, 64_000),
            unproven(proven_one)
        ),
        met: proven_one && one >= 0.7,
    });
    // lb and the reflector are measured alternately, so drift common to both
    // cancels in each share; lb's 64k-flow rate still moves by itself between
    // runs (it waits on memory, the reflector does not), and the ratio of the
    // two shares with it (docs/performance). The target allows 5% of that.
    targets.push(Target {
        target: "with 2 cores, lb's share of the reflector at least its share with 1 (allowing 5%)"
            .into(),
        measured: format!(
            "{:.0}% on 2 cores vs {:.0}% on 1 ({:.2}x){}",
            two * 100.0,
            one * 100.0,
            two / one,
            unproven(proven_two)
        ),
        met: proven_one && proven_two && two >= 0.95 * one,
    });
    let (lb, nft) = (mpps("lb", 1, 64_000), mpps("nftables DNAT", 1, 64_000));
    targets.push(Target {
        target: "forwarded pps at least 5x nftables DNAT (1 core, 64k flows)".into(),
        measured: format!("{:.1}x ({lb:.2} vs {nft:.2} Mpps)", lb / nft),
        met: lb >= 5.0 * nft,
    });
    let ns = |path: &str| costs.iter().find(|row| row.path == path).map(|row| row.ns_per_packet);
    // Per-packet rows held to a ratio: (target, row, the row it is compared with, the most allowed).
    let ratios = [
        (
            "established packet with flow sync on at most 1.1x sync off",
            "established, TCP IPv4, flow sync on",
            "established, TCP IPv4, flow sync off",
            1.1,
        ),
        (
            "established packet beside flows marked to close at most 1.05x nothing marked",
            "established, TCP IPv4, rebalancing: 256 other flows marked",
            "established, TCP IPv4, rebalancing: nothing marked",
            1.05,
        ),
        (
            "established packet through ipip at most 1.2x dsr (IPv4)",
            "established, TCP IPv4, ipip (through bench_strip)",
            "established, TCP IPv4, dsr (through bench_strip)",
            1.2,
        ),
        (
            "established packet through gue at most 1.2x dsr (IPv4)",
            "established, TCP IPv4, gue (through bench_strip)",
            "established, TCP IPv4, dsr (through bench_strip)",
            1.2,
        ),
        (
            "established packet through ipip at most 1.2x dsr (IPv6)",
            "established, TCP IPv6, ipip (through bench_strip)",
            "established, TCP IPv6, dsr (through bench_strip)",
            1.2,
        ),
        (
            "established packet through gue at most 1.2x dsr (IPv6)",
            "established, TCP IPv6, gue (through bench_strip)",
            "established, TCP IPv6, dsr (through bench_strip)",
            1.2,
        ),
        (
            "established packet after a flood at most 1.1x before it",
            "established, TCP IPv4, after the flood",
            "established, TCP IPv4, before the flood",
            1.1,
        ),
        (
            "64k flows per CPU on both CPUs at once (test_run) at most 1.2x one CPU alone",
            "established, TCP IPv4, 64k flows per CPU, both CPUs at once",
            "established, TCP IPv4, 64k flows, one CPU",
            1.2,
        ),
        (
            "handshake ACK (confirmation) at most 1.5x the new flow's SYN",
            "handshake ACK, TCP IPv4: confirms the new flow",
            "new flow, TCP IPv4 (fresh port every repeat)",
            1.5,
        ),
    ];
    // The tunnelled rows carry the harness's strip: what its round trip
    // costs over the floor, taken off, gives the other bound (it also takes
    // off the room-making any encapsulation needs, so it is a lower bound).
    let harness =
        ns(STRIP_ROUND_TRIP).zip(ns("floor: XDP_TX MAC swap")).map(|(trip, floor)| trip - floor);
    for (target, path, base, most) in ratios {
        if let (Some(measured), Some(base)) = (ns(path), ns(base)) {
            let mut text = format!("{:.2}x ({measured:.0} vs {base:.0} ns)", measured / base);
            if let (true, Some(harness)) = (path.ends_with("(through bench_strip)"), harness) {
                let lower = (measured - harness) / base;
                text += &format!(
                    "; {lower:.2}x with the harness's {harness:.0} ns round trip taken off"
                );
            }
            targets.push(Target {
                target: target.into(),
                measured: text,
                met: measured <= most * base,
            });
        }
    }
    let rate = |system: &str| {
        connections.iter().find(|row| row.system == system).map(|row| row.connections_per_second)
    };
    if let (Some(direct), Some(lb)) = (rate(crate::connections::DIRECT), rate("lb")) {
        targets.push(Target {
            target: "new connections/s through lb at least 95% of direct".into(),
            measured: format!("{:.0}% ({lb:.0} vs {direct:.0} per second)", 100.0 * lb / direct),
            met: lb >= 0.95 * direct,
        });
    }
    if let (Some(off), Some(on)) = (rate("lb, flow sync off"), rate("lb, flow sync on")) {
        targets.push(Target {
            target: "new connections/s with flow sync on at least 90% of sync off".into(),
            measured: format!("{:.0}% ({on:.0} vs {off:.0} per second)", 100.0 * on / off),
            met: on >= 0.9 * off,
        });
    }
    if let Some(row) = control.iter().find(|row| row.backends == 1000) {
        targets.push(Target {
            target: "table rebuild and install for 1000 backends under 50 ms".into(),
            measured: format!("{:.2} ms", row.rebuild_and_install_ms),
            met: row.rebuild_and_install_ms < 50.0,
        });
    }
    targets
}

pub fn chart(rows: &[ThroughputRow], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = rows.iter().map(|row| row.forwarded_mpps).fold(0.0, f64::max).max(0.1) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption("Forwarded Mpps by cores (64-byte frames, veth, same run)", ("sans-serif", 18))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5f64..2.5f64, 0f64..top)?;
    chart.configure_mesh().x_desc("cores").y_desc("Mpps").x_labels(3).draw()?;
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for row in rows {
        let name =
            format!("{} ({} flow{})", row.system, row.flows, if row.flows == 1 { "" } else { "s" });
        match series.iter_mut().find(|(n, _)| *n == name) {
            Some((_, points)) => points.push((row.cores as f64, row.forwarded_mpps)),
            None => series.push((name, vec![(row.cores as f64, row.forwarded_mpps)])),
        }
    }
    for (index, (name, points)) in series.into_iter().enumerate() {
        let color = colors[index % colors.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(points.into_iter().map(|point| Circle::new(point, 4, color.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw()?;
    root.present()?;
    Ok(())
}
