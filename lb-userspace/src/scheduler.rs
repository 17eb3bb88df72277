//! Least-connections as Maglev weights: the share of *new* flows each
//! backend should get so that *open* flows converge to the operator's
//! weights. Pure: no I/O, no clocks. Established flows never move (the flow
//! table pins them); only where new ones land changes.
//!
//! Each backend's target after the next `horizon` new flows is its weighted
//! part of all the flows then open; a backend below its target is owed the
//! difference, and new flows are shared in proportion to what each is owed.
//! Two bounds keep a wrong guess from doing harm:
//! - the horizon (see [`horizon`]): planning for more new flows than arrive
//!   gives shares closer to the weights, never an overshoot, so it is never
//!   below a tenth of the open flows, and a burst after a quiet spell is not
//!   thrown at the one backend that was owed a few;
//! - a floor: every backend keeps [`FLOOR`] of its weighted share, so none
//!   is starved, whatever its count says. It is small because it also caps
//!   catching up: after a rolling restart the emptied backend can take at
//!   most 1 - FLOOR x (N-1)/N of new flows.

/// One backend that may take new flows: the operator's weight (a capacity
/// multiplier) and the flows it holds open now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub weight: u32,
    pub active: u64,
    /// The rebalancer is closing connections on it: it is owed nothing
    /// and takes only its [`FLOOR`], whatever its count.
    pub closing: bool,
}

/// The part of its weighted share every backend keeps whatever it holds.
pub const FLOOR: f64 = 0.02;

/// Maglev weights for new flows come out summing to about this: a
/// resolution of a millionth of new flows, fine enough for a thousand
/// backends (Maglev's cost depends on the weights' ratios, not their size).
pub const WEIGHT_SCALE: u32 = 1_000_000;

/// The smallest horizon: below it, a burst after a quiet spell would mostly
/// land on the one backend that was owed a few flows.
pub const MIN_HORIZON: u64 = 100;

/// A VIP's part of the flows confirmed on all VIPs (the datapath counts
/// confirmations, not per VIP): in proportion to the flows it holds open.
pub fn arrivals(open: u64, open_everywhere: u64, confirmed_everywhere: u64) -> u64 {
    if open_everywhere == 0 {
        return confirmed_everywhere;
    }
    let part = u128::from(confirmed_everywhere) * u128::from(open) / u128::from(open_everywhere);
    u64::try_from(part).unwrap_or(u64::MAX)
}

/// How many new flows to plan for until the next count: as many as arrived
/// in the last interval (see [`arrivals`]), but at least a tenth of those
/// open and [`MIN_HORIZON`]. Erring high only slows convergence; erring low
/// overshoots.
pub fn horizon(open: u64, arrivals: u64) -> u64 {
    arrivals.max(open / 10).max(MIN_HORIZON)
}

