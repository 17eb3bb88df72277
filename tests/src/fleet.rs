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

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::harness::{Daemon, Process, spawn_in};
use crate::netns::{LB_IFACE, add_bridge, ip, join_switch, own_vips, pass_xdp, run, sysctl};

pub const ROUTER_LAN: &str = "198.18.0.254";
pub const ROUTER_LAN6: &str = "fd00:198:18::fe";
pub const ROUTER_CLIENT_SIDE: &str = "198.19.0.254";
pub const ROUTER_CLIENT_SIDE6: &str = "fd00:198:18:1::fe";
pub const CLIENT: &str = "198.19.0.1";
pub const CLIENT6: &str = "fd00:198:18:1::1";
/// The table `lb run --announce-table` publishes VIPs in.
pub const ANNOUNCE_TABLE: &str = "100";

/// The client behind [`Fleet::narrow_client_path`], and the second router's
/// addresses on its two links.
pub const NARROW_CLIENT: &str = "198.19.1.1";
pub const NARROW_CLIENT6: &str = "fd00:198:18:2::1";
const MIDDLE_CLIENT_SIDE: &str = "198.19.1.254";
const MIDDLE_CLIENT_SIDE6: &str = "fd00:198:18:2::fe";
const MIDDLE_ROUTER_SIDE: &str = "198.19.0.253";
const MIDDLE_ROUTER_SIDE6: &str = "fd00:198:18:1::fd";
const ROUTER_AS: &str = "65000";
const BALANCER_AS: &str = "65001";
const BALANCER_CONF: &str = include_str!("../../scripts/bird/balancer.conf");
const ROUTER_CONF: &str = include_str!("../../scripts/bird/router.conf");
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
    birds: BTreeMap<String, Process>,
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

    /// Writes the namespace's BIRD configuration and starts BIRD there.
    pub fn start_bird(&mut self, ns: &str) -> anyhow::Result<()> {
        self.stop_bird(ns);
        let config = if ns == self.router() {
            let peers: String = (1..=self.balancers)
                .map(|i| {
                    format!(
                        "protocol bgp lb{i}_4 from balancer4 {{ neighbor {} as {BALANCER_AS}; }}\n\
                         protocol bgp lb{i}_6 from balancer6 {{ neighbor {} as {BALANCER_AS}; }}\n",
                        balancer_address(i),
                        balancer_address6(i)
                    )
                })
                .collect();
            fill(
                ROUTER_CONF,
                &[
                    ("@ROUTER_ID@", ROUTER_LAN),
                    ("@LOCAL_AS@", ROUTER_AS),
                    ("@IFACE@", LB_IFACE),
                    ("@PEERS@", &peers),
                ],
            )
        } else {
            let index: usize = ns
                .strip_prefix(&format!("{}lb", self.prefix))
                .and_then(|index| index.parse().ok())
                .with_context(|| format!("{ns} is not a balancer of this fleet"))?;
            fill(
                BALANCER_CONF,
                &[
                    ("@ROUTER_ID@", &balancer_address(index)),
                    ("@ADDRESS4@", &balancer_address(index)),
                    ("@ADDRESS6@", &balancer_address6(index)),
                    ("@LOCAL_AS@", BALANCER_AS),
                    ("@ROUTER4@", ROUTER_LAN),
                    ("@ROUTER6@", ROUTER_LAN6),
                    ("@ROUTER_AS@", ROUTER_AS),
                    ("@IFACE@", LB_IFACE),
                    ("@TABLE@", ANNOUNCE_TABLE),
                ],
            )
        };
        let path = |suffix: &str| self.files.join(format!("{ns}.bird.{suffix}"));
        std::fs::write(path("conf"), config)?;
        let (conf, socket, log) = (path("conf"), path("ctl"), path("log"));
        let args = ["-f", "-c", text(&conf)?, "-s", text(&socket)?];
        let bird = spawn_in(ns, Path::new("bird"), &args, Some(&log))?;
        self.birds.insert(ns.to_owned(), bird);
        Ok(())
    }

    /// Kills BIRD in `ns` (its BGP sessions close at once).
    pub fn stop_bird(&mut self, ns: &str) {
        self.birds.remove(ns);
    }

    pub fn bird_log(&self, ns: &str) -> String {
        std::fs::read_to_string(self.files.join(format!("{ns}.bird.log"))).unwrap_or_default()
    }

    /// Cuts balancer `index` off the switch, as a dead machine would be.
    pub fn cut_link(&self, index: usize) -> anyhow::Result<()> {
        ip(&self.switch(), &["link", "del", &format!("lb{index}")]).map(|_| ())
    }

    /// The balancers the router's route to `vip` spreads over.
    pub fn router_next_hops(&self, vip: &str) -> anyhow::Result<Vec<IpAddr>> {
        let (family, length) = if vip.contains(':') { ("-6", 128) } else { ("-4", 32) };
        let prefix = format!("{vip}/{length}");
        let output = ip(&self.router(), &["-j", family, "route", "show", &prefix])?;
        let routes: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let mut hops = Vec::new();
        for route in routes.as_array().into_iter().flatten() {
            let gateways = match route["nexthops"].as_array() {
                Some(nexthops) => nexthops.iter().map(|hop| &hop["gateway"]).collect(),
                None => vec![&route["gateway"]],
            };
            hops.extend(gateways.into_iter().filter_map(|g| g.as_str()?.parse::<IpAddr>().ok()));
        }
        hops.sort();
        Ok(hops)
    }

    /// Waits until the router spreads `vip` over exactly `want` balancers;
    /// returns how long that took.
    pub fn wait_next_hops(&self, vip: &str, want: &[usize]) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let address = if vip.contains(':') { balancer_address6 } else { balancer_address };
        let mut wanted: Vec<IpAddr> =
            want.iter().map(|i| address(*i).parse().expect("an address")).collect();
        wanted.sort();
        loop {
            let hops = self.router_next_hops(vip)?;
            if hops == wanted {
                return Ok(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the router's route to {vip} goes via {hops:?}, not {wanted:?}; router BIRD log:\n{}",
                    self.bird_log(&self.router())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
fn veth_pair(left: (&str, &str), right: (&str, &str), mtu: u32) -> anyhow::Result<()> {
    let mtu = mtu.to_string();
    let args = [
        "link", "add", left.1, "netns", left.0, "mtu", &mtu, "type", "veth", "peer", "name",
        right.1, "netns", right.0, "mtu", &mtu,
    ];
    run("ip", &args).map(|_| ())
}

/// Gives `iface` in `ns` its addresses (a /24 and a /64) and brings it up.
fn link_up(ns: &str, iface: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ip(ns, &["addr", "add", &format!("{v4}/24"), "dev", iface])?;
    ip(ns, &["addr", "add", &format!("{v6}/64"), "dev", iface, "nodad"])?;
    ip(ns, &["link", "set", iface, "up"]).map(|_| ())
}

/// Default routes of `ns` via `v4` and `v6`.
fn default_via(ns: &str, v4: &str, v6: &str) -> anyhow::Result<()> {
    ip(ns, &["route", "add", "default", "via", v4])?;
    ip(ns, &["-6", "route", "add", "default", "via", v6]).map(|_| ())
}

fn fill(template: &str, values: &[(&str, &str)]) -> String {
    values.iter().fold(template.to_owned(), |text, (name, value)| text.replace(name, value))
}

fn text(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("temp path is not UTF-8")
}
