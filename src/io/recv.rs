//! UDP receive slots shared by both drivers: a set per UDP listener, each slot one `recvmsg`'s
//! header, address, control buffer and datagram buffer in one boxed struct (the pointers inside
//! the header point into the same box, so nothing moves while an operation uses it). A slot is
//! busy from [`RecvSets::prepare`] until [`RecvSets::done`]; its bytes stay readable through
//! [`RecvSets::data`] until it is prepared again, which is what lets a UDP send read straight
//! from the buffer a datagram arrived in.
//! Must not: do I/O (the drivers do) or allocate after a set is created.

use super::{Op, Token};
use std::net::{IpAddr, SocketAddr};

/// Buffers for one `recvmsg`.
pub(super) struct RecvMem {
    hdr: libc::msghdr,
    iov: libc::iovec,
    name: libc::sockaddr_storage,
    /// Control messages (the PKTINFO destination address).
    control: [u64; 8],
    buf: Box<[u8]>,
    /// A recvmsg naming this memory is in flight (or, for epoll, waiting for readiness).
    pub busy: bool,
}

/// Identifies a set of receive buffers created by [`RecvSets::create`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecvSetId(pub(super) usize);

/// Every receive set of one driver.
#[derive(Default)]
pub(super) struct RecvSets {
    /// Boxed per slot for stable addresses.
    #[allow(clippy::vec_box)]
    sets: Vec<Vec<Box<RecvMem>>>,
}

impl RecvSets {
    pub fn create(&mut self, count: usize, size: usize) -> RecvSetId {
        let set = (0..count)
            .map(|_| {
                // SAFETY: msghdr, iovec and sockaddr_storage are plain C structs for which all-zero
                // bytes are a valid (empty) value; the pointers are filled in by `prepare`.
                let (hdr, iov, name) =
                    unsafe { (std::mem::zeroed(), std::mem::zeroed(), std::mem::zeroed()) };
                Box::new(RecvMem {
                    hdr,
                    iov,
                    name,
                    control: [0; 8],
                    buf: vec![0u8; size].into_boxed_slice(),
                    busy: false,
                })
            })
            .collect();
        self.sets.push(set);
        RecvSetId(self.sets.len() - 1)
    }

    /// Marks slot `k` of `set` busy and returns its header, ready for one `recvmsg`; None if the
    /// slot is busy already.
    pub fn prepare(&mut self, set: RecvSetId, k: usize) -> Option<*mut libc::msghdr> {
        let m = &mut self.sets[set.0][k];
        if m.busy {
            return None;
        }
        m.busy = true;
        m.iov.iov_base = m.buf.as_mut_ptr().cast();
        m.iov.iov_len = m.buf.len();
        m.hdr.msg_name = (&mut m.name as *mut libc::sockaddr_storage).cast();
        m.hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        m.hdr.msg_iov = &mut m.iov;
        m.hdr.msg_iovlen = 1;
        m.hdr.msg_control = m.control.as_mut_ptr().cast();
        m.hdr.msg_controllen = std::mem::size_of_val(&m.control) as _;
        m.hdr.msg_flags = 0;
        Some(&mut m.hdr)
    }

    /// The bytes slot `k` last received, for a send: (pointer, length ≤ `len`). The pointer
    /// stays valid as long as the driver (the box never moves).
    pub fn send_buf(&self, set: RecvSetId, k: usize, len: usize) -> (*const u8, usize) {
        let m = &self.sets[set.0][k];
        (m.buf.as_ptr(), len.min(m.buf.len()))
    }

    /// The sender of the datagram slot `k` received and the local address it was sent to (with
    /// PKTINFO). Marks the slot free; its bytes stay readable through [`RecvSets::data`].
    pub fn done(&mut self, set: RecvSetId, k: usize) -> (Option<SocketAddr>, Option<IpAddr>) {
        let m = &mut self.sets[set.0][k];
        m.busy = false;
        let local = crate::sys::pktinfo_dst(&m.control, m.hdr.msg_controllen);
        let namelen = m.hdr.msg_namelen;
        // SAFETY: `name` is a sockaddr_storage the kernel filled for this completed recvmsg (or
        // left zeroed), `namelen` ≤ its size; SockAddr copies it.
        let addr = unsafe {
            socket2::SockAddr::try_init(|storage, len| {
                std::ptr::copy_nonoverlapping(
                    (&m.name as *const libc::sockaddr_storage).cast::<u8>(),
                    storage.cast::<u8>(),
                    (namelen as usize).min(std::mem::size_of::<libc::sockaddr_storage>()),
                );
                *len = namelen;
                Ok(())
            })
        }
        .ok()
        .and_then(|((), a)| a.as_socket());
        (addr, local)
    }

    /// The first `len` bytes slot `k` of `set` received.
    pub fn data(&self, set: RecvSetId, k: usize, len: usize) -> &[u8] {
        let m = &self.sets[set.0][k];
        &m.buf[..len.min(m.buf.len())]
    }

    /// Whether any slot is busy (the io_uring driver leaks the memory on drop then).
    pub fn any_busy(&self) -> bool {
        self.sets.iter().flatten().any(|m| m.busy)
    }

    /// Forgets every set without freeing it (the kernel may still write into a busy one).
    pub fn leak(&mut self) {
        std::mem::forget(std::mem::take(&mut self.sets));
    }
}

/// The token of slot `k` of `set`'s recvmsg: the set and slot travel in the index, so a
/// completion always finds the buffer it filled.
pub fn recv_token(set: RecvSetId, k: usize) -> Token {
    Token::new(Op::UdpRecv, ((set.0 as u32) << 8) | k as u32, 0)
}

/// The (set, slot) a recvmsg token names.
pub fn recv_slot_of(token: Token) -> (RecvSetId, usize) {
    (
        RecvSetId((token.index() >> 8) as usize),
        (token.index() & 0xff) as usize,
    )
}
