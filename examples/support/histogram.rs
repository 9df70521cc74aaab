//! Fixed-size log-linear latency histogram shared by the load generators in `examples/`
//! (included with `#[path]`; cargo builds no example from this directory: it has no `main.rs`).

// Each example uses a different subset.
#![allow(dead_code)]

use std::time::Duration;

/// Log-linear latency histogram in microseconds: exact below 16 µs, then 16 sub-buckets per
/// power of two (at most 6.25 % relative error), up to 2^36 µs. Fixed size, no allocation, so a
/// hot loop can record every sample.
pub struct Histogram {
    counts: [u64; Histogram::BUCKETS],
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: [0; Self::BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    const SUB_BITS: u32 = 4;
    const SUB: u64 = 1 << Self::SUB_BITS;
    const MAX_EXP: u32 = 36;
    pub const BUCKETS: usize = ((Self::MAX_EXP - Self::SUB_BITS + 2) as u64 * Self::SUB) as usize;

    pub fn index(us: u64) -> usize {
        let us = us.min((1 << (Self::MAX_EXP + 1)) - 1);
        if us < Self::SUB {
            return us as usize;
        }
        let exp = 63 - us.leading_zeros(); // >= SUB_BITS
        let sub = (us >> (exp - Self::SUB_BITS)) & (Self::SUB - 1);
        ((u64::from(exp - Self::SUB_BITS + 1)) * Self::SUB + sub) as usize
    }

    /// Midpoint of the bucket, in µs.
    pub fn value(index: usize) -> u64 {
        let i = index as u64;
        if i < Self::SUB {
            return i;
        }
        let exp = (i / Self::SUB) as u32 + Self::SUB_BITS - 1;
        let width = 1u64 << (exp - Self::SUB_BITS);
        let low = (Self::SUB + i % Self::SUB) << (exp - Self::SUB_BITS);
        low + width / 2
    }

    pub fn record(&mut self, d: Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn record_us(&mut self, us: u64) {
        self.counts[Self::index(us)] += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.total += other.total;
    }

    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::value(i);
            }
        }
        Self::value(Self::BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::Histogram;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_contiguous_and_close() {
        let mut last = 0;
        for us in 0..200_000u64 {
            let i = Histogram::index(us);
            assert!(i == last || i == last + 1, "gap at {us}");
            last = i;
            let v = Histogram::value(i);
            let err = v.abs_diff(us) as f64 / (us.max(1) as f64);
            assert!(us < 16 && v == us || err <= 0.0625, "{us} -> {v}");
        }
        assert!(Histogram::index(u64::MAX) < Histogram::BUCKETS);
    }

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5);
        let p99 = h.quantile(0.99);
        assert!((470..=530).contains(&p50), "p50 {p50}");
        assert!((930..=1050).contains(&p99), "p99 {p99}");
    }
}
