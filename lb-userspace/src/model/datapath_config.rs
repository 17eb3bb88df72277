//! The datapath's sizes and seeds: fixed when the XDP program is loaded,
//! read from the config file, and checked against pinned maps on adoption.

use std::net::{Ipv4Addr, Ipv6Addr};

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
    /// 0: unchecked (test runs without an interface).
    pub mtu: u32,
}

impl TunnelConfig {
    /// No tunnel source and no MTU check: DSR only (a const default).
    pub const NONE: Self = Self { source_v4: None, source_v6: None, mtu: 0 };
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
