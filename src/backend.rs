//! Backend identity (its address) and the per-backend counters that live OUTSIDE snapshots, so a
//! republish or a reload never resets them.
//!
//! `active` is the one counter every worker writes (least_connections needs a global count, and a
//! connection counts from the moment it is assigned). Everything else is per worker: each worker
//! writes only its own cache-line-padded slot and the admin side sums them at scrape time.
//! Must not: do I/O, take locks on the data path, or know about rings or config files.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Milliseconds since the process's time origin (set by the first call; the runtime calls it at
/// start). The clock every thread uses for timestamps it shares (heartbeats, removal times).
pub fn process_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Pads a value to its own cache lines so two workers never write the same line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

/// Counters one worker keeps for one backend. Written only by that worker (relaxed adds on a line
/// no other core writes), read by the admin side.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    /// Connections established to this backend.
    pub connections: AtomicU64,
    /// Bytes client → backend.
    pub bytes_up: AtomicU64,
    /// Bytes backend → client.
    pub bytes_down: AtomicU64,
    /// Connect attempts refused (ECONNREFUSED).
    pub connect_refused: AtomicU64,
    /// Connect attempts that hit `connect_timeout`.
    pub connect_timeout: AtomicU64,
    /// Connect attempts that failed otherwise (unreachable, reset during handshake, ...).
    pub connect_other: AtomicU64,
    /// UDP datagrams client → backend.
    pub datagrams_up: AtomicU64,
    /// UDP datagrams backend → client.
    pub datagrams_down: AtomicU64,
}

/// Adds `n` to a counter only this thread writes: a relaxed add, no fence.
pub fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Per-backend state shared by every snapshot that lists the backend.
#[derive(Debug)]
pub struct BackendStats {
    pub address: SocketAddr,
    active: Padded<AtomicI64>,
    /// Connect failures in a row, across workers (passive health). Workers add on failure and
    /// reset on success only when non-zero, so the healthy path does not write this line.
    consecutive_failures: Padded<AtomicU64>,
    workers: Box<[Padded<WorkerCounters>]>,
    /// Written by the control plane only.
    pub control: ControlCounters,
    /// The health bit of the latest published snapshot (UDP flows re-pick when it drops).
    up: std::sync::atomic::AtomicBool,
    /// When the backend was removed from its listener by a reload (ms since the process epoch,
    /// +1 so that 0 means "present"). Workers close its connections `drain_timeout` later.
    removed_at: AtomicU64,
    /// Since when the backend is drained or not ready (ms since the process epoch, +1; 0: it
    /// is not). `drain_mode = "postgres"` closes its sessions at idle from then on.
    winding_down: AtomicU64,
}

/// Counters the control plane keeps per backend (health checks, flips, ejections).
#[derive(Debug, Default)]
pub struct ControlCounters {
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
    pub flips: AtomicU64,
    pub ejections: AtomicU64,
    /// Flap damping holds started (`ringlb_backend_flap_holds_total`).
    pub flap_holds: AtomicU64,
}

