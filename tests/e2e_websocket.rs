//! Websockets end to end: four tungstenite echo servers behind a least-connections listener (the
//! setup of config/websocket.toml), 1,000 real websocket clients through the real binary
//! (2 workers). Checks the spread of long-lived connections, byte-exact echo of every message
//! over several round trips, and what happens when one server dies: exactly its clients see
//! their connection end, every one reconnects through ringlb at the first attempt and lands on
//! the three others, and every connection keeps echoing correctly afterwards.
//!
//! Clients are driven by a few threads (50 blocking clients each, every socket with timeouts),
//! commanded phase by phase over channels with bounded waits; if the test panics the command
//! channels close and the threads finish.

mod common;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::admin::{metric, metric_sum, scrape};
use common::*;
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

const LISTENER: &str = "ws";
const BACKENDS: usize = 4;
const CLIENTS: usize = 1000;
const THREADS: usize = 20;
/// Round trips per client before the kill, one second apart.
const ROUNDS: u64 = 5;
/// Round trips per client after the reconnection.
const ROUNDS_AFTER: u64 = 2;
/// Allowed distance from an even spread.
const SPREAD_SLACK: usize = 5;
/// How long one phase of the client threads may take.
const PHASE_TIMEOUT: Duration = Duration::from_secs(30);
/// A server connection may stay silent this long (the harness default is 10 s).
const SERVER_IDLE: Duration = Duration::from_secs(60);
/// How long a client of the killed server waits for its connection to end.
const END_TIMEOUT: Duration = Duration::from_secs(5);

fn ws_config() -> WebSocketConfig {
    // Small buffers: 2,000 websockets in this process.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

fn to_io(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// A websocket echo server: says `backend N` after the handshake, then echoes every data
/// message. Counts handshakes (a connection that reached this server) and echoed messages.
struct WsBackend {
    server: Server,
    handshakes: Arc<AtomicUsize>,
    echoed: Arc<AtomicUsize>,
}

impl WsBackend {
    fn start(index: usize) -> WsBackend {
        let handshakes = Arc::new(AtomicUsize::new(0));
        let echoed = Arc::new(AtomicUsize::new(0));
        let (h, e) = (handshakes.clone(), echoed.clone());
        let server = Server::start(&format!("ws{index}"), move |s: &mut TcpStream| {
            s.set_read_timeout(Some(SERVER_IDLE))?;
            let mut ws = tungstenite::accept_with_config(&mut *s, Some(ws_config()))
                .map_err(|err| to_io(format!("handshake: {err}")))?;
            h.fetch_add(1, Ordering::SeqCst);
            ws.send(Message::text(format!("backend {index}")))
                .map_err(to_io)?;
            loop {
                match ws.read() {
                    Ok(m) if m.is_text() || m.is_binary() => {
                        ws.send(m).map_err(to_io)?;
                        e.fetch_add(1, Ordering::SeqCst);
                    }
                    // Ping, pong, close: tungstenite answers them itself.
                    Ok(_) => {}
                    Err(tungstenite::Error::ConnectionClosed) => return Ok(()),
                    Err(err) => return Err(to_io(err)),
                }
            }
        });
        WsBackend {
            server,
            handshakes,
            echoed,
        }
    }
}

/// The message client `id` sends in round `round`: text on even rounds, binary on odd ones, of a
/// length that varies with both (1..=3000 bytes), with deterministic contents.
fn payload(id: usize, round: u64) -> Message {
    let len = 1 + (id * 7919 + round as usize * 104_729) % 3000;
    let bytes = Pattern::bytes(((id as u64) << 16) | round, len);
    if round % 2 == 0 {
        Message::text(
            bytes
                .iter()
                .map(|b| (b'a' + b % 26) as char)
                .collect::<String>(),
        )
    } else {
        Message::binary(bytes)
    }
}

type Ws = WebSocket<TcpStream>;

/// Connects through the LB, completes the handshake and reads the `backend N` greeting.
fn connect_ws(lb: SocketAddr) -> Result<(Ws, usize), String> {
    let stream = try_connect(lb).map_err(|e| format!("connect: {e}"))?;
    let (mut ws, _) =
        tungstenite::client::client_with_config(format!("ws://{lb}/"), stream, Some(ws_config()))
            .map_err(|e| format!("handshake: {e}"))?;
    let hello = ws.read().map_err(|e| format!("greeting: {e}"))?;
    let backend = hello
        .to_text()
        .ok()
        .and_then(|t| t.strip_prefix("backend "))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("greeting {hello:?}"))?;
    Ok((ws, backend))
}

/// Whether a read error means the peer ended the connection (EOF without a close handshake,
/// reset), as opposed to a timeout or a protocol fault.
fn is_end(e: &tungstenite::Error) -> bool {
    use tungstenite::error::ProtocolError;
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => true,
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => true,
        tungstenite::Error::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
        ),
        _ => false,
    }
}

