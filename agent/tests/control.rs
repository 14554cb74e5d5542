//! The control loop against a loopback WSS control endpoint (dev PKI): heartbeats, session.open,
//! session.failed, reconnect after the channel drops, shutdown closing live sessions.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use hatch_agent::control::{self, RunConfig};
use hatch_agent::state::State;
use hatch_proto::api::Mode;
use hatch_proto::channel;
use hatch_proto::close;
use hatch_proto::control::{FromAgent, ToAgent};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "instance-secret-for-tests";

type CtrlWs =
    tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

async fn accept_control(listener: &TcpListener, acceptor: &TlsAcceptor) -> CtrlWs {
    let (tcp, _) = tokio::time::timeout(DEADLINE, listener.accept()).await.unwrap().unwrap();
    let tls = tokio::time::timeout(DEADLINE, acceptor.accept(tcp)).await.unwrap().unwrap();
    #[allow(clippy::result_large_err)]
    let cb = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        assert_eq!(req.uri().path(), "/v1/agent/connect");
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok());
        assert_eq!(auth, Some(format!("Bearer {SECRET}").as_str()));
        Ok(resp)
    };
    let mut ws = tokio::time::timeout(DEADLINE, tokio_tungstenite::accept_hdr_async(tls, cb))
        .await
        .unwrap()
        .unwrap();
    // Every channel starts with the agent's hello: whom it runs sessions as.
    match recv(&mut ws).await {
        FromAgent::Hello { version, default_user, switch_user } => {
            let me = hatch_agent::session::identity(None).unwrap();
            assert_eq!(version, env!("CARGO_PKG_VERSION"));
            assert_eq!((default_user, switch_user), (me.default_user, me.switch_user));
        }
        other => panic!("expected a hello first, got {other:?}"),
    }
    ws
}

async fn send(ws: &mut CtrlWs, m: &ToAgent) {
    ws.send(WsMessage::Text(serde_json::to_string(m).unwrap().into())).await.unwrap();
}

