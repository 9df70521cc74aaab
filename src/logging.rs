//! The process's logger (a [`log::Log`]): `RUST_LOG` filtering (env_logger's syntax, through
//! `env_filter`), text or JSON lines, and the access log (records with target [`ACCESS_TARGET`],
//! one per closed connection) sent to its own destination by a writer thread.
//!
//! Every record is exactly one line in either format: control characters in messages are
//! escaped (text) or JSON-escaped, so a multi-line error (a TOML excerpt, an error chain) never
//! spans lines in a journal or a log shipper.
//!
//! Must not: block a worker on the access log. Workers format their line and hand it to a
//! bounded queue without waiting; when the queue is full the line is dropped and counted, and
//! the writer thread warns (at most every 10 s). Other records are written to stderr by the
//! thread that logs them, as env_logger did; the data plane logs those only on rare events.

use crate::config::{AccessLog, LogConfig, LogFormat};
use log::kv::{self, Key, Value, VisitSource, VisitValue};
use log::{LevelFilter, Log, Metadata, Record};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Target of access log records (`info!(target: ACCESS_TARGET, ...)`). They are written whenever
/// a listener has `access_log = true`, whatever `RUST_LOG` says.
pub const ACCESS_TARGET: &str = "ringlb::access";
/// Access lines queued for the writer thread at most; beyond, lines are dropped and counted.
pub const ACCESS_QUEUE: usize = 16_384;
/// The "access lines dropped" warning comes at most this often.
const DROP_WARN_EVERY: Duration = Duration::from_secs(10);
/// The writer thread wakes this often to apply a reopen or a new destination without a line.
const WRITER_TICK: Duration = Duration::from_millis(200);
/// Keys the JSON format writes itself; a record field of the same name is written as `kv_<key>`.
const RESERVED: [&str; 4] = ["ts", "level", "target", "msg"];

enum Msg {
    Line(String),
    Flush(mpsc::Sender<()>),
}

/// The bounded queue from the logging threads to the writer: never waits, counts what it drops.
struct AccessQueue {
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
}

impl AccessQueue {
    fn new(capacity: usize) -> (AccessQueue, Receiver<Msg>) {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let q = AccessQueue {
            tx,
            dropped: AtomicU64::new(0),
        };
        (q, rx)
    }

