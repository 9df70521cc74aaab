//! Weighted random and power-of-two-choices: the Vose alias table built per snapshot ([`Alias`]),
//! O(1) weighted draws from it, and the O(N) weighted fallback pass ([`pick_linear`]) used when
//! too many draws land on ineligible backends.
//!
//! Owns the draw bounds: a pick makes at most [`REDRAWS`] alias draws per choice before falling
//! back to one linear pass, so it never loops unboundedly. No allocation when picking; the PRNG
//! state lives in the caller's [`PickState`].

use super::hash::Rng;
use super::least_conn::{self, lighter};
use super::PickState;

/// Alias draws per choice before the linear fallback. With a fraction f of the weight ineligible,
/// the fallback runs with probability f^8 (0.4% at f = 1/2).
pub const REDRAWS: u32 = 8;

/// Vose's alias table over all backends (weight-0 ones have probability 0). Slot `i` keeps `i`
/// when the low 32 random bits are below `threshold`, else yields `alias`.
#[derive(Clone, Debug, Default)]
pub struct Alias {
    slots: Vec<(u32, u32)>,
}

impl Alias {
    /// Exact integer construction: with weights scaled by N the mean is Σw, so all arithmetic is
    /// on integers and the only error is flooring each threshold to 32 bits (< 2^-32 per slot).
    pub fn build(weights: &[u32]) -> Alias {
        let n = weights.len();
        let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
        if total == 0 {
            return Alias::default();
        }
        let mut mass: Vec<u128> = weights.iter().map(|&w| u128::from(w) * n as u128).collect();
        let mut slots = vec![(u32::MAX, 0u32); n];
        let (mut small, mut large): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| mass[i] < total);
        while let (Some(&s), Some(&g)) = (small.last(), large.last()) {
            small.pop();
            large.pop();
            slots[s] = (((mass[s] << 32) / total) as u32, g as u32);
            mass[g] = mass[g] + mass[s] - total;
            if mass[g] < total {
                small.push(g);
            } else {
                large.push(g);
            }
        }
        // Exact arithmetic leaves only entries of mass exactly `total`: they always keep themselves.
        for i in small.into_iter().chain(large) {
            slots[i] = (u32::MAX, i as u32);
        }
        Alias { slots }
    }

    /// One weighted draw (never a weight-0 backend); None if every weight is 0.
    #[inline]
    pub fn draw(&self, rng: &mut Rng) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let r = rng.next_u64();
        // High 32 bits choose the slot (multiply-shift, n < 2^32), low 32 bits the coin.
        let i = (((r >> 32) * self.slots.len() as u64) >> 32) as usize;
        let (threshold, alias) = self.slots[i];
        Some(if (r as u32) < threshold {
            i
        } else {
            alias as usize
        })
    }
}

/// Weighted random among eligible backends: up to [`REDRAWS`] alias draws, then one linear pass.
pub fn pick(
    alias: &Alias,
    weights: &[u32],
    rng: &mut Rng,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    for _ in 0..REDRAWS {
        let i = alias.draw(rng)?;
        if eligible(i) {
            return Some(i);
        }
    }
    pick_linear(weights, rng, eligible)
}

/// One pass, weighted by `weights`, over eligible backends with weight > 0 (weighted reservoir
/// sampling of size one: keep backend i with probability w_i / Σ so far). Calls `eligible` once per
/// backend, so it stays correct even if eligibility changes while it runs.
pub fn pick_linear(
    weights: &[u32],
    rng: &mut Rng,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut chosen = None;
    let mut seen = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        if w == 0 || !eligible(i) {
            continue;
        }
        seen += u64::from(w);
        if rng.below(seen) < u64::from(w) {
            chosen = Some(i);
        }
    }
    chosen
}

