//! Connection load generator for `scripts/bench.sh`; prints one JSON line per phase on stdout.
//!
//! - `rate`: `--concurrency` threads each loop connect → write `--payload` bytes → read as many
//!   back → close, until `--duration-secs` pass or `--max-conns` connections were attempted.
//!   Latency (connect start to last response byte) goes into a fixed log-linear histogram, so the
//!   hot loop allocates nothing per sample.
//!   `{"conns":..,"errors":..,"secs":..,"rate":..,"p50_us":..,"p90_us":..,"p99_us":..}`
//! - `idle`: open `--max-conns` connections, echo 16 bytes on each and check them, print
//!   `{"opened":..,"failed":..}`, hold them until a line arrives on stdin (EOF does not count) or
//!   `--duration-secs` pass, then check that each still echoes 16 bytes and print
//!   `{"still_echoing":..,"failed":..}`. The target must echo (bench_backend `--mode echo`).
//!
//! Clients bind source addresses 127.0.0.2..=127.0.0.254 round-robin with
//! `IP_BIND_ADDRESS_NO_PORT`, so ports are picked per 4-tuple at connect time and TIME_WAIT from
//! closing first does not exhaust the ephemeral range. Targets outside 127.0.0.0/8 are refused,
//! and every loop is bounded in time and count.

use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use histogram::Histogram;
use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Short connections as fast as possible.
    Rate,
    /// Many long-lived idle connections.
    Idle,
}

#[derive(Parser, Debug)]
#[command(about = "Connection-rate and idle-connection load generator (loopback only)")]
struct Args {
    /// Address to connect to; must be in 127.0.0.0/8.
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, value_enum, default_value_t = Mode::Rate)]
    mode: Mode,
    /// Client threads in `rate` mode.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// `rate`: run time. `idle`: longest hold before the final check.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// `rate`: most connections attempted. `idle`: connections to open.
    #[arg(long, default_value_t = 1_000_000)]
    max_conns: u64,
    /// Request and response size in `rate` mode, bytes (`idle` always uses 16).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// How many source addresses from 127.0.0.2 up to use (at most 253); 0 binds none.
    #[arg(long, default_value_t = 253)]
    source_ips: u8,
}

#[path = "support/histogram.rs"]
mod histogram;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the idle mode spends opening, or checking, all of its connections.
const IDLE_PHASE_LIMIT: Duration = Duration::from_secs(120);
const IDLE_MSG: usize = 16;

fn main() -> ExitCode {
    let args = Args::parse();
    let IpAddr::V4(ip) = args.target.ip() else {
        eprintln!("connrate: target {} must be IPv4 loopback", args.target);
        return ExitCode::from(2);
    };
    if !ip.is_loopback() {
        eprintln!("connrate: refusing target {}: loopback only", args.target);
        return ExitCode::from(2);
    }
    raise_nofile_limit();
    let sources = Sources::new(args.source_ips);
    match args.mode {
        Mode::Rate => run_rate(&args, &sources),
        Mode::Idle => run_idle(&args, &sources),
    }
    ExitCode::SUCCESS
}

fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Round-robin source addresses 127.0.0.2, 127.0.0.3, ...
#[derive(Clone, Copy)]
struct Sources {
    count: u8,
}

impl Sources {
    fn new(count: u8) -> Self {
        Self {
            count: count.min(253),
        }
    }

    fn get(&self, n: u64) -> Option<SocketAddr> {
        if self.count == 0 {
            return None;
        }
        let last = 2 + (n % u64::from(self.count)) as u8;
        Some(SocketAddr::new(Ipv4Addr::new(127, 0, 0, last).into(), 0))
    }
}

fn connect(target: SocketAddr, source: Option<SocketAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(source) = source {
        // Pick the port at connect() time from the full 4-tuple, not at bind() time from the
        // source address alone: otherwise each source address is limited to the port range.
        setsockopt(&socket, IpBindAddressNoPort, &true)?;
        socket.bind(&source.into())?;
    }
    socket.connect_timeout(&target.into(), CONNECT_TIMEOUT)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(socket.into())
}

// ---------------------------------------------------------------------------------------------
// rate

fn run_rate(args: &Args, sources: &Sources) {
    let threads = args.concurrency.max(1);
    let attempted = AtomicU64::new(0);
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(args.duration_secs);
    let mut total = RateResult::default();
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|id| {
                let attempted = &attempted;
                s.spawn(move || rate_worker(id as u64, args, sources, stop_at, attempted))
            })
            .collect();
        for w in workers {
            // A panicking worker is a bug in this tool: let it take the run down.
            let r = w.join().expect("rate worker panicked");
            total.merge(&r);
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let rate = total.conns as f64 / secs.max(1e-9);
    println!(
        "{{\"conns\":{},\"errors\":{},\"secs\":{:.3},\"rate\":{:.1},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{}}}",
        total.conns,
        total.errors,
        secs,
        rate,
        total.hist.quantile(0.50),
        total.hist.quantile(0.90),
        total.hist.quantile(0.99),
    );
}

#[derive(Default)]
struct RateResult {
    conns: u64,
    errors: u64,
    hist: Histogram,
}

impl RateResult {
    fn merge(&mut self, other: &RateResult) {
        self.conns += other.conns;
        self.errors += other.errors;
        self.hist.merge(&other.hist);
    }
}

