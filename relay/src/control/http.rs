//! Serving the API router over TLS: accept (at most `--max-api-connections` at once), TLS
//! handshake (with a deadline), every request head read and checked here, then HTTP/1.1 with
//! upgrades (the agent control channel) by hyper, with the peer address handed to handlers as
//! `ConnectInfo<SocketAddr>` (policy key `hatch:SourceIp`).
//!
//! ```text
//!  accept ─ slot? ─no─▶ reset (counted, logged at most every 10 s)
//!    │yes
//!  TLS handshake (10 s) ─▶ loop: read a head (10 s) ─ check_head ─refused─▶ JSON error, close
//!                                  │ ok
//!                                  ▼
//!                      hyper sees exactly that request (head + Content-Length body), then EOF;
//!                      an upgrade request: the stream is hyper's (and the WebSocket's) after 101
//! ```
//!
//! Why the heads are read here: hyper answers the heads it cannot parse (duplicate
//! Content-Length, too many header fields, a malformed line) itself, with an empty body, before
//! any handler runs. [`check_head`] refuses everything hyper would refuse, and more (any
//! `Transfer-Encoding`, more than one `Content-Length`, a body over the API's limit), with the
//! `{code, message, request_id}` body every other API error has, so hyper only ever parses heads
//! it accepts. Each request gets its own hyper connection over the same stream, which ends after
//! that request: the connection loop, not hyper, decides what the next bytes are.
//!
//! The certificate can be swapped at run time ([`TlsSlot::replace`], on SIGHUP): connections
//! accepted afterwards use the new one; live ones keep theirs.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::{Buf, BytesMut};
use hatch_proto::api::codes;
use http::StatusCode;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use super::{Shared, credentials};

/// TLS handshake, and then each request head, must complete within this (slowloris bound); also
/// how long a kept-alive connection may sit idle between requests.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After an accept error (e.g. out of file descriptors), wait this long before the next accept
/// so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Largest request head (request line and header fields), in bytes. The API's heads are a few
/// hundred bytes (the longest header is `Authorization` with a 70-byte key); 16 KiB is what
/// common proxies allow per header line.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields in a request head: hyper's own default, which it is also set to.
pub const MAX_HEADERS: usize = 100;
/// Refusals of connections over the limit are logged at most once per this (with a count), so a
/// flood costs one line per interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After a refusal the relay reads and discards what the peer still sends, for at most this
/// long and [`DRAIN_BYTES`], so that closing with unread input (which makes the kernel send a
/// reset) does not destroy the answer before the peer has read it.
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// See [`DRAIN_TIME`].
const DRAIN_BYTES: usize = 1 << 20;
/// Bytes read from a connection at a time.
const READ_CHUNK: usize = 8 * 1024;

/// The current server certificate, or none for plaintext (`--danger-plaintext`).
#[derive(Clone)]
pub struct TlsSlot(Option<Arc<RwLock<Arc<rustls::ServerConfig>>>>);

impl TlsSlot {
    /// Serve TLS with `cfg`.
    pub fn tls(cfg: Arc<rustls::ServerConfig>) -> Self {
        TlsSlot(Some(Arc::new(RwLock::new(cfg))))
    }

    /// Serve plaintext HTTP (benchmarks on loopback only).
    pub fn danger_plaintext() -> Self {
        TlsSlot(None)
    }

    /// Replaces the certificate for new connections.
    pub fn replace(&self, cfg: Arc<rustls::ServerConfig>) {
        if let Some(slot) = &self.0 {
            *slot.write().unwrap_or_else(|p| p.into_inner()) = cfg;
        }
    }

    fn current(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.0.as_ref().map(|s| s.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, holding at most
/// `max_api_connections` connections. Live connections are dropped with the runtime.
pub(crate) async fn serve(
    listener: TcpListener,
    tls: TlsSlot,
    router: Router,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let max = shared.cfg.max_api_connections;
    let slots = Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)));
    let mut refusals = RefusalLog::default();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(err = %e, "api accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.metrics.api_connection_refused();
            // A reset, not a FIN: the peer learns at once (no TLS handshake to wait through),
            // and the relay keeps no TIME_WAIT for it.
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            drop(tcp);
            if let Some(refused) = refusals.note(Instant::now()) {
                warn!(
                    %peer, limit = max, refused,
                    "api connection limit reached (--max-api-connections); connections reset"
                );
            }
            continue;
        };
        let slot = Slot::new(permit, shared.clone());
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let tls = tls.current();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            match tls {
                Some(cfg) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                debug!(%peer, err = %e, "api tls handshake failed");
                                return;
                            }
                            Err(_) => {
                                debug!(%peer, "api tls handshake timed out");
                                return;
                            }
                        };
                    requests(stream, peer, router, shared, slot, HANDSHAKE_TIMEOUT, shutdown).await;
                }
                None => {
                    requests(tcp, peer, router, shared, slot, HANDSHAKE_TIMEOUT, shutdown).await
                }
            }
        });
    }
}

