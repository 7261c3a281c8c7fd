//! The gate of an `owner` session's host: the pass cookie (or the owner's bearer token)
//! on each request, and the relay's own `/__jobgate/` paths (ticket, logout).

use super::{allowed, cookie, pages, secret, set_cookie, Pass, SignOn, PASS_COOKIE, RELAY_PATHS};
use crate::access::Decision;
use crate::names::SessionName;
use crate::routes::Session;
use crate::Shared;
use http::{header, request::Parts, HeaderValue, StatusCode};
use std::time::Instant;

/// What the gate lets in: the owner of a name, and whom it is shared with.
pub(crate) struct Guarded<'a> {
    /// The session's name.
    pub name: SessionName,
    /// Its owner.
    pub user: &'a str,
    /// Whom it is shared with.
    pub shares: &'a jobgate_protocol::Shares,
    /// Its web origin.
    pub origin: &'a str,
}

/// Checks a request of the `owner` session `session`; strips what it used.
pub(crate) fn gate(shared: &Shared, session: &Session, parts: &mut Parts) -> Decision {
    let guarded = Guarded {
        name: session.name,
        user: &session.user,
        shares: &session.shares,
        origin: &session.origin,
    };
    gate_for(shared, &guarded, parts)
}

/// [`gate`] for a name that has no session yet (a reservation's page): the same sign-in,
/// passes and relay paths.
pub(crate) fn gate_for(shared: &Shared, session: &Guarded<'_>, parts: &mut Parts) -> Decision {
    let Some(signon) = &shared.signon else {
        return Decision::Answer(pages::refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "This session is for its owner only, but this relay has no sign-on configured.",
        ));
    };
    if let Some(rest) = parts.uri.path().strip_prefix(RELAY_PATHS) {
        return Decision::Answer(relay_path(signon, session, rest, parts));
    }
    if owner_bearer(shared, session, parts) {
        return Decision::Forward;
    }
    let pass = cookie(&parts.headers, PASS_COOKIE)
        .and_then(|value| signon.passes.get(&super::store::key_of(value)))
        .filter(|pass| pass.name == session.name);
    let Some(pass) = pass else {
        return Decision::Answer(sign_in(signon, session, parts));
    };
    if !allowed(&pass.who, session.user, session.shares) {
        return Decision::Answer(not_yours(&pass.who.user, session.user));
    }
    if !crate::access::sent_by_own_page(parts, session.origin) {
        return Decision::Answer(crate::pages::Page::ForeignOrigin.render(&parts.headers));
    }
    strip_cookie(&mut parts.headers, PASS_COOKIE);
    Decision::Forward
}

/// `Authorization: Bearer <agent token>` of the session's own user: scripts of the owner.
/// Stripped before the app; any other `Authorization` is the app's business.
fn owner_bearer(shared: &Shared, session: &Guarded<'_>, parts: &mut Parts) -> bool {
    let Some(token) = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let owner = shared
        .tokens
        .verify(token.trim())
        .is_some_and(|identity| identity.user == session.user);
    if owner {
        parts.headers.remove(header::AUTHORIZATION);
    }
    owner
}

