//! Data plane over real TLS on loopback, against both I/O backends: pairing, forwarding both
//! ways, close codes, refusals, timeouts, cross-shard handoff, terminate and shutdown.

mod data_support;

use std::time::Duration;

use data_support::*;
use futures_util::{SinkExt, StreamExt};
use hatch_proto::token::Role;
use hatch_relay::data::IoBackend;
use hatch_relay::plane::{CloseReason, DataCommand, DataEvent};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

both_backends!(
    legs_exchange_bytes_and_agent_exit_closes_both,
    client_close_is_forwarded_to_the_agent,
    agent_drop_closes_client_with_peer_gone,
    agent_close_codes_are_forwarded_and_recorded_by_cause,
    refusals_have_status_and_code,
    token_single_use_survives_the_session,
    pair_timeout_closes_with_4004,
    legs_on_different_shards_pair,
    terminate_closes_both_and_refuses_later_legs,
    shutdown_closes_live_legs_with_4009,
    idle_timeout_closes_with_4007,
    max_duration_closes_with_4008,
    plaintext_relay_forwards_too,
    reload_tls_serves_the_new_certificate_and_keeps_live_sessions,
    waiting_leg_that_hangs_up_ends_the_session_at_once,
    data_sent_while_waiting_arrives_after_pairing,
    forward_histogram_counts_every_forwarded_write,
    live_session_byte_counts_are_reported_on_the_progress_tick,
    idle_legs_hold_no_pooled_buffers,
);

async fn legs_exchange_bytes_and_agent_exit_closes_both(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let (mut c, mut a) = relay.pair("s-bytes").await;
    match tokio::time::timeout(WAIT, relay.events.recv()).await.unwrap().unwrap() {
        DataEvent::Connected { session_id, .. } => assert_eq!(session_id, "s-bytes"),
        other => panic!("{other:?}"),
    }
    send_bin(&mut c, b"\x02\x00\x50\x00\x18").await;
    send_bin(&mut c, b"\x01ls\n").await;
    assert_eq!(recv_bin(&mut a).await, b"\x02\x00\x50\x00\x18");
    assert_eq!(recv_bin(&mut a).await, b"\x01ls\n");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    send_bin(&mut a, &big).await;
    send_bin(&mut a, b"\x03\x00\x00\x00\x00").await;
    assert_eq!(recv_bin(&mut c).await, big);
    assert_eq!(recv_bin(&mut c).await, b"\x03\x00\x00\x00\x00");
    close_with(&mut a, 1000).await;
    assert_eq!(recv_close(&mut c).await, 1000);
    assert_eq!(recv_close(&mut a).await, 1000);
    let end = relay.next_end().await;
    assert_eq!(end.session_id, "s-bytes");
    assert_eq!(end.reason, CloseReason::Exit);
    assert_eq!(end.bytes_client_to_agent, 5 + 4);
    assert_eq!(end.bytes_agent_to_client, 300_000 + 5);
}

async fn client_close_is_forwarded_to_the_agent(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let (mut c, mut a) = relay.pair("s-cclose").await;
    send_bin(&mut c, b"x").await;
    assert_eq!(recv_bin(&mut a).await, b"x");
    close_with(&mut c, 4321).await;
    assert_eq!(recv_close(&mut a).await, 4321);
    let end = relay.next_end().await;
    assert_eq!(end.reason, CloseReason::ClientClosed);
    assert_eq!(end.bytes_client_to_agent, 1);
}

/// The agent's close is forwarded as is; the record names the cause: a refusal (1008) or a
/// failure to start (1011) is `error`, shutting down (4011) is `agent_closed`.
async fn agent_close_codes_are_forwarded_and_recorded_by_cause(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    for (sid, code, reason) in [
        ("s-refused", 1008, CloseReason::Error),
        ("s-failed", 1011, CloseReason::Error),
        ("s-agentstop", 4011, CloseReason::AgentClosed),
    ] {
        let (mut c, mut a) = relay.pair(sid).await;
        close_with(&mut a, code).await;
        assert_eq!(recv_close(&mut c).await, code, "{sid}");
        let end = relay.next_end().await;
        assert_eq!((end.session_id.as_str(), end.reason), (sid, reason));
    }
}

