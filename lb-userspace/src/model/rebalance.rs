//! A VIP's rebalancer settings: whether the daemon closes a few connections
//! of a crowded backend so that long-lived connections even out (see
//! `daemon::rebalance`), how far a backend may be above its share, how fast
//! it closes, and how long it waits after the backends changed.

use serde::{Deserialize, Serialize};

use super::{ChangeError, Protocol, Scheduler, Vip};

/// Whether the rebalancer closes connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RebalanceMode {
    /// Never closes a connection.
    #[default]
    Off,
    /// When a backend is outside the band, closes connections of those
    /// above their share.
    On,
    /// Logs and counts what it would close, and closes nothing.
    DryRun,
}

impl std::fmt::Display for RebalanceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        super::desired::write_value_name(self, f)
    }
}

/// Band percentages accepted, inclusive.
pub const BAND_RANGE: std::ops::RangeInclusive<u32> = 1..=100;
/// Closes per second accepted, inclusive.
pub const RATE_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000;
/// Quiet seconds accepted, inclusive.
pub const QUIET_RANGE: std::ops::RangeInclusive<u32> = 0..=86_400;

/// A VIP's rebalancer, as configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rebalance {
    pub mode: RebalanceMode,
    /// How far above or below its weighted share of the VIP's open
    /// connections a backend may be, in percent, before the VIP is
    /// rebalanced (until every backend is within half of it).
    pub band_percent: u32,
    /// The most connections closed per second for the VIP, by this balancer.
    pub rate: u32,
    /// Seconds without closing anything after the VIP's backends changed
    /// (one joined, failed, recovered, drained or left) and after a start.
    pub quiet_s: u32,
}

impl Default for Rebalance {
    fn default() -> Self {
        Self { mode: RebalanceMode::Off, band_percent: 10, rate: 20, quiet_s: 10 }
    }
}

impl Rebalance {
    pub fn is_on(&self) -> bool {
        self.mode != RebalanceMode::Off
    }

    /// Why these settings cannot be a VIP's, under `scheduler`.
    pub fn check(&self, vip: &Vip, scheduler: Scheduler) -> Result<(), ChangeError> {
        let bad = |message: String| Err(ChangeError::BadRebalance(message));
        let out_of_range = |what: &str, value: u32, range: std::ops::RangeInclusive<u32>| {
            format!(
                "rebalance {what} {value} is out of range: expected {} to {}",
                range.start(),
                range.end()
            )
        };
        if !BAND_RANGE.contains(&self.band_percent) {
            return bad(out_of_range("band", self.band_percent, BAND_RANGE));
        }
        if !RATE_RANGE.contains(&self.rate) {
            return bad(out_of_range("rate", self.rate, RATE_RANGE));
        }
        if !QUIET_RANGE.contains(&self.quiet_s) {
            return bad(out_of_range("quiet", self.quiet_s, QUIET_RANGE));
        }
        if !self.is_on() {
            return Ok(());
        }
        if vip.protocol != Protocol::Tcp {
            return bad(format!(
                "VIP {vip} cannot rebalance: only TCP connections can be closed (by a RST); a UDP flow moves by itself once idle"
            ));
        }
        if scheduler != Scheduler::LeastConnections {
            return bad(format!(
                "VIP {vip} cannot rebalance under the {scheduler} scheduler: the closed clients must reconnect to the emptiest backends, which needs --scheduler least-connections"
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for Rebalance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.is_on() {
            return f.write_str("off");
        }
        write!(
            f,
            "{} (band {}%, at most {} closes/s, quiet {} s)",
            self.mode, self.band_percent, self.rate, self.quiet_s
        )
    }
}

/// Rebalancer settings to change; what is left out keeps its value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct RebalanceOptions {
    /// Close a few connections of a backend above its share, so long-lived
    /// connections even out (needs --scheduler least-connections; TCP only).
    #[arg(
        id = "rebalance",
        long = "rebalance",
        value_enum,
        value_name = "MODE",
        group = "setting"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<RebalanceMode>,
    /// How far above or below its weighted share a backend may be, in percent [default: 10].
    #[arg(long = "rebalance-band", value_name = "PERCENT", group = "setting")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub band_percent: Option<u32>,
    /// The most connections closed per second for the VIP [default: 20].
    #[arg(long = "rebalance-rate", value_name = "PER_SECOND", group = "setting")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
    /// Seconds to close nothing after the VIP's backends changed [default: 10].
    #[arg(long = "rebalance-quiet", value_name = "SECONDS", group = "setting")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_s: Option<u32>,
}

impl RebalanceOptions {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn applied_to(&self, current: &Rebalance) -> Rebalance {
        Rebalance {
            mode: self.mode.unwrap_or(current.mode),
            band_percent: self.band_percent.unwrap_or(current.band_percent),
            rate: self.rate.unwrap_or(current.rate),
            quiet_s: self.quiet_s.unwrap_or(current.quiet_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::parse_endpoint;

    #[test]
    fn rebalancing_needs_least_connections_and_tcp_and_says_so() {
        let tcp = Vip::new(parse_endpoint("198.18.0.10:80").unwrap(), Protocol::Tcp);
        let udp = Vip::new(parse_endpoint("198.18.0.10:53").unwrap(), Protocol::Udp);
        let on = Rebalance { mode: RebalanceMode::On, ..Rebalance::default() };
        assert_eq!(on.check(&tcp, Scheduler::LeastConnections), Ok(()));
        let maglev = on.check(&tcp, Scheduler::Maglev).unwrap_err().to_string();
        assert!(maglev.contains("needs --scheduler least-connections"), "{maglev}");
        let udp = on.check(&udp, Scheduler::LeastConnections).unwrap_err().to_string();
        assert!(udp.contains("only TCP"), "{udp}");
        assert_eq!(
            Rebalance::default().check(&tcp, Scheduler::Maglev),
            Ok(()),
            "off needs nothing"
        );
        let band = Rebalance { band_percent: 0, ..on }.check(&tcp, Scheduler::LeastConnections);
        assert!(
            band.unwrap_err().to_string().contains("band 0 is out of range: expected 1 to 100")
        );
        let rate = Rebalance { rate: 0, ..on }.check(&tcp, Scheduler::LeastConnections);
        assert!(rate.unwrap_err().to_string().contains("rate 0 is out of range"));
    }
}
