//! The per-core worker: one io_uring, one `SO_REUSEPORT` listening socket per TCP listener, and a
//! slab of connections that live their whole life here (accept → pick → connect → splice ⇄ →
//! close).
//!
//! The worker reads everything it knows from snapshots (`crate::snapshot`); it never imports
//! `config`, `control` or `health`. Per completion it does no locking, no allocation (the slab,
//! pipe pool and completion buffer grow, then are reused) and no logging above `debug` per
//! connection. `conn.rs` is the pure state machine; this file applies its steps to the ring.
//!
//! Ownership rule the ring relies on: a connection's fds and pipes are dropped (closed) only in
//! `finalize`, which runs when the connection has no operation in flight (`inflight == 0`).

pub mod conn;

use crate::backend::{bump, BackendStats, ListenerStats};
use crate::balance::PickState;
use crate::snapshot::{Published, Reader};
use crate::sys::{self, Pipe, PIPE_SIZE};
use crate::uring::{Completion, Op, Ring, TimespecId, Token};
use conn::{CloseReason, Dir, Flow, Side, Step};
use log::{debug, info, warn};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `Shared::stop` values.
pub const RUN: u8 = 0;
/// Stop accepting; let open connections finish.
pub const DRAIN: u8 = 1;
/// Close everything now and exit.
pub const HARD_STOP: u8 = 2;

/// Connect attempts per client connection (the first pick plus retries on other backends).
pub const MAX_CONNECT_ATTEMPTS: u8 = 3;
/// Idle pipes a worker keeps for reuse; more are closed.
const PIPE_POOL_MAX: usize = 64;
/// Ring size (submission entries; the completion queue is 4×).
const RING_ENTRIES: u32 = 4096;
/// Period of the worker's tick (heartbeat, accept re-arm, stop flag).
const TICK: Duration = Duration::from_millis(100);
/// How often the idle-timeout scan runs.
const IDLE_SCAN_MS: u64 = 250;
/// Back-off before re-arming accept after EMFILE/ENFILE/ENOMEM.
const ACCEPT_BACKOFF_MS: u64 = 100;

