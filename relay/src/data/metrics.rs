//! Per-shard counters, written only by their shard and read by `/metrics`.
//!
//! Relaxed atomics on a per-shard struct: the owning shard is the only writer, so they never
//! contend; the reader (the control plane's `/metrics`) tolerates a slightly stale view.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Refusal reasons counted (index into [`ShardMetrics::refusals`]).
pub const REFUSALS: [&str; 10] = [
    "invalid_token",
    "token_expired",
    "token_already_used",
    "bad_request",
    "request_body",
    "head_too_large",
    "not_found",
    "unavailable",
    "handshake_failed",
    "origin_not_allowed",
];

/// Counters of one shard.
#[derive(Default)]
pub struct ShardMetrics {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open now (gauge).
    pub open: AtomicU64,
    /// Sessions live now (gauge).
    pub sessions: AtomicU64,
    /// Sessions paired so far.
    pub paired: AtomicU64,
    /// Payload bytes client → agent.
    pub bytes_c2a: AtomicU64,
    /// Payload bytes agent → client.
    pub bytes_a2c: AtomicU64,
    /// Data frames forwarded.
    pub frames: AtomicU64,
    /// Legs handed to another shard.
    pub handoffs_out: AtomicU64,
    /// Legs adopted from another shard.
    pub handoffs_in: AtomicU64,
    /// Refusals by reason ([`REFUSALS`]).
    pub refusals: [AtomicU64; REFUSALS.len()],
    /// Pooled 32 KiB buffers held by reads and writes in progress (gauge; 0 when all idle).
    pub buffers: AtomicU64,
    /// Forward-step latency: bytes read → write handed to the other leg.
    pub forward: Histogram,
}

/// Upper bounds of the [`Histogram`] buckets: 2^i microseconds for i in 0..21, so 1 µs to
/// about 1.05 s, log2-spaced (one more bucket, `+Inf`, holds the rest).
pub const BUCKETS: usize = 21;

/// A latency histogram with fixed log2 buckets, written by one shard with relaxed atomics:
/// recording is a few adds, no allocation, no lock.
#[derive(Default)]
pub struct Histogram {
    /// Non-cumulative counts: `counts[i]` for `i < BUCKETS` holds values ≤ 2^i µs (and above
    /// the previous bound); `counts[BUCKETS]` holds the values above the last bound.
    pub counts: [AtomicU64; BUCKETS + 1],
    /// Sum of the recorded values, nanoseconds.
    pub sum_ns: AtomicU64,
    /// Number of recorded values.
    pub count: AtomicU64,
}

impl Histogram {
    /// The bucket for `d`: the smallest `i` with `d ≤ 2^i µs`, or `BUCKETS` past the last.
    pub fn bucket(d: std::time::Duration) -> usize {
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        // Whole microseconds rounded up, so a bound is inclusive (`le`).
        let us = ns.div_ceil(1000).max(1);
        // ceil(log2(us)): 1 → 0, 2 → 1, 3..=4 → 2, ...
        let i = (64 - (us - 1).leading_zeros()) as usize;
        i.min(BUCKETS)
    }

    /// Records one value.
    pub fn record(&self, d: std::time::Duration) {
        self.counts[Self::bucket(d)].fetch_add(1, Relaxed);
        let ns = d.as_nanos().min(u128::from(u64::MAX)) as u64;
        self.sum_ns.fetch_add(ns, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }
}

impl ShardMetrics {
    /// Counts a refusal by label.
    pub fn refused(&self, label: &str) {
        if let Some(i) = REFUSALS.iter().position(|l| *l == label) {
            self.refusals[i].fetch_add(1, Relaxed);
        }
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Subtracts 1 from a gauge.
    pub fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Relaxed);
    }
}

