//! The rebalancer's arithmetic: when a VIP's open connections are out of
//! balance for their weights, which backends give up connections, how many,
//! and at what rate. Pure: no I/O, no clocks but the ones passed in.
//!
//! A backend's share is its weighted part of the VIP's open connections.
//! The band is two-sided: a VIP is out of balance when any backend is more
//! than the band above *or below* its share (a new backend after a
//! scale-up is far below it while the old ones may each be only a little
//! above). Once out of balance, the VIP is rebalanced until every backend
//! is within half the band ([`Balancing`]: without that margin it would
//! stop at the band's edge, where the next reconnect tips it out again).
//! While it is, every backend above its share gives up its excess, and no
//! more: a backend at or below its share is never touched, a VIP within its
//! band is never touched at all, and connections already marked and not
//! closed yet count as closed, so that a second round does not close them
//! twice.

use std::time::{Duration, Instant};

/// One serving backend of a VIP, as the rebalancer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub weight: u32,
    /// Open connections (marked ones included).
    pub active: u64,
    /// Connections marked to close and not closed yet.
    pub pending: u64,
}

/// Each member's share of the VIP's open connections.
pub fn shares(members: &[Member]) -> Vec<f64> {
    let total_weight: f64 = members.iter().map(|m| f64::from(m.weight)).sum();
    let open: f64 = members.iter().map(|m| m.active as f64).sum();
    members
        .iter()
        .map(|m| if total_weight == 0.0 { 0.0 } else { open * f64::from(m.weight) / total_weight })
        .collect()
}

/// Whether every member is within `band` (0.1: 10%) of its share, above
/// and below.
pub fn within(members: &[Member], band: f64) -> bool {
    members
        .iter()
        .zip(shares(members))
        .all(|(member, share)| (member.active as f64 - share).abs() <= share * band)
}

/// Whether a VIP is being rebalanced, from one round to the next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Balancing(bool);

impl Balancing {
    /// Starts when a member leaves the band, stops when every member is
    /// within half of it; returns whether to close anything this round.
    pub fn update(&mut self, members: &[Member], band_percent: u32) -> bool {
        let band = f64::from(band_percent) / 100.0;
        self.0 = if self.0 { !within(members, band / 2.0) } else { !within(members, band) };
        self.0
    }
}

/// How many connections to close on each member of a VIP being
/// rebalanced: for one above its share, the excess, less those already
/// pending; for any other, none.
pub fn closes(members: &[Member]) -> Vec<u64> {
    members
        .iter()
        .zip(shares(members))
        .map(|(member, share)| {
            let excess = member.active.saturating_sub(share.ceil() as u64);
            excess.saturating_sub(member.pending)
        })
        .collect()
}

/// How far the member furthest from its share is from it, above or below,
/// as a fraction (0.25: 25% off); 0 for a VIP without connections.
pub fn skew(members: &[Member]) -> f64 {
    members
        .iter()
        .zip(shares(members))
        .filter(|(_, share)| *share > 0.0)
        .map(|(member, share)| (member.active as f64 / share - 1.0).abs())
        .fold(0.0, f64::max)
}

/// Splits `budget` closes over the members' `wanted` closes, in proportion
/// to what each wants, never more than it wants.
pub fn within_budget(wanted: &[u64], budget: u64) -> Vec<u64> {
    let total: u64 = wanted.iter().sum();
    if total <= budget {
        return wanted.to_vec();
    }
    let mut given: Vec<u64> = wanted
        .iter()
        .map(|&want| (u128::from(want) * u128::from(budget) / u128::from(total)) as u64)
        .collect();
    // What rounding left over goes to those that want the most.
    let mut left = budget - given.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..wanted.len()).collect();
    order.sort_by_key(|&index| std::cmp::Reverse(wanted[index] - given[index]));
    for index in order {
        if left == 0 {
            break;
        }
        if given[index] < wanted[index] {
            given[index] += 1;
            left -= 1;
        }
    }
    given
}

/// A token bucket of closes: `rate` a second, at most one second's worth
/// saved, empty when made (a daemon that starts closes nothing at once, so
/// the rate holds across a restart).
#[derive(Clone, Debug)]
pub struct Budget {
    tokens: f64,
    refilled: Instant,
}

impl Budget {
    pub fn new(now: Instant) -> Self {
        Self { tokens: 0.0, refilled: now }
    }

