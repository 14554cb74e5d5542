//! Reading a recording back: a streaming [`Reader`] that checks the digest chain record by
//! record, and [`verify`], which reads a whole file and says `ok` or names the first record
//! that is broken.
//!
//! The reader holds at most one record (and one read's worth of bytes) in memory, however
//! long the recording: a 10 GiB file verifies in the same memory as a 10 KiB one. The file is
//! hostile input (it may have been edited): every length is bounded by the format before
//! anything is allocated for it, and nothing in it can make the reader panic.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use thiserror::Error;

use super::format::{self, Chain, Digest, FormatError, Header, MAX_HEADER_LEN, MAX_RECORD_LEN};

/// Bytes asked of the source per read. Large enough that a fast disk is read in few calls,
/// small next to the largest record.
const READ_CHUNK: usize = 64 * 1024;

/// Why a recording does not verify (or could not be read). Where a record is at fault, its
/// index (0 is the first record after the header) and the byte offset of its start in the
/// file are given, so that a person can look at it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// Reading the source failed.
    #[error("read failed at byte {offset}: {source}")]
    Io {
        /// Where in the file the failed read started.
        offset: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The header is not a valid header.
    #[error("bad header: {0}")]
    Header(FormatError),
    /// The file ends inside the header (`len` bytes in all).
    #[error("truncated header: the file ends after {len} bytes")]
    TruncatedHeader {
        /// Bytes in the file.
        len: u64,
    },
    /// A record does not decode.
    #[error("record {index} at byte {offset} does not decode: {source}")]
    Record {
        /// Index of the record.
        index: u64,
        /// Offset of its first byte.
        offset: u64,
        /// What is wrong with it.
        source: FormatError,
    },
    /// A record's stored digest is not the chain's: it, or something before it, was changed.
    #[error(
        "record {index} at byte {offset}: digest does not match (expected {expected}, stored {stored})"
    )]
    Digest {
        /// Index of the record.
        index: u64,
        /// Offset of its first byte.
        offset: u64,
        /// The digest the chain gives.
        expected: Digest,
        /// The digest the record carries.
        stored: Digest,
    },
    /// A record's time is earlier than the one before it (times never go backwards).
    #[error(
        "record {index} at byte {offset}: time {time_us} µs before the previous {previous_us} µs"
    )]
    TimeBackwards {
        /// Index of the record.
        index: u64,
        /// Offset of its first byte.
        offset: u64,
        /// Its time.
        time_us: u64,
        /// The previous record's time.
        previous_us: u64,
    },
    /// The file ends inside a record: the tail of a recording whose writer died, or a file
    /// cut short. Everything before `offset` verified.
    #[error("truncated: the file ends inside record {index} at byte {offset} ({len} bytes of it)")]
    Truncated {
        /// Index of the torn record.
        index: u64,
        /// Offset of its first byte (the length of the file that verified).
        offset: u64,
        /// Bytes of it present.
        len: u64,
    },
    /// The whole chain verified, but its final digest is not the one expected (kept by the
    /// store when the session ended): records were removed from the end, or the whole file
    /// was replaced by another consistent one.
    #[error("final digest {actual} is not the expected {expected} (after {records} records)")]
    FinalDigest {
        /// The digest the caller expected.
        expected: Digest,
        /// The file's final digest.
        actual: Digest,
        /// Records in the file.
        records: u64,
    },
}

impl VerifyError {
    /// The index of the record at fault, when one is.
    pub fn record_index(&self) -> Option<u64> {
        match self {
            VerifyError::Record { index, .. }
            | VerifyError::Digest { index, .. }
            | VerifyError::TimeBackwards { index, .. }
            | VerifyError::Truncated { index, .. } => Some(*index),
            _ => None,
        }
    }
}

/// What a verified recording holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The header.
    pub header: Header,
    /// Records after the header.
    pub records: u64,
    /// The final chain digest (`d_0` for a recording with no records).
    pub final_digest: Digest,
    /// Bytes of the file.
    pub len: u64,
    /// The last record's time, in µs since the start (0 with no records).
    pub duration_us: u64,
    /// The exit status, when an exit record was found (the last one counts).
    pub exit: Option<i32>,
}

