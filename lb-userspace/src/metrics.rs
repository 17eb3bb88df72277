//! The Prometheus endpoint (`lb run --metrics ADDR:PORT`): a GET of
//! `/metrics` answers with the same figures `lb stats --json` gives, in the
//! Prometheus text exposition format (0.0.4). The numbers come from the
//! daemon through the control API, so the two never disagree.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::api::{Body, Call, Reply, Request, StatsView};

/// Serves `/metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, calls: mpsc::Sender<Call>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, calls)).await;
        });
    }
}

pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|error| anyhow::anyhow!("metrics endpoint {address}: {error} (choose another --metrics ADDR:PORT, or --metrics off)"))
}

/// What a scraper asked for.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    Elsewhere,
    /// Not an HTTP request head (or larger than 8 KiB).
    Garbage,
}

/// Parses a request head with httparse; Partial while more may come.
fn asked(head: &[u8]) -> Option<Asked> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {
            let path = request.path.unwrap_or_default();
            let path = path.split_once('?').map_or(path, |(path, _)| path);
            Some(if request.method == Some("GET") && path == "/metrics" {
                Asked::Metrics
            } else {
                Asked::Elsewhere
            })
        }
        Ok(httparse::Status::Partial) if head.len() < 8192 => None,
        Ok(httparse::Status::Partial) | Err(_) => Some(Asked::Garbage),
    }
}

