//! The routing table: session name → the live agent connection that holds it.
//!
//! An entry is inserted when the relay sends `Welcome` and removed the moment that
//! connection ends. Lookups happen on every request, so they take a read lock and a
//! stack-allocated key, nothing more.

use crate::names::{SessionName, NAME_LEN};
use jobgate_protocol::{AccessMode, JobInfo};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Instant;

/// One live session: a name bound to an agent's connection.
pub struct Session {
    /// The session's name.
    pub name: SessionName,
    /// The user whose token opened it.
    pub user: String,
    /// SHA-256 of the token that opened (or resumed) it, never the token itself: when
    /// the tokens file no longer holds it (re-issued or revoked), the session is closed.
    pub token_sha256: [u8; 32],
    /// What the agent said about its job.
    pub job: JobInfo,
    /// SessionLock mode in force.
    pub access: AccessMode,
    /// The lock that goes with it.
    pub lock: crate::access::SessionLock,
    /// The session's web origin, `https://<name>.<domain>[:port]`: computed once here so
    /// the per-request origin check only compares bytes.
    pub origin: Box<str>,
    /// The agent's connection (QUIC, or TLS/TCP where UDP is blocked): every request
    /// becomes a stream on it.
    pub connection: jobgate_transport::Connection,
    /// The agent's address as seen by the relay.
    pub agent_addr: SocketAddr,
    /// When the session opened.
    pub opened: Instant,
    /// Requests forwarded so far.
    pub requests: std::sync::atomic::AtomicU64,
    /// Requests waiting for their response head (capped by `max_streams_per_agent`).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// WebSockets (upgraded connections) open now.
    pub websockets: std::sync::atomic::AtomicUsize,
    /// Set when the user's token was revoked: the name dies, no resume.
    pub revoked: std::sync::atomic::AtomicBool,
    /// Whom an `owner` session is shared with besides its owner.
    pub shares: jobgate_protocol::Shares,
}

/// A name whose agent vanished without `Bye`: held for the resume grace period.
#[derive(Debug, Clone)]
pub struct Parked {
    /// The user who held it.
    pub user: String,
    /// When the name is given up for good.
    pub until: Instant,
}

/// What a name currently maps to.
pub enum Route {
    /// A live session.
    Live(Arc<Session>),
    /// A session waiting for its agent to reconnect.
    Parked,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<SessionName, Arc<Session>>,
    parked: HashMap<SessionName, Parked>,
    /// Live plus parked names per user: a parked name is still the user's.
    per_user: HashMap<String, usize>,
}

impl Inner {
    fn release(&mut self, user: &str) {
        if let Some(count) = self.per_user.get_mut(user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_user.remove(user);
            }
        }
    }
}

/// Why a session could not be registered.
#[derive(Debug, PartialEq, Eq)]
pub enum InsertError {
    /// The user holds their maximum number of live sessions.
    UserLimit(usize),
    /// The relay holds its maximum number of live sessions.
    GlobalLimit(usize),
    /// The name is held by another user (a forged or stale resume).
    NameTaken,
}

/// Session name → live (or parked) session.
#[derive(Default)]
pub struct RoutingTable {
    inner: RwLock<Inner>,
    /// Bumped by every change, so the state file is rewritten only when needed.
    generation: std::sync::atomic::AtomicU64,
}

impl RoutingTable {
    /// What `name` maps to, if anything.
    pub fn route(&self, name: &SessionName) -> Option<Route> {
        let inner = self.read();
        if let Some(session) = inner.sessions.get(name) {
            return Some(Route::Live(session.clone()));
        }
        inner.parked.contains_key(name).then_some(Route::Parked)
    }

    /// The live session for `name`.
    pub fn get(&self, name: &SessionName) -> Option<Arc<Session>> {
        self.read().sessions.get(name).cloned()
    }

    /// Registers a session. If its name is live or parked for the same user (a resume),
    /// the new session takes it over and the replaced live session, if any, is returned
    /// so the caller can close it. Limits are enforced in the same lock.
    pub fn insert(
        &self,
        session: Arc<Session>,
        user_limit: usize,
        global_limit: usize,
    ) -> Result<Option<Arc<Session>>, InsertError> {
        let mut inner = self.write();
        let name = session.name;
        let takes_over = match (inner.sessions.get(&name), inner.parked.get(&name)) {
            (Some(old), _) if old.user == session.user => true,
            (_, Some(parked)) if parked.user == session.user => true,
            (None, None) => false,
            _ => return Err(InsertError::NameTaken),
        };
        if !takes_over {
            if inner.sessions.len() + inner.parked.len() >= global_limit {
                return Err(InsertError::GlobalLimit(global_limit));
            }
            let count = inner.per_user.get(&session.user).copied().unwrap_or(0);
            if count >= user_limit {
                return Err(InsertError::UserLimit(user_limit));
            }
            *inner.per_user.entry(session.user.clone()).or_default() += 1;
        }
        inner.parked.remove(&name);
        Ok(inner.sessions.insert(name, session))
    }

    /// Removes `session` for good, if it is still the one registered under its name.
    pub fn remove(&self, session: &Arc<Session>) -> bool {
        let mut inner = self.write();
        match inner.sessions.get(&session.name) {
            Some(current) if Arc::ptr_eq(current, session) => {}
            _ => return false,
        }
        inner.sessions.remove(&session.name);
        inner.release(&session.user);
        true
    }

