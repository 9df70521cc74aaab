//! Hand-built ClientHellos: every prefix, splits over records, trailing bytes, the size cap,
//! things that are not TLS, inconsistent lengths, ECH, missing or invalid names, ALPN lists,
//! GREASE.

use super::tests_build::*;
use super::*;

const MAX: usize = DEFAULT_MAX_BYTES;

fn h2_api() -> Spec {
    Spec::with(Some("API.Example.com"), &["h2", "http/1.1"])
}

#[test]
fn reads_sni_and_alpn_from_one_record() {
    let wire = h2_api().wire();
    let h = hello(inspect(&wire, MAX));
    assert_eq!(h.sni.as_deref(), Some("api.example.com"));
    assert_eq!(h.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert!(!h.ech);
    assert_eq!(h.total_len, wire.len());
    assert_eq!(h.records, 1);
}

#[test]
fn every_prefix_needs_more_then_the_same_hello() {
    let wire = h2_api().wire();
    let whole = hello(inspect(&wire, MAX));
    let mut r = HelloReader::new(MAX);
    for k in 0..wire.len() {
        for got in [r.feed(&wire[..k]), inspect(&wire[..k], MAX)] {
            let Inspect::NeedMore { at_least } = got else {
                panic!("prefix {k}: {got:?}");
            };
            assert!(
                at_least > k && at_least <= wire.len(),
                "prefix {k}: at_least {at_least}"
            );
            // Once the handshake header is in, the bound is exact for a one-record hello.
            if k >= 9 {
                assert_eq!(at_least, wire.len(), "prefix {k}");
            }
        }
    }
    assert_eq!(hello(r.feed(&wire)), whole);
    // Asking again gives the same answer.
    assert_eq!(hello(r.feed(&wire)), whole);
}

#[test]
fn reassembles_a_hello_split_over_two_and_three_records() {
    let msg = h2_api().message();
    let one = hello(inspect(&records(&msg, &[]), MAX));
    // Splits inside the handshake header, the fixed fields, the SNI name, the ALPN list.
    let sni_at = msg.windows(3).position(|w| w == b"API").unwrap();
    let alpn_at = msg.windows(8).position(|w| w == b"http/1.1").unwrap();
    for sizes in [
        vec![1],
        vec![3],
        vec![40],
        vec![sni_at + 1],
        vec![alpn_at + 4],
        vec![1, 2],
        vec![sni_at, 4],
        vec![10, alpn_at - 10 + 2],
    ] {
        let wire = records(&msg, &sizes);
        let h = hello(inspect(&wire, MAX));
        assert_eq!(h.records, sizes.len() + 1, "{sizes:?}");
        assert_eq!(h.total_len, wire.len(), "{sizes:?}");
        assert_eq!(
            Hello {
                records: 1,
                total_len: one.total_len,
                ..h
            },
            one,
            "{sizes:?}"
        );
        // And fed one byte at a time.
        let cuts: Vec<usize> = (0..wire.len()).collect();
        assert_eq!(hello(feed_in_steps(&wire, &cuts, MAX)).sni, one.sni);
    }
}

#[test]
fn bytes_after_the_hello_are_not_part_of_it() {
    let msg = h2_api().message();
    let one = hello(inspect(&records(&msg, &[]), MAX));
    // The same record carries more handshake bytes after the hello.
    let mut carried = msg.clone();
    carried.extend([2, 0, 0, 4, 1, 2, 3, 4]);
    let wire = record(22, &carried);
    let h = hello(inspect(&wire, MAX));
    assert_eq!(h.total_len, 5 + msg.len());
    assert_eq!(h, one);
    // The answer comes as soon as the hello is in, before the rest of its record.
    assert_eq!(hello(inspect(&wire[..5 + msg.len()], MAX)), one);
    // Other records after the hello (early data, garbage) are not looked at.
    let mut wire = records(&msg, &[20]);
    let total = wire.len();
    wire.extend(record(23, b"early data"));
    wire.extend(b"\xff\xff\xff\xff\xff\xff");
    let h = hello(inspect(&wire, MAX));
    assert_eq!((h.total_len, h.records), (total, 2));
}

#[test]
fn max_bytes_caps_the_hello_with_its_record_headers() {
    let msg = h2_api().message();
    let wire = records(&msg, &[]);
    let n = wire.len();
    assert_eq!(hello(inspect(&wire, n)).total_len, n);
    assert_eq!(inspect(&wire, n - 1), Inspect::TooLarge);
    // Known as soon as the handshake length is: 9 bytes are enough.
    assert_eq!(inspect(&wire[..9], n - 1), Inspect::TooLarge);
    assert!(matches!(
        inspect(&wire[..8], n - 1),
        Inspect::NeedMore { .. }
    ));
    // Split over records, the extra headers count.
    let split = records(&msg, &[10, 10]);
    assert_eq!(split.len(), n + 10);
    assert_eq!(hello(inspect(&split, n + 10)).total_len, n + 10);
    assert_eq!(inspect(&split, n + 9), Inspect::TooLarge);
    // A hello that announces more than the cap is refused without waiting for it.
    let big = h2_api().ext(EXT_PADDING, vec![0; 20_000]).message();
    let wire = records(&big, &[16_000]);
    assert_eq!(inspect(&wire[..9], MAX), Inspect::TooLarge);
    assert_eq!(inspect(&wire, MAX), Inspect::TooLarge);
    // With a cap that allows it, a hello over two full-size records is read.
    assert_eq!(hello(inspect(&wire, 32_768)).records, 2);
    // Bytes past max_bytes are never looked at: garbage there changes nothing.
    let wire = h2_api().wire();
    let mut longer = wire.clone();
    longer.extend([0xff; 100]);
    assert_eq!(inspect(&longer, wire.len()), inspect(&wire, wire.len()));
    // Below the smallest possible hello, every answer is TooLarge.
    assert_eq!(inspect(b"", MIN_HELLO_LEN - 1), Inspect::TooLarge);
    assert!(matches!(
        inspect(b"", MIN_HELLO_LEN),
        Inspect::NeedMore {
            at_least: MIN_HELLO_LEN
        }
    ));
}

#[test]
fn other_protocols_are_not_tls() {
    for input in [
        &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
        b"SSH-2.0-OpenSSH_9.2p1\r\n",
        b"PRI * HTTP/2.0\r\n",
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
        b"*1\r\n$4\r\nPING\r\n",
        b"\x80\x2e\x01\x03\x01\x00\x15", // SSLv2-format ClientHello
        b"\x16\x02\x00",                 // version 2.0
        b"\x16\x03\x05",                 // version 3.5
        b"\x17\x03\x03\x00\x10",         // application data first
        b"\x15\x03\x03\x00\x02\x02\x28", // an alert first
        b"G",
    ] {
        assert_eq!(inspect(input, MAX), Inspect::NotTls, "{input:?}");
    }
    for prefix in [
        &b""[..],
        b"\x16",
        b"\x16\x03",
        b"\x16\x03\x01",
        b"\x16\x03\x01\x00",
    ] {
        assert!(
            matches!(inspect(prefix, MAX), Inspect::NeedMore { .. }),
            "{prefix:?}"
        );
    }
    // SSL 3.0 and TLS 1.3 record versions are accepted.
    let msg = Spec {
        extensions: None,
        ..Spec::default()
    }
    .message();
    for minor in [0, 4] {
        let mut wire = record(22, &msg);
        wire[2] = minor;
        assert_eq!(hello(inspect(&wire, MAX)).sni, None);
    }
}

/// Replaces `n` bytes at `at` in a copy of `v`.
fn patched(v: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut v = v.to_vec();
    v[at..at + bytes.len()].copy_from_slice(bytes);
    v
}

#[test]
fn inconsistent_records_and_lengths_are_malformed() {
    let spec = h2_api();
    let msg = spec.message();
    let wire = records(&msg, &[]);
    let malformed = |wire: &[u8]| matches!(inspect(wire, MAX), Inspect::Malformed(_));
    // Records: empty, over 2^14, another type between fragments, first message not a hello.
    assert!(malformed(&record(22, &[])));
    assert!(malformed(&[0x16, 3, 1, 0x40, 0x01]));
    let mut split = records(&msg, &[20]);
    split.splice(25..25, record(21, &[2, 40]));
    assert!(malformed(&split));
    let mut split = records(&msg, &[20]);
    split[25 + 1] = 2; // second record's version major
    assert!(malformed(&split));
    assert!(malformed(&record(22, &handshake(2, &[0; 60]))));
    // The hello's own lengths: shorter than its fixed fields, a body that does not add up.
    assert!(malformed(&record(22, &handshake(1, &[3; 40]))));
    assert!(malformed(&record(22, &handshake(1, &[3; 60]))));
    assert!(malformed(&patched(&wire, 9, &[2, 0]))); // legacy_version 2.0
    assert!(malformed(&patched(&wire, 9 + 34, &[33]))); // session id 33 bytes
    let suites_at = 9 + 35 + 32;
    assert!(malformed(&patched(&wire, suites_at, &[0, 5])));
    assert!(malformed(&patched(&wire, suites_at, &[0, 0])));
    let comp_at = suites_at + 2 + 6;
    assert!(malformed(&patched(&wire, comp_at, &[0])));
    let ext_at = comp_at + 2;
    let ext_len = u16::from_be_bytes([wire[ext_at], wire[ext_at + 1]]);
    assert!(malformed(&patched(
        &wire,
        ext_at,
        &(ext_len + 1).to_be_bytes()
    )));
    assert!(malformed(&patched(
        &wire,
        ext_at,
        &(ext_len - 1).to_be_bytes()
    )));
    // The handshake length says one byte less than the extensions need.
    let short = patched(&wire, 6, &((msg.len() - 5) as u32).to_be_bytes()[1..]);
    assert!(malformed(&short[..wire.len() - 1]));
    // Extension contents that do not fill their length, or overrun it.
    let bad_sni = |entries: Vec<u8>| {
        let mut d = (entries.len() as u16).to_be_bytes().to_vec();
        d.extend(entries);
        Spec::default().ext(EXT_SNI, d).wire()
    };
    assert!(malformed(&bad_sni(vec![0, 0, 9, b'a'])));
    assert!(malformed(&bad_sni(vec![0, 0])));
    assert!(malformed(&bad_sni(vec![])));
    let two_hosts = sni_ext(&[(0, b"a.example"), (0, b"b.example")]);
    assert!(malformed(
        &Spec::default().ext(two_hosts.0, two_hosts.1).wire()
    ));
    let s = sni_ext(&[(0, b"a.example")]);
    assert!(malformed(
        &Spec::default().ext(s.0, s.1.clone()).ext(s.0, s.1).wire()
    ));
    let mut data = sni_ext(&[(0, b"a.example")]).1;
    data.push(0);
    assert!(malformed(&Spec::default().ext(EXT_SNI, data).wire()));
    // ALPN: an empty name, a list that is not its extension's length, a duplicate.
    assert!(malformed(
        &Spec::default()
            .ext(EXT_ALPN, vec![0, 4, 2, b'h', b'2', 0])
            .wire()
    ));
    assert!(malformed(
        &Spec::default().ext(EXT_ALPN, vec![0, 1, 0]).wire()
    ));
    assert!(malformed(
        &Spec::default()
            .ext(EXT_ALPN, vec![0, 4, 2, b'h', b'2'])
            .wire()
    ));
    assert!(malformed(
        &Spec::default().ext(EXT_ALPN, vec![0, 2, 3, b'h']).wire()
    ));
    let a = alpn_ext(&[b"h2"]);
    assert!(malformed(
        &Spec::default().ext(a.0, a.1.clone()).ext(a.0, a.1).wire()
    ));
    let e = (EXT_ECH, vec![0; 8]);
    assert!(malformed(
        &Spec::default().ext(e.0, e.1.clone()).ext(e.0, e.1).wire()
    ));
}

#[test]
fn truncated_input_waits_instead_of_failing() {
    // A record that announces more than has arrived is not an error: more may come.
    let wire = h2_api().wire();
    for k in [5, 9, 50, wire.len() - 1] {
        assert!(
            matches!(inspect(&wire[..k], MAX), Inspect::NeedMore { .. }),
            "{k}"
        );
    }
}

#[test]
fn ech_is_reported_and_the_outer_name_kept() {
    // An outer ECH extension: type 0, HPKE suite, config id, enc, payload.
    let mut ech = vec![0, 0x00, 0x01, 0x00, 0x01, 0x2a, 0, 32];
    ech.extend([9; 32]);
    ech.extend([0, 200]);
    ech.extend([5; 200]);
    let h = hello(inspect(
        &Spec::with(Some("public.example"), &["h2"])
            .ext(EXT_ECH, ech)
            .wire(),
        MAX,
    ));
    assert!(h.ech);
    assert_eq!(h.sni.as_deref(), Some("public.example"));
}

#[test]
fn missing_or_invalid_names_are_none() {
    let sni_of = |spec: Spec| hello(inspect(&spec.wire(), MAX)).sni;
    assert_eq!(sni_of(Spec::default()), None);
    assert_eq!(
        sni_of(Spec {
            extensions: None,
            ..Spec::default()
        }),
        None
    );
    assert_eq!(
        sni_of(Spec::with(Some("example.com."), &[])).as_deref(),
        Some("example.com")
    );
    for bad in [
        &b""[..],
        b"10.0.0.1",
        b"bad name.example",
        "b\u{fc}cher.example".as_bytes(),
        b"a..b",
    ] {
        let (t, d) = sni_ext(&[(0, bad)]);
        assert_eq!(sni_of(Spec::default().ext(t, d)), None, "{bad:?}");
    }
    let (t, d) = sni_ext(&[(0, "a".repeat(300).as_bytes())]);
    assert_eq!(sni_of(Spec::default().ext(t, d)), None);
    // An entry of an unknown type is skipped; the host_name is still read.
    let (t, d) = sni_ext(&[(7, b"whatever"), (0, b"Real.Example")]);
    assert_eq!(
        sni_of(Spec::default().ext(t, d)).as_deref(),
        Some("real.example")
    );
}

#[test]
fn alpn_lists_and_grease_values() {
    // GREASE (RFC 8701): a reserved extension type, cipher suite and ALPN name are carried
    // like any other and change nothing.
    let mut spec = Spec::with(Some("grease.example"), &[]);
    spec.suites.insert(0, 0x3a3a);
    let (t, d) = alpn_ext(&[b"\x5a\x5a", b"h2", b"http/1.1", b"h3"]);
    let spec = spec.ext(0x0a0a, vec![]).ext(t, d).ext(0xfafa, vec![0]);
    let h = hello(inspect(&spec.wire(), MAX));
    assert_eq!(h.sni.as_deref(), Some("grease.example"));
    let want: Vec<Vec<u8>> = vec![
        b"\x5a\x5a".to_vec(),
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        b"h3".to_vec(),
    ];
    assert_eq!(h.alpn, want);
    // More names than MAX_ALPN: the first ones are kept, all are checked.
    let names: Vec<Vec<u8>> = (0..40).map(|i| format!("p{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
    let (t, d) = alpn_ext(&refs);
    let h = hello(inspect(&Spec::default().ext(t, d).wire(), MAX));
    assert_eq!(h.alpn, names[..MAX_ALPN].to_vec());
}

#[test]
fn labels_name_each_answer() {
    assert_eq!(Inspect::NeedMore { at_least: 1 }.label(), "need_more");
    assert_eq!(Inspect::NotTls.label(), "not_tls");
    assert_eq!(Inspect::TooLarge.label(), "too_large");
    assert_eq!(Inspect::Malformed("x").label(), "malformed");
    assert_eq!(Inspect::Hello(Hello::default()).label(), "hello");
}
