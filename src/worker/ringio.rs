//! Small messages through the ring (io_uring with a buffer ring): a flow that copies (its reads
//! stay under the ring buffer size) waits for data with a buffered `RECV` instead of a
//! readiness poll; the kernel picks a buffer only when bytes arrive, and the worker forwards
//! them with a `SEND` from that same buffer, recycling it when the send has completed. Neither
//! costs a syscall of its own: both go out with the worker's next `io_uring_enter`.
//!
//! Per flow, at most one buffer and one operation are in flight (receive, then send, then the
//! next receive), which keeps bytes in order and caps what one fast stream can hold. A read that
//! fills the buffer marks a stream: the flow goes back to splicing (`conn.rs`). No buffer free
//! (`-ENOBUFS`), or a send the socket refused for now (`-EAGAIN`), falls back to the poll path
//! for that message (the rest of a refused send waits in a pipe, as a short copy's does).
//! Must not: hold a buffer past the completion that ends its use, or touch a closing connection.

use super::conn::{CloseReason, Dir, Step};
use super::tcp::count_bytes;
use super::Worker;
use crate::io::{Completion, Driver, Op, Token};
use crate::sys;
use std::os::fd::AsRawFd;

/// The ring buffer a flow holds while its send is in flight: bytes `[off, off + len)` of `bid`
/// are still to go.
#[derive(Clone, Copy, Debug)]
pub(super) struct RingBuf {
    pub(super) bid: u16,
    off: u32,
    len: u32,
}

fn send_op(d: Dir) -> Op {
    if d == Dir::Up {
        Op::SendBuf0
    } else {
        Op::SendBuf1
    }
}

impl Worker {
    /// A buffered receive on the source of flow `d` of connection `idx` completed.
    pub(super) fn on_ring_recv(&mut self, idx: u32, d: Dir, c: Completion) {
        let generation = self.slots[idx as usize].generation;
        let now = self.now_ms;
        let size = self.io.buffer_size();
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        let di = d.index();
        let (Some(backend), res) = (conn.backend.as_ref(), c.result) else {
            return;
        };
        let (src, dst) = match d {
            Dir::Up => (conn.client.as_raw_fd(), backend.as_raw_fd()),
            Dir::Down => (backend.as_raw_fd(), conn.client.as_raw_fd()),
        };
        match c.buffer() {
            Some(bid) if res > 0 => {
                let n = res as u32;
                conn.last_active_ms = now;
                if let Some(pg) = conn.pg.as_mut() {
                    pg.forwarded(d, self.io.buffer_data(bid, 0, n));
                }
                conn.flows[di].on_ring_read(n, n >= size);
                conn.ring_bufs[di] = Some(RingBuf {
                    bid,
                    off: 0,
                    len: n,
                });
                conn.inflight += 1;
                let tok = Token::new(send_op(d), idx, generation);
                self.io.send_buffer(dst, bid, 0, n, tok);
            }
            Some(bid) => {
                // A buffer with no bytes: give it back and read the result as usual.
                self.io.recycle_buffer(bid);
                let step = conn.flows[di].on_spliced_in(res.min(0));
                self.apply(idx, d, step);
            }
            None if res == -libc::ENOBUFS || res == -libc::EAGAIN || res == -libc::EINTR => {
                // No buffer free (many flows have one in flight): wait by poll and read by
                // syscall this once; the next wait tries the ring again.
                conn.inflight += 1;
                let op = if d == Dir::Up {
                    Op::PollIn0
                } else {
                    Op::PollIn1
                };
                self.io
                    .poll(src, libc::POLLIN as u32, Token::new(op, idx, generation));
            }
            None => {
                let step = conn.flows[di].on_spliced_in(res);
                self.apply(idx, d, step);
            }
        }
    }

