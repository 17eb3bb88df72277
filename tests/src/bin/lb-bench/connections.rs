//! Section 4: new-connection rate and memory at 10,000 and 100,000
//! concurrent WebSockets through lb, against HAProxy in TCP mode, in the
//! testbed the end-to-end tests use.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;

#[derive(Serialize)]
pub struct ConnectionRow {
    pub system: String,
    /// New TCP connections per second (connect, read the answer, close), 8 client threads.
    pub connections_per_second: f64,
    pub failed_connections: u64,
    /// WebSocket connections asked for and opened.
    pub concurrent_asked: u64,
    pub concurrent_opened: u64,
    /// Memory of the balancer with no connections, then holding them.
    pub memory_idle_bytes: u64,
    pub memory_loaded_bytes: u64,
    pub memory_note: String,
}

/// The row of clients connecting to a backend without a balancer.
pub const DIRECT: &str = "direct to one backend";
pub const CONCURRENT: u64 = 10_000;
pub const LARGE_CONCURRENT: u64 = 100_000;
/// The VIP ports of the 100,000-connection row.
const LARGE_PORTS: [u16; 4] = [8082, 8083, 8084, 8085];
/// The most connections HAProxy can be given here: a proxy needs two
/// descriptors per connection, and this machine caps a process at 20,000
/// (HAProxy refuses to start with a higher maxconn).
pub const HAPROXY_MAXCONN: u32 = 9_900;

pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

pub fn connection_rate(
    testbed: &tests::netns::Testbed,
    target: &str,
) -> anyhow::Result<(f64, u64)> {
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", &testbed.client()])
        .arg(tests::harness::testbed_binary())
        .args(["conn-rate", target, "5", "8"])
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut numbers = text.split_whitespace().map(|n| n.parse::<u64>().unwrap_or(0));
    let (ok, failed) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    Ok((ok as f64 / 5.0, failed))
}

/// Holds `count` WebSocket connections to `target` through the client
/// namespace; returns (opened, the holder process) until the caller quits it.
pub fn hold_websockets(
    testbed: &tests::netns::Testbed,
    target: &str,
    count: u64,
) -> anyhow::Result<(u64, std::process::Child)> {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &testbed.client()])
        .arg(tests::harness::testbed_binary())
        .args(["ws-clients", target, &count.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.as_mut().context("stdout")?).read_line(&mut line)?;
    let started: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    Ok((started["opened"].as_u64().unwrap_or(0), child))
}

pub fn quit(mut holder: std::process::Child) {
    use std::io::Write as _;
    if let Some(stdin) = holder.stdin.as_mut() {
        let _ = writeln!(stdin, "quit");
    }
    let _ = holder.wait();
}

