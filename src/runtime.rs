//! Starts the control plane and the workers, binds every listener's `SO_REUSEPORT` sockets (one
//! per worker), handles signals and fans shutdown out to the workers. Implements the
//! [`ListenerHost`] through which a reload adds or removes listeners on running workers.
//!
//! Signals are blocked in every thread and taken synchronously here with `sigtimedwait`, so no
//! async-signal-safety concerns reach the rest of the crate. SIGTERM/SIGINT drain (a second one
//! stops hard); SIGHUP reloads the config file; SIGUSR1 reopens the access log file. Tells systemd
//! (sd_notify, when `NOTIFY_SOCKET` is set) when it is ready and when it stops. SIGUSR2 (and
//! `POST /upgrade`) starts a binary upgrade (`crate::upgrade`): the new process gets this one's
//! listening sockets; once it is ready this process drains as on SIGTERM, without telling
//! systemd it stops (the new process sent `MAINPID=`).
//! Must not: touch rings or connections; it talks to workers only through `worker::Shared`.

use crate::admin::{self, AdminState, ListenerView};
use crate::backend::{process_ms, ListenerStats};
use crate::balance::Policy;
use crate::config::{Config, Listener, Protocol};
use crate::control::{self, Bound, Control, ListenerHost, Request};
use crate::notify;
use crate::snapshot::Published;
use crate::sys;
use crate::upgrade;
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
    #[error("listener \"{listener}\": cannot bind {addr}: {source}{}", bind_hint(*.addr, .source))]
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
    #[error("binary upgrade: {0}")]
    Upgrade(String),
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

/// The lowest port an unprivileged process may bind (`net.ipv4.ip_unprivileged_port_start`, which
/// applies to IPv6 too).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// What to do about a bind error, when ringlb knows: a privileged port refused for lack of
/// `CAP_NET_BIND_SERVICE`.
fn bind_hint(addr: SocketAddr, e: &std::io::Error) -> String {
    let start = unprivileged_port_start();
    if e.kind() != std::io::ErrorKind::PermissionDenied || addr.port() >= start {
        return String::new();
    }
    let exe = std::env::current_exe().map_or("ringlb".into(), |p| p.display().to_string());
    format!(
        " (ports below {start} need root or CAP_NET_BIND_SERVICE: the systemd unit grants it with \
         AmbientCapabilities=CAP_NET_BIND_SERVICE; otherwise run `setcap \
         cap_net_bind_service=+ep {exe}`)"
    )
}

