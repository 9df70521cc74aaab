//! DNS-discovered backends and backup servers, end to end through the real binary against a real
//! `dnsmasq` on a free loopback port: SRV and A discovery following record changes within
//! `refresh`, a host-name backend address, the last good set kept while dnsmasq is stopped, an
//! empty answer applied only after `hold`, two instances agreeing on every Maglev pick, `check`
//! printing what names resolve to, and `backup = true` with health flips under every policy.
//!
//! A records come from an `--addn-hosts` file the test rewrites (SIGHUP re-reads it); SRV records
//! are command-line `--srv-host`s, so changing them restarts dnsmasq on the same port. Every wait
//! is bounded and every read has a timeout.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::admin::{http_get, metric, scrape};
use common::dns::Dns;
use common::http::{who, HttpServer};
use common::*;

/// `--srv-host` value: `_web._tcp.ringlb.test` → `target:port`, priority, weight.
fn srv(target: &str, port: u16, priority: u16, weight: u16) -> String {
    format!("_web._tcp.ringlb.test,{target},{port},{priority},{weight}")
}

/// A listener table with `discovery = { ... }` and other lines verbatim.
fn discovery_listener(name: &str, balance: &str, discovery: &str, extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbalance = \"{balance}\"\n\
         discovery = {discovery}\n{extra}\n"
    )
}

fn config(dns: &str, listeners: &str) -> String {
    format!(
        "[runtime]\nworkers = {WORKERS}\ndrain_timeout = \"1s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n{dns}\n{listeners}"
    )
}

/// The backends `n` fresh connections through `lb` reach.
fn reached(lb: SocketAddr, n: usize) -> std::collections::BTreeSet<String> {
    (0..n).map(|_| who(lb)).collect()
}

/// Like [`reached`]; a connection that gets no answer (no backend) counts as `"-"`.
fn try_reached(lb: SocketAddr, n: usize) -> std::collections::BTreeSet<String> {
    (0..n)
        .map(|_| {
            common::http::HttpClient::connect(lb)
                .and_then(|mut c| c.get("/who"))
                .map_or("-".to_string(), |(_, body)| body)
        })
        .collect()
}

