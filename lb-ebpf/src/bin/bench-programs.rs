//! Programs for `cargo xtask bench` only; never attached by `lb run`.
//!
//! - `bench_drop`, `bench_mac_swap`: the floor a balancer is measured against
//!   (XDP_DROP, and XDP_TX after swapping MACs).
//! - `bench_new_flow`: BPF_PROG_TEST_RUN repeats one frame without restoring
//!   it, so a balancer run that records a flow would hit the flow table from
//!   the second repeat on. This wrapper writes a fresh source port into the
//!   frame on every repeat, then tail-calls the balancer: every repeat is a
//!   new flow.
//! - `bench_strip`: takes off the outer headers the balancer's last repeat
//!   put on (tunnelled VIPs), optionally with a fresh port, then tail-calls it.
//! - `bench_grow`: makes 20 bytes of room in front of the frame and XDP_TX:
//!   through `bench_strip`, the harness's own cost in the tunnelled rows.
//! - `bench_generator`: the same fresh port per frame, then XDP_TX: with
//!   BPF_F_TEST_XDP_LIVE_FRAMES it transmits many flows out of an interface.
//! - `bench_sink`: counts arriving frames by the last byte of their
//!   destination MAC (the backend), then drops them.
//! - `bench_memory_floor`: reads one random cache line of each of two large
//!   arrays, both loads in flight at once, then swaps MACs and returns
//!   XDP_TX: the least a new flow can cost when its flow-table bucket and
//!   its pin are random lines of tables that size.
// Built for the BPF target by lb-userspace's build.rs; on the host (cargo
// build/clippy --workspace) it compiles to an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_get_smp_processor_id,
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::XdpContext,
};

#[path = "../runtime.rs"]
mod runtime;

/// Distinct source ports (flows) the bench cycles through, set at load.
#[unsafe(no_mangle)]
static BENCH_FLOWS: u32 = 64_000;

/// Client addresses the generator cycles through (IPv4: the last byte of
/// the template's source address plus 0..this), set at load. 1: no change.
#[unsafe(no_mangle)]
static BENCH_ADDRESSES: u32 = 1;

/// The last byte of the template frame's client address, set at load. Live
/// frames come back from the page pool as the last run left them, so the
/// generator writes that byte whole from this base; adding to the byte in the
/// frame would move a recycled frame's client further on every use.
#[unsafe(no_mangle)]
static BENCH_CLIENT_BASE: u8 = 1;

/// Frames sent per tuple, in a row, by the generator (a flood that repeats
/// each spoofed tuple defeats the kernel LRU's second-chance list), set at load.
#[unsafe(no_mangle)]
static BENCH_REPEAT: u32 = 1;

/// Lines (elements) of BENCH_LINES_A and BENCH_LINES_B, each a power of
/// two, set at load with the maps' sizes.
#[unsafe(no_mangle)]
static BENCH_LINES_A_COUNT: u32 = 1;
#[unsafe(no_mangle)]
static BENCH_LINES_B_COUNT: u32 = 1;

/// The two arrays `bench_memory_floor` reads, one 64-byte line an element;
/// sized at load.
#[map]
static BENCH_LINES_A: Array<[u64; 8]> = Array::with_max_entries(1, 0);
#[map]
static BENCH_LINES_B: Array<[u64; 8]> = Array::with_max_entries(1, 0);

/// Per-CPU count of `bench_memory_floor` runs, from which it picks its lines.
#[map]
static BENCH_PROBES: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Index 0: the balancer, for `bench_new_flow` to tail-call.
#[map]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Index 0: the length of the frame before the balancer encapsulated it,
/// for `bench_strip` (0: strip nothing); index 1: 1 when `bench_strip`
/// also gives every repeat a fresh source port (new flows). Set by the bench.
#[map]
static BENCH_INNER_LEN: Array<u32> = Array::with_max_entries(2, 0);

/// Per-CPU sequence number that varies the source port.
#[map]
static BENCH_SEQUENCE: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Destination MAC last byte -> frames received, per CPU.
#[map]
static BENCH_ARRIVALS: PerCpuArray<u64> = PerCpuArray::with_max_entries(256, 0);

#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bench_mac_swap(ctx: XdpContext) -> u32 {
    swap_macs(&ctx)
}

