//! Control plane and data plane together, over real TLS on loopback: tokens the control plane
//! issues open legs on the data plane exactly once; terminate and the account switch end live
//! sessions with their close codes; session records follow the data plane's reports.

mod api_support;

use api_support::{TestRelay, close_code, dial_stream, open_session, wait_until};
use futures_util::{SinkExt, StreamExt};
use hatch_proto::token::Role;
use hatch_relay::control::store::Store;
use tokio_tungstenite::tungstenite::Message;

fn session_state(tr: &TestRelay, sid: &str) -> (String, Option<String>, u64) {
    let s = tr.store().session(None, sid).unwrap().unwrap();
    (s.state.to_string(), s.close_reason.map(|r| r.to_string()), s.bytes_client_to_agent)
}

#[tokio::test]
async fn issued_tokens_pair_legs_and_terminate_closes_both_with_4006() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let (sid, mut client, mut leg) = open_session(&tr, &mut agent).await;
    wait_until(|| session_state(&tr, &sid).0 == "connected").await;

    // DATA "hi" client → agent, opaque to the relay.
    client.send(Message::Binary(vec![0x01, b'h', b'i'].into())).await.unwrap();
    let got =
        tokio::time::timeout(api_support::DEADLINE, leg.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.into_data().as_ref(), &[0x01, b'h', b'i']);

    let r = tr.call("DELETE", &format!("/v1/sessions/{sid}"), Some(tr.owner_key()), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(close_code(&mut client).await, Some(4006));
    assert_eq!(close_code(&mut leg).await, Some(4006));
    // The record says terminated, and gets the byte counts the data plane reports.
    wait_until(|| session_state(&tr, &sid) == ("closed".into(), Some("terminated".into()), 3))
        .await;
}

#[tokio::test]
async fn switch_off_ends_live_sessions_with_4010() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let (sid, mut client, mut leg) = open_session(&tr, &mut agent).await;
    let r = tr
        .call(
            "PUT",
            "/v1/account/settings",
            Some(tr.owner_key()),
            Some(r#"{"session_manager_enabled":false}"#),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(close_code(&mut client).await, Some(4010));
    assert_eq!(close_code(&mut leg).await, Some(4010));
    assert_eq!(session_state(&tr, &sid).0, "closed");
}

#[tokio::test]
async fn data_plane_refuses_reused_wrong_role_tampered_and_expired_tokens() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let r = tr
        .call(
            "POST",
            "/v1/sessions",
            Some(tr.owner_key()),
            Some(&api_support::start_body(&agent.id)),
        )
        .await;
    let s: hatch_proto::api::StartSessionResponse = serde_json::from_str(&r.text).unwrap();
    let open = agent.next().await;
    assert!(
        matches!(&open, Some(hatch_proto::control::ToAgent::SessionOpen { session_id, .. }) if *session_id == s.session_id),
        "{open:?}"
    );

    // Wrong role: the client token on the agent URL.
    let agent_url = s.stream_url.replace("role=client", "role=agent");
    assert_eq!(
        dial_stream(&tr, &agent_url, &s.token).await.err(),
        Some((401, "InvalidToken".into()))
    );
    // Tampered: one character of the signature changed.
    let mut t = s.token.clone().into_bytes();
    let last = t.len() - 2;
    t[last] = if t[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(t).unwrap();
    assert_eq!(
        dial_stream(&tr, &s.stream_url, &tampered).await.err(),
        Some((401, "InvalidToken".into()))
    );
    // Expired: signed by this relay's key eleven minutes ago.
    let (signer, _) = hatch_relay::control::signing::load_or_create(tr.relay.data_dir()).unwrap();
    let past = hatch_relay::control::unix_now() as u64 - 660;
    let (old, _) =
        signer.issue(&s.session_id, Role::Client, &agent.id, tr.account(), past).unwrap();
    assert_eq!(
        dial_stream(&tr, &s.stream_url, &old).await.err(),
        Some((401, "TokenExpired".into()))
    );
    // Reused: the real token opens once, then never again.
    let first = dial_stream(&tr, &s.stream_url, &s.token).await;
    assert!(first.is_ok(), "{:?}", first.err());
    assert_eq!(
        dial_stream(&tr, &s.stream_url, &s.token).await.err(),
        Some((409, "TokenAlreadyUsed".into()))
    );
}

#[tokio::test]
async fn legs_closing_are_recorded_with_reason_and_bytes() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let (sid, mut client, mut leg) = open_session(&tr, &mut agent).await;
    leg.send(Message::Binary(vec![0x01, b'o', b'k', b'\n'].into())).await.unwrap();
    let got =
        tokio::time::timeout(api_support::DEADLINE, client.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.into_data().len(), 4);
    client.close(None).await.unwrap();
    wait_until(|| session_state(&tr, &sid).0 == "closed").await;
    let s = tr.store().session(None, &sid).unwrap().unwrap();
    assert_eq!(s.close_reason.map(|r| r.as_str()), Some("client_closed"));
    assert_eq!(s.bytes_agent_to_client, 4);
    let r = tr.call("GET", "/metrics", None, None).await;
    assert!(
        r.text.contains("hatch_sessions_closed_total{reason=\"client_closed\"} 1"),
        "{}",
        r.text
    );
}

