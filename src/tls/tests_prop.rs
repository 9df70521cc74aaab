//! Seeded property tests (the fuzz target's properties, run in every `cargo test`): random
//! bytes, random mutations of real and hand-built hellos, random re-fragmentations over records
//! and segments. Nothing panics; the answer never depends on how the bytes were split into
//! calls nor on bytes past `max_bytes`; `NeedMore` is bounded; a re-fragmented valid hello
//! parses to the same Hello.

use super::tests_build::*;
use super::tests_rustls::real_hellos;
use super::*;

/// Checks every invariant on one input, feeding it whole, in random steps, and cut at a random
/// cap.
fn check(buf: &[u8], max: usize, rng: &mut Rng) -> Inspect {
    let whole = inspect(buf, max);
    match &whole {
        Inspect::NeedMore { at_least } => {
            assert!(
                *at_least > buf.len() && *at_least <= max,
                "at_least {at_least}, len {}",
                buf.len()
            );
        }
        Inspect::Hello(h) => {
            assert!(h.total_len <= buf.len().min(max) && h.records >= 1);
            assert!(h.alpn.len() <= MAX_ALPN);
            // The hello is its own bytes: cutting the rest off changes nothing.
            assert_eq!(inspect(&buf[..h.total_len], max), whole);
            if let Some(name) = &h.sni {
                assert!(!name.is_empty() && name.len() <= MAX_NAME);
                assert!(name.bytes().all(|b| !b.is_ascii_uppercase()));
            }
        }
        _ => {}
    }
    let n = 1 + rng.below(8);
    let steps = rng.cuts(buf.len(), n);
    assert_eq!(feed_in_steps(buf, &steps, max), whole, "split at {steps:?}");
    // Bytes past the cap are never looked at.
    let cap = rng.below(buf.len() + 1);
    assert_eq!(inspect(buf, cap), inspect(&buf[..cap], cap), "cap {cap}");
    // A final answer on a prefix stays for the whole.
    let k = rng.below(buf.len() + 1);
    match inspect(&buf[..k], max) {
        Inspect::NeedMore { .. } => {}
        early => assert_eq!(early, whole, "prefix {k}"),
    }
    whole
}

fn seed(name: &str, seed: u64) -> Rng {
    println!("{name}: seed {seed:#x}");
    Rng(seed)
}

#[test]
fn random_bytes_never_panic_and_answer_consistently() {
    let mut rng = seed("random_bytes", 0x7115_5eed_0001);
    let mut seen = [0usize; 5];
    for _ in 0..4_000 {
        let len = rng.below(600);
        let mut buf: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        // Mostly start like a handshake record, so the walk gets past the first bytes.
        // Mostly start like a handshake record with plausible lengths, so the walk gets past
        // the first bytes.
        if len >= 9 && rng.below(4) != 0 {
            let rec_len = rng.below(len) as u16;
            let hs_len = (rng.below(len + 40) as u32).to_be_bytes();
            buf[..9].copy_from_slice(&[
                22,
                3,
                rng.below(5) as u8,
                0,
                0,
                1,
                0,
                hs_len[2],
                hs_len[3],
            ]);
            buf[3..5].copy_from_slice(&rec_len.to_be_bytes());
        }
        let max = [64, 300, DEFAULT_MAX_BYTES][rng.below(3)];
        let got = check(&buf, max, &mut rng);
        seen[["need_more", "not_tls", "too_large", "malformed", "hello"]
            .iter()
            .position(|l| *l == got.label())
            .unwrap()] += 1;
    }
    println!("need_more/not_tls/too_large/malformed/hello: {seen:?}");
    assert!(seen[..4].iter().all(|&n| n > 0), "{seen:?}");
}

/// Valid hellos to start from: real rustls ones and hand-built ones with every feature.
fn corpus() -> Vec<Vec<u8>> {
    let mut out = real_hellos();
    let (t, d) = sni_ext(&[(7, b"x"), (0, b"Mixed.Case.Example")]);
    out.push(
        Spec::with(None, &["h2", "h3"])
            .ext(t, d)
            .ext(EXT_ECH, vec![0; 40])
            .wire(),
    );
    out.push(
        Spec {
            extensions: None,
            ..Spec::default()
        }
        .wire(),
    );
    out.push(records(
        &Spec::with(Some("a.example"), &["x"]).message(),
        &[3, 7, 11],
    ));
    out
}

#[test]
fn mutated_hellos_never_panic_and_answer_consistently() {
    let corpus = corpus();
    let mut rng = seed("mutations", 0x7115_5eed_0002);
    let mut hellos = 0;
    for _ in 0..3_000 {
        let mut buf = corpus[rng.below(corpus.len())].clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(buf.len());
            match rng.below(5) {
                0 | 1 => buf[at] = rng.byte(),
                2 => buf[at] ^= 1 << rng.below(8),
                3 => buf.insert(at, rng.byte()),
                _ => {
                    buf.remove(at);
                }
            }
            if buf.is_empty() {
                break;
            }
        }
        if rng.below(4) == 0 {
            let keep = rng.below(buf.len() + 1);
            buf.truncate(keep);
        }
        if let Inspect::Hello(_) = check(&buf, DEFAULT_MAX_BYTES, &mut rng) {
            hellos += 1;
        }
    }
    // Many mutations land in bytes that are skipped (random, key shares): still hellos.
    println!("{hellos} of 3000 mutated inputs still parse as hellos");
    assert!(hellos > 100);
}

#[test]
fn refragmented_hellos_parse_to_the_same_hello() {
    let mut rng = seed("refragment", 0x7115_5eed_0003);
    for wire in corpus() {
        let want = hello(inspect(&wire, DEFAULT_MAX_BYTES));
        let msg = defragment(&wire);
        for _ in 0..150 {
            let max_fragment = [1, 2, 7, 64, 500, 5000][rng.below(6)];
            let sizes = rng.fragments(msg.len(), max_fragment);
            let split = records(&msg, &sizes);
            let got = hello(check(&split, 1 << 20, &mut rng));
            assert_eq!((got.records, got.total_len), (sizes.len(), split.len()));
            let same = Hello {
                records: want.records,
                total_len: want.total_len,
                ..got
            };
            assert_eq!(same, want, "fragments {sizes:?}");
            // Segments: random cuts through the re-fragmented stream.
            let n = 1 + rng.below(20);
            let cuts = rng.cuts(split.len(), n);
            assert_eq!(hello(feed_in_steps(&split, &cuts, 1 << 20)).sni, want.sni);
        }
    }
}
