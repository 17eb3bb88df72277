//! Section 1: the per-packet cost of each datapath path through
//! BPF_PROG_TEST_RUN with a large repeat, against XDP_DROP and an XDP_TX MAC
//! swap (the floor). Each row proves from the datapath's own counters that
//! every repeat took the path it claims.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, bail};
use aya::maps::ProgramArray;
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use lb_common::{FlowEvent, Reason};
use lb_userspace::datapath::BENCH_OBJECT;
use lb_userspace::model::{DatapathConfig, Protocol};
use lb_userspace::reconcile::Reconciler;
use serde::Serialize;
use tests::packets::{Flow, L4, Segment, Shape, frame};

use crate::forwarding::pin_to_cpu;
use crate::ip;
use tests::{XDP_DROP, XDP_PASS, XDP_TX};

/// Repeats per per-packet measurement, and measurements per row (median kept).
pub const REPEAT: u32 = 1_000_000;
/// New-flow rows: RUNS x this stays under the 64,000 distinct ports the
/// wrapper cycles through, so no repeat meets an earlier flow.
pub const NEW_FLOW_REPEAT: u32 = 12_000;
pub const RUNS: usize = 5;

#[derive(Serialize)]
pub struct CostRow {
    pub path: String,
    pub ns_per_packet: f64,
    /// Cost over the XDP_TX MAC-swap floor's.
    pub vs_xdp_tx_floor: f64,
    /// The counter that proves the path, and whether it moved by exactly the repeat count.
    pub proof: String,
    pub proven: bool,
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

pub fn per_packet_costs() -> anyhow::Result<Vec<CostRow>> {
    // One CPU: the wrapper's port sequence is per CPU, and must not restart.
    pin_to_cpu(0)?;
    let config = DatapathConfig { max_vips: 8, max_backends: 64, ..DatapathConfig::default() };
    let reconciler = balancer(config)?;
    let lb = reconciler.datapath().program();
    let mut bench =
        EbpfLoader::new().override_global("BENCH_FLOWS", &64_000u32, true).load(BENCH_OBJECT)?;
    for name in ["bench_drop", "bench_mac_swap", "bench_new_flow"] {
        xdp(&mut bench, name)?.load()?;
    }
    let mut target =
        ProgramArray::try_from(bench.take_map("BENCH_TARGET").context("BENCH_TARGET")?)?;

    let flow = |client: &str, vip: &str, l4| {
        let vip: SocketAddr = vip.parse().unwrap();
        Flow { client: ip(client), client_port: 40_000, vip: vip.ip(), vip_port: vip.port(), l4 }
    };
    let packet = |flow, segment| frame(flow, Shape { segment, ..Shape::default() }, &[0u8; 10]);
    let tcp4 = flow("198.18.0.1", "198.18.0.10:80", L4::Tcp);
    let udp4 = flow("198.18.0.1", "198.18.0.10:53", L4::Udp);
    let tcp6 = flow("fd00:198:18::1", "[fd00:198:18::10]:80", L4::Tcp);
    let udp6 = flow("fd00:198:18::1", "[fd00:198:18::10]:53", L4::Udp);

    let drop = cost(xdp(&mut bench, "bench_drop")?, &packet(tcp4, Segment::Syn), REPEAT, XDP_DROP)?;
    let floor =
        cost(xdp(&mut bench, "bench_mac_swap")?, &packet(tcp4, Segment::Syn), REPEAT, XDP_TX)?;
    // The wrapper's own cost: the same wrapper tail-calling XDP_DROP, less XDP_DROP.
    target.set(0, xdp(&mut bench, "bench_drop")?.fd()?, 0)?;
    let wrapper =
        cost(xdp(&mut bench, "bench_new_flow")?, &packet(tcp4, Segment::Syn), REPEAT, XDP_DROP)?
            - drop;
    target.set(0, lb.fd()?, 0)?;

    let mut rows = vec![
        CostRow {
            path: "floor: XDP_DROP".into(),
            ns_per_packet: drop,
            vs_xdp_tx_floor: drop / floor,
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
    ];
    let new_flow = xdp(&mut bench, "bench_new_flow")?;
    let cases: Vec<CostCase> = vec![
        (
            "TCP SYN, IPv4: Maglev choice, no flow lookup",
            lb,
            packet(tcp4, Segment::Syn),
            REPEAT,
            XDP_TX,
            "flow_created".into(),
            false,
        ),
        (
            "new flow, TCP IPv4 (fresh port every repeat)",
            new_flow,
            packet(tcp4, Segment::Syn),
            NEW_FLOW_REPEAT,
            XDP_TX,
            "flow_created".into(),
            false,
        ),
        (
            "new flow, UDP IPv4 (fresh port every repeat)",
            new_flow,
            packet(udp4, Segment::Syn),
            NEW_FLOW_REPEAT,
            XDP_TX,
            "flow_created".into(),
            false,
        ),
        (
            "new flow, TCP IPv6 (fresh port every repeat)",
            new_flow,
            packet(tcp6, Segment::Syn),
            NEW_FLOW_REPEAT,
            XDP_TX,
            "flow_created".into(),
            false,
        ),
        (
            "new flow, UDP IPv6 (fresh port every repeat)",
            new_flow,
            packet(udp6, Segment::Syn),
            NEW_FLOW_REPEAT,
            XDP_TX,
            "flow_created".into(),
            false,
        ),
        (
            "established, TCP IPv4: flow-table hit",
            lb,
            packet(tcp4, Segment::Ack),
            REPEAT,
            XDP_TX,
            "flow_hit".into(),
            true,
        ),
        (
            "established, UDP IPv4: flow-table hit",
            lb,
            packet(udp4, Segment::Syn),
            REPEAT,
            XDP_TX,
            "flow_hit".into(),
            true,
        ),
        (
            "established, TCP IPv6: flow-table hit",
            lb,
            packet(tcp6, Segment::Ack),
            REPEAT,
            XDP_TX,
            "flow_hit".into(),
            true,
        ),
        (
            "established, UDP IPv6: flow-table hit",
            lb,
            packet(udp6, Segment::Syn),
            REPEAT,
            XDP_TX,
            "flow_hit".into(),
            true,
        ),
        (
            "not a VIP (passed to the kernel)",
            lb,
            packet(flow("198.18.0.1", "198.18.0.99:22", L4::Tcp), Segment::Ack),
            REPEAT,
            XDP_PASS,
            Reason::PassNotVip.name().into(),
            false,
        ),
    ];
    for (index, (path, program, frame, repeat, action, proof, prime)) in
        cases.into_iter().enumerate()
    {
        // Each new-flow row starts from its own client address, so its flows are new.
        let mut frame = frame;
        if path.starts_with("new flow") {
            let client_last_byte =
                if frame[12..14] == [0x86, 0xdd] { 14 + 8 + 15 } else { 14 + 12 + 3 };
            frame[client_last_byte] = 100 + index as u8;
        }
        if prime {
            lb.test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut vec![0; 512]),
                ..Default::default()
            })?;
        }
        let before = counters(&reconciler)?;
        let mut ns = cost(program, &frame, repeat, action)?;
        let after = counters(&reconciler)?;
        if std::ptr::eq(program, new_flow) {
            ns -= wrapper;
        }
        let moved = after[&proof] - before[&proof];
        let expected = u64::from(repeat) * RUNS as u64;
        let forwarded = after[Reason::Forwarded.name()] - before[Reason::Forwarded.name()];
        let proven = moved == expected && (action != XDP_TX || forwarded == expected);
        rows.push(CostRow {
            path: path.into(),
            ns_per_packet: ns,
            vs_xdp_tx_floor: ns / floor,
            proof: format!("{proof} +{moved} of {expected} repeats"),
            proven,
        });
    }
    let (syn, ack) = (packet(tcp4, Segment::Syn), packet(tcp4, Segment::Ack));
    rows.extend(sync_costs(&mut target, new_flow, wrapper, floor, [syn, ack])?);
    let _ = FlowEvent::Created;
    Ok(rows)
}

