//! The datapath's sizes and seeds: fixed when the XDP program is loaded,
//! read from the config file, and checked against pinned maps on adoption.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::SLOTS_PER_VIP;

use super::Limits;

/// Sizes and seeds fixed when the program is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    pub hash_seed: u32,
    pub table_size: u32,
    pub max_vips: u32,
    pub max_backends: u32,
    /// Flows the flow table holds (least recently used evicted beyond).
    pub flow_table_size: u32,
    /// A UDP flow idle this long is forgotten (its next packet is a new flow).
    pub udp_idle_timeout_ms: u64,
    /// A TCP flow idle this long no longer counts as active (it stays in the
    /// table, and keeps its backend, until evicted).
    pub tcp_idle_timeout_ms: u64,
    /// The datapath reports created and closed flows for peer balancers.
    /// Set by `lb run` when sync is configured; not a file setting.
    pub sync_flows: bool,
    /// The attached interface's MAC: frames for other destinations are
    /// never forwarded. All zero (tests without an interface) checks nothing.
    /// Set by `lb run`; not a file setting.
    pub own_mac: [u8; 6],
    /// What tunnelled VIPs (`ipip`, `gue`) send from, and the MTU their
    /// packets must fit. Set by `lb run` from the interface and
    /// `--tunnel-source`; not a file setting.
    pub tunnel: TunnelConfig,
}

/// The outer source addresses and egress MTU of tunnelled VIPs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// None: IPv4 packets of tunnelled VIPs are dropped (`drop_no_tunnel_source`).
    pub source_v4: Option<Ipv4Addr>,
    pub source_v6: Option<Ipv6Addr>,
    /// The low bits of each source that come from the flow's entropy (a
    /// prefix's host bits, [`TunnelSource::spread_bits`]); 0: one address.
    pub spread_v4: u8,
    pub spread_v6: u8,
    /// 0: unchecked (test runs without an interface).
    pub mtu: u32,
}

impl TunnelConfig {
    /// No tunnel source and no MTU check: DSR only (a const default).
    pub const NONE: Self =
        Self { source_v4: None, source_v6: None, spread_v4: 0, spread_v6: 0, mtu: 0 };
}

/// `--tunnel-source ADDRESS` or `PREFIX/LEN`: the outer source of one
/// family's tunnels. A prefix gives each flow an address of its own in it
/// (the host bits from the flow's entropy), so a backend's NIC, which
/// hashes IPIP by addresses alone, spreads one balancer's flows over its
/// receive queues; it takes at most 20 host bits (IPv4 /12 to /32, IPv6
/// /108 to /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelSource {
    /// The address, or the prefix's first address (no host bits set).
    pub address: IpAddr,
    /// Host bits taken from the flow: 0 for a single address.
    pub spread_bits: u8,
}

impl std::str::FromStr for TunnelSource {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, length) = match text.split_once('/') {
            Some((address, length)) => (address, Some(length)),
            None => (text, None),
        };
        let address: IpAddr =
            address.parse().map_err(|_| format!("{address:?} is not an IP address"))?;
        let bits = if address.is_ipv4() { 32u8 } else { 128 };
        let Some(length) = length else {
            return Ok(Self { address, spread_bits: 0 });
        };
        let length: u8 = length
            .parse()
            .ok()
            .filter(|length| *length <= bits)
            .ok_or_else(|| format!("prefix length {length:?} is not 0 to {bits}"))?;
        let spread_bits = bits - length;
        let max = lb_common::TUNNEL_SPREAD_MAX_BITS;
        if spread_bits > max {
            return Err(format!(
                "{text} has {spread_bits} host bits; a tunnel source prefix takes at most {max} (/{} or longer)",
                bits - max
            ));
        }
        let host_bits_set = match address {
            IpAddr::V4(v4) => v4.to_bits() & (u32::MAX.checked_shr(u32::from(length)).unwrap_or(0)),
            IpAddr::V6(v6) => {
                (v6.to_bits() & (u128::MAX.checked_shr(u32::from(length)).unwrap_or(0))) as u32
            }
        };
        if host_bits_set != 0 {
            return Err(format!(
                "{text} has host bits set: give the prefix's first address (its host bits come from each flow)"
            ));
        }
        Ok(Self { address, spread_bits })
    }
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            hash_seed: 0,
            table_size: lb_common::DEFAULT_TABLE_SIZE,
            max_vips: lb_common::DEFAULT_MAX_VIPS,
            max_backends: lb_common::DEFAULT_MAX_BACKENDS,
            flow_table_size: lb_common::DEFAULT_FLOW_TABLE_SIZE,
            udp_idle_timeout_ms: lb_common::DEFAULT_UDP_IDLE_NS / 1_000_000,
            tcp_idle_timeout_ms: 3_600_000,
            sync_flows: false,
            own_mac: [0; 6],
            tunnel: TunnelConfig::NONE,
        }
    }
}

impl DatapathConfig {
    /// What the map sizes allow the desired state to hold.
    pub const fn limits(&self) -> Limits {
        Limits { max_vips: self.max_vips, max_backends: self.max_backends }
    }

    /// Entries of the Maglev map: two slots per VIP.
    pub fn maglev_entries(&self) -> Option<u32> {
        self.max_vips.checked_mul(SLOTS_PER_VIP)?.checked_mul(self.table_size)
    }
}

#[cfg(test)]
mod tests {
    use super::TunnelSource;

    fn parse(text: &str) -> Result<TunnelSource, String> {
        text.parse()
    }

    #[test]
    fn a_tunnel_source_is_an_address_or_a_prefix_of_at_most_twenty_host_bits() {
        let one = parse("198.18.0.2").unwrap();
        assert_eq!((one.address.to_string(), one.spread_bits), ("198.18.0.2".to_owned(), 0));
        assert_eq!(parse("198.18.128.0/24").unwrap().spread_bits, 8);
        assert!(parse("198.18.0.0/12").unwrap_err().contains("host bits set"));
        assert_eq!(parse("198.16.0.0/12").unwrap().spread_bits, 20);
        assert_eq!(parse("198.18.0.2/32").unwrap().spread_bits, 0);
        assert_eq!(parse("fd00:198:18:ff::/112").unwrap().spread_bits, 16);
        assert_eq!(parse("fd00:198:18:ff::/108").unwrap().spread_bits, 20);
    }

    #[test]
    fn a_bad_tunnel_source_says_what_is_wrong() {
        let cases = [
            ("198.18.0.300", "\"198.18.0.300\" is not an IP address"),
            ("198.18.0.0/33", "prefix length \"33\" is not 0 to 32"),
            ("198.18.0.0/x", "prefix length \"x\" is not 0 to 32"),
            (
                "198.0.0.0/8",
                "198.0.0.0/8 has 24 host bits; a tunnel source prefix takes at most 20 (/12 or longer)",
            ),
            (
                "fd00::/64",
                "fd00::/64 has 64 host bits; a tunnel source prefix takes at most 20 (/108 or longer)",
            ),
            (
                "198.18.128.5/24",
                "198.18.128.5/24 has host bits set: give the prefix's first address (its host bits come from each flow)",
            ),
        ];
        for (text, error) in cases {
            assert_eq!(parse(text).unwrap_err(), error, "{text}");
        }
    }
}
