//! Messages on the agent's control channel (`GET /v1/agent/connect`), one JSON object per
//! WebSocket text message, tagged by `type`.

use serde::{Deserialize, Serialize};

use crate::api::Mode;

/// Relay → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ToAgent {
    /// Open a session: dial `stream_url` with `token` (role agent) and start the PTY.
    #[serde(rename = "session.open")]
    SessionOpen {
        /// Session id.
        session_id: String,
        /// `wss://.../v1/stream/{sid}?role=agent`.
        stream_url: String,
        /// Bearer token for the agent leg.
        token: String,
        /// Shell or exec.
        mode: Mode,
        /// The command for exec.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        command: Option<Vec<String>>,
        /// The user to run as: the one the policy was evaluated with (the caller's `run_as`, or
        /// the `default_user` of the agent's `hello`). Agents refuse a `session.open` without
        /// it: they cannot know which user was authorised.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run_as: Option<String>,
        /// `TERM` for the PTY; `xterm-256color` when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        term: Option<String>,
        /// exec: `Some(true)` a PTY, `Some(false)` pipes with stderr as STDERR messages, absent
        /// (a relay or client that predates it) a PTY when `term` is given, else pipes with
        /// stderr merged into stdout. Ignored for a shell.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tty: Option<bool>,
        /// port: where each forwarded connection goes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote_host: Option<String>,
        /// port: the destination port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote_port: Option<u16>,
    },
    /// Close a session if it is still running.
    #[serde(rename = "session.close")]
    SessionClose {
        /// Session id.
        session_id: String,
        /// Why, in words.
        reason: String,
    },
    /// Liveness probe; answer with [`FromAgent::Heartbeat`] carrying the same `seq`.
    #[serde(rename = "heartbeat")]
    Heartbeat {
        /// Sequence number.
        seq: u64,
    },
    /// The answer to [`FromAgent::SessionResume`]: dial `stream_url` with `token` (role agent,
    /// a resume token) to put up a new leg for a live session, then send RESUME on it.
    #[serde(rename = "session.resume")]
    SessionResume {
        /// Session id.
        session_id: String,
        /// `wss://.../v1/stream/{sid}?role=agent`.
        stream_url: String,
        /// Bearer token for the new agent leg.
        token: String,
    },
}

/// Agent → relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum FromAgent {
    /// The first message on every control channel: what the agent is and how it runs
    /// sessions. The relay counts the instance online only once this arrived (within the
    /// heartbeat timeout), because a session's policy check needs the user it will run as:
    /// a session that names no user runs as `default_user`, and `hatch:RunAs` is evaluated with
    /// that name, never left absent.
    #[serde(rename = "hello")]
    Hello {
        /// The agent's version (`CARGO_PKG_VERSION`), for people reading logs.
        version: String,
        /// The user a session that names none runs as: `--default-user`, or the agent's own
        /// user.
        default_user: String,
        /// Whether the agent can start sessions as other users (it runs as root). When false,
        /// only `default_user` can be served.
        switch_user: bool,
    },
    /// Liveness: an answer to a probe, or the agent's own.
    #[serde(rename = "heartbeat")]
    Heartbeat {
        /// Sequence number.
        seq: u64,
    },
    /// The agent could not start a session (it also says so on the data leg when it can).
    #[serde(rename = "session.failed")]
    SessionFailed {
        /// Session id.
        session_id: String,
        /// What went wrong.
        message: String,
    },
    /// The agent lost a session's data leg (no close frame, or a resumable close code) and
    /// asks for a token to put up a new one. The relay answers [`ToAgent::SessionResume`]
    /// when the session is live (or resumable) and of this instance, [`ToAgent::SessionClose`]
    /// when it ended (or never existed).
    #[serde(rename = "session.resume")]
    SessionResume {
        /// Session id.
        session_id: String,
    },
    /// A session whose data leg died without a close from the relay (the relay was lost, e.g.
    /// killed): the payload bytes the agent counted on that leg, sent once the control channel
    /// is up again (possibly more than once; the relay keeps the larger counts). The relay
    /// applies it only to a session of this agent's instance that it recorded as
    /// `relay_shutdown`, and never lowers a count. Relays that predate it ignore it as an
    /// unknown message.
    #[serde(rename = "session.report")]
    SessionReport {
        /// Session id.
        session_id: String,
        /// Payload bytes the agent received on the leg (binary and text message payloads).
        bytes_client_to_agent: u64,
        /// Payload bytes the agent handed to the leg's connection.
        bytes_agent_to_client: u64,
        /// The command's exit status, when it exited before or as the leg died.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
}

impl FromAgent {
    /// The `hello` of this build (its version) for an agent running sessions that name no user
    /// as `default_user`.
    pub fn hello(default_user: &str, switch_user: bool) -> FromAgent {
        FromAgent::Hello {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            default_user: default_user.to_owned(),
            switch_user,
        }
    }
}

/// `POST /v1/agent/register` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// Activation id.
    pub activation_id: String,
    /// Activation code (secret).
    pub activation_code: String,
    /// The instance's host name, for people reading instance lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// `POST /v1/agent/register` answer (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The new instance id, `i-` followed by 16 hex digits.
    pub instance_id: String,
    /// The instance secret: the bearer credential of the control channel. Shown once.
    pub instance_secret: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_open_json_shape() {
        let m = ToAgent::SessionOpen {
            session_id: "s-0123456789abcdef".into(),
            stream_url: "wss://r/v1/stream/s-0123456789abcdef?role=agent".into(),
            token: "t".into(),
            mode: Mode::Exec,
            command: Some(vec!["true".into()]),
            run_as: None,
            term: None,
            tty: None,
            remote_host: None,
            remote_port: None,
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"type":"session.open","session_id":"s-0123456789abcdef","stream_url":"wss://r/v1/stream/s-0123456789abcdef?role=agent","token":"t","mode":"exec","command":["true"]}"#
        );
        assert_eq!(serde_json::from_str::<ToAgent>(&s).unwrap(), m);
    }

    #[test]
    fn hello_json_shape() {
        let m = FromAgent::Hello {
            version: "0.1.0".into(),
            default_user: "nobody".into(),
            switch_user: false,
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"type":"hello","version":"0.1.0","default_user":"nobody","switch_user":false}"#
        );
        assert_eq!(serde_json::from_str::<FromAgent>(&s).unwrap(), m);
    }

    #[test]
    fn session_report_json_shape() {
        let m = FromAgent::SessionReport {
            session_id: "s-0123456789abcdef".into(),
            bytes_client_to_agent: 5001,
            bytes_agent_to_client: 12,
            exit_code: None,
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"type":"session.report","session_id":"s-0123456789abcdef","bytes_client_to_agent":5001,"bytes_agent_to_client":12}"#
        );
        assert_eq!(serde_json::from_str::<FromAgent>(&s).unwrap(), m);
    }

    #[test]
    fn unknown_message_types_are_errors_the_peers_log_and_skip() {
        // Both ends match on the parse result and ignore an `Err` with a log line: a newer
        // peer's message must fail to parse here, not be mistaken for a known one.
        assert!(serde_json::from_str::<FromAgent>(r#"{"type":"session.later","x":1}"#).is_err());
        assert!(serde_json::from_str::<ToAgent>(r#"{"type":"session.later","x":1}"#).is_err());
    }
}
