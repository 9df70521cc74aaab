//! PostgreSQL end to end: two real clusters (initdb + pg_ctl on free loopback ports, trust auth)
//! behind a least-connections listener with an active TCP check and passive ejection, driven
//! through the real binary (2 workers) by `pgbench` and `psql`. A clean pgbench run must have no
//! failed transaction; then one cluster is stopped in the middle of a second run, and new
//! sessions must all reach the survivor while ringlb marks the stopped one DOWN and stays ready.
//!
//! Sessions that were on the stopped cluster fail (pgbench reports them); that is the server
//! going away, not ringlb, and is only reported. PROXY protocol stays off: PostgreSQL does not
//! speak it.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::admin::{connections_per_backend, http_get, per_backend, scrape};
use common::procs::{require_tool, run_ok, tail, try_run, PgCluster, Proc};
use common::*;

const LISTENER: &str = "pg";
/// Active check: interval 500ms, fall 2, rise 2 (a stopped server is DOWN within ~1.5 s).
const HEALTH: &str = "{ interval = \"500ms\", timeout = \"400ms\", rise = 2, fall = 2 }";
/// Passive ejection on, as in config/postgres.toml but with a shorter first ejection.
const PASSIVE: &str = "{ consecutive_failures = 3, base_ejection_time = \"10s\" }";

/// A client-side command (pgbench, psql) against `addr` as the `postgres` superuser.
fn pg_client(tool: &str, addr: SocketAddr) -> Command {
    let mut c = Command::new(require_tool(tool, "postgresql-client"));
    c.args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-U", "postgres"])
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGSSLMODE", "disable")
        .env_remove("PGPASSWORD");
    c
}

fn pgbench(addr: SocketAddr) -> Command {
    // pgbench comes with postgresql-contrib on Debian.
    let mut c = pg_client("pgbench", addr);
    c.env("PGDATABASE", "postgres");
    c
}

/// Waits (bounded) until `ringlb_backend_up{backend}` reads `want` for each backend.
fn wait_up(lb: &Lb, want: &[(SocketAddr, f64)], timeout: Duration) {
    let admin = lb.admin_addr().expect("admin address");
    let mut last = Vec::new();
    let ok = wait_until(timeout, || {
        let s = scrape(admin);
        let backends: Vec<SocketAddr> = want.iter().map(|(b, _)| *b).collect();
        last = per_backend(&s, "ringlb_backend_up", LISTENER, &backends);
        last.iter().zip(want).all(|(v, (_, w))| *v == Some(*w))
    });
    assert!(
        ok,
        "ringlb_backend_up not {want:?} within {timeout:?}: {last:?}; stderr tail:\n{}",
        lb.stderr_tail(20)
    );
}

/// The value of pgbench's `NAME: VALUE` summary line (first word of the value).
fn pgbench_field<'a>(out: &'a str, name: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
}

/// `tps = X (without initial connection time)`.
fn pgbench_tps(out: &str) -> Option<f64> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("tps = "))
        .find_map(|v| v.split_whitespace().next()?.parse().ok())
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Starts two clusters in parallel (initdb takes a few seconds); a panic in either is
/// re-raised after the other has been torn down.
fn start_two() -> (PgCluster, PgCluster) {
    std::thread::scope(|s| {
        let a = s.spawn(|| PgCluster::start("a", 100));
        let b = s.spawn(|| PgCluster::start("b", 100));
        match (a.join(), b.join()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(p), _) | (_, Err(p)) => std::panic::resume_unwind(p),
        }
    })
}

