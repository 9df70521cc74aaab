//! UDP request/response load generator for `scripts/bench.sh`; prints one JSON line on stdout.
//!
//! `--sockets` client sockets, each bound to its own source address (127.0.0.2, 127.0.0.3, ...)
//! and connected to `--target`, keep `--window` requests of `--payload` bytes (64 by default)
//! outstanding each. Every request carries its slot and a sequence number; the reply (the target
//! must echo, e.g. `bench_backend --mode udp-echo` directly or behind a proxy) frees the slot,
//! which is refilled at once. A request without a reply after `--timeout-ms` counts as lost and
//! its slot is refilled; a reply that arrives after that counts as late and is otherwise ignored.
//!
//! The run has a warm-up (`--warmup-ms`, not counted: a proxy sets up its flows) and then
//! `--duration-secs` of measurement, ending early after `--max-replies` replies. Threads
//! (`--threads`) split the sockets and move datagrams with `recvmmsg`/`sendmmsg`, one batch per
//! socket per wakeup. Latency (send to reply) goes into a fixed log-linear histogram.
//!
//! `{"replies":..,"sent":..,"lost":..,"late":..,"errors":..,"secs":..,"rate":..,"p50_us":..,
//!   "p90_us":..,"p99_us":..,"sockets":..,"window":..}` — `rate` is replies per second during
//! the measurement; `sent`, `lost` and `late` count the same interval.
//! Targets outside 127.0.0.0/8 are refused.

use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use epoll::Epoll;
use histogram::Histogram;
use mmsg::Batch;
use socket2::{Domain, Protocol, Socket, Type};

#[path = "support/epoll.rs"]
mod epoll;
#[path = "support/histogram.rs"]
mod histogram;
#[path = "support/mmsg.rs"]
mod mmsg;

#[derive(Parser, Debug)]
#[command(about = "UDP request/response load generator (loopback only)")]
struct Args {
    /// Address to send to; must be in 127.0.0.0/8.
    #[arg(long)]
    target: SocketAddr,
    /// Client sockets, each from its own source address 127.0.0.2 upwards (at most 60,000).
    #[arg(long, default_value_t = 32)]
    sockets: usize,
    /// Requests kept outstanding per socket (at most 256).
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Threads sharing the sockets.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Measured run time after the warm-up.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Warm-up before measuring, milliseconds.
    #[arg(long, default_value_t = 500)]
    warmup_ms: u64,
    /// Stop measuring after this many replies.
    #[arg(long, default_value_t = 1_000_000_000)]
    max_replies: u64,
    /// Datagram size, bytes (at least 12: slot and sequence number).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// A request unanswered this long is lost and its slot is reused.
    #[arg(long, default_value_t = 200)]
    timeout_ms: u64,
}

const HEADER: usize = 12;
const MAX_WINDOW: usize = 256;
const MAX_SOCKETS: usize = 60_000;

