//! Runs the real `ringlb` binary: as a long-lived load balancer ([`Lb`]) whose stderr is captured
//! and parsed for bound addresses, or as a one-shot command ([`run_ringlb`]) with a deadline.
//! Also owns temp config files.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::servers::wait_until;

/// How long [`Lb::start`] waits for the `ready:` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Path of the binary under test, built by cargo for integration tests.
pub fn ringlb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ringlb")
}

/// A file with unique name under cargo's per-target temp dir, removed on drop.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    pub fn new(stem: &str, ext: &str, contents: &str) -> TempFile {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let path = dir.join(format!("{stem}-{}-{n}.{ext}", std::process::id()));
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        TempFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs `ringlb args...` to completion with a deadline; kills it and panics past the deadline.
pub fn run_ringlb(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(ringlb_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringlb");
    let out = drain_on_thread(child.stdout.take().expect("stdout"));
    let err = drain_on_thread(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().expect("stderr reader");
            panic!(
                "ringlb {args:?} still running after {timeout:?}; killed. stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn drain_on_thread(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// A running `ringlb run --config F`. Killed (SIGKILL) on drop if still running; if the test is
/// panicking, drop also prints the tail of the LB's stderr.
pub struct Lb {
    child: Child,
    status: Option<ExitStatus>,
    config: TempFile,
    workers: usize,
    listeners: HashMap<String, SocketAddr>,
    lines: Arc<Mutex<Vec<String>>>,
    /// One message per stderr line; disconnected once stderr reaches EOF.
    line_rx: Mutex<Receiver<()>>,
    reader: Option<JoinHandle<()>>,
}

impl Lb {
    /// Starts ringlb on `toml` with `RUST_LOG=info` (or `$RINGLB_TEST_RUST_LOG`) and waits for
    /// `ready:`.
    pub fn start(toml: &str) -> Lb {
        let level = std::env::var("RINGLB_TEST_RUST_LOG").unwrap_or_else(|_| "info".into());
        Lb::start_with_env(toml, &[("RUST_LOG", &level)])
    }

    /// Like [`Lb::start`] with extra environment variables (e.g. `RUST_LOG=debug`).
    pub fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Lb {
        Lb::start_with(toml, env, |_| {})
    }

    /// Like [`Lb::start`], with the process's `RLIMIT_NOFILE` (soft and hard) set to `nofile`
    /// before it starts (for resource-exhaustion tests).
    pub fn start_with_nofile(toml: &str, nofile: u64) -> Lb {
        Lb::start_with(toml, &[], |cmd| {
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
        })
    }

    /// Like [`Lb::start_with_env`], letting `prepare` adjust the command first (a `pre_exec`,
    /// say) and waiting for `ready:`.
    pub fn start_with(toml: &str, env: &[(&str, &str)], prepare: impl FnOnce(&mut Command)) -> Lb {
        Lb::try_start_with(toml, env, prepare).unwrap_or_else(|(status, stderr)| {
            panic!(
                "ringlb did not log `ready:` within {READY_TIMEOUT:?} (exit status: \
                 {status:?}); config:\n{toml}\nstderr:\n{stderr}"
            )
        })
    }

    /// Like [`Lb::start_with`]; Err((exit status, stderr)) if it never gets ready.
    pub fn try_start_with(
        toml: &str,
        env: &[(&str, &str)],
        prepare: impl FnOnce(&mut Command),
    ) -> Result<Lb, (Option<ExitStatus>, String)> {
        let config = TempFile::new("ringlb-test", "toml", toml);
        let mut cmd = Command::new(ringlb_bin());
        cmd.arg("run")
            .arg("--config")
            .arg(config.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        prepare(&mut cmd);
        let mut child = cmd.spawn().expect("spawn ringlb run");
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, line_rx) = mpsc::channel();
        let sink = lines.clone();
        let reader = std::thread::Builder::new()
            .name(format!("ringlb-{}-stderr", child.id()))
            .spawn(move || {
                let mut r = BufReader::new(stderr);
                let mut buf = Vec::new();
                while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    sink.lock().unwrap().push(line);
                    let _ = tx.send(());
                    buf.clear();
                }
            })
            .expect("spawn stderr reader");
        let mut lb = Lb {
            child,
            status: None,
            workers: workers_of(toml),
            config,
            listeners: HashMap::new(),
            lines,
            line_rx: Mutex::new(line_rx),
            reader: Some(reader),
        };
        if !lb.wait_for_log("ready:", READY_TIMEOUT) {
            let status = lb.wait_exit(Duration::from_secs(1));
            return Err((status, lb.stderr_lines().join("\n")));
        }
        for line in lb.stderr_lines() {
            if let Some((name, addr)) = parse_listening(&line) {
                lb.listeners.insert(name, addr);
            }
        }
        Ok(lb)
    }

    /// The address listener `name` actually bound (from its `listening on` line).
    pub fn addr(&self, name: &str) -> SocketAddr {
        match self.listeners.get(name) {
            Some(a) => *a,
            None => panic!(
                "no `listener \"{name}\" listening on ADDR` line; stderr:\n{}",
                self.stderr_lines().join("\n")
            ),
        }
    }

    /// The admin endpoint's address, from its `admin endpoint on http://ADDR` line.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.stderr_lines().iter().find_map(|l| {
            let rest =
                &l[l.find("admin endpoint on http://")? + "admin endpoint on http://".len()..];
            rest.split(|c: char| c.is_whitespace() || c == '/')
                .next()?
                .parse()
                .ok()
        })
    }

    /// The admin endpoint's unix socket, from its `admin endpoint on unix:PATH` line.
    pub fn admin_unix(&self) -> Option<PathBuf> {
        self.stderr_lines().iter().find_map(|l| {
            let rest = &l[l.find("admin endpoint on unix:")? + "admin endpoint on unix:".len()..];
            Some(PathBuf::from(rest.split_whitespace().next()?))
        })
    }

    /// Whether ringlb said its admin endpoint is off (`admin.bind = "none"`).
    pub fn admin_off(&self) -> bool {
        self.stderr_lines()
            .iter()
            .any(|l| l.contains("admin endpoint off"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `runtime.workers` as written in the config.
    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn config_path(&self) -> &Path {
        self.config.path()
    }

    /// Every stderr line so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Number of stderr lines so far: a mark for [`Lb::wait_for_log_since`].
    pub fn log_len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits until some stderr line (logged at any time, before the call included) contains
    /// `needle`; false on timeout or once stderr is closed without one.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_since(0, needle, timeout)
    }

    /// Like [`Lb::wait_for_log`], looking only at lines from index `since` on (a
    /// [`Lb::log_len`] taken before the action whose log line is awaited).
    pub fn wait_for_log_since(&self, since: usize, needle: &str, timeout: Duration) -> bool {
        let found = || {
            let lines = self.lines.lock().unwrap();
            lines.iter().skip(since).any(|l| l.contains(needle))
        };
        let deadline = Instant::now() + timeout;
        loop {
            if found() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let got = self.line_rx.lock().unwrap().recv_timeout(left);
            match got {
                Ok(()) => {}
                Err(RecvTimeoutError::Timeout) => return false,
                Err(RecvTimeoutError::Disconnected) => return found(),
            }
        }
    }

    pub fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(self.pid() as i32);
        kill(pid, sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(st) = self.child.try_wait().expect("try_wait") {
                    self.status = Some(st);
                    self.join_reader();
                    break;
                }
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.status
    }

    /// Like [`Lb::wait_exit`], without waiting for stderr to end: after a binary upgrade the new
    /// process still writes to it.
    pub fn wait_exit_only(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.status = Some(st);
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.status
    }

    /// Counts of `socket:` and `pipe:` entries in /proc/PID/fd.
    pub fn fd_counts(&self) -> (usize, usize) {
        let dir = format!("/proc/{}/fd", self.pid());
        let (mut sockets, mut pipes) = (0, 0);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {dir}: {e}"));
        for e in entries.flatten() {
            // An fd can close between readdir and readlink; it is simply not counted.
            if let Ok(target) = std::fs::read_link(e.path()) {
                let t = target.to_string_lossy();
                if t.starts_with("socket:") {
                    sockets += 1;
                } else if t.starts_with("pipe:") {
                    pipes += 1;
                }
            }
        }
        (sockets, pipes)
    }

    /// Most pipe fds the LB may legitimately hold: per worker, a pool of 64 idle pipe pairs
    /// plus as many in use (2 fds each).
    pub fn max_pipe_fds(&self) -> usize {
        2 * 2 * 64 * self.workers
    }

    /// Waits until the LB holds exactly `baseline` sockets, then checks the pipe bound. Panics
    /// with both counts and the stderr tail if either does not hold within `timeout`.
    pub fn assert_fds_return(&self, baseline_sockets: usize, timeout: Duration) {
        let mut last = (0, 0);
        let ok = wait_until(timeout, || {
            last = self.fd_counts();
            last.0 == baseline_sockets
        });
        assert!(
            ok,
            "LB socket fds did not return to baseline {baseline_sockets} within {timeout:?}: \
             {} sockets, {} pipes now; stderr tail:\n{}",
            last.0,
            last.1,
            self.stderr_tail(20)
        );
        assert!(
            last.1 <= self.max_pipe_fds(),
            "LB holds {} pipe fds, more than the pool bound {}",
            last.1,
            self.max_pipe_fds()
        );
    }

    /// The last `n` stderr lines, joined.
    pub fn stderr_tail(&self, n: usize) -> String {
        let lines = self.stderr_lines();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            if let Err(p) = r.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(p);
                }
            }
        }
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
        self.join_reader();
        if std::thread::panicking() {
            eprintln!(
                "--- ringlb pid {} ({:?}) stderr tail ---\n{}",
                self.child.id(),
                self.status,
                self.stderr_tail(40)
            );
        }
    }
}

