//! A hostile-peer review of four features through the real binary: the TLS ClientHello peek
//! (`tls_inspect`), `drain_mode = "postgres"` against a fake backend speaking hostile framing,
//! DNS discovery answers (hundreds of records, SRV edge values, addresses that are the listener
//! itself or the wildcard, answers that flap), and `POST /upgrade` / SIGUSR2 abuse.
//!
//! A test marked `#[ignore = "defect: ..."]` reproduces a defect found by this review and fails
//! on the code it was written against; the others are regression tests for attacks that were
//! handled. Every load loop is bounded in count and time, every socket has timeouts, all
//! traffic stays on loopback. Runs on the I/O backend `RINGLB_IO` names (both when unset).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::admin::{http_post, metric, metric_sum, scrape, try_http_request, try_http_with};
use common::attack::{closed_within, io_backends, must, rss_kib, start_on};
use common::dns::Dns;
use common::payload::try_connect;
use common::tls::{client_hello_bytes, ClientOptions};
use common::{listener, ringlb_config, EchoServer, Lb, NamedServer, WORKERS};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin line:\n{}", lb.stderr_tail(30)))
}

fn assert_no_panic(lb: &Lb, what: &str) {
    let lines = lb.stderr_lines();
    let bad: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("panicked") || l.contains("worker") && l.contains("failed"))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: the LB logged a panic or a failed worker: {bad:?}"
    );
}

