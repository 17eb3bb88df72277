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
    /// TCP flags (`TCP_*`); zero for UDP.
    pub tcp_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The ports of a TCP or UDP header at `offset`; None when it is truncated,
/// in the frame or by the IP packet's length (`l3_end`).
#[inline(always)]
pub fn parse_ports(ctx: &XdpContext, offset: usize, l3_end: usize, protocol: u8) -> Option<Ports> {
    let header_len = if protocol == PROTO_TCP { TcpHdr::LEN } else { UdpHdr::LEN };
    if offset + header_len > l3_end {
        return None;
    }
    match protocol {
        PROTO_TCP => {
            let tcp = ptr_at::<TcpHdr>(ctx, offset)?;
            // SAFETY: ptr_at checked the fixed TCP header is within the packet.
            let tcp = unsafe { &*tcp };
            // The flags byte is the 14th of the header (after data offset/reserved).
            // SAFETY: ptr_at checked the whole fixed header, which holds byte 13.
            let tcp_flags = unsafe { *(tcp as *const TcpHdr as *const u8).add(13) };
            Some(Ports { source: tcp.source, destination: tcp.dest, tcp_flags })
        }
        PROTO_UDP => {
            let udp = ptr_at::<UdpHdr>(ctx, offset)?;
            // SAFETY: ptr_at checked the UDP header is within the packet.
            let udp = unsafe { &*udp };
            Some(Ports { source: udp.src, destination: udp.dst, tcp_flags: 0 })
        }
        _ => None,
    }
}
