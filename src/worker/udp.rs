//! UDP on a worker: each UDP listener has its own `SO_REUSEPORT` socket here, received with
//! io_uring `recvmsg` into ring-owned buffers (a few in flight); a flow table keyed by (listener,
//! client address) maps each client to a connected upstream socket. A datagram goes upstream by
//! an io_uring `SEND` straight from its receive buffer, with that buffer's next `recvmsg` linked
//! behind it (one `io_uring_enter` for a batch of datagrams); the flow's replies (a multishot
//! ring `RECV` into provided buffers, copied into the worker's outbox; where the driver has
//! none, a multishot poll, then non-blocking `recvmmsg` into the outbox) go back to the client
//! from the listener's socket, one `sendmmsg` per batch of completions. Flows expire after
//! `idle_timeout`; `max_flows` bounds the table by evicting the least recently used flow.
//! Nothing is allocated per datagram.
//! Must not: block, log per datagram, free a flow's socket while a poll, receive or send names
//! it, or keep a reply buffer past the completion that handed it over.

mod handover;

use super::{Worker, UDP_RECV_SLOTS};
use crate::backend::{bump, BackendStats};
use crate::io::{recv_slot_of, recv_token, Completion, Driver, Op, RecvSetId, Token};
use crate::snapshot::Pick;
use hashbrown::HashMap;
use log::debug;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Largest datagram forwarded (the UDP maximum over IPv4).
pub const MAX_DATAGRAM: usize = 65536;
/// Replies drained from one upstream socket per readiness event (fairness between flows).
const DRAIN_BATCH: usize = 64;
/// Replies taken per recvmmsg.
const REPLY_BATCH: usize = 8;
/// Replies held for one batched send (each in a 64 KiB slot of the outbox).
const OUTBOX_SLOTS: usize = crate::sys::SEND_BATCH_MAX;
const NIL: u32 = u32::MAX;
/// A flow that carried a datagram within this long is never evicted for a new one.
const EVICT_IDLE_MS: u64 = 1000;

/// A UDP listener's receive side on one worker.
pub(super) struct UdpListener {
    pub set: RecvSetId,
    /// recvmsg operations in flight.
    pub inflight: u32,
    /// Flows of this listener in the worker's table, closing ones included (a removed listener's
    /// slot is not reused until this is 0, so no flow outlives its listener).
    pub flows: u32,
    /// Least recently used list of this listener's flows (head = most recent).
    head: u32,
    tail: u32,
}

impl UdpListener {
    pub fn new(set: RecvSetId) -> UdpListener {
        UdpListener {
            set,
            inflight: 0,
            flows: 0,
            head: NIL,
            tail: NIL,
        }
    }
}

/// One client's flow: its upstream socket connected to the chosen backend.
struct Flow {
    listener: u32,
    client: SocketAddr,
    /// The address the client sent to, when the listener is bound to a wildcard address:
    /// replies must leave from it.
    local: Option<IpAddr>,
    socket: OwnedFd,
    member: Arc<BackendStats>,
    last_active_ms: u64,
    prev: u32,
    next: u32,
    /// Poll, cancel and send operations in flight (sends: at most one per receive slot).
    inflight: u8,
    closing: bool,
    /// Handed to a new process (binary upgrade): replies the ring had already taken for it
    /// still go to the client while its receive winds down.
    handed: bool,
}

struct FlowSlot {
    generation: u32,
    flow: Option<Flow>,
}

/// Replies read from upstream sockets, waiting to leave in one `sendmmsg` per listener when the
/// worker has handled its batch of completions (or when the outbox is full): one syscall, and one
/// point where the scheduler may switch to the woken client, per batch rather than per reply.
pub(super) struct Outbox {
    buf: Box<[u8]>,
    out: Vec<crate::sys::OutDatagram>,
    /// (listener, flow, flow generation) of each reply in `out`.
    from: Vec<(u32, u32, u32)>,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox {
            buf: vec![0u8; OUTBOX_SLOTS * MAX_DATAGRAM].into_boxed_slice(),
            out: Vec::with_capacity(OUTBOX_SLOTS),
            from: Vec::with_capacity(OUTBOX_SLOTS),
        }
    }
}

