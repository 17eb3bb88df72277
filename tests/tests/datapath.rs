//! Datapath tests: the real XDP object, maps filled by the real reconcile
//! step, packets run through BPF_PROG_TEST_RUN, whole output frames compared.

use std::net::{IpAddr, SocketAddr};

use lb_common::{FlowEvent, FlowKey, FlowSyncKind, Reason};
use lb_userspace::datapath::{AttachMode, Datapath, Maps as _};
use lb_userspace::model::{
    Affinity, BackendHealth, BackendSpec, CheckSpec, DatapathConfig, DesiredState, HealthMap,
    Limits, Protocol, TunnelConfig, Vip,
};
use lb_userspace::reconcile::Reconciler;
use tests::fixture::{addresses, backend_mac, balancer};
use tests::packets::{
    BALANCER_MAC, Flow, Icmp, L3_OFFSET, L4, Segment, Shape, dsr_rewritten, frame, icmp_frame,
    insert_ipv6_extensions, make_ipv4_fragment, reply_packet, truncate_ip,
};

use tests::{XDP_DROP, XDP_PASS, XDP_TX};

/// A UDP flow idle for this long is forgotten (short, so the test can wait it out).
const UDP_IDLE_MS: u64 = 200;

const CONFIG: DatapathConfig = DatapathConfig {
    hash_seed: 0x5eed,
    table_size: 251,
    max_vips: 8,
    max_backends: 32,
    // Hundreds of half-open flows at once are pinned in buckets of four
    // slots (lb_common::PENDING_WAYS): a table this size keeps every pin,
    // where 4,096 slots would put five of some test's flows in one bucket.
    flow_table_size: 65_536,
    udp_idle_timeout_ms: UDP_IDLE_MS,
    tcp_idle_timeout_ms: 3_600_000,
    sync_flows: false,
    own_mac: BALANCER_MAC,
    tunnel: TunnelConfig::NONE,
};
const LIMITS: Limits = CONFIG.limits();

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

fn vip(text: &str, protocol: Protocol) -> Vip {
    Vip::new(text.parse::<SocketAddr>().expect("test endpoint"), protocol)
}

struct Fixture {
    reconciler: Reconciler,
    desired: DesiredState,
}

const TCP4: &str = "198.18.0.10:80";
const UDP4: &str = "198.18.0.10:53";
const TCP6: &str = "[fd00:198:18::10]:80";
const UDP6: &str = "[fd00:198:18::10]:53";
const EMPTY4: &str = "198.18.0.20:80";
const V4_BACKENDS: [&str; 3] = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
const V6_BACKENDS: [&str; 3] = ["fd00:198:18:1::1", "fd00:198:18:1::2", "fd00:198:18:1::3"];

impl Fixture {
    fn new() -> Self {
        Self::with(CONFIG)
    }

    fn with(config: DatapathConfig) -> Self {
        let (v4, v6) = (addresses(&V4_BACKENDS), addresses(&V6_BACKENDS));
        let (reconciler, desired) = balancer(
            config,
            &[
                (TCP4, Protocol::Tcp, &v4),
                (UDP4, Protocol::Udp, &v4),
                (TCP6, Protocol::Tcp, &v6),
                (UDP6, Protocol::Udp, &v6),
                (EMPTY4, Protocol::Tcp, &[]),
            ],
            backend_mac,
        )
        .expect("load the XDP object and install the configuration");
        Self { reconciler, desired }
    }

    fn reason_count(&self, reason: Reason) -> u64 {
        let counters = self.reconciler.datapath().reason_counters().unwrap();
        counters.iter().find(|(r, _)| *r == reason).unwrap().1
    }

    /// Where the control plane says this flow goes.
    fn expected_backend(&self, flow: Flow) -> IpAddr {
        let protocol = match flow.l4 {
            L4::Tcp => Protocol::Tcp,
            L4::Udp => Protocol::Udp,
        };
        let vip = Vip { address: flow.vip, port: flow.vip_port, protocol };
        self.reconciler
            .lookup(&vip, SocketAddr::new(flow.client, flow.client_port))
            .and_then(|result| result.backend)
            .expect("the flow's VIP has backends")
    }
}

fn flow(client: &str, client_port: u16, vip_endpoint: &str, l4: L4) -> Flow {
    let endpoint: SocketAddr = vip_endpoint.parse().unwrap();
    Flow { client: ip(client), client_port, vip: endpoint.ip(), vip_port: endpoint.port(), l4 }
}

enum Expect {
    /// XDP_TX to the backend lookup names, only the MACs rewritten.
    Forward(Flow),
    /// Returned with the given action, every byte unchanged.
    Untouched(u32),
}

struct Case {
    description: &'static str,
    input: Vec<u8>,
    expect: Expect,
    reason: Reason,
}

