//! The WebSocket upgrade request of a leg: parsed from our own buffer (httparse), checked, and
//! answered with `101` or a refusal (`{code, message}` JSON and a closed connection).
//!
//! Never logged: the raw request line (it may carry the token in a query), the token itself.

use hatch_proto::token::Role;

/// Longest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;

/// The subprotocol Hatch speaks.
pub use hatch_proto::channel::SUBPROTOCOL as PROTOCOL;

/// A well-formed upgrade request, not yet authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Session id from the path.
    pub session_id: String,
    /// Role from the query.
    pub role: Role,
    /// The bearer token (header or subprotocol).
    pub token: String,
    /// `Sec-WebSocket-Accept` value to answer with.
    pub accept: String,
    /// The client offered `hatch.v1`.
    pub hatch_v1: bool,
    /// The `Origin` header: present only when a browser page opened the leg. `Some("")` when
    /// it was sent more than once (no single origin: refused by [`Origins::check`]).
    pub origin: Option<String>,
    /// The `Host` header, as sent.
    pub host: Option<String>,
}

/// Which browser pages may open a leg: those of the console (the relay's API origin), checked
/// on the `Origin` header a browser sends with every WebSocket upgrade. Clients and agents that
/// are not browsers send none and are not affected. A page of another site could otherwise
/// open a leg with a token it got hold of, and the browser would let it read the terminal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins {
    /// The API's port and scheme (`https`, or `http` with `--danger-plaintext`): a page at
    /// `scheme://H:port`, where `H` is the host this upgrade's `Host` header names, is the
    /// console as the browser reached it (the data plane's URLs use the host the caller used
    /// for the API). `None`: no such rule.
    pub api: Option<(&'static str, u16)>,
    /// Origins allowed as well, exactly (`--public-api-url`, `--console-origin`), as
    /// `scheme://host[:port]`.
    pub allowed: Vec<String>,
}

impl Origins {
    /// Whether a leg with this `Origin` (and `Host`) may be opened: no `Origin` (not a
    /// browser), one of [`Origins::allowed`], or the console's own origin on the API port.
    pub fn check(&self, origin: Option<&str>, host: Option<&str>) -> Result<(), Refusal> {
        let Some(origin) = origin else { return Ok(()) };
        if origin.is_empty() {
            return Err(Refusal::ForeignOrigin);
        }
        if self.allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
            return Ok(());
        }
        let (Some((scheme, port)), Some(host)) = (self.api, host) else {
            return Err(Refusal::ForeignOrigin);
        };
        let host = host_name(host);
        let own = format!("{scheme}://{host}:{port}");
        let default_port = (scheme == "https" && port == 443) || (scheme == "http" && port == 80);
        if origin.eq_ignore_ascii_case(&own)
            || (default_port && origin.eq_ignore_ascii_case(&format!("{scheme}://{host}")))
        {
            Ok(())
        } else {
            Err(Refusal::ForeignOrigin)
        }
    }
}

/// The host of a `Host` header value without its port (`[v6]:port` keeps its brackets).
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// Why a leg is refused before it becomes a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Missing, malformed, badly signed or mismatched token (401).
    InvalidToken,
    /// Expired token (401).
    TokenExpired,
    /// Token already used, or the role's leg already present (409).
    TokenAlreadyUsed,
    /// Not a valid WebSocket upgrade (400).
    BadRequest,
    /// The upgrade request declares a body (`Content-Length` other than 0, or any
    /// `Transfer-Encoding`): after a `101` those bytes would be read as WebSocket frames (400).
    RequestBody,
    /// Request head over 8 KiB (431).
    HeadTooLarge,
    /// Not `/v1/stream/{sid}?role=client|agent` (404).
    NotFound,
    /// The relay is shutting down or its shard is overloaded (503).
    Unavailable,
    /// A browser page of another origin than the console ([`Origins`]) (403).
    ForeignOrigin,
}

