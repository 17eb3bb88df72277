//! The operator's vocabulary, at the bottom of the dependency picture: VIPs,
//! protocols, addresses, MACs, and the datapath's fixed settings. The desired
//! state and the check specs built from them live in the submodules.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod check;
mod datapath_config;
mod desired;
pub mod diff;
mod forwarding;
mod rebalance;

pub use check::{CheckKind, CheckOptions, CheckSpec, StatusRange};
pub use datapath_config::{DatapathConfig, TunnelConfig, TunnelSource};
pub use desired::{
    Affinity, BackendSpec, ChangeError, DEFAULT_WEIGHT, DesiredState, Limits, Scheduler, VipSpec,
    WEIGHT_RANGE, refuse_backend_address, refuse_vip, refuse_weight,
};
pub use forwarding::{Forwarding, ForwardingMode, ForwardingOptions};
pub use rebalance::{Rebalance, RebalanceMode, RebalanceOptions};

/// An Ethernet address, as the datapath writes it into frames.
pub type Mac = [u8; 6];

/// Where the balancer sends a backend's packets: the MAC of the backend
/// itself (on-link) or of the router towards it (`gateway`), out of the
/// interface `egress` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub mac: Mac,
    pub gateway: Option<IpAddr>,
    /// 0: the interface `lb run` runs on; n: its n-th `--egress` interface
    /// (lb_common::Backend::egress).
    pub egress: u32,
}

/// `02:00:00:00:01:0a`: how MACs are shown to operators and in logs.
pub fn format_mac(mac: Mac) -> String {
    mac.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(":")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("unknown protocol '{text}': expected tcp or udp")),
        }
    }
}

/// A VIP: address, port and protocol. Printed as `198.18.0.10:80/tcp` or
/// `[fd00:198:18::10]:80/tcp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Vip {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Vip {
    pub fn new(endpoint: SocketAddr, protocol: Protocol) -> Self {
        Self { address: endpoint.ip(), port: endpoint.port(), protocol }
    }

    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    pub fn key(&self) -> lb_common::VipKey {
        lb_common::VipKey::new(self.address, self.port, self.protocol.number())
    }

    /// The VIP a map key stands for; None for a key no `Vip` could produce.
    pub fn from_key(key: &lb_common::VipKey) -> Option<Self> {
        let address = address_from_bytes(key.address, key.family)?;
        let protocol = match key.protocol {
            lb_common::PROTO_TCP => Protocol::Tcp,
            lb_common::PROTO_UDP => Protocol::Udp,
            _ => return None,
        };
        Some(Self { address, port: u16::from_be_bytes(key.port), protocol })
    }
}

/// The inverse of `lb_common::address_bytes`.
pub fn address_from_bytes(bytes: [u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        lb_common::FAMILY_IPV4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
        lb_common::FAMILY_IPV6 => Some(IpAddr::from(bytes)),
        _ => None,
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.endpoint(), self.protocol)
    }
}

/// Parses `ADDR:PORT` (IPv6 as `[ADDR]:PORT`), naming what is wrong.
pub fn parse_endpoint(text: &str) -> Result<SocketAddr, String> {
    SocketAddr::from_str(text).map_err(|_| {
        format!("'{text}' is not ADDRESS:PORT (examples: 198.18.0.10:80, [fd00:198:18::10]:443)")
    })
}

/// Parses a VIP as `lb` prints it, `ADDR:PORT/PROTO`, or as `ADDR:PORT`
/// with the protocol from `--proto` (TCP when neither says). Both may be
/// given only when they agree.
pub fn parse_vip(text: &str, protocol: Option<Protocol>) -> Result<Vip, String> {
    let (endpoint, suffix) = match text.rsplit_once('/') {
        Some((endpoint, suffix)) => (endpoint, Some(suffix.parse::<Protocol>()?)),
        None => (text, None),
    };
    let protocol = match (suffix, protocol) {
        (Some(written), Some(option)) if written != option => {
            return Err(format!("'{text}' says {written} but --proto says {option}"));
        }
        (Some(protocol), _) | (None, Some(protocol)) => protocol,
        (None, None) => Protocol::Tcp,
    };
    Ok(Vip::new(parse_endpoint(endpoint)?, protocol))
}

/// Parses a backend address: a bare IP address, without a port.
pub fn parse_address(text: &str) -> Result<IpAddr, String> {
    let trimmed = text.trim_start_matches('[').trim_end_matches(']');
    IpAddr::from_str(trimmed).map_err(|_| {
        let hint = if SocketAddr::from_str(text).is_ok() {
            ": give the address without a port (backends serve the VIP's port)"
        } else {
            ""
        };
        format!("'{text}' is not an IP address{hint}")
    })
}

/// What the health checks say of a backend, as the reconcile step needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendHealth {
    pub up: bool,
    /// Up at some time since the daemon started: such backends serve when no
    /// backend of the VIP is up (fail-open rather than black-holing).
    pub ever_up: bool,
}

/// Health per (VIP, backend address). A backend without an entry counts as up.
pub type HealthMap = std::collections::BTreeMap<(Vip, IpAddr), BackendHealth>;

#[cfg(test)]
mod tests {
    use super::*;

    /// What `lb` prints for a VIP can be pasted back, alone or with a
    /// `--proto` that agrees; a disagreement is named, not guessed.
    #[test]
    fn a_printed_vip_parses_back() {
        for vip in [
            Vip::new("198.18.0.10:80".parse().unwrap(), Protocol::Tcp),
            Vip::new("[fd00:198:18::10]:53".parse().unwrap(), Protocol::Udp),
        ] {
            assert_eq!(parse_vip(&vip.to_string(), None), Ok(vip));
            assert_eq!(parse_vip(&vip.to_string(), Some(vip.protocol)), Ok(vip));
        }
        let udp = parse_vip("198.18.0.10:53", Some(Protocol::Udp)).unwrap();
        assert_eq!((udp.port, udp.protocol), (53, Protocol::Udp));
        assert_eq!(parse_vip("198.18.0.10:80", None).unwrap().protocol, Protocol::Tcp);
        assert_eq!(
            parse_vip("198.18.0.10:53/udp", Some(Protocol::Tcp)),
            Err("'198.18.0.10:53/udp' says udp but --proto says tcp".to_owned())
        );
        assert_eq!(
            parse_vip("198.18.0.10:80/sctp", None),
            Err("unknown protocol 'sctp': expected tcp or udp".to_owned())
        );
        assert!(parse_vip("198.18.0.10/tcp", None).unwrap_err().contains("is not ADDRESS:PORT"));
    }
}
