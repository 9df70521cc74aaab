//! `drain_mode = "postgres"`: sessions of a drained backend close between transactions.
//!
//! With two real PostgreSQL clusters behind ringlb and clients running transactions in a loop
//! (a small wire-protocol client written here: BEGIN, SELECT inet_server_port(), COMMIT, with a
//! reconnect when the connection was closed before a transaction began), draining one backend
//! through the admin API must fail no transaction, close every session of the drained backend
//! between two transactions (`reason="drain_idle"`, none cut), and the clients must reconnect
//! to the other. A fake backend that answers an SSLRequest with `S` shows the fallback: an
//! encrypted session cannot be read, so it closes at `drain_timeout`, never "at idle".

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::admin::{http_post, metric, per_backend, scrape};
use common::procs::PgCluster;
use common::*;

const LISTENER: &str = "pg";
const CLIENTS: usize = 8;

/// One message from the server: (type, body).
fn read_msg(s: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    assert!((4..1 << 20).contains(&len), "bad length {len}");
    let mut body = vec![0; len as usize - 4];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn startup_message() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0postgres\0database\0postgres\0\0");
    let mut v = (body.len() as u32 + 4).to_be_bytes().to_vec();
    v.extend(body);
    v
}

fn query_message(sql: &str) -> Vec<u8> {
    let mut v = vec![b'Q'];
    v.extend_from_slice(&(sql.len() as u32 + 5).to_be_bytes());
    v.extend_from_slice(sql.as_bytes());
    v.push(0);
    v
}

/// Reads a simple query's answer up to ReadyForQuery: (first column of the first row, status).
/// An ErrorResponse is an error.
fn read_answer(s: &mut TcpStream) -> io::Result<(Option<String>, u8)> {
    let mut value = None;
    loop {
        let (ty, body) = read_msg(s)?;
        match ty {
            b'D' if value.is_none() => {
                let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                value = Some(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
            }
            b'E' => {
                return Err(io::Error::other(format!(
                    "server error: {}",
                    String::from_utf8_lossy(&body)
                )))
            }
            b'Z' => return Ok((value, body[0])),
            _ => {}
        }
    }
}

/// A session through ringlb, logged in (trust authentication).
fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    s.write_all(&startup_message())?;
    let (_, status) = read_answer(&mut s)?;
    assert_eq!(status, b'I', "after login");
    Ok(s)
}

#[derive(Default)]
struct ClientReport {
    /// (when it committed, the server port that ran it).
    committed: Vec<(Instant, u16)>,
    /// Connections found closed before a transaction began (and replaced).
    reconnects: u32,
    /// Transactions that failed after BEGIN was answered: must stay empty.
    failed: Vec<String>,
}

/// One transaction. `Err(true)`: the connection was gone before BEGIN was answered (nothing
/// began); `Err(false)`: it failed inside the transaction.
fn transaction(s: &mut TcpStream) -> Result<u16, (bool, String)> {
    let begin = s
        .write_all(&query_message("BEGIN"))
        .and_then(|()| read_answer(s));
    match begin {
        Ok((_, b'T')) => {}
        Ok((_, st)) => return Err((false, format!("BEGIN left status {}", st as char))),
        Err(e) => return Err((true, e.to_string())),
    }
    let mut inside = || -> io::Result<u16> {
        s.write_all(&query_message("SELECT inet_server_port()"))?;
        let (port, st) = read_answer(s)?;
        assert_eq!(st, b'T');
        std::thread::sleep(Duration::from_millis(2));
        s.write_all(&query_message("COMMIT"))?;
        let (_, st) = read_answer(s)?;
        if st != b'I' {
            return Err(io::Error::other(format!("COMMIT left {}", st as char)));
        }
        Ok(port.and_then(|p| p.parse().ok()).unwrap_or(0))
    };
    inside().map_err(|e| (false, e.to_string()))
}

fn client_loop(addr: SocketAddr, stop: &AtomicBool, report: &Mutex<ClientReport>) {
    let mut conn: Option<TcpStream> = None;
    // Bounded: the main thread stops the loop after a few seconds.
    for _ in 0..200_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let s = match conn.as_mut() {
            Some(s) => s,
            None => match connect(addr) {
                Ok(s) => conn.insert(s),
                Err(e) => {
                    report.lock().unwrap().failed.push(format!("connect: {e}"));
                    return;
                }
            },
        };
        match transaction(s) {
            Ok(port) => report
                .lock()
                .unwrap()
                .committed
                .push((Instant::now(), port)),
            Err((true, _)) => {
                report.lock().unwrap().reconnects += 1;
                conn = None;
            }
            Err((false, e)) => {
                report.lock().unwrap().failed.push(e);
                conn = None;
            }
        }
    }
}

