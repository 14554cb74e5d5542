//! HTTP routes of the control plane and its error answers.
//!
//! Every failure, including the framework's own rejections (unknown path, wrong method, bad or
//! oversized body), leaves as `{code, message, request_id}` with a stable code: handlers return
//! [`ApiError`], and the [`track`] middleware rewrites any other error response into that shape,
//! adds the request id and counts the answer for `/metrics`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, Extension, FromRequest, MatchedPath, Path, Query, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hatch_proto::api::{
    AccountSettings, AccountSettingsUpdate, InstanceInfo, InstanceList, ResumeSessionRequest,
    ResumeSessionResponse, SessionInfo, SessionList, StartSessionRequest, StartSessionResponse,
    codes,
};
use hatch_proto::control::{RegisterRequest, RegisterResponse};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::auth::{Caller, bearer, require_bearer};
use super::iam::IamError;
use super::policy;
use super::sessions::SessionError;
use super::store::{Account, Instance, RegisterError, SessionRecord, StateFilter};
use super::{Shared, audit, credentials, iam, rfc3339, unix_now};

/// An API failure: status, stable code, message for a person.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    last_seen: Option<String>,
    /// Seconds for the `Retry-After` header (rate limits).
    retry_after: Option<u64>,
}

/// Marker left on an error response for [`track`] to finish (request id, metrics).
#[derive(Debug, Clone)]
struct ErrorInfo {
    code: &'static str,
    message: String,
    last_seen: Option<String>,
}

impl ApiError {
    /// An error with a status, a code of [`codes`] and a message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), last_seen: None, retry_after: None }
    }

    /// The HTTP status it answers with.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::INVALID_REQUEST, message)
    }

    fn denied(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, codes::ACCESS_DENIED, message)
    }

    fn internal(err: anyhow::Error) -> Self {
        warn!(err = %format!("{err:#}"), "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL_ERROR, "internal error")
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::internal(e)
    }
}

/// The one mapping of IAM refusals to API answers.
impl From<IamError> for ApiError {
    fn from(e: IamError) -> Self {
        let message = e.to_string();
        let (status, code) = match e {
            IamError::Invalid(_) => (StatusCode::BAD_REQUEST, codes::INVALID_REQUEST),
            IamError::MalformedPolicy(_) => {
                (StatusCode::BAD_REQUEST, codes::MALFORMED_POLICY_DOCUMENT)
            }
            IamError::Denied(_) => (StatusCode::FORBIDDEN, codes::ACCESS_DENIED),
            IamError::NoSuchEntity(_) => (StatusCode::NOT_FOUND, codes::NO_SUCH_ENTITY),
            IamError::InstanceNotFound(_) => (StatusCode::NOT_FOUND, codes::INSTANCE_NOT_FOUND),
            IamError::AlreadyExists(_) => (StatusCode::CONFLICT, codes::ENTITY_ALREADY_EXISTS),
            IamError::DeleteConflict(_) => (StatusCode::CONFLICT, codes::DELETE_CONFLICT),
            IamError::Internal(err) => return ApiError::internal(err),
        };
        ApiError::new(status, code, message)
    }
}

