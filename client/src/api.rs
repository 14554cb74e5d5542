//! The control-plane API client: one JSON request per HTTPS connection (hyper's HTTP/1 client
//! connection over tokio-rustls), every step under a deadline, answers size-limited, failures
//! classified into [`CliError`]s that say what went wrong (refused, certificate, timeout,
//! error body).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hatch_proto::api::ErrorBody;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use crate::config::{Settings, Source};
use crate::errors::{CliError, Subject};

/// Deadline for TCP connect + TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the whole answer once the request is sent.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer body read (bytes); session lists are paginated well below this.
pub const MAX_BODY: usize = 4 << 20;
/// Largest session recording downloaded (`hatch sessions recording`, `hatch play ID`): 512
/// MiB of asciicast, held in memory; a longer one can be exported on the relay's host.
pub const MAX_RECORDING_BODY: usize = 512 << 20;

/// The rustls client configuration for `settings`: the CA file when one is set, else the
/// web's root CAs. Always the ring provider.
pub fn tls_config(
    ca_file: Option<&(std::path::PathBuf, Source)>,
) -> Result<Arc<rustls::ClientConfig>, CliError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some((path, source)) => add_ca_file(&mut roots, path, source)?,
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| CliError::Config(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn add_ca_file(
    roots: &mut rustls::RootCertStore,
    path: &Path,
    source: &Source,
) -> Result<(), CliError> {
    let bad = |why: String| {
        CliError::Config(format!(
            "cannot use the CA file {} ({source}): {why}; set it with `hatch configure --ca \
             FILE` or HATCH_CA",
            path.display()
        ))
    };
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
        roots.add(cert).map_err(|e| bad(format!("certificate rejected: {e}")))?;
        n += 1;
    }
    if n == 0 {
        return Err(bad("it holds no PEM certificate".to_owned()));
    }
    Ok(())
}

/// Turns a TLS handshake failure into words that name the certificate problem.
pub fn describe_tls_error(err: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match err {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "the relay's certificate is signed by a CA that is not trusted \
                                 (unknown issuer)"
                .to_owned(),
            C::Expired | C::ExpiredContext { .. } => {
                "the relay's certificate has expired".to_owned()
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the relay's certificate is not valid yet (check the clock)".to_owned()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the relay's certificate is not valid for this host name".to_owned()
            }
            C::Revoked => "the relay's certificate is revoked".to_owned(),
            C::BadSignature => "the relay's certificate has a bad signature".to_owned(),
            other => format!("the relay's certificate is invalid ({other:?})"),
        },
        rustls::Error::AlertReceived(alert) => {
            format!("the relay refused the handshake ({alert:?})")
        }
        other => other.to_string(),
    }
}

/// Classifies an I/O error of a TLS connection: a rustls error inside is a [`CliError::Tls`].
pub fn classify_io(url: &str, err: &std::io::Error) -> CliError {
    if let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
        return CliError::Tls { url: url.to_owned(), detail: describe_tls_error(tls) };
    }
    CliError::Connect { url: url.to_owned(), detail: err.to_string() }
}

/// One answered request: status, body and, for `-v`, a summary.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
    /// The request id (header `x-request-id`), if any.
    pub request_id: Option<String>,
    /// `METHOD URL -> STATUS in N ms [request id]`.
    pub summary: String,
}

/// The API client of one command.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    access_key: String,
    tls: Arc<rustls::ClientConfig>,
    verbose: bool,
}

impl Client {
    /// A client for `settings`; reads the CA file now so that a bad one fails early.
    pub fn new(settings: &Settings, verbose: bool) -> Result<Self, CliError> {
        Ok(Client {
            base: settings.api.clone(),
            access_key: settings.access_key.clone(),
            tls: tls_config(settings.ca_file.as_ref())?,
            verbose,
        })
    }

    /// The TLS configuration, shared with the stream connection.
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    /// Whether `-v` was given.
    pub fn verbose(&self) -> bool {
        self.verbose
    }

