//! Redis end to end: two real `redis-server` instances behind a Maglev listener with a
//! `PING`/`+PONG` health check, driven through the real binary (2 workers) by `redis-benchmark`
//! and `redis-cli`. Checks that the benchmark completes cleanly and that Maglev keeps one client
//! IP on one node (its keys are where it left them), while different IPs spread over both.

mod common;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use common::admin::{connections_per_backend, per_backend, scrape};
use common::procs::{require_tool, run_ok, tail, try_run, RedisServer};
use common::*;

const LISTENER: &str = "redis";

/// The listener of config/redis.toml with a faster check (interval 500ms) so the test does not
/// wait seconds for the first rise.
fn redis_listener(backends: &[SocketAddr]) -> Listener {
    backends
        .iter()
        .fold(listener(LISTENER).balance("maglev"), |l, a| l.backend(*a))
        .set("hash_key", "\"source_ip\"")
        .set("maglev_table_size", "65537")
        .connect_timeout("1s")
        .idle_timeout("30m")
        .set(
            "health",
            "{ interval = \"500ms\", timeout = \"400ms\", rise = 2, fall = 3, \
             send = \"PING\\r\\n\", expect = \"+PONG\" }",
        )
}

/// Waits (bounded) until `ringlb_backend_up` is 1 for every backend.
fn wait_all_up(lb: &Lb, backends: &[SocketAddr], timeout: Duration) {
    let admin = lb.admin_addr().expect("admin address");
    let mut last = Vec::new();
    let ok = wait_until(timeout, || {
        let s = scrape(admin);
        last = per_backend(&s, "ringlb_backend_up", LISTENER, backends);
        last.iter().all(|v| *v == Some(1.0))
    });
    assert!(
        ok,
        "backends {backends:?} not all up within {timeout:?}: ringlb_backend_up = {last:?}; \
         stderr tail:\n{}",
        lb.stderr_tail(20)
    );
}

fn redis_cli(lb: SocketAddr, args: &[&str]) -> String {
    let cli = require_tool("redis-cli", "redis-tools");
    run_ok(
        Command::new(cli)
            .args(["-h", &lb.ip().to_string(), "-p", &lb.port().to_string()])
            .args(args),
        Duration::from_secs(10),
    )
    .trim_end()
    .to_string()
}

/// `CONFIG GET port` over a connection from `src` (RESP): the port of the node that answered.
fn node_port_from(src: IpAddr, lb: SocketAddr) -> io::Result<u16> {
    let mut s = try_connect_from(SocketAddr::new(src, 0), lb)?;
    s.write_all(b"*3\r\n$6\r\nCONFIG\r\n$3\r\nGET\r\n$4\r\nport\r\n")?;
    // *2 $4 port $N <port>: read until the reply is complete (a few dozen bytes).
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    while reply.iter().filter(|b| **b == b'\n').count() < 5 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {:?}", String::from_utf8_lossy(&reply)),
            ));
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&reply);
    text.lines()
        .nth(4)
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("reply {text:?}")))
}