fn cases() -> Vec<Case> {
    let tcp4 = flow("198.18.0.1", 40_000, TCP4, L4::Tcp);
    let udp4 = flow("198.18.0.1", 40_001, UDP4, L4::Udp);
    let tcp6 = flow("fd00:198:18::1", 40_002, TCP6, L4::Tcp);
    let udp6 = flow("fd00:198:18::1", 40_003, UDP6, L4::Udp);
    let plain = Shape::default();
    let payload = b"hello backend";
    let forward = |description, input, flow| Case {
        description,
        input,
        expect: Expect::Forward(flow),
        reason: Reason::Forwarded,
    };
    let untouched = |description, input, action, reason| Case {
        description,
        input,
        expect: Expect::Untouched(action),
        reason,
    };

    let mut ipv4_bad_ihl = frame(tcp4, plain, payload);
    ipv4_bad_ihl[L3_OFFSET] = 0x44;
    let mut ipv4_bad_version = frame(tcp4, plain, payload);
    ipv4_bad_version[L3_OFFSET] = 0x55;
    let mut ipv4_ihl_past_end = frame(tcp4, plain, b"");
    ipv4_ihl_past_end[L3_OFFSET] = 0x4f;
    ipv4_ihl_past_end.truncate(L3_OFFSET + 40);
    let mut first_fragment = frame(udp4, plain, payload);
    make_ipv4_fragment(&mut first_fragment, true, 0);
    let mut later_fragment = frame(udp4, plain, payload);
    make_ipv4_fragment(&mut later_fragment, false, 100);
    let mut fragment_not_ours =
        frame(flow("198.18.0.1", 1, "198.18.0.99:53", L4::Udp), plain, payload);
    make_ipv4_fragment(&mut fragment_not_ours, true, 0);
    let truncated_tcp = truncate_ip(&frame(tcp4, plain, b""), L3_OFFSET + 20 + 10);
    let mut ip_longer_than_frame = frame(tcp4, plain, payload);
    ip_longer_than_frame.truncate(ip_longer_than_frame.len() - 4);
    let truncated_tcp_not_ours = truncate_ip(
        &frame(flow("198.18.0.1", 1, "198.18.0.99:80", L4::Tcp), plain, b""),
        L3_OFFSET + 20 + 10,
    );

    let mut arp = BALANCER_MAC.to_vec();
    arp.extend_from_slice(&tests::packets::CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    let to_mac = |mac: [u8; 6]| {
        let mut input = frame(tcp4, plain, payload);
        input[..6].copy_from_slice(&mac);
        input
    };
    let mut icmp_to_vip = frame(tcp4, plain, payload);
    icmp_to_vip[L3_OFFSET + 9] = 1;
    // A third tag: splice an 802.1Q tag in front of a QinQ frame's tags.
    let qinq = frame(tcp4, Shape { vlans: &[100, 200], ..plain }, payload);
    let mut three_tags = qinq[..12].to_vec();
    three_tags.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
    three_tags.extend_from_slice(&qinq[12..]);

    vec![
        forward("IPv4 TCP SYN to a VIP", frame(tcp4, plain, payload), tcp4),
        forward("IPv4 UDP to a VIP", frame(udp4, plain, payload), udp4),
        forward("IPv6 TCP to a VIP", frame(tcp6, plain, payload), tcp6),
        forward("IPv6 UDP to a VIP", frame(udp6, plain, payload), udp6),
        forward("one 802.1Q tag", frame(tcp4, Shape { vlans: &[100], ..plain }, payload), tcp4),
        forward(
            "two VLAN tags (QinQ), IPv6",
            frame(udp6, Shape { vlans: &[100, 200], ..plain }, payload),
            udp6,
        ),
        forward(
            "IPv4 with 8 bytes of options (IHL 7)",
            frame(tcp4, Shape { ipv4_options: &[1, 1, 1, 1, 1, 1, 1, 0], ..plain }, payload),
            tcp4,
        ),
        forward(
            "IPv6 hop-by-hop and destination options before UDP",
            insert_ipv6_extensions(&frame(udp6, plain, payload), &[(0, 8), (60, 16)]),
            udp6,
        ),
        forward(
            "IPv6 authentication header before TCP",
            insert_ipv6_extensions(&frame(tcp6, plain, payload), &[(51, 16)]),
            tcp6,
        ),
        untouched(
            "to a VIP, but for another balancer's MAC (flooded by a switch)",
            to_mac([0x02, 0, 0, 0, 0, 0x0c]),
            XDP_PASS,
            Reason::PassNotForUs,
        ),
        untouched("to a VIP, broadcast", to_mac([0xff; 6]), XDP_PASS, Reason::PassNotForUs),
        untouched(
            "to a VIP, multicast",
            to_mac([0x01, 0x00, 0x5e, 0, 0, 1]),
            XDP_PASS,
            Reason::PassNotForUs,
        ),
        untouched(
            "TCP to a non-VIP address",
            frame(flow("198.18.0.1", 22, "198.18.0.99:22", L4::Tcp), plain, payload),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched(
            "TCP to a non-VIP address, on a VIP's port",
            frame(flow("198.18.0.1", 22, "198.18.0.99:80", L4::Tcp), plain, payload),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched(
            "VIP address, port without a VIP",
            frame(flow("198.18.0.1", 1234, "198.18.0.10:81", L4::Tcp), plain, payload),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched(
            "VIP address and port, other protocol",
            frame(flow("198.18.0.1", 1234, "198.18.0.10:80", L4::Udp), plain, payload),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched(
            "ICMP that is not an error, to a VIP address",
            icmp_to_vip,
            XDP_PASS,
            Reason::PassIcmp,
        ),
        untouched("ARP", arp, XDP_PASS, Reason::PassNotIp),
        // BPF_PROG_TEST_RUN (like every driver) refuses frames under 14 bytes,
        // so the shortest malformed frame is one whose VLAN tag is cut short.
        untouched(
            "VLAN tag truncated",
            frame(tcp4, Shape { vlans: &[100], ..plain }, payload)[..16].to_vec(),
            XDP_PASS,
            Reason::PassMalformed,
        ),
        untouched(
            "IPv4 header truncated",
            frame(tcp4, plain, payload)[..L3_OFFSET + 12].to_vec(),
            XDP_PASS,
            Reason::PassMalformed,
        ),
        untouched("IPv4 IHL below 5", ipv4_bad_ihl, XDP_PASS, Reason::PassMalformed),
        untouched("version 5 in an IPv4 frame", ipv4_bad_version, XDP_PASS, Reason::PassMalformed),
        untouched("IPv4 IHL past the end", ipv4_ihl_past_end, XDP_PASS, Reason::PassMalformed),
        untouched(
            "IPv6 header truncated",
            frame(tcp6, plain, payload)[..L3_OFFSET + 30].to_vec(),
            XDP_PASS,
            Reason::PassMalformed,
        ),
        untouched("three VLAN tags", three_tags, XDP_PASS, Reason::PassVlanDepth),
        untouched(
            "IPv4 total length past the end of the frame",
            ip_longer_than_frame,
            XDP_PASS,
            Reason::PassMalformed,
        ),
        untouched(
            "TCP header truncated, to a VIP",
            truncated_tcp,
            XDP_DROP,
            Reason::DropMalformedL4,
        ),
        untouched(
            "TCP header truncated, not ours",
            truncated_tcp_not_ours,
            XDP_PASS,
            Reason::PassNotVip,
        ),
        untouched("IPv4 first fragment to a VIP", first_fragment, XDP_DROP, Reason::DropFragment),
        untouched("IPv4 later fragment to a VIP", later_fragment, XDP_DROP, Reason::DropFragment),
        untouched("IPv4 fragment, not ours", fragment_not_ours, XDP_PASS, Reason::PassNotVip),
        untouched(
            "IPv6 fragment header to a VIP",
            insert_ipv6_extensions(&frame(udp6, plain, payload), &[(44, 8)]),
            XDP_DROP,
            Reason::DropFragment,
        ),
        untouched(
            "IPv6 ESP to a VIP",
            insert_ipv6_extensions(&frame(udp6, plain, payload), &[(50, 8)]),
            XDP_DROP,
            Reason::DropUnhashable,
        ),
        untouched(
            "IPv6 chain longer than the walk, to a VIP",
            insert_ipv6_extensions(
                &frame(udp6, plain, payload),
                &[(0, 8), (60, 8), (60, 8), (60, 8), (60, 8)],
            ),
            XDP_DROP,
            Reason::DropUnhashable,
        ),
        untouched(
            "IPv6 extension header truncated, to a VIP",
            truncate_ip(
                &insert_ipv6_extensions(&frame(udp6, plain, b""), &[(0, 8)]),
                L3_OFFSET + 41,
            ),
            XDP_DROP,
            Reason::DropMalformedL4,
        ),
        untouched(
            "VIP without backends",
            frame(flow("198.18.0.1", 5555, EMPTY4, L4::Tcp), plain, payload),
            XDP_DROP,
            Reason::DropNoBackend,
        ),
    ]
}

fn every_case_gives_the_expected_action_output_and_counter() {
    let fixture = Fixture::new();
    let mut failures = Vec::new();
    for case in cases() {
        let before = fixture.reason_count(case.reason);
        let (action, output) = fixture.reconciler.datapath().test_run(&case.input).unwrap();
        let (want_action, want_output) = match case.expect {
            Expect::Forward(flow) => {
                (XDP_TX, dsr_rewritten(&case.input, backend_mac(fixture.expected_backend(flow))))
            }
            Expect::Untouched(action) => (action, case.input.clone()),
        };
        let counted = fixture.reason_count(case.reason) - before;
        if action != want_action || output != want_output || counted != 1 {
            failures.push(format!(
                "{}: action {action} (want {want_action}), output {} , {:?} counted {counted} times",
                case.description,
                if output == want_output { "as expected" } else { "DIFFERS" },
                case.reason,
            ));
        }
    }
    assert!(failures.is_empty(), "failing cases:\n{}", failures.join("\n"));
}

fn flows_spread_over_all_backends_exactly_where_lookup_says() {
    let mut fixture = Fixture::new();
    let vip4 = vip(TCP4, Protocol::Tcp);
    let landed = |fixture: &Fixture| {
        let mut landed: Vec<IpAddr> = Vec::new();
        for port in 0..600u16 {
            let flow = flow("198.18.0.1", 20_000 + port, TCP4, L4::Tcp);
            let input = frame(flow, Shape::default(), b"x");
            let (action, output) = fixture.reconciler.datapath().test_run(&input).unwrap();
            assert_eq!(action, XDP_TX);
            let backend = fixture.expected_backend(flow);
            assert_eq!(output, dsr_rewritten(&input, backend_mac(backend)), "port {port}");
            assert_eq!(&output[6..12], &BALANCER_MAC, "source MAC is the balancer's");
            landed.push(backend);
        }
        landed
    };
    let before = landed(&fixture);
    for backend in V4_BACKENDS {
        let share = before.iter().filter(|landed| **landed == ip(backend)).count();
        assert!((150..=250).contains(&share), "{backend} got {share} of 600 flows");
    }

    // Remove one backend: nothing goes to it any more, and the flows of the
    // others (apart from Maglev's small extra movement) stay where they were.
    let removed = ip(V4_BACKENDS[1]);
    fixture.desired.remove_backend(&vip4, removed).unwrap();
    fixture.reconciler.apply(&fixture.desired, &HealthMap::new()).unwrap();
    let after = landed(&fixture);
    assert!(!after.contains(&removed));
    let kept = before.iter().zip(&after).filter(|(b, a)| **b != removed && b == a).count();
    let others = before.iter().filter(|b| **b != removed).count();
    assert!(kept as f64 >= others as f64 * 0.97, "{kept} of {others} flows kept their backend");
}

fn counters_count_packets_and_bytes_per_vip_and_backend() {
    let fixture = Fixture::new();
    let vip4 = vip(UDP4, Protocol::Udp);
    let flow = flow("198.18.0.7", 7777, UDP4, L4::Udp);
    let input = frame(flow, Shape::default(), &[0u8; 100]);
    for _ in 0..5 {
        fixture.reconciler.datapath().test_run(&input).unwrap();
    }
    let index = fixture.reconciler.vip_index(&vip4).unwrap();
    let vip_counters = fixture.reconciler.datapath().vip_counters(index).unwrap();
    assert_eq!((vip_counters.packets, vip_counters.bytes), (5, 5 * input.len() as u64));
    let target = fixture.expected_backend(flow);
    for backend in fixture.reconciler.backends(&vip4) {
        let counters = fixture.reconciler.datapath().backend_counters(backend.slot).unwrap();
        let want = if backend.address == target { 5 } else { 0 };
        assert_eq!(counters.packets, want, "backend {}", backend.address);
    }
}

// --- the flow table -----------------------------------------------------------

impl Fixture {
    /// Runs one frame of `flow`; returns the backend it was sent to (by MAC).
    fn send(&self, flow: Flow, segment: Segment) -> IpAddr {
        let input = frame(flow, Shape { segment, ..Shape::default() }, b"data");
        let (action, output) = self.reconciler.datapath().test_run(&input).unwrap();
        assert_eq!(action, XDP_TX, "{flow:?} {segment:?} was not forwarded");
        let mac: [u8; 6] = output[0..6].try_into().unwrap();
        let every = V4_BACKENDS.iter().chain(&V6_BACKENDS).chain(&["198.18.1.4"]);
        every.map(|b| ip(b)).find(|b| backend_mac(*b) == mac).expect("a known backend MAC")
    }

    fn apply(&mut self, health: &HealthMap) {
        self.reconciler.apply(&self.desired, health).unwrap();
    }

    fn flow_events(&self) -> Vec<(FlowEvent, u64)> {
        self.reconciler.datapath().flow_event_counters().unwrap()
    }
}

fn event(events: &[(FlowEvent, u64)], which: FlowEvent) -> u64 {
    events.iter().find(|(e, _)| *e == which).unwrap().1
}

fn tcp_flows(first_port: u16, count: u16) -> Vec<Flow> {
    (0..count).map(|i| flow("198.18.0.1", first_port + i, TCP4, L4::Tcp)).collect()
}

/// Adds 198.18.1.4 to the IPv4 TCP VIP, which moves about a quarter of its table.
fn add_fourth_backend(fixture: &mut Fixture) {
    let address = ip("198.18.1.4");
    fixture
        .desired
        .add_backend(&vip(TCP4, Protocol::Tcp), BackendSpec::new(address, 1), LIMITS)
        .unwrap();
    fixture.reconciler.set_mac(address, backend_mac(address));
    fixture.apply(&HealthMap::new());
}

fn established_flows_keep_their_backend_when_the_table_changes() {
    let mut fixture = Fixture::new();
    let flows = tcp_flows(30_000, 400);
    let before: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    add_fourth_backend(&mut fixture);

    let new_choice: Vec<IpAddr> = flows.iter().map(|f| fixture.expected_backend(*f)).collect();
    let table_moved = before.iter().zip(&new_choice).filter(|(b, n)| b != n).count();
    assert!(table_moved > 50, "the table change moved only {table_moved} of 400 flows");

    // Established segments follow their entries, not the new Maglev choice:
    // the handshake's ACK confirms each flow, later segments follow it.
    let confirmed_before = event(&fixture.flow_events(), FlowEvent::Confirmed);
    let after: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    assert_eq!(after, before, "flows changed backend before their handshake completed");
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Confirmed) - confirmed_before, 400);
    let hits_before = event(&fixture.flow_events(), FlowEvent::Hit);
    let later: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    assert_eq!(later, before, "established flows changed backend");
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Hit) - hits_before, 400);

    // A SYN on an open connection's entry follows it: a forged SYN cannot
    // move a live connection (its backend answers with a challenge ACK).
    let syn_again: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    assert_eq!(syn_again, before, "a SYN moved an open connection");

    // Once closed, a new connection (SYN) on the same ports takes the new table.
    for flow in &flows {
        fixture.send(*flow, Segment::Fin);
    }
    let renewed_before = event(&fixture.flow_events(), FlowEvent::Renewed);
    let renewed: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    assert_eq!(renewed, new_choice);
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Renewed) - renewed_before, 400);
    // And lookup reports both views of such a flow.
    let result = fixture
        .reconciler
        .lookup(&vip(TCP4, Protocol::Tcp), SocketAddr::new(flows[0].client, flows[0].client_port))
        .unwrap();
    assert_eq!(
        (result.backend, result.established_backend),
        (Some(new_choice[0]), Some(renewed[0]))
    );
}

