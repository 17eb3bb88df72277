//! `lb flows VIP`: a bounded walk of the flow table on a blocking thread,
//! like the active-flow count, so that listing never holds up the loop.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::api::{Body, FlowView, FlowsView, Reply};
use crate::datapath::{FlowCounter, FlowState, monotonic_ns};
use crate::model::{Vip, address_from_bytes};
use crate::reconcile::FlowOwners as Owners;

/// Answers on `reply` once the walk is done; a walk that fails says so.
pub fn list(
    walker: Arc<FlowCounter>,
    vip: Vip,
    owners: Owners,
    limit: u32,
    reply: oneshot::Sender<Reply>,
) {
    tokio::spawn(async move {
        let walked = tokio::task::spawn_blocking(move || {
            let (flows, truncated) = walker.flows_of(owners.vip_index, limit as usize);
            view(&walker, vip, &owners, &flows, truncated)
        })
        .await;
        let _ = reply.send(match walked {
            Ok(view) => Reply::Ok(Body::Flows(view)),
            Err(error) => Reply::Error(format!("walking the flow table failed: {error}")),
        });
    });
}

fn view(
    walker: &FlowCounter,
    vip: Vip,
    owners: &Owners,
    flows: &[(lb_common::FlowKey, lb_common::FlowEntry)],
    truncated: bool,
) -> FlowsView {
    let now = monotonic_ns();
    let family = lb_common::address_bytes(vip.address).1;
    let config = walker.config();
    let flows = flows
        .iter()
        .filter_map(|(key, entry)| {
            let client = address_from_bytes(key.client_address, family)?;
            let idle_ns = now.saturating_sub(entry.last_seen_ns);
            Some(FlowView {
                client: SocketAddr::new(client, u16::from_be_bytes(key.client_port)),
                backend: owners.backends.get(&(entry.backend_slot, entry.generation)).copied(),
                state: FlowState::of(key, entry, now, config).name().to_owned(),
                idle_seconds: idle_ns as f64 / 1e9,
            })
        })
        .collect();
    FlowsView { vip: vip.to_string(), flows, truncated }
}
