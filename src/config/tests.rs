//! Tests of config loading: the example files, defaults, and one message per kind of mistake.
//! No I/O except reading `config/*.toml` and one missing file.

use super::*;
use crate::balance::HashKey;
use std::path::PathBuf;

/// The first listener of a config that must load.
pub(super) fn parse(text: &str) -> Listener {
    let config = Config::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    config.listeners.into_iter().next().expect("one listener")
}

/// The message of a config that must be refused.
pub(super) fn error(text: &str) -> String {
    match Config::parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Every `config/*.toml`, sorted.
pub(super) fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_config_loads() {
    let files = examples();
    assert!(files.len() >= 7, "expected ≥ 7 examples, found {files:?}");
    for file in files {
        let config = Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
        assert!(!config.summary().is_empty());
    }
}

#[test]
fn every_field_appears_in_some_example() {
    let all: String = examples()
        .iter()
        .map(|f| std::fs::read_to_string(f).expect("example readable"))
        .collect();
    let fields = [
        "[runtime]",
        "workers =",
        "drain_timeout =",
        "io =",
        "[admin]",
        "bind =",
        "token_file =",
        "[[listeners]]",
        "name =",
        "protocol =",
        "balance =",
        "hash_key =",
        "maglev_table_size =",
        "connect_timeout =",
        "idle_timeout =",
        "max_connections =",
        "max_flows =",
        "access_log =",
        "tcp_keepalive =",
        "queue_timeout =",
        "proxy_protocol =",
        "accept_proxy_protocol =",
        "accept_proxy_protocol_from =",
        "proxy_protocol_timeout =",
        "backends =",
        "[[listeners.backends]]",
        "address =",
        "weight =",
        "[listeners.health]",
        "slow_start =",
        "http =",
        "expect_status =",
        "body_prefix =",
        "port =",
        "flap_threshold =",
        "flap_window =",
        "flap_hold =",
        "[listeners.health.ready]",
        "interval =",
        "timeout =",
        "rise =",
        "fall =",
        "send =",
        "expect =",
        "[listeners.passive]",
        "consecutive_failures =",
        "base_ejection_time =",
        "max_ejection_time =",
        "max_ejected_percent =",
    ];
    for field in fields {
        assert!(all.contains(field), "no example shows {field:?}");
    }
}

#[test]
fn demo_example_matches_the_demo_subcommand() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let [demo] = config.listeners.as_slice() else {
        panic!("one listener expected");
    };
    assert_eq!(demo.name, "demo");
    assert_eq!(demo.bind, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(demo.pools[0].balance, Policy::RoundRobin);
    let ports: Vec<u16> = demo.pools[0]
        .backends
        .iter()
        .map(|b| b.address.port())
        .collect();
    assert_eq!(ports, [9001, 9002, 9003]);
}

#[test]
fn defaults_applied() {
    let config = Config::parse(
        r#"
        [[listeners]]
        name = "web"
        bind = "127.0.0.1:0"
        backends = [ { address = "127.0.0.1:9001" } ]
        "#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(config.runtime.workers, cpus.min(MAX_WORKERS));
    assert_eq!(config.runtime.drain_timeout, Duration::from_secs(30));
    assert_eq!(
        config.admin.bind,
        AdminBind::Tcp("127.0.0.1:9900".parse().unwrap())
    );
    let expected = Listener {
        name: "web".to_string(),
        bind: "127.0.0.1:0".parse().unwrap(),
        protocol: Protocol::Tcp,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(3600),
        max_connections: 100_000,
        max_flows: 65_536,
        access_log: false,
        drain_timeout: None,
        close_on_backend_down: false,
        drain_postgres: false,
        tcp_keepalive: Some(Duration::from_secs(60)),
        queue_timeout: Duration::from_secs(5),
        proxy_protocol: None,
        accept_proxy_protocol: false,
        accept_proxy_protocol_from: None,
        proxy_protocol_timeout: Duration::from_secs(3),
        pools: vec![Pool {
            name: "default".to_string(),
            balance: Policy::RoundRobin,
            hash_key: HashKey::SourceIp,
            maglev_table_size: 65537,
            health: None,
            passive: PassiveConfig {
                consecutive_failures: 3,
                base_ejection_time: Duration::from_secs(30),
                max_ejection_time: Duration::from_secs(300),
                max_ejected_percent: 50,
            },
            backends: vec![BackendConfig {
                address: "127.0.0.1:9001".parse().unwrap(),
                weight: 1,
                max_connections: None,
                backup: false,
            }],
            discovery: Vec::new(),
            slow_start: None,
        }],
        routing: None,
    };
    assert_eq!(config.listeners, [expected]);
}

#[test]
fn explicit_values_and_both_backend_forms() {
    let config = Config::parse(
        r#"
        [runtime]
        workers = 3
        drain_timeout = "1.5s"
        [admin]
        bind = "[::1]:9901"
        [[listeners]]
        name = "a"
        bind = "[::]:6379"
        balance = "maglev"
        hash_key = "source_ip_port"
        maglev_table_size = 7
        connect_timeout = "250ms"
        idle_timeout = "5m"
        max_connections = 10
        backends = [ { address = "[::1]:7001", weight = 3 }, { address = "10.0.0.1:7002" } ]
        [[listeners]]
        name = "b"
        bind = "127.0.0.1:0"
        [[listeners.backends]]
        address = "127.0.0.1:7003"
        weight = 2
        "#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.runtime.workers, 3);
    assert_eq!(config.runtime.drain_timeout, Duration::from_millis(1500));
    assert_eq!(
        config.admin.bind,
        AdminBind::Tcp("[::1]:9901".parse().unwrap())
    );
    let a = &config.listeners[0];
    assert_eq!(a.pools[0].balance, Policy::Maglev);
    assert_eq!(a.pools[0].hash_key, HashKey::SourceIpPort);
    assert_eq!(a.pools[0].maglev_table_size, 7);
    assert_eq!(a.connect_timeout, Duration::from_millis(250));
    assert_eq!(a.idle_timeout, Duration::from_secs(300));
    assert_eq!(a.max_connections, 10);
    assert_eq!(
        a.pools[0].backends[0].address,
        "[::1]:7001".parse().unwrap()
    );
    assert_eq!(a.pools[0].backends[0].weight, 3);
    let b = &config.listeners[1].pools[0].backends;
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].address.port(), b[0].weight), (7003, 2));
    let summary = config.summary();
    for want in [
        "workers 3",
        "drain_timeout 1500ms",
        "[::1]:9901",
        "listener \"a\": tcp [::]:6379, balance maglev (hash_key source_ip_port, table size 7)",
        "connect_timeout 250ms, idle_timeout 5m, max_connections 10, access_log off",
        "  health checks: off\n",
        "backend [::1]:7001 weight 3",
        "listener \"b\": tcp 127.0.0.1:0, balance round_robin\n",
        "backend 127.0.0.1:7003 weight 2",
    ] {
        assert!(summary.contains(want), "{want:?} not in:\n{summary}");
    }
}

