//! Fixed-seed hashing for balancing: the one byte hash ([`hash64`]), the client flow key
//! ([`flow_key`]), the Maglev backend permutation hashes and the picker PRNG ([`Rng`]).
//!
//! Everything here must give the same value in every process, on every machine and in every
//! version: a flow key decides which backend a client lands on, and Maglev tables built by two
//! ringlb instances (or before and after a restart) only agree if these functions do. So: constant
//! seeds, no `RandomState`/`DefaultHasher`, no pointer or platform dependent input, little-endian
//! word loads. CHANGING ANY FUNCTION OR CONSTANT HERE MOVES EVERY KEY TO A DIFFERENT BACKEND; the
//! golden tests below (and the Maglev table digest) exist to make such a change deliberate.
//!
//! The hash is not keyed against adversaries: a client choosing its source address can choose its
//! backend, exactly as with Katran or any fixed-seed consistent hash. It must not do I/O, read
//! clocks or allocate.

use std::net::{IpAddr, SocketAddr};

use super::HashKey;

// xxHash64's primes: odd, with well-spread bits.
const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;

/// Seed of [`flow_key`] ("ringlb.f").
pub const FLOW_SEED: u64 = 0x7269_6e67_6c62_2e66;
/// Seed of the Maglev permutation offset hash h1 ("ringlb.o").
pub const MAGLEV_OFFSET_SEED: u64 = 0x7269_6e67_6c62_2e6f;
/// Seed of the Maglev permutation skip hash h2 ("ringlb.s").
pub const MAGLEV_SKIP_SEED: u64 = 0x7269_6e67_6c62_2e73;

/// Stafford's "Mix13" 64-bit finalizer (the output function of splitmix64): a bijection whose
/// every output bit depends on every input bit.
#[inline]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[inline]
fn round(h: u64, word: u64) -> u64 {
    (h ^ mix64(word.wrapping_mul(P2)))
        .rotate_left(27)
        .wrapping_mul(P1)
        .wrapping_add(P3)
}

/// Fixed-seed 64-bit hash of `bytes`: xxHash64-style rounds over little-endian 8-byte words
/// (the tail zero-padded, the length folded into the initial state so padding cannot collide),
/// finished with [`mix64`]. Meant for short inputs (addresses: 4 to 18 bytes).
pub fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = seed
        .wrapping_add(P3)
        .wrapping_add((bytes.len() as u64).wrapping_mul(P1));
    for chunk in bytes.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = round(h, u64::from_le_bytes(word));
    }
    mix64(h)
}

/// The canonical bytes of an address: IPv4 (and IPv4-mapped IPv6, `::ffff:a.b.c.d`) as its 4
/// bytes, other IPv6 as its 16 bytes, then optionally the port big-endian. Returns a buffer and
/// the used length (no allocation).
pub fn addr_bytes(addr: &SocketAddr, with_port: bool) -> ([u8; 18], usize) {
    let mut buf = [0u8; 18];
    let mut len = match addr.ip() {
        IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                buf[..4].copy_from_slice(&v4.octets());
                4
            }
            None => {
                buf[..16].copy_from_slice(&v6.octets());
                16
            }
        },
    };
    if with_port {
        buf[len..len + 2].copy_from_slice(&addr.port().to_be_bytes());
        len += 2;
    }
    (buf, len)
}

/// Fixed-seed 64-bit hash of the client address per `key` (IP only, or IP and port). Identical in
/// every process, machine and version (see the golden test); an IPv4-mapped IPv6 client hashes
/// like the IPv4 one.
pub fn flow_key(client: &SocketAddr, key: HashKey) -> u64 {
    let (buf, len) = addr_bytes(client, key == HashKey::SourceIpPort);
    hash64(FLOW_SEED, &buf[..len])
}

