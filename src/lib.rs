//! ringlb: an L4 TCP/UDP load balancer for Linux on io_uring.
//!
//! ```text
//!             control thread (config, health, reload, admin)
//!                  │ publishes Arc<Snapshot> per listener (one pointer, swapped atomically)
//!                  ▼
//! listener ─► worker (own io_uring, own SO_REUSEPORT socket) ─► Snapshot::pick ─► connect ─► splice ⇄ ─► close
//!                                                    per-backend counters (atomics, outside snapshots)
//! ```
//!
//! A connection never leaves the worker that accepted it. Workers never call into the control
//! plane; they read the latest snapshot and update per-backend atomics. The control plane never
//! touches rings.
//!
//! Modules:
//! - [`config`]: TOML → raw serde mirror → validated [`config::Config`].
//! - [`balance`]: pure balancing policies (smooth WRR, least connections, random, P2C, Maglev).
//! - [`backend`]: backend identity and the per-backend counters kept outside snapshots.
//! - [`snapshot`]: the immutable per-listener pool snapshot and its publisher/reader.
//! - [`control`]: owns the config, builds and publishes snapshots.
//! - [`tls`]: pure ClientHello reader (SNI, ALPN, ECH) and route table for TLS passthrough.
//! - [`runtime`]: starts control and workers, handles signals and shutdown fan-out.
//! - [`logging`]: the logger (text or JSON lines, the access log's writer thread).
//! - [`notify`]: systemd's sd_notify protocol (ready, reloading, stopping, watchdog).
//! - [`upgrade`]: hitless binary upgrade (sockets and counts handed to the new process).
//! - [`worker`]: the per-core loop and the pure connection state machine.
//! - [`io`]: the I/O drivers behind one interface (io_uring, epoll), chosen once at start.
//! - [`io`] and [`sys`]: the only places with `unsafe`.
#![deny(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod balance;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod health;
#[allow(unsafe_code)]
pub mod io;
pub mod logging;
pub mod notify;
pub mod proxy_protocol;
pub mod runtime;
pub mod snapshot;
#[allow(unsafe_code)]
pub mod sys;
pub mod tls;
pub mod upgrade;

pub mod worker;

/// The git commit this binary was built from (`RINGLB_COMMIT` at build time, or "unknown").
pub const BUILD_COMMIT: &str = env!("RINGLB_COMMIT");
/// The build date (UTC, `YYYY-MM-DD`; `SOURCE_DATE_EPOCH` is honoured).
pub const BUILD_DATE: &str = env!("RINGLB_BUILD_DATE");
/// The target triple the binary was built for.
pub const BUILD_TARGET: &str = env!("RINGLB_TARGET");
