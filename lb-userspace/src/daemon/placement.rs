//! VIPs and backends checked against the balancer's interface, where the
//! daemon knows its addresses and subnets: a VIP on the interface's own
//! address takes that port's traffic away from the host's own service (with
//! port 22, the operator's SSH session); a backend on the balancer's own
//! address, or outside every subnet of the interface, can never be reached
//! by L2 direct server return (it would sit in `resolving` for ever); a
//! tunnelled VIP needs a tunnel source of its family, and its backends may
//! be anywhere routable. A backend on the subnet of an `--egress`
//! interface is reachable by direct server return too.
//! Changes asked of this daemon are refused; what it starts with, or what
//! the store says, is only warned about (refusing it would stop the rest).

use super::Daemon;
use crate::interface::{self, InterfaceAddress};
use crate::model::{DesiredState, TunnelConfig};

/// Why each VIP or backend that `next` adds to `running` cannot work on an
/// interface `iface` with `addresses`; what `running` has already is not
/// looked at again.
pub fn misplaced(
    iface: &str,
    addresses: &[InterfaceAddress],
    tunnel: &TunnelConfig,
    running: &DesiredState,
    next: &DesiredState,
) -> Vec<String> {
    let mut found = Vec::new();
    for (vip, spec) in &next.vips {
        let before = running.vips.get(vip);
        if before.is_none() && addresses.iter().any(|own| own.address == vip.address) {
            found.push(format!(
                "VIP {vip} is {iface}'s own address: the balancer would take its port's traffic from this host's own service on it (with port 22, the SSH session); give the VIP an address of its own"
            ));
        }
        let tunnelled = spec.forwarding.is_tunnel();
        let has_source = if vip.address.is_ipv4() {
            tunnel.source_v4.is_some()
        } else {
            tunnel.source_v6.is_some()
        };
        let newly_tunnelled = before.is_none_or(|before| !before.forwarding.is_tunnel());
        if tunnelled && newly_tunnelled && !has_source {
            found.push(format!(
                "VIP {vip} forwards by {} but {iface} has no {} address to send the tunnel from: add one, or give lb run --tunnel-source",
                spec.forwarding.mode,
                if vip.address.is_ipv4() { "IPv4" } else { "IPv6 (not link-local)" }
            ));
        }
        // A VIP moving to DSR has every backend checked again.
        let checked_before = before.filter(|before| tunnelled || !before.forwarding.is_tunnel());
        for address in spec.backends.keys() {
            if checked_before.is_some_and(|before| before.backends.contains_key(address)) {
                continue;
            }
            if addresses.iter().any(|own| own.address == *address) {
                found.push(format!(
                    "backend {address} of VIP {vip} is {iface}'s own address: the balancer cannot send flows to itself"
                ));
            } else if !tunnelled && !addresses.iter().any(|own| own.covers(*address)) {
                let subnets: Vec<String> = addresses
                    .iter()
                    .filter(|own| own.address.is_ipv4() == address.is_ipv4())
                    .map(ToString::to_string)
                    .collect();
                let on = if subnets.is_empty() {
                    format!(
                        "{iface} has no {} address",
                        if address.is_ipv4() { "IPv4" } else { "IPv6" }
                    )
                } else {
                    format!("{iface} is on {}", subnets.join(", "))
                };
                found.push(format!(
                    "backend {address} of VIP {vip} is outside every subnet of {iface} ({on}): direct server return reaches only backends on the balancer's own network segment (a backend behind a router needs --forwarding ipip or gue)"
                ));
            }
        }
    }
    found
}

impl Daemon {
    /// Refuses `next` when it adds what cannot work on the interface.
    pub(super) fn refuse_misplaced(&self, next: &DesiredState) -> anyhow::Result<()> {
        let (label, addresses) = own_addresses(&self.iface, &self.egress);
        let addresses = match addresses {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::warn!(iface = %self.iface, %error, "the interface's addresses could not be read: VIPs and backends are not checked against them");
                return Ok(());
            }
        };
        let tunnel = &self.config.datapath.tunnel;
        let found = misplaced(&label, &addresses, tunnel, &self.config.desired, next);
        match found.as_slice() {
            [] => Ok(()),
            [one] => anyhow::bail!("{one}"),
            many => anyhow::bail!(
                "{} addresses cannot work on {}:\n  {}",
                many.len(),
                self.iface,
                many.join("\n  ")
            ),
        }
    }
}

