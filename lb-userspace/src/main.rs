//! `lb`: the load balancer's daemon (`lb run`) and its command-line client.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use lb_userspace::api::{self, Body, Reply, Request};
use lb_userspace::daemon::{self, RunOptions};
use lb_userspace::datapath::AttachMode;
use lb_userspace::health::CheckOptions;
use lb_userspace::model::{Affinity, DEFAULT_WEIGHT, Protocol, Vip, parse_address, parse_endpoint};

/// A stateless L3/L4 load balancer on XDP: Maglev hashing, direct server return.
#[derive(Parser)]
#[command(name = "lb", version, propagate_version = true)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, default_value = api::DEFAULT_SOCKET, env = "LB_SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath, apply the configuration, serve the control socket.
    ///
    /// The configuration comes from --config when given (it replaces the saved
    /// state), else from the state file, else starts empty. Every change is
    /// saved to the state file. SIGINT or SIGTERM detaches the program.
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
    },
    /// Remove a datapath left pinned by lb run: the program detaches and the
    /// VIPs on that interface stop being balanced. Refused while lb run serves.
    Unload {
        /// The interface lb run was attached to.
        #[arg(long)]
        iface: String,
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
    Stats(Output),
    /// Which backend a client's flow goes to, computed with the kernel's hash and table.
    Lookup {
        /// VIP as ADDRESS:PORT ([ADDRESS]:PORT for IPv6).
        vip: String,
        /// Client as ADDRESS:PORT.
        client: String,
        #[command(flatten)]
        protocol: ProtocolArg,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum VipCommand {
    /// Declare a VIP (it drops traffic until it has a backend). Its backends
    /// are checked with a TCP connect to the VIP port unless --check says otherwise.
    Add {
        /// ADDRESS:PORT ([ADDRESS]:PORT for IPv6).
        vip: String,
        #[command(flatten)]
        protocol: ProtocolArg,
        /// What picks a new flow's backend: the whole flow, or the client
        /// address only (all of a client's connections on one backend).
        #[arg(long, value_enum, default_value = "flow")]
        affinity: Affinity,
        #[command(flatten)]
        check: CheckOptions,
    },
    /// Remove a VIP and its backends.
    Remove {
        vip: String,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// List VIPs.
    List(Output),
}

#[derive(Subcommand)]
enum BackendCommand {
    /// Add a backend to a VIP. Its MAC is resolved automatically; it takes new
    /// flows once resolved and past `rise` passing health checks.
    Add {
        /// The VIP as ADDRESS:PORT.
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
        vip: String,
        backend: String,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// Let a drained backend take new flows again.
    Undrain {
        vip: String,
        backend: String,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// Change a backend's weight; established flows stay where they are.
    Set {
        vip: String,
        backend: String,
        /// Relative share of new flows, 1 to 256.
        #[arg(long)]
        weight: u32,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// Remove a backend from a VIP.
    Remove {
        vip: String,
        backend: String,
        #[command(flatten)]
        protocol: ProtocolArg,
    },
    /// List backends, of one VIP or of all.
    List {
        vip: Option<String>,
        #[command(flatten)]
        protocol: ProtocolArg,
        #[command(flatten)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum CheckCommand {
    /// Change a VIP's check; options not given keep their current value.
    /// Example: lb check set 198.18.0.10:80 --check ws --check-path /socket --fall 2
    Set {
        vip: String,
        #[command(flatten)]
        protocol: ProtocolArg,
        #[command(flatten)]
        check: CheckOptions,
    },
}

#[derive(Args)]
struct ProtocolArg {
    /// The VIP's protocol.
    #[arg(long = "proto", default_value = "tcp", value_parser = parse_protocol)]
    protocol: Protocol,
}

fn parse_protocol(text: &str) -> Result<Protocol, String> {
    text.parse()
}

/// `--metrics`: an address, or `off`.
#[derive(Clone, Debug)]
struct MetricsAddress(Option<SocketAddr>);

fn parse_metrics(text: &str) -> Result<MetricsAddress, String> {
    if text == "off" {
        return Ok(MetricsAddress(None));
    }
    parse_endpoint(text).map(|address| MetricsAddress(Some(address)))
}

#[derive(Args)]
struct Output {
    /// Print JSON (schema in the README) instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lb: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn vip_arg(text: &str, protocol: &ProtocolArg) -> anyhow::Result<Vip> {
    let endpoint = parse_endpoint(text).map_err(|message| anyhow::anyhow!("VIP: {message}"))?;
    Ok(Vip::new(endpoint, protocol.protocol))
}

fn backend_arg(text: &str) -> anyhow::Result<IpAddr> {
    parse_address(text).map_err(|message| anyhow::anyhow!("backend: {message}"))
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    let (request, json) = match cli.command {
        Command::Run {
            iface,
            config,
            state,
            xdp_mode,
            pin_dir,
            detach_on_exit,
            metrics,
            socket_group,
        } => {
            let options = RunOptions {
                iface,
                config,
                state,
                socket: cli.socket,
                xdp_mode,
                pin_dir,
                detach_on_exit,
                metrics: metrics.0,
                socket_group,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            return runtime.block_on(daemon::run(options));
        }
        Command::Unload { iface, pin_dir } => {
            if std::os::unix::net::UnixStream::connect(&cli.socket).is_ok() {
                anyhow::bail!(
                    "lb run is serving {}: stop it first (with --detach-on-exit to detach at once)",
                    cli.socket.display()
                );
            }
            let dir = daemon::pin_dir_for(&pin_dir, &iface);
            if !dir.exists() {
                anyhow::bail!("nothing is pinned in {} (see --pin-dir)", dir.display());
            }
            lb_userspace::datapath::remove_pins(&dir)?;
            println!(
                "removed the pins in {}: the program detaches from {iface} as nothing holds it now",
                dir.display()
            );
            return Ok(());
        }
        Command::Vip(VipCommand::Add { vip, protocol, affinity, check }) => {
            (Request::VipAdd { vip: vip_arg(&vip, &protocol)?, check, affinity }, false)
        }
        Command::Backend(BackendCommand::Drain { vip, backend, protocol }) => (
            Request::BackendDrain {
                vip: vip_arg(&vip, &protocol)?,
                address: backend_arg(&backend)?,
                draining: true,
            },
            false,
        ),
        Command::Backend(BackendCommand::Undrain { vip, backend, protocol }) => (
            Request::BackendDrain {
                vip: vip_arg(&vip, &protocol)?,
                address: backend_arg(&backend)?,
                draining: false,
            },
            false,
        ),
        Command::Backend(BackendCommand::Set { vip, backend, weight, protocol }) => (
            Request::BackendSet {
                vip: vip_arg(&vip, &protocol)?,
                address: backend_arg(&backend)?,
                weight,
            },
            false,
        ),
        Command::Check(CheckCommand::Set { vip, protocol, check }) => {
            (Request::CheckSet { vip: vip_arg(&vip, &protocol)?, check }, false)
        }
        Command::Vip(VipCommand::Remove { vip, protocol }) => {
            (Request::VipRemove { vip: vip_arg(&vip, &protocol)? }, false)
        }
        Command::Vip(VipCommand::List(output)) => (Request::VipList, output.json),
        Command::Backend(BackendCommand::Add { vip, backend, weight, protocol }) => (
            Request::BackendAdd {
                vip: vip_arg(&vip, &protocol)?,
                address: backend_arg(&backend)?,
                weight,
            },
            false,
        ),
        Command::Backend(BackendCommand::Remove { vip, backend, protocol }) => (
            Request::BackendRemove {
                vip: vip_arg(&vip, &protocol)?,
                address: backend_arg(&backend)?,
            },
            false,
        ),
        Command::Backend(BackendCommand::List { vip, protocol, output }) => {
            let vip = vip.map(|vip| vip_arg(&vip, &protocol)).transpose()?;
            (Request::BackendList { vip }, output.json)
        }
        Command::Stats(output) => (Request::Stats, output.json),
        Command::Lookup { vip, client, protocol, output } => {
            let client: SocketAddr =
                parse_endpoint(&client).map_err(|message| anyhow::anyhow!("client: {message}"))?;
            (Request::Lookup { vip: vip_arg(&vip, &protocol)?, client }, output.json)
        }
    };
    match api::call(&cli.socket, &request)? {
        Reply::Error(message) => anyhow::bail!("{message}"),
        Reply::Ok(body) => {
            print_body(&body, json)?;
            Ok(())
        }
    }
}

fn print_body(body: &Body, json: bool) -> anyhow::Result<()> {
    if json {
        let value = match body {
            Body::Done { message } => serde_json::json!({ "message": message }),
            Body::Vips { vips } => serde_json::to_value(vips)?,
            Body::Backends { backends } => serde_json::to_value(backends)?,
            Body::Stats(stats) => serde_json::to_value(stats)?,
            Body::Lookup(lookup) => serde_json::to_value(lookup)?,
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    match body {
        Body::Done { message } => println!("{message}"),
        Body::Vips { vips } => {
            println!(
                "{:<32} {:>8} {:>7} {:>8} {:<6} {:>12} {:>14} {:>10}",
                "VIP", "BACKENDS", "ACTIVE", "SERVING", "CHECK", "PACKETS", "BYTES", "PPS"
            );
            for vip in vips {
                let serving = if vip.all_down {
                    "ALL-DOWN".to_owned()
                } else {
                    vip.serving_backends.to_string()
                };
                let check = serde_json::to_value(vip.check.kind)?;
                println!(
                    "{:<32} {:>8} {:>7} {:>8} {:<6} {:>12} {:>14} {:>10.0}",
                    vip.vip,
                    vip.backends,
                    vip.active_backends,
                    serving,
                    check.as_str().unwrap_or("?"),
                    vip.packets,
                    vip.bytes,
                    vip.packets_per_second
                );
            }
            if vips.iter().any(|vip| vip.all_down) {
                println!(
                    "ALL-DOWN: every backend fails its checks; traffic goes to those that were up before (fail-open)"
                );
            }
        }
        Body::Backends { backends } => print_backends(backends),
        Body::Stats(stats) => {
            print_body(&Body::Vips { vips: stats.vips.clone() }, false)?;
            println!();
            print_backends(&stats.backends);
            println!();
            println!("{:<28} {:>12}", "REASON", "PACKETS");
            for (reason, count) in &stats.reasons {
                println!("{reason:<28} {count:>12}");
            }
            println!();
            println!("{:<28} {:>12}", "FLOW TABLE", "PACKETS");
            for (event, count) in &stats.flow_events {
                println!("{event:<28} {count:>12}");
            }
            let memory = stats
                .flow_table_memory_bytes
                .map_or("unknown".to_owned(), |bytes| format!("{} MiB", bytes >> 20));
            println!("\nFlow table: {} flows, {memory}", stats.flow_table_size);
            println!("Maglev tables installed since start: {}", stats.tables_built);
        }
        Body::Lookup(lookup) => {
            match lookup.backend {
                Some(backend) => println!(
                    "{} from {} -> new connections: backend {} (hash {:#010x}, table entry {})",
                    lookup.vip, lookup.client, backend, lookup.hash, lookup.table_entry
                ),
                None => println!(
                    "{} from {} -> new connections: no backend (the VIP drops them)",
                    lookup.vip, lookup.client
                ),
            }
            if let Some(established) = lookup.established_backend {
                println!("  established flow in the flow table -> backend {established}");
            }
        }
    }
    Ok(())
}

fn print_backends(backends: &[api::BackendView]) {
    println!(
        "{:<32} {:<24} {:>6} {:<9} {:>10} {:>12} {:<17} {:>7} {:>12} {:>10}  LAST ERROR",
        "VIP",
        "BACKEND",
        "WEIGHT",
        "STATE",
        "SINCE",
        "ACTIVE FLOWS",
        "MAC",
        "ENTRIES",
        "PACKETS",
        "PPS"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    for backend in backends {
        println!(
            "{:<32} {:<24} {:>6} {:<9} {:>10} {:>12} {:<17} {:>7} {:>12} {:>10.0}  {}",
            backend.vip,
            backend.address.to_string(),
            backend.weight,
            backend.state,
            format_age(now - backend.since),
            backend.active_flows,
            backend.mac.as_deref().unwrap_or("-"),
            backend.table_entries,
            backend.packets,
            backend.packets_per_second,
            backend.last_error.as_deref().unwrap_or("-"),
        );
    }
}

/// "12s ago", "5m ago", "3h ago".
fn format_age(seconds: f64) -> String {
    let seconds = seconds.max(0.0) as u64;
    match seconds {
        0..=119 => format!("{seconds}s ago"),
        120..=7199 => format!("{}m ago", seconds / 60),
        _ => format!("{}h ago", seconds / 3600),
    }
}
