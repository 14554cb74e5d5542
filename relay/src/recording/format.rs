//! The on-disk format of a session recording: one append-only file per session, a header and
//! then records, each record sealed by a SHA-256 chain digest. Byte-exact: what the terminal
//! sent is what the file holds, UTF-8 or not.
//!
//! ```text
//! header   magic "HATCHREC" | version u16 | start unix ms u64 | cols u16 | rows u16
//!          | session id | account | instance | principal        (each: u16 length, UTF-8)
//! record   kind u8 | time µs u64 | payload length u32 | payload | digest [u8; 32]
//!
//! d_0 = SHA-256(header bytes)
//! d_n = SHA-256(d_{n-1} || record n without its digest)      stored as record n's digest
//! ```
//!
//! Integers are big-endian. The time of a record is microseconds since the header's start
//! time and never goes backwards. The parsers here are sans-IO, in the style of
//! [`hatch_proto::frame`]: they look at a byte slice, `Ok(None)` means "more bytes needed",
//! and nothing a file holds makes them allocate more than one record's payload bound or panic
//! (a recording read back may have been tampered with: it is hostile input).
//!
//! This module does not check the chain: [`Chain`] computes it, and the reader in
//! [`super::verify`] compares it record by record.

use std::fmt;

use ring::digest::{Context, SHA256};
use thiserror::Error;

/// First bytes of every recording file (`HATCHREC`).
pub const MAGIC: [u8; 8] = [0x48, 0x41, 0x54, 0x43, 0x48, 0x52, 0x45, 0x43];

/// The format version this module writes and reads. A reader refuses any other: a newer
/// writer may have added record kinds whose meaning this one cannot know.
pub const VERSION: u16 = 1;

/// Largest payload of one record: 1 MiB, the relay's default largest WebSocket payload
/// (`hatch_proto::frame::DEFAULT_MAX_PAYLOAD`), so one forwarded message is one record; a
/// larger length in a file is corruption, and refusing it bounds what a reader allocates.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Largest header string (session id, account, instance, principal), in bytes. Ids are
/// shorter than 128 bytes; a principal (a user or key name) fits with room to spare.
pub const MAX_FIELD: usize = 1024;

/// Bytes of a record before its payload: kind, time, payload length.
pub const RECORD_PREFIX_LEN: usize = 1 + 8 + 4;

/// Bytes of a SHA-256 digest.
pub const DIGEST_LEN: usize = 32;

/// Bytes a record adds to its payload: prefix and digest.
pub const RECORD_OVERHEAD: usize = RECORD_PREFIX_LEN + DIGEST_LEN;

/// Longest possible record.
pub const MAX_RECORD_LEN: usize = RECORD_OVERHEAD + MAX_PAYLOAD;

/// Bytes of the header's fixed part: magic, version, start time, cols, rows.
const HEADER_FIXED_LEN: usize = 8 + 2 + 8 + 2 + 2;

/// Longest possible header.
pub const MAX_HEADER_LEN: usize = HEADER_FIXED_LEN + 4 * (2 + MAX_FIELD);

/// Kind byte of [`Event::Output`].
pub const KIND_OUTPUT: u8 = 0x01;
/// Kind byte of [`Event::Input`].
pub const KIND_INPUT: u8 = 0x02;
/// Kind byte of [`Event::Resize`].
pub const KIND_RESIZE: u8 = 0x03;
/// Kind byte of [`Event::Exit`].
pub const KIND_EXIT: u8 = 0x04;
/// Kind byte of [`Event::Resumed`].
pub const KIND_RESUMED: u8 = 0x05;
/// Kind byte of [`Event::Marker`].
pub const KIND_MARKER: u8 = 0x06;

/// A SHA-256 digest of the chain. Shown as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; DIGEST_LEN]);

impl Digest {
    /// Parses 64 hex digits (either case), as [`Digest`]'s `Display` writes them.
    pub fn from_hex(s: &str) -> Option<Digest> {
        let mut out = [0u8; DIGEST_LEN];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Digest(out))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// The running digest of a recording: `d_0` from the header, then one step per record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    digest: Digest,
}

