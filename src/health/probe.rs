//! The active prober: many health probes in flight at once on one thread, with non-blocking
//! sockets and one `poll(2)` per [`Prober::advance`].
//!
//! Runs on the CONTROL thread. It must never touch a worker's ring, and holds no state beyond
//! the probes in flight: what a result means (rise/fall, flips) is the scheduler's business
//! (`health/mod.rs`). Every probe's socket is closed when its outcome is reported; nothing
//! lingers between probes.
//!
//! A TCP probe is a connect, then optionally a write of `send`, then optionally a read of
//! `expect.len()` bytes that must equal `expect`. It closes with a FIN (not a reset; bytes
//! already received past `expect` are read first), so servers that log resets stay quiet; the
//! price is one TIME_WAIT entry per probe on this host (no fd).
//!
//! A UDP probe (for udp listeners) sends `send` as one datagram from a fresh connected UDP socket
//! and waits for one reply datagram, which must start with `expect`. The connected socket only
//! receives from the backend, and being fresh it cannot see a late reply to an earlier probe.
//! An ICMP port unreachable comes back as `ECONNREFUSED` on that socket ("port unreachable");
//! silence is "no reply within <timeout>". Both `send` and `expect` are needed: without a reply
//! UDP tells nothing (config validation requires them).

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{escape_bytes, format_duration};

/// What to probe and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub addr: SocketAddr,
    /// The whole probe (connect, send, reply) must finish within this.
    pub timeout: Duration,
    /// Written once connected (UDP: the datagram sent).
    pub send: Option<Vec<u8>>,
    /// The reply must start with these bytes (read after `send`, or right after connecting;
    /// UDP: the first reply datagram).
    pub expect: Option<Vec<u8>>,
    /// A UDP probe: needs both `send` and `expect` (without them it ends at once, down).
    pub udp: bool,
    /// An HTTP check (TCP; `send` and `expect` are ignored then): see `health/http.rs`.
    pub http: Option<crate::config::HttpCheck>,
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Up,
    /// Why, for logs and flips: `connect refused`, `timeout after 1s (connecting)`,
    /// `expected "+PONG", got "-ERR"`, `closed before reply`, `port unreachable` (UDP),
    /// `no reply within 1s` (UDP), ...
    Down(String),
}

impl Outcome {
    pub fn is_up(&self) -> bool {
        matches!(self, Outcome::Up)
    }
}

/// Many probes in flight, advanced together.
#[derive(Default)]
pub struct Prober {
    probes: HashMap<u64, Probe>,
    /// Finished inside `start` (socket or connect failed at once); reported by the next advance.
    finished: Vec<(u64, Outcome)>,
    /// Scratch: probe ids in the order of the poll array.
    order: Vec<u64>,
}

impl Prober {
    pub fn new() -> Prober {
        Prober::default()
    }

    /// Starts probing `spec` under the caller's key `id`. A second start for an id still in
    /// flight (or finished but not yet returned by [`Prober::advance`]) is ignored.
    pub fn start(&mut self, id: u64, spec: &ProbeSpec, now: Instant) {
        if self.probes.contains_key(&id) || self.finished.iter().any(|(f, _)| *f == id) {
            return;
        }
        if spec.udp && (spec.send.is_none() || spec.expect.is_none()) {
            let why = "a udp probe needs send and expect".to_string();
            self.finished.push((id, Outcome::Down(why)));
            return;
        }
        match open(spec.addr, spec.udp) {
            Ok(socket) => {
                self.probes.insert(
                    id,
                    Probe {
                        socket,
                        deadline: now + spec.timeout,
                        timeout: spec.timeout,
                        send: match &spec.http {
                            Some(h) => Some(super::http::request(h, spec.addr)),
                            None => spec.send.clone(),
                        },
                        expect: spec.expect.clone().filter(|_| spec.http.is_none()),
                        http: spec.http.clone(),
                        phase: if spec.udp {
                            Phase::UdpSending
                        } else {
                            Phase::Connecting
                        },
                        got: Vec::new(),
                    },
                );
            }
            Err(reason) => self.finished.push((id, Outcome::Down(reason))),
        }
    }

