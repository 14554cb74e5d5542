//! The relay on a PostgreSQL store (`--store postgres://...`), with the real binaries: a
//! session runs and is recorded, `hatch-relay admin --store` works on the same database while
//! the relay runs, and a restarted relay finds its account, keys and instance there. The
//! server is a throwaway cluster this test starts (`hatch-pgtest`); the test fails, never
//! skips, when it cannot start.

use std::process::Command;
use std::time::{Duration, Instant};

use hatch_e2e::{DEADLINE, Relay, bin, hatch, start_agent, wait_online};

/// `hatch-relay admin --json --store URL ARGS`; the JSON it printed.
fn admin_pg(relay: &Relay, url: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("hatch-relay"))
        .args(["admin", "--json", "--store", url, "--data-dir"])
        .arg(&relay.data_dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "admin {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn exec_echo(
    relay: &Relay,
    home: &std::path::Path,
    iid: &str,
    what: &str,
) -> (Option<i32>, String) {
    let out = hatch(relay, home, &relay.info.access_key)
        .args(["exec", "-i", iid, "--", "echo", what])
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_postgresql_runs_sessions_and_keeps_them_across_a_restart() {
    // The harness's client is synchronous: off the test's async threads.
    let url =
        tokio::task::spawn_blocking(|| hatch_pgtest::shared().fresh_database()).await.unwrap();
    let relay = Relay::start(&["--store", &url]);
    // Nothing of the store is in the data directory: it is all in PostgreSQL.
    assert!(!relay.data_dir.join("hatch.db").exists());
    let home = tempfile::tempdir().unwrap();
    let (_agent, iid) = start_agent(&relay, home.path(), &[]);
    wait_online(&relay, &iid, true).await;
    let (code, out) = exec_echo(&relay, home.path(), &iid, "on postgres");
    assert_eq!((code, out.as_str()), (Some(0), "on postgres\n"));

    // The session's record, as the API reads it back from PostgreSQL.
    // The relay records the end just after `hatch` saw it: polled, not read once.
    let key = relay.info.access_key.clone();
    let end = Instant::now() + DEADLINE;
    let (r, sessions) = loop {
        let r = relay.call("GET", "/v1/sessions?state=closed", Some(&key), None).await;
        let sessions = r.json()["sessions"].as_array().unwrap().clone();
        if !sessions.is_empty() || Instant::now() > end {
            break (r, sessions);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(sessions.len(), 1, "{}", r.text);
    assert_eq!(sessions[0]["close_reason"], "exit", "{}", r.text);
    assert_eq!(sessions[0]["mode"], "exec", "{}", r.text);

    // The operator's admin commands reach the same database while the relay runs.
    let account = relay.info.account_id.clone();
    admin_pg(&relay, &url, &["users", "create", "--account", &account, "alice"]);
    let r = relay.call("GET", "/v1/users", Some(&key), None).await;
    assert_eq!(r.json()["users"][0]["name"], "alice", "{}", r.text);
    // Backups of a PostgreSQL store are pg_dump's: admin says so instead of copying nothing.
    let out = Command::new(bin("hatch-relay"))
        .args(["admin", "--store", &url, "--data-dir"])
        .arg(&relay.data_dir)
        .args(["backup", "/nonexistent/b.db"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pg_dump"), "{out:?}");

    // Restarted, the relay finds the account, the key and the instance in the database.
    let relay = relay.restart();
    assert_eq!(relay.info.access_key, key, "the demo account and its key were kept");
    wait_online(&relay, &iid, true).await;
    let end = Instant::now() + DEADLINE;
    while exec_echo(&relay, home.path(), &iid, "again") != (Some(0), "again\n".to_owned()) {
        assert!(Instant::now() < end, "no session after the restart");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The client has its exit status before the relay has recorded the close: poll.
    let end = Instant::now() + DEADLINE;
    loop {
        let r = relay.call("GET", "/v1/sessions?state=closed", Some(&key), None).await;
        if r.json()["sessions"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(Instant::now() < end, "two closed sessions never listed: {}", r.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn a_store_url_that_is_not_postgres_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin("hatch-relay"))
        .args(["admin", "--store", "mysql://u:pw@h/db", "--data-dir"])
        .arg(dir.path())
        .args(["accounts", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a postgres:// URL"), "{err}");
    assert!(!err.contains("pw@"), "the password is never printed: {err}");
}
