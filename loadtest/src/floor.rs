//! The floor: a TLS + WebSocket echo server reached directly, no relay. It answers every DATA
//! message with the same bytes at once, like a simulated agent, and runs in its own process with
//! as many threads (each a single-threaded runtime with its own `SO_REUSEPORT` listener) as the
//! relay has shards, so the floor sees the same process and core topology as the relay run.
//! With `--danger-plaintext` it serves plain WebSocket, as the relay's data plane then does.

use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

/// TLS + upgrade must finish within this, as in the relay (`--handshake-timeout`).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Listen backlog: setup bursts of thousands of connections must not be dropped.
const BACKLOG: i32 = 4096;

/// Entry point of `hatch-loadtest floor-process`; `danger_plaintext` serves plain WebSocket,
/// `acks` acknowledges echoed bytes as the agent does.
pub fn process_main(
    cert: &Path,
    key: &Path,
    threads: usize,
    danger_plaintext: bool,
    acks: bool,
) -> ExitCode {
    match serve_until_stdin_closes(cert, key, threads, danger_plaintext, acks) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hatch-loadtest floor-process: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve_until_stdin_closes(
    cert: &Path,
    key: &Path,
    threads: usize,
    danger_plaintext: bool,
    acks: bool,
) -> anyhow::Result<()> {
    crate::proc::raise_nofile()?;
    let tls = if danger_plaintext {
        None
    } else {
        Some(hatch_relay::certs::server_config(cert, key, &[b"http/1.1"])?)
    };
    let listeners = bind_reuseport("127.0.0.1:0".parse().expect("literal address"), threads)?;
    let addr = listeners[0].local_addr()?;
    for l in listeners {
        let tls = tls.clone();
        std::thread::Builder::new().name("floor".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            match rt {
                Ok(rt) => {
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, serve(l, tls, acks));
                }
                Err(e) => eprintln!("floor: runtime: {e}"),
            }
        })?;
    }
    announce_until_stdin_closes(addr)
}

/// Tells the parent where a helper process listens (`listening ADDR` on stdout) and returns
/// when the parent closes its stdin (or it is killed): the process exit then closes every
/// connection from this side first, so TIME_WAIT stays here.
pub fn announce_until_stdin_closes(addr: SocketAddr) -> anyhow::Result<()> {
    println!("listening {addr}");
    std::io::stdout().flush()?;
    let mut line = String::new();
    while std::io::stdin().lock().read_line(&mut line)? > 0 {
        line.clear();
    }
    Ok(())
}

/// `n` listeners on the same port with `SO_REUSEPORT` (the first picks the port).
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::new();
    let mut addr = addr;
    for _ in 0..n.max(1) {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_port(true)?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
        s.listen(BACKLOG)?;
        s.set_nonblocking(true)?;
        let l: std::net::TcpListener = s.into();
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Accepts and echoes on one listener until the runtime stops; `tls` `None` serves plain
/// WebSocket (`--danger-plaintext`).
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    acks: bool,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("floor: listener: {e}");
            return;
        }
    };
    let acceptor = tls.map(TlsAcceptor::from);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("floor: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::task::spawn_local(async move {
            let _ = echo(acceptor, tcp, acks).await;
        });
    }
}

async fn echo(
    acceptor: Option<TlsAcceptor>,
    tcp: tokio::net::TcpStream,
    acks: bool,
) -> anyhow::Result<()> {
    match acceptor {
        Some(a) => {
            let ws = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                upgrade(a.accept(tcp).await?).await
            })
            .await
            .context("handshake timeout")??;
            echo_loop(ws, acks).await
        }
        None => {
            let ws = tokio::time::timeout(HANDSHAKE_TIMEOUT, upgrade(tcp))
                .await
                .context("handshake timeout")??;
            echo_loop(ws, acks).await
        }
    }
}

/// The WebSocket upgrade on `stream` (TLS or plain).
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
) -> anyhow::Result<WebSocketStream<S>> {
    Ok(tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        answer_hatch_v1,
        Some(crate::net::ws_config()),
    )
    .await?)
}

/// Echoes every DATA message until the peer closes; with `acks`, an acknowledgement of what
/// arrived rides with each echo, as the agent sends it.
async fn echo_loop<S: AsyncRead + AsyncWrite + Unpin>(
    mut ws: WebSocketStream<S>,
    acks: bool,
) -> anyhow::Result<()> {
    let mut received = 0u64;
    // No read deadline: the parent ends the process, which closes every connection.
    while let Some(msg) = ws.next().await {
        match msg? {
            Message::Binary(b) if b.first() == Some(&hatch_proto::channel::TYPE_DATA) => {
                received += b.len() as u64 - 1;
                if acks {
                    ws.feed(Message::Binary(b)).await?;
                    let ack = hatch_proto::channel::Message::Ack(received).to_vec();
                    ws.feed(Message::Binary(ack.into())).await?;
                    ws.flush().await?;
                } else {
                    ws.send(Message::Binary(b)).await?;
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}

/// Upgrade callback: answer `hatch.v1` when the client offers it, as the relay does.
// The signature is tungstenite's `Callback`; its error type is an HTTP response.
#[allow(clippy::result_large_err)]
fn answer_hatch_v1(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let offered = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|p| p.trim() == "hatch.v1")));
    if offered {
        resp.headers_mut()
            .insert("sec-websocket-protocol", http::HeaderValue::from_static("hatch.v1"));
    }
    Ok(resp)
}