fn start_two() -> (PgCluster, PgCluster) {
    std::thread::scope(|s| {
        let a = s.spawn(|| PgCluster::start("drain-a", 50));
        let b = s.spawn(|| PgCluster::start("drain-b", 50));
        match (a.join(), b.join()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(p), _) | (_, Err(p)) => std::panic::resume_unwind(p),
        }
    })
}

fn closes(admin: SocketAddr, reason: &str) -> f64 {
    metric(
        &scrape(admin),
        "ringlb_closes_total",
        &[("listener", LISTENER), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

#[test]
fn a_drained_postgres_backend_loses_its_sessions_between_transactions() {
    let (a, b) = start_two();
    let l = listener(LISTENER)
        .backend(a.addr())
        .backend(b.addr())
        .idle_timeout("1h")
        .set("drain_mode", "\"postgres\"")
        .set("drain_timeout", "\"60s\"")
        .set("access_log", "true");
    let lb = Lb::start(&ringlb_config([l]));
    let addr = lb.addr(LISTENER);
    let admin = lb.admin_addr().expect("admin address");

    let stop = Arc::new(AtomicBool::new(false));
    let reports: Vec<Arc<Mutex<ClientReport>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let threads: Vec<_> = reports
        .iter()
        .map(|r| {
            let (stop, r) = (stop.clone(), r.clone());
            std::thread::spawn(move || client_loop(addr, &stop, &r))
        })
        .collect();

    // Round robin: half the sessions on each cluster, all running transactions.
    let active = |who: SocketAddr| {
        per_backend(
            &scrape(admin),
            "ringlb_active_connections",
            LISTENER,
            &[who],
        )[0]
        .unwrap_or(0.0)
    };
    let spread = wait_until(Duration::from_secs(10), || {
        active(a.addr()) >= 1.0 && active(b.addr()) >= 1.0
    });
    std::thread::sleep(Duration::from_millis(500));
    let on_b = active(b.addr());
    assert!(
        spread && on_b >= 1.0,
        "sessions on b before the drain: {on_b}"
    );
    let committed_before: usize = reports
        .iter()
        .map(|r| r.lock().unwrap().committed.len())
        .sum();
    assert!(committed_before > 0, "no transaction before the drain");

    let t_drain = Instant::now();
    let (code, body) = http_post(admin, &format!("/backends/{LISTENER}/{}/drain", b.addr()));
    assert_eq!(code, 200, "drain: {body}");
    let emptied = wait_until(Duration::from_secs(10), || active(b.addr()) == 0.0);
    let emptied_in = t_drain.elapsed();
    let t_empty = Instant::now();
    assert!(
        emptied,
        "b still has {} sessions 10 s after the drain; stderr:\n{}",
        active(b.addr()),
        lb.stderr_tail(20)
    );
    // Keep running on a alone for a while.
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("client thread");
    }

    let reports: Vec<ClientReport> = reports
        .into_iter()
        .map(|r| std::mem::take(&mut *r.lock().unwrap()))
        .collect();
    let failed: Vec<&String> = reports.iter().flat_map(|r| &r.failed).collect();
    let reconnects: u32 = reports.iter().map(|r| r.reconnects).sum();
    let committed: usize = reports.iter().map(|r| r.committed.len()).sum();
    let idle_closes = closes(admin, "drain_idle");
    eprintln!(
        "{committed} transactions; {on_b} sessions on b at the drain, emptied in {emptied_in:?}; \
         {reconnects} reconnects, {idle_closes} drain_idle closes"
    );
    assert!(
        failed.is_empty(),
        "failed transactions: {failed:?}; stderr:\n{}",
        lb.stderr_tail(40)
    );
    // Each session of b was closed between transactions, by ringlb, and replaced.
    assert!(
        idle_closes >= on_b,
        "drain_idle {idle_closes} < {on_b} sessions on b"
    );
    assert_eq!(
        f64::from(reconnects),
        idle_closes,
        "one reconnect per idle close"
    );
    for reason in ["draining", "backend_reset", "client_reset", "idle_timeout"] {
        assert_eq!(closes(admin, reason), 0.0, "closes with reason {reason}");
    }
    // After the drain, everything runs on a, and it did run.
    let after: Vec<u16> = reports
        .iter()
        .flat_map(|r| &r.committed)
        .filter(|(t, _)| *t > t_empty)
        .map(|(_, p)| *p)
        .collect();
    assert!(!after.is_empty(), "no transaction after the drain");
    assert!(
        after.iter().all(|p| *p == a.port()),
        "transactions after the drain on another server than a ({}): {:?}",
        a.port(),
        after.iter().filter(|p| **p != a.port()).count()
    );
    assert_eq!(active(b.addr()), 0.0);
    assert_eq!(
        active(a.addr()),
        0.0,
        "the clients closed when they stopped"
    );
}

/// A fake backend: answers an SSLRequest with `answer`, then (whatever follows) sends a
/// ReadyForQuery(I) after each chunk the client sends, and holds the connection open.
fn fake_backend(answer: u8) -> (SocketAddr, std::thread::JoinHandle<()>) {
    fake_backend_with(answer, b'I')
}

/// [`fake_backend`] whose ReadyForQuery carries `status` (`T`: a session in a transaction).
fn fake_backend_with(answer: u8, status: u8) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut req = [0u8; 8];
        s.read_exact(&mut req).expect("SSLRequest");
        s.write_all(&[answer]).expect("answer");
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                return;
            }
            // After 'N' this is a plain startup answered by an idle session; after 'S' the
            // same bytes are TLS records as far as ringlb may know.
            let _ = s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, status]);
        }
    });
    (addr, h)
}