/// The one mapping of session refusals to API answers.
impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let message = e.to_string();
        let (mut last_seen, mut retry_after) = (None, None);
        let (status, code) = match e {
            SessionError::Invalid(_) => (StatusCode::BAD_REQUEST, codes::INVALID_REQUEST),
            SessionError::Denied(_) => (StatusCode::FORBIDDEN, codes::ACCESS_DENIED),
            SessionError::Disabled(_) => (StatusCode::FORBIDDEN, codes::SESSION_MANAGER_DISABLED),
            SessionError::InstanceNotFound(_) => (StatusCode::NOT_FOUND, codes::INSTANCE_NOT_FOUND),
            SessionError::SessionNotFound(_) => (StatusCode::NOT_FOUND, codes::SESSION_NOT_FOUND),
            SessionError::NotConnected { last_seen: seen, .. } => {
                last_seen = seen.map(rfc3339);
                (StatusCode::CONFLICT, codes::TARGET_NOT_CONNECTED)
            }
            SessionError::Throttled { retry_after: secs, .. } => {
                retry_after = secs;
                (StatusCode::TOO_MANY_REQUESTS, codes::THROTTLED)
            }
            SessionError::Ended(_) => (StatusCode::CONFLICT, codes::SESSION_ENDED),
            SessionError::Attached(_) => (StatusCode::CONFLICT, codes::SESSION_ATTACHED),
            SessionError::RecordingUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, codes::RECORDING_UNAVAILABLE)
            }
            SessionError::RecordingNotFound(_) => {
                (StatusCode::NOT_FOUND, codes::RECORDING_NOT_FOUND)
            }
            SessionError::RecordingCorrupt(_) => (StatusCode::CONFLICT, codes::RECORDING_CORRUPT),
            SessionError::Internal(err) => return ApiError::internal(err),
        };
        let mut out = ApiError::new(status, code, message);
        (out.last_seen, out.retry_after) = (last_seen, retry_after);
        out
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = self.status.into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp.extensions_mut().insert(ErrorInfo {
            code: self.code,
            message: self.message,
            last_seen: self.last_seen,
        });
        resp
    }
}

fn error_json(info: &ErrorInfo, request_id: &str) -> String {
    let mut v = serde_json::json!({
        "code": info.code,
        "message": info.message,
        "request_id": request_id,
    });
    if let Some(ls) = &info.last_seen {
        v["last_seen"] = serde_json::Value::String(ls.clone());
    }
    v.to_string()
}

/// Adds the request id, turns every error response into the JSON error shape, counts answers.
async fn track(State(shared): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let rid = format!("req-{}", hex::encode(credentials::random_bytes::<8>()));
    let slot = audit::Slot::default();
    let seen = audit::Request {
        method: req.method().clone(),
        route: req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()),
        path: req.uri().path().to_owned(),
        source_ip: req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| super::auth::canonical_ip(c.0.ip()).to_string())
            .unwrap_or_default(),
    };
    req.extensions_mut().insert(slot.clone());
    let resp = next.run(req).await;
    let (mut parts, body) = resp.into_parts();
    let (info, body) = match parts.extensions.remove::<ErrorInfo>() {
        Some(info) => (Some(info), None),
        None if parts.status.is_client_error() || parts.status.is_server_error() => {
            // A rejection of the framework: keep its text as the message.
            let text = match axum::body::to_bytes(body, 4096).await {
                Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
                Err(_) => String::new(),
            };
            (Some(framework_error(parts.status, text)), None)
        }
        None => (None, Some(body)),
    };
    let message = info.as_ref().map(|i| i.message.clone());
    let (resp, code) = match (info, body) {
        (Some(info), _) => {
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            parts.headers.remove(header::CONTENT_LENGTH);
            let code = info.code;
            (Response::from_parts(parts, Body::from(error_json(&info, &rid))), code)
        }
        (None, Some(body)) => (Response::from_parts(parts, body), "OK"),
        (None, None) => (Response::from_parts(parts, Body::empty()), "OK"),
    };
    let mut resp = resp;
    shared.metrics.request(resp.status().as_u16(), code);
    if audit::audited(&seen.method, resp.status()) {
        let ev = audit::event(
            &seen,
            &slot,
            &rid,
            rfc3339(unix_now()),
            resp.status(),
            code,
            message.as_deref(),
        );
        write_audit(&shared, ev).await;
    }
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Writes a request's audit event to the audit file and the store, before its answer leaves
/// (docs in [`audit`]). A failed write is logged; the request's effect is not undone.
async fn write_audit(shared: &Shared, ev: audit::Event) {
    let line = match serde_json::to_string(&ev) {
        Ok(l) => l,
        Err(e) => {
            warn!(err = %e, request = %ev.request_id, "audit event not serialized");
            return;
        }
    };
    let file = shared.audit.clone();
    let (at, account) = (unix_now(), ev.account.clone());
    let res = shared
        .blocking(move |s| {
            if let Some(f) = &file {
                f.append(&line).map_err(|e| anyhow::anyhow!("appending to the audit file: {e}"))?;
            }
            // No account, no reader: `GET /v1/audit` answers per account, so an event of a
            // request without a valid key goes to the file only, and keyless requests cannot
            // grow the store.
            match account.as_deref() {
                Some(a) => s.append_audit(at, Some(a), &line),
                None => Ok(()),
            }
        })
        .await;
    if let Err(e) = res {
        warn!(err = %format!("{e:#}"), request = %ev.request_id, action = %ev.action,
            "writing the audit event failed");
    }
}

