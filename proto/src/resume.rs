//! Byte offsets, flow control and resumption of a `hatch.v1` session, sans-IO.
//!
//! Every DATA byte has an offset per direction, counted from 0 at the session's start; the
//! direction's end (the empty DATA that ends the client's input, the EXIT that ends the agent's
//! output) takes one more. The receiver acknowledges the cumulative count it has delivered
//! (ACK, type 0x04), delayed so that keystroke traffic does not double its message count; the
//! sender keeps what is not yet acknowledged in a bounded replay buffer and never has more
//! than a window in flight.
//!
//! ```text
//!  sender:   [ acked ............ | unacknowledged (replay buffer, ≤ window) | end? ] sent
//!  receiver:  received ─ delivered to the terminal; ACK(received) when due
//! ```
//!
//! When a leg is replaced (the old one was lost), the side with the new leg sends
//! `RESUME { received, from: acked, reply: false }` and at once everything it holds; until
//! the peer's RESUME arrives it drops the peer's DATA and EXIT (what came before it on the
//! new leg may have a hole in front of it). A side that gets a RESUME that is not a reply
//! answers `RESUME { received, from, reply: true }` and sends again from the peer's
//! `received`: its own leg stayed, but what it sent while the peer was away may have been
//! lost. Each side drops what it has already received (the `from` of a RESUME says where the
//! DATA after it starts), so a byte is delivered once, in order, whichever legs broke.
//! [`Link`] is the whole rule; [`Sender`] and [`Receiver`] are its two halves.
//!
//! No sockets, no clock (times come in as arguments), no allocation while nothing is
//! unacknowledged (an idle session holds no buffer).

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Default bytes in flight per direction.
pub const DEFAULT_WINDOW: usize = 2 * 1024 * 1024;
/// Default: acknowledge once this many bytes are unacknowledged...
pub const DEFAULT_ACK_BYTES: u64 = 64 * 1024;
/// ... or this long after the first of them arrived, unless a message going the other way
/// carried the acknowledgement first. Long enough that typing at one key every two seconds
/// or faster never sends an acknowledgement of its own (each keystroke carries the one for
/// the echo before it; measured: 200 ms cost 22% more relay CPU per round trip at one key a
/// second, docs/BENCHMARKING.md); short enough that an idle session's replay buffer is
/// freed within seconds. Bulk output is acknowledged by the byte rule.
pub const DEFAULT_ACK_DELAY: Duration = Duration::from_secs(2);

/// Why an acknowledgement or a resume from the peer cannot be right. Either ends the session
/// with [`crate::close::RESUME_FAILED`]: the bytes cannot be delivered exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffsetError {
    /// The peer claims more bytes than were ever sent.
    #[error("the peer acknowledged {claimed} bytes, but only {sent} were sent")]
    BeyondSent {
        /// What the peer claims.
        claimed: u64,
        /// What was sent.
        sent: u64,
    },
    /// The peer asks for bytes from before what this side still holds (they were
    /// acknowledged and dropped): the gap cannot be replayed.
    #[error("the peer asks to resume at {from}, but bytes before {held_from} are gone")]
    Gap {
        /// Where the peer wants to resume.
        from: u64,
        /// The oldest byte still held.
        held_from: u64,
    },
    /// The peer's DATA resumes after bytes this side never received.
    #[error("the peer resumes sending at {from}, but only {received} bytes arrived")]
    Hole {
        /// Where the peer's DATA resumes.
        from: u64,
        /// What this side has received.
        received: u64,
    },
}

/// The sending half of one direction.
#[derive(Debug)]
pub struct Sender {
    window: usize,
    /// Offsets the peer has acknowledged (DATA bytes, and 1 for the end once it is).
    acked: u64,
    /// DATA bytes the peer has acknowledged: the offset of `unacked[0]`.
    data_acked: u64,
    unacked: VecDeque<u8>,
    /// The offsets of the unacknowledged bytes that were sent as STDERR, not DATA: sorted,
    /// disjoint, not adjacent, within the unacknowledged range. Empty (and unallocated) for a
    /// sender that never sends STDERR, so DATA-only traffic pays nothing. Each range costs
    /// [`MARK_COST`] bytes of the window, so the ranges' memory is bounded with the bytes'.
    stderr: VecDeque<Range<u64>>,
    /// The end was sent (no DATA after it).
    ended: bool,
}

/// What one STDERR range costs out of the window, in bytes (its own size): output that
/// alternates between stdout and stderr a byte at a time fills the window with ranges, not
/// with memory beyond it.
pub const MARK_COST: usize = std::mem::size_of::<Range<u64>>();

/// What must be sent again after a resume, in order: `data` (two slices of one ring), then the
/// end if `end`. The bytes inside `stderr` go as STDERR, the others as DATA ([`Replay::parts`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Replay<'a> {
    /// Bytes to send again (the caller cuts them into messages as it likes).
    pub data: (&'a [u8], &'a [u8]),
    /// The offset of the first byte of `data`.
    pub start: u64,
    /// The offsets among them that were sent as STDERR.
    pub stderr: &'a VecDeque<Range<u64>>,
    /// The end (empty DATA, EXIT) must be sent again after them.
    pub end: bool,
}

