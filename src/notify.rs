//! systemd's service notification protocol (`sd_notify(3)`), spoken without libsystemd: one
//! datagram per state change to the unix socket named by `NOTIFY_SOCKET` (a path, or `@name` for
//! an abstract socket). `READY=1` once serving, `RELOADING=1` / `READY=1` around a reload,
//! `STOPPING=1` when a drain starts, `WATCHDOG=1` while every worker ticks, `MAINPID=` for a
//! process taking over.
//!
//! Owns reading `NOTIFY_SOCKET` / `WATCHDOG_USEC` / `WATCHDOG_PID` and the wire format. When
//! `NOTIFY_SOCKET` is unset nothing is sent and nothing is opened. Must not: block (a datagram
//! that cannot be sent at once is dropped, and said so once), fail the caller, or touch workers
//! (the watchdog only reads their heartbeat atomics). The environment is left as it is, so a
//! process started later (a binary upgrade) can send `MAINPID=` to the same socket.

use log::{debug, info, warn};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A worker whose heartbeat is older than this is stuck: the watchdog stops being fed (the same
/// threshold as the admin endpoint's `/livez`).
pub const STUCK_AFTER: Duration = Duration::from_secs(3);

/// Where notifications go: the socket's address and an unbound datagram socket to send from.
pub struct Notifier {
    addr: SocketAddr,
    socket: UnixDatagram,
    /// Whether a failed send has been logged already (logged once, then at debug).
    failed: AtomicBool,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names; `None` when it is unset or empty. An unusable value is
    /// warned about once and treated as unset.
    pub fn from_env() -> Option<Notifier> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        let value = value.to_str().unwrap_or_default().to_string();
        if value.is_empty() {
            return None;
        }
        match Notifier::new(&value) {
            Ok(n) => Some(n),
            Err(e) => {
                warn!("NOTIFY_SOCKET={value:?} is not usable ({e}); not notifying systemd");
                None
            }
        }
    }

    /// A notifier for `NOTIFY_SOCKET`-style `target`: an absolute path or `@abstract-name`.
    pub fn new(target: &str) -> std::io::Result<Notifier> {
        let addr = if let Some(name) = target.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())?
        } else if target.starts_with('/') {
            SocketAddr::from_pathname(target)?
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "expected an absolute path or @abstract-name",
            ));
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            addr,
            socket,
            failed: AtomicBool::new(false),
        })
    }

    /// Sends one notification (`KEY=VALUE` lines). Never fails the caller.
    pub fn send(&self, message: &str) {
        match self.socket.send_to_addr(message.as_bytes(), &self.addr) {
            Ok(_) => debug!("sd_notify: {}", message.replace('\n', " ")),
            Err(e) if !self.failed.swap(true, Ordering::Relaxed) => {
                warn!(
                    "sd_notify: cannot send {:?} to NOTIFY_SOCKET: {e} (further failures are \
                     logged at debug)",
                    message.replace('\n', " ")
                );
            }
            Err(e) => debug!("sd_notify: cannot send {message:?}: {e}"),
        }
    }
}

/// The process's notifier, read from the environment on first use.
fn global() -> Option<&'static Notifier> {
    static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
    NOTIFIER.get_or_init(Notifier::from_env).as_ref()
}

fn send(message: &str) {
    if let Some(n) = global() {
        n.send(message);
    }
}

/// `STATUS=` text must stay on one line (the protocol is newline-separated).
fn status_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

/// Every listener is bound and the workers run.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", status_line(status)));
}

/// A reload starts; [`reloaded`] must follow.
pub fn reloading() {
    send(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
        monotonic_usec()
    ));
}

/// A reload ended (applied or refused: either way the process serves again).
pub fn reloaded(status: &str) {
    ready(status);
}

/// Shutdown (drain) has started.
pub fn stopping(status: &str) {
    send(&format!("STOPPING=1\nSTATUS={}", status_line(status)));
}

/// Tells systemd that `pid` is now the service's main process (a binary upgrade's new process
/// sends this once it serves; needs `NotifyAccess=all`).
pub fn main_pid(pid: u32) {
    send(&format!("MAINPID={pid}"));
}

/// `CLOCK_MONOTONIC` in microseconds, as `RELOADING=1` wants it with `MONOTONIC_USEC=`.
fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64) * 1_000_000 + (t.tv_nsec() as u64) / 1_000,
        Err(_) => 0,
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, meant for this process when
/// `WATCHDOG_PID` is unset or is our pid); `None` when there is none.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Feeds systemd's watchdog (`WATCHDOG=1`) every half interval from the control thread, while
/// every worker's heartbeat is fresh. A stuck worker stops the pings, so systemd restarts the
/// service after `WatchdogSec=`; that the control thread itself runs is implied by the pings.
pub struct Watchdog {
    notifier: &'static Notifier,
    every: Duration,
    next: Instant,
    heartbeats: Vec<Arc<AtomicU64>>,
    stuck_after_ms: u64,
    stalled: bool,
}

