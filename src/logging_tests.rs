//! Tests of the line formats: one line per record whatever the message holds, the JSON keys and
//! types, logfmt quoting, and the timestamp. The process-wide logger itself is tested through
//! the real binary (tests/logging.rs).

use super::*;
use log::Level;
use std::time::Duration;

fn record_line(msg: &str, json: bool, kvs: &[(&str, Value)]) -> String {
    let args = format_args!("{msg}");
    let record = Record::builder()
        .level(Level::Info)
        .target("ringlb::test")
        .args(args)
        .key_values(&kvs)
        .build();
    format_record(
        &record,
        json,
        UNIX_EPOCH + Duration::from_millis(1_764_581_234_567),
    )
}

#[test]
fn timestamps_are_rfc3339_utc_with_millis() {
    assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    let t = UNIX_EPOCH + Duration::from_millis(1_764_581_234_567);
    assert_eq!(rfc3339_millis(t), "2025-12-01T09:27:14.567Z");
    // A leap day, and the last millisecond of a year.
    let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
    assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    let eoy = UNIX_EPOCH + Duration::from_millis(1_735_689_599_999);
    assert_eq!(rfc3339_millis(eoy), "2024-12-31T23:59:59.999Z");
}

#[test]
fn text_records_are_one_line_with_logfmt_fields() {
    let line = record_line(
        "reload failed: TOML parse error at line 1\n  |\n1 | x\r\n",
        false,
        &[
            ("listener", Value::from("web")),
            ("bytes_up", Value::from(100u64)),
            ("reason", Value::from("client EOF")),
            ("client", Value::null()),
        ],
    );
    assert_eq!(
        line,
        "[2025-12-01T09:27:14.567Z INFO  ringlb::test] reload failed: TOML parse error at line \
         1\\n  |\\n1 | x\\r\\n: listener=web bytes_up=100 reason=\"client EOF\" client=-\n"
    );
    assert_eq!(line.matches('\n').count(), 1);
}

#[test]
fn json_records_have_stable_keys_and_typed_fields() {
    let line = record_line(
        "multi\nline \"quoted\"",
        true,
        &[
            ("listener", Value::from("web")),
            ("duration_ms", Value::from(12u64)),
            ("delta", Value::from(-3i64)),
            ("ok", Value::from(true)),
            ("backend", Value::null()),
            ("msg", Value::from("clash")),
        ],
    );
    assert!(
        line.ends_with("}\n") && line.matches('\n').count() == 1,
        "{line}"
    );
    let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
    assert_eq!(v["ts"], "2025-12-01T09:27:14.567Z");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["target"], "ringlb::test");
    assert_eq!(v["msg"], "multi\nline \"quoted\"");
    assert_eq!(v["listener"], "web");
    assert_eq!(v["duration_ms"], 12);
    assert_eq!(v["delta"], -3);
    assert_eq!(v["ok"], true);
    assert!(v["backend"].is_null());
    assert_eq!(
        v["kv_msg"], "clash",
        "a field named like a reserved key is renamed"
    );
    // The fixed keys come first, in this order (serde_json's map sorts, so look at the text).
    let at = |k: &str| line.find(&format!("\"{k}\":")).expect(k);
    assert!(line.starts_with("{\"ts\":"), "{line}");
    assert!(at("ts") < at("level") && at("level") < at("target") && at("target") < at("msg"));
    assert!(at("msg") < at("listener"), "{line}");
}

#[test]
fn socket_addresses_and_options_render_as_values() {
    let addr: std::net::SocketAddr = "[::1]:8080".parse().unwrap();
    let some = Some(addr);
    let none: Option<std::net::SocketAddr> = None;
    let line = record_line(
        "access",
        false,
        &[
            ("client", log::kv::ToValue::to_value(&some)),
            ("backend", log::kv::ToValue::to_value(&none)),
        ],
    );
    assert!(
        line.ends_with("] access: client=[::1]:8080 backend=-\n"),
        "{line}"
    );
    let json = record_line(
        "access",
        true,
        &[("client", log::kv::ToValue::to_value(&some))],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["client"], "[::1]:8080");
}

#[test]
fn logfmt_quotes_what_needs_it() {
    let line = record_line(
        "",
        false,
        &[
            ("a", Value::from("")),
            ("b", Value::from("x=y")),
            ("c", Value::from("say \"hi\"\n")),
            ("d", Value::from("plain")),
        ],
    );
    assert!(
        line.ends_with("] a=\"\" b=\"x=y\" c=\"say \\\"hi\\\"\\n\" d=plain\n"),
        "{line}"
    );
}

#[test]
fn one_line_escapes_control_characters_only() {
    assert_eq!(one_line("plain\ttab é"), "plain\ttab é");
    assert_eq!(one_line("a\nb\r\u{1b}[0m"), "a\\nb\\r\\u{1b}[0m");
}

#[derive(Debug)]
struct Outer(std::io::Error);

impl std::fmt::Display for Outer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cannot start")
    }
}

impl std::error::Error for Outer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[test]
fn error_chains_are_joined_on_one_line() {
    let e = Outer(std::io::Error::other("disk\nfull"));
    assert_eq!(error_chain(&e), "cannot start: disk\\nfull");
}

#[test]
fn a_full_access_queue_drops_and_counts_without_waiting() {
    let (q, rx) = AccessQueue::new(2);
    let t0 = std::time::Instant::now();
    for i in 0..5 {
        q.push(format!("line {i}\n"));
    }
    assert!(t0.elapsed() < Duration::from_secs(1), "push never waits");
    assert_eq!(q.dropped.load(Ordering::Relaxed), 3);
    let kept: Vec<String> = rx
        .try_iter()
        .map(|m| match m {
            Msg::Line(l) => l,
            Msg::Flush(_) => panic!("no flush queued"),
        })
        .collect();
    assert_eq!(
        kept,
        ["line 0\n", "line 1\n"],
        "the oldest lines are kept, in order"
    );
}
