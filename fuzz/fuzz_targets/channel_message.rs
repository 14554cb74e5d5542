//! hatch.v1 channel messages: any bytes decode or are rejected with a typed error; whatever
//! decodes (known or unknown type) re-encodes to exactly the input.

#![no_main]

use hatch_proto::channel::{ChannelError, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match Message::decode(data) {
        Ok(msg) => {
            assert_eq!(msg.encoded_len(), data.len());
            assert_eq!(msg.to_vec(), data, "re-encoding {msg:?}");
            if let Message::Unknown { kind, .. } = msg {
                assert!(!(0x01..=0x07).contains(&kind));
            }
        }
        Err(ChannelError::Empty) => assert!(data.is_empty()),
        Err(e) => {
            assert!(!data.is_empty());
            assert!(!e.to_string().is_empty());
        }
    }
});