/// Sends `bytes` (one write), half-closes, and reads to EOF or error (harness timeouts).
fn send_and_read(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let Ok(mut s) = try_connect(addr) else {
        return Vec::new();
    };
    let _ = s.write_all(bytes);
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

/// Like [`send_and_read`], one byte per TCP segment (TCP_NODELAY, a pause between bytes).
fn trickle_and_read(addr: SocketAddr, bytes: &[u8], pause: Duration) -> Vec<u8> {
    let Ok(mut s) = try_connect(addr) else {
        return Vec::new();
    };
    s.set_nodelay(true).expect("nodelay");
    for b in bytes {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            break;
        }
        std::thread::sleep(pause);
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

// ---------------------------------------------------------------------------------------------
// 1. TLS ClientHello peek
// ---------------------------------------------------------------------------------------------

/// One TLS record of `content` (type 22, version 3.1).
fn record(content: &[u8]) -> Vec<u8> {
    let mut v = vec![22, 3, 1];
    v.extend_from_slice(&(content.len() as u16).to_be_bytes());
    v.extend_from_slice(content);
    v
}

/// The handshake message split over records of at most `frag` bytes each.
fn records(hs: &[u8], frag: usize) -> Vec<u8> {
    hs.chunks(frag).flat_map(record).collect()
}

/// A server_name extension body with these (type, name) entries, lengths as they should be.
fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (t, name) in entries {
        list.push(*t);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut v = (list.len() as u16).to_be_bytes().to_vec();
    v.extend(list);
    v
}

/// A ClientHello handshake message (header included) with these extensions (type, body).
fn hello_msg(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[0x11; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    let mut e = Vec::new();
    for (t, b) in exts {
        e.extend_from_slice(&t.to_be_bytes());
        e.extend_from_slice(&(b.len() as u16).to_be_bytes());
        e.extend_from_slice(b);
    }
    body.extend_from_slice(&(e.len() as u16).to_be_bytes());
    body.extend(e);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    hs
}

fn hello_sni(name: &[u8]) -> Vec<u8> {
    hello_msg(&[(0, sni_ext(&[(0, name)]))])
}

/// Listener "tls" (SNI api.example.com to a named server "api", everything else to an echo
/// server) and "strict" (the same route, no default), both with a 500 ms `tls_inspect.timeout`.
struct TlsSetup {
    lb: Lb,
    echo: EchoServer,
    _api: NamedServer,
}

fn tls_setup(io: &str) -> TlsSetup {
    let api = NamedServer::start("api");
    let echo = EchoServer::start();
    let l = |name: &str, default: bool| {
        let (own, route) = if default {
            (
                format!("backends = [{{ address = \"{}\" }}]\n", echo.addr()),
                "  { default = true, pool = \"default\" },\n",
            )
        } else {
            (String::new(), "")
        };
        format!(
            "[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\n{own}\
             tls_inspect = {{ timeout = \"500ms\" }}\n\
             routes = [\n  {{ sni = [\"api.example.com\"], pool = \"api\" }},\n{route}]\n\
             [[listeners.pools]]\nname = \"api\"\nbackends = [{{ address = \"{}\" }}]\n",
            api.addr()
        )
    };
    let toml = format!(
        "[runtime]\nworkers = {WORKERS}\ndrain_timeout = \"2s\"\n[admin]\nbind = \"127.0.0.1:0\"\n{}{}",
        l("tls", true),
        l("strict", false)
    );
    TlsSetup {
        lb: start_on(io, &toml),
        echo,
        _api: api,
    }
}

fn inspected(lb: &Lb, listener: &str, result: &str) -> f64 {
    metric(
        &scrape(admin(lb)),
        "ringlb_tls_inspect_total",
        &[("listener", listener), ("result", result)],
    )
    .unwrap_or(0.0)
}

fn listener_active(lb: &Lb, listener: &str) -> f64 {
    metric(
        &scrape(admin(lb)),
        "ringlb_listener_active_connections",
        &[("listener", listener)],
    )
    .unwrap_or(-1.0)
}

/// What a hostile hello should come to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Goes {
    /// Routed by its SNI to the "api" pool.
    Api,
    /// Not routable: the default pool (echo) on "tls", closed on "strict".
    Default,
}

fn hostile_hellos() -> Vec<(&'static str, Vec<u8>, &'static str, Goes)> {
    let api = hello_sni(b"api.example.com");
    let mut lying_ext = hello_sni(b"api.example.com");
    // The server_name list length says 200 while the extension holds 20 bytes.
    let at = lying_ext.len() - 20;
    lying_ext[at..at + 2].copy_from_slice(&200u16.to_be_bytes());
    let mut hs_says_more = hello_sni(b"api.example.com");
    // The handshake length claims 4 KiB more than the record carries; then EOF.
    let n = hs_says_more.len() - 4 + 4096;
    hs_says_more[1..4].copy_from_slice(&(n as u32).to_be_bytes()[1..]);
    let long_label = format!("{}.example.com", "a".repeat(64));
    let long_name = format!("{}.api.example.com", "b.".repeat(150));
    vec![
        (
            "record length 0",
            vec![22, 3, 1, 0, 0, 1, 0, 0, 40],
            "malformed",
            Goes::Default,
        ),
        (
            "record length 0xffff",
            [vec![22, 3, 1, 0xff, 0xff], vec![1; 300]].concat(),
            "malformed",
            Goes::Default,
        ),
        (
            "handshake length 16 MiB",
            vec![22, 3, 1, 0x40, 0, 1, 0xff, 0xff, 0xff, 3, 3],
            "too_large",
            Goes::Default,
        ),
        (
            "not a ClientHello first",
            record(&[2, 0, 0, 41, 3, 3, 0, 0, 0]),
            "malformed",
            Goes::Default,
        ),
        (
            "SSLv2-format hello",
            vec![0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15],
            "not_tls",
            Goes::Default,
        ),
        (
            "SSH banner",
            b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(),
            "not_tls",
            Goes::Default,
        ),
        (
            "alert record first",
            vec![21, 3, 3, 0, 2, 2, 40],
            "not_tls",
            Goes::Default,
        ),
        (
            "record version 3.9",
            vec![22, 3, 9, 0, 4, 1, 0, 0, 0],
            "not_tls",
            Goes::Default,
        ),
        (
            "SNI 300 bytes",
            record(&hello_sni(long_name.as_bytes())),
            "no_sni",
            Goes::Default,
        ),
        (
            "SNI label of 64",
            record(&hello_sni(long_label.as_bytes())),
            "no_sni",
            Goes::Default,
        ),
        (
            "SNI with NUL",
            record(&hello_sni(b"api.example.com\0.evil")),
            "no_sni",
            Goes::Default,
        ),
        (
            "SNI NUL suffix",
            record(&hello_sni(b"api.example.com\0")),
            "no_sni",
            Goes::Default,
        ),
        (
            "SNI with 0xff",
            record(&hello_sni(b"api.\xffexample.com")),
            "no_sni",
            Goes::Default,
        ),
        (
            "SNI IP literal",
            record(&hello_sni(b"127.0.0.1")),
            "no_sni",
            Goes::Default,
        ),
        (
            "SNI empty",
            record(&hello_sni(b"")),
            "no_sni",
            Goes::Default,
        ),
        (
            "two host names",
            record(&hello_msg(&[(
                0,
                sni_ext(&[(0, b"x.example.com"), (0, b"api.example.com")]),
            )])),
            "malformed",
            Goes::Default,
        ),
        (
            "two server_name extensions",
            record(&hello_msg(&[
                (0, sni_ext(&[(0, b"x.example.com")])),
                (0, sni_ext(&[(0, b"api.example.com")])),
            ])),
            "malformed",
            Goes::Default,
        ),
        (
            "a list length that lies",
            record(&lying_ext),
            "malformed",
            Goes::Default,
        ),
        (
            "a handshake length that lies",
            record(&hs_says_more),
            "eof",
            Goes::Default,
        ),
        (
            "SNI upper case, trailing dot",
            record(&hello_sni(b"API.Example.COM.")),
            "sni",
            Goes::Api,
        ),
        (
            "hello in 1-byte records",
            records(&api, 1),
            "sni",
            Goes::Api,
        ),
        (
            "hello in 7-byte records",
            records(&api, 7),
            "sni",
            Goes::Api,
        ),
        ("a real hello", record(&api), "sni", Goes::Api),
    ]
}

/// Every hostile hello reaches the default pool byte-exact (or is closed without one), never
/// the SNI route unless its name is valid, with the outcome counted; nothing is left open.
#[test]
fn hostile_client_hellos_go_to_the_default_pool_or_are_closed_and_leave_nothing() {
    for io in io_backends() {
        let t = tls_setup(&io);
        let (baseline, _) = t.lb.fd_counts();
        for (what, bytes, result, goes) in hostile_hellos() {
            for l in ["tls", "strict"] {
                let before = inspected(&t.lb, l, result);
                let got = send_and_read(t.lb.addr(l), &bytes);
                let want: Vec<u8> = match (goes, l) {
                    (Goes::Api, _) => b"api".to_vec(),
                    (Goes::Default, "tls") => bytes.clone(),
                    (Goes::Default, _) => Vec::new(),
                };
                assert!(
                    got == want,
                    "{io}: {what} on {l}: got {} bytes {:?}, expected {} bytes",
                    got.len(),
                    String::from_utf8_lossy(&got[..got.len().min(40)]),
                    want.len()
                );
                let after = inspected(&t.lb, l, result);
                assert_eq!(
                    after,
                    before + 1.0,
                    "{io}: {what} on {l}: not counted as {result}"
                );
            }
        }
        // One byte per segment (a real rustls hello, ~1.5 KB, both listeners).
        let real = client_hello_bytes("api.example.com", &ClientOptions::alpn(&["h2"]));
        for l in ["tls", "strict"] {
            let got = trickle_and_read(t.lb.addr(l), &real, Duration::ZERO);
            assert_eq!(got, b"api", "{io}: trickled real hello on {l}");
        }
        assert!(t.echo.wait_live(0, Duration::from_secs(5)));
        for l in ["tls", "strict"] {
            must(
                Duration::from_secs(5),
                &format!("{io}: {l} active back to 0"),
                || listener_active(&t.lb, l) == 0.0,
            );
        }
        t.lb.assert_fds_return(baseline, Duration::from_secs(5));
        assert_no_panic(&t.lb, &io);
    }
}

/// Hundreds of clients that send half a hello and stall are each timed out at
/// `tls_inspect.timeout` (not later for one trickling a byte at a time): closed without a
/// default route, forwarded byte-exact to the default pool with one; every slot and descriptor
/// comes back.
#[test]
fn stalled_half_hellos_by_the_hundred_time_out_and_free_every_slot() {
    const N: usize = 300;
    for io in io_backends() {
        let t = tls_setup(&io);
        let (baseline, _) = t.lb.fd_counts();
        let real = client_hello_bytes("api.example.com", &ClientOptions::alpn(&["h2"]));
        let half = &real[..real.len() / 2];
        let t0 = Instant::now();
        let mut stalled: Vec<TcpStream> = Vec::with_capacity(N);
        for i in 0..N {
            let mut s = try_connect(t.lb.addr("strict")).expect("connect");
            s.write_all(if i % 2 == 0 { half } else { &real[..7] })
                .expect("write half a hello");
            stalled.push(s);
        }
        // A trickler: one byte every 150 ms (each arrival must not extend the deadline).
        let trickler = {
            let addr = t.lb.addr("strict");
            let bytes = real.clone();
            std::thread::spawn(move || {
                let mut s = try_connect(addr).expect("connect");
                s.set_nodelay(true).unwrap();
                let t0 = Instant::now();
                for b in bytes.iter().take(40) {
                    if s.write_all(std::slice::from_ref(b)).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(150));
                    if closed_within(&mut s, Duration::from_millis(1)) {
                        break;
                    }
                }
                t0.elapsed()
            })
        };
        // Half a hello on the default route: after the timeout it reaches the echo server.
        let mut routed = try_connect(t.lb.addr("tls")).expect("connect");
        routed.write_all(half).unwrap();
        let mut back = vec![0u8; half.len()];
        routed.read_exact(&mut back).expect("the half hello echoed");
        assert_eq!(back, half, "{io}: forwarded byte-exact after the timeout");
        for (i, s) in stalled.iter_mut().enumerate() {
            assert!(
                closed_within(s, Duration::from_secs(10)),
                "{io}: stalled client {i} not closed {:?} after it connected",
                t0.elapsed()
            );
        }
        let took = trickler.join().unwrap();
        assert!(
            took < Duration::from_millis(2500),
            "{io}: a trickling client kept its hello stage for {took:?} (timeout 500ms)"
        );
        assert!(inspected(&t.lb, "strict", "timeout") >= N as f64);
        drop(routed);
        drop(stalled);
        for l in ["tls", "strict"] {
            must(
                Duration::from_secs(5),
                &format!("{io}: {l} active back to 0"),
                || listener_active(&t.lb, l) == 0.0,
            );
        }
        t.lb.assert_fds_return(baseline, Duration::from_secs(5));
        assert_no_panic(&t.lb, &io);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. drain_mode = "postgres" against hostile backends
// ---------------------------------------------------------------------------------------------

fn pg_msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ty];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn pg_startup() -> Vec<u8> {
    let rest = b"\0\x03\0\0user\0postgres\0\0";
    let mut v = (rest.len() as u32 + 4).to_be_bytes().to_vec();
    v.extend_from_slice(rest);
    v
}

/// AuthenticationOk, BackendKeyData, ReadyForQuery(`status`).
fn pg_login(status: u8) -> Vec<u8> {
    let mut v = pg_msg(b'R', &0u32.to_be_bytes());
    v.extend(pg_msg(b'K', &[0; 8]));
    v.extend(pg_msg(b'Z', &[status]));
    v
}

/// A fake PostgreSQL backend for one session: reads the startup, writes `script` in pieces of
/// `split` bytes (TCP_NODELAY, a short pause between), then holds the session until the peer
/// closes or 30 s pass. Returns its address and a handle yielding the bytes it wrote.
fn hostile_pg(script: Vec<u8>, split: usize) -> (SocketAddr, std::thread::JoinHandle<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return 0,
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
        let mut wrote = 0;
        for piece in script.chunks(split.max(1)) {
            if s.write_all(piece).is_err() {
                return wrote;
            }
            wrote += piece.len();
            if split < script.len() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        while Instant::now() < deadline {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
        }
        wrote
    });
    (addr, h)
}

/// A client session through the LB: connect, send the startup, read what the backend sends
/// for `settle`; returns the stream and those bytes.
fn pg_session(addr: SocketAddr, settle: Duration) -> (TcpStream, Vec<u8>) {
    let mut s = try_connect(addr).expect("connect");
    s.write_all(&pg_startup()).expect("startup");
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let t0 = Instant::now();
    while t0.elapsed() < settle {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    (s, got)
}

/// Reads until EOF or reset, at most `within`; the time it took, whether it ended, and the
/// bytes read on the way.
fn read_to_close(s: &mut TcpStream, within: Duration) -> (Duration, bool, Vec<u8>) {
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while t0.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return (t0.elapsed(), true, got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (t0.elapsed(), true, got),
        }
    }
    (t0.elapsed(), false, got)
}

fn pg_listener(name: &str, backend: SocketAddr) -> common::Listener {
    listener(name)
        .backend(backend)
        .set("drain_mode", "\"postgres\"")
        .set("drain_timeout", "\"1500ms\"")
}

/// Hostile framing from the backend (lengths 0, 3, 2^31-1, 2^32-1, odd ReadyForQuery,
/// everything one byte per segment): the proxy neither panics nor closes the session early,
/// and a drain closes it at `drain_timeout`, not later; an honest login split into single
/// bytes is still recognised as idle and closed at once.
#[test]
fn hostile_postgres_framing_from_the_backend_falls_back_to_drain_timeout() {
    let big = [vec![b'D', 0x7f, 0xff, 0xff, 0xff], vec![b'x'; 64 * 1024]].concat();
    let cases: Vec<(&str, Vec<u8>, usize, bool)> = vec![
        (
            "length 0",
            [pg_login(b'I'), vec![b'R', 0, 0, 0, 0]].concat(),
            1000,
            false,
        ),
        (
            "length 3",
            [vec![b'R', 0, 0, 0, 3], pg_login(b'I')].concat(),
            1000,
            false,
        ),
        (
            "length 2^31-1",
            [pg_login(b'I'), big.clone()].concat(),
            4096,
            false,
        ),
        (
            "length 2^32-1",
            [pg_login(b'I'), vec![b'E', 0xff, 0xff, 0xff, 0xff, b'S']].concat(),
            1000,
            false,
        ),
        ("ReadyForQuery status X", pg_login(b'X'), 1, false),
        ("ReadyForQuery status NUL", pg_login(0), 1000, false),
        (
            "ReadyForQuery of length 6",
            [pg_msg(b'R', &[0; 4]), pg_msg(b'Z', b"II")].concat(),
            1000,
            false,
        ),
        (
            "ReadyForQuery of length 4",
            [
                pg_msg(b'R', &[0; 4]),
                vec![b'Z', 0, 0, 0, 4],
                pg_msg(b'Z', b"I"),
            ]
            .concat(),
            1000,
            false,
        ),
        ("honest login, 1-byte segments", pg_login(b'I'), 1, true),
    ];
    for io in io_backends() {
        let mut backends = Vec::new();
        let mut listeners = Vec::new();
        for (i, (_, script, split, _)) in cases.iter().enumerate() {
            let (addr, h) = hostile_pg(script.clone(), *split);
            listeners.push(pg_listener(&format!("pg{i}"), addr));
            backends.push((addr, h));
        }
        let lb = start_on(&io, &ringlb_config(listeners));
        let a = admin(&lb);
        let rss0 = rss_kib(&lb);
        let mut sessions = Vec::new();
        for (i, (what, _, _, _)) in cases.iter().enumerate() {
            let (s, got) = pg_session(lb.addr(&format!("pg{i}")), Duration::from_millis(400));
            sessions.push((what, s, got));
        }
        // Nothing closed before the drain (a broken frame is not a reason to cut a session).
        for (what, s, _) in sessions.iter_mut() {
            assert!(
                !closed_within(s, Duration::from_millis(20)),
                "{io}: {what}: closed before any drain"
            );
        }
        let rss1 = rss_kib(&lb);
        assert!(
            rss1 < rss0 + 8 * 1024,
            "{io}: RSS grew from {rss0} KiB to {rss1} KiB with hostile framing"
        );
        for (i, (addr, _)) in backends.iter().enumerate() {
            let (code, body) = http_post(a, &format!("/backends/pg{i}/{addr}/drain"));
            assert_eq!(code, 200, "drain pg{i}: {body}");
        }
        for (i, (what, s, _)) in sessions.iter_mut().enumerate() {
            let honest = cases[i].3;
            let (after, ended, _) = read_to_close(s, Duration::from_secs(6));
            assert!(ended, "{io}: {what}: not closed 6 s after the drain");
            if honest {
                assert!(
                    after < Duration::from_millis(1200),
                    "{io}: {what}: idle, closed after {after:?}"
                );
            } else {
                // Sessions closed in order: the first waits the whole drain_timeout, later ones
                // share it; none may end long past it.
                assert!(
                    after < Duration::from_millis(3500),
                    "{io}: {what}: closed {after:?} after the drain (drain_timeout 1.5s)"
                );
            }
        }
        let s = scrape(a);
        let idle = metric_sum(&s, "ringlb_closes_total", &[("reason", "drain_idle")]);
        let draining = metric_sum(&s, "ringlb_closes_total", &[("reason", "draining")]);
        assert_eq!(
            (idle, draining),
            (1.0, cases.len() as f64 - 1.0),
            "{io}: only the honest session closes as drain_idle"
        );
        drop(sessions);
        for (_, h) in backends {
            h.join().expect("fake backend");
        }
        assert_no_panic(&lb, &io);
    }
}

/// SIGTERM with sessions whose framing is hostile: the process exits 0 within the runtime's
/// drain_timeout (2 s) plus a margin.
#[test]
fn sigterm_with_hostile_postgres_sessions_exits_within_the_drain_timeout() {
    for io in io_backends() {
        let big = [vec![b'D', 0x7f, 0xff, 0xff, 0xff], vec![b'x'; 256 * 1024]].concat();
        let scripts = [
            pg_login(b'T'),
            [pg_login(b'I'), vec![b'R', 0, 0, 0, 1]].concat(),
            [pg_login(b'I'), big].concat(),
        ];
        let mut backends = Vec::new();
        let mut ls = Vec::new();
        for (i, sc) in scripts.iter().enumerate() {
            let (addr, h) = hostile_pg(sc.clone(), 1000);
            ls.push(pg_listener(&format!("pg{i}"), addr).set("drain_timeout", "\"30s\""));
            backends.push(h);
        }
        let toml = ls
            .into_iter()
            .fold(
                common::LbConfig::default().drain_timeout("2s"),
                common::LbConfig::listener,
            )
            .to_toml();
        let mut lb = start_on(&io, &toml);
        let sessions: Vec<_> = (0..scripts.len())
            .map(|i| pg_session(lb.addr(&format!("pg{i}")), Duration::from_millis(300)).0)
            .collect();
        let t0 = Instant::now();
        lb.signal(Signal::SIGTERM);
        let st = lb.wait_exit(Duration::from_secs(6));
        assert!(
            st.is_some_and(|s| s.success()),
            "{io}: exit {st:?} {:?} after SIGTERM; stderr:\n{}",
            t0.elapsed(),
            lb.stderr_tail(20)
        );
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{io}: took {:?}",
            t0.elapsed()
        );
        drop(sessions);
        for h in backends {
            h.join().expect("fake backend");
        }
        assert_no_panic(&lb, &io);
    }
}

