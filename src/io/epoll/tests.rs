//! The epoll driver on real sockets and pipes (no ring): each operation completes as io_uring's
//! would, with the same tokens and results.

use super::*;
use crate::io::Op;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

fn wait_all(ep: &mut Epoll, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < n && Instant::now() < deadline {
        ep.submit_and_wait(1)
            .expect("wait")
            .map_or(Ok(()), Err)
            .expect("no error");
        ep.reap(&mut out);
    }
    out
}

fn tok(op: Op, i: u32) -> Token {
    Token::new(op, i, 0)
}

#[test]
fn accept_connect_poll_and_cancel_complete_like_the_ring() {
    let mut ep = Epoll::new().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    ep.accept_multi(l.as_raw_fd(), tok(Op::Accept, 0));
    let mut c1 = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let got = wait_all(&mut ep, 1);
    assert_eq!(got[0].token, tok(Op::Accept, 0));
    assert!(got[0].more() && got[0].result >= 0);
    let accepted = got[0].accepted_fd().expect("fd");
    // A poll for readable completes once bytes arrive, with the ready mask.
    ep.poll(
        accepted.as_raw_fd(),
        libc::POLLIN as u32,
        tok(Op::PollIn0, 1),
    );
    c1.write_all(b"x").unwrap();
    let got = wait_all(&mut ep, 1);
    assert_eq!(
        (got[0].token, got[0].result & libc::POLLIN as i32 != 0),
        (tok(Op::PollIn0, 1), true)
    );
    // Re-arming the same poll costs no epoll_ctl: the interest is still registered.
    ep.poll(
        accepted.as_raw_fd(),
        libc::POLLIN as u32,
        tok(Op::PollIn0, 1),
    );
    let mut b = [0u8; 1];
    let mut s = TcpStream::from(accepted.try_clone().unwrap());
    s.read_exact(&mut b).unwrap();
    // Cancel by fd: the waiting poll ends with -ECANCELED, the cancel reports one.
    ep.cancel_fd(accepted.as_raw_fd(), tok(Op::Cancel, 1));
    let got = wait_all(&mut ep, 2);
    assert_eq!(got[0].token, tok(Op::PollIn0, 1));
    assert_eq!(got[0].result, -libc::ECANCELED);
    assert_eq!((got[1].token, got[1].result), (tok(Op::Cancel, 1), 1));
    // Cancelling the accept ends it without `more()`.
    ep.cancel_fd(l.as_raw_fd(), tok(Op::AcceptCancel, 0));
    let got = wait_all(&mut ep, 2);
    assert_eq!(got[0].result, -libc::ECANCELED);
    assert!(!got[0].more());
}

#[test]
fn connect_results_and_timeouts() {
    let mut ep = Epoll::new().unwrap();
    let ts = ep.timespec(Duration::from_millis(200));
    // Refused: -ECONNREFUSED, then the timeout's -ECANCELED.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM.nonblocking(),
        None,
    )
    .unwrap();
    ep.connect(
        s.as_raw_fd(),
        0,
        &dead,
        ts,
        tok(Op::Connect, 0),
        tok(Op::ConnectTimeout, 0),
    );
    let got = wait_all(&mut ep, 2);
    assert_eq!(
        (got[0].token, got[0].result),
        (tok(Op::Connect, 0), -libc::ECONNREFUSED)
    );
    assert_eq!(got[1].token, tok(Op::ConnectTimeout, 0));
    ep.release_fd(s.as_raw_fd());
    drop(s);
    // Established: 0.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM.nonblocking(),
        None,
    )
    .unwrap();
    ep.connect(
        s.as_raw_fd(),
        1,
        &l.local_addr().unwrap(),
        ts,
        tok(Op::Connect, 1),
        tok(Op::ConnectTimeout, 1),
    );
    let got = wait_all(&mut ep, 2);
    assert_eq!((got[0].token, got[0].result), (tok(Op::Connect, 1), 0));
    // A black hole (accept queue full): the timeout fires, the connect ends -ECANCELED.
    let hole = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    hole.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    hole.listen(0).unwrap();
    let hole_addr = hole.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    for _ in 0..8 {
        if let Ok(c) = TcpStream::connect_timeout(&hole_addr, Duration::from_millis(100)) {
            fill.push(c);
        }
    }
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM.nonblocking(),
        None,
    )
    .unwrap();
    let t0 = Instant::now();
    ep.connect(
        s.as_raw_fd(),
        2,
        &hole_addr,
        ts,
        tok(Op::Connect, 2),
        tok(Op::ConnectTimeout, 2),
    );
    let got = wait_all(&mut ep, 2);
    assert_eq!(
        (got[0].token, got[0].result),
        (tok(Op::Connect, 2), -libc::ECANCELED)
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(190),
        "{:?}",
        t0.elapsed()
    );
}

#[test]
fn timer_repeats_and_udp_receives_into_slots() {
    let mut ep = Epoll::new().unwrap();
    let p = ep.timespec(Duration::from_millis(20));
    ep.timer(p, tok(Op::Tick, 0));
    let t0 = Instant::now();
    let got = wait_all(&mut ep, 3);
    assert!(got.iter().all(|c| c.token == tok(Op::Tick, 0) && c.more()));
    assert!(t0.elapsed() >= Duration::from_millis(55));
    // UDP: a datagram lands in its slot, with its sender.
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_nonblocking(true).unwrap();
    let set = ep.recv_slots(2, 2048);
    ep.recvmsg(u.as_raw_fd(), set, 0, crate::io::recv_token(set, 0));
    let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    c.send_to(b"hello", u.local_addr().unwrap()).unwrap();
    let got: Vec<Completion> = wait_all(&mut ep, 1)
        .into_iter()
        .filter(|c| c.token.op() == Some(Op::UdpRecv))
        .collect();
    assert_eq!(got[0].result, 5);
    let (from, _) = ep.recv_done(set, 0);
    assert_eq!(from, Some(c.local_addr().unwrap()));
    assert_eq!(ep.recv_data(set, 0, 5), b"hello");
}
