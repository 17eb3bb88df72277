//! The frames a tunnelled VIP's balancer must send, built independently of
//! the datapath with etherparse's headers and checksums: a client's frame
//! encapsulated to its backend, and the ICMP answer to one too big for the
//! tunnel. tests/tests/tunnel.rs compares the datapath's output with them
//! byte for byte.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpDscp, IpEcn, IpNumber, Ipv4Header,
    Ipv6FlowLabel, Ipv6Header, UdpHeader, icmpv4,
};
use lb_common::tunnel_entropy;
use lb_userspace::model::ForwardingMode;

use crate::fixture::backend_mac;
use crate::packets::{BALANCER_MAC, Flow};
use crate::tunnels::{GUE_PORT, SOURCE_V4, SOURCE_V6, key};

/// The frame the balancer must send for `input` (an untagged or tagged
/// frame whose IP header starts at `l3`) of `flow` to `backend` in `mode`,
/// built independently: etherparse's headers and checksums.
pub fn expected(
    input: &[u8],
    l3: usize,
    flow: &Flow,
    backend: IpAddr,
    mode: ForwardingMode,
) -> Vec<u8> {
    expected_from(input, l3, flow, backend, mode, (SOURCE_V4, SOURCE_V6))
}

/// [`expected`] with the outer sources `sources` (IPv4, IPv6).
pub fn expected_from(
    input: &[u8],
    l3: usize,
    flow: &Flow,
    backend: IpAddr,
    mode: ForwardingMode,
    sources: (Ipv4Addr, Ipv6Addr),
) -> Vec<u8> {
    let inner = &input[l3..];
    let entropy = tunnel_entropy(&key(flow));
    let gue = mode == ForwardingMode::Gue;
    let mut out = Vec::new();
    out.extend_from_slice(&backend_mac(backend));
    out.extend_from_slice(&BALANCER_MAC);
    out.extend_from_slice(&input[12..l3]);
    let udp_len = (inner.len() + 8) as u16;
    let source_port = 0xc000 | (entropy & 0x3fff) as u16;
    match backend {
        IpAddr::V4(backend) => {
            let protocol = if gue { IpNumber::UDP } else { IpNumber::IPV4 };
            let payload = if gue { udp_len } else { inner.len() as u16 };
            let mut ip =
                Ipv4Header::new(payload, 64, protocol, sources.0.octets(), backend.octets())
                    .unwrap();
            ip.dscp = IpDscp::try_new(inner[1] >> 2).unwrap();
            ip.ecn = IpEcn::try_new(inner[1] & 3).unwrap();
            ip.dont_fragment = inner[6] & 0x40 != 0;
            ip.header_checksum = ip.calc_header_checksum();
            ip.write(&mut out).unwrap();
            if gue {
                // Over IPv4, no UDP checksum (RFC 768 allows zero).
                let udp = UdpHeader {
                    source_port,
                    destination_port: GUE_PORT,
                    length: udp_len,
                    checksum: 0,
                };
                udp.write(&mut out).unwrap();
            }
        }
        IpAddr::V6(backend) => {
            let next_header = if gue { IpNumber::UDP } else { IpNumber::IPV6 };
            let payload_length = if gue { udp_len } else { inner.len() as u16 };
            let ip = Ipv6Header {
                traffic_class: (u16::from_be_bytes([inner[0], inner[1]]) >> 4) as u8,
                flow_label: Ipv6FlowLabel::try_new(entropy & 0xf_ffff).unwrap(),
                payload_length,
                next_header,
                hop_limit: 64,
                source: sources.1.octets(),
                destination: backend.octets(),
            };
            ip.write(&mut out).unwrap();
            if gue {
                let udp = UdpHeader::with_ipv6_checksum(source_port, GUE_PORT, &ip, inner).unwrap();
                udp.write(&mut out).unwrap();
            }
        }
    }
    out.extend_from_slice(inner);
    out
}

/// The ICMP error the balancer must send back for `input`, a client frame
/// too big for its tunnel, built by etherparse: from the VIP to the client,
/// by the MAC it came from, "fragmentation needed" / "packet too big" with
/// `mtu`, quoting the IP header and the first 8 bytes of the transport.
pub fn too_big_answer(input: &[u8], mtu: u16) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&input[6..12]);
    out.extend_from_slice(&input[0..6]);
    out.extend_from_slice(&input[12..14]);
    let ip = &input[14..];
    if ip[0] >> 4 == 4 {
        let header_len = usize::from(ip[0] & 0xf) * 4;
        let quote = &ip[..header_len + 8];
        let kind = Icmpv4Type::DestinationUnreachable(
            icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
        );
        let icmp = Icmpv4Header::with_checksum(kind, quote);
        let length = (icmp.header_len() + quote.len()) as u16;
        let (source, destination) = (&ip[12..16], &ip[16..20]);
        let mut header = Ipv4Header::new(
            length,
            64,
            IpNumber::ICMP,
            destination.try_into().unwrap(),
            source.try_into().unwrap(),
        )
        .unwrap();
        header.dont_fragment = false;
        header.header_checksum = header.calc_header_checksum();
        header.write(&mut out).unwrap();
        icmp.write(&mut out).unwrap();
        out.extend_from_slice(quote);
    } else {
        let quote = &ip[..40 + 8];
        let (source, destination): ([u8; 16], [u8; 16]) =
            (ip[8..24].try_into().unwrap(), ip[24..40].try_into().unwrap());
        let icmp = Icmpv6Header::with_checksum(
            Icmpv6Type::PacketTooBig { mtu: u32::from(mtu) },
            destination,
            source,
            quote,
        )
        .unwrap();
        let header = Ipv6Header {
            payload_length: (icmp.header_len() + quote.len()) as u16,
            next_header: IpNumber::IPV6_ICMP,
            hop_limit: 64,
            source: destination,
            destination: source,
            ..Ipv6Header::default()
        };
        header.write(&mut out).unwrap();
        icmp.write(&mut out).unwrap();
        out.extend_from_slice(quote);
    }
    out
}
