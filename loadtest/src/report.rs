//! Histograms, the report (text and JSON), and the comparison with a committed baseline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest value a latency histogram holds: 60 s in microseconds. Larger values are clamped.
pub const MAX_US: u64 = 60_000_000;

/// A new histogram of microseconds, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts (low 1, high ≥ 2 × low, 3 sigfig).
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// Records `us` microseconds, clamped to the histogram's range.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    // Clamped into [1, MAX_US], which the histogram accepts by construction.
    h.record(us.clamp(1, MAX_US)).expect("value within bounds");
}

/// A histogram in transit between processes: its non-empty buckets as `(value, count)`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Buckets(pub Vec<(u64, u64)>);

impl Buckets {
    /// The recorded buckets of `h`.
    pub fn of(h: &Histogram<u64>) -> Self {
        Buckets(h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect())
    }

    /// Adds these buckets into `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            // A peer worker's values; clamp so a bad value cannot make `record_n` fail.
            let _ = h.record_n(v.clamp(1, MAX_US), n);
        }
    }
}

/// Error counts by kind (`connect`, `tls`, `api_Throttled`, `echo_timeout`, ...).
pub type Errors = BTreeMap<String, u64>;

/// Adds `from` into `into`.
pub fn merge_errors(into: &mut Errors, from: &Errors) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// What the echoes of a worker's sessions carried, and how their lost connections were taken
/// up. Every keystroke's payload begins with its sequence number, so a byte echoed out of
/// place is seen.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamStats {
    /// Payload bytes sent by the measured keystrokes.
    pub bytes_sent: u64,
    /// Of them, echoed back (delivered once, as the client counts them).
    pub bytes_echoed: u64,
    /// Echoed bytes that were not the next byte sent: reordered, duplicated or corrupted.
    pub bytes_out_of_order: u64,
    /// Sessions whose connection was lost at least once.
    pub sessions_lost: usize,
    /// Of them, sessions that took up every loss again (the agent's RESUME came back).
    pub sessions_resumed: usize,
    /// Losses taken up (a session may lose its connection more than once).
    pub resumes: u64,
    /// Keystrokes whose round trip spanned a loss (not in the latency figures).
    pub round_trips_interrupted: u64,
    /// From the client noticing the loss to the agent's RESUME on the new connection,
    /// microseconds.
    pub resume_time: Buckets,
}

impl StreamStats {
    /// Adds another worker's figures.
    pub fn merge(&mut self, o: &StreamStats) {
        self.bytes_sent += o.bytes_sent;
        self.bytes_echoed += o.bytes_echoed;
        self.bytes_out_of_order += o.bytes_out_of_order;
        self.sessions_lost += o.sessions_lost;
        self.sessions_resumed += o.sessions_resumed;
        self.resumes += o.resumes;
        self.round_trips_interrupted += o.round_trips_interrupted;
        self.resume_time.0.extend_from_slice(&o.resume_time.0);
    }
}

/// One bulk transfer through one forwarded connection (or straight to the server), checked
/// byte by byte against the pattern it carries (`tcp::Pattern`) and by the count its far end
/// reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Bulk {
    /// Bytes that arrived, checked.
    pub bytes: u64,
    /// From the first byte sent (or the request) to the far end's count after the last byte.
    pub seconds: f64,
    /// `bytes / seconds / 1e6`.
    pub mb_s: f64,
    /// Bytes not in their place in the pattern.
    pub bad_bytes: u64,
    /// Whether the count the far end reported equals the bytes sent and no byte was out of
    /// place.
    pub verified: bool,
}

/// Forward mode's figures of one worker (or merged over workers).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ForwardStats {
    /// Connections whose both directions ended with FIN after the measurement, every byte of
    /// the echo back.
    pub streams_closed: usize,
    /// Port sessions the client ended with close 1000 once all their streams had ended (the
    /// pump's `End::Done`); none on the floor.
    pub sessions_closed: usize,
    /// Client → server transfer (throughput part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<Bulk>,
    /// Server → client transfer (throughput part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<Bulk>,
}

