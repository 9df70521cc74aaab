//! Who may change things through the admin endpoint, and where it listens, through the real
//! binary: without a token only loopback peers without browser headers (Origin, a foreign Host)
//! may POST; with `token_file` every POST needs the bearer token, which follows reloads; the
//! unix socket (mode 0600, curl `--unix-socket`, stale file replaced, removed on exit);
//! `bind = "none"`; and what a second ringlb on a taken admin address says.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::admin::{http_get, http_with};
use common::procs::{require_tool, try_run, TempDir};
use common::*;
use nix::sys::signal::Signal;

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin endpoint line; stderr:\n{}", lb.stderr_tail(20)))
}

/// The weight of each backend of listener 0 in `/status`.
fn weights(admin: SocketAddr) -> Vec<serde_json::Value> {
    let (code, body) = http_get(admin, "/status");
    assert_eq!(code, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    st["listeners"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["weight"].clone())
        .collect()
}

/// tiny_http took any POST: a web page on the operator's machine could drain every backend
/// with a cross-origin form post, or through DNS rebinding.
#[test]
fn posts_without_a_token_need_a_trusted_path() {
    let e = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web").backend(e.addr())]));
    let admin = admin(&lb);
    let port = admin.port().to_string();
    let drain = format!("/backends/web/{}/drain", e.addr());
    let localhost = format!("localhost:{port}");
    let evil = format!("evil.example:{port}");

    // What a browser sends is refused, and nothing changes.
    for headers in [
        vec![("Origin", "http://evil.example")],
        vec![("Origin", "null")],
        vec![("Host", evil.as_str())],
        vec![("Host", "127.0.0.2")],
        vec![("Host", "localhost:1")],
    ] {
        let (code, body) = http_with(admin, "POST", &drain, &headers);
        assert_eq!(code, 403, "POST {drain} {headers:?}: {body}");
        assert!(body.contains("token_file"), "the refusal says how: {body}");
        let (code, _) = http_with(admin, "POST", "/reload", &headers);
        assert_eq!(code, 403, "POST /reload {headers:?}");
    }
    assert_eq!(weights(admin), [1], "a refused drain drained");
    // Reads stay open to everyone.
    let (code, _) = http_with(
        admin,
        "GET",
        "/status",
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(code, 200);

    // What curl or a script sends is accepted.
    for headers in [
        vec![],
        vec![("Host", localhost.as_str())],
        vec![("Host", "localhost")],
        vec![("Host", "")],
    ] {
        let (code, body) = http_with(admin, "POST", "/reload", &headers);
        assert_eq!(code, 200, "POST /reload {headers:?}: {body}");
    }
    let (code, body) = http_with(admin, "POST", &drain, &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(weights(admin), [0]);
    let undrain = drain.replace("/drain", "/undrain");
    assert_eq!(http_with(admin, "POST", &undrain, &[]).0, 200);
    assert_eq!(weights(admin), [1]);
}

#[test]
fn a_token_file_guards_every_post_and_follows_reloads() {
    let dir = TempDir::new("admin-token");
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "first-token-0123\n").unwrap();
    let e = EchoServer::start();
    let config = LbConfig::default()
        .admin_field("token_file", &format!("\"{}\"", token_file.display()))
        .listener(listener("web").backend(e.addr()))
        .to_toml();
    let lb = Lb::start(&config);
    let admin = admin(&lb);
    let drain = format!("/backends/web/{}/drain", e.addr());

    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Basic Zmlyc3Q="),
        Some("Bearer first-token-012"),
    ] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (code, body) = http_with(admin, "POST", &drain, &headers);
        assert_eq!(code, 401, "{auth:?}: {body}");
        assert_eq!(
            http_with(admin, "POST", "/reload", &headers).0,
            401,
            "{auth:?}"
        );
    }
    assert_eq!(weights(admin), [1]);
    assert_eq!(http_get(admin, "/livez").0, 200, "reads need no token");
    let good = [("Authorization", "Bearer first-token-0123")];
    assert_eq!(http_with(admin, "POST", &drain, &good).0, 200);
    assert_eq!(weights(admin), [0]);
    // With the token, a browser's headers do not matter: the page cannot know it.
    let good_from_page = [
        ("Authorization", "bearer first-token-0123"),
        ("Origin", "https://ops.example"),
    ];
    let undrain = drain.replace("/drain", "/undrain");
    assert_eq!(http_with(admin, "POST", &undrain, &good_from_page).0, 200);

    // A new token takes effect with the reload that reads it.
    std::fs::write(&token_file, "second-token-4567").unwrap();
    let (code, body) = http_with(admin, "POST", "/reload", &good);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        http_with(admin, "POST", "/reload", &good).0,
        401,
        "old token"
    );
    let new = [("Authorization", "Bearer second-token-4567")];
    assert_eq!(http_with(admin, "POST", "/reload", &new).0, 200);

    // A reload that cannot read the token is refused; the running token stays.
    std::fs::remove_file(&token_file).unwrap();
    let (code, body) = http_with(admin, "POST", "/reload", &new);
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("admin: field \"token_file\"")
            && body.contains(&token_file.display().to_string()),
        "{body}"
    );
    assert_eq!(http_with(admin, "POST", &drain, &new).0, 200);
}