impl Chain {
    /// The chain's start, `d_0 = SHA-256(header)`, from the header's encoded bytes.
    pub fn new(header: &[u8]) -> Chain {
        let d = ring::digest::digest(&SHA256, header);
        Chain { digest: Digest(d.as_ref().try_into().expect("SHA-256 is 32 bytes")) }
    }

    /// A chain that continues after a record whose digest was `digest`.
    pub fn resume(digest: Digest) -> Chain {
        Chain { digest }
    }

    /// The latest digest: `d_n` after `n` records.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Advances over one record given as the pieces of its bytes without the digest (prefix
    /// and payload may lie apart), and returns the record's digest.
    pub fn advance(&mut self, pieces: &[&[u8]]) -> Digest {
        let mut ctx = Context::new(&SHA256);
        ctx.update(&self.digest.0);
        for p in pieces {
            ctx.update(p);
        }
        self.digest = Digest(ctx.finish().as_ref().try_into().expect("SHA-256 is 32 bytes"));
        self.digest
    }
}

/// Which header string a [`FormatError`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The session id.
    SessionId,
    /// The account id.
    Account,
    /// The instance id.
    Instance,
    /// Who opened the session.
    Principal,
}

impl Field {
    const ALL: [Field; 4] = [Field::SessionId, Field::Account, Field::Instance, Field::Principal];

    fn as_str(self) -> &'static str {
        match self {
            Field::SessionId => "session id",
            Field::Account => "account",
            Field::Instance => "instance",
            Field::Principal => "principal",
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why bytes are not a valid header or record. Each names what is wrong, so that a verify
/// report can say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The file does not start with [`MAGIC`].
    #[error("not a hatch recording (bad magic)")]
    BadMagic,
    /// A version other than [`VERSION`].
    #[error("unsupported recording version {0}")]
    UnsupportedVersion(u16),
    /// A header string over [`MAX_FIELD`] bytes.
    #[error("header {field} of {len} bytes exceeds {MAX_FIELD}")]
    FieldTooLong {
        /// Which string.
        field: Field,
        /// Its length.
        len: usize,
    },
    /// A header string that is not UTF-8.
    #[error("header {0} is not utf-8")]
    FieldNotUtf8(Field),
    /// A record kind this version does not know.
    #[error("unknown record kind {0:#04x}")]
    UnknownKind(u8),
    /// A payload over [`MAX_PAYLOAD`].
    #[error("record payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    PayloadTooLong(u64),
    /// A fixed-size record (resize, exit, resumed) with a payload of the wrong size.
    #[error("record kind {kind:#04x} with a payload of {len} bytes")]
    BadPayloadLength {
        /// The kind byte.
        kind: u8,
        /// The payload length found.
        len: u32,
    },
    /// A marker whose text is not UTF-8.
    #[error("marker text is not utf-8")]
    MarkerNotUtf8,
}

/// The header of a recording: who, where, when, and the terminal's size at the start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The session id (also the file's name).
    pub session_id: String,
    /// The account the session belongs to.
    pub account: String,
    /// The instance the session runs on.
    pub instance: String,
    /// Who opened the session (user or key).
    pub principal: String,
    /// When the recording started, in milliseconds since the Unix epoch.
    pub start_unix_ms: u64,
    /// Terminal columns at the start.
    pub cols: u16,
    /// Terminal rows at the start.
    pub rows: u16,
}

impl Header {
    fn fields(&self) -> [&str; 4] {
        [&self.session_id, &self.account, &self.instance, &self.principal]
    }

    /// Bytes of the encoded header.
    pub fn encoded_len(&self) -> usize {
        HEADER_FIXED_LEN + self.fields().iter().map(|f| 2 + f.len()).sum::<usize>()
    }