/// Without a resume window, a shutdown closes what is open as `relay_shutdown`.
#[tokio::test]
async fn shutdown_records_open_sessions_as_relay_shutdown() {
    let tr = TestRelay::start_with(|o| o.data_args = vec!["--resume-window".into(), "0".into()]);
    let mut agent = tr.agent().await;
    let (sid, _client, _leg) = open_session(&tr, &mut agent).await;
    let TestRelay { relay, dir: _dir, store, .. } = tr;
    relay.shutdown(std::time::Duration::ZERO);
    let s = store.session(None, &sid).unwrap().unwrap();
    assert_eq!(
        (s.state.as_str(), s.close_reason.map(|r| r.as_str())),
        ("closed", Some("relay_shutdown"))
    );
}

/// With a resume window (the default), a shutdown leaves a paired session open for the next
/// start, with its byte counts; one that never paired is closed. The next start keeps the
/// paired one `detached` and its owner can resume it.
#[tokio::test]
async fn shutdown_with_a_window_leaves_paired_sessions_for_the_next_start() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    let (sid, mut client, mut leg) = open_session(&tr, &mut agent).await;
    wait_until(|| session_state(&tr, &sid).0 == "connected").await;
    client.send(Message::Binary(vec![0x01, b'h', b'i'].into())).await.unwrap();
    let got =
        tokio::time::timeout(api_support::DEADLINE, leg.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.into_data().as_ref(), &[0x01, b'h', b'i']);
    let r = tr
        .call(
            "POST",
            "/v1/sessions",
            Some(tr.owner_key()),
            Some(&api_support::start_body(&agent.id)),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let pending = r.json()["session_id"].as_str().unwrap().to_owned();
    let owner_key = tr.owner_key().to_owned();
    let TestRelay { relay, dir, store, tls } = tr;
    relay.shutdown(std::time::Duration::ZERO);
    let s = store.session(None, &sid).unwrap().unwrap();
    assert_eq!((s.state.as_str(), s.close_reason.map(|r| r.as_str())), ("detached", None));
    assert_eq!(s.bytes_client_to_agent, 3);
    let p = store.session(None, &pending).unwrap().unwrap();
    assert_eq!(
        (p.state.as_str(), p.close_reason.map(|r| r.as_str())),
        ("closed", Some("relay_shutdown"))
    );

    let again = hatch_relay::dev::DevRelay::start(hatch_relay::dev::DevOptions {
        data_dir: dir.path().join("relay"),
        ..Default::default()
    })
    .unwrap();
    let tr = TestRelay { relay: again, dir, store, tls };
    let r = tr.call("GET", &format!("/v1/sessions/{sid}"), Some(&owner_key), None).await;
    assert_eq!(r.json()["state"], "detached", "{}", r.text);
    let r = tr.call("POST", &format!("/v1/sessions/{sid}/resume"), Some(&owner_key), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The tokens of the previous run open nothing on the new one; the resume token is of it.
    let s: hatch_proto::api::ResumeSessionResponse = serde_json::from_str(&r.text).unwrap();
    assert!(s.stream_url.ends_with(&format!("/v1/stream/{sid}?role=client")), "{}", r.text);
}

#[tokio::test]
async fn admin_changes_in_the_store_reach_live_sessions() {
    let tr = TestRelay::start();
    let mut agent = tr.agent().await;
    // `hatch-relay admin sessions terminate` from another process: a store write.
    let (sid, mut client, mut leg) = open_session(&tr, &mut agent).await;
    assert!(
        tr.store()
            .close_session(
                &sid,
                hatch_relay::plane::CloseReason::Terminated,
                0,
                0,
                hatch_relay::control::unix_now()
            )
            .unwrap()
    );
    assert_eq!(close_code(&mut client).await, Some(4006));
    assert_eq!(close_code(&mut leg).await, Some(4006));
    let closed = agent.next().await;
    assert!(
        matches!(&closed, Some(hatch_proto::control::ToAgent::SessionClose { session_id, .. }) if *session_id == sid),
        "{closed:?}"
    );

    // `hatch-relay admin accounts disable`: live sessions end with 4010.
    let (_sid, mut client, mut leg) = open_session(&tr, &mut agent).await;
    assert!(tr.store().set_session_manager(tr.account(), false).unwrap());
    assert_eq!(close_code(&mut client).await, Some(4010));
    assert_eq!(close_code(&mut leg).await, Some(4010));
}
