//! The PURE per-connection state machine: one `Flow` per direction (client→backend "up",
//! backend→client "down"), each stepping through poll → splice in → splice out, half-close on EOF,
//! and the close reasons a connection can end with.
//!
//! It takes operation results (bytes or -errno) and answers with the next operation to issue.
//! Must not: do I/O, read clocks, or know about rings, fds or pipes; the worker owns those.

/// Direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// client → backend
    Up = 0,
    /// backend → client
    Down = 1,
}

impl Dir {
    pub const BOTH: [Dir; 2] = [Dir::Up, Dir::Down];
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Where a flow is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not started (connection still connecting).
    Idle,
    /// A POLLIN on the source is in flight; no pipe is held.
    WaitReadable,
    /// A splice source → pipe is in flight.
    Reading,
    /// A splice pipe → destination is in flight.
    Writing,
    /// A POLLOUT on the destination is in flight (destination's send buffer was full).
    WaitWritable,
    /// Source reached EOF and every byte was forwarded; destination was half-closed.
    Done,
}

/// The next operation a flow wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Arm POLLIN on the source. The pipe is empty: the worker may return it to the pool.
    PollIn,
    /// Splice source → pipe (the worker takes a pipe if the flow holds none).
    SpliceIn,
    /// Splice this many bytes pipe → destination.
    SpliceOut(u32),
    /// Arm POLLOUT on the destination.
    PollOut,
    /// The POLLOUT came back without room (only the peer's half-close, a level io_uring polls
    /// always report): wait for the destination's wake-ups instead (a multishot poll), which
    /// come when room frees, not at once.
    PollOutWakeups,
    /// Source EOF, all forwarded: shut down the destination's write side. Flow is done.
    ShutdownDest,
    /// The source failed (reset, error): -errno.
    SourceFailed(i32),
    /// The destination failed (reset, EPIPE): -errno.
    DestFailed(i32),
}

/// A splice-in that returned at least this much suggests a bulk stream: after draining the pipe,
/// try reading again at once instead of arming a poll first (saves one round trip per chunk).
const BULK_HINT: u32 = 16 * 1024;

/// A POLLOUT wake-up that means the socket can take bytes (or that writing will fail at once,
/// which the write then reports).
pub(super) const ROOM: i32 =
    (libc::POLLOUT | libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) as i32;

/// A flow whose last read was smaller than this copies its next message instead of splicing it
/// (request/response traffic); a stream whose reads are large keeps splicing.
const COPY_BELOW: u32 = 4 * 1024;

/// One direction of a proxied connection.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub phase: Phase,
    /// Bytes sitting in the pipe, not yet written to the destination.
    pub pending: u32,
    /// Size of the last successful splice-in.
    last_in: u32,
    /// The last ring receive filled its buffer: read on inline (a copy, which may then decide
    /// for splice) rather than wait in the ring again.
    ring_full: bool,
    /// Every byte must pass through the worker's memory (copy or ring receive, never splice):
    /// `drain_mode = "postgres"` reads the protocol's framing from them.
    pub see_bytes: bool,
    /// Total bytes forwarded to the destination.
    pub bytes: u64,
}

impl Default for Flow {
    fn default() -> Self {
        Flow::new()
    }
}

impl Flow {
    pub const fn new() -> Flow {
        Flow {
            phase: Phase::Idle,
            pending: 0,
            last_in: 0,
            ring_full: false,
            see_bytes: false,
            bytes: 0,
        }
    }

    /// The connection is established: start waiting for data.
    pub fn start(&mut self) -> Step {
        self.phase = Phase::WaitReadable;
        Step::PollIn
    }

    /// The POLLIN completed with `res` (a poll mask, or -errno).
    pub fn on_readable(&mut self, res: i32) -> Step {
        if res < 0 {
            return Step::SourceFailed(res);
        }
        self.phase = Phase::Reading;
        Step::SpliceIn
    }

