//! Passes every frame. Attached to the far end of a veth link whose near end
//! runs the balancer: veth delivers XDP_TX frames only to a peer that runs an
//! XDP program of its own. It has no maps, so iproute2 can load it.
// Built for the BPF target by lb-userspace's build.rs; on the host (cargo
// build/clippy --workspace) it compiles to an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
