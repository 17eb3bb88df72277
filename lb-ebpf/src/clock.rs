//! The datapath's clock: `bpf_ktime_get_coarse_ns`, read at most once a
//! jiffy per CPU. The coarse clock itself only moves on the timer tick, so
//! the cached value is what the helper would return (at worst one tick
//! behind, when the read races the tick), and a packet pays for one inlined
//! jiffies read instead of a helper call. Idle timeouts and the once-a-second
//! refresh need no finer time.

use aya_ebpf::helpers::generated::{bpf_jiffies64, bpf_ktime_get_coarse_ns};

use crate::maps::LB_CLOCK;

/// The coarse clock as last read on this CPU, and the jiffy of that read.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Clock {
    jiffies: u64,
    coarse_ns: u64,
}

/// `CLOCK_MONOTONIC_COARSE` now, in nanoseconds.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: bpf_jiffies64 has no preconditions; the verifier inlines it
    // as a load of `jiffies` when the program is JIT-compiled.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(clock) = LB_CLOCK.get_ptr_mut(0) else {
        // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: a per-CPU value, owned by this CPU for the program's run.
    let clock = unsafe { &mut *clock };
    if clock.jiffies != jiffies || clock.coarse_ns == 0 {
        // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
        clock.coarse_ns = unsafe { bpf_ktime_get_coarse_ns() };
        clock.jiffies = jiffies;
    }
    clock.coarse_ns
}
