//! The relay's forward step (`hatch_proto::forward::step`) on one leg's byte stream, cut into
//! reads where the input says and driven exactly as the relay's pump drives it: the unconsumed
//! tail is copied to the front of the next buffer, and the step is called again after each ping
//! or pong. Every call must stay inside `buf[start..end]` (the bytes around it unchanged), never
//! move backwards, and leave at most `MAX_TAIL` bytes. What goes out must be well-formed server
//! frames, headers whole in one write, `mid_frame` saying truly whether the other leg is inside
//! a frame, and the counters must match them. And the run must agree with a plain reference
//! decoder that reads the whole stream at once: the same events in the same order (violation
//! codes, ping and close payloads), and the same forwarded frames; after bad UTF-8, at least
//! everything before the bad frame and nothing the reference would not send.
//!
//! Input: byte 0 picks the maximum payload, byte 1 the number `k` (0–7) of read lengths that
//! follow (one byte each: 1–255, 0 for "the rest"), cycled over; then the stream. With `k == 0`
//! the stream arrives in one read.

#![no_main]

use hatch_proto::forward::{Deframer, Event, MAX_TAIL, step};
use hatch_proto::frame::{
    self, DEFAULT_MAX_PAYLOAD, FrameError, FrameHeader, Masking, OpCode, ParseConfig,
};
use libfuzzer_sys::fuzz_target;

/// Bytes after `end` in each buffer, as a pooled buffer has, which the step must not touch.
const SLACK: usize = 16;
const SENTINEL: u8 = 0xA5;

/// An event with its payload copied out of the buffer.
#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Ping(Vec<u8>),
    Pong,
    Close(Vec<u8>),
    Violation(u16, FrameError),
    BadUtf8,
    BadFragment,
}

impl Ev {
    fn ends_the_leg(&self) -> bool {
        !matches!(self, Ev::Ping(_) | Ev::Pong)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&limit, rest)) = data.split_first() else { return };
    let max_payload = match limit % 4 {
        0 => DEFAULT_MAX_PAYLOAD,
        1 => u64::from(limit >> 2),
        2 => u64::MAX,
        _ => 1 << 16,
    };
    let (k, rest) = match rest.split_first() {
        Some((&k, rest)) => ((k % 8) as usize, rest),
        None => (0, rest),
    };
    let k = k.min(rest.len());
    let (lens, stream) = rest.split_at(k);
    let cfg = ParseConfig { max_payload, masking: Masking::Required };
    let run = pump(stream, lens, &cfg);
    let want = reference(stream, &cfg);
    assert_eq!(run.events, want.events, "events differ");
    match run.events.last() {
        Some(Ev::BadUtf8) => {
            assert!(run.out.starts_with(&want.out), "frames before the bad one are missing");
            assert!(want.out_with_bad.starts_with(&run.out), "more than the reference went out");
        }
        _ => assert_eq!(run.out, want.out, "forwarded bytes differ"),
    }
});

/// What a pump run forwarded and saw.
struct Run {
    out: Vec<u8>,
    events: Vec<Ev>,
}

/// Drives `step` as `relay/src/data/pair.rs` `forward_loop` does, with reads cut at `lens`.
fn pump(stream: &[u8], lens: &[u8], cfg: &ParseConfig) -> Run {
    let mut st = Deframer::default();
    let mut carry = [0u8; MAX_TAIL];
    let mut clen = 0usize;
    let mut at = 0usize; // next stream byte to read
    let mut read_no = 0usize;
    let mut walker = Walker::new(cfg.max_payload);
    let mut run = Run { out: Vec::new(), events: Vec::new() };
    let (mut payload, mut frames) = (0u64, 0u64);
    'reads: while at < stream.len() {
        let n = match lens.get(read_no % lens.len().max(1)) {
            None | Some(0) => stream.len() - at,
            Some(&l) => usize::from(l).min(stream.len() - at),
        };
        read_no += 1;
        let mut buf = Vec::with_capacity(clen + n + SLACK);
        buf.extend_from_slice(&carry[..clen]);
        buf.extend_from_slice(&stream[at..at + n]);
        at += n;
        let len = buf.len();
        buf.resize(len + SLACK, SENTINEL);
        let mut pos = 0;
        loop {
            let before = buf.clone();
            let start = pos;
            let s = step(&mut buf, start, len, &mut st, cfg);
            // Inside the range, ordered, and nothing outside it written.
            assert!(start <= s.out.start && s.out.start <= s.out.end, "{start} {s:?}");
            assert!(s.out.end <= s.consumed && s.consumed <= len, "{len} {s:?}");
            assert_eq!(&buf[..start], &before[..start], "wrote before start");
            assert_eq!(&buf[len..], &before[len..], "wrote past end");
            // Headers go out whole; mid_frame says whether the other leg is inside a frame.
            walker.feed(&buf[s.out.clone()]);
            run.out.extend_from_slice(&buf[s.out.clone()]);
            payload += s.payload;
            frames += u64::from(s.frames);
            assert_eq!((walker.payload, walker.frames), (payload, frames), "counters");
            assert_eq!(s.mid_frame, walker.rest > 0, "mid_frame");
            if s.event != Some(Event::BadUtf8) {
                assert_eq!(s.mid_frame, st.frame_rest().is_some(), "frame_rest");
            }
            pos = s.consumed;
            let Some(event) = s.event.clone() else { break };
            let ev = match event {
                Event::Ping(r) => {
                    assert!(r.end == s.consumed && r.start >= s.out.end, "{r:?} {s:?}");
                    Ev::Ping(buf[r].to_vec())
                }
                Event::Pong => Ev::Pong,
                Event::Close(r) => {
                    assert!(r.end == s.consumed && r.start >= s.out.end, "{r:?} {s:?}");
                    Ev::Close(buf[r].to_vec())
                }
                Event::Violation(code, e) => {
                    assert!(hatch_proto::close::is_valid_on_wire(code));
                    assert_eq!(code, e.close_code());
                    Ev::Violation(code, e)
                }
                Event::BadUtf8 => Ev::BadUtf8,
                Event::BadFragment => Ev::BadFragment,
            };
            let ends = ev.ends_the_leg();
            if !ends {
                // A ping or pong consumed its frame: the pump's inner loop makes progress.
                assert!(s.consumed > start, "{start} {s:?}");
            }
            run.events.push(ev);
            if ends {
                break 'reads;
            }
        }
        clen = len - pos;
        assert!(clen <= MAX_TAIL, "carry of {clen} bytes");
        carry[..clen].copy_from_slice(&buf[pos..len]);
    }
    run
}

