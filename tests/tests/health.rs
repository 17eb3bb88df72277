//! Health checking end to end: backends that die stop receiving new flows
//! within about a second, come back after `rise` checks, and the flows of
//! healthy backends never move.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::harness::{Daemon, client_requests, start_server, tally, testbed_binary};
use tests::netns::{self, CLIENT4, Testbed};

const VIP: &str = "198.18.0.10:80";

fn landing(testbed: &Testbed, first_port: u16, count: u16) -> BTreeMap<u16, String> {
    client_requests(testbed, "tcp", VIP, CLIENT4, first_port, count).unwrap().into_iter().collect()
}

fn failover_moves_only_the_dead_backends_flows_and_recovers() {
    let testbed = Testbed::up("lbe-hc-", 3).expect("testbed");
    // b3's server is not running yet: it is added while down.
    let mut servers = [
        Some(start_server(&testbed, 1, 80).unwrap()),
        Some(start_server(&testbed, 2, 80).unwrap()),
        None,
    ];
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    daemon.lb(&["vip", "add", VIP]).unwrap();
    for index in 1..=3 {
        daemon.lb(&["backend", "add", VIP, &netns::backend4(index)]).unwrap();
    }
    let b3 = netns::backend4(3);
    daemon.wait_backends(|address| if address == b3 { "down" } else { "up" }).unwrap();
    let list = daemon.json(&["backend", "list"]).unwrap();
    let b3_error =
        list.as_array().unwrap()[2]["last_error"].as_str().unwrap_or_default().to_owned();
    assert!(b3_error.contains("refused"), "b3's last error: {b3_error}");

    // Added while down: it receives nothing, and nothing fails.
    let counts = tally(&client_requests(&testbed, "tcp", VIP, CLIENT4, 21_000, 200).unwrap());
    assert_eq!(counts.keys().map(String::as_str).collect::<Vec<_>>(), ["b1", "b2"], "{counts:?}");

    // It joins after `rise` (2) checks once its server runs.
    servers[2] = Some(start_server(&testbed, 3, 80).unwrap());
    let joined = daemon.wait_backends(|_| "up").unwrap();
    println!(
        "FIGURE backend added while down joined {} ms after its server started",
        joined.as_millis()
    );
    let baseline = landing(&testbed, 22_000, 300);
    assert_eq!(tally(&baseline.clone().into_iter().collect::<Vec<_>>()).len(), 3, "{baseline:?}");

    // Continuous traffic; kill b2's server one second in.
    let client = Command::new("ip")
        .args(["netns", "exec", &testbed.client()])
        .arg(testbed_binary())
        .args(["client-loop", "tcp", VIP, CLIENT4, "30000", "5", "10"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(1000));
    servers[1] = None; // kills b2's server
    let killed_at = started.elapsed().as_millis() as i64;
    let output = client.wait_with_output().unwrap();
    let lines: Vec<(i64, String)> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ' ');
            Some((parts.next()?.parse().ok()?, parts.nth(1)?.to_owned()))
        })
        .collect();
    let failures: Vec<i64> =
        lines.iter().filter(|(_, answer)| answer.starts_with("ERROR")).map(|(ms, _)| *ms).collect();
    let last_failure = failures.iter().max().copied().unwrap_or(killed_at);
    let outage = last_failure - killed_at;
    println!(
        "FIGURE {} connections in 5 s; {} failed after b2's server was killed; the last failure came {outage} ms after the kill",
        lines.len(),
        failures.len()
    );
    assert!(lines.len() > 200, "the client loop made too few connections: {}", lines.len());
    assert!(
        failures.iter().all(|&ms| ms >= killed_at - 50),
        "failures before the kill: {failures:?}"
    );
    assert!(outage < 1500, "connections kept failing {outage} ms after the kill");
    let tail: Vec<&(i64, String)> = lines.iter().filter(|(ms, _)| *ms > last_failure).collect();
    assert!(
        tail.len() > 100 && tail.iter().all(|(_, a)| a == "b1" || a == "b3"),
        "after the outage: {tail:?}"
    );

    // Flows of the healthy backends kept their backend; b2's went to the others.
    let after = landing(&testbed, 22_000, 300);
    let healthy_flows = baseline.iter().filter(|(_, b)| *b != "b2").count();
    let moved = baseline.iter().filter(|(port, b)| *b != "b2" && after[port] != **b).count();
    let failed = after.values().filter(|a| a.starts_with("ERROR")).count();
    println!(
        "FIGURE {moved} of {healthy_flows} flows of healthy backends changed backend when b2 died"
    );
    assert_eq!((moved, failed), (0, 0), "moved {moved}, failed {failed}");
    assert!(after.values().all(|b| b != "b2"));

    // b2 comes back: it rejoins after rise checks and every flow is where it was.
    servers[1] = Some(start_server(&testbed, 2, 80).unwrap());
    let rejoined = daemon.wait_backends(|_| "up").unwrap();
    println!(
        "FIGURE b2 rejoined {} ms after its server restarted (rise 2, interval 300 ms)",
        rejoined.as_millis()
    );
    assert_eq!(landing(&testbed, 22_000, 300), baseline, "the table after recovery differs");

    // A check that every backend fails (here an http check against servers that
    // do not speak HTTP, as after a bad `lb check set`): fail-open keeps the
    // traffic flowing to the last-known set, and says so.
    daemon.lb(&["check", "set", VIP, "--check", "http", "--check-path", "/health"]).unwrap();
    let all_down = daemon.wait_backends(|_| "down").unwrap();
    println!("FIGURE every backend failed the http check within {} ms", all_down.as_millis());
    let list = daemon.json(&["backend", "list"]).unwrap();
    let error = list[0]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("not an HTTP response"), "{error}");
    let vips = daemon.json(&["vip", "list"]).unwrap();
    assert_eq!(
        (vips[0]["all_down"].as_bool(), vips[0]["check"]["type"].as_str()),
        (Some(true), Some("http")),
        "{vips}"
    );
    let counts = tally(&client_requests(&testbed, "tcp", VIP, CLIENT4, 23_000, 150).unwrap());
    assert!(!counts.contains_key("ERROR") && counts.len() == 3, "fail-open traffic: {counts:?}");
    assert!(daemon.log_text().contains("every backend of the VIP is down"), "no loud log line");

    // Back to tcp: they come up again after rise checks and fail-open ends.
    daemon.lb(&["check", "set", VIP, "--check", "tcp"]).unwrap();
    daemon.wait_backends(|_| "up").unwrap();
    assert_eq!(daemon.json(&["vip", "list"]).unwrap()[0]["all_down"], false);
    assert_eq!(landing(&testbed, 22_000, 300), baseline);
}

tests::root_tests!(failover_moves_only_the_dead_backends_flows_and_recovers,);
