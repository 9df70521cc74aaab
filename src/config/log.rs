//! The `[log]` section: the log format (`"text"` or `"json"`) and where the access log goes
//! (`"stderr"`, `"stdout"` or an absolute file path).
//!
//! Owns these two fields' defaults and messages. Like the rest of `config` it must not touch the
//! file system: whether the access log file can be opened is found out when `run` opens it.

use std::path::PathBuf;

use super::raw::RawLog;
use super::{invalid, ConfigError};

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `[2026-12-01T10:00:00.123Z INFO  ringlb::runtime] message key=value`.
    Text,
    /// One JSON object per line: `ts`, `level`, `target`, `msg`, then the record's fields.
    Json,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Where access log lines (one per closed connection, `listeners[].access_log = true`) go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Stderr,
    Stdout,
    /// Appended to; reopened on SIGUSR1 (after logrotate moved it).
    File(PathBuf),
}

impl std::fmt::Display for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessLog::Stderr => f.write_str("stderr"),
            AccessLog::Stdout => f.write_str("stdout"),
            AccessLog::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// `[log]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Default [`LogFormat::Text`].
    pub format: LogFormat,
    /// Default [`AccessLog::Stderr`].
    pub access_log: AccessLog,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            access_log: AccessLog::Stderr,
        }
    }
}

pub(super) fn validate_log(raw: RawLog) -> Result<LogConfig, ConfigError> {
    let format = match raw.format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(s) => {
            return Err(invalid(
                "log",
                "format",
                format!("{s:?} is not a log format (expected \"text\" or \"json\")"),
            ))
        }
    };
    let access_log = match raw.access_log.as_deref() {
        None | Some("stderr") => AccessLog::Stderr,
        Some("stdout") => AccessLog::Stdout,
        Some(s) if s.starts_with('/') && !s.ends_with('/') => AccessLog::File(PathBuf::from(s)),
        Some(s) => {
            return Err(invalid(
                "log",
                "access_log",
                format!(
                    "{s:?} is not a destination (expected \"stderr\", \"stdout\" or an absolute \
                     file path such as \"/var/log/ringlb/access.log\")"
                ),
            ))
        }
    };
    Ok(LogConfig { format, access_log })
}