/// Power of two choices: two DISTINCT weighted draws among eligible backends, the lower
/// load/weight wins (ties: the first draw). With a single eligible backend it is returned; when the
/// first draw keeps hitting ineligible backends, least connections over all eligible decides.
/// `load` is called for exactly the two candidates (or, in that fallback, for every eligible one).
pub fn pick_two(
    alias: &Alias,
    weights: &[u32],
    st: &mut PickState,
    eligible: impl Fn(usize) -> bool,
    load: impl Fn(usize) -> u64,
) -> Option<usize> {
    let mut first = None;
    for _ in 0..REDRAWS {
        let i = alias.draw(&mut st.rng)?;
        if eligible(i) {
            first = Some(i);
            break;
        }
    }
    let Some(a) = first else {
        return least_conn::pick(weights, st, eligible, load);
    };
    let mut second = None;
    for _ in 0..REDRAWS {
        let i = alias.draw(&mut st.rng)?;
        if i != a && eligible(i) {
            second = Some(i);
            break;
        }
    }
    let second = second.or_else(|| pick_linear(weights, &mut st.rng, |i| i != a && eligible(i)));
    let Some(b) = second else {
        return Some(a);
    };
    Some(if lighter(load(b), weights[b], load(a), weights[a]) {
        b
    } else {
        a
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    const SEED: u64 = 0x5eed_0001;

    fn shares(counts: &[u64]) -> Vec<f64> {
        let total: u64 = counts.iter().sum();
        counts.iter().map(|&c| c as f64 / total as f64).collect()
    }

    #[test]
    fn alias_exact_probabilities() {
        // Enumerate the table: each backend's probability is Σ over slots of its share of the slot.
        let weights = [3u32, 0, 1, 7, 1, 0, 12];
        let alias = Alias::build(&weights);
        let n = weights.len() as f64;
        let mut p = [0f64; 7];
        for (i, &(t, a)) in alias.slots.iter().enumerate() {
            let keep = f64::from(t) / 4_294_967_296.0;
            p[i] += keep / n;
            p[a as usize] += (1.0 - keep) / n;
        }
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        for (i, &w) in weights.iter().enumerate() {
            assert!(
                (p[i] - f64::from(w) / total).abs() < 1e-8,
                "backend {i}: {}",
                p[i]
            );
        }
    }

    #[test]
    fn random_shares_follow_weights() {
        println!("seed {SEED:#x}");
        let weights = [1u32, 2, 3, 4, 0];
        let alias = Alias::build(&weights);
        let mut rng = Rng::new(SEED);
        let mut counts = [0u64; 5];
        for _ in 0..100_000 {
            counts[pick(&alias, &weights, &mut rng, |_| true).unwrap()] += 1;
        }
        assert_eq!(counts[4], 0);
        for (i, s) in shares(&counts).iter().enumerate() {
            let want = f64::from(weights[i]) / 10.0;
            assert!((s - want).abs() < 0.01, "backend {i}: {s} vs {want}");
        }
    }

    #[test]
    fn random_skips_ineligible_and_falls_back() {
        let weights = [1000u32, 1000, 1000, 1];
        let alias = Alias::build(&weights);
        let mut rng = Rng::new(SEED);
        // Only the 1-in-3001 backend is eligible: the draws nearly always miss, the pass finds it.
        for _ in 0..1_000 {
            assert_eq!(pick(&alias, &weights, &mut rng, |i| i == 3), Some(3));
        }
        assert_eq!(pick(&alias, &weights, &mut rng, |_| false), None);
        assert_eq!(
            pick(&Alias::build(&[0, 0]), &[0, 0], &mut rng, |_| true),
            None
        );
    }

    #[test]
    fn linear_pass_weighted() {
        let weights = [1u32, 0, 3];
        let mut rng = Rng::new(SEED);
        let mut counts = [0u64; 3];
        for _ in 0..40_000 {
            counts[pick_linear(&weights, &mut rng, |_| true).unwrap()] += 1;
        }
        let s = shares(&counts);
        assert_eq!(counts[1], 0);
        assert!(
            (s[0] - 0.25).abs() < 0.01 && (s[2] - 0.75).abs() < 0.01,
            "{s:?}"
        );
    }

    #[test]
    fn p2c_two_distinct_draws() {
        println!("seed {SEED:#x}");
        let mut st = PickState::new(SEED);
        for weights in [vec![1u32, 1], vec![1, 100], vec![1, 2, 3, 1, 2, 3, 0, 5]] {
            let alias = Alias::build(&weights);
            for _ in 0..10_000 {
                let asked = RefCell::new(Vec::new());
                let got = pick_two(
                    &alias,
                    &weights,
                    &mut st,
                    |_| true,
                    |i| {
                        asked.borrow_mut().push(i);
                        0
                    },
                )
                .unwrap();
                let asked = asked.into_inner();
                assert_eq!(asked.len(), 2, "{weights:?}: {asked:?}");
                assert_ne!(asked[0], asked[1], "{weights:?}");
                assert!(asked.contains(&got));
                assert!(asked.iter().all(|&i| weights[i] > 0));
            }
        }
    }

    #[test]
    fn p2c_prefers_lower_load_per_weight() {
        let mut st = PickState::new(SEED);
        let weights = [1u32, 1, 2];
        let loads = [10u64, 3, 8]; // per weight: 10, 3, 4
        let alias = Alias::build(&weights);
        for _ in 0..1_000 {
            let asked = RefCell::new(Vec::new());
            let got = pick_two(
                &alias,
                &weights,
                &mut st,
                |_| true,
                |i| {
                    asked.borrow_mut().push(i);
                    loads[i]
                },
            )
            .unwrap();
            let best = *asked
                .borrow()
                .iter()
                .min_by_key(|&&i| loads[i] * 2 / u64::from(weights[i]))
                .unwrap();
            assert_eq!(got, best);
        }
    }

    #[test]
    fn p2c_single_eligible_and_none() {
        let mut st = PickState::new(SEED);
        let weights = [5u32, 5, 5];
        let alias = Alias::build(&weights);
        for _ in 0..100 {
            assert_eq!(
                pick_two(&alias, &weights, &mut st, |i| i == 1, |_| 0),
                Some(1)
            );
        }
        assert_eq!(pick_two(&alias, &weights, &mut st, |_| false, |_| 0), None);
        assert_eq!(
            pick_two(&Alias::default(), &[], &mut st, |_| true, |_| 0),
            None
        );
    }
}
