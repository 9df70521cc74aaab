//! The ClientHello message (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2), read in place across the
//! records that carry it: the server name (RFC 6066 §3), the ALPN names (RFC 7301) and whether
//! an `encrypted_client_hello` extension (ECH, RFC 9849) is present. Everything else is skipped
//! by its length.
//!
//! PURE: no I/O, no panics; every read is bounds-checked against both the buffer and the
//! handshake message's own length, and any mismatch is an error. It allocates only the result
//! (the name, the ALPN names). The record headers were already validated by `record.rs`; they
//! are walked again here (cheaply, by their lengths) instead of being stored, which would need
//! a list as long as the number of records.

use super::name::{self, MAX_NAME};

/// How many ALPN names a [`Hello`] keeps; the rest are checked and skipped. Clients send one to
/// three (plus a GREASE value); the cap bounds the allocations a hostile hello can cause.
pub const MAX_ALPN: usize = 16;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_ECH: u16 = 0xfe0d;
const NAME_TYPE_HOST: u8 = 0;

/// What a ClientHello says about where it wants to go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// The `host_name` of the server_name extension, lowercased, without a trailing dot, and
    /// only if it is a valid host name (see `name.rs`; an IP literal, an empty or a non-ASCII
    /// name is `None`, like a hello without the extension).
    pub sni: Option<String>,
    /// The ALPN protocol names in the client's order (GREASE values included: they match no
    /// route), at most [`MAX_ALPN`].
    pub alpn: Vec<Vec<u8>>,
    /// An `encrypted_client_hello` extension is present: `sni` is then the outer, public name.
    /// Browsers also send a GREASE ECH extension when they have no ECH config, so this is set
    /// for most browser hellos whose `sni` is the real name.
    pub ech: bool,
    /// Bytes of the stream up to the hello's last byte (record headers included).
    pub total_len: usize,
    /// TLS records the hello spanned.
    pub records: usize,
}

/// Reads the ClientHello whose last byte is at stream offset `end - 1` (as found by the record
/// walk). `Err` says what was inconsistent.
pub(crate) fn parse(buf: &[u8], end: usize) -> Result<Hello, &'static str> {
    let mut c = Cursor {
        buf,
        pos: 0,
        rec_end: 0,
        records: 0,
        taken: 0,
        limit: 4,
    };
    if c.u8()? != 1 {
        return Err("first handshake message is not a ClientHello");
    }
    let len = c.u24()?;
    c.limit = 4 + len;

    let mut hello = Hello::default();
    if c.u16()? >> 8 != 3 {
        return Err("ClientHello version is not 3.x");
    }
    c.skip(32)?; // random
    let session_id = c.u8()?;
    if session_id > 32 {
        return Err("session id longer than 32 bytes");
    }
    c.skip(usize::from(session_id))?;
    let suites = c.u16()?;
    if suites < 2 || suites % 2 != 0 {
        return Err("bad cipher_suites length");
    }
    c.skip(usize::from(suites))?;
    let compressions = c.u8()?;
    if compressions == 0 {
        return Err("no compression method");
    }
    c.skip(usize::from(compressions))?;

    if c.taken < c.limit {
        let ext_len = usize::from(c.u16()?);
        if c.taken + ext_len != c.limit {
            return Err("extensions length does not match the ClientHello length");
        }
        let (mut seen_sni, mut seen_alpn) = (false, false);
        while c.taken < c.limit {
            let typ = c.u16()?;
            let len = usize::from(c.u16()?);
            if c.limit - c.taken < len {
                return Err("extension longer than the ClientHello");
            }
            let start = c.taken;
            match typ {
                EXT_SERVER_NAME => {
                    if std::mem::replace(&mut seen_sni, true) {
                        return Err("two server_name extensions");
                    }
                    hello.sni = server_name(&mut c, len)?;
                }
                EXT_ALPN => {
                    if std::mem::replace(&mut seen_alpn, true) {
                        return Err("two ALPN extensions");
                    }
                    alpn(&mut c, len, &mut hello.alpn)?;
                }
                EXT_ECH => {
                    if std::mem::replace(&mut hello.ech, true) {
                        return Err("two encrypted_client_hello extensions");
                    }
                    c.skip(len)?;
                }
                _ => c.skip(len)?,
            }
            if c.taken != start + len {
                return Err("extension contents do not fill its length");
            }
        }
    }
    if c.pos != end {
        // The record walk and this read disagree: the caller passed a different buffer.
        return Err("ClientHello does not end where its records said");
    }
    hello.total_len = c.pos;
    hello.records = c.records;
    Ok(hello)
}

