//! JSON bodies of the control-plane API (DESIGN.md "Control plane"), shared by the relay, the
//! CLI, the agent and the load test so that all of them agree on field names.

use serde::{Deserialize, Serialize};

/// Session mode: an interactive login shell or one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The run-as user's login shell in a PTY.
    Shell,
    /// One command: with pipes for stdin, stdout and stderr, or in a PTY when asked for
    /// (`tty`).
    Exec,
    /// Port forwarding: TCP connections to `remote_host:remote_port` as the instance sees it,
    /// many in one session (docs/PROTOCOL.md, "Port forwarding").
    Port,
}

impl Mode {
    /// The name used in JSON and in policy conditions (`hatch:Mode`).
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shell => "shell",
            Mode::Exec => "exec",
            Mode::Port => "port",
        }
    }

    /// The mode named `s` (as [`Mode::as_str`] names it).
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "shell" => Mode::Shell,
            "exec" => Mode::Exec,
            "port" => Mode::Port,
            _ => return None,
        })
    }
}

/// Whether `name` is a user name the relay accepts in `run_as` and in an agent's `hello`:
/// 1-64 ASCII letters, digits, `.`, `_`, `-`, not starting with `-` (a portable subset of
/// what `useradd` accepts; it can never be read as an option or a path).
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !name.starts_with('-')
}

/// `POST /v1/sessions` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartSessionRequest {
    /// Target instance, `i-` followed by 16 hex digits.
    pub instance_id: String,
    /// Shell or exec.
    pub mode: Mode,
    /// The command and its arguments, for `exec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// The user to run as on the instance; the agent's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// The client's `TERM`, passed to the PTY.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    /// exec: `true` runs the command in a PTY (stdout and stderr both on it), `false` with
    /// pipes (stdin, stdout and stderr apart, bytes unchanged; stderr comes as STDERR
    /// messages). Absent: a PTY exactly when `term` is given, as for clients that predate the
    /// field (they do not know STDERR, so their stderr stays merged into DATA). A shell always
    /// has a PTY; `false` there is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<bool>,
    /// port: the host to connect to, as the instance resolves it; `localhost` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<String>,
    /// port: the port to connect to (required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
}

/// `POST /v1/sessions` answer (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartSessionResponse {
    /// Session id, `s-` followed by 16 hex digits.
    pub session_id: String,
    /// `wss://host:port/v1/stream/{sid}?role=client`.
    pub stream_url: String,
    /// Bearer token for the client leg, valid until `expires_at`.
    pub token: String,
    /// Token expiry, RFC 3339 UTC.
    pub expires_at: String,
    /// Seconds the relay keeps a session whose connection was lost for the client to resume
    /// it; absent or 0: a lost connection ends the session (the client does not try).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_window_s: Option<u64>,
}

/// `POST /v1/sessions/{id}/resume` body (optional: an empty body is `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeSessionRequest {
    /// Take the session over even when another client is attached to it (that client's leg is
    /// closed with 4014 and does not reconnect). Without it, a session whose client leg is
    /// attached answers 409 `SessionAttached`.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/sessions/{id}/resume` answer (200): a token for a new client leg of a live
/// session. The same shape as [`StartSessionResponse`].
pub type ResumeSessionResponse = StartSessionResponse;

/// One session as the API describes it (`GET /v1/sessions/{id}`, lists, terminate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session id.
    pub session_id: String,
    /// Target instance.
    pub instance_id: String,
    /// Who started it: `owner` or a user id.
    pub principal: String,
    /// The caller's address as the API saw it.
    pub source_ip: String,
    /// Shell or exec.
    pub mode: Mode,
    /// The command of an exec session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// The user the session runs as: the one asked for, or the agent's default user (the
    /// one the policy was evaluated with). Absent only in records made before relays
    /// recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    /// `pending` (token issued), `connected` (both legs paired), `detached` (paired before, its
    /// legs lost: resumable within the relay's resume window) or `closed`.
    pub state: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC, once both legs paired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<String>,
    /// RFC 3339 UTC, once closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<String>,
    /// RFC 3339 UTC, when it last became `detached` (kept once it is connected again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_at: Option<String>,
    /// Why it closed: `exit`, `client_closed`, `agent_closed`, `terminated`, `idle_timeout`,
    /// `max_duration`, `pair_timeout`, `relay_shutdown`, `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<String>,
    /// Payload bytes client → agent.
    pub bytes_client_to_agent: u64,
    /// Payload bytes agent → client.
    pub bytes_agent_to_client: u64,
    /// A port session's destination host, as asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_host: Option<String>,
    /// A port session's destination port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<u16>,
}

/// `GET /v1/sessions` answer: newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionList {
    /// One page of sessions.
    pub sessions: Vec<SessionInfo>,
    /// Pass as `?next_token=` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_token: Option<String>,
}

