//! Identity and access management of an account: accounts, users, access keys, policies,
//! activations and instance records. Every operation validates its input and answers a typed
//! [`IamError`]; the HTTP API ([`super::api`], after the caller's policy allowed the action)
//! and `hatch-relay admin` (the operator on the store file) call the same functions.
//!
//! Secrets are generated here and returned once; only their hashes reach the store. The
//! operations are synchronous store calls: the API runs them in `spawn_blocking`.
//!
//! Taking access away (a key revoked, a user deleted or disabled, a policy replaced, attached
//! or detached, tags replaced, an instance deregistered or its secret revoked) raises the
//! account's IAM generation in the same transaction: the running relay re-checks that
//! account's live sessions on its next reconcile and ends those that lost access (4012).

use std::time::Duration;

use super::credentials;
use super::policy::Policy;
use super::store::{
    AccessKey, Account, Activation, Instance, PolicyDeleted, PolicyRecord, SessionPrefs, Store,
    Tags, User,
};
use super::unix_now;

/// Why an IAM operation was refused. The API maps each to its status and code.
#[derive(Debug, thiserror::Error)]
pub enum IamError {
    /// Malformed input (400 `InvalidRequest`).
    #[error("{0}")]
    Invalid(String),
    /// A policy document refused; the message names the field (400 `MalformedPolicyDocument`).
    #[error("{0}")]
    MalformedPolicy(String),
    /// The caller may not do this (403 `AccessDenied`).
    #[error("{0}")]
    Denied(String),
    /// No such user, policy, key or activation in the account (404 `NoSuchEntity`).
    #[error("{0}")]
    NoSuchEntity(String),
    /// No such instance in the account (404 `InstanceNotFound`, as the session routes say).
    #[error("instance {0} not found")]
    InstanceNotFound(String),
    /// A user of that name exists (409 `EntityAlreadyExists`).
    #[error("{0}")]
    AlreadyExists(String),
    /// The entity is in use: a policy still attached (409 `DeleteConflict`).
    #[error("{0}")]
    DeleteConflict(String),
    /// The store failed (500, logged).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Shorthand for this module's results.
pub type IamResult<T> = Result<T, IamError>;

fn invalid(m: impl Into<String>) -> IamError {
    IamError::Invalid(m.into())
}

/// The longest idle timeout or session an account may set: 30 days.
pub const MAX_PREF_SECS: u64 = 30 * 86_400;
/// The longest an activation may be valid: 30 days.
pub const MAX_ACTIVATION_SECS: u64 = 30 * 86_400;
/// Most registrations one activation may allow.
pub const MAX_REGISTRATIONS: u32 = 100_000;

/// Creates an account with session management on.
pub fn create_account(store: &dyn Store, name: &str) -> IamResult<Account> {
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(invalid("account name must be 1-128 printable characters"));
    }
    let a = Account {
        id: credentials::new_id("acct-"),
        name: name.to_owned(),
        session_manager_enabled: true,
        created_at: unix_now(),
        prefs: Default::default(),
    };
    store.create_account(&a)?;
    Ok(a)
}

/// Looks an account up.
pub fn account(store: &dyn Store, id: &str) -> IamResult<Account> {
    store.account(id)?.ok_or_else(|| IamError::NoSuchEntity(format!("no account {id}")))
}

/// `prefs` with `update`'s preferences applied (0: back to the relay's), or why not.
pub fn updated_prefs(
    mut prefs: SessionPrefs,
    update: &hatch_proto::api::AccountSettingsUpdate,
) -> IamResult<SessionPrefs> {
    for (name, new, slot) in [
        ("idle_timeout_s", update.idle_timeout_s, &mut prefs.idle_timeout_s),
        ("max_duration_s", update.max_duration_s, &mut prefs.max_duration_s),
    ] {
        match new {
            None => {}
            Some(0) => *slot = None,
            Some(s) if s <= MAX_PREF_SECS => *slot = Some(s),
            Some(s) => {
                return Err(invalid(format!("{name} {s} is more than {MAX_PREF_SECS} (30 days)")));
            }
        }
    }
    if let Some(mode) = update.recording {
        prefs.recording = mode;
    }
    Ok(prefs)
}

