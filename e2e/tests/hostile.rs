//! Hostile input against the real `hatch-relay` process over real TLS on loopback, with tokens
//! the real control plane issued: bad tokens, bad request heads, bad TLS, bad frames. Each case
//! checks what the peer sees (HTTP status + JSON code, or close code), the relay's log line for
//! refusals, and ends with a fresh session served correctly.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hatch_e2e::*;
use hatch_proto::token::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Rewrites a JWT's header `alg` and signature: (header JSON, signature bytes).
fn forge(token: &str, header: &str, sig: &[u8]) -> String {
    let mut parts = token.split('.');
    let (_h, claims) = (parts.next().unwrap(), parts.next().unwrap());
    format!("{}.{claims}.{}", B64.encode(header), B64.encode(sig))
}

/// The claims part of a token re-signed with HMAC-SHA256 under `key`, header `alg: HS256`.
fn hs256(token: &str, key: &[u8]) -> String {
    let claims = token.split('.').nth(1).unwrap();
    let head = B64.encode(r#"{"typ":"JWT","alg":"HS256"}"#);
    let signing_input = format!("{head}.{claims}");
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let sig = ring::hmac::sign(&k, signing_input.as_bytes());
    format!("{signing_input}.{}", B64.encode(sig.as_ref()))
}

#[tokio::test]
async fn hostile_tokens_are_refused_with_their_code() {
    let relay = Relay::start(&[]);
    let mut agent = relay.agent().await;
    let s = relay.start_session(&mut agent).await;
    let other = relay.start_session(&mut agent).await;
    let unix = hatch_relay::control::unix_now() as u64;
    let (signer, _) = hatch_relay::control::signing::load_or_create(&relay.data_dir).unwrap();
    let (foreign, foreign_public) = hatch_relay::token::TokenSigner::generate("k-other").unwrap();
    let _ = foreign_public;
    let iid = agent.id.clone();
    let acct = relay.info.account_id.clone();

    let mut tampered = s.client_token.clone().into_bytes();
    let last = tampered.len() - 3;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let real_sig = B64.decode(s.client_token.rsplit('.').next().unwrap()).unwrap();

    let cases: Vec<(&str, String, &str, (u16, &str))> = vec![
        ("garbage token", "not-a-token".into(), &s.client_url, (401, "InvalidToken")),
        ("three garbage parts", "a.b.c".into(), &s.client_url, (401, "InvalidToken")),
        ("one signature byte changed", tampered, &s.client_url, (401, "InvalidToken")),
        (
            "signed by another key",
            foreign.issue(&s.id, Role::Client, &iid, &acct, unix).unwrap().0,
            &s.client_url,
            (401, "InvalidToken"),
        ),
        (
            "alg none, no signature",
            forge(&s.client_token, r#"{"typ":"JWT","alg":"none"}"#, b""),
            &s.client_url,
            (401, "InvalidToken"),
        ),
        (
            "alg HS256, real EdDSA signature kept",
            forge(&s.client_token, r#"{"typ":"JWT","alg":"HS256"}"#, &real_sig),
            &s.client_url,
            (401, "InvalidToken"),
        ),
        (
            "alg HS256, HMAC under a guessable key",
            hs256(&s.client_token, b"secret"),
            &s.client_url,
            (401, "InvalidToken"),
        ),
        (
            "expired (issued 660 s ago by the relay's own key)",
            signer.issue(&s.id, Role::Client, &iid, &acct, unix - 660).unwrap().0,
            &s.client_url,
            (401, "TokenExpired"),
        ),
        (
            "agent token on the client leg",
            s.agent_token.clone(),
            &s.client_url,
            (401, "InvalidToken"),
        ),
        (
            "client token on the agent leg",
            s.client_token.clone(),
            &s.agent_url,
            (401, "InvalidToken"),
        ),
        (
            "token of another session",
            other.client_token.clone(),
            &s.client_url,
            (401, "InvalidToken"),
        ),
    ];
    let mut tried = 0;
    for (what, token, url, want) in &cases {
        let got = leg(&relay, url, token).await.err();
        assert_eq!(got, Some((want.0, want.1.to_string())), "{what}");
        tried += 1;
    }
    // No token at all, and an Authorization header that is not Bearer.
    assert_eq!(
        dial(&relay, &s.client_url, &[("sec-websocket-protocol", "hatch.v1")]).await.err(),
        Some((401, "InvalidToken".into())),
        "no token"
    );
    let basic = [("authorization", "Basic dXNlcjpwYXNz"), ("sec-websocket-protocol", "hatch.v1")];
    assert_eq!(
        dial(&relay, &s.client_url, &basic).await.err(),
        Some((401, "InvalidToken".into())),
        "basic auth"
    );
    tried += 2;

    // The real tokens still work after all that, exactly once each.
    let mut c = leg(&relay, &s.client_url, &s.client_token).await.expect("real client token");
    assert_eq!(
        leg(&relay, &s.client_url, &s.client_token).await.err(),
        Some((409, "TokenAlreadyUsed".into())),
        "replayed while the session waits for its agent"
    );
    let mut a = leg(&relay, &s.agent_url, &s.agent_token).await.expect("real agent token");
    send_bin(&mut c, b"\x01x").await;
    assert_eq!(recv_bin(&mut a).await, b"\x01x");
    assert_eq!(
        leg(&relay, &s.agent_url, &s.agent_token).await.err(),
        Some((409, "TokenAlreadyUsed".into())),
        "replayed during the session"
    );
    // The client's connection is lost: the session waits for resume tokens (state
    // `detached`), and the original ones stay refused while it does and after it ends.
    drop(c);
    let end = std::time::Instant::now() + DEADLINE;
    while relay.session(&s.id).await["state"] != "detached" {
        assert!(std::time::Instant::now() < end, "never detached");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        leg(&relay, &s.client_url, &s.client_token).await.err(),
        Some((409, "TokenAlreadyUsed".into())),
        "client token replayed while the session is detached"
    );
    drop(a);
    let r = relay
        .call("DELETE", &format!("/v1/sessions/{}", s.id), Some(&relay.info.access_key), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rec = relay.closed_session(&s.id).await;
    assert_eq!(rec["close_reason"], "terminated", "{rec}");
    let told = agent.next().await;
    assert!(
        matches!(&told, Some(hatch_proto::control::ToAgent::SessionClose { session_id, .. })
            if *session_id == s.id),
        "{told:?}"
    );
    for (what, url, token) in
        [("client", &s.client_url, &s.client_token), ("agent", &s.agent_url, &s.agent_token)]
    {
        assert_eq!(
            leg(&relay, url, token).await.err(),
            Some((409, "TokenAlreadyUsed".into())),
            "{what} token replayed after the session ended"
        );
    }
    tried += 4;
    eprintln!("{tried} hostile tokens refused");

    // Each refusal left a log line, and no token or raw URI in it.
    let log = relay.proc.output();
    assert!(!log.contains(&s.client_token), "a token reached the log");
    assert!(log.contains("refus") || log.contains("InvalidToken"), "no refusal logged:\n{log}");
    relay.still_serves(&mut agent).await;
}

/// 600 bytes of every value, then the end of a head.
fn garbage_head() -> Vec<u8> {
    let mut v: Vec<u8> = (0u8..=255).cycle().take(600).collect();
    v.extend_from_slice(b"\r\n\r\n");
    v
}

#[tokio::test]
async fn hostile_request_heads_and_tls_are_refused() {
    let relay = Relay::start(&["--handshake-timeout", "2"]);
    let mut agent = relay.agent().await;
    let s = relay.start_session(&mut agent).await;
    let (path, _) = url_path(&s.client_url);
    let auth = format!("Authorization: Bearer {}\r\n", s.client_token);
    let good = upgrade_head(&path, &auth);

    let no_upgrade = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n");
    let h2c = good.replace("Upgrade: websocket", "Upgrade: h2c").replace(
        "Connection: Upgrade",
        "Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
    );
    let no_key = good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "");
    let bad_version = good.replace("Version: 13", "Version: 8");
    let no_version = good.replace("Sec-WebSocket-Version: 13\r\n", "");
    let post = good.replacen("GET", "POST", 1);
    let http10 = good.replace("HTTP/1.1", "HTTP/1.0");
    let big_headers = upgrade_head(&path, &format!("{auth}X-Pad: {}\r\n", "a".repeat(9000)));
    let big_line = upgrade_head(&format!("{path}&pad={}", "b".repeat(9000)), &auth);
    let many_headers = upgrade_head(&path, &format!("{auth}{}", "X-A: b\r\n".repeat(60)));
    // A body after the upgrade head would become the leg's first WebSocket bytes.
    let with_length = upgrade_head(&path, &format!("{auth}Content-Length: 6\r\n")) + "hello!";
    let chunked = upgrade_head(&path, &format!("{auth}Transfer-Encoding: chunked\r\n"))
        + "2\r\nhi\r\n0\r\n\r\n";
    let cases: Vec<(&str, Vec<u8>, (u16, &str))> = vec![
        ("plain HTTP request", no_upgrade.into_bytes(), (400, "InvalidRequest")),
        ("non-WebSocket upgrade (h2c)", h2c.into_bytes(), (400, "InvalidRequest")),
        ("missing Sec-WebSocket-Key", no_key.into_bytes(), (400, "InvalidRequest")),
        ("Sec-WebSocket-Version 8", bad_version.into_bytes(), (400, "InvalidRequest")),
        ("no Sec-WebSocket-Version", no_version.into_bytes(), (400, "InvalidRequest")),
        ("POST upgrade", post.into_bytes(), (400, "InvalidRequest")),
        ("HTTP/1.0 upgrade", http10.into_bytes(), (400, "InvalidRequest")),
        ("headers over 8 KiB", big_headers.into_bytes(), (431, "InvalidRequest")),
        ("request line over 8 KiB", big_line.into_bytes(), (431, "InvalidRequest")),
        (
            "60 headers (more than the 48 parsed)",
            many_headers.into_bytes(),
            (400, "InvalidRequest"),
        ),
        ("binary garbage head", garbage_head(), (400, "InvalidRequest")),
        ("upgrade with a Content-Length body", with_length.into_bytes(), (400, "InvalidRequest")),
        ("upgrade with a chunked body", chunked.into_bytes(), (400, "InvalidRequest")),
        (
            "unknown path",
            b"GET /etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            (404, "NotFound"),
        ),
        (
            "path traversal in the session id",
            upgrade_head("/v1/stream/../../x?role=client", &auth).into_bytes(),
            (404, "NotFound"),
        ),
        (
            "role missing",
            upgrade_head(&path.replace("?role=client", ""), &auth).into_bytes(),
            (404, "NotFound"),
        ),
        (
            "role unknown",
            upgrade_head(&path.replace("role=client", "role=admin"), &auth).into_bytes(),
            (404, "NotFound"),
        ),
    ];
    let mut observed = Vec::new();
    for (what, head, _) in &cases {
        let t0 = std::time::Instant::now();
        observed.push((*what, Raw::refused(&relay, head).await));
        eprintln!("{what}: answered and closed in {:?}", t0.elapsed());
    }
    for ((what, got), (_, _, want)) in observed.iter().zip(&cases) {
        eprintln!("{what}: {} {}", got.0, got.1);
        assert_eq!((got.0, got.1.as_str()), *want, "{what}");
    }
    // A wrong Sec-WebSocket-Key (not 16 bytes of base64): RFC 6455 §4.2.1 asks the server to
    // refuse; note what the relay does and that the connection then ends either way.
    let wrong_key = good.replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
    let mut r = Raw::connect(&relay).await;
    r.write(wrong_key.as_bytes()).await.unwrap();
    let got = r.read_to_end().await;
    let wrong_key_answer = parse_refusal(&got);
    eprintln!("wrong Sec-WebSocket-Key: {wrong_key_answer:?}");
    assert_eq!(wrong_key_answer, (400, "InvalidRequest".into()), "wrong Sec-WebSocket-Key");

    // Garbage before the TLS handshake: the connection ends, nothing is served.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff][..],
        &[0u8; 64][..],
    ] {
        let mut tcp = tokio::net::TcpStream::connect(relay.data_addr()).await.unwrap();
        tcp.write_all(garbage).await.unwrap();
        let mut all = Vec::new();
        let r = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut all)).await;
        assert!(r.is_ok(), "garbage before TLS left the connection open");
        assert!(!all.starts_with(b"HTTP/"), "plain HTTP answered on the TLS port");
    }
    // A ClientHello then silence, and TLS then half a request head: closed at the handshake
    // timeout (2 s here), well within the deadline.
    let mut hello = tokio::net::TcpStream::connect(relay.data_addr()).await.unwrap();
    hello.write_all(&client_hello(&relay.tls)).await.unwrap();
    let mut half = Raw::connect(&relay).await;
    half.write(&good.as_bytes()[..40]).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut sink = Vec::new();
    let r = tokio::time::timeout(DEADLINE, hello.read_to_end(&mut sink)).await;
    assert!(r.is_ok(), "ClientHello then silence: still open");
    assert!(half.read_to_end().await.is_empty(), "half a head got an answer");
    eprintln!("stalled handshakes closed after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(10));

    // The session the refused requests aimed at is untouched: its real token still opens it.
    let mut c = leg(&relay, &s.client_url, &s.client_token).await.expect("real token after all");
    let mut a = leg(&relay, &s.agent_url, &s.agent_token).await.expect("agent leg");
    send_bin(&mut a, b"\x01ok").await;
    assert_eq!(recv_bin(&mut c).await, b"\x01ok");
    eprintln!("{} hostile request heads and 5 bad TLS starts tried", cases.len() + 1);
    relay.still_serves(&mut agent).await;
}

#[tokio::test]
async fn frame_violations_close_with_their_code_and_are_recorded() {
    let relay = Relay::start(&[]);
    let mut agent = relay.agent().await;
    let max = 1 << 20; // the default max payload
    let mut bad_close_reason = vec![0x03, 0xE8];
    bad_close_reason.extend_from_slice(&[0xff, 0xfe]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("unmasked binary", vec![0x82, 0x01, b'x'], 1002),
        ("unmasked close", vec![0x88, 0x02, 0x03, 0xE8], 1002),
        ("RSV1", client_frame(0x82 | 0x40, b"x"), 1002),
        ("RSV2", client_frame(0x82 | 0x20, b"x"), 1002),
        ("RSV3", client_frame(0x82 | 0x10, b"x"), 1002),
        ("opcode 3", client_frame(0x83, b"x"), 1002),
        ("opcode 7", client_frame(0x87, b"x"), 1002),
        ("opcode 0xB", client_frame(0x8B, b"x"), 1002),
        ("opcode 0xF", client_frame(0x8F, b"x"), 1002),
        ("fragmented ping", client_frame(0x09, b"x"), 1002),
        ("fragmented close", client_frame(0x08, &[0x03, 0xE8]), 1002),
        ("ping of 126 bytes", client_frame(0x89, &[7u8; 126]), 1002),
        ("pong of 200 bytes", client_frame(0x8A, &[7u8; 200]), 1002),
        ("continuation first", client_frame(0x80, b"x"), 1002),
        ("payload over max", client_frame(0x82, &vec![0u8; max + 1]), 1009),
        ("length 2^40 announced", vec![0x82, 0xFF, 0, 0, 0x01, 0, 0, 0, 0, 0, 1, 2, 3, 4], 1009),
        ("64-bit length top bit", vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4], 1002),
        ("16-bit length form for 5 bytes", vec![0x82, 0xFE, 0, 5, 1, 2, 3, 4, 1, 2, 3, 4, 5], 1002),
        ("close with 1 byte", client_frame(0x88, &[3]), 1002),
        ("close code 1005", client_frame(0x88, &[0x03, 0xED]), 1002),
        ("close code 1006", client_frame(0x88, &[0x03, 0xEE]), 1002),
        ("close code 999", client_frame(0x88, &[0x03, 0xE7]), 1002),
        ("close code 5000", client_frame(0x88, &[0x13, 0x88]), 1002),
        ("close reason not UTF-8", client_frame(0x88, &bad_close_reason), 1007),
        ("text not UTF-8", client_frame(0x81, &[b'a', 0xC3, 0x28]), 1007),
        ("text overlong encoding", client_frame(0x81, &[0xC0, 0xAF]), 1007),
        ("text surrogate", client_frame(0x81, &[0xED, 0xA0, 0x80]), 1007),
    ];
    let mut seen = Vec::new();
    for (what, frame, _) in &cases {
        let s = relay.start_session(&mut agent).await;
        let mut a = leg(&relay, &s.agent_url, &s.agent_token).await.expect("agent leg");
        let mut c = Raw::upgrade(&relay, &s.client_url, &s.client_token).await;
        // Paired: data flows before the violation.
        c.write(&client_frame(0x82, b"\x01before")).await.unwrap();
        assert_eq!(recv_bin(&mut a).await, b"\x01before", "{what}");
        let _ = c.write(frame).await;
        let code = c.read_close().await;
        let agent_code = close_code(&mut a).await;
        let rec = relay.closed_session(&s.id).await;
        seen.push((
            *what,
            code,
            agent_code,
            rec["close_reason"].clone(),
            rec["bytes_client_to_agent"].clone(),
        ));
    }
    for ((what, code, agent_code, reason, bytes), (_, _, want)) in seen.iter().zip(&cases) {
        eprintln!("{what}: client {code}, agent {agent_code:?}, record {reason} c→a {bytes}");
        assert_eq!(code, want, "{what}");
        assert_eq!(*agent_code, Some(4005), "{what}: the agent leg is told its peer is gone");
        assert_eq!(reason, "error", "{what}");
        assert_eq!(bytes, 7, "{what}: only the frame before the violation was counted");
    }
    eprintln!("{} frame violations tried", cases.len());
    relay.still_serves(&mut agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_text_with_newlines_cannot_forge_relay_log_lines() {
    use futures_util::SinkExt;
    use hatch_proto::control::FromAgent;
    use tokio_tungstenite::tungstenite::Message;
    // What a forged line would start with, were the newline before it written raw.
    const FORGED: &str =
        "FORGED 2026-01-01T00:00:00Z  INFO hatch_relay::control: agent control channel up";
    let relay = Relay::start(&[]);
    let mut agent = relay.agent().await;
    let s = relay.start_session(&mut agent).await;
    let texts = [
        // session.failed for a real session (it is closed as error) and for a made-up id.
        serde_json::to_string(&FromAgent::SessionFailed {
            session_id: s.id.clone(),
            message: format!("no such user\n{FORGED}\r\n{FORGED}"),
        })
        .unwrap(),
        serde_json::to_string(&FromAgent::SessionFailed {
            session_id: format!("s-x\n{FORGED}"),
            message: "m".into(),
        })
        .unwrap(),
        // A session.report for a session that is not this instance's.
        serde_json::to_string(&FromAgent::SessionReport {
            session_id: format!("s-y\n{FORGED}"),
            bytes_client_to_agent: 1,
            bytes_agent_to_client: 1,
            exit_code: None,
        })
        .unwrap(),
        // An unknown type: serde's error quotes it.
        serde_json::json!({ "type": format!("x\n{FORGED}") }).to_string(),
    ];
    for t in texts {
        agent.ws.send(Message::Text(t.into())).await.unwrap();
    }
    let rec = relay.closed_session(&s.id).await;
    assert_eq!(rec["close_reason"], "error", "{rec}");
    let lines = [
        "agent could not start session",
        "agent reported a session that is not one of its instance's",
        "unreadable agent message ignored",
    ];
    wait_for("the relay logging every message", DEADLINE, || {
        let log = relay.proc.output();
        lines.iter().all(|l| log.contains(l))
            && log.matches("agent could not start session").count() == 2
    })
    .await;
    let log = relay.proc.output();
    // Each was logged on its own line, the peer's newlines escaped, and no line is forged.
    let forged: Vec<&str> = log.lines().filter(|l| l.starts_with("FORGED")).collect();
    assert!(forged.is_empty(), "forged log lines: {forged:#?}\n{log}");
    for l in lines {
        let line = log.lines().find(|x| x.contains(l)).unwrap();
        assert!(line.contains(r"\nFORGED"), "{line}");
    }
    assert!(log.contains(r#""no such user\nFORGED"#), "{log}");
    relay.still_serves(&mut agent).await;
}
