//! Builds a source and destination from the input, encodes both versions and parses them back:
//! the header must fit MAX_ENCODED and give back the same addresses (the IPv4 end IPv4-mapped
//! when the families differ).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use ringlb::proxy_protocol::{encode, parse, Parsed, Version, MAX_ENCODED};

fn addr(v6: bool, bytes: &[u8; 18]) -> SocketAddr {
    let port = u16::from_be_bytes([bytes[16], bytes[17]]);
    if v6 {
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&bytes[..16]);
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)
    } else {
        let ip = Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]);
        SocketAddr::new(IpAddr::V4(ip), port)
    }
}

fn mapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    }
}

fuzz_target!(|data: [u8; 37]| {
    let mut s = [0u8; 18];
    let mut d = [0u8; 18];
    s.copy_from_slice(&data[1..19]);
    d.copy_from_slice(&data[19..37]);
    let src = addr(data[0] & 1 != 0, &s);
    let dst = addr(data[0] & 2 != 0, &d);
    let (ws, wd) = if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (mapped(src), mapped(dst))
    };
    for version in [Version::V1, Version::V2] {
        let mut out = [0u8; MAX_ENCODED];
        let n = encode(version, src, dst, &mut out);
        assert!(n <= MAX_ENCODED);
        let want = Parsed::Header {
            len: n,
            version,
            source: Some(ws),
            dest: Some(wd),
        };
        assert_eq!(parse(&out[..n]), Ok(want));
    }
});
