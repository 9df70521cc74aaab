//! systemd integration through the real binary: sd_notify messages captured on a unix datagram
//! socket the test binds and passes as `NOTIFY_SOCKET` (path and abstract forms): `READY=1`
//! after start, `RELOADING=1` (with `MONOTONIC_USEC`) then `READY=1` around a SIGHUP reload,
//! `STOPPING=1` on SIGTERM, `WATCHDOG=1` at half `WATCHDOG_USEC` (and none when `WATCHDOG_PID`
//! names another process). deploy/ringlb.service: `systemd-analyze verify` accepts it, and the
//! syscalls, socket families, writes and memory mappings ringlb makes under strace fit its
//! `SystemCallFilter`, `RestrictAddressFamilies`, `ProtectSystem` and `MemoryDenyWriteExecute`.

mod common;

use std::collections::BTreeSet;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::ops::{log_line_since, reload_ok};
use common::*;
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(5);

/// A datagram socket standing in for systemd's notify socket.
struct NotifySocket {
    socket: UnixDatagram,
    path: Option<PathBuf>,
    /// What `NOTIFY_SOCKET` must say.
    env: String,
}

impl NotifySocket {
    fn path(stem: &str) -> NotifySocket {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{stem}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        let env = path.to_str().expect("utf-8").to_string();
        NotifySocket {
            socket,
            path: Some(path),
            env,
        }
    }

    fn abstract_name(stem: &str) -> NotifySocket {
        let name = format!("{stem}-{}", std::process::id());
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket");
        NotifySocket {
            socket,
            path: None,
            env: format!("@{name}"),
        }
    }

    /// The next message within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = self.socket.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Messages until one satisfies `want` (returned), skipping `WATCHDOG=1` pings; panics after
    /// `timeout` naming what did arrive.
    fn expect(&self, what: &str, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(m) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            if want(&m) {
                return m;
            }
            if m != "WATCHDOG=1" {
                seen.push(m);
            }
        }
        panic!("no {what} within {timeout:?}; other messages: {seen:?}");
    }

    /// Counts `WATCHDOG=1` messages for `window`; any other message fails the test.
    fn count_watchdog(&self, window: Duration) -> usize {
        let deadline = Instant::now() + window;
        let mut n = 0;
        while let Some(m) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            assert_eq!(m, "WATCHDOG=1", "unexpected message while counting pings");
            n += 1;
            if Instant::now() >= deadline {
                break;
            }
        }
        n
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

