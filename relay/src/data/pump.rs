//! A paired session's two pumps, one per direction, and the closing of a leg.
//!
//! A pump owns the reading side of its leg: it waits for readability, reads into a pooled
//! buffer, runs the [forward step](hatch_proto::forward::step) in place and writes the result
//! to the other leg, awaiting that write before it reads again — so a leg is never read while
//! its peer's writes are behind, and each direction holds at most one buffer in flight.
//!
//! A pump decides nothing about the session: it tells its [`Host`] (the shard, which feeds the
//! [session table](super::session)) what arrived and how its leg ended, and asks it whether the
//! session still lives. This module does not know the shard, so the two do not import each
//! other.

use std::rc::Rc;
use std::time::Duration;

use hatch_proto::close;
use hatch_proto::forward::{self, Deframer, Event, MAX_TAIL};
use hatch_proto::frame::{self, Masking, OpCode, ParseConfig};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::conn::Conn;
use super::io::Stream;
use super::metrics::ShardMetrics;
use super::record::{self, Recording};
use super::session::{CloseCode, Key, Leg, LegEnd};
use crate::recording::PushError;

/// How long a closing leg may take to send its close and FIN before its socket is shut down.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// How long a closing leg's close frame waits for a forwarded frame to that leg, half written
/// when the session ended, to complete (its sender wrote it whole and TCP split it, so the rest
/// is normally in flight already). After that the leg is closed without a close frame: one
/// inside the payload would corrupt it. Short, because a dripping sender would hold the close.
pub const FRAME_FINISH_WAIT: Duration = Duration::from_secs(1);

/// What a pump and a closer need from their shard.
pub trait Host: Clone + 'static {
    /// The shard's stream type.
    type S: Stream;
    /// The shard's counters.
    fn metrics(&self) -> &ShardMetrics;
    /// Largest frame payload a leg may send.
    fn max_payload(&self) -> u64;
    /// Whether the session still lives.
    fn live(&self, key: Key) -> bool;
    /// The session's id, for a log line (not kept in the pump: it costs memory per leg).
    fn sid(&self, key: Key) -> String;
    /// `payload` data bytes (perhaps none: control frames only) arrived on `leg` at `now`.
    fn bytes(&self, now: std::time::Instant, key: Key, leg: Leg, payload: u64);
    /// `leg` ended as `how`.
    fn leg_ended(&self, key: Key, leg: Leg, how: LegEnd);
    /// Shuts `conn`'s socket down at `at` (a hard deadline: pending operations complete).
    fn shutdown_at(&self, conn: &Rc<Conn<Self::S>>, at: Instant);
    /// The session's recording, if it is recorded (asked once per pump).
    fn recording(&self, key: Key) -> Option<Rc<Recording>>;
    /// The session's recording failed with `err`: the session must end (4018).
    fn recording_failed(&self, key: Key, err: &PushError);
}

/// A server close frame with `code` and its short description.
pub fn close_frame(code: CloseCode) -> Vec<u8> {
    let mut payload = Vec::with_capacity(64);
    frame::close_payload(code.get(), close::describe(code.get()), &mut payload);
    let mut h = [0u8; frame::MAX_HEADER_LEN];
    let n = frame::encode_header(true, OpCode::Close, payload.len() as u64, None, &mut h);
    let mut out = h[..n].to_vec();
    out.extend_from_slice(&payload);
    out
}

/// Starts both pumps of a freshly paired session.
pub fn start<H: Host>(host: &H, key: Key, client: Rc<Conn<H::S>>, agent: Rc<Conn<H::S>>) {
    for c in [&client, &agent] {
        // A readiness edge may have been consumed while the leg waited for its peer.
        c.read_now();
    }
    let (c, a) = (client.clone(), agent.clone());
    tokio::task::spawn_local(pump(host.clone(), key, c, a, Leg::Client));
    tokio::task::spawn_local(pump(host.clone(), key, agent, client, Leg::Agent));
}

