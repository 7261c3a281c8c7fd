//! Header rewriting at the front door: what the app sees and what the browser gets back.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use jobgate_protocol::{upgrade, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use std::net::IpAddr;

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

/// Fields a client could send to lie about where a request came from (address, scheme,
/// port, host, path): all are dropped, and the relay sets `X-Forwarded-For`, `-Proto` and
/// `-Host` itself. Apps and frameworks each trust a different set, so the list is long.
const SPOOFABLE: [HeaderName; 19] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    // Tornado prefers it to X-Forwarded-Proto.
    HeaderName::from_static("x-scheme"),
    // Werkzeug ProxyFix, Spring, Express. Not set by the relay: the port the browser
    // used is in `Host` and `X-Forwarded-Host` already.
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-server"),
    // Scheme flags of other proxies (`on`/`off`, `http`/`https`).
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("front-end-https"),
    // Client addresses set by CDNs and load balancers (Akamai, Cloudflare, others).
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-client-ip"),
    // IIS, Symfony, Laminas route by these instead of the request target.
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    // A path prefix (or URI) the app would put in front of its own links and redirects.
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-uri"),
];

/// Response fields an app must not send to the browser, because their effect reaches
/// beyond the session's own origin (all sessions are sibling names under one registrable
/// domain) or into the relay's own business. `Set-Cookie` is kept but loses `Domain=`.
///
/// `Strict-Transport-Security` passes, `includeSubDomains` or not: it covers only the
/// session's own host and names below it, which the relay never serves, and the relay
/// speaks nothing but HTTPS to browsers anyway.
const CROSS_ORIGIN_RESPONSE: [HeaderName; 4] = [
    // `"cookies"` clears the cookies of the whole registrable domain: every session's
    // access cookie in the browser (and `"storage"`, `"*"` more).
    HeaderName::from_static("clear-site-data"),
    // RFC 2965 cookies (obsolete) may carry a `Domain` this module does not rewrite.
    HeaderName::from_static("set-cookie2"),
    // Would point the browser's later connections for this origin at another endpoint or
    // protocol (e.g. HTTP/3 on a UDP port the relay does not serve browsers on).
    header::ALT_SVC,
    // The relay marks its own pages with it: an app must not pass its answers off as the
    // relay's.
    HeaderName::from_static("x-jobgate"),
];

/// Why the relay refuses a request that asks for a protocol upgrade (the rules are
/// [`jobgate_protocol::upgrade`]'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeRefusal {
    /// An `Upgrade` field naming anything but exactly `websocket` (`h2c` included).
    #[error("upgrade to a protocol other than websocket")]
    NotWebSocket,
    /// A WebSocket handshake that declares a body: the body could not be forwarded, and
    /// its framing fields would desynchronise the app's connection.
    #[error("upgrade request with a body")]
    WithBody,
}

/// The upgrade a request asks for and the relay passes: `Some(websocket)` for a
/// WebSocket handshake (`Connection: upgrade` plus `Upgrade: websocket`, no body), `None`
/// for a plain request. An `Upgrade` field naming another protocol is refused even
/// without `Connection: upgrade`, so that `h2c` never gets near an app; refusing (rather
/// than dropping the field) also tells a client plainly that its upgrade will not happen.
pub fn requested_upgrade(headers: &HeaderMap) -> Result<Option<HeaderValue>, UpgradeRefusal> {
    let mut values = headers.get_all(header::UPGRADE).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() || !upgrade::is_websocket(first) {
        return Err(UpgradeRefusal::NotWebSocket);
    }
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        // Not an upgrade request: `Upgrade` is dropped with the hop-by-hop fields.
        return Ok(None);
    }
    if upgrade::declares_body(headers) {
        return Err(UpgradeRefusal::WithBody);
    }
    Ok(Some(HeaderValue::from_static(upgrade::WEBSOCKET)))
}

/// Removes every field that [`HOP_BY_HOP`] or `also` lists, or that the `Connection`
/// field names, or that `lookalike` picks, in one scan of the names: a request pays a
/// lookup in the map only for fields it actually carries, not one per listed name (this
/// runs on every request; with 27 removals by name, the map's hashing and removal held
/// ~5 % of the relay's profile samples at 50 connections).
fn remove_hop_by_hop_and(
    headers: &mut HeaderMap,
    also: &[HeaderName],
    lookalike: fn(&HeaderName) -> bool,
) {
    remove_connection_and_named(headers);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| HOP_BY_HOP.contains(name) || also.contains(name) || lookalike(name))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// Removes `Connection` and every field it names (RFC 9110 §7.6.1). Each token is looked
