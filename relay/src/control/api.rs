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
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hatch_proto::api::{
    AccountSettings, AccountSettingsUpdate, InstanceInfo, InstanceList, Mode, ResumeSessionRequest,
    ResumeSessionResponse, SessionInfo, SessionList, StartSessionRequest, StartSessionResponse,
    codes,
};
use hatch_proto::control::{RegisterRequest, RegisterResponse, ToAgent};
use hatch_proto::token::Role;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::access::{self, Grants, ResumeRefused};
use super::policy::{self, Context};
use super::sessions::{Admission, LimitHit};
use super::store::{Account, Instance, RegisterError, SessionRecord, SessionState, StateFilter};
use super::{CLOSE_TERMINATED, Shared, admin, credentials, unix_now};
use crate::token::LegTerms;

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

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, codes::INVALID_REQUEST, message)
    }

    fn denied(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, codes::ACCESS_DENIED, message)
    }

    fn instance_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            codes::INSTANCE_NOT_FOUND,
            format!("instance {id} not found"),
        )
    }

    fn session_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            codes::SESSION_NOT_FOUND,
            format!("session {id} not found"),
        )
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
async fn track(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let rid = format!("req-{}", hex::encode(credentials::random_bytes::<8>()));
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
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
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

fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
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
        .route("/v1/instances", get(list_instances))
        .route("/v1/account/settings", get(get_settings).put(put_settings))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/connect", get(agent_connect))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
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

/// Who is calling.
#[derive(Debug, Clone)]
struct Caller {
    account: Account,
    user_id: Option<String>,
    key_id: String,
    grants: Grants,
    source_ip: IpAddr,
}

impl Caller {
    fn principal(&self) -> &str {
        self.user_id.as_deref().unwrap_or("owner")
    }

    fn is_owner(&self) -> bool {
        self.user_id.is_none()
    }

    /// Whether `action` on `inst` is allowed in `ctx` (the owner may do everything in the
    /// account).
    fn may(&self, action: &str, inst: &Instance, ctx: &Context) -> bool {
        self.grants.may(action, &self.account.id, inst, ctx)
    }

    fn context(&self, inst: &Instance) -> Context {
        Context {
            source_ip: Some(self.source_ip),
            region: Some(inst.region.clone()),
            instance_id: Some(inst.id.clone()),
            run_as: None,
            mode: None,
            remote_host: None,
            remote_port: None,
            tags: inst.tags.clone(),
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The bearer credential of a request, or the 401 that names what was expected (`what`: "access
/// key", "instance secret"), counted as a failed authentication.
fn require_bearer<'h>(
    shared: &Shared,
    headers: &'h HeaderMap,
    what: &str,
) -> Result<&'h str, ApiError> {
    bearer(headers).ok_or_else(|| {
        shared.metrics.auth_failed("missing");
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            codes::INVALID_TOKEN,
            format!("missing Authorization: Bearer <{what}>"),
        )
    })
}

/// IPv4-mapped IPv6 addresses (dual-stack listeners) are policy-checked as IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

async fn authenticate(
    shared: &Shared,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Caller, ApiError> {
    let key = require_bearer(shared, headers, "access key")?;
    let hash = credentials::hash(key);
    let found = shared
        .blocking(move |s| {
            let Some(owner) = s.access_key_owner(&hash)? else { return Ok(None) };
            let Some(account) = s.account(&owner.account_id)? else { return Ok(None) };
            let docs = match &owner.user_id {
                Some(u) => s.user_policies(u)?,
                None => Vec::new(),
            };
            Ok(Some((owner, account, docs)))
        })
        .await?;
    let Some((owner, account, docs)) = found else {
        shared.metrics.auth_failed("unknown_key");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            codes::INVALID_TOKEN,
            "access key not recognised (never issued or revoked)",
        ));
    };
    let grants = match owner.user_id {
        Some(_) => Grants::of_user(&docs),
        None => Grants::owner(),
    };
    Ok(Caller {
        account,
        user_id: owner.user_id,
        key_id: owner.key_id,
        grants,
        source_ip: canonical_ip(peer.ip()),
    })
}

/// A handler taking a [`Caller`] answers only an authenticated request (401 otherwise).
impl FromRequestParts<Arc<Shared>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        let ConnectInfo(peer) = ConnectInfo::<SocketAddr>::from_request_parts(parts, shared)
            .await
            .map_err(|e| ApiError::new(e.status(), codes::INTERNAL_ERROR, e.body_text()))?;
        authenticate(shared, &parts.headers, peer).await
    }
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