/// Reads a recording from `src` one record at a time, checking the chain as it goes.
pub struct Reader<R> {
    src: R,
    buf: Vec<u8>,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// File offset of `buf[start]`.
    offset: u64,
    eof: bool,
    header: Header,
    chain: Chain,
    records: u64,
    last_time_us: u64,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header.
    pub fn new(src: R) -> Result<Reader<R>, VerifyError> {
        let mut r = Reader {
            src,
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            offset: 0,
            eof: false,
            header: Header {
                session_id: String::new(),
                account: String::new(),
                instance: String::new(),
                principal: String::new(),
                start_unix_ms: 0,
                cols: 0,
                rows: 0,
            },
            chain: Chain::new(&[]),
            records: 0,
            last_time_us: 0,
        };
        loop {
            match Header::decode(&r.buf[r.start..r.end]).map_err(VerifyError::Header)? {
                Some((header, used)) => {
                    r.chain = Chain::new(&r.buf[r.start..r.start + used]);
                    r.header = header;
                    r.consume(used);
                    return Ok(r);
                }
                None if r.eof => {
                    return Err(VerifyError::TruncatedHeader { len: (r.end - r.start) as u64 });
                }
                None => r.fill(MAX_HEADER_LEN)?,
            }
        }
    }

    /// The recording's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The chain's digest after the records read so far.
    pub fn digest(&self) -> Digest {
        self.chain.digest()
    }

    /// Records read so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes of the file that verified so far (header and whole records).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The time of the last record read, in µs (0 before the first).
    pub fn last_time_us(&self) -> u64 {
        self.last_time_us
    }

    /// The next record, checked against the chain; `Ok(None)` at a clean end of the file.
    /// After an error the reader is not to be used again.
    pub fn next_record(&mut self) -> Result<Option<format::Record<'_>>, VerifyError> {
        let used = loop {
            let index = self.records;
            let offset = self.offset;
            match format::decode(&self.buf[self.start..self.end]) {
                Ok(Some((rec, used))) => {
                    let expected = self.chain.advance(&[rec.sealed]);
                    if expected != rec.digest {
                        return Err(VerifyError::Digest {
                            index,
                            offset,
                            expected,
                            stored: rec.digest,
                        });
                    }
                    if rec.time_us < self.last_time_us {
                        return Err(VerifyError::TimeBackwards {
                            index,
                            offset,
                            time_us: rec.time_us,
                            previous_us: self.last_time_us,
                        });
                    }
                    self.last_time_us = rec.time_us;
                    break used;
                }
                Ok(None) if self.eof => {
                    return if self.start == self.end {
                        Ok(None)
                    } else {
                        Err(VerifyError::Truncated {
                            index,
                            offset,
                            len: (self.end - self.start) as u64,
                        })
                    };
                }
                Ok(None) => self.fill(MAX_RECORD_LEN)?,
                Err(source) => return Err(VerifyError::Record { index, offset, source }),
            }
        };
        // Decoded once more to hand out a borrow of the buffer (the loop above mutates it):
        // a few comparisons, and the payload is not copied.
        let at = self.start;
        self.consume(used);
        self.records += 1;
        let (rec, _) = format::decode(&self.buf[at..at + used])
            .expect("decoded just above")
            .expect("complete just above");
        Ok(Some(rec))
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
    }

    /// Reads more bytes: at least one more, or sets `eof`. The buffer grows only up to
    /// `bound` (the longest thing that can be waiting to complete) plus one read.
    fn fill(&mut self, bound: usize) -> Result<(), VerifyError> {
        if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // Only reached while less than `bound` is pending (the decoder refuses anything
            // longer), so the buffer stays below `bound + READ_CHUNK`.
            let grow = (bound + READ_CHUNK).saturating_sub(self.buf.len()).clamp(1, READ_CHUNK);
            self.buf.resize(self.buf.len() + grow, 0);
        }
        loop {
            match self.src.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    let offset = self.offset + (self.end - self.start) as u64;
                    return Err(VerifyError::Io { offset, source });
                }
            }
        }
    }
}

/// Reads `src` to its end and checks every record's digest, the order of times and, when
/// given, that the final digest is `expected`.
pub fn verify_reader<R: Read>(src: R, expected: Option<Digest>) -> Result<Verified, VerifyError> {
    let mut r = Reader::new(src)?;
    let mut exit = None;
    while let Some(rec) = r.next_record()? {
        if let format::Event::Exit(status) = rec.event {
            exit = Some(status);
        }
    }
    let final_digest = r.digest();
    if let Some(expected) = expected
        && expected != final_digest
    {
        return Err(VerifyError::FinalDigest {
            expected,
            actual: final_digest,
            records: r.records(),
        });
    }
    Ok(Verified {
        header: r.header.clone(),
        records: r.records(),
        final_digest,
        len: r.offset(),
        duration_us: r.last_time_us(),
        exit,
    })
}

