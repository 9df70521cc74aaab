//! The monitoring files under `deploy/` against the real binary: every metric name and label
//! that `deploy/grafana/ringlb.json` and `deploy/prometheus/alerts.yml` use must exist in a real
//! scrape of a running ringlb (a TCP and a UDP listener with traffic and a health check), so a
//! renamed metric fails here instead of silently emptying a panel or disarming an alert. The
//! dashboard is parsed as JSON and its structure checked; the rules go through
//! `promtool check rules` and `promtool test rules` (Debian's `prometheus` package; a missing
//! `promtool` is a failure naming it, never a skip).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::admin::scrape;
use common::procs::{require_tool, run_ok};
use common::udp::{udp_listener, UdpClient, UdpEcho};
use common::*;

/// Labels Prometheus adds to every scraped series (not in ringlb's own output).
const TARGET_LABELS: [&str; 2] = ["instance", "job"];
/// The prefixes of the metric names ringlb exports.
const PREFIXES: [&str; 2] = ["ringlb_", "process_"];

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

/// Family name → the label names its samples carry, from a real scrape.
type Families = BTreeMap<String, BTreeSet<String>>;

/// Scrapes a running ringlb with a health-checked TCP listener and a UDP listener, each having
/// carried traffic, so that every family has samples.
fn real_families() -> Families {
    let tcp = EchoServer::start();
    let udp = UdpEcho::start("dns");
    let config = LbConfig::default()
        .listener(listener("web").backend(tcp.addr()).set(
            "health",
            "{ interval = \"100ms\", timeout = \"100ms\", rise = 1, fall = 1 }",
        ))
        .listener(udp_listener("dns").backend(udp.addr()))
        .to_toml();
    let lb = Lb::start(&config);
    let admin = lb
        .admin_addr()
        .unwrap_or_else(|| panic!("no admin endpoint line; stderr:\n{}", lb.stderr_tail(20)));
    echo(lb.addr("web"), 100, 0xda5_0001);
    let client = UdpClient::bind(std::net::Ipv4Addr::LOCALHOST);
    let reply = client.exchange(lb.addr("dns"), b"ping", Duration::from_secs(5));
    assert!(reply.starts_with("dns"), "UDP reply {reply:?}");
    let checked = wait_until(Duration::from_secs(5), || {
        let s = scrape(admin);
        s.samples
            .iter()
            .any(|x| x.metric == "ringlb_health_checks_total" && sample_positive(x))
    });
    assert!(checked, "no health check counted");
    let mut families = Families::new();
    for s in scrape(admin).samples {
        let labels = families.entry(s.metric.clone()).or_default();
        labels.extend(s.labels.keys().cloned());
    }
    families
}

fn sample_positive(s: &prometheus_parse::Sample) -> bool {
    common::admin::sample_value(s) > 0.0
}

/// The ringlb metric names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    identifiers(expr)
        .into_iter()
        .filter(|(id, _)| PREFIXES.iter().any(|p| id.starts_with(p)))
        .map(|(id, _)| id)
        .collect()
}

/// Every identifier (`[A-Za-z_:][A-Za-z0-9_:]*`) outside string literals, with its end offset.
fn identifiers(expr: &str) -> Vec<(String, usize)> {
    let b = expr.as_bytes();
    let (mut out, mut i) = (Vec::new(), 0);
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            // Skip a string literal (label values, regexes).
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            out.push((expr[start..i].to_string(), i));
        } else {
            i += 1;
        }
    }
    out
}

/// The label names in the `{...}` selector right after each metric name: (metric, labels).
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    identifiers(expr)
        .into_iter()
        .filter(|(id, _)| PREFIXES.iter().any(|p| id.starts_with(p)))
        .filter_map(|(id, end)| {
            let rest = expr[end..].trim_start();
            let body = rest.strip_prefix('{')?;
            let body = &body[..body.find('}')?];
            let labels = identifiers(body).into_iter().map(|(l, _)| l).collect();
            Some((id, labels))
        })
        .collect()
}

/// The label names of every `by (...)`, `without (...)`, `on (...)`, `ignoring (...)` clause.
fn grouping_labels(expr: &str) -> Vec<String> {
    let ids = identifiers(expr);
    let mut out = Vec::new();
    for (id, end) in ids {
        if ["by", "without", "on", "ignoring"].contains(&id.as_str()) {
            let rest = expr[end..].trim_start();
            if let Some(body) = rest.strip_prefix('(') {
                let body = &body[..body.find(')').unwrap_or(body.len())];
                out.extend(identifiers(body).into_iter().map(|(l, _)| l));
            }
        }
    }
    out
}

/// What is wrong with `expr` against the real families (empty = nothing).
fn problems(expr: &str, families: &Families) -> Vec<String> {
    let mut out = Vec::new();
    let names = metric_names(expr);
    for n in &names {
        if !families.contains_key(n) {
            out.push(format!("metric {n} is not exported by ringlb"));
        }
    }
    for (metric, labels) in selectors(expr) {
        for l in labels {
            let known = families.get(&metric).is_some_and(|ls| ls.contains(&l));
            if !known && !TARGET_LABELS.contains(&l.as_str()) {
                out.push(format!("{metric} has no label {l:?}"));
            }
        }
    }
    for l in grouping_labels(expr) {
        let known = names
            .iter()
            .any(|n| families.get(n).is_some_and(|ls| ls.contains(&l)));
        if !known && !TARGET_LABELS.contains(&l.as_str()) {
            out.push(format!("no metric of the expression has label {l:?}"));
        }
    }
    out
}