async fn answer(mut stream: TcpStream, calls: mpsc::Sender<Call>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    let asked = loop {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break Asked::Garbage;
        }
        head.extend_from_slice(&buffer[..read]);
        if let Some(asked) = asked(&head) {
            break asked;
        }
    };
    let (status, body) = match asked {
        Asked::Metrics => {
            let (reply_tx, reply_rx) = oneshot::channel();
            let stats = match calls.send((Request::Stats, reply_tx)).await {
                Ok(()) => reply_rx.await.ok(),
                Err(_) => None,
            };
            match stats {
                Some(Reply::Ok(Body::Stats(stats))) => ("200 OK", render(&stats)),
                _ => ("503 Service Unavailable", "the daemon did not answer\n".to_owned()),
            }
        }
        Asked::Elsewhere => ("404 Not Found", "only /metrics is served here\n".to_owned()),
        Asked::Garbage => ("400 Bad Request", "not an HTTP request\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// A label value, escaped as the exposition format requires.
fn label(value: &str) -> String {
    value.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

/// The stats in Prometheus text format. Names follow Prometheus
/// conventions: `lb_` prefix, base units, `_total` for counters.
pub fn render(stats: &StatsView) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let vip_label = |vip: &str| format!("{{vip=\"{}\"}}", label(vip));
    let backend_label = |vip: &str, backend: &str| {
        format!("{{vip=\"{}\",backend=\"{}\"}}", label(vip), label(backend))
    };

    family(
        "lb_vip_packets_total",
        "counter",
        "Packets forwarded for the VIP.",
        stats.vips.iter().map(|v| (vip_label(&v.vip), v.packets.to_string())).collect(),
    );
    family(
        "lb_vip_bytes_total",
        "counter",
        "Bytes (whole frames) forwarded for the VIP.",
        stats.vips.iter().map(|v| (vip_label(&v.vip), v.bytes.to_string())).collect(),
    );
    family(
        "lb_vip_scheduler",
        "gauge",
        "1 for the scheduler that shares the VIP's new flows (maglev or least-connections).",
        stats
            .vips
            .iter()
            .map(|v| {
                let labels = format!("{{vip=\"{}\",scheduler=\"{}\"}}", label(&v.vip), v.scheduler);
                (labels, "1".to_owned())
            })
            .collect(),
    );
    family(
        "lb_vip_backends",
        "gauge",
        "Backends configured for the VIP.",
        stats.vips.iter().map(|v| (vip_label(&v.vip), v.backends.to_string())).collect(),
    );
    family(
        "lb_vip_serving_backends",
        "gauge",
        "Backends of the VIP receiving new flows.",
        stats.vips.iter().map(|v| (vip_label(&v.vip), v.serving_backends.to_string())).collect(),
    );
    family(
        "lb_vip_all_down",
        "gauge",
        "1 when every backend fails its checks and the VIP fails open.",
        stats.vips.iter().map(|v| (vip_label(&v.vip), u8::from(v.all_down).to_string())).collect(),
    );
    family(
        "lb_backend_icmp_errors_total",
        "counter",
        "ICMP errors (path MTU, unreachable, time exceeded) about the backend's flows, forwarded to it.",
        stats
            .backends
            .iter()
            .map(|b| (backend_label(&b.vip, &b.address.to_string()), b.icmp_errors.to_string()))
            .collect(),
    );
    family(
        "lb_backend_packets_total",
        "counter",
        "Packets forwarded to the backend.",
        stats
            .backends
            .iter()
            .map(|b| (backend_label(&b.vip, &b.address.to_string()), b.packets.to_string()))
            .collect(),
    );
    family(
        "lb_backend_bytes_total",
        "counter",
        "Bytes (whole frames) forwarded to the backend.",
        stats
            .backends
            .iter()
            .map(|b| (backend_label(&b.vip, &b.address.to_string()), b.bytes.to_string()))
            .collect(),
    );
    family(
        "lb_backend_active_flows",
        "gauge",
        "Flows in the flow table neither closing nor idle.",
        stats
            .backends
            .iter()
            .map(|b| (backend_label(&b.vip, &b.address.to_string()), b.active_flows.to_string()))
            .collect(),
    );
    family(
        "lb_backend_new_flow_share",
        "gauge",
        "Part of the VIP's new flows the backend gets now (0 to 1): by weight under maglev, toward the least loaded under least-connections.",
        stats
            .backends
            .iter()
            .map(|b| (backend_label(&b.vip, &b.address.to_string()), b.new_flow_share.to_string()))
            .collect(),
    );
    family(
        "lb_backend_up",
        "gauge",
        "1 when the backend passes its health checks (up or draining).",
        stats
            .backends
            .iter()
            .map(|b| {
                let up = matches!(b.state.as_str(), "up" | "draining");
                (backend_label(&b.vip, &b.address.to_string()), u8::from(up).to_string())
            })
            .collect(),
    );
    family(
        "lb_backend_state",
        "gauge",
        "1 for the backend's current state (up, draining, down, resolving).",
        stats
            .backends
            .iter()
            .map(|b| {
                let labels = format!(
                    "{{vip=\"{}\",backend=\"{}\",state=\"{}\"}}",
                    label(&b.vip),
                    b.address,
                    label(&b.state)
                );
                (labels, "1".to_owned())
            })
            .collect(),
    );
    family(
        "lb_datapath_packets_total",
        "counter",
        "Packets by the reason the datapath forwarded, passed or dropped them.",
        stats
            .reasons
            .iter()
            .map(|(reason, count)| (format!("{{reason=\"{}\"}}", label(reason)), count.to_string()))
            .collect(),
    );
    family(
        "lb_flow_table_events_total",
        "counter",
        "VIP packets by flow-table path (created, hit, miss_fallback, rescued, expired).",
        stats
            .flow_events
            .iter()
            .map(|(event, count)| (format!("{{event=\"{}\"}}", label(event)), count.to_string()))
            .collect(),
    );
    family(
        "lb_flow_table_size",
        "gauge",
        "Flows the flow table holds before evicting.",
        vec![(String::new(), stats.flow_table_size.to_string())],
    );
    family(
        "lb_table_rebuilds_total",
        "counter",
        "Maglev tables built and installed since lb run started.",
        vec![(String::new(), stats.tables_built.to_string())],
    );
    family(
        "lb_table_rebuild_seconds_total",
        "counter",
        "Time spent building and installing Maglev tables.",
        vec![(String::new(), format!("{:.6}", stats.table_rebuild_seconds))],
    );
    family(
        "lb_announced_vips",
        "gauge",
        "VIP addresses published for the routing daemon to announce.",
        vec![(String::new(), stats.announced.len().to_string())],
    );
    if let Some(sync) = &stats.sync {
        render_sync(sync, &mut family);
    }
    out
}

/// Flow sync's figures: per peer, and datagrams dropped by reason.
fn render_sync(
    sync: &crate::sync::SyncStatus,
    family: &mut impl FnMut(&str, &str, &str, Vec<(String, String)>),
) {
    let peer_label = |peer: &crate::sync::PeerStatus| format!("{{peer=\"{}\"}}", peer.address);
    let per_peer = |value: fn(&crate::sync::PeerStatus) -> String| {
        sync.peers.iter().map(|peer| (peer_label(peer), value(peer))).collect::<Vec<_>>()
    };
    family(
        "lb_sync_initial_done",
        "gauge",
        "1 once the first full resync from every reachable peer is complete.",
        vec![(String::new(), u8::from(sync.initial_sync_done).to_string())],
    );
    family(
        "lb_sync_peer_in_sync",
        "gauge",
        "1 when the peer is heard and its flows are all known here.",
        per_peer(|peer| u8::from(peer.state == crate::sync::PeerState::InSync).to_string()),
    );
    family(
        "lb_sync_peer_refused",
        "gauge",
        "1 when the peer's hash seed or table size differs from ours.",
        per_peer(|peer| u8::from(peer.state == crate::sync::PeerState::Refused).to_string()),
    );
    family(
        "lb_sync_flows_sent_total",
        "counter",
        "Flow records sent to the peer.",
        per_peer(|peer| peer.flows_sent.to_string()),
    );
    family(
        "lb_sync_flows_received_total",
        "counter",
        "Flow records received from the peer and applied.",
        per_peer(|peer| peer.flows_received.to_string()),
    );
    family(
        "lb_sync_flows_refused_total",
        "counter",
        "Flow records from the peer naming a VIP or backend not configured here.",
        per_peer(|peer| peer.flows_refused.to_string()),
    );
    family(
        "lb_sync_peer_lag_seconds",
        "gauge",
        "Age of the peer's last datagram on arrival.",
        sync.peers
            .iter()
            .filter_map(|peer| {
                Some((peer_label(peer), format!("{:.3}", peer.lag_ms? as f64 / 1e3)))
            })
            .collect(),
    );
    family(
        "lb_sync_datagrams_dropped_total",
        "counter",
        "Sync datagrams dropped before use, by reason.",
        [
            ("unauthenticated", sync.dropped_unauthenticated),
            ("stale", sync.dropped_stale),
            ("malformed", sync.dropped_malformed),
            ("unknown_sender", sync.dropped_unknown_sender),
            ("settings_differ", sync.dropped_settings_differ),
        ]
        .into_iter()
        .map(|(reason, count)| (format!("{{reason=\"{reason}\"}}"), count.to_string()))
        .collect(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_as_http_heads() {
        assert_eq!(asked(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Some(Asked::Metrics));
        assert_eq!(asked(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Some(Asked::Metrics));
        assert_eq!(asked(b"GET /metrics HTTP/1.1\r\nHost:"), None, "more may come");
        assert_eq!(asked(b"GET / HTTP/1.1\r\n\r\n"), Some(Asked::Elsewhere));
        assert_eq!(asked(b"POST /metrics HTTP/1.1\r\n\r\n"), Some(Asked::Elsewhere));
        assert_eq!(asked(b"\x16\x03\x01 garbage\r\n\r\n"), Some(Asked::Garbage));
        assert_eq!(asked(&[b'a'; 9000]), Some(Asked::Garbage));
    }
}
