//! The core of `hatch play`: reads an asciicast v2 recording (the relay's export) and says
//! what to write to the terminal and how long to wait before it. Sans-IO: no terminal, no
//! file, no clock; the command feeds the file's bytes in, and sleeps and writes what comes out.
//!
//! ```text
//!  bytes ──▶ Player::feed ──▶ Player::next_step ──▶ Step { delay, bytes } ──▶ sleep, write
//!                                                   (one per "o" event)
//! ```
//!
//! Timing: each output event waits the gap since the previous output event (the first since
//! time 0), capped at the idle limit (`--idle-limit`, else the header's `idle_time_limit`,
//! else none) and then divided by the speed. Input, resize and marker events show nothing;
//! the marker `"exit N"` (how the relay's export writes the exit status) is kept for
//! [`Player::exit_status`]. Unknown event codes are skipped, so that newer files still play.
//!
//! The file may come from anywhere: a line longer than [`MAX_LINE`] or that is not an event
//! is an error naming its line, never a panic or an unbounded buffer. A time that goes
//! backwards waits nothing (some recorders write such files; refusing them helps no one).

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// Longest line accepted: 8 MiB. The relay's largest record is 1 MiB of output, which JSON
/// escapes to at most 6 MiB (`\u001b` for each control byte); anything longer is not ours.
pub const MAX_LINE: usize = 8 << 20;

/// How to play.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlayOptions {
    /// Playback speed: 2.0 plays twice as fast.
    speed: f64,
    /// The longest wait between two outputs, before the speed applies.
    idle_limit: Option<Duration>,
}

impl PlayOptions {
    /// Speed (finite, above 0) and idle limit (above 0), or `None` for values that could not
    /// play.
    pub fn new(speed: f64, idle_limit: Option<Duration>) -> Option<PlayOptions> {
        let speed_ok = speed.is_finite() && speed > 0.0;
        let limit_ok = idle_limit.is_none_or(|d| !d.is_zero());
        (speed_ok && limit_ok).then_some(PlayOptions { speed, idle_limit })
    }
}

impl Default for PlayOptions {
    fn default() -> PlayOptions {
        PlayOptions { speed: 1.0, idle_limit: None }
    }
}

/// What the header says.
#[derive(Debug, Clone, PartialEq)]
pub struct CastHeader {
    /// Terminal columns.
    pub width: u16,
    /// Terminal rows.
    pub height: u16,
    /// The recording's own idle limit, in seconds.
    pub idle_time_limit: Option<f64>,
    /// The title (the relay writes the session id).
    pub title: Option<String>,
}

/// One thing to show: wait `delay`, then write `bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// How long to wait first.
    pub delay: Duration,
    /// What to write to the terminal.
    pub bytes: Vec<u8>,
}

