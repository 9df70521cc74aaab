//! Hitless binary upgrade through the real binary: SIGUSR2 or `POST /upgrade` starts the binary
//! again at its path; the new process takes the listening sockets, says ready, and the old one
//! drains and exits 0. Every test runs on the I/O backend `RINGLB_IO` names (CI runs both).

mod common;

use common::admin::{http_post, try_http_request};
use common::{listener, EchoServer, Lb, LbConfig, TempFile};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

/// The new process a test upgraded to: stopped (SIGKILL) when the test ends, before the `Lb`
/// whose stderr it shares is dropped (declare it after the `Lb`).
struct NewProcess(Option<u32>);

impl Drop for NewProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            // Reaped by init (its parent, the old process, is gone); wait until it is gone.
            let t0 = Instant::now();
            while std::path::Path::new(&format!("/proc/{pid}")).exists()
                && t0.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn config(echo: &EchoServer) -> String {
    LbConfig::default()
        .drain_timeout("20s")
        .listener(listener("web").backend(echo.addr()))
        .to_toml()
}

/// One connection: write `msg`, read it back, close. Err says what failed.
fn echo_once(addr: SocketAddr, msg: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(msg).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).map_err(|e| format!("read: {e}"))?;
    if got != msg {
        return Err("echo differs".into());
    }
    Ok(())
}

/// The pid the old process says now serves (its `upgrade: pid N is ready` line).
fn new_pid(lb: &Lb) -> u32 {
    assert!(
        lb.wait_for_log("is ready and serves", WAIT),
        "no upgrade within {WAIT:?}; stderr:\n{}",
        lb.stderr_tail(30)
    );
    lb.stderr_lines()
        .iter()
        .find_map(|l| {
            let rest = &l[l.find("upgrade: pid ")? + "upgrade: pid ".len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .expect("pid in the ready line")
}

fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}

#[test]
fn sigusr2_under_load_loses_no_connection_and_the_old_exits_0() {
    let echo = EchoServer::start();
    let mut lb = Lb::start(&config(&echo));
    let addr = lb.addr("web");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 1_000_000 {
                    let msg = format!("client {c} connection {i}\n");
                    match echo_once(addr, msg.as_bytes()) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("{c}/{i}: {e}")),
                    }
                    i += 1;
                }
                failures
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = ok.load(Ordering::Relaxed);
    lb.signal(Signal::SIGUSR2);
    let pid = new_pid(&lb);
    let _new = NewProcess(Some(pid));
    assert_ne!(pid, lb.pid());
    // Keep the load on while the old process drains and exits.
    let status = lb.wait_exit_only(WAIT);
    std::thread::sleep(Duration::from_millis(500));
    let after_exit = ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let failures: Vec<String> = clients
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    let total = ok.load(Ordering::Relaxed);
    println!("connections: {before} before the signal, {total} in all, 0 allowed to fail");
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert!(
        status.is_some_and(|s| s.success()),
        "old process did not exit 0: {status:?}; stderr:\n{}",
        lb.stderr_tail(30)
    );
    assert!(
        total > after_exit,
        "the new process serves once the old one is gone"
    );
    assert!(alive(pid), "new process {pid} runs");
    echo_once(addr, b"after\n").expect("the new process serves");
}

#[test]
fn connections_queued_at_the_switch_are_all_served() {
    let echo = EchoServer::start();
    let mut lb = Lb::start(&config(&echo));
    let addr = lb.addr("web");
    lb.signal(Signal::SIGUSR2);
    // A burst around the switch: connected (the kernel's handshake done, waiting in an accept
    // queue) before either process accepts them.
    let mut conns = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1500) && conns.len() < 400 {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("queued {}\n", conns.len()).as_bytes())
            .expect("write");
        conns.push(s);
    }
    let pid = new_pid(&lb);
    let _new = NewProcess(Some(pid));
    let n = conns.len();
    for (i, s) in conns.iter_mut().enumerate() {
        let want = format!("queued {i}\n");
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {i} of {n} not served: {e}"));
        assert_eq!(got, want.as_bytes());
    }
    println!("{n} connections opened around the switch, all served");
    drop(conns);
    let status = lb.wait_exit_only(WAIT);
    assert!(status.is_some_and(|s| s.success()), "old exit: {status:?}");
}

