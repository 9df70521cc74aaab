//! Tests of the UDP probe over real loopback UDP sockets (bound to `127.0.0.1:0`, every receive
//! with a timeout, responder threads joined so their panics fail the test), and of the `udp`
//! flag from config to probe.

use super::probe_tests::{assert_no_fd_growth, open_fds, probe, serial, PATIENCE};
use super::*;
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

fn udp_spec(addr: SocketAddr, send: &[u8], expect: &[u8]) -> ProbeSpec {
    ProbeSpec {
        addr,
        timeout: Duration::from_secs(2),
        send: Some(send.to_vec()),
        expect: Some(expect.to_vec()),
        udp: true,
        http: None,
    }
}

fn bind_udp() -> (UdpSocket, SocketAddr) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

/// A port with nothing bound to it (bound once, then closed).
fn closed_udp_port() -> SocketAddr {
    bind_udp().1
}

/// Answers one datagram: asserts it equals `request`, replies `reply` to its sender.
fn answer_once(request: &'static [u8], reply: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let (socket, addr) = bind_udp();
    let handle = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (n, from) = socket.recv_from(&mut buf).expect("a probe datagram");
        assert_eq!(&buf[..n], request);
        socket.send_to(reply, from).expect("reply");
    });
    (addr, handle)
}

#[test]
fn udp_probe_up_on_the_expected_reply() {
    // A DNS-like exchange: the reply starts with the query's 2-byte ID and goes on.
    let (addr, server) = answer_once(b"\x52\x4c\x01\x00query", b"\x52\x4c\x81\x80answer");
    let outcome = probe(&udp_spec(addr, b"\x52\x4c\x01\x00query", b"\x52\x4c"));
    assert_eq!(outcome, Outcome::Up);
    server.join().expect("server");
}

#[test]
fn udp_probe_down_on_a_wrong_reply() {
    let cases: [(&'static [u8], &str); 3] = [
        (b"NOPE, not today", "expected \"PONG\", got \"NOPE\""),
        (b"PON", "expected \"PONG\", got \"PON\""),
        (b"", "expected \"PONG\", got \"\""),
    ];
    for (reply, want) in cases {
        let (addr, server) = answer_once(b"PING", reply);
        assert_eq!(
            probe(&udp_spec(addr, b"PING", b"PONG")),
            Outcome::Down(want.to_string())
        );
        server.join().expect("server");
    }
}

#[test]
fn udp_probe_down_on_a_closed_port() {
    let outcome = probe(&udp_spec(closed_udp_port(), b"PING", b"PONG"));
    let Outcome::Down(why) = outcome else {
        panic!("up against a closed port");
    };
    assert!(why.contains("unreachable"), "{why}");
    assert_eq!(why, "port unreachable");
}

#[test]
fn udp_probe_times_out_against_a_silent_socket() {
    // Bound, so no ICMP error comes back, and never read.
    let (_silent, addr) = bind_udp();
    let mut spec = udp_spec(addr, b"PING", b"PONG");
    spec.timeout = Duration::from_millis(300);
    let start = Instant::now();
    let outcome = probe(&spec);
    let took = start.elapsed();
    assert_eq!(outcome, Outcome::Down("no reply within 300ms".to_string()));
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[test]
fn udp_probe_without_send_or_expect_is_down_at_once() {
    let (_silent, addr) = bind_udp();
    let mut spec = udp_spec(addr, b"PING", b"PONG");
    spec.send = None;
    let start = Instant::now();
    assert_eq!(
        probe(&spec),
        Outcome::Down("a udp probe needs send and expect".to_string())
    );
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// Answers every datagram with `reply` until `stop`; returns how many it answered.
fn answer_all(socket: UdpSocket, reply: &'static [u8], stop: Arc<AtomicBool>) -> JoinHandle<usize> {
    socket
        .set_read_timeout(Some(Duration::from_millis(5)))
        .expect("timeout");
    thread::spawn(move || {
        let mut answered = 0;
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, from)) = socket.recv_from(&mut buf) {
                socket.send_to(reply, from).expect("reply");
                answered += 1;
            }
        }
        answered
    })
}

