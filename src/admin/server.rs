//! The admin endpoint's HTTP/1.1 server: hyper on a tokio current-thread runtime on the
//! `ringlb-admin` thread, listening on TCP or a unix socket.
//!
//! Every connection is its own task, so a slow or hostile client never delays another. The
//! limits, each the answer to a way the endpoint was once knocked over:
//! - at most [`MAX_CONNECTIONS`] open connections; beyond that new ones are closed at once;
//! - a request head of at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] lines (431 beyond), read
//!   within [`HEAD_TIMEOUT`] of the connection opening or of the previous response (so this is
//!   also the idle keep-alive timeout);
//! - no endpoint takes a body: one declared over [`MAX_BODY`] gets 413 and the connection is
//!   closed without reading it; a smaller one is read (within [`HEAD_TIMEOUT`], else 408) and
//!   ignored, never buffered beyond [`MAX_BODY`];
//! - a response the client does not read for [`WRITE_STALL`] closes the connection (a client
//!   that pipelines and never reads holds one response, not an ever-growing queue);
//! - accept errors (out of descriptors, aborted handshakes) are retried with a backoff: the
//!   endpoint never stops by itself.
//!
//! Must not: block its thread (control requests are awaited, never waited for), or touch rings.

use super::auth::{self, Peer, PostRequest, Refusal};
use super::{route, AdminState, Answer};
use crate::config::AdminBind;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, info, warn};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most admin connections open at once.
pub const MAX_CONNECTIONS: u64 = 256;
/// Largest request head (request line and headers), bytes.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines in a request.
pub const MAX_HEADERS: usize = 100;
/// Time to send a whole request head, counted from the connection's start or the previous
/// response: also how long an idle keep-alive connection stays open.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body read (and ignored); a larger declared one gets 413.
pub const MAX_BODY: u64 = 64 * 1024;
/// A response write that makes no progress for this long closes the connection.
pub const WRITE_STALL: Duration = Duration::from_secs(10);
/// Most mutations waiting for the control thread at once; more get 503.
const MAX_PENDING_MUTATIONS: u64 = 16;

/// Counters of the server itself (`ringlb_admin_*` metrics).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections closed at once because [`MAX_CONNECTIONS`] were open.
    pub refused: AtomicU64,
    /// Mutations waiting for the control thread now.
    pending_mutations: AtomicU64,
}

/// The admin socket, bound (early, before any listener) but not yet served.
pub enum AdminListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, SocketFile),
}

/// A unix socket file this process created: removed when dropped (at exit), unless another
/// file has taken its place meanwhile.
pub struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Where the endpoint listens, for the start-up line.
pub enum Where {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl AdminListener {
    /// The listening socket (kept by the runtime for a binary upgrade).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            AdminListener::Tcp(l) => l.as_fd(),
            AdminListener::Unix(l, _) => l.as_fd(),
        }
    }

    pub fn local(&self) -> Where {
        match self {
            AdminListener::Tcp(l) => Where::Tcp(
                l.local_addr()
                    .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            ),
            AdminListener::Unix(_, f) => Where::Unix(f.path.clone()),
        }
    }
}

/// Binds the admin socket; `None` for `bind = "none"`.
pub fn bind(bind: &AdminBind) -> io::Result<Option<AdminListener>> {
    match bind {
        AdminBind::None => Ok(None),
        AdminBind::Tcp(addr) => {
            // std sets SO_REUSEADDR (a restart does not wait for TIME_WAIT) and never
            // SO_REUSEPORT, so a second process on the same address fails here.
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(Some(AdminListener::Tcp(l)))
        }
        AdminBind::Unix(path) => bind_unix(path).map(Some),
    }
}

/// Serves the admin socket a binary upgrade's previous process handed over, if it is what
/// `bind` asks for (same address, or the same unix path); `None` otherwise (the caller binds).
pub fn adopt(bind: &AdminBind, fd: std::os::fd::OwnedFd) -> Option<AdminListener> {
    match bind {
        AdminBind::None => None,
        AdminBind::Tcp(addr) => {
            let l = std::net::TcpListener::from(fd);
            let at = l.local_addr().ok()?;
            (at == *addr || (addr.port() == 0 && at.ip() == addr.ip()))
                .then_some(AdminListener::Tcp(l))
        }
        AdminBind::Unix(path) => {
            let l = std::os::unix::net::UnixListener::from(fd);
            let at = l.local_addr().ok()?;
            if at.as_pathname() != Some(path.as_path()) {
                return None;
            }
            let m = std::fs::symlink_metadata(path).ok()?;
            let file = SocketFile {
                path: path.to_path_buf(),
                id: (m.dev(), m.ino()),
            };
            Some(AdminListener::Unix(l, file))
        }
    }
}