#[test]
fn a_connection_opened_before_keeps_echoing_then_the_old_exits() {
    let echo = EchoServer::start();
    let mut lb = Lb::start(&config(&echo));
    let addr = lb.addr("web");
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut round = |i: usize| {
        let msg = format!("round {i}\n");
        s.write_all(msg.as_bytes()).expect("write");
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).expect("echo");
        assert_eq!(got, msg.as_bytes());
    };
    round(0);
    lb.signal(Signal::SIGUSR2);
    let pid = new_pid(&lb);
    let _new = NewProcess(Some(pid));
    for i in 1..=10 {
        round(i);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        lb.wait_exit_only(Duration::ZERO),
        None,
        "the old process carries the connection"
    );
    echo_once(addr, b"new\n").expect("new connections are served meanwhile");
    drop(s);
    let status = lb.wait_exit_only(WAIT);
    assert!(status.is_some_and(|s| s.success()), "old exit: {status:?}");
}

/// An executable script at a temporary path.
fn script(stem: &str, body: &str) -> TempFile {
    let f = TempFile::new(stem, "sh", body);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    f
}

#[test]
fn a_new_binary_that_fails_leaves_the_old_serving_and_post_upgrade_says_why() {
    let echo = EchoServer::start();
    // ringlb runs with argv[0] = the wrapper: an upgrade starts whatever the wrapper is then.
    let wrapper = script("ringlb-wrapper", "#!/bin/sh\nsleep 1\nexit 1\n");
    let path = wrapper.path().to_path_buf();
    let level = std::env::var("RINGLB_TEST_RUST_LOG").unwrap_or_else(|_| "info".into());
    let mut lb = Lb::start_with(&config(&echo), &[("RUST_LOG", &level)], |cmd| {
        cmd.arg0(&path);
    });
    let addr = lb.addr("web");
    let admin = lb.admin_addr().expect("admin address");

    // Two requests at once: the second is refused while the first runs.
    let first = std::thread::spawn(move || http_post(admin, "/upgrade"));
    std::thread::sleep(Duration::from_millis(300));
    let (code, body) = http_post(admin, "/upgrade");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("in progress"), "{body}");
    let (code, body) = first.join().expect("first request");
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains("exited before it was ready") && body.contains("exit status: 1"),
        "{body}"
    );
    assert!(lb.wait_for_log("upgrade failed:", WAIT));
    echo_once(addr, b"still here\n").expect("the old process serves on");

    // A config the new process refuses: the answer names it.
    let real = common::ringlb_bin();
    std::fs::write(
        &path,
        format!("#!/bin/bash\nexec -a \"$0\" {real} \"$@\"\n"),
    )
    .unwrap();
    let good = std::fs::read_to_string(lb.config_path()).unwrap();
    std::fs::write(
        lb.config_path(),
        format!("{good}\n[[listener]]\nname = 7\n"),
    )
    .unwrap();
    let (code, body) = http_post(admin, "/upgrade");
    assert_eq!(code, 500, "{body}");
    assert!(body.contains("configuration"), "{body}");
    echo_once(addr, b"still here\n").expect("the old process serves on");

    // The file replaced by a working binary: the upgrade goes through.
    std::fs::write(lb.config_path(), &good).unwrap();
    let (code, body) = http_post(admin, "/upgrade");
    assert_eq!(code, 200, "{body}");
    let pid = new_pid(&lb);
    let _new = NewProcess(Some(pid));
    assert!(body.contains(&format!("pid {pid} serves")), "{body}");
    let status = lb.wait_exit_only(WAIT);
    assert!(status.is_some_and(|s| s.success()), "old exit: {status:?}");
    echo_once(addr, b"new\n").expect("the new process serves");
    // The admin endpoint moved with it (same socket).
    let (code, _) = try_http_request(admin, "GET", "/livez", b"").expect("admin on the new");
    assert_eq!(code, 200);
}

