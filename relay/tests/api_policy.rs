//! Users, policies and accounts over real HTTPS: default deny, tag and source-IP conditions,
//! explicit deny, and another account's instance looking exactly like a missing one.

mod api_support;

use api_support::{TestRelay, start_body};
use hatch_relay::control::iam;

/// A user of the demo account with `policy` attached (when given); returns its access key.
fn user_with(tr: &TestRelay, name: &str, policy: Option<&str>) -> String {
    let u = iam::create_user(tr.store(), tr.account(), name).unwrap();
    if let Some(doc) = policy {
        iam::put_policy(tr.store(), tr.account(), name, doc).unwrap();
        iam::attach_policy(tr.store(), tr.account(), &u.id, name).unwrap();
    }
    iam::create_access_key(tr.store(), tr.account(), Some(&u.id)).unwrap().1
}

#[tokio::test]
async fn user_without_policy_is_denied() {
    let tr = TestRelay::start();
    let agent = tr.agent().await;
    let key = user_with(&tr, "nobody", None);
    let v = tr
        .call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id)))
        .await
        .assert_error(403, "AccessDenied");
    assert!(v["message"].as_str().unwrap().contains("hatch:StartSession"), "{v}");
    // Nothing is visible to them either.
    let r = tr.call("GET", "/v1/instances", Some(&key), None).await;
    assert_eq!(r.json()["instances"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn tag_condition_allows_one_instance_and_denies_another() {
    let tr = TestRelay::start();
    let dev = tr.agent().await;
    let prod = tr.agent().await;
    let env = |v: &str| iam::parse_tags(&[format!("env={v}")]).unwrap();
    assert!(tr.store().set_instance_tags(&dev.id, &env("dev")).unwrap());
    assert!(tr.store().set_instance_tags(&prod.id, &env("prod")).unwrap());
    let key = user_with(
        &tr,
        "devs",
        Some(
            r#"{"Version":"1","Statement":[{"Effect":"Allow",
            "Action":["hatch:StartSession","hatch:DescribeInstances"],
            "Resource":"hrn:hatch:*:*:instance/*",
            "Condition":{"StringEquals":{"hatch:tag/env":"dev"}}}]}"#,
        ),
    );
    let r = tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&dev.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&prod.id)))
        .await
        .assert_error(403, "AccessDenied");
    let r = tr.call("GET", "/v1/instances", Some(&key), None).await;
    let ids: Vec<String> = r.json()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec![dev.id.clone()]);
}

#[tokio::test]
async fn source_ip_condition_denies_from_a_non_matching_address() {
    let tr = TestRelay::start();
    let agent = tr.agent().await;
    let key = user_with(
        &tr,
        "office",
        Some(
            r#"{"Statement":{"Effect":"Allow","Action":"hatch:StartSession","Resource":"*",
            "Condition":{"IpAddress":{"hatch:SourceIp":["127.0.0.1/32","::1/128"]}}}}"#,
        ),
    );
    let body = Some(start_body(&agent.id).into_bytes());
    let from_1 = "127.0.0.1".parse().unwrap();
    let from_2 = "127.0.0.2".parse().unwrap();
    let r = tr.call_from(from_1, "POST", "/v1/sessions", Some(&key), body.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = tr.call_from(from_2, "POST", "/v1/sessions", Some(&key), body).await;
    r.assert_error(403, "AccessDenied");
    // The session records where it came from.
    let sessions =
        tr.store().sessions(None, hatch_relay::control::store::StateFilter::All, 10, None).unwrap();
    assert_eq!(sessions[0].source_ip, "127.0.0.1");
}

