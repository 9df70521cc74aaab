//! Operations end to end through the real binary (2 workers): hitless SIGHUP reloads, a refused
//! reload, listeners added and removed by reload (with `drain_timeout`), backend drain by
//! `weight = 0` and by the admin endpoint, per-backend `max_connections` with queueing, PROXY
//! protocol out (v1, v2, IPv6) and in (good and malformed headers), and TCP keepalive on both
//! legs as `ss` shows it.

mod common;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::admin::{http_post, metric_sum, scrape};
use common::ops::*;
use common::*;
use ringlb::proxy_protocol::{encode, parse, Version, MAX_ENCODED};

/// How long a test waits for something asynchronous (a counter, a log line) to settle.
const SETTLE: Duration = Duration::from_secs(2);

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin endpoint line; stderr:\n{}", lb.stderr_tail(20)))
}

/// Which [`NamedEcho`] a new connection to `addr` reaches (the connection is then closed).
fn try_ask(addr: SocketAddr) -> io::Result<String> {
    let mut s = try_connect(addr)?;
    read_name_line(&mut s)
}

fn ask(addr: SocketAddr) -> String {
    try_ask(addr).unwrap_or_else(|e| panic!("reading a backend name through {addr}: {e}"))
}

/// The backends `n` new connections to `addr` reach, counted by name.
fn ask_n(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        *m.entry(ask(addr)).or_default() += 1;
    }
    m
}

/// Opens a connection to `addr`, reads the backend's name and checks a round trip: the
/// connection is established end to end when this returns.
fn open_named(addr: SocketAddr, seed: u64) -> (TcpStream, String) {
    let mut s = connect(addr);
    let name = read_name_line(&mut s)
        .unwrap_or_else(|e| panic!("reading a backend name through {addr}: {e}"));
    ping(&mut s, 64, seed);
    (s, name)
}

/// Waits up to `timeout` for the peer to end `s`, failing if any byte arrives first. Returns
/// how the stream ended and when (from the call).
fn expect_end_without_data(
    s: &mut TcpStream,
    timeout: Duration,
    what: &str,
) -> (StreamEnd, Duration) {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        assert!(!left.is_zero(), "{what}: still open after {timeout:?}");
        s.set_read_timeout(Some(left)).expect("set_read_timeout");
        match s.read(&mut buf) {
            Ok(0) => return (StreamEnd::Eof, t0.elapsed()),
            Ok(n) => panic!("{what}: received {n} bytes: {:?}", &buf[..n.min(64)]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return (StreamEnd::Reset, t0.elapsed())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what}: still open after {timeout:?}")
            }
            Err(e) => panic!("{what}: read: {e}"),
        }
    }
}

/// What one short-connection client thread saw.
#[derive(Default)]
struct ClientRun {
    attempts: usize,
    names: BTreeMap<String, usize>,
    failures: Vec<String>,
}

