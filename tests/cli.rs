//! The `ringlb` command line: `check` accepts every shipped example config and rejects bad ones
//! with exit 2 and a message naming listener, field and value; `run` rejects them the same way;
//! `--help` lists the subcommands; `--version` names the build; the man page and completions
//! come from the same definition.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(10);

fn ringlb(args: &[&str]) -> Output {
    run_ringlb(args, DEADLINE)
}

fn check(path: &Path) -> Output {
    ringlb(&["check", "--config", path.to_str().expect("utf-8 path")])
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Names of the `[[listeners]]` tables in a config file, found line by line (no TOML parser
/// among the test dependencies): a `name = "..."` at the top level of a listener table.
fn listener_names(toml: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_listener = false;
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_listener = line.starts_with("[[listeners]]");
            continue;
        }
        if !in_listener {
            continue;
        }
        if let Some(v) = line
            .strip_prefix("name")
            .and_then(|r| r.trim_start().strip_prefix('='))
        {
            if let Some(name) = v.trim().strip_prefix('"').and_then(|r| r.split('"').next()) {
                names.push(name.to_string());
            }
        }
    }
    names
}

#[test]
fn check_accepts_every_example_config() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.toml in {}", dir.display());
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read config");
        let names = listener_names(&text);
        assert!(
            !names.is_empty(),
            "{}: no listener names found",
            f.display()
        );
        let out = check(f);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            f.display(),
            show(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        for n in &names {
            assert!(
                stdout.contains(n.as_str()),
                "{}: summary does not mention listener {n:?}: {}",
                f.display(),
                show(&out)
            );
        }
    }
}

const BACKENDS: &str = r#"backends = [ { address = "127.0.0.1:9001" } ]"#;

