//! Protected control: the socket refuses other users and survives garbage;
//! the Prometheus endpoint reports what `lb stats --json` reports; with a
//! million flows in the table, continuous `lb stats` and /metrics requests
//! do not slow a failover down.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use tests::harness::{
    Daemon, client_requests, lb_binary, start_servers, testbed_binary, total_active_flows,
};
use tests::netns::{self, CLIENT4, Testbed};
use tests::prometheus::Prometheus;

const VIP: &str = "198.18.0.10:80";

fn reply_to(stream: &mut UnixStream, line: &[u8]) -> String {
    stream.write_all(line).unwrap();
    let mut reply = String::new();
    BufReader::new(stream.try_clone().unwrap()).read_line(&mut reply).unwrap();
    reply
}

fn the_control_socket_refuses_other_users_and_survives_garbage() {
    let testbed = Testbed::up("lbe-ct-", 1).expect("testbed");
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    daemon.lb(&["vip", "add", VIP]).unwrap();
    let before = daemon.lb(&["vip", "list", "--json"]).unwrap();

    let mode = std::fs::metadata(&daemon.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    // Let another user reach the socket file, so the socket's own mode is what refuses it.
    let directory = daemon.socket.parent().unwrap();
    std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o755)).unwrap();
    let other = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(lb_binary())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["vip", "remove", VIP])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(
        !other.status.success() && stderr.contains("Permission denied"),
        "another user got: {stderr}"
    );

    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    for garbage in [
        &b"hello\n"[..],
        b"{\"command\":\"vip_add\"}\n",
        b"{\"command\":\"format_disk\"}\n",
        b"\xff\xfe\n",
    ] {
        let reply = reply_to(&mut stream, garbage);
        assert!(reply.starts_with("{\"error\":\"malformed request"), "{garbage:?} -> {reply}");
    }
    let mut huge = vec![b'x'; lb_userspace::api::MAX_REQUEST_BYTES + 1024];
    huge.push(b'\n');
    let reply = reply_to(&mut stream, &huge);
    assert!(reply.contains("request longer than"), "{reply}");
    // The daemon serves on, and nothing changed.
    assert_eq!(daemon.lb(&["vip", "list", "--json"]).unwrap(), before);
}

fn metrics_report_what_lb_stats_reports() {
    let testbed = Testbed::up("lbe-mt-", 2).expect("testbed");
    let _servers = start_servers(&testbed, 80).expect("servers");
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    daemon.lb(&["vip", "add", VIP]).unwrap();
    for index in 1..=2 {
        daemon.lb(&["backend", "add", VIP, &netns::backend4(index)]).unwrap();
    }
    daemon.wait_backends_active().unwrap();
    client_requests(&testbed, "tcp", VIP, CLIENT4, 26_000, 100).unwrap();

    let metrics = tests::prometheus::scrape(&testbed.balancer()).unwrap();
    assert!(metrics.ends_with("# EOF\n"), "not OpenMetrics:\n{metrics}");
    let stats = daemon.json(&["stats"]).unwrap();
    let sample = |line_start: &str| tests::prometheus::sample(&metrics, line_start) as u64;
    let vip = stats["vips"][0]["vip"].as_str().unwrap();
    assert!(metrics.contains("# TYPE lb_vip_packets counter"));
    for family in [
        "lb_build_info{version=",
        "lb_attach_mode{mode=\"native\"} 1",
        "lb_flow_table_capacity ",
        "lb_flow_table_entries ",
        "lb_vips_capacity ",
        "lb_backends_capacity ",
        "lb_vip_dropped_packets_total{",
        "lb_backend_health_check_duration_seconds{",
        "lb_backend_last_change_timestamp_seconds{",
    ] {
        assert!(metrics.contains(family), "no {family} in:\n{metrics}");
    }
    assert_eq!(
        sample(&format!("lb_vip_packets_total{{vip=\"{vip}\"}}")),
        stats["vips"][0]["packets"].as_u64().unwrap()
    );
    assert_eq!(
        sample(&format!("lb_vip_bytes_total{{vip=\"{vip}\"}}")),
        stats["vips"][0]["bytes"].as_u64().unwrap()
    );
    for backend in stats["backends"].as_array().unwrap() {
        let labels =
            format!("{{vip=\"{vip}\",backend=\"{}\"}}", backend["address"].as_str().unwrap());
        assert_eq!(
            sample(&format!("lb_backend_packets_total{labels}")),
            backend["packets"].as_u64().unwrap()
        );
        assert_eq!(
            sample(&format!("lb_backend_active_flows{labels}")),
            backend["active_flows"].as_u64().unwrap()
        );
        assert_eq!(sample(&format!("lb_backend_up{labels}")), 1);
    }
    assert_eq!(
        sample("lb_datapath_packets_total{reason=\"forwarded\"}"),
        stats["reasons"]["forwarded"].as_u64().unwrap()
    );
    assert_eq!(sample("lb_table_rebuilds_total"), stats["tables_built"].as_u64().unwrap());
    assert!(stats["vips"][0]["packets"].as_u64().unwrap() >= 100 * 3, "{stats}");
    println!(
        "FIGURE /metrics: {} lines; lb_vip_packets_total = {}",
        metrics.lines().count(),
        stats["vips"][0]["packets"]
    );
    prometheus_scrapes_it_and_loads_the_rules_and_dashboard(&testbed, &metrics, &stats);
}

