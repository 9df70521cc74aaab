//! The route table of a TLS passthrough listener: which pool a ClientHello goes to.
//!
//! PURE: built once per config (validating every pattern, lowercasing, sorting), then read by
//! workers; [`RouteTable::lookup`] does not allocate (binary searches over sorted names).
//!
//! Matching, in this order:
//! 1. **Name specificity first.** Routes listing the exact server name, then routes with a
//!    wildcard `*.example.com` that covers it, then routes without an `sni` condition.
//!    A wildcard stands for exactly one leftmost label: `*.example.com` matches `a.example.com`,
//!    not `example.com`, not `a.b.example.com` (the name a `*.example.com` certificate covers,
//!    RFC 6125 §6.4.3, so a route never sends a name to a backend whose wildcard certificate
//!    cannot serve it; NGINX and Envoy let `*` span several labels, longest suffix first; list
//!    `*.b.example.com` too for deeper names). Names compare case-insensitively.
//! 2. **Within one level, a route whose `alpn` matches beats one without an `alpn`
//!    condition.** `alpn` matches when the client offers at least one of its protocols
//!    (Envoy's `application_protocols`); ALPN names compare byte for byte (RFC 7301). A route
//!    with an `alpn` condition the client does not meet does not match at all.
//! 3. **Otherwise the first route in file order wins.**
//! 4. Nothing matched → the default route, if there is one; else no route (close and count).
//!
//! A hello without a (valid) server name can only match routes without an `sni` condition.
//! No hello at all (not TLS, too large, malformed, timed out) goes straight to the default.
//! A hello with an ECH extension routes by its outer name like any other: browsers send a
//! GREASE ECH extension on most connections, with the real name as SNI, so treating ECH as "no
//! name" would send nearly every browser to the default; with real ECH the outer name is the
//! client-facing server's public name, which is where the connection must go.
//!
//! Build-time checks: a route needs `sni` or `alpn` (a catch-all is the default route); every
//! pattern must be a valid host name or `*.` + one; an ALPN name is 1..=255 printable ASCII
//! bytes; and a route that an earlier one makes unreachable for some name (same name, and the
//! earlier route's `alpn` covers it) is refused, as Envoy refuses duplicate filter chain matches.

use std::fmt;

use super::hello::Hello;
use super::name::{self, MAX_NAME};

/// One route as the config states it; `pool` is the caller's index of the pool it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    /// Exact names and `*.suffix` wildcards; empty: any name (and no name).
    pub sni: Vec<String>,
    /// ALPN protocol names; empty: no ALPN condition.
    pub alpn: Vec<String>,
    pub pool: usize,
}

/// Which field of a route an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteField {
    /// The route as a whole.
    Route,
    Sni,
    Alpn,
}

/// Why a route table could not be built: the route (index in the given list), the field, the
/// offending value and what is wrong. The config layer words it as
/// `listener "tls": field "routes[1].sni": "a.*.com": ...` from [`RouteError::field_path`] and
/// [`RouteError::problem`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteError {
    pub route: usize,
    pub field: RouteField,
    pub value: String,
    pub reason: String,
}

impl RouteError {
    /// `routes[1].sni` (or `routes[1]` for the route as a whole).
    pub fn field_path(&self) -> String {
        match self.field {
            RouteField::Route => format!("routes[{}]", self.route),
            RouteField::Sni => format!("routes[{}].sni", self.route),
            RouteField::Alpn => format!("routes[{}].alpn", self.route),
        }
    }

    /// `"a.*.com": '*' ...`: the value first, then what is wrong.
    pub fn problem(&self) -> String {
        match self.field {
            RouteField::Route => self.reason.clone(),
            _ => format!("{:?}: {}", self.value, self.reason),
        }
    }
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field_path(), self.problem())
    }
}

impl std::error::Error for RouteError {}

/// A compiled route: its ALPN names as bytes and its pool.
#[derive(Clone, Debug)]
struct Compiled {
    alpn: Box<[Box<[u8]>]>,
    pool: usize,
}

