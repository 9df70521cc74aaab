//! The validated configuration: what `ringlb check` prints and `ringlb run` starts from.
//!
//! Owns the second stage of loading (`raw.rs` is the first): defaults, parsing of addresses,
//! durations and policy names, and every check that can be made without touching the network
//! (unique names and binds, prime Maglev table size, positive timeouts, ...). [`Config::load`] is
//! the one path used by both `check` and `run`, so a config that passes `check` is the config
//! that runs. It must not bind sockets, resolve names or start anything. One listener's checks
//! live in `listener.rs`, its `[listeners.health]` / `[listeners.passive]` tables in `health.rs`.
//!
//! Validation stops at the FIRST error: the message then names exactly one listener, field and
//! value, and fixing errors one by one in file order is what an operator does anyway.

mod admin;
mod dns;
mod duration;
mod error;
mod health;
#[cfg(test)]
mod health_tests;
mod listener;
mod log;
#[cfg(test)]
mod operations_tests;
#[cfg(test)]
mod ops_tests;
mod pool;
#[cfg(test)]
mod pool_tests;
mod raw;
mod readiness;
#[cfg(test)]
mod readiness_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod udp_tests;
mod warnings;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::balance::Policy;

pub use admin::{Admin, AdminBind, AdminToken, DEFAULT_ADMIN_BIND, MAX_UNIX_PATH};
pub use dns::{Discovery, DnsConfig, RecordKind, DEFAULT_DNS_HOLD, DEFAULT_DNS_REFRESH};
pub use duration::{format_duration, parse_duration};
pub use error::ConfigError;
pub use health::{
    escape_bytes, unescape, FlapConfig, HealthConfig, HttpCheck, PassiveConfig, ProbeTarget,
    DEFAULT_BASE_EJECTION_TIME, DEFAULT_CONSECUTIVE_FAILURES, DEFAULT_FALL,
    DEFAULT_HEALTH_INTERVAL, DEFAULT_HEALTH_TIMEOUT, DEFAULT_MAX_EJECTED_PERCENT,
    DEFAULT_MAX_EJECTION_TIME, DEFAULT_RISE, MAX_PROBE_BYTES,
};
pub use listener::loops_to_itself;
use listener::{is_valid_name, validate_listener};
pub use log::{AccessLog, LogConfig, LogFormat};
pub use pool::{
    pool_key, split_pool_key, Pool, Routing, DEFAULT_TLS_INSPECT_MAX_BYTES,
    DEFAULT_TLS_INSPECT_TIMEOUT, IMPLICIT_POOL, MAX_TLS_INSPECT_BYTES,
};
use raw::{RawConfig, RawRuntime};

/// Upper bound for `runtime.workers`: far above any core count this runs on, low enough to catch
/// a typo before it starts a thousand rings.
pub const MAX_WORKERS: usize = 1024;
/// Default `runtime.drain_timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `connect_timeout` (Envoy's default).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `idle_timeout` of a TCP listener.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `idle_timeout` of a UDP listener: a flow (one client address and port) is forgotten
/// this long after its last datagram either way. UDP has no close, so this is how flows end.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `max_flows` of a UDP listener.
pub const DEFAULT_MAX_FLOWS: u32 = 65_536;
/// Default `max_connections` of a listener.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100_000;
/// Default `tcp_keepalive` of a listener: idle time before the first keepalive probe.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// Largest `tcp_keepalive`: Linux refuses a `TCP_KEEPIDLE` above 32767 seconds (`MAX_TCP_KEEPIDLE`).
pub const MAX_TCP_KEEPALIVE: Duration = Duration::from_secs(32_767);
/// Default `queue_timeout` of a listener (HAProxy's `timeout queue` defaults to the connect
/// timeout; 5s is ours, matching [`DEFAULT_CONNECT_TIMEOUT`]).
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `proxy_protocol_timeout` of a listener.
pub const DEFAULT_PROXY_PROTOCOL_TIMEOUT: Duration = Duration::from_secs(3);

