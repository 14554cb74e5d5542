//! Agent control channels: which instance is online, and the WebSocket task of each.
//!
//! A channel starts with the agent's `hello` (whom it runs sessions as); the instance is online
//! from then on while the channel is up, and a channel whose first message is not a hello, or
//! that sends none within `heartbeat_timeout`, is closed with 1008. A second channel from the same
//! instance replaces the first (the old one is closed with reason "replaced"). The relay sends
//! a `heartbeat` every `heartbeat_interval`; a control message from the agent (its heartbeats,
//! its answers, its reports) counts as liveness, and a channel that sent none for
//! `heartbeat_timeout` is closed. WebSocket pings and pongs do not count: they cost the agent
//! nothing and would keep a channel that answers no heartbeat open forever. The relay never
//! answers an agent's heartbeat with one of its own (that would loop); the agent learns the
//! relay is alive from the relay's periodic heartbeats.
//!
//! Writes are bounded. The WebSocket keeps at most [`MAX_AGENT_WRITE_BUFFER`] of unsent frames
//! (past it tungstenite holds one pending pong, not one per ping), and after each ping the
//! channel waits until its pong is written before it reads on: an agent that pings but does not
//! read stops being read (TCP pushes back on it), and one whose writes stay behind for
//! [`SEND_TIMEOUT`] is closed with 1008 and a log line. Before this, every automatic pong was
//! queued while the channel kept reading: an agent flooding pings grew the relay by 200 MiB/s.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use hatch_proto::close;
use hatch_proto::control::{FromAgent, ToAgent};
use hatch_proto::logtext::peer;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::Shared;
use super::live::Rate;
use crate::plane::CloseReason;

/// Messages queued for one agent before a send is refused (the agent is not reading).
const AGENT_QUEUE: usize = 1024;
/// How long one write to an agent (a message, or the pong to its ping) may take before the
/// channel is closed as not read.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Unsent bytes a control channel may hold (its WebSocket's `max_write_buffer_size`).
pub const MAX_AGENT_WRITE_BUFFER: usize = 4 * MAX_AGENT_MESSAGE;
/// Largest message accepted from an agent: its messages are small JSON objects.
pub const MAX_AGENT_MESSAGE: usize = 64 * 1024;
/// `session.resume` requests one instance's agent may make: a burst of 1000 (every session an
/// instance holds under the default `--max-sessions-per-instance`, all asked for at once after
/// a relay restart), then 100 a second. Beyond it a request is dropped with a log line and a
/// metric (the agent asks again after its own deadline), so one agent cannot make the relay
/// read the store and sign tokens without bound.
pub const RESUME_RATE: Rate = Rate { per_sec: 100.0, burst: 1000 };

struct Conn {
    id: u64,
    /// Data-plane base URL as seen from this agent (the host it used to reach the API).
    data_base: String,
    /// Whom the agent runs sessions as, from its `hello`.
    run_as: AgentRunAs,
    tx: mpsc::Sender<ToAgent>,
    /// Closes the channel with this code and reason.
    kick: Option<oneshot::Sender<(u16, &'static str)>>,
}

/// Whom an agent runs sessions as, as its `hello` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRunAs {
    /// The user of a session that names none.
    pub default_user: String,
    /// Whether it can run sessions as other users (it runs as root).
    pub switch_user: bool,
}

/// The connected agents.
#[derive(Default)]
pub struct Hub {
    conns: Mutex<HashMap<String, Conn>>,
    next: AtomicU64,
}

