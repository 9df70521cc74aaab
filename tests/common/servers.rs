//! Backends for the tests: small blocking TCP servers on `127.0.0.1:0`, one thread per
//! connection, with counters the tests assert on. Also a black hole (SYNs dropped) and a dead
//! (refusing) address.
//!
//! Handlers never panic on I/O errors (a reset is often the point of a test); they return them,
//! and the server records them. Connection threads are joined when the server is dropped, after
//! their sockets are shut down, and a handler's panic propagates to the test.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use super::payload::{recv_to_eof, send_pattern, set_timeouts, Digest};

type Handler = dyn Fn(&mut TcpStream) -> io::Result<()> + Send + Sync;

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    live: AtomicUsize,
    next_id: AtomicU64,
    /// A clone of every live connection, so drop can shut them down and unblock their threads.
    /// Removed before the connection's last fd closes, so close semantics (FIN, RST) are intact.
    open: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    errors: Mutex<Vec<String>>,
}

/// A listener with an accept thread that runs `handler` on a thread per connection.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

/// A listener bound to `127.0.0.1:0` with a large backlog (std's 128 overflows when the LB opens
/// a thousand backend connections at once).
pub fn loopback_listener(backlog: i32) -> TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind 127.0.0.1:0");
    s.listen(backlog).expect("listen");
    s.into()
}

impl Server {
    pub fn start(
        name: &str,
        handler: impl Fn(&mut TcpStream) -> io::Result<()> + Send + Sync + 'static,
    ) -> Server {
        let listener = loopback_listener(4096);
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared::default());
        let handler: Arc<Handler> = Arc::new(handler);
        let sh = shared.clone();
        let thread_name = format!("{name}-{}", addr.port());
        let accept_thread = std::thread::Builder::new()
            .name(format!("{thread_name}-accept"))
            .spawn(move || accept_loop(listener, sh, handler, thread_name))
            .expect("spawn accept thread");
        Server {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections whose handler has not finished yet.
    pub fn live(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Waits until `live() == n`; false on timeout.
    pub fn wait_live(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.live() == n)
    }

    /// Waits until `accepted() >= n`; false on timeout.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.accepted() >= n)
    }

    /// The I/O errors handlers returned, one line each (peer, error).
    pub fn errors(&self) -> Vec<String> {
        self.shared.errors.lock().unwrap().clone()
    }

    /// Stops accepting, shuts every open connection down, joins all threads and propagates a
    /// handler's panic (unless this thread is already panicking).
    fn shutdown(&mut self) {
        let Some(accept) = self.accept_thread.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept(); the loop sees `stop` and drops the connection.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let mut panics = Vec::new();
        if let Err(p) = accept.join() {
            panics.push(p);
        }
        for s in self.shared.open.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock().unwrap());
        for t in threads {
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

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    handler: Arc<Handler>,
    thread_name: String,
) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                panic!("{thread_name}: accept: {e}");
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        set_timeouts(&stream);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let clone = stream.try_clone().expect("try_clone");
        shared.open.lock().unwrap().insert(id, clone);
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        shared.live.fetch_add(1, Ordering::SeqCst);
        let (sh, h) = (shared.clone(), handler.clone());
        let t = std::thread::Builder::new()
            .name(format!("{thread_name}-conn{id}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut stream = stream;
                let result = h(&mut stream);
                if let Err(e) = result {
                    sh.errors.lock().unwrap().push(format!("{peer}: {e}"));
                }
                // Drop the clone first: the stream's own drop is then the socket's real close.
                sh.open.lock().unwrap().remove(&id);
                drop(stream);
                sh.live.fetch_sub(1, Ordering::SeqCst);
            })
            .expect("spawn connection thread");
        shared.threads.lock().unwrap().push(t);
    }
}

/// Polls `cond` every 10 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Echoes every byte; on the client's EOF it finishes echoing and shuts down its write side.
pub struct EchoServer(Server);

impl EchoServer {
    pub fn start() -> EchoServer {
        EchoServer(Server::start("echo", echo_handler))
    }
}

