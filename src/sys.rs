//! Raw syscalls the rest of the crate needs and the standard library does not offer: pipes with
//! a chosen capacity, eventfds, rlimits, `SO_LINGER 0`, `shutdown`, `getpeername` on a raw fd.
//!
//! This is one of the two modules allowed to use `unsafe` (the other is `uring`). Every function
//! here hands back owned types (`OwnedFd`, `Pipe`) so that no caller ever holds a raw fd it must
//! remember to close. Nothing here blocks, allocates per call or logs.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

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

/// `RLIMIT_NOFILE` as (soft, hard); (0, 0) if it cannot be read.
pub fn nofile_limit() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit the kernel writes into; it lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (0, 0);
    }
    (lim.rlim_cur, lim.rlim_max)
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

/// `SO_LINGER {on, 0}`: the next close sends RST instead of FIN (reset propagation).
pub fn set_linger_zero(fd: BorrowedFd<'_>) {
    let _ = socket2::SockRef::from(&fd).set_linger(Some(std::time::Duration::ZERO));
}

/// `poll(2)` with a zero timeout over `fds`: fills each `revents` (POLLERR, POLLHUP, POLLRDHUP,
/// ...) without blocking. One syscall for any number of sockets.
pub fn poll_now(fds: &mut [libc::pollfd]) -> io::Result<usize> {
    if fds.is_empty() {
        return Ok(0);
    }
    // SAFETY: `fds` is a valid, exclusively borrowed slice of pollfd for the whole call, and
    // its length is passed with it; timeout 0 never blocks.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Bytes waiting to be read on a socket (`FIONREAD`); 0 on error.
pub fn readable_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at a local.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        0
    } else {
        n.max(0) as usize
    }
}

/// `shutdown(SHUT_WR)`: propagates a half-close (FIN) to the peer.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write)
}

/// The peer address of a connected socket (the client of an accepted connection).
pub fn peer_addr(fd: BorrowedFd<'_>) -> Option<SocketAddr> {
    socket2::SockRef::from(&fd).peer_addr().ok()?.as_socket()
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
    as_result(n)
}

/// Asks the kernel to report each datagram's destination address (`IP_PKTINFO` /
/// `IPV6_RECVPKTINFO`), so replies from a wildcard-bound socket can leave from the address the
/// client sent to.
pub fn enable_pktinfo(fd: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    let one: libc::c_int = 1;
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    // SAFETY: setsockopt reads sizeof(c_int) bytes from `one`, which lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `SO_RCVLOWAT`: POLLIN on the socket reports readable only once `bytes` are queued
/// (or at EOF or an error). Lets a ClientHello read wait for the bytes it still needs instead
/// of waking on every segment of data already peeked.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads sizeof(c_int) bytes from `v`, which lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The destination address carried by an `IP_PKTINFO` / `IPV6_PKTINFO` control message in
/// `control[..len]` (as filled by `recvmsg`), if any.
pub fn pktinfo_dst(control: &[u64], len: usize) -> Option<std::net::IpAddr> {
    let bytes = len.min(std::mem::size_of_val(control));
    let mut hdr: libc::msghdr = msghdr_zeroed();
    hdr.msg_control = control.as_ptr() as *mut libc::c_void;
    hdr.msg_controllen = bytes as _;
    // SAFETY: `hdr` describes `control[..bytes]`, which the kernel filled with well-formed cmsgs
    // and which stays borrowed (unchanged) for this function; CMSG_* only walk within it and
    // every read is bounded by cmsg_len as the kernel wrote it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data as *const libc::in_pktinfo);
                    let ip = std::net::Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
                    return Some(ip.into());
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data as *const libc::in6_pktinfo);
                    return Some(std::net::Ipv6Addr::from(info.ipi6_addr.s6_addr).into());
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    None
}

fn msghdr_zeroed() -> libc::msghdr {
    // SAFETY: msghdr is a plain C struct for which all-zero bytes are a valid empty value.
    unsafe { std::mem::zeroed() }
}

/// Writes one PKTINFO control message naming `from` as the source address into `control`, and
/// points `hdr` at it.
fn set_pktinfo(hdr: &mut libc::msghdr, control: &mut [u64; 8], from: std::net::IpAddr) {
    hdr.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_FIRSTHDR/CMSG_DATA only compute offsets within `control` (64
    // bytes, 8-aligned, large enough for one in_pktinfo or in6_pktinfo cmsg), which `hdr` now
    // points at with the length CMSG_SPACE gives; we write exactly one cmsg of the size
    // CMSG_LEN announces. Nothing else aliases `control` meanwhile.
    unsafe {
        match from {
            std::net::IpAddr::V4(ip) => {
                hdr.msg_controllen =
                    libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
                let c = libc::CMSG_FIRSTHDR(hdr);
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in_pktinfo, info);
            }
            std::net::IpAddr::V6(ip) => {
                hdr.msg_controllen =
                    libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) as _;
                let c = libc::CMSG_FIRSTHDR(hdr);
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len =
                    libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as _;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in6_pktinfo, info);
            }
        }
    }
}

