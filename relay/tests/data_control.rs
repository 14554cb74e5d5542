//! The frames the relay writes of its own (pongs, keepalive pings, close frames) on both
//! backends: they go only between the frames it forwards (RFC 6455 §5.4), what a leg can make
//! the relay owe it is bounded, and pings do not hold off the idle timeout.
//!
//! The legs here are raw byte streams, so each test checks the exact bytes a leg receives.

mod data_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use data_support::*;
use futures_util::{SinkExt, StreamExt};
use hatch_proto::token::Role;
use hatch_relay::data::IoBackend;
use hatch_relay::plane::{CloseReason, DataCommand, DataEvent};
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    pong_waits_for_the_end_of_a_dripped_frame,
    idle_ping_waits_for_the_end_of_a_dripped_frame,
    pings_inside_a_frame_owe_one_pong_for_the_newest,
    close_waits_for_the_end_of_a_dripped_frame,
    close_inside_a_frame_that_never_ends_sends_no_close_frame,
    peer_gone_inside_a_frame_sends_no_close_frame,
    ping_flood_from_a_leg_that_does_not_read_is_bounded,
    keepalive_pings_do_not_pile_up_behind_a_stalled_leg,
    pings_alone_do_not_hold_off_the_idle_timeout,
);

/// The payload of the dripped frame: 100 bytes of `A`, sent as 50 + 50.
const PAYLOAD: [u8; 100] = [0x41; 100];

/// A raw client and a raw agent of a fresh session.
async fn raw_pair(relay: &Relay, sid: &str) -> (Raw, Raw) {
    let c = Raw::upgrade(relay, sid, Role::Client).await;
    let a = Raw::upgrade(relay, sid, Role::Agent).await;
    (c, a)
}

/// The agent sends the header and the first half of a 100-byte frame; returns the rest to send.
/// The client has received what was forwarded so far (`82 64` and 50 bytes), so the relay's
/// stream to it is now inside that frame.
async fn drip_first_half(c: &mut Raw, a: &mut Raw) -> Vec<u8> {
    let frame = client_frame(0x82, &PAYLOAD);
    // Masked header: 2 bytes + 4 bytes of key.
    a.write(&frame[..6 + 50]).await.unwrap();
    let mut got = [0u8; 2 + 50];
    c.read_exact(&mut got).await;
    assert_eq!(got[..2], [0x82, 100]);
    assert_eq!(got[2..], PAYLOAD[..50]);
    frame[6 + 50..].to_vec()
}

/// Reads the next frame on `a` that is not a relay keepalive ping.
async fn read_data_frame(a: &mut Raw) -> (u8, Vec<u8>) {
    loop {
        let f = a.read_frame().await;
        if f.0 != 0x9 {
            return f;
        }
    }
}

/// A client data frame that tells the test the relay has read everything the client sent
/// before it (legs are read in order): the agent receives it.
async fn marker(c: &mut Raw, a: &mut Raw, what: &[u8]) {
    c.write(&client_frame(0x82, what)).await.unwrap();
    assert_eq!(read_data_frame(a).await, (0x2, what.to_vec()));
}

async fn pong_waits_for_the_end_of_a_dripped_frame(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    let (mut c, mut a) = raw_pair(&relay, "s-drip-pong").await;
    let rest = drip_first_half(&mut c, &mut a).await;
    c.write(&client_frame(0x89, b"PING")).await.unwrap();
    marker(&mut c, &mut a, b"after the ping").await;
    a.write(&rest).await.unwrap();
    // The rest of the data frame, then the pong: `41 × 50, 8a 04 "PING"`. (Before the fix the
    // pong came first, inside the payload.)
    let mut got = [0u8; 50 + 6];
    c.read_exact(&mut got).await;
    let mut want = PAYLOAD[50..].to_vec();
    want.extend_from_slice(&[0x8A, 4, b'P', b'I', b'N', b'G']);
    assert_eq!(got[..], want[..], "{got:02x?}");
    // Between frames the pong goes at once.
    c.write(&client_frame(0x89, b"again")).await.unwrap();
    assert_eq!(c.read_frame().await, (0xA, b"again".to_vec()));
}

