//! Sessions: two legs paired on their owner shard, one pump per direction, and the end.
//!
//! A pump owns the reading side of its leg: it waits for readability, reads into a pooled
//! buffer, runs the [forward step](super::forward::step) in place and writes the result to the
//! other leg, awaiting that write before it reads again — so a leg is never read while its
//! peer's writes are behind, and each direction holds at most one buffer in flight.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use hatch_proto::close;
use hatch_proto::frame::{self, Masking, OpCode, ParseConfig};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::forward::{self, Deframer, Event, MAX_TAIL};
use super::io::Stream;
use super::metrics::ShardMetrics;
use super::shard::Shard;
use super::tls::Conn;
use crate::plane::CloseReason;

/// Index of the client leg.
pub const CLIENT: usize = 0;
/// Index of the agent leg.
pub const AGENT: usize = 1;

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// One leg (or none answered yet) is here, waiting for the other.
    Waiting,
    /// Both legs are here and forwarding.
    Paired,
    /// Reported and being closed.
    Ended,
}

/// One session on its owner shard.
pub struct Session<S> {
    /// Session id.
    pub sid: String,
    /// Key in the shard's slab.
    pub key: Cell<usize>,
    /// The legs, client then agent.
    pub legs: [RefCell<Option<Rc<Conn<S>>>>; 2],
    /// The leg was answered `101`.
    pub ready: [Cell<bool>; 2],
    /// Phase.
    pub phase: Cell<Phase>,
    /// When the first leg arrived.
    pub created: Instant,
    /// When the second leg arrived.
    pub paired: Cell<Option<Instant>>,
    /// Payload bytes read from each leg (client → agent, agent → client).
    pub bytes: [Cell<u64>; 2],
    /// `bytes` as last sent in a [`DataEvent::Progress`](crate::plane::DataEvent::Progress).
    pub reported: [Cell<u64>; 2],
    /// Last client → agent data (the idle timeout's clock).
    pub last_c2a: Cell<Instant>,
}

impl<S: Stream> Session<S> {
    /// A session with no leg yet.
    pub fn new(sid: String) -> Self {
        let now = Instant::now();
        Session {
            sid,
            key: Cell::new(usize::MAX),
            legs: [RefCell::new(None), RefCell::new(None)],
            ready: [Cell::new(false), Cell::new(false)],
            phase: Cell::new(Phase::Waiting),
            created: now,
            paired: Cell::new(None),
            bytes: [Cell::new(0), Cell::new(0)],
            reported: [Cell::new(0), Cell::new(0)],
            last_c2a: Cell::new(now),
        }
    }

    /// Whether the session has ended.
    pub fn ended(&self) -> bool {
        self.phase.get() == Phase::Ended
    }

    /// A leg, if present.
    pub fn leg(&self, i: usize) -> Option<Rc<Conn<S>>> {
        self.legs[i].borrow().clone()
    }
}

/// The reason recorded when leg `i` goes away first without a close frame.
pub fn gone_reason(i: usize) -> CloseReason {
    if i == CLIENT { CloseReason::ClientLost } else { CloseReason::AgentLost }
}

/// The reason recorded when leg `i` closes first with `code`: the agent's 1000 is the exit,
/// its 1008 and 1011 a session it refused or could not start (after an ERROR message).
pub fn closed_reason(i: usize, code: u16) -> CloseReason {
    match (i, code) {
        (CLIENT, _) => CloseReason::ClientClosed,
        (_, close::NORMAL) => CloseReason::Exit,
        (_, close::POLICY_VIOLATION | close::INTERNAL_ERROR) => CloseReason::Error,
        _ => CloseReason::AgentClosed,
    }
}

/// A server close frame with `code` and its short description.
pub fn close_frame(code: u16) -> Vec<u8> {
    let mut payload = Vec::with_capacity(64);
    frame::close_payload(code, close::describe(code), &mut payload);
    let mut h = [0u8; frame::MAX_HEADER_LEN];
    let n = frame::encode_header(true, OpCode::Close, payload.len() as u64, None, &mut h);
    let mut out = h[..n].to_vec();
    out.extend_from_slice(&payload);
    out
}

/// Starts both pumps of a freshly paired session.
pub fn start_pumps<S: Stream>(shard: &Rc<Shard<S>>, s: &Rc<Session<S>>) {
    let (Some(c), Some(a)) = (s.leg(CLIENT), s.leg(AGENT)) else { return };
    tokio::task::spawn_local(pump(shard.clone(), s.clone(), c.clone(), a.clone(), CLIENT));
    tokio::task::spawn_local(pump(shard.clone(), s.clone(), a, c, AGENT));
}

async fn pump<S: Stream>(
    shard: Rc<Shard<S>>,
    s: Rc<Session<S>>,
    a: Rc<Conn<S>>,
    b: Rc<Conn<S>>,
    from: usize,
) {
    a.reading.set(true);
    forward_loop(&shard, &s, &a, &b, from).await;
    // A frame to `b` left half written will not be completed by anyone now.
    b.abandon_frame();
    drop(b);
    // The session has ended and its closer sent our close frame and FIN: read until the peer's
    // FIN (or the closer's hard deadline), so that closing never resets unread bytes.
    drain(&shard, &a).await;
}

