//! SessionLock control for a mapping: in `link` mode only requests carrying the mapping's
//! access key (in the query, once) or its cookie reach the app.
//!
//! The printed URL is `https://<name>.<domain>/…?jobgate_key=<key>`. A browser navigation
//! with a valid key gets a host-only cookie and a `303` to the same URL without the key
//! (so the key leaves the address bar and history). Other clients (API calls, WebSockets,
//! curl) may carry the key in place. The key and the cookie are removed before the
//! request reaches the app; a request with neither gets `401`.
//!
//! The cookie is ambient authority: the browser attaches it to requests made by *any*
//! page of the same site, and every session shares one site (`*.<domain>`), so a page
//! served by another user's session could otherwise POST into this one or open a
//! WebSocket to it and read the answers. A cookie-authenticated request therefore must
//! also come from the session's own origin (`Origin`, `Sec-Fetch-Site`), unless it is a
//! top-level GET/HEAD navigation (what `SameSite=Lax` allows: a link from a mail still
//! opens the notebook); otherwise `403` ([`Page::ForeignOrigin`]). The key in the query
//! is not ambient (whoever sends it knows it), so it keeps the plain rules.
//!
//! [`Page::ForeignOrigin`]: crate::pages::Page::ForeignOrigin

use crate::body::RelayBody;
use crate::names::SessionName;
use crate::pages::Page;
use http::{header, request::Parts, HeaderValue, Method, Response, StatusCode, Uri};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Query parameter that carries the access key.
pub const KEY_PARAM: &str = "jobgate_key";
/// Random bytes in an access key (160 bits).
pub const KEY_BYTES: usize = 20;
/// Prefix of the per-session cookie; `__Host-` makes browsers insist on `Secure`,
/// `Path=/` and no `Domain` (a host-only cookie).
const COOKIE_PREFIX: &str = "__Host-jobgate-";

/// The lock on a session's URL: none (public) or its access key (link).
#[derive(Clone)]
pub enum SessionLock {
    /// The app's own authentication is the only lock.
    Public,
    /// Requests need the access key or the cookie; only its SHA-256 is kept.
    Link {
        /// SHA-256 of the access key.
        key_hash: [u8; 32],
    },
    /// Only the owner and whom the session is shared with, after single sign-on
    /// (checked by [`crate::signon`] before this module).
    Owner,
}

impl SessionLock {
    /// Mints a new key: returns the lock and the key (shown once, in the access URL).
    pub fn new_link() -> (Self, String) {
        let key = crate::names::random_secret(KEY_BYTES);
        (
            Self::Link {
                key_hash: Sha256::digest(key.as_bytes()).into(),
            },
            key,
        )
    }
}

/// What to do with a request.
pub enum Decision {
    /// Forward it (key/cookie already removed).
    Forward,
    /// Answer with this response instead (redirect or 401).
    Answer(Response<RelayBody>),
}

fn valid(key_hash: &[u8; 32], presented: &str) -> bool {
    let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    bool::from(hash.ct_eq(key_hash))
}

/// Checks `parts` against the session's lock, removing the credential it used.
///
/// `own_origin` is the session's web origin, `https://<name>.<domain>[:port]`, computed
/// once per session (see [`crate::RelayConfig::session_origin`]).
pub fn check(
    lock: &SessionLock,
    name: &SessionName,
    own_origin: &str,
    parts: &mut Parts,
) -> Decision {
    let SessionLock::Link { key_hash } = lock else {
        return Decision::Forward;
    };
    if let Some((key, rest)) = take_key(&parts.uri) {
        if !valid(key_hash, &key) {
            return Decision::Answer(unauthorized(&parts.headers));
        }
        if is_navigation(parts) {
            return Decision::Answer(redirect_with_cookie(name, &key, &rest));
        }
        if let Ok(uri) = Uri::try_from(rest) {
            parts.uri = uri;
        }
        remove_cookie(&mut parts.headers, name);
        return Decision::Forward;
    }
    match remove_cookie(&mut parts.headers, name) {
        Some(value) if valid(key_hash, &value) => {
            if sent_by_own_page(parts, own_origin) {
                Decision::Forward
            } else {
                Decision::Answer(Page::ForeignOrigin.render(&parts.headers))
            }
        }
        _ => Decision::Answer(unauthorized(&parts.headers)),
    }
}

