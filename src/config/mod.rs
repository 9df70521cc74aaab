//! The validated configuration: what `ringlb check` prints and `ringlb run` starts from.
//!
//! Owns the second stage of loading (`raw.rs` is the first): defaults, parsing of addresses,
//! durations and policy names, and every check that can be made without touching the network
//! (unique names and binds, prime Maglev table size, positive timeouts, ...). [`Config::load`] is
//! the one path used by both `check` and `run`, so a config that passes `check` is the config
//! that runs. It must not bind sockets, resolve names or start anything.
//!
//! Validation stops at the FIRST error: the message then names exactly one listener, field and
//! value, and fixing errors one by one in file order is what an operator does anyway.

mod duration;
mod error;
mod raw;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use crate::balance::{self, HashKey, Policy};

pub use duration::{format_duration, parse_duration};
pub use error::ConfigError;
use raw::{RawAdmin, RawBackend, RawConfig, RawListener, RawRuntime};

/// Upper bound for `runtime.workers`: far above any core count this runs on, low enough to catch
/// a typo before it starts a thousand rings.
pub const MAX_WORKERS: usize = 1024;
/// Default `runtime.drain_timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `admin.bind`: loopback only, the admin endpoint is not for the outside world.
pub const DEFAULT_ADMIN_BIND: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9900));
/// Default `connect_timeout` (Envoy's default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `idle_timeout` of a TCP listener.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `max_connections` of a listener.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100_000;

const ADDRESS_EXPECTED: &str = "expected IP:PORT, IPv6 as [::1]:PORT";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub runtime: Runtime,
    pub admin: Admin,
    pub listeners: Vec<Listener>,
}

/// `[runtime]`: process-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Runtime {
    /// Worker threads, one io_uring each. Default: `std::thread::available_parallelism()`.
    pub workers: usize,
    /// How long shutdown waits for open connections before closing them. Default 30s; 0 allowed.
    pub drain_timeout: Duration,
}

/// `[admin]`: the HTTP admin endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// Default [`DEFAULT_ADMIN_BIND`] (127.0.0.1:9900).
    pub bind: SocketAddr,
}

/// Transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    /// Parsed, but refused by validation until UDP is implemented.
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    pub fn from_name(s: &str) -> Option<Protocol> {
        match s {
            "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

/// One `[[listeners]]`: a bound address and the pool of backends behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// Unique, `[A-Za-z0-9_.-]+`; used as a metrics label.
    pub name: String,
    /// Unique among listeners of the same protocol (port 0 excepted: each gets its own port).
    pub bind: SocketAddr,
    pub protocol: Protocol,
    pub balance: Policy,
    /// Only used by Maglev; accepted (and validated) for every policy.
    pub hash_key: HashKey,
    /// Prime, ≥ 3, greater than the number of backends, ≤ [`balance::MAX_MAGLEV_TABLE_SIZE`].
    /// Validated for every policy, used only by Maglev.
    pub maglev_table_size: u32,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: u32,
    /// At least one; addresses unique within the listener.
    pub backends: Vec<BackendConfig>,
}

/// One backend of a listener.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    /// ≥ 1 (default 1).
    pub weight: u32,
}

impl Config {
    /// Reads, parses and validates the file at `path`. Every error names the path.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        Config::parse(&text).map_err(|e| e.with_path(path))
    }

    /// Parses and validates a config from TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: None,
            message: e.to_string().trim_end().to_string(),
        })?;
        validate(raw)
    }

    /// A human-readable summary, one screen for a few listeners: what `check` prints and `run`
    /// logs at start.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "workers {}, drain_timeout {}, admin {}",
            self.runtime.workers,
            format_duration(self.runtime.drain_timeout),
            self.admin.bind
        );
        for l in &self.listeners {
            let _ = write!(
                out,
                "listener {:?}: {} {}, balance {}",
                l.name,
                l.protocol.name(),
                l.bind,
                l.balance.name()
            );
            if l.balance == Policy::Maglev {
                let _ = write!(
                    out,
                    " (hash_key {}, table size {})",
                    l.hash_key.name(),
                    l.maglev_table_size
                );
            }
            let _ = writeln!(
                out,
                "\n  connect_timeout {}, idle_timeout {}, max_connections {}",
                format_duration(l.connect_timeout),
                format_duration(l.idle_timeout),
                l.max_connections
            );
            for b in &l.backends {
                let _ = writeln!(out, "  backend {} weight {}", b.address, b.weight);
            }
        }
        out
    }
}

