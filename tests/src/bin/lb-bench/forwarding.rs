//! Section 2: forwarded packets per second on a point-to-point veth pair
//! (generator <-> balancer, frames sent back with XDP_TX and counted per
//! backend MAC), against an XDP_TX reflector (the floor) and the kernel
//! forwarding through nftables DNAT; 1 and 2 cores, 1 and 64,000 flows.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use aya::programs::XdpMode;
use aya::{Ebpf, EbpfLoader};
use lb_userspace::datapath::{AttachMode, BENCH_OBJECT, PEER_PASS_OBJECT};
use lb_userspace::model::{DatapathConfig, Protocol, format_mac};
use lb_userspace::reconcile::Reconciler;
use serde::Serialize;
use tests::netns::run;
use tests::packets::{Flow, L4, Segment, Shape, frame};

use crate::costs::xdp;
use crate::ip;
use crate::rig::{
    GEN_IFACE, GEN_NS, Generator, LB_IFACE, LB_NS, Topology, available_cpus, in_netns,
};

#[derive(Serialize)]
pub struct ThroughputRow {
    pub system: String,
    pub cores: usize,
    pub flows: u32,
    pub offered_mpps: f64,
    pub forwarded_mpps: f64,
    /// Frames counted per destination MAC at the receiving end.
    pub arrivals: BTreeMap<String, u64>,
    /// lb only: the share of the frames sent that followed a confirmed
    /// flow-table entry (the datapath's `flow_hit` counter), the proof that
    /// the row measured established flows.
    pub flow_hit_share: Option<f64>,
}

/// Measured blasts per row (after the warm-up); the row gives their median.
const MEASURED_BLASTS: usize = 3;

/// One measured blast of every generator at once.
struct Blast {
    offered_mpps: f64,
    forwarded_mpps: f64,
    arrivals: BTreeMap<String, u64>,
    /// The balancer's flow-table hits per frame sent; None for the others.
    hit_share: Option<f64>,
}

impl Blast {
    fn measure(
        generator: &Generator,
        installed: &Installed,
        frame: &[u8],
        generators: usize,
    ) -> anyhow::Result<Self> {
        let before = generator.arrivals()?;
        let hits_before = installed.flow_hits()?;
        let (sent, elapsed) = generator.blast(frame, generators)?;
        let after = generator.arrivals()?;
        let hits = installed.flow_hits()?.zip(hits_before).map(|(after, before)| after - before);
        let mut arrivals = BTreeMap::new();
        let mut forwarded = 0;
        for (mac, count) in &after {
            let delta = count - before.get(mac).copied().unwrap_or(0);
            forwarded += delta;
            arrivals.insert(format!("..:{mac:02x}"), delta);
        }
        let seconds = elapsed.as_secs_f64();
        Ok(Blast {
            offered_mpps: sent as f64 / seconds / 1e6,
            forwarded_mpps: forwarded as f64 / seconds / 1e6,
            arrivals,
            hit_share: hits.map(|hits| hits as f64 / sent as f64),
        })
    }

    /// A system's row: the median of its blasts by forwarded rate, and the
    /// lowest flow-hit share of any.
    fn row(system: &str, cores: usize, flows: u32, mut blasts: Vec<Blast>) -> ThroughputRow {
        let lowest_hits = blasts
            .iter()
            .map(|blast| blast.hit_share)
            .reduce(|a, b| a.zip(b).map(|(a, b)| a.min(b)))
            .flatten();
        blasts.sort_by(|a, b| a.forwarded_mpps.total_cmp(&b.forwarded_mpps));
        let median = blasts.swap_remove(blasts.len() / 2);
        ThroughputRow {
            system: system.into(),
            cores,
            flows,
            offered_mpps: median.offered_mpps,
            forwarded_mpps: median.forwarded_mpps,
            arrivals: median.arrivals,
            flow_hit_share: lowest_hits,
        }
    }
}

/// The systems measured alternately, a blast each per round, for each count
/// of flows and cores: the machine's drift then moves both rates of a row
/// pair alike, and their ratio (lb's share of the reflector) is what the
/// targets compare. lb is loaded once and detached while the reflector
/// runs, so its flows stay confirmed and its maps as warm as those of a
/// balancer that has run for a while.
const ALTERNATED: [&str; 2] = ["lb", "XDP_TX reflector"];

/// The order rows are printed and stored in.
const SYSTEMS: [&str; 3] = ["lb", "XDP_TX reflector", "nftables DNAT"];

