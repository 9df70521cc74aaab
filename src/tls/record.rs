//! The TLS record layer at the start of a client's stream, as far as the ClientHello reaches:
//! [`HelloReader`] walks record headers and counts handshake bytes until the whole ClientHello
//! message is in, then hands the records to `hello.rs` to read the message itself.
//!
//! PURE: no I/O, no allocation. The reader keeps a few integers between calls so that feeding
//! it a stream that grows byte by byte costs O(total length), not O(length²) — a client that
//! sends one byte per segment is exactly what a hostile or broken peer does.
//!
//! Every verdict depends only on the bytes, never on how they were split into calls: the checks
//! run in a fixed order on the state reached so far, and a check that needs bytes not yet there
//! waits for them. In particular the size check (is the smallest hello these bytes could still
//! become longer than `max_bytes`?) runs before each step, so a stream gets the same answer
//! however it was segmented.

use super::hello::{self, Hello};

/// The listener's default `tls_inspect.max_bytes`: one full TLS record. ClientHellos of 2025
/// browsers with post-quantum key shares are about 1.8 KB.
pub const DEFAULT_MAX_BYTES: usize = 16_384;

const RECORD_HEADER: usize = 5;
/// RFC 8446 §5.1: a plaintext record fragment is at most 2^14 bytes.
const MAX_FRAGMENT: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_HEADER: usize = 4;
const CLIENT_HELLO: u8 = 1;
/// legacy_version 2 + random 32 + session id length 1 + one cipher suite 2+2 + one compression
/// method 1+1; extensions are optional (SSL 3.0, TLS 1.0 without them).
const MIN_BODY: usize = 41;

/// The smallest possible ClientHello on the wire (one record, no extensions). A `max_bytes`
/// below this makes every answer [`Inspect::TooLarge`]; the config should refuse such a value.
pub const MIN_HELLO_LEN: usize = RECORD_HEADER + HANDSHAKE_HEADER + MIN_BODY;

/// What the bytes at the start of a stream are, so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inspect {
    /// A ClientHello may still arrive. `at_least` is a lower bound on the stream length needed
    /// before the answer can change (exact when the rest of the hello lies in the record whose
    /// header is already in); it is always greater than the bytes given and at most
    /// `max_bytes`, so a caller holding `max_bytes` bytes always has a final answer.
    NeedMore { at_least: usize },
    /// The stream does not start with a TLS handshake record.
    NotTls,
    /// The ClientHello (with its record headers) would be longer than `max_bytes`.
    TooLarge,
    /// TLS records or a ClientHello that contradict themselves; the reason is for debug logs.
    Malformed(&'static str),
    /// A complete, well-formed ClientHello.
    Hello(Hello),
}

impl Inspect {
    /// A short name for metrics labels and logs: `need_more`, `not_tls`, `too_large`,
    /// `malformed`, `hello`.
    pub fn label(&self) -> &'static str {
        match self {
            Inspect::NeedMore { .. } => "need_more",
            Inspect::NotTls => "not_tls",
            Inspect::TooLarge => "too_large",
            Inspect::Malformed(_) => "malformed",
            Inspect::Hello(_) => "hello",
        }
    }
}

/// Answers [`Inspect`] for `buf`, the first bytes of a stream, in one call.
pub fn inspect(buf: &[u8], max_bytes: usize) -> Inspect {
    HelloReader::new(max_bytes).feed(buf)
}

/// A final answer the record walk reached (the hello's own contents are read on `Complete`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    NotTls,
    TooLarge,
    Malformed(&'static str),
    Complete,
}

/// Incremental reader of one stream's ClientHello: call [`HelloReader::feed`] with all bytes
/// seen from the start of the stream each time more have arrived (a `MSG_PEEK` buffer). A few
/// words of state and no heap, so it can live in a connection's slot.
#[derive(Clone, Debug)]
pub struct HelloReader {
    max_bytes: usize,
    /// Stream offset up to which bytes have been checked.
    pos: usize,
    /// End of the current record's fragment; equal to `pos` at a record boundary.
    rec_end: usize,
    /// Records started so far.
    records: usize,
    /// The handshake header (type, 24-bit length), which may itself span records.
    hs_head: [u8; HANDSHAKE_HEADER],
    hs_head_len: usize,
    /// ClientHello body bytes still to come, once `hs_head` is complete.
    remaining: usize,
    verdict: Option<Verdict>,
}

impl HelloReader {
    /// A reader that gives up on hellos longer than `max_bytes` (record headers included).
    pub fn new(max_bytes: usize) -> HelloReader {
        HelloReader {
            max_bytes,
            pos: 0,
            rec_end: 0,
            records: 0,
            hs_head: [0; HANDSHAKE_HEADER],
            hs_head_len: 0,
            remaining: 0,
            verdict: None,
        }
    }

