//! The options of running several balancers: flow sync, the hash seed,
//! announcing, and the fleet store.

use std::path::PathBuf;

use clap::Args;

use crate::model::parse_endpoint;

/// Running several balancers for the same VIPs (see docs/scale-out.md).
/// Each option replaces the config file's setting of the same name.
#[derive(Args, Debug, Default)]
#[command(next_help_heading = "Fleet (several balancers)")]
pub struct FleetArgs {
    /// Share flows with this peer balancer (repeat for each peer; port 9470 if omitted).
    #[arg(long = "sync-peer", value_name = "ADDR[:PORT]", value_parser = crate::sync::parse_peer)]
    pub sync_peers: Vec<std::net::SocketAddr>,
    /// Address and port sync listens on, and sends from; peers list it as ours.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_endpoint)]
    pub sync_listen: Option<std::net::SocketAddr>,
    /// File with the fleet's shared key: 64 hex characters, not readable by others.
    #[arg(long, value_name = "PATH")]
    pub sync_key_file: Option<PathBuf>,
    /// The flow-hash seed (replaces `hash_seed`). Every balancer of a VIP
    /// must use the same; without one, a fresh installation picks a random
    /// seed and keeps it in its state.
    #[arg(long, value_name = "N")]
    pub hash_seed: Option<u32>,
    /// Publish a route for every serving VIP in this kernel routing table,
    /// for BIRD or FRR to announce over BGP (default: off).
    #[arg(long, value_name = "N", value_parser = parse_announce_table)]
    pub announce_table: Option<u32>,
}

fn parse_announce_table(text: &str) -> Result<u32, String> {
    let table = text.parse().map_err(|_| format!("'{text}' is not a table number"))?;
    crate::config::check_announce_table(table)
}

/// The fleet store (see docs/fleet.md). Each option replaces the config
/// file's `[store]` setting of the same name.
#[derive(Args, Debug, Default)]
#[command(next_help_heading = "Fleet store (etcd)")]
pub struct StoreArgs {
    /// Keep the desired state in etcd under PREFIX, shared by every balancer
    /// given the same store: etcd://HOST:PORT[,HOST:PORT...]/PREFIX.
    #[arg(long = "store", value_name = "URL", value_parser = crate::store::StoreConfig::from_url)]
    pub url: Option<crate::store::StoreConfig>,
    /// The CA that signed the etcd members' certificates: TLS to the store.
    #[arg(long = "store-ca", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate for members that require one (with --store-key).
    #[arg(long = "store-cert", value_name = "PATH")]
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long = "store-key", value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// An etcd user, for members with authentication on (with --store-password-file).
    #[arg(long = "store-user", value_name = "NAME")]
    pub user: Option<String>,
    /// A file holding that user's password.
    #[arg(long = "store-password-file", value_name = "PATH")]
    pub password_file: Option<PathBuf>,
}

impl StoreArgs {
    pub fn options(self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            url: self.url,
            ca_file: self.ca_file,
            cert_file: self.cert_file,
            key_file: self.key_file,
            user: self.user,
            password_file: self.password_file,
        }
    }
}
