//! Command-line interface (clap derive): `run`, `check`, `demo`.
//! Must not: do anything but describe and parse arguments.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// ringlb: an L4 TCP load balancer for Linux on io_uring (splice, thread per core).
///
/// Logging goes to stderr; set RUST_LOG (error, warn, info, debug, trace) to choose how much
/// (default: info).
#[derive(Debug, Parser)]
#[command(name = "ringlb", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the load balancer in the foreground until SIGTERM or SIGINT (which drain: listeners
    /// close at once, open connections get up to runtime.drain_timeout to finish).
    Run {
        /// Path to the TOML configuration (see config/ringlb.toml for every field).
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a configuration and print a summary; exits 0 if valid, 2 if not.
    Check {
        /// Path to the TOML configuration.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Start three demo backends on 127.0.0.1:9001-9003 that answer with their name, and
    /// ringlb on 127.0.0.1:8080 in front of them (config/demo.toml). Try: curl 127.0.0.1:8080
    Demo {
        /// Configuration to run; its backends' addresses are served by the demo backends.
        #[arg(short, long, value_name = "FILE", default_value = "config/demo.toml")]
        config: PathBuf,
    },
}
