//! Tests of the operational listener settings (`drain_timeout`, `tcp_keepalive`, `queue_timeout`,
//! `proxy_protocol`, `accept_proxy_protocol`, `proxy_protocol_timeout`) and of the per-backend
//! `max_connections` and drain weight 0: defaults, explicit values, the summary, the examples, and
//! one message per kind of mistake.

use super::tests::{error, parse};
use super::*;
use crate::proxy_protocol::Version;

/// One listener "web" with `lines` before a one-backend list.
fn web_with(lines: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\n{lines}\n\
         backends = [ {{ address = \"127.0.0.1:9001\" }} ]\n"
    )
}

/// One listener "db" with the given inline backend list.
fn db_with_backends(backends: &str) -> String {
    format!("[[listeners]]\nname = \"db\"\nbind = \"127.0.0.1:5432\"\nbackends = [ {backends} ]\n")
}

#[test]
fn defaults() {
    let l = parse(&web_with(""));
    assert_eq!(l.drain_timeout, None);
    assert!(!l.close_on_backend_down, "keep, as HAProxy and Envoy");
    assert_eq!(l.tcp_keepalive, Some(Duration::from_secs(60)));
    assert_eq!(l.queue_timeout, Duration::from_secs(5));
    assert_eq!(l.proxy_protocol, None);
    assert!(!l.accept_proxy_protocol);
    assert_eq!(l.proxy_protocol_timeout, Duration::from_secs(3));
    assert_eq!(l.pools[0].backends[0].max_connections, None);
    assert_eq!(l.pools[0].backends[0].weight, 1);
}

#[test]
fn explicit_values() {
    let l = parse(&web_with(
        "drain_timeout = \"5m\"\ntcp_keepalive = \"30s\"\nqueue_timeout = \"10s\"\n\
         proxy_protocol = \"v2\"\naccept_proxy_protocol = true\nproxy_protocol_timeout = \"500ms\"",
    ));
    assert_eq!(l.drain_timeout, Some(Duration::from_secs(300)));
    assert_eq!(l.tcp_keepalive, Some(Duration::from_secs(30)));
    assert_eq!(l.queue_timeout, Duration::from_secs(10));
    assert_eq!(l.proxy_protocol, Some(Version::V2));
    assert!(l.accept_proxy_protocol);
    assert_eq!(l.proxy_protocol_timeout, Duration::from_millis(500));
    assert!(parse(&web_with("on_backend_down = \"close\"")).close_on_backend_down);
    assert!(!parse(&web_with("on_backend_down = \"keep\"")).close_on_backend_down);
    assert!(parse(&web_with("drain_mode = \"postgres\"")).drain_postgres);
    assert!(!parse(&web_with("drain_mode = \"tcp\"")).drain_postgres);
    assert_eq!(
        parse(&web_with("proxy_protocol = \"v1\"")).proxy_protocol,
        Some(Version::V1)
    );
    assert_eq!(
        parse(&web_with("tcp_keepalive = \"2h\"")).tcp_keepalive,
        Some(Duration::from_secs(7200))
    );
    assert_eq!(
        parse(&web_with("tcp_keepalive = \"32767s\"")).tcp_keepalive,
        Some(MAX_TCP_KEEPALIVE)
    );
}

#[test]
fn zero_values_mean_at_once_or_off() {
    let l = parse(&web_with(
        "drain_timeout = \"0s\"\ntcp_keepalive = \"0s\"\nqueue_timeout = \"0s\"",
    ));
    assert_eq!(l.drain_timeout, Some(Duration::ZERO), "close at once");
    assert_eq!(l.tcp_keepalive, None, "keepalive off");
    assert_eq!(l.queue_timeout, Duration::ZERO, "do not queue");
    assert_eq!(
        parse(&web_with("tcp_keepalive = \"0ms\"")).tcp_keepalive,
        None
    );
}

#[test]
fn backend_max_connections_and_weight_zero() {
    let l = parse(&db_with_backends(
        "{ address = \"10.0.0.1:5432\", max_connections = 90 }, \
         { address = \"10.0.0.2:5432\", weight = 0 }, \
         { address = \"10.0.0.3:5432\", weight = 0, max_connections = 4294967295 }",
    ));
    let got: Vec<(u32, Option<u32>)> = l.pools[0]
        .backends
        .iter()
        .map(|b| (b.weight, b.max_connections))
        .collect();
    assert_eq!(got, [(1, Some(90)), (0, None), (0, Some(u32::MAX))]);
    // All weights 0 is valid: the listener then refuses new connections, like all-down.
    let l = parse(&db_with_backends(
        "{ address = \"10.0.0.1:5432\", weight = 0 }",
    ));
    assert_eq!(l.pools[0].backends[0].weight, 0);
    // Table form too.
    let l = parse(
        "[[listeners]]\nname = \"db\"\nbind = \"127.0.0.1:5432\"\n[[listeners.backends]]\n\
         address = \"10.0.0.1:5432\"\nmax_connections = 1\n",
    );
    assert_eq!(l.pools[0].backends[0].max_connections, Some(1));
}

#[test]
fn summary_shows_them() {
    let text = format!(
        "{}{}",
        web_with(
            "drain_timeout = \"5m\"\ntcp_keepalive = \"0s\"\nqueue_timeout = \"10s\"\n\
             proxy_protocol = \"v2\"\naccept_proxy_protocol = true\nproxy_protocol_timeout = \"2s\"\n\
             on_backend_down = \"close\""
        ),
        db_with_backends(
            "{ address = \"10.0.0.1:5432\", max_connections = 90 }, \
             { address = \"10.0.0.2:5432\", weight = 0 }"
        )
    );
    let summary = Config::parse(&text)
        .unwrap_or_else(|e| panic!("{e}"))
        .summary();
    for want in [
        "  drain_timeout 5m, on_backend_down close, tcp_keepalive off, queue_timeout 10s, \
         proxy_protocol v2, accept_proxy_protocol on (timeout 2s)\n",
        // Defaults.
        "  drain_timeout unlimited, on_backend_down keep, tcp_keepalive 1m, queue_timeout 5s, \
         proxy_protocol off, accept_proxy_protocol off\n",
        "  backend 10.0.0.1:5432 weight 1, max_connections 90\n",
        "  backend 10.0.0.2:5432 weight 0 (drain)\n",
        "  backend 127.0.0.1:9001 weight 1\n",
    ] {
        assert!(summary.contains(want), "{want:?} not in:\n{summary}");
    }
}

#[test]
fn examples_use_every_new_setting() {
    let files = super::tests::examples();
    let listeners: Vec<Listener> = files
        .iter()
        .flat_map(|f| Config::load(f).unwrap_or_else(|e| panic!("{e}")).listeners)
        .collect();
    let any = |what: &str, test: &dyn Fn(&Listener) -> bool| {
        assert!(listeners.iter().any(test), "no example sets {what}");
    };
    // The text check in tests.rs cannot tell these apart from [runtime] drain_timeout and the
    // listener's max_connections, so check the loaded values.
    any("a listener drain_timeout", &|l| l.drain_timeout.is_some());
    any("a backend max_connections", &|l| {
        l.pools[0]
            .backends
            .iter()
            .any(|b| b.max_connections.is_some())
    });
    any("a backend weight 0", &|l| {
        l.pools[0].backends.iter().any(|b| b.weight == 0)
    });
    any("tcp_keepalive other than 60s", &|l| {
        l.tcp_keepalive != Some(DEFAULT_TCP_KEEPALIVE)
    });
    any("queue_timeout other than 5s", &|l| {
        l.queue_timeout != DEFAULT_QUEUE_TIMEOUT
    });
    any("proxy_protocol", &|l| l.proxy_protocol.is_some());
    any("accept_proxy_protocol", &|l| l.accept_proxy_protocol);
    any("on_backend_down = \"close\"", &|l| l.close_on_backend_down);
    any("drain_mode = \"postgres\"", &|l| l.drain_postgres);
}

#[test]
fn bad_values_name_listener_field_and_value() {
    let cases: Vec<(String, &str)> = vec![
        (
            web_with("tcp_keepalive = \"1500ms\""),
            "listener \"web\": field \"tcp_keepalive\": \"1500ms\" must be a whole number of seconds",
        ),
        (
            web_with("tcp_keepalive = \"0.5s\""),
            "listener \"web\": field \"tcp_keepalive\": \"0.5s\" must be a whole number of seconds",
        ),
        (
            web_with("tcp_keepalive = \"32768s\""),
            "listener \"web\": field \"tcp_keepalive\": \"32768s\" must be at most 32767s",
        ),
        (
            web_with("tcp_keepalive = \"60\""),
            "listener \"web\": field \"tcp_keepalive\": \"60\" is not a duration",
        ),
        (
            web_with("on_backend_down = \"shutdown\""),
            "listener \"web\": field \"on_backend_down\": \"shutdown\" is not a policy \
             (expected \"keep\" or \"close\")",
        ),
        (
            web_with("drain_mode = \"pgbouncer\""),
            "listener \"web\": field \"drain_mode\": \"pgbouncer\" is not a drain mode \
             (expected \"tcp\" or \"postgres\")",
        ),
        (
            web_with("drain_timeout = \"forever\""),
            "listener \"web\": field \"drain_timeout\": \"forever\" is not a duration",
        ),
        (
            web_with("queue_timeout = \"-1s\""),
            "listener \"web\": field \"queue_timeout\": \"-1s\" is not a duration",
        ),
        (
            web_with("proxy_protocol = \"v3\""),
            "listener \"web\": field \"proxy_protocol\": \"v3\" is not a PROXY protocol version \
             (expected \"v1\" or \"v2\")",
        ),
        (
            web_with("proxy_protocol = \"V2\""),
            "listener \"web\": field \"proxy_protocol\": \"V2\" is not a PROXY protocol version",
        ),
        (
            web_with("proxy_protocol_timeout = \"0s\""),
            "listener \"web\": field \"proxy_protocol_timeout\": \"0s\" must be greater than zero",
        ),
        (
            web_with("proxy_protocol_timeout = \"3\""),
            "listener \"web\": field \"proxy_protocol_timeout\": \"3\" is not a duration",
        ),
        (
            web_with("accept_proxy_protocol = \"yes\""),
            "listener \"web\": TOML parse error at line 4",
        ),
        (
            web_with("proxy_protocol = true"),
            "listener \"web\": TOML parse error at line 4",
        ),
        (
            db_with_backends(
                "{ address = \"10.0.0.1:5432\" }, { address = \"10.0.0.2:5432\", max_connections = 0 }",
            ),
            "listener \"db\": field \"backends[1].max_connections\": 0 must be ≥ 1 (omit it for \
             no limit)",
        ),
        (
            db_with_backends("{ address = \"10.0.0.1:5432\", max_connections = -5 }"),
            "listener \"db\": field \"backends[0].max_connections\": -5 must be ≥ 1",
        ),
        (
            db_with_backends("{ address = \"10.0.0.1:5432\", max_connections = 4294967296 }"),
            "listener \"db\": field \"backends[0].max_connections\": 4294967296 must be ≤ \
             4294967295 (omit it for no limit)",
        ),
        (
            db_with_backends("{ address = \"10.0.0.1:5432\", max_conections = 9 }"),
            "unknown field `max_conections`",
        ),
    ];
    for (text, want) in cases {
        let err = error(&text);
        assert!(
            err.contains(want),
            "{want:?} not in:\n{err}\n--- for:\n{text}"
        );
    }
}

#[test]
fn accept_proxy_protocol_from_lists_trusted_networks() {
    let l = parse(&web_with(
        "accept_proxy_protocol = true\naccept_proxy_protocol_from = [\"10.0.0.0/8\", \"::1\"]",
    ));
    let nets = l.accept_proxy_protocol_from.expect("a list");
    assert_eq!(nets.len(), 2);
    assert!(nets[0].contains("10.9.8.7".parse().unwrap()));
    assert!(nets[1].contains("::1".parse().unwrap()));
    let c = Config::parse(&web_with("accept_proxy_protocol = true")).unwrap();
    let w = c.warnings(1 << 20);
    assert!(
        w.iter().any(|w| w.contains("listener \"web\": accept_proxy_protocol = true trusts every peer")),
        "{w:?}"
    );
    let c = Config::parse(&web_with(
        "accept_proxy_protocol = true\naccept_proxy_protocol_from = [\"127.0.0.1\"]",
    ))
    .unwrap();
    assert!(c.warnings(1 << 20).is_empty());
    for (lines, want) in [
        (
            "accept_proxy_protocol_from = [\"10.0.0.0/8\"]",
            "listener \"web\": field \"accept_proxy_protocol_from\": is set but accept_proxy_protocol is not true",
        ),
        (
            "accept_proxy_protocol = true\naccept_proxy_protocol_from = []",
            "field \"accept_proxy_protocol_from\": [] trusts nobody",
        ),
        (
            "accept_proxy_protocol = true\naccept_proxy_protocol_from = [\"10.0.0.0/8\", \"10.0.0.1/8\"]",
            "field \"accept_proxy_protocol_from[1]\": \"10.0.0.1/8\" has host bits set (did you mean 10.0.0.0/8?)",
        ),
        (
            "accept_proxy_protocol = true\naccept_proxy_protocol_from = [\"lb.internal\"]",
            "field \"accept_proxy_protocol_from[0]\": \"lb.internal\" is not an IP network",
        ),
    ] {
        let e = error(&web_with(lines));
        assert!(e.contains(want), "{lines}: {e}");
    }
}
