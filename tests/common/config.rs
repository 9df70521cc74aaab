//! Builds ringlb TOML configs for tests: `workers = 2`, listeners and admin on `127.0.0.1:0`,
//! and any field a test wants to set verbatim.

use std::fmt::Write as _;
use std::net::SocketAddr;

/// Workers every test LB runs with (the machines have 2 cores).
pub const WORKERS: usize = 2;

/// One `[[listeners]]` table.
#[derive(Clone)]
pub struct Listener {
    name: String,
    bind: String,
    balance: String,
    backends: Vec<(String, Option<u32>)>,
    /// Other `key = value` lines, value written verbatim (so `"3s"` needs its quotes).
    fields: Vec<(String, String)>,
}

/// A TCP listener named `name` on `127.0.0.1:0`, round robin, no backends yet.
pub fn listener(name: &str) -> Listener {
    Listener {
        name: name.to_string(),
        bind: "127.0.0.1:0".to_string(),
        balance: "round_robin".to_string(),
        backends: Vec::new(),
        fields: vec![("protocol".to_string(), "\"tcp\"".to_string())],
    }
}

impl Listener {
    pub fn balance(mut self, policy: &str) -> Self {
        self.balance = policy.to_string();
        self
    }

    /// Listens on `addr` (`IP:PORT`) instead of `127.0.0.1:0`.
    pub fn bind(mut self, addr: &str) -> Self {
        self.bind = addr.to_string();
        self
    }

    pub fn backend(mut self, addr: SocketAddr) -> Self {
        self.backends.push((addr.to_string(), None));
        self
    }

    pub fn weighted(mut self, addr: SocketAddr, weight: u32) -> Self {
        self.backends.push((addr.to_string(), Some(weight)));
        self
    }

    pub fn connect_timeout(self, d: &str) -> Self {
        self.set("connect_timeout", &format!("\"{d}\""))
    }

    pub fn idle_timeout(self, d: &str) -> Self {
        self.set("idle_timeout", &format!("\"{d}\""))
    }

    /// Sets `key = value`, `value` written verbatim; replaces an earlier value of `key`.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.fields.retain(|(k, _)| k != key);
        self.fields.push((key.to_string(), value.to_string()));
        self
    }

    fn write_toml(&self, out: &mut String) {
        let _ = writeln!(out, "[[listeners]]");
        let _ = writeln!(out, "name = \"{}\"", self.name);
        let _ = writeln!(out, "bind = \"{}\"", self.bind);
        let _ = writeln!(out, "balance = \"{}\"", self.balance);
        for (k, v) in &self.fields {
            let _ = writeln!(out, "{k} = {v}");
        }
        let backends: Vec<String> = self
            .backends
            .iter()
            .map(|(a, w)| match w {
                Some(w) => format!("{{ address = \"{a}\", weight = {w} }}"),
                None => format!("{{ address = \"{a}\" }}"),
            })
            .collect();
        let _ = writeln!(out, "backends = [ {} ]\n", backends.join(", "));
    }
}

/// A whole config: `[runtime]` plus listeners.
#[derive(Clone)]
pub struct LbConfig {
    workers: usize,
    drain_timeout: String,
    admin_bind: String,
    /// Other `[admin]` lines (`token_file = "..."`), verbatim.
    admin_lines: Vec<String>,
    /// Other `[runtime]` lines (`io = "epoll"`), verbatim.
    runtime_lines: Vec<String>,
    listeners: Vec<Listener>,
}

impl Default for LbConfig {
    fn default() -> Self {
        LbConfig {
            workers: WORKERS,
            drain_timeout: "10s".to_string(),
            // Never the default fixed port: tests run in parallel.
            admin_bind: "127.0.0.1:0".to_string(),
            admin_lines: Vec::new(),
            runtime_lines: Vec::new(),
            listeners: Vec::new(),
        }
    }
}

impl LbConfig {
    pub fn drain_timeout(mut self, d: &str) -> Self {
        self.drain_timeout = d.to_string();
        self
    }

    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    pub fn admin_bind(mut self, addr: &str) -> Self {
        self.admin_bind = addr.to_string();
        self
    }

    /// Adds `key = value` to `[admin]`, `value` written verbatim.
    pub fn admin_field(mut self, key: &str, value: &str) -> Self {
        self.admin_lines.push(format!("{key} = {value}"));
        self
    }

    /// Adds `key = value` to `[runtime]`, `value` written verbatim.
    pub fn runtime_field(mut self, key: &str, value: &str) -> Self {
        self.runtime_lines.push(format!("{key} = {value}"));
        self
    }

    pub fn listener(mut self, l: Listener) -> Self {
        self.listeners.push(l);
        self
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "[runtime]\nworkers = {}\ndrain_timeout = \"{}\"\n{}\n[admin]\nbind = \"{}\"\n",
            self.workers,
            self.drain_timeout,
            self.runtime_lines
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            self.admin_bind
        );
        for line in &self.admin_lines {
            let _ = writeln!(out, "{line}");
        }
        if !self.admin_lines.is_empty() {
            out.push('\n');
        }
        for l in &self.listeners {
            l.write_toml(&mut out);
        }
        out
    }
}

/// The TOML of a config with default runtime settings and these listeners.
pub fn ringlb_config(listeners: impl IntoIterator<Item = Listener>) -> String {
    listeners
        .into_iter()
        .fold(LbConfig::default(), LbConfig::listener)
        .to_toml()
}
