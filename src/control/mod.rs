//! The control plane: owns the validated config, the backend-stats registry, health state and
//! one published snapshot per listener; builds and publishes snapshots (with a prebuilt Maglev
//! table), runs the control thread (requests, active probes, passive ejection) and logs what each
//! rebuild changed.
//! Must not: import `worker` or `uring`, or touch rings. Workers only ever see what it publishes;
//! what must happen on worker threads (binding new listeners) goes through [`ListenerHost`].

pub mod dns;
mod health;
mod report;
pub mod resolve;

pub use report::{BackendNote, Notes, Report};

use crate::backend::{ListenerStats, Padded, Registry};
use crate::balance::{Maglev, Policy, Tables};
use crate::config::{Config, Listener};
use crate::notify;
use crate::snapshot::{BackendState, Inspect, Member, PoolSnapshot, Published, Settings, Snapshot};
use arc_swap::ArcSwap;
use health::HealthDriver;
use log::{error, info};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the control thread answers a request: the summary or the error. A oneshot, so that the
/// admin endpoint can await it on its runtime; sending never blocks the control thread.
pub type Reply = tokio::sync::oneshot::Sender<Result<String, String>>;

/// What other threads (signal handler loop, admin endpoint) ask of the control thread.
pub enum Request {
    /// Re-read the config file and apply it; the reply carries the summary or the error.
    Reload { reply: Option<Reply> },
    /// Stop (or resume, `drain = false`) sending new connections to a backend, without a reload.
    /// Existing connections stay. Kept across reloads while the backend stays configured.
    Drain {
        listener: String,
        backend: SocketAddr,
        drain: bool,
        reply: Reply,
    },
}

/// A listener's sockets, bound (one per worker) but not yet served.
pub struct Bound {
    pub sockets: Vec<socket2::Socket>,
    pub addr: SocketAddr,
}

/// What the control plane needs from the runtime to add or remove listeners on reload (the
/// runtime owns the workers; the control plane never touches them directly).
pub trait ListenerHost: Send {
    /// Binds a listener's sockets. Nothing is served until [`ListenerHost::start`].
    fn bind(&mut self, l: &Listener) -> Result<Bound, String>;
    /// Serves a bound listener on every worker.
    fn start(
        &mut self,
        l: &Listener,
        bound: Bound,
        published: Published,
        stats: Arc<ListenerStats>,
    );
    /// Stops accepting on a listener; its open connections drain (listener `drain_timeout`).
    fn remove(&mut self, name: &str);
}

/// The control thread's longest wait (heartbeat, passive-health checks, requests).
const CONTROL_TICK: Duration = Duration::from_millis(50);
/// How long start-up waits for the first DNS answers.
const START_DNS_WAIT: Duration = Duration::from_secs(5);

/// One listener as the control plane holds it.
pub struct ControlListener {
    pub config: Listener,
    /// One single-pool listener per pool, named by its pool key (`config::pool_key`), in the
    /// order of `config.pools` (and of the snapshot's pools): what health and the registry see.
    pub units: Vec<Listener>,
    pub published: Published,
    pub stats: Arc<ListenerStats>,
    /// Each pool's round-robin ticket, by pool name, kept across republishes and reloads.
    tickets: Vec<(String, Arc<Padded<AtomicU64>>)>,
    generation: u64,
    /// Per pool, the backends written in the config (IP literals); `config`'s pools add those
    /// resolved from DNS.
    declared: Vec<Vec<crate::config::BackendConfig>>,
    /// Slow start: when to republish the next ramp step (a member is ramping).
    next_ramp: Option<Instant>,
}

/// The control plane's state.
pub struct Control {
    pub registry: Arc<Registry>,
    pub listeners: Vec<ControlListener>,
    health: HealthDriver,
    /// Backends drained through the admin endpoint (weight 0 until undrained).
    drained: Vec<(String, SocketAddr)>,
    workers: usize,
    /// Read by the admin endpoint: reload counters, the admin token, why backends are down.
    pub report: Arc<Report>,
    /// Names resolved into backends (discovery, host-name addresses).
    dns: dns::DnsState,
}