impl Refusal {
    /// HTTP status, API error code, message.
    pub fn parts(self) -> (u16, &'static str, &'static str, &'static str) {
        match self {
            Refusal::InvalidToken => {
                (401, "Unauthorized", "InvalidToken", "missing or invalid stream token")
            }
            Refusal::TokenExpired => (401, "Unauthorized", "TokenExpired", "stream token expired"),
            Refusal::TokenAlreadyUsed => {
                (409, "Conflict", "TokenAlreadyUsed", "stream token already used")
            }
            Refusal::BadRequest => {
                (400, "Bad Request", "InvalidRequest", "not a valid WebSocket upgrade request")
            }
            Refusal::RequestBody => {
                (400, "Bad Request", "InvalidRequest", "an upgrade request carries no body")
            }
            Refusal::HeadTooLarge => (
                431,
                "Request Header Fields Too Large",
                "InvalidRequest",
                "request head exceeds 8 KiB",
            ),
            Refusal::NotFound => (
                404,
                "Not Found",
                "NotFound",
                "unknown path; expected /v1/stream/{session_id}?role=client|agent",
            ),
            Refusal::Unavailable => {
                (503, "Service Unavailable", "Unavailable", "relay unavailable; retry")
            }
            Refusal::ForeignOrigin => (
                403,
                "Forbidden",
                "OriginNotAllowed",
                "a page of this origin may not open a stream; only the relay's console may",
            ),
        }
    }

    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::InvalidToken => "invalid_token",
            Refusal::TokenExpired => "token_expired",
            Refusal::TokenAlreadyUsed => "token_already_used",
            Refusal::BadRequest => "bad_request",
            Refusal::RequestBody => "request_body",
            Refusal::HeadTooLarge => "head_too_large",
            Refusal::NotFound => "not_found",
            Refusal::Unavailable => "unavailable",
            Refusal::ForeignOrigin => "origin_not_allowed",
        }
    }

    /// The full HTTP response.
    pub fn response(self) -> Vec<u8> {
        let (status, text, code, message) = self.parts();
        let body = serde_json::json!({ "code": code, "message": message }).to_string();
        format!(
            "HTTP/1.1 {status} {text}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// Index of the end of the head (just past `\r\n\r\n`) in `buf`, if complete.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses and checks a complete request head.
pub fn parse(head: &[u8]) -> Result<Request, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(Refusal::BadRequest),
    }
    let path = req.path.ok_or(Refusal::BadRequest)?;
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let sid = path.strip_prefix("/v1/stream/").ok_or(Refusal::NotFound)?;
    if sid.is_empty()
        || sid.len() > 128
        || !sid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(Refusal::NotFound);
    }
    let mut role = None;
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("role=") {
            role = Role::parse(v);
        }
    }
    let role = role.ok_or(Refusal::NotFound)?;
    // RFC 6455 §4.1: a GET of HTTP/1.1 or later (httparse: 1 = HTTP/1.1).
    if req.method != Some("GET") || req.version != Some(1) {
        return Err(Refusal::BadRequest);
    }

    let mut upgrade = false;
    let mut connection = false;
    let mut version = false;
    let mut key = None;
    let mut token = None;
    let mut hatch_v1 = false;
    let mut body = false;
    let mut origin: Option<String> = None;
    let mut host = None;
    for h in req.headers.iter() {
        let v = std::str::from_utf8(h.value).map_err(|_| Refusal::BadRequest)?;
        if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade |= v.trim().eq_ignore_ascii_case("websocket");
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection |= v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
            version |= v.trim() == "13";
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // Only an explicit empty body is harmless; anything else (a length, a list, junk)
            // would make the bytes after the head either a body or frames, depending on who
            // reads them.
            body |= v.trim() != "0";
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            body = true;
        } else if h.name.eq_ignore_ascii_case("origin") {
            // Twice is no single origin: kept as "", which no rule allows.
            origin = Some(if origin.is_some() { String::new() } else { v.trim().to_owned() });
        } else if h.name.eq_ignore_ascii_case("host") {
            host = Some(v.trim().to_owned());
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(v.trim());
        } else if h.name.eq_ignore_ascii_case("authorization") {
            // Compared as bytes: the value may hold multi-byte characters anywhere.
            let v = v.trim();
            if v.len() > 7 && v.as_bytes()[..7].eq_ignore_ascii_case(b"bearer ") {
                // The first 7 bytes are ASCII, so byte 7 starts a character.
                token = Some(v[7..].trim().to_owned());
            }
        } else if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for p in v.split(',').map(str::trim) {
                if p == PROTOCOL {
                    hatch_v1 = true;
                } else if let Some(t) = p.strip_prefix("bearer.")
                    && token.is_none()
                {
                    token = Some(t.to_owned());
                }
            }
        }
    }
    if body {
        return Err(Refusal::RequestBody);
    }
    let key = key.ok_or(Refusal::BadRequest)?;
    // A key is 16 random bytes in base64: 24 characters.
    if !(upgrade && connection && version) || key.len() != 24 {
        return Err(Refusal::BadRequest);
    }
    let token = token.filter(|t| !t.is_empty()).ok_or(Refusal::InvalidToken)?;
    Ok(Request {
        session_id: sid.to_owned(),
        role,
        token,
        accept: tungstenite::handshake::derive_accept_key(key.as_bytes()),
        hatch_v1,
        origin,
        host,
    })
}

