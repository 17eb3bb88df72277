//! The testbed: network namespaces on one L2 segment (a bridge in a switch
//! namespace) holding a client, the balancer and N backends. Used by the
//! end-to-end tests, `cargo xtask run`'s demo and `scripts/testbed.sh`.
//!
//! | host     | IPv4             | IPv6                  |
//! |----------|------------------|-----------------------|
//! | client   | 198.18.0.1/24    | fd00:198:18::1/64     |
//! | balancer | 198.18.0.2/24    | fd00:198:18::2/64     |
//! | backend i| 198.18.0.(100+i) | fd00:198:18::(100+i)  |
//! | VIP      | 198.18.0.10 (on every backend's lo, routed via the balancer) | fd00:198:18::10 |

use std::process::{Command, Output};

use anyhow::{Context as _, bail};

pub const VIP4: &str = "198.18.0.10";
pub const VIP6: &str = "fd00:198:18::10";
pub const CLIENT4: &str = "198.18.0.1";
pub const CLIENT6: &str = "fd00:198:18::1";
/// The balancer's interface inside its namespace.
pub const LB_IFACE: &str = "eth0";

pub fn backend4(index: usize) -> String {
    format!("198.18.0.{}", 100 + index)
}

pub fn backend6(index: usize) -> String {
    format!("fd00:198:18::{}", 100 + index)
}

/// Moves the calling thread into network namespace `ns` (other threads stay).
pub fn enter(ns: &str) -> anyhow::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("namespace {ns}"))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering namespace {ns}"))
}

/// An interface in a namespace, as `ip -j link show` describes it.
fn link(ns: &str, iface: &str) -> anyhow::Result<serde_json::Value> {
    let output = run("ip", &["-n", ns, "-j", "link", "show", iface])?;
    let mut links: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok(links[0].take())
}

/// `address:port`, bracketed for IPv6: how `lb` names a VIP.
pub fn endpoint(address: &str, port: u16) -> String {
    if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") }
}

/// Whether an interface in a namespace runs an XDP program (any mode).
pub fn runs_xdp(ns: &str, iface: &str) -> anyhow::Result<bool> {
    Ok(!link(ns, iface)?["xdp"].is_null())
}

/// A MAC address of an interface in a namespace.
pub fn mac(ns: &str, iface: &str) -> anyhow::Result<[u8; 6]> {
    let link = link(ns, iface)?;
    let text = link["address"].as_str().context("no MAC")?;
    let bytes: Vec<u8> =
        text.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("odd MAC {text}"))
}

/// Runs a command, failing with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let output =
        Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(output)
}

/// A testbed that exists until dropped (or until `down` for one left by a crash).
pub struct Testbed {
    pub prefix: String,
    pub backends: usize,
}

impl Testbed {
    pub fn client(&self) -> String {
        format!("{}client", self.prefix)
    }
    pub fn balancer(&self) -> String {
        format!("{}lb", self.prefix)
    }
    pub fn backend(&self, index: usize) -> String {
        format!("{}b{index}", self.prefix)
    }
    fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }
    fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.client(), self.balancer(), self.switch()];
        all.extend((1..=self.backends).map(|i| self.backend(i)));
        all
    }

    /// Creates the topology, replacing any left over under the same prefix.
    pub fn up(prefix: &str, backends: usize) -> anyhow::Result<Self> {
        let testbed = Self { prefix: prefix.to_owned(), backends };
        down(prefix);
        testbed.build().inspect_err(|_| down(prefix))?;
        Ok(testbed)
    }

    fn build(&self) -> anyhow::Result<()> {
        for ns in self.namespaces() {
            add(&ns)?;
        }
        let switch = self.switch();
        add_bridge(&switch)?;

        let mut hosts = vec![
            (self.client(), "client".to_owned(), CLIENT4.to_owned(), CLIENT6.to_owned()),
            (
                self.balancer(),
                "lb".to_owned(),
                "198.18.0.2".to_owned(),
                "fd00:198:18::2".to_owned(),
            ),
        ];
        for index in 1..=self.backends {
            hosts.push((
                self.backend(index),
                format!("b{index}"),
                backend4(index),
                backend6(index),
            ));
        }
        for (ns, port, v4, v6) in &hosts {
            join_switch(&switch, ns, port, &[format!("{v4}/24"), format!("{v6}/64")])?;
        }
        // The balancer must never route: any reply a client gets came straight
        // from a backend.
        sysctl(&self.balancer(), "net.ipv4.ip_forward=0")?;
        sysctl(&self.balancer(), "net.ipv6.conf.all.forwarding=0")?;
        // The balancer transmits with XDP_TX, and so does the generator on the client.
        pass_xdp(&switch, &["lb", "client"])?;
        ip(&self.client(), &["route", "add", &format!("{VIP4}/32"), "via", "198.18.0.2"])?;
        ip(
            &self.client(),
            &["-6", "route", "add", &format!("{VIP6}/128"), "via", "fd00:198:18::2"],
        )?;
        for index in 1..=self.backends {
            own_vips(&self.backend(index))?;
        }
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        down(&self.prefix);
    }
}