/// Why a recording cannot be played. Lines count from 1 (the header).
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PlayError {
    /// The first line is not an asciicast header.
    #[error("line 1: not an asciicast header: {0}")]
    BadHeader(String),
    /// A version other than 2.
    #[error("line 1: asciicast version {0} (only version 2 plays)")]
    Version(u64),
    /// A line that is not a `[time, code, data]` event.
    #[error("line {line}: not an asciicast event: {reason}")]
    BadEvent {
        /// The line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// A line over [`MAX_LINE`] bytes.
    #[error("line {0}: longer than {MAX_LINE} bytes")]
    LineTooLong(u64),
    /// The input ended before the header did.
    #[error("empty recording: no header")]
    NoHeader,
}

#[derive(Deserialize)]
struct RawHeader {
    version: u64,
    width: u16,
    height: u16,
    #[serde(default)]
    idle_time_limit: Option<f64>,
    #[serde(default)]
    title: Option<String>,
}

/// Reads a recording and gives its steps.
#[derive(Debug)]
pub struct Player {
    opts: PlayOptions,
    /// Bytes fed and not yet parsed.
    buf: Vec<u8>,
    /// How far `buf` has been searched for a newline.
    scanned: usize,
    header: Option<CastHeader>,
    /// The idle limit in force, in µs.
    limit_us: Option<u64>,
    /// Time of the previous output event, in µs.
    prev_us: u64,
    line: u64,
    exit: Option<i32>,
}

impl Player {
    /// A player with these options.
    pub fn new(opts: PlayOptions) -> Player {
        Player {
            opts,
            buf: Vec::new(),
            scanned: 0,
            header: None,
            limit_us: None,
            prev_us: 0,
            line: 0,
            exit: None,
        }
    }

    /// Adds bytes read from the recording. Call [`next_step`](Self::next_step) until it
    /// gives `None` before feeding more, so that at most one line (plus one read) is held.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The header, once its line has been read.
    pub fn header(&self) -> Option<&CastHeader> {
        self.header.as_ref()
    }

    /// The exit status, once its marker has been read.
    pub fn exit_status(&self) -> Option<i32> {
        self.exit
    }

    /// The next step from the complete lines fed so far; `Ok(None)` when more bytes are
    /// needed.
    pub fn next_step(&mut self) -> Result<Option<Step>, PlayError> {
        loop {
            let Some(nl) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len();
                if self.buf.len() > MAX_LINE {
                    return Err(PlayError::LineTooLong(self.line + 1));
                }
                return Ok(None);
            };
            let end = self.scanned + nl;
            self.scanned = 0;
            if end > MAX_LINE {
                return Err(PlayError::LineTooLong(self.line + 1));
            }
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            if let Some(step) = self.line(&line[..end])? {
                return Ok(Some(step));
            }
        }
    }

    /// The input has ended: the last line, if it had no newline, is read now.
    pub fn finish(&mut self) -> Result<Option<Step>, PlayError> {
        let step = if self.buf.is_empty() {
            None
        } else {
            let line = std::mem::take(&mut self.buf);
            self.scanned = 0;
            self.line(&line)?
        };
        if self.header.is_none() {
            return Err(PlayError::NoHeader);
        }
        Ok(step)
    }

    fn line(&mut self, line: &[u8]) -> Result<Option<Step>, PlayError> {
        self.line += 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.header.is_none() {
            let h: RawHeader =
                serde_json::from_slice(line).map_err(|e| PlayError::BadHeader(e.to_string()))?;
            if h.version != 2 {
                return Err(PlayError::Version(h.version));
            }
            let own = h
                .idle_time_limit
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(|s| (s * 1e6).round() as u64);
            self.limit_us = self
                .opts
                .idle_limit
                .map(|d| d.as_micros().min(u128::from(u64::MAX)) as u64)
                .or(own);
            self.header = Some(CastHeader {
                width: h.width,
                height: h.height,
                idle_time_limit: h.idle_time_limit,
                title: h.title,
            });
            return Ok(None);
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            // asciinema's own reader stops at an empty line; we skip it.
            return Ok(None);
        }
        let bad = |reason: String| PlayError::BadEvent { line: self.line, reason };
        let (time, code, data): (f64, String, String) =
            serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
        if !time.is_finite() || time < 0.0 {
            return Err(bad(format!("time {time}")));
        }
        // Rounded to the µs, the resolution the relay writes; saturates for absurd times.
        let t_us = (time * 1e6).round() as u64;
        match code.as_str() {
            "o" => {
                let gap = t_us.saturating_sub(self.prev_us);
                self.prev_us = self.prev_us.max(t_us);
                let capped = self.limit_us.map_or(gap, |l| gap.min(l));
                let nanos = (capped as f64 * 1000.0 / self.opts.speed).round();
                // `as` saturates: a wait beyond u64 nanoseconds (584 years) is capped there.
                let delay = Duration::from_nanos(nanos as u64);
                Ok(Some(Step { delay, bytes: data.into_bytes() }))
            }
            "m" => {
                if let Some(n) = data.strip_prefix("exit ").and_then(|n| n.parse().ok()) {
                    self.exit = Some(n);
                }
                Ok(None)
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAST: &str = concat!(
        r#"{"version":2,"width":80,"height":24,"timestamp":1700000000,"title":"s-1"}"#,
        "\n",
        "[0.5, \"o\", \"$ \"]\n",
        "[1.0, \"i\", \"ls\\r\"]\n",
        "[1.25, \"o\", \"ls\\r\\n\"]\n",
        "[1.5, \"r\", \"100x30\"]\n",
        "[11.25, \"o\", \"a\\u001b[0m\"]\n",
        "[12.0, \"x\", \"future event\"]\n",
        "[12.5, \"m\", \"exit 4\"]\n",
    );

    fn play(opts: PlayOptions, input: &[u8], chunk: usize) -> (Vec<Step>, Player) {
        let mut p = Player::new(opts);
        let mut steps = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            p.feed(piece);
            while let Some(s) = p.next_step().unwrap() {
                steps.push(s);
            }
        }
        if let Some(s) = p.finish().unwrap() {
            steps.push(s);
        }
        (steps, p)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn delays(steps: &[Step]) -> Vec<Duration> {
        steps.iter().map(|s| s.delay).collect()
    }

    #[test]
    fn plays_output_with_its_timing() {
        let (steps, p) = play(PlayOptions::default(), CAST.as_bytes(), usize::MAX);
        let bytes: Vec<&[u8]> = steps.iter().map(|s| s.bytes.as_slice()).collect();
        assert_eq!(bytes, [&b"$ "[..], b"ls\r\n", b"a\x1b[0m"]);
        assert_eq!(delays(&steps), [ms(500), ms(750), ms(10_000)]);
        assert_eq!(p.exit_status(), Some(4));
        let h = p.header().unwrap();
        assert_eq!((h.width, h.height, h.title.as_deref()), (80, 24, Some("s-1")));
    }

    #[test]
    fn speed_divides_and_idle_limit_caps_each_gap() {
        let opts = PlayOptions::new(10.0, None).unwrap();
        let (steps, _) = play(opts, CAST.as_bytes(), usize::MAX);
        assert_eq!(delays(&steps), [ms(50), ms(75), ms(1000)]);
        // The cap applies before the speed: 10 s capped at 2 s, then halved.
        let opts = PlayOptions::new(2.0, Some(ms(2000))).unwrap();
        let (steps, _) = play(opts, CAST.as_bytes(), usize::MAX);
        assert_eq!(delays(&steps), [ms(250), ms(375), ms(1000)]);
        // The whole playback in virtual time: the sum of the delays.
        assert_eq!(steps.iter().map(|s| s.delay).sum::<Duration>(), ms(1625));
    }

    #[test]
    fn the_header_idle_limit_applies_unless_overridden() {
        let cast = CAST.replacen(r#""title""#, r#""idle_time_limit":1.5,"title""#, 1);
        let (steps, p) = play(PlayOptions::default(), cast.as_bytes(), usize::MAX);
        assert_eq!(p.header().unwrap().idle_time_limit, Some(1.5));
        assert_eq!(delays(&steps), [ms(500), ms(750), ms(1500)]);
        let opts = PlayOptions::new(1.0, Some(ms(3000))).unwrap();
        let (steps, _) = play(opts, cast.as_bytes(), usize::MAX);
        assert_eq!(delays(&steps), [ms(500), ms(750), ms(3000)]);
    }

    #[test]
    fn any_chunking_gives_the_same_steps() {
        let (whole, _) = play(PlayOptions::default(), CAST.as_bytes(), usize::MAX);
        for chunk in 1..40 {
            let (steps, p) = play(PlayOptions::default(), CAST.as_bytes(), chunk);
            assert_eq!(steps, whole, "chunk {chunk}");
            assert_eq!(p.exit_status(), Some(4));
        }
        // Without the last newline, `finish` reads the last line.
        let trimmed = CAST.trim_end().replace("[12.5, \"m\", \"exit 4\"]", "[13, \"o\", \"z\"]");
        let (steps, _) = play(PlayOptions::default(), trimmed.as_bytes(), 7);
        assert_eq!(steps.last().unwrap().bytes, b"z");
        // CRLF line ends are accepted.
        let crlf = CAST.replace('\n', "\r\n");
        let (steps, _) = play(PlayOptions::default(), crlf.as_bytes(), 5);
        assert_eq!(steps, whole);
    }

    #[test]
    fn times_going_backwards_wait_nothing() {
        let cast = "{\"version\":2,\"width\":1,\"height\":1}\n[2, \"o\", \"a\"]\n[1, \"o\", \"b\"]\n[3, \"o\", \"c\"]\n";
        let (steps, _) = play(PlayOptions::default(), cast.as_bytes(), usize::MAX);
        assert_eq!(delays(&steps), [ms(2000), ms(0), ms(1000)]);
    }

    #[test]
    fn options_that_cannot_play_are_refused() {
        for speed in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(PlayOptions::new(speed, None), None, "{speed}");
        }
        assert_eq!(PlayOptions::new(1.0, Some(Duration::ZERO)), None);
        assert!(PlayOptions::new(0.1, Some(ms(1))).is_some());
    }

    fn error_of(input: &str) -> PlayError {
        let mut p = Player::new(PlayOptions::default());
        p.feed(input.as_bytes());
        loop {
            match p.next_step() {
                Ok(Some(_)) => {}
                Ok(None) => return p.finish().expect_err("must fail"),
                Err(e) => return e,
            }
        }
    }

    #[test]
    fn bad_recordings_are_refused_naming_the_line() {
        assert!(matches!(error_of(""), PlayError::NoHeader));
        assert!(matches!(error_of("HATCHREC\n"), PlayError::BadHeader(_)));
        assert!(matches!(
            error_of("{\"version\":1,\"width\":1,\"height\":1}\n"),
            PlayError::Version(1)
        ));
        assert!(matches!(error_of("{\"version\":2}\n"), PlayError::BadHeader(_)));
        let h = "{\"version\":2,\"width\":1,\"height\":1}\n";
        for (event, line) in [
            ("[1, \"o\"]\n", 2),
            ("\"o\"\n", 2),
            ("[-1, \"o\", \"a\"]\n", 2),
            ("[1e400, \"o\", \"a\"]\n", 2),
            ("[1, \"o\", \"a\"]\n[2, 3, \"b\"]\n", 3),
        ] {
            match error_of(&format!("{h}{event}")) {
                PlayError::BadEvent { line: l, .. } => assert_eq!(l, line, "{event}"),
                other => panic!("{event}: {other}"),
            }
        }
        let mut p = Player::new(PlayOptions::default());
        p.feed(h.as_bytes());
        p.feed(&vec![b'x'; MAX_LINE + 1]);
        assert!(matches!(p.next_step(), Err(PlayError::LineTooLong(2))));
    }

    /// Random bytes after a valid header are played or refused, never a panic.
    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let alphabet = b"[]\"o,.0123456789e-\\u\n {}mx";
        for _ in 0..2000 {
            let len = rng.random_range(0..60);
            let tail: Vec<u8> =
                (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            let mut p = Player::new(PlayOptions::new(3.0, Some(ms(100))).unwrap());
            p.feed(b"{\"version\":2,\"width\":1,\"height\":1}\n");
            p.feed(&tail);
            while let Ok(Some(s)) = p.next_step() {
                assert!(s.delay <= ms(34));
            }
            let _ = p.finish();
        }
    }
}
