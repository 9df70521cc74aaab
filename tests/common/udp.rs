//! UDP helpers for the tests: a named echo backend on `127.0.0.1:0` that prefixes every reply
//! with its name and records what it received and from which address (the LB's upstream socket,
//! one per flow), a client bound to a chosen loopback address, and a udp listener for the config
//! builder.
//!
//! Every receive has a timeout; the backend's thread is joined on stop or drop and its panic
//! propagates.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::config::{listener, Listener};

/// How long the backend's thread blocks in one `recv_from` before it looks at its stop flag.
const POLL: Duration = Duration::from_millis(20);

/// A udp listener named `name` on `127.0.0.1:0`, round robin, no backends yet.
pub fn udp_listener(name: &str) -> Listener {
    listener(name).set("protocol", "\"udp\"")
}

/// The loopback address of client `i` in a test's own range: `127.<base + i/250>.<i%250 + 1>`.
pub fn client_ip(base: u8, i: usize) -> Ipv4Addr {
    let third = u8::try_from(usize::from(base) + i / 250).expect("client index in range");
    Ipv4Addr::new(127, 0, third, (i % 250 + 1) as u8)
}

#[derive(Default)]
struct EchoShared {
    stop: AtomicBool,
    /// Every datagram received: sender (the LB's upstream socket) and payload.
    received: Mutex<Vec<(SocketAddr, Vec<u8>)>>,
}

/// A UDP echo server that answers each datagram with `NAME ` followed by the datagram.
pub struct UdpEcho {
    name: String,
    addr: SocketAddr,
    shared: Arc<EchoShared>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(name: &str) -> UdpEcho {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind udp 127.0.0.1:0");
        sock.set_read_timeout(Some(POLL)).expect("set_read_timeout");
        let addr = sock.local_addr().expect("local_addr");
        let shared = Arc::new(EchoShared::default());
        let sh = shared.clone();
        let prefix = format!("{name} ").into_bytes();
        let thread = std::thread::Builder::new()
            .name(format!("udp-echo-{name}-{}", addr.port()))
            .spawn(move || echo_loop(sock, &sh, &prefix))
            .expect("spawn udp echo");
        UdpEcho {
            name: name.to_string(),
            addr,
            shared,
            thread: Some(thread),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far.
    pub fn count(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }

    /// The senders of every received datagram equal to `payload`.
    pub fn senders_of(&self, payload: &[u8]) -> Vec<SocketAddr> {
        let rec = self.shared.received.lock().unwrap();
        rec.iter()
            .filter(|(_, p)| p == payload)
            .map(|(a, _)| *a)
            .collect()
    }

    /// Closes the socket (datagrams to the port then draw ICMP port unreachable) and joins the
    /// thread, propagating its panic unless this thread is already panicking.
    pub fn stop(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Err(p) = t.join() {
            if !std::thread::panicking() {
                std::panic::resume_unwind(p);
            }
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop();
    }
}

fn echo_loop(sock: UdpSocket, shared: &EchoShared, prefix: &[u8]) {
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(65536 + prefix.len());
    while !shared.stop.load(Ordering::SeqCst) {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            // An ICMP error from a client that went away: not this server's problem.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => panic!("udp echo {:?}: recv_from: {e}", sock.local_addr()),
        };
        shared
            .received
            .lock()
            .unwrap()
            .push((peer, buf[..n].to_vec()));
        reply.clear();
        reply.extend_from_slice(prefix);
        reply.extend_from_slice(&buf[..n]);
        // A send error (e.g. the LB's flow socket already closed) only loses this reply.
        let _ = sock.send_to(&reply, peer);
    }
}

/// A client socket bound to `ip:0`.
pub struct UdpClient {
    sock: UdpSocket,
}

impl UdpClient {
    pub fn bind(ip: Ipv4Addr) -> UdpClient {
        let sock = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind udp {ip}:0: {e}"));
        UdpClient { sock }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.sock.local_addr().expect("local_addr")
    }

    /// Sends `payload` to `to` and waits up to `timeout` for one datagram: its sender and bytes.
    pub fn request(
        &self,
        to: SocketAddr,
        payload: &[u8],
        timeout: Duration,
    ) -> io::Result<(SocketAddr, Vec<u8>)> {
        self.sock.send_to(payload, to)?;
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no reply within {timeout:?}"),
                ));
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => return Ok((from, buf[..n].to_vec())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no reply within {timeout:?}"),
                    ))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`UdpClient::request`] through the LB at `lb`: the reply must come from `lb` and be some
    /// backend's name, a space, and `payload`. Returns the backend's name; panics otherwise.
    pub fn exchange(&self, lb: SocketAddr, payload: &[u8], timeout: Duration) -> String {
        let me = self.local_addr();
        let (from, reply) = self
            .request(lb, payload, timeout)
            .unwrap_or_else(|e| panic!("client {me} -> {lb}: {e}"));
        check_reply(me, lb, from, &reply, payload)
    }
}

/// Checks a reply (from `lb`, `NAME payload`) and returns NAME; panics with details otherwise.
pub fn check_reply(
    me: SocketAddr,
    lb: SocketAddr,
    from: SocketAddr,
    reply: &[u8],
    payload: &[u8],
) -> String {
    assert_eq!(
        from, lb,
        "client {me}: reply from {from}, not from the listener's address {lb}"
    );
    let sp = reply.iter().position(|&b| b == b' ');
    let ok = sp.is_some_and(|i| &reply[i + 1..] == payload);
    assert!(
        ok,
        "client {me}: reply {:?} is not `NAME ` + {:?}",
        String::from_utf8_lossy(&reply[..reply.len().min(200)]),
        String::from_utf8_lossy(&payload[..payload.len().min(200)])
    );
    String::from_utf8_lossy(&reply[..sp.expect("checked")]).into_owned()
}