fn invalid(scope: &str, field: &str, problem: String) -> ConfigError {
    ConfigError::Invalid {
        path: None,
        scope: scope.to_string(),
        field: field.to_string(),
        problem,
    }
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let runtime = validate_runtime(raw.runtime.unwrap_or_default())?;
    let admin = validate_admin(raw.admin.unwrap_or_default())?;
    let raw_listeners = raw.listeners.unwrap_or_default();
    if raw_listeners.is_empty() {
        return Err(invalid(
            "config",
            "listeners",
            "none defined (expected at least one [[listeners]] table)".to_string(),
        ));
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut listeners: Vec<Listener> = Vec::with_capacity(raw_listeners.len());
    for (index, raw) in raw_listeners.into_iter().enumerate() {
        let listener = validate_listener(index, raw, &mut names)?;
        if let Some(other) = listeners.iter().find(|o| binds_overlap(o, &listener)) {
            let how = if other.bind == listener.bind {
                "is already used".to_string()
            } else {
                format!(
                    "overlaps {} (same port, one is a wildcard address)",
                    other.bind
                )
            };
            return Err(invalid(
                &format!("listener {:?}", listener.name),
                "bind",
                format!("\"{}\" {how} by listener {:?}", listener.bind, other.name),
            ));
        }
        listeners.push(listener);
    }
    Ok(Config {
        runtime,
        admin,
        listeners,
    })
}

/// Two listeners of one protocol cannot share an address. A wildcard (`0.0.0.0`, `[::]`) and a
/// specific address of the same family on the same port also conflict: with `SO_REUSEPORT` both
/// binds succeed and the specific one silently takes part of the wildcard's traffic. Port 0 never
/// conflicts: every such bind gets its own ephemeral port.
fn binds_overlap(a: &Listener, b: &Listener) -> bool {
    a.protocol == b.protocol
        && a.bind.port() != 0
        && a.bind.port() == b.bind.port()
        && a.bind.is_ipv4() == b.bind.is_ipv4()
        && (a.bind.ip() == b.bind.ip()
            || a.bind.ip().is_unspecified()
            || b.bind.ip().is_unspecified())
}

fn validate_runtime(raw: RawRuntime) -> Result<Runtime, ConfigError> {
    let workers = match raw.workers {
        None => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS),
        Some(n) => match usize::try_from(n) {
            Ok(n) if (1..=MAX_WORKERS).contains(&n) => n,
            _ => {
                return Err(invalid(
                    "runtime",
                    "workers",
                    format!("{n} must be between 1 and {MAX_WORKERS}"),
                ))
            }
        },
    };
    let drain_timeout = match raw.drain_timeout {
        None => DEFAULT_DRAIN_TIMEOUT,
        Some(s) => parse_duration(&s).map_err(|e| invalid("runtime", "drain_timeout", e))?,
    };
    Ok(Runtime {
        workers,
        drain_timeout,
    })
}

fn validate_admin(raw: RawAdmin) -> Result<Admin, ConfigError> {
    let bind = match raw.bind {
        None => DEFAULT_ADMIN_BIND,
        Some(s) => parse_address("admin", "bind", &s)?,
    };
    Ok(Admin { bind })
}

