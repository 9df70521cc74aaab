//! The health-block fields beyond interval/timeout/rise/fall and send/expect: HTTP checks
//! (`http = { ... }`), where probes go (`port`, `address`), flap damping (`flap_threshold`,
//! `flap_window`, `flap_hold`), the `[listeners.health.ready]` readiness block, and the
//! listener's `slow_start`.
//!
//! Owns these defaults, limits and messages. Like the rest of `config` it only validates; the
//! probing and the state machines live in `crate::health`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::listener::positive_duration;
use super::raw::RawHttp;
use super::{format_duration, invalid, parse_duration, ConfigError};
use crate::balance::Policy;

/// Default `health.flap_threshold`: state changes within `flap_window` that are still fine.
pub const DEFAULT_FLAP_THRESHOLD: u32 = 4;
/// Default `health.flap_window`.
pub const DEFAULT_FLAP_WINDOW: Duration = Duration::from_secs(60);
/// Default `health.flap_hold`: the first hold-down; each repeat doubles it.
pub const DEFAULT_FLAP_HOLD: Duration = Duration::from_secs(30);
/// The longest hold-down (or `flap_hold`, when that is longer).
pub const MAX_FLAP_HOLD: Duration = Duration::from_secs(600);
/// Longest `http.path` / `http.host`.
pub const MAX_HTTP_FIELD: usize = 1024;

/// `http = { ... }` in a health block: an HTTP/1.1 GET whose status (and optionally the start
/// of whose body) decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// Starts with `/`; visible ASCII only. Default `/`.
    pub path: String,
    /// The `Host` header; `None`: the probed address (`IP:PORT`).
    pub host: Option<String>,
    /// Statuses that pass. Default `[200]`. Each 100–599.
    pub expect_status: Vec<u16>,
    /// The body must start with these bytes (escapes as in `send`/`expect`).
    pub body_prefix: Option<Vec<u8>>,
}

/// Flap damping of one listener's backends (`health.flap_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapConfig {
    /// More state changes than this within `window` hold the backend down. 0 = off.
    pub threshold: u32,
    pub window: Duration,
    /// The first hold-down; each repeat doubles it, up to [`FlapConfig::max_hold`].
    pub hold: Duration,
}

impl Default for FlapConfig {
    fn default() -> FlapConfig {
        FlapConfig {
            threshold: DEFAULT_FLAP_THRESHOLD,
            window: DEFAULT_FLAP_WINDOW,
            hold: DEFAULT_FLAP_HOLD,
        }
    }
}

impl FlapConfig {
    /// The cap on a hold-down: 10 minutes, or `hold` if longer.
    pub fn max_hold(&self) -> Duration {
        MAX_FLAP_HOLD.max(self.hold)
    }

    pub fn describe(&self) -> String {
        if self.threshold == 0 {
            return "flap damping off".to_string();
        }
        format!(
            "flap damping: more than {} changes in {} holds down for {} doubling up to {}",
            self.threshold,
            format_duration(self.window),
            format_duration(self.hold),
            format_duration(self.max_hold())
        )
    }
}

/// Where a health block's probes go instead of the backend's own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProbeTarget {
    /// `address = "IP"` or `"IP:PORT"` (the IP, and the port if given).
    pub ip: Option<IpAddr>,
    /// `port = 8008`, or the port of `address = "IP:PORT"`.
    pub port: Option<u16>,
}

impl ProbeTarget {
    /// The address to probe for a backend at `backend`.
    pub fn apply(&self, backend: SocketAddr) -> SocketAddr {
        SocketAddr::new(
            self.ip.unwrap_or(backend.ip()),
            self.port.unwrap_or(backend.port()),
        )
    }

    pub fn is_default(&self) -> bool {
        self.ip.is_none() && self.port.is_none()
    }
}