async fn idle_ping_waits_for_the_end_of_a_dripped_frame(io: IoBackend) {
    let relay = Relay::start(io, |c| {
        c.ping_interval = Duration::from_millis(20);
        c.dead_after = Duration::from_secs(60);
    });
    let (mut c, mut a) = raw_pair(&relay, "s-drip-ping").await;
    // The silent client is pinged once (then not again until it sends something).
    assert_eq!(c.read_frame().await, (0x9, vec![]));
    let rest = drip_first_half(&mut c, &mut a).await;
    // Anything from the client re-arms the keepalive: after 20 ms of silence the relay owes it
    // a ping, while its stream is inside the frame.
    c.write(&client_frame(0x8A, b"")).await.unwrap();
    marker(&mut c, &mut a, b"pong sent").await;
    // Time for many ping intervals: the ping must wait rather than go out now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.write(&rest).await.unwrap();
    let mut got = [0u8; 50 + 2];
    c.read_exact(&mut got).await;
    let mut want = PAYLOAD[50..].to_vec();
    want.extend_from_slice(&[0x89, 0]);
    assert_eq!(got[..], want[..], "{got:02x?}");
}

async fn pings_inside_a_frame_owe_one_pong_for_the_newest(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    let (mut c, mut a) = raw_pair(&relay, "s-drip-many").await;
    let rest = drip_first_half(&mut c, &mut a).await;
    let mut pings = Vec::new();
    for i in 0..500u32 {
        pings.extend(client_frame(0x89, format!("ping {i}").as_bytes()));
    }
    c.write(&pings).await.unwrap();
    marker(&mut c, &mut a, b"after 500 pings").await;
    a.write(&rest).await.unwrap();
    // The frame's rest, then one pong, for the newest ping (RFC 6455 §5.5.3 allows answering
    // only the most recent); the next ping's pong follows it: no other pong was queued.
    let mut got = [0u8; 50];
    c.read_exact(&mut got).await;
    assert_eq!(got[..], PAYLOAD[50..]);
    assert_eq!(c.read_frame().await, (0xA, b"ping 499".to_vec()));
    c.write(&client_frame(0x89, b"last")).await.unwrap();
    assert_eq!(c.read_frame().await, (0xA, b"last".to_vec()));
}

async fn close_waits_for_the_end_of_a_dripped_frame(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let (mut c, mut a) = raw_pair(&relay, "s-drip-term").await;
    let rest = drip_first_half(&mut c, &mut a).await;
    relay.plane().command(DataCommand::Terminate { session_id: "s-drip-term".into(), code: 4006 });
    // The agent's stream is between frames: it gets its close at once.
    assert_eq!(a.read_close().await, 4006);
    assert_eq!(relay.next_end().await.reason, CloseReason::Terminated);
    // The relay still forwards the rest of the frame the client is inside, then the close.
    a.write(&rest).await.unwrap();
    let mut got = [0u8; 50];
    c.read_exact(&mut got).await;
    assert_eq!(got[..], PAYLOAD[50..], "{got:02x?}");
    assert_eq!(c.read_frame().await.0, 0x8);
    // Nothing after the close frame (the agent's later bytes are not forwarded).
    let _ = a.write(&client_frame(0x82, b"late")).await;
    assert_eq!(c.read_to_end().await, b"");
}

async fn close_inside_a_frame_that_never_ends_sends_no_close_frame(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let (mut c, mut a) = raw_pair(&relay, "s-drip-stuck").await;
    let _rest = drip_first_half(&mut c, &mut a).await;
    relay.plane().command(DataCommand::Terminate { session_id: "s-drip-stuck".into(), code: 4006 });
    assert_eq!(a.read_close().await, 4006);
    assert_eq!(relay.next_end().await.reason, CloseReason::Terminated);
    // The agent never sends the rest: after a bounded wait the client's stream just ends (TLS
    // close_notify and FIN), with no close frame written into the payload.
    assert_eq!(c.read_to_end().await, b"");
}

