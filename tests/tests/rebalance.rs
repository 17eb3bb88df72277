//! The rebalancer end to end: 3,000 WebSockets that ping every second and
//! reconnect when closed, on three backends under least-connections, then a
//! fourth. Off, the fourth stays empty (the control); in dry-run nothing is
//! closed but the count is reported; on, every backend comes within 10% of
//! the mean, at most 1.2x the fewest closes that could do it, within the
//! rate even across a daemon restart, only on crowded backends, and the
//! backends' own sockets fall as the balancer says. It pauses while a
//! backend is down, and silent clients are never closed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::harness::{Daemon, Process, WsClients, spawn_in, testbed_binary, wait_until};
use tests::netns::{self, Testbed};

const VIP: &str = "198.18.0.10:8080";
const PINGING: usize = 3_000;
const SILENT: usize = 150;
const RATE: u64 = 50;
const BAND: f64 = 0.10;

fn server(testbed: &Testbed, index: usize) -> Process {
    let name = format!("b{index}");
    spawn_in(&testbed.backend(index), &testbed_binary(), &["ws-serve", &name, "8080", "900"], None)
        .expect("ws-serve")
}

fn name_of(address: &str) -> String {
    (1..=4).find(|&i| netns::backend4(i) == address).map(|i| format!("b{i}")).expect("known")
}

/// Per backend (`b1`...): a field of `lb backend list`.
fn per_backend(daemon: &Daemon, field: &str) -> BTreeMap<String, u64> {
    let list = daemon.json(&["backend", "list", VIP]).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|b| (name_of(b["address"].as_str().unwrap()), b[field].as_u64().unwrap_or(0)))
        .collect()
}

fn vip_field(daemon: &Daemon, field: &str) -> Value {
    daemon.json(&["vip", "list"]).unwrap()[0][field].clone()
}

/// The datapath's count of closes (pinned: it survives a restart).
fn shed(daemon: &Daemon) -> u64 {
    daemon.json(&["stats"]).unwrap()["flow_events"]["shed"].as_u64().unwrap()
}

/// How far the furthest backend is from the mean, as a fraction of it.
fn spread(counts: &BTreeMap<String, u64>) -> f64 {
    let mean = counts.values().sum::<u64>() as f64 / counts.len() as f64;
    counts.values().map(|&c| (c as f64 - mean).abs() / mean).fold(0.0, f64::max)
}

/// The fewest connections that must move for every backend to be within
/// [`BAND`] of the mean: what must leave the crowded ones, or reach the
/// empty ones, whichever is more.
fn fewest_moves(counts: &BTreeMap<String, u64>) -> f64 {
    let mean = counts.values().sum::<u64>() as f64 / counts.len() as f64;
    let above: f64 = counts.values().map(|&c| (c as f64 - mean * (1.0 + BAND)).max(0.0)).sum();
    let below: f64 = counts.values().map(|&c| (mean * (1.0 - BAND) - c as f64).max(0.0)).sum();
    above.max(below)
}

/// Established TCP connections to port 8080 in each backend's namespace.
fn sockets(testbed: &Testbed) -> BTreeMap<String, u64> {
    (1..=4)
        .map(|index| {
            let out = netns::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &testbed.backend(index),
                    "ss",
                    "-Htn",
                    "state",
                    "established",
                    "( sport = :8080 )",
                ],
            )
            .unwrap();
            (format!("b{index}"), String::from_utf8_lossy(&out.stdout).lines().count() as u64)
        })
        .collect()
}

fn counts_of(value: &Value) -> BTreeMap<String, u64> {
    serde_json::from_value(value.clone()).unwrap_or_default()
}

