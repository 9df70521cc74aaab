//! Helpers for the operations tests (reload, drain, limits, PROXY protocol, keepalive): reloads
//! by SIGHUP with their log line, edits of a generated config (a backend's extra fields, a
//! listener's bind), backends that say their name and then echo, and a backend that parses the
//! PROXY header in front of each connection with ringlb's own codec before echoing.
//!
//! Like the rest of the harness: every socket has timeouts, every wait is bounded.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use ringlb::proxy_protocol::{parse, Parsed, Version, MAX_INBOUND};

use super::lb::Lb;
use super::servers::Server;

/// How long a reload may take to log its outcome (the machines can be busy).
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The first stderr line at or after `mark` containing `needle`, waiting up to `timeout`; panics
/// with the stderr tail if none comes.
pub fn log_line_since(lb: &Lb, mark: usize, needle: &str, timeout: Duration) -> String {
    assert!(
        lb.wait_for_log_since(mark, needle, timeout),
        "no `{needle}` line within {timeout:?}; stderr tail:\n{}",
        lb.stderr_tail(30)
    );
    lb.stderr_lines()[mark..]
        .iter()
        .find(|l| l.contains(needle))
        .cloned()
        .expect("the line just seen")
}

/// Writes `toml` to the LB's config file, sends SIGHUP and returns the log mark taken before
/// the signal with the `reload of ...` line that answered it (done or failed: not checked).
pub fn sighup_reload(lb: &Lb, toml: &str) -> (usize, String) {
    std::fs::write(lb.config_path(), toml)
        .unwrap_or_else(|e| panic!("rewrite {}: {e}", lb.config_path().display()));
    let mark = lb.log_len();
    lb.signal(Signal::SIGHUP);
    let line = log_line_since(lb, mark, "reload of", RELOAD_TIMEOUT);
    (mark, line)
}

/// [`sighup_reload`] that must succeed (`reload of PATH done: ...`).
pub fn reload_ok(lb: &Lb, toml: &str) -> (usize, String) {
    let (mark, line) = sighup_reload(lb, toml);
    let done = format!("reload of {} done", lb.config_path().display());
    assert!(
        line.contains(&done),
        "reload should have succeeded: {line}\nconfig:\n{toml}\nstderr tail:\n{}",
        lb.stderr_tail(20)
    );
    (mark, line)
}

/// The address of listener `name` from a `listener "NAME" listening on ADDR` line logged at or
/// after `mark` (a listener added by a reload).
pub fn listening_addr_since(lb: &Lb, mark: usize, name: &str) -> SocketAddr {
    let needle = format!("listener \"{name}\" listening on ");
    let line = log_line_since(lb, mark, &needle, RELOAD_TIMEOUT);
    let rest = &line[line.find(&needle).expect("needle") + needle.len()..];
    let token = rest.split_whitespace().next().unwrap_or_default();
    token
        .trim_end_matches([',', ';', ')', '.'])
        .parse()
        .unwrap_or_else(|e| panic!("address in {line:?}: {e}"))
}

/// `toml` with the backend entry `{ address = "ADDR" }` (as [`super::config`] writes it) given
/// extra fields, e.g. `max_connections = 2`. Panics if the entry is not there.
pub fn with_backend_fields(toml: &str, addr: SocketAddr, fields: &str) -> String {
    let needle = format!("{{ address = \"{addr}\" }}");
    assert!(toml.contains(&needle), "no `{needle}` in config:\n{toml}");
    toml.replace(&needle, &format!("{{ address = \"{addr}\", {fields} }}"))
}

/// `toml` with listener `name` bound to `bind` (text written verbatim) instead of the
/// harness's `127.0.0.1:0`. Panics if the listener is not there.
pub fn with_bind(toml: &str, name: &str, bind: &str) -> String {
    let needle = format!("name = \"{name}\"\nbind = \"127.0.0.1:0\"\n");
    assert!(
        toml.contains(&needle),
        "no listener {name:?} on 127.0.0.1:0 in config:\n{toml}"
    );
    toml.replace(&needle, &format!("name = \"{name}\"\nbind = \"{bind}\"\n"))
}