impl ForwardStats {
    /// Adds another worker's figures (a bulk transfer is run by one worker).
    pub fn merge(&mut self, o: &ForwardStats) {
        self.streams_closed += o.streams_closed;
        self.sessions_closed += o.sessions_closed;
        if o.upload.is_some() {
            self.upload.clone_from(&o.upload);
        }
        if o.download.is_some() {
            self.download.clone_from(&o.download);
        }
    }
}

/// Forward mode's figures of one side (relay or floor), next to its latency figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ForwardSide {
    /// Payload bytes sent by the measured messages.
    pub bytes_sent: u64,
    /// Of them, echoed back.
    pub bytes_echoed: u64,
    /// Echoed bytes that were not the next byte sent.
    pub bytes_out_of_order: u64,
    /// How the streams and sessions ended; the bulk transfers.
    #[serde(flatten)]
    pub stats: ForwardStats,
}

/// Forward mode's summary: what was run and how the relay compares with direct TCP.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Forward {
    /// Forwarded connections of the latency part.
    pub connections: usize,
    /// Port sessions they were spread over.
    pub sessions: usize,
    /// The floor: `tcp`, the same connections straight to the same server over loopback TCP
    /// (no TLS, no WebSocket, no session).
    pub floor: String,
    /// The session window of both pumps, bytes.
    pub link_window_bytes: usize,
    /// relay upload MB/s / floor upload MB/s.
    pub upload_ratio: Option<f64>,
    /// relay download MB/s / floor download MB/s.
    pub download_ratio: Option<f64>,
    /// Relay CPU (user + system) per MB carried by the throughput part (both directions),
    /// microseconds.
    pub relay_cpu_us_per_mb: Option<f64>,
    /// The same for the simulated client (its pump, TLS, and the load test's own end of the
    /// local connection, which writes and checks the bytes).
    pub client_cpu_us_per_mb: Option<f64>,
    /// The same for the simulated agent (its pump, TLS, its connection to the server).
    pub agent_cpu_us_per_mb: Option<f64>,
    /// Latency part: the client workers' CPU per round trip, microseconds (their pumps, TLS,
    /// and the load test's own ends of the local connections).
    pub client_cpu_us_per_round_trip: Option<f64>,
    /// Latency part: the agent workers' CPU per round trip, microseconds.
    pub agent_cpu_us_per_round_trip: Option<f64>,
    /// The same for the client worker of the floor's transfers (writing, reading and checking
    /// the bytes over plain TCP): what the load test itself costs per MB.
    pub floor_client_cpu_us_per_mb: Option<f64>,
    /// Every connection asked came up and closed cleanly, every byte came back in order, and
    /// both bulk transfers were verified, through the relay and on the floor.
    pub whole: bool,
}

/// What a `--chaos` run did to the sessions and how they came through.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Chaos {
    /// `relay-restart`: the relay process is killed (SIGKILL) and started again on the same
    /// ports and data directory.
    pub scenario: String,
    /// When, seconds after the measurement started.
    pub at_s: f64,
    /// From the kill until the new relay process had written its `dev.json` (it serves then),
    /// milliseconds.
    pub relay_down_ms: f64,
    /// Sessions up when the measurement started.
    pub sessions_live: usize,
    /// Sessions whose connection was lost.
    pub sessions_lost: usize,
    /// Of them, sessions that took up every loss again.
    pub sessions_resumed: usize,
    /// Sessions still up at the end of the measurement.
    pub sessions_up_at_end: usize,
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Sent but never echoed back.
    pub bytes_lost: u64,
    /// Echoed out of place (reordered, duplicated, corrupted).
    pub bytes_out_of_order: u64,
    /// Keystrokes whose round trip spanned the restart (left out of the latency figures).
    pub round_trips_interrupted: u64,
    /// Resume time (loss noticed by the client to the agent's RESUME on the new connection),
    /// milliseconds.
    pub resume_p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub resume_p99_ms: f64,
    /// Largest, milliseconds.
    pub resume_max_ms: f64,
}

impl Chaos {
    /// Whether every live session came through whole: each one lost its connection and took
    /// it up again, and every byte came back once, in order.
    pub fn whole(&self) -> bool {
        self.sessions_lost == self.sessions_live
            && self.sessions_resumed == self.sessions_live
            && self.sessions_up_at_end == self.sessions_live
            && self.bytes_lost == 0
            && self.bytes_out_of_order == 0
    }
}

