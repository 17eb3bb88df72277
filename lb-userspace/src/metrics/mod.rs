//! The Prometheus endpoint (`lb run --metrics ADDR:PORT`): a GET of
//! `/metrics` answers with the same figures `lb stats --json` gives, in the
//! OpenMetrics text format, encoded by prometheus-client. The numbers come
//! from the daemon through the control API, so the two never disagree.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::api::{BackendView, Body, Call, Reply, Request, StatsView};

mod fleet;
mod rebalance;

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

const TEXT: &str = "text/plain; charset=utf-8";

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
    let (status, body, content_type) = match asked {
        Asked::Metrics => {
            let (reply_tx, reply_rx) = oneshot::channel();
            let stats = match calls.send((Request::Stats, reply_tx)).await {
                Ok(()) => reply_rx.await.ok(),
                Err(_) => None,
            };
            match stats {
                Some(Reply::Ok(Body::Stats(stats))) => ("200 OK", render(&stats), CONTENT_TYPE),
                _ => ("503 Service Unavailable", "the daemon did not answer\n".to_owned(), TEXT),
            }
        }
        Asked::Elsewhere => ("404 Not Found", "only /metrics is served here\n".to_owned(), TEXT),
        Asked::Garbage => ("400 Bad Request", "not an HTTP request\n".to_owned(), TEXT),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The OpenMetrics content type prometheus-client's text encoder writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The stats in the OpenMetrics text format, encoded by prometheus-client.
/// Names follow Prometheus conventions: `lb_` prefix, base units, counters
/// end in `_total` (the encoder adds it), limits end in `_capacity`.
pub fn render(stats: &StatsView) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(stats.clone())));
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// One scrape's figures, as `lb stats` gives them.
#[derive(Debug)]
struct Snapshot(StatsView);

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family: its help, its type, and one sample per label set.
fn family<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, value) in samples {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn one<M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: M,
) -> std::fmt::Result {
    value.encode(encoder.encode_descriptor(name, help, None, M::TYPE)?)
}

fn counter(value: u64) -> ConstCounter<u64> {
    ConstCounter::new(value)
}

fn gauge(value: f64) -> ConstGauge<f64> {
    ConstGauge::new(value)
}

fn flag(on: bool) -> ConstGauge<i64> {
    ConstGauge::new(i64::from(on))
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let stats = &self.0;
        let e = &mut encoder;
        let build = Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("layout", lb_common::LAYOUT_VERSION.to_string()),
        ]);
        build.encode(e.encode_descriptor(
            "lb_build",
            "The running lb's version and map layout.",
            None,
            Info::<Labels>::TYPE,
        )?)?;
        family(
            e,
            "lb_attach_mode",
            "1 for how the XDP program is attached: native (driver) or skb (generic, far slower).",
            [(vec![("mode", stats.attach_mode.clone())], flag(true))],
        )?;
        self.encode_vips(e)?;
        self.encode_backends(e)?;
        rebalance::encode(stats, e)?;
        family(
            e,
            "lb_datapath_packets",
            "Packets by the reason the datapath forwarded, passed or dropped them.",
            stats.reasons.iter().map(|(reason, n)| (vec![("reason", reason.clone())], counter(*n))),
        )?;
        family(
            e,
            "lb_flow_table_events",
            "VIP packets by flow-table path (created, hit, miss_fallback, rescued, expired).",
            stats
                .flow_events
                .iter()
                .map(|(event, n)| (vec![("event", event.clone())], counter(*n))),
        )?;
        one(
            e,
            "lb_flow_table_capacity",
            "Flows the flow table holds before evicting the least recently used.",
            gauge(f64::from(stats.flow_table_size)),
        )?;
        if let Some(bytes) = stats.map_memory_bytes {
            one(
                e,
                "lb_map_memory_bytes",
                "Kernel memory charged for the datapath's BPF maps (memlock).",
                gauge(bytes as f64),
            )?;
        }
        one(
            e,
            "lb_flow_table_entries",
            "Flows in the flow table at the last count (about every second).",
            gauge(stats.flow_table_entries as f64),
        )?;
        one(
            e,
            "lb_vips_capacity",
            "Most VIPs the maps hold (max_vips).",
            gauge(f64::from(stats.max_vips)),
        )?;
        one(
            e,
            "lb_backends_capacity",
            "Most backends over all VIPs the maps hold (max_backends).",
            gauge(f64::from(stats.max_backends)),
        )?;
        one(
            e,
            "lb_table_rebuilds",
            "Maglev tables built and installed since lb run started.",
            counter(stats.tables_built),
        )?;
        one(
            e,
            "lb_table_rebuild_seconds",
            "Time spent building and installing Maglev tables.",
            ConstCounter::new(stats.table_rebuild_seconds),
        )?;
        one(
            e,
            "lb_announced_vips",
            "VIP addresses published for the routing daemon to announce.",
            gauge(stats.announced.len() as f64),
        )?;
        if let Some(sync) = &stats.sync {
            fleet::encode_sync(sync, e)?;
        }
        if let Some(store) = &stats.store {
            fleet::encode_store(store, e)?;
        }
        Ok(())
    }
}

