//! The IAM routes of the API: users, access keys, policies, instance records and activations
//! of the caller's account. Each handler parses, asks the caller's policy about its own action
//! (`hatch:CreateUser`, ... in [`policy::ACTIONS`]), runs the [`iam`] operation in the store's
//! thread pool and renders the answer; refusals are [`IamError`]s, mapped in [`super::api`].
//!
//! Resources: users `hrn:hatch::{account}:user/{name}` (also for their keys and attachments),
//! policies `policy/{name}`, activations `activation/{id}`; listing and creating activations
//! use the name `*`. Instance actions are evaluated on the instance, with its condition keys.
//! Keys of the account owner are the owner's alone to create, list and revoke.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use hatch_proto::api::{
    AccessKeyInfo, AccessKeyList, ActivationInfo, ActivationList, CreateAccessKeyRequest,
    CreateActivationRequest, CreateUserRequest, PolicyInfo, PolicyList, TagInstanceRequest,
    UserInfo, UserList,
};
use serde::Deserialize;
use tracing::info;

use super::api::{ApiError, ApiJson, OptionalJson, instance_info, json};
use super::auth::Caller;
use super::iam::{self, IamError, IamResult};
use super::policy::{self, Kind};
use super::store::{AccessKey, Activation, PolicyRecord, Store, User};
use super::{Shared, rfc3339};

/// The IAM routes (merged into the API's router).
pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/users", get(list_users).post(create_user))
        .route("/v1/users/{name}", delete(delete_user))
        .route("/v1/users/{name}/policies/{policy}", put(attach).delete(detach))
        .route("/v1/access-keys", get(list_keys).post(create_key))
        .route("/v1/access-keys/{id}", delete(revoke_key))
        .route("/v1/policies", get(list_policies))
        .route("/v1/policies/{name}", put(put_policy).delete(delete_policy))
        .route("/v1/instances/{id}/tags", put(tag_instance))
        .route("/v1/instances/{id}", delete(deregister_instance))
        .route("/v1/instances/{id}/revoke-secret", post(revoke_instance_secret))
        .route("/v1/activations", get(list_activations).post(create_activation))
        .route("/v1/activations/{id}", delete(revoke_activation))
}

/// Runs an IAM operation on the store off the async executor.
async fn run<R: Send + 'static>(
    shared: &Shared,
    f: impl FnOnce(&dyn Store) -> IamResult<R> + Send + 'static,
) -> Result<R, ApiError> {
    Ok(shared.blocking(move |s| Ok(f(s))).await??)
}

/// 403 unless the caller's policy allows `action` on `hrn`.
fn allow(caller: &Caller, action: &str, hrn: &str) -> Result<(), IamError> {
    if caller.may_account(action, hrn) {
        return Ok(());
    }
    Err(refused(caller, action, hrn))
}

/// The 403 of an IAM action the caller's policy does not allow on `hrn`, logged.
fn refused(caller: &Caller, action: &str, hrn: &str) -> IamError {
    info!(user = caller.principal(), action, resource = hrn, "IAM action denied by policy");
    IamError::Denied(format!("your policy does not allow {action} on {hrn}"))
}

fn user_hrn(caller: &Caller, name: &str) -> String {
    policy::account_hrn(&caller.account.id, Kind::User, name)
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v).map_err(|e| ApiError::invalid(e.body_text()))
}

fn user_info(u: &User, attachments: &[(String, String)]) -> UserInfo {
    UserInfo {
        user_id: u.id.clone(),
        name: u.name.clone(),
        created_at: rfc3339(u.created_at),
        disabled_at: u.disabled_at.map(rfc3339),
        policies: attachments
            .iter()
            .filter(|(id, _)| *id == u.id)
            .map(|(_, p)| p.clone())
            .collect(),
    }
}

fn key_info(k: &AccessKey, users: &[User], secret: Option<String>) -> AccessKeyInfo {
    AccessKeyInfo {
        access_key_id: k.id.clone(),
        user: k.user_id.as_ref().map(|id| {
            users.iter().find(|u| u.id == *id).map_or_else(|| id.clone(), |u| u.name.clone())
        }),
        created_at: rfc3339(k.created_at),
        revoked_at: k.revoked_at.map(rfc3339),
        secret,
    }
}

fn policy_info(p: &PolicyRecord, attached_to: Vec<String>) -> PolicyInfo {
    PolicyInfo {
        name: p.name.clone(),
        // Stored documents were parsed as JSON before they were stored.
        document: serde_json::from_str(&p.document).unwrap_or(serde_json::Value::Null),
        updated_at: rfc3339(p.updated_at),
        attached_to,
    }
}

