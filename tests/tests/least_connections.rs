//! Least-connections end to end, side by side with maglev: two VIPs on the
//! same backends, one per scheduler, and one WebSocket client process each,
//! going through the same rolling restart or scale-up at the same time.
//! Under least-connections the open connections end within 10% of the
//! weights' split; under maglev the test prints (and asserts) the imbalance
//! that hashing alone leaves. No established connection breaks but those of
//! the restarted server. The scale-up runs through `ipip` tunnels to routed
//! backends too (tests/src/routed.rs), where least-connections counts the
//! same flow table.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::harness::{Daemon, Process, WsClients, spawn_in, testbed_binary};
use tests::netns::{self, Testbed};
use tests::routed::{self, Decapsulators};

const MAGLEV: &str = "198.18.0.10:8080";
const LEAST: &str = "198.18.0.10:8081";
const OPENED_FIRST: usize = 3_000;
/// The connections that arrive after the restart or the scale-up, at a
/// steady rate: 15 s of arrivals, so the daemon counts and reschedules about
/// fifteen times while they come.
const ARRIVING: usize = 1_500;
const PER_SECOND: usize = 100;
const TOLERANCE: f64 = 0.10;

/// Both VIPs' WebSocket servers on one backend: killed on drop.
fn servers(testbed: &Testbed, index: usize) -> [Process; 2] {
    let name = format!("b{index}");
    [MAGLEV, LEAST].map(|vip| {
        let port = vip.rsplit(':').next().expect("a port");
        spawn_in(
            &testbed.backend(index),
            &testbed_binary(),
            &["ws-serve", &name, port, "300"],
            None,
        )
        .expect("ws-serve")
    })
}

/// The balancer a scenario drives: its daemon, backend `index`'s address
/// (1 to 4), and how the VIPs forward.
struct Balancer<'a> {
    daemon: &'a Daemon,
    address: fn(usize) -> String,
    vip_args: &'a [&'a str],
}

impl<'a> Balancer<'a> {
    /// Backends on the balancer's own segment, `dsr`.
    fn on_segment(daemon: &'a Daemon) -> Self {
        Self { daemon, address: netns::backend4, vip_args: &[] }
    }
}

/// Declares both VIPs with the first `weights.len()` backends; the second
/// VIP is least-connections from the start, or maglev until it is `lb vip set`.
fn declare(balancer: &Balancer, weights: &[u32], least_from_the_start: bool) {
    let scheduler = if least_from_the_start { "least-connections" } else { "maglev" };
    for (vip, scheduler) in [(MAGLEV, "maglev"), (LEAST, scheduler)] {
        let mut add = vec!["vip", "add", vip, "--check", "ws", "--scheduler", scheduler];
        add.extend_from_slice(balancer.vip_args);
        balancer.daemon.lb(&add).unwrap();
    }
    for (index, weight) in (1..).zip(weights) {
        add_backend(balancer, index, *weight);
    }
    balancer.daemon.wait_backends_active().unwrap();
}

fn add_backend(balancer: &Balancer, index: usize, weight: u32) {
    for vip in [MAGLEV, LEAST] {
        let (address, weight) = ((balancer.address)(index), weight.to_string());
        balancer.daemon.lb(&["backend", "add", vip, &address, "--weight", &weight]).unwrap();
    }
}

/// One client process per VIP, each holding [`OPENED_FIRST`] connections.
fn open_first(testbed: &Testbed) -> [WsClients; 2] {
    [MAGLEV, LEAST].map(|vip| {
        let (clients, started) = WsClients::start(&testbed.client(), vip, OPENED_FIRST);
        println!("FIGURE {vip}: opened {started}");
        assert_eq!(started["opened"].as_u64(), Some(OPENED_FIRST as u64), "{vip}: {started}");
        clients
    })
}

/// How far the most unbalanced backend is from its part of the total, by
/// weight, as a fraction of that part (0.1 = 10% off).
fn imbalance(counts: &BTreeMap<String, u64>, weights: &[u32]) -> f64 {
    let total: u64 = counts.values().sum();
    let total_weight: u32 = weights.iter().sum();
    (1..)
        .zip(weights)
        .map(|(index, weight)| {
            let expected = total as f64 * f64::from(*weight) / f64::from(total_weight);
            let count = counts.get(&format!("b{index}")).copied().unwrap_or(0);
            (count as f64 - expected).abs() / expected
        })
        .fold(0.0, f64::max)
}

fn open_by_backend(round: &Value) -> BTreeMap<String, u64> {
    serde_json::from_value(round["open_by_backend"].clone()).expect("open_by_backend")
}