/// A session is idle after ReadyForQuery(I) only while the backend's stream is at a message
/// boundary. Here the backend, after an idle ReadyForQuery, starts a NoticeResponse (header and
/// 10 of its 100 body bytes) and finishes it later: a drain that closes the session "idle" in
/// between hands the client a cut message. Expected: the client's bytes end at a message
/// boundary (the close waits for the notice's end, or for drain_timeout).
#[test]
fn a_drain_never_cuts_a_backend_message_in_half() {
    for io in io_backends() {
        // The backend: login, then a notice's first 15 bytes, 3 s later the remaining 90.
        let notice = pg_msg(b'N', &[b'M'; 100]);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().unwrap();
        let (head, tail) = (notice[..15].to_vec(), notice[15..].to_vec());
        let backend = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(&pg_login(b'I'));
            std::thread::sleep(Duration::from_millis(300));
            let _ = s.write_all(&head);
            std::thread::sleep(Duration::from_secs(3));
            let _ = s.write_all(&tail);
            let _ = s.read(&mut buf);
        });
        let lb = start_on(
            &io,
            &ringlb_config([pg_listener("pg", addr).set("drain_timeout", "\"10s\"")]),
        );
        let (mut s, mut got) = pg_session(lb.addr("pg"), Duration::from_millis(700));
        let (code, body) = http_post(admin(&lb), &format!("/backends/pg/{addr}/drain"));
        assert_eq!(code, 200, "{body}");
        let (after, ended, rest) = read_to_close(&mut s, Duration::from_secs(8));
        got.extend(rest);
        assert!(ended, "{io}: not closed");
        let login = pg_login(b'I');
        let complete = got == login || got == [login.clone(), notice.clone()].concat();
        assert!(
            complete,
            "{io}: the client got {} bytes ({} login + {} of a {}-byte notice) and then EOF \
             {after:?} after the drain: a message cut in half",
            got.len(),
            login.len(),
            got.len().saturating_sub(login.len()),
            notice.len()
        );
        drop(s);
        backend.join().unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 3. DNS discovery answers
