//! What survives a relay restart besides the resume key, in one small JSON file:
//!
//! * the names that were **held** (live or parked) — after a restart they are parked for
//!   the resume grace, so a user who reloads the page while the agents reconnect sees
//!   `503 Reconnecting`, not `404 Session not found` (which would tell them the job ended);
//! * the names that **ended** for good recently — so no resume ticket can bring one back
//!   after a restart. A name is kept until every ticket for it has expired (one ticket
//!   lifetime after it ended), which also bounds how many the relay remembers.
//!
//! The file is rewritten (temp file + rename, mode 0600) whenever it would change, at most
//! every [`STATE_SAVE_INTERVAL`], and once more when the relay shuts down. A relay killed
//! with SIGKILL loses at most that interval. A missing or unreadable file is not an error:
//! the relay starts empty and says so.

use crate::names::SessionName;
use crate::Shared;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the state file is brought up to date (when something changed).
pub const STATE_SAVE_INTERVAL: Duration = Duration::from_secs(2);
/// Format version written into the file.
const STATE_VERSION: u32 = 1;
/// Largest state file read back (a relay at its 20,000-session limit writes ~1.5 MB).
const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

/// The file's contents.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayState {
    /// Format version.
    pub version: u32,
    /// Names live or parked when saved.
    pub held: Vec<HeldName>,
    /// Names that ended for good, with when they may be forgotten.
    pub ended: Vec<EndedName>,
}

/// A name a user's agent held.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldName {
    /// The session name.
    pub name: String,
    /// Its user.
    pub user: String,
}

/// A name that ended for good.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedName {
    /// The session name.
    pub name: String,
    /// Unix time after which no ticket for it can be valid.
    pub forget_after: u64,
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The relay's state now (and forgets ended names whose tickets have all expired).
fn snapshot(shared: &Shared) -> RelayState {
    let mut held: Vec<HeldName> = shared
        .routes
        .held_names()
        .into_iter()
        .map(|(name, user)| HeldName {
            name: name.to_string(),
            user,
        })
        .collect();
    held.sort_by(|a, b| a.name.cmp(&b.name));
    let mut ended: Vec<EndedName> = shared
        .names
        .ended_until(unix_now())
        .into_iter()
        .map(|(name, forget_after)| EndedName {
            name: name.to_string(),
            forget_after,
        })
        .collect();
    ended.sort_by(|a, b| a.name.cmp(&b.name));
    RelayState {
        version: STATE_VERSION,
        held,
        ended,
    }
}

/// Writes `bytes` to `path` atomically, readable by the relay's user only.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Encodes `state` and writes it to `path`; says why not in the log.
fn write_state(path: &Path, state: &RelayState) -> bool {
    let written = serde_json::to_vec(state)
        .map_err(std::io::Error::other)
        .and_then(|bytes| write_atomically(path, &bytes));
    if let Err(e) = &written {
        tracing::warn!("cannot write the relay state to {}: {e}", path.display());
    }
    written.is_ok()
}

/// Saves the state now (at shutdown).
pub(crate) fn save(shared: &Shared) -> bool {
    write_state(&shared.config.state_file_path(), &snapshot(shared))
}

/// A number that changes whenever the routing table or the ended names do.
fn generation(shared: &Shared) -> u64 {
    shared
        .routes
        .generation()
        .wrapping_add(shared.names.ended_generation())
}

/// Keeps the state file up to date until the task is aborted. Only the snapshot is taken
/// on the runtime: encoding and the synced write run on the blocking pool, so a relay
/// holding thousands of names does not stall requests while it saves.
pub(crate) async fn keep_saved(shared: Arc<Shared>) {
    let path = shared.config.state_file_path();
    let mut saved = None;
    loop {
        tokio::time::sleep(STATE_SAVE_INTERVAL).await;
        let now = generation(&shared);
        if saved == Some(now) {
            continue;
        }
        let state = snapshot(&shared);
        let path = path.clone();
        if let Ok(true) = tokio::task::spawn_blocking(move || write_state(&path, &state)).await {
            saved = Some(now);
        }
    }
}

/// Reads the state file, if there is a usable one.
fn load(path: &Path) -> Option<RelayState> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > MAX_STATE_BYTES {
        tracing::warn!(
            "relay state {} is {} bytes, over the {MAX_STATE_BYTES}-byte limit: starting empty",
            path.display(),
            meta.len()
        );
        return None;
    }
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!(
                "cannot read relay state {}: {e}: starting empty",
                path.display()
            );
            return None;
        }
    };
    match serde_json::from_slice::<RelayState>(&text) {
        Ok(state) if state.version == STATE_VERSION => Some(state),
        Ok(state) => {
            tracing::warn!(
                "relay state {} has version {}, expected {STATE_VERSION}: starting empty",
                path.display(),
                state.version
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                "relay state {} is unreadable ({e}): starting empty",
                path.display()
            );
            None
        }
    }
}

/// Brings back what the previous relay process held: its held names parked for the resume
/// grace (users whose token is gone are skipped), and its recently ended names.
pub(crate) fn restore(shared: &Arc<Shared>) {
    let path = shared.config.state_file_path();
    let Some(state) = load(&path) else {
        return;
    };
    let now = unix_now();
    let mut ended = 0;
    for entry in &state.ended {
        if let Some(name) = SessionName::parse(entry.name.as_bytes()) {
            if entry.forget_after > now {
                shared.names.mark_ended_until(name, entry.forget_after);
                ended += 1;
            }
        }
    }
    let grace = Duration::from_secs(shared.config.resume_grace_secs);
    let mut parked = 0;
    if !grace.is_zero() {
        let until = Instant::now() + grace;
        for entry in &state.held {
            let Some(name) = SessionName::parse(entry.name.as_bytes()) else {
                continue;
            };
            if shared.names.is_ended(&name) || !shared.tokens.has_user(&entry.user) {
                continue;
            }
            shared.names.claim(name);
            if shared.routes.park_name(name, &entry.user, until) {
                crate::agents::expire_after_grace(shared, name, until);
                parked += 1;
            }
        }
    }
    tracing::info!(
        "restored from {}: {parked} names held for their agents to reconnect, {ended} ended names remembered",
        path.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_round_trips_and_is_private() {
        let dir = std::env::temp_dir().join(format!("jobgate-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        let state = RelayState {
            version: STATE_VERSION,
            held: vec![HeldName {
                name: "abcdefghijklmnop".into(),
                user: "alice".into(),
            }],
            ended: vec![EndedName {
                name: "qrstuvwxyz234567".into(),
                forget_after: 42,
            }],
        };
        let bytes = serde_json::to_vec(&state).expect("encode");
        write_atomically(&path, &bytes).expect("write");
        assert_eq!(load(&path), Some(state));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_or_foreign_state_file_is_ignored() {
        let dir = std::env::temp_dir().join(format!("jobgate-state-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.json");
        std::fs::write(&path, b"{\"version\": 1, \"held\": [").expect("write");
        assert_eq!(load(&path), None);
        std::fs::write(&path, b"{\"version\": 99, \"held\": [], \"ended\": []}").expect("write");
        assert_eq!(load(&path), None);
        assert_eq!(load(&dir.join("missing.json")), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
