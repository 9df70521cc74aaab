//! Real ClientHellos, written by rustls (aws-lc-rs provider: it has the X25519MLKEM768
//! post-quantum key share browsers send since 2024, so these hellos are the large ones that broke
//! SNI routing elsewhere). rustls fragments its own hello over several records when asked
//! (`max_fragment_size`), which gives real multi-record hellos too.

use std::sync::Arc;

use rustls::client::{EchGreaseConfig, EchMode};
use rustls::crypto::aws_lc_rs::{self as provider, kx_group};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::tests_build::*;
use super::*;

/// A client config with the default (post-quantum first) key exchange groups.
pub fn client_config(alpn: &[&str]) -> ClientConfig {
    let provider = Arc::new(provider::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    cfg
}

/// Everything the client writes before it hears from the server: its ClientHello records.
pub fn client_hello(cfg: ClientConfig, server: &str) -> Vec<u8> {
    let name = ServerName::try_from(server.to_string()).unwrap();
    let mut conn = ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut wire = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut wire).unwrap();
    }
    wire
}

/// A few real hellos of different shapes (one record, fragmented by rustls, no SNI) for the
/// property tests.
pub fn real_hellos() -> Vec<Vec<u8>> {
    let mut fragmented = client_config(&["h2", "http/1.1"]);
    fragmented.max_fragment_size = Some(200);
    vec![
        client_hello(client_config(&["h2", "http/1.1"]), "api.example.com"),
        client_hello(fragmented, "Www.Example.COM"),
        client_hello(client_config(&[]), "127.0.0.1"),
    ]
}

#[test]
fn a_rustls_hello_with_a_post_quantum_key_share() {
    let wire = client_hello(client_config(&["h2", "http/1.1"]), "api.example.com");
    // X25519MLKEM768's share alone is 1,216 bytes: this hello spans segments on a 1,500-byte
    // path, which is what broke HAProxy (#3148) and ingress-nginx (#11498).
    assert!(wire.len() > 1_300, "hello is {} bytes", wire.len());
    let h = hello(inspect(&wire, DEFAULT_MAX_BYTES));
    assert_eq!(h.sni.as_deref(), Some("api.example.com"));
    assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert!(!h.ech);
    assert_eq!((h.total_len, h.records), (wire.len(), 1));
    // Delivered in 1,448-byte segments (a 1,500-byte MTU) and one byte at a time.
    let cuts: Vec<usize> = (1..wire.len()).step_by(1448).collect();
    assert_eq!(hello(feed_in_steps(&wire, &cuts, DEFAULT_MAX_BYTES)), h);
    let cuts: Vec<usize> = (0..wire.len()).collect();
    assert_eq!(hello(feed_in_steps(&wire, &cuts, DEFAULT_MAX_BYTES)), h);
}

#[test]
fn a_hello_rustls_itself_fragments_over_records() {
    let plain = hello(inspect(
        &client_hello(client_config(&["h2"]), "frag.example"),
        DEFAULT_MAX_BYTES,
    ));
    for max_fragment in [64, 300, 1000] {
        let mut cfg = client_config(&["h2"]);
        cfg.max_fragment_size = Some(max_fragment);
        let wire = client_hello(cfg, "frag.example");
        let h = hello(inspect(&wire, DEFAULT_MAX_BYTES));
        assert!(
            h.records > 1,
            "max_fragment_size {max_fragment}: {} records",
            h.records
        );
        assert_eq!(h.total_len, wire.len());
        assert_eq!(
            (h.sni, h.alpn, h.ech),
            (plain.sni.clone(), plain.alpn.clone(), false)
        );
        let cuts: Vec<usize> = (0..wire.len()).collect();
        assert_eq!(
            hello(feed_in_steps(&wire, &cuts, DEFAULT_MAX_BYTES)).records,
            h.records
        );
    }
}