/// State a worker shares with the runtime (not with other workers).
#[derive(Debug)]
pub struct Shared {
    pub id: usize,
    /// Written by the runtime to wake the ring (stop requests).
    pub wake: OwnedFd,
    /// RUN, DRAIN or HARD_STOP.
    pub stop: AtomicU8,
    /// Milliseconds since `epoch`, stored every tick (liveness, read by the admin endpoint).
    pub heartbeat: Arc<AtomicU64>,
    /// The process-wide time origin heartbeats are measured from.
    pub epoch: Instant,
    /// Connections open on this worker.
    pub live: AtomicU64,
    /// Set once, while draining, every listening socket of this worker is closed.
    pub listeners_closed: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn new(id: usize, epoch: Instant) -> io::Result<Shared> {
        Ok(Shared {
            id,
            wake: sys::eventfd()?,
            stop: AtomicU8::new(RUN),
            heartbeat: Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64)),
            epoch,
            live: AtomicU64::new(0),
            listeners_closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Asks the worker to stop (DRAIN or HARD_STOP) and wakes it.
    pub fn request_stop(&self, how: u8) {
        self.stop.fetch_max(how, Ordering::SeqCst);
        sys::eventfd_signal(self.wake.as_fd());
    }
}

/// One listener as handed to a worker: its own listening socket plus the published snapshot.
pub struct ListenerSpec {
    pub name: Arc<str>,
    pub socket: socket2::Socket,
    pub published: Published,
    pub stats: Arc<ListenerStats>,
    /// Whether the client address is needed per connection (hash-based policy or debug logs).
    pub needs_client_addr: bool,
}

/// Everything a worker needs to run.
pub struct WorkerSpec {
    pub shared: Arc<Shared>,
    pub listeners: Vec<ListenerSpec>,
    /// Worker count, to split each listener's max_connections.
    pub workers: usize,
}

struct Listener {
    name: Arc<str>,
    socket: Option<socket2::Socket>,
    reader: Reader,
    pick: PickState,
    stats: Arc<ListenerStats>,
    needs_client_addr: bool,
    /// A multishot accept is armed (until its final completion arrives).
    accepting: bool,
    /// At this worker's share of max_connections: accept stays disarmed until below it.
    paused: bool,
    rearm_at_ms: u64,
    live: u32,
}

struct Conn {
    listener: u32,
    client: OwnedFd,
    client_addr: Option<SocketAddr>,
    backend: Option<OwnedFd>,
    member: Option<Arc<BackendStats>>,
    backend_addr: Option<SocketAddr>,
    tried: [Option<SocketAddr>; MAX_CONNECT_ATTEMPTS as usize],
    attempts: u8,
    flows: [Flow; 2],
    pipes: [Option<Pipe>; 2],
    /// Operations submitted for this connection whose completion has not arrived.
    inflight: u16,
    connected: bool,
    closing: bool,
    reason: Option<CloseReason>,
    first_eof: Option<Dir>,
    last_active_ms: u64,
    idle_ms: u64,
    opened_ms: u64,
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

struct Worker {
    id: usize,
    shared: Arc<Shared>,
    ring: Ring,
    listeners: Vec<Listener>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    pool: Vec<Pipe>,
    timeouts: Vec<(Duration, TimespecId)>,
    workers: usize,
    start: Instant,
    now_ms: u64,
    next_idle_scan_ms: u64,
    draining: bool,
    hard_stop_at_ms: Option<u64>,
    last_warn_ms: u64,
}

/// Runs a worker until it has drained (or was hard-stopped). Errors only on ring failure.
pub fn run(spec: WorkerSpec) -> io::Result<()> {
    let mut ring = Ring::new(RING_ENTRIES)?;
    let tick = ring.timespec(TICK);
    let shared = spec.shared;
    let listeners = spec
        .listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| Listener {
            name: l.name,
            socket: Some(l.socket),
            reader: Reader::new(l.published),
            pick: PickState::new(0x9e37_79b9_7f4a_7c15 ^ ((shared.id as u64) << 32) ^ i as u64),
            stats: l.stats,
            needs_client_addr: l.needs_client_addr,
            accepting: false,
            paused: false,
            rearm_at_ms: 0,
            live: 0,
        })
        .collect();
    let mut w = Worker {
        id: shared.id,
        shared,
        ring,
        listeners,
        slots: Vec::new(),
        free: Vec::new(),
        pool: Vec::new(),
        timeouts: Vec::new(),
        workers: spec.workers.max(1),
        start: Instant::now(),
        now_ms: 0,
        next_idle_scan_ms: IDLE_SCAN_MS,
        draining: false,
        hard_stop_at_ms: None,
        last_warn_ms: 0,
    };
    w.ring.timer(tick, Token::new(Op::Tick, 0, 0));
    w.ring.poll_multi(
        w.shared.wake.as_raw_fd(),
        libc::POLLIN as u32,
        Token::new(Op::Wake, 0, 0),
    );
    for li in 0..w.listeners.len() {
        w.arm_accept(li);
    }
    w.check_stop();
    let mut completions: Vec<Completion> = Vec::with_capacity(1024);
    loop {
        w.ring.submit_and_wait(1)?;
        w.now_ms = w.start.elapsed().as_millis() as u64;
        completions.clear();
        w.ring.reap(&mut completions);
        for c in &completions {
            w.dispatch(*c);
        }
        if w.finished() {
            break;
        }
    }
    debug!("worker {} exiting", w.id);
    Ok(())
}

impl Worker {
    fn finished(&self) -> bool {
        if !self.draining {
            return false;
        }
        let closed = self.listeners.iter().all(|l| l.socket.is_none());
        if closed {
            self.shared.listeners_closed.store(true, Ordering::SeqCst);
        }
        let idle = closed && self.shared.live.load(Ordering::Relaxed) == 0;
        idle || matches!(self.hard_stop_at_ms, Some(t) if self.now_ms > t + 2000)
    }

    fn dispatch(&mut self, c: Completion) {
        match c.token.op() {
            Some(Op::Accept) => self.on_accept(c.token.index() as usize, c),
            Some(Op::Tick) => self.on_tick(c),
            Some(Op::Wake) => {
                sys::eventfd_drain(self.shared.wake.as_fd());
                if !c.more() {
                    self.ring.poll_multi(
                        self.shared.wake.as_raw_fd(),
                        libc::POLLIN as u32,
                        Token::new(Op::Wake, 0, 0),
                    );
                }
                self.check_stop();
            }
            Some(Op::AcceptCancel) => {}
            Some(op) => self.on_conn_completion(op, c),
            None => {}
        }
    }

    // ---- listeners -------------------------------------------------------------------------