    /// Appends the encoded header to `out`; a string over [`MAX_FIELD`] is refused (and
    /// nothing is written).
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        for (field, s) in Field::ALL.into_iter().zip(self.fields()) {
            if s.len() > MAX_FIELD {
                return Err(FormatError::FieldTooLong { field, len: s.len() });
            }
        }
        out.reserve(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_be_bytes());
        out.extend_from_slice(&self.start_unix_ms.to_be_bytes());
        out.extend_from_slice(&self.cols.to_be_bytes());
        out.extend_from_slice(&self.rows.to_be_bytes());
        for s in self.fields() {
            // At most MAX_FIELD (checked above), so it fits in a u16.
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Ok(())
    }

    /// Parses a header from the start of `buf`: the header and its length, `Ok(None)` when
    /// `buf` ends before the header does.
    pub fn decode(buf: &[u8]) -> Result<Option<(Header, usize)>, FormatError> {
        // The magic is checked on whatever prefix is there, so a file of another kind is
        // refused at once rather than read to its end.
        let m = buf.len().min(MAGIC.len());
        if buf[..m] != MAGIC[..m] {
            return Err(FormatError::BadMagic);
        }
        let Some(fixed) = buf.get(..HEADER_FIXED_LEN) else { return Ok(None) };
        let version = u16::from_be_bytes([fixed[8], fixed[9]]);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let start_unix_ms = u64::from_be_bytes(fixed[10..18].try_into().expect("eight bytes"));
        let cols = u16::from_be_bytes([fixed[18], fixed[19]]);
        let rows = u16::from_be_bytes([fixed[20], fixed[21]]);
        let mut pos = HEADER_FIXED_LEN;
        let mut strings: [String; 4] = Default::default();
        for (field, slot) in Field::ALL.into_iter().zip(strings.iter_mut()) {
            let Some(l) = buf.get(pos..pos + 2) else { return Ok(None) };
            let len = usize::from(u16::from_be_bytes([l[0], l[1]]));
            if len > MAX_FIELD {
                return Err(FormatError::FieldTooLong { field, len });
            }
            let Some(bytes) = buf.get(pos + 2..pos + 2 + len) else { return Ok(None) };
            *slot = std::str::from_utf8(bytes)
                .map_err(|_| FormatError::FieldNotUtf8(field))?
                .to_owned();
            pos += 2 + len;
        }
        let [session_id, account, instance, principal] = strings;
        let header = Header { session_id, account, instance, principal, start_unix_ms, cols, rows };
        Ok(Some((header, pos)))
    }
}