/// `detach` takes the program off its interface and keeps its maps:
/// attached again, an established flow still follows its entry. (The bench
/// swaps lb and its reflector on one interface this way.)
fn a_detached_datapath_keeps_its_flows_and_attaches_again() {
    const NS: &str = "lbt-detach";
    tests::netns::down(NS);
    tests::netns::add(NS).unwrap();
    tests::netns::ip(NS, &["link", "add", "d0", "type", "veth", "peer", "name", "d1"]).unwrap();
    let fixture = Fixture::new();
    let flow = tcp_flows(41_000, 1)[0];
    let backend = establish(&fixture, &[flow])[0];
    let fixture = std::thread::spawn(move || {
        let mut fixture = fixture;
        tests::netns::enter(NS).unwrap();
        let datapath = fixture.reconciler.datapath_mut();
        datapath.attach("d0", AttachMode::Native).unwrap();
        assert!(tests::netns::runs_xdp(NS, "d0").unwrap(), "not attached");
        datapath.detach().unwrap();
        assert!(!tests::netns::runs_xdp(NS, "d0").unwrap(), "still attached after detach");
        datapath.attach("d0", AttachMode::Native).unwrap();
        assert!(tests::netns::runs_xdp(NS, "d0").unwrap(), "not attached again");
        fixture
    })
    .join()
    .unwrap();
    let hits = event(&fixture.flow_events(), FlowEvent::Hit);
    assert_eq!(fixture.send(flow, Segment::Ack), backend);
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Hit) - hits, 1, "not a flow-table hit");
    tests::netns::down(NS);
}

