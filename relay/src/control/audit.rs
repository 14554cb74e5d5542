//! The audit log: one JSON line for every API request that changes something (every method
//! but `GET` and `HEAD`) and every refused one, with who, from where, what, on what and how
//! it ended.
//!
//! ```text
//!  request ─▶ track: Slot in the extensions ─▶ Caller extractor notes who ─▶ handler
//!                                                  (start_session notes its target)
//!  response ─▶ track: Event { time, request id, account, caller, key, source IP, action,
//!              target, outcome, status, code, message } ─▶ store (GET /v1/audit, any node;
//!                                                       │  events with an account only)
//!                                                       └▶ DATA_DIR/audit.log (JSON lines)
//! ```
//!
//! The rules:
//!
//! - **One place writes.** The API's `track` middleware turns the answer into an [`Event`]
//!   after the handler ran, whatever it did; handlers do not write audit lines. The action is
//!   the route's ([`action_of`], one table), the outcome the status's ([`Outcome::of`]), the
//!   message the error's (for a refusal by policy it names the action and the resource the
//!   policy did not allow).
//! - **Written before the answer leaves**: a caller who saw a success can find it in the log.
//!   A failed write is logged; the request's effect has happened and is not undone.
//! - **Peer text is bounded**: paths and messages are cut to [`MAX_TEXT`] characters, and the
//!   JSON encoding escapes control characters, so a hostile request cannot make a line
//!   unbounded or split it.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// The audit log's file name in the data directory.
pub const FILE: &str = "audit.log";

/// Longest path, target or message kept in an event, in characters.
pub const MAX_TEXT: usize = 300;

/// Who made a request, as the `Caller` extractor authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    /// The caller's account.
    pub account: String,
    /// `owner` or the user id.
    pub principal: String,
    /// The access key used.
    pub key_id: String,
}

/// What a request's handlers noted for its audit line, shared by the middleware (which puts
/// it in the request's extensions) and the extractors and handlers (which fill it).
#[derive(Debug, Clone, Default)]
pub struct Slot(Arc<Mutex<Noted>>);

#[derive(Debug, Default)]
struct Noted {
    who: Option<Who>,
    /// The account of an unauthenticated request that named one (an agent's registration).
    account: Option<String>,
    target: Option<String>,
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Noted> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The authenticated caller.
    pub fn who(&self, who: Who) {
        self.lock().who = Some(who);
    }

    /// The request's target, when the path does not name it (a session start: its instance).
    pub fn target(&self, target: &str) {
        self.lock().target = Some(bounded(target));
    }

    /// The account a request without a caller acted in (an agent registration's).
    pub fn account(&self, account: &str) {
        self.lock().account = Some(account.to_owned());
    }
}

/// How a request ended, for the audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A 2xx answer.
    Succeeded,
    /// 403: refused by policy, the account switch or ownership.
    Denied,
    /// 401: no valid credentials.
    Unauthenticated,
    /// Any other answer.
    Failed,
}

impl Outcome {
    /// The outcome of an answer with `status`.
    pub fn of(status: StatusCode) -> Outcome {
        match status {
            s if s.is_success() => Outcome::Succeeded,
            StatusCode::FORBIDDEN => Outcome::Denied,
            StatusCode::UNAUTHORIZED => Outcome::Unauthenticated,
            _ => Outcome::Failed,
        }
    }
}

/// One audit line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When the answer left, RFC 3339 (UTC).
    pub time: String,
    /// The answer's `x-request-id`.
    pub request_id: String,
    /// The caller's account (or the account an agent registered in); `null` when unknown.
    pub account: Option<String>,
    /// `owner` or the user id; `null` for an unauthenticated request.
    pub caller: Option<String>,
    /// The access key used.
    pub access_key_id: Option<String>,
    /// The peer's address.
    pub source_ip: String,
    /// `hatch:StartSession`, ... ([`action_of`]); `unknown` for a path the API does not have.
    pub action: String,
    /// What it acted on: the session, user, key, policy, instance or activation the path
    /// names, or what the handler noted (a start: the instance).
    pub target: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// The HTTP status.
    pub status: u16,
    /// The answer's code (`OK` or the error code).
    pub code: String,
    /// The error's message (for a policy refusal: the action and resource not allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A request as the middleware saw it, before the handler ran.
