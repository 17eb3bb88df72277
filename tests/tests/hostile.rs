//! Real networks and hostile traffic, end to end: large replies cross a
//! narrow link on the way to the client (the router's ICMP errors reach the
//! backend that sent them), and a spoofed flood of three times the flow
//! table breaks no idle WebSocket connection.

use std::process::Command;

use serde_json::Value;
use tests::download::{
    assert_downloads_learn_the_path, assert_downloads_stall, drop_errors_to_vips,
};
use tests::fleet::{self, Fleet};
use tests::harness::{Daemon, WsClients, spawn_in, testbed_binary, total_active_flows};
use tests::netns::{self, Testbed, VIP4, VIP6};

/// A VIP and the address of its backend `index`.
type Family = (&'static str, fn(usize) -> String);

const DOWNLOAD_BYTES: usize = 1_000_000;

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
    let families: [Family; 2] = [
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
        let backends: Vec<String> = (1..=2).map(backend).collect();
        assert_downloads_learn_the_path(&daemon, &fleet.client(), vip, &backends, DOWNLOAD_BYTES);
    }

    // The same downloads with the router's errors to the VIPs dropped at the
    // router: every one stalls, which is what the forwarding prevents.
    let backends: Vec<String> = (1..=2).map(|index| fleet.backend(index)).collect();
    drop_errors_to_vips(&fleet.router(), &backends);
    for (vip, _) in families {
        assert_downloads_stall(&fleet.client(), vip, DOWNLOAD_BYTES);
    }
}

const WEBSOCKETS: usize = 2_000;
const FLOW_TABLE: u64 = 65_536;
/// Distinct spoofed tuples per kind of flood: over three flow tables.
const FLOOD_TUPLES: u64 = 200_000;

fn flow_events(daemon: &Daemon) -> Value {
    daemon.json(&["stats"]).unwrap()["flow_events"].clone()
}

fn a_spoofed_flood_of_three_flow_tables_breaks_no_idle_websocket() {
    let prefix = "lbh-flood-";
    let testbed = Testbed::up(prefix, 4).expect("testbed");
    let _servers: Vec<_> = (1..=4)
        .map(|index| {
            let name = format!("b{index}");
            let args = ["ws-serve", &name, "8080", "300"];
            spawn_in(&testbed.backend(index), &testbed_binary(), &args, None).unwrap()
        })
        .collect();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), format!("flow_table_size = {FLOW_TABLE}\n")).unwrap();
    let daemon =
        Daemon::start(&testbed, &["--config", config.path().to_str().unwrap()]).expect("lb run");
    let (vip, udp_vip) = ("198.18.0.10:8080", "198.18.0.10:8081");
    daemon.lb(&["vip", "add", vip, "--check", "ws"]).unwrap();
    daemon.lb(&["vip", "add", udp_vip, "--proto", "udp", "--check", "none"]).unwrap();
    for index in 1..=3 {
        daemon.lb(&["backend", "add", vip, &netns::backend4(index)]).unwrap();
        daemon.lb(&["backend", "add", udp_vip, &netns::backend4(index), "--proto", "udp"]).unwrap();
    }
    daemon.wait_backends_active().unwrap();

    let (mut clients, started) = WsClients::start(&testbed.client(), vip, WEBSOCKETS);
    assert_eq!(started["opened"].as_u64(), Some(WEBSOCKETS as u64), "{started}");
    clients.round_without_breaks("opening");
    // A new backend: about a quarter of the connections now hash elsewhere,
    // so any of those that loses its entry breaks.
    daemon.lb(&["backend", "add", vip, &netns::backend4(4)]).unwrap();
    daemon.wait_backends_active().unwrap();
    clients.round_without_breaks("adding b4");

    let before = flow_events(&daemon);
    // Distinct tuples per kind: a SYN and then an ACK of the same spoofed
    // tuple would be a handshake, which confirms (see the README).
    let floods =
        [("syn", vip, "198.18.4.20"), ("ack", vip, "198.18.5.20"), ("udp", udp_vip, "198.18.6.20")];
    for (kind, target, source) in floods {
        let frames = (2 * FLOOD_TUPLES).to_string();
        let output = Command::new(testbed_binary())
            .args(["generate", prefix, target, "64000", "200", &frames, "60", "200000"])
            .args(["64", "--kind", kind, "--repeat", "2", "--source", source])
            .output()
            .expect("the flood generator");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        println!(
            "FIGURE flood of {FLOOD_TUPLES} {kind} tuples, each twice: {}",
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    let after = flow_events(&daemon);
    let delta = |event: &str| after[event].as_u64().unwrap() - before[event].as_u64().unwrap();
    let active = total_active_flows(&daemon.json(&["stats"]).unwrap());
    println!(
        "FIGURE what the flood did (flow table {FLOW_TABLE}): created {}, miss_fallback {}, new_hit {}, confirmed {}; active flows after it {active}",
        delta("created"),
        delta("miss_fallback"),
        delta("new_hit"),
        delta("confirmed"),
    );
    // Each SYN is a new flow (2 per tuple); each ACK and UDP tuple one
    // miss and one hit: the balancer saw at least three tables' worth.
    assert!(
        delta("created") + delta("miss_fallback") >= 3 * 3 * FLOW_TABLE,
        "the flood did not reach the balancer in full: {after}"
    );
    assert!(delta("confirmed") < 100, "spoofed tuples were confirmed: {after}");
    clients.round_without_breaks("the flood");
}

tests::root_tests!(
    downloads_complete_across_a_1280_byte_link_over_ipv4_and_ipv6,
    a_spoofed_flood_of_three_flow_tables_breaks_no_idle_websocket,
);
