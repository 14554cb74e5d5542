//! The control plane: HTTPS API, policy, store, agent control channels, session lifecycle.
//!
//! ```text
//!  client ── POST /v1/sessions ──▶ api ──▶ sessions ── store (spawn_blocking), policy, live
//!                                   │                                           │
//!                                   └─▶ TokenSigner ─▶ agents::Hub ── session.open ──▶ agent
//!  data plane ── DataEvent (channel) ──▶ sessions::on_event ──▶ store + live
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
//! - [`sessions`]: the session lifecycle: start, resume, terminate and list for the API
//!   (typed [`sessions::SessionError`]s), data-plane events, sweeps, pruning, reconcile, and
//!   the agents' session messages.
//! - [`store`]: the persistent record behind the narrow [`store::Store`] trait; its SQLite
//!   implementation and schema in `store/sqlite.rs` and `store/schema.rs`.
//! - [`credentials`]: secret generation and hashing.
//! - [`policy`]: the policy language and its evaluation.
//! - [`access`]: a principal's grants, and whether a live session's caller still has them.
//! - [`auth`]: who is calling (`Caller`): access keys checked against the store, bearer or
//!   behind a console session.
//! - [`console`]: the browser console's cookie sessions and one-time login links (bounded, in
//!   memory); `console_api`: its page, assets and routes (docs/CONSOLE.md).
//! - [`api`]: the HTTP routes (parse, call a service, render) and the one mapping of typed
//!   errors to `{code, message, request_id}` answers.
//! - [`agents`]: which agents are online, their control channels.
//! - [`live`]: open sessions in memory (limits, switch, pending sweep), start rate per key.
//! - [`metrics`]: counters for `/metrics`.
//! - [`http`]: serving the router over TLS (tokio-rustls + hyper) with the peer address: the
//!   connection cap, and every request head checked (JSON refusals) before hyper reads it.
//! - [`signing`]: the token signing keys in the data directory (rotation by key id).
//! - [`iam`]: accounts, users, keys, policies, activations and instance records: the
//!   operations behind the IAM API and `hatch-relay admin`, with typed [`iam::IamError`]s.
//! - [`fleet`]: several relay nodes on one PostgreSQL store: placement, mail between nodes,
//!   heartbeat and expiry.

pub mod access;
pub mod agents;
pub mod api;
pub mod audit;
pub mod auth;
pub mod console;
mod console_api;
pub mod credentials;
pub mod fleet;
pub mod http;
pub mod iam;
mod iam_api;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod sessions;
pub mod signing;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::plane::{CloseReason, DataCommand, DataEvent};
use crate::token::TokenSigner;
use sessions::{Reconciled, prune_interval};
use store::Store;

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

/// The origin (`scheme://host[:port]`) of the console at an API URL (`--public-api-url`), as
/// a browser names it in `Origin`: the data plane lets pages of it open stream legs.
pub fn console_origin(api_url: &str) -> String {
    console_api::origin_of(api_url)
}

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
    /// The API's public base URL (`https://relay-1.example.com:7444`), as this node registers
    /// itself in a fleet; by default the API listener's address.
    pub public_api_url: Option<String>,
    /// The data plane's port, for URLs derived from the `Host` header.
    pub data_port: u16,
    /// `wss` (TLS) or `ws` (`--danger-plaintext`).
    pub data_scheme: &'static str,
    /// Limits on open sessions and on the rate of session starts.
    pub limits: live::Limits,
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
    pub agent_resume_rate: live::Rate,
    /// Bearer token `GET /metrics` takes (`--metrics-token-file`); without one, `/metrics`
    /// answers loopback peers only.
    pub metrics_token: Option<String>,
    /// This node: its id and public URLs, as it registers itself in a fleet.
    pub node: fleet::NodeSelf,
    /// A fleet node silent this long is expired by another (`--node-timeout`): its sessions
    /// are closed as `node_lost`.
    pub node_timeout: Duration,
    /// The audit log file this node appends to (`DATA_DIR/audit.log`); `None`: the store only.
    pub audit_file: Option<std::path::PathBuf>,
    /// Session recordings older than this (by their last record) are deleted from the
    /// recording directory, except those of live sessions; zero keeps them forever.
    pub recording_retention: Duration,
    /// This node's recording directory (`<data dir>/recordings`), where its data plane writes
    /// the recordings of its sessions; `None`: recorded sessions are refused
    /// (`RecordingUnavailable`).
    pub recording_dir: Option<std::path::PathBuf>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            region: "local".into(),
            public_data_url: None,
            public_api_url: None,
            data_port: 7443,
            data_scheme: "wss",
            limits: live::Limits {
                per_instance: 1000,
                per_account: 20_000,
                per_user: 100,
                start_rate: live::Rate { per_sec: 20.0, burst: 100 },
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
            node: fleet::NodeSelf::default(),
            node_timeout: Duration::from_secs(15),
            audit_file: None,
            recording_dir: None,
            recording_retention: Duration::ZERO,
        }
    }
}