pub fn throughput() -> anyhow::Result<Vec<ThroughputRow>> {
    let _topology = Topology::up()?;
    let frame_bytes = established_frame()?;
    let mut rows = Vec::new();
    let mut lb = install("lb")?;
    for flows in [1u32, 64_000] {
        for cores in [1usize, 2] {
            // XDP runs on the CPU that transmits into the veth, so `cores`
            // generator threads give lb and the reflector `cores` cores. The
            // flow table holds `flows` in every row: each CPU's generator
            // sends its share (its own flows, as RSS would give it), so a
            // second core adds a core, not a second working set.
            let generator = Generator::load(&frame_bytes, (flows / cores as u32).max(1))?;
            let mut blasts: [Vec<Blast>; 2] = Default::default();
            for round in 0..MEASURED_BLASTS {
                lb = attach_lb(lb, true)?;
                // This row's flows are new to lb in its first round only:
                // detaching keeps them confirmed for the next.
                warm_up(&generator, &frame_bytes, cores, round == 0)?;
                blasts[0].push(Blast::measure(&generator, &lb, &frame_bytes, cores)?);
                lb = attach_lb(lb, false)?;
                let reflector = install(ALTERNATED[1])?;
                warm_up(&generator, &frame_bytes, cores, false)?;
                blasts[1].push(Blast::measure(&generator, &reflector, &frame_bytes, cores)?);
            }
            for (system, blasts) in ALTERNATED.iter().zip(blasts) {
                rows.push(Blast::row(system, cores, flows, blasts));
            }
        }
    }
    drop(lb);
    // The kernel's softirq work cannot share a core with a generator (it
    // starves), so one generator runs on CPU 0 and RPS hands the stack CPU 1.
    // A second core for it would be the generator's own: not measured on a
    // 2-CPU machine.
    if available_cpus() >= 2 {
        let installed = install("nftables DNAT")?;
        let path = format!("/sys/class/net/{LB_IFACE}/queues/rx-0/rps_cpus");
        run("ip", &["netns", "exec", LB_NS, "sh", "-c", &format!("echo 2 > {path}")])?;
        for flows in [1u32, 64_000] {
            let generator = Generator::load(&frame_bytes, flows)?;
            warm_up(&generator, &frame_bytes, 1, false)?;
            let blasts = (0..MEASURED_BLASTS)
                .map(|_| Blast::measure(&generator, &installed, &frame_bytes, 1))
                .collect::<anyhow::Result<Vec<_>>>()?;
            rows.push(Blast::row("nftables DNAT", 1, flows, blasts));
        }
        if std::env::var_os("LB_BENCH_DEBUG").is_some() {
            let stats = run("ip", &["netns", "exec", LB_NS, "nstat", "-az"])?;
            for line in String::from_utf8_lossy(&stats.stdout).lines() {
                if line.split_whitespace().nth(1).is_some_and(|v| v != "0") {
                    println!("  {line}");
                }
            }
            let ruleset = run("ip", &["netns", "exec", LB_NS, "nft", "list", "ruleset"])?;
            println!("{}", String::from_utf8_lossy(&ruleset.stdout));
        }
    }
    rows.sort_by_key(|row| {
        (SYSTEMS.iter().position(|system| *system == row.system), row.flows, row.cores)
    });
    Ok(rows)
}

/// An established-flow frame from the generator to the VIP, addressed from
/// the generator's MAC to the balancer's.
fn established_frame() -> anyhow::Result<Vec<u8>> {
    let lb_mac = tests::netns::mac(LB_NS, LB_IFACE)?;
    let gen_mac = tests::netns::mac(GEN_NS, GEN_IFACE)?;
    let flow = Flow {
        client: ip("198.18.0.1"),
        client_port: 1024,
        vip: ip("198.18.0.10"),
        vip_port: 80,
        l4: L4::Tcp,
    };
    let mut frame_bytes =
        frame(flow, Shape { segment: Segment::Ack, ..Shape::default() }, &[0u8; 10]);
    frame_bytes[0..6].copy_from_slice(&lb_mac);
    frame_bytes[6..12].copy_from_slice(&gen_mac);
    Ok(frame_bytes)
}

/// lb's program attached to the balancer's interface again, or detached;
/// its maps, and the flows in them, stay.
fn attach_lb(lb: Installed, attached: bool) -> anyhow::Result<Installed> {
    in_netns(LB_NS, move || {
        let mut lb = lb;
        if let Installed::Balancer(reconciler) = &mut lb {
            let datapath = reconciler.datapath_mut();
            if attached {
                datapath.attach(LB_IFACE, AttachMode::Native)?;
            } else {
                datapath.detach()?;
            }
        }
        Ok(lb)
    })
}

/// An unmeasured blast before a system's measured one. The frames are bare
/// ACKs, and lb confirms such a flow on a packet a second after its first,
/// so flows lb has not confirmed yet (`confirming`) get a second blast
/// FLOW_CONFIRM_NS after the first: then lb forwards established flows.
fn warm_up(
    generator: &Generator,
    frame: &[u8],
    generators: usize,
    confirming: bool,
) -> anyhow::Result<()> {
    generator.blast(frame, generators)?;
    if confirming {
        std::thread::sleep(Duration::from_nanos(lb_common::FLOW_CONFIRM_NS * 11 / 10));
        generator.blast(frame, generators)?;
    }
    Ok(())
}

