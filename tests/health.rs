//! Backend health end to end through the real binary (2 workers) on loopback: active probes
//! taking a killed backend out while traffic flows and putting a revived one back, `send` /
//! `expect` probes, every backend down (readiness, connections closed at once), passive
//! ejection after consecutive connect failures, with its doubling, and `on_backend_down`.
//!
//! Timing bounds follow the configured intervals plus a fixed slack; every wait is bounded.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::admin::{http_get, metric, metric_sum, scrape};
use common::*;
use socket2::{Domain, Socket, Type};

const INTERVAL: Duration = Duration::from_millis(200);
const RISE: u32 = 2;
const FALL: u32 = 3;
/// Added to `interval × fall` (or `× rise`) when waiting for a flip.
const SLACK: Duration = Duration::from_secs(1);

/// The active check every test here uses (interval 200ms, timeout 100ms, fall 3, rise 2), with
/// `extra` (e.g. `send`/`expect`) appended, as an inline TOML table.
fn health(extra: &str) -> String {
    format!("{{ interval = \"200ms\", timeout = \"100ms\", rise = {RISE}, fall = {FALL}{extra} }}")
}

/// A round-robin listener "web" over `backends` with the active check. Passive ejection is off:
/// with it on, the refused connects that follow a kill eject the backend before the probes
/// notice, and these tests would no longer show what the active check does.
fn checked_listener(backends: &[SocketAddr], extra: &str) -> Listener {
    backends
        .iter()
        .fold(listener("web"), |l, a| l.backend(*a))
        .set("health", &health(extra))
        .set("passive", "{ consecutive_failures = 0 }")
}

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin endpoint line; stderr:\n{}", lb.stderr_tail(20)))
}

/// The first stderr line from index `mark` on that contains `needle`.
fn log_line(lb: &Lb, mark: usize, needle: &str) -> String {
    lb.stderr_lines()
        .into_iter()
        .skip(mark)
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| {
            panic!(
                "no log line with {needle:?}; stderr:\n{}",
                lb.stderr_tail(30)
            )
        })
}

/// Waits for a log line (from `mark` on) containing `needle` until `deadline`; panics with the
/// stderr tail if none comes. Returns the line.
fn await_log(lb: &Lb, mark: usize, needle: &str, deadline: Instant, what: &str) -> String {
    let left = deadline.saturating_duration_since(Instant::now());
    assert!(
        lb.wait_for_log_since(mark, needle, left),
        "{what}: no log line with {needle:?} in time; stderr tail:\n{}",
        lb.stderr_tail(30)
    );
    log_line(lb, mark, needle)
}

/// A loopback backend for these tests. Unlike the harness servers it can bind a given port (a
/// revived backend must come back where the LB expects it), and it tells health probes from
/// proxied connections: a proxied connection carries the client's bytes first, while a probe
/// sends nothing (plain connect) or `PING` (send/expect). Proxied connections are echoed; a
/// `PING` gets `probe_reply`. Dropping it closes the listening socket (the port then refuses)
/// and joins every thread, propagating panics.
struct Backend {
    addr: SocketAddr,
    shared: Arc<BackendShared>,
    accept: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct BackendShared {
    stop: AtomicBool,
    /// Close the listening socket (probes are refused) but keep serving open connections.
    refuse: AtomicBool,
    /// Proxied (non-probe) connections.
    served: AtomicUsize,
    probes: AtomicUsize,
    errors: Mutex<Vec<String>>,
    /// Each connection's thread and a clone of its socket (to unblock it on drop).
    conns: Mutex<Vec<(JoinHandle<()>, TcpStream)>>,
}

impl Backend {
    /// An echo backend on a fresh port.
    fn echo() -> Backend {
        Backend::start(SocketAddr::from(([127, 0, 0, 1], 0)), b"")
    }

