//! `lb backend remove --when-drained`: the removal that breaks nothing.
//! The backend is drained (no new flows), the command waits until its
//! active flows have ended, then removes it; past the timeout it stays
//! draining, and the command fails saying so.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Failure, ask, output};
use crate::api::{BREAKS, Body, Request};
use crate::model::Vip;

/// How often the active flows are asked for (the daemon counts them about
/// once a second).
const POLL: Duration = Duration::from_secs(1);
/// How often the wait says how far it is, when the count does not move.
const PROGRESS: Duration = Duration::from_secs(30);

pub fn remove(
    socket: &Path,
    vip: Vip,
    address: IpAddr,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let drained = ask(socket, &Request::BackendDrain { vip, address, draining: true })?;
    if let Body::Done { message, .. } = &drained {
        eprintln!("{message}");
    }
    let started = Instant::now();
    let mut said: Option<(u64, Instant)> = None;
    loop {
        let flows = active_flows(socket, vip, address)?;
        if flows == 0 {
            let request = Request::BackendRemove { vip, address, force: false };
            match ask(socket, &request) {
                Ok(body) => return output::print_body(&body, json).map_err(Failure::Other),
                // A flow counted since (a peer's, synced): wait for it too.
                Err(Failure::Refused(message)) if message.contains(BREAKS) => {}
                Err(other) => return Err(other),
            }
        }
        if started.elapsed() >= timeout {
            return Err(Failure::Refused(format!(
                "backend {address} of VIP {vip} still carries {flows} active flow(s) after {timeout:?}: it stays draining and is not removed (`lb backend undrain` takes it back; --force removes it now)"
            )));
        }
        if said.is_none_or(|(count, at)| count != flows || at.elapsed() >= PROGRESS) {
            eprintln!(
                "waiting for {flows} active flow(s) of backend {address} to end ({:.0} s of {timeout:?})",
                started.elapsed().as_secs_f64()
            );
            said = Some((flows, Instant::now()));
        }
        std::thread::sleep(POLL);
    }
}

/// The backend's active flows, as the daemon last counted them.
fn active_flows(socket: &Path, vip: Vip, address: IpAddr) -> Result<u64, Failure> {
    match ask(socket, &Request::BackendList { vip: Some(vip) })? {
        Body::Backends { backends } => backends
            .iter()
            .find(|backend| backend.address == address)
            .map(|backend| backend.active_flows)
            .ok_or_else(|| {
                Failure::NotFound(format!("backend {address} of VIP {vip} is gone meanwhile"))
            }),
        other => Err(Failure::Other(anyhow::anyhow!("unexpected reply {other:?}"))),
    }
}
