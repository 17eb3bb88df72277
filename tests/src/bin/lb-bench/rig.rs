//! The rig of section 2: the generator and balancer namespaces joined by
//! one point-to-point veth pair, the generator program that blasts frames
//! from them (BPF_PROG_TEST_RUN with live frames), and pinning a thread to
//! a CPU.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::Ebpf;
use aya::maps::PerCpuArray;
use aya::programs::{Xdp, XdpMode};
use tests::netns::run;

use crate::costs::xdp;

pub const GEN_NS: &str = "lbb-gen";
pub const LB_NS: &str = "lbb-lb";
pub const GEN_IFACE: &str = "g0";
pub const LB_IFACE: &str = "l0";
pub const GEN_REPEAT: u32 = 3_000_000;

/// Runs `work` on a thread that has entered network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        tests::netns::enter(&ns)?;
        work()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

pub struct Topology;

impl Topology {
    pub fn up() -> anyhow::Result<Self> {
        Self::down();
        let topology = Topology;
        run("ip", &["netns", "add", GEN_NS])?;
        run("ip", &["netns", "add", LB_NS])?;
        // One queue pair per CPU. veth queues a frame on the receive queue of
        // the sending CPU's number, and each queue has its own NAPI instance
        // on the CPU that fills it. With a single queue, both generators'
        // frames went to one ring served by one NAPI at a time: the second
        // core added nothing, to the reflector as to lb.
        let queues = available_cpus().to_string();
        let queues = ["numtxqueues", &queues, "numrxqueues", &queues];
        let mut args = vec!["link", "add", GEN_IFACE, "netns", GEN_NS];
        args.extend(queues);
        args.extend(["type", "veth", "peer", "name", LB_IFACE, "netns", LB_NS]);
        args.extend(queues);
        run("ip", &args)?;
        for (ns, iface, address) in
            [(GEN_NS, GEN_IFACE, "198.18.0.1/24"), (LB_NS, LB_IFACE, "198.18.0.2/24")]
        {
            run("ip", &["-n", ns, "addr", "add", address, "dev", iface])?;
            run("ip", &["-n", ns, "link", "set", iface, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(topology)
    }

    fn down() {
        for ns in [GEN_NS, LB_NS] {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        Self::down();
    }
}

/// The generator and the sink, both in the generator's namespace.
pub struct Generator {
    ebpf: Ebpf,
    ifindex: u32,
}

impl Generator {
    pub fn load(template: &[u8], flows: u32) -> anyhow::Result<Self> {
        let template = template.to_vec();
        in_netns(GEN_NS, move || {
            let mut ebpf = tests::generator::load(&template, flows, 1, 1)?;
            let sink = xdp(&mut ebpf, "bench_sink")?;
            sink.load()?;
            sink.attach(GEN_IFACE, XdpMode::Driver)?;
            let ifindex = lb_userspace::neighbour::interface_index(GEN_IFACE)?;
            Ok(Generator { ebpf, ifindex })
        })
    }

    pub fn arrivals(&self) -> anyhow::Result<BTreeMap<u8, u64>> {
        let map = self.ebpf.map("BENCH_ARRIVALS").context("BENCH_ARRIVALS")?;
        let array: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        let mut counts = BTreeMap::new();
        for index in 0..256u32 {
            let total: u64 = array.get(&index, 0)?.iter().sum();
            if total > 0 {
                counts.insert(index as u8, total);
            }
        }
        Ok(counts)
    }

    /// Sends GEN_REPEAT frames from each of `cores` threads at once; returns
    /// (frames sent, wall time).
    pub fn blast(&self, frame: &[u8], cores: usize) -> anyhow::Result<(u64, Duration)> {
        let program: &Xdp =
            self.ebpf.program("bench_generator").context("generator")?.try_into()?;
        let fd = program.fd()?.try_clone()?;
        let start = Instant::now();
        let threads: Vec<_> = (0..cores)
            .map(|cpu| {
                let frame = frame.to_vec();
                let fd = fd.try_clone();
                let ifindex = self.ifindex;
                std::thread::spawn(move || -> anyhow::Result<()> {
                    pin_to_cpu(cpu)?;
                    tests::netns::enter(GEN_NS)?;
                    tests::generator::live_frames(&fd?, &frame, ifindex, GEN_REPEAT)
                })
            })
            .collect();
        for thread in threads {
            thread.join().map_err(|_| anyhow::anyhow!("generator thread panicked"))??;
        }
        Ok((u64::from(GEN_REPEAT) * cores as u64, start.elapsed()))
    }
}

/// CPUs online (not this thread's affinity, which pinning narrows).
pub fn available_cpus() -> usize {
    nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
        .ok()
        .flatten()
        .and_then(|online| usize::try_from(online).ok())
        .unwrap_or(1)
        .max(1)
}

pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pinning to CPU {cpu}"))
}
