//! Hitless binary upgrade. `SIGUSR2` or `POST /upgrade` makes the running (old) process start
//! the binary at its own path, re-resolved on disk from the original `argv[0]` (so the file a
//! package upgrade put there is what runs; `/proc/self/exe` would still name the deleted old
//! inode), with the same arguments and one end of a `SOCK_SEQPACKET` socket pair whose
//! descriptor number is in [`FD_ENV`].
//!
//! The order (see `wire.rs` for the messages):
//! 1. old → new: every worker's TCP and UDP listening socket and the admin listening socket
//!    (`SCM_RIGHTS`, the same sockets: nothing waiting in an accept queue or a receive buffer is
//!    lost), then `SocketsDone`;
//! 2. the new process loads and validates its config, takes those sockets (binding only what the
//!    old did not have), starts its workers and answers `Ready { pid }` (or `Failed`, or exits);
//! 3. only then does the old one stop accepting and receiving (closing its own descriptors, not
//!    the shared sockets), hand over its UDP flows (client, listener, backend, connected
//!    upstream socket; the new process's UDP listeners receive only once they are in, so no
//!    client of a flow gets a new one), drain its TCP connections up to `runtime.drain_timeout`
//!    and exit 0.
//!    While it drains it sends its open connections per backend every [`COUNTS_EVERY`]; the new
//!    process adds them to its own per-backend counts (so `least_connections` sees the whole
//!    load) and takes them away again when the next report is lower, or all of them when the
//!    channel ends (the old process exited).
//!
//! If the new process fails (a config error, a crash, no `Ready` within [`READY_TIMEOUT`]), the
//! old one serves on as if nothing happened and says why; one upgrade runs at a time.
//!
//! Owns the channel, the socket registry kept for it and the start of the new process. Must not:
//! touch workers or rings (the runtime stops them), or block the runtime's loop (the attempt runs
//! on its own thread).

pub mod wire;

use crate::backend::Registry;
use crate::worker::HandedFlow;
use log::{info, warn};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
pub use wire::Kind;
use wire::{Entry, Message};

/// The environment variable naming the handover channel's descriptor in the new process.
pub const FD_ENV: &str = "RINGLB_UPGRADE_FD";
/// How long the old process waits for the new one's `Ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a draining old process reports its open connections per backend.
pub const COUNTS_EVERY: Duration = Duration::from_millis(250);

/// `argv[0]` and the working directory at start: where to find the binary again.
static ORIGIN: OnceLock<(OsString, Option<PathBuf>)> = OnceLock::new();

/// Remembers how this process was started (call first thing in `main`).
pub fn record_origin() {
    let argv0 = std::env::args_os()
        .next()
        .unwrap_or_else(|| "ringlb".into());
    let _ = ORIGIN.set((argv0, std::env::current_dir().ok()));
}

/// The binary to start for an upgrade: `argv[0]` resolved again now (relative to the start
/// directory, or searched in `PATH` when it has no `/`).
pub fn resolve_exe() -> io::Result<PathBuf> {
    let (argv0, cwd) = ORIGIN.get_or_init(|| {
        (
            std::env::args_os()
                .next()
                .unwrap_or_else(|| "ringlb".into()),
            std::env::current_dir().ok(),
        )
    });
    let p = Path::new(argv0);
    if p.as_os_str().as_encoded_bytes().contains(&b'/') {
        let full = match (p.is_absolute(), cwd) {
            (false, Some(cwd)) => cwd.join(p),
            _ => p.to_path_buf(),
        };
        return if full.is_file() {
            Ok(full)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a file", full.display()),
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} not found in PATH", p.display()),
            )
        })
}

// ---- the old process's side -----------------------------------------------------------------

/// Duplicates of every listening socket the workers serve (and the admin socket), kept so that
/// an upgrade can hand them over. Touched at start, on reload and on upgrade only.
#[derive(Default)]
pub struct Sockets {
    entries: Mutex<Vec<(Entry, OwnedFd)>>,
}

impl Sockets {
    /// Keeps a duplicate of `fd` (the same socket) for a later handover.
    pub fn add(&self, kind: Kind, listener: &str, worker: usize, fd: impl AsFd) {
        match fd.as_fd().try_clone_to_owned() {
            Ok(dup) => self.lock().push((
                Entry {
                    kind,
                    listener: listener.to_string(),
                    worker,
                },
                dup,
            )),
            Err(e) => warn!(
                "listener \"{listener}\": cannot keep a descriptor for binary upgrades: {e}; an \
                 upgrade would bind this listener anew"
            ),
        }
    }