#[derive(Debug, Clone)]
pub struct Request {
    /// Its method.
    pub method: Method,
    /// Its route template (`/v1/sessions/{id}`), when it matched one.
    pub route: Option<String>,
    /// Its path.
    pub path: String,
    /// The peer's address.
    pub source_ip: String,
}

/// Whether a request gets an audit line: every one that may change something, and every
/// read refused by policy.
pub fn audited(method: &Method, status: StatusCode) -> bool {
    !(method == Method::GET || method == Method::HEAD) || status == StatusCode::FORBIDDEN
}

/// The audit action of a route: the policy action it is evaluated as, or for the requests
/// no policy governs, a name in the same style.
pub fn action_of(method: &Method, route: Option<&str>) -> &'static str {
    let Some(route) = route else { return "unknown" };
    match (method.as_str(), route) {
        ("POST", "/v1/sessions") => "hatch:StartSession",
        ("GET", "/v1/sessions") | ("GET", "/v1/sessions/{id}") => "hatch:DescribeSessions",
        ("DELETE", "/v1/sessions/{id}") => "hatch:TerminateSession",
        ("POST", "/v1/sessions/{id}/resume") => "hatch:ResumeSession",
        ("GET", "/v1/sessions/{id}/recording") => "hatch:GetSessionRecording",
        ("GET", "/v1/instances") => "hatch:DescribeInstances",
        ("GET", "/v1/account/settings") => "hatch:GetAccountSettings",
        ("PUT", "/v1/account/settings") => "hatch:UpdateAccountSettings",
        ("POST", "/v1/agent/register") => "hatch:RegisterInstance",
        ("GET", "/v1/audit") => "hatch:ReadAudit",
        ("GET", "/v1/users") => "hatch:ListUsers",
        ("POST", "/v1/users") => "hatch:CreateUser",
        ("DELETE", "/v1/users/{name}") => "hatch:DeleteUser",
        ("PUT", "/v1/users/{name}/policies/{policy}") => "hatch:AttachUserPolicy",
        ("DELETE", "/v1/users/{name}/policies/{policy}") => "hatch:DetachUserPolicy",
        ("GET", "/v1/access-keys") => "hatch:ListAccessKeys",
        ("POST", "/v1/access-keys") => "hatch:CreateAccessKey",
        ("DELETE", "/v1/access-keys/{id}") => "hatch:DeleteAccessKey",
        ("GET", "/v1/policies") => "hatch:ListPolicies",
        ("PUT", "/v1/policies/{name}") => "hatch:PutPolicy",
        ("DELETE", "/v1/policies/{name}") => "hatch:DeletePolicy",
        ("PUT", "/v1/instances/{id}/tags") => "hatch:TagInstance",
        ("DELETE", "/v1/instances/{id}") => "hatch:DeregisterInstance",
        ("POST", "/v1/instances/{id}/revoke-secret") => "hatch:RevokeInstanceSecret",
        ("GET", "/v1/activations") => "hatch:ListActivations",
        ("POST", "/v1/activations") => "hatch:CreateActivation",
        ("DELETE", "/v1/activations/{id}") => "hatch:DeleteActivation",
        ("POST", "/v1/console/links") => "hatch:CreateConsoleLink",
        // The browser console: its own logins, and the API's handlers behind its cookie.
        ("POST", "/console/api/login") => "hatch:ConsoleLogin",
        ("POST", "/console/api/link") => "hatch:ConsoleLinkLogin",
        ("POST", "/console/api/logout") => "hatch:ConsoleLogout",
        ("POST", "/console/api/sessions") => "hatch:StartSession",
        ("DELETE", "/console/api/sessions/{id}") => "hatch:TerminateSession",
        ("GET", "/console/api/sessions") | ("GET", "/console/api/sessions/{id}") => {
            "hatch:DescribeSessions"
        }
        ("GET", "/console/api/instances") => "hatch:DescribeInstances",
        _ => "unknown",
    }
}

