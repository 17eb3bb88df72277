//! Tunnelled forwarding (`ipip`, `gue`) in the datapath, through
//! BPF_PROG_TEST_RUN on the real XDP object: every output frame is compared
//! byte for byte with one built here with etherparse's headers and
//! checksums (the Ethernet header to the next hop, the outer IP header, for
//! GUE the UDP header, then the client's packet unchanged), and every frame
//! is dissected again by scapy (Debian's), which recomputes every checksum,
//! so that a backend with the kernel's ipip or fou would take it. Also: VLAN
//! tags kept, an ICMP error about a flow tunnelled like the flow, a packet
//! that would exceed the MTU and a family without a tunnel source dropped
//! and counted, and a DSR VIP beside them unchanged.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use etherparse::Ipv4Header;
use lb_common::{Reason, tunnel_entropy};
use lb_userspace::model::{ForwardingMode, TunnelConfig};
use lb_userspace::reconcile::Reconciler;
use tests::fixture::backend_mac;
use tests::packets::{
    Flow, Icmp, L4, Segment, Shape, frame, icmp_frame, insert_ipv6_extensions, reply_packet,
};
use tests::tunnel_frames::{expected, expected_from, too_big_answer};
use tests::tunnels::{
    GUE_PORT, SOURCE_V4, SOURCE_V6, TUNNEL, backend_of, fixture, flow, flows, key, mode_of,
};
use tests::{XDP_DROP, XDP_TX};

fn reason_count(reconciler: &Reconciler, reason: Reason) -> u64 {
    let counters = reconciler.datapath().reason_counters().unwrap();
    counters.iter().find(|(each, _)| *each == reason).unwrap().1
}

