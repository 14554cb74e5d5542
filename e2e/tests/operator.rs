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

/// `systemd-analyze verify` on `unit` with its `/usr/local/bin/NAME` replaced by the built
/// binary (verify checks that the program exists): its exit status and what it said.
fn verify_unit(unit: &str, edit: impl Fn(String) -> String) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(unit);
    let name = src.file_name().unwrap().to_owned();
    let mut text = std::fs::read_to_string(&src).unwrap();
    for b in ["hatch-relay", "hatch-agent"] {
        text = text.replace(&format!("/usr/local/bin/{b}"), bin(b).to_str().unwrap());
    }
    let path = dir.path().join(name);
    std::fs::write(&path, edit(text)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd; scripts/test installs it)");
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.success(), said)
}

#[test]
fn both_unit_files_pass_systemd_analyze_verify() {
    for unit in ["relay/dist/hatch-relay.service", "agent/dist/hatch-agent.service"] {
        let (ok, said) = verify_unit(unit, |t| t);
        // A directive systemd does not know is only a warning: none is allowed.
        assert!(ok && said.trim().is_empty(), "{unit}: {said}");
        // The check can fail: a bad value is reported.
        let (_, said) = verify_unit(unit, |t| t.replace("Type=simple", "Type=bogus"));
        assert!(said.contains("bogus"), "{unit}: {said}");
    }
}

