//! The guards around changes an operator makes: a removal that would break
//! open WebSockets is refused with the count and the safe way (and --force
//! shows what it prevents); `--when-drained` finishes the job unattended;
//! a reload follows the restart's rule for changes made with `lb`, and a
//! refused reload fails the command that asked for it.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::harness::{Daemon, Process, WsClients, lb_binary, spawn_in, testbed_binary, wait_until};
use tests::netns::{self, Testbed};

const VIP: &str = "198.18.0.10:8080";
const SHOWN: &str = "198.18.0.10:8080/tcp";

/// A configuration of the VIP with these backends: (index, weight, draining).
fn config(backends: &[(usize, u32, bool)]) -> String {
    let mut text = format!("[[vip]]\naddress = \"{VIP}\"\n\n[vip.check]\ntype = \"ws\"\n");
    for (index, weight, draining) in backends {
        text.push_str(&format!(
            "\n[[vip.backend]]\naddress = \"{}\"\nweight = {weight}\ndraining = {draining}\n",
            netns::backend4(*index)
        ));
    }
    text
}

fn servers(testbed: &Testbed) -> Vec<Process> {
    (1..=3)
        .map(|index| {
            let name = format!("b{index}");
            let args = ["ws-serve", name.as_str(), "8080", "300"];
            spawn_in(&testbed.backend(index), &testbed_binary(), &args, None).unwrap()
        })
        .collect()
}

fn backend_row(daemon: &Daemon, address: &str) -> Option<Value> {
    let list = daemon.json(&["backend", "list"]).unwrap();
    list.as_array().unwrap().iter().find(|b| b["address"] == address).cloned()
}

/// Waits until the daemon has counted at least `connections` active flows on `address`.
fn counted(daemon: &Daemon, address: &str, connections: u64) -> u64 {
    wait_until("the connections counted", 10, || {
        backend_row(daemon, address)
            .is_some_and(|b| b["active_flows"].as_u64() >= Some(connections))
    });
    backend_row(daemon, address).unwrap()["active_flows"].as_u64().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn removals_that_would_break_flows_are_refused_until_drained() {
    let testbed = Testbed::up("lbe-gd-", 3).expect("testbed");
    let _servers = servers(&testbed);
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("lb.toml");
    std::fs::write(&file, config(&[(1, 1, false), (2, 1, false), (3, 1, false)])).unwrap();
    let daemon = Daemon::start(&testbed, &["--config", file.to_str().unwrap()]).expect("lb run");
    daemon.wait_backends_active().unwrap();
    let (mut clients, started) = WsClients::start(&testbed.client(), VIP, 600);
    assert_eq!(started["opened"].as_u64(), Some(600), "{started}");
    let (b1, b2) = (netns::backend4(1), netns::backend4(2));
    let on_b2 = counted(&daemon, &b2, started["backends"]["b2"].as_u64().unwrap());

    // Removing b2 or the VIP would break its WebSockets: refused, with the way out.
    let refused = daemon.command(&["backend", "remove", VIP, &b2]);
    let said = stderr(&refused);
    println!("FIGURE removing a backend with flows: exit {:?}: {said}", refused.status.code());
    assert_eq!(refused.status.code(), Some(1), "{said}");
    for words in [&format!("carries {on_b2} active flows"), "lb backend drain", "--when-drained"] {
        assert!(said.contains(words), "{words} missing from: {said}");
    }
    let refused = daemon.command(&["vip", "remove", VIP]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(stderr(&refused).contains(&format!("VIP {SHOWN} carries")), "{refused:?}");

    // A file without b2: the diff names the flows, the apply is refused.
    let without = files.path().join("without-b2.toml");
    std::fs::write(&without, config(&[(1, 1, false), (3, 1, false)])).unwrap();
    let without = without.to_str().unwrap();
    let diff = daemon.command(&["config", "diff", without]);
    let diff = String::from_utf8(diff.stdout).unwrap();
    let line = format!("- backend {b2} of {SHOWN}: breaks its {on_b2} active flows");
    assert!(diff.contains(&line), "{line} missing from:\n{diff}");
    let refused = daemon.command(&["config", "apply", without]);
    let said = stderr(&refused);
    println!("FIGURE applying a file that removes a backend with flows: {said}");
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains(&line) && said.contains("--force"), "{said}");
    assert!(backend_row(&daemon, &b2).is_some(), "a refused removal removed b2");
    clients.round_without_breaks("refused removals");

    // --when-drained drains; past its timeout the backend stays draining.
    let timed_out =
        daemon.command(&["backend", "remove", VIP, &b2, "--when-drained", "--timeout", "2"]);
    assert_eq!(timed_out.status.code(), Some(1), "{timed_out:?}");
    assert!(stderr(&timed_out).contains("stays draining"), "{timed_out:?}");
    assert_eq!(backend_row(&daemon, &b2).unwrap()["state"], "draining");
    clients.round_without_breaks("a timed-out --when-drained");

    // Once b2's clients leave, --when-drained removes it on its own.
    let mut waiting = Command::new(lb_binary())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["backend", "remove", VIP, &b2, "--when-drained", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(waiting.try_wait().unwrap().is_none(), "--when-drained returned with flows open");
    let closed = clients.command("close b2");
    let since = Instant::now();
    while waiting.try_wait().unwrap().is_none() && since.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let waited = waiting.wait_with_output().unwrap();
    println!(
        "FIGURE --when-drained after {closed}: {:.1} s, {waited:?}",
        since.elapsed().as_secs_f64()
    );
    assert!(waited.status.success(), "{waited:?}");
    assert!(String::from_utf8_lossy(&waited.stdout).contains("removed"), "{waited:?}");
    assert!(backend_row(&daemon, &b2).is_none(), "b2 still listed");
    clients.round_without_breaks("b2 removed when drained");

    // What the guard prevents: --force removes b1 at once, and exactly its
    // WebSockets break.
    let opened_on_b1 = started["backends"]["b1"].as_u64().unwrap();
    let on_b1 = counted(&daemon, &b1, opened_on_b1);
    let forced = daemon.lb(&["backend", "remove", VIP, &b1, "--force"]).unwrap();
    assert!(forced.contains(&format!("its {on_b1} active flows are broken")), "{forced}");
    let round = clients.command("round");
    println!("FIGURE after a forced removal of b1: {round}");
    let broken = round["broken_by_backend"].as_object().unwrap();
    assert_eq!(broken.keys().collect::<Vec<_>>(), ["b1"], "{round}");
    assert_eq!(broken["b1"].as_u64(), Some(opened_on_b1), "{round}");
}

/// `lb run` started in the balancer's namespace; its output once it exits.
fn run_to_exit(testbed: &Testbed, daemon: &Daemon, file: &Path) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &testbed.balancer()])
        .arg(lb_binary())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["run", "--iface", "eth0", "--xdp-mode", "native", "--state"])
        .arg(&daemon.state)
        .arg("--pin-dir")
        .arg(&daemon.pin_dir)
        .arg("--config")
        .arg(file)
        .output()
        .unwrap()
}