/// `count` TCP flows (client 198.18.0.1, ports from `first_port`) whose
/// unconfirmed pins share one LB_NEW_FLOWS bucket under `CONFIG`, starting
/// with one the fourth backend moves (a scratch balancer tells which).
fn flows_of_one_bucket(first_port: u16, count: usize) -> Vec<Flow> {
    let slots = lb_common::new_flow_table_size(CONFIG.flow_table_size);
    let bucket_of = |flow: Flow| {
        lb_common::pending_bucket(lb_common::flow_hash(&to_key(flow), CONFIG.hash_seed), slots)
    };
    let (before, mut after) = (Fixture::new(), Fixture::new());
    add_fourth_backend(&mut after);
    let moves = |flow: Flow| before.expected_backend(flow) != after.expected_backend(flow);
    let mut buckets: std::collections::HashMap<u32, Vec<Flow>> = Default::default();
    for port in first_port..=u16::MAX {
        let flow = flow("198.18.0.1", port, TCP4, L4::Tcp);
        let members = buckets.entry(bucket_of(flow)).or_default();
        members.push(flow);
        if members.len() < count {
            continue;
        }
        if let Some(mover) = members.iter().position(|member| moves(*member)) {
            let mut members = members.clone();
            members.swap(0, mover);
            members.truncate(count);
            return members;
        }
    }
    panic!("no bucket of {count} flows above port {first_port}");
}

/// A bucket holds four unconfirmed flows: a fifth takes the oldest one's
/// slot. The other four keep their pins through a table change; the first
/// lost its pin, so its handshake's ACK takes the current table (a bare ACK
/// without an entry), as after an eviction from an LRU table.
fn a_fifth_half_open_flow_of_a_bucket_takes_the_oldest_ones_pin() {
    let mut fixture = Fixture::new();
    let flows = flows_of_one_bucket(20_000, lb_common::PENDING_WAYS as usize + 1);
    let before: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    add_fourth_backend(&mut fixture);
    let moved_choice = fixture.expected_backend(flows[0]);
    assert_ne!(moved_choice, before[0], "the first flow's choice moves");

    // The oldest flow's ACK last: pinned again on its miss, it would take
    // the slot of the next oldest.
    let events_before = fixture.flow_events();
    let newest: Vec<IpAddr> = flows[1..].iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    let oldest = fixture.send(flows[0], Segment::Ack);
    let events = fixture.flow_events();
    let delta = |which| event(&events, which) - event(&events_before, which);
    assert_eq!(newest, before[1..], "the four newest flows keep their pins");
    assert_eq!(oldest, moved_choice, "the oldest flow's ACK takes the current table");
    assert_eq!(delta(FlowEvent::Confirmed), 4);
    assert_eq!(delta(FlowEvent::MissFallback), 1);
}

fn a_segment_without_an_entry_falls_back_to_maglev_and_is_recorded() {
    let mut fixture = Fixture::new();
    let flows = tcp_flows(31_000, 100);
    let first: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    let expected: Vec<IpAddr> = flows.iter().map(|f| fixture.expected_backend(*f)).collect();
    assert_eq!(first, expected, "a mid-connection segment with no entry takes the Maglev choice");
    assert_eq!(event(&fixture.flow_events(), FlowEvent::MissFallback), 100);
    add_fourth_backend(&mut fixture);
    let later: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    assert_eq!(later, first, "the fallback choice was recorded and kept");
}

fn drained_backends_get_no_new_flows_but_keep_established_ones() {
    let mut fixture = Fixture::new();
    let flows = tcp_flows(32_000, 300);
    let before: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    let drained = ip(V4_BACKENDS[0]);
    let on_drained = before.iter().filter(|b| **b == drained).count();
    assert!(on_drained > 50);
    fixture.desired.set_draining(&vip(TCP4, Protocol::Tcp), drained, true).unwrap();
    fixture.apply(&HealthMap::new());

    let established: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    assert_eq!(established, before, "established flows of every backend, drained or not, continue");
    let new_flows: Vec<IpAddr> =
        tcp_flows(33_000, 300).iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    assert!(!new_flows.contains(&drained), "a drained backend got a SYN");
    let active = fixture.reconciler.datapath().active_flows();
    let slot = fixture.reconciler.backends(&vip(TCP4, Protocol::Tcp))[0].slot;
    assert_eq!(
        active.get(&slot).copied(),
        Some(on_drained as u64),
        "active flows of the drained backend"
    );

    // A FIN or a RST stops a flow counting as active, but the entry stays.
    let drained_flows: Vec<Flow> =
        flows.iter().zip(&before).filter(|(_, b)| **b == drained).map(|(f, _)| *f).collect();
    fixture.send(drained_flows[0], Segment::Fin);
    fixture.send(drained_flows[1], Segment::Rst);
    let active = fixture.reconciler.datapath().active_flows();
    assert_eq!(active.get(&slot).copied(), Some(on_drained as u64 - 2));
    let reset = fixture.reconciler.datapath().flow(&to_key(drained_flows[1]));
    let closing_and_reset = lb_common::FLOW_FLAG_CLOSING | lb_common::FLOW_FLAG_RESET;
    assert_eq!(reset.map(|entry| entry.flags), Some(closing_and_reset), "RST: {reset:?}");
}