/// Parses `... listener "NAME" listening on ADDR ...`.
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = &line[line.find("listener \"")? + "listener \"".len()..];
    let (name, rest) = rest.split_once('"')?;
    let rest = rest.trim_start().strip_prefix("listening on ")?;
    let token = rest.split_whitespace().next()?;
    let token = token.trim_end_matches([',', ';', ')', '.']);
    Some((name.to_string(), token.parse().ok()?))
}

/// `workers = N` from the config text; 1 if absent.
fn workers_of(toml: &str) -> usize {
    toml.lines()
        .filter_map(|l| l.trim().strip_prefix("workers"))
        .filter_map(|r| r.trim_start().strip_prefix('='))
        .find_map(|v| v.trim().parse().ok())
        .unwrap_or(1)
}

/// Raises this process's soft `RLIMIT_NOFILE` to the hard limit (tests with many sockets hold
/// both ends of every connection).
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_lines() {
        let l = "[2025 INFO ringlb::runtime] listener \"web\" listening on 127.0.0.1:4321 (tcp)";
        assert_eq!(
            parse_listening(l),
            Some(("web".to_string(), "127.0.0.1:4321".parse().unwrap()))
        );
        assert_eq!(parse_listening("listener \"x\" stopped"), None);
        assert_eq!(workers_of("[runtime]\nworkers = 2\n"), 2);
    }
}