/// The Maglev weights for the next `horizon` new flows (the caller's
/// estimate of how many arrive before it asks again). A backend of weight 0
/// gets 0; every other gets at least 1.
pub fn new_flow_weights(loads: &[Load], horizon: u64) -> Vec<u32> {
    let total_weight: f64 = loads.iter().map(|load| f64::from(load.weight)).sum();
    if total_weight == 0.0 {
        return vec![0; loads.len()];
    }
    let open: f64 = loads.iter().map(|load| load.active as f64).sum();
    let after = open + horizon.max(1) as f64;
    let owed: Vec<f64> = loads
        .iter()
        .map(|load| {
            let target = after * f64::from(load.weight) / total_weight;
            if load.closing { 0.0 } else { (target - load.active as f64).max(0.0) }
        })
        .collect();
    let total_owed: f64 = owed.iter().sum();
    loads
        .iter()
        .zip(&owed)
        .map(|(load, owed)| {
            if load.weight == 0 {
                return 0;
            }
            let weighted = f64::from(load.weight) / total_weight;
            // The targets add up to more than is open, so something is owed
            // unless every member is closing (then the weights decide).
            let share = if total_owed > 0.0 {
                FLOOR * weighted + (1.0 - FLOOR) * owed / total_owed
            } else {
                weighted
            };
            ((share * f64::from(WEIGHT_SCALE)).round() as u32).max(1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(weights: &[u32], active: &[u64]) -> Vec<Load> {
        weights
            .iter()
            .zip(active)
            .map(|(&weight, &active)| Load { weight, active, closing: false })
            .collect()
    }

    /// Opens `flows` new flows in rounds of `per_round`, each round shared by
    /// the weights computed from the counts before it (as the daemon would,
    /// once a second); returns the final counts.
    fn open(weights: &[u32], mut active: Vec<u64>, flows: u64, per_round: u64) -> Vec<u64> {
        let mut left = flows;
        while left > 0 {
            let round = per_round.min(left);
            let shares = new_flow_weights(&loads(weights, &active), per_round);
            let total: u64 = shares.iter().map(|&s| u64::from(s)).sum();
            let mut given = 0;
            for (index, share) in shares.iter().enumerate() {
                let part = if index + 1 == shares.len() {
                    round - given
                } else {
                    round * u64::from(*share) / total
                };
                active[index] += part;
                given += part;
            }
            left -= round;
        }
        active
    }

    fn within(counts: &[u64], weights: &[u32], tolerance: f64) -> bool {
        let total: f64 = counts.iter().map(|&c| c as f64).sum();
        let total_weight: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        counts.iter().zip(weights).all(|(&count, &weight)| {
            let expected = total * f64::from(weight) / total_weight;
            (count as f64 - expected).abs() <= tolerance * expected
        })
    }

    #[test]
    fn confirmations_are_shared_among_vips_by_their_open_flows() {
        assert_eq!(arrivals(3_000, 6_000, 2_000), 1_000);
        assert_eq!(arrivals(0, 6_000, 2_000), 0);
        assert_eq!(arrivals(0, 0, 2_000), 2_000, "before any count, all of them");
    }

    #[test]
    fn the_horizon_follows_arrivals_but_never_falls_below_a_tenth_of_the_open_flows() {
        assert_eq!(horizon(0, 0), MIN_HORIZON);
        assert_eq!(horizon(3_000, 50), 300);
        assert_eq!(horizon(3_000, 5_000), 5_000);
    }

    #[test]
    fn balanced_backends_get_new_flows_by_weight() {
        let even = [333_333, 333_333, 333_333];
        assert_eq!(new_flow_weights(&loads(&[1, 1, 1], &[500, 500, 500]), 300), even);
        let by_weight = [250_000, 250_000, 500_000];
        assert_eq!(new_flow_weights(&loads(&[1, 1, 2], &[0, 0, 0]), 100), by_weight);
    }

    #[test]
    fn a_restarted_backend_gets_most_new_flows_and_the_others_keep_a_floor() {
        let weights = new_flow_weights(&loads(&[1, 1, 1], &[0, 1_500, 1_500]), 1_500);
        assert_eq!(weights, [986_667, 6_667, 6_667]);
    }

    #[test]
    fn weight_zero_gets_nothing_and_no_weight_at_all_gives_zeros() {
        assert_eq!(new_flow_weights(&loads(&[0, 1], &[0, 100]), 10)[0], 0);
        assert_eq!(new_flow_weights(&loads(&[0, 0], &[5, 5]), 10), [0, 0]);
    }

    /// The rolling restart, at 100 new flows a second: 3,000 flows
    /// with backend 1 back empty, then 1,500 more. Under hashing by weight
    /// alone it ends at 500 against 2,000; here within 10% of even.
    #[test]
    fn after_a_rolling_restart_open_flows_converge_to_even() {
        let counts = open(&[1, 1, 1], vec![0, 1_500, 1_500], 1_500, 100);
        assert!(within(&counts, &[1, 1, 1], 0.10), "{counts:?}");
        let hashed = [500u64, 2_000, 2_000];
        assert!(!within(&hashed, &[1, 1, 1], 0.10), "the baseline is not imbalanced");
    }

    #[test]
    fn after_a_scale_up_the_new_backend_catches_up() {
        let counts = open(&[1, 1, 1, 1], vec![1_000, 1_000, 1_000, 0], 1_500, 100);
        assert!(within(&counts, &[1, 1, 1, 1], 0.10), "{counts:?}");
    }

    #[test]
    fn weights_one_one_two_converge_to_one_one_two() {
        let counts = open(&[1, 1, 2], vec![0, 0, 0], 4_000, 100);
        assert!(within(&counts, &[1, 1, 2], 0.10), "{counts:?}");
        let counts = open(&[1, 1, 2], vec![1_000, 1_000, 0], 2_000, 100);
        assert!(within(&counts, &[1, 1, 2], 0.10), "{counts:?}");
    }

    /// A burst ten times the horizon still reaches every backend.
    #[test]
    fn a_burst_beyond_the_horizon_is_not_thrown_at_one_backend() {
        let weights = new_flow_weights(&loads(&[1, 1, 1], &[0, 1_000, 1_000]), 10);
        let total: u32 = weights.iter().sum();
        for weight in &weights[1..] {
            assert!(f64::from(*weight) / f64::from(total) >= FLOOR / 3.0 - 0.001, "{weights:?}");
        }
    }

    #[test]
    fn a_backend_the_rebalancer_closes_on_takes_only_its_floor() {
        // Just above their share, the old backends would be owed a part of
        // the next flows, and the closed clients would partly come back.
        let mut crowded = loads(&[1, 1, 1, 1], &[800, 800, 800, 700]);
        let open = new_flow_weights(&crowded, 315);
        assert!(open[0] > WEIGHT_SCALE / 20, "owed without closing: {open:?}");
        for load in &mut crowded[..3] {
            load.closing = true;
        }
        let closing = new_flow_weights(&crowded, 315);
        let floor = (FLOOR / 4.0 * f64::from(WEIGHT_SCALE)).round() as u32;
        assert_eq!(closing[..3], [floor; 3], "{closing:?}");
        assert_eq!(closing[3], WEIGHT_SCALE - 3 * floor, "{closing:?}");
        let all = new_flow_weights(
            &loads(&[1, 1], &[10, 10])
                .iter()
                .map(|l| Load { closing: true, ..*l })
                .collect::<Vec<_>>(),
            100,
        );
        assert_eq!(all, [WEIGHT_SCALE / 2; 2], "all closing: by the weights");
    }
}
