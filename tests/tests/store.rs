//! The fleet store with real etcd and real daemons: balancers that share one
//! store agree on every VIP and backend, racing writers lose nothing, the
//! fleet settings are the store's, bad keys are refused by name, an etcd
//! outage changes nothing that is forwarded, and TLS keeps strangers out.
//! A balancer without the store is the control that shows what it adds.

use std::time::{Duration, Instant};

use lb_userspace::api::{self, Body, Reply, Request};
use serde_json::Value;
use tests::fleet::{self, Fleet};
use tests::harness::{Daemon, WsClients, wait_until};

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
            let client: std::net::SocketAddr = if vip.address.is_ipv4() {
                format!("{}:{}", fleet::CLIENT, 20_000 + port)
            } else {
                format!("[{}]:{}", fleet::CLIENT6, 20_000 + port)
            }
            .parse()
            .unwrap();
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

/// The `lb_store_*` lines of balancer `index`'s /metrics, as a scrape reads them.
fn store_metrics(fleet: &Fleet, index: usize) -> String {
    let text = tests::prometheus::scrape(&fleet.balancer(index)).unwrap();
    text.lines().filter(|line| line.starts_with("lb_store_")).collect::<Vec<_>>().join("\n")
}

const VIP6: &str = "[fd00:198:18::10]:8080";

/// The 200 racing backends: addresses of backend 1, so each resolves.
fn racing_backend(index: usize) -> String {
    format!("fd00:198:18::1:{index:x}")
}

/// Two balancers add 100 backends each at the same time: every write that
/// lost a race was validated again and retried, so all 200 are on both,
/// with identical tables.
fn racing_writers_lose_nothing() {
    let fleet = Fleet::up("lbs-race-", 2, 1).expect("fleet testbed");
    for index in 1..=200 {
        let address = format!("{}/64", racing_backend(index));
        tests::netns::ip(&fleet.backend(1), &["addr", "add", &address, "dev", "eth0", "nodad"])
            .unwrap();
    }
    let etcd = fleet.etcd(3, false).expect("etcd");
    let daemons: Vec<Daemon> =
        (1..=2).map(|i| fleet.start_lb_with_store(i, &etcd, &[]).expect("lb run")).collect();
    daemons[0].lb(&["vip", "add", VIP6, "--check", "none"]).unwrap();
    wait_until("the VIP on lb2", 5, || {
        daemons[1].json(&["vip", "list"]).unwrap() != serde_json::json!([])
    });
    let start = Instant::now();
    std::thread::scope(|scope| {
        for (writer, daemon) in daemons.iter().enumerate() {
            scope.spawn(move || {
                for index in (1 + writer * 100)..=(100 + writer * 100) {
                    daemon.lb(&["backend", "add", VIP6, &racing_backend(index)]).unwrap();
                }
            });
        }
    });
    println!("FIGURE two writers added 100 backends each in {:?}", start.elapsed());
    for daemon in &daemons {
        wait_backends(daemon, 200);
        daemon.wait_backends_active().unwrap();
    }
    let entries = |daemon: &Daemon| -> Vec<(String, u64)> {
        let mut list: Vec<(String, u64)> = backends(daemon)
            .iter()
            .map(|b| {
                (b["address"].as_str().unwrap().to_owned(), b["table_entries"].as_u64().unwrap())
            })
            .collect();
        list.sort();
        list
    };
    assert_eq!(entries(&daemons[0]), entries(&daemons[1]));
    let (on_first, on_second) =
        (lookups(&daemons[0], VIP6, 1_000), lookups(&daemons[1], VIP6, 1_000));
    assert_eq!(on_first, on_second);
    let distinct: std::collections::BTreeSet<&String> = on_first.iter().collect();
    assert!(distinct.len() > 100, "1,000 flows reached only {} backends", distinct.len());
    let races: usize = daemons.iter().map(|d| d.log_text().matches("lost a race").count()).sum();
    println!("FIGURE writes that lost a race and were retried: {races} of 200");
    assert!(races > 0, "the writers never raced, so this run showed nothing");
}

