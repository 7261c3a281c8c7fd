//! What survives a relay restart besides the resume key, in one small JSON file:
//!
//! * the names that were **held** (live or parked) — after a restart they are parked for
//!   the resume grace, so a user who reloads the page while the agents reconnect sees
//!   `503 Reconnecting`, not `404 Session not found` (which would tell them the job ended);
//! * the names that **ended** for good recently — so no resume ticket can bring one back
//!   after a restart. A name is kept until every ticket for it has expired (one ticket
//!   lifetime after it ended), which also bounds how many the relay remembers.
//!
//! Every transition of a name to *ended* (the agent's `Bye`, a revoked token, a resume
//! grace that ran out) is written at once: a `Bye` or a revocation is acknowledged (the
//! connection closed, the URL answering 404) only after the file that says so is synced,
//! so a relay killed at any moment never gives an ended name back. Those writes are
//! coalesced ([`Saver`]): one in flight and one pending at most, however many sessions
//! end at once. Other changes (names opened or parked) are written at most every
//! [`STATE_SAVE_INTERVAL`] and once more when the relay shuts down; a SIGKILL loses at
//! most that interval of them, which costs only a `404` instead of a `503 Reconnecting`
//! until the agent is back. Writes go through a temp file + fsync + rename, mode 0600. A
//! missing or unreadable file is not an error: the relay starts empty and says so.
//!
//! Size: ended names are remembered one ticket lifetime, and new names are rate-limited
//! per user ([`crate::ratelimit`]), so one user adds at most `burst + per_minute ×
//! lifetime_minutes` entries of ~55 bytes (defaults: 120 + 60 × 60 = 3,720, ~200 KB).
//! Whatever the number of users, the file keeps at most [`MAX_SAVED_ENDED_NAMES`] ended
//! names (those remembered longest), so it always stays under the restore cap.

use crate::names::SessionName;
use crate::Shared;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the state file is brought up to date (when something changed).
pub const STATE_SAVE_INTERVAL: Duration = Duration::from_secs(2);
/// Format version written into the file.
const STATE_VERSION: u32 = 1;
/// Largest state file read back (a relay at its 20,000-session limit writes ~1.5 MB of
/// held names; ended names are capped by [`MAX_SAVED_ENDED_NAMES`]).
const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;
/// Most ended names written to the state file: ~55 bytes each, so at most ~55 MB, which
/// with 20,000 held names (~100 bytes each, 2 MB) stays under [`MAX_STATE_BYTES`]. Only
/// reached when hundreds of users churn sessions at their full rate for a whole ticket
/// lifetime; then the names closest to being forgotten are left out (after a restart,
/// their owners' tickets could resume them: a user gets back only a name that was theirs).
pub const MAX_SAVED_ENDED_NAMES: usize = 1_000_000;

/// The file's contents.
#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayState {
    /// Format version.
    pub version: u32,
    /// Names live or parked when saved.
    pub held: Vec<HeldName>,
    /// Names that ended for good, with when they may be forgotten.
    pub ended: Vec<EndedName>,
    /// Reserved names whose job had no session yet (their status page comes back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queued: Vec<crate::queued::QueuedRecord>,
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

/// The relay's state now. Also forgets what no longer matters: ended names whose
/// tickets have all expired, and issued names older than a ticket lifetime that are
/// neither live nor parked.
fn snapshot(shared: &Shared) -> RelayState {
    let now = unix_now();
    let held_names = shared.routes.held_names();
    let held_set: std::collections::HashSet<SessionName> =
        held_names.iter().map(|(name, _)| *name).collect();
    shared.names.forget_issued_before(
        now.saturating_sub(shared.config.ticket_lifetime_secs),
        |name| held_set.contains(name),
    );
    let mut held: Vec<HeldName> = held_names
        .into_iter()
        .map(|(name, user)| HeldName {
            name: name.to_string(),
            user,
        })
        .collect();
    held.sort_by(|a, b| a.name.cmp(&b.name));
    let mut remembered = shared.names.ended_until(now);
    if remembered.len() > MAX_SAVED_ENDED_NAMES {
        tracing::warn!(
            "{} ended names to remember, more than the {MAX_SAVED_ENDED_NAMES} the state file keeps: leaving out those forgotten soonest",
            remembered.len()
        );
        remembered.sort_unstable_by_key(|(_, forget_after)| std::cmp::Reverse(*forget_after));
        remembered.truncate(MAX_SAVED_ENDED_NAMES);
    }
    let mut ended: Vec<EndedName> = remembered
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
        queued: shared.queued.records(),
    }
}

/// Encodes `state` and writes it to `path`; says why not in the log.
fn write_state(path: &Path, state: &RelayState) -> bool {
    let written = serde_json::to_vec(state)
        .map_err(std::io::Error::other)
        .and_then(|bytes| jobgate_files::write_atomically(path, &bytes));
    if let Err(e) = &written {
        tracing::warn!("cannot write the relay state to {}: {e}", path.display());
    }
    written.is_ok()
}