/// Binds a unix socket with mode 0600. A socket file left by a dead process (nobody accepts on
/// it) is replaced; a live one, or any other kind of file, is an error.
fn bind_unix(path: &Path) -> io::Result<AdminListener> {
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = match bind_private(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let meta = std::fs::symlink_metadata(path)?;
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way (not removed)",
                ));
            }
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "a running process serves on this socket",
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    info!("admin: replacing the stale socket {}", path.display());
                    std::fs::remove_file(path)?;
                    bind_private(path)?
                }
                Err(e) => return Err(e),
            }
        }
        other => other?,
    };
    // The umask made it 0600 from the start; say so explicitly whatever the umask was.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let m = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        id: (m.dev(), m.ino()),
    };
    return Ok(AdminListener::Unix(listener, file));

    /// Binds with umask 077 so that no other user can connect even for an instant. The umask is
    /// process-wide: this runs at start, before any other thread of ringlb exists.
    fn bind_private(path: &Path) -> io::Result<UnixListener> {
        use nix::sys::stat::{umask, Mode};
        let old = umask(Mode::from_bits_truncate(0o177));
        let r = UnixListener::bind(path);
        umask(old);
        r
    }
}

/// The running endpoint. Dropping it (when `run` returns) removes the unix socket file; the
/// thread itself ends with the process.
pub struct AdminHandle {
    _file: Option<SocketFile>,
}

impl AdminHandle {
    /// Leaves the unix socket file in place at exit: a binary upgrade's new process serves it.
    pub fn keep_socket_file(&mut self) {
        std::mem::forget(self._file.take());
    }
}

