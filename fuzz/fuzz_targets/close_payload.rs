//! Close payload parser: any bytes are either a valid code with a UTF-8 reason or a typed
//! rejection; a valid one re-encodes to exactly the input when it fits a control frame.

#![no_main]

use hatch_proto::frame::{FrameError, MAX_CONTROL_PAYLOAD, close_payload, parse_close_payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_close_payload(data) {
        Ok(None) => assert!(data.is_empty()),
        Ok(Some((code, reason))) => {
            assert!(hatch_proto::close::is_valid_on_wire(code));
            assert_eq!(reason.len(), data.len() - 2);
            let mut again = Vec::new();
            close_payload(code, reason, &mut again);
            assert!(again.len() <= MAX_CONTROL_PAYLOAD as usize);
            if data.len() <= MAX_CONTROL_PAYLOAD as usize {
                assert_eq!(again, data);
            } else {
                assert_eq!(&again[..], &data[..again.len()]);
            }
        }
        Err(FrameError::CloseOneByte) => assert_eq!(data.len(), 1),
        Err(FrameError::CloseCode(code)) => {
            assert!(!hatch_proto::close::is_valid_on_wire(code));
        }
        Err(FrameError::CloseUtf8) => assert!(std::str::from_utf8(&data[2..]).is_err()),
        Err(other) => panic!("unexpected error for a close payload: {other:?}"),
    }
});