/// Applies an account settings update (preferences, then the switch) and returns the account
/// as it is now. A switch set off is the caller's to act on: it ends the live sessions.
pub fn update_settings(
    store: &dyn Store,
    account_id: &str,
    update: &hatch_proto::api::AccountSettingsUpdate,
) -> IamResult<Account> {
    let mut a = account(store, account_id)?;
    a.prefs = updated_prefs(a.prefs, update)?;
    store.set_session_prefs(account_id, a.prefs)?;
    if let Some(enabled) = update.session_manager_enabled {
        store.set_session_manager(account_id, enabled)?;
        a.session_manager_enabled = enabled;
    }
    Ok(a)
}

fn check_user_name(name: &str) -> IamResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
    {
        return Err(invalid(format!(
            "user name {name:?} must be 1-64 characters of letters, digits, . _ @ -"
        )));
    }
    Ok(())
}

/// Creates a user in an account.
pub fn create_user(store: &dyn Store, account_id: &str, name: &str) -> IamResult<User> {
    account(store, account_id)?;
    check_user_name(name)?;
    if store.user_by_name(account_id, name)?.is_some() {
        return Err(IamError::AlreadyExists(format!(
            "account {account_id} already has a user {name}"
        )));
    }
    let u = User {
        disabled_at: None,
        id: credentials::new_id("u-"),
        account_id: account_id.to_owned(),
        name: name.to_owned(),
        created_at: unix_now(),
    };
    store.create_user(&u)?;
    Ok(u)
}

/// Finds a user of an account by id or name.
pub fn user(store: &dyn Store, account_id: &str, id_or_name: &str) -> IamResult<User> {
    if let Some(u) = store.user(id_or_name)?
        && u.account_id == account_id
    {
        return Ok(u);
    }
    store.user_by_name(account_id, id_or_name)?.ok_or_else(|| {
        IamError::NoSuchEntity(format!("no user {id_or_name} in account {account_id}"))
    })
}

/// Deletes a user with their keys and policy attachments; returns the user as it was.
pub fn delete_user(store: &dyn Store, account_id: &str, id_or_name: &str) -> IamResult<User> {
    let u = user(store, account_id, id_or_name)?;
    if !store.delete_user(&u.id)? {
        return Err(IamError::NoSuchEntity(format!("no user {id_or_name}")));
    }
    Ok(u)
}

/// Disables (`true`) or enables a user; returns the user as it is now.
pub fn set_user_disabled(
    store: &dyn Store,
    account_id: &str,
    id_or_name: &str,
    disable: bool,
) -> IamResult<User> {
    let mut u = user(store, account_id, id_or_name)?;
    u.disabled_at = disable.then(unix_now);
    if !store.set_user_disabled(&u.id, u.disabled_at)? {
        return Err(IamError::NoSuchEntity(format!("no user {id_or_name}")));
    }
    Ok(u)
}

/// Creates an access key for the account owner (`user_id` None) or a user. Returns the key
/// record and the secret (shown once).
pub fn create_access_key(
    store: &dyn Store,
    account_id: &str,
    user_id: Option<&str>,
) -> IamResult<(AccessKey, String)> {
    account(store, account_id)?;
    let (id, secret) = credentials::new_access_key();
    let k = AccessKey {
        id,
        account_id: account_id.to_owned(),
        user_id: user_id.map(str::to_owned),
        created_at: unix_now(),
        revoked_at: None,
    };
    store.insert_access_key(&k, &credentials::hash(&secret))?;
    Ok((k, secret))
}

/// One access key of the account.
pub fn access_key(store: &dyn Store, account_id: &str, key_id: &str) -> IamResult<AccessKey> {
    store
        .access_keys(account_id)?
        .into_iter()
        .find(|k| k.id == key_id)
        .ok_or_else(|| IamError::NoSuchEntity(format!("no access key {key_id} in {account_id}")))
}

