//! Port forwarding: many TCP connections in one session, sans-IO.
//!
//! A session of mode `port` carries no terminal: the DATA bytes of each direction are one
//! stream of mux frames. So a forwarded connection's bytes get the session's offsets,
//! acknowledgements, window and resumption for free ([`crate::resume`]), and a frame may be
//! split across DATA messages anywhere: [`Decoder`] takes the bytes as they come.
//!
//! ```text
//! +------+-----------+------------+------------------+
//! | kind | stream id | length     | body             |
//! | u8   | u32 BE    | u32 BE     | length bytes     |
//! +------+-----------+------------+------------------+
//! 0x01 OPEN       client → agent: connect to the session's destination; empty body
//! 0x02 OPEN_OK    agent → client: connected; empty body
//! 0x03 OPEN_FAIL  agent → client: u16 code, UTF-8 reason (the stream is gone)
//! 0x04 DATA       bytes of the connection, at most MAX_DATA
//! 0x05 CREDIT     u32: the sender may send this many more DATA bytes on the stream
//! 0x06 FIN        no more DATA from the sender on this stream (a TCP half-close); empty
//! 0x07 RESET      u16 code, UTF-8 reason: the stream is aborted both ways
//! ```
//!
//! **Flow control per stream.** Each side may send [`STREAM_WINDOW`] DATA bytes on a stream
//! before the first CREDIT; the receiver grants more as its side of the connection takes the
//! bytes. A receiver therefore never holds more than a window per stream, and one slow
//! connection stalls only itself: the session's channel keeps being read.
//!
//! **Ids.** Only the client opens streams; its ids start at 1 and strictly increase, so an id is
//! never reused and a frame for a stream that already ended (a RESET crossing DATA in flight)
//! is recognised and dropped. At most [`MAX_STREAMS`] are open at once.
//!
//! [`Streams`] is the whole rule for one side; it does no I/O and keeps no clock.

use std::collections::HashMap;

/// Bytes of a frame header.
pub const HEADER: usize = 9;
/// Largest DATA body.
pub const MAX_DATA: usize = 32 * 1024;
/// Largest body of any other frame (a reason text).
pub const MAX_CONTROL: usize = 1024;
/// DATA bytes a side may send on a stream before the peer's first CREDIT. 256 KiB keeps one
/// connection above 300 MB/s at a 0.5 ms round trip and bounds a stalled stream's buffer.
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// Streams open at once per session.
pub const MAX_STREAMS: usize = 1024;

/// Frame kind bytes.
pub mod kind {
    /// OPEN.
    pub const OPEN: u8 = 0x01;
    /// OPEN_OK.
    pub const OPEN_OK: u8 = 0x02;
    /// OPEN_FAIL.
    pub const OPEN_FAIL: u8 = 0x03;
    /// DATA.
    pub const DATA: u8 = 0x04;
    /// CREDIT.
    pub const CREDIT: u8 = 0x05;
    /// FIN.
    pub const FIN: u8 = 0x06;
    /// RESET.
    pub const RESET: u8 = 0x07;
}

/// Why a stream could not be opened or was aborted (OPEN_FAIL, RESET).
pub mod code {
    /// The destination refused the connection (nothing listens there).
    pub const REFUSED: u16 = 1;
    /// The agent's `--allow-forward` does not allow the destination.
    pub const NOT_ALLOWED: u16 = 2;
    /// The destination could not be reached in time (no route, timeout, DNS).
    pub const UNREACHABLE: u16 = 3;
    /// Too many streams open in the session.
    pub const TOO_MANY: u16 = 4;
    /// The connection failed (reset by the destination or the local side, an I/O error).
    pub const FAILED: u16 = 5;
    /// The peer broke the stream's rules (DATA beyond its credit).
    pub const PROTOCOL: u16 = 6;

