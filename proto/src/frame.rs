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
    /// A control frame with a payload over 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
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
    let key = rotate_key(key, offset);
    // Word-at-a-time: eight bytes per step against the key repeated twice. Safe Rust over
    // `chunks_exact_mut` compiles to vector code; the tail takes at most seven byte steps.
    let word = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes((&*chunk).try_into().expect("chunks of eight")) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// The byte-at-a-time reference unmask, kept for tests and as the benchmark's baseline.
pub fn unmask_bytewise(payload: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[(offset + i) & 3];
    }
}

fn rotate_key(key: [u8; 4], offset: usize) -> [u8; 4] {
    let r = offset & 3;
    [key[r], key[(r + 1) & 3], key[(r + 2) & 3], key[(r + 3) & 3]]
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
