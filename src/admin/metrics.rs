//! `/metrics`: the Prometheus text exposition (format 0.0.4) of the listeners, backends, health
//! checks and workers, the build, reloads, the admin server and the process (the standard
//! `process_*` families). Per-worker counters are summed here, at scrape time.
//! Must not: write anything it reads.

use super::{age_ms, AdminState};
use crate::backend::CLOSE_REASONS;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
            .collect();
        let _ = writeln!(self.out, "{name}{{{}}} {v}", l.join(","));
    }
    /// A sample without labels and with a fractional value (seconds, timestamps).
    fn float(&mut self, name: &str, v: f64) {
        let _ = writeln!(self.out, "{name} {v}");
    }
    /// A whole family of one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, v: Option<f64>) {
        if let Some(v) = v {
            self.head(name, kind, help);
            self.float(name, v);
        }
    }
}

/// Prometheus text exposition (format 0.0.4). Per-worker counters are summed here.
pub fn metrics(state: &AdminState) -> String {
    let mut out = String::with_capacity(8192);
    let listeners = state.listeners.load();
    // Registry keys are pool keys (`listener` or `listener/pool`): split into both labels.
    let backends: Vec<(String, String, _)> = state
        .registry
        .all()
        .into_iter()
        .map(|(key, b)| {
            let (l, p) = crate::config::split_pool_key(&key);
            (l.to_string(), p.to_string(), b)
        })
        .collect();
    let mut f = Family { out: &mut out };
    f.head(
        "ringlb_connections_total",
        "counter",
        "Connections established to a backend.",
    );
    for (l, p, b) in &backends {
        let a = b.address.to_string();
        let v = b.sum(|w| &w.connections);
        f.line(
            "ringlb_connections_total",
            &[("listener", l), ("pool", p), ("backend", &a)],
            v,
        );
    }
    f.head(
        "ringlb_active_connections",
        "gauge",
        "Connections assigned to a backend and not yet closed (all workers).",
    );
    for (l, p, b) in &backends {
        let a = b.address.to_string();
        f.line(
            "ringlb_active_connections",
            &[("listener", l), ("pool", p), ("backend", &a)],
            b.active(),
        );
    }
    f.head(
        "ringlb_bytes_total",
        "counter",
        "Bytes forwarded, by direction.",
    );
    for (l, p, b) in &backends {
        let a = b.address.to_string();
        let up = b.sum(|w| &w.bytes_up);
        let down = b.sum(|w| &w.bytes_down);
        f.line(
            "ringlb_bytes_total",
            &[
                ("listener", l),
                ("pool", p),
                ("backend", &a),
                ("direction", "to_backend"),
            ],
            up,
        );
        f.line(
            "ringlb_bytes_total",
            &[
                ("listener", l),
                ("pool", p),
                ("backend", &a),
                ("direction", "to_client"),
            ],
            down,
        );
    }
    f.head(
        "ringlb_connect_errors_total",
        "counter",
        "Failed connect attempts to a backend, by reason.",
    );
    for (l, p, b) in &backends {
        let a = b.address.to_string();
        for (reason, v) in [
            ("refused", b.sum(|w| &w.connect_refused)),
            ("timeout", b.sum(|w| &w.connect_timeout)),
            ("other", b.sum(|w| &w.connect_other)),
        ] {
            f.line(
                "ringlb_connect_errors_total",
                &[
                    ("listener", l),
                    ("pool", p),
                    ("backend", &a),
                    ("reason", reason),
                ],
                v,
            );
        }
    }
    f.head(
        "ringlb_backend_up",
        "gauge",
        "1 if the backend is eligible for new connections (healthy, not ejected), else 0.",
    );
    for lv in listeners.iter() {
        let snap = lv.published.load();
        for (pool, m) in snap
            .pools
            .iter()
            .flat_map(|p| p.members.iter().map(move |m| (p, m)))
        {
            let a = m.address.to_string();
            f.line(
                "ringlb_backend_up",
                &[
                    ("listener", &lv.name),
                    ("pool", &pool.name),
                    ("backend", &a),
                ],
                u64::from(m.up),
            );
        }
    }
    f.head(
        "ringlb_backend_state",
        "gauge",
        "1 for the state the backend is in (up, not_ready, down, drained, ejected), else 0.",
    );
    for lv in listeners.iter() {
        let snap = lv.published.load();
        for (pool, m) in snap
            .pools
            .iter()
            .flat_map(|p| p.members.iter().map(move |m| (p, m)))
        {
            let a = m.address.to_string();
            for st in crate::snapshot::BackendState::ALL {
                f.line(
                    "ringlb_backend_state",
                    &[
                        ("listener", &lv.name),
                        ("pool", &pool.name),
                        ("backend", &a),
                        ("state", st.name()),
                    ],
                    u64::from(m.state == st),
                );
            }
        }
    }
    f.head(
        "ringlb_backend_flap_holds_total",
        "counter",
        "Flap damping holds: a backend held down after changing state too often.",
    );
    for (l, p, b) in &backends {
        let a = b.address.to_string();
        f.line(
            "ringlb_backend_flap_holds_total",
            &[("listener", l), ("pool", p), ("backend", &a)],
            b.control.flap_holds.load(Ordering::Relaxed),
        );
    }
    f.head(
        "ringlb_health_checks_total",
        "counter",
        "Active health probes, by result.",
    );
    for (l, p, b) in &backends {
        let a = b.address.to_string();
        let c = &b.control;
        f.line(
            "ringlb_health_checks_total",
            &[
                ("listener", l),
                ("pool", p),
                ("backend", &a),
                ("result", "success"),
            ],
            c.checks_ok.load(Ordering::Relaxed),
        );
        f.line(
            "ringlb_health_checks_total",
            &[
                ("listener", l),
                ("pool", p),
                ("backend", &a),
                ("result", "failure"),
            ],
            c.checks_failed.load(Ordering::Relaxed),
        );
    }
    f.head(
        "ringlb_health_flips_total",
        "counter",
        "Up/down transitions of a backend.",
    );
    for (l, p, b) in &backends {
        let a = b.address.to_string();
        f.line(
            "ringlb_health_flips_total",
            &[("listener", l), ("pool", p), ("backend", &a)],
            b.control.flips.load(Ordering::Relaxed),
        );
    }
    f.head(
        "ringlb_ejections_total",
        "counter",
        "Passive ejections after consecutive connect failures.",
    );
    for (l, p, b) in &backends {
        let a = b.address.to_string();
        f.line(
            "ringlb_ejections_total",
            &[("listener", l), ("pool", p), ("backend", &a)],
            b.control.ejections.load(Ordering::Relaxed),
        );
    }
    f.head(
        "ringlb_accepted_total",
        "counter",
        "Client connections accepted.",
    );
    for lv in listeners.iter() {
        f.line(
            "ringlb_accepted_total",
            &[("listener", &lv.name)],
            lv.stats.sum(|w| &w.accepted),
        );
    }
    f.head(
        "ringlb_listener_active_connections",
        "gauge",
        "Client connections open on the listener.",
    );
    for lv in listeners.iter() {
        f.line(
            "ringlb_listener_active_connections",
            &[("listener", &lv.name)],
            lv.stats.sum(|w| &w.active),
        );
    }
    f.head(
        "ringlb_no_backend_total",
        "counter",
        "Client connections closed at once because no backend was eligible.",
    );
    for lv in listeners.iter() {
        f.line(
            "ringlb_no_backend_total",
            &[("listener", &lv.name)],
            lv.stats.sum(|w| &w.no_backend),
        );
    }
    f.head(
        "ringlb_closes_total",
        "counter",
        "Closed client connections, by close reason.",
    );
    for lv in listeners.iter() {
        for (i, reason) in CLOSE_REASONS.iter().enumerate() {
            f.line(
                "ringlb_closes_total",
                &[("listener", &lv.name), ("reason", reason)],
                lv.stats.sum(|w| &w.closes[i]),
            );
        }
    }
    f.head(
        "ringlb_tls_inspect_total",
        "counter",
        "ClientHello reads of TLS passthrough listeners, by result (sni, no_sni, not_tls, \
         too_large, malformed, timeout, eof).",
    );
    for lv in listeners.iter() {
        if lv.published.load().inspect.is_none() {
            continue;
        }
        for (i, result) in crate::backend::TLS_INSPECT_RESULTS.iter().enumerate() {
            f.line(
                "ringlb_tls_inspect_total",
                &[("listener", &lv.name), ("result", result)],
                lv.stats.sum(|w| &w.tls_inspect[i]),
            );
        }
    }
    f.head("ringlb_udp_flows", "gauge", "UDP flows open (all workers).");
    for lv in listeners.iter().filter(|l| l.protocol == "udp") {
        let v = lv.stats.sum(|w| &w.udp_flows);
        f.line("ringlb_udp_flows", &[("listener", &lv.name)], v);
    }
    f.head(
        "ringlb_udp_flows_evicted_total",
        "counter",
        "UDP flows evicted because the listener's flow table was full (max_flows).",
    );
    for lv in listeners.iter().filter(|l| l.protocol == "udp") {
        let v = lv.stats.sum(|w| &w.udp_evicted);
        f.line(
            "ringlb_udp_flows_evicted_total",
            &[("listener", &lv.name)],
            v,
        );
    }
    f.head(
        "ringlb_udp_flows_refused_total",
        "counter",
        "New UDP flows refused (table full of flows active in the last second, or UDP at its share of the fd limit).",
    );
    for lv in listeners.iter().filter(|l| l.protocol == "udp") {
        let v = lv.stats.sum(|w| &w.udp_refused);
        f.line(
            "ringlb_udp_flows_refused_total",
            &[("listener", &lv.name)],
            v,
        );
    }
    f.head(
        "ringlb_udp_dropped_total",
        "counter",
        "UDP datagrams dropped (no eligible backend, upstream socket error).",
    );
    for lv in listeners.iter().filter(|l| l.protocol == "udp") {
        let v = lv.stats.sum(|w| &w.udp_dropped);
        f.line("ringlb_udp_dropped_total", &[("listener", &lv.name)], v);
    }
    f.head(
        "ringlb_udp_datagrams_total",
        "counter",
        "UDP datagrams forwarded, by direction.",
    );
    let udp_names: Vec<&str> = listeners
        .iter()
        .filter(|l| l.protocol == "udp")
        .map(|l| l.name.as_str())
        .collect();
    for (l, _, b) in backends
        .iter()
        .filter(|(l, _, _)| udp_names.contains(&l.as_str()))
    {
        let a = b.address.to_string();
        let up = b.sum(|w| &w.datagrams_up);
        let down = b.sum(|w| &w.datagrams_down);
        let lab = |d| {
            [
                ("listener", l.as_str()),
                ("backend", a.as_str()),
                ("direction", d),
            ]
        };
        f.line("ringlb_udp_datagrams_total", &lab("to_backend"), up);
        f.line("ringlb_udp_datagrams_total", &lab("to_client"), down);
    }
    f.head(
        "ringlb_maglev_slots_moved_total",
        "counter",
        "Maglev table slots that changed owner on rebuilds.",
    );
    for lv in listeners.iter() {
        f.line(
            "ringlb_maglev_slots_moved_total",
            &[("listener", &lv.name)],
            lv.stats.slots_moved.load(Ordering::Relaxed),
        );
    }
    f.head(
        "ringlb_snapshot_generation",
        "gauge",
        "Generation of the listener's published backend snapshot.",
    );
    for lv in listeners.iter() {
        f.line(
            "ringlb_snapshot_generation",
            &[("listener", &lv.name)],
            lv.published.load().generation,
        );
    }
    f.head(
        "ringlb_worker_heartbeat_age_milliseconds",
        "gauge",
        "Time since each worker loop last ticked.",
    );
    for (i, hb) in state.worker_heartbeats.iter().enumerate() {
        f.line(
            "ringlb_worker_heartbeat_age_milliseconds",
            &[("worker", &i.to_string())],
            age_ms(state, hb),
        );
    }
    dns(state, &mut f);
    control_and_process(state, &mut f);
    out
}

