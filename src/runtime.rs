//! Starts the control plane and the workers, binds every listener's `SO_REUSEPORT` sockets (one
//! per worker), handles signals and fans shutdown out to the workers. Implements the
//! [`ListenerHost`] through which a reload adds or removes listeners on running workers.
//!
//! Signals are blocked in every thread and taken synchronously here with `sigtimedwait`, so no
//! async-signal-safety concerns reach the rest of the crate. SIGTERM/SIGINT drain (a second one
//! stops hard); SIGHUP reloads the config file.
//! Must not: touch rings or connections; it talks to workers only through `worker::Shared`.

use crate::admin::{self, AdminState, ListenerView};
use crate::backend::{process_ms, ListenerStats};
use crate::balance::Policy;
use crate::config::{Config, Listener, Protocol};
use crate::control::{self, Bound, Control, ListenerHost, Request};
use crate::snapshot::Published;
use crate::sys;
use crate::worker::{self, Command, ListenerSpec, Shared, WorkerSpec, DRAIN, HARD_STOP};
use arc_swap::ArcSwap;
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
    #[error("admin: cannot serve on {bind}: {source}{}", admin_hint(.source))]
    Admin {
        bind: crate::config::AdminBind,
        source: std::io::Error,
    },
    #[error("signal setup failed: {0}")]
    Signals(nix::Error),
}

/// What to do about an admin socket someone else holds.
fn admin_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "; another ringlb may hold it: set [admin] bind to a free address (or \"none\")"
        }
        _ => "",
    }
}

/// Binds one listening socket with the listener's socket options (inherited by accepted sockets).
fn bind_tcp(addr: SocketAddr, l: &Listener) -> std::io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    // Accepted sockets inherit TCP_NODELAY and keepalive settings from the listener on Linux:
    // no setsockopt per accept.
    s.set_tcp_nodelay(true)?;
    if let Some(idle) = l.tcp_keepalive {
        s.set_tcp_keepalive(&worker::keepalive_params(idle))?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s)
}

