//! One session: dial the data leg, start the shell or command on a new PTY, move bytes both
//! ways until one side ends, then end the other side cleanly.
//!
//! ```text
//!   relay data leg (WSS, hatch.v1)                          PTY master (AsyncFd)
//!   ─────────────────────────────                           ────────────────────
//!   DATA    ───── pump_in: write_all (awaits while the PTY is full) ──────▶ child stdin
//!   RESIZE  ───── pump_in: TIOCSWINSZ (child gets SIGWINCH)
//!   DATA ◀─────── pump_out: read ≤ 16 KiB, send (awaits while the leg is behind) ◀── output
//!   EXIT, close 1000 ◀── child exited, output drained
//!   close / error / silence ──▶ SIGHUP to the session, reap (SIGKILL after a grace period)
//! ```
//!
//! A shell, and an exec whose client sent a `TERM`, run on a PTY. An exec without a `TERM` (the
//! client's input is not a terminal) runs on pipes instead, as `ssh host cmd` does: bytes pass
//! unchanged and an empty DATA closes the command's stdin.
//!
//! Backpressure is structural: each pump does one thing at a time, so while a send to the leg
//! is pending the PTY is not read (the child blocks in `write`), and while a write to the PTY
//! is pending the leg is not read (TCP pushes back to the relay and the client). Each session
//! is one task; the only per-session memory is one 16 KiB read buffer and the WebSocket's
//! bounded buffers.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hatch_proto::api::Mode;
use hatch_proto::channel::{self, Message};
use hatch_proto::close;
use hatch_proto::control::{FromAgent, ToAgent};
use hatch_proto::logtext::peer;
use hatch_proto::resume::{Link, LinkConfig, OffsetError, Replay, Resume, Stream as Which};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, User};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::{debug, info, warn};

use crate::pty::{self, Credentials, Launch, Pty};

/// Largest DATA payload the agent sends: 16 KiB, the size of one PTY read, so output goes out
/// as soon as it is read and one message never waits for more.
pub const MAX_DATA: usize = 16 * 1024;

/// The WebSocket subprotocol of the data legs.
pub use hatch_proto::channel::SUBPROTOCOL;

/// Largest message accepted from the client on the data leg: 1 MiB. Keystrokes and pastes are
/// far smaller; the bound keeps a hostile peer from making the agent buffer without limit.
const MAX_INBOUND_MESSAGE: usize = 1 << 20;

/// `TERM` when the client sends none.
pub const DEFAULT_TERM: &str = "xterm-256color";
/// Window size before the client's first RESIZE: the classic terminal's 80 columns.
pub const DEFAULT_COLS: u16 = 80;
/// Window size before the client's first RESIZE: the classic terminal's 24 rows.
pub const DEFAULT_ROWS: u16 = 24;
/// `LANG` of every session.
pub const DEFAULT_LANG: &str = "C.UTF-8";

/// The timers of a session. Defaults suit production; tests shorten them.
#[derive(Debug, Clone)]
pub struct SessionTiming {
    /// TCP + TLS + WebSocket upgrade of the data leg.
    pub dial_timeout: Duration,
    /// How often the agent pings the data leg (its replies prove the leg alive).
    pub ping_interval: Duration,
    /// A leg that delivers nothing (not even a pong) for this long, while no send to it is
    /// pending, is dead. A pending send is a slow reader (a paused pager), not a dead leg.
    pub dead_after: Duration,
    /// After the child exits, how long output may stand still before the session ends (a
    /// background job that keeps the PTY open must not hold the session forever). While output
    /// still moves the drain goes on, up to `exit_timeout`.
    pub drain_timeout: Duration,
    /// After a hang-up, how long the session's processes get before SIGKILL.
    pub hangup_grace: Duration,
    /// How long to wait for the peer's answer to our close frame.
    pub close_timeout: Duration,
    /// How long EXIT may wait behind output a slow client has not read yet.
    pub exit_timeout: Duration,
    /// How long a session whose leg was lost keeps asking for a new one (the relay's resume
    /// window decides; this bounds an agent cut off from every relay). The shell lives on
    /// meanwhile, its output held in the window.
    pub resume_for: Duration,
}

impl Default for SessionTiming {
    fn default() -> Self {
        SessionTiming {
            dial_timeout: Duration::from_secs(10),
            // The relay pings idle legs every 30 s and drops legs silent for 90 s; the agent
            // does the same from its side so a half-open TCP connection is noticed either way.
            ping_interval: Duration::from_secs(30),
            dead_after: Duration::from_secs(90),
            drain_timeout: Duration::from_secs(2),
            hangup_grace: Duration::from_secs(5),
            close_timeout: Duration::from_secs(5),
            // A client paging through the last screens of output (`| less`) still gets the
            // exit status; a leg that cannot take 17 bytes in 10 minutes is abandoned.
            exit_timeout: Duration::from_secs(600),
            resume_for: Duration::from_secs(600),
        }
    }
}

/// What every session of one agent shares.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// TLS for the data legs (same trust as the control channel).
    pub tls: Arc<rustls::ClientConfig>,
    /// Accept `ws://` stream URLs (plaintext data legs: benchmarks on loopback only).
    pub allow_plaintext: bool,
    /// Timers.
    pub timing: SessionTiming,
    /// Bytes in flight per direction and when to acknowledge (`--window`).
    pub link: LinkConfig,
    /// Where port sessions may connect (`--allow-forward`).
    pub allow_forward: Arc<crate::forward::AllowForward>,
}

/// One `session.open`.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// Session id.
    pub session_id: String,
    /// `wss://.../v1/stream/{sid}?role=agent`.
    pub stream_url: String,
    /// Bearer token of the agent leg.
    pub token: String,
    /// Shell or exec.
    pub mode: Mode,
    /// The command (exec).
    pub command: Option<Vec<String>>,
    /// The user the relay authorised the session for. Required: a `session.open` without it
    /// is refused (the agent cannot know which user the policy was evaluated with).
    pub run_as: Option<String>,
    /// Client's `TERM`.
    pub term: Option<String>,
    /// exec: a PTY (`Some(true)`), pipes with stderr apart (`Some(false)`), or as before the
    /// field (`None`: a PTY when `term` is given, else pipes with stderr merged).
    pub tty: Option<bool>,
    /// port: the destination host (`localhost` when absent).
    pub remote_host: Option<String>,
    /// port: the destination port.
    pub remote_port: Option<u16>,
}

impl SessionSpec {
    /// The spec of a `session.open` message; `None` for other messages.
    pub fn from_message(msg: ToAgent) -> Option<SessionSpec> {
        match msg {
            ToAgent::SessionOpen {
                session_id,
                stream_url,
                token,
                mode,
                command,
                run_as,
                term,
                tty,
                remote_host,
                remote_port,
            } => Some(SessionSpec {
                session_id,
                stream_url,
                token,
                mode,
                command,
                run_as,
                term,
                tty,
                remote_host,
                remote_port,
            }),
            _ => None,
        }
    }
}

/// How a session asks for a new leg when its leg is lost: `ask` carries
/// [`FromAgent::SessionResume`] to the control channel, `answers` brings back the stream URL
/// and token of [`hatch_proto::control::ToAgent::SessionResume`]. Without it a lost leg ends
/// the session.
#[derive(Debug)]
pub struct ResumeLink {
    /// To the control channel.
    pub ask: mpsc::Sender<FromAgent>,
    /// `(stream_url, token)` answers.
    pub answers: mpsc::Receiver<(String, String)>,
}