/// One instance as `GET /v1/instances` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// `i-` followed by 16 hex digits.
    pub instance_id: String,
    /// Region.
    pub region: String,
    /// Host name reported at registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Tags.
    pub tags: std::collections::BTreeMap<String, String>,
    /// Whether its agent's control channel is up now.
    pub online: bool,
    /// RFC 3339 UTC: when its control channel was last seen up (now, when online).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

/// `GET /v1/instances` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceList {
    /// Instances the caller may see.
    pub instances: Vec<InstanceInfo>,
}

/// An account's session recording (docs/RECORDING.md): what the relay keeps of each of its
/// sessions.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RecordingMode {
    /// Nothing (the default).
    #[default]
    Off,
    /// What the session showed: output, resizes, the exit status.
    Output,
    /// Output and what was typed (input).
    Full,
}

impl RecordingMode {
    /// The name used in JSON, in the store and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordingMode::Off => "off",
            RecordingMode::Output => "output",
            RecordingMode::Full => "full",
        }
    }

    /// The mode named `s` (as [`RecordingMode::as_str`] names it).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => RecordingMode::Off,
            "output" => RecordingMode::Output,
            "full" => RecordingMode::Full,
            _ => return None,
        })
    }

    /// Whether anything is recorded.
    pub fn is_on(self) -> bool {
        self != RecordingMode::Off
    }

    /// Whether input is recorded too.
    pub fn records_input(self) -> bool {
        self == RecordingMode::Full
    }
}

/// `GET|PUT /v1/account/settings` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountSettings {
    /// The account-wide switch: when false, no session can start and turning it off ends the
    /// live ones (close code 4010).
    pub session_manager_enabled: bool,
    /// The account's idle timeout in seconds; absent: the relay's (`--idle-timeout`). The
    /// relay's is a cap: a longer one has no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// The account's longest session in seconds; absent: the relay's (`--max-duration`), also
    /// a cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<u64>,
    /// Session recording of the account's sessions started from now on.
    #[serde(default)]
    pub recording: RecordingMode,
}

/// `PUT /v1/account/settings` body: what to change (absent: unchanged). A preference of 0
/// goes back to the relay's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSettingsUpdate {
    /// The switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_manager_enabled: Option<bool>,
    /// Idle timeout in seconds, 1 to 30 days' worth; 0: the relay's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
    /// Longest session in seconds, 1 to 30 days' worth; 0: the relay's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_s: Option<u64>,
    /// Session recording (`off`, `output`, `full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<RecordingMode>,
}

/// A user as the IAM API shows it (`GET|POST /v1/users`, `DELETE /v1/users/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// `u-` followed by 16 hex digits.
    pub user_id: String,
    /// Unique inside the account; the API addresses users by it.
    pub name: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC, when the user was disabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at: Option<String>,
    /// Names of the policies attached.
    #[serde(default)]
    pub policies: Vec<String>,
}

/// `GET /v1/users` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserList {
    /// The account's users.
    pub users: Vec<UserInfo>,
}

/// `POST /v1/users` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    /// 1-64 letters, digits, `.`, `_`, `@`, `-`.
    pub name: String,
}

/// An access key as the IAM API shows it (never its secret, except once at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyInfo {
    /// `ak-` followed by 16 hex digits.
    pub access_key_id: String,
    /// The user's name; absent for an account owner's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC, when revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// The secret: only in the answer to `POST /v1/access-keys`, never again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `GET /v1/access-keys` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyList {
    /// Keys the caller may list.
    pub access_keys: Vec<AccessKeyInfo>,
}

/// `POST /v1/access-keys` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccessKeyRequest {
    /// The user's name; absent: a key of the account owner (the owner only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A policy as the IAM API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    /// Unique inside the account.
    pub name: String,
    /// The document, as JSON.
    pub document: serde_json::Value,
    /// RFC 3339 UTC.
    pub updated_at: String,
    /// Names of the users it is attached to.
    #[serde(default)]
    pub attached_to: Vec<String>,
}

/// `GET /v1/policies` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyList {
    /// The account's policies.
    pub policies: Vec<PolicyInfo>,
}

/// `PUT /v1/instances/{id}/tags` body: the instance's new tags (replacing all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagInstanceRequest {
    /// Key → value.
    pub tags: std::collections::BTreeMap<String, String>,
}

/// An activation as the IAM API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationInfo {
    /// `act-` followed by 16 hex digits.
    pub activation_id: String,
    /// Region its instances join.
    pub region: String,
    /// Tags each instance gets.
    pub tags: std::collections::BTreeMap<String, String>,
    /// How many instances may register with it.
    pub max_registrations: u32,
    /// How many did.
    pub registrations: u32,
    /// RFC 3339 UTC.
    pub expires_at: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC, when revoked (no registration is accepted after).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// The activation code: only in the answer to `POST /v1/activations`, never again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_code: Option<String>,
}

