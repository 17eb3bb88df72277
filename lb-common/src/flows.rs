//! The flow tables' entries and their timing: a confirmed flow's
//! [`FlowEntry`] in [`crate::MAP_FLOWS`], an unconfirmed one's
//! [`PendingFlow`] slot in [`crate::MAP_NEW_FLOWS`], and the flags both carry.

use core::mem::size_of;

use crate::FlowKey;
#[allow(unused_imports, reason = "named by the doc links")]
use crate::{MAP_FLOWS, MAP_NEW_FLOWS, flow_hash};

/// A flow's `last_seen_ns` is refreshed at most this often, so a busy flow
/// does not write shared memory on every packet.
pub const FLOW_REFRESH_NS: u64 = 1_000_000_000;
/// A flow without a SYN of its own (a UDP flow, or a TCP flow picked up
/// mid-stream) is confirmed by a packet at least this long after its first:
/// a spoofed tuple sent in a burst never is.
pub const FLOW_CONFIRM_NS: u64 = 1_000_000_000;

/// Slots of [`MAP_NEW_FLOWS`] for a flow table of `flow_table_size`: as
/// many, rounded up to a power of two (at least 1,024), so that a bucket is
/// a mask of the flow hash. Flows stay there one round trip (TCP) or one
/// second (others), so buckets are seldom full: a flow loses its pin to
/// another only when four newer ones share its bucket.
pub const fn new_flow_table_size(flow_table_size: u32) -> u32 {
    let slots = match flow_table_size.checked_next_power_of_two() {
        Some(slots) => slots,
        // Above 2^31 flows: the largest power of two (a map the kernel
        // refuses to create at 64 bytes a slot, with its own error).
        None => 1 << 31,
    };
    if slots < 1_024 { 1_024 } else { slots }
}

/// Slots per bucket of [`MAP_NEW_FLOWS`]: four cache lines side by side.
pub const PENDING_WAYS: u32 = 4;

/// The first slot of the [`MAP_NEW_FLOWS`] bucket (of `slots`, a power of
/// two) where the flow with this [`flow_hash`] is pinned while unconfirmed.
#[inline(always)]
pub fn pending_bucket(hash: u32, slots: u32) -> u32 {
    (hash & (slots / PENDING_WAYS - 1)) * PENDING_WAYS
}

/// Value of [`MAP_FLOWS`]: where an established flow goes. Written by the
/// datapath only; the daemon reads it to count active flows per backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// Backend slot the flow was given.
    pub backend_slot: u32,
    /// VIP the flow belongs to (a reused key of another VIP does not match).
    pub vip_index: u32,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC_COARSE) of a recent packet,
    /// refreshed at most every [`FLOW_REFRESH_NS`].
    pub last_seen_ns: u64,
    /// `FLOW_FLAG_*` bits.
    pub flags: u32,
    /// [`Backend::generation`] of the slot when the flow was given it.
    pub generation: u32,
}
const _: () = assert!(size_of::<FlowEntry>() == 24);

/// Value of [`MAP_NEW_FLOWS`]: an unconfirmed flow, pinned in a slot of the
/// bucket its flow hash selects. Written by the datapath only. A new flow
/// takes the bucket's slot with the oldest `created_ns` (0: empty or
/// confirmed). A flow whose slot a later flow took is no longer pinned: its
/// next packet takes the Maglev choice again, as after an eviction from an
/// LRU table. One cache line.
///
/// Two CPUs may write one slot at once (two flows of one bucket), and a slot
/// is written field by field, so a slot may hold parts of two flows.
/// `check` is written with the other fields and covers them all (see
/// [`PendingFlow::check_of`]): a slot whose fields do not agree with it is
/// read as empty, never as a pin to a wrong backend.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PendingFlow {
    pub key: FlowKey,
    /// Backend slot the flow was given.
    pub backend_slot: u32,
    /// [`Backend::generation`] of the slot when the flow was given it.
    pub generation: u32,
    /// The coarse clock when the flow's first packet was seen; 0 once the
    /// flow is confirmed, which frees the slot.
    pub created_ns: u64,
    /// `FLOW_FLAG_*` bits.
    pub flags: u32,
    /// [`PendingFlow::check_of`] the other fields and the key's flow hash.
    pub check: u32,
}
const _: () = assert!(size_of::<PendingFlow>() == 64);

