//! Drives health on the control thread: active probes (scheduler + prober from `crate::health`;
//! a second scheduler for the readiness checks), flap damping, slow-start ramps and passive
//! ejection (the workers' connect-failure streaks, read from `BackendStats`).
//! Decides which backends are live, ready and eligible; the control plane republishes the
//! listeners it reports.
//! Must not: touch rings or sockets other than the prober's own.

use crate::backend::{bump, Registry};
use crate::config::{Listener, PassiveConfig};
use crate::control::{BackendNote, ControlListener};
use crate::health::flap::{Flap, Rule};
use crate::health::ramp::Ramps;
use crate::health::{self, Outcome, Passive, ProbeSpec, Prober, Scheduler};
use log::{info, warn};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Per-backend passive state plus the active successes seen while ejected.
#[derive(Default)]
struct PassiveEntry {
    state: Passive,
    /// Consecutive successful active probes since the ejection started.
    probe_streak: u32,
}

/// Readiness target ids start here, so both schedulers share one prober.
const READY_IDS: u64 = 1 << 62;

/// What health says of one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The liveness check (if any) says up.
    pub live: bool,
    /// The readiness check (if any) says ready.
    pub ready: bool,
    pub ejected: bool,
    /// Flap damping holds it down.
    pub held: bool,
}

impl Verdict {
    /// Counts as up for `on_backend_down` and UDP flows (not ready keeps connections).
    pub fn up(&self) -> bool {
        self.live && !self.ejected && !self.held
    }
}

pub(crate) struct HealthDriver {
    scheduler: Scheduler,
    /// The `[listeners.health.ready]` checks.
    ready: Scheduler,
    /// (listener, backend) → flap damping state.
    flaps: HashMap<(String, SocketAddr), Flap>,
    /// listener → flap rule and slow-start window (ms; 0 = off).
    rules: HashMap<String, (Rule, u64)>,
    ramps: Ramps<(String, SocketAddr)>,
    /// Set once the first snapshots are built: backends first seen after that ramp.
    started: bool,
    prober: Prober,
    /// (listener, backend) → passive state.
    passive: HashMap<(String, SocketAddr), PassiveEntry>,
    /// listener → passive settings and the rise count of its active check (if any).
    settings: HashMap<String, (PassiveConfig, Option<u32>)>,
    epoch: Instant,
    due: Vec<(u64, ProbeSpec)>,
    done: Vec<(u64, Outcome)>,
    /// Something [`HealthDriver::note`] reports changed since the last
    /// [`HealthDriver::take_notes_stale`] (a probe error, a flip, an ejection).
    notes_stale: bool,
}

impl HealthDriver {
    pub(crate) fn new(listeners: &[Listener], now: Instant) -> HealthDriver {
        let mut d = HealthDriver {
            scheduler: Scheduler::new(),
            ready: Scheduler::with_ids_from(READY_IDS),
            flaps: HashMap::new(),
            rules: HashMap::new(),
            ramps: Ramps::new(),
            started: false,
            prober: Prober::new(),
            passive: HashMap::new(),
            settings: HashMap::new(),
            epoch: now,
            due: Vec::new(),
            done: Vec::new(),
            notes_stale: true,
        };
        d.set_listeners(listeners, now);
        d
    }

    /// Takes a (new) configuration: probe targets and passive settings. State of backends that
    /// persist is kept.
    pub(crate) fn set_listeners(&mut self, listeners: &[Listener], now: Instant) {
        self.scheduler.set_targets(health::targets(listeners), now);
        self.ready
            .set_targets(health::ready_targets(listeners), now);
        self.rules = listeners
            .iter()
            .map(|l| {
                let rule = l.pools[0]
                    .health
                    .as_ref()
                    .map(|h| Rule::from_config(&h.flap));
                let off = Rule::from_config(&crate::config::FlapConfig {
                    threshold: 0,
                    ..Default::default()
                });
                let window = l.pools[0].slow_start.map_or(0, |d| d.as_millis() as u64);
                (l.name.clone(), (rule.unwrap_or(off), window))
            })
            .collect();
        let present = |(l, a): &(String, SocketAddr)| {
            listeners
                .iter()
                .any(|x| &x.name == l && x.pools[0].backends.iter().any(|b| b.address == *a))
        };
        self.flaps.retain(|k, _| present(k));
        self.ramps.retain(present);
        self.settings = listeners
            .iter()
            .map(|l| {
                let rise = l.pools[0].health.as_ref().map(|h| h.rise);
                (l.name.clone(), (l.pools[0].passive.clone(), rise))
            })
            .collect();
        self.passive.retain(|(l, a), _| {
            listeners
                .iter()
                .any(|x| &x.name == l && x.pools[0].backends.iter().any(|b| b.address == *a))
        });
    }

