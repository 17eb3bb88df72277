//! Health checks. Each backend of each VIP has a task that runs its VIP's
//! check every interval and reports the outcome to the daemon; the daemon's
//! [`HealthState`] turns outcomes into up/down transitions (HAProxy's rise
//! and fall). Check tasks never touch BPF maps.
//!
//! With direct server return the backend holds the VIP on its loopback, so a
//! check sent to the VIP from the balancer would not reach any particular
//! backend: checks go to the backend's own address, at the VIP's port (or
//! the configured check port). The service must therefore listen on the
//! backend's address too (0.0.0.0 or ::), or expose a health port.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connect.
    Tcp,
    /// An HTTP GET of `path`; healthy on a status in `status`.
    Http,
    /// A WebSocket opening handshake on `path`; healthy on a valid 101.
    Ws,
    /// No checking: the backend is always up. Not the default.
    None,
}

/// An inclusive range of HTTP status codes, written `200-399` (or `204`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusRange(pub RangeInclusive<u16>);

impl FromStr for StatusRange {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || format!("'{text}' is not a status range like 200-399");
        let (low, high) = text.split_once('-').unwrap_or((text, text));
        let low: u16 = low.trim().parse().map_err(|_| bad())?;
        let high: u16 = high.trim().parse().map_err(|_| bad())?;
        if !(100..=599).contains(&low) || !(100..=599).contains(&high) || low > high {
            return Err(bad());
        }
        Ok(Self(low..=high))
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0.start(), self.0.end())
    }
}

impl Serialize for StatusRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How a VIP's backends are checked. The defaults detect a dead backend in
/// about a second: `fall` (3) consecutive failures, one every `interval`
/// (300 ms), each given `timeout` (250 ms).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    /// Port to check; None means the VIP's port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Request path for `http` and `ws`.
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successes that bring a backend up.
    pub rise: u32,
    /// Consecutive failures that take it down.
    pub fall: u32,
    /// Healthy HTTP statuses for `http`.
    pub status: StatusRange,
}

impl Default for CheckSpec {
    fn default() -> Self {
        Self {
            kind: CheckKind::Tcp,
            port: None,
            path: "/".to_owned(),
            interval_ms: 300,
            timeout_ms: 250,
            rise: 2,
            fall: 3,
            status: StatusRange(200..=399),
        }
    }
}

impl CheckSpec {
    /// Refuses values that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(10..=3_600_000).contains(&self.interval_ms) {
            return Err(format!(
                "check interval {} ms is out of range: expected 10 to 3600000",
                self.interval_ms
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms.max(1000) {
            return Err(format!(
                "check timeout {} ms is out of range: expected 1 to the interval (or 1000 ms when the interval is shorter)",
                self.timeout_ms
            ));
        }
        for (name, value) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&value) {
                return Err(format!("check {name} {value} is out of range: expected 1 to 100"));
            }
        }
        if self.port == Some(0) {
            return Err("check port 0 is not usable".to_owned());
        }
        if !self.path.starts_with('/')
            || self.path.bytes().any(|b| b.is_ascii_control() || b == b' ')
        {
            return Err(format!(
                "check path '{}' must start with / and hold no spaces or control characters",
                self.path
            ));
        }
        Ok(())
    }

    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// A partial check spec: what `lb vip add`, `lb check set` and a config
/// file's `[vip.check]` say; every field left out keeps its current (or
/// default) value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct CheckOptions {
    /// Check type: tcp (connect), http (GET), ws (WebSocket handshake), none.
    #[arg(long = "check", value_enum)]
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<CheckKind>,
    /// Port to check instead of the VIP's port.
    #[arg(long = "check-port")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Path for http and ws checks (default /).
    #[arg(long = "check-path")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Milliseconds between checks (default 300).
    #[arg(long = "check-interval")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Milliseconds a check may take (default 250).
    #[arg(long = "check-timeout")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Consecutive passes that bring a backend up (default 2).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    /// Consecutive failures that take a backend down (default 3).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
    /// Healthy HTTP statuses for http checks, like 200-399 (the default).
    #[arg(long = "check-status")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusRange>,
}

