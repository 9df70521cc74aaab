//! Which I/O backend this process uses, decided once at start for every worker, and why.
//!
//! `auto` (the default) sets up a small io_uring, asks the kernel which operations it has
//! (`IORING_REGISTER_PROBE`) and tries the optional behaviours ringlb relies on (multishot
//! accept, timeout and poll, cancel by fd); it falls back to epoll only when io_uring is not
//! available — EPERM (seccomp, `kernel.io_uring_disabled`), ENOSYS, EINVAL at setup, or a
//! required operation missing. Resource errors (ENOMEM, EMFILE) are fatal: the host is short,
//! not incapable. `io_uring` never falls back; `epoll` never tries io_uring. The environment
//! variable `RINGLB_IO` overrides the config, and `RINGLB_IO_DISABLE` (a comma list of
//! `multishot_accept`, `multishot_timeout`, `multishot_poll`) turns optional features off, as an
//! older kernel would, for tests.
//! Must not: run after start, or be consulted per operation (workers get the [`Choice`]).

use io_uring::{opcode, types, IoUring, Probe};
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// `runtime.io` in the config (or `RINGLB_IO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoSetting {
    Auto,
    IoUring,
    Epoll,
}

impl IoSetting {
    pub const ALL: [IoSetting; 3] = [IoSetting::Auto, IoSetting::IoUring, IoSetting::Epoll];

    pub fn name(self) -> &'static str {
        match self {
            IoSetting::Auto => "auto",
            IoSetting::IoUring => "io_uring",
            IoSetting::Epoll => "epoll",
        }
    }

    pub fn from_name(s: &str) -> Option<IoSetting> {
        IoSetting::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// The backend workers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Epoll,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::IoUring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Optional io_uring behaviours, each with an older fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// Multishot accept (5.19); else one accept per completion, re-armed.
    pub multishot_accept: bool,
    /// Multishot timeout (6.4); else a one-shot timeout re-armed per tick.
    pub multishot_timeout: bool,
    /// Multishot poll (5.13); else one-shot polls re-armed.
    pub multishot_poll: bool,
    /// Small messages received into a provided-buffer ring and sent from it by the ring
    /// (`IORING_REGISTER_PBUF_RING`, 5.19); else readiness poll, then `recv` and `send`.
    pub ring_recv: bool,
    /// Half-closes and closes of connection sockets as SQEs (`SHUTDOWN` 5.11, `CLOSE` 5.6);
    /// else `shutdown(2)` and `close(2)` on the worker thread.
    pub ring_close: bool,
    /// Replies on UDP flow sockets received by a multishot ring `RECV` into provided buffers
    /// (6.0); else a multishot poll, then `recvmmsg`.
    pub ring_udp: bool,
    /// Socket options of backend sockets as `URING_CMD` SQEs (`SOCKET_URING_OP_SETSOCKOPT`,
    /// 6.7), in the same submission as the connect; else `setsockopt(2)` per option.
    pub ring_sockopt: bool,
    /// Backend sockets created by `SOCKET` SQEs (5.19), so a connection's setup makes no
    /// syscall of its own; else `socket(2)`.
    pub ring_socket: bool,
}

impl Features {
    pub const ALL: Features = Features {
        multishot_accept: true,
        multishot_timeout: true,
        multishot_poll: true,
        ring_recv: true,
        ring_close: true,
        ring_udp: true,
        ring_sockopt: true,
        ring_socket: true,
    };

    fn list(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (on, name) in [
            (self.multishot_accept, "multishot accept"),
            (self.multishot_timeout, "multishot timeout"),
            (self.multishot_poll, "multishot poll"),
            (self.ring_recv, "ring recv/send"),
            (self.ring_close, "ring shutdown/close"),
            (self.ring_udp, "ring udp recv"),
            (self.ring_sockopt, "ring setsockopt"),
            (self.ring_socket, "ring socket"),
        ] {
            v.push(if on { name } else { "" });
        }
        v.retain(|s| !s.is_empty());
        v
    }

