//! Resource exhaustion through the real binary: when the LB runs out of file descriptors, accept
//! backs off (a warning at most once a second, no spinning, no exit), connections that cannot
//! get a backend socket are closed cleanly, open connections keep working, and service resumes
//! as soon as descriptors are free again.

mod common;

use common::*;
use std::net::TcpStream;
use std::time::Duration;

/// Writes `len` bytes and reads them back without closing anything (the connection stays open).
fn ping(s: &mut TcpStream, len: usize, seed: u8) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let out: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    s.write_all(&out)?;
    let mut back = vec![0u8; len];
    s.read_exact(&mut back)?;
    if back != out {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// CPU time (utime + stime, clock ticks) of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn fd_exhaustion_backs_off_and_recovers() {
    raise_fd_limit();
    let backend = EchoServer::start();
    // 64 descriptors: ~15 for the process itself, 2 per proxied connection, pipes while busy.
    let mut lb = Lb::start_with_nofile(
        &ringlb_config([listener("web").backend(backend.addr())]),
        64,
    );
    let addr = lb.addr("web");

    // Open connections until the LB runs out: each one either echoes (proxied), or is closed
    // or left unaccepted by the LB (out of descriptors). Never a hang beyond the read timeout.
    let started = std::time::Instant::now();
    let mut held: Vec<(u64, TcpStream)> = Vec::new();
    let mut refused = 0;
    for i in 0..60u64 {
        if refused >= 4 {
            break;
        }
        let Ok(mut s) = try_connect(addr) else {
            refused += 1;
            continue;
        };
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        match ping(&mut s, 256, i as u8) {
            Ok(()) => held.push((i, s)),
            Err(_) => refused += 1,
        }
    }
    eprintln!("proxied {}, not served {refused}", held.len());
    assert!(held.len() >= 10, "only {} connections proxied", held.len());
    assert!(refused > 0, "the limit was never reached");
    // Whichever step ran out (accept, or the backend socket after accept), it is logged.
    assert!(
        lb.wait_for_log("Too many open files", Duration::from_secs(2)),
        "no sign of fd exhaustion in the log:\n{}",
        lb.stderr_tail(20)
    );

    // Backing off, not spinning: well under a core over one second.
    let t0 = cpu_ticks(lb.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(lb.pid()) - t0;
    assert!(used < 30, "LB used {used} ticks in 1 s while out of fds");
    // At most one warning per worker per second for each step that can run out.
    let allowed = 2 * (started.elapsed().as_secs() as usize + 1);
    for step in ["accept failed", "socket() for a backend failed"] {
        let warnings = lb
            .stderr_lines()
            .iter()
            .filter(|l| l.contains(step) && l.contains("Too many open files"))
            .count();
        assert!(
            warnings <= allowed,
            "{warnings} \"{step}\" warnings in {:?}: not rate limited",
            started.elapsed()
        );
    }

    // Established connections keep working.
    for (i, s) in held.iter_mut() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ping(s, 4096, *i as u8).expect("held connection while out of fds");
    }
    // A stream large enough to be spliced needs a pipe, which takes two descriptors: either it
    // gets one (echoed in full) or that connection is closed cleanly and the failure is logged,
    // never a hang or a crash.
    let mark = lb.log_len();
    let (i, mut big) = held.pop().expect("a held connection");
    match common::try_echo_stream(&mut big, 1 << 20, i) {
        Ok(()) => eprintln!("1 MiB stream echoed while out of fds"),
        Err(e) => {
            eprintln!("1 MiB stream while out of fds: {e}");
            assert!(
                lb.wait_for_log_since(mark, "pipe2() failed", Duration::from_secs(2)),
                "stream failed ({e}) without a pipe warning:\n{}",
                lb.stderr_tail(10)
            );
        }
    }

    // Free descriptors: new connections are served again.
    held.truncate(held.len() / 2);
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..5 {
        let mut ok = false;
        for _ in 0..20 {
            if try_echo(addr, 2048, 2000 + i).is_ok() {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            ok,
            "no service after descriptors were freed:\n{}",
            lb.stderr_tail(20)
        );
    }
    assert!(
        lb.wait_exit(Duration::from_millis(10)).is_none(),
        "LB exited"
    );
}

/// `max_connections` is one limit for the listener across workers: with 2 workers and a limit
/// of 4, four connections are served whichever worker the kernel hands them to, the fifth waits
/// in the backlog, and it is served as soon as one of the four closes.
#[test]
fn max_connections_is_listener_wide() {
    let backend = EchoServer::start();
    let lb = Lb::start(&ringlb_config([listener("web")
        .backend(backend.addr())
        .set("max_connections", "4")]));
    let addr = lb.addr("web");
    let mut held: Vec<TcpStream> = Vec::new();
    for i in 0..4u8 {
        let mut s = connect(addr);
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        ping(&mut s, 64, i).unwrap_or_else(|e| panic!("connection {i} under the limit: {e}"));
        held.push(s);
    }
    let mut fifth = connect(addr);
    fifth
        .set_read_timeout(Some(Duration::from_millis(600)))
        .unwrap();
    assert!(
        ping(&mut fifth, 64, 9).is_err(),
        "a fifth connection was served above max_connections = 4"
    );
    drop(held.pop());
    fifth
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    // The first ping's bytes are still queued: read them back together with a second one.
    use std::io::{Read, Write};
    let mut first = vec![0u8; 64];
    fifth
        .read_exact(&mut first)
        .expect("fifth served after a close");
    fifth.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    fifth.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"x");
}
