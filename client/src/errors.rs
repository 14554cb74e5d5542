//! Every way a `hatch` command can fail, and for each one the line a person reads and the exit
//! code a script branches on (DESIGN.md "Client exit codes"; the numbers follow `sysexits.h`
//! and OpenSSH).
//!
//! One [`CliError`] is printed once, by `run`, as `hatch: <label>: <what happened>; <next step>`.

use hatch_proto::api::{ErrorBody, codes};
use hatch_proto::close;
use thiserror::Error;

/// Exit codes of the CLI.
pub mod exit {
    /// Command-line usage error (`EX_USAGE`).
    pub const USAGE: u8 = 64;
    /// The named instance or session does not exist for the caller (`EX_NOHOST`).
    pub const NOT_FOUND: u8 = 68;
    /// The target's agent is not connected (`EX_UNAVAILABLE`).
    pub const UNAVAILABLE: u8 = 69;
    /// The relay reported an internal failure (`EX_SOFTWARE`).
    pub const SOFTWARE: u8 = 70;
    /// A local I/O failure: stdout or stdin broke (`EX_IOERR`).
    pub const IO: u8 = 74;
    /// Token expired, session timed out, throttled: trying again later can work
    /// (`EX_TEMPFAIL`).
    pub const TEMPFAIL: u8 = 75;
    /// The server at the API URL does not speak the Hatch API (`EX_PROTOCOL`).
    pub const PROTOCOL: u8 = 76;
    /// Access denied by policy, by the account switch, or a bad access key (`EX_NOPERM`).
    pub const NOPERM: u8 = 77;
    /// Missing or unreadable local configuration (`EX_CONFIG`).
    pub const CONFIG: u8 = 78;
    /// The agent cannot run the session as the user asked for: no such user on the instance,
    /// or an agent that cannot switch users (`EX_NOUSER`).
    pub const NO_USER: u8 = 67;
    /// The agent does not allow the port-forwarding destination (`EX_NOINPUT`: what was to
    /// be opened cannot be).
    pub const FORWARD_NOT_ALLOWED: u8 = 66;
    /// Aborted locally before the session started (128 + SIGINT, as a shell reports it).
    pub const ABORTED: u8 = 130;
    /// Transport failure, lost connection, `~.` disconnect (as OpenSSH).
    pub const TRANSPORT: u8 = 255;
    /// The account's state refuses the request (HTTP 409): a name already taken, a policy
    /// still attached, a session attached elsewhere or ended. 255, as the relay's 409s have
    /// always exited: there is no `sysexits.h` code for it, and no other code of ours means it.
    pub const CONFLICT: u8 = TRANSPORT;
}

/// What a failed request was about, so that the message can name the action and the target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subject {
    /// The policy action the request needs, such as `hatch:StartSession`.
    pub action: &'static str,
    /// The instance the request named.
    pub instance: Option<String>,
    /// The session the request named.
    pub session: Option<String>,
    /// For TargetNotConnected: when the agent was last seen, in words ("3 min ago").
    pub last_seen: Option<String>,
    /// The error came from the data plane (the session token), not the API (the access key).
    pub data_plane: bool,
    /// The request is the account owner's alone (account settings): AccessDenied means the
    /// key is not an owner key, not that a policy is missing.
    pub owner_only: bool,
    /// Commands that list what the request named (`hatch users list`), for the next step of
    /// NoSuchEntity and EntityAlreadyExists.
    pub list_with: &'static [&'static str],
}

/// An error answer of the relay, with what the request was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    /// HTTP status.
    pub status: u16,
    /// The error body (`code`, `message`, `request_id`).
    pub body: ErrorBody,
    /// What the request was about.
    pub subject: Subject,
    /// `-v` summary of the HTTP exchange.
    pub exchange: Option<String>,
}

impl CliError {
    /// A [`CliError::Api`].
    pub fn api(status: u16, body: ErrorBody, subject: Subject, exchange: Option<String>) -> Self {
        CliError::Api(Box::new(ApiFailure { status, body, subject, exchange }))
    }
}

