//! Flap damping of one backend, as a pure state machine: a backend whose health state changed
//! more than `threshold` times within `window` is held down for a hold-down that doubles on
//! each repeat (from `hold`, capped at `max_hold`); the doubling memory is forgotten once the
//! backend has gone `max_hold` without a hold.
//!
//! The rule, exactly: every change (live up/down, ready/not ready, as the checks decide) is
//! recorded with its time. When a change makes more than `threshold` of them fall within the
//! last `window`, a hold starts. When it runs out, the changes of the last `window` are counted
//! again (those made during the hold count): still more than `threshold` → held again, doubled;
//! else released. So a backend that keeps flapping stays out, and one that has been stable for
//! `window` comes back when its hold ends.
//!
//! PURE: no I/O, no clocks; time comes in as milliseconds on the caller's monotonic scale.

use std::collections::VecDeque;

/// The settings, in milliseconds (from `crate::config::FlapConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// 0 = off.
    pub threshold: u32,
    pub window_ms: u64,
    pub hold_ms: u64,
    pub max_hold_ms: u64,
}

impl Rule {
    pub fn from_config(c: &crate::config::FlapConfig) -> Rule {
        Rule {
            threshold: c.threshold,
            window_ms: c.window.as_millis() as u64,
            hold_ms: c.hold.as_millis() as u64,
            max_hold_ms: c.max_hold().as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flap {
    /// Times of the most recent changes (at most `threshold + 1` kept: all the rule needs).
    changes: VecDeque<u64>,
    held_until: Option<u64>,
    /// Holds that still count towards doubling.
    holds: u32,
    /// When the last hold ended (the decay clock).
    free_since: Option<u64>,
}

impl Flap {
    pub fn new() -> Flap {
        Flap::default()
    }

    /// Records a state change at `now`. Returns the hold's length when this change starts one.
    pub fn change(&mut self, now: u64, rule: &Rule) -> Option<u64> {
        if rule.threshold == 0 {
            return None;
        }
        self.changes.push_back(now);
        while self.changes.len() > rule.threshold as usize + 1 {
            self.changes.pop_front();
        }
        if self.held_until.is_some() || !self.flapping(now, rule) {
            return None;
        }
        Some(self.hold(now, rule))
    }

    /// Called periodically: when a hold has run out, holds again (returns `Some(length)`) if the
    /// backend is still flapping, else releases it (`Some(0)`). `None`: nothing happened.
    pub fn tick(&mut self, now: u64, rule: &Rule) -> Option<u64> {
        let end = self.held_until?;
        if now < end {
            return None;
        }
        self.held_until = None;
        if rule.threshold > 0 && self.flapping(now, rule) {
            return Some(self.hold(now, rule));
        }
        self.free_since = Some(now);
        Some(0)
    }

    pub fn is_held(&self) -> bool {
        self.held_until.is_some()
    }

    /// When the hold in force ends (same clock).
    pub fn held_until(&self) -> Option<u64> {
        self.held_until
    }

    /// Holds so far that still count towards doubling.
    pub fn holds(&self) -> u32 {
        self.holds
    }

    /// More than `threshold` changes within the last `window` (counting back from `now`).
    fn flapping(&self, now: u64, rule: &Rule) -> bool {
        let recent = self
            .changes
            .iter()
            .filter(|&&t| now.saturating_sub(t) < rule.window_ms)
            .count();
        recent > rule.threshold as usize
    }

    fn hold(&mut self, now: u64, rule: &Rule) -> u64 {
        if self
            .free_since
            .is_some_and(|since| now.saturating_sub(since) >= rule.max_hold_ms)
        {
            self.holds = 0;
        }
        let length = rule
            .hold_ms
            .saturating_mul(2u64.saturating_pow(self.holds))
            .min(rule.max_hold_ms);
        self.holds = self.holds.saturating_add(1);
        self.held_until = Some(now.saturating_add(length));
        self.free_since = None;
        length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Rule = Rule {
        threshold: 4,
        window_ms: 60_000,
        hold_ms: 30_000,
        max_hold_ms: 600_000,
    };

    #[test]
    fn four_changes_are_fine_the_fifth_within_the_window_holds() {
        let mut f = Flap::new();
        for t in [0, 2_000, 4_000, 6_000] {
            assert_eq!(f.change(t, &RULE), None);
        }
        assert!(!f.is_held());
        assert_eq!(f.change(8_000, &RULE), Some(30_000));
        assert!(f.is_held());
        assert_eq!(f.held_until(), Some(38_000));
        // Changes during a hold start nothing new.
        assert_eq!(f.change(9_000, &RULE), None);
    }

    #[test]
    fn changes_spread_wider_than_the_window_never_hold() {
        let mut f = Flap::new();
        for k in 0..100 {
            assert_eq!(f.change(k * 15_001, &RULE), None, "change {k}");
        }
        assert!(!f.is_held());
    }

    #[test]
    fn released_when_stable_held_again_and_doubled_while_flapping() {
        let mut f = Flap::new();
        let mut t = 0;
        // Fails every 2 s: a change every 2 s.
        while f.change(t, &RULE).is_none() {
            t += 2_000;
        }
        assert_eq!(t, 8_000);
        let mut end = f.held_until().unwrap();
        assert_eq!(f.tick(end - 1, &RULE), None, "not yet");
        // Still flapping through the hold: held again for twice as long.
        while t < end {
            t += 2_000;
            f.change(t, &RULE);
        }
        assert_eq!(f.tick(end, &RULE), Some(60_000));
        end = f.held_until().unwrap();
        // Stable from here on: released when this hold ends (the last change is > 60 s old).
        assert_eq!(f.tick(end, &RULE), Some(0));
        assert!(!f.is_held());
        assert_eq!(f.holds(), 2);
        // Flapping again soon after: doubled once more (120 s).
        let t = end + 1_000;
        for k in 0..5 {
            f.change(t + k * 1_000, &RULE);
        }
        assert_eq!(f.held_until(), Some(t + 4_000 + 120_000));
    }

    #[test]
    fn the_hold_is_capped_and_the_memory_decays() {
        let mut f = Flap::new();
        let mut t = 0u64;
        let mut lengths = Vec::new();
        for _ in 0..8 {
            let mut got = None;
            while got.is_none() {
                t += 1_000;
                got = f.change(t, &RULE);
            }
            lengths.push(got.unwrap());
            t = f.held_until().unwrap() + RULE.window_ms;
            assert_eq!(f.tick(t, &RULE), Some(0));
        }
        assert_eq!(
            lengths,
            [30_000, 60_000, 120_000, 240_000, 480_000, 600_000, 600_000, 600_000]
        );
        // Stable for max_hold after the last release: the next hold is the first again.
        t += RULE.max_hold_ms;
        for k in 1..=5 {
            f.change(t + k, &RULE);
        }
        assert_eq!(f.held_until(), Some(t + 5 + 30_000));
    }

    #[test]
    fn threshold_zero_is_off() {
        let rule = Rule {
            threshold: 0,
            ..RULE
        };
        let mut f = Flap::new();
        for t in 0..1_000 {
            assert_eq!(f.change(t, &rule), None);
        }
        assert!(!f.is_held());
    }
}
