//! The fleet store with real etcd and real daemons: balancers that share one
//! store agree on every VIP and backend, racing writers lose nothing, the
//! fleet settings are the store's, bad keys are refused by name, an etcd
//! outage changes nothing that is forwarded, and TLS keeps strangers out.
//! A balancer without the store is the control that shows what it adds.

use std::time::{Duration, Instant};

use lb_userspace::api::{self, Body, Reply, Request};
use serde_json::Value;
use tests::fleet::{self, Fleet};
use tests::harness::{Daemon, WsClients};

const VIP: &str = "198.18.0.10:8080";

fn backends(daemon: &Daemon) -> Vec<Value> {
    daemon.json(&["backend", "list"]).unwrap().as_array().cloned().unwrap_or_default()
}

/// Waits until `daemon` lists `count` backends; how long that took.
fn wait_backends(daemon: &Daemon, count: usize) -> Duration {
    let start = Instant::now();
    while backends(daemon).len() != count {
        assert!(start.elapsed() < Duration::from_secs(15), "{:?}", backends(daemon));
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

/// The backend the daemon's table gives each of `count` client flows,
/// asked through the control API (as `lb lookup` does, without a process each).
fn lookups(daemon: &Daemon, vip: &str, count: u16) -> Vec<String> {
    let vip = lb_userspace::model::parse_vip(vip, None).unwrap();
    (0..count)
        .map(|port| {
            let client = format!("{}:{}", fleet::CLIENT, 20_000 + port).parse().unwrap();
            match api::call(&daemon.socket, &Request::Lookup { vip, client }).unwrap() {
                Reply::Ok(Body::Lookup(lookup)) => format!("{:?}", lookup.backend),
                other => panic!("lookup: {other:?}"),
            }
        })
        .collect()
}

fn store_status(daemon: &Daemon) -> Value {
    daemon.json(&["store", "status"]).unwrap()
}

/// A VIP and three backends added on balancer 1 appear on balancer 2 within
/// a second; both pick the same backend for 1,000 flows and show the same
/// configuration. Balancer 3, without the store, has nothing: the store is
/// what carried it. A balancer told another seed than the store's refuses
/// to start and names it.
fn two_balancers_with_one_store_agree() {
    let mut fleet = Fleet::up("lbs-two-", 3, 3).expect("fleet testbed");
    let _servers = fleet.ws_servers(8080, 300).unwrap();
    let etcd = fleet.etcd(3, false).expect("etcd");
    let first = fleet.start_lb_with_store(1, &etcd, &[]).expect("lb run 1");
    let second = fleet.start_lb_with_store(2, &etcd, &[]).expect("lb run 2");
    let alone = Daemon::start_named(&fleet.balancer(3), &fleet.files, &[]).expect("lb run 3");

    first.lb(&["vip", "add", VIP, "--check", "ws"]).unwrap();
    for index in 1..=3 {
        first.lb(&["backend", "add", VIP, &fleet::backend_address(index)]).unwrap();
    }
    let took = wait_backends(&second, 3);
    println!("FIGURE the last backend added on lb1 was on lb2 {took:?} after lb1 answered");
    assert!(took < Duration::from_secs(1), "{took:?}");
    first.wait_backends_active().unwrap();
    second.wait_backends_active().unwrap();
    let (on_first, on_second) = (lookups(&first, VIP, 1_000), lookups(&second, VIP, 1_000));
    let differ = on_first.iter().zip(&on_second).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "lb1 and lb2 disagree on {differ} of 1,000 flows");
    assert_eq!(first.lb(&["config", "show"]).unwrap(), second.lb(&["config", "show"]).unwrap());
    let status = store_status(&second);
    assert_eq!(status["state"], "connected", "{status}");
    assert_eq!(status["applied_revision"], store_status(&first)["applied_revision"]);
    fleet.start_bird(&fleet.balancer(1)).expect("bird");
    fleet.wait_next_hops(tests::netns::VIP4, &[1]).unwrap();
    let (_clients, started) = WsClients::start(&fleet.client(), VIP, 50);
    assert_eq!(started["opened"].as_u64(), Some(50), "{started}");

    // The control: without the store, balancer 3 has no VIP at all.
    assert_eq!(alone.json(&["vip", "list"]).unwrap(), serde_json::json!([]));
    let output = alone.command(&["lookup", VIP, "198.19.0.1:20000"]);
    assert_eq!(output.status.code(), Some(3), "{}", String::from_utf8_lossy(&output.stderr));

    // A balancer told another seed than the store's refuses to start.
    drop(alone);
    let seed = first.lb(&["config", "show"]).unwrap();
    let seed: u32 =
        seed.lines().find_map(|l| l.strip_prefix("hash_seed = ")).unwrap().parse().unwrap();
    let other = seed.wrapping_add(1).to_string();
    let refused =
        fleet.start_lb_with_store(3, &etcd, &["--hash-seed", &other]).err().expect("refused");
    let refused = format!("{refused:#}");
    assert!(refused.contains(&format!("hash_seed {seed} in the store, {other} here")), "{refused}");
}

tests::root_tests!(two_balancers_with_one_store_agree);
