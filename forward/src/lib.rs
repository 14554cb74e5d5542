//! Port forwarding over one `hatch.v1` session: the pump both ends run.
//!
//! The session's DATA bytes are the mux byte stream of [`hatch_proto::mux`], with the
//! session's offsets, acknowledgements and window ([`hatch_proto::resume::Link`]). Each
//! forwarded connection is a stream with its own credit: a task per direction moves its bytes,
//! the pump's one loop does the rest (the leg, the frames, the credit, the ends), so every
//! rule lives in `Streams` and this file is plumbing.
//!
//! - **Bounded.** A connection's reader reads only what its stream's credit allows (a
//!   semaphore of credit bytes); the loop stops taking reads while [`OUT_HIGH`] mux bytes wait
//!   for the session's window. A writer holds at most a stream window, the peer's credit.
//! - **Deadlines.** Connects have [`CONNECT_TIMEOUT`], sends [`SEND_TIMEOUT`], and a leg that
//!   delivers nothing for `dead_after` (pings every `ping_interval` get answered by the relay)
//!   is lost.
//! - **Resumable.** A leg lost (or closed with 4009 or 4015) is replaced through
//!   [`Reattach`] when the caller gives one: the session's state (offsets, streams, the local
//!   connections) lives in the pump, not in the leg, so the streams go on where they were.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hatch_proto::channel::{self, Message};
use hatch_proto::close;
use hatch_proto::mux::{self, Decoder, Event, Side, Streams, code};
use hatch_proto::resume::{Deliver, Link, LinkConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::debug;

/// A destination connect that has not succeeded in this long fails as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A send the relay does not take in this long: the leg is lost.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Mux bytes waiting for the session's window past which connections are not read.
pub const OUT_HIGH: usize = 256 * 1024;
/// Mux bytes waiting for the session's window past which the peer is taken to be hostile:
/// what it makes this side answer (OPEN_FAIL, CREDIT, RESET) while it acknowledges nothing
/// could otherwise grow without end.
pub const OUT_LIMIT: usize = 4 * 1024 * 1024;
/// Largest DATA body the pump sends: what the agent's other messages carry, well inside the
/// legs' write buffers (a message over a leg's `max_write_buffer_size` is refused).
const CHUNK: usize = 16 * 1024;

/// A boxed byte source and sink: a TCP connection's halves, or stdin and stdout.
pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// See [`Reader`].
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// One local connection to carry (client side).
pub struct Conn {
    /// Where its bytes come from.
    pub read: Reader,
    /// Where the peer's bytes go.
    pub write: Writer,
    /// For messages: `127.0.0.1:50412`, `stdin`.
    pub label: String,
}

/// A connect to the destination (agent side): the connection, or a code and words.
pub type Dialed = Pin<Box<dyn Future<Output = Result<(Reader, Writer), (u16, String)>> + Send>>;

/// What this side does with streams.
pub enum Role {
    /// Connects each OPEN with `dial`.
    Agent {
        /// A new connection to the session's destination.
        dial: Arc<dyn Fn() -> Dialed + Send + Sync>,
    },
    /// Opens a stream for every connection that arrives on `conns`; once `conns` is closed and
    /// every stream has ended, the session ends (close 1000).
    Client {
        /// Local connections.
        conns: mpsc::Receiver<Conn>,
    },
}

/// Something a person should hear about (client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The peer reported an error in words (ERROR), e.g. before refusing the session.
    RemoteError {
        /// The ERROR code.
        code: u16,
        /// Its words.
        message: String,
    },
    /// The remote side could not connect the stream: its local connection was closed.
    OpenFailed {
        /// The local connection.
        label: String,
        /// [`hatch_proto::mux::code`].
        code: u16,
        /// The agent's words.
        why: String,
    },
    /// A stream was aborted.
    Reset {
        /// The local connection.
        label: String,
        /// [`hatch_proto::mux::code`].
        code: u16,
        /// Words.
        why: String,
    },
}