impl Control {
    /// Builds and publishes the first snapshot of every listener.
    pub fn new(config: &Config) -> Control {
        let registry = Arc::new(Registry::new(config.runtime.workers));
        let now = Instant::now();
        let mut dns = dns::DnsState::new(&config.dns);
        dns.set_sources(&config.dns, &config.listeners, now);
        // The first snapshots start with what DNS says (a name that does not answer in time
        // leaves its pool empty, said in the log and /readyz; it is asked again every refresh).
        dns.step(now, Some(START_DNS_WAIT));
        dns.log_sets();
        let health = HealthDriver::new(&[], now);
        let mut control = Control {
            registry,
            listeners: Vec::new(),
            health,
            drained: Vec::new(),
            workers: config.runtime.workers,
            report: Arc::new(Report::new(config.admin.token.clone())),
            dns,
        };
        let effective: Vec<Listener> = config
            .listeners
            .iter()
            .map(|l| control.effective(l))
            .collect();
        control.health = HealthDriver::new(&all_units(&effective), now);
        control.report.set_dns(control.dns.status());
        for l in &config.listeners {
            let cl = control.new_listener(l.clone());
            control.listeners.push(cl);
        }
        control.health.mark_started();
        control.publish_notes();
        control
    }

    /// Publishes, for the admin endpoint, why each backend is down or drained.
    fn publish_notes(&self) {
        let mut notes = Notes::new();
        for cl in &self.listeners {
            for u in &cl.units {
                for b in &u.pools[0].backends {
                    let key = (u.name.clone(), b.address);
                    let mut note = self.health.note(&u.name, b.address);
                    note.configured_weight = b.weight;
                    note.drained = self.drained.contains(&(cl.config.name.clone(), b.address));
                    notes.insert(key, note);
                }
            }
        }
        self.report.set_notes(notes);
    }

    /// A listener as the control plane runs it: each pool's declared backends and those DNS
    /// resolved for it (Maglev: capped below the table size, with a warning).
    fn effective(&self, declared: &Listener) -> Listener {
        let mut l = declared.clone();
        for p in &mut l.pools {
            if p.discovery.is_empty() {
                continue;
            }
            let key = crate::config::pool_key(&declared.name, &p.name);
            let more = self.dns.backends(&key, &p.backends);
            p.backends.extend(more);
            let cap = p.maglev_table_size.saturating_sub(1) as usize;
            if p.balance == Policy::Maglev && p.backends.len() > cap {
                log::warn!(
                    "listener {:?}, pool {:?}: DNS gave {} backends, more than maglev_table_size \
                     {} allows: using the first {cap}",
                    declared.name,
                    p.name,
                    p.backends.len(),
                    p.maglev_table_size
                );
                p.backends.truncate(cap);
            }
        }
        l
    }

    /// A listener's stats and first published snapshot (generation 1), from its declared
    /// config.
    fn new_listener(&mut self, declared: Listener) -> ControlListener {
        let config = self.effective(&declared);
        let stats = Arc::new(ListenerStats::new(self.workers));
        let units = config.pool_units();
        let tickets = tickets_for(&config, &[]);
        let snap = build_snapshot(
            &config,
            &units,
            &tickets,
            1,
            &self.registry,
            &stats,
            &mut self.health,
            &self.drained,
            None,
        );
        log_tables(&config, &snap, None);
        let next_ramp = self.next_ramp(&units, &snap);
        ControlListener {
            config,
            units,
            published: Arc::new(ArcSwap::from_pointee(snap)),
            stats,
            tickets,
            generation: 1,
            declared: declared_backends(&declared),
            next_ramp,
        }
    }

