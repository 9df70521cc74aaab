//! Tests of the [`Prober`] (and the scheduler driving it) over real loopback sockets: bound to
//! `127.0.0.1:0`, every blocking read and accept with a timeout, helper threads joined so their
//! panics fail the test. The tests that count open fds run one at a time (`serial`). The UDP
//! probe's tests (`udp_probe_tests.rs`) share the helpers.

use super::*;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

/// Upper bound for anything a test waits for; far above what loopback needs.
pub(super) const PATIENCE: Duration = Duration::from_secs(10);

/// Socket-heavy tests in this module take this lock, so fd counts are not disturbed by each
/// other.
pub(super) fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Asserts the fd count comes back to at most `before` + a little (other tests in this process
/// may open a few meanwhile; a leak of one per probe would be hundreds).
pub(super) fn assert_no_fd_growth(before: usize, probes: usize) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let now = open_fds();
        if now <= before + 10 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{before} fds before {probes} probes, {now} after"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn spec(addr: SocketAddr) -> ProbeSpec {
    ProbeSpec {
        addr,
        timeout: Duration::from_secs(2),
        send: None,
        expect: None,
        udp: false,
        http: None,
    }
}

/// Runs one probe to its end.
pub(super) fn probe(spec: &ProbeSpec) -> Outcome {
    let mut prober = Prober::new();
    prober.start(7, spec, Instant::now());
    assert_eq!(prober.in_flight(), 1);
    let start = Instant::now();
    let mut out = Vec::new();
    while out.is_empty() {
        assert!(start.elapsed() < PATIENCE, "probe never finished");
        prober.advance(Instant::now(), Duration::from_millis(50), &mut out);
    }
    assert_eq!(prober.in_flight(), 0);
    let [(7, outcome)] = <[_; 1]>::try_from(out).expect("exactly one outcome") else {
        panic!("wrong id");
    };
    outcome
}

/// Accepts one connection within `PATIENCE`.
fn accept(listener: &TcpListener) -> TcpStream {
    listener.set_nonblocking(true).expect("nonblocking");
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
                stream.set_write_timeout(Some(PATIENCE)).expect("timeout");
                return stream;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(start.elapsed() < PATIENCE, "no connection came");
                thread::sleep(Duration::from_millis(2));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A one-connection server: reads `request.len()` bytes (asserted equal to `request`), writes
/// `reply`, then waits for the client to close, which must be a FIN (EOF), not a reset.
fn serve_once(request: &'static [u8], reply: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = thread::spawn(move || {
        let mut stream = accept(&listener);
        let mut got = vec![0; request.len()];
        stream.read_exact(&mut got).expect("request");
        assert_eq!(got, request);
        stream.write_all(reply).expect("reply");
        let mut rest = Vec::new();
        if let Err(e) = stream.read_to_end(&mut rest) {
            panic!("the prober should close with a FIN: {e}");
        }
    });
    (addr, handle)
}

#[test]
fn connect_probe_up_against_a_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    assert_eq!(probe(&spec(addr)), Outcome::Up);
}

#[test]
fn connect_probe_down_against_a_closed_port() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    assert_eq!(
        probe(&spec(addr)),
        Outcome::Down("connect refused".to_string())
    );
}

#[test]
fn connect_probe_times_out_against_a_full_backlog() {
    let _serial = serial();
    // listen(0): one connection fills the accept queue; further SYNs are dropped, so connects
    // hang in SYN_SENT.
    let server =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    server
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    server.listen(0).expect("listen");
    let addr = server
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..2 {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM.nonblocking(),
            None,
        )
        .expect("socket");
        let _ = s.connect(&addr.into());
        fillers.push(s);
    }
    thread::sleep(Duration::from_millis(50));
    let mut timed = spec(addr);
    timed.timeout = Duration::from_millis(300);
    let start = Instant::now();
    let outcome = probe(&timed);
    let took = start.elapsed();
    assert_eq!(
        outcome,
        Outcome::Down("timeout after 300ms (connecting)".to_string())
    );
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn send_expect_up_on_pong() {
    let (addr, server) = serve_once(b"PING\r\n", b"+PONG\r\n");
    let mut s = spec(addr);
    s.send = Some(b"PING\r\n".to_vec());
    s.expect = Some(b"+PONG".to_vec());
    assert_eq!(probe(&s), Outcome::Up);
    server.join().expect("server");
}

#[test]
fn send_expect_down_on_err() {
    let (addr, server) = serve_once(b"PING\r\n", b"-ERR\r\n");
    let mut s = spec(addr);
    s.send = Some(b"PING\r\n".to_vec());
    s.expect = Some(b"+PONG".to_vec());
    assert_eq!(
        probe(&s),
        Outcome::Down("expected \"+PONG\", got \"-ERR\"".to_string())
    );
    server.join().expect("server");
}

#[test]
fn expect_alone_checks_a_greeting() {
    let (addr, server) = serve_once(b"", b"220 mail.example ESMTP\r\n");
    let mut s = spec(addr);
    s.expect = Some(b"220 ".to_vec());
    assert_eq!(probe(&s), Outcome::Up);
    server.join().expect("server");
}

#[test]
fn partial_reply_times_out_showing_the_bytes() {
    // The server answers part of the reply and then waits (for the prober to close).
    let (addr, server) = serve_once(b"PING\r\n", b"+PO");
    let mut s = spec(addr);
    s.send = Some(b"PING\r\n".to_vec());
    s.expect = Some(b"+PONG".to_vec());
    s.timeout = Duration::from_millis(200);
    assert_eq!(
        probe(&s),
        Outcome::Down("timeout after 200ms (waiting for reply, got \"+PO\")".to_string())
    );
    server.join().expect("server");
}