fn set(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Waits (bounded) until `n` connections through `lb` reach exactly `want`.
fn wait_reached(lb: SocketAddr, n: usize, want: &[&str], within: Duration, what: &str) {
    let want = set(want);
    let deadline = Instant::now() + within;
    loop {
        let got = try_reached(lb, n);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: connections reach {got:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin line:\n{}", lb.stderr_tail(30)))
}

fn dns_metric(lb: &Lb, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&scrape(admin(lb)), name, labels).unwrap_or(0.0)
}

#[test]
fn srv_discovery_follows_records_and_keeps_connections_of_a_removed_backend() {
    let (b1, b2, b3) = (
        HttpServer::start("b1"),
        HttpServer::start("b2"),
        HttpServer::start("b3"),
    );
    let hosts = "127.0.0.1 b1.ringlb.test\n127.0.0.1 b2.ringlb.test\n127.0.0.1 b3.ringlb.test\n";
    let mut dns = Dns::start(
        hosts,
        &[
            srv("b1.ringlb.test", b1.addr().port(), 0, 1),
            srv("b2.ringlb.test", b2.addr().port(), 0, 1),
        ],
    );
    let toml = config(
        &dns.dns_section(""),
        &discovery_listener(
            "web",
            "round_robin",
            "{ name = \"_web._tcp.ringlb.test\", type = \"SRV\" }",
            "",
        ),
    );
    let lb = Lb::start(&toml);
    let addr = lb.addr("web");
    // The first snapshot already has both (start-up waits for the first answers).
    assert_eq!(reached(addr, 6), set(&["b1", "b2"]));
    assert_eq!(
        dns_metric(&lb, "ringlb_dns_backends", &[("listener", "web")]),
        2.0
    );
    // An open connection to b1 outlives b1 leaving DNS (drain_timeout is unset on the
    // listener: it runs until it ends).
    let mut open = common::http::HttpClient::connect(addr).expect("connect");
    let mut first = String::new();
    for _ in 0..4 {
        let (_, body) = open.get("/who").expect("get");
        if body == "b1" {
            first = body;
            break;
        }
        open = common::http::HttpClient::connect(addr).expect("connect");
    }
    assert_eq!(first, "b1", "no connection reached b1");
    dns.set_srv(&[
        srv("b2.ringlb.test", b2.addr().port(), 0, 1),
        srv("b3.ringlb.test", b3.addr().port(), 0, 1),
    ]);
    wait_reached(
        addr,
        6,
        &["b2", "b3"],
        Duration::from_secs(10),
        "after b1 left DNS",
    );
    let (code, body) = open.get("/who").expect("the open connection still works");
    assert_eq!((code, body.as_str()), (200, "b1"));
    assert!(lb.wait_for_log("dns: backends: 1 added, 1 removed", Duration::from_secs(5)));
    assert!(
        dns_metric(
            &lb,
            "ringlb_dns_resolutions_total",
            &[("listener", "web"), ("result", "ok")]
        ) >= 2.0
    );

    // dnsmasq stopped: resolutions fail, the last good set stays.
    dns.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dns_metric(
        &lb,
        "ringlb_dns_resolutions_total",
        &[("listener", "web"), ("result", "failed")],
    ) < 2.0
    {
        assert!(
            Instant::now() < deadline,
            "no failed resolution counted:\n{}",
            lb.stderr_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(reached(addr, 6), set(&["b2", "b3"]));
    assert_eq!(
        dns_metric(&lb, "ringlb_dns_backends", &[("listener", "web")]),
        2.0
    );
    let (code, _) = http_get(admin(&lb), "/readyz");
    assert_eq!(code, 200);
}

#[test]
fn a_discovery_follows_the_hosts_file_and_applies_an_empty_answer_after_hold() {
    // One port, three loopback addresses: what an A record discovery looks like.
    let port = {
        let s = std::net::TcpListener::bind("127.0.0.21:0").expect("bind");
        s.local_addr().unwrap().port()
    };
    let bind = |ip: [u8; 4], name: &str| {
        HttpServer::bind(name, SocketAddr::from((ip, port))).expect("bind backend")
    };
    let (_a, _b, _c) = (
        bind([127, 0, 0, 21], "a"),
        bind([127, 0, 0, 22], "b"),
        bind([127, 0, 0, 23], "c"),
    );
    let dns = Dns::start(
        "127.0.0.21 web.ringlb.test\n127.0.0.22 web.ringlb.test\n",
        &[],
    );
    let toml = config(
        &dns.dns_section("hold = \"1s\""),
        &discovery_listener(
            "web",
            "least_connections",
            &format!("{{ name = \"web.ringlb.test\", type = \"A\", port = {port} }}"),
            "",
        ),
    );
    let lb = Lb::start(&toml);
    let addr = lb.addr("web");
    assert_eq!(reached(addr, 6), set(&["a", "b"]));
    dns.set_hosts(
        "127.0.0.21 web.ringlb.test\n127.0.0.22 web.ringlb.test\n127.0.0.23 web.ringlb.test\n",
    );
    wait_reached(
        addr,
        9,
        &["a", "b", "c"],
        Duration::from_secs(10),
        "after c joined",
    );
    // No records at all: NXDOMAIN; the set stays for `hold`, then goes.
    let mark = Instant::now();
    dns.set_hosts("127.0.0.9 other.ringlb.test\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = http_get(admin(&lb), "/readyz");
        if code == 503 {
            assert!(body.contains("dns A web.ringlb.test"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pool never emptied:\n{}",
            lb.stderr_tail(20)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        mark.elapsed() >= Duration::from_millis(900),
        "removed before hold: {:?}",
        mark.elapsed()
    );
    assert!(
        dns_metric(
            &lb,
            "ringlb_dns_resolutions_total",
            &[("listener", "web"), ("result", "empty")]
        ) >= 1.0
    );
    assert_eq!(
        dns_metric(&lb, "ringlb_dns_backends", &[("listener", "web")]),
        0.0
    );
    // Back: served again.
    dns.set_hosts("127.0.0.23 web.ringlb.test\n");
    wait_reached(
        addr,
        3,
        &["c"],
        Duration::from_secs(10),
        "after c came back",
    );
}

/// `discovery` in a named `[[listeners.pools]]` (routes choose it): the pool takes the A
/// records, follows a change within `refresh`, and its metrics carry the pool label.
#[test]
fn a_named_pool_takes_its_backends_from_discovery() {
    let port = {
        let s = std::net::TcpListener::bind("127.0.0.31:0").expect("bind");
        s.local_addr().unwrap().port()
    };
    let bind = |ip: [u8; 4], name: &str| {
        HttpServer::bind(name, SocketAddr::from((ip, port))).expect("bind backend")
    };
    let (_a, _b) = (bind([127, 0, 0, 31], "a"), bind([127, 0, 0, 32], "b"));
    let dns = Dns::start("127.0.0.31 pool.ringlb.test\n", &[]);
    let listener = format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\
         routes = [{{ default = true, pool = \"dyn\" }}]\n\
         [[listeners.pools]]\nname = \"dyn\"\n\
         discovery = {{ name = \"pool.ringlb.test\", type = \"A\", port = {port} }}\n"
    );
    let lb = Lb::start(&config(&dns.dns_section(""), &listener));
    let addr = lb.addr("web");
    assert_eq!(reached(addr, 4), set(&["a"]));
    let labels = [("listener", "web"), ("pool", "dyn")];
    assert_eq!(dns_metric(&lb, "ringlb_dns_backends", &labels), 1.0);
    dns.set_hosts("127.0.0.31 pool.ringlb.test\n127.0.0.32 pool.ringlb.test\n");
    wait_reached(
        addr,
        8,
        &["a", "b"],
        Duration::from_secs(10),
        "after b joined",
    );
    assert_eq!(dns_metric(&lb, "ringlb_dns_backends", &labels), 2.0);
    assert!(
        dns_metric(
            &lb,
            "ringlb_dns_resolutions_total",
            &[("listener", "web"), ("pool", "dyn"), ("result", "ok")]
        ) >= 2.0
    );
}

#[test]
fn host_name_backend_and_check_output_and_unresolved_discovery_is_a_warning() {
    let b1 = HttpServer::start("b1");
    let dns = Dns::start("127.0.0.1 b1.ringlb.test\n", &[]);
    let toml = config(
        &dns.dns_section(""),
        &format!(
            "[[listeners]]\nname = \"named\"\nbind = \"127.0.0.1:0\"\nbackends = [{{ address = \"b1.ringlb.test:{}\" }}]\n\n{}",
            b1.addr().port(),
            discovery_listener(
                "nowhere",
                "maglev",
                "{ name = \"_none._tcp.ringlb.test\", type = \"SRV\" }",
                "maglev_table_size = 101",
            )
        ),
    );
    let file = TempFile::new("dns-check", "toml", &toml);
    let out = run_ringlb(
        &["check", "--config", file.path().to_str().unwrap()],
        Duration::from_secs(20),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("dns: listener \"named\": backends[0].address A+AAAA b1.ringlb.test port {}: 1 backends: {}", b1.addr().port(), b1.addr())),
        "{stdout}"
    );
    assert!(stderr.contains("warning: dns: listener \"nowhere\": discovery SRV _none._tcp.ringlb.test: does not resolve"), "{stderr}");

    let lb = Lb::start(&toml);
    assert_eq!(who(lb.addr("named")), "b1");
    let (code, body) = http_get(admin(&lb), "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(
            "listener \"nowhere\": no healthy backend (0/0 up); dns SRV _none._tcp.ringlb.test:"
        ),
        "{body}"
    );
    // A client of the empty pool is closed, not hung.
    let mut s = TcpStream::connect(lb.addr("nowhere")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(
        std::io::Read::read(&mut s, &mut buf),
        Ok(0) | Err(_)
    ));
}

#[test]
fn two_instances_resolving_one_name_agree_on_every_maglev_pick() {
    let servers: Vec<HttpServer> = (0..4)
        .map(|i| HttpServer::start(&format!("m{i}")))
        .collect();
    let hosts: String = (0..4)
        .map(|i| format!("127.0.0.1 m{i}.ringlb.test\n"))
        .collect();
    let records: Vec<String> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            srv(
                &format!("m{i}.ringlb.test"),
                s.addr().port(),
                0,
                1 + i as u16,
            )
        })
        .collect();
    let dns = Dns::start(&hosts, &records);
    let toml = config(
        &dns.dns_section(""),
        &discovery_listener(
            "hash",
            "maglev",
            "{ name = \"_web._tcp.ringlb.test\", type = \"SRV\" }",
            "maglev_table_size = 1009",
        ),
    );
    let (one, two) = (Lb::start(&toml), Lb::start(&toml));
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40u8 {
        let client = SocketAddr::from(([127, 0, 3, 10 + i], 0));
        let pick = |lb: &Lb| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&client.into()).expect("bind client");
            s.connect_timeout(&lb.addr("hash").into(), Duration::from_secs(5))
                .expect("connect");
            let stream: TcpStream = s.into();
            let mut c = common::http::HttpClient::from_stream(stream);
            c.get("/who").expect("get").1
        };
        let (a, b) = (pick(&one), pick(&two));
        assert_eq!(a, b, "client {client}: the two instances disagree");
        seen.insert(a);
    }
    assert!(seen.len() >= 3, "40 clients reached only {seen:?}");
}

/// `backup = true` under every policy: no traffic while the primary is up, all of it while the
/// primary's check fails, none again once it passes.
#[test]
fn backup_serves_only_while_no_primary_is_eligible() {
    for policy in [
        "round_robin",
        "least_connections",
        "random",
        "power_of_two",
        "maglev",
    ] {
        let (p, b) = (HttpServer::start("primary"), HttpServer::start("backup"));
        p.set("/health", 200);
        b.set("/health", 200);
        let toml = format!(
            "[runtime]\nworkers = {WORKERS}\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"db\"\n\
             bind = \"127.0.0.1:0\"\nbalance = \"{policy}\"\nbackends = [{{ address = \"{}\" }}, {{ address = \"{}\", backup = true }}]\n\
             [listeners.health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\nhttp = {{ path = \"/health\" }}\n",
            p.addr(),
            b.addr()
        );
        let lb = Lb::start(&toml);
        let addr = lb.addr("db");
        wait_reached(addr, 8, &["primary"], Duration::from_secs(5), policy);
        p.set("/health", 503);
        wait_reached(addr, 8, &["backup"], Duration::from_secs(5), policy);
        p.set("/health", 200);
        wait_reached(addr, 8, &["primary"], Duration::from_secs(5), policy);
    }
}
