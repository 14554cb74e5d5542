//! Test harness for the data plane: a real relay on 127.0.0.1:0 with real TLS, real tokens and
//! real WebSocket clients (tokio-tungstenite over rustls), plus raw-frame helpers.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hatch_proto::token::Role;
use hatch_relay::data::{DataConfig, DataPlane, IoBackend};
use hatch_relay::plane::{DataEvent, SessionEnd};
use hatch_relay::token::{LegTerms, TokenSigner, TokenVerifier};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// A connected leg.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub struct Relay {
    pub plane: Option<DataPlane>,
    pub addr: std::net::SocketAddr,
    pub signer: TokenSigner,
    pub events: mpsc::UnboundedReceiver<DataEvent>,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub tls: bool,
    pub _dir: tempfile::TempDir,
}

impl Relay {
    /// A relay with test-friendly defaults, adjusted by `f`.
    pub fn start(io: IoBackend, f: impl FnOnce(&mut DataConfig)) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let pki = hatch_relay::certs::ensure_dev_pki(dir.path(), &[]).unwrap();
        let server =
            hatch_relay::certs::server_config(&pki.cert_file, &pki.key_file, &[b"http/1.1"])
                .unwrap();
        let client_tls = hatch_relay::certs::client_config_with_ca(&pki.ca_file).unwrap();
        let mut cfg = DataConfig::new("127.0.0.1:0".parse().unwrap(), Some(server));
        cfg.io = io;
        cfg.shards = 1;
        cfg.handshake_timeout = Duration::from_secs(5);
        f(&mut cfg);
        let tls = cfg.tls.is_some();
        let (signer, _) = TokenSigner::generate("k1").unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let plane = DataPlane::start(cfg, TokenVerifier::for_signer(&signer), tx).unwrap();
        // Where io_uring works here, the uring tests must really run on it.
        if io == IoBackend::Uring && hatch_relay::data::io::uring::probe().is_ok() {
            assert_eq!(plane.backend(), IoBackend::Uring);
        }
        Relay {
            addr: plane.local_addr(),
            plane: Some(plane),
            signer,
            events,
            client_tls,
            tls,
            _dir: dir,
        }
    }

    pub fn plane(&self) -> &DataPlane {
        self.plane.as_ref().unwrap()
    }

    pub fn token(&self, sid: &str, role: Role) -> String {
        self.signer.issue(sid, role, "i-1", "a-1", now()).unwrap().0
    }

    /// A resume token (`res` claim) for a new leg of `sid`.
    pub fn resume_token(&self, sid: &str, role: Role) -> String {
        self.signer
            .issue_with(
                sid,
                role,
                "i-1",
                "a-1",
                now(),
                LegTerms { resume: true, ..Default::default() },
            )
            .unwrap()
            .0
    }

    /// The next event that is not a progress report.
    pub async fn next_event(&mut self) -> DataEvent {
        loop {
            let ev = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("no event reported")
                .expect("event channel closed");
            if !matches!(ev, DataEvent::Progress { .. }) {
                return ev;
            }
        }
    }

    pub fn url(&self, sid: &str, role: Role) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://localhost:{}/v1/stream/{sid}?role={}", self.addr.port(), role.as_str())
    }

    /// Dials a leg with `token` in the Authorization header.
    pub async fn dial(&self, sid: &str, role: Role, token: &str) -> Result<Ws, tungstenite::Error> {
        let mut req = self.url(sid, role).into_client_request().unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        req.headers_mut().insert("sec-websocket-protocol", "hatch.v1".parse().unwrap());
        self.dial_req(req).await
    }

    pub async fn dial_req(
        &self,
        req: tungstenite::handshake::client::Request,
    ) -> Result<Ws, tungstenite::Error> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let connector =
            if self.tls { Connector::Rustls(self.client_tls.clone()) } else { Connector::Plain };
        let fut = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector));
        tokio::time::timeout(WAIT, fut).await.expect("dial timed out").map(|(ws, _)| ws)
    }

    /// Dials both legs of a fresh session.
    pub async fn pair(&self, sid: &str) -> (Ws, Ws) {
        let c = self.dial(sid, Role::Client, &self.token(sid, Role::Client)).await.unwrap();
        let a = self.dial(sid, Role::Agent, &self.token(sid, Role::Agent)).await.unwrap();
        (c, a)
    }

    /// The next session end reported (skipping Connected events).
    pub async fn next_end(&mut self) -> SessionEnd {
        loop {
            let ev = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("no session end reported")
                .expect("event channel closed");
            if let DataEvent::Ended(e) = ev {
                return e;
            }
        }
    }

    /// Reads one counter summed over shards from the metrics text.
    pub fn metric(&self, name: &str) -> u64 {
        self.plane()
            .metrics()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

/// Receives the next data message (binary), skipping pings/pongs.
pub async fn recv_bin(ws: &mut Ws) -> Vec<u8> {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("recv timed out") {
            Some(Ok(Message::Binary(b))) => return b.to_vec(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a binary message, got {other:?}"),
        }
    }
}

/// Waits for the close frame and returns its code.
pub async fn recv_close(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("close timed out") {
            Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
            Some(Ok(Message::Close(None))) => return 1005,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

pub async fn send_bin(ws: &mut Ws, b: &[u8]) {
    ws.send(Message::binary(b.to_vec())).await.unwrap();
}

pub async fn close_with(ws: &mut Ws, code: u16) {
    ws.send(Message::Close(Some(CloseFrame { code: code.into(), reason: "".into() })))
        .await
        .unwrap();
}

/// A refusal's HTTP status and JSON `code`.
pub fn refusal(err: tungstenite::Error) -> (u16, String) {
    match err {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or(b"{}")).unwrap();
            (status, body["code"].as_str().unwrap_or("").to_owned())
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

/// Runs `$body(io)` as two tests, one per I/O backend.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn epoll() {
                    super::$name(hatch_relay::data::IoBackend::Epoll).await
                }
                #[tokio::test]
                async fn uring() {
                    super::$name(hatch_relay::data::IoBackend::Uring).await
                }
            }
        )*
    };
}