/// Why the agent ends a session on its own (a `session.close` or the agent shutting down).
#[derive(Debug, Clone)]
pub struct Cancel {
    /// Close code sent on the leg.
    pub code: u16,
    /// Close reason sent on the leg (at most 123 bytes are sent).
    pub reason: String,
}

/// What a session's data leg carried, as the agent counted it: the payload bytes of the
/// binary and text messages it received and sent, which is what the relay counts as it
/// forwards them. When the relay is lost (killed) it may not have recorded its own latest
/// counts; the agent then reports these ([`hatch_proto::control::FromAgent::SessionReport`]).
#[derive(Debug, Default)]
pub struct LegCounts {
    received: AtomicU64,
    sent: AtomicU64,
    lost: AtomicBool,
}

impl LegCounts {
    /// Payload bytes received on the leg (client → agent).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Payload bytes handed to the leg's connection (agent → client).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The leg ended without a close frame from the relay (connection ended or reset, a send
    /// failed, silence): the relay may not have recorded the session's end and counts.
    pub fn relay_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn set_lost(&self) {
        self.lost.store(true, Ordering::Relaxed);
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The child exited with this status (128+n for signal n); EXIT and close 1000 were sent.
    Exited(i32),
    /// The data leg closed, failed or fell silent; the session was hung up.
    Lost(String),
    /// The agent ended the session ([`Cancel`]); the session was hung up.
    Cancelled(String),
    /// The session never started (dial failure, bad user, spawn failure).
    Failed(String),
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Ws, WsMessage>;
type Stream = SplitStream<Ws>;

/// Runs one session to its end. Never panics on anything the peer sends; every wait on the
/// peer has a deadline.
pub async fn run(
    spec: SessionSpec,
    cfg: &SessionConfig,
    cancel: oneshot::Receiver<Cancel>,
) -> SessionEnd {
    run_counted(spec, cfg, cancel, &LegCounts::default(), None).await
}

/// [`run`], counting what the data leg carries into `counts`, and putting up a new leg through
/// `resume` when one is lost (no close frame, or a resumable close code).
pub async fn run_counted(
    spec: SessionSpec,
    cfg: &SessionConfig,
    cancel: oneshot::Receiver<Cancel>,
    counts: &LegCounts,
    mut resume: Option<ResumeLink>,
) -> SessionEnd {
    let mut cancel = Some(cancel);
    let sid = spec.session_id.clone();
    if !spec.stream_url.starts_with("wss://") && !cfg.allow_plaintext {
        return SessionEnd::Failed(format!(
            "refusing to dial {:?}: data legs must be wss:// (plaintext needs \
             --danger-allow-plaintext)",
            spec.stream_url
        ));
    }
    let ws = match timeout(cfg.timing.dial_timeout, dial(&spec.stream_url, &spec.token, &cfg.tls))
        .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return SessionEnd::Failed(format!("dialing the data leg: {e}")),
        Err(_) => {
            return SessionEnd::Failed(format!(
                "dialing the data leg: no answer within {:?}",
                cfg.timing.dial_timeout
            ));
        }
    };
    debug!(session = %peer(&sid, 40), "data leg connected");
    if spec.mode == Mode::Port {
        return run_port(&spec, cfg, ws, &mut cancel, resume.as_mut()).await;
    }
    let (mut sink, mut stream) = ws.split();

    // What the command's side is: as `ssh host cmd`, a command gets a PTY only when asked
    // (`hatch exec -t`); otherwise pipes, bytes unchanged, end of input an empty DATA, and
    // stderr apart as STDERR when the client said it knows that message (`tty` present).
    let (use_pty, split_stderr) = match (spec.mode, spec.tty) {
        (Mode::Shell | Mode::Port, _) => (true, false),
        (Mode::Exec, Some(tty)) => (tty, !tty),
        (Mode::Exec, None) => (spec.term.is_some(), false),
    };
    let exec = spec.mode == Mode::Exec;
    let setup = async {
        let launch = prepare(&spec).await.map_err(|(code, why)| Setup::Refused(code, why))?;
        let cannot_start = |e: std::io::Error| match pty::not_started(&launch.program, &e) {
            Some((status, words)) if exec => Setup::NotStarted(status, words),
            _ => Setup::Refused(
                channel::ERROR_SPAWN,
                format!("cannot start {}: {e}", launch.program),
            ),
        };
        if !use_pty {
            let (child, pipes) = pty::spawn_piped(&launch, split_stderr).map_err(cannot_start)?;
            let io =
                Io::Pipes { input: Some(pipes.input), output: pipes.output, errors: pipes.errors };
            return Ok::<_, Setup>((io, child, launch));
        }
        let (pty, slave) = Pty::open().map_err(|e| {
            Setup::Refused(channel::ERROR_SPAWN, format!("cannot open a pseudo-terminal: {e}"))
        })?;
        // 80x24 until the client's first RESIZE (a new PTY is 0x0, which confuses programs
        // that start before it arrives).
        pty.resize(DEFAULT_COLS, DEFAULT_ROWS).map_err(|e| {
            Setup::Refused(channel::ERROR_SPAWN, format!("cannot size the pseudo-terminal: {e}"))
        })?;
        let child = pty::spawn(&launch, slave).map_err(cannot_start)?;
        Ok::<_, Setup>((Io::Pty(pty), child, launch))
    };
    let flow = Flow::new(cfg.link);
    let (mut io, mut child, launch) = match setup.await {
        Ok(x) => x,
        Err(Setup::NotStarted(code, words)) => {
            // As a shell: the words on the command's stderr (the terminal with -t), then the
            // status, delivered like any command's output and exit.
            info!(session = %peer(&sid, 40), code, error = %peer(&words, 512), "command not started");
            let line = if use_pty { format!("{words}\r\n") } else { format!("{words}\n") };
            let msg = {
                let mut l = flow.link();
                if split_stderr {
                    l.tx.push_stderr(line.as_bytes());
                    Message::Stderr(line.as_bytes()).to_vec()
                } else {
                    l.tx.push(line.as_bytes());
                    Message::Data(line.as_bytes()).to_vec()
                }
            };
            // Lost or not, the line is in the replay buffer and goes again on a new leg.
            let _ = send_all(&mut sink, [msg], counts).await;
            finish(
                code,
                &mut sink,
                &mut stream,
                &flow,
                &sid,
                cfg,
                &mut resume,
                &mut cancel,
                counts,
            )
            .await;
            return SessionEnd::Exited(code);
        }
        Err(Setup::Refused(code, message)) => {
            warn!(session = %peer(&sid, 40), code, error = %peer(&message, 512), "session refused");
            let ws_code = if code == channel::ERROR_RUN_AS {
                close::RUN_AS_UNAVAILABLE
            } else {
                close::INTERNAL_ERROR
            };
            let why = "session could not start";
            refuse(&mut sink, &mut stream, code, &message, ws_code, why, &cfg.timing).await;
            return SessionEnd::Failed(message);
        }
    };
    // The child is running: from here on every path ends by reaping it.
    let pid = child.id().unwrap_or(0);
    info!(session = %peer(&sid, 40), pid, program = %launch.program, mode = spec.mode.as_str(), "session started");

    let outcome = loop {
        let outcome = pump(
            &mut io,
            &mut child,
            &mut sink,
            &mut stream,
            &mut cancel,
            &cfg.timing,
            &flow,
            counts,
        )
        .await;
        let Outcome::Resumable(why) = outcome else { break outcome };
        let Some(link) = resume.as_mut() else { break Outcome::Lost(why) };
        info!(session = %peer(&sid, 40), why = %why, "data leg lost; resuming on a new one");
        match reattach(&sid, cfg, link, &mut cancel, &flow, counts).await {
            Ok(ws) => (sink, stream) = ws.split(),
            Err(end) => break end,
        }
    };
    let end = match outcome {
        Outcome::Exited(status) => {
            let code = exit_code(status);
            drop(io);
            // Background jobs that outlive the leader get the hang-up a terminal would give
            // them (nohup'd ones survive, as with ssh).
            hang_up_session(pid);
            finish(
                code,
                &mut sink,
                &mut stream,
                &flow,
                &sid,
                cfg,
                &mut resume,
                &mut cancel,
                counts,
            )
            .await;
            SessionEnd::Exited(code)
        }
        Outcome::Broken(e) => {
            hang_up(io, &mut child, pid, &cfg.timing).await;
            warn!(session = %peer(&sid, 40), error = %e, "the session cannot be resumed exactly");
            close_leg(&mut sink, &mut stream, close::RESUME_FAILED, "resume failed", &cfg.timing)
                .await;
            SessionEnd::Lost(format!("the session could not be resumed: {e}"))
        }
        Outcome::Lost(why) | Outcome::Resumable(why) => {
            hang_up(io, &mut child, pid, &cfg.timing).await;
            // If the peer sent a close, tungstenite queued the answer; flush it.
            let _ = timeout(cfg.timing.close_timeout, sink.close()).await;
            SessionEnd::Lost(why)
        }
        Outcome::Cancelled(c) => {
            hang_up(io, &mut child, pid, &cfg.timing).await;
            close_leg(&mut sink, &mut stream, c.code, &c.reason, &cfg.timing).await;
            SessionEnd::Cancelled(c.reason)
        }
        Outcome::BadMessage(why) => {
            hang_up(io, &mut child, pid, &cfg.timing).await;
            let err = Message::Error { code: channel::ERROR_BAD_MESSAGE, message: &why }.to_vec();
            let len = err.len();
            let sent =
                timeout(cfg.timing.close_timeout, sink.send(WsMessage::Binary(err.into()))).await;
            if matches!(sent, Ok(Ok(()))) {
                counts.add_sent(len);
            }
            close_leg(
                &mut sink,
                &mut stream,
                close::PROTOCOL_ERROR,
                "bad hatch.v1 message",
                &cfg.timing,
            )
            .await;
            SessionEnd::Lost(format!("client sent a bad message: {why}"))
        }
    };
    info!(session = %peer(&sid, 40), pid, end = ?end, "session ended");
    end
}

/// A port session: every stream the client opens is connected to the session's destination,
/// if `--allow-forward` allows it. A destination that is not allowed refuses the session at
/// once (ERROR, close 4017) rather than every connection later.
async fn run_port(
    spec: &SessionSpec,
    cfg: &SessionConfig,
    ws: Ws,
    cancel: &mut Option<oneshot::Receiver<Cancel>>,
    resume: Option<&mut ResumeLink>,
) -> SessionEnd {
    let sid = &spec.session_id;
    let host = spec.remote_host.clone().unwrap_or_else(|| "localhost".to_owned());
    let refused = match spec.remote_port {
        None => Some((close::INTERNAL_ERROR, "a port session without remote_port".to_owned())),
        Some(port) => {
            // A resolver that does not answer is a name that does not resolve (bounded).
            let lookup = tokio::net::lookup_host((host.as_str(), port));
            let ips: Vec<std::net::IpAddr> =
                match timeout(hatch_forward::CONNECT_TIMEOUT, lookup).await {
                    Ok(Ok(a)) => a.map(|a| a.ip()).collect(),
                    _ => Vec::new(),
                };
            (!cfg.allow_forward.allows(&host, port, &ips)).then(|| {
                (
                    close::FORWARD_NOT_ALLOWED,
                    format!("{host}:{port} is not allowed by this agent's --allow-forward"),
                )
            })
        }
    };
    if let Some((ws_code, message)) = refused {
        warn!(session = %peer(sid, 40), error = %message, "port session refused");
        let (mut sink, mut stream) = ws.split();
        let (code, why) = (channel::ERROR_FORWARD, "destination not allowed");
        refuse(&mut sink, &mut stream, code, &message, ws_code, why, &cfg.timing).await;
        return SessionEnd::Failed(message);
    }
    let port = spec.remote_port.expect("checked above");
    info!(session = %peer(sid, 40), host = %peer(&host, 80), port, "port session started");
    let role = hatch_forward::Role::Agent {
        dial: crate::forward::dialer(host, port, cfg.allow_forward.clone()),
    };
    let fcfg = hatch_forward::Config {
        link: cfg.link,
        ping_interval: cfg.timing.ping_interval,
        dead_after: cfg.timing.dead_after,
    };
    let cancelled = async {
        let c = recv_cancel(cancel).await;
        (c.code, c.reason)
    };
    let mut legs = resume.map(|link| PortLegs { sid, cfg, link });
    let legs = legs.as_mut().map(|l| l as &mut dyn hatch_forward::Reattach<_>);
    let end = match hatch_forward::pump(ws, role, fcfg, legs, cancelled, |_| {}).await {
        hatch_forward::End::Closed(code, why) => {
            SessionEnd::Lost(format!("leg closed with {code} ({}) {why}", close::describe(code)))
        }
        hatch_forward::End::Done(code) => SessionEnd::Cancelled(close::describe(code).to_owned()),
        hatch_forward::End::Lost(why) => SessionEnd::Lost(why),
        hatch_forward::End::Bad(why) => {
            SessionEnd::Lost(format!("client sent a bad message: {why}"))
        }
        hatch_forward::End::ResumeFailed(why) => {
            SessionEnd::Lost(format!("the session could not be resumed: {why}"))
        }
        hatch_forward::End::NotResumed(why) => SessionEnd::Lost(why),
    };
    info!(session = %peer(sid, 40), end = ?end, "port session ended");
    end
}

/// Why a session's command is not running.
enum Setup {
    /// The agent refuses or failed (an ERROR code and its words): ERROR, then a close.
    Refused(u16, String),
    /// The command could not be started as a shell would report it: this status, these words.
    NotStarted(i32, String),
}

/// The end of the output: EXIT `code`, replayed like output until the client has acknowledged
/// it (a client that resumes late still gets every byte and the status), then close 1000.
/// Puts up new legs while EXIT is unacknowledged, within the exit timeout.
#[allow(clippy::too_many_arguments)]
async fn finish(
    code: i32,
    sink: &mut Sink,
    stream: &mut Stream,
    flow: &Flow,
    sid: &str,
    cfg: &SessionConfig,
    resume: &mut Option<ResumeLink>,
    cancel: &mut Option<oneshot::Receiver<Cancel>>,
    counts: &LegCounts,
) {
    flow.exit.store(i64::from(code), Ordering::Relaxed);
    flow.link().tx.finish();
    let deadline = Instant::now() + cfg.timing.exit_timeout;
    let mut send_exit = true;
    loop {
        let sent = tokio::time::timeout_at(
            deadline,
            deliver_exit(sink, stream, flow, send_exit.then_some(code), counts),
        )
        .await;
        match sent {
            Ok(Ok(())) => {
                close_leg(sink, stream, close::NORMAL, "exited", &cfg.timing).await;
                return;
            }
            Ok(Err(ExitWait::Closed(e))) => {
                debug!(error = %e, "EXIT not acknowledged");
                return;
            }
            Ok(Err(ExitWait::Lost(e))) => {
                // The leg was lost with EXIT unacknowledged: on a new leg the replay carries
                // the output and EXIT again.
                debug!(error = %e, "EXIT not acknowledged");
                let Some(link) = resume.as_mut() else {
                    counts.set_lost();
                    return;
                };
                match reattach(sid, cfg, link, cancel, flow, counts).await {
                    Ok(ws) => (*sink, *stream) = ws.split(),
                    Err(_) => {
                        counts.set_lost();
                        return;
                    }
                }
                send_exit = false;
            }
            Err(_) => {
                counts.set_lost();
                return;
            }
        }
    }
}

/// Asks for a new leg until one is up: a resume token through the control channel, then the
/// dial and RESUME with what the client has not acknowledged. Asks again with backoff (the
/// control channel may be reconnecting to a restarted relay) until [`SessionTiming::resume_for`]
/// passes or the session is cancelled (`session.close`: it ended meanwhile).
async fn reattach(
    sid: &str,
    cfg: &SessionConfig,
    link: &mut ResumeLink,
    cancel: &mut Option<oneshot::Receiver<Cancel>>,
    flow: &Flow,
    counts: &LegCounts,
) -> Result<Ws, Outcome> {
    let mut asking = Asking::new(cfg, link);
    loop {
        let ws = tokio::select! {
            ws = asking.next_leg(sid, cfg, link) => ws.map_err(Outcome::Lost)?,
            c = recv_cancel(cancel) => return Err(Outcome::Cancelled(c)),
        };
        let (mut sink, stream) = ws.split();
        let msgs = {
            let mut l = flow.link();
            let (resume, replay) = l.reconnected();
            replay_messages(resume, replay, flow.exit_status())
        };
        match send_all(&mut sink, msgs, counts).await {
            Ok(()) => {
                info!(session = %peer(sid, 40), "data leg resumed");
                return Ok(sink.reunite(stream).expect("halves of one stream"));
            }
            Err(e) => debug!(error = %e, "new leg failed at once"),
        }
    }
}

/// The resume requests for one lost leg: when to ask again, and until when.
struct Asking {
    deadline: Instant,
    backoff: Duration,
}

impl Asking {
    fn new(cfg: &SessionConfig, link: &mut ResumeLink) -> Asking {
        // Answers to an earlier loss are stale: their tokens were for the leg just lost.
        while link.answers.try_recv().is_ok() {}
        Asking { deadline: Instant::now() + cfg.timing.resume_for, backoff: RESUME_ASK_FIRST }
    }