fn a_drain_survives_reload_and_restart_and_a_refused_reload_fails() {
    let testbed = Testbed::up("lbe-rl-", 3).expect("testbed");
    let _servers = servers(&testbed);
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("lb.toml");
    std::fs::write(&file, config(&[(1, 1, false), (2, 1, false), (3, 1, false)])).unwrap();
    let file_arg = file.to_str().unwrap();
    let mut daemon = Daemon::start(&testbed, &["--config", file_arg]).expect("lb run");
    daemon.wait_backends_active().unwrap();
    let b3 = netns::backend4(3);
    daemon.lb(&["backend", "drain", VIP, &b3]).unwrap();
    let state = |daemon: &Daemon| backend_row(daemon, &b3).unwrap()["state"].clone();

    // The file is unchanged: SIGHUP and `lb config reload` keep the drain.
    let pid = daemon.process.as_ref().unwrap().0.id();
    tests::harness::signal(pid, nix::sys::signal::Signal::SIGHUP);
    wait_until("the SIGHUP answer in the log", 10, || {
        daemon.log_text().contains("is unchanged since it was applied")
    });
    assert_eq!(state(&daemon), "draining", "SIGHUP undid the drain");
    let reloaded = daemon.lb(&["config", "reload"]).unwrap();
    println!("FIGURE lb config reload of an unchanged file: {reloaded}");
    assert!(reloaded.contains("the 1 change(s) made with lb since stay"), "{reloaded}");
    assert_eq!(state(&daemon), "draining", "lb config reload undid the drain");
    daemon.restart(&testbed, &["--config", file_arg]).unwrap();
    assert_eq!(state(&daemon), "draining", "the restart undid the drain");

    // A changed file is applied; a file lb refuses fails the reload.
    std::fs::write(&file, config(&[(1, 2, false), (2, 1, false), (3, 1, true)])).unwrap();
    let reloaded = daemon.lb(&["config", "reload"]).unwrap();
    assert!(reloaded.contains("weight 1 -> 2"), "{reloaded}");
    std::fs::write(&file, config(&[(1, 0, false)])).unwrap();
    let refused = daemon.command(&["config", "reload"]);
    println!(
        "FIGURE a reload of a broken file: exit {:?}: {}",
        refused.status.code(),
        stderr(&refused)
    );
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(stderr(&refused).contains("vip.backend.weight"), "{refused:?}");
    assert_eq!(daemon.json(&["backend", "list"]).unwrap().as_array().unwrap().len(), 3);

    // A file changed while lb run was stopped replaces the state, which is
    // kept; a start that fails afterwards leaves that copy alone.
    daemon.process = None;
    std::fs::write(&file, config(&[(1, 1, false), (2, 1, false)])).unwrap();
    daemon.restart(&testbed, &["--config", file_arg]).unwrap();
    let mut replaced = daemon.state.clone().into_os_string();
    replaced.push(".replaced");
    let kept = std::fs::read_to_string(&replaced).expect("the replaced state is kept");
    assert!(kept.contains("weight = 2") && kept.contains(&b3), "{kept}");
    daemon.process = None;
    let resized = files.path().join("resized.toml");
    std::fs::write(&resized, format!("table_size = 251\n{}", config(&[(1, 1, false)]))).unwrap();
    let failed = run_to_exit(&testbed, &daemon, &resized);
    println!("FIGURE a start the pinned datapath refuses: {}", stderr(&failed).trim());
    assert!(!failed.status.success(), "{failed:?}");
    assert_eq!(
        std::fs::read_to_string(&replaced).unwrap(),
        kept,
        "a failed start replaced the copy"
    );
}

tests::root_tests!(
    removals_that_would_break_flows_are_refused_until_drained,
    a_drain_survives_reload_and_restart_and_a_refused_reload_fails,
);
