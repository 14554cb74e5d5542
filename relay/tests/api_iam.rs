//! IAM through the API over real HTTPS: users, keys, policies, instance records and
//! activations, each guarded by its own action, with the stable codes a script branches on;
//! what taking access away does to live sessions and control channels.

mod api_support;

use api_support::{Agent, TestRelay, close_code, dial_stream, start_body};
use hatch_proto::api::{AccessKeyInfo, ActivationInfo, StartSessionResponse, UserInfo};
use hatch_proto::control::{RegisterRequest, ToAgent};

/// `{"name": ...}`.
fn named(name: &str) -> String {
    serde_json::json!({ "name": name }).to_string()
}

const LIST_USERS_ONLY: &str =
    r#"{"Statement":{"Effect":"Allow","Action":"hatch:ListUsers","Resource":"*"}}"#;

#[tokio::test]
async fn a_user_is_created_given_a_key_and_a_policy_then_deleted_all_through_the_api() {
    let tr = TestRelay::start();
    let owner = Some(tr.owner_key());
    let r = tr.call("POST", "/v1/users", owner, Some(&named("alice"))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let alice: UserInfo = serde_json::from_str(&r.text).unwrap();
    assert_eq!((alice.name.as_str(), alice.policies.len()), ("alice", 0));
    tr.call("POST", "/v1/users", owner, Some(&named("alice")))
        .await
        .assert_error(409, "EntityAlreadyExists");
    tr.call("POST", "/v1/users", owner, Some(&named("al ice")))
        .await
        .assert_error(400, "InvalidRequest");

    let r = tr.call("PUT", "/v1/policies/list-users", owner, Some(LIST_USERS_ONLY)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["document"]["Statement"]["Action"], "hatch:ListUsers");
    let r = tr.call("PUT", "/v1/users/alice/policies/list-users", owner, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["policies"], serde_json::json!(["list-users"]));
    let r = tr.call("POST", "/v1/access-keys", owner, Some(r#"{"user":"alice"}"#)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let key: AccessKeyInfo = serde_json::from_str(&r.text).unwrap();
    assert_eq!(key.user.as_deref(), Some("alice"));
    let secret = key.secret.clone().expect("the secret, once");
    // Listing never shows a secret again.
    let r = tr.call("GET", "/v1/access-keys?user=alice", owner, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let keys = r.json()["access_keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].get("secret").is_none(), "{}", r.text);

    // Alice may list users and nothing else: each refusal names its own action.
    let r = tr.call("GET", "/v1/users", Some(&secret), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["users"][0]["name"], "alice");
    for (method, path, body, action) in [
        ("POST", "/v1/users", Some(named("mallory")), "hatch:CreateUser"),
        ("DELETE", "/v1/users/alice", None, "hatch:DeleteUser"),
        ("PUT", "/v1/policies/mine", Some(LIST_USERS_ONLY.to_owned()), "hatch:PutPolicy"),
        ("PUT", "/v1/users/alice/policies/list-users", None, "hatch:AttachUserPolicy"),
        (
            "POST",
            "/v1/access-keys",
            Some(r#"{"user":"alice"}"#.to_owned()),
            "hatch:CreateAccessKey",
        ),
        ("GET", "/v1/policies", None, "hatch:ListPolicies"),
        ("GET", "/v1/activations", None, "hatch:ListActivations"),
    ] {
        let v = tr
            .call(method, path, Some(&secret), body.as_deref())
            .await
            .assert_error(403, "AccessDenied");
        assert!(v["message"].as_str().unwrap().contains(action), "{method} {path}: {v}");
    }
    // An owner's key is the owner's alone to make, whatever a policy says.
    tr.call("POST", "/v1/access-keys", Some(&secret), None).await.assert_error(403, "AccessDenied");
    // Account settings stay the owner's.
    tr.call("GET", "/v1/account/settings", Some(&secret), None)
        .await
        .assert_error(403, "AccessDenied");

    // An attached policy cannot be deleted.
    let v = tr
        .call("DELETE", "/v1/policies/list-users", owner, None)
        .await
        .assert_error(409, "DeleteConflict");
    assert_eq!(v["message"], "policy list-users is attached to 1 user(s) (alice)", "{v}");
    let r = tr.call("DELETE", "/v1/users/alice", owner, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["user_id"], alice.user_id);
    // Her key went with her.
    tr.call("GET", "/v1/users", Some(&secret), None).await.assert_error(401, "InvalidToken");
    tr.call("DELETE", "/v1/users/alice", owner, None).await.assert_error(404, "NoSuchEntity");
    let r = tr.call("DELETE", "/v1/policies/list-users", owner, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    tr.call("DELETE", "/v1/policies/list-users", owner, None)
        .await
        .assert_error(404, "NoSuchEntity");
}

#[tokio::test]
async fn malformed_documents_and_bodies_are_refused_with_what_is_wrong() {
    let tr = TestRelay::start();
    let owner = Some(tr.owner_key());
    let typo = r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession",
        "Resource":"hrn:hatch:*:*:instanc/*"}}"#;
    let v = tr
        .call("PUT", "/v1/policies/typo", owner, Some(typo))
        .await
        .assert_error(400, "MalformedPolicyDocument");
    assert!(v["message"].as_str().unwrap().contains("Statement[0].Resource[0]"), "{v}");
    let unknown = r#"{"Statement":{"Effect":"Allow","Action":"hatch:CreateUsers","Resource":"*"}}"#;
    tr.call("PUT", "/v1/policies/typo", owner, Some(unknown))
        .await
        .assert_error(400, "MalformedPolicyDocument");
    // A condition key no account action has: a Deny that could never apply.
    let never = r#"{"Statement":{"Effect":"Deny","Action":"hatch:DeleteUser","Resource":"*",
        "Condition":{"StringEquals":{"hatch:RunAs":"root"}}}}"#;
    tr.call("PUT", "/v1/policies/never", owner, Some(never))
        .await
        .assert_error(400, "MalformedPolicyDocument");
    tr.call("PUT", "/v1/policies/bad%20name", owner, Some(LIST_USERS_ONLY))
        .await
        .assert_error(400, "InvalidRequest");
    tr.call("POST", "/v1/users", owner, Some(r#"{"name":"a","admin":true}"#))
        .await
        .assert_error(400, "InvalidRequest");
    tr.call("PUT", "/v1/account/settings", owner, Some(r#"{"idle_timeout":5}"#))
        .await
        .assert_error(400, "InvalidRequest");
    tr.call("PUT", "/v1/users/nobody/policies/none", owner, None)
        .await
        .assert_error(404, "NoSuchEntity");
    tr.call("DELETE", "/v1/access-keys/ak-0000000000000000", owner, None)
        .await
        .assert_error(404, "NoSuchEntity");
    let body = r#"{"region":"eu-1","valid_for_s":99999999}"#;
    tr.call("POST", "/v1/activations", owner, Some(body)).await.assert_error(400, "InvalidRequest");
}

/// A user whose policy allows `actions` on instances tagged env=`env`; returns its key.
async fn instance_admin(tr: &TestRelay, name: &str, actions: &[&str], env: &str) -> String {
    let owner = Some(tr.owner_key());
    assert_eq!(tr.call("POST", "/v1/users", owner, Some(&named(name))).await.status, 201);
    let doc = serde_json::json!({"Statement": {"Effect": "Allow", "Action": actions,
        "Resource": "hrn:hatch:*:*:instance/*",
        "Condition": {"StringEquals": {"hatch:tag/env": env}}}})
    .to_string();
    let r = tr.call("PUT", &format!("/v1/policies/{name}"), owner, Some(&doc)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = tr.call("PUT", &format!("/v1/users/{name}/policies/{name}"), owner, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let body = serde_json::json!({ "user": name }).to_string();
    let r = tr.call("POST", "/v1/access-keys", owner, Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.json()["secret"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn instance_records_are_tagged_and_deregistered_under_conditions_on_their_tags() {
    let tr = TestRelay::start();
    let owner = Some(tr.owner_key());
    let mut agent = tr.agent().await;
    let tags = r#"{"tags":{"env":"dev","team":"core"}}"#;
    let r = tr.call("PUT", &format!("/v1/instances/{}/tags", agent.id), owner, Some(tags)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["tags"]["team"], "core");
    assert_eq!(r.json()["online"], true);
    let bad = r#"{"tags":{"bad key":"x"}}"#;
    tr.call("PUT", &format!("/v1/instances/{}/tags", agent.id), owner, Some(bad))
        .await
        .assert_error(400, "InvalidRequest");

    // May tag dev instances only, and deregister nothing.
    let key = instance_admin(&tr, "tagger", &["hatch:TagInstance"], "dev").await;
    let r = tr
        .call(
            "PUT",
            &format!("/v1/instances/{}/tags", agent.id),
            Some(&key),
            Some(r#"{"tags":{"env":"dev","x":"1"}}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = tr
        .call("DELETE", &format!("/v1/instances/{}", agent.id), Some(&key), None)
        .await
        .assert_error(403, "AccessDenied");
    assert!(v["message"].as_str().unwrap().contains("hatch:DeregisterInstance"), "{v}");
    // Retagging it prod takes it out of the user's reach.
    let r = tr
        .call(
            "PUT",
            &format!("/v1/instances/{}/tags", agent.id),
            owner,
            Some(r#"{"tags":{"env":"prod"}}"#),
        )
        .await;
    assert_eq!(r.status, 200);
    tr.call("PUT", &format!("/v1/instances/{}/tags", agent.id), Some(&key), Some(tags))
        .await
        .assert_error(403, "AccessDenied");

    // Deregistering ends its live session (4006) and closes its control channel (1008).
    let r = tr.call("POST", "/v1/sessions", owner, Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let s: StartSessionResponse = serde_json::from_str(&r.text).unwrap();
    let Some(ToAgent::SessionOpen { stream_url, token, .. }) = agent.next().await else {
        panic!("expected session.open");
    };
    let mut a = dial_stream(&tr, &stream_url, &token).await.expect("agent leg");
    let mut c = dial_stream(&tr, &s.stream_url, &s.token).await.expect("client leg");
    let r = tr.call("DELETE", &format!("/v1/instances/{}", agent.id), owner, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(close_code(&mut c).await, Some(4006));
    assert_eq!(close_code(&mut a).await, Some(4006));
    let mut ws = agent.ws.take().unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1008));
    // The old secret opens nothing, the instance is no longer listed, nor deregistered twice.
    assert_eq!(Agent::try_connect(&tr, &agent.secret).await.err(), Some(401));
    let r = tr.call("GET", "/v1/instances", owner, None).await;
    assert_eq!(r.json()["instances"].as_array().unwrap().len(), 0, "{}", r.text);
    tr.call("DELETE", &format!("/v1/instances/{}", agent.id), owner, None)
        .await
        .assert_error(404, "InstanceNotFound");
    // Its sessions' records stay.
    let r = tr.call("GET", &format!("/v1/sessions/{}", s.session_id), owner, None).await;
    assert_eq!((r.status, r.json()["close_reason"].as_str()), (200, Some("terminated")));
}

#[tokio::test]
async fn a_revoked_instance_secret_closes_the_channel_and_opens_nothing_again() {
    let tr = TestRelay::start();
    let owner = Some(tr.owner_key());
    let mut agent = tr.agent().await;
    let path = format!("/v1/instances/{}/revoke-secret", agent.id);
    let r = tr.call("POST", &path, owner, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut ws = agent.ws.take().unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1008));
    assert_eq!(Agent::try_connect(&tr, &agent.secret).await.err(), Some(401));
    // The record stays, offline, for its history and tags.
    let r = tr.call("GET", "/v1/instances", owner, None).await;
    let list = r.json()["instances"].as_array().unwrap().clone();
    assert_eq!((list.len(), list[0]["online"].as_bool()), (1, Some(false)), "{}", r.text);
    assert!(
        tr.store().instance(tr.account(), &agent.id).unwrap().unwrap().secret_revoked_at.is_some()
    );
}

#[tokio::test]
async fn activations_are_created_and_revoked_through_the_api() {
    let tr = TestRelay::start();
    let owner = Some(tr.owner_key());
    let body = r#"{"region":"eu-2","tags":{"env":"ci"},"max_registrations":2,"valid_for_s":600}"#;
    let r = tr.call("POST", "/v1/activations", owner, Some(body)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let act: ActivationInfo = serde_json::from_str(&r.text).unwrap();
    let code = act.activation_code.clone().expect("the code, once");
    let register = |code: String| {
        serde_json::to_string(&RegisterRequest {
            activation_id: act.activation_id.clone(),
            activation_code: code,
            hostname: None,
        })
        .unwrap()
    };
    let r = tr.call("POST", "/v1/agent/register", None, Some(&register(code.clone()))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = tr.call("GET", "/v1/activations", owner, None).await;
    let listed = r.json()["activations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["activation_id"] == act.activation_id.as_str())
        .cloned()
        .unwrap();
    assert_eq!((listed["registrations"].as_u64(), listed.get("activation_code")), (Some(1), None));
    let r = tr.call("DELETE", &format!("/v1/activations/{}", act.activation_id), owner, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.json()["revoked_at"].is_string());
    let v = tr
        .call("POST", "/v1/agent/register", None, Some(&register(code)))
        .await
        .assert_error(403, "AccessDenied");
    assert!(v["message"].as_str().unwrap().contains("revoked"), "{v}");
    tr.call("DELETE", &format!("/v1/activations/{}", act.activation_id), owner, None)
        .await
        .assert_error(404, "NoSuchEntity");
}

#[tokio::test]
async fn deleting_a_user_ends_their_live_session_with_4012() {
    let tr = TestRelay::start();
    let owner = Some(tr.owner_key());
    let mut agent = tr.agent().await;
    let key = instance_admin(&tr, "bob", &["hatch:StartSession"], "dev").await;
    let r = tr
        .call(
            "PUT",
            &format!("/v1/instances/{}/tags", agent.id),
            owner,
            Some(r#"{"tags":{"env":"dev"}}"#),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let s: StartSessionResponse = serde_json::from_str(&r.text).unwrap();
    let Some(ToAgent::SessionOpen { stream_url, token, .. }) = agent.next().await else {
        panic!("expected session.open");
    };
    let _a = dial_stream(&tr, &stream_url, &token).await.expect("agent leg");
    let mut c = dial_stream(&tr, &s.stream_url, &s.token).await.expect("client leg");
    let r = tr.call("DELETE", "/v1/users/bob", owner, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(close_code(&mut c).await, Some(hatch_proto::close::ACCESS_REVOKED));
}