fn rate_worker(
    id: u64,
    args: &Args,
    sources: &Sources,
    stop_at: Instant,
    attempted: &AtomicU64,
) -> RateResult {
    let mut out = RateResult::default();
    let request = vec![b'q'; args.payload];
    let mut response = vec![0u8; args.payload];
    let mut n = id;
    let mut reported = false;
    while Instant::now() < stop_at && attempted.fetch_add(1, Ordering::Relaxed) < args.max_conns {
        let source = sources.get(n);
        n += args.concurrency as u64;
        let t0 = Instant::now();
        match one_exchange(args.target, source, &request, &mut response) {
            Ok(()) => {
                out.conns += 1;
                out.hist.record(t0.elapsed());
            }
            Err(e) => {
                out.errors += 1;
                if !reported {
                    eprintln!("connrate: thread {id}: first error: {e}");
                    reported = true;
                }
                // A dead target fails instantly; do not turn that into a busy loop.
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    out
}

fn one_exchange(
    target: SocketAddr,
    source: Option<SocketAddr>,
    request: &[u8],
    response: &mut [u8],
) -> io::Result<()> {
    let mut stream = connect(target, source)?;
    stream.write_all(request)?;
    stream.read_exact(response)?;
    // Close first (plain close, no linger tricks): TIME_WAIT stays on this side.
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// idle

fn run_idle(args: &Args, sources: &Sources) {
    let wanted = args.max_conns;
    let mut conns: Vec<(u64, TcpStream)> = Vec::with_capacity(wanted.min(1 << 20) as usize);
    let mut failed = 0u64;
    let mut first_error: Option<String> = None;
    let open_deadline = Instant::now() + IDLE_PHASE_LIMIT;
    for i in 0..wanted {
        if Instant::now() >= open_deadline {
            failed += wanted - i;
            eprintln!("connrate: idle: gave up opening after {IDLE_PHASE_LIMIT:?}");
            break;
        }
        match open_idle(args.target, sources.get(i), i) {
            Ok(s) => conns.push((i, s)),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    if let Some(e) = first_error.take() {
        eprintln!("connrate: idle: first error while opening: {e}");
    }
    println!(
        "{{\"opened\":{},\"failed\":{}}}",
        conns.len() as u64,
        failed
    );
    let _ = io::stdout().flush();

    wait_for_line_or(Duration::from_secs(args.duration_secs));

    let still = check_all(&mut conns, &mut first_error);
    if let Some(e) = first_error {
        eprintln!("connrate: idle: first error while checking: {e}");
    }
    println!(
        "{{\"still_echoing\":{},\"failed\":{}}}",
        still,
        conns.len() as u64 - still
    );
    let _ = io::stdout().flush();
}

/// 16 bytes naming the connection and the phase, so a crossed wire is caught, not just silence.
fn idle_message(i: u64, phase: u64) -> [u8; IDLE_MSG] {
    let mut m = [0u8; IDLE_MSG];
    let text = format!("{:012x}{:04x}", i, phase & 0xffff);
    m.copy_from_slice(text.as_bytes());
    m
}

fn open_idle(target: SocketAddr, source: Option<SocketAddr>, i: u64) -> io::Result<TcpStream> {
    let mut s = connect(target, source)?;
    let msg = idle_message(i, 0);
    s.write_all(&msg)?;
    let mut back = [0u8; IDLE_MSG];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::other("echo mismatch"));
    }
    Ok(s)
}

/// Returns when a line arrives on stdin or after `limit`. EOF on stdin is not a line: a tool
/// started with stdin closed still holds for the full `limit`.
fn wait_for_line_or(limit: Duration) {
    let (tx, rx) = mpsc::channel();
    // Detached: it may stay blocked in read() until the process exits, which is fine.
    thread::spawn(move || {
        let mut line = String::new();
        if let Ok(n) = io::stdin().lock().read_line(&mut line) {
            if n > 0 {
                let _ = tx.send(());
                return;
            }
        }
        // EOF or error: keep the sender alive so recv_timeout waits out the limit.
        thread::sleep(limit);
    });
    let _ = rx.recv_timeout(limit);
}

/// Writes to every connection first, then reads every answer, within one overall deadline, so
/// a stalled path costs at most the deadline instead of a timeout per connection.
fn check_all(conns: &mut [(u64, TcpStream)], first_error: &mut Option<String>) -> u64 {
    let deadline = Instant::now() + IDLE_PHASE_LIMIT.min(Duration::from_secs(30));
    let mut written = vec![false; conns.len()];
    for (k, (i, s)) in conns.iter_mut().enumerate() {
        match s.write_all(&idle_message(*i, 1)) {
            Ok(()) => written[k] = true,
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let mut ok = 0;
    for (k, (i, s)) in conns.iter_mut().enumerate() {
        if !written[k] {
            continue;
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let _ = s.set_read_timeout(Some(left));
        let mut back = [0u8; IDLE_MSG];
        match s.read_exact(&mut back) {
            Ok(()) if back == idle_message(*i, 1) => ok += 1,
            Ok(()) => {
                first_error.get_or_insert_with(|| "echo mismatch".to_string());
            }
            Err(e) => {
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    ok
}
