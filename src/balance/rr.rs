//! Smooth weighted round robin (NGINX's algorithm), precomputed: [`sequence`] expands one full
//! period at build time, [`pick`] walks it with a per-worker cursor.
//!
//! Owns the period construction (gcd reduction, period cap) and the bounded skip of ineligible
//! entries. It must not allocate, loop unboundedly or touch anything but its arguments when picking.

use super::random::pick_linear;
use super::PickState;

/// Longest precomputed period (entries). Weights whose reduced sum exceeds it are scaled down
/// proportionally (each kept ≥ 1), which perturbs shares by at most N / MAX_PERIOD.
pub const MAX_PERIOD: u64 = 1 << 20;

/// Bound on build work (period × active backends, one add-and-compare each): keeps a rebuild under
/// a few tens of ms. Beyond it the period shrinks further, but never below one entry per backend.
const MAX_BUILD_STEPS: u64 = 1 << 25;

/// Entries inspected by one pick before giving up on the sequence and falling back to one linear
/// weighted pass over the backends.
const MAX_SCAN: usize = 32;

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
    let cap = MAX_PERIOD.min((MAX_BUILD_STEPS / k).max(k));
    if total > cap {
        for x in &mut w {
            *x = ((u128::from(*x) * u128::from(cap) / u128::from(total)) as u64).max(1);
        }
        reduce(&mut w);
        total = w.iter().sum();
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

fn reduce(w: &mut [u64]) {
    let g = w.iter().fold(0, |g, &x| gcd(g, x));
    if g > 1 {
        for x in w.iter_mut() {
            *x /= g;
        }
    }
}

/// Next eligible entry of the sequence from the cursor (at most [`MAX_SCAN`] entries inspected),
/// else one weighted random linear pass over all backends. A cursor left by a longer, older table
/// is taken modulo the current length.
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
    let scan = len.min(MAX_SCAN);
    for k in 0..scan {
        let mut pos = start + k;
        if pos >= len {
            pos -= len;
        }
        let i = seq[pos] as usize;
        if eligible(i) {
            st.rr_cursor = (pos + 1) as u64;
            return Some(i);
        }
    }
    // Long runs of ineligible entries: move past what was scanned (so the next pick does not
    // rescan it) and settle this one in O(N).
    st.rr_cursor = ((start + scan) % len) as u64;
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
