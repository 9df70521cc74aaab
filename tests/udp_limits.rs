//! UDP under a flood of new sources (issue 11, item 6), through the real binary (2 workers) on
//! loopback: at `max_flows`, a flow that carried a datagram within the last second is never
//! evicted for a new one; new flows are refused and counted instead.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::admin::{metric_sum, scrape};
use common::udp::{udp_listener, UdpClient, UdpEcho};
use common::*;

#[test]
fn an_active_flow_survives_a_flood_of_new_sources() {
    let backend = UdpEcho::start("u1");
    let lb = Lb::start(&ringlb_config([udp_listener("dns")
        .backend(backend.addr())
        .set("max_flows", "100")]));
    let addr = lb.addr("dns");
    let legit = UdpClient::bind(Ipv4Addr::new(127, 0, 0, 1));
    legit.exchange(addr, b"hello", Duration::from_secs(2));

    // 20,000 new sources, one datagram each, from 127.0.9.x addresses, while the legitimate
    // client sends every 50 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let flood = std::thread::spawn(move || {
        let mut sent = 0u32;
        let t0 = Instant::now();
        while sent < 20_000 && t0.elapsed() < Duration::from_secs(30) && !st.load(Ordering::Relaxed)
        {
            let ip = Ipv4Addr::new(127, 0, 9, 1 + (sent % 250) as u8);
            if let Ok(s) = UdpSocket::bind(SocketAddr::from((ip, 0))) {
                let _ = s.send_to(b"flood", addr);
                sent += 1;
            }
        }
        sent
    });
    let mut answered = 0;
    let mut asked = 0;
    while !flood.is_finished() && asked < 600 {
        let payload = format!("legit-{asked}");
        asked += 1;
        if legit
            .request(addr, payload.as_bytes(), Duration::from_millis(50))
            .is_ok()
        {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let flooded = flood.join().expect("flood thread");
    // The legitimate flow kept its backend and its upstream socket the whole time.
    let mut senders: Vec<SocketAddr> = backend.senders_of(b"hello");
    for i in 0..asked {
        senders.extend(backend.senders_of(format!("legit-{i}").as_bytes()));
    }
    senders.sort();
    senders.dedup();
    assert_eq!(
        senders.len(),
        1,
        "{flooded} flood sources: the legitimate flow's upstream socket changed: {senders:?}"
    );
    assert!(
        answered * 10 >= asked * 9,
        "{answered}/{asked} legitimate requests answered during the flood"
    );
    let admin = lb.admin_addr().expect("admin");
    let refused = metric_sum(
        &scrape(admin),
        "ringlb_udp_flows_refused_total",
        &[("listener", "dns")],
    );
    assert!(refused > 0.0, "no new flow was refused at the limit");
}

#[test]
fn check_and_run_warn_when_limits_exceed_the_fd_limit() {
    use std::os::unix::process::CommandExt;
    let toml = ringlb_config([
        listener("t")
            .backend(dead_addr())
            .set("max_connections", "2000"),
        udp_listener("u")
            .backend(dead_addr())
            .set("max_flows", "500"),
    ]);
    let file = TempFile::new("fd-limits", "toml", &toml);
    let mut cmd = std::process::Command::new(ringlb_bin());
    cmd.args(["check", "--config"]).arg(file.path());
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit, which
    // is async-signal-safe, on a value on its own stack.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1000,
                rlim_max: 1000,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("ringlb check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("2 × 2000 (TCP max_connections") && stderr.contains("> 1000"),
        "{stderr}"
    );
    // Within the limit: no warning.
    let out = std::process::Command::new(ringlb_bin())
        .args(["check", "--config"])
        .arg(file.path())
        .output()
        .expect("ringlb check");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("file descriptors"));
}