const ADDRESS_EXPECTED: &str = "expected IP:PORT, IPv6 as [::1]:PORT";

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub runtime: Runtime,
    pub admin: Admin,
    pub listeners: Vec<Listener>,
    /// `[log]`: format and access log destination.
    pub log: LogConfig,
    /// `[dns]`: how discovery names and host-name backends are resolved.
    pub dns: DnsConfig,
}

/// `[runtime]`: process-wide settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Runtime {
    /// Worker threads, one io_uring each. Default: `std::thread::available_parallelism()`.
    pub workers: usize,
    /// How long shutdown waits for open connections before closing them. Default 30s; 0 allowed.
    pub drain_timeout: Duration,
    /// The I/O backend: `auto` (io_uring where it can be used, else epoll), `io_uring` or
    /// `epoll`. The environment variable `RINGLB_IO` overrides it. Default `auto`.
    pub io: crate::io::IoSetting,
}

/// Transport of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    /// Datagrams, balanced per flow (client address and port): a flow's datagrams all go to one
    /// backend until it has been idle for `idle_timeout`. The TCP-only settings (keepalive,
    /// queueing, PROXY protocol, per-backend `max_connections`) are refused on such a listener.
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
    /// TCP: how long a backend connect may take. Accepted and ignored for UDP (a UDP "connect"
    /// only records the peer address; nothing is waited for).
    pub connect_timeout: Duration,
    /// TCP: a connection without a byte either way for this long is closed (default
    /// [`DEFAULT_TCP_IDLE_TIMEOUT`]). UDP: a flow without a datagram either way for this long is
    /// forgotten and its backend socket closed (default [`DEFAULT_UDP_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// TCP only: the most client connections open at once (refused in a udp listener's file,
    /// where `max_flows` is the limit; left at the default there).
    pub max_connections: u32,
    /// UDP only: the most flows this listener keeps at once (each worker takes an equal share;
    /// the least recently used flow is evicted beyond it), ≥ 1. Each flow holds one connected UDP
    /// socket to its backend, so the fd limit must exceed it. Default [`DEFAULT_MAX_FLOWS`].
    /// Refused in a tcp listener's file; set to the default and ignored there.
    pub max_flows: u32,
    /// One info line per closed connection. Default false.
    pub access_log: bool,
    /// What happens to the open connections of a listener or backend removed by a reload:
    /// `None` (the default) lets them run until they end; `Some(d)` closes them `d` after the
    /// reload (`Some(ZERO)`: at once).
    pub drain_timeout: Option<Duration>,
    /// TCP only (`on_backend_down`): when a backend is marked down (active checks or passive
    /// ejection), `false` (`"keep"`, the default, as HAProxy and Envoy) lets its open
    /// connections run; `true` (`"close"`, HAProxy's `on-marked-down shutdown-sessions`, Envoy's
    /// `close_connections_on_host_health_failure`) closes them within a scan period, so that
    /// clients of a demoted database primary reconnect to the healthy one.
    pub close_on_backend_down: bool,
    /// TCP only (`drain_mode`): `false` (`"tcp"`, the default) lets the connections of a
    /// drained or not ready backend run until they end (a removed one's until
    /// `drain_timeout`); `true` (`"postgres"`) reads the PostgreSQL framing of what is
    /// forwarded and closes each such connection when its session is idle (a `ReadyForQuery`
    /// with status `I`), bounded by `drain_timeout` for sessions that never go idle or are
    /// encrypted. Every byte is then copied, never spliced.
    pub drain_postgres: bool,
    /// TCP keepalive on both legs (client and backend sockets): idle time before the first probe
    /// (`TCP_KEEPIDLE`), a whole number of seconds between 1s and [`MAX_TCP_KEEPALIVE`]; probe
    /// interval and count are derived from it by the data plane. Default
    /// [`DEFAULT_TCP_KEEPALIVE`]; `None`: keepalive off (`"0s"` in the file).
    pub tcp_keepalive: Option<Duration>,
    /// How long a new client waits for a slot when every eligible backend is at its
    /// `max_connections` (HAProxy's `timeout queue`) before it is closed and counted. `ZERO`: do
    /// not queue, close at once. Default [`DEFAULT_QUEUE_TIMEOUT`].
    pub queue_timeout: Duration,
    /// Send a PROXY protocol header of this version to the backend before any client byte.
    /// Default `None` (off).
    pub proxy_protocol: Option<crate::proxy_protocol::Version>,
    /// Expect a PROXY protocol header (v1 or v2) from an upstream balancer on every client
    /// connection. Default false. TCP only, like `proxy_protocol`, `tcp_keepalive`,
    /// `queue_timeout` and `proxy_protocol_timeout`: on a udp listener these keep their defaults
    /// and setting any of them in the file is an error.
    pub accept_proxy_protocol: bool,
    /// The peers allowed to send that header (`accept_proxy_protocol_from`); `None`: every
    /// peer (warned about by `check` and `run`). Requires `accept_proxy_protocol = true`.
    pub accept_proxy_protocol_from: Option<Vec<crate::proxy_protocol::Cidr>>,
    /// How long to wait for that header; > 0. Validated always, used only with
    /// `accept_proxy_protocol`. Default [`DEFAULT_PROXY_PROTOCOL_TIMEOUT`].
    pub proxy_protocol_timeout: Duration,
    /// The backend pools: the listener's own backends first (the implicit pool, named
    /// [`IMPLICIT_POOL`]) when it has any, then its `[[listeners.pools]]` in file order. At least
    /// one; a listener without `routes` has exactly one.
    pub pools: Vec<Pool>,
    /// TLS passthrough routing (`routes`, `tls_inspect`); `None`: every connection goes to the
    /// one pool.
    pub routing: Option<Routing>,
}