/// The `attempt`-th alternative key for a flow whose first choice was not eligible. Deterministic,
/// so a given flow retries the same backends in the same order.
#[inline]
pub fn perturb(flow_key: u64, attempt: u32) -> u64 {
    mix64(flow_key ^ u64::from(attempt).wrapping_mul(P1))
}

/// The picker PRNG: splitmix64 (Steele, Lea, Flood 2014). Any seed, including 0, is fine; 2^64
/// period; not cryptographic (it only spreads load).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; bias below 2^-32 for the n used here). `n > 0`.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// GOLDEN: these values decide which backend every deployed client lands on (with Maglev, and
    /// with any external system that reproduces them). If this test fails, the hash changed and
    /// every key moves: change the constants only deliberately, and say so in the release notes.
    #[test]
    fn flow_key_golden() {
        let cases: [(&str, HashKey, u64); 6] = [
            ("192.0.2.1:40000", HashKey::SourceIp, 0x6498_3cf3_0a26_ae93),
            (
                "192.0.2.1:40000",
                HashKey::SourceIpPort,
                0xc42a_cf22_762f_95ab,
            ),
            ("10.0.0.7:1", HashKey::SourceIpPort, 0xd52d_4a09_1427_61bb),
            (
                "[2001:db8::1]:443",
                HashKey::SourceIp,
                0x0f1b_b5d8_c632_c282,
            ),
            (
                "[2001:db8::1]:443",
                HashKey::SourceIpPort,
                0x0578_51a7_8f0e_e7b8,
            ),
            ("0.0.0.0:0", HashKey::SourceIpPort, 0x1419_3ee2_81cd_5548),
        ];
        for (addr, key, want) in cases {
            let got = flow_key(&sa(addr), key);
            assert_eq!(got, want, "flow_key({addr}, {key:?}) = {got:#018x}");
        }
        assert_eq!(hash64(0, b""), 0xb393_62cb_9460_13e3, "hash64(0, \"\")");
    }

    #[test]
    fn ipv4_mapped_hashes_like_ipv4() {
        for key in [HashKey::SourceIp, HashKey::SourceIpPort] {
            assert_eq!(
                flow_key(&sa("[::ffff:192.0.2.1]:5000"), key),
                flow_key(&sa("192.0.2.1:5000"), key)
            );
        }
    }

    #[test]
    fn key_kind_matters() {
        let a = sa("192.0.2.1:5000");
        let b = sa("192.0.2.1:5001");
        assert_eq!(
            flow_key(&a, HashKey::SourceIp),
            flow_key(&b, HashKey::SourceIp)
        );
        assert_ne!(
            flow_key(&a, HashKey::SourceIpPort),
            flow_key(&b, HashKey::SourceIpPort)
        );
        assert_ne!(
            flow_key(&a, HashKey::SourceIp),
            flow_key(&a, HashKey::SourceIpPort)
        );
    }

    #[test]
    fn hash_spreads_sequential_addresses() {
        // Consecutive client ports must not cluster: bucket 64k of them into 16 buckets.
        let mut buckets = [0u32; 16];
        for port in 0..65_536u32 {
            let a = SocketAddr::from(([198, 51, 100, 9], port as u16));
            buckets[(flow_key(&a, HashKey::SourceIpPort) >> 60) as usize] += 1;
        }
        for b in buckets {
            assert!((3_800..=4_400).contains(&b), "bucket {b} far from 4096");
        }
    }

    #[test]
    fn perturb_differs_per_attempt() {
        let k = 0x1234_5678_9abc_def0;
        let alts: Vec<u64> = (1..=8).map(|a| perturb(k, a)).collect();
        for (i, x) in alts.iter().enumerate() {
            assert_ne!(*x, k);
            assert!(!alts[..i].contains(x));
        }
    }

    #[test]
    fn rng_below_in_range_and_seeded() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for n in 1..1_000u64 {
            let x = a.below(n);
            assert!(x < n);
            assert_eq!(x, b.below(n));
        }
    }
}
