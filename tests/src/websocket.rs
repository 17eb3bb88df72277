//! WebSocket servers and a many-connection client for the long-lived
//! connection tests. Servers answer every text message with `NAME:message`,
//! so each reply says which backend holds the connection.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _, stream};
use serde_json::json;
use tokio::io::AsyncBufReadExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Serves WebSocket connections on `port` for `lifetime`, then exits.
pub async fn serve(name: String, port: u16, lifetime: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0u8; 16], port))).await?;
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let name = name.clone();
            tokio::spawn(async move {
                // Health checks and port probes that are not WebSocket fail here; fine.
                let Ok(mut socket) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(config())).await
                else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    let reply = match message {
                        Message::Text(text) => Message::text(format!("{name}:{text}")),
                        Message::Close(_) => return,
                        _ => continue,
                    };
                    if socket.send(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    };
    let _ = tokio::time::timeout(lifetime, accept).await;
    Ok(())
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Small buffers: the test messages are a few bytes, and tungstenite's
/// default 128 KiB per direction per connection would take over a gigabyte
/// per process at the connection counts the tests and the bench hold.
fn config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

struct Connection {
    socket: Option<Socket>,
    /// The backend that answered this connection's first message.
    backend: String,
    broken: bool,
}

impl Connection {
    /// One that could not be opened: it counts as broken from the start.
    fn failed() -> Self {
        Self { socket: None, backend: String::new(), broken: true }
    }
}

/// How long one exchange may take before the connection counts as broken.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections opened or exercised at once.
const CONCURRENCY: usize = 256;

async fn open(url: &str) -> anyhow::Result<Connection> {
    let (mut socket, _) = tokio::time::timeout(
        EXCHANGE_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(url, Some(config()), true),
    )
    .await??;
    let backend = exchange(&mut socket, "hello").await?;
    Ok(Connection { socket: Some(socket), backend, broken: false })
}

/// Sends `text`, returns the name of the backend that echoed it.
async fn exchange(socket: &mut Socket, text: &str) -> anyhow::Result<String> {
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        socket.send(Message::text(text.to_owned())).await?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(reply))) => {
                    let (backend, echoed) = reply
                        .split_once(':')
                        .ok_or_else(|| anyhow::anyhow!("odd reply {reply}"))?;
                    anyhow::ensure!(echoed == text, "reply {reply} to {text}");
                    return Ok(backend.to_owned());
                }
                Some(Ok(Message::Close(_))) | None => anyhow::bail!("closed"),
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(error.into()),
            }
        }
    })
    .await?
}

fn tally<'a>(backends: impl Iterator<Item = &'a String>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for backend in backends {
        *counts.entry(backend.clone()).or_default() += 1;
    }
    counts
}

