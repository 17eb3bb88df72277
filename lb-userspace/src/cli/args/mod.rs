//! The command line: every `lb` command, argument and `--help` text (clap).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::api;
use crate::daemon;
use crate::datapath::AttachMode;
use crate::model::parse_endpoint;

mod agent;
mod decap;
mod fleet;
mod resources;

pub use agent::AgentArgs;
pub use decap::DecapArgs;
pub use fleet::{FleetArgs, StoreArgs};
pub use resources::{
    BackendCommand, CheckCommand, ConfigCommand, ProtocolArg, StoreCommand, VipCommand,
};

/// A stateless L3/L4 load balancer on XDP: Maglev hashing, direct server return.
#[derive(Parser)]
#[command(name = "lb", version, propagate_version = true, after_help = EXAMPLES)]
pub struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = api::DEFAULT_SOCKET, env = "LB_SOCKET")]
    pub socket: PathBuf,
    /// Print the result as one JSON document on stdout, errors included
    /// (`{"error": ..., "kind": ..., "exit_status": N}`).
    #[arg(long, global = true)]
    pub json: bool,
    /// Log lines as text, or as one JSON object per line for log shippers.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "\
Examples:
  lb run --iface eth0 --config /etc/lb/lb.toml
  lb vip add 198.18.0.10:80/tcp --check http --check-path /health
  lb backend add 198.18.0.10:80/tcp 198.18.1.1 --weight 2
  lb backend drain 198.18.0.10:80/tcp 198.18.1.1
  lb config diff /etc/lb/lb.toml && lb config apply /etc/lb/lb.toml
  lb top
  lb stats --json | jq '.vips[].packets_per_second'

A VIP is written ADDRESS:PORT/PROTO (IPv6 as [ADDRESS]:PORT/PROTO), as lb
prints it; without /PROTO, --proto says (default tcp).

Exit status:
  0  done (adding what already exists identically is done, not an error)
  1  refused or failed: the daemon or the file said no, and why
  2  usage: a command, argument or value lb does not accept
  3  not found: the VIP or backend does not exist
  4  daemon not running: nothing answers on --socket";

/// `lb run`'s options.
#[derive(Args)]
pub struct RunArgs {
    /// Interface to attach to (the one that receives VIP traffic).
    #[arg(long)]
    pub iface: String,
    /// TOML configuration: settings and VIPs (see README, "Configuration").
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the configuration is saved after every change.
    #[arg(long, default_value = daemon::DEFAULT_STATE)]
    pub state: PathBuf,
    /// native (driver) mode, skb (generic) mode, or auto: native, else skb with a warning.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: AttachMode,
    /// bpffs directory where the program link and maps are pinned (in a
    /// subdirectory per interface), so the datapath keeps forwarding while
    /// lb run restarts. A new lb run adopts what it finds there.
    #[arg(long, default_value = daemon::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Detach the program when lb run stops (default: keep forwarding).
    #[arg(long)]
    pub detach_on_exit: bool,
    /// Prometheus endpoint address (GET /metrics), or `off`.
    #[arg(long, default_value = "127.0.0.1:9464", value_parser = parse_metrics)]
    pub metrics: MetricsAddress,
    /// Let this group use the control socket too (mode 0660; default 0600, root only).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// The outer source address of tunnelled VIPs (--forwarding ipip|gue),
    /// once per family [default: the interface's first address of each
    /// family, IPv6 link-local ones left out]. A PREFIX/LEN (IPv4 /12 to
    /// /32, IPv6 /108 to /128) gives each flow its own source in the
    /// prefix, so backends' NICs spread IPIP flows over their queues: route
    /// the prefix to this balancer.
    #[arg(long, value_name = "ADDRESS|PREFIX/LEN")]
    pub tunnel_source: Vec<crate::model::TunnelSource>,
    /// Another interface backends may be routed out of (repeat for more,
    /// at most 7). A backend the kernel routes out of one of them is sent
    /// there by XDP_REDIRECT, from that interface's MAC (and for ipip/gue
    /// from its address, unless --tunnel-source, within its MTU); without
    /// it such a backend gets no packets. lb attaches a pass-everything
    /// XDP program to the interface when it runs none (drivers take
    /// redirected frames only then); on veth the far end needs one too.
    #[arg(long, value_name = "IFACE")]
    pub egress: Vec<String>,
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    pub store: StoreArgs,
}

