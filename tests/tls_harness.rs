//! The TLS test peers of `common/tls.rs` against each other and against OpenSSL, and
//! `ringlb::tls` (ClientHello reader + route table) driving a small peek-and-forward router in
//! the test on real loopback sockets: real rustls and `openssl s_client` hellos, whole, one byte
//! per segment and over several TLS records, routed by SNI and ALPN to real TLS backends that
//! complete the handshake with the original client (so the hello was forwarded byte-exact).

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::payload::try_connect;
use common::procs::{require_tool, Proc, TempDir};
use common::servers::Server;
use common::tls::*;
use ringlb::tls::{HelloReader, Inspect, Route, RouteTable, DEFAULT_MAX_BYTES};

#[test]
fn a_rustls_client_and_backend_handshake_and_record_what_they_saw() {
    let b = TlsBackend::start("a.example");
    let got = tls_client(b.addr(), "a.example", &["http/1.1", "h2"]).unwrap();
    // The server's preference (h2 first) wins among what the client offers.
    assert_eq!(
        got,
        TlsReply {
            alpn: Some(b"h2".to_vec()),
            reply: "a.example".into()
        }
    );
    let got = tls_client(b.addr(), "a.example", &[]).unwrap();
    assert_eq!(got.alpn, None);
    assert_eq!(
        b.seen(),
        vec![
            Seen {
                sni: Some("a.example".into()),
                alpn: Some(b"h2".to_vec())
            },
            Seen {
                sni: Some("a.example".into()),
                alpn: None
            },
        ]
    );
}

#[test]
fn the_client_verifies_the_certificate_against_the_name() {
    let b = TlsBackend::start("a.example");
    let err = tls_client(b.addr(), "b.example", &[]).unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(b.seen().is_empty());
    // A wildcard certificate covers one label.
    let w = TlsBackend::start_with("wild", &["*.example.com"], &["h2"]);
    assert_eq!(
        tls_client(w.addr(), "x.example.com", &["h2"])
            .unwrap()
            .reply,
        "wild"
    );
    assert!(tls_client(w.addr(), "a.b.example.com", &["h2"]).is_err());
}

/// `openssl s_client` to `addr` for `sni` offering `alpn`, verifying against the test CA;
/// returns its stdout (what the server sent).
fn s_client(addr: SocketAddr, sni: &str, alpn: &str) -> String {
    let openssl = require_tool("openssl", "openssl");
    let dir = TempDir::new("s-client");
    let (ca, _, _) = test_ca().write_pem(dir.path(), &["unused.example"]);
    let out = Proc::spawn(Command::new(openssl).args([
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        sni,
        "-alpn",
        alpn,
        "-CAfile",
        ca.to_str().unwrap(),
        "-verify_return_error",
        "-quiet",
    ]))
    .wait_output(Duration::from_secs(20))
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "s_client: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn openssl_s_client_reaches_a_rustls_backend() {
    let b = TlsBackend::start("ossl.example");
    assert_eq!(s_client(b.addr(), "ossl.example", "h2"), "ossl.example");
    assert_eq!(
        b.seen(),
        vec![Seen {
            sni: Some("ossl.example".into()),
            alpn: Some(b"h2".to_vec())
        }]
    );
}

/// A peek-and-forward TLS router built on `ringlb::tls` in the test, standing in for the worker:
/// peeks the client's stream (nothing consumed) until the reader answers, asks the route table,
/// connects to the chosen backend and copies both ways, so the backend receives the client's
/// own ClientHello bytes.
struct PeekRouter {
    server: Server,
    verdicts: Arc<Mutex<Vec<&'static str>>>,
}

impl PeekRouter {
    fn start(table: RouteTable, pools: Vec<SocketAddr>) -> PeekRouter {
        let verdicts = Arc::new(Mutex::new(Vec::new()));
        let v = verdicts.clone();
        let server = Server::start("peek-router", move |client| {
            let verdict = peek_hello(client)?;
            v.lock().unwrap().push(verdict.label());
            let hello = match &verdict {
                Inspect::Hello(h) => Some(h),
                _ => None,
            };
            let Some(pool) = table.lookup(hello) else {
                return Ok(());
            };
            let backend = try_connect(pools[pool])?;
            relay(client, backend)
        });
        PeekRouter { server, verdicts }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    fn verdicts(&self) -> Vec<&'static str> {
        self.verdicts.lock().unwrap().clone()
    }
}

