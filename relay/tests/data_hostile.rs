//! Hostile and broken input against the data plane (both backends): bad requests, stalled
//! handshakes, protocol violations in frames, silent legs, and a client that stops reading.
//! Each case checks the status or close code the peer sees and that a fresh session still works.

mod data_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use data_support::*;
use futures_util::SinkExt;
use hatch_proto::token::Role;
use hatch_relay::data::IoBackend;
use hatch_relay::plane::CloseReason;
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    bad_requests_get_status_and_code,
    upgrade_with_a_body_is_refused,
    stalled_handshakes_are_closed_at_the_deadline,
    frame_violations_close_with_their_code,
    relay_answers_pings_itself,
    silent_leg_is_pinged_then_declared_dead,
    slow_reader_costs_bounded_memory_and_loses_nothing,
);

/// A fresh session still pairs and forwards.
async fn still_serves(relay: &Relay, sid: &str) {
    let (mut c, mut a) = relay.pair(sid).await;
    send_bin(&mut c, b"ping?").await;
    assert_eq!(recv_bin(&mut a).await, b"ping?");
}

fn json_code(got: &[u8]) -> String {
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let v: serde_json::Value = serde_json::from_slice(&got[end..]).unwrap();
    v["code"].as_str().unwrap().to_owned()
}

async fn bad_requests_get_status_and_code(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    // Plain HTTP request, no upgrade.
    let mut r = Raw::connect(&relay).await;
    r.write(b"GET /v1/stream/s1?role=client HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut got = r.read_to_end().await;
    assert_eq!(&got[9..12], b"400");
    assert_eq!(json_code(&got), "InvalidRequest");
    // Wrong WebSocket version.
    let mut r = Raw::connect(&relay).await;
    let req = upgrade_request("s1", "client", "Authorization: Bearer x\r\n")
        .replace("Version: 13", "Version: 8");
    r.write(req.as_bytes()).await.unwrap();
    got = r.read_to_end().await;
    assert_eq!(&got[9..12], b"400");
    // Head over 8 KiB.
    let mut r = Raw::connect(&relay).await;
    let big = format!("X-Pad: {}\r\n", "a".repeat(9000));
    let _ = r.write(upgrade_request("s1", "client", &big).as_bytes()).await;
    got = r.read_to_end().await;
    assert_eq!(&got[9..12], b"431");
    assert_eq!(json_code(&got), "InvalidRequest");
    // An Authorization value with a multi-byte character across the end of "Bearer "
    // (httparse lets bytes 0x80-0xFF through): 401, not a panicked connection task.
    for value in ["Bearer\u{e9}abcdef", "Beare\u{20ac}abcd"] {
        let mut r = Raw::connect(&relay).await;
        let req = upgrade_request("s1", "client", &format!("Authorization: {value}\r\n"));
        r.write(req.as_bytes()).await.unwrap();
        got = r.read_to_end().await;
        assert_eq!(&got[9..12], b"401", "{value}: {}", String::from_utf8_lossy(&got));
        assert_eq!(json_code(&got), "InvalidToken");
    }
    // Unknown path.
    let mut r = Raw::connect(&relay).await;
    r.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    got = r.read_to_end().await;
    assert_eq!(&got[9..12], b"404");
    // Garbage instead of a TLS ClientHello: the connection just closes.
    let mut tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut tcp, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "garbage before TLS left the connection open");
    still_serves(&relay, "s-after-bad").await;
}