// ---------------------------------------------------------------------------------------------

fn dns_config(dns: &Dns, listeners: &str) -> String {
    format!(
        "[runtime]\nworkers = {WORKERS}\ndrain_timeout = \"1s\"\n[admin]\nbind = \"127.0.0.1:0\"\n{}\n{listeners}",
        dns.dns_section("")
    )
}

fn dns_backends(lb: &Lb, l: &str) -> f64 {
    metric(
        &scrape(admin(lb)),
        "ringlb_dns_backends",
        &[("listener", l), ("pool", "default")],
    )
    .unwrap_or(-1.0)
}

/// 500 A records for one name (a TCP-only answer: it does not fit a UDP datagram): the pool
/// takes all of them, the endpoint stays responsive, connections to the one live address work.
#[test]
fn five_hundred_a_records_make_a_pool_of_five_hundred() {
    let echo = EchoServer::start();
    let mut hosts = String::from("127.0.0.1 many.ringlb.test\n");
    for i in 1..500 {
        hosts.push_str(&format!(
            "127.0.{}.{} many.ringlb.test\n",
            1 + i / 250,
            1 + i % 250
        ));
    }
    let dns = Dns::start(&hosts, &[]);
    let port = echo.addr().port();
    let toml = dns_config(
        &dns,
        &format!(
            "[[listeners]]\nname = \"many\"\nbind = \"127.0.0.1:0\"\nbalance = \"maglev\"\n\
             discovery = {{ name = \"many.ringlb.test\", type = \"A\", port = {port} }}\n"
        ),
    );
    for io in io_backends() {
        let lb = start_on(&io, &toml);
        must(Duration::from_secs(10), "500 DNS backends", || {
            dns_backends(&lb, "many") == 500.0
        });
        common::admin::assert_live_within(admin(&lb), Duration::from_secs(2), "500 backends");
        let (code, _) = try_http_request(admin(&lb), "GET", "/status", b"").expect("status");
        assert_eq!(code, 200);
        assert_no_panic(&lb, &io);
    }
}

