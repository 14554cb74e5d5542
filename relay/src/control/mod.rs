//! The control plane: HTTPS API, policy, store, agent control channels, session lifecycle.
//!
//! ```text
//!  client ── POST /v1/sessions ──▶ api ── store (spawn_blocking) ── policy ── sessions (limits)
//!                                   │                                           │
//!                                   └─▶ TokenSigner ─▶ agents::Hub ── session.open ──▶ agent
//!  data plane ── DataEvent (channel) ──▶ on_event ──▶ store + sessions
//!  terminate / account switch ──▶ DataLink::command(DataCommand::Terminate) ──▶ data plane
//!  client ── POST /v1/sessions/{id}/resume ─┐
//!  agent ─── session.resume ────────────────┴▶ resume token (`res`) for a new leg
//! ```
//!
//! Durable sessions: a paired session whose legs the data plane lost is `detached` (it keeps
//! it for the resume window); both sides ask for resume tokens and dial new legs. With a resume
//! window, a relay restart keeps its paired sessions too: they come back `detached` and are
//! closed as `relay_shutdown` only when the window ends without them being resumed.
//!
//! - [`store`]: the persistent record behind the narrow [`store::Store`] trait (SQLite here).
//! - [`credentials`]: secret generation and hashing.
//! - [`policy`]: the policy language and its evaluation.
//! - [`access`]: a principal's grants, and whether a live session's caller still has them.
//! - [`api`]: the HTTP routes and the `{code, message, request_id}` errors.
//! - [`agents`]: which agents are online, their control channels.
//! - [`sessions`]: open sessions in memory (limits, switch, pending sweep), start rate per key.
//! - [`metrics`]: counters for `/metrics`.
//! - [`http`]: serving the router over TLS (tokio-rustls + hyper) with the peer address: the
//!   connection cap, and every request head checked (JSON refusals) before hyper reads it.
//! - [`signing`]: the token signing keys in the data directory (rotation by key id).
//! - [`admin`]: the store operations behind `hatch-relay admin`.

pub mod access;
pub mod admin;
pub mod agents;
pub mod api;
pub mod credentials;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod sessions;
pub mod signing;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hatch_proto::control::ToAgent;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::plane::{CloseReason, DataCommand, DataEvent};
use crate::token::TokenSigner;
use store::{SessionState, Store};

/// Close code for a session terminated through the API (DESIGN.md close codes).
pub const CLOSE_TERMINATED: u16 = 4006;
/// Close code for sessions ended by the account switch.
pub const CLOSE_DISABLED: u16 = 4010;
/// Close code for sessions whose caller lost access (key revoked, user disabled, policy).
pub const CLOSE_ACCESS_REVOKED: u16 = hatch_proto::close::ACCESS_REVOKED;
/// Close code when the agent could not start the session (the peer is gone).
pub const CLOSE_PEER_GONE: u16 = 4005;
/// Close code sent for a pending session closed by the sweep (its peer never came), and for a
/// session recovered at start whose other leg did not come back within the resume window.
pub const CLOSE_PAIR_TIMEOUT: u16 = 4004;

/// How the control plane reaches the data plane. The server implements it over
/// `data::DataPlane`; before the data plane is started (or in tests of the API alone) the
/// commands go nowhere.
pub trait DataLink: Send + Sync + 'static {
    /// Sends a command to the shards.
    fn command(&self, cmd: DataCommand);
    /// The data plane's Prometheus text lines.
    fn metrics(&self) -> String {
        String::new()
    }
}

/// A data link that drops every command (no data plane in this process).
pub struct NoDataPlane;

impl DataLink for NoDataPlane {
    fn command(&self, cmd: DataCommand) {
        debug!(?cmd, "no data plane; command dropped");
    }
}