/// Prometheus text of all shards.
pub fn render(shards: &[std::sync::Arc<ShardMetrics>]) -> String {
    let mut out = String::new();
    type Field = fn(&ShardMetrics) -> &AtomicU64;
    let series: [(&str, &str, &str, Field); 10] = [
        (
            "hatch_data_connections_accepted_total",
            "counter",
            "Data-plane connections accepted.",
            |m| &m.accepted,
        ),
        ("hatch_data_connections_open", "gauge", "Data-plane connections open.", |m| &m.open),
        (
            "hatch_data_sessions_live",
            "gauge",
            "Sessions in the shard's session table (waiting, paired or detached).",
            |m| &m.sessions,
        ),
        ("hatch_data_sessions_paired_total", "counter", "Sessions whose two legs paired.", |m| {
            &m.paired
        }),
        (
            "hatch_data_bytes_client_to_agent_total",
            "counter",
            "Payload bytes forwarded from clients to agents.",
            |m| &m.bytes_c2a,
        ),
        (
            "hatch_data_bytes_agent_to_client_total",
            "counter",
            "Payload bytes forwarded from agents to clients.",
            |m| &m.bytes_a2c,
        ),
        ("hatch_data_frames_total", "counter", "WebSocket frames forwarded.", |m| &m.frames),
        (
            "hatch_data_handoffs_out_total",
            "counter",
            "Legs handed to the shard that holds their session.",
            |m| &m.handoffs_out,
        ),
        ("hatch_data_handoffs_in_total", "counter", "Legs taken over from another shard.", |m| {
            &m.handoffs_in
        }),
        (
            "hatch_data_buffers_in_use",
            "gauge",
            "Pooled buffers held by reads and writes in progress.",
            |m| &m.buffers,
        ),
    ];
    for (name, kind, help, f) in series {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (i, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", f(m).load(Relaxed));
        }
    }
    let _ = writeln!(
        out,
        "# HELP hatch_data_refusals_total Upgrade requests refused by the data plane, by reason."
    );
    let _ = writeln!(out, "# TYPE hatch_data_refusals_total counter");
    for (i, m) in shards.iter().enumerate() {
        for (j, label) in REFUSALS.iter().enumerate() {
            let _ = writeln!(
                out,
                "hatch_data_refusals_total{{shard=\"{i}\",reason=\"{label}\"}} {}",
                m.refusals[j].load(Relaxed)
            );
        }
    }
    let name = "hatch_data_forward_seconds";
    let _ =
        writeln!(out, "# HELP {name} Forward step: bytes read to write handed to the other leg.");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (i, m) in shards.iter().enumerate() {
        let h = &m.forward;
        // Read the buckets once; `_count` is their total, so `+Inf` always equals it even while
        // the shard records concurrently.
        let mut cum = 0u64;
        for (j, c) in h.counts.iter().enumerate() {
            cum += c.load(Relaxed);
            if j < BUCKETS {
                let le = (1u64 << j) as f64 / 1e6;
                let _ = writeln!(out, "{name}_bucket{{shard=\"{i}\",le=\"{le}\"}} {cum}");
            } else {
                let _ = writeln!(out, "{name}_bucket{{shard=\"{i}\",le=\"+Inf\"}} {cum}");
            }
        }
        let sum = h.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{shard=\"{i}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{shard=\"{i}\"}} {cum}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bucket_bounds_are_inclusive_log2_microseconds() {
        assert_eq!(Histogram::bucket(Duration::ZERO), 0);
        assert_eq!(Histogram::bucket(Duration::from_nanos(1000)), 0);
        assert_eq!(Histogram::bucket(Duration::from_nanos(1001)), 1);
        assert_eq!(Histogram::bucket(Duration::from_micros(2)), 1);
        assert_eq!(Histogram::bucket(Duration::from_micros(3)), 2);
        assert_eq!(Histogram::bucket(Duration::from_micros(1 << 20)), 20);
        assert_eq!(Histogram::bucket(Duration::from_micros((1 << 20) + 1)), BUCKETS);
        assert_eq!(Histogram::bucket(Duration::from_secs(3600)), BUCKETS);
    }
}
