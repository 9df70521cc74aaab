//! The TCP data plane end to end: real loopback sockets through the real `ringlb` binary.
//! Byte-exact proxying both ways with half-close, many concurrent connections, resets, connect
//! timeouts and refusals with retry, idle timeout, drain on SIGTERM and round robin.

mod common;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Starts an LB with one round-robin listener "web" over `backends`.
fn lb_over(backends: &[SocketAddr]) -> Lb {
    let l = backends.iter().fold(listener("web"), |l, a| l.backend(*a));
    Lb::start(&ringlb_config([l]))
}

fn echo_case(len: u64, seed: u64) {
    let server = EchoServer::start();
    let lb = lb_over(&[server.addr()]);
    let baseline = lb.fd_counts().0;
    let t0 = Instant::now();
    echo(lb.addr("web"), len, seed);
    eprintln!(
        "echo of {len} bytes (seed {seed:#x}) took {:?}",
        t0.elapsed()
    );
    assert!(
        server.wait_live(0, Duration::from_secs(5)),
        "echo server connection still open"
    );
    assert_eq!(server.errors(), Vec::<String>::new());
    lb.assert_fds_return(baseline, Duration::from_secs(5));
}

#[test]
fn echo_1_byte_client_half_closes_first() {
    echo_case(1, 0x1001);
}

#[test]
fn echo_64_kib_client_half_closes_first() {
    echo_case(64 << 10, 0x1002);
}

#[test]
fn echo_4_mib_client_half_closes_first() {
    echo_case(4 << 20, 0x1003);
}

#[test]
fn echo_64_mib_client_half_closes_first() {
    echo_case(64 << 20, 0x1004);
}

/// The backend sends 4 MiB and half-closes while the client is still sending; the client gets
/// every byte then EOF, keeps writing on its open half, and the backend gets all of it.
#[test]
fn backend_closes_first_client_keeps_sending() {
    const DOWN: u64 = 4 << 20;
    const UP_BEFORE: u64 = 1 << 20;
    const UP_AFTER: u64 = 256 << 10;
    let (seed_down, seed_up) = (0x2001, 0x2002);
    let sender = SenderThenClose::start(DOWN, seed_down);
    let lb = lb_over(&[sender.addr()]);
    let mut client = connect(lb.addr("web"));

    // One continuous upstream pattern: UP_BEFORE bytes while the download runs, then UP_AFTER
    // bytes after the client has seen the backend's EOF.
    let mut up = Pattern::new(seed_up);
    let mut up_hash = Hasher::default();
    let mut chunk = vec![0; (UP_BEFORE as usize).min(64 << 10)];
    let mut writer = client.try_clone().expect("try_clone");
    let (down, up_before) = std::thread::scope(|s| {
        let w = s.spawn(|| -> io::Result<()> {
            let mut left = UP_BEFORE;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                up.fill(&mut chunk[..n]);
                writer.write_all(&chunk[..n])?;
                up_hash.update(&chunk[..n]);
                left -= n as u64;
            }
            Ok(())
        });
        let down = recv_to_eof(&mut client);
        (down, w.join().unwrap())
    });
    up_before.expect("client write while backend was sending");
    let down = down.expect("client receiving the backend's 4 MiB");
    assert_eq!(down, pattern_digest(DOWN, seed_down), "download");

    // The client's write side is still open after the backend's EOF.
    let mut left = UP_AFTER;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        up.fill(&mut chunk[..n]);
        client
            .write_all(&chunk[..n])
            .expect("client write after the backend's EOF");
        up_hash.update(&chunk[..n]);
        left -= n as u64;
    }
    client
        .shutdown(Shutdown::Write)
        .expect("client shutdown(Write)");
    assert!(
        sender.wait_live(0, Duration::from_secs(5)),
        "backend never saw the client's EOF; it got {:?} so far",
        sender.received()
    );
    assert_eq!(sender.errors(), Vec::<String>::new());
    assert_eq!(sender.received(), vec![up_hash.digest()], "upload");
    assert_eq!(
        wait_stream_end(&mut client, Duration::from_secs(5)).expect("final read"),
        StreamEnd::Eof
    );
}