#[test]
fn port_zero_binds_do_not_conflict() {
    let text = r#"
        [[listeners]]
        name = "a"
        bind = "127.0.0.1:0"
        backends = [ { address = "127.0.0.1:9001" } ]
        [[listeners]]
        name = "b"
        bind = "127.0.0.1:0"
        backends = [ { address = "127.0.0.1:9001" } ]
    "#;
    assert_eq!(Config::parse(text).map(|c| c.listeners.len()).ok(), Some(2));
}

/// A config with one listener "web" whose body (after `name`) is `body`.
fn web(body: &str) -> String {
    format!("[[listeners]]\nname = \"web\"\n{body}\n")
}

const BIND: &str = "bind = \"127.0.0.1:8080\"";
const ONE_BACKEND: &str = "backends = [ { address = \"127.0.0.1:9001\" } ]";

fn web_with(line: &str) -> String {
    web(&format!("{BIND}\n{line}\n{ONE_BACKEND}"))
}

#[test]
fn bad_configs_name_listener_field_and_value() {
    let two_listeners =
        |second: &str| format!("{}[[listeners]]\n{second}\n{ONE_BACKEND}\n", web_with(""));
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("empty file", String::new(), vec!["config", "field \"listeners\"", "none defined"]),
        ("empty listeners", "listeners = []".into(), vec!["field \"listeners\"", "at least one"]),
        ("no backends", web(BIND), vec!["listener \"web\"", "field \"backends\"", "missing"]),
        (
            "empty backends",
            web(&format!("{BIND}\nbackends = []")),
            vec!["listener \"web\"", "field \"backends\"", "[] is empty"],
        ),
        (
            "bad backend address",
            web(&format!(
                "{BIND}\nbackends = [ {{ address = \"127.0.0.1:9001\" }}, {{ address = \"127.0.0.1:99999\" }} ]"
            )),
            vec![
                "listener \"web\": field \"backends[1].address\": \"127.0.0.1:99999\" is not a socket address (expected IP:PORT, IPv6 as [::1]:PORT)",
            ],
        ),
        (
            "host name instead of IP",
            web(&format!("bind = \"localhost:80\"\n{ONE_BACKEND}")),
            vec!["listener \"web\"", "field \"bind\"", "\"localhost:80\"", "IP:PORT"],
        ),
        (
            "IPv6 without brackets",
            web(&format!("{BIND}\nbackends = [ {{ address = \"::1:9001\" }} ]")),
            vec!["listener \"web\"", "backends[0].address", "\"::1:9001\"", "[::1]:PORT"],
        ),
        (
            "backend port 0",
            web(&format!("{BIND}\nbackends = [ {{ address = \"127.0.0.1:0\" }} ]")),
            vec!["listener \"web\"", "backends[0].address", "\"127.0.0.1:0\"", "port 0"],
        ),
        (
            "wildcard backend",
            web(&format!("{BIND}\nbackends = [ {{ address = \"0.0.0.0:80\" }} ]")),
            vec!["listener \"web\"", "backends[0].address", "\"0.0.0.0:80\"", "unspecified"],
        ),
        (
            "duplicate backend",
            web(&format!(
                "{BIND}\nbackends = [ {{ address = \"[::1]:80\" }}, {{ address = \"[::1]:80\" }} ]"
            )),
            vec!["listener \"web\"", "backends[1].address", "\"[::1]:80\"", "duplicates backends[0]"],
        ),
        (
            "missing backend address",
            web(&format!("{BIND}\nbackends = [ {{ weight = 2 }} ]")),
            vec!["listener \"web\"", "backends[0].address", "missing"],
        ),
        (
            "missing name",
            format!("[[listeners]]\n{BIND}\n{ONE_BACKEND}\n"),
            vec!["listeners[0]: field \"name\": missing"],
        ),
        (
            "invalid name",
            two_listeners("name = \"my web\"\nbind = \"127.0.0.1:8081\""),
            vec!["listeners[1]: field \"name\": \"my web\" is not a valid name", "letters, digits"],
        ),
        (
            "empty name",
            two_listeners("name = \"\"\nbind = \"127.0.0.1:8081\""),
            vec!["listeners[1]: field \"name\": \"\" is not a valid name"],
        ),
        (
            "duplicate name",
            two_listeners("name = \"web\"\nbind = \"127.0.0.1:8081\""),
            vec!["listeners[1]: field \"name\": \"web\" is already used by listeners[0]"],
        ),
        (
            "duplicate bind",
            two_listeners("name = \"db\"\nbind = \"127.0.0.1:8080\""),
            vec!["listener \"db\": field \"bind\": \"127.0.0.1:8080\" is already used by listener \"web\""],
        ),
        (
            "wildcard bind overlaps",
            two_listeners("name = \"db\"\nbind = \"0.0.0.0:8080\""),
            vec!["listener \"db\": field \"bind\": \"0.0.0.0:8080\" overlaps 127.0.0.1:8080", "listener \"web\""],
        ),
        (
            "missing bind",
            web(ONE_BACKEND),
            vec!["listener \"web\": field \"bind\": missing"],
        ),
        (
            "negative weight",
            web(&format!("{BIND}\nbackends = [ {{ address = \"127.0.0.1:9001\", weight = -1 }} ]")),
            vec!["listener \"web\": field \"backends[0].weight\": -1 must be ≥ 0 (0 drains the backend)"],
        ),
        (
            "weight too large",
            web(&format!("{BIND}\nbackends = [ {{ address = \"127.0.0.1:9001\", weight = 4294967296 }} ]")),
            vec!["listener \"web\": field \"backends[0].weight\": 4294967296 must be ≤ 4294967295"],
        ),
        (
            "bad duration",
            web_with("connect_timeout = \"5x\""),
            vec!["listener \"web\": field \"connect_timeout\": \"5x\" is not a duration", "unknown unit", "ms, s, m or h"],
        ),
        (
            "duration without unit",
            web_with("idle_timeout = \"30\""),
            vec!["listener \"web\": field \"idle_timeout\": \"30\" is not a duration", "unit is missing"],
        ),
        (
            "zero timeout",
            web_with("idle_timeout = \"0s\""),
            vec!["listener \"web\": field \"idle_timeout\": \"0s\" must be greater than zero"],
        ),
        (
            "duration as a number",
            web_with("connect_timeout = 5"),
            vec!["line 4", "connect_timeout", "write it as a string with one, e.g. \"5s\""],
        ),
        (
            "non-prime table size",
            web_with("maglev_table_size = 65536"),
            vec!["listener \"web\": field \"maglev_table_size\": 65536 is not prime (try 65537)"],
        ),
        (
            "table size too small",
            web_with("maglev_table_size = 2"),
            vec!["listener \"web\": field \"maglev_table_size\": 2 must be a prime between 3 and 5000011"],
        ),
        (
            "table size too large",
            web_with("maglev_table_size = 5000012"),
            vec!["listener \"web\"", "maglev_table_size", "5000012 must be a prime between 3 and 5000011"],
        ),
        (
            "table size not above backend count",
            web(&format!(
                "{BIND}\nbalance = \"maglev\"\nmaglev_table_size = 3\nbackends = [ {{ address = \"127.0.0.1:1\" }}, {{ address = \"127.0.0.1:2\" }}, {{ address = \"127.0.0.1:3\" }} ]"
            )),
            vec!["listener \"web\": field \"maglev_table_size\": 3 must be greater than the number of backends (3) (try 307)"],
        ),
        (
            "unknown balance",
            web_with("balance = \"fastest\""),
            vec![
                "listener \"web\": field \"balance\": \"fastest\" is not a balancing policy",
                "\"round_robin\", \"least_connections\", \"random\", \"power_of_two\", \"maglev\"",
            ],
        ),
        (
            "unknown hash key",
            web_with("hash_key = \"dest_ip\""),
            vec!["listener \"web\": field \"hash_key\": \"dest_ip\"", "\"source_ip\", \"source_ip_port\""],
        ),
        (
            "unknown listener field",
            web_with("balanse = \"maglev\""),
            vec!["line 4", "unknown field `balanse`", "balance"],
        ),
        (
            "unknown section",
            format!("[runtme]\nworkers = 2\n{}", web_with("")),
            vec!["line 1", "unknown field `runtme`"],
        ),
        (
            "unknown backend field",
            web(&format!("{BIND}\nbackends = [ {{ adress = \"127.0.0.1:9001\" }} ]")),
            vec!["line 4", "unknown field `adress`"],
        ),
        (
            "workers 0",
            format!("[runtime]\nworkers = 0\n{}", web_with("")),
            vec!["runtime: field \"workers\": 0 must be between 1 and 1024"],
        ),
        (
            "workers negative",
            format!("[runtime]\nworkers = -4\n{}", web_with("")),
            vec!["runtime: field \"workers\": -4 must be between 1 and 1024"],
        ),
        (
            "bad drain timeout",
            format!("[runtime]\ndrain_timeout = \"-1s\"\n{}", web_with("")),
            vec!["runtime: field \"drain_timeout\": \"-1s\" is not a duration"],
        ),
        (
            "bad admin bind",
            format!("[admin]\nbind = \"9900\"\n{}", web_with("")),
            vec!["admin: field \"bind\": \"9900\" is not a socket address"],
        ),
        (
            "max_connections 0",
            web_with("max_connections = 0"),
            vec!["listener \"web\": field \"max_connections\": 0 must be between 1 and 4294967295"],
        ),
        (
            "unknown protocol",
            web_with("protocol = \"sctp\""),
            vec!["listener \"web\": field \"protocol\": \"sctp\" is not a protocol (expected \"tcp\" or \"udp\")"],
        ),
        (
            "TOML syntax",
            "[[listeners]\nname = \"web\"".into(),
            vec!["TOML parse error at line 1"],
        ),
    ];
    for (what, text, wants) in cases {
        let err = match Config::parse(&text) {
            Ok(_) => panic!("{what}: accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        for want in wants {
            assert!(err.contains(want), "{what}: {want:?} not in:\n{err}");
        }
    }
}