fn a_backend_that_goes_down_loses_its_established_flows_to_healthy_ones() {
    let mut fixture = Fixture::new();
    let vip4 = vip(TCP4, Protocol::Tcp);
    let flows = tcp_flows(34_000, 300);
    let before: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    let dead = ip(V4_BACKENDS[2]);
    let mut health = HealthMap::new();
    health.insert((vip4, dead), BackendHealth { up: false, ever_up: true });
    fixture.apply(&health);
    let after: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    for ((flow, old), new) in flows.iter().zip(&before).zip(&after) {
        if *old == dead {
            assert_ne!(*new, dead, "{flow:?} still goes to the dead backend");
            assert_eq!(*new, fixture.expected_backend(*flow), "rescued to the Maglev choice");
        } else {
            assert_eq!(new, old, "a healthy backend's flow moved");
        }
    }
    let rescued = before.iter().filter(|b| **b == dead).count() as u64;
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Rescued), rescued);
}

/// A confirmed TCP flow of a failed backend follows its rescue to the
/// Maglev choice, but no longer counts as active: the new backend has no
/// connection for it and resets it, out of the balancer's sight (DSR). If it
/// counted, least-connections would see phantom load on the backends that
/// rescued a failed one's flows, for the TCP idle timeout.
fn a_rescued_tcp_flow_follows_its_new_backend_but_no_longer_counts_as_active() {
    let mut fixture = Fixture::new();
    let vip4 = vip(TCP4, Protocol::Tcp);
    let flows = tcp_flows(36_000, 300);
    let before: Vec<IpAddr> = flows
        .iter()
        .map(|f| {
            fixture.send(*f, Segment::Syn);
            fixture.send(*f, Segment::Ack)
        })
        .collect();
    let dead = ip(V4_BACKENDS[2]);
    let on_dead = before.iter().filter(|b| **b == dead).count() as u64;
    assert!(on_dead > 50, "{on_dead}");
    let total =
        |fixture: &Fixture| fixture.reconciler.datapath().active_flows().values().sum::<u64>();
    assert_eq!(total(&fixture), flows.len() as u64);

    let mut health = HealthMap::new();
    health.insert((vip4, dead), BackendHealth { up: false, ever_up: true });
    fixture.apply(&health);
    let rescued: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    let again: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    assert_eq!(again, rescued, "a rescued flow follows its new entry");
    assert!(!rescued.contains(&dead));
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Rescued), on_dead);
    assert_eq!(
        total(&fixture),
        flows.len() as u64 - on_dead,
        "only the flows of the backends that stayed up count"
    );
}

fn idle_udp_flows_expire() {
    let mut fixture = Fixture::new();
    let udp = flow("198.18.0.1", 35_000, UDP4, L4::Udp);
    let first = fixture.send(udp, Segment::Syn);
    // Move this flow's Maglev choice: take its backend out of the table.
    let vip4 = vip(UDP4, Protocol::Udp);
    fixture.desired.set_draining(&vip4, first, true).unwrap();
    fixture.apply(&HealthMap::new());
    assert_eq!(fixture.send(udp, Segment::Syn), first, "a live UDP flow keeps its backend");
    std::thread::sleep(std::time::Duration::from_millis(UDP_IDLE_MS * 2));
    let expired_before = event(&fixture.flow_events(), FlowEvent::Expired);
    let after = fixture.send(udp, Segment::Syn);
    assert_ne!(after, first, "an idle UDP flow did not expire");
    assert_eq!(after, fixture.expected_backend(udp));
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Expired), expired_before + 1);
}

fn client_ip_affinity_keeps_a_clients_connections_together() {
    let mut fixture = Fixture::new();
    let sticky = vip("198.18.0.30:443", Protocol::Tcp);
    fixture.desired.add_vip(sticky, CheckSpec::default(), Affinity::ClientIp, LIMITS).unwrap();
    for backend in V4_BACKENDS {
        fixture.desired.add_backend(&sticky, BackendSpec::new(ip(backend), 1), LIMITS).unwrap();
    }
    fixture.apply(&HealthMap::new());
    let mut clients_seen = std::collections::BTreeSet::new();
    for client in 1..=30u8 {
        let client = format!("198.18.2.{client}");
        let landed: std::collections::BTreeSet<IpAddr> = (0..20)
            .map(|port| {
                fixture.send(flow(&client, 40_000 + port, "198.18.0.30:443", L4::Tcp), Segment::Syn)
            })
            .collect();
        assert_eq!(landed.len(), 1, "client {client}'s connections spread over {landed:?}");
        let looked_up =
            fixture.reconciler.lookup(&sticky, format!("{client}:1").parse().unwrap()).unwrap();
        assert_eq!(looked_up.backend, landed.first().copied());
        clients_seen.extend(landed);
    }
    assert_eq!(clients_seen.len(), 3, "30 clients should still spread over the backends");
}

fn to_key(flow: Flow) -> lb_common::FlowKey {
    let protocol = match flow.l4 {
        L4::Tcp => lb_common::PROTO_TCP,
        L4::Udp => lb_common::PROTO_UDP,
    };
    lb_common::FlowKey::new(flow.client, flow.client_port, flow.vip, flow.vip_port, protocol)
}

fn the_default_flow_table_holds_a_million_flows_and_reports_its_memory() {
    let config = DatapathConfig::default();
    assert!(config.flow_table_size >= 1_000_000);
    let datapath = Datapath::load(config).expect("load with default sizes");
    let bytes = datapath.flow_table_memory().expect("the kernel reports memlock in fdinfo");
    let per_flow = bytes as f64 / f64::from(config.flow_table_size);
    println!(
        "FIGURE flow table: {} flows, {} MiB, {per_flow:.0} bytes per flow",
        config.flow_table_size,
        bytes >> 20
    );
    // Key (40) and value (24) plus the kernel's element header.
    assert!((64.0..512.0).contains(&per_flow), "{per_flow} bytes per flow");
}

fn flows_of_a_removed_backend_are_rescued_not_sent_to_an_empty_slot() {
    let mut fixture = Fixture::new();
    let flows = tcp_flows(36_000, 300);
    let before: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    let removed = ip(V4_BACKENDS[0]);
    fixture.desired.remove_backend(&vip(TCP4, Protocol::Tcp), removed).unwrap();
    fixture.apply(&HealthMap::new());
    assert_only_the_removed_backends_flows_move(&fixture, &flows, &before, removed);
}