    /// Waits up to `max_wait` for progress, advances every probe, and appends the finished ones
    /// to `out` (in no particular order). Returns after one `poll(2)` wakeup (any socket made
    /// progress; it does not wait for a probe to finish), does not wait at all when a result is
    /// already in hand, and never waits past the earliest probe deadline. With nothing in flight it sleeps
    /// `max_wait`, so a control loop can use it as its wait (pass the time until the next probe
    /// is due). `now` should be `Instant::now()`; deadlines are checked against it and against
    /// the time after waiting.
    pub fn advance(&mut self, now: Instant, max_wait: Duration, out: &mut Vec<(u64, Outcome)>) {
        let reported = out.len();
        out.append(&mut self.finished);
        // Replies are read before deadlines are enforced: a reply that arrived in time counts
        // even when this thread comes back late.
        if self.probes.is_empty() {
            if out.len() == reported {
                std::thread::sleep(max_wait);
            }
            return;
        }
        let mut wait = max_wait;
        if out.len() > reported {
            wait = Duration::ZERO;
        }
        if let Some(first) = self.probes.values().map(|p| p.deadline).min() {
            wait = wait.min(first.saturating_duration_since(now));
        }
        let started = Instant::now();
        let ready = self.wait_ready(wait);
        for id in ready {
            let Some(probe) = self.probes.get_mut(&id) else {
                continue;
            };
            if let Some(outcome) = probe.step() {
                self.probes.remove(&id);
                out.push((id, outcome));
            }
        }
        self.expire(now + started.elapsed(), out);
    }

    /// Probes in flight, including finished ones not yet returned by [`Prober::advance`].
    pub fn in_flight(&self) -> usize {
        self.probes.len() + self.finished.len()
    }

    /// One `poll(2)` over every probe; returns the ids with any event (errors and hang-ups
    /// included: `step` finds out which).
    fn wait_ready(&mut self, wait: Duration) -> Vec<u64> {
        self.order.clear();
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(self.probes.len());
        for (id, probe) in &self.probes {
            self.order.push(*id);
            fds.push(PollFd::new(probe.socket.as_fd(), probe.interest()));
        }
        // Round up: a timeout rounded down to 0 ms would spin until the deadline. Waits longer
        // than u16::MAX ms (65 s) are cut short; the caller loops.
        let ms = wait.as_nanos().div_ceil(1_000_000);
        let timeout = PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX));
        match poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => Vec::new(),
            Ok(_) => fds
                .iter()
                .zip(&self.order)
                .filter(|(fd, _)| fd.revents().is_none_or(|r| !r.is_empty()))
                .map(|(_, id)| *id)
                .collect(),
            Err(e) => {
                // Not expected with valid fds; do not spin on it.
                log::warn!("health probes: poll failed: {e}");
                std::thread::sleep(wait);
                Vec::new()
            }
        }
    }

    /// Ends every probe whose deadline is at or before `now`.
    fn expire(&mut self, now: Instant, out: &mut Vec<(u64, Outcome)>) {
        self.probes.retain(|id, probe| {
            if probe.deadline > now {
                return true;
            }
            out.push((*id, Outcome::Down(probe.timeout_reason())));
            false
        });
    }
}

/// A non-blocking socket with its connect started (TCP) or done (UDP: that only sets the peer
/// address, and makes the kernel report the backend's ICMP errors on this socket). The error is
/// a reason for [`Outcome::Down`].
fn open(addr: SocketAddr, udp: bool) -> Result<Socket, String> {
    let (kind, protocol) = if udp {
        (Type::DGRAM, Protocol::UDP)
    } else {
        (Type::STREAM, Protocol::TCP)
    };
    let socket = Socket::new(
        Domain::for_address(addr),
        kind.nonblocking(),
        Some(protocol),
    )
    .map_err(|e| format!("cannot open a socket: {e}"))?;
    match socket.connect(&addr.into()) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(connect_reason(&e)),
    }
}

