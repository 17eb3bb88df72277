//! What the datapath counts and reports: flow events, flow changes for
//! peer balancers, traffic per VIP and backend, and the reason of every exit.

use core::mem::size_of;

use crate::FlowKey;

/// What the flow tables did for a VIP packet. Indexes [`MAP_FLOW_EVENTS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEvent {
    /// A new flow (TCP SYN, or a UDP packet without an entry) took the
    /// Maglev choice, recorded in [`MAP_NEW_FLOWS`] until confirmed.
    Created = 0,
    /// The flow followed its confirmed entry.
    Hit = 1,
    /// A TCP packet other than a SYN without an entry (after a restart, or
    /// from another balancer): it took the Maglev choice, recorded as new.
    MissFallback = 2,
    /// The flow's backend is down or gone: it took the Maglev choice among the others.
    Rescued = 3,
    /// A UDP flow idle longer than the timeout started over as a new flow.
    Expired = 4,
    /// A flow change could not be reported for sync: [`MAP_FLOW_SYNC`] was
    /// full. Peers learn that flow at their next full resync.
    SyncLost = 5,
    /// The flow followed its unconfirmed entry in [`MAP_NEW_FLOWS`].
    NewHit = 6,
    /// An unconfirmed flow was confirmed (its handshake's ACK, or a packet
    /// [`FLOW_CONFIRM_NS`] after its first) and moved to [`MAP_FLOWS`].
    /// Far fewer confirmations than `created` + `miss_fallback` is the mark
    /// of a flood of spoofed tuples, which never reach the flow table.
    Confirmed = 7,
    /// A SYN on a closing or idle entry: a new connection on a reused port,
    /// which took the current table.
    Renewed = 8,
    /// A packet other than a RST or FIN on an entry a RST had closed: the
    /// flow is alive (the RST was forged or out of window) and open again.
    Reopened = 9,
    /// A packet of a flow the rebalancer marked ([`crate::FLOW_FLAG_SHED`])
    /// went to its backend as a RST, and the flow's entry was deleted.
    Shed = 10,
}

impl FlowEvent {
    pub const COUNT: u32 = 11;
    pub const ALL: [FlowEvent; Self::COUNT as usize] = [
        FlowEvent::Created,
        FlowEvent::Hit,
        FlowEvent::MissFallback,
        FlowEvent::Rescued,
        FlowEvent::Expired,
        FlowEvent::SyncLost,
        FlowEvent::NewHit,
        FlowEvent::Confirmed,
        FlowEvent::Renewed,
        FlowEvent::Reopened,
        FlowEvent::Shed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            FlowEvent::Created => "created",
            FlowEvent::Hit => "hit",
            FlowEvent::MissFallback => "miss_fallback",
            FlowEvent::Rescued => "rescued",
            FlowEvent::Expired => "expired",
            FlowEvent::SyncLost => "sync_lost",
            FlowEvent::NewHit => "new_hit",
            FlowEvent::Confirmed => "confirmed",
            FlowEvent::Renewed => "renewed",
            FlowEvent::Reopened => "reopened",
            FlowEvent::Shed => "shed",
        }
    }
}

/// What happened to a flow, as reported in a [`FlowSyncEvent`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowSyncKind {
    /// The flow was given (or moved to) `backend_slot`.
    Open = 0,
    /// The client or server sent a FIN: the flow is closing.
    Closing = 1,
    /// A RST closed the flow (its entry stays, marked closing: a RST can be forged).
    Reset = 2,
}

impl FlowSyncKind {
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Open),
            1 => Some(Self::Closing),
            2 => Some(Self::Reset),
            _ => None,
        }
    }
}

/// One record of [`MAP_FLOW_SYNC`], written by the datapath when it creates
/// or closes a flow-table entry. The daemon translates the VIP index and
/// backend slot (which are local to this balancer) into addresses before
/// telling its peers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSyncEvent {
    pub flow: FlowKey,
    pub vip_index: u32,
    pub backend_slot: u32,
    /// A [`FlowSyncKind`].
    pub kind: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FlowSyncEvent>() == 56);

/// Per-CPU packet and byte counts (bytes of the whole frame as received).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrafficCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Of `packets`, the ICMP errors about the VIP's flows (path MTU,
    /// unreachable, time exceeded) forwarded to the flow's backend.
    pub icmp_errors: u64,
    /// VIPs only, not in `packets`: packets of the VIP dropped after its
    /// lookup (no backend, backend MAC unresolved, internal). Counted on
    /// the drop path only, so forwarding pays nothing for it.
    pub dropped: u64,
}
const _: () = assert!(size_of::<TrafficCounters>() == 32);