/// scapy's reading of each frame (tests/dissect_tunnels.py), one JSON
/// object per frame.
fn dissect(frames: &[Vec<u8>]) -> Vec<serde_json::Value> {
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("frames.pcap");
    let mut file = Vec::new();
    // pcap: magic, version 2.4, zone, accuracy, snaplen, Ethernet.
    file.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    file.extend_from_slice(&2u16.to_le_bytes());
    file.extend_from_slice(&4u16.to_le_bytes());
    for word in [0u32, 0, 65_535, 1] {
        file.extend_from_slice(&word.to_le_bytes());
    }
    for frame in frames {
        let length = frame.len() as u32;
        for word in [0u32, 0, length, length] {
            file.extend_from_slice(&word.to_le_bytes());
        }
        file.extend_from_slice(frame);
    }
    std::fs::write(&pcap, file).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/dissect_tunnels.py");
    let output = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(&pcap)
        .output()
        .expect("run Debian's python3 (scripts/setup.sh installs python3-scapy)");
    assert!(output.status.success(), "scapy: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// What scapy must read in a tunnel frame of `flow` to `backend` in `mode`.
fn assert_dissected(
    seen: &serde_json::Value,
    flow: &Flow,
    backend: IpAddr,
    mode: ForwardingMode,
    what: &str,
) {
    let v4 = backend.is_ipv4();
    assert_eq!(seen["outer"], if v4 { "IP" } else { "IPv6" }, "{what}: {seen}");
    let source = if v4 { IpAddr::V4(SOURCE_V4) } else { IpAddr::V6(SOURCE_V6) };
    assert_eq!(seen["src"], source.to_string(), "{what}: {seen}");
    assert_eq!(seen["dst"], backend.to_string(), "{what}: {seen}");
    let proto = match (mode, v4) {
        (ForwardingMode::Gue, _) => 17,
        (_, true) => 4,
        (_, false) => 41,
    };
    assert_eq!(seen["proto"], proto, "{what}: {seen}");
    assert_eq!(seen["checksums_ok"], true, "{what}: scapy computes other checksums: {seen}");
    if mode == ForwardingMode::Gue {
        assert_eq!(seen["dport"], GUE_PORT, "{what}: {seen}");
        let sport = seen["sport"].as_u64().unwrap();
        assert!((0xc000..=0xffff).contains(&sport), "{what}: source port {sport}");
        if !v4 {
            assert_ne!(seen["udp_checksum"], 0, "{what}: a zero UDP checksum over IPv6");
        }
    }
    let inner = &seen["inner"];
    assert_eq!(inner["src"], flow.client.to_string(), "{what}: {seen}");
    assert_eq!(inner["dst"], flow.vip.to_string(), "{what}: {seen}");
    assert_eq!(inner["checksums_ok"], true, "{what}: the inner packet changed: {seen}");
}

#[test]
fn tunnelled_frames_are_whole_and_standard_byte_for_byte_and_by_scapy() {
    let reconciler = fixture(TUNNEL);
    let mut outputs = Vec::new();
    let mut cases = Vec::new();
    for flow in flows() {
        for (segment, payload) in [(Segment::Syn, &b""[..]), (Segment::Ack, &b"hello, backend"[..])]
        {
            let input = frame(flow, Shape { segment, ..Shape::default() }, payload);
            let (action, output) = reconciler.datapath().test_run(&input).unwrap();
            assert_eq!(action, XDP_TX, "{flow:?} {segment:?} not forwarded");
            let backend = backend_of(&output);
            let mode = mode_of(&flow);
            assert_eq!(
                output,
                expected(&input, 14, &flow, backend, mode),
                "{flow:?} {segment:?} to {backend} by {mode}"
            );
            outputs.push(output);
            cases.push((flow, backend, mode));
        }
    }
    // Both backends of every family were reached: the test saw each path.
    let reached: std::collections::BTreeSet<IpAddr> = cases.iter().map(|c| c.1).collect();
    assert_eq!(reached.len(), 4, "flows reached only {reached:?}");
    let seen = dissect(&outputs);
    assert_eq!(seen.len(), outputs.len());
    for ((flow, backend, mode), seen) in cases.iter().zip(&seen) {
        assert_dissected(seen, flow, *backend, *mode, &format!("{flow:?}"));
    }
}

/// `--tunnel-source PREFIX/LEN`: each flow leaves from its own address in
/// the prefix, the host bits the low bits of its entropy (what a backend's
/// NIC hashes an IPIP packet by), with the checksums that cover it, byte
/// for byte; every packet of a flow from the same one.
#[test]
fn a_tunnel_source_prefix_gives_each_flow_its_own_outer_source() {
    let base4 = Ipv4Addr::new(198, 18, 128, 0);
    let base6: Ipv6Addr = "fd00:198:18:ff::".parse().unwrap();
    let tunnel = TunnelConfig {
        source_v4: Some(base4),
        spread_v4: 8,
        source_v6: Some(base6),
        spread_v6: 16,
        ..TUNNEL
    };
    let reconciler = fixture(tunnel);
    let mut seen: [std::collections::BTreeSet<IpAddr>; 2] = Default::default();
    for port in 40_000..40_064 {
        for flow in [
            flow("198.18.0.100", port, "198.18.0.10", 80, L4::Tcp),
            flow("fd00:198:18::100", port, "fd00:198:18::10", 53, L4::Udp),
        ] {
            let entropy = tunnel_entropy(&key(&flow));
            let sources = (
                Ipv4Addr::from_bits(base4.to_bits() + (entropy & 0xff)),
                Ipv6Addr::from_bits(base6.to_bits() + u128::from(entropy & 0xffff)),
            );
            for segment in [Segment::Syn, Segment::Ack] {
                let input = frame(flow, Shape { segment, ..Shape::default() }, b"spread");
                let (action, output) = reconciler.datapath().test_run(&input).unwrap();
                assert_eq!(action, XDP_TX, "{flow:?} {segment:?}");
                let backend = backend_of(&output);
                let want = expected_from(&input, 14, &flow, backend, mode_of(&flow), sources);
                assert_eq!(output, want, "{flow:?} {segment:?} from {sources:?}");
            }
            let v6 = usize::from(flow.vip.is_ipv6());
            seen[v6].insert(if v6 == 1 { IpAddr::V6(sources.1) } else { IpAddr::V4(sources.0) });
        }
    }
    println!(
        "FIGURE 64 flows per family left from {} and {} sources",
        seen[0].len(),
        seen[1].len()
    );
    // 64 flows over 256 (IPv4) and 65,536 (IPv6) addresses.
    assert!(seen[0].len() >= 48 && seen[1].len() >= 60, "{seen:?}");
}

#[test]
fn the_dissector_fails_a_frame_with_a_wrong_checksum() {
    // The control for the scapy check above: a frame it must refuse.
    let reconciler = fixture(TUNNEL);
    let gue_v6 = flow("fd00:198:18::100", 40_000, "fd00:198:18::10", 53, L4::Udp);
    let ipip_v4 = flow("198.18.0.100", 40_000, "198.18.0.10", 80, L4::Tcp);
    let mut frames = Vec::new();
    for (flow, checksum_at) in [(gue_v6, 14 + 40 + 6), (ipip_v4, 14 + 10)] {
        let input = frame(flow, Shape { segment: Segment::Ack, ..Shape::default() }, b"x");
        let (_, mut output) = reconciler.datapath().test_run(&input).unwrap();
        output[checksum_at] ^= 0x01;
        frames.push(output);
    }
    for seen in dissect(&frames) {
        assert_eq!(seen["checksums_ok"], false, "a broken checksum went unseen: {seen}");
    }
}

#[test]
fn vlan_tags_stay_and_ipv6_extension_headers_are_summed() {
    let reconciler = fixture(TUNNEL);
    let mut outputs = Vec::new();
    let mut cases = Vec::new();
    for flow in [
        flow("198.18.0.100", 40_000, "198.18.0.11", 80, L4::Tcp),
        flow("fd00:198:18::100", 40_000, "fd00:198:18::11", 80, L4::Tcp),
    ] {
        for vlans in [&[100u16][..], &[100, 200][..]] {
            let shape = Shape { segment: Segment::Ack, vlans, ..Shape::default() };
            let input = frame(flow, shape, b"tagged");
            let (action, output) = reconciler.datapath().test_run(&input).unwrap();
            assert_eq!(action, XDP_TX);
            let backend = backend_of(&output);
            let l3 = 14 + 4 * vlans.len();
            assert_eq!(output, expected(&input, l3, &flow, backend, mode_of(&flow)), "{vlans:?}");
        }
    }
    // GUE over IPv6 sums the inner extension headers into its UDP checksum.
    let v6 = flow("fd00:198:18::100", 40_002, "fd00:198:18::11", 80, L4::Tcp);
    let plain = frame(v6, Shape { segment: Segment::Ack, ..Shape::default() }, b"options");
    for extensions in [&[(60u8, 8usize)][..], &[(0, 16), (60, 24)][..]] {
        let input = insert_ipv6_extensions(&plain, extensions);
        let (action, output) = reconciler.datapath().test_run(&input).unwrap();
        assert_eq!(action, XDP_TX, "{extensions:?}");
        let backend = backend_of(&output);
        assert_eq!(
            output,
            expected(&input, 14, &v6, backend, ForwardingMode::Gue),
            "{extensions:?}"
        );
        outputs.push(output);
        cases.push(backend);
    }
    for (seen, backend) in dissect(&outputs).iter().zip(cases) {
        assert_dissected(seen, &v6, backend, ForwardingMode::Gue, "extension headers");
    }
}

#[test]
fn an_icmp_error_about_a_flow_is_tunnelled_to_its_backend_like_the_flow() {
    let reconciler = fixture(TUNNEL);
    for (flow, router, icmp) in [
        (
            flow("198.18.0.100", 40_000, "198.18.0.10", 80, L4::Tcp),
            "198.18.0.1",
            Icmp::FRAGMENTATION_NEEDED,
        ),
        (
            flow("fd00:198:18::100", 40_000, "fd00:198:18::11", 80, L4::Tcp),
            "fd00:198:18::1",
            Icmp::V6_PACKET_TOO_BIG,
        ),
    ] {
        let syn = frame(flow, Shape::default(), b"");
        let (_, forwarded) = reconciler.datapath().test_run(&syn).unwrap();
        let backend = backend_of(&forwarded);
        let error =
            icmp_frame(router.parse().unwrap(), flow.vip, icmp, &reply_packet(flow, b"data"));
        let before = reason_count(&reconciler, Reason::ForwardedIcmp);
        let (action, output) = reconciler.datapath().test_run(&error).unwrap();
        assert_eq!(action, XDP_TX, "{icmp:?} not forwarded");
        assert_eq!(reason_count(&reconciler, Reason::ForwardedIcmp), before + 1);
        // The flow's backend, the flow's entropy: its path and queue.
        assert_eq!(output, expected(&error, 14, &flow, backend, mode_of(&flow)), "{icmp:?}");
    }
}

#[test]
fn a_packet_too_big_for_its_tunnel_is_answered_with_the_mtu_that_fits() {
    let reconciler = fixture(TUNNEL);
    let v4 = flow("198.18.0.100", 40_000, "198.18.0.10", 80, L4::Tcp);
    let ack = Shape { segment: Segment::Ack, ..Shape::default() };
    // 20 (IP) + 20 (TCP) + payload, plus 20 of IPIP: exactly the MTU fits.
    let fits = frame(v4, ack, &[7; 1440]);
    assert_eq!(reconciler.datapath().test_run(&fits).unwrap().0, XDP_TX);
    let too_big = frame(v4, ack, &[7; 1441]);
    assert_ne!(too_big[14 + 6] & 0x40, 0, "the client's TCP sets DF");
    let (action, output) = reconciler.datapath().test_run(&too_big).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(output, too_big_answer(&too_big, 1500 - 20), "fragmentation needed, MTU 1480");
    assert_eq!(reason_count(&reconciler, Reason::AnsweredTooBig), 1);
    // Without DF the client allowed fragments, which we do not make: dropped.
    let mut no_df = too_big.clone();
    no_df[14 + 6] &= !0x40;
    let header = Ipv4Header::from_slice(&no_df[14..]).unwrap().0;
    no_df[14 + 10..14 + 12].copy_from_slice(&header.calc_header_checksum().to_be_bytes());
    assert_eq!(reconciler.datapath().test_run(&no_df).unwrap().0, XDP_DROP);
    assert_eq!(reason_count(&reconciler, Reason::DropTooBig), 1);

    // GUE over IPv6 adds 48: 1452 bytes of inner packet fit.
    let v6 = flow("fd00:198:18::100", 40_000, "fd00:198:18::10", 53, L4::Udp);
    let fits = frame(v6, Shape::default(), &[7; 1452 - 48]);
    assert_eq!(reconciler.datapath().test_run(&fits).unwrap().0, XDP_TX);
    let too_big = frame(v6, Shape::default(), &[7; 1452 - 47]);
    let (action, output) = reconciler.datapath().test_run(&too_big).unwrap();
    assert_eq!(action, XDP_TX);
    assert_eq!(output, too_big_answer(&too_big, 1500 - 48), "packet too big, MTU 1452");
    assert_eq!(reason_count(&reconciler, Reason::AnsweredTooBig), 2);

    // Rate-limited per CPU: test runs share one CPU, so the answers stop
    // after ICMP_TOO_BIG_PER_SECOND (twice that if a second turns meanwhile).
    let mut answered = 2;
    for _ in 0..1_000 {
        if reconciler.datapath().test_run(&too_big).unwrap().0 != XDP_TX {
            break;
        }
        answered += 1;
    }
    let limit = lb_common::ICMP_TOO_BIG_PER_SECOND;
    assert!((limit..=2 * limit).contains(&answered), "{answered} answered before the first drop");
    assert_eq!(reason_count(&reconciler, Reason::DropTooBig), 2);

    // A balancer with an IPv4 source only: IPv6 tunnels have nothing to send from.
    let reconciler = fixture(TunnelConfig { source_v6: None, ..TUNNEL });
    let input = frame(v6, Shape::default(), b"query");
    assert_eq!(reconciler.datapath().test_run(&input).unwrap().0, XDP_DROP);
    assert_eq!(reason_count(&reconciler, Reason::DropNoTunnelSource), 1);
    let input = frame(v4, Shape::default(), b"");
    assert_eq!(reconciler.datapath().test_run(&input).unwrap().0, XDP_TX);
}

#[test]
fn a_dsr_vip_beside_tunnelled_ones_only_changes_macs() {
    let reconciler = fixture(TUNNEL);
    let dsr = flow("198.18.0.100", 40_000, "198.18.0.12", 80, L4::Tcp);
    let input = frame(dsr, Shape { segment: Segment::Ack, ..Shape::default() }, b"plain");
    let (action, output) = reconciler.datapath().test_run(&input).unwrap();
    assert_eq!(action, XDP_TX);
    let backend = backend_of(&output);
    assert_eq!(output, tests::packets::dsr_rewritten(&input, backend_mac(backend)));
}