fn connect_reason(e: &io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "connect refused".to_string(),
        ErrorKind::TimedOut => "connect timed out".to_string(),
        ErrorKind::HostUnreachable => "host unreachable".to_string(),
        ErrorKind::NetworkUnreachable => "network unreachable".to_string(),
        _ => format!("connect failed: {e}"),
    }
}

/// A UDP send or receive error: ICMP errors from the backend's host arrive this way.
fn udp_reason(e: &io::Error, what: &str) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "port unreachable".to_string(),
        ErrorKind::HostUnreachable => "host unreachable".to_string(),
        ErrorKind::NetworkUnreachable => "network unreachable".to_string(),
        _ => format!("{what} failed: {e}"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Sending {
        written: usize,
    },
    Reading,
    /// UDP: the datagram is still to be sent.
    UdpSending,
    /// UDP: sent; waiting for the reply datagram.
    UdpWaiting,
}

struct Probe {
    socket: Socket,
    deadline: Instant,
    timeout: Duration,
    send: Option<Vec<u8>>,
    expect: Option<Vec<u8>>,
    phase: Phase,
    /// Reply bytes so far (at most `expect.len()`; UDP: the reply datagram's first bytes;
    /// HTTP: at most `http::MAX_REPLY`).
    got: Vec<u8>,
    http: Option<crate::config::HttpCheck>,
}

impl Probe {
    fn interest(&self) -> PollFlags {
        match self.phase {
            Phase::Connecting | Phase::Sending { .. } | Phase::UdpSending => PollFlags::POLLOUT,
            Phase::Reading | Phase::UdpWaiting => PollFlags::POLLIN,
        }
    }