/// Follows the forwarded server frames write by write.
struct Walker {
    max_payload: u64,
    rest: u64,
    payload: u64,
    frames: u64,
}

impl Walker {
    fn new(max_payload: u64) -> Self {
        Walker { max_payload, rest: 0, payload: 0, frames: 0 }
    }

    fn feed(&mut self, mut b: &[u8]) {
        let cfg = ParseConfig { max_payload: self.max_payload, masking: Masking::Forbidden };
        while !b.is_empty() {
            if self.rest == 0 {
                let h = match FrameHeader::parse(b, &cfg) {
                    Ok(Some(h)) => h,
                    other => panic!("forwarded bytes are not a whole server header: {other:?}"),
                };
                assert!(!h.opcode.is_control(), "a control frame was forwarded");
                b = &b[h.header_len..];
                self.rest = h.payload_len;
                if self.rest == 0 {
                    self.frames += 1;
                }
                continue;
            }
            let n = (b.len() as u64).min(self.rest) as usize;
            b = &b[n..];
            self.rest -= n as u64;
            self.payload += n as u64;
            if self.rest == 0 {
                self.frames += 1;
            }
        }
    }
}

/// What the reference decoder expects.
struct Want {
    /// Server frames for every data frame before the first bad one (the last may be partial).
    out: Vec<u8>,
    /// `out` plus the bad frame's header and payload, after bad UTF-8.
    out_with_bad: Vec<u8>,
    events: Vec<Ev>,
}

/// Decodes the whole stream at once, frame by frame, with RFC 6455's rules spelled out.
fn reference(s: &[u8], cfg: &ParseConfig) -> Want {
    let mut want = Want { out: Vec::new(), out_with_bad: Vec::new(), events: Vec::new() };
    let mut i = 0;
    let mut in_message = false;
    let mut text = false;
    let mut msg: Vec<u8> = Vec::new();
    loop {
        let h = match FrameHeader::parse(&s[i..], cfg) {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => {
                want.events.push(Ev::Violation(e.close_code(), e));
                break;
            }
        };
        let mask = h.mask.expect("Masking::Required");
        let hl = h.header_len;
        if h.opcode.is_control() {
            let len = h.frame_len() as usize;
            if s.len() - i < len {
                break;
            }
            let mut p = s[i + hl..i + len].to_vec();
            frame::unmask(&mut p, mask, 0);
            i += len;
            match h.opcode {
                OpCode::Ping => want.events.push(Ev::Ping(p)),
                OpCode::Pong => want.events.push(Ev::Pong),
                _ => {
                    want.events.push(Ev::Close(p));
                    break;
                }
            }
            continue;
        }
        match h.opcode {
            OpCode::Continuation if !in_message => {
                want.events.push(Ev::BadFragment);
                break;
            }
            OpCode::Text | OpCode::Binary if in_message => {
                want.events.push(Ev::BadFragment);
                break;
            }
            OpCode::Text => {
                text = true;
                msg.clear();
            }
            OpCode::Binary => text = false,
            _ => {}
        }
        in_message = !h.fin;
        let avail = ((s.len() - i - hl) as u64).min(h.payload_len) as usize;
        let complete = avail as u64 == h.payload_len;
        let mut p = s[i + hl..i + hl + avail].to_vec();
        frame::unmask(&mut p, mask, 0);
        let mut server = [0u8; frame::MAX_HEADER_LEN];
        let n = frame::encode_header(h.fin, h.opcode, h.payload_len, None, &mut server);
        if text {
            msg.extend_from_slice(&p);
            let ok = match std::str::from_utf8(&msg) {
                Ok(_) => true,
                // An incomplete sequence at the end is fine until the message's last byte.
                Err(e) => e.error_len().is_none() && !(complete && h.fin),
            };
            if !ok {
                want.out_with_bad = want.out.clone();
                want.out_with_bad.extend_from_slice(&server[..n]);
                want.out_with_bad.extend_from_slice(&p);
                want.events.push(Ev::BadUtf8);
                break;
            }
        }
        want.out.extend_from_slice(&server[..n]);
        want.out.extend_from_slice(&p);
        if !complete {
            break;
        }
        i += hl + avail;
    }
    want
}
