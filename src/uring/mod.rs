//! The per-worker io_uring driver: a safe `Ring` over the `io-uring` crate, SQE builders for the
//! handful of operations ringlb uses, a submission backlog, and `user_data` tokens.
//!
//! Ownership promise (what every `// SAFETY:` below rests on): memory an SQE points to is owned by
//! the `Ring` itself (socket addresses in `AddrTable`, timespecs in `timespecs`, UDP receive
//! slots in `recv_sets`, which are also the buffers UDP sends read from), lives as long as
//! the ring, and never moves; file descriptors named by an SQE belong to the caller's connection
//! entry, which the worker does not free or close until every operation it submitted for that
//! entry has completed. This module never logs and never allocates per operation (the backlog
//! and tables grow, then are reused).
//!
//! Must not: know about connections, listeners or backends. It moves SQEs and CQEs, nothing else.

mod token;

pub use token::{Op, Token};

use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

/// One completion, copied out of the CQ so the ring can be borrowed again while handling it.
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
        io_uring::cqueue::more(self.flags)
    }
}

/// Identifies a timespec registered with [`Ring::timespec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimespecId(usize);

/// Why io_uring cannot be used here, phrased for the one line the binary prints.
pub fn unavailable_reason(err: &io::Error) -> String {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    match err.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring is not available: this kernel has no io_uring support (ENOSYS); ringlb needs Linux ≥ 6.0 with io_uring".into(),
        Some(libc::EPERM) if disabled == "2" => "io_uring is disabled on this host (kernel.io_uring_disabled = 2); set it to 0 to run ringlb".into(),
        Some(libc::EPERM) if disabled == "1" => "io_uring is restricted on this host (kernel.io_uring_disabled = 1, only the io_uring_group may use it); run ringlb in that group or set it to 0".into(),
        Some(libc::EPERM) => "io_uring is blocked (EPERM): probably a container seccomp profile (Docker's and containerd's default block io_uring); run with a profile that allows io_uring_setup/io_uring_enter/io_uring_register".into(),
        _ => format!("io_uring setup failed: {err}"),
    }
}

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

/// Buffers for one in-flight `recvmsg`: the header, its iovec and name point into the same boxed
/// struct, so they never move while the operation runs.
struct RecvMem {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_storage,
    /// Control messages (the PKTINFO destination address).
    control: [u64; 8],
    buf: Box<[u8]>,
    /// A recvmsg naming this memory is in flight.
    busy: bool,
}

/// Identifies a set of receive buffers created by [`Ring::recv_slots`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvSetId(usize);

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
    /// Receive buffer sets (UDP listeners), boxed per slot for stable addresses.
    #[allow(clippy::vec_box)]
    recv_sets: Vec<Vec<Box<RecvMem>>>,
}

impl Drop for Ring {
    fn drop(&mut self) {
        // A recvmsg still in flight may be written to by the kernel until its cancellation
        // completes, which closing the ring does asynchronously: leak such buffers rather than
        // free memory the kernel may still write.
        if self.recv_sets.iter().flatten().any(|m| m.busy) {
            std::mem::forget(std::mem::take(&mut self.recv_sets));
        }
    }
}

impl Ring {
    /// Creates a ring with `entries` SQ entries and 4× as many CQ entries, single issuer and
    /// cooperative task running (falling back without them on kernels that refuse the flags).
    pub fn new(entries: u32) -> io::Result<Ring> {
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
        Ok(Ring {
            ring,
            fault: Fault::from_env(),
            enters: 0,
            backlog: VecDeque::new(),
            addrs: AddrTable { chunks: Vec::new() },
            timespecs: Vec::new(),
            recv_sets: Vec::new(),
        })
    }

    /// Checks once, at start, that io_uring can be set up at all.
    pub fn probe() -> io::Result<()> {
        IoUring::new(8).map(|_| ())
    }

    /// Registers a duration for use by timeouts; the timespec lives as long as the ring.
    pub fn timespec(&mut self, d: Duration) -> TimespecId {
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
        // send reads before the slot's recvmsg may write it) or at nothing; the fds it names are
        // kept open by the caller until the completion arrives (module docs).
        unsafe {
            let _ = sq.push(first);
            if let Some(s) = second {
                let _ = sq.push(s);
            }
        }
        true
    }