/// Starts serving `listener` on the `ringlb-admin` thread.
pub fn serve(listener: AdminListener, state: Arc<AdminState>) -> io::Result<AdminHandle> {
    let (listener, file) = match listener {
        AdminListener::Unix(l, f) => (Listener::Unix(l), Some(f)),
        AdminListener::Tcp(l) => (Listener::Tcp(l), None),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("ringlb-admin".into())
        .spawn(move || {
            rt.block_on(async move {
                match listener {
                    Listener::Tcp(l) => match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            let l = &l;
                            accept_loop(
                                || async move {
                                    let (s, peer) = l.accept().await?;
                                    let local = s.local_addr()?;
                                    Ok((s, Peer::Tcp { peer, local }))
                                },
                                state,
                            )
                            .await
                        }
                        Err(e) => warn!("admin: cannot serve: {e}"),
                    },
                    Listener::Unix(l) => match tokio::net::UnixListener::from_std(l) {
                        Ok(l) => {
                            let l = &l;
                            accept_loop(
                                || async move { Ok((l.accept().await?.0, Peer::Unix)) },
                                state,
                            )
                            .await
                        }
                        Err(e) => warn!("admin: cannot serve: {e}"),
                    },
                }
            })
        })?;
    Ok(AdminHandle { _file: file })
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Accepts forever: errors are logged (at most once a second) and retried after a backoff that
/// grows while they last.
async fn accept_loop<S, F, Fut>(mut accept: F, state: Arc<AdminState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<(S, Peer)>>,
{
    let mut backoff = Duration::ZERO;
    let mut last_warning: Option<Instant> = None;
    loop {
        // A binary upgrade handed the socket to the new process: stop accepting (the socket
        // stays open there), let open requests finish (a few seconds at most), return.
        if state.upgrade.accepting_stopped() {
            let t0 = Instant::now();
            while state.server.open.load(Ordering::Relaxed) > 0
                && t0.elapsed() < Duration::from_secs(5)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            info!("admin: the new process serves the admin endpoint now");
            return;
        }
        // Accept is cancel-safe: a connection not taken stays queued for the next call.
        let Ok(accepted) = tokio::time::timeout(Duration::from_millis(100), accept()).await else {
            continue;
        };
        match accepted {
            Ok((stream, peer)) => {
                if !backoff.is_zero() {
                    info!("admin: accepting connections again");
                    backoff = Duration::ZERO;
                }
                let stats = &state.server;
                if stats.open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    debug!("admin: {MAX_CONNECTIONS} connections open; closing a new one");
                    continue;
                }
                stats.open.fetch_add(1, Ordering::Relaxed);
                let state = state.clone();
                tokio::spawn(async move {
                    serve_connection(stream, peer, &state).await;
                    state.server.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(e) => {
                // Out of descriptors or memory: wait for some to free up. Anything else (an
                // aborted handshake) concerns one connection: go on after a short pause, which
                // also keeps an unexpected persistent error from spinning.
                let scarce = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                backoff = if scarce {
                    (backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(1))
                } else {
                    Duration::from_millis(10)
                };
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    last_warning = Some(Instant::now());
                    warn!(
                        "admin: accept failed: {e}; retrying in {backoff:?} (the admin endpoint keeps running)"
                    );
                }
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

async fn serve_connection<S>(stream: S, peer: Peer, state: &Arc<AdminState>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(WriteStall::new(stream, WRITE_STALL));
    let service = hyper::service::service_fn(|req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(&state, peer, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_header_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .serve_connection(io, service);
    if let Err(e) = conn.await {
        debug!("admin: connection ended: {e}");
    }
}

type Resp = Response<Full<Bytes>>;

fn respond(status: u16, ctype: &'static str, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    r
}

/// An answer after which the connection is closed (the rest of the request is not read).
fn respond_and_close(status: u16, body: String) -> Resp {
    let mut r = respond(status, super::TEXT, body);
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn handle(state: &AdminState, peer: Peer, req: Request<Incoming>) -> Resp {
    // One request per turn: a client that pipelines requests as fast as its socket takes the
    // answers (and tokio's budget allows) would otherwise hold the thread for a run of them
    // while /livez waits behind it.
    tokio::task::yield_now().await;
    let (parts, body) = req.into_parts();
    // 1. The body: none is used; read a small one so the connection stays usable.
    let hint = body.size_hint();
    if hint.lower() > MAX_BODY || hint.upper().is_some_and(|u| u > MAX_BODY) {
        return respond_and_close(
            413,
            format!("admin requests take no body (at most {MAX_BODY} bytes are read)\n"),
        );
    }
    if !body.is_end_stream() {
        let limited = Limited::new(body, MAX_BODY as usize);
        match tokio::time::timeout(HEAD_TIMEOUT, limited.collect()).await {
            Err(_) => {
                return respond_and_close(
                    408,
                    format!("request body not received within {HEAD_TIMEOUT:?}\n"),
                )
            }
            Ok(Err(e))
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return respond_and_close(
                    413,
                    format!("admin requests take no body (at most {MAX_BODY} bytes are read)\n"),
                )
            }
            Ok(Err(e)) => {
                return respond_and_close(400, format!("cannot read the request body: {e}\n"))
            }
            Ok(Ok(_ignored)) => {}
        }
    }
    // 2. Who may change things.
    if parts.method == Method::POST {
        let token = state.report.token();
        let hosts: Vec<&[u8]> = parts
            .headers
            .get_all(HOST)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let post = PostRequest {
            peer,
            authorization: parts.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes),
            has_origin: parts.headers.contains_key(ORIGIN),
            hosts: &hosts,
        };
        match auth::check_post(token.as_deref().map(|t| t.as_bytes()), &post) {
            Ok(()) => {}
            Err(Refusal::Unauthorized(why)) => {
                let mut r = respond(401, super::TEXT, format!("{why}\n"));
                r.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"ringlb admin\""),
                );
                return r;
            }
            Err(Refusal::Forbidden(why)) => return respond(403, super::TEXT, format!("{why}\n")),
        }
    }
    // 3. The endpoint.
    match route(state, &parts.method, parts.uri.path()) {
        Answer::Now(status, ctype, body) => respond(status, ctype, body),
        Answer::Upgrade => {
            let (status, body) = super::upgrade_request(state).await;
            respond(status, super::TEXT, body)
        }
        Answer::Control(make) => {
            let pending = &state.server.pending_mutations;
            if pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_MUTATIONS {
                pending.fetch_sub(1, Ordering::Relaxed);
                return respond(
                    503,
                    super::TEXT,
                    "too many changes waiting for the control thread; retry\n".into(),
                );
            }
            let (status, body) = super::control_request(state, make).await;
            pending.fetch_sub(1, Ordering::Relaxed);
            respond(status, super::TEXT, body)
        }
    }
}

/// Wraps a stream so that a write (or flush) that stays blocked for `limit` fails with
/// `TimedOut`: a peer that stopped reading cannot hold a connection, and its responses, open.
struct WriteStall<S> {
    inner: S,
    limit: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteStall<S> {
    fn new(inner: S, limit: Duration) -> Self {
        WriteStall {
            inner,
            limit,
            deadline: None,
        }
    }

    /// Called when a write is pending: errors once it has been pending for `limit`.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.limit;
        let d = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match d.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.stalled(cx),
            ready => {
                self.deadline = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteStall<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteStall<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(r, cx)
    }
}
