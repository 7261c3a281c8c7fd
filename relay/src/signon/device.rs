//! `jobgate login`: a command on a login node asks the relay for a short code and a URL,
//! the user opens the URL in their own browser, confirms the code and signs in at the
//! IdP, and the relay mints an agent token for that user name, which the command
//! collects by polling with a secret only it knows. The IdP needs no device flow: the
//! relay uses the code flow it already has.
//!
//! * `POST /__jobgate/login/start` (the login host, or any host of the relay that is not a
//!   session) → JSON `{url, code, poll, expires_in}`;
//! * `POST /__jobgate/login/poll` with `Authorization: Bearer <poll>` → `200` and the token
//!   (once), `202` while waiting, `404` when unknown or expired;
//! * `GET https://login.<domain>/device?code=...` → a page showing the code with a button,
//!   `POST` to the same path (same origin only) → sign-in if needed → token minted.
//!
//! Confirming takes a same-origin `POST`, so a link or an image planted by someone else
//! cannot give the victim's token to the planter's command.

use super::store::key_of;
use super::{pages, SignOn, PENDING_LOGIN_TTL};
use crate::body::RelayBody;
use crate::Shared;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Path prefix of the command's endpoints.
pub const COMMAND_PATHS: &str = "/__jobgate/login/";
/// Letters of a user code (no 0/O, 1/I look-alikes): 8 of them, 40 bits, for 10 minutes.
const CODE_ALPHABET: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
/// Characters in a user code (shown as two groups of four).
const CODE_LEN: usize = 8;
/// How often the command is told to poll, in seconds.
pub const POLL_INTERVAL_SECS: u64 = 2;

/// One `jobgate login` waiting for its browser.
pub(crate) struct Device {
    /// The code the user sees in both places, `ABCD-EFGH`.
    pub code: String,
    /// The minted token, until the command collects it.
    token: Mutex<Option<String>>,
}

fn user_code() -> String {
    use rand::Rng;
    let mut rng = rand::rngs::OsRng;
    let letters: String = (0..CODE_LEN)
        .map(|_| CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())] as char)
        .collect();
    format!("{}-{}", &letters[..4], &letters[4..])
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::Full(Some(Bytes::from(value.to_string()))));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The command's endpoints (`rest` follows [`COMMAND_PATHS`]).
pub(crate) fn serve_command(
    signon: &SignOn,
    rest: &str,
    post: bool,
    headers: &HeaderMap,
) -> Response<RelayBody> {
    if !post {
        return pages::refused(
            StatusCode::METHOD_NOT_ALLOWED,
            "jobgate login uses POST here.",
        );
    }
    match rest {
        "start" => start(signon),
        "poll" => poll(signon, headers),
        _ => pages::refused(StatusCode::NOT_FOUND, "No such jobgate page."),
    }
}

fn start(signon: &SignOn) -> Response<RelayBody> {
    let device = Arc::new(Device {
        code: user_code(),
        token: Mutex::new(None),
    });
    let poll = super::secret();
    let until = Instant::now() + PENDING_LOGIN_TTL;
    if signon.devices.insert(&poll, until, device.clone()).is_err()
        || signon
            .device_codes
            .insert(&device.code, until, device.clone())
            .is_err()
    {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "too many logins in progress"}),
        );
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "url": format!("{}/device?code={}", signon.login_origin, device.code),
            "code": device.code,
            "poll": poll,
            "interval": POLL_INTERVAL_SECS,
            "expires_in": PENDING_LOGIN_TTL.as_secs(),
        }),
    )
}

fn poll(signon: &SignOn, headers: &HeaderMap) -> Response<RelayBody> {
    let device = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|poll| signon.devices.get(&key_of(poll.trim())));
    let Some(device) = device else {
        return json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "unknown or expired login: run jobgate login again"}),
        );
    };
    let token = device
        .token
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    match token {
        Some(token) => json(StatusCode::OK, serde_json::json!({"token": token})),
        None => json(
            StatusCode::ACCEPTED,
            serde_json::json!({"status": "waiting for the browser"}),
        ),
    }
}

/// `GET /device?code=`: the confirmation page.
pub(crate) fn confirm_page(signon: &SignOn, code: Option<&String>) -> Response<RelayBody> {
    let Some(device) = code.and_then(|c| signon.device_codes.get(&key_of(c))) else {
        return pages::refused(
            StatusCode::NOT_FOUND,
            "This jobgate login code is unknown or expired: run jobgate login again.",
        );
    };
    pages::confirm(&device.code)
}

/// The device a confirmation names, if it is live.
pub(crate) fn device_for(signon: &SignOn, code: &str) -> Option<Arc<Device>> {
    signon.device_codes.get(&key_of(code))
}

/// Mints `user`'s login token for `device` and tells the browser to go back to the terminal.
pub(crate) async fn mint(shared: &Arc<Shared>, device: &Device, user: &str) -> Response<RelayBody> {
    let Some(ttl) = shared.config.login_token_ttl_secs() else {
        return pages::refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The relay's login_token_ttl is not valid.",
        );
    };
    let path = shared.config.tokens.clone();
    let who = user.to_owned();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let minted = tokio::task::spawn_blocking(move || {
        crate::tokens::TokensFile::update(&path, |file| file.issue_login(&who, ttl, now))
    })
    .await;
    let token = match minted {
        Ok(Ok(token)) => token,
        Ok(Err(crate::tokens::TokensError::BadUser(_))) => {
            return pages::refused(
                StatusCode::FORBIDDEN,
                &format!(
                    "You are signed in as {user}, a name that cannot hold a jobgate token (only letters, digits, '.', '_' and '-'). Ask your admin."
                ),
            );
        }
        Ok(Err(e)) => {
            tracing::warn!(user, "cannot mint a login token: {e}");
            return pages::refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The relay could not write its tokens file.",
            );
        }
        Err(_) => {
            return pages::refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The relay could not mint a token.",
            )
        }
    };
    crate::reload_tokens(shared);
    shared
        .audit
        .record(&crate::audit::AuditEvent::LoginToken { user });
    tracing::info!(user, "jobgate login: token minted");
    *device.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
    pages::page(
        StatusCode::OK,
        "Token issued",
        &format!(
            "An agent token for {user} went to the jobgate login with code {}. Return to your terminal; you can close this page.",
            device.code
        ),
        &[],
    )
}
