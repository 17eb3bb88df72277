//! The probes: one check of one backend (a TCP connect, an HTTP GET, a
//! WebSocket opening handshake), and the loop that repeats it and reports
//! each outcome. Probes never touch BPF maps.
//!
//! With direct server return the backend holds the VIP on its loopback, so a
//! check sent to the VIP from the balancer would not reach any particular
//! backend: checks go to the backend's own address, at the VIP's port (or
//! the configured check port). The service must therefore listen on the
//! backend's address too (0.0.0.0 or ::), or expose a health port.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::HealthReport;
use crate::model::{CheckKind, CheckSpec, Vip};

/// The largest response head an HTTP check reads.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Response headers an HTTP check parses; more is not a health endpoint.
const MAX_HEADERS: usize = 64;
const USER_AGENT: &str = "lb-health-check";

/// Checks `backend` every interval until aborted, reporting each outcome.
pub async fn check_loop(
    vip: Vip,
    backend: IpAddr,
    spec: CheckSpec,
    generation: u64,
    reports: mpsc::Sender<HealthReport>,
) {
    let mut interval = tokio::time::interval(spec.interval());
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let started = tokio::time::Instant::now();
        let outcome = check_once(&spec, backend, vip.port).await;
        let duration = started.elapsed();
        let report = HealthReport { vip, backend, generation, outcome, duration };
        if reports.send(report).await.is_err() {
            return;
        }
    }
}

/// Runs one check of `spec` against `backend`; Err says what was wrong.
pub async fn check_once(spec: &CheckSpec, backend: IpAddr, vip_port: u16) -> Result<(), String> {
    let target = SocketAddr::new(backend, spec.port.unwrap_or(vip_port));
    match tokio::time::timeout(spec.timeout(), run_check(spec, target)).await {
        Ok(result) => result,
        Err(_) => {
            Err(format!("{} check of {target} timed out after {} ms", spec.kind, spec.timeout_ms))
        }
    }
}

async fn run_check(spec: &CheckSpec, target: SocketAddr) -> Result<(), String> {
    if spec.kind == CheckKind::None {
        return Ok(());
    }
    let stream = TcpStream::connect(target)
        .await
        .map_err(|error| format!("connect to {target}: {error}"))?;
    match spec.kind {
        CheckKind::None | CheckKind::Tcp => Ok(()),
        CheckKind::Http => http_check(stream, spec, target).await,
        CheckKind::Ws => websocket_check(stream, spec, target).await,
    }
}

async fn http_check(
    mut stream: TcpStream,
    spec: &CheckSpec,
    target: SocketAddr,
) -> Result<(), String> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: {USER_AGENT}\r\nConnection: close\r\n\r\n",
        spec.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("{target}: send: {error}"))?;
    let status = read_status(&mut stream, target).await?;
    if spec.status.0.contains(&status) {
        Ok(())
    } else {
        Err(format!("{target}{}: HTTP status {status}, expected {}", spec.path, spec.status))
    }
}

/// Reads until httparse has a whole response head, and returns its status.
async fn read_status(stream: &mut TcpStream, target: SocketAddr) -> Result<u16, String> {
    let not_http = || format!("{target}: not an HTTP response");
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let read = stream
            .read(&mut buffer)
            .await
            .map_err(|error| format!("{target}: receive: {error}"))?;
        if read == 0 {
            return Err(if head.is_empty() {
                format!("{target}: closed without answering")
            } else {
                format!("{target}: closed in the middle of the response head")
            });
        }
        head.extend_from_slice(&buffer[..read]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&head) {
            Ok(httparse::Status::Complete(_)) => return response.code.ok_or_else(not_http),
            Ok(httparse::Status::Partial) if head.len() <= MAX_HEAD_BYTES => {}
            Ok(httparse::Status::Partial) => {
                return Err(format!("{target}: response head larger than 16 KiB"));
            }
            Err(_) => return Err(not_http()),
        }
    }
}

