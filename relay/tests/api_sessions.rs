//! The control plane over real HTTPS on port 0: starting sessions, the agent's control
//! channel, errors, policy and the account switch.

mod api_support;

use api_support::{Agent, DEADLINE, TestRelay, start_body, wait_until};
use hatch_proto::api::StartSessionResponse;
use hatch_proto::control::ToAgent;
use hatch_proto::token::Role;
use hatch_relay::control::iam;

fn verifier(tr: &TestRelay) -> hatch_relay::token::TokenVerifier {
    // Loading the keys again is another run: check signatures and claims only.
    hatch_relay::control::signing::load_or_create(tr.relay.data_dir()).unwrap().1.any_run()
}

fn now() -> u64 {
    hatch_relay::control::unix_now() as u64
}

#[tokio::test]
async fn owner_starts_a_session_and_the_agent_is_told() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let r =
        tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let s: StartSessionResponse = serde_json::from_str(&r.text).unwrap();
    assert!(s.session_id.starts_with("s-") && s.session_id.len() == 18);
    let port = tr.relay.server().data_addr().port();
    assert_eq!(
        s.stream_url,
        format!("wss://localhost:{port}/v1/stream/{}?role=client", s.session_id)
    );
    let claims = verifier(&tr).verify(&s.token, &s.session_id, Role::Client, now()).unwrap();
    assert_eq!(claims.instance, agent.id);
    assert_eq!(claims.account, tr.account());
    assert_eq!(claims.exp - claims.iat, 600);

    match agent.next().await {
        Some(ToAgent::SessionOpen { session_id, stream_url, token, .. }) => {
            assert_eq!(session_id, s.session_id);
            assert_eq!(
                stream_url,
                format!("wss://localhost:{port}/v1/stream/{}?role=agent", s.session_id)
            );
            verifier(&tr).verify(&token, &session_id, Role::Agent, now()).unwrap();
            assert!(verifier(&tr).verify(&token, &session_id, Role::Client, now()).is_err());
        }
        other => panic!("expected session.open, got {other:?}"),
    }

    let r =
        tr.call("GET", &format!("/v1/sessions/{}", s.session_id), Some(tr.owner_key()), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["state"], "pending");
    assert_eq!(v["principal"], "owner");
    assert_eq!(v["source_ip"], "127.0.0.1");

    let r = tr.call("GET", "/v1/sessions?state=active", Some(tr.owner_key()), None).await;
    assert_eq!(r.json()["sessions"].as_array().unwrap().len(), 1);

    let r = tr
        .call("DELETE", &format!("/v1/sessions/{}", s.session_id), Some(tr.owner_key()), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["state"], "closed");
    assert_eq!(r.json()["close_reason"], "terminated");
    match agent.next().await {
        Some(ToAgent::SessionClose { session_id, .. }) => assert_eq!(session_id, s.session_id),
        other => panic!("expected session.close, got {other:?}"),
    }
    let r = tr.call("GET", "/v1/sessions?state=active", Some(tr.owner_key()), None).await;
    assert_eq!(r.json()["sessions"].as_array().unwrap().len(), 0);
    let r = tr.call("GET", "/v1/sessions?state=closed", Some(tr.owner_key()), None).await;
    assert_eq!(r.json()["sessions"][0]["session_id"], s.session_id.as_str());
}