/// Coalesces saves of the state file: at most one write in flight and one pending. A
/// caller of [`save_now`] is released by the first write whose snapshot was taken after
/// it asked, so a burst of 1,000 `Bye`s costs two or three writes, not 1,000.
#[derive(Default)]
pub(crate) struct Saver {
    progress: std::sync::Mutex<SaveProgress>,
    /// The number of the last request covered by a completed write.
    done: tokio::sync::watch::Sender<u64>,
    /// Snapshot numbers: the last one written, held during the write, so an older
    /// snapshot (say, one on the blocking pool while shutdown saves) never replaces a
    /// newer file.
    written: std::sync::Mutex<u64>,
    snapshots: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct SaveProgress {
    /// Requests so far.
    requested: u64,
    /// Whether a task is writing (it loops while requests are pending).
    running: bool,
}

/// A snapshot with its number.
fn numbered_snapshot(shared: &Shared) -> (u64, RelayState) {
    let number = shared
        .saver
        .snapshots
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    (number, snapshot(shared))
}

/// Writes snapshot `number` unless a newer one is on disk already.
fn write_numbered(saver: &Saver, path: &Path, number: u64, state: &RelayState) -> bool {
    let mut written = saver.written.lock().unwrap_or_else(|e| e.into_inner());
    if *written >= number {
        return true;
    }
    let ok = write_state(path, state);
    if ok {
        *written = number;
    }
    ok
}

/// Saves the state now, synchronously (at shutdown).
pub(crate) fn save(shared: &Shared) -> bool {
    let (number, state) = numbered_snapshot(shared);
    write_numbered(
        &shared.saver,
        &shared.config.state_file_path(),
        number,
        &state,
    )
}

/// Asks for a write that includes every change made so far; returns the request's
/// number. Starts the writing task if none runs.
fn request_save(shared: &Arc<Shared>) -> u64 {
    let (number, start) = {
        let mut progress = shared
            .saver
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        progress.requested += 1;
        let start = !progress.running;
        progress.running = true;
        (progress.requested, start)
    };
    if start {
        tokio::spawn(write_requested(shared.clone()));
    }
    number
}

/// Writes the state on the blocking pool until no request is pending.
async fn write_requested(shared: Arc<Shared>) {
    let path = shared.config.state_file_path();
    loop {
        let target = {
            let mut progress = shared
                .saver
                .progress
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *shared.saver.done.borrow() >= progress.requested {
                progress.running = false;
                return;
            }
            progress.requested
        };
        // Taken after reading `target`: it holds every change made before those requests.
        let (number, state) = numbered_snapshot(&shared);
        let (writer, path) = (shared.clone(), path.clone());
        let write = tokio::task::spawn_blocking(move || {
            write_numbered(&writer.saver, &path, number, &state)
        });
        if let Err(e) = write.await {
            tracing::warn!("the relay state write failed: {e}");
        }
        // Waiters are released even after a failed write (it was logged): a session's end
        // must not hang on a full disk.
        shared.saver.done.send_replace(target);
    }
}

/// Saves the state and waits until a write that began after this call has finished
/// (the file synced and renamed). Used before acknowledging that a name ended.
pub(crate) async fn save_now(shared: &Arc<Shared>) {
    let number = request_save(shared);
    let mut done = shared.saver.done.subscribe();
    let _ = done.wait_for(|written| *written >= number).await;
}

/// Starts a save without waiting for it (a name ended with nobody to acknowledge).
pub(crate) fn save_soon(shared: &Arc<Shared>) {
    request_save(shared);
}

/// A number that changes whenever the routing table or the ended names do.
fn generation(shared: &Shared) -> u64 {
    shared
        .routes
        .generation()
        .wrapping_add(shared.names.ended_generation())
        .wrapping_add(shared.queued.generation())
}

/// Keeps the state file up to date until the task is aborted. Only the snapshot is taken
/// on the runtime: encoding and the synced write run on the blocking pool, so a relay
/// holding thousands of names does not stall requests while it saves.
pub(crate) async fn keep_saved(shared: Arc<Shared>) {
    let mut saved = None;
    loop {
        tokio::time::sleep(STATE_SAVE_INTERVAL).await;
        let now = generation(&shared);
        if saved == Some(now) {
            continue;
        }
        save_now(&shared).await;
        saved = Some(now);
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
    let mut queued = 0;
    for record in &state.queued {
        if shared
            .queued
            .restore(record, |name| shared.names.is_ended(name))
        {
            queued += 1;
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
        "restored from {}: {parked} names held for their agents to reconnect, {ended} ended names remembered, {queued} reserved names waiting for their jobs",
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
            queued: vec![crate::queued::QueuedRecord {
                name: "b234567abcdefghi".into(),
                user: "alice".into(),
                job_id: "4242".into(),
                access: "link".into(),
                key_sha256: Some("ab".repeat(32)),
                expires: 4_000_000_000,
            }],
        };
        let bytes = serde_json::to_vec(&state).expect("encode");
        jobgate_files::write_atomically(&path, &bytes).expect("write");
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
