//! The `lb` command line as scripts and people use it, end to end through
//! the real daemon: exit statuses, one JSON document per command, pipes
//! that close early, and `lb top` with and without a terminal (tmux).

use std::process::{Command, Output};

use serde_json::Value;
use tests::harness::{Daemon, lb_binary, wait_until};
use tests::netns::{self, Testbed};

fn lb(args: &[&str]) -> Output {
    Command::new(lb_binary()).args(args).output().expect("run lb")
}

/// No daemon: exit status 4, and the JSON error says so; a usage mistake
/// is 2 whether clap or lb finds it.
fn exit_statuses_tell_a_missing_daemon_and_usage_apart() {
    let socket = "/nonexistent/lb.sock";
    let output = lb(&["--socket", socket, "vip", "list", "--json"]);
    assert_eq!(output.status.code(), Some(4), "{output:?}");
    let error: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(error["kind"], "daemon_not_running");
    assert!(error["error"].as_str().unwrap().contains("is `lb run` running?"), "{error}");
    assert_eq!(lb(&["--socket", socket, "vip", "frobnicate"]).status.code(), Some(2));
    assert_eq!(lb(&["--socket", socket, "vip", "add", "198.18.0.10"]).status.code(), Some(2));
}

/// Every command prints one JSON document with --json, changes included;
/// the daemon's log is JSON lines with --log-format json.
fn every_command_speaks_json() {
    let testbed = Testbed::up("lbe-js-", 1).expect("testbed");
    let _servers = tests::harness::start_servers(&testbed, 80).expect("servers");
    let daemon = Daemon::start(&testbed, &["--log-format", "json"]).expect("lb run");
    let vip = "198.18.0.10:80/tcp";
    let b1 = netns::backend4(1);
    let scratch = tempfile::tempdir().unwrap();
    let file = scratch.path().join("lb.toml");
    std::fs::write(&file, "[[vip]]\naddress = \"198.18.0.10:80\"\n").unwrap();
    let file = file.to_str().unwrap();
    for args in [
        vec!["vip", "add", vip],
        vec!["backend", "add", vip, &b1],
        vec!["vip", "set", vip, "--affinity", "client-ip"],
        vec!["check", "set", vip, "--fall", "2"],
        vec!["backend", "set", vip, &b1, "--weight", "2"],
        vec!["backend", "drain", vip, &b1],
        vec!["backend", "undrain", vip, &b1],
        vec!["vip", "list"],
        vec!["backend", "list"],
        vec!["backend", "list", vip],
        vec!["stats"],
        vec!["lookup", vip, "198.18.0.1:40000"],
        vec!["flows", vip],
        vec!["config", "show"],
        vec!["config", "check", file],
        vec!["backend", "remove", vip, &b1],
        vec!["vip", "remove", vip],
    ] {
        let output = daemon.json(&args);
        let value = output.unwrap_or_else(|error| panic!("lb {args:?} --json: {error}"));
        assert!(value.is_object() || value.is_array(), "lb {args:?}: {value}");
    }
    let changed = daemon.json(&["vip", "add", vip]).unwrap();
    assert_eq!((changed["changed"].as_bool(), changed["message"].is_string()), (Some(true), true));
    // A diff with differences is still one JSON document, with exit 1.
    daemon.lb(&["backend", "add", vip, &b1]).unwrap();
    let diff = daemon.command(&["config", "diff", file, "--json"]);
    assert_eq!(diff.status.code(), Some(1), "{diff:?}");
    let diff: Value = serde_json::from_slice(&diff.stdout).unwrap();
    assert_eq!(diff["changes"].as_array().map(Vec::len), Some(1), "{diff}");

    // Without a terminal, `lb top` prints one snapshot (JSON with --json)
    // instead of panicking.
    let top = daemon.command(&["top"]);
    assert!(top.status.success(), "{top:?}");
    assert!(String::from_utf8_lossy(&top.stdout).contains(vip), "{top:?}");
    assert!(String::from_utf8_lossy(&top.stderr).contains("not a terminal"), "{top:?}");
    let top = daemon.json(&["top"]).unwrap();
    assert!(top["vips"].is_array(), "{top}");

    // A reader that goes away ends the command by SIGPIPE, as for any Unix
    // tool, never with a panic (exit 101).
    // (The writer starts after the reader has gone, so the pipe is closed
    // when it writes.)
    let lb_command = format!("{} --socket {}", lb_binary().display(), daemon.socket.display());
    for command in [
        format!("{{ sleep 0.3; {lb_command} completions bash; }} | true"),
        format!("{{ sleep 0.3; {lb_command} flows {vip}; }} | true"),
    ] {
        let output = Command::new("bash")
            .args(["-c", &format!("set -o pipefail; {command}; echo $?")])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "141", "{command}: {stderr}");
    }

    // --log-format json: every log line is one JSON object with a level
    // and a message, for log shippers.
    let log = daemon.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(lines.iter().all(|line| line["level"].is_string() && line["message"].is_string()));
    assert!(
        lines
            .iter()
            .any(|line| line["message"] == "XDP program attached" && line["mode"] == "native"),
        "{log}"
    );
}

/// `lb top` in a real terminal (tmux): the VIP's and backends' rows with
/// their state and active flows, refreshed; q quits.
fn lb_top_shows_vips_and_backends_live() {
    let testbed = Testbed::up("lbe-tp-", 2).expect("testbed");
    let _servers = tests::harness::start_servers(&testbed, 80).expect("servers");
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    let vip = "198.18.0.10:80/tcp";
    daemon.lb(&["vip", "add", vip]).unwrap();
    daemon.lb(&["backend", "add", vip, &netns::backend4(1)]).unwrap();
    daemon.lb(&["backend", "add", vip, &netns::backend4(2)]).unwrap();
    daemon.wait_backends_active().unwrap();
    let session = format!("lb-top-{}", std::process::id());
    let top = format!(
        "{} --socket {} top --interval 0.5",
        lb_binary().display(),
        daemon.socket.display()
    );
    let tmux = |args: &[&str]| Command::new("tmux").args(args).output().expect("tmux");
    let started = tmux(&["new-session", "-d", "-s", &session, "-x", "150", "-y", "30", &top]);
    assert!(started.status.success(), "{started:?}");
    let capture =
        || String::from_utf8(tmux(&["capture-pane", "-p", "-t", &session]).stdout).unwrap();
    let answers = tests::harness::client_requests(
        &testbed,
        "tcp",
        "198.18.0.10:80",
        netns::CLIENT4,
        30_000,
        200,
    )
    .unwrap();
    assert_eq!(answers.len(), 200);
    let mut screen = String::new();
    wait_until("lb top to show packets", 15, || {
        screen = capture();
        screen.contains("2/2 up") && !screen.contains(" 0 packets forwarded")
    });
    for expected in [
        "lb top:",
        "VIPs",
        vip,
        "Backends",
        &netns::backend4(1),
        &netns::backend4(2),
        "up",
        "ACTIVE FLOWS",
        "DROP/S",
    ] {
        assert!(screen.contains(expected), "{expected} missing from:\n{screen}");
    }
    tmux(&["send-keys", "-t", &session, "q"]);
    wait_until("q to quit lb top", 15, || !tmux(&["has-session", "-t", &session]).status.success());
}

tests::root_tests!(
    exit_statuses_tell_a_missing_daemon_and_usage_apart,
    every_command_speaks_json,
    lb_top_shows_vips_and_backends_live,
);
