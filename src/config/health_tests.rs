//! Tests of `[listeners.health]`, `[listeners.passive]` and `access_log`: defaults, explicit
//! values, both TOML string forms of the probe bytes, and one message per kind of mistake.

use super::tests::parse;
use super::*;

/// One listener "web" with `extra` appended after its backends (so `[listeners.health]` tables
/// attach to it).
fn web(extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\n\
         backends = [ {{ address = \"127.0.0.1:9001\" }} ]\n{extra}\n"
    )
}

#[test]
fn health_defaults() {
    let l = parse(&web("[listeners.health]"));
    assert_eq!(
        l.pools[0].health,
        Some(HealthConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            send: None,
            expect: None,
            http: None,
            target: ProbeTarget::default(),
            flap: FlapConfig::default(),
            ready: None,
        })
    );
    assert!(!l.access_log);
    assert_eq!(l.pools[0].passive, PassiveConfig::default());
    // No table: no active checks.
    assert_eq!(parse(&web("")).pools[0].health, None);
}

#[test]
fn health_timeout_default_follows_a_short_interval() {
    let l = parse(&web("[listeners.health]\ninterval = \"300ms\""));
    let h = l.pools[0].health.clone().expect("health");
    assert_eq!(
        (h.interval, h.timeout),
        (Duration::from_millis(300), Duration::from_millis(300))
    );
}

#[test]
fn health_explicit_values_and_escapes() {
    let l = parse(&web(
        "access_log = true\n[listeners.health]\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 1\n\
         fall = 5\nsend = \"PING\\r\\n\"\nexpect = '+PONG\\x0d\\n\\0\\\\'",
    ));
    assert!(l.access_log);
    let h = l.pools[0].health.clone().expect("health");
    assert_eq!(
        (h.interval, h.timeout),
        (Duration::from_secs(1), Duration::from_secs(1))
    );
    assert_eq!((h.rise, h.fall), (1, 5));
    assert_eq!(h.send.as_deref(), Some(&b"PING\r\n"[..]));
    assert_eq!(h.expect.as_deref(), Some(&b"+PONG\r\n\0\\"[..]));
    // expect alone (a greeting check) and the inline-table form.
    let l = parse(&web("health = { expect = \"220 \" }"));
    let h = l.pools[0].health.clone().expect("health");
    assert_eq!((h.send, h.expect.as_deref()), (None, Some(&b"220 "[..])));
}

#[test]
fn health_with_backend_tables() {
    let text = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\n\
                [[listeners.backends]]\naddress = \"127.0.0.1:9001\"\n\
                [listeners.health]\nrise = 4\n[listeners.passive]\nconsecutive_failures = 0\n";
    let l = parse(text);
    assert_eq!(l.pools[0].health.clone().map(|h| h.rise), Some(4));
    assert_eq!(l.pools[0].passive.consecutive_failures, 0);
    assert_eq!(l.pools[0].backends.len(), 1);
}

#[test]
fn passive_explicit_values() {
    let l = parse(&web(
        "[listeners.passive]\nconsecutive_failures = 7\nbase_ejection_time = \"10s\"\n\
         max_ejection_time = \"10s\"\nmax_ejected_percent = 100",
    ));
    assert_eq!(
        l.pools[0].passive,
        PassiveConfig {
            consecutive_failures: 7,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(10),
            max_ejected_percent: 100,
        }
    );
    // A long base raises the default cap with it.
    let l = parse(&web("[listeners.passive]\nbase_ejection_time = \"10m\""));
    assert_eq!(
        l.pools[0].passive.max_ejection_time,
        Duration::from_secs(600)
    );
}

#[test]
fn summary_shows_health_and_passive() {
    let text = web(
        "access_log = true\n[listeners.health]\nsend = \"PING\\r\\n\"\nexpect = \"+PONG\"\n\
         [listeners.passive]\nconsecutive_failures = 0",
    );
    let summary = Config::parse(&text).expect("valid").summary();
    for want in [
        "max_connections 100000, access_log on",
        "health checks: send \"PING\\r\\n\" expect \"+PONG\" every 2s, timeout 1s, rise 2, fall 3",
        "passive ejection: off",
    ] {
        assert!(summary.contains(want), "{want:?} not in:\n{summary}");
    }
    let summary = Config::parse(&web("")).expect("valid").summary();
    assert!(
        summary.contains("passive ejection: after 3 connect failures in a row, for 30s doubling up to 5m, at most 50% of backends"),
        "{summary}"
    );
}

#[test]
fn bad_health_and_passive_name_listener_field_and_value() {
    let h = |body: &str| web(&format!("[listeners.health]\n{body}"));
    let p = |body: &str| web(&format!("[listeners.passive]\n{body}"));
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "timeout above interval",
            h("interval = \"2s\"\ntimeout = \"3s\""),
            "listener \"web\": field \"health.timeout\": \"3s\" must not exceed health.interval (\"2s\")",
        ),
        (
            "default timeout above explicit interval cannot happen, explicit one can",
            h("interval = \"500ms\"\ntimeout = \"1s\""),
            "field \"health.timeout\": \"1s\" must not exceed health.interval (\"500ms\")",
        ),
        (
            "zero interval",
            h("interval = \"0s\""),
            "listener \"web\": field \"health.interval\": \"0s\" must be greater than zero",
        ),
        (
            "zero timeout",
            h("timeout = \"0ms\""),
            "field \"health.timeout\": \"0ms\" must be greater than zero",
        ),
        (
            "bad interval",
            h("interval = \"2\""),
            "field \"health.interval\": \"2\" is not a duration",
        ),
        ("rise 0", h("rise = 0"), "field \"health.rise\": 0 must be between 1 and 4294967295"),
        ("fall negative", h("fall = -1"), "field \"health.fall\": -1 must be between 1"),
        (
            "bad escape",
            h("send = '\\xZZ'"),
            "listener \"web\": field \"health.send\": \"\\xZZ\" has a bad escape: \\x at byte 0 must be followed by two hex digits",
        ),
        (
            "unknown escape",
            h("expect = 'OK\\q'"),
            "field \"health.expect\": \"OK\\q\" has a bad escape: unknown escape \\q at byte 2",
        ),
        (
            "control characters shown escaped",
            h("expect = \"\\r\\n\\\\\""),
            "field \"health.expect\": \"\\r\\n\\\" has a bad escape: a lone '\\' at byte 2",
        ),
        ("empty send", h("send = \"\""), "field \"health.send\": \"\" is empty"),
        ("empty expect", h("expect = ''"), "field \"health.expect\": \"\" is empty"),
        (
            "send too long",
            h(&format!("send = \"{}\"", "x".repeat(MAX_PROBE_BYTES + 1))),
            "field \"health.send\"",
        ),
        (
            "unknown health field",
            h("intervall = \"1s\""),
            "unknown field `intervall`",
        ),
        (
            "negative consecutive_failures",
            p("consecutive_failures = -1"),
            "field \"passive.consecutive_failures\": -1 must be between 0 (off) and 4294967295",
        ),
        (
            "zero base ejection time",
            p("base_ejection_time = \"0s\""),
            "field \"passive.base_ejection_time\": \"0s\" must be greater than zero",
        ),
        (
            "max below base",
            p("base_ejection_time = \"1m\"\nmax_ejection_time = \"30s\""),
            "field \"passive.max_ejection_time\": \"30s\" must not be shorter than passive.base_ejection_time (\"1m\")",
        ),
        (
            "percent above 100",
            p("max_ejected_percent = 101"),
            "field \"passive.max_ejected_percent\": 101 must be between 0 and 100",
        ),
        (
            "unknown passive field",
            p("consecutive_failure = 2"),
            "unknown field `consecutive_failure`",
        ),
        ("access_log not a bool", web("access_log = \"yes\""), "access_log"),
    ];
    for (what, text, want) in cases {
        let err = match Config::parse(&text) {
            Ok(_) => panic!("{what}: accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(want), "{what}: {want:?} not in:\n{err}");
    }
}