    /// When a listener whose snapshot has a ramping member republishes its next step (the
    /// soonest of its pools').
    fn next_ramp(&self, units: &[Listener], snap: &Snapshot) -> Option<Instant> {
        units
            .iter()
            .zip(&snap.pools)
            .filter_map(|(u, p)| {
                let step = self.health.ramp_step(&u.name)?;
                p.members
                    .iter()
                    .any(|m| m.ramp_percent < 100)
                    .then(|| Instant::now() + step)
            })
            .min()
    }

    /// Applies a new, already validated configuration. Listeners whose name and bind are
    /// unchanged keep their sockets and get a new snapshot if anything changed; new (or re-bound)
    /// listeners are bound first: if any bind fails, nothing at all is applied. Removed listeners
    /// stop accepting and drain. Changes that need a restart (worker count, admin bind) refuse
    /// the whole reload. Returns a one-line summary.
    pub fn reload(
        &mut self,
        old: &Config,
        new: &Config,
        host: &mut dyn ListenerHost,
    ) -> Result<String, String> {
        if old.runtime.workers != new.runtime.workers {
            return Err(format!(
                "runtime: field \"workers\": {} -> {} needs a restart",
                old.runtime.workers, new.runtime.workers
            ));
        }
        if old.admin.bind != new.admin.bind {
            return Err(format!(
                "admin: field \"bind\": {} -> {} needs a restart",
                old.admin.bind, new.admin.bind
            ));
        }
        let same_socket = |a: &Listener, b: &Listener| a.bind == b.bind && a.protocol == b.protocol;
        let kept = |l: &Listener| {
            self.listeners
                .iter()
                .any(|c| c.config.name == l.name && same_socket(&c.config, l))
        };
        // 1. Bind every new or re-bound listener; any failure aborts before anything changes.
        let mut bound = Vec::new();
        for l in new.listeners.iter().filter(|l| !kept(l)) {
            let b = host
                .bind(l)
                .map_err(|e| format!("listener {:?}: field \"bind\": {e}", l.name))?;
            bound.push((l.clone(), b));
        }
        // 2. Commit.
        let now = Instant::now();
        let removed_names: Vec<String> = self
            .listeners
            .iter()
            .filter(|c| {
                !new.listeners
                    .iter()
                    .any(|l| l.name == c.config.name && same_socket(&c.config, l))
            })
            .map(|c| c.config.name.clone())
            .collect();
        for name in &removed_names {
            host.remove(name);
        }
        self.listeners
            .retain(|c| !removed_names.contains(&c.config.name));
        // Names that stay keep their last good sets; new ones are resolved before the snapshots
        // are built (bounded), as at start.
        self.dns.set_sources(&new.dns, &new.listeners, now);
        self.dns.step(now, Some(START_DNS_WAIT));
        self.report.set_dns(self.dns.status());
        let effective: Vec<Listener> = new.listeners.iter().map(|l| self.effective(l)).collect();
        self.health.set_listeners(&all_units(&effective), now);
        self.drained.retain(|(l, a)| {
            effective
                .iter()
                .any(|x| &x.name == l && x.all_backends().any(|(_, b)| b.address == *a))
        });
        let (mut added_b, mut removed_b, mut changed, mut moved) = (0usize, 0usize, 0usize, 0u64);
        let ms = crate::backend::process_ms();
        for (declared, l) in new.listeners.iter().zip(&effective) {
            let Some(i) = self.listeners.iter().position(|c| c.config.name == l.name) else {
                continue;
            };
            self.listeners[i].declared = declared_backends(declared);
            let cur = &self.listeners[i].config;
            let new_units = l.pool_units();
            for u in &new_units {
                for b in &u.pools[0].backends {
                    self.registry.get(&u.name, b.address).set_removed(None);
                }
            }
            if cur == l {
                continue;
            }
            changed += 1;
            let (before, after) = (
                unit_backends(&self.listeners[i].units),
                unit_backends(&new_units),
            );
            added_b += after.iter().filter(|k| !before.contains(k)).count();
            for k in before.iter().filter(|k| !after.contains(k)) {
                removed_b += 1;
                self.registry.get(&k.0, k.1).set_removed(Some(ms));
            }
            let tickets = tickets_for(l, &self.listeners[i].tickets);
            let cl = &mut self.listeners[i];
            cl.config = l.clone();
            cl.units = new_units;
            cl.tickets = tickets;
            moved += self.republish(i);
        }
        let n_added = bound.len();
        for (l, b) in bound {
            let cl = self.new_listener(l);
            host.start(&cl.config, b, cl.published.clone(), cl.stats.clone());
            self.listeners.push(cl);
        }
        // Keep the config's order (admin output, metrics).
        self.listeners.sort_by_key(|c| {
            new.listeners
                .iter()
                .position(|l| l.name == c.config.name)
                .unwrap_or(usize::MAX)
        });
        self.publish_notes();
        Ok(format!(
            "listeners: {n_added} added, {} removed, {changed} changed; backends: {added_b} added, {removed_b} removed; maglev slots moved: {moved}",
            removed_names.len()
        ))
    }

