//! The worker's pipe pool: a connection holds a pipe only while bytes wait in it (an idle
//! connection holds none), taken from the pool or created at the target size (1 MiB), and given
//! back when it empties.
//!
//! The kernel grants full-size pipes only within the user's pipe budget
//! (`fs.pipe-user-pages-soft`, 64 MiB by default, shared by every process of the user); past it
//! new pipes get 8 KiB and cannot grow. So the pool is capped by bytes (idle pipes count against
//! the budget too), a smaller pipe is never pooled, and the copy path asks [`PipePool::room`]
//! how much a pipe could park before it reads, so it never reads more than it can forward or
//! park (a read that spilled 16 KiB into an 8 KiB pipe used to cut the stream).
//! Must not: log more than once a minute per process, or keep more than `POOL_BYTES` idle.

use crate::backend::process_ms;
use crate::sys::{Pipe, PIPE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of idle pipes a worker keeps for reuse (8 pipes of 1 MiB); more are closed.
const POOL_BYTES: usize = 8 << 20;

pub(super) struct PipePool {
    idle: Vec<Pipe>,
    /// The size asked of the kernel (`RINGLB_PIPE_SIZE`, a debug knob, else 1 MiB).
    size: usize,
    max_idle: usize,
}

impl PipePool {
    pub fn new() -> PipePool {
        let size = std::env::var("RINGLB_PIPE_SIZE")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n >= 4096)
            .unwrap_or(PIPE_SIZE);
        PipePool::with_size(size)
    }

    fn with_size(size: usize) -> PipePool {
        PipePool {
            idle: Vec::new(),
            size,
            max_idle: (POOL_BYTES / size).max(1),
        }
    }

    /// The flow's pipe, taken from the pool (or created) if it holds none. Err: the pipe could
    /// not be created (out of descriptors).
    pub fn take<'a>(&mut self, slot: &'a mut Option<Pipe>) -> std::io::Result<&'a Pipe> {
        if slot.is_none() {
            let p = match self.idle.pop() {
                Some(p) => p,
                None => Pipe::new(self.size)?,
            };
            if (p.capacity as usize) < self.size {
                warn_small_pipe(p.capacity, self.size);
            }
            *slot = Some(p);
        }
        Ok(slot.as_ref().expect("just filled"))
    }

    /// How many bytes the flow could park if its destination took none: the capacity of its
    /// pipe (taking one if it holds none, so the answer is the pipe it would really get).
    pub fn room(&mut self, slot: &mut Option<Pipe>) -> std::io::Result<u32> {
        Ok(self.take(slot)?.capacity)
    }

    /// Returns an empty pipe to the pool; a smaller than asked pipe, or one beyond the pool's
    /// byte cap, is closed instead (giving its pages back to the user's pipe budget).
    pub fn release(&mut self, slot: &mut Option<Pipe>) {
        if let Some(p) = slot.take() {
            if p.capacity as usize >= self.size && self.idle.len() < self.max_idle {
                self.idle.push(p);
            }
        }
    }
}

/// Warns, at most once a minute per process, that the kernel refused full-size pipes.
fn warn_small_pipe(capacity: u32, wanted: usize) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = process_ms() + 1;
    let last = LAST.load(Ordering::Relaxed);
    if last != 0 && now < last + 60_000 {
        return;
    }
    if LAST
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        log::warn!(
            "pipes are {capacity} bytes instead of {wanted}: the kernel refused F_SETPIPE_SZ \
             (the user's pipe budget, fs.pipe-user-pages-soft, is spent, or fs.pipe-max-size is \
             lower); streams now move {capacity} bytes per splice, with more CPU per byte and \
             less throughput. Raise fs.pipe-user-pages-soft or run with CAP_SYS_RESOURCE"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_is_capped_by_bytes_and_keeps_no_small_pipe() {
        let mut pool = PipePool::with_size(1 << 20);
        assert_eq!(pool.max_idle, 8);
        let mut held: Vec<Option<Pipe>> = (0..12).map(|_| None).collect();
        for slot in held.iter_mut() {
            assert_eq!(pool.room(slot).expect("pipe"), 1 << 20, "root grows pipes");
        }
        held.iter_mut().for_each(|s| pool.release(s));
        assert_eq!(pool.idle.len(), 8, "12 released, 8 MiB kept");
        // A pipe smaller than asked (the budget was spent when it was made) is closed.
        let mut small = Some(Pipe::new(8192).expect("pipe"));
        let mut pool = PipePool::with_size(1 << 20);
        pool.release(&mut small);
        assert!(pool.idle.is_empty() && small.is_none());
    }
}
