//! `lb decap`: loads, refreshes, reports on or removes the backend-side
//! decapsulator of an interface (crate::decap does the work).

use crate::api::Body;
use crate::decap;

use super::args::DecapArgs;
use super::{Failure, output};

pub fn run(args: &DecapArgs, json: bool) -> Result<(), Failure> {
    let dir = decap::pin_dir_for(&args.pin_dir, &args.iface);
    if args.detach {
        if !decap::remove_pins(&dir).map_err(anyhow::Error::from)? {
            return Err(not_pinned(&dir));
        }
        let detached = wait_detached(&args.iface)?;
        let message = format!(
            "removed the pins in {}: the decapsulator {} {}",
            dir.display(),
            if detached { "is detached from" } else { "was still attached after 5 s to" },
            args.iface
        );
        output::print_body(&Body::Done { message, changed: true }, json)?;
        return Ok(());
    }
    if args.stats {
        let counters = decap::pinned_counters(&dir)
            .map_err(anyhow::Error::from)?
            .ok_or_else(|| not_pinned(&dir))?;
        if json {
            let counters: serde_json::Map<String, serde_json::Value> = counters
                .iter()
                .map(|(reason, count)| (reason.name().to_owned(), (*count).into()))
                .collect();
            let document = serde_json::json!({ "iface": args.iface, "counters": counters });
            println!("{document}");
        } else {
            for (reason, count) in counters {
                println!("{:<22} {count}", reason.name());
            }
        }
        return Ok(());
    }
    crate::neighbour::interface_index(&args.iface)
        .map_err(|error| Failure::Usage(format!("--iface {}: {error:#}", args.iface)))?;
    crate::datapath::ensure_bpffs(&args.pin_dir).map_err(anyhow::Error::from)?;
    let mut decapsulator =
        decap::Decapsulator::load(args.gue_port, Some(&dir)).map_err(anyhow::Error::from)?;
    let addresses = decap::host_addresses()?;
    let local = decapsulator.set_local(&addresses).map_err(anyhow::Error::from)?;
    let used = decapsulator.attach(&args.iface, args.xdp_mode).map_err(anyhow::Error::from)?;
    let message = format!(
        "decapsulating IPIP, IP6IP6 and GUE to port {} on {} ({used}) for this host's {local} addresses; pinned in {}",
        args.gue_port,
        args.iface,
        dir.display()
    );
    output::print_body(&Body::Done { message, changed: true }, json)?;
    Ok(())
}

/// The kernel lets go of a link whose last pin is removed only after an
/// RCU grace period: waits (5 s at most) until `iface` no longer runs the
/// decapsulator, so that what follows `--detach` never meets it. True once
/// it is gone (or the interface is).
fn wait_detached(iface: &str) -> Result<bool, Failure> {
    let Ok(ifindex) = crate::neighbour::interface_index(iface) else { return Ok(true) };
    let runtime = tokio::runtime::Runtime::new().map_err(anyhow::Error::from)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let attached = runtime.block_on(crate::interface::attached_program(ifindex))?;
        let ours = attached
            .is_some_and(|program| program.name.as_deref() == Some(lb_common::DECAP_PROGRAM_NAME));
        if !ours {
            return Ok(true);
        }
        if std::time::Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn not_pinned(dir: &std::path::Path) -> Failure {
    Failure::NotFound(format!(
        "no decapsulator is pinned in {} (see --iface and --pin-dir)",
        dir.display()
    ))
}