/// Settings of the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Region of this relay (used in resource names of instances without one).
    pub region: String,
    /// The data plane's public base URL (`wss://relay.example.com:7443`). When `None`, the host
    /// the caller used to reach the API and `data_port` are used.
    pub public_data_url: Option<String>,
    /// The data plane's port, for URLs derived from the `Host` header.
    pub data_port: u16,
    /// `wss` (TLS) or `ws` (`--danger-plaintext`).
    pub data_scheme: &'static str,
    /// Limits on open sessions and on the rate of session starts.
    pub limits: sessions::Limits,
    /// How often the relay sends a heartbeat on each agent control channel.
    pub heartbeat_interval: Duration,
    /// A control channel silent this long is closed.
    pub heartbeat_timeout: Duration,
    /// A session whose two legs have not both arrived this long after its creation is closed
    /// as `pair_timeout` (its waiting leg with 4004, the agent told to close), so sessions
    /// that never connect free their slot under the limits well before their tokens expire.
    pub pending_timeout: Duration,
    /// Closed session records older than this (by `closed_at`) are deleted from the store;
    /// zero keeps them forever.
    pub session_retention: Duration,
    /// Most connections the API listener holds at once (agents' control channels included);
    /// beyond it, new connections are reset at accept.
    pub max_api_connections: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// How often the relay looks in the store for changes made by `hatch-relay admin` from
    /// another process (an account switched off, a session terminated) and applies them to
    /// live sessions.
    pub reconcile_interval: Duration,
    /// The data plane's resume window (`--resume-window`); zero: off. With it, a restart keeps
    /// paired sessions resumable for this long (`detached`), and a shutdown leaves them open.
    pub resume_window: Duration,
    /// `session.resume` requests per instance ([`agents::RESUME_RATE`] unless a test sets it).
    pub agent_resume_rate: sessions::Rate,
    /// Bearer token `GET /metrics` takes (`--metrics-token-file`); without one, `/metrics`
    /// answers loopback peers only.
    pub metrics_token: Option<String>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            region: "local".into(),
            public_data_url: None,
            data_port: 7443,
            data_scheme: "wss",
            limits: sessions::Limits {
                per_instance: 1000,
                per_account: 20_000,
                per_user: 100,
                start_rate: sessions::Rate { per_sec: 20.0, burst: 100 },
            },
            heartbeat_interval: Duration::from_secs(15),
            heartbeat_timeout: Duration::from_secs(45),
            pending_timeout: Duration::from_secs(60),
            session_retention: Duration::from_secs(90 * 24 * 3600),
            max_api_connections: 4096,
            max_body_bytes: 64 * 1024,
            reconcile_interval: Duration::from_secs(2),
            resume_window: Duration::from_secs(600),
            agent_resume_rate: agents::RESUME_RATE,
            metrics_token: None,
        }
    }
}

/// What the reconcile loop saw on its last look.
struct Reconciled {
    /// Sessions closed at or after this (seconds) are looked for next.
    since: i64,
    /// Per account with live sessions: its IAM generation, and whether it was already the same
    /// on the look before (then the account is settled and not re-checked).
    generations: HashMap<String, (i64, bool)>,
}

/// State shared by every request handler and task of the control plane.
pub(crate) struct Shared {
    cfg: ControlConfig,
    store: Arc<dyn Store>,
    signer: TokenSigner,
    data: Arc<dyn DataLink>,
    agents: agents::Hub,
    live: sessions::LiveSessions,
    start_rate: sessions::StartRate,
    /// `session.resume` requests per instance (`cfg.agent_resume_rate`).
    resume_rate: sessions::StartRate,
    metrics: metrics::Metrics,
    shutdown: CancellationToken,
}

