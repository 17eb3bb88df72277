//! The control API between `lb` commands and `lb run`: one JSON object per
//! line over a Unix socket, a request then its reply. Both halves of the
//! protocol live here: the types, the framing and its size limit, the
//! client's call and the server's read. The reply bodies are also what
//! `--json` prints, so their field names are a stable interface.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _};
use tokio::sync::oneshot;

use crate::model::diff::Change;
use crate::model::{Affinity, CheckOptions, ForwardingOptions, RebalanceOptions, Scheduler, Vip};

mod views;

pub use views::{BackendView, FlowView, FlowsView, LookupView, StatsView, StoreView, VipView};

pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

/// The longest request line the daemon accepts: room for `lb config apply`
/// of a whole fleet (10,000 backends are about 0.5 MiB), while one client
/// cannot make the daemon hold much memory.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;

/// The words of every refusal of a removal that would break active flows,
/// which `lb backend remove --when-drained` waits through.
pub const BREAKS: &str = "which removing it would break";

/// A request on its way to the daemon's loop, with where its reply goes.
/// The control socket and the metrics endpoint both send these.
pub type Call = (Request, oneshot::Sender<Reply>);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    VipAdd {
        vip: Vip,
        check: CheckOptions,
        #[serde(default)]
        affinity: Affinity,
        #[serde(default)]
        scheduler: Scheduler,
        #[serde(default)]
        forwarding: ForwardingOptions,
    },
    /// Changes how a VIP picks backends for new flows and how it forwards
    /// (the fields given).
    VipSet {
        vip: Vip,
        affinity: Option<Affinity>,
        scheduler: Option<Scheduler>,
        #[serde(default)]
        rebalance: RebalanceOptions,
        #[serde(default)]
        forwarding: ForwardingOptions,
    },
    /// Changes the given fields of a VIP's check.
    CheckSet {
        vip: Vip,
        check: CheckOptions,
    },
    /// Refused while its backends carry flows, unless `force`.
    VipRemove {
        vip: Vip,
        #[serde(default)]
        force: bool,
    },
    VipList,
    BackendAdd {
        vip: Vip,
        address: IpAddr,
        weight: u32,
    },
    /// Stops (`draining: true`) or resumes new flows to a backend.
    BackendDrain {
        vip: Vip,
        address: IpAddr,
        draining: bool,
    },
    /// Changes a backend's weight.
    BackendSet {
        vip: Vip,
        address: IpAddr,
        weight: u32,
    },
    /// Refused while the backend carries flows, unless `force`.
    BackendRemove {
        vip: Vip,
        address: IpAddr,
        #[serde(default)]
        force: bool,
    },
    BackendList {
        vip: Option<Vip>,
    },
    Stats,
    Lookup {
        vip: Vip,
        client: SocketAddr,
    },
    /// Established flows of a VIP, at most `limit`.
    Flows {
        vip: Vip,
        limit: u32,
    },
    /// The running configuration as TOML.
    ConfigShow,
    /// What applying a configuration file's `text` would change; `file`
    /// names it in errors.
    ConfigDiff {
        file: PathBuf,
        text: String,
    },
    /// Applies a configuration file's `text`: only what differs changes.
    /// Refused while what it removes carries flows, unless `force`.
    ConfigApply {
        file: PathBuf,
        text: String,
        #[serde(default)]
        force: bool,
    },
    /// Re-reads `lb run --config` and applies it as `ConfigApply` does; a
    /// file unchanged since it was applied changes nothing (changes made
    /// with `lb` since stay, as at a restart). SIGHUP asks the same.
    ConfigReload {
        #[serde(default)]
        force: bool,
    },
    /// The fleet store, as this balancer follows it.
    StoreStatus,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Ok(Body),
    /// Refused or failed, and why.
    Error(String),
    /// The VIP or backend named does not exist.
    NotFound(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    /// A change: `changed` is false when it asked for what already was
    /// (adding what exists identically).
    Done {
        message: String,
        #[serde(default = "changed_by_default")]
        changed: bool,
    },
    Vips {
        vips: Vec<VipView>,
    },
    Backends {
        backends: Vec<BackendView>,
    },
    Stats(Box<StatsView>),
    Lookup(LookupView),
    Flows(FlowsView),
    /// `lb config show`: TOML that `lb config apply` and `lb run --config` read.
    Config {
        toml: String,
    },
    /// `lb config diff` (`applied: false`) and `lb config apply`.
    ConfigChanges {
        file: PathBuf,
        changes: Vec<Change>,
        applied: bool,
    },
    /// `lb store status`.
    Store(StoreView),
}

fn changed_by_default() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon at {path}: {error} (is `lb run` running? use --socket to point elsewhere)"
    )]
    Connect { path: String, error: std::io::Error },
    #[error("talking to the daemon at {path} failed: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "the daemon at {path} is not answering (no reply in {waited:?}): it may be stuck or overloaded; see its log"
    )]
    NoReply { path: String, waited: std::time::Duration },
    #[error(
        "the request is {bytes} bytes; the control socket takes at most {MAX_REQUEST_BYTES} (split the file, or apply it in parts)"
    )]
    TooLarge { bytes: usize },
    #[error("the daemon's reply was not understood")]
    Decode(#[from] serde_json::Error),
}

