//! UDP listeners end to end through the real binary (2 workers) on loopback: flows from many
//! client addresses with Maglev stickiness, idle expiry, the `max_flows` LRU bound, passive
//! ejection of a backend that went away (ICMP port unreachable), a real DNS exchange (`dig`
//! through ringlb to `dnsmasq`, with a DNS health check), wildcard binds, a udp listener removed
//! by reload and SIGTERM under traffic, and (in a network namespace of the test's own) a backend
//! whose address never resolves.
//!
//! Clients bind their own loopback addresses (127.0.x.y), one range per test. Every receive has
//! a timeout and every loop is bounded.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::admin::{metric, metric_sum, scrape};
use common::ops::reload_ok;
use common::udp::{check_reply, client_ip, udp_listener, UdpClient, UdpEcho};
use common::*;

/// Reply timeout where no datagram should be lost.
const REPLY: Duration = Duration::from_secs(2);

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin endpoint line; stderr:\n{}", lb.stderr_tail(20)))
}

/// A sample of `name` for listener `l`, 0 if absent.
fn listener_metric(admin: SocketAddr, name: &str, l: &str) -> f64 {
    metric(&scrape(admin), name, &[("listener", l)]).unwrap_or(0.0)
}

fn flows(admin: SocketAddr, l: &str) -> f64 {
    listener_metric(admin, "ringlb_udp_flows", l)
}

/// `ringlb_udp_datagrams_total` of one backend in one direction.
fn datagrams(admin: SocketAddr, l: &str, backend: SocketAddr, dir: &str) -> f64 {
    let b = backend.to_string();
    let labels = [("listener", l), ("backend", b.as_str()), ("direction", dir)];
    metric(&scrape(admin), "ringlb_udp_datagrams_total", &labels).unwrap_or(-1.0)
}

/// The backend called `name` (from a reply's prefix).
fn which<'a>(backends: &'a [&UdpEcho], name: &str) -> &'a UdpEcho {
    backends
        .iter()
        .find(|b| b.name() == name)
        .unwrap_or_else(|| panic!("reply names unknown backend {name:?}"))
}

#[test]
fn many_clients_each_stick_to_one_backend() {
    const CLIENTS: usize = 60;
    const EACH: usize = 20;
    let (a, b) = (UdpEcho::start("a"), UdpEcho::start("b"));
    let l = udp_listener("u")
        .balance("maglev")
        .set("hash_key", "\"source_ip\"")
        .backend(a.addr())
        .backend(b.addr());
    let lb = Lb::start(&ringlb_config([l]));
    let (admin, lb_addr) = (admin(&lb), lb.addr("u"));
    assert!(
        lb.stderr_lines()
            .iter()
            .any(|l| l.contains("listener \"u\" listening on") && l.contains("(udp, ")),
        "no `listener \"u\" listening on ... (udp, ...` line; stderr:\n{}",
        lb.stderr_tail(20)
    );

    // All clients at once, each sending its datagrams one after another.
    let names: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                s.spawn(move || {
                    let c = UdpClient::bind(client_ip(1, i));
                    let mut seen = BTreeSet::new();
                    for seq in 0..EACH {
                        let mut p = format!("client {i} seq {seq} ").into_bytes();
                        p.extend(Pattern::bytes(
                            (i * 1000 + seq) as u64,
                            1 + (i * 7 + seq * 13) % 300,
                        ));
                        seen.insert(c.exchange(lb_addr, &p, REPLY));
                    }
                    assert_eq!(
                        seen.len(),
                        1,
                        "client {i} ({}) reached several backends: {seen:?}",
                        c.local_addr()
                    );
                    seen.pop_first().expect("one")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let per_backend = names.iter().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(n.as_str()).or_insert(0usize) += 1;
        m
    });
    assert!(
        per_backend.len() == 2,
        "maglev over {CLIENTS} client IPs used only {per_backend:?}"
    );

    // Maglev on the source IP: a second socket of each client IP (another port, so often the
    // other worker's SO_REUSEPORT socket) reaches the same backend.
    for (i, first) in names.iter().enumerate() {
        let c = UdpClient::bind(client_ip(1, i));
        let again = c.exchange(lb_addr, format!("client {i} again").as_bytes(), REPLY);
        assert_eq!(
            &again,
            first,
            "client IP {} from port {}: backend {again}, its first port reached {first}",
            client_ip(1, i),
            c.local_addr().port()
        );
    }

    let total = CLIENTS * (EACH + 1);
    assert_eq!(
        a.count() + b.count(),
        total,
        "datagrams the backends received"
    );
    for be in [&a, &b] {
        // to_client is counted just after the send to the client: allow it a moment.
        let want = be.count() as f64;
        let mut got = (0.0, 0.0);
        let ok = wait_until(Duration::from_secs(2), || {
            got = (
                datagrams(admin, "u", be.addr(), "to_backend"),
                datagrams(admin, "u", be.addr(), "to_client"),
            );
            got == (want, want)
        });
        assert!(
            ok,
            "backend {}: (to_backend, to_client) = {got:?}, it received {want}",
            be.name()
        );
    }
    assert_eq!(flows(admin, "u"), (2 * CLIENTS) as f64, "ringlb_udp_flows");
    assert_eq!(listener_metric(admin, "ringlb_udp_dropped_total", "u"), 0.0);
    assert_eq!(
        listener_metric(admin, "ringlb_udp_flows_evicted_total", "u"),
        0.0
    );
}