/// Verifies the recording file at `path` (see [`verify_reader`]). A file that cannot be
/// opened is [`VerifyError::Io`] at offset 0.
pub fn verify(path: &Path, expected: Option<Digest>) -> Result<Verified, VerifyError> {
    let f = File::open(path).map_err(|source| VerifyError::Io { offset: 0, source })?;
    verify_reader(f, expected)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::recording::format::{Event, encode_record};

    pub(crate) fn header() -> Header {
        Header {
            session_id: "s-1".into(),
            account: "acct".into(),
            instance: "i-1".into(),
            principal: "alice".into(),
            start_unix_ms: 1_700_000_000_000,
            cols: 80,
            rows: 24,
        }
    }

    /// A recording of `events` (at times 0, 10, 20 µs, ...), and each record's offset.
    pub(crate) fn recording(events: &[Event<'_>]) -> (Vec<u8>, Vec<u64>, Digest) {
        let mut out = Vec::new();
        header().encode(&mut out).unwrap();
        let mut chain = Chain::new(&out);
        let mut offsets = Vec::new();
        for (i, e) in events.iter().enumerate() {
            offsets.push(out.len() as u64);
            encode_record(i as u64 * 10, e, &mut chain, &mut out).unwrap();
        }
        (out, offsets, chain.digest())
    }

    /// A reader that hands out at most `n` bytes per read, to exercise every refill path.
    struct Trickle<'a> {
        data: &'a [u8],
        n: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let k = self.n.min(buf.len()).min(self.data.len());
            buf[..k].copy_from_slice(&self.data[..k]);
            self.data = &self.data[k..];
            Ok(k)
        }
    }

    fn events() -> Vec<Event<'static>> {
        vec![
            Event::Output(b"hello\r\n"),
            Event::Input(b"ls\r"),
            Event::Resize { cols: 100, rows: 30 },
            Event::Output(&[0xE2, 0x82]),
            Event::Output(&[0xAC, b'\n']),
            Event::Exit(4),
        ]
    }

    #[test]
    fn a_good_recording_verifies() {
        let (wire, _, digest) = recording(&events());
        for n in [1, 7, 64, usize::MAX] {
            let v = verify_reader(Trickle { data: &wire, n }, Some(digest)).unwrap();
            assert_eq!(v.header, header());
            assert_eq!(v.records, 6);
            assert_eq!(v.final_digest, digest);
            assert_eq!(v.len, wire.len() as u64);
            assert_eq!(v.duration_us, 50);
            assert_eq!(v.exit, Some(4));
        }
        // No records: the final digest is d_0.
        let (wire, _, digest) = recording(&[]);
        let v = verify_reader(wire.as_slice(), None).unwrap();
        assert_eq!((v.records, v.final_digest), (0, digest));
        assert_eq!(digest, Chain::new(&wire).digest());
    }

    #[test]
    fn a_flipped_byte_names_its_record() {
        let (wire, offsets, _) = recording(&events());
        // Every byte of every record: flipping it breaks exactly that record (a bad digest,
        // or a record that no longer decodes), never an earlier one.
        for (i, &start) in offsets.iter().enumerate() {
            let end = offsets.get(i + 1).copied().unwrap_or(wire.len() as u64);
            for at in start..end {
                let mut bad = wire.clone();
                bad[at as usize] ^= 0x01;
                let err = verify_reader(bad.as_slice(), None).unwrap_err();
                match &err {
                    VerifyError::Digest { index, offset, .. }
                    | VerifyError::Record { index, offset, .. }
                    | VerifyError::TimeBackwards { index, offset, .. } => {
                        assert_eq!((*index, *offset), (i as u64, start), "byte {at}: {err}");
                    }
                    // A flipped length bit can make the record reach past the end.
                    VerifyError::Truncated { index, offset, .. } => {
                        assert_eq!((*index, *offset), (i as u64, start), "byte {at}: {err}");
                    }
                    other => panic!("byte {at}: {other}"),
                }
                assert_eq!(err.record_index(), Some(i as u64));
            }
        }
        // A flipped header byte: a bad header, or record 0's digest fails (d_0 changed).
        let mut bad = wire.clone();
        bad[30] ^= 0x01;
        let err = verify_reader(bad.as_slice(), None).unwrap_err();
        assert!(
            matches!(err, VerifyError::Digest { index: 0, .. } | VerifyError::Header(_)),
            "{err}"
        );
    }

    #[test]
    fn the_message_names_index_and_offset() {
        let (mut wire, offsets, _) = recording(&events());
        let at = offsets[2] as usize + 5;
        wire[at] ^= 0x80;
        let err = verify_reader(wire.as_slice(), None).unwrap_err();
        assert_eq!(
            err.to_string().split(':').next().unwrap(),
            format!("record 2 at byte {}", offsets[2])
        );
    }

    #[test]
    fn a_torn_tail_is_reported_as_truncated() {
        let (wire, offsets, _) = recording(&events());
        let last = *offsets.last().unwrap();
        for cut in last + 1..wire.len() as u64 {
            let err = verify_reader(&wire[..cut as usize], None).unwrap_err();
            match err {
                VerifyError::Truncated { index, offset, len } => {
                    assert_eq!((index, offset, len), (5, last, cut - last));
                }
                other => panic!("cut at {cut}: {other}"),
            }
        }
        // Cut between records: a clean, shorter recording (only the expected digest can tell).
        let cut = &wire[..last as usize];
        let v = verify_reader(cut, None).unwrap();
        assert_eq!(v.records, 5);
        let (_, _, full) = recording(&events());
        let err = verify_reader(cut, Some(full)).unwrap_err();
        assert!(matches!(err, VerifyError::FinalDigest { records: 5, .. }), "{err}");
        for n in 0..30 {
            let err = verify_reader(&wire[..n], None).unwrap_err();
            assert!(
                matches!(err, VerifyError::TruncatedHeader { len } if len == n as u64),
                "{n}: {err}"
            );
        }
    }

    #[test]
    fn times_may_not_go_backwards() {
        let mut out = Vec::new();
        header().encode(&mut out).unwrap();
        let mut chain = Chain::new(&out);
        encode_record(100, &Event::Output(b"a"), &mut chain, &mut out).unwrap();
        let second = out.len() as u64;
        encode_record(99, &Event::Output(b"b"), &mut chain, &mut out).unwrap();
        let err = verify_reader(out.as_slice(), None).unwrap_err();
        assert!(
            matches!(err, VerifyError::TimeBackwards { index: 1, offset, time_us: 99, previous_us: 100 } if offset == second),
            "{err}"
        );
    }

    #[test]
    fn not_a_recording() {
        let err = verify_reader(&b"{\"version\": 2}\n"[..], None).unwrap_err();
        assert!(matches!(err, VerifyError::Header(FormatError::BadMagic)), "{err}");
        let err = verify(Path::new("/nonexistent/x.hrec"), None).unwrap_err();
        assert!(matches!(err, VerifyError::Io { offset: 0, .. }), "{err}");
    }

    #[test]
    fn the_largest_record_is_read_through_a_small_source() {
        let big = vec![0xA5u8; format::MAX_PAYLOAD];
        let (wire, _, digest) = recording(&[Event::Output(&big), Event::Output(b"x")]);
        let v = verify_reader(Trickle { data: &wire, n: 10_000 }, Some(digest)).unwrap();
        assert_eq!(v.records, 2);
        let mut r = Reader::new(wire.as_slice()).unwrap();
        assert_eq!(r.next_record().unwrap().unwrap().event, Event::Output(&big));
        assert!(r.buf.len() <= MAX_RECORD_LEN + READ_CHUNK, "buffer {}", r.buf.len());
    }

    proptest! {
        #[test]
        fn any_bytes_after_a_header_verify_or_fail_without_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..200),
            n in 1usize..50,
        ) {
            let (mut wire, _, _) = recording(&[Event::Output(b"x")]);
            wire.extend_from_slice(&tail);
            let _ = verify_reader(Trickle { data: &wire, n }, None);
        }

        #[test]
        fn reading_in_any_chunks_gives_the_same_records(n in 1usize..100) {
            let (wire, _, digest) = recording(&events());
            let mut r = Reader::new(Trickle { data: &wire, n }).unwrap();
            let mut got = Vec::new();
            while let Some(rec) = r.next_record().unwrap() {
                got.push(format!("{:?}", rec.event));
            }
            let want: Vec<String> = events().iter().map(|e| format!("{e:?}")).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(r.digest(), digest);
        }
    }
}