/// A real Prometheus scrapes the endpoint (health `up` means its parser
/// took every line), stores what `lb stats` says, evaluates the shipped
/// alert rules without error, and answers every query of the shipped
/// Grafana dashboard; each metric those queries name is one lb exports.
fn prometheus_scrapes_it_and_loads_the_rules_and_dashboard(
    testbed: &Testbed,
    metrics: &str,
    stats: &serde_json::Value,
) {
    let dist = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist");
    let rules_file = dist.join("prometheus/lb-alerts.yml");
    let server = Prometheus::start(&testbed.balancer(), "127.0.0.1:9464", &rules_file).unwrap();
    let (health, error) = server.scraped().unwrap();
    assert_eq!((health.as_str(), error.as_str()), ("up", ""), "the scrape failed");
    let stored = server.query("lb_vip_packets_total").unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0]["value"][1], stats["vips"][0]["packets"].to_string().as_str());

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let rules = loop {
        let groups = server.api("/api/v1/rules", &[]).unwrap();
        let rules = groups["data"]["groups"][0]["rules"].as_array().cloned().unwrap_or_default();
        if rules.iter().all(|rule| rule["health"] == "ok") && !rules.is_empty()
            || std::time::Instant::now() > deadline
        {
            break rules;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let shipped = std::fs::read_to_string(&rules_file).unwrap().matches("- alert:").count();
    assert!(shipped >= 10, "{shipped} rules in {}", rules_file.display());
    assert_eq!(rules.len(), shipped, "{rules:?}");
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dist.join("grafana/lb-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exported: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expression = target["expr"].as_str().unwrap();
            let query = expression.replace("$__rate_interval", "1m").replace("$instance", ".*");
            server.query(&query).unwrap_or_else(|error| panic!("{}: {error}", panel["title"]));
            for name in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if name.starts_with("lb_") {
                    assert!(exported.contains(name), "{}: {name} is not exported", panel["title"]);
                }
            }
        }
    }
}

/// The daemon's flow table, through its pin.
fn pinned_flow_table(
    daemon: &Daemon,
) -> aya::maps::HashMap<aya::maps::MapData, lb_common::FlowKey, lb_common::FlowEntry> {
    use aya::maps::{HashMap, Map, MapData};
    let path = daemon.pin_dir.join(netns::LB_IFACE).join(lb_common::MAP_FLOWS);
    let map = MapData::from_pin(&path).expect("the pinned flow table");
    HashMap::try_from(Map::LruHashMap(map)).unwrap()
}

/// Fills the daemon's pinned flow table with `count` confirmed flows on
/// the backend in `slot` (what a million real clients would leave there).
fn fill_flow_table(daemon: &Daemon, slot: u32, vip_index: u32, count: u32) {
    let mut flows = pinned_flow_table(daemon);
    let now = lb_userspace::datapath::monotonic_ns();
    for index in 0..count {
        let client = std::net::IpAddr::from([198, 19, (index >> 16) as u8, (index >> 8) as u8]);
        let key =
            lb_common::FlowKey::new(client, index as u16, "198.18.0.10".parse().unwrap(), 80, 6);
        let entry = lb_common::FlowEntry {
            backend_slot: slot,
            vip_index,
            last_seen_ns: now,
            flags: 0,
            generation: 1,
        };
        flows.insert(key, entry, 0).unwrap();
    }
}

