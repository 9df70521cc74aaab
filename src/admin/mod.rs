//! The admin HTTP endpoint: the stats page at `/`, `/livez`, `/readyz`, `/metrics` (Prometheus text), `/status`
//! (JSON), and the control requests `POST /reload` and `POST /backends/<l>/<addr>/drain|undrain`.
//!
//! It reads published snapshots, the backend registry, per-worker counters (summed at scrape
//! time) and the control thread's [`Report`], so the health endpoints never wait for the control
//! thread; only mutations are forwarded to it, over a channel, and awaited. The HTTP server and
//! its limits are in [`server`], who may mutate in [`auth`].
//! Must not: touch rings or connections, or mutate anything but through the control channel.

mod auth;
mod metrics;
mod page;
mod process;
mod server;
mod status;

pub use metrics::metrics;
pub use server::{
    adopt, bind, serve, AdminHandle, AdminListener, ServerStats, Where, HEAD_TIMEOUT, MAX_BODY,
    MAX_CONNECTIONS, MAX_HEAD, WRITE_STALL,
};
pub use status::status_json;

use crate::backend::{process_ms, ListenerStats, Registry};
use crate::config::Admin;
use crate::control::{Reply, Report, Request};
use crate::snapshot::Published;
use hyper::Method;
use log::info;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A worker or the control thread is considered stuck when its heartbeat is older than this.
pub const STUCK_AFTER: Duration = Duration::from_secs(3);
/// The control thread cannot tick while it applies a reload (a big Maglev table takes a while):
/// it counts as live for this long into one.
pub const RELOAD_STUCK_AFTER: Duration = Duration::from_secs(60);
/// How long a mutation waits for the control thread's answer.
const CONTROL_WAIT: Duration = Duration::from_secs(30);

/// One listener as the admin endpoint sees it.
#[derive(Clone)]
pub struct ListenerView {
    pub name: String,
    pub protocol: &'static str,
    /// The address actually bound (port 0 resolved), or None if not bound.
    pub bound: Option<SocketAddr>,
    pub published: Published,
    pub stats: Arc<ListenerStats>,
}

/// Everything the admin endpoint reads.
pub struct AdminState {
    /// Set when SIGTERM/SIGINT started draining: not ready any more.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    pub listeners: Arc<arc_swap::ArcSwap<Vec<ListenerView>>>,
    pub registry: Arc<Registry>,
    /// Per worker: heartbeat (`process_ms()` at its last tick).
    pub worker_heartbeats: Vec<Arc<AtomicU64>>,
    /// Control thread heartbeat (`process_ms()`).
    pub control_heartbeat: Arc<AtomicU64>,
    /// Reload counters, the admin token, why backends are down (written by the control thread).
    pub report: Arc<Report>,
    pub requests: Mutex<Sender<Request>>,
    /// The HTTP server's own counters.
    pub server: ServerStats,
    /// The I/O backend every worker runs, and why.
    pub io: crate::io::Choice,
    /// `POST /upgrade` goes here; also says when the admin socket was handed over.
    pub upgrade: crate::upgrade::Trigger,
}

const TEXT: &str = "text/plain; charset=utf-8";

