//! Tests of the public picking API ([`Tables`], [`PickState`], [`Policy`], [`is_prime`]) across
//! policies. Fixed seeds, no I/O.

use super::*;
use std::cell::{Cell, RefCell};

const SEED: u64 = 0x00c0_ffee;

fn pool(weights: &[u32]) -> Vec<(SocketAddr, u32)> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| (SocketAddr::from(([10, 9, 0, i as u8], 9000)), w))
        .collect()
}

fn tables(policy: Policy, weights: &[u32]) -> Tables {
    Tables::build(policy, &pool(weights), DEFAULT_MAGLEV_TABLE_SIZE)
}

fn all(_: usize) -> bool {
    true
}

fn idle(_: usize) -> u64 {
    0
}

#[test]
fn names_round_trip() {
    for p in Policy::ALL {
        assert_eq!(Policy::from_name(p.name()), Some(p));
        assert_eq!(p.to_string(), p.name());
    }
    for k in HashKey::ALL {
        assert_eq!(HashKey::from_name(k.name()), Some(k));
    }
    assert_eq!(
        Policy::from_name("least_connections"),
        Some(Policy::LeastConnections)
    );
    assert_eq!(Policy::from_name("Maglev"), None);
    assert_eq!(
        HashKey::from_name("source_ip_port"),
        Some(HashKey::SourceIpPort)
    );
    assert_eq!(HashKey::from_name("ip"), None);
}

#[test]
fn primes() {
    for p in [
        2u64,
        3,
        65537,
        655373,
        5_000_011,
        2_147_483_647,
        18_446_744_073_709_551_557,
    ] {
        assert!(is_prime(p), "{p}");
    }
    for c in [
        0u64,
        1,
        4,
        65536,
        5_000_013,
        3_215_031_751,
        4_294_967_297,
        u64::MAX,
    ] {
        assert!(!is_prime(c), "{c}");
    }
    assert!(is_prime(u64::from(DEFAULT_MAGLEV_TABLE_SIZE)));
    assert!(is_prime(u64::from(MAX_MAGLEV_TABLE_SIZE)));
    // Agrees with trial division on everything small.
    let trial = |n: u64| n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0);
    for n in 0..100_000 {
        assert_eq!(is_prime(n), trial(n), "{n}");
    }
}

#[test]
fn round_robin_textbook_5_1_1() {
    let t = tables(Policy::RoundRobin, &[5, 1, 1]);
    let mut st = PickState::new(SEED);
    st.rr_cursor = 0;
    let got: Vec<usize> = (0..14)
        .map(|_| t.pick(&mut st, 0, all, idle).unwrap())
        .collect();
    assert_eq!(got, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]); // a a b a c a a, twice
}

#[test]
fn round_robin_exact_shares_over_a_period() {
    let t = tables(Policy::RoundRobin, &[1, 1, 2, 4]);
    for seed in 0..5 {
        let mut st = PickState::new(seed); // any starting point in the period
        let mut counts = [0; 4];
        for _ in 0..8 * 3 {
            counts[t.pick(&mut st, 0, all, idle).unwrap()] += 1;
        }
        assert_eq!(counts, [3, 3, 6, 12], "seed {seed}");
    }
}

/// Picks as production makes them: every pick positions the cursor from one shared ticket
/// counter (as `Snapshot::pick` does with the listener's ticket) before picking.
fn shared_ticket_counts(weights: &[u32], eligible: impl Fn(usize) -> bool, n: usize) -> Vec<usize> {
    let t = tables(Policy::RoundRobin, weights);
    let mut st = PickState::new(SEED);
    let mut counts = vec![0; weights.len()];
    for ticket in 0..n as u64 {
        st.set_rr_cursor(ticket);
        counts[t.pick(&mut st, 0, &eligible, idle).unwrap()] += 1;
    }
    counts
}

#[test]
fn round_robin_spreads_an_ineligible_share_by_weight() {
    // 1:1:1 with the middle one full: the others get half each, not 2/3 and 1/3.
    let c = shared_ticket_counts(&[1, 1, 1], |i| i != 1, 3000);
    assert_eq!(c[1], 0);
    for i in [0, 2] {
        assert!((1350..=1650).contains(&c[i]), "seed {SEED}: {c:?}");
    }
    // 5:1:1 with the heavy one ineligible: 1:1 between the other two (not 5:2).
    let c = shared_ticket_counts(&[5, 1, 1], |i| i != 0, 7000);
    for i in [1, 2] {
        assert!((3150..=3850).contains(&c[i]), "seed {SEED}: {c:?}");
    }
    // 1:2:4 with the 2 ineligible: 1:4 between the others.
    let c = shared_ticket_counts(&[1, 2, 4], |i| i != 1, 7000);
    assert!((1260..=1540).contains(&c[0]), "seed {SEED}: {c:?}");
    assert!((5040..=6160).contains(&c[2]), "seed {SEED}: {c:?}");
}

