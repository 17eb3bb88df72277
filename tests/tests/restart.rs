//! Restarts without interruption: the datapath is pinned, so killing `lb run`
//! leaves it forwarding, and a new `lb run` adopts it, tables, flows and
//! counters included.

use std::process::{Command, Stdio};
use std::time::Duration;

use tests::harness::{Daemon, start_servers, testbed_binary};
use tests::netns::{self, CLIENT4, LB_IFACE, Testbed};

const VIP: &str = "198.18.0.10:80";

fn xdp_attached(testbed: &Testbed) -> bool {
    netns::runs_xdp(&testbed.balancer(), LB_IFACE).unwrap()
}

fn sigkill_restart_and_a_backend_change_break_no_connection() {
    let testbed = Testbed::up("lbe-rs-", 3).expect("testbed");
    let _servers = start_servers(&testbed, 80).expect("servers");
    let mut daemon = Daemon::start(&testbed, &[]).expect("lb run");
    daemon.lb(&["vip", "add", VIP]).unwrap();
    for index in 1..=2 {
        daemon.lb(&["backend", "add", VIP, &netns::backend4(index)]).unwrap();
    }
    daemon.wait_backends_active().unwrap();

    // Continuous connections for 8 s, one every 10 ms.
    let client = Command::new("ip")
        .args(["netns", "exec", &testbed.client()])
        .arg(testbed_binary())
        .args(["client-loop", "tcp", VIP, CLIENT4, "30000", "8", "10"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));

    // SIGKILL: no chance to clean up. The pinned program keeps forwarding.
    let pid = daemon.process.as_ref().unwrap().0.id();
    tests::harness::signal(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = daemon.process.as_mut().unwrap().0.wait();
    assert!(xdp_attached(&testbed), "the program went with the daemon");
    std::thread::sleep(Duration::from_millis(1000));

    daemon.restart(&testbed, &[]).unwrap();
    let log = daemon.log_text();
    let adopted =
        log.lines().find(|line| line.contains("adopting its maps")).unwrap_or_default().to_owned();
    println!("FIGURE restarted daemon: {adopted}");
    assert!(adopted.contains("active_flows=") && !adopted.contains("forwarded_packets=0"), "{log}");
    let stats = daemon.json(&["stats"]).unwrap();
    assert!(
        stats["reasons"]["forwarded"].as_u64().unwrap() > 100,
        "counters were not kept: {stats}"
    );

    // A backend change through the restarted daemon.
    daemon.lb(&["backend", "add", VIP, &netns::backend4(3)]).unwrap();
    daemon.wait_backends_active().unwrap();

    let output = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let failures: Vec<&&str> = lines.iter().filter(|line| line.contains("ERROR")).collect();
    let after_b3 = lines.iter().filter(|line| line.ends_with(" b3")).count();
    println!(
        "FIGURE {} connections across SIGKILL, restart and adding b3: {} failed, {after_b3} reached b3",
        lines.len(),
        failures.len()
    );
    assert!(lines.len() > 400, "too few connections: {}", lines.len());
    assert!(failures.is_empty(), "connections failed: {failures:?}");
    assert!(after_b3 > 0, "the backend added after the restart got nothing");
}

fn an_incompatible_pinned_datapath_is_refused_and_lb_unload_removes_it() {
    let testbed = Testbed::up("lbe-pn-", 1).expect("testbed");
    let mut daemon = Daemon::start(&testbed, &[]).expect("lb run");
    daemon.lb(&["vip", "add", VIP]).unwrap();
    let refused = daemon.unload();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("lb run is serving"), "{refused:?}");

    // A second lb run on the same interface is refused before it attaches anything.
    let other = daemon.state.with_file_name("second");
    let second_run = |pin_dir: &std::path::Path| {
        Command::new("ip")
            .args(["netns", "exec", &testbed.balancer()])
            .arg(tests::harness::lb_binary())
            .arg("--socket")
            .arg(other.with_extension("sock"))
            .args(["run", "--iface", LB_IFACE, "--metrics", "off", "--pin-dir"])
            .arg(pin_dir)
            .arg("--state")
            .arg(other.with_extension("toml"))
            .output()
            .unwrap()
    };
    let second = second_run(&daemon.pin_dir);
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second lb run started: {said}");
    assert!(said.contains("another lb run serves this interface"), "{said}");
    assert!(daemon.lb(&["vip", "list"]).unwrap().contains(VIP), "the first daemon stopped serving");

    // With another --pin-dir it is refused by the program in the way, named,
    // and leaves no pins (the maps would hold hundreds of MB).
    let elsewhere = daemon
        .pin_dir
        .with_file_name(format!("{}other", daemon.pin_dir.file_name().unwrap().to_string_lossy()));
    let third = second_run(&elsewhere);
    let said = String::from_utf8_lossy(&third.stderr);
    assert!(!third.status.success(), "a third lb run started: {said}");
    assert!(
        said.contains("already has an XDP program attached (program id")
            && said.contains("ip link set dev eth0 xdp off")
            && !said.contains("falling back"),
        "{said}"
    );
    assert!(!elsewhere.join(LB_IFACE).exists(), "the refused start left pins");
    assert!(!other.with_extension("sock").exists(), "the refused start left its socket");
    let _ = std::fs::remove_dir(&elsewhere);

    // SIGTERM without --detach-on-exit: the program stays.
    let pid = daemon.process.as_ref().unwrap().0.id();
    tests::harness::signal(pid, nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.process.as_mut().unwrap().0.wait().unwrap().success());
    assert!(xdp_attached(&testbed));

    // Another table size does not fit the pinned maps: refused, saying how.
    let config = daemon.state.with_file_name("other.toml");
    std::fs::write(&config, "table_size = 251\n").unwrap();
    let error =
        daemon.restart(&testbed, &["--config", config.to_str().unwrap()]).unwrap_err().to_string();
    assert!(
        error.contains("does not fit this configuration (table_size is 65537 there but 251 here)")
            && error.contains("lb unload --iface"),
        "{error}"
    );
    daemon.process = None;

    let unloaded = daemon.unload();
    assert!(unloaded.status.success(), "{unloaded:?}");
    assert!(!xdp_attached(&testbed), "lb unload left the program attached");
}

