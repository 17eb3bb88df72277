//! `lb decap`'s program through BPF_PROG_TEST_RUN: every tunnelled frame
//! the balancer's real program sends comes out of the decapsulator as
//! exactly the frame DSR would have delivered (the client's packet, the
//! backend's MAC), and garbage aimed at it (truncated headers, a GUE
//! header of another variant, a non-IP inner packet, an inner packet for an
//! address that is not local, tunnels for another host or port) is counted
//! by reason and never delivered as something else.

use std::net::IpAddr;

use etherparse::{IpNumber, Ipv4Header, Ipv6Header, UdpHeader};
use lb_common::DecapReason;
use lb_userspace::decap::Decapsulator;
use lb_userspace::model::ForwardingMode;
use tests::fixture::{addresses, backend_mac};
use tests::packets::{BALANCER_MAC, Flow, L4, Shape, dsr_rewritten, frame};
use tests::tunnels::{
    GUE_PORT, SOURCE_V4, SOURCE_V6, TUNNEL, V4_BACKENDS, V6_BACKENDS, backend_of, fixture, flow,
    flows, mode_of,
};
use tests::{XDP_DROP, XDP_PASS, XDP_TX, harness, netns};

/// This host: the backends' own addresses and the VIPs they serve.
fn local_addresses() -> Vec<IpAddr> {
    let vips = ["198.18.0.10", "198.18.0.11", "fd00:198:18::10", "fd00:198:18::11"];
    addresses(&V4_BACKENDS)
        .into_iter()
        .chain(addresses(&V6_BACKENDS))
        .chain(addresses(&vips))
        .collect()
}

fn decapsulator() -> Decapsulator {
    let mut decapsulator = Decapsulator::load(GUE_PORT, None).expect("load the decap object");
    decapsulator.set_local(&local_addresses()).unwrap();
    decapsulator
}

fn count(decapsulator: &Decapsulator, reason: DecapReason) -> u64 {
    let counters = decapsulator.counters().unwrap();
    counters.iter().find(|(each, _)| *each == reason).unwrap().1
}

fn every_tunnelled_frame_of_the_balancer_comes_out_as_its_dsr_frame() {
    let reconciler = fixture(TUNNEL);
    let decapsulator = decapsulator();
    let mut decapsulated = 0;
    for (index, flow) in flows().into_iter().enumerate() {
        assert_ne!(mode_of(&flow), ForwardingMode::Dsr);
        let vlans: &'static [u16] = [&[][..], &[100], &[100, 200]][index % 3];
        let input = frame(flow, Shape { vlans, ..Shape::default() }, b"through the tunnel");
        let (action, tunnelled) = reconciler.datapath().test_run(&input).unwrap();
        assert_eq!(action, XDP_TX, "{flow:?}");
        assert!(tunnelled.len() > input.len(), "{flow:?}: the balancer added outer headers");
        let backend = backend_of(&tunnelled);
        let (action, output) = decapsulator.test_run(&tunnelled).unwrap();
        assert_eq!(action, XDP_PASS, "{flow:?} with {} tags", vlans.len());
        assert_eq!(output, dsr_rewritten(&input, backend_mac(backend)), "{flow:?}");
        decapsulated += 1;
    }
    assert_eq!(count(&decapsulator, DecapReason::Decapsulated), decapsulated);
    assert_eq!(count(&decapsulator, DecapReason::DropMalformed), 0);
}

/// A tunnel frame to `outer`, from the balancer, by etherparse: IPIP (or
/// IP6IP6) when `gue_port` is None, else GUE to that port; `inner` is put
/// after the outer headers as it is (so it may be garbage).
fn tunnel_frame(outer: IpAddr, gue_port: Option<u16>, inner: &[u8], inner_v6: bool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&backend_mac(outer));
    out.extend_from_slice(&BALANCER_MAC);
    let udp_len = (inner.len() + 8) as u16;
    let payload = if gue_port.is_some() { udp_len } else { inner.len() as u16 };
    match outer {
        IpAddr::V4(outer) => {
            out.extend_from_slice(&0x0800u16.to_be_bytes());
            let protocol = match (gue_port, inner_v6) {
                (Some(_), _) => IpNumber::UDP,
                (None, false) => IpNumber::IPV4,
                (None, true) => IpNumber::IPV6,
            };
            let ip =
                Ipv4Header::new(payload, 64, protocol, SOURCE_V4.octets(), outer.octets()).unwrap();
            ip.write(&mut out).unwrap();
        }
        IpAddr::V6(outer) => {
            out.extend_from_slice(&0x86ddu16.to_be_bytes());
            let next_header = match (gue_port, inner_v6) {
                (Some(_), _) => IpNumber::UDP,
                (None, true) => IpNumber::IPV6,
                (None, false) => IpNumber::IPV4,
            };
            let ip = Ipv6Header {
                payload_length: payload,
                next_header,
                hop_limit: 64,
                source: SOURCE_V6.octets(),
                destination: outer.octets(),
                ..Ipv6Header::default()
            };
            ip.write(&mut out).unwrap();
        }
    }
    if let Some(port) = gue_port {
        let udp =
            UdpHeader { source_port: 0xc123, destination_port: port, length: udp_len, checksum: 0 };
        udp.write(&mut out).unwrap();
    }
    out.extend_from_slice(inner);
    out
}

