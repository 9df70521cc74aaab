//! A listener's `[listeners.health]` (active checks) and `[listeners.passive]` (ejection after
//! connect failures) tables, and the byte-string escapes of `health.send` / `health.expect`.
//!
//! Owns these defaults, limits and messages. Like the rest of `config` it only validates: the
//! probing lives in `crate::health`, which reads the validated [`HealthConfig`] and
//! [`PassiveConfig`].

use std::time::Duration;

use super::listener::positive_duration;
use super::raw::{RawHealth, RawPassive};
use super::readiness::{validate_flap, validate_http, validate_target};
pub use super::readiness::{FlapConfig, HttpCheck, ProbeTarget};
use super::{format_duration, invalid, ConfigError, Protocol};

/// Default `health.interval`.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Default `health.timeout` (or `health.interval`, when that is shorter).
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default `health.rise`.
pub const DEFAULT_RISE: u32 = 2;
/// Default `health.fall`.
pub const DEFAULT_FALL: u32 = 3;
/// Longest `health.send` / `health.expect`, in bytes (after escapes): a health check is a short
/// exchange, and the prober's reply buffer is `expect`'s length.
pub const MAX_PROBE_BYTES: usize = 4096;
/// Default `passive.consecutive_failures`.
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 3;
/// Default `passive.base_ejection_time`.
pub const DEFAULT_BASE_EJECTION_TIME: Duration = Duration::from_secs(30);
/// Default `passive.max_ejection_time` (or `base_ejection_time`, when that is longer).
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Default `passive.max_ejected_percent`.
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;

const ESCAPES: &str = "escapes: \\r \\n \\t \\\\ \\0 \\xHH";

/// `[listeners.health]`: active checks of every backend of the listener, from the control thread.
/// Without it, backends are never probed and count as up (unless passively ejected).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Time between two probes of one backend. > 0. Default 2s.
    pub interval: Duration,
    /// How long one probe may take (connect, send, reply). > 0, ≤ `interval`. Default 1s (or
    /// `interval` if shorter).
    pub timeout: Duration,
    /// Consecutive successful probes that mark a down backend up. ≥ 1. Default 2.
    pub rise: u32,
    /// Consecutive failed probes that mark an up backend down. ≥ 1. Default 3.
    pub fall: u32,
    /// TCP: bytes written once connected; `None`: write nothing. UDP: the probe datagram,
    /// always `Some`. Never empty.
    pub send: Option<Vec<u8>>,
    /// TCP: the reply must start with these bytes; `None`: a completed connect (and `send`) is
    /// enough. Allowed without `send` (servers that greet first: SMTP, MySQL, ...). UDP: the
    /// reply datagram must start with these bytes, always `Some`. Never empty.
    pub expect: Option<Vec<u8>>,
    /// TCP only, instead of `send`/`expect`: an HTTP/1.1 GET whose status decides.
    pub http: Option<HttpCheck>,
    /// `port` / `address`: probe there instead of the backend's address (every probe type).
    pub target: ProbeTarget,
    /// Flap damping (liveness block only; the readiness block's changes count too).
    pub flap: FlapConfig,
    /// `[listeners.health.ready]`: the readiness check (its own `ready` is always `None`).
    pub ready: Option<Box<HealthConfig>>,
}

/// `[listeners.passive]`: ejection of backends whose connects keep failing, as the workers see
/// them. Always present on a listener (defaults apply without the table).
#[derive(Debug, Clone, PartialEq)]
pub struct PassiveConfig {
    /// Connect failures in a row that eject a backend; 0 disables passive ejection. Default 3.
    pub consecutive_failures: u32,
    /// Length of a first ejection; each repeated ejection doubles it. > 0. Default 30s.
    pub base_ejection_time: Duration,
    /// Cap on an ejection's length. ≥ `base_ejection_time`. Default 5m (or
    /// `base_ejection_time` if longer).
    pub max_ejection_time: Duration,
    /// Never eject more than this share of the listener's backends. 0–100. Default 50.
    pub max_ejected_percent: u32,
}

impl Default for PassiveConfig {
    fn default() -> PassiveConfig {
        PassiveConfig {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection_time: DEFAULT_BASE_EJECTION_TIME,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejected_percent: DEFAULT_MAX_EJECTED_PERCENT,
        }
    }
}

