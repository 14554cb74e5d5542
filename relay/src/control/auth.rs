//! Who is calling: the access key of a request checked against the store, and what its holder
//! may do ([`Caller`]). Instance secrets (agents) are checked where the control channel is
//! opened; both read the bearer credential with [`require_bearer`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use hatch_proto::api::codes;

use super::access::Grants;
use super::api::ApiError;
use super::policy::Context;
use super::store::{Account, Instance};
use super::{Shared, credentials};

/// Who is calling.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    /// The caller's account (as read for this request).
    pub account: Account,
    /// The user, or `None` for the account owner.
    pub user_id: Option<String>,
    /// The access key used.
    pub key_id: String,
    /// SHA-256 of that access key (what a console session or login link of the caller keeps).
    pub key_hash: [u8; 32],
    /// What the caller may do.
    pub grants: Grants,
    /// The caller's address (IPv4-mapped IPv6 given as IPv4).
    pub source_ip: IpAddr,
}

impl Caller {
    pub fn principal(&self) -> &str {
        self.user_id.as_deref().unwrap_or("owner")
    }

    /// Who the caller is, for a request's audit line.
    pub fn audit_who(&self) -> super::audit::Who {
        super::audit::Who {
            account: self.account.id.clone(),
            principal: self.principal().to_owned(),
            key_id: self.key_id.clone(),
        }
    }

    /// Whether the caller is the account owner.
    pub fn is_owner(&self) -> bool {
        self.user_id.is_none()
    }

    /// Whether `action` on `inst` is allowed in `ctx` (the owner may do everything in the
    /// account).
    pub fn may(&self, action: &str, inst: &Instance, ctx: &Context) -> bool {
        self.grants.may(action, &self.account.id, inst, ctx)
    }

    /// Whether an action on one of the account's users, policies or activations (`hrn`, from
    /// [`super::policy::account_hrn`]) is allowed: its only condition key is the source address.
    pub fn may_account(&self, action: &str, hrn: &str) -> bool {
        let ctx = Context { source_ip: Some(self.source_ip), ..Default::default() };
        self.grants.may_on(action, hrn, &ctx)
    }

    pub fn context(&self, inst: &Instance) -> Context {
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

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The bearer credential of a request, or the 401 that names what was expected (`what`: "access
/// key", "instance secret"), counted as a failed authentication.
pub(crate) fn require_bearer<'h>(
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
pub(crate) fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

pub(crate) async fn authenticate(
    shared: &Shared,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Result<Caller, ApiError> {
    let key = require_bearer(shared, headers, "access key")?;
    authenticate_key(shared, credentials::hash(key), peer).await
}

/// The caller holding the access key whose SHA-256 is `hash`: a bearer key, or the key behind
/// a console session ([`ConsoleAuth`]), checked against the store on every request.
pub(crate) async fn authenticate_key(
    shared: &Shared,
    hash: [u8; 32],
    peer: SocketAddr,
) -> Result<Caller, ApiError> {
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
        key_hash: hash,
        grants,
        source_ip: canonical_ip(peer.ip()),
    })
}

/// A request the console's cookie layer let through (`console_api`): the console session's
/// cookie (its SHA-256) and the access key behind it. Only that layer inserts it, on the
/// console's routes; a request to `/v1/` never carries it, so a cookie authenticates nothing
/// there.
#[derive(Debug, Clone)]
pub(crate) struct ConsoleAuth {
    /// SHA-256 of the console session's cookie.
    pub cookie: [u8; 32],
    /// SHA-256 of the access key that logged in.
    pub key_hash: [u8; 32],
    /// The console session's CSRF token.
    pub csrf: String,
    /// When the console session ends (seconds since the epoch).
    pub expires_at: i64,
}

/// A handler taking a [`Caller`] answers only an authenticated request (401 otherwise): by the
/// bearer access key, or on the console's routes by the key behind the console session (a
/// session whose key no longer authenticates is ended).
impl FromRequestParts<Arc<Shared>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        let ConnectInfo(peer) = ConnectInfo::<SocketAddr>::from_request_parts(parts, shared)
            .await
            .map_err(|e| ApiError::new(e.status(), codes::INTERNAL_ERROR, e.body_text()))?;
        let caller = match parts.extensions.get::<ConsoleAuth>().map(|c| (c.cookie, c.key_hash)) {
            Some((cookie, key_hash)) => {
                let res = authenticate_key(shared, key_hash, peer).await;
                if res.as_ref().is_err_and(|e| e.status() == StatusCode::UNAUTHORIZED) {
                    shared.console_logout(&cookie);
                }
                res
            }
            None => authenticate(shared, &parts.headers, peer).await,
        }?;
        // The request's audit line names who made it (`audit::Slot`, put there by `track`).
        if let Some(slot) = parts.extensions.get::<super::audit::Slot>() {
            slot.who(caller.audit_who());
        }
        Ok(caller)
    }
}
