//! Serving the API router over TLS: accept, TLS handshake (with a deadline), HTTP/1.1 with
//! upgrades (the agent control channel), and the peer address handed to handlers as
//! `ConnectInfo<SocketAddr>` (policy key `hatch:SourceIp`).
//!
//! The certificate can be swapped at run time ([`TlsSlot::replace`], on SIGHUP): connections
//! accepted afterwards use the new one; live ones keep theirs.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

/// TLS handshake plus request head must complete within this (slowloris bound).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After an accept error (e.g. out of file descriptors), wait this long before the next accept
/// so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

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

/// Serves `router` on `listener` until `shutdown` is cancelled. Live connections are dropped
/// with the runtime.
pub async fn serve(
    listener: TcpListener,
    tls: TlsSlot,
    router: Router,
    shutdown: CancellationToken,
) {
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
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let tls = tls.current();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(req)
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(HANDSHAKE_TIMEOUT);
            let res = match tls {
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
                    let conn = http.serve_connection(TokioIo::new(stream), svc).with_upgrades();
                    tokio::select! {
                        r = conn => r,
                        _ = shutdown.cancelled() => Ok(()),
                    }
                }
                None => {
                    let conn = http.serve_connection(TokioIo::new(tcp), svc).with_upgrades();
                    tokio::select! {
                        r = conn => r,
                        _ = shutdown.cancelled() => Ok(()),
                    }
                }
            };
            if let Err(e) = res {
                debug!(%peer, err = %e, "api connection ended with an error");
            }
        });
    }
}
