//! Passes every frame. Attached to the far end of a veth link whose near end
//! runs the balancer: veth delivers XDP_TX frames only to a peer that runs an
//! XDP program of its own. It has no maps, so iproute2 can load it.
// Built for the BPF target by lb-userspace's build.rs; on the host (cargo
// build/clippy --workspace) it compiles to an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[path = "../runtime.rs"]
mod runtime;

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
