//! Test-only clients of the control plane, over real TLS on loopback: an HTTPS client that can
//! choose its source address (policy `hatch:SourceIp`), and an agent control-channel client
//! built on tokio-tungstenite.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hatch_proto::control::{FromAgent, RegisterRequest, RegisterResponse, ToAgent};
use hatch_relay::control::store::{SqliteStore, Store};
use hatch_relay::dev::{DevOptions, DevRelay};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

/// Every wait in these tests is bounded by this.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A development relay in a temporary directory, with a second handle on its store.
pub struct TestRelay {
    pub relay: DevRelay,
    pub dir: tempfile::TempDir,
    pub store: SqliteStore,
    pub tls: Arc<rustls::ClientConfig>,
}

impl TestRelay {
    pub fn start() -> TestRelay {
        Self::start_with(|_| {})
    }

    pub fn start_with(f: impl FnOnce(&mut DevOptions)) -> TestRelay {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = DevOptions { data_dir: dir.path().join("relay"), ..Default::default() };
        f(&mut opts);
        let relay = DevRelay::start(opts).unwrap();
        let store = SqliteStore::open(&relay.data_dir().join("hatch.db")).unwrap();
        let tls = hatch_relay::certs::client_config_with_ca(relay.info.ca_file.as_ref()).unwrap();
        TestRelay { relay, dir, store, tls }
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.relay.server().api_addr()
    }

    pub fn owner_key(&self) -> &str {
        &self.relay.info.access_key
    }

    pub fn account(&self) -> &str {
        &self.relay.info.account_id
    }

    pub fn store(&self) -> &dyn Store {
        &self.store
    }

    /// An HTTPS request from 127.0.0.1.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<&str>,
    ) -> Resp {
        self.call_from(
            "127.0.0.1".parse().unwrap(),
            method,
            path,
            key,
            body.map(|b| b.as_bytes().to_vec()),
        )
        .await
    }

    /// An HTTPS request from a chosen loopback source address.
    pub async fn call_from(
        &self,
        source: IpAddr,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Resp {
        tokio::time::timeout(
            DEADLINE,
            request(self.tls.clone(), self.api_addr(), source, method, path, key, body),
        )
        .await
        .expect("request timed out")
    }

    /// Registers an agent with the demo activation and connects its control channel.
    pub async fn agent(&self) -> Agent {
        let body = serde_json::to_string(&RegisterRequest {
            activation_id: self.relay.info.activation_id.clone(),
            activation_code: self.relay.info.activation_code.clone(),
            hostname: Some("test-host".into()),
        })
        .unwrap();
        let r = self.call("POST", "/v1/agent/register", None, Some(&body)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        let reg: RegisterResponse = serde_json::from_str(&r.text).unwrap();
        let mut a = Agent { id: reg.instance_id, secret: reg.instance_secret, ws: None };
        a.connect(self).await;
        a
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub text: String,
    pub request_id: Option<String>,
    /// The `Retry-After` header.
    pub retry_after: Option<String>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Asserts an error answer: status, stable code, and the full error shape.
    pub fn assert_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        let v = self.json();
        assert_eq!(v["code"], code, "{}", self.text);
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", self.text);
        let rid = v["request_id"].as_str().expect("request_id");
        assert_eq!(Some(rid), self.request_id.as_deref(), "x-request-id matches the body");
        v
    }
}

/// One HTTPS request to `addr` from `source` (the server name checked is `localhost`).
pub async fn request(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    source: IpAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Vec<u8>>,
) -> Resp {
    let host = format!("localhost:{}", addr.port());
    request_with_host(tls, addr, source, &host, method, path, key, body).await
}

/// [`request`] with a chosen `Host` header.
#[allow(clippy::too_many_arguments)]
pub async fn request_with_host(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    source: IpAddr,
    host: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Vec<u8>>,
) -> Resp {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(source, 0)).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", host);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default()))).unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let header =
        |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let request_id = header("x-request-id");
    let retry_after = header("retry-after");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Resp { status, text: String::from_utf8_lossy(&bytes).into_owned(), request_id, retry_after }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A test agent speaking the real control channel over WSS.
pub struct Agent {
    pub id: String,
    pub secret: String,
    pub ws: Option<Ws>,
}

impl Agent {
    /// Opens (another) control channel; returns the HTTP status when refused.
    pub async fn try_connect(tr: &TestRelay, secret: &str) -> Result<Ws, u16> {
        connect_control(tr.tls.clone(), tr.api_addr(), secret).await
    }

    pub async fn connect(&mut self, tr: &TestRelay) {
        self.ws = Some(Self::try_connect(tr, &self.secret).await.expect("control channel refused"));
        // Online once the relay has registered the channel.
        wait_until(|| tr.relay.server().control().agent_online(&self.id)).await;
    }

    /// The next message other than a heartbeat (heartbeats are answered).
    pub async fn next(&mut self) -> Option<ToAgent> {
        next_message(self.ws.as_mut().expect("connected")).await
    }

    pub async fn disconnect(&mut self, tr: &TestRelay) {
        if let Some(mut ws) = self.ws.take() {
            let _ = ws.close(None).await;
            let _ =
                tokio::time::timeout(DEADLINE, async { while ws.next().await.is_some() {} }).await;
        }
        wait_until(|| !tr.relay.server().control().agent_online(&self.id)).await;
    }
}

/// The default user the fake agents of these tests announce in their hello.
pub const FAKE_AGENT_USER: &str = "hatch-test";

/// Opens an agent control channel to `addr` with an instance secret, and says hello.
pub async fn connect_control(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    secret: &str,
) -> Result<Ws, u16> {
    let url = format!("wss://localhost:{}/v1/agent/connect", addr.port());
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {secret}").parse().unwrap());
    let fut = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(tls)),
    );
    match tokio::time::timeout(DEADLINE, fut).await.expect("connect timed out") {
        Ok((mut ws, _)) => {
            // As a real agent does first: whom it runs sessions as.
            let hello = serde_json::to_string(&FromAgent::hello(FAKE_AGENT_USER, true)).unwrap();
            ws.send(tungstenite::Message::Text(hello.into())).await.unwrap();
            Ok(ws)
        }
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("control channel: {e}"),
    }
}