/// The worker's UDP flows, all listeners together.
#[derive(Default)]
pub(super) struct Flows {
    /// Last time (worker ms) any flow forwarded a datagram: draining waits a moment after it so
    /// replies in flight still reach their clients.
    pub last_activity_ms: u64,
    map: HashMap<(u32, SocketAddr), u32>,
    slots: Vec<FlowSlot>,
    free: Vec<u32>,
    /// Flows handed to a new process, by (listener, client): a duplicate of the upstream socket
    /// (the same socket the new process reads replies from). A client datagram this worker had
    /// already taken when it handed its flows over still goes up through it.
    handed: HashMap<(u32, SocketAddr), (OwnedFd, Arc<BackendStats>)>,
}

impl Worker {
    /// Starts (or restarts) the listener's recvmsg operations.
    pub(super) fn arm_udp(&mut self, li: usize) {
        let l = &mut self.listeners[li];
        let (Some(sock), Some(u)) = (&l.socket, l.udp.as_mut()) else {
            return;
        };
        if self.draining || l.removed_at_ms.is_some() {
            return;
        }
        for k in 0..UDP_RECV_SLOTS {
            let tok = recv_token(u.set, k);
            self.io.recvmsg(sock.as_raw_fd(), u.set, k, tok);
        }
        u.inflight = UDP_RECV_SLOTS as u32;
    }

    pub(super) fn on_udp_completion(&mut self, op: Op, c: Completion) {
        match op {
            Op::UdpRecv => self.on_udp_recv(c),
            Op::UdpPoll | Op::UdpCancel => self.on_flow_event(op, c),
            Op::UdpReply => self.on_flow_reply(c),
            Op::UdpSend => self.on_flow_sent(c),
            _ => {}
        }
    }

    /// A datagram from a client (or the end of a cancelled recvmsg).
    fn on_udp_recv(&mut self, c: Completion) {
        let (set, k) = recv_slot_of(c.token);
        let (client, local) = self.io.recv_done(set, k);
        // The set identifies the listener (a set is reused only once nothing is in flight).
        let Some(li) = self
            .listeners
            .iter()
            .position(|l| l.udp.as_ref().is_some_and(|u| u.set == set))
        else {
            return;
        };
        let now = self.now_ms;
        let l = &self.listeners[li];
        let stopping = self.draining || l.removed_at_ms.is_some();
        // While the listener runs, the slot's next recvmsg is linked behind the upstream send.
        let rearm_on = l
            .socket
            .as_ref()
            .map(|s| s.as_raw_fd())
            .filter(|_| !stopping);
        let mut rearmed = false;
        if let (Some(client), true) = (client, c.result >= 0) {
            let slot = (set, k, c.result as usize);
            rearmed = self.forward_up(li, client, local, slot, rearm_on, now);
        }
        let l = &mut self.listeners[li];
        let Some(u) = l.udp.as_mut() else {
            return;
        };
        u.inflight = u.inflight.saturating_sub(1);
        if stopping {
            self.drop_socket_if_done(li);
            return;
        }
        if rearmed {
            u.inflight += 1;
        } else if let Some(sock) = &l.socket {
            u.inflight += 1;
            self.io
                .recvmsg(sock.as_raw_fd(), set, k, recv_token(set, k));
        }
    }