#[test]
fn redis_benchmark_and_maglev_stickiness_through_ringlb() {
    let t0 = Instant::now();
    let bench = require_tool("redis-benchmark", "redis-tools");
    let a = RedisServer::start("a");
    let b = RedisServer::start("b");
    let nodes = [a.addr(), b.addr()];
    let lb = Lb::start(&ringlb_config([redis_listener(&nodes)]));
    let addr = lb.addr(LISTENER);
    let admin = lb.admin_addr().expect("admin address");
    wait_all_up(&lb, &nodes, Duration::from_secs(10));
    eprintln!("both nodes up {:?} after start", t0.elapsed());

    // The benchmark: four commands, 100,000 requests each, 50 connections (all from 127.0.0.1,
    // so Maglev sends every one to the same node).
    let t_bench = Instant::now();
    let out = try_run(
        Command::new(&bench)
            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
            .args(["-q", "-n", "100000", "-c", "50", "-t", "set,get,incr,lpush"]),
        Duration::from_secs(90),
    )
    .unwrap_or_else(|e| panic!("{e}\nringlb stderr tail:\n{}", lb.stderr_tail(20)));
    let bench_time = t_bench.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = format!(
        "redis-benchmark {} after {bench_time:?}\nstdout:\n{}\nstderr:\n{}\nringlb stderr tail:\n{}",
        out.status,
        tail(&stdout.replace('\r', "\n"), 20),
        tail(&stderr, 20),
        lb.stderr_tail(20)
    );
    assert!(out.status.success(), "{report}");
    let all = format!("{stdout}\n{stderr}").to_ascii_lowercase();
    assert!(!all.contains("error"), "an error in the output: {report}");
    // With -q each test ends with one `NAME: R requests per second, ...` line (progress lines
    // before it are separated by \r).
    let lines: Vec<&str> = stdout
        .split(['\r', '\n'])
        .filter(|l| l.contains("requests per second"))
        .collect();
    for test in ["SET", "GET", "INCR", "LPUSH"] {
        let line = lines
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("{test}:")))
            .unwrap_or_else(|| panic!("no `{test}: ... requests per second` line: {report}"));
        let rps: f64 = line
            .split(':')
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("no rate in {line:?}"));
        assert!(rps > 0.0, "{line:?}");
        eprintln!("redis-benchmark {}", line.trim());
    }
    eprintln!("redis-benchmark: 4 x 100000 requests in {bench_time:?}");
    let s = scrape(admin);
    let conns = connections_per_backend(&s, LISTENER, &nodes);
    eprintln!("connections per node after the benchmark: {conns:?}");

    // Stickiness from one client IP (redis-cli connects from 127.0.0.1): every connection lands
    // on one node, and a key SET through one connection is read back through another.
    let ports: Vec<String> = (0..10)
        .map(|_| redis_cli(addr, &["CONFIG", "GET", "port"]))
        .collect();
    let port: u16 = ports[0]
        .lines()
        .nth(1)
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("CONFIG GET port answered {:?}", ports[0]));
    assert!(
        ports.iter().all(|p| *p == ports[0]),
        "connections from 127.0.0.1 reached different nodes: {ports:?}"
    );
    assert!(
        nodes.iter().any(|n| n.port() == port),
        "node port {port} is none of {nodes:?}"
    );
    let key = format!("ringlb:e2e:{}", std::process::id());
    let value = format!("value-{}", t0.elapsed().as_nanos());
    assert_eq!(redis_cli(addr, &["SET", &key, &value]), "OK");
    assert_eq!(redis_cli(addr, &["GET", &key]), value);
    for n in &nodes {
        let direct = redis_cli(*n, &["GET", &key]);
        let want = if n.port() == port { value.as_str() } else { "" };
        assert_eq!(
            direct, want,
            "GET {key} directly on {n} (the sticky node is 127.0.0.1:{port})"
        );
    }

    // Several client IPs: each stays on its node over several connections, and the IPs spread
    // over both nodes (32 IPs all on one of two nodes would be a 1 in 2^31 table).
    let mut per_node = [0usize; 2];
    for i in 0..32u8 {
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 9, 10 + i));
        let seen: Vec<u16> = (0..3)
            .map(|_| node_port_from(src, addr).unwrap_or_else(|e| panic!("from {src}: {e}")))
            .collect();
        assert!(
            seen.iter().all(|p| *p == seen[0]),
            "client {src} reached several nodes: {seen:?}"
        );
        let idx = nodes
            .iter()
            .position(|n| n.port() == seen[0])
            .unwrap_or_else(|| panic!("node port {} is none of {nodes:?}", seen[0]));
        per_node[idx] += 1;
    }
    eprintln!("32 client IPs per node: {per_node:?}");
    assert!(
        per_node.iter().all(|n| *n > 0),
        "every client IP went to one node: {per_node:?}"
    );
    eprintln!("total {:?}", t0.elapsed());
}