    /// Looks at `peeked`, all bytes from the start of the stream so far (each call's buffer
    /// extends the previous one). Examines at most `max_bytes` of them. Once the answer is not
    /// `NeedMore` it stays the same for longer buffers; a buffer that does not extend the
    /// previous one gets some answer, never a panic.
    pub fn feed(&mut self, peeked: &[u8]) -> Inspect {
        let buf = &peeked[..peeked.len().min(self.max_bytes)];
        if self.verdict.is_none() {
            self.verdict = self.advance(buf);
        }
        match self.verdict {
            None => Inspect::NeedMore {
                at_least: self.lower_bound(),
            },
            Some(Verdict::NotTls) => Inspect::NotTls,
            Some(Verdict::TooLarge) => Inspect::TooLarge,
            Some(Verdict::Malformed(why)) => Inspect::Malformed(why),
            Some(Verdict::Complete) => match hello::parse(buf, self.pos) {
                Ok(h) => Inspect::Hello(h),
                Err(why) => {
                    self.verdict = Some(Verdict::Malformed(why));
                    Inspect::Malformed(why)
                }
            },
        }
    }

    /// The shortest stream that could still hold the whole hello, from what is known: the rest
    /// of the handshake message (or, before its header, the smallest one), plus one more record
    /// header if it cannot fit in the current record.
    fn lower_bound(&self) -> usize {
        let need = if self.hs_head_len < HANDSHAKE_HEADER {
            HANDSHAKE_HEADER - self.hs_head_len + MIN_BODY
        } else {
            self.remaining
        };
        let in_record = self.rec_end - self.pos;
        if need <= in_record {
            self.pos + need
        } else {
            self.rec_end + RECORD_HEADER + (need - in_record)
        }
    }

    /// Walks as far as `buf` allows; `None` means more bytes are needed.
    fn advance(&mut self, buf: &[u8]) -> Option<Verdict> {
        loop {
            if self.lower_bound() > self.max_bytes {
                return Some(Verdict::TooLarge);
            }
            if self.pos == self.rec_end {
                let head = buf.get(self.pos..).unwrap_or(&[]);
                if let Some(v) = check_header(head, self.records == 0) {
                    return Some(v);
                }
                let &[_, _, _, hi, lo, ..] = head else {
                    return None;
                };
                let len = usize::from(u16::from_be_bytes([hi, lo]));
                if len == 0 {
                    return Some(Verdict::Malformed("empty handshake record"));
                }
                if len > MAX_FRAGMENT {
                    return Some(Verdict::Malformed("record longer than 2^14 bytes"));
                }
                self.pos += RECORD_HEADER;
                self.rec_end = self.pos + len;
                self.records += 1;
                continue;
            }
            let available = self.rec_end.min(buf.len());
            if self.pos >= available {
                return None;
            }
            if self.hs_head_len < HANDSHAKE_HEADER {
                let b = buf[self.pos];
                if self.hs_head_len == 0 && b != CLIENT_HELLO {
                    return Some(Verdict::Malformed(
                        "first handshake message is not a ClientHello",
                    ));
                }
                self.hs_head[self.hs_head_len] = b;
                self.hs_head_len += 1;
                self.pos += 1;
                if self.hs_head_len == HANDSHAKE_HEADER {
                    let [_, a, b, c] = self.hs_head;
                    self.remaining = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                    if self.remaining < MIN_BODY {
                        return Some(Verdict::Malformed(
                            "ClientHello shorter than its fixed fields",
                        ));
                    }
                }
                continue;
            }
            let take = (available - self.pos).min(self.remaining);
            self.pos += take;
            self.remaining -= take;
            if self.remaining == 0 {
                return Some(Verdict::Complete);
            }
        }
    }
}

/// Checks the bytes of a record header that are present (type, version major, version minor),
/// in that order. The first record decides whether this is TLS at all; a later one that does
/// not continue the handshake is a broken hello.
fn check_header(head: &[u8], first: bool) -> Option<Verdict> {
    let bad = |why| {
        Some(if first {
            Verdict::NotTls
        } else {
            Verdict::Malformed(why)
        })
    };
    match head {
        [t, ..] if *t != CONTENT_HANDSHAKE => bad("another record type inside the ClientHello"),
        [_, major, ..] if *major != 3 => bad("record version is not 3.x"),
        [_, _, minor, ..] if *minor > 4 => bad("record version is not 3.0..3.4"),
        _ => None,
    }
}
