//! WebSocket frame headers (RFC 6455 §5.2): parse without consuming, encode into a stack buffer
//! or into headroom in front of a payload, and unmask payloads in place.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! | |1|2|3|       |K|             |                               |
//! +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
//! |     Extended payload length continued, if payload len == 127  |
//! + - - - - - - - - - - - - - - - +-------------------------------+
//! |                               |Masking-key, if MASK set to 1  |
//! +-------------------------------+-------------------------------+
//! | Masking-key (continued)       |          Payload Data         |
//! +-------------------------------- - - - - - - - - - - - - - - - +
//! ```
//!
//! The parser only looks at the header: the caller forwards or unmasks the payload where it
//! lies, so a frame is never copied to be decoded.

use thiserror::Error;

/// Default largest payload accepted: 1 MiB. Terminal traffic is small; a larger frame is either
/// a bulk paste (which clients split) or an attempt to make the relay buffer.
pub const DEFAULT_MAX_PAYLOAD: u64 = 1 << 20;

/// Longest possible header: 2 fixed bytes, 8 bytes of 64-bit length, 4 bytes of mask key.
pub const MAX_HEADER_LEN: usize = 14;

/// Largest payload of a control frame (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Frame opcode (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// A continuation of a fragmented message.
    Continuation = 0x0,
    /// A text frame (UTF-8).
    Text = 0x1,
    /// A binary frame.
    Binary = 0x2,
    /// Connection close.
    Close = 0x8,
    /// Ping.
    Ping = 0x9,
    /// Pong.
    Pong = 0xA,
}

impl OpCode {
    /// Whether this is a control frame (close, ping, pong).
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }

    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }
}

/// Which masking the parsing side requires (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Masking {
    /// Server side: every frame from a client must be masked.
    Required,
    /// Client side: frames from a server must not be masked.
    Forbidden,
    /// Accept either (tools and tests only).
    Any,
}

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseConfig {
    /// Largest payload accepted, in bytes.
    pub max_payload: u64,
    /// Masking rule of this side.
    pub masking: Masking,
}

impl ParseConfig {
    /// The rules of a server reading client frames, with the default maximum payload.
    pub const SERVER: ParseConfig =
        ParseConfig { max_payload: DEFAULT_MAX_PAYLOAD, masking: Masking::Required };
    /// The rules of a client reading server frames, with the default maximum payload.
    pub const CLIENT: ParseConfig =
        ParseConfig { max_payload: DEFAULT_MAX_PAYLOAD, masking: Masking::Forbidden };
}

/// A protocol violation found in a frame. Each names the rule broken, so that the caller can
/// log it and close with the matching code ([`FrameError::close_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum FrameError {
    /// RSV1–3 set with no extension negotiated.
    #[error("reserved bits set without a negotiated extension (bits {0:#05b})")]
    ReservedBits(u8),
    /// An opcode RFC 6455 reserves.
    #[error("reserved opcode {0:#x}")]
    UnknownOpcode(u8),
    /// A control frame without FIN.
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame with a payload over 125 bytes. Carries the 7-bit length field: 126 and
    /// 127 (an extended length follows) are rejected before the extended length arrives.
    #[error("control frame payload length field {0} exceeds 125")]
    ControlTooLong(u64),
    /// A 64-bit length whose most significant bit is set.
    #[error("64-bit payload length has its most significant bit set")]
    LengthTopBit,
    /// A length that was not encoded in the minimal number of bytes.
    #[error("payload length {0} not minimally encoded")]
    NonMinimalLength(u64),
    /// A payload over the configured maximum.
    #[error("payload of {len} bytes exceeds the maximum of {max}")]
    TooLong {
        /// Declared payload length.
        len: u64,
        /// Configured maximum.
        max: u64,
    },
    /// An unmasked frame where masking is required (client → server).
    #[error("unmasked frame from a client")]
    Unmasked,
    /// A masked frame where masking is forbidden (server → client).
    #[error("masked frame from a server")]
    Masked,
    /// A close payload of exactly one byte.
    #[error("close payload of 1 byte")]
    CloseOneByte,
    /// A close code that may not be sent on the wire.
    #[error("invalid close code {0}")]
    CloseCode(u16),
    /// A close reason or text payload that is not UTF-8.
    #[error("invalid utf-8 in close reason")]
    CloseUtf8,
}

