//! Validation of a listener's backend pools and of its TLS passthrough routing: the implicit
//! pool (the listener's own `backends`, `balance`, `health`, ... fields), the named
//! `[[listeners.pools]]`, `routes` and `tls_inspect`.
//!
//! Both kinds of pool go through [`validate_pool`], so a pool field is validated the same way
//! wherever it is written. A named pool's errors are scoped `listener "tls", pool "api"`.
//! Like the rest of `config`, it must not touch the network. Stops at the first error.

use std::collections::HashMap;
use std::time::Duration;

use super::health::{validate_health, validate_passive};
use super::listener::{is_valid_name, quoted_list, validate_backends, validate_table_size};
use super::raw::{RawListener, RawPoolFields, RawRoute, RawTlsInspect};
use super::{
    format_duration, invalid, parse_duration, BackendConfig, ConfigError, HealthConfig,
    PassiveConfig, Protocol,
};
use crate::balance::{HashKey, Policy};
use crate::tls::{Route, RouteTable, MIN_HELLO_LEN};

/// The name of a listener's implicit pool (its own `backends`) in routes, metrics (`pool`
/// label), `/status` and logs.
pub const IMPLICIT_POOL: &str = "default";
/// Default `tls_inspect.timeout` (HAProxy's examples use 5s for `tcp-request inspect-delay`).
pub const DEFAULT_TLS_INSPECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `tls_inspect.max_bytes`: one full TLS record.
pub const DEFAULT_TLS_INSPECT_MAX_BYTES: usize = crate::tls::DEFAULT_MAX_BYTES;
/// Largest `tls_inspect.max_bytes` (Envoy's tls_inspector cap): the hello is peeked from the
/// socket's receive queue, which must be able to hold it.
pub const MAX_TLS_INSPECT_BYTES: usize = 65_536;

/// One pool of backends: its balancing, health and backends.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// [`IMPLICIT_POOL`] for the listener's own backends, else the `[[listeners.pools]]` name.
    pub name: String,
    pub balance: Policy,
    /// Only used by Maglev; accepted (and validated) for every policy.
    pub hash_key: HashKey,
    /// Prime, ≥ 3, greater than the number of backends, ≤ [`crate::balance::MAX_MAGLEV_TABLE_SIZE`].
    /// Validated for every policy, used only by Maglev.
    pub maglev_table_size: u32,
    /// Active health checks; `None`: backends are not probed and count as up (unless passively
    /// ejected).
    pub health: Option<HealthConfig>,
    /// Passive ejection after connect failures (on by default; `consecutive_failures = 0` is off).
    pub passive: PassiveConfig,
    /// The IP-literal backends, addresses unique within the pool. Empty when the backends come
    /// from DNS only (`discovery`, or host-name addresses).
    pub backends: Vec<BackendConfig>,
    /// Names the control plane resolves into more backends: the `discovery` query, or one per
    /// host-name backend. The control plane's copy of a listener holds the resolved backends in
    /// `backends` too (see `control/dns.rs`).
    pub discovery: Vec<super::Discovery>,
    /// `slow_start`: a backend that becomes eligible ramps from 10% to 100% of its weight over
    /// this long. `None`: off. Never set with Maglev (refused).
    pub slow_start: Option<Duration>,
}

/// A listener's TLS passthrough routing: how to read the ClientHello and where it sends a
/// connection. Present only when the listener has `routes`.
#[derive(Debug, Clone)]
pub struct Routing {
    /// `tls_inspect.timeout`: how long a client may take to send its whole ClientHello.
    pub timeout: Duration,
    /// `tls_inspect.max_bytes`: the longest ClientHello read (record headers included).
    pub max_bytes: usize,
    /// The routes, compiled; pools are indexes into the listener's `pools`.
    pub table: RouteTable,
    /// The routes as written (`RouteTable` has no equality; reload compares these).
    pub routes: Vec<Route>,
}

impl PartialEq for Routing {
    fn eq(&self, other: &Routing) -> bool {
        self.timeout == other.timeout
            && self.max_bytes == other.max_bytes
            && self.routes == other.routes
            && self.table.default_pool() == other.table.default_pool()
    }
}

impl Routing {
    /// Whether the listener reads ClientHellos at all (a listener whose only route is the
    /// default never does).
    pub fn inspects(&self) -> bool {
        self.table.needs_inspect()
    }
}

/// The key a pool's backends are known by to health checks, the stats registry, reports and
/// logs: the listener's name for its implicit pool (as before pools existed), `listener/pool`
/// for a named pool (names cannot contain '/'). [`split_pool_key`] reverses it.
pub fn pool_key(listener: &str, pool: &str) -> String {
    if pool == IMPLICIT_POOL {
        listener.to_string()
    } else {
        format!("{listener}/{pool}")
    }
}

/// `(listener, pool)` of a [`pool_key`].
pub fn split_pool_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or((key, IMPLICIT_POOL))
}

