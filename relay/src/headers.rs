//! Header rewriting at the front door: what the app sees and what the browser gets back.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::SocketAddr;

/// Hop-by-hop fields (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// Fields a client might send to lie about where it is; replaced by the relay's own.
const SPOOFABLE: [HeaderName; 5] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-real-ip"),
    header::FORWARDED,
];

/// The WebSocket-style upgrade a request asks for, if it asks for one the relay passes:
/// `Connection: upgrade` plus an `Upgrade` field.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| upgrade.clone())
}

/// Removes hop-by-hop fields, including any the `Connection` field names.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Rewrites a client's request headers for the app, in place: hop-by-hop fields gone,
/// `Host` set to what the client asked for, the `X-Forwarded-*` fields the relay's own.
pub fn for_app(
    headers: &mut HeaderMap,
    host: &HeaderValue,
    client: SocketAddr,
    upgrade: Option<HeaderValue>,
) {
    remove_hop_by_hop(headers);
    for name in &SPOOFABLE {
        headers.remove(name);
    }
    join_cookies(headers);
    headers.insert(header::HOST, host.clone());
    headers.insert(SPOOFABLE[2].clone(), host.clone());
    headers.insert(SPOOFABLE[1].clone(), HeaderValue::from_static("https"));
    if let Ok(ip) = HeaderValue::from_str(&client.ip().to_string()) {
        headers.insert(SPOOFABLE[0].clone(), ip);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// HTTP/2 may split `Cookie` into several fields; an HTTP/1.1 app expects one
/// (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (cookies.next(), cookies.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Rewrites the app's response headers for the browser, in place. A `101` keeps its
/// `Connection`/`Upgrade` pair; every `Set-Cookie` loses its `Domain=` attribute so that
/// a session can only set host-only cookies, never cookies for other sessions' names.
pub fn for_client(headers: &mut HeaderMap, switching_protocols: bool) {
    let upgrade = if switching_protocols {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    remove_hop_by_hop(headers);
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
    if headers.contains_key(header::SET_COOKIE) {
        strip_cookie_domains(headers);
    }
}

fn strip_cookie_domains(headers: &mut HeaderMap) {
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| strip_domain(v).unwrap_or_else(|| v.clone()))
        .collect();
    headers.remove(header::SET_COOKIE);
    for cookie in cookies {
        headers.append(header::SET_COOKIE, cookie);
    }
}

/// The cookie without any `Domain=` attribute, or `None` if it had none.
fn strip_domain(value: &HeaderValue) -> Option<HeaderValue> {
    let bytes = value.as_bytes();
    let mut parts = bytes.split(|&b| b == b';');
    let first = parts.next()?;
    let mut has_domain = false;
    let mut out = first.to_vec();
    for attr in parts {
        let trimmed = attr.trim_ascii_start();
        if trimmed.len() >= 6 && trimmed[..6].eq_ignore_ascii_case(b"domain") {
            let rest = trimmed[6..].trim_ascii_start();
            if rest.first() == Some(&b'=') || rest.is_empty() {
                has_domain = true;
                continue;
            }
        }
        out.push(b';');
        out.extend_from_slice(attr);
    }
    if !has_domain {
        return None;
    }
    HeaderValue::from_bytes(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_rewrite_drops_hop_by_hop_and_spoofed_forwarding() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        let host = HeaderValue::from_static("abc.example.org");
        for_app(&mut h, &host, "192.0.2.7:4000".parse().expect("addr"), None);
        assert!(h.get("x-secret-hop").is_none());
        assert!(h.get("transfer-encoding").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "abc.example.org");
        assert_eq!(h["host"], "abc.example.org");
        assert_eq!(h["cookie"], "a=1; b=2");
    }

    #[test]
    fn upgrade_is_kept_only_when_asked_for() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        let up = requested_upgrade(&h);
        assert_eq!(up, Some(HeaderValue::from_static("websocket")));
        for_app(
            &mut h,
            &HeaderValue::from_static("x"),
            "[::1]:1".parse().expect("addr"),
            up,
        );
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn set_cookie_domain_is_stripped() {
        let mut h = HeaderMap::new();
        h.append(
            "set-cookie",
            HeaderValue::from_static("a=1; Domain=.example.org; Path=/; Secure"),
        );
        h.append("set-cookie", HeaderValue::from_static("b=2; path=/"));
        for_client(&mut h, false);
        let all: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(all, ["a=1; Path=/; Secure", "b=2; path=/"]);
    }
}
