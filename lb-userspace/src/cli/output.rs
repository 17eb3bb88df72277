//! How `lb` prints replies: aligned tables for people, or `--json`.

use crate::api::{self, Body};

pub fn print_body(body: &Body, json: bool) -> anyhow::Result<()> {
    if json {
        let value = match body {
            Body::Done { message, changed } => {
                serde_json::json!({ "message": message, "changed": changed })
            }
            Body::Vips { vips } => serde_json::to_value(vips)?,
            Body::Backends { backends } => serde_json::to_value(backends)?,
            Body::Stats(stats) => serde_json::to_value(stats)?,
            Body::Lookup(lookup) => serde_json::to_value(lookup)?,
            Body::Flows(flows) => serde_json::to_value(flows)?,
            Body::Config { toml } => serde_json::json!({ "toml": toml }),
            Body::ConfigChanges { file, changes, applied } => {
                serde_json::json!({ "file": file, "changes": changes, "applied": applied })
            }
            Body::Store(store) => serde_json::to_value(store)?,
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    match body {
        Body::Done { message, .. } => println!("{message}"),
        Body::Store(store) => print_store(store),
        Body::Flows(flows) => print_flows(flows),
        Body::Config { toml } => print!("{toml}"),
        Body::ConfigChanges { file, changes, applied } => {
            for change in changes {
                println!("{change}");
            }
            let file = file.display();
            match (changes.len(), applied) {
                (0, false) => println!("{file}: no differences from the running configuration"),
                (0, true) => println!("{file}: applied; nothing differed"),
                (count, false) => println!(
                    "{file}: {count} difference(s) from the running configuration (`lb config apply` applies them)"
                ),
                (count, true) => println!("{file}: applied {count} change(s)"),
            }
        }
        Body::Vips { vips } => {
            println!(
                "{:<32} {:>8} {:>7} {:>8} {:<6} {:<17} {:>12} {:>14} {:>10}",
                "VIP",
                "BACKENDS",
                "ACTIVE",
                "SERVING",
                "CHECK",
                "SCHEDULER",
                "PACKETS",
                "BYTES",
                "PPS"
            );
            for vip in vips {
                let serving = if vip.all_down {
                    "ALL-DOWN".to_owned()
                } else {
                    vip.serving_backends.to_string()
                };
                let check = serde_json::to_value(vip.check.kind)?;
                println!(
                    "{:<32} {:>8} {:>7} {:>8} {:<6} {:<17} {:>12} {:>14} {:>10.0}",
                    vip.vip,
                    vip.backends,
                    vip.active_backends,
                    serving,
                    check.as_str().unwrap_or("?"),
                    vip.scheduler.to_string(),
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
            for vip in vips.iter().filter(|vip| vip.forwarding.is_tunnel()) {
                println!("forwarding {}: {}", vip.vip, vip.forwarding);
            }
            for vip in vips.iter().filter(|vip| vip.rebalance.is_on()) {
                println!(
                    "rebalance {}: {}; {}, furthest backend {:.0}% off its share",
                    vip.vip,
                    vip.rebalance,
                    vip.rebalancing,
                    vip.rebalance_skew * 100.0
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
            let mib = |bytes: Option<u64>| {
                bytes.map_or("unknown".to_owned(), |b| format!("{} MiB", b >> 20))
            };
            println!(
                "\nFlow table: {} flows, {}; all maps: {}",
                stats.flow_table_size,
                mib(stats.flow_table_memory_bytes),
                mib(stats.map_memory_bytes)
            );
            println!("Maglev tables installed since start: {}", stats.tables_built);
            if let Some(table) = stats.announce_table {
                let announced: Vec<String> =
                    stats.announced.iter().map(ToString::to_string).collect();
                println!(
                    "Announced in table {table}: {}",
                    if announced.is_empty() { "nothing".to_owned() } else { announced.join(", ") }
                );
            }
            if let Some(sync) = &stats.sync {
                print_sync(sync);
            }
            if let Some(store) = &stats.store {
                println!();
                print_store(store);
            }
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

fn print_flows(flows: &api::FlowsView) {
    println!("{:<48} {:<40} {:<8} {:>8}", "CLIENT", "BACKEND", "STATE", "IDLE");
    for flow in &flows.flows {
        let backend = flow.backend.map_or("(removed)".to_owned(), |backend| backend.to_string());
        println!(
            "{:<48} {:<40} {:<8} {:>7.0}s",
            flow.client.to_string(),
            backend,
            flow.state,
            flow.idle_seconds
        );
    }
    let more =
        if flows.truncated { " (limit reached: there may be more; see --limit)" } else { "" };
    println!("{} flow(s) of {}{more}", flows.flows.len(), flows.vip);
}

/// Whether the backends leave by more than one interface (`lb run
/// --egress`): then the MAC column names each one's interface too.
fn backends_leave_by_several(backends: &[api::BackendView]) -> bool {
    let mut interfaces = backends.iter().filter_map(|backend| backend.via.as_deref());
    let first = interfaces.next();
    interfaces.any(|via| Some(via) != first)
}

fn print_backends(backends: &[api::BackendView]) {
    println!(
        "{:<32} {:<24} {:>6} {:<9} {:<22} {:>10} {:>12} {:>9} {:<17} {:>12} {:>10}  LAST ERROR",
        "VIP",
        "BACKEND",
        "WEIGHT",
        "STATE",
        "ORIGIN",
        "SINCE",
        "ACTIVE FLOWS",
        "NEW SHARE",
        "MAC",
        "PACKETS",
        "PPS"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let name_interfaces = backends_leave_by_several(backends);
    for backend in backends {
        println!(
            "{:<32} {:<24} {:>6} {:<9} {:<22} {:>10} {:>12} {:>8.1}% {:<17} {:>12} {:>10.0}  {}",
            backend.vip,
            backend.address.to_string(),
            backend.weight,
            backend.state,
            match &backend.lease {
                Some(lease) => format!("agent/{lease}"),
                None => backend.origin.clone(),
            },
            format_age(now - backend.since),
            backend.active_flows,
            backend.new_flow_share * 100.0,
            match (&backend.mac, &backend.via) {
                (Some(mac), Some(via)) if name_interfaces => format!("{mac} via {via}"),
                (Some(mac), _) => mac.clone(),
                (None, _) => "-".to_owned(),
            },
            backend.packets,
            backend.packets_per_second,
            backend.last_error.as_deref().unwrap_or("-"),
        );
    }
    for backend in backends {
        let Some(target) = backend.rebalance_target else { continue };
        let would = match backend.rebalance_would_close {
            0 => String::new(),
            n => format!(", would close {n} (dry-run)"),
        };
        println!(
            "rebalance {} {}: {} active against a share of {target:.0}, {} closed{would}",
            backend.vip, backend.address, backend.active_flows, backend.rebalance_closed
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

fn print_sync(sync: &crate::sync::SyncStatus) {
    let listen = sync.listen.map_or("?".to_owned(), |listen| listen.to_string());
    let initial = if sync.initial_sync_done { "done" } else { "in progress" };
    println!("\nFlow sync on {listen} (initial sync {initial})");
    println!(
        "{:<28} {:<11} {:>10} {:>10} {:>8} {:>8} {:>8}",
        "PEER", "STATE", "SENT", "RECEIVED", "REFUSED", "HEARD", "LAG"
    );
    let ms = |value: Option<u64>| value.map_or("-".to_owned(), |ms| format!("{ms}ms"));
    for peer in &sync.peers {
        println!(
            "{:<28} {:<11} {:>10} {:>10} {:>8} {:>8} {:>8}",
            peer.address.to_string(),
            peer.state.to_string(),
            peer.flows_sent,
            peer.flows_received,
            peer.flows_refused,
            ms(peer.last_heard_ms),
            ms(peer.lag_ms)
        );
        if let Some(because) = &peer.refused_because {
            println!("  refused: {because}");
        }
    }
    println!(
        "Dropped datagrams: {} unauthenticated, {} stale or replayed, {} malformed, {} from unknown senders, {} with other settings",
        sync.dropped_unauthenticated,
        sync.dropped_stale,
        sync.dropped_malformed,
        sync.dropped_unknown_sender,
        sync.dropped_settings_differ
    );
}

fn print_store(store: &api::StoreView) {
    let contact = store
        .seconds_since_contact
        .map_or("never".to_owned(), |seconds| format!("{seconds:.1}s ago"));
    println!(
        "Store {}: {}, revision {} applied (store at {}), last contact {contact}",
        store.url,
        serde_json::to_value(store.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        store.applied_revision,
        store.store_revision
    );
    if let Some(revision) = store.restored_from_local {
        println!(
            "  running on the local copy of revision {revision}: the store has not answered since the start"
        );
    }
    if let Some(error) = &store.last_error {
        println!("  last error: {error}");
    }
    if let Some(error) = &store.apply_error {
        println!("  not installed: {error}");
    }
    if store.pending_writes > 0 {
        println!("  changes waiting for the store: {}", store.pending_writes);
    }
    for refused in &store.refused {
        println!("  refused key {}: {}", refused.key, refused.reason);
    }
}
