//! Version 2: the 12-byte signature, version/command, family/protocol, a big-endian length and
//! that many bytes of addresses followed by TLVs (which we skip without looking inside).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Invalid, Pair, Parsed, Version, MAX_ENCODED, MAX_INBOUND};

/// `\r\n\r\n\0\r\nQUIT\n`: chosen by the spec to be rejected by common protocols' parsers.
pub(super) const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family/protocol, length.
const FIXED: usize = 16;
/// Version 2 in the high nibble.
const VERSION: u8 = 0x20;
const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;
const TCP4: u8 = 0x11;
const UDP4: u8 = 0x12;
const TCP6: u8 = 0x21;
const UDP6: u8 = 0x22;
const UNSPEC: u8 = 0x00;
const UNIX_STREAM: u8 = 0x31;
const UNIX_DGRAM: u8 = 0x32;
/// Two addresses and two ports.
const INET_LEN: usize = 4 + 4 + 2 + 2;
const INET6_LEN: usize = 16 + 16 + 2 + 2;
/// Two `sun_path`s of 108 bytes.
const UNIX_LEN: usize = 108 + 108;

pub(super) fn encode(pair: Pair, out: &mut [u8; MAX_ENCODED]) -> usize {
    out[..12].copy_from_slice(&SIGNATURE);
    out[12] = VERSION | CMD_PROXY;
    let body = match pair {
        Pair::V4(s, d) => {
            out[13] = TCP4;
            out[16..20].copy_from_slice(&s.ip().octets());
            out[20..24].copy_from_slice(&d.ip().octets());
            out[24..26].copy_from_slice(&s.port().to_be_bytes());
            out[26..28].copy_from_slice(&d.port().to_be_bytes());
            INET_LEN
        }
        Pair::V6(s, d) => {
            out[13] = TCP6;
            out[16..32].copy_from_slice(&s.ip().octets());
            out[32..48].copy_from_slice(&d.ip().octets());
            out[48..50].copy_from_slice(&s.port().to_be_bytes());
            out[50..52].copy_from_slice(&d.port().to_be_bytes());
            INET6_LEN
        }
    };
    // INET6_LEN is 36: always fits the u16 length field.
    out[14..16].copy_from_slice(&(body as u16).to_be_bytes());
    FIXED + body
}

pub(super) fn parse(buf: &[u8]) -> Result<Parsed, Invalid> {
    // Each fixed byte is checked as soon as it arrives, so garbage is refused early.
    let seen = buf.len().min(SIGNATURE.len());
    if buf[..seen] != SIGNATURE[..seen] {
        return Err(Invalid("bad v2 signature"));
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Parsed::Incomplete);
    };
    if ver_cmd & 0xf0 != VERSION {
        return Err(Invalid("bad v2 version"));
    }
    let command = ver_cmd & 0x0f;
    if command != CMD_LOCAL && command != CMD_PROXY {
        return Err(Invalid("bad v2 command"));
    }
    let Some(&family) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // LOCAL: the spec says the family is ignored along with the whole address block.
    let needed = if command == CMD_LOCAL {
        0
    } else {
        match family {
            TCP4 | UDP4 => INET_LEN,
            TCP6 | UDP6 => INET6_LEN,
            UNIX_STREAM | UNIX_DGRAM => UNIX_LEN,
            UNSPEC => 0,
            _ => return Err(Invalid("bad v2 family")),
        }
    };
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(Parsed::Incomplete);
    };
    let len = FIXED + usize::from(u16::from_be_bytes([hi, lo]));
    if len > MAX_INBOUND {
        return Err(Invalid("v2 header too long"));
    }
    if len < FIXED + needed {
        return Err(Invalid("v2 address block truncated"));
    }
    let Some(block) = buf.get(FIXED..len) else {
        return Ok(Parsed::Incomplete);
    };
    let (source, dest) = if command == CMD_LOCAL {
        (None, None)
    } else {
        match addresses(family, block) {
            Some((s, d)) => (Some(s), Some(d)),
            None => (None, None),
        }
    };
    Ok(Parsed::Header {
        len,
        version: Version::V2,
        source,
        dest,
    })
}

/// The source and destination in an address block already known to be long enough for `family`;
/// None for the families that keep the real peer address (UNSPEC, UNIX).
fn addresses(family: u8, block: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let port = |at: usize| Some(u16::from_be_bytes([*block.get(at)?, *block.get(at + 1)?]));
    match family {
        TCP4 | UDP4 => {
            let src: [u8; 4] = block.get(0..4)?.try_into().ok()?;
            let dst: [u8; 4] = block.get(4..8)?.try_into().ok()?;
            Some((
                SocketAddr::from((Ipv4Addr::from(src), port(8)?)),
                SocketAddr::from((Ipv4Addr::from(dst), port(10)?)),
            ))
        }
        TCP6 | UDP6 => {
            let src: [u8; 16] = block.get(0..16)?.try_into().ok()?;
            let dst: [u8; 16] = block.get(16..32)?.try_into().ok()?;
            Some((
                SocketAddr::from((Ipv6Addr::from(src), port(32)?)),
                SocketAddr::from((Ipv6Addr::from(dst), port(34)?)),
            ))
        }
        _ => None,
    }
}