/// A failure of one `hatch` command.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CliError {
    /// Bad command-line arguments.
    #[error("usage: {0}")]
    Usage(String),
    /// A setting is missing or unreadable; the text names the setting and how to set it.
    #[error("configuration: {0}")]
    Config(String),
    /// The relay answered with an error body.
    #[error("{}: {}", .0.body.code, .0.body.message)]
    Api(Box<ApiFailure>),
    /// The relay answered something that is not the Hatch API.
    #[error("unexpected answer from {url}: {detail}")]
    BadResponse {
        /// The URL asked.
        url: String,
        /// What was wrong with the answer.
        detail: String,
    },
    /// The TLS handshake failed (certificate problems above all).
    #[error("TLS with {url} failed: {detail}")]
    Tls {
        /// The URL dialled.
        url: String,
        /// The certificate problem, in words.
        detail: String,
    },
    /// The TCP connection could not be made.
    #[error("cannot connect to {url}: {detail}")]
    Connect {
        /// The URL dialled.
        url: String,
        /// The OS error.
        detail: String,
    },
    /// A peer did not answer in time.
    #[error("{what} from {url} timed out")]
    Timeout {
        /// The URL dialled.
        url: String,
        /// What was awaited.
        what: &'static str,
    },
    /// The relay closed the session's stream with a close code other than 1000.
    #[error("closed with {code}")]
    Closed {
        /// WebSocket close code.
        code: u16,
        /// The close frame's reason text, possibly empty.
        reason: String,
        /// The session's instance, when known.
        instance: Option<String>,
    },
    /// The connection to the relay dropped without a close.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The connection was lost and the session could not be resumed (it ended meanwhile, the
    /// resume window passed, or the caller may no longer resume it).
    #[error("not resumed: {0}")]
    NotResumed(String),
    /// The session ended normally but the agent never said how the command exited.
    #[error("session ended without an exit status")]
    NoExitStatus,
    /// The user typed `~.`.
    #[error("disconnected")]
    Disconnected,
    /// The user aborted before the session started.
    #[error("aborted")]
    Aborted,
    /// A local I/O failure (stdout closed, stdin unreadable).
    #[error("local i/o: {0}")]
    Local(String),
    /// A signal (SIGTERM, SIGHUP) ended the session; the exit code is 128 + its number.
    #[error("{0}")]
    Signal(&'static str, u8),
}