/// What a record says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// Bytes the remote terminal wrote (agent → client), exactly as sent.
    Output(&'a [u8]),
    /// Bytes typed into the session (client → agent), exactly as sent.
    Input(&'a [u8]),
    /// The client's terminal changed size.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// The remote process ended with this status (a signal `n` as `128 + n`).
    Exit(i32),
    /// The recording continues after a resume (or a relay restart).
    Resumed {
        /// Wall-clock time of the resume, in milliseconds since the Unix epoch.
        unix_ms: u64,
        /// Bytes of a torn last record (the previous writer died in the middle of it) that
        /// were cut off the file before this record: never silently.
        dropped_tail: u32,
    },
    /// A note in words (UTF-8), for events that are none of the above.
    Marker(&'a str),
}

impl Event<'_> {
    /// The record kind byte.
    pub fn kind(&self) -> u8 {
        match self {
            Event::Output(_) => KIND_OUTPUT,
            Event::Input(_) => KIND_INPUT,
            Event::Resize { .. } => KIND_RESIZE,
            Event::Exit(_) => KIND_EXIT,
            Event::Resumed { .. } => KIND_RESUMED,
            Event::Marker(_) => KIND_MARKER,
        }
    }

    /// Calls `f` with the encoded payload: variable payloads as they are, fixed ones encoded
    /// on the stack (no allocation either way).
    pub fn with_payload<T>(&self, f: impl FnOnce(&[u8]) -> T) -> T {
        match *self {
            Event::Output(b) | Event::Input(b) => f(b),
            Event::Marker(s) => f(s.as_bytes()),
            Event::Resize { cols, rows } => {
                let mut p = [0u8; 4];
                p[..2].copy_from_slice(&cols.to_be_bytes());
                p[2..].copy_from_slice(&rows.to_be_bytes());
                f(&p)
            }
            Event::Exit(status) => f(&status.to_be_bytes()),
            Event::Resumed { unix_ms, dropped_tail } => {
                let mut p = [0u8; 12];
                p[..8].copy_from_slice(&unix_ms.to_be_bytes());
                p[8..].copy_from_slice(&dropped_tail.to_be_bytes());
                f(&p)
            }
        }
    }

    /// Length of the encoded payload.
    pub fn payload_len(&self) -> usize {
        self.with_payload(<[u8]>::len)
    }

    /// Reads a payload of `kind`, checking what the kind requires of it.
    fn parse(kind: u8, p: &[u8]) -> Result<Event<'_>, FormatError> {
        let fixed = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                // The length was bounded by MAX_PAYLOAD, so it fits in a u32.
                Err(FormatError::BadPayloadLength { kind, len: p.len() as u32 })
            }
        };
        Ok(match kind {
            KIND_OUTPUT => Event::Output(p),
            KIND_INPUT => Event::Input(p),
            KIND_RESIZE => {
                fixed(4)?;
                Event::Resize {
                    cols: u16::from_be_bytes([p[0], p[1]]),
                    rows: u16::from_be_bytes([p[2], p[3]]),
                }
            }
            KIND_EXIT => {
                fixed(4)?;
                Event::Exit(i32::from_be_bytes(p.try_into().expect("four bytes")))
            }
            KIND_RESUMED => {
                fixed(12)?;
                Event::Resumed {
                    unix_ms: u64::from_be_bytes(p[..8].try_into().expect("eight bytes")),
                    dropped_tail: u32::from_be_bytes(p[8..].try_into().expect("four bytes")),
                }
            }
            KIND_MARKER => {
                Event::Marker(std::str::from_utf8(p).map_err(|_| FormatError::MarkerNotUtf8)?)
            }
            other => return Err(FormatError::UnknownKind(other)),
        })
    }
}

/// One decoded record, borrowing its payload from the decoded buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Microseconds since the header's start time.
    pub time_us: u64,
    /// What happened.
    pub event: Event<'a>,
    /// The chain digest stored with the record (`d_n`), to compare with [`Chain::advance`]
    /// over [`Record::sealed`].
    pub digest: Digest,
    /// The bytes the digest covers: the record without its digest.
    pub sealed: &'a [u8],
}

/// The prefix of a record: kind, time, payload length. `payload_len` must be at most
/// [`MAX_PAYLOAD`] (the callers check it: a larger record is refused, not written).
pub fn record_prefix(kind: u8, time_us: u64, payload_len: usize) -> [u8; RECORD_PREFIX_LEN] {
    debug_assert!(payload_len <= MAX_PAYLOAD, "payload of {payload_len} bytes");
    let mut p = [0u8; RECORD_PREFIX_LEN];
    p[0] = kind;
    p[1..9].copy_from_slice(&time_us.to_be_bytes());
    p[9..].copy_from_slice(&(payload_len as u32).to_be_bytes());
    p
}

/// Appends one record to `out`, advancing `chain`, and returns its digest. A payload over
/// [`MAX_PAYLOAD`] is refused and nothing is written.
pub fn encode_record(
    time_us: u64,
    event: &Event<'_>,
    chain: &mut Chain,
    out: &mut Vec<u8>,
) -> Result<Digest, FormatError> {
    event.with_payload(|payload| {
        if payload.len() > MAX_PAYLOAD {
            return Err(FormatError::PayloadTooLong(payload.len() as u64));
        }
        let prefix = record_prefix(event.kind(), time_us, payload.len());
        let d = chain.advance(&[&prefix, payload]);
        out.reserve(RECORD_OVERHEAD + payload.len());
        out.extend_from_slice(&prefix);
        out.extend_from_slice(payload);
        out.extend_from_slice(&d.0);
        Ok(d)
    })
}