    /// Binds `addr` (with `SO_REUSEADDR`, retried for up to 3 s: a connection may briefly hold
    /// the port as its source port) and serves; `probe_reply` answers a `PING`.
    fn start(addr: SocketAddr, probe_reply: &'static [u8]) -> Backend {
        let deadline = Instant::now() + Duration::from_secs(3);
        let listener = loop {
            match bind_reuse(addr) {
                Ok(l) => break l,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().expect("local_addr");
        listener.set_nonblocking(true).expect("set_nonblocking");
        let shared = Arc::new(BackendShared::default());
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("backend-{}-accept", addr.port()))
            .spawn(move || accept_loop(listener, sh, probe_reply))
            .expect("spawn accept thread");
        Backend {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn served(&self) -> usize {
        self.shared.served.load(Ordering::SeqCst)
    }

    /// Closes the listening socket, so that its port refuses connects (and health probes fail),
    /// while the connections it accepted go on being served.
    fn stop_listening(&self) {
        self.shared.refuse.store(true, Ordering::SeqCst);
    }

    fn probes(&self) -> usize {
        self.shared.probes.load(Ordering::SeqCst)
    }

    fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().unwrap().clone()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut panics = Vec::new();
        // The accept thread owns the listener: once it is joined the socket is closed.
        if let Err(p) = accept.join() {
            panics.push(p);
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for (_, s) in &conns {
            let _ = s.shutdown(Shutdown::Both);
        }
        for (t, _) in conns {
            if let Err(p) = t.join() {
                panics.push(p);
            }
        }
        if let Some(p) = panics.into_iter().next() {
            if !std::thread::panicking() {
                std::panic::resume_unwind(p);
            }
        }
    }
}

fn bind_reuse(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn accept_loop(listener: TcpListener, shared: Arc<BackendShared>, probe_reply: &'static [u8]) {
    // Returning drops the listener: its port refuses from then on.
    while !shared.stop.load(Ordering::SeqCst) && !shared.refuse.load(Ordering::SeqCst) {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("backend {:?}: accept: {e}", listener.local_addr()),
        };
        stream.set_nonblocking(false).expect("set_nonblocking");
        set_timeouts(&stream);
        let clone = stream.try_clone().expect("try_clone");
        let sh = shared.clone();
        let t = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut stream = stream;
                if let Err(e) = serve(&mut stream, &sh, probe_reply) {
                    sh.errors.lock().unwrap().push(format!("{peer}: {e}"));
                }
            })
            .expect("spawn connection thread");
        shared.conns.lock().unwrap().push((t, clone));
    }
}

fn serve(s: &mut TcpStream, shared: &BackendShared, probe_reply: &[u8]) -> io::Result<()> {
    let mut buf = vec![0; 16 * 1024];
    let n = s.read(&mut buf)?;
    if n == 0 {
        shared.probes.fetch_add(1, Ordering::SeqCst);
        return Ok(());
    }
    if buf[..n].starts_with(b"PING") {
        shared.probes.fetch_add(1, Ordering::SeqCst);
        return s.write_all(probe_reply);
    }
    shared.served.fetch_add(1, Ordering::SeqCst);
    s.write_all(&buf[..n])?;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return s.shutdown(Shutdown::Write),
            Ok(n) => s.write_all(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Waits (up to 2 s) until a connect to `addr` is refused: the backend's listening socket is
/// really closed. It can outlive our close by a moment: a `ringlb` being spawned by a
/// concurrent test holds a copy of every fd between its fork and its exec.
fn assert_refuses(addr: SocketAddr) {
    let mut last = None;
    let refused = wait_until(Duration::from_secs(2), || match TcpStream::connect_timeout(
        &addr,
        Duration::from_secs(1),
    ) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => true,
        other => {
            last = Some(format!("{other:?}"));
            false
        }
    });
    assert!(
        refused,
        "connect to killed backend {addr}: expected refused, last got {last:?}"
    );
}

/// One short echo connection through the LB: 64 bytes (not starting with `PING`), half-close,
/// the same 64 bytes back, then EOF.
fn echo_once(lb: SocketAddr, seed: u64) -> io::Result<()> {
    let mut s = try_connect(lb)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut out = Pattern::bytes(seed, 64);
    out[0] = b'x';
    s.write_all(&out)?;
    s.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    if back != out {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("echo mismatch: sent 64 bytes, got {} back", back.len()),
        ));
    }
    Ok(())
}

/// `n` sequential echo connections; panics on the first failure.
fn echo_n(lb: SocketAddr, n: usize, seed: u64) {
    for i in 0..n {
        let seed = seed + i as u64;
        echo_once(lb, seed).unwrap_or_else(|e| panic!("echo #{i} (seed {seed:#x}) via {lb}: {e}"));
    }
}

/// When a client connection started and how it ended.
type Outcome = (Instant, Result<(), String>);

/// A client thread making short echo connections back to back (paced by 3 ms), until stopped,
/// for at most 30 s or 20,000 connections. Each connection holds a read lock of `gate`, so
/// [`Traffic::quiesce`] can wait until none is in flight.
struct Traffic {
    stop: Arc<AtomicBool>,
    gate: Arc<RwLock<()>>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    fn start(lb: SocketAddr, seed: u64) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(RwLock::new(()));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (st, g, out) = (stop.clone(), gate.clone(), outcomes.clone());
        let thread = std::thread::Builder::new()
            .name("traffic".into())
            .spawn(move || {
                let t0 = Instant::now();
                for i in 0..20_000u64 {
                    if st.load(Ordering::SeqCst) || t0.elapsed() > Duration::from_secs(30) {
                        break;
                    }
                    let guard = g.read().unwrap();
                    let started = Instant::now();
                    let r = echo_once(lb, seed + i).map_err(|e| format!("connection #{i}: {e}"));
                    drop(guard);
                    out.lock().unwrap().push((started, r));
                    std::thread::sleep(Duration::from_millis(3));
                }
            })
            .expect("spawn traffic thread");
        Traffic {
            stop,
            gate,
            outcomes,
            thread: Some(thread),
        }
    }