async fn upgrade_with_a_body_is_refused(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    // A valid token and upgrade, plus a body: after a 101 the body's bytes would have been read
    // as the leg's first WebSocket frames (a masked binary frame "hi" here).
    let frame = client_frame(0x82, b"hi");
    let cases = [
        (format!("Content-Length: {}\r\n", frame.len()), frame.clone()),
        ("Transfer-Encoding: chunked\r\n".to_owned(), {
            let mut b = format!("{:x}\r\n", frame.len()).into_bytes();
            b.extend_from_slice(&frame);
            b.extend_from_slice(b"\r\n0\r\n\r\n");
            b
        }),
    ];
    for (i, (header, body)) in cases.iter().enumerate() {
        let sid = format!("s-body-{i}");
        let t = relay.token(&sid, Role::Client);
        let mut req =
            upgrade_request(&sid, "client", &format!("Authorization: Bearer {t}\r\n{header}"))
                .into_bytes();
        req.extend_from_slice(body);
        let mut r = Raw::connect(&relay).await;
        r.write(&req).await.unwrap();
        let (status, mut got) = r.read_response().await;
        assert_eq!(status, 400, "{header:?}: {}", String::from_utf8_lossy(&got));
        got.extend(r.read_to_end().await);
        assert_eq!(json_code(&got), "InvalidRequest", "{header:?}");
        // The token was not spent: the same token still opens the leg.
        let mut c = relay.dial(&sid, Role::Client, &t).await.unwrap();
        let mut a = relay.dial(&sid, Role::Agent, &relay.token(&sid, Role::Agent)).await.unwrap();
        send_bin(&mut c, b"after").await;
        assert_eq!(recv_bin(&mut a).await, b"after");
    }
    let counted = relay
        .plane()
        .metrics()
        .lines()
        .filter(|l| {
            l.starts_with("hatch_data_refusals_total{") && l.contains("reason=\"request_body\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum::<u64>();
    assert_eq!(counted, 2);
}

async fn stalled_handshakes_are_closed_at_the_deadline(io: IoBackend) {
    let relay = Relay::start(io, |c| c.handshake_timeout = Duration::from_millis(1000));
    // TCP only, then silence.
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(tokio::net::TcpStream::connect(relay.addr).await.unwrap());
    }
    // TLS done, then half a request head.
    let mut half = Raw::connect(&relay).await;
    half.write(b"GET /v1/stream/s1?role=client HTTP/1.1\r\n").await.unwrap();
    for mut s in silent {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut s, &mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "silent connection not closed: {r:?}");
    }
    assert!(half.read_to_end().await.is_empty());
    still_serves(&relay, "s-after-stall").await;
}

async fn frame_violations_close_with_their_code(io: IoBackend) {
    let mut relay = Relay::start(io, |c| c.max_payload = 4096);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked", vec![0x82, 0x01, b'x'], 1002),
        ("reserved bit", client_frame(0x82 | 0x40, b"x"), 1002),
        ("unknown opcode", client_frame(0x83, b"x"), 1002),
        ("fragmented ping", client_frame(0x09, b"x"), 1002),
        ("over max payload", client_frame(0x82, &[0u8; 5000]), 1009),
        ("bad utf-8 text", client_frame(0x81, &[b'a', 0xC3, 0x28]), 1007),
        ("one-byte close", client_frame(0x88, &[3]), 1002),
        ("close code 1005", client_frame(0x88, &[0x03, 0xED]), 1002),
        ("continuation first", client_frame(0x80, b"x"), 1002),
        ("64-bit top bit", vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4], 1002),
    ];
    for (i, (what, frame, code)) in cases.into_iter().enumerate() {
        let sid = format!("s-bad-{i}");
        let mut c = Raw::upgrade(&relay, &sid, Role::Client).await;
        let mut a = relay.dial(&sid, Role::Agent, &relay.token(&sid, Role::Agent)).await.unwrap();
        c.write(&frame).await.unwrap();
        assert_eq!(c.read_close().await, code, "{what}");
        assert_eq!(recv_close(&mut a).await, 4005, "{what}");
        assert_eq!(relay.next_end().await.reason, CloseReason::Error, "{what}");
    }
    still_serves(&relay, "s-after-frames").await;
}