/// The `101 Switching Protocols` answer.
pub fn switching(accept: &str, hatch_v1: bool) -> Vec<u8> {
    let proto = if hatch_v1 { "Sec-WebSocket-Protocol: hatch.v1\r\n" } else { "" };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{proto}\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(extra: &str, path: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
    }

    #[test]
    fn token_from_header_or_subprotocol() {
        let r = parse(req("Authorization: Bearer abc\r\n", "/v1/stream/s1?role=client").as_bytes())
            .unwrap();
        assert_eq!((r.session_id.as_str(), r.role, r.token.as_str()), ("s1", Role::Client, "abc"));
        assert_eq!(r.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let r = parse(
            req("Sec-WebSocket-Protocol: hatch.v1, bearer.xyz\r\n", "/v1/stream/s1?role=agent")
                .as_bytes(),
        )
        .unwrap();
        assert!(r.hatch_v1);
        assert_eq!((r.role, r.token.as_str()), (Role::Agent, "xyz"));
    }

    #[test]
    fn refusals() {
        assert_eq!(
            parse(req("", "/v1/stream/s1?role=client").as_bytes()),
            Err(Refusal::InvalidToken)
        );
        assert_eq!(parse(req("", "/other").as_bytes()), Err(Refusal::NotFound));
        assert_eq!(parse(req("", "/v1/stream/s1?role=x").as_bytes()), Err(Refusal::NotFound));
        assert_eq!(
            parse(b"GET /v1/stream/s?role=client HTTP/1.1\r\n\r\n"),
            Err(Refusal::BadRequest)
        );
        assert_eq!(parse(b"\x16\x03\x01garbage\r\n\r\n"), Err(Refusal::BadRequest));
    }

    #[test]
    fn a_request_with_a_body_is_refused() {
        let ok = "Authorization: Bearer abc\r\n";
        for extra in [
            "Content-Length: 5\r\n",
            "content-length: 1\r\n",
            "Content-Length: 0, 0\r\n",
            "Content-Length: x\r\n",
            "Transfer-Encoding: chunked\r\n",
            "transfer-encoding: gzip, chunked\r\n",
            "Transfer-Encoding: identity\r\n",
            "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
        ] {
            let head = req(&format!("{ok}{extra}"), "/v1/stream/s1?role=client");
            assert_eq!(parse(head.as_bytes()), Err(Refusal::RequestBody), "{extra:?}");
        }
        // Refused before the token is looked at.
        let head = req("Content-Length: 3\r\n", "/v1/stream/s1?role=client");
        assert_eq!(parse(head.as_bytes()), Err(Refusal::RequestBody));
        // An explicit empty body is no body.
        let head = req(&format!("{ok}Content-Length: 0\r\n"), "/v1/stream/s1?role=client");
        assert_eq!(parse(head.as_bytes()).unwrap().token, "abc");
        assert_eq!(&Refusal::RequestBody.response()[..15], b"HTTP/1.1 400 Ba");
        assert_eq!(Refusal::RequestBody.parts().2, "InvalidRequest");
        assert!(crate::data::metrics::REFUSALS.contains(&Refusal::RequestBody.label()));
    }

    #[test]
    fn non_ascii_authorization_is_refused_not_a_panic() {
        // httparse accepts bytes 0x80-0xFF in header values; a multi-byte character across the
        // end of "Bearer " must be an invalid token, not a slice off a character boundary.
        for v in ["Bearer\u{e9}abcdef", "Beare\u{20ac}abcd", "\u{e9}\u{e9}\u{e9}\u{e9}x"] {
            let head = req(&format!("Authorization: {v}\r\n"), "/v1/stream/s1?role=client");
            assert_eq!(parse(head.as_bytes()), Err(Refusal::InvalidToken), "{v}");
        }
        let head = req("Authorization: Bearer \u{e9}t\r\n", "/v1/stream/s1?role=client");
        assert_eq!(parse(head.as_bytes()).unwrap().token, "\u{e9}t");
    }

    #[test]
    fn only_the_consoles_origin_or_none_may_open_a_leg() {
        let o =
            Origins { api: Some(("https", 7444)), allowed: vec!["https://console.example".into()] };
        let host = Some("relay.example:7443");
        // Not a browser: no Origin.
        assert_eq!(o.check(None, host), Ok(()));
        assert_eq!(o.check(None, None), Ok(()));
        for ok in
            ["https://relay.example:7444", "HTTPS://RELAY.example:7444", "https://console.example"]
        {
            assert_eq!(o.check(Some(ok), host), Ok(()), "{ok}");
        }
        for foreign in [
            "https://evil.example",
            "https://relay.example:7443",
            "https://relay.example",
            "http://relay.example:7444",
            "https://relay.example:7444.evil.example",
            "https://evil.example:7444",
            "null",
            "",
        ] {
            assert_eq!(o.check(Some(foreign), host), Err(Refusal::ForeignOrigin), "{foreign}");
        }
        // Without a Host header only the listed origins pass.
        assert_eq!(o.check(Some("https://relay.example:7444"), None), Err(Refusal::ForeignOrigin));
        assert_eq!(o.check(Some("https://console.example"), None), Ok(()));
        // IPv6 hosts keep their brackets; the default port may be left out.
        let v6 = Origins { api: Some(("https", 443)), allowed: vec![] };
        assert_eq!(v6.check(Some("https://[::1]:443"), Some("[::1]:7443")), Ok(()));
        assert_eq!(v6.check(Some("https://[::1]"), Some("[::1]:7443")), Ok(()));
        assert_eq!(
            v6.check(Some("https://[::2]"), Some("[::1]:7443")),
            Err(Refusal::ForeignOrigin)
        );
        // No rule at all: every browser page is refused, every other client served.
        let none = Origins::default();
        assert_eq!(
            none.check(Some("https://relay.example:7444"), host),
            Err(Refusal::ForeignOrigin)
        );
        assert_eq!(none.check(None, host), Ok(()));
    }

    #[test]
    fn origin_and_host_are_parsed_and_a_second_origin_is_none() {
        let ok = "Authorization: Bearer abc\r\n";
        let r = parse(
            req(&format!("{ok}Origin: https://a.example:7444\r\n"), "/v1/stream/s1?role=client")
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.origin.as_deref(), Some("https://a.example:7444"));
        assert_eq!(r.host.as_deref(), Some("x"));
        let r = parse(
            req(
                &format!("{ok}Origin: https://a.example\r\norigin: https://b.example\r\n"),
                "/v1/stream/s1?role=client",
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(r.origin.as_deref(), Some(""));
        assert_eq!(
            Origins::default().check(r.origin.as_deref(), None),
            Err(Refusal::ForeignOrigin)
        );
        let r = parse(req(ok, "/v1/stream/s1?role=client").as_bytes()).unwrap();
        assert_eq!(r.origin, None);
        let (status, _, code, _) = Refusal::ForeignOrigin.parts();
        assert_eq!((status, code), (403, "OriginNotAllowed"));
        assert!(crate::data::metrics::REFUSALS.contains(&Refusal::ForeignOrigin.label()));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = head_end(&bytes);
            let _ = parse(&bytes);
        }

        #[test]
        fn any_origin_and_host_are_checked_without_panic(
            origin in proptest::option::of("\\PC{0,60}"),
            host in proptest::option::of("\\PC{0,60}"),
            port in proptest::num::u16::ANY,
        ) {
            let allowed = vec!["https://a.example".to_owned()];
            let o = Origins { api: Some(("https", port)), allowed };
            let r = o.check(origin.as_deref(), host.as_deref());
            // No Origin is never refused; an allowed one always passes.
            if origin.is_none() || origin.as_deref() == Some("https://a.example") {
                proptest::prop_assert_eq!(r, Ok(()));
            }
            // Through the parser too: a parsed request's origin and host are checked.
            let extra = format!(
                "Authorization: Bearer t\r\n{}",
                origin.as_deref().map(|v| format!("Origin: {v}\r\n")).unwrap_or_default()
            );
            if let Ok(req) = parse(req(&extra, "/v1/stream/s1?role=client").as_bytes()) {
                let _ = o.check(req.origin.as_deref(), req.host.as_deref());
            }
        }

        #[test]
        fn any_header_value_after_a_valid_request_line_is_handled(
            name in "(Authorization|Sec-WebSocket-Protocol|Sec-WebSocket-Key|Connection|Upgrade|X)",
            value in "\\PC{0,40}",
        ) {
            let head = req(&format!("{name}: {value}\r\n"), "/v1/stream/s1?role=agent");
            let _ = parse(head.as_bytes());
        }
    }
}
