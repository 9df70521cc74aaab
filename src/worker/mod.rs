//! The per-core worker: one io_uring, one `SO_REUSEPORT` listening socket per TCP listener, and a
//! slab of connections that live their whole life here (accept → pick → connect → splice ⇄ →
//! close).
//!
//! The worker reads everything it knows from snapshots (`crate::snapshot`) and the commands the
//! runtime sends it (listeners added or removed by a reload); it never imports `config`,
//! `control` or `health`. Per completion it does no locking, no allocation (the slab, pipe pool
//! and completion buffer grow, then are reused) and no logging above `debug` per connection.
//! `conn.rs` is the pure state machine; `tcp.rs` applies it to the ring; this file owns the loop,
//! the listeners, timers and stop handling.
//!
//! Ownership rule the ring relies on: a connection's fds and pipes are dropped (closed) only in
//! `finalize`, which runs when the connection has no operation in flight (`inflight == 0`).

mod admission;
pub mod conn;
mod hello;
pub mod pgdrain;
mod pipes;
mod ringio;
mod tcp;
mod timers;
mod udp;
mod watch;

pub use tcp::keepalive_params;

use crate::backend::{process_ms, ListenerStats};
use crate::balance::PickState;
use crate::io::{Completion, Driver, Io, Op, TimespecId, Token};
use crate::proxy_protocol::MAX_INBOUND;
use crate::snapshot::{Published, Reader};
use crate::sys::{self, Pipe};
use conn::{CloseReason, Flow};
use log::{debug, warn};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
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
/// Ring size (submission entries; the completion queue is 4×).
const RING_ENTRIES: u32 = 4096;
/// Period of the worker's tick (heartbeat, accept re-arm, queue retry, stop flag).
const TICK: Duration = Duration::from_millis(100);
/// How often the timeout scan (idle, PROXY header, queue, drain) and the peer watch run: every
/// second tick, so a dead peer is noticed within 200 ms.
const SCAN_MS: u64 = 200;
/// Connections accepted over `max_connections` a worker keeps waiting per listener (the
/// kernel's default accept queue, `net.core.somaxconn`); beyond it they are closed.
const HELD_MAX: usize = 4096;
/// Back-off before re-arming accept after EMFILE/ENFILE/ENOMEM.
const ACCEPT_BACKOFF_MS: u64 = 100;
/// Size of the worker's copy buffer for small TCP messages: a read that fills it marks a stream,
/// which is spliced from then on.
const COPY_BUF: usize = 16 * 1024;
/// On drain, a worker with UDP flows stays this long after the last forwarded datagram.
const UDP_DRAIN_GRACE_MS: u64 = 1000;
/// recvmsg operations kept in flight per UDP listener (each with a 64 KiB ring-owned buffer).
const UDP_RECV_SLOTS: usize = 8;

/// What the runtime tells a worker after start (a reload added or removed a listener).
pub enum Command {
    AddListener(ListenerSpec),
    /// Stop accepting on the listener; its connections continue, or are closed after the
    /// listener's `drain_timeout` (from its last snapshot).
    RemoveListener {
        name: Arc<str>,
    },
    /// Binary upgrade, old process (DRAIN already requested): stop receiving on UDP listeners
    /// and give every UDP flow away.
    ExportFlows(Sender<Vec<HandedFlow>>),
    /// Binary upgrade, new process: take these flows in, then receive on the UDP listeners
    /// held until now.
    AdoptFlows(Vec<HandedFlow>),
}

/// A UDP flow crossing a binary upgrade: the client, its listener and backend, and (a
/// duplicate of) the upstream socket connected to that backend.
pub struct HandedFlow {
    pub listener: Arc<str>,
    pub client: SocketAddr,
    /// The address the client sent to (wildcard listeners answer from it).
    pub local: Option<std::net::IpAddr>,
    pub backend: SocketAddr,
    pub socket: OwnedFd,
}