#[tokio::test]
async fn explicit_deny_beats_allow_and_run_as_is_checked() {
    let tr = TestRelay::start();
    let agent = tr.agent().await;
    let key = user_with(
        &tr,
        "ops",
        Some(
            r#"{"Statement":[{"Effect":"Allow","Action":"hatch:*","Resource":"*"},
            {"Effect":"Deny","Action":"hatch:StartSession","Resource":"*",
             "Condition":{"StringEquals":{"hatch:RunAs":"root"}}}]}"#,
        ),
    );
    let ok = format!(r#"{{"instance_id":"{}","mode":"shell","run_as":"deploy"}}"#, agent.id);
    let root = format!(r#"{{"instance_id":"{}","mode":"shell","run_as":"root"}}"#, agent.id);
    let r = tr.call("POST", "/v1/sessions", Some(&key), Some(&ok)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    tr.call("POST", "/v1/sessions", Some(&key), Some(&root))
        .await
        .assert_error(403, "AccessDenied");
    // Users may not read the account switch even with hatch:*.
    tr.call("GET", "/v1/account/settings", Some(&key), None)
        .await
        .assert_error(403, "AccessDenied");
}

#[tokio::test]
async fn run_as_is_the_agents_default_user_when_none_is_named() {
    // The fake agent's hello names FAKE_AGENT_USER as its default user. A Deny on that user
    // holds for a session that names no user (it used to see hatch:RunAs absent and not
    // apply), and the agent is told to run the session as exactly the user that was checked.
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let deny_default = format!(
        r#"{{"Statement":[{{"Effect":"Allow","Action":"hatch:*","Resource":"*"}},
        {{"Effect":"Deny","Action":"hatch:StartSession","Resource":"*",
         "Condition":{{"StringEquals":{{"hatch:RunAs":"{}"}}}}}}]}}"#,
        api_support::FAKE_AGENT_USER
    );
    let key = user_with(&tr, "ops", Some(&deny_default));
    tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id)))
        .await
        .assert_error(403, "AccessDenied");
    let other = format!(r#"{{"instance_id":"{}","mode":"shell","run_as":"deploy"}}"#, agent.id);
    let r = tr.call("POST", "/v1/sessions", Some(&key), Some(&other)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    match agent.next().await {
        Some(hatch_proto::control::ToAgent::SessionOpen { run_as, .. }) => {
            assert_eq!(run_as.as_deref(), Some("deploy"));
        }
        other => panic!("expected session.open, got {other:?}"),
    }
    // The owner's session naming no user: session.open and the record carry the default.
    let r =
        tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = r.json()["session_id"].as_str().unwrap().to_owned();
    match agent.next().await {
        Some(hatch_proto::control::ToAgent::SessionOpen { run_as, session_id, .. }) => {
            assert_eq!(session_id, sid);
            assert_eq!(run_as.as_deref(), Some(api_support::FAKE_AGENT_USER));
        }
        other => panic!("expected session.open, got {other:?}"),
    }
    let r = tr.call("GET", &format!("/v1/sessions/{sid}"), Some(tr.owner_key()), None).await;
    assert_eq!(r.json()["run_as"], api_support::FAKE_AGENT_USER, "{}", r.text);
}

#[tokio::test]
async fn a_stored_policy_that_no_longer_parses_denies_everything() {
    // Skipping it would drop its Deny and widen what the user's other policies allow.
    let tr = TestRelay::start();
    let agent = tr.agent().await;
    let key = user_with(
        &tr,
        "ops",
        Some(r#"{"Statement":{"Effect":"Allow","Action":"hatch:*","Resource":"*"}}"#),
    );
    let r = tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // A Deny written by an older relay in a form this one refuses, attached to the same user.
    let stale = r#"{"Statement":{"Effect":"Deny","Action":"hatch:TerminateSession",
        "Resource":"*","Condition":{"StringEquals":{"hatch:RunAs":"root"}}}}"#;
    let user = iam::user(tr.store(), tr.account(), "ops").unwrap();
    tr.store()
        .put_policy(&hatch_relay::control::store::PolicyRecord {
            account_id: tr.account().to_owned(),
            name: "stale".into(),
            document: stale.into(),
            updated_at: 0,
        })
        .unwrap();
    assert!(tr.store().attach_policy(tr.account(), &user.id, "stale").unwrap());
    tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id)))
        .await
        .assert_error(403, "AccessDenied");
    let r = tr.call("GET", "/v1/instances", Some(&key), None).await;
    assert_eq!(r.json()["instances"].as_array().unwrap().len(), 0, "{}", r.text);
    // Refused when put through the admin path, naming the field.
    let e = iam::put_policy(tr.store(), tr.account(), "stale2", stale).unwrap_err();
    assert!(e.to_string().contains("Condition.StringEquals.hatch:RunAs"), "{e}");
}

