//! Owner-only sessions through the site's single sign-on (OpenID Connect).
//!
//! The relay is one OIDC client whose only redirect URI is
//! `https://login.<domain>/callback` (the Pomerium / Cloudflare Access pattern):
//!
//! 1. A browser without a pass for `https://<name>.<domain>/p` is sent to
//!    `https://login.<domain>/start?name=<name>&path=/p`: a session *name* and a path,
//!    never a URL, so the login host cannot be made an open redirect.
//! 2. The login host sends it to the IdP (code flow, PKCE S256, state, nonce; the pending
//!    login is bound to the browser by a cookie), verifies the ID token on the callback
//!    and keeps a login (cookie `__Host-jobgate-login`, on the login host only).
//! 3. It hands the browser a single-use ticket (60 s) for
//!    `https://<name>.<domain>/__jobgate/ticket`, where the relay sets the host-only pass
//!    cookie `__Host-jobgate-sso` (Secure, HttpOnly, SameSite=Lax) and sends the browser
//!    back to `/p`. No cookie is ever scoped to the parent domain: job apps serve
//!    arbitrary HTML and could read or toss such cookies for their siblings.
//! 4. Each request of an `owner` session: the pass is looked up by its hash; the signed-in
//!    user must be the session's owner (its token's user), or named by `--share` /
//!    `--share-group`; else 403 saying who is signed in and whose session it is. Scripts
//!    of the owner send their agent token as `Authorization: Bearer`.
//!
//! Logins, passes, tickets and pending logins live in memory (bounded, with expiries):
//! a relay restart signs everybody out, never in.

mod device;
mod gate;
pub mod idp;
pub mod idp_http;
mod login;
mod pages;
mod sessions;
pub mod store;

pub(crate) use device::{serve_command, COMMAND_PATHS};
pub(crate) use gate::{gate, gate_for, Guarded};
pub(crate) use login::serve_login_host;

use crate::names::SessionName;
use crate::RelayConfig;
use idp::{Idp, IdpSettings, SignedIn};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::Store;

/// Cookie of a login, on `login.<domain>` only.
pub const LOGIN_COOKIE: &str = "__Host-jobgate-login";
/// Cookie of a pass to one session, on that session's host only.
pub const PASS_COOKIE: &str = "__Host-jobgate-sso";
/// Cookie that binds pending logins to the browser that started them (on the login
/// host): a callback carrying someone else's code and state is refused.
pub const BIND_COOKIE: &str = "__Host-jobgate-bind";
/// Path prefix the relay answers itself on an `owner` session's host.
pub const RELAY_PATHS: &str = "/__jobgate/";

/// How long a browser has to come back from the IdP.
pub const PENDING_LOGIN_TTL: Duration = Duration::from_secs(10 * 60);
/// Most logins waiting for their callback; more get a 503 (a flood of /start).
pub const MAX_PENDING_LOGINS: usize = 10_000;
/// How long a ticket from the login host may wait to be redeemed: one redirect.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Most tickets outstanding at once.
pub const MAX_TICKETS: usize = 10_000;
/// How long a login lasts (a working day and a half); its passes end with it.
pub const LOGIN_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most logins at once.
pub const MAX_LOGINS: usize = 100_000;
/// Most passes (one per browser and session) at once.
pub const MAX_PASSES: usize = 400_000;
/// Most groups kept from an ID token.
pub const MAX_GROUPS: usize = 256;
/// Longest path a login may return to.
pub const MAX_RETURN_PATH: usize = 4096;
/// Random bytes in every sign-on secret (tickets, cookies, binding): 256 bits.
pub const SECRET_BYTES: usize = 32;

/// Where a login goes back to: a session and a path on its host.
#[derive(Clone)]
pub(crate) struct Target {
    pub name: SessionName,
    pub path: String,
}

/// What a login is for.
#[derive(Clone)]
pub(crate) enum Goal {
    /// Open a session's page.
    Session(Target),
    /// Mint a token for a `jobgate login`.
    Device(Arc<device::Device>),
    /// Show the user's sessions (`https://login.<domain>/`).
    Sessions,
}

/// A login waiting for its callback.
#[derive(Clone)]
pub(crate) struct Pending {
    verifier: String,
    nonce: openidconnect::Nonce,
    bind: [u8; 32],
    goal: Goal,
}

/// A login: who, and its own key (its passes name it, so logout ends them all).
#[derive(Clone)]
pub(crate) struct Login {
    who: Arc<SignedIn>,
    key: [u8; 32],
    expires: Instant,
}

/// A ticket from the login host to one session's host.
#[derive(Clone)]
pub(crate) struct Ticket {
    target: Target,
    login: Login,
}

/// A pass: this browser may be who it says on this session's host.
#[derive(Clone)]
pub(crate) struct Pass {
    name: SessionName,
    who: Arc<SignedIn>,
    login: [u8; 32],
}

