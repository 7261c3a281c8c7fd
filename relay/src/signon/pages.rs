//! Sign-on pages: like the relay's other pages, but some name the signed-in user, the
//! session's owner or the IdP (escaped; never a secret, never request input).

use crate::body::RelayBody;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Escapes text for HTML.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page: `text` is plain text (escaped here); `links` are (href, label) pairs.
pub(crate) fn page(
    status: StatusCode,
    title: &str,
    text: &str,
    links: &[(&str, &str)],
) -> Response<RelayBody> {
    let link: String = links
        .iter()
        .map(|(href, label)| format!("<p><a href=\"{}\">{}</a></p>", escape(href), escape(label)))
        .collect();
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title} · jobgate</title>\
         <style>{style}</style></head>\
         <body><h1>{title}</h1><p>{}</p>{link}<p><small>{} · jobgate relay</small></p></body></html>\n",
        escape(text),
        status.as_u16(),
        title = escape(title),
        style = crate::pages::PAGE_STYLE,
    );
    crate::pages::relay_response(status, "text/html; charset=utf-8", body)
}

/// A redirect (303), optionally setting cookies; never cached, never a referrer.
pub(crate) fn redirect(location: &str, cookies: &[String]) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    let h = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(location) {
        h.insert(header::LOCATION, location);
    }
    for cookie in cookies {
        if let Ok(value) = HeaderValue::from_str(cookie) {
            h.append(header::SET_COOKIE, value);
        }
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// The confirmation page of a `jobgate login`: the code, and a same-origin POST button.
pub(crate) fn confirm(code: &str) -> Response<RelayBody> {
    let code = escape(code);
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>jobgate login</title>\
         <style>body{{font:16px/1.5 system-ui,sans-serif;max-width:36em;margin:4em auto;padding:0 1em;color:#222}}\
         code{{font-size:1.4em}}</style></head><body><h1>jobgate login</h1>\
         <p>A <code>jobgate login</code> command asks for an agent token for your account. Continue only if you \
         ran it yourself and it shows this code:</p><p><code>{code}</code></p>\
         <form method=\"post\" action=\"/device\" data-jobgate-confirm><input type=\"hidden\" name=\"code\" value=\"{code}\">\
         <button type=\"submit\">Sign in and issue the token</button></form></body></html>\n"
    );
    let mut response = Response::new(RelayBody::Full(Some(Bytes::from(body))));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Never framed: a framing page could click the button for the user.
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    response
}

/// The IdP does not answer: new logins wait (503), logged-in browsers go on.
pub(crate) fn idp_unavailable(issuer: &str) -> Response<RelayBody> {
    let mut response = page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Sign-in unavailable",
        &format!(
            "The site's sign-in service ({issuer}) does not answer, so new logins cannot start. \
             Browsers already signed in keep working. Try again in a few minutes."
        ),
        &[],
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
    response
}

/// A refusal of a login step (bad or stale ticket, state, callback...).
pub(crate) fn refused(status: StatusCode, text: &str) -> Response<RelayBody> {
    page(status, "Sign-in refused", text, &[])
}
