//! Raw syscalls the rest of the crate needs and the standard library does not offer: pipes with
//! a chosen capacity, eventfds, rlimits, `SO_LINGER 0`, `shutdown`, `getpeername` on a raw fd.
//!
//! This is one of the two modules allowed to use `unsafe` (the other is `uring`). Every function
//! here hands back owned types (`OwnedFd`, `Pipe`) so that no caller ever holds a raw fd it must
//! remember to close. Nothing here blocks, allocates per call or logs.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Capacity we ask pipes for. Measured on these machines: 1 MiB pipes halve CPU per byte against
/// the default 64 KiB (STYLE.md).
pub const PIPE_SIZE: usize = 1 << 20;

/// A pipe pair, both ends non-blocking and close-on-exec.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// The capacity the kernel granted (what `F_SETPIPE_SZ` returned, or the default).
    pub capacity: u32,
}

impl Pipe {
    /// Creates a pipe and tries to grow it to `size` bytes. Failing to grow (EPERM when the
    /// per-user pipe budget is spent) is not an error: the pipe keeps its default size.
    pub fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints that outlives the call; the
        // kernel writes two fresh fds into it on success and nothing on failure.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else; OwnedFd takes
        // sole ownership and closes them on drop.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on an fd we own, with an integer argument; no memory is shared.
        let granted =
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        let capacity = if granted > 0 {
            granted as u32
        } else {
            // SAFETY: as above, F_GETPIPE_SZ only reads the pipe's size.
            let cur = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if cur > 0 {
                cur as u32
            } else {
                65536
            }
        };
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Returns (old soft, new soft).
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit the kernel writes into; it lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit the kernel reads; it lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

/// An eventfd used to wake a worker's ring from another thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; on success it returns a fresh fd nobody else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd (wakes whoever polls it). Errors are ignored: EAGAIN means the
/// counter is saturated, which still leaves the fd readable.
pub fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: we pass a pointer to 8 bytes on our stack that live across the call.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd's counter so the next poll waits again.
pub fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut buf: u64 = 0;
    // SAFETY: we pass a pointer to 8 writable bytes on our stack that live across the call.
    let _ = unsafe { libc::read(fd.as_raw_fd(), (&mut buf as *mut u64).cast(), 8) };
}

/// Takes ownership of an fd the kernel just returned in a completion (accept).
pub fn owned_from_completion(fd: RawFd) -> OwnedFd {
    debug_assert!(fd >= 0);
    // SAFETY: the caller passes a non-negative accept result: the kernel installed this fd in
    // our table for us alone, and no other value in the process refers to it yet.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `SO_LINGER {on, 0}`: the next close sends RST instead of FIN (reset propagation).
pub fn set_linger_zero(fd: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// `shutdown(SHUT_WR)`: propagates a half-close (FIN) to the peer.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write)
}

/// The peer address of a connected socket (the client of an accepted connection).
pub fn peer_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
}

/// Number of open file descriptors of this process (for diagnostics).
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Convenience for functions that need a `BorrowedFd` of an `OwnedFd`.
pub fn borrow(fd: &OwnedFd) -> BorrowedFd<'_> {
    fd.as_fd()
}

/// Waits up to `timeout` for one of the (blocked) signals in `set`; returns its number.
pub fn wait_signal(set: &nix::sys::signal::SigSet, timeout: std::time::Duration) -> Option<i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `set` and `ts` are valid for the duration of the call; a null siginfo pointer is
    // allowed and means we do not want the details.
    let rc = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts) };
    (rc > 0).then_some(rc)
}

/// The local address of a connected socket (what the client connected to).
pub fn local_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    socket2::SockRef::from(&fd).local_addr().ok()?.as_socket()
}

/// Views an initialised byte buffer as the `MaybeUninit` buffer socket2's `recv`/`peek` take.
pub fn as_uninit(buf: &mut [u8]) -> &mut [std::mem::MaybeUninit<u8>] {
    // SAFETY: MaybeUninit<u8> has the same layout as u8; the only unsound use would be writing
    // an uninitialised value through the result, and socket2's recv/peek only write bytes the
    // kernel initialised. The borrow keeps `buf` exclusively ours for the result's lifetime.
    unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) }
}

/// Non-blocking `splice(2)` of up to `len` bytes from `fd_in` to `fd_out` (one of them a pipe).
/// Returns bytes moved (0 = EOF on a socket source) or -errno, like an io_uring completion.
pub fn splice(fd_in: RawFd, fd_out: RawFd, len: u32) -> i32 {
    // SAFETY: splice takes two fds the caller keeps open for the call and null offsets (both ends
    // are streams); no user memory is passed.
    let n = unsafe {
        libc::splice(
            fd_in,
            std::ptr::null_mut(),
            fd_out,
            std::ptr::null_mut(),
            len as usize,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        n.min(i32::MAX as isize) as i32
    }
}