impl CliError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => exit::USAGE,
            CliError::Config(_) => exit::CONFIG,
            CliError::Api(a) => api_exit_code(&a.body.code, a.status, &a.subject),
            CliError::BadResponse { .. } => exit::PROTOCOL,
            CliError::Tls { .. }
            | CliError::Connect { .. }
            | CliError::Timeout { .. }
            | CliError::Lost(_)
            | CliError::NotResumed(_)
            | CliError::NoExitStatus
            | CliError::Disconnected => exit::TRANSPORT,
            CliError::Closed { code, .. } => close_exit_code(*code),
            CliError::Aborted => exit::ABORTED,
            CliError::Local(_) => exit::IO,
            CliError::Signal(_, code) => *code,
        }
    }

    /// The one line to print after `hatch: `: a label (the API error code when there is one),
    /// what happened and what to do next. `verbose` adds the request id and the exchange.
    pub fn message(&self, verbose: bool) -> String {
        match self {
            CliError::Usage(m) => format!("usage: {m}; see `hatch help`"),
            CliError::Config(m) => format!("configuration: {m}"),
            CliError::Api(a) => {
                let ApiFailure { status, body, subject, exchange } = &**a;
                let mut line =
                    format!("{}: {}", body.code, api_words(&body.code, *status, body, subject));
                if verbose {
                    if let Some(id) = &body.request_id {
                        line.push_str(&format!(" [request id {id}]"));
                    }
                    if let Some(x) = exchange {
                        line.push_str(&format!(" [{x}]"));
                    }
                    if !body.message.is_empty() {
                        line.push_str(&format!(" [relay said: {}]", body.message));
                    }
                }
                line
            }
            CliError::BadResponse { url, detail } => format!(
                "BadResponse: {url} answered {detail}; is the API URL (HATCH_API or `hatch \
                 configure`) a Hatch relay?"
            ),
            CliError::Tls { url, detail } => format!(
                "TLS: cannot verify {url}: {detail}; check the CA file (HATCH_CA or `hatch \
                 configure --ca`) and the host name in the URL"
            ),
            CliError::Connect { url, detail } => format!(
                "ConnectionFailed: cannot connect to {url}: {detail}; is the relay running and \
                 is the URL right?"
            ),
            CliError::Timeout { url, what } => format!(
                "Timeout: no {what} from {url} in time; check the network path to the relay"
            ),
            CliError::Closed { code, reason, instance } => {
                let mut line = format!("{}: {}", close_label(*code), close_words(*code, instance));
                if verbose && !reason.is_empty() {
                    line.push_str(&format!(" [relay said: {reason}]"));
                }
                line
            }
            CliError::Lost(detail) => format!(
                "ConnectionLost: connection to the relay lost ({detail}); the remote command \
                 may still be running until the relay notices"
            ),
            CliError::NotResumed(why) => format!(
                "NotResumed: the connection to the relay was lost and the session could not be \
                 resumed: {why}"
            ),
            CliError::NoExitStatus => "NoExitStatus: the session ended without an exit status \
                                       from the agent; check the session with `hatch sessions \
                                       show`"
                .to_owned(),
            CliError::Disconnected => "Disconnected: connection closed by `~.`".to_owned(),
            CliError::Aborted => "Aborted: stopped before the session started".to_owned(),
            CliError::Local(m) => format!("LocalIo: {m}"),
            CliError::Signal(name, _) => {
                format!("Signal: {name} received; the session was closed")
            }
        }
    }
}

/// Exit code of an API error code; `status` decides for codes this version does not know.
fn api_exit_code(code: &str, status: u16, subject: &Subject) -> u8 {
    match code {
        codes::ACCESS_DENIED | codes::SESSION_MANAGER_DISABLED => exit::NOPERM,
        codes::INVALID_TOKEN if !subject.data_plane => exit::NOPERM,
        codes::INVALID_TOKEN => exit::TRANSPORT,
        codes::INSTANCE_NOT_FOUND
        | codes::SESSION_NOT_FOUND
        | codes::NO_SUCH_ENTITY
        | codes::RECORDING_NOT_FOUND => exit::NOT_FOUND,
        codes::RECORDING_CORRUPT => exit::CONFLICT,
        codes::RECORDING_UNAVAILABLE => exit::TEMPFAIL,
        codes::ENTITY_ALREADY_EXISTS
        | codes::DELETE_CONFLICT
        | codes::SESSION_ATTACHED
        | codes::SESSION_ENDED => exit::CONFLICT,
        codes::MALFORMED_POLICY_DOCUMENT => exit::USAGE,
        codes::TARGET_NOT_CONNECTED => exit::UNAVAILABLE,
        codes::TOKEN_EXPIRED | codes::TOKEN_ALREADY_USED | codes::THROTTLED => exit::TEMPFAIL,
        codes::INVALID_REQUEST => exit::USAGE,
        codes::NOT_FOUND => exit::PROTOCOL,
        codes::INTERNAL_ERROR => exit::SOFTWARE,
        _ => match status {
            401 | 403 => exit::NOPERM,
            429 | 503 => exit::TEMPFAIL,
            500..=599 => exit::SOFTWARE,
            _ => exit::TRANSPORT,
        },
    }
}

fn target(subject: &Subject) -> String {
    match (&subject.instance, &subject.session) {
        (Some(i), _) => i.clone(),
        (None, Some(s)) => s.clone(),
        (None, None) => "this account".to_owned(),
    }
}

