//! How many established TCP connections this host has on the VIPs: the
//! kernel's socket table through sock_diag (filtered by state in the
//! kernel, so a host with a million sockets answers in one dump, without
//! parsing /proc text). With direct server return a client's connection
//! has the VIP as its local address, so these are exactly the connections
//! the balancers sent here.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use anyhow::{Context as _, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// Established TCP connections whose local end is one of `endpoints`.
pub fn established(endpoints: &BTreeSet<SocketAddr>) -> anyhow::Result<usize> {
    // Both families always: a server listening on [::] holds its IPv4
    // connections as IPv6 sockets with IPv4-mapped addresses.
    let mut count = 0;
    for family in [AF_INET, AF_INET6] {
        count += dump(family, |local| {
            endpoints.contains(&SocketAddr::new(local.ip().to_canonical(), local.port()))
        })?;
    }
    Ok(count)
}

/// Counts the established sockets of `family` whose local end `wanted` accepts.
fn dump(family: u8, wanted: impl Fn(SocketAddr) -> bool) -> anyhow::Result<usize> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a sock_diag socket")?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    let request = InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::ESTABLISHED,
        socket_id,
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0).context("asking sock_diag")?;

    let mut count = 0;
    let mut buffer = vec![0; 1 << 16];
    loop {
        let size = socket.recv(&mut &mut buffer[..], 0).context("reading sock_diag")?;
        let mut offset = 0;
        while offset < size {
            let answer = NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[offset..size])
                .context("a sock_diag answer that does not parse")?;
            let length = answer.header.length as usize;
            match answer.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let id = &response.header.socket_id;
                    if wanted(SocketAddr::new(id.source_address, id.source_port)) {
                        count += 1;
                    }
                }
                NetlinkPayload::Done(_) => return Ok(count),
                NetlinkPayload::Error(error) => bail!("sock_diag refused the dump: {error:?}"),
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_established_connections_on_the_given_endpoints() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let endpoints = BTreeSet::from([local]);
        assert_eq!(established(&endpoints).unwrap(), 0, "a listener is not established");
        let clients: Vec<_> =
            (0..3).map(|_| std::net::TcpStream::connect(local).unwrap()).collect();
        let accepted: Vec<_> = (0..3).map(|_| listener.accept().unwrap()).collect();
        assert_eq!(established(&endpoints).unwrap(), 3);
        let elsewhere = BTreeSet::from([SocketAddr::new(local.ip(), local.port().wrapping_add(1))]);
        assert_eq!(established(&elsewhere).unwrap(), 0);
        drop((clients, accepted));
    }

    #[test]
    fn counts_ipv4_connections_of_a_server_listening_on_both_families() {
        let Ok(listener) = std::net::TcpListener::bind("[::]:0") else { return };
        let port = listener.local_addr().unwrap().port();
        let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let client = std::net::TcpStream::connect(local).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(accepted.local_addr().unwrap().is_ipv6(), "a dual-stack socket");
        assert_eq!(established(&BTreeSet::from([local])).unwrap(), 1);
        drop((client, accepted));
    }
}
