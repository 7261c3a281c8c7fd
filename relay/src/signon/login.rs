//! `https://login.<domain>`: `/` (the user's sessions, after sign-in), `/start` (send the
//! browser to the IdP, or straight back with a ticket if it is signed in), `/callback`
//! (the IdP's answer), `/__jobgate/logout`.

use super::idp::IdpError;
use super::store::key_of;
use super::{
    cookie, pages, secret, set_cookie, Goal, Login, Pending, SignOn, Target, Ticket, BIND_COOKIE,
    LOGIN_COOKIE, LOGIN_TTL, MAX_RETURN_PATH, PENDING_LOGIN_TTL, TICKET_TTL,
};
use crate::body::RelayBody;
use crate::names::SessionName;
use crate::Shared;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use subtle::ConstantTimeEq;

/// Serves a request for the login host.
pub(crate) async fn serve_login_host(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
) -> Response<RelayBody> {
    let Some(signon) = &shared.signon else {
        return crate::pages::Page::NotASession.render(req.headers());
    };
    let post = req.method() == Method::POST;
    if let Some(rest) = req.uri().path().strip_prefix(super::COMMAND_PATHS) {
        return super::serve_command(signon, rest, post, req.headers());
    }
    if req.uri().path() == "/device" && post {
        return confirm_device(shared, signon, req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return pages::refused(
            StatusCode::METHOD_NOT_ALLOWED,
            "The sign-in pages take GET only.",
        );
    }
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    match req.uri().path() {
        "/" => my_sessions(shared, signon, req.headers()).await,
        "/start" => start(signon, req.headers(), &query).await,
        "/callback" => callback(shared, signon, req.headers(), &query).await,
        "/device" => super::device::confirm_page(signon, query.get("code")),
        "/__jobgate/logout" => {
            if let Some(login) = cookie(req.headers(), LOGIN_COOKIE)
                .and_then(|value| signon.logins.get(&key_of(value)))
            {
                signon.end_login(&login.key);
            }
            super::gate::signed_out(LOGIN_COOKIE)
        }
        _ => pages::page(
            StatusCode::NOT_FOUND,
            "jobgate sign-in",
            "This is the sign-in host of a jobgate relay: open your session's address to sign in.",
            &[],
        ),
    }
}

/// The session and path a login returns to, checked: a session name and a plain
/// absolute path, never a URL (no open redirect).
fn target(query: &HashMap<String, String>) -> Option<Target> {
    let name = SessionName::parse(query.get("name")?.as_bytes())?;
    let path = query.get("path").map_or("/", String::as_str);
    let plain = path.starts_with('/')
        && !path.starts_with("//")
        && !path.starts_with("/\\")
        && path.len() <= MAX_RETURN_PATH
        && path.bytes().all(|b| b.is_ascii_graphic());
    plain.then(|| Target {
        name,
        path: path.to_owned(),
    })
}

async fn start(
    signon: &SignOn,
    headers: &http::HeaderMap,
    query: &HashMap<String, String>,
) -> Response<RelayBody> {
    let Some(target) = target(query) else {
        return pages::refused(
            StatusCode::BAD_REQUEST,
            "This sign-in link does not lead to a jobgate session of this relay.",
        );
    };
    let switch = query.get("switch").is_some_and(|v| v == "1");
    if let Some(login) = cookie(headers, LOGIN_COOKIE)
        .and_then(|value| signon.logins.get(&key_of(value)))
        .filter(|_| !switch)
    {
        return hand_over_to(signon, target, login, Vec::new());
    }
    send_to_idp(signon, headers, Goal::Session(target), switch).await
}

/// Starts a login at the IdP for `goal`, bound to this browser.
async fn send_to_idp(
    signon: &SignOn,
    headers: &http::HeaderMap,
    goal: Goal,
    ask_again: bool,
) -> Response<RelayBody> {
    let started = match signon.idp.start(ask_again).await {
        Ok(started) => started,
        Err(e) => {
            tracing::warn!(issuer = signon.idp.issuer(), "sign-in cannot start: {e}");
            return pages::idp_unavailable(signon.idp.issuer());
        }
    };
    // One binding secret per browser, reused by its concurrent logins.
    let (bind, new_bind) = match cookie(headers, BIND_COOKIE).filter(|b| b.len() >= 32) {
        Some(existing) => (existing.to_owned(), None),
        None => {
            let fresh = secret();
            (fresh.clone(), Some(fresh))
        }
    };
    let pending = Pending {
        verifier: started.verifier.secret().clone(),
        nonce: started.nonce,
        bind: key_of(&bind),
        goal,
    };
    if signon
        .pending
        .insert(&started.state, Instant::now() + PENDING_LOGIN_TTL, pending)
        .is_err()
    {
        return pages::refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many sign-ins are in progress on this relay: try again in a minute.",
        );
    }
    let cookies: Vec<String> = new_bind
        .map(|b| set_cookie(BIND_COOKIE, &b, Some(PENDING_LOGIN_TTL)))
        .into_iter()
        .collect();
    pages::redirect(&started.url, &cookies)
}

