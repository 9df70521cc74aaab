//! The admin endpoint end to end through the real binary (2 workers): `/metrics` parsed as
//! Prometheus text and checked against traffic counted on the client side, `/status` JSON,
//! `/livez`, `/readyz`, 404s, `POST /reload` with a good and a broken file, the access log, the
//! build, reload and process metrics, and `/status` saying why a backend is down or at weight 0.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::admin::{http_get, http_post, metric, metric_sum, samples, scrape};
use common::dead_addr;
use common::*;
use prometheus_parse::{Scrape, Value};

/// How long a test waits for counters to settle after its connections closed.
const SETTLE: Duration = Duration::from_secs(2);

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin endpoint line; stderr:\n{}", lb.stderr_tail(20)))
}

/// Every metric family ringlb exports, with its Prometheus type.
const FAMILIES: [(&str, &str); 27] = [
    ("ringlb_connections_total", "counter"),
    ("ringlb_active_connections", "gauge"),
    ("ringlb_bytes_total", "counter"),
    ("ringlb_connect_errors_total", "counter"),
    ("ringlb_backend_up", "gauge"),
    ("ringlb_health_checks_total", "counter"),
    ("ringlb_health_flips_total", "counter"),
    ("ringlb_ejections_total", "counter"),
    ("ringlb_accepted_total", "counter"),
    ("ringlb_listener_active_connections", "gauge"),
    ("ringlb_no_backend_total", "counter"),
    ("ringlb_closes_total", "counter"),
    ("ringlb_maglev_slots_moved_total", "counter"),
    ("ringlb_snapshot_generation", "gauge"),
    ("ringlb_worker_heartbeat_age_milliseconds", "gauge"),
    ("ringlb_build_info", "gauge"),
    ("ringlb_io_backend_info", "gauge"),
    ("ringlb_reloads_total", "counter"),
    ("ringlb_config_last_reload_successful", "gauge"),
    (
        "ringlb_config_last_reload_success_timestamp_seconds",
        "gauge",
    ),
    ("ringlb_admin_connections", "gauge"),
    ("ringlb_admin_connections_refused_total", "counter"),
    ("process_cpu_seconds_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_start_time_seconds", "gauge"),
];

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Counter(_) => "counter",
        Value::Gauge(_) => "gauge",
        Value::Histogram(_) => "histogram",
        Value::Summary(_) => "summary",
        Value::Untyped(_) => "untyped (no TYPE line)",
    }
}

/// Every family has a HELP text, a TYPE of the right kind and at least one sample, and no
/// sample is outside a documented family.
fn assert_families(s: &Scrape) {
    for (name, want) in FAMILIES {
        let help = s.docs.get(name).map(String::as_str).unwrap_or("");
        assert!(!help.trim().is_empty(), "{name}: no HELP text");
        let mut n = 0;
        for sample in samples(s, name, &[]) {
            n += 1;
            assert_eq!(kind(&sample.value), want, "{name}{{{}}}", sample.labels);
        }
        assert!(n > 0, "{name}: no sample");
    }
    for sample in &s.samples {
        assert!(
            s.docs.contains_key(&sample.metric),
            "sample of undocumented family {}",
            sample.metric
        );
    }
}

