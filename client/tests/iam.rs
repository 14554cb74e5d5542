//! The IAM commands (`account`, `users`, `keys`, `policies`, `activations`, `instances tag |
//! deregister | revoke-secret`) as the real `hatch` binary runs them against a real HTTPS
//! server on loopback: each sends the method, path and body the relay's API takes, prints a
//! line or a table for a person and the relay's JSON with `--json`, shows a new secret once,
//! and the IAM error codes give their exit codes and next steps. `tests/e2e.rs` runs the same
//! commands against the real relay.

mod support;

use std::sync::Arc;

use serde_json::{Value, json};
use support::{TestApi, hatch, run, stderr, stdout};

const INSTANCE: &str = "i-0123456789abcdef";

fn user(policies: &[&str]) -> Value {
    json!({"user_id": "u-00000000000000a1", "name": "alice", "created_at": "2020-01-01T00:00:00Z",
           "policies": policies})
}

fn key(user: Option<&str>, secret: bool) -> Value {
    let mut k =
        json!({"access_key_id": "ak-00000000000000a1", "created_at": "2020-01-01T00:00:00Z"});
    if let Some(u) = user {
        k["user"] = u.into();
    }
    if secret {
        k["secret"] = "hk_00000000000000a1_secret".into();
    }
    k
}

fn policy() -> Value {
    json!({"name": "read-only", "updated_at": "2020-01-01T00:00:00Z", "attached_to": ["alice"],
           "document": {"Statement": {"Effect": "Allow", "Action": "hatch:ListUsers",
                                      "Resource": "*"}}})
}

fn activation(code: bool) -> Value {
    let mut a = json!({"activation_id": "act-00000000000000a1", "region": "eu-1",
        "tags": {"env": "dev"}, "max_registrations": 3, "registrations": 0,
        "expires_at": "2999-01-01T00:00:00Z", "created_at": "2020-01-01T00:00:00Z"});
    if code {
        a["activation_code"] = "hac_code".into();
    }
    a
}

fn instance(tags: Value) -> Value {
    json!({"instance_id": INSTANCE, "region": "eu-1", "tags": tags, "online": false})
}

/// A relay that answers every IAM route as the API describes it.
fn relay() -> support::Handler {
    Arc::new(|method, path| match (method, path) {
        ("GET", "/v1/account/settings") => (200, json!({"session_manager_enabled": true})),
        ("PUT", "/v1/account/settings") => {
            (200, json!({"session_manager_enabled": false, "idle_timeout_s": 600}))
        }
        ("GET", "/v1/users") => (200, json!({"users": [user(&["read-only"])]})),
        ("POST", "/v1/users") => (201, user(&[])),
        ("DELETE", "/v1/users/alice") => (200, user(&[])),
        ("PUT", "/v1/users/alice/policies/read-only") => (200, user(&["read-only"])),
        ("DELETE", "/v1/users/alice/policies/read-only") => (200, user(&[])),
        ("GET", "/v1/access-keys?user=alice") => {
            (200, json!({"access_keys": [key(Some("alice"), false)]}))
        }
        ("GET", "/v1/access-keys") => (200, json!({"access_keys": [key(None, false)]})),
        ("POST", "/v1/access-keys") => (201, key(Some("alice"), true)),
        ("DELETE", "/v1/access-keys/ak-00000000000000a1") => (200, key(Some("alice"), false)),
        ("GET", "/v1/policies") => (200, json!({"policies": [policy()]})),
        ("PUT", "/v1/policies/read-only") => (200, policy()),
        ("DELETE", "/v1/policies/read-only") => (
            409,
            json!({"code": "DeleteConflict", "message": "policy read-only is attached to alice"}),
        ),
        ("PUT", p) if p == format!("/v1/instances/{INSTANCE}/tags") => {
            (200, instance(json!({"env": "prod", "role": "web"})))
        }
        ("DELETE", p) if p == format!("/v1/instances/{INSTANCE}") => (200, instance(json!({}))),
        ("POST", p) if p == format!("/v1/instances/{INSTANCE}/revoke-secret") => {
            (200, instance(json!({})))
        }
        ("GET", "/v1/activations") => (200, json!({"activations": [activation(false)]})),
        ("POST", "/v1/activations") => (201, activation(true)),
        ("DELETE", "/v1/activations/act-00000000000000a1") => (200, activation(false)),
        _ => (404, json!({"code": "NotFound", "message": "no such path"})),
    })
}