/// A name that resolves to the listener's own address (127.0.0.1 with the listener's port):
/// the static config refuses such a backend ("the listener would connect to itself in a
/// loop"); from DNS it is taken, and one client connection turns into a storm of connections
/// from ringlb to itself, up to max_connections. Expected: the address is not used (with a
/// warning), so one client is one accepted connection.
#[test]
fn a_dns_answer_that_is_the_listener_itself_is_not_used() {
    for io in io_backends() {
        let port = common::procs::free_port();
        let dns = Dns::start("127.0.0.1 self.ringlb.test\n", &[]);
        let toml = dns_config(
            &dns,
            &format!(
                "[[listeners]]\nname = \"loop\"\nbind = \"127.0.0.1:{port}\"\n\
                 max_connections = 60\nqueue_timeout = \"0s\"\nconnect_timeout = \"500ms\"\n\
                 idle_timeout = \"3s\"\n\
                 discovery = {{ name = \"self.ringlb.test\", type = \"A\", port = {port} }}\n"
            ),
        );
        let lb = start_on(&io, &toml);
        let a = admin(&lb);
        let mut s = try_connect(lb.addr("loop")).expect("connect");
        let _ = s.write_all(b"hello?\n");
        std::thread::sleep(Duration::from_secs(1));
        let accepted =
            metric(&scrape(a), "ringlb_accepted_total", &[("listener", "loop")]).unwrap_or(0.0);
        let warned = lb
            .stderr_lines()
            .iter()
            .any(|l| l.contains("WARN") && (l.contains("itself") || l.contains("own address")));
        drop(s);
        assert!(
            accepted <= 1.0 && warned,
            "{io}: one client connection made the listener accept {accepted} connections \
             (from ringlb itself) and warned: {warned}; stderr tail:\n{}",
            lb.stderr_tail(10)
        );
    }
}

