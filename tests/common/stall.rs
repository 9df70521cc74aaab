//! Backends that misbehave on command, for the failure tests: one that completes handshakes but
//! never accepts (a sink: bytes pile up in the kernel), one that accepts and holds connections
//! without reading until told to reset them, and one that streams to every connection without
//! end until told to reset some. Nothing here reads or writes past what a test bounds: writers
//! stop on reset, on error, or when the backend is dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::SockRef;

use super::servers::loopback_listener;

/// Completes TCP handshakes (the kernel does) and never accepts: whatever is sent to it waits
/// in its receive buffers, unread, until the sender gives up.
pub struct Sink {
    listener: TcpListener,
}

impl Sink {
    pub fn start() -> Sink {
        Sink {
            listener: loopback_listener(4096),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("local_addr")
    }
}

/// Resets `s` (SO_LINGER 0, then the close that drops it sends an RST).
pub fn reset(s: TcpStream) {
    let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Close the listening socket (new connects are refused); accepted ones stay.
    unlisten: AtomicBool,
    /// Holding: the accepted sockets.
    held: Mutex<Vec<TcpStream>>,
    /// Streaming: each connection's reset flag (its writer owns the socket).
    flags: Mutex<Vec<Arc<AtomicBool>>>,
    writers: Mutex<Vec<JoinHandle<()>>>,
    accepted: AtomicUsize,
}

/// Accepts every connection. Holding: keeps each socket, never reads or writes. Streaming:
/// writes bytes to each without end (non-blocking, pausing while its send buffer is full)
/// until the connection is reset by [`Stall::reset`] or fails.
pub struct Stall {
    addr: SocketAddr,
    shared: Arc<Shared>,
    streaming: bool,
    accept: Option<JoinHandle<()>>,
}

impl Stall {
    /// Accepts and holds.
    pub fn holding() -> Stall {
        Stall::start(false)
    }

    /// Accepts and streams to every connection.
    pub fn streaming() -> Stall {
        Stall::start(true)
    }

    fn start(streaming: bool) -> Stall {
        let listener = loopback_listener(4096);
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name(format!("stall-{}", addr.port()))
            .spawn(move || {
                while !sh.stop.load(Ordering::SeqCst) && !sh.unlisten.load(Ordering::SeqCst) {
                    let Ok((s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    let _ = s.set_nonblocking(false);
                    sh.accepted.fetch_add(1, Ordering::SeqCst);
                    if !streaming {
                        sh.held.lock().unwrap().push(s);
                        continue;
                    }
                    let flag = Arc::new(AtomicBool::new(false));
                    sh.flags.lock().unwrap().push(flag.clone());
                    let st = sh.clone();
                    let t = std::thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn(move || write_until_reset(s, &flag, &st))
                        .expect("spawn stall writer");
                    sh.writers.lock().unwrap().push(t);
                }
            })
            .expect("spawn stall accept");
        Stall {
            addr,
            shared,
            streaming,
            accept: Some(accept),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listening socket (connects, health probes included, are refused from then
    /// on); the connections it accepted stay as they are. Returns once the port refuses.
    pub fn stop_listening(&mut self) {
        self.shared.unlisten.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
        }
    }

    /// Resets `n` of the connections not reset yet (oldest first); returns how many it reset.
    pub fn reset(&self, n: usize) -> usize {
        if !self.streaming {
            let mut held = self.shared.held.lock().unwrap();
            let k = n.min(held.len());
            held.drain(..k).for_each(reset);
            return k;
        }
        let flags = self.shared.flags.lock().unwrap();
        let mut done = 0;
        for f in flags.iter() {
            if done == n {
                break;
            }
            if !f.swap(true, Ordering::SeqCst) {
                done += 1;
            }
        }
        done
    }
}

fn write_until_reset(s: TcpStream, flag: &AtomicBool, shared: &Shared) {
    use std::io::Write;
    let _ = s.set_nonblocking(true);
    let chunk = vec![0x5au8; 64 * 1024];
    let mut s = s;
    loop {
        if flag.load(Ordering::SeqCst) {
            reset(s);
            return;
        }
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        match s.write(&chunk) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let mut panics = Vec::new();
        if let Some(t) = self.accept.take() {
            if let Err(p) = t.join() {
                panics.push(p);
            }
        }
        for t in std::mem::take(&mut *self.shared.writers.lock().unwrap()) {
            if let Err(p) = t.join() {
                panics.push(p);
            }
        }
        if let Some(p) = panics.into_iter().next() {
            if !std::thread::panicking() {
                std::panic::resume_unwind(p);
            }
        }
    }
}
