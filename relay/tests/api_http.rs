//! The API listener below the routes, over real TLS on loopback: request heads hyper would
//! answer itself (with an empty body) are answered with the JSON error shape, connections stay
//! usable for the next request, and the listener holds at most `--max-api-connections`.

mod api_support;

use std::sync::Arc;

use api_support::{DEADLINE, TestRelay, start_body};
use hatch_proto::control::ToAgent;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A TLS connection to the API, or the error that ended the attempt.
async fn tls_connect(tr: &TestRelay) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(tr.api_addr()).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tr.tls));
    tokio::time::timeout(DEADLINE, connector.connect(name, tcp)).await.expect("tls handshake hung")
}

/// One HTTP/1.1 answer: status, lower-cased head, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    /// Asserts the documented error shape: status, code, message, request id in body and header.
    fn assert_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        assert!(self.head.contains("content-type: application/json"), "{self:?}");
        let v: Value = serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"));
        assert_eq!(v["code"], code, "{self:?}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{self:?}");
        let rid = v["request_id"].as_str().expect("request_id");
        assert!(self.head.contains(&format!("x-request-id: {rid}\r\n")), "{self:?}");
        v
    }
}

/// Splits the answers off `bytes` (each framed by its Content-Length).
fn answers(mut bytes: &[u8]) -> Vec<Answer> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let Some(end) = text.find("\r\n\r\n") else { panic!("no whole head in {text:?}") };
        let head = text[..end + 2].to_ascii_lowercase();
        let status = head[9..12].parse().unwrap_or_else(|_| panic!("status line of {head:?}"));
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        let body = String::from_utf8_lossy(&bytes[end + 4..end + 4 + len]).into_owned();
        out.push(Answer { status, head, body });
        bytes = &bytes[end + 4 + len..];
    }
    out
}

/// Sends `raw` on a new TLS connection and reads until the relay closes it.
async fn exchange(tr: &TestRelay, raw: &[u8]) -> Vec<Answer> {
    let mut tls = tls_connect(tr).await.expect("tls connect");
    tls.write_all(raw).await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the relay did not close the connection");
    answers(&got)
}

fn one(mut a: Vec<Answer>) -> Answer {
    assert_eq!(a.len(), 1, "{a:?}");
    a.remove(0)
}

#[tokio::test]
async fn heads_hyper_would_refuse_are_answered_with_the_json_error() {
    let tr = TestRelay::start();
    let key = tr.owner_key().to_owned();
    let post = |extra: &str, body: &str| {
        format!(
            "POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
             {extra}\r\n{body}"
        )
    };
    let many: String = (0..2000).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    let cases: Vec<(&str, String, u16)> = vec![
        ("two Content-Lengths", post("Content-Length: 2\r\nContent-Length: 4\r\n", "{}{}"), 400),
        (
            "2,000 header fields",
            format!("GET /v1/instances HTTP/1.1\r\nHost: localhost\r\n{many}\r\n"),
            431,
        ),
        (
            "a malformed header line",
            "GET /healthz HTTP/1.1\r\nHost: localhost\r\nno colon here\r\n\r\n".into(),
            400,
        ),
        ("a space in a header name", "GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n".into(), 400),
        ("a malformed request line", "GET /healthz HTTP/9\r\n\r\n".into(), 400),
        ("HTTP/2 without negotiation", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(), 400),
        ("a chunked body", post("Transfer-Encoding: chunked\r\n", "2\r\n{}\r\n0\r\n\r\n"), 411),
        ("a Content-Length over the body limit", post("Content-Length: 1000000\r\n", ""), 413),
        ("a head over 16 KiB", format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(20_000)), 431),
    ];
    for (name, raw, status) in &cases {
        let a = one(exchange(&tr, raw.as_bytes()).await);
        a.assert_error(*status, "InvalidRequest");
        assert!(a.head.contains("connection: close"), "{name}: {a:?}");
    }
    // Counted like every other answer.
    let r = tr.call("GET", "/metrics", None, None).await;
    for (status, n) in [(400, 5), (431, 2), (411, 1), (413, 1)] {
        let line =
            format!("hatch_api_requests_total{{status=\"{status}\",code=\"InvalidRequest\"}} {n}");
        assert!(r.text.contains(&line), "{line} in\n{}", r.text);
    }
}

