//! Least connections: the eligible backend with the smallest load/weight, ties broken round-robin
//! from a rotating per-worker offset so a burst of equal loads spreads instead of piling onto the
//! first backend.
//!
//! O(N) per pick by nature (every eligible backend's load is read); use `power_of_two` for large
//! pools. Owns the load/weight comparison used by P2C too. No allocation, no floats (loads and
//! weights are compared by cross-multiplication in u128, exact for all u64 × u32).

use super::PickState;

/// `load_a / weight_a < load_b / weight_b`, exactly. Weights are > 0.
#[inline]
pub fn lighter(load_a: u64, weight_a: u32, load_b: u64, weight_b: u32) -> bool {
    u128::from(load_a) * u128::from(weight_b) < u128::from(load_b) * u128::from(weight_a)
}

/// Min load/weight over eligible backends with weight > 0, scanning from the cursor so the first
/// of equally loaded backends rotates; the cursor then moves just past the winner.
pub fn pick(
    weights: &[u32],
    st: &mut PickState,
    eligible: impl Fn(usize) -> bool,
    load: impl Fn(usize) -> u64,
) -> Option<usize> {
    let n = weights.len();
    if n == 0 {
        return None;
    }
    let start = (st.lc_cursor % n as u64) as usize;
    let mut best: Option<(usize, u64, u32)> = None;
    for k in 0..n {
        let mut i = start + k;
        if i >= n {
            i -= n;
        }
        let w = weights[i];
        if w == 0 || !eligible(i) {
            continue;
        }
        let l = load(i);
        match best {
            Some((_, bl, bw)) if !lighter(l, w, bl, bw) => {}
            _ => best = Some((i, l, w)),
        }
    }
    let (i, _, _) = best?;
    st.lc_cursor = (i + 1) as u64;
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lighter_is_exact() {
        assert!(lighter(1, 2, 1, 1)); // 0.5 < 1
        assert!(!lighter(2, 2, 1, 1)); // 1 == 1
        assert!(lighter(u64::MAX - 1, u32::MAX, u64::MAX, u32::MAX));
        assert!(!lighter(u64::MAX, 1, u64::MAX, 1));
    }

    #[test]
    fn picks_min_load_per_weight() {
        let mut st = PickState::new(1);
        let weights = [1, 2, 1, 4];
        let loads = [3u64, 5, 2, 9]; // 3, 2.5, 2, 2.25
        for _ in 0..10 {
            assert_eq!(pick(&weights, &mut st, |_| true, |i| loads[i]), Some(2));
        }
        assert_eq!(pick(&weights, &mut st, |i| i != 2, |i| loads[i]), Some(3));
        assert_eq!(pick(&weights, &mut st, |i| i < 2, |i| loads[i]), Some(1));
        assert_eq!(pick(&weights, &mut st, |_| false, |i| loads[i]), None);
    }

    #[test]
    fn ties_rotate() {
        for seed in 0..8 {
            let mut st = PickState::new(seed);
            let mut seen: Vec<usize> = (0..4)
                .map(|_| pick(&[1, 1, 1, 1], &mut st, |_| true, |_| 0).unwrap())
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, [0, 1, 2, 3], "seed {seed}");
        }
    }

    #[test]
    fn ties_rotate_among_eligible_only() {
        let mut st = PickState::new(3);
        let picks: Vec<usize> = (0..6)
            .map(|_| pick(&[1; 5], &mut st, |i| i == 1 || i == 4, |_| 7).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 3, "{picks:?}");
    }

    #[test]
    fn weight_zero_never_picked() {
        let mut st = PickState::new(5);
        for _ in 0..10 {
            assert_eq!(pick(&[0, 1], &mut st, |_| true, |i| [0, 100][i]), Some(1));
        }
        assert_eq!(pick(&[0, 0], &mut st, |_| true, |_| 0), None);
    }
}