fn after_a_scale_up_rebalancing_evens_out_long_lived_connections_within_the_rate() {
    let testbed = Testbed::up("lbe-rb-", 4).expect("testbed");
    let mut servers: Vec<Option<Process>> = (1..=4).map(|i| Some(server(&testbed, i))).collect();
    let mut daemon = Daemon::start(&testbed, &[]).expect("lb run");
    daemon.lb(&["vip", "add", VIP, "--check", "ws", "--scheduler", "least-connections"]).unwrap();
    for index in 1..=3 {
        daemon.lb(&["backend", "add", VIP, &netns::backend4(index)]).unwrap();
    }
    daemon.wait_backends_active().unwrap();
    let (mut silent, opened) = WsClients::start(&testbed.client(), VIP, SILENT);
    assert_eq!(opened["opened"].as_u64(), Some(SILENT as u64), "{opened}");
    let (mut clients, opened) = WsClients::start(&testbed.client(), VIP, PINGING);
    assert_eq!(opened["opened"].as_u64(), Some(PINGING as u64), "{opened}");
    daemon.lb(&["backend", "add", VIP, &netns::backend4(4)]).unwrap();
    daemon.wait_backends_active().unwrap();

    // Settings it refuses, and why.
    daemon.lb(&["vip", "add", "198.18.0.10:8053/udp", "--scheduler", "least-connections"]).unwrap();
    let udp = daemon.command(&["vip", "set", "198.18.0.10:8053/udp", "--rebalance", "on"]);
    let said = String::from_utf8_lossy(&udp.stderr);
    assert!(!udp.status.success() && said.contains("only TCP"), "{said}");
    daemon.lb(&["vip", "remove", "198.18.0.10:8053/udp"]).unwrap();
    let maglev = daemon.command(&["vip", "add", "198.18.0.10:8090", "--scheduler", "maglev"]);
    assert!(maglev.status.success());
    let refused = daemon.command(&["vip", "set", "198.18.0.10:8090", "--rebalance", "on"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("needs --scheduler least-connections"), "{said}");
    daemon.lb(&["vip", "remove", "198.18.0.10:8090"]).unwrap();

    // The control: off, nobody leaves, so the new backend stays empty.
    let control = clients.command("live 60 1000");
    println!("FIGURE rebalancing off, 60 s of pings: {control}");
    assert_eq!(control["closed"].as_u64(), Some(0), "{control}");
    let before = per_backend(&daemon, "active_flows");
    let total: u64 = before.values().sum();
    println!("FIGURE active flows with rebalancing off after 60 s: {before:?}");
    assert!((before["b4"] as f64) < 0.05 * total as f64, "b4 filled by itself: {before:?}");
    let sockets_before = sockets(&testbed);

    // Dry-run: counted and reported, nothing closed.
    daemon.lb(&["vip", "set", VIP, "--rebalance", "dry-run"]).unwrap();
    let dry = clients.command("live 15 1000");
    let would = per_backend(&daemon, "rebalance_would_close");
    println!(
        "FIGURE dry-run for 15 s: {dry}; would close {would:?}; {}",
        vip_field(&daemon, "rebalancing")
    );
    assert_eq!(dry["closed"].as_u64(), Some(0), "dry-run closed connections: {dry}");
    assert_eq!(shed(&daemon), 0);
    let would_total: u64 = would.values().sum();
    assert!(would["b4"] == 0 && would_total as f64 >= fewest_moves(&before), "{would:?}");

    // On, with a restart in the middle.
    let fewest = fewest_moves(&before);
    daemon
        .lb(&[
            "vip",
            "set",
            VIP,
            "--rebalance",
            "on",
            "--rebalance-band",
            "10",
            "--rebalance-rate",
            "50",
        ])
        .unwrap();
    let started = Instant::now();
    clients.send("live 75 1000");
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let (mut converged, mut restarted) = (None, false);
    while started.elapsed() < Duration::from_secs(70) {
        let closed = shed(&daemon);
        samples.push((started.elapsed(), closed));
        let counts = per_backend(&daemon, "active_flows");
        if converged.is_none() && spread(&counts) <= BAND {
            converged = Some(started.elapsed());
            println!("FIGURE within ±10% of the mean after {:.1?}: {counts:?}", started.elapsed());
        }
        if !restarted && closed >= 250 {
            restarted = true;
            println!("FIGURE restarting lb run at {:.1?} with {closed} closed", started.elapsed());
            daemon.restart(&testbed, &[]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let live = clients.read();
    println!("FIGURE rebalancing on: {live}");
    assert!(restarted, "never reached 250 closes");
    let converged = converged.expect("the backends never came within 10% of the mean");
    assert!(converged <= Duration::from_secs(60), "took {converged:?}");

    // The rate, across the restart: any window of two seconds or more holds
    // at most a second's worth more than the rate allows (a mark closes on
    // the client's next ping, up to a second after it was made).
    for (i, (t0, c0)) in samples.iter().enumerate() {
        for (t1, c1) in &samples[i + 1..] {
            let window = (*t1 - *t0).as_secs_f64();
            if window >= 2.0 {
                let allowed = RATE as f64 * (window + 1.0);
                assert!((c1 - c0) as f64 <= allowed, "{} closes in {window:.1} s", c1 - c0);
            }
        }
    }

    let closed = live["closed"].as_u64().unwrap();
    let shed_total = shed(&daemon);
    println!(
        "FIGURE closed {closed} (datapath: {shed_total}) against the fewest {fewest:.0} that even out {before:?}: {:.2}x",
        closed as f64 / fewest
    );
    assert_eq!(closed, shed_total, "every close the datapath made is one the clients saw");
    assert!(closed as f64 <= 1.2 * fewest, "closed {closed}, the fewest was {fewest}");
    assert_eq!(live["reconnect_failed"].as_u64(), Some(0), "{live}");
    assert_eq!(live["ok"].as_u64(), Some(PINGING as u64), "{live}");
    let closed_on = counts_of(&live["closed_by_backend"]);
    assert!(!closed_on.contains_key("b4"), "closed on b4, which was never crowded: {closed_on:?}");
    let open = counts_of(&live["open_by_backend"]);
    assert!(spread(&open) <= BAND + 0.02, "the clients hold {open:?}");

    // The backends' own sockets: what the balancer counts, and fewer on
    // the crowded ones by what was closed there.
    let counted = wait_until("the daemon counts what the clients hold", 10, || {
        let counts = per_backend(&daemon, "active_flows");
        counts.values().sum::<u64>() == (PINGING + SILENT) as u64
    });
    let _ = counted;
    let after = per_backend(&daemon, "active_flows");
    let sockets_after = sockets(&testbed);
    println!(
        "FIGURE sockets per backend before {sockets_before:?}, after {sockets_after:?}; counted {after:?}"
    );
    for (backend, &count) in &after {
        let held = sockets_after[backend] as f64;
        assert!(
            (held - count as f64).abs() <= 0.02 * count as f64 + 5.0,
            "{backend}: {held} sockets, {count} counted"
        );
    }
    for backend in ["b1", "b2", "b3"] {
        assert!(
            sockets_after[backend] + 150 < sockets_before[backend],
            "{backend}'s sockets stayed"
        );
    }
    let closed_per = per_backend(&daemon, "rebalance_closed");
    println!("FIGURE lb backend list: closed since the restart {closed_per:?}");
    assert_eq!(closed_per["b4"], 0);

    // Balanced, it closes nothing more: a VIP within its band is never
    // touched.
    let status = vip_field(&daemon, "rebalancing");
    assert_eq!(status.as_str(), Some("balanced"), "{status}");
    let settled = clients.command("live 5 1000");
    assert_eq!(settled["closed"].as_u64(), Some(0), "closed inside the band: {settled}");

    // A backend goes down: its clients reconnect to the others, which are
    // then crowded, and nothing is closed while it is down.
    let closed_before = shed(&daemon);
    servers[3] = None;
    let b4 = netns::backend4(4);
    daemon.wait_backends(|address| if address == b4 { "down" } else { "up" }).unwrap();
    let down = clients.command("live 12 1000");
    let status = vip_field(&daemon, "rebalancing");
    println!("FIGURE b4 down: {down}; rebalancer: {status}");
    assert!(
        status.as_str().unwrap().starts_with("paused: backend 198.18.0.104 is down"),
        "{status}"
    );
    assert_eq!(shed(&daemon), closed_before, "closed while a backend was down");
    assert_eq!(counts_of(&down["closed_by_backend"]).keys().collect::<Vec<_>>(), ["b4"], "{down}");

    // The silent clients sent nothing all along, and none was closed.
    let round = silent.command("round");
    println!("FIGURE silent clients at the end: {round}");
    assert_eq!(round["newly_broken"].as_u64(), Some(0), "a silent client was closed: {round}");
    drop(servers);
}

tests::root_tests!(after_a_scale_up_rebalancing_evens_out_long_lived_connections_within_the_rate);
