//! Host-name rules shared by the ClientHello parser (the SNI a client sent) and the route table
//! (the names an operator wrote), so a pattern that passes validation can match a name that
//! passes parsing, and nothing else.
//!
//! PURE: no I/O, no allocation (names are normalised into a caller's stack buffer).
//!
//! A name is accepted when, after removing one trailing dot (RFC 6066 says SNI carries none, but
//! `example.com.` is the same host and some clients send it):
//! - it is 1..=253 bytes of ASCII letters, digits, `-`, `_` and `.` (A-labels only: a raw UTF-8
//!   U-label is refused, clients send the `xn--` form; `_` is outside LDH but real internal
//!   names use it and browsers send it, so refusing it would only route such names to the
//!   default);
//! - every label is 1..=63 bytes and neither starts nor ends with `-`;
//! - the last label is not all digits (RFC 6066 forbids IP literals in SNI; no TLD is numeric,
//!   so `10.0.0.1` is refused while `0.example.com` is not).
//!
//! It is lowercased: matching is case-insensitive (RFC 4343) and comparisons are then plain
//! byte compares.

/// Longest host name in text form without the trailing dot (RFC 1035: 255 octets on the wire).
pub const MAX_NAME: usize = 253;

/// Why a name was refused (used for route patterns; the parser only needs yes or no).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong,
    NotAscii,
    BadByte(u8),
    EmptyLabel,
    LabelTooLong,
    Hyphen,
    Numeric,
}

impl NameError {
    /// What is wrong, for an operator.
    pub fn reason(self) -> &'static str {
        match self {
            NameError::Empty => "empty name",
            NameError::TooLong => "longer than 253 characters",
            NameError::NotAscii => "not ASCII: write an internationalised name in its xn-- form",
            NameError::BadByte(_) => {
                "a host name holds only letters, digits, '-', '_' and '.' ('*' only as the whole \
                 leftmost label, as in \"*.example.com\")"
            }
            NameError::EmptyLabel => "empty label (two dots in a row, or a leading dot)",
            NameError::LabelTooLong => "a label is longer than 63 characters",
            NameError::Hyphen => "a label starts or ends with '-'",
            NameError::Numeric => "an IP address (SNI never carries one; RFC 6066)",
        }
    }
}

/// Validates `raw` and writes its lowercased form without a trailing dot into `out`, returning
/// its length. Examines at most `MAX_NAME + 1` bytes of `raw`.
pub fn normalize(raw: &[u8], out: &mut [u8; MAX_NAME]) -> Result<usize, NameError> {
    let raw = match raw {
        [head @ .., b'.'] => head,
        _ => raw,
    };
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    if raw.len() > MAX_NAME {
        return Err(NameError::TooLong);
    }
    for (i, &b) in raw.iter().enumerate() {
        let lower = match b {
            b'A'..=b'Z' => b.to_ascii_lowercase(),
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => b,
            0x80..=0xff => return Err(NameError::NotAscii),
            _ => return Err(NameError::BadByte(b)),
        };
        out[i] = lower;
    }
    let name = &out[..raw.len()];
    let mut last_numeric = false;
    for label in name.split(|&b| b == b'.') {
        match label {
            [] => return Err(NameError::EmptyLabel),
            l if l.len() > 63 => return Err(NameError::LabelTooLong),
            [b'-', ..] | [.., b'-'] => return Err(NameError::Hyphen),
            l => last_numeric = l.iter().all(u8::is_ascii_digit),
        }
    }
    if last_numeric {
        return Err(NameError::Numeric);
    }
    Ok(raw.len())
}

/// Byte order of the ASCII-lowercased forms: the route table's sort and search order, so a
/// name that was not lowercased (a hand-built [`super::Hello`]) still finds its route.
pub fn cmp_ignore_case(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let a = a.iter().map(u8::to_ascii_lowercase);
    let b = b.iter().map(u8::to_ascii_lowercase);
    a.cmp(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> Result<String, NameError> {
        let mut out = [0u8; MAX_NAME];
        let n = normalize(s.as_bytes(), &mut out)?;
        Ok(String::from_utf8(out[..n].to_vec()).unwrap())
    }

    #[test]
    fn accepts_and_lowercases_host_names() {
        assert_eq!(norm("API.Example.COM").unwrap(), "api.example.com");
        assert_eq!(norm("example.com.").unwrap(), "example.com");
        assert_eq!(norm("localhost").unwrap(), "localhost");
        assert_eq!(
            norm("_srv.my_host.example").unwrap(),
            "_srv.my_host.example"
        );
        assert_eq!(
            norm("xn--bcher-kva.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(norm("0.example.com").unwrap(), "0.example.com");
        let long = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(long.len(), 253);
        assert_eq!(norm(&long).unwrap(), long);
        assert_eq!(norm(&format!("{long}.")).unwrap(), long);
    }

    #[test]
    fn refuses_what_is_not_a_host_name() {
        assert_eq!(norm(""), Err(NameError::Empty));
        assert_eq!(norm("."), Err(NameError::Empty));
        assert_eq!(norm("a..b"), Err(NameError::EmptyLabel));
        assert_eq!(norm(".a.b"), Err(NameError::EmptyLabel));
        assert_eq!(norm("a.b.."), Err(NameError::EmptyLabel));
        assert_eq!(norm("bücher.example"), Err(NameError::NotAscii));
        assert_eq!(norm("a b.example"), Err(NameError::BadByte(b' ')));
        assert_eq!(norm("a\0.example"), Err(NameError::BadByte(0)));
        assert_eq!(norm("*.example.com"), Err(NameError::BadByte(b'*')));
        assert_eq!(norm("[::1]"), Err(NameError::BadByte(b'[')));
        assert_eq!(norm("-a.example"), Err(NameError::Hyphen));
        assert_eq!(norm("a-.example"), Err(NameError::Hyphen));
        assert_eq!(norm("10.0.0.1"), Err(NameError::Numeric));
        assert_eq!(norm(&"a".repeat(64)), Err(NameError::LabelTooLong));
        assert_eq!(norm(&"a.".repeat(128)), Err(NameError::TooLong));
    }

    #[test]
    fn case_insensitive_order() {
        use std::cmp::Ordering::*;
        assert_eq!(cmp_ignore_case(b"ABC", b"abc"), Equal);
        assert_eq!(cmp_ignore_case(b"abc", b"abd"), Less);
        assert_eq!(cmp_ignore_case(b"b", b"ABC"), Greater);
    }
}