/// The connection rows, and the daemon's cost per scheduler measured while
/// the 100,000 connections are held.
pub fn connections() -> anyhow::Result<(Vec<ConnectionRow>, Vec<crate::control::SchedulerRow>)> {
    use tests::harness::{Daemon, Process, spawn_in, start_servers, testbed_binary};
    let testbed = tests::netns::Testbed::up("lbb-c-", 3)?;
    let _servers = start_servers(&testbed, 80)?;
    let _ws_servers: Vec<Process> = (1..=3)
        .map(|index| {
            spawn_in(
                &testbed.backend(index),
                &testbed_binary(),
                &["ws-serve", &format!("b{index}"), "8081", "600"],
                None,
            )
        })
        .collect::<Result<_, _>>()?;

    // The balancer: the real daemon.
    let mut daemon = Daemon::start(&testbed, &["--metrics", "off"])?;
    for port in ["80", "8081"] {
        let vip = format!("198.18.0.10:{port}");
        daemon.lb(&["vip", "add", &vip])?;
        for index in 1..=3 {
            daemon.lb(&["backend", "add", &vip, &tests::netns::backend4(index)])?;
        }
    }
    daemon.wait_backends_active()?;
    let lb_pid = daemon.process.as_ref().context("daemon")?.0.id();

    // HAProxy in TCP mode on the balancer's own address, to the same servers.
    let servers = |port: u16| -> String {
        (1..=3).map(|i| format!("  server b{i} {}:{port}\n", tests::netns::backend4(i))).collect()
    };
    let config = format!(
        "global\n  maxconn {HAPROXY_MAXCONN}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
         frontend rate\n  bind 198.18.0.2:8080\n  default_backend rate\nbackend rate\n  balance roundrobin\n{}\
         frontend websockets\n  bind 198.18.0.2:9081\n  default_backend websockets\nbackend websockets\n  balance roundrobin\n{}",
        servers(80),
        servers(8081)
    );
    let config_path = std::env::temp_dir().join("lbb-haproxy.cfg");
    std::fs::write(&config_path, config)?;
    let haproxy_log = std::env::temp_dir().join("lbb-haproxy.log");
    let haproxy = spawn_in(
        &testbed.balancer(),
        Path::new("/usr/sbin/haproxy"),
        &["-db", "-f", config_path.to_str().context("path")?],
        Some(&haproxy_log),
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let haproxy_pid = haproxy.0.id();

    // The same clients straight to one backend, no balancer on the way:
    // what lb's rate is held against.
    let (rate, failed) = connection_rate(&testbed, &format!("{}:80", tests::netns::backend4(1)))?;
    let mut rows = vec![ConnectionRow {
        system: DIRECT.into(),
        connections_per_second: rate,
        failed_connections: failed,
        concurrent_asked: 0,
        concurrent_opened: 0,
        memory_idle_bytes: 0,
        memory_loaded_bytes: 0,
        memory_note: "no balancer: the clients connect to backend 1 itself".into(),
    }];
    for (system, rate_target, ws_target, pid, note) in [
        (
            "lb",
            "198.18.0.10:80",
            "198.18.0.10:8081",
            lb_pid,
            "daemon RSS; the datapath's maps are preallocated and do not grow (flow table: 128 bytes x flow_table_size)",
        ),
        (
            "HAProxy 2.6 (TCP mode)",
            "198.18.0.2:8080",
            "198.18.0.2:9081",
            haproxy_pid,
            "process RSS; maxconn 9,900, the most a 20,000-descriptor cap allows (two per proxied connection)",
        ),
    ] {
        let (rate, failed) = connection_rate(&testbed, rate_target)?;
        let idle = rss_bytes(pid);
        let (opened, holder) = hold_websockets(&testbed, ws_target, CONCURRENT)?;
        let loaded = rss_bytes(pid);
        quit(holder);
        rows.push(ConnectionRow {
            system: system.into(),
            connections_per_second: rate,
            failed_connections: failed,
            concurrent_asked: CONCURRENT,
            concurrent_opened: opened,
            memory_idle_bytes: idle,
            memory_loaded_bytes: loaded,
            memory_note: note.into(),
        });
    }
    drop(haproxy);

    // 100,000 concurrent connections, lb only (HAProxy cannot hold them on a
    // machine that caps a process at 20,000 descriptors). Spread so that no
    // process and no (client, VIP port) pair runs out of descriptors or
    // ephemeral ports: four fresh VIP ports (8081's 10,000 closed connections
    // still hold client ports in TIME_WAIT), two client processes per port.
    let mut _more_servers = Vec::new();
    for port in LARGE_PORTS {
        let vip = format!("198.18.0.10:{port}");
        daemon.lb(&["vip", "add", &vip])?;
        for index in 1..=3 {
            _more_servers.push(spawn_in(
                &testbed.backend(index),
                &testbed_binary(),
                &["ws-serve", &format!("b{index}"), &port.to_string(), "600"],
                None,
            )?);
            daemon.lb(&["backend", "add", &vip, &tests::netns::backend4(index)])?;
        }
    }
    daemon.wait_backends_active()?;
    let idle = rss_bytes(lb_pid);
    let mut holders = Vec::new();
    let mut opened = 0;
    for port in LARGE_PORTS {
        for _ in 0..2 {
            let target = format!("198.18.0.10:{port}");
            let (count, holder) = hold_websockets(&testbed, &target, LARGE_CONCURRENT / 8)?;
            opened += count;
            holders.push(holder);
        }
    }
    let loaded = rss_bytes(lb_pid);
    // Wait (a bounded time) for a count taken after the last connection opened.
    let stats = daemon.stats_once_counted(opened, Duration::from_secs(10))?;
    // A client process that died (its connections closed) must not count.
    let dead = holders
        .iter_mut()
        .map(|holder| holder.try_wait())
        .filter(|status| !matches!(status, Ok(None)))
        .count();
    if dead > 0 {
        bail!(
            "{dead} of {} client processes died while holding connections (out of memory?)",
            holders.len()
        );
    }
    let active = tests::harness::total_active_flows(&stats);
    let mut vips: Vec<String> = ["80", "8081"].iter().map(|p| format!("198.18.0.10:{p}")).collect();
    vips.extend(LARGE_PORTS.iter().map(|port| format!("198.18.0.10:{port}")));
    let schedulers =
        crate::control::scheduler_cost(&testbed, &daemon, &vips, "198.18.0.10:80", active)?;
    for holder in holders {
        quit(holder);
    }
    rows.push(ConnectionRow {
        system: "lb".into(),
        connections_per_second: f64::NAN,
        failed_connections: 0,
        concurrent_asked: LARGE_CONCURRENT,
        // Held: opened, and still open in the flow table's own count.
        concurrent_opened: opened.min(active),
        memory_idle_bytes: idle,
        memory_loaded_bytes: loaded,
        memory_note: format!(
            "daemon RSS; {opened} opened, {active} active in the flow table ({})",
            per_vip_flows(&stats)
        ),
    });
    rows.push(ConnectionRow {
        system: "HAProxy 2.6 (TCP mode)".into(),
        connections_per_second: f64::NAN,
        failed_connections: 0,
        concurrent_asked: LARGE_CONCURRENT,
        concurrent_opened: 0,
        memory_idle_bytes: 0,
        memory_loaded_bytes: 0,
        memory_note: "not possible here: 100,000 proxied connections need 200,000 descriptors; a process may have 20,000".into(),
    });
    // Last: it restarts the daemon.
    rows.extend(rate_with_sync(&testbed, &mut daemon)?);
    let haproxy_said = std::fs::read_to_string(&haproxy_log).unwrap_or_default();
    if let Some(line) =
        haproxy_said.lines().find(|line| line.contains("FD limit") || line.contains("maxconn"))
    {
        println!("haproxy: {line}");
    }
    Ok((rows, schedulers))
}

/// Active flows per VIP, from `lb stats --json`.
pub fn per_vip_flows(stats: &serde_json::Value) -> String {
    let mut per_vip = BTreeMap::<String, u64>::new();
    for backend in stats["backends"].as_array().into_iter().flatten() {
        let vip = backend["vip"].as_str().unwrap_or("?").to_owned();
        *per_vip.entry(vip).or_default() += backend["active_flows"].as_u64().unwrap_or(0);
    }
    per_vip.iter().map(|(vip, flows)| format!("{vip}: {flows}")).collect::<Vec<_>>().join(", ")
}

/// The new-connection rate with flow sync off, then on (to a peer address
/// with nothing listening: every flow is still reported, sealed and sent),
/// back to back.
fn rate_with_sync(
    testbed: &tests::netns::Testbed,
    daemon: &mut tests::harness::Daemon,
) -> anyhow::Result<[ConnectionRow; 2]> {
    use std::os::unix::fs::PermissionsExt as _;
    let row = |system: &str, (rate, failed): (f64, u64), pid: u32, note: String| ConnectionRow {
        system: system.into(),
        connections_per_second: rate,
        failed_connections: failed,
        concurrent_asked: 0,
        concurrent_opened: 0,
        memory_idle_bytes: rss_bytes(pid),
        memory_loaded_bytes: rss_bytes(pid),
        memory_note: note,
    };
    let pid = |daemon: &tests::harness::Daemon| daemon.process.as_ref().map_or(0, |p| p.0.id());
    let off = row(
        "lb, flow sync off",
        connection_rate(testbed, "198.18.0.10:80")?,
        pid(daemon),
        "measured right before the next row".into(),
    );
    let key_file = std::env::temp_dir().join("lbb-sync.key");
    std::fs::write(&key_file, "ab".repeat(32))?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    let key = key_file.to_str().context("temp path")?;
    let args = [
        "--metrics",
        "off",
        "--sync-listen",
        "198.18.0.2:9470",
        "--sync-peer",
        "198.18.0.1",
        "--sync-key-file",
        key,
    ];
    daemon.restart(testbed, &args)?;
    daemon.wait_backends_active()?;
    let rate = connection_rate(testbed, "198.18.0.10:80")?;
    let reported = daemon.json(&["stats"])?["sync"]["flows_reported"].as_u64().unwrap_or(0);
    let on = row(
        "lb, flow sync on",
        rate,
        pid(daemon),
        format!("{reported} flow changes reported, sealed and sent to a peer"),
    );
    Ok([off, on])
}

pub fn print_connections(rows: &[ConnectionRow]) {
    println!(
        "{:<24} {:>12} {:>7} {:>18} {:>12} {:>12}  NOTE",
        "SYSTEM", "CONN/S", "FAILED", "WS HELD", "MEM IDLE", "MEM LOADED"
    );
    for row in rows {
        println!(
            "{:<24} {:>12.0} {:>7} {:>18} {:>9} MiB {:>9} MiB  {}",
            row.system,
            row.connections_per_second,
            row.failed_connections,
            format!("{} of {}", row.concurrent_opened, row.concurrent_asked),
            row.memory_idle_bytes >> 20,
            row.memory_loaded_bytes >> 20,
            row.memory_note
        );
    }
}
