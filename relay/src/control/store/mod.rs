//! The control plane's store: accounts, users, access keys, policies, activations, instances
//! and sessions.
//!
//! [`Store`] is the narrow interface the API codes against; [`SqliteStore`] is the embedded
//! default (one file, WAL, schema migrations at open) and [`PgStore`] keeps the same records
//! in PostgreSQL (`--store postgres://...`). Every method is synchronous and may block on disk
//! or the network: the control plane calls them from `spawn_blocking`, never from an async
//! task (the PostgreSQL driver panics there) and never from a data-plane shard.
//!
//! The module is the interface and its types; `sqlite.rs` implements it with its migrations in
//! `schema.rs`, `postgres.rs` with its own, and `suite.rs` is the test suite both pass.
//!
//! Secrets (access keys, instance secrets, activation codes) are stored only as SHA-256 hashes
//! of high-entropy random strings; see [`super::credentials`].

mod postgres;
mod schema;
mod sqlite;
#[cfg(test)]
mod suite;

pub use postgres::{PgStore, redacted};
pub use sqlite::SqliteStore;

/// Opens the store a relay is configured with (`--store`): PostgreSQL for a
/// `postgres://` or `postgresql://` URL, else the SQLite file `hatch.db` in `data_dir`.
pub fn open(url: Option<&str>, data_dir: &std::path::Path) -> anyhow::Result<Box<dyn Store>> {
    match url {
        None => Ok(Box::new(SqliteStore::open(&data_dir.join("hatch.db"))?)),
        Some(u) if is_postgres(u) => Ok(Box::new(PgStore::open(u)?)),
        Some(u) => anyhow::bail!(
            "--store {} is not a postgres:// URL (leave it out for the SQLite file in the data \
             directory)",
            redacted(u)
        ),
    }
}

/// Whether `url` names a PostgreSQL store.
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

use serde::{Deserialize, Serialize};

pub use crate::plane::CloseReason;
pub use hatch_proto::api::{Mode, RecordingMode};

/// Tags of an instance: key → value, ordered for stable output.
pub type Tags = std::collections::BTreeMap<String, String>;

/// An account: the unit of ownership and of the session-manager switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// `acct-` + 16 hex.
    pub id: String,
    /// A name for people.
    pub name: String,
    /// The account-wide switch: when off, no session can start.
    pub session_manager_enabled: bool,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Session preferences (SSM's Session Preferences); `None`: the relay's own.
    #[serde(flatten)]
    pub prefs: SessionPrefs,
}

/// An account's session preferences: tighter than the relay's flags, never looser (the API
/// refuses a value past the relay's cap). They apply to sessions started after they are set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionPrefs {
    /// Idle timeout in seconds (`--idle-timeout` when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// Longest session in seconds (`--max-duration` when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<u64>,
    /// Session recording (docs/RECORDING.md).
    #[serde(default)]
    pub recording: RecordingMode,
}

/// A user inside an account (not the owner): needs policies to do anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// `u-` + 16 hex.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// Unique inside the account.
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// When the user was disabled: their keys authenticate nothing and their live sessions
    /// end (4012). `None` while enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<i64>,
}

/// An access key as stored (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKey {
    /// `ak-` + 16 hex, shown in lists and used to revoke.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// The user it belongs to; `None` for an account owner's key.
    pub user_id: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// When revoked, if it was.
    pub revoked_at: Option<i64>,
}

/// A named policy document of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// Owning account.
    pub account_id: String,
    /// Unique inside the account.
    pub name: String,
    /// The JSON document (validated before it is stored).
    pub document: String,
    /// Seconds since the Unix epoch.
    pub updated_at: i64,
}

/// An activation: lets agents register instances into an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// `act-` + 16 hex.
    pub id: String,
    /// Account the instances join.
    pub account_id: String,
    /// Region of the instances.
    pub region: String,
    /// Tags given to each instance.
    pub tags: Tags,
    /// How many instances may register with it.
    pub max_registrations: u32,
    /// How many did.
    pub registrations: u32,
    /// Seconds since the Unix epoch.
    pub expires_at: i64,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// When it was revoked: no registration is accepted after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// A registered instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// `i-` + 16 hex.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// Region (from the activation).
    pub region: String,
    /// Tags (from the activation, changed by `admin instances tag`).
    pub tags: Tags,
    /// Host name the agent reported.
    pub hostname: Option<String>,
    /// The activation it registered with.
    pub activation_id: String,
    /// Seconds since the Unix epoch.
    pub registered_at: i64,
    /// Last time its control channel was seen up (connect, heartbeat, disconnect).
    pub last_seen: Option<i64>,
    /// When its secret was revoked: its agent authenticates no more and must register again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_revoked_at: Option<i64>,
}

