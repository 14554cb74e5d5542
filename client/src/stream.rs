//! One session on the data plane: dial `stream_url` over WSS (bearer token, subprotocol
//! `hatch.v1`), send RESIZE first and on every SIGWINCH, stdin as DATA, print DATA as it
//! arrives, remember EXIT, and turn the close into an exit code.
//!
//! ```text
//!  stdin thread ──(bounded channel)──▶ escape ──▶ DATA ──▶ ┐
//!  SIGWINCH, SIGCONT ───────────────────────────▶ RESIZE ─▶ ├─ WSS ─▶ relay ─▶ agent
//!  stdout ◀──────────────────────────────────────  DATA ◀── ┘   EXIT, close code
//! ```
//!
//! Job control (interactive only), as in OpenSSH: SIGTSTP from outside and `~^Z` restore the
//! terminal and stop the process; every SIGCONT puts raw mode back (a job-control shell sets
//! its cooked modes while the client is stopped, also after a SIGSTOP the client never sees)
//! and sends the window size, which may have changed meanwhile.
//!
//! End of input (stdin EOF when it is not a terminal) is sent as a DATA message with an empty
//! body, so that `hatch exec -- cat < file` ends. Every wait on the relay has a deadline: a
//! send that does not complete in [`SEND_TIMEOUT`], or silence longer than [`DEAD_AFTER`]
//! (pings go out after [`PING_AFTER`] of silence), is a lost connection (exit 255).

use std::io::{IsTerminal, Read};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hatch_proto::api::StartSessionResponse;
use hatch_proto::channel::Message as Channel;
use hatch_proto::close;
use hatch_proto::resume::{Deliver, Link, LinkConfig, OffsetError, Replay, Resume};
use http::header::{AUTHORIZATION, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use nix::libc::{SIGCONT, SIGTSTP};
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::api::{CONNECT_TIMEOUT, classify_io, describe_tls_error};
use crate::errors::{CliError, Subject};
use crate::escape::{Action, Escape, HELP, SUSPEND_LINE};
use crate::terminal::{self, RawGuard};

/// The `hatch.v1` WebSocket subprotocol.
pub use hatch_proto::channel::SUBPROTOCOL;
/// Silence from the relay after which the client sends a ping (the relay pings every 30 s).
pub const PING_AFTER: Duration = Duration::from_secs(15);
/// Interval of the pings sent while the relay is silent.
pub const PING_EVERY: Duration = Duration::from_secs(5);
/// Silence from the relay after which the connection is declared lost (the relay's own dead-leg
/// limit is 90 s; pings answered by the relay itself keep a healthy connection well inside).
pub const DEAD_AFTER: Duration = Duration::from_secs(45);
/// Deadline for one write to the relay.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the close after EXIT arrived before exiting anyway.
pub const CLOSE_AFTER_EXIT: Duration = Duration::from_secs(5);
/// Largest message accepted from the relay (bytes): the agent sends output in chunks far below
/// this; a peer sending more is cut off rather than allowed to grow the client's memory.
pub const MAX_MESSAGE: usize = 4 << 20;
/// Unsent bytes the client's WebSocket may hold (its `max_write_buffer_size`): a few stdin
/// chunks. Past it tungstenite keeps one pending pong rather than one per ping, so a relay that
/// floods pings and reads nothing cannot grow the client.
const MAX_WRITE_BUFFER: usize = 1 << 20;
/// Bytes read from stdin at once (one DATA message at most this big).
const STDIN_CHUNK: usize = 32 * 1024;
/// Stdin chunks queued ahead of the WebSocket (bounded: 8 × 32 KiB).
const STDIN_QUEUE: usize = 8;
/// The smallest window the client accepts: a stdin chunk (and an escape's held bytes) must fit.
pub const MIN_WINDOW: usize = 2 * STDIN_CHUNK;

/// A data leg.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Options of one streamed session.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Instance id, for messages.
    pub instance: String,
    /// Put the terminal in raw mode, send RESIZE, honour `~` escapes: stdin is a terminal.
    pub interactive: bool,
    /// Window and acknowledgements of the data stream (window at least [`MIN_WINDOW`]).
    pub link: LinkConfig,
    /// This process attaches to a session another client had (`hatch attach`): it starts
    /// with a fresh RESUME and sends no input until the agent's answer.
    pub attach: bool,
}

