//! Durable sessions in the control plane, over the real HTTPS API and real agent control
//! channels: `POST /v1/sessions/{id}/resume` (who may, with which answers), the agent's
//! `session.resume`, the `detached` state the data plane's events set, and a restart with a
//! resume window keeping paired sessions resumable until the window ends.
//!
//! The control plane runs here with a recording data link: the data plane's events are sent by
//! the test (as the shards would send them) and its commands are recorded, so each state is
//! reached exactly and the commands the control plane gives can be checked.

mod api_support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use api_support::{DEADLINE, Resp, connect_control, next_message, request, wait_until};
use futures_util::SinkExt;
use hatch_proto::api::{ResumeSessionResponse, StartSessionResponse};
use hatch_proto::control::{FromAgent, RegisterRequest, RegisterResponse, ToAgent};
use hatch_proto::token::Role;
use hatch_relay::control::store::{SessionRecord, SqliteStore, Store};
use hatch_relay::control::{ControlConfig, ControlPlane, DataLink, http::TlsSlot, iam};
use hatch_relay::plane::{DataCommand, DataEvent};
use hatch_relay::token::{TokenSigner, TokenVerifier};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Records what the control plane tells the data plane.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<DataCommand>>>);

impl DataLink for Recorder {
    fn command(&self, cmd: DataCommand) {
        self.0.lock().unwrap().push(cmd);
    }
}

impl Recorder {
    fn terminated(&self, sid: &str) -> Option<u16> {
        self.0.lock().unwrap().iter().find_map(|c| match c {
            DataCommand::Terminate { session_id, code } if session_id == sid => Some(*code),
            _ => None,
        })
    }
}

/// An account with an owner key and an activation, in a store in `dir`.
struct Setup {
    account: String,
    owner_key: String,
    owner_key_id: String,
    activation: (String, String),
}

fn setup(store: &dyn Store) -> Setup {
    let account = iam::create_account(store, "t").unwrap().id;
    let (k, owner_key) = iam::create_access_key(store, &account, None).unwrap();
    let (act, code) = iam::create_activation(
        store,
        &account,
        "eu-1",
        Default::default(),
        100,
        Duration::from_secs(600),
    )
    .unwrap();
    Setup { account, owner_key, owner_key_id: k.id, activation: (act.id, code) }
}

