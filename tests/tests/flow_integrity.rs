//! What keeps flows on the right backend under stress, through
//! BPF_PROG_TEST_RUN on the real XDP object (fixture:
//! tests/src/datapath_fixture.rs): the flow-sync reports, ICMP errors sent
//! to the backend of the flow they quote, forged RSTs, reused backend slots
//! and spoofed floods that never evict a confirmed flow.

use std::net::IpAddr;

use lb_common::{FlowEvent, FlowKey, FlowSyncKind, Reason};
use lb_userspace::model::{BackendSpec, DatapathConfig, HealthMap, Protocol};
use tests::fixture::backend_mac;
use tests::packets::{
    Flow, Icmp, L3_OFFSET, L4, Segment, Shape, dsr_rewritten, frame, icmp_frame, reply_packet,
    truncate_ip,
};

use tests::{XDP_DROP, XDP_PASS, XDP_TX};

use tests::datapath_fixture::*;

/// The records in the datapath's flow-change ring: (flow key, backend slot, kind).
fn sync_events(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<(FlowKey, u32, u32)> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<lb_common::FlowSyncEvent>());
        let word = |at: usize| u32::from_ne_bytes(item[at..at + 4].try_into().unwrap());
        let mut key = FlowKey::default();
        key.client_address.copy_from_slice(&item[0..16]);
        key.vip_address.copy_from_slice(&item[16..32]);
        key.client_port.copy_from_slice(&item[32..34]);
        key.vip_port.copy_from_slice(&item[34..36]);
        key.protocol = word(36);
        events.push((key, word(44), word(48)));
    }
    events
}

/// Sends the life of two connections: one opened, used and closed by FIN;
/// one picked up mid-stream (confirmed by a segment a second later), reset,
/// and shown alive by a later segment.
fn two_connections(fixture: &Fixture) -> [Flow; 2] {
    let flows = tcp_flows(38_000, 2);
    fixture.send(flows[0], Segment::Syn);
    for _ in 0..10 {
        fixture.send(flows[0], Segment::Ack);
    }
    fixture.send(flows[0], Segment::Fin);
    fixture.send(flows[0], Segment::Fin);
    fixture.send(flows[1], Segment::Ack);
    fixture.send(flows[1], Segment::Ack);
    std::thread::sleep(std::time::Duration::from_nanos(lb_common::FLOW_CONFIRM_NS + 50_000_000));
    fixture.send(flows[1], Segment::Ack);
    fixture.send(flows[1], Segment::Rst);
    fixture.send(flows[1], Segment::Ack);
    [flows[0], flows[1]]
}

fn the_datapath_reports_each_created_and_closed_flow_once_when_sync_is_on() {
    let mut fixture = Fixture::with(DatapathConfig { sync_flows: true, ..CONFIG });
    let sync = fixture.reconciler.datapath_mut().take_sync().unwrap().expect("the ring");
    let flows = two_connections(&fixture);
    let slot_of = |flow: Flow| {
        let backend = fixture.expected_backend(flow);
        let backends = fixture.reconciler.backends(&vip(TCP4, Protocol::Tcp));
        backends.iter().find(|b| b.address == backend).unwrap().slot
    };
    let (open, closing, reset) =
        (FlowSyncKind::Open as u32, FlowSyncKind::Closing as u32, FlowSyncKind::Reset as u32);
    let (first, second) = (to_key(flows[0]), to_key(flows[1]));
    assert_eq!(
        sync_events(&mut sync.open_ring().unwrap()),
        [
            (first, slot_of(flows[0]), open),
            (first, slot_of(flows[0]), closing),
            (second, slot_of(flows[1]), open),
            (second, slot_of(flows[1]), reset),
            (second, slot_of(flows[1]), open),
        ],
        "the handshake's ACK and a mid-stream pick-up's confirmation open, the first FIN closes, a RST resets and a later segment reopens; SYNs, unconfirmed segments, further established segments and a second FIN report nothing"
    );
    assert_eq!(event(&fixture.flow_events(), FlowEvent::SyncLost), 0);

    // A reader opened again, as by a sync task started again after it died,
    // resumes where the last one stopped: old events are not read twice,
    // new ones are read.
    let mut reopened = sync.open_ring().unwrap();
    assert_eq!(sync_events(&mut reopened), [], "a new reader read old events again");
    let third = tcp_flows(38_100, 1)[0];
    fixture.send(third, Segment::Syn);
    fixture.send(third, Segment::Ack);
    assert_eq!(sync_events(&mut reopened), [(to_key(third), slot_of(third), open)]);

    // Without sync the same traffic reports nothing.
    let mut fixture = Fixture::new();
    let sync = fixture.reconciler.datapath_mut().take_sync().unwrap().expect("the ring");
    two_connections(&fixture);
    assert_eq!(sync_events(&mut sync.open_ring().unwrap()), []);
}