    /// Queues `line`, or drops and counts it when the queue is full.
    fn push(&self, line: String) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Logger {
    filter: env_filter::Filter,
    json: AtomicBool,
    access: AccessQueue,
    reopen: AtomicBool,
    /// A destination the writer switches to before its next line (a reload changed it).
    switch: Mutex<Option<Sink>>,
    /// The configured destination (what a reload compares with).
    current: Mutex<AccessLog>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Installs the logger with `config`'s format and access log destination; `RUST_LOG` (default
/// `info`) filters everything but the access log. Fails if the access log file cannot be opened.
pub fn init(config: &LogConfig) -> Result<(), String> {
    let sink = Sink::open(&config.access_log).map_err(|e| {
        format!(
            "log: field \"access_log\": cannot open {}: {e}",
            config.access_log
        )
    })?;
    let mut builder = env_filter::Builder::new();
    match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => {
            builder.parse(&spec);
        }
        _ => {
            builder.filter_level(LevelFilter::Info);
        }
    }
    let filter = builder.build();
    let max = filter.filter().max(LevelFilter::Info);
    let (access, rx) = AccessQueue::new(ACCESS_QUEUE);
    let logger = Logger {
        filter,
        json: AtomicBool::new(config.format == LogFormat::Json),
        access,
        reopen: AtomicBool::new(false),
        switch: Mutex::new(None),
        current: Mutex::new(config.access_log.clone()),
    };
    if LOGGER.set(logger).is_err() {
        return Err("the logger is already installed".into());
    }
    let logger = LOGGER.get().expect("just set");
    log::set_logger(logger).map_err(|e| e.to_string())?;
    log::set_max_level(max);
    // The writer must never take a process signal (SIGHUP, SIGTERM, SIGUSR1 are waited for by
    // the runtime's main thread; one delivered here would take its default action and end the
    // process): it starts with every signal blocked, inherited from this thread's mask.
    let all = nix::sys::signal::SigSet::all();
    let previous = all
        .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
        .map_err(|e| format!("cannot block signals for the access log writer: {e}"))?;
    let spawned = std::thread::Builder::new()
        .name("ringlb-log".into())
        .spawn(move || writer(logger, rx, sink));
    let _ = previous.thread_set_mask();
    spawned.map_err(|e| format!("cannot start the access log writer: {e}"))?;
    Ok(())
}

/// Access lines dropped so far because the queue was full.
pub fn access_lines_dropped() -> u64 {
    LOGGER
        .get()
        .map_or(0, |l| l.access.dropped.load(Ordering::Relaxed))
}

/// Asks the writer to reopen the access log file (SIGUSR1, after logrotate moved it).
pub fn reopen_access_log() {
    if let Some(l) = LOGGER.get() {
        l.reopen.store(true, Ordering::Relaxed);
    }
}

/// A `[log]` change opened ahead of a reload: [`Prepared::install`] applies it once the rest of
/// the reload succeeded, so a file that cannot be opened refuses the reload and changes nothing.
pub struct Prepared {
    config: LogConfig,
    sink: Option<Sink>,
}

/// Opens what `config` needs that differs from the running logger.
pub fn prepare(config: &LogConfig) -> Result<Prepared, String> {
    let unchanged = LOGGER
        .get()
        .is_none_or(|l| *lock(&l.current) == config.access_log);
    let sink = if unchanged {
        None
    } else {
        Some(Sink::open(&config.access_log).map_err(|e| {
            format!(
                "log: field \"access_log\": cannot open {}: {e}",
                config.access_log
            )
        })?)
    };
    Ok(Prepared {
        config: config.clone(),
        sink,
    })
}

impl Prepared {
    pub fn install(self) {
        let Some(l) = LOGGER.get() else { return };
        l.json
            .store(self.config.format == LogFormat::Json, Ordering::Relaxed);
        if let Some(sink) = self.sink {
            *lock(&l.switch) = Some(sink);
            *lock(&l.current) = self.config.access_log.clone();
        }
    }
}

/// Writes the access lines still queued (waits up to 2 s: a stuck destination cannot hold up
/// the exit).
pub fn shutdown() {
    let Some(l) = LOGGER.get() else { return };
    let deadline = Instant::now() + Duration::from_secs(2);
    let (ack_tx, ack_rx) = mpsc::channel();
    let mut msg = Msg::Flush(ack_tx);
    loop {
        match l.access.tx.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return,
        }
    }
    let _ = ack_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}

/// A failure that ends the process, as one line: `error: ...` in text, an ERROR record in JSON.
pub fn fatal(message: &str) {
    match LOGGER.get() {
        Some(l) if l.json.load(Ordering::Relaxed) => {
            // Written past the RUST_LOG filter: the reason the process exits is never hidden.
            let line = format_record(
                &Record::builder()
                    .level(log::Level::Error)
                    .target("ringlb")
                    .args(format_args!("{message}"))
                    .build(),
                true,
                SystemTime::now(),
            );
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
        _ => eprintln!("error: {}", one_line(message)),
    }
}

/// An error and its `source()` chain on one line, `outer: inner: ...` (a source whose text the
/// outer message already contains is not repeated).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    one_line(&out)
}

/// `s` with control characters escaped (`\n`, `\r`, `\xHH`; tabs stay), so it is one line.
pub fn one_line(s: &str) -> String {
    if !s.chars().any(needs_escape) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 16);
    push_escaped(&mut out, s);
    out
}

fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t') || c == '\u{2028}' || c == '\u{2029}'
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.target() == ACCESS_TARGET || self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        let access = record.target() == ACCESS_TARGET;
        if !access && !self.filter.matches(record) {
            return;
        }
        let json = self.json.load(Ordering::Relaxed);
        let line = format_record(record, json, SystemTime::now());
        if access {
            self.access.push(line);
        } else {
            // One write per line (the lock keeps lines whole across threads).
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// One record as one line (with its `\n`).
pub fn format_record(record: &Record, json: bool, now: SystemTime) -> String {
    let mut msg = String::new();
    let _ = write!(msg, "{}", record.args());
    let mut fields = Fields::default();
    let _ = record.key_values().visit(&mut fields);
    let ts = rfc3339_millis(now);
    let level = record.level().as_str();
    let mut out = String::with_capacity(96 + msg.len() + fields.0.len() * 24);
    if json {
        out.push_str("{\"ts\":");
        push_json_str(&mut out, &ts);
        out.push_str(",\"level\":");
        push_json_str(&mut out, level);
        out.push_str(",\"target\":");
        push_json_str(&mut out, record.target());
        out.push_str(",\"msg\":");
        push_json_str(&mut out, &msg);
        for (key, value) in &fields.0 {
            out.push(',');
            if RESERVED.contains(&key.as_str()) {
                push_json_str(&mut out, &format!("kv_{key}"));
            } else {
                push_json_str(&mut out, key);
            }
            out.push(':');
            value.push_json(&mut out);
        }
        out.push_str("}\n");
    } else {
        let _ = write!(out, "[{ts} {level:<5} {}] ", record.target());
        push_escaped(&mut out, &msg);
        for (i, (key, value)) in fields.0.iter().enumerate() {
            out.push_str(match (i, msg.is_empty()) {
                (0, true) => "",
                (0, false) => ": ",
                _ => " ",
            });
            push_escaped(&mut out, key);
            out.push('=');
            value.push_text(&mut out);
        }
        out.push('\n');
    }
    out
}

fn push_json_str(out: &mut String, s: &str) {
    // Serializing a str to JSON cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// A record's key-value fields, in the order they were written.
#[derive(Default)]
struct Fields(Vec<(String, Field)>);

enum Field {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(String),
}

impl Field {
    fn push_json(&self, out: &mut String) {
        match self {
            Field::Null => out.push_str("null"),
            Field::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Field::U64(n) => {
                let _ = write!(out, "{n}");
            }
            Field::I64(n) => {
                let _ = write!(out, "{n}");
            }
            Field::F64(f) if f.is_finite() => {
                let _ = write!(out, "{f}");
            }
            Field::F64(f) => push_json_str(out, &f.to_string()),
            Field::Str(s) => push_json_str(out, s),
        }
    }

    /// logfmt: strings with spaces, quotes, `=` or nothing at all are quoted.
    fn push_text(&self, out: &mut String) {
        match self {
            Field::Null => out.push('-'),
            Field::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Field::U64(n) => {
                let _ = write!(out, "{n}");
            }
            Field::I64(n) => {
                let _ = write!(out, "{n}");
            }
            Field::F64(f) => {
                let _ = write!(out, "{f}");
            }
            Field::Str(s) if !s.is_empty() && !s.contains([' ', '"', '=', '\\']) => {
                push_escaped(out, s);
            }
            Field::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c => push_escaped(out, c.encode_utf8(&mut [0; 4])),
                    }
                }
                out.push('"');
            }
        }
    }
}

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
        let mut field = FieldVisitor(None);
        value.visit(&mut field)?;
        let field = field.0.unwrap_or_else(|| Field::Str(value.to_string()));
        self.0.push((key.as_str().to_string(), field));
        Ok(())
    }
}

struct FieldVisitor(Option<Field>);

