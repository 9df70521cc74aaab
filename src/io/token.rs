//! `user_data` tokens: 32 bits of slab index, 24 bits of generation, 8 bits of operation kind.
//! A completion whose generation no longer matches its slot is stale and ignored by the worker.

/// What an in-flight operation is. Connection ops carry a direction where it matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Multishot accept; index = listener index.
    Accept = 1,
    /// The worker's periodic tick.
    Tick = 2,
    /// The worker's wake-up eventfd became readable.
    Wake = 3,
    /// Backend connect; index = connection slot.
    Connect = 4,
    /// The timeout linked to a connect.
    ConnectTimeout = 5,
    /// Poll for readable on the source of a direction (0 = client→backend, 1 = backend→client).
    PollIn0 = 6,
    PollIn1 = 7,
    /// A buffered receive on the source of the up / down flow (ring buffers).
    RecvBuf0 = 8,
    RecvBuf1 = 9,
    /// A send from a ring buffer to the destination of the up / down flow.
    SendBuf0 = 10,
    SendBuf1 = 11,
    /// Poll for writable on the destination of a direction.
    PollOut0 = 12,
    PollOut1 = 13,
    /// An ASYNC_CANCEL issued while closing a connection.
    Cancel = 14,
    /// Cancel of a listener's accept (index = listener index).
    AcceptCancel = 15,
    /// Poll for readable on a client that must send a PROXY header first.
    HeaderIn = 16,
    /// A UDP listener's recvmsg; index = listener index << 8 | buffer slot.
    UdpRecv = 17,
    /// Multishot poll on a UDP flow's upstream socket; index = flow slot.
    UdpPoll = 18,
    /// Cancel issued while closing a UDP flow.
    UdpCancel = 19,
    /// A datagram sent on a UDP flow's upstream socket; index = flow slot.
    UdpSend = 20,
    /// A half-close or close whose completion nothing waits for (its result is not needed:
    /// `shutdown(2)` and `close(2)` results were ignored before they went through the ring).
    Detached = 21,
    /// A multishot POLLOUT on the destination of the up / down flow, waiting for wake-ups
    /// (`Step::PollOutWakeups`).
    PollOutWait0 = 22,
    PollOutWait1 = 23,
    /// A multishot ring receive of replies on a UDP flow's upstream socket; index = flow slot.
    UdpReply = 24,
    /// Poll for readable on a client whose ClientHello is being read (TLS passthrough).
    HelloIn = 25,
    /// A ring half-close (the driver's own: its completion never reaches the worker); index =
    /// the descriptor number.
    Shutdown = 26,
    /// A backend socket the ring creates (`SOCKET`); index = connection slot, result = the new
    /// descriptor (owned by whoever handles the completion) or -errno.
    Socket = 27,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        use Op::*;
        Some(match v {
            1 => Accept,
            2 => Tick,
            3 => Wake,
            4 => Connect,
            5 => ConnectTimeout,
            6 => PollIn0,
            7 => PollIn1,
            8 => RecvBuf0,
            9 => RecvBuf1,
            10 => SendBuf0,
            11 => SendBuf1,
            12 => PollOut0,
            13 => PollOut1,
            14 => Cancel,
            15 => AcceptCancel,
            16 => HeaderIn,
            17 => UdpRecv,
            18 => UdpPoll,
            19 => UdpCancel,
            20 => UdpSend,
            21 => Detached,
            22 => PollOutWait0,
            23 => PollOutWait1,
            24 => UdpReply,
            25 => HelloIn,
            26 => Shutdown,
            27 => Socket,
            _ => return None,
        })
    }
}

/// A packed `user_data` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token(pub u64);

const GEN_MASK: u32 = (1 << 24) - 1;

impl Token {
    pub fn new(op: Op, index: u32, generation: u32) -> Token {
        Token((index as u64) << 32 | ((generation & GEN_MASK) as u64) << 8 | op as u64)
    }
    pub fn op(self) -> Option<Op> {
        Op::from_u8(self.0 as u8)
    }
    pub fn index(self) -> u32 {
        (self.0 >> 32) as u32
    }
    pub fn generation(self) -> u32 {
        ((self.0 >> 8) as u32) & GEN_MASK
    }
    /// Generations wrap at 24 bits; callers compare through this.
    pub fn gen_matches(self, generation: u32) -> bool {
        self.generation() == generation & GEN_MASK
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let t = Token::new(Op::PollOut1, 123_456, (1 << 24) + 7);
        assert_eq!(t.op(), Some(Op::PollOut1));
        assert_eq!(t.index(), 123_456);
        assert_eq!(t.generation(), 7);
        assert!(t.gen_matches((1 << 24) + 7));
        assert_eq!(Token(0).op(), None);
    }
}
