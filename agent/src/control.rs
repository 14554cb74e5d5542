//! `hatch-agent run`: the control channel and the sessions it starts.
//!
//! ```text
//!            ┌──────────── reconnect: capped exponential backoff, full jitter ───────────┐
//!            ▼                                                                            │
//!   connect (WSS /v1/agent/connect, bearer instance secret) ──▶ serve ── lost / silent ───┘
//!                                                                 │
//!     heartbeat{seq} ──▶ answer heartbeat{seq}                    │ SIGTERM: cancel sessions,
//!     session.open   ──▶ spawn a session task (session.rs)        │ wait for them, close 4011
//!     session.close  ──▶ cancel that session                      ▼
//!     session task failed to start ──▶ session.failed          exit 0
//!     session leg lost (no close) ──▶ session.report, now and after the next connect
//! ```
//!
//! Sessions do not depend on the control channel: a control channel that drops and comes back
//! leaves running sessions alone. The channel is one outbound connection; the agent never
//! listens.
//!
//! A session whose data leg died without a close from the relay (a relay killed before it
//! could record the end) leaves an *unreported end*: its byte counts as the agent counted them
//! (and its exit code, if the command had exited). The agent keeps up to [`MAX_UNREPORTED`] of
//! them in memory, sends each at once, and sends each again right after the next connect of
//! the control channel, then forgets it: that relay is the one running after the loss. The
//! relay keeps the larger counts, so a report sent twice changes nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hatch_proto::api::ErrorBody;
use hatch_proto::close;
use hatch_proto::control::{FromAgent, ToAgent};
use hatch_proto::logtext::peer;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::register::ApiUrl;
use crate::session::{self, Cancel, LegCounts, ResumeLink, SessionConfig, SessionEnd, SessionSpec};
use crate::state::State;

/// Default cap on concurrent sessions of one agent. Each session holds two descriptors (PTY
/// master, data leg) and ~50 KiB; 1,024 keeps well inside common fd limits.
pub const DEFAULT_MAX_SESSIONS: usize = 1024;

/// Largest control message accepted: 64 KiB (a `session.open` is well under 4 KiB).
const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// Reports from sessions to the control channel waiting to be sent (`session.failed`). When
/// full, further reports are dropped with a log line rather than queued without bound.
const REPORT_QUEUE: usize = 64;

/// Most unreported session ends kept for the next control channel; past it the oldest is
/// dropped with a log line.
pub const MAX_UNREPORTED: usize = 256;

/// Timers of the control channel. Defaults suit production; tests shorten them.
#[derive(Debug, Clone)]
pub struct ControlTiming {
    /// TCP + TLS + upgrade of the control channel.
    pub connect_timeout: Duration,
    /// How often the agent pings the control channel.
    pub ping_interval: Duration,
    /// A channel that delivers nothing (no heartbeat, no pong) for this long is dead.
    pub dead_after: Duration,
    /// First reconnect delay ceiling.
    pub backoff_base: Duration,
    /// Largest reconnect delay ceiling.
    pub backoff_cap: Duration,
    /// A connection that lived this long resets the backoff to its base.
    pub stable_after: Duration,
    /// On shutdown, how long sessions get to close before they are abandoned.
    pub shutdown_grace: Duration,
}