/// Which message a byte of output travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// DATA: stdout, or the terminal.
    Out,
    /// STDERR: the command's stderr when it has no terminal.
    Err,
}

impl<'a> Replay<'a> {
    /// Nothing to send again.
    pub fn is_empty(&self) -> bool {
        self.data.0.is_empty() && self.data.1.is_empty() && !self.end
    }

    /// The bytes to send again in order, cut where the stream changes, where the ring wraps
    /// and every `chunk` bytes (at least 1).
    pub fn parts(&self, chunk: usize) -> Vec<(Stream, &'a [u8])> {
        let chunk = chunk.max(1) as u64;
        let mut out = Vec::new();
        let mut at = self.start;
        let mut marks = self.stderr.iter().peekable();
        for mut rest in [self.data.0, self.data.1] {
            while !rest.is_empty() {
                while marks.peek().is_some_and(|r| r.end <= at) {
                    marks.next();
                }
                let (stream, run_end) = match marks.peek() {
                    Some(r) if r.start <= at => (Stream::Err, r.end),
                    Some(r) => (Stream::Out, r.start),
                    None => (Stream::Out, u64::MAX),
                };
                let n = (rest.len() as u64).min(run_end - at).min(chunk) as usize;
                out.push((stream, &rest[..n]));
                rest = &rest[n..];
                at += n as u64;
            }
        }
        out
    }
}

impl Sender {
    /// A sender that keeps at most `window` bytes unacknowledged (at least 1).
    pub fn new(window: usize) -> Self {
        Sender {
            window: window.max(1),
            acked: 0,
            data_acked: 0,
            unacked: VecDeque::new(),
            stderr: VecDeque::new(),
            ended: false,
        }
    }

    /// The offset of the next byte to send (bytes sent so far, with the end).
    pub fn sent(&self) -> u64 {
        // Saturating: an attach adopts the peer's offsets, which a hostile peer may put near
        // the top of the range; a wrong offset is then refused, never an overflow.
        self.data_acked
            .saturating_add(self.unacked.len() as u64)
            .saturating_add(u64::from(self.ended))
    }

    /// Offsets the peer has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Bytes held for replay.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// Everything sent, the end included if it was, is acknowledged.
    pub fn all_acked(&self) -> bool {
        self.acked == self.sent()
    }

    /// The end was sent.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// How many more bytes may be sent before an acknowledgement: when 0, stop reading the
    /// source (the PTY, stdin) until one arrives. 0 after the end.
    pub fn room(&self) -> usize {
        if self.ended {
            0
        } else {
            self.window.saturating_sub(self.unacked.len() + MARK_COST * self.stderr.len())
        }
    }

    /// Records the first `room()` bytes of `data` as sent (kept until acknowledged) and returns
    /// how many it took; the caller sends exactly those.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room());
        self.unacked.extend(&data[..n]);
        n
    }

    /// [`Sender::push`] for bytes sent as STDERR: they share the offsets (and the window) with
    /// DATA, and a replay sends them as STDERR again.
    pub fn push_stderr(&mut self, data: &[u8]) -> usize {
        let start = self.data_acked.saturating_add(self.unacked.len() as u64);
        let n = self.push(data);
        if n > 0 {
            let end = start + n as u64;
            match self.stderr.back_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => self.stderr.push_back(start..end),
            }
        }
        n
    }

    /// Records the end (empty DATA, EXIT) as sent: it takes one offset and is replayed like
    /// DATA until acknowledged. Once only; later calls change nothing.
    pub fn finish(&mut self) {
        self.ended = true;
    }

    /// The peer acknowledged `upto` offsets: the DATA below is dropped. An acknowledgement
    /// below an earlier one is stale (messages cross) and changes nothing.
    pub fn handle_ack(&mut self, upto: u64) -> Result<(), OffsetError> {
        let sent = self.sent();
        if upto > sent {
            return Err(OffsetError::BeyondSent { claimed: upto, sent });
        }
        if upto > self.acked {
            let data_sent = self.data_acked.saturating_add(self.unacked.len() as u64);
            let n = (upto.min(data_sent) - self.data_acked) as usize;
            self.unacked.drain(..n);
            self.data_acked += n as u64;
            self.acked = upto;
            while self.stderr.front().is_some_and(|r| r.end <= self.data_acked) {
                self.stderr.pop_front();
            }
            if let Some(first) = self.stderr.front_mut() {
                first.start = first.start.max(self.data_acked);
            }
            if self.unacked.is_empty() {
                // Give the memory back: an idle session holds no buffer.
                self.unacked = VecDeque::new();
                self.stderr = VecDeque::new();
            }
        }
        Ok(())
    }

    /// After a reconnect the peer has received `from` offsets: everything below is
    /// acknowledged, and the returned replay is what must be sent again.
    pub fn resume_from(&mut self, from: u64) -> Result<Replay<'_>, OffsetError> {
        if from < self.acked {
            return Err(OffsetError::Gap { from, held_from: self.acked });
        }
        self.handle_ack(from)?;
        Ok(self.replay())
    }

    /// Everything not yet acknowledged.
    fn replay(&self) -> Replay<'_> {
        Replay {
            data: self.unacked.as_slices(),
            start: self.data_acked,
            stderr: &self.stderr,
            end: self.ended && !self.all_acked(),
        }
    }
}