/// Dials the data plane; an HTTP refusal with a Hatch error body becomes [`CliError::Api`].
pub async fn connect(
    started: &StartSessionResponse,
    tls: std::sync::Arc<rustls::ClientConfig>,
    instance: &str,
) -> Result<Ws, CliError> {
    let url = started.stream_url.clone();
    let mut req = url.as_str().into_client_request().map_err(|e| CliError::BadResponse {
        url: url.clone(),
        detail: format!("stream URL: {e}"),
    })?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", started.token)).map_err(|_| {
        CliError::BadResponse { url: url.clone(), detail: "a token that is not a header".into() }
    })?;
    req.headers_mut().insert(AUTHORIZATION, bearer);
    req.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    let limits = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .max_write_buffer_size(MAX_WRITE_BUFFER);
    let dial = tokio_tungstenite::connect_async_tls_with_config(
        req,
        Some(limits),
        true,
        Some(tokio_tungstenite::Connector::Rustls(tls)),
    );
    let (ws, _response) = match timeout(CONNECT_TIMEOUT, dial).await {
        Err(_) => return Err(CliError::Timeout { url, what: "WebSocket handshake" }),
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(classify_ws_error(&url, e, instance)),
    };
    Ok(ws)
}

fn classify_ws_error(url: &str, err: tungstenite::Error, instance: &str) -> CliError {
    use tungstenite::Error as E;
    match err {
        E::Http(resp) => {
            let status = resp.status().as_u16();
            match resp.body().as_deref().map(serde_json::from_slice::<hatch_proto::api::ErrorBody>)
            {
                Some(Ok(body)) => CliError::api(
                    status,
                    body,
                    Subject {
                        action: "hatch:StartSession",
                        instance: Some(instance.to_owned()),
                        data_plane: true,
                        ..Subject::default()
                    },
                    Some(format!("GET {url} -> {status}")),
                ),
                _ => CliError::BadResponse {
                    url: url.to_owned(),
                    detail: format!(
                        "HTTP {status} to the WebSocket upgrade, without an error body"
                    ),
                },
            }
        }
        E::Io(e) => classify_io(url, &e),
        E::Tls(tungstenite::error::TlsError::Rustls(e)) => {
            CliError::Tls { url: url.to_owned(), detail: describe_tls_error(&e) }
        }
        E::Protocol(p) => CliError::BadResponse { url: url.to_owned(), detail: p.to_string() },
        other => CliError::Lost(format!("{url}: {other}")),
    }
}

/// How the loop ended, before it is turned into an exit code.
enum End {
    Closed(u16, String),
    Lost(String),
    Error(CliError),
    /// The agent's offsets cannot be right: the stream cannot go on exactly.
    Broken(OffsetError),
}

