//! A fast loopback backend for `scripts/bench.sh`.
//!
//! - `reply`: read the request (`--payload` bytes, 64 by default), write a response of the same
//!   size, then wait for the peer's FIN and close. The client closes first, so TIME_WAIT lands on
//!   the client side (spread over many source addresses) instead of piling up here.
//! - `echo`: echo everything back until EOF; used to hold thousands of idle connections.
//! - `http`: a keep-alive HTTP/1.1 responder for `wrk`: every request (a header block ending in
//!   an empty line; request bodies are not supported) gets the same small `200 OK`. Pipelined
//!   requests are answered in order, in one write.
//! - `udp-echo`: send every datagram back to its source. `--threads` sockets share the port with
//!   `SO_REUSEPORT`; each thread moves up to 64 datagrams per `recvmmsg`/`sendmmsg` call so that
//!   the backend is not what limits a datagrams-per-second measurement.
//!
//! TCP modes: every thread runs its own small level-triggered epoll loop over one shared
//! non-blocking listener (`EPOLLEXCLUSIVE`, so one thread wakes per new connection). 8,000 idle
//! connections cost a few threads and a few bytes each, not a thread each. This is a benchmark
//! tool: it binds only loopback addresses it is told, keeps no limits beyond the fd limit, and
//! runs until it is killed.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use epoll::Epoll;
use mmsg::Batch;
use socket2::{Domain, Protocol, Socket, Type};

#[path = "support/epoll.rs"]
mod epoll;
#[path = "support/mmsg.rs"]
mod mmsg;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Read one request, write one response, wait for the client to close.
    Reply,
    /// Echo until EOF.
    Echo,
    /// Answer every HTTP/1.1 request with a fixed small 200 response; keep-alive.
    Http,
    /// Echo every UDP datagram to its source.
    UdpEcho,
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
    /// Request and response size in `reply` mode, bytes (unused by the other modes).
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

/// Token of the listener in every thread's epoll set; connections use their slot numbers.
const LISTENER: u64 = u64::MAX;
const LISTEN_BACKLOG: i32 = 4096;
/// What `http` mode answers to every request.
const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world\n";
/// The end of an HTTP request's header block.
const HTTP_END: &[u8; 4] = b"\r\n\r\n";
/// Datagrams per `recvmmsg`/`sendmmsg` in `udp-echo` mode.
const UDP_BATCH: usize = 64;

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
    if args.mode == Mode::UdpEcho {
        return run_udp_echo(&args);
    }
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
    /// `http`: `matched` bytes of `HTTP_END` seen at the end of what was read so far.
    Http { matched: usize },
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
    let response = match mode {
        Mode::Http => HTTP_RESPONSE.to_vec(),
        _ => vec![b'r'; payload],
    };
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
                    Mode::Http => Phase::Http { matched: 0 },
                    Mode::UdpEcho => unreachable!("udp-echo has no TCP listener"),
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
            Phase::Http { matched } => {
                let (requests, matched) = count_requests(&buf[..n], matched);
                conn.phase = Phase::Http { matched };
                if requests > 0 {
                    let out = response.repeat(requests);
                    if let Next::Close = send(conn, epoll, token, &out) {
                        return Next::Close;
                    }
                    if !conn.pending.is_empty() {
                        return Next::Keep;
                    }
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

/// Counts the request ends (`HTTP_END`) in `data`, given that the previous read ended with
/// `matched` bytes of it; returns the count and how many bytes of it `data` ends with.
fn count_requests(data: &[u8], mut matched: usize) -> (usize, usize) {
    let mut requests = 0;
    for &b in data {
        if b == HTTP_END[matched] {
            matched += 1;
            if matched == HTTP_END.len() {
                requests += 1;
                matched = 0;
            }
        } else {
            // The only prefix of "\r\n\r\n" a mismatching byte can start again is "\r".
            matched = usize::from(b == b'\r');
        }
    }
    (requests, matched)
}

// ---------------------------------------------------------------------------------------------
// udp-echo

fn run_udp_echo(args: &Args) -> ExitCode {
    let mut sockets = Vec::new();
    for _ in 0..args.threads.max(1) {
        match udp_socket(args.bind) {
            Ok(s) => sockets.push(s),
            Err(e) => {
                eprintln!("bench_backend: cannot bind udp {}: {e}", args.bind);
                return ExitCode::from(1);
            }
        }
    }
    eprintln!(
        "bench_backend: listening on udp {} mode=UdpEcho threads={}",
        args.bind,
        sockets.len()
    );
    let threads: Vec<_> = sockets
        .into_iter()
        .map(|s| thread::spawn(move || udp_echo_loop(&s)))
        .collect();
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("bench_backend: udp echo loop failed: {e}");
                return ExitCode::from(1);
            }
            Err(_) => return ExitCode::from(1),
        }
    }
    ExitCode::SUCCESS
}

fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    // Room for bursts from many flows at once: a drop here would count against the proxy.
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Blocks for the first datagram of a batch, takes whatever else is queued (up to the batch),
/// and sends them all back in one call.
fn udp_echo_loop(socket: &Socket) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    let mut batch = Batch::new(UDP_BATCH, true);
    loop {
        let n = match batch.recv(fd, libc::MSG_WAITFORONE) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            match batch.send(fd, sent, n - sent, 0) {
                Ok(0) => break,
                Ok(k) => sent += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A vanished peer (ICMP unreachable reported on the socket) or a full queue:
                // drop this datagram, as a real UDP server would, and go on.
                Err(_) => sent += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::count_requests;

    #[test]
    fn counts_requests_across_reads() {
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(count_requests(req, 0), (1, 0));
        let two: Vec<u8> = [&req[..], &req[..]].concat();
        assert_eq!(count_requests(&two, 0), (2, 0));
        // Split inside the terminator, byte by byte.
        let mut total = 0;
        let mut matched = 0;
        for b in two.iter() {
            let (n, m) = count_requests(std::slice::from_ref(b), matched);
            total += n;
            matched = m;
        }
        assert_eq!((total, matched), (2, 0));
        assert_eq!(count_requests(b"a\r\n\r", 0), (0, 3));
        assert_eq!(count_requests(b"\r\r\n\r\n", 0), (1, 0));
    }
}