#[test]
fn ipv6_addresses_accepted() {
    let text = web(
        "bind = \"[::]:443\"\nbackends = [ { address = \"[2001:db8::1]:8443\" }, { address = \"[::1]:8443\" } ]",
    );
    let config = Config::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let l = &config.listeners[0];
    assert!(l.bind.is_ipv6());
    assert_eq!(
        l.pools[0].backends[0].address,
        "[2001:db8::1]:8443".parse().unwrap()
    );
}

#[test]
fn load_errors_name_the_path() {
    let missing = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/does-not-exist.toml");
    let err = Config::load(&missing)
        .expect_err("missing file")
        .to_string();
    assert!(err.contains("cannot read config file"), "{err}");
    assert!(err.contains("does-not-exist.toml"), "{err}");

    // The same validation error, with and without the path in front.
    let err = Config::parse("").expect_err("no listeners");
    assert!(
        err.to_string().starts_with("config: field \"listeners\""),
        "{err}"
    );
    let with_path = err.with_path(Path::new("x/ringlb.toml")).to_string();
    assert!(
        with_path.starts_with("x/ringlb.toml: config: field \"listeners\""),
        "{with_path}"
    );
    let toml = Config::parse("listeners = 3").expect_err("wrong type");
    let with_path = toml.with_path(Path::new("x/ringlb.toml")).to_string();
    assert!(
        with_path.starts_with("x/ringlb.toml: TOML parse error at line 1"),
        "{with_path}"
    );
}

