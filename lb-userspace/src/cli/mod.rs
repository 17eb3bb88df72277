//! The `lb` command-line client: parses arguments (`args`), turns them into
//! a control request, sends it through `api`, and prints the reply
//! (`output`). It never touches BPF; `lb run` hands over to the daemon.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::api::{self, Body, Reply, Request};
use crate::daemon::{self, RunOptions};
use crate::model::{
    Vip, parse_address, parse_endpoint, parse_vip, refuse_backend_address, refuse_vip,
};

pub mod args;
mod decap;
mod drained;
mod failure;
mod output;
mod top;

use args::{
    BackendCommand, CheckCommand, Cli, Command, ConfigCommand, ProtocolArg, StoreCommand,
    VipCommand,
};
pub use failure::Failure;

/// A VIP as typed; one that can never work is a usage error here, before
/// any daemon is asked.
fn vip_arg(text: &str, protocol: &ProtocolArg) -> Result<Vip, Failure> {
    let vip = parse_vip(text, protocol.protocol)
        .map_err(|message| Failure::Usage(format!("VIP: {message}")))?;
    refuse_vip(&vip).map_err(|error| Failure::Usage(error.to_string()))?;
    Ok(vip)
}

fn backend_arg(text: &str) -> Result<IpAddr, Failure> {
    let address =
        parse_address(text).map_err(|message| Failure::Usage(format!("backend: {message}")))?;
    refuse_backend_address(address).map_err(|error| Failure::Usage(error.to_string()))?;
    Ok(address)
}

/// Sends one request; a refusal or an unknown name becomes the matching
/// [`Failure`].
pub fn ask(socket: &Path, request: &Request) -> Result<Body, Failure> {
    match api::call(socket, request)? {
        Reply::Ok(body) => Ok(body),
        Reply::Error(message) => Err(Failure::Refused(message)),
        Reply::NotFound(message) => Err(Failure::NotFound(message)),
    }
}

/// `lb config check`: reads the file as `lb run --config` would and says
/// whether it would be accepted (a refusal, so exit status 1, if not).
fn check_config(file: &Path, json: bool) -> Result<(), Failure> {
    let config = crate::config::load(file)?;
    let vips = &config.desired.vips;
    let backends: usize = vips.values().map(|vip| vip.backends.len()).sum();
    if json {
        let report = serde_json::json!({ "file": file, "valid": true, "vips": vips.len(), "backends": backends });
        println!("{report}");
    } else {
        println!("{}: valid: {} VIP(s), {backends} backend(s)", file.display(), vips.len());
    }
    Ok(())
}

/// A configuration file's text for `lb config diff/apply`, checked here
/// first so that a mistake is named without a daemon; the daemon reads the
/// same text (never the path, which it may see differently).
fn config_file(file: &Path) -> Result<(std::path::PathBuf, String), Failure> {
    let text = crate::config::read(file)?;
    // How many VIPs and backends fit is the daemon's to say: a fleet's
    // limits are in its store, not in the file.
    let unlimited = crate::model::Limits { max_vips: u32::MAX, max_backends: u32::MAX };
    crate::config::parse_with(
        &text,
        file,
        crate::model::DatapathConfig::default(),
        Some(unlimited),
    )?;
    Ok((std::path::absolute(file).unwrap_or_else(|_| file.to_owned()), text))
}

