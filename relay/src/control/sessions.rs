//! The session lifecycle of the control plane, in one place: start, resume and terminate
//! (called by the HTTP handlers, answering [`SessionError`]), the data plane's events, the
//! pending and resume-window sweep, pruning, the reconcile loop (IAM changes, the account
//! switch, sessions closed elsewhere) and the agents' session messages.
//!
//! Every operation keeps the store record, the live table ([`super::live`]) and the data plane
//! in step; handlers only parse requests and render answers.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hatch_proto::api::{Mode, StartSessionRequest};
use hatch_proto::control::ToAgent;
use hatch_proto::token::Role;
use tracing::{debug, info, warn};

use super::access::ResumeRefused;
use super::auth::Caller;
use super::fleet::{Mail, Placement};
use super::live::LimitHit;
use super::store::{self, Instance, SessionRecord, SessionState, StateFilter};
use super::{
    CLOSE_ACCESS_REVOKED, CLOSE_DISABLED, CLOSE_PAIR_TIMEOUT, CLOSE_PEER_GONE, CLOSE_TERMINATED,
    Shared, access, agents, credentials, live, policy, rfc3339, unix_now, unix_of,
};
use crate::plane::{CloseReason, DataCommand, DataEvent};
use crate::token::LegTerms;

/// Why a session operation was refused. [`super::api`] maps each to its status and code, in
/// one place.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The request is malformed (400 `InvalidRequest`).
    #[error("{0}")]
    Invalid(String),
    /// The caller's policy does not allow it (403 `AccessDenied`).
    #[error("{0}")]
    Denied(String),
    /// The account switch is off (403 `SessionManagerDisabled`).
    #[error("session management is switched off for account {0}")]
    Disabled(String),
    /// No such instance in the caller's account (404).
    #[error("instance {0} not found")]
    InstanceNotFound(String),
    /// No such session in the caller's account, or one it may not see (404).
    #[error("session {0} not found")]
    SessionNotFound(String),
    /// The instance's agent is not connected or not reading (409 `TargetNotConnected`).
    #[error("{message}")]
    NotConnected {
        /// For a person.
        message: String,
        /// When the agent was last seen, if ever.
        last_seen: Option<i64>,
    },
    /// A start rate or open-session limit (429 `Throttled`).
    #[error("{message}")]
    Throttled {
        /// For a person.
        message: String,
        /// Seconds until a retry can succeed, when known (`Retry-After`).
        retry_after: Option<u64>,
    },
    /// The session cannot be resumed: it ended, or never connected (409 `SessionEnded`).
    #[error("{0}")]
    Ended(String),
    /// The session has a client attached and the resume did not ask to take over (409
    /// `SessionAttached`).
    #[error("session {0} has a client attached; resume with force to take it over")]
    Attached(String),
    /// The account requires recording and the recording directory cannot be written (503
    /// `RecordingUnavailable`).
    #[error("{0}")]
    RecordingUnavailable(String),
    /// The session has no recording (404 `RecordingNotFound`).
    #[error("{0}")]
    RecordingNotFound(String),
    /// The session's recording does not verify (409 `RecordingCorrupt`).
    #[error("{0}")]
    RecordingCorrupt(String),
    /// The store or the signer failed (500, logged).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Sends what is written to it as chunks to a response body; a reader gone is a broken pipe.
struct ChunkWriter(tokio::sync::mpsc::Sender<bytes::Bytes>);

impl io::Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .blocking_send(bytes::Bytes::copy_from_slice(buf))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn invalid(message: impl Into<String>) -> SessionError {
    SessionError::Invalid(message.into())
}

fn denied(message: impl Into<String>) -> SessionError {
    SessionError::Denied(message.into())
}

/// A client leg granted by [`Shared::start`] or [`Shared::resume`].
#[derive(Debug, Clone)]
pub struct Grant {
    /// The session.
    pub session_id: String,
    /// The client leg's token.
    pub token: String,
    /// The token's expiry (seconds since the epoch).
    pub expires_at: i64,
    /// The data-plane base of the fleet node holding the session; `None`: this node's, as the
    /// caller reached it.
    pub stream_base: Option<String>,
}

/// Largest exec command: arguments and total bytes.
const MAX_COMMAND_ARGS: usize = 256;
const MAX_COMMAND_BYTES: usize = 16 * 1024;

fn validate_start(req: &StartSessionRequest) -> Result<(), SessionError> {
    if !credentials::valid_id(&req.instance_id, "i-") {
        return Err(invalid(format!(
            "instance_id {:?} is not i- followed by 16 lowercase hex digits",
            req.instance_id
        )));
    }
    match (&req.mode, &req.command) {
        (Mode::Exec, None) => return Err(invalid("mode exec needs a command")),
        (Mode::Exec, Some(c)) if c.is_empty() => {
            return Err(invalid("command must not be empty"));
        }
        (Mode::Shell, Some(_)) => {
            return Err(invalid("command is only allowed with mode exec"));
        }
        _ => {}
    }
    match (req.mode, req.remote_port) {
        (Mode::Port, None) => return Err(invalid("mode port needs remote_port")),
        (Mode::Port, Some(0)) => return Err(invalid("remote_port must be 1-65535")),
        (Mode::Port, _) if req.command.is_some() || req.tty.is_some() => {
            return Err(invalid("command and tty are not for mode port"));
        }
        (Mode::Shell | Mode::Exec, _) if req.remote_port.is_some() || req.remote_host.is_some() => {
            return Err(invalid("remote_host and remote_port are only for mode port"));
        }
        _ => {}
    }
    if let Some(h) = &req.remote_host
        && (h.is_empty()
            || h.len() > 253
            || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b)))
    {
        return Err(invalid("remote_host must be a host name or an IP address (1-253 characters)"));
    }
    if req.mode == Mode::Shell && req.tty == Some(false) {
        return Err(invalid(
            "a shell session always has a terminal: tty false is only for mode exec",
        ));
    }
    if let Some(c) = &req.command
        && (c.len() > MAX_COMMAND_ARGS
            || c.iter().map(|a| a.len()).sum::<usize>() > MAX_COMMAND_BYTES)
    {
        return Err(invalid(format!(
            "command longer than {MAX_COMMAND_ARGS} arguments or {MAX_COMMAND_BYTES} bytes"
        )));
    }
    if let Some(u) = &req.run_as
        && !hatch_proto::api::valid_user_name(u)
    {
        return Err(invalid(format!("run_as {u:?} is not a valid user name")));
    }
    if let Some(t) = &req.term
        && (t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(invalid("term must be 1-64 printable ASCII characters"));
    }
    Ok(())
}

