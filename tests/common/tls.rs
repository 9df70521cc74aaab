//! TLS peers for the tests: a test CA ([`test_ca`], rcgen) that issues certificates for any
//! names, rustls backends on `127.0.0.1:0` that complete a real handshake, answer their name and
//! record the SNI and ALPN they saw ([`TlsBackend`]), a rustls client that verifies the server
//! against the test CA and can send its ClientHello one byte per segment ([`tls_client`]), real
//! rustls ClientHello bytes for raw-socket tests ([`client_hello_bytes`]), and PEM files for
//! `openssl s_server` / `s_client` ([`TestCa::write_pem`]).
//!
//! rustls with its default aws-lc-rs provider, so clients offer the X25519MLKEM768 post-quantum
//! key share browsers send (a ~1.5 KB hello). Every socket has the harness timeouts; backends
//! run on [`Server`], so their threads are joined and their panics propagate.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use super::payload::try_connect;
use super::servers::Server;

/// A CA made once per test binary; every certificate the helpers use chains to it.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
}

/// The test binary's CA.
pub fn test_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "ringlb test CA");
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        TestCa {
            der: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    })
}

/// A leaf certificate (with the CA after it) and its key.
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// A server certificate for `names` (DNS names; `*.example.com` wildcards work).
    pub fn issue(&self, names: &[&str]) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Issued {
            chain: vec![cert.der().clone(), self.der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            cert_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem: key.serialize_pem(),
        }
    }

    /// The CA certificate in PEM (for `openssl s_client -CAfile`).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.der.clone()).expect("add test CA");
        roots
    }

    /// Writes `ca.pem`, and `cert.pem` + `key.pem` for `names`, into `dir`; returns
    /// (ca, cert, key) paths, for `openssl s_server -cert -key` and `s_client -CAfile`.
    pub fn write_pem(&self, dir: &Path, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
        let issued = self.issue(names);
        let paths = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        for (path, text) in [
            (&paths.0, self.pem.as_str()),
            (&paths.1, &issued.cert_pem),
            (&paths.2, &issued.key_pem),
        ] {
            std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
        paths
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// What a backend saw on one connection that completed its handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
}

/// A rustls server: completes the handshake, writes its name, sends close_notify and closes.
pub struct TlsBackend {
    server: Server,
    name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl TlsBackend {
    /// A backend named `name` with a certificate for `name`, speaking h2 and http/1.1.
    pub fn start(name: &str) -> TlsBackend {
        TlsBackend::start_with(name, &[name], &["h2", "http/1.1"])
    }

    /// A backend whose certificate covers `cert_names` and that negotiates `alpn` (server
    /// preference order) when the client offers one of them.
    pub fn start_with(name: &str, cert_names: &[&str], alpn: &[&str]) -> TlsBackend {
        let issued = test_ca().issue(cert_names);
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(issued.chain, issued.key)
            .expect("server certificate");
        cfg.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
        let cfg = Arc::new(cfg);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (seen2, reply) = (seen.clone(), name.as_bytes().to_vec());
        let server = Server::start(&format!("tls-{name}"), move |sock| {
            let mut conn = ServerConnection::new(cfg.clone()).map_err(io::Error::other)?;
            while conn.is_handshaking() {
                conn.complete_io(sock)?;
            }
            seen2.lock().unwrap().push(Seen {
                sni: conn.server_name().map(String::from),
                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            });
            let mut tls = rustls::Stream::new(&mut conn, sock);
            tls.write_all(&reply)?;
            tls.conn.send_close_notify();
            tls.flush()?;
            Ok(())
        });
        TlsBackend {
            server,
            name: name.to_string(),
            seen,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Handshakes completed so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The underlying server (accepted/live counts, handler errors such as failed handshakes).
    pub fn server(&self) -> &Server {
        &self.server
    }
}

/// How a client sends its ClientHello.
#[derive(Clone, Copy, Debug)]
pub enum HelloPacing {
    /// As rustls writes it (one write).
    Whole,
    /// One byte per write with TCP_NODELAY and `pause` between bytes, so each byte is its own
    /// segment.
    BytePerSegment { pause: Duration },
}

/// Options of [`tls_client_with`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// ALPN protocols offered.
    pub alpn: Vec<String>,
    /// rustls splits its handshake messages into records of at most this many bytes (the
    /// ClientHello over several TLS records).
    pub max_fragment_size: Option<usize>,
    pub pacing: HelloPacing,
}

impl ClientOptions {
    pub fn alpn(alpn: &[&str]) -> ClientOptions {
        ClientOptions {
            alpn: alpn.iter().map(|a| a.to_string()).collect(),
            max_fragment_size: None,
            pacing: HelloPacing::Whole,
        }
    }
}

/// What a client got from a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsReply {
    /// The ALPN protocol the server chose.
    pub alpn: Option<Vec<u8>>,
    /// Everything the server sent before close_notify (a [`TlsBackend`] sends its name).
    pub reply: String,
}

/// A rustls client config trusting only the test CA.
pub fn client_config(opts: &ClientOptions) -> ClientConfig {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(test_ca().roots())
        .with_no_client_auth();
    cfg.alpn_protocols = opts.alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    cfg.max_fragment_size = opts.max_fragment_size;
    cfg
}

/// Connects to `addr` as a TLS client for `sni` (the name the certificate must cover; an IP
/// address sends no SNI) offering `alpn`, and reads the reply to close_notify.
pub fn tls_client(addr: SocketAddr, sni: &str, alpn: &[&str]) -> io::Result<TlsReply> {
    tls_client_with(addr, sni, &ClientOptions::alpn(alpn))
}

pub fn tls_client_with(addr: SocketAddr, sni: &str, opts: &ClientOptions) -> io::Result<TlsReply> {
    let name = ServerName::try_from(sni.to_string()).map_err(io::Error::other)?;
    let mut conn =
        ClientConnection::new(Arc::new(client_config(opts)), name).map_err(io::Error::other)?;
    let mut sock = try_connect(addr)?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)?;
    }
    send_paced(&mut sock, &hello, opts.pacing)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let mut reply = String::new();
    rustls::Stream::new(&mut conn, &mut sock).read_to_string(&mut reply)?;
    Ok(TlsReply { alpn, reply })
}

/// Writes `bytes` to `sock` as `pacing` says.
pub fn send_paced(sock: &mut TcpStream, bytes: &[u8], pacing: HelloPacing) -> io::Result<()> {
    match pacing {
        HelloPacing::Whole => sock.write_all(bytes),
        HelloPacing::BytePerSegment { pause } => {
            sock.set_nodelay(true)?;
            for b in bytes {
                sock.write_all(std::slice::from_ref(b))?;
                std::thread::sleep(pause);
            }
            Ok(())
        }
    }
}

/// The ClientHello records a real rustls client sends for `sni` and `alpn` (for raw-socket
/// tests: split it, trickle it, corrupt it).
pub fn client_hello_bytes(sni: &str, opts: &ClientOptions) -> Vec<u8> {
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    let mut conn = ClientConnection::new(Arc::new(client_config(opts)), name).expect("client");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("write_tls");
    }
    hello
}
