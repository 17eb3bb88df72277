//! `lb agent`'s options: which store and VIPs, how this backend is named
//! and checked, and how it leaves.

use std::net::IpAddr;

use clap::Args;

use super::StoreArgs;
use crate::model::{CheckKind, parse_address};

#[derive(Args, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// A VIP this backend serves, as ADDRESS:PORT[/PROTO] (repeat for each;
    /// each must be in the store already).
    #[arg(long = "vip", value_name = "VIP", required = true)]
    pub vips: Vec<String>,
    /// This backend's address, as balancers reach it (default: its only
    /// global address of the VIPs' family; refused when it has several).
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    pub address: Option<IpAddr>,
    /// Relative share of new flows, 1 to 256.
    #[arg(long, default_value_t = 1, value_parser = super::resources::parse_weight)]
    pub weight: u32,
    /// Register only once this local check of the service passes: a TCP
    /// connect, or an HTTP GET of --check-path answering 2xx (none: at once).
    #[arg(long, value_name = "tcp|http|none", default_value = "tcp", value_parser = parse_check)]
    pub check: CheckKind,
    /// The port to check (default: each VIP's port).
    #[arg(long, value_name = "PORT")]
    pub check_port: Option<u16>,
    /// The path an HTTP check asks for.
    #[arg(long, default_value = "/")]
    pub check_path: String,
    /// Seconds the registration outlives this agent without renewal: how
    /// long a dead backend stays in the balancers' tables (their health
    /// checks stop new flows to it within a second anyway). 2 to 300.
    #[arg(long, value_name = "SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..=300))]
    pub ttl: u32,
    /// On SIGTERM, how long to wait for the backend's established
    /// connections on the VIPs to end before deregistering anyway.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub drain_timeout: u64,
    /// Put each VIP on lo and set the ARP and reverse-path sysctls a direct
    /// server return backend needs (dist/90-lb-backend.conf); the addresses
    /// it added are removed on exit.
    #[arg(long)]
    pub configure_vip: bool,
}

fn parse_check(text: &str) -> Result<CheckKind, String> {
    match text {
        "tcp" => Ok(CheckKind::Tcp),
        "http" => Ok(CheckKind::Http),
        "none" => Ok(CheckKind::None),
        other => Err(format!("'{other}' is not a local check: tcp, http or none")),
    }
}