fn framework_error(status: StatusCode, text: String) -> ErrorInfo {
    let (code, default) = match status {
        StatusCode::NOT_FOUND => (codes::NOT_FOUND, "no such path"),
        StatusCode::METHOD_NOT_ALLOWED => {
            (codes::INVALID_REQUEST, "method not allowed on this path")
        }
        StatusCode::PAYLOAD_TOO_LARGE => (codes::INVALID_REQUEST, "request body too large"),
        StatusCode::UNAUTHORIZED => (codes::INVALID_TOKEN, "not authenticated"),
        StatusCode::FORBIDDEN => (codes::ACCESS_DENIED, "access denied"),
        StatusCode::TOO_MANY_REQUESTS => (codes::THROTTLED, "too many requests"),
        s if s.is_client_error() => (codes::INVALID_REQUEST, "bad request"),
        _ => (codes::INTERNAL_ERROR, "internal error"),
    };
    ErrorInfo {
        code,
        message: if text.is_empty() { default.into() } else { text },
        last_seen: None,
    }
}

/// A JSON body, with every failure (size, syntax, shape, time) answered as `InvalidRequest`.
pub struct ApiJson<T>(pub T);

/// How long a request body may take once its head has arrived: a peer trickling a body would
/// otherwise hold its connection, task and partial body for as long as it likes.
const BODY_TIMEOUT: Duration = super::http::HANDSHAKE_TIMEOUT;

/// The whole body of `req`, read within `within`.
async fn read_body<S: Send + Sync>(
    req: Request,
    state: &S,
    within: Duration,
) -> Result<Bytes, ApiError> {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    match tokio::time::timeout(within, Bytes::from_request(req, state)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::INVALID_REQUEST,
            "request body too large",
        )),
        Ok(Err(e)) => Err(ApiError::invalid(format!("reading request body: {e}"))),
        Err(_) => {
            warn!(peer = ?peer, "request body not received in time; refused");
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                codes::INVALID_REQUEST,
                format!("request body not received within {} s", within.as_secs()),
            ))
        }
    }
}

/// A JSON body that may be left out: an empty body (or only white space) is `T::default()`,
/// anything else as [`ApiJson`].
pub struct OptionalJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state, BODY_TIMEOUT).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        serde_json::from_slice(&bytes)
            .map(OptionalJson)
            .map_err(|e| ApiError::invalid(format!("request body: {e}")))
    }
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state, BODY_TIMEOUT).await?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::invalid(format!("request body: {e}")))
    }
}