/// up as text: nothing is allocated for the usual `Connection: keep-alive` of an answer
/// (collecting the names first cost three allocations per response), and a long list
/// costs one lookup per token rather than one comparison per token and field.
fn remove_connection_and_named(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONNECTION).iter();
    // A clone of a value is a reference count, not a copy.
    let (Some(first), more) = (values.next().cloned(), values.next().is_some()) else {
        return;
    };
    // Several `Connection` fields are rare; an empty `Vec` allocates nothing.
    let rest: Vec<HeaderValue> = if more {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .skip(1)
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    headers.remove(header::CONNECTION);
    for value in std::iter::once(&first).chain(&rest) {
        remove_named(headers, value);
    }
}

/// Removes the fields a `Connection` value lists (names that are not valid field names
/// name nothing).
fn remove_named(headers: &mut HeaderMap, connection: &HeaderValue) {
    let Ok(list) = connection.to_str() else {
        return;
    };
    for token in list.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        headers.remove(token);
    }
}

/// Rewrites a client's request headers for the app, in place: hop-by-hop fields gone,
/// `Host` set to what the client asked for, the `X-Forwarded-*` fields the relay's own.
/// `upgrade` comes from [`requested_upgrade`]: an upgrade request goes without any
/// framing field, since no body follows it (an app must never be told of a body that
/// does not come).
pub fn for_app(
    headers: &mut HeaderMap,
    host: &HeaderValue,
    forwarded_for: HeaderValue,
    upgrade: Option<HeaderValue>,
) {
    remove_hop_by_hop_and(headers, &SPOOFABLE, is_underscore_lookalike);
    join_cookies(headers);
    headers.insert(header::HOST, host.clone());
    headers.insert(X_FORWARDED_HOST, host.clone());
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    if let Some(protocol) = upgrade {
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// The `X-Forwarded-For` value for a client at `ip`.
pub fn forwarded_for(ip: IpAddr) -> HeaderValue {
    // An address formats as ASCII digits, dots, colons and hex: always a valid value.
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static(""))
}

/// Whether `name` has a `_` and reads as a [`SPOOFABLE`] name with `-` for `_`: such
/// fields (`X_Forwarded_For`) are dropped too, because CGI-style servers (WSGI ones among
/// them) map `_` and `-` to the same variable and would read them as the spoofable field.
fn is_underscore_lookalike(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    name.contains(&b'_')
        && SPOOFABLE.iter().any(|spoofable| {
            let spoofable = spoofable.as_str().as_bytes();
            spoofable.len() == name.len()
                && spoofable
                    .iter()
                    .zip(name)
                    .all(|(&s, &n)| s == n || (s == b'-' && n == b'_'))
        })
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
/// a session can only set host-only cookies, never cookies for other sessions' names;
/// the fields of [`CROSS_ORIGIN_RESPONSE`] are dropped.
pub fn for_client(headers: &mut HeaderMap, switching_protocols: bool) {
    let upgrade = if switching_protocols {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    remove_hop_by_hop_and(headers, &CROSS_ORIGIN_RESPONSE, |_| false);
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

    /// The `X-Forwarded-For` value of a client at `ip`.
    fn client(ip: &str) -> HeaderValue {
        forwarded_for(ip.parse().expect("ip"))
    }

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
        for_app(&mut h, &host, client("192.0.2.7"), None);
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
    fn every_field_any_connection_field_names_is_dropped() {
        let mut h = HeaderMap::new();
        h.append(
            "connection",
            HeaderValue::from_static("X-One , ,keep-alive"),
        );
        h.append(
            "connection",
            HeaderValue::from_static("x-two,not a name,x-ONE"),
        );
        for name in ["x-one", "x-two", "keep-alive", "x-kept"] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        for_client(&mut h, false);
        assert!(h.get("connection").is_none());
        assert!(h.get("x-one").is_none());
        assert!(h.get("x-two").is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h["x-kept"], "1");

        // A long list names nothing present: one lookup per token, and the rest stays.
        let list = vec!["x-absent"; 10_000].join(",");
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_str(&list).expect("a valid value"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        for_client(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-kept"], "1");
    }

    #[test]
    fn upgrade_is_kept_only_when_asked_for() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert("upgrade", HeaderValue::from_static("WebSocket"));
        h.insert("content-length", HeaderValue::from_static("0"));
        let up = requested_upgrade(&h);
        assert_eq!(up, Ok(Some(HeaderValue::from_static("websocket"))));
        for_app(
            &mut h,
            &HeaderValue::from_static("x"),
            client("::1"),
            up.ok().flatten(),
        );
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert!(
            h.get("content-length").is_none(),
            "no framing on an upgrade"
        );

        // `Upgrade: websocket` without `Connection: upgrade` is a plain request.
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("content-length", HeaderValue::from_static("5"));
        assert_eq!(requested_upgrade(&h), Ok(None));
        for_app(&mut h, &HeaderValue::from_static("x"), client("::1"), None);
        assert!(h.get("upgrade").is_none());
        assert_eq!(
            h["content-length"], "5",
            "a plain request keeps its body's length"
        );
    }

    fn upgrade_request(token: &'static str, extra: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static(token));
        for (name, value) in extra {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn only_websocket_upgrades_pass_and_h2c_is_refused() {
        for token in ["h2c", "H2C", "websocket, h2c", "foo", "TLS/1.0"] {
            let h = upgrade_request(token, &[]);
            assert_eq!(
                requested_upgrade(&h),
                Err(UpgradeRefusal::NotWebSocket),
                "{token}"
            );
        }
        // Refused even without `Connection: upgrade`.
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        assert_eq!(requested_upgrade(&h), Err(UpgradeRefusal::NotWebSocket));
        // Two `Upgrade` fields are not one WebSocket.
        let h = upgrade_request("websocket", &[("upgrade", "websocket")]);
        assert_eq!(requested_upgrade(&h), Err(UpgradeRefusal::NotWebSocket));
    }

    #[test]
    fn an_upgrade_with_a_body_is_refused() {
        for extra in [
            ("content-length", "12"),
            ("transfer-encoding", "chunked"),
            ("content-length", "x"),
        ] {
            let h = upgrade_request("websocket", &[extra]);
            assert_eq!(
                requested_upgrade(&h),
                Err(UpgradeRefusal::WithBody),
                "{extra:?}"
            );
        }
    }

    #[test]
    fn every_spoofable_field_and_its_underscore_lookalike_is_replaced_or_dropped() {
        let mut h = HeaderMap::new();
        for name in &SPOOFABLE {
            h.insert(name.clone(), HeaderValue::from_static("spoofed"));
            let underscored = name.as_str().replace('-', "_");
            if let Ok(lookalike) = HeaderName::from_bytes(underscored.as_bytes()) {
                h.insert(lookalike, HeaderValue::from_static("spoofed"));
            }
        }
        h.insert("x_app_field", HeaderValue::from_static("kept"));
        let host = HeaderValue::from_static("abc.example.org");
        for_app(&mut h, &host, client("192.0.2.7"), None);
        let spoofed: Vec<_> = h
            .iter()
            .filter(|(_, v)| *v == "spoofed")
            .map(|(n, _)| n.as_str())
            .collect();
        assert!(spoofed.is_empty(), "{spoofed:?}");
        assert_eq!(h["x_app_field"], "kept");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        for name in [
            "x-scheme",
            "x-forwarded-port",
            "true-client-ip",
            "forwarded",
        ] {
            assert!(h.get(name).is_none(), "{name}");
        }
    }

    #[test]
    fn cross_origin_response_fields_are_dropped_and_hsts_passes() {
        let mut h = HeaderMap::new();
        for name in &CROSS_ORIGIN_RESPONSE {
            h.insert(name.clone(), HeaderValue::from_static("\"cookies\""));
        }
        h.insert(
            "strict-transport-security",
            HeaderValue::from_static("max-age=60; includeSubDomains"),
        );
        h.insert("content-type", HeaderValue::from_static("text/html"));
        for_client(&mut h, false);
        for name in &CROSS_ORIGIN_RESPONSE {
            assert!(h.get(name).is_none(), "{name}");
        }
        assert!(h.get("clear-site-data").is_none());
        assert_eq!(
            h["strict-transport-security"],
            "max-age=60; includeSubDomains"
        );
        assert_eq!(h["content-type"], "text/html");
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