/// The relay's sign-on: its IdP client and its in-memory stores.
pub struct SignOn {
    idp: Idp,
    /// `login.<domain>`, lower-case.
    login_host: String,
    /// `https://login.<domain>[:port]`.
    login_origin: String,
    pending: Store<Pending>,
    tickets: Store<Ticket>,
    logins: Store<Login>,
    passes: Store<Pass>,
    /// `jobgate login`s by their poll secret, and by their user code.
    devices: Store<Arc<device::Device>>,
    device_codes: Store<Arc<device::Device>>,
}

impl SignOn {
    /// Sign-on as `config` sets it up, or `None` without `oidc_issuer`.
    pub fn from_config(config: &RelayConfig) -> Result<Option<Self>, String> {
        let (Some(issuer), Some(client_id), Some(secret_file)) = (
            &config.oidc_issuer,
            &config.oidc_client_id,
            &config.oidc_client_secret_file,
        ) else {
            return Ok(None);
        };
        let secret = std::fs::read_to_string(secret_file)
            .map_err(|e| format!("cannot read {}: {e}", secret_file.display()))?
            .trim()
            .to_owned();
        if secret.is_empty() {
            return Err(format!("{} holds no client secret", secret_file.display()));
        }
        let http = idp_http::IdpHttp::new(config.oidc_ca.as_deref()).map_err(|e| e.to_string())?;
        let login_origin = config.session_origin("login");
        let idp = Idp::new(
            IdpSettings {
                issuer: issuer.clone(),
                client_id: client_id.clone(),
                secret,
                redirect: format!("{login_origin}/callback"),
                username_claim: config.oidc_username_claim.clone(),
                groups_claim: config.oidc_groups_claim.clone(),
            },
            http,
        )?;
        Ok(Some(Self {
            idp,
            login_host: config.login_host(),
            login_origin,
            pending: Store::new(MAX_PENDING_LOGINS),
            tickets: Store::new(MAX_TICKETS),
            logins: Store::new(MAX_LOGINS),
            passes: Store::new(MAX_PASSES),
            devices: Store::new(MAX_PENDING_LOGINS),
            device_codes: Store::new(MAX_PENDING_LOGINS),
        }))
    }

    /// Whether `host` (a `Host` value, perhaps with a port) is the login host.
    pub fn is_login_host(&self, host: &[u8]) -> bool {
        let bare = match host.iter().rposition(|b| *b == b':') {
            Some(colon) if !host.ends_with(b"]") => &host[..colon],
            _ => host,
        };
        let bare = bare.strip_suffix(b".").unwrap_or(bare);
        bare.eq_ignore_ascii_case(self.login_host.as_bytes())
    }

    /// Ends the login whose key is `login` and every pass it gave.
    fn end_login(&self, login: &[u8; 32]) {
        self.logins.remove(login);
        self.passes.retain(|pass| &pass.login != login);
    }
}

/// Whether `who` may use the session of `owner` shared with `shares`.
pub(crate) fn allowed(who: &SignedIn, owner: &str, shares: &jobgate_protocol::Shares) -> bool {
    who.user == owner
        || shares.users.contains(&who.user)
        || shares.groups.iter().any(|g| who.groups.contains(g))
}

/// A user name jobgate accepts (the same rule as the tokens file's).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// The value of cookie `name` in the request's `Cookie` header(s), without copying.
pub(crate) fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (n, value) = pair.trim().split_once('=')?;
            (n == name).then_some(value)
        })
}

/// A `Set-Cookie` value for a host-only cookie (`__Host-`: Secure, Path=/, no Domain).
fn set_cookie(name: &str, value: &str, max_age: Option<Duration>) -> String {
    let age = max_age.map_or(String::new(), |age| format!("; Max-Age={}", age.as_secs()));
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax{age}")
}

/// A fresh sign-on secret.
fn secret() -> String {
    crate::names::random_secret(SECRET_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_is_never_a_session_name() {
        assert!(SessionName::parse(b"login").is_none());
    }

    #[test]
    fn owner_shares_and_groups_decide() {
        let who = SignedIn {
            user: "bob".into(),
            groups: vec!["physics".into()],
        };
        let none = jobgate_protocol::Shares::default();
        assert!(!allowed(&who, "alice", &none));
        assert!(allowed(&who, "bob", &none));
        let users = jobgate_protocol::Shares {
            users: vec!["bob".into()],
            groups: vec![],
        };
        assert!(allowed(&who, "alice", &users));
        let groups = jobgate_protocol::Shares {
            users: vec![],
            groups: vec!["physics".into()],
        };
        assert!(allowed(&who, "alice", &groups));
        let other = jobgate_protocol::Shares {
            users: vec!["bobby".into()],
            groups: vec!["chemistry".into()],
        };
        assert!(!allowed(&who, "alice", &other));
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::COOKIE,
            http::HeaderValue::from_static("a=1; __Host-jobgate-sso-x=2; __Host-jobgate-sso=3"),
        );
        assert_eq!(cookie(&headers, PASS_COOKIE), Some("3"));
        assert_eq!(cookie(&headers, LOGIN_COOKIE), None);
    }
}