/// Active flows per backend (`b1`, ...) of `vip`, as the daemon last counted them.
fn active_flows(balancer: &Balancer, vip: &str) -> BTreeMap<String, u64> {
    let list = balancer.daemon.json(&["backend", "list", vip]).unwrap();
    let name = |address: &str| {
        let index = (1..=4).find(|&i| (balancer.address)(i) == address);
        index.map(|i| format!("b{i}")).expect("known")
    };
    list.as_array()
        .unwrap()
        .iter()
        .map(|b| (name(b["address"].as_str().unwrap()), b["active_flows"].as_u64().unwrap()))
        .collect()
}

/// Opens [`ARRIVING`] connections on both VIPs at [`PER_SECOND`] while
/// watching the daemon's counts for the least-connections VIP; returns when
/// those counts first came within [`TOLERANCE`] of the weights' split, if they did.
fn arrive_and_watch(
    balancer: &Balancer,
    clients: &mut [WsClients; 2],
    weights: &[u32],
) -> Option<Duration> {
    for side in clients.iter_mut() {
        side.send(&format!("pace {ARRIVING} {PER_SECOND}"));
    }
    let start = Instant::now();
    let pacing = Duration::from_secs((ARRIVING / PER_SECOND) as u64 + 3);
    let mut converged = None;
    while start.elapsed() < pacing {
        if converged.is_none() && imbalance(&active_flows(balancer, LEAST), weights) <= TOLERANCE {
            converged = Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for (side, vip) in clients.iter_mut().zip([MAGLEV, LEAST]) {
        let paced = side.read();
        println!("FIGURE {vip}: {ARRIVING} arrivals at {PER_SECOND}/s landed on {paced}");
        assert_eq!(paced["failed"].as_u64(), Some(0), "{vip}: {paced}");
    }
    converged
}

/// The end of a scenario: no connection broke or moved since the last
/// check, the least-connections VIP is within [`TOLERANCE`] of the weights'
/// split and maglev is not, and the daemon counts what the clients hold.
fn assert_even_under_least_connections_only(
    balancer: &Balancer,
    clients: &mut [WsClients; 2],
    weights: &[u32],
    converged: Option<Duration>,
) {
    let rounds = clients.each_mut().map(|side| side.round_without_breaks("the arrivals"));
    let [maglev, least] = rounds.map(|round| open_by_backend(&round));
    let (maglev_off, least_off) = (imbalance(&maglev, weights), imbalance(&least, weights));
    println!(
        "FIGURE maglev: open connections {maglev:?}, {:.1}% off the weights' split",
        maglev_off * 100.0
    );
    println!("FIGURE least-connections: open connections {least:?}, {:.1}% off", least_off * 100.0);
    match converged {
        Some(time) => println!(
            "FIGURE least-connections converged within ±10% {time:.1?} after the arrivals began"
        ),
        None => println!("FIGURE least-connections: the daemon's counts never came within ±10%"),
    }
    assert!(least_off <= TOLERANCE, "least-connections left {least:?} for weights {weights:?}");
    assert!(
        maglev_off > TOLERANCE,
        "maglev alone was balanced too ({maglev:?}): the scenario shows nothing"
    );
    // The daemon's count is the clients' truth: every open connection, and
    // none of those that closed.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut counted = active_flows(balancer, LEAST);
    while counted != least && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        counted = active_flows(balancer, LEAST);
    }
    assert_eq!(counted, least, "the daemon's active flows differ from what the clients hold");
}

/// Backend 1's server restarts: its clients reconnect at once and land on
/// the others; once it is healthy again, [`ARRIVING`] more connections come.
fn rolling_restart(prefix: &str, weights: [u32; 3]) {
    let testbed = Testbed::up(prefix, 3).expect("testbed");
    let mut servers: Vec<Option<[Process; 2]>> =
        (1..=3).map(|index| Some(servers(&testbed, index))).collect();
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    let balancer = Balancer::on_segment(&daemon);
    declare(&balancer, &weights, true);
    let mut clients = open_first(&testbed);

    servers[0] = None;
    let b1 = netns::backend4(1);
    daemon.wait_backends(|address| if address == b1 { "down" } else { "up" }).unwrap();
    for (side, vip) in clients.iter_mut().zip([MAGLEV, LEAST]) {
        let round = side.command("round");
        let broken = round["broken_by_backend"].as_object().unwrap();
        assert_eq!(broken.keys().collect::<Vec<_>>(), ["b1"], "{vip}: only b1's broke: {round}");
        let reconnected = side.command("reconnect");
        println!("FIGURE {vip}: b1's clients reconnected to {reconnected}");
        assert_eq!(reconnected["failed"].as_u64(), Some(0), "{vip}: {reconnected}");
        assert!(reconnected["backends"].get("b1").is_none(), "{vip}: {reconnected}");
    }
    // Closed flows stop counting: b1's reach 0 while the server is down.
    let deadline = Instant::now() + Duration::from_secs(5);
    while active_flows(&balancer, LEAST)["b1"] != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = active_flows(&balancer, LEAST);
    println!("FIGURE active flows with b1 down, after its clients reconnected: {before:?}");
    assert_eq!(before["b1"], 0, "b1's closed flows still count: {before:?}");

    servers[0] = Some(self::servers(&testbed, 1));
    daemon.wait_backends_active().unwrap();
    // What `lb backend list` tells the operator: b1's share of new flows.
    let b1_share = |vip: &str| {
        let list = daemon.json(&["backend", "list", vip]).unwrap();
        let row = list.as_array().unwrap().iter().find(|b| b["address"] == b1.as_str()).cloned();
        row.unwrap()["new_flow_share"].as_f64().unwrap()
    };
    let (by_hash, by_load) = (b1_share(MAGLEV), b1_share(LEAST));
    let weighted = f64::from(weights[0]) / f64::from(weights.iter().sum::<u32>());
    println!(
        "FIGURE b1's share of new flows once back: maglev {by_hash:.3}, least-connections {by_load:.3}"
    );
    assert!((by_hash - weighted).abs() < 0.02, "maglev gives b1 {by_hash}, not {weighted}");
    assert!(by_load > 0.9, "least-connections gives the emptied b1 only {by_load}");
    for (side, vip) in clients.iter_mut().zip([MAGLEV, LEAST]) {
        side.round_without_breaks(&format!("b1 came back ({vip})"));
    }
    let converged = arrive_and_watch(&balancer, &mut clients, &weights);
    assert_even_under_least_connections_only(&balancer, &mut clients, &weights, converged);
    drop(servers);
}

fn after_a_rolling_restart_least_connections_evens_out_open_websockets() {
    rolling_restart("lbe-lcr-", [1, 1, 1]);
}

fn weights_one_one_two_stay_capacity_multipliers_under_least_connections() {
    rolling_restart("lbe-lcw-", [1, 1, 2]);
}

/// Three backends hold [`OPENED_FIRST`] connections; a fourth is added and
/// [`ARRIVING`] more come. `testbed` has four backends ready to serve.
fn scale_up(testbed: &Testbed, balancer: &Balancer) {
    let servers: Vec<[Process; 2]> = (1..=4).map(|index| servers(testbed, index)).collect();
    let daemon = balancer.daemon;
    declare(balancer, &[1, 1, 1], false);
    let mut clients = open_first(testbed);
    // The operator switches a running VIP: nothing established moves.
    daemon.lb(&["vip", "set", LEAST, "--scheduler", "least-connections"]).unwrap();
    let listed = daemon.json(&["vip", "list"]).unwrap();
    let schedulers: Vec<&str> =
        listed.as_array().unwrap().iter().map(|v| v["scheduler"].as_str().unwrap()).collect();
    assert_eq!(schedulers, ["maglev", "least-connections"], "{listed}");
    clients[1].round_without_breaks("switching to least-connections");
    add_backend(balancer, 4, 1);
    daemon.wait_backends_active().unwrap();
    for (side, vip) in clients.iter_mut().zip([MAGLEV, LEAST]) {
        side.round_without_breaks(&format!("adding b4 ({vip})"));
    }
    let weights = [1, 1, 1, 1];
    let converged = arrive_and_watch(balancer, &mut clients, &weights);
    assert_even_under_least_connections_only(balancer, &mut clients, &weights, converged);
    drop(servers);
}

fn after_a_scale_up_the_new_backend_catches_up_under_least_connections() {
    let testbed = Testbed::up("lbe-lcs-", 4).expect("testbed");
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    scale_up(&testbed, &Balancer::on_segment(&daemon));
}

/// The scale-up with every VIP `ipip` to backends behind a router.
fn through_ipip_tunnels_the_new_backend_catches_up_under_least_connections() {
    let testbed = routed::up("lbr-lcs-", 4).expect("routed testbed");
    let _decapsulators =
        Decapsulators::attach((1..=4).map(|index| testbed.backend(index)).collect());
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    let balancer = Balancer {
        daemon: &daemon,
        address: routed::backend4,
        vip_args: &["--forwarding", "ipip"],
    };
    scale_up(&testbed, &balancer);
}

tests::root_tests!(
    after_a_rolling_restart_least_connections_evens_out_open_websockets,
    after_a_scale_up_the_new_backend_catches_up_under_least_connections,
    through_ipip_tunnels_the_new_backend_catches_up_under_least_connections,
    weights_one_one_two_stay_capacity_multipliers_under_least_connections,
);