fn a_million_flows_and_busy_readers_do_not_delay_a_failover() {
    let testbed = Testbed::up("lbe-busy-", 2).expect("testbed");
    let mut servers: Vec<Option<_>> =
        start_servers(&testbed, 80).expect("servers").into_iter().map(Some).collect();
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    daemon.lb(&["vip", "add", VIP]).unwrap();
    for index in 1..=2 {
        daemon.lb(&["backend", "add", VIP, &netns::backend4(index)]).unwrap();
    }
    daemon.wait_backends_active().unwrap();
    let b2 = netns::backend4(2);
    let down = |address: &str| if address == b2 { "down" } else { "up" };

    // Side by side: a failover alone, then the same with the load.
    servers[1] = None;
    let quiet = daemon.wait_backends(down).unwrap();
    servers[1] = Some(tests::harness::start_server(&testbed, 2, 80).unwrap());
    daemon.wait_backends_active().unwrap();

    // The first VIP's index and first backend slot are 0, generation 1.
    fill_flow_table(&daemon, 0, 0, 1_000_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|reader| {
            let (stop, balancer, socket) =
                (stop.clone(), testbed.balancer(), daemon.socket.clone());
            std::thread::spawn(move || {
                let mut requests = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut command = if reader == 0 {
                        let mut stats = Command::new(lb_binary());
                        stats.arg("--socket").arg(&socket).args(["stats", "--json"]);
                        stats
                    } else {
                        let mut scrape = Command::new("ip");
                        scrape.args(["netns", "exec", &balancer]).arg(testbed_binary());
                        scrape.args(["http-get", "127.0.0.1:9464", "/metrics"]);
                        scrape
                    };
                    let _ = command.stdout(Stdio::null()).stderr(Stdio::null()).status();
                    requests += 1;
                }
                requests
            })
        })
        .collect();
    // The readers run while the counter catches up with the million flows.
    let filled = std::time::Instant::now();
    let stats = daemon.stats_once_counted(1_000_000, std::time::Duration::from_secs(20)).unwrap();
    let counted = total_active_flows(&stats);
    assert!(counted >= 1_000_000, "the million flows were not counted: {counted}");
    let counted_after = filled.elapsed();
    servers[1] = None;
    let busy = daemon.wait_backends(down).unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let requests: Vec<u32> = readers.into_iter().map(|reader| reader.join().unwrap()).collect();
    println!(
        "FIGURE failover: {} ms alone, {} ms with a million active flows (counted {} ms after the fill) and {requests:?} lb stats / metrics requests running",
        quiet.as_millis(),
        busy.as_millis(),
        counted_after.as_millis()
    );
    assert!(
        busy <= quiet + std::time::Duration::from_secs(1),
        "the failover took {busy:?} under load against {quiet:?} alone"
    );

    // The failure this prevents: before, every `lb stats` and every scrape
    // walked the flow table on the daemon's loop, which then handled
    // nothing else, health reports included.
    let (entries, walk) = walk_flow_table(&daemon);
    let held = walk * requests.iter().sum::<u32>();
    println!(
        "FIGURE one walk of the {entries}-entry flow table takes {} ms; walked on the loop for each of those requests (the code before), they would have held it {:.1} s in all",
        walk.as_millis(),
        held.as_secs_f64()
    );
    assert!(entries >= 1_000_000, "the table holds {entries} entries");
    assert!(
        held > std::time::Duration::from_secs(1),
        "too light a load to show anything: {held:?}"
    );
}

/// Walks the daemon's pinned flow table once, as counting active flows
/// does: how many entries, and how long it took.
fn walk_flow_table(daemon: &Daemon) -> (u64, std::time::Duration) {
    let flows = pinned_flow_table(daemon);
    let started = std::time::Instant::now();
    let entries = flows.iter().filter_map(Result::ok).count() as u64;
    (entries, started.elapsed())
}

tests::root_tests!(
    the_control_socket_refuses_other_users_and_survives_garbage,
    metrics_report_what_lb_stats_reports,
    a_million_flows_and_busy_readers_do_not_delay_a_failover,
);
