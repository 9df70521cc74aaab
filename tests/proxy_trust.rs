//! `accept_proxy_protocol_from` through the real binary on loopback: a peer outside the trusted
//! networks is closed before its PROXY header is read and counted; a trusted one is served with
//! the address its header carries.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::admin::{metric_sum, scrape};
use common::*;

#[test]
fn only_trusted_peers_may_send_a_proxy_header() {
    let echo = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("pp")
        .backend(echo.addr())
        .set("accept_proxy_protocol", "true")
        .set(
            "accept_proxy_protocol_from",
            "[\"127.0.0.2/32\", \"::1/128\"]",
        )]));
    let addr = lb.addr("pp");
    let header = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 443\r\n";
    // From 127.0.0.1: not trusted, closed without a byte forwarded.
    let mut bad = connect_from(SocketAddr::from(([127, 0, 0, 1], 0)), addr);
    let _ = bad.write_all(header);
    let _ = bad.write_all(b"hello");
    bad.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 16];
    match bad.read(&mut buf) {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("untrusted peer got {n} bytes back"),
    }
    // From 127.0.0.2: trusted, served.
    let mut good = connect_from(SocketAddr::from(([127, 0, 0, 2], 0)), addr);
    good.write_all(header).unwrap();
    ping(&mut good, 100, 3);
    let admin = lb.admin_addr().expect("admin");
    let untrusted = metric_sum(
        &scrape(admin),
        "ringlb_closes_total",
        &[("listener", "pp"), ("reason", "untrusted_proxy")],
    );
    assert_eq!(untrusted, 1.0);
    assert_eq!(
        echo.accepted(),
        1,
        "only the trusted peer reached the backend"
    );
}