    /// Words for a code, for people.
    pub fn describe(code: u16) -> &'static str {
        match code {
            REFUSED => "connection refused",
            NOT_ALLOWED => "destination not allowed by the agent",
            UNREACHABLE => "destination unreachable",
            TOO_MANY => "too many forwarded connections in this session",
            FAILED => "connection failed",
            PROTOCOL => "protocol error",
            _ => "unknown error",
        }
    }
}

/// One decoded frame. DATA borrows from the decoder's input and may be a part of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Connect a new stream.
    Open(u32),
    /// The stream is connected.
    OpenOk(u32),
    /// The stream could not be connected.
    OpenFail(u32, u16, String),
    /// Bytes of the stream (all or part of one DATA frame).
    Data(u32, &'a [u8]),
    /// More DATA bytes may be sent on the stream.
    Credit(u32, u32),
    /// The peer sends no more DATA on the stream.
    Fin(u32),
    /// The stream is aborted.
    Reset(u32, u16, String),
}

/// Why the mux byte stream cannot be read any further: the session ends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// An unknown frame kind.
    #[error("unknown mux frame kind {0:#04x}")]
    Kind(u8),
    /// A body longer than its kind allows, or of the wrong size.
    #[error("mux frame {kind:#04x} with a body of {len} bytes")]
    Length {
        /// The kind.
        kind: u8,
        /// The length it claimed.
        len: u32,
    },
    /// A reason that is not UTF-8.
    #[error("mux frame {0:#04x} with a reason that is not UTF-8")]
    Utf8(u8),
    /// Stream 0, or an OPEN whose id does not increase, or one from the agent.
    #[error("stream id {0} is not a new one")]
    Id(u32),
    /// A frame for a stream that was never opened.
    #[error("frame {kind:#04x} for stream {id}, which was never opened")]
    Unknown {
        /// The kind.
        kind: u8,
        /// The stream.
        id: u32,
    },
    /// A frame the receiving side never gets (OPEN at the client, OPEN_OK at the agent).
    #[error("frame {kind:#04x} is not for this side")]
    Direction {
        /// The kind.
        kind: u8,
    },
}

/// Whether a body length is right for a kind.
fn length_ok(kind: u8, len: u32) -> bool {
    let len = len as usize;
    match kind {
        kind::OPEN | kind::OPEN_OK | kind::FIN => len == 0,
        kind::CREDIT => len == 4,
        kind::OPEN_FAIL | kind::RESET => (2..=MAX_CONTROL).contains(&len),
        kind::DATA => len <= MAX_DATA,
        _ => false,
    }
}

/// Reads frames from the bytes of one direction as they arrive, in any pieces. Holds at most
/// a header and a control body ([`MAX_CONTROL`]); DATA is handed out where it lies.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Header bytes of the frame being read.
    head: Vec<u8>,
    /// Kind, id and body bytes still to come of the current frame, once its header is read.
    body: Option<(u8, u32, u32)>,
    /// A control frame's body so far.
    control: Vec<u8>,
}