/// Revokes an access key of the account; returns it as it is now. Revoking a revoked key is
/// refused (404), so that a script learns its key id was wrong.
pub fn revoke_access_key(
    store: &dyn Store,
    account_id: &str,
    key_id: &str,
) -> IamResult<AccessKey> {
    let mut k = access_key(store, account_id, key_id)?;
    let now = unix_now();
    if k.revoked_at.is_some() || !store.revoke_access_key(key_id, now)? {
        return Err(IamError::NoSuchEntity(format!("no active access key {key_id}")));
    }
    k.revoked_at = Some(now);
    Ok(k)
}

fn check_policy_name(name: &str) -> IamResult<()> {
    if name.is_empty()
        || name.len() > 128
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(invalid(format!("policy name {name:?} must be 1-128 letters, digits, . _ -")));
    }
    Ok(())
}

/// Validates and stores (creates or replaces) a policy document.
pub fn put_policy(
    store: &dyn Store,
    account_id: &str,
    name: &str,
    document: &str,
) -> IamResult<PolicyRecord> {
    account(store, account_id)?;
    check_policy_name(name)?;
    Policy::parse(document)
        .map_err(|e| IamError::MalformedPolicy(format!("policy {name} refused: {e}")))?;
    let p = PolicyRecord {
        account_id: account_id.to_owned(),
        name: name.to_owned(),
        document: document.to_owned(),
        updated_at: unix_now(),
    };
    store.put_policy(&p)?;
    Ok(p)
}

/// One policy of the account.
pub fn policy(store: &dyn Store, account_id: &str, name: &str) -> IamResult<PolicyRecord> {
    store
        .policies(account_id)?
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| IamError::NoSuchEntity(format!("no policy {name} in account {account_id}")))
}

/// Deletes a policy that no user has attached; returns it as it was.
pub fn delete_policy(store: &dyn Store, account_id: &str, name: &str) -> IamResult<PolicyRecord> {
    let p = policy(store, account_id, name)?;
    match store.delete_policy(account_id, name)? {
        PolicyDeleted::Deleted => Ok(p),
        PolicyDeleted::NotFound => Err(IamError::NoSuchEntity(format!("no policy {name}"))),
        PolicyDeleted::Attached(ids) => {
            let users = store.users(account_id)?;
            let names: Vec<&str> = ids
                .iter()
                .map(|id| users.iter().find(|u| u.id == *id).map_or(id.as_str(), |u| &u.name))
                .collect();
            Err(IamError::DeleteConflict(format!(
                "policy {name} is attached to {} user(s) ({})",
                names.len(),
                names.join(", ")
            )))
        }
    }
}

/// Attaches a policy to a user, validating the stored document again.
pub fn attach_policy(
    store: &dyn Store,
    account_id: &str,
    user_id: &str,
    name: &str,
) -> IamResult<()> {
    let p = policy(store, account_id, name)?;
    Policy::parse(&p.document)
        .map_err(|e| IamError::MalformedPolicy(format!("policy {name} refused: {e}")))?;
    if !store.attach_policy(account_id, user_id, name)? {
        return Err(IamError::NoSuchEntity(format!("no policy {name}")));
    }
    Ok(())
}

/// Detaches a policy from a user.
pub fn detach_policy(
    store: &dyn Store,
    account_id: &str,
    user: &User,
    name: &str,
) -> IamResult<()> {
    if !store.detach_policy(account_id, &user.id, name)? {
        return Err(IamError::NoSuchEntity(format!(
            "policy {name} is not attached to {}",
            user.name
        )));
    }
    Ok(())
}

/// Creates an activation; returns it with its code (shown once).
pub fn create_activation(
    store: &dyn Store,
    account_id: &str,
    region: &str,
    tags: Tags,
    max_registrations: u32,
    valid_for: Duration,
) -> IamResult<(Activation, String)> {
    account(store, account_id)?;
    if region.is_empty()
        || region.len() > 64
        || !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(invalid("region must be 1-64 letters, digits or -"));
    }
    if !(1..=MAX_REGISTRATIONS).contains(&max_registrations) {
        return Err(invalid(format!("max registrations must be 1 to {MAX_REGISTRATIONS}")));
    }
    check_tags(&tags)?;
    let now = unix_now();
    let code = credentials::new_secret(credentials::ACTIVATION_CODE_PREFIX);
    let a = Activation {
        id: credentials::new_id("act-"),
        account_id: account_id.to_owned(),
        region: region.to_owned(),
        tags,
        max_registrations,
        registrations: 0,
        expires_at: now.saturating_add(i64::try_from(valid_for.as_secs()).unwrap_or(i64::MAX)),
        created_at: now,
        revoked_at: None,
    };
    store.insert_activation(&a, &credentials::hash(&code))?;
    Ok((a, code))
}

