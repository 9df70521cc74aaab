//! The per-worker epoll driver, for hosts where io_uring is blocked or too old: the same
//! [`Driver`] interface, the same completions. An operation waits for readiness on its fd and is
//! carried out when it comes — accept (up to a batch per readiness), the connect's result
//! (`SO_ERROR`), a UDP `recvmsg` into the slot, a send at once — then completes with the result
//! io_uring would have given (bytes, an fd, a poll mask, or -errno; -ECANCELED on cancel or
//! connect timeout).
//!
//! Readiness is level-triggered, registered lazily: an fd's interest grows with an epoll_ctl
//! when a waiter needs a new event, and shrinks only when an event fires that no waiter wants,
//! so a connection that re-arms the same poll after every message costs no epoll_ctl at all
//! (HAProxy's poller keeps the same economy). A fd's state is forgotten in
//! [`Driver::release_fd`], just before the worker closes it (the kernel drops a closed fd from
//! the epoll set by itself).
//!
//! Timers: the periodic tick and the connect timeouts wake `epoll_wait` through its timeout;
//! connect deadlines sit in a heap, with a sequence number so a finished connect's entry is
//! recognised and skipped.
//! Must not: block (every socket call is non-blocking, `epoll_wait` waits only when nothing is
//! ready), allocate per operation (tables grow, then are reused), or log.

use super::recv::{RecvSetId, RecvSets};
use super::{Completion, Driver, TimespecId, Token, F_MORE};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// Accepts per readiness event of one listening socket (fairness with other work).
const ACCEPT_BATCH: usize = 64;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 1024;

const IN: u32 = libc::EPOLLIN as u32;
const OUT: u32 = libc::EPOLLOUT as u32;
const ERR: u32 = (libc::EPOLLERR | libc::EPOLLHUP) as u32;

/// What waits on one fd. Tokens are raw (0 = nothing waits: no valid token is 0).
#[derive(Clone, Copy, Default)]
struct FdState {
    /// Events registered with the kernel (0: not in the epoll set).
    registered: u32,
    read: u64,
    write: u64,
    accept: u64,
    /// A multishot poll and its events.
    multi: u64,
    multi_events: u32,
    /// A connect in progress: its token, its timeout's token and its sequence number.
    connect: u64,
    connect_timeout: u64,
    connect_seq: u32,
    /// UDP receives wait on this fd (in `Epoll::recvs`).
    recv: bool,
}

impl FdState {
    fn wants(&self) -> u32 {
        let mut w = 0;
        if self.read != 0 || self.accept != 0 || self.recv {
            w |= IN;
        }
        if self.write != 0 || self.connect != 0 {
            w |= OUT;
        }
        if self.multi != 0 {
            w |= self.multi_events & (IN | OUT);
        }
        w
    }
}

/// A UDP receive waiting for its socket to be readable.
struct RecvWait {
    fd: RawFd,
    set: RecvSetId,
    slot: usize,
    token: Token,
    hdr: *mut libc::msghdr,
}