impl Decoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Decodes what `input` completes: whole control frames, and DATA as far as it goes. An
    /// error ends the stream (nothing after it can be framed).
    pub fn feed<'a>(&mut self, mut input: &'a [u8]) -> Result<Vec<Frame<'a>>, MuxError> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let Some((k, id, rest)) = self.body else {
                let n = (HEADER - self.head.len()).min(input.len());
                self.head.extend_from_slice(&input[..n]);
                input = &input[n..];
                if self.head.len() < HEADER {
                    break;
                }
                let k = self.head[0];
                let id = u32::from_be_bytes(self.head[1..5].try_into().expect("4 bytes"));
                let len = u32::from_be_bytes(self.head[5..9].try_into().expect("4 bytes"));
                self.head.clear();
                if !(kind::OPEN..=kind::RESET).contains(&k) {
                    return Err(MuxError::Kind(k));
                }
                if !length_ok(k, len) {
                    return Err(MuxError::Length { kind: k, len });
                }
                if id == 0 {
                    return Err(MuxError::Id(0));
                }
                self.body = Some((k, id, len));
                if len == 0 && k == kind::DATA {
                    self.body = None;
                    out.push(Frame::Data(id, &[]));
                } else if len == 0 {
                    out.push(self.finish(k, id)?);
                }
                continue;
            };
            let n = (rest as usize).min(input.len());
            let (now, later) = input.split_at(n);
            input = later;
            let rest = rest - n as u32;
            self.body = Some((k, id, rest));
            if k == kind::DATA {
                out.push(Frame::Data(id, now));
                if rest == 0 {
                    self.body = None;
                }
            } else {
                self.control.extend_from_slice(now);
                if rest == 0 {
                    out.push(self.finish(k, id)?);
                }
            }
        }
        Ok(out)
    }

    /// The frame whose body is complete in `self.control`.
    fn finish(&mut self, k: u8, id: u32) -> Result<Frame<'static>, MuxError> {
        self.body = None;
        let body = std::mem::take(&mut self.control);
        let coded = |body: &[u8]| -> Result<(u16, String), MuxError> {
            let code = u16::from_be_bytes([body[0], body[1]]);
            let text = std::str::from_utf8(&body[2..]).map_err(|_| MuxError::Utf8(k))?;
            Ok((code, text.to_owned()))
        };
        Ok(match k {
            kind::OPEN => Frame::Open(id),
            kind::OPEN_OK => Frame::OpenOk(id),
            kind::FIN => Frame::Fin(id),
            kind::CREDIT => Frame::Credit(id, u32::from_be_bytes(body[..4].try_into().expect("4"))),
            kind::OPEN_FAIL => {
                let (c, t) = coded(&body)?;
                Frame::OpenFail(id, c, t)
            }
            kind::RESET => {
                let (c, t) = coded(&body)?;
                Frame::Reset(id, c, t)
            }
            // DATA never gets here; other kinds were refused with the header.
            other => return Err(MuxError::Kind(other)),
        })
    }
}

/// Appends the encoding of `frame` to `out`. A DATA body over [`MAX_DATA`] and a reason over
/// [`MAX_CONTROL`] - 2 bytes are the caller's bug; reasons are cut on a character boundary.
pub fn encode(frame: &Frame<'_>, out: &mut Vec<u8>) {
    let head = |out: &mut Vec<u8>, k: u8, id: u32, len: usize| {
        out.push(k);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
    };
    let coded = |out: &mut Vec<u8>, k: u8, id: u32, code: u16, text: &str| {
        let mut end = text.len().min(MAX_CONTROL - 2);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        head(out, k, id, 2 + end);
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(&text.as_bytes()[..end]);
    };
    match frame {
        Frame::Open(id) => head(out, kind::OPEN, *id, 0),
        Frame::OpenOk(id) => head(out, kind::OPEN_OK, *id, 0),
        Frame::Fin(id) => head(out, kind::FIN, *id, 0),
        Frame::Credit(id, n) => {
            head(out, kind::CREDIT, *id, 4);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Frame::Data(id, b) => {
            debug_assert!(b.len() <= MAX_DATA);
            head(out, kind::DATA, *id, b.len());
            out.extend_from_slice(b);
        }
        Frame::OpenFail(id, c, t) => coded(out, kind::OPEN_FAIL, *id, *c, t),
        Frame::Reset(id, c, t) => coded(out, kind::RESET, *id, *c, t),
    }
}

/// Which side of the session a [`Streams`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Opens streams (`hatch port-forward`, `hatch proxy`).
    Client,
    /// Connects them to the destination (the agent).
    Agent,
}

/// One live stream's accounting.
#[derive(Debug, Clone, Default)]
struct Stream {
    /// DATA bytes this side may still send.
    send_credit: u32,
    /// DATA bytes the peer may still send.
    recv_allowed: u32,
    /// Bytes received and taken by this side's connection, not yet granted back.
    consumed: u32,
    /// This side sent FIN.
    fin_sent: bool,
    /// The peer sent FIN.
    fin_received: bool,
}