    /// Drains (weight 0 for new connections) or undrains a backend through the admin endpoint.
    pub fn drain(
        &mut self,
        listener: &str,
        backend: SocketAddr,
        drain: bool,
    ) -> Result<String, String> {
        let Some(i) = self
            .listeners
            .iter()
            .position(|c| c.config.name == listener)
        else {
            return Err(format!("no listener named {listener:?}"));
        };
        if !self.listeners[i]
            .config
            .all_backends()
            .any(|(_, b)| b.address == backend)
        {
            return Err(format!("listener {listener:?} has no backend {backend}"));
        }
        let key = (listener.to_string(), backend);
        let was = self.drained.contains(&key);
        if drain && !was {
            self.drained.push(key);
        } else if !drain && was {
            self.drained.retain(|k| *k != key);
        }
        if drain != was {
            self.republish(i);
            self.publish_notes();
        }
        let state = if drain {
            "draining (no new connections)"
        } else {
            "serving"
        };
        info!("listener {listener:?}: backend {backend} is {state} (admin request)");
        Ok(format!(
            "listener {listener:?}: backend {backend} is {state}"
        ))
    }

    /// Rebuilds and publishes listener `i`'s snapshot from its current config and health.
    /// Returns the Maglev slots moved (0 for other policies).
    pub fn republish(&mut self, i: usize) -> u64 {
        let l = &mut self.listeners[i];
        l.generation += 1;
        let old = l.published.load_full();
        let snap = build_snapshot(
            &l.config,
            &l.units,
            &l.tickets,
            l.generation,
            &self.registry,
            &l.stats,
            &mut self.health,
            &self.drained,
            Some(&old),
        );
        let next_ramp = self.next_ramp(&self.listeners[i].units, &snap);
        let l = &mut self.listeners[i];
        l.next_ramp = next_ramp;
        let moved = log_tables(&l.config, &snap, Some(&old)).unwrap_or(0);
        l.stats.slots_moved.fetch_add(moved, Ordering::Relaxed);
        let (generation, up, total) = (snap.generation, snap.up_count(), snap.member_count());
        // Publish first, then say so: a log reader may act on the line at once.
        l.published.store(Arc::new(snap));
        info!(
            "listener \"{}\": published generation {generation} ({up}/{total} backends up)",
            l.config.name
        );
        moved
    }

