//! Tunnelled VIPs end to end, over real kernels: backends on two subnets
//! behind a router namespace, with no L2 adjacency to the balancer
//! (tests/src/routed.rs), each running `lb decap`. IPv4 and IPv6, `ipip`
//! and `gue`, TCP and UDP: real clients' flows land on both backends in
//! fair shares where `lb lookup` says, the backends answer the clients
//! directly through the router, and `lb decap` counts what it took; a
//! `dsr` VIP beside them reaches backends on the balancer's own segment. The
//! control: with `lb decap` detached from one backend, exactly the flows
//! `lb lookup` gives that backend fail (no ipip or fou module here).

use std::collections::BTreeMap;

use tests::capture::DistinctSources;
use tests::download::{
    assert_downloads_learn_the_path, assert_downloads_stall, drop_errors_to_vips, forget_path_mtus,
};
use tests::harness::{
    Daemon, Process, client_requests, spawn_in, start_server, tally, testbed_binary,
};
use tests::long_lived::{Scenario, survive_changes};
use tests::netns::{self, CLIENT4, CLIENT6, VIP4, VIP6, endpoint};
use tests::routed::{self, Decapsulators, backend_addresses, decap};

const FLOWS: u16 = 200;

fn balances_through_a_router(prefix: &str, ipv6: bool) {
    let testbed = routed::up(prefix, 2).expect("routed testbed");
    let pick = |(v4, v6): (String, String)| if ipv6 { v6 } else { v4 };
    // Tunnelled VIPs go to b1 and b2 behind the router; a `dsr` VIP beside
    // them to s1 and s2 on the balancer's own segment.
    let routed_backends: Vec<String> = (1..=2).map(|i| pick(backend_addresses(i))).collect();
    let segment_backends: Vec<String> =
        (1..=2).map(|i| pick((netns::backend4(i), netns::backend6(i)))).collect();
    let names: BTreeMap<&str, String> = (1..=2)
        .flat_map(|i| {
            [
                (routed_backends[i - 1].as_str(), format!("b{i}")),
                (segment_backends[i - 1].as_str(), format!("s{i}")),
            ]
        })
        .collect();
    let vips =
        [(8079, "tcp", "dsr"), (8080, "tcp", "ipip"), (8081, "tcp", "gue"), (8082, "udp", "gue")];
    let segment: Vec<String> =
        (1..=2).map(|index| routed::segment_backend(&testbed, index).unwrap()).collect();
    let mut servers: Vec<Process> = Vec::new();
    for (port, _, _) in vips {
        for index in 1..=2 {
            servers.push(start_server(&testbed, index, port).unwrap());
            let args = ["serve", &format!("s{index}"), &port.to_string(), "300"];
            servers.push(spawn_in(&segment[index - 1], &testbed_binary(), &args, None).unwrap());
        }
    }
    let namespaces: Vec<String> = (1..=2).map(|index| testbed.backend(index)).collect();
    let _decapsulators = Decapsulators::attach(namespaces.clone());
    // Each flow's tunnels leave from its own source in a prefix routed to
    // nothing but the balancer (the router forwards them all the same).
    let prefix = if ipv6 { "fd00:198:18:80::/112" } else { "198.18.128.0/24" };
    let daemon = Daemon::start(&testbed, &["--tunnel-source", prefix]).expect("lb run");
    let sources = DistinctSources::install(&routed::router(&testbed), "eth0", prefix).unwrap();
    let (vip_address, client) = if ipv6 { (VIP6, CLIENT6) } else { (VIP4, CLIENT4) };
    let backends_of = |mode: &str| if mode == "dsr" { &segment_backends } else { &routed_backends };
    for (port, protocol, mode) in vips {
        let vip = endpoint(vip_address, port);
        daemon.lb(&["vip", "add", &vip, "--proto", protocol, "--forwarding", mode]).unwrap();
        for backend in backends_of(mode) {
            daemon.lb(&["backend", "add", &vip, backend, "--proto", protocol]).unwrap();
        }
    }
    daemon.wait_backends_active().unwrap();

    for (index, (port, protocol, mode)) in vips.into_iter().enumerate() {
        let vip = endpoint(vip_address, port);
        let first_port = 20_000 + index as u16 * 1_000;
        let answers = client_requests(&testbed, protocol, &vip, client, first_port, FLOWS).unwrap();
        let counts = tally(&answers);
        println!("FIGURE {mode} {protocol} {vip}: {FLOWS} flows landed {counts:?}");
        let want: Vec<&str> =
            backends_of(mode).iter().map(|a| names[a.as_str()].as_str()).collect();
        assert_eq!(counts.keys().map(String::as_str).collect::<Vec<_>>(), want, "{counts:?}");
        let fair = usize::from(FLOWS) / 2;
        for (name, count) in &counts {
            assert!(
                count * 10 >= fair * 6 && count * 10 <= fair * 14,
                "{name}: {count} of {FLOWS}"
            );
        }
        for (client_port, answer) in &answers {
            let looked_up = daemon.lookup(&vip, &endpoint(client, *client_port), protocol).unwrap();
            assert_eq!(
                names.get(looked_up.as_str()).map(String::as_str),
                Some(answer.as_str()),
                "port {client_port}"
            );
        }
    }
    // 600 tunnelled flows over 256 or 65,536 sources in the prefix.
    let distinct = sources.count().unwrap();
    println!("FIGURE tunnels reached the router from {distinct} sources in {prefix}");
    assert!(distinct >= 100, "{distinct} sources in {prefix}");
    let stats = daemon.json(&["stats"]).unwrap();
    let reasons = &stats["reasons"];
    assert!(reasons["forwarded"].as_u64().unwrap() >= 3 * u64::from(FLOWS), "{reasons}");
    for reason in ["drop_too_big", "drop_no_tunnel_source", "drop_no_backend", "drop_internal"] {
        assert_eq!(reasons[reason].as_u64(), Some(0), "{reason}: {reasons}");
    }
    for ns in &namespaces {
        let counters = decap(ns, &["--stats"])["counters"].clone();
        println!("FIGURE lb decap in {ns}: {counters}");
        assert!(counters["decapsulated"].as_u64().unwrap() >= u64::from(FLOWS), "{counters}");
        assert_eq!(counters["drop_malformed"].as_u64(), Some(0), "{counters}");
        assert_eq!(counters["drop_inner_not_local"].as_u64(), Some(0), "{counters}");
    }

    // The control: b1 without its decapsulator takes nothing from a tunnel.
    decap(&namespaces[0], &["--detach"]);
    assert!(!tests::netns::runs_xdp(&namespaces[0], "eth0").unwrap(), "lb decap --detach detached");
    let vip = endpoint(vip_address, 8082);
    let answers = client_requests(&testbed, "udp", &vip, client, 30_000, 20).unwrap();
    let mut on_b1 = 0;
    for (client_port, answer) in &answers {
        let looked_up = daemon.lookup(&vip, &endpoint(client, *client_port), "udp").unwrap();
        match names[looked_up.as_str()].as_str() {
            "b1" => {
                on_b1 += 1;
                assert!(
                    answer.starts_with("ERROR"),
                    "port {client_port}: {answer} without lb decap"
                );
            }
            _ => assert_eq!(answer, "b2", "port {client_port}"),
        }
    }
    assert!(on_b1 > 0, "no control flow went to b1: {answers:?}");
}

