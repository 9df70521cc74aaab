//! Micro-benchmarks of the code that reads forwarded bytes: the ClientHello peek
//! (`ringlb::tls::inspect`, once per TLS-routed connection, on a real rustls hello with its
//! post-quantum key share) and the PostgreSQL session tracker (`PgTracker::forwarded`, on every
//! chunk a `drain_mode = "postgres"` connection forwards). Short runs (20 samples, 2 s each):
//! `cargo bench --bench frame`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringlb::worker::conn::Dir;
use ringlb::worker::pgdrain::PgTracker;
use rustls::pki_types::ServerName;

/// A ClientHello as rustls writes it (about 1.5 KB: its X25519MLKEM768 key share included).
fn client_hello(sni: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("write_tls");
    }
    hello
}

/// One PostgreSQL message: type byte, length, body.
fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn hello(c: &mut Criterion) {
    let mut g = c.benchmark_group("tls_inspect");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let whole = client_hello("api.example.com");
    g.throughput(Throughput::Bytes(whole.len() as u64));
    g.bench_function("whole_hello", |b| {
        b.iter(|| black_box(ringlb::tls::inspect(black_box(&whole), 16384)))
    });
    // The same hello in two segments: inspected when the first half is in (incomplete), then
    // again when the whole is (the peek re-reads from the start at each wake-up).
    g.bench_function("hello_half_then_whole", |b| {
        let half = &whole[..whole.len() / 2];
        b.iter(|| {
            black_box(ringlb::tls::inspect(black_box(half), 16384));
            black_box(ringlb::tls::inspect(black_box(&whole), 16384))
        })
    });
    g.finish();
}

fn postgres(c: &mut Criterion) {
    let mut g = c.benchmark_group("pg_tracker");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    // One simple-query round trip: Q up; RowDescription, DataRow, CommandComplete,
    // ReadyForQuery(I) down.
    let up = msg(b'Q', b"SELECT inet_server_port()\0");
    let mut down = msg(b'T', &[0u8; 40]);
    down.extend(msg(b'D', &[0u8; 12]));
    down.extend(msg(b'C', b"SELECT 1\0"));
    down.extend(msg(b'Z', b"I"));
    g.throughput(Throughput::Bytes((up.len() + down.len()) as u64));
    let mut t = PgTracker::new();
    let mut startup = vec![0, 0, 0, 8, 0, 3, 0, 0];
    startup[..4].copy_from_slice(&8u32.to_be_bytes());
    t.forwarded(Dir::Up, &startup);
    t.forwarded(Dir::Down, &msg(b'Z', b"I"));
    g.bench_function("query_round_trip", |b| {
        b.iter(|| {
            t.forwarded(Dir::Up, black_box(&up));
            t.forwarded(Dir::Down, black_box(&down));
            black_box(t.is_idle())
        })
    });
    g.finish();
}

criterion_group!(benches, hello, postgres);
criterion_main!(benches);
