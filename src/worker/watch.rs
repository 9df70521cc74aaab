//! The peer watch: notices, within a scan period, a peer that went away while nothing armed on
//! its socket would tell. A proxied connection has a readiness poll in flight on the source of
//! each direction waiting to read and on the destination of each direction waiting to write;
//! those report errors and hang-ups as they happen. A socket with neither (its direction blocked
//! on the other side, or its peer half-closed) is checked here, and so is the client of a
//! connection still waiting for a backend (held, queued, connecting), on which nothing is armed.
//! All such sockets of the worker go into one non-blocking `poll(2)` per scan.
//!
//! What counts as gone: an error (a reset, a keepalive timeout) or a hang-up not explained by our
//! own half-close. A waiting client that closed without sending anything has given up; one that
//! sent a request and half-closed is still waiting for its answer and is kept.
//! Must not: allocate (the poll set is reused) or touch a socket of a closing connection.

use super::conn::{CloseReason, Phase, Side};
use super::{Stage, Worker};
use crate::sys;
use std::os::fd::AsRawFd;

impl Worker {
    /// One pass of the watch over every open connection of this worker.
    pub(super) fn watch_peers(&mut self) {
        let mut fds = std::mem::take(&mut self.watch_fds);
        let mut who = std::mem::take(&mut self.watch_who);
        fds.clear();
        who.clear();
        for (idx, slot) in self.slots.iter().enumerate() {
            let Some(c) = slot.conn.as_ref().filter(|c| !c.closing) else {
                continue;
            };
            let mut watch = |fd: i32, events: i16, side: Side| {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                who.push((idx as u32, slot.generation, side));
            };
            match c.stage {
                Stage::Held | Stage::Queued | Stage::Connecting => {
                    watch(c.client.as_raw_fd(), libc::POLLRDHUP, Side::Client);
                }
                Stage::Proxying => {
                    let (up, down) = (c.flows[0].phase, c.flows[1].phase);
                    let client_armed = up == Phase::WaitReadable || down == Phase::WaitWritable;
                    let backend_armed = down == Phase::WaitReadable || up == Phase::WaitWritable;
                    if !client_armed {
                        watch(c.client.as_raw_fd(), 0, Side::Client);
                    }
                    if let (false, Some(b)) = (backend_armed, c.backend.as_ref()) {
                        watch(b.as_raw_fd(), 0, Side::Backend);
                    }
                }
                // A poll for the PROXY header or the ClientHello is armed on the client.
                Stage::Header | Stage::Hello => {}
            }
        }
        if sys::poll_now(&mut fds).unwrap_or(0) > 0 {
            for (p, &(idx, generation, side)) in fds.iter().zip(&who) {
                if p.revents != 0 {
                    self.on_watched(idx, generation, side, p.revents);
                }
            }
        }
        self.watch_fds = fds;
        self.watch_who = who;
    }

    /// True when the client of connection `idx` (still waiting for a backend) is gone: an
    /// error, a hang-up, or a half-close with nothing sent.
    pub(super) fn client_gone(&self, idx: u32) -> bool {
        let Some(c) = self.slots[idx as usize].conn.as_ref() else {
            return false;
        };
        let mut p = [libc::pollfd {
            fd: c.client.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        }];
        if sys::poll_now(&mut p).unwrap_or(0) == 0 {
            return false;
        }
        let r = p[0].revents;
        r & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0
            || (r & libc::POLLRDHUP != 0 && sys::readable_bytes(c.client.as_raw_fd()) == 0)
    }

    fn on_watched(&mut self, idx: u32, generation: u32, side: Side, revents: i16) {
        let slot = &self.slots[idx as usize];
        // An earlier entry's close may have freed (and a completion reused) this slot.
        let Some(c) = slot.conn.as_ref().filter(|c| !c.closing) else {
            return;
        };
        if slot.generation != generation {
            return;
        }
        let failed = revents & (libc::POLLERR | libc::POLLNVAL) != 0;
        let hung_up = revents & libc::POLLHUP != 0;
        let reason = match c.stage {
            Stage::Held | Stage::Queued | Stage::Connecting => {
                let closed = revents & libc::POLLRDHUP != 0
                    && sys::readable_bytes(c.client.as_raw_fd()) == 0;
                (failed || hung_up || closed).then_some(CloseReason::ClientAborted)
            }
            Stage::Proxying => {
                // Our own shutdown(SHUT_WR) of this socket plus the peer's FIN is a hang-up too;
                // only an error, or a hang-up we did not half-cause, means the peer is gone.
                let we_shut = match side {
                    Side::Client => c.flows[1].is_done(),
                    Side::Backend => c.flows[0].is_done(),
                };
                (failed || (hung_up && !we_shut)).then_some(match side {
                    Side::Client => CloseReason::ClientReset,
                    Side::Backend => CloseReason::BackendReset,
                })
            }
            Stage::Header | Stage::Hello => None,
        };
        if let Some(r) = reason {
            log::debug!(
                "conn {idx}: {side:?} gone ({revents:#x}) while unwatched: {}",
                r.as_str()
            );
            self.close_conn(idx, r);
        }
    }
}