fn echo_handler(s: &mut TcpStream) -> io::Result<()> {
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return s.shutdown(Shutdown::Write);
        }
        s.write_all(&buf[..n])?;
    }
}

impl std::ops::Deref for EchoServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

/// A backend that writes its one-byte tag as soon as it accepts, then echoes everything: a client
/// learns which backend it reached and the connection stays open for as long as it likes.
pub fn tagged_echo(tag: u8) -> Server {
    Server::start(&format!("tagged{tag}"), move |s| {
        s.write_all(&[tag])?;
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return s.shutdown(std::net::Shutdown::Write),
                Ok(n) => s.write_all(&buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    })
}

/// Writes its name, then closes: tells the test which backend a connection reached.
pub struct NamedServer {
    server: Server,
    name: String,
}

impl NamedServer {
    pub fn start(name: &str) -> NamedServer {
        let reply = name.as_bytes().to_vec();
        NamedServer {
            server: Server::start(&format!("named-{name}"), move |s| s.write_all(&reply)),
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::ops::Deref for NamedServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// Sends `len` pattern bytes and half-closes first, while draining (and recording) whatever the
/// client sends until the client's EOF. It shuts down rather than closes so that unread client
/// bytes cannot turn its FIN into a reset.
pub struct SenderThenClose {
    server: Server,
    received: Arc<Mutex<Vec<Digest>>>,
}

impl SenderThenClose {
    pub fn start(len: u64, seed: u64) -> SenderThenClose {
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = received.clone();
        let server = Server::start("sender", move |s| {
            let mut writer = s.try_clone()?;
            let (sent, got) = std::thread::scope(|sc| {
                let w = sc.spawn(move || -> io::Result<()> {
                    send_pattern(&mut writer, len, seed)?;
                    writer.shutdown(Shutdown::Write)
                });
                let got = recv_to_eof(s);
                (
                    w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                    got,
                )
            });
            if let Ok(d) = &got {
                rec.lock().unwrap().push(*d);
            }
            sent.and(got.map(drop))
        });
        SenderThenClose { server, received }
    }

    /// What each finished connection received from its client, up to the client's EOF.
    pub fn received(&self) -> Vec<Digest> {
        self.received.lock().unwrap().clone()
    }
}

impl std::ops::Deref for SenderThenClose {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// Reads until it has at least `after` bytes, then resets the connection (`SO_LINGER 0` and
/// close). Counts the resets it sent.
pub struct ResetAfter {
    server: Server,
    resets: Arc<AtomicUsize>,
}

impl ResetAfter {
    pub fn start(after: usize) -> ResetAfter {
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        let server = Server::start("reset", move |s| {
            let mut buf = vec![0; 64 * 1024];
            let mut got = 0;
            while got < after {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("EOF after {got} bytes, before the reset point"),
                    ));
                }
                got += n;
            }
            SockRef::from(&*s).set_linger(Some(Duration::ZERO))?;
            r.fetch_add(1, Ordering::SeqCst);
            Ok(()) // the close that follows sends the RST
        });
        ResetAfter { server, resets }
    }

    pub fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }
}

impl std::ops::Deref for ResetAfter {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// A listener whose accept queue is full and never drained, so further SYNs are dropped and
/// connects to it hang until their own timeout.
pub struct BlackHole {
    _listener: TcpListener,
    _queued: Vec<TcpStream>,
    addr: SocketAddr,
}

impl BlackHole {
    pub fn start() -> BlackHole {
        let listener = loopback_listener(0);
        let addr = listener.local_addr().expect("local_addr");
        // With backlog 0 the kernel still queues a connection or so; fill the queue until a
        // connect stops completing.
        let mut queued = Vec::new();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(s) => queued.push(s),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => break,
                Err(e) => panic!("filling black hole {addr}: {e}"),
            }
            assert!(
                queued.len() < 16,
                "black hole {addr}: accept queue never filled"
            );
        }
        let t0 = Instant::now();
        let r = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(
            r.is_err(),
            "black hole {addr}: a connect completed after {:?}",
            t0.elapsed()
        );
        BlackHole {
            _listener: listener,
            _queued: queued,
            addr,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// An address that refuses connections: a port that was bound on loopback and released.
pub fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}
