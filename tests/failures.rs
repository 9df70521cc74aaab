//! The data plane under failure (issue 11), through the real binary (2 workers) on loopback:
//! transient ring errors, peers that die while the other direction is blocked, clients that give
//! up while held, queued or connecting, small pipes, closes that must reset, and resources that
//! run short. Every wait is bounded; every load loop stops by itself.

mod common;

use std::time::Duration;

use common::*;

/// Echo connections through `lb`, one after another, each a 1 KiB round trip.
fn echo_many(lb: std::net::SocketAddr, n: u64) {
    for i in 0..n {
        try_echo(lb, 1024, i).unwrap_or_else(|e| panic!("echo {i}/{n} through {lb}: {e}"));
    }
}

#[test]
fn transient_ring_enter_errors_are_ridden_out() {
    let echo = EchoServer::start();
    let toml = ringlb_config([listener("web").backend(echo.addr())]);
    for errno in ["EAGAIN", "ENOMEM", "EBUSY", "EBADR", "EINTR"] {
        let fault = format!("enter={errno}/3");
        // The fault knob is the io_uring driver's: run it whatever RINGLB_IO the suite uses.
        let mut lb = Lb::start_with_env(
            &toml,
            &[("RINGLB_IO_FAULT", &fault), ("RINGLB_IO", "io_uring")],
        );
        echo_many(lb.addr("web"), 200);
        assert!(
            lb.wait_exit(Duration::from_millis(10)).is_none(),
            "{errno}: ringlb exited; stderr:\n{}",
            lb.stderr_tail(20)
        );
    }
}

#[test]
fn a_programming_error_from_the_ring_stops_with_the_errno() {
    let echo = EchoServer::start();
    let toml = ringlb_config([listener("web").backend(echo.addr())]);
    let mut lb = Lb::start_with_env(
        &toml,
        &[
            ("RINGLB_IO_FAULT", "enter=EBADF/50"),
            ("RINGLB_IO", "io_uring"),
        ],
    );
    let _ = std::thread::spawn({
        let addr = lb.addr("web");
        move || (0..200).for_each(|i| drop(try_echo(addr, 64, i)))
    })
    .join();
    let status = lb.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "stderr:\n{}",
        lb.stderr_tail(20)
    );
    let log = lb.stderr_tail(20);
    assert!(
        log.contains("io_uring_enter") && log.contains("Bad file descriptor"),
        "{log}"
    );
}

// ---- closes that drop bytes or cut a live stream reset; clean ends are FINs ----------------