/// Creates namespace `ns` with its loopback up.
pub fn add(ns: &str) -> anyhow::Result<()> {
    run("ip", &["netns", "add", ns])?;
    ip(ns, &["link", "set", "lo", "up"])?;
    // No duplicate address detection on links made from here on: a
    // tentative link-local address stalls IPv6 neighbour discovery for
    // the first second, which failed the first IPv6 connection of a test.
    for key in ["net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"] {
        sysctl(ns, &format!("{key}=0"))?;
    }
    Ok(())
}

/// Creates the bridge `br0` in namespace `switch`, for [`join_switch`].
pub fn add_bridge(switch: &str) -> anyhow::Result<()> {
    ip(switch, &["link", "add", "br0", "type", "bridge"])?;
    ip(switch, &["link", "set", "br0", "up"]).map(|_| ())
}

/// Runs the XDP_PASS program on the bridge ports `ports` of namespace
/// `switch`: veth hands XDP_TX frames only to a peer running XDP itself.
pub fn pass_xdp(switch: &str, ports: &[impl AsRef<str>]) -> anyhow::Result<()> {
    // The kernel keeps the program; the object file is only read here.
    let object = tempfile::Builder::new().suffix(".o").tempfile()?;
    std::fs::write(object.path(), lb_userspace::datapath::PEER_PASS_OBJECT)?;
    let path = object.path().to_str().context("temp path is not UTF-8")?;
    for port in ports {
        ip(switch, &["link", "set", "dev", port.as_ref(), "xdp", "obj", path, "sec", "xdp"])?;
    }
    Ok(())
}

/// Direct server return: backend namespace `ns` owns the VIPs on `lo` but
/// must not answer ARP for them.
pub fn own_vips(ns: &str) -> anyhow::Result<()> {
    ip(ns, &["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
    ip(ns, &["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
    sysctl(ns, "net.ipv4.conf.all.arp_ignore=1")?;
    sysctl(ns, "net.ipv4.conf.all.arp_announce=2")
}

/// Plugs namespace `ns` into the bridge `br0` of namespace `switch`: a veth
/// named LB_IFACE in `ns` (with `addresses`, IPv6 ones without duplicate
/// address detection) whose peer `port` joins the bridge.
pub fn join_switch(switch: &str, ns: &str, port: &str, addresses: &[String]) -> anyhow::Result<()> {
    run(
        "ip",
        &[
            "link", "add", LB_IFACE, "netns", ns, "type", "veth", "peer", "name", port, "netns",
            switch,
        ],
    )?;
    ip(switch, &["link", "set", port, "master", "br0", "up"])?;
    for address in addresses {
        let mut args = vec!["addr", "add", address, "dev", LB_IFACE];
        if address.contains(':') {
            args.push("nodad");
        }
        ip(ns, &args)?;
    }
    ip(ns, &["link", "set", LB_IFACE, "up"])?;
    // veth leaves checksums to "hardware" that does not exist; frames a
    // balancer bounces back out with XDP_TX would reach backends with
    // partial checksums. The sender's stack must fill them in.
    run("ip", &["netns", "exec", ns, "ethtool", "-K", LB_IFACE, "tx", "off"])?;
    Ok(())
}

/// Sets one sysctl (`key=value`) in namespace `ns`.
pub fn sysctl(ns: &str, setting: &str) -> anyhow::Result<()> {
    run("ip", &["netns", "exec", ns, "sysctl", "-qw", setting]).map(|_| ())
}

/// `ip -n NS args...`, failing with its stderr.
pub fn ip(ns: &str, args: &[&str]) -> anyhow::Result<Output> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Removes every namespace under `prefix`, whatever state it is in, and
/// kills what still runs in it (a deleted namespace lives on with its processes).
pub fn down(prefix: &str) {
    for ns in list(prefix) {
        if let Ok(output) = Command::new("ip").args(["netns", "pids", &ns]).output() {
            for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse() {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
    }
}

/// Namespaces that exist under `prefix`.
pub fn list(prefix: &str) -> Vec<String> {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}