impl Listener {
    /// The pool connections go to when there are no routes (the only one), else the default
    /// route's pool, if any.
    pub fn default_pool(&self) -> Option<&Pool> {
        match &self.routing {
            None => self.pools.first(),
            Some(r) => r.table.default_pool().and_then(|i| self.pools.get(i)),
        }
    }

    /// Every backend of every pool, with its pool.
    pub fn all_backends(&self) -> impl Iterator<Item = (&Pool, &BackendConfig)> {
        self.pools
            .iter()
            .flat_map(|p| p.backends.iter().map(move |b| (p, b)))
    }
}

/// One backend of a listener.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    pub address: SocketAddr,
    /// Default 1. 0 means "drain": the backend gets no new connections, its open ones stay.
    /// A listener whose backends all have weight 0 refuses new connections, as when all are down.
    pub weight: u32,
    /// The most connections open to this backend at once; ≥ 1. `None` (the default): no limit.
    /// Pickers skip a full backend; when all eligible backends are full, new clients queue for
    /// up to the listener's `queue_timeout`. TCP only: always `None` on a udp listener.
    pub max_connections: Option<u32>,
    /// `backup = true`: gets new connections only while no non-backup backend of the pool is
    /// eligible (HAProxy's `backup`); loses them again as soon as one is.
    pub backup: bool,
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
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let message = e.to_string().trim_end().to_string();
            let scope = e.span().and_then(|span| listener_at(text, span.start));
            ConfigError::Toml {
                path: None,
                message: match scope {
                    Some(scope) => format!("{scope}: {message}"),
                    None => message,
                },
            }
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
            "workers {}, io {}, drain_timeout {}, admin {}{}",
            self.runtime.workers,
            self.runtime.io.name(),
            format_duration(self.runtime.drain_timeout),
            self.admin.bind,
            self.admin
                .token_file
                .as_ref()
                .map_or(String::new(), |p| format!(" (token_file {})", p.display()))
        );
        let _ = writeln!(
            out,
            "log format {}, access_log {}",
            self.log.format.name(),
            self.log.access_log
        );
        if self
            .listeners
            .iter()
            .any(|l| l.pools.iter().any(|p| !p.discovery.is_empty()))
        {
            let _ = writeln!(out, "{}", self.dns.describe());
        }
        for l in &self.listeners {
            let _ = write!(
                out,
                "listener {:?}: {} {}",
                l.name,
                l.protocol.name(),
                l.bind
            );
            // One pool without routes: its balance on the listener's line, as before pools.
            let single = l.routing.is_none() && l.pools.len() == 1;
            if single {
                let _ = write!(out, ", ");
                describe_balance(&mut out, &l.pools[0]);
            }
            let access_log = if l.access_log { "on" } else { "off" };
            let drain_timeout = l
                .drain_timeout
                .map_or("unlimited".to_string(), format_duration);
            if l.protocol == Protocol::Udp {
                // Only what applies to UDP: the TCP-only settings cannot be set on it.
                let _ = writeln!(
                    out,
                    "\n  idle_timeout {}, max_flows {}, access_log {access_log}, drain_timeout \
                     {drain_timeout}",
                    format_duration(l.idle_timeout),
                    l.max_flows,
                );
            } else {
                let _ = writeln!(
                    out,
                    "\n  connect_timeout {}, idle_timeout {}, max_connections {}, access_log \
                     {access_log}",
                    format_duration(l.connect_timeout),
                    format_duration(l.idle_timeout),
                    l.max_connections,
                );
                let _ = writeln!(
                    out,
                    "  drain_timeout {drain_timeout}{}, on_backend_down {}, tcp_keepalive {}, \
                     queue_timeout {}, proxy_protocol {}, accept_proxy_protocol {}",
                    if l.drain_postgres {
                        ", drain_mode postgres"
                    } else {
                        ""
                    },
                    if l.close_on_backend_down {
                        "close"
                    } else {
                        "keep"
                    },
                    l.tcp_keepalive.map_or("off".to_string(), format_duration),
                    format_duration(l.queue_timeout),
                    l.proxy_protocol.map_or("off", |v| v.name()),
                    if l.accept_proxy_protocol {
                        format!("on (timeout {})", format_duration(l.proxy_protocol_timeout))
                    } else {
                        "off".to_string()
                    }
                );
            }
            if let Some(r) = &l.routing {
                let _ = writeln!(
                    out,
                    "  tls_inspect: timeout {}, max_bytes {}{}",
                    format_duration(r.timeout),
                    r.max_bytes,
                    if r.inspects() {
                        ""
                    } else {
                        " (only a default route: never reads the ClientHello)"
                    }
                );
                for route in &r.routes {
                    let mut cond = Vec::new();
                    if !route.sni.is_empty() {
                        cond.push(format!("sni {}", route.sni.join(",")));
                    }
                    if !route.alpn.is_empty() {
                        cond.push(format!("alpn {}", route.alpn.join(",")));
                    }
                    let _ = writeln!(
                        out,
                        "  route {} -> pool {:?}",
                        cond.join(" "),
                        l.pools[route.pool].name
                    );
                }
                if let Some(p) = r.table.default_pool() {
                    let _ = writeln!(out, "  route default -> pool {:?}", l.pools[p].name);
                }
            }
            for p in &l.pools {
                let indent = if single {
                    "  "
                } else {
                    let _ = write!(out, "  pool {:?}: ", p.name);
                    describe_balance(&mut out, p);
                    let _ = writeln!(out);
                    "    "
                };
                describe_pool(&mut out, indent, l.protocol, p);
            }
        }
        out
    }
}

