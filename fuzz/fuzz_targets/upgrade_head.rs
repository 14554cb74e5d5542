//! The relay's WebSocket upgrade request head (`hatch_relay::data::upgrade`): any bytes are
//! parsed or refused with a typed refusal whose HTTP answer is well formed; never a panic. A
//! parsed request carries a session id the path rules allow, a role, a non-empty token and a
//! 28-character accept key, and its `Origin` and `Host` are checked against the console's
//! origins without a panic (a request without `Origin` always passes).

#![no_main]

use hatch_relay::data::upgrade::{Origins, head_end, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(end) = head_end(data) {
        assert!(end >= 4 && end <= data.len());
        assert_eq!(&data[end - 4..end], b"\r\n\r\n");
    }
    match parse(data) {
        Ok(req) => {
            let sid = req.session_id.as_bytes();
            assert!(!sid.is_empty() && sid.len() <= 128);
            assert!(sid.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_'));
            assert!(!req.token.is_empty());
            assert_eq!(req.accept.len(), 28);
            let allowed = vec!["https://a".to_owned()];
            let origins = Origins { api: Some(("https", 7444)), allowed };
            let checked = origins.check(req.origin.as_deref(), req.host.as_deref());
            assert!(req.origin.is_some() || checked.is_ok());
        }
        Err(refusal) => {
            let response = refusal.response();
            assert!(response.starts_with(b"HTTP/1.1 "));
            let end = head_end(&response).expect("a complete head");
            let body: serde_json::Value = serde_json::from_slice(&response[end..]).unwrap();
            assert!(body["code"].is_string());
        }
    }
});
