//! Real networks and hostile traffic, end to end: large replies cross a
//! narrow link on the way to the client (the router's ICMP errors reach the
//! backend that sent them), and a spoofed flood of three times the flow
//! table breaks no idle WebSocket connection.

use std::process::Command;

use serde_json::Value;
use tests::download::Download;
use tests::fleet::{self, Fleet};
use tests::harness::{Daemon, spawn_in, testbed_binary};
use tests::netns::{VIP4, VIP6};

const DOWNLOAD_BYTES: usize = 1_000_000;

/// `count` downloads from `address` in the client namespace.
fn downloads(fleet: &Fleet, address: &str, count: usize) -> Vec<Download> {
    let output = Command::new("ip")
        .args(["netns", "exec", &fleet.client()])
        .arg(testbed_binary())
        .args(["download", address, &count.to_string(), "5"])
        .output()
        .expect("run the download client");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("the client prints JSON")
}

/// ICMP errors forwarded to each backend of `vip`, by address.
fn icmp_errors(daemon: &Daemon, vip: &str) -> Vec<(String, u64)> {
    let list = daemon.json(&["backend", "list", vip]).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_owned(), b["icmp_errors"].as_u64().unwrap()))
        .collect()
}

fn downloads_complete_across_a_1280_byte_link_over_ipv4_and_ipv6() {
    let mut fleet = Fleet::up("lbh-mtu-", 1, 2).expect("fleet testbed");
    fleet.narrow_client_path(1280).unwrap();
    let _servers: Vec<_> = (1..=2)
        .map(|index| {
            let (name, bytes) = (format!("b{index}"), DOWNLOAD_BYTES.to_string());
            let args = ["download-serve", &name, "8090", &bytes, "300"];
            spawn_in(&fleet.backend(index), &testbed_binary(), &args, None).unwrap()
        })
        .collect();
    let daemon = fleet.start_lb(1, false).expect("lb run");
    let families: [(&str, fn(usize) -> String); 2] = [
        ("198.18.0.10:8090", fleet::backend_address),
        ("[fd00:198:18::10]:8090", fleet::backend_address6),
    ];
    for (vip, backend) in families {
        daemon.lb(&["vip", "add", vip, "--check", "tcp"]).unwrap();
        for index in 1..=2 {
            daemon.lb(&["backend", "add", vip, &backend(index)]).unwrap();
        }
    }
    daemon.wait_backends_active().unwrap();
    fleet.start_bird(&fleet.balancer(1)).unwrap();
    fleet.wait_next_hops(VIP4, &[1]).unwrap();
    fleet.wait_next_hops(VIP6, &[1]).unwrap();

    for (vip, backend) in families {
        let before = icmp_errors(&daemon, vip);
        let got = downloads(&fleet, vip, 8);
        let after = icmp_errors(&daemon, vip);
        let summary: Vec<String> =
            got.iter().map(|d| format!("{} {} B {:.2} s", d.backend, d.bytes, d.seconds)).collect();
        println!("FIGURE {vip} across the 1280-byte link: {}", summary.join(", "));
        println!(
            "FIGURE {vip} ICMP errors forwarded per backend: before {before:?}, after {after:?}"
        );
        assert!(got.iter().all(|d| d.bytes == DOWNLOAD_BYTES), "a download stalled: {summary:?}");
        for index in 1..=2 {
            let name = format!("b{index}");
            assert!(got.iter().any(|d| d.backend == name), "no download from {name}: {summary:?}");
            let address = backend(index);
            let count =
                |list: &[(String, u64)]| list.iter().find(|(a, _)| *a == address).unwrap().1;
            assert!(count(&after) > count(&before), "no ICMP error reached {name}: {after:?}");
        }
    }

    // The same downloads with the router's errors to the VIPs dropped at the
    // router: every one stalls, which is what the forwarding prevents.
    // Backends cache the path MTU per client address: forget it first.
    for index in 1..=2 {
        tests::netns::ip(&fleet.backend(index), &["route", "flush", "cache"]).unwrap();
        tests::netns::ip(&fleet.backend(index), &["-6", "route", "flush", "cache"]).unwrap();
    }
    let router = fleet.router();
    let nft = |rule: &str| {
        let status = Command::new("ip")
            .args(["netns", "exec", &router, "nft"])
            .args(rule.split(' '))
            .status()
            .expect("nft");
        assert!(status.success(), "nft {rule}");
    };
    nft("add table inet lbtest");
    nft("add chain inet lbtest out { type filter hook output priority 0 ; }");
    nft(&format!(
        "add rule inet lbtest out ip daddr {VIP4} icmp type destination-unreachable drop"
    ));
    nft(&format!("add rule inet lbtest out ip6 daddr {VIP6} icmpv6 type packet-too-big drop"));
    for (vip, _) in families {
        let got = downloads(&fleet, vip, 2);
        let bytes: Vec<usize> = got.iter().map(|d| d.bytes).collect();
        println!(
            "FIGURE {vip} with the errors dropped at the router: {bytes:?} bytes of {DOWNLOAD_BYTES}"
        );
        assert!(
            got.iter().all(|d| d.bytes < DOWNLOAD_BYTES),
            "completed without errors: {bytes:?}"
        );
    }
}

tests::root_tests!(downloads_complete_across_a_1280_byte_link_over_ipv4_and_ipv6,);