/// `balance maglev (hash_key source_ip, table size 65537)`.
fn describe_balance(out: &mut String, p: &Pool) {
    let _ = write!(out, "balance {}", p.balance.name());
    if p.balance == Policy::Maglev {
        let _ = write!(
            out,
            " (hash_key {}, table size {})",
            p.hash_key.name(),
            p.maglev_table_size
        );
    }
}

/// A pool's health, slow start, passive ejection and backends, one line each.
fn describe_pool(out: &mut String, indent: &str, protocol: Protocol, p: &Pool) {
    let health = match (&p.health, protocol) {
        (None, _) => "off".to_string(),
        (Some(h), Protocol::Tcp) => h.describe(),
        (Some(h), Protocol::Udp) => format!("udp {}", h.describe()),
    };
    let _ = writeln!(out, "{indent}health checks: {health}");
    if let Some(h) = &p.health {
        if let Some(r) = &h.ready {
            let _ = writeln!(out, "{indent}readiness checks: {}", r.describe());
        }
        let _ = writeln!(out, "{indent}{}", h.flap.describe());
    }
    if let Some(d) = p.slow_start {
        let _ = writeln!(out, "{indent}slow start over {}", format_duration(d));
    }
    let _ = writeln!(out, "{indent}passive ejection: {}", p.passive.describe());
    for b in &p.backends {
        let _ = write!(out, "{indent}backend {} weight {}", b.address, b.weight);
        if b.weight == 0 {
            let _ = write!(out, " (drain)");
        }
        if let Some(max) = b.max_connections {
            let _ = write!(out, ", max_connections {max}");
        }
        if b.backup {
            let _ = write!(out, " (backup)");
        }
        let _ = writeln!(out);
    }
    for d in &p.discovery {
        let _ = write!(out, "{indent}backends from DNS: {}", d.describe());
        if d.kind != RecordKind::Srv {
            let _ = write!(out, " weight {}", d.weight);
        }
        if let Some(r) = d.refresh {
            let _ = write!(out, ", refresh {}", format_duration(r));
        }
        if d.backup {
            let _ = write!(out, " (backup)");
        }
        let _ = writeln!(out);
    }
}

