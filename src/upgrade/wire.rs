//! The handover channel's wire format: a `SOCK_SEQPACKET` unix socket pair (message boundaries
//! kept, each message's descriptors travel with it by `SCM_RIGHTS`). Every message is one JSON
//! object; the descriptors a message carries are named, in order, by its entries.
//!
//! Owns encoding and decoding only; must not decide anything about the upgrade itself.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Descriptors per message (the kernel's `SCM_MAX_FD` is 253).
pub const FDS_PER_MESSAGE: usize = 200;
/// Largest message either side sends (a chunk of 200 socket entries is well under it).
pub const MAX_MESSAGE: usize = 256 * 1024;

/// What a handed-over descriptor is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Kind {
    /// A TCP listening socket of listener `listener`, worker `worker`.
    Tcp,
    /// A UDP listening socket.
    Udp,
    /// The admin endpoint's listening socket (TCP or unix).
    Admin,
}

/// One descriptor as the old process describes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub kind: Kind,
    /// Listener name (empty for the admin socket).
    pub listener: String,
    pub worker: usize,
}

/// One UDP flow as the old process describes it (its socket travels as a descriptor).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowEntry {
    pub worker: usize,
    pub listener: String,
    pub client: SocketAddr,
    pub local: Option<std::net::IpAddr>,
    pub backend: SocketAddr,
}

/// One message on the channel.
#[derive(Debug, Serialize, Deserialize)]
pub enum Message {
    /// Old → new: sockets; the message's descriptors, in the entries' order.
    Sockets { entries: Vec<Entry> },
    /// Old → new: every socket has been sent.
    SocketsDone,
    /// New → old: the new process serves (config loaded, sockets taken, workers started).
    Ready { pid: u32 },
    /// New → old: the new process cannot serve, and why (it exits after sending this).
    Failed { reason: String },
    /// Old → new: UDP flows (worker, listener, client, the address the client sent to,
    /// backend); the message's descriptors are their connected upstream sockets, in order.
    Flows { flows: Vec<FlowEntry> },
    /// Old → new: every flow has been sent (the new process starts receiving on UDP).
    FlowsDone,
    /// Old → new: the old process's open connections per (listener, backend), sent while it
    /// drains; the last one before it exits is all zeroes.
    Counts {
        counts: Vec<(String, SocketAddr, u64)>,
    },
}

/// Sends `msg` with `fds` attached.
pub fn send(channel: &OwnedFd, msg: &Message, fds: &[RawFd]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let iov = [IoSlice::new(&body)];
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    sendmsg::<()>(channel.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives one message and the descriptors it carries. `Ok(None)` at end of stream (the peer
/// closed or exited).
pub fn recv(channel: &OwnedFd) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
        let r = loop {
            match recvmsg::<()>(channel.as_raw_fd(), &mut iov, Some(&mut space), flags) {
                Ok(r) => break r,
                // The peer closed with messages of ours unread. The kernel reports that ahead
                // of what the peer sent before closing (a Failed reason, say) and clears it:
                // look once more, without waiting, before calling it the end of the stream.
                Err(nix::errno::Errno::ECONNRESET) if !flags.contains(MsgFlags::MSG_DONTWAIT) => {
                    flags |= MsgFlags::MSG_DONTWAIT;
                }
                Err(nix::errno::Errno::ECONNRESET | nix::errno::Errno::EAGAIN)
                    if flags.contains(MsgFlags::MSG_DONTWAIT) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut fds = Vec::new();
        for c in r.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                fds.extend(raw.into_iter().map(crate::sys::own_received_fd));
            }
        }
        let truncated = r
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (r.bytes, fds, truncated)
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handover message truncated",
        ));
    }
    let msg = serde_json::from_slice(&buf[..len]).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidData, format!("handover message: {e}"))
    })?;
    Ok(Some((msg, fds)))
}

/// A connected socket pair for the handover (both ends close-on-exec).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_and_descriptors_cross_the_pair() {
        let (a, b) = pair().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let entries = vec![Entry {
            kind: Kind::Tcp,
            listener: "web".into(),
            worker: 0,
        }];
        send(&a, &Message::Sockets { entries }, &[l.as_raw_fd()]).unwrap();
        let (msg, fds) = recv(&b).unwrap().unwrap();
        assert!(matches!(msg, Message::Sockets { ref entries } if entries[0].listener == "web"));
        assert_eq!(fds.len(), 1);
        assert_eq!(crate::sys::local_addr(fds[0].as_fd()), Some(addr));
        send(&b, &Message::Ready { pid: 7 }, &[]).unwrap();
        assert!(matches!(
            recv(&a).unwrap(),
            Some((Message::Ready { pid: 7 }, _))
        ));
        drop(b);
        assert!(
            recv(&a).unwrap().is_none(),
            "end of stream once the peer closed"
        );
    }

    #[test]
    fn a_reason_sent_before_closing_with_our_messages_unread_still_arrives() {
        // The new process fails on its config before it reads the sockets, says why, exits:
        // the kernel reports ECONNRESET ahead of the queued reason; the reason must not be lost.
        let (old, new) = pair().unwrap();
        send(&old, &Message::FlowsDone, &[]).unwrap();
        let reason = "configuration: bad".to_string();
        send(&new, &Message::Failed { reason }, &[]).unwrap();
        drop(new);
        match recv(&old).unwrap() {
            Some((Message::Failed { reason }, _)) => assert_eq!(reason, "configuration: bad"),
            other => panic!("expected the reason, got {:?}", other.map(|(m, _)| m)),
        }
        assert!(recv(&old).unwrap().is_none(), "then the end of stream");
    }
}
