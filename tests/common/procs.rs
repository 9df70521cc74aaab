//! External programs for the end-to-end tests: free loopback ports, temp dirs and child processes
//! that are cleaned up on drop (even when the test panics), one-shot commands with a deadline,
//! and real peers started on free ports — PostgreSQL clusters (run as the `postgres` user, since
//! PostgreSQL refuses root) and `redis-server` instances.
//!
//! Every child runs in its own process group and the whole group is SIGKILLed on drop; every
//! wait is bounded. A missing tool is a failure that names the package to install, never a skip.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A port that was free on 127.0.0.1 a moment ago (bound to port 0, then released), for servers
/// that need a port number on their command line. Callers retry on a bind race.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A loopback port free for UDP and for TCP a moment ago, for a DNS server (dnsmasq binds both:
/// an ephemeral TCP port of another test once made both attempts of a CI run fail with "Address
/// already in use"). `None` when the TCP side is taken: callers try again.
pub fn free_dns_port() -> Option<u16> {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free udp port")
        .port();
    TcpListener::bind(("127.0.0.1", port)).ok().map(|_| port)
}

/// The path of `tool` on `$PATH`; panics naming the Debian package that provides it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("`{tool}` not found: apt-get install -y {package}"))
}

/// A directory under the system temp dir (world-traversable, so another user can own a child of
/// it), removed with its contents on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(stem: &str) -> TempDir {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("ringlb-{stem}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running child in its own process group, stdout and stderr captured. Drop SIGKILLs the group
/// (if the child has not been reaped yet) and waits for it.
pub struct Proc {
    what: String,
    child: Child,
    status: Option<ExitStatus>,
    group_killed: bool,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Spawns `cmd` (stdin null, stdout/stderr piped) as a process-group leader.
    pub fn spawn(cmd: &mut Command) -> Proc {
        let what = describe(cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().expect("stdout"), out.clone()),
            collect(child.stderr.take().expect("stderr"), err.clone()),
        ];
        Proc {
            what,
            child,
            status: None,
            group_killed: false,
            out,
            err,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The exit status if the child has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits up to `timeout` for the exit; on success returns the status with everything the
    /// child wrote. On timeout kills the group and returns an error carrying the output so far.
    pub fn wait_output(mut self, timeout: Duration) -> Result<Output, String> {
        let deadline = Instant::now() + timeout;
        while self.try_wait().is_none() {
            if Instant::now() >= deadline {
                self.kill_group();
                return Err(format!(
                    "{} still running after {timeout:?}; killed. stdout:\n{}\nstderr:\n{}",
                    self.what,
                    self.stdout_lossy(),
                    self.stderr_lossy()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Joining the readers is bounded: a grandchild holding the pipes is killed with the group.
        self.kill_group();
        self.join_readers();
        Ok(Output {
            status: self.status.expect("exited"),
            stdout: std::mem::take(&mut *self.out.lock().unwrap()),
            stderr: std::mem::take(&mut *self.err.lock().unwrap()),
        })
    }

    pub fn stdout_lossy(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    pub fn stderr_lossy(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    fn kill_group(&mut self) {
        // The group outlives its leader while any member lives (its id cannot be reused then);
        // ESRCH just means it is gone. Once only: later the id may belong to someone else.
        if !std::mem::replace(&mut self.group_killed, true) {
            let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
        }
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group();
        self.join_readers();
    }
}

fn collect(mut r: impl Read + Send + 'static, sink: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                return;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion within `timeout`; Err (with the output) on timeout.
pub fn try_run(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    Proc::spawn(cmd).wait_output(timeout)
}

/// Runs `cmd` to completion within `timeout` and panics unless it exits 0; returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let what = describe(cmd);
    let out = try_run(cmd, timeout).unwrap_or_else(|e| panic!("{e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{what}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

/// The `bin` directory of the newest PostgreSQL under /usr/lib/postgresql.
pub fn pg_bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let entries = std::fs::read_dir(root)
        .unwrap_or_else(|e| panic!("{}: {e}: apt-get install -y postgresql", root.display()));
    entries
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((v, bin))
        })
        .max_by_key(|(v, _)| *v)
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| {
            panic!(
                "no {}/<ver>/bin/pg_ctl: apt-get install -y postgresql",
                root.display()
            )
        })
}

/// uid and gid of a user, from /etc/passwd.
fn user_ids(name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .and_then(|(u, g)| Some((u?, g?)))
        .unwrap_or_else(|| panic!("no user {name:?} in /etc/passwd (installed by postgresql)"))
}

/// A command run as the `postgres` user through `runuser`, with cwd `dir` (which it can enter).
fn as_postgres(program: &Path, dir: &Path) -> Command {
    let mut c = Command::new(require_tool("runuser", "util-linux"));
    c.args(["-u", "postgres", "--"])
        .arg(program)
        .current_dir(dir);
    c
}

/// A PostgreSQL cluster (initdb + pg_ctl) on 127.0.0.1:PORT only, trust authentication, its
/// Unix socket in its own temp dir. Drop stops it (`immediate`), SIGKILLs the postmaster if it
/// is still there, and removes the data dir.
pub struct PgCluster {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    running: bool,
    // Last: removed after the server is gone.
    dir: TempDir,
}

/// How long initdb, pg_ctl start and pg_ctl stop may take.
const PG_TIMEOUT: Duration = Duration::from_secs(60);

impl PgCluster {
    /// initdb and start a cluster with `max_connections`. `fsync` is off: durability is not
    /// what these tests measure, and a slow CI disk should not time them out.
    pub fn start(name: &str, max_connections: u32) -> PgCluster {
        let bin = pg_bin_dir();
        let dir = TempDir::new(&format!("pg-{name}"));
        let (uid, gid) = user_ids("postgres");
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", dir.path().display()));
        let data = dir.path().join("data");
        run_ok(
            as_postgres(&bin.join("initdb"), dir.path())
                .arg("-D")
                .arg(&data)
                .args(["-U", "postgres", "--auth-local=trust", "--auth-host=trust"])
                .args(["-E", "UTF8", "--no-sync"]),
            PG_TIMEOUT,
        );
        let mut pg = PgCluster {
            log: dir.path().join("server.log"),
            bin,
            data,
            port: 0,
            running: false,
            dir,
        };
        // A free port can be taken between the probe and postgres's bind: try a few.
        let mut last = String::new();
        for _ in 0..3 {
            pg.port = free_port();
            let opts = format!(
                "-p {} -c listen_addresses=127.0.0.1 -c max_connections={max_connections} \
                 -c unix_socket_directories={} -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off",
                pg.port,
                pg.dir.path().display()
            );
            let out = try_run(
                as_postgres(&pg.bin.join("pg_ctl"), pg.dir.path())
                    .args(["start", "-w", "-t", "30", "-D"])
                    .arg(&pg.data)
                    .arg("-l")
                    .arg(&pg.log)
                    .args(["-o", &opts]),
                PG_TIMEOUT,
            );
            match out {
                Ok(o) if o.status.success() => {
                    pg.running = true;
                    return pg;
                }
                Ok(o) => {
                    last = format!(
                        "pg_ctl start: {}\n{}{}",
                        o.status,
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    )
                }
                Err(e) => last = e,
            }
            // A failed start may leave a postmaster behind (e.g. pg_ctl timed out).
            pg.force_stop();
        }
        panic!(
            "PostgreSQL cluster {name} did not start: {last}\nserver log:\n{}",
            pg.log_tail(30)
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `pg_ctl stop -m fast -w`: sessions are terminated, then the server exits; panics unless
    /// it has stopped.
    pub fn stop_fast(&mut self) {
        run_ok(
            as_postgres(&self.bin.join("pg_ctl"), self.dir.path())
                .args(["stop", "-m", "fast", "-w", "-t", "30", "-D"])
                .arg(&self.data),
            PG_TIMEOUT,
        );
        self.running = false;
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), n)
    }

    /// Stops the server however it can: `pg_ctl stop -m immediate`, then SIGKILL to the
    /// postmaster named in postmaster.pid (its children exit when it dies). Never panics.
    fn force_stop(&mut self) {
        let pidfile = self.data.join("postmaster.pid");
        if pidfile.exists() {
            let _ = try_run(
                as_postgres(&self.bin.join("pg_ctl"), self.dir.path())
                    .args(["stop", "-m", "immediate", "-w", "-t", "10", "-D"])
                    .arg(&self.data),
                Duration::from_secs(15),
            );
        }
        let pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<i32>().ok());
        if let Some(pid) = pid.filter(|p| *p > 0) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while kill(Pid::from_raw(pid), None).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.running = false;
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.force_stop();
        if std::thread::panicking() {
            eprintln!(
                "--- postgres on port {} log tail ---\n{}",
                self.port,
                self.log_tail(20)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A `redis-server` child on 127.0.0.1:PORT, no persistence, logging to its captured stdout.
pub struct RedisServer {
    port: u16,
    proc: Proc,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts it and waits (up to 10 s) until it answers `PING` directly.
    pub fn start(name: &str) -> RedisServer {
        let exe = require_tool("redis-server", "redis-server");
        let dir = TempDir::new(&format!("redis-{name}"));
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let mut p = Proc::spawn(
                Command::new(&exe)
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                    .args(["--logfile", ""])
                    .arg("--dir")
                    .arg(dir.path())
                    .current_dir(dir.path()),
            );
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && p.try_wait().is_none() {
                if redis_ping(addr).is_ok() {
                    return RedisServer {
                        port,
                        proc: p,
                        _dir: dir,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let status = p.try_wait();
            last = format!(
                "{} (exit {status:?}):\n{}",
                p.what(),
                tail(&p.stdout_lossy(), 20)
            );
        }
        panic!("redis-server {name} did not answer PING: {last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's own log so far.
    pub fn log(&self) -> String {
        self.proc.stdout_lossy()
    }
}

/// Sends `PING` on a fresh connection and expects `+PONG`.
pub fn redis_ping(addr: SocketAddr) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf)?;
    if &buf != b"+PONG\r\n" {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("PING answered {:?}", String::from_utf8_lossy(&buf)),
        ));
    }
    Ok(())
}
