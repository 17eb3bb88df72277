//! The long-lived-connection scenario, shared by the L2 (`dsr`) testbed and
//! the routed one (`ipip`/`gue`): WebSocket connections through the
//! balancer survive a backend being added, a weight change and a drain;
//! when a backend fails, only its connections break and they reconnect
//! elsewhere.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Daemon, Process, WsClients, spawn_in, testbed_binary};
use crate::netns::Testbed;

/// Where the scenario runs: a testbed with four backends (their
/// namespaces ready to serve), a daemon on it, and the VIP to declare.
pub struct Scenario<'a> {
    pub testbed: &'a Testbed,
    pub daemon: &'a Daemon,
    /// `address:port` of the VIP (port 8080).
    pub vip: &'a str,
    /// Extra `lb vip add` arguments (the forwarding mode).
    pub vip_args: &'a [&'a str],
    /// Backend `index`'s address (1 to 4).
    pub backend: fn(usize) -> String,
    pub connections: usize,
}

fn count(value: &Value, backend: &str) -> u64 {
    value[backend].as_u64().unwrap_or(0)
}

fn backend_row(daemon: &Daemon, address: &str) -> Value {
    let list = daemon.json(&["backend", "list"]).unwrap();
    list.as_array().unwrap().iter().find(|b| b["address"] == address).cloned().unwrap()
}

/// Runs the scenario; panics on the first broken promise.
pub fn survive_changes(scenario: &Scenario) {
    let Scenario { testbed, daemon, vip, vip_args, backend, connections } = *scenario;
    let mut servers: Vec<Option<Process>> = (1..=4)
        .map(|index| {
            let name = format!("b{index}");
            let args = ["ws-serve", &name, "8080", "300"];
            Some(spawn_in(&testbed.backend(index), &testbed_binary(), &args, None).unwrap())
        })
        .collect();
    let mut add = vec!["vip", "add", vip, "--check", "ws"];
    add.extend_from_slice(vip_args);
    daemon.lb(&add).unwrap();
    for index in 1..=3 {
        daemon.lb(&["backend", "add", vip, &backend(index)]).unwrap();
    }
    daemon.wait_backends_active().unwrap();

    let (mut clients, started) = WsClients::start(&testbed.client(), vip, connections);
    println!("FIGURE opened: {started}");
    assert_eq!(started["opened"].as_u64(), Some(connections as u64), "{started}");
    let first = &started["backends"];
    // A fair third each, give or take a fifth of it.
    let least = connections as u64 * 4 / 15;
    for name in ["b1", "b2", "b3"] {
        assert!(count(first, name) > least, "{name}: {first}");
    }
    clients.round_without_breaks("opening");

    // A fourth backend: new connections reach it, established ones stay.
    daemon.lb(&["backend", "add", vip, &backend(4)]).unwrap();
    daemon.wait_backends_active().unwrap();
    clients.round_without_breaks("adding b4");
    let opened = clients.command("open 400");
    println!("FIGURE 400 new connections after adding b4: {opened}");
    assert!(count(&opened["backends"], "b4") > 40, "b4 gets new connections: {opened}");

    // A weight change moves no established connection.
    daemon.lb(&["backend", "set", vip, &backend(1), "--weight", "3"]).unwrap();
    clients.round_without_breaks("weighting b1 x3");

    // Drain b2: its connections continue, it gets no new ones, and its
    // active-flow count tells the operator how many remain.
    let b2 = backend(2);
    daemon.lb(&["backend", "drain", vip, &b2]).unwrap();
    let round = clients.round_without_breaks("draining b2");
    // Active flows are counted about every second off the daemon's loop:
    // wait for a count taken after every connection was confirmed.
    let on_b2 = count(&started["backends"], "b2");
    let since = Instant::now();
    let mut row = backend_row(daemon, &b2);
    while row["active_flows"].as_u64().unwrap() < on_b2 && since.elapsed().as_secs() < 10 {
        std::thread::sleep(Duration::from_millis(200));
        row = backend_row(daemon, &b2);
    }
    println!(
        "FIGURE b2 while draining: state {} active_flows {}",
        row["state"], row["active_flows"]
    );
    assert_eq!(row["state"], "draining");
    let active = row["active_flows"].as_u64().unwrap();
    assert!(
        active >= on_b2 && active <= on_b2 + 200,
        "b2 holds {on_b2} test connections, flow table says {active}"
    );
    let opened_draining = clients.command("open 300");
    assert_eq!(
        count(&opened_draining["backends"], "b2"),
        0,
        "a draining backend got new connections: {opened_draining}"
    );
    assert_eq!(round["ok"].as_u64(), Some(connections as u64 + 400));

    // b3 fails: exactly its connections break, and they reconnect elsewhere.
    servers[2] = None;
    let b3 = backend(3);
    daemon
        .wait_backends(|address| match address {
            a if a == b3 => "down",
            a if a == b2 => "draining",
            _ => "up",
        })
        .unwrap();
    let round = clients.command("round");
    println!("FIGURE after b3 failed: {round}");
    let on_b3 = count(&started["backends"], "b3")
        + count(&opened["backends"], "b3")
        + count(&opened_draining["backends"], "b3");
    let broken = round["broken_by_backend"].clone();
    assert_eq!(broken.as_object().unwrap().keys().collect::<Vec<_>>(), ["b3"], "{round}");
    assert!(count(&broken, "b3") >= on_b3, "{round}");
    let reconnected = clients.command("reconnect");
    println!("FIGURE reconnects after b3 failed: {reconnected}");
    assert_eq!(reconnected["failed"].as_u64(), Some(0), "{reconnected}");
    let landed = reconnected["backends"].as_object().unwrap();
    assert!(landed.keys().all(|b| b == "b1" || b == "b4"), "reconnects landed on {landed:?}");
    clients.round_without_breaks("reconnecting");
    drop(servers);
}