fn api_words(code: &str, status: u16, body: &ErrorBody, subject: &Subject) -> String {
    let instance = subject.instance.as_deref().unwrap_or("the instance");
    let session = subject.session.as_deref().unwrap_or("the session");
    let relay_said = |fallback: &str| {
        if body.message.is_empty() { fallback.to_owned() } else { body.message.clone() }
    };
    let listed = if subject.list_with.is_empty() {
        "check the name".to_owned()
    } else {
        let commands: Vec<String> = subject.list_with.iter().map(|c| format!("`{c}`")).collect();
        format!("see {}", commands.join(" and "))
    };
    match code {
        codes::ACCESS_DENIED if subject.owner_only => {
            "only the account owner may do this; use an owner access key".to_owned()
        }
        codes::ACCESS_DENIED => format!(
            "your policy does not allow {} on {}; ask an administrator",
            subject.action,
            target(subject)
        ),
        codes::SESSION_MANAGER_DISABLED => "session management is switched off for this \
                                            account; ask the account owner to turn it on"
            .to_owned(),
        codes::INSTANCE_NOT_FOUND => {
            format!(
                "no instance {instance} is visible to you; list instances with `hatch instances`"
            )
        }
        codes::SESSION_NOT_FOUND => {
            format!("no session {session} is visible to you; list sessions with `hatch sessions`")
        }
        codes::SESSION_ATTACHED => format!(
            "another client is attached to {session}; `hatch attach --force {session}` takes \
             it over (that client is detached)"
        ),
        codes::SESSION_ENDED => format!(
            "{session} has ended (or was never connected): there is nothing to attach to or \
             resume; start a new session"
        ),
        codes::TARGET_NOT_CONNECTED => {
            let seen = match &subject.last_seen {
                Some(when) => format!("agent on {instance} last seen {when}"),
                None => format!("agent on {instance} is not connected"),
            };
            format!("{seen}; is hatch-agent running and can it reach the relay?")
        }
        codes::INVALID_TOKEN if subject.data_plane => {
            "the relay refused the session token; start the session again".to_owned()
        }
        codes::INVALID_TOKEN => "the relay did not accept the access key; check it with `hatch \
                                 configure` or HATCH_ACCESS_KEY"
            .to_owned(),
        codes::TOKEN_EXPIRED => {
            "the session token expired before it was used; start the session again".to_owned()
        }
        codes::TOKEN_ALREADY_USED => {
            "the session token was already used; start a new session".to_owned()
        }
        codes::THROTTLED => format!(
            "too many sessions or requests ({}); wait and try again, or end sessions you no \
             longer need (`hatch sessions --active`)",
            body.message
        ),
        codes::INVALID_REQUEST => {
            format!("the relay rejected the request: {}; check the arguments", body.message)
        }
        codes::NO_SUCH_ENTITY => format!("{}; {listed}", relay_said("no such entity")),
        codes::ENTITY_ALREADY_EXISTS => {
            format!("{}; choose another name, or {listed}", relay_said("the name is taken"))
        }
        // The relay's words name the users; these say how to find and detach them.
        codes::DELETE_CONFLICT => format!(
            "{}; `hatch policies show NAME` lists the users it is attached to and `hatch users \
             detach USER NAME` detaches it",
            relay_said("it is still in use")
        ),
        // The relay's words name the policy and the bad field (`Statement[0].Effect`).
        codes::MALFORMED_POLICY_DOCUMENT => format!(
            "{}; fix the document and put it again (docs/POLICY.md)",
            relay_said("the relay refused the policy document")
        ),
        codes::RECORDING_NOT_FOUND => format!(
            "{session} has no recording (it was not recorded, or its recording was deleted \
             after the relay's --recording-retention)"
        ),
        codes::RECORDING_CORRUPT => format!(
            "{}; the relay's operator can check it with `hatch-relay admin recordings verify`",
            relay_said("the recording does not verify")
        ),
        codes::RECORDING_UNAVAILABLE => "the account requires session recording and the relay \
                                         cannot write recordings now; ask its operator to \
                                         check the recording directory's disk"
            .to_owned(),
        codes::NOT_FOUND => "the relay does not know this API path; is the API URL (HATCH_API or \
                             `hatch configure`) right and the relay up to date?"
            .to_owned(),
        codes::INTERNAL_ERROR => format!(
            "the relay failed ({}); try again, and give the request id to its operator if it \
             persists (run with -v to see it)",
            body.message
        ),
        other => format!(
            "the relay answered HTTP {status} with code {other:?}: {}; run with -v for details",
            body.message
        ),
    }
}

