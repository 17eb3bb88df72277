//! Backends routed out of another interface (`lb run --egress`), in the
//! datapath through BPF_PROG_TEST_RUN on the real XDP object: a backend
//! whose next hop names egress 1 leaves by XDP_REDIRECT, from that
//! interface's MAC, its tunnels from that interface's sources and within
//! its MTU; every frame is compared byte for byte with one built here. The
//! same backends on the balancer's own interface (egress 0) show what
//! changes: XDP_TX, the balancer's MAC and sources, its MTU.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{Egress, Reason};
use lb_userspace::datapath::source_words;
use lb_userspace::model::{ForwardingMode, HealthMap, NextHop, TunnelConfig};
use lb_userspace::reconcile::Reconciler;
use tests::fixture::backend_mac;
use tests::packets::{BALANCER_MAC, Flow, L4, Segment, Shape, dsr_rewritten, frame};
use tests::tunnel_frames::{expected_from, too_big_answer};
use tests::tunnels::{
    SOURCE_V4, SOURCE_V6, TUNNEL, backend_of, backends, fixture_and_desired, flow, flows, mode_of,
};
use tests::{XDP_DROP, XDP_REDIRECT, XDP_TX};

const EGRESS_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 1];
const EGRESS_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 2);
const EGRESS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 5, 0, 0, 0, 2);
const EGRESS_MTU: u32 = 1400;
/// The loopback interface: a device every namespace has, so the devmap
/// takes it; test runs return the verdict without sending anything.
const LOOPBACK: u32 = 1;

fn dsr_flow() -> Flow {
    flow("198.18.0.100", 40_000, "198.18.0.12", 80, L4::Tcp)
}

/// The fixture's VIPs with every backend's next hop out of `egress`.
fn balancer(egress: u32) -> Reconciler {
    let (mut reconciler, desired) = fixture_and_desired(TUNNEL);
    let tunnel = TunnelConfig {
        source_v4: Some(EGRESS_V4),
        source_v6: Some(EGRESS_V6),
        ..TunnelConfig::NONE
    };
    let (source_v4, source_v6) = source_words(&tunnel);
    let info = Egress { mac: EGRESS_MAC, _pad: 0, mtu: EGRESS_MTU, source_v4, source_v6 };
    reconciler.datapath_mut().set_egress(1, LOOPBACK, info).unwrap();
    for backend in backends() {
        let hop = NextHop { mac: backend_mac(backend), gateway: None, egress };
        reconciler.set_next_hop(backend, hop);
    }
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    reconciler
}

/// The frame `input` of `flow` must become for `backend`, sent out of an
/// interface with `mac` and tunnel `sources`.
fn wanted(
    input: &[u8],
    flow: &Flow,
    backend: IpAddr,
    mac: [u8; 6],
    sources: (Ipv4Addr, Ipv6Addr),
) -> Vec<u8> {
    let mut frame = match mode_of(flow) {
        ForwardingMode::Dsr => dsr_rewritten(input, backend_mac(backend)),
        mode => expected_from(input, 14, flow, backend, mode, sources),
    };
    frame[6..12].copy_from_slice(&mac);
    frame
}

#[test]
fn backends_out_of_an_egress_interface_are_redirected_from_its_mac_and_sources() {
    let ack = Shape { segment: Segment::Ack, ..Shape::default() };
    for (egress, action, mac, sources) in [
        (1, XDP_REDIRECT, EGRESS_MAC, (EGRESS_V4, EGRESS_V6)),
        (0, XDP_TX, BALANCER_MAC, (SOURCE_V4, SOURCE_V6)),
    ] {
        let reconciler = balancer(egress);
        for flow in flows().into_iter().chain([dsr_flow()]) {
            let input = frame(flow, ack, b"through the other interface");
            let (seen, output) = reconciler.datapath().test_run(&input).unwrap();
            assert_eq!(seen, action, "{flow:?} by egress {egress}");
            let backend = backend_of(&output);
            let what = format!("{flow:?} to {backend} by egress {egress}");
            assert_eq!(output, wanted(&input, &flow, backend, mac, sources), "{what}");
        }
    }
}

#[test]
fn a_tunnelled_packet_must_fit_its_egress_interfaces_mtu() {
    let v4 = flow("198.18.0.100", 40_000, "198.18.0.10", 80, L4::Tcp);
    let ack = Shape { segment: Segment::Ack, ..Shape::default() };
    // 20 (IP) + 20 (TCP) + payload + 20 of IPIP: fits 1500, not 1400.
    let input = frame(v4, ack, &[7; 1400]);
    let redirected = balancer(1);
    let (action, output) = redirected.datapath().test_run(&input).unwrap();
    assert_eq!(action, XDP_TX, "answered back to the client");
    assert_eq!(output, too_big_answer(&input, (EGRESS_MTU - 20) as u16), "MTU 1380");
    let fits = frame(v4, ack, &[7; 1400 - 80]);
    assert_eq!(redirected.datapath().test_run(&fits).unwrap().0, XDP_REDIRECT);
    // On the balancer's own interface (MTU 1500) the same packet goes.
    let own = balancer(0);
    assert_eq!(own.datapath().test_run(&input).unwrap().0, XDP_TX);
    let counters = own.datapath().reason_counters().unwrap();
    let answered = counters.iter().find(|(each, _)| *each == Reason::AnsweredTooBig).unwrap().1;
    assert_eq!(answered, 0, "nothing was too big for the own interface");
}

#[test]
fn a_backend_naming_an_egress_nobody_wrote_is_dropped_not_sent() {
    // Egress 2 was never written: no MAC, no device.
    let reconciler = balancer(2);
    for flow in flows().into_iter().chain([dsr_flow()]) {
        let input = frame(flow, Shape::default(), b"nowhere to go");
        let (action, _) = reconciler.datapath().test_run(&input).unwrap();
        assert_eq!(action, XDP_DROP, "{flow:?}");
    }
    let counters = reconciler.datapath().reason_counters().unwrap();
    let internal = counters.iter().find(|(each, _)| *each == Reason::DropInternal).unwrap().1;
    assert_eq!(internal, flows().len() as u64 + 1);
}