/// One message as it goes on the wire: JSON and a newline.
pub fn encode_line<T: Serialize>(message: &T) -> String {
    let mut line = serde_json::to_string(message).expect("API messages always serialize");
    line.push('\n');
    line
}

/// How long the CLI waits for the daemon's reply.
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends one request and waits for its reply (the client's half), at most
/// [`REPLY_TIMEOUT`].
pub fn call(socket: &Path, request: &Request) -> Result<Reply, ClientError> {
    call_within(socket, request, REPLY_TIMEOUT)
}

/// [`call`], waiting at most `timeout` for each read and write.
fn call_within(
    socket: &Path,
    request: &Request,
    timeout: std::time::Duration,
) -> Result<Reply, ClientError> {
    let path = socket.display().to_string();
    let io = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ClientError::NoReply { path: path.clone(), waited: timeout }
        }
        _ => ClientError::Io { path: path.clone(), error },
    };
    let line = encode_line(request);
    if line.len() > MAX_REQUEST_BYTES {
        return Err(ClientError::TooLarge { bytes: line.len() });
    }
    let mut stream = UnixStream::connect(socket)
        .map_err(|error| ClientError::Connect { path: path.clone(), error })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    Ok(serde_json::from_str(&reply)?)
}

/// One request line as the server read it.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Request(Request),
    /// Not a request (the parser's words): the reply says why, and the
    /// connection goes on.
    Malformed(String),
    /// Longer than [`MAX_REQUEST_BYTES`]: the reply says so and the
    /// connection ends, since the rest of the line cannot be trusted.
    TooLong,
}

/// Reads the next request line (the server's half); None when the client
/// has closed or the connection failed. Never reads more than the limit.
pub async fn read_request<R: AsyncBufRead + Unpin>(reader: &mut R) -> Option<Incoming> {
    let mut line = Vec::new();
    match (&mut *reader).take(MAX_REQUEST_BYTES as u64 + 1).read_until(b'\n', &mut line).await {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    if line.len() > MAX_REQUEST_BYTES {
        return Some(Incoming::TooLong);
    }
    Some(match serde_json::from_slice::<Request>(&line) {
        Ok(request) => Incoming::Request(request),
        Err(error) => Incoming::Malformed(error.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_server_reads_requests_refuses_garbage_and_stops_at_the_limit() {
        let good = encode_line(&Request::Stats);
        let long = format!("{}\n", "x".repeat(MAX_REQUEST_BYTES + 10));
        let input = format!("{good}not json\n{long}{good}");
        let mut reader = tokio::io::BufReader::new(input.as_bytes());
        assert_eq!(read_request(&mut reader).await, Some(Incoming::Request(Request::Stats)));
        let garbage = read_request(&mut reader).await.expect("a line");
        assert!(
            matches!(&garbage, Incoming::Malformed(error) if error.contains("expected ident")),
            "{garbage:?}"
        );
        assert_eq!(read_request(&mut reader).await, Some(Incoming::TooLong));
    }

    /// A daemon that accepts and never answers: a read without a timeout is
    /// still waiting long after the client's limit, and the client gives up
    /// at the limit saying so.
    #[test]
    fn the_client_gives_up_on_a_daemon_that_does_not_answer() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("stuck.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let accepted = std::thread::spawn(move || {
            (0..2).map(|_| listener.accept().unwrap().0).collect::<Vec<_>>()
        });

        let limit = Duration::from_millis(300);
        let mut unbounded = UnixStream::connect(&socket).unwrap();
        unbounded.write_all(encode_line(&Request::Stats).as_bytes()).unwrap();
        unbounded.set_nonblocking(true).unwrap();
        std::thread::sleep(3 * limit);
        let mut byte = [0u8; 1];
        let pending = std::io::Read::read(&mut unbounded, &mut byte).unwrap_err();
        assert_eq!(pending.kind(), std::io::ErrorKind::WouldBlock, "the stuck daemon answered");

        let started = Instant::now();
        let error = call_within(&socket, &Request::Stats, limit).unwrap_err();
        let waited = started.elapsed();
        assert!(matches!(error, ClientError::NoReply { .. }), "{error:?}");
        assert!(error.to_string().contains("is not answering"), "{error}");
        assert!(waited >= limit && waited < 10 * limit, "gave up after {waited:?}");
        drop(accepted.join().unwrap());
    }

    #[test]
    fn lines_are_one_json_object_and_a_newline() {
        let line = encode_line(&Request::BackendList { vip: None });
        assert_eq!(line, "{\"command\":\"backend_list\",\"vip\":null}\n");
        let back: Request = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(back, Request::BackendList { vip: None });
    }
}