/// Sends an ACK on every flow: a flow that was on `removed` takes the
/// Maglev choice (which is a newcomer in the slot only where the table says
/// so); every other stays where it was (`before`).
fn assert_only_the_removed_backends_flows_move(
    fixture: &Fixture,
    flows: &[Flow],
    before: &[IpAddr],
    removed: IpAddr,
) {
    for (flow, old) in flows.iter().zip(before) {
        let now = fixture.send(*flow, Segment::Ack);
        if *old == removed {
            assert_eq!(now, fixture.expected_backend(*flow), "{flow:?} not rescued");
        } else {
            assert_eq!(now, *old, "{flow:?} of a remaining backend moved");
        }
    }
}

fn established_flows_of_a_removed_vip_are_not_forwarded() {
    let mut fixture = Fixture::new();
    let vip4 = vip(TCP4, Protocol::Tcp);
    // Half of them confirmed (found before any VIP lookup), half pending.
    let flows = tcp_flows(37_000, 50);
    for (index, flow) in flows.iter().enumerate() {
        fixture.send(*flow, Segment::Syn);
        if index % 2 == 0 {
            fixture.send(*flow, Segment::Ack);
        }
    }
    let confirmed = fixture.reconciler.datapath().flow_event_counters().unwrap();
    assert_eq!(event(&confirmed, FlowEvent::Confirmed), 25);
    let spec = fixture.desired.vips[&vip4].clone();
    fixture.desired.remove_vip(&vip4).unwrap();
    fixture.apply(&HealthMap::new());
    for flow in &flows {
        let input = frame(*flow, Shape { segment: Segment::Ack, ..Shape::default() }, b"data");
        let (action, output) = fixture.reconciler.datapath().test_run(&input).unwrap();
        assert_eq!((action, output), (XDP_PASS, input), "{flow:?} forwarded after its VIP went");
    }
    // The same VIP again: its flows go to its backends as its table says
    // (old entries point at released slots, so they are rescued).
    fixture.desired.vips.insert(vip4, spec);
    fixture.apply(&HealthMap::new());
    for flow in &flows {
        assert_eq!(fixture.send(*flow, Segment::Ack), fixture.expected_backend(*flow));
    }
}

// --- flow sync ----------------------------------------------------------------

/// The records in the datapath's flow-change ring: (flow key, backend slot, kind).
fn sync_events(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<(FlowKey, u32, u32)> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<lb_common::FlowSyncEvent>());
        let word = |at: usize| u32::from_ne_bytes(item[at..at + 4].try_into().unwrap());
        let mut key = FlowKey::default();
        key.client_address.copy_from_slice(&item[0..16]);
        key.vip_address.copy_from_slice(&item[16..32]);
        key.client_port.copy_from_slice(&item[32..34]);
        key.vip_port.copy_from_slice(&item[34..36]);
        key.protocol = word(36);
        events.push((key, word(44), word(48)));
    }
    events
}

/// Sends the life of two connections: one opened, used and closed by FIN;
/// one picked up mid-stream (confirmed by a segment a second later), reset,
/// and shown alive by a later segment.
fn two_connections(fixture: &Fixture) -> [Flow; 2] {
    let flows = tcp_flows(38_000, 2);
    fixture.send(flows[0], Segment::Syn);
    for _ in 0..10 {
        fixture.send(flows[0], Segment::Ack);
    }
    fixture.send(flows[0], Segment::Fin);
    fixture.send(flows[0], Segment::Fin);
    fixture.send(flows[1], Segment::Ack);
    fixture.send(flows[1], Segment::Ack);
    std::thread::sleep(std::time::Duration::from_nanos(lb_common::FLOW_CONFIRM_NS + 50_000_000));
    fixture.send(flows[1], Segment::Ack);
    fixture.send(flows[1], Segment::Rst);
    fixture.send(flows[1], Segment::Ack);
    [flows[0], flows[1]]
}

fn the_datapath_reports_each_created_and_closed_flow_once_when_sync_is_on() {
    let mut fixture = Fixture::with(DatapathConfig { sync_flows: true, ..CONFIG });
    let sync = fixture.reconciler.datapath_mut().take_sync().unwrap().expect("the ring");
    let flows = two_connections(&fixture);
    let slot_of = |flow: Flow| {
        let backend = fixture.expected_backend(flow);
        let backends = fixture.reconciler.backends(&vip(TCP4, Protocol::Tcp));
        backends.iter().find(|b| b.address == backend).unwrap().slot
    };
    let (open, closing, reset) =
        (FlowSyncKind::Open as u32, FlowSyncKind::Closing as u32, FlowSyncKind::Reset as u32);
    let (first, second) = (to_key(flows[0]), to_key(flows[1]));
    assert_eq!(
        sync_events(&mut sync.open_ring().unwrap()),
        [
            (first, slot_of(flows[0]), open),
            (first, slot_of(flows[0]), closing),
            (second, slot_of(flows[1]), open),
            (second, slot_of(flows[1]), reset),
            (second, slot_of(flows[1]), open),
        ],
        "the handshake's ACK and a mid-stream pick-up's confirmation open, the first FIN closes, a RST resets and a later segment reopens; SYNs, unconfirmed segments, further established segments and a second FIN report nothing"
    );
    assert_eq!(event(&fixture.flow_events(), FlowEvent::SyncLost), 0);

    // A reader opened again, as by a sync task started again after it died,
    // resumes where the last one stopped: old events are not read twice,
    // new ones are read.
    let mut reopened = sync.open_ring().unwrap();
    assert_eq!(sync_events(&mut reopened), [], "a new reader read old events again");
    let third = tcp_flows(38_100, 1)[0];
    fixture.send(third, Segment::Syn);
    fixture.send(third, Segment::Ack);
    assert_eq!(sync_events(&mut reopened), [(to_key(third), slot_of(third), open)]);

    // Without sync the same traffic reports nothing.
    let mut fixture = Fixture::new();
    let sync = fixture.reconciler.datapath_mut().take_sync().unwrap().expect("the ring");
    two_connections(&fixture);
    assert_eq!(sync_events(&mut sync.open_ring().unwrap()), []);
}

// --- hostile traffic ------------------------------------------------------------

/// Runs `input` and returns (action, output, how often `reason` was counted).
fn run_counted(fixture: &Fixture, input: &[u8], reason: Reason) -> (u32, Vec<u8>, u64) {
    let before = fixture.reason_count(reason);
    let (action, output) = fixture.reconciler.datapath().test_run(input).unwrap();
    (action, output, fixture.reason_count(reason) - before)
}

/// Confirmed flows (a SYN, then the handshake's ACK): where each landed.
fn establish(fixture: &Fixture, flows: &[Flow]) -> Vec<IpAddr> {
    flows
        .iter()
        .map(|f| {
            fixture.send(*f, Segment::Syn);
            fixture.send(*f, Segment::Ack)
        })
        .collect()
}

