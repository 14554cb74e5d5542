//! Three relay nodes on one PostgreSQL store, with the real binaries (docs/OPERATIONS.md
//! "A fleet"): a session started through node A's API on an agent connected to node B runs end
//! to end; a terminate through node C ends it; the account switch through C ends live sessions
//! on every node; the open-session limits count across nodes; and when B is killed its agent
//! fails over to C and serves a new session, while a surviving node, once B's heartbeat
//! expired, closes B's unpaired session as `node_lost` and takes its live one over, which
//! resumes there and runs to its end. The server is a throwaway cluster
//! (`hatch-pgtest`): the test fails, never skips, when it cannot start.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use hatch_e2e::*;
use serde_json::Value;

/// The instance's `online` as `relay` lists it to the caller with `key`.
async fn online_via(relay: &Relay, key: &str, iid: &str) -> bool {
    let r = relay.call("GET", "/v1/instances", Some(key), None).await;
    r.json()["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|i| i["instance_id"] == iid && i["online"] == true)
}

async fn wait_online_via(relay: &Relay, key: &str, iid: &str) {
    let end = Instant::now() + Duration::from_secs(40);
    while !online_via(relay, key, iid).await {
        assert!(Instant::now() < end, "instance {iid} never online through {}", relay.info.api_url);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `hatch exec -i IID -- sleep 60` through `relay`, running.
fn long_session(relay: &Relay, home: &Path, key: &str, iid: &str) -> Child {
    hatch(relay, home, key)
        .args(["exec", "-i", iid, "--", "sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the account has no open session: the record of one that just ended is closed
/// by its node a moment after its user saw the end, and a test that looked for "the"
/// connected session before then could pick the old one.
async fn no_open_sessions(relay: &Relay, key: &str) {
    let end = Instant::now() + DEADLINE;
    loop {
        let r = relay.call("GET", "/v1/sessions?state=active", Some(key), None).await;
        if r.json()["sessions"].as_array().is_some_and(|s| s.is_empty()) {
            return;
        }
        assert!(Instant::now() < end, "sessions still open: {}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The one connected session of the account, once there is one.
async fn connected_session(relay: &Relay, key: &str) -> String {
    let end = Instant::now() + DEADLINE;
    loop {
        let r = relay.call("GET", "/v1/sessions?state=active", Some(key), None).await;
        let connected: Vec<Value> = r.json()["sessions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["state"] == "connected")
            .cloned()
            .collect();
        if let [one] = connected.as_slice() {
            return one["session_id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < end, "no single connected session: {}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn closed(relay: &Relay, key: &str, sid: &str) -> Value {
    let end = Instant::now() + DEADLINE;
    loop {
        let r = relay.call("GET", &format!("/v1/sessions/{sid}"), Some(key), None).await;
        if r.json()["state"] == "closed" {
            return r.json();
        }
        assert!(Instant::now() < end, "session {sid} not closed: {}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `child` to exit; its exit code, standard output and standard error.
fn exited_with_output(mut child: Child) -> (Option<i32>, String, String) {
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).map(|_| s)
    });
    let (code, err) = exited(child);
    (code, reader.join().unwrap().unwrap(), err)
}

/// Waits for `child` to exit; its exit code and standard error.
fn exited(mut child: Child) -> (Option<i32>, String) {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (st.code(), err);
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("hatch did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_postgresql() {
    let url =
        tokio::task::spawn_blocking(|| hatch_pgtest::shared().fresh_database()).await.unwrap();
    let flags =
        ["--store", url.as_str(), "--node-timeout", "3", "--max-sessions-per-instance", "2"];
    let a = Relay::start(&flags);
    let b = Relay::start_sharing_tls(&a, &flags);
    let c = Relay::start_sharing_tls(&a, &flags);
    let key = a.info.access_key.clone();
    let home = tempfile::tempdir().unwrap();
    let ca = Path::new(&a.info.ca_file);
    // Registered through B, connected to B; C is its second API.
    let (mut agent, iid) = start_agent_with(
        &b.info.api_url,
        ca,
        &a.info.activation_id,
        &a.info.activation_code,
        home.path(),
        &["--api", &b.info.api_url, "--api", &c.info.api_url],
    );
    // A and C see it online through the store.
    wait_online_via(&b, &key, &iid).await;
    wait_online_via(&a, &key, &iid).await;
    wait_online_via(&c, &key, &iid).await;

    // Started through A, placed on B (the agent's node), end to end.
    let out = hatch(&a, home.path(), &key)
        .args(["exec", "-i", &iid, "--", "echo", "across nodes"])
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()),
        (Some(0), "across nodes\n"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(a.proc.output().contains("session started on another node"), "{}", a.proc.output());
    assert!(b.proc.output().contains("session placed here by another node handed to its agent"));

    // Terminated through C: the session on B ends, its user sees 4006.
    no_open_sessions(&a, &key).await;
    let live = long_session(&a, home.path(), &key, &iid);
    let sid = connected_session(&a, &key).await;
    let r = c.call("DELETE", &format!("/v1/sessions/{sid}"), Some(&key), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (code, err) = exited(live);
    assert_eq!(code, Some(255), "{err}");
    assert!(err.contains("4006"), "{err}");
    assert_eq!(closed(&a, &key, &sid).await["close_reason"], "terminated");

    // The limits count across nodes: two open sessions on the instance (one started through
    // A, one through C) and the third, through B, is refused.
    let body = format!(r#"{{"instance_id":"{iid}","mode":"shell"}}"#);
    let mut pending = Vec::new();
    for node in [&a, &c] {
        let r = node.call("POST", "/v1/sessions", Some(&key), Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        pending.push(r.json()["session_id"].as_str().unwrap().to_owned());
    }
    let r = b.call("POST", "/v1/sessions", Some(&key), Some(&body)).await;
    assert_eq!((r.status, r.json()["code"].clone()), (429, "Throttled".into()), "{}", r.text);
    for sid in &pending {
        let r = b.call("DELETE", &format!("/v1/sessions/{sid}"), Some(&key), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }

    // The account switch through C ends a live session on B.
    no_open_sessions(&a, &key).await;
    let live = long_session(&a, home.path(), &key, &iid);
    let sid = connected_session(&a, &key).await;
    let off = r#"{"session_manager_enabled":false}"#;
    let r = c.call("PUT", "/v1/account/settings", Some(&key), Some(off)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (code, err) = exited(live);
    // EX_NOPERM, as for a start the switch refuses (docs/CLI.md).
    assert_eq!(code, Some(77), "{err}");
    assert!(err.contains("4010"), "{err}");
    assert_eq!(closed(&b, &key, &sid).await["close_reason"], "terminated");
    let on = r#"{"session_manager_enabled":true}"#;
    let r = a.call("PUT", "/v1/account/settings", Some(&key), Some(on)).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // B dies with a live session and one that never paired: its agent fails over to C and
    // serves a new session started through A; a survivor expires B, closes the unpaired
    // session as node_lost and takes the live one over, whose legs resume there and which
    // runs to its end (the output after the kill arrives, exit 0).
    no_open_sessions(&a, &key).await;
    let live = hatch(&a, home.path(), &key)
        .args(["exec", "-i", &iid, "--", "sh", "-c", "echo before; sleep 8; echo survived"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sid = connected_session(&a, &key).await;
    let r = a.call("POST", "/v1/sessions", Some(&key), Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let unpaired = r.json()["session_id"].as_str().unwrap().to_owned();
    let killed = Instant::now();
    b.proc.signal(nix::sys::signal::Signal::SIGKILL);
    let end = Instant::now() + DEADLINE;
    loop {
        let out = hatch(&a, home.path(), &key)
            .args(["exec", "-i", &iid, "--", "echo", "after failover"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout) == "after failover\n" {
            break;
        }
        assert!(
            Instant::now() < end,
            "no session after B died: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lost = closed(&a, &key, &unpaired).await;
    assert_eq!(lost["close_reason"], "node_lost", "{lost}");
    assert!(killed.elapsed() < Duration::from_secs(20), "{:?}", killed.elapsed());
    let (code, out, err) = exited_with_output(live);
    assert_eq!((code, out.as_str()), (Some(0), "before\nsurvived\n"), "{err}");
    let ended = closed(&c, &key, &sid).await;
    assert_eq!(ended["close_reason"], "exit", "{ended}");
    let log = a.proc.output() + &c.proc.output();
    assert!(log.contains("session of a dead node taken over"), "{log}");
    assert!(
        agent.output().contains("trying the next API URL")
            || agent.output().contains(&c.info.api_url),
        "{}",
        agent.output()
    );
    let log = a.proc.output() + &c.proc.output();
    assert!(log.contains("relay node stopped heartbeating"), "{log}");
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).success());
}
