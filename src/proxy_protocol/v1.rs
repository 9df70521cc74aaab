//! Version 1: one US-ASCII line, `PROXY TCP4|TCP6 src dst sport dport\r\n` or
//! `PROXY UNKNOWN[ anything]\r\n`, at most 107 bytes with the CRLF. Parsing is strict (single
//! spaces, canonical decimal ports, addresses of the announced family) and checks every prefix as
//! it arrives, so a peer that is not sending this line is refused at its first wrong byte.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Invalid, Pair, Parsed, Version, MAX_ENCODED};

/// The longest line a receiver must accept, CRLF included (the spec's UNKNOWN worst case).
pub(super) const MAX_LINE: usize = 107;
/// The longest address texts we wait for: `255.255.255.255`, and IPv6 with a dotted IPv4 tail,
/// `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255` (the spec's hex-only form needs 39).
const MAX_V4_TEXT: usize = 15;
const MAX_V6_TEXT: usize = 45;

pub(super) fn encode(pair: Pair, out: &mut [u8; MAX_ENCODED]) -> usize {
    // The longest output, TCP6 with eight 4-digit groups each side, is 104 bytes: every write
    // below stays inside `out`.
    let mut w = Writer { out, len: 0 };
    let (sport, dport) = match pair {
        Pair::V4(s, d) => {
            w.put(b"PROXY TCP4 ");
            w.ipv4(*s.ip());
            w.put(b" ");
            w.ipv4(*d.ip());
            (s.port(), d.port())
        }
        Pair::V6(s, d) => {
            w.put(b"PROXY TCP6 ");
            w.ipv6(*s.ip());
            w.put(b" ");
            w.ipv6(*d.ip());
            (s.port(), d.port())
        }
    };
    w.put(b" ");
    w.number(sport, 10);
    w.put(b" ");
    w.number(dport, 10);
    w.put(b"\r\n");
    w.len
}

/// Appends to the fixed output buffer; std's `Display` would do, but it prints IPv4-mapped IPv6
/// with a dotted tail, which the spec's grammar (hex groups only) does not allow.
struct Writer<'a> {
    out: &'a mut [u8; MAX_ENCODED],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// `n` in base 10 or 16, lowercase, without leading zeros.
    fn number(&mut self, mut n: u16, base: u16) {
        let mut digits = [0u8; 5];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b"0123456789abcdef"[usize::from(n % base)];
            n /= base;
            if n == 0 {
                break;
            }
        }
        self.put(&digits[at..]);
    }

    fn ipv4(&mut self, ip: Ipv4Addr) {
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                self.put(b".");
            }
            self.number(u16::from(octet), 10);
        }
    }

    /// RFC 5952: lowercase hex, no leading zeros, the longest run (the first of equals) of two or
    /// more zero groups written as `::`.
    fn ipv6(&mut self, ip: Ipv6Addr) {
        let groups = ip.segments();
        let (mut best_at, mut best_len, mut run_at, mut run_len) = (0, 0, 0, 0);
        for (i, &g) in groups.iter().enumerate() {
            if g == 0 {
                if run_len == 0 {
                    run_at = i;
                }
                run_len += 1;
                if run_len > best_len {
                    (best_at, best_len) = (run_at, run_len);
                }
            } else {
                run_len = 0;
            }
        }
        if best_len < 2 {
            self.groups(&groups);
        } else {
            self.groups(&groups[..best_at]);
            self.put(b"::");
            self.groups(&groups[best_at + best_len..]);
        }
    }

    fn groups(&mut self, groups: &[u16]) {
        for (i, &g) in groups.iter().enumerate() {
            if i > 0 {
                self.put(b":");
            }
            self.number(g, 16);
        }
    }
}

pub(super) fn parse(buf: &[u8]) -> Result<Parsed, Invalid> {
    // The CR of a line that fits in MAX_LINE is at index MAX_LINE - 2 at the latest.
    let window = &buf[..buf.len().min(MAX_LINE - 1)];
    match window.iter().position(|&b| b == b'\r' || b == b'\n') {
        Some(i) if window[i] == b'\n' => Err(Invalid("v1 line ends in LF without CR")),
        Some(i) => match buf.get(i + 1) {
            // The line itself is final: check it whole, then wait for the LF.
            None => line(&buf[..i], true).map(|_| Parsed::Incomplete),
            Some(b'\n') => {
                let addrs = line(&buf[..i], true)?;
                Ok(Parsed::Header {
                    len: i + 2,
                    version: Version::V1,
                    source: addrs.map(|a| a.0),
                    dest: addrs.map(|a| a.1),
                })
            }
            Some(_) => Err(Invalid("v1 line ends in CR without LF")),
        },
        None => {
            line(window, false)?;
            if buf.len() >= MAX_LINE - 1 {
                Err(Invalid("v1 line too long"))
            } else {
                Ok(Parsed::Incomplete)
            }
        }
    }
}

