//! Several balancers behind a router with ECMP, announced by real BIRD over
//! BGP with BFD, sharing flows through sync: a balancer's death breaks no
//! WebSocket connection, and without sync the same death does (so the test
//! can fail), over IPv4 and over IPv6, and through a `gue` VIP to backends
//! behind the router. Forged sync datagrams change nothing and are counted.

use std::time::{Duration, Instant};

use serde_json::Value;
use tests::fleet::{self, Fleet};
use tests::harness::{Daemon, WsClients, testbed_binary};
use tests::netns::{VIP4, VIP6};
use tests::routed::Decapsulators;

const VIP: &str = "198.18.0.10:8080";
const CONNECTIONS: usize = 4_000;

/// A VIP of one address family, the addresses of its backends, and how it
/// forwards to them (`dsr` on the balancers' segment; `ipip` or `gue` to
/// backends behind the router, [`Fleet::route_backends`]).
struct Family {
    vip: &'static str,
    vip_address: &'static str,
    backend: fn(usize) -> String,
    forwarding: &'static str,
}

const V4: Family =
    Family { vip: VIP, vip_address: VIP4, backend: fleet::backend_address, forwarding: "dsr" };
const V6: Family = Family {
    vip: "[fd00:198:18::10]:8080",
    vip_address: VIP6,
    backend: fleet::backend_address6,
    forwarding: "dsr",
};
const V4_GUE: Family = Family {
    vip: VIP,
    vip_address: VIP4,
    backend: fleet::routed_backend_address,
    forwarding: "gue",
};

/// Configures the VIP with backends 1..=3 on a balancer and waits until they are up.
fn configure(daemon: &Daemon, family: &Family) {
    daemon
        .lb(&["vip", "add", family.vip, "--check", "ws", "--forwarding", family.forwarding])
        .unwrap();
    for index in 1..=3 {
        daemon.lb(&["backend", "add", family.vip, &(family.backend)(index)]).unwrap();
    }
    daemon.wait_backends_active().unwrap();
}

fn stats(daemon: &Daemon) -> Value {
    daemon.json(&["stats"]).unwrap()
}

/// Flows this balancer created itself (connections ECMP sent it).
fn created(daemon: &Daemon) -> u64 {
    stats(daemon)["flow_events"]["created"].as_u64().unwrap_or(0)
}

/// Two balancers, `connections` WebSockets, a fourth backend, then balancer
/// 1 dies (daemon, BIRD and link) while every connection keeps talking.
/// Returns the clients' report of that stream.
fn balancer_death(prefix: &str, sync: bool, family: &Family, connections: usize) -> Value {
    let mut fleet = Fleet::up(prefix, 2, 4).expect("fleet testbed");
    let _decapsulators = (family.forwarding != "dsr").then(|| {
        fleet.route_backends().expect("backends behind the router");
        Decapsulators::attach((1..=4).map(|index| fleet.backend(index)).collect())
    });
    let _servers = fleet.ws_servers(8080, 300).unwrap();
    let mut daemons: Vec<Option<Daemon>> = Vec::new();
    for index in 1..=2 {
        let daemon = fleet.start_lb(index, sync).expect("lb run");
        configure(&daemon, family);
        daemons.push(Some(daemon));
        fleet.start_bird(&fleet.balancer(index)).expect("bird");
    }
    let converged = fleet.wait_next_hops(family.vip_address, &[1, 2]).unwrap();
    println!("FIGURE router learned both balancers {converged:?} after their BIRD started");

    let (mut clients, started) = WsClients::start(&fleet.client(), family.vip, connections);
    assert_eq!(started["opened"].as_u64(), Some(connections as u64), "{started}");
    let split: Vec<u64> = daemons.iter().flatten().map(created).collect();
    println!(
        "FIGURE ECMP split of {connections} connections to {} over lb1/lb2: {split:?}; backends {}",
        family.vip, started["backends"]
    );
    assert!(
        split.iter().all(|count| *count > connections as u64 / 4),
        "ECMP used one balancer: {split:?}"
    );
    clients.round_without_breaks("opening");

    for daemon in daemons.iter().flatten() {
        daemon.lb(&["backend", "add", family.vip, &(family.backend)(4)]).unwrap();
        daemon.wait_backends_active().unwrap();
    }
    clients.round_without_breaks("adding b4");
    if sync {
        fleet::wait_synced(&daemons.iter().flatten().collect::<Vec<_>>()).unwrap();
    }

    // Balancer 1 dies while every connection exchanges a message every 200 ms.
    clients.send("stream 200 6");
    std::thread::sleep(Duration::from_millis(1_500));
    // The link first, as when a machine dies: nothing of it can close its
    // BGP session, so the router learns it through BFD.
    let killed = Instant::now();
    fleet.cut_link(1).unwrap();
    daemons[0] = None;
    fleet.stop_bird(&fleet.balancer(1));
    let withdrawn = fleet.wait_next_hops(family.vip_address, &[2]).unwrap();
    println!(
        "FIGURE the router dropped balancer 1 {withdrawn:?} after its death ({:?} to kill it)",
        killed.elapsed() - withdrawn
    );
    let stream = clients.read();
    println!("FIGURE sync {}: while balancer 1 died: {stream}", if sync { "on" } else { "off" });
    if sync {
        peer_down_in_metrics(&fleet);
    }
    stream
}

