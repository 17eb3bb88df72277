//! What `lb agent` does to its own host: finds the backend's address when
//! none is given, and with `--configure-vip` puts each VIP on `lo` with the
//! sysctls of dist/90-lb-backend.conf, removing on exit the addresses it
//! added (never one that was there before).

use std::collections::BTreeSet;
use std::net::IpAddr;

use anyhow::{Context as _, bail};
use futures::TryStreamExt as _;

/// The sysctls a direct server return backend needs (see dist/90-lb-backend.conf).
const SYSCTLS: [(&str, &str); 4] = [
    ("net/ipv4/conf/all/arp_ignore", "1"),
    ("net/ipv4/conf/all/arp_announce", "2"),
    ("net/ipv4/conf/all/rp_filter", "2"),
    ("net/ipv4/conf/default/rp_filter", "2"),
];

/// This host's only global unicast address of the VIPs' family outside
/// `lo` and the VIPs; refused, naming them, when there are none or several.
pub fn own_address(ipv4: bool, vips: &BTreeSet<IpAddr>) -> anyhow::Result<IpAddr> {
    let mut found = BTreeSet::new();
    for interface in nix::ifaddrs::getifaddrs().context("listing this host's addresses")? {
        let Some(address) = interface.address else { continue };
        let address = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
            (Some(v4), _) => IpAddr::from(v4.ip()),
            (_, Some(v6)) => IpAddr::from(v6.ip()),
            _ => continue,
        };
        if address.is_ipv4() == ipv4 && is_global(address) && !vips.contains(&address) {
            found.insert(address);
        }
    }
    let family = if ipv4 { "IPv4" } else { "IPv6" };
    match found.len() {
        1 => Ok(*found.first().expect("one")),
        0 => bail!("this host has no global {family} address to register: give --address"),
        _ => {
            let list: Vec<String> = found.iter().map(IpAddr::to_string).collect();
            bail!("this host has several {family} addresses ({}): give --address", list.join(", "))
        }
    }
}

fn is_global(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unicast_link_local() || v6.is_unspecified()),
    }
}

/// The VIP addresses `--configure-vip` added to `lo`, to remove on exit.
pub struct LoopbackVips {
    added: Vec<IpAddr>,
}

impl LoopbackVips {
    /// Sets the sysctls and adds each VIP missing from `lo`.
    pub async fn configure(vips: &BTreeSet<IpAddr>) -> anyhow::Result<Self> {
        for (key, value) in SYSCTLS {
            let path = format!("/proc/sys/{key}");
            std::fs::write(&path, value).with_context(|| format!("setting {path} to {value}"))?;
        }
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let lo = crate::neighbour::interface_index("lo").context("interface lo")?;
        let mut added = Vec::new();
        for address in vips {
            if present(&handle, lo, *address).await?.is_some() {
                tracing::info!(vip = %address, "the VIP is on lo already");
                continue;
            }
            let prefix = if address.is_ipv4() { 32 } else { 128 };
            handle
                .address()
                .add(lo, *address, prefix)
                .execute()
                .await
                .with_context(|| format!("adding {address}/{prefix} to lo"))?;
            tracing::info!(vip = %address, "VIP added to lo");
            added.push(*address);
        }
        Ok(Self { added })
    }

    /// Removes the addresses [`LoopbackVips::configure`] added.
    pub async fn undo(self) {
        let Ok((connection, handle, _)) = rtnetlink::new_connection() else { return };
        tokio::spawn(connection);
        let Ok(lo) = crate::neighbour::interface_index("lo") else { return };
        for address in self.added {
            let removed = match present(&handle, lo, address).await {
                Ok(Some(message)) => {
                    handle.address().del(message).execute().await.map_err(Into::into)
                }
                Ok(None) => Ok(()),
                Err(error) => Err(error),
            };
            match removed {
                Ok(()) => tracing::info!(vip = %address, "VIP removed from lo"),
                Err(error) => {
                    tracing::warn!(vip = %address, error = %format!("{error:#}"), "could not remove the VIP from lo")
                }
            }
        }
    }
}

/// `address` on interface `index`, if there.
async fn present(
    handle: &rtnetlink::Handle,
    index: u32,
    address: IpAddr,
) -> anyhow::Result<Option<rtnetlink::packet_route::address::AddressMessage>> {
    let mut found =
        handle.address().get().set_link_index_filter(index).set_address_filter(address).execute();
    Ok(found.try_next().await?)
}