    /// The splice source → pipe completed with `res` bytes (0 = EOF) or -errno.
    pub fn on_spliced_in(&mut self, res: i32) -> Step {
        self.ring_full = false;
        match res {
            n if n > 0 => {
                self.pending = n as u32;
                self.last_in = n as u32;
                self.phase = Phase::Writing;
                Step::SpliceOut(self.pending)
            }
            0 => {
                self.phase = Phase::Done;
                Step::ShutdownDest
            }
            e if e == -libc::EAGAIN || e == -libc::EINTR => {
                self.phase = Phase::WaitReadable;
                Step::PollIn
            }
            e => Step::SourceFailed(e),
        }
    }

    /// Small messages are copied (recv into the worker's scratch, send straight on) rather
    /// than spliced: for a few hundred bytes two copies cost less than moving page references
    /// through a pipe. A flow copies until a read fills the scratch (a stream), then splices
    /// until a splice-in comes back small. A flow that must see its bytes always copies.
    pub fn wants_copy(&self) -> bool {
        self.pending == 0 && (self.see_bytes || self.last_in < COPY_BELOW || self.ring_full)
    }

    /// A copy step: `read` bytes (0 = EOF, or -errno) were read from the source into the
    /// worker's scratch (`full`: it filled it) and `sent` of them (or -errno) went straight to
    /// the destination. The worker has put the bytes not sent into the pipe.
    pub fn on_copied(&mut self, read: i32, sent: i32, full: bool) -> Step {
        self.ring_full = false;
        if read <= 0 {
            return self.on_spliced_in(read);
        }
        if sent < 0 && sent != -libc::EAGAIN && sent != -libc::EINTR {
            return Step::DestFailed(sent);
        }
        let (read, sent) = (read as u32, (sent.max(0) as u32).min(read as u32));
        self.bytes += u64::from(sent);
        self.last_in = if full { BULK_HINT } else { read };
        if sent < read {
            self.pending = read - sent;
            self.phase = Phase::WaitWritable;
            return Step::PollOut;
        }
        if full {
            self.phase = Phase::Reading;
            Step::SpliceIn
        } else {
            self.phase = Phase::WaitReadable;
            Step::PollIn
        }
    }

    /// A ring receive brought `n` bytes into a ring buffer (`full`: it filled it, so more may
    /// be waiting); a ring send of them follows.
    pub fn on_ring_read(&mut self, n: u32, full: bool) {
        self.pending = n;
        self.last_in = n;
        self.ring_full = full;
        self.phase = Phase::Writing;
    }

    /// A ring send moved `n` bytes. Some(next step) once every received byte is out: after a
    /// full buffer read on at once (a copy into the larger scratch, which moves a stream to
    /// splice), else wait for the next message; None while bytes remain (the worker sends the
    /// rest).
    pub fn on_ring_sent(&mut self, n: u32) -> Option<Step> {
        let n = n.min(self.pending);
        self.pending -= n;
        self.bytes += u64::from(n);
        if self.pending > 0 {
            None
        } else if self.ring_full {
            self.phase = Phase::Reading;
            Some(Step::SpliceIn)
        } else {
            self.phase = Phase::WaitReadable;
            Some(Step::PollIn)
        }
    }

    /// The splice pipe → destination completed with `res` bytes or -errno.
    pub fn on_spliced_out(&mut self, res: i32) -> Step {
        match res {
            n if n > 0 => {
                let n = (n as u32).min(self.pending);
                self.pending -= n;
                self.bytes += u64::from(n);
                if self.pending > 0 {
                    Step::SpliceOut(self.pending)
                } else if self.last_in >= BULK_HINT {
                    self.phase = Phase::Reading;
                    Step::SpliceIn
                } else {
                    self.phase = Phase::WaitReadable;
                    Step::PollIn
                }
            }
            e if e == 0 || e == -libc::EAGAIN || e == -libc::EINTR => {
                self.phase = Phase::WaitWritable;
                Step::PollOut
            }
            e => Step::DestFailed(e),
        }
    }

