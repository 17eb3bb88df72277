//! Forwarding mode `dsr` (L2 direct server return): only the Ethernet
//! addresses change; IP and L4 stay as the client sent them, and the backend,
//! which holds the VIP on its loopback, answers the client directly. Every
//! forwarding mode sends its frame through [`forward`], which also picks the
//! interface it leaves by.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Backend, Egress, Reason};
use network_types::eth::EthHdr;

use crate::maps::{LB_EGRESS, LB_EGRESS_INFO};
use crate::parse::ptr_at_mut;

/// Sends the frame to `backend`'s MAC: out of the interface it came in on
/// (XDP_TX), or out of the backend's egress interface (XDP_REDIRECT), from
/// that interface's MAC.
#[inline(always)]
pub fn forward(ctx: &XdpContext, backend: &Backend) -> Result<u32, Reason> {
    forward_via(ctx, backend, egress_of(backend)?)
}

/// [`forward`], with the backend's [`egress_of`] already looked up.
#[inline(always)]
pub fn forward_via(
    ctx: &XdpContext,
    backend: &Backend,
    egress: Option<&Egress>,
) -> Result<u32, Reason> {
    let eth = ptr_at_mut::<EthHdr>(ctx, 0).ok_or(Reason::DropInternal)?;
    let Some(egress) = egress else {
        // SAFETY: ptr_at_mut checked that the Ethernet header lies within the packet.
        unsafe {
            // The frame was addressed to us, so its destination MAC is ours.
            (*eth).src_addr = (*eth).dst_addr;
            (*eth).dst_addr = backend.mac;
        }
        return Ok(xdp_action::XDP_TX);
    };
    let frame = eth as *mut u16;
    let (to, from) = (backend.mac.as_ptr() as *const u16, egress.mac.as_ptr() as *const u16);
    // SAFETY: as above; both MACs are 6 bytes. Word by word: as one copy
    // the two adjacent addresses would become a memmove call, which BPF
    // cannot make.
    unsafe {
        for index in 0..3 {
            frame.add(index).write_unaligned(to.add(index).read_unaligned());
            frame.add(3 + index).write_unaligned(from.add(index).read_unaligned());
        }
    }
    // An index the daemon did not fill (it fills every one it hands out
    // before any backend names it) is dropped here, never sent elsewhere.
    LB_EGRESS.redirect(backend.egress, 0).map_err(|_| Reason::DropInternal)
}

/// The egress interface `backend` leaves by as the daemon described it:
/// None for the program's own interface; an error for an index the daemon
/// did not fill.
#[inline(always)]
pub fn egress_of(backend: &Backend) -> Result<Option<&'static Egress>, Reason> {
    if backend.egress == 0 {
        return Ok(None);
    }
    match LB_EGRESS_INFO.get(backend.egress) {
        Some(egress) if egress.mac != [0; 6] => Ok(Some(egress)),
        _ => Err(Reason::DropInternal),
    }
}
