//! Datapath tests: the real XDP object, maps filled by the real reconcile
//! step, packets run through BPF_PROG_TEST_RUN, whole output frames
//! compared: every kind of packet's action, output and counter, where flows
//! land, and the per-VIP and per-backend counters. The flow table's
//! behaviour is in flow_table.rs, sync reports, ICMP errors and hostile
//! segments in flow_integrity.rs (fixture: tests/src/datapath_fixture.rs).

use std::net::IpAddr;

use lb_common::Reason;
use lb_userspace::model::{HealthMap, Protocol};
use tests::fixture::backend_mac;
use tests::packets::{
    BALANCER_MAC, Flow, L3_OFFSET, L4, Shape, dsr_rewritten, frame, insert_ipv6_extensions,
    make_ipv4_fragment, truncate_ip,
};

use tests::{XDP_DROP, XDP_PASS, XDP_TX};

use tests::datapath_fixture::*;

enum Expect {
    /// XDP_TX to the backend lookup names, only the MACs rewritten.
    Forward(Flow),
    /// Returned with the given action, every byte unchanged.
    Untouched(u32),
}

struct Case {
    description: &'static str,
    input: Vec<u8>,
    expect: Expect,
    reason: Reason,
}

fn cases() -> Vec<Case> {
    let tcp4 = flow("198.18.0.1", 40_000, TCP4, L4::Tcp);
    let udp4 = flow("198.18.0.1", 40_001, UDP4, L4::Udp);
    let tcp6 = flow("fd00:198:18::1", 40_002, TCP6, L4::Tcp);
    let udp6 = flow("fd00:198:18::1", 40_003, UDP6, L4::Udp);
    let plain = Shape::default();
    let payload = b"hello backend";
    let forward = |description, input, flow| Case {
        description,
        input,
        expect: Expect::Forward(flow),
        reason: Reason::Forwarded,
    };
    let untouched = |description, input, action, reason| Case {
        description,
        input,
        expect: Expect::Untouched(action),
        reason,
    };

    let mut ipv4_bad_ihl = frame(tcp4, plain, payload);
    ipv4_bad_ihl[L3_OFFSET] = 0x44;
    let mut ipv4_bad_version = frame(tcp4, plain, payload);
    ipv4_bad_version[L3_OFFSET] = 0x55;
    let mut ipv4_ihl_past_end = frame(tcp4, plain, b"");
    ipv4_ihl_past_end[L3_OFFSET] = 0x4f;
    ipv4_ihl_past_end.truncate(L3_OFFSET + 40);
    let mut first_fragment = frame(udp4, plain, payload);
    make_ipv4_fragment(&mut first_fragment, true, 0);
    let mut later_fragment = frame(udp4, plain, payload);
    make_ipv4_fragment(&mut later_fragment, false, 100);
    let mut fragment_not_ours =
        frame(flow("198.18.0.1", 1, "198.18.0.99:53", L4::Udp), plain, payload);
    make_ipv4_fragment(&mut fragment_not_ours, true, 0);
    let truncated_tcp = truncate_ip(&frame(tcp4, plain, b""), L3_OFFSET + 20 + 10);
    let mut ip_longer_than_frame = frame(tcp4, plain, payload);
    ip_longer_than_frame.truncate(ip_longer_than_frame.len() - 4);
    let truncated_tcp_not_ours = truncate_ip(
        &frame(flow("198.18.0.1", 1, "198.18.0.99:80", L4::Tcp), plain, b""),
        L3_OFFSET + 20 + 10,
    );

    let mut arp = BALANCER_MAC.to_vec();
    arp.extend_from_slice(&tests::packets::CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let to_mac = |mac: [u8; 6]| {
        let mut input = frame(tcp4, plain, payload);
        input[..6].copy_from_slice(&mac);
        input
    };
    let mut icmp_to_vip = frame(tcp4, plain, payload);
    icmp_to_vip[L3_OFFSET + 9] = 1;
    // A third tag: splice an 802.1Q tag in front of a QinQ frame's tags.
    let qinq = frame(tcp4, Shape { vlans: &[100, 200], ..plain }, payload);
    let mut three_tags = qinq[..12].to_vec();
    three_tags.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
    three_tags.extend_from_slice(&qinq[12..]);

    vec![
        forward("IPv4 TCP SYN to a VIP", frame(tcp4, plain, payload), tcp4),
        forward("IPv4 UDP to a VIP", frame(udp4, plain, payload), udp4),
        forward("IPv6 TCP to a VIP", frame(tcp6, plain, payload), tcp6),
        forward("IPv6 UDP to a VIP", frame(udp6, plain, payload), udp6),
        forward("one 802.1Q tag", frame(tcp4, Shape { vlans: &[100], ..plain }, payload), tcp4),
        forward(
            "two VLAN tags (QinQ), IPv6",
            frame(udp6, Shape { vlans: &[100, 200], ..plain }, payload),
            udp6,
        ),
        forward(
            "IPv4 with 8 bytes of options (IHL 7)",
            frame(tcp4, Shape { ipv4_options: &[1, 1, 1, 1, 1, 1, 1, 0], ..plain }, payload),
            tcp4,
        ),
        forward(
            "IPv6 hop-by-hop and destination options before UDP",
            insert_ipv6_extensions(&frame(udp6, plain, payload), &[(0, 8), (60, 16)]),
            udp6,
        ),
        forward(
            "IPv6 authentication header before TCP",
            insert_ipv6_extensions(&frame(tcp6, plain, payload), &[(51, 16)]),
            tcp6,
        ),
        untouched(
            "to a VIP, but for another balancer's MAC (flooded by a switch)",
            to_mac([0x02, 0, 0, 0, 0, 0x0c]),
            XDP_PASS,
            Reason::PassNotForUs,
        ),
        untouched("to a VIP, broadcast", to_mac([0xff; 6]), XDP_PASS, Reason::PassNotForUs),
        untouched(
            "to a VIP, multicast",
            to_mac([0x01, 0x00, 0x5e, 0, 0, 1]),
            XDP_PASS,
            Reason::PassNotForUs,
        ),
        untouched(
            "TCP to a non-VIP address",
            frame(flow("198.18.0.1", 22, "198.18.0.99:22", L4::Tcp), plain, payload),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched(
            "TCP to a non-VIP address, on a VIP's port",
            frame(flow("198.18.0.1", 22, "198.18.0.99:80", L4::Tcp), plain, payload),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched(
            "VIP address, port without a VIP",
            frame(flow("198.18.0.1", 1234, "198.18.0.10:81", L4::Tcp), plain, payload),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched(
            "VIP address and port, other protocol",
            frame(flow("198.18.0.1", 1234, "198.18.0.10:80", L4::Udp), plain, payload),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched(
            "ICMP that is not an error, to a VIP address",
            icmp_to_vip,
            XDP_PASS,
            Reason::PassIcmp,
        ),
        untouched("ARP", arp, XDP_PASS, Reason::PassNotIp),
        // BPF_PROG_TEST_RUN (like every driver) refuses frames under 14 bytes,
        // so the shortest malformed frame is one whose VLAN tag is cut short.
        untouched(
            "VLAN tag truncated",
            frame(tcp4, Shape { vlans: &[100], ..plain }, payload)[..16].to_vec(),
            XDP_PASS,
            Reason::PassMalformed,
        ),
        untouched(
            "IPv4 header truncated",
            frame(tcp4, plain, payload)[..L3_OFFSET + 12].to_vec(),
            XDP_PASS,
            Reason::PassMalformed,
        ),
        untouched("IPv4 IHL below 5", ipv4_bad_ihl, XDP_PASS, Reason::PassMalformed),
        untouched("version 5 in an IPv4 frame", ipv4_bad_version, XDP_PASS, Reason::PassMalformed),
        untouched("IPv4 IHL past the end", ipv4_ihl_past_end, XDP_PASS, Reason::PassMalformed),
        untouched(
            "IPv6 header truncated",
            frame(tcp6, plain, payload)[..L3_OFFSET + 30].to_vec(),
            XDP_PASS,
            Reason::PassMalformed,
        ),
        untouched("three VLAN tags", three_tags, XDP_PASS, Reason::PassVlanDepth),
        untouched(
            "IPv4 total length past the end of the frame",
            ip_longer_than_frame,
            XDP_PASS,
            Reason::PassMalformed,
        ),
        untouched(
            "TCP header truncated, to a VIP",
            truncated_tcp,
            XDP_DROP,
            Reason::DropMalformedL4,
        ),
        untouched(
            "TCP header truncated, not ours",
            truncated_tcp_not_ours,
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched("IPv4 first fragment to a VIP", first_fragment, XDP_DROP, Reason::DropFragment),
        untouched("IPv4 later fragment to a VIP", later_fragment, XDP_DROP, Reason::DropFragment),
        untouched("IPv4 fragment, not ours", fragment_not_ours, XDP_PASS, Reason::PassNotVip),
        untouched(
            "IPv6 fragment header to a VIP",
            insert_ipv6_extensions(&frame(udp6, plain, payload), &[(44, 8)]),
            XDP_DROP,
            Reason::DropFragment,
        ),
        untouched(
            "IPv6 ESP to a VIP",
            insert_ipv6_extensions(&frame(udp6, plain, payload), &[(50, 8)]),
            XDP_DROP,
            Reason::DropUnhashable,
        ),
        untouched(
            "IPv6 chain longer than the walk, to a VIP",
            insert_ipv6_extensions(
                &frame(udp6, plain, payload),
                &[(0, 8), (60, 8), (60, 8), (60, 8), (60, 8)],
            ),
            XDP_DROP,
            Reason::DropUnhashable,
        ),
        untouched(
            "IPv6 extension header truncated, to a VIP",
            truncate_ip(
                &insert_ipv6_extensions(&frame(udp6, plain, b""), &[(0, 8)]),
                L3_OFFSET + 41,
            ),
            XDP_DROP,
            Reason::DropMalformedL4,
        ),
        untouched(
            "VIP without backends",
            frame(flow("198.18.0.1", 5555, EMPTY4, L4::Tcp), plain, payload),
            XDP_DROP,
            Reason::DropNoBackend,
        ),
    ]
}

fn every_case_gives_the_expected_action_output_and_counter() {
    let fixture = Fixture::new();
    let mut failures = Vec::new();
    for case in cases() {
        let before = fixture.reason_count(case.reason);
        let (action, output) = fixture.reconciler.datapath().test_run(&case.input).unwrap();
        let (want_action, want_output) = match case.expect {
            Expect::Forward(flow) => {
                (XDP_TX, dsr_rewritten(&case.input, backend_mac(fixture.expected_backend(flow))))
            }
            Expect::Untouched(action) => (action, case.input.clone()),
        };
        let counted = fixture.reason_count(case.reason) - before;
        if action != want_action || output != want_output || counted != 1 {
            failures.push(format!(
                "{}: action {action} (want {want_action}), output {} , {:?} counted {counted} times",
                case.description,
                if output == want_output { "as expected" } else { "DIFFERS" },
                case.reason,
            ));
        }
    }
    assert!(failures.is_empty(), "failing cases:\n{}", failures.join("\n"));
}

fn flows_spread_over_all_backends_exactly_where_lookup_says() {
    let mut fixture = Fixture::new();
    let vip4 = vip(TCP4, Protocol::Tcp);
    let landed = |fixture: &Fixture| {
        let mut landed: Vec<IpAddr> = Vec::new();
        for port in 0..600u16 {
            let flow = flow("198.18.0.1", 20_000 + port, TCP4, L4::Tcp);
            let input = frame(flow, Shape::default(), b"x");
            let (action, output) = fixture.reconciler.datapath().test_run(&input).unwrap();
            assert_eq!(action, XDP_TX);
            let backend = fixture.expected_backend(flow);
            assert_eq!(output, dsr_rewritten(&input, backend_mac(backend)), "port {port}");
            assert_eq!(&output[6..12], &BALANCER_MAC, "source MAC is the balancer's");
            landed.push(backend);
        }
        landed
    };
    let before = landed(&fixture);
    for backend in V4_BACKENDS {
        let share = before.iter().filter(|landed| **landed == ip(backend)).count();
        assert!((150..=250).contains(&share), "{backend} got {share} of 600 flows");
    }

    // Remove one backend: nothing goes to it any more, and the flows of the
    // others (apart from Maglev's small extra movement) stay where they were.
    let removed = ip(V4_BACKENDS[1]);
    fixture.desired.remove_backend(&vip4, removed).unwrap();
    fixture.reconciler.apply(&fixture.desired, &HealthMap::new()).unwrap();
    let after = landed(&fixture);
    assert!(!after.contains(&removed));
    let kept = before.iter().zip(&after).filter(|(b, a)| **b != removed && b == a).count();
    let others = before.iter().filter(|b| **b != removed).count();
    assert!(kept as f64 >= others as f64 * 0.97, "{kept} of {others} flows kept their backend");
}

fn counters_count_packets_and_bytes_per_vip_and_backend() {
    let fixture = Fixture::new();
    let vip4 = vip(UDP4, Protocol::Udp);
    let flow = flow("198.18.0.7", 7777, UDP4, L4::Udp);
    let input = frame(flow, Shape::default(), &[0u8; 100]);
    for _ in 0..5 {
        fixture.reconciler.datapath().test_run(&input).unwrap();
    }
    let index = fixture.reconciler.vip_index(&vip4).unwrap();
    let vip_counters = fixture.reconciler.datapath().vip_counters(index).unwrap();
    assert_eq!((vip_counters.packets, vip_counters.bytes), (5, 5 * input.len() as u64));
    let target = fixture.expected_backend(flow);
    for backend in fixture.reconciler.backends(&vip4) {
        let counters = fixture.reconciler.datapath().backend_counters(backend.slot).unwrap();
        let want = if backend.address == target { 5 } else { 0 };
        assert_eq!(counters.packets, want, "backend {}", backend.address);
    }
}

// --- the flow table -----------------------------------------------------------

tests::root_tests!(
    every_case_gives_the_expected_action_output_and_counter,
    flows_spread_over_all_backends_exactly_where_lookup_says,
    counters_count_packets_and_bytes_per_vip_and_backend,
);
