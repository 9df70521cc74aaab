//! Admission of a TCP connection before it gets a backend: the listener-wide
//! `max_connections` hold, the client's PROXY header (`accept_proxy_protocol`), and the queue
//! of clients waiting while every eligible backend is at its `max_connections`.
//! Must not: block or allocate per connection (a PROXY header split across segments is the one
//! small allocation), or touch backend sockets (`tcp.rs` connects).

use super::conn::CloseReason;
use super::{Stage, Worker};
use crate::io::{Driver, Op};
use crate::proxy_protocol::{self, Parsed};
use log::debug;
use std::os::fd::AsRawFd;

impl Worker {
    /// Whether a (slot, generation) entry of a hold or queue list still names a connection
    /// waiting in `stage` (it may have closed, and its slot been reused, since it was listed).
    fn still_waiting(&self, idx: u32, generation: u32, stage: Stage) -> bool {
        let slot = &self.slots[idx as usize];
        slot.generation == generation
            && slot
                .conn
                .as_ref()
                .is_some_and(|c| !c.closing && c.stage == stage)
    }

    /// Lets held connections of listener `li` in, oldest first, while places are free.
    ///
    /// Iterative, never recursive: starting a held connection can close it at once (no backend),
    /// whose `finalize` would release the next one from inside this loop, one stack frame per
    /// held connection (thousands held with every backend down overflowed the worker's stack).
    /// A nested call returns at once; this loop goes on with the next.
    pub(super) fn release_held(&mut self, li: usize) {
        if self.listeners[li].releasing {
            return;
        }
        self.listeners[li].releasing = true;
        while let Some(&(idx, generation)) = self.listeners[li].held.front() {
            let waiting = self.still_waiting(idx, generation, Stage::Held);
            if !waiting {
                self.listeners[li].held.pop_front();
                continue;
            }
            let l = &mut self.listeners[li];
            let limit = u64::from(l.reader.load().settings.max_connections);
            if l.stats.opened() > limit {
                l.stats.closed();
                break;
            }
            l.held.pop_front();
            l.held_live = l.held_live.saturating_sub(1);
            let conn = self.slots[idx as usize].conn.as_mut().expect("checked");
            conn.counted = true;
            conn.stage = Stage::Connecting;
            self.start_conn(li, idx);
        }
        self.listeners[li].releasing = false;
    }

    /// Puts an accepted connection over `max_connections` on listener `li`'s hold list, with
    /// `queue_timeout` as its deadline; closes it (counted as `over_limit`) when the list is
    /// full: held connections hold descriptors, and the kernel's own accept queue is where the
    /// rest belong.
    pub(super) fn hold(&mut self, li: usize, idx: u32) {
        let generation = self.slots[idx as usize].generation;
        let qt = self.listeners[li].reader.load().settings.queue_timeout;
        let deadline = self.now_ms + qt.as_millis() as u64;
        if self.listeners[li].held_live as usize >= self.held_max {
            self.close_conn(idx, CloseReason::OverLimit);
            return;
        }
        let conn = self.slots[idx as usize].conn.as_mut().expect("stored");
        conn.stage = Stage::Held;
        conn.deadline_ms = deadline;
        let l = &mut self.listeners[li];
        l.held_live += 1;
        l.held.push_back((idx, generation));
    }

    /// Starts serving an admitted connection: PROXY header, queue, or connect.
    pub(super) fn start_conn(&mut self, li: usize, idx: u32) {
        // A client that waited (held, or in the kernel backlog while accept was paused) may
        // have given up meanwhile: it gets no backend connection. One poll(2) on its socket,
        // only for connections that waited.
        let waited = self.slots[idx as usize].conn.as_ref().is_some_and(|c| {
            c.opened_ms < self.now_ms || self.now_ms < self.listeners[li].check_alive_until_ms
        });
        if waited && self.client_gone(idx) {
            self.close_conn(idx, CloseReason::ClientAborted);
            return;
        }
        let settings = &self.listeners[li].reader.load().settings;
        let accept_proxy = settings.accept_proxy;
        if let (Some(_), Some(nets)) = (accept_proxy, settings.proxy_trusted.as_deref()) {
            // Only a trusted upstream balancer may say where a connection comes from: anyone
            // else is closed before a byte of theirs is read.
            let peer = self.slots[idx as usize]
                .conn
                .as_ref()
                .and_then(|c| c.client_addr);
            if !peer.is_some_and(|p| proxy_protocol::trusted(nets, p.ip())) {
                debug!("conn {idx}: PROXY header from untrusted {peer:?} refused");
                self.close_conn(idx, CloseReason::UntrustedProxy);
                return;
            }
        }
        if let Some(t) = accept_proxy {
            let tok = self.token(Op::HeaderIn, idx);
            let conn = self.slots[idx as usize].conn.as_mut().expect("just stored");
            conn.stage = Stage::Header;
            conn.deadline_ms = self.now_ms + t.as_millis() as u64;
            conn.inflight += 1;
            self.io
                .poll(conn.client.as_raw_fd(), libc::POLLIN as u32, tok);
            return;
        }
        self.route(idx);
    }