/// The target a path names: the path after the collection (`/v1/sessions/s-1/resume` →
/// `s-1`, `/v1/users/alice/policies/ops` → `alice/policies/ops`), none for a route with no
/// parameter (a collection, the account's settings).
fn target_of(path: &str, route: Option<&str>) -> Option<String> {
    if !route?.contains('{') {
        return None;
    }
    let rest = path.strip_prefix("/v1/").or(path.strip_prefix("/console/api/"))?;
    let (_, tail) = rest.split_once('/')?;
    let tail = ["/resume", "/revoke-secret", "/recording", "/tags"]
        .iter()
        .find_map(|s| tail.strip_suffix(s))
        .unwrap_or(tail);
    (!tail.is_empty()).then(|| bounded(tail))
}

/// `s` cut to [`MAX_TEXT`] characters (`…` when cut). Control characters are escaped by the
/// JSON encoding of the line.
fn bounded(s: &str) -> String {
    match s.char_indices().nth(MAX_TEXT) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// The event of a request that ended with `status` and `code` (and `message` on an error).
#[allow(clippy::too_many_arguments)]
pub fn event(
    req: &Request,
    slot: &Slot,
    request_id: &str,
    time: String,
    status: StatusCode,
    code: &str,
    message: Option<&str>,
) -> Event {
    let noted = slot.lock();
    let who = noted.who.as_ref();
    Event {
        time,
        request_id: request_id.to_owned(),
        account: who.map(|w| w.account.clone()).or_else(|| noted.account.clone()),
        caller: who.map(|w| w.principal.clone()),
        access_key_id: who.map(|w| w.key_id.clone()),
        source_ip: req.source_ip.clone(),
        action: action_of(&req.method, req.route.as_deref()).to_owned(),
        target: noted.target.clone().or_else(|| match req.route {
            Some(_) => target_of(&req.path, req.route.as_deref()),
            None => Some(bounded(&req.path)),
        }),
        outcome: Outcome::of(status),
        status: status.as_u16(),
        code: code.to_owned(),
        message: message.map(bounded),
    }
}

/// The audit file: JSON lines appended, one `write` each (`O_APPEND`), so lines of several
/// writers never interleave.
pub struct AuditFile {
    file: Mutex<std::fs::File>,
}

impl AuditFile {
    /// Opens (creating, mode 0600) `path` for appending.
    pub fn open(path: &Path) -> anyhow::Result<AuditFile> {
        use anyhow::Context;
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("opening the audit log {}", path.display()))?;
        Ok(AuditFile { file: Mutex::new(file) })
    }

    /// Appends `line` and a newline in one write.
    pub fn append(&self, line: &str) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.lock().unwrap_or_else(|p| p.into_inner()).write_all(&buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: Method, route: Option<&str>, path: &str) -> Request {
        Request {
            method,
            route: route.map(str::to_owned),
            path: path.into(),
            source_ip: "127.0.0.1".into(),
        }
    }

    #[test]
    fn reads_are_audited_only_when_refused() {
        assert!(!audited(&Method::GET, StatusCode::OK));
        assert!(!audited(&Method::GET, StatusCode::NOT_FOUND));
        assert!(audited(&Method::GET, StatusCode::FORBIDDEN));
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert!(audited(&m, StatusCode::OK), "{m}");
            assert!(audited(&m, StatusCode::UNAUTHORIZED), "{m}");
        }
    }

    #[test]
    fn routes_name_their_action_and_target() {
        let cases = [
            (Method::POST, "/v1/sessions", "/v1/sessions", "hatch:StartSession", None),
            (
                Method::DELETE,
                "/v1/sessions/{id}",
                "/v1/sessions/s-1",
                "hatch:TerminateSession",
                Some("s-1"),
            ),
            (
                Method::POST,
                "/v1/sessions/{id}/resume",
                "/v1/sessions/s-1/resume",
                "hatch:ResumeSession",
                Some("s-1"),
            ),
            (
                Method::PUT,
                "/v1/users/{name}/policies/{policy}",
                "/v1/users/alice/policies/ops",
                "hatch:AttachUserPolicy",
                Some("alice/policies/ops"),
            ),
            (
                Method::POST,
                "/v1/instances/{id}/revoke-secret",
                "/v1/instances/i-1/revoke-secret",
                "hatch:RevokeInstanceSecret",
                Some("i-1"),
            ),
            (
                Method::PUT,
                "/v1/instances/{id}/tags",
                "/v1/instances/i-1/tags",
                "hatch:TagInstance",
                Some("i-1"),
            ),
            (
                Method::DELETE,
                "/console/api/sessions/{id}",
                "/console/api/sessions/s-2",
                "hatch:TerminateSession",
                Some("s-2"),
            ),
            (
                Method::PUT,
                "/v1/account/settings",
                "/v1/account/settings",
                "hatch:UpdateAccountSettings",
                None,
            ),
        ];
        for (m, route, path, action, target) in cases {
            let ev = event(
                &req(m.clone(), Some(route), path),
                &Slot::default(),
                "req-1",
                "t".into(),
                StatusCode::OK,
                "OK",
                None,
            );
            assert_eq!((ev.action.as_str(), ev.target.as_deref()), (action, target), "{m} {path}");
        }
        assert_eq!(action_of(&Method::POST, None), "unknown");
        assert_eq!(action_of(&Method::PATCH, Some("/v1/sessions")), "unknown");
    }

    #[test]
    fn an_event_has_the_caller_the_outcome_and_bounded_peer_text() {
        let slot = Slot::default();
        slot.who(Who { account: "acct-1".into(), principal: "u-1".into(), key_id: "k-1".into() });
        slot.target("i-0123");
        let hostile = format!("/v1/{}\n{{\"forged\":1}}", "x".repeat(5000));
        let ev = event(
            &req(Method::POST, Some("/v1/sessions"), &hostile),
            &slot,
            "req-2",
            "2026-12-04T00:00:00Z".into(),
            StatusCode::FORBIDDEN,
            "AccessDenied",
            Some(
                "your policy does not allow hatch:StartSession on hrn:hatch:local:acct-1:instance/i-0123",
            ),
        );
        assert_eq!(
            (ev.account.as_deref(), ev.caller.as_deref(), ev.access_key_id.as_deref()),
            (Some("acct-1"), Some("u-1"), Some("k-1"))
        );
        assert_eq!(
            (ev.outcome, ev.status, ev.target.as_deref()),
            (Outcome::Denied, 403, Some("i-0123"))
        );
        assert!(ev.message.as_deref().unwrap().contains("does not allow hatch:StartSession"));
        // An unknown path is kept as the target, bounded and on one line.
        let ev = event(
            &req(Method::POST, None, &hostile),
            &Slot::default(),
            "req-3",
            "t".into(),
            StatusCode::NOT_FOUND,
            "NotFound",
            Some(&hostile),
        );
        let line = serde_json::to_string(&ev).unwrap();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.len() < 2 * MAX_TEXT + 600, "{}", line.len());
        assert_eq!(
            (ev.action.as_str(), ev.outcome, ev.caller.as_deref()),
            ("unknown", Outcome::Failed, None)
        );
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), ev);
    }

    #[test]
    fn the_file_gets_whole_lines_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let f = AuditFile::open(&path).unwrap();
        f.append(r#"{"a":1}"#).unwrap();
        drop(f);
        AuditFile::open(&path).unwrap().append(r#"{"a":2}"#).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"a\":1}\n{\"a\":2}\n");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