/// One datagram of a [`send_batch`]: `len` bytes at `offset` of the batch's buffer.
#[derive(Clone, Copy, Debug)]
pub struct OutDatagram {
    pub offset: usize,
    pub len: usize,
    pub to: SocketAddr,
    /// Source address to send from (PKTINFO), for wildcard-bound sockets.
    pub from: Option<std::net::IpAddr>,
}

/// Most datagrams one [`send_batch`] call takes.
pub const SEND_BATCH_MAX: usize = 32;

/// Sends up to [`SEND_BATCH_MAX`] datagrams (pieces of `buf`) from one unconnected UDP socket
/// with `sendmmsg(2)`, non-blocking: one syscall, and one chance for the scheduler to switch
/// away, for the whole batch instead of one per datagram. A datagram the kernel refuses (too
/// large, unreachable) is skipped and the rest still go; a full socket buffer drops the rest of
/// the batch. `sent[i]` tells whether datagram i left; returns how many did.
pub fn send_batch(
    fd: BorrowedFd<'_>,
    buf: &[u8],
    out: &[OutDatagram],
    sent: &mut [bool; SEND_BATCH_MAX],
) -> usize {
    let n = out.len().min(SEND_BATCH_MAX);
    // SAFETY: sockaddr_storage is a plain C struct for which all-zero bytes are valid.
    let mut names: [libc::sockaddr_storage; SEND_BATCH_MAX] = unsafe { std::mem::zeroed() };
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; SEND_BATCH_MAX];
    let mut controls = [[0u64; 8]; SEND_BATCH_MAX];
    // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid empty value.
    let mut msgs: [libc::mmsghdr; SEND_BATCH_MAX] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        sent[i] = false;
        let data = &buf[out[i].offset..out[i].offset + out[i].len];
        let dst = socket2::SockAddr::from(out[i].to);
        let len = dst.len() as usize;
        // SAFETY: `dst` holds `len` (≤ size_of sockaddr_storage) initialised bytes of a socket
        // address; `names[i]` is ours and large enough; the two do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                dst.as_ptr().cast::<u8>(),
                (&mut names[i] as *mut libc::sockaddr_storage).cast::<u8>(),
                len,
            );
        }
        iovs[i].iov_base = data.as_ptr() as *mut libc::c_void;
        iovs[i].iov_len = data.len();
        let hdr = &mut msgs[i].msg_hdr;
        hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
        hdr.msg_namelen = len as libc::socklen_t;
        hdr.msg_iov = &mut iovs[i];
        hdr.msg_iovlen = 1;
        if let Some(from) = out[i].from {
            set_pktinfo(hdr, &mut controls[i], from);
        }
    }
    let mut done = 0;
    let mut start = 0;
    while start < n {
        // SAFETY: headers start..n point at their own name, iovec and control buffers on this
        // stack frame and at pieces of `buf`, all alive and unmodified for the call; sendmmsg
        // only reads them (and writes msg_len).
        let r = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                msgs[start..].as_mut_ptr(),
                (n - start) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r > 0 {
            for s in &mut sent[start..start + r as usize] {
                *s = true;
            }
            done += r as usize;
            start += r as usize;
        } else {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) if r < 0 => continue,
                // The socket's buffer is full: the rest of the batch is dropped, as UDP drops.
                Some(libc::EAGAIN | libc::ENOBUFS) if r < 0 => break,
                // This datagram is refused (too large, unreachable): skip it, send the rest.
                _ => start += 1,
            }
        }
    }
    done
}

/// Receives up to `lens.len()` datagrams in one `recvmmsg(2)` (non-blocking) into consecutive
/// `slot`-byte pieces of `scratch`; datagram i's length goes to `lens[i]`. Returns how many
/// arrived (0 never: no datagram is `WouldBlock`).
pub fn recv_batch(
    fd: BorrowedFd<'_>,
    scratch: &mut [u8],
    slot: usize,
    lens: &mut [usize],
) -> io::Result<usize> {
    const MAX: usize = 16;
    let n = lens.len().min(MAX).min(scratch.len() / slot.max(1));
    let mut iovs: [libc::iovec; MAX] = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX];
    // SAFETY: mmsghdr is a plain C struct for which all-zero bytes are a valid empty value.
    let mut msgs: [libc::mmsghdr; MAX] = unsafe { std::mem::zeroed() };
    for i in 0..n {
        iovs[i].iov_base = scratch[i * slot..].as_mut_ptr().cast();
        iovs[i].iov_len = slot;
        msgs[i].msg_hdr.msg_iov = &mut iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: each of the `n` headers points at its own iovec, which points at a disjoint
    // `slot`-byte piece of `scratch`; all of them live and are exclusively ours for the call.
    let got = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let got = got as usize;
    for i in 0..got {
        lens[i] = msgs[i].msg_len as usize;
    }
    Ok(got)
}

/// Non-blocking `recv` into `buf`: bytes read (0 = EOF) or -errno.
pub fn recv_nb(fd: RawFd, buf: &mut [u8]) -> i32 {
    // SAFETY: recv writes at most buf.len() bytes into `buf`, which is exclusively borrowed for
    // the call; the fd is kept open by the caller.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    as_result(n)
}