/// A name that resolves to 0.0.0.0 (a common "blocked" sinkhole answer): the static config
/// refuses an unspecified backend address; from DNS it is taken and, on Linux, a connect to
/// 0.0.0.0 reaches whatever listens on the local host at that port. Expected: skipped with a
/// warning, so the pool has no backend from that answer.
#[test]
fn a_dns_answer_of_0_0_0_0_is_not_a_backend() {
    let local = NamedServer::start("local-service");
    let dns = Dns::start("0.0.0.0 sink.ringlb.test\n", &[]);
    let port = local.addr().port();
    let toml = dns_config(
        &dns,
        &format!(
            "[[listeners]]\nname = \"sink\"\nbind = \"127.0.0.1:0\"\n\
             discovery = {{ name = \"sink.ringlb.test\", type = \"A\", port = {port} }}\n"
        ),
    );
    for io in io_backends() {
        let lb = start_on(&io, &toml);
        std::thread::sleep(Duration::from_millis(600));
        let n = dns_backends(&lb, "sink");
        let got = send_and_read(lb.addr("sink"), b"");
        assert!(
            n == 0.0 && got.is_empty(),
            "{io}: the pool has {n} DNS backend(s) from a 0.0.0.0 answer and a client reached \
             {:?} on the local host",
            String::from_utf8_lossy(&got)
        );
    }
}