use common::admin::{metric, scrape};
use common::ops::reload_ok;
use common::stall::{reset, Sink, Stall};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// Writes to `s` (non-blocking) until its buffers are full for `quiet`, bounded by 64 MiB and
/// 10 s; returns the bytes written.
#[allow(dead_code)]
fn fill(s: &TcpStream, quiet: Duration) -> usize {
    s.set_nonblocking(true).expect("nonblocking");
    let chunk = vec![0xa5u8; 64 * 1024];
    let (mut total, t0) = (0, Instant::now());
    let mut blocked_since: Option<Instant> = None;
    let mut w = s;
    while total < 64 << 20 && t0.elapsed() < Duration::from_secs(10) {
        match w.write(&chunk) {
            Ok(n) => {
                total += n;
                blocked_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let since = *blocked_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= quiet {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("fill: {e} after {total} bytes"),
        }
    }
    s.set_nonblocking(false).expect("blocking");
    total
}

/// How the stream ends, skipping whatever data is still queued; panics after `timeout`.
fn end_of(s: &mut TcpStream, timeout: Duration, what: &str) -> StreamEnd {
    match wait_stream_end(s, timeout) {
        Ok(end) => end,
        Err(e) => panic!("{what}: {e} (still open after {timeout:?}?)"),
    }
}

#[test]
fn idle_timeout_resets_when_bytes_were_parked_and_fins_when_not() {
    let streamer = Stall::streaming();
    let echo = EchoServer::start();
    let lb = Lb::start(&ringlb_config([
        listener("stuck")
            .backend(streamer.addr())
            .idle_timeout("1s"),
        listener("quiet").backend(echo.addr()).idle_timeout("1s"),
    ]));
    // A download the client stops reading: the backend's bytes pile up in the LB's pipe. When
    // the idle timeout fires they are dropped, so after what it already has the client must see
    // a reset, not an end of stream that looks complete.
    let mut stuck = connect(lb.addr("stuck"));
    assert!(wait_until(Duration::from_secs(5), || streamer.accepted() == 1));
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        end_of(
            &mut stuck,
            Duration::from_secs(5),
            "client of a stalled download"
        ),
        StreamEnd::Reset
    );
    // Nothing parked: the idle timeout is a clean close.
    let mut quiet = connect(lb.addr("quiet"));
    ping(&mut quiet, 64, 7);
    assert_eq!(
        end_of(&mut quiet, Duration::from_secs(5), "quiet client"),
        StreamEnd::Eof
    );
}

#[test]
fn drain_timeout_and_backend_down_cut_streams_with_a_reset() {
    let echo = EchoServer::start();
    let mut holder = Stall::holding();
    let drained = listener("drained")
        .backend(echo.addr())
        .set("drain_timeout", "\"300ms\"");
    let downed = listener("downed")
        .backend(holder.addr())
        .set("on_backend_down", "\"close\"")
        .set(
            "health",
            "{ interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }",
        )
        .set("passive", "{ consecutive_failures = 0 }");
    let lb = Lb::start(&ringlb_config([drained, downed.clone()]));
    // A listener removed by a reload: its open connection is cut after drain_timeout.
    let mut d = connect(lb.addr("drained"));
    ping(&mut d, 64, 1);
    // A backend marked down with on_backend_down = "close": its open connection is cut.
    let mut h = connect(lb.addr("downed"));
    h.write_all(b"in flight").expect("write");
    // (Health probes connect to the holder too: count the LB's connection to it, not accepts.)
    let admin = lb.admin_addr().expect("admin");
    let held = holder.addr().to_string();
    assert!(wait_until(Duration::from_secs(5), || {
        metric(
            &scrape(admin),
            "ringlb_connections_total",
            &[("listener", "downed"), ("backend", held.as_str())],
        ) == Some(1.0)
    }));
    reload_ok(&lb, &ringlb_config([downed]));
    assert_eq!(
        end_of(
            &mut d,
            Duration::from_secs(3),
            "client of the removed listener"
        ),
        StreamEnd::Reset
    );
    holder.stop_listening();
    assert_eq!(
        end_of(
            &mut h,
            Duration::from_secs(3),
            "client of the backend marked down"
        ),
        StreamEnd::Reset
    );
}

// ---- a peer that dies while the other direction is blocked ----------------------------------

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

#[test]
fn backend_reset_during_a_stalled_download_is_noticed() {
    let streamer = Stall::streaming();
    let lb = Lb::start(&ringlb_config([listener("dl").backend(streamer.addr())]));
    // 50 downloads whose clients stop reading: every buffer on the way fills up.
    let clients: Vec<TcpStream> = (0..50).map(|_| connect(lb.addr("dl"))).collect();
    assert!(wait_until(Duration::from_secs(5), || streamer.accepted() == 50));
    std::thread::sleep(Duration::from_millis(1000));
    await_active(&lb, "dl", 50.0, Duration::from_secs(1), "before the resets");
    // The backend resets half of them: the LB is blocked writing to those clients and not
    // reading from the backend, yet must see the reset and pass it on.
    assert_eq!(streamer.reset(25), 25);
    await_active(
        &lb,
        "dl",
        25.0,
        Duration::from_secs(1),
        "after 25 backend resets",
    );
    let mut resets = 0;
    for mut c in clients {
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        // What a reset one has buffered drains in milliseconds; the others stream forever.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(1) {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    resets += 1;
                    break;
                }
                Err(_) => break, // still streaming: one of the 25 the backend kept
            }
        }
    }
    assert_eq!(resets, 25, "clients that saw the backend's reset");
}

