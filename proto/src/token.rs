//! Claims of the stream tokens: what a signed token says. Signing and verification live in the
//! relay (the control plane signs with its Ed25519 key, the data plane verifies with the public
//! key); this module is only the shape, and the pure checks that take time as a parameter.

use serde::{Deserialize, Serialize};

/// Tokens live this long after issue (DESIGN.md: ten minutes).
pub const TOKEN_LIFETIME_SECS: u64 = 600;

/// Which leg of a session a token opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The person's side (`hatch`).
    Client,
    /// The instance's side (`hatch-agent`).
    Agent,
}

impl Role {
    /// The name used in URLs (`?role=`) and claims.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Agent => "agent",
        }
    }

    /// Parses the `role` query value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "client" => Some(Role::Client),
            "agent" => Some(Role::Agent),
            _ => None,
        }
    }
}

/// The claims of a stream token (JWT registered names where one fits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Session id (`sub`).
    pub sub: String,
    /// The leg this token opens.
    pub role: Role,
    /// Target instance id.
    pub instance: String,
    /// Account id.
    pub account: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expiry, seconds since the Unix epoch (`iat + 600`).
    pub exp: u64,
    /// Unique token id, for single use.
    pub jti: String,
    /// The run of the relay that issued it (random per process start). A relay refuses tokens
    /// of earlier runs: every session open at a restart was closed then, so none of their
    /// legs may pair again, and a token stays single-use across restarts without a record of
    /// used tokens on disk. Absent (empty) in tokens of relays that predate it.
    #[serde(default)]
    pub run: String,
    /// A resume token: it opens a new leg of a session that was paired before (after a lost
    /// leg or a relay restart). The relay then keeps the session for the resume window, not
    /// the pair timeout, while the other leg comes back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub res: bool,
    /// A port session's leg: the relay's idle timeout counts data in both directions, so a
    /// forwarded connection that only downloads is not idle.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub two_way: bool,
    /// The account's idle timeout in seconds, when it has one (its session preferences): the
    /// relay applies it when it is shorter than its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<u64>,
    /// The account's longest session in seconds, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maxd: Option<u64>,
    /// The session is recorded (the account's `recording` when it started): the relay's data
    /// plane records it so, or ends it when it cannot (4018). Absent: not recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rec: Option<crate::api::RecordingMode>,
    /// Who started the session (`owner` or the user id), for a recording's header; only in
    /// the tokens of recorded sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prn: Option<String>,
}

impl Claims {
    /// Whether the token has expired at `now` (seconds since the Unix epoch).
    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.exp
    }
}
