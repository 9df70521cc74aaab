//! The immutable per-listener snapshot (listener settings, the TLS routes, and one
//! [`PoolSnapshot`] per backend pool: backends, weights, health bits, prebuilt balancing tables)
//! and the lock-free publish/read path between the control plane and the workers.
//!
//! Pools and routes are published together behind the listener's one pointer, so a worker never
//! sees routes of one config with pools of another; a health change in one pool rebuilds that
//! pool's members (the others' tables are shared, not rebuilt).
//!
//! The control plane builds a new `Snapshot` and swaps it in with one atomic pointer store
//! (`arc_swap::ArcSwap`); each worker reads through an `arc_swap::Cache`, which costs one atomic
//! load when nothing changed. Per-backend counters are NOT in the snapshot: each entry points at
//! the `BackendStats` the registry keeps by address.
//! Must not: do I/O or know about rings; it is data plus the pick that reads it.

use crate::backend::{BackendStats, ListenerStats, Padded};
use crate::balance::{flow_key, HashKey, PickState, Policy, Tables};
use crate::proxy_protocol::Version as ProxyVersion;
use arc_swap::{ArcSwap, Cache};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Listener-level settings that may change on reload and that workers read per connection.
#[derive(Clone, Debug)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Listener-wide connection cap (one count shared by the workers).
    pub max_connections: u32,
    /// One info line per closed connection.
    pub access_log: bool,
    /// TCP keepalive idle time on both legs (None: off).
    pub tcp_keepalive: Option<Duration>,
    /// How long a client waits for a slot when every eligible backend is full (0: no queue).
    pub queue_timeout: Duration,
    /// Send a PROXY header of this version to the backend before any client byte.
    pub send_proxy: Option<ProxyVersion>,
    /// Expect a PROXY header from the client, within this long.
    pub accept_proxy: Option<Duration>,
    /// Only these peers may send that header (others are closed before it is read); None:
    /// every peer.
    pub proxy_trusted: Option<Arc<[crate::proxy_protocol::Cidr]>>,
    /// Connections to a removed backend (or of a removed listener) are closed this long after
    /// the removal; None: they run until they end.
    pub drain_timeout: Option<Duration>,
    /// Close open connections to a backend once it is marked down (`on_backend_down = "close"`).
    pub close_on_backend_down: bool,
    /// `drain_mode = "postgres"`: follow each connection's PostgreSQL framing and close a
    /// session of a drained, not ready or removed backend when it goes idle.
    pub drain_postgres: bool,
    /// UDP: flows per listener (each worker takes its share).
    pub max_flows: u32,
}

/// How a TLS passthrough listener reads ClientHellos (present only when some route has a
/// condition: a listener whose only route is the default never reads one).
#[derive(Debug)]
pub struct Inspect {
    pub table: crate::tls::RouteTable,
    /// How long a client may take to send its whole ClientHello.
    pub timeout: Duration,
    /// The longest ClientHello read (record headers included).
    pub max_bytes: usize,
}

/// What [`Snapshot::pick`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Index into `members`.
    Member(usize),
    /// Every eligible backend is at its `max_connections`: the client may queue.
    AllFull,
    /// No backend is eligible (all down, drained, or already tried).
    None,
}

impl Member {
    /// At its connection cap (counted across workers).
    pub fn is_full(&self) -> bool {
        self.max_connections
            .is_some_and(|max| self.stats.active() >= u64::from(max))
    }
}

/// Where a backend stands, for `/status` and `ringlb_backend_state` (the pickers read `up`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    /// Eligible for new connections.
    Up,
    /// Live but its readiness check fails: no new connections, open ones kept.
    NotReady,
    /// Its liveness check fails, or flap damping holds it down: open ones closed per
    /// `on_backend_down`.
    Down,
    /// Weight 0 (config or admin drain): no new connections, open ones kept.
    Drained,
    /// Passively ejected after connect failures.
    Ejected,
}

impl BackendState {
    pub const ALL: [BackendState; 5] = [
        BackendState::Up,
        BackendState::NotReady,
        BackendState::Down,
        BackendState::Drained,
        BackendState::Ejected,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::NotReady => "not_ready",
            BackendState::Down => "down",
            BackendState::Drained => "drained",
            BackendState::Ejected => "ejected",
        }
    }
}