/// Whether a cookie-carrying request may act in the session: it comes from the session's
/// own pages, from the user (address bar, bookmark), from a client that is no browser, or
/// it is a top-level GET/HEAD navigation. Header lookups and byte compares only.
pub(crate) fn sent_by_own_page(parts: &Parts, own_origin: &str) -> bool {
    let headers = &parts.headers;
    let upgrade = headers.contains_key(header::UPGRADE);
    let safe = parts.method == Method::GET || parts.method == Method::HEAD;
    // Browsers send `Origin` on every WebSocket handshake and on every POST/PUT/DELETE…,
    // older ones (no `Sec-Fetch-*`) included: when it is there, it must be ours.
    match origin_matches(headers, own_origin) {
        Some(true) => {}
        Some(false) if upgrade || !safe => return false,
        // A WebSocket handshake without `Origin` comes from no browser; with the cookie
        // it is refused all the same (such clients can carry the key instead).
        None if upgrade => return false,
        _ => {}
    }
    let Some(site) = headers.get("sec-fetch-site") else {
        // No fetch metadata: an older browser (judged by `Origin` above) or not a browser.
        return true;
    };
    let site = site.as_bytes();
    if site.eq_ignore_ascii_case(b"same-origin") || site.eq_ignore_ascii_case(b"none") {
        return true;
    }
    // `same-site` (a sibling session!), `cross-site`, or a value we do not know.
    !upgrade && safe && is_top_level_navigation(headers)
}

/// `Some(true)` if the request has exactly one `Origin` and it is `own_origin`
/// (ASCII case-insensitive), `Some(false)` if it has another (or several, or `null`),
/// `None` if it has none.
fn origin_matches(headers: &http::HeaderMap, own_origin: &str) -> Option<bool> {
    let mut values = headers.get_all(header::ORIGIN).iter();
    let first = values.next()?;
    Some(values.next().is_none() && first.as_bytes().eq_ignore_ascii_case(own_origin.as_bytes()))
}

/// A navigation of the top-level window: not a fetch, not an `<iframe>` (a framed
/// session could be click-jacked by a sibling page that frames it).
fn is_top_level_navigation(headers: &http::HeaderMap) -> bool {
    let navigates = headers
        .get("sec-fetch-mode")
        .is_some_and(|mode| mode.as_bytes().eq_ignore_ascii_case(b"navigate"));
    let top_level = headers
        .get("sec-fetch-dest")
        .is_none_or(|dest| dest.as_bytes().eq_ignore_ascii_case(b"document"));
    navigates && top_level
}

/// A top-level browser navigation (where a redirect and a cookie make sense).
pub(crate) fn is_navigation(parts: &Parts) -> bool {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return false;
    }
    if let Some(mode) = parts.headers.get("sec-fetch-mode") {
        return mode == "navigate";
    }
    parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/html"))
}

/// Splits the key out of the target: `(key, target without it)`.
fn take_key(uri: &Uri) -> Option<(String, String)> {
    let query = uri.query()?;
    let mut key = None;
    let mut kept = Vec::new();
    for pair in query.split('&') {
        match pair
            .strip_prefix(KEY_PARAM)
            .and_then(|r| r.strip_prefix('='))
        {
            Some(value) if key.is_none() => key = Some(value.to_owned()),
            Some(_) => {} // a second key is dropped too
            None => kept.push(pair),
        }
    }
    let key = key?;
    let path = uri.path();
    let rest = if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    };
    Some((key, rest))
}

/// Whether `cookie` (a cookie's name) is the session `name`'s access cookie; compared
/// piecewise so that no cookie name is built per request.
fn is_session_cookie(cookie: &str, name: &SessionName) -> bool {
    cookie.strip_prefix(COOKIE_PREFIX) == Some(name.as_str())
}

/// Removes our cookie from the `Cookie` header(s), returning its value.
fn remove_cookie(headers: &mut http::HeaderMap, name: &SessionName) -> Option<String> {
    if !headers.contains_key(header::COOKIE) {
        return None;
    }
    let mut found = None;
    let mut kept: Vec<String> = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            let pair = pair.trim();
            match pair.split_once('=') {
                Some((n, v)) if is_session_cookie(n, name) => found = found.or(Some(v.to_owned())),
                _ if pair.is_empty() => {}
                _ => kept.push(pair.to_owned()),
            }
        }
    }
    let found = found?;
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, value);
        }
    }
    Some(found)
}