/// Counts the connections refused since the last log line; says when to log the next one.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    since_last: u64,
}

impl RefusalLog {
    /// Notes one refusal at `now`; `Some(count since the last line)` when a line is due.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.since_last += 1;
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < REFUSAL_LOG_INTERVAL) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_last))
    }
}

/// One of the `--max-api-connections` slots, held for as long as the connection's socket lives
/// (an agent's control channel keeps it after the upgrade).
struct Slot {
    _permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, shared: Arc<Shared>) -> Self {
        shared.metrics.api_connection(true);
        Slot { _permit: permit, shared }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.metrics.api_connection(false);
    }
}

/// The requests of one connection, one at a time, each head checked before hyper gets it and
/// each to arrive within `head_timeout`.
async fn requests<S>(
    io: S,
    peer: SocketAddr,
    router: Router,
    shared: Arc<Shared>,
    slot: Slot,
    head_timeout: Duration,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Conn { io, buf: BytesMut::new() };
    let mut slot = Some(slot);
    let max_body = u64::try_from(shared.cfg.max_body_bytes).unwrap_or(u64::MAX);
    loop {
        let read = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(head_timeout, conn.read_head(max_body)) => r,
        };
        let head = match read {
            Err(_) if conn.buf.iter().all(|b| b.is_ascii_whitespace()) => {
                debug!(%peer, "api connection idle; closed");
                break;
            }
            Err(_) => {
                let r = Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request head not received within {} s", head_timeout.as_secs_f64()),
                );
                refuse(conn, peer, &shared, r).await;
                return;
            }
            Ok(Err(e)) => {
                debug!(%peer, err = %e, "api connection read failed");
                return;
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(Err(r)))) => {
                refuse(conn, peer, &shared, r).await;
                return;
            }
            Ok(Ok(Some(Ok(head)))) => head,
        };
        let svc = hyper::service::service_fn({
            let router = router.clone();
            move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(req)
            }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        // The request ends at its body (EOF from `OneRequest`): half-close keeps hyper from
        // taking that EOF for a peer that went away while its answer is being made.
        http.half_close(true).max_headers(MAX_HEADERS).header_read_timeout(None);
        if head.upgrade {
            // The stream is hyper's from here: after a 101 it belongs to the WebSocket, and
            // after any other answer the connection ends.
            let io = UpgradeIo::new(conn, head.len, slot.take());
            let res = tokio::select! {
                r = http.serve_connection(TokioIo::new(io), svc).with_upgrades() => r,
                _ = shutdown.cancelled() => Ok(()),
            };
            if let Err(e) = res {
                debug!(%peer, err = %e, "api connection ended with an error");
            }
            return;
        }
        let mut one = OneRequest { conn: &mut conn, left: head.len as u64 + head.body_len };
        let res = tokio::select! {
            r = http.serve_connection(TokioIo::new(&mut one), svc) => r,
            _ = shutdown.cancelled() => return,
        };
        if let Err(e) = res {
            debug!(%peer, err = %e, "api connection ended with an error");
            return;
        }
        // A body the handler did not read is still on the stream: the connection cannot go on.
        if one.left > 0 || !head.keep_alive {
            break;
        }
    }
    // TLS close_notify and FIN; a peer that does not read them does not hold the task.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.io.shutdown()).await;
}

