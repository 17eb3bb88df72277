//! Section 1: the per-packet cost of each datapath path through
//! BPF_PROG_TEST_RUN with a large repeat, against XDP_DROP and an XDP_TX MAC
//! swap (the floor). Each row proves from the datapath's own counters that
//! every repeat took the path it claims. The flood and flow-sync rows are in
//! `hostile_costs`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail};
use aya::Ebpf;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_common::{FLOW_CONFIRM_NS, Reason};
use lb_userspace::model::{DatapathConfig, Protocol};
use lb_userspace::reconcile::Reconciler;
use serde::Serialize;
use tests::packets::{Flow, L4, Segment, Shape, frame};

use crate::bench_harness::{Harness, flow_bucket_bytes, pin_table_bytes};
use crate::hostile_costs::{flood_costs, rebalance_costs, sync_costs};
use crate::ip;
use crate::rig::pin_to_cpu;
use crate::two_cpus::many_flows_on_both_cpus;
use tests::{XDP_PASS, XDP_TX};

/// Repeats per per-packet measurement, and measurements per row (median kept).
pub const REPEAT: u32 = 1_000_000;
/// Fresh-port rows: RUNS x this stays under the 64,000 distinct ports the
/// wrapper cycles through, so no repeat meets an earlier flow of its row.
pub const NEW_FLOW_REPEAT: u32 = 12_000;
pub const RUNS: usize = 5;
/// The row that reads what a fresh tuple's SYN must: a random line of an
/// array the size of the flow table's buckets and one the size of its
/// unconfirmed table (both loads in flight at once), then XDP_TX.
pub const MEMORY_FLOOR: &str = "floor: memory of a new flow";

#[derive(Serialize)]
pub struct CostRow {
    pub path: String,
    pub ns_per_packet: f64,
    /// Cost over the XDP_TX MAC-swap floor's.
    pub vs_xdp_tx_floor: f64,
    /// The counters that prove the path, and whether they moved as claimed.
    pub proof: String,
    pub proven: bool,
}

impl CostRow {
    /// Adds a further proof of the path to this row.
    pub fn also(mut self, holds: bool, proof: String) -> Self {
        self.proof = format!("{}, {proof}", self.proof);
        self.proven &= holds;
        self
    }
}

/// A reconciler with four VIPs (TCP/UDP, IPv4/IPv6) of ten backends each.
pub fn balancer(config: DatapathConfig) -> anyhow::Result<Reconciler> {
    let v4: Vec<IpAddr> = (1..=10).map(|i| ip(&format!("198.18.1.{i}"))).collect();
    let v6: Vec<IpAddr> = (1..=10).map(|i| ip(&format!("fd00:198:18:1::{i}"))).collect();
    let (reconciler, _) = tests::fixture::balancer(
        config,
        &[
            ("198.18.0.10:80", Protocol::Tcp, &v4),
            ("198.18.0.10:53", Protocol::Udp, &v4),
            ("[fd00:198:18::10]:80", Protocol::Tcp, &v6),
            ("[fd00:198:18::10]:53", Protocol::Udp, &v6),
        ],
        tests::fixture::backend_mac,
    )?;
    Ok(reconciler)
}

/// The bench's datapath settings: small enough to load fast, the default
/// flow table unless `flow_table_size` says otherwise.
pub fn config(flow_table_size: Option<u32>, sync_flows: bool) -> DatapathConfig {
    let default = DatapathConfig::default();
    DatapathConfig {
        max_vips: 8,
        max_backends: 64,
        flow_table_size: flow_table_size.unwrap_or(default.flow_table_size),
        sync_flows,
        ..default
    }
}

pub fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let program: &mut Xdp =
        ebpf.program_mut(name).with_context(|| format!("no program {name}"))?.try_into()?;
    Ok(program)
}

/// Median ns per packet of `program` on `frame`, checking its return value.
pub fn cost(program: &Xdp, frame: &[u8], repeat: u32, expect: u32) -> anyhow::Result<f64> {
    let mut samples = Vec::new();
    for _ in 0..RUNS {
        let mut out = vec![0u8; frame.len() + 256];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })?;
        if result.return_value != expect {
            bail!("program returned {} where {expect} was expected", result.return_value);
        }
        samples.push(result.duration.as_nanos() as f64);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[RUNS / 2])
}

pub fn counters(reconciler: &Reconciler) -> anyhow::Result<BTreeMap<String, u64>> {
    let datapath = reconciler.datapath();
    let mut all = BTreeMap::new();
    for (reason, count) in datapath.reason_counters()? {
        all.insert(reason.name().to_owned(), count);
    }
    for (event, count) in datapath.flow_event_counters()? {
        all.insert(format!("flow_{}", event.name()), count);
    }
    Ok(all)
}

