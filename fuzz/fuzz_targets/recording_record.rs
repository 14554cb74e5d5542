//! Session recordings (`hatch_relay::recording`) read back from disk, where anyone with access
//! to the data directory may have edited them: any bytes decode or are refused, never a
//! panic. A decoded record lies inside the input, re-encodes to exactly the bytes it came
//! from and needs every one of them (any shorter prefix is `Ok(None)`); a decoded header
//! re-encodes likewise. The streaming reader agrees with decoding by hand: it accepts exactly
//! the records whose digests continue the chain, and stops at the first that does not, naming
//! its index and offset. The asciicast export of the same bytes never panics and always
//! writes JSON lines.
//!
//! Input that starts with the magic is a whole file; any other input is taken as the records
//! after a fixed header (so the fuzzer need not find the magic to reach the reader).

#![no_main]

use hatch_relay::recording::asciicast::{ExportOptions, export};
use hatch_relay::recording::format::{self, Chain, Header, MAGIC, record_prefix};
use hatch_relay::recording::verify::{VerifyError, verify_reader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file = if data.starts_with(&MAGIC) {
        data.to_vec()
    } else {
        let h = Header {
            session_id: "s-fuzz".into(),
            account: "a".into(),
            instance: "i".into(),
            principal: "p".into(),
            start_unix_ms: 0,
            cols: 80,
            rows: 24,
        };
        let mut f = Vec::new();
        h.encode(&mut f).unwrap();
        f.extend_from_slice(data);
        f
    };
    let Ok(Some((header, hlen))) = Header::decode(&file) else {
        assert!(verify_reader(file.as_slice(), None).is_err());
        return;
    };
    let mut again = Vec::new();
    header.encode(&mut again).unwrap();
    assert_eq!(again, file[..hlen], "re-encoded header differs");

    // Decode by hand, following the chain, to know what the reader must say.
    let mut chain = Chain::new(&file[..hlen]);
    let mut pos = hlen;
    let mut index = 0u64;
    let mut last_time = 0u64;
    let expect: Result<u64, (u64, u64)> = loop {
        match format::decode(&file[pos..]) {
            Ok(Some((rec, used))) => {
                assert!(used <= file.len() - pos);
                let mut enc =
                    record_prefix(rec.event.kind(), rec.time_us, rec.event.payload_len()).to_vec();
                rec.event.with_payload(|p| enc.extend_from_slice(p));
                assert_eq!(enc, rec.sealed);
                enc.extend_from_slice(&rec.digest.0);
                assert_eq!(enc, file[pos..pos + used], "re-encoded record differs");
                for n in [0, 1, format::RECORD_PREFIX_LEN, used / 2, used - 1] {
                    assert_eq!(format::decode(&file[pos..pos + n.min(used - 1)]), Ok(None));
                }
                if chain.advance(&[rec.sealed]) != rec.digest || rec.time_us < last_time {
                    break Err((index, pos as u64));
                }
                last_time = rec.time_us;
                pos += used;
                index += 1;
            }
            Ok(None) if pos == file.len() => break Ok(index),
            Ok(None) | Err(_) => break Err((index, pos as u64)),
        }
    };
    match (verify_reader(file.as_slice(), None), expect) {
        (Ok(v), Ok(n)) => {
            assert_eq!(v.records, n);
            assert_eq!(v.final_digest, chain.digest());
            assert_eq!(v.len, file.len() as u64);
        }
        (Err(e), Err((i, off))) => {
            let (ei, eo) = match e {
                VerifyError::Record { index, offset, .. }
                | VerifyError::Digest { index, offset, .. }
                | VerifyError::TimeBackwards { index, offset, .. }
                | VerifyError::Truncated { index, offset, .. } => (index, offset),
                other => panic!("unexpected {other}"),
            };
            assert_eq!((ei, eo), (i, off));
        }
        (got, want) => panic!("reader says {got:?}, decoding by hand {want:?}"),
    }

    let mut cast = Vec::new();
    let _ = export(file.as_slice(), &mut cast, &ExportOptions::default());
    for line in cast.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        serde_json::from_slice::<serde_json::Value>(line).expect("a JSON line");
    }
});
