//! The browser console over HTTP: its page and assets (embedded in the binary), the login,
//! the cookie layer in front of the API routes it reuses, and `POST /v1/console/links`.
//!
//! ```text
//!  GET /console/            page, console.js, console.css, vendor/xterm.* (CSP on each)
//!  POST /console/api/login  {access_key}  ─ Origin ─▶ Shared::console_login ─▶ Set-Cookie
//!  POST /console/api/link   {code}        ─ Origin ─▶ Shared::console_link_login ─▶ Set-Cookie
//!  /console/api/{instances,sessions,...}  ─ cookie_layer (cookie, and on writes Origin + CSRF)
//!                                           ─▶ the API's own handlers (api.rs), which
//!                                              authenticate the key behind the cookie
//!  POST /v1/console/links   bearer key ─▶ Shared::console_new_link ─▶ {url, expires_at}
//! ```
//!
//! No business logic here: the sessions and instances routes are the API's handlers
//! (`api::start_session`, ...) behind [`cookie_layer`], and the login operations are in
//! [`super::console`]. The cookie authenticates nothing outside `/console/api/`: only
//! [`cookie_layer`] turns it into a [`ConsoleAuth`], and only on these routes.
//!
//! Why the Content-Security-Policy allows inline *styles* (`style-src 'unsafe-inline'`) but no
//! inline script: xterm.js's DOM renderer sizes and colours the terminal by writing `<style>`
//! elements at run time. Script stays `'self'` only; the page builds its DOM with
//! `textContent`, never from markup, so there is no place to inject a style either.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hatch_proto::api::{ConsoleLinkRequest, ConsoleLinkResponse, codes};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::api::{self, ApiError, ApiJson, OptionalJson, json};
use super::auth::{Caller, ConsoleAuth};
use super::console::{Opened, SESSION_LIFETIME_S};
use super::{Shared, rfc3339};

/// The console's page (no inline script: it loads `console.js`).
const INDEX_HTML: &str = include_str!("../../console/index.html");
/// The console's own script.
const CONSOLE_JS: &str = include_str!("../../console/console.js");
/// The console's own styles.
const CONSOLE_CSS: &str = include_str!("../../console/console.css");
/// xterm.js, vendored (relay/console/vendor/README.md).
const XTERM_JS: &[u8] = include_bytes!("../../console/vendor/xterm.js");
/// xterm.js's styles.
const XTERM_CSS: &[u8] = include_bytes!("../../console/vendor/xterm.css");
/// xterm.js's fit addon.
const ADDON_FIT_JS: &[u8] = include_bytes!("../../console/vendor/addon-fit.js");

/// The console session's cookie. `__Host-`: the browser keeps it only when it is `Secure`,
/// has `Path=/` and no `Domain`, so no other host (a sibling subdomain) can set or shadow it.
pub const COOKIE: &str = "__Host-hatch_console";
/// The header a console write carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-hatch-csrf";

/// The console's routes (merged into the API's router).
pub(crate) fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    let behind_cookie = Router::new()
        .route("/console/api/instances", get(api::list_instances))
        .route("/console/api/sessions", get(api::list_sessions).post(api::start_session))
        .route(
            "/console/api/sessions/{id}",
            get(api::describe_session).delete(api::terminate_session),
        )
        .route("/console/api/me", get(me))
        .route("/console/api/logout", post(logout))
        .route_layer(middleware::from_fn_with_state(shared.clone(), cookie_layer));
    let console = Router::new()
        .route("/console", get(to_page))
        .route("/console/", get(page))
        .route("/console/{file}", get(asset))
        .route("/console/vendor/{file}", get(vendor))
        .route("/console/api/login", post(login))
        .route("/console/api/link", post(link_login))
        .route("/console/api/close-codes", get(close_codes))
        .merge(behind_cookie)
        .layer(middleware::from_fn_with_state(shared, protect));
    Router::new().route("/v1/console/links", post(new_link)).merge(console)
}

/// The Content-Security-Policy of the console: scripts, styles, fonts and images from the
/// relay's API origin only, connections to it and to the data plane (`data_base`: the host
/// the browser used, the data plane's port, or `--public-data-url`). In a fleet a session may
/// be placed on another node, whose data plane has another origin: the scheme is allowed
/// there.
fn csp(shared: &Shared, headers: &HeaderMap) -> String {
    let data = api::data_base(shared, headers);
    let fleet = if shared.fleet { format!(" {}:", shared.cfg.data_scheme) } else { String::new() };
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
         img-src 'self'; font-src 'self'; connect-src 'self' {data}{fleet}; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
}