/// `hatch-relay admin --json ARGS` on `data_dir`; the JSON it printed.
fn admin_on(data_dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("hatch-relay"))
        .args(["admin", "--json", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "admin {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `hatch-relay serve` on `data_dir` with the given certificate, on `api` and `data`; waits for
/// its "API on" line and returns the process and the API address.
fn serve(data_dir: &Path, tls: &Path, api: &str, data: &str, log: &Path) -> (Proc, String) {
    let mut cmd = Command::new(bin("hatch-relay"));
    cmd.args(["serve", "--data-dir"]).arg(data_dir);
    cmd.arg("--cert").arg(tls.join("server.pem")).arg("--key").arg(tls.join("server-key.pem"));
    cmd.args(["--api-listen", api, "--data-listen", data, "--shards", "1"]).args(io_args());
    let before = std::fs::read_to_string(log).unwrap_or_default().matches("API on ").count();
    let proc = Proc::spawn(cmd, log);
    let end = Instant::now() + DEADLINE;
    loop {
        let out = proc.output();
        if out.matches("API on ").count() > before {
            let line = out.lines().rfind(|l| l.contains("API on ")).unwrap();
            let api = line.split("API on ").nth(1).unwrap().split(',').next().unwrap();
            return (proc, format!("https://{api}"));
        }
        assert!(Instant::now() < end, "serve did not start:\n{out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_operator_bootstraps_a_relay_runs_a_session_and_restores_a_backup() {
    // docs/OPERATIONS.md, "From an empty host to a first session" and "Backup and restore",
    // step by step with the real binaries. The certificate is the development PKI's (an
    // operator's comes from their CA).
    let tmp = tempfile::tempdir().unwrap();
    let pki = hatch_relay::certs::ensure_dev_pki(&tmp.path().join("tls"), &[]).unwrap();
    let tls = tmp.path().join("tls");
    let data = tmp.path().join("relay");
    let log = tmp.path().join("relay.log");
    let (mut relay, api) = serve(&data, &tls, "127.0.0.1:0", "127.0.0.1:0", &log);
    let data_addr = {
        let out = relay.output();
        let line = out.lines().rfind(|l| l.contains("data plane on ")).unwrap().to_owned();
        line.split("data plane on ").nth(1).unwrap().trim().to_owned()
    };
    // The first account, its owner key, an activation.
    let account =
        admin_on(&data, &["accounts", "create", "prod"])["id"].as_str().unwrap().to_owned();
    let key = admin_on(&data, &["keys", "create", "--account", &account]);
    let key = key["access_key"].as_str().unwrap().to_owned();
    let act =
        admin_on(&data, &["activations", "create", "--account", &account, "--region", "eu-1"]);
    // The agent registers and runs.
    let (id, code) =
        (act["activation_id"].as_str().unwrap(), act["activation_code"].as_str().unwrap());
    let (_agent, iid) = start_agent_with(&api, &pki.ca_file, id, code, tmp.path(), &[]);
    // A first session, as soon as the agent is online.
    let exec = |what: &str| {
        let out = Command::new(bin("hatch"))
            .env("HOME", tmp.path())
            .env("XDG_CONFIG_HOME", tmp.path())
            .env("HATCH_API", &api)
            .env("HATCH_CA", &pki.ca_file)
            .env("HATCH_ACCESS_KEY", &key)
            .args(["exec", "-i", &iid, "--", "echo", what])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let end = Instant::now() + DEADLINE;
    while exec("first") != (Some(0), "first\n".to_owned()) {
        assert!(Instant::now() < end, "no first session: {:?}", exec("first"));
        std::thread::sleep(Duration::from_millis(200));
    }
    // A backup while the relay runs; a user created after it.
    let backup = tmp.path().join("hatch-backup.db");
    admin_on(&data, &["backup", backup.to_str().unwrap()]);
    assert_eq!(mode(&backup), 0o600);
    admin_on(&data, &["users", "create", "--account", &account, "alice"]);
    let users = admin_on(&data, &["users", "list", "--account", &account]);
    assert_eq!(users.as_array().map(Vec::len), Some(1), "{users}");
    // Restore: stop the relay, put the copy in place of the store (without the old WAL),
    // start it again on the same addresses.
    relay.signal(Signal::SIGTERM);
    assert!(relay.wait_exit(DEADLINE).success());
    for f in ["hatch.db-wal", "hatch.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    std::fs::copy(&backup, data.join("hatch.db")).unwrap();
    let api_addr = api.trim_start_matches("https://").to_owned();
    let (_relay, _) = serve(&data, &tls, &api_addr, &data_addr, &log);
    let users = admin_on(&data, &["users", "list", "--account", &account]);
    assert_eq!(users.as_array().map(Vec::len), Some(0), "alice came after the backup: {users}");
    // The account, the key and the instance came back: the agent reconnects, sessions run.
    let end = Instant::now() + DEADLINE;
    while exec("restored") != (Some(0), "restored\n".to_owned()) {
        assert!(Instant::now() < end, "no session after the restore: {:?}", exec("restored"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_idle_timeout_ends_its_sessions_while_another_keeps_the_relays() {
    // The relay's idle timeout is 30 s; the demo account sets 2 s for itself (SSM's Session
    // Preferences), a second account sets nothing.
    let relay = Relay::start(&["--idle-timeout", "30"]);
    let home = tempfile::tempdir().unwrap();
    let (_agent_a, iid_a) = start_agent(&relay, home.path(), &[]);
    let key_a = relay.info.access_key.clone();
    let put = r#"{"idle_timeout_s": 2}"#;
    let r = relay.call("PUT", "/v1/account/settings", Some(&key_a), Some(put)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["idle_timeout_s"], 2, "{}", r.text);
    let r = relay
        .call("PUT", "/v1/account/settings", Some(&key_a), Some(r#"{"idle_timeout_s": 9999999}"#))
        .await;
    assert_eq!((r.status, r.json()["code"].as_str()), (400, Some("InvalidRequest")), "{}", r.text);
    let r = relay.call("GET", "/v1/account/settings", Some(&key_a), None).await;
    assert_eq!(r.json()["idle_timeout_s"], 2, "{}", r.text);

    // Account B: its own owner key, activation and agent.
    let b = admin(&relay, &["accounts", "create", "other"])["id"].as_str().unwrap().to_owned();
    let key_b = admin(&relay, &["keys", "create", "--account", &b])["access_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let act = admin(&relay, &["activations", "create", "--account", &b]);
    let dir_b = tempfile::tempdir().unwrap();
    let (id, code) =
        (act["activation_id"].as_str().unwrap(), act["activation_code"].as_str().unwrap());
    let ca = Path::new(&relay.info.ca_file);
    let (_agent_b, iid_b) = start_agent_with(&relay.info.api_url, ca, id, code, dir_b.path(), &[]);
    wait_online(&relay, &iid_a, true).await;

    // No input for longer than 2 s: A's session ends 4007 (exit 75); B's runs its 4 s out.
    let exec = |key: &str, iid: &str, secs: &str| {
        let mut cmd = hatch(&relay, home.path(), key);
        cmd.args(["exec", "-i", iid, "--", "sleep", secs]);
        cmd
    };
    let (mut a, mut b) = (exec(&key_a, &iid_a, "10"), exec(&key_b, &iid_b, "4"));
    let (a, b) = tokio::task::spawn_blocking(move || {
        let end = Instant::now() + DEADLINE;
        // B's agent may still be connecting: retry while its instance is not connected.
        let b = loop {
            let out = b.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.contains("TargetNotConnected") || Instant::now() > end {
                break out;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        (a.output().unwrap(), b)
    })
    .await
    .unwrap();
    let err_a = String::from_utf8_lossy(&a.stderr);
    assert_eq!(a.status.code(), Some(75), "{err_a}");
    assert!(err_a.contains("IdleTimeout (close 4007)"), "{err_a}");
    assert_eq!(b.status.code(), Some(0), "{}", String::from_utf8_lossy(&b.stderr));
}
