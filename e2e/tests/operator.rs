//! What an operator expects of the real `hatch-relay` (issue 19): a log written to a file
//! has no terminal escape codes, `--log-format json` writes one JSON object per line, and the
//! data directory, the store and the signing keys are readable by their owner only — also
//! when an older relay left them readable by everyone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hatch_e2e::*;
use nix::sys::signal::Signal;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode()
        & 0o777
}

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Every file the relay keeps secrets in, with the mode it must have.
fn private_paths(data_dir: &Path) -> Vec<(std::path::PathBuf, u32)> {
    let mut v = vec![
        (data_dir.to_owned(), 0o700),
        (data_dir.join("hatch.db"), 0o600),
        (data_dir.join("keys"), 0o700),
        (data_dir.join("tls/server-key.pem"), 0o600),
    ];
    for suffix in ["-wal", "-shm"] {
        let p = data_dir.join(format!("hatch.db{suffix}"));
        if p.exists() {
            v.push((p, 0o600));
        }
    }
    for k in std::fs::read_dir(data_dir.join("keys")).unwrap() {
        v.push((k.unwrap().path(), 0o600));
    }
    v
}

#[test]
fn the_store_and_the_keys_are_the_owners_only_and_made_so_on_start() {
    let relay = Relay::start(&[]);
    let dir = relay.data_dir.clone();
    let paths = private_paths(&dir);
    assert!(paths.len() >= 5, "{paths:?}");
    for (p, want) in &paths {
        assert_eq!(mode(p), *want, "{}", p.display());
    }
    // As an older relay (and a umask of 022) left them: readable by every local user.
    for (p, want) in &paths {
        chmod(p, if *want == 0o700 { 0o755 } else { 0o644 });
    }
    let relay = relay.restart();
    for (p, want) in private_paths(&dir) {
        assert_eq!(mode(&p), want, "{} after a restart", p.display());
    }
    assert!(relay.proc.output().contains("took group and other access away"));
}

#[test]
fn a_log_in_a_file_has_no_escape_codes() {
    let mut relay = Relay::start(&[]);
    relay.proc.signal(Signal::SIGTERM);
    assert!(relay.proc.wait_exit(DEADLINE).success());
    let log = relay.proc.output();
    assert!(log.contains("relay listening"), "{log}");
    assert!(!log.contains('\x1b'), "escape codes in the log:\n{log:?}");
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let tmp = tempfile::tempdir().unwrap();
    let err = tmp.path().join("relay.err");
    let mut cmd = Command::new(bin("hatch-relay"));
    cmd.args(["--log-format", "json", "dev", "--data-dir"]).arg(tmp.path().join("relay"));
    cmd.args(["--api-listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0", "--shards", "1"]);
    cmd.args(io_args()).env("HATCH_LOG", "info");
    // The banner of `dev` goes to stdout; the log is stderr.
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&err).unwrap());
    let mut proc = Proc { child: cmd.spawn().unwrap(), log: err.clone() };
    let end = Instant::now() + DEADLINE;
    while !proc.output().contains("relay listening") {
        assert!(Instant::now() < end, "no readiness line:\n{}", proc.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    proc.signal(Signal::SIGTERM);
    assert!(proc.wait_exit(DEADLINE).success(), "{}", proc.output());
    let log = proc.output();
    let mut messages = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line:?}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{line}");
        messages.push(v["fields"]["message"].as_str().unwrap_or_default().to_owned());
    }
    for want in ["relay listening", "stop requested; draining"] {
        assert!(messages.iter().any(|m| m == want), "no {want:?} in {messages:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_behind_a_token_refuse_a_scrape_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("metrics.token");
    std::fs::write(&token_file, "scrape-0123456789abcdef\n").unwrap();
    let relay = Relay::start(&["--metrics-token-file", token_file.to_str().unwrap()]);
    for key in [None, Some("scrape-0123456789abcdeX")] {
        let r = relay.call("GET", "/metrics", key, None).await;
        assert_eq!(r.status, 401, "{key:?}: {}", r.text);
        assert_eq!(r.json()["code"], "InvalidToken", "{}", r.text);
    }
    let r = relay.call("GET", "/metrics", Some("scrape-0123456789abcdef"), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Every family has its HELP and TYPE; the process families are there.
    let mut helped = std::collections::HashSet::new();
    for line in r.text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(helped.contains(name), "no HELP before TYPE of {name}");
        }
    }
    for family in [
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "hatch_sessions_active",
        "hatch_data_connections_open",
    ] {
        assert!(helped.contains(family), "no {family} in\n{}", r.text);
    }
}