async fn agent_drop_closes_client_with_peer_gone(io: IoBackend) {
    // Resuming off (on: data_control.rs, a lost leg detaches the session with 4015).
    let mut relay = Relay::start(io, |c| c.resume_window = None);
    let (mut c, a) = relay.pair("s-adrop").await;
    drop(a);
    assert_eq!(recv_close(&mut c).await, 4005);
    assert_eq!(relay.next_end().await.reason, CloseReason::AgentLost);
}

async fn refusals_have_status_and_code(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    let sid = "s-refuse";
    // No token at all.
    let req = relay.url(sid, Role::Client).into_client_request().unwrap();
    assert_eq!(refusal(relay.dial_req(req).await.unwrap_err()), (401, "InvalidToken".into()));
    // Garbage token.
    let e = relay.dial(sid, Role::Client, "not.a.jwt").await.unwrap_err();
    assert_eq!(refusal(e), (401, "InvalidToken".into()));
    // A token of another key.
    let (other, _) = hatch_relay::token::TokenSigner::generate("k1").unwrap();
    let t = other.issue(sid, Role::Client, "i", "a", now()).unwrap().0;
    assert_eq!(
        refusal(relay.dial(sid, Role::Client, &t).await.unwrap_err()),
        (401, "InvalidToken".into())
    );
    // The other role's token, and another session's token.
    let t = relay.token(sid, Role::Agent);
    assert_eq!(
        refusal(relay.dial(sid, Role::Client, &t).await.unwrap_err()),
        (401, "InvalidToken".into())
    );
    let t = relay.token("s-other", Role::Client);
    assert_eq!(
        refusal(relay.dial(sid, Role::Client, &t).await.unwrap_err()),
        (401, "InvalidToken".into())
    );
    // Expired.
    let t = relay.signer.issue(sid, Role::Client, "i", "a", now() - 601).unwrap().0;
    assert_eq!(
        refusal(relay.dial(sid, Role::Client, &t).await.unwrap_err()),
        (401, "TokenExpired".into())
    );
    // Unknown path.
    let url = format!("wss://localhost:{}/v1/other", relay.addr.port());
    let req = url.into_client_request().unwrap();
    assert_eq!(refusal(relay.dial_req(req).await.unwrap_err()), (404, "NotFound".into()));
    // Token as a subprotocol works.
    let t = relay.token(sid, Role::Client);
    let mut req = relay.url(sid, Role::Client).into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", format!("hatch.v1, bearer.{t}").parse().unwrap());
    let ws = relay.dial_req(req).await;
    assert!(ws.is_ok(), "{ws:?}");
    assert!(relay.metric("hatch_data_refusals_total") >= 7);
}

async fn token_single_use_survives_the_session(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let sid = "s-once";
    let ct = relay.token(sid, Role::Client);
    let at = relay.token(sid, Role::Agent);
    let mut c = relay.dial(sid, Role::Client, &ct).await.unwrap();
    let e = relay.dial(sid, Role::Client, &ct).await.unwrap_err();
    assert_eq!(refusal(e), (409, "TokenAlreadyUsed".into()));
    let mut a = relay.dial(sid, Role::Agent, &at).await.unwrap();
    close_with(&mut a, 1000).await;
    assert_eq!(recv_close(&mut c).await, 1000);
    relay.next_end().await;
    let e = relay.dial(sid, Role::Agent, &at).await.unwrap_err();
    assert_eq!(refusal(e), (409, "TokenAlreadyUsed".into()));
}

async fn pair_timeout_closes_with_4004(io: IoBackend) {
    let mut relay = Relay::start(io, |c| c.pair_timeout = Duration::from_millis(300));
    let mut c =
        relay.dial("s-alone", Role::Client, &relay.token("s-alone", Role::Client)).await.unwrap();
    assert_eq!(recv_close(&mut c).await, 4004);
    let end = relay.next_end().await;
    assert_eq!((end.session_id.as_str(), end.reason), ("s-alone", CloseReason::PairTimeout));
}

