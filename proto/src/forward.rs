//! The relay's forward step: client-masked frames in a read buffer become server frames for the
//! other leg, in place.
//!
//! A masked header is exactly 4 bytes longer than the unmasked header for the same payload, so
//! the payload is unmasked where it lies and the new header is written into the 4+ bytes the old
//! one leaves. Several frames in one buffer are compacted toward its start with a short
//! `memmove`, so everything readable leaves as one contiguous slice and one write. A data frame
//! larger than what has arrived is streamed: its header goes out with the first chunk, later
//! chunks are unmasked with their offset into the frame and forwarded as they come, so the relay
//! never holds a whole frame.
//!
//! Control frames (ping, pong, close) are not forwarded: the step stops at each one and hands it
//! to the caller, which answers pings itself and turns a close into the end of the session.
//! This module does no I/O and allocates nothing.

use std::ops::Range;

use crate::frame::{self, FrameError, FrameHeader, OpCode, ParseConfig};

/// What stopped a step before the input was used up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A ping; its (unmasked) payload is at this range of the buffer.
    Ping(Range<usize>),
    /// A pong (ignored by the relay: any frame counts as liveness).
    Pong,
    /// A close frame; its (unmasked) payload is at this range of the buffer.
    Close(Range<usize>),
    /// A protocol violation: close the leg with this code.
    Violation(u16, FrameError),
    /// A text message whose payload is not UTF-8 (close 1007).
    BadUtf8,
    /// A continuation without a message in progress, or a new message inside one.
    BadFragment,
}

/// Per-direction parsing state carried between reads.
#[derive(Debug, Default, Clone)]
pub struct Deframer {
    /// A data frame whose payload is still arriving.
    partial: Option<Partial>,
    /// Inside a fragmented message (the last data frame had no FIN).
    in_message: bool,
    /// The message in progress is text: its payload is checked as UTF-8.
    text: bool,
    /// Bytes of an incomplete UTF-8 sequence at the end of the last text chunk.
    utf8_carry: [u8; 4],
    utf8_carry_len: u8,
}

#[derive(Debug, Clone, Copy)]
struct Partial {
    mask: [u8; 4],
    remaining: u64,
    offset: usize,
    fin: bool,
}

impl Deframer {
    /// Payload bytes still to come of the data frame whose header went out, if one did.
    pub fn frame_rest(&self) -> Option<u64> {
        self.partial.map(|p| p.remaining)
    }
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Re-framed bytes to write to the other leg (may be empty).
    pub out: Range<usize>,
    /// Input consumed up to here; `buf[consumed..end]` is an incomplete header or control frame
    /// to keep for the next read (or the rest of the input after an event).
    pub consumed: usize,
    /// Data payload bytes forwarded in this step.
    pub payload: u64,
    /// Data frames completed in this step (their last byte is in `out`).
    pub frames: u32,
    /// Why the step stopped early, if it did.
    pub event: Option<Event>,
    /// Once `out` is written, the other leg is inside a frame: a header went out (in this step
    /// or an earlier one) whose payload has not all followed. The relay may write nothing of
    /// its own (pong, ping, close) to that leg until the frame is complete (RFC 6455 §5.4).
    pub mid_frame: bool,
}

/// Longest unconsumed tail a step can leave: a complete control-frame header plus all but one
/// byte of its payload.
pub const MAX_TAIL: usize = frame::MAX_HEADER_LEN + frame::MAX_CONTROL_PAYLOAD as usize;