/// `lb agent`: its options checked here, so a mistake is a usage error.
fn run_agent(agent: args::AgentArgs) -> Result<(), Failure> {
    let store = agent.store.options();
    let Some(mut config) = store.url.clone() else {
        return Err(Failure::Usage("lb agent needs --store etcd://HOST:PORT/PREFIX".to_owned()));
    };
    store.apply_to(&mut config);
    let vips = agent
        .vips
        .iter()
        .map(|text| {
            parse_vip(text, None).map_err(|message| Failure::Usage(format!("--vip: {message}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let options = crate::agent::AgentOptions {
        store: config,
        vips,
        address: agent.address,
        weight: agent.weight,
        check: crate::agent::local_check(agent.check, agent.check_port, agent.check_path),
        ttl_seconds: agent.ttl,
        drain_timeout: std::time::Duration::from_secs(agent.drain_timeout),
        configure_vip: agent.configure_vip,
    };
    let runtime = tokio::runtime::Runtime::new().map_err(anyhow::Error::from)?;
    Ok(runtime.block_on(crate::agent::run(options))?)
}

/// Runs one `lb` command to completion.
pub fn execute(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    let request = match cli.command {
        Command::Run(run) => {
            let args::RunArgs {
                iface,
                config,
                state,
                xdp_mode,
                pin_dir,
                detach_on_exit,
                metrics,
                socket_group,
                tunnel_source,
                egress,
                fleet,
                store,
            } = *run;
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
                tunnel_sources: tunnel_source,
                egress,
                sync_peers: fleet.sync_peers,
                sync_listen: fleet.sync_listen,
                sync_key_file: fleet.sync_key_file,
                announce_table: fleet.announce_table,
                hash_seed: fleet.hash_seed,
                store: store.options(),
            };
            let runtime = tokio::runtime::Runtime::new().map_err(anyhow::Error::from)?;
            return Ok(runtime.block_on(daemon::run(options))?);
        }
        Command::Agent(agent) => return run_agent(*agent),
        Command::Decap(args) => return decap::run(&args, json),
        Command::Unload { iface, pin_dir } => return unload(&iface, &pin_dir, json),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "lb", &mut std::io::stdout());
            return Ok(());
        }
        Command::Man { dir } => {
            // `lb help` has no page of its own: the pages are the help.
            let command = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
            match dir {
                Some(dir) => clap_mangen::generate_to(command, &dir).map_err(|error| {
                    Failure::Other(anyhow::anyhow!(
                        "writing man pages in {}: {error}",
                        dir.display()
                    ))
                })?,
                None => clap_mangen::Man::new(command)
                    .render(&mut std::io::stdout())
                    .map_err(anyhow::Error::from)?,
            }
            return Ok(());
        }
        Command::Top { interval } => return top::run(&cli.socket, interval, json),
        Command::Vip(VipCommand::Add { vip, protocol, affinity, scheduler, forwarding, check }) => {
            Request::VipAdd {
                vip: vip_arg(&vip, &protocol)?,
                check,
                affinity,
                scheduler,
                forwarding,
            }
        }
        Command::Vip(VipCommand::Set {
            vip,
            protocol,
            affinity,
            scheduler,
            rebalance,
            forwarding,
        }) => {
            let vip = vip_arg(&vip, &protocol)?;
            Request::VipSet { vip, affinity, scheduler, rebalance, forwarding }
        }
        Command::Backend(BackendCommand::Drain { vip, backend, protocol }) => {
            Request::BackendDrain {
                vip: vip_arg(&vip, &protocol)?,
                address: backend_arg(&backend)?,
                draining: true,
            }
        }
        Command::Backend(BackendCommand::Undrain { vip, backend, protocol }) => {
            Request::BackendDrain {
                vip: vip_arg(&vip, &protocol)?,
                address: backend_arg(&backend)?,
                draining: false,
            }
        }
        Command::Backend(BackendCommand::Set { vip, backend, weight, protocol }) => {
            Request::BackendSet {
                vip: vip_arg(&vip, &protocol)?,
                address: backend_arg(&backend)?,
                weight,
            }
        }
        Command::Check(CheckCommand::Set { vip, protocol, check }) => {
            Request::CheckSet { vip: vip_arg(&vip, &protocol)?, check }
        }
        Command::Vip(VipCommand::Remove { vip, force, protocol }) => {
            Request::VipRemove { vip: vip_arg(&vip, &protocol)?, force }
        }
        Command::Vip(VipCommand::List) => Request::VipList,
        Command::Backend(BackendCommand::Add { vip, backend, weight, protocol }) => {
            Request::BackendAdd {
                vip: vip_arg(&vip, &protocol)?,
                address: backend_arg(&backend)?,
                weight,
            }
        }
        Command::Backend(BackendCommand::Remove {
            vip,
            backend,
            force,
            when_drained,
            timeout,
            protocol,
        }) => {
            let (vip, address) = (vip_arg(&vip, &protocol)?, backend_arg(&backend)?);
            if when_drained {
                let timeout = std::time::Duration::from_secs(timeout);
                return drained::remove(&cli.socket, vip, address, timeout, json);
            }
            Request::BackendRemove { vip, address, force }
        }
        Command::Backend(BackendCommand::List { vip, protocol }) => {
            let vip = vip.map(|vip| vip_arg(&vip, &protocol)).transpose()?;
            Request::BackendList { vip }
        }
        Command::Stats => Request::Stats,
        Command::Flows { vip, protocol, limit } => {
            Request::Flows { vip: vip_arg(&vip, &protocol)?, limit }
        }
        Command::Config(ConfigCommand::Check { file }) => return check_config(&file, json),
        Command::Config(ConfigCommand::Show) => Request::ConfigShow,
        Command::Store(StoreCommand::Status) => Request::StoreStatus,
        Command::Config(ConfigCommand::Diff { file }) => {
            let (file, text) = config_file(&file)?;
            Request::ConfigDiff { file, text }
        }
        Command::Config(ConfigCommand::Reload { force }) => Request::ConfigReload { force },
        Command::Config(ConfigCommand::Apply { file, force }) => {
            let (file, text) = config_file(&file)?;
            Request::ConfigApply { file, text, force }
        }
        Command::Lookup { vip, client, protocol } => {
            let client: SocketAddr = parse_endpoint(&client)
                .map_err(|message| Failure::Usage(format!("client: {message}")))?;
            Request::Lookup { vip: vip_arg(&vip, &protocol)?, client }
        }
    };
    let body = ask(&cli.socket, &request)?;
    output::print_body(&body, json)?;
    match body {
        Body::ConfigChanges { changes, applied: false, .. } if !changes.is_empty() => {
            Err(Failure::Differences(changes.len()))
        }
        _ => Ok(()),
    }
}

/// `lb unload`: removes the pins of a datapath no daemon serves.
fn unload(iface: &str, pin_dir: &Path, json: bool) -> Result<(), Failure> {
    let dir = crate::datapath::pin_dir_for(pin_dir, iface);
    if !dir.exists() {
        return Err(Failure::NotFound(format!(
            "nothing is pinned in {} (see --pin-dir)",
            dir.display()
        )));
    }
    let _lock = crate::datapath::lock_interface(&dir).map_err(|error| match error {
        crate::datapath::DatapathError::Locked { .. } => Failure::Refused(format!(
            "lb run is serving {iface} (it holds {}): stop it first (with --detach-on-exit to detach at once)",
            dir.display()
        )),
        other => Failure::Other(other.into()),
    })?;
    crate::datapath::remove_pins(&dir).map_err(anyhow::Error::from)?;
    let mut withdrawn = 0;
    if let Ok(ifindex) = crate::neighbour::interface_index(iface) {
        let runtime = tokio::runtime::Runtime::new().map_err(anyhow::Error::from)?;
        withdrawn = runtime.block_on(crate::announce::withdraw_all(ifindex))?;
    }
    let message = format!(
        "removed the pins in {}: the program detaches from {iface} as nothing holds it now{}",
        dir.display(),
        if withdrawn > 0 { format!("; withdrew {withdrawn} VIP route(s)") } else { String::new() }
    );
    output::print_body(&Body::Done { message, changed: true }, json)?;
    Ok(())
}
