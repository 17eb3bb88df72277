//! Section 1, continued: what flood resistance and flow sync cost per packet.
//!
//! - `flood_costs`: spoofed SYNs, bare ACKs and UDP datagrams on fresh
//!   tuples, on a balancer whose unconfirmed table (1,024 entries) the flood
//!   overruns fifty-eight times per row, so nearly every insert evicts. A
//!   flow confirmed before the flood is measured before and after it: it is
//!   still hit, at the same cost.
//! - `sync_costs`: the new-flow, handshake-ACK and established rows with flow
//!   sync off and on. A flow is reported when its handshake ACK confirms it;
//!   an established packet must cost the same either way.
//! - `rebalance_costs`: the established row on a VIP the rebalancer leaves
//!   alone and on one where it has marked the VIP's other flows to close.
//!   Rebalancing on with nothing marked is the off datapath itself (the
//!   setting lives in the daemon), so the pair shows what marks cost the
//!   flows they do not touch.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use lb_common::{FLOW_CONFIRM_NS, FLOW_FLAG_SHED, FlowKey, PROTO_TCP, new_flow_table_size};
use lb_userspace::datapath::{Maps as _, monotonic_ns};

use crate::bench_harness::Harness;
use crate::costs::{
    CostRow, NEW_FLOW_REPEAT, REPEAT, RUNS, balancer, config, confirmation_row, cost, counters,
    established, establishing, kinds, packet, prime, row,
};
use tests::XDP_TX;
use tests::packets::{Flow, Segment};

/// The flood balancer's flow table: its unconfirmed table gets the minimum.
const FLOOD_FLOW_TABLE: u32 = 4_096;

pub fn flood_costs(harness: &mut Harness) -> anyhow::Result<Vec<CostRow>> {
    let reconciler = balancer(config(Some(FLOOD_FLOW_TABLE), false))?;
    let lb = reconciler.datapath().program();
    let floor = harness.floor;
    let repeats = u64::from(REPEAT) * RUNS as u64;
    let fresh = u64::from(NEW_FLOW_REPEAT) * RUNS as u64;
    let unconfirmed = new_flow_table_size(FLOOD_FLOW_TABLE);

    let [(_, victim), ..] = kinds(7);
    prime(lb, &establishing(victim))?;
    let victim_frame = established(victim);
    let mut rows = vec![row(
        &reconciler,
        "established, TCP IPv4, before the flood",
        floor,
        "flow_hit",
        repeats,
        || cost(lb, &victim_frame, REPEAT, XDP_TX),
    )?];
    // Each kind from its own client, so no flood tuple meets another's entry.
    let [(_, syn), ..] = kinds(200);
    let [(_, ack), ..] = kinds(201);
    let [_, (_, udp), ..] = kinds(202);
    let floods = [
        ("SYN", packet(syn, Segment::Syn), "flow_created"),
        ("bare ACK", packet(ack, Segment::Ack), "flow_miss_fallback"),
        ("UDP", packet(udp, Segment::Syn), "flow_created"),
    ];
    for (kind, frame, proof) in floods {
        rows.push(row(
            &reconciler,
            format!("flood: {kind}, fresh tuples, unconfirmed table ({unconfirmed}) full"),
            floor,
            proof,
            fresh,
            || harness.fresh_ports(lb, &frame),
        )?);
    }
    rows.push(row(
        &reconciler,
        "established, TCP IPv4, after the flood",
        floor,
        "flow_hit",
        repeats,
        || cost(lb, &victim_frame, REPEAT, XDP_TX),
    )?);
    Ok(rows)
}

/// Rounds of the established sync off/on pair.
const SYNC_ROUNDS: usize = 3;

