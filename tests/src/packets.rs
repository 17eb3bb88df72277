//! Test packets: built with etherparse, then bent where a case needs a
//! header no well-behaved stack would send.

use std::net::IpAddr;

use etherparse::{IpHeaders, Ipv4Header, Ipv4Options, PacketBuilder, VlanId};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const BALANCER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// Where the IP header starts in frames built here without VLAN tags.
pub const L3_OFFSET: usize = 14;

#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub client: IpAddr,
    pub client_port: u16,
    pub vip: IpAddr,
    pub vip_port: u16,
    pub l4: L4,
}

/// Which TCP segment a frame carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Segment {
    /// A connection's first segment.
    #[default]
    Syn,
    /// A segment of an established connection.
    Ack,
    Fin,
    Rst,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Shape {
    pub segment: Segment,
    /// VLAN IDs, outermost first (0 to 2 of them).
    pub vlans: &'static [u16],
    /// IPv4 options bytes (a multiple of 4).
    pub ipv4_options: &'static [u8],
}

/// A client-to-VIP frame carrying `payload`.
pub fn frame(flow: Flow, shape: Shape, payload: &[u8]) -> Vec<u8> {
    let ethernet = PacketBuilder::ethernet2(CLIENT_MAC, BALANCER_MAC);
    let vlan = |id: u16| VlanId::try_new(id).expect("valid VLAN ID");
    let mut out = Vec::new();
    macro_rules! finish {
        ($ip:expr) => {
            match flow.l4 {
                L4::Tcp => {
                    let tcp = $ip.tcp(flow.client_port, flow.vip_port, 1000, 64_000);
                    let tcp = match shape.segment {
                        Segment::Syn => tcp.syn(),
                        Segment::Ack => tcp.ack(1),
                        Segment::Fin => tcp.ack(1).fin(),
                        Segment::Rst => tcp.rst(),
                    };
                    tcp.write(&mut out, payload)
                }
                L4::Udp => $ip.udp(flow.client_port, flow.vip_port).write(&mut out, payload),
            }
        };
    }
    macro_rules! ip {
        ($step:expr) => {
            match (flow.client, flow.vip) {
                (IpAddr::V4(client), IpAddr::V4(vip)) => {
                    let protocol = match flow.l4 {
                        L4::Tcp => etherparse::IpNumber::TCP,
                        L4::Udp => etherparse::IpNumber::UDP,
                    };
                    let mut header =
                        Ipv4Header::new(0, 64, protocol, client.octets(), vip.octets())
                            .expect("header");
                    header.options = Ipv4Options::try_from(shape.ipv4_options)
                        .expect("options of 4-byte multiples");
                    finish!($step.ip(IpHeaders::Ipv4(header, Default::default())))
                }
                (IpAddr::V6(client), IpAddr::V6(vip)) => {
                    finish!($step.ipv6(client.octets(), vip.octets(), 64))
                }
                _ => panic!("client and VIP of different families"),
            }
        };
    }
    match shape.vlans {
        [] => ip!(ethernet),
        [id] => ip!(ethernet.single_vlan(vlan(*id))),
        [outer, inner] => ip!(ethernet.double_vlan(vlan(*outer), vlan(*inner))),
        _ => panic!("at most two VLAN tags; build deeper stacks by hand"),
    }
    .expect("writing to a Vec cannot fail");
    out
}

/// The frame as the balancer must emit it in DSR mode: only the MACs change.
pub fn dsr_rewritten(input: &[u8], backend_mac: [u8; 6]) -> Vec<u8> {
    let mut output = input.to_vec();
    output[0..6].copy_from_slice(&backend_mac);
    output[6..12].copy_from_slice(&input[0..6]);
    output
}

