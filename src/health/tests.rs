//! Tests of the [`Scheduler`] alone: no sockets, no sleeps; time is an `Instant` moved by hand.

use super::*;

fn target(listener: &str, port: u16) -> Target {
    Target {
        listener: listener.to_string(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        interval: Duration::from_secs(1),
        rise: 2,
        fall: 3,
        timeout: Duration::from_millis(500),
        send: None,
        expect: None,
        udp: false,
        http: None,
        probe_at: None,
        readiness: false,
    }
}

fn down(why: &str) -> Outcome {
    Outcome::Down(why.to_string())
}

/// Runs the schedule from `t0` to `t0 + until` in `step`s; returns the ids due at each step and
/// completes every probe at once with `outcome`.
fn run(
    s: &mut Scheduler,
    t0: Instant,
    until: Duration,
    step: Duration,
    outcome: &Outcome,
) -> Vec<Vec<u64>> {
    let mut steps = Vec::new();
    let mut now = t0;
    let mut due = Vec::new();
    while now <= t0 + until {
        s.due(now, &mut due);
        let ids: Vec<u64> = due.drain(..).map(|(id, _)| id).collect();
        for id in &ids {
            s.complete(*id, outcome);
        }
        steps.push(ids);
        now += step;
    }
    steps
}

#[test]
fn first_probes_are_spread_over_the_interval_deterministically() {
    let targets: Vec<Target> = (0..1000)
        .map(|i| target(&format!("pool{}", i / 20), 9000 + (i % 20) as u16))
        .collect();
    let t0 = Instant::now();
    let mut a = Scheduler::new();
    a.set_targets(targets.clone(), t0);
    let mut b = Scheduler::new();
    b.set_targets(targets, t0);
    let step = Duration::from_millis(10);
    let ran = run(&mut a, t0, Duration::from_secs(1), step, &Outcome::Up);
    assert_eq!(
        ran,
        run(&mut b, t0, Duration::from_secs(1), step, &Outcome::Up),
        "same targets, same schedule"
    );
    let mut seen: Vec<u64> = ran.iter().flatten().copied().collect();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..1000).collect::<Vec<u64>>(),
        "each exactly once in [0, 1s]"
    );
    // 1,000 targets over 100 steps: about 10 per step; none anywhere near all at once.
    let busiest = ran.iter().map(Vec::len).max().unwrap_or(0);
    assert!(busiest <= 30, "{busiest} probes in one 10ms step");
}

#[test]
fn probes_repeat_at_a_fixed_rate_and_never_overlap() {
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    s.set_targets(vec![target("web", 9001)], t0);
    let mut due = Vec::new();
    let first = t0 + s.next_due_in(t0);
    s.due(first - Duration::from_nanos(1), &mut due);
    assert!(due.is_empty(), "not due before its offset");
    s.due(first, &mut due);
    assert_eq!(due.len(), 1);
    let (id, spec) = due.pop().expect("due");
    assert_eq!(spec.addr.port(), 9001);
    assert_eq!(spec.timeout, Duration::from_millis(500));
    // Still in flight an interval later: not started twice, and not counted as due.
    s.due(first + Duration::from_secs(2), &mut due);
    assert!(due.is_empty());
    assert_eq!(s.next_due_in(first), IDLE_WAIT);
    assert_eq!(s.complete(id, &Outcome::Up), None);
    // The schedule fell behind (in flight past its next slot): the next one is an interval from
    // the late start... which is already due when it completes late.
    s.due(first + Duration::from_secs(2), &mut due);
    assert_eq!(due.len(), 1);
    s.complete(id, &Outcome::Up);
    let late = first + Duration::from_secs(2);
    assert_eq!(s.next_due_in(late), Duration::from_secs(1));
    // On time: exactly one interval apart.
    s.due(late + Duration::from_secs(1), &mut due);
    assert_eq!(due.len(), 2);
    s.complete(id, &Outcome::Up);
    assert_eq!(
        s.next_due_in(late + Duration::from_secs(1)),
        Duration::from_secs(1)
    );
}

