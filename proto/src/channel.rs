//! The `hatch.v1` channel: one message per binary WebSocket message, end to end between the
//! client and the agent. The relay never parses these.
//!
//! ```text
//! +------+----------------------------+
//! | type | body                       |
//! | u8   | depends on type            |
//! +------+----------------------------+
//! 0x01 DATA    bytes
//! 0x02 RESIZE  u16 cols, u16 rows      (big-endian)
//! 0x03 EXIT    i32 status              (signal n as 128+n)
//! 0x04 ACK     u64 cumulative DATA bytes received
//! 0x05 ERROR   u16 code, UTF-8 message
//! 0x06 RESUME  u64 received, u64 from, u8 flags (bit 0: reply, bit 1: fresh)
//! 0x07 STDERR  bytes                   (agent → client: the command's stderr, no terminal)
//! ```
//!
//! Offsets (ACK, RESUME) count the DATA and STDERR body bytes of one direction from the start
//! of the session, and one more for the direction's end: the empty DATA that ends the client's input,
//! the EXIT that ends the agent's output. [`crate::resume`] keeps them.
//!
//! Decoding borrows from the input (no copy); unknown types decode to [`Message::Unknown`] so
//! that newer peers can add messages without breaking older ones.

use thiserror::Error;

/// The WebSocket subprotocol both data legs offer and the relay answers with.
pub const SUBPROTOCOL: &str = "hatch.v1";

/// Type byte of DATA.
pub const TYPE_DATA: u8 = 0x01;
/// Type byte of RESIZE.
pub const TYPE_RESIZE: u8 = 0x02;
/// Type byte of EXIT.
pub const TYPE_EXIT: u8 = 0x03;
/// Type byte of ACK.
pub const TYPE_ACK: u8 = 0x04;
/// Type byte of ERROR.
pub const TYPE_ERROR: u8 = 0x05;
/// Type byte of RESUME.
pub const TYPE_RESUME: u8 = 0x06;
/// Type byte of STDERR.
pub const TYPE_STDERR: u8 = 0x07;
/// RESUME flag: this RESUME answers the peer's (it asks for no answer).
pub const RESUME_REPLY: u8 = 0x01;
/// RESUME flag: a client with no state of its own (`hatch attach` from a new process) asks
/// for whatever the agent still holds; its offsets start where the answer says.
pub const RESUME_FRESH: u8 = 0x02;

/// ERROR code: the requested run-as user does not exist or the agent cannot switch to it.
pub const ERROR_RUN_AS: u16 = 0x0001;
/// ERROR code: the shell or command could not be started.
pub const ERROR_SPAWN: u16 = 0x0002;
/// ERROR code: the peer sent a message that could not be decoded.
pub const ERROR_BAD_MESSAGE: u16 = 0x0003;
/// ERROR code: an internal failure on the sending side.
pub const ERROR_INTERNAL: u16 = 0x0004;
/// ERROR code: the agent does not allow the port session's destination.
pub const ERROR_FORWARD: u16 = 0x0005;