    fn missing(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if !self.multishot_accept {
            v.push("multishot accept (one accept per completion instead)");
        }
        if !self.multishot_timeout {
            v.push("multishot timeout (a one-shot timeout per tick instead)");
        }
        if !self.multishot_poll {
            v.push("multishot poll (one-shot polls instead)");
        }
        if !self.ring_recv {
            v.push("ring recv/send (poll, then recv and send syscalls instead)");
        }
        if !self.ring_close {
            v.push("ring shutdown/close (shutdown and close syscalls instead)");
        }
        if !self.ring_udp {
            v.push("ring udp recv (poll, then recvmmsg for UDP replies instead)");
        }
        if !self.ring_sockopt {
            v.push("ring setsockopt (setsockopt syscalls for backend sockets instead)");
        }
        if !self.ring_socket {
            v.push("ring socket (a socket syscall per backend connection instead)");
        }
        v
    }
}

/// The decision, with the one line that explains it.
#[derive(Clone, Debug)]
pub struct Choice {
    pub backend: Backend,
    pub features: Features,
    /// `io: io_uring (kernel 6.18; multishot accept, ...)` or `io: epoll (...)`.
    pub line: String,
}

impl Choice {
    /// The optional io_uring features in use (empty on epoll).
    pub fn feature_names(&self) -> Vec<&'static str> {
        match self.backend {
            Backend::IoUring => self.features.list(),
            Backend::Epoll => Vec::new(),
        }
    }

    /// An epoll choice, for tests of code that only reports the choice.
    #[doc(hidden)]
    pub fn epoll_for_tests() -> Choice {
        Choice {
            backend: Backend::Epoll,
            features: Features::ALL,
            line: "io: epoll (test)".into(),
        }
    }
}

/// Operations every io_uring worker submits: without one of them io_uring is not usable here.
const REQUIRED: [(u8, &str); 8] = [
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::RecvMsg::CODE, "RECVMSG"),
    (opcode::Send::CODE, "SEND"),
];

/// Decides the backend for `setting`, with `RINGLB_IO` taking precedence. Err: the setting asks
/// for io_uring and it cannot be used (the message says which and what to change), or a
/// resource error.
pub fn choose(setting: IoSetting) -> Result<Choice, String> {
    let setting = match std::env::var("RINGLB_IO").ok().as_deref() {
        None | Some("") => setting,
        Some(v) => IoSetting::from_name(v).ok_or_else(|| {
            format!("RINGLB_IO={v:?} is not an I/O backend (expected auto, io_uring or epoll)")
        })?,
    };
    let kernel = kernel_release();
    if setting == IoSetting::Epoll {
        return Ok(Choice {
            backend: Backend::Epoll,
            features: Features::ALL,
            line: format!("io: epoll (chosen by configuration; kernel {kernel})"),
        });
    }
    match probe_uring() {
        Ok(mut features) => {
            disable_from_env(&mut features);
            let mut parts = vec![format!("kernel {kernel}")];
            let have = features.list();
            if !have.is_empty() {
                parts.push(have.join(", "));
            }
            let missing = features.missing();
            if !missing.is_empty() {
                parts.push(format!("without {}", missing.join(", ")));
            }
            Ok(Choice {
                backend: Backend::IoUring,
                features,
                line: format!("io: io_uring ({})", parts.join("; ")),
            })
        }
        Err(Unavailable::Resource(e)) => Err(format!("io_uring setup failed: {e}")),
        Err(Unavailable::NotHere(why)) if setting == IoSetting::IoUring => Err(why),
        Err(Unavailable::NotHere(why)) => Ok(Choice {
            backend: Backend::Epoll,
            features: Features::ALL,
            line: format!("io: epoll ({why}; kernel {kernel})"),
        }),
    }
}

enum Unavailable {
    /// io_uring cannot be used on this host (the reason, phrased for the operator).
    NotHere(String),
    /// A resource error: fatal.
    Resource(io::Error),
}