/// Names (lowercase, sorted) with the routes listing them, in file order.
type NameIndex = Box<[(Box<str>, Box<[usize]>)]>;

/// A listener's routes, ready for lookups.
#[derive(Clone, Debug)]
pub struct RouteTable {
    routes: Box<[Compiled]>,
    exact: NameIndex,
    /// Wildcards, keyed by the suffix after `*.`.
    wildcard: NameIndex,
    /// Routes without an `sni` condition, in file order.
    any_name: Box<[usize]>,
    default: Option<usize>,
}

impl RouteTable {
    /// Builds the table from `routes` in file order and the default route's pool.
    pub fn build(routes: &[Route], default: Option<usize>) -> Result<RouteTable, RouteError> {
        let mut compiled = Vec::with_capacity(routes.len());
        let mut exact: Vec<(String, usize)> = Vec::new();
        let mut wildcard: Vec<(String, usize)> = Vec::new();
        let mut any_name = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            if r.sni.is_empty() && r.alpn.is_empty() {
                return Err(RouteError {
                    route: i,
                    field: RouteField::Route,
                    value: String::new(),
                    reason: "a route needs \"sni\" or \"alpn\" (the route that takes everything \
                             else is the default route)"
                        .into(),
                });
            }
            let mut alpn: Vec<Box<[u8]>> = Vec::with_capacity(r.alpn.len());
            for a in &r.alpn {
                check_alpn(a).map_err(|reason| err(i, RouteField::Alpn, a, reason))?;
                if !alpn.iter().any(|x| **x == *a.as_bytes()) {
                    alpn.push(a.as_bytes().into());
                }
            }
            for p in &r.sni {
                let (is_wild, name) =
                    pattern(p).map_err(|reason| err(i, RouteField::Sni, p, reason))?;
                let list = if is_wild { &mut wildcard } else { &mut exact };
                if !list.iter().any(|(n, j)| *j == i && *n == name) {
                    list.push((name, i));
                }
            }
            if r.sni.is_empty() {
                any_name.push(i);
            }
            compiled.push(Compiled {
                alpn: alpn.into_boxed_slice(),
                pool: r.pool,
            });
        }
        let table = RouteTable {
            exact: index(exact),
            wildcard: index(wildcard),
            any_name: any_name.into_boxed_slice(),
            routes: compiled.into_boxed_slice(),
            default,
        };
        table.check_shadowing(routes)?;
        Ok(table)
    }

    /// Whether a listener with this table must read the ClientHello at all. A table with only a
    /// default route never does: server-speaks-first protocols behind it must not wait.
    pub fn needs_inspect(&self) -> bool {
        !self.routes.is_empty()
    }

    /// The default route's pool.
    pub fn default_pool(&self) -> Option<usize> {
        self.default
    }

    /// The pool for a connection: `hello` is `None` when there is no ClientHello to go by (not
    /// TLS, too large, malformed, timed out). No allocation.
    pub fn lookup(&self, hello: Option<&Hello>) -> Option<usize> {
        let Some(hello) = hello else {
            return self.default;
        };
        if let Some(sni) = hello.sni.as_deref() {
            if let Some(r) = self.pick(find(&self.exact, sni), hello) {
                return Some(r);
            }
            if let Some((_, suffix)) = sni.split_once('.') {
                if let Some(r) = self.pick(find(&self.wildcard, suffix), hello) {
                    return Some(r);
                }
            }
        }
        self.pick(&self.any_name, hello).or(self.default)
    }

    /// Among routes of one name level (file order): the first whose ALPN the client meets,
    /// else the first without an ALPN condition.
    fn pick(&self, candidates: &[usize], hello: &Hello) -> Option<usize> {
        let mut plain = None;
        for &i in candidates {
            let r = self.routes.get(i)?;
            if r.alpn.is_empty() {
                plain = plain.or(Some(r.pool));
            } else if r.alpn.iter().any(|a| hello.alpn.iter().any(|h| **a == **h)) {
                return Some(r.pool);
            }
        }
        plain
    }

    /// Refuses a route that an earlier route makes unreachable for one of its names: both
    /// without ALPN, or the earlier one's ALPN a superset of this one's.
    fn check_shadowing(&self, routes: &[Route]) -> Result<(), RouteError> {
        let shadows = |earlier: usize, later: usize| {
            let (a, b) = (&self.routes[earlier].alpn, &self.routes[later].alpn);
            a.is_empty() == b.is_empty() && b.iter().all(|x| a.contains(x))
        };
        let levels = [(&self.exact, false), (&self.wildcard, true)];
        for (index, wild) in levels {
            for (name, ids) in index.iter() {
                for (k, &later) in ids.iter().enumerate() {
                    if let Some(&earlier) = ids[..k].iter().find(|&&e| shadows(e, later)) {
                        // Name the pattern as the operator wrote it.
                        let raw = routes[later]
                            .sni
                            .iter()
                            .find(|p| pattern(p).is_ok_and(|(w, n)| w == wild && *n == **name))
                            .cloned()
                            .unwrap_or_default();
                        return Err(err(later, RouteField::Sni, &raw, &shadow_reason(earlier)));
                    }
                }
            }
        }
        for (k, &later) in self.any_name.iter().enumerate() {
            if let Some(&earlier) = self.any_name[..k].iter().find(|&&e| shadows(e, later)) {
                let alpn = routes[later].alpn.join(",");
                return Err(err(later, RouteField::Alpn, &alpn, &shadow_reason(earlier)));
            }
        }
        Ok(())
    }
}

