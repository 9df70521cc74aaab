//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux 5.19): `count` buffers of `size`
//! bytes the kernel picks from when a buffer-select receive has data, so a connection waiting
//! for its next message holds no buffer; the buffer is named in the completion (its id) and
//! belongs to the worker until it gives it back with [`BufRing::recycle`].
//!
//! Ownership: the ring of entries (mmap'd, page-aligned, shared with the kernel) and the buffers
//! (one boxed slice that never moves) live as long as the `BufRing`. A buffer is the kernel's
//! from when it is published until a completion names it, then the worker's (a send reading it
//! is the worker's use) until recycled. Dropping a `BufRing` leaks both regions: the io_uring is
//! closed asynchronously and a receive still in flight may write a published buffer after it.
//! Must not: allocate or make a syscall per buffer (publishing is a store to shared memory).

use io_uring::types::BufRingEntry;
use io_uring::Submitter;
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

pub struct BufRing {
    entries: *mut BufRingEntry,
    mask: u16,
    /// Our tail: the next entry to publish.
    tail: u16,
    bufs: Box<[u8]>,
    size: u32,
    bgid: u16,
}

impl BufRing {
    /// Registers a ring of `count` (a power of two, ≤ 32768) buffers of `size` bytes as buffer
    /// group `bgid` of the ring `submitter` belongs to, every buffer published.
    pub fn new(submitter: &Submitter<'_>, count: u16, size: u32, bgid: u16) -> io::Result<BufRing> {
        assert!(count.is_power_of_two() && count <= 32768);
        let ring_bytes = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping of `ring_bytes` bytes: no file, no fixed address;
        // the result is checked before use and owned by this BufRing (never unmapped, see the
        // module docs).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `addr` is a page-aligned mapping of `count` entries that outlives the
        // registration (it is never unmapped); the kernel reads entries and we write them only
        // through `publish`.
        let reg = unsafe { submitter.register_buf_ring_with_flags(addr as u64, count, bgid, 0) };
        if let Err(e) = reg {
            // SAFETY: the mapping was never registered, so nothing else refers to it.
            unsafe { libc::munmap(addr, ring_bytes) };
            return Err(e);
        }
        let mut ring = BufRing {
            entries: addr.cast::<BufRingEntry>(),
            mask: count - 1,
            tail: 0,
            bufs: vec![0u8; usize::from(count) * size as usize].into_boxed_slice(),
            size,
            bgid,
        };
        for bid in 0..count {
            ring.push(bid);
        }
        ring.publish();
        Ok(ring)
    }

    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// The bytes `[off, off + len)` of buffer `bid` (a buffer a completion handed over).
    pub fn data(&self, bid: u16, off: u32, len: u32) -> &[u8] {
        let start = usize::from(bid) * self.size as usize + off as usize;
        let end = (start + len as usize).min(usize::from(bid + 1) * self.size as usize);
        &self.bufs[start.min(end)..end]
    }

    /// Where the bytes from `off` of buffer `bid` start, for a send SQE.
    pub fn ptr(&self, bid: u16, off: u32) -> *const u8 {
        self.data(bid, off, 0).as_ptr()
    }

    /// Gives buffer `bid` back to the kernel.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    fn push(&mut self, bid: u16) {
        let i = usize::from(self.tail & self.mask);
        let addr = self.ptr(bid, 0) as u64;
        // SAFETY: `i` is below `count` (masked), so the entry lies in our mapping; the kernel
        // reads an entry only between the published tail and its head, and this one is past the
        // published tail until `publish`.
        let e = unsafe { &mut *self.entries.add(i) };
        e.set_addr(addr);
        e.set_len(self.size);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the pushed entries visible to the kernel (a release store of the shared tail).
    fn publish(&self) {
        // SAFETY: the shared tail is the u16 the kernel reads at the start of the mapping
        // (`BufRingEntry::tail`); it is naturally aligned, and only this thread writes it.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries).cast::<AtomicU16>()) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // See the module docs: the kernel may still write a published buffer.
        std::mem::forget(std::mem::take(&mut self.bufs));
    }
}
