//! Byte offsets, flow control and replay for one direction of a `hatch.v1` session (issue 14's
//! first step; not yet wired into the agent and the client).
//!
//! Every DATA byte has an offset per direction, counted from 0 at the session's start. The
//! receiver acknowledges the cumulative bytes it has delivered (ACK, type 0x04), delayed so that
//! keystroke traffic does not double its message count; the sender keeps what is not yet
//! acknowledged in a bounded replay buffer and never has more than a window in flight. After a
//! reconnect each side says how much it has received and the other sends again from there.
//!
//! ```text
//!  sender:   [ acked ............ | unacknowledged (replay buffer, ≤ window) ] sent
//!  receiver:  received ─ delivered to the terminal; ACK(received) when due
//! ```
//!
//! Both halves are sans-IO: no sockets, no clock (times come in as arguments), no allocation
//! while nothing is unacknowledged (an idle session holds no buffer).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Default bytes in flight per direction.
pub const DEFAULT_WINDOW: usize = 2 * 1024 * 1024;
/// Default: acknowledge once this many bytes are unacknowledged...
pub const DEFAULT_ACK_BYTES: u64 = 64 * 1024;
/// ... or this long after the first of them arrived.
pub const DEFAULT_ACK_DELAY: Duration = Duration::from_millis(200);

/// Why an acknowledgement or a resume request from the peer cannot be right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetError {
    /// The peer claims more bytes than were ever sent.
    BeyondSent {
        /// What the peer claims.
        claimed: u64,
        /// What was sent.
        sent: u64,
    },
    /// The peer asks for bytes from before what this side still holds (they were
    /// acknowledged and dropped): the gap cannot be replayed.
    Gap {
        /// Where the peer wants to resume.
        from: u64,
        /// The oldest byte still held.
        held_from: u64,
    },
}

/// The sending half of one direction.
#[derive(Debug)]
pub struct Sender {
    window: usize,
    /// Bytes the peer has acknowledged: the offset of `unacked[0]`.
    acked: u64,
    unacked: VecDeque<u8>,
}

impl Sender {
    /// A sender that keeps at most `window` bytes unacknowledged (at least 1).
    pub fn new(window: usize) -> Self {
        Sender { window: window.max(1), acked: 0, unacked: VecDeque::new() }
    }

    /// The offset of the next byte to send (bytes sent so far).
    pub fn sent(&self) -> u64 {
        self.acked + self.unacked.len() as u64
    }

    /// Bytes the peer has acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Bytes held for replay.
    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    /// How many more bytes may be sent before an acknowledgement: when 0, stop reading the
    /// source (the PTY, stdin) until one arrives.
    pub fn room(&self) -> usize {
        self.window - self.unacked.len()
    }

    /// Records the first `room()` bytes of `data` as sent (kept until acknowledged) and returns
    /// how many it took; the caller sends exactly those.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.room());
        self.unacked.extend(&data[..n]);
        n
    }

    /// The peer acknowledged `upto` bytes: what is below it is dropped. An acknowledgement
    /// below an earlier one is stale (messages cross) and changes nothing.
    pub fn handle_ack(&mut self, upto: u64) -> Result<(), OffsetError> {
        let sent = self.sent();
        if upto > sent {
            return Err(OffsetError::BeyondSent { claimed: upto, sent });
        }
        if upto > self.acked {
            let n = (upto - self.acked) as usize;
            self.unacked.drain(..n);
            self.acked = upto;
            if self.unacked.is_empty() {
                // Give the memory back: an idle session holds no buffer.
                self.unacked = VecDeque::new();
            }
        }
        Ok(())
    }

    /// After a reconnect the peer has received `from` bytes: everything below is acknowledged,
    /// and the returned slices (in order) are what must be sent again.
    pub fn resume_from(&mut self, from: u64) -> Result<(&[u8], &[u8]), OffsetError> {
        if from < self.acked {
            return Err(OffsetError::Gap { from, held_from: self.acked });
        }
        self.handle_ack(from)?;
        Ok(self.unacked.as_slices())
    }
}

/// The receiving half of one direction: counts what was delivered and decides when to
/// acknowledge it.
#[derive(Debug, Clone)]
pub struct Receiver {
    every: u64,
    delay: Duration,
    received: u64,
    /// The last offset acknowledged.
    acked: u64,
    /// When the first byte not yet acknowledged arrived.
    since: Option<Instant>,
}

impl Receiver {
    /// Acknowledges once `every` bytes are unacknowledged or `delay` after the first of them.
    pub fn new(every: u64, delay: Duration) -> Self {
        Receiver { every: every.max(1), delay, received: 0, acked: 0, since: None }
    }

    /// Bytes received (and delivered) so far: what a resume asks the peer to send from.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// `n` DATA bytes were delivered at `now`.
    pub fn handle_data(&mut self, now: Instant, n: usize) {
        if n == 0 {
            return;
        }
        self.received += n as u64;
        self.since.get_or_insert(now);
    }

    /// The acknowledgement to send now, if one is due.
    pub fn poll_ack(&mut self, now: Instant) -> Option<u64> {
        let due = self.received - self.acked >= self.every
            || self.since.is_some_and(|t| now >= t + self.delay);
        if due { self.take_ack() } else { None }
    }

    /// An acknowledgement of everything received, if anything is unacknowledged: for a caller
    /// that is sending a message anyway (piggybacking) or resuming.
    pub fn take_ack(&mut self) -> Option<u64> {
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
        let (a, b) = s.resume_from(6).unwrap();
        assert_eq!([a, b].concat(), b"6789");
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
                let (a, b) = s.resume_from(r.received()).expect("no gap: only acked bytes dropped");
                in_flight.extend(a);
                in_flight.extend(b);
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

    proptest! {
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
                if let Ok((a, b)) = s.resume_from(s.acked()) {
                    prop_assert_eq!([a, b].concat(), all[s.acked() as usize..].to_vec());
                }
            }
        }
    }
}