#[xdp]
pub fn bench_memory_floor(ctx: XdpContext) -> u32 {
    let Some(probes) = BENCH_PROBES.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: a per-CPU value owned by this CPU; read_volatile keeps the
    // load-time counts from being folded.
    let (probe, a_lines, b_lines) = unsafe {
        (
            (*probes).wrapping_add(1),
            core::ptr::read_volatile(&BENCH_LINES_A_COUNT),
            core::ptr::read_volatile(&BENCH_LINES_B_COUNT),
        )
    };
    // Fibonacci hashing: the high bits of the product spread consecutive
    // probes over the whole array, with no stride a prefetcher could follow.
    let spread = probe.wrapping_mul(0x9e37_79b9);
    let top_bits =
        |hash: u32, lines: u32| ((u64::from(hash) << lines.trailing_zeros().min(32)) >> 32) as u32;
    let a = top_bits(spread, a_lines);
    let b = top_bits(spread.rotate_left(16), b_lines);
    let (Some(a), Some(b)) = (BENCH_LINES_A.get_ptr(a), BENCH_LINES_B.get_ptr(b)) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: pointers from map lookups, valid for this run, and a per-CPU
    // value owned by this CPU. Both loads are issued before either is used.
    // The next probe depends on both values (always zero, which the CPU
    // cannot know), so the next run cannot start its reads before these
    // end: each run pays the full latency, as a balancer run, too long for
    // the CPU to reach the next packet's reads early, does.
    unsafe {
        let (a, b) = (core::ptr::read_volatile(&(*a)[0]), core::ptr::read_volatile(&(*b)[0]));
        *probes = probe.wrapping_add((a | b) as u32);
    }
    swap_macs(&ctx)
}

/// Swaps the frame's MAC addresses and returns XDP_TX (XDP_ABORTED for a
/// frame too short to hold them).
#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the check above keeps both MAC addresses within the frame.
    // The MACs move as integers: byte-array copies between the two places
    // compile to a memmove, which BPF cannot call.
    unsafe {
        use core::ptr::{read_unaligned, write_unaligned};
        let destination =
            (read_unaligned(start as *const u32), read_unaligned((start + 4) as *const u16));
        let source =
            (read_unaligned((start + 6) as *const u32), read_unaligned((start + 10) as *const u16));
        write_unaligned(start as *mut u32, source.0);
        write_unaligned((start + 4) as *mut u16, source.1);
        write_unaligned((start + 6) as *mut u32, destination.0);
        write_unaligned((start + 10) as *mut u16, destination.1);
    }
    xdp_action::XDP_TX
}

/// Writes the next sequence number into the source port of an untagged
/// IPv4 (no options) or IPv6 (no extension headers) frame, as the bench
/// builds; returns the sequence number.
#[inline(always)]
fn vary_source_port(ctx: &XdpContext) -> Option<u32> {
    // SAFETY: read_volatile keeps the load-time value from being folded.
    let flows = unsafe { core::ptr::read_volatile(&BENCH_FLOWS) }.max(1);
    let start = ctx.data();
    if start + 14 > ctx.data_end() {
        return None;
    }
    // SAFETY: the check above keeps the EtherType within the frame.
    let ether_type = unsafe { *((start + 12) as *const [u8; 2]) };
    let offset = if ether_type == [0x86, 0xdd] { 14 + 40 } else { 14 + 20 };
    if start + offset + 2 > ctx.data_end() {
        return None;
    }
    let sequence = BENCH_SEQUENCE.get_ptr_mut(0)?;
    // SAFETY: read_volatile keeps the load-time value from being folded.
    let repeat = unsafe { core::ptr::read_volatile(&BENCH_REPEAT) }.max(1);
    // SAFETY: a per-CPU value owned by this CPU, and the port lies within the
    // frame (checked above).
    unsafe {
        *sequence = (*sequence).wrapping_add(1);
        let tuple = *sequence / repeat;
        let port = (1024 + (tuple % flows) % 64_000) as u16;
        *((start + offset) as *mut [u8; 2]) = port.to_be_bytes();
        Some(tuple)
    }
}