/// Timers and window.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// The session's window and acknowledgement rule.
    pub link: LinkConfig,
    /// How often to ping the relay.
    pub ping_interval: Duration,
    /// A leg silent this long is lost.
    pub dead_after: Duration,
}

/// How the pump ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The peer (or the relay) closed the leg with this code and reason.
    Closed(u16, String),
    /// This side ended the session: every local connection is done (client), or it was told
    /// to (`cancel`), with this code.
    Done(u16),
    /// The leg was lost (no close frame, silence, a failed send).
    Lost(String),
    /// The peer broke the protocol; the leg was closed with 1002.
    Bad(String),
    /// The offsets of the two sides do not fit (an acknowledgement beyond what was sent, a
    /// resume from bytes already dropped): the leg was closed with 4013.
    ResumeFailed(String),
    /// A leg was lost and no new one could be put up (the words of the last attempt).
    NotResumed(String),
}

enum ConnEvent {
    Connected(u32, Reader, Writer),
    ConnectFailed(u32, u16, String),
    Data(u32, Vec<u8>),
    Eof(u32),
    Written(u32, usize),
    Failed(u32, String),
}

enum ToWriter {
    Data(Bytes),
    Fin,
}

/// A stream's local side.
enum Local {
    /// Client: waiting for OPEN_OK.
    Opening(Conn),
    /// Agent: connecting; bytes that arrived meanwhile.
    Connecting(AbortHandle, Vec<Bytes>, bool),
    /// Moving bytes.
    Up {
        credit: Arc<Semaphore>,
        to_writer: mpsc::UnboundedSender<ToWriter>,
        reader: AbortHandle,
        writer: JoinHandle<()>,
    },
}

impl Local {
    fn abort(&self) {
        match self {
            Local::Opening(_) => {}
            Local::Connecting(h, ..) => h.abort(),
            Local::Up { reader, writer, .. } => {
                reader.abort();
                writer.abort();
            }
        }
    }
}

struct Entry {
    local: Local,
    label: String,
}

/// A new leg for a session whose leg was lost: the resume call and the dial. The pump sends
/// the RESUME and the replay on it.
pub trait Reattach<S>: Send {
    /// A new leg of the session after the last one was lost (`why`, in words), retrying as
    /// long as the session can still be resumed; `Err` (words) when it cannot any more.
    fn reattach<'a>(&'a mut self, why: &'a str) -> NewLeg<'a, S>;
}

/// What [`Reattach::reattach`] returns.
pub type NewLeg<'a, S> =
    Pin<Box<dyn Future<Output = Result<WebSocketStream<S>, String>> + Send + 'a>>;

/// Whether a leg's end calls for a new leg rather than the session's end: lost without a
/// close frame, or closed with a resumable code (the relay going down, the peer resuming).
pub fn resumable(end: &End) -> bool {
    match end {
        End::Lost(_) => true,
        End::Closed(code, _) => close::is_resumable(*code),
        _ => false,
    }
}