async fn legs_on_different_shards_pair(io: IoBackend) {
    let mut relay = Relay::start(io, |c| c.shards = 3);
    let n = 24;
    let mut legs = Vec::new();
    for i in 0..n {
        let sid = format!("s-shard-{i}");
        legs.push((sid.clone(), relay.pair(&sid).await));
    }
    for (sid, (c, a)) in &mut legs {
        send_bin(c, sid.as_bytes()).await;
        assert_eq!(recv_bin(a).await, sid.as_bytes());
        send_bin(a, b"back").await;
        assert_eq!(recv_bin(c).await, b"back");
    }
    for (_, (_, a)) in &mut legs {
        close_with(a, 1000).await;
    }
    for _ in 0..n {
        assert_eq!(relay.next_end().await.reason, CloseReason::Exit);
    }
    let out = relay.metric("hatch_data_handoffs_out_total");
    let inn = relay.metric("hatch_data_handoffs_in_total");
    eprintln!("handoffs: out {out} in {inn} of {} legs", 2 * n);
    assert_eq!(out, inn);
    assert!(out > 0, "48 legs over 3 shards and no handoff");
}

async fn terminate_closes_both_and_refuses_later_legs(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let (mut c, mut a) = relay.pair("s-term").await;
    send_bin(&mut c, b"x").await;
    assert_eq!(recv_bin(&mut a).await, b"x");
    relay.plane().command(DataCommand::Terminate { session_id: "s-term".into(), code: 4006 });
    assert_eq!(recv_close(&mut c).await, 4006);
    assert_eq!(recv_close(&mut a).await, 4006);
    assert_eq!(relay.next_end().await.reason, CloseReason::Terminated);
    let mut late =
        relay.dial("s-term", Role::Client, &relay.token("s-term", Role::Client)).await.unwrap();
    assert_eq!(recv_close(&mut late).await, 4006);
}

async fn shutdown_closes_live_legs_with_4009(io: IoBackend) {
    // Resuming off, the session ends `relay_shutdown`; on, it is left detached for the next
    // relay (no end). The legs get 4009 either way.
    for window in [None, Some(Duration::from_secs(60))] {
        let mut relay = Relay::start(io, |c| {
            c.shards = 2;
            c.resume_window = window;
        });
        let (mut c, mut a) = relay.pair("s-down").await;
        assert!(matches!(relay.next_event().await, DataEvent::Connected { .. }));
        let plane = relay.plane.take().unwrap();
        let stop = tokio::task::spawn_blocking(move || plane.shutdown(Duration::from_millis(100)));
        assert_eq!(recv_close(&mut c).await, 4009);
        assert_eq!(recv_close(&mut a).await, 4009);
        stop.await.unwrap();
        match relay.next_event().await {
            DataEvent::Ended(e) if window.is_none() => {
                assert_eq!(e.reason, CloseReason::RelayShutdown)
            }
            DataEvent::Detached { session_id, .. } if window.is_some() => {
                assert_eq!(session_id, "s-down")
            }
            other => panic!("window {window:?}: {other:?}"),
        }
    }
}

async fn idle_timeout_closes_with_4007(io: IoBackend) {
    let mut relay = Relay::start(io, |c| c.idle_timeout = Some(Duration::from_millis(300)));
    let (mut c, mut a) = relay.pair("s-idle").await;
    // Agent output does not count as activity: the agent keeps writing until the relay closes
    // it, and the client (which only reads) still sees the idle close.
    let agent = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + WAIT;
        while tokio::time::Instant::now() < deadline {
            if a.send(Message::binary(b"out".to_vec())).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a
    });
    assert_eq!(recv_close(&mut c).await, 4007);
    let mut a = agent.await.unwrap();
    assert_eq!(recv_close(&mut a).await, 4007);
    assert_eq!(relay.next_end().await.reason, CloseReason::IdleTimeout);
}

async fn max_duration_closes_with_4008(io: IoBackend) {
    let mut relay = Relay::start(io, |c| c.max_duration = Some(Duration::from_millis(300)));
    let (mut c, mut a) = relay.pair("s-max").await;
    assert_eq!(recv_close(&mut c).await, 4008);
    assert_eq!(recv_close(&mut a).await, 4008);
    assert_eq!(relay.next_end().await.reason, CloseReason::MaxDuration);
}