/// An audit event as stored ([`super::audit`]): its line, and what it is found by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Order of writing, across the fleet (the cursor of `GET /v1/audit`).
    pub seq: i64,
    /// Seconds since the Unix epoch.
    pub at: i64,
    /// The account it belongs to; `None` for a request no account could be named for.
    pub account_id: Option<String>,
    /// The event, one JSON object.
    pub line: String,
}

/// A relay node another node expired ([`Store::expire_nodes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredNode {
    /// The node.
    pub id: String,
    /// Its sessions closed: those that never paired, and with no adopter every open one.
    pub closed: usize,
    /// Its paired sessions, now the adopter's and `detached`, oldest first.
    pub adopted: Vec<SessionRecord>,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// `s-` + 16 hex.
    pub id: String,
    /// Account of the instance.
    pub account_id: String,
    /// `owner` or the user id.
    pub principal: String,
    /// The access key used.
    pub access_key_id: String,
    /// Caller's address as the API saw it.
    pub source_ip: String,
    /// Target instance.
    pub instance_id: String,
    /// Shell, exec or port.
    pub mode: Mode,
    /// The command of an exec session.
    pub command: Option<Vec<String>>,
    /// Run-as user, if asked for.
    pub run_as: Option<String>,
    /// Where it is in its life.
    pub state: SessionState,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// Token expiry.
    pub expires_at: i64,
    /// When both legs paired.
    pub connected_at: Option<i64>,
    /// When it closed.
    pub closed_at: Option<i64>,
    /// Why it closed.
    pub close_reason: Option<CloseReason>,
    /// Payload bytes client → agent.
    pub bytes_client_to_agent: u64,
    /// Payload bytes agent → client.
    pub bytes_agent_to_client: u64,
    /// When it last became `detached` (kept once it is connected again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_at: Option<i64>,
    /// A port session's destination host, as asked (`hatch:RemoteHost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<String>,
    /// A port session's destination port (`hatch:RemotePort`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
    /// The relay node whose data plane holds the session (the node of the agent's control
    /// channel when it started); `None` for records from before fleets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// How the session is recorded: the account's setting when it started, kept by its
    /// resumes.
    #[serde(default)]
    pub recording: RecordingMode,
    /// The final digest of its recording (64 hex digits), stored when the recording finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording_digest: Option<String>,
}

/// A relay node of a fleet, as it registered itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// `n-` + 16 hex (kept in the data directory, or `--node-id`).
    pub id: String,
    /// The node's public API URL (`https://host:port`).
    pub api_url: String,
    /// The node's public data-plane URL (`wss://host:port`): clients of its sessions dial it.
    pub data_url: String,
    /// The node's current run: tokens for its data plane carry it (`run`).
    pub run: String,
    /// When this run registered (seconds since the epoch).
    pub started_at: i64,
    /// The node's last heartbeat (seconds since the epoch).
    pub heartbeat_at: i64,
}

/// Which node holds an instance's agent control channel, and whom the agent runs sessions as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentChannel {
    /// The node.
    pub node_id: String,
    /// The agent's default user, from its hello.
    pub default_user: String,
    /// Whether it can run sessions as other users.
    pub switch_user: bool,
}

/// Open-session limits a new session is admitted under, counted in the store across a fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenLimits {
    /// Per instance.
    pub per_instance: usize,
    /// Per account.
    pub per_account: usize,
    /// Per principal of an account.
    pub per_user: usize,
}

/// The limit a new session would exceed, with that limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// The instance's.
    Instance(usize),
    /// The account's.
    Account(usize),
    /// The principal's.
    User(usize),
}

impl OpenLimits {
    /// The first limit that counts of open sessions (instance, account, principal) reach.
    pub fn check(self, instance: usize, account: usize, user: usize) -> Result<(), OverLimit> {
        if instance >= self.per_instance {
            return Err(OverLimit::Instance(self.per_instance));
        }
        if account >= self.per_account {
            return Err(OverLimit::Account(self.per_account));
        }
        if user >= self.per_user {
            return Err(OverLimit::User(self.per_user));
        }
        Ok(())
    }
}

