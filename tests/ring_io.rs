//! Small messages through the ring (io_uring backend with a buffer ring, `worker/ringio.rs`):
//! counted with `strace -c` on the real binary, a request/response exchange makes no `recvfrom`
//! or `sendto` of its own on io_uring, while the fallbacks (the feature switched off with
//! `RINGLB_IO_DISABLE=ring_recv`, and the epoll backend) make one of each per message — which is
//! also what shows the count can fail. And bytes stay exact whatever the mix of message sizes:
//! flows switch between ring receive/send, copy and splice as their reads grow and shrink, on
//! many connections at once, on whichever backend the suite runs.
//!
//! Each test pins its own backend (the strace tests) or follows the suite's `RINGLB_IO`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::payload::{digest_of, Pattern};
use common::*;

/// `strace -f -c -p PID` while `work` runs: syscall name → calls.
fn syscalls_during(pid: u32, work: impl FnOnce()) -> std::collections::BTreeMap<String, u64> {
    let out = std::env::temp_dir().join(format!("ringlb-strace-{}-{pid}.txt", std::process::id()));
    let mut st = Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("strace (apt-get install strace; .ci/run installs it)");
    // strace says "attached" per thread on stderr: wait for one line per thread (a fixed pause
    // missed the first syscalls under load), then a moment more.
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(1);
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = st.stderr.take().expect("strace stderr");
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            // "Process N attached with T threads", or one "Process N attached" per thread.
            let n = match line.split("attached with ").nth(1) {
                Some(rest) => rest.split_whitespace().next().and_then(|t| t.parse().ok()),
                None => line.contains("attached").then_some(1),
            };
            if let Some(n) = n {
                let _ = tx.send(n);
            }
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut attached = 0;
    while attached < threads {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(n) => attached += n,
            Err(_) => break,
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    work();
    // SAFETY: plain kill(2) on the child we spawned.
    unsafe { libc::kill(st.id() as i32, libc::SIGINT) };
    let _ = st.wait();
    let text = std::fs::read_to_string(&out).expect("strace -c output");
    let _ = std::fs::remove_file(&out);
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // % time, seconds, usecs/call, calls, [errors,] syscall
        if cols.len() >= 5 && cols[0].parse::<f64>().is_ok() {
            if let (Ok(calls), Some(name)) = (cols[3].parse::<u64>(), cols.last()) {
                counts.insert(name.to_string(), calls);
            }
        }
    }
    counts
}

/// `n` round trips of `size`-byte messages on one connection through the LB to an echo server.
fn ping_pong(lb: &Lb, n: usize, size: usize) {
    let mut s = TcpStream::connect(lb.addr("t")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; size];
    for i in 0..n {
        let msg = vec![(i % 251) as u8; size];
        s.write_all(&msg).expect("send");
        s.read_exact(&mut buf).expect("echo");
        assert_eq!(buf, msg, "round trip {i}");
    }
}

fn lb_with(env: &[(&str, &str)], backend: std::net::SocketAddr) -> Lb {
    let cfg = common::config::LbConfig::default()
        .workers(1)
        .listener(listener("t").backend(backend))
        .to_toml();
    Lb::start_with(&cfg, env, |c| {
        c.env_remove("RINGLB_IO_DISABLE");
    })
}

const TRIPS: usize = 500;

#[test]
fn small_messages_make_no_recv_or_send_syscall_on_io_uring() {
    let echo = EchoServer::start();
    let lb = lb_with(&[("RINGLB_IO", "io_uring")], echo.addr());
    assert!(
        lb.wait_for_log("ring recv/send", Duration::from_secs(1)),
        "the io line lists ring recv/send: {}",
        lb.stderr_tail(5)
    );
    let counts = syscalls_during(lb.pid(), || ping_pong(&lb, TRIPS, 100));
    let per_msg =
        counts.get("recvfrom").copied().unwrap_or(0) + counts.get("sendto").copied().unwrap_or(0);
    assert!(
        per_msg < 20,
        "{TRIPS} round trips made {per_msg} recvfrom + sendto (expected none per message): {counts:?}"
    );
    assert!(
        counts.get("io_uring_enter").copied().unwrap_or(0) > 0,
        "strace saw the worker: {counts:?}"
    );
}