/// A control plane serving its API over TLS on loopback, with a recording data link.
struct Relay {
    control: ControlPlane,
    store: Arc<SqliteStore>,
    events: mpsc::UnboundedSender<DataEvent>,
    link: Recorder,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    verifier: TokenVerifier,
    stop: CancellationToken,
    started: Instant,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn config(window: Duration) -> ControlConfig {
    ControlConfig { resume_window: window, ..ControlConfig::default() }
}

impl Relay {
    async fn start(dir: &Path, cfg: ControlConfig) -> Relay {
        let store = Arc::new(SqliteStore::open(&dir.join("hatch.db")).unwrap());
        let pki = hatch_relay::certs::ensure_dev_pki(&dir.join("tls"), &[]).unwrap();
        let server_tls =
            hatch_relay::certs::server_config(&pki.cert_file, &pki.key_file, &[b"http/1.1"])
                .unwrap();
        let tls = hatch_relay::certs::client_config_with_ca(&pki.ca_file).unwrap();
        let (signer, _) = TokenSigner::generate("k1").unwrap();
        let verifier = TokenVerifier::for_signer(&signer);
        let link = Recorder::default();
        let started = Instant::now();
        let control =
            ControlPlane::new(cfg, store.clone(), signer, Arc::new(link.clone())).unwrap();
        let (events, rx) = mpsc::unbounded_channel();
        control.spawn_tasks(rx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (c, s) = (control.clone(), stop.clone());
        let control = control.clone();
        tokio::spawn(async move { c.serve_api(listener, TlsSlot::tls(server_tls), s).await });
        Relay { control, store, events, link, addr, tls, verifier, stop, started }
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Option<&str>) -> Resp {
        let body = body.map(|b| b.as_bytes().to_vec());
        let source = "127.0.0.1".parse().unwrap();
        let fut = request(self.tls.clone(), self.addr, source, method, path, Some(key), body);
        tokio::time::timeout(DEADLINE, fut).await.expect("request timed out")
    }

    async fn resume(&self, sid: &str, key: &str, body: Option<&str>) -> Resp {
        self.call("POST", &format!("/v1/sessions/{sid}/resume"), key, body).await
    }

    async fn get(&self, sid: &str, key: &str) -> Value {
        let r = self.call("GET", &format!("/v1/sessions/{sid}"), key, None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()
    }

    async fn metrics(&self, key: &str) -> String {
        self.call("GET", "/metrics", key, None).await.text
    }

    fn send(&self, ev: DataEvent) {
        self.events.send(ev).unwrap();
    }

    fn state(&self, sid: &str) -> String {
        self.store.session(None, sid).unwrap().unwrap().state.as_str().to_owned()
    }

    /// Registers an agent and opens its control channel.
    async fn agent(&self, s: &Setup) -> (String, api_support::Ws) {
        let body = serde_json::to_string(&RegisterRequest {
            activation_id: s.activation.0.clone(),
            activation_code: s.activation.1.clone(),
            hostname: None,
        })
        .unwrap();
        let source = "127.0.0.1".parse().unwrap();
        let r = request(
            self.tls.clone(),
            self.addr,
            source,
            "POST",
            "/v1/agent/register",
            None,
            Some(body.into_bytes()),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let reg: RegisterResponse = serde_json::from_str(&r.text).unwrap();
        let ws = connect_control(self.tls.clone(), self.addr, &reg.instance_secret).await.unwrap();
        // Online once the hello is in: a session start then finds the agent.
        wait_until(|| self.control.agent_online(&reg.instance_id)).await;
        (reg.instance_id, ws)
    }

    /// Starts a session on `instance` with `key`; the agent's session.open is read.
    async fn start_session(&self, key: &str, instance: &str, ws: &mut api_support::Ws) -> String {
        let body = api_support::start_body(instance);
        let r = self.call("POST", "/v1/sessions", key, Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        let s: StartSessionResponse = serde_json::from_str(&r.text).unwrap();
        let open = next_message(ws).await;
        assert!(
            matches!(&open, Some(ToAgent::SessionOpen { session_id, .. }) if *session_id == s.session_id),
            "{open:?}"
        );
        s.session_id
    }

    /// A started session made `connected` by the data plane's report.
    async fn connected_session(&self, key: &str, inst: &str, ws: &mut api_support::Ws) -> String {
        let sid = self.start_session(key, inst, ws).await;
        self.send(DataEvent::Connected { session_id: sid.clone(), at: SystemTime::now() });
        wait_until(|| self.state(&sid) == "connected").await;
        sid
    }

    async fn detach(&self, sid: &str) {
        self.send(DataEvent::Detached { session_id: sid.to_owned(), at: SystemTime::now() });
        wait_until(|| self.state(sid) == "detached").await;
    }
}

/// Sends an agent's control message.
async fn agent_says(ws: &mut api_support::Ws, msg: &FromAgent) {
    ws.send(Message::Text(serde_json::to_string(msg).unwrap().into())).await.unwrap();
}

/// A user of the account with `policy` attached; returns (user id, access key).
fn user_with(store: &dyn Store, account: &str, name: &str, policy: &str) -> (String, String) {
    let u = iam::create_user(store, account, name).unwrap();
    iam::put_policy(store, account, name, policy).unwrap();
    iam::attach_policy(store, account, &u.id, name).unwrap();
    let key = iam::create_access_key(store, account, Some(&u.id)).unwrap().1;
    (u.id, key)
}

const ALLOW_ALL: &str = r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#;

fn now() -> u64 {
    hatch_relay::control::unix_now() as u64
}

/// The owner resumes a detached session: 200 with a client resume token for that session (the
/// body may be left out); GET shows `detached` while the data plane says so and `connected`
/// again after its `Resumed`; the gauge follows.
#[tokio::test]
async fn owner_resumes_a_detached_session_with_a_client_resume_token() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), config(Duration::from_secs(600))).await;
    let s = setup(relay.store.as_ref());
    let (inst, mut ws) = relay.agent(&s).await;
    let sid = relay.connected_session(&s.owner_key, &inst, &mut ws).await;

    relay.detach(&sid).await;
    let info = relay.get(&sid, &s.owner_key).await;
    assert_eq!(info["state"], "detached", "{info}");
    assert!(info["detached_at"].is_string(), "{info}");
    let active = relay.call("GET", "/v1/sessions?state=active", &s.owner_key, None).await;
    assert_eq!(active.json()["sessions"][0]["session_id"], sid.as_str(), "{}", active.text);
    let m = relay.metrics(&s.owner_key).await;
    assert!(m.contains("hatch_sessions_active{state=\"detached\"} 1"), "{m}");
    assert!(m.contains("hatch_sessions_active{state=\"connected\"} 0"), "{m}");

    for body in [None, Some(""), Some("{}")] {
        let r = relay.resume(&sid, &s.owner_key, body).await;
        assert_eq!(r.status, 200, "{body:?}: {}", r.text);
        let got: ResumeSessionResponse = serde_json::from_str(&r.text).unwrap();
        assert_eq!(got.session_id, sid);
        assert!(got.stream_url.ends_with(&format!("/v1/stream/{sid}?role=client")), "{got:?}");
        let claims = relay.verifier.verify(&got.token, &sid, Role::Client, now()).unwrap();
        assert!(claims.res, "{claims:?}");
        assert_eq!((claims.role, claims.instance.as_str()), (Role::Client, inst.as_str()));
        // An agent token it is not.
        assert!(relay.verifier.verify(&got.token, &sid, Role::Agent, now()).is_err());
    }
    let m = relay.metrics(&s.owner_key).await;
    assert!(m.contains("hatch_resume_tokens_total{role=\"client\"} 3"), "{m}");

    relay.send(DataEvent::Resumed { session_id: sid.clone(), at: SystemTime::now() });
    wait_until(|| relay.state(&sid) == "connected").await;
    assert_eq!(relay.get(&sid, &s.owner_key).await["state"], "connected");
    let m = relay.metrics(&s.owner_key).await;
    assert!(m.contains("hatch_sessions_active{state=\"detached\"} 0"), "{m}");
    assert!(m.contains("hatch_sessions_active{state=\"connected\"} 1"), "{m}");
}

/// Every refusal of a resume, with its status and code.
#[tokio::test]
async fn resume_refusals_say_why_with_stable_codes() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), config(Duration::from_secs(600))).await;
    let s = setup(relay.store.as_ref());
    let (inst, mut ws) = relay.agent(&s).await;
    let (_, alice) = user_with(relay.store.as_ref(), &s.account, "alice", ALLOW_ALL);
    let (_, bob) = user_with(relay.store.as_ref(), &s.account, "bob", ALLOW_ALL);

    // Connected (a client is attached): 409 SessionAttached; with force, a token.
    let sid = relay.connected_session(&alice, &inst, &mut ws).await;
    let v = relay.resume(&sid, &alice, None).await.assert_error(409, "SessionAttached");
    assert!(v["message"].as_str().unwrap().contains("force"), "{v}");
    relay
        .resume(&sid, &alice, Some(r#"{"force":false}"#))
        .await
        .assert_error(409, "SessionAttached");
    let r = relay.resume(&sid, &alice, Some(r#"{"force":true}"#)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let got: ResumeSessionResponse = serde_json::from_str(&r.text).unwrap();
    assert!(relay.verifier.verify(&got.token, &sid, Role::Client, now()).unwrap().res);

    // Another user's session, even with a policy allowing everything, and the owner too: the
    // answer of an unknown session (nothing says it exists).
    relay.detach(&sid).await;
    let unknown = relay.resume("s-0000000000000000", &alice, None).await;
    unknown.assert_error(404, "SessionNotFound");
    for key in [&bob, &s.owner_key] {
        let v = relay.resume(&sid, key, Some(r#"{"force":true}"#)).await;
        v.assert_error(404, "SessionNotFound");
    }
    relay.resume("not-an-id", &alice, None).await.assert_error(404, "SessionNotFound");
    // A body that is not the request's shape.
    relay.resume(&sid, &alice, Some("[1]")).await.assert_error(400, "InvalidRequest");

    // Pending (never paired) and closed: 409 SessionEnded.
    let pending = relay.start_session(&alice, &inst, &mut ws).await;
    let v = relay.resume(&pending, &alice, None).await.assert_error(409, "SessionEnded");
    assert!(v["message"].as_str().unwrap().contains("never connected"), "{v}");
    // Terminating a detached session ends it like a connected one.
    let r = relay.call("DELETE", &format!("/v1/sessions/{sid}"), &alice, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["close_reason"], "terminated", "{}", r.text);
    assert_eq!(relay.link.terminated(&sid), Some(hatch_proto::close::TERMINATED));
    assert!(matches!(next_message(&mut ws).await, Some(ToAgent::SessionClose { .. })));
    let v = relay.resume(&sid, &alice, Some(r#"{"force":true}"#)).await;
    v.assert_error(409, "SessionEnded");

    // The account switch off: as a start.
    let sid = relay.connected_session(&alice, &inst, &mut ws).await;
    relay.detach(&sid).await;
    assert!(relay.store.set_session_manager(&s.account, false).unwrap());
    relay.resume(&sid, &alice, None).await.assert_error(403, "SessionManagerDisabled");
}

/// A user whose policy no longer allows the session gets the 403 a start would get; another
/// user's policy narrowing does not reach a user who still has access. Evaluated as a start:
/// the recorded run-as user and the caller's address now.
#[tokio::test]
async fn a_user_who_lost_access_cannot_resume() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControlConfig {
        // The relay's own re-check of live sessions is not what this test looks at.
        reconcile_interval: Duration::from_secs(3600),
        ..config(Duration::from_secs(600))
    };
    let relay = Relay::start(dir.path(), cfg).await;
    let s = setup(relay.store.as_ref());
    let (inst, mut ws) = relay.agent(&s).await;
    let (uid, carol) = user_with(relay.store.as_ref(), &s.account, "carol", ALLOW_ALL);
    let sid = relay.connected_session(&carol, &inst, &mut ws).await;
    relay.detach(&sid).await;
    let r = relay.resume(&sid, &carol, None).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // A Deny on the user the session runs as (the fake agent's default user).
    let deny_run_as = format!(
        r#"{{"Statement":[{{"Effect":"Allow","Action":"*","Resource":"*"}},
        {{"Effect":"Deny","Action":"hatch:StartSession","Resource":"*",
        "Condition":{{"StringEquals":{{"hatch:RunAs":"{}"}}}}}}]}}"#,
        api_support::FAKE_AGENT_USER
    );
    iam::put_policy(relay.store.as_ref(), &s.account, "carol", &deny_run_as).unwrap();
    let v = relay.resume(&sid, &carol, None).await.assert_error(403, "AccessDenied");
    assert!(v["message"].as_str().unwrap().contains("hatch:StartSession"), "{v}");
    // Only from an address the user may not start from either.
    let office = r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*",
        "Condition":{"IpAddress":{"hatch:SourceIp":"10.9.9.0/24"}}}}"#;
    iam::put_policy(relay.store.as_ref(), &s.account, "carol", office).unwrap();
    relay.resume(&sid, &carol, None).await.assert_error(403, "AccessDenied");
    // No policy at all.
    assert!(relay.store.detach_policy(&s.account, &uid, "carol").unwrap());
    relay.resume(&sid, &carol, None).await.assert_error(403, "AccessDenied");
}

/// The relay's re-check of live sessions after an access change ends detached sessions too:
/// the data plane is told to terminate them (4012) and the record says `access_revoked`.
#[tokio::test]
async fn revocation_ends_detached_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControlConfig {
        reconcile_interval: Duration::from_millis(50),
        ..config(Duration::from_secs(600))
    };
    let relay = Relay::start(dir.path(), cfg).await;
    let s = setup(relay.store.as_ref());
    let (inst, mut ws) = relay.agent(&s).await;
    let (uid, dave) = user_with(relay.store.as_ref(), &s.account, "dave", ALLOW_ALL);
    let sid = relay.connected_session(&dave, &inst, &mut ws).await;
    relay.detach(&sid).await;
    assert!(relay.store.detach_policy(&s.account, &uid, "dave").unwrap());
    wait_until(|| relay.state(&sid) == "closed").await;
    let rec = relay.store.session(None, &sid).unwrap().unwrap();
    assert_eq!(rec.close_reason.map(|r| r.as_str()), Some("access_revoked"));
    // The record is closed first, then the data plane told.
    wait_until(|| relay.link.terminated(&sid).is_some()).await;
    assert_eq!(relay.link.terminated(&sid), Some(hatch_proto::close::ACCESS_REVOKED));
    let told = next_message(&mut ws).await;
    assert!(
        matches!(&told, Some(ToAgent::SessionClose { session_id, .. }) if *session_id == sid),
        "{told:?}"
    );
}