/// Answers a refused head with the JSON error and closes the connection.
async fn refuse<S>(mut conn: Conn<S>, peer: SocketAddr, shared: &Shared, r: Refusal)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rid = format!("req-{}", hex::encode(credentials::random_bytes::<8>()));
    info!(%peer, status = r.status.as_u16(), request_id = %rid, reason = %r.message,
        "api request head refused");
    shared.metrics.request(r.status.as_u16(), r.code);
    let bytes = r.response(&rid);
    let sent = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        conn.io.write_all(&bytes).await?;
        conn.io.shutdown().await
    })
    .await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    // Lingering close: read what is still coming so that the close sends no reset that would
    // destroy the answer in the peer's receive buffer.
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut scratch = vec![0u8; READ_CHUNK];
        let mut drained = conn.buf.len();
        while drained < DRAIN_BYTES {
            match conn.io.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// A refused request head: the status and the message of the JSON answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// The error code (always `InvalidRequest`: the request is the caller's fault).
    pub code: &'static str,
    /// What was wrong, for a person.
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal { status, code: codes::INVALID_REQUEST, message: message.into() }
    }

    /// The whole HTTP/1.1 answer: the JSON error, `connection: close`.
    fn response(&self, request_id: &str) -> Vec<u8> {
        let body = serde_json::json!({
            "code": self.code,
            "message": self.message,
            "request_id": request_id,
        })
        .to_string();
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\nx-request-id: {request_id}\r\n\r\n{body}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes()
    }
}

/// An accepted request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head (leading empty lines included).
    pub len: usize,
    /// Bytes of the body (`Content-Length`, 0 without).
    pub body_len: u64,
    /// An HTTP/1.1 request with `Upgrade` (a WebSocket).
    pub upgrade: bool,
    /// Whether another request may follow on the connection.
    pub keep_alive: bool,
}

/// What [`check_head`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The head is not complete yet (and not too large so far).
    Partial,
    /// A head hyper will accept as it is.
    Accepted(Head),
    /// A head to answer with this error.
    Refused(Refusal),
}

fn refused(status: StatusCode, message: impl Into<String>) -> Check {
    Check::Refused(Refusal::new(status, message))
}

/// Checks the request head at the start of `buf` (which may hold more bytes after it): refuses
/// whatever hyper would refuse by itself, any `Transfer-Encoding` (bodies come with
/// `Content-Length`: one framing, no smuggling), more than one `Content-Length`, a body larger
/// than `max_body`, `CONNECT`, and an upgrade request with a body.
pub fn check_head(buf: &[u8], max_body: u64) -> Check {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let too_large = || {
        refused(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request head larger than {} KiB", MAX_HEAD_BYTES / 1024),
        )
    };
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD_BYTES => return too_large(),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => return too_large(),
        Ok(httparse::Status::Partial) => return Check::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return refused(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} header fields"),
            );
        }
        Err(httparse::Error::Version) => {
            return refused(
                StatusCode::BAD_REQUEST,
                "malformed request line: HTTP/1.1 or HTTP/1.0 expected",
            );
        }
        Err(httparse::Error::Token) => {
            return refused(StatusCode::BAD_REQUEST, "malformed request line");
        }
        Err(e) => return refused(StatusCode::BAD_REQUEST, format!("malformed request head: {e}")),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return refused(StatusCode::BAD_REQUEST, "malformed request line");
    };
    match http::Method::from_bytes(method.as_bytes()) {
        Ok(http::Method::CONNECT) => {
            return refused(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not served");
        }
        Ok(_) => {}
        Err(_) => return refused(StatusCode::BAD_REQUEST, "malformed request method"),
    }
    if http::Uri::try_from(target).is_err() {
        return refused(StatusCode::BAD_REQUEST, "malformed request target");
    }
    let mut body_len = None;
    let mut upgrade = false;
    let (mut close, mut keep) = (false, false);
    for h in req.headers.iter() {
        let name = h.name;
        if http::HeaderName::from_bytes(name.as_bytes()).is_err()
            || http::HeaderValue::from_bytes(h.value).is_err()
        {
            let name = hatch_proto::logtext::peer(name, 40);
            return refused(StatusCode::BAD_REQUEST, format!("malformed header field {name}"));
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return refused(
                StatusCode::LENGTH_REQUIRED,
                "Transfer-Encoding is not accepted: send the body with Content-Length",
            );
        } else if name.eq_ignore_ascii_case("content-length") {
            if body_len.is_some() {
                return refused(StatusCode::BAD_REQUEST, "more than one Content-Length");
            }
            // Digits only (no sign, space or list), as hyper reads it; 19 always fit a u64.
            let n = match h.value {
                v if (1..=19).contains(&v.len()) && v.iter().all(u8::is_ascii_digit) => {
                    v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'))
                }
                _ => return refused(StatusCode::BAD_REQUEST, "Content-Length is not a number"),
            };
            if n > max_body {
                return refused(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body of {n} bytes is larger than {max_body} bytes"),
                );
            }
            body_len = Some(n);
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let body_len = body_len.unwrap_or(0);
    // hyper upgrades HTTP/1.1 only; an Upgrade header on HTTP/1.0 is an ordinary request.
    let upgrade = upgrade && version == 1;
    if upgrade && body_len > 0 {
        return refused(StatusCode::BAD_REQUEST, "an upgrade request has no body");
    }
    let keep_alive = !close && (version == 1 || keep);
    Check::Accepted(Head { len, body_len, upgrade, keep_alive })
}

/// A connection's stream and the bytes read from it that no request has taken yet.
struct Conn<S> {
    io: S,
    buf: BytesMut,
}

impl<S: AsyncRead + Unpin> Conn<S> {
    /// Reads until a whole head is buffered: `None` at EOF before one began.
    async fn read_head(&mut self, max_body: u64) -> io::Result<Option<Result<Head, Refusal>>> {
        loop {
            if !self.buf.is_empty() {
                match check_head(&self.buf, max_body) {
                    Check::Accepted(h) => return Ok(Some(Ok(h))),
                    Check::Refused(r) => return Ok(Some(Err(r))),
                    Check::Partial => {}
                }
            }
            self.buf.reserve(READ_CHUNK);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                // The peer stopped sending; half a head is not answered.
                return Ok(None);
            }
        }
    }

    /// Puts at most `max` bytes into `out`: buffered ones first, else one read's worth. Nothing
    /// put (`max` 0, or EOF) reads as EOF.
    fn poll_give(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
        max: u64,
    ) -> Poll<io::Result<()>> {
        if max == 0 || out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if self.buf.is_empty() {
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            self.buf.extend_from_slice(rb.filled());
        }
        let n = self.buf.len().min(out.remaining()).min(usize::try_from(max).unwrap_or(usize::MAX));
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// What hyper reads for one request: its head and body, then EOF. Writes go to the stream;
/// hyper's shutdown only flushes (the connection may carry more requests).
struct OneRequest<'a, S> {
    conn: &'a mut Conn<S>,
    /// Bytes of the request not yet given to hyper.
    left: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for OneRequest<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = out.filled().len();
        ready!(this.conn.poll_give(cx, out, this.left))?;
        this.left -= (out.filled().len() - before) as u64;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OneRequest<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().conn.io).poll_write(cx, b)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn.io).poll_flush(cx)
    }
}

