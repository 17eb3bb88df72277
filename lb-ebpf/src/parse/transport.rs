//! TCP and UDP: the ports of the flow. The whole fixed header must be present,
//! so nothing truncated reaches a backend.

use aya_ebpf::programs::XdpContext;
use lb_common::{PROTO_TCP, PROTO_UDP};
use network_types::{tcp::TcpHdr, udp::UdpHdr};

use super::ptr_at;

pub struct Ports {
    /// Network byte order, as they appear on the wire.
    pub source: [u8; 2],
    pub destination: [u8; 2],
}

/// The ports of a TCP or UDP header at `offset`; None when it is truncated.
#[inline(always)]
pub fn parse_ports(ctx: &XdpContext, offset: usize, protocol: u8) -> Option<Ports> {
    match protocol {
        PROTO_TCP => {
            let tcp = ptr_at::<TcpHdr>(ctx, offset)?;
            // SAFETY: ptr_at checked the fixed TCP header is within the packet.
            let tcp = unsafe { &*tcp };
            Some(Ports { source: tcp.source, destination: tcp.dest })
        }
        PROTO_UDP => {
            let udp = ptr_at::<UdpHdr>(ctx, offset)?;
            // SAFETY: ptr_at checked the UDP header is within the packet.
            let udp = unsafe { &*udp };
            Some(Ports { source: udp.src, destination: udp.dst })
        }
        _ => None,
    }
}