/// An agent's `session.resume` for a session of its own instance gets an agent resume token
/// for it; the same request from another instance's agent, for an unknown session, or for a
/// closed one gets `session.close` and no token.
#[tokio::test]
async fn agent_resume_answers_only_its_own_instances_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let relay = Relay::start(dir.path(), config(Duration::from_secs(600))).await;
    let s = setup(relay.store.as_ref());
    let (inst, mut ws) = relay.agent(&s).await;
    let (other, mut other_ws) = relay.agent(&s).await;
    let sid = relay.connected_session(&s.owner_key, &inst, &mut ws).await;

    for state in ["connected", "detached"] {
        if state == "detached" {
            relay.detach(&sid).await;
        }
        agent_says(&mut ws, &FromAgent::SessionResume { session_id: sid.clone() }).await;
        match next_message(&mut ws).await {
            Some(ToAgent::SessionResume { session_id, stream_url, token }) => {
                assert_eq!(session_id, sid);
                assert!(
                    stream_url.ends_with(&format!("/v1/stream/{sid}?role=agent")),
                    "{stream_url}"
                );
                let c = relay.verifier.verify(&token, &sid, Role::Agent, now()).unwrap();
                assert!(c.res, "{c:?}");
                assert_eq!(c.instance, inst);
            }
            m => panic!("{state}: expected session.resume, got {m:?}"),
        }
    }

    // Another instance's agent asks for it: refused as an unknown session, no token.
    agent_says(&mut other_ws, &FromAgent::SessionResume { session_id: sid.clone() }).await;
    match next_message(&mut other_ws).await {
        Some(ToAgent::SessionClose { session_id, reason }) => {
            assert_eq!(session_id, sid);
            assert_eq!(reason, "no such session on this instance");
        }
        m => panic!("another instance's agent got {m:?}"),
    }
    assert_ne!(other, inst);
    agent_says(&mut ws, &FromAgent::SessionResume { session_id: "s-0000000000000000".into() })
        .await;
    assert!(matches!(next_message(&mut ws).await, Some(ToAgent::SessionClose { .. })));
    let pending = relay.start_session(&s.owner_key, &inst, &mut ws).await;
    agent_says(&mut ws, &FromAgent::SessionResume { session_id: pending.clone() }).await;
    match next_message(&mut ws).await {
        Some(ToAgent::SessionClose { reason, .. }) => assert!(reason.contains("never paired")),
        m => panic!("pending: got {m:?}"),
    }
    let r = relay.call("DELETE", &format!("/v1/sessions/{sid}"), &s.owner_key, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The terminate's own session.close first.
    assert!(matches!(next_message(&mut ws).await, Some(ToAgent::SessionClose { .. })));
    agent_says(&mut ws, &FromAgent::SessionResume { session_id: sid.clone() }).await;
    match next_message(&mut ws).await {
        Some(ToAgent::SessionClose { session_id, reason }) => {
            assert_eq!((session_id.as_str(), reason.as_str()), (sid.as_str(), "session closed"));
        }
        m => panic!("closed: got {m:?}"),
    }
    let m = relay.metrics(&s.owner_key).await;
    assert!(m.contains("hatch_resume_tokens_total{role=\"agent\"} 2"), "{m}");
}

