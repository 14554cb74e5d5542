//! The load test end to end against its floor: real processes (echo server, client worker),
//! real TLS and WebSocket on loopback.

use std::process::Command;

fn loadtest() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hatch-loadtest"))
}

#[test]
fn floor_run_reports_round_trips_as_json() {
    let out = loadtest()
        .args(["--skip-relay", "--sessions", "20", "--ramp", "200", "--duration", "1", "--json"])
        .args(["--shards", "1", "-q"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sessions"], 20);
    let floor = &v["floor"];
    assert_eq!(floor["errors"], 0, "{v}");
    assert_eq!(floor["sessions_up"], 20);
    // 20 sessions at 10/s for 1 s: at most 10 each (a loaded machine may send fewer), and every
    // session measured at least one.
    let count = floor["count"].as_u64().unwrap();
    assert!((20..=200).contains(&count), "count {count}");
    let p50 = floor["p50_us"].as_u64().unwrap();
    let p99 = floor["p99_us"].as_u64().unwrap();
    assert!(p50 > 0 && p50 <= p99 && p99 <= floor["max_us"].as_u64().unwrap());
    assert!(v["relay"].is_null());
}

#[test]
fn throughput_mode_reports_megabytes_per_session() {
    let out = loadtest()
        .args(["--skip-relay", "--sessions", "2", "--duration", "1", "--mode", "throughput"])
        .args(["--payload", "4096", "--json", "-q", "--shards", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mbs = v["floor"]["throughput_mb_s_per_session"].as_f64().unwrap();
    assert!(mbs > 0.0, "{v}");
    assert_eq!(v["floor"]["errors"], 0);
}

#[test]
fn baseline_check_fails_naming_the_baseline_when_no_ratio_was_measured() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("baseline.json");
    std::fs::write(&base, r#"{"p99_ratio": 2.0, "note": "test"}"#).unwrap();
    let out = loadtest()
        .args(["--skip-relay", "--sessions", "1", "--duration", "0.5", "-q", "--shards", "1"])
        .arg("--baseline")
        .arg(&base)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("baseline 2.00"), "{err}");
}

#[test]
fn unreachable_external_relay_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let pki = hatch_relay::certs::ensure_dev_pki(dir.path(), &[]).unwrap();
    // Port 1 on loopback: nothing listens there.
    let out = loadtest()
        .args(["--skip-floor", "--sessions", "1", "--instances", "1", "--duration", "0.5", "-q"])
        .args(["--api", "https://127.0.0.1:1", "--access-key", "k", "--activation-id", "a"])
        .args(["--activation-code", "c", "--ca"])
        .arg(&pki.ca_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no simulated agent could register") && err.contains("connect"), "{err}");
}

#[test]
fn relay_run_reports_relay_floor_ratio_rss_and_cpu() {
    let out = loadtest()
        .args(["--sessions", "6", "--instances", "2", "--ramp", "100", "--duration", "1"])
        .args(["--json", "-q", "--shards", "1", "--io", "epoll"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["io"], "epoll");
    let relay = &v["relay"];
    assert_eq!(relay["errors"], 0, "{v}");
    assert_eq!(relay["sessions_up"], 6);
    assert!(relay["count"].as_u64().unwrap() >= 6, "{v}");
    assert!(v["p99_ratio"].as_f64().unwrap() > 0.0);
    assert!(v["relay_rss_bytes"].as_u64().unwrap() > 0);
    assert!(v["cpu_s_per_million_msgs"].as_f64().is_some());
    assert!(v["setup"]["sessions_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["setup"]["relay_cpu_us_per_session"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["errors_by_kind"], serde_json::json!({}));
    assert_eq!(v["transport"], "tls");
    // Every leg over TLS: one API call and one data leg per client session, one data leg per
    // agent session; none in plaintext.
    let c = &v["connections"];
    assert_eq!(count(c, "client.https_"), 6, "{c}");
    assert_eq!(count(c, "client.wss_"), 6, "{c}");
    assert_eq!(count(c, "agent.wss_"), 6 + 2, "{c}"); // + 2 control channels
    assert_eq!(count(c, "agent.https_"), 2, "{c}"); // registrations
    assert_eq!(count(c, "plain"), 0, "{c}");
    // Where a real client resumes: each client's data leg resumes its own API call's session,
    // each agent's control channel its registration's and its data legs one of those.
    assert_eq!(c["client.https_full"], 6, "{c}");
    assert_eq!(c["client.wss_resumed"], 6, "{c}");
    assert_eq!(c["agent.wss_resumed"], 6 + 2, "{c}");
}

/// The sum of the `connections` counts whose key contains `part`.
fn count(connections: &serde_json::Value, part: &str) -> u64 {
    connections
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.contains(part))
        .map(|(_, n)| n.as_u64().unwrap())
        .sum()
}

#[test]
fn danger_plaintext_runs_data_legs_and_floor_without_tls_and_the_api_with_it() {
    let out = loadtest()
        .args(["--sessions", "5", "--instances", "1", "--ramp", "100", "--duration", "1"])
        .args(["--json", "-q", "--shards", "1", "--danger-plaintext"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["transport"], "plaintext");
    assert_eq!(v["errors_by_kind"], serde_json::json!({}), "{v}");
    assert_eq!(v["relay"]["sessions_up"], 5, "{v}");
    assert_eq!(v["floor"]["sessions_up"], 5, "{v}");
    assert!(v["cpu_us_per_round_trip"].as_f64().is_some(), "{v}");
    let c = &v["connections"];
    assert_eq!(c["client.ws_plain"], 5, "{c}");
    assert_eq!(c["agent.ws_plain"], 5, "{c}");
    // The API and the control channel keep TLS.
    assert_eq!(count(c, "client.https_"), 5, "{c}");
    assert_eq!(count(c, "agent.wss_"), 1, "{c}");
    assert_eq!(count(c, "client.wss_"), 0, "{c}");
}

#[test]
fn pty_mode_echoes_through_cat() {
    let out = loadtest()
        .args(["--sessions", "2", "--instances", "1", "--duration", "1", "--mode", "pty"])
        .args(["--json", "-q", "--shards", "1", "--skip-floor"])
        .output()
        .unwrap();
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mode"], "pty");
    assert_eq!(v["relay"]["errors"], 0, "{v}");
    assert!(v["relay"]["count"].as_u64().unwrap() >= 2, "{v}");
    assert!(v["floor"].is_null() && v["p99_ratio"].is_null());
}

#[test]
fn baseline_check_fails_above_one_and_a_half_times_the_baseline_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("baseline.json");
    // No relay is 66 times faster than a direct echo: the measured ratio exceeds 1.5 × 0.01.
    std::fs::write(&base, r#"{"p99_ratio": 0.01}"#).unwrap();
    let out = loadtest()
        .args(["--sessions", "4", "--instances", "1", "--duration", "1", "-q", "--shards", "1"])
        .arg("--baseline")
        .arg(&base)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exceeds 1.5x the baseline's 0.01"), "{err}");
    // The report is still printed.
    assert!(String::from_utf8_lossy(&out.stdout).contains("p99 ratio relay/floor"));
}

/// `--chaos relay-restart` end to end, on one backend: the relay process is SIGKILLed mid-run
/// and started again; every session resumes and every echoed byte is checked.
fn chaos_relay_restart_loses_nothing(io: &str) {
    let out = loadtest()
        .args(["--sessions", "24", "--instances", "3", "--ramp", "100", "--duration", "3"])
        .args(["--chaos", "relay-restart", "--skip-floor", "--json", "-q", "--shards", "1"])
        .args(["--io", io])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{v}; stderr: {}", String::from_utf8_lossy(&out.stderr));
    let c = &v["chaos"];
    assert_eq!(c["scenario"], "relay-restart", "{c}");
    assert_eq!(c["sessions_live"], 24, "{c}");
    assert_eq!(c["sessions_lost"], 24, "{c}");
    assert_eq!(c["sessions_resumed"], 24, "{c}");
    assert_eq!(c["sessions_up_at_end"], 24, "{c}");
    assert!(c["bytes_sent"].as_u64().unwrap() > 0, "{c}");
    assert_eq!(c["bytes_lost"], 0, "{c}");
    assert_eq!(c["bytes_out_of_order"], 0, "{c}");
    assert!(c["relay_down_ms"].as_f64().unwrap() > 0.0, "{c}");
    let (p50, max) = (c["resume_p50_ms"].as_f64().unwrap(), c["resume_max_ms"].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= max, "{c}");
    // The chaos run reports no relay CPU: it would mix two processes.
    assert!(v["cpu_s_per_million_msgs"].is_null(), "{v}");
}

#[test]
fn chaos_relay_restart_on_epoll_resumes_every_session_and_loses_no_byte() {
    chaos_relay_restart_loses_nothing("epoll");
}

#[test]
fn chaos_relay_restart_on_io_uring_resumes_every_session_and_loses_no_byte() {
    chaos_relay_restart_loses_nothing("uring");
}

/// `--mode forward` end to end: port sessions through the relay with the real pump on both
/// ends, against direct loopback TCP. Only counts and checks are asserted, no timings.
#[test]
fn forward_mode_carries_every_connection_and_byte_and_measures_throughput() {
    let out = loadtest()
        .args(["--mode", "forward", "--connections", "50", "--sessions", "5", "--duration", "2"])
        .args(["--ramp", "100", "--json", "-q", "--shards", "1"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(out.status.success(), "{v}; stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(v["mode"], "forward");
    assert_eq!(v["errors_by_kind"], serde_json::json!({}), "{v}");
    let f = &v["forward"];
    assert_eq!(f["connections"], 50, "{f}");
    assert_eq!(f["sessions"], 5, "{f}");
    assert_eq!(f["floor"], "tcp", "{f}");
    assert_eq!(f["whole"], true, "{v}");
    for side in ["relay", "floor"] {
        let s = &v[side];
        assert_eq!(s["sessions_up"], 50, "{side}: {s}");
        assert_eq!(s["errors"], 0, "{side}: {s}");
        assert!(s["count"].as_u64().unwrap() >= 50, "{side}: {s}");
        let fs = &s["forward"];
        let sent = fs["bytes_sent"].as_u64().unwrap();
        assert!(sent >= 50 * 16, "{side}: {fs}");
        assert_eq!(fs["bytes_echoed"].as_u64().unwrap(), sent, "{side}: {fs}");
        assert_eq!(fs["bytes_out_of_order"], 0, "{side}: {fs}");
        assert_eq!(fs["streams_closed"], 50, "{side}: {fs}");
        for dir in ["upload", "download"] {
            let b = &fs[dir];
            assert_eq!(b["verified"], true, "{side} {dir}: {b}");
            assert_eq!(b["bad_bytes"], 0, "{side} {dir}: {b}");
            assert!(b["bytes"].as_u64().unwrap() > 0, "{side} {dir}: {b}");
            assert!(b["mb_s"].as_f64().unwrap() > 0.0, "{side} {dir}: {b}");
        }
    }
    // Every port session was ended by its client once its streams had ended.
    assert_eq!(v["relay"]["forward"]["sessions_closed"], 5, "{v}");
    assert!(f["upload_ratio"].as_f64().unwrap() > 0.0, "{f}");
    assert!(f["download_ratio"].as_f64().unwrap() > 0.0, "{f}");
    // Port sessions over TLS: one API call and one leg per session on each side.
    let c = &v["connections"];
    assert_eq!(count(c, "latency.client.https_"), 5, "{c}");
    assert_eq!(count(c, "latency.client.wss_"), 5, "{c}");
    assert_eq!(count(c, "plain"), 0, "{c}");
}
