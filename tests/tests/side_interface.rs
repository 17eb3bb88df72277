//! Backends routed out of a second interface of the balancer, end to end
//! over real kernels: the routed testbed (tests/src/routed.rs) plus a
//! namespace on the balancer's `side0`. Without `lb run --egress side0`
//! such a backend is named in one warning and gets nothing; with it, its
//! flows leave by side0 (XDP_REDIRECT), tunnelled and by direct server
//! return, and the clients get every answer.

use tests::harness::{Daemon, client_requests, spawn_in, start_server, tally, testbed_binary};
use tests::netns::{self, CLIENT4, CLIENT6, VIP4, VIP6, endpoint};
use tests::routed::{self, Decapsulators, backend_addresses, decap};

/// The side backend's addresses, alone on a second interface of the balancer.
const SIDE_BACKEND: &str = "198.18.7.1";
const SIDE_BACKEND6: &str = "fd00:198:18:7::1";

/// Adds namespace `{prefix}side`, joined by a veth to the balancer's second
/// interface `side0` (198.18.7.254/24, fd00:198:18:7::fe/64): backend
/// SIDE_BACKEND (and SIDE_BACKEND6) with the VIPs
/// on `lo`, answering clients through the balancer's kernel, which
/// forwards. Its only route from the balancer leaves by `side0`.
fn side_segment(testbed: &netns::Testbed) -> String {
    let (balancer, side) = (testbed.balancer(), format!("{}side", testbed.prefix));
    netns::add(&side).unwrap();
    let link = ["link", "add", "side0", "netns", &balancer, "type", "veth", "peer", "name", "eth0"];
    netns::run("ip", &[&link[..], &["netns", &side]].concat()).unwrap();
    netns::ip(&balancer, &["addr", "add", "198.18.7.254/24", "dev", "side0"]).unwrap();
    netns::ip(&balancer, &["link", "set", "side0", "up"]).unwrap();
    netns::ip(&side, &["addr", "add", &format!("{SIDE_BACKEND}/24"), "dev", "eth0"]).unwrap();
    netns::ip(&side, &["link", "set", "eth0", "up"]).unwrap();
    netns::ip(&side, &["route", "add", "default", "via", "198.18.7.254"]).unwrap();
    let v6 = [
        (balancer.as_str(), "fd00:198:18:7::fe/64", "side0"),
        (side.as_str(), &format!("{SIDE_BACKEND6}/64"), "eth0"),
    ];
    for (ns, address, iface) in v6 {
        netns::ip(ns, &["addr", "add", address, "dev", iface, "nodad"]).unwrap();
    }
    netns::ip(&side, &["-6", "route", "add", "default", "via", "fd00:198:18:7::fe"]).unwrap();
    netns::own_vips(&side).unwrap();
    // The side backend's answers come in by side0, from the VIP, and leave
    // by eth0 to the client.
    for setting in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.side0.rp_filter=0",
        "net.ipv6.conf.all.forwarding=1",
    ] {
        netns::sysctl(&balancer, setting).unwrap();
    }
    side
}

fn a_backend_routed_out_of_another_interface_is_named_and_gets_no_flow() {
    let testbed = routed::up("lbro-", 1).expect("routed testbed");
    side_segment(&testbed);
    let _server = start_server(&testbed, 1, 8080).unwrap();
    let _decapsulators = Decapsulators::attach(vec![testbed.backend(1)]);
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    let vip = endpoint(VIP4, 8080);
    // No health checks: the unreachable backend stays up, so only its route keeps it out.
    let add = ["vip", "add", &vip, "--proto", "udp", "--forwarding", "gue", "--check", "none"];
    daemon.lb(&add).unwrap();
    // 198.18.9.1: no route at all from the balancer.
    for backend in [backend_addresses(1).0.as_str(), SIDE_BACKEND, "198.18.9.1"] {
        daemon.lb(&["backend", "add", &vip, backend, "--proto", "udp"]).unwrap();
    }
    let warning = "backend 198.18.7.1 is routed out of side0, not eth0";
    let no_route = "backend 198.18.9.1 has no route";
    tests::harness::wait_until("the warnings", 10, || {
        let log = daemon.log_text();
        log.contains(warning) && log.contains(no_route)
    });
    let answers = client_requests(&testbed, "udp", &vip, CLIENT4, 20_000, 100).unwrap();
    let counts = tally(&answers);
    println!("FIGURE 100 flows with one backend routed elsewhere landed {counts:?}");
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["b1"], "{counts:?}");
    let log = daemon.log_text();
    for said in [warning, no_route] {
        assert_eq!(log.matches(said).count(), 1, "not said once: {said}\n{log}");
    }
}

