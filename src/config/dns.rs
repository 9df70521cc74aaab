//! Validation of the `[dns]` section and of what a pool resolves: its `discovery` query, or a
//! backend whose `address` is a host name (`db.service.consul:5432`).
//!
//! Owns the DNS defaults and messages. Like the rest of `config` it must not touch the network:
//! names are checked for shape only; the control plane resolves them (`control/dns.rs`).

use std::net::SocketAddr;
use std::time::Duration;

use super::raw::{RawDiscovery, RawDns};
use super::{invalid, parse_duration, ConfigError};

/// Default `[dns] refresh`: how often every name is resolved again.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);
/// Default `[dns] hold`: how long an empty answer (the name exists, no records) is ignored before
/// the backends it had are removed (HAProxy's `hold nx`/`hold obsolete`).
pub const DEFAULT_DNS_HOLD: Duration = Duration::from_secs(30);

/// `[dns]`: the resolver every pool shares.
#[derive(Debug, Clone, PartialEq)]
pub struct DnsConfig {
    /// Name servers (UDP, then TCP on truncation). `None`: those of `/etc/resolv.conf`.
    pub resolvers: Option<Vec<SocketAddr>>,
    pub refresh: Duration,
    /// Re-resolve when the answer's TTL runs out instead of every `refresh` (bounded by 1s below
    /// and `refresh` above, so a TTL of 0 never becomes a hot loop and a day-long TTL does not
    /// freeze the set).
    pub respect_ttl: bool,
    pub hold: Duration,
}

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig {
            resolvers: None,
            refresh: DEFAULT_DNS_REFRESH,
            respect_ttl: false,
            hold: DEFAULT_DNS_HOLD,
        }
    }
}

impl DnsConfig {
    pub fn describe(&self) -> String {
        let resolvers = match &self.resolvers {
            None => "from /etc/resolv.conf".to_string(),
            Some(r) => r
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        };
        format!(
            "dns resolvers {resolvers}, refresh {}, respect_ttl {}, hold {}",
            super::format_duration(self.refresh),
            self.respect_ttl,
            super::format_duration(self.hold)
        )
    }
}

/// Which records a name is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    A,
    Aaaa,
    /// Target, port and weight from each SRV record; the targets' addresses from A/AAAA.
    Srv,
    /// A host-name backend (`address = "name:port"`): A and AAAA, like a connect would.
    Host,
}

impl RecordKind {
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::A => "A",
            RecordKind::Aaaa => "AAAA",
            RecordKind::Srv => "SRV",
            RecordKind::Host => "A+AAAA",
        }
    }
}

/// One name a pool resolves, and what each address it yields becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovery {
    /// Where it was written, for messages: `discovery` or `backends[2].address`.
    pub field: String,
    /// Without a trailing dot as written; resolved as written (resolv.conf's search list applies
    /// to names with fewer dots than `ndots`).
    pub name: String,
    pub kind: RecordKind,
    /// The backends' port (0 for SRV: each record carries its own).
    pub port: u16,
    /// Overrides `[dns] refresh` for this name.
    pub refresh: Option<Duration>,
    /// Each address's weight; for SRV the record's weight is used (0 → 1, as weight 0 means
    /// "rarely" in RFC 2782, not "never").
    pub weight: u32,
    pub max_connections: Option<u32>,
    pub backup: bool,
}

impl Discovery {
    pub fn describe(&self) -> String {
        let port = if self.kind == RecordKind::Srv {
            String::new()
        } else {
            format!(" port {}", self.port)
        };
        format!("{} {}{port}", self.kind.name(), self.name)
    }
}

/// A DNS name as the config may write it: dot-separated labels of letters, digits, `-` and `_`
/// (SRV's `_service._proto`), each 1–63 bytes, at most 253 in all.
pub(super) fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        // "1.2.3" is a mistyped address, not a name.
        && !s.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// `name:port` with a host name, as a backend address (`None`: not of that shape).
pub(super) fn parse_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    if !is_host_name(host) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    Some((host.trim_end_matches('.').to_string(), port))
}