/// The receiving half of one direction: counts what was delivered, drops what arrives twice
/// after a resume, and decides when to acknowledge.
#[derive(Debug, Clone)]
pub struct Receiver {
    every: u64,
    delay: Duration,
    received: u64,
    /// The last offset acknowledged.
    acked: u64,
    /// When the first byte not yet acknowledged arrived.
    since: Option<Instant>,
    /// The end arrived: acknowledge at once (the peer waits for it to finish).
    urgent: bool,
    /// Offsets about to arrive that were received already (after a resume).
    skip: u64,
}

impl Receiver {
    /// Acknowledges once `every` bytes are unacknowledged or `delay` after the first of them.
    pub fn new(every: u64, delay: Duration) -> Self {
        Receiver {
            every: every.max(1),
            delay,
            received: 0,
            acked: 0,
            since: None,
            urgent: false,
            skip: 0,
        }
    }

    /// Offsets received (and delivered) so far: what a resume asks the peer to send from.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// A DATA body of `n` bytes arrived at `now`: returns how many of its first bytes were
    /// delivered before (after a resume) and must be dropped; the rest is new.
    pub fn handle_data(&mut self, now: Instant, n: usize) -> usize {
        let dup = self.skip.min(n as u64);
        self.skip -= dup;
        let new = n as u64 - dup;
        if new > 0 {
            self.received = self.received.saturating_add(new);
            self.since.get_or_insert(now);
        }
        dup as usize
    }

    /// How many of the first `n` bytes about to be delivered arrived before (after a resume),
    /// without counting anything: for a caller that delivers in parts and counts each part
    /// once it is delivered ([`Receiver::commit`]), so that a delivery cut short is neither
    /// lost nor doubled.
    pub fn dup_prefix(&self, n: usize) -> usize {
        self.skip.min(n as u64) as usize
    }

    /// `dup` bytes were dropped as arrived before, and `new` delivered, at `now`.
    pub fn commit(&mut self, now: Instant, dup: usize, new: usize) {
        self.skip -= (dup as u64).min(self.skip);
        if new > 0 {
            self.received = self.received.saturating_add(new as u64);
            self.since.get_or_insert(now);
        }
    }

    /// The peer's end arrived at `now`: true when it is new (deliver it), false when it is a
    /// replay of one delivered before.
    pub fn handle_end(&mut self, now: Instant) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        self.received = self.received.saturating_add(1);
        self.since.get_or_insert(now);
        self.urgent = true;
        true
    }

    /// The peer's DATA after its RESUME starts at offset `from`.
    pub fn resume_at(&mut self, from: u64) -> Result<(), OffsetError> {
        if from > self.received {
            return Err(OffsetError::Hole { from, received: self.received });
        }
        self.skip = self.received - from;
        Ok(())
    }

    /// The acknowledgement to send now, if one is due.
    pub fn poll_ack(&mut self, now: Instant) -> Option<u64> {
        let due = self.urgent
            || self.received - self.acked >= self.every
            || self.since.is_some_and(|t| now >= t + self.delay);
        if due { self.take_ack() } else { None }
    }

    /// An acknowledgement of everything received, if anything is unacknowledged: for a caller
    /// that is sending a message anyway (piggybacking) or resuming.
    pub fn take_ack(&mut self) -> Option<u64> {
        self.urgent = false;
        if self.received == self.acked {
            return None;
        }
        self.acked = self.received;
        self.since = None;
        Some(self.received)
    }

    /// When [`Receiver::poll_ack`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.since.map(|t| t + self.delay)
    }
}

/// A RESUME message's fields ([`crate::channel::Message::Resume`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Offsets the sender of the RESUME has received.
    pub received: u64,
    /// Offset of the first DATA byte after the RESUME.
    pub from: u64,
    /// It answers a RESUME.
    pub reply: bool,
    /// Sent by a client with no state (a new process attaching): `received` and `from` mean
    /// nothing; the answer sets both sides' offsets.
    pub fresh: bool,
}

/// What a message from the peer means for the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Deliver {
    /// Deliver the body from this index on (what is before it arrived before).
    From(usize),
    /// Drop the message: this side is waiting for the peer's RESUME.
    Drop,
}

/// Both directions of one endpoint (the client's or the agent's), with the resume rule.
#[derive(Debug)]
pub struct Link {
    /// What this side sends.
    pub tx: Sender,
    /// What this side receives.
    pub rx: Receiver,
    /// This side put up a new leg and has not yet seen the peer's RESUME on it.
    awaiting: bool,
    /// This side attached with no state ([`Link::attach`]) and waits for the offsets.
    fresh: bool,
}

/// Window and acknowledgement rule of a [`Link`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// Bytes in flight per direction at most.
    pub window: usize,
    /// Acknowledge at once when this many bytes are unacknowledged.
    pub ack_bytes: u64,
    /// ... or this long after the first of them.
    pub ack_delay: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            window: DEFAULT_WINDOW,
            ack_bytes: DEFAULT_ACK_BYTES,
            ack_delay: DEFAULT_ACK_DELAY,
        }
    }
}

impl Link {
    /// A link at offset 0 both ways.
    pub fn new(cfg: LinkConfig) -> Self {
        Link {
            tx: Sender::new(cfg.window),
            rx: Receiver::new(cfg.ack_bytes, cfg.ack_delay),
            awaiting: false,
            fresh: false,
        }
    }

