//! `/proc` readings of another process (resident memory, CPU time) and this process's open-file
//! limit.

use anyhow::Context;
use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// File descriptors a worker keeps free of sessions: stdio, the runtime's epoll and eventfds,
/// pooled API connections, connections being set up, `/proc` reads.
pub const FD_RESERVE: u64 = 256;

/// Resident set size of `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Open sockets of `pid` (its `/proc/<pid>/fd` entries that are sockets).
pub fn sockets(pid: u32) -> anyhow::Result<u64> {
    let dir = format!("/proc/{pid}/fd");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(e) = e else { continue };
        if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            n += 1;
        }
    }
    Ok(n)
}

/// CPU time (user + system) of `pid` in seconds, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let ticks = parse_cpu_ticks(&stat).with_context(|| format!("malformed /proc/{pid}/stat"))?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)
        .unwrap_or(100);
    Ok(ticks as f64 / hz as f64)
}

/// CPU time (user + system) in seconds of each live thread of `pid`, summed by thread name with
/// ASCII digits dropped (`hatch-data-0` and `hatch-data-1` become `hatch-data-`).
pub fn thread_cpu_seconds(pid: u32) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)
        .unwrap_or(100);
    let mut out = std::collections::BTreeMap::new();
    let dir = format!("/proc/{pid}/task");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let path = entry?.path();
        // A thread may exit between the listing and the read: skip it.
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else { continue };
        let (Some(name), Some(ticks)) = (parse_comm(&stat), parse_cpu_ticks(&stat)) else {
            continue;
        };
        let name: String = name.chars().filter(|c| !c.is_ascii_digit()).collect();
        *out.entry(name).or_insert(0.0) += ticks as f64 / hz as f64;
    }
    Ok(out)
}

/// The command name of a `stat` line: between the first `(` and the last `)`.
fn parse_comm(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// utime + stime in clock ticks. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name start at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Raises this process's soft open-file limit to the hard limit (children inherit it) and
/// returns the new limit.
pub fn raise_nofile() -> anyhow::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    Ok(hard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t2\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
    }

    #[test]
    fn parses_cpu_ticks_with_odd_command_names() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 5 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("42 (x) S 1"), None);
        assert_eq!(parse_comm(stat), Some("a) b (c)"));
    }

    #[test]
    fn own_process_readings_are_positive() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).unwrap() > 0);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(raise_nofile().unwrap() > 0);
        assert!(!thread_cpu_seconds(pid).unwrap().is_empty());
    }
}