fn icmp_errors_reach_the_backend_of_the_flow_they_quote() {
    let mut fixture = Fixture::new();
    let router4 = ip("198.18.0.254");
    let router6 = ip("fd00:198:18::fe");
    let body = [0u8; 1200];
    let errors4 = [Icmp::FRAGMENTATION_NEEDED, Icmp::PORT_UNREACHABLE, Icmp::TTL_EXCEEDED];
    let errors6 = [Icmp::V6_PACKET_TOO_BIG, Icmp::V6_UNREACHABLE, Icmp::V6_HOP_LIMIT_EXCEEDED];
    let mut failures = Vec::new();
    for (endpoint, l4, client, router, errors, first_port) in [
        (TCP4, L4::Tcp, "198.18.0.1", router4, errors4, 41_000),
        (UDP4, L4::Udp, "198.18.0.1", router4, errors4, 41_100),
        (TCP6, L4::Tcp, "fd00:198:18::1", router6, errors6, 41_200),
        (UDP6, L4::Udp, "fd00:198:18::1", router6, errors6, 41_300),
    ] {
        let protocol = if matches!(l4, L4::Tcp) { Protocol::Tcp } else { Protocol::Udp };
        let this_vip = vip(endpoint, protocol);
        // An established flow, then its backend drained: the Maglev choice
        // moves away, so only following the flow table finds the backend.
        let flow0 = flow(client, first_port, endpoint, l4);
        let backend = establish(&fixture, &[flow0])[0];
        fixture.desired.set_draining(&this_vip, backend, true).unwrap();
        fixture.apply(&HealthMap::new());
        assert_ne!(fixture.expected_backend(flow0), backend, "the Maglev choice moved away");
        let backends = fixture.reconciler.backends(&this_vip);
        let slot = backends.iter().find(|b| b.address == backend).unwrap().slot;
        let icmp_errors = |fixture: &Fixture| {
            fixture.reconciler.datapath().backend_counters(slot).unwrap().icmp_errors
        };
        for icmp in errors {
            let errors_before = icmp_errors(&fixture);
            let input = icmp_frame(router, flow0.vip, icmp, &reply_packet(flow0, &body));
            let (action, output, counted) = run_counted(&fixture, &input, Reason::ForwardedIcmp);
            if (action, counted, icmp_errors(&fixture) - errors_before) != (XDP_TX, 1, 1)
                || output != dsr_rewritten(&input, backend_mac(backend))
            {
                failures.push(format!(
                    "{endpoint} {icmp:?}: action {action}, counted {counted}, to {:02x?}",
                    &output[..6]
                ));
            }
        }
        // A flow without an entry: the error goes where its packets would.
        let fresh = flow(client, first_port + 99, endpoint, l4);
        let input = icmp_frame(router, fresh.vip, errors[0], &reply_packet(fresh, &body));
        let (action, output, _) = run_counted(&fixture, &input, Reason::ForwardedIcmp);
        let maglev = backend_mac(fixture.expected_backend(fresh));
        if action != XDP_TX || output != dsr_rewritten(&input, maglev) {
            failures.push(format!(
                "{endpoint}: an error about a new flow went to {:02x?}",
                &output[..6]
            ));
        }
        fixture.desired.set_draining(&this_vip, backend, false).unwrap();
        fixture.apply(&HealthMap::new());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // An IPv4 error may quote only 8 bytes of the TCP header: the ports suffice.
    let tcp4 = flow("198.18.0.1", 41_500, TCP4, L4::Tcp);
    let short_quote = reply_packet(tcp4, b"");
    let input = icmp_frame(router4, tcp4.vip, Icmp::FRAGMENTATION_NEEDED, &short_quote[..28]);
    let (action, output, counted) = run_counted(&fixture, &input, Reason::ForwardedIcmp);
    assert_eq!((action, counted), (XDP_TX, 1), "an 8-byte quote");
    assert_eq!(output, dsr_rewritten(&input, backend_mac(fixture.expected_backend(tcp4))));

    let tcp6 = flow("fd00:198:18::1", 41_501, TCP6, L4::Tcp);
    let other_port = flow("198.18.0.1", 41_502, "198.18.0.10:81", L4::Tcp);
    let no_backends = flow("198.18.0.1", 41_503, EMPTY4, L4::Tcp);
    let mut not_from_the_vip = reply_packet(tcp4, &body);
    not_from_the_vip[12..16].copy_from_slice(&[198, 18, 0, 99]);
    let frag_needed =
        |to: &str, quote: &[u8]| icmp_frame(router4, ip(to), Icmp::FRAGMENTATION_NEEDED, quote);
    let cases = [
        (
            "echo request to a VIP address",
            icmp_frame(router4, tcp4.vip, Icmp::ECHO_REQUEST, b"ping"),
            XDP_PASS,
            Reason::PassIcmp,
        ),
        (
            "ICMPv6 echo request to a VIP address",
            icmp_frame(router6, tcp6.vip, Icmp::V6_ECHO_REQUEST, b"ping"),
            XDP_PASS,
            Reason::PassIcmp,
        ),
        (
            "an error to an address that is not a VIP's",
            frag_needed("198.18.0.99", &reply_packet(tcp4, &body)),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        (
            "an error quoting the IP header alone (no ports)",
            frag_needed("198.18.0.10", &reply_packet(tcp4, b"")[..20]),
            XDP_DROP,
            Reason::DropIcmpMalformed,
        ),
        (
            "an ICMPv6 error quoting 40 bytes (no ports)",
            icmp_frame(router6, tcp6.vip, Icmp::V6_PACKET_TOO_BIG, &reply_packet(tcp6, b"")[..40]),
            XDP_DROP,
            Reason::DropIcmpMalformed,
        ),
        (
            "an error with a truncated ICMP header",
            truncate_ip(&frag_needed("198.18.0.10", b""), L3_OFFSET + 20 + 4),
            XDP_DROP,
            Reason::DropIcmpMalformed,
        ),
        (
            "an error quoting a port that is no VIP",
            frag_needed("198.18.0.10", &reply_packet(other_port, &body)),
            XDP_DROP,
            Reason::DropIcmpUnmatched,
        ),
        (
            "an error quoting a packet from another address",
            frag_needed("198.18.0.10", &not_from_the_vip),
            XDP_DROP,
            Reason::DropIcmpUnmatched,
        ),
        (
            "an error about a VIP without backends",
            frag_needed("198.18.0.20", &reply_packet(no_backends, &body)),
            XDP_DROP,
            Reason::DropIcmpUnmatched,
        ),
    ];
    for (description, input, want_action, reason) in cases {
        let (action, output, counted) = run_counted(&fixture, &input, reason);
        assert_eq!((action, counted), (want_action, 1), "{description}: {reason:?}");
        assert_eq!(output, input, "{description}: changed");
    }
}

fn a_forged_rst_does_not_unpin_a_flow() {
    let mut fixture = Fixture::new();
    let flows = tcp_flows(42_000, 300);
    let before = establish(&fixture, &flows);
    add_fourth_backend(&mut fixture);
    let moved = flows.iter().zip(&before).filter(|(f, b)| fixture.expected_backend(**f) != **b);
    assert!(moved.count() > 30, "the table change moved too few flows to show anything");
    // Out-of-window RSTs (the backend ignores them), then the connections go on.
    let reset: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Rst)).collect();
    assert_eq!(reset, before, "the RSTs themselves reach the flows' backends");
    let reopened_before = event(&fixture.flow_events(), FlowEvent::Reopened);
    let after: Vec<IpAddr> = flows.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    assert_eq!(after, before, "a RST unpinned established flows");
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Reopened) - reopened_before, 300);
    let active: u64 = fixture.reconciler.datapath().active_flows().values().sum();
    assert_eq!(active, 300, "reopened flows count as active again");
}

