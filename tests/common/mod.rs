//! The integration-test harness: runs the real `ringlb` binary ([`lb`]), builds its configs
//! ([`config`]), provides loopback backends ([`servers`]) and deterministic payloads with
//! checksummed send/receive/echo helpers ([`payload`]).
//!
//! Everything binds `127.0.0.1:0`, every socket has read/write timeouts, and helper threads are
//! joined with their panics propagated.
// Each test binary uses only part of the harness.
#![allow(dead_code, unused_imports)]

pub mod admin;
pub mod attack;
pub mod config;
pub mod dns;
pub mod http;
pub mod lb;
pub mod ops;
pub mod payload;
pub mod procs;
pub mod servers;
pub mod stall;
pub mod tls;
pub mod udp;

pub use config::{listener, ringlb_config, LbConfig, Listener, WORKERS};
pub use lb::{raise_fd_limit, ringlb_bin, run_ringlb, Lb, TempFile};
pub use payload::*;
pub use servers::{
    dead_addr, wait_until, BlackHole, EchoServer, NamedServer, ResetAfter, SenderThenClose, Server,
};