async fn relay_answers_pings_itself(io: IoBackend) {
    let relay = Relay::start(io, |_| {});
    let mut c = Raw::upgrade(&relay, "s-ping", Role::Client).await;
    let mut a =
        relay.dial("s-ping", Role::Agent, &relay.token("s-ping", Role::Agent)).await.unwrap();
    c.write(&client_frame(0x89, b"are you there")).await.unwrap();
    assert_eq!(c.read_frame().await, (0xA, b"are you there".to_vec()));
    // The ping was not forwarded: the agent's next message is the client's data.
    c.write(&client_frame(0x82, b"data")).await.unwrap();
    assert_eq!(recv_bin(&mut a).await, b"data");
}

async fn silent_leg_is_pinged_then_declared_dead(io: IoBackend) {
    // Resuming off: the dead leg ends the session (4005); on: it detaches it (4015, the
    // client is told to resume).
    for (window, code) in [(None, 4005), (Some(Duration::from_secs(60)), 4015)] {
        let mut relay = Relay::start(io, |c| {
            c.ping_interval = Duration::from_millis(100);
            // Long enough for the (polled) client leg to answer its own pings on a loaded
            // machine.
            c.dead_after = Duration::from_millis(1500);
            c.resume_window = window;
        });
        let mut c =
            relay.dial("s-dead", Role::Client, &relay.token("s-dead", Role::Client)).await.unwrap();
        let mut a = Raw::upgrade(&relay, "s-dead", Role::Agent).await;
        // The raw agent sees a ping and never answers.
        assert_eq!(a.read_frame().await.0, 0x9);
        assert_eq!(recv_close(&mut c).await, code);
        if window.is_none() {
            assert_eq!(relay.next_end().await.reason, CloseReason::AgentLost);
        } else {
            loop {
                match relay.next_event().await {
                    hatch_relay::plane::DataEvent::Detached { .. } => break,
                    hatch_relay::plane::DataEvent::Connected { .. } => {}
                    other => panic!("{other:?}"),
                }
            }
        }
    }
}

async fn slow_reader_costs_bounded_memory_and_loses_nothing(io: IoBackend) {
    const MSG: usize = 16 * 1024;
    const COUNT: u64 = 4096; // 64 MiB, far beyond socket buffers on both hops
    let relay = Relay::start(io, |_| {});
    let (mut c, mut a) = relay.pair("s-flood").await;
    send_bin(&mut c, b"go").await;
    assert_eq!(recv_bin(&mut a).await, b"go");
    let base = rss();
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let flood = tokio::spawn(async move {
        let mut m = vec![0u8; MSG];
        for i in 0..COUNT {
            m[..8].copy_from_slice(&i.to_be_bytes());
            m[8] = i as u8;
            a.send(Message::binary(m.clone())).await.unwrap();
            sent2.store(i + 1, Ordering::Relaxed);
        }
        a
    });
    // Wait until the agent is stalled by backpressure: its count stops moving.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = 0;
    let mut still = 0;
    while still < 10 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sent.load(Ordering::Relaxed);
        if now == last {
            still += 1
        } else {
            still = 0;
            last = now
        }
    }
    let stalled_at = sent.load(Ordering::Relaxed);
    let grown = rss().saturating_sub(base);
    eprintln!(
        "agent stalled after {} MiB of {} MiB; process RSS grew {} KiB",
        (stalled_at * MSG as u64) >> 20,
        (COUNT * MSG as u64) >> 20,
        grown >> 10
    );
    assert!(stalled_at < COUNT, "64 MiB went through a client that reads nothing");
    assert!(grown < 12 << 20, "relay buffered the flood: RSS grew {grown} bytes");
    // Now read: every message, in order.
    for i in 0..COUNT {
        let m = recv_bin(&mut c).await;
        assert_eq!(m.len(), MSG);
        assert_eq!(u64::from_be_bytes(m[..8].try_into().unwrap()), i);
        assert_eq!(m[8], i as u8);
    }
    let _a = flood.await.unwrap();
}