#[test]
fn sd_notify_gets_mainpid_then_ready_from_the_new_process() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("ringlb-upgrade-notify-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let recv_all = |within: Duration| {
        let mut got = Vec::new();
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        while t0.elapsed() < within {
            if let Ok(n) = sock.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        got
    };
    let echo = EchoServer::start();
    let level = std::env::var("RINGLB_TEST_RUST_LOG").unwrap_or_else(|_| "info".into());
    let mut lb = Lb::start_with_env(
        &config(&echo),
        &[
            ("RUST_LOG", &level),
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ],
    );
    let first = recv_all(Duration::from_millis(500));
    assert!(first.iter().any(|m| m.starts_with("READY=1")), "{first:?}");
    lb.signal(Signal::SIGUSR2);
    let pid = new_pid(&lb);
    let _new = NewProcess(Some(pid));
    let status = lb.wait_exit_only(WAIT);
    assert!(status.is_some_and(|s| s.success()), "old exit: {status:?}");
    let after = recv_all(Duration::from_millis(500));
    let mainpid = after
        .iter()
        .position(|m| m == &format!("MAINPID={pid}"))
        .unwrap_or_else(|| panic!("no MAINPID={pid}: {after:?}"));
    let ready = after
        .iter()
        .position(|m| m.starts_with("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 after the upgrade: {after:?}"));
    assert!(mainpid < ready, "MAINPID= comes before READY=1: {after:?}");
    assert!(
        !after.iter().any(|m| m.contains("STOPPING=1")),
        "the draining old process must not tell systemd the service stops: {after:?}"
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_udp_flow_keeps_its_backend_and_upstream_port_across_the_upgrade() {
    use common::udp::{udp_listener, UdpClient, UdpEcho};
    let (a, b) = (UdpEcho::start("a"), UdpEcho::start("b"));
    let toml = LbConfig::default()
        .drain_timeout("20s")
        .listener(
            udp_listener("dns")
                .balance("round_robin")
                .backend(a.addr())
                .backend(b.addr()),
        )
        .to_toml();
    let mut lb = Lb::start(&toml);
    let addr = lb.addr("dns");
    let clients: Vec<UdpClient> = (0..2)
        .map(|_| UdpClient::bind(std::net::Ipv4Addr::LOCALHOST))
        .collect();
    // (client, sequence) -> backend name; None = no reply within the timeout.
    let mut answers: Vec<Vec<Option<String>>> = vec![Vec::new(), Vec::new()];
    let exchange = |answers: &mut Vec<Vec<Option<String>>>, seq: usize| {
        for (c, client) in clients.iter().enumerate() {
            let payload = format!("client {c} datagram {seq}");
            let got = client
                .request(addr, payload.as_bytes(), Duration::from_secs(1))
                .ok()
                .map(|(_, reply)| String::from_utf8_lossy(&reply).into_owned());
            let name = got.and_then(|r| r.strip_suffix(&payload).map(|n| n.trim_end().to_string()));
            answers[c].push(name);
        }
    };
    let mut seq = 0;
    for _ in 0..20 {
        exchange(&mut answers, seq);
        seq += 1;
    }
    lb.signal(Signal::SIGUSR2);
    let t0 = Instant::now();
    // Datagrams right through the switch and the old process's exit.
    let mut new = None;
    let mut status = None;
    while t0.elapsed() < Duration::from_secs(15) && seq < 5000 {
        exchange(&mut answers, seq);
        seq += 1;
        std::thread::sleep(Duration::from_millis(5));
        if new.is_none() && lb.wait_for_log("is ready and serves", Duration::ZERO) {
            new = Some(new_pid(&lb));
        }
        if new.is_some() && status.is_none() {
            status = lb.wait_exit_only(Duration::ZERO);
            if status.is_some() {
                for _ in 0..20 {
                    exchange(&mut answers, seq);
                    seq += 1;
                }
                break;
            }
        }
    }
    let _new = NewProcess(new);
    assert!(new.is_some(), "no upgrade; stderr:\n{}", lb.stderr_tail(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "old exit: {status:?}; stderr:\n{}",
        lb.stderr_tail(30)
    );
    assert!(
        lb.wait_for_log("handed 2 UDP flow(s)", Duration::ZERO),
        "{}",
        lb.stderr_tail(30)
    );
    for (c, got) in answers.iter().enumerate() {
        let lost = got.iter().filter(|g| g.is_none()).count();
        println!(
            "client {c}: {} datagrams, {lost} lost across the upgrade",
            got.len()
        );
        assert_eq!(lost, 0, "client {c} lost datagrams: {got:?}");
        let first = got[0].clone().expect("first reply");
        assert!(
            got.iter().all(|g| g.as_deref() == Some(first.as_str())),
            "client {c} changed backend: {got:?}"
        );
        let backend = if first == "a" { &a } else { &b };
        let mut ports: Vec<SocketAddr> = (0..seq)
            .flat_map(|s| backend.senders_of(format!("client {c} datagram {s}").as_bytes()))
            .collect();
        ports.dedup();
        assert_eq!(
            ports.len(),
            1,
            "client {c}: upstream source changed: {ports:?}"
        );
    }
    assert_ne!(
        answers[0][0], answers[1][0],
        "round robin gave the two flows different backends"
    );
}

#[test]
fn busy_udp_flows_lose_no_datagram_at_the_handover() {
    // Datagrams already read by the old process when it hands its flows over (a client's on
    // the listening socket, a reply on an upstream socket) still reach their peer.
    use common::udp::{udp_listener, UdpClient, UdpEcho};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (a, b) = (UdpEcho::start("a"), UdpEcho::start("b"));
    let toml = LbConfig::default()
        .drain_timeout("20s")
        .listener(
            udp_listener("dns")
                .balance("round_robin")
                .backend(a.addr())
                .backend(b.addr()),
        )
        .to_toml();
    let mut lb = Lb::start(&toml);
    let addr = lb.addr("dns");
    let stop = Arc::new(AtomicBool::new(false));
    // Each client in lockstep, as fast as replies come: (sent, lost).
    let clients: Vec<_> = (0..12)
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let client = UdpClient::bind(std::net::Ipv4Addr::LOCALHOST);
                let (mut sent, mut lost) = (0u64, 0u64);
                let t0 = Instant::now();
                while !stop.load(Ordering::Relaxed)
                    && sent < 200_000
                    && t0.elapsed() < Duration::from_secs(30)
                {
                    let payload = format!("client {c} datagram {sent}");
                    let ok = client
                        .request(addr, payload.as_bytes(), Duration::from_secs(2))
                        .is_ok_and(|(_, r)| r.ends_with(payload.as_bytes()));
                    sent += 1;
                    lost += u64::from(!ok);
                }
                (sent, lost)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    lb.signal(Signal::SIGUSR2);
    let new = lb
        .wait_for_log("is ready and serves", WAIT)
        .then(|| new_pid(&lb));
    let _new = NewProcess(new);
    let status = lb.wait_exit_only(WAIT);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let results: Vec<(u64, u64)> = clients.into_iter().map(|t| t.join().unwrap()).collect();
    println!("(sent, lost) per client: {results:?}");
    assert!(new.is_some(), "no upgrade; stderr:\n{}", lb.stderr_tail(30));
    assert!(status.is_some_and(|s| s.success()), "old exit: {status:?}");
    let lost: u64 = results.iter().map(|r| r.1).sum();
    assert!(results.iter().all(|r| r.0 > 10), "{results:?}");
    assert_eq!(lost, 0, "datagrams lost at the handover: {results:?}");
}

/// A connection through `addr` and the tag of the backend it reached.
fn open_tagged(addr: SocketAddr) -> (TcpStream, u8) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).expect("backend tag");
    (s, tag[0])
}

/// `active_connections` per backend address of listener `name` in `/status`.
fn active_by_backend(admin: SocketAddr, name: &str) -> Vec<(String, u64)> {
    let (code, body) = common::admin::http_get(admin, "/status");
    assert_eq!(code, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).expect("/status JSON");
    let l = st["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .cloned()
        .unwrap_or_default();
    let mut out: Vec<(String, u64)> = l["backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| {
                    let a = b["address"].as_str().unwrap_or_default().to_string();
                    (a, b["active_connections"].as_u64().unwrap_or(u64::MAX))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn least_connections_in_the_new_process_counts_what_the_old_still_carries() {
    let servers = [
        common::servers::tagged_echo(0),
        common::servers::tagged_echo(1),
    ];
    let toml = LbConfig::default()
        .drain_timeout("20s")
        .listener(
            listener("web")
                .balance("least_connections")
                .backend(servers[0].addr())
                .backend(servers[1].addr()),
        )
        .to_toml();
    let mut lb = Lb::start(&toml);
    let addr = lb.addr("web");
    let admin = lb.admin_addr().expect("admin address");
    let mut old: Vec<(TcpStream, u8)> = (0..4).map(|_| open_tagged(addr)).collect();
    let tags: Vec<u8> = old.iter().map(|c| c.1).collect();
    assert_eq!(tags.iter().filter(|&&t| t == 0).count(), 2, "{tags:?}");
    let expect = |a: u64, b: u64| {
        let mut v = vec![
            (servers[0].addr().to_string(), a),
            (servers[1].addr().to_string(), b),
        ];
        v.sort();
        v
    };

    lb.signal(Signal::SIGUSR2);
    let pid = new_pid(&lb);
    let _new = NewProcess(Some(pid));
    assert!(
        lb.wait_for_log("the new process serves the admin endpoint", WAIT),
        "{}",
        lb.stderr_tail(30)
    );
    // The new process's counts include the old one's 2 + 2 (reported every 250 ms).
    let mut last = Vec::new();
    let seen = common::wait_until(Duration::from_secs(5), || {
        last = active_by_backend(admin, "web");
        last == expect(2, 2)
    });
    assert!(seen, "new process /status: {last:?}");

    // The old process's connections to backend 0 end: the new process sees 0 and 2 ...
    old.retain(|c| c.1 != 0);
    assert!(
        servers[0].wait_live(0, WAIT),
        "backend 0 still has connections"
    );
    let seen = common::wait_until(Duration::from_secs(5), || {
        last = active_by_backend(admin, "web");
        last == expect(0, 2)
    });
    assert!(seen, "new process /status after the old closed 2: {last:?}");
    // ... and least_connections sends its next two connections both to backend 0.
    let new: Vec<(TcpStream, u8)> = (0..2).map(|_| open_tagged(addr)).collect();
    let new_tags: Vec<u8> = new.iter().map(|c| c.1).collect();
    assert_eq!(
        new_tags,
        vec![0, 0],
        "the old process's 2 on backend 1 count"
    );

    // The old process exits with its last connection; what it carried is taken away.
    drop(old);
    let status = lb.wait_exit_only(WAIT);
    assert!(status.is_some_and(|s| s.success()), "old exit: {status:?}");
    let seen = common::wait_until(Duration::from_secs(5), || {
        last = active_by_backend(admin, "web");
        last == expect(2, 0)
    });
    assert!(seen, "new process /status once the old exited: {last:?}");
    drop(new);
}
