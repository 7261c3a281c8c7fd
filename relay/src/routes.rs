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

/// One live mapping.
pub struct Session {
    /// The session's name.
    pub name: SessionName,
    /// The user whose token opened it.
    pub user: String,
    /// What the agent said about its job.
    pub job: JobInfo,
    /// Access mode in force.
    pub access: AccessMode,
    /// The lock that goes with it.
    pub guard: crate::access::Access,
    /// The agent's QUIC connection: every request becomes a stream on it.
    pub connection: quinn::Connection,
    /// The agent's address as seen by the relay.
    pub agent_addr: SocketAddr,
    /// When the session opened.
    pub opened: Instant,
    /// Requests forwarded so far.
    pub requests: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<SessionName, Arc<Session>>,
    per_user: HashMap<String, usize>,
}

/// Why a session could not be registered.
#[derive(Debug, PartialEq, Eq)]
pub enum InsertError {
    /// The user holds their maximum number of live sessions.
    UserLimit(usize),
    /// The relay holds its maximum number of live sessions.
    GlobalLimit(usize),
}

/// Session name → live session.
#[derive(Default)]
pub struct RoutingTable {
    inner: RwLock<Inner>,
}

impl RoutingTable {
    /// The session for `name`, if live.
    pub fn get(&self, name: &SessionName) -> Option<Arc<Session>> {
        self.read().sessions.get(name).cloned()
    }

    /// Registers a session, enforcing per-user and global limits in the same lock.
    pub fn insert(
        &self,
        session: Arc<Session>,
        user_limit: usize,
        global_limit: usize,
    ) -> Result<(), InsertError> {
        let mut inner = self.write();
        if inner.sessions.len() >= global_limit {
            return Err(InsertError::GlobalLimit(global_limit));
        }
        let count = inner.per_user.get(&session.user).copied().unwrap_or(0);
        if count >= user_limit {
            return Err(InsertError::UserLimit(user_limit));
        }
        *inner.per_user.entry(session.user.clone()).or_default() += 1;
        inner.sessions.insert(session.name, session);
        Ok(())
    }

    /// Removes `session`, if it is still the one registered under its name.
    pub fn remove(&self, session: &Arc<Session>) -> bool {
        let mut inner = self.write();
        match inner.sessions.get(&session.name) {
            Some(current) if Arc::ptr_eq(current, session) => {}
            _ => return false,
        }
        inner.sessions.remove(&session.name);
        if let Some(count) = inner.per_user.get_mut(&session.user) {
            *count -= 1;
            if *count == 0 {
                inner.per_user.remove(&session.user);
            }
        }
        true
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

    /// Every live session.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.read().sessions.values().cloned().collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.read().sessions.len()
    }

    /// Whether no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
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
