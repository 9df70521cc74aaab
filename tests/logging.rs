//! The logger through the real binary: `[log] format = "json"` gives one JSON object per line
//! with the stable keys (ts, level, target, msg) and the access log's typed fields; a reload
//! error whose message spans lines stays one record (one line) in both formats; an access log
//! file moved away is reopened on SIGUSR1 and the next lines go to the new file.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::ops::{log_line_since, sighup_reload};
use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(5);

/// `config` with a `[log]` table appended (TOML allows it after the listener tables).
fn with_log(config: String, log: &str) -> String {
    format!("{config}\n[log]\n{log}\n")
}

/// Every stderr line parsed as JSON (panics naming the first that is not).
fn json_lines(lb: &Lb) -> Vec<Value> {
    lb.stderr_lines()
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "not a JSON line ({e}): {l:?}\nstderr:\n{}",
                    lb.stderr_tail(30)
                )
            })
        })
        .collect()
}

/// The address of listener `name` from its `listening on` record's `msg`.
fn listening_addr(records: &[Value], name: &str) -> SocketAddr {
    let needle = format!("listener \"{name}\" listening on ");
    records
        .iter()
        .filter_map(|r| r["msg"].as_str())
        .find_map(|m| {
            let rest = &m[m.find(&needle)? + needle.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no `{needle}` record in {records:#?}"))
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn is_rfc3339_millis_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

#[test]
fn json_format_is_one_object_per_line_with_stable_keys() {
    let echo = EchoServer::start();
    let base = ringlb_config([listener("web")
        .backend(echo.addr())
        .set("access_log", "true")]);
    let toml = with_log(base, "format = \"json\"");
    let mut lb = Lb::start(&toml);
    let web = listening_addr(&json_lines(&lb), "web");

    let mark = lb.log_len();
    let mut s = connect(web);
    let client = s.local_addr().expect("local_addr");
    try_echo_stream(&mut s, 100, 0x5eed_0001).expect("echo through the LB");
    drop(s);
    assert!(
        lb.wait_for_log_since(mark, "\"target\":\"ringlb::access\"", WAIT),
        "no access record; stderr:\n{}",
        lb.stderr_tail(20)
    );

    // A reload of a file with a TOML syntax error: toml's message spans several lines.
    let (_, _) = sighup_reload(&lb, "[[listeners]\nname = \"web\"\n");
    lb.signal(Signal::SIGTERM);
    assert!(lb.wait_exit(WAIT).is_some_and(|st| st.success()));

    let records = json_lines(&lb);
    for r in &records {
        let obj = r.as_object().expect("an object");
        for key in ["ts", "level", "target", "msg"] {
            assert!(obj.get(key).is_some_and(Value::is_string), "no {key}: {r}");
        }
        let ts = r["ts"].as_str().unwrap();
        assert!(is_rfc3339_millis_utc(ts), "ts {ts:?} in {r}");
        let level = r["level"].as_str().unwrap();
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&level),
            "{r}"
        );
    }
    let access: Vec<&Value> = records
        .iter()
        .filter(|r| r["target"] == "ringlb::access")
        .collect();
    assert_eq!(
        access.len(),
        1,
        "one connection, one access record: {access:#?}"
    );
    let a = access[0];
    assert_eq!(a["msg"], "access");
    assert_eq!(a["level"], "INFO");
    assert_eq!(a["listener"], "web");
    assert_eq!(a["client"], client.to_string());
    assert_eq!(a["backend"], echo.addr().to_string());
    assert_eq!(a["bytes_up"], 100, "{a}");
    assert_eq!(a["bytes_down"], 100, "{a}");
    assert!(a["duration_ms"].is_u64(), "a number: {a}");
    assert_eq!(a["reason"], "client EOF");

    let failed = records
        .iter()
        .find(|r| {
            r["msg"]
                .as_str()
                .is_some_and(|m| m.contains("failed, still running"))
        })
        .unwrap_or_else(|| panic!("no reload failure record: {records:#?}"));
    assert_eq!(failed["level"], "ERROR");
    let msg = failed["msg"].as_str().unwrap();
    assert!(
        msg.contains("TOML parse error") && msg.contains('\n'),
        "{msg}"
    );
    assert!(records
        .iter()
        .any(|r| r["msg"].as_str().is_some_and(|m| m.starts_with("ready:"))));
}

#[test]
fn text_records_stay_on_one_line_when_the_error_spans_several() {
    let echo = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web").backend(echo.addr())]));
    let (_, line) = sighup_reload(&lb, "[[listeners]\nname = \"web\"\n");
    assert!(
        line.contains("failed") && line.contains("TOML parse error"),
        "{line}"
    );
    assert!(
        line.contains("\\n"),
        "the excerpt's line breaks are escaped: {line}"
    );
    // Every line is a whole record: it starts with the `[timestamp LEVEL target]` prefix.
    for l in lb.stderr_lines() {
        assert!(
            l.starts_with('[') && l.contains("Z ") && l.contains("] "),
            "a line that is not a record (a continuation?): {l:?}\nstderr:\n{}",
            lb.stderr_tail(30)
        );
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(stem: &str) -> TempDir {
        let p =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{stem}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits until `p` has `n` lines (the writer thread writes shortly after the close).
fn wait_lines(p: &Path, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    wait_until(WAIT, || {
        lines = std::fs::read_to_string(p)
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default();
        lines.len() >= n
    });
    lines
}

fn one_connection(addr: SocketAddr, seed: u64) -> SocketAddr {
    let mut s = connect(addr);
    let local = s.local_addr().expect("local_addr");
    try_echo_stream(&mut s, 64, seed).expect("echo");
    local
}

#[test]
fn access_log_file_is_reopened_on_sigusr1() {
    let dir = TempDir::new("ringlb-access");
    let file = dir.0.join("access.log");
    let echo = EchoServer::start();
    let toml = with_log(
        ringlb_config([listener("web")
            .backend(echo.addr())
            .set("access_log", "true")]),
        &format!("access_log = \"{}\"", file.display()),
    );
    let lb = Lb::start(&toml);
    let first = one_connection(lb.addr("web"), 1);
    let lines = wait_lines(&file, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("] access: listener=web ")
            && lines[0].contains(&format!("client={first} ")),
        "{lines:?}"
    );
    assert!(
        !lb.stderr_lines().iter().any(|l| l.contains("access: ")),
        "the access log went to the file only"
    );

    // logrotate: move the file away, then SIGUSR1.
    let rotated = dir.0.join("access.log.1");
    std::fs::rename(&file, &rotated).expect("rename");
    let mark = lb.log_len();
    lb.signal(Signal::SIGUSR1);
    log_line_since(&lb, mark, "access log reopened", WAIT);
    assert!(file.exists(), "a new file at the configured path");
    let second = one_connection(lb.addr("web"), 2);
    let lines = wait_lines(&file, 1);
    assert_eq!(lines.len(), 1, "new file: {lines:?}");
    assert!(lines[0].contains(&format!("client={second} ")), "{lines:?}");
    let old = read_lines(&rotated);
    assert_eq!(old.len(), 1, "nothing more went to the moved file: {old:?}");
    assert!(old[0].contains(&format!("client={first} ")));
}

#[test]
fn an_access_log_that_cannot_be_opened_fails_the_start_with_one_line() {
    let dir = TempDir::new("ringlb-access-missing");
    let toml = with_log(
        ringlb_config([listener("web").backend(dead_addr())]),
        &format!(
            "access_log = \"{}/no/such/dir/access.log\"",
            dir.0.display()
        ),
    );
    let cfg = TempFile::new("ringlb-log-missing", "toml", &toml);
    let out = run_ringlb(
        &["run", "--config", cfg.path().to_str().expect("utf-8")],
        WAIT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("log: field \"access_log\": cannot open") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn a_reload_moves_the_access_log_or_changes_nothing() {
    let dir = TempDir::new("ringlb-access-reload");
    let file = dir.0.join("access.log");
    let echo = EchoServer::start();
    let base = ringlb_config([listener("web")
        .backend(echo.addr())
        .set("access_log", "true")]);
    let lb = Lb::start(&base);
    one_connection(lb.addr("web"), 1);
    log_line_since(&lb, 0, "access: listener=web", WAIT);

    // A destination that cannot be opened refuses the whole reload.
    let bad = with_log(
        base.clone(),
        &format!("access_log = \"{}/missing/access.log\"", dir.0.display()),
    );
    let (_, line) = sighup_reload(&lb, &bad);
    assert!(
        line.contains("failed") && line.contains("log: field \"access_log\": cannot open"),
        "{line}"
    );

    // A good one: later lines go to the file, not stderr.
    let good = with_log(base, &format!("access_log = \"{}\"", file.display()));
    let (mark, line) = sighup_reload(&lb, &good);
    assert!(line.contains("done"), "{line}");
    let client = one_connection(lb.addr("web"), 2);
    let lines = wait_lines(&file, 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(&format!("client={client} ")), "{lines:?}");
    assert!(
        !lb.stderr_lines()[mark..]
            .iter()
            .any(|l| l.contains("access: ")),
        "after the reload the access log goes to the file only"
    );
}

/// A runtime failure in JSON mode is one JSON record too, whatever RUST_LOG filters.
#[test]
fn a_fatal_error_in_json_mode_is_one_json_record() {
    // Held without SO_REUSEPORT: ringlb's bind fails with EADDRINUSE.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("local_addr");
    let toml = with_log(
        common::ops::with_bind(
            &ringlb_config([listener("web").backend(dead_addr())]),
            "web",
            &addr.to_string(),
        ),
        "format = \"json\"",
    );
    let cfg = TempFile::new("ringlb-json-fatal", "toml", &toml);
    let mut child = std::process::Command::new(ringlb_bin())
        .args(["run", "--config"])
        .arg(cfg.path())
        .env("RUST_LOG", "ringlb::health=debug")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ringlb");
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("ringlb still running: the bind should have failed");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().expect("output");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().expect("a line");
    let v: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(v["level"], "ERROR", "{last}");
    let msg = v["msg"].as_str().unwrap();
    assert!(
        msg.contains(&format!("listener \"web\": cannot bind {addr}")) && msg.contains("in use"),
        "{msg}"
    );
}

/// Process signals go to the runtime's main thread only (it takes them with sigtimedwait). A
/// thread that left SIGHUP, SIGINT, SIGTERM or SIGUSR1 unblocked would receive one whenever the
/// main thread is between two waits, and its default action would end the process. The access
/// log writer starts before the runtime blocks them, so it must block them itself: every
/// thread's `SigBlk` in /proc must hold all four.
#[test]
fn every_thread_blocks_the_signals_the_runtime_waits_for() {
    let echo = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web").backend(echo.addr())]));
    let dir = format!("/proc/{}/task", lb.pid());
    let mut names = Vec::new();
    for task in std::fs::read_dir(&dir).expect("task dir").flatten() {
        // The main thread waits in sigtimedwait, which unblocks the waited-for set meanwhile.
        if task.file_name().to_str() == Some(lb.pid().to_string().as_str()) {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let get = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let (name, blocked) = (get("Name:"), get("SigBlk:"));
        if blocked.is_empty() {
            continue; // the thread ended meanwhile
        }
        let mask = u64::from_str_radix(&blocked, 16).expect("SigBlk is hex");
        for (sig, n) in [
            ("SIGHUP", 1),
            ("SIGINT", 2),
            ("SIGUSR1", 10),
            ("SIGTERM", 15),
        ] {
            assert!(
                mask & (1 << (n - 1)) != 0,
                "thread {name:?} does not block {sig} (SigBlk {blocked})"
            );
        }
        names.push(name);
    }
    assert!(
        names.iter().any(|n| n == "ringlb-log"),
        "threads: {names:?}"
    );
}
