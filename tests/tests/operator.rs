//! What an operator does on day two, end to end through the real `lb`:
//! check a configuration file, install the service unit, reload a
//! configuration under established WebSockets (by `lb config apply` and by
//! SIGHUP), restart without losing CLI changes, list flows, and check the
//! alert rules. The command line as scripts use it is in cli.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tests::harness::{Daemon, Process, WsClients, lb_binary, spawn_in, testbed_binary};
use tests::netns::{self, Testbed};

/// A file shipped in dist/.
fn dist(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist").join(name)
}

fn lb(args: &[&str]) -> Output {
    Command::new(lb_binary()).args(args).output().expect("run lb")
}

fn config_check(file: &Path, json: bool) -> Output {
    let mut command = Command::new(lb_binary());
    command.args(["config", "check"]).arg(file);
    if json {
        command.arg("--json");
    }
    command.output().expect("run lb config check")
}

fn the_example_configuration_is_valid_and_counted() {
    let output = config_check(&dist("lb.toml"), false);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.ends_with(": valid: 1 VIP(s), 3 backend(s)\n"), "{text}");

    let output = config_check(&dist("lb.toml"), true);
    assert!(output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["valid"], true);
    assert_eq!((report["vips"].as_u64(), report["backends"].as_u64()), (Some(1), Some(3)));
}

/// A mistake in the example makes the check fail with exit status 1 and
/// name the file, the line and the field, on stderr and in the JSON report.
fn a_broken_configuration_is_refused_with_its_line_and_field() {
    let text = std::fs::read_to_string(dist("lb.toml")).unwrap();
    let broken = text.replace("weight = 2", "weight = 0");
    assert_ne!(broken, text, "the example has a backend of weight 2");
    let line = broken.lines().position(|line| line.starts_with("weight = 0")).unwrap() + 1;
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), &broken).unwrap();
    let place = format!("{}:{line}: vip.backend.weight:", file.path().display());

    let output = config_check(file.path(), false);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains(&place), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing printed as valid");

    let output = config_check(file.path(), true);
    assert_eq!(output.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (report["kind"].as_str(), report["exit_status"].as_u64()),
        (Some("refused"), Some(1))
    );
    assert!(report["error"].as_str().unwrap().starts_with(&place), "{report}");

    let missing = config_check(Path::new("/nonexistent/lb.toml"), false);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/lb.toml"));
}