impl Snapshot {
    fn encode_vips(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let vips = &self.0.vips;
        let per_vip = |value: fn(&crate::api::VipView) -> u64| {
            vips.iter().map(move |v| (vec![("vip", v.vip.clone())], counter(value(v))))
        };
        let per_vip_gauge = |value: fn(&crate::api::VipView) -> f64| {
            vips.iter().map(move |v| (vec![("vip", v.vip.clone())], gauge(value(v))))
        };
        family(e, "lb_vip_packets", "Packets forwarded for the VIP.", per_vip(|v| v.packets))?;
        family(
            e,
            "lb_vip_bytes",
            "Bytes (whole frames) forwarded for the VIP.",
            per_vip(|v| v.bytes),
        )?;
        family(
            e,
            "lb_vip_dropped_packets",
            "Packets of the VIP dropped after its lookup: no backend, backend MAC unresolved, internal.",
            per_vip(|v| v.dropped),
        )?;
        family(
            e,
            "lb_vip_scheduler",
            "1 for the scheduler that shares the VIP's new flows (maglev or least-connections).",
            vips.iter().map(|v| {
                (vec![("vip", v.vip.clone()), ("scheduler", v.scheduler.to_string())], flag(true))
            }),
        )?;
        family(
            e,
            "lb_vip_backends",
            "Backends configured for the VIP.",
            per_vip_gauge(|v| v.backends as f64),
        )?;
        family(
            e,
            "lb_vip_serving_backends",
            "Backends of the VIP receiving new flows.",
            per_vip_gauge(|v| v.serving_backends as f64),
        )?;
        family(
            e,
            "lb_vip_all_down",
            "1 when every backend fails its checks and the VIP fails open.",
            per_vip_gauge(|v| f64::from(u8::from(v.all_down))),
        )
    }

    fn encode_backends(&self, e: &mut DescriptorEncoder) -> std::fmt::Result {
        let backends = &self.0.backends;
        let labels =
            |b: &BackendView| vec![("vip", b.vip.clone()), ("backend", b.address.to_string())];
        let per_backend = |value: fn(&BackendView) -> u64| {
            backends.iter().map(move |b| (labels(b), counter(value(b))))
        };
        let per_backend_gauge = |value: fn(&BackendView) -> f64| {
            backends.iter().map(move |b| (labels(b), gauge(value(b))))
        };
        family(
            e,
            "lb_backend_packets",
            "Packets forwarded to the backend.",
            per_backend(|b| b.packets),
        )?;
        family(
            e,
            "lb_backend_bytes",
            "Bytes (whole frames) forwarded to the backend.",
            per_backend(|b| b.bytes),
        )?;
        family(
            e,
            "lb_backend_icmp_errors",
            "ICMP errors (path MTU, unreachable, time exceeded) about the backend's flows, forwarded to it.",
            per_backend(|b| b.icmp_errors),
        )?;
        family(
            e,
            "lb_backend_active_flows",
            "Flows in the flow table neither closing nor idle.",
            per_backend_gauge(|b| b.active_flows as f64),
        )?;
        family(
            e,
            "lb_backend_new_flow_share",
            "Part of the VIP's new flows the backend gets now (0 to 1): by weight under maglev, toward the least loaded under least-connections.",
            per_backend_gauge(|b| b.new_flow_share),
        )?;
        family(
            e,
            "lb_backend_up",
            "1 when the backend passes its health checks (up or draining).",
            per_backend_gauge(|b| {
                f64::from(u8::from(matches!(b.state.as_str(), "up" | "draining")))
            }),
        )?;
        family(
            e,
            "lb_backend_state",
            "1 for the backend's current state (up, draining, down, resolving).",
            backends.iter().map(|b| {
                let mut labels = labels(b);
                labels.push(("state", b.state.clone()));
                (labels, flag(true))
            }),
        )?;
        family(
            e,
            "lb_backend_health_check_duration_seconds",
            "How long the backend's last health check took.",
            backends.iter().filter_map(|b| Some((labels(b), gauge(b.last_check_seconds?)))),
        )?;
        family(
            e,
            "lb_backend_last_change_timestamp_seconds",
            "Unix time of the backend's last up/down transition.",
            per_backend_gauge(|b| b.since),
        )
    }
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
