//! Reload leaves no stale state (issue 11, item 7), through the real binary (2 workers) on
//! loopback: a listener re-created under the same name starts from the new config and health
//! (a backend it lists again is not drained, a backend up again is not treated as down), and a
//! UDP listener removed while datagrams arrive leaves no flow behind.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ops::{listening_addr_since, read_name_line, reload_ok, NamedEcho};
use common::udp::{udp_listener, UdpClient, UdpEcho};
use common::*;

/// Opens connections through `lb` until one reaches the backend named `want`; returns it with
/// its `NAME` line consumed (the connection echoes from then on).
fn connect_to(lb: SocketAddr, want: &str) -> std::net::TcpStream {
    for _ in 0..200 {
        let mut s = connect(lb);
        let name = read_name_line(&mut s).unwrap_or_else(|e| panic!("name via {lb}: {e}"));
        if name == want {
            return s;
        }
    }
    panic!("200 connections through {lb}, none reached {want}");
}

#[test]
fn backend_listed_again_by_a_recreated_listener_is_not_drained() {
    let (b1, b2) = (NamedEcho::start("b1"), NamedEcho::start("b2"));
    let web = |bind: &str, backends: &[&NamedEcho]| {
        let l = listener("web").set("drain_timeout", "\"1s\"").bind(bind);
        backends.iter().fold(l, |l, b| l.backend(b.addr()))
    };
    let cfg = |l: Listener| ringlb_config([l]);
    let lb = Lb::start(&cfg(web("127.0.0.1:0", &[&b1, &b2])));
    // b2 leaves the listener (its connections would drain after 1 s) ...
    reload_ok(&lb, &cfg(web("127.0.0.1:0", &[&b1])));
    // ... and comes back in a listener of the same name on another address (re-created).
    let (mark, _) = reload_ok(&lb, &cfg(web("127.0.0.2:0", &[&b1, &b2])));
    let addr = listening_addr_since(&lb, mark, "web");
    let mut s = connect_to(addr, "b2");
    ping(&mut s, 100, 1);
    // Past the drain timeout and two timeout scans: a stale "removed" mark would have closed it.
    std::thread::sleep(Duration::from_millis(2500));
    try_ping(&mut s, 100, 2).unwrap_or_else(|e| {
        panic!(
            "connection to b2 through the re-created listener was cut: {e}; stderr:\n{}",
            lb.stderr_tail(20)
        )
    });
}

#[test]
fn udp_backend_up_again_in_a_recreated_listener_keeps_its_flow() {
    let backend = UdpEcho::start("u1");
    let dns = |bind: &str, health: bool| {
        let mut l = udp_listener("dns").bind(bind).backend(backend.addr());
        if health {
            // The echo answers "u1 PING": this expectation fails, the backend is marked down.
            l = l.set(
                "health",
                "{ interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1, send = \"PING\", expect = \"never\" }",
            );
        }
        l
    };
    let lb = Lb::start(&ringlb_config([dns("127.0.0.1:0", true)]));
    assert!(
        lb.wait_for_log("0/1 backends up", Duration::from_secs(10)),
        "backend never marked down; stderr:\n{}",
        lb.stderr_tail(20)
    );
    let (mark, _) = reload_ok(&lb, &ringlb_config([dns("127.0.0.2:0", false)]));
    let addr = listening_addr_since(&lb, mark, "dns");
    let client = UdpClient::bind(std::net::Ipv4Addr::new(127, 0, 0, 1));
    for i in 0..5 {
        let payload = format!("q{i}");
        client.exchange(addr, payload.as_bytes(), Duration::from_secs(2));
    }
    // One flow: every datagram reached the backend from the same upstream socket.
    let senders: Vec<SocketAddr> = (0..5)
        .flat_map(|i| backend.senders_of(format!("q{i}").as_bytes()))
        .collect();
    assert_eq!(senders.len(), 5, "{senders:?}");
    assert!(
        senders.iter().all(|s| *s == senders[0]),
        "the flow was reopened per datagram (a stale down mark): upstream sources {senders:?}"
    );
}

#[test]
fn udp_listener_removed_under_a_flood_leaves_no_flow() {
    let backend = UdpEcho::start("u1");
    let keep = udp_listener("keep").backend(backend.addr());
    let gone = udp_listener("gone").backend(backend.addr());
    let lb = Lb::start(&ringlb_config([keep.clone(), gone]));
    let target = lb.addr("gone");
    let (baseline, _) = lb.fd_counts();
    for round in 0..3 {
        // New sources as fast as one thread can make them, each one datagram (one new flow).
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let flood = std::thread::spawn(move || {
            let mut sent = 0u64;
            while !st.load(Ordering::Relaxed) && sent < 2_000_000 {
                if let Ok(s) = UdpSocket::bind("127.0.0.1:0") {
                    let _ = s.send_to(b"x", target);
                    sent += 1;
                }
            }
            sent
        });
        std::thread::sleep(Duration::from_millis(300));
        reload_ok(&lb, &ringlb_config([keep.clone()]));
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let sent = flood.join().expect("flood thread");
        // Every flow of the removed listener is gone at once (their idle timeout is 30 s): only
        // the remaining listener's and the admin endpoint's sockets stay. The removed listener
        // takes its 2 listening sockets (one per worker) and the 2 duplicates kept for a binary
        // upgrade's handover with it.
        let gone = 4;
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut now = lb.fd_counts().0;
        while now > baseline - gone && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = lb.fd_counts().0;
        }
        assert_eq!(
            now,
            baseline - gone,
            "round {round}: {sent} datagrams flooded the removed listener; sockets now {now}, \
             baseline {baseline} minus its 2 listening sockets and their 2 handover duplicates; \
             stderr:\n{}",
            lb.stderr_tail(20)
        );
        if round < 2 {
            // Add it back (it may take the removed one's slot) for the next round.
            let gone = udp_listener("gone")
                .bind(&target.to_string())
                .backend(backend.addr());
            reload_ok(&lb, &ringlb_config([keep.clone(), gone]));
        }
    }
}