/// One agent's `session.resume` requests beyond the rate are dropped (no store read, no
/// signing, no answer) and counted.
#[tokio::test]
async fn agent_resume_requests_beyond_the_rate_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControlConfig {
        // Three at once, then one in 1000 s: nothing refills during the test.
        agent_resume_rate: hatch_relay::control::live::Rate { per_sec: 0.001, burst: 3 },
        ..config(Duration::from_secs(600))
    };
    let relay = Relay::start(dir.path(), cfg).await;
    let s = setup(relay.store.as_ref());
    let (inst, mut ws) = relay.agent(&s).await;
    let sid = relay.connected_session(&s.owner_key, &inst, &mut ws).await;
    for _ in 0..10 {
        agent_says(&mut ws, &FromAgent::SessionResume { session_id: sid.clone() }).await;
    }
    for i in 0..3 {
        let m = next_message(&mut ws).await;
        assert!(matches!(&m, Some(ToAgent::SessionResume { .. })), "answer {i}: {m:?}");
    }
    let end = Instant::now() + DEADLINE;
    loop {
        let m = relay.metrics(&s.owner_key).await;
        if m.contains("hatch_agent_resume_dropped_total 7") {
            // 10 asked, 7 dropped: exactly the 3 read above were answered.
            assert!(m.contains("hatch_resume_tokens_total{role=\"agent\"} 3"), "{m}");
            break;
        }
        assert!(Instant::now() < end, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The instance of the sessions a previous run left.
const INSTANCE: &str = "i-00000000000000aa";

/// A store as a previous run left it: an account, [`INSTANCE`] and `sessions` (id, state).
fn previous_run(dir: &Path, sessions: &[(&str, &str)]) -> Setup {
    let store = SqliteStore::open(&dir.join("hatch.db")).unwrap();
    let s = setup(&store);
    let code = hatch_relay::control::credentials::hash(&s.activation.1);
    let secret = hatch_relay::control::credentials::hash("secret");
    store.register_instance(&s.activation.0, &code, INSTANCE, &secret, None, 1).unwrap();
    for (i, (id, state)) in sessions.iter().enumerate() {
        store.insert_session(&record(id, &s, state, i as i64 + 1)).unwrap();
    }
    s
}

fn record(id: &str, s: &Setup, state: &str, seq_at: i64) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        account_id: s.account.clone(),
        principal: "owner".into(),
        // The owner's key: unrevoked, so the relay's re-check of live sessions keeps it.
        access_key_id: s.owner_key_id.clone(),
        source_ip: "127.0.0.1".into(),
        instance_id: INSTANCE.into(),
        mode: hatch_proto::api::Mode::Shell,
        command: None,
        run_as: Some("deploy".into()),
        state: hatch_relay::control::store::SessionState::parse(state).unwrap(),
        created_at: seq_at,
        expires_at: seq_at + 600,
        connected_at: (state != "pending").then_some(seq_at),
        closed_at: None,
        close_reason: None,
        bytes_client_to_agent: 7,
        bytes_agent_to_client: 70,
        detached_at: None,
        remote_host: None,
        remote_port: None,
        node_id: None,
        recording: Default::default(),
        recording_digest: None,
    }
}