impl super::Listener {
    /// One single-pool listener per pool, named by its [`pool_key`], without routes: what the
    /// health checks and the stats registry work on (they know backends by that key).
    pub fn pool_units(&self) -> Vec<super::Listener> {
        self.pools
            .iter()
            .map(|p| super::Listener {
                name: pool_key(&self.name, &p.name),
                pools: vec![p.clone()],
                routing: None,
                ..self.clone()
            })
            .collect()
    }
}

/// Validates one pool's fields under `scope` (`listener "web"` or `listener "tls", pool "api"`).
pub(super) fn validate_pool(
    scope: &str,
    name: String,
    protocol: Protocol,
    raw: RawPoolFields,
) -> Result<Pool, ConfigError> {
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
    let (backends, discovery) = match (raw.backends, raw.discovery) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                scope,
                "discovery",
                "is set together with backends (a pool takes its backends from one or the \
                 other: remove one)"
                    .to_string(),
            ))
        }
        (None, Some(d)) => (Vec::new(), vec![super::dns::validate_discovery(scope, d)?]),
        (b, None) => validate_backends(scope, b)?,
    };
    // Only a Maglev pool has a table, so only it needs more slots than backends; a size
    // written for another policy is still checked (a prime in range), then unused.
    let maglev_table_size = validate_table_size(
        scope,
        raw.maglev_table_size,
        (balance == Policy::Maglev).then_some(backends.len()),
    )?;
    let health = raw
        .health
        .map(|h| validate_health(scope, protocol, h))
        .transpose()?;
    let passive = validate_passive(scope, raw.passive.unwrap_or_default())?;
    let slow_start = super::readiness::validate_slow_start(scope, raw.slow_start, balance)?;
    Ok(Pool {
        name,
        balance,
        hash_key,
        maglev_table_size,
        health,
        passive,
        backends,
        discovery,
        slow_start,
    })
}

/// The scope of a named pool's errors.
pub(super) fn pool_scope(listener_scope: &str, pool: &str) -> String {
    format!("{listener_scope}, pool {pool:?}")
}

/// Validates a listener's pools (implicit first, then `[[listeners.pools]]` in file order),
/// `routes` and `tls_inspect`.
pub(super) fn validate_pools(
    scope: &str,
    protocol: Protocol,
    raw: &mut RawListener,
) -> Result<(Vec<Pool>, Option<Routing>), ConfigError> {
    let own = raw.take_pool();
    let named = raw.pools.take();
    let routes = raw.routes.take();
    let inspect = raw.tls_inspect.take();
    if protocol == Protocol::Udp {
        let set = [
            ("pools", named.is_some()),
            ("routes", routes.is_some()),
            ("tls_inspect", inspect.is_some()),
        ];
        if let Some((field, _)) = set.iter().find(|(_, s)| *s) {
            return Err(invalid(
                scope,
                field,
                format!(
                    "is set, but {field} applies to tcp listeners only (TLS passthrough routing \
                     reads a TCP stream; this listener's protocol is \"udp\")"
                ),
            ));
        }
    }
    let mut pools = Vec::new();
    let has_named = named.as_ref().is_some_and(|n| !n.is_empty());
    if own.any_set() || !has_named {
        if own.backends.is_none() && has_named {
            // Pool settings without a pool: they would silently apply to nothing.
            let field = own.first_set().unwrap_or("backends");
            return Err(invalid(
                scope,
                field,
                format!(
                    "is set, but this listener has no backends of its own (its backends are in \
                     [[listeners.pools]]): set {field} inside the pool it is meant for"
                ),
            ));
        }
        pools.push(validate_pool(
            scope,
            IMPLICIT_POOL.to_string(),
            protocol,
            own,
        )?);
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, p) in named.into_iter().flatten().enumerate() {
        let field = format!("pools[{i}].name");
        let (name, fields) = p.into_parts();
        let expected = "expected a unique name of letters, digits, '_', '.' and '-'; it becomes \
                        the pool label of the metrics and what routes name";
        let Some(name) = name else {
            return Err(invalid(scope, &field, format!("missing ({expected})")));
        };
        if !is_valid_name(&name) {
            return Err(invalid(
                scope,
                &field,
                format!("{name:?} is not a valid name ({expected})"),
            ));
        }
        if name == IMPLICIT_POOL && pools.first().is_some_and(|p| p.name == IMPLICIT_POOL) {
            return Err(invalid(
                scope,
                &field,
                format!(
                    "{name:?} is the name of this listener's own backends (its implicit pool); \
                     choose another name"
                ),
            ));
        }
        if let Some(first) = names.insert(name.clone(), i) {
            return Err(invalid(
                scope,
                &field,
                format!("{name:?} is already used by pools[{first}]"),
            ));
        }
        let pscope = pool_scope(scope, &name);
        pools.push(validate_pool(&pscope, name, protocol, fields)?);
    }
    let routing = match routes {
        None => {
            if pools.len() > 1 {
                return Err(invalid(
                    scope,
                    "pools",
                    format!(
                        "{} is set but routes is not: a pool gets connections only through a \
                         route (add routes = [ {{ sni = [...], pool = \"...\" }}, {{ default = \
                         true, pool = \"...\" }} ])",
                        quoted_list(&pools.iter().map(|p| p.name.as_str()).collect::<Vec<_>>())
                    ),
                ));
            }
            if pools.len() == 1 && pools[0].name != IMPLICIT_POOL {
                return Err(invalid(
                    scope,
                    "pools",
                    format!(
                        "{:?} is set but routes is not: a pool gets connections only through a \
                         route (add routes = [ {{ default = true, pool = {:?} }} ], or put its \
                         backends on the listener)",
                        pools[0].name, pools[0].name
                    ),
                ));
            }
            if inspect.is_some() {
                return Err(invalid(
                    scope,
                    "tls_inspect",
                    "is set but routes is not (tls_inspect says how to read the ClientHello \
                     that routes choose by)"
                        .to_string(),
                ));
            }
            None
        }
        Some(routes) => Some(validate_routes(scope, &pools, routes, inspect)?),
    };
    Ok((pools, routing))
}