#[test]
fn metrics_match_the_traffic_exactly() {
    let a = EchoServer::start();
    let b = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web")
        .backend(a.addr())
        .backend(b.addr())]));
    let admin = admin(&lb);
    let web = lb.addr("web");
    assert_families(&scrape(admin));

    const N: u64 = 25;
    let mut sent = 0u64;
    for i in 0..N {
        // Different sizes, one of them past a pipe's default 64 KiB.
        let len = 100 + 37 * i + if i == 7 { 200_000 } else { 0 };
        echo(web, len, 0xad41_0000 + i);
        sent += len;
    }
    // The echo checked every byte came back, so the client received `sent` bytes too.
    let received = sent;
    let listener_labels = [("listener", "web")];
    let mut s = scrape(admin);
    let settled = wait_until(SETTLE, || {
        s = scrape(admin);
        metric_sum(&s, "ringlb_closes_total", &listener_labels) == N as f64
            && metric_sum(&s, "ringlb_active_connections", &listener_labels) == 0.0
    });
    assert!(
        settled,
        "within {SETTLE:?} of the last close: closes {} (want {N}), active {} (want 0)",
        metric_sum(&s, "ringlb_closes_total", &listener_labels),
        metric_sum(&s, "ringlb_active_connections", &listener_labels)
    );

    assert_families(&s);
    let sum = |name: &str, labels: &[(&str, &str)]| metric_sum(&s, name, labels);
    assert_eq!(sum("ringlb_connections_total", &listener_labels), N as f64);
    for e in [&a, &b] {
        let addr = e.addr().to_string();
        let labels = [("listener", "web"), ("backend", addr.as_str())];
        assert_eq!(
            metric(&s, "ringlb_connections_total", &labels),
            Some(e.accepted() as f64),
            "connections to {addr}: LB vs backend count"
        );
    }
    assert_eq!(
        metric(&s, "ringlb_accepted_total", &listener_labels),
        Some(N as f64)
    );
    assert_eq!(
        sum(
            "ringlb_bytes_total",
            &[("listener", "web"), ("direction", "to_backend")]
        ),
        sent as f64
    );
    assert_eq!(
        sum(
            "ringlb_bytes_total",
            &[("listener", "web"), ("direction", "to_client")]
        ),
        received as f64
    );
    assert_eq!(
        metric(&s, "ringlb_listener_active_connections", &listener_labels),
        Some(0.0)
    );
    let reason = [("listener", "web"), ("reason", "client_eof")];
    assert_eq!(metric(&s, "ringlb_closes_total", &reason), Some(N as f64));
    assert_eq!(sum("ringlb_connect_errors_total", &listener_labels), 0.0);
    assert_eq!(sum("ringlb_no_backend_total", &listener_labels), 0.0);
    assert_eq!(sum("ringlb_backend_up", &listener_labels), 2.0);
    let generation = metric(&s, "ringlb_snapshot_generation", &listener_labels);
    assert!(
        generation.is_some_and(|g| g >= 1.0),
        "snapshot generation {generation:?}"
    );
    let heartbeats: Vec<f64> = samples(&s, "ringlb_worker_heartbeat_age_milliseconds", &[])
        .map(common::admin::sample_value)
        .collect();
    assert_eq!(heartbeats.len(), WORKERS, "one heartbeat per worker");
}

/// `/status` of the LB, parsed.
fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(admin, "/status");
    assert_eq!(code, 200, "/status: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}):\n{body}"))
}

