//! Test harness: a real WSS server on 127.0.0.1:0 (dev PKI from hatch-relay) standing in for
//! the relay's data plane, and a client speaking hatch.v1 on the accepted legs.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hatch_agent::session::{self, SessionConfig, SessionEnd, SessionSpec};
use hatch_proto::api::Mode;
use hatch_proto::channel::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

/// Every wait in these tests ends within this.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The bearer token the fake data plane expects.
pub const TOKEN: &str = "agent-token-for-tests";

/// A WSS listener standing in for the data plane.
pub struct LegServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    /// `wss://127.0.0.1:port`.
    pub base: String,
    /// Client TLS config trusting the dev CA.
    pub cfg: SessionConfig,
    /// The dev CA's PEM.
    pub ca_pem: String,
    _dir: tempfile::TempDir,
}

impl LegServer {
    pub async fn start() -> LegServer {
        let dir = tempfile::tempdir().unwrap();
        let pki = hatch_relay::certs::ensure_dev_pki(dir.path(), &[]).unwrap();
        let server = hatch_relay::certs::server_config(&pki.cert_file, &pki.key_file, &[]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let ca = std::fs::read_to_string(&pki.ca_file).unwrap();
        let tls = hatch_agent::tls::client_config(Some(&ca), false).unwrap();
        let (_, timing) = hatch_agent::cli::fast_timing();
        LegServer {
            listener,
            acceptor: TlsAcceptor::from(server),
            base: format!("wss://127.0.0.1:{port}"),
            cfg: SessionConfig {
                tls,
                allow_plaintext: false,
                timing,
                link: Default::default(),
                allow_forward: Default::default(),
            },
            ca_pem: ca,
            _dir: dir,
        }
    }

    pub fn spec(&self, sid: &str, mode: Mode, command: Option<&[&str]>) -> SessionSpec {
        SessionSpec {
            session_id: sid.to_owned(),
            stream_url: format!("{}/v1/stream/{sid}?role=agent", self.base),
            token: TOKEN.to_owned(),
            mode,
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            // As the relay sends it: the user the session was authorised for (here the
            // agent's own user).
            run_as: Some(own_user()),
            term: None,
            tty: None,
            remote_host: None,
            remote_port: None,
        }
    }

    /// Accepts one agent leg; checks the bearer token and answers with `hatch.v1`.
    /// Returns the request path and the client side of the session.
    pub async fn accept(&self) -> (String, Client) {
        let (tcp, _) =
            tokio::time::timeout(DEADLINE, self.listener.accept()).await.unwrap().unwrap();
        accept_leg(self.acceptor.clone(), tcp).await
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }
}

pub async fn accept_leg(acceptor: TlsAcceptor, tcp: TcpStream) -> (String, Client) {
    let tls = tokio::time::timeout(DEADLINE, acceptor.accept(tcp)).await.unwrap().unwrap();
    let mut path = String::new();
    // The signature is tungstenite's callback type; its error is an HTTP response.
    #[allow(clippy::result_large_err)]
    let cb = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().to_string();
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok());
        assert_eq!(auth, Some(format!("Bearer {TOKEN}").as_str()));
        let proto = req.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok());
        assert_eq!(proto, Some("hatch.v1"));
        resp.headers_mut().insert("sec-websocket-protocol", "hatch.v1".parse().unwrap());
        Ok(resp)
    };
    let ws = tokio::time::timeout(DEADLINE, tokio_tungstenite::accept_hdr_async(tls, cb))
        .await
        .unwrap()
        .unwrap();
    (path, Client { ws, output: Vec::new(), stderr: Vec::new(), received: 0, acked: 0 })
}

/// What the client saw when the leg ended.
#[derive(Debug)]
pub struct Finished {
    pub output: String,
    /// What came as STDERR.
    pub stderr: String,
    pub exit: Option<i32>,
    pub errors: Vec<(u16, String)>,
    pub close: Option<(u16, String)>,
}

/// The client side of one session. It acknowledges output as `hatch` does (every 64 KiB, and
/// EXIT at once), so the agent's window never stalls it and the agent can end the session.
pub struct Client {
    pub ws: WebSocketStream<TlsStream<TcpStream>>,
    pub output: Vec<u8>,
    pub stderr: Vec<u8>,
    pub received: u64,
    acked: u64,
}

