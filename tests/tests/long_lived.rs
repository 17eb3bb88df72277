//! Long-lived connections end to end: 5,000 WebSocket connections through the
//! balancer survive a backend being added, a weight change and a drain; when
//! a backend fails, only its connections break and they reconnect elsewhere.

use serde_json::Value;
use tests::harness::{Daemon, Process, WsClients, spawn_in, testbed_binary};
use tests::netns::{self, Testbed};

const VIP: &str = "198.18.0.10:8080";
const CONNECTIONS: usize = 5_000;

fn count(value: &Value, backend: &str) -> u64 {
    value[backend].as_u64().unwrap_or(0)
}

fn backend_row(daemon: &Daemon, address: &str) -> Value {
    let list = daemon.json(&["backend", "list"]).unwrap();
    list.as_array().unwrap().iter().find(|b| b["address"] == address).cloned().unwrap()
}

fn five_thousand_websockets_survive_add_weight_and_drain_and_only_a_failed_backends_break() {
    let testbed = Testbed::up("lbe-ws-", 4).expect("testbed");
    let mut servers: Vec<Option<Process>> = (1..=4)
        .map(|index| {
            let name = format!("b{index}");
            Some(
                spawn_in(
                    &testbed.backend(index),
                    &testbed_binary(),
                    &["ws-serve", &name, "8080", "300"],
                    None,
                )
                .unwrap(),
            )
        })
        .collect();
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    daemon.lb(&["vip", "add", VIP, "--check", "ws"]).unwrap();
    for index in 1..=3 {
        daemon.lb(&["backend", "add", VIP, &netns::backend4(index)]).unwrap();
    }
    daemon.wait_backends_active().unwrap();

    let (mut clients, started) = WsClients::start(&testbed.client(), VIP, CONNECTIONS);
    println!("FIGURE opened: {started}");
    assert_eq!(started["opened"].as_u64(), Some(CONNECTIONS as u64), "{started}");
    let first = &started["backends"];
    for backend in ["b1", "b2", "b3"] {
        assert!(count(first, backend) > 1_300, "{backend}: {first}");
    }
    clients.round_without_breaks("opening");

    // A fourth backend: new connections reach it, established ones stay.
    daemon.lb(&["backend", "add", VIP, &netns::backend4(4)]).unwrap();
    daemon.wait_backends_active().unwrap();
    clients.round_without_breaks("adding b4");
    let opened = clients.command("open 400");
    println!("FIGURE 400 new connections after adding b4: {opened}");
    assert!(count(&opened["backends"], "b4") > 40, "b4 gets new connections: {opened}");

    // A weight change moves no established connection.
    daemon.lb(&["backend", "set", VIP, &netns::backend4(1), "--weight", "3"]).unwrap();
    clients.round_without_breaks("weighting b1 x3");

    // Drain b2: its connections continue, it gets no new ones, and its
    // active-flow count tells the operator how many remain.
    let b2 = netns::backend4(2);
    daemon.lb(&["backend", "drain", VIP, &b2]).unwrap();
    let round = clients.round_without_breaks("draining b2");
    // Active flows are counted about every second off the daemon's loop: wait for a
    // count taken after every connection was confirmed.
    let on_b2 = count(&started["backends"], "b2");
    let since = std::time::Instant::now();
    let mut row = backend_row(&daemon, &b2);
    while row["active_flows"].as_u64().unwrap() < on_b2 && since.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        row = backend_row(&daemon, &b2);
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
    let opened = clients.command("open 300");
    assert_eq!(
        count(&opened["backends"], "b2"),
        0,
        "a draining backend got new connections: {opened}"
    );
    assert_eq!(round["ok"].as_u64(), Some(CONNECTIONS as u64 + 400));

    // b3 fails: exactly its connections break, and they reconnect elsewhere.
    servers[2] = None;
    let b3 = netns::backend4(3);
    daemon
        .wait_backends(|address| match address {
            a if a == b3 => "down",
            a if a == b2 => "draining",
            _ => "up",
        })
        .unwrap();
    let round = clients.command("round");
    println!("FIGURE after b3 failed: {round}");
    let on_b3 = count(&started["backends"], "b3") + count(&opened["backends"], "b3");
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

tests::root_tests!(
    five_thousand_websockets_survive_add_weight_and_drain_and_only_a_failed_backends_break,
);