/// One direction of a session: forwards from `a` to `b` until the session ends (ending it on
/// any failure of either leg), then reads `a` until its end. One async fn, not a loop inside a
/// wrapper: the task's size is the largest state of its future, and a wrapper would hold every
/// argument twice (it is two pumps per idle session; see the memory figures in ARCHITECTURE.md).
async fn pump<H: Host>(host: H, key: Key, a: Rc<Conn<H::S>>, b: Rc<Conn<H::S>>, from: Leg) {
    a.reading.set(true);
    let to = from.other();
    let metrics = host.metrics();
    let cfg = ParseConfig { max_payload: host.max_payload(), masking: Masking::Required };
    let mut st = Deframer::default();
    let mut carry = [0u8; MAX_TAIL];
    let mut clen = 0usize;
    let bytes_counter = if from == Leg::Client { &metrics.bytes_c2a } else { &metrics.bytes_a2c };
    // Recording off: `None`, and one branch per read and per step below.
    let rec = host.recording(key);
    let mut tap = rec.as_ref().map(|r| r.tap(from));
    'pump: loop {
        // A leg is not read while its record is behind: a slow disk slows the session.
        if let Some(r) = &rec {
            r.handle().ready().await;
        }
        let r = a.read_plain(&carry[..clen]).await;
        // After the end, only the rest of a frame that `b` is inside is forwarded, so that
        // `b`'s closer can still send its close frame (it waits a bounded time for this).
        let finishing = !host.live(key);
        if finishing && !b.mid_frame() {
            break 'pump;
        }
        let (mut buf, len) = match r {
            Ok(Some(x)) => x,
            Ok(None) => {
                debug!(session = %host.sid(key), leg = from.as_str(), "leg closed without a close frame");
                host.leg_ended(key, from, LegEnd::Lost);
                break 'pump;
            }
            Err(err) if err.peer_fault() => {
                warn!(session = %host.sid(key), leg = from.as_str(), %err, "leg refused: peer fault");
                host.leg_ended(key, from, LegEnd::PeerFault);
                break 'pump;
            }
            Err(err) => {
                debug!(session = %host.sid(key), leg = from.as_str(), %err, "leg read failed");
                host.leg_ended(key, from, LegEnd::Lost);
                break 'pump;
            }
        };
        // While finishing, the carry is empty (a frame's payload was being streamed) and what
        // follows the frame is dropped.
        let len = match st.frame_rest() {
            Some(rest) if finishing => len.min(clen + rest.min(len as u64) as usize),
            _ => len,
        };
        let now = Instant::now();
        let mut pos = 0;
        // Liveness goes to the table with the first step's payload, later payloads with theirs.
        let mut told = false;
        loop {
            let step = forward::step(&mut buf, pos, len, &mut st, &cfg);
            if !told || step.payload > 0 {
                told = true;
                host.bytes(now.into_std(), key, from, step.payload);
                ShardMetrics::add(bytes_counter, step.payload);
            }
            if step.frames > 0 {
                ShardMetrics::add(&metrics.frames, u64::from(step.frames));
            }
            if !step.out.is_empty() {
                if let (Some(r), Some(tap)) = (&rec, &mut tap) {
                    let out = &buf[step.out.clone()];
                    if let Err(err) = record::record(r, tap, from, out, now.into_std()).await {
                        host.recording_failed(key, &err);
                        break 'pump;
                    }
                }
                // Read → write handed to the other leg (the write's own wait is not counted).
                metrics.forward.record(now.elapsed());
                let (res, b2) = b.write_forwarded(buf, step.out.clone(), step.mid_frame).await;
                buf = b2;
                if let Err(err) = res {
                    debug!(session = %host.sid(key), leg = to.as_str(), %err, "leg write failed");
                    host.leg_ended(key, to, LegEnd::Lost);
                    break 'pump;
                }
                if !host.live(key) && !step.mid_frame {
                    break 'pump;
                }
            }
            pos = step.consumed;
            let Some(event) = step.event else { break };
            let how = match event {
                Event::Pong => continue,
                Event::Ping(r) => {
                    // Written now, or after the frame `a` is inside (see `Conn::send_pong`). A
                    // failed pong shows up as a failed read next.
                    let _ = a.send_pong(&buf[r]).await;
                    continue;
                }
                Event::Close(r) => match frame::parse_close_payload(&buf[r]) {
                    Ok(code) => {
                        let code = code.map_or(close::NORMAL, |(c, _)| c);
                        LegEnd::Closed(CloseCode::violation(code))
                    }
                    Err(err) => {
                        warn!(session = %host.sid(key), leg = from.as_str(), %err, "bad close frame");
                        LegEnd::BadClose(CloseCode::violation(err.close_code()))
                    }
                },
                // If the other leg was left inside a frame (the bad bytes were held back), it
                // gets no close frame: this pump gives that frame up as it returns, and the
                // closer then sends none.
                Event::Violation(code, err) => {
                    warn!(session = %host.sid(key), leg = from.as_str(), %err, "protocol violation");
                    LegEnd::Violation(CloseCode::violation(code))
                }
                Event::BadUtf8 => {
                    warn!(session = %host.sid(key), leg = from.as_str(), "text frame with invalid utf-8");
                    LegEnd::Violation(CloseCode::INVALID_PAYLOAD)
                }
                Event::BadFragment => {
                    warn!(session = %host.sid(key), leg = from.as_str(), "bad fragmentation");
                    LegEnd::Violation(CloseCode::PROTOCOL_ERROR)
                }
            };
            host.leg_ended(key, from, how);
            break 'pump;
        }
        clen = len - pos;
        carry[..clen].copy_from_slice(&buf[pos..len]);
    }
    // The recording is finished or suspended once both pumps let go of it.
    drop(rec);
    // A frame to `b` left half written will not be completed by anyone now.
    b.abandon_frame();
    drop(b);
    // The session has ended and its closer sent our close frame and FIN: read until the peer's
    // FIN (or the closer's hard deadline), so that closing never resets unread bytes.
    a.drain().await;
}

/// Closes one leg: the close frame (if any; only between frames, see [`FRAME_FINISH_WAIT`]),
/// TLS close_notify and FIN, then reads until the peer's FIN unless its pump does; a hard
/// deadline shuts the socket down regardless.
pub async fn close_leg<H: Host>(host: H, conn: Rc<Conn<H::S>>, code: Option<CloseCode>) {
    let linger = if conn.mid_frame() { FRAME_FINISH_WAIT + CLOSE_LINGER } else { CLOSE_LINGER };
    host.shutdown_at(&conn, Instant::now() + linger);
    match code {
        Some(code) => {
            if !conn.send_close(&close_frame(code), FRAME_FINISH_WAIT).await {
                debug!(
                    code = code.get(),
                    "leg closed without a close frame (inside a frame, or gone)"
                );
            }
        }
        // A leg that gets no close frame (it went away) needs no frame finished either.
        None => conn.abandon_frame(),
    }
    conn.finish().await;
    if !conn.reading.get() {
        conn.drain().await;
    }
}