/// DNS discovery, per pool (`listener` and `pool` labels, as the backend families have).
fn dns(state: &AdminState, f: &mut Family<'_>) {
    let status = state.report.dns();
    if status.is_empty() {
        return;
    }
    let per = crate::control::dns::per_pool(&status);
    f.head(
        "ringlb_dns_resolutions_total",
        "counter",
        "DNS resolutions of a pool's names, by result (ok; empty: NXDOMAIN or no records, \
         applied after hold; failed: SERVFAIL, timeout or no server, last good set kept).",
    );
    for (key, c, _) in &per {
        let (l, p) = crate::config::split_pool_key(key);
        for (result, v) in [("ok", c.ok), ("empty", c.empty), ("failed", c.failed)] {
            f.line(
                "ringlb_dns_resolutions_total",
                &[("listener", l), ("pool", p), ("result", result)],
                v,
            );
        }
    }
    f.head(
        "ringlb_dns_backends",
        "gauge",
        "Backends a pool has from DNS now (its names' last good sets).",
    );
    for (key, _, n) in &per {
        let (l, p) = crate::config::split_pool_key(key);
        f.line(
            "ringlb_dns_backends",
            &[("listener", l), ("pool", p)],
            *n as u64,
        );
    }
}

/// The build, reloads, the admin server itself and the process.
fn control_and_process(state: &AdminState, f: &mut Family<'_>) {
    f.head(
        "ringlb_build_info",
        "gauge",
        "Always 1; the labels say which build is running.",
    );
    f.line(
        "ringlb_build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", crate::BUILD_COMMIT),
        ],
        1,
    );
    f.head(
        "ringlb_io_backend_info",
        "gauge",
        "Always 1; the label says which I/O backend the workers run (io_uring or epoll).",
    );
    f.line(
        "ringlb_io_backend_info",
        &[("backend", state.io.backend.name())],
        1,
    );
    let (ok, failed) = state.report.reloads();
    f.head(
        "ringlb_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP or POST /reload), by result.",
    );
    f.line("ringlb_reloads_total", &[("result", "ok")], ok);
    f.line("ringlb_reloads_total", &[("result", "error")], failed);
    f.single(
        "ringlb_config_last_reload_successful",
        "gauge",
        "1 if the last reload succeeded (or none was tried), 0 if it failed.",
        Some(f64::from(u8::from(state.report.last_reload_ok()))),
    );
    f.single(
        "ringlb_config_last_reload_success_timestamp_seconds",
        "gauge",
        "Unix time the running configuration was loaded (at start, then at each successful reload).",
        Some(state.report.last_success_unix_seconds()),
    );
    f.single(
        "ringlb_admin_connections",
        "gauge",
        "Admin endpoint connections open.",
        Some(state.server.open.load(Ordering::Relaxed) as f64),
    );
    f.single(
        "ringlb_admin_connections_refused_total",
        "counter",
        "Admin endpoint connections closed at once because the connection limit was reached.",
        Some(state.server.refused.load(Ordering::Relaxed) as f64),
    );
    let p = super::process::read();
    f.single(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    f.single(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes.map(|v| v as f64),
    );
    f.single(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        p.open_fds.map(|v| v as f64),
    );
    f.single(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        p.max_fds.map(|v| v as f64),
    );
    f.single(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
}