/// The latency figures of one side (relay or floor).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Side {
    /// Median round trip, microseconds.
    pub p50_us: u64,
    /// 90th percentile, microseconds.
    pub p90_us: u64,
    /// 99th percentile, microseconds.
    pub p99_us: u64,
    /// 99.9th percentile, microseconds.
    pub p999_us: u64,
    /// Largest round trip, microseconds.
    pub max_us: u64,
    /// Round trips measured.
    pub count: u64,
    /// Errors during setup and measurement.
    pub errors: u64,
    /// Sessions that were up when the measurement started.
    pub sessions_up: usize,
    /// Echoed payload per session, MB/s (throughput mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput_mb_s_per_session: Option<f64>,
    /// Forward mode: bytes, how streams ended, bulk transfers. `sessions_up` counts
    /// connections then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<ForwardSide>,
}

impl Side {
    /// The summary of a latency histogram.
    pub fn of(h: &Histogram<u64>, errors: u64, sessions_up: usize) -> Self {
        Side {
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            count: h.len(),
            errors,
            sessions_up,
            throughput_mb_s_per_session: None,
            forward: None,
        }
    }
}

/// Session setup figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Setup {
    /// Sessions established per second (first start to last session up).
    pub sessions_per_s: f64,
    /// 99th percentile of one session's setup (API call, dial, first echo), milliseconds.
    pub p99_ms: f64,
    /// Relay CPU (user + system) from the clients' start until every session is up, per
    /// session up, microseconds.
    #[serde(default)]
    pub relay_cpu_us_per_session: Option<f64>,
    /// The same by relay thread name with digits dropped (`hatch-data-`: the data-plane shards;
    /// `hatch-control`: the API, the control channels and the store's blocking threads).
    /// Threads that exited meanwhile are missing here but counted in the total.
    #[serde(default)]
    pub relay_cpu_us_per_session_by_thread: BTreeMap<String, f64>,
}

/// The open-file limit and what, if anything, capped the session count.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Limits {
    /// Hard open-file limit per process (soft raised to it).
    pub nofile: u64,
    /// Sessions one relay process can hold under that limit (two connections each).
    pub relay_max_sessions: usize,
    /// Client worker processes used.
    pub client_workers: usize,
    /// Agent worker processes used.
    pub agent_workers: usize,
    /// Why fewer sessions than requested were run, when that happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capped_by: Option<String>,
}

/// The report of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Sessions run (after any cap).
    pub sessions: usize,
    /// Sessions asked for.
    pub sessions_requested: usize,
    /// Measurement time in seconds.
    pub duration_s: f64,
    /// `echo`, `pty` or `throughput`.
    pub mode: String,
    /// Relay I/O backend (`uring` or `epoll`), or `external`.
    pub io: String,
    /// Relay shards and floor threads.
    pub shards: usize,
    /// DATA payload bytes.
    pub payload_bytes: usize,
    /// DATA messages per second per session.
    pub rate_per_s: f64,
    /// Data legs and floor: `tls`, or `plaintext` (`--danger-plaintext`; the API and the
    /// agents' control channels keep TLS).
    #[serde(default)]
    pub transport: String,
    /// Round trips through the relay.
    pub relay: Option<Side>,
    /// Round trips to the direct echo server.
    pub floor: Option<Side>,
    /// relay p99 / floor p99.
    pub p99_ratio: Option<f64>,
    /// Session setup through the relay (API + both legs).
    pub setup: Setup,
    /// Relay RSS with every session up, bytes.
    pub relay_rss_bytes: Option<u64>,
    /// (Relay RSS with sessions up − RSS before them) / sessions, bytes.
    pub rss_per_session_bytes: Option<u64>,
    /// Relay CPU seconds per million relayed messages (each round trip is two), which is
    /// also microseconds per relayed message.
    pub cpu_s_per_million_msgs: Option<f64>,
    /// Relay CPU microseconds per round trip (two relayed messages).
    #[serde(default)]
    pub cpu_us_per_round_trip: Option<f64>,
    /// Relay CPU seconds (user + system) from `go` to the end of the measurement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_cpu_s: Option<f64>,
    /// The client workers' CPU seconds over the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cpu_s: Option<f64>,
    /// The agent workers' CPU seconds over the same time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cpu_s: Option<f64>,
    /// Errors by kind, relay and floor phases together (prefixed `floor.` for the floor).
    pub errors_by_kind: Errors,
    /// Connections of the relay phase by who made them, scheme and TLS handshake kind:
    /// `client.https_full`, `client.wss_resumed`, `agent.ws_plain`, ... (clients: during setup;
    /// agents: over their life, registration and control channel included).
    #[serde(default)]
    pub connections: Errors,
    /// Open-file limit, worker counts and cap.
    pub limits: Limits,
    /// Forward mode's summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<Forward>,
    /// Each relay node of a fleet (`--relays`), in start order; empty for one relay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeFigures>,
    /// What `--chaos` did and how the sessions came through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chaos: Option<Chaos>,
    /// The same run with the other I/O backend (`--compare-io`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other_io: Option<Box<Report>>,
}

