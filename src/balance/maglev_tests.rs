//! Property and golden tests of the Maglev table (no I/O; fixed inputs and seeds only).

use super::*;
use crate::balance::hash::Rng;

const M: u32 = 65537;

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 8000 + (i % 7) as u16))
}

/// N backends with mixed weights 1..=4.
fn pool(n: usize) -> Vec<(SocketAddr, u32)> {
    (0..n).map(|i| (addr(i), 1 + (i % 4) as u32)).collect()
}

fn addrs(backends: &[(SocketAddr, u32)]) -> Vec<SocketAddr> {
    backends.iter().map(|b| b.0).collect()
}

/// The owner address of every slot.
fn owners(t: &Maglev, backends: &[(SocketAddr, u32)]) -> Vec<SocketAddr> {
    (0..t.size())
        .map(|s| backends[t.slot_owner(s).unwrap()].0)
        .collect()
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = Rng::new(seed);
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

#[test]
fn no_empty_slot() {
    for n in [1, 2, 3, 10, 37, 100] {
        let b = pool(n);
        let t = Maglev::build(&b, M);
        assert_eq!(t.size(), M);
        assert_eq!(t.table.len(), M as usize);
        assert!(t.table.iter().all(|&i| (i as usize) < n));
        assert_eq!(
            t.slots_per_backend()
                .iter()
                .map(|&c| u64::from(c))
                .sum::<u64>(),
            u64::from(M)
        );
    }
}

#[test]
fn shares_within_one_percent_of_weight() {
    for n in [1, 2, 3, 10, 37, 100] {
        let b = pool(n);
        let total: u32 = b.iter().map(|x| x.1).sum();
        let slots = Maglev::build(&b, M).slots_per_backend();
        for (i, &(_, w)) in b.iter().enumerate() {
            let got = f64::from(slots[i]) / f64::from(M);
            let want = f64::from(w) / f64::from(total);
            assert!(
                (got - want).abs() <= 0.01,
                "N={n} backend {i} weight {w}: share {got:.4} want {want:.4}"
            );
        }
    }
}

#[test]
fn shares_exact_to_a_few_slots_for_equal_weights() {
    // Tighter than the 1% property: equal weights differ by at most one round's worth of slots.
    let b: Vec<_> = (0..10).map(|i| (addr(i), 1)).collect();
    for c in Maglev::build(&b, M).slots_per_backend() {
        assert!(c.abs_diff(M / 10) <= 1, "{c}");
    }
}

#[test]
fn removing_one_moves_almost_only_its_slots() {
    for n in [10, 50, 100] {
        let b = pool(n);
        let old = Maglev::build(&b, M);
        let old_owner = owners(&old, &b);
        for removed in [0, n / 2, n - 1] {
            let mut smaller = b.clone();
            let gone = smaller.remove(removed).0;
            let new = Maglev::build(&smaller, M);
            let new_owner = owners(&new, &smaller);
            let kept: Vec<usize> = (0..M as usize).filter(|&s| old_owner[s] != gone).collect();
            let moved = kept
                .iter()
                .filter(|&&s| old_owner[s] != new_owner[s])
                .count();
            assert!(
                moved as f64 <= 0.01 * kept.len() as f64,
                "N={n} removed #{removed}: {moved} of {} surviving slots moved",
                kept.len()
            );
            // slots_moved counts the removed backend's slots plus those.
            let total = Maglev::slots_moved(&old, &addrs(&b), &new, &addrs(&smaller));
            assert_eq!(total as usize, moved + (M as usize - kept.len()));
        }
    }
}

#[test]
fn adding_one_moves_about_its_share() {
    // Every slot the newcomer owns must move (≈ M·w/Σw); Maglev's extra "collateral" moves between
    // old backends are what the paper measures as small when M ≫ N. We allow 1% of M on top,
    // the same bound as for removal (adding is removal run backwards).
    for n in [10, 50, 100] {
        let b = pool(n);
        let mut bigger = b.clone();
        bigger.push((addr(n), 2));
        let old = Maglev::build(&b, M);
        let new = Maglev::build(&bigger, M);
        let newcomer = u64::from(new.slots_per_backend()[n]);
        let moved = Maglev::slots_moved(&old, &addrs(&b), &new, &addrs(&bigger));
        let total: u32 = bigger.iter().map(|x| x.1).sum();
        let share = u64::from(M) * 2 / u64::from(total);
        assert!(
            newcomer.abs_diff(share) <= u64::from(M) / 100,
            "N={n}: {newcomer} vs {share}"
        );
        assert!(moved >= newcomer);
        assert!(
            moved - newcomer <= u64::from(M) / 100,
            "N={n}: moved {moved}, newcomer owns {newcomer}"
        );
    }
}

#[test]
fn order_does_not_matter() {
    for n in [3, 10, 100] {
        let b = pool(n);
        let want = owners(&Maglev::build(&b, M), &b);
        for seed in 1..4 {
            let mut shuffled = b.clone();
            shuffle(&mut shuffled, seed);
            assert_eq!(
                owners(&Maglev::build(&shuffled, M), &shuffled),
                want,
                "seed {seed}"
            );
            assert_eq!(
                Maglev::slots_moved(
                    &Maglev::build(&b, M),
                    &addrs(&b),
                    &Maglev::build(&shuffled, M),
                    &addrs(&shuffled)
                ),
                0
            );
        }
    }
}

#[test]
fn weight_zero_gets_no_slot() {
    let mut b = pool(5);
    b[2].1 = 0;
    let slots = Maglev::build(&b, M).slots_per_backend();
    assert_eq!(slots[2], 0);
    assert!(slots.iter().enumerate().all(|(i, &c)| i == 2 || c > 0));

    let drained: Vec<_> = b.iter().map(|&(a, _)| (a, 0)).collect();
    let empty = Maglev::build(&drained, M);
    assert_eq!(empty.lookup(12345), None);
    assert_eq!(empty.slots_per_backend(), vec![0; 5]);
    assert_eq!(Maglev::build(&[], M).lookup(0), None);
    // Against an empty table every slot moved.
    let full = Maglev::build(&b, M);
    assert_eq!(
        Maglev::slots_moved(&empty, &addrs(&b), &full, &addrs(&b)),
        u64::from(M)
    );
}

#[test]
fn slots_moved_edges() {
    let b = pool(10);
    let t = Maglev::build(&b, M);
    assert_eq!(Maglev::slots_moved(&t, &addrs(&b), &t, &addrs(&b)), 0);
    let other = Maglev::build(&b, 65521);
    assert_eq!(
        Maglev::slots_moved(&t, &addrs(&b), &other, &addrs(&b)),
        65521
    );
}

#[test]
fn small_prime_sizes_and_ipv6() {
    let b: Vec<(SocketAddr, u32)> = vec![
        ("[2001:db8::1]:80".parse().unwrap(), 1),
        ("[2001:db8::2]:80".parse().unwrap(), 3),
        ("192.0.2.1:80".parse().unwrap(), 2),
    ];
    for m in [2, 3, 5, 7, 13, 251] {
        let t = Maglev::build(&b, m);
        assert_eq!(t.table.len(), m as usize);
        assert!(t.table.iter().all(|&i| i < 3));
    }
    let t = Maglev::build(&b, M);
    let s = t.slots_per_backend();
    assert!(s[1] > s[2] && s[2] > s[0], "{s:?}");
}

#[test]
fn lookup_is_slot_of_key_mod_m() {
    let b = pool(10);
    let t = Maglev::build(&b, M);
    for key in [0u64, 1, 65536, 65537, 65538, u64::MAX] {
        assert_eq!(t.lookup(key), t.slot_owner((key % u64::from(M)) as u32));
    }
}

/// FNV-1a over the owner address bytes (canonical IP bytes, then port) of every slot, in order.
fn digest(t: &Maglev, backends: &[(SocketAddr, u32)]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for a in owners(t, backends) {
        let (buf, len) = crate::balance::hash::addr_bytes(&a, true);
        for &byte in &buf[..len] {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// GOLDEN: the exact table for a fixed pool. If this fails, the table layout changed and EVERY
/// deployed flow key moves to a different backend on upgrade (and two ringlb versions behind the
/// same ECMP group disagree). Update the constant only for a deliberate, announced change.
#[test]
fn golden_table_digest() {
    let b: Vec<(SocketAddr, u32)> = (0..10)
        .map(|i| {
            (
                SocketAddr::from(([192, 0, 2, 10 + i as u8], 443)),
                1 + (i % 3) as u32,
            )
        })
        .collect();
    let t = Maglev::build(&b, M);
    let got = digest(&t, &b);
    assert_eq!(
        got, 0x0ca1_3d94_e4a5_89cc,
        "maglev golden digest is {got:#018x}"
    );
    assert_eq!(
        t.slots_per_backend(),
        [3449, 6899, 10349, 3449, 6899, 10348, 3449, 6898, 10348, 3449]
    );
}
