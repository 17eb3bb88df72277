//! The fleet's figures: flow sync with peer balancers, and the store.

use prometheus_client::encoding::DescriptorEncoder;

use super::{counter, family, flag, gauge, one};
use crate::api::StoreView;
use crate::store::StoreState;

/// Flow sync's figures: per peer, and datagrams dropped by reason.
pub(super) fn encode_sync(
    sync: &crate::sync::SyncStatus,
    e: &mut DescriptorEncoder,
) -> std::fmt::Result {
    let labels = |peer: &crate::sync::PeerStatus| vec![("peer", peer.address.to_string())];
    let per_peer = |value: fn(&crate::sync::PeerStatus) -> u64| {
        sync.peers.iter().map(move |peer| (labels(peer), counter(value(peer))))
    };
    one(
        e,
        "lb_sync_initial_done",
        "1 once the first full resync from every reachable peer is complete.",
        flag(sync.initial_sync_done),
    )?;
    family(
        e,
        "lb_sync_peer_in_sync",
        "1 when the peer is heard and its flows are all known here.",
        sync.peers
            .iter()
            .map(|peer| (labels(peer), flag(peer.state == crate::sync::PeerState::InSync))),
    )?;
    family(
        e,
        "lb_sync_peer_refused",
        "1 when the peer's hash seed or table size differs from ours.",
        sync.peers
            .iter()
            .map(|peer| (labels(peer), flag(peer.state == crate::sync::PeerState::Refused))),
    )?;
    family(
        e,
        "lb_sync_flows_sent",
        "Flow records sent to the peer.",
        per_peer(|peer| peer.flows_sent),
    )?;
    family(
        e,
        "lb_sync_flows_received",
        "Flow records received from the peer and applied.",
        per_peer(|peer| peer.flows_received),
    )?;
    family(
        e,
        "lb_sync_flows_refused",
        "Flow records from the peer naming a VIP or backend not configured here.",
        per_peer(|peer| peer.flows_refused),
    )?;
    family(
        e,
        "lb_sync_peer_up",
        "1 while the peer is heard (within the sync timeout) and not refused.",
        sync.peers.iter().map(|peer| (labels(peer), flag(peer.up()))),
    )?;
    family(
        e,
        "lb_sync_peer_lag_seconds",
        "Age now of the newest datagram from the peer (its age on arrival plus the time since): it grows while the peer is silent.",
        sync.peers
            .iter()
            .filter_map(|peer| Some((labels(peer), gauge(peer.lag_now_ms()? as f64 / 1e3)))),
    )?;
    family(
        e,
        "lb_sync_datagrams_dropped",
        "Sync datagrams dropped before use, by reason.",
        [
            ("unauthenticated", sync.dropped_unauthenticated),
            ("stale", sync.dropped_stale),
            ("malformed", sync.dropped_malformed),
            ("unknown_sender", sync.dropped_unknown_sender),
            ("settings_differ", sync.dropped_settings_differ),
        ]
        .into_iter()
        .map(|(reason, n)| (vec![("reason", reason.to_owned())], counter(n))),
    )
}

/// The fleet store's figures: whether it answers, the revisions, the time
/// since it last did, and the refused keys.
pub(super) fn encode_store(store: &StoreView, e: &mut DescriptorEncoder) -> std::fmt::Result {
    let url = || vec![("store", store.url.clone())];
    family(
        e,
        "lb_store_up",
        "1 while the store answers (connected), 0 while it is unreachable or refused.",
        [(url(), flag(store.state == StoreState::Connected))],
    )?;
    family(
        e,
        "lb_store_refused",
        "1 while the store's fleet settings differ from this balancer's (nothing of it is applied).",
        [(url(), flag(store.state == StoreState::Refused))],
    )?;
    family(
        e,
        "lb_store_applied_revision",
        "The store revision whose desired state is installed here.",
        [(url(), gauge(store.applied_revision as f64))],
    )?;
    family(
        e,
        "lb_store_revision",
        "The store's latest revision this balancer has seen.",
        [(url(), gauge(store.store_revision as f64))],
    )?;
    family(
        e,
        "lb_store_seconds_since_contact",
        "Seconds since the store last answered.",
        store.seconds_since_contact.map(|seconds| (url(), gauge(seconds))),
    )?;
    family(
        e,
        "lb_store_refused_keys",
        "Keys of the store refused (not parsed, or refused by the rules); see lb store status.",
        [(url(), gauge(store.refused.len() as f64))],
    )?;
    family(
        e,
        "lb_store_pending_writes",
        "Changes accepted here that wait for the store.",
        [(url(), gauge(store.pending_writes as f64))],
    )
}