    /// This side's leg was replaced: send the returned RESUME, then the replay, then go on.
    /// The peer's DATA and EXIT are dropped until its RESUME arrives.
    pub fn reconnected(&mut self) -> (Resume, Replay<'_>) {
        self.awaiting = true;
        // The RESUME carries the acknowledgement.
        let _ = self.rx.take_ack();
        let resume = Resume {
            received: self.rx.received(),
            from: self.tx.acked(),
            reply: false,
            fresh: false,
        };
        (resume, self.tx.replay())
    }

    /// A link for a client attaching from a new process, with nothing received and nothing to
    /// send again: send the returned RESUME and nothing else until the answer, which says
    /// where both directions stand ([`Link::on_resume`] adopts it).
    pub fn attach(cfg: LinkConfig) -> (Link, Resume) {
        let mut link = Link::new(cfg);
        link.awaiting = true;
        link.fresh = true;
        (link, Resume { received: 0, from: 0, reply: false, fresh: true })
    }

    /// This side attached fresh and has not yet had the answer: send nothing.
    pub fn holding(&self) -> bool {
        self.fresh
    }

    /// This side waits for the peer's RESUME.
    pub fn awaiting(&self) -> bool {
        self.awaiting
    }

    /// A DATA body of `n` bytes arrived.
    pub fn on_data(&mut self, now: Instant, n: usize) -> Deliver {
        if self.awaiting {
            return Deliver::Drop;
        }
        Deliver::From(self.rx.handle_data(now, n))
    }

    /// How many of the first `n` bytes of a DATA body arrived before, counting nothing yet
    /// ([`Receiver::dup_prefix`]); `None` while this side waits for the peer's RESUME.
    pub fn peek_data(&self, n: usize) -> Option<usize> {
        (!self.awaiting).then(|| self.rx.dup_prefix(n))
    }

    /// The peer's end (empty DATA, EXIT) arrived: true to deliver it.
    pub fn on_end(&mut self, now: Instant) -> bool {
        !self.awaiting && self.rx.handle_end(now)
    }

    /// An ACK arrived.
    pub fn on_ack(&mut self, upto: u64) -> Result<(), OffsetError> {
        self.tx.handle_ack(upto)
    }