    /// Blocks new connections and waits for the one in flight; traffic resumes on drop.
    fn quiesce(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap()
    }

    /// Connections started at or after `t`: (succeeded, failed).
    fn counts_since(&self, t: Instant) -> (usize, usize) {
        let o = self.outcomes.lock().unwrap();
        let mine = o.iter().filter(|(s, _)| *s >= t);
        mine.fold((0, 0), |(ok, bad), (_, r)| match r {
            Ok(()) => (ok + 1, bad),
            Err(_) => (ok, bad + 1),
        })
    }

    /// Stops the thread and returns every outcome.
    fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
        std::mem::take(&mut *self.outcomes.lock().unwrap())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Kills `victim` (closes its listener and its connections) and checks its port refuses.
/// Returns the kill time.
fn kill(victim: Backend) -> Instant {
    let addr = victim.addr();
    drop(victim);
    let t = Instant::now();
    assert_refuses(addr);
    t
}

fn errors_to(s: &prometheus_parse::Scrape, backend: SocketAddr) -> f64 {
    let b = backend.to_string();
    metric_sum(
        s,
        "ringlb_connect_errors_total",
        &[("listener", "web"), ("backend", &b)],
    )
}

fn connections_to(s: &prometheus_parse::Scrape, backend: SocketAddr) -> f64 {
    let b = backend.to_string();
    let labels = [("listener", "web"), ("backend", b.as_str())];
    metric(s, "ringlb_connections_total", &labels).expect("ringlb_connections_total sample")
}

fn backend_up(s: &prometheus_parse::Scrape, backend: SocketAddr) -> f64 {
    let b = backend.to_string();
    let labels = [("listener", "web"), ("backend", b.as_str())];
    metric(s, "ringlb_backend_up", &labels).expect("ringlb_backend_up sample")
}

/// Waits (up to 1 s) until `ringlb_backend_up{backend}` reads `up`, i.e. the snapshot that a
/// flip's log line announces is published (ringlb logs flips and `published generation` just
/// before it stores the new snapshot). Returns that scrape.
fn await_published(admin: SocketAddr, backend: SocketAddr, up: bool) -> prometheus_parse::Scrape {
    let want = if up { 1.0 } else { 0.0 };
    let mut s = scrape(admin);
    let ok = wait_until(Duration::from_secs(1), || {
        s = scrape(admin);
        backend_up(&s, backend) == want
    });
    assert!(
        ok,
        "ringlb_backend_up{{backend=\"{backend}\"}} is not {want} 1 s after the flip's log line"
    );
    s
}

#[test]
fn killed_backend_is_marked_down_and_skipped_while_traffic_flows() {
    let mut backends: Vec<Backend> = (0..3).map(|_| Backend::echo()).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(Backend::addr).collect();
    let lb = Lb::start(&ringlb_config([checked_listener(&addrs, "")]));
    let admin = admin(&lb);
    let traffic = Traffic::start(lb.addr("web"), 0x4e41_0001);
    assert!(
        wait_until(Duration::from_secs(5), || backends
            .iter()
            .all(|b| b.served() >= 3)),
        "traffic did not reach every backend: served {:?}",
        backends.iter().map(Backend::served).collect::<Vec<_>>()
    );

    // Killed with no client connection in flight: killing an established connection is a
    // failure no load balancer can hide, and this test is about new connections.
    let victim = backends.pop().expect("three backends");
    let dead = victim.addr();
    let mark = lb.log_len();
    let quiet = traffic.quiesce();
    let served_by_dead = victim.served();
    let t_kill = kill(victim);
    drop(quiet);
    let budget = INTERVAL * FALL + SLACK;
    let down = format!("listener \"web\": backend {dead} is DOWN");
    let line = await_log(&lb, mark, &down, t_kill + budget, "kill → DOWN");
    let t_down = Instant::now();
    eprintln!("DOWN {:?} after the kill: {line}", t_down - t_kill);
    let at_line = scrape(admin);
    let at_down = await_published(admin, dead, false);
    eprintln!(
        "connect attempts to {dead} between the DOWN line and the published snapshot: {}",
        errors_to(&at_down, dead) - errors_to(&at_line, dead)
    );

    // One more second of traffic with the backend down.
    std::thread::sleep(Duration::from_secs(1));
    let after = traffic.counts_since(t_down);
    let end = scrape(admin);
    let outcomes = traffic.finish();

    let failures: Vec<&String> = outcomes
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} client connections failed (retry should hide refusals), first: {:?}",
        failures.len(),
        outcomes.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(after.1, 0, "connections failed after the DOWN line");
    assert!(
        after.0 >= 20,
        "only {} connections after DOWN: traffic too slow",
        after.0
    );
    assert!(
        errors_to(&at_down, dead) >= 1.0,
        "no refused connect to {dead} between kill and DOWN: the retry path was not exercised"
    );
    assert_eq!(
        (errors_to(&end, dead), connections_to(&end, dead)),
        (errors_to(&at_down, dead), connections_to(&at_down, dead)),
        "connect attempts to {dead} (errors, successes) after it was marked DOWN"
    );
    assert_eq!(backend_up(&end, dead), 0.0);
    for b in &backends {
        assert_eq!(backend_up(&end, b.addr()), 1.0, "survivor {}", b.addr());
    }
    // Every successful client connection was served by some backend, the dead one only before
    // it died.
    let served: usize = served_by_dead + backends.iter().map(Backend::served).sum::<usize>();
    assert_eq!(
        served,
        outcomes.len(),
        "backend-side count vs client successes"
    );
    for b in &backends {
        assert_eq!(b.errors(), Vec::<String>::new(), "backend {}", b.addr());
    }
}