/// The new-flow and established TCP IPv4 rows on two fresh datapaths, flow
/// sync off and on, prepared alike: a new flow with sync on also writes a
/// record into the ring; an established packet must cost the same. The ring
/// (4 MiB, 65,536 records) holds every new-flow repeat, and the proof counts
/// them there. Established packets alternate between the two datapaths for
/// [`SYNC_ROUNDS`] rounds (median kept), so drift hits both alike.
fn sync_costs(
    target: &mut ProgramArray<aya::maps::MapData>,
    new_flow: &Xdp,
    wrapper: f64,
    floor: f64,
    [mut syn, mut ack]: [Vec<u8>; 2],
) -> anyhow::Result<Vec<CostRow>> {
    // A client address no other row uses, so every flow is new here.
    syn[14 + 12 + 3] = 99;
    ack[14 + 12 + 3] = 99;
    let mut rows = Vec::new();
    let mut datapaths = Vec::new();
    for sync_flows in [false, true] {
        let config = DatapathConfig {
            max_vips: 8,
            max_backends: 64,
            sync_flows,
            ..DatapathConfig::default()
        };
        let mut reconciler = balancer(config)?;
        let mut ring = reconciler.datapath_mut().take_sync()?.map(|sync| sync.ring);
        let label = if sync_flows { "on" } else { "off" };
        target.set(0, reconciler.datapath().program().fd()?, 0)?;

        let before = counters(&reconciler)?;
        let ns = cost(new_flow, &syn, NEW_FLOW_REPEAT, XDP_TX)? - wrapper;
        let after = counters(&reconciler)?;
        let (created, lost) = (
            after["flow_created"] - before["flow_created"],
            after["flow_sync_lost"] - before["flow_sync_lost"],
        );
        let records = drain(&mut ring);
        let expected = u64::from(NEW_FLOW_REPEAT) * RUNS as u64;
        rows.push(CostRow {
            path: format!("new flow, TCP IPv4, flow sync {label}"),
            ns_per_packet: ns,
            vs_xdp_tx_floor: ns / floor,
            proof: format!(
                "flow_created +{created} of {expected} repeats, ring records {records}, {lost} lost"
            ),
            proven: created == expected
                && lost == 0
                && records == if sync_flows { expected } else { 0 },
        });
        // The established flow: its SYN, once.
        reconciler.datapath().program().test_run(TestRunOptions {
            data_in: Some(&syn),
            data_out: Some(&mut vec![0; 512]),
            ..Default::default()
        })?;
        drain(&mut ring);
        datapaths.push((label, reconciler, ring, Vec::new(), 0u64));
    }
    for _ in 0..SYNC_ROUNDS {
        for (_, reconciler, _, samples, hits) in &mut datapaths {
            let before = counters(reconciler)?["flow_hit"];
            samples.push(cost(reconciler.datapath().program(), &ack, REPEAT, XDP_TX)?);
            *hits += counters(reconciler)?["flow_hit"] - before;
        }
    }
    for (label, _, mut ring, mut samples, hits) in datapaths {
        samples.sort_by(f64::total_cmp);
        let ns = samples[SYNC_ROUNDS / 2];
        let records = drain(&mut ring);
        let expected = u64::from(REPEAT) * (RUNS * SYNC_ROUNDS) as u64;
        rows.push(CostRow {
            path: format!("established, TCP IPv4, flow sync {label}"),
            ns_per_packet: ns,
            vs_xdp_tx_floor: ns / floor,
            proof: format!("flow_hit +{hits} of {expected} repeats, ring records {records}"),
            proven: hits == expected && records == 0,
        });
    }
    Ok(rows)
}

/// Rounds of the established sync off/on pair.
const SYNC_ROUNDS: usize = 3;

/// Empties the flow-change ring (if there is one); returns how many records it held.
fn drain(ring: &mut Option<aya::maps::RingBuf<aya::maps::MapData>>) -> u64 {
    let mut records = 0;
    while ring.as_mut().and_then(|ring| ring.next()).is_some() {
        records += 1;
    }
    records
}

/// (description, program, frame, repeat, expected action, the counter that
/// must move by exactly the repeat count, whether to send the frame once first)
type CostCase<'a> = (&'a str, &'a Xdp, Vec<u8>, u32, u32, String, bool);

pub fn print_costs(rows: &[CostRow]) {
    println!("{:<50} {:>9} {:>9}  PROOF", "PATH", "NS/PKT", "x FLOOR");
    for row in rows {
        println!(
            "{:<50} {:>9.1} {:>9.2}  {}{}",
            row.path,
            row.ns_per_packet,
            row.vs_xdp_tx_floor,
            if row.proven { "" } else { "NOT PROVEN: " },
            row.proof
        );
    }
}