fn main() -> ExitCode {
    let args = Args::parse();
    let IpAddr::V4(ip) = args.target.ip() else {
        eprintln!("udp_load: target {} must be IPv4 loopback", args.target);
        return ExitCode::from(2);
    };
    if !ip.is_loopback() {
        eprintln!("udp_load: refusing target {}: loopback only", args.target);
        return ExitCode::from(2);
    }
    if args.payload < HEADER || args.payload > mmsg::SLOT {
        eprintln!("udp_load: --payload must be {HEADER}..={}", mmsg::SLOT);
        return ExitCode::from(2);
    }
    if !(1..=MAX_WINDOW).contains(&args.window) || !(1..=MAX_SOCKETS).contains(&args.sockets) {
        eprintln!("udp_load: --window must be 1..={MAX_WINDOW}, --sockets 1..={MAX_SOCKETS}");
        return ExitCode::from(2);
    }
    let mut sockets = Vec::with_capacity(args.sockets);
    for i in 0..args.sockets {
        match client_socket(source_addr(i), args.target) {
            Ok(s) => sockets.push(s),
            Err(e) => {
                eprintln!("udp_load: socket {i} ({}): {e}", source_addr(i));
                return ExitCode::from(1);
            }
        }
    }
    let threads = args.threads.clamp(1, sockets.len());
    let mut shares: Vec<Vec<Socket>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, s) in sockets.into_iter().enumerate() {
        shares[i % threads].push(s);
    }
    let start = Instant::now();
    let measure_from = start + Duration::from_millis(args.warmup_ms);
    let stop_at = measure_from + Duration::from_secs(args.duration_secs);
    let per_thread_max = args.max_replies.div_ceil(threads as u64);
    let mut total = Totals::default();
    let mut failed = false;
    thread::scope(|s| {
        let workers: Vec<_> = shares
            .into_iter()
            .map(|share| {
                let args = &args;
                s.spawn(move || {
                    run_thread(share, args, start, measure_from, stop_at, per_thread_max)
                })
            })
            .collect();
        for w in workers {
            // A panicking worker is a bug in this tool: let it take the run down.
            match w.join().expect("udp_load worker panicked") {
                Ok(t) => total.merge(&t),
                Err(e) => {
                    eprintln!("udp_load: worker failed: {e}");
                    failed = true;
                }
            }
        }
    });
    if failed {
        return ExitCode::from(1);
    }
    let secs = total.measured_secs.max(1e-9);
    println!(
        "{{\"replies\":{},\"sent\":{},\"lost\":{},\"late\":{},\"errors\":{},\"secs\":{:.3},\"rate\":{:.1},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"sockets\":{},\"window\":{}}}",
        total.replies,
        total.sent,
        total.lost,
        total.late,
        total.errors,
        secs,
        total.replies as f64 / secs,
        total.hist.quantile(0.50),
        total.hist.quantile(0.90),
        total.hist.quantile(0.99),
        args.sockets,
        args.window,
    );
    ExitCode::SUCCESS
}

/// 127.0.0.2, 127.0.0.3, ..., 127.0.0.255, 127.0.1.1, ...: a distinct address per socket, so
/// a proxy that hashes or keys flows by client address sees distinct clients.
fn source_addr(i: usize) -> SocketAddr {
    let n = i + 2;
    let (hi, lo) = ((n / 255) as u8, (n % 255) as u8);
    let ip = if hi == 0 {
        Ipv4Addr::new(127, 0, 0, lo)
    } else {
        Ipv4Addr::new(127, 0, hi, lo.max(1))
    };
    SocketAddr::new(ip.into(), 0)
}

fn client_socket(source: SocketAddr, target: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(1 << 20);
    s.bind(&source.into())?;
    s.connect(&target.into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}

#[derive(Default)]
struct Totals {
    replies: u64,
    sent: u64,
    lost: u64,
    late: u64,
    errors: u64,
    measured_secs: f64,
    hist: Histogram,
}

impl Totals {
    fn merge(&mut self, o: &Totals) {
        self.replies += o.replies;
        self.sent += o.sent;
        self.lost += o.lost;
        self.late += o.late;
        self.errors += o.errors;
        // Threads measure the same interval: the longest is the run's.
        self.measured_secs = self.measured_secs.max(o.measured_secs);
        self.hist.merge(&o.hist);
    }
}

/// One outstanding-request slot of a socket.
#[derive(Clone, Copy, Default)]
struct Slot {
    seq: u64,
    /// Nanoseconds since the run's start when the request went out; 0 = free.
    sent_ns: u64,
}

struct Client {
    socket: Socket,
    slots: Vec<Slot>,
    next_seq: u64,
}

fn run_thread(
    sockets: Vec<Socket>,
    args: &Args,
    start: Instant,
    measure_from: Instant,
    stop_at: Instant,
    max_replies: u64,
) -> io::Result<Totals> {
    let epoll = Epoll::new()?;
    let mut clients: Vec<Client> = Vec::with_capacity(sockets.len());
    for (k, socket) in sockets.into_iter().enumerate() {
        epoll.add(socket.as_raw_fd(), libc::EPOLLIN as u32, k as u64)?;
        clients.push(Client {
            socket,
            slots: vec![Slot::default(); args.window],
            next_seq: 1,
        });
    }
    let mut t = Totals::default();
    let mut batch = Batch::new(args.window, false);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; clients.len().min(1024)];
    let timeout_ns = args.timeout_ms.max(1) * 1_000_000;
    let measure_ns = (measure_from - start).as_nanos() as u64;
    let mut measuring = false;
    let mut measured_at = measure_from;
    let mut next_scan = 0u64;
    for c in clients.iter_mut() {
        refill(c, &mut batch, now_ns(start), args.payload, &mut t, false);
    }
    loop {
        let now = Instant::now();
        if now >= stop_at || (measuring && t.replies >= max_replies) {
            break;
        }
        if !measuring && now >= measure_from {
            measuring = true;
            measured_at = now;
        }
        let ready = epoll.wait_timeout(&mut events, 5)?;
        let now_ns = now_ns(start);
        for ev in &events[..ready] {
            let c = &mut clients[ev.u64 as usize];
            receive(c, &mut batch, now_ns, measure_ns, &mut t)?;
            refill(c, &mut batch, now_ns, args.payload, &mut t, measuring);
        }
        if now_ns >= next_scan {
            // Expire requests whose reply is overdue, and refill every free slot (also those a
            // full send buffer left free).
            next_scan = now_ns + timeout_ns / 4;
            for c in clients.iter_mut() {
                for s in c.slots.iter_mut() {
                    if s.sent_ns != 0 && now_ns - s.sent_ns > timeout_ns {
                        if s.sent_ns >= measure_ns {
                            t.lost += 1;
                        }
                        *s = Slot::default();
                    }
                }
                refill(c, &mut batch, now_ns, args.payload, &mut t, measuring);
            }
        }
    }
    t.measured_secs = if measuring {
        measured_at.elapsed().as_secs_f64()
    } else {
        0.0
    };
    Ok(t)
}

