//! Backend next hops from the kernel's FIB and neighbour table. The
//! operator never types a MAC: for each backend this task asks the kernel's
//! routing table how it is reached (`ip route get`: on-link, or through a
//! router), reads the neighbour table of the balancer's interface for that
//! next hop, asks the kernel to resolve the ones it lacks (NTF_USE, the same
//! as the stack does before sending), and reports what it finds to the
//! daemon. A backend whose route leaves by another interface is not
//! reported (its packets are counted as unresolved). It never touches BPF
//! maps.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt as _;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use tokio::sync::{mpsc, watch};

use crate::model::{Mac, NextHop};

/// How often the table is read again (a backend whose MAC changes is
/// followed within this time).
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// How each wanted address is reached, where it could be resolved.
pub type Neighbours = BTreeMap<IpAddr, NextHop>;

/// The index of interface `iface`, as the kernel names it in netlink.
pub fn interface_index(iface: &str) -> std::io::Result<u32> {
    nix::net::if_::if_nametoindex(iface).map_err(std::io::Error::from)
}

/// The MAC of interface `iface`.
pub fn interface_mac(iface: &str) -> std::io::Result<Mac> {
    let not_found = || {
        std::io::Error::new(std::io::ErrorKind::NotFound, format!("interface '{iface}' has no MAC"))
    };
    nix::ifaddrs::getifaddrs()?
        .filter(|entry| entry.interface_name == iface)
        .find_map(|entry| entry.address?.as_link_addr()?.addr())
        .ok_or_else(not_found)
}

/// Runs until `updates` is closed.
pub async fn run(
    ifindex: u32,
    mut wanted: watch::Receiver<Vec<IpAddr>>,
    updates: mpsc::Sender<Neighbours>,
) -> anyhow::Result<()> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let mut last_sent = Neighbours::new();
    loop {
        let want = wanted.borrow_and_update().clone();
        match read_table(&handle, ifindex).await {
            Ok(table) => {
                let mut found = Neighbours::new();
                for address in &want {
                    let gateway = match route_via(&handle, ifindex, *address).await {
                        Ok(Some(gateway)) => gateway,
                        Ok(None) => continue,
                        Err(error) => {
                            tracing::debug!(%address, %error, "route lookup failed");
                            continue;
                        }
                    };
                    let hop = gateway.unwrap_or(*address);
                    match table.get(&hop) {
                        Some(Entry { mac: Some(mac), state }) if usable(*state) => {
                            found.insert(*address, NextHop { mac: *mac, gateway });
                        }
                        _ => {
                            if let Err(error) = request_resolution(&handle, ifindex, hop).await {
                                tracing::debug!(%hop, %error, "neighbour resolution request failed");
                            }
                        }
                    }
                }
                if found != last_sent {
                    if updates.send(found.clone()).await.is_err() {
                        return Ok(());
                    }
                    last_sent = found;
                }
            }
            Err(error) => tracing::warn!(%error, "reading the neighbour table failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            changed = wanted.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}

/// How the kernel routes to `address`: Some(None) on-link out of
/// `ifindex`, Some(Some(router)) through a router out of it, None when the
/// route leaves by another interface (or is not unicast).
async fn route_via(
    handle: &rtnetlink::Handle,
    ifindex: u32,
    address: IpAddr,
) -> Result<Option<Option<IpAddr>>, rtnetlink::Error> {
    let prefix = if address.is_ipv4() { 32 } else { 128 };
    let message = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(address, prefix)
        .map_err(|_| rtnetlink::Error::RequestFailed)?
        .build();
    let mut routes = handle.route().get(message).execute();
    let Some(route) = routes.try_next().await? else { return Ok(None) };
    let mut oif = None;
    let mut gateway = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(index) => oif = Some(*index),
            RouteAttribute::Gateway(RouteAddress::Inet(v4)) => gateway = Some(IpAddr::V4(*v4)),
            RouteAttribute::Gateway(RouteAddress::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            _ => {}
        }
    }
    Ok((oif == Some(ifindex)).then_some(gateway))
}

struct Entry {
    mac: Option<Mac>,
    state: NeighbourState,
}

/// A MAC in these states was learned from the backend itself.
fn usable(state: NeighbourState) -> bool {
    matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    )
}

async fn read_table(
    handle: &rtnetlink::Handle,
    ifindex: u32,
) -> Result<BTreeMap<IpAddr, Entry>, rtnetlink::Error> {
    let mut messages = handle.neighbours().get().execute();
    let mut table = BTreeMap::new();
    while let Some(message) = messages.try_next().await? {
        if message.header.ifindex != ifindex {
            continue;
        }
        if let Some((address, entry)) = parse_entry(&message) {
            table.insert(address, entry);
        }
    }
    Ok(table)
}

fn parse_entry(message: &NeighbourMessage) -> Option<(IpAddr, Entry)> {
    let mut address = None;
    let mut mac = None;
    for attribute in &message.attributes {
        match attribute {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                address = Some(IpAddr::V4(*v4))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                address = Some(IpAddr::V6(*v6))
            }
            NeighbourAttribute::LinkLayerAddress(bytes) => {
                mac = <Mac>::try_from(bytes.as_slice()).ok()
            }
            _ => {}
        }
    }
    Some((address?, Entry { mac, state: message.header.state }))
}

/// Asks the kernel to resolve `address` on the interface, creating the entry
/// if needed, without sending any data to the backend.
async fn request_resolution(
    handle: &rtnetlink::Handle,
    ifindex: u32,
    address: IpAddr,
) -> Result<(), rtnetlink::Error> {
    let mut request = handle.neighbours().add(ifindex, address).replace();
    request.message_mut().header.state = NeighbourState::None;
    request.message_mut().header.flags = NeighbourFlags::Use;
    request.execute().await
}
