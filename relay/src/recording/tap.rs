//! The channel tap: what a recording needs out of the frames a pump forwards, sans-IO.
//!
//! A pump forwards WebSocket frames, not `hatch.v1` messages (the relay never assembles a
//! message). The tap is fed the server frames a forward step wrote (`buf[step.out]`: data
//! frames only, unmasked, their payloads streamed across reads and split anywhere) and yields,
//! as they pass, the DATA and STDERR bytes ([`Tapped::Data`], borrowed from the input: no
//! message is assembled, so a 1 MiB message becomes records as it streams) and the RESIZE and
//! EXIT messages. ACK, ERROR and unknown types are skipped; a RESUME moves the direction's
//! stream position back to where its sender resends from, so that bytes resent after a resume
//! are not recorded twice.
//!
//! The tap allocates nothing and never panics: it reads frames the relay itself wrote, but a
//! fuzz target (`recording_tap`) feeds it arbitrary bytes in arbitrary splits anyway.

use hatch_proto::channel::{TYPE_DATA, TYPE_EXIT, TYPE_RESIZE, TYPE_RESUME, TYPE_STDERR};

/// Longest WebSocket frame header the relay writes (no mask: 2 + 8 bytes), and a mask's 4 for
/// a peer's frame, so that any header fits.
const MAX_HEADER: usize = 14;

/// Longest body of a message the tap keeps whole: RESUME's (u64, u64, u8).
const MAX_SMALL: usize = 17;

/// What the tap saw in the forwarded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tapped<'a> {
    /// DATA or STDERR body bytes (a part of one message), not resent ones.
    Data(&'a [u8]),
    /// A RESIZE message.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// An EXIT message.
    Exit(i32),
}

/// Where the tap is inside the current message.
#[derive(Debug, Clone, Copy, Default)]
enum Msg {
    /// Before the type byte.
    #[default]
    Start,
    /// DATA or STDERR: the body streams out as it comes.
    Stream,
    /// A short message kept whole until it ends.
    Small { kind: u8, buf: [u8; MAX_SMALL], len: u8 },
    /// Anything else, or a short message that grew too long.
    Skip,
}

/// One direction's tap. Feed it with [`Tap::next`]; start a new leg's bytes with
/// [`Tap::new_leg`] (a leg starts at a frame boundary), keeping the stream position.
#[derive(Debug, Clone, Default)]
pub struct Tap {
    header: [u8; MAX_HEADER],
    header_len: u8,
    /// Inside a frame's payload: this many bytes are still to come.
    remaining: u64,
    in_frame: bool,
    fin: bool,
    control: bool,
    msg: Msg,
    /// DATA/STDERR body bytes recorded in this direction so far (the sender's offsets).
    recorded: u64,
    /// The sender's offset of the next DATA/STDERR byte: below `recorded` after a RESUME
    /// while it resends what was recorded already.
    next: u64,
}

impl Tap {
    /// A tap for a direction whose first `recorded` stream bytes were recorded already.
    pub fn at(recorded: u64) -> Tap {
        Tap { recorded, next: recorded, ..Tap::default() }
    }

    /// DATA/STDERR body bytes recorded so far.
    pub fn recorded(&self) -> u64 {
        self.recorded
    }

    /// The next leg's bytes start at a frame boundary and a message boundary.
    pub fn new_leg(&mut self) {
        *self = Tap::at(self.recorded);
    }