/// A TCP server in `ns` on `port` (both families) that reads each
/// connection to its end and answers with the byte count; a few minutes at most.
fn start_upload_server(ns: &str, port: u16) -> Process {
    let script = format!(
        "import socket, threading\n\
         s = socket.socket(socket.AF_INET6)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('::', {port})); s.listen(16); s.settimeout(300)\n\
         def serve(c):\n\
         \x20   n = 0\n\
         \x20   while True:\n\
         \x20       b = c.recv(65536)\n\
         \x20       if not b: break\n\
         \x20       n += len(b)\n\
         \x20   c.sendall(str(n).encode()); c.close()\n\
         while True:\n\
         \x20   c, _ = s.accept(); threading.Thread(target=serve, args=(c,)).start()\n"
    );
    Process(
        std::process::Command::new("ip")
            .args(["netns", "exec", ns, "/usr/bin/python3", "-c", &script])
            .spawn()
            .unwrap(),
    )
}

/// Uploads `bytes` from the client namespace to `vip`: what the server
/// counted, or the error.
fn upload(client_ns: &str, vip: &str, bytes: usize) -> String {
    let (host, port) = vip.rsplit_once(':').unwrap();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let script = format!(
        "import socket\n\
         c = socket.create_connection(('{host}', {port}), timeout=20)\n\
         c.sendall(b'x' * {bytes}); c.shutdown(socket.SHUT_WR)\n\
         print(c.recv(100).decode())\n"
    );
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", client_ns, "/usr/bin/python3", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(if output.status.success() {
        &output.stdout
    } else {
        &output.stderr
    });
    text.trim().to_owned()
}

