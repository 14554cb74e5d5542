//! A fleet: several relay nodes on one shared store (PostgreSQL), any of which answers the API.
//!
//! ```text
//!  client ─ POST /v1/sessions ─▶ node A ── agent_channel(i) in the store: node B
//!                                  │  admit_session (limits counted in the store)
//!                                  │  tokens in B's run, stream URL on B's data plane
//!                                  └─ mail Open ─▶ store ─ NOTIFY hatch_mail ─▶ node B
//!                                                                    └─ session.open ─▶ agent
//!  terminate / switch / IAM on node C ─▶ store ─ NOTIFY hatch_reconcile ─▶ every node
//!                                                   reconcile: its live sessions the store ended
//! ```
//!
//! The rules:
//!
//! - **Placement.** A session is placed on the node that holds its agent's control channel
//!   (the store's `agent_channels`), which must be heartbeating; both legs dial that node's
//!   data plane, and the tokens carry that node's run (`run`), which only its verifier accepts.
//!   The node that answered the API posts the `session.open` as mail to the placing node, which
//!   admits the session to its live table (pending sweep, resume window) and hands it to the
//!   agent.
//! - **The store is the truth; notifications are hints.** A terminate, an account switch or an
//!   IAM change is written to the store, and a trigger notifies every node to reconcile now;
//!   every node also reconciles and reads its mail on its own tick, so a lost notification
//!   delays an effect by one tick, never loses it.
//! - **Limits** are counted in the store, in the transaction that inserts the session
//!   ([`super::store::Store::admit_session`]), so nodes admitting at once cannot pass them.
//! - **Heartbeat and expiry.** Every node heartbeats its row each tick; a node whose heartbeat
//!   is older than `node_timeout` is expired by a surviving node (one of them, in a
//!   transaction): its agents' channel records are dropped, its unpaired sessions closed as
//!   `node_lost`, and (with a resume window) its paired ones taken over by the survivor: their
//!   legs resume on its data plane as after a restart of their own node, or they are closed as
//!   `node_lost` when the window ends. The dead node's agents fail over to other nodes by themselves (`--api` repeated).
//!   A node that finds itself expired (it stalled) registers again and publishes its agents.
//! - **Signing keys** live in the store: the first node to start puts its key there, and every
//!   node signs with the newest key of the store and verifies all of them.
//!
//! With the SQLite store (`shared()` false) there is one node: none of this runs, sessions are
//! placed here and limits are counted in the live table.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hatch_proto::control::ToAgent;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::agents::AgentRunAs;
use super::store::{AgentChannel, Node, SessionRecord};
use super::{CLOSE_PEER_GONE, Shared, live, unix_now};
use crate::plane::{CloseReason, DataCommand};

/// The file in the data directory that keeps the node's id across restarts.
pub const NODE_ID_FILE: &str = "node-id";

/// Most mail messages read per look: the rest on the next (a wake comes with each).
const MAIL_BATCH: u32 = 256;

/// This node's id: the one kept in `data_dir/node-id`, or a new one written there.
pub fn node_id(data_dir: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let path = data_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim().to_owned();
            anyhow::ensure!(
                super::credentials::valid_id(&id, "n-"),
                "{} does not hold a node id (n- followed by 16 lowercase hex digits)",
                path.display()
            );
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = super::credentials::new_id("n-");
            crate::certs::write_private(&path, format!("{id}\n").as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(id)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// This node, as it registers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSelf {
    /// `n-` + 16 hex.
    pub id: String,
    /// Public API URL.
    pub api_url: String,
    /// Public data-plane URL: clients of sessions placed here dial it.
    pub data_url: String,
}

impl Default for NodeSelf {
    fn default() -> Self {
        NodeSelf {
            id: "n-0000000000000000".into(),
            api_url: "https://127.0.0.1:7444".into(),
            data_url: "wss://127.0.0.1:7443".into(),
        }
    }
}

/// A message from one node to another, left in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub(super) enum Mail {
    /// A session placed on the receiving node: admit it and hand `open` (its stream URL still
    /// empty: the receiver knows the agent's host) to the instance's agent.
    Open {
        /// The session.
        session_id: String,
        /// Its instance.
        instance_id: String,
        /// Its account.
        account_id: String,
        /// Who started it.
        principal: String,
        /// The `session.open` for the agent.
        open: Box<ToAgent>,
    },
    /// Close the instance's control channel (it was deregistered or its secret revoked).
    Kick {
        /// The instance.
        instance_id: String,
        /// Why (one of [`KICK_REASONS`]).
        why: String,
    },
}

/// Why a control channel may be closed by another node; anything else is refused.
pub(super) const KICK_REASONS: &[&str] = &["instance deregistered", "instance secret revoked"];

