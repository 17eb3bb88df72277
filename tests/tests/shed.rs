//! The rebalancer's close in the datapath, through BPF_PROG_TEST_RUN on the
//! real XDP object: a marked flow's next client packet leaves as a RST to
//! its backend (every byte checked, checksums by etherparse's own
//! arithmetic) and the flow's pin is gone; a stale mark, a SYN, a RST or a
//! UDP flow are left alone; a census counts what the marks do.

use std::net::IpAddr;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_common::{FLOW_FLAG_SHED, FlowEvent, FlowKey, PROTO_TCP, PROTO_UDP, SHED_TTL_NS};
use lb_userspace::datapath::{Maps as _, monotonic_ns};
use lb_userspace::model::{DatapathConfig, Protocol, TunnelConfig};
use lb_userspace::reconcile::Reconciler;
use tests::XDP_TX;
use tests::fixture::{addresses, backend_mac, balancer};
use tests::packets::{BALANCER_MAC, Flow, L4, Segment, Shape, frame};

const CONFIG: DatapathConfig = DatapathConfig {
    hash_seed: 0x5eed,
    table_size: 251,
    max_vips: 4,
    max_backends: 16,
    flow_table_size: 4_096,
    udp_idle_timeout_ms: 30_000,
    tcp_idle_timeout_ms: 3_600_000,
    sync_flows: false,
    own_mac: BALANCER_MAC,
    tunnel: TunnelConfig::NONE,
};

const V4_BACKENDS: [&str; 3] = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
const V6_BACKENDS: [&str; 2] = ["fd00:198:18:1::1", "fd00:198:18:1::2"];

fn fixture() -> Reconciler {
    let (v4, v6) = (addresses(&V4_BACKENDS), addresses(&V6_BACKENDS));
    let vips = [
        ("198.18.0.10:80", Protocol::Tcp, &v4[..]),
        ("198.18.0.10:53", Protocol::Udp, &v4[..]),
        ("[fd00:198:18::10]:80", Protocol::Tcp, &v6[..]),
    ];
    balancer(CONFIG, &vips, backend_mac).expect("load the XDP object").0
}

fn flow(client: &str, port: u16, vip: &str, vip_port: u16, l4: L4) -> Flow {
    let (client, vip): (IpAddr, IpAddr) = (client.parse().unwrap(), vip.parse().unwrap());
    Flow { client, client_port: port, vip, vip_port, l4 }
}

fn key(flow: Flow) -> FlowKey {
    let protocol = if matches!(flow.l4, L4::Tcp) { PROTO_TCP } else { PROTO_UDP };
    FlowKey::new(flow.client, flow.client_port, flow.vip, flow.vip_port, protocol)
}

fn run(reconciler: &Reconciler, flow: Flow, segment: Segment, payload: &[u8]) -> Vec<u8> {
    let input = frame(flow, Shape { segment, ..Shape::default() }, payload);
    let (action, output) = reconciler.datapath().test_run(&input).unwrap();
    assert_eq!(action, XDP_TX, "{flow:?} {segment:?} was not forwarded");
    output
}

/// A confirmed flow (SYN, then the handshake's ACK).
fn establish(reconciler: &Reconciler, flow: Flow) {
    run(reconciler, flow, Segment::Syn, b"");
    run(reconciler, flow, Segment::Ack, b"");
    assert!(reconciler.datapath().flow(&key(flow)).is_some(), "{flow:?} not confirmed");
}

/// Marks the flow as the rebalancer does, as of `at_ns`.
fn mark(reconciler: &Reconciler, flow: Flow, at_ns: u64) {
    let mut marker = reconciler.datapath().flow_marker().unwrap();
    let entry = reconciler.datapath().flow(&key(flow)).unwrap();
    assert!(marker.mark(&key(flow), &entry, at_ns), "{flow:?} not marked");
}

fn every_backend() -> impl Iterator<Item = IpAddr> {
    addresses(&V4_BACKENDS).into_iter().chain(addresses(&V6_BACKENDS))
}

fn shed_count(reconciler: &Reconciler) -> u64 {
    let events = reconciler.datapath().flow_event_counters().unwrap();
    events.iter().find(|(event, _)| *event == FlowEvent::Shed).unwrap().1
}

