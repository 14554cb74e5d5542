//! Export of a recording as asciicast v2, the newline-delimited JSON of asciinema (its
//! terminal player and web player read it):
//!
//! ```text
//! {"version":2,"width":80,"height":24,"timestamp":1700000000,"title":"s-…","env":{…}}
//! [0.248848,"o","hello\r\n"]           output
//! [1.001376,"i","ls\r"]                input (recorded with `full` only)
//! [2.500000,"r","100x30"]              resize: "COLSxROWS"
//! [3.000000,"m","resumed"]             the session resumed (a marker)
//! [9.120000,"m","exit 4"]              the exit status (a marker)
//! ```
//!
//! asciicast v2 has no exit event (the `"x"` event is asciicast v3 only), and the header,
//! where a field could carry it, is written before the records that hold the status are
//! read. So the exit status is the marker `"exit N"`, the last event of a session that
//! exited; players show markers as points to jump to, and ignore them otherwise. A `Resumed`
//! record becomes the marker `"resumed"` (with `", N torn bytes dropped"` when the resume cut
//! a torn record), a `Marker` record the marker with its text.
//!
//! The recording is byte-exact; the export is lossy where the output is not UTF-8: JSON
//! strings are Unicode, so each invalid sequence becomes U+FFFD, exactly as
//! `String::from_utf8_lossy` would turn the whole stream. A character split across records
//! is not invalid: its first bytes are carried to the next event of the same stream (output
//! and input each have their own), which is where the character completes. The export is
//! streamed: one record in memory at a time, however long the recording.

use std::io::{self, Read, Write};

use serde::Serialize;
use thiserror::Error;

use super::format::{Digest, Event};
use super::verify::{Reader, VerifyError};

/// The asciicast format version written.
pub const ASCIICAST_VERSION: u32 = 2;

/// What goes into the header besides what the recording holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportOptions {
    /// `env.TERM` of the header (the client's terminal type), when known.
    pub term: Option<String>,
    /// `env.SHELL` of the header, when known.
    pub shell: Option<String>,
}

/// Why an export stopped. What was written before the error is valid asciicast up to the
/// last whole event.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The recording does not verify (the export stops at the first broken record: it never
    /// shows what the chain does not vouch for).
    #[error("recording: {0}")]
    Recording(#[from] VerifyError),
    /// Writing the asciicast failed.
    #[error("writing asciicast: {0}")]
    Write(#[source] io::Error),
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Events written (header excluded).
    pub events: u64,
    /// The exit status, if the recording has one.
    pub exit: Option<i32>,
    /// The final chain digest of the recording read.
    pub digest: Digest,
    /// Invalid UTF-8 sequences replaced by U+FFFD.
    pub replaced: u64,
}

#[derive(Serialize)]
struct Env<'a> {
    #[serde(rename = "TERM", skip_serializing_if = "Option::is_none")]
    term: Option<&'a str>,
    #[serde(rename = "SHELL", skip_serializing_if = "Option::is_none")]
    shell: Option<&'a str>,
}

#[derive(Serialize)]
struct AsciicastHeader<'a> {
    version: u32,
    width: u16,
    height: u16,
    /// Unix seconds.
    timestamp: u64,
    title: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    env: Option<Env<'a>>,
}