    /// Resolves due names and applies what changed: a pool whose DNS backends changed gets them
    /// (a backend that left DNS drains like one removed by a reload) and its listener a new
    /// snapshot.
    fn dns_step(&mut self) {
        let changed = self.dns.step(Instant::now(), None);
        self.report.set_dns(self.dns.status());
        let mut names: Vec<String> = changed
            .iter()
            .map(|k| crate::config::split_pool_key(k).0.to_string())
            .collect();
        names.dedup();
        let ms = crate::backend::process_ms();
        let mut any = false;
        for name in names {
            let Some(i) = self.listeners.iter().position(|c| c.config.name == name) else {
                continue;
            };
            let mut declared = self.listeners[i].config.clone();
            for (p, d) in declared.pools.iter_mut().zip(&self.listeners[i].declared) {
                p.backends = d.clone();
            }
            let l = self.effective(&declared);
            if self.listeners[i].config == l {
                continue;
            }
            let new_units = l.pool_units();
            let (before, after) = (
                unit_backends(&self.listeners[i].units),
                unit_backends(&new_units),
            );
            let added = after.iter().filter(|k| !before.contains(k)).count();
            let mut removed = 0usize;
            for (unit, a) in before.iter().filter(|k| !after.contains(k)) {
                removed += 1;
                self.registry.get(unit, *a).set_removed(Some(ms));
            }
            for (unit, a) in &after {
                self.registry.get(unit, *a).set_removed(None);
            }
            self.listeners[i].config = l;
            self.listeners[i].units = new_units;
            any = true;
            // Health state follows the new backend lists before the snapshot reads them.
            let all: Vec<Listener> = self.listeners.iter().map(|c| c.config.clone()).collect();
            self.health.set_listeners(&all_units(&all), Instant::now());
            let moved = self.republish(i);
            info!(
                "listener {name:?}: dns: backends: {added} added, {removed} removed; maglev slots moved: {moved}"
            );
        }
        if any {
            self.publish_notes();
        }
    }

    /// Drops registry entries of backends no longer in any listener and without connections.
    /// Drops the counters of backends no listener has any more. One set lookup per entry: a
    /// scan of every listener per entry made this quadratic, seconds for a few thousand
    /// backends, with the control thread (and its heartbeat) stalled meanwhile.
    fn prune_registry(&self) {
        let present: std::collections::HashSet<(&str, SocketAddr)> = self
            .listeners
            .iter()
            .flat_map(|c| c.units.iter())
            .flat_map(|u| {
                u.pools[0]
                    .backends
                    .iter()
                    .map(|b| (u.name.as_str(), b.address))
            })
            .collect();
        self.registry.prune(|l, a| present.contains(&(l, a)));
    }

    /// One pass of health work: start due probes, collect results (waiting up to `wait`), apply
    /// passive ejection, and republish every listener whose health changed.
    fn health_step(&mut self, wait: Duration) {
        let mut changed = self.health.step(&self.listeners, &self.registry, wait);
        // Slow start: the next step of every ramp that is due.
        let now = Instant::now();
        for cl in &self.listeners {
            if cl.next_ramp.is_some_and(|t| t <= now) && !changed.contains(&cl.config.name) {
                changed.push(cl.config.name.clone());
            }
        }
        // Health reports pool keys; one republish per listener however many of its pools changed.
        let mut listeners: Vec<&str> = Vec::new();
        for key in &changed {
            let (l, _) = crate::config::split_pool_key(key);
            if !listeners.contains(&l) {
                listeners.push(l);
            }
        }
        let listeners: Vec<String> = listeners.into_iter().map(str::to_string).collect();
        for name in listeners {
            if let Some(i) = self.listeners.iter().position(|l| l.config.name == name) {
                self.republish(i);
            }
        }
        if self.health.take_notes_stale() {
            self.publish_notes();
        }
    }
}

