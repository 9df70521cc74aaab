//! Tests of udp listeners: defaults, `max_flows`, the settings each transport refuses, the health
//! check requirement, shared binds across protocols, the summary and the DNS example.

use super::tests::{error, parse};
use super::*;
use crate::balance::HashKey;

/// One udp listener "dns" with `lines` before a one-backend list and `after` behind it (where
/// `[listeners.health]` tables attach).
fn dns_with(lines: &str, after: &str) -> String {
    format!(
        "[[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:5353\"\nprotocol = \"udp\"\n{lines}\n\
         backends = [ {{ address = \"127.0.0.1:53\" }} ]\n{after}\n"
    )
}

/// One tcp listener "web" (protocol given or left to its default) with `lines`.
fn web_with(protocol: &str, lines: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\n{protocol}\n{lines}\n\
         backends = [ {{ address = \"127.0.0.1:9001\" }} ]\n"
    )
}

const UDP_HEALTH: &str = "[listeners.health]\nsend = 'ping'\nexpect = 'pong'";

#[test]
fn udp_defaults() {
    let l = parse(&dns_with("", ""));
    assert_eq!(l.protocol, Protocol::Udp);
    assert_eq!(l.idle_timeout, Duration::from_secs(30));
    assert_eq!(l.max_flows, 65_536);
    assert_eq!(l.max_flows, DEFAULT_MAX_FLOWS);
    // TCP-only settings keep their defaults (and are ignored by the UDP data plane).
    assert_eq!(l.max_connections, DEFAULT_MAX_CONNECTIONS);
    assert_eq!(l.tcp_keepalive, Some(DEFAULT_TCP_KEEPALIVE));
    assert_eq!(l.queue_timeout, DEFAULT_QUEUE_TIMEOUT);
    assert_eq!(l.proxy_protocol, None);
    assert!(!l.accept_proxy_protocol);
    assert_eq!(l.pools[0].backends[0].max_connections, None);
    assert_eq!(l.pools[0].health, None);
    // TCP keeps its own idle default, and max_flows at the default.
    let tcp = parse(&web_with("", ""));
    assert_eq!(tcp.idle_timeout, Duration::from_secs(3600));
    assert_eq!(tcp.max_flows, DEFAULT_MAX_FLOWS);
    let tcp = parse(&web_with("protocol = \"tcp\"", ""));
    assert_eq!(tcp.protocol, Protocol::Tcp);
}

#[test]
fn udp_explicit_values() {
    let l = parse(&dns_with(
        "balance = \"maglev\"\nhash_key = \"source_ip_port\"\nmaglev_table_size = 251\n\
         idle_timeout = \"5s\"\nmax_flows = 1\nconnect_timeout = \"100ms\"\naccess_log = true\n\
         drain_timeout = \"1s\"",
        "",
    ));
    assert_eq!(l.idle_timeout, Duration::from_secs(5));
    assert_eq!(l.max_flows, 1);
    assert_eq!(l.pools[0].balance, Policy::Maglev);
    assert_eq!(l.pools[0].maglev_table_size, 251);
    // Accepted (and ignored by the data plane).
    assert_eq!(l.connect_timeout, Duration::from_millis(100));
    assert!(l.access_log);
    assert_eq!(l.drain_timeout, Some(Duration::from_secs(1)));
    let l = parse(&dns_with("max_flows = 4294967295", ""));
    assert_eq!(l.max_flows, u32::MAX);
}

#[test]
fn udp_health_checks_take_send_and_expect() {
    let l = parse(&dns_with(
        "",
        "[listeners.health]\ninterval = \"1s\"\ntimeout = \"300ms\"\n\
         send = '\\x12\\x34\\x01\\x00'\nexpect = '\\x12\\x34'",
    ));
    let h = l.pools[0].health.clone().expect("health");
    assert_eq!(h.send.as_deref(), Some(&[0x12, 0x34, 1, 0][..]));
    assert_eq!(h.expect.as_deref(), Some(&[0x12, 0x34][..]));
    assert_eq!(h.timeout, Duration::from_millis(300));
}

#[test]
fn udp_and_tcp_listeners_may_share_an_address() {
    let text = format!(
        "{}[[listeners]]\nname = \"dns-tcp\"\nbind = \"127.0.0.1:5353\"\n\
         backends = [ {{ address = \"127.0.0.1:53\" }} ]\n",
        dns_with("", "")
    );
    let config = Config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.listeners.len(), 2);
    // Two udp listeners cannot, nor a udp wildcard over a specific udp address.
    for bind in ["127.0.0.1:5353", "0.0.0.0:5353"] {
        let text = format!(
            "{}[[listeners]]\nname = \"dns2\"\nbind = \"{bind}\"\nprotocol = \"udp\"\n\
             backends = [ {{ address = \"127.0.0.1:53\" }} ]\n",
            dns_with("", "")
        );
        let err = error(&text);
        assert!(
            err.starts_with(&format!("listener \"dns2\": field \"bind\": \"{bind}\"")),
            "{err}"
        );
        assert!(err.contains("by listener \"dns\""), "{err}");
    }
}

#[test]
fn tcp_only_settings_are_refused_on_udp() {
    let cases = [
        ("max_connections = 10", "max_connections", "10", "max_flows"),
        ("tcp_keepalive = \"60s\"", "tcp_keepalive", "\"60s\"", ""),
        // UDP flows always leave a backend that goes down: nothing to choose.
        (
            "on_backend_down = \"close\"",
            "on_backend_down",
            "\"close\"",
            "",
        ),
        // Explicitly set to the default or to "off" is still set.
        ("tcp_keepalive = \"0s\"", "tcp_keepalive", "\"0s\"", ""),
        ("queue_timeout = \"5s\"", "queue_timeout", "\"5s\"", ""),
        ("proxy_protocol = \"v2\"", "proxy_protocol", "\"v2\"", ""),
        (
            "accept_proxy_protocol = false",
            "accept_proxy_protocol",
            "false",
            "",
        ),
        (
            "proxy_protocol_timeout = \"3s\"",
            "proxy_protocol_timeout",
            "\"3s\"",
            "",
        ),
        // Reported as TCP-only even when the value itself is bad.
        ("tcp_keepalive = \"soon\"", "tcp_keepalive", "\"soon\"", ""),
    ];
    for (line, field, value, hint) in cases {
        let err = error(&dns_with(line, ""));
        let want = format!(
            "listener \"dns\": field \"{field}\": {value} is set, but {field} applies to tcp \
             listeners only (this listener's protocol is \"udp\""
        );
        assert!(err.starts_with(&want), "{line}: {err}");
        assert!(err.contains(hint), "{line}: {err}");
    }
    let err = error(
        "[[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:5353\"\nprotocol = \"udp\"\n\
         backends = [ { address = \"127.0.0.1:53\" }, { address = \"127.0.0.2:53\", \
         max_connections = 100 } ]\n",
    );
    assert_eq!(
        err,
        "listener \"dns\": field \"backends[1].max_connections\": 100 is set, but \
         max_connections applies to tcp listeners only (this listener's protocol is \"udp\"; \
         udp listeners limit flows with max_flows)"
    );
}

#[test]
fn max_flows_is_refused_on_tcp() {
    let err = error(&web_with("", "max_flows = 100"));
    assert_eq!(
        err,
        "listener \"web\": field \"max_flows\": 100 is set, but max_flows applies to udp \
         listeners only (this listener's protocol is \"tcp\", the default; tcp listeners limit \
         connections with max_connections)"
    );
    let err = error(&web_with("protocol = \"tcp\"", "max_flows = 0"));
    assert!(
        err.contains(
            "max_flows applies to udp listeners only (this listener's protocol is \"tcp\";"
        ),
        "{err}"
    );
}

#[test]
fn bad_max_flows() {
    for n in ["0", "-1", "4294967296"] {
        let err = error(&dns_with(&format!("max_flows = {n}"), ""));
        assert_eq!(
            err,
            format!("listener \"dns\": field \"max_flows\": {n} must be between 1 and 4294967295")
        );
    }
    let err = error(&dns_with("max_flows = \"10\"", ""));
    assert!(
        err.contains("max_flows") && err.contains("expected i64"),
        "{err}"
    );
}

#[test]
fn udp_health_checks_need_send_and_expect() {
    let cases = [
        ("[listeners.health]", "health.send"),
        ("[listeners.health]\nexpect = 'pong'", "health.send"),
        ("[listeners.health]\nsend = 'ping'", "health.expect"),
    ];
    for (table, field) in cases {
        let err = error(&dns_with("", table));
        assert!(
            err.starts_with(&format!(
                "listener \"dns\": field \"{field}\": missing: udp health checks need send and \
                 expect"
            )),
            "{table}: {err}"
        );
    }
    // Their own checks still come first: an empty send is reported as such.
    let err = error(&dns_with("", "[listeners.health]\nsend = ''\nexpect = 'x'"));
    assert!(
        err.contains("field \"health.send\": \"\" is empty"),
        "{err}"
    );
}

#[test]
fn udp_summary_shows_protocol_and_max_flows() {
    let text = dns_with(
        "balance = \"maglev\"\nmaglev_table_size = 7\nmax_flows = 1000\nidle_timeout = \"10s\"",
        UDP_HEALTH,
    );
    let summary = Config::parse(&text).expect("valid").summary();
    for want in [
        "listener \"dns\": udp 127.0.0.1:5353, balance maglev (hash_key source_ip, table size 7)\n",
        "  idle_timeout 10s, max_flows 1000, access_log off, drain_timeout unlimited\n",
        "  health checks: udp send \"ping\" expect \"pong\" every 2s, timeout 1s, rise 2, fall 3\n",
        "  backend 127.0.0.1:53 weight 1\n",
    ] {
        assert!(summary.contains(want), "{want:?} not in:\n{summary}");
    }
    for tcp_only in [
        "max_connections",
        "keepalive",
        "queue_timeout",
        "proxy_protocol",
    ] {
        assert!(!summary.contains(tcp_only), "{tcp_only} in:\n{summary}");
    }
    // A udp listener without health checks.
    let summary = Config::parse(&dns_with("", "")).expect("valid").summary();
    assert!(summary.contains("  health checks: off\n"), "{summary}");
    // TCP listeners do not mention flows.
    let summary = Config::parse(&web_with("", "")).expect("valid").summary();
    assert!(!summary.contains("max_flows"), "{summary}");
}

#[test]
fn dns_example_is_a_udp_listener_with_a_dns_health_check() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/dns.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let [dns] = config.listeners.as_slice() else {
        panic!("one listener expected");
    };
    assert_eq!(dns.protocol, Protocol::Udp);
    assert_eq!(
        (dns.pools[0].balance, dns.pools[0].hash_key),
        (Policy::Maglev, HashKey::SourceIp)
    );
    assert_eq!(dns.max_flows, 8192);
    assert_eq!(dns.idle_timeout, Duration::from_secs(10));
    assert_eq!(dns.pools[0].backends.len(), 2);
    // The fd note's arithmetic matches the file.
    assert_eq!(config.runtime.workers * dns.max_flows as usize, 16_384);
    let h = dns.pools[0].health.as_ref().expect("health check");
    let send = h.send.as_deref().expect("send");
    let expect = h.expect.as_deref().expect("expect");
    // A well-formed DNS query: 12-byte header with one question, QR clear; the question "."
    // NS IN ends the datagram.
    assert_eq!(send.len(), 17);
    assert_eq!(send[2] & 0x80, 0, "QR bit clear: a query");
    assert_eq!(&send[4..6], [0, 1], "one question");
    assert_eq!(&send[6..12], [0; 6], "no other records");
    assert_eq!(&send[12..], [0, 0, 2, 0, 1], "root, type NS, class IN");
    assert_eq!(expect, &send[..2], "the reply carries the query's ID");
}