    /// Asks for a resume token and dials the leg it answers, again with backoff, until a
    /// leg is dialed or the deadline passes (`Err`, words).
    async fn next_leg(
        &mut self,
        sid: &str,
        cfg: &SessionConfig,
        link: &mut ResumeLink,
    ) -> Result<Ws, String> {
        loop {
            if link.ask.try_send(FromAgent::SessionResume { session_id: sid.to_owned() }).is_err() {
                debug!("resume request not queued: the control channel's queue is full");
            }
            let wait = tokio::time::sleep(
                self.backoff.min(self.deadline.saturating_duration_since(Instant::now())),
            );
            tokio::select! {
                answer = link.answers.recv() => {
                    let Some((url, token)) = answer else {
                        return Err("the agent is shutting down".into());
                    };
                    if !url.starts_with("wss://") && !cfg.allow_plaintext {
                        return Err(format!("refusing to dial {url:?}: not wss://"));
                    }
                    match timeout(cfg.timing.dial_timeout, dial(&url, &token, &cfg.tls)).await {
                        Ok(Ok(ws)) => return Ok(ws),
                        Ok(Err(e)) => debug!(error = %e, "dialing the new leg failed"),
                        Err(_) => debug!("dialing the new leg timed out"),
                    }
                }
                () = wait => {}
            }
            if Instant::now() >= self.deadline {
                return Err(format!("no new data leg within {:?}", cfg.timing.resume_for));
            }
            self.backoff = (self.backoff * 2).min(RESUME_ASK_MAX);
        }
    }
}

/// A port session's new legs, for the pump (which sends the RESUME and the replay itself).
struct PortLegs<'a> {
    sid: &'a str,
    cfg: &'a SessionConfig,
    link: &'a mut ResumeLink,
}