async fn peer_gone_inside_a_frame_sends_no_close_frame(io: IoBackend) {
    // Resuming off: the lost leg ends the session.
    let mut relay = Relay::start(io, |c| c.resume_window = None);
    let (mut c, mut a) = raw_pair(&relay, "s-drip-gone").await;
    let _rest = drip_first_half(&mut c, &mut a).await;
    drop(a);
    // Dropped without a close frame: the agent's leg was lost.
    assert_eq!(relay.next_end().await.reason, CloseReason::AgentLost);
    // No 4005 close inside the half-written frame: the stream ends.
    assert_eq!(c.read_to_end().await, b"");
}

/// Pooled buffers in use, summed over shards.
fn buffers(relay: &Relay) -> u64 {
    relay.metric("hatch_data_buffers_in_use")
}

async fn ping_flood_from_a_leg_that_does_not_read_is_bounded(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    let (mut c, mut a) = raw_pair(&relay, "s-flood-ping").await;
    marker(&mut c, &mut a, b"hello").await;
    let base = rss();
    // The client sends masked 125-byte pings nonstop and never reads its pongs.
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let flood = tokio::spawn(async move {
        let mut batch = Vec::new();
        for _ in 0..64 {
            batch.extend(client_frame(0x89, &[0x5A; 125]));
        }
        while c.write(&batch).await.is_ok() {
            sent2.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
    });
    // Until the flood has stalled for a while (at least a few seconds): the relay's buffers stay
    // few, and other sessions work meanwhile.
    let mut most = 0;
    let mut last = 0;
    let mut still = 0;
    let start = tokio::time::Instant::now();
    let mut i = 0;
    while still < 20 || start.elapsed() < Duration::from_secs(3) {
        assert!(start.elapsed() < 2 * WAIT, "the ping flood never stalled: {} KiB", last >> 10);
        let sid = format!("s-beside-{i}");
        i += 1;
        let (mut c2, mut a2) = relay.pair(&sid).await;
        send_bin(&mut c2, b"still here").await;
        assert_eq!(recv_bin(&mut a2).await, b"still here");
        most = most.max(buffers(&relay));
        let now = sent.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = rss().saturating_sub(base);
    eprintln!(
        "ping flood: {} KiB sent, stalled for {still} samples; at most {most} buffers in use; \
         process RSS grew {} KiB",
        last >> 10,
        grown >> 10
    );
    // The relay stops reading a leg whose pongs cannot be written: the flood stalls at the
    // socket buffers instead of growing a queue.
    assert!(most <= 8, "{most} pooled buffers in use during the flood");
    assert!(grown < 12 << 20, "RSS grew {grown} bytes during the flood");
    flood.abort();
}

async fn keepalive_pings_do_not_pile_up_behind_a_stalled_leg(io: IoBackend) {
    const MSG: usize = 16 * 1024;
    let relay = Relay::start(io, |c| {
        c.ping_interval = Duration::from_millis(20);
        c.dead_after = Duration::from_secs(60);
    });
    let (mut c, mut a) = relay.pair("s-stalled").await;
    send_bin(&mut c, b"go").await;
    assert_eq!(recv_bin(&mut a).await, b"go");
    // The agent floods a client that does not read, so the relay's write to the client blocks
    // and holds the client's write gate.
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let flood = tokio::spawn(async move {
        let m = vec![0u8; MSG];
        while a.send(Message::binary(m.clone())).await.is_ok() {
            sent2.fetch_add(1, Ordering::Relaxed);
        }
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut last, mut still) = (0, 0);
    while still < 10 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sent.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    assert!(still >= 10, "the agent never stalled");
    let base = buffers(&relay);
    // The client still sends now and then, so it is never silent for long, and after each
    // silence of a ping interval the relay owes it a keepalive ping it cannot write.
    let mut most = base;
    for _ in 0..40 {
        send_bin(&mut c, b"k").await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        most = most.max(buffers(&relay));
    }
    eprintln!(
        "stalled leg: {base} buffers in use at the stall, at most {most} after 40 pings owed"
    );
    // Before the fix each ping was a task holding a pooled buffer while it waited.
    assert!(most <= base + 2, "keepalive pings piled up: {base} -> {most} buffers");
    flood.abort();
}

async fn pings_alone_do_not_hold_off_the_idle_timeout(io: IoBackend) {
    let mut relay = Relay::start(io, |c| c.idle_timeout = Some(Duration::from_millis(500)));
    let (mut c, mut a) = relay.pair("s-ping-idle").await;
    send_bin(&mut c, b"typed once").await;
    assert_eq!(recv_bin(&mut a).await, b"typed once");
    // The client pings (and sends empty data frames) every 20 ms; only client → agent payload
    // counts as activity, so the session still idles out.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let code = tokio::time::timeout(WAIT, async {
        let mut n = 0u32;
        loop {
            tokio::select! {
                m = c.next() => match m {
                    Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                    Some(Ok(_)) => {}
                    other => panic!("expected a close, got {other:?}"),
                },
                _ = tick.tick() => {
                    n += 1;
                    let m = if n.is_multiple_of(2) {
                        Message::Ping(n.to_be_bytes().to_vec().into())
                    } else {
                        Message::binary(Vec::new())
                    };
                    let _ = c.send(m).await;
                }
            }
        }
    })
    .await
    .expect("pings kept an idle session open");
    assert_eq!(code, 4007);
    assert_eq!(recv_close(&mut a).await, 4007);
    assert_eq!(relay.next_end().await.reason, CloseReason::IdleTimeout);
}

async fn a_lost_leg_detaches_and_both_sides_resume_on_new_legs(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let (mut c, mut a) = relay.pair("s-resume").await;
    assert!(matches!(relay.next_event().await, DataEvent::Connected { .. }));
    send_bin(&mut c, b"\x01before").await;
    assert_eq!(recv_bin(&mut a).await, b"\x01before");
    // The client's connection is lost (no close frame): the agent is told to resume.
    drop(c);
    assert_eq!(recv_close(&mut a).await, hatch_proto::close::PEER_RESUMING);
    assert!(matches!(relay.next_event().await, DataEvent::Detached { .. }));
    // An ordinary token cannot join a detached session's role twice; resume tokens can.
    let (sid, c_tok) = ("s-resume", relay.resume_token("s-resume", Role::Client));
    let mut c = relay.dial(sid, Role::Client, &c_tok).await.expect("client resumes");
    let a_tok = relay.resume_token(sid, Role::Agent);
    let mut a = relay.dial(sid, Role::Agent, &a_tok).await.expect("agent resumes");
    assert!(matches!(relay.next_event().await, DataEvent::Resumed { .. }));
    send_bin(&mut c, b"\x01after").await;
    assert_eq!(recv_bin(&mut a).await, b"\x01after");
    send_bin(&mut a, b"\x01back").await;
    assert_eq!(recv_bin(&mut c).await, b"\x01back");
    // A used resume token is refused like any other.
    let again = relay.dial(sid, Role::Client, &c_tok).await.expect_err("replayed token");
    assert_eq!(refusal(again).0, 409);
    close_with(&mut a, 1000).await;
    assert_eq!(recv_close(&mut c).await, 1000);
    let end = relay.next_end().await;
    assert_eq!(end.reason, CloseReason::Exit);
    // Counts run across the resume: 7 + 6 bytes client → agent, 5 agent → client.
    assert_eq!((end.bytes_client_to_agent, end.bytes_agent_to_client), (13, 5));
}

async fn a_detached_session_ends_with_4005_when_the_window_passes(io: IoBackend) {
    let mut relay = Relay::start(io, |c| c.resume_window = Some(Duration::from_secs(1)));
    let (c, mut a) = relay.pair("s-window").await;
    // Paired first (a session that never paired is not resumable).
    assert!(matches!(relay.next_event().await, DataEvent::Connected { .. }));
    drop(c);
    assert_eq!(recv_close(&mut a).await, hatch_proto::close::PEER_RESUMING);
    // Only the agent comes back: it waits, then learns the client never did.
    let tok = relay.resume_token("s-window", Role::Agent);
    let mut a = relay.dial("s-window", Role::Agent, &tok).await.expect("agent resumes");
    assert_eq!(recv_close(&mut a).await, hatch_proto::close::PEER_GONE);
    assert_eq!(relay.next_end().await.reason, CloseReason::ClientLost);
}

both_backends!(a_lost_leg_detaches_and_both_sides_resume_on_new_legs);
both_backends!(a_detached_session_ends_with_4005_when_the_window_passes);