/// What woke a node: something in the store it should look at now rather than on its next
/// poll. Only a hint: every change is in the store, and the poll finds it anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Mail for this node ([`Store::take_mail`]).
    Mail,
    /// A change that may end live sessions elsewhere (a session terminated, an account
    /// switched off, an IAM change): reconcile now.
    Reconcile,
}

/// A session's state in the store (DESIGN.md "Session states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Started, waiting for both legs.
    Pending,
    /// Both legs paired.
    Connected,
    /// Paired before, its legs lost: waiting within the resume window for new ones.
    Detached,
    /// Ended; `close_reason` says why.
    Closed,
}

impl SessionState {
    /// The name stored and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Pending => "pending",
            SessionState::Connected => "connected",
            SessionState::Detached => "detached",
            SessionState::Closed => "closed",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => SessionState::Pending,
            "connected" => SessionState::Connected,
            "detached" => SessionState::Detached,
            "closed" => SessionState::Closed,
            _ => return None,
        })
    }

    /// Whether the session has not ended.
    pub fn is_open(self) -> bool {
        self != SessionState::Closed
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which sessions to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// Every state.
    All,
    /// `pending`, `connected` or `detached`.
    Active,
    /// `closed`.
    Closed,
}

/// Why registering with an activation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Unknown id or wrong code (one answer for both, so ids cannot be probed).
    #[error("unknown activation or wrong activation code")]
    BadActivation,
    /// Past its expiry.
    #[error("activation expired")]
    Expired,
    /// Its registration limit is used up.
    #[error("activation has no registrations left")]
    Exhausted,
    /// It was revoked.
    #[error("activation revoked")]
    Revoked,
    /// The store failed.
    #[error("store: {0}")]
    Store(String),
}

impl Activation {
    /// Whether an agent presenting a code that hashes to `code_hash` may register with this
    /// activation (whose code hashes to `stored`) at `now`, and the instance it then creates;
    /// the one rule both engines apply inside their registering transaction.
    pub fn admit(
        &self,
        stored: &[u8],
        code_hash: &[u8; 32],
        instance_id: &str,
        hostname: Option<&str>,
        now: i64,
    ) -> Result<Instance, RegisterError> {
        if !crate::control::credentials::hashes_equal(stored, code_hash) {
            return Err(RegisterError::BadActivation);
        }
        if self.revoked_at.is_some() {
            return Err(RegisterError::Revoked);
        }
        if now >= self.expires_at {
            return Err(RegisterError::Expired);
        }
        if self.registrations >= self.max_registrations {
            return Err(RegisterError::Exhausted);
        }
        Ok(Instance {
            id: instance_id.to_owned(),
            account_id: self.account_id.clone(),
            region: self.region.clone(),
            tags: self.tags.clone(),
            hostname: hostname.map(str::to_owned),
            activation_id: self.id.clone(),
            registered_at: now,
            last_seen: None,
            secret_revoked_at: None,
        })
    }
}

/// What deleting a policy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyDeleted {
    /// It is gone.
    Deleted,
    /// The account has no such policy.
    NotFound,
    /// Users (their ids) still have it attached: nothing changed.
    Attached(Vec<String>),
}

/// Who an access key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    /// The key's id.
    pub key_id: String,
    /// The account.
    pub account_id: String,
    /// The user, or `None` for the account owner.
    pub user_id: Option<String>,
}