#[test]
fn revived_backend_comes_back_up_and_gets_traffic() {
    let a = Backend::echo();
    let b = Backend::echo();
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let lb = Lb::start(&ringlb_config([checked_listener(&[a_addr, b_addr], "")]));
    let web = lb.addr("web");
    echo_n(web, 4, 0x4e41_0100);
    assert_eq!(
        (a.served(), b.served()),
        (2, 2),
        "round robin before the kill"
    );

    let mark = lb.log_len();
    let t_kill = kill(b);
    let down = format!("backend {b_addr} is DOWN");
    await_log(&lb, mark, &down, t_kill + INTERVAL * FALL + SLACK, "DOWN");
    await_published(admin(&lb), b_addr, false);
    echo_n(web, 6, 0x4e41_0200);
    assert_eq!(
        a.served(),
        2 + 6,
        "with one backend down all go to the other"
    );

    let mark = lb.log_len();
    let revived = Backend::start(b_addr, b"");
    let t_revive = Instant::now();
    let up = format!("listener \"web\": backend {b_addr} is UP");
    let line = await_log(&lb, mark, &up, t_revive + INTERVAL * RISE + SLACK, "UP");
    eprintln!("UP {:?} after the revive: {line}", t_revive.elapsed());
    await_published(admin(&lb), b_addr, true);
    // The probe's connect completes in the kernel; the accept thread may count it a bit later.
    assert!(
        wait_until(Duration::from_secs(1), || revived.probes() >= RISE as usize),
        "UP after {} probes, rise is {RISE}",
        revived.probes()
    );

    echo_n(web, 20, 0x4e41_0300);
    assert!(
        revived.served() >= 8,
        "revived backend served {} of 20 connections after UP (round robin over 2)",
        revived.served()
    );
    assert_eq!(a.served() + revived.served(), 8 + 20);
    let s = scrape(admin(&lb));
    assert_eq!(backend_up(&s, b_addr), 1.0);
    let b = b_addr.to_string();
    let flips = [("listener", "web"), ("backend", b.as_str())];
    assert_eq!(metric(&s, "ringlb_health_flips_total", &flips), Some(2.0));
    assert_eq!(revived.errors(), Vec::<String>::new());
}

