//! Health checking: which backends are up, as seen by active probes ([`probe`]) and by the
//! workers' connect failures ([`state::Passive`]).
//!
//! Owns the probe schedule ([`Scheduler`]: which (listener, backend) is probed when, rise/fall
//! per target, counts for metrics), the prober and the pure state machines. It has no threads of
//! its own: the control thread drives it (`due` → [`Prober::start`] → [`Prober::advance`] →
//! `complete`) and turns [`Flip`]s into snapshot republishes. It must not touch worker rings or
//! snapshots, and [`state`] stays free of I/O and clocks.

pub mod flap;
pub mod http;
pub mod probe;
pub mod ramp;
pub mod state;

#[cfg(test)]
mod probe_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod udp_probe_tests;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::balance::hash::{addr_bytes, hash64};
use crate::config::{Listener, Protocol};

pub use probe::{Outcome, ProbeSpec, Prober};
pub use state::{Active, Passive};

/// Seed of the per-target schedule offset ("ringlb.h").
const JITTER_SEED: u64 = 0x7269_6e67_6c62_2e68;
/// What [`Scheduler::next_due_in`] answers when nothing is scheduled.
pub const IDLE_WAIT: Duration = Duration::from_secs(60);

/// One (listener, backend) to probe, with its listener's health settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub listener: String,
    pub addr: SocketAddr,
    pub interval: Duration,
    pub rise: u32,
    pub fall: u32,
    pub timeout: Duration,
    pub send: Option<Vec<u8>>,
    pub expect: Option<Vec<u8>>,
    /// Probe over UDP (the listener's protocol is udp): `send` as a datagram, a reply datagram
    /// starting with `expect` (both always set then, config validation sees to it).
    pub udp: bool,
    /// An HTTP check instead of `send`/`expect`.
    pub http: Option<crate::config::HttpCheck>,
    /// Probe here instead of `addr` (the block's `port` / `address`); `addr` stays the
    /// backend's identity.
    pub probe_at: Option<SocketAddr>,
    /// A readiness target: starts not ready, its first probe decides at once (then rise/fall),
    /// and that first probe is not spread over the interval (nothing is served until it).
    pub readiness: bool,
}

/// The targets of a config: every backend of every listener with a `[listeners.health]` table,
/// in config order (what [`Scheduler::set_targets`] takes at start and on reload).
pub fn targets(listeners: &[Listener]) -> Vec<Target> {
    block_targets(listeners, false)
}

/// The readiness targets: every backend of every listener with a `[listeners.health.ready]`.
pub fn ready_targets(listeners: &[Listener]) -> Vec<Target> {
    block_targets(listeners, true)
}

fn block_targets(listeners: &[Listener], readiness: bool) -> Vec<Target> {
    listeners
        .iter()
        .filter_map(|l| {
            let h = l.pools.first()?.health.as_ref()?;
            let h = if readiness { h.ready.as_deref()? } else { h };
            Some((l, h))
        })
        .flat_map(|(l, h)| {
            l.pools
                .iter()
                .flat_map(|p| p.backends.iter())
                .map(move |b| Target {
                    listener: l.name.clone(),
                    addr: b.address,
                    interval: h.interval,
                    rise: h.rise,
                    fall: h.fall,
                    timeout: h.timeout,
                    send: h.send.clone(),
                    expect: h.expect.clone(),
                    udp: l.protocol == Protocol::Udp,
                    http: h.http.clone(),
                    probe_at: (!h.target.is_default()).then(|| h.target.apply(b.address)),
                    readiness,
                })
        })
        .collect()
}

impl Target {
    fn spec(&self) -> ProbeSpec {
        ProbeSpec {
            addr: self.probe_at.unwrap_or(self.addr),
            timeout: self.timeout,
            send: self.send.clone(),
            expect: self.expect.clone(),
            udp: self.udp,
            http: self.http.clone(),
        }
    }