/// Forwards what it can of `buf[start..end]`: unmasks and re-frames, in place, the client
/// frames there as server frames, stopping at the first control frame or violation.
///
/// `buf[start..end]` holds masked client frames as they arrived, starting at a frame boundary
/// or inside the data frame `st` says is streaming (`st` carries the parsing state of one
/// direction from one call to the next; start each leg with `Deframer::default()`). `cfg` is the
/// server side's [`ParseConfig`]: masking must be [`Masking::Required`](frame::Masking::Required)
/// (an unmasked frame is a violation either way), and its `max_payload` bounds a data frame.
///
/// Given `start <= end <= buf.len()` (the caller's side of the contract), the step reads and
/// writes only `buf[start..end]`, allocates nothing and never panics, whatever the bytes and the
/// state. It returns:
///
/// - [`Step::out`]: server frames (and chunks of a streamed frame) to write to the other leg, as
///   one contiguous range inside `buf[start..end]`;
/// - [`Step::consumed`]: how far the input was used; when `event` is `None`, `buf[consumed..end]`
///   is an incomplete frame header or control frame of at most [`MAX_TAIL`] bytes, to put in
///   front of the next read;
/// - [`Step::event`]: the control frame or the violation that stopped the step. A ping's or a
///   close's payload lies, unmasked, inside `buf[start..consumed]`. After a ping or a pong the
///   caller answers or ignores it and calls `step` again from `consumed`, as more frames may
///   follow in the same read; a close, a [`Event::Violation`], [`Event::BadUtf8`] or
///   [`Event::BadFragment`] ends the leg, and nothing after it is forwarded;
/// - [`Step::payload`], [`Step::frames`]: what went out, for the byte and frame counters;
/// - [`Step::mid_frame`]: whether the other leg is left inside a frame once `out` is written.
///
/// Data frames keep their opcode, FIN bit and payload length, so fragmentation passes through
/// as the client sent it; a text message is checked as UTF-8 across frames and reads, and the
/// frame with a bad sequence is held back (its header too, when it had not gone out yet).
pub fn step(
    buf: &mut [u8],
    start: usize,
    end: usize,
    st: &mut Deframer,
    cfg: &ParseConfig,
) -> Step {
    let mut r = start;
    let mut out_start: Option<usize> = None;
    let mut w = start;
    let mut payload = 0u64;
    let mut frames = 0u32;
    let mut event = None;
    // Where the current frame's header went out, when that happened in this step.
    let mut hdr_at: Option<usize> = None;
    // The bad frame's header was held back: the other leg is not inside it.
    let mut withdrawn = false;
    loop {
        if let Some(mut p) = st.partial {
            let avail = ((end - r) as u64).min(p.remaining) as usize;
            if avail == 0 {
                break;
            }
            frame::unmask(&mut buf[r..r + avail], p.mask, p.offset);
            if st.text && !check_utf8(st, &buf[r..r + avail], p.remaining == avail as u64 && p.fin)
            {
                // Hold back the bad frame: drop its header if it has not gone out yet;
                // otherwise the peer is left inside a frame (and gets no close frame).
                if let Some(h) = hdr_at {
                    w = h;
                    withdrawn = true;
                }
                event = Some(Event::BadUtf8);
                break;
            }
            if out_start.is_none() {
                out_start = Some(r);
                w = r;
            }
            if w != r {
                buf.copy_within(r..r + avail, w);
            }
            w += avail;
            r += avail;
            payload += avail as u64;
            p.remaining -= avail as u64;
            p.offset += avail;
            if p.remaining == 0 {
                st.partial = None;
                hdr_at = None;
                frames += 1;
            } else {
                st.partial = Some(p);
                break;
            }
            continue;
        }
        let h = match FrameHeader::parse(&buf[r..end], cfg) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => {
                event = Some(Event::Violation(e.close_code(), e));
                break;
            }
        };
        // The server config requires a mask; the parser has already refused unmasked frames.
        let Some(mask) = h.mask else {
            event = Some(Event::Violation(1002, FrameError::Unmasked));
            break;
        };
        if h.opcode.is_control() {
            let len = h.frame_len() as usize;
            if end - r < len {
                break;
            }
            let ps = r + h.header_len;
            let pe = r + len;
            frame::unmask(&mut buf[ps..pe], mask, 0);
            r = pe;
            event = Some(match h.opcode {
                OpCode::Ping => Event::Ping(ps..pe),
                OpCode::Pong => Event::Pong,
                _ => Event::Close(ps..pe),
            });
            break;
        }
        match h.opcode {
            OpCode::Continuation if !st.in_message => {
                event = Some(Event::BadFragment);
                break;
            }
            OpCode::Text | OpCode::Binary if st.in_message => {
                event = Some(Event::BadFragment);
                break;
            }
            OpCode::Text => {
                st.text = true;
                st.utf8_carry_len = 0;
            }
            OpCode::Binary => st.text = false,
            _ => {}
        }
        st.in_message = !h.fin;
        // Re-header: the unmasked header is 4 bytes shorter, so it always fits at `w`, which
        // never passes `r + 4`.
        let nh = h.header_len - 4;
        if out_start.is_none() {
            w = r + 4;
            out_start = Some(w);
        }
        hdr_at = Some(w);
        let mut tmp = [0u8; frame::MAX_HEADER_LEN];
        let n = frame::encode_header(h.fin, h.opcode, h.payload_len, None, &mut tmp);
        debug_assert_eq!(n, nh);
        buf[w..w + nh].copy_from_slice(&tmp[..nh]);
        w += nh;
        r += h.header_len;
        st.partial = Some(Partial { mask, remaining: h.payload_len, offset: 0, fin: h.fin });
        if h.payload_len == 0 {
            st.partial = None;
            if st.text && h.fin && st.utf8_carry_len != 0 {
                // Held back like any bad frame, so not counted.
                w = hdr_at.unwrap_or(w);
                event = Some(Event::BadUtf8);
                break;
            }
            frames += 1;
            hdr_at = None;
        }
    }
    let out = out_start.map_or(start..start, |s| s..w.max(s));
    let mid_frame = st.partial.is_some() && !withdrawn;
    Step { out, consumed: r, payload, frames, event, mid_frame }
}

