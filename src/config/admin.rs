//! The `[admin]` section: where the admin endpoint listens (`bind`: an address, `unix:PATH` or
//! `none`) and the credential its mutations need (`token_file`, read here, at load time).
//!
//! Owns the validation of those fields and the token's shape. Reading the token file is the one
//! piece of I/O config loading does besides reading the config itself, so that `check`, `run`
//! and a reload all see a missing or empty token file as the config error it is.
//! Must not: bind, serve or compare credentials (that is `crate::admin`).

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use super::raw::RawAdmin;
use super::{invalid, parse_address, ConfigError};

/// Default `admin.bind`: loopback only, the admin endpoint is not for the outside world.
pub const DEFAULT_ADMIN_BIND: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9900));

/// Longest `unix:` path: `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_UNIX_PATH: usize = 107;

/// `[admin]`: the HTTP admin endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    /// Default [`DEFAULT_ADMIN_BIND`] (127.0.0.1:9900).
    pub bind: AdminBind,
    /// Where the token was read from (`token_file`), if set.
    pub token_file: Option<PathBuf>,
    /// The token every `POST` must present as `Authorization: Bearer <token>`; read from
    /// `token_file` when the config is loaded (at start and on each reload). `None`: mutations
    /// are accepted only on a trusted path (a loopback peer, or the unix socket).
    pub token: Option<AdminToken>,
}

/// Where the admin endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminBind {
    /// A TCP address (`"127.0.0.1:9900"`).
    Tcp(SocketAddr),
    /// A unix stream socket (`"unix:/run/ringlb/admin.sock"`), created with mode 0600.
    Unix(PathBuf),
    /// `"none"`: no admin endpoint at all.
    None,
}

impl fmt::Display for AdminBind {
    /// As written in the file: `127.0.0.1:9900`, `unix:/run/ringlb/admin.sock`, `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminBind::Tcp(a) => write!(f, "{a}"),
            AdminBind::Unix(p) => write!(f, "unix:{}", p.display()),
            AdminBind::None => write!(f, "none"),
        }
    }
}

/// The admin token. Its `Debug` never shows the secret (configs are logged and printed).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(Vec<u8>);

impl AdminToken {
    /// The token's bytes (visible ASCII, no whitespace).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdminToken(<{} bytes>)", self.0.len())
    }
}

pub(super) fn validate_admin(raw: RawAdmin) -> Result<Admin, ConfigError> {
    let bind = match raw.bind {
        None => AdminBind::Tcp(DEFAULT_ADMIN_BIND),
        Some(s) if s == "none" => AdminBind::None,
        Some(s) if s.starts_with("unix:") => AdminBind::Unix(parse_unix_path(&s)?),
        Some(s) => AdminBind::Tcp(parse_address("admin", "bind", &s).map_err(|_| {
            invalid(
                "admin",
                "bind",
                format!(
                    "{s:?} is not a socket address (expected IP:PORT, IPv6 as [::1]:PORT, \
                     \"unix:/path/to/socket\" or \"none\")"
                ),
            )
        })?),
    };
    let (token_file, token) = match raw.token_file {
        None => (None, None),
        Some(path) => {
            let token = read_token(&path)?;
            (Some(PathBuf::from(path)), Some(token))
        }
    };
    Ok(Admin {
        bind,
        token_file,
        token,
    })
}

fn parse_unix_path(s: &str) -> Result<PathBuf, ConfigError> {
    let path = &s["unix:".len()..];
    let problem = if path.is_empty() {
        Some("has no path (expected \"unix:/run/ringlb/admin.sock\")".to_string())
    } else if path.len() > MAX_UNIX_PATH {
        Some(format!(
            "has a path of {} bytes; a unix socket path holds at most {MAX_UNIX_PATH}",
            path.len()
        ))
    } else if path.ends_with('/') {
        Some("names a directory (expected the socket's file name)".to_string())
    } else if path.contains('\0') {
        Some("contains a NUL byte".to_string())
    } else {
        None
    };
    match problem {
        Some(p) => Err(invalid("admin", "bind", format!("{s:?} {p}"))),
        None => Ok(PathBuf::from(path)),
    }
}

