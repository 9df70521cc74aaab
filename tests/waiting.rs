//! Clients that wait before they are proxied (issue 11, item 3), through the real binary on
//! loopback: queued (every backend full), connecting (the backend does not answer) and held
//! (accepted over the listener's `max_connections`). A client that gives up while it waits is
//! freed within a tick and gets no backend connection; one that sent a request and half-closed
//! is still served; held clients expire after `queue_timeout`, are capped, and thousands of
//! them released at once with every backend drained end cleanly (no deep recursion).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use common::admin::{http_post, metric, metric_sum, scrape};
use common::ops::{read_name_line, with_backend_fields, NamedEcho};
use common::stall::reset;
use common::*;

/// `ringlb_listener_active_connections` of listener `name`.
fn active(lb: &Lb, name: &str) -> f64 {
    let admin = lb.admin_addr().expect("admin");
    metric(
        &scrape(admin),
        "ringlb_listener_active_connections",
        &[("listener", name)],
    )
    .unwrap_or(-1.0)
}

/// Waits up to `timeout` for listener `name` to have `n` open connections; panics otherwise.
fn await_active(lb: &Lb, name: &str, n: f64, timeout: Duration, what: &str) {
    let t0 = Instant::now();
    let mut now = -1.0;
    let ok = wait_until(timeout, || {
        now = active(lb, name);
        now == n
    });
    assert!(
        ok,
        "{what}: listener {name:?} has {now} open connections after {:?}, expected {n}; \
         stderr:\n{}",
        t0.elapsed(),
        lb.stderr_tail(20)
    );
}

/// Waits until the LB holds `n` sockets; panics with the count otherwise.
fn await_sockets(lb: &Lb, n: usize, timeout: Duration, what: &str) {
    let mut now = 0;
    let ok = wait_until(timeout, || {
        now = lb.fd_counts().0;
        now == n
    });
    assert!(
        ok,
        "{what}: the LB holds {now} sockets, expected {n}; stderr:\n{}",
        lb.stderr_tail(20)
    );
}

#[test]
fn queued_clients_that_give_up_are_freed_and_never_connected() {
    let echo = EchoServer::start();
    let toml = ringlb_config([listener("q")
        .backend(echo.addr())
        .set("queue_timeout", "\"10s\"")]);
    let lb = Lb::start(&with_backend_fields(
        &toml,
        echo.addr(),
        "max_connections = 1",
    ));
    let q = lb.addr("q");
    let mut c1 = connect(q);
    ping(&mut c1, 32, 1);
    // Queued behind the full backend, then gone: one closes (FIN, nothing sent), one resets.
    let c2 = connect(q);
    let c3 = connect(q);
    await_active(&lb, "q", 3.0, Duration::from_secs(2), "two queued");
    drop(c2);
    reset(c3);
    await_active(&lb, "q", 1.0, Duration::from_secs(1), "queued clients gone");
    // A queued client that sent its request and half-closed is waiting for an answer: kept.
    let mut c4 = connect(q);
    c4.write_all(b"request").expect("write");
    c4.shutdown(Shutdown::Write).expect("shutdown");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        active(&lb, "q"),
        2.0,
        "the half-closed client with a request"
    );
    // The slot frees: only c4 reaches the backend.
    drop(c1);
    let mut got = Vec::new();
    c4.read_to_end(&mut got).expect("c4's answer");
    assert_eq!(got, b"request");
    assert_eq!(echo.accepted(), 2, "c1 and c4 only");
}

#[test]
fn connecting_clients_that_give_up_are_freed() {
    let hole = BlackHole::start();
    let lb = Lb::start(&ringlb_config([listener("c")
        .backend(hole.addr())
        .connect_timeout("10s")]));
    let a = connect(lb.addr("c"));
    let b = connect(lb.addr("c"));
    await_active(&lb, "c", 2.0, Duration::from_secs(2), "two connecting");
    reset(a);
    drop(b);
    await_active(
        &lb,
        "c",
        0.0,
        Duration::from_secs(1),
        "connecting clients gone",
    );
}