/// One backend as a snapshot sees it.
#[derive(Debug)]
pub struct Member {
    pub address: SocketAddr,
    /// The configured weight (0 while drained); the pickers use the tables' weights, which
    /// slow start ramps.
    pub weight: u32,
    /// Health bit: pickers never choose a member that is down, not ready, ejected or held.
    pub up: bool,
    pub state: BackendState,
    /// Slow start: the share of its weight (10–100%) this snapshot gives it; 100 = not ramping.
    pub ramp_percent: u32,
    /// Per-backend connection cap (pickers skip a full backend).
    pub max_connections: Option<u32>,
    /// `backup = true` in the config.
    pub backup: bool,
    /// Not in the pool's serving tier: a backup while some non-backup backend is eligible, or a
    /// non-backup while only backups serve. Pickers skip it and its table weight is 0, so every
    /// policy (Maglev included) balances over the serving tier alone.
    pub standby: bool,
    pub stats: Arc<BackendStats>,
}

/// One backend pool as a snapshot sees it.
pub struct PoolSnapshot {
    /// The pool's name (`default` for a listener's own backends): the metrics' `pool` label.
    pub name: Arc<str>,
    pub hash_key: HashKey,
    pub members: Vec<Member>,
    /// Shared between snapshots whose (address, weight) list and policy are unchanged (a
    /// health flip republishes without rebuilding a Maglev table).
    pub tables: Arc<Tables>,
    /// Round-robin ticket shared by the workers: one relaxed add per pick makes smooth WRR
    /// global across workers (as HAProxy's `roundrobin` is), at the cost of one shared line.
    /// Kept by the control plane across republishes of the pool.
    pub rr_ticket: Arc<Padded<AtomicU64>>,
}

impl PoolSnapshot {
    /// Picks a member for a client, skipping down or full members and the addresses in `tried`.
    pub fn pick(
        &self,
        st: &mut PickState,
        client: Option<&SocketAddr>,
        tried: &[SocketAddr],
    ) -> Pick {
        let key = match client {
            Some(c) => flow_key(c, self.hash_key),
            None => 0,
        };
        let members = &self.members;
        if self.tables.policy() == Policy::RoundRobin {
            st.set_rr_cursor(self.rr_ticket.0.fetch_add(1, Ordering::Relaxed));
        }
        let picked = self.tables.pick(
            st,
            key,
            |i| {
                let m = &members[i];
                m.up && !m.standby && !m.is_full() && !tried.contains(&m.address)
            },
            |i| members[i].stats.active(),
        );
        match picked {
            Some(i) => Pick::Member(i),
            None if members.iter().any(|m| {
                m.up && !m.standby && m.weight > 0 && m.is_full() && !tried.contains(&m.address)
            }) =>
            {
                Pick::AllFull
            }
            None => Pick::None,
        }
    }

    /// Number of members currently up.
    pub fn up_count(&self) -> usize {
        self.members.iter().filter(|m| m.up).count()
    }
}

/// Everything a worker needs to place a connection of one listener.
pub struct Snapshot {
    /// Increases by one on every publish of this listener.
    pub generation: u64,
    pub listener: Arc<str>,
    pub settings: Settings,
    /// At least one; indexes are the routes' pool numbers. A pool index a connection holds may
    /// name another pool after a reload (pools reordered); it is re-checked against the length.
    pub pools: Vec<PoolSnapshot>,
    /// The pool of a connection no route chose: without routes the only pool; with routes the
    /// default route's (`None`: no default route, such connections are closed).
    pub default_pool: Option<usize>,
    /// Set when the listener reads ClientHellos to route by.
    pub inspect: Option<Arc<Inspect>>,
    pub listener_stats: Arc<ListenerStats>,
}

impl Snapshot {
    /// Picks a member of pool `pool` (`Pick::None` for a pool index that no longer exists).
    pub fn pick(
        &self,
        pool: usize,
        st: &mut PickState,
        client: Option<&SocketAddr>,
        tried: &[SocketAddr],
    ) -> Pick {
        match self.pools.get(pool) {
            Some(p) => p.pick(st, client, tried),
            None => Pick::None,
        }
    }

    /// Every member of every pool.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.pools.iter().flat_map(|p| p.members.iter())
    }

    /// Number of members currently up (all pools).
    pub fn up_count(&self) -> usize {
        self.pools.iter().map(PoolSnapshot::up_count).sum()
    }

    /// Number of members (all pools).
    pub fn member_count(&self) -> usize {
        self.pools.iter().map(|p| p.members.len()).sum()
    }
}

/// The published pointer for one listener.
pub type Published = Arc<ArcSwap<Snapshot>>;

/// A worker's cached view of one listener's published snapshot.
pub struct Reader {
    cache: Cache<Published, Arc<Snapshot>>,
}

impl Reader {
    pub fn new(published: Published) -> Reader {
        Reader {
            cache: Cache::new(published),
        }
    }

    /// The latest snapshot (one atomic load when unchanged).
    pub fn load(&mut self) -> &Arc<Snapshot> {
        self.cache.load()
    }
}
