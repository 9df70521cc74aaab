//! A worker's clock work: the periodic tick (heartbeat, commands, stop flag, accept re-arm,
//! listener-wide limit, queue and hold retries), the timeout scan (idle, PROXY header, queue,
//! drain of removed listeners and backends) and the stop fan-in (drain, hard stop).
//! Must not: block or allocate on the tick (the scan reuses its buffer).

use super::conn::CloseReason;
use super::pgdrain::PgTracker;
use super::{Stage, Worker, DRAIN, HARD_STOP, SCAN_MS, TICK};
use crate::backend::process_ms;
use crate::io::{Completion, Driver, Op, Token};
use log::debug;
use std::sync::atomic::Ordering;

impl Worker {
    pub(super) fn on_tick(&mut self, c: Completion) {
        // A tick that failed (a kernel refusing the multishot flag answers -EINVAL at once) must
        // not be re-armed the same way in a hot loop: the driver falls back to one-shot
        // timeouts, and a timer that keeps failing is re-armed no faster than every 10 ms.
        if c.result < 0 && c.result != -libc::ETIME && c.result != -libc::ECANCELED {
            self.tick_failures += 1;
            self.io.timer_failed();
            if self.tick_failures == 1 {
                log::warn!(
                    "worker {}: the tick timer failed ({}); using one-shot timeouts",
                    self.id,
                    std::io::Error::from_raw_os_error(-c.result)
                );
            } else {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        } else {
            self.tick_failures = 0;
        }
        if !c.more() {
            let tick = self.timespec_for(TICK);
            self.io.timer(tick, Token::new(Op::Tick, 0, 0));
        }
        self.shared.heartbeat.store(process_ms(), Ordering::Relaxed);
        self.take_commands();
        self.check_stop();
        for li in 0..self.listeners.len() {
            // max_connections is listener-wide: follow the shared count of open connections,
            // which other workers' closes lower.
            let l = &self.listeners[li];
            if l.udp.is_none() && l.removed_at_ms.is_none() {
                let open = l.stats.open_now();
                self.follow_limit(li, open);
            }
            let l = &self.listeners[li];
            if !l.accepting && !l.paused && self.now_ms >= l.rearm_at_ms {
                self.arm_accept(li);
            }
            // A recvmsg linked behind an upstream send is issued only when the send completes,
            // so it can escape the cancel of a stopping UDP listener: cancel until none is left.
            let l = &self.listeners[li];
            let stopping = self.draining || l.removed_at_ms.is_some();
            if stopping
                && l.cancels == 0
                && l.socket.is_some()
                && l.udp.as_ref().is_some_and(|u| u.inflight > 0)
            {
                self.cancel_listener_ops(li);
            }
            if !self.listeners[li].held.is_empty() {
                // Places may have freed on other workers since the last try.
                self.release_held(li);
            }
            if !self.listeners[li].queue.is_empty() {
                // Slots may have freed on other workers since the last try.
                self.retry_queue(li);
            }
        }
        if self.now_ms >= self.next_scan_ms {
            self.next_scan_ms = self.now_ms + SCAN_MS;
            self.scan_timeouts();
            self.watch_peers();
            self.expire_flows();
        }
    }

    /// Closes connections past a deadline: idle timeout, PROXY header or queue timeout, and the
    /// drain timeout of a removed listener or a removed backend.
    pub(super) fn scan_timeouts(&mut self) {
        let now_process = process_ms();
        // Per listener: (drain timeout in ms, removed at, close on backend down, drain_mode
        // postgres).
        let mut per_listener = std::mem::take(&mut self.scan_buf);
        per_listener.clear();
        per_listener.extend(self.listeners.iter_mut().map(|l| {
            let settings = &l.reader.load().settings;
            let drain = settings.drain_timeout.map(|d| d.as_millis() as u64);
            (
                drain,
                l.removed_at_ms,
                settings.close_on_backend_down,
                settings.drain_postgres,
            )
        }));
        for idx in 0..self.slots.len() as u32 {
            let Some(c) = &self.slots[idx as usize].conn else {
                continue;
            };
            if c.closing {
                continue;
            }
            let (drain, listener_removed, close_on_down, drain_postgres) =
                per_listener[c.listener as usize];
            let reason = match c.stage {
                Stage::Header if self.now_ms >= c.deadline_ms => Some(CloseReason::BadProxyHeader),
                Stage::Hello if self.now_ms >= c.deadline_ms => {
                    // Not a close: the cancelled poll's completion routes it as a timeout.
                    self.hello_deadline(idx);
                    None
                }
                Stage::Queued | Stage::Held if self.now_ms >= c.deadline_ms => {
                    Some(CloseReason::QueueTimeout)
                }
                Stage::Proxying => {
                    let idle = self.now_ms.saturating_sub(c.last_active_ms) >= c.idle_ms;
                    let listener_drained = matches!((drain, listener_removed), (Some(d), Some(t)) if self.now_ms >= t + d);
                    let backend_drained =
                        match (drain, c.member.as_ref().and_then(|m| m.removed_at())) {
                            (Some(d), Some(t)) => now_process >= t + d,
                            _ => false,
                        };
                    let backend_down =
                        close_on_down && c.member.as_ref().is_some_and(|m| !m.is_up());
                    // drain_mode = "postgres": a session of a backend that is drained, not
                    // ready or removed closes when idle with nothing in flight, or at the
                    // drain timeout if it never is (an encrypted one never is).
                    let pg_since = c
                        .member
                        .as_ref()
                        .filter(|_| drain_postgres && c.pg.is_some())
                        .and_then(|m| m.winding_down_since());
                    let pg_idle = pg_since.is_some()
                        && c.pg.as_ref().is_some_and(PgTracker::is_idle)
                        && c.flows.iter().all(|f| f.pending == 0)
                        && c.ring_bufs.iter().all(Option::is_none);
                    let pg_timed_out =
                        matches!((drain, pg_since), (Some(d), Some(t)) if now_process >= t + d);
                    if pg_idle {
                        Some(CloseReason::DrainIdle)
                    } else if idle {
                        Some(CloseReason::IdleTimeout)
                    } else if listener_drained || backend_drained || pg_timed_out {
                        Some(CloseReason::Draining)
                    } else if backend_down {
                        Some(CloseReason::BackendDown)
                    } else {
                        None
                    }
                }
                _ => None,
            };
            if let Some(r) = reason {
                self.close_conn(idx, r);
            }
        }
        self.scan_buf = per_listener;
    }

    pub(super) fn check_stop(&mut self) {
        let stop = self.shared.stop.load(Ordering::SeqCst);
        if stop >= DRAIN && !self.draining {
            self.draining = true;
            for li in 0..self.listeners.len() {
                self.close_listener(li);
            }
            debug!("worker {}: draining", self.id);
        }
        if stop >= HARD_STOP && self.hard_stop_at_ms.is_none() {
            self.hard_stop_at_ms = Some(self.now_ms);
            self.close_all_flows(None);
            for idx in 0..self.slots.len() as u32 {
                if self.slots[idx as usize].conn.is_some() {
                    self.close_conn(idx, CloseReason::Draining);
                }
            }
        }
    }
}