impl Watchdog {
    /// The watchdog the environment asks for, if any (`NOTIFY_SOCKET` and `WATCHDOG_USEC` set).
    /// `heartbeats` are the workers' (`process_ms()` of their last tick).
    pub fn from_env(heartbeats: Vec<Arc<AtomicU64>>) -> Option<Watchdog> {
        let interval = watchdog_interval()?;
        let notifier = global()?;
        let w = Watchdog::new(notifier, interval, heartbeats);
        info!(
            "systemd watchdog: WATCHDOG=1 every {:?} while every worker ticks",
            w.every
        );
        Some(w)
    }

    /// A watchdog for systemd's `interval` (pings every half of it).
    pub fn new(
        notifier: &'static Notifier,
        interval: Duration,
        heartbeats: Vec<Arc<AtomicU64>>,
    ) -> Watchdog {
        let every = (interval / 2).max(Duration::from_millis(1));
        Watchdog {
            notifier,
            every,
            next: Instant::now(),
            heartbeats,
            // A heartbeat older than the whole interval is stale too, whatever STUCK_AFTER says.
            stuck_after_ms: STUCK_AFTER.min(interval).as_millis() as u64,
            stalled: false,
        }
    }

    /// Pings if one is due and every heartbeat is fresh at `now_ms` (`process_ms()` clock).
    /// Returns whether a ping was sent.
    pub fn tick(&mut self, now_ms: u64) -> bool {
        let now = Instant::now();
        if now < self.next {
            return false;
        }
        self.next = now + self.every;
        let stale = self.heartbeats.iter().enumerate().find_map(|(i, hb)| {
            let age = now_ms.saturating_sub(hb.load(Ordering::Relaxed));
            (age > self.stuck_after_ms).then_some((i, age))
        });
        match stale {
            Some((worker, age)) => {
                if !self.stalled {
                    warn!(
                        "systemd watchdog: worker {worker} heartbeat is {age} ms old; not \
                         sending WATCHDOG=1 until every worker ticks again"
                    );
                }
                self.stalled = true;
                false
            }
            None => {
                if self.stalled {
                    info!("systemd watchdog: every worker ticks again; WATCHDOG=1 resumed");
                    self.stalled = false;
                }
                self.notifier.send("WATCHDOG=1");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(name: &str) -> (UnixDatagram, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("ringlb-notify-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let s = UnixDatagram::bind(&path).expect("bind test socket");
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        (s, path)
    }

    fn recv(s: &UnixDatagram) -> Option<String> {
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[test]
    fn sends_to_a_path_and_an_abstract_socket() {
        let (s, path) = socket("path");
        let n = Notifier::new(path.to_str().unwrap()).expect("notifier");
        n.send("READY=1");
        assert_eq!(recv(&s).as_deref(), Some("READY=1"));
        let _ = std::fs::remove_file(&path);

        let name = format!("ringlb-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let a = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        a.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .send("STOPPING=1");
        assert_eq!(recv(&a).as_deref(), Some("STOPPING=1"));
        assert!(Notifier::new("relative/path").is_err());
    }

    #[test]
    fn watchdog_pings_only_while_every_heartbeat_is_fresh() {
        let (s, path) = socket("watchdog");
        let n: &'static Notifier =
            Box::leak(Box::new(Notifier::new(path.to_str().unwrap()).unwrap()));
        let hb = Arc::new(AtomicU64::new(10_000));
        let fresh = Arc::new(AtomicU64::new(10_000));
        let mut w = Watchdog::new(n, Duration::from_secs(10), vec![fresh.clone(), hb.clone()]);
        assert_eq!(w.every, Duration::from_secs(5));
        assert!(w.tick(10_500), "first tick is due and both are fresh");
        assert_eq!(recv(&s).as_deref(), Some("WATCHDOG=1"));
        assert!(!w.tick(10_600), "not due yet");
        // Worker 1 stuck for 4 s (> STUCK_AFTER): due, but no ping.
        w.next = Instant::now();
        assert!(!w.tick(14_001));
        assert!(w.stalled);
        assert_eq!(recv(&s), None, "no datagram while a worker is stuck");
        // It ticks again: pings resume.
        hb.store(14_000, Ordering::Relaxed);
        fresh.store(14_000, Ordering::Relaxed);
        w.next = Instant::now();
        assert!(w.tick(14_100));
        assert_eq!(recv(&s).as_deref(), Some("WATCHDOG=1"));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn stale_means_older_than_the_interval_when_that_is_shorter() {
        let (_s, path) = socket("short");
        let n: &'static Notifier =
            Box::leak(Box::new(Notifier::new(path.to_str().unwrap()).unwrap()));
        let hb = Arc::new(AtomicU64::new(1_000));
        let mut w = Watchdog::new(n, Duration::from_secs(1), vec![hb]);
        assert!(!w.tick(2_001), "1001 ms old against a 1 s interval");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn monotonic_clock_is_read() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_usec() > a && a > 0);
    }
}
