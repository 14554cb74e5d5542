//! What a relay restart must not forget, with the real `hatch-relay dev` process killed and
//! started again on the same ports and data directory: a token opens one leg once, across
//! restarts too, and no leg of a session the store records as closed pairs again, nor a leg
//! of a paired session kept open across the restart with a token of the previous run.

use hatch_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leg_of_a_session_from_before_a_restart_pairs_again() {
    let relay = Relay::start(&[]);
    let mut agent = relay.agent().await;

    // Ended before the restart, with byte counts.
    let (ended, mut c, mut a) = relay.open(&mut agent).await;
    send_bin(&mut c, b"\x01abc").await;
    assert_eq!(recv_bin(&mut a).await, b"\x01abc");
    c.close(None).await.unwrap();
    let before = relay.closed_session(&ended.id).await;
    assert_eq!(before["bytes_client_to_agent"], 4, "{before}");
    // Deleted while pending.
    let deleted = relay.start_session(&mut agent).await;
    let r = relay
        .call("DELETE", &format!("/v1/sessions/{}", deleted.id), Some(&relay.info.access_key), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(relay.closed_session(&deleted.id).await["close_reason"], "terminated");
    let told = agent.next().await;
    assert!(
        matches!(&told, Some(hatch_proto::control::ToAgent::SessionClose { session_id, .. })
            if *session_id == deleted.id),
        "{told:?}"
    );
    // Live at the kill, and pending (no leg came) at the kill.
    let (live, mut lc, mut la) = relay.open(&mut agent).await;
    send_bin(&mut lc, b"\x01x").await;
    assert_eq!(recv_bin(&mut la).await, b"\x01x");
    let pending = relay.start_session(&mut agent).await;

    let relay = relay.restart();
    drop((lc, la, agent));
    // With the default resume window the paired session outlives the restart (`detached`,
    // resumable only with a resume token of the new run); the one that never paired is closed.
    let kept = relay.session(&live.id).await;
    assert_eq!(
        (&kept["state"], &kept["close_reason"]),
        (&"detached".into(), &serde_json::Value::Null)
    );
    assert_eq!(relay.closed_session(&pending.id).await["close_reason"], "relay_shutdown");

    for s in [&ended, &deleted, &live, &pending] {
        for (role, url, token) in
            [("agent", &s.agent_url, &s.agent_token), ("client", &s.client_url, &s.client_token)]
        {
            match leg(&relay, url, token).await {
                Err((409, code)) => assert_eq!(code, "TokenAlreadyUsed", "{} {role}", s.id),
                Err(other) => panic!("{} {role}: refused with {other:?}, expected 409", s.id),
                Ok(_) => panic!("{} {role}: a leg from before the restart was admitted", s.id),
            }
        }
    }
    // The closed record kept its counts: nothing of it ran again.
    let after = relay.session(&ended.id).await;
    assert_eq!(after["bytes_client_to_agent"], before["bytes_client_to_agent"], "{after}");
    assert_eq!(after["bytes_agent_to_client"], before["bytes_agent_to_client"], "{after}");
    assert_eq!(after["close_reason"], "client_closed");
    // New sessions work as before.
    let mut agent = relay.agent().await;
    relay.still_serves(&mut agent).await;
}