#[test]
fn round_robin_many_backends_builds_fast_and_exact() {
    // 100,000 equal backends: plain rotation, one entry each.
    let seq = super::rr::sequence(&vec![1; 100_000]);
    assert_eq!(seq.len(), 100_000);
    assert!(seq.iter().enumerate().all(|(i, &x)| x as usize == i));
    // Uneven weights over many backends take the stride construction: exact shares per period.
    let weights: Vec<u32> = (0..20_000).map(|i| 1 + (i % 3)).collect();
    let seq = super::rr::sequence(&weights);
    let mut c = vec![0u32; weights.len()];
    for &x in &seq {
        c[x as usize] += 1;
    }
    assert_eq!(c, weights);
}

#[test]
fn round_robin_long_ineligible_run_falls_back() {
    // 40 heavy backends down, one light one up: the 32-entry scan misses it, the linear pass not.
    let mut weights = vec![50u32; 40];
    weights.push(1);
    let t = tables(Policy::RoundRobin, &weights);
    let mut st = PickState::new(SEED);
    for _ in 0..100 {
        assert_eq!(t.pick(&mut st, 0, |i| i == 40, idle), Some(40));
    }
}

#[test]
fn cursors_survive_a_smaller_table() {
    let big = tables(Policy::RoundRobin, &[7, 5, 3, 1, 1, 2, 9]);
    let mut st = PickState::new(SEED);
    for _ in 0..20 {
        big.pick(&mut st, 0, all, idle);
    }
    st.rr_cursor = u64::MAX; // as far beyond as possible
    st.lc_cursor = u64::MAX;
    let small = tables(Policy::RoundRobin, &[1, 1]);
    let lc = tables(Policy::LeastConnections, &[1, 1]);
    for _ in 0..10 {
        assert!(small.pick(&mut st, 0, all, idle).unwrap() < 2);
        assert!(lc.pick(&mut st, 0, all, idle).unwrap() < 2);
    }
}

#[test]
fn every_policy_none_when_nothing_pickable() {
    for p in Policy::ALL {
        let mut st = PickState::new(SEED);
        let t = tables(p, &[1, 2, 3]);
        for key in 0..50 {
            assert_eq!(t.pick(&mut st, key, |_| false, idle), None, "{p}");
        }
        let drained = tables(p, &[0, 0, 0]);
        assert_eq!(drained.pick(&mut st, 7, all, idle), None, "{p}");
        let empty = tables(p, &[]);
        assert!(empty.is_empty());
        assert_eq!(empty.pick(&mut st, 7, all, idle), None, "{p}");
    }
}

#[test]
fn every_policy_never_picks_weight_zero() {
    let weights = [0, 3, 0, 1, 2, 0];
    for p in Policy::ALL {
        let t = tables(p, &weights);
        assert_eq!(t.len(), 6);
        let mut st = PickState::new(SEED);
        let mut seen = [false; 6];
        for key in 0..2_000u64 {
            let i = t
                .pick(&mut st, hash::mix64(key), all, |i| (i as u64 * 7 + key) % 5)
                .unwrap();
            assert_ne!(weights[i], 0, "{p} picked drained backend {i}");
            seen[i] = true;
        }
        assert_eq!(seen, [false, true, false, true, true, false], "{p}");
        // Only a drained backend eligible: nothing.
        assert_eq!(t.pick(&mut st, 1, |i| weights[i] == 0, idle), None, "{p}");
    }
}