/// One relay node's figures in a fleet run.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NodeFigures {
    /// Its API URL.
    pub api_url: String,
    /// Agents whose control channel it held (the sessions run where their agent is).
    pub agents: usize,
    /// Open sockets with every session up (two per session on this node, one per agent).
    pub sockets_at_go: Option<u64>,
    /// CPU seconds from `go` to the end of the measurement.
    pub cpu_s: Option<f64>,
    /// RSS with every session up, bytes.
    pub rss_bytes: Option<u64>,
}

impl Report {
    /// Computes `p99_ratio` from the two sides.
    pub fn set_ratio(&mut self) {
        self.p99_ratio = match (&self.relay, &self.floor) {
            (Some(r), Some(f)) if f.p99_us > 0 && r.count > 0 => {
                Some(r.p99_us as f64 / f.p99_us as f64)
            }
            _ => None,
        };
    }

    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let one = |r: &Report, s: &mut String| {
            let _ = writeln!(
                s,
                "hatch-loadtest: {} sessions ({} asked), mode {}, {}, io {}, {} shards, {} B at \
                 {}/s for {} s",
                r.sessions,
                r.sessions_requested,
                r.mode,
                if r.transport == "plaintext" {
                    "PLAINTEXT data legs and floor (--danger-plaintext)"
                } else {
                    "TLS"
                },
                r.io,
                r.shards,
                r.payload_bytes,
                r.rate_per_s,
                r.duration_s
            );
            let _ = writeln!(
                s,
                "  {:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>6}",
                "", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us", "count", "errors", "up"
            );
            for (name, side) in [("relay", &r.relay), ("floor", &r.floor)] {
                if let Some(x) = side {
                    let _ = writeln!(
                        s,
                        "  {:<6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7} {:>6}",
                        name,
                        x.p50_us,
                        x.p90_us,
                        x.p99_us,
                        x.p999_us,
                        x.max_us,
                        x.count,
                        x.errors,
                        x.sessions_up
                    );
                    if let Some(t) = x.throughput_mb_s_per_session {
                        let _ = writeln!(s, "  {name} throughput: {t:.2} MB/s per session");
                    }
                }
            }
            if let Some(ratio) = r.p99_ratio {
                let _ = writeln!(s, "  p99 ratio relay/floor: {ratio:.2}");
            }
            if let Some(f) = &r.forward {
                forward_text(r, f, s);
            }
            let _ = writeln!(
                s,
                "  setup: {:.0} sessions/s, p99 {:.1} ms; relay CPU {} per setup{}",
                r.setup.sessions_per_s,
                r.setup.p99_ms,
                r.setup.relay_cpu_us_per_session.map_or("n/a".to_owned(), |c| format!("{c:.0} us")),
                if r.setup.relay_cpu_us_per_session_by_thread.is_empty() {
                    String::new()
                } else {
                    let parts: Vec<String> = r
                        .setup
                        .relay_cpu_us_per_session_by_thread
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.0}"))
                        .collect();
                    format!(" ({})", parts.join(", "))
                }
            );
            if !r.connections.is_empty() {
                let _ = writeln!(s, "  connections: {:?}", r.connections);
            }
            if let Some(rss) = r.relay_rss_bytes {
                let _ = writeln!(
                    s,
                    "  relay RSS: {:.1} MiB, {} per session; CPU {} s per million messages ({} us \
                     per round trip)",
                    rss as f64 / 1048576.0,
                    r.rss_per_session_bytes.map_or("n/a".to_owned(), |b| format!("{b} B")),
                    r.cpu_s_per_million_msgs.map_or("n/a".to_owned(), |c| format!("{c:.2}")),
                    r.cpu_us_per_round_trip.map_or("n/a".to_owned(), |c| format!("{c:.1}"))
                );
            }
            for (i, n) in r.nodes.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "  node {i} {}: {} agents, {} sockets at go, CPU {} s, RSS {}",
                    n.api_url,
                    n.agents,
                    n.sockets_at_go.map_or("n/a".to_owned(), |v| v.to_string()),
                    n.cpu_s.map_or("n/a".to_owned(), |c| format!("{c:.2}")),
                    n.rss_bytes
                        .map_or("n/a".to_owned(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
                );
            }
            let _ = writeln!(
                s,
                "  open-file limit {} per process: relay holds at most {} sessions; {} client \
                 and {} agent workers{}",
                r.limits.nofile,
                r.limits.relay_max_sessions,
                r.limits.client_workers,
                r.limits.agent_workers,
                r.limits.capped_by.as_ref().map_or(String::new(), |c| format!("; capped by {c}"))
            );
            if let Some(c) = &r.chaos {
                let _ = writeln!(
                    s,
                    "  chaos {} at {:.1} s (relay down {:.0} ms): {} of {} live sessions resumed \
                     ({} lost their connection, {} up at the end); resume p50 {:.0} ms, p99 {:.0} \
                     ms, max {:.0} ms; {} of {} bytes lost, {} out of order; {} round trips \
                     spanned it",
                    c.scenario,
                    c.at_s,
                    c.relay_down_ms,
                    c.sessions_resumed,
                    c.sessions_live,
                    c.sessions_lost,
                    c.sessions_up_at_end,
                    c.resume_p50_ms,
                    c.resume_p99_ms,
                    c.resume_max_ms,
                    c.bytes_lost,
                    c.bytes_sent,
                    c.bytes_out_of_order,
                    c.round_trips_interrupted
                );
            }
            if !r.errors_by_kind.is_empty() {
                let _ = writeln!(s, "  errors: {:?}", r.errors_by_kind);
            }
        };
        one(self, &mut s);
        if let Some(o) = &self.other_io {
            one(o, &mut s);
        }
        s
    }
}

