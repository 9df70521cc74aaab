//! TLS passthrough inspection: read the ClientHello at the start of a client's stream (SNI,
//! ALPN, whether ECH is offered) without terminating TLS, and pick a route from it.
//!
//! PURE and on the data path: no I/O, no clocks, no `unsafe`, no panic on any input, work linear
//! in the bytes given and never past `max_bytes` of them. The only allocations are the result's
//! own (the server name, the ALPN names) and the route table's, built once per config.
//!
//! The caller peeks the stream (`MSG_PEEK`, nothing consumed) and hands [`HelloReader::feed`] all
//! bytes seen so far, after each arrival, until the answer is not [`Inspect::NeedMore`]; the whole
//! hello is then forwarded byte-exact with the rest of the stream. The reader reassembles the
//! handshake message across TCP segments *and* across TLS records: a hello with a post-quantum
//! key share (X25519MLKEM768 adds 1,216 bytes) spans segments, and a client may fragment it over
//! several handshake records (HAProxy #3148, ingress-nginx #11498 broke on that in 2025).
//!
//! What counts as TLS: the stream starts with a handshake record (content type 22) whose
//! version is 3.0 to 3.4 (`0x0300..=0x0304`; clients write 3.1 or 3.3 there, SSL 3.0's record
//! layer has the same shape and carries no SNI, so it reaches the default route as a hello
//! without a name). Anything else in the first three bytes is [`Inspect::NotTls`]: plain HTTP,
//! an SSH banner, an SSLv2-format hello (first byte has its high bit set). After that, any
//! inconsistency is [`Inspect::Malformed`]: a record of length 0 or over 2^14, another content
//! type before the hello is complete (RFC 8446 §5.1 forbids interleaving), a first handshake
//! message that is not a ClientHello, lengths inside the hello that do not add up, a duplicated
//! SNI, ALPN or ECH extension, two host names, an empty ALPN name.
//!
//! Files: `record.rs` the record layer and the reader's state; `hello.rs` the ClientHello body;
//! `name.rs` the host-name rules shared with route patterns; `route.rs` the route table; tests in
//! `tests_*.rs` (hand-built hellos, real rustls hellos, a seeded property test).

mod hello;
mod name;
mod record;
mod route;

#[cfg(test)]
mod tests_build;
#[cfg(test)]
mod tests_hello;
#[cfg(test)]
mod tests_prop;
#[cfg(test)]
mod tests_route;
#[cfg(test)]
mod tests_rustls;

pub use hello::{Hello, MAX_ALPN};
pub use name::{NameError, MAX_NAME};
pub use record::{inspect, HelloReader, Inspect, DEFAULT_MAX_BYTES, MIN_HELLO_LEN};
pub use route::{Route, RouteError, RouteField, RouteTable};
