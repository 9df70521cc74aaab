//! The HTTP health check's two pure halves: the request ([`request`]: one HTTP/1.1 GET with
//! `Connection: close`, no keep-alive) and the verdict on the reply bytes read so far
//! ([`judge`]: the status line, and the start of the body when `body_prefix` is set).
//!
//! PURE: no I/O. The prober (`probe.rs`) writes the request, reads at most [`MAX_REPLY`] bytes
//! and asks [`judge`] after each read; a reply that needs more than that to decide is down.

use std::net::SocketAddr;

use crate::config::{escape_bytes, HttpCheck};

/// The most reply bytes a check reads: the head (status line and headers) must fit in it,
/// with the body prefix after it. Servers with bigger heads are misconfigured for a health
/// endpoint; the check says so rather than buffering more.
pub const MAX_REPLY: usize = 16 * 1024;

/// The request for `check` sent to `addr` (the address probed: the `Host` header's default).
pub fn request(check: &HttpCheck, addr: SocketAddr) -> Vec<u8> {
    let host = check.host.clone().unwrap_or_else(|| addr.to_string());
    format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ringlb-health\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        check.path
    )
    .into_bytes()
}

/// What the bytes so far say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not enough bytes yet.
    More,
    Up,
    Down(String),
}

/// Judges `got` (the reply so far). `eof`: the server closed, nothing more will come.
pub fn judge(check: &HttpCheck, got: &[u8], eof: bool) -> Verdict {
    let Some(line_end) = find(got, b"\r\n") else {
        return more_or(got, eof, "closed before a status line");
    };
    let line = &got[..line_end];
    let status = parse_status(line);
    let Some(status) = status else {
        return Verdict::Down(format!(
            "not an HTTP reply: \"{}\"",
            escape_bytes(&line[..line.len().min(64)])
        ));
    };
    if !check.expect_status.contains(&status) {
        return Verdict::Down(format!("HTTP {status}, expected {}", statuses(check)));
    }
    let Some(prefix) = &check.body_prefix else {
        return Verdict::Up;
    };
    let Some(head_end) = find(got, b"\r\n\r\n") else {
        return more_or(got, eof, "closed inside the reply head");
    };
    let head = &got[..head_end];
    let body = &got[head_end + 4..];
    let chunked = head.split(|&b| b == b'\n').any(|h| {
        h.to_ascii_lowercase().starts_with(b"transfer-encoding:")
            && contains(&h.to_ascii_lowercase(), b"chunked")
    });
    let body = if chunked {
        dechunk(body, prefix.len())
    } else {
        body.to_vec()
    };
    let n = body.len().min(prefix.len());
    if body[..n] != prefix[..n] {
        return Verdict::Down(format!(
            "HTTP {status}, body starts \"{}\", expected \"{}\"",
            escape_bytes(&body[..n]),
            escape_bytes(prefix)
        ));
    }
    if n == prefix.len() {
        return Verdict::Up;
    }
    more_or(
        got,
        eof,
        &format!(
            "HTTP {status}, body ended before \"{}\"",
            escape_bytes(prefix)
        ),
    )
}

fn more_or(got: &[u8], eof: bool, why: &str) -> Verdict {
    if eof {
        Verdict::Down(why.to_string())
    } else if got.len() >= MAX_REPLY {
        Verdict::Down(format!("reply head over {} KiB", MAX_REPLY / 1024))
    } else {
        Verdict::More
    }
}

fn statuses(check: &HttpCheck) -> String {
    let s: Vec<String> = check.expect_status.iter().map(u16::to_string).collect();
    s.join(" or ")
}