#[test]
fn send_expect_probe_takes_out_the_backend_with_the_wrong_reply() {
    let good = Backend::start(SocketAddr::from(([127, 0, 0, 1], 0)), b"+PONG\r\n");
    let bad = Backend::start(SocketAddr::from(([127, 0, 0, 1], 0)), b"-ERR wrong\r\n");
    let extra = r#", send = "PING\r\n", expect = "+PONG""#;
    let lb = Lb::start(&ringlb_config([checked_listener(
        &[good.addr(), bad.addr()],
        extra,
    )]));
    let t0 = Instant::now();
    let down = format!("listener \"web\": backend {} is DOWN", bad.addr());
    // Probes start within one interval of start-up, then `fall` of them must fail.
    let deadline = t0 + INTERVAL * (FALL + 1) + SLACK;
    let line = await_log(&lb, 0, &down, deadline, "bad reply → DOWN");
    eprintln!("{line}");
    let reason = line.split_once(" is DOWN: ").map_or("", |(_, r)| r);
    assert!(
        reason.contains("expected") && reason.contains("got") && reason.contains("-ERR"),
        "DOWN reason should say what was expected and what came: {line:?}"
    );
    await_published(admin(&lb), bad.addr(), false);

    echo_n(lb.addr("web"), 20, 0x4e41_0400);
    assert_eq!(
        good.served(),
        20,
        "every connection goes to the good backend"
    );
    assert_eq!(
        bad.served(),
        0,
        "the backend that answers -ERR gets no traffic"
    );
    assert!(good.probes() >= 2 && bad.probes() >= FALL as usize);
    assert!(
        !lb.stderr_lines()
            .iter()
            .any(|l| l.contains(&format!("backend {} is DOWN", good.addr()))),
        "the good backend went down; stderr:\n{}",
        lb.stderr_tail(20)
    );
    let s = scrape(admin(&lb));
    let (g, b) = (good.addr().to_string(), bad.addr().to_string());
    let checks = |addr: &str, result: &str| {
        let labels = [("listener", "web"), ("backend", addr), ("result", result)];
        metric(&s, "ringlb_health_checks_total", &labels).expect("health checks sample")
    };
    // "Stays up" is the contract: no flip. A single probe may still time out (100 ms) on a
    // loaded machine, so failed probes of the good backend are reported, not asserted.
    eprintln!(
        "good backend: {} probes succeeded, {} failed",
        checks(&g, "success"),
        checks(&g, "failure")
    );
    assert!(checks(&g, "success") >= 2.0);
    let flips = [("listener", "web"), ("backend", g.as_str())];
    assert_eq!(metric(&s, "ringlb_health_flips_total", &flips), Some(0.0));
    assert!(checks(&b, "failure") >= f64::from(FALL));
    assert_eq!(backend_up(&s, good.addr()), 1.0);
    assert_eq!(backend_up(&s, bad.addr()), 0.0);
    assert_eq!(good.errors(), Vec::<String>::new());
}