/// One `hatch.v1` channel message, borrowing its payload from the decoded buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Terminal bytes: stdin from the client, output from the agent.
    Data(&'a [u8]),
    /// The client's terminal size.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// The remote process ended with this status (a signal `n` as `128 + n`).
    Exit(i32),
    /// Cumulative count of bytes received so far (DATA bodies, and one for the end).
    Ack(u64),
    /// A failure the peer reports in words.
    Error {
        /// One of the `ERROR_*` codes.
        code: u16,
        /// What went wrong, for a person.
        message: &'a str,
    },
    /// The first message on a leg that replaced a lost one, or the answer to one: what this
    /// side has received, and the offset of the next DATA byte it sends after this message.
    Resume(crate::resume::Resume),
    /// The command's stderr (agent → client), when it runs without a terminal. Its bytes count
    /// in the same offsets as DATA: one output stream, two kinds of message.
    Stderr(&'a [u8]),
    /// A type this version does not know; ignore it.
    Unknown {
        /// The type byte.
        kind: u8,
        /// The body after the type byte.
        body: &'a [u8],
    },
}

/// Why a channel message could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The message had no type byte.
    #[error("empty channel message")]
    Empty,
    /// A fixed-size body had the wrong length.
    #[error("{kind} body is {got} bytes, expected {expected}")]
    BadLength {
        /// Name of the message type.
        kind: &'static str,
        /// Length of the body received.
        got: usize,
        /// Length the type requires (for ERROR: the minimum).
        expected: usize,
    },
    /// An ERROR message's text was not valid UTF-8.
    #[error("error message is not valid utf-8")]
    InvalidUtf8,
    /// A RESUME's flags byte had bits other than [`RESUME_REPLY`] and [`RESUME_FRESH`] set.
    #[error("resume flags {0:#04x} has unknown bits set")]
    ResumeFlags(u8),
}

impl<'a> Message<'a> {
    /// Decodes one channel message from the payload of one binary WebSocket message.
    pub fn decode(buf: &'a [u8]) -> Result<Self, ChannelError> {
        let (&kind, body) = buf.split_first().ok_or(ChannelError::Empty)?;
        match kind {
            TYPE_DATA => Ok(Message::Data(body)),
            TYPE_RESIZE => {
                let b: [u8; 4] = fixed(body, "resize")?;
                Ok(Message::Resize {
                    cols: u16::from_be_bytes([b[0], b[1]]),
                    rows: u16::from_be_bytes([b[2], b[3]]),
                })
            }
            TYPE_EXIT => Ok(Message::Exit(i32::from_be_bytes(fixed(body, "exit")?))),
            TYPE_ACK => Ok(Message::Ack(u64::from_be_bytes(fixed(body, "ack")?))),
            TYPE_ERROR => {
                if body.len() < 2 {
                    return Err(ChannelError::BadLength {
                        kind: "error",
                        got: body.len(),
                        expected: 2,
                    });
                }
                let code = u16::from_be_bytes([body[0], body[1]]);
                let message =
                    std::str::from_utf8(&body[2..]).map_err(|_| ChannelError::InvalidUtf8)?;
                Ok(Message::Error { code, message })
            }
            TYPE_RESUME => {
                let b: [u8; 17] = fixed(body, "resume")?;
                let flags = b[16];
                if flags & !(RESUME_REPLY | RESUME_FRESH) != 0 {
                    return Err(ChannelError::ResumeFlags(flags));
                }
                Ok(Message::Resume(crate::resume::Resume {
                    received: u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
                    from: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
                    reply: flags & RESUME_REPLY != 0,
                    fresh: flags & RESUME_FRESH != 0,
                }))
            }
            TYPE_STDERR => Ok(Message::Stderr(body)),
            kind => Ok(Message::Unknown { kind, body }),
        }
    }

    /// Length of the encoded message in bytes.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Message::Data(b) | Message::Stderr(b) => b.len(),
            Message::Resize { .. } => 4,
            Message::Exit(_) => 4,
            Message::Ack(_) => 8,
            Message::Error { message, .. } => 2 + message.len(),
            Message::Resume(_) => 17,
            Message::Unknown { body, .. } => body.len(),
        }
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.encoded_len());
        match *self {
            Message::Data(b) => {
                out.push(TYPE_DATA);
                out.extend_from_slice(b);
            }
            Message::Resize { cols, rows } => {
                out.push(TYPE_RESIZE);
                out.extend_from_slice(&cols.to_be_bytes());
                out.extend_from_slice(&rows.to_be_bytes());
            }
            Message::Exit(status) => {
                out.push(TYPE_EXIT);
                out.extend_from_slice(&status.to_be_bytes());
            }
            Message::Ack(n) => {
                out.push(TYPE_ACK);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Message::Error { code, message } => {
                out.push(TYPE_ERROR);
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(message.as_bytes());
            }
            Message::Resume(r) => {
                out.push(TYPE_RESUME);
                out.extend_from_slice(&r.received.to_be_bytes());
                out.extend_from_slice(&r.from.to_be_bytes());
                let reply = if r.reply { RESUME_REPLY } else { 0 };
                out.push(reply | if r.fresh { RESUME_FRESH } else { 0 });
            }
            Message::Stderr(b) => {
                out.push(TYPE_STDERR);
                out.extend_from_slice(b);
            }
            Message::Unknown { kind, body } => {
                out.push(kind);
                out.extend_from_slice(body);
            }
        }
    }

    /// Encodes the message into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out
    }
}