/// Runs the session on an open stream until it ends; returns the exit code (the remote
/// status) or the failure. Raw mode, when `interactive`, is on only inside this function.
pub async fn run(
    ws: Ws,
    opts: &StreamOptions,
    resume: Option<&Reconnect<'_>>,
) -> Result<u8, CliError> {
    let guard = if opts.interactive {
        Some(RawGuard::enable().map_err(|e| CliError::Local(format!("raw mode: {e}")))?)
    } else {
        None
    };
    let (status, end) = pump(ws, opts, guard.as_ref(), resume).await;
    if guard.is_some() && (status.is_none() || matches!(end, End::Error(_))) {
        // The failure line follows on stderr: start it on a line of its own, not after the
        // remote prompt.
        eprint!("\r\n");
    }
    drop(guard);
    if let Some(status) = status {
        // The remote side said how it ended; a close after that does not change it.
        if !matches!(end, End::Error(CliError::Disconnected | CliError::Signal(..))) {
            return Ok(exit_status_to_code(status));
        }
    }
    match end {
        End::Closed(close::NORMAL, _) => Err(CliError::NoExitStatus),
        End::Closed(code, reason) => {
            Err(CliError::Closed { code, reason, instance: Some(opts.instance.clone()) })
        }
        End::Lost(detail) => Err(CliError::Lost(detail)),
        End::Error(e) => Err(e),
        End::Broken(e) => Err(CliError::Closed {
            code: close::RESUME_FAILED,
            reason: e.to_string(),
            instance: Some(opts.instance.clone()),
        }),
    }
}

/// A remote status as a process exit code: 0–255 as is, anything else 255.
pub fn exit_status_to_code(status: i32) -> u8 {
    u8::try_from(status).unwrap_or(255)
}

/// How a session gets a new connection when its connection is lost: the session's resume
/// call (`POST /v1/sessions/{id}/resume`) and the dial of the stream URL it answers.
pub struct Reconnect<'a> {
    /// The API client.
    pub client: &'a crate::api::Client,
    /// The session.
    pub session_id: String,
    /// How long the relay keeps the session for a resume (its answer's `resume_window_s`):
    /// how long to keep trying. Zero: a lost connection ends the session.
    pub window: Duration,
    /// The action a resume is evaluated as (for the words of a refusal):
    /// `hatch:StartSession`, or `hatch:StartPortForwarding` for a port session.
    pub action: &'static str,
}

impl Reconnect<'_> {
    /// One attempt: a resume token (taking the session over: this process's own connection
    /// is the one that was lost), then the WebSocket.
    async fn once(&self, instance: &str) -> Result<Ws, CliError> {
        let subject = Subject {
            action: self.action,
            instance: Some(instance.to_owned()),
            ..Subject::default()
        };
        let path = format!("/v1/sessions/{}/resume", self.session_id);
        let body = hatch_proto::api::ResumeSessionRequest { force: true };
        let r: StartSessionResponse = self.client.post(&path, &body, &subject).await?;
        connect(&r, self.client.tls(), instance).await
    }

    /// Attempts with backoff until a connection is up; `attempt` hears of each try (from 1).
    /// `Err` ([`CliError::NotResumed`]) when the session ended, is refused to this caller, or
    /// the relay's resume window has passed.
    pub async fn until_up(
        &self,
        instance: &str,
        mut attempt: impl FnMut(u32),
    ) -> Result<Ws, CliError> {
        let started = Instant::now();
        let mut n = 0u32;
        loop {
            n += 1;
            attempt(n);
            match self.once(instance).await {
                Ok(ws) => return Ok(ws),
                Err(e) if final_failure(&e) => return Err(CliError::NotResumed(e.message(false))),
                // The relay keeps the session for its window from when it noticed the loss, no
                // later than this side: past it there is nothing to resume.
                Err(e) if started.elapsed() >= self.window => {
                    return Err(CliError::NotResumed(format!(
                        "no connection within the relay's resume window ({} s): {}",
                        self.window.as_secs(),
                        e.message(false)
                    )));
                }
                Err(_) => tokio::time::sleep(reconnect_delay(n)).await,
            }
        }
    }
}

/// How long to keep reconnecting, from the relay's `resume_window_s`: none or 0 is off, and
/// a relay's value past a day is taken as a day (every wait on a peer has a deadline).
pub fn reconnect_window(secs: Option<u64>) -> Duration {
    const LONGEST: u64 = 24 * 3600;
    Duration::from_secs(secs.unwrap_or(0).min(LONGEST))
}

/// First reconnect delay ceiling (full jitter below it), doubled per failed attempt...
pub const RECONNECT_BASE: Duration = Duration::from_millis(250);
/// ... up to this.
pub const RECONNECT_CAP: Duration = Duration::from_secs(5);

