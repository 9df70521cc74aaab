//! A small HTTP/1.1 responder for health-check tests (std::net, a thread per connection): each
//! path answers with a status the test sets and flips at will (`/ready`, Patroni's `/primary`),
//! every other path answers 200 with the server's name (what a proxied client sees). Keep-alive
//! unless the request says `Connection: close` (ringlb's probes do), so a test can hold a
//! proxied connection open across a flip and use it again.
//!
//! Binds any loopback address (`127.0.0.2:0`, or a given port for a Patroni-like pair sharing
//! one API port over two addresses). Every socket has timeouts; dropping the server stops it,
//! shuts its connections down, joins every thread and propagates their panics.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// path → status.
    statuses: Mutex<HashMap<String, u16>>,
    /// Requests per path.
    hits: Mutex<HashMap<String, usize>>,
    /// Connections open now that carried a request for a path without a set status (proxied
    /// client connections, not probes).
    open_clients: AtomicUsize,
    open: Mutex<HashMap<usize, TcpStream>>,
    next_id: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

pub struct HttpServer {
    addr: SocketAddr,
    name: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serves on `127.0.0.1:0`.
    pub fn start(name: &str) -> HttpServer {
        HttpServer::bind(name, SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind 127.0.0.1:0")
    }

    /// Serves on `addr` (port 0: any free port); the bind error if it is taken.
    pub fn bind(name: &str, addr: SocketAddr) -> io::Result<HttpServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let n = name.to_string();
        let accept = std::thread::Builder::new()
            .name(format!("http-{name}"))
            .spawn(move || {
                for conn in listener.incoming() {
                    if sh.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let id = sh.next_id.fetch_add(1, Ordering::SeqCst);
                    if let Ok(c) = conn.try_clone() {
                        sh.open.lock().unwrap().insert(id, c);
                    }
                    let sh2 = sh.clone();
                    let n2 = n.clone();
                    let t = std::thread::spawn(move || {
                        serve(conn, &sh2, &n2);
                        sh2.open.lock().unwrap().remove(&id);
                    });
                    sh.threads.lock().unwrap().push(t);
                }
            })?;
        Ok(HttpServer {
            addr,
            name: name.to_string(),
            shared,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// From now on `path` answers `status`.
    pub fn set(&self, path: &str, status: u16) {
        self.shared
            .statuses
            .lock()
            .unwrap()
            .insert(path.to_string(), status);
    }

    /// Requests for `path` so far.
    pub fn hits(&self, path: &str) -> usize {
        *self.shared.hits.lock().unwrap().get(path).unwrap_or(&0)
    }

    /// Proxied client connections open now.
    pub fn open_clients(&self) -> usize {
        self.shared.open_clients.load(Ordering::SeqCst)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        let mut panics = Vec::new();
        if let Err(p) = accept.join() {
            panics.push(p);
        }
        for s in self.shared.open.lock().unwrap().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in std::mem::take(&mut *self.shared.threads.lock().unwrap()) {
            if let Err(p) = t.join() {
                panics.push(p);
            }
        }
        if let Some(p) = panics.pop() {
            if !std::thread::panicking() {
                std::panic::resume_unwind(p);
            }
        }
    }
}

/// Serves requests on one connection until the peer closes, asks to close, or 10 s of silence.
fn serve(mut s: TcpStream, shared: &Shared, name: &str) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let mut client = false;
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > 16 * 1024 {
                break;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end + 4);
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let close = head.to_ascii_lowercase().contains("\r\nconnection: close");
        *shared.hits.lock().unwrap().entry(path.clone()).or_default() += 1;
        let status = shared.statuses.lock().unwrap().get(&path).copied();
        if status.is_none() && !client {
            client = true;
            shared.open_clients.fetch_add(1, Ordering::SeqCst);
        }
        let code = status.unwrap_or(200);
        let body = match code {
            200 => name.to_string(),
            _ => format!("{name}: not now"),
        };
        let reply =
            format!(
            "HTTP/1.1 {code} {}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
            if code == 200 { "OK" } else { "Service Unavailable" },
            body.len()
        );
        if s.write_all(reply.as_bytes()).is_err() || close {
            break;
        }
    }
    if client {
        shared.open_clients.fetch_sub(1, Ordering::SeqCst);
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// A client connection that sends `GET path` requests over one keep-alive connection.
pub struct HttpClient {
    s: TcpStream,
}

impl HttpClient {
    pub fn connect(addr: SocketAddr) -> io::Result<HttpClient> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(HttpClient { s })
    }

    /// Over a connection the test made itself (its own source address, say).
    pub fn from_stream(s: TcpStream) -> HttpClient {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
        HttpClient { s }
    }

    /// One request; the reply's status and body. An error when the connection was closed.
    pub fn get(&mut self, path: &str) -> io::Result<(u16, String)> {
        write!(self.s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let code = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                    return Ok((code, body));
                }
            }
            match self.s.read(&mut chunk)? {
                0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

impl HttpClient {
    /// Half-closes and waits for the peer's EOF (the whole connection is then over on both
    /// legs of a proxy in between).
    pub fn finish(mut self) -> io::Result<()> {
        self.s.shutdown(Shutdown::Write)?;
        let mut sink = [0u8; 1024];
        while self.s.read(&mut sink)? > 0 {}
        Ok(())
    }
}

/// Like [`who`], and waits for the connection to end on both sides before returning, so the
/// proxy's count of active connections is back down (a load-aware pick next sees no leftover).
pub fn who_closed(lb: SocketAddr) -> String {
    let mut c = HttpClient::connect(lb).unwrap_or_else(|e| panic!("connect {lb}: {e}"));
    let (code, body) = c
        .get("/who")
        .unwrap_or_else(|e| panic!("GET /who via {lb}: {e}"));
    assert_eq!(code, 200, "{body}");
    c.finish()
        .unwrap_or_else(|e| panic!("closing a connection via {lb}: {e}"));
    body
}

/// Which backend a fresh connection through `lb` reaches: the body of `GET /who`.
pub fn who(lb: SocketAddr) -> String {
    let mut c = HttpClient::connect(lb).unwrap_or_else(|e| panic!("connect {lb}: {e}"));
    let (code, body) = c
        .get("/who")
        .unwrap_or_else(|e| panic!("GET /who via {lb}: {e}"));
    assert_eq!(code, 200, "{body}");
    body
}
