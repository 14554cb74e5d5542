//! `hatch-agent register`: trade an activation for an instance id and secret.
//!
//! One HTTPS request (`POST {api}/v1/agent/register`) over rustls with hyper's HTTP/1.1 client
//! connection; the answer is a `RegisterResponse` (201) or an `ErrorBody` whose code and message
//! are shown to the operator as they are.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hatch_proto::api::ErrorBody;
use hatch_proto::control::{RegisterRequest, RegisterResponse};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The whole register exchange (connect, TLS, request, answer) must finish within this.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest answer body read: 64 KiB (the real answer is ~200 bytes).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why registration failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The API URL is not `https://host[:port][/prefix]`.
    #[error("bad API URL {url:?}: {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS handshake failed (often: the relay's certificate is not signed by the CA).
    #[error("TLS handshake with {host} failed: {source}")]
    Tls {
        /// Host name verified.
        host: String,
        /// The TLS error.
        source: std::io::Error,
    },
    /// HTTP exchange failed.
    #[error("HTTP exchange failed: {0}")]
    Http(String),
    /// The relay refused the registration.
    #[error("registration refused: HTTP {status} {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stable error code (`InvalidRequest`, `AccessDenied`, ...).
        code: String,
        /// The relay's words.
        message: String,
    },
    /// The answer could not be understood.
    #[error("unexpected answer (HTTP {status}): {why}")]
    BadAnswer {
        /// HTTP status.
        status: u16,
        /// What was wrong.
        why: String,
    },
    /// Nothing finished within [`REGISTER_TIMEOUT`].
    #[error("no answer from the API within {REGISTER_TIMEOUT:?}")]
    Timeout,
}

/// The parts of an `https://` API URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// Port (443 when absent).
    pub port: u16,
    /// Path prefix without a trailing slash (usually empty).
    pub prefix: String,
}

impl ApiUrl {
    /// Parses `https://host[:port][/prefix]`.
    pub fn parse(url: &str) -> Result<ApiUrl, RegisterError> {
        let bad = |why: &str| RegisterError::BadUrl { url: url.to_owned(), why: why.to_owned() };
        let uri: Uri = url.parse().map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if uri.query().is_some() {
            return Err(bad("no query string allowed"));
        }
        Ok(ApiUrl {
            host,
            port: uri.port_u16().unwrap_or(443),
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// `host:port` for the Host header and socket address (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The `wss://` URL of the control channel.
    pub fn connect_url(&self) -> String {
        format!("wss://{}{}/v1/agent/connect", self.authority(), self.prefix)
    }
}

/// Registers with the API and returns the new instance's id and secret.
pub async fn register(
    api: &ApiUrl,
    tls: Arc<rustls::ClientConfig>,
    req: &RegisterRequest,
) -> Result<RegisterResponse, RegisterError> {
    tokio::time::timeout(REGISTER_TIMEOUT, exchange(api, tls, req))
        .await
        .map_err(|_| RegisterError::Timeout)?
}

async fn exchange(
    api: &ApiUrl,
    tls: Arc<rustls::ClientConfig>,
    req: &RegisterRequest,
) -> Result<RegisterResponse, RegisterError> {
    let addr = api.authority();
    let tcp = TcpStream::connect((api.host.as_str(), api.port))
        .await
        .map_err(|source| RegisterError::Connect { addr: addr.clone(), source })?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(api.host.clone()).map_err(|e| RegisterError::BadUrl {
        url: addr.clone(),
        why: format!("host is not a valid TLS server name: {e}"),
    })?;
    let mut cfg = (*tls).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let stream = TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|source| RegisterError::Tls { host: api.host.clone(), source })?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| RegisterError::Http(e.to_string()))?;
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(?e, "register connection ended with an error");
        }
    });
    let body = serde_json::to_vec(req).expect("RegisterRequest serialises: only strings");
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/v1/agent/register", api.prefix))
        .header(http::header::HOST, addr)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, concat!("hatch-agent/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| RegisterError::Http(e.to_string()))?;
    let resp = send.send_request(request).await.map_err(|e| RegisterError::Http(e.to_string()))?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| RegisterError::BadAnswer { status: status.as_u16(), why: e.to_string() })?
        .to_bytes();
    conn.abort();
    if status == StatusCode::CREATED || status == StatusCode::OK {
        let answer: RegisterResponse = serde_json::from_slice(&bytes).map_err(|e| {
            RegisterError::BadAnswer { status: status.as_u16(), why: format!("body: {e}") }
        })?;
        if answer.instance_id.is_empty() || answer.instance_secret.is_empty() {
            return Err(RegisterError::BadAnswer {
                status: status.as_u16(),
                why: "empty instance id or secret".into(),
            });
        }
        return Ok(answer);
    }
    match serde_json::from_slice::<ErrorBody>(&bytes) {
        Ok(e) => Err(RegisterError::Refused {
            status: status.as_u16(),
            code: e.code,
            message: e.message,
        }),
        Err(_) => Err(RegisterError::BadAnswer {
            status: status.as_u16(),
            why: format!(
                "not an error body: {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls() {
        let u = ApiUrl::parse("https://relay.example:7444").unwrap();
        assert_eq!(u, ApiUrl { host: "relay.example".into(), port: 7444, prefix: String::new() });
        assert_eq!(u.connect_url(), "wss://relay.example:7444/v1/agent/connect");
        let u = ApiUrl::parse("https://[::1]:9/base/").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.connect_url(), "wss://[::1]:9/base/v1/agent/connect");
        assert_eq!(ApiUrl::parse("https://h").unwrap().port, 443);
        let err = ApiUrl::parse("http://h:1").unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
        assert!(ApiUrl::parse("not a url").is_err());
    }
}
