//! The audit log, with the real binaries: a scripted run through the API (an agent registers,
//! a session is started and terminated, a policy, a user and its key are made, the user is
//! refused a session and the audit log, the settings change, the key is revoked) leaves one
//! audit event per action, in order, with the caller, the outcome and the policy decision of
//! the refusals; `GET /v1/audit` pages through them, and `DATA_DIR/audit.log` holds the same
//! lines for an operator's log shipper.

use std::time::{Duration, Instant};

use hatch_e2e::*;
use serde_json::Value;

/// Allows everything but the audit log... and sessions, which are only allowed on instances
/// tagged `team=blue` (this one is not): the user's start is refused by policy.
const READ_ONLY: &str = r#"{"Version":"1","Statement":[
    {"Effect":"Allow","Action":["hatch:DescribeInstances","hatch:DescribeSessions"],"Resource":"*"},
    {"Effect":"Allow","Action":"hatch:StartSession","Resource":"*",
     "Condition":{"StringEquals":{"hatch:tag/team":"blue"}}}]}"#;

/// The account's audit events through the API, every page.
async fn events(relay: &Relay, key: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let path = match &next {
            Some(t) => format!("/v1/audit?limit=3&next_token={t}"),
            None => "/v1/audit?limit=3".to_owned(),
        };
        let r = relay.call("GET", &path, Some(key), None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let page = r.json();
        let evs = page["events"].as_array().unwrap().clone();
        assert!(evs.len() <= 3, "{page}");
        all.extend(evs);
        match page["next_token"].as_str() {
            Some(t) => next = Some(t.to_owned()),
            None => return all,
        }
    }
}