#[test]
fn ready_reloading_stopping_and_watchdog_reach_the_notify_socket() {
    let notify = NotifySocket::path("ringlb-notify");
    let echo = EchoServer::start();
    let toml = ringlb_config([listener("web").backend(echo.addr())]);
    // 400 ms: pings every 200 ms.
    let mut lb = Lb::start_with_env(
        &toml,
        &[
            ("RUST_LOG", "info"),
            ("NOTIFY_SOCKET", &notify.env),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let ready = notify.expect("READY=1", WAIT, |m| field(m, "READY") == Some("1"));
    assert!(
        field(&ready, "STATUS").is_some_and(|s| s.starts_with("ready: 1 listener(s)")),
        "{ready:?}"
    );
    echo_through(&lb);

    // Watchdog: one ping per 200 ms while the workers tick. Bounds are loose (shared cores):
    // what matters is that pings come repeatedly and not in a flood.
    let pings = notify.count_watchdog(Duration::from_secs(2));
    assert!(
        (4..=20).contains(&pings),
        "{pings} WATCHDOG=1 in 2 s at a 200 ms period"
    );

    // A SIGHUP reload: RELOADING=1 with a CLOCK_MONOTONIC timestamp, then READY=1.
    let before = monotonic_usec();
    reload_ok(&lb, &toml);
    let reloading = notify.expect("RELOADING=1", WAIT, |m| field(m, "RELOADING") == Some("1"));
    let usec: u64 = field(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MONOTONIC_USEC in {reloading:?}"));
    assert!(
        usec >= before && usec <= monotonic_usec(),
        "MONOTONIC_USEC {usec} is CLOCK_MONOTONIC (between {before} and now)"
    );
    notify.expect("READY=1 after the reload", WAIT, |m| {
        field(m, "READY") == Some("1")
    });
    echo_through(&lb);

    // A reload of a broken file is refused, and still ends with READY=1.
    let mark = lb.log_len();
    std::fs::write(lb.config_path(), "[[listeners]]\nname = 1\n").expect("rewrite config");
    lb.signal(Signal::SIGHUP);
    log_line_since(&lb, mark, "failed, still running", WAIT);
    notify.expect("RELOADING=1", WAIT, |m| field(m, "RELOADING") == Some("1"));
    let after_bad = notify.expect("READY=1 after a refused reload", WAIT, |m| {
        field(m, "READY") == Some("1")
    });
    assert!(
        field(&after_bad, "STATUS").is_some_and(|s| s.contains("reload failed")),
        "{after_bad:?}"
    );

    lb.signal(Signal::SIGTERM);
    let stopping = notify.expect("STOPPING=1", WAIT, |m| field(m, "STOPPING") == Some("1"));
    assert!(stopping.contains("SIGTERM"), "{stopping:?}");
    assert!(lb.wait_exit(WAIT).is_some_and(|st| st.success()));
}

fn echo_through(lb: &Lb) {
    let mut s = connect(lb.addr("web"));
    try_echo_stream(&mut s, 256, 0x0b5e_55ed).expect("echo through the LB");
}

#[test]
fn an_abstract_notify_socket_works_and_a_foreign_watchdog_pid_is_ignored() {
    let notify = NotifySocket::abstract_name("ringlb-notify-abstract");
    let echo = EchoServer::start();
    // WATCHDOG_PID names another process (pid 1): the watchdog is not ours to feed.
    let mut lb = Lb::start_with_env(
        &ringlb_config([listener("web").backend(echo.addr())]),
        &[
            ("NOTIFY_SOCKET", &notify.env),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    notify.expect("READY=1", WAIT, |m| field(m, "READY") == Some("1"));
    assert_eq!(
        notify.count_watchdog(Duration::from_millis(1500)),
        0,
        "no WATCHDOG=1 for a watchdog meant for another pid"
    );
    lb.signal(Signal::SIGINT);
    notify.expect("STOPPING=1", WAIT, |m| field(m, "STOPPING") == Some("1"));
    assert!(lb.wait_exit(WAIT).is_some());
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/ringlb.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The unit's `Key=value` settings (comments and sections dropped), in order.
fn settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('[') && l.contains('='))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn the_unit_says_what_the_package_promises() {
    let unit = unit_text();
    let set = settings(&unit);
    let get = |k: &str| {
        set.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {k}= in deploy/ringlb.service"))
    };
    assert_eq!(get("Type"), "notify");
    assert_eq!(get("NotifyAccess"), "all");
    assert_eq!(
        get("ExecStart"),
        "/usr/bin/ringlb run --config /etc/ringlb/ringlb.toml"
    );
    assert_eq!(get("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(get("User"), "ringlb");
    assert_eq!(get("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(get("RuntimeDirectory"), "ringlb");
    assert_eq!(get("RestrictAddressFamilies"), "AF_INET AF_INET6 AF_UNIX");
    assert!(get("WatchdogSec").ends_with('s'));
    // 2 fds per connection at the default max_connections, with room for pipes and UDP flows.
    let nofile: u64 = get("LimitNOFILE").parse().expect("a number");
    assert!(nofile >= 2 * 100_000, "LimitNOFILE={nofile}");
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if !have("systemd-analyze") {
        eprintln!("skipping: systemd-analyze is not installed (.ci/run installs systemd)");
        return;
    }
    // verify checks that ExecStart's binary exists and that man:ringlb(1) resolves: point the
    // first at the binary under test, and drop the man reference (the package test in .ci/run
    // verifies the installed unit as shipped).
    let unit = unit_text()
        .replace("/usr/bin/ringlb", ringlb_bin())
        .replace("Documentation=man:ringlb(1) ", "Documentation=");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("ringlb.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Names listed by `systemd-analyze syscall-filter GROUP`, groups expanded.
fn syscall_group(group: &str, out: &mut BTreeSet<String>) {
    let o = Command::new("systemd-analyze")
        .args(["syscall-filter", "--no-pager", group])
        .output()
        .expect("systemd-analyze syscall-filter");
    assert!(o.status.success(), "syscall-filter {group}");
    for line in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.starts_with('@') {
            syscall_group(name, out);
        } else {
            out.insert(name.to_string());
        }
    }
}

/// The syscalls `SystemCallFilter=` lines allow: the union of the allow lists minus the `~`
/// deny lists.
fn allowed_syscalls(unit: &str) -> BTreeSet<String> {
    let (mut allow, mut deny) = (BTreeSet::new(), BTreeSet::new());
    for (k, v) in settings(unit) {
        if k != "SystemCallFilter" {
            continue;
        }
        let (list, set) = match v.strip_prefix('~') {
            Some(rest) => (rest.to_string(), &mut deny),
            None => (v.clone(), &mut allow),
        };
        for item in list.split_whitespace() {
            if item.starts_with('@') {
                syscall_group(item, set);
            } else {
                set.insert(item.to_string());
            }
        }
    }
    allow.difference(&deny).cloned().collect()
}

/// Runs ringlb under `strace -f` through start, traffic, a reload, SIGUSR1 (with a file access
/// log) and a SIGTERM drain, and checks what it did against the unit's sandbox.
#[test]
fn what_ringlb_does_fits_the_units_sandbox() {
    if !have("strace") || !have("systemd-analyze") {
        eprintln!("skipping: needs strace and systemd-analyze (.ci/run installs both)");
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("strace-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let trace = dir.join("trace");
    let access = dir.join("access.log");
    let notify = NotifySocket::path("ringlb-strace-notify");
    let echo = EchoServer::start();
    let toml = format!(
        "{}\n[log]\naccess_log = \"{}\"\n",
        ringlb_config([
            listener("web")
                .backend(echo.addr())
                .set("access_log", "true"),
            listener("dns")
                .set("protocol", "\"udp\"")
                .backend(echo.addr()),
        ]),
        access.display()
    );
    let config = TempFile::new("ringlb-strace", "toml", &toml);
    let mut child = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .arg(ringlb_bin())
        .args(["run", "--config"])
        .arg(config.path())
        .env("NOTIFY_SOCKET", &notify.env)
        .env("WATCHDOG_USEC", "200000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn strace");
    let stderr = child.stderr.take().expect("stderr");
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = line_tx.send(line);
        }
    });
    let pid_of_ringlb = || -> Option<i32> {
        // strace's child: the process whose parent is strace.
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id())).ok()?;
        children.split_whitespace().next()?.parse().ok()
    };
    // (expect skips other messages and panics with them if READY=1 never comes.)
    notify.expect("READY=1 under strace", Duration::from_secs(20), |m| {
        field(m, "READY") == Some("1")
    });
    let pid = nix::unistd::Pid::from_raw(pid_of_ringlb().expect("ringlb's pid"));
    let needle = "listener \"web\" listening on ";
    let web: std::net::SocketAddr = loop {
        let line = line_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("ringlb's `listening on` line");
        if let Some(i) = line.find(needle) {
            let token = line[i + needle.len()..]
                .split_whitespace()
                .next()
                .unwrap_or("");
            break token.parse().expect("listening address");
        }
    };
    let mut s = connect(web);
    try_echo_stream(&mut s, 4096, 7).expect("echo under strace");
    drop(s);
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(pid, Signal::SIGHUP).expect("SIGHUP");
    notify.expect("READY=1 after reload", Duration::from_secs(10), |m| {
        m.starts_with("READY=1")
    });
    nix::sys::signal::kill(pid, Signal::SIGUSR1).expect("SIGUSR1");
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "ringlb under strace did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    reader.join().expect("stderr reader");
    let text = std::fs::read_to_string(&trace).expect("strace output");
    let _ = std::fs::remove_dir_all(&dir);

    // Every syscall made is allowed by SystemCallFilter.
    let allowed = allowed_syscalls(&unit_text());
    assert!(allowed.contains("io_uring_setup") && allowed.contains("io_uring_enter"));
    let mut used = BTreeSet::new();
    for line in text.lines() {
        // "PID name(args) = ret", "PID <... name resumed>...", "PID +++ exited ..."
        let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
        let rest = rest.strip_prefix("<... ").unwrap_or(rest);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty()
            && rest[name.len()..].starts_with(['(', ' '])
            && !rest.starts_with("+++")
        {
            used.insert(name);
        }
    }
    // strace's own exec of ringlb; execve is in @system-service anyway.
    used.remove("execve");
    // The backend the suite runs (RINGLB_IO; io_uring where it is allowed): its syscalls
    // must be in the trace, so the filter is checked against each backend in its run.
    let want = match std::env::var("RINGLB_IO").as_deref() {
        Ok("epoll") => "epoll_wait",
        _ => "io_uring_setup",
    };
    assert!(
        used.contains(want),
        "the trace saw the I/O backend ({want}): {used:?}"
    );
    let refused: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        refused.is_empty(),
        "syscalls the unit's filter refuses: {refused:?}"
    );

    // Socket families: only AF_INET, AF_INET6, AF_UNIX.
    for line in text
        .lines()
        .filter(|l| l.contains(" socket(") || l.contains(" socketpair("))
    {
        assert!(
            ["AF_INET,", "AF_INET6,", "AF_UNIX,"]
                .iter()
                .any(|f| line.contains(f)),
            "socket family outside RestrictAddressFamilies: {line}"
        );
    }
    // ProtectSystem=strict: the only file opened for writing is the access log.
    for line in text.lines().filter(|l| l.contains("open")) {
        if ["O_WRONLY", "O_RDWR", "O_CREAT"]
            .iter()
            .any(|f| line.contains(f))
        {
            assert!(
                line.contains("access.log"),
                "a write outside the access log: {line}"
            );
        }
    }
    // MemoryDenyWriteExecute: no writable and executable mapping.
    for line in text
        .lines()
        .filter(|l| l.contains("mmap(") || l.contains("mprotect("))
    {
        assert!(
            !(line.contains("PROT_WRITE") && line.contains("PROT_EXEC")),
            "W+X mapping: {line}"
        );
    }
}