/// Opens short connections to `addr` until `stop` (bounded by count and time), reading the
/// backend name on each.
fn short_connections(addr: SocketAddr, stop: &AtomicBool) -> ClientRun {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut run = ClientRun::default();
    while !stop.load(Ordering::SeqCst) && run.attempts < 3000 && Instant::now() < deadline {
        run.attempts += 1;
        match try_ask(addr) {
            Ok(name) => *run.names.entry(name).or_default() += 1,
            Err(e) => run.failures.push(format!("attempt {}: {e}", run.attempts)),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    run
}

#[test]
fn ten_reloads_under_load_lose_no_connection() {
    let servers = ["A", "B", "C", "D"].map(NamedEcho::start);
    let [a, b, c, d] = &servers;
    let v1 = ringlb_config([listener("web").backend(a.addr()).backend(b.addr())]);
    let v2 = ringlb_config([listener("web").backend(c.addr()).backend(d.addr())]);
    let lb = Lb::start(&v1);
    let web = lb.addr("web");

    let (mut long, long_name) = open_named(web, 0x0e01_0001);
    assert!(["A", "B"].contains(&long_name.as_str()), "{long_name}");

    let stop = AtomicBool::new(false);
    let runs: Vec<ClientRun> = std::thread::scope(|sc| {
        let clients: Vec<_> = (0..4)
            .map(|_| sc.spawn(|| short_connections(web, &stop)))
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        for i in 0..10 {
            let (toml, which) = if i % 2 == 0 { (&v1, "v1") } else { (&v2, "v2") };
            let (_, line) = reload_ok(&lb, toml);
            assert!(
                line.contains("listeners: 0 added, 0 removed"),
                "reload {i} ({which}) should keep the listener: {line}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::SeqCst);
        clients
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });

    let attempts: usize = runs.iter().map(|r| r.attempts).sum();
    let failures: Vec<&String> = runs.iter().flat_map(|r| &r.failures).collect();
    let mut names = BTreeMap::<&str, usize>::new();
    for r in &runs {
        for (n, k) in &r.names {
            *names.entry(n.as_str()).or_default() += k;
        }
    }
    eprintln!("{attempts} short connections during 10 reloads, by backend: {names:?}");
    assert!(
        failures.is_empty(),
        "{} of {attempts} client connections failed during reloads, first ones: {:?}\nstderr tail:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        lb.stderr_tail(30)
    );
    assert!(attempts >= 40, "only {attempts} client connections ran");
    assert!(
        names.keys().all(|n| ["A", "B", "C", "D"].contains(n)),
        "{names:?}"
    );
    assert!(
        names.contains_key("A") || names.contains_key("B"),
        "no connection reached v1's backends: {names:?}"
    );
    assert!(
        names.contains_key("C") || names.contains_key("D"),
        "no connection reached v2's backends: {names:?}"
    );

    // The long-lived connection reached A or B, removed by the last reload (v2, no
    // drain_timeout): it continues.
    ping(&mut long, 1000, 0x0e01_0002);

    let after = ask_n(web, 20);
    assert!(
        after.keys().all(|n| n == "C" || n == "D"),
        "after the last reload (v2), new connections must reach only C/D: {after:?}"
    );
    assert_eq!(after.len(), 2, "round robin over C and D: {after:?}");
    try_echo_stream(&mut long, 10_000, 0x0e01_0003)
        .unwrap_or_else(|e| panic!("long-lived connection to {long_name} at the end: {e}"));
}

#[test]
fn refused_reload_keeps_the_previous_configuration() {
    let [a, b, c] = ["A", "B", "C"].map(NamedEcho::start);
    let good = ringlb_config([listener("web").backend(a.addr()).backend(b.addr())]);
    let lb = Lb::start(&good);
    let admin = admin(&lb);
    let web = lb.addr("web");

    // A file that would switch to A and C, but with a weight the loader refuses.
    let valid = ringlb_config([listener("web").weighted(a.addr(), 1).backend(c.addr())]);
    let needle = format!("address = \"{}\", weight = 1", a.addr());
    assert!(valid.contains(&needle), "config layout changed:\n{valid}");
    let bad = valid.replace(&needle, &format!("address = \"{}\", weight = -1", a.addr()));

    let (_, line) = sighup_reload(&lb, &bad);
    assert!(
        line.contains("failed, still running the previous configuration"),
        "SIGHUP with weight = -1: {line}"
    );
    assert!(
        line.contains("weight") && line.contains("-1"),
        "the reload error should name the field and the value: {line}"
    );

    let got = ask_n(web, 20);
    assert_eq!(
        got,
        BTreeMap::from([("A".to_string(), 10), ("B".to_string(), 10)]),
        "after the refused reload, the old backends (A, B round robin) serve"
    );
    assert_eq!(c.accepted(), 0, "C is only in the refused file");

    let (code, body) = http_post(admin, "/reload");
    assert_eq!(code, 400, "POST /reload with weight = -1: {body}");
    assert!(
        body.contains("weight") && body.contains("-1"),
        "POST /reload should name the field and the value: {body:?}"
    );
    let got = ask_n(web, 4);
    assert!(got.keys().all(|n| n == "A" || n == "B"), "{got:?}");
    assert_eq!(c.accepted(), 0);

    // Fixed, the same file loads.
    std::fs::write(lb.config_path(), &valid).expect("write config");
    let (code, body) = http_post(admin, "/reload");
    assert_eq!(code, 200, "POST /reload with the fixed file: {body}");
    let got = ask_n(web, 10);
    assert_eq!(
        got,
        BTreeMap::from([("A".to_string(), 5), ("C".to_string(), 5)]),
        "after the fixed reload"
    );
}

#[test]
fn reload_adds_a_listener_then_removes_it_with_drain_timeout() {
    let ea = EchoServer::start();
    let eb = EchoServer::start();
    let one = ringlb_config([listener("a").backend(ea.addr())]);
    let two = ringlb_config([
        listener("a").backend(ea.addr()),
        listener("b")
            .backend(eb.addr())
            .set("drain_timeout", "\"1s\""),
    ]);
    let lb = Lb::start(&one);
    let a = lb.addr("a");
    echo(a, 1000, 0x0e03_0001);

    let (mark, line) = reload_ok(&lb, &two);
    assert!(line.contains("listeners: 1 added, 0 removed"), "{line}");
    let b = listening_addr_since(&lb, mark, "b");
    assert_ne!(b.port(), 0);
    echo(b, 10_000, 0x0e03_0002);
    assert_eq!(eb.accepted(), 1, "b's connection reaches b's backend");
    let mut open = connect(b);
    ping(&mut open, 64, 0x0e03_0003);

    let (_, line) = reload_ok(&lb, &one);
    let t0 = Instant::now();
    assert!(line.contains("listeners: 0 added, 1 removed"), "{line}");
    // Right after the removal the open connection still works.
    ping(&mut open, 64, 0x0e03_0004);
    let ping_done = t0.elapsed();

    // New connections to b's port are refused within about a second.
    let mut accepted_after_removal = 0;
    let refused_at = loop {
        match TcpStream::connect_timeout(&b, Duration::from_millis(200)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break t0.elapsed(),
            Err(e) => panic!("connect to removed listener {b}: {e} (expected refused)"),
            Ok(_) => accepted_after_removal += 1,
        }
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "removed listener {b} still accepts {:?} after the reload line \
             ({accepted_after_removal} connects accepted); stderr tail:\n{}",
            t0.elapsed(),
            lb.stderr_tail(20)
        );
        std::thread::sleep(Duration::from_millis(20));
    };

    // The open connection is closed drain_timeout (1s) after the removal.
    let (end, _) =
        expect_end_without_data(&mut open, Duration::from_secs(3), "b's open connection");
    let closed_at = t0.elapsed();
    eprintln!(
        "ping after removal done at {ping_done:?}, refused at {refused_at:?}, open connection \
         ended ({end:?}) at {closed_at:?}"
    );
    assert!(
        closed_at >= Duration::from_millis(700) && closed_at <= Duration::from_millis(2000),
        "b's open connection should close ~1s (drain_timeout) after its removal; closed after \
         {closed_at:?} (from the reload line)"
    );
    assert!(
        eb.wait_live(0, SETTLE),
        "b's backend leg still open ({} live)",
        eb.live()
    );
    echo(a, 1000, 0x0e03_0005);
}

#[test]
fn weight_zero_and_admin_drain_stop_only_new_connections() {
    let [a, b, c] = ["A", "B", "C"].map(NamedEcho::start);
    let cfg = |wa: u32| {
        ringlb_config([listener("web")
            .weighted(a.addr(), wa)
            .weighted(b.addr(), 1)
            .weighted(c.addr(), 1)])
    };
    let lb = Lb::start(&cfg(1));
    let admin = admin(&lb);
    let web = lb.addr("web");

    let mut to_a = None;
    let mut to_b = None;
    for i in 0..9 {
        let (s, name) = open_named(web, 0x0e04_0000 + i);
        match name.as_str() {
            "A" if to_a.is_none() => to_a = Some(s),
            "B" if to_b.is_none() => to_b = Some(s),
            _ => {}
        }
    }
    let (mut to_a, mut to_b) = (
        to_a.expect("a connection to A in 9"),
        to_b.expect("a connection to B in 9"),
    );

    // weight = 0 by reload: A's open connection stays, new ones avoid it.
    reload_ok(&lb, &cfg(0));
    ping(&mut to_a, 1000, 0x0e04_0101);
    let got = ask_n(web, 20);
    assert_eq!(
        got,
        BTreeMap::from([("B".to_string(), 10), ("C".to_string(), 10)]),
        "with A at weight 0"
    );
    ping(&mut to_a, 1000, 0x0e04_0102);

    // Admin drain of B: only C is left for new connections.
    let path = |who: SocketAddr, action: &str| format!("/backends/web/{who}/{action}");
    let (code, body) = http_post(admin, &path(b.addr(), "drain"));
    assert_eq!(code, 200, "drain B: {body}");
    let got = ask_n(web, 20);
    assert_eq!(
        got,
        BTreeMap::from([("C".to_string(), 20)]),
        "with A at weight 0 and B drained"
    );
    ping(&mut to_b, 1000, 0x0e04_0201);
    ping(&mut to_a, 1000, 0x0e04_0202);

    let (code, body) = http_post(admin, &path(b.addr(), "undrain"));
    assert_eq!(code, 200, "undrain B: {body}");
    let got = ask_n(web, 20);
    assert!(
        got.get("B").is_some_and(|&n| n >= 5) && !got.contains_key("A"),
        "after undrain B gets connections again, A (weight 0) none: {got:?}"
    );

    let unknown = SocketAddr::from(([127, 0, 0, 1], 1));
    let (code, body) = http_post(admin, &path(unknown, "drain"));
    assert_eq!(code, 400, "drain of an unknown backend: {body}");
    let (code, body) = http_post(admin, &format!("/backends/nope/{}/drain", b.addr()));
    assert_eq!(code, 400, "drain on an unknown listener: {body}");

    try_echo_stream(&mut to_a, 10_000, 0x0e04_0301)
        .unwrap_or_else(|e| panic!("A's connection at the end: {e}"));
    try_echo_stream(&mut to_b, 10_000, 0x0e04_0302)
        .unwrap_or_else(|e| panic!("B's connection at the end: {e}"));
}

#[test]
fn full_backend_queues_then_times_out() {
    let e = EchoServer::start();
    let toml = ringlb_config([listener("q")
        .backend(e.addr())
        .set("queue_timeout", "\"2s\"")]);
    let lb = Lb::start(&with_backend_fields(&toml, e.addr(), "max_connections = 2"));
    let q = lb.addr("q");
    let admin = admin(&lb);

    let mut c1 = connect(q);
    ping(&mut c1, 32, 0x0e05_0001);
    let mut c2 = connect(q);
    ping(&mut c2, 32, 0x0e05_0002);
    assert_eq!(e.accepted(), 2);

    // A third client is accepted by the LB but waits for a slot: its echo does not come.
    let mut c3 = connect(q);
    let out3 = Pattern::bytes(0x0e05_0003, 32);
    c3.write_all(&out3).expect("write c3");
    c3.set_read_timeout(Some(Duration::from_millis(600)))
        .expect("set_read_timeout");
    let mut back3 = vec![0u8; 32];
    match c3.read(&mut back3) {
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the 3rd client should be queued (no answer), got {other:?}"),
    }
    assert_eq!(
        e.accepted(),
        2,
        "the backend is full: no 3rd connection to it"
    );

    // A slot frees: the queued client goes through at once.
    drop(c1);
    let t0 = Instant::now();
    c3.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("set_read_timeout");
    c3.read_exact(&mut back3).unwrap_or_else(|err| {
        panic!(
            "3rd client after a slot freed: {err}; stderr tail:\n{}",
            lb.stderr_tail(20)
        )
    });
    let waited = t0.elapsed();
    assert_eq!(back3, out3, "3rd client's echo");
    assert!(
        waited <= Duration::from_secs(1),
        "the queued client took {waited:?} after a slot freed"
    );
    assert_eq!(e.accepted(), 3);

    // Both slots held (c2, c3): a 4th client waits queue_timeout (2s), then is closed.
    let mut c4 = connect(q);
    c4.write_all(b"queued and never served").expect("write c4");
    let (end, after) = expect_end_without_data(&mut c4, Duration::from_secs(4), "4th client");
    eprintln!("4th client: {end:?} after {after:?}");
    assert!(
        after >= Duration::from_millis(1500) && after <= Duration::from_millis(3000),
        "the 4th client should be closed ~2s (queue_timeout) after connecting; closed after {after:?}"
    );
    assert_eq!(
        e.accepted(),
        3,
        "the timed-out client never reached the backend"
    );

    let mut timeouts = 0.0;
    let counted = wait_until(SETTLE, || {
        timeouts = metric_sum(
            &scrape(admin),
            "ringlb_closes_total",
            &[("listener", "q"), ("reason", "queue_timeout")],
        );
        timeouts >= 1.0
    });
    assert!(
        counted,
        "ringlb_closes_total{{reason=\"queue_timeout\"}} = {timeouts}"
    );

    ping(&mut c2, 32, 0x0e05_0004);
    ping(&mut c3, 32, 0x0e05_0005);
}

/// Starts an LB with listeners `pp1` (proxy_protocol v1) and `pp2` (v2) in front of `pe`, bound
/// on `bind`.
fn proxy_out_lb(pe: &ProxyEcho, bind: &str) -> Lb {
    let toml = ringlb_config([
        listener("pp1")
            .backend(pe.addr())
            .set("proxy_protocol", "\"v1\""),
        listener("pp2")
            .backend(pe.addr())
            .set("proxy_protocol", "\"v2\""),
    ]);
    let toml = with_bind(&with_bind(&toml, "pp1", bind), "pp2", bind);
    Lb::start(&toml)
}

/// Connects to each of `lb`'s PROXY listeners (from `src` when given), checks the echo and the
/// header the backend received: source the client's address, destination the listener's.
fn check_proxy_out(lb: &Lb, pe: &ProxyEcho, src: Option<SocketAddr>, family: &str) {
    for (name, version, seed) in [
        ("pp1", Version::V1, 0x0e06_0001),
        ("pp2", Version::V2, 0x0e06_0002),
    ] {
        let to = lb.addr(name);
        let mut s = match src {
            Some(src) => connect_from(src, to),
            None => connect(to),
        };
        let client = s.local_addr().expect("local_addr");
        ping(&mut s, 100, seed);
        let h = pe.header_from(client, SETTLE).unwrap_or_else(|| {
            panic!(
                "{name}: no header with source {client}; got {:?}",
                pe.headers()
            )
        });
        assert_eq!(h.version, version, "{name}: {h:?}");
        assert_eq!(
            h.dest,
            Some(to),
            "{name}: destination should be the listener: {h:?}"
        );
        let want = match version {
            Version::V1 => format!(
                "PROXY {family} {} {} {} {}\r\n",
                client.ip(),
                to.ip(),
                client.port(),
                to.port()
            )
            .into_bytes(),
            Version::V2 => {
                let mut out = [0u8; MAX_ENCODED];
                let n = encode(Version::V2, client, to, &mut out);
                out[..n].to_vec()
            }
        };
        assert_eq!(
            h.raw,
            want,
            "{name}: header bytes {:?}",
            String::from_utf8_lossy(&h.raw)
        );
        try_echo_stream(&mut s, 100_000, seed + 0x100)
            .unwrap_or_else(|e| panic!("{name}: echo after the header: {e}"));
    }
    assert!(pe.errors().is_empty(), "backend errors: {:?}", pe.errors());
}

#[test]
fn proxy_protocol_out_v1_and_v2_carry_the_client_address() {
    let pe = ProxyEcho::start();
    let lb = proxy_out_lb(&pe, "127.0.0.1:0");
    let src = SocketAddr::from(([127, 0, 0, 7], 0));
    check_proxy_out(&lb, &pe, Some(src), "TCP4");
    let sources: Vec<Option<IpAddr>> = pe
        .headers()
        .iter()
        .map(|h| h.source.map(|s| s.ip()))
        .collect();
    assert_eq!(sources, [Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7))); 2]);
}