#[test]
fn closed_before_reply() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = thread::spawn(move || drop(accept(&listener)));
    let mut s = spec(addr);
    s.expect = Some(b"+PONG".to_vec());
    assert_eq!(probe(&s), Outcome::Down("closed before reply".to_string()));
    server.join().expect("server");
}

#[test]
fn partial_reply_then_close_shows_the_bytes() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = thread::spawn(move || {
        let mut stream = accept(&listener);
        stream.write_all(b"+PO").expect("write");
    });
    let mut s = spec(addr);
    s.expect = Some(b"+PONG".to_vec());
    assert_eq!(
        probe(&s),
        Outcome::Down("expected \"+PONG\", got \"+PO\" and then closed".to_string())
    );
    server.join().expect("server");
}

#[test]
fn a_second_start_for_an_id_in_flight_is_ignored() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut prober = Prober::new();
    let now = Instant::now();
    prober.start(1, &spec(addr), now);
    prober.start(1, &spec(addr), now);
    prober.start(2, &spec(addr), now);
    assert_eq!(prober.in_flight(), 2);
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < 2 {
        assert!(start.elapsed() < PATIENCE);
        prober.advance(Instant::now(), Duration::from_millis(50), &mut out);
    }
    out.sort_by_key(|(id, _)| *id);
    let ids: Vec<u64> = out.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(prober.in_flight(), 0);
}

/// Accepts and closes connections on every listener until `stop`.
fn accept_and_close(listeners: Vec<TcpListener>, stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    thread::spawn(move || {
        for l in &listeners {
            l.set_nonblocking(true).expect("nonblocking");
        }
        let mut accepted = 0;
        while !stop.load(Ordering::Relaxed) {
            let mut any = false;
            for l in &listeners {
                while let Ok((stream, _)) = l.accept() {
                    drop(stream);
                    accepted += 1;
                    any = true;
                }
            }
            if !any {
                thread::sleep(Duration::from_millis(1));
            }
        }
        accepted
    })
}

#[test]
fn two_hundred_probes_leave_no_fd_behind() {
    let _serial = serial();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let up = listener.local_addr().expect("addr");
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = accept_and_close(vec![listener], stop.clone());
    let before = open_fds();
    let mut prober = Prober::new();
    let mut out = Vec::new();
    let start = Instant::now();
    for id in 0..200u64 {
        let addr = if id % 4 == 3 { closed } else { up };
        prober.start(id, &spec(addr), Instant::now());
        if id % 50 == 49 {
            while prober.in_flight() > 0 {
                assert!(start.elapsed() < PATIENCE);
                prober.advance(Instant::now(), Duration::from_millis(50), &mut out);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    acceptor.join().expect("acceptor");
    assert_eq!(out.len(), 200);
    let ups = out.iter().filter(|(_, o)| o.is_up()).count();
    assert_eq!(ups, 150, "{out:?}");
    assert_no_fd_growth(before, 200);
}

#[test]
fn one_thread_probes_a_thousand_targets_within_an_interval() {
    let _serial = serial();
    let listeners: Vec<TcpListener> = (0..20)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = accept_and_close(listeners, stop.clone());
    let before = open_fds();

    // 1,000 (listener, backend) pairs: 50 listeners × the same 20 real backends.
    let targets: Vec<Target> = (0..1000)
        .map(|i| Target {
            listener: format!("pool{}", i / 20),
            addr: addrs[i % 20],
            interval: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            timeout: Duration::from_millis(500),
            send: None,
            expect: None,
            udp: false,
            http: None,
            probe_at: None,
            readiness: false,
        })
        .collect();
    let mut sched = Scheduler::new();
    let mut prober = Prober::new();
    let t0 = Instant::now();
    sched.set_targets(targets, t0);

    // The schedule runs on simulated time, 10 ms per step, for 1.5 s; the probes are real.
    let step = Duration::from_millis(10);
    let (mut due, mut out) = (Vec::new(), Vec::new());
    let mut probed = HashSet::new();
    let mut busiest = 0;
    let started = Instant::now();
    let mut sim = t0;
    while sim <= t0 + Duration::from_millis(1500) || prober.in_flight() > 0 {
        assert!(started.elapsed() < PATIENCE, "took too long");
        if sim <= t0 + Duration::from_millis(1500) {
            sched.due(sim, &mut due);
            busiest = busiest.max(due.len());
            for (id, spec) in due.drain(..) {
                prober.start(id, &spec, Instant::now());
            }
        }
        prober.advance(Instant::now(), Duration::from_millis(2), &mut out);
        for (id, outcome) in out.drain(..) {
            assert_eq!(outcome, Outcome::Up, "target {id}");
            assert_eq!(sched.complete(id, &outcome), None);
            probed.insert(id);
        }
        sim += step;
    }
    let real = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let accepted = acceptor.join().expect("acceptor");

    assert_eq!(probed.len(), 1000, "every target probed");
    let total: u64 = sched.counts().map(|(_, _, ok, _)| ok).sum();
    for (listener, addr, ok, failed) in sched.counts() {
        assert!(
            (1..=2).contains(&ok),
            "{listener} {addr}: {ok} probes in 1.5 intervals"
        );
        assert_eq!(failed, 0);
        assert_eq!(sched.is_up(listener, addr), Some(true));
    }
    assert!(busiest <= 40, "{busiest} probes started in one 10 ms step");
    eprintln!(
        "1000 targets: {total} probes, {accepted} accepted, busiest step {busiest}, real time {real:?}"
    );
    assert_no_fd_growth(before, 1000);
}
