//! Publishing serving VIPs as routes for a routing daemon. `lb` speaks no
//! BGP: for each VIP address to announce it keeps a blackhole route
//! (`/32` or `/128`) in the operator's table (`--announce-table N`), which
//! BIRD or FRR learns and announces (docs/scale-out.md has the
//! configuration). The route's protocol number marks it as ours and its
//! metric is the interface index, so `lb unload --iface` finds exactly the
//! routes of that interface's balancer. It never touches BPF maps.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use futures::TryStreamExt as _;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use tokio::sync::watch;

/// The routes' protocol number (`ip route ... proto 200`): unused by the
/// kernel and by routing daemons, and not one BIRD ignores.
pub const ROUTE_PROTOCOL: u8 = 200;
/// Routes removed by others (or a failed write) are put back this often.
const REPAIR_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps the table's routes equal to `wanted` until `wanted` is closed.
pub async fn run(
    table: u32,
    ifindex: u32,
    mut wanted: watch::Receiver<BTreeSet<IpAddr>>,
) -> anyhow::Result<()> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let mut announced = BTreeSet::new();
    loop {
        let want = wanted.borrow_and_update().clone();
        match sync_routes(&handle, table, ifindex, &want).await {
            Ok(()) => {
                for address in want.difference(&announced) {
                    tracing::info!(vip = %address, table, "VIP announced: route published");
                }
                for address in announced.difference(&want) {
                    tracing::info!(vip = %address, table, "VIP withdrawn: route removed");
                }
                announced = want;
            }
            Err(error) => {
                tracing::error!(table, error = %format!("{error:#}"), "publishing VIP routes failed; retrying")
            }
        }
        tokio::select! {
            changed = wanted.changed() => if changed.is_err() { return Ok(()) },
            _ = tokio::time::sleep(REPAIR_INTERVAL) => {}
        }
    }
}

/// Removes every route this interface's balancer published, in any table
/// (for `lb unload` and `--detach-on-exit`). Returns how many.
pub async fn withdraw_all(ifindex: u32) -> anyhow::Result<usize> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    let ours = our_routes(&handle, None, ifindex).await?;
    for route in &ours {
        handle.route().del(route.clone()).execute().await?;
    }
    Ok(ours.len())
}

async fn sync_routes(
    handle: &Handle,
    table: u32,
    ifindex: u32,
    want: &BTreeSet<IpAddr>,
) -> anyhow::Result<()> {
    let existing = our_routes(handle, Some(table), ifindex).await?;
    let mut present = BTreeSet::new();
    for route in existing {
        match destination(&route) {
            Some(address) if want.contains(&address) => {
                present.insert(address);
            }
            _ => handle.route().del(route).execute().await?,
        }
    }
    for address in want.difference(&present) {
        handle.route().add(route_for(*address, table, ifindex)).replace().execute().await?;
    }
    Ok(())
}

/// The blackhole route that stands for one VIP address.
fn route_for(address: IpAddr, table: u32, ifindex: u32) -> RouteMessage {
    let length = if address.is_ipv4() { 32 } else { 128 };
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(address, length)
        .expect("an address family matches itself")
        .table_id(table)
        .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
        .kind(RouteType::BlackHole)
        .priority(ifindex)
        .build()
}

/// Our routes (protocol and metric) in `table`, or in every table.
async fn our_routes(
    handle: &Handle,
    table: Option<u32>,
    ifindex: u32,
) -> anyhow::Result<Vec<RouteMessage>> {
    let mut ours = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let query = match version {
            IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let mut routes = handle.route().get(query).execute();
        while let Some(route) = routes.try_next().await? {
            let is_ours = route.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)
                && route.attributes.contains(&RouteAttribute::Priority(ifindex))
                && table.is_none_or(|table| table_of(&route) == table);
            if is_ours {
                ours.push(route);
            }
        }
    }
    Ok(ours)
}

fn table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

fn destination(route: &RouteMessage) -> Option<IpAddr> {
    route.attributes.iter().find_map(|attribute| match attribute {
        RouteAttribute::Destination(RouteAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
        _ => None,
    })
}