/// Reads the recording from `src` (checking its chain) and writes it to `out` as asciicast v2.
pub fn export<R: Read, W: Write>(
    src: R,
    out: W,
    opts: &ExportOptions,
) -> Result<ExportSummary, ExportError> {
    let mut r = Reader::new(src)?;
    let mut out = io::BufWriter::new(out);
    let h = r.header();
    let env = (opts.term.is_some() || opts.shell.is_some())
        .then_some(Env { term: opts.term.as_deref(), shell: opts.shell.as_deref() });
    let header = AsciicastHeader {
        version: ASCIICAST_VERSION,
        width: h.cols,
        height: h.rows,
        timestamp: h.start_unix_ms / 1000,
        title: &h.session_id,
        env,
    };
    serde_json::to_writer(&mut out, &header).map_err(|e| ExportError::Write(e.into()))?;
    out.write_all(b"\n").map_err(ExportError::Write)?;

    let mut output = Utf8Stream::default();
    let mut input = Utf8Stream::default();
    let mut text = String::new();
    let mut events = 0u64;
    let mut exit = None;
    let mut last_us = 0;
    while let Some(rec) = r.next_record()? {
        last_us = rec.time_us;
        text.clear();
        let code = match rec.event {
            Event::Output(b) => {
                output.decode(b, &mut text);
                "o"
            }
            Event::Input(b) => {
                input.decode(b, &mut text);
                "i"
            }
            Event::Resize { cols, rows } => {
                text.push_str(&format!("{cols}x{rows}"));
                "r"
            }
            Event::Exit(status) => {
                exit = Some(status);
                text.push_str(&format!("exit {status}"));
                "m"
            }
            Event::Resumed { dropped_tail, .. } => {
                text.push_str("resumed");
                if dropped_tail > 0 {
                    text.push_str(&format!(", {dropped_tail} torn bytes dropped"));
                }
                "m"
            }
            Event::Marker(s) => {
                text.push_str(s);
                "m"
            }
        };
        // An output or input record that only began a character has nothing to show yet.
        if text.is_empty() && matches!(code, "o" | "i") {
            continue;
        }
        write_event(&mut out, rec.time_us, code, &text).map_err(ExportError::Write)?;
        events += 1;
    }
    // A stream that ends inside a character: one U+FFFD, as `from_utf8_lossy` gives.
    for (stream, code) in [(&mut output, "o"), (&mut input, "i")] {
        text.clear();
        if stream.finish(&mut text) {
            write_event(&mut out, last_us, code, &text).map_err(ExportError::Write)?;
            events += 1;
        }
    }
    out.flush().map_err(ExportError::Write)?;
    Ok(ExportSummary {
        events,
        exit,
        digest: r.digest(),
        replaced: output.replaced + input.replaced,
    })
}

/// One event line: `[seconds, code, text]`, the time with exactly six decimals (written from
/// the integer µs, so no float rounding creeps in).
fn write_event<W: Write>(out: &mut W, time_us: u64, code: &str, text: &str) -> io::Result<()> {
    write!(out, "[{}.{:06}, \"{code}\", ", time_us / 1_000_000, time_us % 1_000_000)?;
    serde_json::to_writer(&mut *out, text).map_err(io::Error::from)?;
    out.write_all(b"]\n")
}

/// Decodes one byte stream (output or input) into UTF-8 text piece by piece, carrying an
/// incomplete character from one piece to the next. The pieces joined are exactly
/// `String::from_utf8_lossy` of the bytes joined.
#[derive(Debug, Default)]
struct Utf8Stream {
    /// The first bytes of a character that the last piece ended inside (a valid prefix).
    carry: [u8; 4],
    carry_len: usize,
    /// U+FFFD substitutions made.
    replaced: u64,
}