/// State a worker shares with the runtime (not with other workers).
#[derive(Debug)]
pub struct Shared {
    pub id: usize,
    /// Written by the runtime to wake the ring (stop requests, commands).
    pub wake: OwnedFd,
    /// RUN, DRAIN or HARD_STOP.
    pub stop: AtomicU8,
    /// `process_ms()` at the worker's last tick (liveness, read by the admin endpoint).
    pub heartbeat: Arc<AtomicU64>,
    /// Connections open on this worker.
    pub live: AtomicU64,
    /// Set once, while draining, every listening socket of this worker is closed.
    pub listeners_closed: AtomicBool,
    commands: Sender<Command>,
}

impl Shared {
    /// Creates the shared state and the command channel whose receiver goes into the
    /// [`WorkerSpec`].
    pub fn new(id: usize) -> io::Result<(Shared, Receiver<Command>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        Ok((
            Shared {
                id,
                wake: sys::eventfd()?,
                stop: AtomicU8::new(RUN),
                heartbeat: Arc::new(AtomicU64::new(process_ms())),
                live: AtomicU64::new(0),
                listeners_closed: AtomicBool::new(false),
                commands: tx,
            },
            rx,
        ))
    }

    /// Asks the worker to stop (DRAIN or HARD_STOP) and wakes it.
    pub fn request_stop(&self, how: u8) {
        self.stop.fetch_max(how, Ordering::SeqCst);
        sys::eventfd_signal(self.wake.as_fd());
    }

    /// Sends a command and wakes the worker. False if the worker is gone.
    pub fn send(&self, cmd: Command) -> bool {
        let ok = self.commands.send(cmd).is_ok();
        sys::eventfd_signal(self.wake.as_fd());
        ok
    }
}

/// One listener as handed to a worker: its own listening socket plus the published snapshot.
pub struct ListenerSpec {
    pub name: Arc<str>,
    pub socket: socket2::Socket,
    pub published: Published,
    pub stats: Arc<ListenerStats>,
    /// Whether the client address is needed per connection (hash-based policy).
    pub needs_client_addr: bool,
    /// A UDP listener (datagrams and flows) rather than TCP.
    pub udp: bool,
    /// UDP: do not receive until [`Command::AdoptFlows`] (a binary upgrade's flows arrive
    /// first, so no client of an existing flow gets a new one).
    pub hold_udp: bool,
}

/// Everything a worker needs to run.
pub struct WorkerSpec {
    pub shared: Arc<Shared>,
    /// The I/O backend every worker of the process runs (decided once at start).
    pub io: crate::io::Choice,
    pub commands: Receiver<Command>,
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
    /// At the listener-wide max_connections: accept stays disarmed until below it.
    paused: bool,
    rearm_at_ms: u64,
    /// Until then (worker ms; set when accept resumes after a pause), a connection is checked
    /// for a client still there before it gets a backend: the kernel backlog it comes from may
    /// hold clients that gave up while accept was paused.
    check_alive_until_ms: u64,
    /// ASYNC_CANCELs naming the listening socket not yet completed: the socket may only close
    /// when this is 0 (a queued cancel must not meet a reused fd number).
    cancels: u32,
    /// Removed by a reload at this worker time (ms): no more accepts; drains.
    removed_at_ms: Option<u64>,
    /// Connections waiting for a backend slot (every eligible backend full), oldest first, as
    /// (slot, generation): an entry whose connection closed meanwhile is recognised and skipped.
    queue: VecDeque<(u32, u32)>,
    /// Connections accepted over max_connections, oldest first, as (slot, generation).
    held: VecDeque<(u32, u32)>,
    /// Connections in `held` still waiting (the list may also hold entries of closed ones).
    held_live: u32,
    /// `release_held` / `retry_queue` is running for this listener (their nested calls,
    /// through a connection that closed at once, return instead of recursing).
    releasing: bool,
    retrying: bool,
    /// UDP listeners: receive buffers and flow-list heads.
    udp: Option<udp::UdpListener>,
    /// Not receiving until a binary upgrade's flows are taken in ([`ListenerSpec::hold_udp`]).
    hold_udp: bool,
}

