//! Packet and byte rates per VIP and backend over the last sampling interval,
//! from the datapath's cumulative counters, sampled once a second.

use std::collections::HashMap;
use std::time::Instant;

use lb_common::TrafficCounters;

/// What a rate is of: a VIP's index or a backend's slot in the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counted {
    Vip(u32),
    Backend(u32),
}

/// Packets, bytes and drops per second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rate {
    pub packets: f64,
    pub bytes: f64,
    pub dropped: f64,
}

#[derive(Default)]
pub struct Rates {
    last: HashMap<Counted, (Instant, TrafficCounters)>,
    current: HashMap<Counted, Rate>,
}

impl Rates {
    /// Records `counters` of `what` now; the rate is the change since the last sample.
    pub fn sample(&mut self, what: Counted, counters: TrafficCounters) {
        self.sample_at(what, counters, Instant::now());
    }

    fn sample_at(&mut self, what: Counted, counters: TrafficCounters, now: Instant) {
        if let Some((then, before)) = self.last.get(&what) {
            let seconds = now.duration_since(*then).as_secs_f64().max(1e-3);
            let rate = Rate {
                packets: counters.packets.saturating_sub(before.packets) as f64 / seconds,
                bytes: counters.bytes.saturating_sub(before.bytes) as f64 / seconds,
                dropped: counters.dropped.saturating_sub(before.dropped) as f64 / seconds,
            };
            self.current.insert(what, rate);
        }
        self.last.insert(what, (now, counters));
    }

    /// The last rate of `what` (zero until two samples were taken).
    pub fn get(&self, what: Counted) -> Rate {
        self.current.get(&what).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rates_are_per_second_and_kept_apart_for_vips_and_backends() {
        let mut rates = Rates::default();
        let start = Instant::now();
        let counters = |packets, bytes| TrafficCounters { packets, bytes, ..Default::default() };
        rates.sample_at(Counted::Vip(0), counters(100, 1000), start);
        rates.sample_at(Counted::Backend(0), counters(5, 50), start);
        assert_eq!(rates.get(Counted::Vip(0)), Rate::default(), "one sample is no rate");
        let later = start + Duration::from_millis(500);
        rates.sample_at(Counted::Vip(0), counters(150, 1600), later);
        rates.sample_at(Counted::Backend(0), counters(5, 50), later);
        assert_eq!(
            rates.get(Counted::Vip(0)),
            Rate { packets: 100.0, bytes: 1200.0, dropped: 0.0 }
        );
        assert_eq!(rates.get(Counted::Backend(0)), Rate::default());
        // Counters of a reused slot start again from zero: no negative rate.
        rates.sample_at(Counted::Vip(0), counters(0, 0), later + Duration::from_secs(1));
        assert_eq!(rates.get(Counted::Vip(0)), Rate::default());
    }
}