fn now_ns(start: Instant) -> u64 {
    // Never 0, which marks a free slot.
    (start.elapsed().as_nanos() as u64).max(1)
}

/// Takes every queued reply of `c`, frees the slots they answer, records their latency.
fn receive(
    c: &mut Client,
    batch: &mut Batch,
    now_ns: u64,
    measure_ns: u64,
    t: &mut Totals,
) -> io::Result<()> {
    let fd = c.socket.as_raw_fd();
    loop {
        let n = match batch.recv(fd, libc::MSG_DONTWAIT) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // ICMP port unreachable from an earlier send (target not up yet, or gone).
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                t.errors += 1;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for i in 0..n {
            let d = batch.buf(i);
            if d.len() < HEADER {
                t.errors += 1;
                continue;
            }
            let slot = u32::from_le_bytes(d[0..4].try_into().expect("4 bytes")) as usize;
            let seq = u64::from_le_bytes(d[4..12].try_into().expect("8 bytes"));
            match c.slots.get_mut(slot) {
                Some(s) if s.sent_ns != 0 && s.seq == seq => {
                    if s.sent_ns >= measure_ns {
                        t.replies += 1;
                        t.hist.record_us(now_ns.saturating_sub(s.sent_ns) / 1000);
                    }
                    *s = Slot::default();
                }
                Some(_) => t.late += 1,
                None => t.errors += 1,
            }
        }
        if n < batch.capacity() {
            return Ok(());
        }
    }
}

/// Sends a new request in every free slot of `c`, in one `sendmmsg`.
fn refill(
    c: &mut Client,
    batch: &mut Batch,
    now_ns: u64,
    payload: usize,
    t: &mut Totals,
    measuring: bool,
) {
    let mut n = 0;
    for (k, s) in c.slots.iter().enumerate() {
        if s.sent_ns != 0 {
            continue;
        }
        let buf = batch.slot_mut(n);
        buf[0..4].copy_from_slice(&(k as u32).to_le_bytes());
        buf[4..12].copy_from_slice(&(c.next_seq + n as u64).to_le_bytes());
        buf[HEADER..payload].fill(b'u');
        batch.set_len(n, payload);
        n += 1;
    }
    if n == 0 {
        return;
    }
    let sent = loop {
        match batch.send(c.socket.as_raw_fd(), 0, n, libc::MSG_DONTWAIT) {
            Ok(k) => break k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // Full socket buffer: the slots stay free and are refilled on the next reply or scan.
            Err(e) if e.kind() == ErrorKind::WouldBlock => break 0,
            Err(_) => {
                t.errors += 1;
                break 0;
            }
        }
    };
    // The first `sent` free slots, in the order they were filled above, are now in flight.
    let mut j = 0;
    for s in c.slots.iter_mut() {
        if j == sent {
            break;
        }
        if s.sent_ns == 0 {
            *s = Slot {
                seq: c.next_seq + j as u64,
                sent_ns: now_ns,
            };
            j += 1;
        }
    }
    c.next_seq += n as u64;
    if measuring {
        t.sent += sent as u64;
    }
}
