//! The "Done when", against the real relay (`hatch_relay::dev::DevRelay`: API, store,
//! data plane, real TLS on loopback) and the real `hatch-agent` binary: register with the dev
//! activation, run the agent, start sessions through `POST /v1/sessions` with the dev access key
//! and act as the client over the real data plane.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{DEADLINE, Leg, eventually, processes_in_session, read_end, read_until, send};
use hatch_proto::api::{ErrorBody, Mode, StartSessionRequest, StartSessionResponse};
use hatch_proto::channel::Message;
use hatch_proto::close;
use hatch_relay::dev::{DevOptions, DevRelay};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::Connector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

struct Env {
    relay: Option<DevRelay>,
    dir: tempfile::TempDir,
    tls: Arc<rustls::ClientConfig>,
    api: SocketAddr,
    data: SocketAddr,
    instance: String,
    agent: Option<tokio::process::Child>,
}

fn addr_of(url: &str) -> SocketAddr {
    url.split("://").nth(1).unwrap().trim_end_matches('/').parse().unwrap()
}

fn start_relay(dir: &std::path::Path, api: SocketAddr, data: SocketAddr) -> DevRelay {
    DevRelay::start(DevOptions {
        data_dir: dir.join("relay"),
        api_listen: api,
        data_listen: data,
        heartbeat_interval: Duration::from_secs(1),
        // A lost leg ends its session here, as without resuming: these check how the agent
        // ends sessions (resuming is e2e/tests/resume.rs).
        data_args: ["--shards", "1", "--io", "epoll", "--resume-window", "0"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .unwrap()
}

impl Env {
    /// Relay up, agent registered with the real binary and running.
    async fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let relay = start_relay(dir.path(), any, any);
        let info = relay.info.clone();
        let state = dir.path().join("agent/agent.json");
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hatch-agent"))
            .args(["register", "--api", &info.api_url, "--activation-id", &info.activation_id])
            .args(["--activation-code", &info.activation_code, "--ca", &info.ca_file, "--state"])
            .arg(&state)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "register failed: {stderr}");
        let instance = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        assert!(instance.starts_with("i-") && instance.len() == 18, "{instance:?}");
        let mode = std::fs::metadata(&state).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777, 0o600);
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
        assert_eq!(saved["instance_id"], instance.as_str());
        assert_eq!(saved["api_url"], info.api_url.as_str());

        let agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_hatch-agent"))
            .args(["run", "--state"])
            .arg(&state)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let tls = hatch_relay::certs::client_config_with_ca(info.ca_file.as_ref()).unwrap();
        Env {
            api: addr_of(&info.api_url),
            data: addr_of(&info.data_url),
            relay: Some(relay),
            dir,
            tls,
            instance,
            agent: Some(agent),
        }
    }

    fn key(&self) -> String {
        self.relay.as_ref().unwrap().info.access_key.clone()
    }

    /// `POST /v1/sessions`: Ok(answer) or Err((status, code)).
    async fn start_session(
        &self,
        mode: Mode,
        command: Option<&[&str]>,
    ) -> Result<StartSessionResponse, (u16, String)> {
        let body = StartSessionRequest {
            instance_id: self.instance.clone(),
            mode,
            command: command.map(|c| c.iter().map(|s| s.to_string()).collect()),
            run_as: None,
            term: None,
            tty: None,
            remote_host: None,
            remote_port: None,
        };
        let tcp = tokio::net::TcpStream::connect(self.api).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls =
            tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("/v1/sessions")
            .header("host", self.api.to_string())
            .header("authorization", format!("Bearer {}", self.key()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, send.send_request(req)).await.unwrap().unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        if status == 201 {
            Ok(serde_json::from_slice(&bytes).unwrap())
        } else {
            let e: ErrorBody = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("{status}: {:?}", String::from_utf8_lossy(&bytes)));
            Err((status, e.code))
        }
    }

    /// Starts a session once the agent is connected (polls TargetNotConnected away) and dials
    /// the client leg.
    async fn open(&self, mode: Mode, command: Option<&[&str]>) -> Leg {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let started = loop {
            match self.start_session(mode, command).await {
                Ok(s) => break s,
                Err((409, code)) if code == "TargetNotConnected" => {
                    assert!(tokio::time::Instant::now() < deadline, "agent never connected");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("start session: {e:?}"),
            }
        };
        let mut req = started.stream_url.as_str().into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {}", started.token).parse().unwrap());
        req.headers_mut().insert("sec-websocket-protocol", "hatch.v1".parse().unwrap());
        let fut = tokio_tungstenite::connect_async_tls_with_config(
            req,
            None,
            true,
            Some(Connector::Rustls(self.tls.clone())),
        );
        tokio::time::timeout(DEADLINE, fut).await.unwrap().unwrap().0.into()
    }
}

fn pid_in(out: &str) -> i32 {
    out.match_indices("pid=")
        .find_map(|(i, _)| {
            let d: String = out[i + 4..].chars().take_while(|c| c.is_ascii_digit()).collect();
            d.parse().ok()
        })
        .unwrap_or_else(|| panic!("no pid in {out:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_against_the_real_relay() {
    let mut env = Env::start().await;

    // `echo` output arrives (exec), exit status 0, close 1000.
    let mut ws = env.open(Mode::Exec, Some(&["echo", "hello-from-agent"])).await;
    assert_eq!(
        read_end(&mut ws).await,
        ("hello-from-agent\n".into(), Some(0), Some(close::NORMAL))
    );

    // Shell: a resize is seen by `stty size`; `exit 7` gives EXIT 7.
    let mut ws = env.open(Mode::Shell, None).await;
    send(&mut ws, Message::Resize { cols: 111, rows: 33 }).await;
    send(&mut ws, Message::Data(b"stty size\n")).await;
    let mut out = String::new();
    read_until(&mut ws, &mut out, "33 111\r\n").await;
    send(&mut ws, Message::Resize { cols: 90, rows: 20 }).await;
    send(&mut ws, Message::Data(b"stty size\n")).await;
    read_until(&mut ws, &mut out, "20 90\r\n").await;
    send(&mut ws, Message::Data(b"exit 7\n")).await;
    let (_, exit, code) = read_end(&mut ws).await;
    assert_eq!((exit, code), (Some(7), Some(close::NORMAL)));

    // `kill -9 $$` gives 137.
    let mut ws = env.open(Mode::Shell, None).await;
    send(&mut ws, Message::Data(b"kill -9 $$\n")).await;
    let (_, exit, code) = read_end(&mut ws).await;
    assert_eq!((exit, code), (Some(137), Some(close::NORMAL)));

    // 50 concurrent sessions on one agent each get their own output.
    let mut legs = Vec::new();
    for _ in 0..50 {
        legs.push(env.open(Mode::Exec, Some(&["sh", "-c", "read l; echo got-$l"])).await);
    }
    for (i, ws) in legs.iter_mut().enumerate() {
        send(ws, Message::Data(format!("{i}\n").as_bytes())).await;
    }
    let mut ends = Vec::new();
    for (i, mut ws) in legs.into_iter().enumerate() {
        ends.push(tokio::spawn(async move { (i, read_end(&mut ws).await) }));
    }
    for e in ends {
        let (i, (out, exit, code)) = e.await.unwrap();
        // No TERM (the test is not a terminal): no echo, just the answer.
        assert_eq!(out, format!("got-{i}\n"));
        assert_eq!((exit, code), (Some(0), Some(close::NORMAL)), "session {i}");
    }

    // Closing the client's leg hangs up the shell: no process left.
    let mut ws = env.open(Mode::Shell, None).await;
    send(&mut ws, Message::Data(b"sleep 1000 & echo pid=$$ e''nd\n")).await;
    let mut out = String::new();
    read_until(&mut ws, &mut out, " end\r\n").await;
    let pid = pid_in(&out);
    assert!(processes_in_session(pid).len() >= 2);
    drop(ws);
    eventually("no process left after the client left", || processes_in_session(pid).is_empty())
        .await;

    // Killing the relay: the agent reconnects when it comes back on the same addresses and
    // data directory, and serves a new session.
    let mut ws = env.open(Mode::Shell, None).await;
    send(&mut ws, Message::Data(b"echo pid=$$ e''nd\n")).await;
    let mut out = String::new();
    read_until(&mut ws, &mut out, " end\r\n").await;
    let live_pid = pid_in(&out);
    drop(env.relay.take());
    // The live session's leg died with the relay: the agent hangs it up.
    eventually("session of the dead relay hung up", || processes_in_session(live_pid).is_empty())
        .await;
    drop(ws);
    env.relay = Some(start_relay(env.dir.path(), env.api, env.data));
    let mut ws = env.open(Mode::Exec, Some(&["echo", "after-restart"])).await;
    assert_eq!(read_end(&mut ws).await, ("after-restart\n".into(), Some(0), Some(close::NORMAL)));

    // SIGTERM: the agent closes live sessions with a reason and exits 0.
    let mut ws = env.open(Mode::Shell, None).await;
    send(&mut ws, Message::Data(b"echo pid=$$ e''nd\n")).await;
    let mut out = String::new();
    read_until(&mut ws, &mut out, " end\r\n").await;
    let pid = pid_in(&out);
    let mut agent = env.agent.take().unwrap();
    let agent_pid = nix::unistd::Pid::from_raw(agent.id().unwrap() as i32);
    nix::sys::signal::kill(agent_pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(DEADLINE, agent.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
    let (_, exit, code) = read_end(&mut ws).await;
    assert_eq!(exit, None);
    assert_eq!(code, Some(close::AGENT_SHUTDOWN));
    eventually("shell gone after SIGTERM", || processes_in_session(pid).is_empty()).await;
}
