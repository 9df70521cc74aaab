//! Round trips, golden bytes from the spec's examples, every prefix of valid headers, near misses,
//! and a seeded property test (random bytes and mutated headers) standing in for a fuzzer.

use super::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// xorshift64*: deterministic, no dependency. Seeds are printed by the tests that use them.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn ipv4(&mut self) -> Ipv4Addr {
        Ipv4Addr::from(self.next() as u32)
    }

    /// Half the groups zero, so `::` compression gets exercised.
    fn ipv6(&mut self) -> Ipv6Addr {
        let mut g = [0u16; 8];
        for s in &mut g {
            *s = match self.below(4) {
                0 | 1 => 0,
                2 => self.below(16) as u16,
                _ => self.next() as u16,
            };
        }
        Ipv6Addr::from(g)
    }

    fn addr(&mut self, v6: bool) -> SocketAddr {
        let port = self.next() as u16;
        if v6 {
            SocketAddr::new(IpAddr::V6(self.ipv6()), port)
        } else {
            SocketAddr::new(IpAddr::V4(self.ipv4()), port)
        }
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn enc(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = [0u8; MAX_ENCODED];
    let n = encode(version, src, dst, &mut out);
    out[..n].to_vec()
}

fn header(
    len: usize,
    version: Version,
    src: Option<SocketAddr>,
    dst: Option<SocketAddr>,
) -> Result<Parsed, Invalid> {
    Ok(Parsed::Header {
        len,
        version,
        source: src,
        dest: dst,
    })
}

/// What a parse of an encoded mixed-family pair must give back: the IPv4 end IPv4-mapped.
fn unified(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let map = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (map(src), map(dst))
    }
}

/// A v2 header with arbitrary fields, for the cases `encode` never produces.
fn v2(ver_cmd: u8, family: u8, len: u16, block: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[ver_cmd, family]);
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(block);
    h
}

const UNKNOWN_WORST: &[u8] = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";