/// Where an upgrade request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// The answer's status line has not been written yet: nothing after the head is read.
    Waiting,
    /// 101: the stream carries the new protocol, read and written straight through.
    Switched,
    /// Any other answer: the connection ends after it (EOF for hyper).
    Refused,
}

/// The status line prefix of a successful upgrade.
const SWITCHING: &[u8; 12] = b"HTTP/1.1 101";

/// What hyper reads and writes for an upgrade request: the head, then, once hyper's answer shows
/// 101, everything the peer sends; after any other answer, EOF. It owns the stream (and the
/// connection's slot), which goes with it into the WebSocket.
struct UpgradeIo<S> {
    conn: Conn<S>,
    head_left: usize,
    state: Upgrade,
    status: [u8; 12],
    status_len: usize,
    reader: Option<Waker>,
    _slot: Option<Slot>,
}

impl<S> UpgradeIo<S> {
    fn new(conn: Conn<S>, head_len: usize, slot: Option<Slot>) -> Self {
        UpgradeIo {
            conn,
            head_left: head_len,
            state: Upgrade::Waiting,
            status: [0; 12],
            status_len: 0,
            reader: None,
            _slot: slot,
        }
    }

    /// Notes bytes hyper wrote; decides the state once the status line's start is known.
    fn saw_written(&mut self, b: &[u8]) {
        if self.state != Upgrade::Waiting {
            return;
        }
        let n = b.len().min(self.status.len() - self.status_len);
        self.status[self.status_len..self.status_len + n].copy_from_slice(&b[..n]);
        self.status_len += n;
        if self.status_len == self.status.len() {
            self.state =
                if &self.status == SWITCHING { Upgrade::Switched } else { Upgrade::Refused };
            if let Some(w) = self.reader.take() {
                w.wake();
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for UpgradeIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.head_left > 0 {
            let before = out.filled().len();
            ready!(this.conn.poll_give(cx, out, this.head_left as u64))?;
            this.head_left -= out.filled().len() - before;
            return Poll::Ready(Ok(()));
        }
        match this.state {
            Upgrade::Waiting => {
                this.reader = Some(cx.waker().clone());
                Poll::Pending
            }
            Upgrade::Refused => Poll::Ready(Ok(())),
            Upgrade::Switched if !this.conn.buf.is_empty() => {
                this.conn.poll_give(cx, out, u64::MAX)
            }
            Upgrade::Switched => Pin::new(&mut this.conn.io).poll_read(cx, out),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for UpgradeIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.conn.io).poll_write(cx, b))?;
        this.saw_written(&b[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: u64 = 64 * 1024;
    const HEAD_TIMEOUT: Duration = Duration::from_millis(100);

    fn status(c: &Check) -> Option<u16> {
        match c {
            Check::Refused(r) => Some(r.status.as_u16()),
            _ => None,
        }
    }

    /// Heads as a hostile or broken client sends them: each refused with its status, or taken
    /// with the framing hyper will read.
    #[test]
    fn heads_are_refused_with_a_status_or_accepted_with_their_framing() {
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            (0..2000).map(|i| format!("x-h{i}: v\r\n")).collect::<String>()
        );
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        let just_fits = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            (0..MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect::<String>()
        );
        let cases: Vec<(&str, String, Option<u16>)> = vec![
            (
                "two different Content-Lengths",
                "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".into(),
                Some(400),
            ),
            (
                "two equal Content-Lengths",
                "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab".into(),
                Some(400),
            ),
            (
                "a Content-Length list",
                "POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nab".into(),
                Some(400),
            ),
            (
                "a signed Content-Length",
                "POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\nab".into(),
                Some(400),
            ),
            (
                "an empty Content-Length",
                "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n".into(),
                Some(400),
            ),
            (
                "a 20-digit Content-Length",
                "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n".into(),
                Some(400),
            ),
            (
                "a body over the limit",
                format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", LIMIT + 1),
                Some(413),
            ),
            (
                "chunked",
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(),
                Some(411),
            ),
            (
                "chunked and a length",
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
                Some(411),
            ),
            ("2,000 header fields", many, Some(431)),
            ("a head over 16 KiB", long, Some(431)),
            ("no version", "GET /\r\n\r\n".into(), Some(400)),
            ("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(), Some(400)),
            ("HTTP/1.2", "GET / HTTP/1.2\r\n\r\n".into(), Some(400)),
            ("space in a header name", "GET / HTTP/1.1\r\nBad Name: v\r\n\r\n".into(), Some(400)),
            ("a header without colon", "GET / HTTP/1.1\r\nnocolon\r\n\r\n".into(), Some(400)),
            ("a control byte in a value", "GET / HTTP/1.1\r\nx: a\x01b\r\n\r\n".into(), Some(400)),
            ("a bad method", "G(T / HTTP/1.1\r\n\r\n".into(), Some(400)),
            ("a bad target", "GET /a\x7fb HTTP/1.1\r\n\r\n".into(), Some(400)),
            ("CONNECT", "CONNECT a:443 HTTP/1.1\r\n\r\n".into(), Some(405)),
            (
                "an upgrade with a body",
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nContent-Length: 1\r\n\r\nx".into(),
                Some(400),
            ),
            ("garbage", "\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03\x03".into(), Some(400)),
            ("100 header fields", just_fits, None),
        ];
        for (name, head, want) in cases {
            assert_eq!(status(&check_head(head.as_bytes(), LIMIT)), want, "{name}");
            if let Check::Refused(r) = check_head(head.as_bytes(), LIMIT) {
                assert_eq!(r.code, "InvalidRequest", "{name}");
                assert!(!r.message.is_empty(), "{name}");
            }
        }
    }

    #[test]
    fn accepted_heads_carry_their_framing() {
        let get = "GET /v1/instances HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
        assert_eq!(
            check_head(get.as_bytes(), LIMIT),
            Check::Accepted(Head {
                len: get.len() - 4,
                body_len: 0,
                upgrade: false,
                keep_alive: true
            })
        );
        let post = "\r\nPOST /v1/sessions HTTP/1.1\r\ncontent-length: 12\r\n\r\n{\"a\":1}";
        assert_eq!(
            check_head(post.as_bytes(), LIMIT),
            Check::Accepted(Head {
                len: post.len() - 7,
                body_len: 12,
                upgrade: false,
                keep_alive: true
            })
        );
        let close = "GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n";
        assert!(matches!(check_head(close.as_bytes(), LIMIT), Check::Accepted(h) if !h.keep_alive));
        let old = "GET / HTTP/1.0\r\n\r\n";
        assert!(matches!(check_head(old.as_bytes(), LIMIT), Check::Accepted(h) if !h.keep_alive));
        let old_keep = "GET / HTTP/1.0\r\nConnection: keep-alive\r\nUpgrade: x\r\n\r\n";
        assert!(matches!(
            check_head(old_keep.as_bytes(), LIMIT),
            Check::Accepted(h) if h.keep_alive && !h.upgrade
        ));
        let ws =
            "GET /v1/agent/connect HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        assert!(matches!(check_head(ws.as_bytes(), LIMIT), Check::Accepted(h) if h.upgrade));
        let at_limit = format!("POST / HTTP/1.1\r\nContent-Length: {LIMIT}\r\n\r\n");
        assert!(matches!(check_head(at_limit.as_bytes(), LIMIT), Check::Accepted(_)));
        // Incomplete heads wait for more, byte by byte, and are never refused for it.
        for i in 0..get.len() - 4 {
            assert_eq!(check_head(&get.as_bytes()[..i], LIMIT), Check::Partial, "{i}");
        }
    }

    /// Any bytes are accepted, refused or wait for more; never a panic.
    #[test]
    fn check_head_never_panics() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..512))| {
            let _ = check_head(&bytes, LIMIT);
        });
        proptest!(|(tail in "[ -~\r\n]{0,300}")| {
            let _ = check_head(format!("POST / HTTP/1.1\r\n{tail}").as_bytes(), LIMIT);
        });
    }