/// Opens `count` connections to `ws://vip/`, then obeys commands on stdin,
/// answering each with one JSON line on stdout:
/// - `round`: one message on every open connection; counts those that
///   broke now, those answered by another backend than at first, and the
///   open ones by backend.
/// - `open N`: N more connections; where they landed.
/// - `pace N RATE`: N more connections, RATE a second at a steady pace
///   (as clients arrive, rather than all at once); where they landed.
/// - `reconnect`: reopens every broken connection; where they landed.
/// - `stream MS SECONDS`: for SECONDS, every connection exchanges a message
///   every MS milliseconds, all at once; counts breaks and moves, and the
///   longest time any connection went without an answer.
/// - `live SECONDS MS`: for SECONDS, every connection sends a ping every MS
///   milliseconds (spread over the interval) and, when it breaks, reconnects
///   at once, as a WebSocket client that keeps its session does; counts the
///   breaks by the backend they were on, the reconnects, and the open ones
///   by backend at the end.
/// - `close BACKEND`: closes every open connection to BACKEND cleanly (as
///   clients leaving on their own) and stops counting them.
/// - `quit`.
pub async fn clients(vip: SocketAddr, count: usize) -> anyhow::Result<()> {
    let url = format!("ws://{vip}/");
    let mut connections = open_many(&url, count).await;
    let opened = connections.iter().filter(|c| !c.broken).count();
    println!(
        "{}",
        json!({ "command": "start", "opened": opened, "failed": count - opened,
                "backends": tally(connections.iter().filter(|c| !c.broken).map(|c| &c.backend)) })
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut round = 0u64;
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let report = match words.as_slice() {
            ["round"] => {
                round += 1;
                let text = format!("round-{round}");
                let results: Vec<(bool, bool)> = stream::iter(connections.iter_mut())
                    .map(|connection| {
                        let text = text.clone();
                        async move {
                            let Some(socket) = connection.socket.as_mut() else {
                                return (false, false);
                            };
                            match exchange(socket, &text).await {
                                Ok(backend) => (false, backend != connection.backend),
                                Err(_) => {
                                    connection.broken = true;
                                    connection.socket = None;
                                    (true, false)
                                }
                            }
                        }
                    })
                    .buffer_unordered(CONCURRENCY)
                    .collect()
                    .await;
                let newly_broken = results.iter().filter(|(broken, _)| *broken).count();
                let moved = results.iter().filter(|(_, moved)| *moved).count();
                let broken_by_backend =
                    tally(connections.iter().filter(|c| c.broken).map(|c| &c.backend));
                json!({ "command": "round", "round": round,
                        "ok": connections.iter().filter(|c| !c.broken).count(),
                        "newly_broken": newly_broken, "moved": moved,
                        "broken_by_backend": broken_by_backend,
                        "open_by_backend": tally(connections.iter().filter(|c| !c.broken).map(|c| &c.backend)) })
            }
            ["open", n] => {
                let fresh = open_many(&url, n.parse()?).await;
                let report = json!({ "command": "open",
                        "failed": fresh.iter().filter(|c| c.broken).count(),
                        "backends": tally(fresh.iter().filter(|c| !c.broken).map(|c| &c.backend)) });
                connections.extend(fresh);
                report
            }
            ["pace", n, per_second] => {
                let fresh = open_paced(&url, n.parse()?, per_second.parse()?).await;
                let report = json!({ "command": "pace",
                        "failed": fresh.iter().filter(|c| c.broken).count(),
                        "backends": tally(fresh.iter().filter(|c| !c.broken).map(|c| &c.backend)) });
                connections.extend(fresh);
                report
            }
            ["reconnect"] => {
                let broken = connections.iter().filter(|c| c.broken).count();
                connections.retain(|c| !c.broken);
                let fresh = open_many(&url, broken).await;
                let report = json!({ "command": "reconnect", "attempted": broken,
                        "failed": fresh.iter().filter(|c| c.broken).count(),
                        "backends": tally(fresh.iter().filter(|c| !c.broken).map(|c| &c.backend)) });
                connections.extend(fresh);
                report
            }
            ["stream", interval_ms, seconds] => {
                let interval = Duration::from_millis(interval_ms.parse()?);
                let until = tokio::time::Instant::now() + Duration::from_secs(seconds.parse()?);
                let results: Vec<(bool, bool, Duration)> = stream::iter(connections.iter_mut())
                    .map(|connection| stream_on(connection, interval, until))
                    .buffer_unordered(usize::MAX)
                    .collect()
                    .await;
                let longest_gap = results.iter().map(|(_, _, gap)| *gap).max().unwrap_or_default();
                let broken_by_backend =
                    tally(connections.iter().filter(|c| c.broken).map(|c| &c.backend));
                json!({ "command": "stream",
                        "ok": connections.iter().filter(|c| !c.broken).count(),
                        "newly_broken": results.iter().filter(|(broken, _, _)| *broken).count(),
                        "moved": results.iter().filter(|(_, moved, _)| *moved).count(),
                        "longest_gap_ms": longest_gap.as_millis() as u64,
                        "interval_ms": interval.as_millis() as u64,
                        "broken_by_backend": broken_by_backend })
            }
            ["live", seconds, interval_ms] => {
                let interval = Duration::from_millis(interval_ms.parse()?);
                let until = tokio::time::Instant::now() + Duration::from_secs(seconds.parse()?);
                let spread = connections.len().max(1) as u32;
                let results: Vec<Vec<(String, bool)>> =
                    stream::iter(connections.iter_mut().enumerate())
                        .map(|(index, connection)| {
                            let offset = interval * (index as u32 % spread) / spread;
                            live_on(connection, &url, interval, offset, until)
                        })
                        .buffer_unordered(usize::MAX)
                        .collect()
                        .await;
                let breaks: Vec<&(String, bool)> = results.iter().flatten().collect();
                json!({ "command": "live",
                        "closed": breaks.len(),
                        "closed_by_backend": tally(breaks.iter().map(|(backend, _)| backend)),
                        "reconnected": breaks.iter().filter(|(_, again)| *again).count(),
                        "reconnect_failed": breaks.iter().filter(|(_, again)| !*again).count(),
                        "ok": connections.iter().filter(|c| !c.broken).count(),
                        "open_by_backend": tally(connections.iter().filter(|c| !c.broken).map(|c| &c.backend)) })
            }
            ["close", backend] => {
                // As clients that leave on their own: a clean close, and
                // the connection is no longer counted.
                let mut closed = 0;
                for connection in connections.iter_mut().filter(|c| c.backend == *backend) {
                    if let Some(mut socket) = connection.socket.take() {
                        let _ = socket.close(None).await;
                        closed += 1;
                    }
                }
                connections.retain(|c| c.backend != *backend || c.broken);
                json!({ "command": "close", "backend": backend, "closed": closed })
            }
            ["quit"] => return Ok(()),
            _ => json!({ "command": line, "error": "unknown command" }),
        };
        println!("{report}");
    }
    Ok(())
}

