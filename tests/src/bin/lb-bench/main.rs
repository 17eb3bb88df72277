//! `cargo xtask bench`: every figure is a ratio measured in the same run.
//! One module per section:
//!
//! 1. `costs`: per-packet cost of each datapath path against the XDP_TX floor.
//! 2. `forwarding`: forwarded packets per second against a reflector and
//!    nftables DNAT.
//! 3. `control`: rebuilding and installing Maglev tables.
//! 4. `connections`: connection rate and memory against HAProxy.
//! 5. `fleet`: three balancers on one etcd store, 100 VIPs x 100 backends.
//!
//! `report` holds the targets and the chart. Writes a table to the terminal,
//! target/bench/results.json and target/bench/throughput.svg.

mod bench_harness;
mod connections;
mod control;
mod costs;
mod fleet;
mod forwarding;
mod hostile_costs;
mod program_size;
mod report;
mod rig;
mod tunnel_costs;
mod two_cpus;

use std::net::IpAddr;
use std::path::Path;

use anyhow::bail;
use serde::Serialize;

use connections::{ConnectionRow, print_connections};
use control::ControlRow;
use costs::{CostRow, RUNS, per_packet_costs, print_costs};
use forwarding::{ThroughputRow, print_throughput, throughput};
use program_size::{ProgramSize, print_program_size, program_size};
use report::{Target, chart, targets};

/// An address in the bench's code (always valid).
fn ip(text: &str) -> IpAddr {
    text.parse().expect("bench address")
}

#[derive(Serialize)]
struct Results {
    /// The balancer program's size as loaded (section 1).
    program: Option<ProgramSize>,
    per_packet: Vec<CostRow>,
    throughput: Vec<ThroughputRow>,
    connections: Vec<ConnectionRow>,
    /// The running daemon's cost under each scheduler (section 4's setup).
    schedulers: Vec<control::SchedulerRow>,
    control_plane: Vec<ControlRow>,
    fleet: Option<fleet::FleetRow>,
    targets: Vec<Target>,
    notes: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    if !tests::is_root() {
        bail!(
            "the bench loads XDP programs and creates namespaces: run it as root (cargo xtask bench)"
        );
    }
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out_dir)?;

    // `lb-bench [costs|throughput|connections|control|fleet]` runs one section (for quick looks);
    // with no argument, everything.
    let only = std::env::args().nth(1);
    let wanted = |section: &str| only.as_deref().is_none_or(|only| only == section);
    let mut per_packet = Vec::new();
    let mut program = None;
    if wanted("costs") {
        println!("== 1. Per-packet cost (BPF_PROG_TEST_RUN, median of {RUNS} runs)");
        // The size does not depend on the maps' sizes: load small ones.
        let balancer = costs::balancer(costs::config(Some(4_096), false))?;
        let size = program_size(balancer.datapath().program())?;
        print_program_size(&size);
        program = Some(size);
        // On a thread of its own: it pins itself to one CPU.
        per_packet = std::thread::spawn(per_packet_costs)
            .join()
            .map_err(|_| anyhow::anyhow!("per-packet thread panicked"))??;
        print_costs(&per_packet);
    }
    let mut throughput_rows = Vec::new();
    if wanted("throughput") {
        println!("\n== 2. Forwarded packets per second (point-to-point veth, XDP live frames)");
        throughput_rows = throughput()?;
        print_throughput(&throughput_rows);
    }
    let throughput = throughput_rows;
    let (mut connections, mut schedulers) = (Vec::new(), Vec::new());
    if wanted("connections") {
        println!("\n== 4. Connections: rate and memory, against HAProxy (TCP mode)");
        (connections, schedulers) = connections::connections()?;
        print_connections(&connections);
        println!("\n   The daemon per scheduler (every VIP), holding the connections, with churn:");
        for row in &schedulers {
            println!(
                "   {:<18} {:>7} flows held: {:>5.1} tables/s, daemon CPU {:>5.1}% of a core, churn {:>6.0} conn/s",
                row.scheduler,
                row.flows_held,
                row.tables_per_second,
                row.daemon_cpu_percent,
                row.connections_per_second
            );
        }
    }
    let mut control_plane = Vec::new();
    if wanted("control") {
        println!("\n== 3. Control plane: rebuild and install one 65,537-entry table");
        control_plane = control::control_plane()?;
    }
    for row in &control_plane {
        println!(
            "{:>6} backends: build {:>7.2} ms, rebuild + install {:>7.2} ms, least-connections reschedule (one emptied) {:>7.2} ms",
            row.backends,
            row.build_ms,
            row.rebuild_and_install_ms,
            row.least_connections_reschedule_ms
        );
    }

    let mut fleet_row = None;
    if wanted("fleet") {
        println!("\n== 5. Fleet store: 3 balancers, one 3-member etcd, 100 VIPs x 100 backends");
        let row = fleet::fleet()?;
        fleet::print_fleet(&row);
        fleet_row = Some(row);
    }

    let mut targets = targets(&per_packet, &throughput, &connections, &control_plane);
    targets.extend(fleet_row.iter().flat_map(fleet::targets));
    println!("\n== Targets");
    for target in &targets {
        println!(
            "{} {:<60} {}",
            if target.met { "MET   " } else { "MISSED" },
            target.target,
            target.measured
        );
    }
    let results = Results {
        program,
        per_packet,
        throughput,
        connections,
        schedulers,
        control_plane,
        fleet: fleet_row,
        targets,
        notes: vec![
            "New-flow rows go through bench_new_flow, which writes a fresh source port and tail-calls the balancer; its own cost (measured by tail-calling XDP_DROP) is subtracted.".into(),
            "Throughput: the generator and the system under test share the machine's cores, so absolute figures are lower than on dedicated hardware; compare ratios. The veth pair has one queue per CPU, and each CPU's generator sends its own flows, so each core runs its own generator and its own balancer.".into(),
            "nftables DNAT runs on its own core (RPS to CPU 1) while lb and the reflector share the generator's core: the comparison is tilted against lb.".into(),
            "Connections: HAProxy cannot hold 100k concurrent connections here: a proxy needs two descriptors per connection and this machine caps a process at 20,000.".into(),
        ],
    };
    std::fs::write(out_dir.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    chart(&results.throughput, &out_dir.join("throughput.svg"))?;
    println!("\nwrote {0}/results.json and {0}/throughput.svg", out_dir.display());
    Ok(())
}
