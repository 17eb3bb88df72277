//! Forwarding mode `dsr` (L2 direct server return): only the Ethernet
//! addresses change; IP and L4 stay as the client sent them, and the backend,
//! which holds the VIP on its loopback, answers the client directly.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, Reason};
use network_types::eth::EthHdr;

use crate::parse::ptr_at_mut;

/// Sends the frame to `backend` out of the interface it came in on.
#[inline(always)]
pub fn forward(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    let eth = ptr_at_mut::<EthHdr>(ctx, 0).ok_or(Reason::DropInternal)?;
    // SAFETY: ptr_at_mut checked that the Ethernet header lies within the packet.
    unsafe {
        // The frame was addressed to us, so its destination MAC is ours.
        (*eth).src_addr = (*eth).dst_addr;
        (*eth).dst_addr = backend.mac;
    }
    Ok(xdp_action::XDP_TX)
}