/// A WebSocket opening handshake through tokio-tungstenite, which checks the
/// 101, the `Upgrade` header and `Sec-WebSocket-Accept`; then a polite close.
async fn websocket_check(
    stream: TcpStream,
    spec: &CheckSpec,
    target: SocketAddr,
) -> Result<(), String> {
    let url = format!("ws://{target}{}", spec.path);
    let mut request =
        url.as_str().into_client_request().map_err(|error| format!("{url}: {error}"))?;
    request.headers_mut().insert("User-Agent", HeaderValue::from_static(USER_AGENT));
    let (mut socket, _) =
        tokio_tungstenite::client_async(request, stream).await.map_err(|error| match error {
            WsError::Http(response) => format!(
                "{target}{}: WebSocket upgrade answered {}, expected 101",
                spec.path,
                response.status().as_u16()
            ),
            WsError::Protocol(ProtocolError::SecWebSocketAcceptKeyMismatch) => {
                format!("{target}{}: wrong Sec-WebSocket-Accept", spec.path)
            }
            WsError::Protocol(ProtocolError::MissingUpgradeWebSocketHeader) => {
                format!("{target}{}: 101 without 'Upgrade: websocket'", spec.path)
            }
            other => format!("{target}{}: WebSocket handshake: {other}", spec.path),
        })?;
    let _ = socket.close(None).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    /// A server on loopback answering every connection with `respond`.
    async fn server(respond: fn(&str) -> Option<String>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    let mut request = vec![0u8; 4096];
                    let read = stream.read(&mut request).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&request[..read]).into_owned();
                    match respond(&request) {
                        Some(answer) => {
                            let _ = stream.write_all(answer.as_bytes()).await;
                        }
                        // Hang: hold the connection without answering.
                        None => tokio::time::sleep(Duration::from_secs(10)).await,
                    }
                });
            }
        });
        address
    }

    /// A real WebSocket server (tokio-tungstenite's accept) on loopback.
    async fn websocket_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                tokio::spawn(async move {
                    if let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await {
                        use futures::StreamExt as _;
                        while let Some(Ok(_)) = socket.next().await {}
                    }
                });
            }
        });
        address
    }

    fn spec(kind: CheckKind, port: u16) -> CheckSpec {
        CheckSpec { kind, port: Some(port), path: "/health".into(), ..CheckSpec::default() }
    }

    async fn check(spec: &CheckSpec) -> Result<(), String> {
        check_once(spec, IpAddr::from([127, 0, 0, 1]), 1).await
    }

    #[tokio::test]
    async fn checks_pass_on_good_answers_and_fail_on_bad_ones_naming_why() {
        let http_ok = server(|request| {
            // Anything but the configured request (the tcp check sends nothing) gets a 400.
            Some(if request.starts_with("GET /health HTTP/1.1\r\n") {
                "HTTP/1.1 204 No Content\r\n\r\n".into()
            } else {
                "HTTP/1.1 400 Bad Request\r\n\r\n".into()
            })
        })
        .await;
        let http_500 = server(|_| Some("HTTP/1.1 500 Internal Server Error\r\n\r\n".into())).await;
        let garbage = server(|_| Some("SSH-2.0-OpenSSH\r\n\r\n".into())).await;
        let hang = server(|_| None).await;
        let ws_ok = websocket_server().await;
        let ws_refused = server(|_| Some("HTTP/1.1 200 OK\r\n\r\n".into())).await;
        let ws_bad_accept = server(|_| {
            Some("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bogus\r\n\r\n".into())
        })
        .await;
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap() // dropped: nothing listens there now
        };

        assert_eq!(check(&spec(CheckKind::Tcp, http_ok.port())).await, Ok(()));
        assert_eq!(check(&spec(CheckKind::Http, http_ok.port())).await, Ok(()));
        assert_eq!(check(&spec(CheckKind::Ws, ws_ok.port())).await, Ok(()));

        let error = check(&spec(CheckKind::Http, http_500.port())).await.unwrap_err();
        assert!(error.contains("HTTP status 500, expected 200-399"), "{error}");
        let error = check(&spec(CheckKind::Http, garbage.port())).await.unwrap_err();
        assert!(error.contains("not an HTTP response"), "{error}");
        let error = check(&spec(CheckKind::Http, hang.port())).await.unwrap_err();
        assert!(error.contains("timed out after 250 ms"), "{error}");
        let error = check(&spec(CheckKind::Tcp, closed.port())).await.unwrap_err();
        assert!(error.contains("connect to") && error.contains("refused"), "{error}");
        let error = check(&spec(CheckKind::Ws, ws_refused.port())).await.unwrap_err();
        assert!(error.contains("answered 200, expected 101"), "{error}");
        let error = check(&spec(CheckKind::Ws, ws_bad_accept.port())).await.unwrap_err();
        assert!(error.contains("wrong Sec-WebSocket-Accept"), "{error}");
        let error = check(&spec(CheckKind::Ws, hang.port())).await.unwrap_err();
        assert!(error.contains("timed out"), "{error}");
        // The WebSocket server hangs up on a plain GET: a ws endpoint passes no http check.
        let error = check(&spec(CheckKind::Http, ws_ok.port())).await.unwrap_err();
        assert!(error.contains("closed without answering"), "{error}");
    }
}