// --- hostile traffic ------------------------------------------------------------

fn icmp_errors_reach_the_backend_of_the_flow_they_quote() {
    let mut fixture = Fixture::new();
    let router4 = ip("198.18.0.254");
    let router6 = ip("fd00:198:18::fe");
    let body = [0u8; 1200];
    let errors4 = [Icmp::FRAGMENTATION_NEEDED, Icmp::PORT_UNREACHABLE, Icmp::TTL_EXCEEDED];
    let errors6 = [Icmp::V6_PACKET_TOO_BIG, Icmp::V6_UNREACHABLE, Icmp::V6_HOP_LIMIT_EXCEEDED];
    let mut failures = Vec::new();
    for (endpoint, l4, client, router, errors, first_port) in [
        (TCP4, L4::Tcp, "198.18.0.1", router4, errors4, 41_000),
        (UDP4, L4::Udp, "198.18.0.1", router4, errors4, 41_100),
        (TCP6, L4::Tcp, "fd00:198:18::1", router6, errors6, 41_200),
        (UDP6, L4::Udp, "fd00:198:18::1", router6, errors6, 41_300),
    ] {
        let protocol = if matches!(l4, L4::Tcp) { Protocol::Tcp } else { Protocol::Udp };
        let this_vip = vip(endpoint, protocol);
        // An established flow, then its backend drained: the Maglev choice
        // moves away, so only following the flow table finds the backend.
        let flow0 = flow(client, first_port, endpoint, l4);
        let backend = establish(&fixture, &[flow0])[0];
        fixture.desired.set_draining(&this_vip, backend, true).unwrap();
        fixture.apply(&HealthMap::new());
        assert_ne!(fixture.expected_backend(flow0), backend, "the Maglev choice moved away");
        let backends = fixture.reconciler.backends(&this_vip);
        let slot = backends.iter().find(|b| b.address == backend).unwrap().slot;
        let icmp_errors = |fixture: &Fixture| {
            fixture.reconciler.datapath().backend_counters(slot).unwrap().icmp_errors
        };
        for icmp in errors {
            let errors_before = icmp_errors(&fixture);
            let input = icmp_frame(router, flow0.vip, icmp, &reply_packet(flow0, &body));
            let (action, output, counted) = run_counted(&fixture, &input, Reason::ForwardedIcmp);
            if (action, counted, icmp_errors(&fixture) - errors_before) != (XDP_TX, 1, 1)
                || output != dsr_rewritten(&input, backend_mac(backend))
            {
                failures.push(format!(
                    "{endpoint} {icmp:?}: action {action}, counted {counted}, to {:02x?}",
                    &output[..6]
                ));
            }
        }
        // A flow without an entry: the error goes where its packets would.
        let fresh = flow(client, first_port + 99, endpoint, l4);
        let input = icmp_frame(router, fresh.vip, errors[0], &reply_packet(fresh, &body));
        let (action, output, _) = run_counted(&fixture, &input, Reason::ForwardedIcmp);
        let maglev = backend_mac(fixture.expected_backend(fresh));
        if action != XDP_TX || output != dsr_rewritten(&input, maglev) {
            failures.push(format!(
                "{endpoint}: an error about a new flow went to {:02x?}",
                &output[..6]
            ));
        }
        fixture.desired.set_draining(&this_vip, backend, false).unwrap();
        fixture.apply(&HealthMap::new());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // An IPv4 error may quote only 8 bytes of the TCP header: the ports suffice.
    let tcp4 = flow("198.18.0.1", 41_500, TCP4, L4::Tcp);
    let short_quote = reply_packet(tcp4, b"");
    let input = icmp_frame(router4, tcp4.vip, Icmp::FRAGMENTATION_NEEDED, &short_quote[..28]);
    let (action, output, counted) = run_counted(&fixture, &input, Reason::ForwardedIcmp);
    assert_eq!((action, counted), (XDP_TX, 1), "an 8-byte quote");
    assert_eq!(output, dsr_rewritten(&input, backend_mac(fixture.expected_backend(tcp4))));

    let tcp6 = flow("fd00:198:18::1", 41_501, TCP6, L4::Tcp);
    let other_port = flow("198.18.0.1", 41_502, "198.18.0.10:81", L4::Tcp);
    let no_backends = flow("198.18.0.1", 41_503, EMPTY4, L4::Tcp);
    let mut not_from_the_vip = reply_packet(tcp4, &body);
    not_from_the_vip[12..16].copy_from_slice(&[198, 18, 0, 99]);
    let frag_needed =
        |to: &str, quote: &[u8]| icmp_frame(router4, ip(to), Icmp::FRAGMENTATION_NEEDED, quote);
    let cases = [
        (
            "echo request to a VIP address",
            icmp_frame(router4, tcp4.vip, Icmp::ECHO_REQUEST, b"ping"),
            XDP_PASS,
            Reason::PassIcmp,
        ),
        (
            "ICMPv6 echo request to a VIP address",
            icmp_frame(router6, tcp6.vip, Icmp::V6_ECHO_REQUEST, b"ping"),
            XDP_PASS,
            Reason::PassIcmp,
        ),
        (
            "an error to an address that is not a VIP's",
            frag_needed("198.18.0.99", &reply_packet(tcp4, &body)),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        (
            "an error quoting the IP header alone (no ports)",
            frag_needed("198.18.0.10", &reply_packet(tcp4, b"")[..20]),
            XDP_DROP,
            Reason::DropIcmpMalformed,
        ),
        (
            "an ICMPv6 error quoting 40 bytes (no ports)",
            icmp_frame(router6, tcp6.vip, Icmp::V6_PACKET_TOO_BIG, &reply_packet(tcp6, b"")[..40]),
            XDP_DROP,
            Reason::DropIcmpMalformed,
        ),
        (
            "an error with a truncated ICMP header",
            truncate_ip(&frag_needed("198.18.0.10", b""), L3_OFFSET + 20 + 4),
            XDP_DROP,
            Reason::DropIcmpMalformed,
        ),
        (
            "an error quoting a port that is no VIP",
            frag_needed("198.18.0.10", &reply_packet(other_port, &body)),
            XDP_DROP,
            Reason::DropIcmpUnmatched,
        ),
        (
            "an error quoting a packet from another address",
            frag_needed("198.18.0.10", &not_from_the_vip),
            XDP_DROP,
            Reason::DropIcmpUnmatched,
        ),
        (
            "an error about a VIP without backends",
            frag_needed("198.18.0.20", &reply_packet(no_backends, &body)),
            XDP_DROP,
            Reason::DropIcmpUnmatched,
        ),
    ];
    for (description, input, want_action, reason) in cases {
        let (action, output, counted) = run_counted(&fixture, &input, reason);
        assert_eq!((action, counted), (want_action, 1), "{description}: {reason:?}");
        assert_eq!(output, input, "{description}: changed");
    }
}

fn a_forged_rst_does_not_unpin_a_flow() {
    let mut fixture = Fixture::new();
    let flows = tcp_flows(42_000, 300);
    let before = establish(&fixture, &flows);
    add_fourth_backend(&mut fixture);
    let moved = flows.iter().zip(&before).filter(|(f, b)| fixture.expected_backend(**f) != **b);
    assert!(moved.count() > 30, "the table change moved too few flows to show anything");
    // Out-of-window RSTs (the backend ignores them), then the connections go on.
    let reset: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Rst)).collect();
    assert_eq!(reset, before, "the RSTs themselves reach the flows' backends");
    let reopened_before = event(&fixture.flow_events(), FlowEvent::Reopened);
    let after: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    assert_eq!(after, before, "a RST unpinned established flows");
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Reopened) - reopened_before, 300);
    let active: u64 = fixture.reconciler.datapath().active_flows().values().sum();
    assert_eq!(active, 300, "reopened flows count as active again");
}

