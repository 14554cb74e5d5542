//! Whom a session runs as, with the real binaries: `hatch-relay dev`, two `hatch-agent run`
//! processes (one as itself, one with `--default-user nobody`), `hatch-relay admin` for the
//! user, key and policy, and `hatch exec` as that user.
//!
//! The policy is the first example of `docs/POLICY.md` (Allow on `env=dev` instances, Deny on
//! `hatch:RunAs` = `root`). Before the agent announced its default user, a session that named
//! no user was evaluated with `hatch:RunAs` absent, the Deny did not apply, and the agent (root)
//! ran the command as root.

use std::process::Output;

use hatch_e2e::*;

/// The example of docs/POLICY.md that denies running as root (the first ```json block under
/// "Examples").
fn policy_md_example() -> &'static str {
    let doc = include_str!("../../docs/POLICY.md");
    let examples = doc.split("## Examples").nth(1).expect("POLICY.md has examples");
    let block = examples.split("```json").nth(1).expect("an example");
    let json = block.split("```").next().unwrap();
    assert!(json.contains(r#""hatch:RunAs": "root""#), "{json}");
    json
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn exec_as(
    relay: &Relay,
    home: &std::path::Path,
    key: &str,
    instance: &str,
    user: Option<&str>,
) -> Output {
    let mut cmd = hatch(relay, home, key);
    cmd.args(["exec", "-i", instance]);
    if let Some(u) = user {
        cmd.args(["--user", u]);
    }
    cmd.args(["--", "id", "-un"]).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_on_run_as_root_holds_when_no_user_is_named() {
    let relay = Relay::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (own_dir, nobody_dir) = (tmp.path().join("own"), tmp.path().join("nobody"));
    std::fs::create_dir_all(&own_dir).unwrap();
    std::fs::create_dir_all(&nobody_dir).unwrap();
    let (_own_agent, own) = start_agent(&relay, &own_dir, &[]);
    let (_nobody_agent, nobody) = start_agent(&relay, &nobody_dir, &["--default-user", "nobody"]);
    wait_online(&relay, &own, true).await;
    wait_online(&relay, &nobody, true).await;

    let account = relay.info.account_id.as_str();
    for iid in [&own, &nobody] {
        admin(&relay, &["instances", "tag", iid, "env=dev"]);
    }
    admin(&relay, &["users", "create", "--account", account, "alice"]);
    let key = admin(&relay, &["keys", "create", "--account", account, "--user", "alice"]);
    let key = key["access_key"].as_str().unwrap().to_owned();
    let file = tmp.path().join("dev-not-root.json");
    std::fs::write(&file, policy_md_example()).unwrap();
    admin(
        &relay,
        &["policies", "put", "--account", account, "dev-not-root", file.to_str().unwrap()],
    );
    admin(&relay, &["policies", "attach", "--account", account, "--user", "alice", "dev-not-root"]);

    let home = tmp.path();
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().name;
    if me == "root" {
        // No --user on an agent that runs as root: the session would run as root, which the
        // policy denies.
        let out = exec_as(&relay, home, &key, &own, None);
        assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "");
        let err = text(&out.stderr);
        assert!(err.starts_with("hatch: AccessDenied: your policy does not allow"), "{err}");
        // Naming root is denied the same way.
        let out = exec_as(&relay, home, &key, &nobody, Some("root"));
        assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
        // Another user is allowed, and the command runs as that user.
        let out = exec_as(&relay, home, &key, &own, Some("nobody"));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "nobody\n");
    } else {
        eprintln!("*** not root: the agent's own user is {me}; the root cases are not run");
    }

    // The agent started with --default-user nobody runs a session that names no user as
    // nobody, and the record says so.
    let out = exec_as(&relay, home, &key, &nobody, None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "nobody\n");
    let r =
        relay.call("GET", "/v1/sessions?state=closed", Some(&relay.info.access_key), None).await;
    let sessions = r.json()["sessions"].as_array().cloned().unwrap_or_default();
    let last = sessions
        .iter()
        .filter(|s| s["instance_id"] == nobody.as_str())
        .max_by_key(|s| s["created_at"].as_str().unwrap_or("").to_owned())
        .unwrap_or_else(|| panic!("no session on {nobody}: {}", r.text));
    assert_eq!(last["run_as"], "nobody", "{last}");

    // An agent whose --default-user does not exist refuses to start, saying why.
    let out = std::process::Command::new(bin("hatch-agent"))
        .args(["run", "--state"])
        .arg(nobody_dir.join("agent.json"))
        .args(["--default-user", "no-such-user-hatch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("\"no-such-user-hatch\" does not exist"),
        "{}",
        text(&out.stderr)
    );
}