#[tokio::test]
async fn a_kept_alive_connection_serves_requests_in_turn_and_refuses_a_bad_one_in_json() {
    let tr = TestRelay::start();
    let key = tr.owner_key().to_owned();
    // Three pipelined requests (a GET, a POST whose body is the next request's neighbour, and
    // a GET), then one with two Content-Lengths: four answers, the last the JSON refusal.
    let body = r#"{"instance_id":"i-0000000000000000","mode":"shell"}"#;
    let raw = format!(
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n\
         POST /v1/sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: {}\r\n\r\n{body}\
         GET /v1/instances HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n\r\n\
         GET /healthz HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\nx",
        body.len()
    );
    let a = exchange(&tr, raw.as_bytes()).await;
    assert_eq!(a.len(), 4, "{a:?}");
    assert_eq!((a[0].status, a[0].body.as_str()), (200, "ok\n"));
    a[1].assert_error(404, "InstanceNotFound");
    assert_eq!(a[2].status, 200, "{:?}", a[2]);
    assert!(a[2].body.contains("\"instances\""), "{:?}", a[2]);
    a[3].assert_error(400, "InvalidRequest");

    // `Connection: close` ends the connection after its answer; nothing after it is read.
    let raw = "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n";
    let a = one(exchange(&tr, raw.as_bytes()).await);
    assert_eq!(a.status, 200);
}

/// One request on a new connection; `None` when the connection is refused.
async fn try_call(tr: &TestRelay, method: &str, path: &str, body: &str) -> Option<Answer> {
    let mut tls = tls_connect(tr).await.ok()?;
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
        tr.owner_key(),
        body.len()
    );
    tls.write_all(raw.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, tls.read_to_end(&mut got)).await.ok()?.ok()?;
    answers(&got).pop()
}

/// [`try_call`] until a slot is free.
async fn call_when_free(tr: &TestRelay, method: &str, path: &str, body: &str) -> Answer {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(a) = try_call(tr, method, path, body).await {
            return a;
        }
        assert!(tokio::time::Instant::now() < end, "no API slot came free");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
}

#[tokio::test]
async fn connections_past_the_limit_are_reset_and_upgraded_channels_hold_their_slot() {
    let tr = TestRelay::start_with(|o| o.max_api_connections = 2);
    // Registration and the control channel fit in the two slots even if the first is still
    // closing when the second opens.
    let mut agent = tr.agent().await;
    // The agent's control channel holds one slot; an idle connection takes the other (once
    // registration's connection is gone).
    let idle = {
        let end = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Ok(t) = tls_connect(&tr).await {
                break t;
            }
            assert!(tokio::time::Instant::now() < end, "no second slot");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    // A third is reset at accept: the handshake fails at once rather than completing.
    for _ in 0..3 {
        let err = tls_connect(&tr).await.expect_err("a connection past the limit was served");
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::BrokenPipe
            ),
            "{err:?}"
        );
    }
    drop(idle);
    let m = call_when_free(&tr, "GET", "/metrics", "").await;
    assert_eq!(m.status, 200);
    assert!(metric(&m.body, "hatch_api_connections_refused_total") >= 3, "{}", m.body);
    assert_eq!(metric(&m.body, "hatch_api_connections_open"), 2, "{}", m.body);
    // The agent's channel survived it all: a session started now reaches it.
    let a = call_when_free(&tr, "POST", "/v1/sessions", &start_body(&agent.id)).await;
    assert_eq!(a.status, 201, "{a:?}");
    assert!(matches!(agent.next().await, Some(ToAgent::SessionOpen { .. })));
}