fn a_reused_backend_slot_does_not_inherit_the_old_backends_flows() {
    // Every slot in use (12 backends over the fixture's VIPs), so the slot
    // a removed backend frees is the one the next backend gets.
    let mut fixture = Fixture::with(DatapathConfig { max_backends: 12, ..CONFIG });
    let vip4 = vip(TCP4, Protocol::Tcp);
    let flows = tcp_flows(43_000, 300);
    let before = establish(&fixture, &flows);
    let slot_of = |fixture: &Fixture, address| {
        fixture.reconciler.backends(&vip4).iter().find(|b| b.address == address).unwrap().slot
    };
    let removed = ip(V4_BACKENDS[0]);
    let slot = slot_of(&fixture, removed);
    fixture.desired.remove_backend(&vip4, removed).unwrap();
    fixture.apply(&HealthMap::new());
    let newcomer = ip("198.18.1.4");
    fixture.desired.add_backend(&vip4, BackendSpec::new(newcomer, 1), LIMITS).unwrap();
    fixture.reconciler.set_mac(newcomer, backend_mac(newcomer));
    fixture.apply(&HealthMap::new());
    assert_eq!(slot_of(&fixture, newcomer), slot, "the newcomer took the removed backend's slot");

    // The old backend's entries still name the slot: none counts for the newcomer.
    let active = fixture.reconciler.datapath().active_flows();
    assert_eq!(active.get(&slot).copied().unwrap_or(0), 0, "ACTIVE FLOWS of a fresh backend");
    let orphans = before.iter().filter(|b| **b == removed).count() as u64;
    assert!(orphans > 50);
    let rescued_before = event(&fixture.flow_events(), FlowEvent::Rescued);
    assert_only_the_removed_backends_flows_move(&fixture, &flows, &before, removed);
    assert_eq!(event(&fixture.flow_events(), FlowEvent::Rescued) - rescued_before, orphans);
}

/// `count` spoofed frames of one kind to `endpoint`, from distinct tuples
/// (client addresses 198.18.`network`.1 onwards, 60,000 ports each), each
/// sent twice in a row: the kernel's LRU keeps what was looked up again
/// longest.
fn flood(
    fixture: &Fixture,
    endpoint: &str,
    (l4, segment): (L4, Segment),
    network: u8,
    count: u32,
) -> u32 {
    for index in 0..count {
        let client = format!("198.18.{network}.{}", index / 60_000 + 1);
        let spoofed = flow(&client, (1024 + index % 60_000) as u16, endpoint, l4);
        let input = frame(spoofed, Shape { segment, ..Shape::default() }, b"");
        for _ in 0..2 {
            fixture.reconciler.datapath().test_run(&input).unwrap();
        }
    }
    count
}

fn spoofed_floods_never_evict_confirmed_flows() {
    const TABLE: u32 = 4_096;
    let mut fixture = Fixture::with(DatapathConfig { flow_table_size: TABLE, ..CONFIG });
    // Established flows, and half-open ones (a SYN, no ACK yet).
    let established = tcp_flows(44_000, 1_000);
    let pinned = establish(&fixture, &established);
    let half_open = tcp_flows(46_000, 1_000);
    let half_pinned: Vec<IpAddr> =
        half_open.iter().map(|f| fixture.send(*f, Segment::Syn)).collect();
    add_fourth_backend(&mut fixture);

    let events_before = fixture.flow_events();
    // Distinct tuples per kind: a SYN and then an ACK of the same spoofed
    // tuple would be a handshake, which confirms (see the README).
    let tuples = flood(&fixture, TCP4, (L4::Tcp, Segment::Syn), 100, 3 * TABLE)
        + flood(&fixture, TCP4, (L4::Tcp, Segment::Ack), 101, 3 * TABLE)
        + flood(&fixture, UDP4, (L4::Udp, Segment::Syn), 102, 3 * TABLE);
    let events = fixture.flow_events();
    let delta = |which| event(&events, which) - event(&events_before, which);
    println!(
        "FIGURE flood of {tuples} tuples (each twice), flow table {TABLE}: created {}, miss_fallback {}, new_hit {}, confirmed {}",
        delta(FlowEvent::Created),
        delta(FlowEvent::MissFallback),
        delta(FlowEvent::NewHit),
        delta(FlowEvent::Confirmed),
    );
    assert_eq!(delta(FlowEvent::Confirmed), 0, "a spoofed tuple was confirmed");

    let after: Vec<IpAddr> = established.iter().map(|f| fixture.send(*f, Segment::Ack)).collect();
    assert_eq!(after, pinned, "the flood unpinned established flows");
    // What the flood does to pins in a table it reaches: half-open flows
    // lost theirs, and the ACKs of those whose choice moved go elsewhere.
    let moved = half_open
        .iter()
        .zip(&half_pinned)
        .filter(|(f, old)| fixture.send(**f, Segment::Ack) != **old)
        .count();
    println!("FIGURE half-open flows re-chosen after the flood: {moved} of 1000");
    assert!(moved > 100, "the flood did not reach the unconfirmed table ({moved} moved)");
}

tests::root_tests!(
    every_case_gives_the_expected_action_output_and_counter,
    flows_spread_over_all_backends_exactly_where_lookup_says,
    counters_count_packets_and_bytes_per_vip_and_backend,
    established_flows_keep_their_backend_when_the_table_changes,
    a_fifth_half_open_flow_of_a_bucket_takes_the_oldest_ones_pin,
    a_segment_without_an_entry_falls_back_to_maglev_and_is_recorded,
    drained_backends_get_no_new_flows_but_keep_established_ones,
    a_backend_that_goes_down_loses_its_established_flows_to_healthy_ones,
    idle_udp_flows_expire,
    client_ip_affinity_keeps_a_clients_connections_together,
    the_default_flow_table_holds_a_million_flows_and_reports_its_memory,
    flows_of_a_removed_backend_are_rescued_not_sent_to_an_empty_slot,
    a_rescued_tcp_flow_follows_its_new_backend_but_no_longer_counts_as_active,
    established_flows_of_a_removed_vip_are_not_forwarded,
    the_datapath_reports_each_created_and_closed_flow_once_when_sync_is_on,
    icmp_errors_reach_the_backend_of_the_flow_they_quote,
    a_forged_rst_does_not_unpin_a_flow,
    a_reused_backend_slot_does_not_inherit_the_old_backends_flows,
    spoofed_floods_never_evict_confirmed_flows,
    a_detached_datapath_keeps_its_flows_and_attaches_again,
);