/// SRV records with port 0 (skipped), weight 0 (taken as 1, not drained) and weight 65535: the
/// pool has the two usable targets, traffic flows, nothing panics.
#[test]
fn srv_records_with_port_0_and_extreme_weights_are_handled() {
    let (b2, b3) = (NamedServer::start("b2"), NamedServer::start("b3"));
    let srv = |port: u16, prio: u16, weight: u16| {
        format!("_web._tcp.ringlb.test,t.ringlb.test,{port},{prio},{weight}")
    };
    let dns = Dns::start(
        "127.0.0.1 t.ringlb.test\n",
        &[
            srv(0, 0, 1),
            srv(b2.addr().port(), 0, 0),
            srv(b3.addr().port(), 0, 65535),
        ],
    );
    for balance in ["round_robin", "maglev", "least_connections"] {
        let toml = dns_config(
            &dns,
            &format!(
                "[[listeners]]\nname = \"srv\"\nbind = \"127.0.0.1:0\"\nbalance = \"{balance}\"\n\
                 discovery = {{ name = \"_web._tcp.ringlb.test\", type = \"SRV\" }}\n"
            ),
        );
        for io in io_backends() {
            let lb = start_on(&io, &toml);
            must(Duration::from_secs(5), "2 SRV backends", || {
                dns_backends(&lb, "srv") == 2.0
            });
            for _ in 0..10 {
                let got = send_and_read(lb.addr("srv"), b"");
                assert!(
                    got == b"b2" || got == b"b3",
                    "{io} {balance}: got {:?}",
                    String::from_utf8_lossy(&got)
                );
            }
            assert_no_panic(&lb, &io);
        }
    }
}

/// A second loopback address serving `name` on `port` (the first one's port): two backends one
/// A-record name can alternate between.
fn named_on(
    ip: [u8; 4],
    port: u16,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let l = TcpListener::bind(SocketAddr::from((ip, port))).expect("bind second loopback address");
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(name.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    })
}

