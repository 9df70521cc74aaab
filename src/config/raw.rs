//! Serde mirror of the TOML config file, exactly as written by the operator.
//!
//! Owns the file's shape: section and field names, and which fields exist at all
//! (`deny_unknown_fields` everywhere, so a misspelt field is an error with a line and column, not
//! a silently ignored setting). It must hold NO logic: every field is optional, durations,
//! addresses and enum names stay strings, integers stay `i64` (TOML's integer type, so that an
//! out-of-range value reaches validation and gets a message naming the listener and field).
//! Defaults and checks live in `config/mod.rs`.

use serde::Deserialize;

// Durations stay strings; this only turns a bare number (`idle_timeout = 5`) into an error that
// suggests the quoted form (`"5s"`).
use super::duration::deserialize_text as duration_text;

/// The whole file: `[runtime]`, `[admin]`, `[[listeners]]`, `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub runtime: Option<RawRuntime>,
    pub admin: Option<RawAdmin>,
    pub listeners: Option<Vec<RawListener>>,
    pub log: Option<RawLog>,
    pub dns: Option<RawDns>,
}

/// `[dns]`: how discovery names and host-name backends are resolved.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub resolvers: Option<Vec<String>>,
    #[serde(default, deserialize_with = "duration_text")]
    pub refresh: Option<String>,
    pub respect_ttl: Option<bool>,
    #[serde(default, deserialize_with = "duration_text")]
    pub hold: Option<String>,
}

/// A pool's `discovery = { name = "...", type = "SRV", port = 8080, refresh = "5s" }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub port: Option<i64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub refresh: Option<String>,
    pub weight: Option<i64>,
    pub max_connections: Option<i64>,
}

/// `[runtime]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    pub workers: Option<i64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub drain_timeout: Option<String>,
    pub io: Option<String>,
}

/// `[admin]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub bind: Option<String>,
    pub token_file: Option<String>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub access_log: Option<String>,
}

/// One `[[listeners]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: Option<String>,
    pub bind: Option<String>,
    pub protocol: Option<String>,
    pub balance: Option<String>,
    pub hash_key: Option<String>,
    pub maglev_table_size: Option<i64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub connect_timeout: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub max_flows: Option<i64>,
    pub access_log: Option<bool>,
    #[serde(default, deserialize_with = "duration_text")]
    pub drain_timeout: Option<String>,
    pub on_backend_down: Option<String>,
    pub drain_mode: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub tcp_keepalive: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub queue_timeout: Option<String>,
    pub proxy_protocol: Option<String>,
    pub accept_proxy_protocol: Option<bool>,
    pub accept_proxy_protocol_from: Option<Vec<String>>,
    #[serde(default, deserialize_with = "duration_text")]
    pub proxy_protocol_timeout: Option<String>,
    pub health: Option<RawHealth>,
    pub passive: Option<RawPassive>,
    pub backends: Option<Vec<RawBackend>>,
    pub discovery: Option<RawDiscovery>,
    #[serde(default, deserialize_with = "duration_text")]
    pub slow_start: Option<String>,
    /// `tls_inspect = { timeout = "5s", max_bytes = 16384 }`: how long and how far to read a
    /// ClientHello (TLS passthrough routing).
    pub tls_inspect: Option<RawTlsInspect>,
    /// `routes = [ { sni = [...], alpn = [...], pool = "api" }, { default = true, pool = "web" } ]`.
    pub routes: Option<Vec<RawRoute>>,
    /// `[[listeners.pools]]`: named backend pools that routes choose between.
    pub pools: Option<Vec<RawPool>>,
}

/// The fields that describe one pool of backends. A listener's own fields of these names are
/// its implicit pool (`RawListener::take_pool`); a `[[listeners.pools]]` table has the same
/// fields plus `name`. Both validate through `config::pool`, so a field added here (and to the
/// two tables below) is a field of every pool.
#[derive(Debug, Default)]
pub struct RawPoolFields {
    pub balance: Option<String>,
    pub hash_key: Option<String>,
    pub maglev_table_size: Option<i64>,
    pub health: Option<RawHealth>,
    pub passive: Option<RawPassive>,
    pub backends: Option<Vec<RawBackend>>,
    pub discovery: Option<RawDiscovery>,
    pub slow_start: Option<String>,
}