/// The new-flow, handshake-ACK and established TCP IPv4 rows on two fresh
/// datapaths, flow sync off and on, prepared alike. The ring (4 MiB, 65,536
/// records) holds every confirmation, and the proof counts them there.
/// Established packets alternate between the two datapaths for
/// [`SYNC_ROUNDS`] rounds (median kept), so drift hits both alike.
pub fn sync_costs(harness: &mut Harness) -> anyhow::Result<Vec<CostRow>> {
    let floor = harness.floor;
    let fresh = u64::from(NEW_FLOW_REPEAT) * RUNS as u64;
    // Clients no other row uses, so every flow is new here.
    let (_, new) = kinds(99)[0];
    let (_, long_lived) = kinds(98)[0];
    let mut rows = Vec::new();
    let mut datapaths = Vec::new();
    for sync_flows in [false, true] {
        let mut reconciler = balancer(config(None, sync_flows))?;
        let mut ring =
            reconciler.datapath_mut().take_sync()?.map(|sync| sync.open_ring()).transpose()?;
        let lb = reconciler.datapath().program();
        let label = if sync_flows { "on" } else { "off" };

        let start = harness.mark()?;
        let syn = packet(new, Segment::Syn);
        let path = format!("new flow, TCP IPv4, flow sync {label}");
        let measured =
            row(&reconciler, path, floor, "flow_created", fresh, || harness.fresh_ports(lb, &syn))?;
        let records = drain(&mut ring);
        rows.push(measured.also(records == 0, format!("ring records {records}")));

        harness.rewind(&start)?;
        let ack = packet(new, Segment::Ack);
        let path = format!("handshake ACK, TCP IPv4, flow sync {label}");
        let (measured, confirmed) =
            confirmation_row(&reconciler, path, floor, fresh, || harness.fresh_ports(lb, &ack))?;
        let (records, lost) = (drain(&mut ring), counters(&reconciler)?["flow_sync_lost"]);
        let reported = if sync_flows { confirmed } else { 0 };
        rows.push(measured.also(
            records == reported && lost == 0,
            format!("ring records {records}, {lost} lost"),
        ));

        prime(reconciler.datapath().program(), &establishing(long_lived))?;
        drain(&mut ring);
        datapaths.push((label, reconciler, ring, Vec::new(), 0u64));
    }
    let frame = established(long_lived);
    for _ in 0..SYNC_ROUNDS {
        for (_, reconciler, _, samples, hits) in &mut datapaths {
            let before = counters(reconciler)?["flow_hit"];
            samples.push(cost(reconciler.datapath().program(), &frame, REPEAT, XDP_TX)?);
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
            proof: format!("flow_hit +{hits} of {expected}, ring records {records}"),
            proven: hits == expected && records == 0,
        });
    }
    Ok(rows)
}

/// The marked neighbours of the rebalancing row, and its rounds.
const MARKED: u16 = 256;
const REBALANCE_ROUNDS: usize = 5;