/// The same backend with `lb run --egress side0`: its flows leave by
/// side0 (XDP_REDIRECT), tunnelled (`gue` over IPv4 and IPv6, beside a
/// backend behind the router) and by direct server return (a `dsr` VIP whose only backend it
/// is), and the client gets every answer.
fn a_backend_routed_out_of_an_egress_interface_is_sent_there() {
    let testbed = routed::up("lbeg-", 1).expect("routed testbed");
    let side = side_segment(&testbed);
    let mut servers = Vec::new();
    for port in [8079, 8080] {
        servers.push(start_server(&testbed, 1, port).unwrap());
        let args = ["serve", "side", &port.to_string(), "300"];
        servers.push(spawn_in(&side, &testbed_binary(), &args, None).unwrap());
    }
    // lb decap on the side backend: its tunnels' end, and the XDP program
    // a veth needs on its far end to take redirected frames.
    let _decapsulators = Decapsulators::attach(vec![testbed.backend(1), side.clone()]);
    let mut daemon = Daemon::start(&testbed, &["--egress", "side0"]).expect("lb run");
    let (gue4, gue6, dsr) = (endpoint(VIP4, 8080), endpoint(VIP6, 8080), endpoint(VIP4, 8079));
    let (b1_4, b1_6) = backend_addresses(1);
    for (gue, backends) in [(&gue4, [b1_4.as_str(), SIDE_BACKEND]), (&gue6, [&b1_6, SIDE_BACKEND6])]
    {
        daemon.lb(&["vip", "add", gue, "--proto", "udp", "--forwarding", "gue"]).unwrap();
        for backend in backends {
            daemon.lb(&["backend", "add", gue, backend, "--proto", "udp"]).unwrap();
        }
    }
    daemon.lb(&["vip", "add", &dsr, "--proto", "tcp"]).unwrap();
    daemon.lb(&["backend", "add", &dsr, SIDE_BACKEND, "--proto", "tcp"]).unwrap();
    daemon.wait_backends_active().unwrap();
    assert!(netns::runs_xdp(&testbed.balancer(), "side0").unwrap(), "no pass program on side0");
    // `lb backend list` says which interface each backend leaves by.
    let listed: serde_json::Value = serde_json::from_str(
        &daemon.lb(&["backend", "list", &gue4, "--proto", "udp", "--json"]).unwrap(),
    )
    .unwrap();
    let via: Vec<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_owned(), b["via"].as_str().unwrap().to_owned()))
        .collect();
    let want = [(b1_4.clone(), "eth0".to_owned()), (SIDE_BACKEND.to_owned(), "side0".to_owned())];
    assert_eq!(via, want, "{listed}");

    let mut landed = Vec::new();
    for (gue, client) in [(&gue4, CLIENT4), (&gue6, CLIENT6)] {
        let answers = client_requests(&testbed, "udp", gue, client, 20_000, 200).unwrap();
        landed.push(answers.clone());
        let counts = tally(&answers);
        println!(
            "FIGURE 200 gue flows to {gue}, one backend behind the router, one out of side0: {counts:?}"
        );
        assert_eq!(counts.values().sum::<usize>(), 200, "{counts:?}");
        for name in ["b1", "side"] {
            let share = counts.get(name).copied().unwrap_or(0);
            assert!((60..=140).contains(&share), "{gue}: {name} got {share} of 200: {counts:?}");
        }
    }
    let answers = client_requests(&testbed, "tcp", &dsr, CLIENT4, 30_000, 100).unwrap();
    let counts = tally(&answers);
    println!("FIGURE 100 dsr connections out of side0: {counts:?}");
    assert_eq!(counts.get("side"), Some(&100), "{counts:?}");
    // A restart adopts the datapath: the new program's egress maps are
    // written before it replaces the old one, and side0's pass program is
    // swapped in its pinned link. The same flows land as before, all answered.
    daemon.restart(&testbed, &["--egress", "side0"]).expect("lb run again");
    for ((gue, client), before) in [(&gue4, CLIENT4), (&gue6, CLIENT6)].into_iter().zip(&landed) {
        let after = client_requests(&testbed, "udp", gue, client, 20_000, 200).unwrap();
        assert_eq!(&after, before, "{gue}: flows moved or failed across the restart");
    }
    assert!(netns::runs_xdp(&testbed.balancer(), "side0").unwrap(), "side0 lost its program");
    let log = daemon.log_text();
    let swapped = log.lines().any(|line| {
        line.contains("pass program attached to egress interface")
            && line.contains("replaced atomically")
    });
    assert!(swapped, "side0's pass program was not swapped in its pinned link:\n{log}");
    let taken = decap(&side, &["--stats"]);
    println!("FIGURE the side backend's lb decap: {taken}");
    let log = daemon.log_text();
    assert!(!log.contains("is routed out of side0"), "warned although --egress side0:\n{log}");
    // Its pass program is pinned with the datapath and goes with it.
    drop(daemon);
    assert!(!netns::runs_xdp(&testbed.balancer(), "side0").unwrap(), "side0 kept its program");
}

tests::root_tests!(
    a_backend_routed_out_of_another_interface_is_named_and_gets_no_flow,
    a_backend_routed_out_of_an_egress_interface_is_sent_there,
);
