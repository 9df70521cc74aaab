//! The one error type of config loading, shared by `ringlb check` and `ringlb run`.
//!
//! Owns the wording of config errors: every message is complete on its own (no `source()` chain
//! to walk, so printing the chain prints each message once), names the file when there is one,
//! and for validation errors names the listener, the field and the offending value.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not UTF-8, ...).
    #[error("cannot read config file {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// TOML syntax error, wrong type or unknown field; `message` is toml's own, with line and
    /// column and the offending line.
    #[error("{}{message}", PathPrefix(.path))]
    Toml {
        path: Option<PathBuf>,
        message: String,
    },
    /// A value that parsed as TOML but is not acceptable.
    /// Displays as `[path: ]scope: field "field": problem`, where `scope` is `listener "web"`,
    /// `listeners[2]` (name missing, invalid or duplicated), `runtime`, `admin` or `config`, and
    /// `problem` starts with the offending value and says what is expected.
    #[error("{}{scope}: field \"{field}\": {problem}", PathPrefix(.path))]
    Invalid {
        path: Option<PathBuf>,
        scope: String,
        field: String,
        problem: String,
    },
}

impl ConfigError {
    /// Attaches the file the config came from (used by `Config::load`).
    pub(crate) fn with_path(mut self, file: &Path) -> ConfigError {
        match &mut self {
            ConfigError::Read { .. } => {}
            ConfigError::Toml { path, .. } | ConfigError::Invalid { path, .. } => {
                *path = Some(file.to_path_buf());
            }
        }
        self
    }
}

/// `"path: "` when a path is known, nothing otherwise.
struct PathPrefix<'a>(&'a Option<PathBuf>);

impl fmt::Display for PathPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(path) => write!(f, "{}: ", path.display()),
            None => Ok(()),
        }
    }
}
