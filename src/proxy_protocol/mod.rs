//! The PROXY protocol (HAProxy's `doc/proxy-protocol.txt`), versions 1 (text) and 2 (binary):
//! [`encode`] writes the header a backend sees in front of a relayed client connection, and
//! [`parse`] reads one at the start of an inbound connection from a trusted proxy.
//!
//! PURE and on the data path: no I/O, no clocks, no allocation, no `unsafe`, no panic on any
//! input. The caller owns sockets and buffers; this module only looks at bytes. [`parse`] answers
//! [`Parsed::Incomplete`] only for a buffer shorter than [`MAX_INBOUND`] that can still grow into
//! a valid header, so a caller that reads until it gets an answer holds at most `MAX_INBOUND`
//! bytes and refuses a peer that speaks something else after its first bytes, not at a timeout.
//!
//! Files: `trust.rs` which peers may send a header; `v1.rs` the text line; `v2.rs` the binary header; `tests.rs` round trips, golden bytes,
//! near misses and a seeded property test.

use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};

mod trust;
mod v1;
mod v2;

pub use trust::{trusted, Cidr};

#[cfg(test)]
mod tests;

/// Which PROXY protocol header to send or to expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Human-readable line, `PROXY TCP4 ...\r\n`.
    V1,
    /// Binary header with the 12-byte signature.
    V2,
}

impl Version {
    /// Parses a config value: `"v1"` or `"v2"`.
    pub fn from_name(s: &str) -> Option<Version> {
        match s {
            "v1" => Some(Version::V1),
            "v2" => Some(Version::V2),
            _ => None,
        }
    }

    /// The config spelling, the inverse of [`Version::from_name`].
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// Large enough for any header we emit (v1 TCP6 max 104 bytes; v2 with IPv6 = 52).
pub const MAX_ENCODED: usize = 108;

/// The longest inbound header we accept: v1 is at most 107 bytes; v2 is 16 + len, we accept len
/// up to 512 (TLVs skipped).
pub const MAX_INBOUND: usize = 16 + 512;

/// What [`parse`] found at the start of a byte stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Need more bytes (the buffer is a valid prefix of some header).
    Incomplete,
    /// A complete header of `len` bytes. `source`/`dest` are None for v1 "UNKNOWN" and v2 LOCAL /
    /// AF_UNSPEC / AF_UNIX (the connection then keeps its real peer address).
    Header {
        len: usize,
        version: Version,
        source: Option<SocketAddr>,
        dest: Option<SocketAddr>,
    },
}

/// Why a byte stream is not a PROXY protocol header; the caller closes the connection.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid PROXY protocol header: {}", self.0)
    }
}

impl std::error::Error for Invalid {}

/// Source and destination of one connection, in one address family.
#[derive(Clone, Copy)]
enum Pair {
    V4(SocketAddrV4, SocketAddrV4),
    V6(SocketAddrV6, SocketAddrV6),
}

impl Pair {
    /// Both header versions carry one family for both ends. Addresses from one socket share a
    /// family, but the caller may pass a configured one: a mixed pair goes to IPv6 with the IPv4
    /// end written as IPv4-mapped (`::ffff:a.b.c.d`).
    fn new(src: SocketAddr, dst: SocketAddr) -> Pair {
        match (src, dst) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => Pair::V4(s, d),
            (SocketAddr::V6(s), SocketAddr::V6(d)) => Pair::V6(s, d),
            (SocketAddr::V4(s), SocketAddr::V6(d)) => Pair::V6(mapped(s), d),
            (SocketAddr::V6(s), SocketAddr::V4(d)) => Pair::V6(s, mapped(d)),
        }
    }
}

fn mapped(a: SocketAddrV4) -> SocketAddrV6 {
    SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0)
}

/// Writes the header a backend should see for a client connection from `src` accepted on `dst`.
/// Returns the length. Mixed families (IPv4 src, IPv6 dst or the reverse): map the IPv4 one to
/// IPv4-mapped IPv6 so both are one family.
pub fn encode(
    version: Version,
    src: SocketAddr,
    dst: SocketAddr,
    out: &mut [u8; MAX_ENCODED],
) -> usize {
    let pair = Pair::new(src, dst);
    match version {
        Version::V1 => v1::encode(pair, out),
        Version::V2 => v2::encode(pair, out),
    }
}

/// Parses the start of a connection's byte stream. Never panics, never reads past `buf`, bounded
/// time (it looks at no more than [`MAX_INBOUND`] bytes). Bytes after the header are not looked at.
pub fn parse(buf: &[u8]) -> Result<Parsed, Invalid> {
    // The first byte tells the versions apart: v1 starts with 'P', the v2 signature with CR.
    match buf.first() {
        None => Ok(Parsed::Incomplete),
        Some(b'P') => v1::parse(buf),
        Some(b'\r') => v2::parse(buf),
        Some(_) => Err(Invalid("not a PROXY protocol header")),
    }
}