/// `GET /v1/activations` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivationList {
    /// The account's activations.
    pub activations: Vec<ActivationInfo>,
}

/// `POST /v1/activations` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateActivationRequest {
    /// 1-64 letters, digits or `-`.
    pub region: String,
    /// Tags each instance gets.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// How many instances may register with it (default 1).
    #[serde(default = "one")]
    pub max_registrations: u32,
    /// How long it is valid, in seconds (default 86,400: a day; at most 30 days).
    #[serde(default = "a_day")]
    pub valid_for_s: u64,
}

fn one() -> u32 {
    1
}

fn a_day() -> u64 {
    86_400
}

/// `POST /v1/console/links` body (optional: an empty body is `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleLinkRequest {
    /// The instance whose terminal the console opens after the login, `i-...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

/// `POST /v1/console/links` answer (201): a one-time login link to the browser console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleLinkResponse {
    /// `https://host:port/console/#link=<code>`: opens the console logged in as the caller,
    /// once.
    pub url: String,
    /// When the link dies unused, RFC 3339 UTC.
    pub expires_at: String,
}

/// Every API error body: `{code, message, request_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One of the stable codes in [`codes`].
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The id of the request, for support and logs (absent on data-plane refusals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Stable error codes a script can branch on.
pub mod codes {
    /// The caller's policy does not allow the action (403).
    pub const ACCESS_DENIED: &str = "AccessDenied";
    /// Session management is switched off for the account (403).
    pub const SESSION_MANAGER_DISABLED: &str = "SessionManagerDisabled";
    /// No such instance visible to the caller (404).
    pub const INSTANCE_NOT_FOUND: &str = "InstanceNotFound";
    /// No such session visible to the caller (404).
    pub const SESSION_NOT_FOUND: &str = "SessionNotFound";
    /// The instance's agent is not connected (409).
    pub const TARGET_NOT_CONNECTED: &str = "TargetNotConnected";
    /// The session cannot be resumed: it is closed, or it never paired (409).
    pub const SESSION_ENDED: &str = "SessionEnded";
    /// The session has a client attached; resume with `force` to take it over (409).
    pub const SESSION_ATTACHED: &str = "SessionAttached";
    /// The token or access key is missing, malformed or not valid here (401).
    pub const INVALID_TOKEN: &str = "InvalidToken";
    /// The token has expired (401).
    pub const TOKEN_EXPIRED: &str = "TokenExpired";
    /// The token was already used (409).
    pub const TOKEN_ALREADY_USED: &str = "TokenAlreadyUsed";
    /// A concurrency or rate limit was hit (429).
    pub const THROTTLED: &str = "Throttled";
    /// The request was malformed (400).
    pub const INVALID_REQUEST: &str = "InvalidRequest";
    /// No such path (404).
    pub const NOT_FOUND: &str = "NotFound";
    /// No such user, policy, access key or activation in the caller's account (404).
    pub const NO_SUCH_ENTITY: &str = "NoSuchEntity";
    /// A user or policy of that name already exists (409).
    pub const ENTITY_ALREADY_EXISTS: &str = "EntityAlreadyExists";
    /// The entity is in use: a policy still attached to users (409).
    pub const DELETE_CONFLICT: &str = "DeleteConflict";
    /// A policy document was refused; the message names the field (400).
    pub const MALFORMED_POLICY_DOCUMENT: &str = "MalformedPolicyDocument";
    /// An unexpected failure on the server (500).
    pub const INTERNAL_ERROR: &str = "InternalError";
    /// A browser request from a page of another origin: a console write, or a WebSocket
    /// upgrade of the data plane, whose `Origin` is not the console's (403).
    pub const ORIGIN_NOT_ALLOWED: &str = "OriginNotAllowed";
    /// A console write without the console session's CSRF token in `x-hatch-csrf` (403).
    pub const CSRF_TOKEN_MISMATCH: &str = "CsrfTokenMismatch";
    /// The account requires recording and the relay cannot write recordings now (503): the
    /// session is refused rather than run unrecorded.
    pub const RECORDING_UNAVAILABLE: &str = "RecordingUnavailable";
    /// The session has no recording: it was not recorded, or its file is gone (404).
    pub const RECORDING_NOT_FOUND: &str = "RecordingNotFound";
    /// The session's recording does not verify (its chain is broken, or it ends elsewhere
    /// than the digest the relay kept); the message names the first broken record (409).
    pub const RECORDING_CORRUPT: &str = "RecordingCorrupt";
}
