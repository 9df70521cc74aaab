//! What an operator sees at start when the address is the problem: a privileged port without
//! `CAP_NET_BIND_SERVICE` says so (the real binary with that capability dropped from its
//! bounding set before exec), and a second ringlb on a port another process already holds with
//! `SO_REUSEPORT` warns that the kernel will split the traffic (TCP and UDP), while a restart on
//! a port that only has TIME_WAIT connections left does not. A `[::]` listener is IPv6 only.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ops::with_bind;
use common::*;
use nix::sys::signal::Signal;

const WAIT: Duration = Duration::from_secs(10);

/// Linux's number for CAP_NET_BIND_SERVICE (linux/capability.h).
const CAP_NET_BIND_SERVICE: libc::c_ulong = 10;

#[test]
fn a_privileged_port_without_the_capability_names_it() {
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    if start <= 443 {
        eprintln!(
            "skipping: net.ipv4.ip_unprivileged_port_start is {start}: port 443 needs no \
             capability here"
        );
        return;
    }
    // 443 is never bound: without the capability the bind fails before anything listens.
    let toml = on(
        "https",
        "tcp",
        "127.0.0.1:443".parse().unwrap(),
        dead_addr(),
    );
    let config = TempFile::new("ringlb-privport", "toml", &toml);
    let mut cmd = Command::new(ringlb_bin());
    cmd.args(["run", "--config"])
        .arg(config.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec and only calls prctl, which is
    // async-signal-safe; no memory is shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            // Root keeps only what the bounding set allows across exec. Without CAP_SETPCAP
            // (not root) the drop fails, and the child lacks the capability anyway.
            let rc = libc::prctl(libc::PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE, 0, 0, 0);
            if rc != 0 && libc::geteuid() == 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn ringlb");
    let out = wait_output(child, WAIT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit 1 (runtime failure): {stderr}"
    );
    // The error is one line (other lines may be warnings, e.g. about the fd limit).
    let line = stderr
        .lines()
        .find(|l| l.contains("cannot bind"))
        .unwrap_or_else(|| panic!("no bind error in: {stderr}"));
    for want in [
        "error: listener \"https\": cannot bind 127.0.0.1:443",
        "Permission denied",
        "CAP_NET_BIND_SERVICE",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "setcap cap_net_bind_service=+ep",
    ] {
        assert!(line.contains(want), "no {want:?} in: {line}");
    }
}

fn wait_output(mut child: std::process::Child, timeout: Duration) -> std::process::Output {
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("ringlb still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("output")
}

const SHARED: &str = "is already bound by another process with SO_REUSEPORT";

/// A config with one listener named `name` on `bind` (protocol `proto`).
fn on(name: &str, proto: &str, bind: SocketAddr, backend: SocketAddr) -> String {
    let toml = ringlb_config([listener(name)
        .set("protocol", &format!("\"{proto}\""))
        .backend(backend)]);
    with_bind(&toml, name, &bind.to_string())
}

#[test]
fn a_second_ringlb_on_the_same_port_is_warned_about() {
    let echo = EchoServer::start();
    for proto in ["tcp", "udp"] {
        let first = Lb::start(&ringlb_config([listener("one")
            .set("protocol", &format!("\"{proto}\""))
            .backend(echo.addr())]));
        let addr = first.addr("one");
        assert!(
            !first.stderr_lines().iter().any(|l| l.contains(SHARED)),
            "{proto}: the first one has nothing to warn about:\n{}",
            first.stderr_tail(20)
        );
        let second = Lb::start(&on("two", proto, addr, echo.addr()));
        let warning = second
            .stderr_lines()
            .into_iter()
            .find(|l| l.contains(SHARED))
            .unwrap_or_else(|| {
                panic!(
                    "{proto}: no warning about {addr}; stderr:\n{}",
                    second.stderr_tail(20)
                )
            });
        assert!(
            warning.contains(&format!("listener \"two\": {proto} {addr} "))
                && warning.contains("WARN"),
            "{warning}"
        );
    }
}

#[test]
fn a_restart_on_a_port_with_time_wait_connections_does_not_warn() {
    // The backend closes first, so ringlb closes the client side first: its accepted sockets
    // (local port = the listening port) go to TIME_WAIT.
    let sender = SenderThenClose::start(1000, 3);
    let mut first = Lb::start(&ringlb_config([listener("web").backend(sender.addr())]));
    let addr = first.addr("web");
    for _ in 0..3 {
        let mut s = connect(addr);
        recv_to_eof(&mut s).expect("payload then EOF");
    }
    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit(WAIT).is_some_and(|st| st.success()));
    let second = Lb::start(&on("web", "tcp", addr, sender.addr()));
    assert_eq!(second.addr("web"), addr);
    assert!(
        !second.stderr_lines().iter().any(|l| l.contains(SHARED)),
        "TIME_WAIT connections are not another process:\n{}",
        second.stderr_tail(20)
    );
}

/// `bind = "[::]:PORT"` listens on IPv6 only (`IPV6_V6ONLY`, as README and config/ringlb.toml
/// say): `[::1]` reaches the backend, `127.0.0.1` on the same port is refused.
#[test]
fn a_wildcard_ipv6_listener_is_ipv6_only() {
    let echo_server = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("v6")
        .bind("[::]:0")
        .backend(echo_server.addr())]));
    let port = lb.addr("v6").port();
    echo(
        SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], port)),
        100,
        0x1f6_0001,
    );
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    match std::net::TcpStream::connect_timeout(&v4, Duration::from_secs(2)) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{v4}: {e}"),
        Ok(_) => panic!("{v4} was accepted: the [::] listener is not IPv6 only"),
    }
}