impl Listener {
    fn new(
        spec: ListenerSpec,
        worker: usize,
        index: usize,
        io: &mut Io,
        free_sets: &mut Vec<crate::io::RecvSetId>,
    ) -> Listener {
        let udp = spec.udp.then(|| {
            let set = free_sets
                .pop()
                .unwrap_or_else(|| io.recv_slots(UDP_RECV_SLOTS, udp::MAX_DATAGRAM));
            udp::UdpListener::new(set)
        });
        Listener {
            udp,
            hold_udp: spec.hold_udp,
            name: spec.name,
            socket: Some(spec.socket),
            reader: Reader::new(spec.published),
            pick: PickState::new(0x9e37_79b9_7f4a_7c15 ^ ((worker as u64) << 32) ^ index as u64),
            stats: spec.stats,
            needs_client_addr: spec.needs_client_addr,
            accepting: false,
            paused: false,
            rearm_at_ms: 0,
            check_alive_until_ms: 0,
            cancels: 0,
            removed_at_ms: None,
            queue: VecDeque::new(),
            held: VecDeque::new(),
            held_live: 0,
            releasing: false,
            retrying: false,
        }
    }

    /// A removed listener with nothing left: its slot can take a new listener.
    fn is_tombstone(&self, worker: usize) -> bool {
        self.removed_at_ms.is_some()
            && self.socket.is_none()
            && self.open_here(worker) == 0
            && self.udp.as_ref().is_none_or(|u| u.flows == 0)
    }

    /// Connections of this listener open on this worker (the per-worker counter only this
    /// worker writes).
    fn open_here(&self, worker: usize) -> u64 {
        self.stats.worker(worker).active.load(Ordering::Relaxed)
    }
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting for the client's PROXY header (deadline = header timeout).
    Header,
    /// Reading the client's ClientHello to choose a pool (deadline = `tls_inspect.timeout`).
    Hello,
    /// Waiting for a backend slot (deadline = queue timeout).
    Queued,
    /// Accepted over the listener-wide `max_connections` (another worker took the last
    /// place, or one multishot accept took the whole backlog): waits, unserved, for a place,
    /// at most `queue_timeout` (deadline).
    Held,
    /// A connect is in flight.
    Connecting,
    /// Both directions are being spliced.
    Proxying,
}

struct Conn {
    listener: u32,
    stage: Stage,
    client: OwnedFd,
    client_addr: Option<SocketAddr>,
    /// The address the client connected to (from its PROXY header, if any).
    client_dst: Option<SocketAddr>,
    backend: Option<OwnedFd>,
    member: Option<Arc<crate::backend::BackendStats>>,
    backend_addr: Option<SocketAddr>,
    /// Backends tried so far (the first `attempts` entries).
    tried: [SocketAddr; MAX_CONNECT_ATTEMPTS as usize],
    attempts: u8,
    flows: [Flow; 2],
    pipes: [Option<Pipe>; 2],
    /// Per flow, the ring buffer its send is forwarding (`ringio.rs`).
    ring_bufs: [Option<ringio::RingBuf>; 2],
    /// Per flow: a multishot POLLOUT on its destination is armed (until its last completion),
    /// and whether the flow still waits on it (`Step::PollOutWakeups`).
    out_multi: [bool; 2],
    out_wait: [bool; 2],
    /// PROXY header bytes already consumed (only when it arrived in pieces).
    header: Option<Vec<u8>>,
    /// The pool (index into the snapshot's pools) the connection goes to.
    pool: u16,
    /// The ClientHello read in progress (TLS passthrough routing only; `None` otherwise, so
    /// a connection of a listener without routes carries no reader).
    hello: Option<Box<hello::HelloState>>,
    /// Operations submitted for this connection whose completion has not arrived.
    inflight: u16,
    closing: bool,
    reason: Option<CloseReason>,
    first_eof: Option<conn::Dir>,
    last_active_ms: u64,
    idle_ms: u64,
    opened_ms: u64,
    /// Header or queue deadline (worker ms).
    deadline_ms: u64,
    /// Counted in the listener's shared open count (false while Held).
    counted: bool,
    /// `drain_mode = "postgres"`: the session's framing, fed with every byte forwarded.
    pg: Option<pgdrain::PgTracker>,
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
}

