//! Header parsing: one file per header family, every read through `ptr_at`.

pub mod ethernet;
pub mod icmp;
pub mod ip;
pub mod transport;

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;

/// Furthest offset at which the datapath reads a header. Bounding offsets is
/// what lets the verifier accept reads at variable positions (IPv4 options,
/// IPv6 extension headers).
pub const MAX_HEADER_OFFSET: usize = 512;

/// A pointer to a `T` at `offset` from the start of the frame, or None when
/// the frame is too short. The only way the datapath reads packet bytes.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset > MAX_HEADER_OFFSET || start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    ptr_at::<T>(ctx, offset).map(|ptr| ptr as *mut T)
}