#[test]
fn all_backends_down_closes_clients_at_once_and_fails_readiness() {
    let a = Backend::echo();
    let b = Backend::echo();
    let (a_addr, b_addr) = (a.addr(), b.addr());
    let lb = Lb::start(&ringlb_config([checked_listener(&[a_addr, b_addr], "")]));
    let admin = admin(&lb);
    let web = lb.addr("web");
    assert_eq!(http_get(admin, "/readyz"), (200, "ready\n".to_string()));

    let mark = lb.log_len();
    let t_kill = kill(a);
    kill(b);
    let deadline = t_kill + INTERVAL * FALL + SLACK;
    await_log(&lb, mark, "(0/2 backends up)", deadline, "both DOWN");
    for addr in [a_addr, b_addr] {
        log_line(&lb, mark, &format!("backend {addr} is DOWN"));
        await_published(admin, addr, false);
    }

    let (status, body) = http_get(admin, "/readyz");
    assert_eq!(status, 503, "/readyz with every backend down: {body}");
    assert!(
        body.contains("listener \"web\": no healthy backend (0/2 up: 2 down)"),
        "/readyz reason: {body:?}"
    );
    let (status, body) = http_get(admin, "/livez");
    assert_eq!((status, body.trim()), (200, "ok"));

    let before = scrape(admin);
    let no_backend = |s: &prometheus_parse::Scrape| {
        metric(s, "ringlb_no_backend_total", &[("listener", "web")]).expect("no_backend sample")
    };
    let closes = |s: &prometheus_parse::Scrape| {
        let labels = [("listener", "web"), ("reason", "no_backend")];
        metric(s, "ringlb_closes_total", &labels).expect("closes sample")
    };
    let mut s = connect(web);
    let t0 = Instant::now();
    let _ = s.write_all(b"hello");
    let end = wait_stream_end(&mut s, Duration::from_secs(1));
    assert!(
        matches!(end, Ok(StreamEnd::Eof | StreamEnd::Reset)),
        "client with no backend up: expected EOF or reset within 1 s, got {end:?} after {:?}",
        t0.elapsed()
    );
    let mut after = scrape(admin);
    wait_until(Duration::from_secs(2), || {
        after = scrape(admin);
        no_backend(&after) > no_backend(&before)
    });
    assert_eq!(no_backend(&after), no_backend(&before) + 1.0);
    assert_eq!(closes(&after), closes(&before) + 1.0);

    let mark = lb.log_len();
    let revived = Backend::start(a_addr, b"");
    let up = format!("backend {a_addr} is UP");
    await_log(
        &lb,
        mark,
        &up,
        Instant::now() + INTERVAL * RISE + SLACK,
        "UP",
    );
    await_published(admin, a_addr, true);
    let mut ready = (0, String::new());
    wait_until(Duration::from_secs(1), || {
        ready = http_get(admin, "/readyz");
        ready.0 == 200
    });
    assert_eq!(
        ready,
        (200, "ready\n".to_string()),
        "/readyz after one revived"
    );
    echo_n(web, 3, 0x4e41_0500);
    assert_eq!(revived.served(), 3);
}

