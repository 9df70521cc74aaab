//! Test helpers: build ClientHellos byte by byte (so each test states exactly what is on the
//! wire), split a handshake message over records and a stream over segments, and a seeded
//! generator for the property tests.

use super::*;

pub const EXT_SNI: u16 = 0;
pub const EXT_ALPN: u16 = 16;
pub const EXT_ECH: u16 = 0xfe0d;
pub const EXT_PADDING: u16 = 21;

/// The fields of a ClientHello body; `extensions: None` leaves the extensions block out.
#[derive(Clone)]
pub struct Spec {
    pub version: u16,
    pub session_id: Vec<u8>,
    pub suites: Vec<u16>,
    pub compressions: Vec<u8>,
    pub extensions: Option<Vec<(u16, Vec<u8>)>>,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            version: 0x0303,
            session_id: vec![7; 32],
            suites: vec![0x1301, 0x1302, 0xc02f],
            compressions: vec![0],
            extensions: Some(Vec::new()),
        }
    }
}

impl Spec {
    /// A hello naming `sni` and offering `alpn`.
    pub fn with(sni: Option<&str>, alpn: &[&str]) -> Spec {
        let mut ext = Vec::new();
        if let Some(name) = sni {
            ext.push(sni_ext(&[(0, name.as_bytes())]));
        }
        if !alpn.is_empty() {
            let names: Vec<&[u8]> = alpn.iter().map(|a| a.as_bytes()).collect();
            ext.push(alpn_ext(&names));
        }
        // supported_versions, as every TLS 1.3 hello has.
        ext.push((43, vec![4, 0x03, 0x04, 0x03, 0x03]));
        Spec {
            extensions: Some(ext),
            ..Spec::default()
        }
    }

    pub fn ext(mut self, typ: u16, data: Vec<u8>) -> Spec {
        self.extensions
            .get_or_insert_with(Vec::new)
            .push((typ, data));
        self
    }

    /// The handshake message: type 1, 24-bit length, body.
    pub fn message(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(self.version.to_be_bytes());
        b.extend([0x42; 32]);
        b.push(self.session_id.len() as u8);
        b.extend(&self.session_id);
        b.extend((2 * self.suites.len() as u16).to_be_bytes());
        for s in &self.suites {
            b.extend(s.to_be_bytes());
        }
        b.push(self.compressions.len() as u8);
        b.extend(&self.compressions);
        if let Some(exts) = &self.extensions {
            let mut e = Vec::new();
            for (typ, data) in exts {
                e.extend(typ.to_be_bytes());
                e.extend((data.len() as u16).to_be_bytes());
                e.extend(data);
            }
            b.extend((e.len() as u16).to_be_bytes());
            b.extend(e);
        }
        handshake(1, &b)
    }

    /// The message in one record.
    pub fn wire(&self) -> Vec<u8> {
        records(&self.message(), &[])
    }
}

pub fn handshake(typ: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![typ];
    m.extend(&(body.len() as u32).to_be_bytes()[1..]);
    m.extend(body);
    m
}

/// server_name extension with the given (type, name) entries.
pub fn sni_ext(entries: &[(u8, &[u8])]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for (typ, name) in entries {
        list.push(*typ);
        list.extend((name.len() as u16).to_be_bytes());
        list.extend(*name);
    }
    let mut d = (list.len() as u16).to_be_bytes().to_vec();
    d.extend(list);
    (EXT_SNI, d)
}

pub fn alpn_ext(names: &[&[u8]]) -> (u16, Vec<u8>) {
    let mut list = Vec::new();
    for n in names {
        list.push(n.len() as u8);
        list.extend(*n);
    }
    let mut d = (list.len() as u16).to_be_bytes().to_vec();
    d.extend(list);
    (EXT_ALPN, d)
}

pub fn record(typ: u8, fragment: &[u8]) -> Vec<u8> {
    let mut r = vec![typ, 3, 1];
    r.extend((fragment.len() as u16).to_be_bytes());
    r.extend(fragment);
    r
}

/// `msg` as handshake records of the given fragment sizes; what is left goes in a last one.
pub fn records(msg: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = msg;
    for &n in sizes {
        let n = n.min(rest.len());
        if n == 0 {
            break;
        }
        out.extend(record(22, &rest[..n]));
        rest = &rest[n..];
    }
    if !rest.is_empty() {
        out.extend(record(22, rest));
    }
    out
}

/// Joins the fragments of handshake records (the inverse of [`records`] on well-formed input).
pub fn defragment(wire: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut p = 0;
    while p + 5 <= wire.len() {
        let len = u16::from_be_bytes([wire[p + 3], wire[p + 4]]) as usize;
        out.extend(&wire[p + 5..(p + 5 + len).min(wire.len())]);
        p += 5 + len;
    }
    out
}

/// Feeds `wire` to one reader in growing prefixes ending at each of `cuts` and then at the
/// end, checking on the way that every answer before the last is NeedMore with a sane bound.
pub fn feed_in_steps(wire: &[u8], cuts: &[usize], max_bytes: usize) -> Inspect {
    let mut r = HelloReader::new(max_bytes);
    for &c in cuts {
        let c = c.min(wire.len());
        match r.feed(&wire[..c]) {
            Inspect::NeedMore { at_least } => {
                assert!(
                    at_least > c && at_least <= max_bytes,
                    "at_least {at_least} at {c}"
                )
            }
            other => return other,
        }
    }
    r.feed(wire)
}

pub fn hello(r: Inspect) -> Hello {
    match r {
        Inspect::Hello(h) => h,
        other => panic!("expected a Hello, got {other:?}"),
    }
}

/// xorshift64*: deterministic, no dependency. Tests print their seeds.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    /// `n` random cut points in `0..=len`, sorted.
    pub fn cuts(&mut self, len: usize, n: usize) -> Vec<usize> {
        let mut c: Vec<usize> = (0..n).map(|_| self.below(len + 1)).collect();
        c.sort_unstable();
        c
    }

    /// Random record fragment sizes (1..=max each) covering about `len` bytes.
    pub fn fragments(&mut self, len: usize, max: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = 1 + self.below(max.min(left));
            sizes.push(n);
            left -= n;
        }
        sizes
    }
}