/// `n` short connections: connect, 64 bytes each way, half-close, read to EOF.
fn short_conns(lb: &Lb, n: usize) {
    for i in 0..n {
        let mut s = TcpStream::connect(lb.addr("t")).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg = [(i % 251) as u8; 64];
        s.write_all(&msg).expect("send");
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("echo to EOF");
        assert_eq!(back, msg, "connection {i}");
    }
}

/// The backend socket, its options, half-closes and closes go through the ring too: per short
/// connection no `socket`, `setsockopt`, `shutdown` or `close` syscall on io_uring (the socket,
/// the 5 options, TCP_NODELAY and keepalive, the one half-close and both closes are SQEs),
/// against one socket, 5 setsockopt, one half-close and two closes per connection with the
/// features off.
#[test]
fn short_connections_make_their_socket_and_close_it_in_the_ring() {
    const CONNS: usize = 200;
    let echo = EchoServer::start();
    for (what, env, ring) in [
        ("io_uring", vec![("RINGLB_IO", "io_uring")], true),
        (
            "io_uring without ring_close, ring_sockopt and ring_socket",
            vec![
                ("RINGLB_IO", "io_uring"),
                ("RINGLB_IO_DISABLE", "ring_close,ring_sockopt,ring_socket"),
            ],
            false,
        ),
    ] {
        let cfg = common::config::LbConfig::default()
            .workers(1)
            .listener(listener("t").backend(echo.addr()))
            .to_toml();
        // The suite's own RINGLB_IO_DISABLE must not switch the ring case off.
        let lb = Lb::start_with(&cfg, &env, |c| {
            if ring {
                c.env_remove("RINGLB_IO_DISABLE");
            }
        });
        let base = lb.fd_counts().0;
        let counts = syscalls_during(lb.pid(), || short_conns(&lb, CONNS));
        eprintln!("{what}: {counts:?}");
        let closes = counts.get("close").copied().unwrap_or(0);
        let shutdowns = counts.get("shutdown").copied().unwrap_or(0);
        let opts = counts.get("setsockopt").copied().unwrap_or(0);
        let sockets = counts.get("socket").copied().unwrap_or(0);
        if ring {
            assert!(
                closes + shutdowns + opts + sockets < 20,
                "{what}: {sockets} socket + {closes} close + {shutdowns} shutdown + {opts} \
                 setsockopt for {CONNS} connections: {counts:?}"
            );
        } else {
            assert!(
                // (strace may attach a moment after the first connection started)
                closes >= 2 * CONNS as u64 - 4
                    && shutdowns >= CONNS as u64 - 2
                    && opts >= 5 * (CONNS as u64 - 2)
                    && sockets >= CONNS as u64 - 2,
                "{what}: {sockets} socket, {closes} close, {shutdowns} shutdown, {opts} \
                 setsockopt for {CONNS} connections: {counts:?}"
            );
        }
        // Nothing leaks either way: back to the sockets it had before.
        lb.assert_fds_return(base, Duration::from_secs(3));
    }
}

#[test]
fn without_the_buffer_ring_each_message_costs_a_recv_and_a_send() {
    let echo = EchoServer::start();
    for (what, env) in [
        (
            "io_uring without ring_recv",
            vec![
                ("RINGLB_IO", "io_uring"),
                ("RINGLB_IO_DISABLE", "ring_recv"),
            ],
        ),
        ("epoll", vec![("RINGLB_IO", "epoll")]),
    ] {
        let cfg = common::config::LbConfig::default()
            .workers(1)
            .listener(listener("t").backend(echo.addr()))
            .to_toml();
        let lb = Lb::start_with(&cfg, &env, |_| {});
        let counts = syscalls_during(lb.pid(), || ping_pong(&lb, TRIPS, 100));
        let recvs = counts.get("recvfrom").copied().unwrap_or(0);
        let sends = counts.get("sendto").copied().unwrap_or(0);
        // One of each per message per direction: 2 × TRIPS of each.
        assert!(
            recvs >= 2 * TRIPS as u64 && sends >= 2 * TRIPS as u64,
            "{what}: {recvs} recvfrom, {sends} sendto for {TRIPS} round trips: {counts:?}"
        );
    }
}