impl hatch_forward::Reattach<MaybeTlsStream<TcpStream>> for PortLegs<'_> {
    fn reattach<'b>(
        &'b mut self,
        why: &'b str,
    ) -> hatch_forward::NewLeg<'b, MaybeTlsStream<TcpStream>> {
        Box::pin(async move {
            info!(session = %peer(self.sid, 40), why = %peer(why, 200), "port session leg lost; resuming");
            let mut asking = Asking::new(self.cfg, self.link);
            let ws = asking.next_leg(self.sid, self.cfg, self.link).await?;
            info!(session = %peer(self.sid, 40), "data leg resumed");
            Ok(ws)
        })
    }
}

/// First wait for an answer to a resume request, doubled after each unanswered one...
pub const RESUME_ASK_FIRST: Duration = Duration::from_millis(500);
/// ... up to this.
pub const RESUME_ASK_MAX: Duration = Duration::from_secs(5);

/// The cancellation, when one comes; never once its sender is gone.
async fn recv_cancel(cancel: &mut Option<oneshot::Receiver<Cancel>>) -> Cancel {
    if let Some(rx) = cancel.as_mut() {
        if let Ok(c) = rx.await {
            return c;
        }
        // The sender was dropped without a reason: nobody can cancel any more.
        *cancel = None;
    }
    std::future::pending().await
}

/// Dials a data leg: WSS, bearer token, subprotocol `hatch.v1`.
async fn dial(
    url: &str,
    token: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Ws, tungstenite::Error> {
    let mut req = url.into_client_request()?;
    let headers = req.headers_mut();
    // A token that is not a header value (from the control channel) fails the dial as an
    // HTTP format error, not as a URL problem.
    let bearer = http::HeaderValue::try_from(format!("Bearer {token}"))?;
    headers.insert(http::header::AUTHORIZATION, bearer);
    headers
        .insert(http::header::SEC_WEBSOCKET_PROTOCOL, http::HeaderValue::from_static(SUBPROTOCOL));
    let (ws, _resp) = tokio_tungstenite::connect_async_tls_with_config(
        req,
        Some(leg_config()),
        true,
        Some(Connector::Rustls(tls.clone())),
    )
    .await?;
    Ok(ws)
}

/// WebSocket buffers of a data leg: small eager read buffer, bounded inbound messages. Every
/// send is flushed at once (a keystroke echo must not wait for a buffer to fill); the write
/// buffer only lets an acknowledgement ride in the same write as the output before it.
fn leg_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(MAX_DATA + 64)
        .write_buffer_size(MAX_DATA + 64)
        .max_write_buffer_size(4 * MAX_DATA)
        .max_message_size(Some(MAX_INBOUND_MESSAGE))
        .max_frame_size(Some(MAX_INBOUND_MESSAGE))
}

/// Whom this agent runs sessions as: what its control channel's `hello` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user of a session that names none: `--default-user`, or the agent's own user.
    pub default_user: String,
    /// Whether sessions can run as other users (the agent runs as root).
    pub switch_user: bool,
}

/// Resolves `--default-user` (or the agent's own user) once, at start: an agent whose default
/// user does not exist, or that cannot become it, refuses to start instead of failing every
/// session.
pub fn identity(default_user: Option<&str>) -> Result<Identity, String> {
    let euid = nix::unistd::geteuid();
    let user = match default_user {
        Some(name) => {
            if !hatch_proto::api::valid_user_name(name) {
                return Err(format!("--default-user {name:?} is not a valid user name"));
            }
            match User::from_name(name) {
                Ok(Some(u)) => u,
                Ok(None) => return Err(format!("--default-user \"{name}\" does not exist")),
                Err(e) => return Err(format!("looking up --default-user \"{name}\": {e}")),
            }
        }
        None => match User::from_uid(euid) {
            Ok(Some(u)) => u,
            _ => return Err(format!("the agent's own user (uid {euid}) has no passwd entry")),
        },
    };
    if user.uid != euid && !euid.is_root() {
        return Err(format!(
            "--default-user \"{}\": the agent is not root and can only run sessions as itself",
            user.name
        ));
    }
    if !hatch_proto::api::valid_user_name(&user.name) {
        return Err(format!("the user name {:?} cannot be announced to the relay", user.name));
    }
    Ok(Identity { default_user: user.name, switch_user: euid.is_root() })
}