pub(super) fn validate_target(
    scope: &str,
    prefix: &str,
    port: Option<i64>,
    address: Option<String>,
) -> Result<ProbeTarget, ConfigError> {
    let port = port
        .map(|p| {
            u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
                invalid(
                    scope,
                    &format!("{prefix}.port"),
                    format!("{p} must be between 1 and 65535"),
                )
            })
        })
        .transpose()?;
    let Some(text) = address else {
        return Ok(ProbeTarget { ip: None, port });
    };
    let field = format!("{prefix}.address");
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(ProbeTarget { ip: Some(ip), port });
    }
    match text.parse::<SocketAddr>() {
        Ok(_) if port.is_some() => Err(invalid(
            scope,
            &field,
            format!("{text:?} has a port and {prefix}.port is set too (give the port once)"),
        )),
        Ok(a) => Ok(ProbeTarget {
            ip: Some(a.ip()),
            port: Some(a.port()),
        }),
        Err(_) => Err(invalid(
            scope,
            &field,
            format!("{text:?} is not an IP address or IP:PORT (e.g. \"10.0.0.5\", \"[::1]:8008\")"),
        )),
    }
}

/// `field` text: non-empty, visible ASCII (no spaces, no control characters: it goes into a
/// request line or header verbatim), at most [`MAX_HTTP_FIELD`] bytes.
fn http_text(scope: &str, field: &str, text: &str) -> Result<(), ConfigError> {
    if text.is_empty() || text.len() > MAX_HTTP_FIELD || !text.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(invalid(
            scope,
            field,
            format!(
                "{text:?} must be 1 to {MAX_HTTP_FIELD} visible ASCII characters (no spaces; \
                 percent-encode the rest)"
            ),
        ));
    }
    Ok(())
}

pub(super) fn validate_http(
    scope: &str,
    prefix: &str,
    raw: RawHttp,
    body_prefix: impl FnOnce(Option<String>) -> Result<Option<Vec<u8>>, ConfigError>,
) -> Result<HttpCheck, ConfigError> {
    let path = raw.path.unwrap_or_else(|| "/".to_string());
    let path_field = format!("{prefix}.http.path");
    http_text(scope, &path_field, &path)?;
    if !path.starts_with('/') {
        return Err(invalid(
            scope,
            &path_field,
            format!("{path:?} must start with '/'"),
        ));
    }
    if let Some(host) = &raw.host {
        http_text(scope, &format!("{prefix}.http.host"), host)?;
    }
    let status_field = format!("{prefix}.http.expect_status");
    let expect_status = match raw.expect_status {
        None => vec![200],
        Some(list) if list.is_empty() => {
            return Err(invalid(
                scope,
                &status_field,
                "[] passes nothing (leave it out for [200])".to_string(),
            ))
        }
        Some(list) => list
            .iter()
            .map(|&s| {
                u16::try_from(s)
                    .ok()
                    .filter(|s| (100..=599).contains(s))
                    .ok_or_else(|| {
                        invalid(
                            scope,
                            &status_field,
                            format!("{s} is not an HTTP status (100 to 599)"),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(HttpCheck {
        path,
        host: raw.host,
        expect_status,
        body_prefix: body_prefix(raw.body_prefix)?,
    })
}

pub(super) fn validate_flap(
    scope: &str,
    threshold: Option<i64>,
    window: Option<String>,
    hold: Option<String>,
) -> Result<FlapConfig, ConfigError> {
    let threshold = match threshold {
        None => DEFAULT_FLAP_THRESHOLD,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n <= 1000)
            .ok_or_else(|| {
                invalid(
                    scope,
                    "health.flap_threshold",
                    format!("{n} must be between 0 (off) and 1000"),
                )
            })?,
    };
    let window = positive_duration(scope, "health.flap_window", window, DEFAULT_FLAP_WINDOW)?;
    let hold = positive_duration(scope, "health.flap_hold", hold, DEFAULT_FLAP_HOLD)?;
    Ok(FlapConfig {
        threshold,
        window,
        hold,
    })
}

/// `slow_start`: `None` or `"0s"` = off. Maglev does not ramp (see README): refused there, so
/// that nothing in the file is silently ignored.
pub(super) fn validate_slow_start(
    scope: &str,
    raw: Option<String>,
    balance: Policy,
) -> Result<Option<Duration>, ConfigError> {
    let Some(text) = raw else {
        return Ok(None);
    };
    let d = parse_duration(&text).map_err(|e| invalid(scope, "slow_start", e))?;
    if d.is_zero() {
        return Ok(None);
    }
    if balance == Policy::Maglev {
        return Err(invalid(
            scope,
            "slow_start",
            format!(
                "{text:?} cannot apply to balance = \"maglev\": its table gives each backend a \
                 fixed share of clients, and ramping it would move clients between backends at \
                 every step (remove slow_start, or use another balance)"
            ),
        ));
    }
    Ok(Some(d))
}