/// `server_name` extension: a list of (type, opaque<1..2^16-1>) entries with at most one
/// host_name. Entries of other types (none are defined) are skipped by their length.
fn server_name(c: &mut Cursor, len: usize) -> Result<Option<String>, &'static str> {
    let list = usize::from(c.u16()?);
    if list == 0 || list + 2 != len {
        return Err("bad server_name list length");
    }
    let mut left = list;
    let mut found = None;
    let mut seen_host = false;
    while left > 0 {
        if left < 3 {
            return Err("truncated server_name entry");
        }
        let typ = c.u8()?;
        let n = usize::from(c.u16()?);
        left -= 3;
        if n > left {
            return Err("server_name entry longer than its list");
        }
        left -= n;
        if typ != NAME_TYPE_HOST {
            c.skip(n)?;
            continue;
        }
        if std::mem::replace(&mut seen_host, true) {
            return Err("two host names in server_name");
        }
        found = host_name(c, n)?;
    }
    Ok(found)
}

/// Reads a host_name of `n` bytes: `Some` only for a valid host name (see `name.rs`).
fn host_name(c: &mut Cursor, n: usize) -> Result<Option<String>, &'static str> {
    // One byte over MAX_NAME leaves room for a trailing dot.
    let mut raw = [0u8; MAX_NAME + 1];
    let Some(dst) = raw.get_mut(..n) else {
        c.skip(n)?;
        return Ok(None);
    };
    c.read(dst)?;
    let mut out = [0u8; MAX_NAME];
    let Ok(k) = name::normalize(&raw[..n], &mut out) else {
        return Ok(None);
    };
    // normalize() leaves only ASCII, so this never fails; no unwrap on the data path anyway.
    Ok(std::str::from_utf8(&out[..k]).ok().map(String::from))
}

/// ALPN extension: a list (at least one) of names of 1..=255 bytes.
fn alpn(c: &mut Cursor, len: usize, out: &mut Vec<Vec<u8>>) -> Result<(), &'static str> {
    let list = usize::from(c.u16()?);
    if list < 2 || list + 2 != len {
        return Err("bad ALPN list length");
    }
    let mut left = list;
    while left > 0 {
        let n = usize::from(c.u8()?);
        left -= 1;
        if n == 0 || n > left {
            return Err("empty ALPN name, or one longer than its list");
        }
        left -= n;
        if out.len() < MAX_ALPN {
            let mut name = vec![0u8; n];
            c.read(&mut name)?;
            out.push(name);
        } else {
            c.skip(n)?;
        }
    }
    Ok(())
}

/// Reads the handshake message as one byte string, stepping over record headers.
struct Cursor<'a> {
    buf: &'a [u8],
    /// Stream offset of the next byte.
    pos: usize,
    /// End of the current record's fragment.
    rec_end: usize,
    records: usize,
    /// Handshake bytes read so far, and how many the message has.
    taken: usize,
    limit: usize,
}

impl Cursor<'_> {
    /// The next contiguous run of message bytes (at most `max`), entering the next record if
    /// the current one is used up.
    fn chunk(&mut self, max: usize) -> Result<&[u8], &'static str> {
        if self.limit - self.taken < max {
            return Err("field longer than the ClientHello");
        }
        while self.pos == self.rec_end {
            let Some(&[_, _, _, hi, lo]) = self.buf.get(self.pos..self.pos + 5) else {
                return Err("record header missing");
            };
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            if len == 0 {
                return Err("empty handshake record");
            }
            self.pos += 5;
            self.rec_end = self.pos + len;
            self.records += 1;
        }
        let n = max.min(self.rec_end - self.pos);
        let Some(bytes) = self.buf.get(self.pos..self.pos + n) else {
            return Err("ClientHello truncated");
        };
        self.pos += n;
        self.taken += n;
        Ok(bytes)
    }

    fn read(&mut self, dst: &mut [u8]) -> Result<(), &'static str> {
        let mut done = 0;
        while done < dst.len() {
            let bytes = self.chunk(dst.len() - done)?;
            dst[done..done + bytes.len()].copy_from_slice(bytes);
            done += bytes.len();
        }
        Ok(())
    }

    fn skip(&mut self, n: usize) -> Result<(), &'static str> {
        let mut done = 0;
        while done < n {
            done += self.chunk(n - done)?.len();
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        let mut b = [0u8; 1];
        self.read(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        let mut b = [0u8; 2];
        self.read(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u24(&mut self) -> Result<usize, &'static str> {
        let mut b = [0u8; 3];
        self.read(&mut b)?;
        Ok(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}
