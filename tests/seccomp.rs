//! ringlb where io_uring is blocked, the way containers block it: a seccomp filter (built with
//! `seccompiler`, installed in the child between fork and exec) makes `io_uring_setup`,
//! `io_uring_enter` and `io_uring_register` fail with EPERM (Docker ≥ 25, containerd ≥ 2.0,
//! Kubernetes `RuntimeDefault`) or ENOSYS (a kernel without io_uring, or a profile that hides it).
//!
//! With `io = "auto"` the real binary must say why it chose epoll and then serve TCP and UDP;
//! with `io = "io_uring"` it must exit 1 with the same reason. The filter is what the kernel
//! enforces, so these tests run the same whatever `RINGLB_IO` the suite was started with (it is
//! removed from the child's environment).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use common::admin::{http_get, metric, scrape};
use common::config::LbConfig;
use common::udp::{udp_listener, UdpClient, UdpEcho};
use common::*;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// A filter that fails the three io_uring syscalls with `errno` and allows everything else.
fn io_uring_blocked(errno: i32) -> BpfProgram {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = [
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    let arch: TargetArch = std::env::consts::ARCH
        .try_into()
        .expect("seccompiler supports this architecture");
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )
    .and_then(BpfProgram::try_from)
    .expect("build seccomp filter")
}

/// Installs `filter` in the child after fork, before exec, and drops `RINGLB_IO`.
fn under(filter: BpfProgram) -> impl FnOnce(&mut Command) {
    move |cmd: &mut Command| {
        cmd.env_remove("RINGLB_IO").env_remove("RINGLB_IO_DISABLE");
        // SAFETY: the closure runs in the forked child before exec; apply_filter makes two
        // syscalls (prctl, seccomp) on the program built before the fork, which this closure
        // owns, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || seccompiler::apply_filter(&filter).map_err(std::io::Error::other));
        }
    }
}

fn config(
    io: &str,
    tcp_backend: std::net::SocketAddr,
    udp_backend: std::net::SocketAddr,
) -> String {
    LbConfig::default()
        .runtime_field("io", &format!("\"{io}\""))
        .listener(listener("t").backend(tcp_backend))
        .listener(udp_listener("u").backend(udp_backend))
        .to_toml()
}

fn io_line(lb: &Lb) -> String {
    lb.stderr_lines()
        .into_iter()
        .find(|l| l.contains(" io: "))
        .unwrap_or_else(|| panic!("no `io:` line; stderr:\n{}", lb.stderr_tail(20)))
}

/// Serves TCP (echo through the LB) and UDP (an exchange through the LB).
fn assert_serves(lb: &Lb, tcp_clients: usize) {
    for i in 0..tcp_clients {
        let mut s = TcpStream::connect(lb.addr("t")).expect("connect through ringlb");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let msg = format!("hello {i} through epoll");
        s.write_all(msg.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read echo");
        assert_eq!(back, msg.as_bytes(), "client {i}: echo through ringlb");
    }
    for i in 0..4u8 {
        let c = UdpClient::bind(Ipv4Addr::new(127, 0, 87, 10 + i));
        let name = c.exchange(
            lb.addr("u"),
            format!("dgram {i}").as_bytes(),
            Duration::from_secs(2),
        );
        assert_eq!(name, "u1", "udp client {i}: reply from the one backend");
    }
}

#[test]
fn auto_falls_back_to_epoll_when_seccomp_denies_io_uring() {
    let (echo, udp) = (EchoServer::start(), UdpEcho::start("u1"));
    let lb = Lb::start_with(
        &config("auto", echo.addr(), udp.addr()),
        &[],
        under(io_uring_blocked(libc::EPERM)),
    );
    let line = io_line(&lb);
    assert!(
        line.contains("io: epoll (io_uring_setup: Operation not permitted")
            && line.contains("seccomp"),
        "io line names epoll and the seccomp reason: {line}"
    );
    assert_serves(&lb, 20);
    assert_eq!(echo.accepted(), 20, "every TCP client reached the backend");

    let admin = lb.admin_addr().expect("admin endpoint");
    let s = scrape(admin);
    assert_eq!(
        metric(&s, "ringlb_io_backend_info", &[("backend", "epoll")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&s, "ringlb_io_backend_info", &[("backend", "io_uring")]),
        None
    );
    let (code, status) = http_get(admin, "/status");
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&status).expect("/status is JSON");
    assert_eq!(
        status["io"]["backend"], "epoll",
        "/status names the backend: {status}"
    );
    assert!(
        status["io"]["line"]
            .as_str()
            .is_some_and(|l| l.contains("seccomp")),
        "/status says why: {status}"
    );
}

#[test]
fn auto_falls_back_to_epoll_when_io_uring_is_missing() {
    let (echo, udp) = (EchoServer::start(), UdpEcho::start("u1"));
    let lb = Lb::start_with(
        &config("auto", echo.addr(), udp.addr()),
        &[],
        under(io_uring_blocked(libc::ENOSYS)),
    );
    let line = io_line(&lb);
    assert!(
        line.contains("io: epoll (io_uring_setup: Function not implemented (ENOSYS)"),
        "io line names epoll and ENOSYS: {line}"
    );
    assert_serves(&lb, 5);
}

#[test]
fn forced_io_uring_exits_1_with_the_reason() {
    for (errno, reason) in [
        (libc::EPERM, "io_uring_setup: Operation not permitted"),
        (libc::ENOSYS, "io_uring_setup: Function not implemented"),
    ] {
        let (echo, udp) = (EchoServer::start(), UdpEcho::start("u1"));
        let toml = config("io_uring", echo.addr(), udp.addr());
        let Err((status, stderr)) = Lb::try_start_with(&toml, &[], under(io_uring_blocked(errno)))
        else {
            panic!("errno {errno}: ringlb got ready with io = \"io_uring\" and io_uring blocked");
        };
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(1),
            "errno {errno}: exit code; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains(reason),
            "errno {errno}: stderr names {reason:?}:\n{stderr}"
        );
        assert_eq!(echo.accepted(), 0);
    }
}

#[test]
fn check_reports_the_backend_it_would_use() {
    let (echo, udp) = (EchoServer::start(), UdpEcho::start("u1"));
    let cfg = TempFile::new(
        "ringlb-seccomp",
        "toml",
        &config("auto", echo.addr(), udp.addr()),
    );
    let mut cmd = Command::new(ringlb_bin());
    cmd.arg("check").arg("--config").arg(cfg.path());
    under(io_uring_blocked(libc::EPERM))(&mut cmd);
    let out = cmd.output().expect("run ringlb check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check passes:\n{stdout}\n{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("io: epoll (io_uring_setup: Operation not permitted"),
        "check names the backend and why:\n{stdout}\n{stderr}"
    );
}