/// Resolves the run-as user and builds the launch (environment, program, identity).
async fn prepare(spec: &SessionSpec) -> Result<Launch, (u16, String)> {
    // The relay names the user it evaluated the policy with. Without one the agent cannot tell
    // what was authorised (a relay older than the `hello`), so it runs nothing.
    let Some(wanted) = spec.run_as.clone() else {
        return Err((
            channel::ERROR_RUN_AS,
            "the relay did not say which user this session was authorised to run as; \
             refusing it"
                .to_owned(),
        ));
    };
    // getpwnam and getgrouplist may consult NSS (LDAP, files): not on a runtime thread.
    let user = tokio::task::spawn_blocking(move || resolve_user(Some(&wanted)))
        .await
        .map_err(|e| (channel::ERROR_INTERNAL, format!("resolving the user: {e}")))??;
    let (user, credentials) = user;

    let shell = if user.shell.as_os_str().is_empty() {
        "/bin/sh".to_owned()
    } else {
        user.shell.to_string_lossy().into_owned()
    };
    let home = user.dir.to_string_lossy().into_owned();
    let path = if user.uid.is_root() {
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    } else {
        "/usr/local/bin:/usr/bin:/bin:/usr/games"
    };
    // TERM names a terminfo file: only plain names, never a path or control characters.
    let term = spec.term.as_deref().filter(|t| {
        !t.is_empty()
            && t.len() <= 64
            && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
    });
    let env = vec![
        ("HOME".to_owned(), home.clone()),
        ("USER".to_owned(), user.name.clone()),
        ("LOGNAME".to_owned(), user.name.clone()),
        ("SHELL".to_owned(), shell.clone()),
        ("PATH".to_owned(), path.to_owned()),
        ("TERM".to_owned(), term.unwrap_or(DEFAULT_TERM).to_owned()),
        ("LANG".to_owned(), DEFAULT_LANG.to_owned()),
        ("HATCH_SESSION_ID".to_owned(), spec.session_id.clone()),
    ];
    let (program, arg0, args) = match spec.mode {
        Mode::Shell => {
            let base = shell.rsplit('/').next().unwrap_or("sh");
            (shell.clone(), Some(format!("-{base}")), Vec::new())
        }
        Mode::Port => return Err((channel::ERROR_SPAWN, "a port session runs no command".into())),
        Mode::Exec => match spec.command.as_deref() {
            Some([program, args @ ..]) if !program.is_empty() => {
                (program.clone(), None, args.to_vec())
            }
            _ => return Err((channel::ERROR_SPAWN, "exec session without a command".to_owned())),
        },
    };
    if [&program, &home].iter().any(|s| s.contains('\0'))
        || args.iter().chain(env.iter().map(|(_, v)| v)).any(|s| s.contains('\0'))
    {
        return Err((channel::ERROR_SPAWN, "command or environment contains a NUL byte".into()));
    }
    Ok(Launch { program, arg0, args, env, cwd: home, credentials })
}

/// The user to run as, and the identity switch needed (none when already that user).
fn resolve_user(wanted: Option<&str>) -> Result<(User, Option<Credentials>), (u16, String)> {
    let euid = nix::unistd::geteuid();
    let user = match wanted {
        Some(name) => match User::from_name(name) {
            Ok(Some(u)) => u,
            Ok(None) => {
                return Err((
                    channel::ERROR_RUN_AS,
                    format!("user \"{name}\" does not exist on this instance"),
                ));
            }
            Err(e) => {
                return Err((channel::ERROR_RUN_AS, format!("looking up user \"{name}\": {e}")));
            }
        },
        None => match User::from_uid(euid) {
            Ok(Some(u)) => u,
            _ => {
                return Err((
                    channel::ERROR_RUN_AS,
                    format!("the agent's own user (uid {euid}) has no passwd entry"),
                ));
            }
        },
    };
    if user.uid == euid {
        return Ok((user, None));
    }
    if !euid.is_root() {
        let me = User::from_uid(euid).ok().flatten().map(|u| u.name).unwrap_or_default();
        return Err((
            channel::ERROR_RUN_AS,
            format!(
                "cannot run as \"{}\": the agent runs as \"{me}\" (uid {euid}), not root, and can \
                 only start sessions as itself",
                user.name
            ),
        ));
    }
    let cname = std::ffi::CString::new(user.name.as_bytes())
        .map_err(|_| (channel::ERROR_RUN_AS, "user name contains a NUL byte".to_owned()))?;
    let groups = groups_of(&cname, user.gid)
        .map_err(|e| (channel::ERROR_RUN_AS, format!("groups of \"{}\": {e}", user.name)))?;
    let creds = Credentials { uid: user.uid, gid: user.gid, groups };
    Ok((user, Some(creds)))
}

/// The supplementary groups `initgroups(name, gid)` would set.
fn groups_of(name: &std::ffi::CStr, gid: Gid) -> nix::Result<Vec<Gid>> {
    nix::unistd::getgrouplist(name, gid)
}

/// Why the pumps stopped.
enum Outcome {
    /// The child exited (output drained or the drain timed out).
    Exited(ExitStatus),
    /// The data leg closed for good (a close frame that is not resumable).
    Lost(String),
    /// The data leg went away without a close frame (ended, failed, silent) or closed with a
    /// resumable code (4009, 4015): a new one may carry the session on.
    Resumable(String),
    /// The agent ends the session.
    Cancelled(Cancel),
    /// The client sent something that is not hatch.v1.
    BadMessage(String),
    /// The client's offsets cannot be right (an ACK beyond what was sent, a resume from bytes
    /// already dropped): the session cannot go on exactly.
    Broken(OffsetError),
}

/// Why `pump_in` stopped.
enum InEnd {
    Closed(Option<CloseFrame>),
    Gone(String),
    Bad(String),
    Broken(OffsetError),
}

/// The offsets of a session and what its two pumps share while a leg is up. Both pumps run in
/// the session's one task (the locks are never contended nor held across an await; they are
/// locks only because the task may move between threads).
struct Flow {
    link: Mutex<Link>,
    /// What `pump_in` wants sent before more output: the answer to the client's RESUME and
    /// what is sent again after it.
    answers: Mutex<VecDeque<Vec<u8>>>,
    /// Wakes `pump_out`: room opened, an acknowledgement may be due, or answers are queued.
    wake: Notify,
    /// A send to the leg is pending (a slow reader is not a dead leg).
    sending: AtomicBool,
    /// Output reads so far: the drain after the child's exit ends only once output has stopped
    /// moving, and a leg whose output is still moving is a slow reader, not a dead leg.
    progress: AtomicU64,
    /// The EXIT status once it was sent (the end of the output, replayed like it); `NO_EXIT`
    /// before.
    exit: AtomicI64,
}

/// [`Flow::exit`] before the child exited.
const NO_EXIT: i64 = i64::MIN;