/// What a received frame means for this side's connections.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// (agent) Connect stream `id` to the destination; answer with [`Streams::opened`] or
    /// [`Streams::refuse`].
    Open(u32),
    /// (client) Stream `id` is connected.
    Opened(u32),
    /// (client) Stream `id` could not be connected: its local connection is to be closed
    /// with these words.
    OpenFailed(u32, u16, String),
    /// Bytes for stream `id`'s connection; report what it took with [`Streams::consumed`].
    Data(u32, &'a [u8]),
    /// Stream `id` may send this many more bytes (credit arrived).
    Credit(u32, u32),
    /// The peer half-closed stream `id`: shut down the connection's write side.
    Fin(u32),
    /// Stream `id` is gone (reset by the peer, or both sides finished): close its connection.
    Closed(u32, Option<(u16, String)>),
    /// Nothing for the connection (a late frame for a stream that already ended).
    None,
}

/// The streams of one side of a port session: ids, credit both ways, half-closes. Frames to
/// send come back as encoded bytes for the caller to put into DATA.
#[derive(Debug)]
pub struct Streams {
    side: Side,
    live: HashMap<u32, Stream>,
    /// The highest id opened so far (ids at or below it that are not live have ended).
    last_id: u32,
}

impl Streams {
    /// No streams yet.
    pub fn new(side: Side) -> Self {
        Streams { side, live: HashMap::new(), last_id: 0 }
    }

    /// Whether stream `id` is open.
    pub fn is_live(&self, id: u32) -> bool {
        self.live.contains_key(&id)
    }

    /// Streams open.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// No stream is open.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// (client) Opens a new stream: its id, and the OPEN to send; `None` at [`MAX_STREAMS`].
    pub fn open(&mut self, out: &mut Vec<u8>) -> Option<u32> {
        debug_assert_eq!(self.side, Side::Client);
        if self.live.len() >= MAX_STREAMS {
            return None;
        }
        self.last_id = self.last_id.checked_add(1)?;
        let id = self.last_id;
        self.live.insert(id, Stream::fresh());
        encode(&Frame::Open(id), out);
        Some(id)
    }

    /// (agent) Stream `id` is connected: the OPEN_OK to send.
    pub fn opened(&mut self, id: u32, out: &mut Vec<u8>) {
        if self.live.contains_key(&id) {
            encode(&Frame::OpenOk(id), out);
        }
    }

    /// (agent) Stream `id` could not be connected: the OPEN_FAIL to send; the stream ends.
    pub fn refuse(&mut self, id: u32, code: u16, why: &str, out: &mut Vec<u8>) {
        if self.live.remove(&id).is_some() {
            encode(&Frame::OpenFail(id, code, why.to_owned()), out);
        }
    }

    /// How many DATA bytes stream `id` may send now (0 for a stream that ended or finished).
    pub fn credit(&self, id: u32) -> usize {
        self.live.get(&id).filter(|s| !s.fin_sent).map_or(0, |s| s.send_credit as usize)
    }

    /// Encodes `data` (at most [`Streams::credit`] and [`MAX_DATA`] bytes) as DATA of stream
    /// `id`; how many bytes it took (0 for a stream that is gone).
    pub fn send(&mut self, id: u32, data: &[u8], out: &mut Vec<u8>) -> usize {
        let Some(s) = self.live.get_mut(&id).filter(|s| !s.fin_sent) else { return 0 };
        let n = data.len().min(s.send_credit as usize).min(MAX_DATA);
        if n > 0 {
            s.send_credit -= n as u32;
            encode(&Frame::Data(id, &data[..n]), out);
        }
        n
    }

