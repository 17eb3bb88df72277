//! `lb agent` with real etcd, real balancers and 3,000 WebSockets: a
//! backend joins by itself once it listens, drains and leaves on SIGTERM
//! with nothing broken, and a backend whose host dies (agent and server
//! SIGKILLed) leaves every balancer within its lease's TTL, breaking only
//! its own connections. The SIGKILL is also the control for the drain:
//! without it, the backend's connections break.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use tests::etcd::Etcd;
use tests::fleet::{self, Fleet};
use tests::harness::{
    Daemon, Process, WsClients, lb_binary, signal, spawn_in, testbed_binary, wait_until,
};

const VIP: &str = "198.18.0.10:8080";
const CONNECTIONS: usize = 3_000;
const TTL: u64 = 3;

fn backend4(daemon: &Daemon) -> Option<Value> {
    let list = daemon.json(&["backend", "list"]).unwrap();
    list.as_array()?.iter().find(|b| b["address"] == fleet::backend_address(4)).cloned()
}

/// `lb agent` on backend 4, its address found by itself, with `extra`.
fn agent(fleet: &Fleet, etcd: &Etcd, name: &str, extra: &[&str]) -> Process {
    let mut args = vec!["agent".to_owned()];
    args.extend(etcd.store_args("lb"));
    let ttl = TTL.to_string();
    args.extend(["--vip", VIP, "--ttl", &ttl, "--drain-timeout", "60"].map(str::to_owned));
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = fleet.files.join(format!("{name}.log"));
    spawn_in(&fleet.backend(4), &lb_binary(), &args, Some(&log)).expect("lb agent")
}

fn server(fleet: &Fleet, index: usize) -> Process {
    let name = format!("b{index}");
    let args = ["ws-serve", &name, "8080", "600"];
    spawn_in(&fleet.backend(index), &testbed_binary(), &args, None).expect("ws-serve")
}

fn agent_log(fleet: &Fleet, name: &str) -> String {
    std::fs::read_to_string(fleet.files.join(format!("{name}.log"))).unwrap_or_default()
}

