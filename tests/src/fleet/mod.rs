//! The multi-balancer testbed: a client behind a router that spreads VIP
//! traffic over N balancers by ECMP (L4 hash), learned over BGP with BFD
//! from BIRD on each balancer, and backends on the balancers' L2 segment.
//! BIRD runs with the configurations in scripts/bird/, which
//! docs/scale-out.md documents. Used by tests/tests/fleet.rs, `cargo xtask
//! run --balancers N` and `scripts/testbed.sh up --balancers N`. Its files
//! (sync key, BIRD configurations, sockets and logs, each daemon's socket,
//! state and log) are in `/run/lb-testbed/PREFIX/`.
//!
//! ```text
//! client 198.19.0.1 ── 198.19.0.254 router 198.18.0.254 ──┐ switch (br0)
//!   fd00:198:18:1::1   fd00:198:18:1::fe    fd00:198:18::fe │
//!                   lb i: 198.18.0.(1+i), fd00:198:18::(1+i) ─┤ (eth0, XDP)
//!       backend j: 198.18.0.(100+j), fd00:198:18::(100+j), the VIPs on lo
//! ```
//! Replies go from the backends straight to the router (direct server return).
//! [`Fleet::route_backends`] moves the backends behind the router instead,
//! for tunnelled VIPs; [`Fleet::narrow_client_path`] narrows the client's link.

mod bird;
mod paths;

pub use paths::{routed_backend_address, routed_backend_address6};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::harness::{Daemon, Process, spawn_in};
use crate::netns::{add_bridge, ip, join_switch, own_vips, pass_xdp, run, sysctl};

pub const ROUTER_LAN: &str = "198.18.0.254";
pub const ROUTER_LAN6: &str = "fd00:198:18::fe";
pub const ROUTER_CLIENT_SIDE: &str = "198.19.0.254";
pub const ROUTER_CLIENT_SIDE6: &str = "fd00:198:18:1::fe";
pub const CLIENT: &str = "198.19.0.1";
pub const CLIENT6: &str = "fd00:198:18:1::1";
/// The table `lb run --announce-table` publishes VIPs in.
pub const ANNOUNCE_TABLE: &str = "100";
/// Where each fleet keeps its files, in a directory named by its prefix.
const FILES_ROOT: &str = "/run/lb-testbed";

pub fn balancer_address(index: usize) -> String {
    format!("198.18.0.{}", 1 + index)
}

pub fn balancer_address6(index: usize) -> String {
    format!("fd00:198:18::{}", 1 + index)
}

pub fn backend_address(index: usize) -> String {
    format!("198.18.0.{}", 100 + index)
}

pub fn backend_address6(index: usize) -> String {
    format!("fd00:198:18::{}", 100 + index)
}

/// The topology and its BIRD processes; everything is removed on drop.
pub struct Fleet {
    pub prefix: String,
    pub balancers: usize,
    pub backends: usize,
    /// BIRD per namespace, killed on drop or by [`Fleet::stop_bird`].
    pub(crate) birds: BTreeMap<String, Process>,
    /// The fleet's files (removed on drop).
    pub files: PathBuf,
    /// The fleet's sync key (mode 0600).
    pub key_file: PathBuf,
    /// The flow-hash seed every balancer is given (random per fleet).
    pub hash_seed: u32,
}

impl Fleet {
    pub fn client(&self) -> String {
        format!("{}client", self.prefix)
    }
    pub fn router(&self) -> String {
        format!("{}router", self.prefix)
    }
    pub fn balancer(&self, index: usize) -> String {
        format!("{}lb{index}", self.prefix)
    }
    pub fn backend(&self, index: usize) -> String {
        format!("{}b{index}", self.prefix)
    }
    pub(crate) fn switch(&self) -> String {
        format!("{}sw", self.prefix)
    }