async fn plaintext_relay_forwards_too(io: IoBackend) {
    let mut relay = Relay::start(io, |c| c.tls = None);
    let (mut c, mut a) = relay.pair("s-plain").await;
    for i in 0..50u32 {
        c.feed(Message::binary(i.to_be_bytes().to_vec())).await.unwrap();
    }
    c.flush().await.unwrap();
    for i in 0..50u32 {
        assert_eq!(recv_bin(&mut a).await, i.to_be_bytes());
    }
    close_with(&mut a, 1000).await;
    assert_eq!(recv_close(&mut c).await, 1000);
    let end = relay.next_end().await;
    assert_eq!((end.reason, end.bytes_client_to_agent), (CloseReason::Exit, 200));
    let _ = c.next().await;
}

async fn reload_tls_serves_the_new_certificate_and_keeps_live_sessions(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let (mut c, mut a) = relay.pair("s-live").await;
    let dir = tempfile::tempdir().unwrap();
    let pki = hatch_relay::certs::ensure_dev_pki(dir.path(), &[]).unwrap();
    let server =
        hatch_relay::certs::server_config(&pki.cert_file, &pki.key_file, &[b"http/1.1"]).unwrap();
    let old_ca = relay.client_tls.clone();
    relay.plane().reload_tls(server);
    relay.client_tls = hatch_relay::certs::client_config_with_ca(&pki.ca_file).unwrap();
    // The reload reaches the shard through its channel: retry until the new CA is accepted.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    let (mut c2, mut a2) = loop {
        n += 1;
        let sid = format!("s-new-{n}");
        let r = relay.dial(&sid, Role::Client, &relay.token(&sid, Role::Client)).await;
        if let Ok(c2) = r {
            let a2 = relay.dial(&sid, Role::Agent, &relay.token(&sid, Role::Agent)).await.unwrap();
            break (c2, a2);
        }
        assert!(tokio::time::Instant::now() < deadline, "new certificate never served");
        tokio::task::yield_now().await;
    };
    send_bin(&mut c2, b"new").await;
    assert_eq!(recv_bin(&mut a2).await, b"new");
    // Clients trusting only the old CA are now refused at the TLS handshake.
    relay.client_tls = old_ca;
    assert!(relay.dial("s-old", Role::Client, &relay.token("s-old", Role::Client)).await.is_err());
    // The session opened before the reload still forwards.
    send_bin(&mut c, b"still here").await;
    assert_eq!(recv_bin(&mut a).await, b"still here");
    close_with(&mut a, 1000).await;
    assert_eq!(recv_close(&mut c).await, 1000);
}

async fn waiting_leg_that_hangs_up_ends_the_session_at_once(io: IoBackend) {
    // The pair timeout (60 s) is far beyond the test's wait: only noticing the hang-up passes.
    let mut relay = Relay::start(io, |_| {});
    let mut c = relay
        .dial("s-gave-up", Role::Client, &relay.token("s-gave-up", Role::Client))
        .await
        .unwrap();
    send_bin(&mut c, b"\x02\x00\x50\x00\x18").await;
    drop(c);
    let end = relay.next_end().await;
    assert_eq!((end.session_id.as_str(), end.reason), ("s-gave-up", CloseReason::ClientLost));
}

async fn data_sent_while_waiting_arrives_after_pairing(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    let mut c =
        relay.dial("s-early", Role::Client, &relay.token("s-early", Role::Client)).await.unwrap();
    send_bin(&mut c, b"early").await;
    // Let the relay see the bytes (and the waiting-leg watcher its edge) before the agent comes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut a =
        relay.dial("s-early", Role::Agent, &relay.token("s-early", Role::Agent)).await.unwrap();
    assert_eq!(recv_bin(&mut a).await, b"early");
    send_bin(&mut a, b"late").await;
    assert_eq!(recv_bin(&mut c).await, b"late");
}