    /// Sends the datagram in ring slot `(set, k)` (`len` bytes) from `client` to its flow's
    /// backend, creating the flow if needed (and re-creating it when its backend went down or
    /// was removed since). With `rearm_on` (the listener's socket), the send goes through the
    /// ring with the slot's next recvmsg linked behind it, and this returns true; otherwise (a
    /// stopping listener) the datagram is sent at once and the slot is left to the caller.
    fn forward_up(
        &mut self,
        li: usize,
        client: SocketAddr,
        local: Option<IpAddr>,
        (set, k, len): (RecvSetId, usize, usize),
        rearm_on: Option<std::os::fd::RawFd>,
        now: u64,
    ) -> bool {
        let key = (li as u32, client);
        if let Some(&i) = self.flows.map.get(&key) {
            let stale = self.flows.slots[i as usize]
                .flow
                .as_ref()
                .is_some_and(|f| !f.member.is_up() || f.member.removed_at().is_some());
            if stale {
                self.close_flow(i);
            }
        }
        let idx = match self.flows.map.get(&key) {
            Some(&i) => i,
            // A stopping listener (removed, or draining) forwards for the flows it has and opens
            // no new one: a flow opened now would outlive the listener's slot.
            None if rearm_on.is_none() => {
                self.forward_handed(li, client, (set, k, len));
                return false;
            }
            None => match self.open_flow(li, client, local) {
                Some(i) => i,
                None => {
                    bump(&self.listeners[li].stats.worker(self.id).udp_dropped, 1);
                    return false;
                }
            },
        };
        self.touch(idx, now);
        let slot = &mut self.flows.slots[idx as usize];
        let generation = slot.generation;
        let f = slot.flow.as_mut().expect("mapped flow");
        if let Some(listener_fd) = rearm_on {
            let tok = Token::new(Op::UdpSend, idx, generation);
            let recv_tok = recv_token(set, k);
            let fd = f.socket.as_raw_fd();
            if self
                .io
                .send_then_recvmsg(fd, tok, listener_fd, set, k, len, recv_tok)
            {
                // Counted in the flow's in-flight operations: its socket stays open until the
                // send completes.
                f.inflight += 1;
                return true;
            }
        }
        let sock = socket2::SockRef::from(&f.socket);
        match sock.send(self.io.recv_data(set, k, len)) {
            Ok(_) => bump(&f.member.worker(self.id).datagrams_up, 1),
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                self.send_failed(idx, li, errno);
            }
        }
        false
    }

    /// A client datagram taken after this worker handed its flows to a new process goes up
    /// through the handed flow's socket (whose replies the new process reads); with no such
    /// flow it is dropped and counted.
    fn forward_handed(
        &mut self,
        li: usize,
        client: SocketAddr,
        (set, k, len): (RecvSetId, usize, usize),
    ) {
        let sent = self
            .flows
            .handed
            .get(&(li as u32, client))
            .map(|(socket, member)| {
                let ok = socket2::SockRef::from(socket)
                    .send(self.io.recv_data(set, k, len))
                    .is_ok();
                if ok {
                    bump(&member.worker(self.id).datagrams_up, 1);
                }
                ok
            });
        if sent != Some(true) {
            bump(&self.listeners[li].stats.worker(self.id).udp_dropped, 1);
        }
    }

    /// A datagram to flow `idx`'s backend could not be sent (`errno`): it is dropped and
    /// counted. A full send buffer only drops the datagram (UDP under pressure); any other error
    /// closes the flow, and a refusal (ICMP port unreachable) also counts against the backend.
    fn send_failed(&mut self, idx: u32, li: usize, errno: i32) {
        bump(&self.listeners[li].stats.worker(self.id).udp_dropped, 1);
        if matches!(errno, libc::EAGAIN | libc::ENOBUFS) {
            return;
        }
        if let Some(f) = self.flows.slots[idx as usize].flow.as_ref() {
            if errno == libc::ECONNREFUSED {
                f.member.connect_failed();
            }
            debug!(
                "udp flow {} -> {}: send failed: {}",
                f.client,
                f.member.address,
                std::io::Error::from_raw_os_error(errno)
            );
        }
        self.close_flow(idx);
    }

    /// The flow a completion names; None when its slot was freed (and maybe reused) since.
    fn flow_of(&mut self, c: &Completion) -> Option<&mut Flow> {
        let slot = self.flows.slots.get_mut(c.token.index() as usize)?;
        if !c.token.gen_matches(slot.generation) {
            return None;
        }
        slot.flow.as_mut()
    }

    /// Counts off one of flow `idx`'s operations in flight if `ended`. Returns whether the flow
    /// is closing (its completions then need nothing more); a closing flow is freed once no
    /// operation names its socket.
    fn flow_op_ended(&mut self, idx: u32, ended: bool) -> bool {
        let Some(f) = self.flows.slots[idx as usize].flow.as_mut() else {
            return true;
        };
        if ended {
            f.inflight = f.inflight.saturating_sub(1);
        }
        if f.closing && f.inflight == 0 {
            self.free_flow(idx);
            return true;
        }
        f.closing
    }

    /// A datagram sent through the ring on a flow's upstream socket completed.
    fn on_flow_sent(&mut self, c: Completion) {
        let (idx, id) = (c.token.index(), self.id);
        let Some(f) = self.flow_of(&c) else {
            return;
        };
        let li = f.listener as usize;
        if c.result >= 0 {
            bump(&f.member.worker(id).datagrams_up, 1);
        }
        if self.flow_op_ended(idx, true) {
            // A send the flow's close cancelled is a dropped datagram.
            if c.result < 0 {
                bump(&self.listeners[li].stats.worker(id).udp_dropped, 1);
            }
            return;
        }
        if c.result < 0 {
            self.send_failed(idx, li, -c.result);
        }
    }

    /// Picks a backend for a new client and opens its connected upstream socket.
    fn open_flow(&mut self, li: usize, client: SocketAddr, local: Option<IpAddr>) -> Option<u32> {
        let id = self.id;
        let limit = {
            let l = &mut self.listeners[li];
            let snap = l.reader.load();
            (snap.settings.max_flows as usize).div_ceil(self.workers) as u32
        };
        // Full table: evict the least recently used flow of this listener, unless even that one
        // carried a datagram within the last second — then the new source is refused (a flood of
        // spoofed sources must not evict the real flows). The per-worker flow gauge is written
        // only by this worker.
        let open = self.listeners[li]
            .stats
            .worker(id)
            .udp_flows
            .load(Ordering::Relaxed);
        if open >= u64::from(limit) {
            let tail = self.listeners[li].udp.as_ref().map_or(NIL, |u| u.tail);
            let tail_active = self
                .flows
                .slots
                .get(tail as usize)
                .and_then(|s| s.flow.as_ref());
            match tail_active {
                Some(f) if self.now_ms.saturating_sub(f.last_active_ms) < EVICT_IDLE_MS => {
                    bump(&self.listeners[li].stats.worker(id).udp_refused, 1);
                    return None;
                }
                Some(_) => {
                    bump(&self.listeners[li].stats.worker(id).udp_evicted, 1);
                    self.close_flow(tail);
                }
                None => {}
            }
        }
        // UDP flows never take the descriptors TCP connections need: past their share of
        // RLIMIT_NOFILE new flows are refused.
        if self.flows.map.len() as u64 >= self.udp_fd_share() {
            bump(&self.listeners[li].stats.worker(id).udp_refused, 1);
            self.warn_resource(
                li,
                super::Shortage::Socket,
                "UDP flows reached their share of RLIMIT_NOFILE",
                std::io::Error::from_raw_os_error(libc::EMFILE),
                format_args!("refusing new flows (TCP keeps a reserve; raise LimitNOFILE)"),
            );
            return None;
        }
        let l = &mut self.listeners[li];
        let snap = l.reader.load();
        // A UDP listener has exactly one pool (routes are TCP only).
        let Pick::Member(mi) = snap.pick(0, &mut l.pick, Some(&client), &[]) else {
            bump(&l.stats.worker(id).no_backend, 1);
            return None;
        };
        let member = &snap.pools[0].members[mi];
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(member.address),
            socket2::Type::DGRAM.nonblocking().cloexec(),
            None,
        )
        .and_then(|s| s.connect(&member.address.into()).map(|()| s));
        let sock = match sock {
            Ok(s) => s,
            Err(e) => {
                debug!(
                    "udp flow {client}: upstream socket to {}: {e}",
                    member.address
                );
                self.warn_resource(
                    li,
                    super::Shortage::Socket,
                    "socket() for a UDP flow failed",
                    e,
                    format_args!("dropping the datagram (open flows keep being served)"),
                );
                return None;
            }
        };
        let stats = member.stats.clone();
        stats.inc_active();
        bump(&l.stats.worker(id).udp_flows, 1);
        let flow = Flow {
            listener: li as u32,
            client,
            local,
            socket: sock.into(),
            member: stats,
            last_active_ms: self.now_ms,
            prev: NIL,
            next: NIL,
            inflight: 1,
            closing: false,
            handed: false,
        };
        let idx = match self.flows.free.pop() {
            Some(i) => {
                self.flows.slots[i as usize].flow = Some(flow);
                i
            }
            None => {
                self.flows.slots.push(FlowSlot {
                    generation: 0,
                    flow: Some(flow),
                });
                (self.flows.slots.len() - 1) as u32
            }
        };
        self.flows.map.insert((li as u32, client), idx);
        if let Some(u) = self.listeners[li].udp.as_mut() {
            u.flows += 1;
        }
        self.link_front(idx);
        self.arm_replies(idx);
        Some(idx)
    }

    /// Starts waiting for flow `idx`'s replies (its in-flight count already includes this): a
    /// multishot ring receive where the driver has one, else a multishot poll.
    fn arm_replies(&mut self, idx: u32) {
        let slot = &self.flows.slots[idx as usize];
        let fd = slot.flow.as_ref().expect("flow").socket.as_raw_fd();
        let tok = Token::new(Op::UdpReply, idx, slot.generation);
        if !self.io.recv_replies(fd, tok) {
            let tok = Token::new(Op::UdpPoll, idx, slot.generation);
            self.io.poll_multi(fd, libc::POLLIN as u32, tok);
        }
    }

    /// A reply the ring received on a flow's upstream socket (into a ring buffer, which goes
    /// back at once: the reply is copied into the outbox), or the end of that receive.
    fn on_flow_reply(&mut self, c: Completion) {
        let idx = c.token.index();
        let bid = c.buffer();
        let ended = !c.more();
        let Some(f) = self.flow_of(&c) else {
            if let Some(bid) = bid {
                self.io.recycle_reply(bid);
            }
            return;
        };
        if f.closing {
            // Handed over: the reply was taken before the receive was cancelled; it still goes.
            match bid {
                Some(bid) if f.handed => self.queue_ring_reply(idx, bid, c.result),
                Some(bid) => self.io.recycle_reply(bid),
                None => {}
            }
            self.flow_op_ended(idx, ended);
            return;
        }
        self.flow_op_ended(idx, ended);
        if let Some(bid) = bid {
            self.queue_ring_reply(idx, bid, c.result);
            self.touch(idx, self.now_ms);
        } else if c.result < 0 && c.result != -libc::ENOBUFS {
            let f = self.flows.slots[idx as usize].flow.as_ref().expect("flow");
            if c.result == -libc::ECONNREFUSED {
                // ICMP port unreachable: the backend is not there (passive health).
                f.member.connect_failed();
            }
            debug!(
                "udp flow {}: upstream {}: {}",
                f.client,
                f.member.address,
                std::io::Error::from_raw_os_error(-c.result)
            );
            self.close_flow(idx);
            return;
        }
        if ended {
            if c.result == -libc::ENOBUFS {
                // Out of buffers: other flows' replies filled them between two reaps. This
                // flow's waiting replies are taken by syscall once (re-arming alone would only
                // meet the next -ENOBUFS while the burst lasts), then the ring takes over again.
                self.drain_replies(idx);
            }
            let Some(f) = self.flows.slots[idx as usize].flow.as_mut() else {
                return;
            };
            if !f.closing {
                f.inflight += 1;
                self.arm_replies(idx);
            }
        }
    }

    /// Copies a reply out of ring buffer `bid` (which goes back at once) into the outbox, for
    /// flow `idx`'s client.
    fn queue_ring_reply(&mut self, idx: u32, bid: u16, result: i32) {
        if self.outbox.out.len() >= OUTBOX_SLOTS {
            self.flush_replies();
        }
        let generation = self.flows.slots[idx as usize].generation;
        let f = self.flows.slots[idx as usize].flow.as_ref().expect("flow");
        let at = self.outbox.out.len();
        let data = self.io.reply_data(bid, result.max(0) as u32);
        let len = data.len();
        self.outbox.buf[at * MAX_DATAGRAM..at * MAX_DATAGRAM + len].copy_from_slice(data);
        self.io.recycle_reply(bid);
        self.outbox.out.push(crate::sys::OutDatagram {
            offset: at * MAX_DATAGRAM,
            len,
            to: f.client,
            from: f.local,
        });
        self.outbox.from.push((f.listener, idx, generation));
        f.member.connect_succeeded();
    }

    /// Upstream sockets UDP flows may hold on this worker: its share of half the descriptor
    /// limit while a TCP listener runs (the other half is TCP's reserve), of 90% otherwise.
    fn udp_fd_share(&self) -> u64 {
        let tcp = self
            .listeners
            .iter()
            .any(|l| l.udp.is_none() && l.removed_at_ms.is_none());
        let usable = if tcp {
            self.nofile / 2
        } else {
            self.nofile / 10 * 9
        };
        (usable / self.workers as u64).max(1)
    }

    /// A flow's upstream socket is readable (replies), or its poll/cancel ended.
    fn on_flow_event(&mut self, op: Op, c: Completion) {
        let idx = c.token.index();
        if self.flow_of(&c).is_none() {
            return;
        }
        let ended = op == Op::UdpCancel || !c.more();
        if self.flow_op_ended(idx, ended) || op == Op::UdpCancel {
            return;
        }
        if c.result >= 0 {
            self.drain_replies(idx);
        }
        let slot = &mut self.flows.slots[idx as usize];
        let generation = slot.generation;
        let Some(f) = slot.flow.as_mut() else {
            return;
        };
        if !f.closing && ended {
            // The multishot poll stopped (error or overflow): re-arm it.
            f.inflight += 1;
            let tok = Token::new(Op::UdpPoll, idx, generation);
            let fd = f.socket.as_raw_fd();
            self.io.poll_multi(fd, libc::POLLIN as u32, tok);
        }
    }

    /// Takes pending replies of a flow into the outbox, for its client via the listener's socket.
    fn drain_replies(&mut self, idx: u32) {
        let now = self.now_ms;
        let mut got = false;
        let mut lens = [0usize; REPLY_BATCH];
        for _ in 0..DRAIN_BATCH / REPLY_BATCH {
            if self.outbox.out.len() + REPLY_BATCH > OUTBOX_SLOTS {
                self.flush_replies();
            }
            let generation = self.flows.slots[idx as usize].generation;
            let Some(f) = self.flows.slots[idx as usize].flow.as_ref() else {
                return;
            };
            let at = self.outbox.out.len();
            // One recvmmsg takes every queued reply (up to a batch): no extra recv to learn
            // that the socket is empty after the usual single reply.
            let n = match crate::sys::recv_batch(
                f.socket.as_fd(),
                &mut self.outbox.buf[at * MAX_DATAGRAM..],
                MAX_DATAGRAM,
                &mut lens,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                        // ICMP port unreachable: the backend is not there (passive health).
                        f.member.connect_failed();
                    }
                    debug!("udp flow {}: upstream {}: {e}", f.client, f.member.address);
                    self.close_flow(idx);
                    return;
                }
            };
            for (i, &len) in lens[..n].iter().enumerate() {
                self.outbox.out.push(crate::sys::OutDatagram {
                    offset: (at + i) * MAX_DATAGRAM,
                    len,
                    to: f.client,
                    from: f.local,
                });
                self.outbox.from.push((f.listener, idx, generation));
            }
            got |= n > 0;
            if n < REPLY_BATCH {
                break;
            }
        }
        if got {
            if let Some(f) = self.flows.slots[idx as usize].flow.as_ref() {
                f.member.connect_succeeded();
            }
            self.touch(idx, now);
        }
    }

    /// Sends the replies in the outbox: one `sendmmsg` per run of replies of one listener.
    pub(super) fn flush_replies(&mut self) {
        let mut sent = [false; crate::sys::SEND_BATCH_MAX];
        let ob = &self.outbox;
        let mut i = 0;
        while i < ob.out.len() {
            let li = ob.from[i].0;
            let j = i + ob.from[i..].iter().take_while(|m| m.0 == li).count();
            if let Some(ls) = &self.listeners[li as usize].socket {
                crate::sys::send_batch(ls.as_fd(), &ob.buf, &ob.out[i..j], &mut sent);
                for (k, &(_, fi, generation)) in ob.from[i..j].iter().enumerate() {
                    let slot = &self.flows.slots[fi as usize];
                    if let (true, true, Some(f)) =
                        (sent[k], slot.generation == generation, slot.flow.as_ref())
                    {
                        bump(&f.member.worker(self.id).datagrams_down, 1);
                    }
                }
            }
            i = j;
        }
        self.outbox.out.clear();
        self.outbox.from.clear();
    }

    /// Removes a flow from the table now; its socket closes once its poll has ended.
    pub(super) fn close_flow(&mut self, idx: u32) {
        let generation = self.flows.slots[idx as usize].generation;
        let Some(f) = self.flows.slots[idx as usize].flow.as_mut() else {
            return;
        };
        if f.closing {
            return;
        }
        f.closing = true;
        let key = (f.listener, f.client);
        let li = f.listener as usize;
        let fd = f.socket.as_raw_fd();
        let inflight = f.inflight;
        if inflight > 0 {
            f.inflight += 1;
            self.io
                .cancel_fd(fd, Token::new(Op::UdpCancel, idx, generation));
        }
        self.flows.map.remove(&key);
        self.unlink(idx);
        let l = &mut self.listeners[li];
        l.stats
            .worker(self.id)
            .udp_flows
            .fetch_sub(1, Ordering::Relaxed);
        if inflight == 0 {
            self.free_flow(idx);
        }
    }

    fn free_flow(&mut self, idx: u32) {
        let slot = &mut self.flows.slots[idx as usize];
        if let Some(f) = slot.flow.take() {
            self.io.release_fd(f.socket.as_raw_fd());
            f.member.dec_active();
            if let Some(u) = self
                .listeners
                .get_mut(f.listener as usize)
                .and_then(|l| l.udp.as_mut())
            {
                u.flows = u.flows.saturating_sub(1);
            }
        } // drops the socket: nothing in flight names it any more
        slot.generation = slot.generation.wrapping_add(1);
        self.flows.free.push(idx);
    }

    /// Expires idle flows, oldest first, walking each UDP listener's LRU list from its tail.
    pub(super) fn expire_flows(&mut self) {
        for li in 0..self.listeners.len() {
            let l = &mut self.listeners[li];
            let Some(u) = l.udp.as_ref() else {
                continue;
            };
            let idle = l.reader.load().settings.idle_timeout.as_millis() as u64;
            let mut cur = u.tail;
            while cur != NIL {
                let f = self.flows.slots[cur as usize]
                    .flow
                    .as_ref()
                    .expect("linked flow");
                if self.now_ms.saturating_sub(f.last_active_ms) < idle {
                    break;
                }
                let prev = f.prev;
                self.close_flow(cur);
                cur = prev;
            }
        }
    }

    /// Closes every flow of a listener (listener removed, or hard stop).
    pub(super) fn close_all_flows(&mut self, li: Option<usize>) {
        for idx in 0..self.flows.slots.len() as u32 {
            let matches = self.flows.slots[idx as usize]
                .flow
                .as_ref()
                .is_some_and(|f| !f.closing && li.is_none_or(|l| f.listener as usize == l));
            if matches {
                self.close_flow(idx);
            }
        }
    }

    fn touch(&mut self, idx: u32, now: u64) {
        self.flows.last_activity_ms = now;
        if let Some(f) = self.flows.slots[idx as usize].flow.as_mut() {
            f.last_active_ms = now;
        }
        self.unlink(idx);
        self.link_front(idx);
    }

    fn link_front(&mut self, idx: u32) {
        let li = self.flows.slots[idx as usize]
            .flow
            .as_ref()
            .expect("flow")
            .listener as usize;
        let Some(u) = self.listeners[li].udp.as_mut() else {
            return;
        };
        let old_head = u.head;
        {
            let f = self.flows.slots[idx as usize].flow.as_mut().expect("flow");
            f.prev = NIL;
            f.next = old_head;
        }
        if old_head != NIL {
            if let Some(h) = self.flows.slots[old_head as usize].flow.as_mut() {
                h.prev = idx;
            }
        } else {
            u.tail = idx;
        }
        u.head = idx;
    }

    fn unlink(&mut self, idx: u32) {
        let Some(f) = self.flows.slots[idx as usize].flow.as_mut() else {
            return;
        };
        let (prev, next, li) = (f.prev, f.next, f.listener as usize);
        f.prev = NIL;
        f.next = NIL;
        let Some(u) = self.listeners[li].udp.as_mut() else {
            return;
        };
        if prev != NIL {
            if let Some(p) = self.flows.slots[prev as usize].flow.as_mut() {
                p.next = next;
            }
        } else if u.head == idx {
            u.head = next;
        }
        if next != NIL {
            if let Some(n) = self.flows.slots[next as usize].flow.as_mut() {
                n.prev = prev;
            }
        } else if u.tail == idx {
            u.tail = prev;
        }
    }
}
