//! The admin endpoint under hostile or broken clients, through the real binary: bodies declared
//! and never sent (or absurdly large), clients that pipeline and never read, slowloris
//! connections, heads past the size limits, more connections than the cap, descriptor
//! exhaustion, a reload that takes seconds, and random bytes. Each time, the process lives,
//! proxied traffic flows, and `/livez` answers within a second.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::admin::{assert_live_within, http_get, livez_within, parse_response, try_http_with};
use common::*;

/// How quickly `/livez` must answer, whatever else is going on.
const LIVE: Duration = Duration::from_secs(1);
/// The admin endpoint's header read timeout (and idle keep-alive timeout), plus a margin for a
/// loaded machine.
const HEAD_TIMEOUT_AND_MARGIN: Duration = Duration::from_secs(5 + 4);

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin endpoint line; stderr:\n{}", lb.stderr_tail(20)))
}

/// Resident set size of a process (KiB), from /proc/PID/status.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Reads until EOF, a reset or `timeout`; returns what arrived.
fn read_what_comes(s: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        s.set_read_timeout(Some(left)).expect("set_read_timeout");
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

fn status_of(raw: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(raw);
    text.strip_prefix("HTTP/1.")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn assert_alive(lb: &mut Lb, what: &str) {
    if let Some(st) = lb.wait_exit(Duration::from_millis(300)) {
        panic!(
            "ringlb exited ({st}) {what}; stderr:\n{}",
            lb.stderr_tail(20)
        );
    }
}

/// tiny_http tried to drain the declared body after answering and aborted the whole process on
/// the allocation; every proxied connection died with it.
#[test]
fn a_huge_declared_body_is_refused_and_the_process_lives() {
    let backend = EchoServer::start();
    let mut lb = Lb::start(&ringlb_config([listener("web").backend(backend.addr())]));
    let admin = admin(&lb);
    let mut proxied = connect(lb.addr("web"));
    ping(&mut proxied, 100, 1);

    let mut s = connect(admin);
    s.write_all(
        format!(
            "POST /reload HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 1000000000000000\r\n\r\n"
        )
        .as_bytes(),
    )
    .expect("write head");
    let answer = read_what_comes(&mut s, Duration::from_secs(3));
    assert_alive(&mut lb, "after a POST declaring a 1 PB body");
    ping(&mut proxied, 100, 2);
    assert_eq!(
        status_of(&answer),
        Some(413),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert_live_within(admin, LIVE, "after the huge body");
    // The connection was closed without waiting for (or reading) the body.
    assert!(
        wait_stream_end(&mut s, Duration::from_secs(1)).is_ok(),
        "the connection stays open after the 413"
    );
}

/// tiny_http's one admin thread waited forever for the 2000 bytes; nothing else was answered.
#[test]
fn a_declared_body_that_never_comes_does_not_block_livez() {
    let backend = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web").backend(backend.addr())]));
    let admin = admin(&lb);
    let mut stalled = connect(admin);
    stalled
        .write_all(
            format!("POST /reload HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 2000\r\n\r\n")
                .as_bytes(),
        )
        .expect("write head");
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..3 {
        assert_live_within(admin, LIVE, &format!("#{i} while a POST body never comes"));
    }
    // The stalled request ends: 408 once the body read times out, and the connection closes.
    let answer = read_what_comes(&mut stalled, HEAD_TIMEOUT_AND_MARGIN);
    assert_eq!(
        status_of(&answer),
        Some(408),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // A small body that does come is read and ignored.
    let (code, body) = try_http_with(admin, "POST", "/reload", &[], b"{\"ignored\": true}")
        .expect("POST /reload with a small body");
    assert_eq!(code, 200, "{body}");
}

/// Sends `GET /metrics` requests back to back without ever reading, until a write blocks for
/// 2 s or `until` passes. Returns how many went out.
fn pipeline_without_reading(admin: SocketAddr, until: Instant) -> usize {
    let mut s = connect(admin);
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let one = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n\r\n");
    let batch = one.repeat(64);
    let mut sent = 0;
    while Instant::now() < until {
        if s.write_all(batch.as_bytes()).is_err() {
            break;
        }
        sent += 64;
    }
    // Held (unread) until the caller's deadline, then dropped.
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    sent
}

/// tiny_http answered one connection at a time: one client that pipelined requests and never
/// read its responses blocked /livez for everyone, six of them grew the process by over 300 MiB,
/// and slowloris connections cost a thread each.
#[test]
fn non_readers_and_slowloris_do_not_block_livez_or_grow_memory() {
    raise_fd_limit();
    let backend = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web").backend(backend.addr())]));
    let admin = admin(&lb);
    let rss_before = vm_rss_kib(lb.pid());
    let until = Instant::now() + Duration::from_secs(4);
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..6)
            .map(|_| scope.spawn(move || pipeline_without_reading(admin, until)))
            .collect();
        // 100 slowloris connections: a request head that never ends, a byte now and then.
        let mut slow: Vec<TcpStream> = (0..100)
            .map(|i| {
                let mut s = connect(admin);
                s.write_all(format!("GET /livez HTTP/1.1\r\nHost: {admin}\r\nX-{i}: ").as_bytes())
                    .expect("slowloris head");
                s
            })
            .collect();
        let mut checks = 0;
        while Instant::now() < until {
            for s in &mut slow {
                let _ = s.write_all(b"a");
            }
            assert_live_within(
                admin,
                LIVE,
                &format!("#{checks} with 6 non-readers and 100 slowloris connections"),
            );
            checks += 1;
            std::thread::sleep(Duration::from_millis(200));
        }
        let rss_during = vm_rss_kib(lb.pid());
        let sent: Vec<usize> = readers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        eprintln!(
            "{checks} /livez checks passed; non-readers sent {sent:?} requests; RSS {rss_before} KiB -> {rss_during} KiB"
        );
        assert!(checks >= 5, "only {checks} checks in 4 s");
        assert!(
            rss_during < rss_before + 64 * 1024,
            "RSS grew from {rss_before} KiB to {rss_during} KiB with six non-reading clients"
        );
    });
    assert_live_within(admin, LIVE, "after the attackers left");
}

/// Heads are limited: 16 KiB in all (431), 100 header lines (431).
#[test]
fn oversized_heads_are_refused() {
    let backend = EchoServer::start();
    let mut lb = Lb::start(&ringlb_config([listener("web").backend(backend.addr())]));
    let admin = admin(&lb);
    let long = "x".repeat(20 * 1024);
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("X-{i}"), "y".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    for (what, headers) in [
        ("a 20 KiB header line", vec![("X-Long", long.as_str())]),
        ("200 header lines", many),
    ] {
        match try_http_with(admin, "GET", "/livez", &headers, b"") {
            Ok((code, body)) => assert_eq!(code, 431, "{what}: {body}"),
            // Refused before the whole head was sent: the server closed on us.
            Err(e) => eprintln!("{what}: connection closed while sending ({e})"),
        }
    }
    // A 1 MB head that never ends is cut off at the limit, not buffered.
    let mut s = connect(admin);
    s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = s.write_all(b"GET /livez HTTP/1.1\r\nX-Big: ");
    let chunk = vec![b'z'; 64 * 1024];
    let mut written = 0;
    while written < 1 << 20 && s.write_all(&chunk).is_ok() {
        written += chunk.len();
    }
    let answer = read_what_comes(&mut s, Duration::from_secs(3));
    assert!(
        written < 1 << 20 || status_of(&answer) == Some(431),
        "1 MiB of head accepted: {:?}",
        String::from_utf8_lossy(&answer[..answer.len().min(200)])
    );
    assert_alive(&mut lb, "after oversized heads");
    assert_live_within(admin, LIVE, "after oversized heads");
}

/// At most 256 admin connections at once: beyond that new ones are closed at once; silent ones
/// are closed by the header read timeout, after which /livez answers again.
#[test]
fn connections_beyond_the_cap_are_closed_and_silent_ones_time_out() {
    raise_fd_limit();
    let backend = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web").backend(backend.addr())]));
    let admin = admin(&lb);
    const OPEN: usize = 300;
    const CAP: usize = 256;
    let mut conns: Vec<TcpStream> = (0..OPEN).map(|_| connect(admin)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let closed_at_once = conns
        .iter_mut()
        .filter(|s| {
            let mut s: &TcpStream = s;
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            let closed = match s.read(&mut b) {
                Ok(0) => true,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                Ok(_) => false,
            };
            s.set_nonblocking(false).unwrap();
            closed
        })
        .count();
    assert_eq!(
        closed_at_once,
        OPEN - CAP,
        "of {OPEN} silent connections, {closed_at_once} were closed at once (cap {CAP})"
    );
    let t0 = Instant::now();
    for (i, s) in conns.iter_mut().enumerate() {
        let left = HEAD_TIMEOUT_AND_MARGIN.saturating_sub(t0.elapsed());
        assert!(
            wait_stream_end(s, left.max(Duration::from_millis(10))).is_ok(),
            "silent connection #{i} still open {:?} after the cap check",
            t0.elapsed()
        );
    }
    assert_live_within(admin, LIVE, "once the silent connections were closed");
}

/// A keep-alive connection serves several requests, then is closed once silent.
#[test]
fn a_silent_keepalive_connection_is_closed() {
    let backend = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web").backend(backend.addr())]));
    let admin = admin(&lb);
    let mut s = connect(admin);
    // Three pipelined requests on one connection, answered in order.
    let req = |p: &str| format!("GET {p} HTTP/1.1\r\nHost: {admin}\r\n\r\n");
    s.write_all(format!("{}{}{}", req("/livez"), req("/nope"), req("/readyz")).as_bytes())
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(3);
    while String::from_utf8_lossy(&got).matches("HTTP/1.1 ").count() < 3
        && Instant::now() < deadline
    {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    let codes: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(codes, ["200", "404", "200"], "{text}");
    let t0 = Instant::now();
    let end = wait_stream_end(&mut s, HEAD_TIMEOUT_AND_MARGIN);
    assert!(
        end.is_ok(),
        "a silent keep-alive connection still open after {:?}: {end:?}",
        t0.elapsed()
    );
}

/// tiny_http's accept loop ended on EMFILE: after a moment without descriptors the admin port
/// was gone for good while traffic was still served.
#[test]
fn admin_answers_again_after_fd_exhaustion() {
    raise_fd_limit();
    let backend = EchoServer::start();
    // ~15 descriptors for the process itself, 2 per proxied connection.
    let lb = Lb::start_with_nofile(
        &ringlb_config([listener("web").backend(backend.addr())]),
        64,
    );
    let (admin, web) = (admin(&lb), lb.addr("web"));
    assert_live_within(admin, LIVE, "before");
    // Proxied connections until the LB runs out, then silent admin connections until it cannot
    // accept one more.
    let mut proxied = Vec::new();
    let mut refused = 0;
    for i in 0..60u64 {
        if refused >= 4 {
            break;
        }
        let Ok(mut s) = try_connect(web) else {
            refused += 1;
            continue;
        };
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        match try_ping(&mut s, 64, i) {
            Ok(()) => proxied.push(s),
            Err(_) => refused += 1,
        }
    }
    let mut held = Vec::new();
    let mut exhausted = false;
    for _ in 0..40 {
        if livez_within(admin, Duration::from_millis(500)).is_err() {
            exhausted = true;
            break;
        }
        held.push(connect(admin));
    }
    eprintln!(
        "out of descriptors: {} proxied, {refused} refused, {} admin connections held",
        proxied.len(),
        held.len()
    );
    assert!(exhausted, "/livez kept answering: never out of descriptors");
    drop(held);
    drop(proxied);
    let back = wait_until(Duration::from_secs(5), || {
        livez_within(admin, LIVE).is_ok_and(|(code, _)| code == 200)
    });
    assert!(
        back,
        "/livez does not answer after descriptors were freed:\n{}",
        lb.stderr_tail(20)
    );
    echo(web, 1000, 0xad_a771);
    assert!(
        lb.wait_for_log("admin: accept failed", Duration::from_secs(2)),
        "the admin endpoint never ran out of descriptors:\n{}",
        lb.stderr_tail(20)
    );
}

/// The config with `web` plus `n` Maglev listeners of 5,000,011 slots and 1,000 backends each:
/// a reload that adds them builds `n` big tables on the control thread.
fn heavy_config(web: &str, n: usize) -> String {
    let mut toml = web.to_string();
    for l in 0..n {
        let backends: Vec<String> = (0..1000)
            .map(|i| {
                format!(
                    "{{ address = \"127.0.{}.{}:{}\" }}",
                    100 + l,
                    1 + i % 250,
                    1000 + i
                )
            })
            .collect();
        toml.push_str(&format!(
            "[[listeners]]\nname = \"heavy{l}\"\nbind = \"127.0.0.1:0\"\nbalance = \"maglev\"\n\
             maglev_table_size = 5000011\nbackends = [ {} ]\n\n",
            backends.join(", ")
        ));
    }
    toml
}

/// `POST /reload`, waiting up to `wait` for the answer (a heavy reload takes a while).
fn post_reload_waiting(admin: SocketAddr, wait: Duration) -> std::io::Result<(u16, String)> {
    let mut s = connect(admin);
    s.set_read_timeout(Some(wait))?;
    s.write_all(format!("POST /reload HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).map_err(std::io::Error::other)
}

/// /livez reads shared state: a reload that keeps the control thread busy for seconds neither
/// delays it nor makes it fail.
#[test]
fn livez_answers_during_a_slow_reload() {
    let backend = EchoServer::start();
    let web = ringlb_config([listener("web").backend(backend.addr())]);
    let lb = Lb::start(&web);
    let admin = admin(&lb);
    let mut n = 2;
    loop {
        std::fs::write(lb.config_path(), heavy_config(&web, n)).expect("write config");
        let t0 = Instant::now();
        let (took, checks) = std::thread::scope(|scope| {
            let reload = scope.spawn(|| {
                let r = post_reload_waiting(admin, Duration::from_secs(60));
                (r, t0.elapsed())
            });
            let mut checks = 0;
            while !reload.is_finished() {
                assert_live_within(admin, LIVE, &format!("#{checks} during a reload"));
                checks += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            let (result, took) = reload
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            // The moment the reload ends, before the control thread's next heartbeat, is when
            // its heartbeat is oldest: keep asking through it.
            let end = Instant::now();
            while end.elapsed() < Duration::from_millis(500) {
                assert_live_within(admin, LIVE, &format!("#{checks} just after a reload"));
                checks += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            let (code, body) = result.expect("POST /reload");
            assert_eq!(code, 200, "{body}");
            (took, checks)
        });
        eprintln!(
            "reload adding {n} big Maglev tables took {took:?}; {checks} /livez checks during it"
        );
        // Slower than the liveness threshold (3 s), so the control thread's heartbeat goes
        // stale during it.
        if took >= Duration::from_millis(3500) || n >= 8 {
            assert!(
                took >= Duration::from_millis(3500),
                "the reload was never slow: {took:?}"
            );
            assert!(checks >= 5, "{checks} checks");
            break;
        }
        // Fast machine or optimised build: back to `web`, then a heavier reload.
        std::fs::write(lb.config_path(), &web).expect("write config");
        assert_eq!(http_get(admin, "/livez").0, 200);
        let (code, body) = try_http_with(admin, "POST", "/reload", &[], b"").expect("reload");
        assert_eq!(code, 200, "{body}");
        n *= 2;
    }
}

/// A small deterministic generator (splitmix64) for the fuzz test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One hostile input: random bytes, or a plausible request mutated at random.
fn fuzz_input(rng: &mut Rng, admin: SocketAddr) -> Vec<u8> {
    let templates = [
        format!("POST /reload HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 5\r\n\r\nhello"),
        format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n\r\nGET /status HTTP/1.1\r\n\r\n"),
        "POST /backends/web/127.0.0.1:1/drain HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"
            .to_string(),
        "GET /livez HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
            .to_string(),
    ];
    match rng.below(3) {
        0 => (0..rng.below(4096)).map(|_| rng.next() as u8).collect(),
        _ => {
            let mut v = templates[rng.below(templates.len() as u64) as usize]
                .clone()
                .into_bytes();
            for _ in 0..rng.below(8) {
                let at = rng.below(v.len() as u64 + 1) as usize;
                match rng.below(3) {
                    0 if at < v.len() => v[at] = rng.next() as u8,
                    1 if at < v.len() => {
                        v.remove(at);
                    }
                    _ => v.insert(at, rng.next() as u8),
                }
            }
            v
        }
    }
}

/// Random bytes at the admin port (fixed seed, 300 connections in batches of 30, each at most
/// 4 KiB and 2 s): every answer is HTTP, the process lives and /livez answers after each batch.
#[test]
fn random_bytes_never_take_the_admin_endpoint_down() {
    const SEED: u64 = 0x00ad_0f22;
    eprintln!("fuzz seed {SEED:#x}");
    let backend = EchoServer::start();
    let mut lb = Lb::start(&ringlb_config([listener("web").backend(backend.addr())]));
    let admin = admin(&lb);
    let mut rng = Rng(SEED);
    for batch in 0..10 {
        let inputs: Vec<(Vec<u8>, bool)> = (0..30)
            .map(|_| (fuzz_input(&mut rng, admin), rng.below(2) == 0))
            .collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = inputs
                .iter()
                .map(|(input, half_close)| {
                    scope.spawn(move || {
                        let mut s = connect(admin);
                        s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
                        let _ = s.write_all(input);
                        if *half_close {
                            let _ = s.shutdown(std::net::Shutdown::Write);
                        }
                        let answer = read_what_comes(&mut s, Duration::from_secs(2));
                        assert!(
                            answer.is_empty() || answer.starts_with(b"HTTP/1."),
                            "not an HTTP answer to {:?}: {:?}",
                            String::from_utf8_lossy(input),
                            String::from_utf8_lossy(&answer[..answer.len().min(100)])
                        );
                        if let Some(head_end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                            let _ = parse_response(&answer[..head_end + 4]);
                        }
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            }
        });
        assert_alive(
            &mut lb,
            &format!("after fuzz batch {batch} (seed {SEED:#x})"),
        );
        assert_live_within(
            admin,
            LIVE,
            &format!("after fuzz batch {batch} (seed {SEED:#x})"),
        );
    }
    echo(lb.addr("web"), 1000, SEED);
}

/// A big listener (40,000 backends) must not stall the control thread between reloads either:
/// its periodic housekeeping (pruning counters of removed backends, every 10 s) once compared
/// every counter with every backend of its listener, seconds of work during which /livez said
/// the control thread was stuck.
#[test]
fn livez_stays_up_with_many_backends() {
    let backend = EchoServer::start();
    let mut toml = ringlb_config([listener("web").backend(backend.addr())]);
    let backends: Vec<String> = (0..40_000)
        .map(|i| {
            format!(
                "{{ address = \"127.1.{}.{}:{}\" }}",
                i / 250 % 250,
                1 + i % 250,
                1000 + i / 62_500
            )
        })
        .collect();
    toml.push_str(&format!(
        "[[listeners]]\nname = \"many\"\nbind = \"127.0.0.1:0\"\nbackends = [ {} ]\n\n",
        backends.join(", ")
    ));
    let lb = Lb::start(&toml);
    let admin = admin(&lb);
    // Past one housekeeping period (10 s), bounded by count.
    let t0 = Instant::now();
    for i in 0..60 {
        if t0.elapsed() > Duration::from_secs(12) {
            break;
        }
        let (code, body) = livez_within(admin, LIVE).unwrap_or_else(|e| panic!("/livez #{i}: {e}"));
        assert_eq!(code, 200, "/livez #{i} after {:?}: {body}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        t0.elapsed() >= Duration::from_secs(11),
        "the loop ended early"
    );
}
