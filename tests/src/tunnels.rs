//! The tunnelled-forwarding fixture shared by the tunnel and decap tests:
//! a balancer with `ipip`, `gue` and `dsr` VIPs whose backends sit on other
//! subnets, the flows they carry, and which backend a frame went to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{FlowKey, PROTO_TCP, PROTO_UDP};
use lb_userspace::model::{
    DatapathConfig, DesiredState, Forwarding, ForwardingMode, HealthMap, Protocol, TunnelConfig,
    Vip,
};
use lb_userspace::reconcile::Reconciler;

use crate::fixture::{addresses, backend_mac, balancer};
use crate::packets::{BALANCER_MAC, Flow, L4};

pub const SOURCE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x198, 0x18, 0, 0, 0, 0, 2);
pub const MTU: u32 = 1500;
pub const GUE_PORT: u16 = 7777;

pub fn config(tunnel: TunnelConfig) -> DatapathConfig {
    DatapathConfig {
        hash_seed: 0x5eed,
        table_size: 251,
        max_vips: 8,
        max_backends: 32,
        flow_table_size: 4_096,
        own_mac: BALANCER_MAC,
        tunnel,
        ..DatapathConfig::default()
    }
}

pub const TUNNEL: TunnelConfig = TunnelConfig {
    source_v4: Some(SOURCE_V4),
    source_v6: Some(SOURCE_V6),
    mtu: MTU,
    ..TunnelConfig::NONE
};

/// The VIPs: (endpoint, protocol, mode); backends on other subnets, with
/// last bytes that differ (their MACs end in them).
pub const VIPS: [(&str, Protocol, ForwardingMode); 7] = [
    ("198.18.0.10:80", Protocol::Tcp, ForwardingMode::Ipip),
    ("198.18.0.10:53", Protocol::Udp, ForwardingMode::Gue),
    ("198.18.0.11:80", Protocol::Tcp, ForwardingMode::Gue),
    ("[fd00:198:18::10]:80", Protocol::Tcp, ForwardingMode::Ipip),
    ("[fd00:198:18::10]:53", Protocol::Udp, ForwardingMode::Gue),
    ("[fd00:198:18::11]:80", Protocol::Tcp, ForwardingMode::Gue),
    ("198.18.0.12:80", Protocol::Tcp, ForwardingMode::Dsr),
];
pub const V4_BACKENDS: [&str; 2] = ["198.18.2.1", "198.18.3.2"];
pub const V6_BACKENDS: [&str; 2] = ["fd00:198:18:2::1", "fd00:198:18:3::2"];

pub fn fixture(tunnel: TunnelConfig) -> Reconciler {
    fixture_and_desired(tunnel).0
}

/// [`fixture`], and the desired state it applied (for tests that change
/// next hops and apply again).
pub fn fixture_and_desired(tunnel: TunnelConfig) -> (Reconciler, DesiredState) {
    let (v4, v6) = (addresses(&V4_BACKENDS), addresses(&V6_BACKENDS));
    let decls: Vec<_> = VIPS
        .iter()
        .map(|(endpoint, protocol, _)| {
            let backends = if endpoint.starts_with('[') { &v6[..] } else { &v4[..] };
            (*endpoint, *protocol, backends)
        })
        .collect();
    let (mut reconciler, mut desired) =
        balancer(config(tunnel), &decls, backend_mac).expect("load the XDP object");
    for (endpoint, protocol, mode) in VIPS {
        let vip = Vip::new(endpoint.parse().unwrap(), protocol);
        let forwarding = Forwarding::new(mode, Some(GUE_PORT));
        desired.configure(&vip, None, None, None, Some(forwarding)).unwrap();
    }
    reconciler.apply(&desired, &HealthMap::new()).unwrap();
    (reconciler, desired)
}

pub fn mode_of(flow: &Flow) -> ForwardingMode {
    let protocol = if matches!(flow.l4, L4::Tcp) { Protocol::Tcp } else { Protocol::Udp };
    VIPS.iter()
        .find(|(endpoint, p, _)| {
            let endpoint: std::net::SocketAddr = endpoint.parse().unwrap();
            *p == protocol && endpoint.ip() == flow.vip && endpoint.port() == flow.vip_port
        })
        .map(|(_, _, mode)| *mode)
        .expect("a VIP of the test")
}

pub fn flow(client: &str, port: u16, vip: &str, vip_port: u16, l4: L4) -> Flow {
    Flow {
        client: client.parse().unwrap(),
        client_port: port,
        vip: vip.parse().unwrap(),
        vip_port,
        l4,
    }
}

/// Every kind of flow the tunnels carry.
pub fn flows() -> Vec<Flow> {
    let mut all = Vec::new();
    for port in [40_000, 40_001, 51_234] {
        all.push(flow("198.18.0.100", port, "198.18.0.10", 80, L4::Tcp));
        all.push(flow("198.18.0.100", port, "198.18.0.10", 53, L4::Udp));
        all.push(flow("198.18.0.101", port, "198.18.0.11", 80, L4::Tcp));
        all.push(flow("fd00:198:18::100", port, "fd00:198:18::10", 80, L4::Tcp));
        all.push(flow("fd00:198:18::100", port, "fd00:198:18::10", 53, L4::Udp));
        all.push(flow("fd00:198:18::101", port, "fd00:198:18::11", 80, L4::Tcp));
    }
    all
}

pub fn key(flow: &Flow) -> FlowKey {
    let protocol = if matches!(flow.l4, L4::Tcp) { PROTO_TCP } else { PROTO_UDP };
    FlowKey::new(flow.client, flow.client_port, flow.vip, flow.vip_port, protocol)
}

pub fn backends() -> Vec<IpAddr> {
    addresses(&V4_BACKENDS).into_iter().chain(addresses(&V6_BACKENDS)).collect()
}

/// The backend a forwarded frame is addressed to, by its MAC.
pub fn backend_of(output: &[u8]) -> IpAddr {
    backends()
        .into_iter()
        .find(|backend| backend_mac(*backend) == output[0..6])
        .expect("the frame goes to one of the backends' MACs")
}