#[test]
fn passive_ejection_hides_a_refusing_backend_and_doubles() {
    let echoes: Vec<EchoServer> = (0..3).map(|_| EchoServer::start()).collect();
    let dead = dead_addr();
    let l = echoes
        .iter()
        .fold(listener("web"), |l, e| l.backend(e.addr()))
        .backend(dead)
        .set(
            "passive",
            r#"{ consecutive_failures = 2, base_ejection_time = "2s" }"#,
        );
    let lb = Lb::start(&ringlb_config([l]));
    let admin = admin(&lb);
    let web = lb.addr("web");
    let refused = |s: &prometheus_parse::Scrape| {
        let d = dead.to_string();
        let labels = [
            ("listener", "web"),
            ("backend", d.as_str()),
            ("reason", "refused"),
        ];
        metric(s, "ringlb_connect_errors_total", &labels).expect("connect errors sample")
    };
    let ejected = |n: u32, secs: u32| {
        move |l: &String| {
            l.contains(&format!("backend {dead} ejected for {secs}s after "))
                && l.contains(&format!("(ejection #{n})"))
        }
    };
    let has = |pred: &dyn Fn(&String) -> bool| lb.stderr_lines().iter().any(pred);

    // 40 sequential connections at least, and on until 1 s after the ejection shows.
    let t_start = Instant::now();
    let mut sent = 0u64;
    let mut first: Option<(Instant, f64)> = None;
    while sent < 40 || first.is_none_or(|(t, _)| t.elapsed() < Duration::from_secs(1)) {
        assert!(
            t_start.elapsed() < Duration::from_secs(5),
            "no ejection of {dead} logged after {sent} connections; stderr:\n{}",
            lb.stderr_tail(20)
        );
        echo(web, 64, 0x4e41_0600 + sent);
        sent += 1;
        if first.is_none() && has(&ejected(1, 2)) {
            first = Some((Instant::now(), refused(&scrape(admin))));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (t_eject, refused_at_eject) = first.expect("loop ends after the ejection");
    let refused_1s_later = refused(&scrape(admin));
    assert!(refused_at_eject >= 2.0, "ejected before 2 refusals?");
    assert_eq!(
        refused_1s_later, refused_at_eject,
        "connect attempts to {dead} while it is ejected (1 s of traffic, {sent} connections so far)"
    );

    // After the 2 s ejection it is tried again, refuses twice more, and goes out for 4 s.
    let mut returned: Option<Instant> = None;
    let back = format!("backend {dead} returns from ejection");
    while !has(&ejected(2, 4)) {
        assert!(
            t_eject.elapsed() < Duration::from_secs(5),
            "no second ejection (4s) of {dead}; stderr:\n{}",
            lb.stderr_tail(20)
        );
        echo(web, 64, 0x4e41_0600 + sent);
        sent += 1;
        if returned.is_none() && has(&|l: &String| l.contains(&back)) {
            returned = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let served = returned.map(|t| t - t_eject);
    assert!(
        served.is_some_and(|d| d >= Duration::from_millis(1500) && d <= Duration::from_secs(3)),
        "first ejection ended {served:?} after it began, expected about 2 s"
    );
    let s = scrape(admin);
    assert!(
        refused(&s) >= refused_1s_later + 2.0,
        "retried after the ejection"
    );
    let d = dead.to_string();
    let labels = [("listener", "web"), ("backend", d.as_str())];
    assert_eq!(metric(&s, "ringlb_ejections_total", &labels), Some(2.0));
    let served: usize = echoes.iter().map(|e| e.accepted()).sum();
    assert_eq!(
        served as u64, sent,
        "every connection reached a live backend"
    );
    for e in &echoes {
        assert_eq!(e.errors(), Vec::<String>::new());
    }
}

/// `on_backend_down = "close"` ends the open connections of a backend once it is marked down,
/// and only those; with the default (`"keep"`) they go on. Two listeners over the same two
/// backends, one connection to each backend through each listener; then one backend stops
/// listening (probes refused) while the connections it holds stay up on its side.
#[test]
fn on_backend_down_close_ends_that_backends_connections_and_keep_does_not() {
    let a = Backend::echo();
    let b = Backend::echo();
    let both = [a.addr(), b.addr()];
    let with_policy = |name: &str, policy: &str| {
        both.iter()
            .fold(listener(name), |l, addr| l.backend(*addr))
            .set("health", &health(""))
            .set("passive", "{ consecutive_failures = 0 }")
            .set("on_backend_down", &format!("\"{policy}\""))
    };
    let lb = Lb::start(&ringlb_config([
        with_policy("close", "close"),
        with_policy("keep", "keep"),
    ]));
    let admin = admin(&lb);
    // Round robin: of two connections per listener, one goes to each backend.
    let mut conns: Vec<(&str, TcpStream)> = Vec::new();
    for (i, name) in ["close", "close", "keep", "keep"].into_iter().enumerate() {
        let mut s = connect(lb.addr(name));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        ping(&mut s, 64, i as u64);
        conns.push((name, s));
    }
    assert_eq!(
        (a.served(), b.served()),
        (2, 2),
        "one connection per backend per listener"
    );

    let mark = lb.log_len();
    b.stop_listening();
    assert_refuses(b.addr());
    let deadline = Instant::now() + INTERVAL * FALL + SLACK;
    for name in ["close", "keep"] {
        let down = format!("listener \"{name}\": backend {} is DOWN", b.addr());
        await_log(&lb, mark, &down, deadline, "stop listening → DOWN");
    }

    // Within a scan period or two of the flip: exactly the "close" listener's connection to b
    // ends; its connection to a, and both of "keep", stay silent and still echo.
    let mut ended = Vec::new();
    for (i, (name, s)) in conns.iter_mut().enumerate() {
        match wait_stream_end(s, Duration::from_millis(1500)) {
            Ok(end) => ended.push((*name, end)),
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ),
                    "{name} connection {i}: {e}"
                );
                ping(s, 64, 100 + i as u64);
            }
        }
    }
    assert_eq!(ended.len(), 1, "connections ended: {ended:?}");
    assert_eq!(ended[0].0, "close", "connections ended: {ended:?}");
    let s = scrape(admin);
    let closed = |l: &str| {
        metric(
            &s,
            "ringlb_closes_total",
            &[("listener", l), ("reason", "backend_down")],
        )
        .expect("ringlb_closes_total{reason=\"backend_down\"}")
    };
    assert_eq!((closed("close"), closed("keep")), (1.0, 0.0));
    assert!(a.errors().is_empty(), "backend a: {:?}", a.errors());
    // The cut connection is reset on both legs (a FIN would look like a complete stream).
    let errs = b.errors();
    assert!(
        errs.len() == 1 && errs[0].contains("reset"),
        "backend b should see exactly the cut connection's reset: {errs:?}"
    );
}
