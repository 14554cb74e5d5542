//! Memory of the real `hatch-agent run` process: idle, and with 50 live shell sessions.
//! A measurement, not a pass/fail threshold: run with
//! `cargo test -p hatch-agent --test rss -- --ignored --nocapture`
//! (`HATCH_AGENT_BIN=target/release/hatch-agent` to measure a release build).

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hatch_proto::api::Mode;
use hatch_proto::control::{FromAgent, ToAgent};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

const SESSIONS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run explicitly"]
async fn agent_rss_idle_and_with_50_sessions() {
    let srv = LegServer::start().await;
    let ctrl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = ctrl.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("agent.json");
    std::fs::write(
        &state,
        serde_json::json!({
            "instance_id": "i-00000000000000ff",
            "instance_secret": "instance-secret-for-tests",
            "api_url": format!("https://127.0.0.1:{port}"),
            "ca_pem": srv.ca_pem,
        })
        .to_string(),
    )
    .unwrap();
    let bin = std::env::var("HATCH_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_hatch-agent").to_owned());
    let mut child = tokio::process::Command::new(&bin)
        .args(["run", "--state"])
        .arg(&state)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();

    let (tcp, _) = ctrl.accept().await.unwrap();
    let tls = srv.acceptor().accept(tcp).await.unwrap();
    let mut ws = tokio_tungstenite::accept_async(tls).await.unwrap();
    ws.send(WsMessage::Text(serde_json::to_string(&ToAgent::Heartbeat { seq: 1 }).unwrap().into()))
        .await
        .unwrap();
    loop {
        if let WsMessage::Text(t) = ws.next().await.unwrap().unwrap() {
            assert_eq!(
                serde_json::from_str::<FromAgent>(&t).unwrap(),
                FromAgent::Heartbeat { seq: 1 }
            );
            break;
        }
    }
    let idle = rss_kib(pid);

    let mut clients = Vec::new();
    for i in 0..SESSIONS {
        let s = srv.spec(&format!("s-rss-{i}"), Mode::Shell, None);
        let open = ToAgent::SessionOpen {
            session_id: s.session_id,
            stream_url: s.stream_url,
            token: s.token,
            mode: s.mode,
            command: None,
            run_as: s.run_as,
            term: None,
            tty: None,
            remote_host: None,
            remote_port: None,
        };
        ws.send(WsMessage::Text(serde_json::to_string(&open).unwrap().into())).await.unwrap();
        let (_, mut c) = srv.accept().await;
        c.shell_pid().await;
        clients.push(c);
    }
    // Some output through every session so buffers are in use.
    for c in clients.iter_mut() {
        c.type_line("seq 1 2000 | tail -1\n").await;
        c.wait_for("2000\r\n").await;
    }
    let busy = rss_kib(pid);
    println!(
        "hatch-agent ({bin}) VmRSS idle: {idle} KiB; with {SESSIONS} live shell sessions: {busy} \
         KiB; per session: {:.1} KiB",
        (busy as f64 - idle as f64) / SESSIONS as f64
    );
    drop(clients);
    child.start_kill().unwrap();
    let _ = child.wait().await;
}