/// Exchanges messages on one connection every `interval` until `until`:
/// (broke, answered by another backend, longest time between answers).
async fn stream_on(
    connection: &mut Connection,
    interval: Duration,
    until: tokio::time::Instant,
) -> (bool, bool, Duration) {
    let Some(socket) = connection.socket.as_mut() else { return (false, false, Duration::ZERO) };
    let (mut last_answer, mut longest, mut moved) =
        (tokio::time::Instant::now(), Duration::ZERO, false);
    while tokio::time::Instant::now() < until {
        match exchange(socket, "stream").await {
            Ok(backend) => {
                moved |= backend != connection.backend;
                let now = tokio::time::Instant::now();
                longest = longest.max(now - last_answer);
                last_answer = now;
            }
            Err(_) => {
                connection.broken = true;
                connection.socket = None;
                return (true, moved, longest);
            }
        }
        tokio::time::sleep(interval).await;
    }
    (false, moved, longest)
}

/// One connection of `live`: a ping every `interval` (the first after
/// `offset`) until `until`, reconnecting whenever it breaks. Returns each
/// break: the backend it was on, and whether the reconnect succeeded.
async fn live_on(
    connection: &mut Connection,
    url: &str,
    interval: Duration,
    offset: Duration,
    until: tokio::time::Instant,
) -> Vec<(String, bool)> {
    let mut breaks = Vec::new();
    tokio::time::sleep(offset).await;
    while tokio::time::Instant::now() < until {
        let alive = match connection.socket.as_mut() {
            Some(socket) => exchange(socket, "ping").await.is_ok(),
            None => false,
        };
        if !alive {
            let was = std::mem::take(&mut connection.backend);
            match open(url).await {
                Ok(fresh) => {
                    *connection = fresh;
                    breaks.push((was, true));
                }
                Err(_) => {
                    *connection = Connection::failed();
                    connection.backend = was.clone();
                    breaks.push((was, false));
                    return breaks;
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
    breaks
}

/// Opens `count` connections, the i-th at i / `per_second` seconds from now.
async fn open_paced(url: &str, count: usize, per_second: f64) -> Vec<Connection> {
    let start = tokio::time::Instant::now();
    stream::iter(0..count)
        .map(|index| async move {
            tokio::time::sleep_until(start + Duration::from_secs_f64(index as f64 / per_second))
                .await;
            open(url).await.unwrap_or_else(|_| Connection::failed())
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

async fn open_many(url: &str, count: usize) -> Vec<Connection> {
    stream::iter(0..count)
        .map(|_| async { open(url).await.unwrap_or_else(|_| Connection::failed()) })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}