impl Utf8Stream {
    /// Appends the text of `input` (after what was carried) to `out`.
    fn decode(&mut self, mut input: &[u8], out: &mut String) {
        if self.carry_len > 0 {
            // The carry and at most three more bytes settle the carried character.
            let take = input.len().min(4 - self.carry_len);
            let mut tmp = [0u8; 4];
            tmp[..self.carry_len].copy_from_slice(&self.carry[..self.carry_len]);
            tmp[self.carry_len..self.carry_len + take].copy_from_slice(&input[..take]);
            let tmp = &tmp[..self.carry_len + take];
            match std::str::from_utf8(tmp) {
                Ok(s) => {
                    // A whole character and nothing more (take was cut to fit one): but the
                    // bytes taken may hold more characters after it, if the carry was short.
                    let first = s.chars().next().expect("non-empty");
                    let used = first.len_utf8() - self.carry_len;
                    out.push(first);
                    input = &input[used..];
                    self.carry_len = 0;
                }
                Err(e) if e.valid_up_to() > 0 => {
                    let first = std::str::from_utf8(&tmp[..e.valid_up_to()])
                        .expect("valid prefix")
                        .chars()
                        .next()
                        .expect("non-empty");
                    out.push(first);
                    input = &input[first.len_utf8() - self.carry_len..];
                    self.carry_len = 0;
                }
                Err(e) => match e.error_len() {
                    // The carry was a valid prefix, so the invalid sequence (the longest
                    // valid prefix, `n` bytes) holds all of it and perhaps bytes of `input`:
                    // one U+FFFD for them all, as `from_utf8_lossy` gives.
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        self.replaced += 1;
                        input = &input[n - self.carry_len..];
                        self.carry_len = 0;
                    }
                    // Still not complete: every byte of `input` joined the carry.
                    None => {
                        self.carry[self.carry_len..self.carry_len + take]
                            .copy_from_slice(&input[..take]);
                        self.carry_len += take;
                        return;
                    }
                },
            }
        }
        loop {
            match std::str::from_utf8(input) {
                Ok(s) => {
                    out.push_str(s);
                    return;
                }
                Err(e) => {
                    let (valid, rest) = input.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).expect("valid prefix"));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.replaced += 1;
                            input = &rest[n..];
                        }
                        None => {
                            // An incomplete character at the end (at most 3 bytes).
                            self.carry[..rest.len()].copy_from_slice(rest);
                            self.carry_len = rest.len();
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Ends the stream: a carried, never completed character becomes U+FFFD. Returns whether
    /// anything was appended.
    fn finish(&mut self, out: &mut String) -> bool {
        if self.carry_len == 0 {
            return false;
        }
        self.carry_len = 0;
        self.replaced += 1;
        out.push(char::REPLACEMENT_CHARACTER);
        true
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::recording::format::{Chain, Header, encode_record};

    fn header() -> Header {
        Header {
            session_id: "s-0123456789abcdef".into(),
            account: "acct".into(),
            instance: "i-1".into(),
            principal: "alice".into(),
            start_unix_ms: 1_700_000_000_123,
            cols: 80,
            rows: 24,
        }
    }

    fn recording(events: &[(u64, Event<'_>)]) -> Vec<u8> {
        let mut out = Vec::new();
        header().encode(&mut out).unwrap();
        let mut chain = Chain::new(&out);
        for (t, e) in events {
            encode_record(*t, e, &mut chain, &mut out).unwrap();
        }
        out
    }

    fn cast(events: &[(u64, Event<'_>)], opts: &ExportOptions) -> (String, ExportSummary) {
        let mut out = Vec::new();
        let s = export(recording(events).as_slice(), &mut out, opts).unwrap();
        (String::from_utf8(out).unwrap(), s)
    }

    /// A whole export, byte for byte.
    #[test]
    fn golden_export() {
        let events = [
            (248_848, Event::Output(b"\x1b[1;31mHello\r\n")),
            (1_001_376, Event::Input(b"ls\r")),
            (2_000_000, Event::Resize { cols: 100, rows: 30 }),
            // "€" split over two records: shown whole with the second.
            (2_500_000, Event::Output(&[b'a', 0xE2, 0x82])),
            (2_600_000, Event::Output(&[0xAC, b'"', b'\\'])),
            (3_000_000, Event::Resumed { unix_ms: 1, dropped_tail: 0 }),
            (3_100_000, Event::Resumed { unix_ms: 2, dropped_tail: 9 }),
            (4_000_000, Event::Output(&[0xFF, b'x'])),
            (5_000_000, Event::Marker("note")),
            (9_120_000, Event::Exit(4)),
        ];
        let opts = ExportOptions { term: Some("xterm-256color".into()), shell: None };
        let (text, s) = cast(&events, &opts);
        let want = concat!(
            r#"{"version":2,"width":80,"height":24,"timestamp":1700000000,"title":"s-0123456789abcdef","env":{"TERM":"xterm-256color"}}"#,
            "\n",
            r#"[0.248848, "o", "\u001b[1;31mHello\r\n"]"#,
            "\n",
            r#"[1.001376, "i", "ls\r"]"#,
            "\n",
            r#"[2.000000, "r", "100x30"]"#,
            "\n",
            r#"[2.500000, "o", "a"]"#,
            "\n",
            r#"[2.600000, "o", "€\"\\"]"#,
            "\n",
            r#"[3.000000, "m", "resumed"]"#,
            "\n",
            r#"[3.100000, "m", "resumed, 9 torn bytes dropped"]"#,
            "\n",
            r#"[4.000000, "o", "�x"]"#,
            "\n",
            r#"[5.000000, "m", "note"]"#,
            "\n",
            r#"[9.120000, "m", "exit 4"]"#,
            "\n",
        );
        assert_eq!(text, want);
        assert_eq!((s.events, s.exit, s.replaced), (10, Some(4), 1));
    }

    #[test]
    fn header_without_env_and_an_unfinished_character_at_the_end() {
        let (text, s) = cast(&[(7, Event::Output(&[0xF0, 0x9F]))], &ExportOptions::default());
        let mut lines = text.lines();
        let h: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(h["version"], 2);
        assert!(h.get("env").is_none(), "{h}");
        // The record only began a character: no event for it, then one U+FFFD at the end.
        assert_eq!(lines.next(), Some(r#"[0.000007, "o", "�"]"#));
        assert_eq!(lines.next(), None);
        assert_eq!((s.events, s.exit, s.replaced), (1, None, 1));
    }

    #[test]
    fn a_broken_recording_stops_the_export_at_the_broken_record() {
        let mut wire = recording(&[(1, Event::Output(b"ok")), (2, Event::Output(b"no"))]);
        let at = wire.len() - 33;
        wire[at] ^= 1;
        let mut out = Vec::new();
        let err = export(wire.as_slice(), &mut out, &ExportOptions::default()).unwrap_err();
        assert!(
            matches!(err, ExportError::Recording(VerifyError::Digest { index: 1, .. })),
            "{err}"
        );
    }

    fn lossy_by_pieces(pieces: &[Vec<u8>]) -> String {
        let mut s = Utf8Stream::default();
        let mut out = String::new();
        for p in pieces {
            s.decode(p, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn utf8_carry_cases() {
        let cases: &[&[&[u8]]] = &[
            &[b"\xE2", b"\x82", b"\xAC"],        // one character in three pieces
            &[b"\xE2\x82", b"x"],                // cut short by an ASCII byte
            &[b"\xF0\x9F\x98", b"\x80\xF0\x9F"], // one completes, the next begins
            &[b"\xE0", b"\x80"],                 // overlong: invalid
            &[b"\xED", b"\xA0\x80"],             // a surrogate: invalid
            &[b"\xC3", b"", b"\xA9"],            // an empty piece in between
            &[b"\xC3", b"\xA9\xC3", b"\xA9"],
            &[b"\xF4\x90"],          // over U+10FFFF
            &[b"\xF0", b"\x9F\x41"], // a 4-byte prefix broken after 2 bytes
            &[b"\xE2\x82", b"\xAC\xE2\x82\xAC"],
        ];
        for pieces in cases {
            let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
            let whole = pieces.concat();
            assert_eq!(lossy_by_pieces(&pieces), String::from_utf8_lossy(&whole), "{pieces:02x?}");
        }
    }

    proptest! {
        /// Any bytes cut into any pieces: the pieces' text joined is `from_utf8_lossy` of the
        /// bytes joined.
        #[test]
        fn pieces_decode_like_from_utf8_lossy(
            pieces in proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![any::<u8>(), 0x80u8..0xC0, 0xC2u8..0xF5], 0..8),
                0..10),
        ) {
            let whole = pieces.concat();
            prop_assert_eq!(lossy_by_pieces(&pieces), String::from_utf8_lossy(&whole));
        }

        /// The export's output events, parsed as JSON and joined, are the lossy text of all
        /// output bytes; every line is valid JSON.
        #[test]
        fn exported_output_joins_to_the_lossy_stream(
            pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..12), 0..10),
        ) {
            let events: Vec<(u64, Event<'_>)> =
                pieces.iter().enumerate().map(|(i, p)| (i as u64, Event::Output(p))).collect();
            let (text, _) = cast(&events, &ExportOptions::default());
            let mut joined = String::new();
            for line in text.lines().skip(1) {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                prop_assert_eq!(&v[1], "o");
                joined.push_str(v[2].as_str().unwrap());
            }
            let all = pieces.concat();
            prop_assert_eq!(joined, String::from_utf8_lossy(&all));
        }
    }
}