/// What a request gets: an answer now, or a request to the control thread whose reply is the
/// answer.
enum Answer {
    Now(u16, &'static str, String),
    Control(Box<dyn FnOnce(Reply) -> Request + Send>),
    /// `POST /upgrade`: answered by the runtime once the new process is ready or failed.
    Upgrade,
}

fn route(state: &AdminState, method: &Method, path: &str) -> Answer {
    let (get, post) = (
        method == Method::GET || method == Method::HEAD,
        method == Method::POST,
    );
    match path {
        "/" if get => Answer::Now(200, page::CONTENT_TYPE, page::html()),
        "/livez" if get => {
            let (ok, text) = liveness(state);
            Answer::Now(if ok { 200 } else { 503 }, TEXT, text)
        }
        "/readyz" if get => {
            let (ok, text) = readiness(state);
            Answer::Now(if ok { 200 } else { 503 }, TEXT, text)
        }
        "/metrics" if get => Answer::Now(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(state),
        ),
        "/status" if get => Answer::Now(200, "application/json", status_json(state)),
        "/reload" if post => Answer::Control(Box::new(|reply| Request::Reload {
            reply: Some(reply),
        })),
        "/upgrade" if post => Answer::Upgrade,
        p if post && p.starts_with("/backends/") => match parse_backend_action(p) {
            Some((listener, backend, drain)) => Answer::Control(Box::new(move |reply| {
                Request::Drain {
                    listener,
                    backend,
                    drain,
                    reply,
                }
            })),
            None => Answer::Now(
                404,
                TEXT,
                "expected POST /backends/<listener>/<ip:port>/drain or .../undrain\n".into(),
            ),
        },
        "/" | "/livez" | "/readyz" | "/metrics" | "/status" | "/reload" | "/upgrade" => {
            Answer::Now(405, TEXT, "method not allowed\n".into())
        }
        _ => Answer::Now(
            404,
            TEXT,
            "not found; try / (stats page) /livez /readyz /metrics /status, POST /reload, POST /upgrade, POST /backends/<listener>/<ip:port>/drain|undrain\n".into(),
        ),
    }
}

/// `/backends/<listener>/<address>/drain|undrain` → (listener, address, drain?). IPv6 addresses
/// are written `[::1]:80` (percent-encoded brackets are accepted too).
fn parse_backend_action(path: &str) -> Option<(String, SocketAddr, bool)> {
    let rest = path.strip_prefix("/backends/")?;
    let (listener, rest) = rest.split_once('/')?;
    let (addr, action) = rest.rsplit_once('/')?;
    let addr = addr
        .replace("%5B", "[")
        .replace("%5D", "]")
        .replace("%3A", ":");
    let drain = match action {
        "drain" => true,
        "undrain" => false,
        _ => return None,
    };
    Some((listener.to_string(), addr.parse().ok()?, drain))
}

/// Sends a request to the control thread and awaits its reply (status, body).
async fn control_request(
    state: &AdminState,
    make: Box<dyn FnOnce(Reply) -> Request + Send>,
) -> (u16, String) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let sent = state
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(make(tx));
    if sent.is_err() {
        return (503, "control thread is not running\n".into());
    }
    match tokio::time::timeout(CONTROL_WAIT, rx).await {
        Ok(Ok(Ok(summary))) => (200, format!("{summary}\n")),
        Ok(Ok(Err(e))) => (400, format!("{e}\n")),
        Ok(Err(_)) => (503, "control thread dropped the request\n".into()),
        Err(_) => (
            503,
            format!("control thread did not answer in {CONTROL_WAIT:?} (it goes on)\n"),
        ),
    }
}

/// Asks the runtime for a binary upgrade and awaits the outcome: 200 with the new pid, 409 while
/// one runs, 500 with the reason it failed.
async fn upgrade_request(state: &AdminState) -> (u16, String) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if !state.upgrade.request(tx) {
        return (503, "the runtime is not running\n".into());
    }
    // The runtime gives up on the new process after READY_TIMEOUT; a little more here.
    let wait = crate::upgrade::READY_TIMEOUT + Duration::from_secs(5);
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(Ok(pid))) => (
            200,
            format!(
                "upgraded: pid {pid} serves; this process ({}) drains\n",
                std::process::id()
            ),
        ),
        Ok(Ok(Err((status, why)))) => (status, format!("{why}\n")),
        Ok(Err(_)) => (503, "the runtime dropped the request\n".into()),
        Err(_) => (503, format!("no outcome within {wait:?}\n")),
    }
}

fn age_ms(_state: &AdminState, hb: &AtomicU64) -> u64 {
    process_ms().saturating_sub(hb.load(Ordering::Relaxed))
}