    /// This side's connection of stream `id` reached its end: the FIN to send. The stream ends
    /// once both sides have sent FIN.
    pub fn finish(&mut self, id: u32, out: &mut Vec<u8>) -> bool {
        let Some(s) = self.live.get_mut(&id).filter(|s| !s.fin_sent) else { return false };
        s.fin_sent = true;
        encode(&Frame::Fin(id), out);
        let done = s.fin_received;
        if done {
            self.live.remove(&id);
        }
        done
    }

    /// This side's connection of stream `id` failed: the RESET to send; the stream ends.
    pub fn reset(&mut self, id: u32, code: u16, why: &str, out: &mut Vec<u8>) {
        if self.live.remove(&id).is_some() {
            encode(&Frame::Reset(id, code, why.to_owned()), out);
        }
    }

    /// Stream `id`'s connection took `n` more received bytes: a CREDIT to send once half a
    /// window has been taken (so credit moves in few frames).
    pub fn consumed(&mut self, id: u32, n: usize, out: &mut Vec<u8>) {
        let Some(s) = self.live.get_mut(&id) else { return };
        s.consumed = s.consumed.saturating_add(n as u32);
        if s.consumed >= STREAM_WINDOW / 2 && !s.fin_received {
            let grant = s.consumed;
            s.consumed = 0;
            s.recv_allowed = s.recv_allowed.saturating_add(grant);
            encode(&Frame::Credit(id, grant), out);
        }
    }

    /// Applies one received frame. A frame for a stream that already ended is dropped
    /// ([`Event::None`]); one that breaks the rules of a live stream resets that stream (the
    /// RESET goes into `out`); one that cannot belong to this session is an error.
    pub fn on_frame<'a>(
        &mut self,
        frame: Frame<'a>,
        out: &mut Vec<u8>,
    ) -> Result<Event<'a>, MuxError> {
        let id = match &frame {
            Frame::Open(id)
            | Frame::OpenOk(id)
            | Frame::OpenFail(id, ..)
            | Frame::Data(id, _)
            | Frame::Credit(id, _)
            | Frame::Fin(id)
            | Frame::Reset(id, ..) => *id,
        };
        if let Frame::Open(_) = frame {
            if self.side != Side::Agent {
                return Err(MuxError::Direction { kind: kind::OPEN });
            }
            if id <= self.last_id {
                return Err(MuxError::Id(id));
            }
            self.last_id = id;
            if self.live.len() >= MAX_STREAMS {
                encode(
                    &Frame::OpenFail(id, code::TOO_MANY, code::describe(code::TOO_MANY).into()),
                    out,
                );
                return Ok(Event::None);
            }
            self.live.insert(id, Stream::fresh());
            return Ok(Event::Open(id));
        }
        if id > self.last_id {
            let k = match frame {
                Frame::Data(..) => kind::DATA,
                Frame::Credit(..) => kind::CREDIT,
                Frame::Fin(_) => kind::FIN,
                Frame::Reset(..) => kind::RESET,
                Frame::OpenOk(_) => kind::OPEN_OK,
                _ => kind::OPEN_FAIL,
            };
            return Err(MuxError::Unknown { kind: k, id });
        }
        let Some(s) = self.live.get_mut(&id) else { return Ok(Event::None) };
        Ok(match frame {
            Frame::OpenOk(_) | Frame::OpenFail(..) if self.side != Side::Client => {
                return Err(MuxError::Direction { kind: kind::OPEN_OK });
            }
            Frame::OpenOk(_) => Event::Opened(id),
            Frame::OpenFail(_, c, t) => {
                self.live.remove(&id);
                Event::OpenFailed(id, c, t)
            }
            Frame::Data(_, b) => {
                if s.fin_received || b.len() as u64 > u64::from(s.recv_allowed) {
                    let why = if s.fin_received { "DATA after FIN" } else { "DATA beyond credit" };
                    self.live.remove(&id);
                    encode(&Frame::Reset(id, code::PROTOCOL, why.into()), out);
                    return Ok(Event::Closed(id, Some((code::PROTOCOL, why.into()))));
                }
                s.recv_allowed -= b.len() as u32;
                Event::Data(id, b)
            }
            Frame::Credit(_, n) => {
                s.send_credit = s.send_credit.saturating_add(n);
                Event::Credit(id, n)
            }
            Frame::Fin(_) => {
                s.fin_received = true;
                if s.fin_sent {
                    self.live.remove(&id);
                    Event::Closed(id, None)
                } else {
                    Event::Fin(id)
                }
            }
            Frame::Reset(_, c, t) => {
                self.live.remove(&id);
                Event::Closed(id, Some((c, t)))
            }
            Frame::Open(_) => unreachable!("handled above"),
        })
    }
}

