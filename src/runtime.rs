//! Starts the control plane and the workers, binds every listener's `SO_REUSEPORT` sockets (one
//! per worker), handles signals and fans shutdown out to the workers.
//!
//! Signals are blocked in every thread and taken synchronously here with `sigtimedwait`, so no
//! async-signal-safety concerns reach the rest of the crate. SIGTERM/SIGINT drain (a second one
//! stops hard); SIGHUP is logged (reload comes with the operations issue).
//! Must not: touch rings or connections; it talks to workers only through `worker::Shared`.

use crate::admin::{self, AdminState, ListenerView};
use crate::config::{Config, Protocol};
use crate::control::{self, Control, Request};
use crate::sys;
use crate::uring::{self, Ring};
use crate::worker::{self, ListenerSpec, Shared, WorkerSpec, DRAIN, HARD_STOP};
use log::{error, info, warn};
use nix::sys::signal::{SigSet, Signal};
use socket2::{Domain, Socket, Type};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Listen backlog asked of the kernel (capped by net.core.somaxconn).
const BACKLOG: i32 = 65535;

/// Runtime failures (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}")]
    IoUring(String),
    #[error("listener \"{listener}\": cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start worker {id}: {source}")]
    Worker { id: usize, source: std::io::Error },
    #[error("worker {id} failed: {reason}")]
    WorkerFailed { id: usize, reason: String },
    #[error("admin: cannot serve on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("signal setup failed: {0}")]
    Signals(nix::Error),
}

/// Binds one listening socket; `port 0` is resolved by the first bind and reused by the rest.
fn bind_tcp(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: no setsockopt per accept.
    s.set_tcp_nodelay(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s)
}

/// Binds `workers` sockets for one listener; returns them and the actual address.
fn bind_listener(
    name: &str,
    addr: SocketAddr,
    workers: usize,
) -> Result<(Vec<Socket>, SocketAddr), RuntimeError> {
    let err = |source| RuntimeError::Bind {
        listener: name.to_string(),
        addr,
        source,
    };
    let first = bind_tcp(addr).map_err(err)?;
    let actual = first
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(addr);
    let mut socks = vec![first];
    for _ in 1..workers {
        socks.push(bind_tcp(actual).map_err(err)?);
    }
    Ok((socks, actual))
}