/// Runs a port session on `ws` until it ends; `cancel` ends it with the code it yields. When
/// a leg is lost and `legs` is given, the session goes on over the leg it puts up (RESUME, the
/// replay of what the peer has not acknowledged, then on); the local connections wait
/// meanwhile, their bytes held by their credit and the session's window.
pub async fn pump<S>(
    ws: WebSocketStream<S>,
    role: Role,
    cfg: Config,
    mut legs: Option<&mut dyn Reattach<S>>,
    cancel: impl Future<Output = (u16, String)>,
    mut note: impl FnMut(Note),
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut p = Pump::new(role, cfg);
    tokio::pin!(cancel);
    let mut ws = ws;
    let mut resumed = false;
    let end = loop {
        let end = p.leg(ws, resumed, cancel.as_mut(), &mut note).await;
        let Some(legs) = legs.as_deref_mut().filter(|_| resumable(&end)) else { break end };
        let why = match &end {
            End::Closed(code, _) => close::describe(*code).to_owned(),
            End::Lost(why) => why.clone(),
            _ => String::new(),
        };
        debug!(why = %why, "port session leg lost; putting up a new one");
        tokio::select! {
            leg = legs.reattach(&why) => match leg {
                Ok(w) => (ws, resumed) = (w, true),
                Err(e) => break End::NotResumed(e),
            },
            (c, _) = cancel.as_mut() => break End::Done(c),
        }
    };
    for e in p.conns.values() {
        e.local.abort();
    }
    // A clean end: what arrived before it is written out before the caller goes on (the
    // client's process exits next), within a bound; otherwise it is dropped with the session.
    p.draining.retain(|w| !w.is_finished());
    let clean = matches!(end, End::Done(close::NORMAL) | End::Closed(close::NORMAL, _));
    let aborts: Vec<AbortHandle> = p.draining.iter().map(JoinHandle::abort_handle).collect();
    if clean {
        let all = futures_util::future::join_all(p.draining.drain(..));
        if timeout(SEND_TIMEOUT, all).await.is_err() {
            debug!("local connections still writing after {} s; dropped", SEND_TIMEOUT.as_secs());
        }
    }
    aborts.iter().for_each(AbortHandle::abort);
    end
}

/// A port session's state, kept across legs.
struct Pump {
    role: Role,
    cfg: Config,
    side: Side,
    link: Link,
    dec: Decoder,
    streams: Streams,
    conns: HashMap<u32, Entry>,
    /// Writers of streams that ended cleanly, still writing what arrived before the end.
    draining: Vec<JoinHandle<()>>,
    ev_tx: mpsc::Sender<ConnEvent>,
    ev_rx: mpsc::Receiver<ConnEvent>,
    /// Mux bytes waiting for the session's window.
    out: Vec<u8>,
    accepting: bool,
}

impl Pump {
    fn new(role: Role, cfg: Config) -> Pump {
        let side = match role {
            Role::Agent { .. } => Side::Agent,
            Role::Client { .. } => Side::Client,
        };
        let (ev_tx, ev_rx) = mpsc::channel::<ConnEvent>(64);
        Pump {
            accepting: matches!(role, Role::Client { .. }),
            role,
            cfg,
            side,
            link: Link::new(cfg.link),
            dec: Decoder::new(),
            streams: Streams::new(side),
            conns: HashMap::new(),
            draining: Vec::new(),
            ev_tx,
            ev_rx,
            out: Vec::new(),
        }
    }

    /// Runs the session on one leg until the leg or the session ends; `resumed`: the leg
    /// replaces a lost one, so it starts with RESUME and the replay. Closes the leg unless it
    /// was lost.
    async fn leg<S>(
        &mut self,
        ws: WebSocketStream<S>,
        resumed: bool,
        mut cancel: Pin<&mut impl Future<Output = (u16, String)>>,
        note: &mut impl FnMut(Note),
    ) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let cfg = self.cfg;
        let (sink, mut stream) = ws.split();
        // The leg is written by its own future, so that a slow send never stops the reading:
        // both sides sending at once into full buffers would otherwise wait on each other for
        // ever. What it queues is bounded by the session's window (DATA) plus acknowledgements
        // and pings.
        let (wtx, wrx) = mpsc::unbounded_channel::<WsMessage>();
        let sending = std::sync::atomic::AtomicBool::new(false);
        let writer = write_leg(sink, wrx, &sending);
        tokio::pin!(writer);
        if resumed {
            let (resume, replay) = self.link.reconnected();
            for m in channel::replay_messages(resume, replay, CHUNK, Message::Data(&[])) {
                let _ = wtx.send(WsMessage::Binary(m.into()));
            }
        }
        let mut last_rx = Instant::now();
        let mut ping =
            tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
        let mut reason = String::from("done");

