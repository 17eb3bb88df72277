use super::*;
use crate::model::{CheckKind, CheckSpec, Scheduler};

fn error_of(text: &str) -> String {
    parse(text, Path::new("lb.toml")).unwrap_err().to_string()
}

#[test]
fn a_full_config_round_trips_through_the_state_file() {
    let text = r#"
hash_seed = 7
table_size = 251
announce_table = 100

[sync]
listen = "198.18.2.1:9470"
peers = ["198.18.2.2", "[fd00:198:18::2]:7"]
key_file = "/etc/lb/sync.key"

[store]
endpoints = ["198.18.0.201:2379", "[fd00:198:18::201]:2379"]
prefix = "/lb/prod"
ca_file = "/etc/lb/etcd-ca.pem"

[[vip]]
address = "198.18.0.10:80"

[[vip.backend]]
address = "198.18.1.1"
weight = 3

[[vip.backend]]
address = "198.18.1.2"
draining = true

[[vip]]
address = "[fd00:198:18::10]:53"
protocol = "udp"
affinity = "client-ip"
scheduler = "least-connections"

[vip.check]
type = "ws"
path = "/socket"
port = 9000
rise = 1
status = "101"
"#;
    let config = parse(text, Path::new("lb.toml")).unwrap();
    assert_eq!(config.datapath.hash_seed, 7);
    assert_eq!(config.datapath.table_size, 251);
    assert_eq!(config.announce_table, Some(100));
    let peers: Vec<String> =
        config.sync.as_ref().unwrap().peers.iter().map(ToString::to_string).collect();
    assert_eq!(peers, ["198.18.2.2:9470", "[fd00:198:18::2]:7"]);
    assert_eq!(config.desired.vips.len(), 2);
    let checks: Vec<&CheckSpec> = config.desired.vips.values().map(|spec| &spec.check).collect();
    assert_eq!(checks[0], &CheckSpec::default());
    let schedulers: Vec<Scheduler> =
        config.desired.vips.values().map(|spec| spec.scheduler).collect();
    assert_eq!(schedulers, [Scheduler::Maglev, Scheduler::LeastConnections]);
    assert_eq!(
        (checks[1].kind, checks[1].port, checks[1].path.as_str(), checks[1].rise),
        (CheckKind::Ws, Some(9000), "/socket", 1)
    );
    let store = config.store.as_ref().unwrap();
    assert_eq!(store.url(), "etcd://198.18.0.201:2379,[fd00:198:18::201]:2379/lb/prod");
    assert_eq!(store.ca_file.as_deref(), Some(Path::new("/etc/lb/etcd-ca.pem")));
    let set = config.explicit;
    assert_eq!(
        (set.hash_seed, set.table_size, set.max_vips, set.max_backends),
        (true, true, false, false)
    );

    // The state file also holds which store revision it copies, and the
    // agents' leases; it sets every fleet setting.
    let mut state = config.clone();
    let web = crate::model::parse_vip("198.18.0.10:80/tcp", None).unwrap();
    let leases = BTreeMap::from([((web, "198.18.1.2".parse().unwrap()), 0x694d_8b2f_i64)]);
    state.store_copy = Some(StoreCopy::new("/lb/prod", 0xdead_beef, 42, &leases));
    let reparsed = parse(&render(&state), Path::new("state.toml")).unwrap();
    let all = Explicit { hash_seed: true, table_size: true, max_vips: true, max_backends: true };
    assert_eq!(reparsed, Config { explicit: all, ..state });
    let copy = reparsed.store_copy.unwrap();
    assert_eq!((copy.cluster_id.as_str(), copy.revision), ("deadbeef", 42));
    assert_eq!(copy.leases(), leases);
}