fn echo_rest(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<()> {
    loop {
        let n = match s.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return s.shutdown(Shutdown::Write);
        }
        s.write_all(&buf[..n])?;
    }
}

/// Writes `NAME\n` as soon as it accepts, then echoes until the client's EOF: a client learns
/// which backend it reached, and the connection can stay open as long as the test likes.
pub struct NamedEcho {
    server: Server,
    name: String,
}

impl NamedEcho {
    pub fn start(name: &str) -> NamedEcho {
        let line = format!("{name}\n").into_bytes();
        let server = Server::start(&format!("named-echo-{name}"), move |s| {
            s.write_all(&line)?;
            echo_rest(s, &mut [0u8; 4096])
        });
        NamedEcho {
            server,
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::ops::Deref for NamedEcho {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// Reads a `NAME\n` line (at most 64 bytes) from `s`.
pub fn read_name_line(s: &mut TcpStream) -> io::Result<String> {
    let mut name = Vec::new();
    let mut b = [0u8; 1];
    while name.len() < 64 {
        match s.read(&mut b) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {:?}", String::from_utf8_lossy(&name)),
                ))
            }
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&name).into_owned()),
            Ok(_) => name.push(b[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("no newline in {:?}", String::from_utf8_lossy(&name)),
    ))
}

/// One PROXY protocol header as a backend received it.
#[derive(Clone, Debug)]
pub struct SeenHeader {
    pub version: Version,
    pub source: Option<SocketAddr>,
    pub dest: Option<SocketAddr>,
    /// The header's bytes exactly as received.
    pub raw: Vec<u8>,
}

/// A backend that expects a PROXY protocol header (v1 or v2) at the start of every connection,
/// parses it with `ringlb::proxy_protocol::parse`, records it, and then echoes every byte after
/// it. A connection whose first bytes are not a valid header is recorded as an error.
pub struct ProxyEcho {
    server: Server,
    headers: Arc<Mutex<Vec<SeenHeader>>>,
}

impl ProxyEcho {
    pub fn start() -> ProxyEcho {
        let headers = Arc::new(Mutex::new(Vec::new()));
        let seen = headers.clone();
        let server = Server::start("proxy-echo", move |s| {
            let mut buf = vec![0u8; 64 * 1024];
            let mut have = 0;
            let (len, version, source, dest) = loop {
                match parse(&buf[..have]) {
                    Ok(Parsed::Header {
                        len,
                        version,
                        source,
                        dest,
                    }) => break (len, version, source, dest),
                    Ok(Parsed::Incomplete) if have < MAX_INBOUND => {}
                    Ok(Parsed::Incomplete) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("no complete PROXY header in {have} bytes"),
                        ))
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{e}; first bytes {:?}", &buf[..have.min(64)]),
                        ))
                    }
                }
                let n = s.read(&mut buf[have..])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("EOF after {have} bytes, before a whole PROXY header"),
                    ));
                }
                have += n;
            };
            seen.lock().unwrap().push(SeenHeader {
                version,
                source,
                dest,
                raw: buf[..len].to_vec(),
            });
            s.write_all(&buf[len..have])?;
            echo_rest(s, &mut buf)
        });
        ProxyEcho { server, headers }
    }

    /// Every header received so far, in arrival order.
    pub fn headers(&self) -> Vec<SeenHeader> {
        self.headers.lock().unwrap().clone()
    }

    /// The header whose source is `source`, waiting up to `timeout` for it.
    pub fn header_from(&self, source: SocketAddr, timeout: Duration) -> Option<SeenHeader> {
        let mut found = None;
        super::servers::wait_until(timeout, || {
            found = self
                .headers()
                .into_iter()
                .find(|h| h.source == Some(source));
            found.is_some()
        });
        found
    }
}

impl std::ops::Deref for ProxyEcho {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.server
    }
}

/// A whole keepalive timer value as `ss -o` prints it (`29sec`, `1min29sec`, `850ms`).
pub fn parse_ss_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ms" => value / 1000.0,
            "sec" => value,
            "min" => value * 60.0,
            "h" => value * 3600.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(secs);
        rest = &rest[unit_len..];
    }
    Some(total)
}
