//! DNS discovery state on the control thread: for every name a pool resolves (its `discovery`
//! query or a host-name backend), the last good set of backends, when it is due again, and the
//! `hold` on empty answers; what `/metrics`, `/status` and `/readyz` say about it.
//!
//! Semantics (Envoy STRICT_DNS, HAProxy `resolvers` with `hold`): a failed resolution (SERVFAIL,
//! timeout, no server) keeps the last good set; an empty answer (NXDOMAIN, no records) removes
//! the name's backends only once answers have been empty for `hold`; any other change is applied
//! at once. Sources are keyed by [`SourceKey`]: the pool (its `config::pool_key`, the
//! listener's name for its implicit pool) and the field the name was written in.
//! Must not: do network I/O (`resolve.rs` does, on its own thread) or touch snapshots.

use super::resolve::{Answer, Found, Outcome, Query, ResolverThread};
use crate::config::{BackendConfig, Discovery, DnsConfig, Listener, RecordKind};
use log::{info, warn};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Which pool a name belongs to and where it was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// The pool's key (`config::pool_key`): the listener's name for its implicit pool,
    /// `listener/pool` for a named one.
    pub pool: String,
    /// `discovery` or `backends[i].address`.
    pub field: String,
}

impl SourceKey {
    /// The listener the pool belongs to.
    pub fn listener(&self) -> &str {
        crate::config::split_pool_key(&self.pool).0
    }

    /// The pool's own name (`default` for the implicit one).
    pub fn pool_name(&self) -> &str {
        crate::config::split_pool_key(&self.pool).1
    }

    /// `listener "web"`, or `listener "tls", pool "api"` for a named pool (log lines).
    pub fn scope(&self) -> String {
        match crate::config::split_pool_key(&self.pool) {
            (l, crate::config::IMPLICIT_POOL) => format!("listener {l:?}"),
            (l, p) => format!("listener {l:?}, pool {p:?}"),
        }
    }
}

/// Shortest re-resolution interval with `respect_ttl` (a TTL of 0 must not become a hot loop).
const MIN_TTL_REFRESH: Duration = Duration::from_secs(1);

struct Source {
    key: SourceKey,
    discovery: Discovery,
    /// The listener's bind address: an answer naming it is refused (a loop to itself).
    bind: SocketAddr,
    /// The last good set (`None`: never resolved yet).
    good: Option<Vec<Found>>,
    /// Since when answers have been empty (hold running).
    empty_since: Option<Instant>,
    due: Instant,
    /// The id of the query in flight.
    in_flight: Option<u64>,
    counts: Counts,
    /// Why the last resolution did not give addresses (for /readyz and /status).
    problem: Option<String>,
}

/// Resolutions by result, for `ringlb_dns_resolutions_total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub empty: u64,
    pub failed: u64,
}

/// What the admin side shows for one name.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsStatus {
    pub key: SourceKey,
    pub query: String,
    pub counts: Counts,
    /// Backends this name contributes now.
    pub backends: usize,
    pub problem: Option<String>,
}

pub struct DnsState {
    config: DnsConfig,
    sources: Vec<Source>,
    thread: Option<ResolverThread>,
    next_id: u64,
}

impl DnsState {
    pub fn new(config: &DnsConfig) -> DnsState {
        DnsState {
            config: config.clone(),
            sources: Vec::new(),
            thread: None,
            next_id: 1,
        }
    }

    /// Follows the listeners' names after a start or reload: a name that stays (same listener,
    /// field and query) keeps its last good set; new ones are due now; the `[dns]` settings are
    /// taken from `config` (a changed resolver list restarts the resolver thread).
    pub fn set_sources(&mut self, config: &DnsConfig, listeners: &[Listener], now: Instant) {
        if config.resolvers != self.config.resolvers {
            self.thread = None;
            for s in &mut self.sources {
                s.in_flight = None;
                s.due = now;
            }
        }
        self.config = config.clone();
        let mut old: Vec<Source> = std::mem::take(&mut self.sources);
        for (l, p) in listeners
            .iter()
            .flat_map(|l| l.pools.iter().map(move |p| (l, p)))
        {
            for d in &p.discovery {
                let key = SourceKey {
                    pool: crate::config::pool_key(&l.name, &p.name),
                    field: d.field.clone(),
                };
                match old.iter().position(|s| s.key == key && s.discovery == *d) {
                    Some(i) => {
                        let mut s = old.swap_remove(i);
                        s.bind = l.bind;
                        self.sources.push(s);
                    }
                    None => self.sources.push(Source {
                        key,
                        discovery: d.clone(),
                        bind: l.bind,
                        good: None,
                        empty_since: None,
                        due: now,
                        in_flight: None,
                        counts: Counts::default(),
                        problem: None,
                    }),
                }
            }
        }
        if self.sources.is_empty() {
            self.thread = None; // nothing to resolve: no thread
        }
    }