#[test]
fn status_probes_and_reload_over_http() {
    let a = EchoServer::start();
    let b = EchoServer::start();
    let config = ringlb_config([listener("web").weighted(a.addr(), 3).weighted(b.addr(), 1)]);
    let lb = Lb::start(&config);
    let admin = admin(&lb);
    let web = lb.addr("web");
    for i in 0..8 {
        echo(web, 10, 0xad41_0100 + i);
    }

    let mut st = status(admin);
    let settled = wait_until(SETTLE, || {
        st = status(admin);
        st["listeners"][0]["active_connections"] == 0
    });
    assert!(settled, "connections still active in /status:\n{st:#}");
    let listeners = st["listeners"].as_array().expect("listeners array");
    assert_eq!(listeners.len(), 1, "{st:#}");
    let l = &listeners[0];
    assert_eq!(l["name"], "web");
    assert_eq!(l["bind"], web.to_string());
    assert_eq!(l["balance"], "round_robin");
    assert!(l["generation"].as_u64().is_some_and(|g| g >= 1), "{l:#}");
    assert_eq!(l["backends_up"], 2);
    let backends = l["backends"].as_array().expect("backends array");
    assert_eq!(backends.len(), 2, "{l:#}");
    // Smooth weighted round robin over 8 connections with weights 3:1: exactly 6 and 2.
    for (j, (e, weight, conns)) in [(&a, 3, 6), (&b, 1, 2)].into_iter().enumerate() {
        let got = &backends[j];
        assert_eq!(got["address"], e.addr().to_string(), "{got:#}");
        assert_eq!(got["weight"], weight, "{got:#}");
        assert_eq!(got["up"], true, "{got:#}");
        assert_eq!(got["active_connections"], 0, "{got:#}");
        assert_eq!(got["connections_total"], conns, "{got:#}");
        assert_eq!(got["consecutive_connect_failures"], 0, "{got:#}");
        assert_eq!(e.accepted(), conns as usize, "backend {} count", e.addr());
    }

    assert_eq!(http_get(admin, "/livez"), (200, "ok\n".to_string()));
    assert_eq!(http_get(admin, "/readyz"), (200, "ready\n".to_string()));
    assert_eq!(http_get(admin, "/no-such-page").0, 404);

    let (code, body) = http_post(admin, "/reload");
    assert_eq!(code, 200, "POST /reload with the file unchanged: {body}");

    // A broken file: the reload is refused with the field named, the old config keeps running.
    let needle = format!("address = \"{}\", weight = 3", a.addr());
    assert!(config.contains(&needle), "config layout changed:\n{config}");
    let broken = config.replace(&needle, &format!("address = \"{}\", weight = -1", a.addr()));
    std::fs::write(lb.config_path(), broken).expect("write broken config");
    let (code, body) = http_post(admin, "/reload");
    assert_eq!(code, 400, "POST /reload with weight = -1: {body}");
    assert!(
        body.contains("weight") && body.contains("-1"),
        "the reload error should name the field and the value: {body:?}"
    );
    echo(web, 1000, 0xad41_0200);
    let st = status(admin);
    let weights: Vec<&serde_json::Value> = st["listeners"][0]["backends"]
        .as_array()
        .expect("backends array")
        .iter()
        .map(|b| &b["weight"])
        .collect();
    assert_eq!(weights, [3, 1], "weights after the refused reload:\n{st:#}");
    assert_eq!(http_get(admin, "/readyz").0, 200);
}

#[test]
fn access_log_has_one_line_per_connection() {
    let e = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web")
        .backend(e.addr())
        .set("access_log", "true")]));
    let mark = lb.log_len();
    let mut s = connect(lb.addr("web"));
    let client = s.local_addr().expect("local_addr");
    try_echo_stream(&mut s, 100, 0xad41_0300).expect("echo of 100 bytes");
    drop(s);
    assert!(
        lb.wait_for_log_since(mark, "access: ", SETTLE),
        "no access line; stderr:\n{}",
        lb.stderr_tail(20)
    );
    // Give a (wrong) second line the chance to show.
    std::thread::sleep(Duration::from_millis(200));
    let lines: Vec<String> = lb
        .stderr_lines()
        .into_iter()
        .skip(mark)
        .filter(|l| l.contains("access: "))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one connection, one access line: {lines:#?}"
    );
    let line = &lines[0];
    let rest = &line[line.find("access: ").expect("found above") + "access: ".len()..];
    let (fields, reason) = rest
        .split_once(" reason=")
        .unwrap_or_else(|| panic!("no reason= in {line:?}"));
    let field = |k: &str| {
        fields
            .split(' ')
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {k}= in {line:?}"))
    };
    assert_eq!(field("listener"), "web", "{line}");
    assert_eq!(field("client"), client.to_string(), "{line}");
    assert_eq!(field("backend"), e.addr().to_string(), "{line}");
    assert_eq!(field("bytes_up"), "100", "{line}");
    assert_eq!(field("bytes_down"), "100", "{line}");
    let ms: u64 = field("duration_ms")
        .parse()
        .unwrap_or_else(|err| panic!("duration_ms in {line:?}: {err}"));
    assert!(ms < 10_000, "{line}");
    assert_eq!(reason, "\"client EOF\"", "{line}");
}