/// Checks `output` is `input` turned into a RST: the MACs of DSR, the same
/// IP header but for its length and checksum, the same TCP header but for
/// the flags (RST, ACK kept), window, urgent pointer and checksum, and no
/// payload; both checksums right.
fn assert_reset_of(input: &[u8], output: &[u8], backend: IpAddr) {
    assert_eq!(output[0..6], backend_mac(backend), "not sent to the flow's backend");
    assert_eq!(output[6..12], BALANCER_MAC);
    let before = SlicedPacket::from_ethernet(input).unwrap();
    let after = SlicedPacket::from_ethernet(output).unwrap();
    let (Some(TransportSlice::Tcp(old)), Some(TransportSlice::Tcp(new))) =
        (&before.transport, &after.transport)
    else {
        panic!("not TCP");
    };
    assert!(!old.payload().is_empty(), "the input must carry data to show it is cut");
    assert!(new.payload().is_empty(), "the RST kept the payload");
    let header_len = old.slice().len() - old.payload().len();
    assert_eq!(output.len(), input.len() - old.payload().len(), "frame length");
    assert!(new.rst() && new.ack() && !new.psh() && !new.fin() && !new.syn());
    assert_eq!(
        (new.source_port(), new.destination_port(), new.sequence_number()),
        (old.source_port(), old.destination_port(), old.sequence_number())
    );
    assert_eq!(new.acknowledgment_number(), old.acknowledgment_number());
    assert_eq!((new.window_size(), new.urgent_pointer()), (0, 0));
    assert_eq!(new.slice()[20..header_len], old.slice()[20..header_len], "TCP options changed");
    let header = new.to_header();
    match (&after.net, &before.net) {
        (Some(NetSlice::Ipv4(ip)), Some(NetSlice::Ipv4(old_ip))) => {
            let ip_header = ip.header().to_header();
            assert_eq!(ip_header.total_len as usize, ip.header().slice().len() + header_len);
            assert_eq!(
                ip_header.header_checksum,
                ip_header.calc_header_checksum(),
                "IPv4 checksum"
            );
            let mut same = old_ip.header().to_header();
            same.total_len = ip_header.total_len;
            same.header_checksum = ip_header.header_checksum;
            assert_eq!(same, ip_header, "IPv4 header changed beyond its length");
            let want = header.calc_checksum_ipv4(&ip_header, &[]).unwrap();
            assert_eq!(header.checksum, want, "TCP checksum over IPv4");
        }
        (Some(NetSlice::Ipv6(ip)), Some(NetSlice::Ipv6(_))) => {
            let ip_header = ip.header().to_header();
            assert_eq!(ip_header.payload_length as usize, header_len);
            let want = header.calc_checksum_ipv6(&ip_header, &[]).unwrap();
            assert_eq!(header.checksum, want, "TCP checksum over IPv6");
        }
        _ => panic!("families differ"),
    }
}

fn a_marked_flows_next_packet_reaches_its_backend_as_a_rst_and_unpins_it() {
    let reconciler = fixture();
    for flow in [
        flow("198.18.0.100", 40_000, "198.18.0.10", 80, L4::Tcp),
        flow("fd00:198:18::100", 40_000, "fd00:198:18::10", 80, L4::Tcp),
    ] {
        establish(&reconciler, flow);
        let entry = reconciler.datapath().flow(&key(flow)).unwrap();
        let backend = reconciler.datapath().backend(entry.backend_slot).unwrap();
        let backend = every_backend().find(|b| backend_mac(*b) == backend.mac).unwrap();
        mark(&reconciler, flow, monotonic_ns());
        let shed_before = shed_count(&reconciler);

        let input = frame(flow, Shape { segment: Segment::Ack, ..Shape::default() }, b"ping!ping!");
        let (action, output) = reconciler.datapath().test_run(&input).unwrap();
        assert_eq!(action, XDP_TX);
        assert_reset_of(&input, &output, backend);
        assert_eq!(shed_count(&reconciler) - shed_before, 1, "the close was not counted");
        assert!(reconciler.datapath().flow(&key(flow)).is_none(), "the pin survived its RST");

        // The client's retransmission finds no pin: forwarded unchanged, as
        // a packet picked up mid-stream (the backend answers it with a RST).
        let again = frame(flow, Shape { segment: Segment::Ack, ..Shape::default() }, b"ping!");
        let (_, output) = reconciler.datapath().test_run(&again).unwrap();
        assert_eq!(output[12..], again[12..], "a second packet was rewritten");
        assert_eq!(shed_count(&reconciler) - shed_before, 1);
    }
}