async fn recv(ws: &mut CtrlWs) -> FromAgent {
    loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await.unwrap().unwrap().unwrap() {
            WsMessage::Text(t) => return serde_json::from_str(&t).unwrap(),
            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The agent's configuration for a control endpoint on loopback `port`, with fast timings.
fn run_config(srv: &LegServer, instance_id: &str, port: u16) -> RunConfig {
    let (timing, session_timing) = hatch_agent::cli::fast_timing();
    let mut session = srv.cfg.clone();
    session.timing = session_timing;
    RunConfig {
        state: State {
            instance_id: instance_id.into(),
            instance_secret: SECRET.into(),
            api_url: format!("https://127.0.0.1:{port}"),
            ca_pem: None,
        },
        api_urls: Vec::new(),
        tls: srv.cfg.tls.clone(),
        session,
        timing,
        max_sessions: 8,
        identity: hatch_agent::session::identity(None).unwrap(),
    }
}

fn open(
    srv: &LegServer,
    sid: &str,
    mode: Mode,
    cmd: Option<&[&str]>,
    run_as: Option<&str>,
) -> ToAgent {
    let s = srv.spec(sid, mode, cmd);
    ToAgent::SessionOpen {
        session_id: s.session_id,
        stream_url: s.stream_url,
        token: s.token,
        mode: s.mode,
        command: s.command,
        run_as: run_as.map(str::to_owned).or(s.run_as),
        term: None,
        tty: None,
        remote_host: None,
        remote_port: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_channel_heartbeats_sessions_reconnect_and_shutdown() {
    let srv = LegServer::start().await;
    let ctrl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = ctrl.local_addr().unwrap().port();
    let acceptor = srv.acceptor();
    let cfg = run_config(&srv, "i-0000000000000001", port);
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(control::run(cfg, shutdown.clone()));

    let mut ws = accept_control(&ctrl, &acceptor).await;
    send(&mut ws, &ToAgent::Heartbeat { seq: 7 }).await;
    assert_eq!(recv(&mut ws).await, FromAgent::Heartbeat { seq: 7 });

    // session.open: the agent dials the leg and runs the command.
    send(&mut ws, &open(&srv, "s-c1", Mode::Exec, Some(&["echo", "via-control"]), None)).await;
    let (path, client) = srv.accept().await;
    assert!(path.starts_with("/v1/stream/s-c1"), "{path}");
    let done = client.finish().await;
    assert_eq!((done.output.as_str(), done.exit), ("via-control\n", Some(0)));

    // A session that cannot start: ERROR on the leg, session.failed on the control channel.
    send(&mut ws, &open(&srv, "s-c2", Mode::Shell, None, Some("no-such-user-hatch"))).await;
    let (_, client) = srv.accept().await;
    let done = client.finish().await;
    assert_eq!(done.errors.first().map(|e| e.0), Some(channel::ERROR_RUN_AS), "{done:?}");
    match recv(&mut ws).await {
        FromAgent::SessionFailed { session_id, message } => {
            assert_eq!(session_id, "s-c2");
            assert!(message.contains("does not exist"), "{message}");
        }
        other => panic!("expected session.failed, got {other:?}"),
    }

    // A live shell survives the control channel dropping; the agent reconnects.
    send(&mut ws, &open(&srv, "s-c3", Mode::Shell, None, None)).await;
    let (_, mut shell) = srv.accept().await;
    let pid = shell.shell_pid().await;
    drop(ws);
    let mut ws = accept_control(&ctrl, &acceptor).await;
    send(&mut ws, &ToAgent::Heartbeat { seq: 8 }).await;
    assert_eq!(recv(&mut ws).await, FromAgent::Heartbeat { seq: 8 });
    shell.type_line("echo still-$((1+1))\n").await;
    shell.wait_for("still-2").await;

    // session.close ends that session with 4006 and the reason.
    send(&mut ws, &open(&srv, "s-c4", Mode::Shell, None, None)).await;
    let (_, mut closing) = srv.accept().await;
    closing.shell_pid().await;
    let close_msg =
        ToAgent::SessionClose { session_id: "s-c4".into(), reason: "terminated".into() };
    send(&mut ws, &close_msg).await;
    let done = closing.finish().await;
    assert_eq!(done.close, Some((close::TERMINATED, "terminated".into())));

    // Shutdown: the live shell's leg is closed with 4011 and a reason, then the control channel
    // with 1001.
    shutdown.cancel();
    let done = shell.finish().await;
    assert_eq!(done.close, Some((close::AGENT_SHUTDOWN, "agent shutting down".into())), "{done:?}");
    let mut control_close = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(DEADLINE, ws.next()).await {
        if let WsMessage::Close(f) = m {
            control_close = f.map(|f| u16::from(f.code));
        }
    }
    assert_eq!(control_close, Some(close::GOING_AWAY));
    tokio::time::timeout(DEADLINE, agent).await.unwrap().unwrap().unwrap();
    eventually("shell gone", || processes_in_session(pid).is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_is_retried_until_it_answers() {
    let srv = LegServer::start().await;
    // Reserve a port, close it: the first attempts are refused.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = run_config(&srv, "i-0000000000000002", port);
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(control::run(cfg, shutdown.clone()));
    // Let a few attempts fail, then come up on the same port.
    tokio::task::yield_now().await;
    let ctrl = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let mut ws = accept_control(&ctrl, &srv.acceptor()).await;
    send(&mut ws, &ToAgent::Heartbeat { seq: 1 }).await;
    assert_eq!(recv(&mut ws).await, FromAgent::Heartbeat { seq: 1 });
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, agent).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_floods_pings_and_never_reads_loses_the_channel_and_it_reconnects() {
    let srv = LegServer::start().await;
    let ctrl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = ctrl.local_addr().unwrap().port();
    let acceptor = srv.acceptor();
    let cfg = run_config(&srv, "i-0000000000000002", port);
    let dead_after = cfg.timing.dead_after;
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(control::run(cfg, shutdown.clone()));

    // A hostile relay: 125-byte pings nonstop, never a read, never a heartbeat. Pings are not
    // liveness and the agent reads on only once its pong is written, so the channel is
    // declared lost after `dead_after` (before: every ping kept it alive, forever).
    let mut ws = accept_control(&ctrl, &acceptor).await;
    let started = std::time::Instant::now();
    let flood = tokio::spawn(async move {
        let ping = WsMessage::Ping(vec![0x5a; 125].into());
        let mut pings = 0u64;
        loop {
            match tokio::time::timeout(std::time::Duration::from_millis(200), ws.send(ping.clone()))
                .await
            {
                Ok(Ok(())) => pings += 1,
                Ok(Err(_)) => return pings,
                // The agent stopped reading; keep trying until it ends the connection.
                Err(_) => {}
            }
            if started.elapsed() > DEADLINE {
                return pings;
            }
        }
    });
    let mut ws = accept_control(&ctrl, &acceptor).await;
    let lost_after = started.elapsed();
    let pings = flood.await.unwrap();
    eprintln!("{pings} pings sent; the agent reconnected after {lost_after:?}");
    assert!(lost_after >= dead_after, "{lost_after:?}");
    // The new channel works.
    send(&mut ws, &ToAgent::Heartbeat { seq: 9 }).await;
    assert_eq!(recv(&mut ws).await, FromAgent::Heartbeat { seq: 9 });
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, agent).await.unwrap().unwrap().unwrap();
}