/// No pass: a browser navigation goes to the login host; anything else gets 401.
fn sign_in(
    signon: &SignOn,
    session: &Guarded<'_>,
    parts: &Parts,
) -> http::Response<crate::body::RelayBody> {
    if !crate::access::is_navigation(parts) {
        return pages::page(
            StatusCode::UNAUTHORIZED,
            "Sign-in required",
            "This session is for its owner only. Open it in a browser to sign in, or send the owner's agent token as Authorization: Bearer.",
            &[],
        );
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!(
        "{}/start?name={}&path={}",
        signon.login_origin,
        session.name,
        url::form_urlencoded::byte_serialize(path.as_bytes()).collect::<String>()
    );
    pages::redirect(&location, &[])
}

/// 403: signed in, but not as someone this session is for.
fn not_yours(who: &str, owner: &str) -> http::Response<crate::body::RelayBody> {
    pages::page(
        StatusCode::FORBIDDEN,
        "Not your session",
        &format!(
            "You are signed in as {who}. This session belongs to {owner}, who has not shared it with you."
        ),
        &[
            ("/__jobgate/switch", "Sign in as someone else"),
            ("/__jobgate/logout", "Sign out"),
        ],
    )
}

/// `/__jobgate/ticket?t=...` and `/__jobgate/logout`.
fn relay_path(
    signon: &SignOn,
    session: &Guarded<'_>,
    rest: &str,
    parts: &Parts,
) -> http::Response<crate::body::RelayBody> {
    match rest {
        "ticket" => redeem(signon, session, parts),
        // Another account: end this login, then a login at the IdP that asks again (the
        // IdP's own session would otherwise sign the same user straight back in).
        "switch" => {
            if let Some(pass) = cookie(&parts.headers, PASS_COOKIE)
                .and_then(|value| signon.passes.get(&super::store::key_of(value)))
            {
                signon.end_login(&pass.login);
            }
            let location = format!(
                "{}/start?name={}&path=%2F&switch=1",
                signon.login_origin, session.name
            );
            pages::redirect(
                &location,
                &[set_cookie(PASS_COOKIE, "", Some(std::time::Duration::ZERO))],
            )
        }
        "logout" => {
            if let Some(pass) = cookie(&parts.headers, PASS_COOKIE)
                .and_then(|value| signon.passes.get(&super::store::key_of(value)))
            {
                signon.end_login(&pass.login);
            }
            signed_out(PASS_COOKIE)
        }
        _ => pages::refused(StatusCode::NOT_FOUND, "No such jobgate page."),
    }
}

/// The page after a logout, clearing `cookie_name`.
pub(super) fn signed_out(cookie_name: &str) -> http::Response<crate::body::RelayBody> {
    let mut response = pages::page(
        StatusCode::OK,
        "Signed out",
        "You are signed out of jobgate on this browser: every session's pass from this login has ended.",
        &[],
    );
    if let Ok(clear) = HeaderValue::from_str(&set_cookie(
        cookie_name,
        "",
        Some(std::time::Duration::ZERO),
    )) {
        response.headers_mut().append(header::SET_COOKIE, clear);
    }
    response
}

/// A ticket from the login host: single use, this session only, then a pass cookie.
fn redeem(
    signon: &SignOn,
    session: &Guarded<'_>,
    parts: &Parts,
) -> http::Response<crate::body::RelayBody> {
    let ticket = parts
        .uri
        .query()
        .and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "t")
                .map(|(_, v)| v.into_owned())
        })
        .and_then(|t| signon.tickets.take(&t));
    let Some(ticket) = ticket.filter(|t| t.target.name == session.name) else {
        return pages::page(
            StatusCode::BAD_REQUEST,
            "Sign-in link not valid",
            "This sign-in link is not valid here: it was used already, it expired, or it is for another session. Open the session's address again to sign in.",
            &[("/", "Open the session")],
        );
    };
    if ticket.login.expires <= Instant::now() {
        return pages::refused(
            StatusCode::BAD_REQUEST,
            "This login has expired: open the session's address again.",
        );
    }
    let value = secret();
    let pass = Pass {
        name: session.name,
        who: ticket.login.who.clone(),
        login: ticket.login.key,
    };
    if signon
        .passes
        .insert(&value, ticket.login.expires, pass)
        .is_err()
    {
        return pages::refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "The relay holds too many logins right now: try again later.",
        );
    }
    let age = ticket
        .login
        .expires
        .saturating_duration_since(Instant::now());
    pages::redirect(
        &ticket.target.path,
        &[set_cookie(PASS_COOKIE, &value, Some(age))],
    )
}

/// Removes cookie `name` from the request's `Cookie` header(s), keeping the others; a
/// request whose only cookie is ours (the common case) costs no allocation.
fn strip_cookie(headers: &mut http::HeaderMap, name: &str) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if let (Some(only), None) = (values.next(), values.next()) {
        let only_ours = only.to_str().is_ok_and(|text| {
            let text = text.trim().trim_end_matches(';');
            !text.contains(';') && text.split_once('=').is_some_and(|(n, _)| n.trim() == name)
        });
        if only_ours {
            headers.remove(header::COOKIE);
            return;
        }
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut found = false;
    for value in headers.get_all(header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            if pair.split_once('=').is_some_and(|(n, _)| n == name) {
                found = true;
            } else {
                kept.push(pair);
            }
        }
    }
    if !found {
        return;
    }
    let joined = kept.join("; ");
    headers.remove(header::COOKIE);
    if !joined.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&joined) {
            headers.insert(header::COOKIE, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stripped(values: &[&'static str]) -> Vec<String> {
        let mut headers = http::HeaderMap::new();
        for v in values {
            headers.append(header::COOKIE, HeaderValue::from_static(v));
        }
        strip_cookie(&mut headers, PASS_COOKIE);
        headers
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn the_pass_cookie_is_removed_and_the_apps_cookies_kept() {
        assert!(stripped(&["__Host-jobgate-sso=x"]).is_empty());
        assert_eq!(
            stripped(&["_xsrf=1; __Host-jobgate-sso=x; b=2"]),
            ["_xsrf=1; b=2"]
        );
        assert_eq!(stripped(&["__Host-jobgate-sso=x", "a=1"]), ["a=1"]);
        assert_eq!(stripped(&["a=1"]), ["a=1"]);
        assert_eq!(
            stripped(&["__Host-jobgate-sso-other=1"]),
            ["__Host-jobgate-sso-other=1"]
        );
    }
}
