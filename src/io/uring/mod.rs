//! The per-worker io_uring driver: a safe `Ring` over the `io-uring` crate, SQE builders for the
//! handful of operations ringlb uses, a submission backlog, and the fallbacks for kernels that
//! lack an optional feature (one-shot timeout, accept or poll re-armed by the worker, chosen by
//! the start-up probe: see `io/probe.rs`).
//!
//! Ownership promise (what every `// SAFETY:` below rests on): memory an SQE points to is owned by
//! the `Ring` itself (socket addresses in `AddrTable`, timespecs in `timespecs`, UDP receive
//! slots in `recv`, which are also the buffers UDP sends read from; ring buffers in `bufs`, the
//! kernel's while published, the worker's from the receive completion that names one until it
//! recycles it, which it does only after the send reading it has completed; UDP reply buffers
//! in `dgrams`, the kernel's while published, the worker's from the completion that names one
//! until it has copied the reply out and recycled it; setsockopt values in `opt_values`),
//! lives as long as the ring, and never moves; file descriptors named by an SQE belong to the
//! caller's connection entry, which the worker does not free or close until every operation it
//! submitted for that entry has completed (a setsockopt's fd: until the connect queued behind
//! it has). This module never logs and never allocates per operation (the backlog and tables
//! grow, then are reused).
//!
//! Must not: know about connections, listeners or backends. It moves SQEs and CQEs, nothing else.

mod bufring;

pub use bufring::BufRing;

use super::recv::RecvSets;
use super::{Completion, Driver, Features, RecvSetId, TimespecId, Token};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::RawFd;
use std::time::Duration;

/// Socket addresses for in-flight connects, one slot per connection index, in fixed chunks so
/// that a slot's address never moves while the table grows.
struct AddrTable {
    chunks: Vec<Box<[libc::sockaddr_storage; ADDR_CHUNK]>>,
}

const ADDR_CHUNK: usize = 256;

impl AddrTable {
    fn slot(&mut self, index: u32) -> &mut libc::sockaddr_storage {
        let (c, i) = (index as usize / ADDR_CHUNK, index as usize % ADDR_CHUNK);
        while self.chunks.len() <= c {
            // SAFETY: sockaddr_storage is plain old data for which all-zero bytes are valid.
            let zeroed: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            self.chunks.push(Box::new([zeroed; ADDR_CHUNK]));
        }
        &mut self.chunks[c][i]
    }
}

/// A debug knob for tests (`RINGLB_IO_FAULT="enter=EAGAIN/7"`): every 7th wait on the ring fails
/// with that errno instead of entering the kernel, as a transient io_uring_enter failure would.
#[derive(Clone, Copy, Debug)]
struct Fault {
    errno: i32,
    every: u32,
    count: u32,
}

impl Fault {
    fn from_env() -> Option<Fault> {
        let v = std::env::var("RINGLB_IO_FAULT").ok()?;
        let spec = v.strip_prefix("enter=")?;
        let (name, every) = spec.split_once('/')?;
        let errno = match name {
            "EAGAIN" => libc::EAGAIN,
            "ENOMEM" => libc::ENOMEM,
            "EBUSY" => libc::EBUSY,
            "EBADR" => libc::EBADR,
            "EINTR" => libc::EINTR,
            "EBADF" => libc::EBADF,
            "EINVAL" => libc::EINVAL,
            _ => return None,
        };
        Some(Fault {
            errno,
            every: every.parse().ok().filter(|&n| n > 0)?,
            count: 0,
        })
    }

    fn fire(&mut self) -> Option<io::Error> {
        self.count += 1;
        (self.count % self.every == 0).then(|| io::Error::from_raw_os_error(self.errno))
    }
}

