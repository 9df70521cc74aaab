//! Batched UDP I/O (`recvmmsg`/`sendmmsg`) for the UDP benchmark tools in `examples/`: one
//! system call moves up to a batch of datagrams, so neither the echo backend nor the load
//! generator costs a system call per 64-byte datagram. Included with `#[path]`.

// Each example uses a different subset.
#![allow(dead_code)]

use std::io;
use std::os::fd::RawFd;

/// Largest datagram a slot holds; longer ones are truncated (the tools send 64 bytes).
pub const SLOT: usize = 2048;

/// `n` datagram slots with their buffers, iovecs, peer addresses and message headers.
///
/// The headers point into the other vectors' heap storage, which is allocated once in `new` and
/// never grown, so the pointers stay valid wherever the `Batch` itself moves.
pub struct Batch {
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
    hdrs: Vec<libc::mmsghdr>,
    /// Datagram length per slot: filled by `recv`, or set with `set_len` before `send`.
    lens: Vec<usize>,
    with_names: bool,
}

impl Batch {
    /// `with_names`: record each datagram's source on `recv` and send each slot back to it
    /// (unconnected sockets); without, the socket must be connected.
    pub fn new(n: usize, with_names: bool) -> Self {
        let n = n.max(1);
        let mut bufs = vec![0u8; n * SLOT];
        let mut iovs: Vec<libc::iovec> = (0..n)
            .map(|i| libc::iovec {
                iov_base: bufs[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            })
            .collect();
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
        let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; n];
        let hdrs = (0..n)
            .map(|i| {
                // SAFETY: mmsghdr is plain old data; all-zero is a valid empty header that the
                // fields below complete.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = &mut iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                if with_names {
                    h.msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
                    h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
                }
                h
            })
            .collect();
        Self {
            bufs,
            iovs,
            names,
            hdrs,
            lens: vec![0; n],
            with_names,
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    pub fn buf(&self, i: usize) -> &[u8] {
        &self.bufs[i * SLOT..i * SLOT + self.lens[i]]
    }

    /// The whole slot, for filling before `set_len` and `send`.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * SLOT..(i + 1) * SLOT]
    }

    pub fn set_len(&mut self, i: usize, len: usize) {
        self.lens[i] = len.min(SLOT);
    }

    /// Receives up to `capacity()` datagrams; returns how many (lengths via `buf`).
    /// `flags`: `MSG_DONTWAIT` for non-blocking, `MSG_WAITFORONE` to block for the first only.
    pub fn recv(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        for (i, h) in self.hdrs.iter_mut().enumerate() {
            self.iovs[i].iov_len = SLOT;
            if self.with_names {
                h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            }
            h.msg_len = 0;
        }
        let n = self.hdrs.len().min(u32::MAX as usize) as libc::c_uint;
        // SAFETY: every header points at an iovec describing SLOT bytes of `bufs` and (with
        // names) at a sockaddr_storage of the stated length, all owned by `self` and alive for
        // the call; the kernel writes at most `n` headers and within those bounds.
        let rc =
            unsafe { libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), n, flags, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let got = rc as usize;
        for i in 0..got {
            self.lens[i] = (self.hdrs[i].msg_len as usize).min(SLOT);
        }
        Ok(got)
    }

    /// Sends slots `start..start + count` (each `lens[i]` bytes, to the address it was received
    /// from when the batch has names); returns how many were sent (possibly fewer).
    pub fn send(
        &mut self,
        fd: RawFd,
        start: usize,
        count: usize,
        flags: libc::c_int,
    ) -> io::Result<usize> {
        let end = (start + count).min(self.hdrs.len());
        if start >= end {
            return Ok(0);
        }
        for i in start..end {
            self.iovs[i].iov_len = self.lens[i];
        }
        // SAFETY: headers start..end point at iovecs of `lens[i]` <= SLOT bytes inside `bufs`
        // and (with names) at the address and length `recv` stored; all owned by `self` and
        // alive for the call; the kernel only reads them (and writes msg_len).
        let rc = unsafe {
            libc::sendmmsg(
                fd,
                self.hdrs[start..].as_mut_ptr(),
                (end - start) as libc::c_uint,
                flags,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}
