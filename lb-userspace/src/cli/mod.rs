//! The `lb` command-line client: parses arguments (`args`), turns them into
//! a control request, sends it through `api`, and prints the reply
//! (`output`). It never touches BPF; `lb run` hands over to the daemon.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::api::{self, Reply, Request};
use crate::daemon::{self, RunOptions};
use crate::model::{Vip, parse_address, parse_endpoint};

pub mod args;
mod output;

use args::{BackendCommand, CheckCommand, Cli, Command, ConfigCommand, ProtocolArg, VipCommand};

fn vip_arg(text: &str, protocol: &ProtocolArg) -> anyhow::Result<Vip> {
    let endpoint = parse_endpoint(text).map_err(|message| anyhow::anyhow!("VIP: {message}"))?;
    Ok(Vip::new(endpoint, protocol.protocol))
}

fn backend_arg(text: &str) -> anyhow::Result<IpAddr> {
    parse_address(text).map_err(|message| anyhow::anyhow!("backend: {message}"))
}

/// `lb config check`: reads the file as `lb run --config` would and says
/// whether it would be accepted (an error, so exit status 1, if not).
fn check_config(file: &Path, json: bool) -> anyhow::Result<()> {
    let config = match crate::config::load(file) {
        Ok(config) => config,
        Err(error) => {
            if json {
                let report =
                    serde_json::json!({ "file": file, "valid": false, "error": error.to_string() });
                println!("{report}");
            }
            return Err(error.into());
        }
    };
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

/// Runs one `lb` command to completion.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
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
            fleet,
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
                sync_peers: fleet.sync_peers,
                sync_listen: fleet.sync_listen,
                sync_key_file: fleet.sync_key_file,
                announce_table: fleet.announce_table,
                hash_seed: fleet.hash_seed,
            };
            let runtime = tokio::runtime::Runtime::new()?;
            return runtime.block_on(daemon::run(options));
        }
        Command::Unload { iface, pin_dir } => {
            let dir = crate::datapath::pin_dir_for(&pin_dir, &iface);
            if !dir.exists() {
                anyhow::bail!("nothing is pinned in {} (see --pin-dir)", dir.display());
            }
            let _lock = crate::datapath::lock_interface(&dir).map_err(|error| match error {
                crate::datapath::DatapathError::Locked { .. } => anyhow::anyhow!(
                    "lb run is serving {iface} (it holds {}): stop it first (with --detach-on-exit to detach at once)",
                    dir.display()
                ),
                other => other.into(),
            })?;
            crate::datapath::remove_pins(&dir)?;
            let ifindex = crate::neighbour::interface_index(&iface).ok();
            if let Some(ifindex) = ifindex {
                let runtime = tokio::runtime::Runtime::new()?;
                let withdrawn = runtime.block_on(crate::announce::withdraw_all(ifindex))?;
                if withdrawn > 0 {
                    println!("withdrew {withdrawn} VIP route(s) published for {iface}");
                }
            }
            println!(
                "removed the pins in {}: the program detaches from {iface} as nothing holds it now",
                dir.display()
            );
            return Ok(());
        }
        Command::Vip(VipCommand::Add { vip, protocol, affinity, scheduler, check }) => {
            (Request::VipAdd { vip: vip_arg(&vip, &protocol)?, check, affinity, scheduler }, false)
        }
        Command::Vip(VipCommand::Set { vip, protocol, affinity, scheduler }) => {
            (Request::VipSet { vip: vip_arg(&vip, &protocol)?, affinity, scheduler }, false)
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
        Command::Config(ConfigCommand::Check { file, output }) => {
            return check_config(&file, output.json);
        }
        Command::Lookup { vip, client, protocol, output } => {
            let client: SocketAddr =
                parse_endpoint(&client).map_err(|message| anyhow::anyhow!("client: {message}"))?;
            (Request::Lookup { vip: vip_arg(&vip, &protocol)?, client }, output.json)
        }
    };
    match api::call(&cli.socket, &request)? {
        Reply::Error(message) => anyhow::bail!("{message}"),
        Reply::Ok(body) => {
            output::print_body(&body, json)?;
            Ok(())
        }
    }
}
