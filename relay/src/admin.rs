//! The admin API, on the admin listener (`--listen-metrics`) beside `/metrics`, never on
//! the public HTTPS port: who is connected, from which job, how much traffic, and closing
//! one session without restarting the relay.
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/sessions[?user=U]` | every session (live and parked), JSON |
//! | `GET /api/sessions/<name>` | one session, or `404` |
//! | `DELETE /api/sessions/<name>` | closes it for good (the agent is told and exits), or `404` |
//! | `GET /api/users` | per user: live and parked sessions, the limit |
//!
//! Every call needs `Authorization: Bearer <admin token>`; the token is in the file given
//! with `--admin-token-file` (made with a fresh random token, 0600, if missing). Without
//! that flag the API is off (`404`). A missing or wrong token gets `401` and nothing else.
//! No key, cookie, ticket or token ever appears in an answer.

use crate::names::SessionName;
use crate::routes::Session;
use crate::Shared;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use jobgate_protocol::CloseCode;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use thiserror::Error;

/// Random bytes in a minted admin token (256 bits).
const ADMIN_TOKEN_BYTES: usize = 32;
/// Prefix of every admin API path.
pub(crate) const API_PREFIX: &str = "/api/";

/// Why the admin token file cannot be used.
#[derive(Debug, Error)]
pub enum AdminTokenError {
    /// It cannot be read or created.
    #[error("admin token file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Group or others may read it.
    #[error(
        "admin token file {path} is readable by group or others (mode {mode:o}): chmod 600 it"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// It holds no token.
    #[error("admin token file {path} is empty: delete it and the relay makes a new one")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The admin token's SHA-256 (the token itself is not kept in memory).
pub struct AdminKey {
    sha256: [u8; 32],
}

impl AdminKey {
    /// Reads the token from `path`, or mints one there (0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, AdminTokenError> {
        let io = |source| AdminTokenError::Io {
            path: path.to_owned(),
            source,
        };
        let token = match jobgate_files::loose_bits(path, jobgate_files::GROUP_OR_OTHER) {
            Ok(Some(mode)) => {
                return Err(AdminTokenError::Exposed {
                    path: path.to_owned(),
                    mode,
                })
            }
            Ok(None) => std::fs::read_to_string(path).map_err(io)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = crate::names::random_secret(ADMIN_TOKEN_BYTES);
                jobgate_files::write_atomically(path, format!("{token}\n").as_bytes())
                    .map_err(io)?;
                tracing::info!(file = %path.display(), "minted a new admin token");
                token
            }
            Err(e) => return Err(io(e)),
        };
        let token = token.trim();
        if token.is_empty() {
            return Err(AdminTokenError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            sha256: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Whether `Authorization: Bearer <token>` carries the admin token (constant time).
    fn admits(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(token) = authorization
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        bool::from(presented.ct_eq(&self.sha256))
    }
}

/// This relay's node id, in a cluster.
fn node_id(shared: &Shared) -> Option<String> {
    Some(shared.cluster.as_ref()?.node.node_id().to_owned())
}

/// One session as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct SessionInfo {
    /// The session's name (the first label of its URL).
    pub name: String,
    /// Its URL (without any key).
    pub url: String,
    /// The user whose token opened it.
    pub user: String,
    /// `live`, or `parked` (agent gone, waiting for it to resume).
    pub state: &'static str,
    /// The batch job's id, as the agent reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The node the agent runs on, as it reported it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The agent's address as the relay sees it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_addr: Option<String>,
    /// How the agent is connected: `quic`, or `tcp` (TLS over TCP where UDP is blocked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<&'static str>,
    /// `link` or `public`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access: Option<&'static str>,
    /// In a cluster: the node id of the relay that holds the session (this one, for every
    /// session it lists).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// Seconds since the session opened (for a parked one: seconds left of its grace).
    pub seconds: u64,
    /// Bytes received from the agent (on the wire: UDP payloads, or TLS bytes on TCP).
    pub bytes_in: u64,
    /// Bytes sent to the agent.
    pub bytes_out: u64,
    /// Requests forwarded.
    pub requests: u64,
    /// Requests waiting for their answer now.
    pub in_flight: usize,
    /// WebSockets open now.
    pub websockets: usize,
}

impl SessionInfo {
    fn live(shared: &Shared, session: &Session) -> Self {
        let (bytes_in, bytes_out) = session.connection.bytes();
        Self {
            name: session.name.to_string(),
            url: shared.config.session_url(session.name.as_str()),
            user: session.user.clone(),
            state: "live",
            job_id: session.job.id.clone(),
            node: session.job.host.clone(),
            agent_addr: Some(session.agent_addr.to_string()),
            transport: Some(session.connection.kind().as_str()),
            access: Some(crate::agents::access_word(session.access)),
            relay: node_id(shared),
            seconds: session.opened.elapsed().as_secs(),
            bytes_in,
            bytes_out,
            requests: session.requests.load(Ordering::Relaxed),
            in_flight: session.in_flight.load(Ordering::Relaxed),
            websockets: session.websockets.load(Ordering::Relaxed),
        }
    }

    fn parked(shared: &Shared, name: SessionName, parked: &crate::routes::Parked) -> Self {
        Self {
            name: name.to_string(),
            url: shared.config.session_url(name.as_str()),
            user: parked.user.clone(),
            state: "parked",
            job_id: None,
            node: None,
            agent_addr: None,
            transport: None,
            access: None,
            relay: node_id(shared),
            seconds: parked
                .until
                .saturating_duration_since(std::time::Instant::now())
                .as_secs(),
            bytes_in: 0,
            bytes_out: 0,
            requests: 0,
            in_flight: 0,
            websockets: 0,
        }
    }
}

/// One user as `GET /api/users` shows them.
#[derive(Debug, Serialize)]
pub struct UserInfo {
    /// The user.
    pub user: String,
    /// Live sessions.
    pub live: usize,
    /// Parked sessions (agent reconnecting).
    pub parked: usize,
    /// The most live and parked sessions this user may hold.
    pub max_sessions: usize,
    /// Whether the user has a token now.
    pub has_token: bool,
}

type AdminResponse = Response<Full<Bytes>>;

/// Answers one `/api/...` request on the admin listener.
pub(crate) fn answer<B>(shared: &Arc<Shared>, req: &Request<B>) -> AdminResponse {
    let Some(key) = &shared.admin else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    if !key.admits(req.headers().get(header::AUTHORIZATION)) {
        let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"jobgate admin\""),
        );
        return response;
    }
    let path = req.uri().path();
    let rest = path.strip_prefix(API_PREFIX).unwrap_or("");
    match (req.method(), rest) {
        (&Method::GET, "sessions") => {
            let user = query_value(req.uri().query(), "user");
            json(StatusCode::OK, &sessions(shared, user.as_deref()))
        }
        (&Method::GET, "users") => json(StatusCode::OK, &users(shared)),
        (method, rest) if rest.starts_with("sessions/") => {
            let label = &rest["sessions/".len()..];
            let Some(name) = SessionName::parse(label.as_bytes()) else {
                return text(StatusCode::NOT_FOUND, "no such session\n");
            };
            match *method {
                Method::GET => match session_info(shared, &name) {
                    Some(info) => json(StatusCode::OK, &info),
                    None => text(StatusCode::NOT_FOUND, "no such session\n"),
                },
                Method::DELETE => close_session(shared, &name),
                _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or DELETE\n"),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /api/sessions, /api/sessions/<name>, /api/users\n",
        ),
    }
}

/// Every session, live first, then parked, each sorted by name; only `user`'s if given.
fn sessions(shared: &Shared, user: Option<&str>) -> Vec<SessionInfo> {
    let mine = |u: &str| user.is_none_or(|wanted| wanted == u);
    let mut list: Vec<SessionInfo> = shared
        .routes
        .all()
        .iter()
        .filter(|s| mine(&s.user))
        .map(|s| SessionInfo::live(shared, s))
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let mut parked: Vec<SessionInfo> = shared
        .routes
        .parked()
        .into_iter()
        .filter(|(_, p)| mine(&p.user))
        .map(|(name, p)| SessionInfo::parked(shared, name, &p))
        .collect();
    parked.sort_by(|a, b| a.name.cmp(&b.name));
    list.extend(parked);
    list
}

fn session_info(shared: &Shared, name: &SessionName) -> Option<SessionInfo> {
    if let Some(session) = shared.routes.get(name) {
        return Some(SessionInfo::live(shared, &session));
    }
    shared
        .routes
        .parked()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(n, p)| SessionInfo::parked(shared, n, &p))
}

fn users(shared: &Shared) -> Vec<UserInfo> {
    let mut by_user: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for session in shared.routes.all() {
        by_user.entry(session.user.clone()).or_default().0 += 1;
    }
    for (_, parked) in shared.routes.parked() {
        by_user.entry(parked.user).or_default().1 += 1;
    }
    for user in shared.tokens.users() {
        by_user.entry(user).or_default();
    }
    by_user
        .into_iter()
        .map(|(user, (live, parked))| UserInfo {
            max_sessions: shared
                .tokens
                .max_sessions_of(&user)
                .unwrap_or(shared.config.max_sessions_per_user),
            has_token: shared.tokens.has_user(&user),
            user,
            live,
            parked,
        })
        .collect()
}

/// Ends a session for good: a live one's agent is told (`ClosedByAdmin`) and exits; a
/// parked one is dropped. No resume brings it back.
fn close_session(shared: &Arc<Shared>, name: &SessionName) -> AdminResponse {
    if let Some(session) = shared.routes.get(name) {
        tracing::info!(name = %session.name, user = %session.user, "closed by an admin");
        session.revoked.store(true, Ordering::Relaxed);
        session
            .connection
            .close(CloseCode::ClosedByAdmin, b"closed by the relay's admin");
        return json(
            StatusCode::OK,
            &serde_json::json!({ "closed": name.as_str() }),
        );
    }
    if shared.routes.end_parked(name) {
        crate::agents::mark_ended(shared, *name);
        crate::state::save_soon(shared);
        tracing::info!(%name, "parked session closed by an admin");
        return json(
            StatusCode::OK,
            &serde_json::json!({ "closed": name.as_str() }),
        );
    }
    text(StatusCode::NOT_FOUND, "no such session\n")
}

/// The value of `key` in a query string (no percent-decoding: user names are plain).
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> AdminResponse {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> AdminResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_is_minted_private_and_checked_in_constant_time() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("jobgate-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("admin.token");
        let _ = std::fs::remove_file(&path);
        let key = AdminKey::load_or_create(&path).expect("minted");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = std::fs::read_to_string(&path).expect("read");
        let bearer = HeaderValue::from_str(&format!("Bearer {}", token.trim())).expect("value");
        assert!(key.admits(Some(&bearer)));
        assert!(!key.admits(Some(&HeaderValue::from_static("Bearer wrong"))));
        assert!(!key.admits(None));
        // The same file gives the same key.
        let again = AdminKey::load_or_create(&path).expect("reloaded");
        assert!(again.admits(Some(&bearer)));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            AdminKey::load_or_create(&path),
            Err(AdminTokenError::Exposed { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn query_values() {
        assert_eq!(
            query_value(Some("user=alice"), "user").as_deref(),
            Some("alice")
        );
        assert_eq!(
            query_value(Some("a=1&user=bob"), "user").as_deref(),
            Some("bob")
        );
        assert_eq!(query_value(Some("username=x"), "user"), None);
        assert_eq!(query_value(None, "user"), None);
    }
}