    /// `GET path`, decoding a JSON answer; an error body becomes [`CliError::Api`].
    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        subject: &Subject,
    ) -> Result<T, CliError> {
        self.send_decoded(Method::GET, path, None, subject).await
    }

    /// `POST path` with a JSON body, decoding a JSON answer.
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        subject: &Subject,
    ) -> Result<T, CliError> {
        self.send_decoded(Method::POST, path, Some(to_json(body)), subject).await
    }

    /// `PUT path` with a JSON body, decoding a JSON answer.
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        subject: &Subject,
    ) -> Result<T, CliError> {
        self.send_decoded(Method::PUT, path, Some(to_json(body)), subject).await
    }

    /// `GET path` of a body that is not JSON (a recording), up to `max` bytes; an error body
    /// becomes [`CliError::Api`].
    pub async fn get_raw(
        &self,
        path: &str,
        subject: &Subject,
        max: usize,
    ) -> Result<Bytes, CliError> {
        let answer = self.send_limited(Method::GET, path, None, max).await?;
        if !answer.status.is_success() {
            return Err(self.error(path, answer, subject));
        }
        Ok(answer.body)
    }

    /// `DELETE path`; any 2xx is success.
    pub async fn delete(&self, path: &str, subject: &Subject) -> Result<(), CliError> {
        let answer = self.send(Method::DELETE, path, None).await?;
        if answer.status.is_success() {
            return Ok(());
        }
        Err(self.error(path, answer, subject))
    }

    /// `DELETE path`, decoding the JSON answer (what was deleted or revoked).
    pub async fn delete_decoded<T: DeserializeOwned>(
        &self,
        path: &str,
        subject: &Subject,
    ) -> Result<T, CliError> {
        self.send_decoded(Method::DELETE, path, None, subject).await
    }

    async fn send_decoded<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        subject: &Subject,
    ) -> Result<T, CliError> {
        let answer = self.send(method, path, body).await?;
        self.decode(path, answer, subject)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        path: &str,
        answer: Answer,
        subject: &Subject,
    ) -> Result<T, CliError> {
        if !answer.status.is_success() {
            return Err(self.error(path, answer, subject));
        }
        serde_json::from_slice(&answer.body).map_err(|e| CliError::BadResponse {
            url: format!("{}{path}", self.base),
            detail: format!(
                "HTTP {} with a body that is not the expected JSON ({e})",
                answer.status
            ),
        })
    }

    fn error(&self, path: &str, answer: Answer, subject: &Subject) -> CliError {
        match serde_json::from_slice::<ErrorBody>(&answer.body) {
            Ok(mut body) => {
                if body.request_id.is_none() {
                    body.request_id = answer.request_id;
                }
                let mut subject = subject.clone();
                // TargetNotConnected adds `last_seen` (RFC 3339) to the body when known.
                if let Ok(raw) = serde_json::from_slice::<serde_json::Value>(&answer.body)
                    && let Some(seen) = raw.get("last_seen").filter(|v| !v.is_null())
                {
                    subject.last_seen = crate::output::ago(seen, crate::output::now());
                }
                CliError::api(answer.status.as_u16(), body, subject, Some(answer.summary))
            }
            Err(_) => CliError::BadResponse {
                url: format!("{}{path}", self.base),
                detail: format!("HTTP {} without a Hatch error body", answer.status),
            },
        }
    }

    /// Sends one request on a fresh connection and reads the whole answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, CliError> {
        self.send_limited(method, path, body, MAX_BODY).await
    }

    /// [`Client::send`], reading at most `max` bytes of the answer.
    async fn send_limited(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        max: usize,
    ) -> Result<Answer, CliError> {
        let url = format!("{}{path}", self.base);
        let started = Instant::now();
        let uri: Uri = url.parse().map_err(|_| CliError::Usage(format!("bad URL {url}")))?;
        let https = uri.scheme_str() == Some("https");
        // Invariant: config::resolve checked that the API URL has a host.
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });

        let origin = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map(|a| a.as_str()).unwrap_or_default()
        );
        let connect = async {
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| CliError::Connect { url: origin.clone(), detail: e.to_string() })?;
            let _ = tcp.set_nodelay(true);
            if !https {
                return Ok::<_, CliError>(Conn::Plain(tcp));
            }
            let name = ServerName::try_from(host.clone()).map_err(|_| {
                CliError::Config(format!("the API host {host:?} is not a valid server name"))
            })?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| classify_io(&origin, &e))?;
            Ok(Conn::Tls(Box::new(tls)))
        };
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| CliError::Timeout { url: origin.clone(), what: "TLS handshake" })??;

        let exchange = async {
            match conn {
                Conn::Plain(s) => self.exchange(s, method, &uri, body, max).await,
                Conn::Tls(s) => self.exchange(*s, method, &uri, body, max).await,
            }
        };
        let (status, bytes, request_id, method) = tokio::time::timeout(ANSWER_TIMEOUT, exchange)
            .await
            .map_err(|_| CliError::Timeout { url: url.clone(), what: "answer" })??;

        let summary = format!(
            "{method} {url} -> {status} in {} ms{}",
            started.elapsed().as_millis(),
            request_id.as_deref().map(|r| format!(", request id {r}")).unwrap_or_default()
        );
        if self.verbose {
            eprintln!("hatch: {summary}");
        }
        Ok(Answer { status, body: bytes, request_id, summary })
    }

    async fn exchange<S>(
        &self,
        io: S,
        method: Method,
        uri: &Uri,
        body: Option<Vec<u8>>,
        max: usize,
    ) -> Result<(StatusCode, Bytes, Option<String>, Method), CliError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let url = uri.to_string();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| CliError::Lost(format!("{url}: {e}")))?;
        // The connection task ends when the answer is read and `sender` is dropped.
        tokio::spawn(connection);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .header(header::HOST, uri.authority().map(|a| a.as_str()).unwrap_or_default())
            .header(header::AUTHORIZATION, format!("Bearer {}", self.access_key))
            .header(header::ACCEPT, "application/json")
            .header(header::USER_AGENT, concat!("hatch/", env!("CARGO_PKG_VERSION")));
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CliError::Usage(format!("cannot build request to {url}: {e}")))?;
        let resp =
            sender.send_request(req).await.map_err(|e| CliError::Lost(format!("{url}: {e}")))?;
        let status = resp.status();
        let request_id =
            resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bytes = Limited::new(resp.into_body(), max)
            .collect()
            .await
            .map_err(|e| CliError::BadResponse {
                url: url.clone(),
                detail: format!("HTTP {status} with an unreadable or oversized body ({e})"),
            })?
            .to_bytes();
        Ok((status, bytes, request_id, method))
    }
}

fn to_json<B: Serialize>(body: &B) -> Vec<u8> {
    // Invariant: the request types are plain structs of strings, numbers and string maps,
    // which always serialise.
    serde_json::to_vec(body).expect("request serialises")
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}
