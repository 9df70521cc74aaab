//! Tests of the operator-facing config checks: the `[log]` section, a listener whose backend is
//! itself, and bare-number durations. No I/O except reading `config/*.toml`.

use super::tests::{error, examples};
use super::*;
use std::path::PathBuf;

fn with_log(log: &str) -> String {
    format!(
        "{log}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\
         backends = [ {{ address = \"127.0.0.1:9001\" }} ]\n"
    )
}

fn listener_with(bind: &str, backends: &[&str]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ address = \"{b}\" }}"))
        .collect();
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"{bind}\"\nbackends = [ {} ]\n",
        list.join(", ")
    )
}

#[test]
fn log_defaults_to_text_on_stderr() {
    let c = Config::parse(&with_log("")).expect("valid");
    assert_eq!(c.log, LogConfig::default());
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.log.access_log, AccessLog::Stderr);
    assert!(
        c.summary().contains("log format text, access_log stderr"),
        "{}",
        c.summary()
    );
}

#[test]
fn log_section_is_read() {
    let c = Config::parse(&with_log(
        "[log]\nformat = \"json\"\naccess_log = \"/var/log/ringlb/access.log\"",
    ))
    .expect("valid");
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(
        c.log.access_log,
        AccessLog::File(PathBuf::from("/var/log/ringlb/access.log"))
    );
    let c = Config::parse(&with_log("[log]\naccess_log = \"stdout\"")).expect("valid");
    assert_eq!(c.log.access_log, AccessLog::Stdout);
}

#[test]
fn log_mistakes_name_section_field_and_value() {
    let cases = [
        (
            "[log]\nformat = \"xml\"",
            "log: field \"format\": \"xml\" is not a log format",
        ),
        (
            "[log]\naccess_log = \"access.log\"",
            "log: field \"access_log\": \"access.log\" is not a destination",
        ),
        (
            "[log]\naccess_log = \"/var/log/\"",
            "log: field \"access_log\": \"/var/log/\" is not a destination",
        ),
        (
            "[log]\naccess_log = \"\"",
            "field \"access_log\": \"\" is not a destination",
        ),
        ("[log]\nlevel = \"debug\"", "unknown field `level`"),
    ];
    for (log, want) in cases {
        let e = error(&with_log(log));
        assert!(e.contains(want), "{log}: {e}");
    }
}

#[test]
fn the_reference_example_documents_the_log_section() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ringlb.toml");
    let text = std::fs::read_to_string(path).expect("config/ringlb.toml");
    let log = &text[text.find("[log]").expect("a [log] section")..];
    assert!(
        log.contains("format =") && log.contains("access_log ="),
        "{log}"
    );
    assert!(
        examples()
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == "package.toml")),
        "config/package.toml (the packaged default) is among the checked examples"
    );
}

#[test]
fn a_backend_that_is_the_listener_itself_is_refused() {
    let cases = [
        (
            "127.0.0.1:8080",
            vec!["127.0.0.1:9001", "127.0.0.1:8080"],
            1,
        ),
        ("0.0.0.0:8080", vec!["127.0.0.1:8080"], 0),
        ("0.0.0.0:8080", vec!["127.0.0.53:8080"], 0),
        ("[::]:8080", vec!["[::1]:8080"], 0),
        ("[::1]:8080", vec!["[::1]:8080"], 0),
    ];
    for (bind, backends, i) in cases {
        let e = error(&listener_with(bind, &backends));
        let want = format!(
            "listener \"web\": field \"backends[{i}].address\": \"{}\"",
            backends[i]
        );
        assert!(e.contains(&want) && e.contains("loop"), "{bind}: {e}");
    }
}

#[test]
fn a_backend_on_another_address_or_port_is_not_a_loop() {
    let fine = [
        ("127.0.0.1:8080", "127.0.0.1:8081"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        // [::] is IPv6-only (IPV6_V6ONLY): it does not listen on 127.0.0.1.
        ("[::]:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "[::1]:8080"),
        // Port 0 gets an ephemeral port, never the backend's.
        ("127.0.0.1:0", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "10.0.0.1:8080"),
    ];
    for (bind, backend) in fine {
        Config::parse(&listener_with(bind, &[backend]))
            .unwrap_or_else(|e| panic!("{bind} -> {backend}: {e}"));
    }
}

#[test]
fn a_bare_number_duration_suggests_a_unit() {
    let cases = [
        ("idle_timeout = 5", "5", "listener \"web\""),
        ("connect_timeout = 2.5", "2.5", "listener \"web\""),
        (
            "[listeners.health]\ninterval = 10",
            "10",
            "listener \"web\"",
        ),
        (
            "[listeners.passive]\nbase_ejection_time = 30",
            "30",
            "listener \"web\"",
        ),
    ];
    for (line, n, scope) in cases {
        let text = format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\
             backends = [ {{ address = \"127.0.0.1:9001\" }} ]\n{line}\n"
        );
        let e = error(&text);
        assert!(
            e.starts_with(scope)
                && e.contains(&format!("{n} is not a duration: a bare number has no unit"))
                && e.contains(&format!("\"{n}s\"")),
            "{line}: {e}"
        );
    }
    let e = error(&with_log("[runtime]\ndrain_timeout = 30"));
    assert!(
        e.contains("\"30s\"") && e.contains("drain_timeout = 30"),
        "{e}"
    );
}