/// Live = the control thread and every worker ticked recently.
pub fn liveness(state: &AdminState) -> (bool, String) {
    liveness_at(state, process_ms())
}

/// [`liveness`] as seen at `now_ms` (`process_ms()` clock).
fn liveness_at(state: &AdminState, now_ms: u64) -> (bool, String) {
    let age_ms = |_: &AdminState, hb: &AtomicU64| now_ms.saturating_sub(hb.load(Ordering::Relaxed));
    let mut problems = Vec::new();
    let mut notes = String::new();
    let stuck = STUCK_AFTER.as_millis() as u64;
    let c = age_ms(state, &state.control_heartbeat);
    if c > stuck {
        match state.report.reload_running_for(now_ms) {
            Some(r) if r <= RELOAD_STUCK_AFTER.as_millis() as u64 => {
                notes = format!(" (control thread busy with a reload for {r} ms)");
            }
            _ => problems.push(format!("control thread heartbeat is {c} ms old")),
        }
    }
    for (i, hb) in state.worker_heartbeats.iter().enumerate() {
        let a = age_ms(state, hb);
        if a > stuck {
            problems.push(format!("worker {i} heartbeat is {a} ms old"));
        }
    }
    if problems.is_empty() {
        (true, format!("ok{notes}\n"))
    } else {
        (false, problems.join("\n") + "\n")
    }
}

/// Why the backends that are not up are not: `": 2 not_ready, 1 down"` (states in their
/// `BackendState::ALL` order, those with none left out).
fn not_up_states<'a>(members: impl IntoIterator<Item = &'a crate::snapshot::Member>) -> String {
    let members: Vec<&crate::snapshot::Member> = members.into_iter().collect();
    use crate::snapshot::BackendState;
    let mut out = String::new();
    for state in BackendState::ALL {
        let n = members.iter().filter(|m| m.state == state && !m.up).count();
        if n > 0 && state != BackendState::Up {
            out += if out.is_empty() { ": " } else { ", " };
            out += &format!("{n} {}", state.name());
        }
    }
    out
}

/// Ready = every listener is bound and has at least one backend up.
pub fn readiness(state: &AdminState) -> (bool, String) {
    let mut problems = Vec::new();
    if state.draining.load(Ordering::SeqCst) {
        problems.push("draining: shutting down, listeners closed".to_string());
    }
    let dns = state.report.dns();
    for l in state.listeners.load().iter() {
        if l.bound.is_none() {
            problems.push(format!("listener \"{}\": not bound", l.name));
            continue;
        }
        let snap = l.published.load();
        let up = snap.up_count();
        if up == 0 {
            let mut why = format!(
                "listener \"{}\": no healthy backend (0/{} up{})",
                l.name,
                snap.member_count(),
                not_up_states(snap.members())
            );
            for d in dns.iter().filter(|d| d.key.listener() == l.name) {
                if let Some(p) = &d.problem {
                    why.push_str(&format!("; dns {}: {p}", d.query));
                } else if d.backends == 0 {
                    why.push_str(&format!("; dns {}: no backends", d.query));
                }
            }
            problems.push(why);
        }
    }
    if problems.is_empty() {
        (true, "ready\n".into())
    } else {
        (false, problems.join("\n") + "\n")
    }
}