#[tokio::test]
async fn offline_instance_answers_target_not_connected_with_last_seen() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    agent.disconnect(&tr).await;
    let r =
        tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&start_body(&agent.id))).await;
    let v = r.assert_error(409, "TargetNotConnected");
    assert!(v["last_seen"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    assert!(v["message"].as_str().unwrap().contains("last seen"), "{v}");

    let r = tr.call("GET", "/v1/instances", Some(tr.owner_key()), None).await;
    let inst = &r.json()["instances"][0];
    assert_eq!(inst["instance_id"], agent.id.as_str());
    assert_eq!(inst["online"], false);
    assert_eq!(inst["hostname"], "test-host");

    agent.connect(&tr).await;
    let r = tr.call("GET", "/v1/instances", Some(tr.owner_key()), None).await;
    assert_eq!(r.json()["instances"][0]["online"], true);
}

#[tokio::test]
async fn second_control_channel_replaces_the_first() {
    let tr = TestRelay::start();
    let mut first = tr.agent().await;
    let mut second = Agent { id: first.id.clone(), secret: first.secret.clone(), ws: None };
    second.connect(&tr).await;
    // The first channel is closed by the relay.
    assert!(first.next().await.is_none());
    assert!(tr.relay.server().control().agent_online(&first.id));
    let r =
        tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&start_body(&first.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(matches!(second.next().await, Some(ToAgent::SessionOpen { .. })));
    assert_eq!(Agent::try_connect(&tr, "hatch_is_wrong").await.err(), Some(401));
}

#[tokio::test]
async fn errors_have_a_stable_code_and_status() {
    let tr = TestRelay::start();
    let agent = tr.agent().await;
    let key = Some(tr.owner_key());
    tr.call("GET", "/v1/nope", key, None).await.assert_error(404, "NotFound");
    tr.call("GET", "/", None, None).await.assert_error(404, "NotFound");
    tr.call("PATCH", "/v1/sessions", key, None).await.assert_error(405, "InvalidRequest");
    tr.call("POST", "/v1/sessions", None, Some(&start_body(&agent.id)))
        .await
        .assert_error(401, "InvalidToken");
    tr.call(
        "POST",
        "/v1/sessions",
        Some("hatch_ak_0000000000000000_x"),
        Some(&start_body(&agent.id)),
    )
    .await
    .assert_error(401, "InvalidToken");
    // Not JSON, a malformed instance id, an unknown mode, exec without a command, a shell
    // without a terminal, a tty that is not a boolean.
    for body in [
        "{not json",
        r#"{"instance_id":"i-1","mode":"shell"}"#,
        r#"{"instance_id":"i-0000000000000000","mode":"tty"}"#,
        r#"{"instance_id":"i-0000000000000000","mode":"exec"}"#,
        r#"{"instance_id":"i-0000000000000000","mode":"shell","tty":false}"#,
        r#"{"instance_id":"i-0000000000000000","mode":"exec","command":["true"],"tty":"no"}"#,
    ] {
        tr.call("POST", "/v1/sessions", key, Some(body)).await.assert_error(400, "InvalidRequest");
    }
    tr.call("POST", "/v1/sessions", key, Some(&start_body("i-0000000000000000")))
        .await
        .assert_error(404, "InstanceNotFound");
    let big = format!(
        r#"{{"instance_id":"{}","mode":"shell","term":"{}"}}"#,
        agent.id,
        "x".repeat(70_000)
    );
    tr.call("POST", "/v1/sessions", key, Some(&big)).await.assert_error(413, "InvalidRequest");
    tr.call("GET", "/v1/sessions/s-0000000000000000", key, None)
        .await
        .assert_error(404, "SessionNotFound");
    tr.call("DELETE", "/v1/sessions/whatever", key, None)
        .await
        .assert_error(404, "SessionNotFound");
    tr.call("GET", "/v1/sessions?state=bogus", key, None).await.assert_error(400, "InvalidRequest");
    tr.call("GET", "/v1/sessions?limit=0", key, None).await.assert_error(400, "InvalidRequest");
    tr.call("GET", "/v1/agent/connect", None, None).await.assert_error(401, "InvalidToken");
    let r = tr
        .call(
            "POST",
            "/v1/agent/register",
            None,
            Some(&format!(
                r#"{{"activation_id":"{}","activation_code":"wrong"}}"#,
                tr.relay.info.activation_id
            )),
        )
        .await;
    r.assert_error(403, "AccessDenied");
    let r = tr.call("GET", "/healthz", None, None).await;
    assert_eq!((r.status, r.text.as_str()), (200, "ok\n"));
    let r = tr.call("GET", "/metrics", None, None).await;
    assert!(
        r.text.contains("hatch_api_requests_total{status=\"404\",code=\"NotFound\"} 2"),
        "{}",
        r.text
    );
    assert!(r.text.contains("hatch_agents_online 1"), "{}", r.text);
}

#[tokio::test]
async fn account_switch_refuses_new_sessions_and_ends_live_ones() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let key = Some(tr.owner_key());
    let r = tr.call("POST", "/v1/sessions", key, Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = r.json()["session_id"].as_str().unwrap().to_owned();
    assert!(matches!(agent.next().await, Some(ToAgent::SessionOpen { .. })));

    let r = tr.call("GET", "/v1/account/settings", key, None).await;
    assert_eq!(r.json()["session_manager_enabled"], true);
    let r = tr
        .call("PUT", "/v1/account/settings", key, Some(r#"{"session_manager_enabled":false}"#))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(matches!(agent.next().await, Some(ToAgent::SessionClose { .. })));
    let r = tr.call("GET", &format!("/v1/sessions/{sid}"), key, None).await;
    assert_eq!(r.json()["state"], "closed");
    assert_eq!(r.json()["close_reason"], "terminated");

    tr.call("POST", "/v1/sessions", key, Some(&start_body(&agent.id)))
        .await
        .assert_error(403, "SessionManagerDisabled");
    let r = tr
        .call("PUT", "/v1/account/settings", key, Some(r#"{"session_manager_enabled":true}"#))
        .await;
    assert_eq!(r.status, 200);
    let r = tr.call("POST", "/v1/sessions", key, Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);

    // Users may not flip the switch.
    let u = iam::create_user(tr.store(), tr.account(), "alice").unwrap();
    let (_, ukey) = iam::create_access_key(tr.store(), tr.account(), Some(&u.id)).unwrap();
    tr.call(
        "PUT",
        "/v1/account/settings",
        Some(&ukey),
        Some(r#"{"session_manager_enabled":false}"#),
    )
    .await
    .assert_error(403, "AccessDenied");
}

#[tokio::test]
async fn per_instance_limit_throttles() {
    let tr = TestRelay::start_with(|o| o.limits.per_instance = 2);
    let agent = tr.agent().await;
    let key = Some(tr.owner_key());
    for _ in 0..2 {
        let r = tr.call("POST", "/v1/sessions", key, Some(&start_body(&agent.id))).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    tr.call("POST", "/v1/sessions", key, Some(&start_body(&agent.id)))
        .await
        .assert_error(429, "Throttled");
}

/// A session whose legs never both come is closed at the pending timeout (not the token's ten
/// minutes): recorded `pair_timeout`, its waiting leg closed with 4004, the agent told to close,
/// and its slot under the per-instance limit free again.
#[tokio::test]
async fn pending_session_is_closed_at_the_pending_timeout_and_frees_its_slot() {
    // Long enough for the steps before it on a loaded machine; the wait is for the close.
    let tr = TestRelay::start_with(|o| {
        o.pending_timeout = std::time::Duration::from_secs(2);
        o.limits.per_instance = 1;
    });
    let mut agent = tr.agent().await;
    let key = tr.owner_key().to_owned();
    let r = tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let s: StartSessionResponse = serde_json::from_str(&r.text).unwrap();
    // The instance is full while the session is pending.
    tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id)))
        .await
        .assert_error(429, "Throttled");
    assert!(matches!(agent.next().await, Some(ToAgent::SessionOpen { .. })));
    // The client's leg comes and waits; the agent's never does.
    let mut client = api_support::dial_stream(&tr, &s.stream_url, &s.token).await.unwrap();
    assert_eq!(api_support::close_code(&mut client).await, Some(4004));
    match agent.next().await {
        Some(ToAgent::SessionClose { session_id, .. }) => assert_eq!(session_id, s.session_id),
        other => panic!("expected session.close, got {other:?}"),
    }
    let rec = tr.store().session(None, &s.session_id).unwrap().unwrap();
    assert_eq!(
        (rec.state.as_str(), rec.close_reason.map(|r| r.as_str())),
        ("closed", Some("pair_timeout"))
    );
    let r = tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
}

/// Sessions that never connect at all are swept too, so a caller cannot hold an instance's
/// slots by starting sessions it never dials.
#[tokio::test]
async fn pending_sessions_without_any_leg_are_swept_as_pair_timeout() {
    let tr = TestRelay::start_with(|o| o.pending_timeout = std::time::Duration::from_millis(200));
    let agent = tr.agent().await;
    let key = tr.owner_key().to_owned();
    let mut sids = Vec::new();
    for _ in 0..3 {
        let r = tr.call("POST", "/v1/sessions", Some(&key), Some(&start_body(&agent.id))).await;
        sids.push(r.json()["session_id"].as_str().unwrap().to_owned());
    }
    wait_until(|| {
        sids.iter().all(|sid| {
            tr.store().session(None, sid).unwrap().unwrap().close_reason.map(|r| r.as_str())
                == Some("pair_timeout")
        })
    })
    .await;
    let r = tr.call("GET", "/metrics", None, None).await;
    assert!(
        r.text.contains("hatch_sessions_closed_total{reason=\"pair_timeout\"} 3"),
        "{}",
        r.text
    );
    assert!(r.text.contains("hatch_sessions_active{state=\"pending\"} 0"), "{}", r.text);
}

/// One user's open sessions are capped: they cannot take every slot of an instance, and other
/// principals still get in.
#[tokio::test]
async fn per_user_limit_throttles_one_user_and_not_the_others() {
    let tr = TestRelay::start_with(|o| o.limits.per_user = 2);
    let agent = tr.agent().await;
    let policy = r#"{"Statement":{"Effect":"Allow","Action":"hatch:*","Resource":"*"}}"#;
    iam::put_policy(tr.store(), tr.account(), "all", policy).unwrap();
    let mut keys = Vec::new();
    for name in ["alice", "bob"] {
        let u = iam::create_user(tr.store(), tr.account(), name).unwrap();
        iam::attach_policy(tr.store(), tr.account(), &u.id, "all").unwrap();
        keys.push(iam::create_access_key(tr.store(), tr.account(), Some(&u.id)).unwrap().1);
    }
    let (alice, bob) = (Some(keys[0].as_str()), Some(keys[1].as_str()));
    let body = start_body(&agent.id);
    let mut alices = Vec::new();
    for _ in 0..2 {
        let r = tr.call("POST", "/v1/sessions", alice, Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        alices.push(r.json()["session_id"].as_str().unwrap().to_owned());
    }
    // A second key of the same user shares the user's count.
    let alice_id = tr.store().user_by_name(tr.account(), "alice").unwrap().unwrap().id;
    let (_, alice2) = iam::create_access_key(tr.store(), tr.account(), Some(&alice_id)).unwrap();
    for key in [alice, Some(alice2.as_str())] {
        let v =
            tr.call("POST", "/v1/sessions", key, Some(&body)).await.assert_error(429, "Throttled");
        assert!(v["message"].as_str().unwrap().contains("you already have 2"), "{v}");
    }
    for key in [bob, bob, Some(tr.owner_key())] {
        let r = tr.call("POST", "/v1/sessions", key, Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    // Ending one of hers frees one slot.
    let r = tr.call("DELETE", &format!("/v1/sessions/{}", alices[0]), alice, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = tr.call("POST", "/v1/sessions", alice, Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text);
}

/// Session starts per access key are rate-limited: after the burst, 429 `Throttled` with
/// `Retry-After`; other keys have their own bucket; after the wait, starts pass again.
#[tokio::test]
async fn session_starts_are_rate_limited_per_access_key_with_retry_after() {
    use hatch_relay::control::live::Rate;
    // One start per 4 s: the bucket cannot refill between the calls below on a loaded machine.
    let tr = TestRelay::start_with(|o| o.limits.start_rate = Rate { per_sec: 0.25, burst: 2 });
    let agent = tr.agent().await;
    let body = start_body(&agent.id);
    let key = Some(tr.owner_key());
    for _ in 0..2 {
        let r = tr.call("POST", "/v1/sessions", key, Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let r = tr.call("POST", "/v1/sessions", key, Some(&body)).await;
    r.assert_error(429, "Throttled");
    let wait: u64 = r.retry_after.as_deref().expect("Retry-After").parse().unwrap();
    assert!((1..=4).contains(&wait), "Retry-After {wait}");
    // Refused starts count too: a request that fails validation still takes from the bucket.
    tr.call("POST", "/v1/sessions", key, Some("{}")).await.assert_error(429, "Throttled");
    // Another key of the same owner has its own bucket.
    let (_, other) = iam::create_access_key(tr.store(), tr.account(), None).unwrap();
    let r = tr.call("POST", "/v1/sessions", Some(&other), Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // Other calls are not limited.
    assert_eq!(tr.call("GET", "/v1/sessions", key, None).await.status, 200);
    // After Retry-After the key starts again.
    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
    let r = tr.call("POST", "/v1/sessions", key, Some(&body)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let m = tr.call("GET", "/metrics", None, None).await;
    assert!(
        m.text.contains("hatch_api_requests_total{status=\"429\",code=\"Throttled\"} 2"),
        "{}",
        m.text
    );
}

/// Closed session records older than the retention are deleted by the periodic sweep; open
/// sessions and records inside the retention stay.
#[tokio::test]
async fn closed_sessions_older_than_the_retention_are_pruned() {
    let tr = TestRelay::start_with(|o| o.session_retention = std::time::Duration::from_secs(1));
    let agent = tr.agent().await;
    let key = Some(tr.owner_key());
    let mut sids = Vec::new();
    for _ in 0..3 {
        let r = tr.call("POST", "/v1/sessions", key, Some(&start_body(&agent.id))).await;
        assert_eq!(r.status, 201, "{}", r.text);
        sids.push(r.json()["session_id"].as_str().unwrap().to_owned());
    }
    for sid in &sids[..2] {
        let r = tr.call("DELETE", &format!("/v1/sessions/{sid}"), key, None).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    wait_until(|| sids[..2].iter().all(|s| tr.store().session(None, s).unwrap().is_none())).await;
    tr.call("GET", &format!("/v1/sessions/{}", sids[0]), key, None)
        .await
        .assert_error(404, "SessionNotFound");
    // The open one is never pruned, however old.
    let r = tr.call("GET", &format!("/v1/sessions/{}", sids[2]), key, None).await;
    assert_eq!(r.json()["state"], "pending");
    let m = tr.call("GET", "/metrics", None, None).await;
    assert!(m.text.contains("hatch_sessions_pruned_total 2"), "{}", m.text);
}

/// With the default retention (90 days), a record closed just now stays.
#[tokio::test]
async fn default_retention_keeps_recent_records() {
    let tr = TestRelay::start();
    let agent = tr.agent().await;
    let key = Some(tr.owner_key());
    let r = tr.call("POST", "/v1/sessions", key, Some(&start_body(&agent.id))).await;
    let sid = r.json()["session_id"].as_str().unwrap().to_owned();
    tr.call("DELETE", &format!("/v1/sessions/{sid}"), key, None).await;
    // Prune runs at start and then every 60 s: the first run has passed once a request is in.
    let r = tr.call("GET", &format!("/v1/sessions/{sid}"), key, None).await;
    assert_eq!(r.json()["state"], "closed");
    let m = tr.call("GET", "/metrics", None, None).await;
    assert!(m.text.contains("hatch_sessions_pruned_total 0"), "{}", m.text);
}

/// Measurement, not a check: session setups per second through the API (8 concurrent callers,
/// one connection per request). `cargo test -p hatch-relay --test api_sessions -- --ignored
/// --nocapture setup_rate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn setup_rate() {
    let tr = std::sync::Arc::new(TestRelay::start_with(|o| {
        o.limits.per_instance = 100_000;
        o.limits.per_user = 100_000;
        o.limits.start_rate = hatch_relay::control::live::Rate::OFF;
    }));
    let agent = tr.agent().await;
    let body = start_body(&agent.id);
    let n_tasks = 8;
    let per_task = 250;
    let t0 = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n_tasks {
        let tr = tr.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..per_task {
                let t = std::time::Instant::now();
                let r = tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&body)).await;
                assert_eq!(r.status, 201, "{}", r.text);
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let secs = t0.elapsed().as_secs_f64();
    all.sort();
    let p = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    println!(
        "{} sessions in {secs:.2} s: {:.0}/s, p50 {:?}, p99 {:?} (each request a new TCP+TLS connection)",
        all.len(),
        all.len() as f64 / secs,
        p(0.5),
        p(0.99)
    );
    drop(agent);
}

#[tokio::test]
async fn silent_agent_is_dropped_after_the_heartbeat_deadline() {
    let tr = TestRelay::start_with(|o| o.heartbeat_interval = std::time::Duration::from_millis(50));
    let agent = tr.agent().await;
    // The test agent reads nothing and so answers no heartbeat: offline after 3 intervals.
    wait_until(|| !tr.relay.server().control().agent_online(&agent.id)).await;
    tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&start_body(&agent.id)))
        .await
        .assert_error(409, "TargetNotConnected");
}

#[tokio::test]
async fn session_failed_from_the_agent_closes_the_session_as_error() {
    use futures_util::SinkExt;
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let r =
        tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let sid = r.json()["session_id"].as_str().unwrap().to_owned();
    let Some(ToAgent::SessionOpen { session_id, .. }) = agent.next().await else { panic!() };
    assert_eq!(session_id, sid);
    let failed = serde_json::to_string(&hatch_proto::control::FromAgent::SessionFailed {
        session_id: sid.clone(),
        message: "no such user".into(),
    })
    .unwrap();
    agent
        .ws
        .as_mut()
        .unwrap()
        .send(tokio_tungstenite::tungstenite::Message::Text(failed.into()))
        .await
        .unwrap();
    wait_until(|| {
        tr.store().session(None, &sid).unwrap().unwrap().close_reason.map(|r| r.as_str())
            == Some("error")
    })
    .await;
}

#[tokio::test]
async fn session_list_pages_with_next_token() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let key = Some(tr.owner_key());
    let mut ids = Vec::new();
    for _ in 0..5 {
        let r = tr.call("POST", "/v1/sessions", key, Some(&start_body(&agent.id))).await;
        assert_eq!(r.status, 201, "{}", r.text);
        let sid = r.json()["session_id"].as_str().unwrap().to_owned();
        let open = agent.next().await;
        assert!(
            matches!(&open, Some(ToAgent::SessionOpen { session_id, .. }) if *session_id == sid),
            "{open:?}"
        );
        ids.push(sid);
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut path = "/v1/sessions?limit=2".to_owned();
    loop {
        let v = tr.call("GET", &path, key, None).await.json();
        for s in v["sessions"].as_array().unwrap() {
            seen.push(s["session_id"].as_str().unwrap().to_owned());
        }
        match v["next_token"].as_str() {
            Some(t) => path = format!("/v1/sessions?limit=2&next_token={t}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);
}

#[tokio::test]
async fn agent_stream_url_comes_from_the_agents_own_view_not_the_clients_host() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let r = api_support::request_with_host(
        tr.tls.clone(),
        tr.api_addr(),
        "127.0.0.1".parse().unwrap(),
        "evil.example:1",
        "POST",
        "/v1/sessions",
        Some(tr.owner_key()),
        Some(start_body(&agent.id).into_bytes()),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let port = tr.relay.server().data_addr().port();
    assert!(
        r.json()["stream_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("wss://evil.example:{port}/"))
    );
    let Some(ToAgent::SessionOpen { stream_url, .. }) = agent.next().await else { panic!() };
    assert!(stream_url.starts_with(&format!("wss://localhost:{port}/")), "{stream_url}");
}

#[tokio::test]
async fn per_account_limit_throttles_across_instances() {
    let tr = TestRelay::start_with(|o| o.limits.per_account = 2);
    let a = tr.agent().await;
    let b = tr.agent().await;
    let key = Some(tr.owner_key());
    for id in [&a.id, &b.id] {
        let r = tr.call("POST", "/v1/sessions", key, Some(&start_body(id))).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let v = tr
        .call("POST", "/v1/sessions", key, Some(&start_body(&b.id)))
        .await
        .assert_error(429, "Throttled");
    assert!(v["message"].as_str().unwrap().contains("account"), "{v}");
}

#[test]
fn dev_relay_restart_keeps_its_demo_account_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let opts =
        || hatch_relay::dev::DevOptions { data_dir: dir.path().join("d"), ..Default::default() };
    let first = hatch_relay::dev::DevRelay::start(opts()).unwrap().info.clone();
    let second = hatch_relay::dev::DevRelay::start(opts()).unwrap();
    assert_eq!(second.info.account_id, first.account_id);
    assert_eq!(second.info.access_key, first.access_key);
    let written: hatch_relay::dev::DevInfo =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("d/dev.json")).unwrap())
            .unwrap();
    assert_eq!(written, second.info);
    let port = second.server().api_addr().port();
    assert_eq!(written.api_url, format!("https://127.0.0.1:{port}"));
    let port = second.server().data_addr().port();
    assert_ne!(port, 0);
    assert_eq!(written.data_url, format!("wss://127.0.0.1:{port}"));
}

#[tokio::test]
async fn agent_session_reports_raise_counts_of_its_own_lost_sessions_only() {
    use futures_util::SinkExt;
    use hatch_proto::control::FromAgent;
    use tokio_tungstenite::tungstenite::Message;
    async fn say(agent: &mut Agent, text: String) {
        agent.ws.as_mut().unwrap().send(Message::Text(text.into())).await.unwrap();
    }
    fn report(sid: &str, c2a: u64, a2c: u64) -> String {
        serde_json::to_string(&FromAgent::SessionReport {
            session_id: sid.into(),
            bytes_client_to_agent: c2a,
            bytes_agent_to_client: a2c,
            exit_code: None,
        })
        .unwrap()
    }
    let tr = TestRelay::start();
    let key = Some(tr.owner_key());
    let mut a = tr.agent().await;
    let mut b = tr.agent().await;
    let mut sids = Vec::new();
    for agent in [&mut a, &mut b] {
        let r = tr.call("POST", "/v1/sessions", key, Some(&start_body(&agent.id))).await;
        assert_eq!(r.status, 201, "{}", r.text);
        let sid = r.json()["session_id"].as_str().unwrap().to_owned();
        let open = agent.next().await;
        assert!(
            matches!(&open, Some(ToAgent::SessionOpen { session_id, .. }) if *session_id == sid),
            "{open:?}"
        );
        sids.push(sid);
    }
    let (sa, sb) = (&sids[0], &sids[1]);
    // Both as a restarted relay leaves sessions a killed one had open.
    for sid in [sa, sb] {
        assert!(
            tr.store()
                .close_session(
                    sid,
                    hatch_relay::plane::CloseReason::RelayShutdown,
                    10,
                    20,
                    now() as i64
                )
                .unwrap()
        );
    }
    let counts = |sid: &str| {
        let r = tr.store().session(None, sid).unwrap().unwrap();
        (
            r.close_reason.map_or(String::new(), |r| r.as_str().to_owned()),
            r.bytes_client_to_agent,
            r.bytes_agent_to_client,
        )
    };
    // Agent b, hostile: reports a's session, sends a message type from the future and a
    // report for an id that exists nowhere; then its own session, which is applied. Its
    // channel is read in order, so once its own counts show, the rest was handled.
    say(&mut b, report(sa, 1 << 40, 1 << 40)).await;
    say(&mut b, r#"{"type":"session.later","session_id":"x"}"#.into()).await;
    say(&mut b, report("s-ffffffffffffffff", 5, 5)).await;
    say(&mut b, report(sb, 11, 5)).await;
    wait_until(|| counts(sb) == ("relay_shutdown".into(), 11, 20)).await;
    assert_eq!(counts(sa), ("relay_shutdown".into(), 10, 20));
    // Agent a's own report: counts only grow (c2a lower than stored stays 10).
    say(&mut a, report(sa, 7, 33)).await;
    wait_until(|| counts(sa) == ("relay_shutdown".into(), 10, 33)).await;
    // Both channels survived it all.
    assert!(tr.relay.server().control().agent_online(&a.id));
    assert!(tr.relay.server().control().agent_online(&b.id));
}

#[tokio::test]
async fn an_agent_that_only_pings_is_dropped_after_the_heartbeat_deadline() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let tr = TestRelay::start_with(|o| o.heartbeat_interval = std::time::Duration::from_millis(50));
    let mut agent = tr.agent().await;
    let ws = agent.ws.as_mut().unwrap();
    // Pings every 10 ms and reads every answer, but answers no heartbeat: pings are not
    // liveness, so the relay closes the channel at the deadline (3 intervals) with 1001.
    let mut ping = tokio::time::interval(std::time::Duration::from_millis(10));
    let code = tokio::time::timeout(DEADLINE, async {
        loop {
            tokio::select! {
                _ = ping.tick() => {
                    if ws.send(Message::Ping(b"alive?".to_vec().into())).await.is_err() {
                        return None;
                    }
                }
                m = ws.next() => match m {
                    Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return None,
                },
            }
        }
    })
    .await
    .expect("a channel that only pings was kept open");
    assert_eq!(code, Some(1001));
    wait_until(|| !tr.relay.server().control().agent_online(&agent.id)).await;
}

/// `tty` goes to the agent as asked, and absent stays absent (an older client's request).
#[tokio::test]
async fn exec_tty_is_passed_to_the_agent_as_asked() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    for (tty, want) in [(",\"tty\":false", Some(false)), (",\"tty\":true", Some(true)), ("", None)]
    {
        let body =
            format!(r#"{{"instance_id":"{}","mode":"exec","command":["true"]{tty}}}"#, agent.id);
        let r = tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        match agent.next().await {
            Some(ToAgent::SessionOpen { tty, .. }) => assert_eq!(tty, want, "{body}"),
            other => panic!("expected session.open, got {other:?}"),
        }
    }
}