/// Starts this node's heartbeat: a thread of its own that writes the node's row every
/// `reconcile_interval` until the control plane shuts down. Not a task on the control plane's
/// runtime: there it waited behind session setups for the store's blocking threads, and a node
/// busy setting up thousands of sessions missed its heartbeats for 15 s and was expired by the
/// others (measured: a 25,000-session load test lost three nodes that way).
///
/// The store call runs on this thread, never on an async task (the PostgreSQL driver's rule).
pub(super) fn spawn_heartbeat(shared: Arc<Shared>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("hatch-heartbeat".into())
        .spawn(move || {
            let period = shared.cfg.reconcile_interval.max(std::time::Duration::from_millis(100));
            while !shared.shutdown.is_cancelled() {
                shared.beat();
                std::thread::sleep(period);
            }
        })
        .map(|_| ())
        .map_err(Into::into)
}

/// The heartbeat before which a node is expired, as this node sees it at `now` with its own
/// last heartbeat at `last_beat`: `now - timeout`, or `None` (expire nobody) when this node's
/// own heartbeat is older than that itself.
fn expiry_cut(now: i64, last_beat: i64, timeout: i64) -> Option<i64> {
    let before = now.saturating_sub(timeout);
    (last_beat >= before).then_some(before)
}

/// Where a session goes: this node, or another of the fleet.
#[derive(Debug, Clone)]
pub(super) enum Placement {
    /// This node holds the agent's control channel.
    Here,
    /// Another node does.
    There(Node),
}

/// Where a session's legs go: the run its tokens carry, and the data-plane base of its node
/// (`None`: this node's, as the caller reached it).
#[derive(Debug, Clone)]
pub(super) struct Route {
    pub(super) run: String,
    pub(super) data_base: Option<String>,
}

impl Shared {
    /// This node's registry record as of `now`.
    pub(super) fn node_record(&self, now: i64) -> Node {
        let n = &self.cfg.node;
        Node {
            id: n.id.clone(),
            api_url: n.api_url.clone(),
            data_url: n.data_url.clone(),
            run: self.signer.run().to_owned(),
            started_at: now,
            heartbeat_at: now,
        }
    }

    /// Seconds of silence after which a node is expired.
    fn node_timeout_s(&self) -> i64 {
        i64::try_from(self.cfg.node_timeout.as_secs()).unwrap_or(i64::MAX).max(1)
    }

    /// One heartbeat of this node's row (registered again, with its agents, when another
    /// node expired it); true when it was written.
    fn beat(&self) -> bool {
        let now = unix_now();
        let me = self.node_record(now);
        let res = (|| {
            let s = self.store.as_ref();
            let alive = s.heartbeat_node(&me.id, &me.run, now)?;
            if !alive {
                s.register_node(&me)?;
                for (instance, r) in self.agents.channels() {
                    let ch = AgentChannel {
                        node_id: me.id.clone(),
                        default_user: r.default_user,
                        switch_user: r.switch_user,
                    };
                    s.set_agent_channel(&instance, &ch)?;
                }
                warn!(node = %me.id, "this node was not registered (expired by another node \
                    after a stall?); registered again, with its agents");
            }
            anyhow::Ok(())
        })();
        match res {
            Ok(()) => {
                self.last_beat.store(now, Ordering::Relaxed);
                true
            }
            Err(e) => {
                warn!(err = %format!("{e:#}"), "fleet heartbeat failed");
                false
            }
        }
    }

    /// The expiry of nodes silent past the timeout, on the reconcile tick. A node whose own
    /// heartbeats are failing (cut off from the store, or stalled) expires nobody: it may be
    /// the one that is behind.
    pub(super) async fn fleet_tick(&self) {
        let now = unix_now();
        let Some(before) =
            expiry_cut(now, self.last_beat.load(Ordering::Relaxed), self.node_timeout_s())
        else {
            return;
        };
        // With a resume window this node takes the dead node's paired sessions over: their
        // legs resume here. Without one there is nothing to resume them with.
        let adopter = (!self.cfg.resume_window.is_zero()).then(|| self.cfg.node.id.clone());
        let res = self
            .blocking(move |s| {
                s.expire_nodes(before, CloseReason::NodeLost, now, adopter.as_deref())
            })
            .await;
        match res {
            Ok(expired) => {
                for node in expired {
                    warn!(node = %node.id, closed = node.closed, taken_over = node.adopted.len(),
                        timeout_s = self.node_timeout_s(),
                        "relay node stopped heartbeating; expired it: its sessions that never \
                         paired closed as node_lost, its paired ones taken over here for their \
                         legs to resume");
                    for _ in 0..node.closed {
                        self.metrics.session_closed(CloseReason::NodeLost.as_str());
                    }
                    self.adopt(&node.adopted);
                }
            }
            Err(e) => warn!(err = %format!("{e:#}"), "fleet heartbeat failed"),
        }
    }