/// The addresses VIPs and backends are checked against: `iface`'s and
/// its `egress` interfaces', and how messages name them.
fn own_addresses(
    iface: &str,
    egress: &[String],
) -> (String, std::io::Result<Vec<InterfaceAddress>>) {
    let label = if egress.is_empty() {
        iface.to_owned()
    } else {
        format!("{iface} (with --egress {})", egress.join(", "))
    };
    let mut all = Vec::new();
    for name in std::iter::once(iface).chain(egress.iter().map(String::as_str)) {
        match interface::addresses(name) {
            Ok(found) => all.extend(found),
            Err(error) => return (label, Err(error)),
        }
    }
    (label, Ok(all))
}

/// At start: warns about what cannot work in the configuration started with.
pub(super) fn warn_misplaced(
    iface: &str,
    egress: &[String],
    tunnel: &TunnelConfig,
    desired: &DesiredState,
) {
    let (label, Ok(addresses)) = own_addresses(iface, egress) else { return };
    for problem in misplaced(&label, &addresses, tunnel, &DesiredState::default(), desired) {
        tracing::warn!("{problem}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendSpec, CheckSpec, Limits, Vip};

    const TUNNEL: TunnelConfig = TunnelConfig { mtu: 1500, ..TunnelConfig::NONE };

    fn state(vip: &str, backends: &[&str]) -> DesiredState {
        let limits = Limits { max_vips: 8, max_backends: 8 };
        let vip: Vip = crate::model::parse_vip(vip, None).unwrap();
        let mut state = DesiredState::default();
        state.add_vip(vip, CheckSpec::default(), Default::default(), limits).unwrap();
        for backend in backends {
            state.add_backend(&vip, BackendSpec::new(backend.parse().unwrap(), 1), limits).unwrap();
        }
        state
    }

    #[test]
    fn what_cannot_work_on_the_interface_is_named_and_what_runs_is_left_alone() {
        let own = [InterfaceAddress { address: "198.18.0.2".parse().unwrap(), prefix: 24 }];
        let fine = state("198.18.0.10:80/tcp", &["198.18.0.101"]);
        assert!(misplaced("eth0", &own, &TUNNEL, &DesiredState::default(), &fine).is_empty());
        let found = misplaced(
            "eth0",
            &own,
            &TUNNEL,
            &DesiredState::default(),
            &state("198.18.0.2:22/tcp", &[]),
        );
        assert!(found[0].contains("eth0's own address") && found[0].contains("SSH"), "{found:?}");
        let next = state("198.18.0.10:80/tcp", &["198.18.0.101", "198.18.0.2", "198.18.7.1"]);
        let found = misplaced("eth0", &own, &TUNNEL, &fine, &next);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].contains("backend 198.18.0.2") && found[0].contains("itself"),
            "{found:?}"
        );
        assert!(
            found[1].contains("outside every subnet of eth0 (eth0 is on 198.18.0.2/24)"),
            "{found:?}"
        );
        // Already running: not refused again.
        assert!(misplaced("eth0", &own, &TUNNEL, &next, &next).is_empty());
        let v6 = state("[fd00:198:18::10]:80/tcp", &["fd00:198:18::101"]);
        let found = misplaced("eth0", &own, &TUNNEL, &DesiredState::default(), &v6);
        assert!(found[0].contains("eth0 has no IPv6 address"), "{found:?}");
    }

    #[test]
    fn a_tunnelled_vip_needs_a_source_of_its_family_and_may_reach_any_subnet() {
        use crate::model::{Forwarding, ForwardingMode};
        let own = [InterfaceAddress { address: "198.18.0.2".parse().unwrap(), prefix: 24 }];
        let dsr = state("198.18.0.10:80/tcp", &["198.18.7.1"]);
        let mut gue = dsr.clone();
        let vip = *gue.vips.keys().next().unwrap();
        gue.vips.get_mut(&vip).unwrap().forwarding = Forwarding::new(ForwardingMode::Gue, None);
        let found = misplaced("eth0", &own, &TUNNEL, &DesiredState::default(), &gue);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("no IPv4 address to send the tunnel from"), "{found:?}");
        let sourced = TunnelConfig { source_v4: Some("198.18.0.2".parse().unwrap()), ..TUNNEL };
        assert!(misplaced("eth0", &own, &sourced, &DesiredState::default(), &gue).is_empty());
        // Back to DSR, the routed backend is refused again.
        let found = misplaced("eth0", &own, &sourced, &gue, &dsr);
        assert!(found[0].contains("needs --forwarding ipip or gue"), "{found:?}");
    }
}
