//! Backend next hops from the kernel's FIB and neighbour table. The
//! operator never types a MAC: for each backend this task asks the kernel's
//! routing table how it is reached (`ip route get`: on-link, or through a
//! router, and out of which interface), reads the neighbour table of that
//! interface for the next hop, asks the kernel to resolve the ones it lacks
//! (NTF_USE, the same as the stack does before sending), and reports what
//! it finds to the daemon. The interfaces it may send out of are the
//! balancer's own and its `--egress` ones. A backend whose route leaves by
//! any other interface, or that has no route, is not reported (its packets
//! are counted as unresolved), and the task warns once, naming the
//! interface, until that changes. It never touches BPF maps.

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

/// Runs until `updates` is closed. `interfaces` are the indexes of the
/// interfaces packets may leave by: the balancer's own first, then its
/// `--egress` ones, in the order of their egress numbers.
pub async fn run(
    interfaces: Vec<u32>,
    mut wanted: watch::Receiver<Vec<IpAddr>>,
    updates: mpsc::Sender<Neighbours>,
) -> anyhow::Result<()> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let mut last_sent = Neighbours::new();
    // Backends warned about, with the route that made them unreachable.
    let mut warned: BTreeMap<IpAddr, Route> = BTreeMap::new();
    loop {
        let want = wanted.borrow_and_update().clone();
        match read_table(&handle, &interfaces).await {
            Ok(table) => {
                let mut found = Neighbours::new();
                warned.retain(|address, _| want.contains(address));
                for address in &want {
                    // A failed lookup (the kernel answers "unreachable" with an
                    // error) leaves the backend without a route, as no route does.
                    let route =
                        route_via(&handle, &interfaces, *address).await.unwrap_or_else(|error| {
                            tracing::debug!(%address, %error, "route lookup failed");
                            Route::None
                        });
                    let (egress, gateway) = match route {
                        Route::Out { egress, gateway } => {
                            warned.remove(address);
                            (egress, gateway)
                        }
                        route => {
                            if warned.get(address) != Some(&route) {
                                warn_unreachable(&interfaces, *address, route);
                                warned.insert(*address, route);
                            }
                            continue;
                        }
                    };
                    let hop = gateway.unwrap_or(*address);
                    let ifindex = interfaces[egress as usize];
                    match table.get(&(ifindex, hop)) {
                        Some(Entry { mac: Some(mac), state }) if usable(*state) => {
                            found.insert(*address, NextHop { mac: *mac, gateway, egress });
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

/// How the kernel routes to a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Out of interface number `egress` of those lb sends from (0: its
    /// own): on-link (`gateway` None) or through a router.
    Out { egress: u32, gateway: Option<IpAddr> },
    /// Out of another interface (its index), which lb does not send from.
    OtherInterface(u32),
    /// No unicast route at all.
    None,
}

/// Says once why a backend cannot be reached, and what would fix it.
fn warn_unreachable(interfaces: &[u32], address: IpAddr, route: Route) {
    let name = |index: u32| {
        nix::net::if_::if_indextoname(index)
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|_| format!("interface {index}"))
    };
    let iface = name(interfaces[0]);
    match route {
        Route::OtherInterface(other) => tracing::warn!(
            backend = %address,
            "backend {address} is routed out of {}, not {iface}: lb sends only out of the interface it runs on and its --egress interfaces, so it gets no packets (counted as drop_no_backend) until a route to it leaves by {iface} or `lb run` is given --egress {}",
            name(other),
            name(other)
        ),
        _ => tracing::warn!(
            backend = %address,
            "backend {address} has no route: it gets no packets (counted as drop_no_backend) until one leaves by {iface}"
        ),
    }
}

/// How the kernel routes to `address` ([`Route`]).
async fn route_via(
    handle: &rtnetlink::Handle,
    interfaces: &[u32],
    address: IpAddr,
) -> Result<Route, rtnetlink::Error> {
    let prefix = if address.is_ipv4() { 32 } else { 128 };
    let message = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(address, prefix)
        .map_err(|_| rtnetlink::Error::RequestFailed)?
        .build();
    let mut routes = handle.route().get(message).execute();
    let Some(route) = routes.try_next().await? else { return Ok(Route::None) };
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
    let egress = oif.and_then(|oif| interfaces.iter().position(|index| *index == oif));
    Ok(match (oif, egress) {
        (_, Some(egress)) => Route::Out { egress: egress as u32, gateway },
        (Some(oif), None) => Route::OtherInterface(oif),
        (None, _) => Route::None,
    })
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

/// The neighbour entries of `interfaces`, by (interface index, address).
async fn read_table(
    handle: &rtnetlink::Handle,
    interfaces: &[u32],
) -> Result<BTreeMap<(u32, IpAddr), Entry>, rtnetlink::Error> {
    let mut messages = handle.neighbours().get().execute();
    let mut table = BTreeMap::new();
    while let Some(message) = messages.try_next().await? {
        let ifindex = message.header.ifindex;
        if !interfaces.contains(&ifindex) {
            continue;
        }
        if let Some((address, entry)) = parse_entry(&message) {
            table.insert((ifindex, address), entry);
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
