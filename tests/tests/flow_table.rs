//! The flow tables through BPF_PROG_TEST_RUN on the real XDP object (fixture:
//! tests/src/datapath_fixture.rs): established flows keep their backend
//! across table changes, a detach and a drain; pins of half-open flows;
//! rescue from down and removed backends; idle UDP expiry; client-IP
//! affinity; the default table's size and memory.

use std::net::{IpAddr, SocketAddr};

use lb_common::FlowEvent;
use lb_userspace::datapath::{AttachMode, Datapath, Maps as _};
use lb_userspace::model::{
    Affinity, BackendHealth, BackendSpec, CheckSpec, DatapathConfig, HealthMap, Protocol,
};
use tests::packets::{Flow, L4, Segment, Shape, frame};

use tests::XDP_PASS;

use tests::datapath_fixture::*;

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

tests::root_tests!(
    established_flows_keep_their_backend_when_the_table_changes,
    a_detached_datapath_keeps_its_flows_and_attaches_again,
    a_fifth_half_open_flow_of_a_bucket_takes_the_oldest_ones_pin,
    a_segment_without_an_entry_falls_back_to_maglev_and_is_recorded,
    drained_backends_get_no_new_flows_but_keep_established_ones,
    a_backend_that_goes_down_loses_its_established_flows_to_healthy_ones,
    a_rescued_tcp_flow_follows_its_new_backend_but_no_longer_counts_as_active,
    idle_udp_flows_expire,
    client_ip_affinity_keeps_a_clients_connections_together,
    the_default_flow_table_holds_a_million_flows_and_reports_its_memory,
    flows_of_a_removed_backend_are_rescued_not_sent_to_an_empty_slot,
    established_flows_of_a_removed_vip_are_not_forwarded,
);