fn valid_id(id: &str, prefix: &str) -> bool {
    id.len() == prefix.len() + 16
        && id.starts_with(prefix)
        && id[prefix.len()..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `wss://host:port` for a caller who reached the API with `host_header`.
fn data_base(shared: &Shared, headers: &HeaderMap) -> String {
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

/// Largest exec command: arguments and total bytes.
const MAX_COMMAND_ARGS: usize = 256;
const MAX_COMMAND_BYTES: usize = 16 * 1024;

fn validate_start(req: &StartSessionRequest) -> Result<(), ApiError> {
    if !valid_id(&req.instance_id, "i-") {
        return Err(ApiError::invalid(format!(
            "instance_id {:?} is not i- followed by 16 lowercase hex digits",
            req.instance_id
        )));
    }
    match (&req.mode, &req.command) {
        (Mode::Exec, None) => return Err(ApiError::invalid("mode exec needs a command")),
        (Mode::Exec, Some(c)) if c.is_empty() => {
            return Err(ApiError::invalid("command must not be empty"));
        }
        (Mode::Shell, Some(_)) => {
            return Err(ApiError::invalid("command is only allowed with mode exec"));
        }
        _ => {}
    }
    match (req.mode, req.remote_port) {
        (Mode::Port, None) => return Err(ApiError::invalid("mode port needs remote_port")),
        (Mode::Port, Some(0)) => return Err(ApiError::invalid("remote_port must be 1-65535")),
        (Mode::Port, _) if req.command.is_some() || req.tty.is_some() => {
            return Err(ApiError::invalid("command and tty are not for mode port"));
        }
        (Mode::Shell | Mode::Exec, _) if req.remote_port.is_some() || req.remote_host.is_some() => {
            return Err(ApiError::invalid("remote_host and remote_port are only for mode port"));
        }
        _ => {}
    }
    if let Some(h) = &req.remote_host
        && (h.is_empty()
            || h.len() > 253
            || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b)))
    {
        return Err(ApiError::invalid(
            "remote_host must be a host name or an IP address (1-253 characters)",
        ));
    }
    if req.mode == Mode::Shell && req.tty == Some(false) {
        return Err(ApiError::invalid(
            "a shell session always has a terminal: tty false is only for mode exec",
        ));
    }
    if let Some(c) = &req.command
        && (c.len() > MAX_COMMAND_ARGS
            || c.iter().map(|a| a.len()).sum::<usize>() > MAX_COMMAND_BYTES)
    {
        return Err(ApiError::invalid(format!(
            "command longer than {MAX_COMMAND_ARGS} arguments or {MAX_COMMAND_BYTES} bytes"
        )));
    }
    if let Some(u) = &req.run_as
        && !hatch_proto::api::valid_user_name(u)
    {
        return Err(ApiError::invalid(format!("run_as {u:?} is not a valid user name")));
    }
    if let Some(t) = &req.term
        && (t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(ApiError::invalid("term must be 1-64 printable ASCII characters"));
    }
    Ok(())
}

/// Takes one session start from the caller's access key (`--session-rate`), or answers 429
/// `Throttled` with `Retry-After`.
fn start_rate(shared: &Shared, caller: &Caller) -> Result<(), ApiError> {
    let rate = shared.cfg.limits.start_rate;
    shared.start_rate.take(&caller.key_id, rate, std::time::Instant::now()).map_err(|wait| {
        info!(user = caller.principal(), key = %caller.key_id, "session start rate exceeded");
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            codes::THROTTLED,
            format!(
                "more than {} session starts per second (burst {}) with this access key; retry \
                 in {} s",
                rate.per_sec,
                rate.burst,
                wait.as_secs()
            ),
        );
        e.retry_after = Some(wait.as_secs());
        e
    })
}