impl<'v> VisitValue<'v> for FieldVisitor {
    fn visit_any(&mut self, value: Value) -> Result<(), kv::Error> {
        self.0 = Some(Field::Str(value.to_string()));
        Ok(())
    }
    fn visit_null(&mut self) -> Result<(), kv::Error> {
        self.0 = Some(Field::Null);
        Ok(())
    }
    fn visit_u64(&mut self, v: u64) -> Result<(), kv::Error> {
        self.0 = Some(Field::U64(v));
        Ok(())
    }
    fn visit_i64(&mut self, v: i64) -> Result<(), kv::Error> {
        self.0 = Some(Field::I64(v));
        Ok(())
    }
    fn visit_f64(&mut self, v: f64) -> Result<(), kv::Error> {
        self.0 = Some(Field::F64(v));
        Ok(())
    }
    fn visit_bool(&mut self, v: bool) -> Result<(), kv::Error> {
        self.0 = Some(Field::Bool(v));
        Ok(())
    }
    fn visit_str(&mut self, v: &str) -> Result<(), kv::Error> {
        self.0 = Some(Field::Str(v.to_string()));
        Ok(())
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339, UTC, milliseconds).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, m, day) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (Howard Hinnant's
/// civil_from_days, as build.rs uses for the build date).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Where access lines are written.
enum Sink {
    Stderr,
    Stdout,
    File {
        path: PathBuf,
        file: BufWriter<File>,
    },
}

impl Sink {
    fn open(dest: &AccessLog) -> std::io::Result<Sink> {
        Ok(match dest {
            AccessLog::Stderr => Sink::Stderr,
            AccessLog::Stdout => Sink::Stdout,
            AccessLog::File(path) => Sink::File {
                path: path.clone(),
                file: BufWriter::with_capacity(64 * 1024, open_append(path)?),
            },
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stderr => std::io::stderr().lock().write_all(bytes),
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File { file, .. } => {
                file.write_all(bytes)?;
                file.flush()
            }
        }
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// The access log writer thread: batches queued lines into one write, applies reopen and
/// destination switches between batches, warns about dropped lines and write errors.
fn writer(logger: &'static Logger, rx: Receiver<Msg>, mut sink: Sink) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut acks = Vec::new();
    let (mut reported_drops, mut last_drop_warn) = (0u64, None::<Instant>);
    let (mut write_errors, mut last_error_warn) = (0u64, None::<Instant>);
    loop {
        let first = match rx.recv_timeout(WRITER_TICK) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        apply_requests(logger, &mut sink);
        let push = |m: Msg, batch: &mut Vec<u8>, acks: &mut Vec<mpsc::Sender<()>>| match m {
            Msg::Line(l) => batch.extend_from_slice(l.as_bytes()),
            Msg::Flush(ack) => acks.push(ack),
        };
        if let Some(m) = first {
            push(m, &mut batch, &mut acks);
            while batch.len() < 64 * 1024 {
                match rx.try_recv() {
                    Ok(m) => push(m, &mut batch, &mut acks),
                    Err(_) => break,
                }
            }
        }
        if !batch.is_empty() {
            if let Err(e) = sink.write_all(&batch) {
                write_errors += 1;
                if last_error_warn.is_none_or(|t| t.elapsed() >= DROP_WARN_EVERY) {
                    log::warn!(
                        "access log: write failed ({e}); {write_errors} failed write(s) so far, \
                         their lines are lost"
                    );
                    last_error_warn = Some(Instant::now());
                }
            }
            batch.clear();
        }
        acks.drain(..).for_each(|a| {
            let _ = a.send(());
        });
        let dropped = logger.access.dropped.load(Ordering::Relaxed);
        if dropped > reported_drops && last_drop_warn.is_none_or(|t| t.elapsed() >= DROP_WARN_EVERY)
        {
            log::warn!(
                "access log: {} line(s) dropped ({dropped} in all): the destination does not keep \
                 up and the queue of {ACCESS_QUEUE} lines was full; workers never wait for it",
                dropped - reported_drops
            );
            reported_drops = dropped;
            last_drop_warn = Some(Instant::now());
        }
    }
}

/// Applies a pending destination switch (reload) and a reopen request (SIGUSR1).
fn apply_requests(logger: &Logger, sink: &mut Sink) {
    if let Some(new) = lock(&logger.switch).take() {
        *sink = new;
        log::info!("access log now goes to {}", lock(&logger.current));
    }
    if !logger.reopen.swap(false, Ordering::Relaxed) {
        return;
    }
    match sink {
        Sink::File { path, file } => match open_append(path) {
            Ok(f) => {
                let _ = file.flush();
                *file = BufWriter::with_capacity(64 * 1024, f);
                log::info!("access log reopened: {}", path.display());
            }
            Err(e) => log::warn!(
                "access log: cannot reopen {}: {e}; still writing to the file opened before",
                path.display()
            ),
        },
        Sink::Stderr | Sink::Stdout => {
            log::info!("access log goes to stderr or stdout: nothing to reopen");
        }
    }
}

#[cfg(test)]
#[path = "logging_tests.rs"]
mod tests;