impl BackendStats {
    pub fn new(address: SocketAddr, workers: usize) -> BackendStats {
        BackendStats {
            address,
            active: Padded(AtomicI64::new(0)),
            consecutive_failures: Padded(AtomicU64::new(0)),
            workers: (0..workers.max(1)).map(|_| Padded::default()).collect(),
            control: ControlCounters::default(),
            removed_at: AtomicU64::new(0),
            winding_down: AtomicU64::new(0),
            up: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Mirrors the published health bit (control plane, on every publish).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }

    /// Up in the latest published snapshot.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Marks the backend removed at `now_ms` (ms since the process epoch), or present again.
    pub fn set_removed(&self, now_ms: Option<u64>) {
        self.removed_at
            .store(now_ms.map_or(0, |t| t + 1), Ordering::Relaxed);
    }

    /// When the backend was removed (ms since the process epoch), if it was.
    pub fn removed_at(&self) -> Option<u64> {
        match self.removed_at.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t - 1),
        }
    }

    /// The backend is drained or not ready (`true`) as of `now_ms`, or eligible again; the
    /// first time of a run of `true`s is kept (control plane, on every publish).
    pub fn set_winding_down(&self, winding_down: bool, now_ms: u64) {
        if !winding_down {
            self.winding_down.store(0, Ordering::Relaxed);
        } else if self.winding_down.load(Ordering::Relaxed) == 0 {
            self.winding_down.store(now_ms + 1, Ordering::Relaxed);
        }
    }

    /// Since when this backend takes no new connections but keeps its open ones (drained, not
    /// ready, or removed by a reload; ms since the process epoch), if it does.
    pub fn winding_down_since(&self) -> Option<u64> {
        let w = match self.winding_down.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t - 1),
        };
        match (w, self.removed_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A connect to this backend failed (any worker).
    pub fn connect_failed(&self) {
        self.consecutive_failures.0.fetch_add(1, Ordering::Relaxed);
    }

    /// A connect to this backend succeeded: resets the failure streak (no write when already 0).
    pub fn connect_succeeded(&self) {
        if self.consecutive_failures.0.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.0.store(0, Ordering::Relaxed);
        }
    }

    /// Connect failures in a row.
    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures.0.load(Ordering::Relaxed)
    }

    /// Forgets the failure streak (an ejection ended).
    pub fn reset_failures(&self) {
        self.consecutive_failures.0.store(0, Ordering::Relaxed);
    }

    /// Active connections across all workers (assigned and not yet closed).
    pub fn active(&self) -> u64 {
        self.active.0.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn inc_active(&self) {
        self.active.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec_active(&self) {
        self.active.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Adds (or, negative, takes away) connections another process carries to this backend: a
    /// binary upgrade's previous process while it drains (`crate::upgrade`).
    pub fn add_active(&self, n: i64) {
        self.active.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters of worker `id` (the calling worker's own slot).
    pub fn worker(&self, id: usize) -> &WorkerCounters {
        &self.workers[id % self.workers.len()].0
    }

    /// Sum of one counter over all workers (scrape time).
    pub fn sum(&self, f: impl Fn(&WorkerCounters) -> &AtomicU64) -> u64 {
        self.workers
            .iter()
            .map(|w| f(&w.0).load(Ordering::Relaxed))
            .sum()
    }
}

/// Counters one worker keeps for one listener.
#[derive(Debug, Default)]
pub struct ListenerWorkerCounters {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed because no backend was eligible (all down, full, or all attempts failed).
    pub no_backend: AtomicU64,
    /// Connections open right now on this worker.
    pub active: AtomicU64,
    /// Closed connections by reason (index: `CLOSE_REASONS`).
    pub closes: [AtomicU64; CLOSE_REASONS.len()],
    /// UDP flows open on this worker (gauge).
    pub udp_flows: AtomicU64,
    /// UDP flows evicted because the table was full.
    pub udp_evicted: AtomicU64,
    /// UDP datagrams dropped (no backend, socket errors).
    pub udp_dropped: AtomicU64,
    /// New UDP flows refused: the table was full of flows active in the last second, or UDP
    /// reached its share of the descriptor limit.
    pub udp_refused: AtomicU64,
    /// TLS passthrough: ClientHello reads by outcome (index: `TLS_INSPECT_RESULTS`).
    pub tls_inspect: [AtomicU64; TLS_INSPECT_RESULTS.len()],
    /// TLS passthrough: connections closed because no route took them (no default route).
    pub tls_no_route: AtomicU64,
}

/// Close-reason labels, in the order of `ListenerWorkerCounters::closes` (the worker maps its
/// `CloseReason` to an index with `close_index`).
pub const CLOSE_REASONS: [&str; 19] = [
    "client_eof",
    "backend_eof",
    "client_reset",
    "backend_reset",
    "backend_refused",
    "backend_timeout",
    "backend_error",
    "no_backend",
    "idle_timeout",
    "draining",
    "resource",
    "queue_timeout",
    "bad_proxy_header",
    "backend_down",
    "client_aborted",
    "over_limit",
    "untrusted_proxy",
    "drain_idle",
    "no_route",
];

/// `ringlb_tls_inspect_total{result}` labels, in the order of
/// `ListenerWorkerCounters::tls_inspect`: a ClientHello with a server name, one without (or
/// with a name that is not a valid host name), bytes that are not TLS, a hello longer than
/// `max_bytes`, a broken hello, a client that sent no whole hello within the timeout, and one
/// that closed its side before the hello was complete.
pub const TLS_INSPECT_RESULTS: [&str; 7] = [
    "sni",
    "no_sni",
    "not_tls",
    "too_large",
    "malformed",
    "timeout",
    "eof",
];

/// Per-listener counters, outside snapshots, per worker.
#[derive(Debug)]
pub struct ListenerStats {
    workers: Box<[Padded<ListenerWorkerCounters>]>,
    /// Maglev slots moved by rebuilds (control plane).
    pub slots_moved: AtomicU64,
    /// Client connections open on the listener across all workers: `max_connections` is a
    /// listener-wide limit (one shared line written per connection open and close).
    open: Padded<AtomicU64>,
    /// Round-robin ticket shared by the workers: one relaxed add per pick makes smooth WRR
    /// global across workers (as HAProxy's `roundrobin` is), at the cost of one shared line.
    rr_ticket: Padded<AtomicU64>,
}

impl ListenerStats {
    pub fn new(workers: usize) -> ListenerStats {
        ListenerStats {
            workers: (0..workers.max(1)).map(|_| Padded::default()).collect(),
            slots_moved: AtomicU64::new(0),
            rr_ticket: Padded(AtomicU64::new(0)),
            open: Padded(AtomicU64::new(0)),
        }
    }

    /// A client connection opened; returns how many are open now (all workers).
    pub fn opened(&self) -> u64 {
        self.open.0.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A client connection closed; returns how many are open now (all workers).
    pub fn closed(&self) -> u64 {
        self.open
            .0
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1)
    }

    /// Client connections open now (all workers).
    pub fn open_now(&self) -> u64 {
        self.open.0.load(Ordering::Relaxed)
    }

    /// Takes the next round-robin ticket.
    pub fn next_rr_ticket(&self) -> u64 {
        self.rr_ticket.0.fetch_add(1, Ordering::Relaxed)
    }
    pub fn worker(&self, id: usize) -> &ListenerWorkerCounters {
        &self.workers[id % self.workers.len()].0
    }
    pub fn sum(&self, f: impl Fn(&ListenerWorkerCounters) -> &AtomicU64) -> u64 {
        self.workers
            .iter()
            .map(|w| f(&w.0).load(Ordering::Relaxed))
            .sum()
    }
}

/// Control-plane registry: one `BackendStats` per (listener, address), kept across republishes and
/// reloads so counters carry over by backend address. Only the control plane touches it.
#[derive(Debug)]
pub struct Registry {
    workers: usize,
    entries: Mutex<hashbrown::HashMap<(String, SocketAddr), Arc<BackendStats>>>,
}

impl Registry {
    pub fn new(workers: usize) -> Registry {
        Registry {
            workers,
            entries: Mutex::new(hashbrown::HashMap::new()),
        }
    }

    /// The stats for a backend of a listener, created on first use.
    pub fn get(&self, listener: &str, address: SocketAddr) -> Arc<BackendStats> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .entry((listener.to_string(), address))
            .or_insert_with(|| Arc::new(BackendStats::new(address, self.workers)))
            .clone()
    }

    /// Every (listener, stats) known, including backends removed from the config that still
    /// have connections.
    /// Forgets backends that are no longer configured (`keep` says false) once their last
    /// connection closed, so removed backends do not stay in the metrics forever.
    pub fn prune(&self, keep: impl Fn(&str, SocketAddr) -> bool) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(l, a), s| keep(l, *a) || s.active() > 0);
    }

    /// Sorted by listener then address, so scrapes are stable.
    pub fn all(&self) -> Vec<(String, Arc<BackendStats>)> {
        let mut v: Vec<(String, Arc<BackendStats>)> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|((l, _), s)| (l.clone(), s.clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, a.1.address).cmp(&(&b.0, b.1.address)));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn winding_down_keeps_its_first_time_and_counts_a_removal() {
        let b = BackendStats::new("127.0.0.1:1".parse().unwrap(), 1);
        assert_eq!(b.winding_down_since(), None);
        b.set_winding_down(true, 0);
        b.set_winding_down(true, 500);
        assert_eq!(
            b.winding_down_since(),
            Some(0),
            "the first publish that said so"
        );
        b.set_winding_down(false, 600);
        assert_eq!(b.winding_down_since(), None);
        b.set_removed(Some(700));
        assert_eq!(b.winding_down_since(), Some(700));
        b.set_winding_down(true, 800);
        assert_eq!(b.winding_down_since(), Some(700), "the earlier of the two");
    }

    #[test]
    fn registry_keeps_counters_by_address() {
        let r = Registry::new(2);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let s1 = r.get("web", a);
        s1.inc_active();
        bump(&s1.worker(1).connections, 3);
        let s2 = r.get("web", a);
        assert!(Arc::ptr_eq(&s1, &s2));
        assert_eq!(s2.active(), 1);
        assert_eq!(s2.sum(|w| &w.connections), 3);
        assert!(!Arc::ptr_eq(&s1, &r.get("db", a)));
    }
}