/// Whether another socket already holds `addr` in a way our `SO_REUSEPORT` bind would share:
/// a bind without `SO_REUSEPORT` fails with `EADDRINUSE`. (TCP probes keep `SO_REUSEADDR`, so
/// connections of an earlier run in TIME_WAIT do not count; UDP probes do not, since UDP
/// sockets with `SO_REUSEADDR` may share a port.) Nothing is listened on; the probe closes.
fn port_in_use(addr: SocketAddr, protocol: Protocol) -> bool {
    let ty = match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let Ok(s) = Socket::new(Domain::for_address(addr), ty.cloexec(), None) else {
        return false;
    };
    if protocol == Protocol::Tcp && s.set_reuse_address(true).is_err() {
        return false;
    }
    if addr.is_ipv6() && s.set_only_v6(true).is_err() {
        return false;
    }
    matches!(s.bind(&addr.into()), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
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

/// Serves a listener on the sockets a binary upgrade's previous process handed over (`socks`, in
/// worker order, already bound where the listener wants), binding more when this config runs
/// more workers; sockets beyond the worker count close.
fn adopt_listener(
    l: &Listener,
    workers: usize,
    socks: Vec<std::os::fd::OwnedFd>,
) -> Result<Bound, RuntimeError> {
    let mut sockets: Vec<Socket> = socks.into_iter().map(Socket::from).collect();
    let actual = sockets[0]
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(l.bind);
    if sockets.len() > workers {
        warn!(
            "listener \"{}\": the previous process had {} sockets, this one runs {workers} \
             workers; connections queued on the other {} are lost",
            l.name,
            sockets.len(),
            sockets.len() - workers
        );
        sockets.truncate(workers);
    }
    let err = |source| RuntimeError::Bind {
        listener: l.name.clone(),
        addr: actual,
        source,
    };
    while sockets.len() < workers {
        let s = match l.protocol {
            Protocol::Tcp => bind_tcp(actual, l),
            Protocol::Udp => bind_udp(actual),
        };
        sockets.push(s.map_err(err)?);
    }
    Ok(Bound {
        sockets,
        addr: actual,
    })
}

/// Keeps a duplicate of each of a listener's sockets for a later binary upgrade.
fn keep_for_upgrade(handover: &upgrade::Sockets, l: &Listener, sockets: &[Socket]) {
    let kind = match l.protocol {
        Protocol::Tcp => upgrade::Kind::Tcp,
        Protocol::Udp => upgrade::Kind::Udp,
    };
    for (w, sock) in sockets.iter().enumerate() {
        handover.add(kind.clone(), &l.name, w, sock);
    }
}

/// Binds `workers` sockets for one listener; `port 0` is resolved by the first bind and reused
/// by the rest. Returns them and the actual address. With `probe`, first checks whether another
/// process already has the address with `SO_REUSEPORT`: our bind then succeeds and the kernel
/// silently splits new connections between the two, so that is warned about.
fn bind_listener(l: &Listener, workers: usize, probe: bool) -> Result<Bound, RuntimeError> {
    let shared = probe && l.bind.port() != 0 && port_in_use(l.bind, l.protocol);
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
    if shared {
        warn!(
            "listener \"{}\": {} {} is already bound by another process with SO_REUSEPORT \
             (another ringlb?): the kernel now splits new {} between it and this one; stop the \
             other or change the port",
            l.name,
            l.protocol.name(),
            actual,
            match l.protocol {
                Protocol::Tcp => "connections",
                Protocol::Udp => "flows",
            }
        );
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
        match l.pools.as_slice() {
            [p] if l.routing.is_none() => p.balance.name().to_string(),
            pools => format!("{} pools", pools.len()),
        },
        l.all_backends().count(),
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
        needs_client_addr: l.pools.iter().any(|p| p.balance == Policy::Maglev),
        udp: l.protocol == Protocol::Udp,
        // Started by a binary upgrade: UDP listeners wait for the previous process's flows.
        hold_udp: l.protocol == Protocol::Udp && upgrade::is_upgrade(),
    }
}

/// The runtime side of reloads: binds sockets, hands them to the workers, keeps the admin
/// endpoint's listener list current.
struct Host {
    workers: Vec<Arc<Shared>>,
    views: Arc<ArcSwap<Vec<ListenerView>>>,
    handover: Arc<upgrade::Sockets>,
}

impl ListenerHost for Host {
    fn bind(&mut self, l: &Listener) -> Result<Bound, String> {
        // A listener this reload replaces may still hold the address: that is not another process.
        let ours = self.views.load().iter().any(|v| {
            v.protocol == l.protocol.name()
                && v.bound.is_some_and(|b| {
                    b.port() == l.bind.port()
                        && b.is_ipv4() == l.bind.is_ipv4()
                        && (b.ip() == l.bind.ip()
                            || b.ip().is_unspecified()
                            || l.bind.ip().is_unspecified())
                })
        });
        bind_listener(l, self.workers.len(), !ours).map_err(|e| match e {
            RuntimeError::Bind { addr, source, .. } => {
                format!("cannot bind {addr}: {source}{}", bind_hint(addr, &source))
            }
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
        self.handover.remove(&l.name);
        keep_for_upgrade(&self.handover, l, &bound.sockets);
        for (w, sock) in self.workers.iter().zip(bound.sockets) {
            let mut spec = spec_for(l, sock, &published, &stats);
            spec.hold_udp = false; // added by a reload: no flows to wait for
            w.send(Command::AddListener(spec));
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
        self.handover.remove(name);
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
    // Started by a binary upgrade: the previous process's sockets.
    let mut inherited = upgrade::Inherited::receive().map_err(RuntimeError::Upgrade)?;
    let handover = Arc::new(upgrade::Sockets::default());
    // The admin socket first: a second ringlb on the same host fails here, before it binds
    // (or logs) any listener.
    let adopted = inherited
        .as_mut()
        .and_then(|i| i.take_admin())
        .and_then(|fd| admin::adopt(&config.admin.bind, fd));
    let admin_listener = match adopted {
        Some(l) => Some(l),
        None => admin::bind(&config.admin.bind).map_err(|source| RuntimeError::Admin {
            bind: config.admin.bind.clone(),
            source,
        })?,
    };
    if let Some(l) = &admin_listener {
        handover.add(upgrade::Kind::Admin, "", 0, l.fd());
    }
    let workers = config.runtime.workers;
    let control = Control::new(&config);
    let mut views: Vec<ListenerView> = Vec::new();

    // Bind everything before any thread starts so bind errors are reported up front.
    let mut per_worker: Vec<Vec<ListenerSpec>> = (0..workers).map(|_| Vec::new()).collect();
    for cl in &control.listeners {
        let l = &cl.config;
        let socks = inherited
            .as_mut()
            .map(|i| i.take_listener(&l.name, l.protocol == Protocol::Udp, l.bind))
            .unwrap_or_default();
        let bound = if socks.is_empty() {
            bind_listener(l, workers, true)?
        } else {
            adopt_listener(l, workers, socks)?
        };
        keep_for_upgrade(&handover, l, &bound.sockets);
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
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
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
    let (trigger, upgrade_rx) = upgrade::Trigger::new();
    let registry = control.registry.clone();
    let admin_state = Arc::new(AdminState {
        draining: draining.clone(),
        listeners: views.clone(),
        registry: control.registry.clone(),
        worker_heartbeats: shared.iter().map(|s| s.heartbeat.clone()).collect(),
        control_heartbeat: control_hb.clone(),
        report: control.report.clone(),
        requests: Mutex::new(req_tx.clone()),
        server: admin::ServerStats::default(),
        io: io.clone(),
        upgrade: trigger,
    });
    let admin_upgrade = admin_state.clone();
    let admin_at = admin_listener.as_ref().map(|l| l.local());
    // Held until `run` returns: dropping it removes the admin unix socket.
    let mut admin_handle = match admin_listener {
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
        handover: handover.clone(),
    });
    let watchdog = notify::Watchdog::from_env(shared.iter().map(|s| s.heartbeat.clone()).collect());
    let control_handle = {
        let (stop, path) = (control_stop.clone(), path.to_path_buf());
        std::thread::Builder::new()
            .name("ringlb-control".into())
            .spawn(move || {
                control::run_thread(
                    control, host, config, path, req_rx, control_hb, stop, watchdog,
                )
            })
            .map_err(|source| RuntimeError::Worker {
                id: usize::MAX,
                source,
            })?
    };
    let ready = format!(
        "ready: {n_listeners} listener(s), {workers} worker(s), drain timeout {drain_timeout:?}"
    );
    if let Some(i) = &inherited {
        for name in i.leftover() {
            info!("listener \"{name}\" of the previous process is not in this config: closed");
        }
    }
    drop(inherited);
    info!("{ready}");
    if upgrade::is_upgrade() {
        // systemd: this process is the service now (NotifyAccess=all lets it say so).
        notify::main_pid(std::process::id());
        let adopt_to = shared.clone();
        upgrade::ready(
            registry.clone(),
            workers,
            Box::new(move |w, flows| {
                if let Some(sh) = adopt_to.get(w) {
                    sh.send(Command::AdoptFlows(flows));
                }
            }),
        );
        info!(
            "upgrade: told the previous process that pid {} serves",
            std::process::id()
        );
    }
    notify::ready(&ready);
    // A binary upgrade in progress (its thread) and the requests waiting for its outcome.
    type Attempt = (
        JoinHandle<Result<upgrade::Started, String>>,
        Vec<upgrade::Reply>,
    );
    let mut attempt: Option<Attempt> = None;
    let mut upgraded: Option<u32> = None;

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
                Ok(Signal::SIGUSR1) => {
                    info!("SIGUSR1 received: reopening the access log");
                    crate::logging::reopen_access_log();
                }
                Ok(Signal::SIGUSR2) => {
                    info!("SIGUSR2 received: binary upgrade");
                    upgrade_requested(None, &mut attempt, upgraded, drain_deadline, &handover);
                }
                Ok(s) => {
                    if drain_deadline.is_none() {
                        notify::stopping(&format!("{s} received: draining"));
                        drain_deadline = Some(Instant::now() + drain_timeout);
                        draining.store(true, Ordering::SeqCst);
                        handover.clear();
                        drain_workers(&shared, &format!("{s} received"), drain_timeout);
                    } else if !hard {
                        info!("{s} received again: closing every connection now");
                        hard = true;
                        shared.iter().for_each(|w| w.request_stop(HARD_STOP));
                    }
                }
                Err(_) => {}
            }
        }
        while let Ok(reply) = upgrade_rx.try_recv() {
            info!("POST /upgrade: binary upgrade");
            upgrade_requested(
                Some(reply),
                &mut attempt,
                upgraded,
                drain_deadline,
                &handover,
            );
        }
        if attempt.as_ref().is_some_and(|(h, _)| h.is_finished()) {
            let Some((h, replies)) = attempt.take() else {
                unreachable!("checked above")
            };
            let outcome = h
                .join()
                .unwrap_or_else(|_| Err("the upgrade thread panicked".into()));
            match outcome {
                Ok(started) => {
                    let pid = started.pid;
                    info!(
                        "upgrade: pid {pid} is ready and serves; this process stops accepting \
                         and drains (up to {drain_timeout:?})"
                    );
                    for r in replies {
                        let _ = r.send(Ok(pid));
                    }
                    admin_upgrade.upgrade.stop_accepting();
                    if let Some(h) = admin_handle.as_mut() {
                        h.keep_socket_file();
                    }
                    upgraded = Some(pid);
                    drain_deadline = Some(Instant::now() + drain_timeout);
                    draining.store(true, Ordering::SeqCst);
                    // UDP first: stop receiving, give the flows away, then the TCP drain.
                    shared.iter().for_each(|w| w.request_stop(DRAIN));
                    // The new process holds the sockets now.
                    handover.clear();
                    let flows = export_flows(&shared);
                    started.send_flows(flows);
                    started.report_counts(registry.clone());
                    drain_workers(&shared, "upgrade", drain_timeout);
                }
                Err(why) => {
                    error!("upgrade failed: {why}; this process keeps serving");
                    for r in replies {
                        let _ = r.send(Err((500, format!("upgrade failed: {why}"))));
                    }
                }
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
                match upgraded {
                    Some(pid) => info!("all connections closed; exiting (pid {pid} serves)"),
                    None => info!("all connections closed; exiting"),
                }
                return Ok(());
            }
        }
    }
}

/// Stops every worker accepting (their listening descriptors close; sockets a binary upgrade
/// handed over stay open in the new process) and says so once every one has.
fn drain_workers(shared: &[Arc<Shared>], why: &str, drain_timeout: Duration) {
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
        "{why}: listeners closed, new connections are refused; draining {live} open connection(s) for up to {drain_timeout:?} (send again to stop at once)"
    );
}

/// A binary upgrade in progress (its thread) and the requests waiting for its outcome.
type Attempt = (
    JoinHandle<Result<upgrade::Started, String>>,
    Vec<upgrade::Reply>,
);

/// Starts an upgrade on its own thread, or refuses (409) while one runs or after this process
/// handed over (it drains).
fn upgrade_requested(
    reply: Option<upgrade::Reply>,
    attempt: &mut Option<Attempt>,
    upgraded: Option<u32>,
    draining: Option<Instant>,
    handover: &Arc<upgrade::Sockets>,
) {
    let refuse = |reply: Option<upgrade::Reply>, why: String| {
        warn!("upgrade refused: {why}");
        if let Some(r) = reply {
            let _ = r.send(Err((409, why)));
        }
    };
    if let Some(pid) = upgraded {
        return refuse(
            reply,
            format!("already upgraded: pid {pid} serves, this one drains"),
        );
    }
    if draining.is_some() {
        return refuse(reply, "this process is draining (stopping)".into());
    }
    if attempt.is_some() {
        return refuse(reply, "an upgrade is already in progress".into());
    }
    let sockets = handover.clone();
    match std::thread::Builder::new()
        .name("ringlb-upgrade".into())
        .spawn(move || upgrade::attempt(&sockets))
    {
        Ok(h) => *attempt = Some((h, reply.into_iter().collect())),
        Err(e) => {
            error!("upgrade failed: cannot start its thread: {e}");
            if let Some(r) = reply {
                let _ = r.send(Err((500, format!("cannot start the upgrade thread: {e}"))));
            }
        }
    }
}

/// Asks every worker (already draining) for its UDP flows: (worker, flow).
fn export_flows(shared: &[Arc<Shared>]) -> Vec<(usize, worker::HandedFlow)> {
    let mut out = Vec::new();
    for (id, w) in shared.iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        if !w.send(Command::ExportFlows(tx)) {
            continue;
        }
        match rx.recv_timeout(Duration::from_secs(2)) {
            Ok(flows) => out.extend(flows.into_iter().map(|f| (id, f))),
            Err(_) => warn!("upgrade: worker {id} did not hand its UDP flows over"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fact `bind_tcp` rests on (no setsockopt per accepted client): on Linux a socket
    /// accepted from the listener comes with its TCP_NODELAY and its keepalive settings (on,
    /// idle time, interval, probes), read back with getsockopt on a real accepted socket.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive_from_the_listener() {
        let cfg = Config::parse(
            "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\ntcp_keepalive = \"120s\"\n\
             [[listeners.backends]]\naddress = \"127.0.0.1:9\"\n",
        )
        .expect("config");
        let l = &cfg.listeners[0];
        let s = bind_tcp("127.0.0.1:0".parse().unwrap(), l).expect("bind");
        s.set_nonblocking(false).unwrap();
        let addr = s.local_addr().unwrap().as_socket().unwrap();
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let (acc, _) = s.accept().expect("accept");
        assert!(acc.tcp_nodelay().unwrap(), "TCP_NODELAY");
        assert!(acc.keepalive().unwrap(), "SO_KEEPALIVE");
        let idle = acc.tcp_keepalive_time().unwrap();
        assert_eq!(idle, Duration::from_secs(120), "TCP_KEEPIDLE");
        let interval = acc.tcp_keepalive_interval().unwrap();
        assert_eq!(interval, Duration::from_secs(20), "TCP_KEEPINTVL");
        assert_eq!(acc.tcp_keepalive_retries().unwrap(), 6, "TCP_KEEPCNT");
    }
}
