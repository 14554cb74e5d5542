//! Criterion benchmarks of Hatch live in `benches/`; this library holds what they share:
//! wire fixtures built with the real encoder, so that a bench measures the same bytes a peer
//! would send.

use hatch_proto::frame::{MAX_HEADER_LEN, OpCode, encode_header, unmask};

/// The masking key of RFC 6455 §5.7, used by every masked fixture.
pub const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A whole client frame (masked, as a server reads it): header, then `len` payload bytes.
pub fn masked_frame(opcode: OpCode, len: usize) -> Vec<u8> {
    let mut out = frame_header(opcode, len, Some(KEY));
    let start = out.len();
    out.extend((0..len).map(|i| i as u8));
    unmask(&mut out[start..], KEY, 0);
    out
}

/// Just the header of a final frame of `len` payload bytes.
pub fn frame_header(opcode: OpCode, len: usize, mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = [0u8; MAX_HEADER_LEN];
    let n = encode_header(true, opcode, len as u64, mask, &mut out);
    out[..n].to_vec()
}

#[cfg(test)]
mod tests {
    use hatch_proto::frame::{FrameHeader, ParseConfig};

    use super::*;

    #[test]
    fn fixtures_are_frames_a_server_accepts() {
        for len in [5, 256, 65536] {
            let wire = masked_frame(OpCode::Binary, len);
            let h = FrameHeader::parse(&wire, &ParseConfig::SERVER).unwrap().unwrap();
            assert_eq!(h.frame_len(), wire.len() as u64);
            let mut payload = wire[h.header_len..].to_vec();
            unmask(&mut payload, h.mask.unwrap(), 0);
            assert!(payload.iter().enumerate().all(|(i, &b)| b == i as u8));
        }
    }
}