/// The 429 for an open-session limit.
fn limit_hit(hit: LimitHit, inst: &Instance) -> ApiError {
    let msg = match hit {
        LimitHit::Instance(n) => format!("{} already has {n} open sessions", inst.id),
        LimitHit::Account(n) => format!("account already has {n} open sessions"),
        LimitHit::User(n) => format!("you already have {n} open sessions"),
    };
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, codes::THROTTLED, msg)
}

/// The 403 of an account whose session-manager switch is off.
fn switch_on(caller: &Caller) -> Result<(), ApiError> {
    if caller.account.session_manager_enabled {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        codes::SESSION_MANAGER_DISABLED,
        format!("session management is switched off for account {}", caller.account.id),
    ))
}

/// `POST /v1/sessions/{id}/resume`: a resume token for a new client leg of the caller's own
/// session, under the same rate, switch and policy as a start ([`access::may_resume`]).
async fn resume_session(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<OptionalJson<ResumeSessionRequest>, ApiError>,
) -> Result<Response, ApiError> {
    // A resume signs a token as a start does: the same per-key rate.
    start_rate(&shared, &caller)?;
    let Path(id) = id.map_err(|e| ApiError::invalid(e.body_text()))?;
    let OptionalJson(req) = body?;
    switch_on(&caller)?;
    if !valid_id(&id, "s-") {
        return Err(ApiError::session_not_found(&id));
    }
    let (rec, inst) = session_and_instance(&shared, &caller, &id).await?;
    let agent = shared.agents.run_as(&rec.instance_id);
    let default_user = agent.as_ref().map(|a| a.default_user.as_str());
    let verdict = access::may_resume(
        caller.principal(),
        &caller.grants,
        caller.source_ip,
        &rec,
        inst.as_ref(),
        default_user,
        req.force,
    );
    if let Err(why) = verdict {
        info!(session = %rec.id, user = caller.principal(), ?why, "session resume refused");
        return Err(match why {
            ResumeRefused::NotFound => ApiError::session_not_found(&id),
            ResumeRefused::Denied => ApiError::denied(match &inst {
                Some(i) => format!(
                    "your policy does not allow {} on {}",
                    access::start_context(&rec, i).0,
                    policy::instance_hrn(&i.region, &i.account_id, &i.id)
                ),
                None => format!("the instance of {id} is no longer registered"),
            }),
            ResumeRefused::Ended => ApiError::new(
                StatusCode::CONFLICT,
                codes::SESSION_ENDED,
                if rec.state == SessionState::Pending {
                    format!("session {id} never connected; start a new session")
                } else {
                    format!("session {id} has ended; start a new session")
                },
            ),
            ResumeRefused::Attached => ApiError::new(
                StatusCode::CONFLICT,
                codes::SESSION_ATTACHED,
                format!("session {id} has a client attached; resume with force to take it over"),
            ),
        });
    }
    let now = u64::try_from(unix_now()).unwrap_or(0);
    let (token, claims) = shared
        .signer
        .issue_with(
            &rec.id,
            Role::Client,
            &rec.instance_id,
            &rec.account_id,
            now,
            LegTerms::of(rec.mode == Mode::Port, caller.account.prefs).resumed(),
        )
        .map_err(ApiError::internal)?;
    shared.metrics.resume_token(true);
    info!(session = %rec.id, instance = %rec.instance_id, user = caller.principal(),
        state = %rec.state, force = req.force, "session resume token issued");
    let base = data_base(&shared, &headers);
    Ok(json(
        StatusCode::OK,
        &ResumeSessionResponse {
            session_id: rec.id.clone(),
            stream_url: format!("{base}/v1/stream/{}?role=client", rec.id),
            token,
            expires_at: rfc3339(claims.exp as i64),
            resume_window_s: Some(shared.cfg.resume_window.as_secs()),
        },
    ))
}