/// A raw TLS (or plain) byte stream to the relay, for hand-made requests and frames.
pub struct Raw {
    io: RawIo,
    /// Bytes read past the 101 head (a frame the relay sent right after it), returned first.
    pending: Vec<u8>,
}

enum RawIo {
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl Raw {
    pub async fn connect(relay: &Relay) -> Raw {
        let tcp = TcpStream::connect(relay.addr).await.unwrap();
        if !relay.tls {
            return Raw { io: RawIo::Plain(tcp), pending: Vec::new() };
        }
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let c = tokio_rustls::TlsConnector::from(relay.client_tls.clone());
        let tls = tokio::time::timeout(WAIT, c.connect(name, tcp)).await.unwrap().unwrap();
        Raw { io: RawIo::Tls(Box::new(tls)), pending: Vec::new() }
    }

    pub async fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match &mut self.io {
            RawIo::Tls(s) => {
                s.write_all(b).await?;
                s.flush().await
            }
            RawIo::Plain(s) => s.write_all(b).await,
        }
    }

    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Ok(n);
        }
        let f = async {
            match &mut self.io {
                RawIo::Tls(s) => s.read(buf).await,
                RawIo::Plain(s) => s.read(buf).await,
            }
        };
        tokio::time::timeout(WAIT, f).await.expect("raw read timed out")
    }

    /// Reads until the end of the HTTP head; returns (status, head + body bytes read so far).
    pub async fn read_response(&mut self) -> (u16, Vec<u8>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = self.read(&mut buf).await.unwrap_or(0);
            assert!(n > 0, "connection closed before a response head: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        let status = std::str::from_utf8(&got[9..12]).unwrap().parse().unwrap();
        (status, got)
    }

    /// Reads until the end of the stream (or an error); returns what arrived.
    pub async fn read_to_end(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.read(&mut buf).await {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// Upgrades as a leg of `sid` and returns the stream after the 101 head.
    pub async fn upgrade(relay: &Relay, sid: &str, role: Role) -> Raw {
        let mut raw = Raw::connect(relay).await;
        let t = relay.token(sid, role);
        raw.write(
            upgrade_request(sid, role.as_str(), &format!("Authorization: Bearer {t}\r\n"))
                .as_bytes(),
        )
        .await
        .unwrap();
        let (status, mut got) = raw.read_response().await;
        assert_eq!(status, 101, "{}", String::from_utf8_lossy(&got));
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        // A frame the relay sent right after the 101 (a keepalive ping with a tiny interval on
        // a slow machine) may have come in the same read.
        raw.pending = got.split_off(end);
        raw
    }

    /// Reads one server frame: (opcode, payload).
    pub async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        self.read_exact(&mut h).await;
        let mut len = u64::from(h[1] & 0x7F);
        if len == 126 {
            let mut b = [0u8; 2];
            self.read_exact(&mut b).await;
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            self.read_exact(&mut b).await;
            len = u64::from_be_bytes(b);
        }
        let mut p = vec![0u8; len as usize];
        self.read_exact(&mut p).await;
        (h[0] & 0x0F, p)
    }

    pub async fn read_exact(&mut self, out: &mut [u8]) {
        let mut pos = 0;
        while pos < out.len() {
            let n = self.read(&mut out[pos..]).await.unwrap();
            assert!(n > 0, "eof inside a frame");
            pos += n;
        }
    }

    /// Reads frames until a close; returns its code.
    pub async fn read_close(&mut self) -> u16 {
        loop {
            let (op, p) = self.read_frame().await;
            if op == 0x8 {
                return u16::from_be_bytes([p[0], p[1]]);
            }
        }
    }
}

/// A masked client frame.
pub fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut h = [0u8; 14];
    let op = hatch_proto::frame::OpCode::Binary;
    let n = hatch_proto::frame::encode_header(true, op, payload.len() as u64, Some(key), &mut h);
    h[0] = first;
    let mut v = h[..n].to_vec();
    let mut p = payload.to_vec();
    hatch_proto::frame::unmask(&mut p, key, 0);
    v.extend_from_slice(&p);
    v
}

/// An upgrade request head with `extra` header lines.
pub fn upgrade_request(sid: &str, role: &str, extra: &str) -> String {
    format!(
        "GET /v1/stream/{sid}?role={role} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// Resident set size of this process, in bytes.
pub fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}
