//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
//! `process_start_time_seconds`), read from `/proc/self` at scrape time, the way the official
//! client libraries do.
//! Must not: cache, or fail a scrape: a value that cannot be read is left out.

use std::path::Path;

/// `/proc/PID/stat` times are in clock ticks of `USER_HZ`, which Linux fixes at 100 for every
/// user-space interface (Prometheus' procfs library makes the same assumption).
const USER_HZ: f64 = 100.0;

/// What `/proc/self` says about this process; `None` for what could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    /// The soft `RLIMIT_NOFILE`.
    pub max_fds: Option<u64>,
    /// Unix time the process started, seconds.
    pub start_time_seconds: Option<f64>,
}

/// Reads the current values.
pub fn read() -> ProcessStats {
    let proc = Path::new("/proc");
    let stat = std::fs::read_to_string(proc.join("self/stat")).ok();
    let fields = stat.as_deref().map(stat_fields).unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // Field numbers as in proc(5), counted after the command name's closing parenthesis.
    let (utime, stime, starttime) = (field(14 - 3), field(15 - 3), field(22 - 3));
    let btime = std::fs::read_to_string(proc.join("stat"))
        .ok()
        .and_then(|s| boot_time(&s));
    ProcessStats {
        cpu_seconds: utime.zip(stime).map(|(u, s)| (u + s) as f64 / USER_HZ),
        resident_bytes: std::fs::read_to_string(proc.join("self/status"))
            .ok()
            .and_then(|s| vm_rss_bytes(&s)),
        open_fds: std::fs::read_dir(proc.join("self/fd"))
            .ok()
            // The directory handle being read is one of the entries.
            .map(|d| (d.count() as u64).saturating_sub(1)),
        max_fds: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft),
        start_time_seconds: btime
            .zip(starttime)
            .map(|(b, t)| b as f64 + t as f64 / USER_HZ),
    }
}

/// The fields of `/proc/PID/stat` after `(comm)` (which may itself hold spaces and parens):
/// index 0 is field 3, the state.
fn stat_fields(stat: &str) -> Vec<&str> {
    match stat.rfind(')') {
        Some(i) => stat[i + 1..].split_whitespace().collect(),
        None => Vec::new(),
    }
}

fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn vm_rss_bytes(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let stat = "4242 (ring lb) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 5 0 \
                    123456 1000 200 18446744073709551615";
        let f = stat_fields(stat);
        assert_eq!(f[0], "S");
        assert_eq!((f[11], f[12], f[19]), ("250", "50", "123456"));
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(
            vm_rss_bytes("Name:\tringlb\nVmRSS:\t  2048 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(vm_rss_bytes("Name:\tringlb\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let p = read();
        assert!(p.resident_bytes.is_some_and(|b| b > 0), "{p:?}");
        assert!(p.cpu_seconds.is_some_and(|c| c >= 0.0), "{p:?}");
        let (open, max) = (p.open_fds.unwrap(), p.max_fds.unwrap());
        assert!(open >= 3 && open <= max, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = p.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
    }
}