/// How `lb` writes its log lines (`lb run`'s above all).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Load and attach the datapath, apply the configuration, serve the control socket.
    ///
    /// The configuration: with --config, the file, unless the state file
    /// holds that same file as last applied plus changes made with `lb`
    /// since (then the state, so those changes are kept); a file that
    /// changed is applied, and the state it replaces is kept beside the
    /// state file as STATE.replaced. Without --config, the state file, else
    /// empty. Every change is saved to the state file. SIGHUP re-reads
    /// --config and applies what differs (as `lb config apply`). SIGINT or
    /// SIGTERM stops the daemon while the pinned datapath keeps forwarding
    /// with its last tables (a new lb run adopts it); --detach-on-exit
    /// detaches it instead.
    ///
    /// With --store, the VIPs and backends live in etcd, shared by every
    /// balancer given the same store: --config may hold only this
    /// balancer's own settings, and while the store is unreachable the
    /// state file's copy of its last revision is used (docs/fleet.md).
    ///
    /// Example: lb run --iface eth0 --config /etc/lb/lb.toml
    Run(Box<RunArgs>),
    /// Remove a datapath left pinned by lb run: the program detaches and the
    /// VIPs on that interface stop being balanced. Refused while lb run serves.
    Unload {
        /// The interface lb run was attached to.
        #[arg(long)]
        iface: String,
        /// The bpffs directory lb run pinned in (its --pin-dir).
        #[arg(long, default_value = daemon::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Declare, remove and list VIPs.
    #[command(subcommand)]
    Vip(VipCommand),
    /// Add, remove, drain, reweigh and list a VIP's backends.
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Configure a VIP's health check.
    #[command(subcommand)]
    Check(CheckCommand),
    /// Packets, bytes and rates per VIP and backend, and the datapath's reason counters.
    Stats,
    /// A live view, refreshed every second: per VIP and backend, packets/s,
    /// bytes/s, active flows, health and drops. q or Ctrl-C quits.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0, value_parser = parse_interval)]
        interval: f64,
    },
    /// Established flows of a VIP and their backends, from the flow table
    /// (at most --limit; the walk stops there).
    /// Example: lb flows 198.18.0.10:80/tcp --limit 20
    Flows {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        #[command(flatten)]
        protocol: ProtocolArg,
        /// Most flows to list, 1 to 100000.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        limit: u32,
    },
    /// Check, show, compare and apply configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run on a backend: register it in the fleet store under a lease once
    /// its service answers a local check, keep it registered while it
    /// runs, and on SIGTERM drain it, wait for its connections on the VIPs
    /// to end (or --drain-timeout), deregister and exit 0 (docs/fleet.md).
    /// If the backend dies, the lease expires and every balancer removes it.
    ///
    /// Example: lb agent --store etcd://10.0.0.5:2379/lb --vip 198.18.0.10:80/tcp --configure-vip
    Agent(Box<AgentArgs>),
    /// Run on a backend of ipip or gue VIPs: attach an XDP program to
    /// --iface that takes IPIP, IP6IP6 and GUE packets for this host off
    /// their outer headers and hands the inner packet to the kernel, so the
    /// host needs no ipip or fou module. It stays attached (pinned) after
    /// the command exits; run it again after the host's addresses change,
    /// to refresh which inner destinations it accepts (docs/datapath.md).
    ///
    /// Example: lb decap --iface eth0 --gue-port 6080
    Decap(DecapArgs),
    /// The fleet store this balancer follows (lb run --store).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Which backend a client's flow goes to, computed with the kernel's hash and table.
    /// Example: lb lookup 198.18.0.10:80/tcp 198.18.0.1:40000
    Lookup {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        /// Client as ADDRESS:PORT.
        client: String,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// Print a shell completion script. Example: lb completions bash > /etc/bash_completion.d/lb
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page lb(1) (roff); with --dir, write it and one
    /// page per subcommand (lb-run(1), lb-vip-add(1), ...), which lb(1)
    /// refers to, as `cargo xtask dist` installs them.
    #[command(hide = true)]
    Man {
        /// Write every page into this directory (a man1 directory).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `--metrics`: an address, or `off`.
#[derive(Clone, Debug)]
pub struct MetricsAddress(pub Option<SocketAddr>);

fn parse_metrics(text: &str) -> Result<MetricsAddress, String> {
    if text == "off" {
        return Ok(MetricsAddress(None));
    }
    parse_endpoint(text).map(|address| MetricsAddress(Some(address)))
}

fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if (0.1..=60.0).contains(&seconds) => Ok(seconds),
        _ => Err(format!("'{text}' is not a number of seconds from 0.1 to 60")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks its own invariants (unique argument ids across flattened
    /// option groups, among them) only when asked; a release build would
    /// otherwise ship a command line that panics in debug builds.
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
