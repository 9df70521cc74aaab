//! Validation of one `[[listeners]]` table: its name, bind, protocol, policy, timeouts, limits,
//! keepalive, PROXY protocol settings and backends (health and passive-ejection settings are
//! checked in `health.rs`), and which of them a tcp or a udp listener may set.
//!
//! Owns the listener-level defaults and messages; like the rest of `config`, it must not touch the
//! network. Stops at the first error.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::dns::Discovery;
use super::raw::{RawBackend, RawListener};
use super::{
    format_duration, invalid, parse_address, parse_duration, BackendConfig, ConfigError, Listener,
    Protocol, ADDRESS_EXPECTED, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_FLOWS, DEFAULT_PROXY_PROTOCOL_TIMEOUT, DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_TCP_IDLE_TIMEOUT, DEFAULT_TCP_KEEPALIVE, DEFAULT_UDP_IDLE_TIMEOUT, MAX_TCP_KEEPALIVE,
};
use crate::balance;
use crate::proxy_protocol;

pub(super) fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

pub(super) fn validate_listener(
    index: usize,
    mut raw: RawListener,
    names: &mut HashMap<String, usize>,
) -> Result<Listener, ConfigError> {
    // Until the name is known to be valid and unique, the listener is named by its position.
    let at = format!("listeners[{index}]");
    let name_expected = "expected a unique, non-empty name of letters, digits, '_', '.' and '-'; \
                         it becomes a metrics label";
    let Some(name) = raw.name.take() else {
        return Err(invalid(&at, "name", format!("missing ({name_expected})")));
    };
    if !is_valid_name(&name) {
        return Err(invalid(
            &at,
            "name",
            format!("{name:?} is not a valid name ({name_expected})"),
        ));
    }
    if let Some(first) = names.get(&name) {
        return Err(invalid(
            &at,
            "name",
            format!("{name:?} is already used by listeners[{first}]"),
        ));
    }
    names.insert(name.clone(), index);
    let scope = format!("listener {name:?}");
    let scope = scope.as_str();

    let Some(bind) = raw.bind.take() else {
        return Err(invalid(
            scope,
            "bind",
            format!("missing ({ADDRESS_EXPECTED})"),
        ));
    };
    let bind = parse_address(scope, "bind", &bind)?;

    let protocol = match raw.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => Protocol::from_name(s).ok_or_else(|| {
            invalid(
                scope,
                "protocol",
                format!("{s:?} is not a protocol (expected \"tcp\" or \"udp\")"),
            )
        })?,
    };
    check_transport_fields(scope, protocol, &raw)?;
    let (pools, routing) = super::pool::validate_pools(scope, protocol, &mut raw)?;
    for p in &pools {
        let pscope = if p.name == super::pool::IMPLICIT_POOL {
            scope.to_string()
        } else {
            super::pool::pool_scope(scope, &p.name)
        };
        check_self_loop(&pscope, bind, &p.backends)?;
    }

    let connect_timeout = positive_duration(
        scope,
        "connect_timeout",
        raw.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    // Accepted and ignored for UDP: connecting a UDP socket only records the peer address.
    let default_idle = match protocol {
        Protocol::Tcp => DEFAULT_TCP_IDLE_TIMEOUT,
        Protocol::Udp => DEFAULT_UDP_IDLE_TIMEOUT,
    };
    let idle_timeout = positive_duration(scope, "idle_timeout", raw.idle_timeout, default_idle)?;

    let max_connections = match raw.max_connections {
        None => DEFAULT_MAX_CONNECTIONS,
        Some(n) => u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
            invalid(
                scope,
                "max_connections",
                format!("{n} must be between 1 and {}", u32::MAX),
            )
        })?,
    };

    // Only a udp listener gets past check_transport_fields with max_flows set.
    let max_flows = match raw.max_flows {
        None => DEFAULT_MAX_FLOWS,
        Some(n) => u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
            invalid(
                scope,
                "max_flows",
                format!("{n} must be between 1 and {}", u32::MAX),
            )
        })?,
    };

    let access_log = raw.access_log.unwrap_or(false);
    let drain_timeout = raw
        .drain_timeout
        .map(|s| parse_duration(&s).map_err(|e| invalid(scope, "drain_timeout", e)))
        .transpose()?;
    let close_on_backend_down = match raw.on_backend_down.as_deref() {
        None | Some("keep") => false,
        Some("close") => true,
        Some(s) => {
            return Err(invalid(
                scope,
                "on_backend_down",
                format!("{s:?} is not a policy (expected \"keep\" or \"close\")"),
            ))
        }
    };
    let drain_postgres = match raw.drain_mode.as_deref() {
        None | Some("tcp") => false,
        Some("postgres") => true,
        Some(s) => {
            return Err(invalid(
                scope,
                "drain_mode",
                format!("{s:?} is not a drain mode (expected \"tcp\" or \"postgres\")"),
            ))
        }
    };
    let tcp_keepalive = validate_keepalive(scope, raw.tcp_keepalive)?;
    let queue_timeout = match raw.queue_timeout {
        None => DEFAULT_QUEUE_TIMEOUT,
        Some(s) => parse_duration(&s).map_err(|e| invalid(scope, "queue_timeout", e))?,
    };
    let proxy_protocol = raw
        .proxy_protocol
        .map(|s| {
            proxy_protocol::Version::from_name(&s).ok_or_else(|| {
                invalid(
                    scope,
                    "proxy_protocol",
                    format!("{s:?} is not a PROXY protocol version (expected \"v1\" or \"v2\")"),
                )
            })
        })
        .transpose()?;
    let accept_proxy_protocol = raw.accept_proxy_protocol.unwrap_or(false);
    let accept_proxy_protocol_from = match raw.accept_proxy_protocol_from {
        None => None,
        Some(_) if !accept_proxy_protocol => {
            return Err(invalid(
                scope,
                "accept_proxy_protocol_from",
                "is set but accept_proxy_protocol is not true (the list says who may send a PROXY header)".to_string(),
            ))
        }
        Some(list) if list.is_empty() => {
            return Err(invalid(
                scope,
                "accept_proxy_protocol_from",
                "[] trusts nobody: every connection would be refused (list the upstream balancers' networks)".to_string(),
            ))
        }
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    proxy_protocol::Cidr::parse(s).map_err(|e| {
                        invalid(scope, &format!("accept_proxy_protocol_from[{i}]"), e)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let proxy_protocol_timeout = positive_duration(
        scope,
        "proxy_protocol_timeout",
        raw.proxy_protocol_timeout,
        DEFAULT_PROXY_PROTOCOL_TIMEOUT,
    )?;
    Ok(Listener {
        name,
        bind,
        protocol,
        connect_timeout,
        idle_timeout,
        max_connections,
        max_flows,
        access_log,
        drain_timeout,
        close_on_backend_down,
        drain_postgres,
        tcp_keepalive,
        queue_timeout,
        proxy_protocol,
        accept_proxy_protocol,
        accept_proxy_protocol_from,
        proxy_protocol_timeout,
        pools,
        routing,
    })
}

/// Refuses the settings of the other transport, so that nothing in the file is silently ignored:
/// `max_flows` on a tcp listener; keepalive, queueing, PROXY protocol and both `max_connections`
/// on a udp listener (a flow is not a connection: `max_flows` is its limit). `connect_timeout` is
/// the exception, accepted and ignored for UDP (documented as such). Checked right after
/// `protocol`, so that a setting of the other transport is reported as such whatever its value.
fn check_transport_fields(
    scope: &str,
    protocol: Protocol,
    raw: &RawListener,
) -> Result<(), ConfigError> {
    let quoted = |s: &Option<String>| s.as_ref().map(|s| format!("{s:?}"));
    // (field, its value as written if set), in the order of the listener's fields.
    let set: Vec<(String, Option<String>)> = match protocol {
        Protocol::Tcp => vec![("max_flows".into(), raw.max_flows.map(|n| n.to_string()))],
        Protocol::Udp => {
            let mut set = vec![
                (
                    "max_connections".into(),
                    raw.max_connections.map(|n| n.to_string()),
                ),
                ("on_backend_down".into(), quoted(&raw.on_backend_down)),
                ("drain_mode".into(), quoted(&raw.drain_mode)),
                ("tcp_keepalive".into(), quoted(&raw.tcp_keepalive)),
                ("queue_timeout".into(), quoted(&raw.queue_timeout)),
                ("proxy_protocol".into(), quoted(&raw.proxy_protocol)),
                (
                    "accept_proxy_protocol".into(),
                    raw.accept_proxy_protocol.map(|b| b.to_string()),
                ),
                (
                    "accept_proxy_protocol_from".into(),
                    raw.accept_proxy_protocol_from
                        .as_ref()
                        .map(|l| format!("{l:?}")),
                ),
                (
                    "proxy_protocol_timeout".into(),
                    quoted(&raw.proxy_protocol_timeout),
                ),
            ];
            for (i, b) in raw.backends.iter().flatten().enumerate() {
                let value = b.max_connections.map(|n| n.to_string());
                set.push((format!("backends[{i}].max_connections"), value));
            }
            if let Some(d) = &raw.discovery {
                let value = d.max_connections.map(|n| n.to_string());
                set.push(("discovery.max_connections".into(), value));
            }
            set
        }
    };
    let Some((field, value)) = set
        .into_iter()
        .find_map(|(field, value)| value.map(|v| (field, v)))
    else {
        return Ok(());
    };
    let (applies_to, hint) = match protocol {
        Protocol::Tcp => (
            "udp",
            "; tcp listeners limit connections with max_connections",
        ),
        Protocol::Udp if field.ends_with("max_connections") => {
            ("tcp", "; udp listeners limit flows with max_flows")
        }
        Protocol::Udp => ("tcp", ""),
    };
    let default = if raw.protocol.is_none() {
        ", the default"
    } else {
        ""
    };
    // "max_connections" for a backend's too: the field itself is named in front of the message.
    let name = field.rsplit('.').next().unwrap_or(&field);
    Err(invalid(
        scope,
        &field,
        format!(
            "{value} is set, but {name} applies to {applies_to} listeners only (this listener's \
             protocol is \"{}\"{default}{hint})",
            protocol.name()
        ),
    ))
}

pub(super) fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn positive_duration(
    scope: &str,
    field: &str,
    raw: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(s) = raw else {
        return Ok(default);
    };
    let d = parse_duration(&s).map_err(|e| invalid(scope, field, e))?;
    if d.is_zero() {
        return Err(invalid(
            scope,
            field,
            format!("{s:?} must be greater than zero"),
        ));
    }
    Ok(d)
}

/// `tcp_keepalive`: `"0s"` is off (`None`); otherwise whole seconds (the socket option counts in
/// seconds, and silently rounding `"1500ms"` down would be surprising) up to Linux's limit.
fn validate_keepalive(scope: &str, raw: Option<String>) -> Result<Option<Duration>, ConfigError> {
    const FIELD: &str = "tcp_keepalive";
    let Some(s) = raw else {
        return Ok(Some(DEFAULT_TCP_KEEPALIVE));
    };
    let d = parse_duration(&s).map_err(|e| invalid(scope, FIELD, e))?;
    if d.is_zero() {
        return Ok(None);
    }
    if d.subsec_nanos() != 0 {
        return Err(invalid(
            scope,
            FIELD,
            format!(
                "{s:?} must be a whole number of seconds (TCP keepalive counts in seconds; \
                 \"0s\" turns it off)"
            ),
        ));
    }
    if d > MAX_TCP_KEEPALIVE {
        return Err(invalid(
            scope,
            FIELD,
            format!(
                "{s:?} must be at most {} (Linux's limit for TCP_KEEPIDLE; \"0s\" turns it off)",
                format_duration(MAX_TCP_KEEPALIVE)
            ),
        ));
    }
    Ok(Some(d))
}

pub(super) fn validate_backends(
    scope: &str,
    raw: Option<Vec<RawBackend>>,
) -> Result<(Vec<BackendConfig>, Vec<Discovery>), ConfigError> {
    let raw = match raw {
        None => return Err(invalid(
            scope,
            "backends",
            "missing (expected at least one backend: backends = [ { address = \"IP:PORT\" } ], \
                 or discovery = { name = \"...\", type = \"SRV\" })"
                .to_string(),
        )),
        Some(raw) if raw.is_empty() => {
            return Err(invalid(
                scope,
                "backends",
                "[] is empty (expected at least one backend)".to_string(),
            ))
        }
        Some(raw) => raw,
    };
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(raw.len());
    let mut names: Vec<Discovery> = Vec::new();
    // Address → first index: duplicate detection stays linear for 100,000 backends.
    let mut seen: HashMap<std::net::SocketAddr, usize> = HashMap::with_capacity(raw.len());
    for (i, b) in raw.into_iter().enumerate() {
        let field = format!("backends[{i}].address");
        let Some(text) = b.address else {
            return Err(invalid(
                scope,
                &field,
                format!("missing ({ADDRESS_EXPECTED})"),
            ));
        };
        let host_part = text.rsplit_once(':').map_or(text.as_str(), |(h, _)| h);
        let literal = host_part.starts_with('[') || host_part.parse::<std::net::IpAddr>().is_ok();
        let host = match text.parse::<SocketAddr>() {
            Ok(_) => None,
            // An IP literal with a bad port: the socket-address message says what is wrong.
            Err(_) if literal => None,
            Err(_) => match super::dns::parse_host_port(&text) {
                Some(hp) => Some(hp),
                None => {
                    return Err(invalid(
                        scope,
                        &field,
                        format!(
                            "{text:?} is not a socket address or host name and port (expected \
                             IP:PORT, [IPv6]:PORT or NAME:PORT)"
                        ),
                    ))
                }
            },
        };
        let address = match &host {
            None => parse_address(scope, &field, &text)?,
            Some(_) => SocketAddr::from(([0, 0, 0, 0], 1)),
        };
        if address.port() == 0 || host.as_ref().is_some_and(|(_, p)| *p == 0) {
            return Err(invalid(
                scope,
                &field,
                format!("{text:?} has port 0 (expected a port between 1 and 65535)"),
            ));
        }
        if host.is_none() && address.ip().is_unspecified() {
            return Err(invalid(
                scope,
                &field,
                format!(
                    "{text:?} is an unspecified (wildcard) address (expected the backend's own IP)"
                ),
            ));
        }
        if let Some((name, _)) = &host {
            if let Some(first) = names
                .iter()
                .find(|d| d.name == *name && Some(d.port) == host.as_ref().map(|h| h.1))
            {
                return Err(invalid(
                    scope,
                    &field,
                    format!("{text:?} duplicates {}", first.field),
                ));
            }
        } else if let Some(first) = seen.insert(address, i) {
            return Err(invalid(
                scope,
                &field,
                format!("{text:?} duplicates backends[{first}].address"),
            ));
        }
        // Weight 0 is valid: the backend is drained (no new connections, open ones stay).
        let weight = match b.weight {
            None => 1,
            Some(w) if w < 0 => {
                return Err(invalid(
                    scope,
                    &format!("backends[{i}].weight"),
                    format!("{w} must be ≥ 0 (0 drains the backend)"),
                ))
            }
            Some(w) => u32::try_from(w).map_err(|_| {
                invalid(
                    scope,
                    &format!("backends[{i}].weight"),
                    format!("{w} must be ≤ {}", u32::MAX),
                )
            })?,
        };
        let max_connections = match b.max_connections {
            None => None,
            Some(n) if n < 1 => {
                return Err(invalid(
                    scope,
                    &format!("backends[{i}].max_connections"),
                    format!("{n} must be ≥ 1 (omit it for no limit)"),
                ))
            }
            Some(n) => Some(u32::try_from(n).map_err(|_| {
                invalid(
                    scope,
                    &format!("backends[{i}].max_connections"),
                    format!("{n} must be ≤ {} (omit it for no limit)", u32::MAX),
                )
            })?),
        };
        let backup = b.backup.unwrap_or(false);
        if let Some((name, port)) = host {
            names.push(Discovery {
                field,
                name,
                kind: super::dns::RecordKind::Host,
                port,
                refresh: None,
                weight,
                max_connections,
                backup,
            });
            continue;
        }
        backends.push(BackendConfig {
            address,
            weight,
            max_connections,
            backup,
        });
    }
    Ok((backends, names))
}

/// Refuses a backend that is the listener itself: every connection would connect to the
/// listener again until the fd limit. That is the bind address, or, for a wildcard bind
/// (`0.0.0.0`, `[::]`), a loopback address of the same family and port (the wildcard listens
/// there too). Not detected: a wildcard bind with one of the host's own non-loopback addresses
/// (that needs the interface list, and config loading does not touch the network).
/// Whether a listener bound to `bind` that connects to `backend` reaches itself: the same
/// address, or a loopback address on the port of a wildcard bind. A port 0 bind is never a
/// configured one (the port is not known until the socket is bound).
pub fn loops_to_itself(bind: SocketAddr, backend: SocketAddr) -> bool {
    bind.port() != 0
        && (backend == bind
            || (bind.ip().is_unspecified()
                && backend.port() == bind.port()
                && backend.is_ipv4() == bind.is_ipv4()
                && backend.ip().is_loopback()))
}

fn check_self_loop(
    scope: &str,
    bind: SocketAddr,
    backends: &[BackendConfig],
) -> Result<(), ConfigError> {
    let Some(i) = backends
        .iter()
        .position(|b| loops_to_itself(bind, b.address))
    else {
        return Ok(());
    };
    let address = backends[i].address;
    let how = if address == bind {
        "is the listener's own bind address".to_string()
    } else {
        format!("is reached through the listener's own wildcard bind {bind}")
    };
    Err(invalid(
        scope,
        &format!("backends[{i}].address"),
        format!(
            "\"{address}\" {how}: the listener would connect to itself in a loop (expected a \
             backend's address)"
        ),
    ))
}

/// The smallest prime ≥ `n`, if there is one ≤ [`balance::MAX_MAGLEV_TABLE_SIZE`].
fn prime_at_or_above(n: u64) -> Option<u64> {
    (n..=u64::from(balance::MAX_MAGLEV_TABLE_SIZE)).find(|&p| balance::is_prime(p))
}

/// The Maglev table size: a prime in range and, for a Maglev listener (`backend_count` given),
/// greater than its number of backends.
pub(super) fn validate_table_size(
    scope: &str,
    raw: Option<i64>,
    backend_count: Option<usize>,
) -> Result<u32, ConfigError> {
    const FIELD: &str = "maglev_table_size";
    let max = balance::MAX_MAGLEV_TABLE_SIZE;
    let explicit = raw.is_some();
    let raw = raw.unwrap_or(i64::from(balance::DEFAULT_MAGLEV_TABLE_SIZE));
    let Some(size) = u32::try_from(raw).ok().filter(|s| (3..=max).contains(s)) else {
        return Err(invalid(
            scope,
            FIELD,
            format!("{raw} must be a prime between 3 and {max}"),
        ));
    };
    let try_prime = |from: u64| match prime_at_or_above(from) {
        Some(p) => format!(" (try {p})"),
        None => String::new(),
    };
    let backends = backend_count.map_or(0, |n| u64::try_from(n).unwrap_or(u64::MAX));
    if u64::from(size) <= backends {
        let backend_count = backends;
        let default_note = if explicit { "" } else { " (the default)" };
        // The Maglev paper keeps every backend's share within about 1% of its weight when the
        // table has at least 100 slots per backend: suggest that, within the maximum.
        let suggestion = backends
            .saturating_mul(100)
            .min(u64::from(max))
            .max(backends + 1);
        return Err(invalid(
            scope,
            FIELD,
            format!(
                "{size}{default_note} must be greater than the number of backends \
                 ({backend_count}){}",
                try_prime(suggestion)
            ),
        ));
    }
    if !balance::is_prime(u64::from(size)) {
        return Err(invalid(
            scope,
            FIELD,
            format!("{size} is not prime{}", try_prime(u64::from(size))),
        ));
    }
    Ok(size)
}
