//! Store operations of `hatch-relay admin` and `hatch-relay dev`: create accounts, users, keys,
//! activations, put and attach policies. Secrets are generated here and returned once; only
//! their hashes reach the store.

use std::time::Duration;

use anyhow::Context;

use super::credentials;
use super::policy::Policy;
use super::store::{AccessKey, Account, Activation, PolicyRecord, SessionPrefs, Store, Tags, User};
use super::unix_now;

/// Creates an account with session management on.
pub fn create_account(store: &dyn Store, name: &str) -> anyhow::Result<Account> {
    anyhow::ensure!(!name.is_empty() && name.len() <= 128, "account name must be 1-128 characters");
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

/// The longest idle timeout or session an account may set: 30 days.
pub const MAX_PREF_SECS: u64 = 30 * 86_400;

/// `prefs` with `update`'s preferences applied (0: back to the relay's), or why not.
pub fn updated_prefs(
    mut prefs: SessionPrefs,
    update: &hatch_proto::api::AccountSettingsUpdate,
) -> Result<SessionPrefs, String> {
    for (name, new, slot) in [
        ("idle_timeout_s", update.idle_timeout_s, &mut prefs.idle_timeout_s),
        ("max_duration_s", update.max_duration_s, &mut prefs.max_duration_s),
    ] {
        match new {
            None => {}
            Some(0) => *slot = None,
            Some(s) if s <= MAX_PREF_SECS => *slot = Some(s),
            Some(s) => return Err(format!("{name} {s} is more than {MAX_PREF_SECS} (30 days)")),
        }
    }
    Ok(prefs)
}

/// Looks an account up, with an error naming it when absent.
pub fn account(store: &dyn Store, id: &str) -> anyhow::Result<Account> {
    store.account(id)?.with_context(|| format!("no account {id}"))
}

/// Creates a user in an account.
pub fn create_user(store: &dyn Store, account_id: &str, name: &str) -> anyhow::Result<User> {
    account(store, account_id)?;
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b)),
        "user name must be 1-64 characters of letters, digits, . _ @ -"
    );
    anyhow::ensure!(
        store.user_by_name(account_id, name)?.is_none(),
        "account {account_id} already has a user {name}"
    );
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
pub fn user(store: &dyn Store, account_id: &str, id_or_name: &str) -> anyhow::Result<User> {
    if let Some(u) = store.user(id_or_name)?
        && u.account_id == account_id
    {
        return Ok(u);
    }
    store
        .user_by_name(account_id, id_or_name)?
        .with_context(|| format!("no user {id_or_name} in account {account_id}"))
}

/// Creates an access key for the account owner (`user_id` None) or a user. Returns the key
/// record and the secret (shown once).
pub fn create_access_key(
    store: &dyn Store,
    account_id: &str,
    user_id: Option<&str>,
) -> anyhow::Result<(AccessKey, String)> {
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

/// Creates an activation; returns it with its code (shown once).
pub fn create_activation(
    store: &dyn Store,
    account_id: &str,
    region: &str,
    tags: Tags,
    max_registrations: u32,
    valid_for: Duration,
) -> anyhow::Result<(Activation, String)> {
    account(store, account_id)?;
    anyhow::ensure!(
        !region.is_empty()
            && region.len() <= 64
            && region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
        "region must be 1-64 letters, digits or -"
    );
    anyhow::ensure!(max_registrations > 0, "max registrations must be at least 1");
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
    };
    store.insert_activation(&a, &credentials::hash(&code))?;
    Ok((a, code))
}

/// Validates and stores a policy document.
pub fn put_policy(
    store: &dyn Store,
    account_id: &str,
    name: &str,
    document: &str,
) -> anyhow::Result<PolicyRecord> {
    account(store, account_id)?;
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 128
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "policy name must be 1-128 letters, digits, . _ -"
    );
    Policy::parse(document).map_err(|e| anyhow::anyhow!("policy {name} refused: {e}"))?;
    let p = PolicyRecord {
        account_id: account_id.to_owned(),
        name: name.to_owned(),
        document: document.to_owned(),
        updated_at: unix_now(),
    };
    store.put_policy(&p)?;
    Ok(p)
}

/// Attaches a policy to a user, validating the stored document again.
pub fn attach_policy(
    store: &dyn Store,
    account_id: &str,
    user_id: &str,
    name: &str,
) -> anyhow::Result<()> {
    let p = store
        .policies(account_id)?
        .into_iter()
        .find(|p| p.name == name)
        .with_context(|| format!("no policy {name} in account {account_id}"))?;
    Policy::parse(&p.document).map_err(|e| anyhow::anyhow!("policy {name} refused: {e}"))?;
    anyhow::ensure!(store.attach_policy(account_id, user_id, name)?, "no policy {name}");
    Ok(())
}

/// Parses `key=value` tag arguments.
pub fn parse_tags<S: AsRef<str>>(args: &[S]) -> anyhow::Result<Tags> {
    let mut tags = Tags::new();
    for a in args {
        let a = a.as_ref();
        let (k, v) = a.split_once('=').with_context(|| format!("tag {a:?} is not key=value"))?;
        anyhow::ensure!(
            !k.is_empty()
                && k.len() <= 128
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b)),
            "tag key {k:?} must be 1-128 letters, digits, . _ - :"
        );
        anyhow::ensure!(v.len() <= 256, "tag value for {k} longer than 256 bytes");
        tags.insert(k.to_owned(), v.to_owned());
    }
    Ok(tags)
}