/// Why a message could not be handed to an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No control channel is up.
    Offline,
    /// The channel's queue is full (the agent is not reading).
    Backlogged,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conn>> {
        // Only inserts and removes happen under this lock; poisoning leaves it consistent.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new channel for `instance`, replacing (and kicking) any previous one.
    fn attach(
        &self,
        instance: &str,
        data_base: String,
        run_as: AgentRunAs,
    ) -> (u64, mpsc::Receiver<ToAgent>, oneshot::Receiver<(u16, &'static str)>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(AGENT_QUEUE);
        let (kick_tx, kick_rx) = oneshot::channel();
        let old = self
            .lock()
            .insert(instance.to_owned(), Conn { id, data_base, run_as, tx, kick: Some(kick_tx) });
        if let Some(mut old) = old
            && let Some(k) = old.kick.take()
        {
            let _ = k.send((1000, "replaced by a newer control channel"));
        }
        (id, rx, kick_rx)
    }

    /// Closes `instance`'s control channel, if it is up, with `code` and `why` (its secret was
    /// revoked, it was deregistered); true when there was one.
    pub fn disconnect(&self, instance: &str, code: u16, why: &'static str) -> bool {
        let kick = self.lock().get_mut(instance).and_then(|c| c.kick.take());
        kick.map(|k| k.send((code, why)).is_ok()).unwrap_or(false)
    }

    /// Removes the channel `id` of `instance` unless a newer one replaced it; true if removed.
    fn detach(&self, instance: &str, id: u64) -> bool {
        let mut g = self.lock();
        if g.get(instance).is_some_and(|c| c.id == id) {
            g.remove(instance);
            true
        } else {
            false
        }
    }

    /// Queues a message for an instance's agent.
    pub fn send(&self, instance: &str, msg: ToAgent) -> Result<(), SendError> {
        let g = self.lock();
        let conn = g.get(instance).ok_or(SendError::Offline)?;
        conn.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Backlogged,
            mpsc::error::TrySendError::Closed(_) => SendError::Offline,
        })
    }

    /// The data-plane base URL for an instance's agent (from the host its control channel
    /// used), when it is online. Stream URLs for agents never come from a client's request.
    pub fn data_base(&self, instance: &str) -> Option<String> {
        self.lock().get(instance).map(|c| c.data_base.clone())
    }

    /// Whom an instance's agent runs sessions as, when it is online.
    pub fn run_as(&self, instance: &str) -> Option<AgentRunAs> {
        self.lock().get(instance).map(|c| c.run_as.clone())
    }

    /// Whether an instance's control channel is up.
    pub fn is_online(&self, instance: &str) -> bool {
        self.lock().contains_key(instance)
    }

    /// Every instance with a control channel up here, and whom its agent runs sessions as.
    pub fn channels(&self) -> Vec<(String, AgentRunAs)> {
        self.lock().iter().map(|(i, c)| (i.clone(), c.run_as.clone())).collect()
    }

    /// How many agents are online.
    pub fn online(&self) -> usize {
        self.lock().len()
    }
}