#[test]
fn client_reset_during_a_stalled_upload_is_noticed() {
    let sink = Sink::start();
    let lb = Lb::start(&ringlb_config([listener("ul").backend(sink.addr())]));
    let (baseline, _) = lb.fd_counts();
    // 20 uploads into a backend that never reads, until every buffer on the way is full.
    let clients: Vec<TcpStream> = (0..20).map(|_| connect(lb.addr("ul"))).collect();
    for c in &clients {
        fill(c, Duration::from_millis(200));
    }
    await_active(&lb, "ul", 20.0, Duration::from_secs(1), "before the resets");
    // Then the clients reset: the LB, blocked writing to the backend, must free both sockets,
    // the pipe and the backend slot.
    clients.into_iter().for_each(reset);
    await_active(
        &lb,
        "ul",
        0.0,
        Duration::from_secs(1),
        "after 20 client resets",
    );
    lb.assert_fds_return(baseline, Duration::from_secs(1));
    let admin = lb.admin_addr().expect("admin");
    let b = sink.addr().to_string();
    assert_eq!(
        metric(
            &scrape(admin),
            "ringlb_active_connections",
            &[("backend", b.as_str())]
        ),
        Some(0.0)
    );
}

// ---- small pipes ------------------------------------------------------------------------

#[test]
fn small_pipes_move_every_byte() {
    // As when the user's pipe budget is spent: 8 KiB pipes, which a 16 KiB copy read used to
    // overflow (the stream was cut behind a clean FIN).
    let echo = EchoServer::start();
    let toml = ringlb_config([listener("web").backend(echo.addr())]);
    let lb = Lb::start_with_env(&toml, &[("RINGLB_PIPE_SIZE", "8192")]);
    let addr = lb.addr("web");
    // Streams both ways at once: destinations take less than offered all the time.
    let streams: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || try_echo(addr, 8 << 20, 0x51_0000 + i)))
        .collect();
    for (i, t) in streams.into_iter().enumerate() {
        t.join()
            .expect("echo thread")
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
    }
    // Messages of every size around the copy/splice boundary, on one connection.
    let mut s = connect(addr);
    for (i, len) in (1..=40).map(|k| k * 997).enumerate() {
        try_ping(&mut s, len, i as u64).unwrap_or_else(|e| panic!("ping of {len} bytes: {e}"));
    }
    // Downloads to clients that do not read yet: small messages, each copied, fill the
    // client's socket until little room is left, then a burst arrives while the flow is still
    // copying. Its first read must not exceed what the pipe can park (it used to read 16 KiB,
    // send the little that fit and overflow an 8 KiB pipe: the stream was cut).
    let script = |seed: u64| -> Vec<u8> {
        let mut p = Pattern::new(seed);
        let size = 3000 + (seed % 7) as usize * 100;
        let mut v = vec![0u8; 600 * size + (64 << 10) + 100 * size];
        p.fill(&mut v);
        v
    };
    let bursts = Server::start("bursts", move |s| {
        let mut seed = [0u8; 8];
        s.read_exact(&mut seed)?;
        let seed = u64::from_le_bytes(seed);
        let v = script(seed);
        let size = 3000 + (seed % 7) as usize * 100;
        let (small, rest) = v.split_at(600 * size);
        let (burst, tail) = rest.split_at(64 << 10);
        for m in small.chunks(size) {
            s.write_all(m)?;
            std::thread::sleep(Duration::from_micros(500));
        }
        s.write_all(burst)?;
        for m in tail.chunks(size) {
            s.write_all(m)?;
        }
        s.shutdown(std::net::Shutdown::Write)
    });
    let toml = ringlb_config([listener("slow").backend(bursts.addr())]);
    let lb2 = Lb::start_with_env(&toml, &[("RINGLB_PIPE_SIZE", "8192")]);
    let clients: Vec<_> = (0..14u64)
        .map(|seed| {
            let addr = lb2.addr("slow");
            std::thread::spawn(move || {
                let c = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                c.set_recv_buffer_size(4096).unwrap();
                c.connect(&addr.into()).unwrap();
                let mut c = std::net::TcpStream::from(c);
                c.write_all(&seed.to_le_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(1500));
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut got = Vec::new();
                c.read_to_end(&mut got).map(|_| (seed, got))
            })
        })
        .collect();
    for t in clients {
        let (seed, got) = t.join().expect("client").expect("client read");
        let want = script(seed);
        assert_eq!(got.len(), want.len(), "client {seed}: bytes received");
        assert!(got == want, "client {seed}: bytes differ");
    }
    for (lb, name) in [(&lb, "web"), (&lb2, "slow")] {
        let admin = lb.admin_addr().expect("admin");
        let closed_resource = metric(
            &scrape(admin),
            "ringlb_closes_total",
            &[("listener", name), ("reason", "resource")],
        );
        assert_eq!(closed_resource, Some(0.0), "{name}");
    }
}
