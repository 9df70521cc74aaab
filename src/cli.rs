//! Command-line interface (clap derive): `run`, `check`, `demo`, and the hidden `man` and
//! `completions` that generate the man page and shell completions from this very definition
//! (the Debian package ships what they print). Also the `--version` text.
//! Must not: do anything but describe and parse arguments, and render that description.

use clap::{CommandFactory, Parser, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

/// ringlb: an L4 TCP/UDP load balancer for Linux on io_uring (splice, thread per core).
///
/// Logging goes to stderr; set RUST_LOG (error, warn, info, debug, trace) to choose how much
/// (default: info). The [log] section of the config chooses text or JSON and where the access
/// log goes. Signals: SIGHUP reloads the config, SIGTERM/SIGINT drain, SIGUSR1 reopens the access
/// log file, SIGUSR2 upgrades to the binary now at this one's path (sockets handed over).
#[derive(Debug, Parser)]
#[command(name = "ringlb", version, long_version = LONG_VERSION.as_str())]
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
    /// Write the man pages (ringlb.1 and one per subcommand) into DIR (for packagers).
    #[command(hide = true)]
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print a shell completion script to stdout (for packagers).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The I/O backends compiled into this binary (the one place that lists them).
pub const IO_BACKENDS: &[&str] = &["io_uring", "epoll"];

/// `ringlb --version`: version, commit, build date, target, I/O backends.
pub static LONG_VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{}\ncommit: {}\nbuilt: {}\ntarget: {}\nio: {}",
        env!("CARGO_PKG_VERSION"),
        crate::BUILD_COMMIT,
        crate::BUILD_DATE,
        crate::BUILD_TARGET,
        IO_BACKENDS.join(", ")
    )
});

/// Sections the generated man page adds after clap's (roff source).
const MAN_EXTRA: &str = r#".SH "EXIT STATUS"
0 success; 2 configuration error (the message names the listener, the field and the value);
1 runtime failure (bind error, io_uring unavailable with runtime.io = "io_uring", worker failure).
.SH SIGNALS
.TP
\fBSIGHUP\fR
Re-read the configuration file; a file that fails validation changes nothing.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Drain: listeners close at once, open connections get up to runtime.drain_timeout; a second
signal closes everything.
.TP
\fBSIGUSR1\fR
Reopen the access log file (log.access_log), for logrotate.
.TP
\fBSIGUSR2\fR
Binary upgrade: start the binary now at this one's path with the same arguments, hand it every
listening socket; once it is ready, drain and exit 0 (if it fails, keep serving and log why).
.SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
Log filter (error, warn, info, debug, trace, or per module, e.g. ringlb::health=debug);
default info.
.TP
\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR
Set by systemd for Type=notify services: ringlb reports READY, RELOADING, STOPPING and feeds
the watchdog.
.SH FILES
.TP
\fI/etc/ringlb/ringlb.toml\fR
The configuration the packaged systemd unit runs (ringlb.service).
.TP
\fI/usr/share/doc/ringlb/\fR
README and the example configurations.
"#;

/// Writes `ringlb.1` and `ringlb-<subcommand>.1` into `dir`; returns the files written.
pub fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let cmd = Cli::command();
    let mut written = Vec::new();
    let main = dir.join("ringlb.1");
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    out.extend_from_slice(MAN_EXTRA.as_bytes());
    std::fs::write(&main, out)?;
    written.push(main);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("ringlb-{}", sub.get_name());
        let page = sub.clone().name(name.clone());
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        std::fs::write(&path, out)?;
        written.push(path);
    }
    Ok(written)
}

/// Prints the completion script for `shell` to `out`.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "ringlb", out);
}