#[test]
fn toml_errors_inside_a_listener_name_it() {
    let text = format!(
        "[runtime]\nworkers = 2\n{}[[listeners]]\nname = \"db\"\nbind = \"127.0.0.1:8081\"\n{ONE_BACKEND}\n\
         [listeners.health]\nintervall = \"1s\"\n",
        web_with("")
    );
    let err = Config::parse(&text).expect_err("unknown field").to_string();
    assert!(
        err.starts_with("listener \"db\": TOML parse error at line 13"),
        "{err}"
    );
    assert!(err.contains("unknown field `intervall`"), "{err}");
    let err = Config::parse(&web_with("colour = \"blue\"")).expect_err("unknown field");
    assert!(
        err.to_string()
            .starts_with("listener \"web\": TOML parse error"),
        "{err}"
    );
    // Outside listeners, and when the name itself is unreadable.
    let err =
        Config::parse(&format!("{}[admin]\nbindd = 1\n", web_with(""))).expect_err("unknown field");
    assert!(err.to_string().starts_with("TOML parse error"), "{err}");
    let err = Config::parse("[[listeners]]\nname = 3\n").expect_err("wrong type");
    assert!(
        err.to_string()
            .starts_with("listeners[0]: TOML parse error"),
        "{err}"
    );
}