/// The 429 for an open-session limit.
fn limit_hit(hit: LimitHit, inst: &Instance) -> SessionError {
    let message = match hit {
        LimitHit::Instance(n) => format!("{} already has {n} open sessions", inst.id),
        LimitHit::Account(n) => format!("account already has {n} open sessions"),
        LimitHit::User(n) => format!("you already have {n} open sessions"),
    };
    SessionError::Throttled { message, retry_after: None }
}

/// Whether a user may see (or act on) a session: their own, or allowed by policy on its
/// instance.
fn visible(caller: &Caller, s: &SessionRecord, instances: &[Instance], action: &str) -> bool {
    if caller.is_owner() || caller.user_id.as_deref() == Some(s.principal.as_str()) {
        return true;
    }
    instances.iter().find(|i| i.id == s.instance_id).is_some_and(|i| {
        let ctx = caller.context(i);
        caller.may(action, i, &ctx)
    })
}

/// The requests of the API: each checks rate, switch and policy, then keeps the store, the live
/// table and the agent in step.
impl Shared {
    /// Takes one session start (or resume) from the caller's access key (`--session-rate`):
    /// the first step of both, taken before the request body is even read, so that malformed
    /// requests count too.
    pub(crate) fn take_start(&self, caller: &Caller) -> Result<(), SessionError> {
        let rate = self.cfg.limits.start_rate;
        self.start_rate.take(&caller.key_id, rate, Instant::now()).map_err(|wait| {
            info!(user = caller.principal(), key = %caller.key_id, "session start rate exceeded");
            SessionError::Throttled {
                message: format!(
                    "more than {} session starts per second (burst {}) with this access key; \
                     retry in {} s",
                    rate.per_sec,
                    rate.burst,
                    wait.as_secs()
                ),
                retry_after: Some(wait.as_secs()),
            }
        })
    }

    /// Starts a session after [`Self::take_start`]: validation, switch, policy, limits, tokens,
    /// the record, and `session.open` to the agent (its stream URL on the agent's own data
    /// host, or `base`).
    pub(crate) async fn start(
        &self,
        caller: &Caller,
        req: &StartSessionRequest,
        base: &str,
    ) -> Result<Grant, SessionError> {
        validate_start(req)?;
        switch_on(caller)?;
        let account_id = caller.account.id.clone();
        let iid = req.instance_id.clone();
        let inst = self
            .blocking(move |s| s.instance(&account_id, &iid))
            .await?
            .ok_or_else(|| SessionError::InstanceNotFound(req.instance_id.clone()))?;
        // The user the session will run as, known before the policy is evaluated: the one
        // asked for, or the default user the agent named in its hello. `hatch:RunAs` is never
        // absent for a session that will run, so a Deny on it cannot be stepped around by
        // naming no user. (An offline agent has no default user here; such a request is
        // refused below either way.)
        let placed = self.agent_placement(&inst.id).await?;
        let agent = placed.as_ref().map(|(a, _)| a);
        let run_as = req.run_as.clone().or_else(|| agent.map(|a| a.default_user.clone()));
        let mut ctx = caller.context(&inst);
        ctx.run_as = run_as.clone();
        ctx.mode = Some(req.mode.as_str().to_owned());
        // A port session is its own action, with the destination as condition keys.
        let port = req.mode == Mode::Port;
        let remote_host =
            port.then(|| req.remote_host.clone().unwrap_or_else(|| "localhost".to_owned()));
        let action = if port {
            // No user and no mode for a port forwarding (docs/POLICY.md): nothing runs as
            // anyone.
            ctx.run_as = None;
            ctx.mode = None;
            ctx.remote_host = remote_host.clone();
            ctx.remote_port = req.remote_port;
            policy::START_PORT_FORWARDING
        } else {
            policy::START_SESSION
        };
        if !caller.may(action, &inst, &ctx) {
            info!(user = caller.principal(), instance = %inst.id, action,
                "start session denied by policy");
            return Err(denied(format!(
                "your policy does not allow {action} on {}",
                policy::instance_hrn(&inst.region, &inst.account_id, &inst.id)
            )));
        }
        if caller.account.prefs.recording.is_on() {
            self.recording_writable().await?;
        }
        let (Some(run_as), Some((_, placement))) = (run_as, placed) else {
            let message = match inst.last_seen {
                Some(t) => format!(
                    "the agent of {} is not connected; last seen {} ({} s ago)",
                    inst.id,
                    rfc3339(t),
                    (unix_now() - t).max(0)
                ),
                None => format!("the agent of {} has never connected", inst.id),
            };
            return Err(SessionError::NotConnected { message, last_seen: inst.last_seen });
        };

        let sid = credentials::new_id("s-");
        let deadline = Instant::now() + self.cfg.pending_timeout;
        let who = live::Admission {
            account: &inst.account_id,
            instance: &inst.id,
            principal: caller.principal(),
        };
        // One relay counts open sessions in its live table; a fleet in the store, when the
        // record is inserted (below).
        if !self.fleet {
            self.live
                .admit(&sid, who, self.cfg.limits, deadline)
                .map_err(|hit| limit_hit(hit, &inst))?;
        }
        let (node_id, run) = match &placement {
            Placement::Here => (self.cfg.node.id.clone(), self.signer.run().to_owned()),
            Placement::There(n) => (n.id.clone(), n.run.clone()),
        };

        let now = unix_now();
        let issued = (|| {
            let now = u64::try_from(now).unwrap_or(0);
            // A port session's idle timeout counts both directions (a download is not idle).
            let (iid, acct) = (&inst.id, &inst.account_id);
            let terms = LegTerms::of(port, caller.account.prefs)
                .recorded(caller.account.prefs.recording, caller.principal());
            let s = &self.signer;
            let c = s.issue_in_run(&run, &sid, Role::Client, iid, acct, now, &terms)?;
            let a = s.issue_in_run(&run, &sid, Role::Agent, iid, acct, now, &terms)?;
            anyhow::Ok((c, a))
        })();
        let ((client_token, claims), (agent_token, _)) = match issued {
            Ok(t) => t,
            Err(e) => {
                self.live.remove(&sid);
                return Err(SessionError::Internal(e));
            }
        };
        let rec = SessionRecord {
            id: sid.clone(),
            account_id: inst.account_id.clone(),
            principal: caller.principal().to_owned(),
            access_key_id: caller.key_id.clone(),
            source_ip: caller.source_ip.to_string(),
            instance_id: inst.id.clone(),
            mode: req.mode,
            command: req.command.clone(),
            run_as: Some(run_as.clone()),
            state: SessionState::Pending,
            created_at: now,
            expires_at: claims.exp as i64,
            connected_at: None,
            closed_at: None,
            close_reason: None,
            bytes_client_to_agent: 0,
            bytes_agent_to_client: 0,
            detached_at: None,
            remote_host: remote_host.clone(),
            remote_port: req.remote_port.filter(|_| port),
            node_id: Some(node_id),
            recording: caller.account.prefs.recording,
            recording_digest: None,
        };
        if self.fleet {
            let limits = self.cfg.limits.open();
            match self.blocking(move |s| s.admit_session(&rec, limits)).await? {
                Ok(()) => {}
                Err(hit) => return Err(limit_hit(hit, &inst)),
            }
            if let Placement::Here = placement {
                // Counted in the store just now.
                let _ = self.live.admit(&sid, who, live::Limits::NONE, deadline);
            }
        } else if let Err(e) = self.blocking(move |s| s.insert_session(&rec)).await {
            self.live.remove(&sid);
            return Err(SessionError::Internal(e));
        }
        self.metrics.session_started();
        let agent_base = self.agents.data_base(&inst.id).unwrap_or_else(|| base.to_owned());
        let open = ToAgent::SessionOpen {
            session_id: sid.clone(),
            // For a session placed on another node, that node fills it in (it knows the host
            // the agent reached it by).
            stream_url: match placement {
                Placement::Here => format!("{agent_base}/v1/stream/{sid}?role=agent"),
                Placement::There(_) => String::new(),
            },
            token: agent_token,
            mode: req.mode,
            command: req.command.clone(),
            run_as: Some(run_as),
            term: req.term.clone(),
            tty: req.tty,
            remote_host,
            remote_port: req.remote_port,
        };
        if let Placement::There(node) = &placement {
            let mail = Mail::Open {
                session_id: sid.clone(),
                instance_id: inst.id.clone(),
                account_id: inst.account_id.clone(),
                principal: caller.principal().to_owned(),
                open: Box::new(open),
            };
            if let Err(e) = self.post(&node.id, &mail).await {
                self.close(&sid, CloseReason::Error, 0, 0).await;
                return Err(SessionError::Internal(e));
            }
            info!(session = %sid, instance = %inst.id, user = caller.principal(), node = %node.id,
                "session started on another node");
            return Ok(Grant {
                session_id: sid,
                token: client_token,
                expires_at: claims.exp as i64,
                stream_base: Some(node.data_url.clone()),
            });
        }
        if let Err(e) = self.agents.send(&inst.id, open) {
            self.close(&sid, CloseReason::Error, 0, 0).await;
            let message = match e {
                agents::SendError::Offline => {
                    format!("the agent of {} just disconnected", inst.id)
                }
                agents::SendError::Backlogged => {
                    format!("the agent of {} is not reading its control channel", inst.id)
                }
            };
            return Err(SessionError::NotConnected { message, last_seen: None });
        }
        info!(session = %sid, instance = %inst.id, user = caller.principal(), "session started");
        Ok(Grant {
            session_id: sid,
            token: client_token,
            expires_at: claims.exp as i64,
            stream_base: None,
        })
    }