    /// The client is readable while we wait for its PROXY header: peek, parse, consume.
    pub(super) fn on_header(&mut self, idx: u32, res: i32) {
        if res < 0 {
            self.close_conn(idx, CloseReason::ClientReset);
            return;
        }
        let conn = self.slots[idx as usize].conn.as_mut().expect("live");
        let sock = socket2::SockRef::from(&conn.client);
        let have = conn.header.as_ref().map_or(0, |h| h.len());
        let room = &mut self.scratch[..proxy_protocol::MAX_INBOUND - have];
        let n = match sock.peek(crate::sys::as_uninit(room)) {
            Ok(0) => {
                self.close_conn(idx, CloseReason::ClientEof);
                return;
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                self.close_conn(idx, CloseReason::ClientReset);
                return;
            }
        };
        let parsed = match conn.header.as_mut() {
            None => proxy_protocol::parse(&self.scratch[..n]),
            Some(h) => {
                let before = h.len();
                h.extend_from_slice(&self.scratch[..n]);
                let r = proxy_protocol::parse(h);
                h.truncate(before);
                r
            }
        };
        match parsed {
            Err(bad) => {
                debug!(
                    "conn {idx}: bad PROXY header from {:?}: {}",
                    conn.client_addr, bad.0
                );
                self.close_conn(idx, CloseReason::BadProxyHeader);
            }
            Ok(Parsed::Incomplete) => {
                if have + n >= proxy_protocol::MAX_INBOUND {
                    self.close_conn(idx, CloseReason::BadProxyHeader);
                    return;
                }
                // Every byte so far belongs to the header: consume them, so the next poll
                // waits for new bytes instead of firing again at once.
                let mut drained = 0;
                while drained < n {
                    match sock.recv(crate::sys::as_uninit(&mut self.scratch[drained..n])) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => drained += k,
                    }
                }
                conn.header
                    .get_or_insert_with(|| Vec::with_capacity(64))
                    .extend_from_slice(&self.scratch[..drained]);
                let tok = self.token(Op::HeaderIn, idx);
                let conn = self.slots[idx as usize].conn.as_mut().expect("live");
                conn.inflight += 1;
                self.io
                    .poll(conn.client.as_raw_fd(), libc::POLLIN as u32, tok);
            }
            Ok(Parsed::Header {
                len, source, dest, ..
            }) => {
                // Consume what is left of the header in the socket; the rest is client data.
                let mut left = len - have;
                while left > 0 {
                    match sock.recv(crate::sys::as_uninit(&mut self.scratch[..left])) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => left -= k,
                    }
                }
                if left > 0 {
                    self.close_conn(idx, CloseReason::ClientReset);
                    return;
                }
                conn.header = None;
                if source.is_some() {
                    conn.client_addr = source;
                    conn.client_dst = dest;
                }
                conn.stage = Stage::Connecting;
                self.route(idx);
            }
        }
    }

    /// Whether live connections wait in listener `li`'s queue (stale entries at its front, left
    /// by connections that closed while queued, are dropped here).
    pub(super) fn has_waiting(&mut self, li: usize) -> bool {
        while let Some(&(idx, generation)) = self.listeners[li].queue.front() {
            if self.still_waiting(idx, generation, Stage::Queued) {
                return true;
            }
            self.listeners[li].queue.pop_front();
        }
        false
    }

    /// Puts a connection at the back of its listener's queue (every backend full).
    pub(super) fn enqueue(&mut self, idx: u32) {
        let now = self.now_ms;
        let generation = self.slots[idx as usize].generation;
        let conn = self.slots[idx as usize].conn.as_mut().expect("live");
        let li = conn.listener as usize;
        if conn.stage != Stage::Queued {
            let qt = self.listeners[li].reader.load().settings.queue_timeout;
            conn.stage = Stage::Queued;
            conn.deadline_ms = now + qt.as_millis() as u64;
        }
        self.listeners[li].queue.push_back((idx, generation));
    }

    /// Gives every queued connection of listener `li`, oldest first, another try. Iterative
    /// like [`Worker::release_held`]: a nested call (a retry that closed at once) returns.
    pub(super) fn retry_queue(&mut self, li: usize) {
        if self.listeners[li].retrying {
            return;
        }
        self.listeners[li].retrying = true;
        let n = self.listeners[li].queue.len();
        for _ in 0..n {
            let Some((idx, generation)) = self.listeners[li].queue.pop_front() else {
                break;
            };
            let waiting = self.still_waiting(idx, generation, Stage::Queued);
            if waiting {
                self.connect_next(idx);
            }
        }
        self.listeners[li].retrying = false;
    }

    /// Closes the clients of listener `li` still waiting for a place or a backend (held or
    /// queued): the listener was removed, so nothing will serve them. Those already connecting
    /// or proxying drain as usual.
    pub(super) fn close_waiting(&mut self, li: usize) {
        let held = std::mem::take(&mut self.listeners[li].held);
        let queue = std::mem::take(&mut self.listeners[li].queue);
        for (idx, generation) in held {
            if self.still_waiting(idx, generation, Stage::Held) {
                self.close_conn(idx, CloseReason::Draining);
            }
        }
        for (idx, generation) in queue {
            if self.still_waiting(idx, generation, Stage::Queued) {
                self.close_conn(idx, CloseReason::Draining);
            }
        }
    }
}
