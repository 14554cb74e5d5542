//! Control-plane counters, rendered as Prometheus text at `GET /metrics` next to the data
//! plane's own lines.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of the control plane. Cheap to bump from any task.
#[derive(Default)]
pub struct Metrics {
    sessions_started: AtomicU64,
    closed: Mutex<BTreeMap<&'static str, u64>>,
    requests: Mutex<BTreeMap<(u16, String), u64>>,
    token_failures: Mutex<BTreeMap<String, u64>>,
    sessions_pruned: AtomicU64,
    resume_tokens_client: AtomicU64,
    resume_tokens_agent: AtomicU64,
    resume_requests_dropped: AtomicU64,
    api_connections_open: AtomicU64,
    api_connections_refused: AtomicU64,
}

impl Metrics {
    /// A session was created (token issued).
    pub fn session_started(&self) {
        self.sessions_started.fetch_add(1, Ordering::Relaxed);
    }

    /// A session closed with `reason` (`CloseReason::as_str`).
    pub fn session_closed(&self, reason: &'static str) {
        *lock(&self.closed).entry(reason).or_default() += 1;
    }

    /// An API request answered with `status`, and the error `code` when it failed.
    pub fn request(&self, status: u16, code: &str) {
        *lock(&self.requests).entry((status, code.to_owned())).or_default() += 1;
    }

    /// A bearer credential (access key, instance secret) refused, by reason.
    pub fn auth_failed(&self, reason: &str) {
        *lock(&self.token_failures).entry(reason.to_owned()).or_default() += 1;
    }