    /// The POLLOUT completed with `res` (a poll mask, or -errno).
    pub fn on_writable(&mut self, res: i32) -> Step {
        if res < 0 {
            return Step::DestFailed(res);
        }
        if res & ROOM == 0 {
            self.phase = Phase::WaitWritable;
            return Step::PollOutWakeups;
        }
        self.phase = Phase::Writing;
        Step::SpliceOut(self.pending)
    }

    /// The worker ran out of inline budget before `step` (a splice or copy): wait for the ring
    /// to report readiness instead (it fires at once when data or room is already there).
    pub fn yield_to_ring(&mut self, step: Step) -> Step {
        match step {
            Step::SpliceIn => {
                self.phase = Phase::WaitReadable;
                Step::PollIn
            }
            Step::SpliceOut(_) => {
                self.phase = Phase::WaitWritable;
                Step::PollOut
            }
            other => other,
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }
}

/// Why a connection ended. Counted and logged (debug, or the access log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished; the client sent its FIN first.
    ClientEof,
    /// Both directions finished; the backend sent its FIN first.
    BackendEof,
    ClientReset,
    BackendReset,
    /// Every connect attempt was refused.
    BackendRefused,
    /// The last connect attempt hit `connect_timeout`.
    BackendTimeout,
    /// The last connect attempt failed otherwise (unreachable, ...).
    BackendError,
    /// No eligible backend (all down, full, or none left to retry).
    NoBackend,
    IdleTimeout,
    /// Closed by shutdown after the drain timeout.
    Draining,
    /// Out of a local resource (fds, pipes, memory).
    Resource,
    /// Every eligible backend stayed full for `queue_timeout`.
    QueueTimeout,
    /// `accept_proxy_protocol`: the client sent no valid PROXY header in time.
    BadProxyHeader,
    /// `on_backend_down = "close"`: the backend was marked down.
    BackendDown,
    /// The client closed or reset while it waited (held, queued, connecting): nothing was
    /// forwarded for it.
    ClientAborted,
    /// Accepted over `max_connections` with the hold list full.
    OverLimit,
    /// `accept_proxy_protocol_from`: the peer is not a trusted proxy.
    UntrustedProxy,
    /// `drain_mode = "postgres"`: the backend is draining and the session went idle (between
    /// transactions); both sides see a clean close.
    DrainIdle,
    /// TLS passthrough: no route matched the ClientHello (or there was none to read) and the
    /// listener has no default route.
    NoRoute,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientEof => "client EOF",
            CloseReason::BackendEof => "backend EOF",
            CloseReason::ClientReset => "client reset",
            CloseReason::BackendReset => "backend reset",
            CloseReason::BackendRefused => "backend refused",
            CloseReason::BackendTimeout => "backend timeout",
            CloseReason::BackendError => "backend error",
            CloseReason::NoBackend => "no healthy backend",
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::Draining => "draining",
            CloseReason::Resource => "local resource exhausted",
            CloseReason::QueueTimeout => "queue timeout",
            CloseReason::BadProxyHeader => "bad PROXY header",
            CloseReason::BackendDown => "backend marked down",
            CloseReason::ClientAborted => "client gave up while waiting",
            CloseReason::OverLimit => "over max_connections (hold list full)",
            CloseReason::UntrustedProxy => "PROXY header from an untrusted peer",
            CloseReason::DrainIdle => "drained at an idle session",
            CloseReason::NoRoute => "no route for the ClientHello",
        }
    }

    /// Index into `backend::CLOSE_REASONS` (metrics label).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Which side, if any, should see a reset (RST) rather than a FIN when we close.
    pub fn reset_other_side(self) -> Option<Side> {
        match self {
            CloseReason::ClientReset | CloseReason::ClientAborted => Some(Side::Backend),
            CloseReason::BackendReset => Some(Side::Client),
            _ => None,
        }
    }

    /// Whether closing for this reason cuts a live stream, so both sides must see a reset (a
    /// FIN would tell an EOF-framed protocol that the stream was complete). An idle timeout
    /// only cuts one when bytes were still parked (the worker checks that).
    pub fn cuts_stream(self) -> bool {
        matches!(
            self,
            CloseReason::Resource | CloseReason::Draining | CloseReason::BackendDown
        )
    }

    /// Reason for a flow failure: the failing side is the source or the destination of `dir`.
    pub fn from_failure(dir: Dir, source_failed: bool) -> CloseReason {
        match (dir, source_failed) {
            (Dir::Up, true) | (Dir::Down, false) => CloseReason::ClientReset,
            (Dir::Up, false) | (Dir::Down, true) => CloseReason::BackendReset,
        }
    }

    /// Reason for a failed connect attempt result (-errno).
    pub fn from_connect_error(res: i32) -> CloseReason {
        match -res {
            libc::ECONNREFUSED => CloseReason::BackendRefused,
            libc::ECANCELED | libc::ETIMEDOUT | libc::ETIME => CloseReason::BackendTimeout,
            _ => CloseReason::BackendError,
        }
    }
}