impl HealthConfig {
    /// One line for the config summary: `tcp connect every 2s, timeout 1s, rise 2, fall 3`.
    pub fn describe(&self) -> String {
        let what = match (&self.send, &self.expect) {
            _ if self.http.is_some() => {
                let h = self.http.as_ref().map_or(String::new(), |h| {
                    format!("http GET {} expect {:?}", h.path, h.expect_status)
                });
                h
            }
            (None, None) => "tcp connect".to_string(),
            (Some(s), None) => format!("send \"{}\"", escape_bytes(s)),
            (None, Some(e)) => format!("expect \"{}\"", escape_bytes(e)),
            (Some(s), Some(e)) => {
                format!(
                    "send \"{}\" expect \"{}\"",
                    escape_bytes(s),
                    escape_bytes(e)
                )
            }
        };
        let at = match (self.target.ip, self.target.port) {
            (None, None) => String::new(),
            (Some(ip), Some(p)) => format!(" at {}", std::net::SocketAddr::new(ip, p)),
            (Some(ip), None) => format!(" at {ip}"),
            (None, Some(p)) => format!(" on port {p}"),
        };
        format!(
            "{what}{at} every {}, timeout {}, rise {}, fall {}",
            format_duration(self.interval),
            format_duration(self.timeout),
            self.rise,
            self.fall
        )
    }
}

impl PassiveConfig {
    /// One line for the config summary.
    pub fn describe(&self) -> String {
        if self.consecutive_failures == 0 {
            return "off".to_string();
        }
        format!(
            "after {} connect failures in a row, for {} doubling up to {}, at most {}% of backends",
            self.consecutive_failures,
            format_duration(self.base_ejection_time),
            format_duration(self.max_ejection_time),
            self.max_ejected_percent
        )
    }
}

pub(super) fn validate_health(
    scope: &str,
    protocol: Protocol,
    raw: RawHealth,
) -> Result<HealthConfig, ConfigError> {
    validate_block(scope, "health", protocol, raw)
}

/// One health block: `prefix` is `health` or `health.ready` (for messages).
fn validate_block(
    scope: &str,
    prefix: &str,
    protocol: Protocol,
    raw: RawHealth,
) -> Result<HealthConfig, ConfigError> {
    let f = |name: &str| format!("{prefix}.{name}");
    let interval = positive_duration(scope, &f("interval"), raw.interval, DEFAULT_HEALTH_INTERVAL)?;
    let explicit_timeout = raw.timeout.clone();
    let timeout = positive_duration(
        scope,
        &f("timeout"),
        raw.timeout,
        DEFAULT_HEALTH_TIMEOUT.min(interval),
    )?;
    if timeout > interval {
        let text = explicit_timeout.unwrap_or_else(|| format_duration(timeout));
        return Err(invalid(
            scope,
            &f("timeout"),
            format!(
                "{text:?} must not exceed {prefix}.interval (\"{}\")",
                format_duration(interval)
            ),
        ));
    }
    let rise = at_least_one(scope, &f("rise"), raw.rise, DEFAULT_RISE)?;
    let fall = at_least_one(scope, &f("fall"), raw.fall, DEFAULT_FALL)?;
    let send = probe_bytes(scope, &f("send"), raw.send)?;
    let expect = probe_bytes(scope, &f("expect"), raw.expect)?;
    let target = validate_target(scope, prefix, raw.port, raw.address)?;
    let http = match raw.http {
        None => None,
        Some(_) if protocol == Protocol::Udp => {
            return Err(invalid(
                scope,
                &f("http"),
                "an HTTP check needs TCP; a udp listener's checks use send and expect".to_string(),
            ))
        }
        Some(_) if send.is_some() || expect.is_some() => {
            let other = if send.is_some() { "send" } else { "expect" };
            return Err(invalid(
                scope,
                &f("http"),
                format!("set either http or {prefix}.{other}, not both (one probe per block)"),
            ));
        }
        Some(h) => Some(validate_http(scope, prefix, h, |b| {
            probe_bytes(scope, &f("http.body_prefix"), b)
        })?),
    };
    let nested = prefix != "health";
    if nested {
        let stray = [
            ("ready", raw.ready.is_some()),
            ("flap_threshold", raw.flap_threshold.is_some()),
            ("flap_window", raw.flap_window.is_some()),
            ("flap_hold", raw.flap_hold.is_some()),
        ];
        if let Some((name, _)) = stray.iter().find(|(_, set)| *set) {
            return Err(invalid(
                scope,
                &f(name),
                format!("belongs in [listeners.health], not in [listeners.{prefix}]"),
            ));
        }
    }
    let flap = if nested {
        FlapConfig::default()
    } else {
        validate_flap(scope, raw.flap_threshold, raw.flap_window, raw.flap_hold)?
    };
    let ready = match raw.ready {
        Some(r) if !nested => Some(Box::new(validate_block(
            scope,
            "health.ready",
            protocol,
            *r,
        )?)),
        _ => None,
    };
    // UDP has no connect to succeed or fail: only a reply tells that a backend is there.
    if protocol == Protocol::Udp && (send.is_none() || expect.is_none()) {
        let missing = if send.is_none() {
            "health.send"
        } else {
            "health.expect"
        };
        return Err(invalid(
            scope,
            &format!("{prefix}.{}", missing.trim_start_matches("health.")),
            "missing: udp health checks need send and expect (the probe sends `send` as one \
             datagram and waits for a reply that starts with `expect`)"
                .to_string(),
        ));
    }
    Ok(HealthConfig {
        interval,
        timeout,
        rise,
        fall,
        send,
        expect,
        http,
        target,
        flap,
        ready,
    })
}

