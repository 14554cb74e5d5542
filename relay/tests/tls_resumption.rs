//! TLS session resumption across the relay's two listeners: the API and the data plane serve
//! one rustls configuration with a stateless ticketer, so a client that called the API (a
//! `hatch` client before its data leg) or an agent holding a ticket from its control channel
//! resumes on the data plane: no certificate sent, signed or verified on that leg.
//!
//! Real listeners of a development relay, real rustls clients on loopback; what is asserted is
//! what the client sees (`handshake_kind()`).

use std::sync::Arc;

use hatch_relay::dev::{DevOptions, DevRelay};
use rustls::HandshakeKind;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

fn relay(dir: &tempfile::TempDir) -> DevRelay {
    DevRelay::start(DevOptions {
        data_dir: dir.path().join("d"),
        data_args: vec!["--shards".into(), "2".into()],
        ..Default::default()
    })
    .unwrap()
}

/// A client configuration trusting the relay's CA, with its own in-memory resumption store (one
/// per client process, as `hatch` and `hatch-agent` have).
fn client_config(relay: &DevRelay) -> Arc<rustls::ClientConfig> {
    hatch_relay::certs::client_config_with_ca(std::path::Path::new(&relay.info.ca_file)).unwrap()
}

/// TLS to `addr`; returns how the handshake went and the stream.
async fn handshake(
    cfg: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> (HandshakeKind, tokio_rustls::client::TlsStream<TcpStream>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = TlsConnector::from(cfg.clone()).connect(name, tcp).await.unwrap();
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    (kind, tls)
}

/// `GET /healthz` on a fresh API connection, read to the end (so the session tickets the relay
/// sends after its handshake are in the client's store); returns how the handshake went.
async fn api_call(cfg: &Arc<rustls::ClientConfig>, relay: &DevRelay) -> HandshakeKind {
    let (kind, mut tls) = handshake(cfg, relay.server().api_addr()).await;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    kind
}

#[tokio::test]
async fn data_leg_resumes_the_tls_session_of_the_api_call() {
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&dir);
    let cfg = client_config(&relay);
    assert_eq!(api_call(&cfg, &relay).await, HandshakeKind::Full);
    let (kind, _leg) = handshake(&cfg, relay.server().data_addr()).await;
    assert_eq!(kind, HandshakeKind::Resumed, "the data leg after an API call");
    // A client that never called the API has nothing to resume.
    let (kind, _leg) = handshake(&client_config(&relay), relay.server().data_addr()).await;
    assert_eq!(kind, HandshakeKind::Full);
}

#[tokio::test]
async fn a_ticket_outlives_many_other_clients_handshakes() {
    // An agent's ticket dates from its previous leg or its control channel, possibly hours and
    // many thousands of other handshakes ago. rustls's default server-side session cache holds
    // 256 entries and every handshake adds two, so there it would be gone after about 128
    // handshakes; a stateless ticket does not depend on what other clients did.
    let dir = tempfile::tempdir().unwrap();
    let relay = relay(&dir);
    let agent = client_config(&relay);
    api_call(&agent, &relay).await;
    for _ in 0..200 {
        // Each a separate client (own store), all on the data plane, read until the tickets.
        let (_, _leg) = handshake(&client_config(&relay), relay.server().data_addr()).await;
    }
    let (kind, _leg) = handshake(&agent, relay.server().data_addr()).await;
    assert_eq!(kind, HandshakeKind::Resumed, "a leg after 200 other clients' handshakes");
    // And the leg's own fresh tickets let the next leg resume too.
    let (kind, _leg2) = handshake(&agent, relay.server().data_addr()).await;
    assert_eq!(kind, HandshakeKind::Resumed);
}

#[test]
fn dev_relay_with_danger_plaintext_serves_ws_data_and_keeps_tls_on_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let relay = DevRelay::start(DevOptions {
        data_dir: dir.path().join("d"),
        data_args: vec!["--danger-plaintext".into()],
        ..Default::default()
    })
    .unwrap();
    let port = relay.server().data_addr().port();
    assert_eq!(relay.info.data_url, format!("ws://127.0.0.1:{port}"));
    assert!(relay.info.api_url.starts_with("https://"), "{}", relay.info.api_url);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // The API still answers over TLS only.
        let cfg = client_config(&relay);
        assert_eq!(api_call(&cfg, &relay).await, HandshakeKind::Full);
        // The data plane answers a plain HTTP upgrade request (401: no token) without TLS.
        let mut tcp = TcpStream::connect(relay.server().data_addr()).await.unwrap();
        tcp.write_all(
            b"GET /v1/stream/s-0123456789abcdef?role=client HTTP/1.1\r\nhost: x\r\n\
              upgrade: websocket\r\nconnection: upgrade\r\nsec-websocket-version: 13\r\n\
              sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = vec![0u8; 12];
        tcp.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 401", "{:?}", String::from_utf8_lossy(&head));
    });
}