/// What runs on the balancer's interface while a system is measured.
pub enum Installed {
    Balancer(Box<Reconciler>),
    Program(#[expect(dead_code, reason = "held to keep the program attached")] Box<Ebpf>),
    Kernel,
}

impl Installed {
    /// The balancer's `flow_hit` counter; None for the other systems.
    fn flow_hits(&self) -> anyhow::Result<Option<u64>> {
        let Installed::Balancer(reconciler) = self else { return Ok(None) };
        Ok(crate::costs::counters(reconciler)?.get("flow_hit").copied())
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if let Installed::Kernel = self {
            let _ = run("ip", &["-n", LB_NS, "link", "set", "dev", LB_IFACE, "xdp", "off"]);
            let _ = run("ip", &["netns", "exec", LB_NS, "nft", "flush", "ruleset"]);
        }
    }
}

/// Loads `system` on the balancer's interface: attached, except lb, which
/// [`attach_lb`] attaches.
pub fn install(system: &str) -> anyhow::Result<Installed> {
    match system {
        "lb" => in_netns(LB_NS, || {
            let config =
                DatapathConfig { max_vips: 4, max_backends: 16, ..DatapathConfig::default() };
            // The sink counts arrivals by the backend MAC's last byte: 101 to 103.
            let backends: Vec<IpAddr> =
                (1..=3).map(|i| ip(&format!("198.18.0.{}", 100 + i))).collect();
            let (reconciler, _) = tests::fixture::balancer(
                config,
                &[("198.18.0.10:80", Protocol::Tcp, &backends)],
                tests::fixture::backend_mac,
            )?;
            Ok(Installed::Balancer(Box::new(reconciler)))
        }),
        "XDP_TX reflector" => in_netns(LB_NS, || {
            let mut ebpf = EbpfLoader::new().load(BENCH_OBJECT)?;
            let program = xdp(&mut ebpf, "bench_mac_swap")?;
            program.load()?;
            program.attach(LB_IFACE, XdpMode::Driver)?;
            Ok(Installed::Program(Box::new(ebpf)))
        }),
        _ => {
            // veth hands the generator's XDP_TX frames only to a peer running XDP.
            let object = std::env::temp_dir().join("lbb-xdp-pass.o");
            std::fs::write(&object, PEER_PASS_OBJECT)?;
            let object = object.to_str().context("temp path")?;
            run(
                "ip",
                &["-n", LB_NS, "link", "set", "dev", LB_IFACE, "xdp", "obj", object, "sec", "xdp"],
            )?;
            for setting in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.l0.send_redirects=0",
            ] {
                run("ip", &["netns", "exec", LB_NS, "sysctl", "-qw", setting])?;
            }
            for index in 1..=3 {
                let address = format!("198.18.0.{}", 100 + index);
                let mac = format_mac(tests::fixture::backend_mac(ip(&address)));
                run(
                    "ip",
                    &[
                        "-n",
                        LB_NS,
                        "neigh",
                        "replace",
                        &address,
                        "lladdr",
                        &mac,
                        "dev",
                        LB_IFACE,
                        "nud",
                        "permanent",
                    ],
                )?;
            }
            let rules = "table ip lbbench {\n chain prerouting {\n  type nat hook prerouting priority -100;\n  ip daddr 198.18.0.10 tcp dport 80 counter dnat to numgen random mod 3 map { 0 : 198.18.0.101, 1 : 198.18.0.102, 2 : 198.18.0.103 }\n }\n}\n";
            let rules_file = std::env::temp_dir().join("lbb-nft.conf");
            std::fs::write(&rules_file, rules)?;
            run(
                "ip",
                &["netns", "exec", LB_NS, "nft", "-f", rules_file.to_str().context("path")?],
            )?;
            // Only now does conntrack exist in the namespace. The generator
            // rewrites ports without fixing checksums, which conntrack would
            // otherwise mark invalid and leave un-NATed.
            run(
                "ip",
                &["netns", "exec", LB_NS, "sysctl", "-qw", "net.netfilter.nf_conntrack_checksum=0"],
            )?;

            Ok(Installed::Kernel)
        }
    }
}

pub fn print_throughput(rows: &[ThroughputRow]) {
    println!(
        "{:<20} {:>5} {:>7} {:>9} {:>10} {:>9}  ARRIVALS BY DESTINATION MAC",
        "SYSTEM", "CORES", "FLOWS", "OFFERED", "FORWARDED", "FLOW HITS"
    );
    for row in rows {
        let hits =
            row.flow_hit_share.map_or("-".to_owned(), |share| format!("{:.1}%", share * 100.0));
        println!(
            "{:<20} {:>5} {:>7} {:>6.2} Mpps {:>6.2} Mpps {:>9}  {:?}",
            row.system,
            row.cores,
            row.flows,
            row.offered_mpps,
            row.forwarded_mpps,
            hits,
            row.arrivals
        );
    }
}
