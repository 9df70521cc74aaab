//! Backend selection: the closed set of balancing [`Policy`]s, the immutable per-snapshot lookup
//! [`Tables`] they need (built by the control plane) and the per-worker [`PickState`] (cursors,
//! PRNG). [`Tables::pick`] is the one place policies are matched.
//!
//! PURE: no I/O, no clocks, no threads, no `unsafe`, and no allocation on any pick path (only the
//! `build` functions allocate). Health, connection limits and "already tried for this connection"
//! are not known here: the caller folds them into `eligible(i)`, and passes live connection counts
//! as `load(i)`. Every pick is bounded (O(1) expected, O(N) worst case), never loops unboundedly.
//!
//! Files: `hash.rs` fixed-seed hashing and the PRNG; `maglev.rs` the Maglev table; `rr.rs` smooth
//! weighted round robin; `least_conn.rs` least connections; `random.rs` weighted random and P2C.

use std::fmt;
use std::net::SocketAddr;

pub mod hash;
mod least_conn;
pub mod maglev;
mod random;
mod rr;

pub use hash::flow_key;
pub use maglev::Maglev;

/// Maglev lookup-table size used when the config does not set one (prime; ~650 slots per backend
/// at 100 backends).
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 65537;
/// Largest accepted Maglev table size (Envoy's cap; 20 MB of table).
pub const MAX_MAGLEV_TABLE_SIZE: u32 = 5_000_011;
/// Alternative keys tried by Maglev when the looked-up backend is ineligible, before the least
/// connections fallback.
pub const MAGLEV_RETRIES: u32 = 8;

/// A balancing policy (config name in parentheses of each variant's doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// `round_robin`: smooth weighted round robin.
    RoundRobin,
    /// `least_connections`: lowest active connections / weight, ties rotate. O(N) per pick.
    LeastConnections,
    /// `random`: weighted random.
    Random,
    /// `power_of_two`: the lower load/weight of two distinct weighted random draws.
    PowerOfTwo,
    /// `maglev`: consistent hashing of the client address.
    Maglev,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::RoundRobin,
        Policy::LeastConnections,
        Policy::Random,
        Policy::PowerOfTwo,
        Policy::Maglev,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastConnections => "least_connections",
            Policy::Random => "random",
            Policy::PowerOfTwo => "power_of_two",
            Policy::Maglev => "maglev",
        }
    }

    pub fn from_name(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What part of the client address a flow key hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// `source_ip`: every connection of a client goes to the same backend.
    SourceIp,
    /// `source_ip_port`: per connection (or UDP flow).
    SourceIpPort,
}

impl HashKey {
    pub const ALL: [HashKey; 2] = [HashKey::SourceIp, HashKey::SourceIpPort];

    pub fn name(self) -> &'static str {
        match self {
            HashKey::SourceIp => "source_ip",
            HashKey::SourceIpPort => "source_ip_port",
        }
    }

    pub fn from_name(s: &str) -> Option<HashKey> {
        HashKey::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Deterministic primality for every u64 (Miller–Rabin with the first 12 prime bases, which has no
/// pseudoprime below 3.3e24). Microseconds for table sizes.
pub fn is_prime(n: u64) -> bool {
    const BASES: [u64; 12] = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37];
    if n < 2 {
        return false;
    }
    for p in BASES {
        if n % p == 0 {
            return n == p;
        }
    }
    let mul = |a: u64, b: u64| (u128::from(a) * u128::from(b) % u128::from(n)) as u64;
    let pow = |mut b: u64, mut e: u64| {
        let mut r = 1u64;
        while e > 0 {
            if e & 1 == 1 {
                r = mul(r, b);
            }
            b = mul(b, b);
            e >>= 1;
        }
        r
    };
    let s = (n - 1).trailing_zeros();
    let d = (n - 1) >> s;
    'bases: for a in BASES {
        let mut x = pow(a, d);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = mul(x, x);
            if x == n - 1 {
                continue 'bases;
            }
        }
        return false;
    }
    true
}

/// The immutable per-snapshot picker data: weights plus whichever precomputed table the policy
/// uses (smooth WRR period, alias table or Maglev table). Built once by the control plane (may
/// allocate, may take milliseconds); read concurrently by every worker. Indices everywhere are
/// indices into the `backends` slice given to [`Tables::build`], in the caller's order.
#[derive(Clone)]
pub struct Tables {
    policy: Policy,
    weights: Vec<u32>,
    rr: Vec<u32>,
    alias: random::Alias,
    maglev: Option<Maglev>,
}