/// Headers on every console answer: the CSP, no sniffing, no framing, no referrer, and no
/// caching of API answers (they carry the CSRF token and session lists).
async fn protect(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let policy = csp(&shared, req.headers());
    let api = req.uri().path().starts_with("/console/api/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&policy) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    let cache = if api { "no-store" } else { "no-cache" };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    resp
}

async fn to_page() -> Response {
    (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "/console/")]).into_response()
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML).into_response()
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, "no such path")
}

async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (kind, body) = match file.as_str() {
        "console.js" => ("text/javascript; charset=utf-8", CONSOLE_JS),
        "console.css" => ("text/css; charset=utf-8", CONSOLE_CSS),
        _ => return Err(not_found()),
    };
    Ok(([(header::CONTENT_TYPE, kind)], body).into_response())
}

async fn vendor(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (kind, body) = match file.as_str() {
        "xterm.js" => ("text/javascript; charset=utf-8", XTERM_JS),
        "xterm.css" => ("text/css; charset=utf-8", XTERM_CSS),
        "addon-fit.js" => ("text/javascript; charset=utf-8", ADDON_FIT_JS),
        _ => return Err(not_found()),
    };
    Ok(([(header::CONTENT_TYPE, kind)], body).into_response())
}

/// `GET /console/api/close-codes`: the words of every close code a leg can end with
/// (`hatch_proto::close::describe`), so the page says what the CLI says.
async fn close_codes() -> Response {
    let words: serde_json::Map<String, serde_json::Value> = (1000..=1015)
        .chain(4000..=4099)
        .map(|c| (c, hatch_proto::close::describe(c)))
        .filter(|(_, w)| *w != hatch_proto::close::describe(0))
        .map(|(c, w)| (c.to_string(), w.into()))
        .collect();
    json(StatusCode::OK, &words)
}

/// The origins a console request may come from: the API as the browser reached it (the
/// scheme of this node's API and the `Host` header) and `--public-api-url`.
fn own_origins(shared: &Shared, headers: &HeaderMap) -> Vec<String> {
    let mut out = Vec::with_capacity(2);
    let scheme = if shared.cfg.node.api_url.starts_with("http://") { "http" } else { "https" };
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
        out.push(format!("{scheme}://{host}"));
    }
    if let Some(u) = &shared.cfg.public_api_url {
        out.push(origin_of(u));
    }
    out
}

/// `scheme://host[:port]` of a URL (what a browser sends as `Origin`).
pub(crate) fn origin_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    format!("{}://{}", scheme.to_ascii_lowercase(), authority.to_ascii_lowercase())
}

/// Why a console request that changes something is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteRefused {
    /// No `Origin` header: every browser sends one on a `POST` or `DELETE` from a page.
    NoOrigin,
    /// An `Origin` that is not the console's: a page of another site.
    ForeignOrigin,
    /// No CSRF token, or not this console session's.
    Csrf,
}

impl From<WriteRefused> for ApiError {
    fn from(r: WriteRefused) -> ApiError {
        let (code, message) = match r {
            WriteRefused::NoOrigin => {
                (codes::ORIGIN_NOT_ALLOWED, "a console write must carry the page's Origin")
            }
            WriteRefused::ForeignOrigin => (
                codes::ORIGIN_NOT_ALLOWED,
                "this request comes from a page of another origin than the console",
            ),
            WriteRefused::Csrf => (
                codes::CSRF_TOKEN_MISMATCH,
                "missing or wrong x-hatch-csrf token for this console session: reload the page",
            ),
        };
        ApiError::new(StatusCode::FORBIDDEN, code, message)
    }
}

/// The `Origin` check of every console write (and of the logins): exactly one of `own`.
fn check_origin(origin: Option<&str>, own: &[String]) -> Result<(), WriteRefused> {
    let origin = origin.ok_or(WriteRefused::NoOrigin)?;
    // Scheme and host are case-insensitive (RFC 6454 serialises them in lower case).
    if own.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
        Ok(())
    } else {
        Err(WriteRefused::ForeignOrigin)
    }
}

/// The CSRF check of a console write: the header equals the session's token (compared without
/// an early exit).
fn check_csrf(header: Option<&str>, csrf: &str) -> Result<(), WriteRefused> {
    let h = header.ok_or(WriteRefused::Csrf)?;
    if super::credentials::hashes_equal(h.as_bytes(), csrf.as_bytes()) {
        Ok(())
    } else {
        Err(WriteRefused::Csrf)
    }
}