struct Worker {
    id: usize,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    io: Io,
    listeners: Vec<Listener>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    pool: pipes::PipePool,
    timeouts: Vec<(Duration, TimespecId)>,
    /// Scratch space for peeking at PROXY headers (never held across completions).
    scratch: Box<[u8; MAX_INBOUND]>,
    /// Where ClientHellos are peeked (never holds bytes across calls); empty until a listener
    /// with routes reads one, then as long as the largest `tls_inspect.max_bytes`.
    hello_buf: Vec<u8>,
    /// Scratch space for copying small TCP messages (never holds bytes across calls).
    copy_buf: Box<[u8]>,
    /// UDP replies waiting for the end of the current completion batch (sent by
    /// `flush_replies` before the worker waits on its ring again).
    outbox: udp::Outbox,
    flows: udp::Flows,
    /// Receive buffer sets of closed UDP listeners, reused by the next one.
    free_recv_sets: Vec<crate::io::RecvSetId>,
    /// Per-listener (drain timeout, removed at, close on backend down) for the timeout scan,
    /// reused.
    scan_buf: Vec<(Option<u64>, Option<u64>, bool, bool)>,
    /// The peer watch's poll set and what each entry names (slot, generation, side), reused.
    watch_fds: Vec<libc::pollfd>,
    watch_who: Vec<(u32, u32, conn::Side)>,
    /// Held connections kept per listener (`RINGLB_HELD_MAX`, a debug knob; default 4096).
    held_max: usize,
    /// The process's RLIMIT_NOFILE (soft, as raised at start): UDP flows take at most a share.
    nofile: u64,
    /// Tick completions that failed in a row.
    tick_failures: u32,
    workers: usize,
    start: Instant,
    now_ms: u64,
    next_scan_ms: u64,
    draining: bool,
    hard_stop_at_ms: Option<u64>,
    /// When each kind of resource warning was last logged (index: [`Shortage`]).
    last_warn_ms: [u64; 4],
}

/// The step that ran short of descriptors or memory (each is warned about on its own clock, so
/// that one cannot hide another).
#[derive(Clone, Copy)]
pub(super) enum Shortage {
    Accept = 0,
    Socket = 1,
    Pipe = 2,
    /// Entering the ring failed transiently.
    Ring = 3,
}