impl Flow {
    fn new(cfg: LinkConfig) -> Self {
        Flow {
            link: Mutex::new(Link::new(cfg)),
            answers: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            sending: AtomicBool::new(false),
            progress: AtomicU64::new(0),
            exit: AtomicI64::new(NO_EXIT),
        }
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        // A panic while holding it would have ended the task; the state is still consistent.
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_answers(&self) -> Vec<Vec<u8>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect()
    }

    fn sending(&self) -> bool {
        self.sending.load(Ordering::Relaxed)
    }

    fn set_sending(&self, on: bool) {
        self.sending.store(on, Ordering::Relaxed);
    }

    fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }

    fn exit_status(&self) -> Option<i32> {
        i32::try_from(self.exit.load(Ordering::Relaxed)).ok()
    }

    /// Handles a RESUME from the client: queues the answer and what must be sent again.
    fn on_resume(&self, peer: Resume) -> Result<(), OffsetError> {
        let exit = self.exit_status();
        let mut link = self.link();
        if let Some((answer, replay)) = link.on_resume(peer)? {
            let msgs = replay_messages(answer, replay, exit);
            self.answers.lock().unwrap_or_else(|p| p.into_inner()).extend(msgs);
            self.wake.notify_one();
        }
        Ok(())
    }
}

/// A RESUME and what follows it as encoded messages: the output again in DATA messages of at
/// most [`MAX_DATA`] bytes, then EXIT if the end must be sent again.
fn replay_messages(resume: Resume, replay: Replay<'_>, exit: Option<i32>) -> Vec<Vec<u8>> {
    hatch_proto::channel::replay_messages(
        resume,
        replay,
        MAX_DATA,
        Message::Exit(exit.unwrap_or(255)),
    )
}

/// Sends EXIT (unless `code` is `None`: a resume's replay carried it) and waits until the
/// client has acknowledged everything, EXIT included (it
/// acknowledges an end at once), answering a RESUME meanwhile.
async fn deliver_exit(
    sink: &mut Sink,
    stream: &mut Stream,
    flow: &Flow,
    code: Option<i32>,
    counts: &LegCounts,
) -> Result<(), ExitWait> {
    if let Some(code) = code {
        let ack = flow.link().rx.take_ack();
        let msgs = [Message::Exit(code).to_vec()].into_iter().chain(ack_msg(ack));
        send_all(sink, msgs, counts).await.map_err(ExitWait::Lost)?;
    }
    loop {
        let answers = flow.take_answers();
        if !answers.is_empty() {
            send_all(sink, answers, counts).await.map_err(ExitWait::Lost)?;
        }
        if flow.link().tx.all_acked() {
            return Ok(());
        }
        let msg = match stream.next().await {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(ExitWait::Lost(format!("leg failed: {e}"))),
            None => return Err(ExitWait::Lost("leg connection ended".into())),
        };
        if let WsMessage::Binary(b) = &msg {
            counts.add_received(b.len());
        }
        match msg {
            WsMessage::Binary(b) => match Message::decode(&b) {
                Ok(Message::Ack(n)) => {
                    flow.link().on_ack(n).map_err(|e| ExitWait::Closed(e.to_string()))?
                }
                Ok(Message::Resume(r)) => {
                    flow.on_resume(r).map_err(|e| ExitWait::Closed(e.to_string()))?
                }
                // Input after the command ended goes nowhere.
                _ => {}
            },
            WsMessage::Close(f) => {
                let code = f.map_or(close::NORMAL, |f| u16::from(f.code));
                let why = format!("leg closed with {code} before EXIT was acknowledged");
                return Err(if close::is_resumable(code) {
                    ExitWait::Lost(why)
                } else {
                    ExitWait::Closed(why)
                });
            }
            _ => {}
        }
    }
}

/// Why EXIT was not acknowledged.
#[derive(Debug)]
enum ExitWait {
    /// The leg went away (or closed resumably): a new one may still deliver EXIT.
    Lost(String),
    /// The leg closed for good, or the client's offsets are wrong.
    Closed(String),
}

fn ack_msg(ack: Option<u64>) -> Option<Vec<u8>> {
    ack.map(|n| Message::Ack(n).to_vec())
}

/// Sends messages in one flush (an acknowledgement rides in the same write as the output it
/// follows), counting them.
async fn send_all(
    sink: &mut Sink,
    msgs: impl IntoIterator<Item = Vec<u8>>,
    counts: &LegCounts,
) -> Result<(), String> {
    for m in msgs {
        let len = m.len();
        if let Err(e) = sink.feed(WsMessage::Binary(m.into())).await {
            counts.set_lost();
            return Err(format!("sending output: {e}"));
        }
        counts.add_sent(len);
    }
    sink.flush().await.map_err(|e| {
        counts.set_lost();
        format!("sending output: {e}")
    })
}

/// The command's side of a session: a PTY, or pipes when the client is not a terminal.
enum Io {
    Pty(Pty),
    Pipes {
        /// `None` once the client ended its input.
        input: Option<tokio::net::unix::pipe::Sender>,
        output: tokio::net::unix::pipe::Receiver,
        /// stderr, when it goes apart as STDERR.
        errors: Option<tokio::net::unix::pipe::Receiver>,
    },
}

/// Where output is read from.
enum Output<'a> {
    Pty(&'a Pty),
    /// stdout, and stderr when it is apart; `None` once that pipe reached its end.
    Pipes(
        Option<&'a tokio::net::unix::pipe::Receiver>,
        Option<&'a tokio::net::unix::pipe::Receiver>,
    ),
}

/// Waits until the pipe is readable; for ever when it is gone.
async fn readable(r: Option<&tokio::net::unix::pipe::Receiver>) -> std::io::Result<()> {
    match r {
        Some(r) => r.readable().await,
        None => std::future::pending().await,
    }
}

