//! The narrow interface between the data plane (shards) and the control plane.
//!
//! ```text
//!   control plane ── DataCommand (terminate, ...) ──▶ data plane shards
//!   control plane ◀── DataEvent (connected, progress, ended) ── data plane shards
//! ```
//!
//! Both directions are tokio mpsc channels, which work from the plain-tokio control runtime and
//! from every shard runtime (tokio-uring runs on a current-thread tokio runtime).

use std::time::{Duration, SystemTime};

/// Why a session ended, as recorded in the store (DESIGN.md "Session states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseReason {
    /// The remote process exited (the agent sent EXIT and closed with 1000).
    Exit,
    /// The client leg closed first, with a close frame (`hatch` exiting, `~.`, a signal).
    ClientClosed,
    /// The agent leg closed first with a close frame other than an exit or a refusal (the agent
    /// shutting down, a session it cancelled).
    AgentClosed,
    /// The client leg ended without a close frame: the client was killed, or its connection
    /// dropped, failed or went silent past the dead-leg limit.
    ClientLost,
    /// The agent leg ended without a close frame: the agent was killed, or its connection
    /// dropped, failed or went silent past the dead-leg limit.
    AgentLost,
    /// Terminated through the API or the account switch.
    Terminated,
    /// The caller lost access while the session ran (key revoked, user disabled, policy).
    AccessRevoked,
    /// No client→agent data for the idle timeout.
    IdleTimeout,
    /// Reached the maximum session duration.
    MaxDuration,
    /// The other leg never arrived.
    PairTimeout,
    /// The relay shut down.
    RelayShutdown,
    /// The fleet node holding the session stopped heartbeating: a surviving node closed it once
    /// the node's heartbeat expired.
    NodeLost,
    /// The account requires recording and the relay could not write the recording (4018).
    RecordingFailed,
    /// A protocol violation (WebSocket, or TLS: a record not under the session's key, an
    /// oversized record), an internal failure, or the agent refusing or failing to start the
    /// session (`session.failed`, or its leg closed with 1008 or 1011).
    Error,
}

impl CloseReason {
    /// The name stored and shown by the API (`close_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Exit => "exit",
            CloseReason::ClientClosed => "client_closed",
            CloseReason::AgentClosed => "agent_closed",
            CloseReason::ClientLost => "client_lost",
            CloseReason::AgentLost => "agent_lost",
            CloseReason::Terminated => "terminated",
            CloseReason::AccessRevoked => "access_revoked",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxDuration => "max_duration",
            CloseReason::PairTimeout => "pair_timeout",
            CloseReason::RelayShutdown => "relay_shutdown",
            CloseReason::NodeLost => "node_lost",
            CloseReason::RecordingFailed => "recording_failed",
            CloseReason::Error => "error",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "exit" => CloseReason::Exit,
            "client_closed" => CloseReason::ClientClosed,
            "agent_closed" => CloseReason::AgentClosed,
            "client_lost" => CloseReason::ClientLost,
            "agent_lost" => CloseReason::AgentLost,
            "terminated" => CloseReason::Terminated,
            "access_revoked" => CloseReason::AccessRevoked,
            "idle_timeout" => CloseReason::IdleTimeout,
            "max_duration" => CloseReason::MaxDuration,
            "pair_timeout" => CloseReason::PairTimeout,
            "relay_shutdown" => CloseReason::RelayShutdown,
            "node_lost" => CloseReason::NodeLost,
            "recording_failed" => CloseReason::RecordingFailed,
            "error" => CloseReason::Error,
            _ => return None,
        })
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The end of one session, reported once by the shard that owned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// Session id.
    pub session_id: String,
    /// Why it ended.
    pub reason: CloseReason,
    /// DATA-carrying payload bytes forwarded client → agent.
    pub bytes_client_to_agent: u64,
    /// Payload bytes forwarded agent → client.
    pub bytes_agent_to_client: u64,
    /// From pairing (or the first leg's arrival, when never paired) to the end.
    pub duration: Duration,
}

/// Data plane → control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataEvent {
    /// Both legs of the session are paired.
    Connected {
        /// Session id.
        session_id: String,
        /// When the second leg arrived.
        at: SystemTime,
    },
    /// The byte counts of a live session so far, sent by its owner shard on a periodic tick
    /// (not per frame) when they changed since the last report, so that a relay killed
    /// without a chance to report [`DataEvent::Ended`] still leaves recent counts in the store.
    /// Counts only grow; a later `Progress` or `Ended` of the same session supersedes it.
    Progress {
        /// Session id.
        session_id: String,
        /// Payload bytes forwarded client → agent so far.
        bytes_client_to_agent: u64,
        /// Payload bytes forwarded agent → client so far.
        bytes_agent_to_client: u64,
    },
    /// A paired session lost its legs (one without a close frame, the other closed with 4015)
    /// and waits for both to come back within the resume window: state `detached`.
    Detached {
        /// Session id.
        session_id: String,
        /// When it lost them.
        at: SystemTime,
    },
    /// A detached session has both legs again: state `connected`.
    Resumed {
        /// Session id.
        session_id: String,
        /// When the second leg came back.
        at: SystemTime,
    },
    /// The session ended (sent exactly once per session that had at least one leg).
    Ended(SessionEnd),
    /// What became of a recorded session's recording (once per recording handle: finished,
    /// suspended for a resume, or failed).
    Recording(crate::recording::Outcome),
}

/// Control plane → data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataCommand {
    /// Close both legs of a session with `code` (4006 terminate, 4010 account switch), and
    /// refuse any leg of it that arrives later.
    Terminate {
        /// Session id.
        session_id: String,
        /// Close code sent on both legs.
        code: u16,
    },
}