impl fmt::Debug for Tables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tables")
            .field("policy", &self.policy)
            .field("weights", &self.weights)
            .field("rr_period", &self.rr.len())
            .field("maglev", &self.maglev)
            .finish()
    }
}

impl Tables {
    /// `backends`: (address, weight). Weight 0 means "never pick" (drain); all weights 0 is allowed
    /// (every pick returns None). `maglev_table_size` must be prime (the config validates it) and
    /// is only used for [`Policy::Maglev`].
    pub fn build(policy: Policy, backends: &[(SocketAddr, u32)], maglev_table_size: u32) -> Tables {
        let weights: Vec<u32> = backends.iter().map(|&(_, w)| w).collect();
        let mut tables = Tables {
            policy,
            rr: Vec::new(),
            alias: random::Alias::default(),
            maglev: None,
            weights,
        };
        match policy {
            Policy::RoundRobin => tables.rr = rr::sequence(&tables.weights),
            Policy::Random | Policy::PowerOfTwo => {
                tables.alias = random::Alias::build(&tables.weights)
            }
            Policy::Maglev => tables.maglev = Some(Maglev::build(backends, maglev_table_size)),
            Policy::LeastConnections => {}
        }
        tables
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Number of backends (including weight-0 ones).
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// Weight of each backend, in the caller's order.
    pub fn weights(&self) -> &[u32] {
        &self.weights
    }

    /// The Maglev table (Some only for [`Policy::Maglev`]).
    pub fn maglev(&self) -> Option<&Maglev> {
        self.maglev.as_ref()
    }

    /// Picks a backend. `eligible(i)` is false for backends that are down, excluded (already tried
    /// for this connection) or full; `load(i)` is the backend's active connection count across all
    /// workers. `flow_key` ([`flow_key`]) only matters for Maglev.
    ///
    /// Returns None iff no eligible backend with weight > 0 exists. Bounded: O(1) expected for
    /// every policy but least connections (O(N)); O(N) worst case when most backends are
    /// ineligible. Never allocates.
    pub fn pick(
        &self,
        st: &mut PickState,
        flow_key: u64,
        eligible: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
    ) -> Option<usize> {
        match self.policy {
            Policy::RoundRobin => rr::pick(&self.rr, &self.weights, st, eligible),
            Policy::LeastConnections => least_conn::pick(&self.weights, st, eligible, load),
            Policy::Random => random::pick(&self.alias, &self.weights, &mut st.rng, eligible),
            Policy::PowerOfTwo => random::pick_two(&self.alias, &self.weights, st, eligible, load),
            Policy::Maglev => self.pick_maglev(st, flow_key, eligible, load),
        }
    }

    /// The table's owner of the key if eligible, else of up to [`MAGLEV_RETRIES`] perturbed keys
    /// (deterministic per key, so a flow whose backend is down keeps landing on the same
    /// substitute), else least connections over the eligible backends.
    fn pick_maglev(
        &self,
        st: &mut PickState,
        flow_key: u64,
        eligible: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
    ) -> Option<usize> {
        let table = self.maglev.as_ref()?;
        let mut key = flow_key;
        for attempt in 1..=MAGLEV_RETRIES + 1 {
            let i = table.lookup(key)?;
            if eligible(i) {
                return Some(i);
            }
            key = hash::perturb(flow_key, attempt);
        }
        least_conn::pick(&self.weights, st, eligible, load)
    }
}

/// Per-worker, per-listener mutable picker state: round-robin cursor, least-connections tie-break
/// cursor, PRNG. Kept by the caller across snapshots, so every cursor is reduced modulo the current
/// table's length at use. Seed each worker differently: the cursors start at seed-derived offsets
/// so workers do not walk the round-robin period in lockstep.
#[derive(Clone, Debug)]
pub struct PickState {
    rr_cursor: u64,
    lc_cursor: u64,
    rng: hash::Rng,
}

impl PickState {
    /// Positions the round-robin cursor (callers that share one ticket counter across workers
    /// set it from that counter before each pick, so the smooth WRR sequence is global).
    pub fn set_rr_cursor(&mut self, cursor: u64) {
        self.rr_cursor = cursor;
    }

    pub fn new(seed: u64) -> PickState {
        let mut rng = hash::Rng::new(seed);
        PickState {
            rr_cursor: rng.next_u64(),
            lc_cursor: rng.next_u64(),
            rng,
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