/// Parses one record from the start of `buf`: the record and its length, or `Ok(None)` when
/// `buf` ends before the record does. The digest is returned, not checked (see [`Chain`]).
///
/// The kind and the declared length are checked as soon as the prefix is in, so a corrupt
/// length is refused before any payload is waited for.
pub fn decode(buf: &[u8]) -> Result<Option<(Record<'_>, usize)>, FormatError> {
    if let Some(&kind) = buf.first()
        && !(KIND_OUTPUT..=KIND_MARKER).contains(&kind)
    {
        return Err(FormatError::UnknownKind(kind));
    }
    let Some(prefix) = buf.get(..RECORD_PREFIX_LEN) else { return Ok(None) };
    let kind = prefix[0];
    let time_us = u64::from_be_bytes(prefix[1..9].try_into().expect("eight bytes"));
    let len = u32::from_be_bytes(prefix[9..13].try_into().expect("four bytes"));
    if len as usize > MAX_PAYLOAD {
        return Err(FormatError::PayloadTooLong(u64::from(len)));
    }
    // Fixed-size kinds are refused as soon as their length is known to be wrong.
    check_fixed_len(kind, len)?;
    let end = RECORD_PREFIX_LEN + len as usize;
    let Some(digest) = buf.get(end..end + DIGEST_LEN) else { return Ok(None) };
    let event = Event::parse(kind, &buf[RECORD_PREFIX_LEN..end])?;
    let digest = Digest(digest.try_into().expect("32 bytes"));
    Ok(Some((Record { time_us, event, digest, sealed: &buf[..end] }, end + DIGEST_LEN)))
}