/// The `hash_seed` line of a daemon's state file.
fn saved_seed(daemon: &Daemon) -> u32 {
    let state = std::fs::read_to_string(&daemon.state).unwrap();
    let line = state.lines().find_map(|line| line.strip_prefix("hash_seed = ")).unwrap();
    line.parse().unwrap()
}

/// A fresh installation picks a random hash seed and keeps it: across a
/// restart (which adopts the pinned datapath only if the seed is the same),
/// and under a config file that sets none; `--hash-seed` replaces it.
fn a_fresh_installation_picks_a_random_hash_seed_and_keeps_it() {
    let testbed = Testbed::up("lbe-sd-", 1).expect("testbed");
    let mut seeds = Vec::new();
    for _ in 0..3 {
        let daemon = Daemon::start(&testbed, &[]).expect("lb run");
        seeds.push(saved_seed(&daemon));
    }
    println!("FIGURE seeds of three fresh installations: {seeds:?}");
    assert!(seeds[0] != seeds[1] && seeds[1] != seeds[2], "not random: {seeds:?}");

    let mut daemon = Daemon::start(&testbed, &[]).expect("lb run");
    daemon.lb(&["vip", "add", VIP]).unwrap();
    let seed = saved_seed(&daemon);
    daemon.restart(&testbed, &[]).expect("the restart adopts the pinned datapath");
    assert!(daemon.log_text().contains("adopting its maps"), "{}", daemon.log_text());
    assert_eq!(saved_seed(&daemon), seed, "the restart kept the seed");

    // A config file without hash_seed keeps the state's seed; one with it wins.
    let config = daemon.state.with_file_name("no-seed.toml");
    std::fs::write(&config, "[[vip]]\naddress = \"198.18.0.10:80\"\n").unwrap();
    daemon.restart(&testbed, &["--config", config.to_str().unwrap()]).expect("lb run --config");
    assert_eq!(saved_seed(&daemon), seed, "a config without hash_seed kept the state's");

    // Another seed does not fit the pinned datapath: unload, then --hash-seed.
    daemon.process = None;
    let unloaded = daemon.unload();
    assert!(unloaded.status.success(), "{unloaded:?}");
    daemon.restart(&testbed, &["--hash-seed", "7"]).expect("lb run --hash-seed 7");
    assert_eq!(saved_seed(&daemon), 7);
}

tests::root_tests!(
    sigkill_restart_and_a_backend_change_break_no_connection,
    an_incompatible_pinned_datapath_is_refused_and_lb_unload_removes_it,
    a_fresh_installation_picks_a_random_hash_seed_and_keeps_it,
);
