//! A TCP connection's life on its worker: admit (then `admission.rs`: the listener-wide hold,
//! the client's PROXY header, the backend queue), pick and connect (retrying other backends),
//! send the PROXY header to the backend, copy or splice both ways by applying `conn.rs` steps,
//! close and free.
//! Must not: block, allocate per completion, or log above debug per connection (the access log,
//! when enabled by the operator, is the one info line per closed connection).

use super::conn::{CloseReason, Dir, Flow, Side, Step};
use super::pgdrain::PgTracker;
use super::{Conn, Shortage, Slot, Stage, Worker, MAX_CONNECT_ATTEMPTS};
use crate::backend::{bump, BackendStats};
use crate::io::{Completion, Driver, Op, Token};
use crate::proxy_protocol::{self, MAX_ENCODED};
use crate::snapshot::Pick;
use crate::sys;
use log::{debug, info};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Reads and writes (splice or copy) one flow may do inline before yielding to the ring, so a
/// busy stream cannot starve the worker's other connections.
const SPLICE_BUDGET: u32 = 32;

impl Worker {
    pub(super) fn token(&self, op: Op, idx: u32) -> Token {
        Token::new(op, idx, self.slots[idx as usize].generation)
    }

    /// A client connection was accepted on listener `li`.
    pub(super) fn admit(&mut self, li: usize, client: OwnedFd) {
        let l = &mut self.listeners[li];
        let snap = l.reader.load();
        let limit = u64::from(snap.settings.max_connections);
        let idle_ms = snap.settings.idle_timeout.as_millis() as u64;
        let accept_proxy = snap.settings.accept_proxy;
        let client_addr = if l.needs_client_addr
            || snap.settings.access_log
            || snap.settings.send_proxy.is_some()
            || accept_proxy.is_some()
            || log::log_enabled!(log::Level::Debug)
        {
            sys::peer_addr(client.as_fd())
        } else {
            None
        };
        let open = l.stats.opened();
        // Over the listener-wide limit (another worker took the last place first): hold this
        // connection, unserved, until a place frees, as the kernel backlog would have.
        let over = open > limit;
        if over {
            l.stats.closed();
        }
        self.follow_limit(li, open);
        let l = &mut self.listeners[li];
        bump(&l.stats.worker(self.id).accepted, 1);
        bump(&l.stats.worker(self.id).active, 1);
        self.shared.live.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            listener: li as u32,
            stage: Stage::Connecting,
            client,
            client_addr,
            client_dst: None,
            backend: None,
            member: None,
            backend_addr: None,
            tried: [SocketAddr::from(([0, 0, 0, 0], 0)); MAX_CONNECT_ATTEMPTS as usize],
            attempts: 0,
            flows: [Flow::new(), Flow::new()],
            pipes: [None, None],
            ring_bufs: [None, None],
            out_multi: [false, false],
            out_wait: [false, false],
            header: None,
            pool: 0,
            hello: None,
            inflight: 0,
            closing: false,
            reason: None,
            first_eof: None,
            last_active_ms: self.now_ms,
            idle_ms,
            opened_ms: self.now_ms,
            deadline_ms: 0,
            counted: !over,
            pg: None,
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
        if over {
            self.hold(li, idx);
            return;
        }
        self.start_conn(li, idx);
    }

    /// Pauses accept on listener `li` while `open` (its listener-wide count) is at
    /// `max_connections` — the kernel backlog holds the rest — and resumes it below. Every
    /// worker follows the same shared count when it accepts, closes or ticks.
    pub(super) fn follow_limit(&mut self, li: usize, open: u64) {
        let l = &mut self.listeners[li];
        let limit = u64::from(l.reader.load().settings.max_connections);
        if open >= limit && !l.paused {
            l.paused = true;
            if l.accepting {
                self.cancel_listener_ops(li);
            }
        } else if open < limit && l.paused {
            l.paused = false;
            l.check_alive_until_ms = self.now_ms + 1000;
            if self.now_ms >= l.rearm_at_ms {
                self.arm_accept(li);
            }
        }
    }

