//! Smooth weighted round robin (NGINX's algorithm), precomputed: [`sequence`] expands one full
//! period at build time, [`pick`] walks it with a cursor (in production the listener's shared
//! ticket, so the sequence is global across workers).
//!
//! The control plane builds the sequence over the backends that are up (a health flip
//! republishes), so a down backend's share is spread over the others in proportion to their
//! weights, exactly as if it were not configured. What is only known per pick (a backend at its
//! `max_connections`, or already tried by this connection) is handled here: the entry at the
//! cursor being ineligible, the pick draws random entries of the sequence (each backend in
//! proportion to its weight) rather than taking the next one, which would hand the whole share
//! to one neighbour.
//!
//! Owns the period construction (gcd reduction, period cap) and the bounded skip of ineligible
//! entries. It must not allocate, loop unboundedly or touch anything but its arguments when picking.

use super::random::pick_linear;
use super::PickState;

/// Longest precomputed period (entries). Weights whose reduced sum exceeds it are scaled down
/// proportionally (each kept ≥ 1), which perturbs shares by at most N / MAX_PERIOD.
pub const MAX_PERIOD: u64 = 1 << 20;

/// Bound on NGINX-style build work (period × active backends, one add-and-compare each): beyond
/// it the period is built by stride scheduling instead, in O(period · log N).
const MAX_BUILD_STEPS: u64 = 1 << 25;

/// Random entries of the sequence drawn by one pick whose cursor entry is ineligible, before
/// falling back to one linear weighted pass over the backends.
const MAX_DRAWS: usize = 32;

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// One full period of smooth weighted round robin over `weights` (indices into it; weight-0
/// backends never appear). Each step adds every weight to its backend's current value, picks the
/// largest (first on ties) and subtracts the total from it: 5:1:1 gives `a a b a c a a`.
pub fn sequence(weights: &[u32]) -> Vec<u32> {
    let active: Vec<u32> = (0..weights.len() as u32)
        .filter(|&i| weights[i as usize] > 0)
        .collect();
    if active.is_empty() {
        return Vec::new();
    }
    let mut w: Vec<u64> = active
        .iter()
        .map(|&i| u64::from(weights[i as usize]))
        .collect();
    reduce(&mut w);
    let mut total: u64 = w.iter().sum();
    let k = active.len() as u64;
    // Never below one entry per backend (a backend with weight must appear).
    let cap = MAX_PERIOD.max(k);
    if total > cap {
        for x in &mut w {
            *x = ((u128::from(*x) * u128::from(cap) / u128::from(total)) as u64).max(1);
        }
        reduce(&mut w);
        total = w.iter().sum();
    }

    if w.iter().all(|&x| x == w[0]) {
        // Equal weights (reduced to 1 each): plain rotation, O(N) even for 100,000 backends.
        return active;
    }
    if total.saturating_mul(k) > MAX_BUILD_STEPS {
        return stride_sequence(&active, &w, total);
    }
    // Current values stay within (-total, total], and total ≤ MAX_PERIOD + N fits i64 easily.
    let w: Vec<i64> = w.iter().map(|&x| x as i64).collect();
    let total_i = total as i64;
    let mut current = vec![0i64; w.len()];
    let mut seq = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        let mut best_value = i64::MIN;
        for (j, c) in current.iter_mut().enumerate() {
            *c += w[j];
            if *c > best_value {
                best_value = *c;
                best = j;
            }
        }
        current[best] -= total_i;
        seq.push(active[best]);
    }
    seq
}

/// One period of stride scheduling (each backend's j-th entry at virtual time (j + ½) / weight,
/// ties to the lower index): as smooth and as exact as NGINX's sequence, in O(total · log N) for
/// the many-backend case where NGINX's O(total · N) would take seconds.
fn stride_sequence(active: &[u32], w: &[u64], total: u64) -> Vec<u32> {
    use std::cmp::{Ordering, Reverse};
    use std::collections::BinaryHeap;
    /// Virtual time (2j + 1) / (2w) as a fraction, ordered exactly (cross-multiplied in u128).
    #[derive(PartialEq, Eq)]
    struct Due(u64, u64, usize);
    impl Ord for Due {
        fn cmp(&self, o: &Self) -> Ordering {
            (u128::from(self.0) * u128::from(o.1))
                .cmp(&(u128::from(o.0) * u128::from(self.1)))
                .then(self.2.cmp(&o.2))
        }
    }
    impl PartialOrd for Due {
        fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
            Some(self.cmp(o))
        }
    }
    let mut heap: BinaryHeap<Reverse<Due>> = w
        .iter()
        .enumerate()
        .map(|(j, &x)| Reverse(Due(1, 2 * x, j)))
        .collect();
    let mut seq = Vec::with_capacity(total as usize);
    while seq.len() < total as usize {
        let Some(Reverse(Due(num, den, j))) = heap.pop() else {
            break;
        };
        seq.push(active[j]);
        heap.push(Reverse(Due(num + 2, den, j)));
    }
    seq
}

fn reduce(w: &mut [u64]) {
    let g = w.iter().fold(0, |g, &x| gcd(g, x));
    if g > 1 {
        for x in w.iter_mut() {
            *x /= g;
        }
    }
}

/// The sequence entry at the cursor if eligible; else up to [`MAX_DRAWS`] random entries (so the
/// ineligible backend's share spreads over the others by weight, not onto its successor); else
/// one weighted random linear pass over all backends. The cursor advances by one either way. A
/// cursor left by a longer, older table is taken modulo the current length.
pub fn pick(
    seq: &[u32],
    weights: &[u32],
    st: &mut PickState,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    let len = seq.len();
    if len == 0 {
        return None;
    }
    let start = (st.rr_cursor % len as u64) as usize;
    st.rr_cursor = ((start + 1) % len) as u64;
    let i = seq[start] as usize;
    if eligible(i) {
        return Some(i);
    }
    for _ in 0..len.min(MAX_DRAWS) {
        let i = seq[st.rng.below(len as u64) as usize] as usize;
        if eligible(i) {
            return Some(i);
        }
    }
    pick_linear(weights, &mut st.rng, eligible)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn textbook_5_1_1() {
        let seq = sequence(&[5, 1, 1]);
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]); // a a b a c a a
    }

    #[test]
    fn gcd_reduced_and_zero_skipped() {
        assert_eq!(sequence(&[10, 0, 2, 2]), sequence(&[5, 0, 1, 1]));
        assert_eq!(sequence(&[10, 0, 2, 2]), [0, 0, 2, 0, 3, 0, 0]);
        assert!(sequence(&[0, 0]).is_empty());
        assert!(sequence(&[]).is_empty());
    }

    #[test]
    fn period_capped_proportionally() {
        // Coprime huge weights: the period is capped, shares stay within 1e-5 of the weights.
        let weights = [1_000_003, 2_000_000, 3_000_001];
        let seq = sequence(&weights);
        assert!(seq.len() as u64 <= MAX_PERIOD + 3, "period {}", seq.len());
        let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        for (i, &w) in weights.iter().enumerate() {
            let share = seq.iter().filter(|&&x| x as usize == i).count() as f64 / seq.len() as f64;
            assert!(
                (share - f64::from(w) / total).abs() < 1e-5,
                "backend {i}: {share}"
            );
        }
    }

    #[test]
    fn tiny_weight_kept_when_scaled() {
        let seq = sequence(&[u32::MAX, 1]);
        assert!(seq.contains(&1));
        assert!(seq.len() as u64 <= MAX_PERIOD + 2);
    }
}