    /// Closes allowed now at `rate` a second.
    pub fn available(&mut self, rate: u32, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(rate));
        self.refilled = now;
        self.tokens.floor() as u64
    }

    /// Spends `used` closes.
    pub fn spend(&mut self, used: u64) {
        self.tokens = (self.tokens - used as f64).max(0.0);
    }

    /// Empties the bucket (a pause).
    pub fn empty(&mut self, now: Instant) {
        self.tokens = 0.0;
        self.refilled = now;
    }
}

/// How recently a flow must have sent a packet to be closed: the datapath
/// refreshes an entry at most once a second, so a client that sends every
/// second shows a packet at most two seconds old. A flow quieter than this
/// is never chosen: its close would wait for its next packet.
pub const RECENT: Duration = Duration::from_secs(3);

#[cfg(test)]
mod tests {
    use super::*;

    fn members(active: &[u64]) -> Vec<Member> {
        active.iter().map(|&active| Member { weight: 1, active, pending: 0 }).collect()
    }

    #[test]
    fn after_a_scale_up_the_old_backends_come_down_to_their_share() {
        let wanted = closes(&members(&[1_000, 1_000, 1_000, 0]));
        assert_eq!(wanted, [250, 250, 250, 0]);
        // 750 closed against the 675 that would put the new one at the
        // band's lower edge: within 1.2x of the least that evens them out.
        assert!(wanted.iter().sum::<u64>() as f64 <= 1.2 * 675.0);
    }

    #[test]
    fn a_vip_inside_its_band_is_never_touched() {
        let mut balancing = Balancing::default();
        assert!(!balancing.update(&members(&[1_100, 1_000, 900]), 10));
        let weighted = [
            Member { weight: 2, active: 2_000, pending: 0 },
            Member { weight: 1, active: 1_000, pending: 0 },
        ];
        assert!(!balancing.update(&weighted, 10), "shares follow the weights");
        assert!(balancing.update(&members(&[1_101, 1_000, 899]), 10));
    }

    #[test]
    fn a_backend_below_the_band_starts_a_rebalance_that_runs_to_half_the_band() {
        // The stall this prevents: the old backends 6% above their share,
        // each inside the band, the new one 19% below it.
        let stalled = members(&[837, 844, 835, 634]);
        let mut balancing = Balancing::default();
        assert!(balancing.update(&stalled, 10));
        assert_eq!(closes(&stalled), [49, 56, 47, 0], "only those above their share give");
        // Inside the band but not within half of it: still going.
        assert!(balancing.update(&members(&[820, 820, 820, 700]), 10));
        assert!(!balancing.update(&members(&[800, 800, 800, 760]), 10));
        // Stopped, it starts again only outside the whole band.
        assert!(!balancing.update(&members(&[820, 820, 820, 720]), 10));
    }

    #[test]
    fn backends_at_or_below_their_share_never_give() {
        assert_eq!(closes(&members(&[1_000, 1_000, 400])), [200, 200, 0]);
        assert_eq!(closes(&members(&[900, 900, 900])), [0, 0, 0]);
    }

    #[test]
    fn pending_closes_are_not_asked_for_twice() {
        let mut crowded = members(&[1_000, 1_000, 1_000, 0]);
        crowded[0].pending = 200;
        assert_eq!(closes(&crowded), [50, 250, 250, 0]);
        crowded[0].pending = 400;
        assert_eq!(closes(&crowded)[0], 0);
    }

    #[test]
    fn skew_is_the_furthest_backend_from_its_share() {
        assert_eq!(skew(&members(&[1_000, 1_000, 1_000, 0])), 1.0, "the empty one, 100% below");
        assert!((skew(&members(&[1_200, 800])) - 0.2).abs() < 1e-9);
        assert_eq!(skew(&members(&[0, 0])), 0.0);
    }

    #[test]
    fn the_budget_is_shared_by_what_each_wants_and_never_exceeded() {
        assert_eq!(within_budget(&[250, 250, 250, 0], 50), [17, 17, 16, 0]);
        assert_eq!(within_budget(&[10, 0], 50), [10, 0]);
        assert_eq!(within_budget(&[3, 1], 2), [2, 0]);
    }

    #[test]
    fn the_budget_starts_empty_and_saves_at_most_one_second() {
        let start = Instant::now();
        let mut budget = Budget::new(start);
        assert_eq!(budget.available(50, start), 0, "nothing at once after a start");
        assert_eq!(budget.available(50, start + Duration::from_millis(500)), 25);
        budget.spend(25);
        assert_eq!(budget.available(50, start + Duration::from_secs(60)), 50, "one second saved");
        budget.empty(start + Duration::from_secs(60));
        assert_eq!(budget.available(50, start + Duration::from_secs(60)), 0);
    }
}