/// The client's IP packet of `flow` (no Ethernet header).
fn inner_packet(flow: Flow) -> Vec<u8> {
    frame(flow, Shape::default(), b"inner")[14..].to_vec()
}

fn garbage_is_counted_and_never_delivered_as_something_else() {
    let decapsulator = decapsulator();
    let backend_v4: IpAddr = V4_BACKENDS[0].parse().unwrap();
    let backend_v6: IpAddr = V6_BACKENDS[0].parse().unwrap();
    let to_vip_v4 = inner_packet(flow("198.18.0.100", 40_000, "198.18.0.10", 80, L4::Tcp));
    let to_vip_v6 = inner_packet(flow("fd00:198:18::100", 40_000, "fd00:198:18::10", 80, L4::Tcp));
    let to_stranger = inner_packet(flow("198.18.0.100", 40_000, "198.18.9.9", 80, L4::Tcp));
    let mut gue_v0 = vec![0x00, 0x00, 0x00, 0x00];
    gue_v0.extend_from_slice(&to_vip_v4);
    let mut not_ip = to_vip_v4.clone();
    not_ip[0] = 0x55;
    let mut longer_than_tunnel = to_vip_v4.clone();
    longer_than_tunnel[2..4].copy_from_slice(&((to_vip_v4.len() + 40) as u16).to_be_bytes());
    let plain =
        frame(flow("198.18.0.100", 40_000, "198.18.0.10", 80, L4::Tcp), Shape::default(), b"");
    let whole = tunnel_frame(backend_v4, None, &to_vip_v4, false);

    // (what, frame, expected reason): every frame the program does not
    // decapsulate must leave as it came (passed) or not at all (dropped).
    // The controls: the same builder's well-formed frames are taken.
    let controls = [
        ("IPIP", whole.clone(), &to_vip_v4),
        ("IP6IP6", tunnel_frame(backend_v6, None, &to_vip_v6, true), &to_vip_v6),
        ("GUE over IPv4", tunnel_frame(backend_v4, Some(GUE_PORT), &to_vip_v4, false), &to_vip_v4),
        ("GUE over IPv6", tunnel_frame(backend_v6, Some(GUE_PORT), &to_vip_v6, true), &to_vip_v6),
    ];
    for (what, input, inner) in controls {
        let (action, output) = decapsulator.test_run(&input).unwrap();
        assert_eq!(action, XDP_PASS, "{what}");
        let ether_type: &[u8] = if inner[0] >> 4 == 6 { &[0x86, 0xdd] } else { &[0x08, 0x00] };
        assert_eq!(&output[..12], &input[..12], "{what}: the MACs stay");
        assert_eq!(&output[12..14], ether_type, "{what}: the EtherType names the inner family");
        assert_eq!(&output[14..], &inner[..], "{what}: the inner packet, unchanged");
    }
    assert_eq!(count(&decapsulator, DecapReason::Decapsulated), 4);

    let cases: Vec<(&str, Vec<u8>, DecapReason)> = vec![
        ("outer IPv4 header cut short", whole[..14 + 12].to_vec(), DecapReason::PassNotTunnel),
        (
            "GUE's UDP header cut short",
            tunnel_frame(backend_v4, Some(GUE_PORT), &[], false)[..14 + 20 + 4].to_vec(),
            DecapReason::PassNotTunnel,
        ),
        (
            "inner header cut short",
            tunnel_frame(backend_v4, None, &to_vip_v4[..12], false),
            DecapReason::DropMalformed,
        ),
        (
            "nothing after the outer header",
            tunnel_frame(backend_v4, None, &[], false),
            DecapReason::DropMalformed,
        ),
        (
            "GUE variant 0 header",
            tunnel_frame(backend_v4, Some(GUE_PORT), &gue_v0, false),
            DecapReason::DropMalformed,
        ),
        (
            "inner packet not IP",
            tunnel_frame(backend_v4, Some(GUE_PORT), &not_ip, false),
            DecapReason::DropMalformed,
        ),
        (
            "IPIP (protocol 4) carrying IPv6",
            tunnel_frame(backend_v4, None, &to_vip_v6, false),
            DecapReason::DropMalformed,
        ),
        (
            "inner longer than its tunnel",
            tunnel_frame(backend_v4, None, &longer_than_tunnel, false),
            DecapReason::DropMalformed,
        ),
        (
            "inner for an address not local",
            tunnel_frame(backend_v4, None, &to_stranger, false),
            DecapReason::DropInnerNotLocal,
        ),
        (
            "tunnel for another host",
            tunnel_frame("198.18.9.1".parse().unwrap(), None, &to_vip_v4, false),
            DecapReason::PassNotForUs,
        ),
        (
            "UDP to another port",
            tunnel_frame(backend_v4, Some(GUE_PORT + 1), &to_vip_v4, false),
            DecapReason::PassNotTunnel,
        ),
        ("plain TCP to the VIP", plain, DecapReason::PassNotTunnel),
    ];
    for (what, input, reason) in cases {
        let before = count(&decapsulator, reason);
        let (action, output) = decapsulator.test_run(&input).unwrap();
        assert_eq!(
            count(&decapsulator, reason),
            before + 1,
            "{what}: counted as {}",
            reason.name()
        );
        match reason {
            DecapReason::Decapsulated => unreachable!("the controls are above"),
            DecapReason::DropMalformed | DecapReason::DropInnerNotLocal => {
                assert_eq!(action, XDP_DROP, "{what}");
            }
            DecapReason::PassNotTunnel | DecapReason::PassNotForUs => {
                assert_eq!((action, &output), (XDP_PASS, &input), "{what}: passed untouched");
            }
        }
    }
}

