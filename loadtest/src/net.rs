//! Dialing: TCP from a chosen 127.x source address, TLS with the run's CA (or none for `ws://`
//! and `http://` URLs when the run allows plaintext), the WebSocket upgrade with a bearer token,
//! and small HTTPS JSON requests to the API.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client connection: TLS over TCP, or plain TCP for a `ws://` / `http://` URL.
pub type Conn = MaybeTlsStream<TcpStream>;

/// A client-side WebSocket over TLS (or, `--danger-plaintext`, plain) TCP.
pub type Ws = WebSocketStream<Conn>;

/// Largest API response body read: 64 KiB (session and register answers are a few hundred
/// bytes; anything larger is a fault of the relay under test).
const MAX_API_BODY: usize = 64 * 1024;

/// WebSocket settings of every simulated peer and of the floor: a 4 KiB read buffer instead of
/// tungstenite's 128 KiB (which would cost 128 KiB × sessions of RAM per process), messages
/// written at once (keystrokes must not wait for a buffer to fill), and the relay's 1 MiB
/// frame limit.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        // Every send flushes; the buffer only lets an acknowledgement share a write with the
        // DATA it follows.
        .write_buffer_size(4096)
        .max_message_size(Some(2 << 20))
        .max_frame_size(Some(1 << 20))
}

/// The WebSocket settings of `hatch`'s data leg (`hatch_client::stream::connect`):
/// tungstenite's default buffers, [`hatch_client::stream::MAX_MESSAGE`] inbound, 1 MiB of
/// unsent bytes at most. Forward mode's clients dial with them, so that the pump runs over the
/// leg `hatch port-forward` has.
pub fn client_leg_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(hatch_client::stream::MAX_MESSAGE))
        .max_frame_size(Some(hatch_client::stream::MAX_MESSAGE))
        .max_write_buffer_size(1 << 20)
}

