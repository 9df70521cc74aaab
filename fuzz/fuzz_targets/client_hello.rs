//! Feeds bytes to `tls::HelloReader` and checks what the worker relies on: no panic; `NeedMore`
//! only below `max_bytes` with a bound past the bytes given (so peeking up to `max_bytes` always
//! ends); a Hello lies within the bytes and parses the same without what follows it; the answer
//! is the same fed whole, byte by byte, or cut at `max_bytes`; a valid hello re-fragmented over
//! any records parses to the same name and ALPN.
//!
//! Two modes, chosen by the first byte, so the fuzzer gets both raw inputs and deep ones:
//! even: the rest is the stream; odd: a valid built-in hello, re-fragmented over records of
//! sizes taken from the input (bytes up to the first 0), then patched at (offset, value) pairs
//! from the rest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlb::tls::{inspect, HelloReader, Inspect, DEFAULT_MAX_BYTES, MAX_ALPN};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        check(rest, DEFAULT_MAX_BYTES);
        // A cap taken from the input too, small ones included.
        if let [a, b, ..] = rest {
            check(rest, usize::from(u16::from_be_bytes([*a, *b]) % 4096));
        }
        return;
    }
    let (sizes, patches) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let msg = message();
    let mut wire = Vec::new();
    let mut left = &msg[..];
    for &n in sizes.iter().cycle().take(if sizes.is_empty() { 0 } else { msg.len() }) {
        if left.is_empty() {
            break;
        }
        let n = usize::from(n).min(left.len());
        push_record(&mut wire, &left[..n]);
        left = &left[n..];
    }
    if !left.is_empty() {
        push_record(&mut wire, left);
    }
    if patches.len() < 3 {
        // Unpatched: any fragmentation reads the same hello.
        match check(&wire, 1 << 20) {
            Inspect::Hello(h) => {
                assert_eq!(h.sni.as_deref(), Some("fuzz.example"));
                assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
                assert!(h.ech);
                assert_eq!(h.total_len, wire.len());
            }
            other => panic!("re-fragmented hello: {other:?}"),
        }
        return;
    }
    for p in patches.chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([p[0], p[1]]));
        let len = wire.len().max(1);
        if let Some(b) = wire.get_mut(at % len) {
            *b = p[2];
        }
    }
    check(&wire, DEFAULT_MAX_BYTES);
});

fn check(buf: &[u8], max: usize) -> Inspect {
    let whole = inspect(buf, max);
    match &whole {
        Inspect::NeedMore { at_least } => assert!(*at_least > buf.len() && *at_least <= max),
        Inspect::Hello(h) => {
            assert!(h.total_len <= buf.len().min(max) && h.records >= 1);
            assert!(h.alpn.len() <= MAX_ALPN);
            assert_eq!(inspect(&buf[..h.total_len], max), whole);
            if let Some(name) = &h.sni {
                assert!(!name.is_empty() && !name.bytes().any(|b| b.is_ascii_uppercase()));
            }
        }
        _ => {}
    }
    // Byte by byte through one reader: every answer before the last is NeedMore or already
    // the final one.
    let mut r = HelloReader::new(max);
    for k in 0..buf.len().min(max) {
        match r.feed(&buf[..k]) {
            Inspect::NeedMore { at_least } => assert!(at_least > k),
            early => {
                assert_eq!(early, whole, "prefix {k}");
                break;
            }
        }
    }
    assert_eq!(r.feed(buf), whole);
    // Nothing past the cap is looked at.
    let cap = buf.len() / 2;
    assert_eq!(inspect(buf, cap), inspect(&buf[..cap], cap));
    whole
}

fn push_record(wire: &mut Vec<u8>, fragment: &[u8]) {
    wire.extend([22, 3, 1]);
    wire.extend((fragment.len() as u16).to_be_bytes());
    wire.extend(fragment);
}

/// A TLS 1.3 ClientHello handshake message: SNI fuzz.example, ALPN h2 and http/1.1, an ECH
/// extension, a GREASE extension and a key share.
fn message() -> Vec<u8> {
    let mut exts = Vec::new();
    let mut ext = |typ: u16, data: &[u8]| {
        exts.extend(typ.to_be_bytes());
        exts.extend((data.len() as u16).to_be_bytes());
        exts.extend(data);
    };
    let name = b"Fuzz.Example";
    let mut sni = ((name.len() + 3) as u16).to_be_bytes().to_vec();
    sni.push(0);
    sni.extend((name.len() as u16).to_be_bytes());
    sni.extend(name);
    ext(0x0a0a, &[]);
    ext(0, &sni);
    ext(16, b"\x00\x0c\x02h2\x08http/1.1");
    ext(43, &[4, 3, 4, 3, 3]);
    let mut share = vec![0, 36, 0, 0x1d, 0, 32];
    share.extend([0x55; 32]);
    ext(51, &share);
    ext(0xfe0d, &[0, 0, 1, 0, 1, 7, 0, 4, 1, 2, 3, 4, 0, 8, 9, 9, 9, 9, 9, 9, 9, 9]);
    let mut body = vec![3, 3];
    body.extend([0x42; 32]);
    body.push(32);
    body.extend([7; 32]);
    body.extend([0, 6, 0x3a, 0x3a, 0x13, 0x01, 0x13, 0x02, 1, 0]);
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut msg = vec![1];
    msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend(body);
    msg
}