/// Balancer 2's metrics say its peer is down, and how long it has been
/// silent (the lag used to stay at its last value, near 0).
fn peer_down_in_metrics(fleet: &Fleet) {
    let text = tests::prometheus::scrape(&fleet.balancer(2)).unwrap();
    let value = |name: &str| tests::prometheus::sample(&text, name);
    let (up, lag) = (value("lb_sync_peer_up{"), value("lb_sync_peer_lag_seconds{"));
    println!("FIGURE balancer 2 about its dead peer: lb_sync_peer_up {up}, lag {lag} s");
    assert_eq!(up, 0.0, "the dead peer is up in the metrics");
    assert!(lag >= 3.0, "the dead peer's lag is {lag} s");
}

fn a_balancers_death_breaks_no_connection_with_sync() {
    let stream = balancer_death("lbf-on-", true, &V4, CONNECTIONS);
    assert_eq!(stream["newly_broken"].as_u64(), Some(0), "{stream}");
    assert_eq!(stream["ok"].as_u64(), Some(CONNECTIONS as u64), "{stream}");
    println!(
        "FIGURE longest gap any connection saw: {} ms (messages every {} ms)",
        stream["longest_gap_ms"], stream["interval_ms"]
    );
}

fn without_sync_the_same_death_breaks_the_moved_connections() {
    let stream = balancer_death("lbf-off-", false, &V4, CONNECTIONS);
    let broken = stream["newly_broken"].as_u64().unwrap();
    println!(
        "FIGURE without sync, {broken} of {CONNECTIONS} connections broke when balancer 1 died"
    );
    // About half the connections moved (ECMP), and about a quarter of those
    // hash to another backend since b4 joined.
    assert!(
        broken > CONNECTIONS as u64 / 20,
        "too few broke for the test to mean anything: {stream}"
    );
}

/// The same through a `gue` VIP to backends behind the router: flow sync
/// carries tunnelled flows as it does L2 ones, and without it the same
/// death breaks the moved connections.
fn through_gue_tunnels_a_balancers_death_breaks_no_connection_only_with_sync() {
    let connections = 2_000;
    let stream = balancer_death("lbf-gue-", true, &V4_GUE, connections);
    assert_eq!(stream["newly_broken"].as_u64(), Some(0), "{stream}");
    assert_eq!(stream["ok"].as_u64(), Some(connections as u64), "{stream}");
    let stream = balancer_death("lbf-gue-", false, &V4_GUE, connections);
    let broken = stream["newly_broken"].as_u64().unwrap();
    println!("FIGURE gue without sync: {broken} of {connections} broke when balancer 1 died");
    assert!(broken > connections as u64 / 20, "too few broke to mean anything: {stream}");
}

/// The same over IPv6: the VIP goes over the IPv6 BGP sessions, the
/// router's IPv6 ECMP route spreads the connections, and sync carries IPv6
/// flows.
fn an_ipv6_vips_connections_survive_a_balancers_death() {
    let connections = 1_000;
    let stream = balancer_death("lbf-v6-", true, &V6, connections);
    assert_eq!(stream["newly_broken"].as_u64(), Some(0), "{stream}");
    assert_eq!(stream["ok"].as_u64(), Some(connections as u64), "{stream}");
}