/// The wait after the `attempt`-th failed reconnect (from 1): uniform below a ceiling that
/// doubles from [`RECONNECT_BASE`] up to [`RECONNECT_CAP`] (full jitter: sessions cut off
/// together, by a relay restart, do not come back at once).
pub fn reconnect_delay(attempt: u32) -> Duration {
    let ceiling = RECONNECT_BASE.saturating_mul(1 << attempt.min(5)).min(RECONNECT_CAP);
    ceiling.mul_f64(rand::random::<f64>())
}
/// Whether a failed attempt is final: the session ended, is not this caller's, or may no
/// longer be resumed by them. Anything else (the relay restarting, the network) is retried.
fn final_failure(e: &CliError) -> bool {
    match e {
        CliError::Api(a) => {
            matches!(a.status, 401 | 403 | 404)
                || (a.status == 409 && a.body.code != "TokenAlreadyUsed")
        }
        CliError::Tls { .. } | CliError::BadResponse { .. } => true,
        _ => false,
    }
}

/// Whether the loop's end calls for a new connection rather than the end of the session.
fn resumable(end: &End) -> bool {
    match end {
        End::Lost(_) => true,
        End::Closed(code, _) => close::is_resumable(*code),
        _ => false,
    }
}

async fn pump(
    ws: Ws,
    opts: &StreamOptions,
    guard: Option<&RawGuard>,
    resume: Option<&Reconnect<'_>>,
) -> (Option<i32>, End) {
    let (mut sink, mut stream) = ws.split();
    let mut status: Option<i32> = None;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut stderr_lines = LocalLines::new(opts.interactive);

    let fail = |e: std::io::Error, what: &str| End::Error(CliError::Local(format!("{what}: {e}")));
    let mut winch = match signal(SignalKind::window_change()) {
        Ok(s) => s,
        Err(e) => return (None, fail(e, "SIGWINCH handler")),
    };
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => return (None, fail(e, "SIGTERM handler")),
    };
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => return (None, fail(e, "SIGHUP handler")),
    };
    // Only with raw mode to undo: once caught, a signal stays caught for the process's life,
    // and without a terminal the default stop is right.
    let (mut tstp, mut cont) = (None, None);
    if guard.is_some() {
        match (signal(SignalKind::from_raw(SIGTSTP)), signal(SignalKind::from_raw(SIGCONT))) {
            (Ok(t), Ok(c)) => (tstp, cont) = (Some(t), Some(c)),
            (Err(e), _) | (_, Err(e)) => return (None, fail(e, "SIGTSTP/SIGCONT handler")),
        }
    }

    let mut size = None;
    if opts.interactive {
        size = terminal::size();
        if let Some((cols, rows)) = size {
            let msg = Channel::Resize { cols, rows }.to_vec();
            if let Err(end) = send(&mut sink, msg).await {
                return (None, end);
            }
        }
    }

    // A new connection is up and the agent's RESUME has not come back yet.
    let mut resuming = false;
    let mut link = if opts.attach {
        let (link, hello) = Link::attach(opts.link);
        if let Err(end) = send(&mut sink, Channel::Resume(hello).to_vec()).await {
            return (None, end);
        }
        link
    } else {
        Link::new(opts.link)
    };
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Vec<u8>>>(STDIN_QUEUE);
    spawn_stdin_reader(tx);
    let mut stdin_open = true;
    let mut escape = opts.interactive.then(Escape::new);

    let mut last_rx = Instant::now();
    let mut last_ping = Instant::now();
    let mut exit_deadline: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let end = 'session: loop {
        let end = loop {
            // An acknowledgement due at once (the agent's EXIT, a full 64 KiB) goes before
            // anything else is awaited.
            if let Some(n) = link.rx.poll_ack(Instant::now().into_std())
                && let Err(end) = send(&mut sink, Channel::Ack(n).to_vec()).await
            {
                break end;
            }
            tokio::select! {
                msg = stream.next() => {
                    last_rx = Instant::now();
                    let now = last_rx.into_std();
                    match msg {
                        Some(Ok(Message::Binary(bytes))) => match Channel::decode(&bytes) {
                            Ok(Channel::Data(data)) => {
                                if let Deliver::From(i) = link.on_data(now, data.len())
                                    && i < data.len()
                                    && let Err(e) = write_out(&mut stdout, &data[i..]).await
                                {
                                    break fail(e, "writing to stdout");
                                }
                            }
                            // The command's stderr (no PTY): the same offsets as DATA.
                            Ok(Channel::Stderr(data)) => {
                                if let Deliver::From(i) = link.on_data(now, data.len())
                                    && i < data.len()
                                    && let Err(e) = write_err(&mut stderr, &data[i..]).await
                                {
                                    break fail(e, "writing to stderr");
                                }
                            }
                            Ok(Channel::Exit(s)) => {
                                // The end of the output: acknowledged at once (the agent waits for
                                // it), delivered once however often a resume sends it again.
                                if link.on_end(now) {
                                    status = Some(s);
                                    exit_deadline = Some(Instant::now() + CLOSE_AFTER_EXIT);
                                }
                            }
                            Ok(Channel::Ack(n)) => {
                                if let Err(e) = link.on_ack(n) {
                                    break broken(&mut sink, e).await;
                                }
                            }
                            Ok(Channel::Resume(r)) => {
                                match link.on_resume(r) {
                                    Ok(Some((answer, replay))) => {
                                        let msgs = replay_messages(answer, replay);
                                        if let Err(end) = send_all(&mut sink, msgs).await {
                                            break end;
                                        }
                                    }
                                    Ok(None) => {}
                                    Err(e) => break broken(&mut sink, e).await,
                                }
                                // The agent is there again: the session goes on (until now only
                                // the relay had answered).
                                if std::mem::take(&mut resuming) {
                                    stderr_lines.end_status();
                                    stderr_lines.line("hatch: reconnected; the session goes on");
                                }
                            }
                            Ok(Channel::Error { code, message }) => {
                                stderr_lines.line(&format!("hatch: remote error {code}: {message}"));
                            }
                            // RESIZE from the agent carries nothing for the client; unknown types
                            // are ignored for forward compatibility.
                            Ok(_) => {}
                            Err(e) => {
                                stderr_lines.line(&format!("hatch: ignored a bad message: {e}"));
                            }
                        },
                        Some(Ok(Message::Close(frame))) => {
                            let (code, reason) = frame
                                .map(|f| (u16::from(f.code), f.reason.to_string()))
                                .unwrap_or((close::NORMAL, String::new()));
                            // Let tungstenite flush its close reply, briefly.
                            let _ = timeout(Duration::from_millis(200), stream.next()).await;
                            break End::Closed(code, reason);
                        }
                        // tungstenite queued the pong; read on once it is written, so a relay that
                        // pings without reading is pushed back on rather than answered without end.
                        Some(Ok(Message::Ping(_))) => {
                            match timeout(SEND_TIMEOUT, sink.flush()).await {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => break End::Lost(e.to_string()),
                                Err(_) => break End::Lost(format!(
                                    "the relay took no data for {} s", SEND_TIMEOUT.as_secs()
                                )),
                            }
                        }
                        // Text is not part of hatch.v1.
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break End::Lost(e.to_string()),
                        None => break End::Lost("the relay closed the connection without a close \
                                                 frame".to_owned()),
                    }
                }
                // Stdin is read only while the window has room for a whole chunk: an agent that
                // acknowledges nothing stops the input, as a slow terminal would.
                input = rx.recv(), if stdin_open && !link.holding() && link.tx.room() >= STDIN_CHUNK + 16 => {
                    let chunk = match input {
                        Some(Ok(chunk)) => chunk,
                        Some(Err(e)) => break fail(e, "reading stdin"),
                        None => Vec::new(),
                    };
                    if chunk.is_empty() {
                        // End of input: tell the agent, keep reading output until EXIT and close.
                        // The end takes an offset and is sent again on a resume until acknowledged.
                        stdin_open = false;
                        link.tx.finish();
                        if let Err(end) = send(&mut sink, Channel::Data(&[]).to_vec()).await {
                            break end;
                        }
                        continue;
                    }
                    let actions = match escape.as_mut() {
                        Some(esc) => esc.feed(&chunk),
                        None => vec![Action::Send(chunk)],
                    };
                    let mut done = None;
                    for action in actions {
                        match action {
                            Action::Send(bytes) => {
                                if let Err(end) = send_data(&mut sink, &mut link, &bytes).await {
                                    done = Some(end);
                                    break;
                                }
                            }
                            Action::Help => stderr_lines.raw(HELP),
                            Action::Suspend => {
                                stderr_lines.raw(SUSPEND_LINE);
                                if let Some(Err(e)) = guard.map(RawGuard::stop_self) {
                                    done = Some(fail(e, "suspending"));
                                    break;
                                }
                            }
                            Action::Disconnect => {
                                let _ = timeout(Duration::from_millis(500), sink.send(Message::Close(None))).await;
                                done = Some(End::Error(CliError::Disconnected));
                                break;
                            }
                        }
                    }
                    if let Some(end) = done {
                        break end;
                    }
                }
                _ = winch.recv() => {
                    if opts.interactive {
                        let now = terminal::size();
                        if let Some((cols, rows)) = now.filter(|_| now != size) {
                            size = now;
                            if let Err(end) = send(&mut sink, Channel::Resize { cols, rows }.to_vec()).await {
                                break end;
                            }
                        }
                    }
                }
                Some(()) = recv(&mut tstp) => {
                    let _ = stdout.flush().await;
                    if let Some(Err(e)) = guard.map(RawGuard::stop_self) {
                        break fail(e, "suspending");
                    }
                }
                Some(()) = recv(&mut cont) => {
                    if let Some(Err(e)) = guard.map(RawGuard::resume) {
                        break fail(e, "raw mode after SIGCONT");
                    }
                    // The silence while stopped was this process's, not the relay's: what the relay
                    // sent meanwhile waits unread in the socket.
                    last_rx = Instant::now();
                    // Always sent: the size may have changed while stopped, and a RESIZE makes
                    // full-screen programs on the remote side redraw, as after `fg` locally.
                    size = terminal::size();
                    if let Some((cols, rows)) = size
                        && let Err(end) = send(&mut sink, Channel::Resize { cols, rows }.to_vec()).await
                    {
                        break end;
                    }
                }
                _ = term.recv() => {
                    let _ = timeout(Duration::from_millis(500), sink.send(Message::Close(None))).await;
                    break End::Error(CliError::Signal("SIGTERM", 128 + 15));
                }
                _ = hup.recv() => {
                    let _ = timeout(Duration::from_millis(500), sink.send(Message::Close(None))).await;
                    break End::Error(CliError::Signal("SIGHUP", 128 + 1));
                }
                () = sleep_until_some(link.rx.poll_timeout()) => {
                    if let Some(n) = link.rx.poll_ack(Instant::now().into_std())
                        && let Err(end) = send(&mut sink, Channel::Ack(n).to_vec()).await
                    {
                        break end;
                    }
                }
                _ = tick.tick() => {
                    if exit_deadline.is_some_and(|d| Instant::now() >= d) {
                        break End::Closed(close::NORMAL, "no close after EXIT".to_owned());
                    }
                    let silent = last_rx.elapsed();
                    if silent >= DEAD_AFTER {
                        break End::Lost(format!("no answer from the relay for {} s", silent.as_secs()));
                    }
                    // One probe every PING_EVERY while silent, not one per tick.
                    if silent >= PING_AFTER && last_ping.elapsed() >= PING_EVERY {
                        last_ping = Instant::now();
                        if let Err(end) = send_msg(&mut sink, Message::Ping(Default::default())).await {
                            break end;
                        }
                    }
                }
            }
        };
        // Lost before the remote side said how it ended: put up a new connection and resume.
        let Some(re) =
            resume.filter(|r| !r.window.is_zero() && status.is_none() && resumable(&end))
        else {
            break 'session end;
        };
        let _ = stdout.flush().await;
        let why = match &end {
            End::Lost(d) => d.clone(),
            End::Closed(code, _) => close::describe(*code).to_owned(),
            _ => String::new(),
        };
        let attempts = re.until_up(&opts.instance, |attempt| {
            stderr_lines.status(
                "reconnecting",
                &format!("hatch: connection lost ({why}); reconnecting (attempt {attempt})"),
            );
        });
        let ws = tokio::select! {
            r = attempts => match r {
                Ok(ws) => ws,
                Err(e) => {
                    stderr_lines.end_status();
                    break 'session End::Error(e);
                }
            },
            _ = term.recv() => break 'session End::Error(CliError::Signal("SIGTERM", 128 + 15)),
            _ = hup.recv() => break 'session End::Error(CliError::Signal("SIGHUP", 128 + 1)),
        };
        (sink, stream) = ws.split();
        last_rx = Instant::now();
        let msgs = {
            let (r, replay) = link.reconnected();
            replay_messages(r, replay)
        };
        if let Err(end) = send_all(&mut sink, msgs).await {
            // Lost again at once: the next round tries again.
            stderr_lines.end_status();
            if resumable(&end) {
                continue 'session;
            }
            break 'session end;
        }
        // Connected to the relay: the session goes on once the agent's RESUME comes back (it
        // may itself be reconnecting, or gone for good: then the relay says so at the end of
        // its window).
        stderr_lines.status(
            "waiting",
            &format!("hatch: connection lost ({why}); connected again, waiting for the agent"),
        );
        resuming = true;
        // The window size again: full-screen programs redraw, as after a resize.
        if opts.interactive {
            size = terminal::size();
            if let Some((cols, rows)) = size
                && let Err(end) = send(&mut sink, Channel::Resize { cols, rows }.to_vec()).await
            {
                break 'session end;
            }
        }
    };
    // A status line still showing (the agent never answered) ends before the last words.
    stderr_lines.end_status();
    let _ = stdout.flush().await;
    (status, end)
}

