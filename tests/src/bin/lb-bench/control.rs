//! Section 3: the control plane: building and installing a 65,537-entry
//! Maglev table for 10, 100 and 1,000 backends, by weight (maglev) and as
//! least-connections reschedules it after a count, with one backend emptied.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use lb_userspace::model::{DatapathConfig, HealthMap, Protocol, Scheduler, Vip};
use lb_userspace::reconcile::FlowCounts;
use serde::Serialize;

use crate::costs::RUNS;

#[derive(Serialize)]
pub struct ControlRow {
    pub backends: u32,
    pub build_ms: f64,
    pub rebuild_and_install_ms: f64,
    /// Least-connections: rescheduling after a count (the weights from the
    /// counts, then a rebuild and install) with one backend emptied, as
    /// after a rolling restart: the most skewed weights, the slowest build.
    pub least_connections_reschedule_ms: f64,
}

pub fn control_plane() -> anyhow::Result<Vec<ControlRow>> {
    let mut rows = Vec::new();
    for backends in [10u32, 100, 1000] {
        let config = DatapathConfig {
            max_vips: 2,
            max_backends: 1100,
            flow_table_size: 1024,
            ..DatapathConfig::default()
        };
        let addresses: Vec<IpAddr> = (0..backends)
            .map(|index| IpAddr::from([198, 19, (index / 250) as u8, (index % 250 + 1) as u8]))
            .collect();
        let (mut reconciler, mut desired) = tests::fixture::balancer(
            config,
            &[("198.18.0.10:80", Protocol::Tcp, &addresses)],
            |address| match address {
                IpAddr::V4(v4) => [0x02, 0, 0, v4.octets()[2], v4.octets()[3], 1],
                IpAddr::V6(_) => [0x02, 0, 0, 0, 0, 1],
            },
        )?;
        let vip = Vip::new("198.18.0.10:80".parse()?, Protocol::Tcp);
        let candidates: Vec<lb_userspace::maglev::Candidate> = addresses
            .iter()
            .map(|address| lb_userspace::maglev::Candidate { address: *address, weight: 1 })
            .collect();
        let mut builds = Vec::new();
        let mut installs = Vec::new();
        for round in 0..RUNS {
            let start = Instant::now();
            std::hint::black_box(lb_userspace::maglev::build_table(&candidates, config.table_size));
            builds.push(start.elapsed().as_secs_f64() * 1e3);
            // Alternate a weight so every round really rebuilds and installs.
            let address = candidates[0].address;
            desired.set_weight(&vip, address, if round % 2 == 0 { 2 } else { 1 })?;
            std::thread::sleep(Duration::from_millis(10)); // past the slot quiet time
            let start = Instant::now();
            reconciler.apply(&desired, &HealthMap::new())?;
            installs.push(start.elapsed().as_secs_f64() * 1e3);
        }
        desired.set_weight(&vip, candidates[0].address, 1)?;
        desired.set_scheduling(&vip, None, Some(Scheduler::LeastConnections))?;
        let slots: Vec<u32> = reconciler.backends(&vip).iter().map(|b| b.slot).collect();
        let mut reschedules = Vec::new();
        let count = |reconciler: &mut lb_userspace::reconcile::Reconciler, emptied: bool| {
            let active = slots
                .iter()
                .enumerate()
                .map(|(index, slot)| (*slot, if emptied && index == 0 { 0 } else { 1_000 }))
                .collect();
            let active = std::sync::Arc::new(active);
            reconciler.set_flow_counts(FlowCounts {
                active,
                recently_confirmed: 0,
                closing: Default::default(),
            });
        };
        for _ in 0..RUNS {
            // Timed: from even counts to backend 0 emptied, the most skewed
            // weights. Untimed: back to even, so that the next count changes.
            count(&mut reconciler, false);
            std::thread::sleep(Duration::from_millis(10)); // past the slot quiet time
            reconciler.apply(&desired, &HealthMap::new())?;
            count(&mut reconciler, true);
            std::thread::sleep(Duration::from_millis(10));
            let built = reconciler.tables_built();
            let start = Instant::now();
            reconciler.apply(&desired, &HealthMap::new())?;
            reschedules.push(start.elapsed().as_secs_f64() * 1e3);
            anyhow::ensure!(reconciler.tables_built() == built + 1, "the count changed no table");
        }
        let emptied = reconciler.backends(&vip)[0].table_entries;
        // The emptied backend is owed 1,000 flows of the horizon (a tenth
        // of those open): most of the table with 10 backends, a tenth with 1,000.
        anyhow::ensure!(
            f64::from(emptied) > 5.0 * f64::from(config.table_size) / f64::from(backends),
            "the emptied backend got only {emptied} entries"
        );
        for times in [&mut builds, &mut installs, &mut reschedules] {
            times.sort_by(f64::total_cmp);
        }
        rows.push(ControlRow {
            backends,
            build_ms: builds[RUNS / 2],
            rebuild_and_install_ms: installs[RUNS / 2],
            least_connections_reschedule_ms: reschedules[RUNS / 2],
        });
    }
    Ok(rows)
}

/// The running daemon's cost per scheduler: every VIP under one scheduler
/// while 100,000 WebSockets are held and short connections churn one VIP.
#[derive(Serialize)]
pub struct SchedulerRow {
    pub scheduler: String,
    pub flows_held: u64,
    pub seconds: f64,
    /// Maglev tables built and installed per second (`tables_built`).
    pub tables_per_second: f64,
    /// The daemon's CPU time over the wall time, all threads (the counting
    /// walk included), in percent of one core.
    pub daemon_cpu_percent: f64,
    /// The churn itself: new connections per second through the balancer.
    pub connections_per_second: f64,
}

/// User plus system CPU seconds of process `pid`, all threads.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime
    // are the 12th and 13th.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks =
        |index: usize| fields.get(index).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |hz| hz as f64);
    (ticks(11) + ticks(12)) / per_second
}

/// Measures the daemon under each scheduler in turn (`lb vip set` on every
/// VIP in `vips`), while `connection_rate` churns `churn_target`.
pub fn scheduler_cost(
    testbed: &tests::netns::Testbed,
    daemon: &tests::harness::Daemon,
    vips: &[String],
    churn_target: &str,
    flows_held: u64,
) -> anyhow::Result<Vec<SchedulerRow>> {
    let pid = daemon.process.as_ref().map_or(0, |process| process.0.id());
    let mut rows = Vec::new();
    for scheduler in ["maglev", "least-connections"] {
        for vip in vips {
            daemon.lb(&["vip", "set", vip, "--scheduler", scheduler])?;
        }
        std::thread::sleep(Duration::from_secs(2)); // the switch's own rebuilds
        let tables = |daemon: &tests::harness::Daemon| -> anyhow::Result<u64> {
            Ok(daemon.json(&["stats"])?["tables_built"].as_u64().unwrap_or(0))
        };
        let (tables_before, cpu_before, start) =
            (tables(daemon)?, cpu_seconds(pid), Instant::now());
        let (rate, _) = crate::connections::connection_rate(testbed, churn_target)?;
        let seconds = start.elapsed().as_secs_f64();
        let (tables_after, cpu_after) = (tables(daemon)?, cpu_seconds(pid));
        rows.push(SchedulerRow {
            scheduler: scheduler.into(),
            flows_held,
            seconds,
            tables_per_second: (tables_after - tables_before) as f64 / seconds,
            daemon_cpu_percent: (cpu_after - cpu_before) / seconds * 100.0,
            connections_per_second: rate,
        });
    }
    Ok(rows)
}