#[test]
fn two_hundred_udp_probes_leave_no_fd_behind() {
    let _serial = serial();
    let (socket, up) = bind_udp();
    let closed = closed_udp_port();
    let stop = Arc::new(AtomicBool::new(false));
    let responder = answer_all(socket, b"PONG", stop.clone());
    let before = open_fds();
    let mut prober = Prober::new();
    let mut out = Vec::new();
    let start = Instant::now();
    for id in 0..200u64 {
        let addr = if id % 4 == 3 { closed } else { up };
        prober.start(id, &udp_spec(addr, b"PING", b"PONG"), Instant::now());
        if id % 50 == 49 {
            while prober.in_flight() > 0 {
                assert!(start.elapsed() < PATIENCE);
                prober.advance(Instant::now(), Duration::from_millis(50), &mut out);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let answered = responder.join().expect("responder");
    assert_eq!(out.len(), 200);
    assert_eq!(answered, 150);
    for (id, outcome) in &out {
        let want = if id % 4 == 3 {
            Outcome::Down("port unreachable".to_string())
        } else {
            Outcome::Up
        };
        assert_eq!(outcome, &want, "probe {id}");
    }
    assert_no_fd_growth(before, 200);
}

#[test]
fn tcp_and_udp_probes_run_side_by_side() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let tcp = listener.local_addr().expect("addr");
    let (udp, server) = answer_once(b"PING", b"PONG");
    let mut prober = Prober::new();
    let now = Instant::now();
    let tcp_spec = ProbeSpec {
        addr: tcp,
        timeout: Duration::from_secs(2),
        send: None,
        expect: None,
        udp: false,
        http: None,
    };
    prober.start(1, &tcp_spec, now);
    prober.start(2, &udp_spec(udp, b"PING", b"PONG"), now);
    // The same port number over the other transport is a different target: nothing there.
    prober.start(3, &udp_spec(tcp, b"PING", b"PONG"), now);
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < 3 {
        assert!(start.elapsed() < PATIENCE);
        prober.advance(Instant::now(), Duration::from_millis(50), &mut out);
    }
    out.sort_by_key(|(id, _)| *id);
    assert_eq!(
        out,
        [
            (1, Outcome::Up),
            (2, Outcome::Up),
            (3, Outcome::Down("port unreachable".to_string()))
        ]
    );
    server.join().expect("server");
}

#[test]
fn targets_of_a_udp_listener_probe_over_udp() {
    let config = crate::config::Config::parse(
        r#"
        [[listeners]]
        name = "web"
        bind = "127.0.0.1:0"
        backends = [ { address = "127.0.0.1:9001" } ]
        [listeners.health]
        [[listeners]]
        name = "dns"
        bind = "127.0.0.1:0"
        protocol = "udp"
        backends = [ { address = "127.0.0.1:5301" } ]
        [listeners.health]
        send = 'ping'
        expect = 'pong'
        "#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let t = targets(&config.listeners);
    let udp: Vec<(&str, bool)> = t.iter().map(|t| (t.listener.as_str(), t.udp)).collect();
    assert_eq!(udp, [("web", false), ("dns", true)]);
    // The scheduler hands the flag on to the prober.
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    s.set_targets(t, t0);
    let mut due = Vec::new();
    s.due(t0 + Duration::from_secs(2), &mut due);
    let specs: Vec<(SocketAddr, bool)> = due.iter().map(|(_, p)| (p.addr, p.udp)).collect();
    assert_eq!(
        specs,
        [
            (SocketAddr::from(([127, 0, 0, 1], 9001)), false),
            (SocketAddr::from(([127, 0, 0, 1], 5301)), true)
        ]
    );
    let udp_spec = &due[1].1;
    assert_eq!(udp_spec.send.as_deref(), Some(&b"ping"[..]));
    assert_eq!(udp_spec.expect.as_deref(), Some(&b"pong"[..]));
}