/// One io_uring with a backlog for entries that did not fit in the submission queue.
pub struct Ring {
    ring: IoUring,
    fault: Option<Fault>,
    /// io_uring_enter calls made (submits and waits), for tests of the batching.
    enters: u64,
    /// Groups of SQEs (a single entry, or a linked pair that must enter the SQ together).
    backlog: VecDeque<(squeue::Entry, Option<squeue::Entry>)>,
    addrs: AddrTable,
    /// Boxed on purpose: SQEs point into these, so they must not move when the Vec grows.
    #[allow(clippy::vec_box)]
    timespecs: Vec<Box<types::Timespec>>,
    /// Receive slots (UDP listeners).
    recv: RecvSets,
    /// What this kernel supports (or the operator disabled) of the optional features.
    features: Features,
    /// Buffers for small-message receives and the sends that forward them (`ring_recv`).
    bufs: Option<BufRing>,
    /// Buffers for replies on UDP flow sockets (`ring_udp`), made when the first flow opens.
    dgrams: Option<BufRing>,
    /// Option values setsockopt SQEs point at (`ring_sockopt`): one box per distinct value,
    /// kept for the ring's life, so an SQE still waiting in the backlog reads a live value.
    #[allow(clippy::vec_box)]
    opt_values: Vec<Box<libc::c_int>>,
    /// Ring half-closes not yet completed, per descriptor number. The kernel always runs a
    /// SHUTDOWN on its worker threads and looks its descriptor up only there, after a CLOSE
    /// queued behind it has already run inline: the number could be a new socket's by then
    /// (seen: a new client got the FIN meant for the connection closed before it). So a close
    /// waits in `closes_after` until its descriptor's half-closes completed.
    shutdowns: Vec<u16>,
    closes_after: Vec<Option<std::os::fd::OwnedFd>>,
    /// Descriptors whose half-close completed in the last reap (reused, no allocation).
    shut_done: Vec<u32>,
}

/// Ring buffers per worker, and their size: a flow whose reads stay under 4 KiB goes through
/// them (a read that fills one moves the flow to the inline copy, and from there to splice if
/// it keeps filling). A flow holds at most one per direction while its send is in flight, so
/// 128 serve 64 busy connections; past that a flow waits by poll and reads by syscall. 128 ×
/// 4 KiB = 512 KiB per worker, touched only as messages use them.
const RING_BUFS: u16 = 128;
const RING_BUF_SIZE: u32 = 4096;

/// Ring buffers for UDP replies, and their size (a datagram larger than its buffer would be cut
/// short, so each holds the largest). A reply's buffer goes back as soon as its bytes are in
/// the outbox, so these only cover the replies that arrive between two reaps; when they run
/// out a flow's receive ends with -ENOBUFS, the replies wait in its socket and the worker
/// re-arms. Only the pages replies touch become resident: 64 B replies make 64 × 4 KiB.
const DGRAM_BUFS: u16 = 64;
const DGRAM_BUF_SIZE: u32 = 65536;
/// Buffer group of `dgrams` (`bufs` is group 0).
const DGRAM_BGID: u16 = 1;

impl Drop for Ring {
    fn drop(&mut self) {
        // A recvmsg still in flight may be written to by the kernel until its cancellation
        // completes, which closing the ring does asynchronously: leak such buffers rather than
        // free memory the kernel may still write.
        if self.recv.any_busy() {
            self.recv.leak();
        }
    }
}

impl Ring {
    /// Creates a ring with `entries` SQ entries and 4× as many CQ entries, single issuer and
    /// cooperative task running (falling back without them on kernels that refuse the flags),
    /// every optional feature used.
    pub fn new(entries: u32) -> io::Result<Ring> {
        Ring::with_features(entries, Features::ALL)
    }