/// Checks a line without its CRLF. `complete`: the CR was seen, so the last field is whole; else
/// the last field is a prefix still arriving. Returns the addresses of a complete TCP4/TCP6 line;
/// None for UNKNOWN or a prefix.
fn line(line: &[u8], complete: bool) -> Result<Option<(SocketAddr, SocketAddr)>, Invalid> {
    // "the receiver must ignore anything presented before the CRLF is found".
    if let Some(rest) = line.strip_prefix(b"PROXY UNKNOWN") {
        if rest.first().is_none_or(|&b| b == b' ') {
            return Ok(None);
        }
    }
    let mut v6 = false;
    let mut ips = [None; 2];
    let mut ports = [0u16; 2];
    let mut count = 0;
    let mut fields = line.split(|&b| b == b' ').peekable();
    while let Some(field) = fields.next() {
        let i = count;
        count += 1;
        let partial = !complete && fields.peek().is_none();
        if field.is_empty() && !partial {
            return Err(Invalid("v1 fields not separated by exactly one space"));
        }
        match i {
            0 => {
                if !token(field, b"PROXY", partial) {
                    return Err(Invalid("bad v1 signature"));
                }
            }
            1 => {
                v6 = match field {
                    b"TCP4" => false,
                    b"TCP6" => true,
                    _ if partial
                        && [&b"TCP4"[..], b"TCP6", b"UNKNOWN"]
                            .iter()
                            .any(|t| t.starts_with(field)) =>
                    {
                        false
                    }
                    _ => return Err(Invalid("bad v1 protocol")),
                }
            }
            2 | 3 => ips[i - 2] = address(field, v6, partial)?,
            4 | 5 => ports[i - 4] = port(field)?,
            _ => return Err(Invalid("v1 has too many fields")),
        }
    }
    if complete && count < 6 {
        return Err(Invalid("v1 has too few fields"));
    }
    match ips {
        [Some(s), Some(d)] if complete => Ok(Some((
            SocketAddr::new(s, ports[0]),
            SocketAddr::new(d, ports[1]),
        ))),
        _ => Ok(None),
    }
}

/// `field` is `want`, or (while it arrives) a prefix of it.
fn token(field: &[u8], want: &[u8], partial: bool) -> bool {
    field == want || (partial && want.starts_with(field))
}

/// A whole address of the announced family, or None for a prefix that may still become one.
fn address(field: &[u8], v6: bool, partial: bool) -> Result<Option<IpAddr>, Invalid> {
    const BAD: Invalid = Invalid("bad v1 address");
    if partial {
        let plausible = if v6 {
            field.len() <= MAX_V6_TEXT
                && field
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        } else {
            field.len() <= MAX_V4_TEXT && field.iter().all(|&b| b.is_ascii_digit() || b == b'.')
        };
        return if plausible { Ok(None) } else { Err(BAD) };
    }
    // std's parsers are strict where the spec is: IPv4 without leading zeros, IPv6 of exactly 128
    // bits with at most one `::`. They also take a dotted IPv4 tail in IPv6, as inet_pton does.
    let text = std::str::from_utf8(field).map_err(|_| BAD)?;
    let ip = if v6 {
        text.parse::<Ipv6Addr>().map(IpAddr::V6)
    } else {
        text.parse::<Ipv4Addr>().map(IpAddr::V4)
    };
    ip.map(Some).map_err(|_| BAD)
}

/// A decimal port in 0..=65535 without sign or leading zeros, whole or still arriving (a prefix
/// is checked the same way: every prefix of a valid port is itself in range).
fn port(field: &[u8]) -> Result<u16, Invalid> {
    const BAD: Invalid = Invalid("bad v1 port");
    if field.len() > 5
        || !field.iter().all(u8::is_ascii_digit)
        || (field.len() > 1 && field[0] == b'0')
    {
        return Err(BAD);
    }
    let value = field
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(value).map_err(|_| BAD)
}