#[test]
fn proxy_protocol_out_over_ipv6() {
    if let Err(e) = TcpListener::bind("[::1]:0") {
        eprintln!("skipping proxy_protocol_out_over_ipv6: cannot bind [::1]:0 ({e})");
        return;
    }
    let pe = ProxyEcho::start();
    let lb = proxy_out_lb(&pe, "[::1]:0");
    assert!(lb.addr("pp1").is_ipv6(), "{}", lb.addr("pp1"));
    check_proxy_out(&lb, &pe, None, "TCP6");
}

/// A v2 signature followed by version 1 (the version nibble must be 2) and a plausible rest.
fn v2_with_bad_version() -> Vec<u8> {
    let mut v = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v.extend_from_slice(&[0x11, 0x11, 0x00, 0x0c]);
    v.extend_from_slice(&[192, 0, 2, 1, 127, 0, 0, 1, 0x15, 0xb3, 0x00, 0x50]);
    v
}

/// Sends a PROXY header (and `after`, in a separate write when `split`) through `lb` and checks
/// the echo of `after` and the source of the header the backend received.
fn send_through_proxy(
    lb: SocketAddr,
    pe: &ProxyEcho,
    header: &[u8],
    claimed: SocketAddr,
    split: bool,
    seed: u64,
) {
    let mut s = connect(lb);
    let payload = Pattern::bytes(seed, 300);
    if split {
        s.write_all(header).expect("write header");
        std::thread::sleep(Duration::from_millis(50));
        s.write_all(&payload).expect("write payload");
    } else {
        s.write_all(&[header, &payload].concat())
            .expect("write header + payload");
    }
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)
        .unwrap_or_else(|e| panic!("echo after a header claiming {claimed}: {e}"));
    assert!(
        back == payload,
        "bytes after the header arrive intact (claimed {claimed})"
    );
    let h = pe
        .header_from(claimed, SETTLE)
        .unwrap_or_else(|| panic!("no header with source {claimed}; got {:?}", pe.headers()));
    assert_eq!(h.version, Version::V2, "{h:?}");
    eprintln!("header for claimed {claimed}: {h:?}");
    try_echo_stream(&mut s, 10_000, seed + 1).unwrap_or_else(|e| panic!("claimed {claimed}: {e}"));
}

