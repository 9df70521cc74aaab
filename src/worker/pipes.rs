//! The worker's pipe pool: a connection holds a pipe only while bytes wait in it (an idle
//! connection holds none), taken from the pool or created at 1 MiB, and given back when it
//! empties. Must not: log more than once per process, or keep more than `PIPE_POOL_MAX` idle.

use crate::sys::{Pipe, PIPE_SIZE};
use std::sync::atomic::Ordering;

/// Idle pipes a worker keeps for reuse; more are closed.
const PIPE_POOL_MAX: usize = 64;

/// The flow's pipe, taken from the pool (or created) if it holds none. Err: the pipe could not
/// be created (out of descriptors, or of the per-user pipe budget).
pub(super) fn take_pipe<'a>(
    pool: &mut Vec<Pipe>,
    slot: &'a mut Option<Pipe>,
) -> std::io::Result<&'a Pipe> {
    if slot.is_none() {
        let p = match pool.pop() {
            Some(p) => p,
            None => Pipe::new(PIPE_SIZE)?,
        };
        if (p.capacity as usize) < PIPE_SIZE {
            warn_small_pipe(p.capacity);
        }
        *slot = Some(p);
    }
    Ok(slot.as_ref().expect("just filled"))
}

/// Warns once per process that the kernel refused 1 MiB pipes (per-user pipe budget:
/// fs.pipe-user-pages-soft, or fs.pipe-max-size): splicing still works, with more CPU per byte.
fn warn_small_pipe(capacity: u32) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "pipes are {capacity} bytes instead of {PIPE_SIZE}: the kernel refused F_SETPIPE_SZ \
             (raise fs.pipe-max-size / fs.pipe-user-pages-soft, or run with CAP_SYS_RESOURCE); \
             splicing continues with more CPU per byte"
        );
    }
}

/// Returns an empty pipe to the pool (or closes it when the pool is full).
pub(super) fn release_pipe(pool: &mut Vec<Pipe>, slot: &mut Option<Pipe>) {
    if let Some(p) = slot.take() {
        if pool.len() < PIPE_POOL_MAX {
            pool.push(p);
        }
    }
}