struct Client {
    id: usize,
    ws: Ws,
    backend: usize,
}

enum Cmd {
    Connect,
    /// Rounds `first..first + count`, round `first + k` starting at `start + k * gap`.
    Rounds {
        first: u64,
        count: u64,
        start: Instant,
        gap: Duration,
    },
    /// Server `backend` was killed at `at`: its clients wait for the end and reconnect.
    Killed {
        backend: usize,
        at: Instant,
    },
    Close,
}

#[derive(Default, Debug)]
struct Report {
    /// (client id, backend) of each client connected in this phase.
    landed: Vec<(usize, usize)>,
    slowest: Duration,
    echoed: usize,
    /// Per reconnected client: connection end seen, and reconnected, after the kill.
    ended_after: Vec<Duration>,
    reconnected_after: Vec<Duration>,
}

type Reply = Result<Report, String>;

fn client_thread(
    lb: SocketAddr,
    ids: std::ops::Range<usize>,
    cmds: Receiver<Cmd>,
    out: Sender<Reply>,
) {
    let mut clients: Vec<Client> = Vec::new();
    while let Ok(cmd) = cmds.recv() {
        let mut errors = Vec::new();
        let mut report = Report::default();
        match cmd {
            Cmd::Connect => {
                for id in ids.clone() {
                    let t = Instant::now();
                    match connect_ws(lb) {
                        Ok((ws, backend)) => {
                            report.slowest = report.slowest.max(t.elapsed());
                            report.landed.push((id, backend));
                            clients.push(Client { id, ws, backend });
                        }
                        Err(e) => errors.push(format!("client {id}: {e}")),
                    }
                }
            }
            Cmd::Rounds {
                first,
                count,
                start,
                gap,
            } => {
                for k in 0..count {
                    let round = first + k;
                    std::thread::sleep(
                        (start + gap * k as u32).saturating_duration_since(Instant::now()),
                    );
                    let mut sent_at = Vec::with_capacity(clients.len());
                    for c in &mut clients {
                        sent_at.push(Instant::now());
                        if let Err(e) = c.ws.send(payload(c.id, round)) {
                            errors.push(format!("client {} round {round}: send: {e}", c.id));
                        }
                    }
                    for (c, t) in clients.iter_mut().zip(&sent_at) {
                        let want = payload(c.id, round);
                        match c.ws.read() {
                            Ok(got) if got == want => {
                                report.echoed += 1;
                                report.slowest = report.slowest.max(t.elapsed());
                            }
                            Ok(got) => errors.push(format!(
                                "client {} (backend {}) round {round}: sent {} bytes {:?}, got \
                                 {} bytes {:?}",
                                c.id,
                                c.backend,
                                want.len(),
                                digest_of(&want.clone().into_data()),
                                got.len(),
                                digest_of(&got.clone().into_data())
                            )),
                            Err(e) => errors.push(format!(
                                "client {} (backend {}) round {round}: read: {e}",
                                c.id, c.backend
                            )),
                        }
                    }
                }
            }
            Cmd::Killed { backend, at } => {
                for c in clients.iter_mut().filter(|c| c.backend == backend) {
                    let _ = c.ws.get_ref().set_read_timeout(Some(END_TIMEOUT));
                    match c.ws.read() {
                        Err(e) if is_end(&e) => report.ended_after.push(at.elapsed()),
                        Ok(m) => {
                            errors
                                .push(format!("client {}: a message after the kill: {m:?}", c.id));
                            continue;
                        }
                        Err(e) => {
                            errors.push(format!(
                                "client {}: no end within {END_TIMEOUT:?}: {e}",
                                c.id
                            ));
                            continue;
                        }
                    }
                    // One attempt: a reconnect that fails is a failure.
                    match connect_ws(lb) {
                        Ok((ws, new)) if new != backend => {
                            report.reconnected_after.push(at.elapsed());
                            report.landed.push((c.id, new));
                            c.ws = ws;
                            c.backend = new;
                        }
                        Ok((_, new)) => errors.push(format!(
                            "client {}: reconnected to the killed backend {new}",
                            c.id
                        )),
                        Err(e) => errors.push(format!("client {}: reconnect: {e}", c.id)),
                    }
                }
            }
            Cmd::Close => {
                for c in &mut clients {
                    let _ = c.ws.close(None);
                    let _ = c.ws.flush();
                }
                clients.clear();
            }
        }
        let reply = if errors.is_empty() {
            Ok(report)
        } else {
            let n = errors.len();
            errors.truncate(5);
            Err(format!("{n} errors, first: {}", errors.join("; ")))
        };
        if out.send(reply).is_err() {
            return;
        }
    }
}