/// Logs where the admin endpoint listens and who may change things (tests parse this line).
pub fn log_started(at: Option<&Where>, config: &Admin) {
    let who = match &config.token_file {
        Some(f) => format!("changes need the bearer token of {}", f.display()),
        None => match at {
            Some(Where::Unix(_)) => "changes need access to the socket file".to_string(),
            _ => "changes only from loopback peers".to_string(),
        },
    };
    match at {
        Some(Where::Tcp(addr)) => {
            info!("admin endpoint on http://{addr} (stats page /, /livez /readyz /metrics /status); {who}")
        }
        Some(Where::Unix(path)) => info!(
            "admin endpoint on unix:{} (stats page /, /livez /readyz /metrics /status); {who}",
            path.display()
        ),
        None => info!("admin endpoint off (admin.bind = \"none\")"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock value the tests evaluate liveness at.
    const NOW: u64 = 1_000_000;

    fn state(worker_ages_ms: &[u64], control_age_ms: u64) -> AdminState {
        let hb = |age: u64| Arc::new(AtomicU64::new(NOW - age));
        AdminState {
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            listeners: Arc::new(arc_swap::ArcSwap::from_pointee(Vec::new())),
            registry: Arc::new(Registry::new(worker_ages_ms.len())),
            worker_heartbeats: worker_ages_ms.iter().map(|&a| hb(a)).collect(),
            control_heartbeat: hb(control_age_ms),
            report: Arc::new(Report::new(None)),
            requests: Mutex::new(std::sync::mpsc::channel().0),
            server: ServerStats::default(),
            io: crate::io::Choice::epoll_for_tests(),
            upgrade: crate::upgrade::Trigger::new().0,
        }
    }

    #[test]
    fn live_while_everything_ticks() {
        let (ok, text) = liveness_at(&state(&[50, 120], 30), NOW);
        assert!(ok, "{text}");
    }

    #[test]
    fn a_stuck_worker_is_not_live() {
        let (ok, text) = liveness_at(&state(&[50, 10_000], 30), NOW);
        assert!(!ok);
        assert!(text.contains("worker 1 heartbeat"), "{text}");
    }

    #[test]
    fn a_stuck_control_thread_is_not_live() {
        let (ok, text) = liveness_at(&state(&[50], 60_000), NOW);
        assert!(!ok);
        assert!(text.contains("control thread"), "{text}");
    }

    #[test]
    fn a_control_thread_busy_with_a_reload_is_live_for_a_while() {
        let s = state(&[50], 10_000);
        s.report.reload_started(NOW - 9_000);
        let (ok, text) = liveness_at(&s, NOW);
        assert!(ok, "{text}");
        assert!(text.contains("busy with a reload for 9000 ms"), "{text}");
        s.report.reload_started(NOW - 61_000);
        let (ok, text) = liveness_at(&s, NOW);
        assert!(!ok && text.contains("control thread heartbeat"), "{text}");
    }

    #[test]
    fn draining_is_not_ready() {
        let s = state(&[1], 1);
        assert!(readiness(&s).0);
        s.draining.store(true, Ordering::SeqCst);
        let (ok, text) = readiness(&s);
        assert!(!ok && text.contains("draining"), "{text}");
    }

    #[test]
    fn not_ready_names_the_states_of_the_backends() {
        use crate::snapshot::{BackendState, Member};
        let member = |port: u16, state: BackendState| {
            let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            Member {
                address,
                weight: 1,
                up: state == BackendState::Up,
                state,
                ramp_percent: 100,
                max_connections: None,
                backup: false,
                standby: false,
                stats: Arc::new(crate::backend::BackendStats::new(address, 1)),
            }
        };
        let members = [
            member(1, BackendState::NotReady),
            member(2, BackendState::Down),
            member(3, BackendState::NotReady),
        ];
        assert_eq!(not_up_states(&members), ": 2 not_ready, 1 down");
        assert_eq!(not_up_states(&members[..0]), "");
    }

    #[test]
    fn backend_actions_parse() {
        assert_eq!(
            parse_backend_action("/backends/web/127.0.0.1:80/drain"),
            Some(("web".into(), "127.0.0.1:80".parse().unwrap(), true))
        );
        assert_eq!(
            parse_backend_action("/backends/web/%5B::1%5D:80/undrain"),
            Some(("web".into(), "[::1]:80".parse().unwrap(), false))
        );
        assert_eq!(parse_backend_action("/backends/web/nonsense/drain"), None);
        assert_eq!(
            parse_backend_action("/backends/web/127.0.0.1:80/kill"),
            None
        );
    }
}