impl CheckOptions {
    /// `base` with every field given here replaced.
    pub fn applied_to(&self, base: &CheckSpec) -> CheckSpec {
        CheckSpec {
            kind: self.kind.unwrap_or(base.kind),
            port: self.port.or(base.port),
            path: self.path.clone().unwrap_or_else(|| base.path.clone()),
            interval_ms: self.interval_ms.unwrap_or(base.interval_ms),
            timeout_ms: self.timeout_ms.unwrap_or(base.timeout_ms),
            rise: self.rise.unwrap_or(base.rise),
            fall: self.fall.unwrap_or(base.fall),
            status: self.status.clone().unwrap_or_else(|| base.status.clone()),
        }
    }
}

/// A backend's health as the daemon tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

/// The rise/fall state machine of one backend. Pure: the caller supplies
/// outcomes and the time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    pub health: Health,
    /// Until the first outcome: that outcome decides at once (see `new_at_start`).
    pub decided: bool,
    pub successes: u32,
    pub failures: u32,
    pub since: SystemTime,
    pub last_error: Option<String>,
    /// Whether it was up at any time since the daemon started (for fail-open).
    pub ever_up: bool,
}

/// A change of health, with the reason for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub to: Health,
    pub reason: String,
}

impl HealthState {
    /// A backend added while running: down until it passes `rise` checks.
    pub fn new_added(now: SystemTime) -> Self {
        Self {
            health: Health::Down,
            decided: true,
            successes: 0,
            failures: 0,
            since: now,
            last_error: Some("not checked yet".to_owned()),
            ever_up: false,
        }
    }

    /// A backend present when the daemon starts: its first check decides, so
    /// a restart does not take healthy backends out for `rise` intervals.
    pub fn new_at_start(now: SystemTime) -> Self {
        Self { decided: false, ..Self::new_added(now) }
    }

    /// A backend of a datapath adopted from an earlier `lb run`: it was
    /// serving, so it keeps serving until its first check says otherwise.
    pub fn new_adopted(now: SystemTime) -> Self {
        Self {
            health: Health::Up,
            decided: false,
            ever_up: true,
            last_error: None,
            ..Self::new_added(now)
        }
    }

    /// An always-up backend (check kind `none`).
    pub fn new_unchecked(now: SystemTime) -> Self {
        Self { health: Health::Up, ever_up: true, last_error: None, ..Self::new_added(now) }
    }

    pub fn observe(
        &mut self,
        outcome: Result<(), String>,
        rise: u32,
        fall: u32,
        now: SystemTime,
    ) -> Option<Transition> {
        let first = !self.decided;
        self.decided = true;
        match outcome {
            Ok(()) => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                self.last_error = None;
                if self.health == Health::Down && (first || self.successes >= rise) {
                    let reason = if first {
                        "first check at start passed".to_owned()
                    } else {
                        format!("{} consecutive checks passed", self.successes)
                    };
                    return Some(self.go(Health::Up, reason, now));
                }
            }
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                self.last_error = Some(error.clone());
                if self.health == Health::Up && (first || self.failures >= fall) {
                    let reason =
                        format!("{} consecutive checks failed, last: {error}", self.failures);
                    return Some(self.go(Health::Down, reason, now));
                }
            }
        }
        None
    }

    fn go(&mut self, to: Health, reason: String, now: SystemTime) -> Transition {
        self.health = to;
        self.since = now;
        if to == Health::Up {
            self.ever_up = true;
        }
        Transition { to, reason }
    }
}