fn disable_from_env(f: &mut Features) {
    let Ok(v) = std::env::var("RINGLB_IO_DISABLE") else {
        return;
    };
    for name in v.split(',').map(str::trim) {
        match name {
            "multishot_accept" => f.multishot_accept = false,
            "multishot_timeout" => f.multishot_timeout = false,
            "multishot_poll" => f.multishot_poll = false,
            "ring_recv" => f.ring_recv = false,
            "ring_close" => f.ring_close = false,
            "ring_udp" => f.ring_udp = false,
            "ring_sockopt" => f.ring_sockopt = false,
            "ring_socket" => f.ring_socket = false,
            _ => {}
        }
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Why io_uring cannot be used here, phrased for the one line the binary prints.
pub fn unavailable_reason(err: &io::Error) -> String {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    match err.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup: Function not implemented (ENOSYS) — this kernel has no io_uring, or a seccomp profile hides it; set runtime.io = \"epoll\" or use a kernel with io_uring".into(),
        Some(libc::EPERM) if disabled == "2" => "io_uring_setup: Operation not permitted — io_uring is disabled on this host (kernel.io_uring_disabled = 2); set it to 0, or run with runtime.io = \"epoll\"".into(),
        Some(libc::EPERM) if disabled == "1" => "io_uring_setup: Operation not permitted — io_uring is restricted on this host (kernel.io_uring_disabled = 1, only the io_uring_group may use it); run ringlb in that group, set it to 0, or use runtime.io = \"epoll\"".into(),
        Some(libc::EPERM) => "io_uring_setup: Operation not permitted — a seccomp profile blocks io_uring (Docker ≥ 25's and containerd ≥ 2.0's defaults do); allow io_uring_setup/io_uring_enter/io_uring_register, or run with runtime.io = \"epoll\"".into(),
        Some(libc::EINVAL) => "io_uring_setup: Invalid argument (EINVAL) — this kernel's io_uring is too old for ringlb; use runtime.io = \"epoll\"".into(),
        _ => format!("io_uring setup failed: {err}"),
    }
}

fn probe_uring() -> Result<Features, Unavailable> {
    let mut ring = IoUring::new(8).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
            Unavailable::NotHere(unavailable_reason(&e))
        }
        _ => Unavailable::Resource(e),
    })?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        Unavailable::NotHere(format!("io_uring_register(PROBE) failed: {e} — this kernel's io_uring is too old for ringlb (≥ 5.19 is needed)"))
    })?;
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(Unavailable::NotHere(format!(
            "io_uring lacks {} on this kernel",
            missing.join(", ")
        )));
    }
    // Behaviours no opcode probe reveals: try each once on this small ring.
    let efd = crate::sys::eventfd().map_err(Unavailable::Resource)?;
    // Cancel by fd, all matches (5.19): required, the worker closes connections with it.
    let cancel =
        opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(efd.as_raw_fd())).all())
            .build()
            .user_data(1);
    let r = one(&mut ring, cancel, 1);
    if r == Some(-libc::EINVAL) || r.is_none() {
        return Err(Unavailable::NotHere(
            "io_uring cannot cancel by file descriptor on this kernel (≥ 5.19 is needed)".into(),
        ));
    }
    // Multishot poll (5.13): the eventfd is made readable, a multishot poll reports MORE.
    crate::sys::eventfd_signal(std::os::fd::AsFd::as_fd(&efd));
    let poll = opcode::PollAdd::new(types::Fd(efd.as_raw_fd()), libc::POLLIN as u32)
        .multi(true)
        .build()
        .user_data(2);
    let multishot_poll = one_flags(&mut ring, poll, 2)
        .is_some_and(|(res, flags)| res >= 0 && io_uring::cqueue::more(flags));
    cancel_all(&mut ring, efd.as_raw_fd());
    // Multishot timeout (6.4): a 1 ms timer whose first expiry reports MORE.
    let ts = types::Timespec::new().nsec(1_000_000);
    let t = opcode::Timeout::new(&ts)
        .flags(types::TimeoutFlags::MULTISHOT)
        .build()
        .user_data(3);
    let multishot_timeout = one_flags(&mut ring, t, 3)
        .is_some_and(|(res, flags)| res == -libc::ETIME && io_uring::cqueue::more(flags));
    let rm = opcode::TimeoutRemove::new(3).build().user_data(4);
    let _ = one(&mut ring, rm, 4);
    // Multishot accept (5.19): cancelled at once; an unknown flag is -EINVAL instead.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(Unavailable::Resource)?;
    let acc = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .build()
        .user_data(5);
    let cancel =
        opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(listener.as_raw_fd())).all())
            .build()
            .user_data(6);
    push(&mut ring, acc);
    push(&mut ring, cancel);
    let seen = collect(&mut ring, &[5, 6]);
    let multishot_accept = seen
        .iter()
        .find(|(ud, _, _)| *ud == 5)
        .is_some_and(|(_, res, _)| *res != -libc::EINVAL);
    // Provided-buffer rings (5.19) and buffer-select RECV: register a one-buffer ring.
    let ring_recv = probe.is_supported(opcode::Recv::CODE)
        && super::uring::BufRing::new(&ring.submitter(), 1, 64, 0).is_ok();
    let ring_close =
        probe.is_supported(opcode::Shutdown::CODE) && probe.is_supported(opcode::Close::CODE);
    let ring_udp = probe.is_supported(opcode::Recv::CODE) && probe_recv_multi(&mut ring)?;
    let ring_sockopt = probe.is_supported(opcode::SetSockOpt::CODE) && probe_sockopt(&mut ring)?;
    let ring_socket = probe.is_supported(opcode::Socket::CODE) && probe_socket(&mut ring);
    Ok(Features {
        multishot_accept,
        multishot_timeout,
        multishot_poll,
        ring_recv,
        ring_close,
        ring_udp,
        ring_sockopt,
        ring_socket,
    })
}