/// Non-blocking `send` of `buf` (no SIGPIPE): bytes sent or -errno.
pub fn send_nb(fd: RawFd, buf: &[u8]) -> i32 {
    // SAFETY: send reads buf.len() bytes from `buf`, borrowed for the call; the fd is kept open
    // by the caller.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    as_result(n)
}

/// Non-blocking `write` of `buf` (into a pipe): bytes written or -errno.
pub fn write_nb(fd: RawFd, buf: &[u8]) -> i32 {
    // SAFETY: write reads buf.len() bytes from `buf`, borrowed for the call; the fd is kept open
    // by the caller.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    as_result(n)
}

/// A syscall's return as a completion-style result: bytes (clamped to i32) or -errno.
fn as_result(n: isize) -> i32 {
    if n < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        n.min(i32::MAX as isize) as i32
    }
}

/// Takes ownership of a descriptor the kernel just installed in this process (received by
/// `SCM_RIGHTS`, inherited across exec and named by the binary-upgrade environment variable, or
/// created by a ring `SOCKET` whose completion carries its number).
/// The caller guarantees nothing else owns `fd`.
pub fn own_received_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was installed by the kernel for this process moments ago (SCM_RIGHTS) or left
    // open for it across exec; no other `OwnedFd` names it, so this one may close it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Whether `fd` is an open descriptor of this process (checked before taking ownership of a
/// number read from the environment).
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD reads the descriptor's flags; it touches no memory.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;
    use std::time::Duration;

    fn receiver(addr: &str) -> Option<UdpSocket> {
        let s = UdpSocket::bind(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Some(s)
    }

    /// One sendmmsg delivers each piece of the buffer to its own destination, IPv4 and IPv6,
    /// with and without a PKTINFO source; the source the receiver sees is the one asked for.
    #[test]
    fn send_batch_delivers_each_datagram_to_its_destination() {
        let a = receiver("127.0.0.1:0").unwrap();
        let b = receiver("127.0.0.1:0").unwrap();
        let from = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = from.local_addr().unwrap().port();
        let buf = b"helloworld!";
        let mut out = vec![
            OutDatagram {
                offset: 0,
                len: 5,
                to: a.local_addr().unwrap(),
                from: None,
            },
            OutDatagram {
                offset: 5,
                len: 6,
                to: b.local_addr().unwrap(),
                from: Some("127.0.0.9".parse().unwrap()),
            },
            OutDatagram {
                offset: 0,
                len: 11,
                to: a.local_addr().unwrap(),
                from: Some("127.0.0.1".parse().unwrap()),
            },
        ];
        let v6 = receiver("[::1]:0");
        let from6 = UdpSocket::bind("[::]:0").ok();
        let mut sent = [false; SEND_BATCH_MAX];
        assert_eq!(send_batch(from.as_fd(), buf, &out, &mut sent), 3);
        assert_eq!(&sent[..3], &[true, true, true]);
        let mut got = [0u8; 64];
        let (n, src) = a.recv_from(&mut got).unwrap();
        assert_eq!((&got[..n], src.port()), (&b"hello"[..], port));
        let (n, src) = b.recv_from(&mut got).unwrap();
        assert_eq!(&got[..n], b"world!");
        assert_eq!(src, SocketAddr::from(([127, 0, 0, 9], port)));
        let (n, src) = a.recv_from(&mut got).unwrap();
        assert_eq!(&got[..n], buf);
        assert_eq!(src, SocketAddr::from(([127, 0, 0, 1], port)));

        // IPv6, where the host has it.
        if let (Some(v6), Some(from6)) = (v6, from6) {
            out.truncate(1);
            out[0].to = v6.local_addr().unwrap();
            out[0].from = Some("::1".parse().unwrap());
            assert_eq!(send_batch(from6.as_fd(), buf, &out, &mut sent), 1);
            let (n, src) = v6.recv_from(&mut got).unwrap();
            assert_eq!(&got[..n], b"hello");
            assert_eq!(src.ip(), "::1".parse::<std::net::IpAddr>().unwrap());
        }
    }

    /// A datagram the kernel refuses (too large for UDP) is skipped; the rest of the batch goes.
    #[test]
    fn send_batch_skips_a_refused_datagram() {
        let a = receiver("127.0.0.1:0").unwrap();
        let from = UdpSocket::bind("127.0.0.1:0").unwrap();
        let big = vec![7u8; 70_000];
        let to = a.local_addr().unwrap();
        let out = [
            OutDatagram {
                offset: 0,
                len: 70_000,
                to,
                from: None,
            },
            OutDatagram {
                offset: 0,
                len: 3,
                to,
                from: None,
            },
        ];
        let mut sent = [true; SEND_BATCH_MAX];
        assert_eq!(send_batch(from.as_fd(), &big, &out, &mut sent), 1);
        assert_eq!(&sent[..2], &[false, true]);
        let mut got = [0u8; 16];
        let n = a.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &[7, 7, 7]);
    }
}