/// The shipped unit passes `systemd-analyze verify` once its binary and
/// man page exist where it says (here: this build's, in a scratch man
/// path), without a warning; the same check warns of a misspelt directive
/// and fails a unit whose binary is missing.
fn the_systemd_unit_verifies() {
    let scratch = tempfile::tempdir().unwrap();
    let man1 = scratch.path().join("man/man1");
    std::fs::create_dir_all(&man1).unwrap();
    let page = lb(&["man"]);
    assert!(page.status.success() && page.stdout.starts_with(b".ie"), "lb man printed no roff");
    // Every page lb(1) refers to ships beside it.
    assert!(lb(&["man", "--dir", man1.to_str().unwrap()]).status.success());
    let text = String::from_utf8_lossy(&page.stdout).replace("\\-", "-");
    let referred: Vec<&str> = text.split_whitespace().filter(|w| w.ends_with("(1)")).collect();
    assert!(referred.contains(&"lb-run(1)"), "{referred:?}");
    for name in referred {
        let file = man1.join(format!("{}.1", name.trim_end_matches("(1)")));
        assert!(file.exists(), "lb(1) refers to {name}, which is not written");
    }
    let unit = std::fs::read_to_string(dist("lb.service")).unwrap();
    let unit = unit.replace("/usr/local/bin/lb", lb_binary().to_str().unwrap());
    let verify_named = |name: &str, text: &str| {
        let path = scratch.path().join(name);
        std::fs::write(&path, text).unwrap();
        Command::new("systemd-analyze")
            .args(["verify", "--man=yes"])
            .arg(&path)
            .env("MANPATH", scratch.path().join("man"))
            .output()
            .expect("systemd-analyze (Debian package systemd)")
    };
    let verify = |text: &str| verify_named("lb.service", text);
    let agent = std::fs::read_to_string(dist("lb-agent.service")).unwrap();
    let agent = agent.replace("/usr/local/bin/lb", lb_binary().to_str().unwrap());
    std::fs::write(scratch.path().join("lb-agent"), "LB_STORE=etcd://198.18.0.201:2379/lb\n")
        .unwrap();
    let agent =
        agent.replace("/etc/default/lb-agent", scratch.path().join("lb-agent").to_str().unwrap());
    let checked = verify_named("lb-agent.service", &agent);
    assert!(
        checked.status.success() && checked.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let good = verify(&unit);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    assert!(good.stderr.is_empty(), "{}", String::from_utf8_lossy(&good.stderr));
    let misspelt = verify(&unit.replace("Restart=on-failure", "Restartz=on-failure"));
    let warned = String::from_utf8_lossy(&misspelt.stderr);
    assert!(warned.contains("Unknown key 'Restartz'"), "a misspelt directive passed: {misspelt:?}");
    let moved = verify(&unit.replace(lb_binary().to_str().unwrap(), "/nonexistent/lb"));
    assert!(!moved.status.success(), "a unit whose binary is missing passed: {moved:?}");
}

/// The shipped alert rules pass `promtool check rules` and their unit
/// tests (`promtool test rules`: each alert fires on the series that should
/// raise it, and only then); rules with a broken threshold fail those tests.
fn the_alert_rules_check_and_pass_their_unit_tests() {
    let rules = dist("prometheus/lb-alerts.yml");
    let promtool = |args: &[&str]| {
        Command::new("promtool").args(args).output().expect("promtool (Debian package prometheus)")
    };
    let checked = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stdout));
    let unit_tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("prometheus/lb-alerts.test.yml");
    let tested = promtool(&["test", "rules", unit_tests.to_str().unwrap()]);
    assert!(tested.status.success(), "{}", String::from_utf8_lossy(&tested.stdout));

    let scratch = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&rules).unwrap();
    let broken = text.replace("lb_vip_all_down == 1", "lb_vip_all_down == 2");
    assert_ne!(broken, text);
    std::fs::create_dir_all(scratch.path().join("dist/prometheus")).unwrap();
    std::fs::create_dir_all(scratch.path().join("tests/prometheus")).unwrap();
    std::fs::write(scratch.path().join("dist/prometheus/lb-alerts.yml"), broken).unwrap();
    let copy = scratch.path().join("tests/prometheus/lb-alerts.test.yml");
    std::fs::copy(&unit_tests, &copy).unwrap();
    let failed = promtool(&["test", "rules", copy.to_str().unwrap()]);
    assert!(!failed.status.success(), "a broken rule passed its unit tests");
}

const VIP: &str = "198.18.0.10:8080/tcp";

/// A configuration of the test VIP with these backends: (index, weight, draining).
fn config(backends: &[(usize, u32, bool)]) -> String {
    let mut text = String::from(
        "hash_seed = 42\n\n[[vip]]\naddress = \"198.18.0.10:8080\"\n\n[vip.check]\ntype = \"ws\"\n",
    );
    for (index, weight, draining) in backends {
        text.push_str(&format!(
            "\n[[vip.backend]]\naddress = \"{}\"\nweight = {weight}\ndraining = {draining}\n",
            netns::backend4(*index)
        ));
    }
    text
}

/// Backend address -> (state, weight), from `lb backend list --json`.
fn backends(daemon: &Daemon) -> Vec<(String, String, u64)> {
    let list = daemon.json(&["backend", "list"]).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let address = b["address"].as_str().unwrap().to_owned();
            (address, b["state"].as_str().unwrap().to_owned(), b["weight"].as_u64().unwrap())
        })
        .collect()
}

