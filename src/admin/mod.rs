//! The admin HTTP endpoint (tiny_http, one thread): `/livez`, `/readyz`, `/metrics` (Prometheus
//! text), `/status` (JSON), and the control requests `POST /reload`.
//!
//! It reads published snapshots, the backend registry and per-worker counters (summed at scrape
//! time) and forwards control requests to the control thread over a channel.
//! Must not: touch rings or connections, or mutate anything but through the control channel.

mod metrics;

pub use metrics::metrics;

use crate::backend::{process_ms, ListenerStats, Registry};
use crate::control::Request;
use crate::snapshot::Published;
use log::{info, warn};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A worker or the control thread is considered stuck when its heartbeat is older than this.
pub const STUCK_AFTER: Duration = Duration::from_secs(3);

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
    pub requests: Mutex<Sender<Request>>,
}

/// Starts the admin server on `bind`; returns the bound address.
pub fn start(bind: SocketAddr, state: Arc<AdminState>) -> std::io::Result<SocketAddr> {
    let server = tiny_http::Server::http(bind).map_err(std::io::Error::other)?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("admin server has no IP address"))?;
    std::thread::Builder::new()
        .name("ringlb-admin".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let (status, ctype, body) = route(&state, req.method(), req.url());
                let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes())
                    .expect("static header is valid");
                let resp = tiny_http::Response::from_string(body)
                    .with_status_code(status)
                    .with_header(header);
                if let Err(e) = req.respond(resp) {
                    warn!("admin: cannot answer: {e}");
                }
            }
        })?;
    Ok(addr)
}

const TEXT: &str = "text/plain; charset=utf-8";

fn route(state: &AdminState, method: &tiny_http::Method, url: &str) -> (u16, &'static str, String) {
    use tiny_http::Method::{Get, Head, Post};
    let path = url.split('?').next().unwrap_or("");
    match (method, path) {
        (Get | Head, "/livez") => {
            let (ok, text) = liveness(state);
            (if ok { 200 } else { 503 }, TEXT, text)
        }
        (Get | Head, "/readyz") => {
            let (ok, text) = readiness(state);
            (if ok { 200 } else { 503 }, TEXT, text)
        }
        (Get | Head, "/metrics") => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(state),
        ),
        (Get | Head, "/status") => (200, "application/json", status_json(state)),
        (Post, "/reload") => control_request(state, |reply| Request::Reload { reply: Some(reply) }),
        (Post, p) if p.starts_with("/backends/") => match parse_backend_action(p) {
            Some((listener, backend, drain)) => control_request(state, |reply| Request::Drain {
                listener,
                backend,
                drain,
                reply,
            }),
            None => (
                404,
                TEXT,
                "expected POST /backends/<listener>/<ip:port>/drain or .../undrain\n".into(),
            ),
        },
        (_, "/livez" | "/readyz" | "/metrics" | "/status" | "/reload") => {
            (405, TEXT, "method not allowed\n".into())
        }
        _ => (
            404,
            TEXT,
            "not found; try /livez /readyz /metrics /status, POST /reload, POST /backends/<listener>/<ip:port>/drain|undrain\n".into(),
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

fn control_request(
    state: &AdminState,
    make: impl FnOnce(Sender<Result<String, String>>) -> Request,
) -> (u16, &'static str, String) {
    let (tx, rx) = mpsc::channel();
    let sent = state
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(make(tx));
    if sent.is_err() {
        return (503, TEXT, "control thread is not running\n".into());
    }
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(summary)) => (200, TEXT, format!("{summary}\n")),
        Ok(Err(e)) => (400, TEXT, format!("{e}\n")),
        Err(_) => (503, TEXT, "control thread did not answer in 30 s\n".into()),
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
    let stuck = STUCK_AFTER.as_millis() as u64;
    let c = age_ms(state, &state.control_heartbeat);
    if c > stuck {
        problems.push(format!("control thread heartbeat is {c} ms old"));
    }
    for (i, hb) in state.worker_heartbeats.iter().enumerate() {
        let a = age_ms(state, hb);
        if a > stuck {
            problems.push(format!("worker {i} heartbeat is {a} ms old"));
        }
    }
    if problems.is_empty() {
        (true, "ok\n".into())
    } else {
        (false, problems.join("\n") + "\n")
    }
}

/// Ready = every listener is bound and has at least one backend up.
pub fn readiness(state: &AdminState) -> (bool, String) {
    let mut problems = Vec::new();
    if state.draining.load(Ordering::SeqCst) {
        problems.push("draining: shutting down, listeners closed".to_string());
    }
    for l in state.listeners.load().iter() {
        if l.bound.is_none() {
            problems.push(format!("listener \"{}\": not bound", l.name));
            continue;
        }
        let snap = l.published.load();
        let up = snap.up_count();
        if up == 0 {
            problems.push(format!(
                "listener \"{}\": no healthy backend (0/{} up)",
                l.name,
                snap.members.len()
            ));
        }
    }
    if problems.is_empty() {
        (true, "ready\n".into())
    } else {
        (false, problems.join("\n") + "\n")
    }
}

/// `/status`: listeners, backends, health, weights, active connections.
pub fn status_json(state: &AdminState) -> String {
    let listeners: Vec<serde_json::Value> = state
        .listeners
        .load()
        .iter()
        .map(|lv| {
            let snap = lv.published.load();
            let backends: Vec<serde_json::Value> = snap
                .members
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "address": m.address.to_string(),
                        "weight": m.weight,
                        "up": m.up,
                        "active_connections": m.stats.active(),
                        "connections_total": m.stats.sum(|w| &w.connections),
                        "consecutive_connect_failures": m.stats.consecutive_failures(),
                    })
                })
                .collect();
            serde_json::json!({
                "name": lv.name,
                "protocol": lv.protocol,
                "bind": lv.bound.map(|a| a.to_string()),
                "balance": snap.tables.policy().name(),
                "generation": snap.generation,
                "active_connections": lv.stats.sum(|w| &w.active),
                "backends_up": snap.up_count(),
                "backends": backends,
            })
        })
        .collect();
    let v = serde_json::json!({
        "uptime_seconds": process_ms() / 1000,
        "workers": state.worker_heartbeats.len(),
        "listeners": listeners,
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// Logs where the admin endpoint listens (tests parse this line).
pub fn log_started(addr: SocketAddr) {
    info!("admin endpoint on http://{addr} (/livez /readyz /metrics /status)");
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
            requests: Mutex::new(mpsc::channel().0),
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
    fn draining_is_not_ready() {
        let s = state(&[1], 1);
        assert!(readiness(&s).0);
        s.draining.store(true, Ordering::SeqCst);
        let (ok, text) = readiness(&s);
        assert!(!ok && text.contains("draining"), "{text}");
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