type Sink = futures_util::stream::SplitSink<Ws, Message>;

/// The next delivery of an optional signal; never, without one.
async fn recv(sig: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn send(sink: &mut Sink, payload: Vec<u8>) -> Result<(), End> {
    send_msg(sink, Message::Binary(payload.into())).await
}

/// Sends input as DATA, counted in the window, with an acknowledgement of the output received
/// so far riding in the same write.
async fn send_data(sink: &mut Sink, link: &mut Link, bytes: &[u8]) -> Result<(), End> {
    let took = link.tx.push(bytes);
    debug_assert_eq!(took, bytes.len(), "stdin is read only while the window has room");
    let ack = link.rx.take_ack().map(|n| Channel::Ack(n).to_vec());
    send_all(sink, std::iter::once(Channel::Data(bytes).to_vec()).chain(ack)).await
}

/// Sends messages in one flush.
async fn send_all(sink: &mut Sink, msgs: impl IntoIterator<Item = Vec<u8>>) -> Result<(), End> {
    let all = async {
        for m in msgs {
            sink.feed(Message::Binary(m.into())).await?;
        }
        sink.flush().await
    };
    match timeout(SEND_TIMEOUT, all).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Lost(e.to_string())),
        Err(_) => {
            Err(End::Lost(format!("the relay took no data for {} s", SEND_TIMEOUT.as_secs())))
        }
    }
}

