//! What the kernel says of the balancer's interface, read when needed: the
//! addresses and subnets on it, which VIPs and backends are checked against
//! (a VIP on the host's own address would black-hole the host's service on
//! that port; a backend off every subnet can never be reached by L2 direct
//! server return), and the XDP program attached to it, which the attach
//! mode reported after an adoption and the refusal of a program in the way
//! come from.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};

use crate::model::{TunnelConfig, TunnelSource};

/// An address on the interface, with its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub address: IpAddr,
    pub prefix: u8,
}

impl InterfaceAddress {
    /// Whether `other` lies in this address's subnet.
    pub fn covers(&self, other: IpAddr) -> bool {
        let mask = |bits: u32, prefix: u8| {
            if prefix == 0 { 0u128 } else { u128::MAX << (bits - u32::from(prefix).min(bits)) }
        };
        match (self.address, other) {
            (IpAddr::V4(own), IpAddr::V4(other)) => {
                let mask = mask(32, self.prefix) as u32;
                u32::from(own) & mask == u32::from(other) & mask
            }
            (IpAddr::V6(own), IpAddr::V6(other)) => {
                let mask = mask(128, self.prefix);
                u128::from(own) & mask == u128::from(other) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for InterfaceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

/// The IPv4 and IPv6 addresses on `iface` (link-local ones included: they
/// are the host's own too).
pub fn addresses(iface: &str) -> std::io::Result<Vec<InterfaceAddress>> {
    let mut found = Vec::new();
    for entry in nix::ifaddrs::getifaddrs()?.filter(|entry| entry.interface_name == iface) {
        let (Some(address), Some(netmask)) = (entry.address, entry.netmask) else { continue };
        if let (Some(address), Some(mask)) = (address.as_sockaddr_in(), netmask.as_sockaddr_in()) {
            let prefix = mask.ip().to_bits().count_ones() as u8;
            found.push(InterfaceAddress { address: IpAddr::V4(address.ip()), prefix });
        } else if let (Some(address), Some(mask)) =
            (address.as_sockaddr_in6(), netmask.as_sockaddr_in6())
        {
            let prefix = mask.ip().to_bits().count_ones() as u8;
            found.push(InterfaceAddress { address: IpAddr::V6(address.ip()), prefix });
        }
    }
    Ok(found)
}

/// What tunnelled VIPs send from and must fit: each family's source from
/// `sources` (`--tunnel-source`, at most one per family), else the
/// interface's first address of that family (IPv6 link-local ones left
/// out: a router does not forward from them); the interface's MTU.
pub fn tunnel_config(iface: &str, sources: &[TunnelSource]) -> anyhow::Result<TunnelConfig> {
    let own = addresses(iface)?;
    let pick = |v4: bool| -> anyhow::Result<Option<TunnelSource>> {
        let given: Vec<&TunnelSource> =
            sources.iter().filter(|s| s.address.is_ipv4() == v4).collect();
        match given.as_slice() {
            [] => Ok(own
                .iter()
                .map(|own| own.address)
                .find(|a| a.is_ipv4() == v4 && !is_link_local(*a))
                .map(|address| TunnelSource { address, spread_bits: 0 })),
            [one]
                if one.address.is_unspecified()
                    || one.address.is_multicast()
                    || is_link_local(one.address) =>
            {
                anyhow::bail!(
                    "--tunnel-source {} cannot be a packet's source: give a unicast address a router forwards from",
                    one.address
                )
            }
            [one] => Ok(Some(**one)),
            _ => anyhow::bail!(
                "--tunnel-source was given {} {} addresses: one per family",
                given.len(),
                if v4 { "IPv4" } else { "IPv6" }
            ),
        }
    };
    let mut tunnel = TunnelConfig::NONE;
    if let Some(TunnelSource { address: IpAddr::V4(address), spread_bits }) = pick(true)? {
        (tunnel.source_v4, tunnel.spread_v4) = (Some(address), spread_bits);
    }
    if let Some(TunnelSource { address: IpAddr::V6(address), spread_bits }) = pick(false)? {
        (tunnel.source_v6, tunnel.spread_v6) = (Some(address), spread_bits);
    }
    let path = format!("/sys/class/net/{iface}/mtu");
    tunnel.mtu = std::fs::read_to_string(&path)
        .map_err(anyhow::Error::from)
        .and_then(|text| Ok(text.trim().parse::<u32>()?))
        .map_err(|error| anyhow::anyhow!("reading {iface}'s MTU from {path}: {error}"))?;
    Ok(tunnel)
}

fn is_link_local(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// The XDP program the kernel has attached to an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedProgram {
    pub id: u32,
    /// `native`, `skb` (generic), `offload` or `multiple`.
    pub mode: &'static str,
    /// The program's name, when it can still be read.
    pub name: Option<String>,
}

impl std::fmt::Display for AttachedProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "program id {}", self.id)?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        write!(f, " in {} mode", self.mode)
    }
}

/// The XDP program attached to interface `ifindex`, if any.
pub async fn attached_program(ifindex: u32) -> anyhow::Result<Option<AttachedProgram>> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    let connection = tokio::spawn(connection);
    let mut links = handle.link().get().match_index(ifindex).execute();
    let message = links.try_next().await;
    connection.abort();
    let Some(message) = message? else { return Ok(None) };
    let xdp = message.attributes.into_iter().find_map(|attribute| match attribute {
        LinkAttribute::Xdp(xdp) => Some(xdp),
        _ => None,
    });
    let (mut mode, mut id) = (None, None);
    for attribute in xdp.unwrap_or_default() {
        match attribute {
            LinkXdp::Attached(XdpAttached::Driver) => mode = Some("native"),
            LinkXdp::Attached(XdpAttached::SocketBuffer) => mode = Some("skb"),
            LinkXdp::Attached(XdpAttached::Hardware) => mode = Some("offload"),
            LinkXdp::Attached(XdpAttached::Multiple) => mode = Some("multiple"),
            LinkXdp::ProgId(found) => id = Some(found),
            _ => {}
        }
    }
    let (Some(mode), Some(id)) = (mode, id) else { return Ok(None) };
    Ok(Some(AttachedProgram { id, mode, name: program_name(id) }))
}

fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|program| program.id() == id)
        .and_then(|program| program.name_as_str().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(text: &str) -> InterfaceAddress {
        let (address, prefix) = text.split_once('/').unwrap();
        InterfaceAddress { address: address.parse().unwrap(), prefix: prefix.parse().unwrap() }
    }

    #[test]
    fn a_subnet_covers_its_own_addresses_only() {
        let v4 = on("198.18.0.2/24");
        assert!(v4.covers("198.18.0.101".parse().unwrap()));
        assert!(!v4.covers("198.18.1.1".parse().unwrap()));
        assert!(!v4.covers("fd00:198:18::101".parse().unwrap()));
        let v6 = on("fd00:198:18::2/64");
        assert!(v6.covers("fd00:198:18::ffff".parse().unwrap()));
        assert!(!v6.covers("fd00:198:19::1".parse().unwrap()));
        assert!(on("198.18.0.2/32").covers("198.18.0.2".parse().unwrap()));
        assert!(!on("198.18.0.2/32").covers("198.18.0.3".parse().unwrap()));
        assert!(on("0.0.0.0/0").covers("203.0.113.1".parse().unwrap()));
    }
}
