//! The stats page (`GET /` on the admin endpoint) in a real headless Chromium (Debian's
//! `chromium` package) against the real binary: the page's script fetches `/status` and renders
//! one row per backend; the test reads the DOM Chromium built (`--dump-dom`), checks every row's
//! state and counters against the traffic it sent (bytes for TCP, datagrams for UDP), kills a health-checked backend, reloads the
//! page and checks the row turned `down` with the probe's reason. It saves a screenshot as
//! `target/stats-page.png`. Without a browser: the page is served as HTML, the same bytes as
//! `src/admin/stats.html`, and names no external URL.
//!
//! A missing `chromium` is a failure naming the package, never a skip (`.ci/run` installs it).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::admin::{http_get, http_post};
use common::procs::{require_tool, tail, try_run, TempDir};
use common::udp::{udp_listener, UdpClient, UdpEcho};
use common::*;

/// How long one Chromium run may take (start, load, script, dump).
const BROWSER_DEADLINE: Duration = Duration::from_secs(90);
/// Health check of the "web" listener: a killed backend is down after 2 failed probes.
const HEALTH: &str = "{ interval = \"200ms\", timeout = \"100ms\", rise = 1, fall = 2 }";
/// How long a UDP request waits for its reply.
const WAIT: Duration = Duration::from_secs(5);
/// Bytes each client connection echoes.
const LEN: u64 = 1000;

fn admin(lb: &Lb) -> SocketAddr {
    lb.admin_addr()
        .unwrap_or_else(|| panic!("no admin endpoint line; stderr:\n{}", lb.stderr_tail(20)))
}

fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(admin, "/status");
    assert_eq!(code, 200, "/status: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}):\n{body}"))
}

/// The `/status` entry of `addr` in listener `l`.
fn backend_status(st: &serde_json::Value, l: &str, addr: SocketAddr) -> serde_json::Value {
    st["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|x| x["name"] == l)
        .and_then(|x| x["backends"].as_array())
        .and_then(|bs| bs.iter().find(|b| b["address"] == addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("{l}/{addr} not in /status:\n{st:#}"))
}

/// Headless Chromium with a private profile directory (removed on drop).
struct Browser {
    bin: PathBuf,
    profile: TempDir,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            bin: require_tool("chromium", "chromium"),
            profile: TempDir::new("chromium"),
        }
    }

    fn command(&self, url: &str, what: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--headless")
            .arg("--disable-gpu")
            .arg("--no-first-run")
            .arg("--no-default-browser-check")
            .arg("--disable-extensions")
            .arg("--disable-background-networking")
            .arg("--disable-dev-shm-usage")
            .arg(format!("--user-data-dir={}", self.profile.path().display()))
            .arg("--window-size=1400,760")
            // Run the page's timers and let its fetch of /status finish before dumping (virtual
            // time waits for network requests in flight).
            .arg("--virtual-time-budget=3000");
        // Chromium refuses to run as root with its sandbox on (CI runs as root).
        // (/proc/self belongs to the process's effective user.)
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        if root {
            c.arg("--no-sandbox");
        }
        c.args(what).arg(url);
        c
    }

    fn run(&self, url: &str, what: &[&str]) -> String {
        let mut c = self.command(url, what);
        let out = try_run(&mut c, BROWSER_DEADLINE).unwrap_or_else(|e| panic!("chromium: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "chromium {what:?} {url}: {}\nstderr:\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 20)
        );
        stdout
    }

    /// The DOM after the page's script ran; retried (a bounded number of times) until the
    /// script says it rendered `/status` at least once.
    fn dom(&self, url: &str) -> String {
        let mut last = String::new();
        for _ in 0..3 {
            last = self.run(url, &["--dump-dom"]);
            if last.contains("data-loaded=\"1\"") {
                return last;
            }
        }
        panic!("the page never rendered /status (data-loaded stays 0); last DOM:\n{last}");
    }

    fn screenshot(&self, url: &str, path: &Path) {
        let _ = std::fs::remove_file(path);
        self.run(
            url,
            &[
                &format!("--screenshot={}", path.display()),
                "--hide-scrollbars",
            ],
        );
        let png = std::fs::read(path)
            .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()));
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
            "{} is not a screenshot ({} bytes)",
            path.display(),
            png.len()
        );
    }
}

/// One backend row of the rendered page.
struct Row(String);