/// Uploads go through the balancer (downloads do not: replies go straight
/// to the client). Full-size segments do not fit the tunnel: the balancer
/// answers "fragmentation needed" / "packet too big" with the MTU that
/// fits, the client's TCP lowers its segments, and 1 MB uploads over IPv4
/// and IPv6 complete.
fn uploads_larger_than_the_tunnel_learn_its_mtu_and_complete() {
    let testbed = routed::up("lbrm-", 1).expect("routed testbed");
    let backend = testbed.backend(1);
    let _server = start_upload_server(&backend, 8090);
    let _decapsulators = Decapsulators::attach(vec![backend.clone()]);
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    let (v4, v6) = backend_addresses(1);
    for (vip_address, backend_address) in [(VIP4, &v4), (VIP6, &v6)] {
        let vip = endpoint(vip_address, 8090);
        daemon.lb(&["vip", "add", &vip, "--forwarding", "ipip"]).unwrap();
        daemon.lb(&["backend", "add", &vip, backend_address]).unwrap();
    }
    daemon.wait_backends_active().unwrap();
    const BYTES: usize = 1_000_000;
    for vip_address in [VIP4, VIP6] {
        let vip = endpoint(vip_address, 8090);
        let answer = upload(&testbed.client(), &vip, BYTES);
        println!("FIGURE upload of {BYTES} B to {vip} through the tunnel: {answer}");
        assert_eq!(answer, BYTES.to_string(), "{vip}");
    }
    let reasons = daemon.json(&["stats"]).unwrap()["reasons"].clone();
    println!(
        "FIGURE too-big answers {}, drops {}",
        reasons["answered_too_big"], reasons["drop_too_big"]
    );
    assert!(reasons["answered_too_big"].as_u64().unwrap() >= 2, "{reasons}");
    assert_eq!(reasons["drop_too_big"].as_u64(), Some(0), "{reasons}");

    // The control: a client that ignores the answer (its route's MTU
    // locked at 1500, so it sends without DF and learns nothing) has its
    // full-size segments dropped, and its upload never completes.
    let client = testbed.client();
    let route =
        ["route", "change", &format!("{VIP4}/32"), "via", "198.18.0.2", "mtu", "lock", "1500"];
    tests::netns::ip(&client, &route).unwrap();
    let vip = endpoint(VIP4, 8090);
    let answer = upload(&client, &vip, BYTES);
    println!("FIGURE upload to {vip} with the client's MTU locked: {answer}");
    assert_ne!(answer, BYTES.to_string(), "the upload completed without learning the MTU");
    let reasons = daemon.json(&["stats"]).unwrap()["reasons"].clone();
    assert!(reasons["drop_too_big"].as_u64().unwrap() > 0, "{reasons}");
}