async fn start_session(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<ApiJson<StartSessionRequest>, ApiError>,
) -> Result<Response, ApiError> {
    start_rate(&shared, &caller)?;
    let ApiJson(req) = body?;
    validate_start(&req)?;
    switch_on(&caller)?;
    let account_id = caller.account.id.clone();
    let iid = req.instance_id.clone();
    let inst = shared
        .blocking(move |s| s.instance(&account_id, &iid))
        .await?
        .ok_or_else(|| ApiError::instance_not_found(&req.instance_id))?;
    // The user the session will run as, known before the policy is evaluated: the one asked
    // for, or the default user the agent named in its hello. `hatch:RunAs` is never absent for
    // a session that will run, so a Deny on it cannot be stepped around by naming no user.
    // (An offline agent has no default user here; such a request is refused below either way.)
    let agent = shared.agents.run_as(&inst.id);
    let run_as = req.run_as.clone().or_else(|| agent.as_ref().map(|a| a.default_user.clone()));
    let mut ctx = caller.context(&inst);
    ctx.run_as = run_as.clone();
    ctx.mode = Some(req.mode.as_str().to_owned());
    // A port session is its own action, with the destination as condition keys.
    let remote_host = (req.mode == Mode::Port)
        .then(|| req.remote_host.clone().unwrap_or_else(|| "localhost".to_owned()));
    let action = if req.mode == Mode::Port {
        // No user and no mode for a port forwarding (docs/POLICY.md): nothing runs as anyone.
        ctx.run_as = None;
        ctx.mode = None;
        ctx.remote_host = remote_host.clone();
        ctx.remote_port = req.remote_port;
        policy::START_PORT_FORWARDING
    } else {
        policy::START_SESSION
    };
    if !caller.may(action, &inst, &ctx) {
        info!(user = caller.principal(), instance = %inst.id, action, "start session denied by policy");
        return Err(ApiError::denied(format!(
            "your policy does not allow {action} on {}",
            policy::instance_hrn(&inst.region, &inst.account_id, &inst.id)
        )));
    }
    let Some(run_as) = run_as.filter(|_| agent.is_some()) else {
        let mut e = ApiError::new(
            StatusCode::CONFLICT,
            codes::TARGET_NOT_CONNECTED,
            match inst.last_seen {
                Some(t) => format!(
                    "the agent of {} is not connected; last seen {} ({} s ago)",
                    inst.id,
                    rfc3339(t),
                    (unix_now() - t).max(0)
                ),
                None => format!("the agent of {} has never connected", inst.id),
            },
        );
        e.last_seen = inst.last_seen.map(rfc3339);
        return Err(e);
    };

    let sid = credentials::new_id("s-");
    let deadline = std::time::Instant::now() + shared.cfg.pending_timeout;
    let who =
        Admission { account: &inst.account_id, instance: &inst.id, principal: caller.principal() };
    shared
        .live
        .admit(&sid, who, shared.cfg.limits, deadline)
        .map_err(|hit| limit_hit(hit, &inst))?;

    let now = unix_now();
    let issued = (|| {
        let now = u64::try_from(now).unwrap_or(0);
        // A port session's idle timeout counts both directions (a download is not idle).
        let port = req.mode == Mode::Port;
        let (iid, acct) = (&inst.id, &inst.account_id);
        let terms = LegTerms::of(port, caller.account.prefs);
        let c = shared.signer.issue_with(&sid, Role::Client, iid, acct, now, terms)?;
        let a = shared.signer.issue_with(&sid, Role::Agent, iid, acct, now, terms)?;
        anyhow::Ok((c, a))
    })();
    let ((client_token, claims), (agent_token, _)) = match issued {
        Ok(t) => t,
        Err(e) => {
            shared.live.remove(&sid);
            return Err(ApiError::internal(e));
        }
    };
    let rec = SessionRecord {
        id: sid.clone(),
        account_id: inst.account_id.clone(),
        principal: caller.principal().to_owned(),
        access_key_id: caller.key_id.clone(),
        source_ip: caller.source_ip.to_string(),
        instance_id: inst.id.clone(),
        mode: req.mode,
        command: req.command.clone(),
        run_as: Some(run_as.clone()),
        state: SessionState::Pending,
        created_at: now,
        expires_at: claims.exp as i64,
        connected_at: None,
        closed_at: None,
        close_reason: None,
        bytes_client_to_agent: 0,
        bytes_agent_to_client: 0,
        detached_at: None,
        remote_host: remote_host.clone(),
        remote_port: req.remote_port.filter(|_| req.mode == Mode::Port),
    };
    if let Err(e) = shared.blocking(move |s| s.insert_session(&rec)).await {
        shared.live.remove(&sid);
        return Err(ApiError::internal(e));
    }
    shared.metrics.session_started();
    let base = data_base(&shared, &headers);
    let agent_base = shared.agents.data_base(&inst.id).unwrap_or_else(|| base.clone());
    let open = ToAgent::SessionOpen {
        session_id: sid.clone(),
        stream_url: format!("{agent_base}/v1/stream/{sid}?role=agent"),
        token: agent_token,
        mode: req.mode,
        command: req.command.clone(),
        run_as: Some(run_as.clone()),
        term: req.term.clone(),
        tty: req.tty,
        remote_host,
        remote_port: req.remote_port,
    };
    if let Err(e) = shared.agents.send(&inst.id, open) {
        shared.close(&sid, crate::plane::CloseReason::Error, 0, 0).await;
        let msg = match e {
            super::agents::SendError::Offline => {
                format!("the agent of {} just disconnected", inst.id)
            }
            super::agents::SendError::Backlogged => {
                format!("the agent of {} is not reading its control channel", inst.id)
            }
        };
        return Err(ApiError::new(StatusCode::CONFLICT, codes::TARGET_NOT_CONNECTED, msg));
    }
    info!(session = %sid, instance = %inst.id, user = caller.principal(), "session started");
    Ok(json(
        StatusCode::CREATED,
        &StartSessionResponse {
            session_id: sid.clone(),
            stream_url: format!("{base}/v1/stream/{sid}?role=client"),
            token: client_token,
            expires_at: rfc3339(claims.exp as i64),
            resume_window_s: Some(shared.cfg.resume_window.as_secs()),
        },
    ))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
    next_token: Option<String>,
}