fn check_fixed_len(kind: u8, len: u32) -> Result<(), FormatError> {
    let want = match kind {
        KIND_RESIZE | KIND_EXIT => 4,
        KIND_RESUMED => 12,
        _ => return Ok(()),
    };
    if len == want { Ok(()) } else { Err(FormatError::BadPayloadLength { kind, len }) }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn header() -> Header {
        Header {
            session_id: "s-1".into(),
            account: "a".into(),
            instance: "i-9".into(),
            principal: "u:é".into(),
            start_unix_ms: 0x0102_0304_0506_0708,
            cols: 80,
            rows: 24,
        }
    }

    fn header_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        header().encode(&mut out).unwrap();
        out
    }

    /// The header, byte for byte.
    #[test]
    fn header_golden_vector() {
        let wire = header_bytes();
        let want: &[u8] = &[
            b'H', b'A', b'T', b'C', b'H', b'R', b'E', b'C', // magic
            0x00, 0x01, // version 1
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // start unix ms
            0x00, 0x50, 0x00, 0x18, // 80 x 24
            0x00, 0x03, b's', b'-', b'1', // session id
            0x00, 0x01, b'a', // account
            0x00, 0x03, b'i', b'-', b'9', // instance
            0x00, 0x04, b'u', b':', 0xC3, 0xA9, // principal "u:é"
        ];
        assert_eq!(wire, want);
        assert_eq!(header().encoded_len(), want.len());
        assert_eq!(Header::decode(&wire), Ok(Some((header(), want.len()))));
        // d_0 is SHA-256 of those bytes (checked against ring's one-shot digest).
        let d0 = Chain::new(&wire).digest();
        assert_eq!(d0.0.as_slice(), ring::digest::digest(&SHA256, want).as_ref());
    }

    /// Known answer: SHA-256 of the empty string, so the chain uses plain SHA-256.
    #[test]
    fn chain_of_nothing_is_sha256_of_nothing() {
        assert_eq!(
            Chain::new(&[]).digest().to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    /// One record of each kind, byte for byte, with its digest over the previous digest and
    /// the record's bytes.
    #[test]
    fn record_golden_vectors() {
        let cases: &[(Event<'_>, &[u8])] = &[
            (Event::Output(b"hi\xff"), &[0x01, 0x00, 0x00, 0x00, 0x03, b'h', b'i', 0xFF]),
            (Event::Input(b""), &[0x02, 0x00, 0x00, 0x00, 0x00]),
            (Event::Resize { cols: 132, rows: 43 }, &[0x03, 0, 0, 0, 4, 0x00, 0x84, 0x00, 0x2B]),
            (Event::Exit(-2), &[0x04, 0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFE]),
            (
                Event::Resumed { unix_ms: 0x1122, dropped_tail: 7 },
                &[0x05, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0x11, 0x22, 0, 0, 0, 7],
            ),
            (Event::Marker("ok"), &[0x06, 0, 0, 0, 2, b'o', b'k']),
        ];
        let time: u64 = 0x00AB_CDEF;
        let time_bytes = [0, 0, 0, 0, 0, 0xAB, 0xCD, 0xEF];
        let mut chain = Chain::new(&header_bytes());
        for (event, rest) in cases {
            let prev = chain.digest();
            let mut out = Vec::new();
            let d = encode_record(time, event, &mut chain, &mut out).unwrap();
            // kind, then the time, then length and payload.
            let mut sealed = vec![rest[0]];
            sealed.extend_from_slice(&time_bytes);
            sealed.extend_from_slice(&rest[1..]);
            assert_eq!(&out[..sealed.len()], sealed.as_slice(), "{event:?}");
            let mut ctx = Context::new(&SHA256);
            ctx.update(&prev.0);
            ctx.update(&sealed);
            assert_eq!(&out[sealed.len()..], ctx.finish().as_ref(), "{event:?}");
            assert_eq!(&out[sealed.len()..], d.0.as_slice());
            let (rec, used) = decode(&out).unwrap().unwrap();
            assert_eq!(used, out.len());
            assert_eq!(rec, Record { time_us: time, event: *event, digest: d, sealed: &sealed });
        }
    }

    #[test]
    fn digest_hex_round_trips() {
        let d = Chain::new(b"x").digest();
        assert_eq!(Digest::from_hex(&d.to_string()), Some(d));
        assert_eq!(Digest::from_hex(&d.to_string().to_uppercase()), Some(d));
        assert_eq!(Digest::from_hex("abc"), None);
        assert_eq!(Digest::from_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn header_rejections() {
        let wire = header_bytes();
        assert_eq!(Header::decode(b"HATCHRED"), Err(FormatError::BadMagic));
        // A wrong first byte is refused with one byte in hand.
        assert_eq!(Header::decode(b"{"), Err(FormatError::BadMagic));
        let mut v2 = wire.clone();
        v2[9] = 2;
        assert_eq!(Header::decode(&v2), Err(FormatError::UnsupportedVersion(2)));
        let mut long = wire[..HEADER_FIXED_LEN].to_vec();
        long.extend_from_slice(&[0x04, 0x01]);
        assert_eq!(
            Header::decode(&long),
            Err(FormatError::FieldTooLong { field: Field::SessionId, len: 1025 })
        );
        let mut bad = wire.clone();
        let at = bad.len() - 1;
        bad[at] = 0xFF;
        assert_eq!(Header::decode(&bad), Err(FormatError::FieldNotUtf8(Field::Principal)));

        let too_long = Header { account: "a".repeat(MAX_FIELD + 1), ..header() };
        let mut out = Vec::new();
        assert_eq!(
            too_long.encode(&mut out),
            Err(FormatError::FieldTooLong { field: Field::Account, len: MAX_FIELD + 1 })
        );
        assert!(out.is_empty());
        // MAX_FIELD itself is fine, and MAX_HEADER_LEN is the largest header.
        let s = "x".repeat(MAX_FIELD);
        let max = Header {
            session_id: s.clone(),
            account: s.clone(),
            instance: s.clone(),
            principal: s,
            ..header()
        };
        max.encode(&mut out).unwrap();
        assert_eq!(out.len(), MAX_HEADER_LEN);
        assert_eq!(Header::decode(&out).unwrap().unwrap().1, MAX_HEADER_LEN);
    }

    #[test]
    fn record_rejections() {
        assert_eq!(decode(&[0x00]), Err(FormatError::UnknownKind(0)));
        assert_eq!(decode(&[0x07, 0, 0]), Err(FormatError::UnknownKind(7)));
        // 1 MiB + 1, refused before any payload arrives.
        let over = record_prefix_raw(KIND_OUTPUT, 0, MAX_PAYLOAD as u32 + 1);
        assert_eq!(decode(&over), Err(FormatError::PayloadTooLong(MAX_PAYLOAD as u64 + 1)));
        let huge = record_prefix_raw(KIND_OUTPUT, 0, u32::MAX);
        assert_eq!(decode(&huge), Err(FormatError::PayloadTooLong(u64::from(u32::MAX))));
        // Fixed kinds with a wrong length, also before the payload arrives.
        for (kind, len) in [(KIND_RESIZE, 3), (KIND_EXIT, 5), (KIND_RESUMED, 4), (KIND_EXIT, 0)] {
            let p = record_prefix_raw(kind, 0, len);
            assert_eq!(decode(&p), Err(FormatError::BadPayloadLength { kind, len }), "{kind}");
        }
        // A marker that is not UTF-8 (known once the whole record is in).
        let mut m = record_prefix_raw(KIND_MARKER, 0, 1).to_vec();
        m.push(0xC3);
        assert_eq!(decode(&m), Ok(None));
        m.extend_from_slice(&[0; DIGEST_LEN]);
        assert_eq!(decode(&m), Err(FormatError::MarkerNotUtf8));
        // The payload bound itself is accepted.
        let ok = record_prefix_raw(KIND_OUTPUT, 0, MAX_PAYLOAD as u32);
        assert_eq!(decode(&ok), Ok(None));
        let mut out = Vec::new();
        let big = vec![0u8; MAX_PAYLOAD + 1];
        let mut chain = Chain::new(b"");
        assert_eq!(
            encode_record(0, &Event::Output(&big), &mut chain, &mut out),
            Err(FormatError::PayloadTooLong(MAX_PAYLOAD as u64 + 1))
        );
        assert!(out.is_empty());
        assert_eq!(chain, Chain::new(b""), "a refused record does not advance the chain");
    }

    fn record_prefix_raw(kind: u8, time: u64, len: u32) -> [u8; RECORD_PREFIX_LEN] {
        let mut p = [0u8; RECORD_PREFIX_LEN];
        p[0] = kind;
        p[1..9].copy_from_slice(&time.to_be_bytes());
        p[9..].copy_from_slice(&len.to_be_bytes());
        p
    }

    #[test]
    fn every_truncated_prefix_needs_more_bytes() {
        let wire = header_bytes();
        for n in 0..wire.len() {
            assert_eq!(Header::decode(&wire[..n]), Ok(None), "header[..{n}]");
        }
        let mut chain = Chain::new(&wire);
        for event in [Event::Output(b"abc"), Event::Resize { cols: 1, rows: 2 }, Event::Marker("")]
        {
            let mut out = Vec::new();
            encode_record(5, &event, &mut chain, &mut out).unwrap();
            for n in 0..out.len() {
                assert_eq!(decode(&out[..n]), Ok(None), "{event:?}[..{n}]");
            }
        }
    }

    pub(crate) fn any_event() -> impl Strategy<Value = OwnedEvent> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(OwnedEvent::Output),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(OwnedEvent::Input),
            (any::<u16>(), any::<u16>()).prop_map(|(c, r)| OwnedEvent::Resize(c, r)),
            any::<i32>().prop_map(OwnedEvent::Exit),
            (any::<u64>(), any::<u32>()).prop_map(|(t, d)| OwnedEvent::Resumed(t, d)),
            ".{0,20}".prop_map(OwnedEvent::Marker),
        ]
    }

    /// An [`Event`] that owns its bytes, for proptest.
    #[derive(Debug, Clone)]
    pub(crate) enum OwnedEvent {
        Output(Vec<u8>),
        Input(Vec<u8>),
        Resize(u16, u16),
        Exit(i32),
        Resumed(u64, u32),
        Marker(String),
    }

    impl OwnedEvent {
        pub(crate) fn as_event(&self) -> Event<'_> {
            match self {
                OwnedEvent::Output(b) => Event::Output(b),
                OwnedEvent::Input(b) => Event::Input(b),
                OwnedEvent::Resize(c, r) => Event::Resize { cols: *c, rows: *r },
                OwnedEvent::Exit(s) => Event::Exit(*s),
                OwnedEvent::Resumed(t, d) => Event::Resumed { unix_ms: *t, dropped_tail: *d },
                OwnedEvent::Marker(s) => Event::Marker(s),
            }
        }
    }

    proptest! {
        #[test]
        fn records_round_trip_at_any_split(
            events in proptest::collection::vec((any::<u32>(), any_event()), 0..12),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut chain = Chain::new(&header_bytes());
            let mut wire = Vec::new();
            let mut digests = Vec::new();
            for (t, e) in &events {
                digests.push(encode_record(u64::from(*t), &e.as_event(), &mut chain, &mut wire).unwrap());
            }
            // Decoded whole, then again from a stream cut in two at any point: the same
            // records, and the chain recomputed from `sealed` matches every stored digest.
            let cut = cut.index(wire.len() + 1);
            let mut check = Chain::new(&header_bytes());
            let mut pos = 0;
            let mut have = cut;
            let mut i = 0;
            while pos < wire.len() {
                match decode(&wire[pos..have]).unwrap() {
                    Some((rec, used)) => {
                        let (t, e) = &events[i];
                        prop_assert_eq!(rec.time_us, u64::from(*t));
                        prop_assert_eq!(rec.event, e.as_event());
                        prop_assert_eq!(rec.digest, digests[i]);
                        prop_assert_eq!(check.advance(&[rec.sealed]), rec.digest);
                        pos += used;
                        i += 1;
                    }
                    None => {
                        prop_assert!(have < wire.len(), "Ok(None) with the whole stream");
                        have = wire.len();
                    }
                }
            }
            prop_assert_eq!(i, events.len());
            prop_assert_eq!(check, chain);
        }

        #[test]
        fn any_bytes_decode_or_reject_without_panic(
            buf in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            match decode(&buf) {
                Ok(Some((rec, used))) => {
                    prop_assert!(used <= buf.len());
                    // Re-encoding the decoded record gives exactly the bytes it came from.
                    let prefix = record_prefix(rec.event.kind(), rec.time_us, rec.event.payload_len());
                    let mut again = prefix.to_vec();
                    rec.event.with_payload(|p| again.extend_from_slice(p));
                    prop_assert_eq!(again.as_slice(), rec.sealed);
                    again.extend_from_slice(&rec.digest.0);
                    prop_assert_eq!(again.as_slice(), &buf[..used]);
                }
                Ok(None) => {}
                Err(_) => {}
            }
            match Header::decode(&buf) {
                Ok(Some((h, used))) => {
                    let mut again = Vec::new();
                    h.encode(&mut again).unwrap();
                    prop_assert_eq!(again.as_slice(), &buf[..used]);
                }
                Ok(None) => prop_assert!(MAGIC.starts_with(&buf[..buf.len().min(8)])),
                Err(_) => {}
            }
        }

        #[test]
        fn headers_round_trip(
            s in "[a-z0-9-]{0,40}", a in ".{0,20}", i in ".{0,20}", p in ".{0,60}",
            t in any::<u64>(), cols in any::<u16>(), rows in any::<u16>(),
            trailing in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let h = Header {
                session_id: s, account: a, instance: i, principal: p,
                start_unix_ms: t, cols, rows,
            };
            let mut wire = Vec::new();
            h.encode(&mut wire).unwrap();
            let n = wire.len();
            prop_assert_eq!(n, h.encoded_len());
            wire.extend_from_slice(&trailing);
            prop_assert_eq!(Header::decode(&wire), Ok(Some((h, n))));
        }
    }
}