impl FrameError {
    /// The close code to answer this violation with.
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::TooLong { .. } => crate::close::MESSAGE_TOO_BIG,
            FrameError::CloseUtf8 => crate::close::INVALID_PAYLOAD,
            _ => crate::close::PROTOCOL_ERROR,
        }
    }
}

/// A parsed frame header. The payload is `buf[header_len..header_len + payload_len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// Opcode.
    pub opcode: OpCode,
    /// Masking key, when the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// Header length in bytes (2 to 14).
    pub header_len: usize,
}

impl FrameHeader {
    /// Parses a header from the start of `buf` without consuming it.
    ///
    /// `Ok(None)` means more bytes are needed; the caller reads more and calls again.
    pub fn parse(buf: &[u8], cfg: &ParseConfig) -> Result<Option<FrameHeader>, FrameError> {
        let Some(&[b0, b1]) = buf.get(..2).map(|s| <&[u8; 2]>::try_from(s).expect("two bytes"))
        else {
            return Ok(None);
        };
        let rsv = (b0 >> 4) & 0x7;
        if rsv != 0 {
            return Err(FrameError::ReservedBits(rsv));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = OpCode::from_bits(b0 & 0x0F).ok_or(FrameError::UnknownOpcode(b0 & 0x0F))?;
        let masked = b1 & 0x80 != 0;
        match (cfg.masking, masked) {
            (Masking::Required, false) => return Err(FrameError::Unmasked),
            (Masking::Forbidden, true) => return Err(FrameError::Masked),
            _ => {}
        }
        let len7 = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(FrameError::FragmentedControl);
            }
            if u64::from(len7) > MAX_CONTROL_PAYLOAD {
                // 126 and 127 announce an extended length, which a control frame cannot have.
                return Err(FrameError::ControlTooLong(u64::from(len7)));
            }
        }
        let (payload_len, mut pos) = match len7 {
            126 => {
                let Some(b) = buf.get(2..4) else { return Ok(None) };
                let len = u64::from(u16::from_be_bytes([b[0], b[1]]));
                if len < 126 {
                    return Err(FrameError::NonMinimalLength(len));
                }
                (len, 4)
            }
            127 => {
                let Some(b) = buf.get(2..10) else { return Ok(None) };
                let len = u64::from_be_bytes(b.try_into().expect("eight bytes"));
                if len >> 63 != 0 {
                    return Err(FrameError::LengthTopBit);
                }
                if len <= u64::from(u16::MAX) {
                    return Err(FrameError::NonMinimalLength(len));
                }
                (len, 10)
            }
            n => (u64::from(n), 2),
        };
        if payload_len > cfg.max_payload {
            return Err(FrameError::TooLong { len: payload_len, max: cfg.max_payload });
        }
        let mask = if masked {
            let Some(b) = buf.get(pos..pos + 4) else { return Ok(None) };
            pos += 4;
            Some(b.try_into().expect("four bytes"))
        } else {
            None
        };
        Ok(Some(FrameHeader { fin, opcode, mask, payload_len, header_len: pos }))
    }

    /// Header plus payload, in bytes.
    pub fn frame_len(&self) -> u64 {
        self.header_len as u64 + self.payload_len
    }
}

/// Length of the header that [`encode_header`] writes for this payload length.
pub fn header_len(payload_len: u64, masked: bool) -> usize {
    let base = match payload_len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    };
    if masked { base + 4 } else { base }
}