/// `HTTP/1.x NNN ...` → NNN.
fn parse_status(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let rest = rest.get(1..)?.strip_prefix(b" ")?;
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|&b| b != b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The first `want` bytes of a chunked body, or as many as the bytes so far hold (the caller
/// compares what is there, and waits for more if it matches so far).
fn dechunk(mut body: &[u8], want: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < want {
        let Some(end) = find(body, b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&body[..end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            return out;
        };
        if size == 0 {
            return out;
        }
        body = &body[end + 2..];
        let take = size.min(body.len());
        out.extend_from_slice(&body[..take]);
        if take < size {
            return out; // the rest is still to come; judge what is here
        }
        body = body.get(size + 2..).unwrap_or(&[]);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(statuses: &[u16], prefix: Option<&str>) -> HttpCheck {
        HttpCheck {
            path: "/primary".into(),
            host: None,
            expect_status: statuses.to_vec(),
            body_prefix: prefix.map(|p| p.as_bytes().to_vec()),
        }
    }

    #[test]
    fn request_is_one_get_without_keep_alive() {
        let addr = "127.0.0.1:8008".parse().unwrap();
        let r = String::from_utf8(request(&check(&[200], None), addr)).unwrap();
        assert!(
            r.starts_with("GET /primary HTTP/1.1\r\nHost: 127.0.0.1:8008\r\n"),
            "{r}"
        );
        assert!(
            r.contains("\r\nConnection: close\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let mut c = check(&[200], None);
        c.host = Some("db1".into());
        let r = String::from_utf8(request(&c, addr)).unwrap();
        assert!(r.contains("\r\nHost: db1\r\n"), "{r}");
    }

    #[test]
    fn status_decides() {
        let c = check(&[200, 204], None);
        assert_eq!(judge(&c, b"HTTP/1.1 200 OK\r\n", false), Verdict::Up);
        assert_eq!(
            judge(&c, b"HTTP/1.0 204 No Content\r\n", false),
            Verdict::Up
        );
        assert_eq!(judge(&c, b"HTTP/1.1 20", false), Verdict::More);
        assert_eq!(
            judge(&c, b"HTTP/1.1 503 Service Unavailable\r\n", false),
            Verdict::Down("HTTP 503, expected 200 or 204".into())
        );
        assert_eq!(
            judge(&c, b"HTTP/1.1 20", true),
            Verdict::Down("closed before a status line".into())
        );
        assert!(
            matches!(judge(&c, b"SSH-2.0-OpenSSH\r\n", false), Verdict::Down(w) if w.contains("not an HTTP reply"))
        );
        assert!(matches!(
            judge(&c, b"HTTP/1.1 2000 x\r\n", false),
            Verdict::Down(_)
        ));
        let big = vec![b'a'; MAX_REPLY];
        assert_eq!(
            judge(&c, &big, false),
            Verdict::Down("reply head over 16 KiB".into())
        );
    }

    #[test]
    fn body_prefix_decides_after_the_head() {
        let c = check(&[200], Some("{\"role\": \"master\""));
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n".to_vec();
        assert_eq!(judge(&c, &head, false), Verdict::More);
        let mut ok = head.clone();
        ok.extend_from_slice(b"{\"role\": \"master\", \"x\": 1}");
        assert_eq!(judge(&c, &ok, false), Verdict::Up);
        let mut bad = head.clone();
        bad.extend_from_slice(b"{\"role\": \"replica\"}");
        assert!(matches!(judge(&c, &bad, false), Verdict::Down(w) if w.contains("body starts")));
        let mut short = head;
        short.extend_from_slice(b"{\"ro");
        assert_eq!(judge(&c, &short, false), Verdict::More);
        assert!(matches!(judge(&c, &short, true), Verdict::Down(w) if w.contains("body ended")));
    }

    #[test]
    fn chunked_bodies_are_read_through_their_framing() {
        let c = check(&[200], Some("hello world"));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        assert_eq!(judge(&c, r, false), Verdict::Up);
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelp!\r\n";
        assert!(matches!(judge(&c, r, false), Verdict::Down(_)));
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
        assert_eq!(judge(&c, r, false), Verdict::More);
    }
}