#[tokio::test]
async fn another_accounts_instance_looks_like_a_missing_one() {
    let tr = TestRelay::start();
    let agent = tr.agent().await;
    let other = iam::create_account(tr.store(), "other").unwrap();
    let (_, other_key) = iam::create_access_key(tr.store(), &other.id, None).unwrap();
    let theirs = tr
        .call("POST", "/v1/sessions", Some(&other_key), Some(&start_body(&agent.id)))
        .await
        .assert_error(404, "InstanceNotFound");
    let missing = tr
        .call("POST", "/v1/sessions", Some(&other_key), Some(&start_body("i-00000000000000ff")))
        .await
        .assert_error(404, "InstanceNotFound");
    assert_eq!(
        theirs["message"].as_str().unwrap().replace(&agent.id, "ID"),
        missing["message"].as_str().unwrap().replace("i-00000000000000ff", "ID")
    );
    // Their lists are empty; the owner's session is not visible to them.
    let r =
        tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&start_body(&agent.id))).await;
    let sid = r.json()["session_id"].as_str().unwrap().to_owned();
    tr.call("GET", &format!("/v1/sessions/{sid}"), Some(&other_key), None)
        .await
        .assert_error(404, "SessionNotFound");
    tr.call("DELETE", &format!("/v1/sessions/{sid}"), Some(&other_key), None)
        .await
        .assert_error(404, "SessionNotFound");
    let r = tr.call("GET", "/v1/instances", Some(&other_key), None).await;
    assert_eq!(r.json()["instances"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn revoked_key_is_refused() {
    let tr = TestRelay::start();
    let (k, secret) = iam::create_access_key(tr.store(), tr.account(), None).unwrap();
    let r = tr.call("GET", "/v1/instances", Some(&secret), None).await;
    assert_eq!(r.status, 200);
    assert!(tr.store().revoke_access_key(&k.id, 1).unwrap());
    tr.call("GET", "/v1/instances", Some(&secret), None).await.assert_error(401, "InvalidToken");
}

/// A Deny written with the IPv4-mapped form of an address refuses the IPv4 caller it names
/// (the API sees IPv4 callers as IPv4, so a policy network left in IPv6 form never matched).
#[tokio::test]
async fn deny_on_an_ipv4_mapped_address_refuses_that_ipv4_caller() {
    let tr = TestRelay::start();
    let agent = tr.agent().await;
    let key = user_with(
        &tr,
        "mapped",
        Some(
            r#"{"Statement":[{"Effect":"Allow","Action":"hatch:StartSession","Resource":"*"},
            {"Effect":"Deny","Action":"hatch:StartSession","Resource":"*",
             "Condition":{"IpAddress":{"hatch:SourceIp":"::ffff:127.0.0.1"}}}]}"#,
        ),
    );
    let body = Some(start_body(&agent.id).into_bytes());
    let denied = "127.0.0.1".parse().unwrap();
    let other = "127.0.0.2".parse().unwrap();
    let v = tr
        .call_from(denied, "POST", "/v1/sessions", Some(&key), body.clone())
        .await
        .assert_error(403, "AccessDenied");
    assert!(v["message"].as_str().unwrap().contains("hatch:StartSession"), "{v}");
    let r = tr.call_from(other, "POST", "/v1/sessions", Some(&key), body).await;
    assert_eq!(r.status, 201, "{}", r.text);
}

/// Port forwarding is its own action with the destination as condition keys: a policy that
/// allows only port 5432 on loopback gets that and nothing else, and StartSession alone does
/// not allow it. The agent is told the destination.
#[tokio::test]
async fn port_forwarding_needs_its_own_action_and_its_conditions() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let only_pg = r#"{"Statement":[{"Effect":"Allow","Action":"hatch:StartPortForwarding","Resource":"*",
        "Condition":{"NumericEquals":{"hatch:RemotePort":5432},"StringEquals":{"hatch:RemoteHost":"127.0.0.1"}}}]}"#;
    let key = user_with(&tr, "dba", Some(only_pg));
    let iid = agent.id.clone();
    let body = |host: &str, port: u16| {
        format!(
            r#"{{"instance_id":"{iid}","mode":"port","remote_host":"{host}","remote_port":{port}}}"#
        )
    };
    let r = tr.call("POST", "/v1/sessions", Some(&key), Some(&body("127.0.0.1", 5432))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    match agent.next().await {
        Some(hatch_proto::control::ToAgent::SessionOpen {
            mode, remote_host, remote_port, ..
        }) => {
            assert_eq!(mode, hatch_proto::api::Mode::Port);
            assert_eq!((remote_host.as_deref(), remote_port), (Some("127.0.0.1"), Some(5432)));
        }
        other => panic!("expected session.open, got {other:?}"),
    }
    for (host, port) in [("127.0.0.1", 22), ("10.0.0.1", 5432)] {
        let e = tr.call("POST", "/v1/sessions", Some(&key), Some(&body(host, port))).await;
        let v = e.assert_error(403, "AccessDenied");
        assert!(v["message"].as_str().unwrap().contains("hatch:StartPortForwarding"), "{v}");
    }
    // A shell needs StartSession, which this policy does not give; and StartSession alone
    // does not give port forwarding.
    tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id)))
        .await
        .assert_error(403, "AccessDenied");
    let shell_only =
        r#"{"Statement":[{"Effect":"Allow","Action":"hatch:StartSession","Resource":"*"}]}"#;
    let key = user_with(&tr, "ops2", Some(shell_only));
    tr.call("POST", "/v1/sessions", Some(&key), Some(&body("127.0.0.1", 5432)))
        .await
        .assert_error(403, "AccessDenied");
    // Malformed port requests.
    for bad in [
        format!(r#"{{"instance_id":"{}","mode":"port"}}"#, agent.id),
        format!(r#"{{"instance_id":"{}","mode":"port","remote_port":0}}"#, agent.id),
        format!(
            r#"{{"instance_id":"{}","mode":"port","remote_port":22,"command":["x"]}}"#,
            agent.id
        ),
        format!(r#"{{"instance_id":"{}","mode":"shell","remote_port":22}}"#, agent.id),
        format!(
            r#"{{"instance_id":"{}","mode":"port","remote_port":22,"remote_host":"a b"}}"#,
            agent.id
        ),
    ] {
        tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&bad))
            .await
            .assert_error(400, "InvalidRequest");
    }
}