    /// A resume token for a new client leg of the caller's own session, after
    /// [`Self::take_start`] (a resume signs a token as a start does: the same per-key rate),
    /// under the same switch and policy as a start ([`access::may_resume`]).
    pub(crate) async fn resume(
        &self,
        caller: &Caller,
        id: &str,
        force: bool,
    ) -> Result<Grant, SessionError> {
        switch_on(caller)?;
        let (rec, inst) = self.session_and_instance(caller, id).await?;
        let agent = self.agents.run_as(&rec.instance_id);
        let default_user = agent.as_ref().map(|a| a.default_user.as_str());
        let verdict = access::may_resume(
            caller.principal(),
            &caller.grants,
            caller.source_ip,
            &rec,
            inst.as_ref(),
            default_user,
            force,
        );
        if let Err(why) = verdict {
            info!(session = %rec.id, user = caller.principal(), ?why, "session resume refused");
            return Err(match why {
                ResumeRefused::NotFound => SessionError::SessionNotFound(id.to_owned()),
                ResumeRefused::Denied => denied(match &inst {
                    Some(i) => format!(
                        "your policy does not allow {} on {}",
                        access::start_context(&rec, i).0,
                        policy::instance_hrn(&i.region, &i.account_id, &i.id)
                    ),
                    None => format!("the instance of {id} is no longer registered"),
                }),
                ResumeRefused::Ended if rec.state == SessionState::Pending => SessionError::Ended(
                    format!("session {id} never connected; start a new session"),
                ),
                ResumeRefused::Ended => {
                    SessionError::Ended(format!("session {id} has ended; start a new session"))
                }
                ResumeRefused::Attached => SessionError::Attached(id.to_owned()),
            });
        }
        let Some(route) = self.route(&rec).await? else {
            return Err(SessionError::Ended(format!(
                "the relay node holding session {id} is gone; start a new session"
            )));
        };
        let now = u64::try_from(unix_now()).unwrap_or(0);
        let (token, claims) = self.signer.issue_in_run(
            &route.run,
            &rec.id,
            Role::Client,
            &rec.instance_id,
            &rec.account_id,
            now,
            &LegTerms::of(rec.mode == Mode::Port, caller.account.prefs)
                .recorded(rec.recording, &rec.principal)
                .resumed(),
        )?;
        self.metrics.resume_token(true);
        info!(session = %rec.id, instance = %rec.instance_id, user = caller.principal(),
            state = %rec.state, force, "session resume token issued");
        Ok(Grant {
            session_id: rec.id,
            token,
            expires_at: claims.exp as i64,
            stream_base: route.data_base,
        })
    }

