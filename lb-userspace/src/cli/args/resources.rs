//! The subcommands that read and change the configuration: VIPs, backends,
//! checks, configuration files and the store.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::model::{
    Affinity, CheckOptions, DEFAULT_WEIGHT, ForwardingOptions, Protocol, RebalanceOptions,
    Scheduler, WEIGHT_RANGE,
};

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
    /// ~ changed), with the active flows each removal would break. Exit
    /// status 0: no differences; 1: differences (as diff(1)).
    /// Example: lb config diff /etc/lb/lb.toml
    Diff {
        /// The TOML configuration to compare with the running one.
        file: PathBuf,
    },
    /// Make the running configuration FILE's, in one step: only what
    /// differs changes, established flows of kept backends are untouched,
    /// and a file with any mistake changes nothing. Settings fixed at load
    /// (sizes, seed, timeouts, sync, announce table) must match the
    /// running ones. Refused while what it removes carries active flows,
    /// unless --force. SIGHUP to lb run does the same with its --config.
    /// Example: lb config apply /etc/lb/lb.toml
    Apply {
        /// The TOML configuration to apply.
        file: PathBuf,
        /// Apply it even though removals break active flows.
        #[arg(long)]
        force: bool,
    },
    /// Make lb run re-read its --config and apply it as `lb config apply`
    /// does, and say what it did: a file unchanged since it was applied
    /// changes nothing (drains and weights set with lb since stay, as at a
    /// restart); a refused file fails the command (exit 1) and changes
    /// nothing. SIGHUP does the same, with the answer only in the log.
    /// Example: ExecReload=/usr/local/bin/lb config reload
    Reload {
        /// Apply it even though removals break active flows.
        #[arg(long)]
        force: bool,
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
        forwarding: ForwardingOptions,
        #[command(flatten)]
        check: CheckOptions,
    },
    /// Change how a VIP picks backends for new flows, whether it closes a
    /// few connections of a crowded backend (--rebalance), and how its
    /// packets reach the backends (--forwarding); established flows stay
    /// where they are otherwise.
    /// Example: lb vip set 198.18.0.10:80 --scheduler least-connections --rebalance on
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
        #[command(flatten)]
        rebalance: RebalanceOptions,
        #[command(flatten)]
        forwarding: ForwardingOptions,
    },
    /// Remove a VIP and its backends. Refused while its backends carry
    /// active flows (removing it would break them), unless --force.
    Remove {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        /// Remove it even though its active flows break.
        #[arg(long)]
        force: bool,
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
        #[arg(long, default_value_t = DEFAULT_WEIGHT, value_parser = parse_weight)]
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
        #[arg(long, value_parser = parse_weight)]
        weight: u32,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// Remove a backend from a VIP. Refused while it carries active flows
    /// (removing it would break them): drain it and remove it at 0, which
    /// --when-drained does, or break them with --force.
    /// Example: lb backend remove 198.18.0.10:80/tcp 198.18.1.1 --when-drained
    Remove {
        /// The VIP, as ADDRESS:PORT/PROTO.
        vip: String,
        /// The backend's address.
        backend: String,
        /// Remove it even though its active flows break.
        #[arg(long, conflicts_with = "when_drained")]
        force: bool,
        /// Drain it, wait until its active flows have ended, then remove it.
        /// Past --timeout it stays draining and the command fails.
        #[arg(long)]
        when_drained: bool,
        /// How long --when-drained waits, in seconds.
        #[arg(long, default_value_t = 3600, requires = "when_drained")]
        timeout: u64,
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

/// A weight, refused with the range (and `lb backend drain` for 0); also
/// for `lb agent --weight`.
pub fn parse_weight(text: &str) -> Result<u32, String> {
    let weight: u32 = text.parse().map_err(|_| {
        let (min, max) = (WEIGHT_RANGE.start(), WEIGHT_RANGE.end());
        format!("'{text}' is not a weight: expected a whole number from {min} to {max}")
    })?;
    crate::model::refuse_weight(weight).map_err(|error| error.to_string())?;
    Ok(weight)
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// The fleet store as this balancer follows it: connected or not, the
    /// revision installed here and the store's, the last contact, changes
    /// waiting for the store, and every refused key with its reason.
    /// Example: lb store status --json
    Status,
}