/// Binds one UDP socket (SO_REUSEPORT: the kernel keeps a client's 4-tuple on one worker).
fn bind_udp(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.nonblocking().cloexec(),
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Bursts of datagrams queue here while a worker is busy.
    let _ = s.set_recv_buffer_size(4 << 20);
    if addr.ip().is_unspecified() {
        // A wildcard bind must answer from the address each client sent to.
        sys::enable_pktinfo(std::os::fd::AsFd::as_fd(&s), addr.is_ipv6())?;
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// Binds `workers` sockets for one listener; `port 0` is resolved by the first bind and reused
/// by the rest. Returns them and the actual address.
fn bind_listener(l: &Listener, workers: usize) -> Result<Bound, RuntimeError> {
    let err = |source| RuntimeError::Bind {
        listener: l.name.clone(),
        addr: l.bind,
        source,
    };
    let bind = |addr| match l.protocol {
        Protocol::Tcp => bind_tcp(addr, l),
        Protocol::Udp => bind_udp(addr),
    };
    let first = bind(l.bind).map_err(err)?;
    let actual = first
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(l.bind);
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(bind(actual).map_err(err)?);
    }
    Ok(Bound {
        sockets,
        addr: actual,
    })
}

fn log_listening(l: &Listener, addr: SocketAddr, workers: usize) {
    info!(
        "listener \"{}\" listening on {} ({}, {}, {} backends, {} workers)",
        l.name,
        addr,
        l.protocol.name(),
        l.balance.name(),
        l.backends.len(),
        workers
    );
}

fn spec_for(
    l: &Listener,
    socket: Socket,
    published: &Published,
    stats: &Arc<ListenerStats>,
) -> ListenerSpec {
    ListenerSpec {
        name: Arc::from(l.name.as_str()),
        socket,
        published: published.clone(),
        stats: stats.clone(),
        needs_client_addr: l.balance == Policy::Maglev,
        udp: l.protocol == Protocol::Udp,
    }
}

/// The runtime side of reloads: binds sockets, hands them to the workers, keeps the admin
/// endpoint's listener list current.
struct Host {
    workers: Vec<Arc<Shared>>,
    views: Arc<ArcSwap<Vec<ListenerView>>>,
}

impl ListenerHost for Host {
    fn bind(&mut self, l: &Listener) -> Result<Bound, String> {
        bind_listener(l, self.workers.len()).map_err(|e| match e {
            RuntimeError::Bind { addr, source, .. } => format!("cannot bind {addr}: {source}"),
            other => other.to_string(),
        })
    }

    fn start(
        &mut self,
        l: &Listener,
        bound: Bound,
        published: Published,
        stats: Arc<ListenerStats>,
    ) {
        log_listening(l, bound.addr, self.workers.len());
        for (w, sock) in self.workers.iter().zip(bound.sockets) {
            w.send(Command::AddListener(spec_for(l, sock, &published, &stats)));
        }
        let mut views: Vec<ListenerView> = self.views.load().as_ref().clone();
        views.retain(|v| v.name != l.name);
        views.push(ListenerView {
            name: l.name.clone(),
            protocol: l.protocol.name(),
            bound: Some(bound.addr),
            published,
            stats,
        });
        self.views.store(Arc::new(views));
    }

    fn remove(&mut self, name: &str) {
        info!("listener \"{name}\" removed: stops accepting; its open connections drain");
        for w in &self.workers {
            w.send(Command::RemoveListener {
                name: Arc::from(name),
            });
        }
        let mut views: Vec<ListenerView> = self.views.load().as_ref().clone();
        views.retain(|v| v.name != name);
        self.views.store(Arc::new(views));
    }
}

/// Runs ringlb until a stop signal has been handled and every worker has exited.
pub fn run(config: Config, path: &std::path::Path) -> Result<(), RuntimeError> {
    // One decision for every worker, said in one line.
    let io = crate::io::choose(config.runtime.io).map_err(RuntimeError::IoUring)?;
    info!("{}", io.line);
    let _ = process_ms(); // fixes the process's time origin
    match sys::raise_nofile_limit() {
        Ok((old, new)) if old != new => info!("raised RLIMIT_NOFILE soft limit {old} -> {new}"),
        Ok(_) => {}
        Err(e) => warn!("cannot raise RLIMIT_NOFILE: {e}"),
    }
    // The admin socket first: a second ringlb on the same host fails here, before it binds
    // (or logs) any listener.
    let admin_listener = admin::bind(&config.admin.bind).map_err(|source| RuntimeError::Admin {
        bind: config.admin.bind.clone(),
        source,
    })?;
    let workers = config.runtime.workers;
    let control = Control::new(&config);
    let mut views: Vec<ListenerView> = Vec::new();

    // Bind everything before any thread starts so bind errors are reported up front.
    let mut per_worker: Vec<Vec<ListenerSpec>> = (0..workers).map(|_| Vec::new()).collect();
    for cl in &control.listeners {
        let l = &cl.config;
        let bound = bind_listener(l, workers)?;
        log_listening(l, bound.addr, workers);
        views.push(ListenerView {
            name: l.name.clone(),
            protocol: l.protocol.name(),
            bound: Some(bound.addr),
            published: cl.published.clone(),
            stats: cl.stats.clone(),
        });
        for (w, sock) in bound.sockets.into_iter().enumerate() {
            per_worker[w].push(spec_for(l, sock, &cl.published, &cl.stats));
        }
    }

    let mut sigs = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        sigs.add(s);
    }
    sigs.thread_block().map_err(RuntimeError::Signals)?;

    let mut shared: Vec<Arc<Shared>> = Vec::with_capacity(workers);
    let mut handles: Vec<JoinHandle<std::io::Result<()>>> = Vec::with_capacity(workers);
    for (id, listeners) in per_worker.into_iter().enumerate() {
        let (sh, commands) =
            Shared::new(id).map_err(|source| RuntimeError::Worker { id, source })?;
        let sh = Arc::new(sh);
        let spec = WorkerSpec {
            shared: sh.clone(),
            io: io.clone(),
            commands,
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
    let control_hb = Arc::new(AtomicU64::new(process_ms()));
    let views = Arc::new(ArcSwap::from_pointee(views));
    let draining = Arc::new(AtomicBool::new(false));
    let admin_state = Arc::new(AdminState {
        draining: draining.clone(),
        listeners: views.clone(),
        registry: control.registry.clone(),
        worker_heartbeats: shared.iter().map(|s| s.heartbeat.clone()).collect(),
        control_heartbeat: control_hb.clone(),
        report: control.report.clone(),
        requests: Mutex::new(req_tx.clone()),
        server: admin::ServerStats::default(),
    });
    let admin_at = admin_listener.as_ref().map(|l| l.local());
    // Held until `run` returns: dropping it removes the admin unix socket.
    let _admin = match admin_listener {
        None => None,
        Some(l) => Some(admin::serve(l, admin_state).map_err(|source| {
            shared.iter().for_each(|w| w.request_stop(HARD_STOP));
            RuntimeError::Admin {
                bind: config.admin.bind.clone(),
                source,
            }
        })?),
    };
    admin::log_started(admin_at.as_ref(), &config.admin);
    let n_listeners = control.listeners.len();
    let drain_timeout = config.runtime.drain_timeout;
    let control_stop = Arc::new(AtomicBool::new(false));
    let host = Box::new(Host {
        workers: shared.clone(),
        views,
    });
    let control_handle = {
        let (stop, path) = (control_stop.clone(), path.to_path_buf());
        std::thread::Builder::new()
            .name("ringlb-control".into())
            .spawn(move || {
                control::run_thread(control, host, config, path, req_rx, control_hb, stop)
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
                        draining.store(true, Ordering::SeqCst);
                        shared.iter().for_each(|w| w.request_stop(DRAIN));
                        // Say "draining" only once every worker's listening socket is closed.
                        let t0 = Instant::now();
                        while t0.elapsed() < Duration::from_secs(2)
                            && !shared
                                .iter()
                                .all(|w| w.listeners_closed.load(Ordering::SeqCst))
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