fn redirect_with_cookie(name: &SessionName, key: &str, location: &str) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let h = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, location);
    }
    let cookie = format!("{COOKIE_PREFIX}{name}={key}; Path=/; Secure; HttpOnly; SameSite=Lax");
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        h.insert(header::SET_COOKIE, cookie);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

fn unauthorized(headers: &http::HeaderMap) -> Response<RelayBody> {
    Page::Unauthorized.render(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The origin of the session `abcdefghijklmnop` in these tests.
    const OWN: &str = "https://abcdefghijklmnop.jobgate.test:8443";
    /// A sibling session under the same domain: same site, other origin.
    const SIBLING: &str = "https://qrstuvwxyzabcdef.jobgate.test:8443";

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::get(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request").into_parts().0
    }

    #[test]
    fn key_in_query_is_removed_and_navigation_redirects_with_cookie() {
        let (access, key) = SessionLock::new_link();
        let name = SessionName::parse(b"abcdefghijklmnop").expect("name");
        let mut p = parts(
            &format!("/lab?token=t&{KEY_PARAM}={key}"),
            &[("sec-fetch-mode", "navigate")],
        );
        let Decision::Answer(response) = check(&access, &name, OWN, &mut p) else {
            panic!("redirect expected")
        };
        assert_eq!(response.status(), StatusCode::SEE_OTHER);
        assert_eq!(response.headers()[header::LOCATION], "/lab?token=t");
        let cookie = response.headers()[header::SET_COOKIE]
            .to_str()
            .expect("ascii");
        assert!(cookie.starts_with(&format!("__Host-jobgate-abcdefghijklmnop={key};")));
        for attr in ["Path=/", "Secure", "HttpOnly", "SameSite=Lax"] {
            assert!(cookie.contains(attr), "{cookie}");
        }

        let mut p = parts(&format!("/api/x?{KEY_PARAM}={key}"), &[]);
        assert!(matches!(
            check(&access, &name, OWN, &mut p),
            Decision::Forward
        ));
        assert_eq!(p.uri, "/api/x");
    }

    #[test]
    fn cookie_is_checked_and_stripped_others_are_kept() {
        let (access, key) = SessionLock::new_link();
        let name = SessionName::parse(b"abcdefghijklmnop").expect("name");
        let cookie = format!("_xsrf=1; __Host-jobgate-abcdefghijklmnop={key}; other=2");
        let mut p = parts("/", &[("cookie", &cookie)]);
        assert!(matches!(
            check(&access, &name, OWN, &mut p),
            Decision::Forward
        ));
        assert_eq!(p.headers[header::COOKIE], "_xsrf=1; other=2");

        let mut p = parts("/", &[("cookie", "__Host-jobgate-abcdefghijklmnop=wrong")]);
        assert!(
            matches!(check(&access, &name, OWN, &mut p), Decision::Answer(r) if r.status() == StatusCode::UNAUTHORIZED)
        );
        let mut p = parts("/", &[]);
        assert!(
            matches!(check(&access, &name, OWN, &mut p), Decision::Answer(r) if r.status() == StatusCode::UNAUTHORIZED)
        );
        let mut p = parts(&format!("/?{KEY_PARAM}=nope"), &[]);
        assert!(
            matches!(check(&access, &name, OWN, &mut p), Decision::Answer(r) if r.status() == StatusCode::UNAUTHORIZED)
        );
    }

    /// A method, the request's other headers, and the status the relay must give.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], StatusCode);

    /// What the relay does with a request carrying a valid cookie plus `headers`.
    fn with_cookie(method: &str, headers: &[(&str, &str)]) -> StatusCode {
        let (access, key) = SessionLock::new_link();
        let name = SessionName::parse(b"abcdefghijklmnop").expect("name");
        let cookie = format!("__Host-jobgate-abcdefghijklmnop={key}");
        let mut builder = http::Request::builder()
            .method(method)
            .uri("/api/x")
            .header("cookie", cookie);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let mut p = builder.body(()).expect("request").into_parts().0;
        match check(&access, &name, OWN, &mut p) {
            Decision::Forward => StatusCode::OK,
            Decision::Answer(response) => response.status(),
        }
    }

    #[test]
    fn cookie_requests_from_other_origins_are_refused() {
        const FORBIDDEN: StatusCode = StatusCode::FORBIDDEN;
        const OK: StatusCode = StatusCode::OK;
        let ws = [("connection", "Upgrade"), ("upgrade", "websocket")];
        #[rustfmt::skip]
        let cases: &[Case] = &[
            // A sibling session's page POSTs, fetches or opens a WebSocket: refused.
            ("POST", &[("sec-fetch-site", "same-site"), ("origin", SIBLING)], FORBIDDEN),
            ("POST", &[("sec-fetch-site", "cross-site"), ("origin", "https://evil.example")], FORBIDDEN),
            ("GET", &[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "cors"), ("origin", SIBLING)], FORBIDDEN),
            ("GET", &[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "no-cors")], FORBIDDEN),
            ("GET", &[ws[0], ws[1], ("origin", SIBLING), ("sec-fetch-site", "same-site"), ("sec-fetch-mode", "websocket")], FORBIDDEN),
            // Older browsers (no fetch metadata) are judged by `Origin`.
            ("POST", &[("origin", SIBLING)], FORBIDDEN),
            ("POST", &[("origin", "null")], FORBIDDEN),
            ("PUT", &[("origin", OWN), ("origin", SIBLING)], FORBIDDEN),
            ("GET", &[ws[0], ws[1], ("origin", SIBLING)], FORBIDDEN),
            // Every cookie-authenticated upgrade needs our own `Origin`.
            ("GET", &[ws[0], ws[1]], FORBIDDEN),
            ("GET", &[ws[0], ws[1], ("sec-fetch-site", "same-origin")], FORBIDDEN),
            // Navigations from elsewhere: top-level GET yes (SameSite=Lax), POST or frame no.
            ("GET", &[("sec-fetch-site", "cross-site"), ("sec-fetch-mode", "navigate"), ("sec-fetch-dest", "document")], OK),
            ("HEAD", &[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "navigate")], OK),
            ("POST", &[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "navigate"), ("sec-fetch-dest", "document"), ("origin", SIBLING)], FORBIDDEN),
            ("POST", &[("sec-fetch-site", "cross-site"), ("sec-fetch-mode", "navigate")], FORBIDDEN),
            ("GET", &[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "navigate"), ("sec-fetch-dest", "iframe")], FORBIDDEN),
            ("GET", &[("sec-fetch-site", "something-new"), ("sec-fetch-mode", "cors")], FORBIDDEN),
            // The session's own pages, the user's address bar, and non-browsers: as before.
            ("POST", &[("sec-fetch-site", "same-origin"), ("origin", OWN)], OK),
            ("POST", &[("sec-fetch-site", "same-origin"), ("origin", &OWN.to_ascii_uppercase())], OK),
            ("GET", &[ws[0], ws[1], ("origin", OWN), ("sec-fetch-site", "same-origin"), ("sec-fetch-mode", "websocket")], OK),
            ("GET", &[ws[0], ws[1], ("origin", OWN)], OK),
            ("GET", &[("sec-fetch-site", "none"), ("sec-fetch-mode", "navigate")], OK),
            ("POST", &[("origin", OWN)], OK),
            ("GET", &[("origin", SIBLING)], OK),
            ("POST", &[], OK),
            ("GET", &[], OK),
        ];
        for (method, headers, expected) in cases {
            assert_eq!(
                with_cookie(method, headers),
                *expected,
                "{method} {headers:?}"
            );
        }
    }

    #[test]
    fn key_in_query_keeps_its_rules_whatever_the_origin() {
        let (access, key) = SessionLock::new_link();
        let name = SessionName::parse(b"abcdefghijklmnop").expect("name");
        let mut p = parts(
            &format!("/ws?{KEY_PARAM}={key}"),
            &[
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("origin", SIBLING),
                ("sec-fetch-site", "same-site"),
            ],
        );
        assert!(matches!(
            check(&access, &name, OWN, &mut p),
            Decision::Forward
        ));
    }

    #[test]
    fn the_refusal_page_reveals_nothing() {
        let mut p = parts("/", &[("accept", "text/html")]);
        p.headers
            .insert(header::ORIGIN, HeaderValue::from_static(SIBLING));
        let response = Page::ForeignOrigin.render(&p.headers);
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let RelayBody::Full(Some(body)) = response.body() else {
            panic!("a full body expected")
        };
        let text = String::from_utf8_lossy(body);
        assert!(
            text.contains("another site or another jobgate session"),
            "{text}"
        );
        assert!(!text.contains("qrstuvwxyzabcdef") && !text.contains("abcdefghijklmnop"));
    }
}