/// Exit code of a close code other than 1000 (a 1000 close exits with the EXIT status).
fn close_exit_code(code: u16) -> u8 {
    match code {
        close::TOKEN_EXPIRED
        | close::TOKEN_ALREADY_USED
        | close::IDLE_TIMEOUT
        | close::MAX_DURATION => exit::TEMPFAIL,
        close::PEER_NEVER_CAME => exit::UNAVAILABLE,
        close::SESSION_MANAGER_DISABLED | close::ACCESS_REVOKED => exit::NOPERM,
        close::RUN_AS_UNAVAILABLE => exit::NO_USER,
        close::FORWARD_NOT_ALLOWED => exit::FORWARD_NOT_ALLOWED,
        _ => exit::TRANSPORT,
    }
}

fn close_label(code: u16) -> String {
    let name = match code {
        close::INVALID_TOKEN => "InvalidToken",
        close::TOKEN_EXPIRED => "TokenExpired",
        close::TOKEN_ALREADY_USED => "TokenAlreadyUsed",
        close::PEER_NEVER_CAME => "PeerNeverCame",
        close::PEER_GONE => "AgentLost",
        close::GOING_AWAY => "AgentGoingAway",
        close::POLICY_VIOLATION => "AgentRefused",
        close::INTERNAL_ERROR => "AgentFailed",
        close::AGENT_SHUTDOWN => "AgentShutdown",
        close::TERMINATED => "Terminated",
        close::IDLE_TIMEOUT => "IdleTimeout",
        close::MAX_DURATION => "MaxDuration",
        close::RELAY_SHUTDOWN => "RelayShutdown",
        close::SESSION_MANAGER_DISABLED => "SessionManagerDisabled",
        close::ACCESS_REVOKED => "AccessRevoked",
        close::RESUME_FAILED => "ResumeFailed",
        close::ATTACHED_ELSEWHERE => "AttachedElsewhere",
        close::PEER_RESUMING => "PeerResuming",
        close::RUN_AS_UNAVAILABLE => "RunAsUnavailable",
        close::FORWARD_NOT_ALLOWED => "ForwardNotAllowed",
        close::RECORDING_FAILED => "RecordingFailed",
        _ => "Closed",
    };
    format!("{name} (close {code})")
}