/// 600 WebSockets on b1 and b2 (b3 is draining, so it has none) survive
/// `lb config apply` and SIGHUP reloads that add b4, remove b3 and change
/// weights; a file with a mistake or with a setting fixed at start changes
/// nothing; a restart keeps changes made with `lb` while the file is
/// unchanged, and keeps the state it replaces once the file changed.
fn reloads_change_only_what_differs_and_websockets_survive() {
    let testbed = Testbed::up("lbe-op-", 4).expect("testbed");
    let _servers: Vec<Process> = (1..=4)
        .map(|index| {
            let name = format!("b{index}");
            let args = ["ws-serve", name.as_str(), "8080", "300"];
            spawn_in(&testbed.backend(index), &testbed_binary(), &args, None).unwrap()
        })
        .collect();
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("lb.toml");
    std::fs::write(&file, config(&[(1, 1, false), (2, 1, false), (3, 1, true)])).unwrap();
    let file_arg = file.to_str().unwrap();
    let mut daemon = Daemon::start(&testbed, &["--config", file_arg]).expect("lb run");
    daemon.wait_backends(|a| if a == netns::backend4(3) { "draining" } else { "up" }).unwrap();
    let (mut clients, started) = WsClients::start(&testbed.client(), "198.18.0.10:8080", 600);
    assert_eq!(started["opened"].as_u64(), Some(600), "{started}");
    assert_eq!(started["backends"].get("b3"), None, "a draining backend got connections");

    // `lb config show` is a configuration `lb config check` accepts, and
    // applying it changes nothing.
    let shown = daemon.json(&["config", "show"]).unwrap()["toml"].as_str().unwrap().to_owned();
    let shown_file = files.path().join("shown.toml");
    std::fs::write(&shown_file, &shown).unwrap();
    assert!(config_check(&shown_file, false).status.success(), "{shown}");
    let same = daemon.json(&["config", "diff", shown_file.to_str().unwrap()]).unwrap();
    assert_eq!(same["changes"], serde_json::json!([]), "{same}");

    // The diff of the next file names each change, and applies nothing.
    let next = files.path().join("next.toml");
    std::fs::write(&next, config(&[(1, 1, false), (2, 2, false), (4, 1, false)])).unwrap();
    let next_arg = next.to_str().unwrap();
    // Differences make the exit status 1, as for diff(1), so CI sees drift.
    let diff = daemon.command(&["config", "diff", next_arg]);
    assert_eq!(diff.status.code(), Some(1), "{diff:?}");
    assert!(diff.stderr.is_empty(), "differences are no error: {diff:?}");
    let diff = String::from_utf8(diff.stdout).unwrap();
    let b = netns::backend4;
    for line in [
        format!("- backend {} of {VIP}", b(3)),
        format!("~ backend {} of {VIP}: weight 1 -> 2", b(2)),
        format!("+ backend {} of {VIP} (weight 1)", b(4)),
        format!("{}: 3 difference(s)", next.display()),
    ] {
        assert!(diff.contains(&line), "{line} missing from:\n{diff}");
    }
    assert_eq!(backends(&daemon).len(), 3, "diff applied something");

    // A mistake, or a setting fixed at start, is refused and changes nothing.
    let broken = files.path().join("broken.toml");
    std::fs::write(&broken, config(&[(1, 0, false)])).unwrap();
    let refused = daemon.command(&["config", "apply", broken.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("vip.backend.weight"));
    let resized = files.path().join("resized.toml");
    std::fs::write(&resized, format!("table_size = 251\n{}", config(&[(1, 1, false)]))).unwrap();
    let refused = daemon.command(&["config", "apply", resized.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("table_size 65537 -> 251") && stderr.contains("nothing applied"),
        "{stderr}"
    );
    assert_eq!(backends(&daemon).len(), 3, "a refused file changed the backends");

    // Apply: b3 goes, b4 comes, b2 is reweighted; no WebSocket breaks or moves.
    let applied = daemon.json(&["config", "apply", next_arg]).unwrap();
    assert_eq!(
        (applied["applied"].as_bool(), applied["changes"].as_array().unwrap().len()),
        (Some(true), 3)
    );
    daemon.wait_backends_active().unwrap();
    let after: Vec<_> = backends(&daemon).into_iter().map(|(a, _, w)| (a, w)).collect();
    assert_eq!(after, [(b(1), 1), (b(2), 2), (b(4), 1)]);
    clients.round_without_breaks("lb config apply");
    let opened = clients.command("open 200");
    assert!(
        opened["backends"]["b4"].as_u64().unwrap_or(0) > 10,
        "b4 got no new connections: {opened}"
    );

    // SIGHUP re-reads --config: the file now drains b4 and brings b3 back.
    std::fs::write(&file, config(&[(1, 1, false), (2, 2, false), (3, 1, false), (4, 1, true)]))
        .unwrap();
    let pid = daemon.process.as_ref().unwrap().0.id();
    tests::harness::signal(pid, nix::sys::signal::Signal::SIGHUP);
    tests::harness::wait_until("the SIGHUP reload", 15, || backends(&daemon).len() == 4);
    daemon.wait_backends(|a| if a == netns::backend4(4) { "draining" } else { "up" }).unwrap();
    clients.round_without_breaks("SIGHUP");
    assert!(daemon.log_text().contains("SIGHUP: configuration re-read and applied"));

    // lb flows: the VIP's established connections, each on a backend it has.
    let flows = daemon.json(&["flows", VIP, "--limit", "50"]).unwrap();
    assert_eq!(
        (flows["flows"].as_array().unwrap().len(), flows["truncated"].as_bool()),
        (50, Some(true))
    );
    let all = daemon.json(&["flows", VIP, "--limit", "5000"]).unwrap();
    let all = all["flows"].as_array().unwrap();
    assert!(all.len() >= 800, "{} flows listed for 800 open connections", all.len());
    for flow in all {
        assert!(flow["client"].as_str().unwrap().starts_with("198.18.0.1:"), "{flow}");
        let backend = flow["backend"].as_str().unwrap();
        assert!([b(1), b(2), b(4)].iter().any(|kept| kept == backend), "{flow}");
    }
    assert_eq!(daemon.command(&["flows", "198.18.0.10:9/tcp"]).status.code(), Some(3));

    // A change made with lb survives a restart while the file is unchanged.
    daemon.lb(&["backend", "set", VIP, &b(1), "--weight", "7"]).unwrap();
    drop(clients);
    daemon.restart(&testbed, &["--config", file_arg]).unwrap();
    let weights: Vec<u64> = backends(&daemon).iter().map(|(_, _, w)| *w).collect();
    assert_eq!(weights, [7, 2, 1, 1], "the restart undid a change made with lb");
    assert!(daemon.log_text().contains("restoring the state, with the changes made with lb since"));

    // Once the file changed, a restart applies it, and keeps the state it
    // replaced (weight 7 included) beside the state file.
    std::fs::write(&file, config(&[(1, 1, false), (2, 1, false)])).unwrap();
    daemon.restart(&testbed, &["--config", file_arg]).unwrap();
    assert_eq!(backends(&daemon).len(), 2);
    let mut replaced = daemon.state.clone().into_os_string();
    replaced.push(".replaced");
    let replaced = std::fs::read_to_string(&replaced).expect("the replaced state is kept");
    assert!(replaced.contains("weight = 7"), "{replaced}");
}

tests::root_tests!(
    the_example_configuration_is_valid_and_counted,
    a_broken_configuration_is_refused_with_its_line_and_field,
    the_systemd_unit_verifies,
    the_alert_rules_check_and_pass_their_unit_tests,
    reloads_change_only_what_differs_and_websockets_survive,
);