/// The WebSocket settings of `hatch-agent`'s data leg (`leg_config` in `agent/src/session.rs`):
/// read and write buffers of one DATA message and a frame header, four messages of unsent
/// bytes at most, 1 MiB inbound. Forward mode's agents dial with them.
pub fn agent_leg_config() -> WebSocketConfig {
    let one = hatch_agent::session::MAX_DATA + 64;
    WebSocketConfig::default()
        .read_buffer_size(one)
        .write_buffer_size(one)
        .max_write_buffer_size(4 * hatch_agent::session::MAX_DATA)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// A failure with the kind it is counted under in the report.
#[derive(Debug)]
pub struct Failure {
    /// Short kind for `errors_by_kind` (`connect`, `tls`, `ws_upgrade`, `api_<code>`, ...).
    pub kind: String,
    /// What happened.
    pub detail: String,
}

impl Failure {
    /// A failure of `kind`.
    pub fn new(kind: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Failure { kind: kind.into(), detail: detail.to_string() }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// Where connections come from, which CA they trust, and whether plaintext URLs are allowed.
#[derive(Clone)]
pub struct Dialer {
    /// The configuration `tls` was made from (for [`Dialer::own_process`]).
    cfg: Arc<rustls::ClientConfig>,
    tls: TlsConnector,
    /// Source addresses used in turn; empty means let the kernel choose.
    sources: Arc<Vec<Ipv4Addr>>,
    /// `ws://` and `http://` URLs are dialed without TLS (`--danger-plaintext`); otherwise
    /// they fail as `plaintext_refused`, as a real agent refuses them without
    /// `--danger-allow-plaintext`.
    danger_plaintext: bool,
    /// Connections made, by `<scheme>_<full|resumed|plain>` (see [`Dialer::connections`]).
    counts: Rc<RefCell<crate::report::Errors>>,
}

impl Dialer {
    /// A dialer trusting `tls`'s roots and binding to `sources` in turn. Every connection it
    /// makes shares `tls`, and with it rustls's in-memory resumption store, as one real client
    /// or agent process does.
    pub fn new(tls: Arc<rustls::ClientConfig>, sources: Vec<Ipv4Addr>) -> Self {
        Dialer {
            cfg: tls.clone(),
            tls: TlsConnector::from(tls),
            sources: Arc::new(sources),
            danger_plaintext: false,
            counts: Rc::default(),
        }
    }

    /// The same dialer with a resumption store of its own, as a separate client process has:
    /// TLS sessions its connections get are resumed only by its own later connections. Counts
    /// stay shared with this dialer.
    pub fn own_process(&self) -> Self {
        let mut cfg = (*self.cfg).clone();
        // rustls keeps up to 8 TLS 1.3 tickets per server; one server here.
        cfg.resumption = rustls::client::Resumption::in_memory_sessions(8);
        let cfg = Arc::new(cfg);
        Dialer { cfg: cfg.clone(), tls: TlsConnector::from(cfg), ..self.clone() }
    }

    /// Connections this dialer (and its clones) made, by scheme and how TLS was set up:
    /// `https_full`, `https_resumed`, `wss_full`, `wss_resumed`, `ws_plain`, `http_plain`. A
    /// resumed handshake is one where rustls took a session from the dialer's resumption store
    /// and the server accepted it: no certificate sent, signed or verified.
    pub fn connections(&self) -> crate::report::Errors {
        self.counts.borrow().clone()
    }

    fn count(&self, scheme: &str, how: &str) {
        *self.counts.borrow_mut().entry(format!("{scheme}_{how}")).or_default() += 1;
    }

    /// The same dialer, allowing `ws://` and `http://` URLs when `allow` is set.
    pub fn danger_plaintext(mut self, allow: bool) -> Self {
        self.danger_plaintext = allow;
        self
    }

    /// TCP to `uri`'s host and port, then TLS unless the scheme is `ws` or `http` (allowed
    /// only with `--danger-plaintext`); `n` picks the source address.
    pub async fn connect(&self, uri: &Uri, n: usize) -> Result<Conn, Failure> {
        let scheme = uri.scheme_str().unwrap_or_default();
        let plain = match uri.scheme_str() {
            Some("wss" | "https") => false,
            Some("ws" | "http") if self.danger_plaintext => true,
            Some(s @ ("ws" | "http")) => {
                return Err(Failure::new(
                    "plaintext_refused",
                    format!("a {s}:// URL without --danger-plaintext"),
                ));
            }
            s => return Err(Failure::new("bad_url", format!("scheme {s:?}"))),
        };
        let host = uri.host().ok_or_else(|| Failure::new("bad_url", "no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(if plain { 80 } else { 443 });
        let ip: IpAddr = match host {
            "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            h => h.parse().map_err(|_| Failure::new("bad_url", format!("host {h} not an IP")))?,
        };
        let addr = SocketAddr::new(ip, port);
        let sock = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
            .map_err(|e| Failure::new("socket", e))?;
        if addr.is_ipv4() && !self.sources.is_empty() {
            let src = self.sources[n % self.sources.len()];
            // Without IP_BIND_ADDRESS_NO_PORT a bind picks the port before the destination is
            // known, and the ephemeral range runs out near 47k connections from one address.
            nix::sys::socket::setsockopt(
                &sock,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )
            .map_err(|e| Failure::new("socket", e))?;
            sock.bind(SocketAddr::new(IpAddr::V4(src), 0)).map_err(|e| Failure::new("bind", e))?;
        }
        let tcp = sock.connect(addr).await.map_err(|e| Failure::new("connect", e))?;
        let _ = tcp.set_nodelay(true);
        if plain {
            self.count(scheme, "plain");
            return Ok(MaybeTlsStream::Plain(tcp));
        }
        let name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| Failure::new("bad_url", e))?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| Failure::new("tls", e))?;
        let how = match tls.get_ref().1.handshake_kind() {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            _ => "full",
        };
        self.count(scheme, how);
        Ok(MaybeTlsStream::Rustls(tls))
    }

    /// Dials a `wss://` (or allowed `ws://`) data URL, offering `hatch.v1`, with
    /// `Authorization: Bearer <token>`.
    pub async fn ws(&self, url: &str, token: Option<&str>, n: usize) -> Result<Ws, Failure> {
        self.ws_with(url, token, n, true).await
    }

    /// Dials a `wss://` URL with a bearer token, offering `hatch.v1` when `hatch_v1` is set
    /// (data legs; the agent control channel has no subprotocol).
    pub async fn ws_with(
        &self,
        url: &str,
        token: Option<&str>,
        n: usize,
        hatch_v1: bool,
    ) -> Result<Ws, Failure> {
        self.ws_configured(url, token, n, hatch_v1, ws_config()).await
    }

    /// [`Dialer::ws_with`] with these WebSocket settings.
    pub async fn ws_configured(
        &self,
        url: &str,
        token: Option<&str>,
        n: usize,
        hatch_v1: bool,
        config: WebSocketConfig,
    ) -> Result<Ws, Failure> {
        let mut req = url.into_client_request().map_err(|e| Failure::new("bad_url", e))?;
        if hatch_v1 {
            req.headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("hatch.v1"));
        }
        if let Some(t) = token {
            let v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|e| Failure::new("bad_token", e))?;
            req.headers_mut().insert(http::header::AUTHORIZATION, v);
        }
        let uri = req.uri().clone();
        let conn = self.connect(&uri, n).await?;
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(req, conn, Some(config))
            .await
            .map_err(|e| {
                use tokio_tungstenite::tungstenite::Error;
                match e {
                    Error::Http(resp) => Failure::new(
                        format!("ws_upgrade_{}", resp.status().as_u16()),
                        String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()),
                    ),
                    e => Failure::new("ws_upgrade", e),
                }
            })?;
        Ok(ws)
    }

    /// POSTs `body` as JSON to `url` with a bearer key over a fresh connection and returns the
    /// status and body. Fails with `timeout` after `deadline`.
    pub async fn post_json(
        &self,
        url: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
        deadline: Duration,
        n: usize,
    ) -> Result<(StatusCode, Bytes), Failure> {
        tokio::time::timeout(deadline, self.post_inner(url, bearer, body, n))
            .await
            .map_err(|_| Failure::new("api_timeout", format!("POST {url}")))?
    }

    async fn post_inner(
        &self,
        url: &str,
        bearer: Option<&str>,
        body: Vec<u8>,
        n: usize,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let uri: Uri = url.parse().map_err(|e| Failure::new("bad_url", e))?;
        let stream = self.connect(&uri, n).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failure::new("api_http", e))?;
        tokio::task::spawn_local(async move {
            let _ = conn.await;
        });
        let host = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let mut req = Request::post(uri.path())
            .header(http::header::HOST, host)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(b) = bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {b}"));
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(|e| Failure::new("bad_url", e))?;
        let resp = send.send_request(req).await.map_err(|e| Failure::new("api_http", e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_API_BODY)
            .collect()
            .await
            .map_err(|e| Failure::new("api_body", e))?
            .to_bytes();
        Ok((status, body))
    }
}

