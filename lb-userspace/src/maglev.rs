//! Maglev lookup-table building (Eisenbud et al., NSDI 2016), with weights.
//! Pure: no I/O, no clocks, no randomness. The table is a function of the
//! backend set alone, so every balancer with the same configuration builds
//! the same table.

use std::net::IpAddr;

use lb_common::NO_BACKEND;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Seeds of the two permutation hashes (offset and skip). Fixed forever:
/// changing them moves every flow.
const OFFSET_SEED: u64 = 0x6c62_6f66_6673_6574;
const SKIP_SEED: u64 = 0x6c62_736b_6970_0001;

/// One backend as Maglev sees it: its identity (the address, so that a
/// backend keeps its preferences across restarts and instances) and weight.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub address: IpAddr,
    pub weight: u32,
}

/// Whether `size` can be a Maglev table size: a prime, so that every skip
/// value walks the whole table.
pub fn is_valid_table_size(size: u32) -> bool {
    size >= 3
        && (2..).take_while(|d: &u32| d.saturating_mul(*d) <= size).all(|d| !size.is_multiple_of(d))
}

/// Builds a table of `size` entries; each holds the position of a candidate
/// in `candidates`, or `NO_BACKEND` when there are none. Candidates should be
/// given in a stable order (the daemon sorts them by address); `size` must
/// satisfy [`is_valid_table_size`].
///
/// Each round every candidate earns its weight in credit and claims one entry
/// (the next free one in its own permutation) per `max_weight` of credit, so
/// entries end up proportional to weight; with equal weights this is exactly
/// the paper's round-robin fill.
pub fn build_table(candidates: &[Candidate], size: u32) -> Vec<u32> {
    debug_assert!(is_valid_table_size(size), "table size {size} is not prime");
    let mut table = vec![NO_BACKEND; size as usize];
    // A zero weight takes no entries (and would never earn credit).
    let claimants: Vec<usize> =
        (0..candidates.len()).filter(|&i| candidates[i].weight > 0).collect();
    let Some(max_weight) = claimants.iter().map(|&i| u64::from(candidates[i].weight)).max() else {
        return table;
    };
    let size64 = u64::from(size);
    let permutations: Vec<(u64, u64)> = candidates
        .iter()
        .map(|candidate| {
            let identity = address_identity(candidate.address);
            let offset = xxh3_64_with_seed(&identity, OFFSET_SEED) % size64;
            let skip = xxh3_64_with_seed(&identity, SKIP_SEED) % (size64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; candidates.len()];
    let mut credit = vec![0u64; candidates.len()];
    let mut filled = 0u32;
    while filled < size {
        for &position in &claimants {
            credit[position] += u64::from(candidates[position].weight);
            if credit[position] < max_weight {
                continue;
            }
            credit[position] -= max_weight;
            let (offset, skip) = permutations[position];
            loop {
                let entry = ((offset + next[position] * skip) % size64) as usize;
                next[position] += 1;
                if table[entry] == NO_BACKEND {
                    table[entry] = position as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == size {
                break;
            }
        }
    }
    table
}

/// The table actually installed: entry `e` keeps `T_all[e]` (the table of
/// every configured backend) when that backend is serving, and otherwise
/// takes `T_serving[e]` (the table of the serving ones). Still a pure
/// function of the configuration and the health of each backend, so every
/// balancer that sees the same health builds the same table; and a backend
/// failing or recovering moves only its own entries, never a flow of a
/// backend that stayed healthy. Returns positions in `all`.
pub fn build_failover_table(all: &[Candidate], serving: &[bool], size: u32) -> Vec<u32> {
    assert_eq!(all.len(), serving.len(), "one serving flag per candidate");
    let mut table = build_table(all, size);
    if serving.iter().all(|&s| s) {
        return table;
    }
    let serving_positions: Vec<usize> = (0..all.len()).filter(|&i| serving[i]).collect();
    let serving_candidates: Vec<Candidate> = serving_positions.iter().map(|&i| all[i]).collect();
    let fallback = build_table(&serving_candidates, size);
    for (entry, fallback_entry) in table.iter_mut().zip(fallback) {
        if *entry != NO_BACKEND && !serving[*entry as usize] {
            *entry = if fallback_entry == NO_BACKEND {
                NO_BACKEND
            } else {
                serving_positions[fallback_entry as usize] as u32
            };
        }
    }
    table
}

/// Identity bytes of an address: IPv4 as its four bytes, IPv6 as sixteen, so
/// that 10.0.0.1 and ::ffff:10.0.0.1 are distinct backends.
fn address_identity(address: IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const M: u32 = lb_common::DEFAULT_TABLE_SIZE;

    fn backends(count: u32) -> Vec<Candidate> {
        (0..count)
            .map(|i| Candidate {
                address: IpAddr::V4(Ipv4Addr::from(0xc612_0100 + i)), // 198.18.1.0 + i
                weight: 1,
            })
            .collect()
    }

    fn entries_per_backend(table: &[u32], count: usize) -> Vec<usize> {
        let mut counts = vec![0; count];
        for &entry in table {
            counts[entry as usize] += 1;
        }
        counts
    }

    /// Entry-by-entry addresses, so tables built from different lists compare.
    fn owners(table: &[u32], candidates: &[Candidate]) -> Vec<IpAddr> {
        table.iter().map(|&entry| candidates[entry as usize].address).collect()
    }

    #[test]
    fn table_sizes_must_be_prime() {
        assert!(is_valid_table_size(65_537));
        assert!(is_valid_table_size(251));
        assert!(!is_valid_table_size(65_536));
        assert!(!is_valid_table_size(1));
        assert!(!is_valid_table_size(65_539 * 3));
    }

    #[test]
    fn same_input_gives_the_same_table_in_every_process() {
        // A digest pinned in the source: any process, build or machine that
        // builds this table must get these exact bytes.
        let table = build_table(&backends(10), M);
        let bytes: Vec<u8> = table.iter().flat_map(|entry| entry.to_le_bytes()).collect();
        assert_eq!(xxh3_64_with_seed(&bytes, 0), 4_014_470_220_597_683_818, "table digest changed");
        assert_eq!(table, build_table(&backends(10), M));
    }

    #[test]
    fn every_backend_count_from_3_to_100_is_balanced_within_one_percent() {
        for count in 3..=100u32 {
            let table = build_table(&backends(count), M);
            let counts = entries_per_backend(&table, count as usize);
            let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
            assert!(
                (max - min) as f64 <= 0.01 * min as f64,
                "{count} backends: min {min}, max {max} entries"
            );
        }
    }

    /// Maglev trades strict minimal disruption for balance: a table that is a
    /// pure function of the backend set and balanced to 1% must move a few
    /// other entries too. We hold that extra movement under 1% of the table
    /// (measured: 0.31% at 3 backends to 0.49% at 100).
    #[test]
    fn removing_a_backend_moves_its_entries_and_under_one_percent_of_others() {
        for count in [3u32, 10, 50, 100] {
            let all = backends(count);
            let before = owners(&build_table(&all, M), &all);
            let removed = all[1].address;
            let rest: Vec<Candidate> =
                all.iter().copied().filter(|c| c.address != removed).collect();
            let after = owners(&build_table(&rest, M), &rest);
            let others_moved = before
                .iter()
                .zip(&after)
                .filter(|(old, new)| **old != removed && old != new)
                .count();
            let fraction = others_moved as f64 / M as f64;
            println!(
                "remove 1 of {count}: {others_moved} entries of other backends moved ({:.3}%)",
                fraction * 100.0
            );
            assert!(fraction < 0.01, "remove 1 of {count}: {fraction}");
        }
    }

    /// The new backend takes its 1/(N+1) share; the extra movement among the
    /// others stays under 1% of the table (measured: 0.3 to 0.55 points).
    #[test]
    fn adding_a_backend_moves_close_to_one_over_n_plus_one() {
        for count in [3u32, 10, 50, 100] {
            let all = backends(count + 1);
            let fewer = &all[..count as usize];
            let before = owners(&build_table(fewer, M), fewer);
            let after = owners(&build_table(&all, M), &all);
            let moved = before.iter().zip(&after).filter(|(old, new)| old != new).count();
            let fraction = moved as f64 / M as f64;
            let ideal = 1.0 / f64::from(count + 1);
            println!(
                "add 1 to {count}: {:.3}% of entries moved (ideal {:.3}%)",
                fraction * 100.0,
                ideal * 100.0
            );
            assert!(fraction >= ideal * 0.99, "add to {count}: {fraction} vs {ideal}");
            assert!(fraction - ideal < 0.01, "add to {count}: {fraction} vs {ideal}");
        }
    }

    #[test]
    fn weights_are_honoured() {
        let mut candidates = backends(4);
        candidates[0].weight = 1;
        candidates[1].weight = 2;
        candidates[2].weight = 3;
        candidates[3].weight = 10;
        let counts = entries_per_backend(&build_table(&candidates, M), 4);
        let total_weight = 16.0;
        for (candidate, &count) in candidates.iter().zip(&counts) {
            let expected = f64::from(M) * f64::from(candidate.weight) / total_weight;
            let error = (count as f64 - expected).abs() / expected;
            assert!(
                error < 0.01,
                "weight {}: {count} entries, expected {expected:.0}",
                candidate.weight
            );
        }
    }

    #[test]
    fn a_failing_backend_moves_only_its_own_entries_and_spreads_them_evenly() {
        for count in [3u32, 10, 50] {
            let all = backends(count);
            let healthy = build_failover_table(&all, &vec![true; count as usize], M);
            assert_eq!(healthy, build_table(&all, M));
            let mut serving = vec![true; count as usize];
            serving[1] = false;
            let failed = build_failover_table(&all, &serving, M);
            let mut moved_others = 0;
            for (before, after) in healthy.iter().zip(&failed) {
                assert_ne!(*after, 1, "the failed backend still has entries");
                if *before != 1 && before != after {
                    moved_others += 1;
                }
            }
            assert_eq!(moved_others, 0, "{count} backends: flows of healthy backends moved");
            // The failed backend's entries are spread over the others about evenly.
            let counts = entries_per_backend(&failed, count as usize);
            let fair = f64::from(M) / f64::from(count - 1);
            for (position, &entries) in counts.iter().enumerate().filter(|(p, _)| *p != 1) {
                let error = (entries as f64 - fair).abs() / fair;
                assert!(
                    error < 0.02,
                    "{count} backends: backend {position} has {entries}, fair {fair:.0}"
                );
            }
            // Recovery restores the original table exactly.
            assert_eq!(build_failover_table(&all, &vec![true; count as usize], M), healthy);
        }
    }

    #[test]
    fn with_nothing_serving_the_table_is_empty() {
        let all = backends(3);
        assert!(build_failover_table(&all, &[false; 3], M).iter().all(|&e| e == NO_BACKEND));
    }

    #[test]
    fn empty_and_single_backend_sets() {
        assert!(build_table(&[], M).iter().all(|&entry| entry == NO_BACKEND));
        assert!(build_table(&backends(1), M).iter().all(|&entry| entry == 0));
        let zero = [Candidate { address: IpAddr::V4(Ipv4Addr::LOCALHOST), weight: 0 }];
        assert!(build_table(&zero, M).iter().all(|&entry| entry == NO_BACKEND));
    }
}
