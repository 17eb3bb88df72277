//! Interfaces other than its own that the balancer sends backends' packets
//! out of (`lb run --egress IFACE`): a backend the kernel routes out of one
//! of them gets [`Backend::egress`] set to its index, and its packets leave
//! there by XDP_REDIRECT through [`MAP_EGRESS`] instead of by XDP_TX.

use core::mem::size_of;

#[allow(unused_imports, reason = "named by the doc links")]
use crate::Backend;

/// `DevMap`: egress index -> interface index, for `bpf_redirect_map`. Entry
/// 0 is never used: index 0 is the interface the program runs on. Written
/// by the daemon once, after loading; not pinned (configuration, not
/// state: each load writes it afresh, and the program keeps its own).
pub const MAP_EGRESS: &str = "LB_EGRESS";
/// `Array<Egress>`: egress index -> what frames sent out of that interface
/// carry. Written with [`MAP_EGRESS`], and like it not pinned.
pub const MAP_EGRESS_INFO: &str = "LB_EGRESS_INFO";

/// Entries of [`MAP_EGRESS`] and [`MAP_EGRESS_INFO`]: the balancer's own
/// interface (0) and at most `MAX_EGRESS - 1` `--egress` interfaces.
pub const MAX_EGRESS: u32 = 8;

/// Value of [`MAP_EGRESS_INFO`]: an egress interface as frames sent out of
/// it need it. Written by the daemon, read by the datapath.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Egress {
    /// The interface's MAC: the source of every frame sent out of it.
    pub mac: [u8; 6],
    pub _pad: u16,
    /// The interface's MTU, which tunnelled packets must fit (as
    /// [`crate::GLOBAL_TUNNEL_MTU`] for the balancer's own interface).
    pub mtu: u32,
    /// The outer source of IPv4 tunnels sent out of it, as
    /// [`crate::GLOBAL_TUNNEL_SOURCE_V4`]; zero: none (such packets are
    /// dropped as `drop_no_tunnel_source`).
    pub source_v4: u32,
    /// The outer source of IPv6 tunnels, as [`crate::GLOBAL_TUNNEL_SOURCE_V6`].
    pub source_v6: [u32; 4],
}
const _: () = assert!(size_of::<Egress>() == 32);