#[test]
fn every_kind_of_mistake_names_file_line_and_field() {
    let vip = "[[vip]]\naddress = \"198.18.0.10:80\"\n";
    assert_eq!(
        error_of("table_size = 65536\n"),
        "lb.toml:1: table_size: 65536 is not a prime of at least 3 (the default is 65537)"
    );
    assert_eq!(
        error_of("\n[[vip]]\naddress = \"198.18.0.10\"\n"),
        "lb.toml:3: vip.address: '198.18.0.10' is not ADDRESS:PORT (examples: 198.18.0.10:80, [fd00:198:18::10]:443)"
    );
    assert_eq!(
        error_of(&format!("{vip}protocol = \"sctp\"\n")),
        "lb.toml:3: vip.protocol: unknown protocol 'sctp': expected tcp or udp"
    );
    assert_eq!(
        error_of(&format!("{vip}[[vip.backend]]\naddress = \"198.18.1.300\"\n")),
        "lb.toml:4: vip.backend.address: '198.18.1.300' is not an IP address"
    );
    assert_eq!(
        error_of(&format!("{vip}[[vip.backend]]\naddress = \"198.18.1.1\"\nweight = 0\n")),
        "lb.toml:5: vip.backend.weight: weight 0 is out of range: expected 1 to 256 (to stop new flows to a backend, drain it: `lb backend drain`, or draining = true in a file)"
    );
    assert_eq!(
        error_of(&format!(
            "{vip}[[vip.backend]]\naddress = \"198.18.1.1\"\n[[vip.backend]]\naddress = \"198.18.1.1\"\n"
        )),
        "lb.toml:6: vip.backend.address: backend 198.18.1.1 already serves VIP 198.18.0.10:80/tcp"
    );
    assert_eq!(
        error_of(&format!("{vip}{vip}")),
        "lb.toml:4: vip.address: VIP 198.18.0.10:80/tcp already exists"
    );
    assert!(error_of("max_vips = 0\n").starts_with("lb.toml:1: max_vips: must be at least 1"));
    assert_eq!(
        error_of(&format!("{vip}\n[vip.check]\ntype = \"tcp\"\nfall = 0\n")),
        "lb.toml:4: vip.check: check fall 0 is out of range: expected 1 to 100"
    );
    let bad_scheduler = error_of(&format!("{vip}scheduler = \"leastconn\"\n"));
    assert!(
        bad_scheduler.contains("line 3")
            && bad_scheduler.contains("expected `maglev` or `least-connections`"),
        "{bad_scheduler}"
    );
    let bad_type = error_of(&format!("{vip}[vip.check]\ntype = \"icmp\"\n"));
    assert!(bad_type.contains("line 4") && bad_type.contains("icmp"), "{bad_type}");
    let unknown = error_of("tabel_size = 3\n");
    assert!(
        unknown.starts_with("lb.toml: ")
            && unknown.contains("line 1")
            && unknown.contains("tabel_size"),
        "{unknown}"
    );
    assert_eq!(
        error_of("[store]\nendpoints = []\nprefix = \"/lb\"\n"),
        "lb.toml:1: store: list at least one etcd endpoint"
    );
    assert_eq!(
        error_of("[store]\nendpoints = [\"e:2379\"]\nprefix = \"lb\"\n"),
        "lb.toml:1: store: prefix 'lb' must be /NAME[/NAME...] of letters, digits, '.', '_' and '-' (e.g. /lb)"
    );
    assert_eq!(
        error_of("announce_table = 254\n"),
        "lb.toml:1: announce_table: table 254 is one of the kernel's own (unspec, default, main, local): choose another, e.g. 100"
    );
    let sync = "[sync]\nlisten = \"198.18.2.1:9470\"\nkey_file = \"k\"\n";
    let bad_peer = error_of(&format!("{sync}peers = [\"balancer-2\"]\n"));
    assert!(
        bad_peer.contains("line 4") && bad_peer.contains("'balancer-2' is not ADDRESS[:PORT]"),
        "{bad_peer}"
    );
    assert!(
        error_of(&format!("{sync}peers = []\n"))
            .starts_with("lb.toml:1: sync.peers: list at least one peer")
    );
    let syntax = error_of("[[vip]\n");
    assert!(syntax.contains("line 1"), "{syntax}");
}

#[test]
fn a_file_applied_to_a_fleet_is_counted_against_the_fleets_limits() {
    // Five backends: over a limit of 4, under the fleet's 8.
    let backends: String =
        (1..=5).map(|i| format!("[[vip.backend]]\naddress = \"198.18.1.{i}\"\n")).collect();
    let text = format!("[[vip]]\naddress = \"198.18.0.10:80\"\n{backends}");
    let path = Path::new("fleet.toml");
    let small = crate::model::DatapathConfig { max_backends: 4, ..Default::default() };
    let refused = parse_source_for_fleet(&text, path, &small).unwrap_err().to_string();
    assert!(refused.contains("above the limit of 4"), "{refused}");
    let fleet = crate::model::DatapathConfig { max_backends: 8, flow_table_size: 4096, ..small };
    let parsed = parse_source_for_fleet(&text, path, &fleet).unwrap();
    assert_eq!(parsed.desired.vips.values().next().unwrap().backends.len(), 5);
    // What the file leaves out is the running balancer's: no difference.
    let running = Config { datapath: fleet, ..parsed.clone() };
    assert_eq!(restart_settings(&running, &parsed), Vec::<String>::new());
    // The CLI's early check leaves the limits to the daemon.
    let limits = crate::model::Limits { max_vips: u32::MAX, max_backends: u32::MAX };
    parse_with(&text, path, small, Some(limits)).unwrap();
    assert!(parse(&text.replace("198.18.0.10:80", "nonsense"), path).is_err());
}

#[test]
fn every_mistake_of_a_file_is_named_at_once() {
    let text = r#"
table_size = 4
[[vip]]
address = "198.18.0.10:80"
[[vip.backend]]
address = "198.18.1.1"
weight = 0
[[vip.backend]]
address = "fd00::1"
[[vip]]
address = "198.18.0.11:80"
protocol = "sctp"
[[vip]]
address = "198.18.0.12:80"
[[vip.backend]]
address = "198.18.1.2"
"#;
    let error = error_of(text);
    let lines: Vec<&str> = error.lines().collect();
    assert_eq!(lines[0], "lb.toml: 4 mistakes:", "{error}");
    for (line, expected) in [
        (1, "lb.toml:2: table_size: 4 is not a prime"),
        (2, "lb.toml:7: vip.backend.weight: weight 0 is out of range"),
        (3, "lb.toml:9: vip.backend.address: backend fd00::1 is IPv6"),
        (4, "lb.toml:12: vip.protocol: "),
    ] {
        assert!(lines[line].starts_with(expected), "line {line}: {error}");
    }
    // One mistake reads as before: no count.
    assert!(error_of("table_size = 4\n").starts_with("lb.toml:1: table_size:"));
}