pub(crate) fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(b) => (status, [(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(e) => ApiError::internal(e.into()).into_response(),
    }
}

/// The routes of the control plane.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let limit = shared.cfg.max_body_bytes;
    Router::new()
        .route("/v1/sessions", post(start_session).get(list_sessions))
        .route("/v1/sessions/{id}", get(describe_session).delete(terminate_session))
        .route("/v1/sessions/{id}/resume", post(resume_session))
        .route("/v1/sessions/{id}/recording", get(session_recording))
        .route("/v1/instances", get(list_instances))
        .route("/v1/account/settings", get(get_settings).put(put_settings))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/connect", get(agent_connect))
        .route("/v1/audit", get(read_audit))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(super::iam_api::routes())
        .merge(super::console_api::routes(shared.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(shared.clone(), track))
        .with_state(shared)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such path")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::INVALID_REQUEST,
        "method not allowed on this path",
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Why a scrape of `/metrics` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetricsRefused {
    /// The relay has a metrics token and the request did not carry it.
    Token,
    /// No metrics token, and the peer is not on this host.
    OffHost,
}

/// Who may scrape `/metrics`: it counts every tenant, so it is not open to the network. With
/// `--metrics-token-file` the bearer token (from anywhere), without one loopback peers only.
fn may_scrape(
    token: Option<&str>,
    peer: IpAddr,
    bearer: Option<&str>,
) -> Result<(), MetricsRefused> {
    match token {
        // Digests compared, not the tokens: the time taken says nothing about the token.
        Some(t) => bearer
            .is_some_and(|b| {
                credentials::hashes_equal(&credentials::hash(b), &credentials::hash(t))
            })
            .then_some(())
            .ok_or(MetricsRefused::Token),
        None if peer.to_canonical().is_loopback() => Ok(()),
        None => Err(MetricsRefused::OffHost),
    }
}

/// `GET /metrics`: Prometheus text, to whom [`may_scrape`] allows.
async fn metrics(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    match may_scrape(shared.cfg.metrics_token.as_deref(), peer.ip(), bearer(&headers)) {
        Ok(()) => {}
        Err(MetricsRefused::Token) => {
            info!(%peer, "metrics scrape without the metrics token refused");
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                codes::INVALID_TOKEN,
                "GET /metrics needs Authorization: Bearer <the --metrics-token-file token>",
            ));
        }
        Err(MetricsRefused::OffHost) => {
            info!(%peer, "metrics scrape from off the host refused (no --metrics-token-file)");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                codes::ACCESS_DENIED,
                "GET /metrics answers only this host unless the relay has --metrics-token-file",
            ));
        }
    }
    let (open, pending, detached) = shared.live.counts();
    let mut text = shared.metrics.render(open, pending, detached, shared.agents.online());
    text.push_str(&shared.data.metrics());
    text.push_str(&super::metrics::render_process());
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// `wss://host:port` for a caller who reached the API with `host_header`.
pub(super) fn data_base(shared: &Shared, headers: &HeaderMap) -> String {
    if let Some(u) = &shared.cfg.public_data_url {
        return u.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            if let Some(rest) = h.strip_prefix('[') {
                // [v6]:port
                rest.split(']').next().map(|v6| format!("[{v6}]")).unwrap_or_default()
            } else {
                h.rsplit_once(':').map(|(h, _)| h).unwrap_or(h).to_owned()
            }
        })
        .filter(|h| {
            !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        })
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{}://{host}:{}", shared.cfg.data_scheme, shared.cfg.data_port)
}

fn session_info(s: &SessionRecord) -> SessionInfo {
    SessionInfo {
        session_id: s.id.clone(),
        instance_id: s.instance_id.clone(),
        principal: s.principal.clone(),
        source_ip: s.source_ip.clone(),
        mode: s.mode,
        command: s.command.clone(),
        run_as: s.run_as.clone(),
        state: s.state.as_str().to_owned(),
        created_at: rfc3339(s.created_at),
        connected_at: s.connected_at.map(rfc3339),
        closed_at: s.closed_at.map(rfc3339),
        detached_at: s.detached_at.map(rfc3339),
        close_reason: s.close_reason.map(|r| r.as_str().to_owned()),
        bytes_client_to_agent: s.bytes_client_to_agent,
        bytes_agent_to_client: s.bytes_agent_to_client,
        remote_host: s.remote_host.clone(),
        remote_port: s.remote_port,
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
    next_token: Option<String>,
}

/// Most sessions in one page.
const MAX_PAGE: u32 = 1000;
/// Page size when none is asked for.
const DEFAULT_PAGE: u32 = 100;

pub(super) async fn start_session(
    State(shared): State<Arc<Shared>>,
    Extension(slot): Extension<audit::Slot>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<ApiJson<StartSessionRequest>, ApiError>,
) -> Result<Response, ApiError> {
    if let Ok(ApiJson(req)) = &body {
        slot.target(&req.instance_id);
    }
    shared.take_start(&caller)?;
    let ApiJson(req) = body?;
    let base = data_base(&shared, &headers);
    let g = shared.start(&caller, &req, &base).await?;
    slot.target(&format!("{} session {}", req.instance_id, g.session_id));
    Ok(json(
        StatusCode::CREATED,
        &StartSessionResponse {
            stream_url: format!(
                "{}/v1/stream/{}?role=client",
                g.stream_base.as_deref().unwrap_or(&base),
                g.session_id
            ),
            session_id: g.session_id,
            token: g.token,
            expires_at: rfc3339(g.expires_at),
            resume_window_s: Some(shared.cfg.resume_window.as_secs()),
        },
    ))
}

/// `POST /v1/sessions/{id}/resume`: a resume token for a new client leg of the caller's own
/// session.
pub(super) async fn resume_session(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<OptionalJson<ResumeSessionRequest>, ApiError>,
) -> Result<Response, ApiError> {
    shared.take_start(&caller)?;
    let Path(id) = id.map_err(|e| ApiError::invalid(e.body_text()))?;
    let OptionalJson(req) = body?;
    let g = shared.resume(&caller, &id, req.force).await?;
    let base = data_base(&shared, &headers);
    Ok(json(
        StatusCode::OK,
        &ResumeSessionResponse {
            stream_url: format!(
                "{}/v1/stream/{}?role=client",
                g.stream_base.as_deref().unwrap_or(&base),
                g.session_id
            ),
            session_id: g.session_id,
            token: g.token,
            expires_at: rfc3339(g.expires_at),
            resume_window_s: Some(shared.cfg.resume_window.as_secs()),
        },
    ))
}

pub(super) async fn list_sessions(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))?;
    let filter = match q.state.as_deref() {
        None | Some("all") => StateFilter::All,
        Some("active") => StateFilter::Active,
        Some("closed") => StateFilter::Closed,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "state {other:?} is not one of active, closed, all"
            )));
        }
    };
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be 1 to {MAX_PAGE}")));
    }
    let (rows, next_token) = shared.list(&caller, filter, limit, q.next_token).await?;
    let sessions = rows.iter().map(session_info).collect();
    Ok(json(StatusCode::OK, &SessionList { sessions, next_token }))
}