impl Output<'_> {
    /// Reads output, and which stream it came from; `Ok(0)` once no process holds the terminal
    /// or any pipe open any more. Cancel-safe: a read that did not complete took nothing.
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<(Which, usize)> {
        let (out, err) = match self {
            Output::Pty(p) => return Ok((Which::Out, p.read(buf).await?)),
            Output::Pipes(out, err) => (out, err),
        };
        loop {
            // Readiness first (it takes no bytes), then the read from the one that is ready.
            let stream = tokio::select! {
                r = readable(*out), if out.is_some() => { r?; Which::Out }
                r = readable(*err), if err.is_some() => { r?; Which::Err }
                else => return Ok((Which::Out, 0)),
            };
            let pipe = if stream == Which::Out { &mut *out } else { &mut *err };
            match pipe.expect("chosen because it is there").try_read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // One pipe's end is not the output's: the other may still carry bytes.
                Ok(0) => *pipe = None,
                Ok(n) => return Ok((stream, n)),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where input is written to.
enum Input<'a> {
    Pty(&'a Pty),
    /// The command's stdin, `None` once closed; borrowed, so that it outlives a lost leg.
    Pipe(&'a mut Option<tokio::net::unix::pipe::Sender>),
}

impl Input<'_> {
    /// Writes some of `buf` (all of it once the input is closed: it goes nowhere); how much.
    async fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Input::Pty(p) => p.write(buf).await,
            Input::Pipe(None) => Ok(buf.len()),
            Input::Pipe(Some(w)) => loop {
                if buf.is_empty() {
                    return Ok(0);
                }
                w.writable().await?;
                match w.try_write(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            },
        }
    }

    /// End of input: close the pipe, or type the terminal's EOF character.
    async fn end(&mut self) -> std::io::Result<()> {
        match self {
            Input::Pty(p) => p.write_all(&[p.eof_char()]).await,
            Input::Pipe(w) => {
                **w = None;
                Ok(())
            }
        }
    }

    fn resize(&self, cols: u16, rows: u16) -> std::io::Result<()> {
        match self {
            Input::Pty(p) => p.resize(cols, rows),
            Input::Pipe(_) => Ok(()),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn pump(
    io: &mut Io,
    child: &mut tokio::process::Child,
    sink: &mut Sink,
    stream: &mut Stream,
    cancel: &mut Option<oneshot::Receiver<Cancel>>,
    timing: &SessionTiming,
    flow: &Flow,
    counts: &LegCounts,
) -> Outcome {
    let (output, input) = match io {
        Io::Pty(p) => {
            let p: &Pty = p;
            (Output::Pty(p), Input::Pty(p))
        }
        Io::Pipes { input, output, errors } => {
            (Output::Pipes(Some(&*output), errors.as_ref()), Input::Pipe(input))
        }
    };
    let mut progress_at_arm = 0;
    let mut exited_at = Instant::now();
    let out = pump_out(output, sink, timing.ping_interval, flow, counts);
    let inp = pump_in(input, stream, timing.dead_after, flow, counts);
    tokio::pin!(out, inp);
    let mut out_done = false;
    let mut status: Option<ExitStatus> = None;
    let drain = tokio::time::sleep(Duration::MAX / 4);
    tokio::pin!(drain);
    loop {
        if let (true, Some(st)) = (out_done, status) {
            return Outcome::Exited(st);
        }
        tokio::select! {
            r = &mut out, if !out_done => match r {
                Ok(()) => out_done = true,
                // A failed send: the connection is gone.
                Err(e) => return Outcome::Resumable(e),
            },
            st = child.wait(), if status.is_none() => match st {
                Ok(st) => {
                    status = Some(st);
                    progress_at_arm = flow.progress();
                    exited_at = Instant::now();
                    drain.as_mut().reset(Instant::now() + timing.drain_timeout);
                }
                Err(e) => return Outcome::Lost(format!("waiting for the child: {e}")),
            },
            () = &mut drain, if status.is_some() => {
                let now = flow.progress();
                let moving = now != progress_at_arm || flow.sending();
                if moving && exited_at.elapsed() < timing.exit_timeout {
                    // Output is still moving (or waiting for the client): not stuck. A
                    // background job that writes forever is cut at the exit timeout.
                    progress_at_arm = now;
                    drain.as_mut().reset(Instant::now() + timing.drain_timeout);
                    continue;
                }
                debug!("output drain timed out (a background process keeps the terminal open)");
                return Outcome::Exited(status.expect("guarded by the branch condition"));
            }
            r = &mut inp => return match r {
                InEnd::Closed(Some(f)) => {
                    let code = u16::from(f.code);
                    let why = format!("leg closed with {code} ({}) {}", close::describe(code), f.reason);
                    if close::is_resumable(code) { Outcome::Resumable(why) } else { Outcome::Lost(why) }
                }
                InEnd::Closed(None) => Outcome::Lost("leg closed".to_owned()),
                InEnd::Gone(why) => Outcome::Resumable(why),
                InEnd::Bad(why) => Outcome::BadMessage(why),
                InEnd::Broken(e) => Outcome::Broken(e),
            },
            c = recv_cancel(cancel) => return Outcome::Cancelled(c),
        }
    }
}

/// PTY → leg, and everything else the agent sends: acknowledgements (riding with output where
/// there is output), answers to a RESUME, pings. Ends with `Ok` when the PTY hangs up (no
/// process holds it any more). The PTY is read only while the window has room: a client that
/// does not acknowledge stops the command's output, as a slow terminal would.
async fn pump_out(
    mut pty: Output<'_>,
    sink: &mut Sink,
    ping_interval: Duration,
    flow: &Flow,
    counts: &LegCounts,
) -> Result<(), String> {
    let mut buf = vec![0u8; 1 + MAX_DATA];
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    loop {
        let answers = flow.take_answers();
        if !answers.is_empty() {
            flow.set_sending(true);
            let sent = send_all(sink, answers, counts).await;
            flow.set_sending(false);
            sent?;
        }
        let (room, ack_at) = {
            let link = flow.link();
            (link.tx.room().min(MAX_DATA), link.rx.poll_timeout())
        };
        tokio::select! {
            r = pty.read(&mut buf[1..1 + room]), if room > 0 => {
                let (stream, n) = match r {
                    Ok((_, 0)) => return Ok(()),
                    Ok(read) => read,
                    Err(e) => return Err(format!("reading the terminal: {e}")),
                };
                flow.progress.fetch_add(1, Ordering::Relaxed);
                let ack = {
                    let mut link = flow.link();
                    let took = match stream {
                        Which::Out => {
                            buf[0] = channel::TYPE_DATA;
                            link.tx.push(&buf[1..1 + n])
                        }
                        Which::Err => {
                            buf[0] = channel::TYPE_STDERR;
                            link.tx.push_stderr(&buf[1..1 + n])
                        }
                    };
                    debug_assert_eq!(took, n, "read no more than the window's room");
                    // Whatever was received rides along with the output.
                    link.rx.take_ack()
                };
                // An answer to a RESUME queued meanwhile goes first: the output just read
                // follows what it sends again, and the answer's `from` must be where the
                // DATA after it starts.
                let msgs = flow.take_answers().into_iter().chain([buf[..1 + n].to_vec()]);
                flow.set_sending(true);
                let sent = send_all(sink, msgs.chain(ack_msg(ack)), counts).await;
                flow.set_sending(false);
                sent?;
            }
            () = flow.wake.notified() => {
                let answers = flow.take_answers();
                let ack = flow.link().rx.poll_ack(Instant::now().into_std());
                if !answers.is_empty() || ack.is_some() {
                    send_all(sink, answers.into_iter().chain(ack_msg(ack)), counts).await?;
                }
            }
            () = sleep_until_some(ack_at) => {
                let answers = flow.take_answers();
                let ack = flow.link().rx.poll_ack(Instant::now().into_std());
                if !answers.is_empty() || ack.is_some() {
                    send_all(sink, answers.into_iter().chain(ack_msg(ack)), counts).await?;
                }
            }
            _ = ping.tick() => {
                flow.set_sending(true);
                let sent = sink.send(WsMessage::Ping(Bytes::new())).await;
                flow.set_sending(false);
                if let Err(e) = sent {
                    counts.set_lost();
                    return Err(format!("sending a ping: {e}"));
                }
            }
        }
    }
}

/// Sleeps until `at`; forever without one.
async fn sleep_until_some(at: Option<std::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Leg → PTY.
async fn pump_in(
    mut pty: Input<'_>,
    stream: &mut Stream,
    dead_after: Duration,
    flow: &Flow,
    counts: &LegCounts,
) -> InEnd {
    let mut pty_open = true;
    loop {
        let output_before = flow.progress();
        let msg = match timeout(dead_after, stream.next()).await {
            // Output waiting for, or still flowing to, a slow reader during the whole window
            // (a send can be between two writes at the instant the timer fires), or waiting
            // for the reader's acknowledgement (the window is full): the leg is flow-controlled,
            // not dead.
            Err(_)
                if flow.sending()
                    || flow.progress() != output_before
                    || flow.link().tx.room() == 0 =>
            {
                continue;
            }
            Err(_) => {
                counts.set_lost();
                return InEnd::Gone(format!("leg silent for {dead_after:?}"));
            }
            Ok(None) => {
                counts.set_lost();
                return InEnd::Gone("leg connection ended".into());
            }
            Ok(Some(Err(e))) => {
                counts.set_lost();
                return InEnd::Gone(format!("leg failed: {e}"));
            }
            Ok(Some(Ok(m))) => m,
        };
        match &msg {
            WsMessage::Binary(b) => counts.add_received(b.len()),
            WsMessage::Text(t) => counts.add_received(t.len()),
            _ => {}
        }
        let now = Instant::now().into_std();
        match msg {
            WsMessage::Binary(b) => match Message::decode(&b) {
                // An empty DATA is the end of the client's input.
                Ok(Message::Data([])) => {
                    let new = flow.link().on_end(now);
                    flow.wake.notify_one();
                    if new
                        && pty_open
                        && let Err(e) = pty.end().await
                    {
                        debug!(?e, "terminal no longer accepts input");
                        pty_open = false;
                    }
                }
                Ok(Message::Data(d)) => {
                    // Counted as it is written, part by part: if the session's leg is lost
                    // while the command is not reading, what was not written is sent again
                    // after the resume, and nothing is written twice.
                    let Some(dup) = flow.link().peek_data(d.len()) else { continue };
                    flow.link().rx.commit(now, dup, 0);
                    let mut rest = &d[dup..];
                    while !rest.is_empty() {
                        let n = if pty_open {
                            match pty.write(rest).await {
                                Ok(n) => n,
                                Err(e) => {
                                    // The child has gone and the terminal with it; the exit
                                    // path follows. Input after that is dropped.
                                    debug!(?e, "terminal no longer accepts input");
                                    pty_open = false;
                                    rest.len()
                                }
                            }
                        } else {
                            rest.len()
                        };
                        flow.link().rx.commit(Instant::now().into_std(), 0, n);
                        rest = &rest[n..];
                    }
                    flow.wake.notify_one();
                }
                Ok(Message::Resize { cols, rows }) => {
                    if cols == 0 || rows == 0 {
                        debug!(cols, rows, "ignoring an empty window size");
                    } else if let Err(e) = pty.resize(cols, rows) {
                        debug!(?e, "resize failed");
                    }
                }
                Ok(Message::Ack(n)) => {
                    if let Err(e) = flow.link().on_ack(n) {
                        return InEnd::Broken(e);
                    }
                    // Room may have opened.
                    flow.wake.notify_one();
                }
                Ok(Message::Resume(r)) => {
                    if let Err(e) = flow.on_resume(r) {
                        return InEnd::Broken(e);
                    }
                }
                Ok(Message::Error { code, message }) => {
                    // The text is the client's (up to a whole message, 1 MiB): only its head
                    // goes to the log.
                    warn!(code, error = %peer(message, 200), "client reported an error");
                }
                // Not the client's to send: ignored, as an unknown type would be.
                Ok(Message::Exit(_) | Message::Stderr(_) | Message::Unknown { .. }) => {}
                Err(e) => return InEnd::Bad(e.to_string()),
            },
            WsMessage::Text(_) => {
                return InEnd::Bad("text message on the binary hatch.v1 channel".into());
            }
            WsMessage::Close(frame) => return InEnd::Closed(frame),
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
        }
    }
}

/// Hangs up the session: SIGHUP (and SIGCONT, as the kernel does for a terminal hang-up) to its
/// process group, close the PTY, then reap, with SIGKILL after the grace period.
async fn hang_up(pty: Io, child: &mut tokio::process::Child, pid: u32, timing: &SessionTiming) {
    // Signals first, then the PTY: a shell that saw EOF on its terminal before the SIGHUP
    // would exit without forwarding the hang-up to its jobs.
    hang_up_session(pid);
    drop(pty);
    if timeout(timing.hangup_grace, child.wait()).await.is_err() {
        warn!(pid, "session leader ignored the hang-up; killing its process group");
        let _ = pty::signal_group(pid, Signal::SIGKILL);
        if let Err(e) = child.wait().await {
            warn!(pid, ?e, "reaping the child failed");
        }
    }
    // Jobs started after the first scan (a shell forking while it hangs up), or signalled
    // between fork and exec while the shell's own SIGHUP handler was still installed, get
    // theirs again until the session is empty; what is left after the grace period (a job
    // that ignores SIGHUP) is killed, so a hang-up never leaves a process behind.
    let deadline = Instant::now() + timing.hangup_grace;
    while pty::signal_session(pid, Signal::SIGHUP) > 0 {
        if Instant::now() >= deadline {
            let n = pty::signal_session(pid, Signal::SIGKILL);
            warn!(pid, processes = n, "session processes outlived the hang-up; killed");
            break;
        }
        pty::signal_session(pid, Signal::SIGCONT);
        tokio::time::sleep(HANGUP_RESCAN).await;
    }
}

/// How often a hung-up session is scanned again for processes that are still alive. Short
/// enough that a session ends promptly, long enough that scanning /proc costs nothing.
const HANGUP_RESCAN: Duration = Duration::from_millis(50);

/// SIGHUP then SIGCONT (as the kernel does on a hang-up, so stopped jobs see it) to every
/// process of the session.
fn hang_up_session(pid: u32) {
    let _ = pty::signal_group(pid, Signal::SIGHUP);
    let n = pty::signal_session(pid, Signal::SIGHUP);
    let _ = pty::signal_group(pid, Signal::SIGCONT);
    pty::signal_session(pid, Signal::SIGCONT);
    debug!(pid, processes = n, "session hung up");
}

/// Refuses a session on its leg: ERROR `code` with `message`, then close `ws_code` with `why`
/// (each bounded by the close timeout).
async fn refuse(
    sink: &mut Sink,
    stream: &mut Stream,
    code: u16,
    message: &str,
    ws_code: u16,
    why: &str,
    timing: &SessionTiming,
) {
    let err = Message::Error { code, message }.to_vec();
    let _ = timeout(timing.close_timeout, sink.send(WsMessage::Binary(err.into()))).await;
    close_leg(sink, stream, ws_code, why, timing).await;
}

/// Sends a close frame and waits (bounded) for the peer's answer.
async fn close_leg(
    sink: &mut Sink,
    stream: &mut Stream,
    code: u16,
    reason: &str,
    timing: &SessionTiming,
) {
    // A close reason is at most 123 bytes (RFC 6455 §5.5); cut on a character boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame { code: code.into(), reason: reason[..end].to_owned().into() };
    let sent = timeout(timing.close_timeout, sink.send(WsMessage::Close(Some(frame)))).await;
    if !matches!(sent, Ok(Ok(()))) {
        return;
    }
    let _ = timeout(timing.close_timeout, async { while let Some(Ok(_)) = stream.next().await {} })
        .await;
}

/// The EXIT status of a wait status: the exit code, or 128+n for signal n.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        // Neither exited nor signalled cannot come out of wait(); report a failure.
        (None, None) => 255,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_that_is_not_a_header_value_fails_the_dial_with_words() {
        let cfg = SessionConfig {
            tls: crate::tls::client_config(None, true).unwrap(),
            allow_plaintext: false,
            timing: SessionTiming::default(),
            link: LinkConfig::default(),
            allow_forward: Default::default(),
        };
        let spec = SessionSpec {
            session_id: "s-1".into(),
            stream_url: "wss://127.0.0.1:9/v1/stream/s-1?role=agent".into(),
            token: "t\r\nX-Injected: 1".into(),
            mode: Mode::Shell,
            command: None,
            run_as: None,
            term: None,
            tty: None,
            remote_host: None,
            remote_port: None,
        };
        let (_tx, rx) = oneshot::channel();
        match run(spec, &cfg, rx).await {
            SessionEnd::Failed(why) => {
                assert!(why.contains("dialing the data leg"), "{why}");
                assert!(why.contains("header value"), "{why}");
                assert!(!why.contains("URL scheme"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }
}