/// A round-robin listener with `n` backends (10.x.y.z:80), plus `tail` appended to the list.
fn many_backends(n: usize, balance: &str, tail: &str) -> String {
    let mut text = format!(
        "[[listeners]]\nname = \"big\"\nbind = \"127.0.0.1:80\"\nbalance = \"{balance}\"\nbackends = [\n"
    );
    for i in 0..n {
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(
                "  {{ address = \"10.{}.{}.{}:80\" }},\n",
                i >> 16,
                (i >> 8) & 255,
                i & 255
            ),
        );
    }
    text.push_str(tail);
    text.push_str("]\n");
    text
}

#[test]
fn maglev_table_rules_apply_only_to_maglev_listeners() {
    // More backends than the default table size: fine for round robin, which has no table.
    let l = parse(&many_backends(70_000, "round_robin", ""));
    assert_eq!(l.pools[0].backends.len(), 70_000);
    // A table size written for another policy must still be a prime in range, but need not
    // exceed the backend count.
    parse(&one_listener_with(
        "balance = \"least_connections\"\nmaglev_table_size = 3",
    ));
    let e = error(&one_listener_with(
        "balance = \"least_connections\"\nmaglev_table_size = 100",
    ));
    assert!(e.contains("100 is not prime (try 101)"), "{e}");
    // Maglev still checks both.
    let e = error(&many_backends(70_000, "maglev", ""));
    assert!(
        e.contains("maglev_table_size") && e.contains("greater than the number of backends"),
        "{e}"
    );
    let e = error(&one_listener_with(
        "balance = \"maglev\"\nmaglev_table_size = 100",
    ));
    assert!(e.contains("100 is not prime (try 101)"), "{e}");
}

#[test]
fn duplicate_backends_found_among_100_000() {
    // Validation is near-linear (a hash set, not a pairwise scan): 100,000 backends, the last a
    // duplicate of the first, is refused naming both indices.
    let e = error(&many_backends(
        100_000,
        "round_robin",
        "  { address = \"10.0.0.0:80\" },\n",
    ));
    assert!(
        e.contains("backends[100000].address") && e.contains("duplicates backends[0].address"),
        "{e}"
    );
}

/// One listener on 127.0.0.1:80 with two backends and `extra` lines.
fn one_listener_with(extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:80\"\n{extra}\nbackends = [ {{ address = \"10.0.0.1:80\" }}, {{ address = \"10.0.0.2:80\" }} ]\n"
    )
}