impl Client {
    /// Counts a DATA body and acknowledges when 64 KiB are unacknowledged.
    async fn got_data(&mut self, d: &[u8]) {
        self.output.extend_from_slice(d);
        self.count(d.len()).await;
    }

    /// Counts `n` bytes of output (DATA or STDERR: one offset space) and acknowledges when
    /// 64 KiB are unacknowledged.
    async fn count(&mut self, n: usize) {
        self.received += n as u64;
        if self.received - self.acked >= hatch_proto::resume::DEFAULT_ACK_BYTES {
            self.ack().await;
        }
    }

    /// Counts the agent's EXIT (one offset) and acknowledges everything at once.
    async fn got_exit(&mut self) {
        self.received += 1;
        self.ack().await;
    }

    async fn ack(&mut self) {
        self.acked = self.received;
        // The leg may be closing already; the agent then ends without the acknowledgement.
        let ack = Message::Ack(self.received).to_vec();
        let _ = self.ws.send(WsMessage::Binary(ack.into())).await;
    }

    pub async fn send(&mut self, m: Message<'_>) {
        self.ws.send(WsMessage::Binary(m.to_vec().into())).await.unwrap();
    }

    pub async fn type_line(&mut self, line: &str) {
        self.send(Message::Data(line.as_bytes())).await;
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// Asks the shell for its pid and returns it.
    pub async fn shell_pid(&mut self) -> i32 {
        self.type_line("echo pid=$$ end\n").await;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let text = self.text();
            let found = text.match_indices("pid=").find_map(|(i, _)| {
                let digits: String =
                    text[i + 4..].chars().take_while(|c| c.is_ascii_digit()).collect();
                let rest = &text[i + 4 + digits.len()..];
                if rest.starts_with(" end") { digits.parse().ok() } else { None }
            });
            if let Some(pid) = found {
                return pid;
            }
            assert!(tokio::time::Instant::now() < deadline, "no pid in {text:?}");
            let before = self.output.len();
            self.wait_for_more(before).await;
        }
    }

    async fn wait_for_more(&mut self, before: usize) {
        while self.output.len() == before {
            let msg = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("no output in time")
                .expect("leg ended")
                .unwrap();
            if let WsMessage::Binary(b) = msg {
                match Message::decode(&b).unwrap() {
                    Message::Data(d) => self.got_data(d).await,
                    Message::Ack(_) => {}
                    other => panic!("unexpected {other:?}; got {:?}", self.text()),
                }
            }
        }
    }

    /// Reads DATA until the output contains `needle`; panics at the deadline or on EXIT/close.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !self.text().contains(needle) {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("no {needle:?} within {DEADLINE:?}; got {:?}", self.text())
                })
                .unwrap_or_else(|| panic!("leg ended before {needle:?}; got {:?}", self.text()))
                .unwrap();
            if let WsMessage::Binary(b) = msg {
                match Message::decode(&b).unwrap() {
                    Message::Data(d) => self.got_data(d).await,
                    Message::Ack(_) => {}
                    other => panic!("{other:?} before {needle:?}; got {:?}", self.text()),
                }
            }
        }
        self.text()
    }

    /// Reads until the leg closes; collects output, EXIT, ERRORs and the close frame.
    pub async fn finish(mut self) -> Finished {
        let mut exit = None;
        let mut errors = Vec::new();
        let mut close = None;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("leg still open after {DEADLINE:?}; output {:?}", self.text()),
                Ok(None) => break,
                Ok(Some(Err(_))) => break,
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                WsMessage::Binary(b) => match Message::decode(&b).unwrap() {
                    Message::Data(d) => {
                        assert!(exit.is_none(), "DATA after EXIT");
                        self.got_data(d).await
                    }
                    Message::Stderr(d) => {
                        assert!(exit.is_none(), "STDERR after EXIT");
                        self.stderr.extend_from_slice(d);
                        self.count(d.len()).await;
                    }
                    Message::Exit(code) => {
                        assert!(exit.is_none(), "a second EXIT");
                        exit = Some(code);
                        self.got_exit().await;
                    }
                    Message::Ack(_) => {}
                    Message::Error { code, message } => errors.push((code, message.to_owned())),
                    other => panic!("unexpected {other:?}"),
                },
                WsMessage::Close(f) => {
                    close = f.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                _ => {}
            }
        }
        let stderr = String::from_utf8_lossy(&self.stderr).into_owned();
        Finished { output: self.text(), stderr, exit, errors, close }
    }
}