#[test]
fn a_missing_or_empty_token_file_is_a_config_error() {
    let dir = TempDir::new("admin-token-bad");
    let empty = dir.path().join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    let missing = dir.path().join("missing.token");
    for (path, want) in [(&missing, "cannot be read"), (&empty, "is empty")] {
        let config = LbConfig::default()
            .admin_field("token_file", &format!("\"{}\"", path.display()))
            .listener(listener("web").backend("127.0.0.1:9".parse().unwrap()))
            .to_toml();
        let file = TempFile::new("bad-token", "toml", &config);
        for cmd in ["check", "run"] {
            let out = run_ringlb(
                &[cmd, "--config", &file.path().to_string_lossy()],
                Duration::from_secs(10),
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd}: {stderr}");
            let line = format!("admin: field \"token_file\": \"{}\" {want}", path.display());
            assert!(stderr.contains(&line), "{cmd}: want {line:?} in:\n{stderr}");
        }
    }
}

fn curl_unix(socket: &Path, method: &str, path: &str) -> (u16, String) {
    let curl = require_tool("curl", "curl");
    let out = try_run(
        Command::new(curl)
            .args([
                "-sS",
                "-m",
                "5",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
                "--unix-socket",
            ])
            .arg(socket)
            .arg(format!("http://localhost{path}")),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("curl: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl {method} {path}: {text:?} {:?}", out.stderr));
    (code, body.to_string())
}

#[test]
fn the_unix_socket_serves_with_mode_0600_and_is_removed_on_exit() {
    let dir = TempDir::new("admin-unix");
    let socket = dir.path().join("admin.sock");
    // A stale socket file, as a killed ringlb leaves it: replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a stale socket"));
    assert!(socket.exists());
    let e = EchoServer::start();
    let config = LbConfig::default()
        .admin_bind(&format!("unix:{}", socket.display()))
        .listener(listener("web").backend(e.addr()))
        .to_toml();
    let mut lb = Lb::start(&config);
    assert_eq!(
        lb.admin_unix().as_deref(),
        Some(socket.as_path()),
        "{}",
        lb.stderr_tail(10)
    );
    assert_eq!(lb.admin_addr(), None);
    let meta = std::fs::symlink_metadata(&socket).expect("socket file");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    assert_eq!(
        curl_unix(&socket, "GET", "/livez"),
        (200, "ok\n".to_string())
    );
    let (code, body) = curl_unix(&socket, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("ringlb_build_info"), "{body}");
    let (code, body) = curl_unix(&socket, "POST", "/reload");
    assert_eq!(code, 200, "{body}");

    // A second ringlb on the same live socket refuses to start and leaves it alone.
    let file = TempFile::new("unix-taken", "toml", &config);
    let out = run_ringlb(
        &["run", "--config", &file.path().to_string_lossy()],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("admin: cannot serve on unix:{}", socket.display()))
            && stderr.contains("another ringlb may hold it"),
        "{stderr}"
    );
    assert_eq!(curl_unix(&socket, "GET", "/livez").0, 200);

    // A reload cannot move the admin endpoint.
    std::fs::write(
        lb.config_path(),
        config.replace(&format!("unix:{}", socket.display()), "127.0.0.1:0"),
    )
    .unwrap();
    let (code, body) = curl_unix(&socket, "POST", "/reload");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("admin: field \"bind\"") && body.contains("needs a restart"),
        "{body}"
    );

    lb.signal(Signal::SIGTERM);
    assert!(
        lb.wait_exit(Duration::from_secs(5)).is_some(),
        "no exit on SIGTERM"
    );
    assert!(!socket.exists(), "the socket file outlived ringlb");
}

#[test]
fn bind_none_turns_the_admin_endpoint_off() {
    let e = EchoServer::start();
    let config = LbConfig::default()
        .admin_bind("none")
        .listener(listener("web").backend(e.addr()))
        .to_toml();
    let lb = Lb::start(&config);
    assert!(lb.admin_off(), "{}", lb.stderr_tail(10));
    assert_eq!(lb.admin_addr(), None);
    echo(lb.addr("web"), 1000, 0xad_0ff);
    // Once the echo's sockets are closed: per worker its listening socket and the duplicate a
    // binary upgrade would hand over; no admin socket, nothing else.
    lb.assert_fds_return(2 * WORKERS, Duration::from_secs(3));
}