/// An LB with one worker and a listener "h" (`max_connections = 1`) over a named echo: one
/// client is proxied and `n` more are accepted over the limit and held. Returns the LB, the
/// proxied client, the held ones and the socket count with none of them.
fn hold(
    n: usize,
    queue_timeout: &str,
    env: &[(&str, &str)],
) -> (Lb, TcpStream, Vec<TcpStream>, usize) {
    raise_fd_limit();
    let echo = NamedEcho::start("b");
    let toml = LbConfig::default()
        .workers(1)
        .listener(
            listener("h")
                .backend(echo.addr())
                .set("max_connections", "1")
                .set("queue_timeout", &format!("\"{queue_timeout}\"")),
        )
        .to_toml();
    let lb = Lb::start_with_env(&toml, env);
    let (baseline, _) = lb.fd_counts();
    let h = lb.addr("h");
    // c0 takes the only place: accepting pauses, the next clients wait in the kernel's queue.
    let mut c0 = connect(h);
    assert_eq!(read_name_line(&mut c0).expect("c0"), "b");
    let waiting: Vec<TcpStream> = (0..n).map(|_| connect(h)).collect();
    // c0 leaves: accepting resumes and takes the whole queue at once; the first gets the
    // place, the others are held.
    drop(c0);
    std::thread::sleep(Duration::from_millis(300));
    let mut proxied = None;
    let mut held = Vec::new();
    for c in waiting {
        // The proxied one has its backend's name waiting; held ones have nothing.
        c.set_nonblocking(true).unwrap();
        let mut b = [0u8; 2];
        let got = c.peek(&mut b);
        c.set_nonblocking(false).unwrap();
        match got {
            Ok(n) if n > 0 => {
                assert!(
                    proxied.is_none(),
                    "two clients proxied with max_connections = 1"
                );
                let mut c = c;
                assert_eq!(read_name_line(&mut c).expect("name"), "b");
                proxied = Some(c);
            }
            _ => held.push(c),
        }
    }
    let proxied = proxied.expect("one client proxied");
    std::mem::forget(echo); // lives until the process ends: its threads hold the connections
    (lb, proxied, held, baseline)
}

#[test]
fn held_clients_that_give_up_are_freed() {
    let (lb, proxied, held, baseline) = hold(100, "30s", &[]);
    assert_eq!(held.len(), 99);
    // io_uring's multishot accept takes the whole queue (99 held); epoll accepts up to 64 per
    // readiness event, and the rest stay in the kernel's queue. Either way some are held.
    std::thread::sleep(Duration::from_millis(300));
    let now = lb.fd_counts().0;
    assert!(
        now > baseline + 2,
        "nothing held: {now} sockets, baseline {baseline}"
    );
    drop(held);
    await_sockets(
        &lb,
        baseline + 2,
        Duration::from_secs(1),
        "held clients gone",
    );
    drop(proxied);
    await_sockets(&lb, baseline, Duration::from_secs(2), "all gone");
}

#[test]
fn held_clients_expire_after_queue_timeout() {
    let (lb, _proxied, held, baseline) = hold(50, "1s", &[]);
    await_sockets(
        &lb,
        baseline + 2,
        Duration::from_secs(3),
        "held clients expired",
    );
    for mut c in held {
        assert!(wait_stream_end(&mut c, Duration::from_secs(1)).is_ok());
    }
    let admin = lb.admin_addr().expect("admin");
    let n = metric_sum(
        &scrape(admin),
        "ringlb_closes_total",
        &[("listener", "h"), ("reason", "queue_timeout")],
    );
    assert_eq!(n, 49.0);
}

#[test]
fn held_clients_beyond_the_cap_are_closed_and_counted() {
    let (lb, _proxied, _held, baseline) = hold(100, "30s", &[("RINGLB_HELD_MAX", "40")]);
    await_sockets(&lb, baseline + 2 + 40, Duration::from_secs(2), "40 held");
    let admin = lb.admin_addr().expect("admin");
    let n = metric_sum(
        &scrape(admin),
        "ringlb_closes_total",
        &[("listener", "h"), ("reason", "over_limit")],
    );
    // io_uring accepts all 99 at once (59 over the cap); epoll 63 (23 over).
    assert!((1.0..=59.0).contains(&n), "over_limit closes: {n}");
}

#[test]
fn thousands_of_held_clients_released_with_every_backend_drained() {
    let (mut lb, proxied, held, baseline) = hold(4000, "60s", &[]);
    assert!(held.len() >= 3900, "{} held", held.len());
    // No backend can take them now; then the place frees and every held client is released
    // in one go, each closed for want of a backend.
    let admin = lb.admin_addr().expect("admin");
    let toml = std::fs::read_to_string(lb.config_path()).expect("config");
    let addr = toml
        .split("address = \"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("backend address")
        .to_string();
    let (code, body) = http_post(admin, &format!("/backends/h/{addr}/drain"));
    assert_eq!(code, 200, "{body}");
    drop(proxied);
    await_sockets(
        &lb,
        baseline,
        Duration::from_secs(10),
        "every held client closed",
    );
    assert!(
        lb.wait_exit(Duration::from_millis(10)).is_none(),
        "ringlb died; stderr:\n{}",
        lb.stderr_tail(20)
    );
    let mut ended = 0;
    for mut c in held {
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut b = [0u8; 16];
        match c.read(&mut b) {
            Ok(0) => ended += 1,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => ended += 1,
            other => panic!("held client: {other:?}"),
        }
    }
    assert!(ended >= 3900);
}
