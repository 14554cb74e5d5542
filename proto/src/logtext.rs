//! Peer-supplied text made safe for a log line: clipped and escaped.
//!
//! A string that came from the network (an agent's error message, a session id it reported, a
//! message type nobody knows) may hold newlines, carriage returns or terminal escapes. Written
//! raw into a line-oriented log it could forge a line that looks like the relay's own, or
//! repaint an operator's terminal. [`peer`] keeps at most a given number of characters and
//! escapes the rest the way `{:?}` does (`\n`, `\r`, `\u{1b}`, `\"`, ...), inside double quotes,
//! so a log field holds exactly one line whatever the peer sent.
//!
//! ```
//! use hatch_proto::logtext::peer;
//! assert_eq!(peer("no such user\nERROR forged", 100).to_string(), r#""no such user\nERROR forged""#);
//! assert_eq!(peer("abcdef", 3).to_string(), r#""abc"…"#);
//! ```

use std::fmt;

/// Peer text for a log field: Display writes it quoted and escaped, cut to a character count.
#[derive(Clone, Copy)]
pub struct PeerText<'a> {
    text: &'a str,
    max_chars: usize,
}

/// Wraps `text` for logging: at most `max_chars` characters of it, escaped like `{:?}`; a `…`
/// after the closing quote says it was cut.
pub fn peer(text: &str, max_chars: usize) -> PeerText<'_> {
    PeerText { text, max_chars }
}

impl fmt::Display for PeerText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kept, cut) = match self.text.char_indices().nth(self.max_chars) {
            Some((i, _)) => (&self.text[..i], true),
            None => (self.text, false),
        };
        // `str`'s Debug escapes quotes, backslashes, control and non-printable characters.
        write!(f, "{kept:?}")?;
        if cut { f.write_str("…") } else { Ok(()) }
    }
}

impl fmt::Debug for PeerText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::peer;

    #[test]
    fn line_breaks_and_escapes_are_escaped() {
        let forged = "boom\n2026-01-01T00:00:00Z  INFO hatch_relay: agent control channel up\r";
        let out = peer(forged, 512).to_string();
        assert!(!out.contains('\n') && !out.contains('\r'), "{out}");
        assert_eq!(
            out,
            r#""boom\n2026-01-01T00:00:00Z  INFO hatch_relay: agent control channel up\r""#
        );
        assert_eq!(peer("\u{1b}[2J\t\"x\\", 10).to_string(), r#""\u{1b}[2J\t\"x\\""#);
        // Unicode line and paragraph separators, and other invisible characters, too.
        assert_eq!(peer("a\u{2028}b\u{85}c", 10).to_string(), r#""a\u{2028}b\u{85}c""#);
    }

    #[test]
    fn clipped_on_whole_characters_and_marked() {
        assert_eq!(peer("s-0123", 40).to_string(), r#""s-0123""#);
        assert_eq!(peer("abcdef", 3).to_string(), r#""abc"…"#);
        // A multi-byte character is kept or dropped whole, never split.
        assert_eq!(peer("aé€b", 3).to_string(), r#""aé€"…"#);
        assert_eq!(peer("", 0).to_string(), r#""""#);
        assert_eq!(peer("x", 0).to_string(), r#"""…"#);
        // The escapes of kept characters are not counted against the limit: a clip of 2 newlines
        // is 2 characters of input, 6 of output.
        assert_eq!(peer("\n\n\n", 2).to_string(), r#""\n\n"…"#);
        // Debug and Display agree, so `?field` and `%field` log the same.
        assert_eq!(format!("{:?}", peer("a\nb", 9)), format!("{}", peer("a\nb", 9)));
    }
}