/// Runs one check of `spec` against `backend`; Err says what was wrong.
pub async fn check_once(spec: &CheckSpec, backend: IpAddr, vip_port: u16) -> Result<(), String> {
    let target = SocketAddr::new(backend, spec.port.unwrap_or(vip_port));
    match tokio::time::timeout(spec.timeout(), run_check(spec, target)).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "{} check of {target} timed out after {} ms",
            kind_name(spec.kind),
            spec.timeout_ms
        )),
    }
}

fn kind_name(kind: CheckKind) -> &'static str {
    match kind {
        CheckKind::Tcp => "tcp",
        CheckKind::Http => "http",
        CheckKind::Ws => "ws",
        CheckKind::None => "none",
    }
}

async fn run_check(spec: &CheckSpec, target: SocketAddr) -> Result<(), String> {
    if spec.kind == CheckKind::None {
        return Ok(());
    }
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|error| format!("connect to {target}: {error}"))?;
    match spec.kind {
        CheckKind::None | CheckKind::Tcp => Ok(()),
        CheckKind::Http => {
            let request = format!(
                "GET {} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: lb-health-check\r\nConnection: close\r\n\r\n",
                spec.path
            );
            let head = exchange(&mut stream, &request, target).await?;
            let status =
                status_code(&head).ok_or_else(|| format!("{target}: not an HTTP response"))?;
            if spec.status.0.contains(&status) {
                Ok(())
            } else {
                Err(format!(
                    "{target}{}: HTTP status {status}, expected {}",
                    spec.path, spec.status
                ))
            }
        }
        CheckKind::Ws => {
            let key = websocket_key(target);
            let request = format!(
                "GET {} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: lb-health-check\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
                spec.path
            );
            let head = exchange(&mut stream, &request, target).await?;
            let status =
                status_code(&head).ok_or_else(|| format!("{target}: not an HTTP response"))?;
            if status != 101 {
                return Err(format!(
                    "{target}{}: WebSocket upgrade answered {status}, expected 101",
                    spec.path
                ));
            }
            if !header(&head, "upgrade")
                .is_some_and(|value| value.eq_ignore_ascii_case("websocket"))
            {
                return Err(format!("{target}{}: 101 without 'Upgrade: websocket'", spec.path));
            }
            if header(&head, "sec-websocket-accept") != Some(websocket_accept(&key).as_str()) {
                return Err(format!("{target}{}: wrong Sec-WebSocket-Accept", spec.path));
            }
            // Close politely: a close frame (masked, as clients must), then hang up.
            let _ = stream.write_all(&[0x88, 0x80, 0, 0, 0, 0]).await;
            Ok(())
        }
    }
}