/// Runs `measure` on `reconciler`'s datapath and proves the path: the
/// counter `proof` moved by exactly `expected`, and when it is a flow event
/// (of a forwarded packet) so did `forwarded`; a reason proof is already
/// the packets' outcome.
pub fn row(
    reconciler: &Reconciler,
    path: impl Into<String>,
    floor: f64,
    proof: &str,
    expected: u64,
    measure: impl FnOnce() -> anyhow::Result<f64>,
) -> anyhow::Result<CostRow> {
    let before = counters(reconciler)?;
    let ns = measure()?;
    let after = counters(reconciler)?;
    let moved = |name: &str| after[name] - before[name];
    let forwarded = moved(Reason::Forwarded.name());
    let forwards = proof.starts_with("flow_");
    Ok(CostRow {
        path: path.into(),
        ns_per_packet: ns,
        vs_xdp_tx_floor: ns / floor,
        proof: format!("{proof} +{} of {expected}", moved(proof)),
        proven: moved(proof) == expected && (!forwards || forwarded == expected),
    })
}

/// A handshake-ACK row: [`row`] proven on `flow_confirmed`, except that an
/// ACK whose flow lost its unconfirmed pin to newer flows of its bucket
/// (lb_common::PendingFlow) takes the Maglev choice as a `miss_fallback`.
/// Both together must be every ACK, and the lost pins at most one in a
/// thousand (the flows of one row are all half-open at once). Also returns
/// how many flows were confirmed.
pub fn confirmation_row(
    reconciler: &Reconciler,
    path: impl Into<String>,
    floor: f64,
    expected: u64,
    measure: impl FnOnce() -> anyhow::Result<f64>,
) -> anyhow::Result<(CostRow, u64)> {
    let before = counters(reconciler)?;
    let measured = row(reconciler, path, floor, "flow_confirmed", expected, measure)?;
    let after = counters(reconciler)?;
    let moved = |name: &str| after[name] - before[name];
    let lost = moved("flow_miss_fallback");
    let confirmed = moved("flow_confirmed");
    let holds = confirmed + lost == expected
        && moved(Reason::Forwarded.name()) == expected
        && lost * 1_000 <= expected;
    let measured = CostRow { proven: holds, ..measured }.also(holds, format!("{lost} pins lost"));
    Ok((measured, confirmed))
}

/// Sends each frame to `program` once, [`FLOW_CONFIRM_NS`] apart: a
/// handshake (SYN, then ACK) or a UDP flow seen again confirms its flow.
pub fn prime(program: &Xdp, frames: &[Vec<u8>]) -> anyhow::Result<()> {
    for (index, frame) in frames.iter().enumerate() {
        if index > 0 {
            std::thread::sleep(Duration::from_nanos(FLOW_CONFIRM_NS) + Duration::from_millis(50));
        }
        program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut vec![0; frame.len() + 256]),
            ..Default::default()
        })?;
    }
    Ok(())
}

/// Test flows of the bench: TCP and UDP, IPv4 and IPv6, each from its own client.
pub fn bench_flow(client: &str, vip: &str, l4: L4) -> Flow {
    let vip: SocketAddr = vip.parse().expect("bench VIP");
    Flow { client: ip(client), client_port: 40_000, vip: vip.ip(), vip_port: vip.port(), l4 }
}

pub fn packet(flow: Flow, segment: Segment) -> Vec<u8> {
    frame(flow, Shape { segment, ..Shape::default() }, &[0u8; 10])
}

