//! The health state of one backend, as pure state machines: [`Active`] (rise/fall hysteresis of
//! probe results) and [`Passive`] (ejection after connect failures, with doubling).
//!
//! PURE: no I/O, no clocks, no threads. Time comes in as `u64` milliseconds on any monotonic
//! scale the caller chooses; results go out as return values the caller acts on (republish a
//! snapshot, reset a failure counter, log a flip).

/// Rise/fall hysteresis of one backend's active probe results.
///
/// A backend starts UP (as in HAProxy): it is assumed healthy until `fall` probes in a row fail,
/// so starting ringlb or reloading a config does not send every connection to nowhere while the
/// first probes are in flight. A down backend comes back after `rise` successes in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    up: bool,
    /// Successes in a row (reset by a failure).
    successes: u32,
    /// Failures in a row (reset by a success).
    failures: u32,
}

impl Active {
    /// A backend in state `up` with no probe results yet. Backends start up; see the type.
    pub fn new(up: bool) -> Active {
        Active {
            up,
            successes: 0,
            failures: 0,
        }
    }

    /// Records one probe result. Returns `Some(new_up)` exactly when the state flips: on the
    /// `fall`-th failure in a row of an up backend, or the `rise`-th success in a row of a down
    /// one. `rise` and `fall` below 1 count as 1.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= rise.max(1) {
                self.up = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= fall.max(1) {
                self.up = false;
                return Some(false);
            }
        }
        None
    }

    pub fn is_up(&self) -> bool {
        self.up
    }
}

/// Passive ejection state of one backend.
///
/// The workers count a backend's connect failures in a row in an atomic (a success resets it);
/// the control thread periodically hands that count to [`Passive::observe`]. An ejection lasts
/// `base × 2^(times ejected before)`, capped at `max`. The doubling memory decays: once a backend
/// has gone `max` milliseconds without being ejected (measured from the end of its last ejection),
/// [`Passive::times_ejected`] goes back to 0 and the next ejection is `base` again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Passive {
    /// `Some(end)` while ejected (until [`Passive::expire`] or [`Passive::clear`] ends it; past
    /// `end` it no longer counts as ejected, see [`Passive::is_ejected`]).
    ejected_until: Option<u64>,
    times_ejected: u32,
    /// When the last ejection ended; `None` if never ejected or ended by [`Passive::clear`]
    /// (which has no clock: the next `observe` starts counting then).
    free_since: Option<u64>,
}

impl Passive {
    pub fn new() -> Passive {
        Passive::default()
    }

    /// Called with the backend's current consecutive connect-failure count (read from an atomic
    /// the workers write). Returns true if this call ejects it: `threshold` ≥ 1, the count ≥
    /// `threshold`, not already ejected (nor expired but not yet [`Passive::expire`]d: that
    /// count is stale), and `may_eject` (the caller's `max_ejected_percent` check). The ejection
    /// lasts `base_ms × 2^times_ejected`, capped at `max_ms`.
    pub fn observe(
        &mut self,
        consecutive_failures: u32,
        threshold: u32,
        now_ms: u64,
        base_ms: u64,
        max_ms: u64,
        may_eject: bool,
    ) -> bool {
        if self.ejected_until.is_some() {
            return false;
        }
        let since = *self.free_since.get_or_insert(now_ms);
        if now_ms.saturating_sub(since) >= max_ms {
            self.times_ejected = 0;
        }
        if threshold == 0 || consecutive_failures < threshold || !may_eject {
            return false;
        }
        let length = base_ms
            .saturating_mul(2u64.saturating_pow(self.times_ejected))
            .min(max_ms);
        self.ejected_until = Some(now_ms.saturating_add(length));
        self.times_ejected = self.times_ejected.saturating_add(1);
        self.free_since = None;
        true
    }