/// Messages of every size from 1 byte to 256 KiB, in a seeded random order, on 16 connections
/// at once: every byte comes back in order.
#[test]
fn mixed_message_sizes_keep_every_byte_in_order() {
    const CONNS: usize = 16;
    const MSGS: usize = 120;
    let seed = 0x5eed_1234u64;
    eprintln!("seed {seed:#x}");
    let echo = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("t").backend(echo.addr())]));
    let addr = lb.addr("t");
    let t0 = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..CONNS {
            scope.spawn(move || {
                let mut rng = Pattern::new(seed + c as u64);
                let mut sizes = [0u8; MSGS * 4];
                rng.fill(&mut sizes);
                let mut s = TcpStream::connect(addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut reader = s.try_clone().unwrap();
                let (mut sent, mut got) = (Vec::new(), Vec::new());
                let rx = std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut all = Vec::new();
                    loop {
                        match reader.read(&mut buf) {
                            Ok(0) => return Ok(all),
                            Ok(n) => all.extend_from_slice(&buf[..n]),
                            Err(e) => return Err(e),
                        }
                    }
                });
                for m in 0..MSGS {
                    let r = u32::from_le_bytes(sizes[m * 4..m * 4 + 4].try_into().unwrap());
                    // Mostly small (ring), some around the buffer size, some bulk (splice).
                    let len = match r % 10 {
                        0..=5 => 1 + (r >> 8) as usize % 600,
                        6 | 7 => 3000 + (r >> 8) as usize % 3000,
                        _ => 16 * 1024 + (r >> 8) as usize % (240 * 1024),
                    };
                    let msg: Vec<u8> = (0..len).map(|i| (i as u32 ^ r) as u8).collect();
                    s.write_all(&msg).expect("send");
                    sent.extend_from_slice(&msg);
                }
                s.shutdown(Shutdown::Write).unwrap();
                got.extend(rx.join().unwrap().expect("read echo"));
                assert_eq!(got.len(), sent.len(), "conn {c}: bytes back");
                assert_eq!(
                    digest_of(&got),
                    digest_of(&sent),
                    "conn {c}: same bytes in order"
                );
            });
        }
    });
    eprintln!("{CONNS} connections done in {:?}", t0.elapsed());
}

/// A backend that accepts with a tiny receive buffer and reads nothing until `open` is set,
/// then reads and counts every byte per connection (in accept order).
struct Gate {
    addr: std::net::SocketAddr,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    counts: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::atomic::AtomicU64>>>>,
}

impl Gate {
    fn start() -> Gate {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        sock.listen(64).unwrap();
        let l: std::net::TcpListener = sock.into();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(false));
        let counts: Arc<Mutex<Vec<Arc<AtomicU64>>>> = Arc::default();
        let (o, c) = (open.clone(), counts.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(60) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let n = Arc::new(AtomicU64::new(0));
                        c.lock().unwrap().push(n.clone());
                        let o = o.clone();
                        std::thread::spawn(move || {
                            while !o.load(Ordering::SeqCst)
                                && t0.elapsed() < Duration::from_secs(60)
                            {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                            let mut buf = vec![0u8; 65536];
                            while let Ok(k) = s.read(&mut buf) {
                                if k == 0 {
                                    break;
                                }
                                n.fetch_add(k as u64, Ordering::SeqCst);
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Gate { addr, open, counts }
    }
}

/// With the buffer ring exhausted (2 buffers, forced by `RINGLB_RING_BUFS`; three uploads whose
/// backend reads nothing park their sends), other connections are still served (by poll and
/// syscall), and once the backend reads, every parked upload arrives in full.
#[test]
fn an_exhausted_buffer_ring_falls_back_and_parked_sends_resume() {
    use std::sync::atomic::Ordering;
    const UPLOADS: usize = 3;
    const EACH: usize = 8_192_000; // past the kernel buffers on both sides of the LB
    let gate = Gate::start();
    let echo = EchoServer::start();
    let cfg = common::config::LbConfig::default()
        .workers(1)
        .listener(listener("up").backend(gate.addr))
        .listener(listener("t").backend(echo.addr()))
        .to_toml();
    let lb = Lb::start_with(&cfg, &[("RINGLB_RING_BUFS", "2")], |c| {
        c.env_remove("RINGLB_IO_DISABLE");
    });
    let up = lb.addr("up");
    let writers: Vec<_> = (0..UPLOADS)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(up).expect("connect");
                s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
                let msg = vec![i as u8; 100];
                for _ in 0..EACH / 100 {
                    s.write_all(&msg).expect("upload");
                }
                s.shutdown(Shutdown::Write).unwrap();
                // Keep the socket until the backend has everything.
                std::thread::sleep(Duration::from_secs(3));
            })
        })
        .collect();
    // The uploads are stuck behind the closed gate (backend buffers full); meanwhile a fresh
    // connection on the other listener still round-trips.
    std::thread::sleep(Duration::from_millis(800));
    ping_pong(&lb, 200, 100);
    gate.open.store(true, Ordering::SeqCst);
    let all_in = wait_until(Duration::from_secs(20), || {
        let c = gate.counts.lock().unwrap();
        c.len() == UPLOADS && c.iter().all(|n| n.load(Ordering::SeqCst) == EACH as u64)
    });
    let got: Vec<u64> = gate
        .counts
        .lock()
        .unwrap()
        .iter()
        .map(|n| n.load(Ordering::SeqCst))
        .collect();
    assert!(
        all_in,
        "every upload arrives in full once the backend reads: {got:?} of {EACH} each"
    );
    for w in writers {
        w.join().expect("writer");
    }
}