/// `GET /v1/audit` query.
#[derive(Debug, Deserialize)]
struct AuditQuery {
    /// RFC 3339, or seconds since the epoch: events written at or after it.
    since: Option<String>,
    limit: Option<u32>,
    next_token: Option<String>,
}

/// `GET /v1/audit` answer: the events as they were written, oldest first.
#[derive(Debug, serde::Serialize)]
struct AuditList {
    events: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

/// Seconds since the epoch of `s`: RFC 3339 or a whole number of seconds.
fn parse_since(s: &str) -> Result<i64, ApiError> {
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|_| {
            ApiError::invalid(format!(
                "since {:?} is neither RFC 3339 nor seconds since the epoch",
                hatch_proto::logtext::peer(s, 60)
            ))
        })
}

/// `GET /v1/audit?since=&limit=&next_token=`: the caller's account's audit events
/// (`hatch:ReadAudit`).
async fn read_audit(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let hrn = policy::account_hrn(&caller.account.id, policy::Kind::Audit, "*");
    if !caller.may_account(policy::READ_AUDIT, &hrn) {
        info!(user = caller.principal(), resource = %hrn, "audit read denied by policy");
        return Err(ApiError::denied(format!(
            "your policy does not allow {} on {hrn}",
            policy::READ_AUDIT
        )));
    }
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))?;
    let since = q.since.as_deref().map(parse_since).transpose()?.unwrap_or(0);
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::invalid(format!("limit must be 1 to {MAX_PAGE}")));
    }
    let after = match q.next_token.as_deref() {
        None => 0,
        Some(t) => t
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::invalid("next_token is not one this API gave"))?,
    };
    let acct = caller.account.id.clone();
    let mut recs = shared.blocking(move |s| s.audit_events(&acct, since, after, limit + 1)).await?;
    let more = recs.len() > limit as usize;
    recs.truncate(limit as usize);
    let next_token = more.then(|| recs.last().map(|r| r.seq.to_string())).flatten();
    let events = recs
        .iter()
        .map(|r| serde_json::from_str(&r.line).unwrap_or(serde_json::Value::String(r.line.clone())))
        .collect();
    Ok(json(StatusCode::OK, &AuditList { events, next_token }))
}

pub(super) async fn describe_session(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid(e.body_text()))?;
    let rec = shared.session_for(&caller, &id, policy::DESCRIBE_SESSIONS).await?;
    Ok(json(StatusCode::OK, &session_info(&rec)))
}