async fn callback(
    shared: &Arc<Shared>,
    signon: &SignOn,
    headers: &http::HeaderMap,
    query: &HashMap<String, String>,
) -> Response<RelayBody> {
    let pending = query
        .get("state")
        .and_then(|state| signon.pending.take(state));
    let Some(pending) = pending else {
        return pages::refused(
            StatusCode::BAD_REQUEST,
            "No sign-in is waiting for this answer (it expired, was used already, or was not started here). Open your session's address again.",
        );
    };
    let bound = cookie(headers, BIND_COOKIE)
        .is_some_and(|bind| bool::from(key_of(bind).ct_eq(&pending.bind)));
    if !bound {
        return pages::refused(
            StatusCode::BAD_REQUEST,
            "This sign-in was started in another browser. Open your session's address again here.",
        );
    }
    if let Some(error) = query.get("error") {
        let error: String = error
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(64)
            .collect();
        return pages::refused(
            StatusCode::FORBIDDEN,
            &format!("The sign-in service refused the login ({error})."),
        );
    }
    let Some(code) = query.get("code") else {
        return pages::refused(StatusCode::BAD_REQUEST, "The sign-in service sent no code.");
    };
    let verifier = openidconnect::PkceCodeVerifier::new(pending.verifier);
    let who = match signon
        .idp
        .finish(code.clone(), verifier, &pending.nonce)
        .await
    {
        Ok(who) => who,
        Err(IdpError::Unavailable(e)) => {
            tracing::warn!(issuer = signon.idp.issuer(), "sign-in cannot finish: {e}");
            return pages::idp_unavailable(signon.idp.issuer());
        }
        Err(IdpError::Rejected(e)) => {
            tracing::info!("sign-in refused: {e}");
            return pages::refused(
                StatusCode::FORBIDDEN,
                &format!("The sign-in could not be accepted: {e}."),
            );
        }
    };
    tracing::info!(user = %who.user, "signed in");
    let value = secret();
    let login = Login {
        who: Arc::new(who),
        key: key_of(&value),
        expires: Instant::now() + LOGIN_TTL,
    };
    if signon
        .logins
        .insert(&value, login.expires, login.clone())
        .is_err()
    {
        return pages::refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "The relay holds too many logins right now: try again later.",
        );
    }
    let cookie = set_cookie(LOGIN_COOKIE, &value, Some(LOGIN_TTL));
    match pending.goal {
        Goal::Session(target) => hand_over_to(signon, target, login, vec![cookie]),
        Goal::Sessions => pages::redirect(&format!("{}/", signon.login_origin), &[cookie]),
        Goal::Device(device) => {
            let mut response = super::device::mint(shared, &device, &login.who.user).await;
            if let Ok(value) = http::HeaderValue::from_str(&cookie) {
                response
                    .headers_mut()
                    .append(http::header::SET_COOKIE, value);
            }
            response
        }
    }
}

/// `GET /`: the signed-in user's sessions; a browser not signed in goes through the
/// site's sign-in first and comes back here.
async fn my_sessions(
    shared: &Arc<Shared>,
    signon: &SignOn,
    headers: &http::HeaderMap,
) -> Response<RelayBody> {
    match cookie(headers, LOGIN_COOKIE).and_then(|value| signon.logins.get(&key_of(value))) {
        Some(login) => super::sessions::page(shared, &login.who.user),
        None => send_to_idp(signon, headers, Goal::Sessions, false).await,
    }
}

/// Sends a signed-in browser to its session's host with a fresh ticket.
fn hand_over_to(
    signon: &SignOn,
    target: Target,
    login: Login,
    cookies: Vec<String>,
) -> Response<RelayBody> {
    let ticket = secret();
    let origin = signon
        .login_origin
        .replacen("://login.", &format!("://{}.", target.name), 1);
    let entry = Ticket { target, login };
    if signon
        .tickets
        .insert(&ticket, Instant::now() + TICKET_TTL, entry)
        .is_err()
    {
        return pages::refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many sign-ins are in progress on this relay: try again in a minute.",
        );
    }
    pages::redirect(&format!("{origin}/__jobgate/ticket?t={ticket}"), &cookies)
}

/// Longest form body the login host reads (a code).
const MAX_FORM_BYTES: usize = 4096;

/// `POST /device`: the user confirmed a `jobgate login` code; same-origin only.
async fn confirm_device(
    shared: &Arc<Shared>,
    signon: &SignOn,
    req: Request<Incoming>,
) -> Response<RelayBody> {
    let same_origin = req.headers().get(http::header::ORIGIN).is_some_and(|o| {
        o.as_bytes()
            .eq_ignore_ascii_case(signon.login_origin.as_bytes())
    });
    if !same_origin {
        return crate::pages::Page::ForeignOrigin.render(req.headers());
    }
    let (parts, body) = req.into_parts();
    let Ok(body) = Limited::new(body, MAX_FORM_BYTES).collect().await else {
        return pages::refused(StatusCode::BAD_REQUEST, "The form could not be read.");
    };
    let body = body.to_bytes();
    let code = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let Some(device) = super::device::device_for(signon, &code) else {
        return pages::refused(
            StatusCode::NOT_FOUND,
            "This jobgate login code is unknown or expired: run jobgate login again.",
        );
    };
    if let Some(login) =
        cookie(&parts.headers, LOGIN_COOKIE).and_then(|value| signon.logins.get(&key_of(value)))
    {
        return super::device::mint(shared, &device, &login.who.user).await;
    }
    send_to_idp(signon, &parts.headers, Goal::Device(device), false).await
}