/// State shared by every request handler and task of the control plane.
pub(crate) struct Shared {
    cfg: ControlConfig,
    store: Arc<dyn Store>,
    /// The store is shared with other relay nodes ([`fleet`]).
    fleet: bool,
    signer: TokenSigner,
    data: Arc<dyn DataLink>,
    agents: agents::Hub,
    live: live::LiveSessions,
    start_rate: live::StartRate,
    /// `session.resume` requests per instance (`cfg.agent_resume_rate`).
    resume_rate: live::StartRate,
    metrics: metrics::Metrics,
    shutdown: CancellationToken,
    /// When this node's heartbeat last reached the store (a fleet; seconds since the epoch).
    last_beat: std::sync::atomic::AtomicI64,
    /// The audit log file (`cfg.audit_file`), open for appending.
    audit: Option<Arc<audit::AuditFile>>,
    /// The browser console's sessions and login links.
    console: std::sync::Mutex<console::Book>,
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

/// Seconds since the epoch as RFC 3339 (UTC), as the API shows times.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
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
        let live = live::LiveSessions::default();
        let reason = CloseReason::RelayShutdown;
        let fleet = store.shared();
        let node = cfg.node.id.clone();
        if fleet {
            // Registered before anything is placed here; the channels of a previous run of
            // this node are gone with it.
            let now = unix_now();
            store.register_node(&store::Node {
                id: node.clone(),
                api_url: cfg.node.api_url.clone(),
                data_url: cfg.node.data_url.clone(),
                run: signer.run().to_owned(),
                started_at: now,
                heartbeat_at: now,
            })?;
            store.clear_agent_channels(&node)?;
            info!(node = %node, api = %cfg.node.api_url, data = %cfg.node.data_url,
                "registered this relay node in the fleet");
        }
        if cfg.resume_window.is_zero() {
            let n = store.close_all_open(&node, reason, unix_now())?;
            if n > 0 {
                info!(sessions = n, "closed sessions left open by a previous run");
            }
        } else {
            let (closed, recovered) = store.recover_open(&node, reason, unix_now())?;
            let deadline = Instant::now() + cfg.resume_window;
            for r in &recovered {
                let who = live::Admission {
                    account: &r.account_id,
                    instance: &r.instance_id,
                    principal: &r.principal,
                };
                live.recover(
                    &r.id,
                    who,
                    deadline,
                    [r.bytes_client_to_agent, r.bytes_agent_to_client],
                    reason,
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
        let audit =
            cfg.audit_file.as_deref().map(audit::AuditFile::open).transpose()?.map(Arc::new);
        Ok(ControlPlane {
            shared: Arc::new(Shared {
                audit,
                cfg,
                store,
                fleet,
                signer,
                data,
                agents: agents::Hub::default(),
                live,
                start_rate: live::StartRate::default(),
                resume_rate: live::StartRate::default(),
                metrics: metrics::Metrics::default(),
                shutdown: CancellationToken::new(),
                last_beat: std::sync::atomic::AtomicI64::new(unix_now()),
                console: std::sync::Mutex::default(),
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
        if sweep.fleet
            && let Err(e) = fleet::spawn_heartbeat(sweep.clone())
        {
            warn!(err = %e, "starting the fleet heartbeat failed");
        }
        tokio::spawn(async move {
            let period = (sweep.cfg.pending_timeout / 4)
                .clamp(Duration::from_millis(20), Duration::from_secs(5));
            let mut tick = tokio::time::interval(period);
            let mut reconcile = tokio::time::interval(sweep.cfg.reconcile_interval);
            let mut prune = tokio::time::interval(prune_interval(sweep.cfg.session_retention));
            let mut recordings =
                tokio::time::interval(prune_interval(sweep.cfg.recording_retention));
            let mut seen = Reconciled { since: unix_now(), generations: HashMap::new() };
            // A fleet node: the expiry of silent nodes and its mail on the reconcile tick (its
            // own heartbeat is a thread, `fleet::spawn_heartbeat`), and woken at once by the
            // store's notifications (hints: the tick finds everything anyway).
            let mut wakes = if sweep.fleet {
                match sweep.store.listen(&sweep.cfg.node.id) {
                    Ok(w) => w,
                    Err(e) => {
                        warn!(err = %format!("{e:#}"), "listening to the store failed; polling");
                        None
                    }
                }
            } else {
                None
            };
            loop {
                tokio::select! {
                    _ = sweep.shutdown.cancelled() => break,
                    _ = tick.tick() => sweep.sweep().await,
                    _ = reconcile.tick() => {
                        if sweep.fleet {
                            sweep.fleet_tick().await;
                            sweep.read_mail().await;
                        }
                        sweep.reconcile(&mut seen).await
                    }
                    _ = prune.tick() => sweep.prune().await,
                    _ = recordings.tick() => sweep.prune_recordings().await,
                    w = next_wake(&mut wakes) => match w {
                        store::Wake::Mail => sweep.read_mail().await,
                        store::Wake::Reconcile => sweep.reconcile(&mut seen).await,
                    },
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
            if keep && s.live.state(id) != Some(live::LiveState::Pending) {
                continue;
            }
            s.live.remove(id);
            s.metrics.session_closed(CloseReason::RelayShutdown.as_str());
        }
        let store = s.store.clone();
        let node = s.cfg.node.id.clone();
        let res = tokio::task::spawn_blocking(move || {
            let reason = CloseReason::RelayShutdown;
            if keep {
                store.close_pending(&node, reason, now)
            } else {
                store.close_all_open(&node, reason, now)
            }
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

/// The next wake from the store's listener; never, when there is none (or it stopped).
async fn next_wake(wakes: &mut Option<mpsc::Receiver<store::Wake>>) -> store::Wake {
    if let Some(rx) = wakes {
        if let Some(w) = rx.recv().await {
            return w;
        }
        *wakes = None;
    }
    std::future::pending().await
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
}