    /// Like [`Ring::new`], using only the optional `features` given.
    pub fn with_features(entries: u32, features: Features) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_cqsize(entries * 4)
            .build(entries)
            .or_else(|e| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    IoUring::builder().setup_cqsize(entries * 4).build(entries)
                } else {
                    Err(e)
                }
            })?;
        let mut features = features;
        // RINGLB_RING_BUFS (a power of two): a debug knob for tests that exhaust the ring.
        let count = std::env::var("RINGLB_RING_BUFS")
            .ok()
            .and_then(|v| v.parse::<u16>().ok())
            .filter(|n| n.is_power_of_two() && *n <= 32768)
            .unwrap_or(RING_BUFS);
        let bufs = if features.ring_recv {
            BufRing::new(&ring.submitter(), count, RING_BUF_SIZE, 0).ok()
        } else {
            None
        };
        features.ring_recv = bufs.is_some();
        Ok(Ring {
            ring,
            bufs,
            dgrams: None,
            opt_values: Vec::new(),
            fault: Fault::from_env(),
            enters: 0,
            backlog: VecDeque::new(),
            shutdowns: Vec::new(),
            closes_after: Vec::new(),
            shut_done: Vec::new(),
            addrs: AddrTable { chunks: Vec::new() },
            timespecs: Vec::new(),
            recv: RecvSets::default(),
            features,
        })
    }

    /// Registers a duration for use by timeouts; the timespec lives as long as the ring.
    fn timespec_of(&mut self, d: Duration) -> TimespecId {
        let ts = types::Timespec::new()
            .sec(d.as_secs())
            .nsec(d.subsec_nanos());
        self.timespecs.push(Box::new(ts));
        TimespecId(self.timespecs.len() - 1)
    }

    fn ts_ptr(&self, id: TimespecId) -> *const types::Timespec {
        &*self.timespecs[id.0] as *const types::Timespec
    }

    fn push(&mut self, e: squeue::Entry) {
        self.push_group(e, None);
    }

    fn push_close(&mut self, raw: RawFd) {
        let e = opcode::Close::new(types::Fd(raw))
            .build()
            .user_data(Token::new(super::Op::Detached, 0, 0).0);
        self.push(e);
    }

    fn push_group(&mut self, first: squeue::Entry, second: Option<squeue::Entry>) {
        if !self.backlog.is_empty() {
            // Order is kept behind what already waits, and no syscall is made per push: the
            // backlog moves into the ring before the next wait.
            self.backlog.push_back((first, second));
            return;
        }
        if !self.try_push(&first, second.as_ref()) {
            // The queue just filled: hand it to the kernel once, then try again.
            let _ = self.enter(None);
            if !self.try_push(&first, second.as_ref()) {
                self.backlog.push_back((first, second));
            }
        }
    }

    /// One io_uring_enter: submit, and wait for `want` completions if given. The debug fault
    /// knob (tests) fails it instead.
    fn enter(&mut self, want: Option<usize>) -> io::Result<usize> {
        self.enters += 1;
        if let Some(e) = self.fault.as_mut().and_then(Fault::fire) {
            return Err(e);
        }
        match want {
            Some(n) => self.ring.submit_and_wait(n),
            None => self.ring.submit(),
        }
    }

    /// Moves backlogged entries into the submission queue, submitting (without waiting) while
    /// the queue fills, so nothing waits for a later wake-up. Bounded: a kernel that takes
    /// nothing (CQ overflow) leaves the rest for the next round.
    fn flush_backlog(&mut self) {
        for _ in 0..64 {
            while let Some((first, second)) = self.backlog.pop_front() {
                if !self.try_push(&first, second.as_ref()) {
                    self.backlog.push_front((first, second));
                    break;
                }
            }
            if self.backlog.is_empty() {
                return;
            }
            match self.enter(None) {
                Ok(n) if n > 0 => {}
                _ => return,
            }
        }
    }

    fn try_push(&mut self, first: &squeue::Entry, second: Option<&squeue::Entry>) -> bool {
        let mut sq = self.ring.submission();
        let need = 1 + usize::from(second.is_some());
        if sq.capacity() - sq.len() < need {
            return false;
        }
        // SAFETY: every entry built by this module points only at memory owned by the Ring
        // (AddrTable slots, boxed timespecs, boxed receive slots, whose buffer a linked
        // send reads before the slot's recvmsg may write it, ring buffers, which a send reads
        // while the worker holds them, not yet recycled) or at nothing; the fds it names are
        // kept open by the caller until the completion arrives (module docs).
        unsafe {
            let _ = sq.push(first);
            if let Some(s) = second {
                let _ = sq.push(s);
            }
        }
        true
    }

    /// The SQE of a `recvmsg` on `fd` into slot `k` of `set`, marking the slot busy; None if it
    /// already is.
    fn recvmsg_entry(
        &mut self,
        fd: RawFd,
        set: RecvSetId,
        k: usize,
        token: Token,
    ) -> Option<squeue::Entry> {
        let hdr = self.recv.prepare(set, k)?;
        Some(
            opcode::RecvMsg::new(types::Fd(fd), hdr)
                .build()
                .user_data(token.0),
        )
    }

    /// One-shot or multishot poll.
    fn poll_entry(fd: RawFd, events: u32, token: Token, multi: bool) -> squeue::Entry {
        opcode::PollAdd::new(types::Fd(fd), events)
            .multi(multi)
            .build()
            .user_data(token.0)
    }
}