fn validate_routes(
    scope: &str,
    pools: &[Pool],
    raw: Vec<RawRoute>,
    inspect: Option<RawTlsInspect>,
) -> Result<Routing, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            scope,
            "routes",
            "[] is empty (expected at least one route, or no routes field)".to_string(),
        ));
    }
    let pool_names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    let mut routes = Vec::new();
    // Index in `raw` of each entry of `routes`, for errors from the table build.
    let mut raw_index = Vec::new();
    let mut default: Option<(usize, usize)> = None;
    for (i, r) in raw.into_iter().enumerate() {
        let at = format!("routes[{i}]");
        let Some(pool) = r.pool else {
            return Err(invalid(
                scope,
                &format!("{at}.pool"),
                format!(
                    "missing (expected the name of a pool: {})",
                    quoted_list(&pool_names)
                ),
            ));
        };
        let Some(p) = pool_names.iter().position(|n| *n == pool) else {
            return Err(invalid(
                scope,
                &format!("{at}.pool"),
                format!(
                    "{pool:?} is not a pool of this listener (expected one of {}; the \
                     listener's own backends are pool {IMPLICIT_POOL:?})",
                    quoted_list(&pool_names)
                ),
            ));
        };
        match r.default {
            Some(true) => {
                if r.sni.is_some() || r.alpn.is_some() {
                    return Err(invalid(
                        scope,
                        &format!("{at}.default"),
                        "true takes every connection no other route takes, so it has no sni \
                         or alpn condition (remove them, or default)"
                            .to_string(),
                    ));
                }
                if let Some((first, _)) = default {
                    return Err(invalid(
                        scope,
                        &format!("{at}.default"),
                        format!("true, but routes[{first}] is already the default route"),
                    ));
                }
                default = Some((i, p));
            }
            Some(false) | None => {
                routes.push(Route {
                    sni: r.sni.unwrap_or_default(),
                    alpn: r.alpn.unwrap_or_default(),
                    pool: p,
                });
                raw_index.push(i);
            }
        }
    }
    let table = RouteTable::build(&routes, default.map(|d| d.1)).map_err(|e| {
        let mut e = e;
        e.route = raw_index.get(e.route).copied().unwrap_or(e.route);
        invalid(scope, &e.field_path(), e.problem())
    })?;
    for (i, p) in pools.iter().enumerate() {
        let used = routes.iter().any(|r| r.pool == i) || default.is_some_and(|d| d.1 == i);
        if !used {
            let field = if p.name == IMPLICIT_POOL {
                "backends".to_string()
            } else {
                format!(
                    "pools[{}].name",
                    i - usize::from(pools[0].name == IMPLICIT_POOL)
                )
            };
            return Err(invalid(
                scope,
                &field,
                format!(
                    "pool {:?} is named by no route, so it would never get a connection (name it \
                     in routes, or remove it)",
                    p.name
                ),
            ));
        }
    }
    let raw = inspect.unwrap_or_default();
    let timeout = match raw.timeout {
        None => DEFAULT_TLS_INSPECT_TIMEOUT,
        Some(s) => {
            let d = parse_duration(&s).map_err(|e| invalid(scope, "tls_inspect.timeout", e))?;
            if d.is_zero() {
                return Err(invalid(
                    scope,
                    "tls_inspect.timeout",
                    format!(
                        "{s:?} must be greater than zero (the default is {})",
                        format_duration(DEFAULT_TLS_INSPECT_TIMEOUT)
                    ),
                ));
            }
            d
        }
    };
    let max_bytes = match raw.max_bytes {
        None => DEFAULT_TLS_INSPECT_MAX_BYTES,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (MIN_HELLO_LEN..=MAX_TLS_INSPECT_BYTES).contains(n))
            .ok_or_else(|| {
                invalid(
                    scope,
                    "tls_inspect.max_bytes",
                    format!(
                        "{n} must be between {MIN_HELLO_LEN} (the smallest ClientHello) and \
                         {MAX_TLS_INSPECT_BYTES}"
                    ),
                )
            })?,
    };
    Ok(Routing {
        timeout,
        max_bytes,
        table,
        routes,
    })
}