/// The next control message other than a heartbeat (heartbeats are answered).
pub async fn next_message(ws: &mut Ws) -> Option<ToAgent> {
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next()).await.expect("agent read timed out");
        match m {
            None | Some(Err(_)) => return None,
            Some(Ok(tungstenite::Message::Text(t))) => {
                let msg: ToAgent = serde_json::from_str(&t).unwrap();
                if let ToAgent::Heartbeat { seq } = msg {
                    let reply = serde_json::to_string(&FromAgent::Heartbeat { seq }).unwrap();
                    ws.send(tungstenite::Message::Text(reply.into())).await.unwrap();
                    continue;
                }
                return Some(msg);
            }
            Some(Ok(tungstenite::Message::Close(_))) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// Polls `f` until it holds, failing the test after [`DEADLINE`].
pub async fn wait_until(mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(tokio::time::Instant::now() < end, "condition not met before the deadline");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A start-session body.
pub fn start_body(instance: &str) -> String {
    format!(r#"{{"instance_id":"{instance}","mode":"shell"}}"#)
}

/// Dials a stream URL with a bearer token and `hatch.v1`; on refusal, the HTTP status and the
/// error code of the JSON body.
pub async fn dial_stream(tr: &TestRelay, url: &str, token: &str) -> Result<Ws, (u16, String)> {
    dial_stream_with(tr.tls.clone(), url, token).await
}

/// [`dial_stream`] with a given TLS configuration.
pub async fn dial_stream_with(
    tls: Arc<rustls::ClientConfig>,
    url: &str,
    token: &str,
) -> Result<Ws, (u16, String)> {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    req.headers_mut().insert("sec-websocket-protocol", "hatch.v1".parse().unwrap());
    let fut = tokio_tungstenite::connect_async_tls_with_config(
        req,
        None,
        false,
        Some(tokio_tungstenite::Connector::Rustls(tls)),
    );
    match tokio::time::timeout(DEADLINE, fut).await.expect("dial timed out") {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp.body().clone().unwrap_or_default();
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            Err((status, v["code"].as_str().unwrap_or("").to_owned()))
        }
        Err(e) => panic!("stream dial: {e}"),
    }
}

/// Reads until the close frame; returns its code (None when the connection just ended).
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await.expect("no close before the deadline")
        {
            Some(Ok(tungstenite::Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// Starts a session as the owner on `agent`, dials both legs; returns (sid, client, agent leg).
pub async fn open_session(tr: &TestRelay, agent: &mut Agent) -> (String, Ws, Ws) {
    let r =
        tr.call("POST", "/v1/sessions", Some(tr.owner_key()), Some(&start_body(&agent.id))).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let s: hatch_proto::api::StartSessionResponse = serde_json::from_str(&r.text).unwrap();
    let Some(ToAgent::SessionOpen { stream_url, token, .. }) = agent.next().await else {
        panic!("expected session.open");
    };
    let a = dial_stream(tr, &stream_url, &token).await.expect("agent leg refused");
    let c = dial_stream(tr, &s.stream_url, &s.token).await.expect("client leg refused");
    (s.session_id, c, a)
}
