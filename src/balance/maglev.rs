//! The Maglev consistent-hash lookup table (Eisenbud et al., NSDI 2016) with Katran/Envoy-style
//! proportional weights: build once per snapshot, look up in O(1).
//!
//! Owns the table layout and its stability guarantees: backends are sorted by address before
//! filling (config order does not matter), each backend's permutation comes from fixed-seed hashes
//! of its address ([`super::hash`]), so the same set of (address, weight) always gives the same
//! table, on every machine. It does not know about health or load: skipping ineligible backends is
//! [`super::Tables::pick`]'s job. Only [`Maglev::build`] allocates; [`Maglev::lookup`] must stay
//! allocation-free and branch-light. No I/O, clocks or threads.

use std::fmt;
use std::net::SocketAddr;

use super::hash::{addr_bytes, hash64, MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED};

/// A filled Maglev table: `size` slots, each holding the index (in the caller's order) of the
/// backend that owns it. Empty only when no backend has a weight above zero.
#[derive(Clone)]
pub struct Maglev {
    size: u32,
    backends: usize,
    table: Vec<u32>,
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("size", &self.size)
            .field("backends", &self.backends)
            .field("filled", &!self.table.is_empty())
            .finish()
    }
}

/// The paper's permutation of one backend: offset = h1(addr) % M, skip = h2(addr) % (M - 1) + 1,
/// over the address's canonical bytes (IP, then port). With M prime every skip is coprime to M,
/// so the permutation visits every slot.
fn permutation(addr: &SocketAddr, m: u64) -> (u64, u64) {
    let (buf, len) = addr_bytes(addr, true);
    let bytes = &buf[..len];
    let offset = hash64(MAGLEV_OFFSET_SEED, bytes) % m;
    let skip = if m > 1 {
        hash64(MAGLEV_SKIP_SEED, bytes) % (m - 1) + 1
    } else {
        1
    };
    (offset, skip)
}

#[inline]
fn is_set(bits: &[u64], i: u64) -> bool {
    bits[(i >> 6) as usize] & (1 << (i & 63)) != 0
}

impl Maglev {
    /// Builds the table. `table_size` must be prime (config validates it; 0 is treated as 1).
    /// Weight-0 backends get no slot. Indices stored are indices into `backends`.
    ///
    /// Cost: O(M log M) probes for equal weights (the paper's bound); with unequal weights add
    /// O(rounds × N) counter steps, rounds ≤ M · max_weight / Σweight.
    pub fn build(backends: &[(SocketAddr, u32)], table_size: u32) -> Maglev {
        debug_assert!(
            super::is_prime(u64::from(table_size)),
            "maglev table size {table_size} is not prime"
        );
        let size = table_size.max(1);
        let m = u64::from(size);
        // Fill order is address order (stable: duplicate addresses keep config order), so the
        // table depends on the set of backends only.
        let mut order: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].1 > 0).collect();
        order.sort_by(|&a, &b| backends[a].0.cmp(&backends[b].0));
        if order.is_empty() {
            return Maglev {
                size,
                backends: backends.len(),
                table: Vec::new(),
            };
        }

        let k = order.len();
        let mut next = Vec::with_capacity(k); // next candidate slot of each backend
        let mut skip = Vec::with_capacity(k);
        let mut weight = Vec::with_capacity(k);
        for &i in &order {
            let (o, s) = permutation(&backends[i].0, m);
            next.push(o);
            skip.push(s);
            weight.push(u64::from(backends[i].1));
        }
        let max_weight = weight.iter().copied().max().unwrap_or(1);
        let mut cumulative = vec![0u64; k];
        let mut filled = vec![0u64; size.div_ceil(64) as usize];
        let mut table = vec![0u32; size as usize];
        let mut placed = 0u64;

        // Katran's weighted round: every backend adds its weight to a running total and claims
        // its next free preferred slot each time the total reaches the max weight. The heaviest
        // backend claims one per round, so this ends after at most M rounds.
        'fill: loop {
            for j in 0..k {
                cumulative[j] += weight[j];
                if cumulative[j] < max_weight {
                    continue;
                }
                cumulative[j] -= max_weight;
                let slot = claim(&mut filled, &mut next[j], skip[j], m);
                table[slot as usize] = order[j] as u32;
                placed += 1;
                if placed == m {
                    break 'fill;
                }
            }
        }
        Maglev {
            size,
            backends: backends.len(),
            table,
        }
    }

    /// Number of slots (M).
    pub fn size(&self) -> u32 {
        self.size
    }

    /// The backend owning `flow_key % M`, or None if no backend has a weight above zero.
    #[inline]
    pub fn lookup(&self, flow_key: u64) -> Option<usize> {
        self.table
            .get((flow_key % u64::from(self.size)) as usize)
            .map(|&i| i as usize)
    }

    /// The owner of one slot (None if the slot is out of range or the table is empty).
    pub fn slot_owner(&self, slot: u32) -> Option<usize> {
        self.table.get(slot as usize).map(|&i| i as usize)
    }

    /// Slots owned by each backend, indexed like the input of [`Maglev::build`].
    pub fn slots_per_backend(&self) -> Vec<u32> {
        let mut counts = vec![0u32; self.backends];
        for &i in &self.table {
            counts[i as usize] += 1;
        }
        counts
    }

    /// Number of slots whose owning backend ADDRESS differs between two tables (`*_addrs` are the
    /// addresses in each table's input order). Tables of different sizes share no slot mapping:
    /// every slot of the new one counts as moved. An empty table owns no slot, so against a full
    /// one every slot moved.
    pub fn slots_moved(
        old: &Maglev,
        old_addrs: &[SocketAddr],
        new: &Maglev,
        new_addrs: &[SocketAddr],
    ) -> u64 {
        if old.size != new.size {
            return u64::from(new.size);
        }
        (0..old.size)
            .filter(|&s| {
                let was = old.slot_owner(s).and_then(|i| old_addrs.get(i));
                let is = new.slot_owner(s).and_then(|i| new_addrs.get(i));
                was != is
            })
            .count() as u64
    }
}

/// Claims the first free slot on a backend's permutation starting at `*next`, and advances
/// `*next` past it. `m` prime guarantees a free slot is reached within `m` steps while any is
/// left; for a non-prime `m` (a caller bug, caught by the debug assertion in `build`) the
/// permutation may cycle over full slots only, so after `m` probes take the next free slot
/// linearly instead of spinning forever.
#[inline]
fn claim(filled: &mut [u64], next: &mut u64, skip: u64, m: u64) -> u64 {
    let mut p = *next;
    let mut probes = 0u64;
    while is_set(filled, p) {
        p += skip;
        if p >= m {
            p -= m;
        }
        probes += 1;
        if probes >= m {
            while is_set(filled, p) {
                p = if p + 1 == m { 0 } else { p + 1 };
            }
            break;
        }
    }
    filled[(p >> 6) as usize] |= 1 << (p & 63);
    let mut n = p + skip;
    if n >= m {
        n -= m;
    }
    *next = n;
    p
}

#[cfg(test)]
#[path = "maglev_tests.rs"]
mod tests;