fn activation_info(a: &Activation, code: Option<String>) -> ActivationInfo {
    ActivationInfo {
        activation_id: a.id.clone(),
        region: a.region.clone(),
        tags: a.tags.clone(),
        max_registrations: a.max_registrations,
        registrations: a.registrations,
        expires_at: rfc3339(a.expires_at),
        created_at: rfc3339(a.created_at),
        revoked_at: a.revoked_at.map(rfc3339),
        activation_code: code,
    }
}

async fn list_users(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    allow(&caller, policy::LIST_USERS, &user_hrn(&caller, "*"))?;
    let acct = caller.account.id.clone();
    let (users, att) =
        run(&shared, move |s| Ok((s.users(&acct)?, s.policy_attachments(&acct)?))).await?;
    let users = users.iter().map(|u| user_info(u, &att)).collect();
    Ok(json(StatusCode::OK, &UserList { users }))
}

async fn create_user(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<ApiJson<CreateUserRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = body?;
    allow(&caller, policy::CREATE_USER, &user_hrn(&caller, &req.name))?;
    let acct = caller.account.id.clone();
    let u = run(&shared, move |s| iam::create_user(s, &acct, &req.name)).await?;
    info!(account = %u.account_id, user = %u.id, name = %u.name, by = caller.principal(),
        "user created");
    Ok(json(StatusCode::CREATED, &user_info(&u, &[])))
}

async fn delete_user(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let name = path(name)?;
    allow(&caller, policy::DELETE_USER, &user_hrn(&caller, &name))?;
    let acct = caller.account.id.clone();
    let (u, att) = run(&shared, move |s| {
        let att = s.policy_attachments(&acct)?;
        Ok((iam::delete_user(s, &acct, &name)?, att))
    })
    .await?;
    info!(account = %u.account_id, user = %u.id, name = %u.name, by = caller.principal(),
        "user deleted with their keys; a running relay ends their sessions");
    Ok(json(StatusCode::OK, &user_info(&u, &att)))
}

async fn attach(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    names: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    attachment(shared, caller, path(names)?, true).await
}