/// One epoll instance with the waiters of every fd a worker uses.
pub struct Epoll {
    epfd: OwnedFd,
    fds: Vec<FdState>,
    ready: VecDeque<Completion>,
    timespecs: Vec<Duration>,
    /// Periodic timers: token, period, next expiry.
    timers: Vec<(Token, Duration, Instant)>,
    /// Connect deadlines: (when, fd, sequence).
    deadlines: BinaryHeap<Reverse<(Instant, RawFd, u32)>>,
    /// At this many entries the heap drops those of finished connects (which otherwise stay
    /// until their timeout comes due: an hour's worth of short connections with a long
    /// `connect_timeout`). Doubles with what stays, so the work is amortised.
    compact_at: usize,
    next_seq: u32,
    recv: RecvSets,
    recvs: Vec<RecvWait>,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes a flag and returns a new fd or -1; nothing is shared.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            // SAFETY: epoll_create1 succeeded: `fd` is a new fd owned by nobody else.
            epfd: unsafe { OwnedFd::from_raw_fd(fd) },
            fds: Vec::new(),
            ready: VecDeque::with_capacity(1024),
            timespecs: Vec::new(),
            timers: Vec::new(),
            deadlines: BinaryHeap::new(),
            compact_at: COMPACT_MIN,
            next_seq: 0,
            recv: RecvSets::default(),
            recvs: Vec::new(),
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
        })
    }

    fn state(&mut self, fd: RawFd) -> &mut FdState {
        let i = fd as usize;
        if self.fds.len() <= i {
            self.fds.resize(i + 1, FdState::default());
        }
        &mut self.fds[i]
    }

    fn complete(&mut self, token: u64, result: i32, flags: u32) {
        self.ready.push_back(Completion {
            token: Token(token),
            result,
            flags,
        });
    }

    /// Registers whatever `fd`'s waiters need that the kernel does not know yet.
    fn arm(&mut self, fd: RawFd) {
        let st = self.state(fd);
        let want = st.wants();
        if want & !st.registered == 0 {
            return;
        }
        let events = st.registered | want;
        self.ctl(fd, events);
    }

    /// Sets `fd`'s registration to `events` (0: out of the set). The peer's half-close
    /// (`EPOLLRDHUP`) is asked for only with `EPOLLIN`: it is a level that never clears, so
    /// registered for a socket we only wait to write to, every `epoll_wait` would return it (a
    /// half-closed client that stops reading would spin the worker).
    fn ctl(&mut self, fd: RawFd, events: u32) {
        let was = self.state(fd).registered;
        let (op, ev) = match (was, events) {
            (0, 0) => return,
            (0, e) => (libc::EPOLL_CTL_ADD, e),
            (_, 0) => (libc::EPOLL_CTL_DEL, 0),
            (_, e) => (libc::EPOLL_CTL_MOD, e),
        };
        let mut e = libc::epoll_event {
            events: ev | rdhup_with(ev),
            u64: fd as u64,
        };
        // SAFETY: `e` is a valid epoll_event on the stack for the call; the kernel copies it.
        let mut rc = unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut e) };
        if rc < 0 {
            // Our record and the kernel's disagree (a fd closed and reused unannounced):
            // retry as the other operation.
            let errno = io::Error::last_os_error().raw_os_error();
            let retry = match (op, errno) {
                (libc::EPOLL_CTL_MOD, Some(libc::ENOENT)) => Some(libc::EPOLL_CTL_ADD),
                (libc::EPOLL_CTL_ADD, Some(libc::EEXIST)) => Some(libc::EPOLL_CTL_MOD),
                _ => None,
            };
            if let Some(op) = retry.filter(|_| ev != 0) {
                // SAFETY: as above.
                rc = unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut e) };
            }
        }
        self.state(fd).registered = if rc < 0 && op != libc::EPOLL_CTL_DEL {
            was
        } else {
            ev
        };
    }

    /// Handles one readiness event: completes every waiter it satisfies.
    fn on_event(&mut self, fd: RawFd, revents: u32) {
        let st = *self.state(fd);
        let failed = revents & ERR != 0;
        if st.accept != 0 && revents & (IN | ERR) != 0 {
            self.accept_batch(fd, st.accept);
        }
        if st.connect != 0 && revents & (OUT | ERR) != 0 {
            let err = so_error(fd);
            let s = self.state(fd);
            s.connect = 0;
            let timeout = std::mem::take(&mut s.connect_timeout);
            self.complete(st.connect, -err, 0);
            self.complete(timeout, -libc::ECANCELED, 0);
        }
        let mask = revents as i32 & 0xffff;
        if st.read != 0 && revents & (IN | ERR | libc::EPOLLRDHUP as u32) != 0 {
            self.state(fd).read = 0;
            self.complete(st.read, mask, 0);
        }
        if st.write != 0 && revents & (OUT | ERR) != 0 {
            self.state(fd).write = 0;
            self.complete(st.write, mask, 0);
        }
        if st.multi != 0 && revents & (st.multi_events | ERR) != 0 {
            self.complete(st.multi, mask, F_MORE);
        }
        if st.recv && revents & (IN | ERR) != 0 {
            self.receive(fd);
        }
        // Shrink the interest only when this event was for nobody (level-triggered: it would
        // fire again at once): a waiter just completed usually re-arms in the same batch, at no
        // cost. An error with no waiter at all takes the fd out of the set.
        let wanted_before = st.wants();
        let want = self.state(fd).wants();
        let unwanted = revents & !(wanted_before | ERR | rdhup_with(wanted_before)) != 0;
        if unwanted || (failed && wanted_before == 0) {
            self.ctl(fd, want);
        }
    }

    fn accept_batch(&mut self, fd: RawFd, token: u64) {
        for _ in 0..ACCEPT_BATCH {
            // SAFETY: accept4 on our listening fd with null address pointers (not wanted).
            let c = unsafe {
                libc::accept4(
                    fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if c >= 0 {
                self.complete(token, c, F_MORE);
                continue;
            }
            match io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
            {
                libc::EAGAIN => return,
                libc::EINTR | libc::ECONNABORTED | libc::EPROTO => continue,
                e => {
                    // As a failed multishot accept: it ends, and the worker re-arms later.
                    self.state(fd).accept = 0;
                    self.complete(token, -e, 0);
                    return;
                }
            }
        }
    }

    /// Runs the waiting receives of `fd`, oldest first, until the socket is empty.
    fn receive(&mut self, fd: RawFd) {
        let mut i = 0;
        while i < self.recvs.len() {
            if self.recvs[i].fd != fd {
                i += 1;
                continue;
            }
            let w = &self.recvs[i];
            // SAFETY: `hdr` points into a receive slot owned by `self.recv` (boxed, never moved
            // or freed while the driver lives), prepared for exactly this receive.
            let n = unsafe { libc::recvmsg(fd, w.hdr, libc::MSG_DONTWAIT) };
            let res = if n >= 0 {
                n as i32
            } else {
                let e = io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                if e == libc::EAGAIN || e == libc::EINTR {
                    break;
                }
                -e
            };
            let w = self.recvs.remove(i);
            self.complete(w.token.0, res, 0);
        }
        let left = self.recvs.iter().any(|w| w.fd == fd);
        self.state(fd).recv = left;
    }

    /// Fires due timers and connect timeouts; returns the time until the next one.
    fn expire(&mut self, now: Instant) -> Option<Duration> {
        let mut next: Option<Instant> = None;
        for i in 0..self.timers.len() {
            let (tok, period, at) = self.timers[i];
            if at <= now {
                self.complete(tok.0, -libc::ETIME, F_MORE);
                let mut at = at + period;
                if at <= now {
                    at = now + period;
                }
                self.timers[i].2 = at;
            }
            let at = self.timers[i].2;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        while let Some(&Reverse((at, fd, seq))) = self.deadlines.peek() {
            if at > now {
                next = Some(next.map_or(at, |n| n.min(at)));
                break;
            }
            self.deadlines.pop();
            let st = self.state(fd);
            if st.connect != 0 && st.connect_seq == seq {
                let (c, t) = (st.connect, st.connect_timeout);
                st.connect = 0;
                st.connect_timeout = 0;
                self.complete(c, -libc::ECANCELED, 0);
                self.complete(t, -libc::ETIME, 0);
            }
        }
        next.map(|n| n.saturating_duration_since(now))
    }
}

/// The deadline heap is compacted from this size on.
const COMPACT_MIN: usize = 1024;

impl Epoll {
    /// Keeps only the deadlines of connects still in progress.
    fn compact_deadlines(&mut self) {
        let mut v = std::mem::take(&mut self.deadlines).into_vec();
        v.retain(|Reverse((_, fd, seq))| {
            self.fds
                .get(*fd as usize)
                .is_some_and(|st| st.connect != 0 && st.connect_seq == *seq)
        });
        v.shrink_to(v.len() * 2);
        self.compact_at = (v.len() * 2).max(COMPACT_MIN);
        self.deadlines = BinaryHeap::from(v);
    }
}

/// The pending error of a socket (0: connected).
fn so_error(fd: RawFd) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int and its length into locals that outlive the call.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        err
    }
}