/// Runs ringlb until a stop signal has been handled and every worker has exited.
pub fn run(config: Config, path: &std::path::Path) -> Result<(), RuntimeError> {
    Ring::probe().map_err(|e| RuntimeError::IoUring(uring::unavailable_reason(&e)))?;
    match sys::raise_nofile_limit() {
        Ok((old, new)) if old != new => info!("raised RLIMIT_NOFILE soft limit {old} -> {new}"),
        Ok(_) => {}
        Err(e) => warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    let workers = config.runtime.workers;
    let epoch = Instant::now();
    let control = Control::new(&config);
    let mut views: Vec<ListenerView> = Vec::new();

    // Bind everything before any thread starts so bind errors are reported up front.
    let mut per_worker: Vec<Vec<ListenerSpec>> = (0..workers).map(|_| Vec::new()).collect();
    for cl in &control.listeners {
        let l = &cl.config;
        if l.protocol != Protocol::Tcp {
            continue;
        }
        let (socks, actual) = bind_listener(&l.name, l.bind, workers)?;
        views.push(ListenerView {
            name: l.name.clone(),
            protocol: l.protocol.name(),
            bound: Some(actual),
            published: cl.published.clone(),
            stats: cl.stats.clone(),
        });
        info!(
            "listener \"{}\" listening on {} (tcp, {}, {} backends, {} workers)",
            l.name,
            actual,
            l.balance.name(),
            l.backends.len(),
            workers
        );
        let name: Arc<str> = Arc::from(l.name.as_str());
        for (w, sock) in socks.into_iter().enumerate() {
            per_worker[w].push(ListenerSpec {
                name: name.clone(),
                socket: sock,
                published: cl.published.clone(),
                stats: cl.stats.clone(),
                needs_client_addr: l.balance == crate::balance::Policy::Maglev,
            });
        }
    }

    let mut sigs = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        sigs.add(s);
    }
    sigs.thread_block().map_err(RuntimeError::Signals)?;

    let mut shared = Vec::with_capacity(workers);
    let mut handles: Vec<JoinHandle<std::io::Result<()>>> = Vec::with_capacity(workers);
    for (id, listeners) in per_worker.into_iter().enumerate() {
        let sh =
            Arc::new(Shared::new(id, epoch).map_err(|source| RuntimeError::Worker { id, source })?);
        let spec = WorkerSpec {
            shared: sh.clone(),
            listeners,
            workers,
        };
        let h = std::thread::Builder::new()
            .name(format!("ringlb-w{id}"))
            .spawn(move || worker::run(spec))
            .map_err(|source| RuntimeError::Worker { id, source })?;
        shared.push(sh);
        handles.push(h);
    }
    // Control thread and admin endpoint.
    let (req_tx, req_rx) = mpsc::channel::<Request>();
    let control_hb = Arc::new(AtomicU64::new(0));
    let admin_state = Arc::new(AdminState {
        epoch,
        listeners: arc_swap::ArcSwap::from_pointee(views),
        registry: control.registry.clone(),
        worker_heartbeats: shared.iter().map(|s| s.heartbeat.clone()).collect(),
        control_heartbeat: control_hb.clone(),
        requests: Mutex::new(req_tx.clone()),
    });
    let admin_bind = config.admin.bind;
    let admin_addr = admin::start(admin_bind, admin_state).map_err(|source| {
        shared.iter().for_each(|w| w.request_stop(HARD_STOP));
        RuntimeError::Admin {
            addr: admin_bind,
            source,
        }
    })?;
    admin::log_started(admin_addr);
    let n_listeners = control.listeners.len();
    let drain_timeout = config.runtime.drain_timeout;
    let control_stop = Arc::new(AtomicBool::new(false));
    let control_handle = {
        let (stop, path) = (control_stop.clone(), path.to_path_buf());
        std::thread::Builder::new()
            .name("ringlb-control".into())
            .spawn(move || {
                control::run_thread(control, config, path, req_rx, control_hb, epoch, stop)
            })
            .map_err(|source| RuntimeError::Worker {
                id: usize::MAX,
                source,
            })?
    };
    info!("ready: {n_listeners} listener(s), {workers} worker(s), drain timeout {drain_timeout:?}");

    // Main loop: wait for signals, watch workers.
    let mut drain_deadline: Option<Instant> = None;
    let mut hard = false;
    loop {
        if let Some(sig) = sys::wait_signal(&sigs, Duration::from_millis(100)) {
            match Signal::try_from(sig) {
                Ok(Signal::SIGHUP) => {
                    info!("SIGHUP received: reloading {}", path.display());
                    let _ = req_tx.send(Request::Reload { reply: None });
                }
                Ok(s) => {
                    if drain_deadline.is_none() {
                        drain_deadline = Some(Instant::now() + drain_timeout);
                        shared.iter().for_each(|w| w.request_stop(DRAIN));
                        // Say "draining" only once every worker's listening socket is closed.
                        let t0 = Instant::now();
                        while t0.elapsed() < Duration::from_secs(2)
                            && !shared.iter().all(|w| w.listeners_closed.load(Ordering::SeqCst))
                        {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        let live: u64 = shared.iter().map(|s| s.live.load(Ordering::Relaxed)).sum();
                        info!(
                            "{s} received: listeners closed, new connections are refused; draining {live} open connection(s) for up to {drain_timeout:?} (send again to stop at once)"
                        );
                    } else if !hard {
                        info!("{s} received again: closing every connection now");
                        hard = true;
                        shared.iter().for_each(|w| w.request_stop(HARD_STOP));
                    }
                }
                Err(_) => {}
            }
        }
        if let Some(d) = drain_deadline {
            if !hard && Instant::now() >= d {
                let live: u64 = shared.iter().map(|s| s.live.load(Ordering::Relaxed)).sum();
                info!("drain timeout reached: closing {live} remaining connection(s)");
                hard = true;
                shared.iter().for_each(|w| w.request_stop(HARD_STOP));
            }
        }
        if let Some((id, _)) = handles.iter().enumerate().find(|(_, h)| h.is_finished()) {
            if drain_deadline.is_none() {
                // A worker ended without being asked: the process cannot serve its share.
                let h = handles.swap_remove(id);
                let reason = match h.join() {
                    Ok(Ok(())) => "exited unexpectedly".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "panicked".to_string(),
                };
                error!("worker {id} failed: {reason}; stopping");
                shared.iter().for_each(|w| w.request_stop(HARD_STOP));
                for h in handles {
                    let _ = h.join();
                }
                return Err(RuntimeError::WorkerFailed { id, reason });
            }
            if handles.iter().all(|h| h.is_finished()) {
                let mut failed = None;
                for (id, h) in handles.into_iter().enumerate() {
                    match h.join() {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => failed = Some((id, e.to_string())),
                        Err(_) => failed = Some((id, "panicked".to_string())),
                    }
                }
                if let Some((id, reason)) = failed {
                    return Err(RuntimeError::WorkerFailed { id, reason });
                }
                control_stop.store(true, Ordering::Relaxed);
                let _ = control_handle.join();
                info!("all connections closed; exiting");
                return Ok(());
            }
        }
    }
}
