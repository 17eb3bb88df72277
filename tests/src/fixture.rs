//! A balancer declared in one call, for the datapath tests, the fuzz test and
//! the bench: the real datapath, the real reconcile step, and a MAC for every
//! backend (no neighbour resolution outside a testbed).

use std::net::{IpAddr, SocketAddr};

use lb_userspace::datapath::Datapath;
use lb_userspace::model::{
    Affinity, BackendSpec, CheckSpec, DatapathConfig, DesiredState, HealthMap, Mac, Protocol, Vip,
};
use lb_userspace::reconcile::Reconciler;

/// One VIP: `ADDRESS:PORT`, protocol, backends.
pub type VipDecl<'a> = (&'a str, Protocol, &'a [IpAddr]);

/// Loads the datapath with `config`, declares `vips` (every backend weight 1,
/// default check, flow affinity) with MACs from `mac`, and installs them.
pub fn balancer(
    config: DatapathConfig,
    vips: &[VipDecl<'_>],
    mac: impl Fn(IpAddr) -> Mac,
) -> anyhow::Result<(Reconciler, DesiredState)> {
    let limits = config.limits();
    let mut reconciler = Reconciler::new(Datapath::load(config)?);
    let mut desired = DesiredState::default();
    for (endpoint, protocol, backends) in vips {
        let vip = Vip::new(endpoint.parse::<SocketAddr>()?, *protocol);
        desired.add_vip(vip, CheckSpec::default(), Affinity::Flow, limits)?;
        for address in *backends {
            desired.add_backend(&vip, BackendSpec::new(*address, 1), limits)?;
            reconciler.set_mac(*address, mac(*address));
        }
    }
    reconciler.apply(&desired, &HealthMap::new())?;
    Ok((reconciler, desired))
}

/// The MAC the tests and the bench give a backend: locally administered,
/// ending in the address's last byte (IPv6 with the top bit set), so a
/// forwarded frame's destination names its backend.
pub fn backend_mac(address: IpAddr) -> Mac {
    let last = match address {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(v6) => v6.octets()[15] | 0x80,
    };
    [0x02, 0, 0, 0, 1, last]
}

/// Addresses from text, for declaring backends.
pub fn addresses(texts: &[&str]) -> Vec<IpAddr> {
    texts.iter().map(|text| text.parse().expect("a test address")).collect()
}
