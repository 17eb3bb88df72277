//! Paths the fleet's packets take beyond its one switch: a narrow link on
//! the client's side, and backends behind the router for tunnelled VIPs.

use super::{
    Fleet, ROUTER_CLIENT_SIDE, ROUTER_CLIENT_SIDE6, ROUTER_LAN, ROUTER_LAN6, default_via, link_up,
    veth_pair,
};
use crate::netns::{ip, sysctl};

/// The client behind [`Fleet::narrow_client_path`], and the second router's
/// addresses on its two links.
pub const NARROW_CLIENT: &str = "198.19.1.1";
pub const NARROW_CLIENT6: &str = "fd00:198:18:2::1";
const MIDDLE_CLIENT_SIDE: &str = "198.19.1.254";
const MIDDLE_CLIENT_SIDE6: &str = "fd00:198:18:2::fe";
const MIDDLE_ROUTER_SIDE: &str = "198.19.0.253";
const MIDDLE_ROUTER_SIDE6: &str = "fd00:198:18:1::fd";

/// Backend `index`'s IPv4 address once [`Fleet::route_backends`] moved it
/// behind the router: alone on 198.18.(10+index).0/24.
pub fn routed_backend_address(index: usize) -> String {
    format!("198.18.{}.2", 10 + index)
}

/// The same in IPv6: alone on fd00:198:18:(10+index)::/64.
pub fn routed_backend_address6(index: usize) -> String {
    format!("fd00:198:18:{}::2", 10 + index)
}

impl Fleet {
    /// Moves every backend off the switch to a link of its own from the
    /// router, so no balancer shares a segment with any (VIPs to them must
    /// be `ipip` or `gue`); balancers reach them through the router, and
    /// their replies go to the client through it.
    pub fn route_backends(&self) -> anyhow::Result<()> {
        let router = self.router();
        for index in 1..=self.backends {
            let (backend, port) = (self.backend(index), format!("b{index}"));
            // Removing the backend's end removes the switch's too.
            ip(&backend, &["link", "del", "eth0"])?;
            veth_pair((&backend, "eth0"), (&router, &port), 1500)?;
            let (v4, v6) = (routed_backend_address(index), routed_backend_address6(index));
            link_up(&backend, "eth0", &v4, &v6)?;
            let subnet = 10 + index;
            let (gateway, gateway6) =
                (format!("198.18.{subnet}.254"), format!("fd00:198:18:{subnet}::fe"));
            link_up(&router, &port, &gateway, &gateway6)?;
            default_via(&backend, &gateway, &gateway6)?;
            crate::netns::run(
                "ip",
                &["netns", "exec", &backend, "ethtool", "-K", "eth0", "tx", "off"],
            )?;
            for balancer in (1..=self.balancers).map(|i| self.balancer(i)) {
                ip(
                    &balancer,
                    &["route", "add", &format!("198.18.{subnet}.0/24"), "via", ROUTER_LAN],
                )?;
                let subnet6 = format!("fd00:198:18:{subnet}::/64");
                ip(&balancer, &["-6", "route", "add", &subnet6, "via", ROUTER_LAN6])?;
            }
        }
        // Replies come from the VIPs, which the router routes to the
        // balancers: not the way they arrive.
        for key in ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"] {
            sysctl(&router, key)?;
        }
        Ok(())
    }

    /// Puts a second router between the client and the router, joined to
    /// the router by a link of `mtu` bytes, as a tunnel on the way would:
    /// the client keeps a 1500-byte link (so it advertises a full MSS), and
    /// backends' large replies meet the narrow link only at the router,
    /// which sends its ICMP errors to the VIP. The client becomes
    /// [`NARROW_CLIENT`] / [`NARROW_CLIENT6`].
    pub fn narrow_client_path(&self, mtu: u32) -> anyhow::Result<()> {
        let (client, router, middle) =
            (self.client(), self.router(), format!("{}mid", self.prefix));
        crate::netns::add(&middle)?;
        // Removing the client's end removes the router's too.
        ip(&client, &["link", "del", "eth0"])?;
        veth_pair((&client, "eth0"), (&middle, "eth0"), 1500)?;
        veth_pair((&middle, "eth1"), (&router, "eth1"), mtu)?;
        link_up(&client, "eth0", NARROW_CLIENT, NARROW_CLIENT6)?;
        link_up(&middle, "eth0", MIDDLE_CLIENT_SIDE, MIDDLE_CLIENT_SIDE6)?;
        link_up(&middle, "eth1", MIDDLE_ROUTER_SIDE, MIDDLE_ROUTER_SIDE6)?;
        link_up(&router, "eth1", ROUTER_CLIENT_SIDE, ROUTER_CLIENT_SIDE6)?;
        default_via(&client, MIDDLE_CLIENT_SIDE, MIDDLE_CLIENT_SIDE6)?;
        default_via(&middle, ROUTER_CLIENT_SIDE, ROUTER_CLIENT_SIDE6)?;
        ip(&router, &["route", "add", "198.19.1.0/24", "via", MIDDLE_ROUTER_SIDE])?;
        ip(&router, &["-6", "route", "add", "fd00:198:18:2::/64", "via", MIDDLE_ROUTER_SIDE6])?;
        for ns in [&middle, &router] {
            for key in [
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ] {
                sysctl(ns, key)?;
            }
        }
        Ok(())
    }
}