/// Most sessions in one page.
const MAX_PAGE: u32 = 1000;
/// Page size when none is asked for.
const DEFAULT_PAGE: u32 = 100;

async fn list_sessions(
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
    if let Some(t) = &q.next_token
        && !valid_id(t, "s-")
    {
        return Err(ApiError::invalid("next_token is not one this API gave out"));
    }
    let account = caller.account.id.clone();
    let before = q.next_token.clone();
    let need_instances = !caller.is_owner();
    let (rows, instances) = shared
        .blocking(move |s| {
            let rows = s.sessions(Some(&account), filter, limit, before.as_deref())?;
            let inst = if need_instances { s.instances(Some(&account))? } else { Vec::new() };
            Ok((rows, inst))
        })
        .await?;
    let next_token = (rows.len() == limit as usize).then(|| rows[rows.len() - 1].id.clone());
    let sessions = rows
        .iter()
        .filter(|s| visible(&caller, s, &instances, policy::DESCRIBE_SESSIONS))
        .map(session_info)
        .collect();
    Ok(json(StatusCode::OK, &SessionList { sessions, next_token }))
}

/// Whether a user may see (or act on) a session: their own, or allowed by policy on its
/// instance.
fn visible(caller: &Caller, s: &SessionRecord, instances: &[Instance], action: &str) -> bool {
    if caller.is_owner() || caller.user_id.as_deref() == Some(s.principal.as_str()) {
        return true;
    }
    instances.iter().find(|i| i.id == s.instance_id).is_some_and(|i| {
        let ctx = caller.context(i);
        caller.may(action, i, &ctx)
    })
}

/// The caller's account's session `id` and its instance (`None` when the instance is gone);
/// `SessionNotFound` when the account has no such session.
async fn session_and_instance(
    shared: &Shared,
    caller: &Caller,
    id: &str,
) -> Result<(SessionRecord, Option<Instance>), ApiError> {
    let account = caller.account.id.clone();
    let sid = id.to_owned();
    let (rec, inst) = shared
        .blocking(move |s| {
            let Some(rec) = s.session(Some(&account), &sid)? else { return Ok((None, None)) };
            let inst = s.instance(&account, &rec.instance_id)?;
            Ok((Some(rec), inst))
        })
        .await?;
    Ok((rec.ok_or_else(|| ApiError::session_not_found(id))?, inst))
}

