//! TLS passthrough routing on the worker: the stage between admission and connect in which a
//! connection of a listener with routes has its ClientHello read, and a pool chosen from it.
//!
//! The hello is never consumed: each readiness of the client is answered by a `MSG_PEEK` of
//! everything queued (up to `max_bytes`), fed to `tls::HelloReader`, so the whole ClientHello
//! later reaches the backend byte-exact through the usual splice/copy path. Between peeks the
//! client's `SO_RCVLOWAT` is set to the stream length the reader needs before its answer can
//! change, so a hello arriving one byte per segment wakes the worker once, not once per byte
//! (and a level-triggered poll on bytes already peeked cannot spin). A poll that fires with a
//! hang-up and still too few bytes is a client that closed its side mid-hello.
//!
//! The deadline (`tls_inspect.timeout`) cancels the poll; its cancelled completion routes the
//! connection as "timeout". Exactly one poll is in flight during the stage, so the routing
//! decision is only ever taken in a completion. Must not: allocate per completion (the reader
//! lives in a box allocated once per inspected connection; the peek buffer is the worker's),
//! block, or log above debug.

use super::conn::CloseReason;
use super::{Stage, Worker};
use crate::backend::bump;
use crate::io::{Driver, Op};
use crate::tls::{HelloReader, Inspect};
use log::debug;
use std::os::fd::{AsFd, AsRawFd};

/// A connection's ClientHello read in progress.
pub(super) struct HelloState {
    reader: HelloReader,
    /// The `SO_RCVLOWAT` set on the client (1: the kernel's default, never set).
    lowat: usize,
    /// The deadline passed and the poll was cancelled.
    timed_out: bool,
}

/// Index into `backend::TLS_INSPECT_RESULTS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Sni = 0,
    NoSni = 1,
    NotTls = 2,
    TooLarge = 3,
    Malformed = 4,
    Timeout = 5,
    Eof = 6,
}

impl Worker {
    /// Chooses the pool of an admitted connection (reading its ClientHello first when the
    /// listener routes by it), then queues or connects it.
    pub(super) fn route(&mut self, idx: u32) {
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        let li = conn.listener as usize;
        let snap = self.listeners[li].reader.load();
        let Some(inspect) = snap.inspect.as_ref() else {
            match snap.default_pool {
                Some(p) => {
                    conn.pool = p as u16;
                    self.proceed(idx);
                }
                None => self.no_route(idx),
            }
            return;
        };
        let (timeout, max_bytes) = (inspect.timeout, inspect.max_bytes);
        conn.stage = Stage::Hello;
        conn.deadline_ms = self.now_ms + timeout.as_millis() as u64;
        conn.hello = Some(Box::new(HelloState {
            reader: HelloReader::new(max_bytes),
            lowat: 1,
            timed_out: false,
        }));
        if self.hello_buf.len() < max_bytes {
            // Grows once to the largest max_bytes of the worker's listeners, then is reused.
            self.hello_buf.resize(max_bytes, 0);
        }
        self.arm_hello(idx);
    }

    fn arm_hello(&mut self, idx: u32) {
        let tok = self.token(Op::HelloIn, idx);
        let conn = self.slots[idx as usize].conn.as_mut().expect("live");
        conn.inflight += 1;
        let events = (libc::POLLIN | libc::POLLRDHUP) as u32;
        self.io.poll(conn.client.as_raw_fd(), events, tok);
    }

    /// The deadline of a connection in the hello stage passed: cancel its poll (whose
    /// completion then routes it).
    pub(super) fn hello_deadline(&mut self, idx: u32) {
        let tok = self.token(Op::HelloIn, idx);
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        let Some(h) = conn.hello.as_mut() else {
            return;
        };
        if std::mem::replace(&mut h.timed_out, true) {
            return;
        }
        conn.deadline_ms = u64::MAX;
        self.io.cancel_poll(conn.client.as_raw_fd(), tok);
    }