/// `kind` for an API error answer: `api_<code>` from its JSON body, else `api_<status>`.
pub fn api_error(status: StatusCode, body: &[u8]) -> Failure {
    match serde_json::from_slice::<hatch_proto::api::ErrorBody>(body) {
        Ok(e) => Failure::new(format!("api_{}", e.code), format!("{status}: {}", e.message)),
        Err(_) => Failure::new(
            format!("api_{}", status.as_u16()),
            String::from_utf8_lossy(&body[..body.len().min(200)]),
        ),
    }
}

/// The 127.x source addresses for `connections` client connections: one per 16,000, so that
/// no address comes near the ephemeral port range (28k ports by default).
pub fn source_addresses(connections: usize) -> Vec<Ipv4Addr> {
    let n = connections.div_ceil(16_000).clamp(1, 250);
    if n == 1 {
        return Vec::new();
    }
    (0..n).map(|i| Ipv4Addr::new(127, 0, 0, 1 + i as u8)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_spread_past_sixteen_thousand() {
        assert!(source_addresses(1000).is_empty());
        let s = source_addresses(40_000);
        assert_eq!(
            s,
            vec![
                Ipv4Addr::new(127, 0, 0, 1),
                Ipv4Addr::new(127, 0, 0, 2),
                Ipv4Addr::new(127, 0, 0, 3)
            ]
        );
    }

    #[test]
    fn api_error_kind_names_the_code() {
        let f = api_error(StatusCode::CONFLICT, br#"{"code":"TargetNotConnected","message":"x"}"#);
        assert_eq!(f.kind, "api_TargetNotConnected");
        assert_eq!(api_error(StatusCode::BAD_GATEWAY, b"<html>").kind, "api_502");
    }
}
