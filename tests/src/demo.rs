//! The scale-out demo behind `cargo xtask run --balancers N`: the fleet
//! testbed (tests/src/fleet.rs) with real `lb run` and BIRD, every balancer
//! following one 3-member etcd (the VIP typed once), WebSockets spread over
//! the balancers by the router's ECMP, a fourth backend joining through
//! `lb agent`, then balancer 1 killed while every connection keeps talking.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

use crate::fleet::{self, Fleet};
use crate::harness::{Daemon, WsClients, lb_binary, spawn_in};
use crate::netns::{VIP4, ip};

const PREFIX: &str = "lbdemo-";
const VIP: &str = "198.18.0.10:8080";
const BACKENDS: usize = 4;
const CONNECTIONS: usize = 1_000;

/// Runs the demo with `balancers` balancers (2 to 8); everything it built is
/// removed when it returns, on success or error.
pub fn fleet(balancers: usize) -> anyhow::Result<()> {
    ensure!((2..=8).contains(&balancers), "--balancers takes 2 to 8, not {balancers}");
    println!(
        "== Building the fleet testbed: namespaces {PREFIX}client, {PREFIX}router (BIRD, ECMP), \
         {PREFIX}lb1..lb{balancers} (lb run and BIRD each), {PREFIX}b1..b{BACKENDS}"
    );
    let mut fleet = Fleet::up(PREFIX, balancers, BACKENDS)?;
    println!("   its files (sync key, logs, BIRD configurations, etcd): {}", fleet.files.display());
    let _servers = fleet.ws_servers(8080, 600)?;
    let etcd = fleet.etcd(3, false)?;
    println!(
        "\n== The fleet store: etcd with 3 members, {PREFIX}etcd1..3 at {} (docs/fleet.md)",
        etcd.endpoints()
    );

    let mut daemons = Vec::new();
    for index in 1..=balancers {
        let args = fleet.store_lb_args(index, &etcd, &[]);
        println!("\n== {}: lb run --iface eth0 {}", fleet.balancer(index), args.join(" "));
        daemons.push(Some(fleet.start_lb_with_store(index, &etcd, &[])?));
    }
    let first = daemons[0].as_ref().context("balancer 1")?;
    println!("\n== The VIP and three backends, typed once on {}", fleet.balancer(1));
    for args in [
        vec!["vip", "add", VIP, "--check", "ws"],
        vec!["backend", "add", VIP, &fleet::backend_address(1)],
        vec!["backend", "add", VIP, &fleet::backend_address(2)],
        vec!["backend", "add", VIP, &fleet::backend_address(3)],
    ] {
        operator(first, &args)?;
    }
    for (index, daemon) in daemons.iter().flatten().enumerate() {
        wait_backends(daemon, 3)?;
        daemon.wait_backends_active()?;
        fleet.start_bird(&fleet.balancer(index + 1))?;
    }
    let last = daemons.iter().flatten().last().context("a balancer")?;
    println!(
        "$ lb store status   (on {})\n{}",
        fleet.balancer(balancers),
        last.lb(&["store", "status"])?.trim_end()
    );
    let all: Vec<usize> = (1..=balancers).collect();
    let learned = fleet.wait_next_hops(VIP4, &all)?;
    println!("\n== The router learned the VIP from every balancer over BGP ({learned:.1?})");
    router_route(&fleet)?;

    println!("\n== {CONNECTIONS} WebSocket connections from the client to {VIP}");
    let (mut clients, started) = WsClients::start(&fleet.client(), VIP, CONNECTIONS);
    ensure!(started["opened"].as_u64() == Some(CONNECTIONS as u64), "opening: {started}");
    let split: Vec<String> = daemons
        .iter()
        .flatten()
        .zip(1..)
        .map(|(daemon, index)| {
            let created = daemon
                .json(&["stats"])
                .map_or(0, |s| s["flow_events"]["created"].as_u64().unwrap_or(0));
            format!("lb{index} {created}")
        })
        .collect();
    println!("ECMP spread them over the balancers: {}", split.join(", "));
    println!("and Maglev over the backends: {}", started["backends"]);

    println!(
        "\n== A fourth backend joins by itself: lb agent on {} while the connections are open",
        fleet.backend(4)
    );
    let agent_args = [
        vec!["agent".to_owned()],
        etcd.store_args("lb"),
        ["--vip", VIP, "--ttl", "3"].map(str::to_owned).to_vec(),
    ]
    .concat();
    println!("$ lb {}", agent_args.join(" "));
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let agent_log = fleet.files.join("agent-b4.log");
    let _agent = spawn_in(&fleet.backend(4), &lb_binary(), &agent_args, Some(&agent_log))?;
    for daemon in daemons.iter().flatten() {
        wait_backends(daemon, 4)?;
        daemon.wait_backends_active()?;
    }
    let listed = daemons[0].as_ref().context("balancer 1")?.lb(&["backend", "list"])?;
    println!("$ lb backend list   (on {}; ORIGIN says who declared each)", fleet.balancer(1));
    for line in listed.lines() {
        println!("{}", line.split_whitespace().take(5).collect::<Vec<_>>().join("  "));
    }
    let round = clients.command("round");
    println!(
        "a message on every connection: {} answered, {} broken, {} moved to another backend",
        round["ok"], round["newly_broken"], round["moved"]
    );
    fleet::wait_synced(&daemons.iter().flatten().collect::<Vec<_>>())?;
    println!("\n$ lb stats   (on {}; its sync section)", fleet.balancer(1));
    let stats = daemons[0].as_ref().context("balancer 1")?.lb(&["stats"])?;
    let sync_section = stats.lines().skip_while(|line| !line.starts_with("Flow sync")).take(4);
    for line in sync_section {
        println!("{line}");
    }

    println!(
        "\n== Balancer 1 dies (its link, lb run and BIRD) while every connection sends a message every 200 ms"
    );
    clients.send("stream 200 6");
    std::thread::sleep(Duration::from_millis(1_500));
    let killed = Instant::now();
    fleet.cut_link(1)?;
    daemons[0] = None;
    fleet.stop_bird(&fleet.balancer(1));
    let rest: Vec<usize> = (2..=balancers).collect();
    fleet.wait_next_hops(VIP4, &rest)?;
    println!("the router dropped balancer 1 {:.2?} after its link went (BFD)", killed.elapsed());
    router_route(&fleet)?;
    let stream = clients.read();
    println!(
        "the connections: {} of {CONNECTIONS} still open, {} broken; the longest gap any of them saw: {} ms",
        stream["ok"], stream["newly_broken"], stream["longest_gap_ms"]
    );
    println!(
        "\n== Demo done; removing the namespaces. `scripts/testbed.sh up --balancers N` keeps a fleet up to explore."
    );
    Ok(())
}

/// Waits until `daemon` lists `count` backends (the store's revision arrived).
fn wait_backends(daemon: &Daemon, count: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let listed = daemon.json(&["backend", "list"])?;
        if listed.as_array().map(Vec::len) == Some(count) {
            return Ok(());
        }
        ensure!(start.elapsed() < Duration::from_secs(15), "{count} backends not listed: {listed}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs an `lb` command as an operator types it, printing both.
fn operator(daemon: &Daemon, args: &[&str]) -> anyhow::Result<()> {
    println!("$ lb {}\n{}", args.join(" "), daemon.lb(args)?.trim_end());
    Ok(())
}

fn router_route(fleet: &Fleet) -> anyhow::Result<()> {
    let output = ip(&fleet.router(), &["route", "show", VIP4])?;
    println!(
        "$ ip route show {VIP4}   (on the router)\n{}",
        String::from_utf8_lossy(&output.stdout).trim_end()
    );
    Ok(())
}