#[test]
fn flips_after_fall_failures_and_rise_successes_once() {
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    s.set_targets(vec![target("web", 9001), target("web", 9002)], t0);
    let addr = SocketAddr::from(([127, 0, 0, 1], 9001));
    assert_eq!(s.is_up("web", addr), Some(true), "backends start up");
    assert_eq!(s.complete(0, &down("connect refused")), None);
    assert_eq!(s.complete(0, &down("connect refused")), None);
    assert_eq!(
        s.complete(0, &down("connect refused")),
        Some(Flip {
            listener: "web".to_string(),
            addr,
            up: false,
            reason: "connect refused (3 checks failed in a row)".to_string(),
        })
    );
    assert_eq!(s.complete(0, &down("connect refused")), None);
    assert_eq!(s.is_up("web", addr), Some(false));
    assert_eq!(s.complete(0, &Outcome::Up), None);
    let flip = s.complete(0, &Outcome::Up).expect("rise");
    assert!(flip.up);
    assert_eq!(flip.reason, "2 checks passed in a row");
    assert_eq!(s.is_up("web", addr), Some(true));
    let counts: Vec<_> = s.counts().collect();
    assert_eq!(
        counts,
        [
            ("web", addr, 2, 4),
            ("web", SocketAddr::from(([127, 0, 0, 1], 9002)), 0, 0)
        ]
    );
}

#[test]
fn unknown_targets_and_ids() {
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    assert_eq!(s.next_due_in(t0), IDLE_WAIT);
    s.set_targets(vec![target("web", 9001)], t0);
    let addr = SocketAddr::from(([127, 0, 0, 1], 9001));
    assert_eq!(s.is_up("db", addr), None);
    assert_eq!(
        s.is_up("web", SocketAddr::from(([127, 0, 0, 1], 9002))),
        None
    );
    assert_eq!(s.complete(42, &down("x")), None);
    assert_eq!(s.len(), 1);
}

#[test]
fn reload_keeps_state_of_persisting_targets_and_drops_the_rest() {
    let mut s = Scheduler::new();
    let t0 = Instant::now();
    let a = SocketAddr::from(([127, 0, 0, 1], 9001));
    let b = SocketAddr::from(([127, 0, 0, 1], 9002));
    s.set_targets(vec![target("web", 9001), target("web", 9002)], t0);
    for _ in 0..3 {
        s.complete(0, &down("timeout after 500ms (connecting)"));
    }
    assert_eq!(s.is_up("web", a), Some(false));
    let mut due = Vec::new();
    s.due(t0 + Duration::from_secs(1), &mut due);
    assert_eq!(due.len(), 2);

    // Reload: 9001 stays (with a new fall), 9002 goes, 9003 and a second listener arrive.
    let mut kept = target("web", 9001);
    kept.fall = 1;
    kept.expect = Some(b"+PONG".to_vec());
    s.set_targets(
        vec![kept, target("web", 9003), target("db", 9001)],
        t0 + Duration::from_secs(1),
    );
    assert_eq!(s.is_up("web", a), Some(false), "state kept");
    assert_eq!(s.is_up("web", b), None, "removed");
    assert_eq!(
        s.is_up("db", a),
        Some(true),
        "same address, other listener: its own state"
    );
    // The probe of removed 9002 (id 1) completes late: ignored.
    assert_eq!(s.complete(1, &down("connect refused")), None);
    // 9001's in-flight probe (id 0) still counts, under the new settings.
    assert_eq!(s.complete(0, &Outcome::Up), None);
    assert!(s.complete(0, &Outcome::Up).expect("rise").up);
    assert_eq!(
        s.complete(0, &down("x")).map(|f| f.up),
        Some(false),
        "fall 1"
    );
    let counts: Vec<_> = s
        .counts()
        .map(|(l, addr, ok, failed)| (l.to_string(), addr.port(), ok, failed))
        .collect();
    assert_eq!(
        counts,
        [
            ("web".to_string(), 9001, 2, 4),
            ("web".to_string(), 9003, 0, 0),
            ("db".to_string(), 9001, 0, 0),
        ]
    );
    // New settings reach the probe spec.
    due.clear();
    s.due(t0 + Duration::from_secs(5), &mut due);
    let spec = due.iter().find(|(id, _)| *id == 0).map(|(_, spec)| spec);
    assert_eq!(spec.and_then(|s| s.expect.as_deref()), Some(&b"+PONG"[..]));

    // Removed and re-added: a new id, a fresh (up) state.
    s.set_targets(vec![target("web", 9002)], t0 + Duration::from_secs(6));
    assert_eq!(s.is_up("web", b), Some(true));
    assert_eq!(s.complete(1, &down("x")), None, "the old id stays dead");
    assert_eq!(s.len(), 1);
}