async fn load_session(
    shared: &Shared,
    caller: &Caller,
    id: Result<Path<String>, PathRejection>,
    action: &str,
) -> Result<SessionRecord, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid(e.body_text()))?;
    if !valid_id(&id, "s-") {
        return Err(ApiError::session_not_found(&id));
    }
    let (rec, inst) = session_and_instance(shared, caller, &id).await?;
    let instances: Vec<Instance> = inst.into_iter().collect();
    if !visible(caller, &rec, &instances, action) {
        // Sessions a user may not describe are not shown to exist.
        if action == policy::DESCRIBE_SESSIONS {
            return Err(ApiError::session_not_found(&id));
        }
        return Err(ApiError::denied(format!("your policy does not allow {action} on {id}")));
    }
    Ok(rec)
}

async fn describe_session(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let rec = load_session(&shared, &caller, id, policy::DESCRIBE_SESSIONS).await?;
    Ok(json(StatusCode::OK, &session_info(&rec)))
}

async fn terminate_session(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let rec = load_session(&shared, &caller, id, policy::TERMINATE_SESSION).await?;
    if rec.state.is_open() {
        info!(session = %rec.id, user = caller.principal(), "session terminated");
        shared
            .end_session(
                &rec.id,
                &rec.instance_id,
                CLOSE_TERMINATED,
                crate::plane::CloseReason::Terminated,
                "terminated",
            )
            .await;
    }
    let id = rec.id.clone();
    let account = caller.account.id.clone();
    let rec = shared.blocking(move |s| s.session(Some(&account), &id)).await?.unwrap_or(rec);
    Ok(json(StatusCode::OK, &session_info(&rec)))
}

async fn list_instances(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let account = caller.account.id.clone();
    let all = shared.blocking(move |s| s.instances(Some(&account))).await?;
    let now = unix_now();
    let instances = all
        .iter()
        .filter(|i| caller.may(policy::DESCRIBE_INSTANCES, i, &caller.context(i)))
        .map(|i| {
            let online = shared.agents.is_online(&i.id);
            InstanceInfo {
                instance_id: i.id.clone(),
                region: i.region.clone(),
                hostname: i.hostname.clone(),
                tags: i.tags.clone(),
                online,
                last_seen: if online { Some(rfc3339(now)) } else { i.last_seen.map(rfc3339) },
            }
        })
        .collect();
    Ok(json(StatusCode::OK, &InstanceList { instances }))
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
    let mut account = caller.account.clone();
    account.prefs = admin::updated_prefs(account.prefs, &update).map_err(ApiError::invalid)?;
    let (id, prefs) = (account.id.clone(), account.prefs);
    shared.blocking(move |s| s.set_session_prefs(&id, prefs)).await?;
    if let Some(enabled) = update.session_manager_enabled {
        let id = account.id.clone();
        shared.blocking(move |s| s.set_session_manager(&id, enabled)).await?;
        account.session_manager_enabled = enabled;
        info!(account = %account.id, enabled, "session manager switch set");
        if !enabled {
            shared.disable_account(&account.id).await;
        }
    }
    info!(account = %account.id, idle_timeout_s = ?prefs.idle_timeout_s,
        max_duration_s = ?prefs.max_duration_s, "session preferences set");
    Ok(json(StatusCode::OK, &settings_of(&account)))
}

async fn register(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Result<ApiJson<RegisterRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = body?;
    if req.activation_id.len() > 64 || req.activation_code.len() > 256 {
        return Err(ApiError::invalid("activation id or code too long"));
    }
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
        assert!(valid_id("i-0123456789abcdef", "i-"));
        assert!(!valid_id("i-0123456789ABCDEF", "i-"));
        assert!(!valid_id("i-0123456789abcde", "i-"));
        assert!(!valid_id("s-0123456789abcdef", "i-"));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer  abc "));
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
        assert_eq!(
            canonical_ip("::ffff:10.1.2.3".parse().unwrap()),
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