/// The four kinds of flow a row can run, named, with their client's last
/// address byte (IPv4) or group (IPv6) set to `client`.
pub fn kinds(client: u8) -> [(&'static str, Flow); 4] {
    let v4 = format!("198.18.0.{client}");
    let v6 = format!("fd00:198:18::{client:x}:1");
    [
        ("TCP IPv4", bench_flow(&v4, "198.18.0.10:80", L4::Tcp)),
        ("UDP IPv4", bench_flow(&v4, "198.18.0.10:53", L4::Udp)),
        ("TCP IPv6", bench_flow(&v6, "[fd00:198:18::10]:80", L4::Tcp)),
        ("UDP IPv6", bench_flow(&v6, "[fd00:198:18::10]:53", L4::Udp)),
    ]
}

/// The frames that confirm `flow` as established: its handshake, or for UDP
/// one datagram and another a second later.
pub fn establishing(flow: Flow) -> Vec<Vec<u8>> {
    match flow.l4 {
        L4::Tcp => vec![packet(flow, Segment::Syn), packet(flow, Segment::Ack)],
        L4::Udp => vec![packet(flow, Segment::Syn); 2],
    }
}

/// A packet of an established flow: an ACK, or a UDP datagram.
pub fn established(flow: Flow) -> Vec<u8> {
    packet(flow, Segment::Ack)
}

pub fn per_packet_costs() -> anyhow::Result<Vec<CostRow>> {
    // One CPU: the wrapper's port sequence is per CPU, and must not restart.
    pin_to_cpu(0)?;
    let config = config(None, false);
    let flow_table_size = config.flow_table_size;
    let reconciler = balancer(config)?;
    let lb = reconciler.datapath().program();
    let [(_, tcp4), ..] = kinds(1);
    let syn = packet(tcp4, Segment::Syn);
    let mut harness = Harness::load(&syn, flow_table_size)?;
    let floor = harness.floor;
    let memory_floor = harness.memory_floor(&syn)?;
    let repeats = u64::from(REPEAT) * RUNS as u64;
    let fresh = u64::from(NEW_FLOW_REPEAT) * RUNS as u64;

    let mut rows = vec![
        CostRow {
            path: "floor: XDP_DROP".into(),
            ns_per_packet: harness.drop,
            vs_xdp_tx_floor: harness.drop / floor,
            proof: "-".into(),
            proven: true,
        },
        CostRow {
            path: "floor: XDP_TX MAC swap".into(),
            ns_per_packet: floor,
            vs_xdp_tx_floor: 1.0,
            proof: "-".into(),
            proven: true,
        },
        CostRow {
            path: format!(
                "{MEMORY_FLOOR}: a random line of {} MiB and of {} MiB, then XDP_TX",
                flow_bucket_bytes(flow_table_size) >> 20,
                pin_table_bytes(flow_table_size) >> 20
            ),
            ns_per_packet: memory_floor,
            vs_xdp_tx_floor: memory_floor / floor,
            proof: "-".into(),
            proven: true,
        },
    ];
    rows.push(row(
        &reconciler,
        "TCP SYN, IPv4 (one tuple): Maglev choice, unconfirmed entry",
        floor,
        "flow_created",
        repeats,
        || cost(lb, &syn, REPEAT, XDP_TX),
    )?);
    // New flows, each kind from its own client; a TCP flow's handshake ACK
    // then replays the same ports and confirms every one of them.
    for (name, flow) in kinds(100) {
        let start = harness.mark()?;
        let first = packet(flow, Segment::Syn);
        rows.push(row(
            &reconciler,
            format!("new flow, {name} (fresh port every repeat)"),
            floor,
            "flow_created",
            fresh,
            || harness.fresh_ports(lb, &first),
        )?);
        if let L4::Tcp = flow.l4 {
            harness.rewind(&start)?;
            let ack = packet(flow, Segment::Ack);
            let (measured, _) = confirmation_row(
                &reconciler,
                format!("handshake ACK, {name}: confirms the new flow"),
                floor,
                fresh,
                || harness.fresh_ports(lb, &ack),
            )?;
            rows.push(measured);
        }
    }
    for (name, flow) in kinds(1) {
        prime(lb, &establishing(flow))?;
        let frame = established(flow);
        rows.push(row(
            &reconciler,
            format!("established, {name}: flow-table hit"),
            floor,
            "flow_hit",
            repeats,
            || cost(lb, &frame, REPEAT, XDP_TX),
        )?);
    }
    let not_vip = packet(bench_flow("198.18.0.1", "198.18.0.99:22", L4::Tcp), Segment::Ack);
    rows.push(row(
        &reconciler,
        "not a VIP (passed to the kernel)",
        floor,
        Reason::PassNotVip.name(),
        repeats,
        || cost(lb, &not_vip, REPEAT, XDP_PASS),
    )?);
    rows.extend(many_flows_on_both_cpus(&mut harness, &reconciler)?);
    rows.extend(flood_costs(&mut harness)?);
    rows.extend(sync_costs(&mut harness)?);
    rows.extend(rebalance_costs(&mut harness)?);
    rows.extend(crate::tunnel_costs::tunnel_costs(&mut harness)?);
    Ok(rows)
}

pub fn print_costs(rows: &[CostRow]) {
    println!("{:<62} {:>8} {:>8}  PROOF", "PATH", "NS/PKT", "x FLOOR");
    for row in rows {
        println!(
            "{:<62} {:>8.1} {:>8.2}  {}{}",
            row.path,
            row.ns_per_packet,
            row.vs_xdp_tx_floor,
            if row.proven { "" } else { "NOT PROVEN: " },
            row.proof
        );
    }
}
