//! How a VIP's backends are checked: the check spec an operator writes (on
//! the command line, in the config file, in the saved state) and its
//! validation. Running checks is the health module's job.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

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

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Ws => "ws",
            CheckKind::None => "none",
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
