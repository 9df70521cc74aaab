//! Helpers for the admin endpoint: a tiny blocking HTTP/1.0 client that returns any status with
//! its body (GET and POST), a `/metrics` scrape parsed with `prometheus-parse`, and lookups of
//! one sample (or the sum of several) by name and labels.
//!
//! Every request has the harness timeouts (connect, read, write); nothing here retries.

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value};

use super::payload::try_connect;

/// Sends one HTTP/1.0 request (`Connection: close`) and reads the response until the server
/// closes. Returns the status code and the body (headers dropped, a chunked body decoded).
pub fn try_http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> io::Result<(u16, String)> {
    try_http_with(addr, method, path, &[], body)
}

/// Like [`try_http_request`] with extra headers. A `Host` among them replaces the default
/// (`Host: ADDR`); `("Host", "")` sends none.
pub fn try_http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<(u16, String)> {
    let mut s = try_connect(addr)?;
    let mut head = format!("{method} {path} HTTP/1.0\r\n");
    let has_host = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host"));
    if !has_host {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        if !(k.eq_ignore_ascii_case("host") && v.is_empty()) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str(&format!(
        "Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ));
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{method} http://{addr}{path}: {e}; response: {:?}",
                String::from_utf8_lossy(&raw[..raw.len().min(300)])
            ),
        )
    })
}

/// `method path` with extra headers (see [`try_http_with`]); panics on an I/O error.
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    try_http_with(addr, method, path, headers, b"")
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path} {headers:?}: {e}"))
}

/// `GET /livez` with every timeout (connect, write, read) set to `within`: the status and body,
/// or why no answer came in time.
pub fn livez_within(addr: SocketAddr, within: Duration) -> Result<(u16, String), String> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, within).map_err(|e| format!("connect: {e}"))?;
    let left = within
        .saturating_sub(t0.elapsed())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(left)).map_err(|e| e.to_string())?;
    s.write_all(format!("GET /livez HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read after {:?}: {e}", t0.elapsed()))?;
    if t0.elapsed() > within {
        return Err(format!("answered after {:?}", t0.elapsed()));
    }
    parse_response(&raw)
}

/// Panics unless `GET /livez` answers 200 within `within`; `what` says what is going on.
pub fn assert_live_within(addr: SocketAddr, within: Duration, what: &str) {
    match livez_within(addr, within) {
        Ok((200, _)) => {}
        Ok((code, body)) => panic!("/livez {what}: status {code}: {body}"),
        Err(e) => panic!("/livez {what}: no answer within {within:?}: {e}"),
    }
}

/// `GET path`: status and body; panics on an I/O error (any status is returned).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_request(addr, "GET", path, b"")
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

/// `POST path` with an empty body: status and body; panics on an I/O error.
pub fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_request(addr, "POST", path, b"")
        .unwrap_or_else(|e| panic!("POST http://{addr}{path}: {e}"))
}

pub fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("no end of headers before EOF")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = Some(v.parse::<usize>().map_err(|e| format!("{l:?}: {e}"))?);
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else {
        match length {
            Some(n) if body.len() < n => {
                return Err(format!("body of {} bytes, Content-Length {n}", body.len()))
            }
            Some(n) => body[..n].to_string(),
            None => body.to_string(),
        }
    };
    Ok((status, body))
}

fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("truncated chunk size")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).ok_or("truncated chunk")?;
        out.push_str(chunk);
        rest = after[size..]
            .strip_prefix("\r\n")
            .ok_or("chunk without CRLF")?;
    }
}

/// `GET /metrics`, checked for status 200 and parsed. Also checks that the parser kept every
/// sample line (it silently skips a line whose value does not parse).
pub fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "GET /metrics: status {status}, body:\n{body}");
    let lines = body.as_bytes().lines();
    let s = Scrape::parse(lines).unwrap_or_else(|e| panic!("parse /metrics: {e}; body:\n{body}"));
    let sample_lines = body
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .count();
    assert_eq!(
        s.samples.len(),
        sample_lines,
        "prometheus-parse kept {} of {sample_lines} sample lines; body:\n{body}",
        s.samples.len()
    );
    s
}

/// The numeric value of a counter, gauge or untyped sample.
pub fn sample_value(s: &Sample) -> f64 {
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{}: not a scalar sample: {other:?}", s.metric),
    }
}

/// The samples of `name` whose labels include every `(key, value)` of `labels`.
pub fn samples<'a>(
    scrape: &'a Scrape,
    name: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    scrape.samples.iter().filter(move |s| {
        s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    })
}

/// The value of the one sample of `name` whose labels include `labels`; None if there is none.
/// Panics if several match (use [`metric_sum`] to add them up).
pub fn metric(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = samples(scrape, name, labels).collect();
    match found.as_slice() {
        [] => None,
        [one] => Some(sample_value(one)),
        many => panic!(
            "{name} with {labels:?}: {} samples match: {:?}",
            many.len(),
            many.iter()
                .map(|s| s.labels.to_string())
                .collect::<Vec<_>>()
        ),
    }
}

/// The sum of every sample of `name` whose labels include `labels`; panics if none matches.
pub fn metric_sum(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = samples(scrape, name, labels).collect();
    assert!(
        !found.is_empty(),
        "no sample of {name} with labels {labels:?}"
    );
    found.into_iter().map(sample_value).sum()
}

/// Metric `name` of each backend of `listener`, in the order given (None: no sample).
pub fn per_backend(
    scrape: &Scrape,
    name: &str,
    listener: &str,
    backends: &[std::net::SocketAddr],
) -> Vec<Option<f64>> {
    backends
        .iter()
        .map(|b| {
            let b = b.to_string();
            metric(scrape, name, &[("listener", listener), ("backend", &b)])
        })
        .collect()
}

/// `ringlb_connections_total` of each backend of `listener`, in the order given (0 when a
/// backend has no sample yet).
pub fn connections_per_backend(
    scrape: &Scrape,
    listener: &str,
    backends: &[std::net::SocketAddr],
) -> Vec<f64> {
    per_backend(scrape, "ringlb_connections_total", listener, backends)
        .into_iter()
        .map(|v| v.unwrap_or(0.0))
        .collect()
}
