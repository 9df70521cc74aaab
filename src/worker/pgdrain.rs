//! `drain_mode = "postgres"`: a PURE reader of the PostgreSQL wire protocol's message framing in
//! the bytes a connection forwards, so that a connection to a backend being drained can be
//! closed at the first moment the session is idle (between transactions).
//!
//! Both directions are followed, one byte slice at a time as it is forwarded, with no buffering:
//! only message boundaries, a header of at most 8 bytes, and the status byte of a
//! `ReadyForQuery` are kept. The client's stream starts untyped (`SSLRequest`, `GSSENCRequest`,
//! then the `StartupMessage`: length + code), then carries typed messages (1 type byte + 4-byte
//! big-endian length that counts itself); the backend answers each SSL/GSS request with one byte
//! (`S`/`G`: encryption follows, `N`: refused) and otherwise sends typed messages.
//!
//! The session is idle when the backend's last message was `ReadyForQuery` with status `I`,
//! every request the client sent that the backend answers with a `ReadyForQuery` (the startup,
//! `Query`, `Sync`, `FunctionCall`) has had its answer, and the client sent nothing since. An
//! encrypted session, a direct TLS hello, or framing that makes no sense makes the tracker
//! opaque: it never reports idle, and the connection falls back to `drain_timeout`.
//! Must not: do I/O, allocate, or hold bytes.

/// `SSLRequest` and `GSSENCRequest` codes (in the place of a protocol version).
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
/// A startup-phase message longer than this is not PostgreSQL (a TLS hello read as a length is
/// hundreds of megabytes); PostgreSQL's own limit is 10,000 bytes.
const MAX_STARTUP_LEN: u32 = 10_000;

/// The `Terminate` message a client ends its session with.
pub const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Framing of one direction.
#[derive(Clone, Copy, Debug, Default)]
struct Framer {
    /// Header bytes gathered so far (typed: type + length; untyped: length + code).
    head: [u8; 8],
    have: u8,
    /// Body bytes of the current message still to pass.
    left: u32,
    /// The type byte of the current typed message.
    ty: u8,
}

/// What a direction's bytes revealed, for the tracker to act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// Client, startup phase: a message with this code (SSL/GSS request, startup, cancel).
    Untyped(u32),
    /// A typed message of this type began (its header is complete).
    Typed(u8),
    /// Backend: `ReadyForQuery` with this status byte.
    Ready(u8),
    /// The framing is broken.
    Bad,
}

impl Framer {
    /// Header length: 8 before the client's startup message is through, else 5.
    fn head_len(typed: bool) -> u8 {
        if typed {
            5
        } else {
            8
        }
    }

    /// Consumes bytes from `buf` up to the next event; returns (bytes used, event if any).
    fn step(&mut self, buf: &[u8], typed: bool) -> (usize, Option<Event>) {
        if self.left > 0 {
            if self.ty == b'Z' && typed {
                // ReadyForQuery's one body byte is its status.
                self.left = 0;
                self.ty = 0;
                return (1, Some(Event::Ready(buf[0])));
            }
            let n = (self.left as usize).min(buf.len());
            self.left -= n as u32;
            return (n, None);
        }
        let need = Self::head_len(typed);
        let take = usize::from(need - self.have).min(buf.len());
        let at = usize::from(self.have);
        self.head[at..at + take].copy_from_slice(&buf[..take]);
        self.have += take as u8;
        if self.have < need {
            return (take, None);
        }
        self.have = 0;
        let h = self.head;
        if typed {
            let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
            if len < 4 || (h[0] == b'Z' && len != 5) {
                return (take, Some(Event::Bad));
            }
            self.ty = h[0];
            self.left = len - 4;
            (take, Some(Event::Typed(h[0])))
        } else {
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            if !(8..=MAX_STARTUP_LEN).contains(&len) {
                return (take, Some(Event::Bad));
            }
            self.left = len - 8;
            (
                take,
                Some(Event::Untyped(u32::from_be_bytes([h[4], h[5], h[6], h[7]]))),
            )
        }
    }

    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }
}