async fn session_recording(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid(e.body_text()))?;
    let rx = shared.recording(&caller, &id).await?;
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let body = axum::body::Body::from_stream(chunks);
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/x-asciicast")], body).into_response())
}

pub(super) async fn terminate_session(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid(e.body_text()))?;
    let rec = shared.terminate(&caller, &id).await?;
    Ok(json(StatusCode::OK, &session_info(&rec)))
}

pub(super) async fn list_instances(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let account = caller.account.id.clone();
    let all = shared.blocking(move |s| s.instances(Some(&account))).await?;
    let elsewhere = shared.online_elsewhere().await?;
    let instances = all
        .iter()
        .filter(|i| caller.may(policy::DESCRIBE_INSTANCES, i, &caller.context(i)))
        .map(|i| instance_info(&shared, i, elsewhere.contains(&i.id)))
        .collect();
    Ok(json(StatusCode::OK, &InstanceList { instances }))
}

/// An instance as the API shows it: online now (here, or on another node of a fleet when
/// `elsewhere`), or when last seen.
pub(crate) fn instance_info(shared: &Shared, i: &Instance, elsewhere: bool) -> InstanceInfo {
    let online = elsewhere || shared.agents.is_online(&i.id);
    InstanceInfo {
        instance_id: i.id.clone(),
        region: i.region.clone(),
        hostname: i.hostname.clone(),
        tags: i.tags.clone(),
        online,
        last_seen: if online { Some(rfc3339(unix_now())) } else { i.last_seen.map(rfc3339) },
    }
}

fn owner_only(caller: &Caller) -> Result<(), ApiError> {
    if caller.is_owner() {
        Ok(())
    } else {
        Err(ApiError::denied("only the account owner may read or change account settings"))
    }
}

fn settings_of(a: &Account) -> AccountSettings {
    AccountSettings {
        session_manager_enabled: a.session_manager_enabled,
        idle_timeout_s: a.prefs.idle_timeout_s,
        max_duration_s: a.prefs.max_duration_s,
        recording: a.prefs.recording,
    }
}

async fn get_settings(caller: Caller) -> Result<Response, ApiError> {
    owner_only(&caller)?;
    Ok(json(StatusCode::OK, &settings_of(&caller.account)))
}

async fn put_settings(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<ApiJson<AccountSettingsUpdate>, ApiError>,
) -> Result<Response, ApiError> {
    owner_only(&caller)?;
    let ApiJson(update) = body?;
    let id = caller.account.id.clone();
    let switch = update.session_manager_enabled;
    let account = shared.blocking(move |s| Ok(iam::update_settings(s, &id, &update))).await??;
    if let Some(enabled) = switch {
        info!(account = %account.id, enabled, "session manager switch set");
        if !enabled {
            shared.disable_account(&account.id).await;
        }
    }
    info!(account = %account.id, idle_timeout_s = ?account.prefs.idle_timeout_s,
        max_duration_s = ?account.prefs.max_duration_s,
        recording = account.prefs.recording.as_str(), "session preferences set");
    Ok(json(StatusCode::OK, &settings_of(&account)))
}

async fn register(
    State(shared): State<Arc<Shared>>,
    Extension(slot): Extension<audit::Slot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<ApiJson<RegisterRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = body?;
    if req.activation_id.len() > 64 || req.activation_code.len() > 256 {
        return Err(ApiError::invalid("activation id or code too long"));
    }
    slot.target(&format!("activation {}", req.activation_id));
    if let Some(h) = &req.hostname
        && (h.len() > 255 || h.chars().any(char::is_control))
    {
        return Err(ApiError::invalid("hostname must be at most 255 printable characters"));
    }
    let code_hash = credentials::hash(&req.activation_code);
    let instance_id = credentials::new_id("i-");
    let secret = credentials::new_secret(credentials::INSTANCE_SECRET_PREFIX);
    let secret_hash = credentials::hash(&secret);
    let now = unix_now();
    let iid = instance_id.clone();
    let store = shared.store.clone();
    let res = tokio::task::spawn_blocking(move || {
        store.register_instance(
            &req.activation_id,
            &code_hash,
            &iid,
            &secret_hash,
            req.hostname.as_deref(),
            now,
        )
    })
    .await
    .map_err(|e| ApiError::internal(anyhow::anyhow!("register task: {e}")))?;
    match res {
        Ok(inst) => {
            info!(instance = %inst.id, account = %inst.account_id, %peer, "instance registered");
            slot.account(&inst.account_id);
            slot.target(&inst.id);
            Ok(json(
                StatusCode::CREATED,
                &RegisterResponse { instance_id: inst.id, instance_secret: secret },
            ))
        }
        Err(RegisterError::Store(e)) => Err(ApiError::internal(anyhow::anyhow!(e))),
        Err(e) => {
            warn!(%peer, err = %e, "registration refused");
            Err(ApiError::new(StatusCode::FORBIDDEN, codes::ACCESS_DENIED, e.to_string()))
        }
    }
}