    /// The client is readable (or hung up, or the poll was cancelled) while its ClientHello
    /// is read.
    pub(super) fn on_hello(&mut self, idx: u32, res: i32) {
        let conn = self.slots[idx as usize].conn.as_mut().expect("live");
        let Some(h) = conn.hello.as_mut() else {
            return;
        };
        if h.timed_out {
            return self.decide(idx, Outcome::Timeout, None);
        }
        if res < 0 {
            return self.close_conn(idx, CloseReason::ClientReset);
        }
        let sock = socket2::SockRef::from(&conn.client);
        let max = self.hello_buf.len();
        let n = match sock.peek(crate::sys::as_uninit(&mut self.hello_buf[..max])) {
            Ok(0) => return self.close_conn(idx, CloseReason::ClientEof),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(_) => return self.close_conn(idx, CloseReason::ClientReset),
        };
        let verdict = h.reader.feed(&self.hello_buf[..n]);
        match verdict {
            Inspect::NeedMore { at_least } => {
                let hung_up = res & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) as i32 != 0;
                if hung_up {
                    return self.decide(idx, Outcome::Eof, None);
                }
                if at_least != h.lowat
                    && crate::sys::set_rcvlowat(conn.client.as_fd(), at_least).is_ok()
                {
                    h.lowat = at_least;
                }
                self.arm_hello(idx);
            }
            Inspect::Hello(hello) => {
                let outcome = if hello.sni.is_some() {
                    Outcome::Sni
                } else {
                    Outcome::NoSni
                };
                self.decide(idx, outcome, Some(&hello));
            }
            Inspect::NotTls => self.decide(idx, Outcome::NotTls, None),
            Inspect::TooLarge => self.decide(idx, Outcome::TooLarge, None),
            Inspect::Malformed(why) => {
                debug!("conn {idx}: malformed ClientHello: {why}");
                self.decide(idx, Outcome::Malformed, None);
            }
        }
    }

    /// Counts the outcome, picks the pool from the routes (the default for no hello) and goes
    /// on to queue or connect; closes when no route takes the connection.
    fn decide(&mut self, idx: u32, outcome: Outcome, hello: Option<&crate::tls::Hello>) {
        let conn = self.slots[idx as usize].conn.as_mut().expect("live");
        let li = conn.listener as usize;
        let l = &mut self.listeners[li];
        bump(&l.stats.worker(self.id).tls_inspect[outcome as usize], 1);
        let snap = l.reader.load();
        let pool = match snap.inspect.as_ref() {
            Some(i) => i.table.lookup(hello),
            // Reloaded meanwhile to a listener without conditions.
            None => snap.default_pool,
        };
        let state = conn.hello.take();
        if state.is_some_and(|h| h.lowat > 1) {
            // Back to the kernel default before the bytes are forwarded.
            let _ = crate::sys::set_rcvlowat(conn.client.as_fd(), 1);
        }
        debug!(
            "conn {idx}: ClientHello {outcome:?} (sni {:?}) -> pool {pool:?}",
            hello.and_then(|h| h.sni.as_deref())
        );
        match pool {
            Some(p) => {
                conn.pool = p as u16;
                conn.stage = Stage::Connecting;
                self.proceed(idx);
            }
            None => self.no_route(idx),
        }
    }

    fn no_route(&mut self, idx: u32) {
        let li = self.slots[idx as usize]
            .conn
            .as_ref()
            .map_or(0, |c| c.listener as usize);
        bump(&self.listeners[li].stats.worker(self.id).tls_no_route, 1);
        self.close_conn(idx, CloseReason::NoRoute);
    }

    /// Queues behind waiting clients, or connects.
    pub(super) fn proceed(&mut self, idx: u32) {
        let Some(conn) = self.slots[idx as usize].conn.as_ref() else {
            return;
        };
        let li = conn.listener as usize;
        if self.has_waiting(li) {
            // Others are already waiting for a slot: take a place behind them.
            self.enqueue(idx);
        } else {
            self.connect_next(idx);
        }
    }
}