    /// A send from the ring buffer flow `d` of connection `idx` holds completed.
    pub(super) fn on_ring_send(&mut self, idx: u32, d: Dir, c: Completion) {
        let generation = self.slots[idx as usize].generation;
        let (now, wid) = (self.now_ms, self.id);
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        let di = d.index();
        let (Some(backend), Some(mut rb)) = (conn.backend.as_ref(), conn.ring_bufs[di]) else {
            return;
        };
        let dst = match d {
            Dir::Up => backend.as_raw_fd(),
            Dir::Down => conn.client.as_raw_fd(),
        };
        let res = c.result;
        if res > 0 {
            let n = (res as u32).min(rb.len);
            conn.last_active_ms = now;
            count_bytes(&conn.member, wid, d, n as i32);
            let next = conn.flows[di].on_ring_sent(n);
            if n < rb.len {
                // A short send: the rest goes out from the same buffer.
                rb.off += n;
                rb.len -= n;
                conn.ring_bufs[di] = Some(rb);
                conn.inflight += 1;
                let tok = Token::new(send_op(d), idx, generation);
                self.io.send_buffer(dst, rb.bid, rb.off, rb.len, tok);
                return;
            }
            conn.ring_bufs[di] = None;
            self.io.recycle_buffer(rb.bid);
            if let Some(step) = next {
                self.apply(idx, d, step);
            }
            return;
        }
        if res == -libc::EAGAIN || res == -libc::EINTR {
            // The socket refused it for now: park the rest in a pipe and wait for room, as a
            // copy whose send came back short does.
            let parked = match self.pool.take(&mut conn.pipes[di]) {
                Ok(pipe) => {
                    let rest = self.io.buffer_data(rb.bid, rb.off, rb.len);
                    sys::write_nb(pipe.write.as_raw_fd(), rest) == rest.len() as i32
                }
                Err(_) => false,
            };
            conn.ring_bufs[di] = None;
            self.io.recycle_buffer(rb.bid);
            let step = conn.flows[di].yield_to_ring(Step::SpliceOut(rb.len));
            if parked {
                self.apply(idx, d, step);
            } else {
                self.close_conn(idx, CloseReason::Resource);
            }
            return;
        }
        // Failed (reset, EPIPE) or 0: the buffer is recycled when the connection is freed.
        let step = Step::DestFailed(if res < 0 { res } else { -libc::EPIPE });
        self.apply(idx, d, step);
    }

    /// A completion of the multishot POLLOUT flow `d` waits on (`Step::PollOutWakeups`): room
    /// (or an error) ends the wait and cancels the poll; the half-close alone does not.
    pub(super) fn on_out_wakeup(&mut self, idx: u32, d: Dir, c: Completion) {
        let generation = self.slots[idx as usize].generation;
        let Some(conn) = self.slots[idx as usize].conn.as_mut() else {
            return;
        };
        let di = d.index();
        let Some(backend) = conn.backend.as_ref() else {
            return;
        };
        let dst = match d {
            Dir::Up => backend.as_raw_fd(),
            Dir::Down => conn.client.as_raw_fd(),
        };
        let op = if d == Dir::Up {
            Op::PollOutWait0
        } else {
            Op::PollOutWait1
        };
        let tok = Token::new(op, idx, generation);
        let (res, more) = (c.result, c.more());
        if !more {
            conn.out_multi[di] = false;
        }
        if !conn.out_wait[di] {
            return; // a completion after the wait ended (its cancel in flight)
        }
        if res == -libc::ECANCELED || (res >= 0 && res & super::conn::ROOM == 0) {
            // Our own cancel raced a new wait, or a wake-up without room: keep waiting.
            if !more {
                conn.out_multi[di] = true;
                conn.inflight += 1;
                self.io.poll_multi(dst, libc::POLLOUT as u32, tok);
            }
            return;
        }
        conn.out_wait[di] = false;
        if more {
            self.io.cancel_poll(dst, tok);
        }
        let step = conn.flows[di].on_writable(res);
        self.apply(idx, d, step);
    }
}