fn a_reused_backend_slot_does_not_inherit_the_old_backends_flows() {
    // Every slot in use (12 backends over the fixture's VIPs), so the slot
    // a removed backend frees is the one the next backend gets.
    let mut fixture = Fixture::with(DatapathConfig { max_backends: 12, ..CONFIG });
    let vip4 = vip(TCP4, Protocol::Tcp);
    let flows = tcp_flows(43_000, 300);
    let before = establish(&fixture, &flows);
    let slot_of = |fixture: &Fixture, address| {
        fixture.reconciler.backends(&vip4).iter().find(|b| b.address == address).unwrap().slot
    };
    let removed = ip(V4_BACKENDS[0]);
    let slot = slot_of(&fixture, removed);
    fixture.desired.remove_backend(&vip4, removed).unwrap();
    fixture.apply(&HealthMap::new());
    let newcomer = ip("198.18.1.4");
    fixture.desired.add_backend(&vip4, BackendSpec::new(newcomer, 1), LIMITS).unwrap();
    fixture.reconciler.set_mac(newcomer, backend_mac(newcomer));
    fixture.apply(&HealthMap::new());
    assert_eq!(slot_of(&fixture, newcomer), slot, "the newcomer took the removed backend's slot");

    // The old backend's entries still name the slot: none counts for the newcomer.
    let active = fixture.reconciler.datapath().active_flows();
    assert_eq!(active.get(&slot).copied().unwrap_or(0), 0, "ACTIVE FLOWS of a fresh backend");
    let orphans = before.iter().filter(|b| **b == removed).count() as u64;
    assert!(orphans > 50);
    let rescued_before = event(&fixture.flow_events(), FlowEvent::Rescued);
    assert_only_the_removed_backends_flows_move(&fixture, &flows, &before, removed);
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Rescued) - rescued_before, orphans);
}

