//! The control plane: owns the validated config, the backend-stats registry, health state and
//! one published snapshot per listener; builds and publishes snapshots (with a prebuilt Maglev
//! table), runs the control thread (requests, active probes, passive ejection) and logs what each
//! rebuild changed.
//! Must not: import `worker` or `uring`, or touch rings. Workers only ever see what it publishes;
//! what must happen on worker threads (binding new listeners) goes through [`ListenerHost`].

mod health;

use crate::backend::{ListenerStats, Registry};
use crate::balance::{Maglev, Policy, Tables};
use crate::config::{Config, Listener, Protocol};
use crate::snapshot::{Member, Published, Settings, Snapshot};
use arc_swap::ArcSwap;
use health::HealthDriver;
use log::{error, info};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What other threads (signal handler loop, admin endpoint) ask of the control thread.
pub enum Request {
    /// Re-read the config file and apply it; the reply carries the summary or the error.
    Reload {
        reply: Option<Sender<Result<String, String>>>,
    },
}

/// The control thread's longest wait (heartbeat, passive-health checks, requests).
const CONTROL_TICK: Duration = Duration::from_millis(50);

/// One listener as the control plane holds it.
pub struct ControlListener {
    pub config: Listener,
    pub published: Published,
    pub stats: Arc<ListenerStats>,
    generation: u64,
}

/// The control plane's state.
pub struct Control {
    pub registry: Arc<Registry>,
    pub listeners: Vec<ControlListener>,
    health: HealthDriver,
}