/// During a SIGTERM drain the LB is live but not ready: orchestrators stop sending traffic.
#[test]
fn readyz_is_503_while_draining() {
    let backend = EchoServer::start();
    let mut lb = Lb::start(&ringlb_config([listener("web").backend(backend.addr())]));
    let admin = lb.admin_addr().expect("admin address");
    assert_eq!(http_get(admin, "/readyz").0, 200);
    let held = connect(lb.addr("web")); // keeps the drain going
    let mark = lb.log_len();
    lb.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(lb.wait_for_log_since(mark, "draining", Duration::from_secs(3)));
    let (status, body) = http_get(admin, "/readyz");
    assert_eq!(status, 503, "readyz during drain: {body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(http_get(admin, "/livez").0, 200);
    drop(held);
    assert!(lb.wait_exit(Duration::from_secs(5)).is_some());
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// One unlabelled sample that must be there.
fn single(s: &Scrape, name: &str) -> f64 {
    metric(s, name, &[]).unwrap_or_else(|| panic!("no {name}"))
}

#[test]
fn build_reload_and_process_metrics() {
    let e = EchoServer::start();
    let config = ringlb_config([listener("web").backend(e.addr())]);
    let lb = Lb::start(&config);
    let admin = admin(&lb);
    let s = scrape(admin);
    assert_families(&s);
    let build: Vec<_> = samples(&s, "ringlb_build_info", &[]).collect();
    assert_eq!(build.len(), 1);
    assert_eq!(common::admin::sample_value(build[0]), 1.0);
    assert_eq!(
        build[0].labels.get("version"),
        Some(env!("CARGO_PKG_VERSION"))
    );
    let commit = build[0].labels.get("commit").unwrap_or_default();
    assert!(!commit.is_empty(), "no commit label");
    // The backend the suite forced (RINGLB_IO), else what auto picks on this kernel.
    let want = std::env::var("RINGLB_IO").unwrap_or_else(|_| "io_uring".into());
    let io: Vec<_> = samples(&s, "ringlb_io_backend_info", &[]).collect();
    assert_eq!(io.len(), 1, "one io backend sample");
    assert_eq!(io[0].labels.get("backend"), Some(want.as_str()));
    let reloads = |s: &Scrape| {
        (
            metric(s, "ringlb_reloads_total", &[("result", "ok")]),
            metric(s, "ringlb_reloads_total", &[("result", "error")]),
        )
    };
    assert_eq!(reloads(&s), (Some(0.0), Some(0.0)));
    let started = single(&s, "ringlb_config_last_reload_success_timestamp_seconds");
    assert!(
        (unix_now() - started).abs() < 60.0,
        "loaded at {started}, now {}",
        unix_now()
    );
    assert_eq!(single(&s, "ringlb_config_last_reload_successful"), 1.0);

    // Process metrics, against what /proc says from outside.
    let pid = lb.pid();
    let rss = single(&s, "process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 4e9, "RSS {rss}");
    let fds = single(&s, "process_open_fds");
    let seen = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as f64;
    assert!(
        (fds - seen).abs() <= 3.0,
        "process_open_fds {fds}, /proc shows {seen}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .expect("Max open files");
    assert_eq!(single(&s, "process_max_fds"), soft);
    let start = single(&s, "process_start_time_seconds");
    assert!(
        start <= unix_now() + 1.0 && start > unix_now() - 120.0,
        "start {start}"
    );
    let cpu = single(&s, "process_cpu_seconds_total");
    assert!((0.0..1000.0).contains(&cpu), "cpu {cpu}");
    assert!(
        single(&s, "ringlb_admin_connections") >= 1.0,
        "this scrape's own connection"
    );

    // A good reload moves the ok counter and the timestamp, a bad one only the error counter.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(http_post(admin, "/reload").0, 200);
    let s = scrape(admin);
    assert_eq!(reloads(&s), (Some(1.0), Some(0.0)));
    let after_ok = single(&s, "ringlb_config_last_reload_success_timestamp_seconds");
    assert!(after_ok >= started + 1.0, "{started} -> {after_ok}");
    std::fs::write(
        lb.config_path(),
        config.replace("backends = [", "backends = 7 #"),
    )
    .unwrap();
    assert_eq!(http_post(admin, "/reload").0, 400);
    lb.signal(nix::sys::signal::Signal::SIGHUP);
    let mut s = scrape(admin);
    assert!(
        wait_until(SETTLE, || {
            s = scrape(admin);
            reloads(&s) == (Some(1.0), Some(2.0))
        }),
        "reloads after one bad POST and one bad SIGHUP: {:?}",
        reloads(&s)
    );
    assert_eq!(single(&s, "ringlb_config_last_reload_successful"), 0.0);
    assert_eq!(
        single(&s, "ringlb_config_last_reload_success_timestamp_seconds"),
        after_ok
    );
}

/// /status tells a probe failure from a passive ejection, and a drain from a configured 0.
#[test]
fn status_says_why_a_backend_is_down_or_at_weight_zero() {
    let (live, spare) = (EchoServer::start(), EchoServer::start());
    let (dead_checked, dead_passive) = (dead_addr(), dead_addr());
    let config = LbConfig::default()
        .listener(
            listener("checked")
                .backend(live.addr())
                .backend(dead_checked)
                .weighted(spare.addr(), 0)
                .set(
                    "health",
                    "{ interval = \"100ms\", timeout = \"100ms\", fall = 1, rise = 1 }",
                ),
        )
        .listener(
            listener("passive")
                .backend(dead_passive)
                .backend(live.addr())
                .set("passive", "{ consecutive_failures = 2 }"),
        )
        .to_toml();
    let lb = Lb::start(&config);
    let admin = admin(&lb);
    let drain = format!("/backends/checked/{}/drain", live.addr());
    assert_eq!(http_post(admin, &drain).0, 200);
    // Round robin tries the dead backend first for some connections: two failures eject it.
    for i in 0..4 {
        echo(lb.addr("passive"), 100, 0xad_57a7 + i);
    }
    let backend = |st: &serde_json::Value, l: usize, addr: SocketAddr| -> serde_json::Value {
        st["listeners"][l]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .find(|b| b["address"] == addr.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("no backend {addr} in {st:#}"))
    };
    let mut st = status(admin);
    let settled = wait_until(Duration::from_secs(5), || {
        st = status(admin);
        backend(&st, 0, dead_checked)["up"] == false && backend(&st, 1, dead_passive)["up"] == false
    });
    assert!(settled, "the dead backends never went down:\n{st:#}");

    let checked = backend(&st, 0, dead_checked);
    assert_eq!(
        checked["last_probe_error"], "connect refused",
        "{checked:#}"
    );
    assert_eq!(
        checked["down_reason"], "health check failing: connect refused",
        "{checked:#}"
    );
    assert_eq!(checked["ejected_for_seconds"], serde_json::Value::Null);

    let ejected = backend(&st, 1, dead_passive);
    let why = ejected["down_reason"].as_str().unwrap_or_default();
    assert!(why.starts_with("ejected by passive health"), "{ejected:#}");
    let left = ejected["ejected_for_seconds"]
        .as_f64()
        .expect("ejected_for_seconds");
    assert!(
        left > 20.0 && left <= 30.0,
        "default base_ejection_time 30s: {ejected:#}"
    );
    assert_eq!(ejected["last_probe_error"], serde_json::Value::Null);

    let drained = backend(&st, 0, live.addr());
    assert_eq!(
        (
            &drained["weight"],
            &drained["configured_weight"],
            &drained["weight_source"],
            &drained["up"]
        ),
        (&0.into(), &1.into(), &"admin drain".into(), &true.into()),
        "{drained:#}"
    );
    assert_eq!(drained["down_reason"], serde_json::Value::Null);
    let zero = backend(&st, 0, spare.addr());
    assert_eq!(
        (
            &zero["weight"],
            &zero["configured_weight"],
            &zero["weight_source"]
        ),
        (&0.into(), &0.into(), &"config".into()),
        "{zero:#}"
    );
    let normal = backend(&st, 1, live.addr());
    assert_eq!(normal["weight_source"], "config");
    assert_eq!(normal["down_reason"], serde_json::Value::Null);
}
