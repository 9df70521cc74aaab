//! The data plane under failure (issue 11), through the real binary (2 workers) on loopback:
//! transient ring errors, peers that die while the other direction is blocked, clients that give
//! up while held, queued or connecting, small pipes, closes that must reset, and resources that
//! run short. Every wait is bounded; every load loop stops by itself.

mod common;

use std::time::Duration;

use common::*;

/// Echo connections through `lb`, one after another, each a 1 KiB round trip.
fn echo_many(lb: std::net::SocketAddr, n: u64) {
    for i in 0..n {
        try_echo(lb, 1024, i).unwrap_or_else(|e| panic!("echo {i}/{n} through {lb}: {e}"));
    }
}

#[test]
fn transient_ring_enter_errors_are_ridden_out() {
    let echo = EchoServer::start();
    let toml = ringlb_config([listener("web").backend(echo.addr())]);
    for errno in ["EAGAIN", "ENOMEM", "EBUSY", "EBADR", "EINTR"] {
        let fault = format!("enter={errno}/3");
        let mut lb = Lb::start_with_env(&toml, &[("RINGLB_IO_FAULT", &fault)]);
        echo_many(lb.addr("web"), 200);
        assert!(
            lb.wait_exit(Duration::from_millis(10)).is_none(),
            "{errno}: ringlb exited; stderr:\n{}",
            lb.stderr_tail(20)
        );
    }
}

#[test]
fn a_programming_error_from_the_ring_stops_with_the_errno() {
    let echo = EchoServer::start();
    let toml = ringlb_config([listener("web").backend(echo.addr())]);
    let mut lb = Lb::start_with_env(&toml, &[("RINGLB_IO_FAULT", "enter=EBADF/50")]);
    let _ = std::thread::spawn({
        let addr = lb.addr("web");
        move || (0..200).for_each(|i| drop(try_echo(addr, 64, i)))
    })
    .join();
    let status = lb.wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "stderr:\n{}",
        lb.stderr_tail(20)
    );
    let log = lb.stderr_tail(20);
    assert!(
        log.contains("io_uring_enter") && log.contains("Bad file descriptor"),
        "{log}"
    );
}
