//! Established packets over many flows on both CPUs at once, against one
//! CPU alone, through BPF_PROG_TEST_RUN. It isolates the datapath's own
//! scaling (the shared flow table, the cache and TLB footprint of 64,000
//! flows, LRU bookkeeping) from the live path's (the generator sharing the
//! cores, the veth), which the forwarding section measures together.

use std::time::Duration;

use anyhow::bail;
use aya::programs::ProgramFd;
use lb_common::FLOW_CONFIRM_NS;
use lb_userspace::reconcile::Reconciler;
use tests::XDP_TX;
use tests::packets::{L4, Segment};

use crate::bench_harness::Harness;
use crate::costs::{CostRow, bench_flow, packet, row};
use crate::rig::{available_cpus, pin_to_cpu};

/// Flows per CPU: every port the fresh-port wrapper cycles through.
const FLOWS: u32 = 64_000;
/// Flows per CPU whose handshakes overlap while the flows are set up.
const HANDSHAKES: u32 = 4_000;
/// Packets per CPU per measurement: every flow ten times.
const REPEAT: u32 = 10 * FLOWS;

/// Runs the wrapper `wrapper` on each CPU of `cpus` at once, each on its
/// own client's `segment`, `repeat` times; the mean ns per packet of each.
fn on_cpus(
    wrapper: &ProgramFd,
    cpus: &[usize],
    segment: Segment,
    repeat: u32,
) -> anyhow::Result<Vec<f64>> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(cpus.len()));
    let threads: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            let fd = wrapper.try_clone();
            let barrier = barrier.clone();
            // Each CPU has its own client, as RSS would keep a flow on one CPU.
            let client = format!("198.18.0.{}", 200 + cpu);
            let frame = packet(bench_flow(&client, "198.18.0.10:80", L4::Tcp), segment);
            std::thread::spawn(move || -> anyhow::Result<f64> {
                let fd = fd?;
                pin_to_cpu(cpu)?;
                barrier.wait();
                let (action, ns) = tests::bpf::test_run_fd(&fd, &frame, None, repeat)?;
                if action != XDP_TX {
                    bail!("CPU {cpu}: the balancer returned {action}, not XDP_TX");
                }
                Ok(f64::from(ns))
            })
        })
        .collect();
    let mut costs = Vec::new();
    for thread in threads {
        costs.push(thread.join().map_err(|_| anyhow::anyhow!("test-run thread panicked"))??);
    }
    Ok(costs)
}

/// The two rows: 64,000 established flows on CPU 0 alone, then 64,000 per
/// CPU on both at once (the mean of the two CPUs' own per-packet times).
pub fn many_flows_on_both_cpus(
    harness: &mut Harness,
    reconciler: &Reconciler,
) -> anyhow::Result<Vec<CostRow>> {
    if available_cpus() < 2 {
        println!("(skipped the two-CPU rows: this machine has one CPU)");
        return Ok(Vec::new());
    }
    let floor = harness.floor;
    let (wrapper, wrapper_ns) = harness.wrapper_for(reconciler.datapath().program())?;
    // Each CPU's handshakes over its FLOWS ports, a few thousand at a time
    // (SYNs, then the same ports' ACKs), as clients' handshakes overlap: not
    // 128,000 half-open at once, which would overfill some buckets of the
    // unconfirmed table. A flow whose pin was lost all the same is
    // confirmed by a packet a second later, as a client's next one would.
    for _ in 0..FLOWS / HANDSHAKES {
        let start = harness.mark()?;
        on_cpus(&wrapper, &[0, 1], Segment::Syn, HANDSHAKES)?;
        harness.rewind(&start)?;
        on_cpus(&wrapper, &[0, 1], Segment::Ack, HANDSHAKES)?;
    }
    std::thread::sleep(Duration::from_nanos(FLOW_CONFIRM_NS) + Duration::from_millis(50));
    on_cpus(&wrapper, &[0, 1], Segment::Ack, FLOWS)?;
    let alone = row(
        reconciler,
        "established, TCP IPv4, 64k flows, one CPU",
        floor,
        "flow_hit",
        u64::from(REPEAT),
        || Ok(on_cpus(&wrapper, &[0], Segment::Ack, REPEAT)?[0] - wrapper_ns),
    )?;
    let both = row(
        reconciler,
        "established, TCP IPv4, 64k flows per CPU, both CPUs at once",
        floor,
        "flow_hit",
        2 * u64::from(REPEAT),
        || {
            let costs = on_cpus(&wrapper, &[0, 1], Segment::Ack, REPEAT)?;
            Ok(costs.iter().sum::<f64>() / costs.len() as f64 - wrapper_ns)
        },
    )?;
    Ok(vec![alone, both])
}