    /// Takes over sessions of a dead node (the store has them as this node's, `detached`):
    /// into the live table for the resume window, after which those whose legs did not both
    /// come back are closed as `node_lost`. Both legs resume through the API or the control
    /// channel as after a restart of their own node (routed here by the record's node), and
    /// this data plane creates each session, detached, from the first resume token it sees.
    fn adopt(&self, sessions: &[SessionRecord]) {
        let deadline = Instant::now() + self.cfg.resume_window;
        for r in sessions {
            let who = live::Admission {
                account: &r.account_id,
                instance: &r.instance_id,
                principal: &r.principal,
            };
            let base = [r.bytes_client_to_agent, r.bytes_agent_to_client];
            self.live.recover(&r.id, who, deadline, base, CloseReason::NodeLost);
            info!(session = %r.id, instance = %r.instance_id,
                "session of a dead node taken over; waiting for its legs to resume here");
        }
    }

    /// Where `instance`'s agent is and whom it runs sessions as: on this node, or (a fleet) on
    /// a heartbeating other node; `None` when it is not connected anywhere.
    pub(super) async fn agent_placement(
        &self,
        instance: &str,
    ) -> anyhow::Result<Option<(AgentRunAs, Placement)>> {
        if let Some(r) = self.agents.run_as(instance) {
            return Ok(Some((r, Placement::Here)));
        }
        if !self.fleet {
            return Ok(None);
        }
        let (inst, me) = (instance.to_owned(), self.cfg.node.id.clone());
        let live_since = unix_now().saturating_sub(self.node_timeout_s());
        self.blocking(move |s| {
            let Some(ch) = s.agent_channel(&inst)? else { return Ok(None) };
            if ch.node_id == me {
                // A record of a channel this node no longer has (it went down just now).
                return Ok(None);
            }
            let node =
                s.nodes()?.into_iter().find(|n| n.id == ch.node_id && n.heartbeat_at >= live_since);
            let run_as = AgentRunAs { default_user: ch.default_user, switch_user: ch.switch_user };
            Ok(node.map(|n| (run_as, Placement::There(n))))
        })
        .await
    }

    /// The route of a session's new legs: its node's run and data plane. `None` when the
    /// session's node is no longer registered and the session was not taken over by another
    /// (it is closed).
    ///
    /// `rec` may be older than the expiry of its node, which moves the session to a survivor
    /// and removes the node in one transaction: a node missing from the registry sends the
    /// route to the session's record once more, which then names the survivor.
    pub(super) async fn route(&self, rec: &SessionRecord) -> anyhow::Result<Option<Route>> {
        let here = Route { run: self.signer.run().to_owned(), data_base: None };
        let node = match &rec.node_id {
            Some(n) if self.fleet && *n != self.cfg.node.id => n.clone(),
            _ => return Ok(Some(here)),
        };
        enum Found {
            Here,
            There(Node),
            Gone,
        }
        let (id, me) = (rec.id.clone(), self.cfg.node.id.clone());
        let found = self
            .blocking(move |s| {
                let find = |nodes: Vec<Node>, id: &str| nodes.into_iter().find(|n| n.id == id);
                if let Some(n) = find(s.nodes()?, &node) {
                    return Ok(Found::There(n));
                }
                Ok(match s.session(None, &id)?.and_then(|r| r.node_id) {
                    Some(now) if now == me => Found::Here,
                    Some(now) if now != node => {
                        find(s.nodes()?, &now).map_or(Found::Gone, Found::There)
                    }
                    _ => Found::Gone,
                })
            })
            .await?;
        Ok(match found {
            Found::Here => Some(here),
            Found::There(n) => Some(Route { run: n.run, data_base: Some(n.data_url) }),
            Found::Gone => None,
        })
    }

    /// Leaves `mail` for `node`.
    pub(super) async fn post(&self, node: &str, mail: &Mail) -> anyhow::Result<()> {
        let body = serde_json::to_string(mail)?;
        let node = node.to_owned();
        self.blocking(move |s| s.send_mail(&node, &body, unix_now())).await
    }

    /// Reads and carries out this node's mail.
    pub(super) async fn read_mail(&self) {
        if !self.fleet {
            return;
        }
        loop {
            let me = self.cfg.node.id.clone();
            let bodies = match self.blocking(move |s| s.take_mail(&me, MAIL_BATCH)).await {
                Ok(b) => b,
                Err(e) => {
                    warn!(err = %format!("{e:#}"), "reading this node's mail failed");
                    return;
                }
            };
            let full = bodies.len() == MAIL_BATCH as usize;
            for body in bodies {
                match serde_json::from_str::<Mail>(&body) {
                    Ok(m) => self.deliver(m).await,
                    Err(e) => warn!(err = %e, body = %hatch_proto::logtext::peer(&body, 100),
                        "unreadable mail from another node ignored"),
                }
            }
            if !full {
                return;
            }
        }
    }

