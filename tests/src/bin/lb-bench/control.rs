//! Section 3: the control plane: building and installing a 65,537-entry
//! Maglev table for 10, 100 and 1,000 backends.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use lb_userspace::model::{DatapathConfig, HealthMap, Protocol, Vip};
use serde::Serialize;

use crate::costs::RUNS;

#[derive(Serialize)]
pub struct ControlRow {
    pub backends: u32,
    pub build_ms: f64,
    pub rebuild_and_install_ms: f64,
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
        builds.sort_by(f64::total_cmp);
        installs.sort_by(f64::total_cmp);
        rows.push(ControlRow {
            backends,
            build_ms: builds[RUNS / 2],
            rebuild_and_install_ms: installs[RUNS / 2],
        });
    }
    Ok(rows)
}
