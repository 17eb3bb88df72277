//! Section 5: the fleet store. Three balancers follow one 3-member etcd
//! holding 100 VIPs x 100 backends (every backend resolved, through
//! permanent neighbour entries, so every table really holds 100 backends).
//! Measured: the time from one write (a weight change on balancer 1) to
//! every balancer having installed it, over 100 writes, and the time a
//! balancer takes from its start to having installed all 10,000 backends
//! from the store.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use lb_userspace::api::{self, Body, Reply, Request};
use lb_userspace::model::{Protocol, Vip};
use serde::Serialize;
use tests::fleet::Fleet;
use tests::harness::Daemon;

use crate::report::Target;

const PREFIX: &str = "lbf-";
const VIPS: u16 = 100;
const BACKENDS: u16 = 100;
const WRITES: usize = 100;

#[derive(Serialize)]
pub struct FleetRow {
    pub balancers: usize,
    pub vips: u16,
    pub backends: usize,
    pub writes: usize,
    pub write_to_all_installed_median_ms: f64,
    pub write_to_all_installed_p99_ms: f64,
    /// `lb run` started until it had installed the store's revision.
    pub start_from_store_ms: f64,
}

fn vip(index: u16) -> Vip {
    Vip { address: "fd00:198:18::10".parse().unwrap(), port: 8000 + index, protocol: Protocol::Tcp }
}

fn backend(index: u16) -> IpAddr {
    format!("fd00:198:18::1:{:x}", index + 1).parse().unwrap()
}

/// The store revision `daemon` has installed.
fn applied(daemon: &Daemon) -> anyhow::Result<i64> {
    match api::call(&daemon.socket, &Request::StoreStatus)? {
        Reply::Ok(Body::Store(store)) => Ok(store.applied_revision),
        other => bail!("store status: {other:?}"),
    }
}

fn wait_applied(daemon: &Daemon, revision: i64, within: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while applied(daemon)? < revision {
        ensure!(start.elapsed() < within, "revision {revision} not installed within {within:?}");
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// Fleet settings for 10,000 backends, and a small flow table (three balancers share the host).
const SETTINGS: &str = "max_vips = 128\nmax_backends = 10240\nflow_table_size = 65536\n";

pub fn fleet() -> anyhow::Result<FleetRow> {
    let fleet = Fleet::up(PREFIX, 3, 1)?;
    let etcd = fleet.etcd(3, false)?;
    let settings = fleet.files.join("settings.toml");
    std::fs::write(&settings, SETTINGS)?;
    // The 100 backends serve every VIP (10,000 backend entries), each
    // resolved on every balancer through a permanent neighbour entry.
    let batch = fleet.files.join("neighbours");
    let lines: String = (0..BACKENDS)
        .map(|index| {
            format!(
                "neigh replace {} lladdr 02:00:00:00:{:02x}:{:02x} dev eth0 nud permanent\n",
                backend(index),
                index >> 8,
                index & 0xff
            )
        })
        .collect();
    std::fs::write(&batch, lines)?;
    for index in 1..=3 {
        tests::netns::ip(&fleet.balancer(index), &["-batch", batch.to_str().context("path")?])?;
    }
    let config = ["--config", settings.to_str().context("path")?];
    let first = fleet.start_lb_with_store(1, &etcd, &config)?;

    // 100 VIPs x 100 backends in one `lb config apply` (one transaction).
    // No settings in it: the fleet's (the store's) are used.
    let mut text = String::new();
    for v in 0..VIPS {
        let vip = vip(v);
        text.push_str(&format!(
            "[[vip]]\naddress = \"{}\"\n[vip.check]\ntype = \"none\"\n",
            vip.endpoint()
        ));
        for b in 0..BACKENDS {
            text.push_str(&format!("[[vip.backend]]\naddress = \"{}\"\n", backend(b)));
        }
    }
    let file = fleet.files.join("fleet.toml");
    std::fs::write(&file, text)?;
    let started = Instant::now();
    first.lb(&["config", "apply", file.to_str().context("path")?])?;
    println!("   lb config apply of 100 VIPs x 100 backends: {:.2?}", started.elapsed());
    let revision = applied(&first)?;

    let second = fleet.start_lb_with_store(2, &etcd, &config)?;
    let start = Instant::now();
    let third = fleet.start_lb_with_store(3, &etcd, &config)?;
    wait_applied(&third, revision, Duration::from_secs(60))?;
    let start_from_store = start.elapsed();
    wait_applied(&second, revision, Duration::from_secs(60))?;
    let listed = third.json(&["backend", "list"])?;
    let up = listed.as_array().context("list")?.iter().filter(|b| b["state"] == "up").count();
    println!("   lb3 started from the store in {start_from_store:.2?}; {up} backends up there");
    ensure!(up == usize::from(VIPS * BACKENDS), "only {up} backends up on lb3");

    let daemons = [&first, &second, &third];
    let mut times = Vec::with_capacity(WRITES);
    for write in 0..WRITES {
        let index = u16::try_from(write).unwrap_or(0);
        let request = Request::BackendSet {
            vip: vip(index % VIPS),
            address: backend(index % BACKENDS),
            weight: if write % 2 == 0 { 2 } else { 3 },
        };
        let start = Instant::now();
        match api::call(&first.socket, &request)? {
            Reply::Ok(_) => {}
            other => bail!("write {write}: {other:?}"),
        }
        let revision = applied(&first)?;
        for daemon in daemons {
            wait_applied(daemon, revision, Duration::from_secs(10))?;
        }
        times.push(start.elapsed());
    }
    times.sort();
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    Ok(FleetRow {
        balancers: 3,
        vips: VIPS,
        backends: usize::from(VIPS * BACKENDS),
        writes: WRITES,
        write_to_all_installed_median_ms: ms(times[WRITES / 2]),
        write_to_all_installed_p99_ms: ms(times[WRITES * 99 / 100]),
        start_from_store_ms: ms(start_from_store),
    })
}

pub fn print_fleet(row: &FleetRow) {
    println!(
        "   {} writes, write to installed on all {} balancers: median {:.1} ms, p99 {:.1} ms; start from the store with {} backends: {:.0} ms",
        row.writes,
        row.balancers,
        row.write_to_all_installed_median_ms,
        row.write_to_all_installed_p99_ms,
        row.backends,
        row.start_from_store_ms
    );
}

pub fn targets(row: &FleetRow) -> Vec<Target> {
    vec![
        Target {
            target: "fleet: a write installed on all 3 balancers, p99 under 1 s".into(),
            measured: format!(
                "p99 {:.1} ms (median {:.1} ms)",
                row.write_to_all_installed_p99_ms, row.write_to_all_installed_median_ms
            ),
            met: row.write_to_all_installed_p99_ms < 1_000.0,
        },
        Target {
            target: "fleet: a balancer starts from the store with 10,000 backends under 5 s".into(),
            measured: format!("{:.2} s", row.start_from_store_ms / 1e3),
            met: row.start_from_store_ms < 5_000.0,
        },
    ]
}