/// Forward mode's lines of the text report.
fn forward_text(r: &Report, f: &Forward, s: &mut String) {
    let _ = writeln!(
        s,
        "  forward: {} connections over {} port sessions ({:.0} per session), session window {} \
         KiB; floor = the same connections straight to the same TCP server (plain loopback TCP: \
         no TLS, no WebSocket)",
        f.connections,
        f.sessions,
        f.connections as f64 / f.sessions.max(1) as f64,
        f.link_window_bytes / 1024
    );
    for (name, side) in [("relay", &r.relay), ("floor", &r.floor)] {
        let Some(fs) = side.as_ref().and_then(|x| x.forward.as_ref()) else { continue };
        let _ = writeln!(
            s,
            "  {name}: {} of {} echoed bytes back, {} out of order; {} streams and {} sessions \
             closed cleanly",
            fs.bytes_echoed,
            fs.bytes_sent,
            fs.bytes_out_of_order,
            fs.stats.streams_closed,
            fs.stats.sessions_closed
        );
        for (dir, b) in [("upload", &fs.stats.upload), ("download", &fs.stats.download)] {
            match b {
                Some(b) => {
                    let _ = writeln!(
                        s,
                        "  {name} {dir:<8}: {:>9.1} MB/s, one connection, {} bytes in {:.2} s, {}",
                        b.mb_s,
                        b.bytes,
                        b.seconds,
                        if b.verified {
                            "verified".to_owned()
                        } else {
                            format!("NOT VERIFIED ({} bytes out of place)", b.bad_bytes)
                        }
                    );
                }
                None => {
                    let _ = writeln!(s, "  {name} {dir:<8}: not measured");
                }
            }
        }
    }
    let ratio = |x: Option<f64>| x.map_or("n/a".to_owned(), |x| format!("{x:.3}"));
    let us = |x: Option<f64>| x.map_or("n/a".to_owned(), |c| format!("{c:.1} us"));
    let _ = writeln!(
        s,
        "  CPU per round trip: client workers {}, agent workers {}",
        us(f.client_cpu_us_per_round_trip),
        us(f.agent_cpu_us_per_round_trip)
    );
    let _ = writeln!(
        s,
        "  throughput relay/floor: upload {}, download {}; CPU per MB carried: relay {}, client \
         {}, agent {} (floor client {}); {}",
        ratio(f.upload_ratio),
        ratio(f.download_ratio),
        us(f.relay_cpu_us_per_mb),
        us(f.client_cpu_us_per_mb),
        us(f.agent_cpu_us_per_mb),
        us(f.floor_client_cpu_us_per_mb),
        if f.whole { "every connection and byte came through" } else { "NOT WHOLE" }
    );
}