fn call(api: &TestApi, home: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = hatch(home);
    cmd.env("HATCH_API", &api.url)
        .env("HATCH_ACCESS_KEY", "key-1")
        .env("HATCH_CA", &api.ca_file)
        .args(args);
    run(cmd)
}

/// The last request the server saw: method, path and body as JSON (`null` when empty).
fn last(api: &TestApi) -> (String, String, Value) {
    let seen = api.seen().pop().expect("a request was sent");
    assert_eq!(seen.authorization.as_deref(), Some("Bearer key-1"));
    let body = if seen.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&seen.body).expect("the body is JSON")
    };
    (seen.method, seen.path, body)
}

fn ok(out: &std::process::Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    stdout(out)
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_str(&ok(out)).expect("--json prints JSON")
}

#[test]
fn every_command_sends_its_request_and_prints_for_people_and_scripts() {
    let home = tempfile::tempdir().unwrap();
    let api = TestApi::start(relay());
    let go = |args: &[&str]| call(&api, home.path(), args);

    // The account.
    assert_eq!(
        ok(&go(&["account", "show"])),
        "session manager  on\nidle timeout     the relay's (--idle-timeout)\n\
         max duration     the relay's (--max-duration)\nrecording        off\n"
    );
    assert_eq!(last(&api), ("GET".into(), "/v1/account/settings".into(), Value::Null));
    let out = go(&["account", "switch", "off"]);
    assert_eq!(
        ok(&out),
        "Session manager off: no session can start, and the live ones were ended\n"
    );
    assert_eq!(last(&api).2, json!({"session_manager_enabled": false}));
    let v = json_of(&go(&["account", "switch", "on", "--json"]));
    assert_eq!(v["session_manager_enabled"], false, "the relay's answer, as it is");
    assert_eq!(last(&api).2, json!({"session_manager_enabled": true}));
    let out = go(&["account", "prefs", "--idle-timeout", "600", "--max-duration", "0"]);
    assert!(ok(&out).contains("idle timeout     600 s\n"), "{}", stdout(&out));
    assert_eq!(
        last(&api),
        (
            "PUT".into(),
            "/v1/account/settings".into(),
            json!({"idle_timeout_s": 600, "max_duration_s": 0})
        )
    );
    ok(&go(&["account", "prefs"]));
    assert_eq!(last(&api).0, "GET", "prefs without a flag only shows them");

    // Users.
    let table = ok(&go(&["users", "list"]));
    assert!(table.starts_with("USER   ID                  POLICIES   CREATED"), "{table}");
    assert!(table.contains("\nalice  u-00000000000000a1  read-only  "), "{table}");
    assert_eq!(json_of(&go(&["users", "list", "--json"]))["users"][0]["name"], "alice");
    assert_eq!(ok(&go(&["users", "create", "alice"])), "Created user alice (u-00000000000000a1)\n");
    assert_eq!(last(&api), ("POST".into(), "/v1/users".into(), json!({"name": "alice"})));
    assert_eq!(
        json_of(&go(&["users", "create", "alice", "--json"]))["user_id"],
        "u-00000000000000a1"
    );
    assert_eq!(
        ok(&go(&["users", "attach", "alice", "read-only"])),
        "Attached policy read-only to user alice (its policies: read-only)\n"
    );
    let (method, path, _) = last(&api);
    assert_eq!((method.as_str(), path.as_str()), ("PUT", "/v1/users/alice/policies/read-only"));
    assert_eq!(
        ok(&go(&["users", "detach", "alice", "read-only"])),
        "Detached policy read-only from user alice\n"
    );
    assert_eq!(last(&api).0, "DELETE");
    assert_eq!(json_of(&go(&["users", "delete", "alice", "--json"]))["name"], "alice");
    assert_eq!(last(&api), ("DELETE".into(), "/v1/users/alice".into(), Value::Null));

    // Access keys: the secret once, on stdout; the warning on stderr.
    let out = go(&["keys", "create", "--user", "alice"]);
    assert_eq!(
        ok(&out),
        "access_key_id  ak-00000000000000a1\nsecret         hk_00000000000000a1_secret\n"
    );
    assert!(stderr(&out).contains("shown this once and cannot be shown again"), "{}", stderr(&out));
    assert_eq!(last(&api), ("POST".into(), "/v1/access-keys".into(), json!({"user": "alice"})));
    let v = json_of(&go(&["keys", "create", "--json"]));
    assert_eq!(v["secret"], "hk_00000000000000a1_secret");
    assert_eq!(last(&api).2, json!({}), "no user: an owner key");
    let table = ok(&go(&["keys", "list"]));
    assert!(table.contains("\nak-00000000000000a1  owner  "), "{table}");
    let table = ok(&go(&["keys", "list", "--user", "alice"]));
    assert!(table.contains("\nak-00000000000000a1  alice  "), "{table}");
    assert_eq!(last(&api).1, "/v1/access-keys?user=alice");
    assert_eq!(
        ok(&go(&["keys", "revoke", "ak-00000000000000a1"])),
        "Revoked access key ak-00000000000000a1\n"
    );
    assert_eq!(last(&api).0, "DELETE");

    // Policies: the document goes as the body, from a file or stdin.
    let doc = r#"{"Statement": {"Effect": "Allow", "Action": "hatch:ListUsers", "Resource": "*"}}"#;
    let file = home.path().join("p.json");
    std::fs::write(&file, doc).unwrap();
    assert_eq!(
        ok(&go(&["policies", "put", "read-only", file.to_str().unwrap()])),
        "Put policy read-only\n"
    );
    let doc: Value = serde_json::from_str(doc).unwrap();
    assert_eq!(last(&api), ("PUT".into(), "/v1/policies/read-only".into(), doc.clone()));
    let mut cmd = hatch(home.path());
    cmd.env("HATCH_API", &api.url)
        .env("HATCH_ACCESS_KEY", "key-1")
        .env("HATCH_CA", &api.ca_file)
        .args(["policies", "put", "read-only", "-", "--json"])
        .stdin(std::fs::File::open(&file).unwrap());
    assert_eq!(json_of(&run(cmd))["name"], "read-only");
    assert_eq!(last(&api).2, doc);
    let table = ok(&go(&["policies", "list"]));
    assert!(
        table.starts_with("POLICY     ATTACHED TO  UPDATED\nread-only  alice        "),
        "{table}"
    );
    let shown = ok(&go(&["policies", "show", "read-only"]));
    assert!(shown.starts_with("attached_to  alice\nname         read-only\nupdated_at"), "{shown}");
    assert!(shown.contains("document:\n{\n  \"Statement\": {\n"), "{shown}");
    assert_eq!(
        json_of(&go(&["policies", "show", "read-only", "--json"]))["attached_to"][0],
        "alice"
    );
    let out = go(&["policies", "show", "absent"]);
    assert_eq!(out.status.code(), Some(68), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "hatch: NoSuchEntity: no policy absent in this account; see `hatch policies list`\n"
    );
    let out = go(&["policies", "delete", "read-only"]);
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "hatch: DeleteConflict: policy read-only is attached to alice; `hatch policies show \
         NAME` lists the users it is attached to and `hatch users detach USER NAME` detaches it\n"
    );

    // Instances: listing as before, and the new subcommands.
    let tags = go(&["instances", "tag", INSTANCE, "env=prod", "role=web"]);
    assert_eq!(ok(&tags), format!("Tags of {INSTANCE}: env=prod,role=web\n"));
    assert_eq!(
        last(&api),
        (
            "PUT".into(),
            format!("/v1/instances/{INSTANCE}/tags"),
            json!({"tags": {"env": "prod", "role": "web"}})
        )
    );
    ok(&go(&["instances", "tag", INSTANCE, "--clear"]));
    assert_eq!(last(&api).2, json!({"tags": {}}));
    let v = json_of(&go(&["instances", "deregister", INSTANCE, "--json"]));
    assert_eq!(v["instance_id"], INSTANCE);
    assert_eq!(last(&api), ("DELETE".into(), format!("/v1/instances/{INSTANCE}"), Value::Null));
    let out = go(&["instances", "revoke-secret", INSTANCE]);
    assert!(ok(&out).starts_with(&format!("Revoked the agent secret of {INSTANCE}")));
    assert_eq!(last(&api).1, format!("/v1/instances/{INSTANCE}/revoke-secret"));

    // Activations: the code once.
    let out = go(&[
        "activations",
        "create",
        "--region",
        "eu-1",
        "--tag",
        "env=dev",
        "--max-registrations",
        "3",
        "--valid-for",
        "3600",
    ]);
    assert_eq!(ok(&out), "activation_id    act-00000000000000a1\nactivation_code  hac_code\n");
    assert!(stderr(&out).contains("the activation code is shown this once"), "{}", stderr(&out));
    assert_eq!(
        last(&api),
        (
            "POST".into(),
            "/v1/activations".into(),
            json!({"region": "eu-1", "tags": {"env": "dev"}, "max_registrations": 3,
                   "valid_for_s": 3600})
        )
    );
    let table = ok(&go(&["activations", "list"]));
    assert!(table.contains("\nact-00000000000000a1  eu-1    0     3    in "), "{table}");
    assert_eq!(
        ok(&go(&["activations", "revoke", "act-00000000000000a1"])),
        "Revoked activation act-00000000000000a1: no instance can register with it\n"
    );
    assert_eq!(last(&api).0, "DELETE");
}