/// Small uploads into a backend that reads nothing park ring sends (and fill the kernel buffers
/// on both sides); when the backend then resets, every client is reset within a tick or two and
/// the balancer frees every socket: a parked send must not keep a dead connection alive.
#[test]
fn a_backend_reset_under_parked_ring_sends_resets_the_clients() {
    use common::payload::{wait_stream_end, StreamEnd};
    use common::stall::Stall;
    const CLIENTS: usize = 6;
    let stall = Stall::holding();
    let lb = Lb::start(&ringlb_config([listener("t").backend(stall.addr())]));
    let base = lb.fd_counts().0;
    let addr = lb.addr("t");
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|i| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_nonblocking(true).unwrap();
            // Small writes until the path is full (bounded: 64 MiB or 5 s).
            let (t0, mut sent) = (Instant::now(), 0usize);
            let msg = [i as u8; 200];
            while sent < 64 << 20 && t0.elapsed() < Duration::from_secs(5) {
                match s.write(&msg) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        // Full for 200 ms in a row: parked.
                        std::thread::sleep(Duration::from_millis(200));
                        if s.write(&msg).is_err() {
                            break;
                        }
                    }
                    Err(e) => panic!("client {i}: {e}"),
                }
            }
            s.set_nonblocking(false).unwrap();
            s
        })
        .collect();
    assert!(wait_until(Duration::from_secs(5), || stall.accepted() == CLIENTS));
    assert_eq!(stall.reset(CLIENTS), CLIENTS);
    let t0 = Instant::now();
    for (i, mut c) in clients.into_iter().enumerate() {
        let end = wait_stream_end(&mut c, Duration::from_secs(2));
        assert!(
            matches!(end, Ok(StreamEnd::Reset)),
            "client {i}: {end:?} after the backend reset (waited {:?})",
            t0.elapsed()
        );
    }
    lb.assert_fds_return(base, Duration::from_secs(3));
}

/// `n` UDP round trips of `size`-byte datagrams from one client through the LB to an echo
/// backend: each reply is `NAME ` + the datagram, byte for byte.
fn udp_ping_pong(lb: &Lb, n: usize, size: usize) {
    let c = common::udp::UdpClient::bind(std::net::Ipv4Addr::LOCALHOST);
    for i in 0..n {
        let msg = Pattern::bytes(i as u64, size);
        c.exchange(lb.addr("u"), &msg, Duration::from_secs(5));
    }
}

fn udp_lb(env: &[(&str, &str)], backend: std::net::SocketAddr, ring: bool) -> Lb {
    let cfg = common::config::LbConfig::default()
        .workers(1)
        .listener(common::udp::udp_listener("u").backend(backend))
        .to_toml();
    // The suite's own RINGLB_IO_DISABLE must not switch the ring case off.
    Lb::start_with(&cfg, env, |c| {
        if ring {
            c.env_remove("RINGLB_IO_DISABLE");
        }
    })
}