impl Driver for Epoll {
    fn timespec(&mut self, d: Duration) -> TimespecId {
        self.timespecs.push(d);
        TimespecId(self.timespecs.len() - 1)
    }

    fn accept_multi(&mut self, listen_fd: RawFd, token: Token) {
        self.state(listen_fd).accept = token.0;
        self.arm(listen_fd);
    }

    fn poll(&mut self, fd: RawFd, events: u32, token: Token) {
        let st = self.state(fd);
        if events & IN != 0 {
            st.read = token.0;
        } else {
            st.write = token.0;
        }
        self.arm(fd);
    }

    fn poll_multi(&mut self, fd: RawFd, events: u32, token: Token) {
        let st = self.state(fd);
        st.multi = token.0;
        st.multi_events = events;
        self.arm(fd);
    }

    fn connect(
        &mut self,
        fd: RawFd,
        _slot: u32,
        addr: &SocketAddr,
        timeout: TimespecId,
        connect_token: Token,
        timeout_token: Token,
    ) {
        let sa = socket2::SockAddr::from(*addr);
        // SAFETY: `sa` is a valid socket address of `sa.len()` bytes for the whole call.
        let rc = unsafe { libc::connect(fd, sa.as_ptr().cast(), sa.len()) };
        let errno = if rc == 0 {
            0
        } else {
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        if errno != libc::EINPROGRESS {
            self.complete(connect_token.0, -errno, 0);
            self.complete(timeout_token.0, -libc::ECANCELED, 0);
            return;
        }
        self.next_seq = self.next_seq.wrapping_add(1);
        let seq = self.next_seq;
        let st = self.state(fd);
        st.connect = connect_token.0;
        st.connect_timeout = timeout_token.0;
        st.connect_seq = seq;
        let at = Instant::now() + self.timespecs[timeout.0];
        self.deadlines.push(Reverse((at, fd, seq)));
        if self.deadlines.len() >= self.compact_at {
            self.compact_deadlines();
        }
        self.arm(fd);
    }

    fn timer(&mut self, period: TimespecId, token: Token) {
        let p = self.timespecs[period.0];
        if let Some(t) = self.timers.iter_mut().find(|t| t.0 == token) {
            t.1 = p;
        } else {
            self.timers.push((token, p, Instant::now() + p));
        }
    }

    /// The epoll timer never fails.
    fn timer_failed(&mut self) {}

    fn cancel_fd(&mut self, fd: RawFd, token: Token) {
        let st = std::mem::take(self.state(fd));
        let registered = st.registered;
        let mut n = 0;
        for (tok, flags) in [(st.read, 0), (st.write, 0), (st.accept, 0), (st.multi, 0)] {
            if tok != 0 {
                self.complete(tok, -libc::ECANCELED, flags);
                n += 1;
            }
        }
        if st.connect != 0 {
            self.complete(st.connect, -libc::ECANCELED, 0);
            self.complete(st.connect_timeout, -libc::ECANCELED, 0);
            n += 1;
        }
        let mut i = 0;
        while i < self.recvs.len() {
            if self.recvs[i].fd == fd {
                let w = self.recvs.remove(i);
                self.complete(w.token.0, -libc::ECANCELED, 0);
                n += 1;
            } else {
                i += 1;
            }
        }
        // Nothing waits any more: out of the set (an event would only be unwanted).
        self.state(fd).registered = registered;
        self.ctl(fd, 0);
        self.complete(token.0, if n > 0 { n } else { -libc::ENOENT }, 0);
    }

    fn recv_slots(&mut self, count: usize, size: usize) -> RecvSetId {
        self.recv.create(count, size)
    }

    fn recvmsg(&mut self, fd: RawFd, set: RecvSetId, k: usize, token: Token) {
        let Some(hdr) = self.recv.prepare(set, k) else {
            return;
        };
        self.recvs.push(RecvWait {
            fd,
            set,
            slot: k,
            token,
            hdr,
        });
        self.state(fd).recv = true;
        self.arm(fd);
    }

    /// The send is made at once (non-blocking); the slot's next receive waits behind it.
    fn send_then_recvmsg(
        &mut self,
        send_fd: RawFd,
        send_token: Token,
        recv_fd: RawFd,
        set: RecvSetId,
        k: usize,
        len: usize,
        recv_token: Token,
    ) -> bool {
        if self.recvs.iter().any(|w| w.set == set && w.slot == k) {
            return false;
        }
        let (ptr, len) = self.recv.send_buf(set, k, len);
        // SAFETY: `ptr` points at `len` initialised bytes of a receive slot owned by `self.recv`,
        // valid for the whole call; send only reads them.
        let n = unsafe {
            libc::send(
                send_fd,
                ptr.cast(),
                len,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            self.complete(send_token.0, -e, 0);
            self.complete(recv_token.0, -libc::ECANCELED, 0);
            return true;
        }
        self.complete(send_token.0, n as i32, 0);
        self.recvmsg(recv_fd, set, k, recv_token);
        true
    }

    fn recv_done(&mut self, set: RecvSetId, k: usize) -> (Option<SocketAddr>, Option<IpAddr>) {
        self.recv.done(set, k)
    }

    fn recv_data(&self, set: RecvSetId, k: usize, len: usize) -> &[u8] {
        self.recv.data(set, k, len)
    }

    /// No buffer ring here: the worker polls and reads itself.
    fn recv_buffered(&mut self, _fd: RawFd, _token: Token) -> bool {
        false
    }

    fn send_buffer(&mut self, _fd: RawFd, _bid: u16, _off: u32, _len: u32, _token: Token) {}

    fn buffer_data(&self, _bid: u16, _off: u32, _len: u32) -> &[u8] {
        &[]
    }

    fn recycle_buffer(&mut self, _bid: u16) {}

    fn buffer_size(&self) -> u32 {
        0
    }

    /// No buffer ring here: the worker polls and takes replies with `recvmmsg`.
    fn recv_replies(&mut self, _fd: RawFd, _token: Token) -> bool {
        false
    }

    fn reply_data(&self, _bid: u16, _len: u32) -> &[u8] {
        &[]
    }

    fn recycle_reply(&mut self, _bid: u16) {}

    /// No ring: the caller makes the syscalls.
    fn socket(&mut self, _domain: i32, _token: Token) -> bool {
        false
    }

    /// No ring: the caller makes the syscalls.
    fn set_options(&mut self, _fd: RawFd, _opts: &[(i32, i32, i32)]) -> bool {
        false
    }

    fn cancel_poll(&mut self, fd: RawFd, token: Token) {
        let st = self.state(fd);
        if st.multi == token.0 {
            st.multi = 0;
            st.multi_events = 0;
            self.complete(token.0, -libc::ECANCELED, 0);
        } else if st.read == token.0 {
            // A one-shot POLLIN (a ClientHello read that timed out): it completes cancelled,
            // as io_uring's ASYNC_CANCEL makes it.
            st.read = 0;
            self.complete(token.0, -libc::ECANCELED, 0);
            self.arm(fd);
        }
    }

    fn shutdown_write(&mut self, fd: std::os::fd::BorrowedFd<'_>) {
        let _ = crate::sys::shutdown_write(fd);
    }

    fn close(&mut self, fd: std::os::fd::OwnedFd) {
        use std::os::fd::AsRawFd;
        self.release_fd(fd.as_raw_fd());
        drop(fd);
    }

    fn release_fd(&mut self, fd: RawFd) {
        if let Some(st) = self.fds.get_mut(fd as usize) {
            *st = FdState::default();
        }
        self.recvs.retain(|w| w.fd != fd);
    }

    fn submit_and_wait(&mut self, want: usize) -> io::Result<Option<io::Error>> {
        let now = Instant::now();
        let next = self.expire(now);
        let timeout_ms = if self.ready.len() >= want {
            0
        } else {
            match next {
                // Round up: waking a millisecond early would spin until the deadline.
                Some(d) => (d.as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32,
                None => -1,
            }
        };
        // SAFETY: `events` is a buffer of EVENTS epoll_events owned by self, valid for the call.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd.as_raw_fd(),
                self.events.as_mut_ptr(),
                EVENTS as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            };
        }
        for i in 0..n as usize {
            let ev = self.events[i];
            self.on_event(ev.u64 as RawFd, ev.events);
        }
        self.expire(Instant::now());
        Ok(None)
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.extend(self.ready.drain(..));
    }
}

#[cfg(test)]
mod tests;

/// `EPOLLRDHUP` if `events` waits for input, else nothing (see `Epoll::ctl`).
fn rdhup_with(events: u32) -> u32 {
    if events & IN != 0 {
        libc::EPOLLRDHUP as u32
    } else {
        0
    }
}
