//! Revocation reaches live sessions, with the real binaries: a user's `hatch exec` runs a
//! long command through `hatch-relay dev` and a real `hatch-agent`; then an operator revokes
//! the user's access key, detaches the policy that allowed the session, disables the user
//! with `hatch-relay admin` (another process, on the same store), attaches a deny-all policy
//! to them, or retags the instance out of what their policy allows. Each time the running
//! session ends within the relay's reconcile interval with close 4012, the CLI says so and
//! exits 77, and the record says `access_revoked`. Sessions of other callers keep running.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use hatch_e2e::*;

const ALLOW_ALL: &str =
    r#"{"Version":"1","Statement":{"Effect":"Allow","Action":"hatch:*","Resource":"*"}}"#;

/// Allows sessions only on instances tagged `team=blue`.
const BLUE_ONLY: &str = r#"{"Version":"1","Statement":{"Effect":"Allow","Action":"hatch:*",
    "Resource":"*","Condition":{"StringEquals":{"hatch:tag/team":"blue"}}}}"#;

/// A user with the allow-all policy attached; returns (key id, secret).
fn user(relay: &Relay, dir: &std::path::Path, name: &str) -> (String, String) {
    user_with(relay, dir, name, ALLOW_ALL)
}

/// A user with policy `doc` (named after them) attached; returns (key id, secret).
fn user_with(relay: &Relay, dir: &std::path::Path, name: &str, doc: &str) -> (String, String) {
    let account = relay.info.account_id.as_str();
    admin(relay, &["users", "create", "--account", account, name]);
    let k = admin(relay, &["keys", "create", "--account", account, "--user", name]);
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, doc).unwrap();
    admin(relay, &["policies", "put", "--account", account, name, file.to_str().unwrap()]);
    admin(relay, &["policies", "attach", "--account", account, "--user", name, name]);
    (k["key_id"].as_str().unwrap().to_owned(), k["access_key"].as_str().unwrap().to_owned())
}

/// `hatch exec` of a command that prints `started` and waits; returns once it printed.
fn long_exec(relay: &Relay, home: &std::path::Path, key: &str, instance: &str) -> Child {
    let mut cmd = hatch(relay, home, key);
    // -v: the start line (with the session id) on a piped stderr.
    cmd.args(["-v", "exec", "-i", instance, "--", "sh", "-c", "echo started; exec sleep 120"]);
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    child
}

/// Waits for `child` to exit (30 s at most; `what` names the case); its exit code and stderr.
fn finished(mut child: Child, what: &str) -> (Option<i32>, String) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (st.code(), err);
        }
        assert!(
            Instant::now() < end,
            "{what}: hatch exec still running after its access was revoked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The session id from the CLI's `Starting session s-...` line.
fn session_id(stderr: &str) -> String {
    let w = stderr.split_whitespace().find(|w| w.starts_with("s-")).expect("a session id");
    w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_keys_detached_policies_and_disabled_users_end_live_sessions() {
    let relay = Relay::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (_agent, iid) = start_agent(&relay, tmp.path(), &[]);
    wait_online(&relay, &iid, true).await;
    let account = relay.info.account_id.as_str();
    let home = tmp.path();

    // The owner's session runs through all of it.
    let owner = long_exec(&relay, home, &relay.info.access_key, &iid);

    let (key_id, key) = user(&relay, home, "alice");
    let (_, bob) = user(&relay, home, "bob");
    let (_, carol) = user(&relay, home, "carol");
    let (_, dave) = user(&relay, home, "dave");
    let (_, erin) = user_with(&relay, home, "erin", BLUE_ONLY);
    let deny_all = home.join("deny-all.json");
    std::fs::write(
        &deny_all,
        r#"{"Version":"1","Statement":{"Effect":"Deny","Action":"hatch:*","Resource":"*"}}"#,
    )
    .unwrap();
    let deny_all = deny_all.to_str().unwrap();
    admin(&relay, &["policies", "put", "--account", account, "deny-all", deny_all]);
    admin(&relay, &["instances", "tag", &iid, "team=blue"]);
    // Each case: what is done, the caller's key, the admin command that takes access away.
    let detach = ["policies", "detach", "--account", account, "--user", "bob", "bob"];
    let disable = ["users", "disable", "--account", account, "carol"];
    let quarantine = ["policies", "attach", "--account", account, "--user", "dave", "deny-all"];
    let retag = ["instances", "tag", iid.as_str(), "team=red"];
    // Each case also says whether to let the relay settle on the account first: the relay
    // looks at an account again on the first two looks after its IAM generation moved (the
    // users' setup above moved it), so a change that does not raise it is caught only by luck
    // within those ~4 s. Three reconcile intervals of quiet make such a change go unseen; the
    // wait can only hide a defect on a starved machine, never fail the test.
    let cases: [(&str, &str, Vec<&str>, bool); 5] = [
        ("key revoked", key.as_str(), vec!["keys", "revoke", &key_id], false),
        ("policy detached", bob.as_str(), detach.to_vec(), false),
        ("user disabled", carol.as_str(), disable.to_vec(), false),
        ("deny-all policy attached", dave.as_str(), quarantine.to_vec(), true),
        // Last: the instance keeps its new tags.
        ("instance retagged out of the policy", erin.as_str(), retag.to_vec(), true),
    ];
    for (what, key, revoke, settle) in cases {
        let child = long_exec(&relay, home, key, &iid);
        if settle {
            std::thread::sleep(Duration::from_secs(6));
        }
        admin(&relay, &revoke);
        let (code, err) = finished(child, what);
        assert_eq!(code, Some(77), "{what}: {err}");
        assert!(
            err.contains("AccessRevoked (close 4012): your access to this session was revoked"),
            "{what}: {err}"
        );
        let rec = relay.closed_session(&session_id(&err)).await;
        assert_eq!(rec["close_reason"], "access_revoked", "{what}: {rec}");
        // And the caller cannot start another one.
        let out =
            hatch(&relay, home, key).args(["exec", "-i", &iid, "--", "true"]).output().unwrap();
        assert_ne!(out.status.code(), Some(0), "{what}: a new session was allowed");
    }

    // The owner's session was not touched.
    let mut owner = owner;
    assert!(owner.try_wait().unwrap().is_none(), "the owner's session ended too");
    let _ = owner.kill();
}