/// Revokes an activation of the account; returns it as it is now. Instances it registered stay.
pub fn revoke_activation(store: &dyn Store, account_id: &str, id: &str) -> IamResult<Activation> {
    let mut a = store
        .activations(Some(account_id))?
        .into_iter()
        .find(|a| a.id == id)
        .ok_or_else(|| IamError::NoSuchEntity(format!("no activation {id} in {account_id}")))?;
    let now = unix_now();
    if a.revoked_at.is_some() || !store.revoke_activation(account_id, id, now)? {
        return Err(IamError::NoSuchEntity(format!("no active activation {id}")));
    }
    a.revoked_at = Some(now);
    Ok(a)
}

/// One instance of the account.
pub fn instance(store: &dyn Store, account_id: &str, id: &str) -> IamResult<Instance> {
    store.instance(account_id, id)?.ok_or_else(|| IamError::InstanceNotFound(id.to_owned()))
}

/// Replaces an instance's tags; returns the instance as it is now.
pub fn tag_instance(
    store: &dyn Store,
    account_id: &str,
    id: &str,
    tags: Tags,
) -> IamResult<Instance> {
    let mut inst = instance(store, account_id, id)?;
    check_tags(&tags)?;
    if !store.set_instance_tags(id, &tags)? {
        return Err(IamError::InstanceNotFound(id.to_owned()));
    }
    inst.tags = tags;
    Ok(inst)
}

/// Removes an instance from the account; returns it as it was. The caller closes its control
/// channel and ends its sessions.
pub fn deregister_instance(store: &dyn Store, account_id: &str, id: &str) -> IamResult<Instance> {
    let inst = instance(store, account_id, id)?;
    if !store.deregister_instance(account_id, id)? {
        return Err(IamError::InstanceNotFound(id.to_owned()));
    }
    Ok(inst)
}

/// Makes an instance's secret worthless; returns the instance as it is now. The caller closes
/// its control channel and ends its sessions.
pub fn revoke_instance_secret(
    store: &dyn Store,
    account_id: &str,
    id: &str,
) -> IamResult<Instance> {
    let mut inst = instance(store, account_id, id)?;
    let now = unix_now();
    if !store.revoke_instance_secret(account_id, id, now)? {
        return Err(IamError::InstanceNotFound(id.to_owned()));
    }
    inst.secret_revoked_at = Some(now);
    Ok(inst)
}

/// Most tags on one instance or activation.
pub const MAX_TAGS: usize = 50;

fn check_tags(tags: &Tags) -> IamResult<()> {
    if tags.len() > MAX_TAGS {
        return Err(invalid(format!("more than {MAX_TAGS} tags")));
    }
    for (k, v) in tags {
        if k.is_empty()
            || k.len() > 128
            || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b))
        {
            return Err(invalid(format!("tag key {k:?} must be 1-128 letters, digits, . _ - :")));
        }
        if v.len() > 256 || v.chars().any(char::is_control) {
            return Err(invalid(format!(
                "tag value for {k} must be at most 256 bytes, without control characters"
            )));
        }
    }
    Ok(())
}

/// Parses `key=value` tag arguments.
pub fn parse_tags<S: AsRef<str>>(args: &[S]) -> IamResult<Tags> {
    let mut tags = Tags::new();
    for a in args {
        let a = a.as_ref();
        let (k, v) =
            a.split_once('=').ok_or_else(|| invalid(format!("tag {a:?} is not key=value")))?;
        tags.insert(k.to_owned(), v.to_owned());
    }
    check_tags(&tags)?;
    Ok(tags)
}