/// Runs a worker until it has drained (or was hard-stopped). Errors only on ring failure.
pub fn run(spec: WorkerSpec) -> io::Result<()> {
    let mut io = Io::new(&spec.io, RING_ENTRIES)?;
    let shared = spec.shared;
    let listeners = spec
        .listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| Listener::new(l, shared.id, i, &mut io, &mut Vec::new()))
        .collect();
    let mut w = Worker {
        id: shared.id,
        shared,
        commands: spec.commands,
        io,
        listeners,
        slots: Vec::new(),
        free: Vec::new(),
        pool: pipes::PipePool::new(),
        timeouts: Vec::new(),
        scratch: Box::new([0u8; MAX_INBOUND]),
        hello_buf: Vec::new(),
        copy_buf: vec![0u8; COPY_BUF].into_boxed_slice(),
        outbox: udp::Outbox::new(),
        flows: udp::Flows::default(),
        free_recv_sets: Vec::new(),
        scan_buf: Vec::new(),
        watch_fds: Vec::new(),
        watch_who: Vec::new(),
        held_max: std::env::var("RINGLB_HELD_MAX")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(HELD_MAX),
        tick_failures: 0,
        nofile: match sys::nofile_limit().0 {
            0 => 1024,
            n => n.min(1 << 40),
        },
        workers: spec.workers.max(1),
        start: Instant::now(),
        now_ms: 0,
        next_scan_ms: SCAN_MS,
        draining: false,
        hard_stop_at_ms: None,
        last_warn_ms: [0; 4],
    };
    let tick = w.timespec_for(TICK);
    w.io.timer(tick, Token::new(Op::Tick, 0, 0));
    w.io.poll_multi(
        w.shared.wake.as_raw_fd(),
        libc::POLLIN as u32,
        Token::new(Op::Wake, 0, 0),
    );
    for li in 0..w.listeners.len() {
        w.arm_accept(li);
    }
    w.check_stop();
    let mut completions: Vec<Completion> = Vec::with_capacity(1024);
    let mut transient = 0u32;
    loop {
        match w.io.submit_and_wait(1) {
            Ok(None) => transient = 0,
            Ok(Some(e)) => {
                // Reap what is there, then back off before entering again: 0, 1, 2, 4 ... 64 ms
                // for repeats (a kernel short of memory recovers; a busy loop would not help).
                transient += 1;
                w.warn_ring(&e, transient);
                if transient > 1 {
                    std::thread::sleep(Duration::from_millis(1 << (transient - 2).min(6)));
                }
            }
            Err(e) => {
                let call = w.wait_call();
                log::error!("worker {}: {call} failed: {e}; the worker stops", w.id);
                return Err(io::Error::new(e.kind(), format!("{call}: {e}")));
            }
        }
        w.now_ms = w.start.elapsed().as_millis() as u64;
        completions.clear();
        w.io.reap(&mut completions);
        for c in &completions {
            w.dispatch(*c);
        }
        w.flush_replies();
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
        // TCP listeners are closed; UDP listeners have stopped receiving (their sockets stay
        // open to send the replies of flows still in flight).
        let closed = self.listeners.iter().all(|l| match &l.udp {
            None => l.socket.is_none(),
            Some(u) => l.socket.is_none() || (u.inflight == 0 && l.cancels == 0),
        });
        if closed {
            self.shared.listeners_closed.store(true, Ordering::SeqCst);
        }
        // Replies to the last datagrams forwarded get a moment to come back.
        let udp_quiet = self.now_ms >= self.flows.last_activity_ms + UDP_DRAIN_GRACE_MS;
        let idle = closed && self.shared.live.load(Ordering::Relaxed) == 0 && udp_quiet;
        idle || matches!(self.hard_stop_at_ms, Some(t) if self.now_ms > t + 2000)
    }

    fn dispatch(&mut self, c: Completion) {
        match c.token.op() {
            Some(Op::Accept) => self.on_accept(c.token.index() as usize, c),
            Some(Op::Tick) => self.on_tick(c),
            Some(Op::Wake) => {
                sys::eventfd_drain(self.shared.wake.as_fd());
                if !c.more() {
                    self.io.poll_multi(
                        self.shared.wake.as_raw_fd(),
                        libc::POLLIN as u32,
                        Token::new(Op::Wake, 0, 0),
                    );
                }
                self.take_commands();
                self.check_stop();
            }
            Some(Op::AcceptCancel) => {
                let li = c.token.index() as usize;
                if let Some(l) = self.listeners.get_mut(li) {
                    l.cancels = l.cancels.saturating_sub(1);
                }
                self.drop_socket_if_done(li);
            }
            Some(op @ (Op::UdpRecv | Op::UdpPoll | Op::UdpReply | Op::UdpCancel | Op::UdpSend)) => {
                self.on_udp_completion(op, c)
            }
            // A ring half-close or close: nothing waits for it.
            Some(Op::Detached | Op::Shutdown) => {}
            Some(op) => self.on_conn_completion(op, c),
            None => {}
        }
    }

    fn timespec_for(&mut self, d: Duration) -> TimespecId {
        if let Some((_, id)) = self.timeouts.iter().find(|(x, _)| *x == d) {
            return *id;
        }
        let id = self.io.timespec(d);
        self.timeouts.push((d, id));
        id
    }

    // ---- listeners -------------------------------------------------------------------------

    fn arm_accept(&mut self, li: usize) {
        let l = &mut self.listeners[li];
        if let Some(u) = &l.udp {
            if u.inflight == 0 && !l.hold_udp {
                self.arm_udp(li);
            }
            return;
        }
        if let Some(sock) = &l.socket {
            if !l.accepting && !l.paused && !self.draining && l.removed_at_ms.is_none() {
                self.io
                    .accept_multi(sock.as_raw_fd(), Token::new(Op::Accept, li as u32, 0));
                l.accepting = true;
            }
        }
    }

    /// Cancels what is in flight on a listener's socket (its accept or its recvmsgs).
    pub(super) fn cancel_listener_ops(&mut self, li: usize) {
        let l = &mut self.listeners[li];
        if let Some(sock) = &l.socket {
            l.cancels += 1;
            self.io
                .cancel_fd(sock.as_raw_fd(), Token::new(Op::AcceptCancel, li as u32, 0));
        }
    }

    /// Stops accepting (receiving) on a listener; its socket closes once nothing in flight
    /// names it (closing it earlier would leave the kernel accepting into it).
    fn close_listener(&mut self, li: usize) {
        let l = &self.listeners[li];
        let busy = l.accepting || l.udp.as_ref().is_some_and(|u| u.inflight > 0);
        if busy {
            self.cancel_listener_ops(li);
        }
        self.drop_socket_if_done(li);
    }

    /// Closes a stopping listener's socket when no accept, recvmsg or cancel names it.
    fn drop_socket_if_done(&mut self, li: usize) {
        let Some(l) = self.listeners.get_mut(li) else {
            return;
        };
        let stopping = self.draining || l.removed_at_ms.is_some();
        let idle = !l.accepting && l.cancels == 0 && l.udp.as_ref().is_none_or(|u| u.inflight == 0);
        // A draining UDP listener keeps its socket to send replies until the worker exits.
        let keep_for_replies = l.udp.is_some() && l.removed_at_ms.is_none();
        if stopping && idle && !keep_for_replies && l.socket.is_some() {
            if let Some(sock) = l.socket.take() {
                self.io.release_fd(sock.as_raw_fd());
            }
            if let Some(u) = &l.udp {
                self.free_recv_sets.push(u.set);
            }
        }
    }

    /// The syscall the worker waits in (for messages).
    fn wait_call(&self) -> &'static str {
        match self.io {
            Io::Uring(_) => "io_uring_enter",
            Io::Epoll(_) => "epoll_wait",
        }
    }

    /// Warns (at most once a second) that entering the ring failed transiently, and why.
    fn warn_ring(&mut self, e: &io::Error, repeats: u32) {
        let now = self.start.elapsed().as_millis() as u64;
        let last = &mut self.last_warn_ms[Shortage::Ring as usize];
        if *last != 0 && now < *last + 1000 {
            return;
        }
        *last = now.max(1);
        let what = match e.raw_os_error() {
            Some(libc::EBUSY) => "the completion queue is full; reaping first",
            Some(libc::EBADR) => "completions were lost to a queue overflow; some connections may stall until their timeout",
            Some(libc::EAGAIN | libc::ENOMEM) => "the kernel is short of memory for requests",
            _ => "unexpected error",
        };
        warn!(
            "worker {}: io_uring_enter: {e} ({what}); retrying ({repeats} in a row)",
            self.id
        );
    }

    /// Warns that the worker ran short of a resource (descriptors, memory) at step `kind`, at
    /// most once a second per worker and step.
    pub(super) fn warn_resource(
        &mut self,
        li: usize,
        kind: Shortage,
        what: &str,
        e: io::Error,
        then: std::fmt::Arguments,
    ) {
        let last = &mut self.last_warn_ms[kind as usize];
        if *last != 0 && self.now_ms < *last + 1000 {
            return;
        }
        *last = self.now_ms.max(1);
        warn!(
            "listener \"{}\" worker {}: {what}: {e}; {then}",
            self.listeners[li].name, self.id
        );
    }

    fn on_accept(&mut self, li: usize, c: Completion) {
        if !c.more() {
            let l = &mut self.listeners[li];
            l.accepting = false;
            if self.draining || l.removed_at_ms.is_some() {
                // The accept is gone: closing the socket now refuses new SYNs for this worker.
                self.drop_socket_if_done(li);
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
                self.warn_resource(
                    li,
                    Shortage::Accept,
                    "accept failed",
                    io::Error::from_raw_os_error(e),
                    format_args!(
                        "backing off {ACCEPT_BACKOFF_MS} ms (open connections keep being served)"
                    ),
                );
            } else if e != libc::ECANCELED && !c.more() {
                self.listeners[li].rearm_at_ms = self.now_ms + ACCEPT_BACKOFF_MS;
            }
            return;
        }
        let Some(client) = c.accepted_fd() else {
            return;
        };
        // Accepted before the drain's cancel took effect (a multishot accept's completions
        // already queued): the kernel completed the handshake, so the client is served. After a
        // binary upgrade this is a connection of the shared accept queue the new process will
        // never see; on SIGTERM it is one the listener had already taken.
        if self.hard_stop_at_ms.is_some() || self.listeners[li].removed_at_ms.is_some() {
            return; // dropped: closed
        }
        self.admit(li, client);
    }

    /// Applies the runtime's commands (listeners added or removed by a reload).
    fn take_commands(&mut self) {
        loop {
            match self.commands.try_recv() {
                Ok(Command::AddListener(spec)) => {
                    let name = spec.name.clone();
                    let li = match self.listeners.iter().position(|l| l.is_tombstone(self.id)) {
                        Some(i) => {
                            self.listeners[i] = Listener::new(
                                spec,
                                self.id,
                                i,
                                &mut self.io,
                                &mut self.free_recv_sets,
                            );
                            i
                        }
                        None => {
                            let i = self.listeners.len();
                            let l = Listener::new(
                                spec,
                                self.id,
                                i,
                                &mut self.io,
                                &mut self.free_recv_sets,
                            );
                            self.listeners.push(l);
                            i
                        }
                    };
                    debug!("worker {}: listener \"{name}\" added", self.id);
                    if self.draining {
                        self.listeners[li].removed_at_ms = Some(self.now_ms);
                        self.drop_socket_if_done(li);
                    } else {
                        self.arm_accept(li);
                    }
                }
                Ok(Command::RemoveListener { name }) => {
                    let found = self
                        .listeners
                        .iter()
                        .position(|l| l.name == name && l.removed_at_ms.is_none());
                    if let Some(li) = found {
                        debug!("worker {}: listener \"{name}\" removed", self.id);
                        self.listeners[li].removed_at_ms = Some(self.now_ms);
                        self.close_listener(li);
                        self.close_waiting(li);
                        if self.listeners[li].udp.is_some() {
                            self.close_all_flows(Some(li));
                        }
                    }
                }
                Ok(Command::ExportFlows(reply)) => {
                    let _ = reply.send(self.export_flows());
                }
                Ok(Command::AdoptFlows(flows)) => self.adopt_flows(flows),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
    }
}