fn backend_joins_drains_and_leaves_by_itself() {
    let mut fleet = Fleet::up("lba-", 2, 4).expect("fleet testbed");
    let _servers: Vec<Process> = (1..=3).map(|index| server(&fleet, index)).collect();
    let etcd = fleet.etcd(3, false).expect("etcd");
    let daemons: Vec<Daemon> =
        (1..=2).map(|i| fleet.start_lb_with_store(i, &etcd, &[]).expect("lb run")).collect();
    daemons[0].lb(&["vip", "add", VIP, "--check", "ws"]).unwrap();
    for index in 1..=3 {
        daemons[0].lb(&["backend", "add", VIP, &fleet::backend_address(index)]).unwrap();
    }
    for (index, daemon) in daemons.iter().enumerate() {
        wait_until("3 backends up", 15, || {
            daemon.wait_backends_active().is_ok()
                && daemon.json(&["backend", "list"]).unwrap().as_array().unwrap().len() == 3
        });
        fleet.start_bird(&fleet.balancer(index + 1)).expect("bird");
    }
    fleet.wait_next_hops(tests::netns::VIP4, &[1, 2]).unwrap();
    let (mut clients, started) = WsClients::start(&fleet.client(), VIP, CONNECTIONS);
    assert_eq!(started["opened"].as_u64(), Some(CONNECTIONS as u64), "{started}");

    // The agent starts before its service listens: it waits. It puts the
    // VIP on lo itself (--configure-vip), and takes it away when it leaves.
    let b4_lo = || {
        let shown =
            tests::netns::ip(&fleet.backend(4), &["-br", "addr", "show", "dev", "lo"]).unwrap();
        String::from_utf8_lossy(&shown.stdout).contains(&format!("{}/32", tests::netns::VIP4))
    };
    tests::netns::ip(
        &fleet.backend(4),
        &["addr", "del", &format!("{}/32", tests::netns::VIP4), "dev", "lo"],
    )
    .unwrap();
    assert!(!b4_lo());
    let mut first = agent(&fleet, &etcd, "agent1", &["--configure-vip"]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(backend4(&daemons[0]).is_none(), "registered before its service listened");
    let said = agent_log(&fleet, "agent1");
    assert!(said.contains("waiting for the service"), "{said}");
    assert!(b4_lo(), "--configure-vip did not put the VIP on lo");
    let mut b4 = Some(server(&fleet, 4));
    let joined = Instant::now();
    for daemon in &daemons {
        wait_until("b4 up through its agent", 10, || {
            backend4(daemon).is_some_and(|b| b["state"] == "up" && b["origin"] == "agent")
        });
    }
    println!("FIGURE b4 up on both balancers {:?} after its server listened", joined.elapsed());
    let listed = daemons[1].lb(&["backend", "list"]).unwrap();
    println!("FIGURE lb2's backend list:\n{listed}");
    assert!(listed.contains("agent"), "{listed}");
    clients.round_without_breaks("b4 joined through lb agent");
    // A file of the operator's backends leaves the agent's alone.
    let file = fleet.files.join("operator.toml");
    let backends: String = (1..=3)
        .map(|index| format!("[[vip.backend]]\naddress = \"{}\"\n", fleet::backend_address(index)))
        .collect();
    let text = format!("[[vip]]\naddress = \"{VIP}\"\n[vip.check]\ntype = \"ws\"\n{backends}");
    std::fs::write(&file, text).unwrap();
    let diff = daemons[1].json(&["config", "diff", file.to_str().unwrap()]).unwrap();
    assert_eq!(diff["changes"], serde_json::json!([]), "{diff}");
    let fresh = clients.command("open 400");
    println!("FIGURE 400 new connections after b4 joined: {fresh}");
    let on_b4 = fresh["backends"]["b4"].as_u64().unwrap_or(0);
    assert!(on_b4 > 40, "new connections did not reach b4: {fresh}");

    // SIGTERM: drains on both, nothing breaks, leaves once its clients left.
    signal(first.0.id(), Signal::SIGTERM);
    for daemon in &daemons {
        let draining = Instant::now();
        while !backend4(daemon).is_some_and(|b| b["state"] == "draining") {
            let log = agent_log(&fleet, "agent1");
            assert!(
                draining.elapsed() < Duration::from_secs(5),
                "not draining; the agent said:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    clients.round_without_breaks("b4's agent got SIGTERM");
    std::thread::sleep(Duration::from_secs(1));
    assert!(first.0.try_wait().unwrap().is_none(), "the agent left with connections open");
    let fresh = clients.command("open 200");
    assert_eq!(fresh["backends"]["b4"], Value::Null, "a draining backend got new flows: {fresh}");
    let closed = clients.command("close b4");
    println!("FIGURE clients leaving b4: {closed}");
    let left = Instant::now();
    let status = loop {
        if let Some(status) = first.0.try_wait().unwrap() {
            break status;
        }
        assert!(left.elapsed() < Duration::from_secs(10), "{}", agent_log(&fleet, "agent1"));
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("FIGURE the agent exited {status} {:?} after b4's last clients left", left.elapsed());
    assert!(status.success(), "{}", agent_log(&fleet, "agent1"));
    assert!(!b4_lo(), "the VIP the agent added stayed on lo");
    tests::netns::ip(
        &fleet.backend(4),
        &["addr", "add", &format!("{}/32", tests::netns::VIP4), "dev", "lo"],
    )
    .unwrap();
    for daemon in &daemons {
        wait_until("b4 removed", 5, || backend4(daemon).is_none());
    }
    clients.round_without_breaks("b4 deregistered");

    // b4's host dies: agent and server SIGKILLed at once.
    let mut second = agent(&fleet, &etcd, "agent2", &[]);
    for daemon in &daemons {
        wait_until("b4 back", 10, || backend4(daemon).is_some_and(|b| b["state"] == "up"));
    }
    let fresh = clients.command("open 400");
    assert!(fresh["backends"]["b4"].as_u64().unwrap_or(0) > 40, "{fresh}");
    let _ = second.0.kill();
    drop(b4.take());
    let died = Instant::now();
    for daemon in &daemons {
        wait_until("b4 gone after its lease", TTL + 3, || backend4(daemon).is_none());
    }
    let gone = died.elapsed();
    println!("FIGURE b4 left both balancers {gone:?} after its host died (TTL {TTL} s)");
    assert!(gone < Duration::from_secs(TTL + 2), "{gone:?}");
    let round = clients.command("round");
    println!("FIGURE after b4's host died: {round}");
    let broken = round["broken_by_backend"].as_object().unwrap();
    assert!(broken.keys().all(|name| name == "b4"), "{round}");
    assert!(broken.get("b4").and_then(Value::as_u64).unwrap_or(0) > 0, "{round}");
    assert_eq!(round["moved"], 0, "{round}");
}

tests::root_tests!(backend_joins_drains_and_leaves_by_itself);
