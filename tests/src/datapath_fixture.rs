//! The fixture of the datapath tests (tests/tests/datapath.rs,
//! flow_table.rs, flow_integrity.rs): the real XDP object with maps filled
//! by the real reconcile step, its VIPs and backends, and the helpers that
//! send a flow's packets through BPF_PROG_TEST_RUN and read the counters.

use std::net::{IpAddr, SocketAddr};

use crate::fixture::{addresses, backend_mac, balancer};
use crate::packets::{BALANCER_MAC, Flow, L4, Segment, Shape, frame};
use lb_common::{FlowEvent, Reason};
use lb_userspace::model::{
    BackendSpec, DatapathConfig, DesiredState, HealthMap, Limits, Protocol, TunnelConfig, Vip,
};
use lb_userspace::reconcile::Reconciler;

use crate::XDP_TX;

/// A UDP flow idle for this long is forgotten (short, so the test can wait it out).
pub const UDP_IDLE_MS: u64 = 200;

pub const CONFIG: DatapathConfig = DatapathConfig {
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

pub const LIMITS: Limits = CONFIG.limits();

pub fn ip(text: &str) -> IpAddr {
    text.parse().expect("test address")
}

pub fn vip(text: &str, protocol: Protocol) -> Vip {
    Vip::new(text.parse::<SocketAddr>().expect("test endpoint"), protocol)
}

pub struct Fixture {
    pub reconciler: Reconciler,
    pub desired: DesiredState,
}

pub const TCP4: &str = "198.18.0.10:80";
pub const UDP4: &str = "198.18.0.10:53";
pub const TCP6: &str = "[fd00:198:18::10]:80";
pub const UDP6: &str = "[fd00:198:18::10]:53";
pub const EMPTY4: &str = "198.18.0.20:80";
pub const V4_BACKENDS: [&str; 3] = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
pub const V6_BACKENDS: [&str; 3] = ["fd00:198:18:1::1", "fd00:198:18:1::2", "fd00:198:18:1::3"];

impl Fixture {
    /// The fixture on [`CONFIG`]: loading panics without root or BPF, so
    /// no `Default`.
    #[expect(clippy::new_without_default, reason = "loading can panic")]
    pub fn new() -> Self {
        Self::with(CONFIG)
    }

    pub fn with(config: DatapathConfig) -> Self {
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

    pub fn reason_count(&self, reason: Reason) -> u64 {
        let counters = self.reconciler.datapath().reason_counters().unwrap();
        counters.iter().find(|(r, _)| *r == reason).unwrap().1
    }

    /// Where the control plane says this flow goes.
    pub fn expected_backend(&self, flow: Flow) -> IpAddr {
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

pub fn flow(client: &str, client_port: u16, vip_endpoint: &str, l4: L4) -> Flow {
    let endpoint: SocketAddr = vip_endpoint.parse().unwrap();
    Flow { client: ip(client), client_port, vip: endpoint.ip(), vip_port: endpoint.port(), l4 }
}

impl Fixture {
    /// Runs one frame of `flow`; returns the backend it was sent to (by MAC).
    pub fn send(&self, flow: Flow, segment: Segment) -> IpAddr {
        let input = frame(flow, Shape { segment, ..Shape::default() }, b"data");
        let (action, output) = self.reconciler.datapath().test_run(&input).unwrap();
        assert_eq!(action, XDP_TX, "{flow:?} {segment:?} was not forwarded");
        let mac: [u8; 6] = output[0..6].try_into().unwrap();
        let every = V4_BACKENDS.iter().chain(&V6_BACKENDS).chain(&["198.18.1.4"]);
        every.map(|b| ip(b)).find(|b| backend_mac(*b) == mac).expect("a known backend MAC")
    }

    pub fn apply(&mut self, health: &HealthMap) {
        self.reconciler.apply(&self.desired, health).unwrap();
    }

    pub fn flow_events(&self) -> Vec<(FlowEvent, u64)> {
        self.reconciler.datapath().flow_event_counters().unwrap()
    }
}

pub fn event(events: &[(FlowEvent, u64)], which: FlowEvent) -> u64 {
    events.iter().find(|(e, _)| *e == which).unwrap().1
}

pub fn tcp_flows(first_port: u16, count: u16) -> Vec<Flow> {
    (0..count).map(|i| flow("198.18.0.1", first_port + i, TCP4, L4::Tcp)).collect()
}

/// Adds 198.18.1.4 to the IPv4 TCP VIP, which moves about a quarter of its table.
pub fn add_fourth_backend(fixture: &mut Fixture) {
    let address = ip("198.18.1.4");
    fixture
        .desired
        .add_backend(&vip(TCP4, Protocol::Tcp), BackendSpec::new(address, 1), LIMITS)
        .unwrap();
    fixture.reconciler.set_mac(address, backend_mac(address));
    fixture.apply(&HealthMap::new());
}

/// `count` TCP flows (client 198.18.0.1, ports from `first_port`) whose
/// unconfirmed pins share one LB_NEW_FLOWS bucket under `CONFIG`, starting
/// with one the fourth backend moves (a scratch balancer tells which).
pub fn flows_of_one_bucket(first_port: u16, count: usize) -> Vec<Flow> {
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

pub fn to_key(flow: Flow) -> lb_common::FlowKey {
    let protocol = match flow.l4 {
        L4::Tcp => lb_common::PROTO_TCP,
        L4::Udp => lb_common::PROTO_UDP,
    };
    lb_common::FlowKey::new(flow.client, flow.client_port, flow.vip, flow.vip_port, protocol)
}

/// Sends an ACK on every flow: a flow that was on `removed` takes the
/// Maglev choice (which is a newcomer in the slot only where the table says
/// so); every other stays where it was (`before`).
pub fn assert_only_the_removed_backends_flows_move(
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

/// Runs `input` and returns (action, output, how often `reason` was counted).
pub fn run_counted(fixture: &Fixture, input: &[u8], reason: Reason) -> (u32, Vec<u8>, u64) {
    let before = fixture.reason_count(reason);
    let (action, output) = fixture.reconciler.datapath().test_run(input).unwrap();
    (action, output, fixture.reason_count(reason) - before)
}

/// Confirmed flows (a SYN, then the handshake's ACK): where each landed.
pub fn establish(fixture: &Fixture, flows: &[Flow]) -> Vec<IpAddr> {
    flows
        .iter()
        .map(|f| {
            fixture.send(*f, Segment::Syn);
            fixture.send(*f, Segment::Ack)
        })
        .collect()
}