/// UDP replies come through the ring too (multishot receive into ring buffers): per datagram no
/// `recvmmsg`, `recvfrom` or `recvmsg` on io_uring (client datagrams were in the ring already),
/// against one `recvmmsg` per reply with `ring_udp` off and on epoll. Replies still leave in one
/// `sendmmsg` per batch (here one per reply: one datagram in flight).
#[test]
fn udp_replies_make_no_recv_syscall_on_io_uring() {
    let echo = common::udp::UdpEcho::start("e");
    for (what, env, ring) in [
        ("io_uring", vec![("RINGLB_IO", "io_uring")], true),
        (
            "io_uring without ring_udp",
            vec![("RINGLB_IO", "io_uring"), ("RINGLB_IO_DISABLE", "ring_udp")],
            false,
        ),
        ("epoll", vec![("RINGLB_IO", "epoll")], false),
    ] {
        let lb = udp_lb(&env, echo.addr(), ring);
        if ring {
            assert!(
                lb.wait_for_log("ring udp recv", Duration::from_secs(1)),
                "the io line lists ring udp recv: {}",
                lb.stderr_tail(5)
            );
        }
        // The flow exists before strace attaches.
        udp_ping_pong(&lb, 1, 64);
        let counts = syscalls_during(lb.pid(), || udp_ping_pong(&lb, TRIPS, 64));
        eprintln!("{what}: {counts:?}");
        let recvs: u64 = ["recvmmsg", "recvfrom", "recvmsg"]
            .iter()
            .map(|n| counts.get(*n).copied().unwrap_or(0))
            .sum();
        let sends = counts.get("sendmmsg").copied().unwrap_or(0);
        if ring {
            assert!(
                recvs < 20,
                "{what}: {TRIPS} round trips made {recvs} receive syscalls: {counts:?}"
            );
            assert!(
                counts.get("io_uring_enter").copied().unwrap_or(0) > 0 && sends >= TRIPS as u64,
                "{what}: strace saw the worker batch replies: {counts:?}"
            );
        } else {
            assert!(
                recvs >= TRIPS as u64,
                "{what}: {recvs} receive syscalls for {TRIPS} round trips: {counts:?}"
            );
        }
    }
}

/// Datagrams of every size up to the largest a reply can carry (the echo adds `e `), in a seeded
/// order, on whichever backend the suite runs: every reply comes back whole (a ring buffer
/// smaller than a datagram would cut it short).
#[test]
fn udp_datagrams_of_every_size_come_back_whole() {
    let echo = common::udp::UdpEcho::start("e");
    let lb = udp_lb(&[], echo.addr(), false);
    let c = common::udp::UdpClient::bind(std::net::Ipv4Addr::LOCALHOST);
    let mut x = 0x9e37_79b9u64;
    for i in 0..200u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = match i % 4 {
            0 => 1 + (x % 100) as usize,
            1 => 1 + (x % 4096) as usize,
            2 => 60_000 + (x % 5_505) as usize,
            _ => 65_505,
        };
        let msg = Pattern::bytes(i, size);
        c.exchange(lb.addr("u"), &msg, Duration::from_secs(5));
    }
}

/// With only 2 reply buffers (`RINGLB_UDP_RING_BUFS`), 40 clients at once keep running the
/// flows' ring receives out of buffers (-ENOBUFS): the replies wait in their sockets and the
/// worker re-arms, so every client still gets every reply, byte for byte.
#[test]
fn udp_replies_survive_an_exhausted_reply_ring() {
    const CLIENTS: usize = 40;
    const EACH: usize = 50;
    let echo = common::udp::UdpEcho::start("e");
    let lb = udp_lb(&[("RINGLB_UDP_RING_BUFS", "2")], echo.addr(), false);
    let to = lb.addr("u");
    std::thread::scope(|s| {
        for i in 0..CLIENTS {
            s.spawn(move || {
                let c = common::udp::UdpClient::bind(common::udp::client_ip(40, i));
                for seq in 0..EACH {
                    let msg = Pattern::bytes((i * EACH + seq) as u64, 1 + (i * 37 + seq) % 1400);
                    c.exchange(to, &msg, Duration::from_secs(5));
                }
            });
        }
    });
}
