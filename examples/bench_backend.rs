//! A fast loopback backend for `scripts/bench.sh` (connection-rate and idle workloads).
//!
//! - `reply`: read the request (`--payload` bytes, 64 by default), write a response of the same
//!   size, then wait for the peer's FIN and close. The client closes first, so TIME_WAIT lands on
//!   the client side (spread over many source addresses) instead of piling up here.
//! - `echo`: echo everything back until EOF; used to hold thousands of idle connections.
//!
//! Every thread runs its own small level-triggered epoll loop over one shared non-blocking
//! listener (`EPOLLEXCLUSIVE`, so one thread wakes per new connection). 8,000 idle connections
//! cost a few threads and a few bytes each, not a thread each. This is a benchmark tool: it binds
//! only what it is told, keeps no limits beyond the fd limit, and runs until it is killed.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Read one request, write one response, wait for the client to close.
    Reply,
    /// Echo until EOF.
    Echo,
}

#[derive(Parser, Debug)]
#[command(about = "Loopback backend for scripts/bench.sh")]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long)]
    bind: SocketAddr,
    /// Event-loop threads sharing the listener.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
    /// Request and response size in `reply` mode, bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

/// Token of the listener in every thread's epoll set; connections use their slot numbers.
const LISTENER: u64 = u64::MAX;
const LISTEN_BACKLOG: i32 = 4096;

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.bind.ip().is_loopback() {
        eprintln!(
            "bench_backend: refusing to bind {}: loopback only",
            args.bind
        );
        return ExitCode::from(2);
    }
    raise_nofile_limit();
    let listener = match listen(args.bind) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            eprintln!("bench_backend: cannot listen on {}: {e}", args.bind);
            return ExitCode::from(1);
        }
    };
    eprintln!(
        "bench_backend: listening on {} mode={:?} threads={} payload={}",
        args.bind, args.mode, args.threads, args.payload
    );
    let threads: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let listener = Arc::clone(&listener);
            let (mode, payload) = (args.mode, args.payload);
            thread::spawn(move || event_loop(&listener, mode, payload))
        })
        .collect();
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("bench_backend: event loop failed: {e}");
                return ExitCode::from(1);
            }
            Err(_) => return ExitCode::from(1),
        }
    }
    ExitCode::SUCCESS
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    // std's listen() uses a backlog of 128 here, far too small for a connection-rate test.
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Soft fd limit up to the hard limit: the idle workload holds thousands of sockets.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// What a connection is waiting for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `reply`: `got` request bytes so far.
    Request { got: usize },
    /// `reply`: response written; discard anything else and close on EOF.
    Drain,
    /// `echo`: echo until EOF.
    Echo,
}

struct Conn {
    stream: TcpStream,
    phase: Phase,
    /// Bytes accepted for sending that the socket has not taken yet. While non-empty the
    /// connection waits for `EPOLLOUT` and stops reading, which bounds this buffer.
    pending: Vec<u8>,
}

enum Next {
    Keep,
    Close,
}

fn event_loop(listener: &TcpListener, mode: Mode, payload: usize) -> io::Result<()> {
    let epoll = Epoll::new()?;
    epoll.add(
        listener.as_raw_fd(),
        (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
        LISTENER,
    )?;
    let response = vec![b'r'; payload];
    let mut buf = vec![0u8; 64 * 1024];
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_token: u64 = 0;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    loop {
        let ready = epoll.wait(&mut events)?;
        for ev in &events[..ready] {
            let token = ev.u64;
            if token == LISTENER {
                accept_all(listener, &epoll, &mut conns, &mut next_token, mode);
                continue;
            }
            let Some(conn) = conns.get_mut(&token) else {
                continue;
            };
            let next = if ev.events & libc::EPOLLOUT as u32 != 0 && !conn.pending.is_empty() {
                flush(conn, &epoll, token)
            } else {
                on_readable(conn, &epoll, token, &mut buf, &response)
            };
            if let Next::Close = next {
                // Dropping the stream closes the fd, which also removes it from the epoll set.
                conns.remove(&token);
            }
        }
    }
}

fn accept_all(
    listener: &TcpListener,
    epoll: &Epoll,
    conns: &mut HashMap<u64, Conn>,
    next_token: &mut u64,
    mode: Mode,
) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let token = *next_token;
                *next_token += 1;
                if epoll
                    .add(stream.as_raw_fd(), libc::EPOLLIN as u32, token)
                    .is_err()
                {
                    continue;
                }
                let phase = match mode {
                    Mode::Reply => Phase::Request { got: 0 },
                    Mode::Echo => Phase::Echo,
                };
                conns.insert(
                    token,
                    Conn {
                        stream,
                        phase,
                        pending: Vec::new(),
                    },
                );
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => {}
            Err(e) => {
                // EMFILE and friends: the listener stays readable, so back off instead of
                // spinning, and let the next wakeup try again.
                eprintln!("bench_backend: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                return;
            }
        }
    }
}

fn on_readable(
    conn: &mut Conn,
    epoll: &Epoll,
    token: u64,
    buf: &mut [u8],
    response: &[u8],
) -> Next {
    loop {
        let n = match conn.stream.read(buf) {
            Ok(0) => return Next::Close,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Next::Close,
        };
        match conn.phase {
            Phase::Request { got } => {
                let got = got + n;
                if got < response.len() {
                    conn.phase = Phase::Request { got };
                    continue;
                }
                conn.phase = Phase::Drain;
                if let Next::Close = send(conn, epoll, token, response) {
                    return Next::Close;
                }
            }
            Phase::Drain => {}
            Phase::Echo => {
                if let Next::Close = send(conn, epoll, token, &buf[..n]) {
                    return Next::Close;
                }
                if !conn.pending.is_empty() {
                    // Wait for EPOLLOUT before reading more.
                    return Next::Keep;
                }
            }
        }
    }
}

/// Writes `data` now as far as the socket takes it; keeps the rest and waits for `EPOLLOUT`.
fn send(conn: &mut Conn, epoll: &Epoll, token: u64, data: &[u8]) -> Next {
    let mut off = 0;
    while off < data.len() {
        match conn.stream.write(&data[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
    if off < data.len() {
        conn.pending.extend_from_slice(&data[off..]);
        let fd = conn.stream.as_raw_fd();
        if epoll.modify(fd, libc::EPOLLOUT as u32, token).is_err() {
            return Next::Close;
        }
    }
    Next::Keep
}

fn flush(conn: &mut Conn, epoll: &Epoll, token: u64) -> Next {
    while !conn.pending.is_empty() {
        match conn.stream.write(&conn.pending) {
            Ok(n) => {
                conn.pending.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Next::Close,
        }
    }
    conn.pending = Vec::new();
    let fd = conn.stream.as_raw_fd();
    match epoll.modify(fd, libc::EPOLLIN as u32, token) {
        Ok(()) => Next::Keep,
        Err(_) => Next::Close,
    }
}

/// The few epoll calls this tool needs (nix's `event` feature is not enabled in this package).
struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event on our stack for the duration of the call; the
        // kernel copies it and keeps no pointer to it.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn add(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    fn modify(&self, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Blocks until at least one event; returns how many entries of `events` were filled.
    fn wait(&self, events: &mut [libc::epoll_event]) -> io::Result<usize> {
        let max = events.len().min(i32::MAX as usize) as libc::c_int;
        loop {
            // SAFETY: `events` is a valid, writable buffer of at least `max` entries that
            // outlives the call; the kernel writes at most `max` entries into it.
            let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, -1) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}
