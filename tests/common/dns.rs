//! A real `dnsmasq` on a free loopback port for the DNS discovery tests (tests/dns.rs,
//! tests/attack_review.rs): A records from an `--addn-hosts` file (SIGHUP re-reads it), SRV
//! records as `--srv-host`s (changing them restarts dnsmasq on the same port).

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A dnsmasq serving `ringlb.test` (authoritative: unknown names are NXDOMAIN) from a hosts file
/// and SRV records; killed and reaped on drop.
pub struct Dns {
    child: Option<Child>,
    pub addr: SocketAddr,
    hosts: PathBuf,
    log: PathBuf,
    srv: Vec<String>,
}

impl Dns {
    /// `hosts`: lines of the hosts file; `srv`: `--srv-host` values.
    pub fn start(hosts: &str, srv: &[String]) -> Dns {
        super::procs::require_tool("dnsmasq", "dnsmasq-base");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        for attempt in 0..20 {
            let Some(port) = super::procs::free_dns_port() else {
                continue;
            };
            let tag = format!("{}-{port}-{attempt}", std::process::id());
            let mut d = Dns {
                child: None,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                hosts: dir.join(format!("dns-hosts-{tag}")),
                log: dir.join(format!("dns-{tag}.log")),
                srv: srv.to_vec(),
            };
            std::fs::write(&d.hosts, hosts).expect("hosts file");
            if d.spawn() {
                return d;
            }
            eprintln!("dnsmasq on port {port} did not start:\n{}", d.log());
        }
        panic!("dnsmasq did not start in 20 attempts");
    }

    fn spawn(&mut self) -> bool {
        let log = std::fs::File::create(&self.log).expect("dnsmasq log");
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--local=/ringlb.test/",
            "--conf-file=/dev/null",
            "--local-ttl=0",
        ])
        .arg(format!("--port={}", self.addr.port()))
        .arg(format!("--addn-hosts={}", self.hosts.display()))
        .arg("--pid-file=")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        for s in &self.srv {
            cmd.arg(format!("--srv-host={s}"));
        }
        self.child = Some(cmd.spawn().expect("spawn dnsmasq"));
        self.wait_answering()
    }

    /// Until dnsmasq answers a query for `probe.ringlb.test` (any reply), 5 s at most.
    fn wait_answering(&mut self) -> bool {
        let q = query(0x4242, "probe.ringlb.test");
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().expect("try_wait").is_some() {
                    return false;
                }
            }
            let _ = s.send_to(&q, self.addr);
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                if buf[..n].starts_with(&q[..2]) {
                    return true;
                }
            }
        }
        false
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// New SRV records: dnsmasq reads `--srv-host` only at start, so it restarts on its port.
    pub fn set_srv(&mut self, srv: &[String]) {
        self.stop();
        self.srv = srv.to_vec();
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            self.stop();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("dnsmasq did not restart:\n{}", self.log());
    }

    /// New hosts file; SIGHUP makes dnsmasq re-read it.
    pub fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).expect("hosts file");
        let pid = self.child.as_ref().expect("running").id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP dnsmasq");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn dns_section(&self, extra: &str) -> String {
        format!(
            "[dns]\nresolvers = [\"{}\"]\nrefresh = \"200ms\"\n{extra}\n",
            self.addr
        )
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.hosts);
    }
}

/// A DNS query for an A record of `name` with ID `id`.
pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}
