//! Drives health on the control thread: active probes (scheduler + prober from `crate::health`)
//! and passive ejection (the workers' connect-failure streaks, read from `BackendStats`).
//! Decides which backends are up; the control plane republishes the listeners it reports.
//! Must not: touch rings or sockets other than the prober's own.

use crate::backend::{bump, Registry};
use crate::config::{Listener, PassiveConfig};
use crate::control::{BackendNote, ControlListener};
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

pub(crate) struct HealthDriver {
    scheduler: Scheduler,
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
        self.settings = listeners
            .iter()
            .map(|l| {
                let rise = l.health.as_ref().map(|h| h.rise);
                (l.name.clone(), (l.passive.clone(), rise))
            })
            .collect();
        self.passive.retain(|(l, a), _| {
            listeners
                .iter()
                .any(|x| &x.name == l && x.backends.iter().any(|b| b.address == *a))
        });
    }

    /// Up = the active check (if any) says up and the backend is not passively ejected.
    pub(crate) fn is_up(&self, listener: &str, addr: SocketAddr) -> bool {
        let now_ms = self.now_ms(Instant::now());
        let active = self.scheduler.is_up(listener, addr).unwrap_or(true);
        let ejected = self
            .passive
            .get(&(listener.to_string(), addr))
            .is_some_and(|p| p.state.is_ejected(now_ms));
        active && !ejected
    }

    /// What health knows of a backend for `/status` (weight and drain are the caller's).
    pub(crate) fn note(&self, listener: &str, addr: SocketAddr) -> BackendNote {
        let now_ms = self.now_ms(Instant::now());
        let passive = self.passive.get(&(listener.to_string(), addr));
        // The ejection's end on the clock the admin side reads (`process_ms`).
        let ejected_until_ms = passive
            .and_then(|p| p.state.ejected_until(now_ms))
            .map(|end| crate::backend::process_ms() + (end - now_ms));
        BackendNote {
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
        for (id, spec) in &self.due {
            self.prober.start(*id, spec, now);
        }
        let wait = wait.min(self.scheduler.next_due_in(now));
        self.done.clear();
        self.prober.advance(Instant::now(), wait, &mut self.done);
        let done = std::mem::take(&mut self.done);
        for (id, outcome) in &done {
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
        self.passive_step(listeners, &mut changed);
        self.notes_stale |= !changed.is_empty();
        changed
    }

    /// Ejects backends whose connect-failure streak reached the threshold (never more than
    /// `max_ejected_percent` of a listener's backends) and ends expired ejections.
    fn passive_step(&mut self, listeners: &[ControlListener], changed: &mut Vec<String>) {
        let now_ms = self.now_ms(Instant::now());
        for cl in listeners {
            let l = &cl.config;
            let Some((p, _)) = self.settings.get(&l.name) else {
                continue;
            };
            let p = p.clone();
            let snap = cl.published.load();
            let total = l.backends.len() as u64;
            let mut ejected = l
                .backends
                .iter()
                .filter(|b| {
                    self.passive
                        .get(&(l.name.clone(), b.address))
                        .is_some_and(|e| e.state.is_ejected(now_ms))
                })
                .count() as u64;
            for m in &snap.members {
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