/// Valid headers of every kind we accept, for the prefix and mutation tests.
fn valid_headers() -> Vec<Vec<u8>> {
    let pairs = [
        ("192.168.0.1:56324", "192.168.0.11:443"),
        ("0.0.0.0:0", "255.255.255.255:65535"),
        ("[2001:db8::1]:1234", "[::1]:80"),
        (
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        ),
        ("10.1.2.3:40000", "[2001:db8:0:0:1::]:443"),
    ];
    let mut all = Vec::new();
    for (s, d) in pairs {
        for version in [Version::V1, Version::V2] {
            all.push(enc(version, sa(s), sa(d)));
        }
    }
    all.push(b"PROXY UNKNOWN\r\n".to_vec());
    all.push(b"PROXY UNKNOWN whatever the sender had\r\n".to_vec());
    all.push(UNKNOWN_WORST.to_vec());
    all.push(b"PROXY TCP6 ::FFFF:1.2.3.4 2001:DB8::A 0 65535\r\n".to_vec());
    all.push(v2(0x20, 0x00, 0, &[]));
    all.push(v2(0x20, 0x11, 12, &[7; 12]));
    all.push(v2(0x21, 0x00, 3, &[1, 2, 3]));
    all.push(v2(0x21, 0x12, 12, &[1, 2, 3, 4, 5, 6, 7, 8, 0, 53, 0, 53]));
    all.push(v2(0x21, 0x31, 216, &[b'/'; 216]));
    let mut with_tlvs = enc(Version::V2, sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"));
    with_tlvs[14..16].copy_from_slice(&512u16.to_be_bytes());
    with_tlvs.resize(16 + 512, 0x04);
    all.push(with_tlvs);
    all
}

#[test]
fn version_names_round_trip() {
    for v in [Version::V1, Version::V2] {
        assert_eq!(Version::from_name(v.name()), Some(v));
    }
    assert_eq!(Version::from_name("V1"), None);
    assert_eq!(Version::from_name("v3"), None);
    assert_eq!(Version::from_name(""), None);
}

#[test]
fn golden_v1_is_the_spec_example() {
    let h = enc(Version::V1, sa("192.168.0.1:56324"), sa("192.168.0.11:443"));
    assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
    let h = enc(Version::V1, sa("[2001:db8::1]:1234"), sa("[::1]:80"));
    assert_eq!(h, b"PROXY TCP6 2001:db8::1 ::1 1234 80\r\n");
    // Mixed: hex groups only, as the spec's grammar says (no dotted tail).
    let h = enc(Version::V1, sa("192.168.0.1:5"), sa("[2001:db8::1]:6"));
    assert_eq!(h, b"PROXY TCP6 ::ffff:c0a8:1 2001:db8::1 5 6\r\n");
}

#[test]
fn golden_v2_follows_the_spec_layout() {
    let h = enc(Version::V2, sa("192.168.0.1:56324"), sa("192.168.0.11:443"));
    #[rustfmt::skip]
    let want = [
        0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a, // signature
        0x21,                                                                   // v2, PROXY
        0x11,                                                                   // TCP over IPv4
        0x00, 0x0c,                                                             // len = 12
        192, 168, 0, 1,                                                         // src_addr
        192, 168, 0, 11,                                                        // dst_addr
        0xdc, 0x04,                                                             // src_port 56324
        0x01, 0xbb,                                                             // dst_port 443
    ];
    assert_eq!(h, want);
    let h = enc(Version::V2, sa("[2001:db8::1]:1"), sa("[::1]:2"));
    assert_eq!(h.len(), 52);
    assert_eq!(&h[12..16], &[0x21, 0x21, 0x00, 0x24]);
    assert_eq!(
        &h[16..32],
        &"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets()
    );
    assert_eq!(&h[48..52], &[0, 1, 0, 2]);
}

#[test]
fn longest_encodings_fit() {
    let max6 = sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
    assert_eq!(enc(Version::V1, max6, max6).len(), 104);
    assert_eq!(enc(Version::V2, max6, max6).len(), 52);
    let max4 = sa("255.255.255.255:65535");
    assert_eq!(enc(Version::V1, max4, max4).len(), 56);
}

#[test]
fn round_trips_fixed_pairs() {
    let v4a = sa("192.0.2.7:40000");
    let v4b = sa("10.0.0.1:443");
    let v6a = sa("[2001:db8::7]:40000");
    let v6b = sa("[fe80::1:2]:8443");
    for version in [Version::V1, Version::V2] {
        for (s, d) in [(v4a, v4b), (v6a, v6b), (v4a, v6b), (v6a, v4b)] {
            let mut h = enc(version, s, d);
            let len = h.len();
            let (ws, wd) = unified(s, d);
            assert_eq!(
                parse(&h),
                header(len, version, Some(ws), Some(wd)),
                "{version:?} {s} {d}"
            );
            // Payload after the header is not part of it.
            h.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            assert_eq!(
                parse(&h),
                header(len, version, Some(ws), Some(wd)),
                "{version:?} {s} {d} + payload"
            );
        }
    }
}

#[test]
fn round_trips_random_pairs() {
    const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
    println!("seed {SEED:#x}");
    let mut rng = Rng(SEED);
    for _ in 0..20_000 {
        let src = {
            let v6 = rng.below(2) == 0;
            rng.addr(v6)
        };
        let dst = {
            let v6 = rng.below(2) == 0;
            rng.addr(v6)
        };
        let (ws, wd) = unified(src, dst);
        for version in [Version::V1, Version::V2] {
            let h = enc(version, src, dst);
            assert!(h.len() <= MAX_ENCODED);
            assert_eq!(
                parse(&h),
                header(h.len(), version, Some(ws), Some(wd)),
                "{version:?} {src} {dst}"
            );
        }
    }
}

#[test]
fn ipv6_text_is_rfc5952() {
    // std's Display is RFC 5952 except that it writes ::a.b.c.d forms; compare away from those.
    const SEED: u64 = 0x0123_4567_89ab_cdef;
    println!("seed {SEED:#x}");
    let mut rng = Rng(SEED);
    let mut compared = 0;
    for _ in 0..20_000 {
        let ip = rng.ipv6();
        if ip.segments()[..5] == [0; 5] {
            continue;
        }
        let h = enc(
            Version::V1,
            SocketAddr::new(IpAddr::V6(ip), 1),
            sa("[::]:2"),
        );
        assert_eq!(h, format!("PROXY TCP6 {ip} :: 1 2\r\n").as_bytes());
        compared += 1;
    }
    assert!(compared > 15_000);
}

#[test]
fn every_strict_prefix_is_incomplete() {
    for h in valid_headers() {
        let whole = parse(&h);
        assert!(
            matches!(whole, Ok(Parsed::Header { len, .. }) if len == h.len()),
            "{whole:?} for {h:?}"
        );
        for k in 0..h.len() {
            assert_eq!(
                parse(&h[..k]),
                Ok(Parsed::Incomplete),
                "prefix {k} of {h:?}"
            );
        }
    }
}

#[test]
fn unknown_and_local_keep_the_real_addresses() {
    assert_eq!(
        parse(b"PROXY UNKNOWN\r\n"),
        header(15, Version::V1, None, None)
    );
    assert_eq!(
        parse(b"PROXY UNKNOWN 1.2.3.4 nonsense\r\nrest"),
        header(32, Version::V1, None, None)
    );
    assert_eq!(parse(UNKNOWN_WORST), header(107, Version::V1, None, None));
    // LOCAL: the address block (and the family) are skipped, whatever they hold.
    assert_eq!(
        parse(&v2(0x20, 0x00, 0, &[])),
        header(16, Version::V2, None, None)
    );
    assert_eq!(
        parse(&v2(0x20, 0x11, 12, &[9; 12])),
        header(28, Version::V2, None, None)
    );
    assert_eq!(
        parse(&v2(0x20, 0xff, 4, &[9; 4])),
        header(20, Version::V2, None, None)
    );
    // PROXY with UNSPEC or UNIX addresses: accepted, real peer kept.
    assert_eq!(
        parse(&v2(0x21, 0x00, 5, &[9; 5])),
        header(21, Version::V2, None, None)
    );
    assert_eq!(
        parse(&v2(0x21, 0x32, 216, &[0; 216])),
        header(232, Version::V2, None, None)
    );
}

#[test]
fn v2_udp_and_tlvs() {
    let udp = v2(
        0x21,
        0x12,
        12,
        &[192, 0, 2, 1, 192, 0, 2, 2, 0x30, 0x39, 0, 53],
    );
    assert_eq!(
        parse(&udp),
        header(
            28,
            Version::V2,
            Some(sa("192.0.2.1:12345")),
            Some(sa("192.0.2.2:53"))
        )
    );
    let mut block = [0u8; 36 + 7];
    block[15] = 1;
    block[31] = 2;
    block[33] = 3;
    block[35] = 4;
    block[36..].copy_from_slice(&[0x04, 0x00, 0x04, 1, 2, 3, 4]); // a NOOP TLV, skipped
    let h = v2(0x21, 0x22, 43, &block);
    assert_eq!(
        parse(&h),
        header(59, Version::V2, Some(sa("[::1]:3")), Some(sa("[::2]:4")))
    );
}

#[test]
fn near_misses_are_invalid() {
    let good2 = enc(Version::V2, sa("1.2.3.4:5"), sa("6.7.8.9:10"));
    let with = |at: usize, b: u8| {
        let mut h = good2.clone();
        h[at] = b;
        h
    };
    let mut too_long = b"PROXY UNKNOWN ".to_vec();
    too_long.resize(MAX_INBOUND, b'a');
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (with(12, 0x11), "bad v2 version"),
        (with(12, 0x31), "bad v2 version"),
        (with(12, 0x22), "bad v2 command"),
        (with(12, 0x2f), "bad v2 command"),
        (with(13, 0x13), "bad v2 family"),
        (with(13, 0x10), "bad v2 family"),
        (with(13, 0x41), "bad v2 family"),
        (v2(0x21, 0x11, 11, &[0; 11]), "v2 address block truncated"),
        (v2(0x21, 0x21, 35, &[0; 35]), "v2 address block truncated"),
        (v2(0x21, 0x21, 12, &[0; 12]), "v2 address block truncated"),
        (v2(0x21, 0x31, 215, &[0; 215]), "v2 address block truncated"),
        (v2(0x21, 0x11, 513, &[]), "v2 header too long"),
        (v2(0x20, 0x00, 0xffff, &[]), "v2 header too long"),
        (
            b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            "v1 fields not separated by exactly one space",
        ),
        (
            b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n".to_vec(),
            "v1 fields not separated by exactly one space",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n".to_vec(),
            "v1 fields not separated by exactly one space",
        ),
        (
            b" PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            "not a PROXY protocol header",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n".to_vec(),
            "bad v1 port",
        ),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999".to_vec(), "bad v1 port"),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n".to_vec(),
            "bad v1 port",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(),
            "bad v1 port",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".to_vec(),
            "v1 has too many fields",
        ),
        (b"PROXY TCP4 ::1 ::2 1 2\r\n".to_vec(), "bad v1 address"),
        (
            b"PROXY TCP4 1.2.3.4 ::ffff:5.6.7.8 1 2\r\n".to_vec(),
            "bad v1 address",
        ),
        (
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            "bad v1 address",
        ),
        (
            b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            "bad v1 address",
        ),
        (
            b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n".to_vec(),
            "bad v1 address",
        ),
        (
            b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            "bad v1 address",
        ),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n".to_vec(), "bad v1 address"),
        (
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n".to_vec(),
            "bad v1 address",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n".to_vec(),
            "v1 has too few fields",
        ),
        (b"PROXY TCP4\r\n".to_vec(), "v1 has too few fields"),
        (
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            "bad v1 protocol",
        ),
        (b"PROXY UNKNOWNX\r\n".to_vec(), "bad v1 protocol"),
        (b"PROXY\tTCP4".to_vec(), "bad v1 signature"),
        (
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            "not a PROXY protocol header",
        ),
        (b"Proxy".to_vec(), "bad v1 signature"),
        (b"PROXY UNKNOWN\n".to_vec(), "v1 line ends in LF without CR"),
        (
            b"PROXY UNKNOWN\rX".to_vec(),
            "v1 line ends in CR without LF",
        ),
        (
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n".to_vec(),
            "v1 line ends in LF without CR",
        ),
        // 108 bytes with the CRLF; and 106 bytes without a CR, so the line cannot end by 107.
        (
            [&UNKNOWN_WORST[..105], b"5\r\n"].concat(),
            "v1 line too long",
        ),
        (too_long[..106].to_vec(), "v1 line too long"),
        (too_long, "v1 line too long"),
    ];
    // Every single-byte change to the signature is refused (the first byte picks no version).
    for (at, &b) in good2[..12].iter().enumerate() {
        let reason = if at == 0 {
            "not a PROXY protocol header"
        } else {
            "bad v2 signature"
        };
        cases.push((with(at, b ^ 0x40), reason));
    }
    for (bytes, reason) in cases {
        assert_eq!(
            parse(&bytes),
            Err(Invalid(reason)),
            "{:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
}

#[test]
fn other_protocols_are_refused_at_their_first_bytes() {
    let others: [&[u8]; 6] = [
        b"GET / HTTP/1.1\r\n",
        b"POST /x HTTP/1.1\r\n",
        b"PUT",
        b"SSH-2.0-OpenSSH_9.6\r\n",
        &[0x16, 0x03, 0x01, 0x02, 0x00], // TLS ClientHello
        b"\r\n\r\nQUIT",
    ];
    for other in others {
        let refused_at = (1..=other.len()).find(|&k| parse(&other[..k]).is_err());
        assert!(
            refused_at.is_some_and(|k| k <= 5),
            "{other:?} refused at {refused_at:?}"
        );
    }
    assert_eq!(parse(b""), Ok(Parsed::Incomplete));
}

/// One parse under the properties: no panic; a header lies within the buffer and does not depend
/// on the bytes after it; Incomplete only below MAX_INBOUND; a prefix of anything not Invalid is
/// Incomplete (so Invalid never turns valid with more bytes).
fn check(buf: &[u8], rng: &mut Rng, headers: &mut usize) {
    let got = parse(buf);
    match got {
        Ok(Parsed::Header { len, .. }) => {
            assert!(
                len <= buf.len() && len <= MAX_INBOUND,
                "len {len} for {buf:?}"
            );
            assert_eq!(parse(&buf[..len]), got, "{buf:?}");
            *headers += 1;
            if *headers % 16 == 0 {
                for k in 0..len {
                    assert_eq!(
                        parse(&buf[..k]),
                        Ok(Parsed::Incomplete),
                        "prefix {k} of {buf:?}"
                    );
                }
            } else {
                let k = rng.below(len);
                assert_eq!(
                    parse(&buf[..k]),
                    Ok(Parsed::Incomplete),
                    "prefix {k} of {buf:?}"
                );
            }
        }
        Ok(Parsed::Incomplete) => {
            assert!(
                buf.len() < MAX_INBOUND,
                "Incomplete with {} bytes",
                buf.len()
            );
            let k = rng.below(buf.len() + 1);
            assert_eq!(
                parse(&buf[..k]),
                Ok(Parsed::Incomplete),
                "prefix {k} of {buf:?}"
            );
        }
        Err(Invalid(reason)) => assert!(!reason.is_empty()),
    }
}

/// Bytes that matter to the grammar, so random input gets past the first checks often.
const INTERESTING: &[u8] =
    b"PROXY TCP46UNKOWN \r\n\0QUIT0123456789abcdefABCDEF:.+-\x11\x12\x21\x22\x31\x20\xff";

#[test]
fn property_random_and_mutated_input() {
    const SEED: u64 = 0xc0ff_ee00_dead_beef;
    println!("seed {SEED:#x}");
    let mut rng = Rng(SEED);
    let corpus = valid_headers();
    let mut headers = 0;
    let pick = |rng: &mut Rng| {
        if rng.below(2) == 0 {
            INTERESTING[rng.below(INTERESTING.len())]
        } else {
            rng.byte()
        }
    };
    let mut buf = Vec::with_capacity(2 * MAX_INBOUND);
    for _ in 0..200_000 {
        buf.clear();
        // Half start with a valid prefix, so random bytes land in every parser state.
        if rng.below(2) == 0 {
            let base = &corpus[rng.below(corpus.len())];
            buf.extend_from_slice(&base[..rng.below(base.len() + 1)]);
        }
        let long = rng.below(8) == 0;
        let extra = rng.below(if long { 700 } else { 40 });
        for _ in 0..extra {
            let b = pick(&mut rng);
            buf.push(b);
        }
        check(&buf, &mut rng, &mut headers);
    }
    let random_headers = headers;
    for _ in 0..200_000 {
        buf.clear();
        buf.extend_from_slice(&corpus[rng.below(corpus.len())]);
        for _ in 0..rng.below(24) {
            let b = rng.byte();
            buf.push(b);
        }
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(buf.len() + 1);
            match rng.below(5) {
                0 if at < buf.len() => buf[at] ^= 1 << rng.below(8),
                1 => buf.truncate(at),
                2 => {
                    let b = pick(&mut rng);
                    buf.insert(at, b);
                }
                3 if at < buf.len() => {
                    buf.remove(at);
                }
                _ if at < buf.len() => buf[at] = pick(&mut rng),
                _ => {}
            }
        }
        check(&buf, &mut rng, &mut headers);
    }
    println!(
        "headers found: {random_headers} from random input, {} from mutations",
        headers - random_headers
    );
    assert!(
        headers - random_headers > 10_000,
        "mutations should often stay valid"
    );
}