/// Reads the token: the file's content without its trailing line ending.
fn read_token(path: &str) -> Result<AdminToken, ConfigError> {
    let err = |p: String| invalid("admin", "token_file", format!("{path:?} {p}"));
    if path.is_empty() {
        return Err(err(
            "is empty (expected the path of a file holding the token)".into(),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot be read: {e}")))?;
    let mut token = bytes.as_slice();
    while let [rest @ .., b'\n' | b'\r'] = token {
        token = rest;
    }
    if token.is_empty() {
        return Err(err("is empty: it must hold the admin token".into()));
    }
    // An Authorization header carries visible ASCII; anything else could never be presented.
    if let Some(bad) = token.iter().position(|b| !b.is_ascii_graphic()) {
        return Err(err(format!(
            "holds a character that cannot be sent in an Authorization header (byte {} of \
             the token; use visible ASCII without spaces, e.g. `openssl rand -hex 32`)",
            bad + 1
        )));
    }
    Ok(AdminToken(token.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::super::{Config, ConfigError};
    use super::*;

    fn with_admin(admin: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!(
            "[admin]\n{admin}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\
             backends = [ {{ address = \"127.0.0.1:9001\" }} ]\n"
        ))
    }

    fn err(admin: &str) -> String {
        with_admin(admin).expect_err(admin).to_string()
    }

    /// A token file of its own under the temp dir, removed on drop.
    struct TokenFile(PathBuf);

    impl TokenFile {
        fn new(name: &str, contents: &[u8]) -> TokenFile {
            let p = std::env::temp_dir().join(format!("ringlb-{name}-{}", std::process::id()));
            std::fs::write(&p, contents).unwrap();
            TokenFile(p)
        }
        fn line(&self) -> String {
            format!("token_file = \"{}\"", self.0.display())
        }
    }

    impl Drop for TokenFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn binds_parse() {
        let b = |line: &str| {
            with_admin(line)
                .unwrap_or_else(|e| panic!("{e}"))
                .admin
                .bind
        };
        assert_eq!(b("bind = \"none\""), AdminBind::None);
        assert_eq!(
            b("bind = \"unix:/run/ringlb/admin.sock\""),
            AdminBind::Unix("/run/ringlb/admin.sock".into())
        );
        assert_eq!(
            b("bind = \"[::1]:9901\""),
            AdminBind::Tcp("[::1]:9901".parse().unwrap())
        );
        assert_eq!(b(""), AdminBind::Tcp(DEFAULT_ADMIN_BIND));
        assert_eq!(
            AdminBind::Unix("/a.sock".into()).to_string(),
            "unix:/a.sock"
        );
        assert_eq!(AdminBind::None.to_string(), "none");
    }

    #[test]
    fn bad_binds_are_named() {
        for (line, want) in [
            (
                "bind = \"unix:\"",
                "admin: field \"bind\": \"unix:\" has no path",
            ),
            ("bind = \"unix:/run/ringlb/\"", "names a directory"),
            (
                "bind = \"localhost:9900\"",
                "\"unix:/path/to/socket\" or \"none\"",
            ),
            (
                "bind = \"None\"",
                "admin: field \"bind\": \"None\" is not a socket address",
            ),
        ] {
            let e = err(line);
            assert!(e.contains(want), "{line}: {e}");
        }
        let long = format!("bind = \"unix:/{}\"", "a".repeat(MAX_UNIX_PATH));
        assert!(err(&long).contains("at most 107"), "{}", err(&long));
    }

    #[test]
    fn the_token_is_read_without_its_line_ending() {
        let f = TokenFile::new("token-ok", b"s3cret-0123\r\n\n");
        let c = with_admin(&f.line()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.admin.token.as_ref().unwrap().as_bytes(), b"s3cret-0123");
        assert_eq!(c.admin.token_file.as_deref(), Some(f.0.as_path()));
        let shown = format!("{:?}", c.admin);
        assert!(!shown.contains("s3cret"), "Debug shows the token: {shown}");
        assert!(c.summary().contains("token_file"), "{}", c.summary());
    }

    #[test]
    fn missing_empty_or_unsendable_tokens_are_config_errors() {
        let missing = std::env::temp_dir().join("ringlb-no-such-token-file");
        let e = err(&format!("token_file = \"{}\"", missing.display()));
        assert!(
            e.starts_with(&format!(
                "admin: field \"token_file\": \"{}\" cannot be read: ",
                missing.display()
            )),
            "{e}"
        );
        let empty = TokenFile::new("token-empty", b"\n");
        let e = err(&empty.line());
        assert!(e.ends_with("is empty: it must hold the admin token"), "{e}");
        assert!(e.contains(&empty.0.display().to_string()), "{e}");
        let spaced = TokenFile::new("token-space", b"two words\n");
        let e = err(&spaced.line());
        assert!(
            e.contains("cannot be sent in an Authorization header (byte 4"),
            "{e}"
        );
        assert!(err("token_file = \"\"").contains("is empty (expected the path"));
    }
}