    /// Parks `session`'s name until `until`, if `session` is still the live one.
    pub fn park(&self, session: &Arc<Session>, until: Instant) -> bool {
        let mut inner = self.write();
        match inner.sessions.get(&session.name) {
            Some(current) if Arc::ptr_eq(current, session) => {}
            _ => return false,
        }
        inner.sessions.remove(&session.name);
        let parked = Parked {
            user: session.user.clone(),
            until,
        };
        inner.parked.insert(session.name, parked);
        true
    }

    /// Gives up a parked name whose grace ended at `until` (and was not resumed since).
    pub fn expire(&self, name: &SessionName, until: Instant) -> bool {
        let mut inner = self.write();
        match inner.parked.get(name) {
            Some(parked) if parked.until == until => {}
            _ => return false,
        }
        if let Some(parked) = inner.parked.remove(name) {
            inner.release(&parked.user);
        }
        true
    }

    /// Parks a name that has no live session (one held before a relay restart), so it
    /// answers `503 Reconnecting` until its agent is back or `until`. Counts toward the
    /// user's limit like any parked name. False if the name is already live or parked.
    pub fn park_name(&self, name: SessionName, user: &str, until: Instant) -> bool {
        let mut inner = self.write();
        if inner.sessions.contains_key(&name) || inner.parked.contains_key(&name) {
            return false;
        }
        inner.parked.insert(
            name,
            Parked {
                user: user.to_owned(),
                until,
            },
        );
        *inner.per_user.entry(user.to_owned()).or_default() += 1;
        true
    }

    /// Every parked name with its user and deadline.
    pub fn parked(&self) -> Vec<(SessionName, Parked)> {
        let inner = self.read();
        inner
            .parked
            .iter()
            .map(|(name, parked)| (*name, parked.clone()))
            .collect()
    }

    /// Drops a parked name now (an admin closed it). False if it is not parked.
    pub fn end_parked(&self, name: &SessionName) -> bool {
        let mut inner = self.write();
        match inner.parked.remove(name) {
            Some(parked) => {
                inner.release(&parked.user);
                true
            }
            None => false,
        }
    }

    /// Every name live or parked, with its user.
    pub fn held_names(&self) -> Vec<(SessionName, String)> {
        let inner = self.read();
        inner
            .sessions
            .values()
            .map(|s| (s.name, s.user.clone()))
            .chain(inner.parked.iter().map(|(n, p)| (*n, p.user.clone())))
            .collect()
    }

    /// Every live session of `user`.
    pub fn sessions_of(&self, user: &str) -> Vec<Arc<Session>> {
        self.read()
            .sessions
            .values()
            .filter(|s| s.user == user)
            .cloned()
            .collect()
    }

    /// Whether `session` is still the one registered under its name.
    pub fn is_current(&self, session: &Arc<Session>) -> bool {
        matches!(self.read().sessions.get(&session.name), Some(current) if Arc::ptr_eq(current, session))
    }

    /// Every live session.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.read().sessions.values().cloned().collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.read().sessions.len()
    }

    /// Live and parked sessions.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.read();
        (inner.sessions.len(), inner.parked.len())
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes so far (any call that may have changed the table counts).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Extracts the session name from a request's host (`Host` or `:authority`):
/// case-insensitive, port and one trailing dot stripped, exactly one label in front of
/// `domain` (which must be lower-case without a trailing dot).
pub fn name_from_host(host: &str, domain: &str) -> Option<SessionName> {
    let host = strip_port(host)?;
    let host = host.strip_suffix('.').unwrap_or(host);
    // "<16 chars>.<domain>"
    if host.len() != NAME_LEN + 1 + domain.len() {
        return None;
    }
    let (label, rest) = host.split_at(NAME_LEN);
    let rest = rest.strip_prefix('.')?;
    if !rest.eq_ignore_ascii_case(domain) {
        return None;
    }
    SessionName::parse(label.as_bytes())
}

fn strip_port(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        return None; // IP literals are never session names
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => Some(h),
        Some(_) => None,
        None => Some(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_parsing_normalises_case_port_and_trailing_dot() {
        let d = "jobs.example.org";
        let want = SessionName::parse(b"abcdefghijklmnop");
        assert_eq!(name_from_host("abcdefghijklmnop.jobs.example.org", d), want);
        assert_eq!(
            name_from_host("ABCDEFGHIJKLMNOP.Jobs.Example.ORG:8443", d),
            want
        );
        assert_eq!(
            name_from_host("abcdefghijklmnop.jobs.example.org.", d),
            want
        );
        assert_eq!(
            name_from_host("abcdefghijklmnop.jobs.example.org.:443", d),
            want
        );
        assert_eq!(
            name_from_host("x.abcdefghijklmnop.jobs.example.org", d),
            None
        );
        assert_eq!(name_from_host("abcdefghijklmnop.evil.org", d), None);
        assert_eq!(
            name_from_host("abcdefghijklmnop.jobs.example.org:x", d),
            None
        );
        assert_eq!(name_from_host("jobs.example.org", d), None);
        assert_eq!(name_from_host("[::1]:443", d), None);
    }
}