async fn agent_connect(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let secret = require_bearer(&shared, &headers, "instance secret")?;
    let hash = credentials::hash(secret);
    let Some(inst) = shared.blocking(move |s| s.instance_by_secret(&hash)).await? else {
        shared.metrics.auth_failed("unknown_instance_secret");
        warn!(%peer, "control channel with an unknown instance secret refused");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            codes::INVALID_TOKEN,
            "instance secret not recognised; register the agent again",
        ));
    };
    let ws = ws.map_err(|e| {
        ApiError::invalid(format!("expected a WebSocket upgrade: {}", e.body_text()))
    })?;
    let id = inst.id.clone();
    let base = data_base(&shared, &headers);
    Ok(ws
        .max_message_size(super::agents::MAX_AGENT_MESSAGE)
        .max_frame_size(super::agents::MAX_AGENT_MESSAGE)
        .max_write_buffer_size(super::agents::MAX_AGENT_WRITE_BUFFER)
        .on_upgrade(move |socket| super::agents::run_channel(shared, id, base, socket)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_answer_this_host_or_the_token_holder_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (lo, lo6, mapped, far) =
            (ip("127.0.0.9"), ip("::1"), ip("::ffff:127.0.0.1"), ip("10.1.2.3"));
        for peer in [lo, lo6, mapped] {
            assert_eq!(may_scrape(None, peer, None), Ok(()), "{peer}");
        }
        assert_eq!(may_scrape(None, far, None), Err(MetricsRefused::OffHost));
        assert_eq!(may_scrape(None, far, Some("anything")), Err(MetricsRefused::OffHost));
        let t = Some("0123456789abcdef-token");
        for peer in [lo, far] {
            assert_eq!(may_scrape(t, peer, Some("0123456789abcdef-token")), Ok(()), "{peer}");
            // With a token, loopback is not enough.
            assert_eq!(may_scrape(t, peer, None), Err(MetricsRefused::Token), "{peer}");
            assert_eq!(
                may_scrape(t, peer, Some("0123456789abcdef-tokeN")),
                Err(MetricsRefused::Token)
            );
        }
    }

    #[test]
    fn ids_and_bearer() {
        assert!(credentials::valid_id("i-0123456789abcdef", "i-"));
        assert!(!credentials::valid_id("i-0123456789ABCDEF", "i-"));
        assert!(!credentials::valid_id("i-0123456789abcde", "i-"));
        assert!(!credentials::valid_id("s-0123456789abcdef", "i-"));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer  abc "));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        assert_eq!(
            super::super::auth::canonical_ip("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }

    /// A body that stops arriving is refused with 408 at the deadline instead of being waited
    /// for; one that arrives whole is read.
    #[tokio::test]
    async fn trickled_body_is_refused_at_the_deadline() {
        use futures_util::StreamExt;

        let first: Result<Bytes, std::io::Error> = Ok(Bytes::from_static(b"{\"a\":"));
        let stalled = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
        let req = Request::builder()
            .method("POST")
            .uri("/v1/agent/register")
            .body(Body::from_stream(stalled))
            .unwrap();
        let err = read_body(req, &(), Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(err.code, codes::INVALID_REQUEST);

        let req = Request::builder().body(Body::from("{}")).unwrap();
        let body = read_body(req, &(), Duration::from_secs(60)).await.unwrap();
        assert_eq!(&body[..], b"{}");
    }
}
