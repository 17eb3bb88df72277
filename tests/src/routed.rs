//! The routed testbed: backends with no L2 adjacency to the balancer, each
//! on its own subnet behind a router namespace, for `ipip` and `gue` VIPs.
//!
//! ```text
//! client 198.18.0.1 ─┐            ┌─ router-b1 198.18.2.254 ── b1 198.18.2.1
//! lb     198.18.0.2 ─┼─ switch ── router 198.18.0.254
//!                    │            └─ router-b2 198.18.3.254 ── b2 198.18.3.2
//! ```
//!
//! IPv6 alike (fd00:198:18::/64 on the switch, fd00:198:18:2::/64 and
//! fd00:198:18:3::/64 behind the router). Backends own the VIPs on `lo`,
//! run `lb decap` on their interface, and answer clients through the router.

use crate::netns::{self, LB_IFACE, Testbed, ip, sysctl};

/// Backend `index` (1 or 2): its IPv4 and IPv6 address.
pub fn backend_addresses(index: usize) -> (String, String) {
    let subnet = index + 1;
    (format!("198.18.{subnet}.{index}"), format!("fd00:198:18:{subnet}::{index}"))
}

/// Builds the routed testbed under `prefix` with `backends` (1 or 2)
/// backends; dropping it removes everything.
pub fn up(prefix: &str, backends: usize) -> anyhow::Result<Testbed> {
    let mut testbed = Testbed::up(prefix, 0)?;
    let router = format!("{prefix}r");
    netns::add(&router)?;
    netns::join_switch(
        &format!("{prefix}sw"),
        &router,
        "router",
        &["198.18.0.254/24".to_owned(), "fd00:198:18::fe/64".to_owned()],
    )?;
    sysctl(&router, "net.ipv4.ip_forward=1")?;
    sysctl(&router, "net.ipv6.conf.all.forwarding=1")?;
    for index in 1..=backends {
        let backend = testbed.backend(index);
        netns::add(&backend)?;
        let (v4, v6) = backend_addresses(index);
        let subnet = index + 1;
        let port = format!("router-b{index}");
        netns::run(
            "ip",
            &[
                "link", "add", LB_IFACE, "netns", &backend, "type", "veth", "peer", "name", &port,
                "netns", &router,
            ],
        )?;
        ip(&router, &["addr", "add", &format!("198.18.{subnet}.254/24"), "dev", &port])?;
        ip(
            &router,
            &["addr", "add", &format!("fd00:198:18:{subnet}::fe/64"), "dev", &port, "nodad"],
        )?;
        ip(&router, &["link", "set", &port, "up"])?;
        ip(&backend, &["addr", "add", &format!("{v4}/24"), "dev", LB_IFACE])?;
        ip(&backend, &["addr", "add", &format!("{v6}/64"), "dev", LB_IFACE, "nodad"])?;
        ip(&backend, &["link", "set", LB_IFACE, "up"])?;
        netns::run("ip", &["netns", "exec", &backend, "ethtool", "-K", LB_IFACE, "tx", "off"])?;
        ip(&backend, &["route", "add", "default", "via", &format!("198.18.{subnet}.254")])?;
        ip(
            &backend,
            &["-6", "route", "add", "default", "via", &format!("fd00:198:18:{subnet}::fe")],
        )?;
        netns::own_vips(&backend)?;
    }
    let balancer = testbed.balancer();
    ip(&balancer, &["route", "add", "198.18.2.0/23", "via", "198.18.0.254"])?;
    ip(&balancer, &["-6", "route", "add", "fd00:198:18:2::/63", "via", "fd00:198:18::fe"])?;
    testbed.backends = backends;
    Ok(testbed)
}