    #[test]
    fn refusal_answer_is_json_with_its_length() {
        let r = Refusal::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "more than 100 header fields",
        );
        let text = String::from_utf8(r.response("req-0011223344556677")).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())), "{head}");
        assert!(head.contains("x-request-id: req-0011223344556677"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], "InvalidRequest");
        assert_eq!(v["request_id"], "req-0011223344556677");
    }

    /// The connection loop over an in-memory stream, with a tiny head timeout: a head that
    /// stops arriving gets 408 in JSON at the deadline; a connection idle between requests is
    /// closed without an answer.
    #[tokio::test]
    async fn a_stalled_head_gets_408_and_an_idle_connection_is_closed_quietly() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(super::super::store::SqliteStore::open(&dir.path().join("h.db")).unwrap());
        let (signer, _) = super::super::signing::load_or_create(dir.path()).unwrap();
        let plane = super::super::ControlPlane::new(
            super::super::ControlConfig::default(),
            store,
            signer,
            Arc::new(super::super::NoDataPlane),
        )
        .unwrap();
        let shared = plane.shared.clone();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let run = |server| {
            let slot =
                Slot::new(Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(), shared.clone());
            let task = requests(
                server,
                peer,
                plane.router(),
                shared.clone(),
                slot,
                HEAD_TIMEOUT,
                CancellationToken::new(),
            );
            tokio::spawn(task)
        };

        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let served = run(server);
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let t0 = Instant::now();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        served.await.unwrap();
        assert!(t0.elapsed() >= HEAD_TIMEOUT, "{:?}", t0.elapsed());
        let text = String::from_utf8(got).unwrap();
        let (first, second) = text.split_once("ok\n").unwrap();
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(second.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{text}");
        let body: serde_json::Value =
            serde_json::from_str(second.split_once("\r\n\r\n").unwrap().1).unwrap();
        assert_eq!(body["code"], "InvalidRequest");

        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let served = run(server);
        client.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        served.await.unwrap();
        let text = String::from_utf8(got).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n") && text.ends_with("ok\n"), "{text}");
        assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
    }

    #[test]
    fn refusals_are_logged_once_per_interval_with_a_count() {
        let mut log = RefusalLog::default();
        let t = Instant::now();
        assert_eq!(log.note(t), Some(1));
        assert_eq!(log.note(t + Duration::from_secs(1)), None);
        assert_eq!(log.note(t + Duration::from_secs(9)), None);
        assert_eq!(log.note(t + REFUSAL_LOG_INTERVAL), Some(3));
        assert_eq!(log.note(t + REFUSAL_LOG_INTERVAL), None);
    }
}
