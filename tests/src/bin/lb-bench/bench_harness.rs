//! The bench programs a cost row runs the balancer through: the floors
//! (XDP_DROP, an XDP_TX MAC swap, the memory floor), the fresh-port wrapper
//! (`bench_new_flow`) and the tunnel strip (`bench_strip`), each with its own
//! cost measured so the rows can take it off.

use anyhow::Context as _;
use aya::maps::{Array, MapData, PerCpuArray, PerCpuValues, ProgramArray};
use aya::programs::{ProgramFd, Xdp};
use aya::{Ebpf, EbpfLoader};
use lb_common::{PendingFlow, new_flow_table_size};
use lb_userspace::datapath::BENCH_OBJECT;
use tests::{XDP_DROP, XDP_TX};

use crate::costs::{NEW_FLOW_REPEAT, REPEAT, cost, xdp};

/// The floors and the fresh-port wrapper (`bench_new_flow`) from the bench
/// programs.
pub struct Harness {
    bench: Ebpf,
    target: ProgramArray<MapData>,
    sequence: PerCpuArray<MapData, u32>,
    /// The wrapper's own cost: it tail-calling XDP_DROP, less XDP_DROP.
    wrapper: f64,
    /// `bench_strip`'s length to strip to, and its own cost when it strips
    /// nothing (tail-calling XDP_DROP, less XDP_DROP).
    inner_len: Array<MapData, u32>,
    strip: f64,
    pub drop: f64,
    /// XDP_TX after a MAC swap: what every row is compared with.
    pub floor: f64,
}

/// Bytes of the kernel's bucket array for a flow table (an LRU hash) of
/// `flow_table_size`: a power of two of 16-byte buckets (a list head and a
/// lock), as `/proc/vmallocinfo` shows it.
pub fn flow_bucket_bytes(flow_table_size: u32) -> u32 {
    flow_table_size.next_power_of_two() * 16
}

/// Bytes of the unconfirmed table for a flow table of `flow_table_size`.
pub fn pin_table_bytes(flow_table_size: u32) -> u32 {
    new_flow_table_size(flow_table_size) * size_of::<PendingFlow>() as u32
}

impl Harness {
    /// The bench programs, with `bench_memory_floor`'s arrays the size of a
    /// `flow_table_size` flow table's buckets and of its unconfirmed table.
    pub fn load(sample: &[u8], flow_table_size: u32) -> anyhow::Result<Self> {
        let lines = |bytes: u32| bytes / 64;
        let (a, b) =
            (lines(flow_bucket_bytes(flow_table_size)), lines(pin_table_bytes(flow_table_size)));
        let mut bench = EbpfLoader::new()
            .override_global("BENCH_FLOWS", &64_000u32, true)
            .override_global("BENCH_LINES_A_COUNT", &a, true)
            .override_global("BENCH_LINES_B_COUNT", &b, true)
            .map_max_entries("BENCH_LINES_A", a)
            .map_max_entries("BENCH_LINES_B", b)
            .load(BENCH_OBJECT)?;
        for name in [
            "bench_drop",
            "bench_mac_swap",
            "bench_new_flow",
            "bench_memory_floor",
            "bench_strip",
            "bench_grow",
        ] {
            xdp(&mut bench, name)?.load()?;
        }
        let mut target =
            ProgramArray::try_from(bench.take_map("BENCH_TARGET").context("BENCH_TARGET")?)?;
        let sequence =
            PerCpuArray::try_from(bench.take_map("BENCH_SEQUENCE").context("BENCH_SEQUENCE")?)?;
        let drop = cost(xdp(&mut bench, "bench_drop")?, sample, REPEAT, XDP_DROP)?;
        let floor = cost(xdp(&mut bench, "bench_mac_swap")?, sample, REPEAT, XDP_TX)?;
        target.set(0, xdp(&mut bench, "bench_drop")?.fd()?, 0)?;
        let wrapper = cost(xdp(&mut bench, "bench_new_flow")?, sample, REPEAT, XDP_DROP)? - drop;
        let inner_len =
            Array::try_from(bench.take_map("BENCH_INNER_LEN").context("BENCH_INNER_LEN")?)?;
        let strip = cost(xdp(&mut bench, "bench_strip")?, sample, REPEAT, XDP_DROP)? - drop;
        Ok(Self { bench, target, sequence, wrapper, inner_len, strip, drop, floor })
    }

