//! The real `hatch` binary against a hostile data plane: a relay that floods the client's leg
//! with pings and never reads costs the client bounded memory.

mod support;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

const INSTANCE: &str = "i-0123456789abcdef";
/// How long the relay floods.
const FLOOD: Duration = Duration::from_secs(5);
/// Growth of the client allowed meanwhile. Before its write buffer was bounded every pong was
/// queued: about 25 MiB a second.
const MAX_GROWTH_KIB: u64 = 16 * 1024;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_relay_that_floods_pings_and_never_reads_costs_the_client_bounded_memory() {
    // The data plane: TLS with the same development PKI as the API, one WebSocket leg.
    let ws_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ws_port = ws_listener.local_addr().unwrap().port();
    let api = TestApi::start(Arc::new(move |method, path| match (method, path) {
        ("POST", "/v1/sessions") => (
            201,
            json!({"session_id": "s-00000000000000aa",
                   "stream_url": format!("wss://127.0.0.1:{ws_port}/v1/stream/s-00000000000000aa?role=client"),
                   "token": "tok", "expires_at": "2030-01-01T00:00:00Z"}),
        ),
        _ => (404, json!({"code": "NotFound", "message": "no route"})),
    }));
    let pki = hatch_relay::certs::ensure_dev_pki(&api.dir.path().join("pki"), &[]).unwrap();
    let tls =
        hatch_relay::certs::server_config(&pki.cert_file, &pki.key_file, &[b"http/1.1"]).unwrap();

    let home = tempfile::tempdir().unwrap();
    let mut cmd = hatch(home.path());
    cmd.env("HATCH_API", &api.url).env("HATCH_ACCESS_KEY", "k").env("HATCH_CA", &api.ca_file);
    cmd.args(["exec", "--instance", INSTANCE, "--", "cat"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (pings, before, peak) = rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std({
            ws_listener.set_nonblocking(true).unwrap();
            ws_listener
        })
        .unwrap();
        let (tcp, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await.unwrap();
        #[allow(clippy::result_large_err)]
        let hatch_v1 = |_: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
            let v = hatch_proto::channel::SUBPROTOCOL.parse().unwrap();
            resp.headers_mut().insert("sec-websocket-protocol", v);
            Ok(resp)
        };
        let mut ws = tokio_tungstenite::accept_hdr_async(tls, hatch_v1).await.unwrap();
        let before = rss_kib(pid);
        let (mut pings, mut peak) = (0u64, before);
        let ping = Message::Ping(vec![0x5a; 125].into());
        let end = Instant::now() + FLOOD;
        while Instant::now() < end {
            peak = peak.max(rss_kib(pid));
            if peak.saturating_sub(before) > 8 * MAX_GROWTH_KIB {
                break; // far past the bound: the point is made, and the machine is shared
            }
            for _ in 0..64 {
                match tokio::time::timeout(Duration::from_millis(200), ws.send(ping.clone())).await
                {
                    Ok(Ok(())) => pings += 1,
                    // The client stopped reading: the send waits.
                    Err(_) => break,
                    Ok(Err(e)) => panic!("the client ended the leg during the flood: {e}"),
                }
            }
        }
        (pings, before, peak.max(rss_kib(pid)))
    });
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "{FLOOD:?} ping flood: {pings} pings sent; hatch VmRSS {before} KiB before, peak {peak} KiB"
    );
    assert!(before > 0, "no RSS read for the client");
    assert!(peak.saturating_sub(before) < MAX_GROWTH_KIB, "the client grew {} KiB", peak - before);
}