fn summary(e: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    (s(&e["action"]), s(&e["outcome"]), s(&e["caller"]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_of_a_scripted_run_has_one_audit_line() {
    let relay = Relay::start(&[]);
    let owner = relay.info.access_key.clone();
    let home = tempfile::tempdir().unwrap();
    let (mut agent, iid) = start_agent(&relay, home.path(), &[]);
    wait_online(&relay, &iid, true).await;

    // A session, end to end, then one terminated.
    let out = hatch(&relay, home.path(), &owner)
        .args(["exec", "-i", &iid, "--", "echo", "audited"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let body = format!(r#"{{"instance_id":"{iid}","mode":"shell"}}"#);
    let r = relay.call("POST", "/v1/sessions", Some(&owner), Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = r.json()["session_id"].as_str().unwrap().to_owned();
    let r = relay.call("DELETE", &format!("/v1/sessions/{sid}"), Some(&owner), None).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // A user whose policy refuses it a session here and the audit log.
    let r = relay.call("PUT", "/v1/policies/read-only", Some(&owner), Some(READ_ONLY)).await;
    assert!(r.status == 200 || r.status == 201, "{}", r.text);
    let r = relay.call("POST", "/v1/users", Some(&owner), Some(r#"{"name":"bob"}"#)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let bob_id = r.json()["user_id"].as_str().unwrap().to_owned();
    let r = relay.call("PUT", "/v1/users/bob/policies/read-only", Some(&owner), None).await;
    assert!(r.status == 200 || r.status == 204, "{}", r.text);
    let r = relay.call("POST", "/v1/access-keys", Some(&owner), Some(r#"{"user":"bob"}"#)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let (bob_key_id, bob_key) = (
        r.json()["access_key_id"].as_str().unwrap().to_owned(),
        r.json()["secret"].as_str().unwrap().to_owned(),
    );
    let r = relay.call("POST", "/v1/sessions", Some(&bob_key), Some(&body)).await;
    assert_eq!((r.status, r.json()["code"].clone()), (403, "AccessDenied".into()), "{}", r.text);
    let r = relay.call("GET", "/v1/audit", Some(&bob_key), None).await;
    assert_eq!((r.status, r.json()["code"].clone()), (403, "AccessDenied".into()), "{}", r.text);
    // Reads that are allowed leave no line.
    let r = relay.call("GET", "/v1/instances", Some(&bob_key), None).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Settings, then the key revoked; a request without a key at all.
    let r = relay
        .call("PUT", "/v1/account/settings", Some(&owner), Some(r#"{"idle_timeout_s":900}"#))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r =
        relay.call("DELETE", &format!("/v1/access-keys/{bob_key_id}"), Some(&owner), None).await;
    assert!(r.status == 200 || r.status == 204, "{}", r.text);
    let r = relay.call("POST", "/v1/sessions", None, Some(&body)).await;
    assert_eq!(r.status, 401, "{}", r.text);

    let evs = events(&relay, &owner).await;
    let got: Vec<(String, String, String)> = evs.iter().map(summary).collect();
    let o = |a: &str, out: &str, c: &str| (a.to_owned(), out.to_owned(), c.to_owned());
    assert_eq!(
        got,
        [
            o("hatch:RegisterInstance", "succeeded", "-"),
            o("hatch:StartSession", "succeeded", "owner"),
            o("hatch:StartSession", "succeeded", "owner"),
            o("hatch:TerminateSession", "succeeded", "owner"),
            o("hatch:PutPolicy", "succeeded", "owner"),
            o("hatch:CreateUser", "succeeded", "owner"),
            o("hatch:AttachUserPolicy", "succeeded", "owner"),
            o("hatch:CreateAccessKey", "succeeded", "owner"),
            o("hatch:StartSession", "denied", &bob_id),
            o("hatch:ReadAudit", "denied", &bob_id),
            o("hatch:UpdateAccountSettings", "succeeded", "owner"),
            o("hatch:DeleteAccessKey", "succeeded", "owner"),
        ],
        "{evs:#?}"
    );
    // What each says: the targets, the refusal's policy decision, the key, the source.
    assert_eq!(evs[0]["target"], iid.as_str());
    assert!(evs[1]["target"].as_str().unwrap().starts_with(&format!("{iid} session s-")));
    assert_eq!(evs[3]["target"], sid.as_str());
    assert_eq!(evs[6]["target"], "bob/policies/read-only");
    let denied = &evs[8];
    assert_eq!(
        (denied["status"].as_u64(), denied["code"].as_str()),
        (Some(403), Some("AccessDenied"))
    );
    assert_eq!(denied["access_key_id"], bob_key_id.as_str());
    let why = denied["message"].as_str().unwrap();
    assert!(why.contains("hatch:StartSession") && why.contains(&iid), "{why}");
    assert_eq!(evs[11]["target"], bob_key_id.as_str());
    for e in &evs {
        assert_eq!(e["account"], relay.info.account_id.as_str(), "{e}");
        assert_eq!(e["source_ip"], "127.0.0.1", "{e}");
        assert!(e["request_id"].as_str().unwrap().starts_with("req-"), "{e}");
        assert!(e["time"].as_str().unwrap().ends_with('Z'), "{e}");
    }
    let ids: std::collections::HashSet<&str> =
        evs.iter().map(|e| e["request_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), evs.len(), "request ids are unique");
    // `since` in the future: nothing; a malformed one: 400.
    let r = relay.call("GET", "/v1/audit?since=2999-01-01T00:00:00Z", Some(&owner), None).await;
    assert_eq!(r.json()["events"].as_array().map(Vec::len), Some(0), "{}", r.text);
    let r = relay.call("GET", "/v1/audit?since=yesterday", Some(&owner), None).await;
    assert_eq!((r.status, r.json()["code"].clone()), (400, "InvalidRequest".into()), "{}", r.text);

    // The file: the same events (and the unauthenticated request, which has no account).
    let path = relay.data_dir.join("audit.log");
    let end = Instant::now() + DEADLINE;
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<Value> =
            text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
        if lines.len() > evs.len() || Instant::now() > end {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let of_account: Vec<&Value> =
        lines.iter().filter(|l| l["account"] == relay.info.account_id.as_str()).collect();
    assert_eq!(of_account, evs.iter().collect::<Vec<_>>());
    let anonymous: Vec<&Value> = lines.iter().filter(|l| l["account"].is_null()).collect();
    assert_eq!(anonymous.len(), 1, "{lines:#?}");
    assert_eq!(summary(anonymous[0]), o("hatch:StartSession", "unauthenticated", "-"));

    // A user allowed hatch:ReadAudit reads it too.
    let auditor = r#"{"Version":"1","Statement":{"Effect":"Allow","Action":"hatch:ReadAudit",
        "Resource":"hrn:hatch::*:audit/*"}}"#;
    let r = relay.call("PUT", "/v1/policies/auditor", Some(&owner), Some(auditor)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    relay.call("POST", "/v1/users", Some(&owner), Some(r#"{"name":"carol"}"#)).await;
    relay.call("PUT", "/v1/users/carol/policies/auditor", Some(&owner), None).await;
    let r = relay.call("POST", "/v1/access-keys", Some(&owner), Some(r#"{"user":"carol"}"#)).await;
    let carol = r.json()["secret"].as_str().unwrap().to_owned();
    let seen = events(&relay, &carol).await;
    assert_eq!(seen[..evs.len()], evs[..]);
    assert_eq!(summary(seen.last().unwrap()).0, "hatch:CreateAccessKey");

    // `hatch audit`: the same events as JSON lines, or a table.
    let out = hatch(&relay, home.path(), &carol).args(["audit", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, seen);
    let out = hatch(&relay, home.path(), &owner)
        .args(["audit", "--since", "2000-01-01T00:00:00Z"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(table.starts_with("TIME"), "{table}");
    let denied_row = table.lines().find(|l| l.contains("denied")).expect("a denied row");
    assert!(denied_row.contains("hatch:StartSession") && denied_row.contains(&bob_id), "{table}");

    agent.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(agent.wait_exit(DEADLINE).success());
}
