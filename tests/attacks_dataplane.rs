//! Attacks on the data plane through the real binary on loopback, on both I/O backends (the one
//! `RINGLB_IO` forces, else io_uring and epoll in turn): half-closes while the other direction
//! is blocked, floods of connects that reset at once, PROXY headers sent byte by byte, malformed
//! or oversized, backends that reset, never accept or stall, reloads during floods, bursts over
//! `max_connections`, UDP floods from more sources than `max_flows`, and descriptor exhaustion.
//!
//! What is checked after each: the process is alive and serves, its socket fds return to their
//! baseline, it burns no CPU once the load has ended (a spinning worker is a defect even when
//! every byte arrives), and the metrics count what happened.
//! Five of these reproduced defects when they were written (half-closed peers that stop reading
//! spun a worker, dead clients from the backlog got backends, held clients of a removed listener
//! waited, epoll's deadline heap grew per connect); each failed before its fix.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::admin::{metric, metric_sum, scrape};
use common::attack::*;
use common::*;

const SETTLE: Duration = Duration::from_millis(500);
const WINDOW: Duration = Duration::from_millis(1500);

// ---- half-closes while the other direction is blocked -----------------------------------------

/// The client sends its request, half-closes, and does not read while the backend streams
/// 16 MiB: the download direction waits for the client to be writable on a socket whose peer has
/// sent its FIN. The LB must wait quietly, then deliver every byte once the client reads.
#[test]
fn half_closed_client_that_does_not_read_costs_no_cpu() {
    const LEN: u64 = 16 << 20;
    for io in io_backends() {
        let backend = SenderThenClose::start(LEN, 7);
        let lb = start_on(
            &io,
            &ringlb_config([listener("web").backend(backend.addr())]),
        );
        let mut c = connect(lb.addr("web"));
        c.write_all(b"GET /big\r\n").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        // Let the LB fill the client's receive buffer and park the rest.
        std::thread::sleep(SETTLE);
        let used = cpu_over(&lb, WINDOW);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let got = recv_to_eof(&mut c).expect("download after the stall");
        assert_eq!(got, pattern_digest(LEN, 7), "{io}: every byte, in order");
        assert!(
            used <= idle_budget(WINDOW),
            "{io}: the LB burned {used} ticks in {WINDOW:?} waiting for a half-closed client to \
             read (budget {}): a worker spins",
            idle_budget(WINDOW)
        );
    }
}

/// Mirror: the backend answers at once and half-closes, but does not read for a while, and the
/// client keeps uploading: the upload waits for the backend to be writable on a socket whose
/// peer has sent its FIN.
#[test]
fn half_closed_backend_that_does_not_read_costs_no_cpu() {
    for io in io_backends() {
        let backend = Server::start("fin-then-slow", |s| {
            s.write_all(b"hello\n")?;
            s.shutdown(Shutdown::Write)?;
            std::thread::sleep(Duration::from_millis(2500));
            let mut buf = vec![0u8; 64 * 1024];
            while s.read(&mut buf)? > 0 {}
            Ok(())
        });
        let lb = start_on(
            &io,
            &ringlb_config([listener("web").backend(backend.addr())]),
        );
        let mut c = connect(lb.addr("web"));
        let mut hello = [0u8; 6];
        c.read_exact(&mut hello).unwrap();
        assert_eq!(&hello, b"hello\n");
        let sent = fill(&mut c, 64 << 20, Duration::from_millis(300));
        assert!(sent > 0, "{io}: the upload started");
        let used = cpu_over(&lb, Duration::from_millis(1200));
        assert!(
            used <= idle_budget(Duration::from_millis(1200)),
            "{io}: the LB burned {used} ticks in 1.2 s while a half-closed backend did not \
             read: a worker spins"
        );
        // Once the backend reads, the upload completes and the connection ends cleanly.
        c.shutdown(Shutdown::Write).unwrap();
        let (_, eof) = drain(&mut c, Duration::from_secs(10));
        assert!(eof, "{io}: clean end after the upload");
    }
}