#[test]
fn proxy_protocol_in_takes_the_client_address_and_refuses_bad_headers() {
    let pe = ProxyEcho::start();
    let lb = Lb::start(&ringlb_config([listener("in")
        .backend(pe.addr())
        .set("accept_proxy_protocol", "true")
        .set("proxy_protocol", "\"v2\"")
        .set("proxy_protocol_timeout", "\"1s\"")]));
    let inb = lb.addr("in");
    let admin = admin(&lb);

    let claimed = SocketAddr::from(([192, 0, 2, 10], 5555));
    send_through_proxy(
        inb,
        &pe,
        b"PROXY TCP4 192.0.2.10 127.0.0.1 5555 80\r\n",
        claimed,
        false,
        0x0e07_0001,
    );
    let claimed2 = SocketAddr::from(([192, 0, 2, 11], 6666));
    let mut v2 = [0u8; MAX_ENCODED];
    let n = encode(
        Version::V2,
        claimed2,
        SocketAddr::from(([198, 51, 100, 1], 443)),
        &mut v2,
    );
    send_through_proxy(inb, &pe, &v2[..n], claimed2, true, 0x0e07_0002);
    let reached = pe.accepted();
    assert_eq!(reached, 2);

    let bad: [(&str, Vec<u8>); 3] = [
        ("garbage", b"GET / HTTP/1.0\r\n\r\n".to_vec()),
        ("v1 missing fields", b"PROXY TCP4 1.2.3.4\r\n".to_vec()),
        ("v2 bad version", v2_with_bad_version()),
    ];
    for (what, bytes) in &bad {
        assert!(
            parse(bytes).is_err(),
            "{what}: the codec itself must refuse {bytes:?}"
        );
        let mut s = connect(inb);
        s.write_all(bytes)
            .unwrap_or_else(|e| panic!("{what}: write: {e}"));
        let (end, after) = expect_end_without_data(&mut s, Duration::from_secs(3), what);
        eprintln!("{what}: {end:?} after {after:?}");
        assert!(
            after < Duration::from_millis(900),
            "{what}: closed only after {after:?}, not at once"
        );
    }
    let mut silent = connect(inb);
    let (end, after) =
        expect_end_without_data(&mut silent, Duration::from_millis(3500), "silent client");
    eprintln!("silent client: {end:?} after {after:?}");
    assert!(
        after >= Duration::from_millis(800),
        "silent client closed after {after:?}, before proxy_protocol_timeout (1s)"
    );
    assert_eq!(
        pe.accepted(),
        reached,
        "no bad client may reach the backend"
    );

    // The LB is fine: a good client still goes through.
    let claimed3 = SocketAddr::from(([192, 0, 2, 12], 7777));
    send_through_proxy(
        inb,
        &pe,
        b"PROXY TCP4 192.0.2.12 127.0.0.1 7777 80\r\n",
        claimed3,
        false,
        0x0e07_0003,
    );

    let mut count = 0.0;
    let settled = wait_until(SETTLE, || {
        count = metric_sum(
            &scrape(admin),
            "ringlb_closes_total",
            &[("listener", "in"), ("reason", "bad_proxy_header")],
        );
        count >= 4.0
    });
    assert!(
        settled && count == 4.0,
        "bad_proxy_header closes: {count}, expected 4"
    );
    assert!(pe.errors().is_empty(), "backend errors: {:?}", pe.errors());
}