impl Driver for Ring {
    fn timespec(&mut self, d: Duration) -> TimespecId {
        self.timespec_of(d)
    }

    /// Multishot accept, or a single accept where the kernel has no multishot accept (< 5.19):
    /// its completion then comes without `more()` and the worker re-arms.
    fn accept_multi(&mut self, listen_fd: RawFd, token: Token) {
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        let e = if self.features.multishot_accept {
            opcode::AcceptMulti::new(types::Fd(listen_fd))
                .flags(flags)
                .build()
        } else {
            opcode::Accept::new(
                types::Fd(listen_fd),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .flags(flags)
            .build()
        };
        self.push(e.user_data(token.0));
    }

    fn poll(&mut self, fd: RawFd, events: u32, token: Token) {
        self.push(Ring::poll_entry(fd, events, token, false));
    }

    /// Multishot poll, or one-shot where the kernel has none (< 5.13): the worker re-arms.
    fn poll_multi(&mut self, fd: RawFd, events: u32, token: Token) {
        let multi = self.features.multishot_poll;
        self.push(Ring::poll_entry(fd, events, token, multi));
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
        let sa = socket2::SockAddr::from(*addr);
        let len = sa.len();
        let storage = self.addrs.slot(slot);
        // SAFETY: both regions are `len` ≤ sizeof(sockaddr_storage) bytes long and do not
        // overlap (one is a local SockAddr, the other a slot in the ring's own table).
        unsafe {
            std::ptr::copy_nonoverlapping(
                sa.as_ptr().cast::<u8>(),
                (storage as *mut libc::sockaddr_storage).cast::<u8>(),
                len as usize,
            );
        }
        let addr_ptr = (storage as *const libc::sockaddr_storage).cast::<libc::sockaddr>();
        let c = opcode::Connect::new(types::Fd(fd), addr_ptr, len)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(connect_token.0);
        let t = opcode::LinkTimeout::new(self.ts_ptr(timeout))
            .build()
            .user_data(timeout_token.0);
        self.push_group(c, Some(t));
    }

    /// A multishot timeout, or a one-shot one where the kernel has none (< 6.4): its completion
    /// comes without `more()` and the worker re-arms.
    fn timer(&mut self, period: TimespecId, token: Token) {
        let mut t = opcode::Timeout::new(self.ts_ptr(period));
        if self.features.multishot_timeout {
            t = t.flags(types::TimeoutFlags::MULTISHOT);
        }
        self.push(t.build().user_data(token.0));
    }

    fn timer_failed(&mut self) {
        self.features.multishot_timeout = false;
    }

    fn cancel_fd(&mut self, fd: RawFd, token: Token) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(token.0);
        self.push(e);
    }

    fn recv_slots(&mut self, count: usize, size: usize) -> RecvSetId {
        self.recv.create(count, size)
    }

    fn recvmsg(&mut self, fd: RawFd, set: RecvSetId, k: usize, token: Token) {
        if let Some(e) = self.recvmsg_entry(fd, set, k, token) {
            self.push(e);
        }
    }

