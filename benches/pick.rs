//! Micro-benchmarks of `ringlb::balance`: one `Tables::pick` per policy and pool size (all backends
//! eligible, loads read from a `Vec<u64>` like the per-backend atomics), and Maglev table builds.
//! Kept short (20 samples, 2 s each) so `cargo bench --bench pick` fits in a few minutes on 2 cores.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ringlb::balance::{hash::mix64, Maglev, PickState, Policy, Tables, DEFAULT_MAGLEV_TABLE_SIZE};

fn pool(n: usize, weight: impl Fn(usize) -> u32) -> Vec<(SocketAddr, u32)> {
    (0..n)
        .map(|i| {
            let ip = [10, 20, (i >> 8) as u8, i as u8];
            (SocketAddr::from((ip, 8080)), weight(i))
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for policy in Policy::ALL {
        for n in [4usize, 64, 1024] {
            let backends = pool(n, |i| 1 + (i % 3) as u32);
            let tables = Tables::build(policy, &backends, DEFAULT_MAGLEV_TABLE_SIZE);
            // Fixed pseudo-random loads so least connections and P2C have real comparisons to do.
            let loads: Vec<u64> = (0..n as u64).map(|i| mix64(i) % 1000).collect();
            let mut st = PickState::new(42);
            let mut key = 0u64;
            g.bench_function(BenchmarkId::new(policy.name(), n), |b| {
                b.iter(|| {
                    key = key.wrapping_add(0x9E37_79B9_7F4A_7C15); // a new flow each pick
                    tables.pick(&mut st, black_box(key), |_| true, |i| loads[i])
                })
            });
        }
    }
    g.finish();
}

fn maglev_build(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev_build");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let equal = pool(1000, |_| 1);
    let weighted = pool(1000, |i| 1 + (i % 3) as u32);
    for (name, backends, m) in [
        ("n1000_w1", &equal, 65_537u32),
        ("n1000_w1", &equal, 655_373),
        ("n1000_w1to3", &weighted, 65_537),
    ] {
        g.bench_with_input(BenchmarkId::new(name, m), &m, |b, &m| {
            b.iter(|| Maglev::build(black_box(backends), m))
        });
    }
    g.finish();
}

criterion_group!(benches, pick, maglev_build);
criterion_main!(benches);