/// Echo requests the kernel of namespace `ns` took in (/proc/net/snmp).
fn echoes_received(ns: &str) -> u64 {
    let output = netns::run("ip", &["netns", "exec", ns, "cat", "/proc/net/snmp"]).unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut icmp = text.lines().filter(|line| line.starts_with("Icmp:"));
    let (names, values) = (icmp.next().unwrap(), icmp.next().unwrap());
    let column = names.split_whitespace().position(|name| name == "InEchos").unwrap();
    values.split_whitespace().nth(column).unwrap().parse().unwrap()
}

/// `lb decap` for real: attached to a veth in a namespace with no ipip
/// module, an IPIP-wrapped echo request sent by scapy from the veth's peer
/// reaches the kernel as the echo request it carries; without `lb decap`
/// the same frame reaches nothing. Running it again keeps it attached and
/// its counters; `--detach` removes it.
fn lb_decap_attaches_refreshes_reports_and_detaches() {
    let ns = "lbd-host";
    netns::down(ns);
    netns::add(ns).unwrap();
    let _cleanup = Cleanup(ns);
    netns::run("ip", &["-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "wire"])
        .unwrap();
    for iface in ["eth0", "wire"] {
        netns::ip(ns, &["link", "set", iface, "up"]).unwrap();
    }
    netns::ip(ns, &["addr", "add", "198.18.2.1/24", "dev", "eth0"]).unwrap();
    netns::ip(ns, &["addr", "add", "198.18.0.10/32", "dev", "lo"]).unwrap();
    let pin_dir = harness::test_bpffs().unwrap().join("lbd-host");
    let pin = pin_dir.to_str().unwrap();
    let lb = |args: &[&str]| {
        let mut full = vec!["netns", "exec", ns];
        let binary = harness::lb_binary();
        full.push(binary.to_str().unwrap());
        full.extend_from_slice(args);
        full.extend_from_slice(&["--pin-dir", pin, "--json"]);
        std::process::Command::new("ip").args(&full).output().unwrap()
    };
    let mac = netns::mac(ns, "eth0").unwrap();
    let mac = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let send = || {
        let script = format!(
            "from scapy.all import Ether, IP, ICMP, sendp\n\
             sendp(Ether(dst='{mac}')/IP(src='198.18.9.1', dst='198.18.2.1')\
             /IP(src='198.18.9.2', dst='198.18.0.10')/ICMP(), iface='wire', verbose=False)"
        );
        netns::run("ip", &["netns", "exec", ns, "/usr/bin/python3", "-c", &script]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let stats = || {
        let output = lb(&["decap", "--iface", "eth0", "--stats"]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let document: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        document["counters"]["decapsulated"].as_u64().unwrap()
    };

    // The control: without lb decap, the kernel has nothing to take IPIP with.
    let before = echoes_received(ns);
    send();
    assert_eq!(echoes_received(ns), before, "an IPIP frame reached ICMP without lb decap");

    let output = lb(&["decap", "--iface", "eth0"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(netns::runs_xdp(ns, "eth0").unwrap());
    send();
    assert_eq!(echoes_received(ns), before + 1, "the inner echo request reached the kernel");
    assert_eq!(stats(), 1);

    // Again: the program is swapped in, the counters carry on.
    let output = lb(&["decap", "--iface", "eth0"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    send();
    assert_eq!(echoes_received(ns), before + 2);
    assert_eq!(stats(), 2);

    let output = lb(&["decap", "--iface", "eth0", "--detach"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!netns::runs_xdp(ns, "eth0").unwrap(), "detached");
    send();
    assert_eq!(echoes_received(ns), before + 2, "nothing decapsulates once detached");
    let output = lb(&["decap", "--iface", "eth0", "--stats"]);
    assert_eq!(output.status.code(), Some(3), "--stats of nothing pinned is not found");
}

/// Removes the namespace (and what runs in it) however the test ends.
struct Cleanup(&'static str);

impl Drop for Cleanup {
    fn drop(&mut self) {
        netns::down(self.0);
    }
}

tests::root_tests!(
    every_tunnelled_frame_of_the_balancer_comes_out_as_its_dsr_frame,
    garbage_is_counted_and_never_delivered_as_something_else,
    lb_decap_attaches_refreshes_reports_and_detaches,
);