fn parse_address(scope: &str, field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|_| {
        invalid(
            scope,
            field,
            format!("{s:?} is not a socket address ({ADDRESS_EXPECTED})"),
        )
    })
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn validate_listener(
    index: usize,
    raw: RawListener,
    names: &mut HashMap<String, usize>,
) -> Result<Listener, ConfigError> {
    // Until the name is known to be valid and unique, the listener is named by its position.
    let at = format!("listeners[{index}]");
    let name_expected = "expected a unique, non-empty name of letters, digits, '_', '.' and '-'; \
                         it becomes a metrics label";
    let Some(name) = raw.name else {
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

    let Some(bind) = raw.bind else {
        return Err(invalid(
            scope,
            "bind",
            format!("missing ({ADDRESS_EXPECTED})"),
        ));
    };
    let bind = parse_address(scope, "bind", &bind)?;

    let protocol = match raw.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => match Protocol::from_name(s) {
            Some(Protocol::Tcp) => Protocol::Tcp,
            Some(Protocol::Udp) => {
                return Err(invalid(
                    scope,
                    "protocol",
                    format!("{s:?} is not implemented yet (only \"tcp\" is supported for now)"),
                ))
            }
            None => {
                return Err(invalid(
                    scope,
                    "protocol",
                    format!(
                    "{s:?} is not a protocol (expected \"tcp\"; \"udp\" is not implemented yet)"
                ),
                ))
            }
        },
    };

    let balance = match raw.balance.as_deref() {
        None => Policy::RoundRobin,
        Some(s) => Policy::from_name(s).ok_or_else(|| {
            let names = Policy::ALL.map(Policy::name);
            invalid(
                scope,
                "balance",
                format!(
                    "{s:?} is not a balancing policy (expected one of {})",
                    quoted_list(&names)
                ),
            )
        })?,
    };

    let hash_key = match raw.hash_key.as_deref() {
        None => HashKey::SourceIp,
        Some(s) => HashKey::from_name(s).ok_or_else(|| {
            let names = HashKey::ALL.map(HashKey::name);
            invalid(
                scope,
                "hash_key",
                format!(
                    "{s:?} is not a hash key (expected one of {})",
                    quoted_list(&names)
                ),
            )
        })?,
    };

    let connect_timeout = positive_duration(
        scope,
        "connect_timeout",
        raw.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    // Only TCP gets here (UDP was refused above); UDP flows will need their own default.
    let idle_timeout = positive_duration(
        scope,
        "idle_timeout",
        raw.idle_timeout,
        DEFAULT_TCP_IDLE_TIMEOUT,
    )?;

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

    let backends = validate_backends(scope, raw.backends)?;
    let maglev_table_size = validate_table_size(scope, raw.maglev_table_size, backends.len())?;

    Ok(Listener {
        name,
        bind,
        protocol,
        balance,
        hash_key,
        maglev_table_size,
        connect_timeout,
        idle_timeout,
        max_connections,
        backends,
    })
}

fn quoted_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn positive_duration(
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

fn validate_backends(
    scope: &str,
    raw: Option<Vec<RawBackend>>,
) -> Result<Vec<BackendConfig>, ConfigError> {
    let raw =
        match raw {
            None => return Err(invalid(
                scope,
                "backends",
                "missing (expected at least one backend: backends = [ { address = \"IP:PORT\" } ])"
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
    for (i, b) in raw.into_iter().enumerate() {
        let field = format!("backends[{i}].address");
        let Some(text) = b.address else {
            return Err(invalid(
                scope,
                &field,
                format!("missing ({ADDRESS_EXPECTED})"),
            ));
        };
        let address = parse_address(scope, &field, &text)?;
        if address.port() == 0 {
            return Err(invalid(
                scope,
                &field,
                format!("{text:?} has port 0 (expected a port between 1 and 65535)"),
            ));
        }
        if address.ip().is_unspecified() {
            return Err(invalid(
                scope,
                &field,
                format!(
                    "{text:?} is an unspecified (wildcard) address (expected the backend's own IP)"
                ),
            ));
        }
        if let Some(first) = backends.iter().position(|o| o.address == address) {
            return Err(invalid(
                scope,
                &field,
                format!("{text:?} duplicates backends[{first}].address"),
            ));
        }
        let weight = match b.weight {
            None => 1,
            Some(w) if w < 1 => {
                return Err(invalid(
                    scope,
                    &format!("backends[{i}].weight"),
                    format!("{w} must be ≥ 1"),
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
        backends.push(BackendConfig { address, weight });
    }
    Ok(backends)
}

/// The smallest prime ≥ `n`, if there is one ≤ [`balance::MAX_MAGLEV_TABLE_SIZE`].
fn prime_at_or_above(n: u64) -> Option<u64> {
    (n..=u64::from(balance::MAX_MAGLEV_TABLE_SIZE)).find(|&p| balance::is_prime(p))
}

fn validate_table_size(
    scope: &str,
    raw: Option<i64>,
    backend_count: usize,
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
    let backends = u64::try_from(backend_count).unwrap_or(u64::MAX);
    if u64::from(size) <= backends {
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