    /// Ejected at `now_ms`: an ejection started and its time has not run out.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.is_some_and(|end| now_ms < end)
    }

    /// When the ejection in force at `now_ms` ends (same clock), if it is ejected.
    pub fn ejected_until(&self, now_ms: u64) -> Option<u64> {
        self.ejected_until.filter(|&end| now_ms < end)
    }

    /// Ends an ejection early (an active probe reached `rise` successes). Returns true if it was
    /// ejected (including expired but not yet [`Passive::expire`]d): the caller then republishes
    /// and resets the failure counter, as after an expiry. Keeps the doubling memory.
    pub fn clear(&mut self) -> bool {
        if self.ejected_until.take().is_some() {
            self.free_since = None;
            true
        } else {
            false
        }
    }

    /// Returns true when an ejection expired at `now_ms` (call periodically; the caller then
    /// republishes and resets the failure counter). True once per ejection.
    pub fn expire(&mut self, now_ms: u64) -> bool {
        match self.ejected_until {
            Some(end) if now_ms >= end => {
                self.ejected_until = None;
                self.free_since = Some(now_ms);
                true
            }
            _ => false,
        }
    }

    /// Ejections so far that still count towards doubling (reset after `max_ms` without one).
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_starts_as_told() {
        assert!(Active::new(true).is_up());
        assert!(!Active::new(false).is_up());
    }

    #[test]
    fn active_falls_after_exactly_fall_failures_and_reports_once() {
        let mut a = Active::new(true);
        assert_eq!(a.record(false, 2, 3), None);
        assert_eq!(a.record(false, 2, 3), None);
        assert_eq!(a.record(false, 2, 3), Some(false));
        assert!(!a.is_up());
        for _ in 0..10 {
            assert_eq!(a.record(false, 2, 3), None, "a flip is reported once");
        }
    }

    #[test]
    fn active_rises_after_exactly_rise_successes_and_reports_once() {
        let mut a = Active::new(false);
        assert_eq!(a.record(true, 2, 3), None);
        assert_eq!(a.record(true, 2, 3), Some(true));
        assert!(a.is_up());
        for _ in 0..10 {
            assert_eq!(a.record(true, 2, 3), None);
        }
    }

    #[test]
    fn active_streaks_must_be_consecutive() {
        let mut a = Active::new(true);
        // Two failures, a success, two failures: never three in a row.
        for ok in [false, false, true, false, false, true] {
            assert_eq!(a.record(ok, 2, 3), None);
        }
        assert!(a.is_up());
        let mut a = Active::new(false);
        for ok in [true, false, true, false, true] {
            assert_eq!(a.record(ok, 2, 3), None);
        }
        assert_eq!(a.record(true, 2, 3), Some(true));
    }

    #[test]
    fn active_successes_while_up_do_not_count_towards_a_later_rise() {
        let mut a = Active::new(true);
        for _ in 0..5 {
            a.record(true, 3, 1);
        }
        assert_eq!(a.record(false, 3, 1), Some(false));
        assert_eq!(a.record(true, 3, 1), None);
        assert_eq!(a.record(true, 3, 1), None);
        assert_eq!(a.record(true, 3, 1), Some(true));
    }

    #[test]
    fn active_rise_and_fall_of_one_flip_at_once() {
        let mut a = Active::new(true);
        assert_eq!(a.record(false, 1, 1), Some(false));
        assert_eq!(a.record(true, 1, 1), Some(true));
        // Zero is treated as one.
        assert_eq!(a.record(false, 0, 0), Some(false));
        assert_eq!(a.record(true, 0, 0), Some(true));
    }

    const BASE: u64 = 30_000;
    const MAX: u64 = 300_000;

    #[test]
    fn passive_ejects_at_the_threshold_only() {
        let mut p = Passive::new();
        assert!(!p.observe(0, 3, 0, BASE, MAX, true));
        assert!(!p.observe(2, 3, 10, BASE, MAX, true));
        assert!(!p.is_ejected(10));
        assert!(p.observe(3, 3, 20, BASE, MAX, true));
        assert!(p.is_ejected(20));
        assert!(p.is_ejected(20 + BASE - 1));
        assert!(!p.is_ejected(20 + BASE));
        assert_eq!(p.ejected_until(20), Some(20 + BASE));
        assert_eq!(p.ejected_until(20 + BASE), None, "time served");
        assert_eq!(p.times_ejected(), 1);
        // Already ejected: no second ejection, whatever the count.
        assert!(!p.observe(50, 3, 30, BASE, MAX, true));
        assert_eq!(p.times_ejected(), 1);
    }

    #[test]
    fn passive_never_ejects_when_not_allowed_or_disabled() {
        let mut p = Passive::new();
        for now in 0..100 {
            assert!(!p.observe(1_000, 3, now, BASE, MAX, false));
            assert!(
                !p.observe(1_000, 0, now, BASE, MAX, true),
                "threshold 0 is off"
            );
        }
        assert!(!p.is_ejected(100));
        assert_eq!(p.times_ejected(), 0);
        // Allowed later: ejected then.
        assert!(p.observe(1_000, 3, 100, BASE, MAX, true));
    }

    #[test]
    fn passive_expires_once() {
        let mut p = Passive::new();
        assert!(p.observe(3, 3, 1_000, BASE, MAX, true));
        assert!(!p.expire(1_000 + BASE - 1));
        assert!(p.is_ejected(1_000 + BASE - 1));
        assert!(p.expire(1_000 + BASE));
        assert!(!p.expire(1_000 + BASE + 1), "reported once");
        assert!(!p.is_ejected(1_000 + BASE));
        // Never ejected: nothing to expire.
        assert!(!Passive::new().expire(u64::MAX));
    }

    #[test]
    fn passive_expired_but_not_expired_yet_ignores_the_stale_count() {
        let mut p = Passive::new();
        assert!(p.observe(3, 3, 0, BASE, MAX, true));
        assert!(!p.is_ejected(BASE + 5));
        // The caller has not called expire() yet, so the count it passes is stale.
        assert!(!p.observe(3, 3, BASE + 5, BASE, MAX, true));
        assert!(p.expire(BASE + 6));
    }

    #[test]
    fn passive_ejection_doubles_and_is_capped() {
        let mut p = Passive::new();
        let mut now = 0;
        let mut lengths = Vec::new();
        for _ in 0..7 {
            assert!(p.observe(3, 3, now, BASE, MAX, true));
            let start = now;
            while p.is_ejected(now) {
                now += 1_000;
            }
            lengths.push(now - start);
            assert!(p.expire(now));
            // Failing again at once (well within MAX): the memory is kept.
            now += 1_000;
        }
        assert_eq!(
            lengths,
            [30_000, 60_000, 120_000, 240_000, 300_000, 300_000, 300_000]
        );
        assert_eq!(p.times_ejected(), 7);
    }

    #[test]
    fn passive_doubling_never_overflows() {
        let mut p = Passive::new();
        let mut now = 0;
        for _ in 0..100 {
            assert!(p.observe(1, 1, now, u64::MAX / 2, u64::MAX, true));
            assert!(p.clear());
            now += 1;
        }
        assert_eq!(p.times_ejected(), 100);
        assert!(p.observe(1, 1, now, u64::MAX / 2, u64::MAX, true));
        assert!(p.is_ejected(u64::MAX - 1));
    }

    #[test]
    fn passive_memory_decays_after_max_without_ejection() {
        let mut p = Passive::new();
        assert!(p.observe(3, 3, 0, BASE, MAX, true));
        assert!(p.expire(BASE));
        // Healthy (not ejected) for just under MAX: the next ejection still doubles.
        assert!(!p.observe(0, 3, BASE + MAX - 1, BASE, MAX, true));
        assert_eq!(p.times_ejected(), 1);
        assert!(p.observe(3, 3, BASE + MAX - 1, BASE, MAX, true));
        assert!(p.is_ejected(BASE + MAX - 1 + 2 * BASE - 1));
        let end = BASE + MAX - 1 + 2 * BASE;
        assert!(p.expire(end));
        // Healthy for MAX: forgotten, the next ejection is BASE again.
        assert!(!p.observe(0, 3, end + MAX, BASE, MAX, true));
        assert_eq!(p.times_ejected(), 0);
        assert!(p.observe(3, 3, end + MAX, BASE, MAX, true));
        assert!(!p.is_ejected(end + MAX + BASE));
    }

    #[test]
    fn passive_clear_ends_an_ejection_early_and_keeps_the_memory() {
        let mut p = Passive::new();
        assert!(!p.clear(), "not ejected");
        assert!(p.observe(3, 3, 0, BASE, MAX, true));
        assert!(p.clear());
        assert!(!p.is_ejected(1));
        assert!(!p.clear(), "reported once");
        assert!(!p.expire(BASE), "nothing left to expire");
        // The decay clock starts at the first observe after a clear.
        assert!(!p.observe(0, 3, 10_000, BASE, MAX, true));
        assert!(!p.observe(0, 3, 10_000 + MAX - 1, BASE, MAX, true));
        assert_eq!(p.times_ejected(), 1);
        assert!(p.observe(3, 3, 10_000 + MAX - 1, BASE, MAX, true));
        assert!(p.is_ejected(10_000 + MAX - 1 + 2 * BASE - 1), "doubled");
        // Clearing an ejection whose time ran out but was not expire()d yet still reports it.
        let mut q = Passive::new();
        assert!(q.observe(3, 3, 0, BASE, MAX, true));
        assert!(!q.is_ejected(BASE));
        assert!(q.clear());
        assert!(!q.expire(BASE));
    }
}
