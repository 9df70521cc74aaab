//! Tests of the health-block additions: `http`, `port`/`address`, `flap_*`,
//! `[listeners.health.ready]` and `slow_start`: defaults, values, one message per mistake.

use super::tests::parse;
use super::*;

fn web(extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\n\
         backends = [ {{ address = \"127.0.0.1:9001\" }} ]\n{extra}\n"
    )
}

fn err(extra: &str) -> String {
    Config::parse(&web(extra)).expect_err(extra).to_string()
}

#[test]
fn http_check_defaults_and_values() {
    let h = parse(&web("[listeners.health]\nhttp = {}")).pools[0]
        .health
        .clone()
        .unwrap();
    assert_eq!(
        h.http,
        Some(HttpCheck {
            path: "/".into(),
            host: None,
            expect_status: vec![200],
            body_prefix: None,
        })
    );
    assert!(h.target.is_default());
    assert_eq!(h.flap, FlapConfig::default());
    assert_eq!(h.ready, None);
    let h = parse(&web(
        "[listeners.health]\nport = 8008\nhttp = { path = \"/primary\", expect_status = [200, 204], \
         host = \"db.example\", body_prefix = '{\"role\"' }",
    ))
    .pools[0]
    .health
    .clone()
    .unwrap();
    let http = h.http.unwrap();
    assert_eq!(http.path, "/primary");
    assert_eq!(http.host.as_deref(), Some("db.example"));
    assert_eq!(http.expect_status, [200, 204]);
    assert_eq!(http.body_prefix.as_deref(), Some(&b"{\"role\""[..]));
    let a: SocketAddr = "127.0.0.1:9001".parse().unwrap();
    assert_eq!(h.target.apply(a), "127.0.0.1:8008".parse().unwrap());
}

#[test]
fn probe_address_forms() {
    let a: SocketAddr = "127.0.0.1:9001".parse().unwrap();
    let t = |extra: &str| {
        parse(&web(&format!("[listeners.health]\n{extra}"))).pools[0]
            .health
            .clone()
            .unwrap()
            .target
    };
    assert_eq!(
        t("address = \"127.0.0.9\"").apply(a),
        "127.0.0.9:9001".parse().unwrap()
    );
    assert_eq!(
        t("address = \"127.0.0.9:7\"").apply(a),
        "127.0.0.9:7".parse().unwrap()
    );
    assert_eq!(
        t("address = \"::1\"\nport = 8").apply(a),
        "[::1]:8".parse().unwrap()
    );
}

#[test]
fn ready_block_and_flap_fields() {
    let l = parse(&web(
        "slow_start = \"30s\"\n[listeners.health]\nflap_threshold = 0\nflap_window = \"10s\"\n\
         flap_hold = \"2s\"\n[listeners.health.ready]\ninterval = \"500ms\"\nrise = 1\nfall = 1\n\
         http = { path = \"/ready\" }",
    ));
    assert_eq!(l.pools[0].slow_start, Some(Duration::from_secs(30)));
    let h = l.pools[0].health.clone().unwrap();
    assert_eq!(
        h.flap,
        FlapConfig {
            threshold: 0,
            window: Duration::from_secs(10),
            hold: Duration::from_secs(2),
        }
    );
    // The liveness block the ready table implies is a plain connect check with defaults.
    assert_eq!(h.http, None);
    assert_eq!(h.interval, Duration::from_secs(2));
    let r = h.ready.unwrap();
    assert_eq!(
        (r.interval, r.rise, r.fall),
        (Duration::from_millis(500), 1, 1)
    );
    assert_eq!(r.http.unwrap().path, "/ready");
    assert_eq!(parse(&web("slow_start = \"0s\"")).pools[0].slow_start, None);
}

#[test]
fn mistakes_name_the_field_and_value() {
    let cases = [
        (
            "[listeners.health]\nhttp = { path = \"ready\" }",
            "health.http.path",
            "must start with '/'",
        ),
        (
            "[listeners.health]\nhttp = { path = \"/a b\" }",
            "health.http.path",
            "visible ASCII",
        ),
        (
            "[listeners.health]\nhttp = { host = \"a\\r\\nX: y\" }",
            "health.http.host",
            "visible ASCII",
        ),
        (
            "[listeners.health]\nhttp = { expect_status = [] }",
            "health.http.expect_status",
            "[]",
        ),
        (
            "[listeners.health]\nhttp = { expect_status = [99] }",
            "health.http.expect_status",
            "99",
        ),
        (
            "[listeners.health]\nhttp = { bogus = 1 }",
            "bogus",
            "unknown field",
        ),
        (
            "[listeners.health]\nsend = \"x\"\nhttp = {}",
            "health.http",
            "not both",
        ),
        (
            "[listeners.health]\nport = 0",
            "health.port",
            "0 must be between 1 and 65535",
        ),
        ("[listeners.health]\nport = 70000", "health.port", "70000"),
        (
            "[listeners.health]\naddress = \"db\"",
            "health.address",
            "\"db\" is not an IP",
        ),
        (
            "[listeners.health]\naddress = \"1.2.3.4:5\"\nport = 6",
            "health.address",
            "port once",
        ),
        (
            "[listeners.health]\nflap_threshold = -1",
            "health.flap_threshold",
            "-1",
        ),
        (
            "[listeners.health]\nflap_window = \"0s\"",
            "health.flap_window",
            "greater than zero",
        ),
        (
            "[listeners.health.ready]\ntimeout = \"3s\"",
            "health.ready.timeout",
            "health.ready.interval",
        ),
        (
            "[listeners.health.ready]\nflap_threshold = 3",
            "health.ready.flap_threshold",
            "belongs in [listeners.health]",
        ),
        (
            "[listeners.health.ready]\nhttp = { path = \"x\" }",
            "health.ready.http.path",
            "'/'",
        ),
        (
            "[listeners.health.ready.ready]",
            "health.ready.ready",
            "belongs in",
        ),
        (
            "balance = \"maglev\"\nslow_start = \"10s\"",
            "slow_start",
            "maglev",
        ),
        ("slow_start = \"soon\"", "slow_start", "soon"),
    ];
    for (extra, field, want) in cases {
        let e = err(extra);
        assert!(e.contains("listener \"web\""), "{extra}: {e}");
        assert!(e.contains(field), "{extra}: wanted field {field}: {e}");
        assert!(e.contains(want), "{extra}: wanted {want:?}: {e}");
    }
}

#[test]
fn udp_refuses_http_and_requires_send_expect_in_ready() {
    let udp = "[[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:5353\"\nprotocol = \"udp\"\n\
               backends = [ { address = \"127.0.0.1:9001\" } ]\n[listeners.health]\nsend = \"a\"\nexpect = \"b\"\n";
    let e = Config::parse(&format!("{udp}http = {{}}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("health.http") && e.contains("TCP"), "{e}");
    let e = Config::parse(&format!("{udp}[listeners.health.ready]\nsend = \"a\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("health.ready.expect"), "{e}");
}