    /// Builds the topology and starts BIRD on the router (balancers' BIRD
    /// start with [`Fleet::start_bird`], once their `lb run` is up).
    pub fn up(prefix: &str, balancers: usize, backends: usize) -> anyhow::Result<Self> {
        down(prefix);
        let files = Path::new(FILES_ROOT).join(prefix);
        std::fs::create_dir_all(&files)?;
        std::fs::set_permissions(&files, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let key_file = files.join("sync.key");
        let key: [u8; 32] = rand::random();
        let hex: String = key.iter().map(|byte| format!("{byte:02x}")).collect();
        std::fs::write(&key_file, hex + "\n")?;
        std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let mut fleet = Self {
            prefix: prefix.to_owned(),
            balancers,
            backends,
            birds: BTreeMap::new(),
            files,
            key_file,
            hash_seed: rand::random(),
        };
        fleet.build().inspect_err(|_| down(prefix))?;
        let router = fleet.router();
        fleet.start_bird(&router)?;
        Ok(fleet)
    }

    fn build(&self) -> anyhow::Result<()> {
        let mut namespaces = vec![self.client(), self.router(), self.switch()];
        namespaces.extend((1..=self.balancers).map(|i| self.balancer(i)));
        namespaces.extend((1..=self.backends).map(|i| self.backend(i)));
        for ns in &namespaces {
            crate::netns::add(ns)?;
        }
        let switch = self.switch();
        add_bridge(&switch)?;

        // Client <-> router, point to point.
        let (client, router) = (self.client(), self.router());
        veth_pair((&client, "eth0"), (&router, "eth1"), 1500)?;
        link_up(&client, "eth0", CLIENT, CLIENT6)?;
        link_up(&router, "eth1", ROUTER_CLIENT_SIDE, ROUTER_CLIENT_SIDE6)?;
        default_via(&client, ROUTER_CLIENT_SIDE, ROUTER_CLIENT_SIDE6)?;

        // Everyone else on the switch.
        let mut lan = vec![(
            router.clone(),
            "router".to_owned(),
            [ROUTER_LAN, ROUTER_LAN6].map(str::to_owned),
        )];
        lan.extend((1..=self.balancers).map(|i| {
            (self.balancer(i), format!("lb{i}"), [balancer_address(i), balancer_address6(i)])
        }));
        lan.extend((1..=self.backends).map(|i| {
            (self.backend(i), format!("b{i}"), [backend_address(i), backend_address6(i)])
        }));
        for (ns, port, [v4, v6]) in &lan {
            join_switch(&switch, ns, port, &[format!("{v4}/24"), format!("{v6}/64")])?;
        }
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ] {
            sysctl(&router, key)?;
        }
        for index in 1..=self.balancers {
            let ns = self.balancer(index);
            // A balancer never routes: every reply comes straight from a backend.
            sysctl(&ns, "net.ipv4.ip_forward=0")?;
            sysctl(&ns, "net.ipv6.conf.all.forwarding=0")?;
        }
        // Balancers transmit with XDP_TX.
        let ports: Vec<String> = (1..=self.balancers).map(|index| format!("lb{index}")).collect();
        pass_xdp(&switch, &ports)?;
        for index in 1..=self.backends {
            let ns = self.backend(index);
            own_vips(&ns)?;
            default_via(&ns, ROUTER_LAN, ROUTER_LAN6)?;
        }
        Ok(())
    }

    /// The `lb run` arguments that make balancer `index` part of the fleet:
    /// the fleet's hash seed, sync with every other balancer (unless `sync`
    /// is false) and announce.
    pub fn lb_args(&self, index: usize, sync: bool) -> Vec<String> {
        let mut args = vec![
            "--announce-table".to_owned(),
            ANNOUNCE_TABLE.to_owned(),
            "--hash-seed".to_owned(),
            self.hash_seed.to_string(),
        ];
        if sync {
            args.extend(self.sync_args(index));
        }
        args
    }