    /// The next thing `input[*pos..]` shows, advancing `*pos` past what it used; `None` once
    /// all of it is used (a partial header or message is kept for the next input).
    pub fn next<'a>(&mut self, input: &'a [u8], pos: &mut usize) -> Option<Tapped<'a>> {
        while *pos < input.len() {
            if !self.in_frame {
                self.take_header(input, pos);
                if self.in_frame
                    && self.remaining == 0
                    && let Some(t) = self.end_frame()
                {
                    return Some(t);
                }
                continue;
            }
            let n = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(input.len() - *pos);
            let chunk = &input[*pos..*pos + n];
            *pos += n;
            self.remaining -= n as u64;
            let got = if self.control { None } else { self.payload(chunk) };
            let ended = if self.remaining == 0 { self.end_frame() } else { None };
            // At most one of them: a streamed body yields on its bytes and nothing at its end,
            // a short message only at its end.
            if let Some(t) = got.or(ended) {
                return Some(t);
            }
        }
        None
    }

    fn take_header(&mut self, input: &[u8], pos: &mut usize) {
        let have = usize::from(self.header_len);
        let need = if have < 2 { 2 } else { header_len(self.header[1]) };
        let n = (need - have).min(input.len() - *pos);
        self.header[have..have + n].copy_from_slice(&input[*pos..*pos + n]);
        *pos += n;
        self.header_len += n as u8;
        let have = usize::from(self.header_len);
        if have < 2 || have < header_len(self.header[1]) {
            return;
        }
        let h = &self.header;
        let len = match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        };
        let opcode = h[0] & 0x0f;
        self.fin = h[0] & 0x80 != 0;
        self.control = opcode & 0x08 != 0;
        if !self.control && opcode != 0 {
            // A new data message (a continuation, opcode 0, goes on with the current one).
            self.msg = Msg::Start;
        }
        self.remaining = len;
        self.in_frame = true;
        self.header_len = 0;
    }

    fn payload<'a>(&mut self, mut chunk: &'a [u8]) -> Option<Tapped<'a>> {
        if let Msg::Start = self.msg {
            let (&kind, rest) = chunk.split_first()?;
            chunk = rest;
            self.msg = match kind {
                TYPE_DATA | TYPE_STDERR => Msg::Stream,
                TYPE_RESIZE | TYPE_EXIT | TYPE_RESUME => {
                    Msg::Small { kind, buf: [0; MAX_SMALL], len: 0 }
                }
                _ => Msg::Skip,
            };
        }
        match &mut self.msg {
            Msg::Stream => {
                let len = chunk.len() as u64;
                let resent = self.recorded.saturating_sub(self.next).min(len);
                self.next += len;
                self.recorded = self.recorded.max(self.next);
                let fresh = &chunk[resent as usize..];
                (!fresh.is_empty()).then_some(Tapped::Data(fresh))
            }
            Msg::Small { buf, len, .. } => {
                let at = usize::from(*len);
                if at + chunk.len() > MAX_SMALL {
                    self.msg = Msg::Skip;
                } else {
                    buf[at..at + chunk.len()].copy_from_slice(chunk);
                    *len += chunk.len() as u8;
                }
                None
            }
            Msg::Start | Msg::Skip => None,
        }
    }

    /// The current frame's payload is all in.
    fn end_frame(&mut self) -> Option<Tapped<'static>> {
        self.in_frame = false;
        if self.control || !self.fin {
            return None;
        }
        let msg = std::mem::replace(&mut self.msg, Msg::Skip);
        let Msg::Small { kind, buf, len } = msg else { return None };
        let b = &buf[..usize::from(len)];
        match (kind, b.len()) {
            (TYPE_RESIZE, 4) => Some(Tapped::Resize {
                cols: u16::from_be_bytes([b[0], b[1]]),
                rows: u16::from_be_bytes([b[2], b[3]]),
            }),
            (TYPE_EXIT, 4) => Some(Tapped::Exit(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))),
            (TYPE_RESUME, 17) => {
                let mut from = [0u8; 8];
                from.copy_from_slice(&b[8..16]);
                // The sender resends from here: what it resends below `recorded` is skipped.
                self.next = u64::from_be_bytes(from);
                None
            }
            _ => None,
        }
    }
}

/// Bytes of a frame header whose second byte is `b1`.
fn header_len(b1: u8) -> usize {
    let ext = match b1 & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if b1 & 0x80 != 0 { 4 } else { 0 }
}

#[cfg(test)]
mod tests {
    use hatch_proto::frame::{self, OpCode};
    use proptest::prelude::*;

    use super::*;