    /// A RESUME arrived. Returns the RESUME to answer with and what to send again after it,
    /// when the peer asked for an answer.
    pub fn on_resume(&mut self, peer: Resume) -> Result<Option<(Resume, Replay<'_>)>, OffsetError> {
        if self.fresh && !peer.reply {
            // The agent's own RESUME (its leg was replaced too): this side has nothing to
            // answer with; the answer to this side's RESUME sets the offsets.
            return Ok(None);
        }
        if self.fresh {
            // The answer to an attach: the peer's output continues at `from`, and it has
            // received `received` of this direction (from the client before this one).
            self.fresh = false;
            self.awaiting = false;
            self.rx.received = peer.from;
            self.rx.acked = peer.from;
            self.tx.acked = peer.received;
            self.tx.data_acked = peer.received;
            return Ok(None);
        }
        if peer.fresh {
            // A new client with nothing: everything still held goes to it, and its input
            // continues this side's count.
            self.awaiting = false;
            let _ = self.rx.take_ack();
            let received = self.rx.received();
            self.rx.skip = 0;
            let held = self.tx.acked();
            let replay = self.tx.resume_from(held)?;
            let answer = Resume { received, from: held, reply: true, fresh: false };
            return Ok(Some((answer, replay)));
        }
        self.rx.resume_at(peer.from)?;
        self.awaiting = false;
        if peer.reply {
            // The answer to this side's RESUME, which carried everything this side holds. Its
            // `received` may be below an acknowledgement the peer sent after it (both are
            // cumulative): that is stale, not a gap.
            return self.tx.handle_ack(peer.received).map(|()| None);
        }
        // The peer replaced its leg: what this side sent meanwhile may be lost, and so may what
        // it sent with its own RESUME if it replaced its leg too. Send again from what the
        // peer has; it drops what it already got.
        let _ = self.rx.take_ack();
        let received = self.rx.received();
        let replay = self.tx.resume_from(peer.received)?;
        Ok(Some((Resume { received, from: peer.received, reply: true, fresh: false }, replay)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_sender_keeps_what_is_unacknowledged_within_its_window_and_frees_it() {
        let mut s = Sender::new(10);
        assert_eq!(s.push(b"hello"), 5);
        assert_eq!(s.push(b"world!!"), 5);
        assert_eq!((s.sent(), s.room()), (10, 0));
        assert_eq!(s.handle_ack(3), Ok(()));
        assert_eq!((s.acked(), s.unacked(), s.room()), (3, 7, 3));
        // A stale acknowledgement changes nothing; one beyond what was sent is refused.
        assert_eq!(s.handle_ack(1), Ok(()));
        assert_eq!(s.acked(), 3);
        assert_eq!(s.handle_ack(11), Err(OffsetError::BeyondSent { claimed: 11, sent: 10 }));
        assert_eq!(s.handle_ack(10), Ok(()));
        assert_eq!((s.unacked(), s.unacked.capacity()), (0, 0));
    }

    #[test]
    fn resume_replays_from_the_peers_offset_or_names_the_gap() {
        let mut s = Sender::new(100);
        s.push(b"0123456789");
        s.handle_ack(4).unwrap();
        let r = s.resume_from(6).unwrap();
        assert!(!r.end);
        assert_eq!([r.data.0, r.data.1].concat(), b"6789");
        assert_eq!(s.resume_from(5), Err(OffsetError::Gap { from: 5, held_from: 6 }));
        assert_eq!(s.resume_from(12), Err(OffsetError::BeyondSent { claimed: 12, sent: 10 }));
    }

    #[test]
    fn a_receiver_acknowledges_after_enough_bytes_or_after_the_delay() {
        let t0 = Instant::now();
        let mut r = Receiver::new(100, Duration::from_millis(200));
        assert_eq!((r.poll_ack(t0), r.poll_timeout()), (None, None));
        r.handle_data(t0, 10);
        assert_eq!(r.poll_timeout(), Some(t0 + Duration::from_millis(200)));
        assert_eq!(r.poll_ack(t0 + Duration::from_millis(199)), None);
        assert_eq!(r.poll_ack(t0 + Duration::from_millis(200)), Some(10));
        assert_eq!(r.poll_timeout(), None);
        r.handle_data(t0 + Duration::from_millis(300), 95);
        r.handle_data(t0 + Duration::from_millis(301), 5);
        assert_eq!(r.poll_ack(t0 + Duration::from_millis(301)), Some(110));
        assert_eq!(r.take_ack(), None);
    }

    /// One direction over a connection that breaks at arbitrary points: the writer pushes
    /// what its window allows, the link delivers a prefix of what was sent and loses the rest,
    /// acknowledgements come when the receiver says, and after each break the sender resumes
    /// from the receiver's offset. The receiver must see exactly the bytes written, in order.
    fn lossy_link(data: &[u8], window: usize, cuts: &[(usize, bool)]) -> Vec<u8> {
        let t0 = Instant::now();
        let mut s = Sender::new(window);
        let mut r = Receiver::new(7, Duration::from_millis(5));
        let mut got = Vec::new();
        let mut written = 0;
        let mut in_flight: VecDeque<u8> = VecDeque::new();
        let mut step = 0u32;
        // Enough steps for the slowest case: a window of one byte, so every byte waits for its
        // acknowledgement (at most 6 steps: the 5 ms delay), and one delivering step per cycle.
        let steps = (data.len() + 1) * 8 * cuts.len() + 64;
        for &(deliver, cut) in cuts.iter().cycle().take(steps) {
            step += 1;
            let now = t0 + Duration::from_millis(u64::from(step));
            let n = s.push(&data[written..]);
            in_flight.extend(&data[written..written + n]);
            written += n;
            let k = deliver.min(in_flight.len());
            let chunk: Vec<u8> = in_flight.drain(..k).collect();
            r.handle_data(now, chunk.len());
            got.extend(chunk);
            if cut {
                // The connection breaks: what was in flight is lost; the sender replays.
                in_flight.clear();
                let r = s.resume_from(r.received()).expect("no gap: only acked bytes dropped");
                in_flight.extend(r.data.0);
                in_flight.extend(r.data.1);
            } else if let Some(ack) = r.poll_ack(now) {
                s.handle_ack(ack).expect("acks only what was received");
            }
            assert!(s.unacked() <= window);
            if got.len() == data.len() {
                break;
            }
        }
        got
    }

    #[test]
    fn the_end_takes_one_offset_and_is_replayed_until_acknowledged() {
        let mut s = Sender::new(100);
        s.push(b"abc");
        s.finish();
        assert_eq!((s.sent(), s.room(), s.push(b"x")), (4, 0, 0));
        s.handle_ack(3).unwrap();
        assert!(!s.all_acked());
        let r = s.resume_from(3).unwrap();
        assert_eq!((r.data, r.end), ((&[][..], &[][..]), true));
        s.handle_ack(4).unwrap();
        assert!(s.all_acked());
        assert!(s.resume_from(4).unwrap().is_empty());
    }

    #[test]
    fn a_receiver_drops_what_a_resume_sends_twice_and_acks_an_end_at_once() {
        let t0 = Instant::now();
        let mut r = Receiver::new(1000, Duration::from_secs(1));
        assert_eq!(r.handle_data(t0, 10), 0);
        r.resume_at(4).unwrap();
        // Offsets 4..10 come again, then 10..12 are new.
        assert_eq!(r.handle_data(t0, 5), 5);
        assert_eq!(r.handle_data(t0, 3), 1);
        assert_eq!(r.received(), 12);
        assert_eq!(r.resume_at(13), Err(OffsetError::Hole { from: 13, received: 12 }));
        assert_eq!(r.poll_ack(t0), None);
        assert!(r.handle_end(t0));
        assert_eq!(r.poll_ack(t0), Some(13));
        r.resume_at(12).unwrap();
        assert!(!r.handle_end(t0), "a replayed end is not delivered twice");
    }

    #[test]
    fn a_resume_is_answered_once_and_the_answer_is_not() {
        let t0 = Instant::now();
        let mut a = Link::new(LinkConfig::default());
        let mut b = Link::new(LinkConfig::default());
        a.tx.push(b"hello");
        assert_eq!(b.on_data(t0, 5), Deliver::From(0));
        // A's leg is replaced: it resumes, and drops B's messages until B's RESUME.
        let (ra, replay) = a.reconnected();
        assert_eq!(ra, Resume { received: 0, from: 0, reply: false, fresh: false });
        assert_eq!([replay.data.0, replay.data.1].concat(), b"hello");
        assert!(a.awaiting());
        assert_eq!(a.on_data(t0, 3), Deliver::Drop);
        b.tx.push(b"xyz");
        let (rb, replay) = b.on_resume(ra).unwrap().expect("answered");
        assert_eq!(rb, Resume { received: 5, from: 0, reply: true, fresh: false });
        assert_eq!([replay.data.0, replay.data.1].concat(), b"xyz");
        // B drops the five bytes that A sent again.
        assert_eq!(b.on_data(t0, 5), Deliver::From(5));
        assert_eq!(a.on_resume(rb).unwrap(), None);
        assert!(!a.awaiting());
        assert_eq!(a.tx.acked(), 5);
        assert_eq!(a.on_data(t0, 3), Deliver::From(0));
        assert_eq!(a.rx.received(), 3);
    }

    #[test]
    fn a_fresh_client_gets_what_the_agent_holds_and_carries_on_its_counts() {
        let t0 = Instant::now();
        let (mut agent, mut old) =
            (Link::new(LinkConfig::default()), Link::new(LinkConfig::default()));
        // The old client typed 4 bytes and acknowledged 3 of the agent's 10.
        old.tx.push(b"ls\r\n");
        assert_eq!(agent.on_data(t0, 4), Deliver::From(0));
        agent.tx.push(b"0123456789");
        agent.on_ack(3).unwrap();
        // A new process attaches with nothing.
        let (mut new, hello) = Link::attach(LinkConfig::default());
        assert!(new.holding() && hello.fresh);
        let (answer, replay) = agent.on_resume(hello).unwrap().expect("answered");
        assert_eq!(answer, Resume { received: 4, from: 3, reply: true, fresh: false });
        assert_eq!([replay.data.0, replay.data.1].concat(), b"3456789");
        assert_eq!(new.on_resume(answer).unwrap(), None);
        assert!(!new.holding());
        assert_eq!(new.on_data(t0, 7), Deliver::From(0));
        assert_eq!(new.rx.received(), 10);
        // Its acknowledgement and its input continue the agent's counts.
        agent.on_ack(new.rx.take_ack().unwrap()).unwrap();
        assert!(agent.tx.all_acked());
        new.tx.push(b"x");
        assert_eq!(new.tx.sent(), 5);
        assert_eq!(agent.on_data(t0, 1), Deliver::From(0));
        if let Some(n) = agent.rx.take_ack() {
            new.on_ack(n).unwrap();
        }
        assert!(new.tx.all_acked());
    }

    #[test]
    fn offsets_a_hostile_peer_puts_at_the_top_of_the_range_do_not_overflow() {
        let t0 = Instant::now();
        let (mut link, hello) = Link::attach(LinkConfig::default());
        assert!(hello.fresh);
        let top = Resume { received: u64::MAX, from: u64::MAX, reply: true, fresh: false };
        assert_eq!(link.on_resume(top).unwrap(), None);
        assert_eq!(link.on_data(t0, 10), Deliver::From(0));
        assert!(link.on_end(t0));
        assert_eq!(link.rx.received(), u64::MAX);
        link.tx.push(b"abc");
        link.tx.finish();
        assert_eq!(link.tx.sent(), u64::MAX);
        assert!(link.on_ack(u64::MAX).is_ok());
    }

    /// What travels in the model of the relay below.
    #[derive(Debug, Clone)]
    enum Msg {
        Data(Vec<u8>),
        End,
        Ack(u64),
        Resume(Resume),
    }

    /// One endpoint of the model: its link, what it still has to write, what it delivered.
    struct End {
        link: Link,
        to_write: Vec<u8>,
        written: usize,
        end_sent: bool,
        got: Vec<u8>,
        got_end: usize,
    }

    impl End {
        fn new(data: Vec<u8>, window: usize) -> Self {
            let cfg = LinkConfig { window, ack_bytes: 5, ack_delay: Duration::from_millis(3) };
            End {
                link: Link::new(cfg),
                to_write: data,
                written: 0,
                end_sent: false,
                got: Vec::new(),
                got_end: 0,
            }
        }

        fn write(&mut self, max: usize, out: &mut VecDeque<Msg>) {
            if self.link.awaiting() {
                return;
            }
            let end = (self.written + max).min(self.to_write.len());
            let n = self.link.tx.push(&self.to_write[self.written..end]);
            if n > 0 {
                out.push_back(Msg::Data(self.to_write[self.written..self.written + n].to_vec()));
                self.written += n;
            }
            if self.written == self.to_write.len() && !self.end_sent {
                self.link.tx.finish();
                self.end_sent = true;
                out.push_back(Msg::End);
            }
        }

        fn send_replay(resume: Resume, replay: Replay<'_>, out: &mut VecDeque<Msg>) {
            out.push_back(Msg::Resume(resume));
            let data = [replay.data.0, replay.data.1].concat();
            if !data.is_empty() {
                out.push_back(Msg::Data(data));
            }
            if replay.end {
                out.push_back(Msg::End);
            }
        }

        fn reconnect(&mut self, out: &mut VecDeque<Msg>) {
            let (resume, replay) = self.link.reconnected();
            Self::send_replay(resume, replay, out);
        }

        fn receive(&mut self, now: Instant, msg: Msg, out: &mut VecDeque<Msg>) {
            match msg {
                Msg::Data(d) => {
                    if let Deliver::From(i) = self.link.on_data(now, d.len()) {
                        self.got.extend_from_slice(&d[i..]);
                    }
                }
                Msg::End => {
                    if self.link.on_end(now) {
                        self.got_end += 1;
                    }
                }
                Msg::Ack(n) => self.link.on_ack(n).expect("acks only what was sent"),
                Msg::Resume(r) => {
                    if let Some((resume, replay)) = self.link.on_resume(r).expect("resumable") {
                        Self::send_replay(resume, replay, out);
                    }
                }
            }
            if let Some(n) = self.link.rx.poll_ack(now) {
                out.push_back(Msg::Ack(n));
            }
        }
    }

    /// Cuts `leg` of the model: of what that side sent, the part the relay had already passed
    /// on (a prefix) survives; of what the other side sent, the part the relay had read and
    /// written into the lost leg (a prefix) is gone, and the rest waits in the other side's
    /// connection.
    fn cut(from_cut: &mut VecDeque<Msg>, to_cut: &mut VecDeque<Msg>, keep: usize, lose: usize) {
        from_cut.truncate(keep.min(from_cut.len()));
        to_cut.drain(..lose.min(to_cut.len()));
    }

    /// Two endpoints over a relay whose legs break at arbitrary points (one, the other or both
    /// at once, as in a relay restart): each side must deliver exactly what the other wrote,
    /// in order, and its end once.
    fn resume_model(a_data: Vec<u8>, b_data: Vec<u8>, window: usize, steps: &[(u8, usize, usize)]) {
        let t0 = Instant::now();
        let (want_a, want_b) = (a_data.clone(), b_data.clone());
        let mut a = End::new(a_data, window);
        let mut b = End::new(b_data, window);
        let (mut ab, mut ba) = (VecDeque::new(), VecDeque::new());
        let total = want_a.len() + want_b.len();
        let limit = (total + 10) * 40 * steps.len().max(1) + 400;
        for (i, &(op, x, y)) in steps.iter().cycle().take(limit).enumerate() {
            let now = t0 + Duration::from_millis(i as u64);
            match op % 8 {
                0 => a.write(x + 1, &mut ab),
                1 => b.write(x + 1, &mut ba),
                2 | 3 => {
                    for _ in 0..=x.min(ab.len()) {
                        if let Some(m) = ab.pop_front() {
                            b.receive(now, m, &mut ba);
                        }
                    }
                }
                4 | 5 => {
                    for _ in 0..=x.min(ba.len()) {
                        if let Some(m) = ba.pop_front() {
                            a.receive(now, m, &mut ab);
                        }
                    }
                }
                6 => match y % 3 {
                    0 => {
                        cut(&mut ab, &mut ba, x, y);
                        a.reconnect(&mut ab);
                    }
                    1 => {
                        cut(&mut ba, &mut ab, x, y);
                        b.reconnect(&mut ba);
                    }
                    _ => {
                        cut(&mut ab, &mut ba, x, 0);
                        cut(&mut ba, &mut ab, y, 0);
                        ab.clear();
                        ba.clear();
                        a.reconnect(&mut ab);
                        b.reconnect(&mut ba);
                    }
                },
                _ => {
                    // Time passes with nothing on the wire: delayed acknowledgements go out.
                    if let Some(n) = a.link.rx.poll_ack(now) {
                        ab.push_back(Msg::Ack(n));
                    }
                    if let Some(n) = b.link.rx.poll_ack(now) {
                        ba.push_back(Msg::Ack(n));
                    }
                }
            }
            assert!(a.link.tx.unacked() <= window && b.link.tx.unacked() <= window);
            assert!(want_a.starts_with(&b.got) && want_b.starts_with(&a.got), "in order, once");
            assert!(a.got_end <= 1 && b.got_end <= 1);
            if b.got_end == 1 && a.got_end == 1 {
                break;
            }
        }
        // Then a link that stays up: everything arrives.
        for i in 0..(total + 10) * 8 {
            let now = t0 + Duration::from_secs(1000 + i as u64);
            a.write(64, &mut ab);
            b.write(64, &mut ba);
            while let Some(m) = ab.pop_front() {
                b.receive(now, m, &mut ba);
            }
            while let Some(m) = ba.pop_front() {
                a.receive(now, m, &mut ab);
            }
            if let Some(n) = a.link.rx.poll_ack(now) {
                ab.push_back(Msg::Ack(n));
            }
            if let Some(n) = b.link.rx.poll_ack(now) {
                ba.push_back(Msg::Ack(n));
            }
        }
        assert_eq!((b.got, b.got_end), (want_a, 1));
        assert_eq!((a.got, a.got_end), (want_b, 1));
    }

    #[test]
    fn both_legs_lost_at_once_mid_stream() {
        let steps = [(0, 3, 0), (1, 3, 0), (2, 0, 0), (6, 1, 2), (4, 5, 0), (2, 5, 0), (6, 0, 0)];
        resume_model(b"0123456789".to_vec(), b"abcdefghij".to_vec(), 4, &steps);
    }

    #[test]
    fn stderr_marks_are_coalesced_trimmed_by_acks_and_cost_window_room() {
        let mut s = Sender::new(100);
        assert_eq!(s.push(b"ab"), 2);
        assert_eq!(s.push_stderr(b"cd"), 2);
        assert_eq!(s.push_stderr(b"e"), 1);
        assert_eq!(s.push(b"f"), 1);
        // One range (2..5), adjacent pushes coalesced; it costs MARK_COST of the window.
        assert_eq!(s.room(), 100 - 6 - MARK_COST);
        s.handle_ack(3).unwrap();
        let r = s.resume_from(3).unwrap();
        let parts = r.parts(64);
        assert_eq!(parts, vec![(Stream::Err, &b"de"[..]), (Stream::Out, &b"f"[..])]);
        s.handle_ack(6).unwrap();
        // Everything acknowledged: no range is left, and no memory is held.
        assert_eq!(s.room(), 100);
        assert_eq!(s.stderr.capacity(), 0);
        // A window full of ranges takes no more bytes.
        let mut s = Sender::new(3 * (MARK_COST + 2));
        for _ in 0..3 {
            assert_eq!(s.push_stderr(b"x"), 1);
            assert_eq!(s.push(b"y"), 1);
        }
        assert_eq!((s.room(), s.push_stderr(b"x"), s.push(b"y")), (0, 0, 0));
    }

    proptest! {
        /// Whatever mix of DATA and STDERR is pushed, acknowledged and replayed, a replay sends
        /// every unacknowledged byte once, in order, in the stream it was pushed in.
        #[test]
        fn a_replay_sends_each_byte_in_the_stream_it_was_pushed_in(
            ops in proptest::collection::vec((0u8..3, 1usize..40), 1..60),
            window in 16usize..400,
        ) {
            let mut s = Sender::new(window);
            // The model: every byte pushed, with its stream.
            let mut pushed: Vec<(Stream, u8)> = Vec::new();
            for (i, &(op, len)) in ops.iter().enumerate() {
                let bytes: Vec<u8> = (0..len).map(|j| (i * 7 + j) as u8).collect();
                match op {
                    0 => {
                        let n = s.push(&bytes);
                        pushed.extend(bytes[..n].iter().map(|&b| (Stream::Out, b)));
                    }
                    1 => {
                        let n = s.push_stderr(&bytes);
                        pushed.extend(bytes[..n].iter().map(|&b| (Stream::Err, b)));
                    }
                    _ => {
                        let upto = s.acked() + (len as u64).min(s.sent() - s.acked());
                        s.handle_ack(upto).unwrap();
                    }
                }
                prop_assert!(s.unacked() + MARK_COST * s.stderr.len() <= window + MARK_COST);
                let from = s.acked();
                let r = s.resume_from(from).unwrap();
                let chunk = 1 + len % 7;
                let mut replayed = Vec::new();
                for (stream, part) in r.parts(chunk) {
                    prop_assert!(!part.is_empty() && part.len() <= chunk);
                    replayed.extend(part.iter().map(|&b| (stream, b)));
                }
                prop_assert_eq!(&replayed[..], &pushed[from as usize..]);
            }
        }

        #[test]
        fn a_stream_cut_anywhere_arrives_whole_and_in_order(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            window in 1usize..300,
            cuts in proptest::collection::vec((0usize..64, proptest::bool::weighted(0.2)), 1..20),
        ) {
            prop_assume!(cuts.iter().any(|&(d, _)| d > 0));
            let got = lossy_link(&data, window, &cuts);
            prop_assert_eq!(got, data);
        }

        #[test]
        fn both_directions_resume_whole_and_in_order_whichever_legs_break(
            a in proptest::collection::vec(any::<u8>(), 0..300),
            b in proptest::collection::vec(any::<u8>(), 0..300),
            window in 1usize..64,
            steps in proptest::collection::vec((any::<u8>(), 0usize..8, 0usize..8), 1..40),
        ) {
            resume_model(a, b, window, &steps);
        }

        #[test]
        fn a_sender_never_holds_more_than_its_window_nor_acks_what_was_not_sent(
            ops in proptest::collection::vec((0usize..50, 0u64..200), 0..100),
            window in 1usize..100,
        ) {
            let mut s = Sender::new(window);
            let mut all = Vec::new();
            for (n, ack) in ops {
                let bytes: Vec<u8> = (0..n).map(|i| (all.len() + i) as u8).collect();
                let took = s.push(&bytes);
                all.extend_from_slice(&bytes[..took]);
                prop_assert!(s.unacked() <= window);
                prop_assert_eq!(s.sent(), all.len() as u64);
                let before = s.acked();
                match s.handle_ack(ack) {
                    Ok(()) => prop_assert_eq!(s.acked(), before.max(ack)),
                    Err(OffsetError::BeyondSent { .. }) => prop_assert!(ack > s.sent()),
                    Err(e) => prop_assert!(false, "{:?}", e),
                }
                if let Ok(r) = s.resume_from(s.acked()) {
                    prop_assert_eq!([r.data.0, r.data.1].concat(), all[s.acked() as usize..].to_vec());
                }
            }
        }
    }
}