#[xdp]
pub fn bench_new_flow(ctx: XdpContext) -> u32 {
    if vary_source_port(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: index 0 holds an XDP program (the balancer) or is empty, in
    // which case the call returns and we abort.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Repeats of an established packet to a tunnelled VIP: BPF_PROG_TEST_RUN
/// runs each repeat on the frame the last one left, which the balancer
/// encapsulated, so this takes the outer headers off again (the Ethernet
/// header moved up by the bytes the frame grew, then the start moved past
/// them) before tail-calling the balancer. Frames of BENCH_INNER_LEN pass
/// as they are: the first repeat, and every repeat of a DSR VIP. With
/// BENCH_INNER_LEN[1] set, each repeat then gets a fresh source port, as
/// in `bench_new_flow`.
#[xdp]
pub fn bench_strip(ctx: XdpContext) -> u32 {
    let inner_len = BENCH_INNER_LEN.get(0).copied().unwrap_or(0) as usize;
    let (start, end) = (ctx.data(), ctx.data_end());
    let length = end - start;
    if inner_len != 0 && length > inner_len {
        let cut = length - inner_len;
        // Outer headers are 20 to 48 bytes, more than the 14 moved, so the
        // two places never overlap.
        if !(14..=64).contains(&cut) || start + 14 > end || start + cut + 14 > end {
            return xdp_action::XDP_ABORTED;
        }
        // SAFETY: the check above keeps both places within the frame.
        unsafe {
            for index in 0..7 {
                let from = (start + index * 2) as *const [u8; 2];
                let to = (start + cut + index * 2) as *mut [u8; 2];
                *to = *from;
            }
            if aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, cut as i32) != 0 {
                return xdp_action::XDP_ABORTED;
            }
        }
    }
    if BENCH_INNER_LEN.get(1).copied().unwrap_or(0) == 1 && vary_source_port(&ctx).is_none() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: index 0 holds an XDP program (the balancer) or is empty, in
    // which case the call returns and we abort.
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// What any encapsulation costs through `bench_strip` before it writes a
/// header: 20 bytes of room made in front of the frame (as IPv4 in IPv4
/// makes), the Ethernet header moved to the new front, MACs swapped,
/// XDP_TX. Through `bench_strip` (which takes the 20 bytes off again) it
/// measures the harness's own round trip in the tunnelled rows.
#[xdp]
pub fn bench_grow(ctx: XdpContext) -> u32 {
    const ROOM: usize = 20;
    // SAFETY: a helper call on this program's own context.
    if unsafe { aya_ebpf::helpers::bpf_xdp_adjust_head(ctx.ctx, -(ROOM as i32)) } != 0 {
        return xdp_action::XDP_ABORTED;
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ROOM + 14 > end {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the check above keeps both places within the frame; the copy
    // moves down, lowest word first, and the places are 20 bytes apart.
    unsafe {
        for index in 0..7 {
            let from = (start + ROOM + index * 2) as *const [u8; 2];
            let to = (start + index * 2) as *mut [u8; 2];
            *to = *from;
        }
    }
    swap_macs(&ctx)
}

/// The generator's flows differ per CPU (the CPU number is added to the
/// template's last client address byte, `BENCH_CLIENT_BASE`; CPU 0 keeps
/// it), as RSS would keep a flow on one CPU: generators on two CPUs must not
/// share flows.
#[xdp]
pub fn bench_generator(ctx: XdpContext) -> u32 {
    let Some(sequence) = vary_source_port(&ctx) else {
        return xdp_action::XDP_ABORTED;
    };
    let start = ctx.data();
    if start + 14 + 40 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: the check above keeps both candidate bytes within the frame.
    unsafe {
        let ether_type = *((start + 12) as *const [u8; 2]);
        let last =
            if ether_type == [0x86, 0xdd] { start + 14 + 8 + 15 } else { start + 14 + 12 + 3 };
        let cpu = bpf_get_smp_processor_id() as u8;
        let addresses = core::ptr::read_volatile(&BENCH_ADDRESSES).max(1);
        let base = core::ptr::read_volatile(&BENCH_CLIENT_BASE);
        let old = *(last as *const u8);
        let new = base.wrapping_add(cpu).wrapping_add((sequence / 7 % addresses) as u8);
        *(last as *mut u8) = new;
        if ether_type == [0x08, 0x00] {
            // Keep the IPv4 header valid (RFC 1624 incremental update of the
            // word holding the changed byte), and drop the UDP checksum,
            // which IPv4 allows, rather than recompute it.
            let checksum = (start + 14 + 10) as *mut [u8; 2];
            let word = (start + 14 + 14) as *const [u8; 2];
            let new_word = u16::from_be_bytes(*word);
            let old_word = (new_word & 0xff00) | u16::from(old);
            let mut sum = u32::from(!u16::from_be_bytes(*checksum))
                + u32::from(!old_word)
                + u32::from(new_word);
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            *checksum = (!(sum as u16)).to_be_bytes();
            if *((start + 14 + 9) as *const u8) == 17 {
                *((start + 14 + 20 + 6) as *mut [u8; 2]) = [0, 0];
            }
        }
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 6 <= ctx.data_end() {
        // SAFETY: the check above keeps the destination MAC within the frame.
        let last = unsafe { *((start + 5) as *const u8) };
        if let Some(count) = BENCH_ARRIVALS.get_ptr_mut(u32::from(last)) {
            // SAFETY: a per-CPU value owned by this CPU.
            unsafe { *count += 1 };
        }
    }
    xdp_action::XDP_DROP
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
