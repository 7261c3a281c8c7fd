//! Which protocol upgrades cross the tunnel, and when an upgrade request is well framed.
//!
//! Both ends apply these rules (the agent again, in case the relay is old or buggy): an
//! upgrade request reaches the app only as a WebSocket handshake without a body. Any
//! other upgrade token is refused: `h2c` would turn the app connection into an HTTP/2
//! connection the relay cannot see into (past its header rewriting and access checks),
//! and other tokens have no use behind a browser. A body on an upgrade request is refused
//! too: the relay keeps the stream for the upgraded bytes, so the body would never reach
//! the app while its `Content-Length` did, and an app that refuses the upgrade would read
//! the next request on its keep-alive connection as that body (request smuggling).

use http::header::{self, HeaderMap, HeaderValue};

/// The one upgrade token the tunnel passes (RFC 6455), compared case-insensitively.
pub const WEBSOCKET: &str = "websocket";

/// Whether an `Upgrade` field value asks for exactly one protocol, WebSocket.
pub fn is_websocket(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .trim_ascii()
        .eq_ignore_ascii_case(WEBSOCKET.as_bytes())
}

/// Whether a request head says a body follows: any `Transfer-Encoding`, or a
/// `Content-Length` that is not exactly zero (an unparsable one counts as a body).
pub fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) != Some(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_single_websocket_token_is_websocket() {
        for yes in ["websocket", "WebSocket", " websocket "] {
            assert!(is_websocket(&HeaderValue::from_static(yes)), "{yes}");
        }
        for no in [
            "h2c",
            "H2C",
            "websocket, h2c",
            "h2c, websocket",
            "foo",
            "",
            "web socket",
        ] {
            assert!(!is_websocket(&HeaderValue::from_static(no)), "{no}");
        }
    }

    #[test]
    fn bodies_are_declared_by_any_transfer_encoding_or_a_nonzero_length() {
        let mut h = HeaderMap::new();
        assert!(!declares_body(&h));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert!(!declares_body(&h));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert!(declares_body(&h));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0, 12"));
        assert!(declares_body(&h), "an unparsable length counts as a body");
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(declares_body(&h));
    }
}
