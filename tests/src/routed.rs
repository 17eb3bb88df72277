//! The routed testbed: backends with no L2 adjacency to the balancer, each
//! on its own subnet behind a router namespace, for `ipip` and `gue` VIPs.
//!
//! ```text
//! client 198.18.0.1 ─┐            ┌─ router-b1 198.18.2.254 ── b1 198.18.2.1
//! lb     198.18.0.2 ─┼─ switch ── router 198.18.0.254
//!                    │            └─ router-b2 198.18.3.254 ── b2 198.18.3.2
//! ```
//!
//! Backend `i` sits alone on 198.18.(i+1).0/24 (b3 on 198.18.4.0/24 and so
//! on). IPv6 alike (fd00:198:18::/64 on the switch, fd00:198:18:(i+1)::/64
//! behind the router). Backends own the VIPs on `lo`, run `lb decap` on
//! their interface, and answer clients through the router.
//! [`narrow_client`] adds a second client behind a narrow link of the router.

use std::path::PathBuf;

use crate::harness::{lb_binary, test_bpffs};
use crate::netns::{self, LB_IFACE, Testbed, ip, sysctl};

/// The client behind [`narrow_client`]'s link, and the router's end of it.
pub const NARROW_CLIENT4: &str = "198.18.9.1";
pub const NARROW_CLIENT6: &str = "fd00:198:18:9::1";
const NARROW_ROUTER4: &str = "198.18.9.254";
const NARROW_ROUTER6: &str = "fd00:198:18:9::fe";

/// Backend `index` (1 or 2): its IPv4 and IPv6 address.
pub fn backend_addresses(index: usize) -> (String, String) {
    let subnet = index + 1;
    (format!("198.18.{subnet}.{index}"), format!("fd00:198:18:{subnet}::{index}"))
}

/// Backend `index`'s IPv4 address (for [`crate::long_lived::Scenario`]).
pub fn backend4(index: usize) -> String {
    backend_addresses(index).0
}

/// Adds backend `{prefix}s{index}` on the balancer's own switch, with
/// [`netns::backend4`]/[`netns::backend6`] of `index` and the VIPs on
/// `lo`: the backend of a `dsr` VIP beside tunnelled ones. Returns its
/// namespace (removed with the testbed, which removes its whole prefix).
pub fn segment_backend(testbed: &Testbed, index: usize) -> anyhow::Result<String> {
    let ns = format!("{}s{index}", testbed.prefix);
    netns::add(&ns)?;
    let addresses =
        [format!("{}/24", netns::backend4(index)), format!("{}/64", netns::backend6(index))];
    netns::join_switch(&format!("{}sw", testbed.prefix), &ns, &format!("s{index}"), &addresses)?;
    netns::own_vips(&ns)?;
    Ok(ns)
}

/// The router's namespace in the testbed under `prefix`.
pub fn router(testbed: &Testbed) -> String {
    format!("{}r", testbed.prefix)
}

/// Builds the routed testbed under `prefix` with `backends` (1 to 6)
/// backends; dropping it removes everything.
pub fn up(prefix: &str, backends: usize) -> anyhow::Result<Testbed> {
    let mut testbed = Testbed::up(prefix, 0)?;
    anyhow::ensure!((1..=6).contains(&backends), "1 to 6 routed backends, not {backends}");
    let router = router(&testbed);
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
        let balancer = testbed.balancer();
        ip(&balancer, &["route", "add", &format!("198.18.{subnet}.0/24"), "via", "198.18.0.254"])?;
        let subnet6 = format!("fd00:198:18:{subnet}::/64");
        ip(&balancer, &["-6", "route", "add", &subnet6, "via", "fd00:198:18::fe"])?;
    }
    testbed.backends = backends;
    Ok(testbed)
}

/// A second client, `{prefix}nc`, behind a link of `mtu` bytes from the
/// router (the client's end is 1500, so its TCP offers full-size segments
/// and learns nothing from its own link): the backends' replies to it are
/// too big for that link, and the
/// router's "fragmentation needed" / "packet too big" errors go to the
/// VIP, which is to say the balancer. The namespace goes with the testbed
/// (dropping it removes every namespace under its prefix).
pub fn narrow_client(testbed: &Testbed, mtu: u32) -> anyhow::Result<String> {
    let (client, router) = (format!("{}nc", testbed.prefix), router(testbed));
    netns::add(&client)?;
    let mtu = mtu.to_string();
    netns::run(
        "ip",
        &[
            "link", "add", LB_IFACE, "netns", &client, "type", "veth", "peer", "name", "narrow",
            "netns", &router, "mtu", &mtu,
        ],
    )?;
    ip(&client, &["addr", "add", &format!("{NARROW_CLIENT4}/24"), "dev", LB_IFACE])?;
    ip(&client, &["addr", "add", &format!("{NARROW_CLIENT6}/64"), "dev", LB_IFACE, "nodad"])?;
    ip(&client, &["link", "set", LB_IFACE, "up"])?;
    ip(&client, &["route", "add", "default", "via", NARROW_ROUTER4])?;
    ip(&client, &["-6", "route", "add", "default", "via", NARROW_ROUTER6])?;
    ip(&router, &["addr", "add", &format!("{NARROW_ROUTER4}/24"), "dev", "narrow"])?;
    ip(&router, &["addr", "add", &format!("{NARROW_ROUTER6}/64"), "dev", "narrow", "nodad"])?;
    ip(&router, &["link", "set", "narrow", "up"])?;
    // The VIPs are the balancer's, as the client's route says on the switch.
    ip(&router, &["route", "add", &format!("{}/32", netns::VIP4), "via", "198.18.0.2"])?;
    ip(&router, &["-6", "route", "add", &format!("{}/128", netns::VIP6), "via", "fd00:198:18::2"])?;
    Ok(client)
}

/// `lb decap` in backend namespace `ns`, pinned in the test bpffs, with
/// `args` (none: attach); its JSON answer.
pub fn decap(ns: &str, args: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(lb_binary())
        .args(["decap", "--iface", LB_IFACE, "--xdp-mode", "native", "--json"])
        .arg("--pin-dir")
        .arg(decap_root(ns))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "lb decap in {ns}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null)
}

fn decap_root(ns: &str) -> PathBuf {
    test_bpffs().unwrap().join(ns)
}

/// `lb decap` attached in each of `namespaces`; its pins are removed
/// however the test ends (the namespaces go with the testbed, the pins
/// would stay).
pub struct Decapsulators(pub Vec<String>);

impl Decapsulators {
    pub fn attach(namespaces: Vec<String>) -> Self {
        for ns in &namespaces {
            decap(ns, &[]);
        }
        Self(namespaces)
    }
}

impl Drop for Decapsulators {
    fn drop(&mut self) {
        for ns in &self.0 {
            let root = decap_root(ns);
            let dir = lb_userspace::decap::pin_dir_for(&root, LB_IFACE);
            let _ = lb_userspace::decap::remove_pins(&dir);
            let _ = std::fs::remove_dir(dir.parent().unwrap());
            let _ = std::fs::remove_dir(root);
        }
    }
}
