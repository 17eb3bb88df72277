//! The datapath's sizes and seeds: fixed when the XDP program is loaded,
//! read from the config file, and checked against pinned maps on adoption.

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