impl Row {
    fn find(dom: &str, listener: &str, backend: SocketAddr) -> Row {
        let start = format!("<tr data-listener=\"{listener}\" data-backend=\"{backend}\"");
        let i = dom
            .find(&start)
            .unwrap_or_else(|| panic!("no row for {listener}/{backend} in the page:\n{dom}"));
        let end = dom[i..].find("</tr>").map_or(dom.len(), |e| i + e);
        Row(dom[i..end].to_string())
    }

    fn attr(&self, name: &str) -> &str {
        let key = format!("{name}=\"");
        let i = self.0.find(&key).map(|i| i + key.len());
        let i = i.unwrap_or_else(|| panic!("no {name} in {}", self.0));
        &self.0[i..i + self.0[i..].find('"').expect("closing quote")]
    }

    /// The row's state; the badge the operator sees says the same.
    fn state(&self) -> &str {
        let state = self.attr("data-state");
        let badge = format!("<span class=\"state {state}\" data-field=\"state\">{state}</span>");
        assert!(self.0.contains(&badge), "badge {badge} not in {}", self.0);
        state
    }

    /// The `data-value` of the cell `data-field="field"`.
    fn value(&self, field: &str) -> u64 {
        let key = format!("data-field=\"{field}\" data-value=\"");
        let i = self.0.find(&key).map(|i| i + key.len());
        let i = i.unwrap_or_else(|| panic!("no {field} value in {}", self.0));
        let v = &self.0[i..i + self.0[i..].find('"').expect("closing quote")];
        v.parse()
            .unwrap_or_else(|e| panic!("{field} = {v:?}: {e} in {}", self.0))
    }

    /// The text of the cell `data-field="field"`.
    fn text(&self, field: &str) -> &str {
        let key = format!("data-field=\"{field}\"");
        let i = self
            .0
            .find(&key)
            .unwrap_or_else(|| panic!("no {field} in {}", self.0));
        let i = i + self.0[i..].find('>').expect("tag end") + 1;
        &self.0[i..i + self.0[i..].find("</td>").expect("cell end")]
    }
}

