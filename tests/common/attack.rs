//! Helpers for the data-plane attack tests (`tests/attacks_dataplane.rs`): which I/O backends to
//! run an attack on, starting the LB on one of them, the LB's CPU time (an idle balancer must
//! burn none), its memory, and bounded floods of hostile clients.
//!
//! Every flood is bounded in count and time; every socket has timeouts.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::SockRef;

use super::lb::Lb;
use super::servers::wait_until;

/// The backends an attack runs on: the one `RINGLB_IO` forces (the CI runs the suite once per
/// backend), else both.
pub fn io_backends() -> Vec<String> {
    match std::env::var("RINGLB_IO") {
        Ok(v) if !v.is_empty() && v != "auto" => vec![v],
        _ => vec!["io_uring".to_string(), "epoll".to_string()],
    }
}

/// Starts ringlb on `toml` with `RINGLB_IO=io` (and `RUST_LOG=info`).
pub fn start_on(io: &str, toml: &str) -> Lb {
    Lb::start_with_env(toml, &[("RINGLB_IO", io), ("RUST_LOG", "info")])
}

/// CPU time (utime + stime) of a process, in clock ticks (1/100 s here).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    let rest = &stat[stat.rfind(')').expect("comm field") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// CPU ticks the LB burns over `window` while the test does nothing.
pub fn cpu_over(lb: &Lb, window: Duration) -> u64 {
    let before = cpu_ticks(lb.pid());
    std::thread::sleep(window);
    cpu_ticks(lb.pid()) - before
}

/// Most CPU an idle LB may burn: 5% of one core over the window (two workers ticking every
/// 100 ms and scanning every 200 ms use well under 1%). A worker spinning in its wait loop
/// burns a whole core when it has one (measured here: 60-95 ticks in 1.5 s), and still 20-30
/// ticks when every core is shared with parallel tests.
pub fn idle_budget(window: Duration) -> u64 {
    (window.as_millis() as u64 / 200).max(3)
}

/// Asserts that the LB burns at most [`idle_budget`] over `window`; `what` names the situation.
pub fn assert_idle(lb: &Lb, window: Duration, what: &str) {
    let used = cpu_over(lb, window);
    let budget = idle_budget(window);
    assert!(
        used <= budget,
        "{what}: the LB burned {used} CPU ticks (1/100 s) in {window:?} while nothing moved \
         (budget {budget}): a worker spins; stderr tail:\n{}",
        lb.stderr_tail(20)
    );
}

/// The LB's resident memory in KiB (`VmRSS`).
pub fn rss_kib(lb: &Lb) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", lb.pid())).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// Connects to `addr` and resets at once (`SO_LINGER 0`, then close), `n` times, from `threads`
/// threads; stops early at `deadline`. Returns how many connects completed.
pub fn reset_flood(addr: SocketAddr, n: usize, threads: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let per = n.div_ceil(threads);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let mut ok = 0;
                for _ in 0..per {
                    if Instant::now() >= deadline {
                        break;
                    }
                    if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                        let _ = SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .sum()
}

/// Writes to `s` (non-blocking) until nothing more is taken for `quiet`, at most `cap` bytes or
/// 10 s; returns the bytes written. Leaves `s` blocking again.
pub fn fill(s: &mut TcpStream, cap: usize, quiet: Duration) -> usize {
    s.set_nonblocking(true).expect("nonblocking");
    let chunk = [0x61u8; 64 * 1024];
    let (mut total, mut last) = (0, Instant::now());
    let start = Instant::now();
    while total < cap && last.elapsed() < quiet && start.elapsed() < Duration::from_secs(10) {
        match s.write(&chunk[..chunk.len().min(cap - total)]) {
            Ok(n) => {
                total += n;
                last = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(_) => break,
        }
    }
    s.set_nonblocking(false).expect("blocking");
    total
}

/// Reads `s` until EOF or error (bounded by its read timeout and `within`); returns the bytes
/// read and whether it ended in a clean EOF.
pub fn drain(s: &mut TcpStream, within: Duration) -> (u64, bool) {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (total, true),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return (total, false),
        }
    }
    (total, false)
}

/// Waits until `s` is closed by the peer (EOF or reset) within `within`; true if it was.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Half-closes `s`'s write side, ignoring errors (the peer may be gone already).
pub fn half_close(s: &TcpStream) {
    let _ = s.shutdown(Shutdown::Write);
}

/// Waits until `cond` holds, up to `within`; panics with `what` otherwise.
pub fn must(within: Duration, what: &str, cond: impl FnMut() -> bool) {
    assert!(wait_until(within, cond), "{what} (waited {within:?})");
}

/// Like [`start_on`] with the LB's `RLIMIT_NOFILE` (soft and hard) set to `nofile`.
pub fn start_on_with_nofile(io: &str, toml: &str, nofile: u64) -> Lb {
    Lb::start_with(
        toml,
        &[("RINGLB_IO", io), ("RUST_LOG", "info")],
        move |cmd| {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the forked child before exec and only calls
            // setrlimit, which is async-signal-safe, on a value on its own stack.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: nofile,
                        rlim_max: nofile,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    )
}

/// A backend that answers every connection from its accept thread alone (no thread per
/// connection, so tens of thousands of short connections cost nothing): writes `n` and closes.
pub struct QuickCloser {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl QuickCloser {
    pub fn start() -> QuickCloser {
        let l = super::servers::loopback_listener(4096);
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("local_addr");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.write_all(b"n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        QuickCloser {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for QuickCloser {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if let Err(p) = t.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(p);
                }
            }
        }
    }
}