    fn frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut h = [0u8; frame::MAX_HEADER_LEN];
        let n = frame::encode_header(fin, op, payload.len() as u64, None, &mut h);
        let mut out = h[..n].to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![kind];
        p.extend_from_slice(body);
        frame(true, OpCode::Binary, &p)
    }

    /// Everything the tap yields for `input` fed in pieces split at `cuts`, with the data
    /// joined into one run between other events.
    fn tap_all(tap: &mut Tap, input: &[u8], cuts: &[usize]) -> Vec<Owned> {
        let mut out = Vec::new();
        let mut start = 0;
        let mut ends: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        ends.sort_unstable();
        ends.push(input.len());
        for end in ends {
            let piece = &input[start..end.max(start)];
            let mut pos = 0;
            while let Some(t) = tap.next(piece, &mut pos) {
                match (t, out.last_mut()) {
                    (Tapped::Data(d), Some(Owned::Data(prev))) => prev.extend_from_slice(d),
                    (Tapped::Data(d), _) => out.push(Owned::Data(d.to_vec())),
                    (Tapped::Resize { cols, rows }, _) => out.push(Owned::Resize(cols, rows)),
                    (Tapped::Exit(s), _) => out.push(Owned::Exit(s)),
                }
            }
            assert_eq!(pos, piece.len());
            start = end.max(start);
        }
        out
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Data(Vec<u8>),
        Resize(u16, u16),
        Exit(i32),
    }

    #[test]
    fn data_resize_and_exit_pass_everything_else_is_skipped() {
        let mut input = msg(TYPE_RESIZE, &[0, 80, 0, 24]);
        input.extend(msg(TYPE_DATA, b"ls\r"));
        input.extend(msg(0x04, &7u64.to_be_bytes())); // ACK
        input.extend(msg(0x05, b"\x00\x01oops")); // ERROR
        input.extend(msg(0x42, b"future"));
        // A fragmented STDERR message, a ping between its frames.
        input.extend(frame(false, OpCode::Binary, &[TYPE_STDERR, 0xff, 0xfe]));
        input.extend(frame(true, OpCode::Ping, b"p"));
        input.extend(frame(true, OpCode::Continuation, &[0xe2, 0x82]));
        input.extend(msg(TYPE_EXIT, &4i32.to_be_bytes()));
        input.extend(msg(TYPE_DATA, &[]));
        let want = vec![
            Owned::Resize(80, 24),
            Owned::Data(b"ls\r\xff\xfe\xe2\x82".to_vec()),
            Owned::Exit(4),
        ];
        for cut in 0..input.len() {
            assert_eq!(tap_all(&mut Tap::default(), &input, &[cut]), want, "cut at {cut}");
        }
        let mut t = Tap::default();
        assert_eq!(tap_all(&mut t, &input, &(0..input.len()).collect::<Vec<_>>()), want);
        assert_eq!(t.recorded(), 7);
    }

    #[test]
    fn long_payloads_use_extended_lengths() {
        for len in [125usize, 126, 65_535, 65_536, 200_000] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let input = msg(TYPE_DATA, &body);
            assert_eq!(tap_all(&mut Tap::default(), &input, &[3, 1000]), [Owned::Data(body)]);
        }
    }

    #[test]
    fn a_resume_skips_what_is_resent() {
        let mut t = Tap::default();
        assert_eq!(
            tap_all(&mut t, &msg(TYPE_DATA, b"abcdef"), &[]),
            [Owned::Data(b"abcdef".into())]
        );
        // A new leg: the sender resends from offset 4 ("ef"), then goes on.
        t.new_leg();
        let mut resume = 0u64.to_be_bytes().to_vec();
        resume.extend(4u64.to_be_bytes());
        resume.push(0);
        let mut input = msg(TYPE_RESUME, &resume);
        input.extend(msg(TYPE_DATA, b"efgh"));
        assert_eq!(tap_all(&mut t, &input, &[5]), [Owned::Data(b"gh".into())]);
        assert_eq!(t.recorded(), 8);
        // A tap made for a restarted relay knows only the count.
        let mut t = Tap::at(8);
        input = msg(TYPE_RESUME, &[&0u64.to_be_bytes()[..], &6u64.to_be_bytes(), &[1]].concat());
        input.extend(msg(TYPE_DATA, b"ghij"));
        assert_eq!(tap_all(&mut t, &input, &[]), [Owned::Data(b"ij".into())]);
    }

    #[test]
    fn short_messages_of_the_wrong_size_are_skipped() {
        let mut input = msg(TYPE_RESIZE, &[0, 80, 0]);
        input.extend(msg(TYPE_EXIT, &[0; 40]));
        input.extend(msg(TYPE_DATA, b"x"));
        assert_eq!(tap_all(&mut Tap::default(), &input, &[]), [Owned::Data(b"x".to_vec())]);
    }

    proptest! {
        #[test]
        fn any_bytes_in_any_pieces_never_panic(
            input in proptest::collection::vec(any::<u8>(), 0..600),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut t = Tap::default();
            let _ = tap_all(&mut t, &input, &cuts);
        }

        #[test]
        fn data_split_anywhere_is_yielded_whole(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..6),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
        ) {
            let input: Vec<u8> = bodies.iter().flat_map(|b| msg(TYPE_DATA, b)).collect();
            let joined: Vec<u8> = bodies.concat();
            let got = tap_all(&mut Tap::default(), &input, &cuts);
            let want = if joined.is_empty() { vec![] } else { vec![Owned::Data(joined)] };
            prop_assert_eq!(got, want);
        }
    }
}