#[test]
fn pgbench_through_ringlb_and_failover_to_the_other_cluster() {
    let t0 = Instant::now();
    require_tool("pgbench", "postgresql-contrib");
    require_tool("psql", "postgresql-client");
    let (a, mut b) = start_two();
    eprintln!(
        "clusters up on {} and {} after {:?}",
        a.addr(),
        b.addr(),
        t0.elapsed()
    );

    // Both clusters need the pgbench tables: a session may land on either.
    for pg in [&a, &b] {
        run_ok(
            pgbench(pg.addr()).args(["-i", "-s", "1", "-q"]),
            Duration::from_secs(60),
        );
    }

    let l = listener(LISTENER)
        .balance("least_connections")
        .backend(a.addr())
        .backend(b.addr())
        .connect_timeout("2s")
        .idle_timeout("1h")
        .set("tcp_keepalive", "\"30s\"")
        .set("health", HEALTH)
        .set("passive", PASSIVE);
    let lb = Lb::start(&ringlb_config([l]));
    let addr = lb.addr(LISTENER);
    let admin = lb.admin_addr().expect("admin address");
    wait_up(
        &lb,
        &[(a.addr(), 1.0), (b.addr(), 1.0)],
        Duration::from_secs(10),
    );

    // Initialising through ringlb works too (COPY of 100,000 rows through the proxy); it lands
    // on one cluster and recreates the same tables there.
    let t_init = Instant::now();
    run_ok(
        pgbench(addr).args(["-i", "-s", "1", "-q"]),
        Duration::from_secs(60),
    );
    eprintln!("pgbench -i -s 1 through ringlb: {:?}", t_init.elapsed());

    // Run 1: 16 clients for 10 s, no failure allowed.
    let t_run = Instant::now();
    let out = try_run(
        pgbench(addr).args(["-c", "16", "-j", "2", "-T", "10"]),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}\nringlb stderr tail:\n{}", lb.stderr_tail(20)));
    let (stdout, stderr) = text(&out);
    let report = format!(
        "pgbench -c 16 -j 2 -T 10: {} after {:?}\nstdout:\n{stdout}\nstderr:\n{}\n\
         ringlb stderr tail:\n{}",
        out.status,
        t_run.elapsed(),
        tail(&stderr, 20),
        lb.stderr_tail(20)
    );
    assert!(out.status.success(), "{report}");
    if let Some(failed) = pgbench_field(&stdout, "number of failed transactions") {
        assert_eq!(failed, "0", "failed transactions: {report}");
    }
    let processed: u64 = pgbench_field(&stdout, "number of transactions actually processed")
        .and_then(|v| v.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no processed count: {report}"));
    assert!(processed > 0, "{report}");
    let tps = pgbench_tps(&stdout).unwrap_or_else(|| panic!("no tps line: {report}"));
    let s = scrape(admin);
    let sessions = connections_per_backend(&s, LISTENER, &[a.addr(), b.addr()]);
    eprintln!(
        "run 1: {processed} transactions, tps = {tps:.1}, in {:?}; sessions per cluster so \
         far {sessions:?}",
        t_run.elapsed()
    );
    assert!(
        sessions.iter().all(|n| *n >= 4.0),
        "16 pgbench sessions under least_connections should reach both clusters: {sessions:?}"
    );

    // Run 2: 8 clients for 8 s; cluster b is stopped (fast) about 3 s in.
    let t_run2 = Instant::now();
    let run2 = Proc::spawn(pgbench(addr).args(["-c", "8", "-j", "2", "-T", "8", "--max-tries=1"]));
    std::thread::sleep(Duration::from_secs(3));
    let mark = lb.log_len();
    let t_stop = Instant::now();
    b.stop_fast();
    eprintln!(
        "cluster b ({}) stopped (pg_ctl stop -m fast) in {:?}, {:?} into run 2",
        b.addr(),
        t_stop.elapsed(),
        t_stop - t_run2
    );

    // New sessions through ringlb: every one succeeds and is served by cluster a.
    for i in 0..10 {
        let t = Instant::now();
        let out = try_run(
            pg_client("psql", addr).args([
                "-d",
                "postgres",
                "-X",
                "-A",
                "-t",
                "-c",
                "select inet_server_port()",
            ]),
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("psql #{i} after the stop: {e}"));
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success(),
            "psql #{i} through ringlb {:?} after the stop: {}\nstdout: {stdout}\nstderr: \
             {stderr}\nringlb stderr tail:\n{}",
            t_stop.elapsed(),
            out.status,
            lb.stderr_tail(20)
        );
        assert_eq!(
            stdout.trim(),
            a.port().to_string(),
            "psql #{i} was served by another server than cluster a"
        );
        if i == 0 {
            eprintln!(
                "first psql after the stop: ok in {:?} ({:?} after the stop)",
                t.elapsed(),
                t_stop.elapsed()
            );
        }
    }
    eprintln!("10 psql sessions after the stop: all on {}", a.addr());

    let down = format!("listener \"{LISTENER}\": backend {} is DOWN", b.addr());
    assert!(
        lb.wait_for_log_since(mark, &down, Duration::from_secs(5)),
        "no `{down}` line within 5 s of the stop; stderr tail:\n{}",
        lb.stderr_tail(30)
    );
    let line = lb.stderr_lines()[mark..]
        .iter()
        .find(|l| l.contains(&down))
        .cloned()
        .unwrap_or_default();
    eprintln!("DOWN logged {:?} after the stop: {line}", t_stop.elapsed());
    wait_up(
        &lb,
        &[(a.addr(), 1.0), (b.addr(), 0.0)],
        Duration::from_secs(2),
    );
    let (status, body) = http_get(admin, "/readyz");
    assert_eq!(status, 200, "/readyz with cluster a up: {body}");

    // Run 2 ends on its own (-T 8); its sessions on b failed, which is not ringlb's doing.
    let out = run2
        .wait_output(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("pgbench run 2: {e}"));
    let (stdout, stderr) = text(&out);
    eprintln!(
        "run 2: {} after {:?}; processed {:?}, failed {:?}, tps {:?}; aborted clients: {}",
        out.status,
        t_run2.elapsed(),
        pgbench_field(&stdout, "number of transactions actually processed"),
        pgbench_field(&stdout, "number of failed transactions"),
        pgbench_tps(&stdout),
        stderr
            .lines()
            .filter(|l| l.contains("client ") && l.contains("aborted"))
            .count()
    );
    let (status, body) = http_get(admin, "/readyz");
    assert_eq!(status, 200, "/readyz after run 2: {body}");
    eprintln!("total {:?}", t0.elapsed());
}