    /// The caller's account's session `id` and its instance (`None` when the instance is
    /// gone); `SessionNotFound` when the account has no such session.
    async fn session_and_instance(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<(SessionRecord, Option<Instance>), SessionError> {
        if !credentials::valid_id(id, "s-") {
            return Err(SessionError::SessionNotFound(id.to_owned()));
        }
        let account = caller.account.id.clone();
        let sid = id.to_owned();
        let (rec, inst) = self
            .blocking(move |s| {
                let Some(rec) = s.session(Some(&account), &sid)? else { return Ok((None, None)) };
                let inst = s.instance(&account, &rec.instance_id)?;
                Ok((Some(rec), inst))
            })
            .await?;
        Ok((rec.ok_or_else(|| SessionError::SessionNotFound(id.to_owned()))?, inst))
    }

    /// The caller's session `id`, when `action` on it is allowed. A session the caller may not
    /// describe is not shown to exist.
    pub(crate) async fn session_for(
        &self,
        caller: &Caller,
        id: &str,
        action: &str,
    ) -> Result<SessionRecord, SessionError> {
        let (rec, inst) = self.session_and_instance(caller, id).await?;
        let instances: Vec<Instance> = inst.into_iter().collect();
        if !visible(caller, &rec, &instances, action) {
            if action == policy::DESCRIBE_SESSIONS {
                return Err(SessionError::SessionNotFound(id.to_owned()));
            }
            return Err(denied(format!("your policy does not allow {action} on {id}")));
        }
        Ok(rec)
    }

    /// The recording of session `id` as asciicast v2, in chunks, once it verified against the
    /// digest the store kept (`hatch:GetSessionRecording`). The export streams from the file
    /// on a blocking thread (one record in memory at a time) and stops at a record the chain
    /// does not vouch for.
    pub(crate) async fn recording(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<tokio::sync::mpsc::Receiver<bytes::Bytes>, SessionError> {
        use crate::recording::verify::{self, VerifyError};
        let rec = self.session_for(caller, id, policy::GET_SESSION_RECORDING).await?;
        let none = || SessionError::RecordingNotFound(format!("session {id} has no recording"));
        if !rec.recording.is_on() {
            return Err(SessionError::RecordingNotFound(format!("session {id} was not recorded")));
        }
        let dir = self.cfg.recording_dir.as_deref().ok_or_else(none)?;
        let path = crate::recording::file_path(dir, &rec.id).ok_or_else(none)?;
        let expected = rec.recording_digest.as_deref().and_then(crate::recording::Digest::from_hex);
        let p = path.clone();
        let checked = tokio::task::spawn_blocking(move || verify::verify(&p, expected))
            .await
            .map_err(|e| SessionError::Internal(anyhow::anyhow!("verifying a recording: {e}")))?;
        match checked {
            Ok(_) => {}
            Err(VerifyError::Io { offset: 0, source })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                return Err(none());
            }
            Err(err) => {
                warn!(session = %rec.id, %err, "recording does not verify");
                return Err(SessionError::RecordingCorrupt(format!(
                    "the recording of session {id} does not verify: {err}"
                )));
            }
        }
        // A few chunks of 8 KiB in flight: a slow reader slows the export, nothing piles up.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let sid = rec.id.clone();
        tokio::task::spawn_blocking(move || {
            let res = std::fs::File::open(&path).map_err(anyhow::Error::from).and_then(|f| {
                let opts = crate::recording::asciicast::ExportOptions::default();
                crate::recording::asciicast::export(f, ChunkWriter(tx), &opts)
                    .map_err(anyhow::Error::from)
            });
            match res {
                Ok(summary) => debug!(session = %sid, ?summary, "recording exported"),
                Err(err) => {
                    warn!(session = %sid, err = %format!("{err:#}"), "recording export stopped")
                }
            }
        });
        Ok(rx)
    }

    /// One page of the caller's account's sessions that the caller may describe, and the
    /// token of the next page when this one is full.
    pub(crate) async fn list(
        &self,
        caller: &Caller,
        filter: StateFilter,
        limit: u32,
        before: Option<String>,
    ) -> Result<(Vec<SessionRecord>, Option<String>), SessionError> {
        if let Some(t) = &before
            && !credentials::valid_id(t, "s-")
        {
            return Err(invalid("next_token is not one this API gave out"));
        }
        let account = caller.account.id.clone();
        let need_instances = !caller.is_owner();
        let (rows, instances) = self
            .blocking(move |s| {
                let rows = s.sessions(Some(&account), filter, limit, before.as_deref())?;
                let inst = if need_instances { s.instances(Some(&account))? } else { Vec::new() };
                Ok((rows, inst))
            })
            .await?;
        let next = (rows.len() == limit as usize).then(|| rows[rows.len() - 1].id.clone());
        let rows = rows
            .into_iter()
            .filter(|s| visible(caller, s, &instances, policy::DESCRIBE_SESSIONS))
            .collect();
        Ok((rows, next))
    }

    /// Terminates the caller's session `id` (both legs closed with 4006) and returns its
    /// record as it is now.
    pub(crate) async fn terminate(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<SessionRecord, SessionError> {
        let rec = self.session_for(caller, id, policy::TERMINATE_SESSION).await?;
        if rec.state.is_open() {
            info!(session = %rec.id, user = caller.principal(), "session terminated");
            self.end_session(
                &rec.id,
                &rec.instance_id,
                CLOSE_TERMINATED,
                CloseReason::Terminated,
                "terminated",
            )
            .await;
        }
        let (id, account) = (rec.id.clone(), caller.account.id.clone());
        Ok(self.blocking(move |s| s.session(Some(&account), &id)).await?.unwrap_or(rec))
    }
}

/// The 403 of an account whose session-manager switch is off.
fn switch_on(caller: &Caller) -> Result<(), SessionError> {
    if caller.account.session_manager_enabled {
        return Ok(());
    }
    Err(SessionError::Disabled(caller.account.id.clone()))
}

/// What the reconcile loop saw on its last look.
pub(super) struct Reconciled {
    /// Sessions closed at or after this (seconds) are looked for next.
    pub(super) since: i64,
    /// Per account with live sessions: its IAM generation, and whether it was already the same
    /// on the look before (then the account is settled and not re-checked).
    pub(super) generations: HashMap<String, (i64, bool)>,
}

impl Shared {
    /// Closes an open session in the store and the live map; true when it was open.
    pub(super) async fn close(&self, id: &str, reason: CloseReason, c2a: u64, a2c: u64) -> bool {
        self.live.remove(id);
        let sid = id.to_owned();
        let now = unix_now();
        match self.blocking(move |s| s.close_session(&sid, reason, c2a, a2c, now)).await {
            Ok(true) => {
                self.metrics.session_closed(reason.as_str());
                true
            }
            Ok(false) => false,
            Err(e) => {
                warn!(session = %id, err = %e, "recording session close failed");
                false
            }
        }
    }

    /// Writes the queued progress reports (live sessions' byte counts so far), emptying it.
    pub(super) async fn record_progress(&self, rows: &mut Vec<(String, u64, u64)>) {
        if rows.is_empty() {
            return;
        }
        let rows = std::mem::take(rows);
        let n = rows.len();
        if let Err(e) = self.blocking(move |s| s.record_progress(&rows)).await {
            warn!(sessions = n, err = %e, "recording session byte counts failed");
        }
    }

    /// Whether this node's recording directory can be written now (a session of an account
    /// that requires recording is refused otherwise, never run unrecorded).
    async fn recording_writable(&self) -> Result<(), SessionError> {
        let Some(dir) = self.cfg.recording_dir.clone() else {
            return Err(SessionError::RecordingUnavailable(
                "the account requires session recording and this relay has no recording \
                 directory"
                    .into(),
            ));
        };
        let shown = dir.display().to_string();
        let res = tokio::task::spawn_blocking(move || crate::recording::probe(&dir)).await;
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => {
                warn!(dir = %shown, %err, "recording directory not writable; refusing a recorded session");
                Err(SessionError::RecordingUnavailable(format!(
                    "the account requires session recording and the relay cannot write \
                     recordings now ({})",
                    err.kind()
                )))
            }
            Err(e) => Err(SessionError::Internal(anyhow::anyhow!("recording probe: {e}"))),
        }
    }

    pub(super) async fn on_event(&self, ev: DataEvent) {
        use live::LiveState;
        match ev {
            DataEvent::Detached { session_id, at } => {
                if self.live.set_state(&session_id, LiveState::Detached).is_some() {
                    debug!(session = %session_id, "session detached");
                    let at = unix_of(at);
                    let sid = session_id.clone();
                    if let Err(e) = self.blocking(move |s| s.mark_detached(&sid, at)).await {
                        warn!(session = %session_id, err = %e, "recording detach failed");
                    }
                }
            }
            DataEvent::Resumed { session_id, .. } => {
                if self.live.set_state(&session_id, LiveState::Connected).is_some() {
                    debug!(session = %session_id, "session resumed");
                    self.record_resumed(&session_id).await;
                }
            }
            DataEvent::Connected { session_id, at } => {
                match self.live.set_state(&session_id, LiveState::Connected) {
                    Some(LiveState::Pending) => {
                        let at = unix_of(at);
                        let sid = session_id.clone();
                        if let Err(e) = self.blocking(move |s| s.mark_connected(&sid, at)).await {
                            warn!(session = %session_id, err = %e, "recording connect failed");
                        }
                    }
                    // A session recovered at start: this data plane never saw it, so the
                    // pairing of its two resumed legs is a first one here.
                    Some(LiveState::Detached) => self.record_resumed(&session_id).await,
                    Some(LiveState::Connected) | None => {}
                }
            }
            DataEvent::Ended(end)
                if end.reason == CloseReason::RelayShutdown
                    && !self.cfg.resume_window.is_zero()
                    && self
                        .live
                        .state(&end.session_id)
                        .is_some_and(|s| s != LiveState::Pending) =>
            {
                // The data plane shutting down: with a resume window the session outlives this
                // process. Its counts are kept and its record left open (`detached`), for the
                // next start to keep resumable.
                debug!(session = %end.session_id, "session kept open across the relay shutdown");
                let (c2a, a2c) = self.live.with_base(
                    &end.session_id,
                    end.bytes_client_to_agent,
                    end.bytes_agent_to_client,
                );
                self.live.remove(&end.session_id);
                let mut rows = vec![(end.session_id.clone(), c2a, a2c)];
                self.record_progress(&mut rows).await;
                let (sid, at) = (end.session_id.clone(), unix_now());
                if let Err(e) = self.blocking(move |s| s.mark_detached(&sid, at)).await {
                    warn!(session = %end.session_id, err = %e, "recording detach failed");
                }
            }
            DataEvent::Ended(end) => {
                debug!(session = %end.session_id, reason = end.reason.as_str(), "session ended");
                let (c2a, a2c) = self.live.with_base(
                    &end.session_id,
                    end.bytes_client_to_agent,
                    end.bytes_agent_to_client,
                );
                self.close(&end.session_id, end.reason, c2a, a2c).await;
            }
            DataEvent::Progress { session_id, bytes_client_to_agent, bytes_agent_to_client } => {
                let (c2a, a2c) =
                    self.live.with_base(&session_id, bytes_client_to_agent, bytes_agent_to_client);
                let mut rows = vec![(session_id, c2a, a2c)];
                self.record_progress(&mut rows).await;
            }
            DataEvent::Recording(outcome) => self.on_recording(outcome).await,
        }
    }

    /// Keeps a recording's digest with its session: the final one when it finished, the
    /// digest so far when it was suspended (a relay stopping with the session resumable). A
    /// failure was logged and acted on by the data plane (the session ended, 4018).
    async fn on_recording(&self, outcome: crate::recording::Outcome) {
        use crate::recording::Outcome;
        let (sid, digest, records) = match outcome {
            Outcome::Finished { session_id, digest, records, .. } => (session_id, digest, records),
            Outcome::Suspended { session_id, digest, records, .. } => (session_id, digest, records),
            Outcome::Failed { session_id, failure } => {
                warn!(session = %session_id, err = %failure, "session recording failed");
                return;
            }
        };
        info!(session = %sid, records, %digest, "session recording synced");
        let (id, hex) = (sid.clone(), digest.to_string());
        match self.blocking(move |s| s.set_recording_digest(&id, &hex)).await {
            Ok(true) => {}
            Ok(false) => warn!(session = %sid, "recording digest for an unknown session"),
            Err(e) => warn!(session = %sid, err = %e, "storing the recording digest failed"),
        }
    }

    /// Records a detached session connected again.
    pub(super) async fn record_resumed(&self, id: &str) {
        let sid = id.to_owned();
        if let Err(e) = self.blocking(move |s| s.mark_resumed(&sid)).await {
            warn!(session = %id, err = %e, "recording resume failed");
        }
    }

    pub(super) async fn sweep(&self) {
        let now = Instant::now();
        for (id, lost) in self.live.recovered_overdue(now) {
            info!(session = %id, window_s = self.cfg.resume_window.as_secs(), reason = %lost,
                "session kept across a relay restart (or taken over from a dead node) not \
                 resumed within the window; closing");
            // As for the pending sweep: the record first, then a leg that came back alone.
            let closed = self.close(&id, lost, 0, 0).await;
            self.data.command(DataCommand::Terminate {
                session_id: id.clone(),
                code: CLOSE_PAIR_TIMEOUT,
            });
            if closed {
                self.tell_agent_close(&id, None, "not resumed within the resume window").await;
            }
        }
        for id in self.live.overdue(now) {
            info!(session = %id, "legs not paired before the pending timeout; closing");
            // Recorded before the data plane is told: its own end of a leg that was waiting
            // (`terminated`) then finds the record closed and leaves the reason alone.
            let closed = self.close(&id, CloseReason::PairTimeout, 0, 0).await;
            self.data.command(DataCommand::Terminate {
                session_id: id.clone(),
                code: CLOSE_PAIR_TIMEOUT,
            });
            if closed {
                self.tell_agent_close(&id, None, "pair timeout").await;
            }
        }
    }

    /// Deletes closed session records older than the retention, in batches of
    /// [`PRUNE_BATCH`] (each its own store call, so requests get the store between them), at
    /// most [`PRUNE_BATCHES`] per call: a large backlog is worked off over several sweeps.
    pub(super) async fn prune(&self) {
        let keep = self.cfg.session_retention;
        if keep.is_zero() {
            return;
        }
        let before = unix_now().saturating_sub(i64::try_from(keep.as_secs()).unwrap_or(i64::MAX));
        let mut total = 0;
        for _ in 0..PRUNE_BATCHES {
            match self.blocking(move |s| s.prune_closed(before, PRUNE_BATCH)).await {
                Ok(n) => {
                    total += n;
                    if n < PRUNE_BATCH as usize {
                        break;
                    }
                }
                Err(e) => {
                    warn!(err = %e, "pruning old session records failed");
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        if total > 0 {
            self.metrics.sessions_pruned(total as u64);
            info!(sessions = total, retention_s = keep.as_secs(), "pruned old session records");
        }
    }

    /// Deletes the recordings older than `--recording-retention` (counted from their last
    /// record) on a blocking thread, except those of sessions live here. A file that cannot be
    /// deleted is logged and tried again on the next sweep.
    pub(super) async fn prune_recordings(self: &Arc<Self>) {
        let keep = self.cfg.recording_retention;
        let Some(dir) = self.cfg.recording_dir.clone().filter(|_| !keep.is_zero()) else {
            return;
        };
        let me = self.clone();
        let done = tokio::task::spawn_blocking(move || {
            crate::recording::retention::delete_expired(
                &dir,
                std::time::SystemTime::now(),
                keep,
                |sid| me.live.contains(sid),
            )
        })
        .await;
        match done {
            Ok(Ok(report)) => {
                for (path, err) in &report.failed {
                    warn!(file = %path.display(), %err, "deleting an old recording failed");
                }
                if !report.deleted.is_empty() {
                    info!(
                        recordings = report.deleted.len(),
                        retention_s = keep.as_secs(),
                        "deleted old session recordings"
                    );
                }
            }
            // No directory yet: nothing was recorded.
            Ok(Err(err)) if err.kind() == io::ErrorKind::NotFound => {}
            Ok(Err(err)) => warn!(%err, "listing the recordings failed"),
            Err(err) => warn!(%err, "recording retention task failed"),
        }
    }

    /// Applies changes another process (`hatch-relay admin`) or the API made to the store:
    /// accounts switched off end their live sessions (4010); sessions closed in the store but
    /// still live here are terminated (4006); in an account whose IAM generation moved (a key
    /// revoked, a policy replaced or detached, a user disabled) every live session is evaluated
    /// again and those whose caller lost access end (4012, `access_revoked`).
    ///
    /// An account is re-checked when its generation is first seen and on the look after each
    /// change as well: a session whose caller was authorised just before a change but that
    /// became live just after the first re-check is caught by the second.
    pub(super) async fn reconcile(&self, seen: &mut Reconciled) {
        let now = unix_now();
        let since = seen.since;
        // One store look per account with live sessions (not per session): the switch and the
        // IAM generation. Sessions are read only for the accounts that need a re-check.
        let accounts = self.live.accounts();
        let res = self
            .blocking(move |s| {
                let mut off = Vec::new();
                let mut current = Vec::with_capacity(accounts.len());
                for a in accounts {
                    if s.account(&a)?.is_some_and(|acc| !acc.session_manager_enabled) {
                        off.push(a);
                    } else {
                        let g = s.iam_generation(&a)?;
                        current.push((a, g));
                    }
                }
                // Second granularity: look one second back so nothing closed in the same
                // second as the last look is missed.
                let closed = s.closed_since(since - 1)?;
                Ok((off, closed, current))
            })
            .await;
        let (off, closed, current) = match res {
            Ok(x) => x,
            Err(e) => {
                warn!(err = %e, "reconciling with the store failed");
                return;
            }
        };
        let mut generations = HashMap::with_capacity(current.len());
        let mut changed = Vec::new();
        for (a, g) in current {
            let before = seen.generations.get(&a).copied();
            let same = before.is_some_and(|(b, _)| b == g);
            if !(same && before.is_some_and(|(_, settled)| settled)) {
                changed.push((a.clone(), self.live.of_account(&a)));
            }
            generations.insert(a, (g, same));
        }
        let revoked = if changed.is_empty() {
            Vec::new()
        } else {
            let res = self
                .blocking(move |s| {
                    let mut revoked = Vec::new();
                    for (a, ids) in changed {
                        let mut recs = Vec::with_capacity(ids.len());
                        for id in &ids {
                            if let Some(r) = s.session(None, id)? {
                                recs.push(r);
                            }
                        }
                        revoked.extend(access::recheck(s, &a, &recs)?);
                    }
                    Ok(revoked)
                })
                .await;
            match res {
                Ok(r) => r,
                Err(e) => {
                    // Not marked seen: the next look tries these accounts again.
                    warn!(err = %e, "re-checking live sessions' access failed");
                    generations.clear();
                    Vec::new()
                }
            }
        };
        seen.since = now;
        seen.generations = generations;
        for account in off {
            info!(account = %account, "session manager switched off in the store; ending sessions");
            self.disable_account(&account).await;
        }
        for (rec, why) in revoked {
            info!(session = %rec.id, account = %rec.account_id, principal = %rec.principal,
                key = %rec.access_key_id, reason = why.words(), "caller lost access; ending session");
            self.end_session(
                &rec.id,
                &rec.instance_id,
                CLOSE_ACCESS_REVOKED,
                CloseReason::AccessRevoked,
                why.words(),
            )
            .await;
        }
        for (id, instance) in closed {
            // Sessions this process closes leave the live map before the store, so a closed
            // record that is still live was closed by someone else.
            if self.live.remove(&id).is_some() {
                info!(session = %id, "session closed in the store; terminating it");
                self.data.command(DataCommand::Terminate {
                    session_id: id.clone(),
                    code: CLOSE_TERMINATED,
                });
                self.tell_agent_close(&id, Some(&instance), "terminated").await;
            }
        }
    }

    /// Ends every open session of an account with 4010 (the switch was turned off).
    pub(super) async fn disable_account(&self, account: &str) {
        let ids = self.live.of_account(account);
        let ids_for_store = ids.clone();
        let instances: Vec<(String, String)> = match self
            .blocking(move |s| {
                let mut out = Vec::new();
                for id in &ids_for_store {
                    if let Some(r) = s.session(None, id)? {
                        out.push((r.id, r.instance_id));
                    }
                }
                Ok(out)
            })
            .await
        {
            Ok(v) => v,
            Err(e) => {
                warn!(err = %e, "listing sessions to end failed");
                ids.into_iter().map(|i| (i, String::new())).collect()
            }
        };
        for (id, inst) in instances {
            self.end_session(
                &id,
                &inst,
                CLOSE_DISABLED,
                CloseReason::Terminated,
                "session manager disabled",
            )
            .await;
        }
    }

    /// An instance that can no longer be reached as itself (deregistered, or its secret
    /// revoked): its live sessions end (4006, the agent told `why`) and its control channel is
    /// closed (1008, `why`), so that a copy of the old secret keeps nothing open.
    ///
    /// In a fleet the instance's sessions on other nodes are closed in the store (their nodes'
    /// reconcile ends them), and the node holding its control channel is told to close it.
    pub(crate) async fn instance_gone(&self, account: &str, instance: &str, why: &'static str) {
        for id in self.live.of_instance(instance) {
            self.end_session(&id, instance, CLOSE_TERMINATED, CloseReason::Terminated, why).await;
        }
        if self.agents.disconnect(instance, hatch_proto::close::POLICY_VIOLATION, why) {
            info!(instance = %instance, why, "control channel closed");
        }
        if !self.fleet {
            return;
        }
        let (acct, inst) = (account.to_owned(), instance.to_owned());
        let res = self
            .blocking(move |s| {
                let now = unix_now();
                let mut closed = 0;
                let mut before: Option<String> = None;
                loop {
                    let page =
                        s.sessions(Some(&acct), StateFilter::Active, 500, before.as_deref())?;
                    for r in page.iter().filter(|r| r.instance_id == inst) {
                        if s.close_session(&r.id, CloseReason::Terminated, 0, 0, now)? {
                            closed += 1;
                        }
                    }
                    match page.last() {
                        Some(last) if page.len() == 500 => before = Some(last.id.clone()),
                        _ => break,
                    }
                }
                Ok((closed, s.agent_channel(&inst)?))
            })
            .await;
        match res {
            Ok((closed, ch)) => {
                if closed > 0 {
                    info!(instance = %instance, sessions = closed, why,
                        "closed the instance's sessions on other nodes");
                }
                if let Some(ch) = ch.filter(|c| c.node_id != self.cfg.node.id) {
                    let mail = Mail::Kick { instance_id: instance.to_owned(), why: why.to_owned() };
                    if let Err(e) = self.post(&ch.node_id, &mail).await {
                        warn!(instance = %instance, node = %ch.node_id, err = %format!("{e:#}"),
                            "asking another node to close the instance's control channel failed");
                    }
                }
            }
            Err(e) => warn!(instance = %instance, err = %format!("{e:#}"),
                "closing the instance's sessions on other nodes failed"),
        }
    }

    /// Instances whose agent is connected to another heartbeating node of the fleet (empty for
    /// one relay).
    pub(crate) async fn online_elsewhere(
        &self,
    ) -> anyhow::Result<std::collections::HashSet<String>> {
        if !self.fleet {
            return Ok(Default::default());
        }
        let since = unix_now()
            .saturating_sub(i64::try_from(self.cfg.node_timeout.as_secs()).unwrap_or(i64::MAX));
        let me = self.cfg.node.id.clone();
        let rows = self.blocking(move |s| s.online_instances(since)).await?;
        Ok(rows.into_iter().filter(|(_, n)| *n != me).map(|(i, _)| i).collect())
    }

    /// Ends an open session now: data plane legs closed with `code`, store record closed as
    /// `reason`, the agent told `why`.
    pub(super) async fn end_session(
        &self,
        id: &str,
        instance: &str,
        code: u16,
        reason: CloseReason,
        why: &str,
    ) {
        // The record first: the data plane's own report of the end (`terminated`) must find it
        // closed already and only add the byte counts, not set its reason.
        self.close(id, reason, 0, 0).await;
        self.data.command(DataCommand::Terminate { session_id: id.to_owned(), code });
        self.tell_agent_close(id, Some(instance), why).await;
    }

    pub(super) async fn tell_agent_close(&self, id: &str, instance: Option<&str>, why: &str) {
        let instance = match instance {
            Some(i) => i.to_owned(),
            None => {
                let sid = id.to_owned();
                match self.blocking(move |s| s.session(None, &sid)).await {
                    Ok(Some(s)) => s.instance_id,
                    _ => return,
                }
            }
        };
        let _ = self.agents.send(
            &instance,
            ToAgent::SessionClose { session_id: id.to_owned(), reason: why.to_owned() },
        );
    }

    /// The agent said it could not start `id`. In a fleet, a session another node holds is
    /// left to that node: the agent moved its control channel here after `session.open` came
    /// through the other node, most often because that node died (its expiry then closes the
    /// session as `node_lost`, the truer reason); a live node ends it by its own pair timeout.
    pub(super) async fn agent_failed(&self, instance: &str, id: &str) {
        let sid = id.to_owned();
        let rec = match self.blocking(move |s| s.session(None, &sid)).await {
            Ok(Some(s)) if s.instance_id == instance => s,
            _ => return,
        };
        if let Some(node) = rec.node_id.as_deref().filter(|n| self.fleet && *n != self.cfg.node.id)
        {
            info!(session = %id, instance = %instance, node = %node,
                "agent could not start a session another node holds; left to that node");
            return;
        }
        self.data
            .command(DataCommand::Terminate { session_id: id.to_owned(), code: CLOSE_PEER_GONE });
        self.close(id, agents::AGENT_FAILED, 0, 0).await;
    }

    /// An agent's `session.resume`: a resume token for a new agent leg of one of its instance's
    /// paired, open sessions (`connected` or `detached`), or a `session.close` saying why not.
    /// Another instance's session is answered as an unknown one and never gets a token. `None`
    /// (no answer; the agent asks again) when the store cannot be read or the channel is gone.
    pub(super) async fn agent_resume(&self, instance: &str, id: &str) -> Option<ToAgent> {
        let (sid, inst) = (id.to_owned(), instance.to_owned());
        let res = self
            .blocking(move |s| {
                let Some(rec) = s.session(None, &sid)? else { return Ok(None) };
                if rec.instance_id != inst {
                    return Ok(None);
                }
                let acct = s.account(&rec.account_id)?;
                let enabled = acct.as_ref().is_some_and(|a| a.session_manager_enabled);
                let prefs = acct.map(|a| a.prefs).unwrap_or_default();
                Ok(Some((rec, enabled, prefs)))
            })
            .await;
        let why = match res {
            Err(e) => {
                warn!(instance = %instance, session = %hatch_proto::logtext::peer(id, 40),
                    err = %e, "reading a session an agent asks to resume failed");
                return None;
            }
            Ok(None) => "no such session on this instance",
            Ok(Some((_, false, _))) => "session manager disabled",
            Ok(Some((rec, true, prefs))) => match rec.state {
                SessionState::Connected | SessionState::Detached => {
                    return self.agent_resume_token(instance, &rec, prefs).await;
                }
                SessionState::Pending => "session never paired: nothing to resume",
                SessionState::Closed => "session closed",
            },
        };
        info!(instance = %instance, session = %hatch_proto::logtext::peer(id, 40), reason = why,
            "agent's session resume refused");
        Some(ToAgent::SessionClose { session_id: id.to_owned(), reason: why.to_owned() })
    }

    pub(super) async fn agent_resume_token(
        &self,
        instance: &str,
        rec: &store::SessionRecord,
        prefs: store::SessionPrefs,
    ) -> Option<ToAgent> {
        // The agent's own host for the data plane, as for session.open: never a client's; or
        // the data plane of the fleet node holding the session.
        let route = match self.route(rec).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Some(ToAgent::SessionClose {
                    session_id: rec.id.clone(),
                    reason: "the relay node holding the session is gone".into(),
                });
            }
            Err(e) => {
                warn!(session = %rec.id, err = %format!("{e:#}"), "finding a session's node failed");
                return None;
            }
        };
        let base = match route.data_base {
            Some(b) => b,
            None => self.agents.data_base(instance)?,
        };
        let now = u64::try_from(unix_now()).unwrap_or(0);
        let issued = self.signer.issue_in_run(
            &route.run,
            &rec.id,
            hatch_proto::token::Role::Agent,
            &rec.instance_id,
            &rec.account_id,
            now,
            &crate::token::LegTerms::of(rec.mode == store::Mode::Port, prefs)
                .recorded(rec.recording, &rec.principal)
                .resumed(),
        );
        match issued {
            Ok((token, _)) => {
                self.metrics.resume_token(false);
                info!(instance = %instance, session = %rec.id, state = %rec.state,
                    "agent resume token issued");
                Some(ToAgent::SessionResume {
                    session_id: rec.id.clone(),
                    stream_url: format!("{base}/v1/stream/{}?role=agent", rec.id),
                    token,
                })
            }
            Err(e) => {
                warn!(session = %rec.id, err = %e, "issuing an agent resume token failed");
                None
            }
        }
    }

    /// An agent's counts of a session whose data leg died without a close from the relay
    /// (`session.report`): applied only to a session of this agent's instance that a relay
    /// closed as `relay_shutdown` (its own end was lost with the relay), never lowering a count.
    /// Anything else is logged and ignored: another instance's session (a hostile or confused
    /// agent), or a session the relay recorded itself.
    pub(super) async fn agent_report(
        &self,
        instance: &str,
        id: &str,
        c2a: u64,
        a2c: u64,
        exit: Option<i32>,
    ) {
        let (sid, inst) = (id.to_owned(), instance.to_owned());
        let reason = CloseReason::RelayShutdown;
        let res = self
            .blocking(move |s| {
                let Some(rec) = s.session(None, &sid)? else { return Ok(None) };
                if rec.instance_id != inst {
                    return Ok(None);
                }
                let applied = s.record_lost_counts(&sid, &inst, reason, c2a, a2c)?;
                Ok(Some((applied, rec.close_reason)))
            })
            .await;
        match res {
            Ok(Some((true, _))) => info!(
                instance = %instance, session = %id, c2a, a2c, exit_code = ?exit,
                "byte counts of a session lost with a relay, as its agent counted them"
            ),
            Ok(Some((false, reason))) => debug!(
                instance = %instance, session = %id, close_reason = ?reason,
                "agent's session report ignored: the relay recorded that session's end itself"
            ),
            Ok(None) => warn!(
                // The id comes from the agent: clipped and escaped.
                instance = %instance, session = %hatch_proto::logtext::peer(id, 40),
                "agent reported a session that is not one of its instance's; ignored"
            ),
            Err(e) => warn!(
                err = %e, session = %hatch_proto::logtext::peer(id, 40),
                "recording an agent's session report failed"
            ),
        }
    }
}

/// Closed session records deleted per store call: a few milliseconds of holding the store.
const PRUNE_BATCH: u32 = 500;
/// Store calls per prune: at most 50,000 records a run, the rest in later runs.
const PRUNE_BATCHES: usize = 100;

/// How often old session records are looked for: a tenth of the retention, between 1 s (tests
/// with a tiny retention) and 60 s (the look is one indexed range query that finds nothing on
/// most runs).
pub(super) fn prune_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}