/// Every PromQL string in the dashboard: panel targets, template variable queries (including
/// `label_values(metric, label)`, checked as `metric` with that label grouped) and annotations.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    fn panels<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for p in v.as_array().into_iter().flatten() {
            out.push(p);
            panels(&p["panels"], out);
        }
    }
    let mut all = Vec::new();
    panels(&dash["panels"], &mut all);
    let mut out = Vec::new();
    for p in all {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("target without expr: {t}"));
            out.push((format!("panel {:?}", p["title"]), expr.to_string()));
        }
    }
    for v in dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().expect("variable query");
            let inner = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("variable {}: not label_values(...): {q}", v["name"]));
            let (metric, label) = inner.rsplit_once(',').expect("label_values(metric, label)");
            out.push((
                format!("variable {}", v["name"]),
                format!("count by ({}) ({})", label.trim(), metric.trim()),
            ));
        }
    }
    for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push((format!("annotation {:?}", a["name"]), expr.to_string()));
        }
    }
    out
}

/// The checker itself finds what it must: an unknown metric, an unknown label, a bad `by`.
#[test]
fn the_expression_checker_catches_unknown_names() {
    let mut f = Families::new();
    f.insert(
        "ringlb_backend_up".into(),
        ["listener".to_string(), "backend".to_string()].into(),
    );
    assert!(problems(
        "sum by (listener) (ringlb_backend_up{instance=~\"$i\"})",
        &f
    )
    .is_empty());
    assert_eq!(
        problems("rate(ringlb_nope_total[5m])", &f),
        ["metric ringlb_nope_total is not exported by ringlb"]
    );
    assert_eq!(
        problems("ringlb_backend_up{pool=\"x\"}", &f),
        ["ringlb_backend_up has no label \"pool\""]
    );
    assert_eq!(
        problems("sum by (pool) (ringlb_backend_up)", &f),
        ["no metric of the expression has label \"pool\""]
    );
    assert!(
        metric_names("ringlb_backend_up{reason=\"ringlb_fake_total\"}") == ["ringlb_backend_up"],
        "names inside strings are not metric names"
    );
}

/// `deploy/grafana/ringlb.json` is a Grafana dashboard whose every expression names metrics and
/// labels a real ringlb exports, covering connections, bytes, errors, backend up, health,
/// reloads and UDP flows.
#[test]
fn the_grafana_dashboard_uses_only_real_metrics() {
    let path = deploy("grafana/ringlb.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let dash: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
    assert_eq!(dash["uid"], "ringlb");
    assert!(dash["title"].is_string() && dash["schemaVersion"].is_u64());
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| v["name"].as_str().expect("variable name"))
        .collect();
    assert_eq!(vars, ["datasource", "instance", "listener"]);

    // Panels: unique ids, a title, the datasource variable, at least one query each.
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "panel without a title: {p}");
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }

    let families = real_families();
    let exprs = dashboard_exprs(&dash);
    let mut used = BTreeSet::new();
    let mut wrong = Vec::new();
    for (where_, expr) in &exprs {
        used.extend(metric_names(expr));
        wrong.extend(
            problems(expr, &families)
                .into_iter()
                .map(|p| format!("{where_}: {p}: {expr}")),
        );
    }
    assert!(wrong.is_empty(), "the dashboard:\n{}", wrong.join("\n"));
    for topic in [
        "ringlb_connections_total",
        "ringlb_listener_active_connections",
        "ringlb_bytes_total",
        "ringlb_connect_errors_total",
        "ringlb_backend_up",
        "ringlb_health_checks_total",
        "ringlb_reloads_total",
        "ringlb_udp_flows",
    ] {
        assert!(used.contains(topic), "no panel shows {topic}");
    }
}

/// `deploy/prometheus/alerts.yml` passes `promtool check rules`, its unit tests in
/// `alerts_test.yml` pass, it has the four alerts the operators asked for, and every metric and
/// label it uses exists in a real scrape.
#[test]
fn the_alert_rules_are_valid_tested_and_use_only_real_metrics() {
    let promtool = require_tool("promtool", "prometheus");
    let rules = deploy("prometheus/alerts.yml");
    let out = run_ok(
        Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(&rules),
        Duration::from_secs(60),
    );
    assert!(out.contains("SUCCESS"), "promtool check rules: {out}");
    let out = run_ok(
        Command::new(&promtool)
            .current_dir(deploy("prometheus"))
            .args(["test", "rules", "alerts_test.yml"]),
        Duration::from_secs(60),
    );
    assert!(out.contains("SUCCESS"), "promtool test rules: {out}");

    let text = std::fs::read_to_string(&rules).expect("alerts.yml");
    for alert in [
        "RinglbBackendDown",
        "RinglbNoHealthyBackend",
        "RinglbReloadFailed",
        "RinglbFdUsageHigh",
    ] {
        assert!(
            text.contains(&format!("- alert: {alert}\n")),
            "no alert {alert}"
        );
    }
    let exprs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(str::trim)
        .collect();
    assert!(exprs.len() >= 4, "{exprs:?}");
    let families = real_families();
    let wrong: Vec<String> = exprs
        .iter()
        .flat_map(|e| {
            problems(e, &families)
                .into_iter()
                .map(move |p| format!("{p}: {e}"))
        })
        .collect();
    assert!(wrong.is_empty(), "alerts.yml:\n{}", wrong.join("\n"));
}