async fn forward_histogram_counts_every_forwarded_write(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    let (mut c, mut a) = relay.pair("s-hist").await;
    for i in 0..5u8 {
        send_bin(&mut c, &[1, i]).await;
        assert_eq!(recv_bin(&mut a).await, [1, i]);
        send_bin(&mut a, &[1, i, i]).await;
        assert_eq!(recv_bin(&mut c).await, [1, i, i]);
    }
    let text = relay.plane().metrics();
    assert!(text.contains("# TYPE hatch_data_forward_seconds histogram"), "{text}");
    let value = |l: &str| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    let mut total = 0.0;
    let mut shards = 0;
    for shard in 0.. {
        let label = format!("shard=\"{shard}\"");
        let buckets: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("hatch_data_forward_seconds_bucket{") && l.contains(&label))
            .collect();
        if buckets.is_empty() {
            break;
        }
        shards += 1;
        assert_eq!(buckets.len(), 22, "{text}");
        assert!(buckets[0].contains("le=\"0.000001\""), "{}", buckets[0]);
        assert!(buckets[21].contains("le=\"+Inf\""), "{}", buckets[21]);
        let counts: Vec<f64> = buckets.iter().map(|l| value(l)).collect();
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "not cumulative: {counts:?}");
        let line = |suffix: &str| {
            let p = format!("hatch_data_forward_seconds_{suffix}{{{label}}} ");
            text.lines().find(|l| l.starts_with(&p)).map(value).expect(&p)
        };
        let count = line("count");
        assert_eq!(counts[21], count);
        assert!(line("sum") >= 0.0);
        total += count;
    }
    assert!(shards >= 1);
    // Ten data frames were forwarded, each by at least one write.
    assert!(total >= 10.0, "forward histogram count {total}\n{text}");
}

async fn live_session_byte_counts_are_reported_on_the_progress_tick(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let (mut c, mut a) = relay.pair("s-progress").await;
    send_bin(&mut c, b"\x01abc").await;
    assert_eq!(recv_bin(&mut a).await, b"\x01abc");
    send_bin(&mut a, b"\x01hello").await;
    assert_eq!(recv_bin(&mut c).await, b"\x01hello");
    // The session stays live: its counts arrive by the periodic report, not by its end.
    let end = tokio::time::Instant::now() + WAIT;
    let got = loop {
        let ev = tokio::time::timeout_at(end, relay.events.recv())
            .await
            .expect("no progress report")
            .expect("event channel closed");
        match ev {
            DataEvent::Progress { session_id, bytes_client_to_agent, bytes_agent_to_client } => {
                assert_eq!(session_id, "s-progress");
                if (bytes_client_to_agent, bytes_agent_to_client) == (4, 6) {
                    break (bytes_client_to_agent, bytes_agent_to_client);
                }
            }
            DataEvent::Ended(e) => panic!("session ended: {e:?}"),
            DataEvent::Connected { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(got, (4, 6));
    // Unchanged counts are not reported again; the end still carries them.
    close_with(&mut a, 1000).await;
    assert_eq!(recv_close(&mut c).await, 1000);
    let e = relay.next_end().await;
    assert_eq!((e.bytes_client_to_agent, e.bytes_agent_to_client), (4, 6));
}

/// Pooled buffers held by reads and writes in progress, summed over shards (`/metrics`).
fn buffers_in_use(text: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with("hatch_data_buffers_in_use{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

async fn idle_legs_hold_no_pooled_buffers(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    let mut legs = Vec::new();
    for i in 0..8 {
        let sid = format!("s-idle-{i}");
        let (mut c, mut a) = relay.pair(&sid).await;
        // The client speaks once; the agent stays silent from the start (its first read after
        // pairing must not park a buffer waiting for it).
        send_bin(&mut c, b"hello").await;
        assert_eq!(recv_bin(&mut a).await, b"hello");
        legs.push((c, a));
    }
    let end = std::time::Instant::now() + WAIT;
    loop {
        let text = relay.plane().metrics();
        assert!(text.contains("# TYPE hatch_data_buffers_in_use gauge"), "{text}");
        let held = buffers_in_use(&text);
        if held == 0 {
            break;
        }
        assert!(std::time::Instant::now() < end, "idle legs still hold {held} buffers:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (c, a) in &mut legs {
        send_bin(a, b"back").await;
        assert_eq!(recv_bin(c).await, b"back");
    }
}