fn a_balancer_restarted_without_pins_learns_the_flows_before_it_is_announced() {
    let mut fleet = Fleet::up("lbf-re-", 2, 4).expect("fleet testbed");
    let _servers = fleet.ws_servers(8080, 300).unwrap();
    let mut daemons = Vec::new();
    for index in 1..=2 {
        let daemon = fleet.start_lb(index, true).expect("lb run");
        configure(&daemon, &V4);
        daemons.push(daemon);
        fleet.start_bird(&fleet.balancer(index)).expect("bird");
    }
    fleet.wait_next_hops(VIP4, &[1, 2]).unwrap();
    let (mut clients, started) = WsClients::start(&fleet.client(), VIP, CONNECTIONS);
    assert_eq!(started["opened"].as_u64(), Some(CONNECTIONS as u64), "{started}");
    for daemon in &daemons {
        daemon.lb(&["backend", "add", VIP, &fleet::backend_address(4)]).unwrap();
        daemon.wait_backends_active().unwrap();
    }
    fleet::wait_synced(&[&daemons[0], &daemons[1]]).unwrap();

    // Balancer 1 loses everything: its daemon is killed and `lb unload`
    // removes its pins (the program detaches) and its route.
    daemons[0].process = None;
    let pin_dir = daemons[0].pin_dir.display().to_string();
    let binary = tests::harness::lb_binary();
    let unload = [
        "netns",
        "exec",
        &fleet.balancer(1),
        binary.to_str().unwrap(),
        "unload",
        "--iface",
        "eth0",
        "--pin-dir",
        &pin_dir,
    ];
    let output = std::process::Command::new("ip").args(unload).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    println!("FIGURE lb unload: {}", String::from_utf8_lossy(&output.stdout).trim());
    fleet.wait_next_hops(VIP4, &[2]).unwrap();
    clients.round_without_breaks("balancer 1 unloaded (balancer 2 carries all)");

    // It comes back with no pins: a full resync from balancer 2 first, the
    // announcement after.
    let args = fleet.lb_args(1, true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    daemons[0].restart_in(&fleet.balancer(1), &args).unwrap();
    let back = fleet.wait_next_hops(VIP4, &[1, 2]).unwrap();
    let log = daemons[0].log_text();
    let synced_at = log.find("initial flow sync done").expect("the initial sync finished");
    let announced_at = log.find("VIP announced").expect("the VIP was announced");
    assert!(synced_at < announced_at, "announced before the initial sync:\n{log}");
    let peer = stats(&daemons[0])["sync"]["peers"][0].clone();
    println!("FIGURE balancer 1 announced again {back:?} after restarting; its peer: {peer}");
    assert!(peer["resyncs_received"].as_u64() >= Some(1), "{peer}");
    assert!(peer["flows_received"].as_u64() >= Some(CONNECTIONS as u64), "{peer}");
    clients.round_without_breaks("balancer 1 back");

    // Now balancer 2 dies: balancer 1 carries every connection.
    clients.send("stream 200 5");
    std::thread::sleep(Duration::from_millis(1_000));
    fleet.cut_link(2).unwrap();
    daemons[1].process = None;
    fleet.stop_bird(&fleet.balancer(2));
    fleet.wait_next_hops(VIP4, &[1]).unwrap();
    let stream = clients.read();
    println!("FIGURE balancer 2 died after balancer 1's restart: {stream}");
    assert_eq!(stream["newly_broken"].as_u64(), Some(0), "{stream}");
}

fn forged_sync_datagrams_change_nothing_and_are_counted() {
    let fleet = Fleet::up("lbf-forge-", 2, 2).expect("fleet testbed");
    let _servers = fleet.ws_servers(8080, 300).unwrap();
    let daemon = fleet.start_lb(1, true).expect("lb run");
    daemon.lb(&["vip", "add", VIP, "--check", "ws"]).unwrap();
    for index in 1..=2 {
        daemon.lb(&["backend", "add", VIP, &fleet::backend_address(index)]).unwrap();
    }
    daemon.wait_backends_active().unwrap();
    let target = format!("{}:9470", fleet::balancer_address(1));
    let key = fleet.key_file.display().to_string();
    let seed = fleet.hash_seed.to_string();
    let binary = testbed_binary();
    let forge = |ns: &str| {
        let args = [
            "netns",
            "exec",
            ns,
            binary.to_str().unwrap(),
            "forge-sync",
            &target,
            &key,
            VIP,
            &fleet::backend_address(1),
            "198.18.0.199",
            "--hash-seed",
            &seed,
        ];
        let output = std::process::Command::new("ip").args(args).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    };
    // From the peer's address (lb2 runs no daemon here), then from a stranger.
    forge(&fleet.balancer(2));
    forge(&fleet.client());
    std::thread::sleep(Duration::from_millis(300));

    let sync = stats(&daemon)["sync"].clone();
    println!("FIGURE after forged datagrams: {sync}");
    let peer = &sync["peers"][0];
    let count = |value: &Value| value.as_u64().unwrap_or(0);
    assert_eq!(count(&sync["dropped_malformed"]), 1, "garbage: {sync}");
    assert_eq!(count(&sync["dropped_unauthenticated"]), 1, "another key: {sync}");
    assert_eq!(count(&sync["dropped_stale"]), 2, "an hour old, and a replay: {sync}");
    assert_eq!(count(&sync["dropped_settings_differ"]), 1, "another hash seed: {sync}");
    assert_eq!(
        count(&sync["dropped_unknown_sender"]),
        7,
        "all seven from the client's address: {sync}"
    );
    assert_eq!((count(&peer["flows_received"]), count(&peer["flows_refused"])), (1, 1), "{sync}");
    assert_eq!(peer["state"], "refused", "the last datagram had another hash seed: {sync}");

    // Only the valid flow reached the flow table, with the backend it named.
    let established = |port: u16| {
        let client = format!("{}:{port}", fleet::CLIENT);
        daemon.json(&["lookup", VIP, &client]).unwrap()["established_backend"].clone()
    };
    assert_eq!(established(5001), fleet::backend_address(1).as_str(), "the control flow");
    assert_eq!(established(5002), Value::Null, "a backend the VIP does not have");
    assert_eq!(established(5003), Value::Null, "from a peer with another hash seed");
}

/// The hash seed `lb config show` gives.
fn hash_seed(daemon: &Daemon) -> u32 {
    let shown = daemon.lb(&["config", "show"]).unwrap();
    let line = shown.lines().find_map(|line| line.strip_prefix("hash_seed = ")).expect("a seed");
    line.parse().unwrap()
}

/// Waits until balancer `daemon`'s one peer is in `state`.
fn wait_peer(daemon: &Daemon, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let sync = stats(daemon)["sync"].clone();
        if sync["peers"][0]["state"] == state || Instant::now() > deadline {
            return sync;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two balancers started fresh as docs/scale-out.md shows, but without a
/// seed, derive theirs from the sync key: the same one, so they accept each
/// other's flows. Given two different seeds (what two random picks were
/// before), they refuse each other: the trap the derived seed removes.
fn balancers_started_without_a_seed_agree_through_the_sync_key() {
    let fleet = Fleet::up("lbf-seed-", 2, 1).expect("fleet testbed");
    let start = |index: usize, extra: &[&str]| {
        let mut args = fleet.sync_args(index);
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_named(&fleet.balancer(index), &fleet.files, &args).expect("lb run")
    };
    let first = start(1, &[]);
    let mut second = Some(start(2, &[]));
    let seeds = [hash_seed(&first), hash_seed(second.as_ref().unwrap())];
    println!("FIGURE seeds picked without --hash-seed: {seeds:?}");
    assert_eq!(seeds[0], seeds[1], "{}", first.log_text());
    assert!(first.log_text().contains("derived one from the sync key"), "{}", first.log_text());
    for daemon in [&first, second.as_ref().unwrap()] {
        let sync = wait_peer(daemon, "in-sync");
        assert_eq!(sync["peers"][0]["state"], "in-sync", "{sync}");
    }

    // Without the derived seed: balancer 2 with a seed of its own (its
    // pins and state gone, as on a fresh machine).
    let state = second.as_ref().unwrap().state.clone();
    drop(second.take());
    std::fs::remove_file(&state).unwrap();
    let other = seeds[0].wrapping_add(1).to_string();
    second = Some(start(2, &["--hash-seed", &other]));
    let sync = wait_peer(&first, "refused");
    println!("FIGURE balancer 1's peer once balancer 2 has another seed: {}", sync["peers"][0]);
    assert_eq!(sync["peers"][0]["state"], "refused", "{sync}");
    drop(second);
}

tests::root_tests!(
    through_gue_tunnels_a_balancers_death_breaks_no_connection_only_with_sync,
    balancers_started_without_a_seed_agree_through_the_sync_key,
    a_balancers_death_breaks_no_connection_with_sync,
    without_sync_the_same_death_breaks_the_moved_connections,
    an_ipv6_vips_connections_survive_a_balancers_death,
    a_balancer_restarted_without_pins_learns_the_flows_before_it_is_announced,
    forged_sync_datagrams_change_nothing_and_are_counted,
);
