//! What the control thread publishes for the admin endpoint besides snapshots: reload counters,
//! whether a reload is running, the admin token of the running config, and per backend why it
//! is down or drained. The admin side reads all of it without waiting for the control thread, so
//! `/livez`, `/metrics` and `/status` answer while a reload takes seconds.
//! Must not: hold anything the data plane reads, or block (atomics and `ArcSwap` only).

use crate::config::AdminToken;
use arc_swap::{ArcSwap, ArcSwapOption};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a backend is (or is not) serving, beyond the up bit and weight of its snapshot entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendNote {
    /// The weight in the config (the snapshot's is 0 while drained).
    pub configured_weight: u32,
    /// Drained through the admin endpoint (`POST /backends/.../drain`).
    pub drained: bool,
    /// The active health check says down.
    pub check_down: bool,
    /// The last active probe's failure; `None` after a passing probe, or without checks.
    pub last_probe_error: Option<String>,
    /// Passively ejected until this `process_ms()` time.
    pub ejected_until_ms: Option<u64>,
    /// Ejections that still count towards doubling the next one.
    pub times_ejected: u32,
    /// The readiness check says not ready.
    pub not_ready: bool,
    /// The last readiness probe's failure.
    pub ready_probe_error: Option<String>,
    /// Flap damping holds it down until this `process_ms()` time.
    pub held_until_ms: Option<u64>,
    /// Flap holds that still count towards doubling the next one.
    pub flap_holds: u32,
}

/// (listener, backend) → note, for every configured backend.
pub type Notes = HashMap<(String, SocketAddr), BackendNote>;

/// Shared between the control thread (writer) and the admin endpoint (reader).
pub struct Report {
    /// `process_ms() + 1` when the reload in progress started; 0 when none runs.
    reload_started: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    /// The last reload succeeded (true at start).
    last_ok: AtomicBool,
    /// Unix time (ms) the running config was loaded: at start, then at each successful reload.
    last_success_unix_ms: AtomicU64,
    token: ArcSwapOption<AdminToken>,
    notes: ArcSwap<Notes>,
    /// Every DNS name a pool resolves: counts, backends, what went wrong.
    dns: ArcSwap<Vec<super::dns::DnsStatus>>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Report {
    /// Publishes the DNS names' state (control thread; skipped when unchanged).
    pub fn set_dns(&self, status: Vec<super::dns::DnsStatus>) {
        if **self.dns.load() != status {
            self.dns.store(Arc::new(status));
        }
    }

    pub fn dns(&self) -> Arc<Vec<super::dns::DnsStatus>> {
        self.dns.load_full()
    }

    /// The report of a config just loaded at start.
    pub fn new(token: Option<AdminToken>) -> Report {
        Report {
            reload_started: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_ok: AtomicBool::new(true),
            last_success_unix_ms: AtomicU64::new(unix_ms()),
            token: ArcSwapOption::new(token.map(Arc::new)),
            notes: ArcSwap::from_pointee(Notes::new()),
            dns: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// How long (ms) the reload in progress has been running at `now_ms` (`process_ms()`).
    pub fn reload_running_for(&self, now_ms: u64) -> Option<u64> {
        match self.reload_started.load(Ordering::Relaxed) {
            0 => None,
            t => Some(now_ms.saturating_sub(t - 1)),
        }
    }

    /// Successful and failed reloads so far (`ringlb_reloads_total`).
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        )
    }

    /// Whether the last reload succeeded (true before the first).
    pub fn last_reload_ok(&self) -> bool {
        self.last_ok.load(Ordering::Relaxed)
    }

    /// When the running config was loaded, in Unix seconds.
    pub fn last_success_unix_seconds(&self) -> f64 {
        self.last_success_unix_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }

    /// The token every `POST` must present, if the running config has a `token_file`.
    pub fn token(&self) -> Option<Arc<AdminToken>> {
        self.token.load_full()
    }

    /// Per-backend notes as last published.
    pub fn notes(&self) -> Arc<Notes> {
        self.notes.load_full()
    }

    /// A reload starts (the control thread, at `now_ms` = `process_ms()`).
    pub fn reload_started(&self, now_ms: u64) {
        self.reload_started.store(now_ms + 1, Ordering::Relaxed);
    }

    /// A reload ended; a successful one brings the new config's token.
    pub(super) fn reload_finished(&self, ok: Option<Option<AdminToken>>) {
        self.last_ok.store(ok.is_some(), Ordering::Relaxed);
        match ok {
            Some(token) => {
                self.token.store(token.map(Arc::new));
                self.last_success_unix_ms
                    .store(unix_ms(), Ordering::Relaxed);
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.reload_started.store(0, Ordering::Relaxed);
    }

    pub(super) fn set_notes(&self, notes: Notes) {
        self.notes.store(Arc::new(notes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_are_counted_and_timed() {
        let r = Report::new(None);
        assert_eq!(r.reloads(), (0, 0));
        assert!(r.last_success_unix_seconds() > 1.6e9, "set at start");
        assert_eq!(r.reload_running_for(100), None);
        r.reload_started(100);
        assert_eq!(r.reload_running_for(350), Some(250));
        assert!(r.last_reload_ok());
        r.reload_finished(None);
        assert!(!r.last_reload_ok());
        assert_eq!(r.reload_running_for(400), None);
        assert_eq!(r.reloads(), (0, 1));
        assert!(r.token().is_none());
        r.reload_started(0);
        assert_eq!(
            r.reload_running_for(0),
            Some(0),
            "a reload at time 0 still counts"
        );
        r.reload_finished(Some(None));
        assert_eq!(r.reloads(), (1, 1));
        assert!(r.last_reload_ok());
    }
}
