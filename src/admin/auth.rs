//! Who may change things through the admin endpoint: the rules for `POST` requests, as a pure
//! function of what the request and its connection show (no I/O, no clocks).
//!
//! With a token (`admin.token_file`), every `POST` needs `Authorization: Bearer <token>`,
//! compared in constant time, from any peer. Without one, a `POST` is accepted only on a
//! trusted path, a loopback peer or the unix socket, and only if it cannot come from a browser:
//! no `Origin` header (a cross-origin "simple" POST carries one), and a `Host` that names this
//! endpoint (its address or `localhost`), never a DNS name an attacker could rebind.
//! Must not: read files or sockets; the caller hands in every input.

use std::net::{IpAddr, SocketAddr};

/// The connection a request came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// TCP: the client's address and the address it connected to.
    Tcp { peer: SocketAddr, local: SocketAddr },
    /// The unix socket (its 0600 mode is the trust).
    Unix,
}

/// What a mutation request shows about itself.
pub struct PostRequest<'a> {
    pub peer: Peer,
    pub authorization: Option<&'a [u8]>,
    pub has_origin: bool,
    /// Every `Host` header (normally one; none in HTTP/1.0).
    pub hosts: &'a [&'a [u8]],
}

/// Why a mutation is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no or wrong bearer token.
    Unauthorized(&'static str),
    /// 403: not a trusted path (without a token).
    Forbidden(String),
}

/// Whether a `POST` may go ahead, given the running config's token (if any).
pub fn check_post(token: Option<&[u8]>, req: &PostRequest<'_>) -> Result<(), Refusal> {
    if let Some(token) = token {
        return match req.authorization.and_then(bearer) {
            Some(presented) if token_matches(token, presented) => Ok(()),
            Some(_) => Err(Refusal::Unauthorized("wrong bearer token")),
            None => Err(Refusal::Unauthorized(
                "this endpoint needs \"Authorization: Bearer <token>\" (admin.token_file)",
            )),
        };
    }
    let local = match req.peer {
        Peer::Unix => None,
        Peer::Tcp { peer, local } => {
            if !is_loopback(peer.ip()) {
                return Err(Refusal::Forbidden(format!(
                    "changes are accepted only from loopback peers ({} is not one) unless \
                     admin.token_file is set",
                    peer.ip()
                )));
            }
            Some(local)
        }
    };
    if req.has_origin {
        return Err(Refusal::Forbidden(
            "a request with an Origin header comes from a web page; refused without a token \
             (admin.token_file)"
                .to_string(),
        ));
    }
    if let Some(local) = local {
        if let Some(bad) = req.hosts.iter().find(|h| !host_allowed(h, local)) {
            return Err(Refusal::Forbidden(format!(
                "Host {:?} is neither this endpoint's address ({local}) nor localhost; refused \
                 without a token (admin.token_file)",
                String::from_utf8_lossy(bad)
            )));
        }
    }
    Ok(())
}

/// `127.0.0.0/8`, `::1`, and IPv4 loopback mapped into IPv6.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| rest.trim_ascii())
}

/// Compares in time that depends only on the expected token's length, never on where the first
/// difference is.
pub fn token_matches(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != presented.len());
    for (i, &e) in expected.iter().enumerate() {
        diff |= e ^ presented.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

/// `Host` names this endpoint: `localhost` or the address the client connected to, with this
/// port or none.
fn host_allowed(host: &[u8], local: SocketAddr) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let (name, port) = split_host(host.trim());
    if port.is_some_and(|p| p != local.port()) {
        return false;
    }
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<IpAddr>().is_ok_and(|ip| ip == local.ip())
}