#[test]
fn duplicate_targets_keep_the_first() {
    let mut s = Scheduler::new();
    let mut second = target("web", 9001);
    second.rise = 9;
    s.set_targets(vec![target("web", 9001), second], Instant::now());
    assert_eq!(s.len(), 1);
}

#[test]
fn targets_come_from_listeners_with_health_checks() {
    let config = crate::config::Config::parse(
        r#"
        [[listeners]]
        name = "plain"
        bind = "127.0.0.1:0"
        backends = [ { address = "127.0.0.1:9001" } ]
        [[listeners]]
        name = "redis"
        bind = "127.0.0.1:0"
        backends = [ { address = "127.0.0.1:9002" }, { address = "127.0.0.1:9003" } ]
        [listeners.health]
        interval = "1s"
        timeout = "250ms"
        rise = 1
        fall = 2
        send = "PING\r\n"
        expect = "+PONG"
        "#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let t = targets(&config.listeners);
    assert_eq!(
        t.len(),
        2,
        "no targets for a listener without [listeners.health]"
    );
    assert_eq!(
        t[1],
        Target {
            listener: "redis".to_string(),
            addr: SocketAddr::from(([127, 0, 0, 1], 9003)),
            interval: Duration::from_secs(1),
            rise: 1,
            fall: 2,
            timeout: Duration::from_millis(250),
            send: Some(b"PING\r\n".to_vec()),
            expect: Some(b"+PONG".to_vec()),
            udp: false,
            http: None,
            probe_at: None,
            readiness: false,
        }
    );
}

#[test]
fn the_last_probe_error_is_kept_until_a_probe_passes() {
    let mut s = Scheduler::new();
    s.set_targets(vec![target("web", 9001)], Instant::now());
    let addr = SocketAddr::from(([127, 0, 0, 1], 9001));
    assert_eq!(s.last_error("web", addr), None, "no probe yet");
    assert!(s.last_error_changes(0, &down("connect refused")));
    s.complete(0, &down("connect refused"));
    assert_eq!(s.last_error("web", addr), Some("connect refused"));
    assert!(!s.last_error_changes(0, &down("connect refused")));
    assert!(s.last_error_changes(0, &down("timeout after 1s (connecting)")));
    s.complete(0, &down("timeout after 1s (connecting)"));
    assert_eq!(
        s.last_error("web", addr),
        Some("timeout after 1s (connecting)")
    );
    assert!(s.last_error_changes(0, &Outcome::Up));
    s.complete(0, &Outcome::Up);
    assert_eq!(s.last_error("web", addr), None);
    assert!(!s.last_error_changes(0, &Outcome::Up));
    assert!(!s.last_error_changes(7, &Outcome::Up), "unknown id");
    assert_eq!(s.last_error("db", addr), None);
}

#[test]
fn a_readiness_target_starts_not_ready_and_its_first_probe_decides() {
    let t0 = Instant::now();
    let mut ready = target("web", 9001);
    ready.readiness = true;
    let mut s = Scheduler::with_ids_from(1 << 62);
    s.set_targets(vec![ready.clone()], t0);
    assert_eq!(
        s.is_up("web", ready.addr),
        Some(false),
        "not ready before any probe"
    );
    let mut due = Vec::new();
    s.due(t0, &mut due);
    assert_eq!(
        due.len(),
        1,
        "the first readiness probe is not spread over the interval"
    );
    let id = due[0].0;
    assert!(id >= 1 << 62, "ids start where asked");
    // One pass is enough the first time (rise 2 applies afterwards).
    let flip = s.complete(id, &Outcome::Up).expect("flip");
    assert!(flip.up, "{flip:?}");
    assert_eq!(flip.reason, "the first check passed");
    // A failing first probe stays not ready without a flip.
    let mut s = Scheduler::new();
    s.set_targets(vec![ready.clone()], t0);
    let mut due = Vec::new();
    s.due(t0, &mut due);
    assert_eq!(s.complete(due[0].0, &down("HTTP 503")), None);
    assert_eq!(s.is_up("web", ready.addr), Some(false));
    // Then rise 2 as usual.
    for k in 0..2 {
        due.clear();
        s.due(t0 + Duration::from_secs(k + 1), &mut due);
        let got = s.complete(due[0].0, &Outcome::Up);
        assert_eq!(got.is_some(), k == 1, "probe {k}");
    }
}