#[test]
fn thousand_concurrent_connections() {
    const THREADS: usize = 10;
    const PER_THREAD: usize = 100;
    const LEN: usize = 16 << 10;
    raise_fd_limit();
    let echo = EchoServer::start();
    let lb = lb_over(&[echo.addr()]);
    let addr = lb.addr("web");
    let baseline = lb.fd_counts().0;
    let all_open = Barrier::new(THREADS);
    let t0 = Instant::now();
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let all_open = &all_open;
                s.spawn(move || {
                    let mut failures = Vec::new();
                    let mut conns = Vec::new();
                    for i in 0..PER_THREAD {
                        match try_connect(addr) {
                            Ok(c) => conns.push((i, c)),
                            Err(e) => failures.push(format!("thread {t} conn {i}: connect: {e}")),
                        }
                    }
                    all_open.wait();
                    for (i, c) in &mut conns {
                        let seed = (t * PER_THREAD + *i) as u64;
                        if let Err(e) = try_ping(c, LEN, seed) {
                            failures.push(format!("thread {t} conn {i}: {e}"));
                        }
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    eprintln!("1000 connections x 16 KiB took {:?}", t0.elapsed());
    assert!(
        failures.is_empty(),
        "{} of 1000 connections failed, first: {:?}\nLB stderr tail:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        lb.stderr_tail(20)
    );
    assert_eq!(echo.accepted(), THREADS * PER_THREAD);
    lb.assert_fds_return(baseline, Duration::from_secs(10));
    assert!(
        echo.wait_live(0, Duration::from_secs(5)),
        "backend connections left open"
    );
}

#[test]
fn backend_reset_ends_client_connection() {
    let reset = ResetAfter::start(4 << 10);
    let lb = lb_over(&[reset.addr()]);
    let baseline = lb.fd_counts().0;
    let mut client = connect(lb.addr("web"));
    client
        .write_all(&Pattern::bytes(0x4001, 16 << 10))
        .expect("client write");
    let t0 = Instant::now();
    let end = wait_stream_end(&mut client, Duration::from_secs(5));
    assert!(
        end.is_ok(),
        "client connection did not end within 5 s of the backend reset ({} resets sent): {end:?}",
        reset.resets()
    );
    eprintln!("client saw {:?} after {:?}", end.unwrap(), t0.elapsed());
    assert_eq!(reset.resets(), 1, "backend errors: {:?}", reset.errors());
    drop(client);
    lb.assert_fds_return(baseline, Duration::from_secs(5));
}

#[test]
fn connect_timeout_tries_next_backend() {
    let hole = BlackHole::start();
    let echo = EchoServer::start();
    let l = listener("web")
        .backend(hole.addr())
        .backend(echo.addr())
        .connect_timeout("300ms");
    let lb = Lb::start(&ringlb_config([l]));
    let mut slow = 0;
    for i in 0..10 {
        let t0 = Instant::now();
        if let Err(e) = try_echo(lb.addr("web"), 1024, 0x5000 + i) {
            panic!(
                "connection {i} failed after {:?}: {e}\nLB stderr tail:\n{}",
                t0.elapsed(),
                lb.stderr_tail(20)
            );
        }
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "connection {i} took {took:?}"
        );
        if took >= Duration::from_millis(250) {
            slow += 1;
        }
    }
    eprintln!("{slow} of 10 connections waited for the black hole");
    assert_eq!(echo.accepted(), 10);
    assert!(
        slow >= 1,
        "no connection waited for the black hole's connect timeout"
    );
}

#[test]
fn refused_backend_is_retried_invisibly() {
    let (a, b) = (EchoServer::start(), EchoServer::start());
    let lb = lb_over(&[a.addr(), dead_addr(), b.addr()]);
    let mut failures = Vec::new();
    for i in 0..100 {
        if let Err(e) = try_echo(lb.addr("web"), 100, 0x6000 + i) {
            failures.push(format!("connection {i}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 100 failed, first: {:?}\nLB stderr tail:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        lb.stderr_tail(20)
    );
    assert_eq!(a.accepted() + b.accepted(), 100);
}

#[test]
fn idle_timeout_closes_idle_but_not_busy_connections() {
    let (idle_echo, busy_echo) = (EchoServer::start(), EchoServer::start());
    let lb = Lb::start(&ringlb_config([
        listener("idle")
            .backend(idle_echo.addr())
            .idle_timeout("1s"),
        listener("busy")
            .backend(busy_echo.addr())
            .idle_timeout("1s"),
    ]));
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut c = connect(lb.addr("idle"));
            ping(&mut c, 100, 0x7001);
            let t0 = Instant::now();
            let end = wait_stream_end(&mut c, Duration::from_secs(6));
            let took = t0.elapsed();
            eprintln!("idle connection ended ({end:?}) after {took:?}");
            assert!(
                end.is_ok(),
                "idle connection still open after {took:?}: {end:?}"
            );
            assert!(
                took >= Duration::from_millis(900) && took <= Duration::from_secs(4),
                "idle connection closed after {took:?}, expected 1-4 s"
            );
            assert!(
                idle_echo.wait_live(0, Duration::from_secs(2)),
                "the backend side of the idle connection is still open {:?} after the client's \
                 side ended",
                t0.elapsed()
            );
        });
        s.spawn(|| {
            let mut c = connect(lb.addr("busy"));
            let t0 = Instant::now();
            let mut i = 0;
            while t0.elapsed() < Duration::from_secs(3) {
                if let Err(e) = try_ping(&mut c, 100, 0x7100 + i) {
                    panic!("busy connection failed after {:?}: {e}", t0.elapsed());
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            assert_eq!(busy_echo.live(), 1, "busy backend connection was closed");
            try_echo_stream(&mut c, 1000, 0x7200).expect("busy connection at the end");
        });
    });
}

#[test]
fn sigterm_drains_then_exits_zero() {
    let echo = EchoServer::start();
    let mut lb = Lb::start(
        &LbConfig::default()
            .drain_timeout("10s")
            .listener(listener("web").backend(echo.addr()))
            .to_toml(),
    );
    let addr = lb.addr("web");
    let mut old = connect(addr);
    ping(&mut old, 1000, 0x8001);
    // `ready:` may mention the drain timeout: look only at lines logged after the signal.
    let mark = lb.log_len();
    lb.signal(Signal::SIGTERM);
    let drain_logged = lb.wait_for_log_since(mark, "drain", Duration::from_millis(300));
    eprintln!("drain logged: {drain_logged}");

    match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("new connect during drain: expected refusal, got {e}"),
        Ok(mut c) => {
            // Accepted by the kernel: it must not be served, and must end promptly.
            set_timeouts(&c);
            let _ = c.write_all(b"hello?");
            let mut buf = [0u8; 16];
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            match c.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
                other => panic!(
                    "new connection during drain was accepted and not refused/reset: read \
                     {other:?}; LB stderr tail:\n{}",
                    lb.stderr_tail(20)
                ),
            }
        }
    }

    ping(&mut old, 1000, 0x8002);
    try_echo_stream(&mut old, 64 << 10, 0x8003).expect("old connection during drain");
    drop(old);
    let status = lb.wait_exit(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "after drain: exit status {status:?}; stderr tail:\n{}",
        lb.stderr_tail(20)
    );
}

#[test]
fn round_robin_spreads_evenly() {
    let servers = ["a", "b", "c"].map(NamedServer::start);
    let l = servers
        .iter()
        .fold(listener("web"), |l, s| l.weighted(s.addr(), 1));
    let lb = Lb::start(&ringlb_config([l]));
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..30 {
        let mut c = connect(lb.addr("web"));
        let mut name = String::new();
        c.read_to_string(&mut name)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        *counts.entry(name).or_default() += 1;
    }
    let expected: HashMap<String, usize> =
        servers.iter().map(|s| (s.name().to_string(), 10)).collect();
    assert_eq!(counts, expected);
}