/// The narrow interface of the control plane's persistent state.
pub trait Store: Send + Sync + 'static {
    /// Creates an account (session management on).
    fn create_account(&self, account: &Account) -> anyhow::Result<()>;
    /// One account.
    fn account(&self, id: &str) -> anyhow::Result<Option<Account>>;
    /// Every account.
    fn accounts(&self) -> anyhow::Result<Vec<Account>>;
    /// Flips the switch; false when no such account.
    fn set_session_manager(&self, account_id: &str, enabled: bool) -> anyhow::Result<bool>;
    /// Sets an account's session preferences; false when there is no such account.
    fn set_session_prefs(&self, account_id: &str, prefs: SessionPrefs) -> anyhow::Result<bool>;

    /// Creates a user.
    fn create_user(&self, user: &User) -> anyhow::Result<()>;
    /// A user by id (any account).
    fn user(&self, id: &str) -> anyhow::Result<Option<User>>;
    /// A user by name inside an account.
    fn user_by_name(&self, account_id: &str, name: &str) -> anyhow::Result<Option<User>>;
    /// The users of an account.
    fn users(&self, account_id: &str) -> anyhow::Result<Vec<User>>;
    /// Disables (`Some(now)`) or enables (`None`) a user; false when no such user.
    fn set_user_disabled(&self, user_id: &str, disabled_at: Option<i64>) -> anyhow::Result<bool>;
    /// Deletes a user with their access keys and policy attachments, in one transaction;
    /// false when no such user. Their live sessions lose access (the IAM generation moves).
    fn delete_user(&self, user_id: &str) -> anyhow::Result<bool>;
    /// The account's IAM generation: a counter raised by every change that can take access
    /// away (a key revoked, a policy replaced, attached or detached, a user disabled, an
    /// instance's tags replaced), so a running relay
    /// re-checks the live sessions of that account only when it moved.
    fn iam_generation(&self, account_id: &str) -> anyhow::Result<i64>;

    /// Stores an access key by the SHA-256 of its secret.
    fn insert_access_key(&self, key: &AccessKey, secret_hash: &[u8; 32]) -> anyhow::Result<()>;
    /// The owner of the unrevoked key with this secret hash (none for a disabled user's key).
    fn access_key_owner(&self, secret_hash: &[u8; 32]) -> anyhow::Result<Option<KeyOwner>>;
    /// Keys of an account.
    fn access_keys(&self, account_id: &str) -> anyhow::Result<Vec<AccessKey>>;
    /// Revokes a key; false when no such unrevoked key.
    fn revoke_access_key(&self, key_id: &str, now: i64) -> anyhow::Result<bool>;

    /// Creates or replaces a policy document.
    fn put_policy(&self, policy: &PolicyRecord) -> anyhow::Result<()>;
    /// Policies of an account.
    fn policies(&self, account_id: &str) -> anyhow::Result<Vec<PolicyRecord>>;
    /// Attaches a policy to a user; false when the policy does not exist.
    fn attach_policy(&self, account_id: &str, user_id: &str, name: &str) -> anyhow::Result<bool>;
    /// Detaches; false when it was not attached.
    fn detach_policy(&self, account_id: &str, user_id: &str, name: &str) -> anyhow::Result<bool>;
    /// The documents attached to a user.
    fn user_policies(&self, user_id: &str) -> anyhow::Result<Vec<PolicyRecord>>;
    /// Every attachment of an account: `(user id, policy name)`.
    fn policy_attachments(&self, account_id: &str) -> anyhow::Result<Vec<(String, String)>>;
    /// Deletes a policy no user has attached.
    fn delete_policy(&self, account_id: &str, name: &str) -> anyhow::Result<PolicyDeleted>;

    /// Stores an activation by the SHA-256 of its code.
    fn insert_activation(&self, act: &Activation, code_hash: &[u8; 32]) -> anyhow::Result<()>;
    /// Activations of an account (all accounts when `None`).
    fn activations(&self, account_id: Option<&str>) -> anyhow::Result<Vec<Activation>>;
    /// Revokes an activation of the account; false when it has none such or it was already.
    fn revoke_activation(&self, account_id: &str, id: &str, now: i64) -> anyhow::Result<bool>;
    /// Atomically checks an activation and creates `instance` with it (the instance takes the
    /// activation's account, region and tags).
    fn register_instance(
        &self,
        activation_id: &str,
        code_hash: &[u8; 32],
        instance_id: &str,
        secret_hash: &[u8; 32],
        hostname: Option<&str>,
        now: i64,
    ) -> Result<Instance, RegisterError>;

    /// The instance with this secret hash.
    fn instance_by_secret(&self, secret_hash: &[u8; 32]) -> anyhow::Result<Option<Instance>>;
    /// An instance of an account (`None` for another account's instance too).
    fn instance(&self, account_id: &str, id: &str) -> anyhow::Result<Option<Instance>>;
    /// Instances of an account (all when `None`).
    fn instances(&self, account_id: Option<&str>) -> anyhow::Result<Vec<Instance>>;
    /// Replaces an instance's tags; false when no such instance.
    fn set_instance_tags(&self, id: &str, tags: &Tags) -> anyhow::Result<bool>;
    /// Records when the instance's control channel was last seen.
    fn touch_instance(&self, id: &str, now: i64) -> anyhow::Result<()>;
    /// Deletes an instance of the account (its sessions' records stay); false when none such.
    fn deregister_instance(&self, account_id: &str, id: &str) -> anyhow::Result<bool>;
    /// Makes an instance's secret worthless (a new random hash nobody holds) and records when;
    /// false when the account has no such instance.
    fn revoke_instance_secret(&self, account_id: &str, id: &str, now: i64) -> anyhow::Result<bool>;

    /// Stores a new session (`pending`).
    fn insert_session(&self, s: &SessionRecord) -> anyhow::Result<()>;
    /// A session of an account (any account when `None`).
    fn session(&self, account_id: Option<&str>, id: &str) -> anyhow::Result<Option<SessionRecord>>;
    /// Sessions of an account, newest first, `limit` of them, older than `before` (a session
    /// id from the previous page) when given.
    fn sessions(
        &self,
        account_id: Option<&str>,
        filter: StateFilter,
        limit: u32,
        before: Option<&str>,
    ) -> anyhow::Result<Vec<SessionRecord>>;
    /// `pending` → `connected`; false when it was not pending.
    fn mark_connected(&self, id: &str, at: i64) -> anyhow::Result<bool>;
    /// `connected` → `detached` at `at`; false when it was not connected.
    fn mark_detached(&self, id: &str, at: i64) -> anyhow::Result<bool>;
    /// `detached` → `connected`; false when it was not detached.
    fn mark_resumed(&self, id: &str) -> anyhow::Result<bool>;
    /// Relay start with a resume window: in one transaction, closes `node`'s `pending` sessions
    /// as `reason` (never paired: nothing to resume) and makes every `connected` or `detached`
    /// one `detached` at `at`; returns how many were closed, and the detached records.
    fn recover_open(
        &self,
        node: &str,
        reason: CloseReason,
        at: i64,
    ) -> anyhow::Result<(usize, Vec<SessionRecord>)>;
    /// Closes `node`'s `pending` sessions only (relay shutdown with a resume window); returns
    /// how many. "`node`'s", here and in the two others: held by that node, or by none (a
    /// record from before fleets).
    fn close_pending(&self, node: &str, reason: CloseReason, at: i64) -> anyhow::Result<usize>;
    /// Closes a session unless already closed; false when it was (then only larger byte
    /// counts are recorded).
    fn close_session(
        &self,
        id: &str,
        reason: CloseReason,
        bytes_client_to_agent: u64,
        bytes_agent_to_client: u64,
        at: i64,
    ) -> anyhow::Result<bool>;
    /// Records the byte counts of live sessions so far (`(id, client → agent, agent →
    /// client)`), in one transaction; counts only grow, so a smaller (older) count is ignored,
    /// and a closed record is left alone (its final counts come with its end).
    fn record_progress(&self, rows: &[(String, u64, u64)]) -> anyhow::Result<()>;
    /// Stores the final digest of a session's recording (64 hex digits); false when there is
    /// no such session.
    fn set_recording_digest(&self, id: &str, digest: &str) -> anyhow::Result<bool>;
    /// Closes every open session of `node` (relay start after a crash, relay shutdown);
    /// returns how many.
    /// Byte counts stay as last recorded.
    fn close_all_open(&self, node: &str, reason: CloseReason, at: i64) -> anyhow::Result<usize>;
    /// `(session id, instance id)` of sessions closed at or after `at`.
    fn closed_since(&self, at: i64) -> anyhow::Result<Vec<(String, String)>>;
    /// Deletes at most `limit` closed sessions closed before `before`, oldest first; returns
    /// how many. Open sessions are never deleted.
    fn prune_closed(&self, before: i64, limit: u32) -> anyhow::Result<usize>;
    /// Whether other relay processes may share this store (a fleet): then open-session limits
    /// are counted in it ([`Store::admit_session`]) and nodes reach each other through it.
    fn shared(&self) -> bool {
        false
    }
    /// Stores a new session (`pending`) unless one of `limits` is reached, counting the open
    /// sessions of its instance, account and principal in the same transaction, so that nodes
    /// admitting at once cannot pass a limit together.
    fn admit_session(
        &self,
        s: &SessionRecord,
        limits: OpenLimits,
    ) -> anyhow::Result<Result<(), OverLimit>>;
    /// Registers (or re-registers) a node with its current run; its heartbeat is `now`.
    fn register_node(&self, node: &Node) -> anyhow::Result<()>;
    /// A node's heartbeat; false when the node is not registered with that run (another node
    /// expired it, or a newer run of it registered): it must register again.
    fn heartbeat_node(&self, id: &str, run: &str, now: i64) -> anyhow::Result<bool>;
    /// The registered nodes.
    fn nodes(&self) -> anyhow::Result<Vec<Node>>;
    /// Removes the nodes whose last heartbeat is before `before`, in one transaction: their
    /// agents' channel records and mail are dropped, their sessions that never paired are
    /// closed as `reason` at `now`, and their paired ones (`connected`, `detached`) are moved
    /// to `adopter` as `detached` (their legs resume there), or closed as `reason` too when
    /// there is no adopter. Of several nodes doing this at once, each dead node is expired by
    /// one.
    fn expire_nodes(
        &self,
        before: i64,
        reason: CloseReason,
        now: i64,
        adopter: Option<&str>,
    ) -> anyhow::Result<Vec<ExpiredNode>>;
    /// Records that `node` holds `instance`'s control channel now.
    fn set_agent_channel(&self, instance: &str, ch: &AgentChannel) -> anyhow::Result<()>;
    /// Forgets `instance`'s control channel if `node` still holds it; false when not.
    fn clear_agent_channel(&self, instance: &str, node: &str) -> anyhow::Result<bool>;
    /// Forgets every control channel `node` held (its start after a crash); returns how many.
    fn clear_agent_channels(&self, node: &str) -> anyhow::Result<usize>;
    /// `(instance, node)` of every control channel held by a node that heartbeat at or after
    /// `since`.
    fn online_instances(&self, since: i64) -> anyhow::Result<Vec<(String, String)>>;
    /// The node holding `instance`'s control channel, if any does.
    fn agent_channel(&self, instance: &str) -> anyhow::Result<Option<AgentChannel>>;
    /// Leaves a message for `node` (and wakes it where the engine can).
    fn send_mail(&self, node: &str, body: &str, now: i64) -> anyhow::Result<()>;
    /// Takes (and deletes) `node`'s messages, oldest first, at most `limit`.
    fn take_mail(&self, node: &str, limit: u32) -> anyhow::Result<Vec<String>>;
    /// Starts listening for [`Wake`]s addressed to `node` (or to every node), where the
    /// engine can deliver them (PostgreSQL's `LISTEN/NOTIFY`); `None` where it cannot (SQLite:
    /// one relay, nothing to hear). Wakes are coalesced: the channel holds at most one of
    /// each. A lost connection is reopened, and both wakes are sent then (what came in between
    /// was missed). The listener stops when the receiver is dropped.
    fn listen(&self, node: &str) -> anyhow::Result<Option<tokio::sync::mpsc::Receiver<Wake>>> {
        let _ = node;
        Ok(None)
    }
    /// The token signing keys kept in the store (kid, PKCS#8), oldest first: a fleet's nodes
    /// share them. Empty for a store that keeps none (SQLite: the data directory has them).
    fn signing_keys(&self) -> anyhow::Result<Vec<(String, Vec<u8>)>>;
    /// Adds a signing key unless one with its kid exists, or (`only_if_none`) unless the store
    /// holds any key (the first node of a fleet; one of several starting at once wins); false
    /// when nothing was added.
    fn add_signing_key(
        &self,
        kid: &str,
        pkcs8: &[u8],
        now: i64,
        only_if_none: bool,
    ) -> anyhow::Result<bool>;
    /// Appends an audit event (its JSON `line`) written at `at`.
    fn append_audit(&self, at: i64, account: Option<&str>, line: &str) -> anyhow::Result<()>;
    /// `account`'s audit events written at or after `since` with a `seq` above `after`,
    /// oldest first, at most `limit`.
    fn audit_events(
        &self,
        account: &str,
        since: i64,
        after: i64,
        limit: u32,
    ) -> anyhow::Result<Vec<AuditRecord>>;
    /// Applies an agent's counts of a session whose end a relay lost: only to a session of
    /// `instance_id` closed as `reason` (`relay_shutdown`), and only raising counts. False when
    /// no such session exists (then nothing changed).
    fn record_lost_counts(
        &self,
        id: &str,
        instance_id: &str,
        reason: CloseReason,
        bytes_client_to_agent: u64,
        bytes_agent_to_client: u64,
    ) -> anyhow::Result<bool>;
}
