//! One's-complement arithmetic of the Internet checksum (RFC 1071), shared
//! by the rewrites that recompute one (reset, encap).

use aya_ebpf::programs::XdpContext;

use crate::parse::ptr_at;

/// The big-endian 16-bit word at `offset`.
#[inline(always)]
pub fn word_at(ctx: &XdpContext, offset: usize) -> Option<u32> {
    let word = ptr_at::<[u8; 2]>(ctx, offset)?;
    // SAFETY: ptr_at checked both bytes are within the frame.
    Some(u32::from(u16::from_be_bytes(unsafe { *word })))
}

/// A 32-bit sum of 16-bit words folded to 16 bits.
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    ((sum & 0xffff) + (sum >> 16)) as u16
}