    fn arm_accept(&mut self, li: usize) {
        let l = &mut self.listeners[li];
        if let Some(sock) = &l.socket {
            if !l.accepting && !l.paused && !self.draining {
                self.ring
                    .accept_multi(sock.as_raw_fd(), Token::new(Op::Accept, li as u32, 0));
                l.accepting = true;
            }
        }
    }

    fn on_accept(&mut self, li: usize, c: Completion) {
        if !c.more() {
            self.listeners[li].accepting = false;
            if self.draining {
                // The accept is gone: closing the socket now refuses new SYNs for this worker.
                self.listeners[li].socket = None;
            } else if c.result >= 0 || c.result == -libc::ECANCELED {
                self.arm_accept(li);
            }
        }
        if c.result < 0 {
            let e = -c.result;
            if matches!(
                e,
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
            ) {
                self.listeners[li].rearm_at_ms = self.now_ms + ACCEPT_BACKOFF_MS;
                if self.now_ms >= self.last_warn_ms + 1000 {
                    self.last_warn_ms = self.now_ms;
                    warn!(
                        "listener \"{}\" worker {}: accept failed: {}; backing off {} ms (open connections keep being served)",
                        self.listeners[li].name,
                        self.id,
                        io::Error::from_raw_os_error(e),
                        ACCEPT_BACKOFF_MS
                    );
                }
            } else if e != libc::ECANCELED && !c.more() && !self.draining {
                self.listeners[li].rearm_at_ms = self.now_ms + ACCEPT_BACKOFF_MS;
            }
            return;
        }
        let client = sys::owned_from_completion(c.result);
        if self.draining {
            return; // dropped: closed
        }
        self.admit(li, client);
    }

