//! The session runner through the relay's real data plane (hatch_relay::data, real TLS, real
//! tokens): the agent dials its leg, the test dials the client leg and types.

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{DEADLINE, Leg, eventually, processes_in_session, read_end, read_until, send};
use hatch_agent::session::{self, SessionConfig, SessionEnd, SessionSpec};
use hatch_proto::api::Mode;
use hatch_proto::channel::Message;
use hatch_proto::close;
use hatch_proto::token::Role;
use hatch_relay::data::{DataConfig, DataPlane, IoBackend};
use hatch_relay::plane::{CloseReason, DataEvent};
use hatch_relay::token::{TokenSigner, TokenVerifier};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Relay {
    _plane: DataPlane,
    port: u16,
    signer: TokenSigner,
    events: mpsc::UnboundedReceiver<DataEvent>,
    tls: Arc<rustls::ClientConfig>,
    cfg: SessionConfig,
    _dir: tempfile::TempDir,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

impl Relay {
    fn start() -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let pki = hatch_relay::certs::ensure_dev_pki(dir.path(), &[]).unwrap();
        let server =
            hatch_relay::certs::server_config(&pki.cert_file, &pki.key_file, &[b"http/1.1"])
                .unwrap();
        let mut cfg = DataConfig::new("127.0.0.1:0".parse().unwrap(), Some(server));
        cfg.io = IoBackend::Epoll;
        cfg.shards = 1;
        // These sessions run without a control channel to resume through: a lost leg ends
        // them (resuming is covered by e2e/tests/resume.rs).
        cfg.resume_window = None;
        let (signer, _) = TokenSigner::generate("k1").unwrap();
        let (tx, events) = mpsc::unbounded_channel();
        let plane = DataPlane::start(cfg, TokenVerifier::for_signer(&signer), tx).unwrap();
        let ca = std::fs::read_to_string(&pki.ca_file).unwrap();
        let tls = hatch_agent::tls::client_config(Some(&ca), false).unwrap();
        let (_, timing) = hatch_agent::cli::fast_timing();
        Relay {
            port: plane.local_addr().port(),
            _plane: plane,
            signer,
            events,
            cfg: SessionConfig {
                tls: tls.clone(),
                allow_plaintext: false,
                timing,
                link: Default::default(),
                allow_forward: Default::default(),
            },
            tls,
            _dir: dir,
        }
    }

    fn url(&self, sid: &str, role: Role) -> String {
        format!("wss://localhost:{}/v1/stream/{sid}?role={}", self.port, role.as_str())
    }

    fn token(&self, sid: &str, role: Role) -> String {
        self.signer.issue(sid, role, "i-1", "a-1", now()).unwrap().0
    }

    /// Starts the agent side of `sid` (as the agent would on `session.open`).
    fn agent(
        &self,
        sid: &str,
        mode: Mode,
        command: Option<&[&str]>,
    ) -> tokio::task::JoinHandle<SessionEnd> {
        let spec = SessionSpec {
            session_id: sid.into(),
            stream_url: self.url(sid, Role::Agent),
            token: self.token(sid, Role::Agent),
            mode,
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            run_as: Some(hatch_agent::session::identity(None).unwrap().default_user),
            term: None,
            tty: None,
            remote_host: None,
            remote_port: None,
        };
        let cfg = self.cfg.clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let _keep = tx;
            session::run(spec, &cfg, rx).await
        })
    }

    async fn client(&self, sid: &str) -> Leg {
        let mut req = self.url(sid, Role::Client).into_client_request().unwrap();
        let bearer = format!("Bearer {}", self.token(sid, Role::Client));
        req.headers_mut().insert("authorization", bearer.parse().unwrap());
        req.headers_mut().insert("sec-websocket-protocol", "hatch.v1".parse().unwrap());
        let fut = tokio_tungstenite::connect_async_tls_with_config(
            req,
            None,
            true,
            Some(Connector::Rustls(self.tls.clone())),
        );
        tokio::time::timeout(DEADLINE, fut).await.unwrap().unwrap().0.into()
    }

    async fn next_end(&mut self) -> hatch_relay::plane::SessionEnd {
        loop {
            let ev = tokio::time::timeout(DEADLINE, self.events.recv()).await.unwrap().unwrap();
            if let DataEvent::Ended(e) = ev {
                return e;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_through_the_data_plane_resize_echo_and_exit_status() {
    let mut relay = Relay::start();
    let agent = relay.agent("s-dp-shell", Mode::Shell, None);
    let mut ws = relay.client("s-dp-shell").await;
    send(&mut ws, Message::Resize { cols: 132, rows: 43 }).await;
    send(&mut ws, Message::Data(b"stty size; echo out-$((6*7))\n")).await;
    let mut out = String::new();
    read_until(&mut ws, &mut out, "43 132\r\nout-42\r\n").await;
    send(&mut ws, Message::Data(b"exit 3\n")).await;
    let (_, exit, code) = read_end(&mut ws).await;
    assert_eq!((exit, code), (Some(3), Some(close::NORMAL)));
    assert_eq!(agent.await.unwrap(), SessionEnd::Exited(3));
    let end = relay.next_end().await;
    assert_eq!(end.session_id, "s-dp-shell");
    assert!(end.bytes_agent_to_client > 0 && end.bytes_client_to_agent > 0, "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_kill_9_through_the_data_plane_gives_137() {
    let relay = Relay::start();
    let agent = relay.agent("s-dp-kill", Mode::Exec, Some(&["sh", "-c", "kill -9 $$"]));
    let mut ws = relay.client("s-dp-kill").await;
    let (_, exit, code) = read_end(&mut ws).await;
    assert_eq!((exit, code), (Some(137), Some(close::NORMAL)));
    assert_eq!(agent.await.unwrap(), SessionEnd::Exited(137));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leg_dropped_hangs_up_the_shell() {
    let mut relay = Relay::start();
    let agent = relay.agent("s-dp-drop", Mode::Shell, None);
    let mut ws = relay.client("s-dp-drop").await;
    send(&mut ws, Message::Data(b"sleep 1000 & echo pid=$$ e''nd\n")).await;
    let mut out = String::new();
    read_until(&mut ws, &mut out, " end\r\n").await;
    let pid: i32 = out
        .match_indices("pid=")
        .find_map(|(i, _)| {
            let d: String = out[i + 4..].chars().take_while(|c| c.is_ascii_digit()).collect();
            d.parse().ok()
        })
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    drop(ws);
    let end = tokio::time::timeout(DEADLINE, agent).await.unwrap().unwrap();
    assert!(matches!(&end, SessionEnd::Lost(why) if why.contains("4005")), "{end:?}");
    eventually("no process left in the session", || processes_in_session(pid).is_empty()).await;
    let relay_end = relay.next_end().await;
    assert_eq!(relay_end.reason, CloseReason::ClientLost, "{relay_end:?}");
}