/// `name[:port]`, `[v6][:port]` → (name without brackets, port). A port that does not parse
/// becomes port 0 (never allowed).
fn split_host(host: &str) -> (&str, Option<u16>) {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, after)) => (v6, after.strip_prefix(':')),
            None => return (host, Some(0)),
        }
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        }
    };
    (name, port.map(|p| p.parse().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = "127.0.0.1:9900";

    fn tcp(peer: &str) -> Peer {
        Peer::Tcp {
            peer: peer.parse().unwrap(),
            local: LOCAL.parse().unwrap(),
        }
    }

    fn post<'a>(
        peer: Peer,
        auth: Option<&'a str>,
        origin: bool,
        hosts: &'a [&'a [u8]],
    ) -> PostRequest<'a> {
        PostRequest {
            peer,
            authorization: auth.map(str::as_bytes),
            has_origin: origin,
            hosts,
        }
    }

    #[test]
    fn without_a_token_loopback_without_browser_headers_passes() {
        for hosts in [
            &[][..],
            &[b"127.0.0.1:9900".as_slice()],
            &[b"localhost"],
            &[b"LocalHost:9900"],
            &[b"127.0.0.1"],
        ] {
            assert_eq!(
                check_post(None, &post(tcp("127.0.0.1:5000"), None, false, hosts)),
                Ok(()),
                "{hosts:?}"
            );
        }
        assert_eq!(
            check_post(None, &post(tcp("127.3.4.5:5000"), None, false, &[])),
            Ok(())
        );
        assert_eq!(
            check_post(None, &post(Peer::Unix, None, false, &[b"whatever"])),
            Ok(())
        );
    }

    #[test]
    fn without_a_token_browsers_and_remote_peers_are_refused() {
        let forbidden = |r: Result<(), Refusal>| matches!(r, Err(Refusal::Forbidden(_)));
        assert!(forbidden(check_post(
            None,
            &post(tcp("10.0.0.7:5000"), None, false, &[])
        )));
        assert!(forbidden(check_post(
            None,
            &post(tcp("[2001:db8::1]:5000"), None, false, &[])
        )));
        assert!(forbidden(check_post(
            None,
            &post(tcp("127.0.0.1:5000"), None, true, &[])
        )));
        assert!(forbidden(check_post(
            None,
            &post(Peer::Unix, None, true, &[])
        )));
        for host in [
            &b"evil.example:9900"[..],
            b"evil.example",
            b"localhost:9901",
            b"127.0.0.2:9900",
            b"localhost.evil.example",
            b"[::1]:9900",
            b"localhost:99x",
            b"\xff",
        ] {
            let r = check_post(None, &post(tcp("127.0.0.1:5000"), None, false, &[host]));
            assert!(forbidden(r), "{:?}", String::from_utf8_lossy(host));
        }
        // One good Host does not excuse a second, bad one.
        let r = check_post(
            None,
            &post(
                tcp("127.0.0.1:5000"),
                None,
                false,
                &[b"localhost", b"evil.example"],
            ),
        );
        assert!(forbidden(r));
    }

    #[test]
    fn a_token_is_needed_from_everyone_once_configured() {
        let t = Some(&b"s3cret-token"[..]);
        for peer in [tcp("127.0.0.1:1"), tcp("10.0.0.7:1"), Peer::Unix] {
            assert_eq!(
                check_post(t, &post(peer, Some("Bearer s3cret-token"), false, &[])),
                Ok(())
            );
            assert_eq!(
                check_post(
                    t,
                    &post(
                        peer,
                        Some("bearer  s3cret-token "),
                        true,
                        &[b"evil.example"]
                    )
                ),
                Ok(())
            );
            for bad in [
                None,
                Some("Bearer s3cret-tokeN"),
                Some("Bearer s3cret"),
                Some("Basic s3cret-token"),
                Some("s3cret-token"),
                Some("Bearer s3cret-token2"),
            ] {
                assert!(
                    matches!(
                        check_post(t, &post(peer, bad, false, &[])),
                        Err(Refusal::Unauthorized(_))
                    ),
                    "{bad:?}"
                );
            }
        }
    }

    #[test]
    fn loopback_includes_mapped_ipv4() {
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(is_loopback("::1".parse().unwrap()));
        assert!(!is_loopback("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!is_loopback("0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn ipv6_hosts_split() {
        assert_eq!(split_host("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_host("[::1]"), ("::1", None));
        assert_eq!(split_host("[::1"), ("[::1", Some(0)));
        let local: SocketAddr = "[::1]:9900".parse().unwrap();
        assert!(host_allowed(b"[::1]:9900", local));
        assert!(host_allowed(b"localhost:9900", local));
        assert!(!host_allowed(b"[::2]:9900", local));
    }

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"abc", b"abc"));
        assert!(!token_matches(b"abc", b"abd"));
        assert!(!token_matches(b"abc", b"ab"));
        assert!(!token_matches(b"abc", b"abcd"));
        assert!(!token_matches(b"abc", b""));
    }
}