impl Stream {
    fn fresh() -> Self {
        Stream { send_credit: STREAM_WINDOW, recv_allowed: STREAM_WINDOW, ..Stream::default() }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn enc(f: &Frame<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        encode(f, &mut v);
        v
    }

    /// Every frame kind, byte for byte.
    #[test]
    fn golden_frames() {
        assert_eq!(enc(&Frame::Open(1)), [1, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(enc(&Frame::OpenOk(258)), [2, 0, 0, 1, 2, 0, 0, 0, 0]);
        assert_eq!(
            enc(&Frame::OpenFail(1, 1, "no".into())),
            [3, 0, 0, 0, 1, 0, 0, 0, 4, 0, 1, b'n', b'o']
        );
        assert_eq!(enc(&Frame::Data(7, b"hi")), [4, 0, 0, 0, 7, 0, 0, 0, 2, b'h', b'i']);
        assert_eq!(enc(&Frame::Credit(7, 65536)), [5, 0, 0, 0, 7, 0, 0, 0, 4, 0, 1, 0, 0]);
        assert_eq!(enc(&Frame::Fin(7)), [6, 0, 0, 0, 7, 0, 0, 0, 0]);
        assert_eq!(enc(&Frame::Reset(7, 5, "".into())), [7, 0, 0, 0, 7, 0, 0, 0, 2, 0, 5]);
    }

    #[test]
    fn bad_headers_are_errors_with_their_reason() {
        let feed = |b: &[u8]| Decoder::new().feed(b).map(|f| f.len());
        assert_eq!(feed(&[9, 0, 0, 0, 1, 0, 0, 0, 0]), Err(MuxError::Kind(9)));
        assert_eq!(feed(&[1, 0, 0, 0, 0, 0, 0, 0, 0]), Err(MuxError::Id(0)));
        assert_eq!(feed(&[1, 0, 0, 0, 1, 0, 0, 0, 1]), Err(MuxError::Length { kind: 1, len: 1 }));
        assert_eq!(
            feed(&[4, 0, 0, 0, 1, 0, 0, 0x80, 1]),
            Err(MuxError::Length { kind: 4, len: MAX_DATA as u32 + 1 })
        );
        assert_eq!(
            feed(&[7, 0, 0, 0, 1, 0, 0, 0, 1, 0]),
            Err(MuxError::Length { kind: 7, len: 1 })
        );
        assert_eq!(feed(&[7, 0, 0, 0, 1, 0, 0, 0, 3, 0, 1, 0xff]), Err(MuxError::Utf8(7)));
        // A header cut short is not an error: the rest may come.
        assert_eq!(feed(&[4, 0, 0]), Ok(0));
    }

    /// Credit: a sender stops at the window, CREDIT lets it go on, DATA beyond what was granted
    /// resets the stream; a late frame for an ended stream is dropped, an unopened id is an
    /// error.
    #[test]
    fn credit_half_close_and_late_frames() {
        let (mut c, mut a) = (Streams::new(Side::Client), Streams::new(Side::Agent));
        let mut wire = Vec::new();
        let id = c.open(&mut wire).unwrap();
        let mut dec = Decoder::new();
        let mut back = Vec::new();
        for f in dec.feed(&wire).unwrap() {
            assert_eq!(a.on_frame(f, &mut back).unwrap(), Event::Open(id));
        }
        a.opened(id, &mut back);
        let big = vec![7u8; STREAM_WINDOW as usize + 10];
        let mut sent = 0;
        let mut wire = Vec::new();
        while c.credit(id) > 0 {
            sent += c.send(id, &big[sent..], &mut wire);
        }
        assert_eq!(sent, STREAM_WINDOW as usize);
        let mut dec = Decoder::new();
        let frames = dec.feed(&wire).unwrap();
        let mut got = 0;
        for f in frames {
            if let Event::Data(_, b) = a.on_frame(f, &mut back).unwrap() {
                got += b.len();
            }
        }
        assert_eq!(got, STREAM_WINDOW as usize);
        // The agent's connection takes half: one CREDIT of half a window.
        let mut credit = Vec::new();
        a.consumed(id, STREAM_WINDOW as usize / 2, &mut credit);
        let mut cdec = Decoder::new();
        for f in cdec.feed(&credit).unwrap() {
            let half = STREAM_WINDOW / 2;
            assert_eq!(c.on_frame(f, &mut Vec::new()).unwrap(), Event::Credit(id, half));
        }
        assert_eq!(c.credit(id), STREAM_WINDOW as usize / 2);
        // DATA beyond what the agent granted: that stream is reset, the session goes on.
        let mut rst = Vec::new();
        for _ in 0..STREAM_WINDOW as usize / 2 / MAX_DATA {
            let ev = a.on_frame(Frame::Data(id, &big[..MAX_DATA]), &mut rst).unwrap();
            assert!(matches!(ev, Event::Data(..)), "{ev:?}");
        }
        let ev = a.on_frame(Frame::Data(id, b"!"), &mut rst).unwrap();
        assert!(matches!(ev, Event::Closed(i, Some((code::PROTOCOL, _))) if i == id), "{ev:?}");
        assert!(!rst.is_empty());
        // Late DATA for the ended stream is dropped; a never-opened id is an error.
        assert_eq!(a.on_frame(Frame::Data(id, b"x"), &mut rst).unwrap(), Event::None);
        assert!(a.on_frame(Frame::Data(id + 1, b"x"), &mut rst).is_err());
        // An OPEN that does not increase the id is an error; the client never gets OPEN.
        assert_eq!(a.on_frame(Frame::Open(id), &mut rst), Err(MuxError::Id(id)));
        assert!(c.on_frame(Frame::Open(9), &mut rst).is_err());
    }

    #[test]
    fn a_stream_ends_once_both_sides_sent_fin() {
        let (mut c, mut a) = (Streams::new(Side::Client), Streams::new(Side::Agent));
        let mut w = Vec::new();
        let id = c.open(&mut w).unwrap();
        a.on_frame(Frame::Open(id), &mut w).unwrap();
        assert!(!c.finish(id, &mut w));
        assert_eq!(a.on_frame(Frame::Fin(id), &mut w).unwrap(), Event::Fin(id));
        // After its own FIN a side sends no DATA, and may still receive.
        assert_eq!(c.send(id, b"x", &mut w), 0);
        assert_eq!(c.on_frame(Frame::Data(id, b"late"), &mut w).unwrap(), Event::Data(id, b"late"));
        assert!(a.finish(id, &mut w));
        assert_eq!(c.on_frame(Frame::Fin(id), &mut w).unwrap(), Event::Closed(id, None));
        assert!(a.is_empty() && c.is_empty());
    }

    #[test]
    fn opens_past_the_limit_are_refused_with_too_many() {
        let mut a = Streams::new(Side::Agent);
        let mut out = Vec::new();
        for id in 1..=MAX_STREAMS as u32 {
            assert_eq!(a.on_frame(Frame::Open(id), &mut out).unwrap(), Event::Open(id));
        }
        out.clear();
        assert_eq!(a.on_frame(Frame::Open(MAX_STREAMS as u32 + 1), &mut out).unwrap(), Event::None);
        let f = Decoder::new().feed(&out).unwrap();
        assert!(matches!(&f[..], [Frame::OpenFail(_, code::TOO_MANY, _)]), "{f:?}");
    }

    fn any_frame() -> impl Strategy<Value = (u8, u32, u32, u16, Vec<u8>, String)> {
        (
            0u8..7,
            1u32..,
            any::<u32>(),
            any::<u16>(),
            proptest::collection::vec(any::<u8>(), 0..100),
            ".{0,30}",
        )
    }

    fn frame_of<'a>(t: &'a (u8, u32, u32, u16, Vec<u8>, String)) -> Frame<'a> {
        let (k, id, n, c, b, s) = t;
        match k {
            0 => Frame::Open(*id),
            1 => Frame::OpenOk(*id),
            2 => Frame::OpenFail(*id, *c, s.clone()),
            3 => Frame::Data(*id, b),
            4 => Frame::Credit(*id, *n),
            5 => Frame::Fin(*id),
            _ => Frame::Reset(*id, *c, s.clone()),
        }
    }

    proptest! {
        /// Frames encoded back to back and fed in arbitrary pieces decode to the same frames
        /// (DATA possibly in parts whose concatenation is the body).
        #[test]
        fn frames_survive_any_split(frames in proptest::collection::vec(any_frame(), 1..20), cuts in proptest::collection::vec(0usize..50, 0..30)) {
            let want: Vec<Frame<'_>> = frames.iter().map(frame_of).collect();
            let mut wire = Vec::new();
            for f in &want {
                encode(f, &mut wire);
            }
            let mut dec = Decoder::new();
            let mut got: Vec<Frame<'static>> = Vec::new();
            let mut rest = &wire[..];
            for cut in cuts.iter().chain(std::iter::once(&usize::MAX)) {
                let n = (*cut).min(rest.len());
                let (now, later) = rest.split_at(n);
                rest = later;
                for f in dec.feed(now).unwrap() {
                    // Join DATA parts of one frame.
                    let join = joining(&want, &got);
                    match (f, got.last_mut()) {
                        (Frame::Data(id, b), Some(Frame::Data(lid, lb))) if *lid == id && join => {
                            let mut v = lb.to_vec();
                            v.extend_from_slice(b);
                            *lb = Box::leak(v.into_boxed_slice());
                        }
                        (Frame::Data(id, b), _) => got.push(Frame::Data(id, Box::leak(b.to_vec().into_boxed_slice()))),
                        (Frame::OpenFail(i, c, t), _) => got.push(Frame::OpenFail(i, c, t)),
                        (Frame::Reset(i, c, t), _) => got.push(Frame::Reset(i, c, t)),
                        (Frame::Open(i), _) => got.push(Frame::Open(i)),
                        (Frame::OpenOk(i), _) => got.push(Frame::OpenOk(i)),
                        (Frame::Credit(i, n), _) => got.push(Frame::Credit(i, n)),
                        (Frame::Fin(i), _) => got.push(Frame::Fin(i)),
                    }
                }
            }
            prop_assert_eq!(got, want);
        }

        /// Any bytes: frames or an error, never a panic.
        #[test]
        fn any_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Decoder::new().feed(&bytes);
        }
    }

    /// Whether the last frame decoded so far is a DATA frame not yet complete (its parts
    /// join), judged against the frames that were encoded.
    fn joining(want: &[Frame<'_>], got: &[Frame<'_>]) -> bool {
        let Some(last) = got.len().checked_sub(1) else { return false };
        match (want.get(last), got.last()) {
            (Some(Frame::Data(_, w)), Some(Frame::Data(_, g))) => g.len() < w.len(),
            _ => false,
        }
    }
}