/// One connection's PostgreSQL session state, fed with every byte forwarded either way.
#[derive(Clone, Copy, Debug, Default)]
pub struct PgTracker {
    up: Framer,
    down: Framer,
    /// The client's startup message is through: its stream is typed from here on.
    up_typed: bool,
    /// SSL/GSS requests the backend has not answered yet (each answer is one byte).
    negotiating: u8,
    /// Requests sent that the backend answers with a ReadyForQuery, not yet answered.
    outstanding: u32,
    idle: bool,
    opaque: bool,
}

impl PgTracker {
    pub const fn new() -> PgTracker {
        PgTracker {
            up: Framer {
                head: [0; 8],
                have: 0,
                left: 0,
                ty: 0,
            },
            down: Framer {
                head: [0; 8],
                have: 0,
                left: 0,
                ty: 0,
            },
            up_typed: false,
            negotiating: 0,
            outstanding: 0,
            idle: false,
            opaque: false,
        }
    }

    /// The session is idle: a connection closed now loses no transaction and no request, and
    /// cuts no message in half either way (a notice the backend is partway through sending
    /// waits for its last byte).
    pub fn is_idle(&self) -> bool {
        self.idle && !self.opaque && self.down.at_boundary() && self.up.at_boundary()
    }

    /// The session cannot be read (encrypted, or not PostgreSQL): it never reports idle.
    #[cfg(test)]
    pub fn is_opaque(&self) -> bool {
        self.opaque
    }

    /// Bytes forwarded in direction `d`.
    pub fn forwarded(&mut self, d: super::conn::Dir, buf: &[u8]) {
        match d {
            super::conn::Dir::Up => self.client_bytes(buf),
            super::conn::Dir::Down => self.backend_bytes(buf),
        }
    }

    /// Bytes the client sent (as forwarded to the backend).
    pub fn client_bytes(&mut self, mut buf: &[u8]) {
        if self.opaque || buf.is_empty() {
            return;
        }
        self.idle = false;
        while !buf.is_empty() && !self.opaque {
            let (n, ev) = self.up.step(buf, self.up_typed);
            buf = &buf[n..];
            match ev {
                Some(Event::Untyped(SSL_REQUEST | GSSENC_REQUEST)) => {
                    self.negotiating = self.negotiating.saturating_add(1);
                }
                Some(Event::Untyped(_)) => {
                    // The startup message (or a cancel request, after which the server closes).
                    self.up_typed = true;
                    self.outstanding = self.outstanding.saturating_add(1);
                }
                Some(Event::Typed(b'Q' | b'S' | b'F')) => {
                    self.outstanding = self.outstanding.saturating_add(1);
                }
                Some(Event::Bad) => self.opaque = true,
                Some(Event::Typed(_) | Event::Ready(_)) | None => {}
            }
        }
    }