/// `SOCKET` (5.19): a non-blocking, close-on-exec TCP socket made by the ring (closed at once).
fn probe_socket(ring: &mut IoUring) -> bool {
    let ty = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    let e = opcode::Socket::new(libc::AF_INET, ty, 0)
        .build()
        .user_data(9);
    match one(ring, e, 9) {
        Some(fd) if fd >= 0 => {
            drop(crate::sys::own_received_fd(fd));
            true
        }
        _ => false,
    }
}

fn push(ring: &mut IoUring, e: io_uring::squeue::Entry) {
    // SAFETY: the probe's entries point at stack values (a timespec) that outlive the submit
    // and wait that follow in the same function, or at nothing; the fds they name stay open
    // until after their completions are reaped.
    unsafe {
        let _ = ring.submission().push(&e);
    }
}

/// Submits `e` and waits (up to 1 s) for the completion with `user_data == ud`: its result.
fn one(ring: &mut IoUring, e: io_uring::squeue::Entry, ud: u64) -> Option<i32> {
    one_flags(ring, e, ud).map(|(r, _)| r)
}

fn one_flags(ring: &mut IoUring, e: io_uring::squeue::Entry, ud: u64) -> Option<(i32, u32)> {
    push(ring, e);
    collect(ring, &[ud])
        .into_iter()
        .find(|(u, _, _)| *u == ud)
        .map(|(_, r, f)| (r, f))
}

/// Submits what is queued and gathers completions until one of each `uds` came (up to 1 s).
fn collect(ring: &mut IoUring, uds: &[u64]) -> Vec<(u64, i32, u32)> {
    let mut got: Vec<(u64, i32, u32)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < deadline
        && !uds.iter().all(|u| got.iter().any(|(g, _, _)| g == u))
    {
        let ts = types::Timespec::new().nsec(50_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        got.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
    }
    got
}

fn cancel_all(ring: &mut IoUring, fd: i32) {
    let c = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
        .build()
        .user_data(99);
    let _ = one(ring, c, 99);
}

/// Multishot `RECV` with provided buffers on a datagram socket (6.0): a datagram the socket
/// sent itself arrives with `more()`; an older kernel refuses the flag with -EINVAL.
fn probe_recv_multi(ring: &mut IoUring) -> Result<bool, Unavailable> {
    // Buffer group 1 on the probe ring (group 0 is the stream probe's).
    let Ok(_bufs) = super::uring::BufRing::new(&ring.submitter(), 1, 64, 1) else {
        return Ok(false);
    };
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(Unavailable::Resource)?;
    let me = sock.local_addr().map_err(Unavailable::Resource)?;
    sock.connect(me).map_err(Unavailable::Resource)?;
    sock.send(b"probe").map_err(Unavailable::Resource)?;
    let e = opcode::RecvMulti::new(types::Fd(sock.as_raw_fd()), 1)
        .build()
        .user_data(7);
    let r = one_flags(ring, e, 7);
    cancel_all(ring, sock.as_raw_fd());
    Ok(r.is_some_and(|(res, flags)| res == 5 && io_uring::cqueue::more(flags)))
}

/// `SOCKET_URING_OP_SETSOCKOPT` (6.7) at the TCP level: TCP_NODELAY set through the ring on a
/// fresh TCP socket reads back as set.
fn probe_sockopt(ring: &mut IoUring) -> Result<bool, Unavailable> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(Unavailable::Resource)?;
    let one: libc::c_int = 1;
    let e = opcode::SetSockOpt::new(
        types::Fd(sock.as_raw_fd()),
        libc::IPPROTO_TCP as u32,
        libc::TCP_NODELAY as u32,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as u32,
    )
    .build()
    .user_data(8);
    let r = one_flags(ring, e, 8);
    Ok(r.is_some_and(|(res, _)| res == 0) && sock.tcp_nodelay().unwrap_or(false))
}