/// Answers that flap between two addresses every refresh, for 4 s, while clients connect: every
/// client reaches one of them (or, rarely, none), nothing panics, the registry does not grow.
#[test]
fn answers_flapping_every_refresh_keep_serving() {
    let stop = Arc::new(AtomicBool::new(false));
    let first = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = first.local_addr().unwrap().port();
    drop(first);
    let h1 = named_on([127, 0, 0, 1], port, "one", stop.clone());
    let h2 = named_on([127, 0, 0, 2], port, "two", stop.clone());
    let dns = Dns::start("127.0.0.1 flap.ringlb.test\n", &[]);
    let toml = dns_config(
        &dns,
        &format!(
            "[[listeners]]\nname = \"flap\"\nbind = \"127.0.0.1:0\"\n\
             discovery = {{ name = \"flap.ringlb.test\", type = \"A\", port = {port} }}\n"
        ),
    );
    for io in io_backends() {
        let lb = start_on(&io, &toml);
        let t0 = Instant::now();
        let (mut ok, mut failed, mut flips) = (0, 0, 0u32);
        let mut last_flip = Instant::now();
        while t0.elapsed() < Duration::from_secs(4) && ok + failed < 2000 {
            if last_flip.elapsed() >= Duration::from_millis(250) {
                flips += 1;
                dns.set_hosts(if flips % 2 == 0 {
                    "127.0.0.1 flap.ringlb.test\n"
                } else {
                    "127.0.0.2 flap.ringlb.test\n127.0.0.1 other.ringlb.test\n"
                });
                last_flip = Instant::now();
            }
            let got = send_and_read(lb.addr("flap"), b"");
            if got == b"one" || got == b"two" {
                ok += 1;
            } else {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            ok > 0 && failed * 10 <= ok + failed,
            "{io}: {ok} ok, {failed} failed over {flips} flips"
        );
        let s = scrape(admin(&lb));
        let backends =
            common::admin::samples(&s, "ringlb_backend_up", &[("listener", "flap")]).count();
        assert!(
            backends <= 2,
            "{io}: {backends} backends in the metrics after flapping"
        );
        assert_no_panic(&lb, &io);
        dns.set_hosts("127.0.0.1 flap.ringlb.test\n");
    }
    stop.store(true, Ordering::Relaxed);
    h1.join().unwrap();
    h2.join().unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Admin endpoint and upgrade
// ---------------------------------------------------------------------------------------------

/// New processes a test upgraded to: SIGKILLed when the test ends (declare after the `Lb`).
struct NewProcesses(Vec<u32>);

impl Drop for NewProcesses {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let t0 = Instant::now();
        while self
            .0
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
            && t0.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Pids named by `upgrade: pid N is ready and serves` lines.
fn ready_pids(lb: &Lb) -> Vec<u32> {
    lb.stderr_lines()
        .iter()
        .filter(|l| l.contains("is ready and serves"))
        .filter_map(|l| {
            let rest = &l[l.find("upgrade: pid ")? + "upgrade: pid ".len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

fn upgrade_config(echo: &EchoServer) -> String {
    common::LbConfig::default()
        .drain_timeout("2s")
        .listener(listener("web").backend(echo.addr()))
        .to_toml()
}

/// Raw HTTP/1.1 request bytes to `addr`; the status code of the answer (0 if none).
fn raw_status(addr: SocketAddr, req: &[u8], within: Duration) -> u16 {
    let Ok(mut s) = try_connect(addr) else {
        return 0;
    };
    s.set_read_timeout(Some(within)).unwrap();
    if s.write_all(req).is_err() {
        return 0;
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.windows(4).any(|w| w == b"\r\n\r\n") && raw.len() > 12 {
            break;
        }
    }
    std::str::from_utf8(raw.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Hostile `POST /upgrade`s that must not start an upgrade: a body declared over the limit,
/// a chunked body that never ends, a foreign Host, an Origin. Then six at once (plain, with a
/// body, chunked): exactly one upgrade, one 200, the others 409; the old process exits 0.
#[test]
fn hostile_and_concurrent_post_upgrade_make_exactly_one_upgrade() {
    let echo = EchoServer::start();
    for io in io_backends() {
        let mut lb = start_on(&io, &upgrade_config(&echo));
        let mut new = NewProcesses(Vec::new());
        let a = admin(&lb);
        let host = format!("Host: {a}\r\n");
        let huge = format!("POST /upgrade HTTP/1.1\r\n{host}Content-Length: 100000000\r\n\r\n");
        assert_eq!(raw_status(a, huge.as_bytes(), Duration::from_secs(3)), 413);
        let endless = format!(
            "POST /upgrade HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        );
        assert_eq!(
            raw_status(a, endless.as_bytes(), Duration::from_secs(8)),
            408
        );
        let (code, _) =
            try_http_with(a, "POST", "/upgrade", &[("Host", "evil.example")], b"").unwrap();
        assert_eq!(code, 403, "foreign Host");
        let (code, _) = try_http_with(
            a,
            "POST",
            "/upgrade",
            &[("Origin", "http://evil.example")],
            b"",
        )
        .unwrap();
        assert_eq!(code, 403, "Origin");
        assert!(
            !lb.stderr_lines()
                .iter()
                .any(|l| l.contains("binary upgrade")),
            "{io}: a refused request started an upgrade"
        );

        let chunked = format!(
            "POST /upgrade HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             5\r\nhello\r\n0\r\n\r\n"
        );
        let with_body = format!(
            "POST /upgrade HTTP/1.1\r\n{host}Content-Length: 11\r\nConnection: close\r\n\r\nhello world"
        );
        let plain = format!("POST /upgrade HTTP/1.1\r\n{host}Connection: close\r\n\r\n");
        let reqs = [
            chunked.clone(),
            with_body,
            plain.clone(),
            plain.clone(),
            chunked,
            plain,
        ];
        let go = Arc::new(std::sync::Barrier::new(reqs.len()));
        let threads: Vec<_> = reqs
            .into_iter()
            .map(|r| {
                let go = go.clone();
                std::thread::spawn(move || {
                    go.wait();
                    raw_status(a, r.as_bytes(), Duration::from_secs(40))
                })
            })
            .collect();
        let mut codes: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        codes.sort_unstable();
        std::thread::sleep(Duration::from_millis(500));
        let pids = ready_pids(&lb);
        new.0.extend(&pids);
        assert_eq!(
            pids.len(),
            1,
            "{io}: upgrades made: {pids:?}; codes {codes:?}"
        );
        assert_eq!(codes, [200, 409, 409, 409, 409, 409], "{io}");
        common::payload::echo(lb.addr("web"), 1000, 7);
        let st = lb.wait_exit_only(Duration::from_secs(6));
        assert!(st.is_some_and(|s| s.success()), "{io}: old process: {st:?}");
        assert_no_panic(&lb, &io);
    }
}

/// SIGUSR2 twice in quick succession: one upgrade (the second is refused or coalesced), the
/// old process exits 0 and the new one serves.
#[test]
fn sigusr2_twice_quickly_makes_one_upgrade() {
    let echo = EchoServer::start();
    for io in io_backends() {
        let mut lb = start_on(&io, &upgrade_config(&echo));
        let mut new = NewProcesses(Vec::new());
        lb.signal(Signal::SIGUSR2);
        lb.signal(Signal::SIGUSR2);
        std::thread::sleep(Duration::from_millis(30));
        lb.signal(Signal::SIGUSR2);
        assert!(lb.wait_for_log("is ready and serves", Duration::from_secs(15)));
        std::thread::sleep(Duration::from_millis(500));
        let pids = ready_pids(&lb);
        new.0.extend(&pids);
        assert_eq!(pids.len(), 1, "{io}: {pids:?}");
        common::payload::echo(lb.addr("web"), 1000, 8);
        let st = lb.wait_exit_only(Duration::from_secs(6));
        assert!(st.is_some_and(|s| s.success()), "{io}: old process: {st:?}");
        assert!(
            pids.iter()
                .all(|&p| kill(Pid::from_raw(p as i32), None).is_ok()),
            "{io}: the new process died"
        );
        assert_no_panic(&lb, &io);
    }
}