/// Runs one agent's control channel until it closes, is replaced, goes silent or the relay
/// shuts down.
pub(super) async fn run_channel(
    shared: std::sync::Arc<Shared>,
    instance: String,
    data_base: String,
    ws: WebSocket,
) {
    let cfg = &shared.cfg;
    let (mut sink, mut stream) = ws.split();
    // Not online before the hello: a session's policy check needs the agent's default user.
    let run_as = match tokio::time::timeout(cfg.heartbeat_timeout, read_hello(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => {
            warn!(instance = %instance, reason = why, "agent control channel without a hello; closing");
            let frame = CloseFrame { code: close::POLICY_VIOLATION, reason: why.into() };
            let _ =
                tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
            return;
        }
        Err(_) => {
            warn!(instance = %instance, "agent sent no hello within the heartbeat timeout; closing");
            let frame = CloseFrame { code: close::POLICY_VIOLATION, reason: "no hello".into() };
            let _ =
                tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Close(Some(frame)))).await;
            return;
        }
    };
    info!(instance = %instance, default_user = ?run_as.default_user,
        switch_user = run_as.switch_user, "agent said hello");
    let (conn_id, mut rx, mut kicked) = shared.agents.attach(&instance, data_base, run_as.clone());
    info!(instance = %instance, conn = conn_id, "agent control channel up");
    shared.channel_up(&instance, &run_as).await;
    shared.touch_instance(&instance).await;
    let mut beat = tokio::time::interval(cfg.heartbeat_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let deadline = tokio::time::sleep(cfg.heartbeat_timeout);
    tokio::pin!(deadline);
    let mut last_touch = tokio::time::Instant::now();
    // `session.resume` requests dropped for the rate on this channel: logged at 1, 2, 4, ...
    let mut resumes_dropped = 0u64;
    // The agent's writes are behind: closed with this (the frame may not get through).
    let not_read = Some((close::POLICY_VIOLATION, "agent does not read its control channel"));
    let close: Option<(u16, &'static str)> = loop {
        tokio::select! {
            why = &mut kicked => break Some(why.unwrap_or((1000, "control channel closed"))),
            _ = shared.shutdown.cancelled() => break Some((1001, "relay shutting down")),
            _ = &mut deadline => {
                warn!(instance = %instance, "agent silent past the heartbeat deadline; closing");
                break Some((1001, "heartbeat deadline passed"));
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { break None };
                if !send(&mut sink, &msg).await {
                    warn!(instance = %instance, timeout = ?SEND_TIMEOUT,
                        "agent does not read its control channel (a write failed or timed out); \
                         closing");
                    break not_read;
                }
            }
            _ = beat.tick() => {
                seq += 1;
                if !send(&mut sink, &ToAgent::Heartbeat { seq }).await {
                    warn!(instance = %instance, timeout = ?SEND_TIMEOUT,
                        "agent does not read its control channel (a heartbeat write failed or \
                         timed out); closing");
                    break not_read;
                }
            }
            m = stream.next() => {
                let m = match m {
                    None => break None,
                    Some(Err(e)) => {
                        debug!(instance = %instance, err = %e, "agent channel read failed");
                        break None;
                    }
                    Some(Ok(m)) => m,
                };
                let parsed = match &m {
                    Message::Text(t) => Some(serde_json::from_str::<FromAgent>(t.as_str())),
                    _ => None,
                };
                if let Some(Ok(_)) = parsed {
                    // Only a control message is liveness (see the module doc).
                    deadline.as_mut().reset(tokio::time::Instant::now() + cfg.heartbeat_timeout);
                }
                match m {
                    // `parsed` is Some for every text message: set just above.
                    Message::Text(t) => match parsed.expect("parsed for every text message") {
                        Ok(FromAgent::Hello { .. }) => {
                            debug!(instance = %instance, "second hello on a control channel ignored");
                        }
                        Ok(FromAgent::SessionResume { session_id }) => {
                            let now = std::time::Instant::now();
                            let rate = cfg.agent_resume_rate;
                            if shared.resume_rate.take(&instance, rate, now).is_err() {
                                shared.metrics.resume_dropped();
                                resumes_dropped += 1;
                                if resumes_dropped.is_power_of_two() {
                                    warn!(instance = %instance, dropped = resumes_dropped,
                                        session = %peer(&session_id, 40),
                                        "agent asks to resume sessions faster than allowed; \
                                         requests dropped");
                                }
                            } else if let Some(answer) =
                                shared.agent_resume(&instance, &session_id).await
                                && !send(&mut sink, &answer).await
                            {
                                warn!(instance = %instance, timeout = ?SEND_TIMEOUT,
                                    "agent does not read its control channel (a resume answer \
                                     write failed or timed out); closing");
                                break not_read;
                            }
                        }
                        Ok(FromAgent::Heartbeat { .. }) => {
                            // Record liveness in the store at most once a minute.
                            if last_touch.elapsed() >= Duration::from_secs(60) {
                                last_touch = tokio::time::Instant::now();
                                shared.touch_instance(&instance).await;
                            }
                        }
                        Ok(FromAgent::SessionFailed { session_id, message }) => {
                            // Both come from the agent: clipped and escaped.
                            warn!(instance = %instance, session = %peer(&session_id, 40),
                                error = %peer(&message, 512),
                                "agent could not start session");
                            shared.agent_failed(&instance, &session_id).await;
                        }
                        Ok(FromAgent::SessionReport {
                            session_id,
                            bytes_client_to_agent,
                            bytes_agent_to_client,
                            exit_code,
                        }) => {
                            shared
                                .agent_report(
                                    &instance,
                                    &session_id,
                                    bytes_client_to_agent,
                                    bytes_agent_to_client,
                                    exit_code,
                                )
                                .await;
                        }
                        Err(e) => {
                            // serde's error quotes the agent's text (an unknown type, a bad
                            // field): escaped and clipped with the message's head.
                            let err = e.to_string();
                            warn!(instance = %instance, err = %peer(&err, 200),
                                text = %peer(t.as_str(), 100),
                                "unreadable agent message ignored");
                        }
                    },
                    Message::Binary(_) => {
                        warn!(instance = %instance, "binary message on control channel ignored");
                    }
                    Message::Close(_) => break None,
                    Message::Ping(_) => {
                        // tungstenite queued the pong; read on only once it is written, so
                        // an agent that pings without reading is pushed back on by TCP.
                        let flushed = tokio::time::timeout(SEND_TIMEOUT, sink.flush()).await;
                        if !matches!(flushed, Ok(Ok(()))) {
                            warn!(instance = %instance, timeout = ?SEND_TIMEOUT,
                                "agent does not read its control channel (pongs to its pings \
                                 are not taken); closing");
                            break not_read;
                        }
                    }
                    // Unsolicited (the relay sends no pings): ignored, and not liveness.
                    Message::Pong(_) => {}
                }
            }
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame { code, reason: reason.into() };
        // An agent that does not read gets a short wait for its close, not another full one.
        let wait = if close == not_read { Duration::from_secs(1) } else { SEND_TIMEOUT };
        let _ = tokio::time::timeout(wait, sink.send(Message::Close(Some(frame)))).await;
    }
    if shared.agents.detach(&instance, conn_id) {
        info!(instance = %instance, conn = conn_id, "agent control channel down");
        shared.channel_down(&instance).await;
    } else {
        info!(instance = %instance, conn = conn_id, "agent control channel replaced");
    }
    shared.touch_instance(&instance).await;
}

/// Reads the agent's first message, which must be a `hello` with a usable user name.
async fn read_hello(
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
) -> Result<AgentRunAs, &'static str> {
    loop {
        let m = match stream.next().await {
            None | Some(Err(_)) => return Err("connection ended before the hello"),
            Some(Ok(m)) => m,
        };
        let text = match m {
            // Pings before the hello are answered by the WebSocket layer and skipped; a
            // channel that only pings is closed by the caller's deadline.
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return Err("closed before the hello"),
            Message::Binary(_) => return Err("the first message must be a hello"),
            Message::Text(t) => t,
        };
        return match serde_json::from_str::<FromAgent>(text.as_str()) {
            Ok(FromAgent::Hello { default_user, switch_user, .. })
                if hatch_proto::api::valid_user_name(&default_user) =>
            {
                Ok(AgentRunAs { default_user, switch_user })
            }
            Ok(FromAgent::Hello { .. }) => Err("the hello's default_user is not a valid user name"),
            _ => Err("the first message must be a hello"),
        };
    }
}

async fn send(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    msg: &ToAgent,
) -> bool {
    let text = match serde_json::to_string(msg) {
        Ok(t) => t,
        Err(_) => return false,
    };
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Text(text.into()))).await,
        Ok(Ok(()))
    )
}

/// The close reason recorded when an agent reports it could not start a session.
pub(super) const AGENT_FAILED: CloseReason = CloseReason::Error;
