//! Frame header parser: any bytes, every side's rules. When a header parses, it must describe
//! bytes that are really there, respect the configured limits and RFC 6455's rules, and
//! re-encode to exactly the bytes it was parsed from; unmasking its payload twice restores it.

#![no_main]

use hatch_proto::frame::{
    FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, Masking, ParseConfig, encode_header,
    header_len, unmask, unmask_bytewise,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks a maximum payload, so that limits other than the default are hit.
    let (limit, buf) = match data.split_first() {
        Some((&l, rest)) => (l, rest),
        None => (0, data),
    };
    let max_payload = match limit % 4 {
        0 => hatch_proto::frame::DEFAULT_MAX_PAYLOAD,
        1 => u64::from(limit),
        2 => u64::MAX,
        _ => 0,
    };
    for masking in [Masking::Required, Masking::Forbidden, Masking::Any] {
        let cfg = ParseConfig { max_payload, masking };
        match FrameHeader::parse(buf, &cfg) {
            Ok(Some(h)) => check(buf, &cfg, &h),
            Ok(None) => assert!(buf.len() < MAX_HEADER_LEN, "incomplete with {} bytes", buf.len()),
            Err(e) => {
                // Every rejection maps to a close code a peer may receive.
                assert!(hatch_proto::close::is_valid_on_wire(e.close_code()));
                assert!(!e.to_string().is_empty());
            }
        }
    }
});

fn check(buf: &[u8], cfg: &ParseConfig, h: &FrameHeader) {
    assert!(h.header_len >= 2 && h.header_len <= MAX_HEADER_LEN);
    assert!(h.header_len <= buf.len());
    assert_eq!(h.header_len, header_len(h.payload_len, h.mask.is_some()));
    assert!(h.payload_len <= cfg.max_payload);
    assert!(h.payload_len >> 63 == 0);
    match cfg.masking {
        Masking::Required => assert!(h.mask.is_some()),
        Masking::Forbidden => assert!(h.mask.is_none()),
        Masking::Any => {}
    }
    if h.opcode.is_control() {
        assert!(h.fin);
        assert!(h.payload_len <= MAX_CONTROL_PAYLOAD);
    }
    let mut out = [0u8; MAX_HEADER_LEN];
    let n = encode_header(h.fin, h.opcode, h.payload_len, h.mask, &mut out);
    assert_eq!(&out[..n], &buf[..h.header_len], "re-encoded header differs");

    // Whatever payload bytes are present: unmask agrees with the byte loop and is its own
    // inverse, from any offset.
    if let Some(key) = h.mask {
        let avail = (buf.len() - h.header_len).min(h.payload_len as usize);
        let payload = &buf[h.header_len..h.header_len + avail];
        let offset = usize::from(buf[0]);
        let mut fast = payload.to_vec();
        let mut slow = payload.to_vec();
        unmask(&mut fast, key, offset);
        unmask_bytewise(&mut slow, key, offset);
        assert_eq!(fast, slow);
        unmask(&mut fast, key, offset);
        assert_eq!(fast, payload);
    }
}