/// Reads and discards until the end of the stream or an error.
pub async fn drain<S: Stream>(shard: &Shard<S>, c: &Conn<S>) {
    while let Ok(Some((buf, _))) = c.read_plain(&[]).await {
        shard.pool.give(buf);
    }
}

/// Forwards from `a` to `b` until the session ends; ends it on any failure of either leg.
async fn forward_loop<S: Stream>(
    shard: &Rc<Shard<S>>,
    s: &Rc<Session<S>>,
    a: &Conn<S>,
    b: &Conn<S>,
    from: usize,
) {
    let to = 1 - from;
    let cfg = ParseConfig { max_payload: shard.cfg.max_payload, masking: Masking::Required };
    let mut st = Deframer::default();
    let mut carry = [0u8; MAX_TAIL];
    let mut clen = 0usize;
    let bytes_counter =
        if from == CLIENT { &shard.metrics.bytes_c2a } else { &shard.metrics.bytes_a2c };
    loop {
        let r = a.read_plain(&carry[..clen]).await;
        // After the end, only the rest of a frame that `b` is inside is forwarded, so that
        // `b`'s closer can still send its close frame (it waits a bounded time for this).
        let finishing = s.ended();
        if finishing && !b.mid_frame() {
            if let Ok(Some((buf, _))) = r {
                shard.pool.give(buf);
            }
            return;
        }
        let (mut buf, len) = match r {
            Ok(Some(x)) => x,
            Ok(None) => {
                debug!(session = %s.sid, leg = from, "leg closed without a close frame");
                shard.gone(s, from);
                return;
            }
            Err(err) => {
                debug!(session = %s.sid, leg = from, %err, "leg read failed");
                shard.gone(s, from);
                return;
            }
        };
        // While finishing, the carry is empty (a frame's payload was being streamed) and what
        // follows the frame is dropped.
        let len = match st.frame_rest() {
            Some(rest) if finishing => len.min(clen + rest.min(len as u64) as usize),
            _ => len,
        };
        let now = Instant::now();
        a.last_rx.set(now);
        a.pinged.set(false);
        let mut pos = 0;
        loop {
            let step = forward::step(&mut buf, pos, len, &mut st, &cfg);
            if step.payload > 0 {
                s.bytes[from].set(s.bytes[from].get() + step.payload);
                ShardMetrics::add(bytes_counter, step.payload);
                if from == CLIENT {
                    s.last_c2a.set(now);
                }
            }
            if step.frames > 0 {
                ShardMetrics::add(&shard.metrics.frames, u64::from(step.frames));
            }
            if !step.out.is_empty() {
                // Read → write handed to the other leg (the write's own wait is not counted).
                shard.metrics.forward.record(now.elapsed());
                let (res, b2) = b.write_forwarded(buf, step.out.clone(), step.mid_frame).await;
                buf = b2;
                if let Err(err) = res {
                    shard.pool.give(buf);
                    debug!(session = %s.sid, leg = to, %err, "leg write failed");
                    shard.gone(s, to);
                    return;
                }
                if s.ended() && !step.mid_frame {
                    shard.pool.give(buf);
                    return;
                }
            }
            pos = step.consumed;
            let Some(event) = step.event else { break };
            match event {
                Event::Pong => {}
                Event::Ping(r) => {
                    // Written now, or after the frame `a` is inside (see `Conn::send_pong`). A
                    // failed pong shows up as a failed read next.
                    let _ = a.send_pong(&buf[r]).await;
                }
                Event::Close(r) => {
                    let (reason, to_a, to_b) = match frame::parse_close_payload(&buf[r]) {
                        Ok(code) => {
                            let code = code.map_or(close::NORMAL, |(c, _)| c);
                            (closed_reason(from, code), code, code)
                        }
                        Err(err) => {
                            warn!(session = %s.sid, leg = from, %err, "bad close frame");
                            (CloseReason::Error, err.close_code(), close::PEER_GONE)
                        }
                    };
                    let mut codes = [None, None];
                    codes[from] = Some(to_a);
                    codes[to] = Some(to_b);
                    shard.pool.give(buf);
                    shard.end(s, reason, codes);
                    return;
                }
                Event::Violation(code, err) => {
                    warn!(session = %s.sid, leg = from, %err, "protocol violation");
                    return violation(shard, s, from, code, buf);
                }
                Event::BadUtf8 => {
                    warn!(session = %s.sid, leg = from, "text frame with invalid utf-8");
                    return violation(shard, s, from, close::INVALID_PAYLOAD, buf);
                }
                Event::BadFragment => {
                    warn!(session = %s.sid, leg = from, "bad fragmentation");
                    return violation(shard, s, from, close::PROTOCOL_ERROR, buf);
                }
            }
        }
        clen = len - pos;
        carry[..clen].copy_from_slice(&buf[pos..len]);
        shard.pool.give(buf);
    }
}

/// Ends the session for a violation on leg `from`. If the other leg was left inside a frame
/// (the bad bytes were held back), it gets no close frame: the pump gives that frame up as it
/// returns, and the closer then sends none.
fn violation<S: Stream>(
    shard: &Rc<Shard<S>>,
    s: &Rc<Session<S>>,
    from: usize,
    code: u16,
    buf: Vec<u8>,
) {
    shard.pool.give(buf);
    let mut codes = [Some(close::PEER_GONE), Some(close::PEER_GONE)];
    codes[from] = Some(code);
    shard.end(s, CloseReason::Error, codes);
}