/// The committed baseline (`bench/baseline.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    /// relay p99 / floor p99 measured when the baseline was refreshed.
    pub p99_ratio: f64,
    /// How it was measured (free text: command, machine, date).
    #[serde(default)]
    pub note: String,
}

/// Compares a report's ratio with the baseline: `Err` with a message naming both figures when
/// the ratio is more than `factor` times the baseline's, or when it cannot be computed.
pub fn check_baseline(report: &Report, path: &Path, factor: f64) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base: Baseline =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    compare(report.p99_ratio, &base, factor)
}

fn compare(ratio: Option<f64>, base: &Baseline, factor: f64) -> anyhow::Result<String> {
    let Some(ratio) = ratio else {
        anyhow::bail!(
            "no relay/floor p99 ratio measured (baseline {:.2}): the run had no round trips",
            base.p99_ratio
        );
    };
    let limit = base.p99_ratio * factor;
    if ratio > limit {
        anyhow::bail!(
            "relay/floor p99 ratio {ratio:.2} exceeds {factor}x the baseline's {:.2} (limit {limit:.2})",
            base.p99_ratio
        );
    }
    Ok(format!(
        "relay/floor p99 ratio {ratio:.2} within {factor}x the baseline's {:.2} (limit {limit:.2})",
        base.p99_ratio
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_preserves_quantiles() {
        let mut h = new_hist();
        for us in [10, 20, 30, 40, 50, 1000, 250_000] {
            record(&mut h, us);
        }
        record(&mut h, u64::MAX);
        let json = serde_json::to_string(&Buckets::of(&h)).unwrap();
        let back: Buckets = serde_json::from_str(&json).unwrap();
        let mut h2 = new_hist();
        back.add_to(&mut h2);
        assert_eq!(h2.len(), h.len());
        assert_eq!(h2.value_at_quantile(0.5), h.value_at_quantile(0.5));
        assert_eq!(h2.max(), h.max());
    }

    #[test]
    fn baseline_passes_within_factor_and_fails_above_it() {
        let base = Baseline { p99_ratio: 2.0, note: String::new() };
        assert!(compare(Some(2.9), &base, 1.5).is_ok());
        let err = compare(Some(3.1), &base, 1.5).unwrap_err().to_string();
        assert!(err.contains("3.10") && err.contains("2.00"), "{err}");
        assert!(compare(None, &base, 1.5).is_err());
    }

    #[test]
    fn json_report_has_the_documented_fields() {
        let mut h = new_hist();
        record(&mut h, 100);
        let mut r = Report {
            relay: Some(Side::of(&h, 0, 1)),
            floor: Some(Side::of(&h, 0, 1)),
            ..Report::default()
        };
        r.set_ratio();
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "sessions",
            "duration_s",
            "relay",
            "floor",
            "p99_ratio",
            "setup",
            "relay_rss_bytes",
            "rss_per_session_bytes",
            "cpu_s_per_million_msgs",
            "errors_by_kind",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us", "count", "errors"] {
            assert!(v["relay"].get(k).is_some(), "missing relay.{k}");
        }
        assert_eq!(v["p99_ratio"], 1.0);
        assert!(v["setup"].get("sessions_per_s").is_some() && v["setup"].get("p99_ms").is_some());
    }
}