#[test]
fn names_that_are_not_names_never_reach_a_path() {
    let home = tempfile::tempdir().unwrap();
    let api = TestApi::start(relay());
    for args in [
        &["users", "delete", "../policies/x"][..],
        &["users", "attach", "alice", "a/b"],
        &["users", "create", ".."],
        &["keys", "list", "--user", "a&user=b"],
        &["keys", "revoke", "ak-1/../x"],
        &["policies", "delete", "p?x=1"],
        &["instances", "deregister", "i-1/tags"],
        &["activations", "revoke", "act 1"],
        &["instances", "tag", INSTANCE, "env=a", "env=b"],
    ] {
        let out = call(&api, home.path(), args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).starts_with("hatch: usage: "), "{args:?}: {}", stderr(&out));
    }
    let out = call(&api, home.path(), &["policies", "put", "p", "-"]);
    assert_eq!(out.status.code(), Some(64), "an empty stdin is not a document");
    assert!(stderr(&out).contains("the policy document stdin is not JSON"), "{}", stderr(&out));
    assert!(api.seen().is_empty(), "nothing was sent: {:?}", api.seen());
}

#[test]
fn iam_error_codes_give_their_exit_codes() {
    let home = tempfile::tempdir().unwrap();
    let table: &[(&str, u16, &[&str], i32, &str)] = &[
        (
            "NoSuchEntity",
            404,
            &["users", "delete", "bob"],
            68,
            "hatch: NoSuchEntity: relay words; see `hatch users list`\n",
        ),
        (
            "NoSuchEntity",
            404,
            &["users", "attach", "bob", "p"],
            68,
            "hatch: NoSuchEntity: relay words; see `hatch users list` and `hatch policies list`\n",
        ),
        (
            "EntityAlreadyExists",
            409,
            &["users", "create", "bob"],
            255,
            "hatch: EntityAlreadyExists: relay words; choose another name, or see `hatch users \
             list`\n",
        ),
        ("DeleteConflict", 409, &["policies", "delete", "p"], 255, "`hatch users detach USER"),
        (
            "MalformedPolicyDocument",
            400,
            &["policies", "put", "p", "DOC"],
            64,
            "hatch: MalformedPolicyDocument: relay words; fix the document and put it again \
             (docs/POLICY.md)\n",
        ),
        (
            "AccessDenied",
            403,
            &["users", "create", "bob"],
            77,
            "hatch: AccessDenied: your policy does not allow hatch:CreateUser on this account; \
             ask an administrator\n",
        ),
        (
            "AccessDenied",
            403,
            &["account", "switch", "off"],
            77,
            "hatch: AccessDenied: only the account owner may do this; use an owner access key\n",
        ),
        (
            "AccessDenied",
            403,
            &["keys", "create"],
            77,
            "hatch: AccessDenied: only the account owner may do this; use an owner access key\n",
        ),
        (
            "AccessDenied",
            403,
            &["keys", "create", "--user", "bob"],
            77,
            "does not allow hatch:CreateAccessKey on this account",
        ),
        ("InvalidToken", 401, &["keys", "list"], 77, "did not accept the access key"),
        ("NoSuchEntity", 404, &["keys", "revoke", "ak-1"], 68, "see `hatch keys list`"),
        ("NoSuchEntity", 404, &["activations", "revoke", "act-1"], 68, "`hatch activations list`"),
        ("InstanceNotFound", 404, &["instances", "deregister", "i-1"], 68, "no instance i-1"),
    ];
    let doc = home.path().join("doc.json");
    std::fs::write(&doc, "{}").unwrap();
    for &(code, status, args, want_exit, want) in table {
        let body = json!({"code": code, "message": "relay words", "request_id": "req-1"});
        let api = TestApi::start(Arc::new(move |_, _| (status, body.clone())));
        let args: Vec<&str> =
            args.iter().map(|a| if *a == "DOC" { doc.to_str().unwrap() } else { a }).collect();
        let out = call(&api, home.path(), &args);
        assert_eq!(out.status.code(), Some(want_exit), "{code} {args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(want), "{code} {args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?}");
    }
}