impl Default for ControlTiming {
    fn default() -> Self {
        ControlTiming {
            connect_timeout: Duration::from_secs(15),
            ping_interval: Duration::from_secs(30),
            dead_after: Duration::from_secs(90),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Everything `run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The registration.
    pub state: State,
    /// API URLs to dial, in order of preference, instead of the one saved at registration
    /// (`run --api`, repeated): a relay that moved, or the nodes of a fleet. Empty: the saved
    /// one.
    pub api_urls: Vec<String>,
    /// TLS for the control channel (and, through `session`, the data legs).
    pub tls: Arc<rustls::ClientConfig>,
    /// What sessions share.
    pub session: SessionConfig,
    /// Control channel timers.
    pub timing: ControlTiming,
    /// Cap on concurrent sessions; a `session.open` past it is answered `session.failed`.
    pub max_sessions: usize,
    /// Whom sessions run as, announced in the `hello` of every control channel.
    pub identity: session::Identity,
}

/// The connection state, logged once per change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Starting,
    Down(String),
}

/// After a failed dial of URL `at` of `n`, in a round of failures that began at `first`: the
/// URL to dial next, and whether the round is done (every URL failed once: back off before
/// the next). With one URL every failure ends a round.
pub fn failover(at: usize, first: usize, n: usize) -> (usize, bool) {
    let next = (at + 1) % n.max(1);
    (next, next == first)
}

/// The ceiling of the `attempt`-th reconnect delay: `base * 2^attempt`, at most `cap`.
pub fn backoff_ceiling(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(cap)
}

/// A reconnect delay with full jitter: uniform in `[0, ceiling]`.
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration) -> Duration {
    let ceiling = backoff_ceiling(attempt, base, cap);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rand::rng().random_range(0..=nanos))
}

/// Runs the agent until `shutdown` is cancelled: keeps the control channel up and serves
/// sessions. On shutdown closes live sessions' legs (close 4011 `AGENT_SHUTDOWN`, "agent shutting
/// down") and the control channel (1001), and returns.
pub async fn run(cfg: RunConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let apis = if cfg.api_urls.is_empty() {
        std::slice::from_ref(&cfg.state.api_url)
    } else {
        &cfg.api_urls[..]
    };
    let urls = apis
        .iter()
        .map(|a| ApiUrl::parse(a).map(|u| u.connect_url()))
        .collect::<Result<Vec<String>, _>>()?;
    // The URL dialled next, and the one the current round of failed dials started from.
    let (mut at, mut first) = (0, 0);
    let (report_tx, mut report_rx) = mpsc::channel(REPORT_QUEUE);
    let mut sessions = Sessions {
        tasks: JoinSet::new(),
        live: HashMap::new(),
        cfg: Arc::new(cfg.session.clone()),
        report: report_tx,
        max: cfg.max_sessions,
        unreported: VecDeque::new(),
    };
    let t = &cfg.timing;
    let mut link = Link::Starting;
    let mut attempt: u32 = 0;
    info!(instance = %cfg.state.instance_id, api = ?apis, "agent starting");
    loop {
        let url = &urls[at];
        let connected = tokio::select! {
            () = shutdown.cancelled() => break,
            r = timeout(t.connect_timeout, connect(url, &cfg.state.instance_secret, &cfg.tls)) => {
                r.unwrap_or_else(|_| Err(format!("no answer within {:?}", t.connect_timeout)))
            }
        };
        match connected {
            Ok(ws) => {
                info!(url = %url, "control channel connected");
                let since = Instant::now();
                match serve(ws, &mut sessions, &mut report_rx, &shutdown, t, &cfg.identity).await {
                    Served::Shutdown => return Ok(()),
                    Served::Lost(why) => {
                        warn!(reason = %peer(&why, 300), "control channel lost; reconnecting");
                        // Up -> Down: the first failed reconnect after this is logged again.
                        link = Link::Down(why);
                    }
                }
                if since.elapsed() >= t.stable_after {
                    attempt = 0;
                }
                // The node that was up is tried first again; a round starts from it.
                first = at;
            }
            Err(why) => {
                let next = Link::Down(why.clone());
                if link != next {
                    warn!(url = %url, error = %peer(&why, 300), "cannot open the control channel; retrying with backoff");
                } else {
                    debug!(url = %url, error = %peer(&why, 300), attempt, "control channel still unreachable");
                }
                link = next;
                let (next_at, round_done) = failover(at, first, urls.len());
                at = next_at;
                if !round_done {
                    info!(url = %urls[at], "trying the next API URL");
                    continue;
                }
            }
        }
        let delay = backoff_delay(attempt, t.backoff_base, t.backoff_cap);
        attempt = attempt.saturating_add(1);
        debug!(?delay, attempt, "waiting before reconnecting");
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
            Some(done) = sessions.tasks.join_next() => {
                // No channel to send it on: kept for the next one.
                let _ = sessions.finished(done);
            }
        }
    }
    sessions.shutdown(t.shutdown_grace).await;
    info!("agent stopped");
    Ok(())
}

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the control channel. Errors are one line for a person.
async fn connect(url: &str, secret: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Ws, String> {
    let mut req = url.into_client_request().map_err(|e| format!("bad control URL: {e}"))?;
    let auth = format!("Bearer {secret}")
        .parse()
        .map_err(|_| "the instance secret is not a valid header value".to_owned())?;
    req.headers_mut().insert(http::header::AUTHORIZATION, auth);
    req.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("hatch-agent/", env!("CARGO_PKG_VERSION"))),
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_CONTROL_MESSAGE * 4)
        .max_message_size(Some(MAX_CONTROL_MESSAGE))
        .max_frame_size(Some(MAX_CONTROL_MESSAGE));
    match tokio_tungstenite::connect_async_tls_with_config(
        req,
        Some(config),
        true,
        Some(Connector::Rustls(tls.clone())),
    )
    .await
    {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status();
            let detail = resp
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<ErrorBody>(b).ok())
                .map(|e| format!(": {}: {}", e.code, e.message))
                .unwrap_or_default();
            Err(format!("API answered HTTP {status}{detail}"))
        }
        Err(e) => Err(e.to_string()),
    }
}

enum Served {
    Shutdown,
    Lost(String),
}

async fn serve(
    ws: Ws,
    sessions: &mut Sessions,
    reports: &mut mpsc::Receiver<FromAgent>,
    shutdown: &CancellationToken,
    t: &ControlTiming,
    identity: &session::Identity,
) -> Served {
    let (mut sink, mut stream) = ws.split();
    // The relay counts the instance online only after this: a session's policy check needs
    // the user it will run as.
    let hello = FromAgent::hello(&identity.default_user, identity.switch_user);
    match timeout(t.dead_after, sink.send(json(&hello))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Served::Lost(format!("sending the hello: {e}")),
        Err(_) => return Served::Lost(format!("hello blocked for {:?}", t.dead_after)),
    }
    // Ends of sessions the relay may have lost: this channel was opened after each of them, so
    // they are sent once more here and then forgotten.
    while let Some(report) = sessions.unreported.front() {
        match timeout(t.dead_after, sink.send(json(report))).await {
            Ok(Ok(())) => {
                sessions.unreported.pop_front();
            }
            Ok(Err(e)) => return Served::Lost(format!("sending: {e}")),
            Err(_) => return Served::Lost(format!("send blocked for {:?}", t.dead_after)),
        }
    }
    let mut ping = tokio::time::interval_at(Instant::now() + t.ping_interval, t.ping_interval);
    let mut last_rx = Instant::now();
    loop {
        let outgoing = tokio::select! {
            () = shutdown.cancelled() => {
                sessions.shutdown(t.shutdown_grace).await;
                let frame = CloseFrame {
                    code: close::GOING_AWAY.into(),
                    reason: "agent shutting down".into(),
                };
                let _ = timeout(Duration::from_secs(2), sink.send(WsMessage::Close(Some(frame)))).await;
                let _ = timeout(Duration::from_secs(2), async {
                    while let Some(Ok(_)) = stream.next().await {}
                }).await;
                return Served::Shutdown;
            }
            r = tokio::time::timeout_at(last_rx + t.dead_after, stream.next()) => {
                let msg = match r {
                    Err(_) => return Served::Lost(format!("nothing received for {:?}", t.dead_after)),
                    Ok(None) => return Served::Lost("connection ended".into()),
                    Ok(Some(Err(e))) => return Served::Lost(e.to_string()),
                    Ok(Some(Ok(m))) => m,
                };
                // A ping is not liveness: the relay sends none, and answering costs a pinger
                // nothing. Heartbeats and pongs to the agent's own pings are.
                if !matches!(msg, WsMessage::Ping(_)) {
                    last_rx = Instant::now();
                }
                match msg {
                    WsMessage::Text(text) => match serde_json::from_str::<ToAgent>(&text) {
                        Ok(m) => sessions.handle(m),
                        Err(e) => {
                            // Both quote the relay's text: clipped and escaped.
                            let err = e.to_string();
                            warn!(error = %peer(&err, 200), text = %peer(&text, 100),
                                "ignoring an unknown control message");
                            None
                        }
                    },
                    WsMessage::Close(frame) => {
                        let why = frame
                            .map(|f| format!("closed by the API with {} {}", u16::from(f.code), f.reason))
                            .unwrap_or_else(|| "closed by the API".into());
                        return Served::Lost(why);
                    }
                    WsMessage::Binary(_) => {
                        warn!("ignoring a binary message on the control channel");
                        None
                    }
                    WsMessage::Ping(_) => {
                        // tungstenite queued the pong (one at most: the write buffer is
                        // bounded); read on once it is written, so a relay that pings without
                        // reading is pushed back on instead of answered without end.
                        match timeout(t.dead_after, sink.flush()).await {
                            Ok(Ok(())) => None,
                            Ok(Err(e)) => return Served::Lost(format!("sending: {e}")),
                            Err(_) => {
                                return Served::Lost(format!(
                                    "pongs not taken for {:?}", t.dead_after
                                ));
                            }
                        }
                    }
                    WsMessage::Pong(_) | WsMessage::Frame(_) => None,
                }
            }
            _ = ping.tick() => Some(WsMessage::Ping(Default::default())),
            Some(report) = reports.recv() => Some(json(&report)),
            Some(done) = sessions.tasks.join_next() => {
                // Sent now (the relay may be alive and this channel fine) and kept for the
                // next connect (this channel may lead to the relay that was lost).
                sessions.finished(done).map(|r| json(&r))
            }
        };
        if let Some(msg) = outgoing {
            match timeout(t.dead_after, sink.send(msg)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Served::Lost(format!("sending: {e}")),
                Err(_) => return Served::Lost(format!("send blocked for {:?}", t.dead_after)),
            }
        }
    }
}

fn json(m: &FromAgent) -> WsMessage {
    WsMessage::Text(
        serde_json::to_string(m).expect("FromAgent serialises: strings and ints").into(),
    )
}

/// What the control channel holds of one live session.
struct Live {
    /// Ends it (`session.close`, shutdown).
    cancel: oneshot::Sender<Cancel>,
    /// Brings it the answer to its `session.resume` (one at a time: a session asks once per
    /// lost leg, and a stale answer is dropped).
    resume: mpsc::Sender<(String, String)>,
}

/// The live sessions of the agent.
struct Sessions {
    /// Each task ends with its session id and, when the relay may have lost the session's end,
    /// a `session.report`.
    tasks: JoinSet<(String, Option<FromAgent>)>,
    live: HashMap<String, Live>,
    cfg: Arc<SessionConfig>,
    report: mpsc::Sender<FromAgent>,
    max: usize,
    /// `session.report`s to send after the next connect, oldest first.
    unreported: VecDeque<FromAgent>,
}

impl Sessions {
    /// Acts on one control message; returns the answer to send, if any.
    fn handle(&mut self, msg: ToAgent) -> Option<WsMessage> {
        match msg {
            ToAgent::Heartbeat { seq } => Some(json(&FromAgent::Heartbeat { seq })),
            ToAgent::SessionClose { session_id, reason } => {
                match self.live.remove(&session_id) {
                    Some(live) => {
                        info!(session = %peer(&session_id, 40), reason = %peer(&reason, 200),
                            "closing session on request");
                        let _ = live.cancel.send(Cancel { code: close::TERMINATED, reason });
                    }
                    None => {
                        debug!(session = %peer(&session_id, 40), "session.close for no live session")
                    }
                }
                None
            }
            open @ ToAgent::SessionOpen { .. } => {
                let spec = SessionSpec::from_message(open).expect("matched session.open");
                self.open(spec)
            }
            ToAgent::SessionResume { session_id, stream_url, token } => {
                match self.live.get(&session_id) {
                    Some(live) => {
                        if live.resume.try_send((stream_url, token)).is_err() {
                            debug!(session = %peer(&session_id, 40), "session.resume not awaited; dropped");
                        }
                    }
                    None => {
                        debug!(session = %peer(&session_id, 40), "session.resume for no live session")
                    }
                }
                None
            }
        }
    }

    fn open(&mut self, spec: SessionSpec) -> Option<WsMessage> {
        let id = spec.session_id.clone();
        if self.live.contains_key(&id) {
            warn!(session = %peer(&id, 40), "duplicate session.open ignored");
            return None;
        }
        if self.live.len() >= self.max {
            warn!(session = %peer(&id, 40), max = self.max, "session refused: too many live sessions");
            return Some(json(&FromAgent::SessionFailed {
                session_id: id,
                message: format!("the agent already runs {} sessions (its limit)", self.max),
            }));
        }
        let (tx, rx) = oneshot::channel();
        let (resume_tx, resume_rx) = mpsc::channel(1);
        self.live.insert(id.clone(), Live { cancel: tx, resume: resume_tx });
        let link = ResumeLink { ask: self.report.clone(), answers: resume_rx };
        let cfg = self.cfg.clone();
        let report = self.report.clone();
        let span = info_span!("session", session = %peer(&id, 40));
        self.tasks.spawn(
            async move {
                let counts = LegCounts::default();
                let end = session::run_counted(spec, &cfg, rx, &counts, Some(link)).await;
                let exit_code = match end {
                    SessionEnd::Exited(code) => Some(code),
                    _ => None,
                };
                if let SessionEnd::Failed(message) = end {
                    warn!(error = %peer(&message, 512), "session failed to start");
                    let failed = FromAgent::SessionFailed { session_id: id.clone(), message };
                    if report.try_send(failed).is_err() {
                        warn!("session.failed report dropped: report queue full or closed");
                    }
                    return (id, None);
                }
                let lost = counts.relay_lost().then(|| FromAgent::SessionReport {
                    session_id: id.clone(),
                    bytes_client_to_agent: counts.received(),
                    bytes_agent_to_client: counts.sent(),
                    exit_code,
                });
                (id, lost)
            }
            .instrument(span),
        );
        None
    }

    /// Forgets a finished session; returns its `session.report` (also kept in `unreported`)
    /// when its leg died without a close from the relay.
    fn finished(
        &mut self,
        done: Result<(String, Option<FromAgent>), tokio::task::JoinError>,
    ) -> Option<FromAgent> {
        match done {
            Ok((id, report)) => {
                self.live.remove(&id);
                let report = report?;
                info!(session = %id, report = ?report, "session leg lost without a close from the relay; reporting its end");
                if self.unreported.len() >= MAX_UNREPORTED
                    && let Some(old) = self.unreported.pop_front()
                {
                    warn!(dropped = ?old, max = MAX_UNREPORTED, "too many unreported session ends; dropping the oldest");
                }
                self.unreported.push_back(report.clone());
                Some(report)
            }
            Err(e) => {
                // A panicking session task is a bug; its entry is found stale below.
                warn!(error = %e, "session task ended abnormally");
                self.live.retain(|_, live| !live.cancel.is_closed());
                None
            }
        }
    }

    /// Closes every live session with "agent shutting down" and waits for them (bounded).
    async fn shutdown(&mut self, grace: Duration) {
        let n = self.live.len();
        if n > 0 {
            info!(sessions = n, "closing live sessions");
        }
        for (_, live) in self.live.drain() {
            let _ = live
                .cancel
                .send(Cancel { code: close::AGENT_SHUTDOWN, reason: "agent shutting down".into() });
        }
        let waited = timeout(grace, async {
            while let Some(done) = self.tasks.join_next().await {
                if let Err(e) = done {
                    warn!(error = %e, "session task ended abnormally");
                }
            }
        })
        .await;
        if waited.is_err() {
            warn!(left = self.tasks.len(), "sessions did not close in time; abandoning them");
            self.tasks.abort_all();
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn failover_tries_each_url_once_per_round() {
        // One URL: every failure ends a round (back off).
        assert_eq!(failover(0, 0, 1), (0, true));
        // Three URLs, the round started at 0: 1, 2, then back to 0 after a backoff.
        assert_eq!(failover(0, 0, 3), (1, false));
        assert_eq!(failover(1, 0, 3), (2, false));
        assert_eq!(failover(2, 0, 3), (0, true));
        // A round that started at the node that was up (2) ends when it comes round to 2.
        assert_eq!(failover(2, 2, 3), (0, false));
        assert_eq!(failover(1, 2, 3), (2, true));
    }

    use super::*;

    #[tokio::test]
    async fn unreported_session_ends_are_bounded_oldest_dropped_first() {
        let (report, _rx) = mpsc::channel(1);
        let tls = crate::tls::client_config(None, true).unwrap();
        let cfg = SessionConfig {
            tls,
            allow_plaintext: false,
            timing: Default::default(),
            link: Default::default(),
            allow_forward: Default::default(),
        };
        let mut s = Sessions {
            tasks: JoinSet::new(),
            live: HashMap::new(),
            cfg: Arc::new(cfg),
            report,
            max: 1,
            unreported: VecDeque::new(),
        };
        let lost = |i: usize| FromAgent::SessionReport {
            session_id: format!("s-{i}"),
            bytes_client_to_agent: i as u64,
            bytes_agent_to_client: 1,
            exit_code: None,
        };
        // A session that ended with a close from the relay leaves nothing to report.
        assert_eq!(s.finished(Ok(("s-closed".into(), None))), None);
        assert!(s.unreported.is_empty());
        for i in 0..MAX_UNREPORTED + 10 {
            assert_eq!(s.finished(Ok((format!("s-{i}"), Some(lost(i))))), Some(lost(i)));
        }
        assert_eq!(s.unreported.len(), MAX_UNREPORTED);
        assert_eq!(s.unreported.front(), Some(&lost(10)));
        assert_eq!(s.unreported.back(), Some(&lost(MAX_UNREPORTED + 9)));
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        let ceilings: Vec<u64> = (0..10).map(|a| backoff_ceiling(a, base, cap).as_secs()).collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert_eq!(backoff_ceiling(u32::MAX, base, cap), cap);
        for attempt in 0..40 {
            let d = backoff_delay(attempt, base, cap);
            assert!(d <= backoff_ceiling(attempt, base, cap), "{attempt}: {d:?}");
        }
        // Full jitter: delays spread over the range rather than sitting at the ceiling.
        let below_half = (0..200).filter(|_| backoff_delay(6, base, cap) < cap / 2).count();
        assert!(below_half > 0 && below_half < 200, "{below_half}");
    }
}
