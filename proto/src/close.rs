//! WebSocket close codes used by Hatch (RFC 6455 §7.4 and the private range 4000–4999).
//!
//! The relay closes a leg with one of these, or forwards the code the other leg closed with (the
//! relay never sends 1001, 1008 or 1011 itself: on a client leg they are the agent's); the
//! client turns each into words and an exit code.

/// Normal closure: the session ended, and the agent sent EXIT first.
pub const NORMAL: u16 = 1000;
/// The peer is going away (a browser leaving the page, a process exiting). Agents before
/// [`AGENT_SHUTDOWN`] closed their legs with it when stopped.
pub const GOING_AWAY: u16 = 1001;
/// The peer violated the WebSocket protocol (RFC 6455 §7.4.1).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A data type the endpoint cannot accept (a text frame on the binary `hatch.v1` channel).
pub const UNSUPPORTED_DATA: u16 = 1003;
/// A text payload that was not valid UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// A generic policy violation; the agent's refusal of a session it may not start (the run-as
/// user), after an ERROR message with its reason.
pub const POLICY_VIOLATION: u16 = 1008;
/// A frame larger than the configured maximum payload.
pub const MESSAGE_TOO_BIG: u16 = 1009;
/// The endpoint hit an unexpected condition; the agent's failure to start a session (no PTY,
/// the program would not start), after an ERROR message with its reason.
pub const INTERNAL_ERROR: u16 = 1011;

/// The token was missing, malformed, signed by another key, or for another session or role.
pub const INVALID_TOKEN: u16 = 4001;
/// The token's expiry has passed.
pub const TOKEN_EXPIRED: u16 = 4002;
/// The token was already used to open a leg.
pub const TOKEN_ALREADY_USED: u16 = 4003;
/// The other leg never arrived within the pair timeout.
pub const PEER_NEVER_CAME: u16 = 4004;
/// The other leg went away without a close of its own.
pub const PEER_GONE: u16 = 4005;
/// The session was terminated through the API (`DELETE /v1/sessions/{id}`, by its owner or an
/// administrator: the code does not say which) or by the relay's admin command.
pub const TERMINATED: u16 = 4006;
/// No client→agent data for the idle timeout.
pub const IDLE_TIMEOUT: u16 = 4007;
/// The session reached its maximum duration.
pub const MAX_DURATION: u16 = 4008;
/// The relay is shutting down: its sessions live on, and both sides resume on a new leg
/// (through the restarted relay, or another one).
pub const RELAY_SHUTDOWN: u16 = 4009;
/// Session management was switched off for the account.
pub const SESSION_MANAGER_DISABLED: u16 = 4010;
/// The agent is shutting down (SIGTERM, its service stopping) and closed its legs.
pub const AGENT_SHUTDOWN: u16 = 4011;
/// The caller who started the session lost the access it needed: their access key was revoked,
/// their user disabled, or their policies no longer allow the session.
pub const ACCESS_REVOKED: u16 = 4012;
/// The session cannot be resumed exactly: the peer asked for bytes that were already dropped,
/// or resumed after bytes that never arrived ([`crate::resume::OffsetError`]).
pub const RESUME_FAILED: u16 = 4013;
/// Another client attached to the session (`hatch attach --force`); this one is detached and
/// must not reconnect.
pub const ATTACHED_ELSEWHERE: u16 = 4014;

/// The other side's leg was lost: the session waits (the resume window) for both sides to put
/// up new legs; this side resumes as after a lost connection.
pub const PEER_RESUMING: u16 = 4015;

/// The agent cannot run the session as the user it was authorised for (no such user on the
/// instance, or an agent not running as root asked for another user); after an ERROR message
/// with the reason. Agents before this code closed with 1008.
pub const RUN_AS_UNAVAILABLE: u16 = 4016;

/// The agent does not allow the port session's destination (`hatch-agent run
/// --allow-forward`); after an ERROR message with the reason.
pub const FORWARD_NOT_ALLOWED: u16 = 4017;

/// The session's account requires recording and the relay could not record it (the recording
/// directory not writable, the disk full): the session is ended rather than run unrecorded.
pub const RECORDING_FAILED: u16 = 4018;

/// Whether a leg closed with `code` should be replaced by a new one (the session lives on in
/// the relay or in its store): the relay going down, or the other side resuming. A leg lost
/// without a close frame (reset, silence) is resumable too.
pub fn is_resumable(code: u16) -> bool {
    matches!(code, RELAY_SHUTDOWN | PEER_RESUMING)
}

/// A short lower-case description of a close code, for logs and for the CLI's messages.
pub fn describe(code: u16) -> &'static str {
    match code {
        NORMAL => "session ended",
        GOING_AWAY => "peer going away",
        PROTOCOL_ERROR => "protocol error",
        UNSUPPORTED_DATA => "unsupported data",
        INVALID_PAYLOAD => "invalid payload",
        POLICY_VIOLATION => "policy violation",
        MESSAGE_TOO_BIG => "message too big",
        INTERNAL_ERROR => "internal error",
        INVALID_TOKEN => "invalid token",
        TOKEN_EXPIRED => "token expired",
        TOKEN_ALREADY_USED => "token already used",
        PEER_NEVER_CAME => "the other side never connected",
        PEER_GONE => "the other side's connection was lost",
        TERMINATED => "terminated through the API",
        IDLE_TIMEOUT => "idle timeout",
        MAX_DURATION => "maximum session duration reached",
        RELAY_SHUTDOWN => "relay shutting down",
        SESSION_MANAGER_DISABLED => "session manager disabled for the account",
        AGENT_SHUTDOWN => "agent shutting down",
        ACCESS_REVOKED => "access revoked",
        RESUME_FAILED => "the session could not be resumed without losing bytes",
        ATTACHED_ELSEWHERE => "another client attached to the session",
        PEER_RESUMING => "the other side is reconnecting",
        RUN_AS_UNAVAILABLE => "the run-as user is not available on the instance",
        FORWARD_NOT_ALLOWED => "the agent does not allow that destination",
        RECORDING_FAILED => "the session could not be recorded",
        _ => "unknown close code",
    }
}

/// Whether `code` may appear in a Close frame on the wire (RFC 6455 §7.4.1–7.4.2).
///
/// 1004, 1005, 1006 and 1015 are reserved for local use and must never be sent; 0–999 are
/// unused; 1016–2999 are reserved for future RFCs; 3000–4999 are registered or private.
pub fn is_valid_on_wire(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_codes_are_not_valid_on_the_wire() {
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, u16::MAX] {
            assert!(!is_valid_on_wire(code), "{code}");
        }
        for code in
            [NORMAL, PROTOCOL_ERROR, MESSAGE_TOO_BIG, INVALID_TOKEN, SESSION_MANAGER_DISABLED]
        {
            assert!(is_valid_on_wire(code), "{code}");
        }
    }

    #[test]
    fn every_hatch_code_has_words() {
        for code in 4001..=4017 {
            assert_ne!(describe(code), "unknown close code", "{code}");
        }
    }
}