/// A relay started on a store its previous run left with open sessions, with a resume
/// window: the paired ones are `detached` and resumable, the pending one is closed
/// (`relay_shutdown`); one resumed (both legs back: the data plane's `Connected` of its new
/// pairing) stays, and the other is closed as `relay_shutdown` only once the window ended, its
/// counts kept, any leg of it that came back alone closed with 4004.
#[tokio::test]
async fn restart_with_a_window_keeps_paired_sessions_resumable_until_it_ends() {
    const WINDOW: Duration = Duration::from_secs(5);
    let dir = tempfile::tempdir().unwrap();
    let s = previous_run(
        dir.path(),
        &[
            ("s-00000000000000c1", "connected"),
            ("s-00000000000000c2", "connected"),
            ("s-00000000000000d1", "detached"),
            ("s-00000000000000e1", "pending"),
        ],
    );
    let (left, resumed, was_detached, pending) =
        ("s-00000000000000c1", "s-00000000000000c2", "s-00000000000000d1", "s-00000000000000e1");
    let cfg = ControlConfig {
        // The sweep, a quarter of it, then looks at the recovered sessions every 100 ms.
        pending_timeout: Duration::from_millis(400),
        ..config(WINDOW)
    };
    let relay = Relay::start(dir.path(), cfg).await;
    let key = &s.owner_key;
    for sid in [left, resumed, was_detached] {
        let info = relay.get(sid, key).await;
        assert_eq!(info["state"], "detached", "{info}");
    }
    let p = relay.get(pending, key).await;
    assert_eq!((&p["state"], &p["close_reason"]), (&"closed".into(), &"relay_shutdown".into()));
    let m = relay.metrics(key).await;
    assert!(m.contains("hatch_sessions_active{state=\"detached\"} 3"), "{m}");
    // Resume tokens are of this run, so the restarted data plane admits them.
    let r = relay.resume(left, key, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let got: ResumeSessionResponse = serde_json::from_str(&r.text).unwrap();
    assert!(relay.verifier.verify(&got.token, left, Role::Client, now()).unwrap().res);
    relay.send(DataEvent::Connected { session_id: resumed.into(), at: SystemTime::now() });
    wait_until(|| relay.state(resumed) == "connected").await;
    relay.send(DataEvent::Resumed { session_id: was_detached.into(), at: SystemTime::now() });
    wait_until(|| relay.state(was_detached) == "connected").await;
    // This data plane counts a resumed session from 0: its counts add to the 7 / 70 the
    // previous run recorded.
    relay.send(DataEvent::Progress {
        session_id: was_detached.into(),
        bytes_client_to_agent: 3,
        bytes_agent_to_client: 30,
    });
    let end = Instant::now() + DEADLINE;
    loop {
        let rec = relay.store.session(None, was_detached).unwrap().unwrap();
        if (rec.bytes_client_to_agent, rec.bytes_agent_to_client) == (10, 100) {
            break;
        }
        assert!(Instant::now() < end, "counts {rec:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let end = Instant::now() + DEADLINE + WINDOW;
    while relay.state(left) != "closed" {
        assert!(Instant::now() < end, "not closed after the window");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(relay.started.elapsed() >= WINDOW, "closed before the window ended");
    let rec = relay.store.session(None, left).unwrap().unwrap();
    assert_eq!(rec.close_reason.map(|r| r.as_str()), Some("relay_shutdown"));
    assert_eq!((rec.bytes_client_to_agent, rec.bytes_agent_to_client), (7, 70));
    // The record is closed first, then the data plane told.
    wait_until(|| relay.link.terminated(left).is_some()).await;
    assert_eq!(relay.link.terminated(left), Some(hatch_proto::close::PEER_NEVER_CAME));
    // The resumed ones are the data plane's now: left alone.
    assert_eq!(relay.state(resumed), "connected");
    assert_eq!(relay.state(was_detached), "connected");
    assert_eq!(relay.link.terminated(resumed), None);
    relay.resume(left, key, None).await.assert_error(409, "SessionEnded");
}

/// Without a window a restart closes everything left open, as relays always did.
#[tokio::test]
async fn restart_without_a_window_closes_what_was_left_open() {
    let dir = tempfile::tempdir().unwrap();
    let sessions = [("s-00000000000000c1", "connected"), ("s-00000000000000d1", "detached")];
    let s = previous_run(dir.path(), &sessions);
    let relay = Relay::start(dir.path(), config(Duration::ZERO)).await;
    for sid in ["s-00000000000000c1", "s-00000000000000d1"] {
        let info = relay.get(sid, &s.owner_key).await;
        assert_eq!(info["close_reason"], "relay_shutdown", "{info}");
        relay.resume(sid, &s.owner_key, None).await.assert_error(409, "SessionEnded");
    }
}
