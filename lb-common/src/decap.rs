//! The backend side of tunnelled forwarding: `lb decap`'s XDP program
//! (`lb_decap`), which takes IPIP, IP6IP6 and GUE packets addressed to its
//! host off their outer headers and passes the inner packet to the kernel.

/// Name of the decapsulating XDP program in its object.
pub const DECAP_PROGRAM_NAME: &str = "lb_decap";

/// `HashMap<VipAddressKey, u32>`: the host's own addresses (every
/// interface's, loopback's VIPs among them). A tunnel packet is taken only
/// when its outer destination is one, and its inner packet kept only when
/// its destination is one. Written by `lb decap`.
pub const MAP_DECAP_LOCAL: &str = "LB_DECAP_LOCAL";
/// `PerCpuArray<u64>`: one counter per [`DecapReason`].
pub const MAP_DECAP_STATS: &str = "LB_DECAP_STATS";
/// Entries of [`MAP_DECAP_LOCAL`].
pub const DECAP_MAX_ADDRESSES: u32 = 4_096;

/// Global (`u16`): the UDP port GUE packets arrive on ([`crate::DEFAULT_GUE_PORT`]).
pub const GLOBAL_DECAP_GUE_PORT: &str = "LB_DECAP_GUE_PORT";

/// What the decapsulator did with a frame. Indexes [`MAP_DECAP_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// A tunnel packet for this host: its inner packet went to the kernel.
    Decapsulated = 0,
    /// Not a tunnel packet (the host's other traffic): passed as it is.
    PassNotTunnel = 1,
    /// A tunnel packet whose outer destination is not this host's: passed
    /// as it is (the kernel routes or drops it).
    PassNotForUs = 2,
    /// A tunnel packet for this host that is truncated, of an unknown GUE
    /// version, or whose inner packet is not IP or does not fit: dropped.
    DropMalformed = 3,
    /// A tunnel packet for this host whose inner destination is not one of
    /// its addresses: dropped, never delivered as something else.
    DropInnerNotLocal = 4,
}

impl DecapReason {
    pub const COUNT: u32 = 5;
    pub const ALL: [DecapReason; Self::COUNT as usize] = [
        DecapReason::Decapsulated,
        DecapReason::PassNotTunnel,
        DecapReason::PassNotForUs,
        DecapReason::DropMalformed,
        DecapReason::DropInnerNotLocal,
    ];

    /// Stable name used by `lb decap --stats`.
    pub const fn name(self) -> &'static str {
        match self {
            DecapReason::Decapsulated => "decapsulated",
            DecapReason::PassNotTunnel => "pass_not_tunnel",
            DecapReason::PassNotForUs => "pass_not_for_us",
            DecapReason::DropMalformed => "drop_malformed",
            DecapReason::DropInnerNotLocal => "drop_inner_not_local",
        }
    }
}
