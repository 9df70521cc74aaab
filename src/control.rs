//! The control plane: owns the validated config, the backend-stats registry and one published
//! snapshot per listener; builds and publishes snapshots (with a prebuilt Maglev table) and logs
//! what each rebuild changed.
//! Must not: import `worker` or `uring`, or touch rings. Workers only ever see what it publishes.

use crate::backend::{ListenerStats, Registry};
use crate::balance::{Maglev, Policy, Tables};
use crate::config::{Config, Listener};
use crate::snapshot::{Member, Published, Settings, Snapshot};
use arc_swap::ArcSwap;
use log::info;
use std::net::SocketAddr;
use std::sync::Arc;

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
}

impl Control {
    /// Builds and publishes the first snapshot of every listener.
    pub fn new(config: &Config) -> Control {
        let registry = Arc::new(Registry::new(config.runtime.workers));
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let stats = Arc::new(ListenerStats::new(config.runtime.workers));
                let snap = build_snapshot(l, 1, &registry, &stats);
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
        }
    }

    /// Rebuilds and publishes listener `i`'s snapshot from its current config (health changes,
    /// weight changes). Returns the new generation.
    pub fn republish(&mut self, i: usize) -> u64 {
        let l = &mut self.listeners[i];
        l.generation += 1;
        let snap = build_snapshot(&l.config, l.generation, &self.registry, &l.stats);
        let old = l.published.load_full();
        log_tables(&l.config, &snap, Some(&old));
        l.published.store(Arc::new(snap));
        l.generation
    }
}

fn build_snapshot(
    l: &Listener,
    generation: u64,
    registry: &Registry,
    stats: &Arc<ListenerStats>,
) -> Snapshot {
    let members: Vec<Member> = l
        .backends
        .iter()
        .map(|b| Member {
            address: b.address,
            weight: b.weight,
            up: true,
            stats: registry.get(&l.name, b.address),
        })
        .collect();
    let pairs: Vec<(SocketAddr, u32)> = members.iter().map(|m| (m.address, m.weight)).collect();
    Snapshot {
        generation,
        listener: Arc::from(l.name.as_str()),
        settings: Settings {
            connect_timeout: l.connect_timeout,
            idle_timeout: l.idle_timeout,
            max_connections: l.max_connections,
            hash_key: l.hash_key,
        },
        tables: Tables::build(l.balance, &pairs, l.maglev_table_size),
        members,
        listener_stats: stats.clone(),
    }
}

/// Logs a Maglev table's shape and, on a rebuild, how many slots moved.
fn log_tables(l: &Listener, snap: &Snapshot, old: Option<&Snapshot>) {
    if l.balance != Policy::Maglev {
        return;
    }
    let Some(m) = snap.tables.maglev() else {
        return;
    };
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
}

fn slots_moved(old: &Maglev, old_snap: &Snapshot, new: &Maglev, new_snap: &Snapshot) -> u64 {
    let oa: Vec<SocketAddr> = old_snap.members.iter().map(|m| m.address).collect();
    let na: Vec<SocketAddr> = new_snap.members.iter().map(|m| m.address).collect();
    Maglev::slots_moved(old, &oa, new, &na)
}