impl PendingFlow {
    /// The check word of a slot holding these fields for the flow whose
    /// [`flow_hash`] is `hash`. Each field moves it differently, so fields
    /// of two flows mixed in one slot do not match either flow's check.
    #[inline(always)]
    pub fn check_of(
        hash: u32,
        backend_slot: u32,
        generation: u32,
        created_ns: u64,
        flags: u32,
    ) -> u32 {
        let mut check = hash ^ 0x9e37_79b9;
        for word in [backend_slot, generation, created_ns as u32, (created_ns >> 32) as u32, flags]
        {
            check = (check ^ word).wrapping_mul(0x85eb_ca6b).rotate_left(13);
        }
        check
    }
}

/// A FIN or RST was seen: the flow still follows its entry (both can be
/// forged, and the balancer never sees the sequence window), but it no longer
/// counts as active, is no longer refreshed, and a SYN on it takes the
/// current table.
pub const FLOW_FLAG_CLOSING: u32 = 1;
/// The closing mark came from a RST: any later packet but a RST or FIN
/// shows the flow is alive (the RST was forged or out of window) and reopens it.
pub const FLOW_FLAG_RESET: u32 = 2;
/// On a [`MAP_NEW_FLOWS`] entry: created by a SYN, so the handshake's ACK
/// (the next packet that is not a SYN) confirms it.
pub const FLOW_FLAG_SYN: u32 = 4;
/// On a [`MAP_FLOWS`] entry, set by the daemon's rebalancer (the one field
/// the daemon writes there): close this flow. The next packet the client
/// sends on it, but a SYN or a RST, reaches its backend turned into a RST
/// with the packet's own sequence number, and the entry is deleted. The
/// daemon sets `last_seen_ns` to the time of the mark; a mark older than
/// [`SHED_TTL_NS`] is stale and cleared instead, so a client silent since
/// is never closed later for an imbalance that has passed.
pub const FLOW_FLAG_SHED: u32 = 8;
/// How long a [`FLOW_FLAG_SHED`] mark holds.
pub const SHED_TTL_NS: u64 = 10_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot written field by field by two CPUs at once may hold any mix of
    /// the two flows' fields: no mix but the flows' own passes either check.
    #[test]
    fn a_pending_slot_mixed_from_two_flows_matches_neither_check() {
        let (hash_a, hash_b) = (0x1234_5678, 0x9abc_def0);
        let a = [3, 7, 1_000_000_000, 4];
        let b = [5, 7, 1_000_000_000, 0];
        let check = |hash, fields: [u64; 4]| {
            PendingFlow::check_of(
                hash,
                fields[0] as u32,
                fields[1] as u32,
                fields[2],
                fields[3] as u32,
            )
        };
        let (check_a, check_b) = (check(hash_a, a), check(hash_b, b));
        for mask in 0..16u32 {
            let mixed: [u64; 4] =
                core::array::from_fn(
                    |field| if mask & (1 << field) != 0 { b[field] } else { a[field] },
                );
            if mixed != a {
                assert_ne!(check(hash_a, mixed), check_a, "{mixed:?} passes as flow a");
                assert_ne!(check(hash_a, mixed), check_b, "a's key, b's check word");
            }
            if mixed != b {
                assert_ne!(check(hash_b, mixed), check_b, "{mixed:?} passes as flow b");
                assert_ne!(check(hash_b, mixed), check_a, "b's key, a's check word");
            }
        }
    }
}
