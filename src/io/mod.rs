//! The I/O drivers behind the one small interface a worker uses ([`Driver`]): accept, connect
//! with a timeout, one-shot and multishot readiness polls, a periodic timer, cancel by fd, and
//! UDP receive into driver-owned slots and send from them. Every operation ends in one or more
//! [`Completion`]s carrying the caller's [`Token`], so the worker's state machines see the same
//! events whichever driver runs:
//!
//! - `uring/`: io_uring (the default): operations are SQEs, completions are CQEs.
//! - `epoll/`: epoll (where io_uring is blocked or too old): readiness is turned into the same
//!   completions, the operation (accept, connect result, recvmsg, send) done on readiness.
//!
//! The backend is chosen once at start, for every worker ([`choose`]), and said in one line.
//! The unsafe of the data plane lives here and in `sys.rs`.
//! Must not: know about connections, listeners or backends. It moves operations and completions.

pub mod epoll;
mod probe;
mod recv;
mod token;
pub mod uring;

pub use probe::{choose, Backend, Choice, Features, IoSetting};
pub use recv::{recv_slot_of, recv_token, RecvSetId};
pub use token::{Op, Token};

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

/// `IORING_CQE_F_MORE`: a multishot operation will post more completions.
pub const F_MORE: u32 = 1 << 1;

/// One completion.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub token: Token,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// The socket an accept completion installed, owned from here on. None for any other
    /// completion or a failed accept.
    pub fn accepted_fd(&self) -> Option<std::os::fd::OwnedFd> {
        if self.token.op() != Some(Op::Accept) || self.result < 0 {
            return None;
        }
        // SAFETY: a successful accept completion's result is an fd the kernel just installed in
        // our table for this completion alone; nothing else in the process refers to it yet, and
        // each completion is handled (and this called) once.
        Some(unsafe { std::os::fd::FromRawFd::from_raw_fd(self.result) })
    }

    /// True when a multishot operation will post more completions.
    pub fn more(&self) -> bool {
        self.flags & F_MORE != 0
    }

    /// The ring buffer a buffered receive filled ([`Driver::recv_buffered`]), now the caller's
    /// until it gives it back with [`Driver::recycle_buffer`].
    pub fn buffer(&self) -> Option<u16> {
        io_uring::cqueue::buffer_select(self.flags)
    }
}

/// Identifies a duration registered with [`Driver::timespec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimespecId(pub(crate) usize);