/// `count` spoofed frames of one kind to `endpoint`, from distinct tuples
/// (client addresses 198.18.`network`.1 onwards, 60,000 ports each), each
/// sent twice in a row: the kernel's LRU keeps what was looked up again
/// longest.
fn flood(
    fixture: &Fixture,
    endpoint: &str,
    (l4, segment): (L4, Segment),
    network: u8,
    count: u32,
) -> u32 {
    for index in 0..count {
        let client = format!("198.18.{network}.{}", index / 60_000 + 1);
        let spoofed = flow(&client, (1024 + index % 60_000) as u16, endpoint, l4);
        let input = frame(spoofed, Shape { segment, ..Shape::default() }, b"");
        for _ in 0..2 {
            fixture.reconciler.datapath().test_run(&input).unwrap();
        }
    }
    count
}

fn spoofed_floods_never_evict_confirmed_flows() {
    const TABLE: u32 = 4_096;
    let mut fixture = Fixture::with(DatapathConfig { flow_table_size: TABLE, ..CONFIG });
    // Established flows, and half-open ones (a SYN, no ACK yet).
    let established = tcp_flows(44_000, 1_000);
    let pinned = establish(&fixture, &established);
    let half_open = tcp_flows(46_000, 1_000);
    let half_pinned: Vec<IpAddr> =
        half_open.iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    add_fourth_backend(&mut fixture);

    let events_before = fixture.flow_events();
    // Distinct tuples per kind: a SYN and then an ACK of the same spoofed
    // tuple would be a handshake, which confirms (see the README).
    let tuples = flood(&fixture, TCP4, (L4::Tcp, Segment::Syn), 100, 3 * TABLE)
        + flood(&fixture, TCP4, (L4::Tcp, Segment::Ack), 101, 3 * TABLE)
        + flood(&fixture, UDP4, (L4::Udp, Segment::Syn), 102, 3 * TABLE);
    let events = fixture.flow_events();
    let delta = |which| event(&events, which) - event(&events_before, which);
    println!(
        "FIGURE flood of {tuples} tuples (each twice), flow table {TABLE}: created {}, miss_fallback {}, new_hit {}, confirmed {}",
        delta(FlowEvent::Created),
        delta(FlowEvent::MissFallback),
        delta(FlowEvent::NewHit),
        delta(FlowEvent::Confirmed),
    );
    assert_eq!(delta(FlowEvent::Confirmed), 0, "a spoofed tuple was confirmed");

    let after: Vec<IpAddr> = established.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    assert_eq!(after, pinned, "the flood unpinned established flows");
    // What the flood does to pins in a table it reaches: half-open flows
    // lost theirs, and the ACKs of those whose choice moved go elsewhere.
    let moved = half_open
        .iter()
        .zip(&half_pinned)
        .filter(|(f, old)| fixture.send(**f, Segment::Ack) != **old)
        .count();
    println!("FIGURE half-open flows re-chosen after the flood: {moved} of 1000");
    assert!(moved > 100, "the flood did not reach the unconfirmed table ({moved} moved)");
}

tests::root_tests!(
    the_datapath_reports_each_created_and_closed_flow_once_when_sync_is_on,
    icmp_errors_reach_the_backend_of_the_flow_they_quote,
    a_forged_rst_does_not_unpin_a_flow,
    a_reused_backend_slot_does_not_inherit_the_old_backends_flows,
    spoofed_floods_never_evict_confirmed_flows,
);