    /// Resolves every due name; with `wait`, blocks up to it for all of them (start-up, so the
    /// first snapshot has the backends). Returns the keys of the pools whose backends changed.
    pub fn step(&mut self, now: Instant, wait: Option<Duration>) -> Vec<String> {
        if self.sources.is_empty() {
            return Vec::new();
        }
        if self.thread.is_none() {
            match ResolverThread::start(&self.config) {
                Ok(t) => self.thread = Some(t),
                Err(e) => {
                    for s in &mut self.sources {
                        s.problem = Some(e.clone());
                    }
                    warn!("dns: {e}");
                    return Vec::new();
                }
            }
        }
        let Some(thread) = &self.thread else {
            return Vec::new();
        };
        for s in &mut self.sources {
            if s.in_flight.is_none() && s.due <= now {
                let id = self.next_id;
                self.next_id += 1;
                s.in_flight = Some(id);
                thread.send(Query {
                    id,
                    name: s.discovery.name.clone(),
                    kind: s.discovery.kind,
                    port: s.discovery.port,
                });
            }
        }
        let mut answers: Vec<Answer> = Vec::new();
        match wait {
            Some(w) => {
                let deadline = now + w;
                let mut pending: Vec<u64> =
                    self.sources.iter().filter_map(|s| s.in_flight).collect();
                while !pending.is_empty() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match thread.answers.recv_timeout(left) {
                        Ok(a) => {
                            pending.retain(|&id| id != a.id);
                            answers.push(a);
                        }
                        Err(_) => break,
                    }
                }
            }
            None => answers.extend(thread.answers.try_iter()),
        }
        let mut changed = Vec::new();
        for a in answers {
            if let Some(name) = self.apply(a, Instant::now()) {
                if !changed.contains(&name) {
                    changed.push(name);
                }
            }
        }
        changed
    }

    /// Applies one answer; returns the pool's key if its set changed.
    fn apply(&mut self, a: Answer, now: Instant) -> Option<String> {
        let (refresh, respect_ttl, hold) = (
            self.config.refresh,
            self.config.respect_ttl,
            self.config.hold,
        );
        let s = self
            .sources
            .iter_mut()
            .find(|s| s.in_flight == Some(a.id))?;
        s.in_flight = None;
        let every = s.discovery.refresh.unwrap_or(refresh);
        s.due = now + every;
        let before = s.good.clone();
        let what = format!(
            "{}: {} {}",
            s.key.scope(),
            s.discovery.field,
            s.discovery.describe()
        );
        match a.outcome {
            Outcome::Found { mut found, ttl } => {
                s.counts.ok += 1;
                if respect_ttl {
                    s.due = now + ttl.clamp(MIN_TTL_REFRESH, every.max(MIN_TTL_REFRESH));
                }
                s.empty_since = None;
                // What the static config refuses is refused from DNS too: a sinkhole's 0.0.0.0
                // (a connect to it reaches the local host) and the listener itself (a loop).
                let bind = s.bind;
                let refused: Vec<SocketAddr> = found
                    .iter()
                    .map(|f| f.address)
                    .filter(|&a| a.ip().is_unspecified() || crate::config::loops_to_itself(bind, a))
                    .collect();
                found.retain(|f| !refused.contains(&f.address));
                let problem = (!refused.is_empty()).then(|| {
                    let list: Vec<String> = refused.iter().map(ToString::to_string).collect();
                    format!(
                        "answer not used as backends: {} (an unspecified address, or the \
                         listener's own {bind}: it would connect to itself)",
                        list.join(", ")
                    )
                });
                if let Some(p) = &problem {
                    if s.problem.as_ref() != Some(p) {
                        warn!("dns: {what}: {p}");
                    }
                }
                s.problem = problem;
                s.good = Some(found);
            }
            Outcome::Empty(why) => {
                s.counts.empty += 1;
                let since = *s.empty_since.get_or_insert(now);
                let held = now.duration_since(since);
                if s.good.as_ref().is_some_and(|g| !g.is_empty()) && held >= hold {
                    warn!(
                        "dns: {what}: empty for {}s (hold {}s): its backends are removed: {why}",
                        held.as_secs(),
                        hold.as_secs()
                    );
                    s.good = Some(Vec::new());
                } else if s.good.is_none() {
                    s.good = Some(Vec::new());
                }
                s.problem = Some(why);
            }
            Outcome::Failed(why) => {
                s.counts.failed += 1;
                if s.problem.as_deref() != Some(why.as_str()) {
                    warn!("dns: {what}: resolution failed, keeping the last good set: {why}");
                }
                s.problem = Some(why);
            }
        }
        let after = s.good.as_deref().unwrap_or_default();
        (after != before.as_deref().unwrap_or_default()).then(|| s.key.pool.clone())
    }

    /// The pool's backends resolved from DNS (`pool`: its key): every name's last good set, in
    /// the config's order of names, without addresses already listed (the first one wins).
    pub fn backends(&self, pool: &str, taken: &[BackendConfig]) -> Vec<BackendConfig> {
        let mut out: Vec<BackendConfig> = Vec::new();
        let mut seen: std::collections::HashSet<SocketAddr> =
            taken.iter().map(|b| b.address).collect();
        for s in self.sources.iter().filter(|s| s.key.pool == pool) {
            let Some(good) = &s.good else { continue };
            // SRV: the lowest priority serves; higher priorities are its backups (RFC 2782's
            // "try the lowest first", with the backup tier doing the failing over).
            let lowest = good.iter().map(|f| f.priority).min().unwrap_or(0);
            for f in good {
                if !seen.insert(f.address) {
                    continue;
                }
                let weight = match s.discovery.kind {
                    RecordKind::Srv => f.weight,
                    _ => s.discovery.weight,
                };
                out.push(BackendConfig {
                    address: f.address,
                    weight,
                    max_connections: s.discovery.max_connections,
                    backup: s.discovery.backup || f.priority > lowest,
                });
            }
        }
        out
    }

    pub fn status(&self) -> Vec<DnsStatus> {
        self.sources
            .iter()
            .map(|s| DnsStatus {
                key: s.key.clone(),
                query: s.discovery.describe(),
                counts: s.counts,
                backends: s.good.as_ref().map_or(0, Vec::len),
                problem: s.problem.clone(),
            })
            .collect()
    }

    /// Logs what every name resolved to (start-up).
    pub fn log_sets(&self) {
        for s in &self.sources {
            let what = format!(
                "{}: {} {}",
                s.key.scope(),
                s.discovery.field,
                s.discovery.describe()
            );
            match (&s.good, &s.problem) {
                (Some(g), _) if !g.is_empty() => info!(
                    "dns: {what}: {} backends: {}",
                    g.len(),
                    g.iter()
                        .map(|f| f.address.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (_, Some(p)) => {
                    warn!("dns: {what}: no backends yet ({p}); the pool starts without them")
                }
                _ => warn!("dns: {what}: no answer yet; the pool starts without its backends"),
            }
        }
    }
}

/// Counts per pool (by its key, summed over its names), for the metrics family.
pub fn per_pool(status: &[DnsStatus]) -> Vec<(String, Counts, usize)> {
    let mut out: Vec<(String, Counts, usize)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    for s in status {
        let i = *at.entry(s.key.pool.clone()).or_insert_with(|| {
            out.push((s.key.pool.clone(), Counts::default(), 0));
            out.len() - 1
        });
        let e = &mut out[i];
        e.1.ok += s.counts.ok;
        e.1.empty += s.counts.empty;
        e.1.failed += s.counts.failed;
        e.2 += s.backends;
    }
    out
}