fn stale_marks_syns_rsts_and_udp_flows_are_left_alone() {
    let reconciler = fixture();
    let unchanged = |flow: Flow, segment: Segment| {
        let input = frame(flow, Shape { segment, ..Shape::default() }, b"data");
        let output = run(&reconciler, flow, segment, b"data");
        assert_eq!(output[12..], input[12..], "{flow:?} {segment:?} was rewritten");
    };

    let stale = flow("198.18.0.101", 40_001, "198.18.0.10", 80, L4::Tcp);
    establish(&reconciler, stale);
    mark(&reconciler, stale, monotonic_ns() - SHED_TTL_NS - 1_000_000_000);
    unchanged(stale, Segment::Ack);
    let entry = reconciler.datapath().flow(&key(stale)).expect("a stale mark unpinned the flow");
    assert_eq!(entry.flags & FLOW_FLAG_SHED, 0, "the stale mark was not cleared");

    let reopened = flow("198.18.0.102", 40_002, "198.18.0.10", 80, L4::Tcp);
    establish(&reconciler, reopened);
    mark(&reconciler, reopened, monotonic_ns());
    // A SYN on a marked entry is not the marked connection; the client's
    // RST closes it by itself.
    unchanged(reopened, Segment::Syn);
    let reset = flow("198.18.0.105", 40_005, "198.18.0.10", 80, L4::Tcp);
    establish(&reconciler, reset);
    mark(&reconciler, reset, monotonic_ns());
    unchanged(reset, Segment::Rst);

    let udp = flow("198.18.0.103", 40_003, "198.18.0.10", 53, L4::Udp);
    let confirm = |flow| {
        run(&reconciler, flow, Segment::Ack, b"one");
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        run(&reconciler, flow, Segment::Ack, b"two");
    };
    confirm(udp);
    mark(&reconciler, udp, monotonic_ns());
    unchanged(udp, Segment::Ack);
    assert_eq!(shed_count(&reconciler), 0, "something was closed");
}

fn a_census_counts_marks_as_pending_and_offers_only_recent_unmarked_tcp_flows() {
    let reconciler = fixture();
    let flows: Vec<Flow> = (0..60)
        .map(|port| flow("198.18.0.104", 41_000 + port, "198.18.0.10", 80, L4::Tcp))
        .collect();
    for flow in &flows {
        establish(&reconciler, *flow);
    }
    let entries: Vec<_> =
        flows.iter().map(|f| reconciler.datapath().flow(&key(*f)).unwrap()).collect();
    let vip_index = entries[0].vip_index;
    let mut slots: Vec<(u32, u32)> =
        entries.iter().map(|e| (e.backend_slot, e.generation)).collect();
    slots.sort();
    slots.dedup();
    assert_eq!(slots.len(), 3, "60 flows should reach all three backends");
    let mut marker = reconciler.datapath().flow_marker().unwrap();
    let now = monotonic_ns();
    let census = marker.census(vip_index, &slots, now, 3_000_000_000);
    let slot = slots[0].0;
    let on_slot = census[&slot].active;
    assert_eq!(census.values().map(|c| c.active).sum::<u64>(), 60);
    assert_eq!(census[&slot].candidates.len() as u64, on_slot);

    let (marked_key, marked_entry) = census[&slot].candidates[0];
    assert!(marker.mark(&marked_key, &marked_entry, now));
    assert!(!marker.mark(&marked_key, &marked_entry, now), "marked twice");
    let census = marker.census(vip_index, &slots, monotonic_ns(), 3_000_000_000);
    assert_eq!((census[&slot].active, census[&slot].pending), (on_slot, 1));
    assert_eq!(census[&slot].candidates.len() as u64, on_slot - 1, "a marked flow offered again");
    assert!(marker.settle(monotonic_ns()).is_empty(), "closed before any packet");

    let marked = flows.iter().find(|f| key(**f) == marked_key).unwrap();
    run(&reconciler, *marked, Segment::Ack, b"data");
    assert_eq!(marker.settle(monotonic_ns()), [(vip_index, slot)], "the close went unseen");
    let census = marker.census(vip_index, &slots, monotonic_ns(), 3_000_000_000);
    assert_eq!((census[&slot].active, census[&slot].pending), (on_slot - 1, 0));
    // Ten seconds on, none of these flows has sent a packet recently.
    let later = monotonic_ns() + 10_000_000_000;
    assert!(marker.census(vip_index, &slots, later, 3_000_000_000)[&slot].candidates.is_empty());
}

tests::root_tests!(
    a_marked_flows_next_packet_reaches_its_backend_as_a_rst_and_unpins_it,
    stale_marks_syns_rsts_and_udp_flows_are_left_alone,
    a_census_counts_marks_as_pending_and_offers_only_recent_unmarked_tcp_flows,
);