async fn detach(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    names: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, ApiError> {
    attachment(shared, caller, path(names)?, false).await
}

async fn attachment(
    shared: Arc<Shared>,
    caller: Caller,
    (name, policy_name): (String, String),
    attach: bool,
) -> Result<Response, ApiError> {
    let action = if attach { policy::ATTACH_USER_POLICY } else { policy::DETACH_USER_POLICY };
    allow(&caller, action, &user_hrn(&caller, &name))?;
    let acct = caller.account.id.clone();
    let p = policy_name.clone();
    let (u, att) = run(&shared, move |s| {
        let u = iam::user(s, &acct, &name)?;
        if attach {
            iam::attach_policy(s, &acct, &u.id, &p)?;
        } else {
            iam::detach_policy(s, &acct, &u, &p)?;
        }
        Ok((u, s.policy_attachments(&acct)?))
    })
    .await?;
    info!(account = %u.account_id, user = %u.id, policy = %policy_name, attach,
        by = caller.principal(), "policy attachment changed");
    Ok(json(StatusCode::OK, &user_info(&u, &att)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysQuery {
    user: Option<String>,
}

async fn list_keys(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    query: Result<Query<KeysQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::invalid(format!("query: {}", e.body_text())))?;
    allow(&caller, policy::LIST_ACCESS_KEYS, &user_hrn(&caller, q.user.as_deref().unwrap_or("*")))?;
    let acct = caller.account.id.clone();
    let owner = caller.is_owner();
    let (keys, users) = run(&shared, move |s| {
        let users = s.users(&acct)?;
        let only = match &q.user {
            Some(n) => Some(iam::user(s, &acct, n)?.id),
            None => None,
        };
        let keys = s
            .access_keys(&acct)?
            .into_iter()
            // The owner's keys are the owner's to see; a user filter shows that user's.
            .filter(|k| match (&only, &k.user_id) {
                (Some(u), Some(k)) => u == k,
                (Some(_), None) => false,
                (None, None) => owner,
                (None, Some(_)) => true,
            })
            .collect::<Vec<_>>();
        Ok((keys, users))
    })
    .await?;
    let access_keys = keys.iter().map(|k| key_info(k, &users, None)).collect();
    Ok(json(StatusCode::OK, &AccessKeyList { access_keys }))
}

async fn create_key(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<OptionalJson<CreateAccessKeyRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let OptionalJson(req) = body?;
    match &req.user {
        Some(n) => allow(&caller, policy::CREATE_ACCESS_KEY, &user_hrn(&caller, n))?,
        None if caller.is_owner() => {}
        None => {
            return Err(IamError::Denied(
                "only the account owner may create an owner's access key; name a user".into(),
            )
            .into());
        }
    }
    let acct = caller.account.id.clone();
    let (k, secret, users) = run(&shared, move |s| {
        let uid = match &req.user {
            Some(n) => Some(iam::user(s, &acct, n)?.id),
            None => None,
        };
        let (k, secret) = iam::create_access_key(s, &acct, uid.as_deref())?;
        Ok((k, secret, s.users(&acct)?))
    })
    .await?;
    info!(account = %k.account_id, key = %k.id, user = ?k.user_id, by = caller.principal(),
        "access key created");
    Ok(json(StatusCode::CREATED, &key_info(&k, &users, Some(secret))))
}

async fn revoke_key(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path(id)?;
    let acct = caller.account.id.clone();
    let owner = caller.is_owner();
    let c = caller.clone();
    let (k, users) = run(&shared, move |s| {
        let k = iam::access_key(s, &acct, &id)?;
        let users = s.users(&acct)?;
        // Allowed on the key's user; an owner's key is the owner's alone.
        match k.user_id.as_ref().and_then(|u| users.iter().find(|x| x.id == *u)) {
            Some(u) => allow(&c, policy::DELETE_ACCESS_KEY, &user_hrn(&c, &u.name))?,
            None if owner => {}
            None => {
                return Err(IamError::Denied(
                    "only the account owner may revoke an owner's access key".into(),
                ));
            }
        }
        Ok((iam::revoke_access_key(s, &acct, &id)?, users))
    })
    .await?;
    info!(account = %k.account_id, key = %k.id, by = caller.principal(),
        "access key revoked; a running relay ends its sessions");
    Ok(json(StatusCode::OK, &key_info(&k, &users, None)))
}

/// Names of the users `policy` is attached to.
fn attached_to(s: &dyn Store, account: &str, policy: &str) -> IamResult<Vec<String>> {
    let (att, users) = (s.policy_attachments(account)?, s.users(account)?);
    Ok(names_of(&att, &users, policy))
}

fn names_of(att: &[(String, String)], users: &[User], policy: &str) -> Vec<String> {
    att.iter()
        .filter(|(_, name)| name == policy)
        .map(|(uid, _)| {
            users.iter().find(|u| u.id == *uid).map_or_else(|| uid.clone(), |u| u.name.clone())
        })
        .collect()
}

async fn list_policies(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    allow(
        &caller,
        policy::LIST_POLICIES,
        &policy::account_hrn(&caller.account.id, Kind::Policy, "*"),
    )?;
    let acct = caller.account.id.clone();
    let (all, att, users) = run(&shared, move |s| {
        Ok((s.policies(&acct)?, s.policy_attachments(&acct)?, s.users(&acct)?))
    })
    .await?;
    let policies = all.iter().map(|p| policy_info(p, names_of(&att, &users, &p.name))).collect();
    Ok(json(StatusCode::OK, &PolicyList { policies }))
}

async fn put_policy(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<serde_json::Value>, ApiError>,
) -> Result<Response, ApiError> {
    let name = path(name)?;
    let ApiJson(doc) = body?;
    allow(
        &caller,
        policy::PUT_POLICY,
        &policy::account_hrn(&caller.account.id, Kind::Policy, &name),
    )?;
    let acct = caller.account.id.clone();
    let (p, to) = run(&shared, move |s| {
        let p = iam::put_policy(s, &acct, &name, &doc.to_string())?;
        Ok((p, attached_to(s, &acct, &name)?))
    })
    .await?;
    info!(account = %p.account_id, policy = %p.name, by = caller.principal(), "policy stored");
    Ok(json(StatusCode::OK, &policy_info(&p, to)))
}

async fn delete_policy(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let name = path(name)?;
    allow(
        &caller,
        policy::DELETE_POLICY,
        &policy::account_hrn(&caller.account.id, Kind::Policy, &name),
    )?;
    let acct = caller.account.id.clone();
    let p = run(&shared, move |s| iam::delete_policy(s, &acct, &name)).await?;
    info!(account = %p.account_id, policy = %p.name, by = caller.principal(), "policy deleted");
    Ok(json(StatusCode::OK, &policy_info(&p, Vec::new())))
}

/// The caller's instance `id` when `action` on it is allowed (404 for an instance the account
/// does not have).
async fn instance_for(
    shared: &Shared,
    caller: &Caller,
    id: &str,
    action: &str,
) -> Result<super::store::Instance, ApiError> {
    let (acct, iid) = (caller.account.id.clone(), id.to_owned());
    let inst = run(shared, move |s| iam::instance(s, &acct, &iid)).await?;
    if !caller.may(action, &inst, &caller.context(&inst)) {
        let hrn = policy::instance_hrn(&inst.region, &inst.account_id, &inst.id);
        return Err(refused(caller, action, &hrn).into());
    }
    Ok(inst)
}

async fn tag_instance(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
    body: Result<ApiJson<TagInstanceRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let id = path(id)?;
    let ApiJson(req) = body?;
    instance_for(&shared, &caller, &id, policy::TAG_INSTANCE).await?;
    let acct = caller.account.id.clone();
    let inst = run(&shared, move |s| iam::tag_instance(s, &acct, &id, req.tags)).await?;
    info!(instance = %inst.id, tags = ?inst.tags, by = caller.principal(), "instance tagged");
    Ok(json(StatusCode::OK, &instance_info(&shared, &inst, false)))
}

async fn deregister_instance(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path(id)?;
    instance_for(&shared, &caller, &id, policy::DEREGISTER_INSTANCE).await?;
    let acct = caller.account.id.clone();
    let inst = run(&shared, move |s| iam::deregister_instance(s, &acct, &id)).await?;
    let info = instance_info(&shared, &inst, false);
    shared.instance_gone(&inst.account_id, &inst.id, "instance deregistered").await;
    info!(instance = %inst.id, by = caller.principal(), "instance deregistered");
    Ok(json(StatusCode::OK, &info))
}

async fn revoke_instance_secret(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path(id)?;
    instance_for(&shared, &caller, &id, policy::REVOKE_INSTANCE_SECRET).await?;
    let acct = caller.account.id.clone();
    let inst = run(&shared, move |s| iam::revoke_instance_secret(s, &acct, &id)).await?;
    shared.instance_gone(&inst.account_id, &inst.id, "instance secret revoked").await;
    info!(instance = %inst.id, by = caller.principal(), "instance secret revoked");
    Ok(json(StatusCode::OK, &instance_info(&shared, &inst, false)))
}

fn activation_hrn(caller: &Caller, id: &str) -> String {
    policy::account_hrn(&caller.account.id, Kind::Activation, id)
}

async fn list_activations(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    allow(&caller, policy::LIST_ACTIVATIONS, &activation_hrn(&caller, "*"))?;
    let acct = caller.account.id.clone();
    let all = run(&shared, move |s| Ok(s.activations(Some(&acct))?)).await?;
    let activations = all.iter().map(|a| activation_info(a, None)).collect();
    Ok(json(StatusCode::OK, &ActivationList { activations }))
}

async fn create_activation(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    body: Result<ApiJson<CreateActivationRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = body?;
    allow(&caller, policy::CREATE_ACTIVATION, &activation_hrn(&caller, "*"))?;
    if !(1..=iam::MAX_ACTIVATION_SECS).contains(&req.valid_for_s) {
        return Err(ApiError::invalid(format!(
            "valid_for_s must be 1 to {} (30 days)",
            iam::MAX_ACTIVATION_SECS
        )));
    }
    let acct = caller.account.id.clone();
    let (a, code) = run(&shared, move |s| {
        let valid = std::time::Duration::from_secs(req.valid_for_s);
        iam::create_activation(s, &acct, &req.region, req.tags, req.max_registrations, valid)
    })
    .await?;
    info!(account = %a.account_id, activation = %a.id, by = caller.principal(),
        "activation created");
    Ok(json(StatusCode::CREATED, &activation_info(&a, Some(code))))
}

async fn revoke_activation(
    State(shared): State<Arc<Shared>>,
    caller: Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = path(id)?;
    allow(&caller, policy::DELETE_ACTIVATION, &activation_hrn(&caller, &id))?;
    let acct = caller.account.id.clone();
    let a = run(&shared, move |s| iam::revoke_activation(s, &acct, &id)).await?;
    info!(account = %a.account_id, activation = %a.id, by = caller.principal(),
        "activation revoked");
    Ok(json(StatusCode::OK, &activation_info(&a, None)))
}