#[test]
fn every_policy_only_eligible() {
    for p in Policy::ALL {
        let t = tables(p, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut st = PickState::new(SEED);
        for key in 0..2_000u64 {
            let i = t
                .pick(&mut st, hash::mix64(key), |i| i % 3 == 1, idle)
                .unwrap();
            assert_eq!(i % 3, 1, "{p}");
        }
    }
}

#[test]
fn least_connections_min_and_rotating_ties() {
    let t = tables(Policy::LeastConnections, &[1, 1, 1, 1]);
    let mut st = PickState::new(SEED);
    let mut got: Vec<usize> = (0..4)
        .map(|_| t.pick(&mut st, 0, all, idle).unwrap())
        .collect();
    got.sort_unstable();
    assert_eq!(got, [0, 1, 2, 3]);
    let loads = [4u64, 1, 3, 1];
    let t = tables(Policy::LeastConnections, &[1, 1, 4, 2]); // per weight: 4, 1, 0.75, 0.5
    assert_eq!(t.pick(&mut st, 0, all, |i| loads[i]), Some(3));
}

#[test]
fn random_shares_follow_weights() {
    println!("seed {SEED:#x}");
    let weights = [1u32, 3, 6];
    let t = tables(Policy::Random, &weights);
    let mut st = PickState::new(SEED);
    let mut counts = [0u32; 3];
    for _ in 0..100_000 {
        counts[t.pick(&mut st, 0, all, idle).unwrap()] += 1;
    }
    for (i, &w) in weights.iter().enumerate() {
        let share = f64::from(counts[i]) / 100_000.0;
        assert!(
            (share - f64::from(w) / 10.0).abs() < 0.02,
            "backend {i}: {share}"
        );
    }
}

#[test]
fn power_of_two_distinct_and_prefers_lighter() {
    println!("seed {SEED:#x}");
    for n in [2usize, 3, 16] {
        let t = tables(Policy::PowerOfTwo, &vec![1; n]);
        let mut st = PickState::new(SEED);
        for _ in 0..5_000 {
            let asked = RefCell::new(Vec::new());
            let got = t
                .pick(&mut st, 0, all, |i| {
                    asked.borrow_mut().push(i);
                    i as u64 // higher index, higher load
                })
                .unwrap();
            let asked = asked.into_inner();
            assert_eq!(asked.len(), 2);
            assert_ne!(asked[0], asked[1], "N={n}: the same backend drawn twice");
            assert_eq!(got, *asked.iter().min().unwrap());
        }
    }
}

#[test]
fn maglev_deterministic_and_consistent_with_table() {
    let t = tables(Policy::Maglev, &[1, 2, 3, 1, 2]);
    let m = t.maglev().unwrap();
    assert_eq!(m.size(), DEFAULT_MAGLEV_TABLE_SIZE);
    let mut a = PickState::new(1);
    let mut b = PickState::new(2);
    for i in 0..1_000u64 {
        let key = hash::mix64(i);
        let got = t.pick(&mut a, key, all, idle);
        assert_eq!(got, m.lookup(key));
        assert_eq!(got, t.pick(&mut b, key, all, idle));
    }
    assert!(tables(Policy::Random, &[1]).maglev().is_none());
}

#[test]
fn maglev_ineligible_repicks_deterministically() {
    let t = tables(Policy::Maglev, &[1; 5]);
    let m = t.maglev().unwrap();
    let mut st = PickState::new(SEED);
    for i in 0..1_000u64 {
        let key = hash::mix64(i);
        let home = m.lookup(key).unwrap();
        let loads_read = Cell::new(0);
        let load = |_| {
            loads_read.set(loads_read.get() + 1);
            0
        };
        let alt = t.pick(&mut st, key, |j| j != home, load).unwrap();
        assert_ne!(alt, home);
        // Same key, same substitute (as long as the fallback was not needed).
        if loads_read.get() == 0 {
            assert_eq!(t.pick(&mut st, key, |j| j != home, idle), Some(alt));
        }
    }
}

#[test]
fn maglev_falls_back_to_least_connections() {
    // Ten backends, only #7 eligible: a key whose lookup and all 8 perturbed lookups miss #7
    // (probability 0.9^9 ≈ 39%) must still get #7, through least connections (loads are read).
    let t = tables(Policy::Maglev, &[1; 10]);
    let m = t.maglev().unwrap();
    let key = (0..1_000u64)
        .map(hash::mix64)
        .find(|&k| {
            m.lookup(k) != Some(7)
                && (1..=MAGLEV_RETRIES).all(|a| m.lookup(hash::perturb(k, a)) != Some(7))
        })
        .expect("some key misses #7 nine times");
    let mut st = PickState::new(SEED);
    let read = RefCell::new(Vec::new());
    let got = t.pick(
        &mut st,
        key,
        |i| i == 7,
        |i| {
            read.borrow_mut().push(i);
            0
        },
    );
    assert_eq!(got, Some(7));
    assert_eq!(read.into_inner(), [7]);
    // And with several eligible, the least loaded of them wins the fallback.
    let loads = [0u64, 0, 0, 0, 0, 0, 0, 9, 2, 5];
    let key = (0..1_000u64)
        .map(hash::mix64)
        .find(|&k| {
            (0..=MAGLEV_RETRIES).all(|a| {
                let k = if a == 0 { k } else { hash::perturb(k, a) };
                m.lookup(k).is_some_and(|i| i < 7)
            })
        })
        .expect("some key stays on #0..#6 nine times");
    assert_eq!(t.pick(&mut st, key, |i| i >= 7, |i| loads[i]), Some(8));
}