pub(super) fn validate_dns(raw: RawDns) -> Result<DnsConfig, ConfigError> {
    const SCOPE: &str = "dns";
    let resolvers = match raw.resolvers {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(invalid(
                SCOPE,
                "resolvers",
                "[] is empty (omit it to use /etc/resolv.conf)".to_string(),
            ))
        }
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(i, s)| {
                    let field = format!("resolvers[{i}]");
                    let a: SocketAddr = s.parse().or_else(|_| {
                        s.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                            .map_err(|_| {
                                invalid(
                                    SCOPE,
                                    &field,
                                    format!(
                                        "{s:?} is not a name server address (expected IP or \
                                         IP:PORT, IPv6 as [::1]:53)"
                                    ),
                                )
                            })
                    })?;
                    if a.port() == 0 || a.ip().is_unspecified() {
                        return Err(invalid(
                            SCOPE,
                            &field,
                            format!("{s:?} is not a name server's address"),
                        ));
                    }
                    Ok(a)
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    let refresh = positive(SCOPE, "refresh", raw.refresh, DEFAULT_DNS_REFRESH)?;
    let hold = match raw.hold {
        None => DEFAULT_DNS_HOLD,
        Some(s) => parse_duration(&s).map_err(|e| invalid(SCOPE, "hold", e))?,
    };
    Ok(DnsConfig {
        resolvers,
        refresh,
        respect_ttl: raw.respect_ttl.unwrap_or(false),
        hold,
    })
}

fn positive(
    scope: &str,
    field: &str,
    raw: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    super::listener::positive_duration(scope, field, raw, default)
}

/// A listener's `discovery` table.
pub(super) fn validate_discovery(scope: &str, raw: RawDiscovery) -> Result<Discovery, ConfigError> {
    let Some(name) = raw.name else {
        return Err(invalid(
            scope,
            "discovery.name",
            "missing (expected the DNS name to resolve, e.g. \"_pg._tcp.db.service.consul\")"
                .to_string(),
        ));
    };
    if !is_host_name(&name) {
        return Err(invalid(
            scope,
            "discovery.name",
            format!("{name:?} is not a DNS name (labels of letters, digits, '-' and '_')"),
        ));
    }
    let kind = match raw.kind.as_deref() {
        Some("A") | Some("a") => RecordKind::A,
        Some("AAAA") | Some("aaaa") => RecordKind::Aaaa,
        Some("SRV") | Some("srv") => RecordKind::Srv,
        Some(other) => {
            return Err(invalid(
                scope,
                "discovery.type",
                format!("{other:?} is not a record type (expected \"A\", \"AAAA\" or \"SRV\")"),
            ))
        }
        None => {
            return Err(invalid(
                scope,
                "discovery.type",
                "missing (expected \"A\", \"AAAA\" or \"SRV\")".to_string(),
            ))
        }
    };
    let port = match (kind, raw.port) {
        (RecordKind::Srv, None) => 0,
        (RecordKind::Srv, Some(p)) => {
            return Err(invalid(
                scope,
                "discovery.port",
                format!("{p} is set, but SRV records carry their own port (omit it)"),
            ))
        }
        (_, None) => {
            return Err(invalid(
                scope,
                "discovery.port",
                format!(
                    "missing (an {} record has no port: expected the backends' port, 1-65535)",
                    kind.name()
                ),
            ))
        }
        (_, Some(p)) => u16::try_from(p).ok().filter(|p| *p != 0).ok_or_else(|| {
            invalid(
                scope,
                "discovery.port",
                format!("{p} must be between 1 and 65535"),
            )
        })?,
    };
    let refresh = raw
        .refresh
        .map(|s| positive(scope, "discovery.refresh", Some(s), DEFAULT_DNS_REFRESH))
        .transpose()?;
    let weight = match raw.weight {
        None => 1,
        Some(w) => u32::try_from(w).map_err(|_| {
            invalid(
                scope,
                "discovery.weight",
                format!("{w} must be between 0 and {}", u32::MAX),
            )
        })?,
    };
    let max_connections = raw
        .max_connections
        .map(|n| {
            u32::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                invalid(
                    scope,
                    "discovery.max_connections",
                    format!(
                        "{n} must be between 1 and {} (omit it for no limit)",
                        u32::MAX
                    ),
                )
            })
        })
        .transpose()?;
    Ok(Discovery {
        field: "discovery".to_string(),
        name: name.trim_end_matches('.').to_string(),
        kind,
        port,
        refresh,
        weight,
        max_connections,
        backup: false,
    })
}