    /// Bytes the backend sent (as forwarded to the client).
    pub fn backend_bytes(&mut self, mut buf: &[u8]) {
        while !buf.is_empty() && !self.opaque {
            if self.negotiating > 0 && self.down.at_boundary() {
                self.negotiating -= 1;
                match buf[0] {
                    b'N' => {
                        buf = &buf[1..];
                        continue;
                    }
                    b'S' | b'G' => {
                        self.opaque = true;
                        return;
                    }
                    // An error message instead of an answer (an old server): read it typed.
                    _ => self.negotiating = 0,
                }
            }
            let (n, ev) = self.down.step(buf, true);
            buf = &buf[n..];
            match ev {
                Some(Event::Ready(status)) => {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    self.idle = status == b'I' && self.outstanding == 0 && self.up.at_boundary();
                }
                // Notices, notifications and parameter changes come while idle too.
                Some(Event::Typed(b'N' | b'A' | b'S')) => {}
                Some(Event::Typed(_)) => self.idle = false,
                Some(Event::Bad) => self.opaque = true,
                Some(Event::Untyped(_)) | None => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![ty];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn untyped(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = (rest.len() as u32 + 8).to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(rest);
        v
    }

    fn startup() -> Vec<u8> {
        untyped(196_608, b"user\0postgres\0\0")
    }

    /// The backend's answer to a startup with trust auth: AuthenticationOk, a ParameterStatus,
    /// BackendKeyData, ReadyForQuery(I).
    fn login() -> Vec<u8> {
        let mut v = msg(b'R', &0u32.to_be_bytes());
        v.extend(msg(b'S', b"client_encoding\0UTF8\0"));
        v.extend(msg(b'K', &[0; 8]));
        v.extend(msg(b'Z', b"I"));
        v
    }

    /// A simple-query answer: CommandComplete then ReadyForQuery(status).
    fn answer(status: u8) -> Vec<u8> {
        let mut v = msg(b'C', b"BEGIN\0");
        v.extend(msg(b'Z', &[status]));
        v
    }

    /// Feeds `bytes` in pieces of `size`.
    fn feed(t: &mut PgTracker, bytes: &[u8], size: usize, client: bool) {
        for chunk in bytes.chunks(size) {
            if client {
                t.client_bytes(chunk);
            } else {
                t.backend_bytes(chunk);
            }
        }
    }

    #[test]
    fn a_transaction_is_idle_only_between_transactions_at_any_split() {
        for size in [1, 2, 3, 5, 7, 1000] {
            let mut t = PgTracker::new();
            feed(&mut t, &startup(), size, true);
            assert!(!t.is_idle());
            let login = login();
            // Idle only once the last byte of the ReadyForQuery has passed.
            feed(&mut t, &login[..login.len() - 1], size, false);
            assert!(!t.is_idle(), "split {size}: before the status byte");
            feed(&mut t, &login[login.len() - 1..], size, false);
            assert!(t.is_idle(), "split {size}: after login");
            feed(&mut t, &msg(b'Q', b"BEGIN\0"), size, true);
            assert!(!t.is_idle(), "split {size}: query sent");
            feed(&mut t, &answer(b'T'), size, false);
            assert!(!t.is_idle(), "split {size}: in a transaction");
            feed(&mut t, &msg(b'Q', b"COMMIT\0"), size, true);
            feed(&mut t, &answer(b'I'), size, false);
            assert!(t.is_idle(), "split {size}: after COMMIT");
            // A notice while idle keeps it idle once it is whole (never halfway through: a
            // close then would cut the client's stream mid-message); the client's next byte
            // ends it.
            let notice = msg(b'N', b"Mhello\0\0");
            for cut in 1..notice.len() {
                let mut half = t;
                feed(&mut half, &notice[..cut], size, false);
                assert!(!half.is_idle(), "split {size}: {cut} bytes of a notice");
            }
            feed(&mut t, &notice, size, false);
            assert!(t.is_idle(), "split {size}: a notice");
            t.client_bytes(b"Q");
            assert!(!t.is_idle(), "split {size}: half a query");
            assert!(!t.is_opaque());
        }
    }

    #[test]
    fn a_failed_transaction_is_not_idle() {
        let mut t = PgTracker::new();
        t.client_bytes(&startup());
        t.backend_bytes(&login());
        t.client_bytes(&msg(b'Q', b"BEGIN; SELECT 1/0\0"));
        let mut v = msg(b'E', b"SERROR\0\0");
        v.extend(msg(b'Z', b"E"));
        t.backend_bytes(&v);
        assert!(!t.is_idle());
    }

    #[test]
    fn pipelined_requests_wait_for_the_last_answer() {
        // Extended protocol, two Syncs sent before the first answer came back.
        let mut t = PgTracker::new();
        t.client_bytes(&startup());
        t.backend_bytes(&login());
        let mut batch = Vec::new();
        for _ in 0..2 {
            batch.extend(msg(b'P', b"\0SELECT 1\0\0\0"));
            batch.extend(msg(b'B', &[0; 6]));
            batch.extend(msg(b'E', &[0; 5]));
            batch.extend(msg(b'S', b""));
        }
        t.client_bytes(&batch);
        let mut reply = msg(b'1', b"");
        reply.extend(msg(b'2', b""));
        reply.extend(msg(b'D', &[0, 1, 0, 0, 0, 1, b'1']));
        reply.extend(msg(b'C', b"SELECT 1\0"));
        reply.extend(msg(b'Z', b"I"));
        t.backend_bytes(&reply);
        assert!(!t.is_idle(), "the second Sync is still unanswered");
        t.backend_bytes(&reply);
        assert!(t.is_idle());
    }

    #[test]
    fn extended_protocol_without_sync_is_not_idle() {
        let mut t = PgTracker::new();
        t.client_bytes(&startup());
        t.backend_bytes(&login());
        t.client_bytes(&msg(b'P', b"\0BEGIN\0\0\0"));
        t.client_bytes(&msg(b'H', b""));
        t.backend_bytes(&msg(b'1', b""));
        assert!(!t.is_idle());
    }

    #[test]
    fn a_refused_ssl_request_is_followed_and_an_accepted_one_is_opaque() {
        // SSLRequest answered N, then a plain startup.
        for size in [1, 3, 100] {
            let mut t = PgTracker::new();
            feed(&mut t, &untyped(SSL_REQUEST, b""), size, true);
            feed(&mut t, b"N", size, false);
            feed(&mut t, &startup(), size, true);
            feed(&mut t, &login(), size, false);
            assert!(t.is_idle() && !t.is_opaque(), "split {size}");
        }
        // GSS refused, then SSL refused, then startup.
        let mut t = PgTracker::new();
        t.client_bytes(&untyped(GSSENC_REQUEST, b""));
        t.backend_bytes(b"N");
        t.client_bytes(&untyped(SSL_REQUEST, b""));
        t.backend_bytes(b"N");
        t.client_bytes(&startup());
        t.backend_bytes(&login());
        assert!(t.is_idle());
        // Accepted: what follows is TLS (or GSS) records, never read.
        for answer in [b'S', b'G'] {
            let mut t = PgTracker::new();
            t.client_bytes(&untyped(SSL_REQUEST, b""));
            t.backend_bytes(&[answer]);
            assert!(t.is_opaque());
            t.client_bytes(&[0x16, 3, 1, 0, 200]);
            t.backend_bytes(&login());
            assert!(!t.is_idle(), "{}", answer as char);
        }
    }

    #[test]
    fn direct_tls_and_garbage_are_opaque() {
        // A TLS ClientHello as the first bytes (sslnegotiation=direct).
        let mut t = PgTracker::new();
        t.client_bytes(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]);
        assert!(t.is_opaque());
        // A typed message whose length is below its own size.
        let mut t = PgTracker::new();
        t.client_bytes(&startup());
        t.backend_bytes(&[b'R', 0, 0, 0, 2]);
        assert!(t.is_opaque());
        t.backend_bytes(&msg(b'Z', b"I"));
        assert!(!t.is_idle());
        // A ReadyForQuery of the wrong size.
        let mut t = PgTracker::new();
        t.client_bytes(&startup());
        t.backend_bytes(&msg(b'Z', b"II"));
        assert!(t.is_opaque() && !t.is_idle());
    }

    #[test]
    fn large_bodies_pass_without_being_held() {
        // A 1 MB DataRow split in odd pieces: only its header is looked at.
        let mut t = PgTracker::new();
        t.client_bytes(&startup());
        t.backend_bytes(&login());
        t.client_bytes(&msg(b'Q', b"SELECT big\0"));
        let mut v = msg(b'D', &vec![b'Z'; 1 << 20]);
        v.extend(msg(b'C', b"SELECT 1\0"));
        v.extend(msg(b'Z', b"I"));
        feed(&mut t, &v, 4093, false);
        assert!(t.is_idle() && !t.is_opaque());
        assert!(std::mem::size_of::<PgTracker>() <= 48);
    }
}