/// Loads the page in Chromium: rows, states and counters match the traffic; a killed backend
/// turns `down` with the probe's reason on a reload; a drained one shows `drained`, an ejected
/// one `ejected`. Saves `target/stats-page.png`.
#[test]
fn the_stats_page_shows_backends_and_a_state_change_in_chromium() {
    let browser = Browser::new();
    let (a, b, c) = (
        EchoServer::start(),
        EchoServer::start(),
        EchoServer::start(),
    );
    let (live, dead) = (EchoServer::start(), dead_addr());
    let udp = UdpEcho::start("dns");
    let config = LbConfig::default()
        .listener(
            listener("web")
                .backend(a.addr())
                .backend(b.addr())
                .backend(c.addr())
                .set("health", HEALTH)
                // A killed backend must be found by the check (down), not ejected.
                .set("passive", "{ consecutive_failures = 0 }"),
        )
        .listener(
            listener("api")
                .backend(dead)
                .backend(live.addr())
                .set("passive", "{ consecutive_failures = 2 }"),
        )
        // Long enough that the flow is still open when the page is dumped.
        .listener(udp_listener("dns").backend(udp.addr()).idle_timeout("5m"))
        .to_toml();
    let lb = Lb::start(&config);
    let admin = admin(&lb);
    let url = format!("http://{admin}/");
    let ready = wait_until(Duration::from_secs(5), || {
        status(admin)["listeners"][0]["backends_up"] == 3
    });
    assert!(ready, "web backends not all up:\n{:#}", status(admin));

    // Round robin is global across workers: 6 connections are 2 per backend.
    for i in 0..6 {
        echo(lb.addr("web"), LEN, 0x57a7_0000 + i);
    }
    // Round robin reaches the dead backend first for some: two refusals eject it.
    for i in 0..4 {
        echo(lb.addr("api"), LEN, 0x57a7_0100 + i);
    }
    // UDP rows count datagrams: three requests, three replies.
    let client = UdpClient::bind(std::net::Ipv4Addr::LOCALHOST);
    for i in 0..3 {
        let reply = client.exchange(lb.addr("dns"), format!("q{i}").as_bytes(), WAIT);
        assert!(reply.starts_with("dns"), "UDP reply {reply:?}");
    }
    let drain = format!("/backends/web/{}/drain", c.addr());
    assert_eq!(http_post(admin, &drain).0, 200);
    let settled = wait_until(Duration::from_secs(5), || {
        let st = status(admin);
        st["listeners"][0]["active_connections"] == 0
            && st["listeners"][1]["active_connections"] == 0
            && backend_status(&st, "api", dead)["state"] == "ejected"
    });
    assert!(settled, "not settled:\n{:#}", status(admin));

    let dom = browser.dom(&url);
    assert!(dom.contains("<title>ringlb stats</title>"), "{dom}");
    assert!(
        dom.contains(&format!("id=\"version\">{}<", env!("CARGO_PKG_VERSION"))),
        "the header shows the version"
    );
    let st = status(admin);
    for (s, state) in [(&a, "up"), (&b, "up"), (&c, "drained")] {
        let row = Row::find(&dom, "web", s.addr());
        assert_eq!(row.state(), state, "{}", row.0);
        assert_eq!(row.value("total"), 2, "connections of {}", s.addr());
        assert_eq!(row.value("in"), 2 * LEN, "bytes to {}", s.addr());
        assert_eq!(row.value("out"), 2 * LEN, "bytes from {}", s.addr());
        assert_eq!(row.value("active"), 0);
        assert_eq!(row.value("errors"), 0);
        assert!(row.text("health").contains(" ok / "), "{}", row.0);
        let js = backend_status(&st, "web", s.addr());
        assert_eq!(
            row.value("total"),
            js["connections_total"].as_u64().unwrap()
        );
    }
    assert!(
        Row::find(&dom, "web", c.addr())
            .text("reason")
            .contains("drained by the admin endpoint"),
        "drain reason"
    );
    let ejected = Row::find(&dom, "api", dead);
    assert_eq!(ejected.state(), "ejected", "{}", ejected.0);
    assert!(ejected.value("errors") >= 2, "{}", ejected.0);
    assert!(
        ejected.text("reason").contains("ejected by passive health"),
        "{}",
        ejected.0
    );
    assert_eq!(Row::find(&dom, "api", live.addr()).state(), "up");
    assert!(dom.contains(">3/3 up<"), "web: 3 of 3 up in the heading");
    let dns = Row::find(&dom, "dns", udp.addr());
    assert_eq!(dns.state(), "up");
    assert_eq!(dns.value("in"), 3, "datagrams to the backend: {}", dns.0);
    assert_eq!(dns.value("out"), 3, "datagrams back: {}", dns.0);
    assert_eq!(dns.value("active"), 1, "one flow: {}", dns.0);
    assert!(
        dom.contains("udp 127.0.0.1:") && dom.contains(" · flows 1<"),
        "dns facts"
    );

    // Kill b: the check marks it down; a reload of the page shows it.
    let b_addr = b.addr();
    drop(b);
    let down = wait_until(Duration::from_secs(5), || {
        backend_status(&status(admin), "web", b_addr)["state"] == "down"
    });
    assert!(down, "{b_addr} not down in /status:\n{:#}", status(admin));
    let dom = browser.dom(&url);
    let row = Row::find(&dom, "web", b_addr);
    assert_eq!(row.state(), "down", "{}", row.0);
    assert!(
        row.text("reason").starts_with("health check failing: "),
        "{}",
        row.0
    );
    assert!(row.text("health").contains("failed"), "{}", row.0);
    assert_eq!(Row::find(&dom, "web", a.addr()).state(), "up");
    assert!(dom.contains(">2/3 up<"), "web: 2 of 3 up in the heading");

    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("stats-page.png");
    browser.screenshot(&url, &target);
    eprintln!("screenshot: {}", target.display());
}

/// Without a browser: `GET /` is the page (HTML content type, no caching, the bytes of
/// `src/admin/stats.html`), names no external URL, and `POST /` is refused.
#[test]
fn the_stats_page_is_served_as_self_contained_html() {
    let e = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web").backend(e.addr())]));
    let admin = admin(&lb);
    // The harness client drops headers: this test reads them, so it speaks HTTP itself.
    let mut s = try_connect(admin).expect("connect to the admin endpoint");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("send GET /");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer to GET /");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: text/html; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(head.contains("\r\ncache-control: no-store\r\n"), "{head}");
    let file =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/admin/stats.html"))
            .expect("src/admin/stats.html");
    assert_eq!(body, file, "GET / serves src/admin/stats.html as built");
    let lower = body.to_ascii_lowercase();
    for needle in ["http://", "https://", " src=", "@import", "url("] {
        assert!(!lower.contains(needle), "the page contains {needle:?}");
    }
    assert!(lower.contains("default-src 'none'"), "the page's CSP");
    assert_eq!(http_post(admin, "/").0, 405, "POST / is not a thing");
}