    /// ns per packet of `balancer` on `frame` with a fresh source port
    /// every repeat (the wrapper's cost taken off).
    pub fn fresh_ports(&mut self, balancer: &Xdp, frame: &[u8]) -> anyhow::Result<f64> {
        self.target.set(0, balancer.fd()?, 0)?;
        let wrapper = xdp(&mut self.bench, "bench_new_flow")?;
        Ok(cost(wrapper, frame, NEW_FLOW_REPEAT, XDP_TX)? - self.wrapper)
    }

    /// ns per packet of `balancer` on `frame` repeated through `bench_strip`,
    /// which takes off the outer headers the last repeat put on (its cost
    /// when it strips nothing taken off; the stripping itself, an
    /// adjust_head and a 14-byte copy, stays in: an upper bound).
    pub fn through_strip(&mut self, balancer: &Xdp, frame: &[u8]) -> anyhow::Result<f64> {
        self.target.set(0, balancer.fd()?, 0)?;
        self.inner_len.set(0, frame.len() as u32, 0)?;
        let strip = xdp(&mut self.bench, "bench_strip")?;
        let ns = cost(strip, frame, REPEAT, XDP_TX)? - self.strip;
        self.inner_len.set(0, 0, 0)?;
        Ok(ns)
    }

    /// ns per packet of `bench_grow` through `bench_strip`: the round trip
    /// of the harness itself in the tunnelled rows (20 bytes taken off and
    /// made again every repeat, the MACs swapped, XDP_TX).
    pub fn strip_round_trip(&mut self, frame: &[u8]) -> anyhow::Result<f64> {
        let fd = xdp(&mut self.bench, "bench_grow")?.fd()?.try_clone()?;
        self.target.set(0, &fd, 0)?;
        self.inner_len.set(0, frame.len() as u32, 0)?;
        let strip = xdp(&mut self.bench, "bench_strip")?;
        let ns = cost(strip, frame, REPEAT, XDP_TX);
        self.inner_len.set(0, 0, 0)?;
        Ok(ns? - self.strip)
    }

    /// ns per packet of `balancer` on `frame` through `bench_strip` with a
    /// fresh source port every repeat: the first packet of new flows to a
    /// tunnelled VIP. The wrapper's cost (a fresh port and a tail call) is
    /// taken off; the stripping stays in, as in [`Self::through_strip`].
    pub fn fresh_through_strip(&mut self, balancer: &Xdp, frame: &[u8]) -> anyhow::Result<f64> {
        self.target.set(0, balancer.fd()?, 0)?;
        self.inner_len.set(0, frame.len() as u32, 0)?;
        self.inner_len.set(1, 1, 0)?;
        let strip = xdp(&mut self.bench, "bench_strip")?;
        let ns = cost(strip, frame, NEW_FLOW_REPEAT, XDP_TX);
        self.inner_len.set(0, 0, 0)?;
        self.inner_len.set(1, 0, 0)?;
        Ok(ns? - self.wrapper)
    }

    /// The wrapper aimed at `balancer`, as an fd that threads on other CPUs
    /// can run (see `tests::bpf::test_run_fd`), and its own cost.
    pub fn wrapper_for(&mut self, balancer: &Xdp) -> anyhow::Result<(ProgramFd, f64)> {
        self.target.set(0, balancer.fd()?, 0)?;
        Ok((xdp(&mut self.bench, "bench_new_flow")?.fd()?.try_clone()?, self.wrapper))
    }

    /// ns per packet of `bench_memory_floor`: a random line of each array
    /// read, both at once, then the floor's MAC swap.
    pub fn memory_floor(&mut self, sample: &[u8]) -> anyhow::Result<f64> {
        cost(xdp(&mut self.bench, "bench_memory_floor")?, sample, REPEAT, XDP_TX)
    }

    /// Where the wrapper's port sequence stands, to replay it with [`Self::rewind`].
    pub fn mark(&self) -> anyhow::Result<PerCpuValues<u32>> {
        Ok(self.sequence.get(&0, 0)?)
    }

    /// The next fresh-port run goes over the same ports as the one after `mark`.
    pub fn rewind(&mut self, mark: &PerCpuValues<u32>) -> anyhow::Result<()> {
        let values = PerCpuValues::try_from(mark.iter().copied().collect::<Vec<_>>())?;
        Ok(self.sequence.set(0, values, 0)?)
    }
}