/// The listener a TOML error at byte `offset` belongs to, as `listener "web"` (or
/// `listeners[2]` when the name cannot be read), found from the `[[listeners]]` headers before
/// it; `None` outside listener tables (and for the inline `listeners = [...]` form). Only names
/// the scope: toml's own message still gives the line and column.
fn listener_at(text: &str, offset: usize) -> Option<String> {
    let mut index: Option<usize> = None;
    for line in text.get(..offset)?.lines() {
        let line = line.trim_start();
        if !line.starts_with('[') {
            continue;
        }
        let header: String = line
            .split('#')
            .next()
            .unwrap_or_default()
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if header == "[[listeners]]" {
            index = Some(index.map_or(0, |i| i + 1));
        } else if !header.starts_with("[listeners.") && !header.starts_with("[[listeners.") {
            index = None; // [runtime], [admin], ...: outside every listener
        }
    }
    let index = index?;
    let name = text
        .parse::<toml::Table>()
        .ok()
        .and_then(|t| {
            t.get("listeners")?
                .as_array()?
                .get(index)?
                .get("name")?
                .as_str()
                .map(str::to_string)
        })
        .filter(|name| is_valid_name(name));
    Some(match name {
        Some(name) => format!("listener {name:?}"),
        None => format!("listeners[{index}]"),
    })
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
    let admin = admin::validate_admin(raw.admin.unwrap_or_default())?;
    let log = log::validate_log(raw.log.unwrap_or_default())?;
    let dns = dns::validate_dns(raw.dns.unwrap_or_default())?;
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
        log,
        dns,
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
    let io = match raw.io.as_deref() {
        None => crate::io::IoSetting::Auto,
        Some(v) => crate::io::IoSetting::from_name(v).ok_or_else(|| {
            invalid(
                "runtime",
                "io",
                format!(
                    "{v:?} is not an I/O backend (expected \"auto\", \"io_uring\" or \"epoll\")"
                ),
            )
        })?,
    };
    Ok(Runtime {
        workers,
        drain_timeout,
        io,
    })
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