/// What a worker asks of its I/O driver. Ownership promise of both implementations: memory an
/// operation uses is the driver's (addresses, timespecs, receive slots) for the driver's life;
/// fds an operation names are kept open by the caller until every completion of that operation
/// has arrived, and announced with [`Driver::release_fd`] just before they are closed.
pub trait Driver {
    /// Registers a duration for timeouts and timers.
    fn timespec(&mut self, d: Duration) -> TimespecId;
    /// Accepts on a listening socket until cancelled or failed (one completion per socket,
    /// `more()` set while it goes on; a completion without `more()` ends it: re-arm). Accepted
    /// sockets are non-blocking and close-on-exec.
    fn accept_multi(&mut self, listen_fd: RawFd, token: Token);
    /// One completion when `fd` is ready for `events` (`POLLIN`, `POLLOUT`); errors and hang-ups
    /// also complete it. The result is the ready mask or -errno.
    fn poll(&mut self, fd: RawFd, events: u32, token: Token);
    /// Like `poll`, repeated until cancelled (`more()` while it goes on; re-arm when it ends).
    fn poll_multi(&mut self, fd: RawFd, events: u32, token: Token);
    /// Connects `fd` to `addr` within `timeout`. Two completions: `connect_token` (0, or -errno;
    /// -ECANCELED on timeout) and `timeout_token`. `slot` is the caller's connection index; no
    /// second connect for the same slot before both completions.
    fn connect(
        &mut self,
        fd: RawFd,
        slot: u32,
        addr: &SocketAddr,
        timeout: TimespecId,
        connect_token: Token,
        timeout_token: Token,
    );
    /// A repeating timer: one completion per period (`more()` while it repeats; re-arm when a
    /// completion comes without it).
    fn timer(&mut self, period: TimespecId, token: Token);
    /// The timer's last completion failed (a kernel that refuses a multishot timeout): arm the
    /// next one the older way.
    fn timer_failed(&mut self);
    /// Cancels every operation on `fd`; each ends with -ECANCELED, and `token` completes too.
    fn cancel_fd(&mut self, fd: RawFd, token: Token);
    /// Creates `count` receive slots of `size` bytes, owned by the driver for its lifetime.
    fn recv_slots(&mut self, count: usize, size: usize) -> RecvSetId;
    /// Receives one datagram on `fd` into slot `k` of `set` (ignored if the slot is busy).
    fn recvmsg(&mut self, fd: RawFd, set: RecvSetId, k: usize, token: Token);
    /// Sends the `len` bytes slot `k` received last on the connected socket `send_fd`, then
    /// receives the slot's next datagram on `recv_fd` (after the send has read the buffer). Two
    /// completions: `send_token` (bytes or -errno) and `recv_token` (-ECANCELED when the send
    /// failed). False, and nothing done, if the slot is busy.
    #[allow(clippy::too_many_arguments)]
    fn send_then_recvmsg(
        &mut self,
        send_fd: RawFd,
        send_token: Token,
        recv_fd: RawFd,
        set: RecvSetId,
        k: usize,
        len: usize,
        recv_token: Token,
    ) -> bool;
    /// The sender and local destination of the datagram slot `k` received; frees the slot.
    fn recv_done(&mut self, set: RecvSetId, k: usize) -> (Option<SocketAddr>, Option<IpAddr>);
    /// The first `len` bytes slot `k` received (until it is used again).
    fn recv_data(&self, set: RecvSetId, k: usize, len: usize) -> &[u8];
    /// Receives on the stream socket `fd` into a buffer the driver picks when data arrives, so
    /// nothing is held while it waits. One completion: bytes (0 = EOF) with the buffer in
    /// [`Completion::buffer`], or -errno (-ENOBUFS: every buffer is in use). False, and nothing
    /// done, where the driver has no buffer ring (epoll, or the feature is off).
    fn recv_buffered(&mut self, fd: RawFd, token: Token) -> bool;
    /// Sends bytes `[off, off + len)` of ring buffer `bid` on `fd`, waiting for room in the
    /// ring. One completion: bytes sent or -errno.
    fn send_buffer(&mut self, fd: RawFd, bid: u16, off: u32, len: u32, token: Token);
    /// Bytes `[off, off + len)` of ring buffer `bid`.
    fn buffer_data(&self, bid: u16, off: u32, len: u32) -> &[u8];
    /// Gives ring buffer `bid` back to the driver.
    fn recycle_buffer(&mut self, bid: u16);
    /// The size of every ring buffer (0 without a buffer ring).
    fn buffer_size(&self) -> u32;
    /// Receives datagrams on the connected UDP socket `fd` until cancelled or failed, each into
    /// a buffer the driver picks when it arrives (an idle socket holds none): one completion per
    /// datagram (bytes, with [`Completion::buffer`]), `more()` while it goes on; a completion
    /// without it ends it (-ENOBUFS: every buffer was in use; re-arm). False, and nothing
    /// done, where the driver cannot (epoll, or the feature is off): poll and `recvmmsg` then.
    fn recv_replies(&mut self, fd: RawFd, token: Token) -> bool;
    /// The first `len` bytes of reply buffer `bid`.
    fn reply_data(&self, bid: u16, len: u32) -> &[u8];
    /// Gives reply buffer `bid` back to the driver.
    fn recycle_reply(&mut self, bid: u16);
    /// Sets socket options `(level, name, value)` on `fd` in the ring, where the driver can
    /// (their completions, if any, carry [`Op::Detached`]; failures are ignored, as a
    /// best-effort `setsockopt` would be): true. Only right before an operation on `fd` the
    /// caller waits for (a connect): the ring starts entries in order, so the options are set
    /// before it, and `fd` stays open until then. False, and nothing done, where it cannot:
    /// the caller makes the syscalls.
    fn set_options(&mut self, fd: RawFd, opts: &[(i32, i32, i32)]) -> bool;
    /// Creates a non-blocking, close-on-exec stream socket of address family `domain` in the
    /// ring, where the driver can: true, and `token` completes with the new descriptor (owned
    /// by the completion's handler from then on) or -errno. False, and nothing done, where it
    /// cannot: the caller makes the syscall.
    fn socket(&mut self, domain: i32, token: Token) -> bool;
    /// Ends the multishot poll, or the one-shot POLLIN, `token` names on `fd` (its last
    /// completion says -ECANCELED);
    /// the cancel's own completion, if any, carries [`Op::Detached`].
    fn cancel_poll(&mut self, fd: RawFd, token: Token);
    /// Shuts down the write side of socket `fd` (a FIN after what is queued), in the ring where
    /// the driver can (its completion, if any, carries [`Op::Detached`]), else at once.
    fn shutdown_write(&mut self, fd: std::os::fd::BorrowedFd<'_>);
    /// Closes `fd`, which nothing in flight names any more (in the ring where the driver can,
    /// else at once). Forgets what the driver knows of it first.
    fn close(&mut self, fd: std::os::fd::OwnedFd);
    /// `fd` is about to be closed: forget what the driver knows of it.
    fn release_fd(&mut self, fd: RawFd);
    /// Starts what is queued and waits for at least `want` completions. `Ok(None)`: done;
    /// `Ok(Some(e))`: a transient failure (reap, back off, come back); `Err`: the driver is
    /// unusable.
    fn submit_and_wait(&mut self, want: usize) -> io::Result<Option<io::Error>>;
    /// Moves every available completion into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);
}

/// A worker's driver: one of the two, chosen at start.
// One per worker, made once and never moved: the size difference costs nothing, a box would
// cost an indirection per operation.
#[allow(clippy::large_enum_variant)]
pub enum Io {
    Uring(uring::Ring),
    Epoll(epoll::Epoll),
}

impl Io {
    /// The driver `choice` names, sized for `entries` operations in flight.
    pub fn new(choice: &Choice, entries: u32) -> io::Result<Io> {
        Ok(match choice.backend {
            Backend::IoUring => Io::Uring(uring::Ring::with_features(entries, choice.features)?),
            Backend::Epoll => Io::Epoll(epoll::Epoll::new()?),
        })
    }
}

macro_rules! each {
    ($self:ident, $d:ident => $e:expr) => {
        match $self {
            Io::Uring($d) => $e,
            Io::Epoll($d) => $e,
        }
    };
}

impl Driver for Io {
    fn timespec(&mut self, d: Duration) -> TimespecId {
        each!(self, x => x.timespec(d))
    }
    fn accept_multi(&mut self, listen_fd: RawFd, token: Token) {
        each!(self, x => x.accept_multi(listen_fd, token))
    }
    fn poll(&mut self, fd: RawFd, events: u32, token: Token) {
        each!(self, x => x.poll(fd, events, token))
    }
    fn poll_multi(&mut self, fd: RawFd, events: u32, token: Token) {
        each!(self, x => x.poll_multi(fd, events, token))
    }
    fn connect(
        &mut self,
        fd: RawFd,
        slot: u32,
        addr: &SocketAddr,
        timeout: TimespecId,
        connect_token: Token,
        timeout_token: Token,
    ) {
        each!(self, x => x.connect(fd, slot, addr, timeout, connect_token, timeout_token))
    }
    fn timer(&mut self, period: TimespecId, token: Token) {
        each!(self, x => x.timer(period, token))
    }
    fn timer_failed(&mut self) {
        each!(self, x => x.timer_failed())
    }
    fn cancel_fd(&mut self, fd: RawFd, token: Token) {
        each!(self, x => x.cancel_fd(fd, token))
    }
    fn recv_slots(&mut self, count: usize, size: usize) -> RecvSetId {
        each!(self, x => x.recv_slots(count, size))
    }
    fn recvmsg(&mut self, fd: RawFd, set: RecvSetId, k: usize, token: Token) {
        each!(self, x => x.recvmsg(fd, set, k, token))
    }
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
        each!(self, x => x.send_then_recvmsg(send_fd, send_token, recv_fd, set, k, len, recv_token))
    }
    fn recv_done(&mut self, set: RecvSetId, k: usize) -> (Option<SocketAddr>, Option<IpAddr>) {
        each!(self, x => x.recv_done(set, k))
    }
    fn recv_data(&self, set: RecvSetId, k: usize, len: usize) -> &[u8] {
        each!(self, x => x.recv_data(set, k, len))
    }
    fn recv_buffered(&mut self, fd: RawFd, token: Token) -> bool {
        each!(self, x => x.recv_buffered(fd, token))
    }
    fn send_buffer(&mut self, fd: RawFd, bid: u16, off: u32, len: u32, token: Token) {
        each!(self, x => x.send_buffer(fd, bid, off, len, token))
    }
    fn buffer_data(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        each!(self, x => x.buffer_data(bid, off, len))
    }
    fn recycle_buffer(&mut self, bid: u16) {
        each!(self, x => x.recycle_buffer(bid))
    }
    fn buffer_size(&self) -> u32 {
        each!(self, x => x.buffer_size())
    }
    fn recv_replies(&mut self, fd: RawFd, token: Token) -> bool {
        each!(self, x => x.recv_replies(fd, token))
    }
    fn reply_data(&self, bid: u16, len: u32) -> &[u8] {
        each!(self, x => x.reply_data(bid, len))
    }
    fn recycle_reply(&mut self, bid: u16) {
        each!(self, x => x.recycle_reply(bid))
    }
    fn set_options(&mut self, fd: RawFd, opts: &[(i32, i32, i32)]) -> bool {
        each!(self, x => x.set_options(fd, opts))
    }
    fn socket(&mut self, domain: i32, token: Token) -> bool {
        each!(self, x => x.socket(domain, token))
    }
    fn cancel_poll(&mut self, fd: RawFd, token: Token) {
        each!(self, x => x.cancel_poll(fd, token))
    }
    fn shutdown_write(&mut self, fd: std::os::fd::BorrowedFd<'_>) {
        each!(self, x => x.shutdown_write(fd))
    }
    fn close(&mut self, fd: std::os::fd::OwnedFd) {
        each!(self, x => x.close(fd))
    }
    fn release_fd(&mut self, fd: RawFd) {
        each!(self, x => x.release_fd(fd))
    }
    fn submit_and_wait(&mut self, want: usize) -> io::Result<Option<io::Error>> {
        each!(self, x => x.submit_and_wait(want))
    }
    fn reap(&mut self, out: &mut Vec<Completion>) {
        each!(self, x => x.reap(out))
    }
}
