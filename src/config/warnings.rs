//! Warnings about a valid configuration that may not do what the operator expects on this host
//! (printed by `check` and logged by `run` through the same call). Pure: the host's limits are
//! passed in.
//! Must not: refuse anything (errors belong to validation) or do I/O.

use super::{Config, Protocol};

impl Config {
    /// One line per warning. `nofile` is the RLIMIT_NOFILE ringlb will run with (the hard limit:
    /// `run` raises the soft limit to it).
    pub fn warnings(&self, nofile: u64) -> Vec<String> {
        let mut out = Vec::new();
        let (mut tcp, mut udp, mut sockets) = (0u64, 0u64, 1u64);
        for l in &self.listeners {
            sockets += self.runtime.workers as u64;
            match l.protocol {
                Protocol::Tcp => tcp += u64::from(l.max_connections),
                Protocol::Udp => udp += u64::from(l.max_flows),
            }
        }
        for l in &self.listeners {
            if l.accept_proxy_protocol && l.accept_proxy_protocol_from.is_none() {
                out.push(format!(
                    "listener {:?}: accept_proxy_protocol = true trusts every peer: any client \
                     that reaches {} chooses the source address ringlb hashes, logs and sends \
                     on; list the upstream balancers in accept_proxy_protocol_from",
                    l.name, l.bind
                ));
            }
        }
        let need = 2 * tcp + udp + sockets;
        if nofile > 0 && need > nofile {
            out.push(format!(
                "the configured limits can need more file descriptors than RLIMIT_NOFILE allows: \
                 2 × {tcp} (TCP max_connections, client + backend) + {udp} (UDP max_flows) + \
                 {sockets} (listening sockets) = {need} > {nofile}, not counting pipes (2 per \
                 connection moving bulk data). Raise the limit (systemd LimitNOFILE=, ulimit -n) \
                 or lower max_connections / max_flows; UDP flows take at most half the limit \
                 while a TCP listener runs, the rest is TCP's reserve"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_when_limits_exceed_the_fd_limit() {
        let c = Config::parse(
            "[runtime]\nworkers = 2\n[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:1\"\nmax_connections = 1000\nbackends = [ { address = \"127.0.0.1:2\" } ]\n[[listeners]]\nname = \"u\"\nprotocol = \"udp\"\nbind = \"127.0.0.1:3\"\nmax_flows = 500\nbackends = [ { address = \"127.0.0.1:4\" } ]\n",
        )
        .unwrap();
        assert!(c.warnings(10_000).is_empty());
        let w = c.warnings(2_000);
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("2 × 1000")
                && w[0].contains("+ 500 (UDP")
                && w[0].contains("= 2505 > 2000"),
            "{}",
            w[0]
        );
    }
}
