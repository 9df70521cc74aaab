//! `/status`: listeners, backends, health, weights and connections as JSON, and for each backend
//! why it is down (the last probe's error, a passive ejection and how long it has left) and
//! where its weight comes from (the config or an admin drain); per backend also its one-word
//! state and the traffic, error and health-check counters the stats page (`GET /`) shows.
//! Must not: write anything it reads.

use super::AdminState;
use crate::backend::process_ms;
use crate::control::BackendNote;
use std::sync::atomic::Ordering;

/// Why a backend is down, from its note, at `now_ms`; `None` if the note has no reason.
fn down_reason(note: &BackendNote, now_ms: u64) -> Option<String> {
    let mut why = Vec::new();
    if let Some(left) = ejected_for_ms(note, now_ms) {
        why.push(format!(
            "ejected by passive health after consecutive connect failures, for {:.1}s more \
             (ejection #{})",
            left as f64 / 1000.0,
            note.times_ejected
        ));
    }
    if note.check_down {
        why.push(format!(
            "health check failing: {}",
            note.last_probe_error
                .as_deref()
                .unwrap_or("no passing probe yet")
        ));
    }
    if let Some(left) = note.held_until_ms.filter(|&end| end > now_ms) {
        why.push(format!(
            "held down by flap damping for {:.1}s more (hold #{})",
            (left - now_ms) as f64 / 1000.0,
            note.flap_holds
        ));
    }
    if note.not_ready {
        why.push(format!(
            "readiness check failing: {}",
            note.ready_probe_error
                .as_deref()
                .unwrap_or("no passing probe yet")
        ));
    }
    (!why.is_empty()).then(|| why.join("; "))
}

fn ejected_for_ms(note: &BackendNote, now_ms: u64) -> Option<u64> {
    note.ejected_until_ms
        .filter(|&end| end > now_ms)
        .map(|end| end - now_ms)
}

/// `/status` as pretty JSON.
pub fn status_json(state: &AdminState) -> String {
    let now = process_ms();
    let notes = state.report.notes();
    let listeners: Vec<serde_json::Value> = state
        .listeners
        .load()
        .iter()
        .map(|lv| {
            let snap = lv.published.load();
            let backends: Vec<serde_json::Value> = snap
                .pools
                .iter()
                .flat_map(|p| p.members.iter().map(move |m| (p, m)))
                .map(|(pool, m)| {
                    let key = crate::config::pool_key(&lv.name, &pool.name);
                    let note = notes.get(&(key, m.address));
                    let drained = note.is_some_and(|n| n.drained);
                    let down_reason = match note {
                        _ if m.up => None,
                        Some(n) => down_reason(n, now),
                        None => None,
                    }
                    .or_else(|| (!m.up).then(|| "marked down".to_string()));
                    serde_json::json!({
                        "pool": &*pool.name,
                        "address": m.address.to_string(),
                        "weight": m.weight,
                        "configured_weight": note.map_or(m.weight, |n| n.configured_weight),
                        "weight_source": if drained { "admin drain" } else { "config" },
                        "up": m.up,
                        "state": m.state.name(),
                        "slow_start_percent": m.ramp_percent,
                        "ready_probe_error": note.and_then(|n| n.ready_probe_error.clone()),
                        "flap_holds": note.map_or(0, |n| n.flap_holds),
                        "down_reason": down_reason,
                        "last_probe_error": note.and_then(|n| n.last_probe_error.clone()),
                        "ejected_for_seconds": note
                            .and_then(|n| ejected_for_ms(n, now))
                            .map(|ms| ms as f64 / 1000.0),
                        "active_connections": m.stats.active(),
                        "connections_total": m.stats.sum(|w| &w.connections),
                        "consecutive_connect_failures": m.stats.consecutive_failures(),
                        "bytes_to_backend": m.stats.sum(|w| &w.bytes_up),
                        "bytes_to_client": m.stats.sum(|w| &w.bytes_down),
                        "datagrams_to_backend": m.stats.sum(|w| &w.datagrams_up),
                        "datagrams_to_client": m.stats.sum(|w| &w.datagrams_down),
                        "connect_errors": {
                            "refused": m.stats.sum(|w| &w.connect_refused),
                            "timeout": m.stats.sum(|w| &w.connect_timeout),
                            "other": m.stats.sum(|w| &w.connect_other),
                        },
                        "health_checks": {
                            "success": m.stats.control.checks_ok.load(Ordering::Relaxed),
                            "failure": m.stats.control.checks_failed.load(Ordering::Relaxed),
                        },
                        "health_flips": m.stats.control.flips.load(Ordering::Relaxed),
                        "ejections": m.stats.control.ejections.load(Ordering::Relaxed),
                    })
                })
                .collect();
            serde_json::json!({
                "name": lv.name,
                "protocol": lv.protocol,
                "bind": lv.bound.map(|a| a.to_string()),
                "balance": snap.pools.first().map(|p| p.tables.policy().name()),
                "pools": snap.pools.iter().map(|p| serde_json::json!({
                    "name": &*p.name,
                    "balance": p.tables.policy().name(),
                    "backends_up": p.up_count(),
                    "backends": p.members.len(),
                })).collect::<Vec<_>>(),
                "generation": snap.generation,
                "active_connections": lv.stats.sum(|w| &w.active),
                "backends_up": snap.up_count(),
                "accepted_total": lv.stats.sum(|w| &w.accepted),
                "no_backend_total": lv.stats.sum(|w| &w.no_backend),
                "udp_flows": (lv.protocol == "udp").then(|| lv.stats.sum(|w| &w.udp_flows)),
                "backends": backends,
            })
        })
        .collect();
    let (ok, failed) = state.report.reloads();
    let v = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "commit": crate::BUILD_COMMIT,
        "uptime_seconds": process_ms() / 1000,
        "workers": state.worker_heartbeats.len(),
        "io": {
            "backend": state.io.backend.name(),
            "features": state.io.feature_names(),
            "line": state.io.line,
        },
        "reloads": { "ok": ok, "error": failed },
        "reload_in_progress": state.report.reload_running_for(now).is_some(),
        "listeners": listeners,
    });
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn down_reasons_name_the_probe_error_and_the_ejection() {
        let mut n = BackendNote {
            check_down: true,
            last_probe_error: Some("connect refused".into()),
            ..BackendNote::default()
        };
        assert_eq!(
            down_reason(&n, 0).as_deref(),
            Some("health check failing: connect refused")
        );
        n.ejected_until_ms = Some(12_500);
        n.times_ejected = 2;
        let why = down_reason(&n, 10_000).unwrap();
        assert!(why.starts_with("ejected by passive health"), "{why}");
        assert!(why.contains("2.5s more (ejection #2)"), "{why}");
        assert!(
            why.ends_with("health check failing: connect refused"),
            "{why}"
        );
        n.check_down = false;
        assert_eq!(ejected_for_ms(&n, 12_500), None, "time served");
        assert_eq!(down_reason(&n, 12_500), None);
    }
}