    async fn deliver(&self, mail: Mail) {
        match mail {
            Mail::Open { session_id, instance_id, account_id, principal, mut open } => {
                let Some(base) = self.agents.data_base(&instance_id) else {
                    info!(session = %session_id, instance = %instance_id,
                        "session placed here by another node, but its agent is gone; closing");
                    self.data.command(DataCommand::Terminate {
                        session_id: session_id.clone(),
                        code: CLOSE_PEER_GONE,
                    });
                    self.close(&session_id, CloseReason::Error, 0, 0).await;
                    return;
                };
                if let ToAgent::SessionOpen { stream_url, session_id: sid, .. } = open.as_mut() {
                    *stream_url = format!("{base}/v1/stream/{sid}?role=agent");
                }
                let who = live::Admission {
                    account: &account_id,
                    instance: &instance_id,
                    principal: &principal,
                };
                let deadline = Instant::now() + self.cfg.pending_timeout;
                // Counted in the store by the node that admitted it.
                let _ = self.live.admit(&session_id, who, live::Limits::NONE, deadline);
                if let Err(e) = self.agents.send(&instance_id, *open) {
                    info!(session = %session_id, instance = %instance_id, ?e,
                        "could not hand a session placed here to its agent; closing");
                    self.data.command(DataCommand::Terminate {
                        session_id: session_id.clone(),
                        code: CLOSE_PEER_GONE,
                    });
                    self.close(&session_id, CloseReason::Error, 0, 0).await;
                    return;
                }
                info!(session = %session_id, instance = %instance_id,
                    "session placed here by another node handed to its agent");
            }
            Mail::Kick { instance_id, why } => {
                let Some(why) = KICK_REASONS.iter().copied().find(|r| *r == why) else {
                    warn!(why = %hatch_proto::logtext::peer(&why, 60),
                        "mail asks to close a control channel for an unknown reason; ignored");
                    return;
                };
                if self.agents.disconnect(&instance_id, hatch_proto::close::POLICY_VIOLATION, why) {
                    info!(instance = %instance_id, why, "control channel closed at another node's request");
                }
            }
        }
    }

    /// Records that this node holds `instance`'s control channel (a fleet only).
    pub(super) async fn channel_up(&self, instance: &str, r: &AgentRunAs) {
        if !self.fleet {
            return;
        }
        let ch = AgentChannel {
            node_id: self.cfg.node.id.clone(),
            default_user: r.default_user.clone(),
            switch_user: r.switch_user,
        };
        let inst = instance.to_owned();
        if let Err(e) = self.blocking(move |s| s.set_agent_channel(&inst, &ch)).await {
            warn!(instance = %instance, err = %format!("{e:#}"),
                "recording the agent's control channel in the store failed");
        }
    }

    /// Forgets this node's record of `instance`'s control channel (a fleet only).
    pub(super) async fn channel_down(&self, instance: &str) {
        if !self.fleet {
            return;
        }
        let (inst, me) = (instance.to_owned(), self.cfg.node.id.clone());
        if let Err(e) = self.blocking(move |s| s.clear_agent_channel(&inst, &me)).await {
            warn!(instance = %instance, err = %format!("{e:#}"),
                "forgetting the agent's control channel in the store failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_behind_on_its_own_heartbeat_expires_nobody() {
        // Timeout 15 s: a node that beat 2 s ago expires those silent since before now - 15.
        assert_eq!(expiry_cut(1000, 998, 15), Some(985));
        assert_eq!(expiry_cut(1000, 985, 15), Some(985), "exactly at the cut still counts");
        // Its own last beat is past the cut: it may be the stalled one.
        assert_eq!(expiry_cut(1000, 984, 15), None);
        assert_eq!(expiry_cut(1000, 0, 15), None);
    }

    #[test]
    fn mail_round_trips_and_names_its_type() {
        let m = Mail::Kick { instance_id: "i-0123456789abcdef".into(), why: "x".into() };
        let text = serde_json::to_string(&m).unwrap();
        assert!(text.contains(r#""type":"kick""#), "{text}");
        assert_eq!(serde_json::from_str::<Mail>(&text).unwrap(), m);
        assert!(serde_json::from_str::<Mail>(r#"{"type":"format_disk"}"#).is_err());
    }

    #[test]
    fn a_node_id_is_kept_across_starts_and_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = node_id(dir.path()).unwrap();
        assert!(super::super::credentials::valid_id(&first, "n-"), "{first}");
        assert_eq!(node_id(dir.path()).unwrap(), first);
        std::fs::write(dir.path().join(NODE_ID_FILE), "../../etc\n").unwrap();
        let err = node_id(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not hold a node id"), "{err}");
    }
}