    /// What the checks, passive ejection and flap damping say of a backend now.
    pub(crate) fn verdict(&self, listener: &str, addr: SocketAddr) -> Verdict {
        let now_ms = self.now_ms(Instant::now());
        let key = (listener.to_string(), addr);
        Verdict {
            live: self.scheduler.is_up(listener, addr).unwrap_or(true),
            ready: self.ready.is_up(listener, addr).unwrap_or(true),
            ejected: self
                .passive
                .get(&key)
                .is_some_and(|p| p.state.is_ejected(now_ms)),
            held: self.flaps.get(&key).is_some_and(Flap::is_held),
        }
    }

    /// Slow start: records whether a backend is eligible now and returns the share of its
    /// weight (10–100) to publish; 100 without `slow_start`.
    pub(crate) fn ramp(&mut self, listener: &str, addr: SocketAddr, eligible: bool) -> u32 {
        let window = self.rules.get(listener).map_or(0, |r| r.1);
        if window == 0 {
            return 100;
        }
        let now_ms = self.now_ms(Instant::now());
        let key = (listener.to_string(), addr);
        self.ramps
            .observe(key, eligible, now_ms, window, self.started)
    }

    /// The first snapshots are built: from now on a backend first seen ramps.
    pub(crate) fn mark_started(&mut self) {
        self.started = true;
    }

    /// Slow start's republish period for a listener, if it has slow start.
    pub(crate) fn ramp_step(&self, listener: &str) -> Option<Duration> {
        let window = self.rules.get(listener).map_or(0, |r| r.1);
        (window > 0).then(|| Duration::from_millis(health::ramp::step_ms(window)))
    }

    /// What health knows of a backend for `/status` (weight and drain are the caller's).
    pub(crate) fn note(&self, listener: &str, addr: SocketAddr) -> BackendNote {
        let now_ms = self.now_ms(Instant::now());
        let passive = self.passive.get(&(listener.to_string(), addr));
        // The ejection's end on the clock the admin side reads (`process_ms`).
        let ejected_until_ms = passive
            .and_then(|p| p.state.ejected_until(now_ms))
            .map(|end| crate::backend::process_ms() + (end - now_ms));
        let flap = self.flaps.get(&(listener.to_string(), addr));
        BackendNote {
            not_ready: self.ready.is_up(listener, addr) == Some(false),
            ready_probe_error: self.ready.last_error(listener, addr).map(str::to_string),
            held_until_ms: flap
                .and_then(Flap::held_until)
                .map(|end| crate::backend::process_ms() + end.saturating_sub(now_ms)),
            flap_holds: flap.map_or(0, Flap::holds),
            check_down: self.scheduler.is_up(listener, addr) == Some(false),
            last_probe_error: self
                .scheduler
                .last_error(listener, addr)
                .map(str::to_string),
            ejected_until_ms,
            times_ejected: passive.map_or(0, |p| p.state.times_ejected()),
            ..BackendNote::default()
        }
    }