#[test]
fn a_real_hello_refragmented_by_hand_parses_the_same() {
    let wire = client_hello(client_config(&["h2", "http/1.1"]), "refrag.example");
    let msg = defragment(&wire);
    let want = hello(inspect(&wire, DEFAULT_MAX_BYTES));
    for sizes in [
        vec![1],
        vec![msg.len() / 2],
        vec![100, 100, 100],
        vec![1, 1, 1, 1, 5],
    ] {
        let split = records(&msg, &sizes);
        let h = hello(inspect(&split, DEFAULT_MAX_BYTES));
        assert_eq!((h.records, h.total_len), (sizes.len() + 1, split.len()));
        assert_eq!(
            Hello {
                records: 1,
                total_len: wire.len(),
                ..h
            },
            want
        );
    }
}

#[test]
fn rustls_without_a_server_name_sends_no_sni() {
    // An IP address is never sent as SNI.
    let h = hello(inspect(
        &client_hello(client_config(&["h2"]), "127.0.0.1"),
        DEFAULT_MAX_BYTES,
    ));
    assert_eq!((h.sni, h.alpn), (None, vec![b"h2".to_vec()]));
    let mut cfg = client_config(&[]);
    cfg.enable_sni = false;
    let h = hello(inspect(
        &client_hello(cfg, "hidden.example"),
        DEFAULT_MAX_BYTES,
    ));
    assert_eq!((h.sni, h.alpn), (None, vec![]));
}

#[test]
fn a_rustls_grease_ech_hello_keeps_its_real_name() {
    let suite = provider::hpke::ALL_SUPPORTED_SUITES[0];
    let (public, _) = suite.generate_key_pair().unwrap();
    let mode = EchMode::Grease(EchGreaseConfig::new(suite, public));
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_ech(mode)
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let h = hello(inspect(
        &client_hello(cfg, "ech.example"),
        DEFAULT_MAX_BYTES,
    ));
    assert!(h.ech);
    assert_eq!(h.sni.as_deref(), Some("ech.example"));
}

#[test]
fn tls12_only_and_mlkem1024_hellos() {
    let provider = Arc::new(provider::default_provider());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let h = hello(inspect(
        &client_hello(cfg, "old.example"),
        DEFAULT_MAX_BYTES,
    ));
    assert_eq!(
        (h.sni.as_deref(), h.alpn),
        (Some("old.example"), vec![b"http/1.1".to_vec()])
    );

    // Pure ML-KEM-1024 (a 1,568-byte share).
    let mut p = provider::default_provider();
    p.kx_groups = vec![kx_group::MLKEM1024];
    let cfg = ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    let wire = client_hello(cfg, "big.example");
    assert!(wire.len() > 1_600, "{} bytes", wire.len());
    assert_eq!(
        hello(inspect(&wire, DEFAULT_MAX_BYTES)).sni.as_deref(),
        Some("big.example")
    );
    // The cap applies to real hellos as to any other.
    assert_eq!(inspect(&wire, 1_024), Inspect::TooLarge);
}

#[test]
fn real_hellos_route_by_name_and_alpn() {
    let t = RouteTable::build(
        &[
            Route {
                sni: vec!["api.example.com".into()],
                alpn: vec![],
                pool: 1,
            },
            Route {
                sni: vec!["*.example.com".into()],
                alpn: vec!["h2".into()],
                pool: 2,
            },
        ],
        Some(0),
    )
    .unwrap();
    let pool = |cfg, name| match inspect(&client_hello(cfg, name), DEFAULT_MAX_BYTES) {
        Inspect::Hello(h) => t.lookup(Some(&h)),
        _ => t.lookup(None),
    };
    assert_eq!(pool(client_config(&["h2"]), "api.example.com"), Some(1));
    assert_eq!(
        pool(client_config(&["h2", "http/1.1"]), "www.example.com"),
        Some(2)
    );
    assert_eq!(
        pool(client_config(&["http/1.1"]), "www.example.com"),
        Some(0)
    );
    assert_eq!(pool(client_config(&["h2"]), "127.0.0.1"), Some(0));
}
