//! The command line: every `lb` command, argument and `--help` text (clap).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::api;
use crate::daemon;
use crate::datapath::AttachMode;
use crate::model::{Affinity, CheckOptions, DEFAULT_WEIGHT, Protocol, Scheduler, parse_endpoint};

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
    /// Example: lb run --iface eth0 --config /etc/lb/lb.toml
    Run {
        /// Interface to attach to (the one that receives VIP traffic).
        #[arg(long)]
        iface: String,
        /// TOML configuration: settings and VIPs (see README, "Configuration").
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the configuration is saved after every change.
        #[arg(long, default_value = daemon::DEFAULT_STATE)]
        state: PathBuf,
        /// native (driver) mode, skb (generic) mode, or auto: native, else skb with a warning.
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: AttachMode,
        /// bpffs directory where the program link and maps are pinned (in a
        /// subdirectory per interface), so the datapath keeps forwarding while
        /// lb run restarts. A new lb run adopts what it finds there.
        #[arg(long, default_value = daemon::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Detach the program when lb run stops (default: keep forwarding).
        #[arg(long)]
        detach_on_exit: bool,
        /// Prometheus endpoint address (GET /metrics), or `off`.
        #[arg(long, default_value = "127.0.0.1:9464", value_parser = parse_metrics)]
        metrics: MetricsAddress,
        /// Let this group use the control socket too (mode 0660; default 0600, root only).
        #[arg(long)]
        socket_group: Option<String>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
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
    /// Print the manual page (roff), as `cargo xtask dist` installs it.
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE as `lb run --config FILE` would read it, without a
    /// daemon or root. Exit status 0: it would be accepted; 1: it would be
    /// refused, with the file, line and field of the mistake.
    /// Example: lb config check /etc/lb/lb.toml
    Check {
        /// The TOML configuration to check.
        file: PathBuf,
    },
    /// Print the running configuration as TOML, ready to be saved and
    /// given back to `lb config apply` or `lb run --config`.
    /// Example: lb config show > /etc/lb/lb.toml
    Show,
    /// What `lb config apply FILE` would change in the running
    /// configuration, one line per VIP or backend (+ added, - removed,
    /// ~ changed). Exit status 0 either way.
    /// Example: lb config diff /etc/lb/lb.toml
    Diff {
        /// The TOML configuration to compare with the running one.
        file: PathBuf,
    },
    /// Make the running configuration FILE's, in one step: only what
    /// differs changes, established flows of kept backends are untouched,
    /// and a file with any mistake changes nothing. Settings fixed at load
    /// (sizes, seed, timeouts, sync, announce table) must match the
    /// running ones. SIGHUP to lb run does the same with its --config.
    /// Example: lb config apply /etc/lb/lb.toml
    Apply {
        /// The TOML configuration to apply.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum VipCommand {
    /// Declare a VIP (it drops traffic until it has a backend). Its backends
    /// are checked with a TCP connect to the VIP port unless --check says
    /// otherwise. Adding a VIP that exists with the same settings is done.
    /// Example: lb vip add 198.18.0.10:80/tcp --scheduler least-connections
    Add {
        /// ADDRESS:PORT/PROTO ([ADDRESS]:PORT/PROTO for IPv6).
        vip: String,
        #[command(flatten)]
        protocol: ProtocolArg,
        /// What picks a new flow's backend: the whole flow, or the client
        /// address only (all of a client's connections on one backend).
        #[arg(long, value_enum, default_value = "flow")]
        affinity: Affinity,
        /// How new flows are shared: by weight through the Maglev table, or
        /// toward the backends with the fewest active flows for their weight
        /// (open connections even out after a restart or a scale-up).
        #[arg(long, value_enum, default_value = "maglev")]
        scheduler: Scheduler,
        #[command(flatten)]
        check: CheckOptions,
    },
    /// Change how a VIP picks backends for new flows; established flows stay
    /// where they are. Example: lb vip set 198.18.0.10:80 --scheduler least-connections
    #[command(group = clap::ArgGroup::new("setting").required(true).multiple(true))]
    Set {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        #[command(flatten)]
        protocol: ProtocolArg,
        /// The whole flow, or the client address only.
        #[arg(long, value_enum, group = "setting")]
        affinity: Option<Affinity>,
        /// maglev (by weight) or least-connections.
        #[arg(long, value_enum, group = "setting")]
        scheduler: Option<Scheduler>,
    },
    /// Remove a VIP and its backends.
    Remove {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// List VIPs.
    List,
}

#[derive(Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a VIP. Its MAC is resolved automatically; it takes new
    /// flows once resolved and past `rise` passing health checks. Adding a
    /// backend that serves the VIP with the same weight is done.
    /// Example: lb backend add 198.18.0.10:80/tcp 198.18.1.1 --weight 2
    Add {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        /// The backend's address (no port: backends serve the VIP's port).
        backend: String,
        /// Relative share of new flows, 1 to 256.
        #[arg(long, default_value_t = DEFAULT_WEIGHT)]
        weight: u32,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// Stop new flows to a backend; its established flows continue. Remove it
    /// once `lb backend list` shows 0 active flows.
    Drain {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        /// The backend's address.
        backend: String,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// Let a drained backend take new flows again.
    Undrain {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        /// The backend's address.
        backend: String,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// Change a backend's weight; established flows stay where they are.
    Set {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        /// The backend's address.
        backend: String,
        /// Relative share of new flows, 1 to 256.
        #[arg(long)]
        weight: u32,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// Remove a backend from a VIP.
    Remove {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        /// The backend's address.
        backend: String,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// List backends, of one VIP or of all.
    List {
        /// Only this VIP's backends, as ADDRESS:PORT/PROTO.
        vip: Option<String>,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
}

#[derive(Subcommand)]
pub enum CheckCommand {
    /// Change a VIP's check; options not given keep their current value.
    /// Example: lb check set 198.18.0.10:80 --check ws --check-path /socket --fall 2
    Set {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        #[command(flatten)]
        protocol: ProtocolArg,
        #[command(flatten)]
        check: CheckOptions,
    },
}

#[derive(Args)]
pub struct ProtocolArg {
    /// The VIP's protocol, tcp or udp, when the VIP is not written with
    /// /PROTO (default tcp).
    #[arg(long = "proto", value_parser = parse_protocol)]
    pub protocol: Option<Protocol>,
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    text.parse()
}

/// `--metrics`: an address, or `off`.
#[derive(Clone, Debug)]
pub struct MetricsAddress(pub Option<SocketAddr>);

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