    /// Closes every duplicate (a drain: the listening sockets must really close with the
    /// workers' descriptors, or the kernel would go on queueing connections nobody accepts).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Forgets a removed listener's sockets.
    pub fn remove(&self, listener: &str) {
        self.lock()
            .retain(|(e, _)| e.kind == Kind::Admin || e.listener != listener);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Entry, OwnedFd)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends every socket over `channel`, then `SocketsDone`.
    fn send_all(&self, channel: &OwnedFd) -> io::Result<usize> {
        let entries = self.lock();
        for chunk in entries.chunks(wire::FDS_PER_MESSAGE) {
            let fds: Vec<RawFd> = chunk.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
            let msg = Message::Sockets {
                entries: chunk.iter().map(|(e, _)| e.clone()).collect(),
            };
            wire::send(channel, &msg, &fds)?;
        }
        wire::send(channel, &Message::SocketsDone, &[])?;
        Ok(entries.len())
    }
}

/// What an upgrade request gets: the new process's pid, or (HTTP status, why).
pub type Outcome = Result<u32, (u16, String)>;
/// Where the answer to one upgrade request goes.
pub type Reply = tokio::sync::oneshot::Sender<Outcome>;

/// The admin endpoint's way to ask the runtime for an upgrade.
pub struct Trigger {
    tx: Mutex<mpsc::Sender<Reply>>,
    /// Set once the new process serves: the admin endpoint stops accepting here.
    stopped: std::sync::atomic::AtomicBool,
}

impl Trigger {
    pub fn new() -> (Trigger, mpsc::Receiver<Reply>) {
        let (tx, rx) = mpsc::channel();
        let t = Trigger {
            tx: Mutex::new(tx),
            stopped: std::sync::atomic::AtomicBool::new(false),
        };
        (t, rx)
    }

    /// Whether the admin endpoint should stop accepting (the new process serves it).
    pub fn accepting_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tells the admin endpoint to stop accepting.
    pub fn stop_accepting(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Asks for an upgrade; false if the runtime is gone.
    pub fn request(&self, reply: Reply) -> bool {
        self.tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(reply)
            .is_ok()
    }
}

/// A new process that answered `Ready`.
pub struct Started {
    pub pid: u32,
    channel: OwnedFd,
    /// Kept so the exit of a process that failed can be read; after success it is never waited
    /// for (the new process outlives this one).
    _child: std::process::Child,
}

impl Started {
    /// Hands the UDP flows (worker, flow) over, then says they are all there. Their sockets
    /// close here as the flows are dropped; they live on in the new process.
    pub fn send_flows(&self, flows: Vec<(usize, HandedFlow)>) {
        let n = flows.len();
        for chunk in flows.chunks(wire::FDS_PER_MESSAGE) {
            let fds: Vec<RawFd> = chunk.iter().map(|(_, f)| f.socket.as_raw_fd()).collect();
            let entries = chunk
                .iter()
                .map(|(w, f)| wire::FlowEntry {
                    worker: *w,
                    listener: f.listener.to_string(),
                    client: f.client,
                    local: f.local,
                    backend: f.backend,
                })
                .collect();
            if let Err(e) = wire::send(&self.channel, &Message::Flows { flows: entries }, &fds) {
                warn!("upgrade: cannot hand UDP flows over: {e}");
                return;
            }
        }
        match wire::send(&self.channel, &Message::FlowsDone, &[]) {
            Ok(()) => info!("upgrade: handed {n} UDP flow(s) to pid {}", self.pid),
            Err(e) => warn!("upgrade: cannot hand UDP flows over: {e}"),
        }
    }

