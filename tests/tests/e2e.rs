//! End to end, in namespaces the tests create: a client, the balancer and
//! three backends on one L2 segment, the VIP on the backends' loopback, real
//! TCP and UDP clients, and `lb` driven as an operator would.

use std::collections::BTreeMap;

use tests::capture::SourceCounter;
use tests::harness::{Daemon, client_requests, start_servers, tally};
use tests::netns::{self, CLIENT4, CLIENT6, LB_IFACE, Testbed, VIP4, VIP6, endpoint};

const FLOWS: u16 = 300;

/// Address of the backend whose server answers `name` (b1, b2, ...).
fn address_of(name: &str, ipv6: bool) -> String {
    let index: usize = name.trim_start_matches('b').parse().expect("backend name");
    if ipv6 { netns::backend6(index) } else { netns::backend4(index) }
}

/// Balance over three backends, `lb lookup` agreement for every flow, then
/// `lb backend remove` and the same again over the remaining two.
fn balance_remove_and_lookup(prefix: &str, protocol: &str, ipv6: bool) {
    let testbed = Testbed::up(prefix, 3).expect("testbed");
    let port = 8080;
    let _servers = start_servers(&testbed, port).expect("servers");
    let daemon = Daemon::start(&testbed, &[]).expect("lb run");
    let (vip_address, client) = if ipv6 { (VIP6, CLIENT6) } else { (VIP4, CLIENT4) };
    let vip = endpoint(vip_address, port);
    daemon.lb(&["vip", "add", &vip, "--proto", protocol]).unwrap();
    for index in 1..=3 {
        let backend = if ipv6 { netns::backend6(index) } else { netns::backend4(index) };
        daemon.lb(&["backend", "add", &vip, &backend, "--proto", protocol]).unwrap();
    }
    daemon.wait_backends_active().unwrap();
    // Every frame the client receives from the VIP, and those of them the
    // balancer sent: with DSR the second count stays at zero.
    let balancer_mac = netns::mac(&testbed.balancer(), LB_IFACE).unwrap();
    let replies =
        SourceCounter::install(&testbed.client(), LB_IFACE, vip_address, balancer_mac).unwrap();

    let check = |first_port: u16, expected: &[&str]| -> BTreeMap<String, usize> {
        let answers = client_requests(&testbed, protocol, &vip, client, first_port, FLOWS).unwrap();
        let counts = tally(&answers);
        println!("{protocol} {vip}: {FLOWS} flows from ports {first_port}.. landed {counts:?}");
        for (port, answer) in answers.iter().filter(|(_, answer)| answer.starts_with("ERROR")) {
            println!("  port {port}: {answer}");
        }
        if counts.contains_key("ERROR") {
            // For diagnosis: did a health check flap meanwhile?
            for line in daemon
                .log_text()
                .lines()
                .filter(|l| l.contains("backend down") || l.contains("backend up"))
            {
                println!("  daemon: {line}");
            }
        }
        assert_eq!(counts.keys().map(String::as_str).collect::<Vec<_>>(), expected, "{counts:?}");
        let fair = usize::from(FLOWS) / expected.len();
        for (name, count) in &counts {
            assert!(
                count * 10 >= fair * 6 && count * 10 <= fair * 14,
                "{name} got {count}, fair share {fair}"
            );
        }
        let mut disagreements = Vec::new();
        for (client_port, answer) in &answers {
            let looked_up = daemon.lookup(&vip, &endpoint(client, *client_port), protocol).unwrap();
            if looked_up != address_of(answer, ipv6) {
                disagreements.push(format!(
                    "port {client_port}: landed on {answer}, lookup says {looked_up}"
                ));
            }
        }
        assert!(disagreements.is_empty(), "lb lookup disagrees:\n{}", disagreements.join("\n"));
        counts
    };
    check(20_000, &["b1", "b2", "b3"]);

    // UDP flows stay active until their idle timeout: removing b2 breaks them
    // (--force), which is what this test follows.
    let b2 = address_of("b2", ipv6);
    daemon.lb(&["backend", "remove", &vip, &b2, "--proto", protocol, "--force"]).unwrap();
    check(21_000, &["b1", "b3"]);

    let stats = daemon.json(&["stats"]).unwrap();
    let forwarded = stats["reasons"]["forwarded"].as_u64().unwrap();
    assert!(forwarded >= 2 * u64::from(FLOWS), "forwarded {forwarded}");
    // Replies bypass the balancer: at least one reply frame per flow reached
    // the client, and none of them came from the balancer's MAC.
    let (from_vip, via_balancer) =
        (replies.from_source().unwrap(), replies.from_source_via().unwrap());
    println!(
        "{protocol} {vip}: balancer forwarded {forwarded} packets; the client got {from_vip} frames from the VIP, {via_balancer} of them from the balancer"
    );
    assert!(from_vip >= 2 * u64::from(FLOWS), "only {from_vip} reply frames reached the client");
    assert_eq!(via_balancer, 0, "replies went through the balancer");
}

