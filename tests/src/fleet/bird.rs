//! BIRD in the fleet: the router's and each balancer's configuration from
//! scripts/bird/ (docs/scale-out.md), BIRD's processes, and what the
//! router's routes to a VIP say.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{ANNOUNCE_TABLE, Fleet, ROUTER_LAN, ROUTER_LAN6, balancer_address, balancer_address6};
use crate::harness::spawn_in;
use crate::netns::{LB_IFACE, ip};

const ROUTER_AS: &str = "65000";
const BALANCER_AS: &str = "65001";
const BALANCER_CONF: &str = include_str!("../../../scripts/bird/balancer.conf");
const ROUTER_CONF: &str = include_str!("../../../scripts/bird/router.conf");

impl Fleet {
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
}

fn fill(template: &str, values: &[(&str, &str)]) -> String {
    values.iter().fold(template.to_owned(), |text, (name, value)| text.replace(name, value))
}

fn text(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("temp path is not UTF-8")
}