    /// Makes every step possible without blocking; `Some` when the probe is over.
    fn step(&mut self) -> Option<Outcome> {
        loop {
            match self.phase {
                Phase::Connecting => {
                    match self.socket.take_error() {
                        Ok(Some(e)) | Err(e) => return Some(Outcome::Down(connect_reason(&e))),
                        Ok(None) => {}
                    }
                    if self.socket.peer_addr().is_err() {
                        return None; // still connecting
                    }
                    self.phase = match (&self.send, &self.expect) {
                        (Some(_), _) => Phase::Sending { written: 0 },
                        (None, Some(_)) => Phase::Reading,
                        (None, None) => return Some(Outcome::Up),
                    };
                }
                Phase::Sending { written } => {
                    let send = self.send.as_deref().unwrap_or_default();
                    if written >= send.len() {
                        if self.expect.is_none() && self.http.is_none() {
                            return Some(Outcome::Up);
                        }
                        self.phase = Phase::Reading;
                        continue;
                    }
                    match self
                        .socket
                        .send_with_flags(&send[written..], libc::MSG_NOSIGNAL)
                    {
                        Ok(n) => {
                            self.phase = Phase::Sending {
                                written: written + n,
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Some(Outcome::Down(format!("send failed: {e}"))),
                    }
                }
                Phase::Reading if self.http.is_some() => return self.read_http(),
                Phase::Reading => return self.read_reply(),
                Phase::UdpSending => {
                    let send = self.send.as_deref().unwrap_or_default();
                    match self.socket.send(send) {
                        // A datagram goes out whole or not at all.
                        Ok(_) => self.phase = Phase::UdpWaiting,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Some(Outcome::Down(udp_reason(&e, "send"))),
                    }
                }
                Phase::UdpWaiting => return self.receive_datagram(),
            }
        }
    }

    /// UDP: the first datagram decides. It is read into `expect.len()` bytes (the kernel drops
    /// the rest of a longer one), which is all a comparison of the start needs.
    fn receive_datagram(&mut self) -> Option<Outcome> {
        let expect = self.expect.as_deref().unwrap_or_default();
        self.got.resize(expect.len(), 0);
        loop {
            match (&self.socket).read(&mut self.got) {
                Ok(n) => {
                    self.got.truncate(n);
                    if self.got == expect {
                        return Some(Outcome::Up);
                    }
                    // Shorter than `expect` (an empty datagram included), or different.
                    return Some(Outcome::Down(mismatch(expect, &self.got)));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.got.clear();
                    return None;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Some(Outcome::Down(udp_reason(&e, "receive"))),
            }
        }
    }

    /// HTTP: reads what is there (bounded by `http::MAX_REPLY`) and asks `http::judge`.
    fn read_http(&mut self) -> Option<Outcome> {
        use super::http::{judge, Verdict, MAX_REPLY};
        let check = self.http.as_ref()?;
        loop {
            let have = self.got.len();
            self.got.resize(MAX_REPLY, 0);
            let read = (&self.socket).read(&mut self.got[have..]);
            self.got.truncate(have + *read.as_ref().unwrap_or(&0));
            let eof = match read {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset && have == 0 => {
                    return Some(Outcome::Down("reset before reply".to_string()))
                }
                Err(e) => return Some(Outcome::Down(format!("receive failed: {e}"))),
            };
            match judge(check, &self.got, eof) {
                Verdict::More if !eof => {}
                Verdict::More => return Some(Outcome::Down("closed before reply".to_string())),
                Verdict::Up => return Some(Outcome::Up),
                Verdict::Down(why) => return Some(Outcome::Down(why)),
            }
        }
    }

    fn read_reply(&mut self) -> Option<Outcome> {
        let expect = self.expect.as_deref().unwrap_or_default();
        loop {
            let have = self.got.len();
            if have >= expect.len() {
                return Some(Outcome::Up);
            }
            self.got.resize(expect.len(), 0);
            let read = (&self.socket).read(&mut self.got[have..]);
            self.got.truncate(have + *read.as_ref().unwrap_or(&0));
            match read {
                Ok(0) if have == 0 => {
                    return Some(Outcome::Down("closed before reply".to_string()))
                }
                Ok(0) => {
                    return Some(Outcome::Down(format!(
                        "{} and then closed",
                        mismatch(expect, &self.got)
                    )))
                }
                Ok(_) if !expect.starts_with(&self.got) => {
                    return Some(Outcome::Down(mismatch(expect, &self.got)))
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Some(Outcome::Down("reset before reply".to_string()))
                }
                Err(e) => return Some(Outcome::Down(format!("receive failed: {e}"))),
            }
        }
    }

    fn timeout_reason(&self) -> String {
        let during = match self.phase {
            Phase::Connecting => "connecting".to_string(),
            Phase::Sending { .. } => "sending".to_string(),
            Phase::Reading if self.got.is_empty() => "waiting for reply".to_string(),
            Phase::Reading => format!("waiting for reply, got \"{}\"", shown(&self.got)),
            Phase::UdpSending => "sending".to_string(),
            Phase::UdpWaiting => {
                return format!("no reply within {}", format_duration(self.timeout))
            }
        };
        format!("timeout after {} ({during})", format_duration(self.timeout))
    }
}

impl Drop for Probe {
    /// Reads what is already queued (the `\r\n` after `+PONG`, a banner after a connect), so
    /// that closing sends a FIN: closing with unread data makes the kernel send a reset, which
    /// servers log as an error. Bounded; never blocks (the socket is non-blocking).
    fn drop(&mut self) {
        if matches!(self.phase, Phase::UdpSending | Phase::UdpWaiting) {
            return; // closing a UDP socket sends nothing, whatever is queued
        }
        let mut scratch = [0u8; 1024];
        for _ in 0..64 {
            match (&self.socket).read(&mut scratch) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
}

/// `expected "+PONG", got "-ERR"`.
fn mismatch(expect: &[u8], got: &[u8]) -> String {
    format!(
        "expected \"{}\", got \"{}\"",
        escape_bytes(expect),
        shown(got)
    )
}

/// A reply for a message: escaped, without the trailing line end a reply cut at
/// `expect.len()` bytes often ends in.
fn shown(got: &[u8]) -> String {
    let trimmed = got.trim_ascii_end();
    escape_bytes(if trimmed.is_empty() { got } else { trimmed })
}