/// One end of a proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_message_round_trip() {
        let mut f = Flow::new();
        assert_eq!(f.start(), Step::PollIn);
        assert_eq!(f.on_readable(1), Step::SpliceIn);
        assert_eq!(f.on_spliced_in(100), Step::SpliceOut(100));
        assert_eq!(f.on_spliced_out(60), Step::SpliceOut(40));
        assert_eq!(f.on_spliced_out(40), Step::PollIn);
        assert_eq!(f.bytes, 100);
        assert_eq!(f.phase, Phase::WaitReadable);
        assert_eq!(f.pending, 0);
    }

    #[test]
    fn bulk_reads_again_without_poll() {
        let mut f = Flow::new();
        f.start();
        f.on_readable(1);
        assert_eq!(f.on_spliced_in(1 << 20), Step::SpliceOut(1 << 20));
        assert_eq!(f.on_spliced_out(1 << 20), Step::SpliceIn);
        assert_eq!(f.on_spliced_in(-libc::EAGAIN), Step::PollIn);
    }

    #[test]
    fn full_destination_waits_for_writable() {
        let mut f = Flow::new();
        f.start();
        f.on_readable(1);
        f.on_spliced_in(10);
        assert_eq!(f.on_spliced_out(-libc::EAGAIN), Step::PollOut);
        assert_eq!(f.on_writable(4), Step::SpliceOut(10));
        assert_eq!(
            f.on_spliced_out(-libc::EPIPE),
            Step::DestFailed(-libc::EPIPE)
        );
    }

    #[test]
    fn small_messages_are_copied_and_streams_spliced() {
        let mut f = Flow::new();
        f.start();
        f.on_readable(1);
        assert!(f.wants_copy());
        assert_eq!(f.on_copied(100, 100, false), Step::PollIn);
        assert_eq!(f.bytes, 100);
        // A read that fills the scratch means a stream: splice from now on.
        f.on_readable(1);
        assert_eq!(f.on_copied(16384, 16384, true), Step::SpliceIn);
        assert!(!f.wants_copy());
        assert_eq!(f.on_spliced_in(8000), Step::SpliceOut(8000));
        assert_eq!(f.on_spliced_out(8000), Step::PollIn);
        assert!(!f.wants_copy(), "8 KB reads keep splicing");
        f.on_readable(1);
        assert_eq!(f.on_spliced_in(500), Step::SpliceOut(500));
        assert_eq!(f.on_spliced_out(500), Step::PollIn);
        assert!(f.wants_copy(), "small reads go back to copying");
    }

    #[test]
    fn a_flow_that_sees_its_bytes_never_splices() {
        let mut f = Flow::new();
        f.see_bytes = true;
        f.start();
        f.on_readable(1);
        assert!(f.wants_copy());
        // A stream (full reads) stays on the copy path.
        assert_eq!(f.on_copied(16384, 16384, true), Step::SpliceIn);
        assert!(f.wants_copy());
        f.on_ring_read(4096, true);
        assert_eq!(f.on_ring_sent(4096), Some(Step::SpliceIn));
        assert!(f.wants_copy());
        // Bytes parked in the pipe (already seen) are spliced out first.
        assert_eq!(f.on_copied(1000, 400, false), Step::PollOut);
        assert!(!f.wants_copy());
    }

    #[test]
    fn copy_leftovers_wait_in_the_pipe() {
        let mut f = Flow::new();
        f.start();
        f.on_readable(1);
        assert_eq!(f.on_copied(1000, 400, false), Step::PollOut);
        assert_eq!(f.pending, 600);
        assert_eq!(f.on_writable(4), Step::SpliceOut(600));
        assert_eq!(f.on_spliced_out(600), Step::PollIn);
        assert_eq!(f.bytes, 1000);
        let mut g = Flow::new();
        g.start();
        g.on_readable(1);
        assert_eq!(g.on_copied(10, -libc::EAGAIN, false), Step::PollOut);
        assert_eq!(g.pending, 10);
        let mut h = Flow::new();
        h.start();
        h.on_readable(1);
        assert_eq!(
            h.on_copied(10, -libc::EPIPE, false),
            Step::DestFailed(-libc::EPIPE)
        );
        assert_eq!(h.on_copied(0, 0, false), Step::ShutdownDest);
    }

    #[test]
    fn ring_messages_wait_in_the_ring_and_a_full_buffer_reads_on_inline() {
        let mut f = Flow::new();
        assert_eq!(f.start(), Step::PollIn);
        assert!(
            f.wants_copy(),
            "a new flow takes its first message through the ring"
        );
        // 100 bytes in, sent in two pieces: the rest first, then back to waiting.
        f.on_ring_read(100, false);
        assert_eq!(f.phase, Phase::Writing);
        assert_eq!(f.on_ring_sent(60), None);
        assert_eq!(f.pending, 40);
        assert_eq!(f.on_ring_sent(40), Some(Step::PollIn));
        assert_eq!((f.pending, f.bytes, f.phase), (0, 100, Phase::WaitReadable));
        assert!(f.wants_copy());
        // A full buffer: more may be waiting, so read on at once, by copy (no pipe needed).
        f.on_ring_read(4096, true);
        assert_eq!(f.on_ring_sent(4096), Some(Step::SpliceIn));
        assert!(
            f.wants_copy(),
            "after a full ring buffer the next read is a copy"
        );
        // That copy filled the scratch too: a stream, spliced from here on.
        assert_eq!(f.on_copied(16384, 16384, true), Step::SpliceIn);
        assert!(!f.wants_copy());
        // A ring send never counts more than was received.
        let mut g = Flow::new();
        g.start();
        g.on_ring_read(10, false);
        assert_eq!(g.on_ring_sent(99), Some(Step::PollIn));
        assert_eq!(g.bytes, 10);
    }

    #[test]
    fn a_pollout_without_room_waits_for_wakeups() {
        let mut f = Flow::new();
        f.start();
        f.on_readable(libc::POLLIN as i32);
        assert_eq!(f.on_spliced_in(1000), Step::SpliceOut(1000));
        assert_eq!(f.on_spliced_out(-libc::EAGAIN), Step::PollOut);
        // The destination half-closed: io_uring reports POLLRDHUP alone, no room.
        assert_eq!(f.on_writable(libc::POLLRDHUP as i32), Step::PollOutWakeups);
        assert_eq!(f.phase, Phase::WaitWritable);
        assert_eq!(f.pending, 1000);
        // Room at last (with the half-close still set).
        let mask = (libc::POLLOUT | libc::POLLRDHUP) as i32;
        assert_eq!(f.on_writable(mask), Step::SpliceOut(1000));
        // An error or hang-up is for the splice to report.
        f.on_spliced_out(-libc::EAGAIN);
        assert_eq!(f.on_writable(libc::POLLHUP as i32), Step::SpliceOut(1000));
    }

    #[test]
    fn out_of_budget_waits_for_the_ring() {
        let mut f = Flow::new();
        f.start();
        f.on_readable(1);
        assert_eq!(f.yield_to_ring(Step::SpliceIn), Step::PollIn);
        assert_eq!(f.phase, Phase::WaitReadable);
        f.on_readable(1);
        f.on_spliced_in(10);
        assert_eq!(f.yield_to_ring(Step::SpliceOut(10)), Step::PollOut);
        assert_eq!(f.on_writable(4), Step::SpliceOut(10));
    }

    #[test]
    fn eof_half_closes_destination() {
        let mut f = Flow::new();
        f.start();
        f.on_readable(1);
        assert_eq!(f.on_spliced_in(0), Step::ShutdownDest);
        assert!(f.is_done());
    }

    #[test]
    fn source_errors_fail() {
        let mut f = Flow::new();
        f.start();
        assert_eq!(
            f.on_readable(-libc::ECANCELED),
            Step::SourceFailed(-libc::ECANCELED)
        );
        let mut g = Flow::new();
        g.start();
        g.on_readable(1);
        assert_eq!(
            g.on_spliced_in(-libc::ECONNRESET),
            Step::SourceFailed(-libc::ECONNRESET)
        );
    }

    #[test]
    fn reason_indices_match_metric_labels() {
        use crate::backend::CLOSE_REASONS;
        let all = [
            (CloseReason::ClientEof, "client_eof"),
            (CloseReason::BackendEof, "backend_eof"),
            (CloseReason::ClientReset, "client_reset"),
            (CloseReason::BackendReset, "backend_reset"),
            (CloseReason::BackendRefused, "backend_refused"),
            (CloseReason::BackendTimeout, "backend_timeout"),
            (CloseReason::BackendError, "backend_error"),
            (CloseReason::NoBackend, "no_backend"),
            (CloseReason::IdleTimeout, "idle_timeout"),
            (CloseReason::Draining, "draining"),
            (CloseReason::Resource, "resource"),
            (CloseReason::QueueTimeout, "queue_timeout"),
            (CloseReason::BadProxyHeader, "bad_proxy_header"),
            (CloseReason::BackendDown, "backend_down"),
            (CloseReason::ClientAborted, "client_aborted"),
            (CloseReason::OverLimit, "over_limit"),
            (CloseReason::UntrustedProxy, "untrusted_proxy"),
            (CloseReason::DrainIdle, "drain_idle"),
            (CloseReason::NoRoute, "no_route"),
        ];
        assert_eq!(all.len(), CLOSE_REASONS.len());
        for (r, label) in all {
            assert_eq!(CLOSE_REASONS[r.index()], label);
        }
    }

    #[test]
    fn reasons_map_sides() {
        assert_eq!(
            CloseReason::from_failure(Dir::Up, true),
            CloseReason::ClientReset
        );
        assert_eq!(
            CloseReason::from_failure(Dir::Up, false),
            CloseReason::BackendReset
        );
        assert_eq!(
            CloseReason::from_failure(Dir::Down, true),
            CloseReason::BackendReset
        );
        assert_eq!(
            CloseReason::ClientReset.reset_other_side(),
            Some(Side::Backend)
        );
        assert_eq!(
            CloseReason::from_connect_error(-libc::ECANCELED),
            CloseReason::BackendTimeout
        );
        assert_eq!(
            CloseReason::from_connect_error(-libc::ECONNREFUSED),
            CloseReason::BackendRefused
        );
    }
}