    /// Picks a backend not yet tried and starts a connect to it; queues the client when every
    /// eligible backend is full; closes it when none is left.
    pub(super) fn connect_next(&mut self, idx: u32) {
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        let l = &mut self.listeners[conn.listener as usize];
        let snap = l.reader.load();
        let n = conn.attempts as usize;
        let pool = usize::from(conn.pool);
        let mut picked = snap.pick(
            pool,
            &mut l.pick,
            conn.client_addr.as_ref(),
            &conn.tried[..n],
        );
        if picked == Pick::None && n > 0 {
            // Every other backend is out: try an already-tried one again (a transient refusal
            // of the only backend should not cost the client its connection).
            picked = snap.pick(pool, &mut l.pick, conn.client_addr.as_ref(), &[]);
        }
        let mi = match picked {
            Pick::Member(i) => i,
            Pick::AllFull if !snap.settings.queue_timeout.is_zero() => {
                self.enqueue(idx);
                return;
            }
            Pick::AllFull => {
                self.close_conn(idx, CloseReason::QueueTimeout);
                return;
            }
            Pick::None => {
                if conn.attempts == 0 {
                    bump(&l.stats.worker(self.id).no_backend, 1);
                }
                let reason = conn.reason.take().unwrap_or(CloseReason::NoBackend);
                self.close_conn(idx, reason);
                return;
            }
        };
        let member = &snap.pools[pool].members[mi];
        let addr = member.address;
        let keepalive = snap.settings.tcp_keepalive;
        let stats = member.stats.clone();
        let li = conn.listener as usize;
        let domain = if addr.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // The ring makes the socket where it can (no syscall); the connect follows its
        // completion (`on_socket`).
        let ring = self.io.socket(domain, self.token(Op::Socket, idx));
        let made = if ring {
            None
        } else {
            match backend_socket(addr, keepalive, &mut self.io) {
                Ok(s) => Some(OwnedFd::from(s)),
                Err(e) => return self.socket_failed(idx, li, e),
            }
        };
        stats.inc_active();
        let conn = self.slots[idx as usize]
            .conn
            .as_mut()
            .expect("checked above");
        conn.stage = Stage::Connecting;
        conn.tried[conn.attempts as usize] = addr;
        conn.attempts += 1;
        conn.member = Some(stats);
        conn.backend_addr = Some(addr);
        match made {
            Some(fd) => self.issue_connect(idx, fd),
            None => conn.inflight += 1,
        }
    }

    /// The ring made (or failed to make) the backend socket of connection `idx`: set its
    /// options and connect (`fd`: the new descriptor, owned since the completion arrived).
    fn on_socket(&mut self, idx: u32, res: i32, fd: Option<OwnedFd>) {
        let conn = self.slots[idx as usize]
            .conn
            .as_ref()
            .expect("caller checked");
        let li = conn.listener as usize;
        let Some(fd) = fd else {
            let e = std::io::Error::from_raw_os_error(-res);
            return self.socket_failed(idx, li, e);
        };
        let keepalive = self.listeners[li].reader.load().settings.tcp_keepalive;
        backend_options(fd.as_fd(), keepalive, &mut self.io);
        self.issue_connect(idx, fd);
    }

    /// No socket for a backend (descriptors or memory are short): the client is closed.
    fn socket_failed(&mut self, idx: u32, li: usize, e: std::io::Error) {
        self.warn_resource(
            li,
            Shortage::Socket,
            "socket() for a backend failed",
            e,
            format_args!("closing the client (open connections keep being served)"),
        );
        self.close_conn(idx, CloseReason::Resource);
    }

    /// Connects connection `idx`'s backend socket `fd` to its chosen backend, within the
    /// listener's `connect_timeout`.
    fn issue_connect(&mut self, idx: u32, fd: OwnedFd) {
        let conn = self.slots[idx as usize]
            .conn
            .as_ref()
            .expect("caller checked");
        let addr = conn.backend_addr.expect("a backend was chosen");
        let li = conn.listener as usize;
        let connect_timeout = self.listeners[li].reader.load().settings.connect_timeout;
        let ts = self.timespec_for(connect_timeout);
        let (ct, tt) = (
            self.token(Op::Connect, idx),
            self.token(Op::ConnectTimeout, idx),
        );
        let conn = self.slots[idx as usize].conn.as_mut().expect("live");
        self.io.connect(fd.as_raw_fd(), idx, &addr, ts, ct, tt);
        conn.backend = Some(fd);
        conn.inflight += 2;
    }