impl Control {
    /// Builds and publishes the first snapshot of every listener.
    pub fn new(config: &Config) -> Control {
        let registry = Arc::new(Registry::new(config.runtime.workers));
        let health = HealthDriver::new(&config.listeners, Instant::now());
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let stats = Arc::new(ListenerStats::new(config.runtime.workers));
                let snap = build_snapshot(l, 1, &registry, &stats, &health, None);
                log_tables(l, &snap, None);
                ControlListener {
                    config: l.clone(),
                    published: Arc::new(ArcSwap::from_pointee(snap)),
                    stats,
                    generation: 1,
                }
            })
            .collect();
        Control {
            registry,
            listeners,
            health,
        }
    }

    /// Applies a new, already validated configuration: every listener's backends, weights and
    /// settings are republished. Changes that need sockets or threads (listeners added, removed
    /// or re-bound, worker count, admin bind) are refused as a whole: nothing is half-applied.
    /// Returns a one-line summary.
    pub fn reload(&mut self, old: &Config, new: &Config) -> Result<String, String> {
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
        let same_set = old.listeners.len() == new.listeners.len()
            && old
                .listeners
                .iter()
                .zip(&new.listeners)
                .all(|(a, b)| a.name == b.name && a.bind == b.bind && a.protocol == b.protocol);
        if !same_set {
            let names = |c: &Config| {
                c.listeners
                    .iter()
                    .map(|l| format!("{}@{}", l.name, l.bind))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(format!(
                "listeners changed ({} -> {}): adding, removing, reordering or re-binding listeners needs a restart in this version",
                names(old),
                names(new)
            ));
        }
        self.health.set_listeners(&new.listeners, Instant::now());
        let (mut added, mut removed, mut changed, mut moved) = (0usize, 0usize, 0usize, 0u64);
        for (i, l) in new.listeners.iter().enumerate() {
            let cur = &self.listeners[i].config;
            if cur == l {
                continue;
            }
            changed += 1;
            added += l
                .backends
                .iter()
                .filter(|b| !cur.backends.iter().any(|c| c.address == b.address))
                .count();
            removed += cur
                .backends
                .iter()
                .filter(|c| !l.backends.iter().any(|b| b.address == c.address))
                .count();
            self.listeners[i].config = l.clone();
            moved += self.republish(i);
        }
        Ok(format!(
            "{changed} listener(s) changed, {added} backend(s) added, {removed} backend(s) removed, {moved} maglev slot(s) moved"
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
            l.generation,
            &self.registry,
            &l.stats,
            &self.health,
            Some(&old),
        );
        let moved = log_tables(&l.config, &snap, Some(&old)).unwrap_or(0);
        l.stats.slots_moved.fetch_add(moved, Ordering::Relaxed);
        info!(
            "listener \"{}\": published generation {} ({}/{} backends up)",
            l.config.name,
            snap.generation,
            snap.up_count(),
            snap.members.len()
        );
        l.published.store(Arc::new(snap));
        moved
    }

    /// One pass of health work: start due probes, collect results (waiting up to `wait`), apply
    /// passive ejection, and republish every listener whose health changed.
    fn health_step(&mut self, wait: Duration) {
        let changed = self.health.step(&self.listeners, &self.registry, wait);
        for name in changed {
            if let Some(i) = self.listeners.iter().position(|l| l.config.name == name) {
                self.republish(i);
            }
        }
    }
}

/// Runs the control loop until `stop` is set: answers requests, runs health checks, republishes.
pub fn run_thread(
    mut control: Control,
    mut config: Config,
    path: PathBuf,
    requests: Receiver<Request>,
    heartbeat: Arc<AtomicU64>,
    epoch: Instant,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        heartbeat.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        loop {
            match requests.try_recv() {
                Ok(Request::Reload { reply }) => {
                    let result = match Config::load(&path) {
                        Err(e) => Err(e.to_string()),
                        Ok(new) => control.reload(&config, &new).inspect(|_| config = new),
                    };
                    match &result {
                        Ok(summary) => info!("reload of {} done: {summary}", path.display()),
                        Err(e) => error!(
                            "reload of {} failed, still running the previous configuration: {e}",
                            path.display()
                        ),
                    }
                    if let Some(r) = reply {
                        let _ = r.send(result);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return,
            }
        }
        control.health_step(CONTROL_TICK);
    }
}

fn build_snapshot(
    l: &Listener,
    generation: u64,
    registry: &Registry,
    stats: &Arc<ListenerStats>,
    health: &HealthDriver,
    old: Option<&Snapshot>,
) -> Snapshot {
    let members: Vec<Member> = l
        .backends
        .iter()
        .map(|b| Member {
            address: b.address,
            weight: b.weight,
            up: health.is_up(&l.name, b.address),
            stats: registry.get(&l.name, b.address),
        })
        .collect();
    let pairs: Vec<(SocketAddr, u32)> = members.iter().map(|m| (m.address, m.weight)).collect();
    let reuse = old.filter(|o| {
        o.tables.policy() == l.balance
            && o.members.len() == pairs.len()
            && o.members
                .iter()
                .zip(&pairs)
                .all(|(m, p)| (m.address, m.weight) == *p)
            && o.tables
                .maglev()
                .is_none_or(|m| m.size() == l.maglev_table_size)
    });
    let tables = match reuse {
        Some(o) => o.tables.clone(),
        None => Arc::new(Tables::build(l.balance, &pairs, l.maglev_table_size)),
    };
    Snapshot {
        generation,
        listener: Arc::from(l.name.as_str()),
        settings: Settings {
            connect_timeout: l.connect_timeout,
            idle_timeout: l.idle_timeout,
            max_connections: l.max_connections,
            hash_key: l.hash_key,
            access_log: l.access_log,
        },
        tables,
        members,
        listener_stats: stats.clone(),
    }
}

/// Logs a Maglev table's shape and, on a rebuild, how many slots moved (returned).
fn log_tables(l: &Listener, snap: &Snapshot, old: Option<&Snapshot>) -> Option<u64> {
    if l.balance != Policy::Maglev || l.protocol != Protocol::Tcp && l.protocol != Protocol::Udp {
        return None;
    }
    let m = snap.tables.maglev()?;
    let per = m.slots_per_backend();
    let (min, max) = (
        per.iter().copied().min().unwrap_or(0),
        per.iter().copied().max().unwrap_or(0),
    );
    let moved = old
        .and_then(|o| o.tables.maglev().map(|om| (o, om)))
        .map(|(o, om)| slots_moved(om, o, m, snap));
    match moved {
        Some(k) => info!(
            "listener \"{}\": maglev table rebuilt (generation {}): slots moved: {}/{}, slots per backend min {} max {}",
            l.name, snap.generation, k, m.size(), min, max
        ),
        None => info!(
            "listener \"{}\": maglev table built: {} slots, {} backends, slots per backend min {} max {}",
            l.name,
            m.size(),
            per.len(),
            min,
            max
        ),
    }
    moved
}

fn slots_moved(old: &Maglev, old_snap: &Snapshot, new: &Maglev, new_snap: &Snapshot) -> u64 {
    let oa: Vec<SocketAddr> = old_snap.members.iter().map(|m| m.address).collect();
    let na: Vec<SocketAddr> = new_snap.members.iter().map(|m| m.address).collect();
    Maglev::slots_moved(old, &oa, new, &na)
}