        let end = 'run: loop {
            // Mux bytes into DATA as far as the window allows, the acknowledgement riding along.
            let mut msgs: Vec<Vec<u8>> = Vec::new();
            let link = &mut self.link;
            while !self.out.is_empty() && link.tx.room() > 0 {
                let n = self.out.len().min(link.tx.room()).min(CHUNK);
                link.tx.push(&self.out[..n]);
                let mut m = Vec::with_capacity(1 + n);
                m.push(channel::TYPE_DATA);
                m.extend_from_slice(&self.out[..n]);
                self.out.drain(..n);
                msgs.push(m);
            }
            let now = Instant::now().into_std();
            let ack = if msgs.is_empty() { link.rx.poll_ack(now) } else { link.rx.take_ack() };
            msgs.extend(ack.map(|n| Message::Ack(n).to_vec()));
            for m in msgs {
                let _ = wtx.send(WsMessage::Binary(m.into()));
            }
            if self.side == Side::Client
                && !self.accepting
                && self.conns.is_empty()
                && self.out.is_empty()
                && link.tx.all_acked()
            {
                break 'run End::Done(close::NORMAL);
            }
            let ack_at = link.rx.poll_timeout();
            let take_reads = self.out.len() < OUT_HIGH;
            tokio::select! {
                msg = stream.next() => {
                    last_rx = Instant::now();
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => break 'run End::Lost(e.to_string()),
                        None => break 'run End::Lost("the connection ended without a close".into()),
                    };
                    let bytes = match msg {
                        WsMessage::Binary(b) => b,
                        WsMessage::Close(f) => {
                            let (c, r) = f.map(|f| (u16::from(f.code), f.reason.to_string()))
                                .unwrap_or((close::NORMAL, String::new()));
                            break 'run End::Closed(c, r);
                        }
                        WsMessage::Text(_) => break 'run End::Bad("text on the binary hatch.v1 channel".into()),
                        _ => continue,
                    };
                    if let Err(end) = self.on_message(&bytes, &wtx, note) {
                        break 'run end;
                    }
                }
                ev = self.ev_rx.recv(), if take_reads => {
                    let Some(ev) = ev else { continue };
                    on_conn_event(ev, &mut self.conns, &mut self.streams, &self.ev_tx, &mut self.out);
                }
                conn = recv_conn(&mut self.role), if self.accepting => match conn {
                    None => self.accepting = false,
                    Some(c) => match self.streams.open(&mut self.out) {
                        Some(id) => {
                            self.conns.insert(id, Entry { label: c.label.clone(), local: Local::Opening(c) });
                        }
                        None => note(Note::OpenFailed {
                            label: c.label,
                            code: code::TOO_MANY,
                            why: code::describe(code::TOO_MANY).into(),
                        }),
                    },
                },
                _ = ping.tick() => {
                    // A send still pending is a slow reader on the other side, not a dead leg.
                    let busy = sending.load(std::sync::atomic::Ordering::Relaxed);
                    if last_rx.elapsed() >= cfg.dead_after && !busy {
                        break 'run End::Lost(format!("the leg was silent for {:?}", cfg.dead_after));
                    }
                    let _ = wtx.send(WsMessage::Ping(Bytes::new()));
                }
                r = &mut writer => break 'run End::Lost(r.err().unwrap_or_else(|| "the leg's writer ended".into())),
                () = sleep_until_some(ack_at) => {}
                (c, why) = cancel.as_mut() => {
                    reason = why;
                    break 'run End::Done(c);
                }
            }
        };
        let close = match &end {
            End::Done(c) => Some((*c, reason.as_str())),
            End::Bad(why) => {
                debug!(error = %why, "bad mux stream");
                Some((close::PROTOCOL_ERROR, "bad port-forwarding stream"))
            }
            End::ResumeFailed(why) => {
                debug!(error = %why, "port session cannot resume");
                Some((close::RESUME_FAILED, "resume failed"))
            }
            // Tungstenite queued the answer to the peer's close; the writer flushes it.
            End::Closed(..) => None,
            End::Lost(_) | End::NotResumed(_) => return end,
        };
        if let Some((code, why)) = close {
            let frame = CloseFrame { code: code.into(), reason: why.to_owned().into() };
            let _ = wtx.send(WsMessage::Close(Some(frame)));
        } else {
            // A close after the peer's: tungstenite flushes its queued answer instead.
            let _ = wtx.send(WsMessage::Close(None));
        }
        drop(wtx);
        let _ = timeout(Duration::from_secs(2), &mut writer).await;
        end
    }

    /// One binary message from the peer; `Err` ends the leg.
    fn on_message(
        &mut self,
        bytes: &[u8],
        wtx: &mpsc::UnboundedSender<WsMessage>,
        note: &mut impl FnMut(Note),
    ) -> Result<(), End> {
        let now = Instant::now().into_std();
        match Message::decode(bytes) {
            Ok(Message::Data(d)) if !d.is_empty() => {
                // While this side waits for the peer's RESUME, the peer's DATA is dropped: the
                // peer sends it again after the RESUME.
                let Deliver::From(i) = self.link.on_data(now, d.len()) else { return Ok(()) };
                let frames = self.dec.feed(&d[i..]).map_err(|e| End::Bad(e.to_string()))?;
                for f in frames {
                    let ev = self
                        .streams
                        .on_frame(f, &mut self.out)
                        .map_err(|e| End::Bad(e.to_string()))?;
                    let (conns, draining) = (&mut self.conns, &mut self.draining);
                    on_event(ev, &mut self.role, conns, draining, &self.ev_tx, note);
                }
                if self.out.len() > OUT_LIMIT {
                    return Err(End::Bad(format!(
                        "{} bytes of answers wait for acknowledgements that do not come",
                        self.out.len()
                    )));
                }
            }
            Ok(Message::Ack(n)) => {
                self.link.on_ack(n).map_err(|e| End::ResumeFailed(e.to_string()))?;
            }
            Ok(Message::Resume(r)) => {
                let answer =
                    self.link.on_resume(r).map_err(|e| End::ResumeFailed(e.to_string()))?;
                if let Some((resume, replay)) = answer {
                    for m in channel::replay_messages(resume, replay, CHUNK, Message::Data(&[])) {
                        let _ = wtx.send(WsMessage::Binary(m.into()));
                    }
                }
            }
            Ok(Message::Error { code, message }) => {
                debug!(code, message = %hatch_proto::logtext::peer(message, 200), "peer reported an error");
                note(Note::RemoteError {
                    code,
                    message: hatch_proto::logtext::peer(message, 300).to_string(),
                });
            }
            Ok(_) => {}
            Err(e) => return Err(End::Bad(e.to_string())),
        }
        Ok(())
    }
}