/// Sends `cmd()` to every client thread and gathers their reports, within [`PHASE_TIMEOUT`];
/// panics with every thread's errors (and the LB's stderr tail) if one failed.
fn phase(
    lb: &Lb,
    cmds: &[Sender<Cmd>],
    replies: &Receiver<Reply>,
    what: &str,
    cmd: impl Fn() -> Cmd,
) -> Vec<Report> {
    for c in cmds {
        c.send(cmd()).expect("client thread gone");
    }
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let mut reports = Vec::new();
    let mut errors = Vec::new();
    for _ in cmds {
        match replies.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(r)) => reports.push(r),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("no reply within {PHASE_TIMEOUT:?}: {e}")),
        }
    }
    assert!(
        errors.is_empty(),
        "{what}: {} of {} client threads failed:\n{}\nringlb stderr tail:\n{}",
        errors.len(),
        cmds.len(),
        errors.join("\n"),
        lb.stderr_tail(20)
    );
    reports
}

/// Live server-side connections of each backend (`None` for a killed one).
fn live(backends: &[Option<WsBackend>]) -> Vec<Option<usize>> {
    backends
        .iter()
        .map(|b| b.as_ref().map(|b| b.server.live()))
        .collect()
}

#[test]
fn thousand_websockets_spread_echo_and_survive_a_backend_kill() {
    raise_fd_limit();
    let t0 = Instant::now();
    let mut backends: Vec<Option<WsBackend>> =
        (0..BACKENDS).map(|i| Some(WsBackend::start(i))).collect();
    let addrs: Vec<SocketAddr> = backends.iter().flatten().map(|b| b.server.addr()).collect();
    // As config/websocket.toml: long idle timeout, keepalive, one access-log line per session.
    let l = addrs
        .iter()
        .fold(listener(LISTENER).balance("least_connections"), |l, a| {
            l.backend(*a)
        })
        .connect_timeout("3s")
        .idle_timeout("1h")
        .set("tcp_keepalive", "\"60s\"")
        .set("max_connections", "200000")
        .set("access_log", "true");
    let lb = Lb::start(&ringlb_config([l]));
    let lb_addr = lb.addr(LISTENER);
    let admin = lb.admin_addr().expect("admin address");

    std::thread::scope(|s| {
        let (reply_tx, replies) = mpsc::channel();
        let mut cmds = Vec::new();
        let per = CLIENTS / THREADS;
        for t in 0..THREADS {
            let (tx, rx) = mpsc::channel();
            cmds.push(tx);
            let out = reply_tx.clone();
            std::thread::Builder::new()
                .name(format!("ws-clients-{t}"))
                .spawn_scoped(s, move || {
                    client_thread(lb_addr, t * per..(t + 1) * per, rx, out)
                })
                .expect("spawn client thread");
        }
        drop(reply_tx);

        // 1. A thousand websockets, all open at once.
        let t = Instant::now();
        let reports = phase(&lb, &cmds, &replies, "connect", || Cmd::Connect);
        let connect_time = t.elapsed();
        let slowest = reports.iter().map(|r| r.slowest).max().unwrap_or_default();
        let mut per_backend = [0usize; BACKENDS];
        for (_, b) in reports.iter().flat_map(|r| &r.landed) {
            per_backend[*b] += 1;
        }
        let mut now = live(&backends);
        let settled = wait_until(Duration::from_secs(5), || {
            now = live(&backends);
            now.iter().flatten().sum::<usize>() == CLIENTS
        });
        eprintln!(
            "{CLIENTS} websockets connected in {connect_time:?} (slowest handshake {slowest:?}); \
             greetings per backend {per_backend:?}, live server connections {now:?}"
        );
        assert!(
            settled,
            "live server connections {now:?}, want {CLIENTS} in all"
        );
        let even = CLIENTS / BACKENDS;
        for (i, n) in now.iter().enumerate() {
            let n = n.expect("all alive");
            assert!(
                n.abs_diff(even) <= SPREAD_SLACK,
                "backend {i} holds {n} connections, want {even} ± {SPREAD_SLACK}: {now:?}"
            );
            assert_eq!(
                n, per_backend[i],
                "backend {i}: live connections vs greetings"
            );
        }

        // 2. Five round trips per client, one second apart: every echo byte-exact.
        let t = Instant::now();
        let start = Instant::now() + Duration::from_millis(100);
        let reports = phase(&lb, &cmds, &replies, "rounds before the kill", || {
            Cmd::Rounds {
                first: 0,
                count: ROUNDS,
                start,
                gap: Duration::from_secs(1),
            }
        });
        let echoed: usize = reports.iter().map(|r| r.echoed).sum();
        let slowest = reports.iter().map(|r| r.slowest).max().unwrap_or_default();
        eprintln!(
            "{echoed} messages echoed byte-exact in {:?} (slowest round trip {slowest:?})",
            t.elapsed()
        );
        assert_eq!(echoed, CLIENTS * ROUNDS as usize);
        // A server counts a message just after sending it back: wait for the last counts.
        let mut server_echoed = 0;
        let counted = wait_until(Duration::from_secs(2), || {
            server_echoed = backends
                .iter()
                .flatten()
                .map(|b| b.echoed.load(Ordering::SeqCst))
                .sum();
            server_echoed == echoed
        });
        assert!(
            counted,
            "servers echoed {server_echoed} messages, clients got {echoed}"
        );

        // 3. Kill backend 0: its listener closes, its connections are shut down.
        let dead = 0;
        let dead_addr = addrs[dead];
        let victims = now[dead].expect("alive");
        let killed = backends[dead].take().expect("alive");
        let dead_handshakes = killed.handshakes.clone();
        let handshakes_at_kill = dead_handshakes.load(Ordering::SeqCst);
        let t_kill = Instant::now();
        drop(killed);
        let kill_time = t_kill.elapsed();
        let reports = phase(&lb, &cmds, &replies, "after the kill", || Cmd::Killed {
            backend: dead,
            at: t_kill,
        });
        let ended: Vec<Duration> = reports.iter().flat_map(|r| r.ended_after.clone()).collect();
        let back: Vec<Duration> = reports
            .iter()
            .flat_map(|r| r.reconnected_after.clone())
            .collect();
        eprintln!(
            "backend {dead} ({dead_addr}) killed in {kill_time:?}: {} of its {victims} clients saw \
             the end (last {:?} after the kill), {} reconnected (last {:?} after the kill)",
            ended.len(),
            ended.iter().max(),
            back.len(),
            back.iter().max()
        );
        assert_eq!(
            ended.len(),
            victims,
            "clients of the killed backend that saw the end"
        );
        assert_eq!(
            back.len(),
            victims,
            "clients of the killed backend that reconnected"
        );
        let mut now = live(&backends);
        let settled = wait_until(Duration::from_secs(5), || {
            now = live(&backends);
            now.iter().flatten().sum::<usize>() == CLIENTS
        });
        let mut moved = [0usize; BACKENDS];
        for (_, b) in reports.iter().flat_map(|r| &r.landed) {
            moved[*b] += 1;
        }
        eprintln!("reconnections per backend {moved:?}; live server connections now {now:?}");
        assert!(
            settled,
            "live server connections {now:?}, want {CLIENTS} on the three others"
        );
        assert_eq!(
            dead_handshakes.load(Ordering::SeqCst),
            handshakes_at_kill,
            "a connection reached the killed backend"
        );
        let third = CLIENTS / (BACKENDS - 1);
        for n in now.iter().flatten() {
            assert!(
                n.abs_diff(third) <= SPREAD_SLACK,
                "after the kill, want {third} ± {SPREAD_SLACK} per backend: {now:?}"
            );
        }
        let mut m = None;
        let drained = wait_until(Duration::from_secs(5), || {
            let sc = scrape(admin);
            let d = dead_addr.to_string();
            m = metric(
                &sc,
                "ringlb_active_connections",
                &[("listener", LISTENER), ("backend", &d)],
            );
            m == Some(0.0)
                && metric_sum(&sc, "ringlb_active_connections", &[("listener", LISTENER)])
                    == CLIENTS as f64
        });
        assert!(
            drained,
            "ringlb_active_connections of the killed backend: {m:?}, want 0 (and {CLIENTS} in all)"
        );

        // 4. Every connection, old or new, still echoes byte-exact.
        let start = Instant::now() + Duration::from_millis(100);
        let reports = phase(
            &lb,
            &cmds,
            &replies,
            "rounds after the reconnection",
            || Cmd::Rounds {
                first: ROUNDS,
                count: ROUNDS_AFTER,
                start,
                gap: Duration::from_millis(500),
            },
        );
        let echoed: usize = reports.iter().map(|r| r.echoed).sum();
        eprintln!("{echoed} more messages echoed byte-exact after the reconnection");
        assert_eq!(echoed, CLIENTS * ROUNDS_AFTER as usize);

        phase(&lb, &cmds, &replies, "close", || Cmd::Close);
        drop(cmds);
    });
    drop(backends);
    eprintln!("total {:?}", t0.elapsed());
}