    fn admit(&mut self, li: usize, client: OwnedFd) {
        let l = &mut self.listeners[li];
        let snap = l.reader.load();
        let limit = (snap.settings.max_connections as usize).div_ceil(self.workers) as u32;
        let idle_ms = snap.settings.idle_timeout.as_millis() as u64;
        let client_addr = if l.needs_client_addr
            || snap.settings.access_log
            || log::log_enabled!(log::Level::Debug)
        {
            sys::peer_addr(client.as_fd())
        } else {
            None
        };
        l.live += 1;
        if l.live >= limit && l.accepting && !l.paused {
            // At our share of max_connections: disarm accept; the kernel backlog holds the rest.
            l.paused = true;
            if let Some(sock) = &l.socket {
                self.ring
                    .cancel_fd(sock.as_raw_fd(), Token::new(Op::AcceptCancel, li as u32, 0));
            }
        }
        bump(&l.stats.worker(self.id).accepted, 1);
        bump(&l.stats.worker(self.id).active, 1);
        self.shared.live.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            listener: li as u32,
            client,
            client_addr,
            backend: None,
            member: None,
            backend_addr: None,
            tried: [None; MAX_CONNECT_ATTEMPTS as usize],
            attempts: 0,
            flows: [Flow::new(), Flow::new()],
            pipes: [None, None],
            inflight: 0,
            connected: false,
            closing: false,
            reason: None,
            first_eof: None,
            last_active_ms: self.now_ms,
            idle_ms,
            opened_ms: self.now_ms,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize].conn = Some(conn);
                i
            }
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    conn: Some(conn),
                });
                (self.slots.len() - 1) as u32
            }
        };
        self.connect_next(idx);
    }

    fn timespec_for(&mut self, d: Duration) -> TimespecId {
        if let Some((_, id)) = self.timeouts.iter().find(|(x, _)| *x == d) {
            return *id;
        }
        let id = self.ring.timespec(d);
        self.timeouts.push((d, id));
        id
    }

    // ---- connections -----------------------------------------------------------------------

    fn token(&self, op: Op, idx: u32) -> Token {
        Token::new(op, idx, self.slots[idx as usize].generation)
    }

    /// Picks a backend not yet tried and starts a connect to it, or closes the client.
    fn connect_next(&mut self, idx: u32) {
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        let l = &mut self.listeners[conn.listener as usize];
        let snap = l.reader.load();
        let tried_buf = conn.tried;
        let n = conn.attempts as usize;
        let tried: [SocketAddr; MAX_CONNECT_ATTEMPTS as usize] =
            std::array::from_fn(|i| tried_buf[i].unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))));
        let picked = snap.pick(&mut l.pick, conn.client_addr.as_ref(), &tried[..n]);
        let Some(mi) = picked else {
            if conn.attempts == 0 {
                bump(&l.stats.worker(self.id).no_backend, 1);
            }
            let reason = conn.reason.take().unwrap_or(CloseReason::NoBackend);
            self.close_conn(idx, reason);
            return;
        };
        let member = &snap.members[mi];
        let addr = member.address;
        let connect_timeout = snap.settings.connect_timeout;
        let stats = member.stats.clone();
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM.nonblocking().cloexec(),
            None,
        );
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                debug!("socket() for backend {addr} failed: {e}");
                self.close_conn(idx, CloseReason::Resource);
                return;
            }
        };
        let _ = sock.set_tcp_nodelay(true);
        let fd: OwnedFd = sock.into();
        stats.inc_active();
        let ts = self.timespec_for(connect_timeout);
        let (ct, tt) = (
            self.token(Op::Connect, idx),
            self.token(Op::ConnectTimeout, idx),
        );
        let conn = self.slots[idx as usize]
            .conn
            .as_mut()
            .expect("checked above");
        conn.tried[conn.attempts as usize] = Some(addr);
        conn.attempts += 1;
        conn.member = Some(stats);
        conn.backend_addr = Some(addr);
        self.ring.connect(fd.as_raw_fd(), idx, &addr, ts, ct, tt);
        conn.backend = Some(fd);
        conn.inflight += 2;
    }

    fn on_conn_completion(&mut self, op: Op, c: Completion) {
        let idx = c.token.index();
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        if !c.token.gen_matches(slot.generation) {
            return; // stale: cannot happen while finalize waits for inflight == 0, kept as a guard
        }
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        conn.inflight -= 1;
        if conn.closing {
            if conn.inflight == 0 {
                self.finalize(idx);
            }
            return;
        }
        let res = c.result;
        let now = self.now_ms;
        let wid = self.id;
        let step = match op {
            Op::Connect => {
                self.on_connect(idx, res);
                return;
            }
            Op::ConnectTimeout | Op::Cancel => return,
            Op::PollIn0 => (Dir::Up, conn.flows[0].on_readable(res)),
            Op::PollIn1 => (Dir::Down, conn.flows[1].on_readable(res)),
            Op::SpliceIn0 | Op::SpliceIn1 => {
                let d = if op == Op::SpliceIn0 {
                    Dir::Up
                } else {
                    Dir::Down
                };
                if res > 0 {
                    conn.last_active_ms = now;
                }
                (d, conn.flows[d.index()].on_spliced_in(res))
            }
            Op::SpliceOut0 | Op::SpliceOut1 => {
                let d = if op == Op::SpliceOut0 {
                    Dir::Up
                } else {
                    Dir::Down
                };
                if res > 0 {
                    conn.last_active_ms = now;
                    if let Some(m) = &conn.member {
                        let w = m.worker(wid);
                        bump(
                            if d == Dir::Up {
                                &w.bytes_up
                            } else {
                                &w.bytes_down
                            },
                            res as u64,
                        );
                    }
                }
                (d, conn.flows[d.index()].on_spliced_out(res))
            }
            Op::PollOut0 => (Dir::Up, conn.flows[0].on_writable(res)),
            Op::PollOut1 => (Dir::Down, conn.flows[1].on_writable(res)),
            Op::Accept | Op::Tick | Op::Wake | Op::AcceptCancel => return,
        };
        self.apply(idx, step.0, step.1);
    }

    fn on_connect(&mut self, idx: u32, res: i32) {
        let wid = self.id;
        let now = self.now_ms;
        let conn = self.slots[idx as usize]
            .conn
            .as_mut()
            .expect("caller checked");
        if res >= 0 {
            conn.connected = true;
            conn.last_active_ms = now;
            if let Some(m) = &conn.member {
                bump(&m.worker(wid).connections, 1);
                m.connect_succeeded();
            }
            debug!(
                "conn {idx}: {:?} -> {:?} connected (attempt {})",
                conn.client_addr, conn.backend_addr, conn.attempts
            );
            for d in Dir::BOTH {
                let step =
                    self.slots[idx as usize].conn.as_mut().expect("live").flows[d.index()].start();
                self.apply(idx, d, step);
            }
            return;
        }
        let reason = CloseReason::from_connect_error(res);
        if let Some(m) = conn.member.take() {
            let w = m.worker(wid);
            bump(
                match reason {
                    CloseReason::BackendRefused => &w.connect_refused,
                    CloseReason::BackendTimeout => &w.connect_timeout,
                    _ => &w.connect_other,
                },
                1,
            );
            m.dec_active();
            m.connect_failed();
        }
        debug!(
            "conn {idx}: connect to {:?} failed: {} (attempt {})",
            conn.backend_addr,
            reason.as_str(),
            conn.attempts
        );
        // No operation names the backend fd any more (the linked timeout names no fd): close it.
        conn.backend = None;
        conn.reason = Some(reason);
        if conn.attempts < MAX_CONNECT_ATTEMPTS {
            self.connect_next(idx);
        } else {
            self.close_conn(idx, reason);
        }
    }

    /// Carries out one step of a flow.
    fn apply(&mut self, idx: u32, d: Dir, step: Step) {
        let generation = self.slots[idx as usize].generation;
        let tok =
            |up: Op, down: Op| Token::new(if d == Dir::Up { up } else { down }, idx, generation);
        let pool = &mut self.pool;
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        let Some(backend) = conn.backend.as_ref() else {
            return;
        };
        let (src, dst): (RawFd, RawFd) = match d {
            Dir::Up => (conn.client.as_raw_fd(), backend.as_raw_fd()),
            Dir::Down => (backend.as_raw_fd(), conn.client.as_raw_fd()),
        };
        let di = d.index();
        let fail = match step {
            Step::PollIn => {
                release_pipe(pool, &mut conn.pipes[di]);
                conn.inflight += 1;
                self.ring
                    .poll(src, libc::POLLIN as u32, tok(Op::PollIn0, Op::PollIn1));
                None
            }
            Step::SpliceIn => {
                if conn.pipes[di].is_none() {
                    match pool.pop().map(Ok).unwrap_or_else(|| Pipe::new(PIPE_SIZE)) {
                        Ok(p) => conn.pipes[di] = Some(p),
                        Err(e) => debug!("conn {idx}: no pipe: {e}"),
                    }
                }
                match conn.pipes[di].as_ref() {
                    Some(pipe) => {
                        conn.inflight += 1;
                        let t = tok(Op::SpliceIn0, Op::SpliceIn1);
                        self.ring
                            .splice(src, pipe.write.as_raw_fd(), pipe.capacity, t);
                        None
                    }
                    None => Some(CloseReason::Resource),
                }
            }
            Step::SpliceOut(n) => match conn.pipes[di].as_ref() {
                Some(pipe) => {
                    conn.inflight += 1;
                    let t = tok(Op::SpliceOut0, Op::SpliceOut1);
                    self.ring.splice(pipe.read.as_raw_fd(), dst, n, t);
                    None
                }
                None => Some(CloseReason::Resource),
            },
            Step::PollOut => {
                conn.inflight += 1;
                self.ring
                    .poll(dst, libc::POLLOUT as u32, tok(Op::PollOut0, Op::PollOut1));
                None
            }
            Step::ShutdownDest => {
                release_pipe(pool, &mut conn.pipes[di]);
                let dst_fd = if d == Dir::Up { backend } else { &conn.client };
                let _ = sys::shutdown_write(dst_fd.as_fd());
                conn.first_eof.get_or_insert(d);
                if conn.flows.iter().all(Flow::is_done) {
                    Some(if conn.first_eof == Some(Dir::Up) {
                        CloseReason::ClientEof
                    } else {
                        CloseReason::BackendEof
                    })
                } else {
                    None
                }
            }
            Step::SourceFailed(_) => Some(CloseReason::from_failure(d, true)),
            Step::DestFailed(_) => Some(CloseReason::from_failure(d, false)),
        };
        if let Some(reason) = fail {
            self.close_conn(idx, reason);
        }
    }

    /// Starts closing a connection: resets the other side if the reason calls for it, cancels
    /// what is in flight, and finalizes once nothing is.
    fn close_conn(&mut self, idx: u32, reason: CloseReason) {
        let cancel = self.token(Op::Cancel, idx);
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        if conn.closing {
            return;
        }
        conn.closing = true;
        conn.reason = Some(reason);
        match reason.reset_other_side() {
            Some(Side::Client) => sys::set_linger_zero(conn.client.as_fd()),
            Some(Side::Backend) => {
                if let Some(b) = &conn.backend {
                    sys::set_linger_zero(b.as_fd());
                }
            }
            None => {}
        }
        if conn.inflight == 0 {
            self.finalize(idx);
            return;
        }
        self.ring.cancel_fd(conn.client.as_raw_fd(), cancel);
        conn.inflight += 1;
        if let Some(b) = &conn.backend {
            self.ring.cancel_fd(b.as_raw_fd(), cancel);
            conn.inflight += 1;
        }
    }

    /// Frees a connection that has nothing in flight: closes fds and pipes, releases counters.
    fn finalize(&mut self, idx: u32) {
        let slot = &mut self.slots[idx as usize];
        let Some(conn) = slot.conn.take() else {
            return;
        };
        debug_assert_eq!(conn.inflight, 0);
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(idx);
        if let Some(m) = &conn.member {
            m.dec_active();
        }
        let reason = conn.reason.unwrap_or(CloseReason::ClientEof);
        debug!(
            "conn {idx}: {:?} -> {:?} closed: {} after {} ms, {} B up, {} B down",
            conn.client_addr,
            conn.backend_addr,
            reason.as_str(),
            self.now_ms.saturating_sub(conn.opened_ms),
            conn.flows[0].bytes,
            conn.flows[1].bytes
        );
        let li = conn.listener as usize;
        let l = &mut self.listeners[li];
        bump(&l.stats.worker(self.id).closes[reason.index()], 1);
        if l.reader.load().settings.access_log {
            info!(
                "access: listener={} client={} backend={} duration_ms={} bytes_up={} bytes_down={} reason=\"{}\"",
                l.name,
                conn.client_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
                conn.backend_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
                self.now_ms.saturating_sub(conn.opened_ms),
                conn.flows[0].bytes,
                conn.flows[1].bytes,
                reason.as_str()
            );
        }
        // Pipes still held here may hold bytes that were never forwarded: close them, do not
        // return them to the pool. fds close as `conn` drops.
        drop(conn);
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        let l = &mut self.listeners[li];
        l.stats
            .worker(self.id)
            .active
            .fetch_sub(1, Ordering::Relaxed);
        l.live -= 1;
        if l.paused {
            let limit = (l.reader.load().settings.max_connections as usize).div_ceil(self.workers);
            if (l.live as usize) < limit {
                l.paused = false;
                self.arm_accept(li);
            }
        }
    }

    // ---- timers and stop -------------------------------------------------------------------

    fn on_tick(&mut self, c: Completion) {
        if !c.more() {
            let tick = self.timespec_for(TICK);
            self.ring.timer(tick, Token::new(Op::Tick, 0, 0));
        }
        self.shared.heartbeat.store(
            self.shared.epoch.elapsed().as_millis() as u64,
            Ordering::Relaxed,
        );
        self.check_stop();
        for li in 0..self.listeners.len() {
            let l = &self.listeners[li];
            if !l.accepting && !l.paused && self.now_ms >= l.rearm_at_ms {
                self.arm_accept(li);
            }
        }
        if self.now_ms >= self.next_idle_scan_ms {
            self.next_idle_scan_ms = self.now_ms + IDLE_SCAN_MS;
            for idx in 0..self.slots.len() as u32 {
                let expired = match &self.slots[idx as usize].conn {
                    Some(c) => {
                        c.connected
                            && !c.closing
                            && self.now_ms.saturating_sub(c.last_active_ms) >= c.idle_ms
                    }
                    None => false,
                };
                if expired {
                    self.close_conn(idx, CloseReason::IdleTimeout);
                }
            }
        }
    }

    fn check_stop(&mut self) {
        let stop = self.shared.stop.load(Ordering::SeqCst);
        if stop >= DRAIN && !self.draining {
            self.draining = true;
            for li in 0..self.listeners.len() {
                let l = &mut self.listeners[li];
                if l.accepting {
                    if let Some(sock) = &l.socket {
                        self.ring.cancel_fd(
                            sock.as_raw_fd(),
                            Token::new(Op::AcceptCancel, li as u32, 0),
                        );
                    }
                } else {
                    l.socket = None;
                }
            }
            debug!("worker {}: draining", self.id);
        }
        if stop >= HARD_STOP && self.hard_stop_at_ms.is_none() {
            self.hard_stop_at_ms = Some(self.now_ms);
            for idx in 0..self.slots.len() as u32 {
                if self.slots[idx as usize].conn.is_some() {
                    self.close_conn(idx, CloseReason::Draining);
                }
            }
        }
    }
}

/// Returns an empty pipe to the pool (or closes it when the pool is full).
fn release_pipe(pool: &mut Vec<Pipe>, slot: &mut Option<Pipe>) {
    if let Some(p) = slot.take() {
        if pool.len() < PIPE_POOL_MAX {
            pool.push(p);
        }
    }
}