/// Encodes a header into `out` and returns its length. Server frames pass `mask: None`; client
/// frames pass a fresh random key (the caller masks the payload with [`unmask`], which is its
/// own inverse).
///
/// `payload_len` must be below 2^63 (RFC 6455 §5.2); larger values are a caller bug.
pub fn encode_header(
    fin: bool,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
    out: &mut [u8; MAX_HEADER_LEN],
) -> usize {
    debug_assert!(payload_len >> 63 == 0, "payload length over 2^63");
    out[0] = (u8::from(fin) << 7) | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = match payload_len {
        0..=125 => {
            out[1] = mask_bit | payload_len as u8;
            2
        }
        126..=0xFFFF => {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&payload_len.to_be_bytes());
            10
        }
    };
    if let Some(key) = mask {
        out[pos..pos + 4].copy_from_slice(&key);
        pos += 4;
    }
    pos
}

/// Writes a header into the headroom that ends at `payload_start` in `buf`, so that header and
/// payload form one contiguous slice. Returns where the header begins, or `None` when the
/// headroom is too small.
pub fn encode_header_before(
    buf: &mut [u8],
    payload_start: usize,
    fin: bool,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
) -> Option<usize> {
    let len = header_len(payload_len, mask.is_some());
    let start = payload_start.checked_sub(len)?;
    let mut tmp = [0u8; MAX_HEADER_LEN];
    let n = encode_header(fin, opcode, payload_len, mask, &mut tmp);
    buf.get_mut(start..payload_start)?.copy_from_slice(&tmp[..n]);
    Some(start)
}

/// XORs `payload` with the masking key in place (RFC 6455 §5.3). Masking and unmasking are the
/// same operation.
///
/// `offset` is the position of `payload[0]` within the frame's payload, so a large frame can be
/// unmasked chunk by chunk as it streams through.
pub fn unmask(payload: &mut [u8], key: [u8; 4], offset: usize) {
    // The key as a little-endian word, rotated so that its low byte applies to `payload[0]`:
    // byte i of a little-endian word is byte i of the slice on every target.
    let k32 = u32::from_le_bytes(key).rotate_right(8 * (offset & 3) as u32);
    let k64 = u64::from(k32) | (u64::from(k32) << 32);
    // Eight bytes per step in safe Rust. LLVM turns this loop into 16-byte SSE2 `pxor`s, two per
    // iteration (checked in the x86-64 assembly); wider u128 steps or 32/64-byte array chunks
    // measured slower (docs/BENCHMARKING.md). The tail takes at most one 4-byte and three 1-byte
    // steps, which keeps keystroke-sized payloads (1–16 bytes) cheap too.
    let (words, rest) = payload.as_chunks_mut::<8>();
    for w in words {
        *w = (u64::from_le_bytes(*w) ^ k64).to_le_bytes();
    }
    let (half, rest) = rest.as_chunks_mut::<4>();
    for w in half {
        *w = (u32::from_le_bytes(*w) ^ k32).to_le_bytes();
    }
    for (i, b) in rest.iter_mut().enumerate() {
        // Truncation keeps the key byte for position i (i < 4).
        *b ^= (k32 >> (8 * i)) as u8;
    }
}

/// The byte-at-a-time reference unmask, kept for tests and as the benchmark's baseline.
pub fn unmask_bytewise(payload: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[offset.wrapping_add(i) & 3];
    }
}

