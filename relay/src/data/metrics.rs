//! Per-shard counters, written only by their shard and read by `/metrics`.
//!
//! Relaxed atomics on a per-shard struct: the owning shard is the only writer, so they never
//! contend; the reader (the control plane's `/metrics`) tolerates a slightly stale view.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Refusal reasons counted (index into [`ShardMetrics::refusals`]).
pub const REFUSALS: [&str; 8] = [
    "invalid_token",
    "token_expired",
    "token_already_used",
    "bad_request",
    "head_too_large",
    "not_found",
    "unavailable",
    "handshake_failed",
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
    let series: [(&str, &str, Field); 9] = [
        ("hatch_data_connections_accepted_total", "counter", |m| &m.accepted),
        ("hatch_data_connections_open", "gauge", |m| &m.open),
        ("hatch_data_sessions_live", "gauge", |m| &m.sessions),
        ("hatch_data_sessions_paired_total", "counter", |m| &m.paired),
        ("hatch_data_bytes_client_to_agent_total", "counter", |m| &m.bytes_c2a),
        ("hatch_data_bytes_agent_to_client_total", "counter", |m| &m.bytes_a2c),
        ("hatch_data_frames_total", "counter", |m| &m.frames),
        ("hatch_data_handoffs_out_total", "counter", |m| &m.handoffs_out),
        ("hatch_data_handoffs_in_total", "counter", |m| &m.handoffs_in),
    ];
    for (name, kind, f) in series {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (i, m) in shards.iter().enumerate() {
            let _ = writeln!(out, "{name}{{shard=\"{i}\"}} {}", f(m).load(Relaxed));
        }
    }
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
    out
}