/// Half-closes in both orders on many connections at once: client first, backend first. Every
/// byte arrives, every connection ends, fds return, the LB goes idle.
#[test]
fn half_closes_in_both_orders_end_cleanly() {
    raise_fd_limit();
    for io in io_backends() {
        let echo_backend = EchoServer::start();
        let sender = SenderThenClose::start(256 << 10, 3);
        let lb = start_on(
            &io,
            &ringlb_config([
                listener("echo").backend(echo_backend.addr()),
                listener("sender").backend(sender.addr()),
            ]),
        );
        let base = lb.fd_counts().0;
        let (ea, sa) = (lb.addr("echo"), lb.addr("sender"));
        let threads: Vec<_> = (0..40u64)
            .map(|i| {
                std::thread::spawn(move || {
                    if i % 2 == 0 {
                        // Client half-closes first; the echo backend then half-closes.
                        echo(ea, 64 << 10, i);
                    } else {
                        // Backend half-closes first; the client sends after that, then closes.
                        let mut s = connect(sa);
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut got = 0usize;
                        loop {
                            let n = s.read(&mut buf).expect("read from sender");
                            if n == 0 {
                                break;
                            }
                            got += n;
                        }
                        assert_eq!(got, 256 << 10, "conn {i}: the whole answer");
                        s.write_all(&buf[..4096])
                            .expect("send after the backend's FIN");
                        s.shutdown(Shutdown::Write).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
        lb.assert_fds_return(base, Duration::from_secs(5));
        assert_idle(
            &lb,
            WINDOW,
            &format!("{io}: after 40 half-closed connections"),
        );
        must(
            Duration::from_secs(3),
            "sender saw every client's bytes",
            || sender.received().len() == 20,
        );
    }
}

// ---- connect floods that reset at once --------------------------------------------------------

#[test]
fn a_flood_of_connects_that_reset_at_once_leaves_nothing_behind() {
    raise_fd_limit();
    for io in io_backends() {
        let echo = EchoServer::start();
        let lb = start_on(&io, &ringlb_config([listener("web").backend(echo.addr())]));
        let base = lb.fd_counts().0;
        let done = reset_flood(lb.addr("web"), 3000, 4, Duration::from_secs(20));
        assert!(done >= 1000, "{io}: only {done} connects completed");
        // The backend's side ends first (it sees the LB's reset or FIN), then the fd count is
        // read: one /proc/PID/fd listing during a storm of closes is not a snapshot.
        must(
            Duration::from_secs(5),
            "echo backend connections all ended",
            || echo.live() == 0,
        );
        lb.assert_fds_return(base, Duration::from_secs(5));
        assert_idle(&lb, WINDOW, &format!("{io}: after {done} reset connects"));
        echo_ok(&lb, &io);
        assert_counts_settle(&lb, &io, "web");
    }
}

/// One echo round trip through the LB's `web` listener works.
fn echo_ok(lb: &Lb, io: &str) {
    try_echo(lb.addr("web"), 4096, 99).unwrap_or_else(|e| {
        panic!(
            "{io}: the LB no longer serves: {e}; stderr:\n{}",
            lb.stderr_tail(20)
        )
    });
}

/// Every connection `listener` accepted has closed with a reason (Σ closes = accepted, minus
/// those still active), and none is counted active once everything ended.
fn assert_counts_settle(lb: &Lb, io: &str, listener: &str) {
    let admin = lb.admin_addr().expect("admin endpoint");
    let mut last = (0.0, 0.0, 0.0);
    let ok = wait_until(Duration::from_secs(3), || {
        let m = scrape(admin);
        let l = [("listener", listener)];
        let accepted = metric(&m, "ringlb_accepted_total", &l).unwrap_or(0.0);
        let closes = common::admin::samples(&m, "ringlb_closes_total", &l)
            .map(common::admin::sample_value)
            .sum::<f64>();
        let active = metric(&m, "ringlb_listener_active_connections", &l).unwrap_or(-1.0);
        last = (accepted, closes, active);
        accepted == closes && active == 0.0
    });
    assert!(
        ok,
        "{io}: listener {listener}: accepted {}, closes (all reasons) {}, active {}: every \
         accepted connection must close exactly once",
        last.0, last.1, last.2
    );
}

// ---- hostile PROXY headers --------------------------------------------------------------------

fn pp_config(backend: std::net::SocketAddr) -> String {
    ringlb_config([listener("pp")
        .backend(backend)
        .set("accept_proxy_protocol", "true")
        .set("accept_proxy_protocol_from", "[\"127.0.0.0/8\"]")
        .set("proxy_protocol_timeout", "\"1s\"")
        .set("proxy_protocol", "\"v1\"")])
}

/// Sends `bytes` one at a time with `gap` between them.
fn trickle(s: &mut TcpStream, bytes: &[u8], gap: Duration) {
    for b in bytes {
        s.write_all(std::slice::from_ref(b))
            .expect("trickle a byte");
        std::thread::sleep(gap);
    }
}

/// A v2 header: PROXY, TCP over IPv4, 192.0.2.9:5555 -> 198.51.100.1:443.
fn v2_header() -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&[192, 0, 2, 9, 198, 51, 100, 1]);
    h.extend_from_slice(&5555u16.to_be_bytes());
    h.extend_from_slice(&443u16.to_be_bytes());
    h
}

#[test]
fn proxy_headers_sent_byte_by_byte_are_reassembled() {
    for io in io_backends() {
        let backend = common::ops::ProxyEcho::start();
        let lb = start_on(&io, &pp_config(backend.addr()));
        let addr = lb.addr("pp");
        let v1 = b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\n";
        for (name, header, source) in [
            ("v1", v1.to_vec(), "203.0.113.7:40000"),
            ("v2", v2_header(), "192.0.2.9:5555"),
        ] {
            let mut c = connect(addr);
            // Each byte its own segment: TCP_NODELAY and a pause longer than a tick's half.
            c.set_nodelay(true).unwrap();
            trickle(&mut c, &header, Duration::from_millis(3));
            ping(&mut c, 2000, 11);
            let seen = backend
                .header_from(source.parse().unwrap(), Duration::from_secs(3))
                .unwrap_or_else(|| panic!("{io} {name}: backend saw no header from {source}"));
            assert!(
                seen.dest.is_some(),
                "{io} {name}: the destination came through"
            );
            drop(c);
        }
        assert_counts_settle(&lb, &io, "pp");
        assert_idle(&lb, WINDOW, &format!("{io}: after trickled headers"));
    }
}

#[test]
fn malformed_oversized_and_stalled_proxy_headers_are_closed_and_counted() {
    raise_fd_limit();
    for io in io_backends() {
        let echo = EchoServer::start();
        let lb = start_on(&io, &pp_config(echo.addr()));
        let addr = lb.addr("pp");
        let base = lb.fd_counts().0;
        let mut long_v1 = b"PROXY TCP4 ".to_vec();
        long_v1.resize(400, b'1');
        let mut huge_v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        huge_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        huge_v2.resize(600, 0);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            (
                "bad v1 fields",
                b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\n".to_vec(),
            ),
            ("v1 without CRLF, 400 bytes", long_v1),
            ("v2 claiming 65535 bytes", huge_v2),
            ("v2 bad version", {
                let mut h = v2_header();
                h[12] = 0x31;
                h
            }),
        ];
        for (name, bytes) in &cases {
            let mut c = connect(addr);
            let _ = c.write_all(bytes);
            assert!(
                closed_within(&mut c, Duration::from_millis(800)),
                "{io}: {name}: not closed well before the header timeout"
            );
        }
        // Stalled: half a header, then nothing; and half a header, then a reset.
        let mut stalled: Vec<TcpStream> = (0..200)
            .map(|_| {
                let mut c = connect(addr);
                c.write_all(b"PROXY TCP4 1.2").unwrap();
                c
            })
            .collect();
        for _ in 0..100 {
            let c = stalled.pop().unwrap();
            common::stall::reset(c);
        }
        let t0 = Instant::now();
        for (i, c) in stalled.iter_mut().enumerate() {
            assert!(
                closed_within(c, Duration::from_secs(3).saturating_sub(t0.elapsed())),
                "{io}: stalled header client {i} still open {:?} after the 1 s timeout",
                t0.elapsed()
            );
        }
        drop(stalled);
        assert_eq!(
            echo.accepted(),
            0,
            "{io}: no backend connection for any of them"
        );
        lb.assert_fds_return(base, Duration::from_secs(3));
        assert_counts_settle(&lb, &io, "pp");
        let m = scrape(lb.admin_addr().unwrap());
        let bad = metric_sum(
            &m,
            "ringlb_closes_total",
            &[("listener", "pp"), ("reason", "bad_proxy_header")],
        );
        assert!(
            bad >= cases.len() as f64,
            "{io}: bad_proxy_header {bad} < {} malformed headers",
            cases.len()
        );
        assert_idle(&lb, WINDOW, &format!("{io}: after hostile headers"));
    }
}

// ---- hostile backends -------------------------------------------------------------------------

/// Backends that accept and reset at once, that never accept (full backlog), and that accept but
/// never read while clients upload and leave.
#[test]
fn backends_that_reset_never_accept_or_stall_free_everything() {
    raise_fd_limit();
    for io in io_backends() {
        let resetter = ResetAfter::start(1);
        let hole = BlackHole::start();
        let sink = common::stall::Sink::start();
        let lb = start_on(
            &io,
            &ringlb_config([
                listener("rst").backend(resetter.addr()),
                listener("hole")
                    .backend(hole.addr())
                    .connect_timeout("200ms"),
                listener("sink").backend(sink.addr()).idle_timeout("2s"),
            ]),
        );
        let base = lb.fd_counts().0;
        let (ra, ha, sa) = (lb.addr("rst"), lb.addr("hole"), lb.addr("sink"));
        let workers: Vec<_> = (0..30usize)
            .map(|i| {
                std::thread::spawn(move || match i % 3 {
                    0 => {
                        // The backend resets after the first byte: the client is closed.
                        for _ in 0..10 {
                            let mut c = connect(ra);
                            let _ = c.write_all(b"x");
                            assert!(
                                closed_within(&mut c, Duration::from_secs(3)),
                                "client of a resetting backend not closed"
                            );
                        }
                    }
                    1 => {
                        let mut c = connect(ha);
                        let _ = c.write_all(b"hello");
                        assert!(
                            closed_within(&mut c, Duration::from_secs(4)),
                            "client of a black-holed backend not closed after 3 connect timeouts"
                        );
                    }
                    _ => {
                        // Upload until the sink's buffers are full, then leave (FIN).
                        let mut c = connect(sa);
                        fill(&mut c, 8 << 20, Duration::from_millis(300));
                        drop(c);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
        // Stalled uploads: nothing moves until the 2 s idle timeout frees them. Quiet meanwhile.
        assert_idle(
            &lb,
            Duration::from_millis(1000),
            &format!("{io}: stalled uploads"),
        );
        lb.assert_fds_return(base, Duration::from_secs(6));
        for l in ["rst", "hole", "sink"] {
            assert_counts_settle(&lb, &io, l);
        }
        let m = scrape(lb.admin_addr().unwrap());
        let timeouts = metric_sum(
            &m,
            "ringlb_closes_total",
            &[("listener", "hole"), ("reason", "backend_timeout")],
        );
        assert_eq!(
            timeouts, 10.0,
            "{io}: every black-holed client closed as backend_timeout"
        );
        let reset = metric_sum(
            &m,
            "ringlb_closes_total",
            &[("listener", "rst"), ("reason", "backend_reset")],
        );
        assert!(reset >= 90.0, "{io}: {reset} backend_reset closes of 100");
        assert_idle(&lb, WINDOW, &format!("{io}: after hostile backends"));
    }
}

// ---- reloads during floods --------------------------------------------------------------------

#[test]
fn reloads_during_a_flood_keep_serving_and_leak_nothing() {
    raise_fd_limit();
    for io in io_backends() {
        let (e1, e2) = (EchoServer::start(), EchoServer::start());
        let with_b = |backend| {
            ringlb_config([
                listener("a").backend(backend),
                listener("b").backend(e1.addr()),
            ])
        };
        let without_b = |backend| ringlb_config([listener("a").backend(backend)]);
        let lb = start_on(&io, &with_b(e1.addr()));
        let base = lb.fd_counts().0;
        let addr = lb.addr("a");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood: Vec<_> = (0..3u64)
            .map(|t| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failed) = (0u32, Vec::new());
                    let t0 = Instant::now();
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && t0.elapsed() < Duration::from_secs(20)
                        && i < 5000
                    {
                        i += 1;
                        match try_echo(addr, 2048, t * 10_000 + i) {
                            Ok(()) => ok += 1,
                            Err(e) => failed.push(e.to_string()),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        for r in 0..12 {
            let b = if r % 2 == 0 { e2.addr() } else { e1.addr() };
            let toml = if r % 3 == 0 { without_b(b) } else { with_b(b) };
            common::ops::reload_ok(&lb, &toml);
            std::thread::sleep(Duration::from_millis(100));
        }
        common::ops::reload_ok(&lb, &with_b(e1.addr()));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = 0;
        for f in flood {
            let (ok, failed) = f.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            total += ok;
            assert!(
                failed.is_empty(),
                "{io}: {} of {} echoes on the unchanged listener failed during reloads: {:?}",
                failed.len(),
                ok as usize + failed.len(),
                &failed[..failed.len().min(5)]
            );
        }
        assert!(total > 50, "{io}: only {total} echoes during the reloads");
        lb.assert_fds_return(base, Duration::from_secs(5));
        assert_counts_settle(&lb, &io, "a");
        assert_idle(&lb, WINDOW, &format!("{io}: after 13 reloads under load"));
    }
}

// ---- max_connections under a burst ------------------------------------------------------------

#[test]
fn a_burst_over_max_connections_never_exceeds_it_and_everyone_is_served_or_closed() {
    raise_fd_limit();
    for io in io_backends() {
        let echo = EchoServer::start();
        let lb = start_on(
            &io,
            &ringlb_config([listener("web")
                .backend(echo.addr())
                .set("max_connections", "20")
                .set("queue_timeout", "\"2s\"")]),
        );
        let base = lb.fd_counts().0;
        let addr = lb.addr("web");
        // 300 connects at once from 6 threads; each sends a byte and keeps its socket.
        let clients: Vec<TcpStream> = (0..6)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..50)
                        .filter_map(|_| {
                            let mut c =
                                TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
                            let _ = c.write_all(b"x");
                            Some(c)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect();
        let mut peak = 0;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(1000) {
            peak = peak.max(echo.live());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(peak >= 15, "{io}: only {peak} served at the limit of 20");
        assert!(
            peak <= 20,
            "{io}: {peak} backend connections open, max_connections is 20"
        );
        drop(clients);
        lb.assert_fds_return(base, Duration::from_secs(6));
        must(Duration::from_secs(3), "echo connections all ended", || {
            echo.live() == 0
        });
        assert_counts_settle(&lb, &io, "web");
        echo_ok(&lb, &io);
        assert_idle(
            &lb,
            WINDOW,
            &format!("{io}: after a burst over max_connections"),
        );
    }
}

// ---- UDP: more sources than max_flows ---------------------------------------------------------

#[test]
fn a_udp_flood_beyond_max_flows_is_bounded_and_drains() {
    use common::udp::{client_ip, udp_listener, UdpClient, UdpEcho};
    for io in io_backends() {
        let backend = UdpEcho::start("u1");
        let lb = start_on(
            &io,
            &ringlb_config([udp_listener("dns")
                .backend(backend.addr())
                .set("max_flows", "64")
                .idle_timeout("2s")]),
        );
        let addr = lb.addr("dns");
        let base = lb.fd_counts().0;
        let admin = lb.admin_addr().unwrap();
        let t0 = Instant::now();
        let mut sent = 0;
        let mut most = 0.0f64;
        for i in 0..3000 {
            if t0.elapsed() > Duration::from_secs(20) {
                break;
            }
            let s = std::net::UdpSocket::bind((client_ip(40, i % 2500), 0)).expect("bind");
            if s.send_to(b"flood", addr).is_ok() {
                sent += 1;
            }
            if i % 500 == 0 {
                let flows = metric_sum(&scrape(admin), "ringlb_udp_flows", &[("listener", "dns")]);
                most = most.max(flows);
            }
        }
        assert!(sent >= 1000, "{io}: only {sent} flood datagrams sent");
        let m = scrape(admin);
        let flows = metric_sum(&m, "ringlb_udp_flows", &[("listener", "dns")]);
        most = most.max(flows);
        assert!(most <= 64.0, "{io}: {most} flows kept, max_flows is 64");
        let sockets_now = lb.fd_counts().0;
        // (+2: the admin connections of the scrapes above, which the admin server may not have
        // closed yet; the baseline was taken before any.)
        assert!(
            sockets_now <= base + 64 + 2,
            "{io}: {sockets_now} sockets with max_flows 64 (baseline {base})"
        );
        let refused = metric_sum(&m, "ringlb_udp_flows_refused_total", &[("listener", "dns")]);
        let evicted = metric_sum(&m, "ringlb_udp_flows_evicted_total", &[("listener", "dns")]);
        assert!(
            refused + evicted + flows >= 1000.0,
            "{io}: {sent} sources but refused {refused} + evicted {evicted} + kept {flows}"
        );
        // Idle flows expire: the flow sockets close, the gauge returns to 0.
        lb.assert_fds_return(base, Duration::from_secs(6));
        must(Duration::from_secs(3), "ringlb_udp_flows back to 0", || {
            metric_sum(&scrape(admin), "ringlb_udp_flows", &[("listener", "dns")]) == 0.0
        });
        assert_idle(&lb, WINDOW, &format!("{io}: after a UDP flood"));
        let legit = UdpClient::bind(std::net::Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(legit.exchange(addr, b"after", Duration::from_secs(2)), "u1");
    }
}

// ---- descriptor exhaustion --------------------------------------------------------------------

#[test]
fn descriptor_exhaustion_backs_off_quietly_and_recovers() {
    raise_fd_limit();
    for io in io_backends() {
        let echo = EchoServer::start();
        let lb = start_on_with_nofile(
            &io,
            &ringlb_config([listener("web").backend(echo.addr())]),
            64,
        );
        let addr = lb.addr("web");
        // Far more clients than descriptors: the rest wait in the kernel's backlog while the
        // LB is out of fds. Each sends a byte so a served one is busy.
        let mut clients: Vec<TcpStream> = Vec::new();
        for _ in 0..120 {
            if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                let _ = c.write_all(b"x");
                clients.push(c);
            }
        }
        std::thread::sleep(SETTLE);
        assert!(
            lb.wait_for_log("accept failed", Duration::from_secs(2))
                || lb
                    .stderr_lines()
                    .iter()
                    .any(|l| l.contains("failed: Too many open files")),
            "{io}: the LB never said it ran out of descriptors; stderr:\n{}",
            lb.stderr_tail(20)
        );
        assert_idle(
            &lb,
            WINDOW,
            &format!("{io}: out of descriptors with a full backlog"),
        );
        drop(clients);
        // Recovers: serves again once the clients are gone.
        let ok = wait_until(Duration::from_secs(10), || try_echo(addr, 1024, 5).is_ok());
        assert!(
            ok,
            "{io}: never served again; stderr:\n{}",
            lb.stderr_tail(20)
        );
        assert_idle(&lb, WINDOW, &format!("{io}: after descriptor exhaustion"));
    }
}

// ---- listeners removed while flooded ----------------------------------------------------------

/// A TCP and a UDP listener removed by a reload while clients flood them: their sockets close,
/// their flows close, the listener that stays serves, nothing is left behind, and re-adding
/// them works.
#[test]
fn listeners_removed_during_a_flood_leave_nothing_behind() {
    use common::udp::{client_ip, udp_listener, UdpClient, UdpEcho};
    raise_fd_limit();
    for io in io_backends() {
        let echo = EchoServer::start();
        let uecho = UdpEcho::start("u1");
        let keep = || listener("keep").backend(echo.addr());
        let all = ringlb_config([
            keep(),
            listener("gone").backend(echo.addr()),
            udp_listener("ugone").backend(uecho.addr()),
        ]);
        let only_keep = ringlb_config([keep()]);
        let lb = start_on(&io, &only_keep);
        let base = lb.fd_counts().0;
        let mark = lb.log_len();
        common::ops::reload_ok(&lb, &all);
        let gone = common::ops::listening_addr_since(&lb, mark, "gone");
        let ugone = common::ops::listening_addr_since(&lb, mark, "ugone");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (s1, s2) = (stop.clone(), stop.clone());
        let tcp = std::thread::spawn(move || {
            let mut held = Vec::new();
            let t0 = Instant::now();
            while !s1.load(std::sync::atomic::Ordering::Relaxed)
                && t0.elapsed() < Duration::from_secs(15)
                && held.len() < 400
            {
                if let Ok(mut c) = TcpStream::connect_timeout(&gone, Duration::from_millis(300)) {
                    let _ = c.write_all(b"hi");
                    held.push(c);
                }
            }
            held
        });
        let udp = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut i = 0;
            while !s2.load(std::sync::atomic::Ordering::Relaxed)
                && t0.elapsed() < Duration::from_secs(15)
                && i < 20_000
            {
                if let Ok(s) = std::net::UdpSocket::bind((client_ip(60, i % 1000), 0)) {
                    let _ = s.send_to(b"flood", ugone);
                }
                i += 1;
            }
        });
        std::thread::sleep(Duration::from_millis(400));
        common::ops::reload_ok(&lb, &only_keep);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let held = tcp.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        udp.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        assert!(
            !held.is_empty(),
            "{io}: no connection reached the listener before removal"
        );
        try_echo(lb.addr("keep"), 4096, 1).expect("the listener that stays serves");
        // The removed TCP listener's connections go on until their clients leave.
        drop(held);
        lb.assert_fds_return(base, Duration::from_secs(10));
        assert!(
            TcpStream::connect_timeout(&gone, Duration::from_millis(300)).is_err(),
            "{io}: the removed listener still accepts"
        );
        assert_idle(
            &lb,
            WINDOW,
            &format!("{io}: after removing flooded listeners"),
        );
        // Re-added under the same names: served.
        let mark = lb.log_len();
        common::ops::reload_ok(&lb, &all);
        let gone = common::ops::listening_addr_since(&lb, mark, "gone");
        let ugone = common::ops::listening_addr_since(&lb, mark, "ugone");
        try_echo(gone, 4096, 2).expect("re-added TCP listener serves");
        let c = UdpClient::bind(std::net::Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(c.exchange(ugone, b"again", Duration::from_secs(2)), "u1");
    }
}

// ---- queued clients that half-close -----------------------------------------------------------

/// With the only backend full, a client sends its request and half-closes while queued: when a
/// place frees it gets the whole answer.
#[test]
fn a_queued_client_that_half_closed_gets_its_answer() {
    for io in io_backends() {
        let echo = EchoServer::start();
        let toml = common::ops::with_backend_fields(
            &ringlb_config([listener("web")
                .backend(echo.addr())
                .set("queue_timeout", "\"5s\"")]),
            echo.addr(),
            "max_connections = 1",
        );
        let lb = start_on(&io, &toml);
        let addr = lb.addr("web");
        let mut first = connect(addr);
        ping(&mut first, 100, 1);
        let mut second = connect(addr);
        let req = Pattern::bytes(5, 300 << 10);
        second.write_all(&req).unwrap();
        second.shutdown(Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(echo.accepted(), 1, "{io}: the second waits in the queue");
        drop(first);
        let mut back = Vec::new();
        second
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        second
            .read_to_end(&mut back)
            .expect("answer after the queue");
        assert!(
            back == req,
            "{io}: {} of {} bytes echoed",
            back.len(),
            req.len()
        );
        assert_counts_settle(&lb, &io, "web");
    }
}

// ---- PROXY header edges -----------------------------------------------------------------------

/// Header and data in one segment followed by the client's FIN; a v2 header at the size limit
/// (TLVs up to 512 bytes) passes, one byte over is refused.
#[test]
fn proxy_header_edges_header_with_data_and_fin_and_the_size_limit() {
    for io in io_backends() {
        let backend = common::ops::ProxyEcho::start();
        let lb = start_on(&io, &pp_config(backend.addr()));
        let addr = lb.addr("pp");
        let mut c = connect(addr);
        let mut msg = b"PROXY TCP4 203.0.113.8 198.51.100.1 40001 443\r\n".to_vec();
        msg.extend_from_slice(b"request-then-fin");
        c.write_all(&msg).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back)
            .expect("echo after header+data+FIN");
        assert_eq!(
            back, b"request-then-fin",
            "{io}: data after the header, then EOF"
        );
        for (tlv_len, ok) in [(512 - 12, true), (512 - 12 + 1, false)] {
            // v2 header: 16 bytes, then 12 address bytes and a NOOP TLV padding to tlv_len.
            let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
            let body = 12 + tlv_len;
            h.extend_from_slice(&[0x21, 0x11]);
            h.extend_from_slice(&(body as u16).to_be_bytes());
            h.extend_from_slice(&[192, 0, 2, 10, 198, 51, 100, 1]);
            h.extend_from_slice(&6000u16.to_be_bytes());
            h.extend_from_slice(&443u16.to_be_bytes());
            h.push(0x04); // PP2_TYPE_NOOP
            h.extend_from_slice(&((tlv_len - 3) as u16).to_be_bytes());
            h.resize(16 + body, 0);
            let mut c = connect(addr);
            c.write_all(&h).unwrap();
            if ok {
                ping(&mut c, 500, 3);
            } else {
                assert!(
                    closed_within(&mut c, Duration::from_millis(800)),
                    "{io}: a v2 header of {} bytes (limit {}) was not refused",
                    h.len(),
                    16 + 512
                );
            }
        }
        assert_counts_settle(&lb, &io, "pp");
    }
}

// ---- UDP toward a dead backend, and datagrams at the size limit -------------------------------

/// Datagrams toward a backend port nobody listens on: every flow's connected socket gets ICMP
/// port-unreachable errors. Nothing spins, the flows expire, the fds return; datagrams of the
/// largest size still go through once a backend is there.
#[test]
fn udp_toward_a_dead_backend_and_maximum_datagrams() {
    use common::udp::{client_ip, udp_listener, UdpClient, UdpEcho};
    for io in io_backends() {
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let live = UdpEcho::start("u1");
        let mut lb = start_on(
            &io,
            &ringlb_config([
                udp_listener("dead").backend(dead_addr).idle_timeout("1s"),
                udp_listener("live").backend(live.addr()),
            ]),
        );
        let base = lb.fd_counts().0;
        let addr = lb.addr("dead");
        let clients: Vec<UdpClient> = (0..50).map(|i| UdpClient::bind(client_ip(70, i))).collect();
        for round in 0..10 {
            for c in &clients {
                let _ = c.request(addr, format!("r{round}").as_bytes(), Duration::ZERO);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_idle(
            &lb,
            WINDOW,
            &format!("{io}: flows toward a dead UDP backend"),
        );
        lb.assert_fds_return(base, Duration::from_secs(5));
        // 65,507 bytes: the largest IPv4 UDP payload, each way.
        let big: Vec<u8> = Pattern::bytes(9, 65_507 - 3);
        let c = UdpClient::bind(std::net::Ipv4Addr::new(127, 0, 0, 1));
        let (from, reply) = c
            .request(lb.addr("live"), &big, Duration::from_secs(2))
            .expect("a maximum-size datagram through the LB");
        assert_eq!(from, lb.addr("live"));
        assert_eq!(
            reply.len(),
            65_507,
            "{io}: the whole reply (name + payload)"
        );
        assert_eq!(&reply[3..], &big[..], "{io}: payload intact");
        assert!(
            lb.wait_exit(Duration::from_millis(10)).is_none(),
            "{io}: the LB exited"
        );
    }
}

// ---- resets while held over max_connections ---------------------------------------------------

/// At `max_connections` with every place taken, a flood of connects that reset at once: they
/// are held (or wait in the kernel backlog), noticed gone, freed and counted; the places'
/// owners are unaffected and the LB serves normally once they leave.
#[test]
fn resets_while_held_over_max_connections_are_freed() {
    raise_fd_limit();
    for io in io_backends() {
        let echo = EchoServer::start();
        let lb = start_on(
            &io,
            &ringlb_config([listener("web")
                .backend(echo.addr())
                .set("max_connections", "5")
                .set("queue_timeout", "\"10s\"")]),
        );
        let base = lb.fd_counts().0;
        let addr = lb.addr("web");
        let mut owners: Vec<TcpStream> = (0..5)
            .map(|i| {
                let mut c = connect(addr);
                ping(&mut c, 64, i);
                c
            })
            .collect();
        let done = reset_flood(addr, 1000, 4, Duration::from_secs(15));
        assert!(done >= 500, "{io}: only {done} connects completed");
        for (i, c) in owners.iter_mut().enumerate() {
            ping(c, 64, 100 + i as u64);
        }
        drop(owners);
        lb.assert_fds_return(base, Duration::from_secs(5));
        must(Duration::from_secs(3), "echo connections all ended", || {
            echo.live() == 0
        });
        let m = scrape(lb.admin_addr().unwrap());
        let reasons: Vec<String> = common::admin::samples(&m, "ringlb_closes_total", &[])
            .filter(|s| common::admin::sample_value(s) > 0.0)
            .map(|s| {
                format!(
                    "{}={}",
                    s.labels.get("reason").unwrap_or("?"),
                    common::admin::sample_value(s)
                )
            })
            .collect();
        assert!(
            echo.accepted() <= 5 + 50,
            "{io}: {} backend connections made, for 5 owners and {done} clients that reset \
             while waiting (closes: {reasons:?})",
            echo.accepted()
        );
        assert_counts_settle(&lb, &io, "web");
        echo_ok(&lb, &io);
        assert_idle(&lb, WINDOW, &format!("{io}: after resets while held"));
    }
}

// ---- shutdown under load ----------------------------------------------------------------------

/// SIGTERM while 200 connections are open (idle, mid-download from a client that does not
/// read, half-closed) and a reset flood is running: the LB stops within its drain timeout plus
/// a margin, with exit code 0, and every client is closed.
#[test]
fn sigterm_under_load_exits_within_the_drain_timeout() {
    raise_fd_limit();
    for io in io_backends() {
        let echo = EchoServer::start();
        let sender = SenderThenClose::start(8 << 20, 1);
        let mut lb = start_on(
            &io,
            &common::config::LbConfig::default()
                .drain_timeout("1s")
                .listener(listener("echo").backend(echo.addr()))
                .listener(listener("big").backend(sender.addr()))
                .to_toml(),
        );
        let (ea, ba) = (lb.addr("echo"), lb.addr("big"));
        let mut open: Vec<TcpStream> = Vec::new();
        for i in 0..150 {
            let mut c = connect(ea);
            ping(&mut c, 32, i);
            if i % 3 == 0 {
                half_close(&c);
            }
            open.push(c);
        }
        for _ in 0..50 {
            let mut c = connect(ba);
            c.write_all(b"GET").unwrap();
            open.push(c);
        }
        let flood = std::thread::spawn(move || reset_flood(ea, 2000, 2, Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(200));
        let t0 = Instant::now();
        lb.signal(nix::sys::signal::Signal::SIGTERM);
        let status = lb.wait_exit(Duration::from_secs(6));
        let took = t0.elapsed();
        let _ = flood
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        assert!(
            status.is_some(),
            "{io}: still running 6 s after SIGTERM with drain_timeout 1s; stderr:\n{}",
            lb.stderr_tail(20)
        );
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{io}: exit status after {took:?}; stderr:\n{}",
            lb.stderr_tail(20)
        );
        for (i, c) in open.iter_mut().enumerate() {
            assert!(
                closed_within(c, Duration::from_secs(2)),
                "{io}: client {i} still open after the LB exited"
            );
        }
    }
}

// ---- queued clients when a reload replaces the full backend -----------------------------------

/// The only backend is full and a client waits in the queue; a reload replaces that backend
/// with one that has room: the waiting client is served at once, not after `queue_timeout`.
#[test]
fn a_reload_that_adds_room_serves_the_queue() {
    for io in io_backends() {
        let (full, roomy) = (EchoServer::start(), EchoServer::start());
        let toml = |addr| {
            common::ops::with_backend_fields(
                &ringlb_config([listener("web").backend(addr).set("queue_timeout", "\"8s\"")]),
                addr,
                "max_connections = 1",
            )
        };
        let lb = start_on(&io, &toml(full.addr()));
        let addr = lb.addr("web");
        let mut owner = connect(addr);
        ping(&mut owner, 10, 1);
        let mut waiting = connect(addr);
        waiting.write_all(b"queued?").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(full.accepted(), 1, "{io}: the second client waits");
        let t0 = Instant::now();
        common::ops::reload_ok(
            &lb,
            &toml(roomy.addr()).replace("max_connections = 1", "weight = 1"),
        );
        let mut back = [0u8; 7];
        waiting
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        waiting
            .read_exact(&mut back)
            .expect("served after the reload");
        assert_eq!(&back, b"queued?");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "{io}: the queued client waited {:?} after the reload gave it room",
            t0.elapsed()
        );
        assert_eq!(roomy.accepted(), 1, "{io}: served by the new backend");
        ping(&mut owner, 10, 2);
    }
}

// ---- memory per connect -----------------------------------------------------------------------

/// Connections that come and go must not leave memory behind, whatever `connect_timeout` is:
/// three rounds of 15,000 short connections with `connect_timeout = "1h"`; after the first
/// round (slabs and tables at their working size) the LB's RSS stays flat.
#[test]
fn short_connections_leave_no_memory_behind_with_a_long_connect_timeout() {
    raise_fd_limit();
    for io in io_backends() {
        let backend = QuickCloser::start();
        let lb = start_on(
            &io,
            &ringlb_config([listener("web")
                .backend(backend.addr())
                .connect_timeout("1h")]),
        );
        let addr = lb.addr("web");
        let round = || {
            let ts: Vec<_> = (0..4)
                .map(|_| {
                    std::thread::spawn(move || {
                        let t0 = Instant::now();
                        for _ in 0..3750 {
                            if t0.elapsed() > Duration::from_secs(30) {
                                break;
                            }
                            let mut c = connect(addr);
                            let mut name = Vec::new();
                            let _ = c.read_to_end(&mut name);
                        }
                    })
                })
                .collect();
            for t in ts {
                t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            }
            std::thread::sleep(Duration::from_millis(300));
            rss_kib(&lb)
        };
        let after_first = round();
        round();
        let after_third = round();
        assert!(
            after_third <= after_first + 256,
            "{io}: RSS grew from {after_first} KiB to {after_third} KiB over 30,000 more short \
             connections (none open now)"
        );
    }
}

// ---- a listener removed while clients wait over its max_connections ---------------------------

/// Clients wait (held, or in the kernel backlog) over `max_connections` when a reload removes
/// their listener: the ones in the kernel backlog are reset as its socket closes; the ones the
/// LB holds must not outlive the listener's `drain_timeout` (2 s here) waiting for a place in a
/// listener that no longer exists (their `queue_timeout` is 30 s).
#[test]
fn a_listener_removed_while_clients_wait_over_its_limit_frees_them() {
    raise_fd_limit();
    for io in io_backends() {
        let echo = EchoServer::start();
        let keep = || listener("keep").backend(echo.addr());
        let cfg = || common::config::LbConfig::default().drain_timeout("2s");
        let only_keep = cfg().listener(keep()).to_toml();
        let lb = start_on(&io, &only_keep);
        let base = lb.fd_counts().0;
        let mark = lb.log_len();
        common::ops::reload_ok(
            &lb,
            &cfg()
                .listener(keep())
                .listener(
                    listener("lim")
                        .backend(echo.addr())
                        .set("max_connections", "2")
                        .set("queue_timeout", "\"30s\""),
                )
                .to_toml(),
        );
        let lim = common::ops::listening_addr_since(&lb, mark, "lim");
        let mut owners: Vec<TcpStream> = (0..2)
            .map(|i| {
                let mut c = connect(lim);
                ping(&mut c, 16, i);
                c
            })
            .collect();
        let mut waiting: Vec<TcpStream> = (0..60)
            .filter_map(|_| {
                let mut c = TcpStream::connect_timeout(&lim, Duration::from_millis(500)).ok()?;
                let _ = c.write_all(b"w");
                Some(c)
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        common::ops::reload_ok(&lb, &only_keep);
        // The served ones still work; then they leave.
        for (i, c) in owners.iter_mut().enumerate() {
            ping(c, 16, 10 + i as u64);
        }
        drop(owners);
        // Each waiting client is either closed or, once a place frees, served (a removed
        // listener drains what it accepted); none is left hanging unserved.
        let (mut closed, mut served, mut hanging) = (0, 0, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(4);
        for (i, c) in waiting.iter_mut().enumerate() {
            let _ = c.set_read_timeout(Some(Duration::from_millis(50)));
            let mut b = [0u8; 1];
            loop {
                match c.read(&mut b) {
                    Ok(1) => served += 1,
                    Ok(_) => closed += 1,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if Instant::now() < deadline {
                            continue;
                        }
                        hanging.push(i);
                    }
                    Err(_) => closed += 1,
                }
                break;
            }
        }
        assert!(
            hanging.is_empty(),
            "{io}: 4 s after the reload (drain_timeout 2s), waiting clients {hanging:?} of the \
             removed listener are neither closed nor served ({served} served, {closed} closed)"
        );
        drop(waiting);
        lb.assert_fds_return(base, Duration::from_secs(5));
        assert_idle(
            &lb,
            WINDOW,
            &format!("{io}: after removing a listener with waiters"),
        );
    }
}

// ---- a backend that closes in the middle of an upload -----------------------------------------

/// The backend reads a little of a large upload and closes (its unread bytes make that a
/// reset): the client is closed promptly, not left writing into a half-dead connection.
#[test]
fn a_backend_that_closes_mid_upload_closes_the_client() {
    for io in io_backends() {
        let backend = Server::start("read-then-close", |s| {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf)?;
            Ok(())
        });
        let lb = start_on(
            &io,
            &ringlb_config([listener("web").backend(backend.addr())]),
        );
        let base = lb.fd_counts().0;
        for _ in 0..20 {
            let mut c = connect(lb.addr("web"));
            c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            let chunk = vec![7u8; 64 * 1024];
            let t0 = Instant::now();
            let mut failed = false;
            while t0.elapsed() < Duration::from_secs(5) {
                if c.write_all(&chunk).is_err() {
                    failed = true;
                    break;
                }
            }
            assert!(
                failed,
                "{io}: the client could upload for 5 s into a closed backend"
            );
        }
        lb.assert_fds_return(base, Duration::from_secs(3));
        assert_counts_settle(&lb, &io, "web");
    }
}