/// Runs one session in the background; the receiver yields how it ended, the sender cancels.
pub fn spawn_session(
    spec: SessionSpec,
    cfg: &SessionConfig,
) -> (tokio::task::JoinHandle<SessionEnd>, oneshot::Sender<session::Cancel>) {
    let (tx, rx) = oneshot::channel();
    let cfg = cfg.clone();
    (tokio::spawn(async move { session::run(spec, &cfg, rx).await }), tx)
}

/// Pids of live (non-zombie) processes whose session id is `sid`.
pub fn processes_in_session(sid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // Fields after the parenthesised command: state ppid pgrp session ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 3 && f[3].parse::<i32>().ok() == Some(sid) {
            out.push(pid);
        }
    }
    out
}

/// Zombie children of this process.
pub fn zombie_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 1 && f[0] == "Z" && f[1].parse::<i32>().ok() == Some(me) {
            out.push(pid);
        }
    }
    out
}

/// Polls `cond` every 20 ms until it holds or the deadline passes.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

/// A client-side leg, dialled through a relay's data plane.
pub type Ws = WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A client-side leg that counts what it received, so that it can acknowledge the agent's
/// EXIT as `hatch` does (the agent ends a session once its EXIT is acknowledged).
pub struct Leg {
    pub ws: Ws,
    received: u64,
}

impl From<Ws> for Leg {
    fn from(ws: Ws) -> Self {
        Leg { ws, received: 0 }
    }
}

/// Sends one channel message on a client-side leg.
pub async fn send(leg: &mut Leg, m: Message<'_>) {
    leg.ws.send(WsMessage::Binary(m.to_vec().into())).await.unwrap();
}

/// Reads DATA until `needle` appears in the output (ACKs are skipped).
pub async fn read_until(leg: &mut Leg, out: &mut String, needle: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !out.contains(needle) {
        let m = tokio::time::timeout_at(deadline, leg.ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in {out:?}"))
            .unwrap_or_else(|| panic!("leg ended before {needle:?}: {out:?}"))
            .unwrap();
        if let WsMessage::Binary(b) = m {
            match Message::decode(&b).unwrap() {
                Message::Data(d) => {
                    leg.received += d.len() as u64;
                    out.push_str(&String::from_utf8_lossy(d));
                }
                Message::Ack(_) => {}
                other => panic!("unexpected {other:?} before {needle:?}; output {out:?}"),
            }
        }
    }
}

/// Reads to the end: (the rest of the output, EXIT status, close code). EXIT is acknowledged.
pub async fn read_end(leg: &mut Leg) -> (String, Option<i32>, Option<u16>) {
    let mut out = String::new();
    let mut exit = None;
    loop {
        match tokio::time::timeout(DEADLINE, leg.ws.next()).await.expect("leg still open") {
            Some(Ok(WsMessage::Binary(b))) => match Message::decode(&b).unwrap() {
                Message::Data(d) => {
                    leg.received += d.len() as u64;
                    out.push_str(&String::from_utf8_lossy(d));
                }
                Message::Exit(code) => {
                    assert!(exit.is_none(), "a second EXIT");
                    exit = Some(code);
                    leg.received += 1;
                    let ack = Message::Ack(leg.received).to_vec();
                    let _ = leg.ws.send(WsMessage::Binary(ack.into())).await;
                }
                Message::Ack(_) => {}
                other => panic!("unexpected {other:?}"),
            },
            Some(Ok(WsMessage::Close(f))) => return (out, exit, f.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (out, exit, None),
        }
    }
}

/// The name of the user the tests run as: what the relay names in `session.open` for an agent
/// without `--default-user`.
pub fn own_user() -> String {
    hatch_agent::session::identity(None).unwrap().default_user
}