#[test]
fn idle_flows_expire_and_busy_ones_stay() {
    let (a, b) = (UdpEcho::start("a"), UdpEcho::start("b"));
    // Round robin: a flow that expired and came back would move to the other backend.
    let l = udp_listener("u")
        .idle_timeout("1s")
        .backend(a.addr())
        .backend(b.addr());
    let lb = Lb::start(&ringlb_config([l]));
    let (admin, lb_addr) = (admin(&lb), lb.addr("u"));

    let clients: Vec<UdpClient> = (0..10).map(|i| UdpClient::bind(client_ip(10, i))).collect();
    for (i, c) in clients.iter().enumerate() {
        for seq in 0..3 {
            c.exchange(lb_addr, format!("idle {i} {seq}").as_bytes(), REPLY);
        }
    }
    let last = Instant::now();
    assert_eq!(flows(admin, "u"), 10.0, "ringlb_udp_flows after traffic");
    let mut now = -1.0;
    let gone = wait_until(Duration::from_secs(3), || {
        now = flows(admin, "u");
        now == 0.0
    });
    assert!(
        gone,
        "ringlb_udp_flows is {now} 3 s after the last datagram (idle_timeout 1s)"
    );
    assert!(
        last.elapsed() >= Duration::from_millis(900),
        "flows expired {:?} after the last datagram, before idle_timeout 1s",
        last.elapsed()
    );

    // One client sends every 300 ms for 3 s: its flow (same upstream socket) and backend stay.
    let c = UdpClient::bind(client_ip(10, 100));
    let mut backend = None;
    let mut upstream = BTreeSet::new();
    for seq in 0..10 {
        let p = format!("busy {seq}").into_bytes();
        let name = c.exchange(lb_addr, &p, REPLY);
        assert!(
            backend.get_or_insert(name.clone()) == &name,
            "busy client moved from backend {backend:?} to {name} at datagram {seq}"
        );
        upstream.extend(which(&[&a, &b], &name).senders_of(&p));
        let n = flows(admin, "u");
        assert!(
            n >= 1.0,
            "ringlb_udp_flows is {n} while a client sends every 300 ms"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        upstream.len(),
        1,
        "the busy client's datagrams left ringlb from several sockets (flow re-created): {upstream:?}"
    );
    let gone = wait_until(Duration::from_secs(3), || flows(admin, "u") == 0.0);
    assert!(
        gone,
        "the busy client's flow did not expire once it stopped"
    );
}

#[test]
fn max_flows_evicts_the_least_recently_used() {
    // One worker, so the whole table is one worker's share and every count is exact.
    const MAX: usize = 10;
    let (a, b) = (UdpEcho::start("a"), UdpEcho::start("b"));
    let l = udp_listener("u")
        .set("max_flows", &MAX.to_string())
        .backend(a.addr())
        .backend(b.addr());
    let lb = Lb::start(&LbConfig::default().workers(1).listener(l).to_toml());
    let (admin, lb_addr) = (admin(&lb), lb.addr("u"));
    let backends = [&a, &b];
    let clients: Vec<UdpClient> = (0..3 * MAX / 2 + MAX / 2)
        .map(|i| UdpClient::bind(client_ip(20, i)))
        .collect();
    let first = |i: usize| format!("first {i}").into_bytes();
    let upstream_of =
        |name: &str, p: &[u8]| -> Vec<SocketAddr> { which(&backends, name).senders_of(p) };

    // 1. The table fills.
    let names: Vec<String> = (0..MAX)
        .map(|i| clients[i].exchange(lb_addr, &first(i), REPLY))
        .collect();
    assert_eq!(flows(admin, "u"), MAX as f64);
    // 2. New sources while every flow carried a datagram within the last second: refused (no
    //    reply, nothing evicted), so a flood of new sources cannot push real flows out.
    // (Each waits 100 ms for a reply: all five well within the second.)
    for c in &clients[MAX..MAX + MAX / 2] {
        let r = c.request(lb_addr, b"new", Duration::from_millis(100));
        assert!(
            r.is_err(),
            "a new source was answered with the table full: {r:?}"
        );
    }
    assert_eq!(
        listener_metric(admin, "ringlb_udp_flows_refused_total", "u"),
        (MAX / 2) as f64
    );
    assert_eq!(
        listener_metric(admin, "ringlb_udp_flows_evicted_total", "u"),
        0.0
    );
    // 3. A second later the first half is idle, the second half is refreshed: new sources now
    //    evict exactly the idle, least recently used ones.
    std::thread::sleep(Duration::from_millis(1100));
    for i in MAX / 2..MAX {
        let p = format!("again {i}").into_bytes();
        assert_eq!(clients[i].exchange(lb_addr, &p, REPLY), names[i]);
    }
    for c in &clients[MAX + MAX / 2..] {
        c.exchange(lb_addr, b"newer", REPLY);
    }
    assert_eq!(
        listener_metric(admin, "ringlb_udp_flows_evicted_total", "u"),
        (MAX / 2) as f64
    );
    assert!(flows(admin, "u") <= MAX as f64);
    // The refreshed flows were kept: their next datagram leaves from the same upstream socket.
    for i in MAX / 2..MAX {
        let p = format!("third {i}").into_bytes();
        assert_eq!(clients[i].exchange(lb_addr, &p, REPLY), names[i]);
        assert_eq!(
            upstream_of(&names[i], &p),
            upstream_of(&names[i], &first(i)),
            "client {i}: its flow was not kept (another upstream socket)"
        );
    }
    assert_eq!(
        listener_metric(admin, "ringlb_udp_flows_evicted_total", "u"),
        (MAX / 2) as f64
    );
    assert_eq!(
        listener_metric(admin, "ringlb_udp_dropped_total", "u"),
        (MAX / 2) as f64,
        "the refused sources' datagrams are the only drops"
    );
}

#[test]
fn a_vanished_backend_is_ejected_and_flows_go_to_the_live_one() {
    let (a, mut b) = (UdpEcho::start("a"), UdpEcho::start("b"));
    let dead = b.addr();
    let l = udp_listener("u").backend(a.addr()).backend(b.addr()).set(
        "passive",
        r#"{ consecutive_failures = 1, base_ejection_time = "10s" }"#,
    );
    let lb = Lb::start(&ringlb_config([l]));
    let (admin, lb_addr) = (admin(&lb), lb.addr("u"));

    // Both backends serve while alive.
    let served: BTreeSet<String> = (0..4)
        .map(|i| UdpClient::bind(client_ip(30, i)).exchange(lb_addr, b"warm", REPLY))
        .collect();
    assert_eq!(
        served.len(),
        2,
        "round robin over 2 backends served {served:?}"
    );

    b.stop(); // datagrams to its port now draw ICMP port unreachable
    let ejected_line = format!("backend {dead} ejected");
    let (mut lost, mut after_ejection, mut n) = (0usize, 0usize, 0usize);
    while n < 20 || after_ejection < 10 {
        assert!(
            n < 40,
            "no ejection of {dead} after {n} new clients; stderr:\n{}",
            lb.stderr_tail(20)
        );
        let ejected = lb.stderr_lines().iter().any(|l| l.contains(&ejected_line));
        let c = UdpClient::bind(client_ip(30, 10 + n));
        let mut reply = None;
        for attempt in 0..3 {
            let p = format!("client {n} attempt {attempt}").into_bytes();
            match c.request(lb_addr, &p, Duration::from_millis(300)) {
                Ok((from, r)) => {
                    reply = Some((attempt, check_reply(c.local_addr(), lb_addr, from, &r, &p)));
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => lost += 1,
                Err(e) => panic!("client {n}: {e}"),
            }
        }
        let (attempt, name) = reply.unwrap_or_else(|| {
            panic!(
                "client {n} ({}) got no reply in 3 attempts ({lost} datagrams lost so far); stderr:\n{}",
                c.local_addr(),
                lb.stderr_tail(20)
            )
        });
        assert_eq!(
            name, "a",
            "client {n} got a reply from the stopped backend?"
        );
        if ejected {
            after_ejection += 1;
            assert_eq!(
                attempt, 0,
                "client {n} lost a datagram after {dead} was ejected"
            );
        }
        n += 1;
    }
    assert!(
        lost <= 3,
        "{lost} datagrams lost before every new flow went to the live backend"
    );
    let d = dead.to_string();
    let s = scrape(admin);
    let labels = [("listener", "u"), ("backend", d.as_str())];
    let ejections = metric(&s, "ringlb_ejections_total", &labels).unwrap_or(0.0);
    assert!(
        ejections >= 1.0,
        "ringlb_ejections_total for {dead}: {ejections}"
    );
    assert_eq!(
        metric(&s, "ringlb_backend_up", &labels),
        Some(0.0),
        "ringlb_backend_up for the ejected {dead}"
    );
    eprintln!("{lost} datagram(s) lost, {n} new clients, {after_ejection} after the ejection");
}

/// A `dnsmasq` child killed (and reaped) on drop, even when the test panics.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
    pid_file: PathBuf,
    log: PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq on a free loopback port answering `ringlb.test` with 127.0.0.42 and
    /// waits until it answers `query`; retries on another port if the first is taken.
    fn start(query: &[u8]) -> Dnsmasq {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        for attempt in 0..20 {
            let Some(port) = common::procs::free_dns_port() else {
                continue;
            };
            let tag = format!("{}-{attempt}", std::process::id());
            let pid_file = dir.join(format!("dnsmasq-{tag}.pid"));
            let log = dir.join(format!("dnsmasq-{tag}.log"));
            let log_file = std::fs::File::create(&log).expect("dnsmasq log file");
            let child = Command::new("dnsmasq")
                .args([
                    "--no-daemon",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--address=/ringlb.test/127.0.0.42",
                    "--conf-file=/dev/null",
                ])
                .arg(format!("--port={port}"))
                .arg(format!("--pid-file={}", pid_file.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file)
                .spawn()
                .expect("spawn dnsmasq");
            let mut d = Dnsmasq {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                pid_file,
                log,
            };
            if d.wait_answering(query) {
                return d;
            }
            eprintln!("dnsmasq on port {port} did not answer:\n{}", d.log());
        }
        panic!("dnsmasq did not start in 5 attempts");
    }

    /// Polls with `query` until a reply starting with its ID comes, for up to 5 s, or dnsmasq
    /// exits.
    fn wait_answering(&mut self, query: &[u8]) -> bool {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if self.child.try_wait().expect("try_wait").is_some() {
                return false;
            }
            let _ = s.send_to(query, self.addr);
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                if buf[..n].starts_with(&query[..2]) {
                    return true;
                }
            }
        }
        false
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.pid_file);
        let _ = std::fs::remove_file(&self.log);
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` to completion, killing it past `timeout`; returns (success, stdout, stderr).
fn run_bounded(cmd: &mut Command, timeout: Duration) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = read(Box::new(child.stdout.take().expect("stdout")));
    let err = read(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (out, mut err) = (out.join().expect("stdout"), err.join().expect("stderr"));
    if status.is_none() {
        err.push_str(&format!("\n(killed after {timeout:?})"));
    }
    (status.is_some_and(|s| s.success()), out, err)
}

#[test]
fn dig_through_ringlb_to_dnsmasq() {
    if !have("dig") || !have("dnsmasq") {
        eprintln!(
            "SKIPPED dig_through_ringlb_to_dnsmasq: needs `dig` and `dnsmasq` \
             (Debian: apt-get install dnsutils dnsmasq-base)"
        );
        return;
    }
    // The health check's query: ID 0x1234, recursion desired, one question: ". NS IN".
    const PROBE: &[u8] = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01";
    let dns = Dnsmasq::start(PROBE);
    let health = r#"{ interval = "200ms", timeout = "150ms", rise = 1, fall = 2, send = '\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01', expect = '\x12\x34' }"#;
    let l = udp_listener("dns")
        .balance("maglev")
        .backend(dns.addr)
        .set("health", health);
    let lb = Lb::start(&ringlb_config([l]));
    let (admin, lb_addr) = (admin(&lb), lb.addr("dns"));
    let be = dns.addr.to_string();
    let labels = [("listener", "dns"), ("backend", be.as_str())];

    // The DNS probe passes against dnsmasq.
    let mut got = (None, None);
    let ok = wait_until(Duration::from_secs(3), || {
        let s = scrape(admin);
        let mut l = labels.to_vec();
        l.push(("result", "success"));
        got = (
            metric(&s, "ringlb_health_checks_total", &l),
            metric(&s, "ringlb_backend_up", &labels),
        );
        got.0.is_some_and(|n| n >= 2.0) && got.1 == Some(1.0)
    });
    assert!(
        ok,
        "(successful probes, ringlb_backend_up) of dnsmasq: {got:?}; stderr:\n{}\ndnsmasq:\n{}",
        lb.stderr_tail(20),
        dns.log()
    );

    for i in 0..3 {
        let (ok, out, err) = run_bounded(
            Command::new("dig")
                .arg(format!("@{}", lb_addr.ip()))
                .args(["-p", &lb_addr.port().to_string()])
                .args(["ringlb.test", "A", "+short", "+time=2", "+tries=2"]),
            Duration::from_secs(10),
        );
        assert!(
            ok && out.trim() == "127.0.0.42",
            "dig #{i} through {lb_addr}: success {ok}, stdout {out:?}, stderr {err:?}; \
             ringlb stderr:\n{}\ndnsmasq:\n{}",
            lb.stderr_tail(20),
            dns.log()
        );
    }
    let s = scrape(admin);
    let mut to_client = labels.to_vec();
    to_client.push(("direction", "to_client"));
    assert!(
        metric_sum(&s, "ringlb_udp_datagrams_total", &to_client) >= 3.0,
        "ringlb_udp_datagrams_total to_client for dnsmasq"
    );
    let failures = {
        let mut l = labels.to_vec();
        l.push(("result", "failure"));
        metric(&s, "ringlb_health_checks_total", &l)
    };
    assert_eq!(
        failures,
        Some(0.0),
        "failed DNS probes; dnsmasq:\n{}",
        dns.log()
    );
}

/// A listener bound to 0.0.0.0 answers each client from the address that client sent to
/// (IP_PKTINFO), so a connected client socket accepts the reply.
#[test]
fn wildcard_bind_replies_from_the_address_the_client_used() {
    let backend = UdpEcho::start("w");
    let toml = format!(
        "[runtime]\nworkers = 2\ndrain_timeout = \"1s\"\n[admin]\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"w\"\nbind = \"0.0.0.0:0\"\nprotocol = \"udp\"\n\
         backends = [ {{ address = \"{}\" }} ]\n",
        backend.addr()
    );
    let lb = Lb::start(&toml);
    let port = lb.addr("w").port();
    for dst in ["127.0.0.2", "127.0.0.3", "127.0.0.1"] {
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let to: std::net::SocketAddr = format!("{dst}:{port}").parse().unwrap();
        // connect(): the kernel drops datagrams from any other source address.
        c.connect(to).unwrap();
        c.send(dst.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = c
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no reply from {to}: {e}"));
        assert_eq!(&buf[..n], format!("w {dst}").as_bytes());
    }
}

/// Sends small datagrams to `to` from a fresh socket, about 16 per millisecond, until `stop` is
/// set (or 20 s pass, or 2 million datagrams went), ignoring replies and errors: a listener kept
/// busy, below what overloads it on a shared machine, while the test stops it.
fn blast(to: SocketAddr, stop: &std::sync::atomic::AtomicBool) -> usize {
    use std::sync::atomic::Ordering;
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_nonblocking(true).expect("nonblocking");
    let t0 = Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed)
        && t0.elapsed() < Duration::from_secs(20)
        && sent < 2_000_000
    {
        if s.send_to(b"load", to).is_ok() {
            sent += 1;
        }
        while s.recv_from(&mut buf).is_ok() {}
        if sent % 16 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    sent
}

/// A UDP listener that a reload removes stops receiving on every worker (its port refuses
/// within a second), right after a burst of traffic and with none arriving (so its pending
/// receives must be cancelled, not just drained by datagrams), and another listener goes on
/// answering; then SIGTERM, with datagrams still arriving, exits 0 well inside the drain
/// timeout.
#[test]
fn removed_udp_listener_stops_and_sigterm_exits_under_traffic() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let backend = UdpEcho::start("u");
    let keep = udp_listener("keep").backend(backend.addr());
    let gone = udp_listener("gone").backend(backend.addr());
    let one = ringlb_config([keep.clone()]);
    let mut lb = Lb::start(&ringlb_config([keep, gone]));
    let (k, g) = (lb.addr("keep"), lb.addr("gone"));
    let client = UdpClient::bind(client_ip(200, 0));
    assert_eq!(client.exchange(g, b"before", REPLY), "u");

    let (stop, stop_gone) = (AtomicBool::new(false), AtomicBool::new(false));
    std::thread::scope(|s| {
        let load_gone = s.spawn(|| blast(g, &stop_gone));
        let load_keep = s.spawn(|| blast(k, &stop));
        std::thread::sleep(Duration::from_millis(300));
        stop_gone.store(true, Ordering::Relaxed);
        let sent_gone = load_gone.join().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let (_, line) = reload_ok(&lb, &one);
        let t0 = Instant::now();
        assert!(line.contains("listeners: 0 added, 1 removed"), "{line}");
        // Give every worker a moment to take the removal; from then on the removed port never
        // answers, and refuses (ICMP port unreachable on a connected socket) within 1 s.
        std::thread::sleep(Duration::from_millis(200));
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.connect(g).unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 256];
        let mut answered = 0;
        let refused = loop {
            let _ = probe.send(b"after");
            match probe.recv(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break true,
                Ok(_) => answered += 1,
                Err(_) => {}
            }
            if t0.elapsed() > Duration::from_secs(1) {
                break false;
            }
        };
        assert_eq!(
            (answered, refused),
            (0, true),
            "removed udp listener {g}: (answers after the removal, refused within 1 s); \
             stderr:\n{}",
            lb.stderr_tail(20)
        );
        // UDP under load may drop a datagram: a few tries, each must be answered correctly.
        let me = client.local_addr();
        let kept = (0..5).find_map(|_| client.request(k, b"kept", REPLY).ok());
        let (from, reply) = kept.expect("no reply from the kept listener in 5 tries");
        assert_eq!(check_reply(me, k, from, &reply, b"kept"), "u");

        // SIGTERM while "keep" is still busy: a clean exit, long before drain_timeout (10 s).
        let t1 = Instant::now();
        lb.signal(nix::sys::signal::Signal::SIGTERM);
        let status = lb.wait_exit(Duration::from_secs(8));
        stop.store(true, Ordering::Relaxed);
        let sent = (sent_gone, load_keep.join().unwrap());
        let status = status.unwrap_or_else(|| {
            panic!(
                "no exit 8 s after SIGTERM under udp load; stderr:\n{}",
                lb.stderr_tail(20)
            )
        });
        assert!(
            status.success(),
            "{status:?}; stderr:\n{}",
            lb.stderr_tail(20)
        );
        eprintln!(
            "exit {:?} after SIGTERM; datagrams sent (gone, keep): {sent:?}",
            t1.elapsed()
        );
        assert!(sent.0 > 100 && sent.1 > 100, "load too small: {sent:?}");
    });
}

/// A network namespace of the test's own (deleted on drop), with loopback up and a veth pair
/// `v0` (10.77.0.1/24) – `v1` (no address): a datagram to 10.77.0.99 waits for an ARP answer
/// that never comes, so a socket sending there fills its buffer. Nothing leaves the namespace.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!("ringlb-udp-{}-{nanos}", std::process::id());
        let ip =
            |args: &[&str]| run_bounded(Command::new("ip").args(args), Duration::from_secs(10));
        let (ok, _, err) = ip(&["netns", "add", &name]);
        if !ok {
            eprintln!("cannot create a network namespace: {err}");
            return None;
        }
        let ns = Netns(name);
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            &["addr", "add", "10.77.0.1/24", "dev", "v0"],
            &["link", "set", "v0", "up"],
            &["link", "set", "v1", "up"],
        ] {
            let mut full = vec!["-n", ns.0.as_str()];
            full.extend_from_slice(args);
            let (ok, _, err) = ip(&full);
            assert!(ok, "ip {}: {err}", full.join(" "));
        }
        Some(ns)
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates live there.
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("ip").args(["netns", "del", &self.0]),
            Duration::from_secs(10),
        );
    }
}

/// A flow whose backend never answers ARP fills its upstream socket's buffer; its datagrams are
/// dropped (and counted) from then on, and the listener goes on serving every other client.
/// (Before the fix, each of the listener's receive slots ended up parked behind a send that
/// could not complete, and the listener stopped reading: 0 of 10 replies.)
#[test]
fn a_backend_that_never_resolves_does_not_stall_the_listener() {
    if !have("ip") {
        eprintln!("skipped: needs iproute2 (.ci/run installs it) and root");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("skipped: no network namespaces here");
        return;
    };
    // Inside the namespace the ports are ours alone.
    let toml =
        "[runtime]\nworkers = 1\ndrain_timeout = \"1s\"\n[admin]\nbind = \"127.0.0.1:9900\"\n\
                [[listeners]]\nname = \"u\"\nbind = \"127.0.0.1:7000\"\nprotocol = \"udp\"\n\
                backends = [ { address = \"10.77.0.99:53\" }, { address = \"127.0.0.1:7001\" } ]\n";
    let cfg = TempFile::new("netns-udp", "toml", toml);
    // Killed and reaped on drop (before the namespace is deleted), even when the test panics.
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut lb = Command::new("ip")
        .args(["netns", "exec", &ns.0, ringlb_bin(), "run", "--config"])
        .arg(cfg.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped)
        .expect("spawn ringlb in the namespace");
    let stderr = lb.0.stderr.take().expect("stderr");
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let outcome = ns.within(|| {
        let echo = UdpSocket::bind("127.0.0.1:7001").expect("bind echo");
        echo.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        // Stops the echo thread however the scope is left (a panic included), so that the
        // scope, which joins it, cannot wait forever.
        struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        std::thread::scope(|s| {
            let _stop_echo = StopOnDrop(&stop);
            s.spawn(|| {
                let mut buf = [0u8; 2048];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok((n, from)) = echo.recv_from(&mut buf) {
                        let _ = echo.send_to(&buf[..n], from);
                    }
                }
            });
            let lb_addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
            let client = || {
                let c = UdpSocket::bind(("127.0.0.1", 0)).expect("bind client");
                c.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                c
            };
            // Round robin: of two new clients, one flow goes to each backend. Wait for ringlb
            // to listen by retrying the first exchange.
            let (a, b) = (client(), client());
            let mut buf = [0u8; 2048];
            let answered = |c: &UdpSocket, buf: &mut [u8]| {
                c.send_to(b"hello", lb_addr).is_ok() && c.recv_from(buf).is_ok()
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            let (live, dead) = loop {
                let first = answered(&a, &mut buf);
                let second = answered(&b, &mut buf);
                match (first, second) {
                    (true, false) => break (a, b),
                    (false, true) => break (b, a),
                    _ if Instant::now() > deadline => {
                        stop.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(format!("clients answered: {first} {second}"));
                    }
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            // Far more than the flow's send buffer holds while ARP is pending.
            for _ in 0..3000 {
                let _ = dead.send_to(&[7u8; 64], lb_addr);
            }
            std::thread::sleep(Duration::from_millis(200));
            let replies = (0..10)
                .filter(|i| {
                    live.send_to(format!("ping {i}").as_bytes(), lb_addr)
                        .is_ok()
                        && live.recv_from(&mut buf).is_ok()
                })
                .count();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(replies)
        })
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lb.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb.0.try_wait().expect("try_wait").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = lb.0.kill();
    let status = lb.0.wait().expect("wait");
    let log = log.join().expect("log");
    let replies = outcome.unwrap_or_else(|e| panic!("{e}\nringlb stderr:\n{log}"));
    assert_eq!(replies, 10, "live client's replies; ringlb stderr:\n{log}");
    assert!(status.success(), "ringlb exit {status:?}; stderr:\n{log}");
}