/// Cuts an untagged IP frame to `length` bytes and sets the IP length field
/// to match, so that the IP packet itself is short (not just the frame).
pub fn truncate_ip(frame: &[u8], length: usize) -> Vec<u8> {
    let mut out = frame[..length].to_vec();
    let ip_len = length - L3_OFFSET;
    if out[L3_OFFSET] >> 4 == 4 {
        out[L3_OFFSET + 2..L3_OFFSET + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    } else {
        out[L3_OFFSET + 4..L3_OFFSET + 6].copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
    }
    out
}

/// Marks an untagged IPv4 frame as a fragment (more-fragments flag and the
/// given offset in 8-byte units). Checksums are left alone: the datapath
/// does not verify them.
pub fn make_ipv4_fragment(frame: &mut [u8], more_fragments: bool, offset_units: u16) {
    let flags_and_offset = (u16::from(more_fragments) << 13) | (offset_units & 0x1fff);
    frame[L3_OFFSET + 6..L3_OFFSET + 8].copy_from_slice(&flags_and_offset.to_be_bytes());
}

/// Inserts IPv6 extension headers after the fixed header of an untagged IPv6
/// frame. Each is (type, total length in bytes, a multiple of 8).
pub fn insert_ipv6_extensions(frame: &[u8], extensions: &[(u8, usize)]) -> Vec<u8> {
    let fixed_end = L3_OFFSET + 40;
    let mut next_header = frame[L3_OFFSET + 6];
    let mut chain = Vec::new();
    // Build from the innermost outwards so every header names its successor.
    for &(kind, length) in extensions.iter().rev() {
        assert!(length >= 8 && length % 8 == 0, "extension headers are 8-byte multiples");
        let mut header = vec![0u8; length];
        header[0] = next_header;
        header[1] = if kind == 51 { (length / 4 - 2) as u8 } else { (length / 8 - 1) as u8 };
        header.extend_from_slice(&chain);
        chain = header;
        next_header = kind;
    }
    let mut out = frame[..fixed_end].to_vec();
    out[L3_OFFSET + 6] = next_header;
    let payload_length = u16::from_be_bytes([frame[L3_OFFSET + 4], frame[L3_OFFSET + 5]]) as usize;
    out[L3_OFFSET + 4..L3_OFFSET + 6]
        .copy_from_slice(&((payload_length + chain.len()) as u16).to_be_bytes());
    out.extend_from_slice(&chain);
    out.extend_from_slice(&frame[fixed_end..]);
    out
}

/// An ICMP message a router sends to a VIP: the type and code, by number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icmp {
    pub kind: u8,
    pub code: u8,
}

impl Icmp {
    pub const FRAGMENTATION_NEEDED: Icmp = Icmp { kind: 3, code: 4 };
    pub const PORT_UNREACHABLE: Icmp = Icmp { kind: 3, code: 3 };
    pub const TTL_EXCEEDED: Icmp = Icmp { kind: 11, code: 0 };
    pub const ECHO_REQUEST: Icmp = Icmp { kind: 8, code: 0 };
    pub const V6_UNREACHABLE: Icmp = Icmp { kind: 1, code: 3 };
    pub const V6_PACKET_TOO_BIG: Icmp = Icmp { kind: 2, code: 0 };
    pub const V6_HOP_LIMIT_EXCEEDED: Icmp = Icmp { kind: 3, code: 0 };
    pub const V6_ECHO_REQUEST: Icmp = Icmp { kind: 128, code: 0 };
}

/// The router that sends the ICMP errors of the tests.
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// A backend's reply in `flow` (from VIP:port to client:port), as an IP
/// packet without Ethernet: what an ICMP error quotes.
pub fn reply_packet(flow: Flow, payload: &[u8]) -> Vec<u8> {
    let ip = match (flow.vip, flow.client) {
        (IpAddr::V4(vip), IpAddr::V4(client)) => {
            PacketBuilder::ipv4(vip.octets(), client.octets(), 64)
        }
        (IpAddr::V6(vip), IpAddr::V6(client)) => {
            PacketBuilder::ipv6(vip.octets(), client.octets(), 64)
        }
        _ => panic!("client and VIP of different families"),
    };
    let mut out = Vec::new();
    let written = match flow.l4 {
        L4::Tcp => {
            ip.tcp(flow.vip_port, flow.client_port, 1, 64_000).ack(1001).write(&mut out, payload)
        }
        L4::Udp => ip.udp(flow.vip_port, flow.client_port).write(&mut out, payload),
    };
    written.expect("writing to a Vec cannot fail");
    out
}

/// A frame from a router (`router`) to `to` carrying ICMP `icmp` (ICMPv6
/// for IPv6) with `quote` as its body: an error's quoted packet, or an
/// echo's data. Fragmentation needed and packet too big carry an MTU of 1280.
pub fn icmp_frame(router: IpAddr, to: IpAddr, icmp: Icmp, quote: &[u8]) -> Vec<u8> {
    let ethernet = PacketBuilder::ethernet2(ROUTER_MAC, BALANCER_MAC);
    let mtu: [u8; 4] = match icmp {
        Icmp::FRAGMENTATION_NEEDED => [0, 0, 0x05, 0x00],
        Icmp::V6_PACKET_TOO_BIG => 1280u32.to_be_bytes(),
        _ => [0; 4],
    };
    let mut out = Vec::new();
    let written = match (router, to) {
        (IpAddr::V4(router), IpAddr::V4(to)) => ethernet
            .ipv4(router.octets(), to.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::Unknown {
                type_u8: icmp.kind,
                code_u8: icmp.code,
                bytes5to8: mtu,
            })
            .write(&mut out, quote),
        (IpAddr::V6(router), IpAddr::V6(to)) => ethernet
            .ipv6(router.octets(), to.octets(), 64)
            .icmpv6(etherparse::Icmpv6Type::Unknown {
                type_u8: icmp.kind,
                code_u8: icmp.code,
                bytes5to8: mtu,
            })
            .write(&mut out, quote),
        _ => panic!("router and destination of different families"),
    };
    written.expect("writing to a Vec cannot fail");
    out
}