/// tiny_http's bind came after every listener was bound and logged, and the error gave no hint.
#[test]
fn a_second_ringlb_on_the_same_admin_address_says_what_to_do() {
    let e = EchoServer::start();
    let first = Lb::start(&ringlb_config([listener("web").backend(e.addr())]));
    let taken = admin(&first);
    let config = LbConfig::default()
        .admin_bind(&taken.to_string())
        .listener(listener("web").backend(e.addr()))
        .to_toml();
    let file = TempFile::new("admin-taken", "toml", &config);
    let out = run_ringlb(
        &["run", "--config", &file.path().to_string_lossy()],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let want = format!(
        "admin: cannot serve on {taken}: Address already in use (os error 98); another ringlb \
         may hold it: set [admin] bind to a free address (or \"none\")"
    );
    assert!(stderr.contains(&want), "want {want:?} in:\n{stderr}");
    assert!(
        !stderr.contains("listening on"),
        "bound listeners first:\n{stderr}"
    );
    assert_eq!(
        http_get(taken, "/livez").0,
        200,
        "the first one is unharmed"
    );
}

/// A network namespace of the test's own (deleted on drop) with loopback up and also holding
/// 10.78.0.1: a connection from 10.78.0.1 to itself has a peer that is not a loopback address,
/// and nothing leaves the namespace.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("ringlb-admin-{}", std::process::id());
        let ip = |args: &[&str]| try_run(Command::new("ip").args(args), Duration::from_secs(10));
        match ip(&["netns", "add", &name]) {
            Ok(out) if out.status.success() => {}
            other => {
                eprintln!("cannot create a network namespace: {other:?}");
                return None;
            }
        }
        let ns = Netns(name);
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "10.78.0.1/32", "dev", "lo"],
        ] {
            let mut full = vec!["-n", ns.0.as_str()];
            full.extend_from_slice(args);
            let out = ip(&full).unwrap_or_else(|e| panic!("ip {}: {e}", full.join(" ")));
            assert!(out.status.success(), "ip {}: {out:?}", full.join(" "));
        }
        Some(ns)
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates live there.
    fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Runs ringlb on `toml` in the namespace and `f` once its admin endpoint (0.0.0.0:9900)
    /// answers; the process is killed afterwards, whatever `f` did.
    fn with_ringlb(&self, toml: &str, f: impl FnOnce() + Send) {
        struct Reaped(std::process::Child);
        impl Drop for Reaped {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let cfg = TempFile::new("netns-admin", "toml", toml);
        let _lb = Command::new("ip")
            .args(["netns", "exec", &self.0, ringlb_bin(), "run", "--config"])
            .arg(cfg.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(Reaped)
            .expect("spawn ringlb in the namespace");
        self.within(|| {
            let admin: SocketAddr = "127.0.0.1:9900".parse().unwrap();
            let up = wait_until(Duration::from_secs(10), || {
                common::admin::try_http_request(admin, "GET", "/livez", b"").is_ok()
            });
            assert!(up, "ringlb in the namespace never answered /livez");
            f()
        });
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = try_run(
            Command::new("ip").args(["netns", "del", &self.0]),
            Duration::from_secs(10),
        );
    }
}

/// Without a token a peer that is not loopback may read but not change anything; with one, it
/// may change things with the token.
#[test]
fn peers_off_loopback_need_the_token() {
    if require_tool_quiet("ip").is_none() {
        eprintln!("skipped: needs iproute2 (.ci/run installs it) and root");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("skipped: no network namespaces here");
        return;
    };
    let remote_src: SocketAddr = "10.78.0.1:0".parse().unwrap();
    let remote: SocketAddr = "10.78.0.1:9900".parse().unwrap();
    // An HTTP/1.0 request from 10.78.0.1 to the admin endpoint at 10.78.0.1.
    let from_remote = move |method: &str, path: &str, auth: Option<&str>| -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = connect_from(remote_src, remote);
        let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {remote}\r\n{auth}\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        common::admin::parse_response(&raw).unwrap()
    };
    let base = "[runtime]\nworkers = 1\n[admin]\nbind = \"0.0.0.0:9900\"\n";
    let listeners = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:7000\"\n\
                     backends = [ { address = \"127.0.0.1:7001\" } ]\n";
    ns.with_ringlb(&format!("{base}{listeners}"), || {
        assert_eq!(from_remote("GET", "/livez", None).0, 200);
        let (code, body) = from_remote("POST", "/reload", None);
        assert_eq!(code, 403, "{body}");
        assert!(
            body.contains("only from loopback peers (10.78.0.1 is not one)"),
            "{body}"
        );
        let local: SocketAddr = "127.0.0.1:9900".parse().unwrap();
        assert_eq!(common::admin::http_post(local, "/reload").0, 200);
    });
    let dir = TempDir::new("netns-token");
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "netns-token-89ab\n").unwrap();
    let with_token = format!("{base}token_file = \"{}\"\n{listeners}", token.display());
    ns.with_ringlb(&with_token, || {
        assert_eq!(from_remote("POST", "/reload", None).0, 401);
        let (code, body) = from_remote("POST", "/reload", Some("netns-token-89ab"));
        assert_eq!(code, 200, "{body}");
    });
}

/// `tool` on `$PATH` (or in /usr/sbin, /sbin), if there is one.
fn require_tool_quiet(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d: std::path::PathBuf| d.join(tool))
        .find(|p| p.is_file())
}