/// Peeks until the ClientHello reader has an answer (5 s at most).
fn peek_hello(client: &TcpStream) -> io::Result<Inspect> {
    let mut buf = vec![0u8; DEFAULT_MAX_BYTES];
    let mut reader = HelloReader::new(DEFAULT_MAX_BYTES);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = 0;
    loop {
        let n = client.peek(&mut buf)?;
        if n == 0 {
            return Ok(Inspect::NotTls);
        }
        if n > seen {
            seen = n;
            match reader.feed(&buf[..n]) {
                Inspect::NeedMore { .. } => {}
                answer => return Ok(answer),
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no ClientHello in 5 s",
            ));
        }
        // peek() returns at once while unread bytes are queued: wait for more to arrive.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Copies both ways until each side has finished, half-closing as a proxy does.
fn relay(client: &mut TcpStream, backend: TcpStream) -> io::Result<()> {
    let (mut c_read, mut b_write) = (client.try_clone()?, backend.try_clone()?);
    let (mut b_read, mut c_write) = (backend, client.try_clone()?);
    std::thread::scope(|s| {
        let up = s.spawn(move || -> io::Result<()> {
            io::copy(&mut c_read, &mut b_write)?;
            b_write.shutdown(Shutdown::Write)
        });
        let down =
            io::copy(&mut b_read, &mut c_write).and_then(|_| c_write.shutdown(Shutdown::Write));
        up.join().expect("relay thread panicked").and(down)
    })
}

#[test]
fn real_hellos_are_routed_by_sni_and_alpn_through_a_peek_router() {
    let api = TlsBackend::start_with("api", &["api.example.com"], &["h2", "http/1.1"]);
    let web_h2 = TlsBackend::start_with("web-h2", &["*.example.com"], &["h2"]);
    let web = TlsBackend::start_with("web", &["*.example.com", "127.0.0.1"], &["http/1.1"]);
    let table = RouteTable::build(
        &[
            Route {
                sni: vec!["api.example.com".into()],
                alpn: vec![],
                pool: 0,
            },
            Route {
                sni: vec!["*.example.com".into()],
                alpn: vec!["h2".into()],
                pool: 1,
            },
        ],
        Some(2),
    )
    .unwrap();
    let router = PeekRouter::start(table, vec![api.addr(), web_h2.addr(), web.addr()]);
    let via = |sni: &str, opts: ClientOptions| tls_client_with(router.addr(), sni, &opts).unwrap();

    let got = via("api.example.com", ClientOptions::alpn(&["h2"]));
    assert_eq!(
        (got.reply.as_str(), got.alpn.as_deref()),
        ("api", Some(&b"h2"[..]))
    );
    let got = via("www.example.com", ClientOptions::alpn(&["h2", "http/1.1"]));
    assert_eq!(
        (got.reply.as_str(), got.alpn.as_deref()),
        ("web-h2", Some(&b"h2"[..]))
    );
    let got = via("www.example.com", ClientOptions::alpn(&["http/1.1"]));
    assert_eq!(
        (got.reply.as_str(), got.alpn.as_deref()),
        ("web", Some(&b"http/1.1"[..]))
    );

    // The hello over several TLS records, and one byte per TCP segment.
    let records = ClientOptions {
        max_fragment_size: Some(100),
        ..ClientOptions::alpn(&["h2"])
    };
    let hello = client_hello_bytes("mail.example.com", &records);
    assert!(hello.len() > 1_300 && hello.iter().filter(|&&b| b == 22).count() > 10);
    assert_eq!(via("mail.example.com", records).reply, "web-h2");
    let pace = HelloPacing::BytePerSegment {
        pause: Duration::from_micros(200),
    };
    let trickle = ClientOptions {
        pacing: pace,
        ..ClientOptions::alpn(&["h2"])
    };
    assert_eq!(via("api.example.com", trickle).reply, "api");

    // OpenSSL's hello.
    assert_eq!(s_client(router.addr(), "www.example.com", "h2"), "web-h2");

    // A hello without SNI (an IP address as server name) goes to the default.
    assert_eq!(
        via("127.0.0.1", ClientOptions::alpn(&["http/1.1"])).reply,
        "web"
    );

    assert_eq!(router.verdicts(), vec!["hello"; 7]);
    assert_eq!(api.seen().len(), 2);
    assert_eq!(web_h2.seen().len(), 3);
    assert!(web_h2
        .seen()
        .iter()
        .all(|s| s.alpn.as_deref() == Some(b"h2")));
    assert_eq!(
        web.seen().iter().map(|s| s.sni.clone()).collect::<Vec<_>>(),
        vec![Some("www.example.com".into()), None]
    );
}

#[test]
fn plain_http_to_the_peek_router_is_not_tls_and_goes_to_the_default() {
    let echo = common::servers::EchoServer::start();
    let route = Route {
        sni: vec!["a.example".into()],
        alpn: vec![],
        pool: 0,
    };
    let table = RouteTable::build(&[route], Some(1)).unwrap();
    let router = PeekRouter::start(table, vec![common::dead_addr(), echo.addr()]);
    let mut s = try_connect(router.addr()).unwrap();
    let request = "GET / HTTP/1.0\r\nHost: a.example\r\n\r\n";
    s.write_all(request.as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut got = String::new();
    s.read_to_string(&mut got).unwrap();
    // The peeked bytes were forwarded, not consumed.
    assert_eq!(got, request);
    assert_eq!(router.verdicts(), vec!["not_tls"]);
}