fn tcp_over_ipv4_balances_follows_removal_and_agrees_with_lookup() {
    balance_remove_and_lookup("lbe-t4-", "tcp", false);
}

fn udp_over_ipv4_balances_follows_removal_and_agrees_with_lookup() {
    balance_remove_and_lookup("lbe-u4-", "udp", false);
}

fn tcp_over_ipv6_balances_follows_removal_and_agrees_with_lookup() {
    balance_remove_and_lookup("lbe-t6-", "tcp", true);
}

fn udp_over_ipv6_balances_follows_removal_and_agrees_with_lookup() {
    balance_remove_and_lookup("lbe-u6-", "udp", true);
}

/// Bad input through the CLI is refused with a message naming it, and leaves
/// the configuration as it was; the configuration survives a restart.
fn bad_input_changes_nothing_and_state_survives_a_restart() {
    let testbed = Testbed::up("lbe-st-", 2).expect("testbed");
    let _servers = start_servers(&testbed, 80).expect("servers");
    let mut daemon = Daemon::start(&testbed, &["--detach-on-exit"]).expect("lb run");
    let vip = "198.18.0.10:80";
    daemon.lb(&["vip", "add", vip]).unwrap();
    daemon.lb(&["backend", "add", vip, &netns::backend4(1), "--weight", "2"]).unwrap();
    daemon.lb(&["backend", "add", vip, &netns::backend4(2)]).unwrap();
    // The configuration, not the backends' live state (a MAC may resolve
    // or a check pass meanwhile).
    let before = daemon.lb(&["config", "show"]).unwrap();

    // Adding what exists identically is done, and says it changed nothing.
    for args in [
        vec!["vip", "add", vip],
        vec!["vip", "add", "198.18.0.10:80/tcp"],
        vec!["backend", "add", vip, &netns::backend4(1), "--weight", "2"],
    ] {
        let done = daemon.json(&args).unwrap();
        assert_eq!(done["changed"], false, "lb {args:?}: {done}");
    }

    // Each refusal names what is wrong, and its exit status says what kind
    // of failure it is: 1 refused, 2 usage, 3 not found.
    for (args, expected, status) in [
        (vec!["vip", "add", "198.18.0.10"], "is not ADDRESS:PORT", 2),
        (
            vec!["vip", "add", vip, "--scheduler", "least-connections"],
            "already exists with other settings",
            1,
        ),
        (vec!["vip", "add", "198.18.0.11:80", "--proto", "sctp"], "expected tcp or udp", 2),
        (vec!["vip", "add", "198.18.0.11:80/udp", "--proto", "tcp"], "says udp but --proto", 2),
        (vec!["backend", "add", vip, "198.18.0.300"], "'198.18.0.300' is not an IP address", 2),
        (vec!["backend", "add", vip, "198.18.0.101:80"], "without a port", 2),
        (vec!["backend", "add", vip, &netns::backend4(1)], "already serves VIP", 1),
        (
            vec!["backend", "add", "198.18.0.99:80", "198.18.0.105"],
            "VIP 198.18.0.99:80/tcp does not exist",
            3,
        ),
        (
            vec!["backend", "add", vip, "198.18.0.105", "--weight", "0"],
            "weight 0 is out of range: expected 1 to 256 (to stop new flows to a backend, drain it: `lb backend drain`",
            2,
        ),
        (
            vec!["backend", "add", vip, "198.18.0.105", "--weight", "257"],
            "weight 257 is out of range",
            2,
        ),
        (
            vec!["backend", "set", vip, &netns::backend4(1), "--weight", "99999999999"],
            "'99999999999' is not a weight: expected a whole number from 1 to 256",
            2,
        ),
        (vec!["vip", "add", "198.18.0.10:0"], "VIP port 0 is not usable", 2),
        (vec!["backend", "add", vip, "fd00:198:18::105"], "needs the same family", 1),
        (vec!["backend", "remove", vip, "198.18.0.105"], "does not serve VIP", 3),
        (vec!["vip", "remove", "198.18.0.10:81"], "does not exist", 3),
        (vec!["lookup", vip, "198.18.0.1"], "client: '198.18.0.1' is not ADDRESS:PORT", 2),
        (vec!["lookup", vip, "[fd00:198:18::1]:40000"], "is IPv6 but VIP", 1),
        (vec!["vip", "add", "127.0.0.1:2222"], "a loopback address never leaves its host", 2),
        (vec!["vip", "add", "[::ffff:198.18.0.12]:80"], "write the IPv4 address itself", 2),
        (vec!["backend", "add", vip, "127.0.0.1"], "backend address 127.0.0.1 is not usable", 2),
        (vec!["backend", "add", vip, "198.18.0.10"], "own address", 1),
        (
            vec!["vip", "add", "198.18.0.2:2222"],
            "is eth0's own address: the balancer would take",
            1,
        ),
        (vec!["backend", "add", vip, "198.18.0.2"], "eth0's own address: the balancer cannot", 1),
        (
            vec!["backend", "add", vip, "198.18.7.1"],
            "outside every subnet of eth0 (eth0 is on 198.18.0.2/24",
            1,
        ),
    ] {
        let output = daemon.command(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(status), "lb {args:?}: {stderr}");
        assert!(stderr.contains(expected), "lb {args:?}: {stderr}");
    }
    let after = daemon.lb(&["config", "show"]).unwrap();
    assert_eq!(before, after, "refused changes altered the configuration");

    // SIGTERM with --detach-on-exit detaches; a new `lb run` restores VIPs,
    // backends and weights from the state file.
    let pid = daemon.process.as_ref().unwrap().0.id();
    tests::harness::signal(pid, nix::sys::signal::Signal::SIGTERM);
    let status = daemon.process.as_mut().unwrap().0.wait().unwrap();
    assert!(status.success(), "lb run exited with {status}: {}", daemon.log_text());
    let link =
        netns::run("ip", &["-n", &testbed.balancer(), "link", "show", netns::LB_IFACE]).unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("prog/xdp"),
        "XDP program left attached"
    );

    daemon.restart(&testbed, &[]).unwrap();
    daemon.wait_backends_active().unwrap();
    let restored = daemon.lb(&["config", "show"]).unwrap();
    assert_eq!(restored, before, "the restart did not restore the configuration");
    let answers = client_requests(&testbed, "tcp", vip, CLIENT4, 25_000, 30).unwrap();
    assert!(!tally(&answers).contains_key("ERROR"), "{answers:?}");
}

tests::root_tests!(
    tcp_over_ipv4_balances_follows_removal_and_agrees_with_lookup,
    udp_over_ipv4_balances_follows_removal_and_agrees_with_lookup,
    tcp_over_ipv6_balances_follows_removal_and_agrees_with_lookup,
    udp_over_ipv6_balances_follows_removal_and_agrees_with_lookup,
    bad_input_changes_nothing_and_state_survives_a_restart,
);