pub(super) fn validate_passive(scope: &str, raw: RawPassive) -> Result<PassiveConfig, ConfigError> {
    let consecutive_failures = match raw.consecutive_failures {
        None => DEFAULT_CONSECUTIVE_FAILURES,
        Some(n) => u32::try_from(n).map_err(|_| {
            invalid(
                scope,
                "passive.consecutive_failures",
                format!("{n} must be between 0 (off) and {}", u32::MAX),
            )
        })?,
    };
    let base_ejection_time = positive_duration(
        scope,
        "passive.base_ejection_time",
        raw.base_ejection_time,
        DEFAULT_BASE_EJECTION_TIME,
    )?;
    let explicit_max = raw.max_ejection_time.clone();
    let max_ejection_time = positive_duration(
        scope,
        "passive.max_ejection_time",
        raw.max_ejection_time,
        DEFAULT_MAX_EJECTION_TIME.max(base_ejection_time),
    )?;
    if let Some(text) = explicit_max.filter(|_| max_ejection_time < base_ejection_time) {
        return Err(invalid(
            scope,
            "passive.max_ejection_time",
            format!(
                "{text:?} must not be shorter than passive.base_ejection_time (\"{}\")",
                format_duration(base_ejection_time)
            ),
        ));
    }
    let max_ejected_percent = match raw.max_ejected_percent {
        None => DEFAULT_MAX_EJECTED_PERCENT,
        Some(n) => u32::try_from(n).ok().filter(|n| *n <= 100).ok_or_else(|| {
            invalid(
                scope,
                "passive.max_ejected_percent",
                format!("{n} must be between 0 and 100"),
            )
        })?,
    };
    Ok(PassiveConfig {
        consecutive_failures,
        base_ejection_time,
        max_ejection_time,
        max_ejected_percent,
    })
}

fn at_least_one(
    scope: &str,
    field: &str,
    raw: Option<i64>,
    default: u32,
) -> Result<u32, ConfigError> {
    match raw {
        None => Ok(default),
        Some(n) => u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
            invalid(
                scope,
                field,
                format!("{n} must be between 1 and {}", u32::MAX),
            )
        }),
    }
}

fn probe_bytes(
    scope: &str,
    field: &str,
    raw: Option<String>,
) -> Result<Option<Vec<u8>>, ConfigError> {
    let Some(text) = raw else {
        return Ok(None);
    };
    let shown = show(&text);
    let bytes = unescape(&text).map_err(|why| {
        invalid(
            scope,
            field,
            format!("\"{shown}\" has a bad escape: {why} ({ESCAPES})"),
        )
    })?;
    if bytes.is_empty() {
        return Err(invalid(
            scope,
            field,
            format!("\"{shown}\" is empty (leave {field} out instead)"),
        ));
    }
    if bytes.len() > MAX_PROBE_BYTES {
        return Err(invalid(
            scope,
            field,
            format!(
                "\"{shown}\" is {} bytes long (at most {MAX_PROBE_BYTES})",
                bytes.len()
            ),
        ));
    }
    Ok(Some(bytes))
}