impl RawPoolFields {
    /// Whether any pool field is set.
    pub fn any_set(&self) -> bool {
        self.balance.is_some()
            || self.hash_key.is_some()
            || self.maglev_table_size.is_some()
            || self.health.is_some()
            || self.passive.is_some()
            || self.backends.is_some()
            || self.discovery.is_some()
            || self.slow_start.is_some()
    }

    /// The first pool field set, by name (for "set, but this listener has no pool of its own").
    pub fn first_set(&self) -> Option<&'static str> {
        [
            ("backends", self.backends.is_some()),
            ("discovery", self.discovery.is_some()),
            ("balance", self.balance.is_some()),
            ("hash_key", self.hash_key.is_some()),
            ("maglev_table_size", self.maglev_table_size.is_some()),
            ("health", self.health.is_some()),
            ("passive", self.passive.is_some()),
            ("slow_start", self.slow_start.is_some()),
        ]
        .into_iter()
        .find_map(|(n, set)| set.then_some(n))
    }
}

impl RawListener {
    /// Moves the listener's own pool fields out (its implicit pool).
    pub fn take_pool(&mut self) -> RawPoolFields {
        RawPoolFields {
            balance: self.balance.take(),
            hash_key: self.hash_key.take(),
            maglev_table_size: self.maglev_table_size.take(),
            health: self.health.take(),
            passive: self.passive.take(),
            backends: self.backends.take(),
            discovery: self.discovery.take(),
            slow_start: self.slow_start.take(),
        }
    }
}

/// One `[[listeners.pools]]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: Option<String>,
    pub balance: Option<String>,
    pub hash_key: Option<String>,
    pub maglev_table_size: Option<i64>,
    pub health: Option<RawHealth>,
    pub passive: Option<RawPassive>,
    pub backends: Option<Vec<RawBackend>>,
    pub discovery: Option<RawDiscovery>,
    #[serde(default, deserialize_with = "duration_text")]
    pub slow_start: Option<String>,
}

impl RawPool {
    /// Splits the table into its name and its pool fields.
    pub fn into_parts(self) -> (Option<String>, RawPoolFields) {
        (
            self.name,
            RawPoolFields {
                balance: self.balance,
                hash_key: self.hash_key,
                maglev_table_size: self.maglev_table_size,
                health: self.health,
                passive: self.passive,
                backends: self.backends,
                discovery: self.discovery,
                slow_start: self.slow_start,
            },
        )
    }
}

/// `tls_inspect = { timeout = "5s", max_bytes = 16384 }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTlsInspect {
    #[serde(default, deserialize_with = "duration_text")]
    pub timeout: Option<String>,
    pub max_bytes: Option<i64>,
}

/// One entry of `routes`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub sni: Option<Vec<String>>,
    pub alpn: Option<Vec<String>>,
    pub default: Option<bool>,
    pub pool: Option<String>,
}

/// A listener's `[listeners.health]` table: active health checks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    #[serde(default, deserialize_with = "duration_text")]
    pub interval: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub timeout: Option<String>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
    pub send: Option<String>,
    pub expect: Option<String>,
    pub http: Option<RawHttp>,
    pub port: Option<i64>,
    pub address: Option<String>,
    pub flap_threshold: Option<i64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub flap_window: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub flap_hold: Option<String>,
    /// `[listeners.health.ready]`: the readiness check (same fields; `ready` and the `flap_*`
    /// fields are refused inside it by validation).
    pub ready: Option<Box<RawHealth>>,
}

/// `http = { path = "/primary", expect_status = [200], host = "...", body_prefix = "..." }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    pub path: Option<String>,
    pub host: Option<String>,
    pub expect_status: Option<Vec<i64>>,
    pub body_prefix: Option<String>,
}

/// A listener's `[listeners.passive]` table: ejection after connect failures.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    pub consecutive_failures: Option<i64>,
    #[serde(default, deserialize_with = "duration_text")]
    pub base_ejection_time: Option<String>,
    #[serde(default, deserialize_with = "duration_text")]
    pub max_ejection_time: Option<String>,
    pub max_ejected_percent: Option<i64>,
}

/// One entry of a listener's `backends = [ { address = "...", weight = 2, max_connections = 100 } ]`
/// (or, equivalently, one `[[listeners.backends]]` table).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: Option<String>,
    pub weight: Option<i64>,
    pub max_connections: Option<i64>,
    pub backup: Option<bool>,
}