/// A RESUME and what follows it, encoded: the bytes to send again in DATA (or STDERR, for
/// bytes that went as STDERR) messages of at most `chunk` bytes (at least 1), then `end` (the
/// direction's end: an empty DATA from a client, EXIT from an agent) when the replay must send
/// the end again.
pub fn replay_messages(
    resume: crate::resume::Resume,
    replay: crate::resume::Replay<'_>,
    chunk: usize,
    end: Message<'_>,
) -> Vec<Vec<u8>> {
    let mut out = vec![Message::Resume(resume).to_vec()];
    out.extend(replay.parts(chunk).into_iter().map(|(stream, bytes)| match stream {
        crate::resume::Stream::Out => Message::Data(bytes).to_vec(),
        crate::resume::Stream::Err => Message::Stderr(bytes).to_vec(),
    }));
    if replay.end {
        out.push(end.to_vec());
    }
    out
}

fn fixed<const N: usize>(body: &[u8], kind: &'static str) -> Result<[u8; N], ChannelError> {
    body.try_into().map_err(|_| ChannelError::BadLength { kind, got: body.len(), expected: N })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Decodes `wire`, checks it is `msg`, and checks that `msg` encodes to exactly `wire`.
    fn golden(msg: Message<'_>, wire: &[u8]) {
        assert_eq!(Message::decode(wire), Ok(msg), "decode {wire:02x?}");
        assert_eq!(msg.to_vec(), wire, "encode {msg:?}");
        assert_eq!(msg.encoded_len(), wire.len());
        let mut appended = vec![0xEE];
        msg.encode(&mut appended);
        assert_eq!(&appended[1..], wire, "encode appends");
    }

    #[test]
    fn a_replay_is_the_resume_then_both_slices_in_chunks_then_the_end() {
        use crate::resume::{Replay, Resume};
        let resume = Resume { received: 7, from: 2, reply: true, fresh: false };
        let no_marks = std::collections::VecDeque::new();
        let replay = Replay { data: (b"abcd", b"ef"), start: 2, stderr: &no_marks, end: true };
        let got = replay_messages(resume, replay, 3, Message::Exit(5));
        let want: Vec<Vec<u8>> = vec![
            Message::Resume(resume).to_vec(),
            Message::Data(b"abc").to_vec(),
            Message::Data(b"d").to_vec(),
            Message::Data(b"ef").to_vec(),
            Message::Exit(5).to_vec(),
        ];
        assert_eq!(got, want);
        // Offsets 3..5 and 7 went as STDERR: cut where the stream changes and the ring wraps.
        let marks = [3..5, 7..8].into_iter().collect();
        let replay = Replay { data: (b"abcd", b"ef"), start: 2, stderr: &marks, end: false };
        let got = replay_messages(resume, replay, 16, Message::Exit(5));
        let want: Vec<Vec<u8>> = vec![
            Message::Resume(resume).to_vec(),
            Message::Data(b"a").to_vec(),
            Message::Stderr(b"bc").to_vec(),
            Message::Data(b"d").to_vec(),
            Message::Data(b"e").to_vec(),
            Message::Stderr(b"f").to_vec(),
        ];
        assert_eq!(got, want);
        let none = Replay { data: (b"", b""), start: 0, stderr: &no_marks, end: false };
        assert_eq!(replay_messages(resume, none, 0, Message::Data(b"")).len(), 1);
    }

    #[test]
    fn stderr_golden() {
        golden(Message::Stderr(b"err\n"), &[0x07, 0x65, 0x72, 0x72, 0x0a]);
        golden(Message::Stderr(b""), &[0x07]);
    }

    #[test]
    fn data_golden() {
        golden(Message::Data(b"ls\r"), &[0x01, 0x6c, 0x73, 0x0d]);
        golden(Message::Data(b""), &[0x01]);
    }

    #[test]
    fn data_borrows_its_payload() {
        let wire = [0x01, 0x68, 0x69];
        let Ok(Message::Data(body)) = Message::decode(&wire) else { panic!("data") };
        assert!(std::ptr::eq(body.as_ptr(), wire[1..].as_ptr()));
    }

    #[test]
    fn resize_golden() {
        golden(Message::Resize { cols: 80, rows: 24 }, &[0x02, 0x00, 0x50, 0x00, 0x18]);
        golden(Message::Resize { cols: 0x1234, rows: 0xFFFF }, &[0x02, 0x12, 0x34, 0xFF, 0xFF]);
    }

    #[test]
    fn exit_golden() {
        golden(Message::Exit(0), &[0x03, 0x00, 0x00, 0x00, 0x00]);
        golden(Message::Exit(1), &[0x03, 0x00, 0x00, 0x00, 0x01]);
        // Killed by SIGKILL: 128 + 9.
        golden(Message::Exit(137), &[0x03, 0x00, 0x00, 0x00, 0x89]);
        golden(Message::Exit(-1), &[0x03, 0xFF, 0xFF, 0xFF, 0xFF]);
        golden(Message::Exit(i32::MIN), &[0x03, 0x80, 0x00, 0x00, 0x00]);
    }

    #[test]
    fn ack_golden() {
        golden(Message::Ack(0), &[0x04, 0, 0, 0, 0, 0, 0, 0, 0]);
        golden(Message::Ack((1 << 32) + 5), &[0x04, 0, 0, 0, 0x01, 0, 0, 0, 0x05]);
        golden(Message::Ack(u64::MAX), &[0x04, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
    }

    #[test]
    fn error_golden() {
        let mut wire = vec![0x05, 0x00, 0x02];
        wire.extend_from_slice(b"no such shell");
        golden(Message::Error { code: ERROR_SPAWN, message: "no such shell" }, &wire);
        golden(Message::Error { code: ERROR_RUN_AS, message: "" }, &[0x05, 0x00, 0x01]);
        let mut wire = vec![0x05, 0x00, 0x04];
        wire.extend_from_slice("échec".as_bytes());
        golden(Message::Error { code: ERROR_INTERNAL, message: "échec" }, &wire);
    }

    #[test]
    fn resume_golden() {
        let mut wire = vec![0x06, 0, 0, 0, 0, 0, 0, 0x30, 0x39];
        wire.extend_from_slice(&[0, 0, 0, 0x01, 0, 0, 0, 0x05, 0x00]);
        let r = crate::resume::Resume {
            received: 12345,
            from: (1 << 32) + 5,
            reply: false,
            fresh: false,
        };
        golden(Message::Resume(r), &wire);
        let mut wire = vec![0x06, 0, 0, 0, 0, 0, 0, 0, 0];
        wire.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x07, 0x01]);
        let r = crate::resume::Resume { received: 0, from: 7, reply: true, fresh: false };
        golden(Message::Resume(r), &wire);
        let mut wire = vec![0x06];
        wire.extend_from_slice(&[0; 16]);
        wire.push(0x02);
        let r = crate::resume::Resume { received: 0, from: 0, reply: false, fresh: true };
        golden(Message::Resume(r), &wire);
    }

    #[test]
    fn unknown_types_are_reported_not_rejected() {
        golden(Message::Unknown { kind: 0x08, body: &[0x01, 0x02] }, &[0x08, 0x01, 0x02]);
        golden(Message::Unknown { kind: 0x00, body: &[] }, &[0x00]);
        golden(Message::Unknown { kind: 0xFF, body: b"future" }, b"\xfffuture");
    }

    #[test]
    fn rejections() {
        assert_eq!(Message::decode(&[]), Err(ChannelError::Empty));
        let bad = |kind, got, expected| Err(ChannelError::BadLength { kind, got, expected });
        assert_eq!(Message::decode(&[0x02, 0, 80, 0]), bad("resize", 3, 4));
        assert_eq!(Message::decode(&[0x02, 0, 80, 0, 24, 0]), bad("resize", 5, 4));
        assert_eq!(Message::decode(&[0x03]), bad("exit", 0, 4));
        assert_eq!(Message::decode(&[0x03, 0, 0, 0, 0, 0]), bad("exit", 5, 4));
        assert_eq!(Message::decode(&[0x04, 0, 0, 0, 0, 0, 0, 0]), bad("ack", 7, 8));
        assert_eq!(Message::decode(&[0x05, 0x00]), bad("error", 1, 2));
        assert_eq!(Message::decode(&[0x05]), bad("error", 0, 2));
        assert_eq!(Message::decode(&[0x06, 0, 0]), bad("resume", 2, 17));
        let mut resume = vec![0x06];
        resume.extend_from_slice(&[0; 16]);
        assert_eq!(Message::decode(&[&resume[..], &[0, 0]].concat()), bad("resume", 18, 17));
        resume.push(0x04);
        assert_eq!(Message::decode(&resume), Err(ChannelError::ResumeFlags(0x04)));
        assert_eq!(
            Message::decode(&[0x05, 0x00, 0x01, 0xC3, 0x28]),
            Err(ChannelError::InvalidUtf8)
        );
        assert_eq!(
            ChannelError::BadLength { kind: "resize", got: 3, expected: 4 }.to_string(),
            "resize body is 3 bytes, expected 4"
        );
    }

    fn any_message() -> impl Strategy<Value = (u8, Vec<u8>, u16, u16, i32, u64, String)> {
        (
            any::<u8>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            any::<u16>(),
            any::<u16>(),
            any::<i32>(),
            any::<u64>(),
            ".{0,20}",
        )
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips((kind, bytes, a, b, status, n, text) in any_message()) {
            let msg = match kind % 9 {
                0 => Message::Data(&bytes),
                1 => Message::Resize { cols: a, rows: b },
                2 => Message::Exit(status),
                3 => Message::Ack(n),
                4 => Message::Error { code: a, message: &text },
                5 => Message::Resume(crate::resume::Resume {
                    received: n,
                    from: n ^ u64::from(a),
                    reply: b % 2 == 1,
                    fresh: b % 4 >= 2,
                }),
                6 => Message::Stderr(&bytes),
                // Any type byte outside 0x01..=0x07 is unknown.
                _ => Message::Unknown { kind: if (1..=7).contains(&kind) { 0x80 } else { kind }, body: &bytes },
            };
            let wire = msg.to_vec();
            prop_assert_eq!(wire.len(), msg.encoded_len());
            prop_assert_eq!(Message::decode(&wire), Ok(msg));
        }

        #[test]
        fn any_bytes_decode_or_reject_without_panic(
            kind in proptest::option::of(prop_oneof![0u8..=8, any::<u8>()]),
            body in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            // Mostly known types, so that their length and UTF-8 checks are exercised.
            let buf: Vec<u8> = kind.into_iter().chain(body).collect();
            // What decodes re-encodes to exactly the input: the encoding is canonical.
            if let Ok(msg) = Message::decode(&buf) {
                prop_assert_eq!(msg.to_vec(), buf);
            }
        }
    }
}
