//! `ringlb demo`: tiny backends that answer with their name, so `curl` or `nc` against the demo
//! listener shows the balancing without anything outside the repo.
//! Must not: be used by anything but the demo subcommand.

use crate::config::Config;
use log::info;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// Starts one named backend thread per distinct backend address in the config.
pub fn start_backends(config: &Config) -> std::io::Result<()> {
    let mut seen: Vec<SocketAddr> = Vec::new();
    for l in &config.listeners {
        for (_, b) in l.all_backends() {
            if seen.contains(&b.address) {
                continue;
            }
            seen.push(b.address);
            let name = format!("backend-{}", seen.len());
            let listener = TcpListener::bind(b.address).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot bind demo backend {}: {e}", b.address),
                )
            })?;
            info!("demo: {name} answering on {}", b.address);
            let addr = b.address;
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || serve(listener, name, addr))?;
        }
    }
    Ok(())
}

fn serve(listener: TcpListener, name: String, addr: SocketAddr) {
    for stream in listener.incoming().flatten() {
        let _ = answer(stream, &name, addr);
    }
}

/// Replies with the backend's name: as an HTTP response if the client spoke HTTP (curl), as a
/// plain line otherwise (nc).
fn answer(mut s: TcpStream, name: &str, addr: SocketAddr) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut buf = [0u8; 2048];
    let n = s.read(&mut buf).unwrap_or(0);
    let body = format!("hello from {name} ({addr})\n");
    let http = buf[..n].starts_with(b"GET ") || buf[..n].starts_with(b"HEAD ");
    if http {
        write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
    } else {
        s.write_all(body.as_bytes())?;
    }
    s.shutdown(std::net::Shutdown::Write)
}