fn close_words(code: u16, instance: &Option<String>) -> String {
    let on = instance.as_deref().map(|i| format!(" on {i}")).unwrap_or_default();
    match code {
        close::INVALID_TOKEN => {
            "the relay refused the session token; start the session again".to_owned()
        }
        close::TOKEN_EXPIRED => {
            "the session token expired before it was used; start the session again".to_owned()
        }
        close::TOKEN_ALREADY_USED => {
            "the session token was already used; start a new session".to_owned()
        }
        close::PEER_NEVER_CAME => format!(
            "the agent{on} never joined the session; is hatch-agent running and can it reach the \
             relay?"
        ),
        close::PEER_GONE => format!(
            "agent connection lost{on}; the instance or its agent may have stopped, check it \
             with `hatch instances`"
        ),
        // The relay forwards the agent's own close codes; it never sends 1001, 1008 or 1011.
        close::GOING_AWAY => format!(
            "the agent{on} went away (hatch-agent or its host stopping); start the session \
             again once `hatch instances` shows the instance online"
        ),
        close::AGENT_SHUTDOWN => format!(
            "the agent{on} is shutting down; start the session again once `hatch instances` \
             shows the instance online"
        ),
        close::POLICY_VIOLATION => format!(
            "the agent{on} refused to start the session (its reason is in the remote error \
             above); check the user asked for with --user"
        ),
        close::FORWARD_NOT_ALLOWED => format!(
            "the agent{on} does not allow connections to that destination (its reason is in the \
             remote error above); its operator allows destinations with `hatch-agent run \
             --allow-forward HOST:PORT`"
        ),
        close::RUN_AS_UNAVAILABLE => format!(
            "the agent{on} cannot run the session as the user asked for (its reason is in the \
             remote error above); name a user that exists there with --user, or run hatch-agent \
             as root to switch users"
        ),
        close::INTERNAL_ERROR => format!(
            "the agent{on} could not start the session (its reason is in the remote error \
             above); check the instance"
        ),
        close::RECORDING_FAILED => "the relay could not record the session, which the account \
                                    requires, and ended it; ask the relay's operator to check \
                                    the recording directory's disk"
            .to_owned(),
        // The same code for the session's owner, an administrator and the relay's admin
        // command: the words do not guess who.
        close::TERMINATED => "the session was terminated through the API (`hatch terminate` or \
                              DELETE /v1/sessions/ID); start a new one if you may"
            .to_owned(),
        close::IDLE_TIMEOUT => {
            "the session was closed after being idle too long; start a new session".to_owned()
        }
        close::MAX_DURATION => {
            "the session reached its maximum duration; start a new session".to_owned()
        }
        close::RELAY_SHUTDOWN => {
            "the relay is shutting down; start the session again in a moment".to_owned()
        }
        close::SESSION_MANAGER_DISABLED => "session management was switched off for the \
                                            account; ask the account owner"
            .to_owned(),
        close::ACCESS_REVOKED => "your access to this session was revoked (your access key \
                                  revoked, your user disabled, or your policy changed); ask an \
                                  administrator"
            .to_owned(),
        other => format!(
            "the relay closed the session: {} ({other}); start the session again",
            close::describe(other)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: &str, status: u16, subject: Subject) -> CliError {
        CliError::api(
            status,
            ErrorBody {
                code: code.to_owned(),
                message: "relay words".to_owned(),
                request_id: Some("req-1".to_owned()),
            },
            subject,
            Some("POST https://relay/v1/sessions -> 403".to_owned()),
        )
    }

    fn start(instance: &str) -> Subject {
        Subject {
            action: "hatch:StartSession",
            instance: Some(instance.to_owned()),
            ..Subject::default()
        }
    }

    #[test]
    fn every_api_code_has_an_exit_code_and_a_next_step() {
        let i = "i-0123456789abcdef";
        let table: &[(&str, u16, u8, &str)] = &[
            (
                codes::ACCESS_DENIED,
                403,
                77,
                "AccessDenied: your policy does not allow hatch:StartSession on \
                 i-0123456789abcdef; ask an administrator",
            ),
            (codes::SESSION_MANAGER_DISABLED, 403, 77, "ask the account owner to turn it on"),
            (codes::INSTANCE_NOT_FOUND, 404, 68, "no instance i-0123456789abcdef is visible"),
            (codes::SESSION_NOT_FOUND, 404, 68, "list sessions with `hatch sessions`"),
            (
                codes::TARGET_NOT_CONNECTED,
                409,
                69,
                "agent on i-0123456789abcdef is not connected; is hatch-agent running and can \
                 it reach the relay?",
            ),
            (codes::INVALID_TOKEN, 401, 77, "check it with `hatch configure` or HATCH_ACCESS_KEY"),
            (codes::TOKEN_EXPIRED, 401, 75, "expired before it was used; start the session"),
            (codes::TOKEN_ALREADY_USED, 409, 75, "already used; start a new session"),
            (codes::THROTTLED, 429, 75, "too many sessions or requests (relay words); wait"),
            (codes::INVALID_REQUEST, 400, 64, "rejected the request: relay words; check"),
            (codes::NOT_FOUND, 404, 76, "does not know this API path"),
            (codes::INTERNAL_ERROR, 500, 70, "the relay failed (relay words); try again"),
            (codes::NO_SUCH_ENTITY, 404, 68, "NoSuchEntity: relay words; check the name"),
            (
                codes::ENTITY_ALREADY_EXISTS,
                409,
                255,
                "EntityAlreadyExists: relay words; choose another name",
            ),
            (codes::DELETE_CONFLICT, 409, 255, "relay words; `hatch policies show NAME` lists"),
            (
                codes::MALFORMED_POLICY_DOCUMENT,
                400,
                64,
                "MalformedPolicyDocument: relay words; fix the document and put it again",
            ),
            (codes::SESSION_ATTACHED, 409, 255, "another client is attached"),
            (codes::SESSION_ENDED, 409, 255, "has ended"),
            ("SomethingNew", 418, 255, "HTTP 418 with code \"SomethingNew\": relay words"),
            ("SomethingNew", 503, 75, "HTTP 503"),
        ];
        for &(code, status, want_exit, want_words) in table {
            let err = api(code, status, start(i));
            assert_eq!(err.exit_code(), want_exit, "{code}");
            let line = err.message(false);
            assert!(line.starts_with(&format!("{code}: ")), "{line}");
            assert!(line.contains(want_words), "{code}: {line}");
            assert!(!line.contains("req-1"), "request id only with -v: {line}");
        }
    }

    #[test]
    fn iam_errors_name_the_next_step() {
        let users = Subject {
            action: "hatch:CreateUser",
            list_with: &["hatch users list"],
            ..Subject::default()
        };
        let denied = api(codes::ACCESS_DENIED, 403, users.clone());
        assert_eq!(
            denied.message(false),
            "AccessDenied: your policy does not allow hatch:CreateUser on this account; ask an \
             administrator"
        );
        let exists = api(codes::ENTITY_ALREADY_EXISTS, 409, users.clone());
        assert_eq!(
            exists.message(false),
            "EntityAlreadyExists: relay words; choose another name, or see `hatch users list`"
        );
        let both = Subject { list_with: &["hatch users list", "hatch policies list"], ..users };
        assert_eq!(
            api(codes::NO_SUCH_ENTITY, 404, both).message(false),
            "NoSuchEntity: relay words; see `hatch users list` and `hatch policies list`"
        );
        let owner = Subject { owner_only: true, ..Subject::default() };
        assert_eq!(
            api(codes::ACCESS_DENIED, 403, owner).message(false),
            "AccessDenied: only the account owner may do this; use an owner access key"
        );
        // A relay that gives no words still gets a sentence.
        let silent = CliError::api(
            409,
            ErrorBody {
                code: codes::DELETE_CONFLICT.into(),
                message: String::new(),
                request_id: None,
            },
            Subject::default(),
            None,
        );
        assert!(silent.message(false).starts_with("DeleteConflict: it is still in use; `hatch"));
    }

    #[test]
    fn target_not_connected_says_when_the_agent_was_last_seen() {
        let subject =
            Subject { last_seen: Some("3 min ago".to_owned()), ..start("i-0123456789abcdef") };
        let line = api(codes::TARGET_NOT_CONNECTED, 409, subject).message(false);
        assert_eq!(
            line,
            "TargetNotConnected: agent on i-0123456789abcdef last seen 3 min ago; is hatch-agent \
             running and can it reach the relay?"
        );
    }

    #[test]
    fn invalid_token_on_the_data_plane_is_about_the_session_token() {
        let subject = Subject { data_plane: true, ..start("i-1") };
        let err = api(codes::INVALID_TOKEN, 401, subject);
        assert_eq!(err.exit_code(), 255);
        assert!(err.message(false).contains("session token"));
    }

    #[test]
    fn verbose_adds_request_id_and_exchange() {
        let line = api(codes::ACCESS_DENIED, 403, start("i-1")).message(true);
        assert!(line.contains("[request id req-1]"), "{line}");
        assert!(line.contains("[POST https://relay/v1/sessions -> 403]"), "{line}");
        assert!(line.contains("[relay said: relay words]"), "{line}");
    }

    #[test]
    fn every_close_code_has_words_and_an_exit_code() {
        let table: &[(u16, u8, &str)] = &[
            (close::INVALID_TOKEN, 255, "InvalidToken (close 4001)"),
            (close::TOKEN_EXPIRED, 75, "TokenExpired (close 4002)"),
            (close::TOKEN_ALREADY_USED, 75, "TokenAlreadyUsed (close 4003)"),
            (close::PEER_NEVER_CAME, 69, "the agent on i-1 never joined"),
            (close::PEER_GONE, 255, "AgentLost (close 4005): agent connection lost on i-1"),
            (
                close::TERMINATED,
                255,
                "Terminated (close 4006): the session was terminated through the API",
            ),
            (
                close::AGENT_SHUTDOWN,
                255,
                "AgentShutdown (close 4011): the agent on i-1 is shutting down",
            ),
            (close::GOING_AWAY, 255, "AgentGoingAway (close 1001): the agent on i-1 went away"),
            (close::POLICY_VIOLATION, 255, "AgentRefused (close 1008): the agent on i-1 refused"),
            (close::INTERNAL_ERROR, 255, "AgentFailed (close 1011): the agent on i-1 could not"),
            (
                close::FORWARD_NOT_ALLOWED,
                66,
                "ForwardNotAllowed (close 4017): the agent on i-1 does not allow",
            ),
            (
                close::RUN_AS_UNAVAILABLE,
                67,
                "RunAsUnavailable (close 4016): the agent on i-1 cannot run the session as the user",
            ),
            (close::IDLE_TIMEOUT, 75, "IdleTimeout (close 4007): the session was closed after"),
            (close::MAX_DURATION, 75, "maximum duration"),
            (close::RELAY_SHUTDOWN, 255, "the relay is shutting down"),
            (close::SESSION_MANAGER_DISABLED, 77, "switched off"),
            (close::ACCESS_REVOKED, 77, "AccessRevoked (close 4012): your access to this session"),
            (
                close::PROTOCOL_ERROR,
                255,
                "Closed (close 1002): the relay closed the session: \
                                           protocol error (1002)",
            ),
            (4999, 255, "unknown close code (4999)"),
        ];
        for &(code, want_exit, want_words) in table {
            let err = CliError::Closed {
                code,
                reason: "bye".to_owned(),
                instance: Some("i-1".to_owned()),
            };
            assert_eq!(err.exit_code(), want_exit, "{code}");
            let line = err.message(false);
            assert!(line.contains(want_words), "{code}: {line}");
            assert!(err.message(true).contains("[relay said: bye]"));
        }
    }

    #[test]
    fn local_failures_have_their_exit_codes() {
        let table: &[(CliError, u8, &str)] = &[
            (CliError::Usage("bad".into()), 64, "usage: bad; see `hatch help`"),
            (CliError::Config("no API URL".into()), 78, "configuration: no API URL"),
            (
                CliError::Tls { url: "https://r".into(), detail: "unknown issuer".into() },
                255,
                "TLS: cannot verify https://r: unknown issuer; check the CA file",
            ),
            (
                CliError::Connect { url: "https://r:1".into(), detail: "refused".into() },
                255,
                "ConnectionFailed: cannot connect to https://r:1: refused",
            ),
            (CliError::Timeout { url: "u".into(), what: "answer" }, 255, "Timeout"),
            (CliError::Lost("reset".into()), 255, "ConnectionLost: connection to the relay lost"),
            (CliError::NoExitStatus, 255, "without an exit status"),
            (CliError::Disconnected, 255, "closed by `~.`"),
            (CliError::Aborted, 130, "before the session started"),
            (CliError::Local("stdout closed".into()), 74, "LocalIo: stdout closed"),
            (CliError::Signal("SIGTERM", 143), 143, "Signal: SIGTERM received"),
            (CliError::BadResponse { url: "u".into(), detail: "d".into() }, 76, "BadResponse"),
        ];
        for (err, want_exit, want_words) in table {
            assert_eq!(err.exit_code(), *want_exit, "{err:?}");
            assert!(err.message(false).contains(want_words), "{}", err.message(false));
        }
    }
}