/// The control plane of one relay process.
#[derive(Clone)]
pub struct ControlPlane {
    shared: Arc<Shared>,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn unix_of(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl ControlPlane {
    /// Builds the control plane. Sessions a previous run left open lost their legs with that
    /// process: without a resume window they are closed as `relay_shutdown`; with one, those
    /// that never paired are, and the paired ones become `detached` until the window ends
    /// (closed as `relay_shutdown` then, unless both sides resumed them).
    pub fn new(
        cfg: ControlConfig,
        store: Arc<dyn Store>,
        signer: TokenSigner,
        data: Arc<dyn DataLink>,
    ) -> anyhow::Result<Self> {
        let live = sessions::LiveSessions::default();
        let reason = CloseReason::RelayShutdown;
        if cfg.resume_window.is_zero() {
            let n = store.close_all_open(reason, unix_now())?;
            if n > 0 {
                info!(sessions = n, "closed sessions left open by a previous run");
            }
        } else {
            let (closed, recovered) = store.recover_open(reason, unix_now())?;
            let deadline = Instant::now() + cfg.resume_window;
            for r in &recovered {
                let who = sessions::Admission {
                    account: &r.account_id,
                    instance: &r.instance_id,
                    principal: &r.principal,
                };
                live.recover(
                    &r.id,
                    who,
                    deadline,
                    [r.bytes_client_to_agent, r.bytes_agent_to_client],
                );
            }
            if closed > 0 || !recovered.is_empty() {
                info!(
                    closed,
                    resumable = recovered.len(),
                    window_s = cfg.resume_window.as_secs(),
                    "sessions left open by a previous run: pending ones closed, paired ones \
                     detached for the resume window"
                );
            }
        }
        Ok(ControlPlane {
            shared: Arc::new(Shared {
                cfg,
                store,
                signer,
                data,
                agents: agents::Hub::default(),
                live,
                start_rate: sessions::StartRate::default(),
                resume_rate: sessions::StartRate::default(),
                metrics: metrics::Metrics::default(),
                shutdown: CancellationToken::new(),
            }),
        })
    }

    /// The HTTP routes.
    pub fn router(&self) -> axum::Router {
        api::router(self.shared.clone())
    }

    /// Serves the API on `listener` until `shutdown` is cancelled ([`http::serve`], with this
    /// plane's connection limit and metrics).
    pub async fn serve_api(
        &self,
        listener: tokio::net::TcpListener,
        tls: http::TlsSlot,
        shutdown: CancellationToken,
    ) {
        http::serve(listener, tls, self.router(), self.shared.clone(), shutdown).await
    }

    /// The store (for in-process tools and tests).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Starts the background tasks: the data-event consumer (ends when every sender of
    /// `events` is dropped, after recording everything received) and the pending sweep. Must
    /// be called inside a tokio runtime.
    pub fn spawn_tasks(
        &self,
        mut events: mpsc::UnboundedReceiver<DataEvent>,
    ) -> tokio::task::JoinHandle<()> {
        let sweep = self.shared.clone();
        tokio::spawn(async move {
            let period = (sweep.cfg.pending_timeout / 4)
                .clamp(Duration::from_millis(20), Duration::from_secs(5));
            let mut tick = tokio::time::interval(period);
            let mut reconcile = tokio::time::interval(sweep.cfg.reconcile_interval);
            let mut prune = tokio::time::interval(prune_interval(sweep.cfg.session_retention));
            let mut seen = Reconciled { since: unix_now(), generations: HashMap::new() };
            loop {
                tokio::select! {
                    _ = sweep.shutdown.cancelled() => break,
                    _ = tick.tick() => sweep.sweep().await,
                    _ = reconcile.tick() => sweep.reconcile(&mut seen).await,
                    _ = prune.tick() => sweep.prune().await,
                }
            }
        });
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // Progress reports already queued are written together, in one store call; every
            // other event is handled in order (a session's `Ended` after its progress).
            let mut progress = Vec::new();
            while let Some(mut ev) = events.recv().await {
                loop {
                    match ev {
                        DataEvent::Progress {
                            session_id,
                            bytes_client_to_agent,
                            bytes_agent_to_client,
                        } => {
                            let (c2a, a2c) = shared.live.with_base(
                                &session_id,
                                bytes_client_to_agent,
                                bytes_agent_to_client,
                            );
                            progress.push((session_id, c2a, a2c))
                        }
                        other => {
                            shared.record_progress(&mut progress).await;
                            shared.on_event(other).await;
                        }
                    }
                    match events.try_recv() {
                        Ok(next) => ev = next,
                        Err(_) => break,
                    }
                }
                shared.record_progress(&mut progress).await;
            }
        })
    }

    /// Stops the agent channels and background tasks, and records every session still open
    /// as `relay_shutdown`; with a resume window, only those that never paired (the paired ones
    /// stay open in the store, for the next start to keep resumable). Call after the data
    /// plane has shut down and its events were consumed.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let s = self.shared.clone();
        let now = unix_now();
        let keep = !s.cfg.resume_window.is_zero();
        let ids = s.live.all();
        for id in &ids {
            if keep && s.live.state(id) != Some(sessions::LiveState::Pending) {
                continue;
            }
            s.live.remove(id);
            s.metrics.session_closed(CloseReason::RelayShutdown.as_str());
        }
        let store = s.store.clone();
        let res = tokio::task::spawn_blocking(move || {
            let reason = CloseReason::RelayShutdown;
            if keep { store.close_pending(reason, now) } else { store.close_all_open(reason, now) }
        })
        .await;
        match res {
            Ok(Ok(n)) => info!(sessions = n, "recorded open sessions as relay_shutdown"),
            Ok(Err(e)) => warn!(err = %e, "recording sessions at shutdown failed"),
            Err(e) => warn!(err = %e, "recording sessions at shutdown panicked"),
        }
    }

    /// Whether an instance's agent is connected now.
    pub fn agent_online(&self, instance: &str) -> bool {
        self.shared.agents.is_online(instance)
    }
}

