//! Live but not ready, end to end through the real binary (2 workers) with real HTTP servers on
//! loopback: an HTTP readiness check whose `/ready` flips between 200 and 503 (open connections
//! stay, new ones go elsewhere and come back after `rise`; `/readyz` and `ringlb_backend_state`
//! follow), a Patroni-like pair where only the primary answers 200 on `/primary` of a shared API
//! port (the health block's `port`), slow start measured as the share of new connections over
//! the window, and flap damping holding a backend that fails every 2 s.
//!
//! Timing bounds follow the configured intervals plus a fixed slack; every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::admin::{http_get, http_post, metric, scrape};
use common::http::{who, who_closed, HttpClient, HttpServer};
use common::*;

const SLACK: Duration = Duration::from_secs(3);

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin endpoint line; stderr:\n{}", lb.stderr_tail(20)))
}

fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(admin, "/status");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

/// `/status` of backend `addr` of listener `name`.
fn backend_status(admin: SocketAddr, name: &str, addr: SocketAddr) -> serde_json::Value {
    let s = status(admin);
    let l = s["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .unwrap_or_else(|| panic!("no listener {name} in {s}"))
        .clone();
    l["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["address"] == addr.to_string()))
        .unwrap_or_else(|| panic!("no backend {addr} in {l}"))
        .clone()
}

fn state_of(admin: SocketAddr, name: &str, addr: SocketAddr) -> String {
    backend_status(admin, name, addr)["state"]
        .as_str()
        .unwrap_or("?")
        .to_string()
}

fn await_state(lb: &Lb, name: &str, addr: SocketAddr, want: &str, within: Duration) {
    let a = admin(lb);
    assert!(
        wait_until(within, || state_of(a, name, addr) == want),
        "backend {addr} never reached state {want:?} within {within:?}: {}\nstderr:\n{}",
        backend_status(a, name, addr),
        lb.stderr_tail(30)
    );
}

/// Names reached by `n` fresh connections.
fn spread(lb: SocketAddr, n: usize) -> Vec<String> {
    (0..n).map(|_| who(lb)).collect()
}

#[test]
fn ready_check_flips_move_new_connections_and_keep_open_ones() {
    let a = HttpServer::start("a");
    let b = HttpServer::start("b");
    a.set("/ready", 503);
    b.set("/ready", 503);
    let l = listener("web")
        .backend(a.addr())
        .backend(b.addr())
        .set(
            "health",
            "{ interval = \"200ms\", timeout = \"150ms\", ready = { interval = \"200ms\", \
             timeout = \"150ms\", rise = 2, fall = 2, http = { path = \"/ready\" } } }",
        )
        .set("passive", "{ consecutive_failures = 0 }");
    let lb = Lb::start(&ringlb_config([l]));
    let adm = admin(&lb);
    let addr = lb.addr("web");

    // Neither ready: both not_ready (a readiness check starts not ready), /readyz says so.
    await_state(&lb, "web", a.addr(), "not_ready", SLACK);
    await_state(&lb, "web", b.addr(), "not_ready", SLACK);
    let (code, body) = http_get(adm, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("listener \"web\": no healthy backend (0/2 up: 2 not_ready)"),
        "/readyz names the state: {body:?}"
    );
    let m = scrape(adm);
    let lbl = |st: &str, who: SocketAddr| {
        metric(
            &m,
            "ringlb_backend_state",
            &[
                ("listener", "web"),
                ("backend", &who.to_string()),
                ("state", st),
            ],
        )
    };
    assert_eq!(lbl("not_ready", a.addr()), Some(1.0));
    assert_eq!(lbl("up", a.addr()), Some(0.0));
    assert!(
        backend_status(adm, "web", a.addr())["down_reason"]
            .as_str()
            .is_some_and(|r| r.contains("readiness check failing: HTTP 503, expected 200")),
        "{}",
        backend_status(adm, "web", a.addr())
    );

    // Both ready: one passing probe each (the first probe decides), traffic to both.
    a.set("/ready", 200);
    b.set("/ready", 200);
    await_state(&lb, "web", a.addr(), "up", SLACK);
    await_state(&lb, "web", b.addr(), "up", SLACK);
    assert_eq!(http_get(adm, "/readyz").0, 200);
    let names = spread(addr, 20);
    assert!(
        names.iter().any(|n| n == "a") && names.iter().any(|n| n == "b"),
        "{names:?}"
    );

    // Hold a connection to a open, then a stops being ready.
    let mut held = loop {
        let mut c = HttpClient::connect(addr).expect("connect");
        if c.get("/who").expect("first request").1 == "a" {
            break c;
        }
    };
    a.set("/ready", 503);
    await_state(&lb, "web", a.addr(), "not_ready", SLACK);
    // New connections all go to b; the open one still reaches a and still works.
    let names = spread(addr, 20);
    assert!(names.iter().all(|n| n == "b"), "{names:?}");
    assert_eq!(
        held.get("/who").expect("held connection after not ready").1,
        "a"
    );
    assert!(a.open_clients() >= 1, "a's open connection was closed");
    // /readyz: b is ready, so the listener is.
    assert_eq!(http_get(adm, "/readyz").0, 200);

    // Ready again: after rise (2) probes, new connections reach a again.
    let t = Instant::now();
    a.set("/ready", 200);
    await_state(&lb, "web", a.addr(), "up", SLACK);
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "rise 2 needs two probes"
    );
    let names = spread(addr, 20);
    assert!(names.iter().any(|n| n == "a"), "{names:?}");
    assert_eq!(held.get("/who").expect("held connection at the end").1, "a");
    assert!(
        lb.wait_for_log("is NOT READY", Duration::ZERO),
        "{}",
        lb.stderr_tail(20)
    );
}

/// A free port on both 127.0.0.2 and 127.0.0.3: the Patroni pair's shared API port.
fn patroni_pair() -> (HttpServer, HttpServer) {
    for _ in 0..50 {
        let first = HttpServer::bind("api-2", "127.0.0.2:0".parse().unwrap()).expect("bind");
        let port = first.addr().port();
        if let Ok(second) = HttpServer::bind("api-3", SocketAddr::from(([127, 0, 0, 3], port))) {
            return (first, second);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3 in 50 tries");
}

#[test]
fn patroni_pair_sends_everything_to_the_primary_and_follows_a_swap() {
    let (api2, api3) = patroni_pair();
    api2.set("/primary", 200);
    api3.set("/primary", 503);
    // The "databases": both accept connections; which one a client reaches is its name.
    let db2 = HttpServer::bind("db-2", "127.0.0.2:0".parse().unwrap()).expect("bind db-2");
    let db3 = HttpServer::bind("db-3", "127.0.0.3:0".parse().unwrap()).expect("bind db-3");
    let port = api2.addr().port();
    let l = listener("pg")
        .backend(db2.addr())
        .backend(db3.addr())
        .set("on_backend_down", "\"close\"")
        .set(
            "health",
            &format!(
                "{{ interval = \"200ms\", timeout = \"150ms\", rise = 1, fall = 1, port = {port}, \
                 http = {{ path = \"/primary\", expect_status = [200] }} }}"
            ),
        )
        .set("passive", "{ consecutive_failures = 0 }");
    let lb = Lb::start(&ringlb_config([l]));
    let addr = lb.addr("pg");
    await_state(&lb, "pg", db3.addr(), "down", SLACK);
    assert_eq!(state_of(admin(&lb), "pg", db2.addr()), "up");
    assert!(
        wait_until(SLACK, || api2.hits("/primary") >= 1
            && api3.hits("/primary") >= 1),
        "probes go to the API port"
    );
    assert_eq!(
        db2.hits("/primary") + db3.hits("/primary"),
        0,
        "no probe on the database port"
    );
    let names = spread(addr, 20);
    assert!(names.iter().all(|n| n == "db-2"), "{names:?}");

    // Clients on the old primary.
    let mut old: Vec<HttpClient> = (0..3)
        .map(|_| HttpClient::connect(addr).expect("connect"))
        .collect();
    for c in &mut old {
        assert_eq!(c.get("/who").expect("request").1, "db-2");
    }
    // Failover: 3 is promoted, 2 demoted.
    api3.set("/primary", 200);
    api2.set("/primary", 503);
    await_state(&lb, "pg", db2.addr(), "down", SLACK);
    await_state(&lb, "pg", db3.addr(), "up", SLACK);
    let names = spread(addr, 20);
    assert!(names.iter().all(|n| n == "db-3"), "{names:?}");
    // on_backend_down = "close": the old primary's clients are cut.
    assert!(
        wait_until(SLACK, || db2.open_clients() == 0),
        "old primary still has {} client connections",
        db2.open_clients()
    );
    for c in &mut old {
        assert!(
            c.get("/who").is_err(),
            "a connection to the demoted primary survived"
        );
    }
}

/// Slow start: b comes back (undrained) and ramps 10% → 100% over 6 s; its share of new
/// connections in each second is compared with the ramp's (±10 points).
fn slow_start_share(balance: &str) {
    const WINDOW: f64 = 6.0;
    let a = HttpServer::start("a");
    let b = HttpServer::start("b");
    let l = listener("web")
        .balance(balance)
        .backend(a.addr())
        .backend(b.addr())
        .set("slow_start", "\"6s\"");
    let lb = Lb::start(&ringlb_config([l]));
    let adm = admin(&lb);
    let addr = lb.addr("web");
    let path = format!("/backends/web/{}/drain", b.addr());
    assert_eq!(http_post(adm, &path).0, 200);
    assert!(spread(addr, 10).iter().all(|n| n == "a"));
    assert_eq!(state_of(adm, "web", b.addr()), "drained");
    let (code, body) = http_post(adm, &format!("/backends/web/{}/undrain", b.addr()));
    assert_eq!(code, 200, "{body}");
    let t0 = Instant::now();
    let pct = backend_status(adm, "web", b.addr())["slow_start_percent"].as_u64();
    assert!(
        pct.is_some_and(|p| p < 30),
        "ramp visible in /status: {pct:?}"
    );
    // Buckets of one second; at most 4,000 connections each, bounded by time.
    let mut buckets = vec![(0usize, 0usize); WINDOW as usize + 1];
    while t0.elapsed() < Duration::from_secs_f64(WINDOW + 1.0) {
        let k = t0.elapsed().as_secs() as usize;
        if k >= buckets.len() || buckets[k].0 >= 4000 {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let name = who_closed(addr);
        buckets[k].0 += 1;
        buckets[k].1 += usize::from(name == "b");
    }
    eprintln!("{balance}: per second (connections, to b): {buckets:?}");
    for (k, &(n, to_b)) in buckets.iter().enumerate() {
        assert!(n >= 100, "{balance}: second {k}: only {n} connections");
        let share = to_b as f64 / n as f64;
        // The ramp's mean share of b over this second (a at weight 1, b at w(t)).
        let steps = 50;
        let want: f64 = (0..steps)
            .map(|i| {
                let t = k as f64 + (i as f64 + 0.5) / steps as f64;
                let w = if t >= WINDOW {
                    1.0
                } else {
                    0.1 + 0.9 * t / WINDOW
                };
                w / (1.0 + w)
            })
            .sum::<f64>()
            / steps as f64;
        assert!(
            (share - want).abs() <= 0.10,
            "{balance}: second {k}: b got {share:.3} of new connections, the ramp says {want:.3}"
        );
    }
    assert_eq!(
        backend_status(adm, "web", b.addr())["slow_start_percent"],
        100
    );
}

#[test]
fn slow_start_ramps_round_robin() {
    slow_start_share("round_robin");
}

#[test]
fn slow_start_ramps_random() {
    slow_start_share("random");
}

#[test]
fn slow_start_ramps_power_of_two() {
    slow_start_share("power_of_two");
}

#[test]
fn flapping_backend_is_held_down_doubled_and_released_once_stable() {
    let a = HttpServer::start("a");
    let b = HttpServer::start("b");
    a.set("/health", 200);
    b.set("/health", 200);
    let l = listener("web")
        .backend(a.addr())
        .backend(b.addr())
        .set(
            "health",
            "{ interval = \"100ms\", timeout = \"80ms\", rise = 1, fall = 1, \
             http = { path = \"/health\" }, flap_threshold = 4, flap_window = \"8s\", \
             flap_hold = \"3s\" }",
        )
        .set("passive", "{ consecutive_failures = 0 }");
    let lb = Lb::start(&ringlb_config([l]));
    let adm = admin(&lb);
    let mark = lb.log_len();
    // b fails every 2 s (down 1 s, up 1 s): a change every second.
    let flip_until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut healthy = true;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what}: not in time; stderr:\n{}",
                lb.stderr_tail(30)
            );
            healthy = !healthy;
            b.set("/health", if healthy { 200 } else { 503 });
            std::thread::sleep(Duration::from_secs(1));
        }
        b.set("/health", 200);
    };
    flip_until("first hold", &|| {
        lb.stderr_lines()
            .iter()
            .skip(mark)
            .any(|l| l.contains("held down for 3s"))
    });
    let line = lb
        .stderr_lines()
        .into_iter()
        .skip(mark)
        .find(|l| l.contains("held down for"))
        .unwrap();
    assert!(
        line.contains("more than 4 state changes within 8s") && line.contains("hold #1"),
        "{line}"
    );
    // Held: down although its check passes; new connections avoid it.
    await_state(&lb, "web", b.addr(), "down", SLACK);
    let st = backend_status(adm, "web", b.addr());
    assert!(
        st["down_reason"]
            .as_str()
            .is_some_and(|r| r.contains("flap damping")),
        "{st}"
    );
    assert!(spread(lb.addr("web"), 10).iter().all(|n| n == "a"));
    let holds = |m: &prometheus_parse::Scrape| {
        metric(
            m,
            "ringlb_backend_flap_holds_total",
            &[("listener", "web"), ("backend", &b.addr().to_string())],
        )
    };
    assert_eq!(holds(&scrape(adm)), Some(1.0));
    // Still flapping through the hold: held again, twice as long.
    flip_until("second hold", &|| {
        lb.stderr_lines()
            .iter()
            .skip(mark)
            .any(|l| l.contains("held down again for 6s"))
    });
    assert_eq!(holds(&scrape(adm)), Some(2.0));
    // Stable from now on: released when the 6 s hold ends (the 8 s before then hold at most
    // the few changes made early in this hold, not more than 4): back to up.
    let t = Instant::now();
    await_state(
        &lb,
        "web",
        b.addr(),
        "up",
        Duration::from_secs(6) + SLACK * 3,
    );
    assert!(
        t.elapsed() >= Duration::from_secs(4),
        "released before its hold ran out"
    );
    assert!(lb.wait_for_log("released from its flap hold", Duration::ZERO));
    let names = spread(lb.addr("web"), 20);
    assert!(names.iter().any(|n| n == "b"), "{names:?}");
    // One warning per hold, not one per probe.
    let warns = lb
        .stderr_lines()
        .iter()
        .skip(mark)
        .filter(|l| l.contains("flap damping"))
        .count();
    assert_eq!(warns, 2, "{}", lb.stderr_tail(40));
}