/// Sends `request` and reads the response head (up to the blank line).
async fn exchange(
    stream: &mut TcpStream,
    request: &str,
    target: SocketAddr,
) -> Result<String, String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("{target}: send: {error}"))?;
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = stream
            .read(&mut buffer)
            .await
            .map_err(|error| format!("{target}: receive: {error}"))?;
        if read == 0 {
            if head.is_empty() {
                return Err(format!("{target}: closed without answering"));
            }
            break;
        }
        head.extend_from_slice(&buffer[..read]);
        if head.len() > 16 * 1024 {
            return Err(format!("{target}: response head larger than 16 KiB"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn status_code(head: &str) -> Option<u16> {
    let line = head.lines().next()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// A per-check nonce; it need not be secret, only vary.
fn websocket_key(target: SocketAddr) -> String {
    use base64::Engine as _;
    let nanos =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let seed = xxhash_rust::xxh3::xxh3_128(format!("{target}{nanos}").as_bytes());
    base64::engine::general_purpose::STANDARD.encode(seed.to_le_bytes())
}

/// RFC 6455: base64(SHA-1(key + GUID)).
pub fn websocket_accept(key: &str) -> String {
    use base64::Engine as _;
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const T0: SystemTime = SystemTime::UNIX_EPOCH;

    fn ok() -> Result<(), String> {
        Ok(())
    }
    fn failed() -> Result<(), String> {
        Err("refused".to_owned())
    }

    #[test]
    fn rise_and_fall_count_consecutive_outcomes() {
        let mut state = HealthState::new_added(T0);
        assert_eq!(state.observe(ok(), 2, 3, T0), None);
        assert_eq!(state.observe(failed(), 2, 3, T0), None, "a failure resets the rise count");
        assert_eq!(state.observe(ok(), 2, 3, T0), None);
        let up = state.observe(ok(), 2, 3, T0).expect("second consecutive success");
        assert_eq!(up.to, Health::Up);
        assert!(state.ever_up);
        assert_eq!(state.observe(failed(), 2, 3, T0), None);
        assert_eq!(state.observe(failed(), 2, 3, T0), None);
        assert_eq!(state.observe(ok(), 2, 3, T0), None, "a success resets the fall count");
        assert_eq!(state.observe(failed(), 2, 3, T0), None);
        assert_eq!(state.observe(failed(), 2, 3, T0), None);
        let down = state.observe(failed(), 2, 3, T0).expect("third consecutive failure");
        assert_eq!(down.to, Health::Down);
        assert!(
            down.reason.contains("3 consecutive checks failed, last: refused"),
            "{}",
            down.reason
        );
        assert_eq!(state.last_error.as_deref(), Some("refused"));
    }

    #[test]
    fn at_start_the_first_outcome_decides() {
        let mut up = HealthState::new_at_start(T0);
        assert_eq!(up.observe(ok(), 5, 5, T0).map(|t| t.to), Some(Health::Up));
        let mut down = HealthState::new_at_start(T0);
        assert_eq!(down.observe(failed(), 5, 5, T0), None, "already down");
        assert_eq!(down.observe(ok(), 2, 5, T0), None, "later successes need rise");
        assert_eq!(down.observe(ok(), 2, 5, T0).map(|t| t.to), Some(Health::Up));
    }

    #[test]
    fn specs_are_validated_by_field() {
        assert!(CheckSpec::default().validate().is_ok());
        let bad = |edit: fn(&mut CheckSpec)| {
            let mut spec = CheckSpec::default();
            edit(&mut spec);
            spec.validate().unwrap_err()
        };
        assert!(bad(|s| s.rise = 0).contains("rise 0"));
        assert!(bad(|s| s.fall = 101).contains("fall 101"));
        assert!(bad(|s| s.interval_ms = 1).contains("interval 1 ms"));
        assert!(bad(|s| s.timeout_ms = 0).contains("timeout 0 ms"));
        assert!(bad(|s| s.path = "health".into()).contains("must start with /"));
        assert_eq!("200-299".parse::<StatusRange>().unwrap(), StatusRange(200..=299));
        assert_eq!("204".parse::<StatusRange>().unwrap(), StatusRange(204..=204));
        assert!("299-200".parse::<StatusRange>().is_err());
        assert!("abc".parse::<StatusRange>().is_err());
    }

    #[test]
    fn websocket_accept_matches_rfc_6455_example() {
        assert_eq!(websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    /// A one-connection-at-a-time server on loopback answering with `respond`.
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

    fn spec(kind: CheckKind, port: u16) -> CheckSpec {
        CheckSpec { kind, port: Some(port), path: "/health".into(), ..CheckSpec::default() }
    }

    async fn check(spec: &CheckSpec) -> Result<(), String> {
        check_once(spec, IpAddr::from([127, 0, 0, 1]), 1).await
    }

    fn accept_upgrade(request: &str) -> Option<String> {
        let key = header(request, "sec-websocket-key")?;
        Some(format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
            websocket_accept(key)
        ))
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
        let ws_ok = server(accept_upgrade).await;
        let ws_refused = server(|_| Some("HTTP/1.1 200 OK\r\n\r\n".into())).await;
        let ws_bad_accept = server(|_| {
            Some("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: bogus\r\n\r\n".into())
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
    }
}