/// Runs the control loop until `stop` is set: answers requests, runs health checks, republishes,
/// and feeds systemd's watchdog (when there is one) while the workers tick.
#[allow(clippy::too_many_arguments)]
pub fn run_thread(
    mut control: Control,
    mut host: Box<dyn ListenerHost>,
    mut config: Config,
    path: PathBuf,
    requests: Receiver<Request>,
    heartbeat: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    mut watchdog: Option<notify::Watchdog>,
) {
    let mut next_prune = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        heartbeat.store(crate::backend::process_ms(), Ordering::Relaxed);
        if let Some(w) = watchdog.as_mut() {
            w.tick(crate::backend::process_ms());
        }
        if Instant::now() >= next_prune {
            next_prune = Instant::now() + Duration::from_secs(10);
            control.prune_registry();
        }
        loop {
            match requests.try_recv() {
                Ok(Request::Reload { reply }) => {
                    // The admin endpoint reads this to stay live while the reload runs.
                    control.report.reload_started(crate::backend::process_ms());
                    notify::reloading();
                    // [log] changes are opened first and installed only with the rest.
                    let result = match Config::load(&path) {
                        Err(e) => Err(e.to_string()),
                        Ok(new) => crate::logging::prepare(&new.log).and_then(|log| {
                            control.reload(&config, &new, host.as_mut()).inspect(|_| {
                                log.install();
                                config = new;
                            })
                        }),
                    };
                    let token = result.is_ok().then(|| config.admin.token.clone());
                    // A beat before the reload stops excusing an old one: /livez must never
                    // see "no reload running" with the heartbeat from before it.
                    heartbeat.store(crate::backend::process_ms(), Ordering::Relaxed);
                    control.report.reload_finished(token);
                    match &result {
                        Ok(summary) => {
                            info!("reload of {} done: {summary}", path.display());
                            notify::reloaded("ready (reloaded)");
                        }
                        Err(e) => {
                            error!(
                                "reload of {} failed, still running the previous configuration: {e}",
                                path.display()
                            );
                            notify::reloaded(&format!("ready (reload failed: {e})"));
                        }
                    }
                    if let Some(r) = reply {
                        let _ = r.send(result);
                    }
                }
                Ok(Request::Drain {
                    listener,
                    backend,
                    drain,
                    reply,
                }) => {
                    let _ = reply.send(control.drain(&listener, backend, drain));
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        control.dns_step();
        control.health_step(CONTROL_TICK);
    }
}

/// Every pool of every listener as a single-pool listener named by its pool key.
fn all_units(listeners: &[Listener]) -> Vec<Listener> {
    listeners.iter().flat_map(Listener::pool_units).collect()
}

/// Each pool's round-robin ticket: the one it had (same pool name) or a new one.
fn tickets_for(
    l: &Listener,
    old: &[(String, Arc<Padded<AtomicU64>>)],
) -> Vec<(String, Arc<Padded<AtomicU64>>)> {
    l.pools
        .iter()
        .map(|p| {
            let t = old
                .iter()
                .find(|(n, _)| *n == p.name)
                .map_or_else(|| Arc::new(Padded(AtomicU64::new(0))), |(_, t)| t.clone());
            (p.name.clone(), t)
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn build_snapshot(
    l: &Listener,
    units: &[Listener],
    tickets: &[(String, Arc<Padded<AtomicU64>>)],
    generation: u64,
    registry: &Registry,
    stats: &Arc<ListenerStats>,
    health: &mut HealthDriver,
    drained: &[(String, SocketAddr)],
    old: Option<&Snapshot>,
) -> Snapshot {
    let pools = units
        .iter()
        .zip(tickets)
        .map(|(u, (_, ticket))| {
            let old_pool = old.and_then(|o| o.pools.iter().find(|p| *p.name == *u.pools[0].name));
            build_pool(
                &l.name,
                u,
                ticket.clone(),
                registry,
                health,
                drained,
                old_pool,
            )
        })
        .collect();
    let (default_pool, inspect) = match &l.routing {
        None => (Some(0), None),
        Some(r) => (
            r.table.default_pool(),
            r.inspects().then(|| {
                Arc::new(Inspect {
                    table: r.table.clone(),
                    timeout: r.timeout,
                    max_bytes: r.max_bytes,
                })
            }),
        ),
    };
    Snapshot {
        generation,
        listener: Arc::from(l.name.as_str()),
        settings: Settings {
            connect_timeout: l.connect_timeout,
            idle_timeout: l.idle_timeout,
            max_connections: l.max_connections,
            access_log: l.access_log,
            tcp_keepalive: l.tcp_keepalive,
            queue_timeout: l.queue_timeout,
            send_proxy: l.proxy_protocol,
            accept_proxy: l.accept_proxy_protocol.then_some(l.proxy_protocol_timeout),
            proxy_trusted: l.accept_proxy_protocol_from.as_deref().map(Arc::from),
            drain_timeout: l.drain_timeout,
            close_on_backend_down: l.close_on_backend_down,
            drain_postgres: l.drain_postgres,
            max_flows: l.max_flows,
        },
        pools,
        default_pool,
        inspect,
        listener_stats: stats.clone(),
    }
}

/// One pool's snapshot. `unit` is the pool as a single-pool listener named by its pool key
/// (health and the registry know its backends by that key); `listener` is the listener's own
/// name (admin drains are per listener).
fn build_pool(
    listener: &str,
    unit: &Listener,
    rr_ticket: Arc<Padded<AtomicU64>>,
    registry: &Registry,
    health: &mut HealthDriver,
    drained: &[(String, SocketAddr)],
    old: Option<&PoolSnapshot>,
) -> PoolSnapshot {
    let key = unit.name.as_str();
    let pool = &unit.pools[0];
    let mut members: Vec<Member> = pool
        .backends
        .iter()
        .map(|b| {
            let v = health.verdict(key, b.address);
            let stats = registry.get(key, b.address);
            // The registry keeps a backend's counters by (pool key, address) across
            // reloads, so a listener re-created under the same name finds the flags an earlier
            // generation left: set both from this config and this health, every build.
            // The stats' bit is "live" (connections close per on_backend_down when it drops);
            // a backend that is only not ready keeps its connections.
            stats.set_removed(None);
            stats.set_up(v.up());
            let weight = if drained
                .iter()
                .any(|(n, a)| n == listener && *a == b.address)
            {
                0
            } else {
                b.weight
            };
            let up = v.up() && v.ready;
            let state = match v {
                _ if !v.live || v.held => BackendState::Down,
                _ if v.ejected => BackendState::Ejected,
                _ if !v.ready => BackendState::NotReady,
                _ if weight == 0 => BackendState::Drained,
                _ => BackendState::Up,
            };
            // Live but taking no new connections: drain_mode = "postgres" closes its sessions
            // as they go idle, from the first publish that says so.
            stats.set_winding_down(
                matches!(state, BackendState::NotReady | BackendState::Drained),
                crate::backend::process_ms(),
            );
            let ramp_percent = health.ramp(key, b.address, up && weight > 0);
            Member {
                address: b.address,
                weight,
                up,
                state,
                ramp_percent,
                max_connections: b.max_connections,
                backup: b.backup,
                standby: false,
                stats,
            }
        })
        .collect();
    mark_standby(&mut members);
    // Round robin builds its sequence over the backends that are up, so a down backend's share
    // spreads over the others by weight (smooth WRR over the live set, as NGINX does); a health
    // flip rebuilds it. Maglev keeps its table across flips (it probes past a down backend) and
    // the other policies skip down backends at pick time.
    // Slow start scales a pool's weights (so 10% of weight 1 is a whole number; every
    // policy compares weights only with each other) and ramps those of backends coming back;
    // each ramp step is a republish, so pickers read plain weights (see health/ramp.rs).
    let table_weight = |m: &Member| match pool.balance {
        _ if m.standby => 0,
        Policy::RoundRobin if !m.up => 0,
        _ if pool.slow_start.is_some() => crate::health::ramp::scaled(m.weight, m.ramp_percent),
        _ => m.weight,
    };
    let pairs: Vec<(SocketAddr, u32)> = members
        .iter()
        .map(|m| (m.address, table_weight(m)))
        .collect();
    let reuse = old.filter(|o| {
        o.tables.policy() == pool.balance
            && o.tables.len() == pairs.len()
            && o.members
                .iter()
                .zip(&pairs)
                .zip(o.tables.weights())
                .all(|((m, p), &w)| (m.address, w) == *p)
            && o.tables
                .maglev()
                .is_none_or(|m| m.size() == pool.maglev_table_size)
    });
    let tables = match reuse {
        Some(o) => o.tables.clone(),
        None => Arc::new(Tables::build(pool.balance, &pairs, pool.maglev_table_size)),
    };
    PoolSnapshot {
        name: Arc::from(pool.name.as_str()),
        hash_key: pool.hash_key,
        members,
        tables,
        rr_ticket,
    }
}

/// Every backend of `units` by (pool key, address): what the registry and health know them by.
/// A set, so a reload or DNS change of thousands of backends compares in linear time.
fn unit_backends(units: &[Listener]) -> std::collections::HashSet<(String, SocketAddr)> {
    units
        .iter()
        .flat_map(|u| {
            u.pools[0]
                .backends
                .iter()
                .map(|b| (u.name.clone(), b.address))
        })
        .collect()
}

/// Each pool's declared (IP-literal) backends, in pool order.
fn declared_backends(l: &Listener) -> Vec<Vec<crate::config::BackendConfig>> {
    l.pools.iter().map(|p| p.backends.clone()).collect()
}

/// Backup servers (HAProxy's `backup`): while any non-backup member is eligible (up, weight > 0)
/// the backups stand by; otherwise the non-backup members do and the backups serve. A pool
/// without backups is left as it is (its down members keep their Maglev slots).
fn mark_standby(members: &mut [Member]) {
    if !members.iter().any(|m| m.backup) {
        return;
    }
    let primary = members.iter().any(|m| !m.backup && m.up && m.weight > 0);
    for m in members.iter_mut() {
        m.standby = m.backup == primary;
    }
}

/// Logs each Maglev pool's table shape and, on a rebuild, how many slots moved (returned,
/// summed over the pools).
fn log_tables(l: &Listener, snap: &Snapshot, old: Option<&Snapshot>) -> Option<u64> {
    let mut total = None;
    for (pool, p) in l.pools.iter().zip(&snap.pools) {
        if pool.balance != Policy::Maglev {
            continue;
        }
        let Some(m) = p.tables.maglev() else {
            continue;
        };
        let scope = if l.pools.len() == 1 && l.routing.is_none() {
            format!("listener {:?}", l.name)
        } else {
            format!("listener {:?} pool {:?}", l.name, pool.name)
        };
        let per = m.slots_per_backend();
        let (min, max) = (
            per.iter().copied().min().unwrap_or(0),
            per.iter().copied().max().unwrap_or(0),
        );
        let moved = old
            .and_then(|o| o.pools.iter().find(|op| op.name == p.name))
            .and_then(|op| op.tables.maglev().map(|om| (op, om)))
            .map(|(op, om)| slots_moved(om, op, m, p));
        match moved {
            Some(k) => info!(
                "{scope}: maglev table rebuilt (generation {}): slots moved: {}/{}, slots per backend min {} max {}",
                snap.generation, k, m.size(), min, max
            ),
            None => info!(
                "{scope}: maglev table built: {} slots, {} backends, slots per backend min {} max {}",
                m.size(),
                per.len(),
                min,
                max
            ),
        }
        if let Some(k) = moved {
            total = Some(total.unwrap_or(0) + k);
        }
    }
    total
}

fn slots_moved(
    old: &Maglev,
    old_pool: &PoolSnapshot,
    new: &Maglev,
    new_pool: &PoolSnapshot,
) -> u64 {
    let oa: Vec<SocketAddr> = old_pool.members.iter().map(|m| m.address).collect();
    let na: Vec<SocketAddr> = new_pool.members.iter().map(|m| m.address).collect();
    Maglev::slots_moved(old, &oa, new, &na)
}