fn shadow_reason(earlier: usize) -> String {
    format!(
        "routes[{earlier}] already takes every connection this route would (same name, and its \
         alpn covers this one's), so this route could never be chosen"
    )
}

fn err(route: usize, field: RouteField, value: &str, reason: &str) -> RouteError {
    RouteError {
        route,
        field,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// A pattern's kind and normalised name: `(true, "example.com")` for `*.example.com`.
fn pattern(p: &str) -> Result<(bool, String), &'static str> {
    let (wild, rest) = match p.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None if p == "*" => {
            return Err(
                "'*' alone matches nothing here: write \"*.example.com\", or use the \
                        default route to catch every name",
            )
        }
        None => (false, p),
    };
    let mut out = [0u8; MAX_NAME];
    let n = name::normalize(rest.as_bytes(), &mut out).map_err(|e| match e {
        name::NameError::BadByte(b'*') => {
            "'*' is allowed only as the whole leftmost label, as in \"*.example.com\""
        }
        e => e.reason(),
    })?;
    let name = std::str::from_utf8(&out[..n]).map_err(|_| "not ASCII")?;
    Ok((wild, name.to_string()))
}

fn check_alpn(a: &str) -> Result<(), &'static str> {
    if a.is_empty() || a.len() > 255 {
        return Err("an ALPN protocol name is 1 to 255 bytes");
    }
    if !a.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an ALPN protocol name here is printable ASCII without spaces, like \"h2\"");
    }
    Ok(())
}

/// Sorts `(name, route)` pairs into a name index; routes stay in file order within a name.
fn index(mut pairs: Vec<(String, usize)>) -> NameIndex {
    pairs.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut out: Vec<(Box<str>, Box<[usize]>)> = Vec::new();
    let mut i = 0;
    while i < pairs.len() {
        let j = i + pairs[i..].iter().take_while(|p| p.0 == pairs[i].0).count();
        let ids: Vec<usize> = pairs[i..j].iter().map(|p| p.1).collect();
        out.push((pairs[i].0.as_str().into(), ids.into_boxed_slice()));
        i = j;
    }
    out.into_boxed_slice()
}

/// The routes listing `name` (case-insensitively), or none.
fn find<'a>(index: &'a NameIndex, name: &str) -> &'a [usize] {
    match index.binary_search_by(|(n, _)| name::cmp_ignore_case(n.as_bytes(), name.as_bytes())) {
        Ok(i) => &index[i].1,
        Err(_) => &[],
    }
}