impl Shared {
    /// Runs a store call off the async executor.
    async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> anyhow::Result<R> + Send + 'static,
    ) -> anyhow::Result<R> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| anyhow::anyhow!("store task failed: {e}"))?
    }

    async fn touch_instance(&self, id: &str) {
        let id = id.to_owned();
        let now = unix_now();
        if let Err(e) = self.blocking(move |s| s.touch_instance(&id, now)).await {
            warn!(err = %e, "recording instance last-seen failed");
        }
    }

    /// Closes an open session in the store and the live map; true when it was open.
    async fn close(&self, id: &str, reason: CloseReason, c2a: u64, a2c: u64) -> bool {
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
    async fn record_progress(&self, rows: &mut Vec<(String, u64, u64)>) {
        if rows.is_empty() {
            return;
        }
        let rows = std::mem::take(rows);
        let n = rows.len();
        if let Err(e) = self.blocking(move |s| s.record_progress(&rows)).await {
            warn!(sessions = n, err = %e, "recording session byte counts failed");
        }
    }

    async fn on_event(&self, ev: DataEvent) {
        use sessions::LiveState;
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
        }
    }

    /// Records a detached session connected again.
    async fn record_resumed(&self, id: &str) {
        let sid = id.to_owned();
        if let Err(e) = self.blocking(move |s| s.mark_resumed(&sid)).await {
            warn!(session = %id, err = %e, "recording resume failed");
        }
    }

    async fn sweep(&self) {
        let now = Instant::now();
        for id in self.live.recovered_overdue(now) {
            info!(session = %id, window_s = self.cfg.resume_window.as_secs(),
                "session kept across a relay restart not resumed within the window; closing");
            // As for the pending sweep: the record first, then a leg that came back alone.
            let closed = self.close(&id, CloseReason::RelayShutdown, 0, 0).await;
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
    async fn prune(&self) {
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

    /// Applies changes another process (`hatch-relay admin`) or the API made to the store:
    /// accounts switched off end their live sessions (4010); sessions closed in the store but
    /// still live here are terminated (4006); in an account whose IAM generation moved (a key
    /// revoked, a policy replaced or detached, a user disabled) every live session is evaluated
    /// again and those whose caller lost access end (4012, `access_revoked`).
    ///
    /// An account is re-checked when its generation is first seen and on the look after each
    /// change as well: a session whose caller was authorised just before a change but that
    /// became live just after the first re-check is caught by the second.
    async fn reconcile(&self, seen: &mut Reconciled) {
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
    async fn disable_account(&self, account: &str) {
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

    /// Ends an open session now: data plane legs closed with `code`, store record closed as
    /// `reason`, the agent told `why`.
    async fn end_session(
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

    async fn tell_agent_close(&self, id: &str, instance: Option<&str>, why: &str) {
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

    /// The agent said it could not start `id`.
    async fn agent_failed(&self, instance: &str, id: &str) {
        let sid = id.to_owned();
        let inst = instance.to_owned();
        let ok = matches!(
            self.blocking(move |s| s.session(None, &sid)).await,
            Ok(Some(s)) if s.instance_id == inst
        );
        if !ok {
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
    async fn agent_resume(&self, instance: &str, id: &str) -> Option<ToAgent> {
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

    async fn agent_resume_token(
        &self,
        instance: &str,
        rec: &store::SessionRecord,
        prefs: store::SessionPrefs,
    ) -> Option<ToAgent> {
        // The agent's own host for the data plane, as for session.open: never a client's.
        let base = self.agents.data_base(instance)?;
        let now = u64::try_from(unix_now()).unwrap_or(0);
        let issued = self.signer.issue_with(
            &rec.id,
            hatch_proto::token::Role::Agent,
            &rec.instance_id,
            &rec.account_id,
            now,
            crate::token::LegTerms::of(rec.mode == store::Mode::Port, prefs).resumed(),
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
    async fn agent_report(&self, instance: &str, id: &str, c2a: u64, a2c: u64, exit: Option<i32>) {
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
fn prune_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}