/// Keys written by hand that do not parse, or name a VIP the store does
/// not hold, are refused by name on every balancer and change nothing; an
/// etcd member's death changes nothing; the whole store's outage keeps
/// every connection, health checks still take a failed backend out, CLI
/// writes fail naming the store, and a balancer restarted meanwhile comes
/// back from its local copy. Back online, both converge on the store's
/// revision; a balancer cut off while the store compacted reads it all again.
fn store_outages_and_bad_keys_lose_nothing() {
    let mut fleet = Fleet::up("lbs-out-", 2, 3).expect("fleet testbed");
    let mut servers = fleet.ws_servers(8080, 600).unwrap();
    let mut etcd = fleet.etcd(3, false).expect("etcd");
    let mut daemons: Vec<Daemon> =
        (1..=2).map(|i| fleet.start_lb_with_store(i, &etcd, &[]).expect("lb run")).collect();
    daemons[0].lb(&["vip", "add", VIP, "--check", "ws"]).unwrap();
    for index in 1..=3 {
        daemons[0].lb(&["backend", "add", VIP, &fleet::backend_address(index)]).unwrap();
    }
    for (index, daemon) in daemons.iter().enumerate() {
        wait_backends(daemon, 3);
        daemon.wait_backends_active().unwrap();
        fleet.start_bird(&fleet.balancer(index + 1)).expect("bird");
    }
    fleet.wait_next_hops(tests::netns::VIP4, &[1, 2]).unwrap();
    let (mut clients, started) = WsClients::start(&fleet.client(), VIP, 300);
    assert_eq!(started["opened"].as_u64(), Some(300), "{started}");

    // Bad keys, by hand.
    let garbage = [
        ("/lb/vips/198.18.0.10:9090/tcp", "not json"),
        ("/lb/backends/198.18.0.99:80/tcp/198.18.0.101", r#"{"weight":1,"draining":false}"#),
        ("/lb/backends/198.18.0.10:8080/tcp/not-an-address", r#"{"weight":1,"draining":false}"#),
    ];
    for (key, value) in garbage {
        etcd.etcdctl(&["put", key, value]).unwrap();
    }
    for daemon in &daemons {
        wait_until("the bad keys refused", 5, || {
            store_status(daemon)["refused"].as_array().map(Vec::len) == Some(3)
        });
        let refused = store_status(daemon)["refused"].to_string();
        for (key, _) in garbage {
            assert!(refused.contains(key), "{key} not in {refused}");
            assert!(daemon.log_text().contains(key), "{key} not in the log");
        }
        assert_eq!(backends(daemon).len(), 3);
        assert_eq!(daemon.json(&["vip", "list"]).unwrap().as_array().unwrap().len(), 1);
    }
    let metrics = store_metrics(&fleet, 2);
    assert!(
        metrics.lines().any(|l| l.starts_with("lb_store_refused_keys{") && l.ends_with(" 3.0")),
        "{metrics}"
    );
    let shown = daemons[0].lb(&["store", "status"]).unwrap();
    assert!(shown.contains("not-an-address"), "{shown}");
    clients.round_without_breaks("bad keys written by hand");

    // One member of three dies: writes go on.
    etcd.kill(1);
    // If it led the cluster, the other two elect a leader first (etcd's
    // election timeout): a write meanwhile may time out, and changes nothing.
    etcd.wait_healthy().unwrap();
    daemons[0].lb(&["backend", "set", VIP, &fleet::backend_address(1), "--weight", "2"]).unwrap();
    wait_until("the weight on lb2", 10, || backends(&daemons[1]).iter().any(|b| b["weight"] == 2));
    clients.round_without_breaks("one etcd member killed");

    // All of them die.
    etcd.kill_all();
    for daemon in &daemons {
        wait_until("the store unreachable", 15, || store_status(daemon)["state"] == "unreachable");
    }
    let metrics = store_metrics(&fleet, 2);
    assert!(
        metrics.lines().any(|l| l.starts_with("lb_store_up{") && l.ends_with(" 0")),
        "{metrics}"
    );
    let refused =
        daemons[1].command(&["backend", "set", VIP, &fleet::backend_address(1), "--weight", "3"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    println!("FIGURE a write during the outage: exit {:?}: {said}", refused.status.code());
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains("198.18.0.201:2379"), "{said}");
    clients.round_without_breaks("every etcd member killed");
    drop(servers.remove(2));
    for daemon in &daemons {
        daemon
            .wait_backends(
                |address| if address == fleet::backend_address(3) { "down" } else { "up" },
            )
            .unwrap();
    }
    let round = clients.command("round");
    println!("FIGURE after b3 died during the outage: {round}");
    let broken = round["broken_by_backend"].as_object().unwrap();
    assert!(broken.keys().all(|name| name == "b3"), "{round}");
    assert_eq!(round["moved"], 0, "{round}");

    let args = fleet.store_lb_args(2, &etcd, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    daemons[1].restart_in(&fleet.balancer(2), &args).unwrap();
    let status = store_status(&daemons[1]);
    assert!(status["restored_from_local"].as_i64().is_some(), "{status}");
    assert!(
        daemons[1].log_text().contains("starting from the local copy"),
        "{}",
        daemons[1].log_text()
    );
    assert_eq!(backends(&daemons[1]).len(), 3);
    daemons[1]
        .wait_backends(|address| if address == fleet::backend_address(3) { "down" } else { "up" })
        .unwrap();
    let round = clients.command("round");
    assert_eq!(
        (round["newly_broken"].as_u64(), round["moved"].as_u64()),
        (Some(0), Some(0)),
        "lb2 restarted: {round}"
    );

    // Back online: both on the store's revision, nothing moved.
    etcd.start_all().unwrap();
    let latest = etcd.revision().unwrap();
    for daemon in &daemons {
        let took = wait_until("the store's revision applied", 20, || {
            let status = store_status(daemon);
            status["state"] == "connected" && status["applied_revision"] == latest
        });
        println!("FIGURE caught up with revision {latest} {took:?} after etcd was healthy");
    }
    assert_eq!(
        daemons[0].lb(&["config", "show"]).unwrap(),
        daemons[1].lb(&["config", "show"]).unwrap()
    );
    let round = clients.command("round");
    assert_eq!(
        (round["newly_broken"].as_u64(), round["moved"].as_u64()),
        (Some(0), Some(0)),
        "etcd back: {round}"
    );

    // lb2 cut off from the store while it changes and compacts.
    let ns = fleet.balancer(2);
    tests::netns::run("ip", &["netns", "exec", &ns, "nft", "add table inet cut; add chain inet cut out { type filter hook output priority 0; tcp dport 2379 drop; }"]).unwrap();
    wait_until("lb2 sees the store unreachable", 15, || {
        store_status(&daemons[1])["state"] == "unreachable"
    });
    // Two changes, then a compaction of everything before the second: lb2
    // resumes from the first, which is gone.
    daemons[0].lb(&["backend", "set", VIP, &fleet::backend_address(2), "--weight", "3"]).unwrap();
    daemons[0].lb(&["backend", "set", VIP, &fleet::backend_address(1), "--weight", "1"]).unwrap();
    let latest = etcd.revision().unwrap();
    etcd.etcdctl(&["compact", &latest.to_string()]).unwrap();
    tests::netns::run("ip", &["netns", "exec", &ns, "nft", "delete table inet cut"]).unwrap();
    wait_until("lb2 caught up after the compaction", 20, || {
        store_status(&daemons[1])["applied_revision"] == latest
    });
    assert!(daemons[1].log_text().contains("compacted"), "{}", daemons[1].log_text());
    assert!(backends(&daemons[1]).iter().any(|b| b["weight"] == 3));
    let round = clients.command("round");
    assert_eq!(
        (round["newly_broken"].as_u64(), round["moved"].as_u64()),
        (Some(0), Some(0)),
        "after the compaction: {round}"
    );
}

/// With client certificates required, a balancer with the test's
/// certificate follows the store, and one with a stranger's is refused by
/// etcd and says so (naming the store) instead of starting.
fn tls_keeps_strangers_out() {
    let fleet = Fleet::up("lbs-tls-", 2, 1).expect("fleet testbed");
    let etcd = fleet.etcd(3, true).expect("etcd with TLS");
    let trusted =
        fleet.start_lb_with_store(1, &etcd, &[]).expect("lb run with the client certificate");
    trusted.lb(&["vip", "add", VIP, "--check", "none"]).unwrap();
    assert_eq!(store_status(&trusted)["state"], "connected");
    let tls = etcd.tls.as_ref().unwrap();
    let mut args = vec![
        "--announce-table".to_owned(),
        fleet::ANNOUNCE_TABLE.to_owned(),
        "--store".to_owned(),
        format!("etcd://{}/lb", etcd.endpoints()),
        "--store-ca".to_owned(),
        tls.ca.display().to_string(),
    ];
    let stranger = [("--store-cert", &tls.stranger_cert), ("--store-key", &tls.stranger_key)];
    args.extend(
        stranger.iter().flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()]),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let refused =
        Daemon::start_named(&fleet.balancer(2), &fleet.files, &args).err().expect("refused");
    let refused = format!("{refused:#}");
    println!(
        "FIGURE a stranger's certificate: {}",
        refused.lines().find(|l| l.contains("store")).unwrap_or_default()
    );
    assert!(refused.contains("198.18.0.201:2379"), "{refused}");
    assert!(refused.to_lowercase().contains("certificate"), "{refused}");
}

tests::root_tests!(
    two_balancers_with_one_store_agree,
    racing_writers_lose_nothing,
    store_outages_and_bad_keys_lose_nothing,
    tls_keeps_strangers_out,
);