/// The established TCP IPv4 row on two datapaths prepared alike, each with
/// [`MARKED`] other flows of the VIP confirmed: on one the rebalancer has
/// marked them all ([`FLOW_FLAG_SHED`]), on the other none. Rounds
/// alternate between the two (median kept). The proof: every packet a
/// flow-table hit, none closed, the measured flow never marked, and the
/// marks still held at the end.
pub fn rebalance_costs(harness: &mut Harness) -> anyhow::Result<Vec<CostRow>> {
    let floor = harness.floor;
    let (_, measured) = kinds(97)[0];
    let neighbours: Vec<Flow> =
        (0..MARKED).map(|i| Flow { client_port: 41_000 + i, ..measured }).collect();
    let mut datapaths = Vec::new();
    for marks in [false, true] {
        let reconciler = balancer(config(None, false))?;
        let lb = reconciler.datapath().program();
        prime(lb, &establishing(measured))?;
        confirm_all(lb, &neighbours)?;
        let confirmed: Vec<(FlowKey, lb_common::FlowEntry)> = neighbours
            .iter()
            .filter_map(|flow| {
                let key = key(flow);
                reconciler.datapath().flow(&key).map(|entry| (key, entry))
            })
            .collect();
        let mut marked = 0;
        if marks {
            let mut marker = reconciler.datapath().flow_marker()?;
            let now = monotonic_ns();
            marked = confirmed.iter().filter(|(key, entry)| marker.mark(key, entry, now)).count();
        }
        datapaths.push((marks, reconciler, confirmed.len(), marked, Vec::new(), 0u64));
    }
    let frame = established(measured);
    let before: Vec<u64> = datapaths
        .iter()
        .map(|d| counters(&d.1).map(|c| c["flow_shed"]))
        .collect::<Result<_, _>>()?;
    for _ in 0..REBALANCE_ROUNDS {
        for (_, reconciler, _, _, samples, hits) in &mut datapaths {
            let start = counters(reconciler)?["flow_hit"];
            samples.push(cost(reconciler.datapath().program(), &frame, REPEAT, XDP_TX)?);
            *hits += counters(reconciler)?["flow_hit"] - start;
        }
    }
    let mut rows = Vec::new();
    for ((marks, reconciler, confirmed, marked, mut samples, hits), shed_before) in
        datapaths.into_iter().zip(before)
    {
        samples.sort_by(f64::total_cmp);
        let ns = samples[REBALANCE_ROUNDS / 2];
        let shed = counters(&reconciler)?["flow_shed"] - shed_before;
        let still_marked = neighbours
            .iter()
            .filter_map(|flow| reconciler.datapath().flow(&key(flow)))
            .filter(|entry| entry.flags & FLOW_FLAG_SHED != 0)
            .count();
        let untouched = reconciler
            .datapath()
            .flow(&key(&measured))
            .is_some_and(|e| e.flags & FLOW_FLAG_SHED == 0);
        let expected = u64::from(REPEAT) * (RUNS * REBALANCE_ROUNDS) as u64;
        let path = if marks {
            format!("established, TCP IPv4, rebalancing: {MARKED} other flows marked")
        } else {
            "established, TCP IPv4, rebalancing: nothing marked".to_owned()
        };
        let wanted = if marks { confirmed } else { 0 };
        rows.push(CostRow {
            path,
            ns_per_packet: ns,
            vs_xdp_tx_floor: ns / floor,
            proof: format!(
                "flow_hit +{hits} of {expected}, flow_shed +{shed}, \
                 {still_marked} of {confirmed} neighbours marked"
            ),
            proven: hits == expected
                && shed == 0
                && untouched
                && marked == wanted
                && still_marked == wanted
                && confirmed * 10 >= usize::from(MARKED) * 9,
        });
    }
    Ok(rows)
}

/// Confirms every flow: all the SYNs, then after [`FLOW_CONFIRM_NS`] all
/// the ACKs (so many flows take one wait, not one each).
fn confirm_all(program: &aya::programs::Xdp, flows: &[Flow]) -> anyhow::Result<()> {
    let syns: Vec<Vec<u8>> = flows.iter().map(|flow| packet(*flow, Segment::Syn)).collect();
    let acks: Vec<Vec<u8>> = flows.iter().map(|flow| packet(*flow, Segment::Ack)).collect();
    for frame in &syns {
        prime(program, std::slice::from_ref(frame))?;
    }
    std::thread::sleep(Duration::from_nanos(FLOW_CONFIRM_NS) + Duration::from_millis(50));
    for frame in &acks {
        prime(program, std::slice::from_ref(frame))?;
    }
    Ok(())
}

fn key(flow: &Flow) -> FlowKey {
    FlowKey::new(flow.client, flow.client_port, flow.vip, flow.vip_port, PROTO_TCP)
}

/// Empties the flow-change ring (if there is one); returns how many records it held.
fn drain(ring: &mut Option<RingBuf<MapData>>) -> u64 {
    let mut records = 0;
    while ring.as_mut().and_then(|ring| ring.next()).is_some() {
        records += 1;
    }
    records
}