/// Replies to a client behind a 1280-byte link are too big for it: the
/// router sends its errors to the VIP, the balancer sends each through the
/// VIP's tunnel to the backend whose reply it quotes, and 1 MB downloads
/// over IPv4 and IPv6, `ipip` and `gue`, complete. The control: with those
/// errors dropped at the router, downloads stall.
fn downloads_across_a_1280_byte_link_complete_through_tunnels() {
    const BYTES: usize = 1_000_000;
    let testbed = routed::up("lbrp-", 2).expect("routed testbed");
    let client = routed::narrow_client(&testbed, 1280).expect("narrow client");
    let namespaces: Vec<String> = (1..=2).map(|index| testbed.backend(index)).collect();
    let modes = [(8090, "ipip"), (8091, "gue")];
    let _servers: Vec<Process> = namespaces
        .iter()
        .enumerate()
        .flat_map(|(index, ns)| {
            let (name, bytes) = (format!("b{}", index + 1), BYTES.to_string());
            modes.map(|(port, _)| {
                let args = ["download-serve", &name, &port.to_string(), &bytes, "300"];
                spawn_in(ns, &testbed_binary(), &args, None).unwrap()
            })
        })
        .collect();
    let _decapsulators = Decapsulators::attach(namespaces.clone());
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    let mut vips = Vec::new();
    for ipv6 in [false, true] {
        for (port, mode) in modes {
            let vip = endpoint(if ipv6 { VIP6 } else { VIP4 }, port);
            daemon.lb(&["vip", "add", &vip, "--forwarding", mode]).unwrap();
            for index in 1..=2 {
                let (v4, v6) = backend_addresses(index);
                daemon.lb(&["backend", "add", &vip, if ipv6 { &v6 } else { &v4 }]).unwrap();
            }
            vips.push((vip, ipv6));
        }
    }
    daemon.wait_backends_active().unwrap();

    for (vip, ipv6) in &vips {
        forget_path_mtus(&namespaces);
        let pick = |(v4, v6): (String, String)| if *ipv6 { v6 } else { v4 };
        let backends: Vec<String> = (1..=2).map(|i| pick(backend_addresses(i))).collect();
        assert_downloads_learn_the_path(&daemon, &client, vip, &backends, BYTES);
    }
    for ns in &namespaces {
        let counters = decap(ns, &["--stats"])["counters"].clone();
        println!("FIGURE lb decap in {ns}: {counters}");
        assert_eq!(counters["drop_malformed"].as_u64(), Some(0), "{counters}");
    }

    drop_errors_to_vips(&routed::router(&testbed), &namespaces);
    for (vip, _) in &vips {
        assert_downloads_stall(&client, vip, BYTES);
    }
}

/// The long-lived scenario of tests/tests/long_lived.rs through a `gue`
/// VIP to routed backends: 4,000 WebSockets survive a backend add, a
/// weight change and a drain, and a failed backend breaks only its own.
fn four_thousand_websockets_through_gue_survive_changes_and_only_a_failed_backends_break() {
    let testbed = routed::up("lbrw-", 4).expect("routed testbed");
    let _decapsulators =
        Decapsulators::attach((1..=4).map(|index| testbed.backend(index)).collect());
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    survive_changes(&Scenario {
        testbed: &testbed,
        daemon: &daemon,
        vip: "198.18.0.10:8080",
        vip_args: &["--forwarding", "gue"],
        backend: routed::backend4,
        connections: 4_000,
    });
}

/// A backend the kernel routes out of another interface than `lb run`'s
/// gets nothing (lb sends only out of its own), and the daemon says so
/// once, naming both interfaces; one without a route is named too; the
/// VIP's flows all go to the backend it can reach.
fn ipv4_ipip_and_gue_balance_through_a_router() {
    balances_through_a_router("lbr4-", false);
}

fn ipv6_ipip_and_gue_balance_through_a_router() {
    balances_through_a_router("lbr6-", true);
}

tests::root_tests!(
    ipv4_ipip_and_gue_balance_through_a_router,
    ipv6_ipip_and_gue_balance_through_a_router,
    uploads_larger_than_the_tunnel_learn_its_mtu_and_complete,
    downloads_across_a_1280_byte_link_complete_through_tunnels,
    four_thousand_websockets_through_gue_survive_changes_and_only_a_failed_backends_break,
);
