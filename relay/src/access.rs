//! Access control for a mapping: in `link` mode only requests carrying the mapping's
//! access key (in the query, once) or its cookie reach the app.
//!
//! The printed URL is `https://<name>.<domain>/…?jobgate_key=<key>`. A browser navigation
//! with a valid key gets a host-only cookie and a `303` to the same URL without the key
//! (so the key leaves the address bar and history). Other clients (API calls, WebSockets,
//! curl) may carry the key in place. The key and the cookie are removed before the
//! request reaches the app; a request with neither gets `401`.

use crate::body::RelayBody;
use crate::names::SessionName;
use http::{header, request::Parts, HeaderValue, Method, Response, StatusCode, Uri};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Query parameter that carries the access key.
pub const KEY_PARAM: &str = "jobgate_key";
/// Random bytes in an access key (160 bits).
pub const KEY_BYTES: usize = 20;
/// Prefix of the per-mapping cookie; `__Host-` makes browsers insist on `Secure`,
/// `Path=/` and no `Domain` (a host-only cookie).
const COOKIE_PREFIX: &str = "__Host-jobgate-";

/// How a mapping is guarded.
pub enum Access {
    /// The app's own authentication is the only lock.
    Public,
    /// Requests need the access key or the cookie; only its SHA-256 is kept.
    Link {
        /// SHA-256 of the access key.
        key_hash: [u8; 32],
    },
}

impl Access {
    /// Mints a new key: returns the guard and the key (shown once, in the access URL).
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

/// Checks `parts` against the mapping's access rule, removing the credential it used.
pub fn check(access: &Access, name: &SessionName, parts: &mut Parts) -> Decision {
    let Access::Link { key_hash } = access else {
        return Decision::Forward;
    };
    let cookie_name = format!("{COOKIE_PREFIX}{name}");
    if let Some((key, rest)) = take_key(&parts.uri) {
        if !valid(key_hash, &key) {
            return Decision::Answer(unauthorized(&parts.headers));
        }
        if is_navigation(parts) {
            return Decision::Answer(redirect_with_cookie(&cookie_name, &key, &rest));
        }
        if let Ok(uri) = Uri::try_from(rest) {
            parts.uri = uri;
        }
        remove_cookie(&mut parts.headers, &cookie_name);
        return Decision::Forward;
    }
    match remove_cookie(&mut parts.headers, &cookie_name) {
        Some(value) if valid(key_hash, &value) => Decision::Forward,
        _ => Decision::Answer(unauthorized(&parts.headers)),
    }
}

/// A top-level browser navigation (where a redirect and a cookie make sense).
fn is_navigation(parts: &Parts) -> bool {
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

/// Removes our cookie from the `Cookie` header(s), returning its value.
fn remove_cookie(headers: &mut http::HeaderMap, cookie_name: &str) -> Option<String> {
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
                Some((n, v)) if n == cookie_name => found = found.or(Some(v.to_owned())),
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

fn redirect_with_cookie(cookie_name: &str, key: &str, location: &str) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let h = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, location);
    }
    let cookie = format!("{cookie_name}={key}; Path=/; Secure; HttpOnly; SameSite=Lax");
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
    crate::pages::Page::Unauthorized.render(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::get(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).expect("request").into_parts().0
    }

    #[test]
    fn key_in_query_is_removed_and_navigation_redirects_with_cookie() {
        let (access, key) = Access::new_link();
        let name = SessionName::parse(b"abcdefghijklmnop").expect("name");
        let mut p = parts(
            &format!("/lab?token=t&{KEY_PARAM}={key}"),
            &[("sec-fetch-mode", "navigate")],
        );
        let Decision::Answer(response) = check(&access, &name, &mut p) else {
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
        assert!(matches!(check(&access, &name, &mut p), Decision::Forward));
        assert_eq!(p.uri, "/api/x");
    }

    #[test]
    fn cookie_is_checked_and_stripped_others_are_kept() {
        let (access, key) = Access::new_link();
        let name = SessionName::parse(b"abcdefghijklmnop").expect("name");
        let cookie = format!("_xsrf=1; __Host-jobgate-abcdefghijklmnop={key}; other=2");
        let mut p = parts("/", &[("cookie", &cookie)]);
        assert!(matches!(check(&access, &name, &mut p), Decision::Forward));
        assert_eq!(p.headers[header::COOKIE], "_xsrf=1; other=2");

        let mut p = parts("/", &[("cookie", "__Host-jobgate-abcdefghijklmnop=wrong")]);
        assert!(
            matches!(check(&access, &name, &mut p), Decision::Answer(r) if r.status() == StatusCode::UNAUTHORIZED)
        );
        let mut p = parts("/", &[]);
        assert!(
            matches!(check(&access, &name, &mut p), Decision::Answer(r) if r.status() == StatusCode::UNAUTHORIZED)
        );
        let mut p = parts(&format!("/?{KEY_PARAM}=nope"), &[]);
        assert!(
            matches!(check(&access, &name, &mut p), Decision::Answer(r) if r.status() == StatusCode::UNAUTHORIZED)
        );
    }
}