    /// A fixed offset in `[0, interval)` from the target's identity: the same in every run, and
    /// spread evenly over the interval across targets, so first probes do not all fire at once.
    fn offset(&self) -> Duration {
        if self.readiness {
            return Duration::ZERO;
        }
        let interval = self.interval.as_nanos().max(1);
        let (buf, len) = addr_bytes(&self.addr, true);
        let seed = hash64(JITTER_SEED, self.listener.as_bytes());
        let h = u128::from(hash64(seed, &buf[..len]));
        // h % interval < interval ≤ Duration's range.
        Duration::from_nanos(u64::try_from(h % interval).unwrap_or(0))
    }
}

/// A target changed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flip {
    pub listener: String,
    pub addr: SocketAddr,
    pub up: bool,
    /// Down: the last probe's failure and the streak; up: the streak.
    pub reason: String,
}

struct Entry {
    target: Target,
    active: Active,
    next_due: Instant,
    in_flight: bool,
    ok: u64,
    failed: u64,
    /// The last probe's failure (`Outcome::Down`'s text); `None` after a success or before the
    /// first probe (what `/status` shows as why a backend is down).
    last_error: Option<String>,
    /// A readiness target whose first probe has not completed yet.
    undecided: bool,
}

/// Decides which probe is due when, and keeps each target's rise/fall state and counts.
/// Target ids are never reused: a completion for a target removed (or removed and re-added) in
/// the meantime is recognised and ignored.
#[derive(Default)]
pub struct Scheduler {
    /// By id; ids increase in the order targets were first seen, so iteration follows the config.
    entries: BTreeMap<u64, Entry>,
    /// listener → backend address → id.
    ids: HashMap<String, HashMap<SocketAddr, u64>>,
    next_id: u64,
}

impl Scheduler {
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    /// A scheduler whose target ids start at `first` (two schedulers sharing one prober keep
    /// their ids apart this way).
    pub fn with_ids_from(first: u64) -> Scheduler {
        Scheduler {
            next_id: first,
            ..Scheduler::default()
        }
    }