fn header_str(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The value of the console's cookie in a request's `Cookie` headers.
fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

fn set_cookie(value: &str, max_age: i64) -> HeaderValue {
    let c =
        format!("{COOKIE}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Strict");
    // Invariant: the value is base64url (or empty) and the rest is ASCII.
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// In front of the API routes the console reuses: a live console session's cookie (401
/// `InvalidToken` without one), and on a write its Origin and CSRF token (403); then the
/// request goes on with a [`ConsoleAuth`] for [`Caller`] to authenticate.
async fn cookie_layer(
    State(shared): State<Arc<Shared>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let found = cookie_value(req.headers()).and_then(|c| shared.console_session(c));
    let Some((cookie, session)) = found else {
        shared.metrics.auth_failed("console_cookie");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            codes::INVALID_TOKEN,
            "not logged in to the console (no console session cookie, or it expired)",
        ));
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let h = req.headers();
        let refused = check_origin(header_str(h, header::ORIGIN), &own_origins(&shared, h))
            .and_then(|()| check_csrf(header_str(h, CSRF_HEADER), &session.csrf));
        if let Err(r) = refused {
            let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
            info!(?peer, reason = ?r, method = %req.method(), path = req.uri().path(),
                "console write refused");
            return Err(r.into());
        }
    }
    req.extensions_mut().insert(ConsoleAuth {
        cookie,
        key_hash: session.key_hash,
        csrf: session.csrf,
        expires_at: session.expires_at,
    });
    Ok(next.run(req).await)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    access_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkLoginRequest {
    code: String,
}

/// What a login (and `GET /console/api/me`) answers: who, the CSRF token for writes, until
/// when; after a link, the instance it names.
#[derive(Debug, Serialize)]
struct LoginInfo {
    principal: String,
    account_id: String,
    csrf: String,
    expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    instance_id: Option<String>,
}

/// The Origin check of a login: there is no session (and no CSRF token) yet, but a page of
/// another site must not log the browser in either (login CSRF).
fn login_origin(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    check_origin(header_str(headers, header::ORIGIN), &own_origins(shared, headers))
        .map_err(ApiError::from)
}

fn logged_in(o: Opened, instance_id: Option<String>) -> Response {
    let info = LoginInfo {
        principal: o.caller.principal().to_owned(),
        account_id: o.caller.account.id.clone(),
        csrf: o.session.csrf,
        expires_at: rfc3339(o.session.expires_at),
        instance_id,
    };
    let mut resp = json(StatusCode::OK, &info);
    resp.headers_mut().insert(header::SET_COOKIE, set_cookie(&o.cookie, SESSION_LIFETIME_S));
    resp
}

/// `POST /console/api/login`: an access key in the body (never in a URL), a cookie back.
async fn login(
    State(shared): State<Arc<Shared>>,
    axum::Extension(slot): axum::Extension<super::audit::Slot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<ApiJson<LoginRequest>, ApiError>,
) -> Result<Response, ApiError> {
    login_origin(&shared, &headers)?;
    let ApiJson(req) = body?;
    let opened = shared.console_login(req.access_key.trim(), peer).await?;
    slot.who(opened.caller.audit_who());
    Ok(logged_in(opened, None))
}

/// `POST /console/api/link`: a login link's code (the page takes it from the URL's fragment,
/// which no request carries), a cookie back; the link is spent.
async fn link_login(
    State(shared): State<Arc<Shared>>,
    axum::Extension(slot): axum::Extension<super::audit::Slot>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Result<ApiJson<LinkLoginRequest>, ApiError>,
) -> Result<Response, ApiError> {
    login_origin(&shared, &headers)?;
    let ApiJson(req) = body?;
    let (opened, instance) = shared.console_link_login(req.code.trim(), peer).await?;
    slot.who(opened.caller.audit_who());
    Ok(logged_in(opened, instance))
}

/// `GET /console/api/me`: who the console session is, and its CSRF token (after a reload the
/// page knows only the cookie, which it cannot read).
async fn me(caller: Caller, auth: axum::Extension<ConsoleAuth>) -> Result<Response, ApiError> {
    let info = LoginInfo {
        principal: caller.principal().to_owned(),
        account_id: caller.account.id.clone(),
        csrf: auth.0.csrf,
        expires_at: rfc3339(auth.0.expires_at),
        instance_id: None,
    };
    Ok(json(StatusCode::OK, &info))
}

/// `POST /console/api/logout`: the console session ends here and the cookie is cleared.
async fn logout(State(shared): State<Arc<Shared>>, auth: axum::Extension<ConsoleAuth>) -> Response {
    shared.console_logout(&auth.0.cookie);
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut().insert(header::SET_COOKIE, set_cookie("", 0));
    resp
}

/// `POST /v1/console/links` (bearer access key): a one-time, short-lived login link for the
/// caller, with an instance whose terminal it opens.
async fn new_link(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<OptionalJson<ConsoleLinkRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let OptionalJson(req) = body?;
    let made = shared.console_new_link(&caller, req.instance_id).await?;
    let base = match &shared.cfg.public_api_url {
        Some(u) => origin_of(u),
        None => own_origins(&shared, &headers)
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::invalid("no Host header: cannot say where the console is"))?,
    };
    Ok(json(
        StatusCode::CREATED,
        &ConsoleLinkResponse {
            url: format!("{base}/console/#link={}", made.code),
            expires_at: rfc3339(made.link.expires_at),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_need_the_consoles_origin_and_the_sessions_token() {
        let own = vec!["https://relay.example:7444".to_owned()];
        assert_eq!(check_origin(Some("https://relay.example:7444"), &own), Ok(()));
        assert_eq!(check_origin(Some("HTTPS://Relay.Example:7444"), &own), Ok(()));
        for foreign in [
            "https://evil.example",
            "https://relay.example:7443",
            "http://relay.example:7444",
            "https://relay.example:7444.evil.example",
            "null",
            "",
        ] {
            assert_eq!(check_origin(Some(foreign), &own), Err(WriteRefused::ForeignOrigin));
        }
        assert_eq!(check_origin(None, &own), Err(WriteRefused::NoOrigin));
        assert_eq!(check_csrf(Some("abc"), "abc"), Ok(()));
        assert_eq!(check_csrf(Some("abd"), "abc"), Err(WriteRefused::Csrf));
        assert_eq!(check_csrf(Some("ab"), "abc"), Err(WriteRefused::Csrf));
        assert_eq!(check_csrf(None, "abc"), Err(WriteRefused::Csrf));
    }

    #[test]
    fn the_cookie_is_found_among_others_and_set_with_every_attribute() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; __Host-hatch_console=v1"));
        assert_eq!(cookie_value(&h), Some("v1"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("x=2"));
        h.append(header::COOKIE, HeaderValue::from_static("__Host-hatch_console= v2 ; y=3"));
        assert_eq!(cookie_value(&h), Some("v2"));
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("hatch_console=v3; __Host-hatch_console="),
        );
        assert_eq!(cookie_value(&h), None);
        assert_eq!(
            set_cookie("v", 28800).to_str().unwrap(),
            "__Host-hatch_console=v; Path=/; Max-Age=28800; Secure; HttpOnly; SameSite=Strict"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_cookie_and_origin_headers_are_read_without_panic(
            cookies in proptest::collection::vec("[ -~]{0,80}", 0..4),
            url in "\\PC{0,60}",
        ) {
            let mut h = HeaderMap::new();
            for c in &cookies {
                if let Ok(v) = HeaderValue::from_str(c) {
                    h.append(header::COOKIE, v);
                }
            }
            if let Some(v) = cookie_value(&h) {
                proptest::prop_assert!(!v.is_empty());
            }
            let _ = origin_of(&url);
            let _ = check_origin(Some(&url), &[origin_of(&url)]);
        }
    }

    #[test]
    fn origins_of_urls() {
        assert_eq!(origin_of("https://Relay.example:7444/x?y"), "https://relay.example:7444");
        assert_eq!(origin_of("http://[::1]:7444"), "http://[::1]:7444");
        assert_eq!(origin_of("relay.example"), "https://relay.example");
    }

    #[test]
    fn the_embedded_files_are_the_vendored_ones_the_readme_lists() {
        let readme = include_str!("../../console/vendor/README.md");
        for (name, bytes) in
            [("xterm.js", XTERM_JS), ("xterm.css", XTERM_CSS), ("addon-fit.js", ADDON_FIT_JS)]
        {
            let sum = hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes));
            assert!(readme.contains(&format!("{sum}  {name}")), "{name}: {sum} not in README.md");
        }
        assert!(readme.contains("| `@xterm/xterm` | 6.0.0 |"));
        assert!(readme.contains("| `@xterm/addon-fit` | 0.11.0 |"));
        // The page loads only its own files: no inline script, no script from elsewhere.
        assert_eq!(INDEX_HTML.matches("<script").count(), 3);
        assert_eq!(INDEX_HTML.matches("<script src=\"/console/").count(), 3);
        // No inline event handler attribute (` onclick=`, ...).
        let handler = INDEX_HTML.split(" on").skip(1).any(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
            rest[name.len()..].starts_with('=')
        });
        assert!(!handler, "an inline event handler in index.html");
    }

    #[test]
    fn close_codes_have_the_clis_words() {
        let text = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
            axum::body::to_bytes(close_codes().await.into_body(), 1 << 16).await
        });
        let v: serde_json::Value = serde_json::from_slice(&text.unwrap()).unwrap();
        assert_eq!(v["1000"], "session ended");
        assert_eq!(v["4006"], "terminated through the API");
        assert!(v.get("1006").is_none(), "1006 never travels; the page names it itself");
    }
}