    /// Multishot accept on a listening socket; accepted sockets are non-blocking and cloexec.
    pub fn accept_multi(&mut self, listen_fd: RawFd, token: Token) {
        let e = opcode::AcceptMulti::new(types::Fd(listen_fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(token.0);
        self.push(e);
    }

    /// One-shot poll for `events` (`libc::POLLIN`, `POLLOUT`, ...).
    pub fn poll(&mut self, fd: RawFd, events: u32, token: Token) {
        let e = opcode::PollAdd::new(types::Fd(fd), events)
            .build()
            .user_data(token.0);
        self.push(e);
    }

    /// Multishot poll (used for a worker's wake-up eventfd).
    pub fn poll_multi(&mut self, fd: RawFd, events: u32, token: Token) {
        let e = opcode::PollAdd::new(types::Fd(fd), events)
            .multi(true)
            .build()
            .user_data(token.0);
        self.push(e);
    }

    /// Connect `fd` to `addr`, linked to a timeout. `slot` is the caller's connection index:
    /// the address is copied into the ring's table under that slot, and the caller promises not
    /// to issue another connect for the same slot before this one completes. Two completions
    /// follow: `connect_token` (0 or -errno, -ECANCELED on timeout) and `timeout_token`.
    pub fn connect(
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

    /// A repeating timer: one completion per period until cancelled.
    pub fn timer(&mut self, period: TimespecId, token: Token) {
        let e = opcode::Timeout::new(self.ts_ptr(period))
            .flags(types::TimeoutFlags::MULTISHOT)
            .build()
            .user_data(token.0);
        self.push(e);
    }

    /// Cancels every in-flight operation on `fd` (polls, connects, accepts).
    pub fn cancel_fd(&mut self, fd: RawFd, token: Token) {
        let e = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(token.0);
        self.push(e);
    }

    /// Creates `count` receive buffers of `size` bytes each, owned by the ring for its lifetime.
    pub fn recv_slots(&mut self, count: usize, size: usize) -> RecvSetId {
        let set = (0..count)
            .map(|_| {
                // SAFETY: msghdr, iovec and sockaddr_storage are plain C structs for which all-zero
                // bytes are a valid (empty) value; the pointers are filled in by `recvmsg`.
                let (hdr, iov, name) =
                    unsafe { (std::mem::zeroed(), std::mem::zeroed(), std::mem::zeroed()) };
                Box::new(RecvMem {
                    hdr,
                    iov,
                    name,
                    control: [0; 8],
                    buf: vec![0u8; size].into_boxed_slice(),
                    busy: false,
                })
            })
            .collect();
        self.recv_sets.push(set);
        RecvSetId(self.recv_sets.len() - 1)
    }

    /// Starts a `recvmsg` on `fd` into slot `k` of `set`. Ignored if that slot is busy.
    pub fn recvmsg(&mut self, fd: RawFd, set: RecvSetId, k: usize, token: Token) {
        if let Some(e) = self.recvmsg_entry(fd, set, k, token) {
            self.push(e);
        }
    }

    /// Sends the `len` bytes slot `k` of `set` received last (see [`Ring::recv_data`]) on the
    /// connected socket `send_fd`, and starts the slot's next `recvmsg` on `recv_fd` linked
    /// behind the send, so the buffer is not written again before the send has read it. Two
    /// completions: `send_token` (bytes sent or -errno) and `recv_token` (the recvmsg's; it is
    /// -ECANCELED when the send failed). The send goes out with the next submission, together
    /// with everything else queued: one `io_uring_enter` for a batch of datagrams. Returns
    /// false, and queues nothing, if the slot already has a recvmsg in flight (its buffer is
    /// not the caller's to send from).
    #[allow(clippy::too_many_arguments)]
    pub fn send_then_recvmsg(
        &mut self,
        send_fd: RawFd,
        send_token: Token,
        recv_fd: RawFd,
        set: RecvSetId,
        k: usize,
        len: usize,
        recv_token: Token,
    ) -> bool {
        let Some(recv) = self.recvmsg_entry(recv_fd, set, k, recv_token) else {
            return false;
        };
        let m = &self.recv_sets[set.0][k];
        let len = len.min(m.buf.len());
        let send = opcode::Send::new(types::Fd(send_fd), m.buf.as_ptr(), len as u32)
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

    /// The SQE of a `recvmsg` on `fd` into slot `k` of `set`, marking the slot busy; None if it
    /// already is.
    fn recvmsg_entry(
        &mut self,
        fd: RawFd,
        set: RecvSetId,
        k: usize,
        token: Token,
    ) -> Option<squeue::Entry> {
        let m = &mut self.recv_sets[set.0][k];
        if m.busy {
            return None;
        }
        m.busy = true;
        m.iov.iov_base = m.buf.as_mut_ptr().cast();
        m.iov.iov_len = m.buf.len();
        m.hdr.msg_name = (&mut m.name as *mut libc::sockaddr_storage).cast();
        m.hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        m.hdr.msg_iov = &mut m.iov;
        m.hdr.msg_iovlen = 1;
        m.hdr.msg_control = m.control.as_mut_ptr().cast();
        m.hdr.msg_controllen = std::mem::size_of_val(&m.control) as _;
        m.hdr.msg_flags = 0;
        let hdr: *mut libc::msghdr = &mut m.hdr;
        Some(
            opcode::RecvMsg::new(types::Fd(fd), hdr)
                .build()
                .user_data(token.0),
        )
    }

    /// The sender of the datagram a completed `recvmsg` left in slot `k`, and the local address
    /// it was sent to (when the socket reports PKTINFO). Marks the slot free for the next
    /// [`Ring::recvmsg`]; its bytes stay readable through [`Ring::recv_data`] until then. Call
    /// it once per recvmsg completion, with that completion's set and slot (the token of
    /// [`Ring::recv_token`] carries both).
    pub fn recv_done(
        &mut self,
        set: RecvSetId,
        k: usize,
    ) -> (Option<SocketAddr>, Option<std::net::IpAddr>) {
        let m = &mut self.recv_sets[set.0][k];
        debug_assert!(m.busy, "recv_done on a slot with no recvmsg in flight");
        m.busy = false;
        let local = crate::sys::pktinfo_dst(&m.control, m.hdr.msg_controllen);
        let namelen = m.hdr.msg_namelen;
        // SAFETY: `name` is a sockaddr_storage the kernel filled for this completed recvmsg (or
        // left zeroed), `namelen` ≤ its size; SockAddr copies it.
        let addr = unsafe {
            socket2::SockAddr::try_init(|storage, len| {
                std::ptr::copy_nonoverlapping(
                    (&m.name as *const libc::sockaddr_storage).cast::<u8>(),
                    storage.cast::<u8>(),
                    namelen as usize,
                );
                *len = namelen;
                Ok(())
            })
        }
        .ok()
        .and_then(|((), a)| a.as_socket());
        (addr, local)
    }

    /// The first `len` bytes slot `k` of `set` received (valid after [`Ring::recv_done`] and
    /// before the slot's next [`Ring::recvmsg`]).
    pub fn recv_data(&self, set: RecvSetId, k: usize, len: usize) -> &[u8] {
        let m = &self.recv_sets[set.0][k];
        &m.buf[..len.min(m.buf.len())]
    }

    /// The token of slot `k` of `set`'s recvmsg: the set and slot travel in the index, so a
    /// completion always finds the buffer it filled.
    pub fn recv_token(set: RecvSetId, k: usize) -> Token {
        Token::new(Op::UdpRecv, ((set.0 as u32) << 8) | k as u32, 0)
    }

    /// The (set, slot) a recvmsg token names.
    pub fn recv_slot_of(token: Token) -> (RecvSetId, usize) {
        (
            RecvSetId((token.index() >> 8) as usize),
            (token.index() & 0xff) as usize,
        )
    }

    /// Submits everything queued (the backlog included) and waits for at least `want`
    /// completions. `Ok(None)`: done. `Ok(Some(e))`: a transient failure (EAGAIN, ENOMEM:
    /// the kernel is short of memory for requests; EBUSY: the completion queue overflows;
    /// EBADR: completions were lost to an overflow; or anything unexpected) — the caller reaps
    /// what is there, backs off and comes back. `Err`: a programming error (EBADF, EFAULT,
    /// EINVAL, ENXIO: the ring itself is unusable).
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<Option<io::Error>> {
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

    /// Moves every available completion into `out` (which the caller reuses).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            out.push(Completion {
                token: Token(cqe.user_data()),
                result: cqe.result(),
                flags: cqe.flags(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}