    /// The send goes out with the next submission, together with everything else queued (one
    /// `io_uring_enter` for a batch of datagrams), and the slot's next `recvmsg` is linked
    /// behind it, so the buffer is not written again before the send has read it.
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
        let (ptr, len) = self.recv.send_buf(set, k, len);
        let Some(recv) = self.recvmsg_entry(recv_fd, set, k, recv_token) else {
            return false;
        };
        let send = opcode::Send::new(types::Fd(send_fd), ptr, len as u32)
            // MSG_DONTWAIT: a full send buffer (a backend whose address does not resolve, say)
            // fails the send at once with -EAGAIN instead of parking it, and with it this
            // receive slot; the linked recvmsg is then cancelled and the caller re-arms it.
            .flags(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(send_token.0);
        self.push_group(send, Some(recv));
        true
    }

    fn recv_done(&mut self, set: RecvSetId, k: usize) -> (Option<SocketAddr>, Option<IpAddr>) {
        self.recv.done(set, k)
    }

    fn recv_data(&self, set: RecvSetId, k: usize, len: usize) -> &[u8] {
        self.recv.data(set, k, len)
    }

    fn recv_buffered(&mut self, fd: RawFd, token: Token) -> bool {
        let Some(b) = &self.bufs else {
            return false;
        };
        let e = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), b.size())
            .buf_group(b.bgid())
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(token.0);
        self.push(e);
        true
    }

    fn send_buffer(&mut self, fd: RawFd, bid: u16, off: u32, len: u32, token: Token) {
        let Some(b) = &self.bufs else {
            return;
        };
        let len = b.data(bid, off, len).len() as u32;
        let e = opcode::Send::new(types::Fd(fd), b.ptr(bid, off), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token.0);
        self.push(e);
    }

    fn buffer_data(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        self.bufs.as_ref().map_or(&[], |b| b.data(bid, off, len))
    }

    fn recycle_buffer(&mut self, bid: u16) {
        if let Some(b) = self.bufs.as_mut() {
            b.recycle(bid);
        }
    }

    fn buffer_size(&self) -> u32 {
        self.bufs.as_ref().map_or(0, BufRing::size)
    }

    fn recv_replies(&mut self, fd: RawFd, token: Token) -> bool {
        if !self.features.ring_udp {
            return false;
        }
        if self.dgrams.is_none() {
            // RINGLB_UDP_RING_BUFS (a power of two): a debug knob for tests that exhaust them.
            let count = std::env::var("RINGLB_UDP_RING_BUFS")
                .ok()
                .and_then(|v| v.parse::<u16>().ok())
                .filter(|n| n.is_power_of_two() && *n <= 32768)
                .unwrap_or(DGRAM_BUFS);
            let r = BufRing::new(&self.ring.submitter(), count, DGRAM_BUF_SIZE, DGRAM_BGID);
            match r {
                Ok(b) => self.dgrams = Some(b),
                Err(_) => {
                    self.features.ring_udp = false;
                    return false;
                }
            }
        }
        let e = opcode::RecvMulti::new(types::Fd(fd), DGRAM_BGID)
            .build()
            .user_data(token.0);
        self.push(e);
        true
    }

    fn reply_data(&self, bid: u16, len: u32) -> &[u8] {
        self.dgrams.as_ref().map_or(&[], |b| b.data(bid, 0, len))
    }

    fn set_options(&mut self, fd: RawFd, opts: &[(i32, i32, i32)]) -> bool {
        if !self.features.ring_sockopt {
            return false;
        }
        for &(level, name, value) in opts {
            let i = match self.opt_values.iter().position(|v| **v == value) {
                Some(i) => i,
                None => {
                    self.opt_values.push(Box::new(value));
                    self.opt_values.len() - 1
                }
            };
            let ptr = &*self.opt_values[i] as *const libc::c_int;
            let e = opcode::SetSockOpt::new(
                types::Fd(fd),
                level as u32,
                name as u32,
                ptr.cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
            .build()
            .user_data(Token::new(super::Op::Detached, 0, 0).0);
            self.push(e);
        }
        true
    }

    fn socket(&mut self, domain: i32, token: Token) -> bool {
        if !self.features.ring_socket {
            return false;
        }
        let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        self.push(
            opcode::Socket::new(domain, ty, 0)
                .build()
                .user_data(token.0),
        );
        true
    }

    fn recycle_reply(&mut self, bid: u16) {
        if let Some(b) = self.dgrams.as_mut() {
            b.recycle(bid);
        }
    }

    fn cancel_poll(&mut self, _fd: RawFd, token: Token) {
        let e = opcode::AsyncCancel::new(token.0)
            .build()
            .user_data(Token::new(super::Op::Detached, 0, 0).0);
        self.push(e);
    }

    fn shutdown_write(&mut self, fd: std::os::fd::BorrowedFd<'_>) {
        use std::os::fd::AsRawFd;
        if !self.features.ring_close {
            let _ = crate::sys::shutdown_write(fd);
            return;
        }
        let raw = fd.as_raw_fd();
        let i = raw as usize;
        if self.shutdowns.len() <= i {
            // Grows to the highest descriptor number once, not per connection.
            self.shutdowns.resize(i + 1, 0);
            self.closes_after.resize_with(i + 1, || None);
        }
        self.shutdowns[i] += 1;
        let e = opcode::Shutdown::new(types::Fd(raw), libc::SHUT_WR)
            .build()
            .user_data(Token::new(super::Op::Shutdown, raw as u32, 0).0);
        self.push(e);
    }

    /// The SQE goes behind everything already queued for the fd (a half-close included): the
    /// ring starts entries in order and neither of these waits.
    fn close(&mut self, fd: std::os::fd::OwnedFd) {
        use std::os::fd::IntoRawFd;
        if !self.features.ring_close {
            drop(fd);
            return;
        }
        let i = std::os::fd::AsRawFd::as_raw_fd(&fd) as usize;
        if self.shutdowns.get(i).is_some_and(|&n| n > 0) {
            // A half-close of this descriptor has not run yet: close once it has.
            self.closes_after[i] = Some(fd);
            return;
        }
        self.push_close(fd.into_raw_fd());
    }

    /// Nothing to forget: the kernel holds its own reference to a file until every operation
    /// that names it has completed.
    fn release_fd(&mut self, _fd: RawFd) {}

    /// Submits everything queued (the backlog included) and waits for at least `want`
    /// completions. Transient failures: EAGAIN, ENOMEM (the kernel is short of memory for
    /// requests), EBUSY (the completion queue overflows), EBADR (completions were lost to an
    /// overflow) and anything unexpected; programming errors (EBADF, EFAULT, EINVAL, ENXIO,
    /// EOPNOTSUPP: the ring itself is unusable) are errors.
    fn submit_and_wait(&mut self, want: usize) -> io::Result<Option<io::Error>> {
        self.flush_backlog();
        loop {
            return match self.enter(Some(want)) {
                Ok(_) => Ok(None),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            libc::EBADF
                                | libc::EFAULT
                                | libc::EINVAL
                                | libc::ENXIO
                                | libc::EOPNOTSUPP
                        )
                    ) =>
                {
                    Err(e)
                }
                Err(e) => Ok(Some(e)),
            };
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            let token = Token(cqe.user_data());
            if token.op() == Some(super::Op::Shutdown) {
                self.shut_done.push(token.index());
                continue;
            }
            out.push(Completion {
                token,
                result: cqe.result(),
                flags: cqe.flags(),
            });
        }
        for k in 0..self.shut_done.len() {
            let i = self.shut_done[k] as usize;
            let Some(n) = self.shutdowns.get_mut(i) else {
                continue;
            };
            *n = n.saturating_sub(1);
            if *n == 0 {
                if let Some(fd) = self.closes_after[i].take() {
                    self.push_close(std::os::fd::IntoRawFd::into_raw_fd(fd));
                }
            }
        }
        self.shut_done.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Op;
    use std::os::fd::AsRawFd;

    /// Real ring, real pipe: with the kernel refusing entries (the fault knob fails every
    /// enter), 100 polls pushed into an 8-entry ring enter once, when the queue first fills;
    /// the other 92 wait in the backlog with no syscall each. Once the kernel takes entries
    /// again, every one of them reaches it before the first wait, not after a later wake-up.
    #[test]
    fn a_backlog_costs_no_syscall_per_push_and_is_flushed_before_waiting() {
        let mut ring = Ring::new(8).expect("io_uring");
        ring.fault = Some(Fault {
            errno: libc::EAGAIN,
            every: 1,
            count: 0,
        });
        let pipe = crate::sys::Pipe::new(4096).expect("pipe");
        let fd = pipe.read.as_raw_fd();
        for i in 0..100 {
            ring.poll(fd, libc::POLLIN as u32, Token::new(Op::PollIn0, i, 0));
        }
        assert_eq!(ring.enters, 1, "pushes behind a backlog entered the kernel");
        assert_eq!(ring.backlog.len(), 92);
        ring.fault = None;
        // Make the polls fire, then wait: all 100 complete, none left behind.
        assert_eq!(crate::sys::write_nb(pipe.write.as_raw_fd(), b"x"), 1);
        // (The completion queue holds 32: the rest are reaped over a few rounds.)
        let mut got = Vec::new();
        for _ in 0..10 {
            let transient = ring.submit_and_wait(1).expect("enter");
            assert!(transient.is_none(), "{transient:?}");
            ring.reap(&mut got);
            if got.len() == 100 {
                break;
            }
        }
        assert_eq!(got.len(), 100, "completions after the first waits");
        assert!(ring.backlog.is_empty());
    }

    /// Real ring, real sockets: a half-close then a close of the same descriptor, and a new
    /// socket made at once (it takes the freed number). The kernel runs SHUTDOWN on a worker
    /// thread and looks its descriptor up there; had the CLOSE run first, the FIN would go to
    /// the new socket. Each round: the old peer reads EOF, the new socket still writes.
    #[test]
    fn a_half_close_then_close_never_reaches_the_socket_that_reuses_the_number() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let mut ring = Ring::new(64).expect("io_uring");
        if !ring.features.ring_close {
            return; // this kernel has no SHUTDOWN/CLOSE in the ring: nothing to race
        }
        let mut out = Vec::new();
        for round in 0..200 {
            let (a0, mut a1) = UnixStream::pair().expect("pair");
            let a0 = std::os::fd::OwnedFd::from(a0);
            let number = a0.as_raw_fd();
            ring.shutdown_write(std::os::fd::AsFd::as_fd(&a0));
            ring.close(a0);
            ring.submit_and_wait(0).expect("submit");
            let (mut b0, mut b1) = UnixStream::pair().expect("pair");
            let reused = b0.as_raw_fd() == number || b1.as_raw_fd() == number;
            // Let the half-close and the close complete.
            for _ in 0..100 {
                ring.reap(&mut out);
                if ring.shutdowns.get(number as usize).is_none_or(|&n| n == 0)
                    && ring.closes_after.iter().all(Option::is_none)
                {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let mut buf = [0u8; 4];
            a1.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            assert_eq!(
                a1.read(&mut buf).expect("old peer"),
                0,
                "round {round}: old socket got its FIN"
            );
            b0.write_all(b"ping").unwrap_or_else(|e| {
                panic!("round {round} (number reused: {reused}): new socket shut: {e}")
            });
            b1.write_all(b"pong").unwrap_or_else(|e| {
                panic!("round {round} (number reused: {reused}): new socket shut: {e}")
            });
            b1.read_exact(&mut buf).expect("new peer");
            assert_eq!(&buf, b"ping");
        }
    }
}