/// The sockets `ss -tnoH state established` lists: local and peer address, and the timer field
/// if any.
fn ss_sockets() -> Vec<(SocketAddr, SocketAddr, Option<String>)> {
    let out = Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("run ss");
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut addrs = l
                .split_whitespace()
                .filter_map(|t| t.parse::<SocketAddr>().ok());
            let (local, peer) = (addrs.next()?, addrs.next()?);
            let timer = l
                .split_whitespace()
                .find(|t| t.starts_with("timer:("))
                .map(str::to_string);
            Some((local, peer, timer))
        })
        .collect()
}

/// The keepalive timer of `timer:(keepalive,29sec,0)`, or None for another timer or none.
fn keepalive_of(timer: &Option<String>) -> Option<Duration> {
    let t = timer.as_deref()?.strip_prefix("timer:(keepalive,")?;
    parse_ss_duration(t.split(',').next()?)
}

#[test]
fn tcp_keepalive_on_both_legs() {
    if Command::new("ss").arg("-V").output().is_err() {
        eprintln!("skipping tcp_keepalive_on_both_legs: `ss` (iproute2) is not installed");
        return;
    }
    let e = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("ka")
        .backend(e.addr())
        .set("tcp_keepalive", "\"30s\"")]));
    let ka = lb.addr("ka");
    let mut s = connect(ka);
    ping(&mut s, 32, 0x0e08_0001);
    let client = s.local_addr().expect("local_addr");

    let mut seen = (None, None);
    let ok = wait_until(SETTLE, || {
        let socks = ss_sockets();
        let client_leg = socks.iter().find(|(l, p, _)| *l == ka && *p == client);
        let backend_leg = socks.iter().find(|(_, p, _)| *p == e.addr());
        seen = (client_leg.cloned(), backend_leg.cloned());
        let good = |leg: Option<&(SocketAddr, SocketAddr, Option<String>)>| {
            leg.and_then(|(_, _, t)| keepalive_of(t))
                .is_some_and(|d| d > Duration::ZERO && d <= Duration::from_secs(30))
        };
        good(client_leg) && good(backend_leg)
    });
    assert!(
        ok,
        "LB sockets should show a keepalive timer of at most 30s in `ss -tnoH state established`; \
         client leg (local {ka}, peer {client}): {:?}; backend leg (peer {}): {:?}",
        seen.0,
        e.addr(),
        seen.1
    );
    ping(&mut s, 32, 0x0e08_0002);
}
