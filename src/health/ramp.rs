//! Slow start, as pure arithmetic and bookkeeping: which backends are ramping, since when, and
//! the share of its weight each gets at a given time.
//!
//! The ramp is linear from [`START_PERCENT`] to 100% over the window, applied in [`STEPS`]
//! steps: the control plane republishes the listener's snapshot with the ramped weights at each
//! step, so the data plane's pickers read plain weights from their snapshot (no clock, no lock,
//! no arithmetic added on the hot path). To express 10% of weight 1, a ramping listener's
//! weights are all multiplied by [`SCALE`] (every policy compares weights only relative to each
//! other, and smooth WRR reduces them by their gcd, so the scale changes nothing else).
//!
//! PURE: no I/O, no clocks; time comes in as milliseconds on the caller's monotonic scale.

use std::collections::HashMap;
use std::hash::Hash;

/// The share of its weight a backend gets when its ramp starts.
pub const START_PERCENT: u64 = 10;
/// Republishes per window (each moves the ramp by (100 − 10) / 20 = 4.5 points).
pub const STEPS: u64 = 20;
/// The shortest step (a very short window is not worth more publishes than this allows).
pub const MIN_STEP_MS: u64 = 100;
/// Weights of a listener with slow start are multiplied by this (see the module doc).
pub const SCALE: u32 = 100;

/// The ramp's percentage `elapsed` into a `window` (both ms): 10% at 0, linear, 100% at the end.
pub fn percent(elapsed_ms: u64, window_ms: u64) -> u32 {
    if window_ms == 0 || elapsed_ms >= window_ms {
        return 100;
    }
    let p = START_PERCENT + (100 - START_PERCENT) * elapsed_ms / window_ms;
    p as u32
}

/// `weight × SCALE × percent / 100`, at least 1 when `weight` > 0, saturating at `u32::MAX`.
pub fn scaled(weight: u32, percent: u32) -> u32 {
    if weight == 0 {
        return 0;
    }
    let w = u64::from(weight) * u64::from(SCALE) * u64::from(percent.min(100)) / 100;
    u32::try_from(w.max(1)).unwrap_or(u32::MAX)
}

/// Time between two republishes of a ramping listener.
pub fn step_ms(window_ms: u64) -> u64 {
    (window_ms / STEPS).max(MIN_STEP_MS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    eligible: bool,
    /// When the current ramp started; `None`: not ramping.
    since: Option<u64>,
}

/// Per backend: eligible in the last build, and since when it ramps.
#[derive(Debug, Default)]
pub struct Ramps<K: Hash + Eq> {
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq> Ramps<K> {
    pub fn new() -> Ramps<K> {
        Ramps {
            entries: HashMap::new(),
        }
    }

    /// Records whether `key` is eligible for new connections at `now` and returns its ramp
    /// percentage (100: not ramping). A backend ramps from the moment it turns eligible: back
    /// from down, not ready, ejected, held or drained, or first seen with `ramp_new` (added by
    /// a reload; not at start, where every backend starts at full weight).
    pub fn observe(
        &mut self,
        key: K,
        eligible: bool,
        now: u64,
        window_ms: u64,
        ramp_new: bool,
    ) -> u32 {
        let e = self.entries.entry(key).or_insert(Entry {
            eligible,
            since: (eligible && ramp_new).then_some(now),
        });
        if !eligible {
            *e = Entry {
                eligible: false,
                since: None,
            };
            return 100;
        }
        if !e.eligible {
            *e = Entry {
                eligible: true,
                since: Some(now),
            };
        }
        let Some(since) = e.since else {
            return 100;
        };
        let p = percent(now.saturating_sub(since), window_ms);
        if p >= 100 {
            e.since = None;
        }
        p
    }

    /// Keeps only the keys for which `keep` is true (backends still configured).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.entries.retain(|k, _| keep(k));
    }

    /// When `key`'s ramp started, if it is ramping.
    pub fn since(&self, key: &K) -> Option<u64> {
        self.entries.get(key)?.since
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_from_ten_to_a_hundred() {
        assert_eq!(percent(0, 30_000), 10);
        assert_eq!(percent(15_000, 30_000), 55);
        assert_eq!(percent(29_999, 30_000), 99);
        assert_eq!(percent(30_000, 30_000), 100);
        assert_eq!(percent(5, 0), 100);
        assert_eq!(step_ms(30_000), 1_500);
        assert_eq!(step_ms(1_000), MIN_STEP_MS);
    }

    #[test]
    fn scaled_weights_keep_ratios_and_never_vanish() {
        assert_eq!(scaled(1, 100), 100);
        assert_eq!(scaled(1, 10), 10);
        assert_eq!(scaled(3, 55), 165);
        assert_eq!(scaled(0, 50), 0);
        assert_eq!(scaled(u32::MAX, 100), u32::MAX);
        assert_eq!(scaled(1, 0), 1);
    }

    #[test]
    fn ramps_start_when_a_backend_turns_eligible_and_end_at_full_weight() {
        let mut r: Ramps<u32> = Ramps::new();
        // At start: full weight at once.
        assert_eq!(r.observe(1, true, 0, 10_000, false), 100);
        assert_eq!(r.since(&1), None);
        // Added later (reload): ramps.
        assert_eq!(r.observe(2, true, 1_000, 10_000, true), 10);
        assert_eq!(r.observe(2, true, 6_000, 10_000, true), 55);
        assert_eq!(r.observe(2, true, 11_000, 10_000, true), 100);
        assert_eq!(r.since(&2), None, "done");
        assert_eq!(r.observe(2, true, 12_000, 10_000, true), 100);
        // Down, then back: ramps again from 10%.
        assert_eq!(r.observe(1, false, 20_000, 10_000, true), 100);
        assert_eq!(r.observe(1, true, 21_000, 10_000, true), 10);
        assert_eq!(r.since(&1), Some(21_000));
        // Down in mid-ramp: the next return starts over.
        assert_eq!(r.observe(1, false, 23_000, 10_000, true), 100);
        assert_eq!(r.observe(1, true, 30_000, 10_000, true), 10);
        // First seen while not eligible, then eligible: ramps.
        assert_eq!(r.observe(3, false, 0, 10_000, false), 100);
        assert_eq!(r.observe(3, true, 1, 10_000, false), 10);
        r.retain(|k| *k != 3);
        assert_eq!(r.since(&3), None);
    }
}