    pub(super) fn on_conn_completion(&mut self, op: Op, c: Completion) {
        let idx = c.token.index();
        // A socket the ring made is ours from here: closed on return unless a live connection
        // takes it.
        let made = (op == Op::Socket && c.result >= 0).then(|| sys::own_received_fd(c.result));
        let live = self
            .slots
            .get(idx as usize)
            .is_some_and(|s| c.token.gen_matches(s.generation) && s.conn.is_some());
        if !live {
            // Stale: cannot happen while finalize waits for inflight == 0, kept as a guard.
            if let Some(bid) = c.buffer() {
                self.io.recycle_buffer(bid);
            }
            return;
        }
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        // A multishot operation holds its place in flight until its last completion.
        if !c.more() {
            conn.inflight -= 1;
        }
        if conn.closing {
            if let Some(bid) = c.buffer() {
                self.io.recycle_buffer(bid);
            }
            if conn.inflight == 0 {
                self.finalize(idx);
            }
            return;
        }
        let res = c.result;
        let step = match op {
            Op::RecvBuf0 => return self.on_ring_recv(idx, Dir::Up, c),
            Op::RecvBuf1 => return self.on_ring_recv(idx, Dir::Down, c),
            Op::SendBuf0 => return self.on_ring_send(idx, Dir::Up, c),
            Op::SendBuf1 => return self.on_ring_send(idx, Dir::Down, c),
            Op::PollOutWait0 => return self.on_out_wakeup(idx, Dir::Up, c),
            Op::PollOutWait1 => return self.on_out_wakeup(idx, Dir::Down, c),
            Op::Socket => {
                self.on_socket(idx, res, made);
                return;
            }
            Op::Connect => {
                self.on_connect(idx, res);
                return;
            }
            Op::HeaderIn => {
                self.on_header(idx, res);
                return;
            }
            Op::HelloIn => {
                self.on_hello(idx, res);
                return;
            }
            Op::ConnectTimeout | Op::Cancel => return,
            Op::PollIn0 => (Dir::Up, conn.flows[0].on_readable(res)),
            Op::PollIn1 => (Dir::Down, conn.flows[1].on_readable(res)),
            Op::PollOut0 => (Dir::Up, conn.flows[0].on_writable(res)),
            Op::PollOut1 => (Dir::Down, conn.flows[1].on_writable(res)),
            Op::Accept
            | Op::Tick
            | Op::Wake
            | Op::AcceptCancel
            | Op::UdpRecv
            | Op::UdpPoll
            | Op::UdpReply
            | Op::UdpCancel
            | Op::UdpSend
            | Op::Detached
            | Op::Shutdown => return,
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
            conn.stage = Stage::Proxying;
            conn.last_active_ms = now;
            if let Some(m) = &conn.member {
                bump(&m.worker(wid).connections, 1);
                m.connect_succeeded();
            }
            debug!(
                "conn {idx}: {:?} -> {:?} connected (attempt {})",
                conn.client_addr, conn.backend_addr, conn.attempts
            );
            let li = conn.listener as usize;
            let settings = &self.listeners[li].reader.load().settings;
            let (send_proxy, drain_postgres) = (settings.send_proxy, settings.drain_postgres);
            let conn = self.slots[idx as usize].conn.as_mut().expect("live");
            if drain_postgres {
                // Every byte through the worker's memory, where the framing is read.
                conn.pg = Some(PgTracker::new());
                conn.flows.iter_mut().for_each(|f| f.see_bytes = true);
            }
            if let Some(version) = send_proxy {
                if !send_proxy_header(conn, version) {
                    self.close_conn(idx, CloseReason::BackendReset);
                    return;
                }
            }
            for d in Dir::BOTH {
                let conn = self.slots[idx as usize].conn.as_mut().expect("live");
                let step = conn.flows[d.index()].start();
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
        if let Some(b) = conn.backend.take() {
            self.io.release_fd(b.as_raw_fd());
        }
        conn.reason = Some(reason);
        if conn.attempts < MAX_CONNECT_ATTEMPTS {
            self.connect_next(idx);
        } else {
            self.close_conn(idx, reason);
        }
    }

    /// Carries out a flow's steps until it must wait for the ring. Splices run inline as
    /// non-blocking `splice(2)` calls on this thread (sockets and pipes are non-blocking, so they
    /// never block): measured on these machines, an `IORING_OP_SPLICE` always goes through an
    /// io-wq kernel thread, and that hand-off per chunk cost more CPU per connection and per GB
    /// than the copy-free splice itself. Readiness (POLL_ADD) still comes from the ring.
    pub(super) fn apply(&mut self, idx: u32, d: Dir, step: Step) {
        let generation = self.slots[idx as usize].generation;
        let tok =
            |up: Op, down: Op| Token::new(if d == Dir::Up { up } else { down }, idx, generation);
        let now = self.now_ms;
        let wid = self.id;
        let pool = &mut self.pool;
        let copy_buf = &mut self.copy_buf;
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
        let mut step = step;
        // Chunks moved before yielding to other connections (fairness on a busy stream).
        let mut budget = SPLICE_BUDGET;
        let mut no_pipe = None;
        let fail = loop {
            match step {
                Step::SpliceIn if budget > 0 && conn.flows[di].wants_copy() => {
                    budget -= 1;
                    // Never read more than a pipe could park should the destination take
                    // nothing (a small pipe: the user's pipe budget is spent). Without a pipe
                    // at all (out of descriptors) read as usual: a leftover then closes.
                    let limit = match pool.room(&mut conn.pipes[di]) {
                        Ok(room) => copy_buf.len().min(room as usize),
                        Err(_) => copy_buf.len(),
                    };
                    let read = sys::recv_nb(src, &mut copy_buf[..limit]);
                    let sent = if read > 0 {
                        sys::send_nb(dst, &copy_buf[..read as usize])
                    } else {
                        0
                    };
                    if read > 0 {
                        conn.last_active_ms = now;
                        if let Some(pg) = conn.pg.as_mut() {
                            pg.forwarded(d, &copy_buf[..read as usize]);
                        }
                        let sent_ok = sent.max(0);
                        count_bytes(&conn.member, wid, d, sent_ok);
                        if sent_ok < read && (sent >= 0 || sent == -libc::EAGAIN) {
                            // The destination took less: the rest waits in a pipe, as a
                            // splice-in would have left it.
                            let pipe = match pool.take(&mut conn.pipes[di]) {
                                Ok(p) => p,
                                Err(e) => {
                                    no_pipe = Some(e);
                                    break Some(CloseReason::Resource);
                                }
                            };
                            let rest = &copy_buf[sent_ok as usize..read as usize];
                            if sys::write_nb(pipe.write.as_raw_fd(), rest) != rest.len() as i32 {
                                break Some(CloseReason::Resource);
                            }
                        }
                    }
                    let full = read as usize == limit;
                    step = conn.flows[di].on_copied(read, sent, full);
                }
                Step::SpliceIn if budget > 0 => {
                    budget -= 1;
                    let pipe = match pool.take(&mut conn.pipes[di]) {
                        Ok(p) => p,
                        Err(e) => {
                            no_pipe = Some(e);
                            break Some(CloseReason::Resource);
                        }
                    };
                    let res = sys::splice(src, pipe.write.as_raw_fd(), pipe.capacity);
                    if res > 0 {
                        conn.last_active_ms = now;
                    }
                    step = conn.flows[di].on_spliced_in(res);
                }
                Step::SpliceOut(n) if budget > 0 => {
                    let Some(pipe) = conn.pipes[di].as_ref() else {
                        break Some(CloseReason::Resource);
                    };
                    let res = sys::splice(pipe.read.as_raw_fd(), dst, n);
                    if res > 0 {
                        conn.last_active_ms = now;
                        count_bytes(&conn.member, wid, d, res);
                    }
                    step = conn.flows[di].on_spliced_out(res);
                }
                Step::SpliceIn | Step::SpliceOut(_) => {
                    // Budget spent with data likely waiting: let the ring report readiness.
                    step = conn.flows[di].yield_to_ring(step);
                }
                Step::PollIn
                    if d == Dir::Down
                        && conn.pg.as_ref().is_some_and(PgTracker::is_idle)
                        && conn
                            .member
                            .as_ref()
                            .is_some_and(|m| m.winding_down_since().is_some()) =>
                {
                    // Everything the backend sent (its ReadyForQuery last) is with the client,
                    // the session is idle and the backend is being drained: close here.
                    pool.release(&mut conn.pipes[di]);
                    break Some(CloseReason::DrainIdle);
                }
                Step::PollIn => {
                    pool.release(&mut conn.pipes[di]);
                    conn.inflight += 1;
                    // A flow of small messages waits in the ring for its next one (ringio.rs).
                    if !(conn.flows[di].wants_copy()
                        && self.io.recv_buffered(src, tok(Op::RecvBuf0, Op::RecvBuf1)))
                    {
                        self.io
                            .poll(src, libc::POLLIN as u32, tok(Op::PollIn0, Op::PollIn1));
                    }
                    break None;
                }
                Step::PollOut => {
                    conn.inflight += 1;
                    self.io
                        .poll(dst, libc::POLLOUT as u32, tok(Op::PollOut0, Op::PollOut1));
                    break None;
                }
                Step::PollOutWakeups => {
                    conn.out_wait[di] = true;
                    // One that is still armed (its cancel in flight) serves: when it ends,
                    // `on_out_wakeup` arms the next.
                    if !conn.out_multi[di] {
                        conn.out_multi[di] = true;
                        conn.inflight += 1;
                        let t = tok(Op::PollOutWait0, Op::PollOutWait1);
                        self.io.poll_multi(dst, libc::POLLOUT as u32, t);
                    }
                    break None;
                }
                Step::ShutdownDest => {
                    pool.release(&mut conn.pipes[di]);
                    let dst_fd = if d == Dir::Up { backend } else { &conn.client };
                    conn.first_eof.get_or_insert(d);
                    let all_done = conn.flows.iter().all(Flow::is_done);
                    // The second EOF needs no half-close: both sockets are closed next, with
                    // nothing unread, which sends the same FIN.
                    if !all_done {
                        self.io.shutdown_write(dst_fd.as_fd());
                    }
                    break if all_done {
                        Some(if conn.first_eof == Some(Dir::Up) {
                            CloseReason::ClientEof
                        } else {
                            CloseReason::BackendEof
                        })
                    } else {
                        None
                    };
                }
                Step::SourceFailed(_) => break Some(CloseReason::from_failure(d, true)),
                Step::DestFailed(_) => break Some(CloseReason::from_failure(d, false)),
            }
        };
        if let Some(e) = no_pipe {
            let li = conn.listener as usize;
            self.warn_resource(
                li,
                Shortage::Pipe,
                "pipe2() failed",
                e,
                format_args!("closing the connection (open connections keep being served)"),
            );
        }
        if let Some(reason) = fail {
            self.close_conn(idx, reason);
        }
    }

    /// Starts closing a connection: resets the other side if the reason calls for it, cancels
    /// what is in flight, and finalizes once nothing is.
    pub(super) fn close_conn(&mut self, idx: u32, reason: CloseReason) {
        let cancel = self.token(Op::Cancel, idx);
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        if conn.closing {
            return;
        }
        conn.closing = true;
        conn.reason = Some(reason);
        // A close that drops bytes or cuts a live stream resets both legs: a FIN would tell an
        // EOF-framed protocol that the stream ended where it was cut.
        let parked = conn.flows.iter().any(|f| f.pending > 0);
        let cut = conn.stage == Stage::Proxying
            && (reason.cuts_stream() || (reason == CloseReason::IdleTimeout && parked));
        let reset_client = cut || reason.reset_other_side() == Some(Side::Client);
        let reset_backend = cut || reason.reset_other_side() == Some(Side::Backend);
        if reset_client {
            sys::set_linger_zero(conn.client.as_fd());
        }
        if let (true, Some(b)) = (reset_backend, &conn.backend) {
            sys::set_linger_zero(b.as_fd());
        }
        if let (CloseReason::DrainIdle, Some(b)) = (reason, &conn.backend) {
            // The session is idle: end it as a client would (Terminate), so the server logs
            // no lost connection, and let the client see its EOF at once.
            let _ = sys::send_nb(b.as_raw_fd(), &super::pgdrain::TERMINATE);
            self.io.shutdown_write(conn.client.as_fd());
        }
        if conn.inflight == 0 {
            self.finalize(idx);
            return;
        }
        self.io.cancel_fd(conn.client.as_raw_fd(), cancel);
        conn.inflight += 1;
        if let Some(b) = &conn.backend {
            self.io.cancel_fd(b.as_raw_fd(), cancel);
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
        if conn.stage == Stage::Held {
            let l = &mut self.listeners[conn.listener as usize];
            l.held_live = l.held_live.saturating_sub(1);
        }
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
        let snap = l.reader.load();
        if snap.settings.access_log {
            info!(
                target: crate::logging::ACCESS_TARGET,
                listener = &*l.name,
                client = conn.client_addr,
                backend = conn.backend_addr,
                duration_ms = self.now_ms.saturating_sub(conn.opened_ms),
                bytes_up = conn.flows[0].bytes,
                bytes_down = conn.flows[1].bytes,
                reason = reason.as_str();
                "access"
            );
        }
        let limit = u64::from(snap.settings.max_connections);
        let freed_backend = conn.member.is_some();
        let counted = conn.counted;
        // Ring buffers it still holds: their sends have completed (nothing is in flight).
        for rb in conn.ring_bufs.iter().flatten() {
            self.io.recycle_buffer(rb.bid);
        }
        // Pipes still held here may hold bytes that were never forwarded: close them, do not
        // return them to the pool (they close as `conn` drops). The sockets close through the
        // driver (in the ring where it can): nothing in flight names them.
        let Conn {
            client, backend, ..
        } = conn;
        self.io.close(client);
        if let Some(b) = backend {
            self.io.close(b);
        }
        self.shared.live.fetch_sub(1, Ordering::Relaxed);
        l.stats
            .worker(self.id)
            .active
            .fetch_sub(1, Ordering::Relaxed);
        let open = if counted {
            l.stats.closed()
        } else {
            l.stats.open_now()
        };
        if !l.held.is_empty() && open < limit {
            self.release_held(li);
        }
        self.follow_limit(li, open);
        if freed_backend && !self.listeners[li].queue.is_empty() {
            self.retry_queue(li);
        }
    }
}

/// Counts `n` bytes forwarded in direction `d` on the backend's per-worker counters.
pub(super) fn count_bytes(member: &Option<Arc<BackendStats>>, worker: usize, d: Dir, n: i32) {
    if let (Some(m), true) = (member, n > 0) {
        let w = m.worker(worker);
        bump(
            if d == Dir::Up {
                &w.bytes_up
            } else {
                &w.bytes_down
            },
            n as u64,
        );
    }
}

/// A non-blocking, close-on-exec TCP socket for a backend made by `socket(2)` (where the ring
/// cannot make it), with its options ([`backend_options`]).
fn backend_socket(
    addr: SocketAddr,
    keepalive: Option<Duration>,
    io: &mut impl Driver,
) -> std::io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    backend_options(sock.as_fd(), keepalive, io);
    Ok(sock)
}

/// TCP_NODELAY and keepalive on a fresh backend socket: in the ring where the driver can (the
/// connect that follows is queued behind them), else by `setsockopt`. Failures are ignored
/// (the connection works without them).
fn backend_options(fd: BorrowedFd<'_>, keepalive: Option<Duration>, io: &mut impl Driver) {
    let (tcp, sol) = (libc::IPPROTO_TCP, libc::SOL_SOCKET);
    let mut opts = [(tcp, libc::TCP_NODELAY, 1); 5];
    let n = match keepalive {
        Some(idle) => {
            let (time, interval, retries) = keepalive_secs(idle);
            opts[1..].copy_from_slice(&[
                (sol, libc::SO_KEEPALIVE, 1),
                (tcp, libc::TCP_KEEPIDLE, time as i32),
                (tcp, libc::TCP_KEEPINTVL, interval as i32),
                (tcp, libc::TCP_KEEPCNT, retries as i32),
            ]);
            5
        }
        None => 1,
    };
    if io.set_options(fd.as_raw_fd(), &opts[..n]) {
        return;
    }
    let sock = socket2::SockRef::from(&fd);
    let _ = sock.set_tcp_nodelay(true);
    if let Some(idle) = keepalive {
        let _ = sock.set_tcp_keepalive(&keepalive_params(idle));
    }
}

/// Keepalive probing for an idle time, in seconds: (idle, interval idle/6 clamped to 1 ..= 75,
/// 6 probes).
fn keepalive_secs(idle: Duration) -> (u64, u64, u32) {
    let interval = (idle / 6).clamp(Duration::from_secs(1), Duration::from_secs(75));
    (idle.as_secs(), interval.as_secs(), 6)
}

/// Keepalive probing for an idle time: interval idle/6 (1 s ..= 75 s), 6 probes.
pub fn keepalive_params(idle: Duration) -> socket2::TcpKeepalive {
    let (time, interval, retries) = keepalive_secs(idle);
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(time))
        .with_interval(Duration::from_secs(interval))
        .with_retries(retries)
}

/// Writes the PROXY header to a just-connected backend. The socket's send buffer is empty, so a
/// header of at most 108 bytes goes out whole; anything else is a failure.
fn send_proxy_header(conn: &Conn, version: proxy_protocol::Version) -> bool {
    let Some(backend) = &conn.backend else {
        return false;
    };
    let src = conn
        .client_addr
        .or_else(|| sys::peer_addr(conn.client.as_fd()));
    let dst = conn
        .client_dst
        .or_else(|| sys::local_addr(conn.client.as_fd()));
    let (Some(src), Some(dst)) = (src, dst) else {
        return false;
    };
    let mut buf = [0u8; MAX_ENCODED];
    let len = proxy_protocol::encode(version, src, dst, &mut buf);
    matches!(socket2::SockRef::from(backend).send(&buf[..len]), Ok(n) if n == len)
}