    /// Reports this process's open connections per (listener, backend) to the new process
    /// every [`COUNTS_EVERY`] until this process exits (the channel's end tells the new one
    /// that they are gone). Runs on its own thread.
    pub fn report_counts(self, registry: std::sync::Arc<Registry>) {
        let spawned = std::thread::Builder::new()
            .name("ringlb-upgrade".into())
            .spawn(move || loop {
                let counts = registry
                    .all()
                    .into_iter()
                    .map(|(l, s)| (l, s.address, s.active()))
                    .collect();
                if wire::send(&self.channel, &Message::Counts { counts }, &[]).is_err() {
                    return;
                }
                std::thread::sleep(COUNTS_EVERY);
            });
        if let Err(e) = spawned {
            warn!("upgrade: cannot report connection counts to the new process: {e}");
        }
    }
}

/// Starts the new process and waits (on the calling thread: the runtime runs this on its own)
/// until it is ready, failed, or [`READY_TIMEOUT`] passed.
pub fn attempt(sockets: &Sockets) -> Result<Started, String> {
    let exe = resolve_exe().map_err(|e| format!("cannot find the binary to start: {e}"))?;
    let (ours, theirs) = wire::pair().map_err(|e| format!("cannot create the channel: {e}"))?;
    // The new process's end must survive exec.
    nix::fcntl::fcntl(
        &theirs,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .map_err(|e| format!("cannot pass the channel: {e}"))?;
    let argv0 = ORIGIN
        .get()
        .map(|(a, _)| a.clone())
        .unwrap_or_else(|| exe.clone().into_os_string());
    let mut cmd = std::process::Command::new(&exe);
    {
        use std::os::unix::process::CommandExt;
        cmd.arg0(&argv0);
    }
    cmd.args(std::env::args_os().skip(1))
        .env(FD_ENV, theirs.as_raw_fd().to_string());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    drop(theirs);
    let pid = child.id();
    info!("upgrade: started {} as pid {pid}", exe.display());
    let fail = |child: &mut std::process::Child, why: String| {
        let status = wait_briefly(child);
        format!("new process {pid} ({}) {why}{status}", exe.display())
    };
    match sockets.send_all(&ours) {
        Ok(n) => info!("upgrade: handed {n} listening socket(s) to pid {pid}"),
        Err(e) => {
            let why = format!("did not take the sockets ({e})");
            return Err(fail(&mut child, why));
        }
    }
    let timeout = nix::sys::time::TimeVal::new(0, 200_000);
    let _ =
        nix::sys::socket::setsockopt(&ours, nix::sys::socket::sockopt::ReceiveTimeout, &timeout);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match wire::recv(&ours) {
            Ok(Some((Message::Ready { pid: p }, _))) => {
                return Ok(Started {
                    pid: p,
                    channel: ours,
                    _child: child,
                })
            }
            Ok(Some((Message::Failed { reason }, _))) => {
                return Err(fail(&mut child, format!("failed: {reason}")));
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(fail(&mut child, "exited before it was ready".into())),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            }
            Err(e) => return Err(fail(&mut child, format!("channel failed ({e})"))),
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return Err(fail(
                &mut child,
                format!("was not ready within {READY_TIMEOUT:?}; killed it"),
            ));
        }
    }
}

/// `" (exit status: N)"` once the child has exited (waiting up to a second), or "".
fn wait_briefly(child: &mut std::process::Child) -> String {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(1) {
        if let Ok(Some(st)) = child.try_wait() {
            return format!(" ({st})");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    String::new()
}

// ---- the new process's side -----------------------------------------------------------------

/// The channel to the old process, when this process was started by an upgrade.
fn channel() -> Option<&'static OwnedFd> {
    static CHANNEL: OnceLock<Option<OwnedFd>> = OnceLock::new();
    CHANNEL
        .get_or_init(|| {
            let fd: RawFd = std::env::var(FD_ENV).ok()?.trim().parse().ok()?;
            if fd < 3 || !crate::sys::fd_is_open(fd) {
                return None;
            }
            let fd = crate::sys::own_received_fd(fd);
            // Not inherited by anything this process starts (its own upgrade passes a new one).
            let _ = nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            Some(fd)
        })
        .as_ref()
}

/// Whether this process was started by an upgrade.
pub fn is_upgrade() -> bool {
    channel().is_some()
}

/// Tells the old process why this one cannot serve (before exiting). Nothing without a channel.
pub fn report_failure(reason: &str) {
    if let Some(c) = channel() {
        let _ = wire::send(
            c,
            &Message::Failed {
                reason: reason.to_string(),
            },
            &[],
        );
    }
}

/// The sockets the old process handed over, by listener.
#[derive(Default)]
pub struct Inherited {
    listeners: HashMap<(String, bool), Vec<(usize, OwnedFd)>>,
    admin: Option<OwnedFd>,
}

impl Inherited {
    /// Receives the old process's sockets; `Ok(None)` when this process was not started by an
    /// upgrade.
    pub fn receive() -> Result<Option<Inherited>, String> {
        let Some(c) = channel() else {
            return Ok(None);
        };
        let mut got = Inherited::default();
        let mut n = 0;
        loop {
            match wire::recv(c) {
                Ok(Some((Message::Sockets { entries }, fds))) => {
                    if entries.len() != fds.len() {
                        return Err(format!(
                            "handover: {} socket entries but {} descriptors",
                            entries.len(),
                            fds.len()
                        ));
                    }
                    n += fds.len();
                    for (e, fd) in entries.into_iter().zip(fds) {
                        match e.kind {
                            Kind::Admin => got.admin = Some(fd),
                            k => got
                                .listeners
                                .entry((e.listener, k == Kind::Udp))
                                .or_default()
                                .push((e.worker, fd)),
                        }
                    }
                }
                Ok(Some((Message::SocketsDone, _))) => break,
                Ok(Some(_)) => {}
                Ok(None) => return Err("handover: the old process closed the channel".into()),
                Err(e) => return Err(format!("handover: {e}")),
            }
        }
        info!("upgrade: took {n} socket(s) from the previous process");
        Ok(Some(got))
    }

    /// The handed-over sockets of listener `name` if they are bound where `bind` says (port 0:
    /// anywhere), in worker order. Sockets bound elsewhere (the config moved the listener) are
    /// closed.
    pub fn take_listener(&mut self, name: &str, udp: bool, bind: SocketAddr) -> Vec<OwnedFd> {
        let Some(mut socks) = self.listeners.remove(&(name.to_string(), udp)) else {
            return Vec::new();
        };
        socks.sort_by_key(|(w, _)| *w);
        let fits = |fd: &OwnedFd| {
            crate::sys::local_addr(fd.as_fd())
                .is_some_and(|a| a == bind || (bind.port() == 0 && a.ip() == bind.ip()))
        };
        if !socks.iter().all(|(_, fd)| fits(fd)) {
            info!(
                "listener \"{name}\": the previous process's sockets are bound elsewhere; \
                 binding {bind} anew"
            );
            return Vec::new();
        }
        socks.into_iter().map(|(_, fd)| fd).collect()
    }

    /// The admin endpoint's listening socket, if handed over.
    pub fn take_admin(&mut self) -> Option<OwnedFd> {
        self.admin.take()
    }

    /// Listeners handed over that the new config does not have (closed when dropped).
    pub fn leftover(&self) -> Vec<String> {
        self.listeners.keys().map(|(n, _)| n.clone()).collect()
    }
}

/// Where the new process's runtime takes the previous process's UDP flows: called once per
/// worker (0..workers) when they have all arrived (or the channel ended), with that worker's.
pub type Adopt = Box<dyn Fn(usize, Vec<HandedFlow>) + Send>;

/// Tells the old process that this one serves, then, on a thread of its own, takes its UDP flows
/// in and follows its connection counts until it exits (see the module comment).
pub fn ready(registry: std::sync::Arc<Registry>, workers: usize, adopt: Adopt) {
    let Some(c) = channel() else {
        return;
    };
    let pid = std::process::id();
    if let Err(e) = wire::send(c, &Message::Ready { pid }, &[]) {
        warn!("upgrade: cannot tell the previous process that this one is ready: {e}");
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("ringlb-upgrade".into())
        .spawn(move || {
            take_flows(c, workers, &adopt);
            follow_counts(c, &registry)
        });
    if let Err(e) = spawned {
        warn!("upgrade: cannot follow the previous process's connection counts: {e}");
    }
}

/// Receives the flows until `FlowsDone` (or the end of the channel), then hands each worker
/// its own (the same worker index as in the old process: the same `SO_REUSEPORT` socket, so
/// the kernel keeps steering the client there).
fn take_flows(c: &OwnedFd, workers: usize, adopt: &Adopt) {
    let workers = workers.max(1);
    let mut per: Vec<Vec<HandedFlow>> = (0..workers).map(|_| Vec::new()).collect();
    let mut n = 0;
    loop {
        match wire::recv(c) {
            Ok(Some((Message::Flows { flows }, fds))) => {
                for (e, socket) in flows.into_iter().zip(fds) {
                    n += 1;
                    per[e.worker % workers].push(HandedFlow {
                        listener: e.listener.into(),
                        client: e.client,
                        local: e.local,
                        backend: e.backend,
                        socket,
                    });
                }
            }
            Ok(Some((Message::FlowsDone, _))) => break,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for (w, flows) in per.into_iter().enumerate() {
        adopt(w, flows);
    }
    info!("upgrade: took {n} UDP flow(s) from the previous process");
}

/// Applies the old process's reports: each backend's count here is raised by what the old one
/// still carries; the channel's end (its exit) takes what is left away.
fn follow_counts(c: &OwnedFd, registry: &Registry) {
    let mut added: HashMap<(String, SocketAddr), u64> = HashMap::new();
    loop {
        match wire::recv(c) {
            Ok(Some((Message::Counts { counts }, _))) => {
                let mut seen: HashMap<(String, SocketAddr), u64> = HashMap::new();
                for (l, a, n) in counts {
                    seen.insert((l, a), n);
                }
                for (key, &n) in &seen {
                    let before = added.get(key).copied().unwrap_or(0);
                    if n != before {
                        registry
                            .get(&key.0, key.1)
                            .add_active(n as i64 - before as i64);
                    }
                }
                for (key, before) in &added {
                    if !seen.contains_key(key) && *before > 0 {
                        registry.get(&key.0, key.1).add_active(-(*before as i64));
                    }
                }
                added = seen;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    for ((l, a), n) in added {
        if n > 0 {
            registry.get(&l, a).add_active(-(n as i64));
        }
    }
    info!("upgrade: the previous process has exited");
}