/// A RESUME and what follows it: the input again in DATA messages of at most a stdin chunk,
/// then the end of input (an empty DATA) if it must be sent again.
fn replay_messages(resume: Resume, replay: Replay<'_>) -> Vec<Vec<u8>> {
    hatch_proto::channel::replay_messages(resume, replay, STDIN_CHUNK, Channel::Data(&[]))
}

/// The agent's offsets cannot be right: close with [`close::RESUME_FAILED`].
async fn broken(sink: &mut Sink, e: OffsetError) -> End {
    let frame = tungstenite::protocol::CloseFrame {
        code: close::RESUME_FAILED.into(),
        reason: "resume failed".into(),
    };
    let _ = timeout(Duration::from_millis(500), sink.send(Message::Close(Some(frame)))).await;
    End::Broken(e)
}

/// Sleeps until `at`; forever without one.
async fn sleep_until_some(at: Option<std::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

async fn send_msg(sink: &mut Sink, msg: Message) -> Result<(), End> {
    match timeout(SEND_TIMEOUT, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(End::Lost(e.to_string())),
        Err(_) => {
            Err(End::Lost(format!("the relay took no data for {} s", SEND_TIMEOUT.as_secs())))
        }
    }
}

async fn write_out(stdout: &mut tokio::io::Stdout, data: &[u8]) -> std::io::Result<()> {
    stdout.write_all(data).await?;
    stdout.flush().await
}

async fn write_err(stderr: &mut tokio::io::Stderr, data: &[u8]) -> std::io::Result<()> {
    stderr.write_all(data).await?;
    stderr.flush().await
}

/// Reads stdin on its own thread (a blocking read cannot be cancelled; the thread ends with
/// the process). An empty chunk means end of input.
fn spawn_stdin_reader(tx: mpsc::Sender<std::io::Result<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => {
                    let _ = tx.blocking_send(Ok(Vec::new()));
                    return;
                }
                Ok(n) => {
                    if tx.blocking_send(Ok(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
}

/// Messages to stderr while the session runs: in raw mode a line needs `\r\n`.
struct LocalLines {
    raw: bool,
    /// stderr is a terminal: a status line is rewritten in place.
    tty: bool,
    /// A status line is showing (a terminal), or the status of this `kind` was printed (not a
    /// terminal: each kind once, as a line of its own, so that a log gets no control codes
    /// and no line per attempt).
    status: Option<&'static str>,
}

impl LocalLines {
    fn new(raw: bool) -> LocalLines {
        LocalLines { raw, tty: std::io::stderr().is_terminal(), status: None }
    }

    /// A status line of `kind` that the next one replaces (one line, however many attempts).
    fn status(&mut self, kind: &'static str, text: &str) {
        if self.tty {
            self.raw(&format!("\r{text}\x1b[K"));
        } else if self.status != Some(kind) {
            eprintln!("{text}");
        }
        self.status = Some(kind);
    }

    /// Ends a status line, if one is showing.
    fn end_status(&mut self) {
        if self.status.take().is_some() && self.tty {
            self.raw(if self.raw { "\r\n" } else { "\n" });
        }
    }

    fn line(&mut self, text: &str) {
        if self.raw {
            self.raw(&format!("\r\n{text}\r\n"));
        } else {
            eprintln!("{text}");
        }
    }

    fn raw(&mut self, text: &str) {
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(text.as_bytes());
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reconnect_window_is_the_relays_up_to_a_day() {
        assert_eq!(reconnect_window(None), Duration::ZERO);
        assert_eq!(reconnect_window(Some(600)), Duration::from_secs(600));
        assert_eq!(reconnect_window(Some(u64::MAX)), Duration::from_secs(86_400));
    }

    #[test]
    fn remote_status_to_exit_code() {
        for (status, code) in [(0, 0), (3, 3), (130, 130), (255, 255), (256, 255), (-1, 255)] {
            assert_eq!(exit_status_to_code(status), code, "{status}");
        }
    }
}