    /// Replaces the set of targets (at start and on reload). A (listener, address) that persists
    /// keeps its id, rise/fall state, counts and place in the schedule (re-placed only if its
    /// interval changed) and takes the new settings; new ones start up and get their first probe
    /// at their fixed offset into the interval; a probe in flight for a removed target is ignored
    /// when it completes.
    pub fn set_targets(&mut self, targets: Vec<Target>, now: Instant) {
        let mut old_ids = std::mem::take(&mut self.ids);
        let mut entries = BTreeMap::new();
        for target in targets {
            let kept = old_ids
                .get_mut(&target.listener)
                .and_then(|m| m.remove(&target.addr))
                .and_then(|id| self.entries.remove(&id).map(|e| (id, e)));
            let (id, entry) = match kept {
                Some((id, mut e)) => {
                    if e.target.interval != target.interval {
                        e.next_due = now + target.offset();
                    }
                    e.target = target;
                    (id, e)
                }
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    let next_due = now + target.offset();
                    let entry = Entry {
                        undecided: target.readiness,
                        active: Active::new(!target.readiness),
                        target,
                        next_due,
                        in_flight: false,
                        ok: 0,
                        failed: 0,
                        last_error: None,
                    };
                    (id, entry)
                }
            };
            let by_addr = self.ids.entry(entry.target.listener.clone()).or_default();
            // A duplicate (listener, address) keeps its first entry.
            if by_addr.contains_key(&entry.target.addr) {
                continue;
            }
            by_addr.insert(entry.target.addr, id);
            entries.insert(id, entry);
        }
        self.entries = entries;
    }

    /// Appends every probe due at `now` (and not still in flight) and schedules each one's next
    /// probe one interval later (or one interval from now, if the schedule fell behind).
    pub fn due(&mut self, now: Instant, out: &mut Vec<(u64, ProbeSpec)>) {
        for (id, e) in &mut self.entries {
            if e.in_flight || e.next_due > now {
                continue;
            }
            out.push((*id, e.target.spec()));
            e.in_flight = true;
            e.next_due += e.target.interval;
            if e.next_due <= now {
                e.next_due = now + e.target.interval;
            }
        }
    }

    /// Time until the next probe is due (zero if one is overdue); [`IDLE_WAIT`] if none is
    /// scheduled. Targets with a probe in flight are not counted: their completion comes first.
    pub fn next_due_in(&self, now: Instant) -> Duration {
        self.entries
            .values()
            .filter(|e| !e.in_flight)
            .map(|e| e.next_due.saturating_duration_since(now))
            .min()
            .unwrap_or(IDLE_WAIT)
            .min(IDLE_WAIT)
    }

    /// Records a probe's outcome. Returns a [`Flip`] when the target changes state; `None`
    /// otherwise, and for ids that are not (or no longer) targets.
    pub fn complete(&mut self, id: u64, outcome: &Outcome) -> Option<Flip> {
        let e = self.entries.get_mut(&id)?;
        e.in_flight = false;
        let t = &e.target;
        match outcome {
            Outcome::Up => {
                e.ok += 1;
                e.last_error = None;
            }
            Outcome::Down(why) => {
                e.failed += 1;
                if e.last_error.as_deref() != Some(why.as_str()) {
                    e.last_error = Some(why.clone());
                }
            }
        }
        let up = if std::mem::take(&mut e.undecided) {
            // A readiness target's first probe decides at once (it started not ready).
            e.active = Active::new(outcome.is_up());
            if !outcome.is_up() {
                return None;
            }
            true
        } else {
            e.active.record(outcome.is_up(), t.rise, t.fall)?
        };
        let reason = match outcome {
            Outcome::Up if e.active.is_up() && t.readiness && e.ok == 1 => {
                "the first check passed".to_string()
            }
            Outcome::Up => format!("{} checks passed in a row", t.rise.max(1)),
            Outcome::Down(why) => format!("{why} ({} checks failed in a row)", t.fall.max(1)),
        };
        Some(Flip {
            listener: t.listener.clone(),
            addr: t.addr,
            up,
            reason,
        })
    }

    /// The active-check verdict on a backend; `None` if it is not a target (its listener has no
    /// health checks, or the address is not one of its backends).
    pub fn is_up(&self, listener: &str, addr: SocketAddr) -> Option<bool> {
        let id = self.ids.get(listener)?.get(&addr)?;
        self.entries.get(id).map(|e| e.active.is_up())
    }

    /// The last probe's failure for a target (`None`: the last probe passed, none ran yet, or
    /// it is not a target).
    pub fn last_error(&self, listener: &str, addr: SocketAddr) -> Option<&str> {
        let id = self.ids.get(listener)?.get(&addr)?;
        self.entries.get(id)?.last_error.as_deref()
    }

    /// Whether recording `outcome` for target `id` would change its [`Scheduler::last_error`]
    /// (so the caller knows its published view of the errors went stale).
    pub fn last_error_changes(&self, id: u64, outcome: &Outcome) -> bool {
        let Some(e) = self.entries.get(&id) else {
            return false;
        };
        match outcome {
            Outcome::Up => e.last_error.is_some(),
            Outcome::Down(why) => e.last_error.as_deref() != Some(why.as_str()),
        }
    }

    /// (listener, backend, probes passed, probes failed) for every target, in config order:
    /// the `ringlb_health_checks_total{result="ok"|"failed"}` counters. Counts survive reloads
    /// for targets that persist.
    pub fn counts(&self) -> impl Iterator<Item = (&str, SocketAddr, u64, u64)> {
        self.entries
            .values()
            .map(|e| (e.target.listener.as_str(), e.target.addr, e.ok, e.failed))
    }

    /// The (listener, backend address) of a target id, if it is still a target.
    pub fn target(&self, id: u64) -> Option<(&str, SocketAddr)> {
        self.entries
            .get(&id)
            .map(|e| (e.target.listener.as_str(), e.target.addr))
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