/// Writes what `rx` brings to the leg, a batch per flush, until a close is sent or the queue
/// ends; an error or a send the relay does not take in [`SEND_TIMEOUT`] ends it.
async fn write_leg<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, WsMessage>,
    mut rx: mpsc::UnboundedReceiver<WsMessage>,
    sending: &std::sync::atomic::AtomicBool,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use std::sync::atomic::Ordering;
    while let Some(first) = rx.recv().await {
        sending.store(true, Ordering::Relaxed);
        let mut closing = matches!(first, WsMessage::Close(_));
        let sent = timeout(SEND_TIMEOUT, async {
            sink.feed(first).await?;
            while !closing && let Ok(m) = rx.try_recv() {
                closing = matches!(m, WsMessage::Close(_));
                sink.feed(m).await?;
            }
            sink.flush().await
        })
        .await;
        sending.store(false, Ordering::Relaxed);
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("sending: {e}")),
            Err(_) => {
                return Err(format!("the relay took no data for {} s", SEND_TIMEOUT.as_secs()));
            }
        }
        if closing {
            return Ok(());
        }
    }
    Ok(())
}

async fn recv_conn(role: &mut Role) -> Option<Conn> {
    match role {
        Role::Client { conns } => conns.recv().await,
        Role::Agent { .. } => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<std::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// What a frame from the peer means for the local connections.
fn on_event(
    ev: Event<'_>,
    role: &mut Role,
    conns: &mut HashMap<u32, Entry>,
    draining: &mut Vec<JoinHandle<()>>,
    ev_tx: &mpsc::Sender<ConnEvent>,
    note: &mut impl FnMut(Note),
) {
    match ev {
        Event::Open(id) => {
            let Role::Agent { dial } = role else { return };
            let connect = dial();
            let tx = ev_tx.clone();
            let h = tokio::spawn(async move {
                let ev = match timeout(CONNECT_TIMEOUT, connect).await {
                    Ok(Ok((r, w))) => ConnEvent::Connected(id, r, w),
                    Ok(Err((c, why))) => ConnEvent::ConnectFailed(id, c, why),
                    Err(_) => ConnEvent::ConnectFailed(
                        id,
                        code::UNREACHABLE,
                        format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
                    ),
                };
                let _ = tx.send(ev).await;
            });
            conns.insert(
                id,
                Entry {
                    label: format!("stream {id}"),
                    local: Local::Connecting(h.abort_handle(), Vec::new(), false),
                },
            );
        }
        Event::Opened(id) => {
            let Some(e) = conns.remove(&id) else { return };
            let local = match e.local {
                Local::Opening(c) => start(id, c.read, c.write, ev_tx, Vec::new(), false),
                other => other,
            };
            conns.insert(id, Entry { label: e.label, local });
        }
        Event::OpenFailed(id, c, why) => {
            if let Some(e) = conns.remove(&id) {
                note(Note::OpenFailed { label: e.label, code: c, why });
            }
        }
        Event::Data(id, b) => match conns.get_mut(&id).map(|e| &mut e.local) {
            Some(Local::Up { to_writer, .. }) => {
                let _ = to_writer.send(ToWriter::Data(Bytes::copy_from_slice(b)));
            }
            Some(Local::Connecting(_, early, _)) => early.push(Bytes::copy_from_slice(b)),
            _ => {}
        },
        Event::Credit(id, n) => {
            if let Some(Entry { local: Local::Up { credit, .. }, .. }) = conns.get(&id) {
                credit.add_permits(n as usize);
            }
        }
        Event::Fin(id) => match conns.get_mut(&id).map(|e| &mut e.local) {
            Some(Local::Up { to_writer, .. }) => {
                let _ = to_writer.send(ToWriter::Fin);
            }
            Some(Local::Connecting(_, _, fin)) => *fin = true,
            _ => {}
        },
        Event::Closed(id, why) => {
            let Some(e) = conns.remove(&id) else { return };
            match why {
                // Both sides sent FIN: the writer still writes what arrived, then shuts down
                // (it ends once the entry, and with it its queue, is gone).
                None => {
                    if let Local::Up { to_writer, writer, .. } = e.local {
                        let _ = to_writer.send(ToWriter::Fin);
                        if draining.len() >= 64 {
                            draining.retain(|w| !w.is_finished());
                        }
                        draining.push(writer);
                    }
                }
                Some((c, why)) => {
                    e.local.abort();
                    note(Note::Reset { label: e.label, code: c, why });
                }
            }
        }
        Event::None => {}
    }
}

/// What a local connection did.
fn on_conn_event(
    ev: ConnEvent,
    conns: &mut HashMap<u32, Entry>,
    streams: &mut Streams,
    ev_tx: &mpsc::Sender<ConnEvent>,
    out: &mut Vec<u8>,
) {
    match ev {
        ConnEvent::Connected(id, r, w) => {
            let Some(e) = conns.get_mut(&id) else { return };
            if !streams.is_live(id) {
                return;
            }
            let Local::Connecting(_, early, fin) = &mut e.local else { return };
            let (early, fin) = (std::mem::take(early), *fin);
            streams.opened(id, out);
            e.local = start(id, r, w, ev_tx, early, fin);
        }
        ConnEvent::ConnectFailed(id, c, why) => {
            conns.remove(&id);
            streams.refuse(id, c, &why, out);
        }
        ConnEvent::Data(id, b) => {
            // All of it (the reader reads within the credit), or nothing when the stream ended
            // while the read was on its way here (a RESET): those bytes have nowhere to go.
            let n = streams.send(id, &b, out);
            if n < b.len() && streams.is_live(id) {
                // Cannot happen (the reader's permits are the stream's credit); if it did,
                // dropping bytes silently would be worse than ending the stream.
                tracing::warn!(stream = id, "read beyond the stream's credit; resetting it");
                if let Some(e) = conns.remove(&id) {
                    e.local.abort();
                }
                streams.reset(id, code::FAILED, "internal error: credit", out);
            } else if n < b.len() {
                debug!(stream = id, bytes = b.len() - n, "bytes read after the stream ended");
            }
        }
        ConnEvent::Eof(id) => {
            if streams.finish(id, out) {
                conns.remove(&id);
            }
        }
        ConnEvent::Written(id, n) => streams.consumed(id, n, out),
        ConnEvent::Failed(id, why) => {
            if let Some(e) = conns.remove(&id) {
                e.local.abort();
            }
            streams.reset(id, code::FAILED, &why, out);
        }
    }
}

/// Starts moving a connected stream's bytes: a reader within its credit, a writer.
fn start(
    id: u32,
    mut read: Reader,
    mut write: Writer,
    ev_tx: &mpsc::Sender<ConnEvent>,
    early: Vec<Bytes>,
    fin: bool,
) -> Local {
    let credit = Arc::new(Semaphore::new(mux::STREAM_WINDOW as usize));
    let (to_writer, mut rx) = mpsc::unbounded_channel();
    for b in early {
        let _ = to_writer.send(ToWriter::Data(b));
    }
    if fin {
        let _ = to_writer.send(ToWriter::Fin);
    }
    let reader = {
        let (credit, tx) = (credit.clone(), ev_tx.clone());
        tokio::spawn(async move {
            loop {
                // Wait for at least one byte of credit, then take what else there is.
                let Ok(first) = credit.acquire().await else { return };
                first.forget();
                let extra = credit.available_permits().min(mux::MAX_DATA - 1);
                if let Ok(p) = credit.try_acquire_many(extra as u32) {
                    p.forget();
                }
                let want = 1 + extra;
                // Read straight into the buffer that travels (no copy out of a reused one),
                // and never past the credit: `limit` caps what the read may fill.
                let mut buf = Vec::with_capacity(want);
                let ev = match read.read_buf(&mut bytes::BufMut::limit(&mut buf, want)).await {
                    Ok(0) => ConnEvent::Eof(id),
                    Ok(n) => {
                        credit.add_permits(want - n);
                        ConnEvent::Data(id, buf)
                    }
                    Err(e) => ConnEvent::Failed(id, e.to_string()),
                };
                let last = !matches!(ev, ConnEvent::Data(..));
                if tx.send(ev).await.is_err() || last {
                    return;
                }
            }
        })
    };
    let writer = {
        let tx = ev_tx.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let r = match m {
                    ToWriter::Data(b) => match write.write_all(&b).await {
                        Ok(()) => write.flush().await.map(|()| Some(b.len())),
                        Err(e) => Err(e),
                    },
                    ToWriter::Fin => write.shutdown().await.map(|()| None),
                };
                let ev = match r {
                    Ok(Some(n)) => ConnEvent::Written(id, n),
                    Ok(None) => continue,
                    Err(e) => ConnEvent::Failed(id, e.to_string()),
                };
                let failed = matches!(ev, ConnEvent::Failed(..));
                if tx.send(ev).await.is_err() || failed {
                    return;
                }
            }
        })
    };
    Local::Up { credit, to_writer, reader: reader.abort_handle(), writer }
}
