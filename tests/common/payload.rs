//! Deterministic payloads and the client side of a byte stream: a seeded xorshift pattern, a
//! hand-written FNV-1a digest, and helpers that send, receive and echo patterns over a socket.
//!
//! Every socket made here has read and write timeouts, so a stuck proxy fails a test instead of
//! hanging it. Nothing here knows about ringlb.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

/// Read/write timeout of every socket the harness opens: a safety net, never a measurement.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of a client connect to the load balancer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const CHUNK: usize = 64 * 1024;

/// An endless deterministic byte stream (xorshift64*), identical whatever the chunking.
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at 0; mixing the seed keeps nearby seeds unrelated.
        let state = (seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1;
        Pattern {
            state,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.used < 8 {
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let mut words = buf[i..].chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_word());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            let n = tail.len();
            tail.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    /// The first `len` bytes of the pattern for `seed`, for payloads small enough to hold.
    pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        Pattern::new(seed).fill(&mut v);
        v
    }
}

/// Length and 64-bit FNV-1a hash of a byte stream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    pub len: u64,
    pub hash: u64,
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes, fnv1a {:016x}", self.len, self.hash)
    }
}

/// Streaming 64-bit FNV-1a.
#[derive(Clone)]
pub struct Hasher {
    len: u64,
    hash: u64,
}

impl Default for Hasher {
    fn default() -> Self {
        Hasher {
            len: 0,
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.hash;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.hash = h;
        self.len += bytes.len() as u64;
    }

    pub fn digest(&self) -> Digest {
        Digest {
            len: self.len,
            hash: self.hash,
        }
    }
}

pub fn digest_of(bytes: &[u8]) -> Digest {
    let mut h = Hasher::default();
    h.update(bytes);
    h.digest()
}

/// Digest of the first `len` bytes of the pattern for `seed`, computed without a socket.
pub fn pattern_digest(len: u64, seed: u64) -> Digest {
    send_pattern(&mut io::sink(), len, seed).expect("writing to io::sink cannot fail")
}

/// Writes `len` bytes of the pattern for `seed`; returns what was written.
pub fn send_pattern(w: &mut impl Write, len: u64, seed: u64) -> io::Result<Digest> {
    let mut p = Pattern::new(seed);
    let mut h = Hasher::default();
    let mut buf = vec![0; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    w.flush()?;
    Ok(h.digest())
}

/// Reads until EOF; returns what was read. An error (timeout, reset) is returned as is.
pub fn recv_to_eof(r: &mut impl Read) -> io::Result<Digest> {
    let mut h = Hasher::default();
    let mut buf = vec![0; CHUNK];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(h.digest()),
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("after {} bytes received: {e}", h.len),
                ))
            }
        }
    }
}

/// Sets the harness timeouts on a stream (both directions).
pub fn set_timeouts(s: &TcpStream) {
    s.set_read_timeout(Some(IO_TIMEOUT))
        .expect("set_read_timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("set_write_timeout");
}

/// Connects to `addr` with [`CONNECT_TIMEOUT`] and the harness I/O timeouts.
pub fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    set_timeouts(&s);
    Ok(s)
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Connects to `addr` from source address `src` (e.g. `127.0.3.7:0`, any address in 127/8 on
/// loopback) with [`CONNECT_TIMEOUT`] and the harness I/O timeouts: a distinct client IP per
/// socket for tests of source-address hashing.
pub fn try_connect_from(src: SocketAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    s.bind(&src.into())?;
    s.connect_timeout(&addr.into(), CONNECT_TIMEOUT)?;
    let s: TcpStream = s.into();
    set_timeouts(&s);
    Ok(s)
}

pub fn connect_from(src: SocketAddr, addr: SocketAddr) -> TcpStream {
    try_connect_from(src, addr).unwrap_or_else(|e| panic!("connect from {src} to {addr}: {e}"))
}

/// Writes `len` pattern bytes on one thread and reads the echo on this one, so payloads larger
/// than the socket buffers cannot deadlock. The client half-closes after its last byte and then
/// expects every byte back followed by EOF. Errors carry what went wrong and how far it got.
pub fn try_echo_stream(stream: &mut TcpStream, len: u64, seed: u64) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let (sent, received) = std::thread::scope(|s| {
        let w = s.spawn(move || -> io::Result<Digest> {
            let d = send_pattern(&mut writer, len, seed)?;
            writer.shutdown(Shutdown::Write)?;
            Ok(d)
        });
        let received = recv_to_eof(stream);
        let sent = w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (sent, received)
    });
    let sent = sent.map_err(|e| io::Error::new(e.kind(), format!("sending: {e}")))?;
    let received = received.map_err(|e| io::Error::new(e.kind(), format!("receiving: {e}")))?;
    if sent != received {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("echo mismatch: sent {sent:?}, received {received:?}"),
        ));
    }
    Ok(())
}

/// Connects to `addr` and runs [`try_echo_stream`].
pub fn try_echo(addr: SocketAddr, len: u64, seed: u64) -> io::Result<()> {
    let mut s = try_connect(addr)?;
    try_echo_stream(&mut s, len, seed)
}

pub fn echo(addr: SocketAddr, len: u64, seed: u64) {
    if let Err(e) = try_echo(addr, len, seed) {
        panic!("echo of {len} bytes (seed {seed:#x}) through {addr}: {e}");
    }
}

/// One request/response on a connection that stays open: writes `len` pattern bytes (small
/// enough to sit in socket buffers) and reads exactly as many back.
pub fn try_ping(s: &mut TcpStream, len: usize, seed: u64) -> io::Result<()> {
    let out = Pattern::bytes(seed, len);
    s.write_all(&out)?;
    let mut back = vec![0; len];
    s.read_exact(&mut back)?;
    if back != out {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "ping mismatch: sent {:?}, received {:?}",
                digest_of(&out),
                digest_of(&back)
            ),
        ));
    }
    Ok(())
}

pub fn ping(s: &mut TcpStream, len: usize, seed: u64) {
    let peer = s.peer_addr().ok();
    if let Err(e) = try_ping(s, len, seed) {
        panic!("ping of {len} bytes (seed {seed:#x}) to {peer:?}: {e}");
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum StreamEnd {
    Eof,
    Reset,
}

/// Waits for the peer to end the stream, discarding data: `Ok(Eof | Reset)` or the error (a
/// timeout included) that stopped the wait.
pub fn wait_stream_end(s: &mut TcpStream, timeout: Duration) -> io::Result<StreamEnd> {
    s.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(StreamEnd::Eof),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(StreamEnd::Reset),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_independent_of_chunking() {
        let whole = Pattern::bytes(7, 1000);
        let mut p = Pattern::new(7);
        let mut pieces = vec![0; 1000];
        let mut at = 0;
        for n in [1, 3, 8, 13, 64, 5, 906] {
            p.fill(&mut pieces[at..at + n]);
            at += n;
        }
        assert_eq!(whole, pieces);
        assert_eq!(digest_of(&whole), pattern_digest(1000, 7));
        assert_ne!(Pattern::bytes(8, 1000), whole);
    }
}