fn ssl_request() -> Vec<u8> {
    let mut v = 8u32.to_be_bytes().to_vec();
    v.extend_from_slice(&80_877_103u32.to_be_bytes());
    v
}

/// Connects through ringlb, sends an SSLRequest, reads the answer byte, then a "startup"; the
/// backend answers it with an idle ReadyForQuery. Returns the stream.
fn negotiated_session(addr: SocketAddr, expect: u8) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&ssl_request()).unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).unwrap();
    assert_eq!(one[0], expect);
    s.write_all(&startup_message()).unwrap();
    let mut answer = [0u8; 15];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer[9..14], &[b'Z', 0, 0, 0, 5]);
    s
}

/// Reads until EOF or error; how long it took and whether it was a clean EOF.
fn wait_closed(s: &mut TcpStream) -> (Duration, bool) {
    let t = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (t.elapsed(), true),
            Ok(_) => continue,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                panic!("not closed within 10 s")
            }
            Err(_) => return (t.elapsed(), false),
        }
    }
}

#[test]
fn an_encrypted_session_falls_back_to_drain_timeout() {
    // Plain (N) and "encrypted" (S) sessions, each on its own backend and listener.
    let (plain, plain_h) = fake_backend(b'N');
    let (tls, tls_h) = fake_backend(b'S');
    let cfg = |name: &str, b: SocketAddr| {
        listener(name)
            .backend(b)
            .set("drain_mode", "\"postgres\"")
            .set("drain_timeout", "\"1500ms\"")
    };
    let lb = Lb::start(&ringlb_config([cfg("plain", plain), cfg("tls", tls)]));
    let admin = lb.admin_addr().expect("admin address");
    let mut p = negotiated_session(lb.addr("plain"), b'N');
    let mut t = negotiated_session(lb.addr("tls"), b'S');

    for (name, b) in [("plain", plain), ("tls", tls)] {
        let (code, body) = http_post(admin, &format!("/backends/{name}/{b}/drain"));
        assert_eq!(code, 200, "drain {name}: {body}");
    }
    // The readable session was already idle: closed within a scan, cleanly.
    let (after, clean) = wait_closed(&mut p);
    assert!(clean, "the plain session was reset, not closed");
    assert!(
        after < Duration::from_millis(1200),
        "plain closed after {after:?}"
    );
    // The encrypted one looked idle to a naive reader, but is not read: drain_timeout.
    let (after, _) = wait_closed(&mut t);
    assert!(
        after >= Duration::from_millis(1000),
        "the encrypted session closed after {after:?}, before drain_timeout"
    );
    let s = scrape(admin);
    let count = |l: &str, reason: &str| {
        metric(
            &s,
            "ringlb_closes_total",
            &[("listener", l), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (count("plain", "drain_idle"), count("plain", "draining")),
        (1.0, 0.0)
    );
    assert_eq!(
        (count("tls", "drain_idle"), count("tls", "draining")),
        (0.0, 1.0)
    );
    drop((p, t));
    plain_h.join().unwrap();
    tls_h.join().unwrap();
}

#[test]
fn a_backend_removed_by_reload_loses_idle_sessions_at_once_and_busy_ones_at_drain_timeout() {
    let (idle, idle_h) = fake_backend_with(b'N', b'I');
    let (busy, busy_h) = fake_backend_with(b'N', b'T');
    let cfg = |name: &str, b: SocketAddr| {
        listener(name)
            .backend(b)
            .set("drain_mode", "\"postgres\"")
            .set("drain_timeout", "\"1500ms\"")
    };
    let lb = Lb::start(&ringlb_config([cfg("idle", idle), cfg("busy", busy)]));
    let admin = lb.admin_addr().expect("admin address");
    let mut i = negotiated_session(lb.addr("idle"), b'N');
    let mut b = negotiated_session(lb.addr("busy"), b'N');
    // Both backends leave the file (a refusing address takes their place).
    let elsewhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
    common::ops::reload_ok(
        &lb,
        &ringlb_config([cfg("idle", elsewhere), cfg("busy", elsewhere)]),
    );
    let (after, clean) = wait_closed(&mut i);
    assert!(clean, "the idle session was reset, not closed");
    assert!(
        after < Duration::from_millis(1200),
        "idle closed after {after:?}"
    );
    // In a transaction (status T): kept until drain_timeout.
    let (after, _) = wait_closed(&mut b);
    assert!(
        after >= Duration::from_millis(900),
        "busy closed after {after:?}"
    );
    let s = scrape(admin);
    let count = |l: &str, reason: &str| {
        metric(
            &s,
            "ringlb_closes_total",
            &[("listener", l), ("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(
        (count("idle", "drain_idle"), count("idle", "draining")),
        (1.0, 0.0)
    );
    assert_eq!(
        (count("busy", "drain_idle"), count("busy", "draining")),
        (0.0, 1.0)
    );
    drop((i, b));
    idle_h.join().unwrap();
    busy_h.join().unwrap();
}

#[test]
fn a_backend_that_turns_not_ready_loses_its_idle_session() {
    // The liveness and readiness checks go to an HTTP agent beside the fake server (as
    // Patroni's REST API sits beside PostgreSQL); the fake server sees only the session.
    let agent = common::http::HttpServer::start("agent");
    agent.set("/ready", 200);
    let (pg, pg_h) = fake_backend_with(b'N', b'I');
    let health = format!(
        "{{ interval = \"100ms\", timeout = \"100ms\", address = \"{a}\", ready = {{ \
         interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1, address = \"{a}\", \
         http = {{ path = \"/ready\" }} }} }}",
        a = agent.addr()
    );
    let l = listener("pg")
        .backend(pg)
        .set("drain_mode", "\"postgres\"")
        .set("health", &health)
        .set("passive", "{ consecutive_failures = 0 }");
    let lb = Lb::start(&ringlb_config([l]));
    let admin = lb.admin_addr().expect("admin address");
    let ready = wait_until(Duration::from_secs(5), || {
        common::admin::http_get(admin, "/readyz").0 == 200
    });
    assert!(ready, "never ready: {}", lb.stderr_tail(20));
    let mut s = negotiated_session(lb.addr("pg"), b'N');
    agent.set("/ready", 503);
    let (_, clean) = wait_closed(&mut s);
    assert!(clean, "the idle session was reset, not closed");
    let m = scrape(admin);
    assert_eq!(
        metric(
            &m,
            "ringlb_closes_total",
            &[("listener", "pg"), ("reason", "drain_idle")]
        ),
        Some(1.0)
    );
    let (code, body) = common::admin::http_get(admin, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("listener \"pg\": no healthy backend (0/1 up: 1 not_ready)"),
        "{body:?}"
    );
    drop(s);
    pg_h.join().unwrap();
}