/// Why the datapath let a packet go the way it did: every exit of the
/// program counts exactly one reason. Indexes [`MAP_REASONS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Rewritten and transmitted to a backend.
    Forwarded = 0,
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed to the kernel.
    PassNotIp = 1,
    /// Not addressed to a VIP (address, port, protocol): passed to the kernel.
    PassNotVip = 2,
    /// Ethernet or IP header truncated or invalid, destination unknown: passed
    /// to the kernel, which validates and drops it.
    PassMalformed = 3,
    /// More than two VLAN tags: passed to the kernel.
    PassVlanDepth = 4,
    /// An IPv4 or IPv6 fragment to a VIP address: dropped (fragments carry no
    /// ports, so they cannot be hashed to the backend of their flow).
    DropFragment = 5,
    /// To a VIP address, but the IPv6 extension-header chain is longer than the
    /// datapath walks, or uses a header it cannot skip (ESP); or, to a `gue`
    /// VIP, its extension headers are longer than the 64 bytes the outer UDP
    /// checksum is summed over: dropped.
    DropUnhashable = 6,
    /// TCP or UDP header truncated, to a VIP address: dropped.
    DropMalformedL4 = 7,
    /// The VIP has no backends: dropped.
    DropNoBackend = 8,
    /// The chosen backend's MAC is not resolved yet: dropped.
    DropBackendUnresolved = 9,
    /// A map lookup that cannot fail did: dropped (a bug if ever non-zero).
    DropInternal = 10,
    /// Addressed to another MAC (a flooded frame, or promiscuous mode),
    /// broadcast or multicast: passed to the kernel, never forwarded, so a
    /// balancer never takes over a dead peer's frames behind the router's back.
    PassNotForUs = 11,
    /// An ICMP error about a VIP's flow (fragmentation needed / packet too
    /// big, unreachable, time exceeded), forwarded to that flow's backend so
    /// that its TCP learns the path MTU.
    ForwardedIcmp = 12,
    /// ICMP to a VIP address that is not an error (echo, neighbour
    /// discovery): passed to the kernel.
    PassIcmp = 13,
    /// An ICMP error to a VIP address whose quoted header is truncated or
    /// not TCP/UDP: dropped.
    DropIcmpMalformed = 14,
    /// An ICMP error to a VIP address quoting a packet that is not from one
    /// of our VIPs (or from a VIP without backends): dropped.
    DropIcmpUnmatched = 15,
    /// For an `ipip`/`gue` VIP, but the balancer has no address of the
    /// packet's family to send the tunnel from: dropped.
    DropNoTunnelSource = 16,
    /// For an `ipip`/`gue` VIP, but the packet with its outer headers would
    /// exceed the egress MTU, and it could not be answered (IPv4 without
    /// DF, or past [`crate::ICMP_TOO_BIG_PER_SECOND`]): dropped (never sent
    /// as a fragment or to be lost on the wire).
    DropTooBig = 17,
    /// For an `ipip`/`gue` VIP, but the packet with its outer headers would
    /// exceed the egress MTU: answered to the client with ICMP
    /// "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big",
    /// carrying the MTU that fits, so its TCP lowers its segment size.
    AnsweredTooBig = 18,
}

impl Reason {
    pub const COUNT: u32 = 19;
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Forwarded,
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassMalformed,
        Reason::PassVlanDepth,
        Reason::DropFragment,
        Reason::DropUnhashable,
        Reason::DropMalformedL4,
        Reason::DropNoBackend,
        Reason::DropBackendUnresolved,
        Reason::DropInternal,
        Reason::PassNotForUs,
        Reason::ForwardedIcmp,
        Reason::PassIcmp,
        Reason::DropIcmpMalformed,
        Reason::DropIcmpUnmatched,
        Reason::DropNoTunnelSource,
        Reason::DropTooBig,
        Reason::AnsweredTooBig,
    ];

    /// Stable name used by `lb stats` and its JSON output.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassVlanDepth => "pass_vlan_depth",
            Reason::DropFragment => "drop_fragment",
            Reason::DropUnhashable => "drop_unhashable",
            Reason::DropMalformedL4 => "drop_malformed_l4",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropBackendUnresolved => "drop_backend_unresolved",
            Reason::DropInternal => "drop_internal",
            Reason::PassNotForUs => "pass_not_for_us",
            Reason::ForwardedIcmp => "forwarded_icmp",
            Reason::PassIcmp => "pass_icmp",
            Reason::DropIcmpMalformed => "drop_icmp_malformed",
            Reason::DropIcmpUnmatched => "drop_icmp_unmatched",
            Reason::DropNoTunnelSource => "drop_no_tunnel_source",
            Reason::DropTooBig => "drop_too_big",
            Reason::AnsweredTooBig => "answered_too_big",
        }
    }

    /// Whether packets counted under this reason are dropped (else passed or forwarded).
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::DropFragment
                | Reason::DropUnhashable
                | Reason::DropMalformedL4
                | Reason::DropNoBackend
                | Reason::DropBackendUnresolved
                | Reason::DropInternal
                | Reason::DropIcmpMalformed
                | Reason::DropIcmpUnmatched
                | Reason::DropNoTunnelSource
                | Reason::DropTooBig
        )
    }
}