    /// Flow sync of balancer `index` with every other balancer, as
    /// docs/scale-out.md shows it.
    pub fn sync_args(&self, index: usize) -> Vec<String> {
        let mut args = vec![
            "--sync-listen".to_owned(),
            format!("{}:9470", balancer_address(index)),
            "--sync-key-file".to_owned(),
            self.key_file.display().to_string(),
        ];
        for peer in (1..=self.balancers).filter(|peer| *peer != index) {
            args.extend(["--sync-peer".to_owned(), balancer_address(peer)]);
        }
        args
    }

    /// A WebSocket server on `port` in every backend (answering b1, b2, ...),
    /// each stopping after `seconds`.
    pub fn ws_servers(&self, port: u16, seconds: u64) -> anyhow::Result<Vec<Process>> {
        let (port, seconds) = (port.to_string(), seconds.to_string());
        (1..=self.backends)
            .map(|index| {
                let name = format!("b{index}");
                let args = ["ws-serve", &name, &port, &seconds];
                spawn_in(&self.backend(index), &crate::harness::testbed_binary(), &args, None)
            })
            .collect()
    }

    /// Starts `lb run` on balancer `index` with [`Fleet::lb_args`], its
    /// files among the fleet's.
    pub fn start_lb(&self, index: usize, sync: bool) -> anyhow::Result<Daemon> {
        let args = self.lb_args(index, sync);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_named(&self.balancer(index), &self.files, &args)
    }

    /// Cuts balancer `index` off the switch, as a dead machine would be.
    pub fn cut_link(&self, index: usize) -> anyhow::Result<()> {
        ip(&self.switch(), &["link", "del", &format!("lb{index}")]).map(|_| ())
    }

    /// Leaves the fleet up, BIRD running, for `lb-testbed down` to remove.
    pub fn detach(mut self) {
        for (_, bird) in std::mem::take(&mut self.birds) {
            std::mem::forget(bird);
        }
        std::mem::forget(self);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.birds.clear();
        down(&self.prefix);
    }
}

/// Waits until each of `daemons` has received every flow the others reported.
pub fn wait_synced(daemons: &[&Daemon]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (mut reported, mut received) = (0, 0);
        for daemon in daemons {
            let sync = &daemon.json(&["stats"])?["sync"];
            reported += sync["flows_reported"].as_u64().unwrap_or(0);
            received += sync["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|peer| peer["flows_received"].as_u64().unwrap_or(0))
                .sum::<u64>();
        }
        // Every flow goes to every other balancer.
        let want = reported * (daemons.len() as u64).saturating_sub(1);
        if reported > 0 && received >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("sync did not catch up: {received} flows received of {want}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes a fleet (or a single-balancer testbed) under `prefix`, whatever
/// state it is in: its processes, namespaces, daemons' pins and files.
pub fn down(prefix: &str) {
    crate::netns::down(prefix);
    crate::harness::remove_pins(prefix);
    let _ = std::fs::remove_dir_all(Path::new(FILES_ROOT).join(prefix));
}

/// A veth pair of `mtu` bytes from interface `left.1` in namespace `left.0`
/// to `right.1` in `right.0`.
pub(crate) fn veth_pair(left: (&str, &str), right: (&str, &str), mtu: u32) -> anyhow::Result<()> {
    let mtu = mtu.to_string();
    let args = [
        "link", "add", left.1, "netns", left.0, "mtu", &mtu, "type", "veth", "peer", "name",
        right.1, "netns", right.0, "mtu", &mtu,
    ];
    run("ip", &args).map(|_| ())
}

/// Gives `iface` in `ns` its addresses (a /24 and a /64) and brings it up.
pub(crate) fn link_up(ns: &str, iface: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ip(ns, &["addr", "add", &format!("{v4}/24"), "dev", iface])?;
    ip(ns, &["addr", "add", &format!("{v6}/64"), "dev", iface, "nodad"])?;
    ip(ns, &["link", "set", iface, "up"]).map(|_| ())
}

/// Default routes of `ns` via `v4` and `v6`.
pub(crate) fn default_via(ns: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ip(ns, &["route", "add", "default", "via", v4])?;
    ip(ns, &["-6", "route", "add", "default", "via", v6]).map(|_| ())
}