    /// A resume token was issued: to a client (`POST /v1/sessions/{id}/resume`) or an agent
    /// (`session.resume`).
    pub fn resume_token(&self, client: bool) {
        let c = if client { &self.resume_tokens_client } else { &self.resume_tokens_agent };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// An agent's `session.resume` was dropped for exceeding the rate.
    pub fn resume_dropped(&self) {
        self.resume_requests_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Closed session records deleted for being older than the retention.
    pub fn sessions_pruned(&self, n: u64) {
        self.sessions_pruned.fetch_add(n, Ordering::Relaxed);
    }

    /// An API connection was accepted (`true`) or ended (`false`).
    pub fn api_connection(&self, opened: bool) {
        if opened {
            self.api_connections_open.fetch_add(1, Ordering::Relaxed);
        } else {
            self.api_connections_open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// An API connection was refused at accept (`--max-api-connections` reached).
    pub fn api_connection_refused(&self) {
        self.api_connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Sessions started so far.
    pub fn started(&self) -> u64 {
        self.sessions_started.load(Ordering::Relaxed)
    }

    /// Renders the Prometheus text exposition of these counters plus the gauges given: open
    /// sessions (`active`), of which `pending` and `detached`.
    pub fn render(
        &self,
        active: usize,
        pending: usize,
        detached: usize,
        agents_online: usize,
    ) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP hatch_sessions_active Sessions not yet closed, by state.");
        let _ = writeln!(out, "# TYPE hatch_sessions_active gauge");
        let _ = writeln!(out, "hatch_sessions_active{{state=\"pending\"}} {pending}");
        let _ = writeln!(
            out,
            "hatch_sessions_active{{state=\"connected\"}} {}",
            active.saturating_sub(pending).saturating_sub(detached)
        );
        let _ = writeln!(out, "hatch_sessions_active{{state=\"detached\"}} {detached}");
        let _ = writeln!(
            out,
            "# HELP hatch_resume_tokens_total Resume tokens issued, by the role of the new leg."
        );
        let _ = writeln!(out, "# TYPE hatch_resume_tokens_total counter");
        for (role, v) in
            [("agent", &self.resume_tokens_agent), ("client", &self.resume_tokens_client)]
        {
            let _ = writeln!(
                out,
                "hatch_resume_tokens_total{{role=\"{role}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP hatch_sessions_started_total Sessions created.");
        let _ = writeln!(out, "# TYPE hatch_sessions_started_total counter");
        let _ = writeln!(out, "hatch_sessions_started_total {}", self.started());
        let _ = writeln!(out, "# HELP hatch_sessions_closed_total Sessions closed, by reason.");
        let _ = writeln!(out, "# TYPE hatch_sessions_closed_total counter");
        for (reason, n) in lock(&self.closed).iter() {
            let _ = writeln!(out, "hatch_sessions_closed_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP hatch_api_requests_total API requests, by status and code.");
        let _ = writeln!(out, "# TYPE hatch_api_requests_total counter");
        for ((status, code), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "hatch_api_requests_total{{status=\"{status}\",code=\"{code}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP hatch_agents_online Agents with a control channel up.");
        let _ = writeln!(out, "# TYPE hatch_agents_online gauge");
        let _ = writeln!(out, "hatch_agents_online {agents_online}");
        let _ = writeln!(
            out,
            "# HELP hatch_api_auth_failures_total Bearer credentials refused by the API, by reason."
        );
        let _ = writeln!(out, "# TYPE hatch_api_auth_failures_total counter");
        for (reason, n) in lock(&self.token_failures).iter() {
            let _ = writeln!(out, "hatch_api_auth_failures_total{{reason=\"{reason}\"}} {n}");
        }
        let singles = [
            (
                "hatch_sessions_pruned_total",
                "counter",
                "Closed session records deleted after the retention.",
                &self.sessions_pruned,
            ),
            (
                "hatch_agent_resume_dropped_total",
                "counter",
                "Agents' session.resume requests dropped: beyond the rate per instance.",
                &self.resume_requests_dropped,
            ),
            (
                "hatch_api_connections_open",
                "gauge",
                "Connections the API listener holds (agent control channels included).",
                &self.api_connections_open,
            ),
            (
                "hatch_api_connections_refused_total",
                "counter",
                "API connections reset at accept: --max-api-connections reached.",
                &self.api_connections_refused,
            ),
        ];
        for (name, kind, help, v) in singles {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters stay meaningful after a panic elsewhere; ignore poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process families Prometheus' own clients export (`process_*`), from `/proc/self`:
/// CPU time, resident memory, open and allowed file descriptors, start time. A reading that
/// fails (no `/proc`) is left out rather than reported as zero.
pub fn render_process() -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, v: Option<f64>| {
        if let Some(v) = v {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {v}");
        }
    };
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten();
    let ticks = ticks.filter(|t| *t > 0).map(|t| t as f64);
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // Fields after the command name (which may hold spaces, so split after its ')').
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
    let cpu = ticks.and_then(|t| Some((field(14)? + field(15)?) / t));
    family("process_cpu_seconds_total", "counter", "User and system CPU time, in seconds.", cpu);
    let rss = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? * 1024.0)
    });
    family("process_resident_memory_bytes", "gauge", "Resident memory, in bytes.", rss);
    let open = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as f64);
    family("process_open_fds", "gauge", "Open file descriptors.", open);
    let max = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _)| soft as f64);
    family("process_max_fds", "gauge", "Most open file descriptors (RLIMIT_NOFILE).", max);
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok()));
    let start = ticks.and_then(|t| Some(boot? + field(22)? / t));
    family(
        "process_start_time_seconds",
        "gauge",
        "Start time since the Unix epoch, in seconds.",
        start,
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn process_families_are_read_from_proc() {
        let text = super::render_process();
        for name in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
        ] {
            let v: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} in\n{text}"))
                .parse()
                .unwrap();
            // A test process may not have run a whole clock tick yet.
            let least = if name == "process_cpu_seconds_total" { 0.0 } else { f64::MIN_POSITIVE };
            assert!(v >= least, "{name} = {v}");
            assert!(text.contains(&format!("# HELP {name} ")), "{text}");
        }
    }
}