    /// True once after anything [`HealthDriver::note`] reports changed.
    pub(crate) fn take_notes_stale(&mut self) -> bool {
        std::mem::take(&mut self.notes_stale)
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Starts due probes, waits up to `wait` for results, applies them and passive ejection.
    /// Returns the names of listeners whose set of up backends changed.
    pub(crate) fn step(
        &mut self,
        listeners: &[ControlListener],
        registry: &Registry,
        wait: Duration,
    ) -> Vec<String> {
        let mut changed: Vec<String> = Vec::new();
        let now = Instant::now();
        self.due.clear();
        self.scheduler.due(now, &mut self.due);
        self.ready.due(now, &mut self.due);
        for (id, spec) in &self.due {
            self.prober.start(*id, spec, now);
        }
        let wait = wait
            .min(self.scheduler.next_due_in(now))
            .min(self.ready.next_due_in(now));
        self.done.clear();
        self.prober.advance(Instant::now(), wait, &mut self.done);
        let done = std::mem::take(&mut self.done);
        for (id, outcome) in &done {
            if *id >= READY_IDS {
                self.ready_done(*id, outcome, registry, &mut changed);
                continue;
            }
            let Some((l, addr)) = self.scheduler.target(*id).map(|(l, a)| (l.to_string(), a))
            else {
                continue;
            };
            let stats = registry.get(&l, addr);
            let counter = if outcome.is_up() {
                &stats.control.checks_ok
            } else {
                &stats.control.checks_failed
            };
            bump(counter, 1);
            self.notes_stale |= self.scheduler.last_error_changes(*id, outcome);
            if let Some(flip) = self.scheduler.complete(*id, outcome) {
                bump(&stats.control.flips, 1);
                if flip.up {
                    info!(
                        "listener \"{}\": backend {} is UP: {}",
                        flip.listener, flip.addr, flip.reason
                    );
                } else {
                    warn!(
                        "listener \"{}\": backend {} is DOWN: {}",
                        flip.listener, flip.addr, flip.reason
                    );
                }
                push_unique(&mut changed, &flip.listener);
                self.flap_change(&flip.listener, flip.addr, &stats);
            }
            // An ejected backend comes back early after `rise` good probes in a row.
            let now_ms = self.now_ms(Instant::now());
            if let Some(p) = self.passive.get_mut(&(l.clone(), addr)) {
                if p.state.is_ejected(now_ms) {
                    p.probe_streak = if outcome.is_up() {
                        p.probe_streak + 1
                    } else {
                        0
                    };
                    let rise = self.settings.get(&l).and_then(|s| s.1).unwrap_or(u32::MAX);
                    if p.probe_streak >= rise && p.state.clear() {
                        p.probe_streak = 0;
                        stats.reset_failures();
                        info!(
                            "listener \"{l}\": backend {addr} returns from ejection: {rise} health checks passed"
                        );
                        push_unique(&mut changed, &l);
                    }
                }
            }
        }
        self.done = done;
        self.flap_step(registry, &mut changed);
        self.passive_step(listeners, &mut changed);
        self.notes_stale |= !changed.is_empty();
        changed
    }

    /// Applies a readiness probe's outcome.
    fn ready_done(
        &mut self,
        id: u64,
        outcome: &Outcome,
        registry: &Registry,
        changed: &mut Vec<String>,
    ) {
        let Some((l, addr)) = self.ready.target(id).map(|(l, a)| (l.to_string(), a)) else {
            return;
        };
        let stats = registry.get(&l, addr);
        let counter = if outcome.is_up() {
            &stats.control.checks_ok
        } else {
            &stats.control.checks_failed
        };
        bump(counter, 1);
        self.notes_stale |= self.ready.last_error_changes(id, outcome);
        let Some(flip) = self.ready.complete(id, outcome) else {
            return;
        };
        bump(&stats.control.flips, 1);
        if flip.up {
            info!("listener \"{l}\": backend {addr} is READY: {}", flip.reason);
        } else {
            warn!(
                "listener \"{l}\": backend {addr} is NOT READY (no new connections, open ones kept): {}",
                flip.reason
            );
        }
        push_unique(changed, &l);
        self.flap_change(&l, addr, &stats);
    }

    /// A check changed a backend's state: flap damping counts it, and may hold it down.
    fn flap_change(&mut self, l: &str, addr: SocketAddr, stats: &crate::backend::BackendStats) {
        let Some((rule, _)) = self.rules.get(l).copied() else {
            return;
        };
        let now_ms = self.now_ms(Instant::now());
        let flap = self.flaps.entry((l.to_string(), addr)).or_default();
        if let Some(len) = flap.change(now_ms, &rule) {
            bump(&stats.control.flap_holds, 1);
            warn!(
                "listener \"{l}\": backend {addr} held down for {}s: more than {} state changes within {}s (flap damping, hold #{})",
                len / 1000,
                rule.threshold,
                rule.window_ms / 1000,
                flap.holds()
            );
        }
    }

    /// Ends flap holds that ran out (or renews those of backends still flapping).
    fn flap_step(&mut self, registry: &Registry, changed: &mut Vec<String>) {
        let now_ms = self.now_ms(Instant::now());
        for ((l, addr), flap) in &mut self.flaps {
            let Some((rule, _)) = self.rules.get(l) else {
                continue;
            };
            match flap.tick(now_ms, rule) {
                None => {}
                Some(0) => {
                    info!("listener \"{l}\": backend {addr} released from its flap hold (stable for the last {}s)", rule.window_ms / 1000);
                    push_unique(changed, l);
                }
                Some(len) => {
                    bump(&registry.get(l, *addr).control.flap_holds, 1);
                    warn!(
                        "listener \"{l}\": backend {addr} still flapping: held down again for {}s (flap damping, hold #{})",
                        len / 1000,
                        flap.holds()
                    );
                    self.notes_stale = true;
                }
            }
        }
    }

    /// Ejects backends whose connect-failure streak reached the threshold (never more than
    /// `max_ejected_percent` of a listener's backends) and ends expired ejections.
    fn passive_step(&mut self, listeners: &[ControlListener], changed: &mut Vec<String>) {
        let now_ms = self.now_ms(Instant::now());
        let units = listeners.iter().flat_map(|cl| {
            let snap = cl.published.load_full();
            cl.units
                .iter()
                .enumerate()
                .map(move |(k, u)| (u, snap.clone(), k))
        });
        for (l, snap, k) in units {
            let Some((p, _)) = self.settings.get(&l.name) else {
                continue;
            };
            let Some(pool) = snap.pools.get(k) else {
                continue;
            };
            let p = p.clone();
            let total = l.pools[0].backends.len() as u64;
            let mut ejected = l.pools[0]
                .backends
                .iter()
                .filter(|b| {
                    self.passive
                        .get(&(l.name.clone(), b.address))
                        .is_some_and(|e| e.state.is_ejected(now_ms))
                })
                .count() as u64;
            for m in &pool.members {
                let key = (l.name.clone(), m.address);
                let failures = m.stats.consecutive_failures();
                if failures == 0 && !self.passive.contains_key(&key) {
                    continue;
                }
                let e = self.passive.entry(key).or_default();
                if e.state.expire(now_ms) {
                    m.stats.reset_failures();
                    ejected = ejected.saturating_sub(1);
                    info!(
                        "listener \"{}\": backend {} returns from ejection (time served)",
                        l.name, m.address
                    );
                    push_unique(changed, &l.name);
                    continue;
                }
                let may_eject = (ejected + 1) * 100 <= u64::from(p.max_ejected_percent) * total;
                let base = p.base_ejection_time.as_millis() as u64;
                let max = p.max_ejection_time.as_millis() as u64;
                let streak = u32::try_from(failures).unwrap_or(u32::MAX);
                if e.state
                    .observe(streak, p.consecutive_failures, now_ms, base, max, may_eject)
                {
                    ejected += 1;
                    e.probe_streak = 0;
                    m.stats.reset_failures();
                    bump(&m.stats.control.ejections, 1);
                    let n = e.state.times_ejected();
                    let secs = (base.saturating_mul(1 << (n - 1).min(30))).min(max) / 1000;
                    warn!(
                        "listener \"{}\": backend {} ejected for {}s after {} connect failures in a row (ejection #{})",
                        l.name, m.address, secs, streak, n
                    );
                    push_unique(changed, &l.name);
                }
            }
        }
    }
}

fn push_unique(v: &mut Vec<String>, s: &str) {
    if !v.iter().any(|x| x == s) {
        v.push(s.to_string());
    }
}