/// Checks a chunk of a text message as UTF-8, carrying an incomplete sequence at its end over
/// to the next chunk. `last` is set on the message's final chunk.
fn check_utf8(st: &mut Deframer, chunk: &[u8], last: bool) -> bool {
    let mut rest = chunk;
    if st.utf8_carry_len != 0 {
        // Complete the carried sequence with up to 3 bytes of this chunk.
        let have = st.utf8_carry_len as usize;
        let take = (4 - have).min(rest.len());
        let mut seq = [0u8; 8];
        seq[..have].copy_from_slice(&st.utf8_carry[..have]);
        seq[have..have + take].copy_from_slice(&rest[..take]);
        match std::str::from_utf8(&seq[..have + take]) {
            Ok(_) => {
                st.utf8_carry_len = 0;
                rest = &rest[take..];
            }
            Err(e) if e.error_len().is_some() => {
                if e.valid_up_to() == 0 {
                    return false;
                }
                // The carried sequence completed; skip what it used of this chunk.
                let used = e.valid_up_to() - have;
                st.utf8_carry_len = 0;
                rest = &rest[used..];
            }
            Err(e) => {
                if e.valid_up_to() == 0 {
                    // Still incomplete (a tiny chunk).
                    st.utf8_carry[..have + take].copy_from_slice(&seq[..have + take]);
                    st.utf8_carry_len = (have + take) as u8;
                    return !last;
                }
                let used = e.valid_up_to() - have;
                st.utf8_carry_len = 0;
                rest = &rest[used..];
            }
        }
    }
    match std::str::from_utf8(rest) {
        Ok(_) => true,
        Err(e) if e.error_len().is_some() => false,
        Err(e) => {
            let tail = &rest[e.valid_up_to()..];
            st.utf8_carry[..tail.len()].copy_from_slice(tail);
            st.utf8_carry_len = tail.len() as u8;
            !last
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(fin: bool, op: OpCode, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut h = [0u8; frame::MAX_HEADER_LEN];
        let n = frame::encode_header(fin, op, payload.len() as u64, Some(key), &mut h);
        let mut v = h[..n].to_vec();
        let mut p = payload.to_vec();
        frame::unmask(&mut p, key, 0);
        v.extend_from_slice(&p);
        v
    }

    fn server(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut h = [0u8; frame::MAX_HEADER_LEN];
        let n = frame::encode_header(fin, op, payload.len() as u64, None, &mut h);
        let mut v = h[..n].to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn many_small_frames_become_one_contiguous_output() {
        let mut input = Vec::new();
        let mut want = Vec::new();
        for i in 0..50u8 {
            let p = vec![i; (i as usize) % 7 + 1];
            input.extend(masked(true, OpCode::Binary, &p, [i, 2, 3, 4]));
            want.extend(server(true, OpCode::Binary, &p));
        }
        let len = input.len();
        let mut st = Deframer::default();
        let s = step(&mut input, 0, len, &mut st, &ParseConfig::SERVER);
        assert_eq!(s.event, None);
        assert_eq!(s.consumed, len);
        assert_eq!(s.frames, 50);
        assert_eq!(&input[s.out], &want[..]);
    }

    #[test]
    fn large_frame_streams_in_chunks_with_offsets() {
        let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7) as u8).collect();
        let input = masked(true, OpCode::Binary, &payload, [9, 8, 7, 6]);
        let want = server(true, OpCode::Binary, &payload);
        let mut st = Deframer::default();
        let mut got = Vec::new();
        let mut carry: Vec<u8> = Vec::new();
        for chunk in input.chunks(1000 + 3) {
            let mut buf = carry.clone();
            buf.extend_from_slice(chunk);
            let len = buf.len();
            let s = step(&mut buf, 0, len, &mut st, &ParseConfig::SERVER);
            assert_eq!(s.event, None);
            got.extend_from_slice(&buf[s.out.clone()]);
            carry = buf[s.consumed..len].to_vec();
        }
        assert!(carry.is_empty());
        assert_eq!(got, want);
    }

    #[test]
    fn control_frames_stop_the_step_and_data_before_them_is_out() {
        let mut input = masked(true, OpCode::Binary, b"abc", [1, 2, 3, 4]);
        input.extend(masked(true, OpCode::Ping, b"hi", [5, 6, 7, 8]));
        input.extend(masked(true, OpCode::Binary, b"z", [1, 1, 1, 1]));
        let len = input.len();
        let mut st = Deframer::default();
        let s = step(&mut input, 0, len, &mut st, &ParseConfig::SERVER);
        assert_eq!(&input[s.out.clone()], &server(true, OpCode::Binary, b"abc")[..]);
        let Some(Event::Ping(r)) = s.event.clone() else { panic!("{s:?}") };
        assert_eq!(&input[r], b"hi");
        let s2 = step(&mut input, s.consumed, len, &mut st, &ParseConfig::SERVER);
        assert_eq!(&input[s2.out], &server(true, OpCode::Binary, b"z")[..]);
        assert_eq!(s2.consumed, len);
    }

    #[test]
    fn mid_frame_says_whether_the_other_leg_is_inside_a_frame() {
        let cfg = &ParseConfig::SERVER;
        let input = masked(true, OpCode::Binary, &[7u8; 100], [1, 2, 3, 4]);
        let mut st = Deframer::default();
        let mut buf = input[..50].to_vec();
        let s = step(&mut buf, 0, 50, &mut st, cfg);
        assert!(s.mid_frame && s.out.len() == 2 + 44, "{s:?}");
        assert_eq!(st.frame_rest(), Some(56));
        let mut buf = input[50..].to_vec();
        let s = step(&mut buf, 0, 56, &mut st, cfg);
        assert!(!s.mid_frame && s.frames == 1, "{s:?}");
        assert_eq!(st.frame_rest(), None);
        // A control frame after a complete frame: not inside one.
        let mut buf = masked(true, OpCode::Binary, b"ab", [1, 2, 3, 4]);
        buf.extend(masked(true, OpCode::Ping, b"", [1, 2, 3, 4]));
        let len = buf.len();
        let s = step(&mut buf, 0, len, &mut Deframer::default(), cfg);
        assert!(matches!(s.event, Some(Event::Ping(_))) && !s.mid_frame, "{s:?}");
        // Bad UTF-8 in the first chunk: the header is held back, so the leg is not inside it.
        let mut buf = masked(true, OpCode::Text, &[b'a', 0xFF, b'b', b'c'], [1, 2, 3, 4]);
        let s = step(&mut buf, 0, 8, &mut Deframer::default(), cfg);
        assert!(s.event == Some(Event::BadUtf8) && s.out.is_empty() && !s.mid_frame, "{s:?}");
        // Bad UTF-8 in a later chunk: the header already went out.
        let text = masked(true, OpCode::Text, &[b'a', b'b', 0xFF, b'c'], [1, 2, 3, 4]);
        let mut st = Deframer::default();
        let mut buf = text[..7].to_vec();
        assert!(step(&mut buf, 0, 7, &mut st, cfg).mid_frame);
        let mut buf = text[7..].to_vec();
        let s = step(&mut buf, 0, 3, &mut st, cfg);
        assert!(s.event == Some(Event::BadUtf8) && s.mid_frame, "{s:?}");
    }

    #[test]
    fn violations_are_reported_with_their_close_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x82 | 0x40, 0x80, 0, 0, 0, 0], 1002), // RSV2
            (vec![0x83, 0x80, 0, 0, 0, 0], 1002),        // opcode 3
            (vec![0x82, 0x00], 1002),                    // unmasked
            (vec![0x09, 0x80, 0, 0, 0, 0], 1002),        // fragmented ping
            (vec![0x89, 0xFE, 0, 200], 1002),            // long ping
            (vec![0x82, 0xFF, 0, 0, 0, 0, 0, 0x20, 0, 0], 1009),
            (vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0], 1002), // top bit
        ];
        for (mut input, code) in cases {
            let len = input.len();
            let s = step(&mut input, 0, len, &mut Deframer::default(), &ParseConfig::SERVER);
            match s.event {
                Some(Event::Violation(c, _)) => assert_eq!(c, code, "{input:?}"),
                other => panic!("{input:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_empty_last_fragment_after_half_a_character_is_held_back_and_not_counted() {
        // Found by the `forward_step` fuzz target: a text message whose last fragment is empty
        // while a UTF-8 sequence is incomplete is bad (1007); its frame is held back, so it must
        // not count as a forwarded frame either (the counters matched `out` in every other case).
        let mut input = masked(false, OpCode::Text, b"h\xCA", [0x37, 0xfa, 0x61, 0x3d]);
        input.extend(masked(true, OpCode::Continuation, b"", [0x80; 4]));
        let len = input.len();
        let s = step(&mut input, 0, len, &mut Deframer::default(), &ParseConfig::SERVER);
        assert_eq!(s.event, Some(Event::BadUtf8));
        assert_eq!(&input[s.out.clone()], &server(false, OpCode::Text, b"h\xCA")[..]);
        assert_eq!((s.payload, s.frames, s.mid_frame), (2, 1, false), "{s:?}");
    }

    #[test]
    fn text_utf8_is_checked_across_fragments_and_chunks() {
        let s = "héllo wörld €".as_bytes();
        let mut input = masked(false, OpCode::Text, &s[..2], [1, 2, 3, 4]);
        input.extend(masked(true, OpCode::Continuation, &s[2..], [4, 3, 2, 1]));
        let len = input.len();
        let mut st = Deframer::default();
        let r = step(&mut input, 0, len, &mut st, &ParseConfig::SERVER);
        assert_eq!(r.event, None);
        let mut bad = masked(true, OpCode::Text, &[b'a', 0xFF, b'b'], [1, 2, 3, 4]);
        let len = bad.len();
        let r = step(&mut bad, 0, len, &mut Deframer::default(), &ParseConfig::SERVER);
        assert_eq!(r.event, Some(Event::BadUtf8));
        let mut cut = masked(true, OpCode::Text, &s[..2], [1, 2, 3, 4]);
        let len = cut.len();
        let r = step(&mut cut, 0, len, &mut Deframer::default(), &ParseConfig::SERVER);
        assert_eq!(r.event, Some(Event::BadUtf8));
        let mut frag = masked(true, OpCode::Continuation, b"x", [1, 2, 3, 4]);
        let len = frag.len();
        let r = step(&mut frag, 0, len, &mut Deframer::default(), &ParseConfig::SERVER);
        assert_eq!(r.event, Some(Event::BadFragment));
    }

    // Property tests. The step is the one decoder that sees a peer's bytes at the relay's
    // speed, so beyond the cases above: whatever the bytes, state, range and limit, it stays
    // inside its range and never panics; and however the reads cut a valid stream, driven as
    // the relay's pump drives it, the same bytes and events come out, and they are the
    // original messages as server frames.

    use proptest::prelude::*;

    use crate::frame::Masking;

    /// Masked client frames, built from messages the way a client sends them.
    #[derive(Debug, Clone)]
    enum Item {
        /// A data message, cut into frames at these byte offsets, with a ping before the
        /// fragment at each index in `pings` (control frames may come between fragments).
        Message {
            text: bool,
            payload: Vec<u8>,
            cuts: Vec<usize>,
            pings: Vec<usize>,
        },
        Ping(Vec<u8>),
        Pong(Vec<u8>),
    }

    /// An event with its payload copied out of the buffer, and how many forwarded bytes had
    /// gone out when it came (so the order of data and events is compared too).
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Ping(usize, Vec<u8>),
        Pong(usize),
        Close(usize, Vec<u8>),
        Violation(usize, u16, FrameError),
        BadUtf8(usize),
        BadFragment(usize),
    }

    /// What one leg's pump forwarded and saw.
    #[derive(Debug, PartialEq, Eq)]
    struct Run {
        out: Vec<u8>,
        payload: u64,
        frames: u64,
        events: Vec<Seen>,
        /// Bytes left unconsumed when the input ran out (0 if an event ended the leg first).
        tail: usize,
    }

    /// Drives `step` as `forward_loop` in `relay/src/data/pair.rs` does: each read lands in a
    /// fresh buffer behind the carried tail (at most `MAX_TAIL` bytes), the step runs from `pos`
    /// again after every ping or pong, and a close or a violation ends the leg. Reads end at
    /// the `cuts` offsets of `input`. Each buffer has spare bytes after the read, as a pooled
    /// one has, and the step must leave them alone.
    fn pump(input: &[u8], cuts: &[usize], cfg: &ParseConfig) -> Run {
        let mut ends: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
        ends.push(input.len());
        ends.sort_unstable();
        let mut st = Deframer::default();
        let mut carry = [0u8; MAX_TAIL];
        let mut clen = 0usize;
        let mut at = 0;
        let mut run = Run { out: Vec::new(), payload: 0, frames: 0, events: Vec::new(), tail: 0 };
        'reads: for read_end in ends {
            if read_end == at {
                continue;
            }
            let mut buf = carry[..clen].to_vec();
            buf.extend_from_slice(&input[at..read_end]);
            at = read_end;
            let len = buf.len();
            buf.resize(len + 32, 0xA5);
            let mut pos = 0;
            loop {
                let s = step(&mut buf, pos, len, &mut st, cfg);
                assert!(buf[len..].iter().all(|&b| b == 0xA5), "wrote past the read");
                run.out.extend_from_slice(&buf[s.out.clone()]);
                run.payload += s.payload;
                run.frames += u64::from(s.frames);
                pos = s.consumed;
                let n = run.out.len();
                let seen = match s.event {
                    None => break,
                    Some(Event::Ping(r)) => Seen::Ping(n, buf[r].to_vec()),
                    Some(Event::Pong) => Seen::Pong(n),
                    Some(Event::Close(r)) => Seen::Close(n, buf[r].to_vec()),
                    Some(Event::Violation(c, e)) => Seen::Violation(n, c, e),
                    Some(Event::BadUtf8) => Seen::BadUtf8(n),
                    Some(Event::BadFragment) => Seen::BadFragment(n),
                };
                let ends_leg = !matches!(seen, Seen::Ping(..) | Seen::Pong(_));
                run.events.push(seen);
                if ends_leg {
                    break 'reads;
                }
            }
            clen = len - pos;
            assert!(clen <= MAX_TAIL, "a tail of {clen} bytes");
            carry[..clen].copy_from_slice(&buf[pos..len]);
            run.tail = clen;
        }
        if run.events.last().is_some_and(|e| !matches!(e, Seen::Ping(..) | Seen::Pong(_))) {
            run.tail = 0;
        }
        run
    }

    /// Server frames as a client reads them: (fin, opcode, payload) each.
    fn parse_server(mut b: &[u8]) -> Vec<(bool, OpCode, Vec<u8>)> {
        let cfg = ParseConfig { max_payload: u64::MAX, masking: Masking::Forbidden };
        let mut frames = Vec::new();
        while !b.is_empty() {
            let h = FrameHeader::parse(b, &cfg).unwrap().expect("a whole header");
            let end = h.frame_len() as usize;
            frames.push((h.fin, h.opcode, b[h.header_len..end].to_vec()));
            b = &b[end..];
        }
        frames
    }

    /// A client's stream and what must come of it.
    struct Sent {
        /// The masked frames on the wire.
        wire: Vec<u8>,
        /// What a reader of the forwarded stream must get back: (text, payload) per message.
        messages: Vec<(bool, Vec<u8>)>,
        /// The ping payloads the relay must see, in order.
        pings: Vec<Vec<u8>>,
    }

    /// The masked frames of `items`, with the mask keys taken in turn from `keys`.
    fn client_stream(items: &[Item], keys: &[[u8; 4]]) -> Sent {
        let mut wire = Vec::new();
        let mut messages = Vec::new();
        let mut pings = Vec::new();
        let mut k = 0;
        let mut key = || {
            k += 1;
            keys[k % keys.len()]
        };
        for item in items {
            match item {
                Item::Message { text, payload, cuts, pings: before } => {
                    let mut at: Vec<usize> =
                        cuts.iter().map(|&c| c % (payload.len() + 1)).collect();
                    at.sort_unstable();
                    at.dedup();
                    at.retain(|&c| c != 0 && c != payload.len());
                    at.insert(0, 0);
                    at.push(payload.len());
                    let last = at.len() - 2;
                    for (i, w) in at.windows(2).enumerate() {
                        if before.contains(&i) {
                            let p = vec![i as u8; i];
                            wire.extend(masked(true, OpCode::Ping, &p, key()));
                            pings.push(p);
                        }
                        let op = match (i, text) {
                            (0, true) => OpCode::Text,
                            (0, false) => OpCode::Binary,
                            _ => OpCode::Continuation,
                        };
                        wire.extend(masked(i == last, op, &payload[w[0]..w[1]], key()));
                    }
                    messages.push((*text, payload.clone()));
                }
                Item::Ping(p) => {
                    wire.extend(masked(true, OpCode::Ping, p, key()));
                    pings.push(p.clone());
                }
                Item::Pong(p) => wire.extend(masked(true, OpCode::Pong, p, key())),
            }
        }
        Sent { wire, messages, pings }
    }

    fn any_item() -> impl Strategy<Value = Item> {
        let control = proptest::collection::vec(any::<u8>(), 0..=125);
        let cuts = proptest::collection::vec(any::<usize>(), 0..4);
        let pings = proptest::collection::vec(0..4usize, 0..2);
        prop_oneof![
            4 => (proptest::collection::vec(any::<u8>(), 0..700), cuts.clone(), pings.clone())
                .prop_map(|(payload, cuts, pings)| Item::Message {
                    text: false, payload, cuts, pings
                }),
            // Text of any characters, multi-byte ones included; the frame cuts fall anywhere,
            // also inside a character.
            4 => (proptest::collection::vec(any::<char>(), 0..120), cuts, pings)
                .prop_map(|(chars, cuts, pings)| Item::Message {
                    text: true,
                    payload: String::from_iter(chars).into_bytes(),
                    cuts,
                    pings,
                }),
            1 => control.clone().prop_map(Item::Ping),
            1 => control.prop_map(Item::Pong),
        ]
    }

    /// Bytes that reach many states: valid masked frames, cut short or with a byte changed,
    /// or noise.
    fn any_wire() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            (
                proptest::collection::vec(any_item(), 0..4),
                any::<[u8; 4]>(),
                any::<prop::sample::Index>(),
                any::<prop::sample::Index>(),
                any::<u8>(),
            )
                .prop_map(|(items, key, cut, flip, xor)| {
                    let mut wire = client_stream(&items, &[key]).wire;
                    if !wire.is_empty() {
                        let i = flip.index(wire.len());
                        wire[i] ^= xor;
                    }
                    wire.truncate(cut.index(wire.len() + 1));
                    wire
                }),
        ]
    }

    fn any_config() -> impl Strategy<Value = ParseConfig> {
        (
            prop_oneof![0..300u64, Just(frame::DEFAULT_MAX_PAYLOAD), any::<u64>()],
            prop_oneof![
                4 => Just(Masking::Required),
                1 => Just(Masking::Forbidden),
                1 => Just(Masking::Any),
            ],
        )
            .prop_map(|(max_payload, masking)| ParseConfig { max_payload, masking })
    }

    proptest! {
        #[test]
        fn any_bytes_state_and_range_stay_inside_the_range_without_panic(
            prior in any_wire(),
            prior_cfg in any_config(),
            buf in any_wire(),
            a in any::<prop::sample::Index>(),
            b in any::<prop::sample::Index>(),
            cfg in any_config(),
        ) {
            // A prior state: whatever feeding `prior` (stepping on after pings and pongs) left.
            let mut st = Deframer::default();
            let mut prior = prior;
            let (mut pos, len) = (0, prior.len());
            loop {
                let s = step(&mut prior, pos, len, &mut st, &prior_cfg);
                pos = s.consumed;
                if !matches!(s.event, Some(Event::Ping(_) | Event::Pong)) {
                    break;
                }
            }
            let (x, y) = (a.index(buf.len() + 1), b.index(buf.len() + 1));
            let (start, end) = (x.min(y), x.max(y));
            let mut after = buf.clone();
            let s = step(&mut after, start, end, &mut st, &cfg);
            prop_assert!(start <= s.out.start && s.out.start <= s.out.end, "{:?}", s);
            prop_assert!(s.out.end <= s.consumed && s.consumed <= end, "{:?}", s);
            prop_assert_eq!(&after[..start], &buf[..start]);
            prop_assert_eq!(&after[end..], &buf[end..]);
            match &s.event {
                Some(Event::Ping(r) | Event::Close(r)) => {
                    prop_assert!(s.out.end <= r.start && r.end == s.consumed, "{:?}", s);
                }
                Some(Event::Violation(code, e)) => prop_assert_eq!(*code, e.close_code()),
                None => prop_assert!(end - s.consumed <= MAX_TAIL, "{:?}", s),
                _ => {}
            }
            // Every payload byte counted went out.
            prop_assert!(s.payload <= (s.out.end - s.out.start) as u64, "{:?}", s);
        }

        #[test]
        fn any_cuts_of_valid_frames_forward_what_one_read_forwards(
            items in proptest::collection::vec(any_item(), 0..8),
            keys in proptest::collection::vec(any::<[u8; 4]>(), 1..4),
            close in proptest::option::of(proptest::collection::vec(any::<u8>(), 2..=125)),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
            small_reads in any::<bool>(),
        ) {
            let Sent { mut wire, messages, pings } = client_stream(&items, &keys);
            if let Some(reason) = &close {
                wire.extend(masked(true, OpCode::Close, reason, keys[0]));
            }
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            if small_reads {
                // Also reads of 1-7 bytes all through, so every header is cut.
                let n = cuts.len() % 7 + 1;
                cuts.extend((0..wire.len()).step_by(n));
            }
            let cfg = ParseConfig::SERVER;
            let whole = pump(&wire, &[], &cfg);
            let chunked = pump(&wire, &cuts, &cfg);
            prop_assert_eq!(&chunked, &whole);
            prop_assert_eq!(whole.tail, 0);

            // The forwarded stream is the original messages as server frames, and the events
            // are the pings and pongs in order, then the close.
            let frames = parse_server(&whole.out);
            prop_assert_eq!(whole.frames, frames.len() as u64);
            let payload: usize = frames.iter().map(|f| f.2.len()).sum();
            prop_assert_eq!(whole.payload, payload as u64);
            let mut got: Vec<(bool, Vec<u8>)> = Vec::new();
            let mut open = false;
            for (fin, op, p) in frames {
                match op {
                    OpCode::Continuation => {
                        prop_assert!(open);
                        got.last_mut().unwrap().1.extend_from_slice(&p);
                    }
                    OpCode::Text | OpCode::Binary => {
                        prop_assert!(!open);
                        got.push((op == OpCode::Text, p));
                    }
                    _ => prop_assert!(false, "control frame forwarded: {:?}", op),
                }
                open = !fin;
            }
            prop_assert!(!open);
            prop_assert_eq!(got, messages);
            let got_pings: Vec<Vec<u8>> = whole
                .events
                .iter()
                .filter_map(|e| match e {
                    Seen::Ping(_, p) => Some(p.clone()),
                    _ => None,
                })
                .collect();
            prop_assert_eq!(got_pings, pings);
            let last = whole.events.last();
            match &close {
                Some(reason) => prop_assert_eq!(
                    last,
                    Some(&Seen::Close(whole.out.len(), reason.clone()))
                ),
                None => prop_assert!(
                    !matches!(last, Some(e) if !matches!(e, Seen::Ping(..) | Seen::Pong(_))),
                    "{:?}",
                    last
                ),
            }
        }
    }
}