/// Validates the (unmasked) payload of a close frame (RFC 6455 §5.5.1, §7.4).
///
/// Returns `None` for an empty payload (no status), or the code and reason.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<(u16, &str)>, FrameError> {
    match payload {
        [] => Ok(None),
        [_] => Err(FrameError::CloseOneByte),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !crate::close::is_valid_on_wire(code) {
                return Err(FrameError::CloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| FrameError::CloseUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Builds a close payload: the code, then as much of `reason` as fits in a control frame
/// (cut on a character boundary).
pub fn close_payload(code: u16, reason: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD as usize - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Accepts masked and unmasked frames of any legal length: for checking the codec itself.
    const ANY: ParseConfig = ParseConfig { max_payload: u64::MAX >> 1, masking: Masking::Any };

    /// The masking key of every masked example in RFC 6455 §5.7.
    const RFC_KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn parse_ok(buf: &[u8], cfg: &ParseConfig) -> FrameHeader {
        FrameHeader::parse(buf, cfg).expect("valid header").expect("complete header")
    }

    fn encode(fin: bool, opcode: OpCode, len: u64, mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = [0u8; MAX_HEADER_LEN];
        let n = encode_header(fin, opcode, len, mask, &mut out);
        assert_eq!(n, header_len(len, mask.is_some()));
        out[..n].to_vec()
    }

    /// Encodes a whole frame as a sender would: header, then the payload masked with `mask`.
    fn frame(fin: bool, opcode: OpCode, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = encode(fin, opcode, payload.len() as u64, mask);
        let start = out.len();
        out.extend_from_slice(payload);
        if let Some(key) = mask {
            unmask(&mut out[start..], key, 0);
        }
        out
    }

    /// Parses one complete frame and returns its header and unmasked payload.
    fn decode(buf: &[u8], cfg: &ParseConfig) -> (FrameHeader, Vec<u8>) {
        let h = parse_ok(buf, cfg);
        assert_eq!(h.frame_len(), buf.len() as u64, "one whole frame");
        let mut payload = buf[h.header_len..].to_vec();
        if let Some(key) = h.mask {
            unmask(&mut payload, key, 0);
        }
        (h, payload)
    }

    // RFC 6455 §5.7, byte for byte.

    #[test]
    fn rfc_single_frame_unmasked_text() {
        let wire = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let (h, payload) = decode(&wire, &ParseConfig::CLIENT);
        assert_eq!(
            h,
            FrameHeader {
                fin: true,
                opcode: OpCode::Text,
                mask: None,
                payload_len: 5,
                header_len: 2
            }
        );
        assert_eq!(payload, b"Hello");
        assert_eq!(frame(true, OpCode::Text, b"Hello", None), wire);
    }

    #[test]
    fn rfc_single_frame_masked_text() {
        let wire = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (h, payload) = decode(&wire, &ParseConfig::SERVER);
        assert_eq!(
            h,
            FrameHeader {
                fin: true,
                opcode: OpCode::Text,
                mask: Some(RFC_KEY),
                payload_len: 5,
                header_len: 6
            }
        );
        assert_eq!(payload, b"Hello");
        assert_eq!(frame(true, OpCode::Text, b"Hello", Some(RFC_KEY)), wire);
    }

    #[test]
    fn rfc_fragmented_unmasked_text() {
        let first = [0x01, 0x03, 0x48, 0x65, 0x6c];
        let last = [0x80, 0x02, 0x6c, 0x6f];
        let (h1, p1) = decode(&first, &ParseConfig::CLIENT);
        assert!(!h1.fin);
        assert_eq!(h1.opcode, OpCode::Text);
        assert_eq!(p1, b"Hel");
        let (h2, p2) = decode(&last, &ParseConfig::CLIENT);
        assert!(h2.fin);
        assert_eq!(h2.opcode, OpCode::Continuation);
        assert_eq!(p2, b"lo");
        assert_eq!(frame(false, OpCode::Text, b"Hel", None), first);
        assert_eq!(frame(true, OpCode::Continuation, b"lo", None), last);
    }

    #[test]
    fn rfc_unmasked_ping_and_masked_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let (h, payload) = decode(&ping, &ParseConfig::CLIENT);
        assert_eq!((h.fin, h.opcode, h.mask), (true, OpCode::Ping, None));
        assert_eq!(payload, b"Hello");
        assert_eq!(frame(true, OpCode::Ping, b"Hello", None), ping);

        let pong = [0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (h, payload) = decode(&pong, &ParseConfig::SERVER);
        assert_eq!((h.fin, h.opcode, h.mask), (true, OpCode::Pong, Some(RFC_KEY)));
        assert_eq!(payload, b"Hello");
        assert_eq!(frame(true, OpCode::Pong, b"Hello", Some(RFC_KEY)), pong);
    }

    #[test]
    fn rfc_256_bytes_binary_uses_16_bit_length() {
        let header = [0x82, 0x7E, 0x01, 0x00];
        let h = parse_ok(&header, &ParseConfig::CLIENT);
        assert_eq!((h.fin, h.opcode, h.mask), (true, OpCode::Binary, None));
        assert_eq!((h.payload_len, h.header_len), (256, 4));
        assert_eq!(encode(true, OpCode::Binary, 256, None), header);
        let whole = frame(true, OpCode::Binary, &[0xAB; 256], None);
        assert_eq!(&whole[..4], header);
        assert_eq!(decode(&whole, &ParseConfig::CLIENT).1, [0xAB; 256]);
    }

    #[test]
    fn rfc_64_kib_binary_uses_64_bit_length() {
        let header = [0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00];
        let h = parse_ok(&header, &ParseConfig::CLIENT);
        assert_eq!((h.fin, h.opcode, h.mask), (true, OpCode::Binary, None));
        assert_eq!((h.payload_len, h.header_len), (65536, 10));
        assert_eq!(h.frame_len(), 65546);
        assert_eq!(encode(true, OpCode::Binary, 65536, None), header);
    }

    #[test]
    fn length_encoding_boundaries() {
        for (len, hlen) in [(0, 2), (125, 2), (126, 4), (0xFFFF, 4), (0x1_0000, 10), (1 << 40, 10)]
        {
            assert_eq!(header_len(len, false), hlen, "{len}");
            assert_eq!(header_len(len, true), hlen + 4, "{len}");
            let wire = encode(true, OpCode::Binary, len, Some([1, 2, 3, 4]));
            let h = parse_ok(&wire, &ANY);
            assert_eq!((h.payload_len, h.header_len), (len, hlen + 4));
        }
    }

    #[test]
    fn encode_header_before_fills_headroom() {
        let mut buf = [0u8; 20];
        buf[10..15].copy_from_slice(b"Hello");
        let start = encode_header_before(&mut buf, 10, true, OpCode::Binary, 5, None);
        assert_eq!(start, Some(8));
        assert_eq!(&buf[8..15], [0x82, 0x05, b'H', b'e', b'l', b'l', b'o']);

        let start = encode_header_before(&mut buf, 10, true, OpCode::Text, 5, Some(RFC_KEY));
        assert_eq!(start, Some(4));
        assert_eq!(&buf[4..10], [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d]);

        // Too little headroom, or a payload start past the buffer: no write, no panic.
        assert_eq!(encode_header_before(&mut buf, 1, true, OpCode::Binary, 5, None), None);
        assert_eq!(
            encode_header_before(&mut buf, 7, true, OpCode::Binary, 300, Some(RFC_KEY)),
            None
        );
        assert_eq!(encode_header_before(&mut buf, 30, true, OpCode::Binary, 5, None), None);
    }

    // Rejections, each with its typed error and close code.

    fn reject(buf: &[u8], cfg: &ParseConfig) -> FrameError {
        FrameHeader::parse(buf, cfg).expect_err("must be rejected")
    }

    #[test]
    fn rejects_reserved_bits() {
        for (b0, bits) in [(0xC1, 0b100), (0xA1, 0b010), (0x91, 0b001), (0xF2, 0b111)] {
            let err = reject(&[b0, 0x00], &ParseConfig::CLIENT);
            assert_eq!(err, FrameError::ReservedBits(bits));
            assert_eq!(err.close_code(), crate::close::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn rejects_unknown_opcodes() {
        for op in [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            let err = reject(&[0x80 | op, 0x80, 1, 2, 3, 4], &ParseConfig::SERVER);
            assert_eq!(err, FrameError::UnknownOpcode(op));
            assert_eq!(err.close_code(), crate::close::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn rejects_fragmented_control_frames() {
        for op in [0x8, 0x9, 0xA] {
            let err = reject(&[op, 0x00], &ParseConfig::CLIENT);
            assert_eq!(err, FrameError::FragmentedControl);
            assert_eq!(err.close_code(), crate::close::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn rejects_control_frames_over_125_bytes() {
        // 126 and 127 announce an extended length: rejected before it arrives.
        for op in [0x88, 0x89, 0x8A] {
            assert_eq!(reject(&[op, 0x7E], &ParseConfig::CLIENT), FrameError::ControlTooLong(126));
            assert_eq!(reject(&[op, 0x7F], &ParseConfig::CLIENT), FrameError::ControlTooLong(127));
            assert_eq!(
                reject(&[op, 0xFE, 0x00, 0x7E], &ParseConfig::SERVER),
                FrameError::ControlTooLong(126)
            );
            // 125 is the largest allowed.
            assert_eq!(parse_ok(&[op, 0x7D], &ParseConfig::CLIENT).payload_len, 125);
        }
        assert_eq!(FrameError::ControlTooLong(126).close_code(), crate::close::PROTOCOL_ERROR);
    }

    #[test]
    fn rejects_64_bit_length_with_top_bit() {
        let wire = [0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0];
        let err = reject(&wire, &ANY);
        assert_eq!(err, FrameError::LengthTopBit);
        assert_eq!(err.close_code(), crate::close::PROTOCOL_ERROR);
        let wire = [0x82, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert_eq!(reject(&wire, &ANY), FrameError::LengthTopBit);
    }

    #[test]
    fn rejects_non_minimal_lengths() {
        assert_eq!(reject(&[0x82, 0x7E, 0x00, 0x7D], &ANY), FrameError::NonMinimalLength(125));
        assert_eq!(
            reject(&[0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF], &ANY),
            FrameError::NonMinimalLength(0xFFFF)
        );
    }

    #[test]
    fn rejects_payload_over_the_maximum() {
        // Default 1 MiB: exactly 1 MiB passes, one byte more does not.
        let ok = encode(true, OpCode::Binary, DEFAULT_MAX_PAYLOAD, None);
        assert_eq!(parse_ok(&ok, &ParseConfig::CLIENT).payload_len, DEFAULT_MAX_PAYLOAD);
        let over = encode(true, OpCode::Binary, DEFAULT_MAX_PAYLOAD + 1, None);
        let err = reject(&over, &ParseConfig::CLIENT);
        assert_eq!(
            err,
            FrameError::TooLong { len: DEFAULT_MAX_PAYLOAD + 1, max: DEFAULT_MAX_PAYLOAD }
        );
        assert_eq!(err.close_code(), crate::close::MESSAGE_TOO_BIG);

        // A configured maximum applies to the 7-bit and 16-bit forms too, and to control frames.
        let small = ParseConfig { max_payload: 10, masking: Masking::Any };
        assert_eq!(reject(&[0x82, 0x0B], &small), FrameError::TooLong { len: 11, max: 10 });
        assert_eq!(reject(&[0x89, 0x0B], &small), FrameError::TooLong { len: 11, max: 10 });
        assert_eq!(
            reject(&[0x82, 0x7E, 0x01, 0x00], &small),
            FrameError::TooLong { len: 256, max: 10 }
        );
        // Rejected as soon as the length is known, before the mask key arrives.
        assert_eq!(reject(&[0x82, 0x8B], &small), FrameError::TooLong { len: 11, max: 10 });
    }

    #[test]
    fn rejects_unmasked_frame_on_the_server_side() {
        let err = reject(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f], &ParseConfig::SERVER);
        assert_eq!(err, FrameError::Unmasked);
        assert_eq!(err.close_code(), crate::close::PROTOCOL_ERROR);
        // Control frames too.
        assert_eq!(reject(&[0x88, 0x00], &ParseConfig::SERVER), FrameError::Unmasked);
    }

    #[test]
    fn rejects_masked_frame_on_the_client_side() {
        let wire = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let err = reject(&wire, &ParseConfig::CLIENT);
        assert_eq!(err, FrameError::Masked);
        assert_eq!(err.close_code(), crate::close::PROTOCOL_ERROR);
        assert_eq!(reject(&[0x8A, 0x80], &ParseConfig::CLIENT), FrameError::Masked);
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close_payload(&[]), Ok(None));
        assert_eq!(parse_close_payload(&[0x03, 0xE8]), Ok(Some((1000, ""))));
        assert_eq!(parse_close_payload(b"\x0f\xa1bad token"), Ok(Some((4001, "bad token"))));
        let mut wire = vec![0x0f, 0xa9];
        wire.extend_from_slice("adiós".as_bytes());
        assert_eq!(parse_close_payload(&wire), Ok(Some((4009, "adiós"))));

        let err = parse_close_payload(&[0x03]).unwrap_err();
        assert_eq!(err, FrameError::CloseOneByte);
        assert_eq!(err.close_code(), crate::close::PROTOCOL_ERROR);

        let err = parse_close_payload(&[0x03, 0xE8, 0xC3, 0x28]).unwrap_err();
        assert_eq!(err, FrameError::CloseUtf8);
        assert_eq!(err.close_code(), crate::close::INVALID_PAYLOAD);
        // A character cut in half is invalid too.
        assert_eq!(parse_close_payload(&[0x03, 0xE8, 0xC3]), Err(FrameError::CloseUtf8));

        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 0xFFFF] {
            let err = parse_close_payload(&code.to_be_bytes()).unwrap_err();
            assert_eq!(err, FrameError::CloseCode(code));
            assert_eq!(err.close_code(), crate::close::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn close_payload_encodes_code_and_cuts_reason_on_a_char_boundary() {
        let mut out = Vec::new();
        close_payload(crate::close::RELAY_SHUTDOWN, "bye", &mut out);
        assert_eq!(out, b"\x0f\xa9bye");

        // 123 bytes of reason fit; "é" is two bytes, so 62 of them (124 bytes) are cut to 61.
        let long = "é".repeat(62);
        let mut out = Vec::new();
        close_payload(1000, &long, &mut out);
        assert_eq!(out.len(), 2 + 122);
        assert_eq!(parse_close_payload(&out), Ok(Some((1000, &long[..122]))));

        let mut out = Vec::new();
        close_payload(1000, &"a".repeat(200), &mut out);
        assert_eq!(out.len(), MAX_CONTROL_PAYLOAD as usize);
    }

    /// Valid headers of every shape, for the truncation test.
    fn valid_headers() -> Vec<(Vec<u8>, ParseConfig)> {
        let mut out = Vec::new();
        for mask in [None, Some(RFC_KEY)] {
            let cfg = if mask.is_some() { ParseConfig::SERVER } else { ParseConfig::CLIENT };
            for len in [0, 5, 125, 126, 256, 0xFFFF, 0x1_0000, DEFAULT_MAX_PAYLOAD] {
                out.push((encode(true, OpCode::Binary, len, mask), cfg));
                out.push((encode(false, OpCode::Text, len, mask), cfg));
            }
            for op in [OpCode::Close, OpCode::Ping, OpCode::Pong] {
                out.push((encode(true, op, 125, mask), cfg));
            }
        }
        out
    }

    #[test]
    fn every_truncated_prefix_of_a_valid_header_needs_more_bytes() {
        for (wire, cfg) in valid_headers() {
            for n in 0..wire.len() {
                assert_eq!(FrameHeader::parse(&wire[..n], &cfg), Ok(None), "{wire:02x?}[..{n}]");
            }
            let h = parse_ok(&wire, &cfg);
            assert_eq!(h.header_len, wire.len());
            // Bytes after the header (the payload) do not change the result.
            let mut longer = wire.clone();
            longer.extend_from_slice(&[0xFF; 20]);
            assert_eq!(parse_ok(&longer, &cfg), h);
        }
    }

    #[test]
    fn unmask_rfc_example() {
        let mut p = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        unmask(&mut p, RFC_KEY, 0);
        assert_eq!(&p, b"Hello");
        // From the middle of the payload: offset 2 continues with key byte 2.
        let mut tail = [0x4d, 0x51, 0x58];
        unmask(&mut tail, RFC_KEY, 2);
        assert_eq!(&tail, b"llo");
    }

    #[test]
    fn unmask_at_the_largest_offsets_does_not_overflow() {
        for offset in [usize::MAX - 2, usize::MAX] {
            let mut fast = *b"0123456789abcdef";
            let mut slow = fast;
            unmask(&mut fast, RFC_KEY, offset);
            unmask_bytewise(&mut slow, RFC_KEY, offset);
            assert_eq!(fast, slow);
        }
    }

    fn any_config() -> impl Strategy<Value = ParseConfig> {
        (
            any::<u64>(),
            prop_oneof![Just(Masking::Required), Just(Masking::Forbidden), Just(Masking::Any)],
        )
            .prop_map(|(max_payload, masking)| ParseConfig { max_payload, masking })
    }

    fn any_opcode() -> impl Strategy<Value = OpCode> {
        prop_oneof![
            Just(OpCode::Continuation),
            Just(OpCode::Text),
            Just(OpCode::Binary),
            Just(OpCode::Close),
            Just(OpCode::Ping),
            Just(OpCode::Pong),
        ]
    }

    fn any_len() -> impl Strategy<Value = u64> {
        prop_oneof![0..=125u64, 126..=0xFFFFu64, 0x1_0000..=(u64::MAX >> 1), Just(u64::MAX >> 1)]
    }

    proptest! {
        #[test]
        fn header_encode_then_parse_round_trips(
            fin in any::<bool>(),
            opcode in any_opcode(),
            len in any_len(),
            mask in proptest::option::of(any::<[u8; 4]>()),
            trailing in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            // Control frames are always final and short.
            let (fin, len) = if opcode.is_control() { (true, len % 126) } else { (fin, len) };
            let mut wire = encode(fin, opcode, len, mask);
            let n = wire.len();
            wire.extend_from_slice(&trailing);
            let h = parse_ok(&wire, &ANY);
            prop_assert_eq!(h, FrameHeader { fin, opcode, mask, payload_len: len, header_len: n });
            // The side rules accept what the matching sender produces.
            let side = if mask.is_some() { ParseConfig::SERVER } else { ParseConfig::CLIENT };
            let side = ParseConfig { max_payload: u64::MAX, ..side };
            prop_assert_eq!(parse_ok(&wire, &side), h);
        }

        #[test]
        fn any_bytes_parse_or_reject_without_panic(
            buf in proptest::collection::vec(any::<u8>(), 0..32),
            cfg in any_config(),
        ) {
            match FrameHeader::parse(&buf, &cfg) {
                Ok(Some(h)) => {
                    prop_assert!(h.header_len <= buf.len());
                    prop_assert!(h.payload_len <= cfg.max_payload);
                    let again = encode(h.fin, h.opcode, h.payload_len, h.mask);
                    prop_assert_eq!(again, &buf[..h.header_len]);
                }
                // Only a buffer shorter than the longest header can be incomplete.
                Ok(None) => prop_assert!(buf.len() < MAX_HEADER_LEN),
                // A rejection is a fine outcome; only a panic fails the test.
                Err(_) => {}
            }
        }

        #[test]
        fn any_close_payload_parses_or_rejects_without_panic(
            buf in proptest::collection::vec(any::<u8>(), 0..130),
        ) {
            if let Ok(Some((code, reason))) = parse_close_payload(&buf) {
                prop_assert!(crate::close::is_valid_on_wire(code));
                let mut again = Vec::new();
                close_payload(code, reason, &mut again);
                if buf.len() <= MAX_CONTROL_PAYLOAD as usize {
                    prop_assert_eq!(again, buf);
                }
            }
        }

        #[test]
        fn unmask_twice_is_identity(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            key in any::<[u8; 4]>(),
            offset in any::<usize>(),
        ) {
            let mut buf = data.clone();
            unmask(&mut buf, key, offset);
            unmask(&mut buf, key, offset);
            prop_assert_eq!(buf, data);
        }

        #[test]
        fn unmask_matches_bytewise(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            key in any::<[u8; 4]>(),
            offset in any::<usize>(),
        ) {
            let mut fast = data.clone();
            let mut slow = data;
            unmask(&mut fast, key, offset);
            unmask_bytewise(&mut slow, key, offset);
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn chunked_unmask_equals_whole(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            key in any::<[u8; 4]>(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut whole = data.clone();
            unmask(&mut whole, key, 0);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
            cuts.push(0);
            cuts.push(data.len());
            cuts.sort_unstable();
            let mut chunked = data;
            for w in cuts.windows(2) {
                unmask(&mut chunked[w[0]..w[1]], key, w[0]);
            }
            prop_assert_eq!(chunked, whole);
        }
    }
}