/// A config with one listener `name`, whose body lines are `extra` (with defaults for bind,
/// balance and backends unless `extra` sets them).
fn one_listener(name: &str, extra: &[&str]) -> String {
    let mut lines = vec![format!("name = \"{name}\"")];
    let has = |k: &str| extra.iter().any(|l| l.trim_start().starts_with(k));
    if !has("bind") {
        lines.push(r#"bind = "127.0.0.1:0""#.into());
    }
    if !has("balance") {
        lines.push(r#"balance = "round_robin""#.into());
    }
    if !has("backends") {
        lines.push(BACKENDS.into());
    }
    lines.extend(extra.iter().map(|s| s.to_string()));
    format!(
        "[runtime]\nworkers = 2\n\n[[listeners]]\n{}\n",
        lines.join("\n")
    )
}

struct BadCase {
    what: &'static str,
    toml: String,
    /// Substrings the error must contain: listener name, field name and offending value.
    expect: Vec<&'static str>,
}

fn bad_cases() -> Vec<BadCase> {
    let ok_listener = |name: &str| {
        format!(
            "[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nbalance = \"random\"\n{BACKENDS}\n"
        )
    };
    vec![
        BadCase {
            what: "bad bind address",
            toml: one_listener("badbind", &[r#"bind = "300.1.2.3:80""#]),
            expect: vec!["badbind", "bind", "300.1.2.3:80"],
        },
        BadCase {
            what: "bad backend address",
            toml: one_listener(
                "badbackend",
                &[r#"backends = [ { address = "nowhere:port" } ]"#],
            ),
            expect: vec!["badbackend", "address", "nowhere:port"],
        },
        BadCase {
            what: "duplicate listener name",
            toml: format!(
                "[runtime]\nworkers = 2\n\n{}\n{}",
                ok_listener("twin"),
                ok_listener("twin")
            ),
            expect: vec!["twin", "name"],
        },
        BadCase {
            what: "negative weight",
            toml: one_listener(
                "negweight",
                &[r#"backends = [ { address = "127.0.0.1:9001", weight = -1 } ]"#],
            ),
            expect: vec!["negweight", "weight", "-1"],
        },
        BadCase {
            what: "bad duration",
            toml: one_listener("baddur", &[r#"connect_timeout = "3x""#]),
            expect: vec!["baddur", "connect_timeout", "3x"],
        },
        BadCase {
            what: "non-prime maglev table size",
            toml: one_listener(
                "notprime",
                &[r#"balance = "maglev""#, "maglev_table_size = 65536"],
            ),
            expect: vec!["notprime", "maglev_table_size", "65536"],
        },
        BadCase {
            what: "unknown field",
            toml: one_listener("typo", &[r#"colour = "blue""#]),
            expect: vec!["typo", "colour"],
        },
        BadCase {
            what: "no backends",
            toml: one_listener("empty", &["backends = []"]),
            expect: vec!["empty", "backends"],
        },
        BadCase {
            what: "bare number as a duration (suggests the quoted form)",
            toml: one_listener("baredur", &["idle_timeout = 5"]),
            expect: vec![
                "baredur",
                "idle_timeout = 5",
                "a bare number has no unit",
                "\"5s\"",
            ],
        },
        BadCase {
            what: "backend is the listener itself",
            toml: one_listener(
                "selfloop",
                &[
                    r#"bind = "127.0.0.1:8443""#,
                    r#"backends = [ { address = "127.0.0.1:9001" }, { address = "127.0.0.1:8443" } ]"#,
                ],
            ),
            expect: vec!["selfloop", "backends[1].address", "127.0.0.1:8443", "loop"],
        },
        BadCase {
            what: "backend reached through the listener's wildcard bind",
            toml: one_listener(
                "wildloop",
                &[
                    r#"bind = "0.0.0.0:8443""#,
                    r#"backends = [ { address = "127.0.0.1:8443" } ]"#,
                ],
            ),
            expect: vec![
                "wildloop",
                "backends[0].address",
                "127.0.0.1:8443",
                "wildcard",
            ],
        },
        BadCase {
            what: "unknown log format",
            toml: format!("[log]\nformat = \"xml\"\n\n{}", one_listener("logfmt", &[])),
            expect: vec!["log", "format", "xml"],
        },
        BadCase {
            what: "unknown balance",
            toml: one_listener("speedy", &[r#"balance = "fastest""#]),
            expect: vec!["speedy", "balance", "fastest"],
        },
    ]
}

fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("error"))
        .collect()
}

#[test]
fn check_and_run_reject_bad_configs_with_exit_2() {
    let mut failures = Vec::new();
    for case in bad_cases() {
        let file = TempFile::new("ringlb-bad", "toml", &case.toml);
        let path = file.path().to_str().expect("utf-8 path");
        let out = check(file.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let missing: Vec<_> = case
            .expect
            .iter()
            .filter(|s| !stderr.contains(*s))
            .collect();
        if out.status.code() != Some(2) || !stderr.contains("error:") || !missing.is_empty() {
            failures.push(format!(
                "check, {}: want exit 2 and `error:` naming {:?} (missing {missing:?})\nconfig:\n{}{}",
                case.what,
                case.expect,
                case.toml,
                show(&out)
            ));
            continue;
        }
        let run = ringlb(&["run", "--config", path]);
        let run_stderr = String::from_utf8_lossy(&run.stderr);
        let absent: Vec<_> = error_lines(&stderr)
            .into_iter()
            .filter(|l| !run_stderr.contains(*l))
            .collect();
        if run.status.code() != Some(2) || !absent.is_empty() {
            failures.push(format!(
                "run, {}: want exit 2 and check's error lines, missing {absent:?}\n{}",
                case.what,
                show(&run)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn missing_config_file_is_named() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("ringlb-no-such-{}.toml", std::process::id()));
    let path = path.to_str().expect("utf-8 path");
    for cmd in ["check", "run"] {
        let out = ringlb(&[cmd, "--config", path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(2) && stderr.contains("error:") && stderr.contains(path),
            "{cmd} on a missing file: want exit 2 naming {path}\n{}",
            show(&out)
        );
    }
}

#[test]
fn help_lists_subcommands() {
    let out = ringlb(&["--help"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    for sub in ["run", "check"] {
        assert!(
            stdout.contains(sub),
            "--help does not mention {sub}\n{}",
            show(&out)
        );
    }
}

#[test]
fn listener_names_are_found() {
    let toml = "[runtime]\nworkers = 2\n[[listeners]]\nname = \"a\"\n[listeners.health]\n\
                name = \"x\"\n[[listeners]]\n  name = \"b\" # comment\n";
    assert_eq!(listener_names(toml), ["a", "b"]);
}

/// `run` prints a configuration error as one line, whatever the error (toml's excerpt spans
/// several): a journal or a log shipper sees one record.
#[test]
fn run_prints_a_multi_line_config_error_as_one_line() {
    let file = TempFile::new(
        "ringlb-multiline",
        "toml",
        &one_listener("typo", &[r#"colour = "blue""#]),
    );
    let path = file.path().to_str().expect("utf-8 path");
    let check_out = ringlb(&["check", "--config", path]);
    let check_err = String::from_utf8_lossy(&check_out.stderr);
    assert!(
        check_err.lines().count() > 1,
        "check keeps toml's excerpt: {check_err}"
    );
    let run = ringlb(&["run", "--config", path]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{}", show(&run));
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("colour") && stderr.contains("\\n"),
        "{stderr:?}"
    );
}

#[test]
fn version_names_commit_build_date_target_and_io_backends() {
    let out = ringlb(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = format!(
        "ringlb {}\ncommit: {}\nbuilt: {}\ntarget: {}\nio: io_uring, epoll\n",
        env!("CARGO_PKG_VERSION"),
        ringlb::BUILD_COMMIT,
        ringlb::BUILD_DATE,
        ringlb::BUILD_TARGET
    );
    assert_eq!(stdout, want);
    assert_eq!(
        ringlb::BUILD_DATE.len(),
        10,
        "YYYY-MM-DD: {}",
        ringlb::BUILD_DATE
    );
    assert!(
        ringlb::BUILD_TARGET.contains("linux"),
        "{}",
        ringlb::BUILD_TARGET
    );
    // -V is the short form: the version alone.
    let short = ringlb(&["-V"]);
    assert_eq!(
        String::from_utf8_lossy(&short.stdout),
        format!("ringlb {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn short_and_long_help_describe_the_same_program() {
    let short = ringlb(&["-h"]);
    let long = ringlb(&["--help"]);
    let (short, long) = (
        String::from_utf8_lossy(&short.stdout).into_owned(),
        String::from_utf8_lossy(&long.stdout).into_owned(),
    );
    // clap drops the summary's final period in the short form.
    let first = |s: &str| {
        let line = s.lines().next().unwrap_or_default();
        line.trim_end_matches('.').to_string()
    };
    assert_eq!(first(&short), first(&long), "-h:\n{short}\n--help:\n{long}");
    assert!(first(&short).contains("TCP/UDP load balancer"), "{short}");
    for text in [&short, &long] {
        assert!(!text.contains("TCP load balancer"), "{text}");
        // Packaging helpers stay out of the user's help.
        assert!(
            !text.contains("completions") && !text.contains("man "),
            "{text}"
        );
    }
    assert!(long.contains("SIGUSR1"), "{long}");
}

#[test]
fn man_pages_are_generated_from_the_cli() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = ringlb(&["man", dir.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let page = std::fs::read_to_string(dir.join("ringlb.1")).expect("ringlb.1");
    assert!(
        page.starts_with(".ie") || page.contains(".TH ringlb 1"),
        "{page}"
    );
    for want in [
        ".TH ringlb 1",
        "TCP/UDP",
        "check",
        "run",
        "SIGHUP",
        "SIGUSR1",
        "EXIT STATUS",
        "/etc/ringlb/ringlb.toml",
    ] {
        assert!(page.contains(want), "ringlb.1 lacks {want:?}:\n{page}");
    }
    for sub in ["run", "check", "demo"] {
        let p = std::fs::read_to_string(dir.join(format!("ringlb-{sub}.1")))
            .unwrap_or_else(|e| panic!("ringlb-{sub}.1: {e}"));
        assert!(
            p.contains("\\-\\-config"),
            "ringlb-{sub}.1 documents --config:\n{p}"
        );
    }
    assert!(!dir.join("ringlb-man.1").exists() && !dir.join("ringlb-completions.1").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_cover_the_subcommands() {
    for (shell, marker) in [
        ("bash", "_ringlb()"),
        ("zsh", "#compdef ringlb"),
        ("fish", "complete -c ringlb"),
    ] {
        let out = ringlb(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", show(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(marker), "{shell}: no {marker:?}:\n{text}");
        for sub in ["run", "check", "demo", "config"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
    }
}