/// Decodes `health.send` / `health.expect`: `\r`, `\n`, `\t`, `\\`, `\0` and `\xHH` (any byte);
/// every other character stands for its UTF-8 bytes.
///
/// These escapes apply to the string TOML hands over. In a TOML basic string (`"..."`) TOML has
/// already turned `\r`, `\n`, `\t` and `\\` into characters, and rejects `\x`; write `\xHH` in a
/// literal string (`'...'`) or with a doubled backslash (`"\\x00"`).
///
/// The error says what is wrong and at which byte of the text.
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let decoded = match bytes.get(i + 1) {
            None => return Err(format!("a lone '\\' at byte {i}")),
            Some(b'r') => b'\r',
            Some(b'n') => b'\n',
            Some(b't') => b'\t',
            Some(b'\\') => b'\\',
            Some(b'0') => 0,
            Some(b'x') => {
                let hex = bytes.get(i + 2..i + 4).and_then(|h| {
                    std::str::from_utf8(h)
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                });
                match hex {
                    // from_str_radix accepts a leading '+': require two hex digits.
                    Some(b) if bytes[i + 2].is_ascii_hexdigit() => {
                        out.push(b);
                        i += 4;
                        continue;
                    }
                    _ => {
                        return Err(format!(
                            "\\x at byte {i} must be followed by two hex digits"
                        ))
                    }
                }
            }
            Some(_) => {
                let c = text[i + 1..].chars().next().unwrap_or('?');
                return Err(format!("unknown escape \\{c} at byte {i}"));
            }
        };
        out.push(decoded);
        i += 2;
    }
    Ok(out)
}

/// Writes bytes back in [`unescape`]'s language, readable on one line: printable ASCII as is
/// (backslash doubled, `"` as `\x22`), `\r`, `\n`, `\t`, `\0`, everything else `\xHH`.
/// `unescape(&escape_bytes(b)) == Ok(b)` for any `b`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0 => out.push_str("\\0"),
            b'"' => out.push_str("\\x22"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02X}")),
        }
    }
    out
}

/// The operator's text for an error message, on one line: as written (backslash escapes kept),
/// with control characters (which a TOML basic string may have produced) in escape form.
fn show(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("\\x{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_accepts() {
        let cases: [(&str, &[u8]); 8] = [
            ("PING\\r\\n", b"PING\r\n"),
            ("PING\r\n", b"PING\r\n"),
            ("a\\tb\\\\c", b"a\tb\\c"),
            ("\\0\\x00\\xff\\xFF", &[0, 0, 0xff, 0xff]),
            ("\\x41\\x4a", b"AJ"),
            ("+PONG", b"+PONG"),
            ("é", "é".as_bytes()),
            ("", b""),
        ];
        for (text, want) in cases {
            assert_eq!(unescape(text).as_deref(), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn unescape_rejects() {
        let cases = [
            ("\\xZZ", "\\x at byte 0 must be followed by two hex digits"),
            ("ab\\x4", "\\x at byte 2"),
            ("\\x+1", "two hex digits"),
            ("\\q", "unknown escape \\q at byte 0"),
            ("a\\", "a lone '\\' at byte 1"),
            ("\\é", "unknown escape \\é"),
        ];
        for (text, want) in cases {
            let err = unescape(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn escape_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        for bytes in [&all[..], b"+PONG\r\n", b"say \"hi\"\\", b""] {
            let text = escape_bytes(bytes);
            assert!(!text.contains(['\r', '\n', '"']), "{text}");
            assert_eq!(unescape(&text).as_deref(), Ok(bytes));
        }
        assert_eq!(escape_bytes(b"-ERR\r\n\x01"), "-ERR\\r\\n\\x01");
    }

    #[test]
    fn show_keeps_escapes_and_hides_control_characters() {
        assert_eq!(show("\\xZZ"), "\\xZZ");
        assert_eq!(show("a\r\n\u{1}"), "a\\r\\n\\x01");
    }
}
