//! The job file: how a batch job hands its URL back to the login node.
//!
//! `~/.jobgate/jobs/<jobid>.json` (directory 0700, file 0600) lives in the home directory
//! that login and compute nodes share on every cluster. `jobgate launch` writes it when it
//! submits the job (state `submitted`); the agent in the job updates it as it goes
//! (`starting` → `connecting` → `connected` with the URL → `ended`), and `jobgate launch`
//! and `jobgate jobs` read it. Writes replace the file atomically (temporary file, then
//! rename), so a reader never sees half a record.
//!
//! The agent keeps this file by itself when `SLURM_JOB_ID` is set (see [`JobFile::for_agent`]),
//! or at the path given with `--job-file`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The directory below `$HOME` holding the job files.
pub const JOBS_DIR: &str = ".jobgate/jobs";
/// Longest job id accepted (Slurm's are far shorter).
const MAX_JOB_ID: usize = 64;

/// Where the session of a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Submitted by `jobgate launch`; the agent has not started yet.
    Submitted,
    /// The agent started and is starting the app.
    Starting,
    /// The app is ready; the agent is dialing the relay.
    Connecting,
    /// The relay granted a session: `url` is live.
    Connected,
    /// The connection was lost; the agent is reconnecting.
    Reconnecting,
    /// The agent ended (`error` says why, if it failed).
    Ended,
}

impl SessionState {
    /// A few words for people.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Starting => "app starting",
            Self::Connecting => "connecting to the relay",
            Self::Connected => "connected",
            Self::Reconnecting => "reconnecting to the relay",
            Self::Ended => "ended",
        }
    }
}

/// One job's record. Every field but `job_id` and `state` is optional; fields this version
/// does not know are kept when the file is updated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The batch system's job id.
    pub job_id: String,
    /// Where the session stands.
    pub state: SessionState,
    /// The session's URL (with its access key: the file is private).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Why the agent ended, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The agent's exit code, once ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The compute node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The agent's process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The job's output file (written by `jobgate launch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// What runs in the job, for people (written by `jobgate launch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Unix time of submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<u64>,
    /// Unix time the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Unix time the current URL was granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<u64>,
    /// Unix time the agent ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    /// Fields written by other versions, kept as they are.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl JobRecord {
    /// A fresh record in `state`.
    pub fn new(job_id: &str, state: SessionState) -> Self {
        Self {
            job_id: job_id.to_owned(),
            state,
            url: None,
            error: None,
            exit_code: None,
            host: None,
            pid: None,
            output: None,
            command: None,
            submitted_at: None,
            started_at: None,
            connected_at: None,
            ended_at: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether `id` is usable as a job file's name: digits, letters, `_`, `.`, `-`, `[`, `]`
/// (Slurm's `123`, `123_4`; PBS's `123.server`), never a path.
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_JOB_ID
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '[' | ']'))
}

/// `~/.jobgate/jobs`, or `None` without `$HOME`.
pub fn jobs_dir() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(JOBS_DIR))
}

/// Creates `dir` (and its parents) private to the user: 0700.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    jobgate_files::ensure_dir(dir)
}

/// One job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFile {
    path: PathBuf,
    job_id: String,
}

impl JobFile {
    /// The file of `job_id` in `dir`; `None` for an id that is not a plain name.
    pub fn in_dir(dir: &Path, job_id: &str) -> Option<Self> {
        valid_job_id(job_id).then(|| Self {
            path: dir.join(format!("{job_id}.json")),
            job_id: job_id.to_owned(),
        })
    }

    /// The file of `job_id` in [`jobs_dir`].
    pub fn for_job(job_id: &str) -> Option<Self> {
        Self::in_dir(&jobs_dir()?, job_id)
    }

    /// A file at an explicit path; the job id is `job_id` or the file's stem.
    pub fn at(path: PathBuf, job_id: Option<String>) -> Self {
        let job_id = job_id.unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        Self { path, job_id }
    }

    /// The file the agent keeps: `explicit` (`--job-file`), else
    /// `~/.jobgate/jobs/$SLURM_JOB_ID.json` when the agent runs in a Slurm job.
    pub fn for_agent(explicit: Option<PathBuf>) -> Option<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let job_id = env("SLURM_JOB_ID");
        match explicit {
            Some(path) => Some(Self::at(path, job_id)),
            None => Self::for_job(&job_id?),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The job id the file is about.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// The record, `Ok(None)` if there is no file.
    pub fn read(&self) -> std::io::Result<Option<JobRecord>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces the file with `record` (0600, atomically), creating the directory (0700).
    pub fn write(&self, record: &JobRecord) -> std::io::Result<()> {
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        ensure_private_dir(&dir)?;
        let mut text = serde_json::to_vec_pretty(record)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        text.push(b'\n');
        jobgate_files::write_atomically(&self.path, &text)
    }

    /// Reads the record (a fresh one in `state` if there is none or it is unreadable),
    /// lets `change` edit it, and writes it back.
    pub fn update(
        &self,
        state: SessionState,
        change: impl FnOnce(&mut JobRecord),
    ) -> std::io::Result<JobRecord> {
        let mut record = match self.read() {
            Ok(Some(record)) => record,
            _ => JobRecord::new(&self.job_id, state),
        };
        record.state = state;
        change(&mut record);
        self.write(&record)?;
        Ok(record)
    }

    /// Removes the file (a missing one is fine).
    pub fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The agent's side: records each step, and warns once if the file cannot be written
/// (the session itself goes on).
#[derive(Debug)]
pub struct AgentJobFile {
    file: JobFile,
    warned: std::sync::atomic::AtomicBool,
}

impl AgentJobFile {
    /// Wraps `file`.
    pub fn new(file: JobFile) -> Self {
        Self {
            file,
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Records `state`, with `change` applied.
    pub fn record(&self, state: SessionState, change: impl FnOnce(&mut JobRecord)) {
        if let Err(e) = self.file.update(state, change) {
            if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                crate::warn_user!(
                    "cannot write the job file {}: {e}",
                    self.file.path().display()
                );
            }
        }
    }

    /// The agent started (and is starting the app).
    pub fn starting(&self, host: Option<String>) {
        self.record(SessionState::Starting, |r| {
            r.started_at = Some(now());
            r.host = host;
            r.pid = Some(std::process::id());
            r.url = None;
            r.error = None;
            r.exit_code = None;
            r.ended_at = None;
        });
    }

    /// The session is open at `url`.
    pub fn connected(&self, url: &str) {
        self.record(SessionState::Connected, |r| {
            r.url = Some(url.to_owned());
            r.connected_at = Some(now());
        });
    }

    /// The agent ended: `error` if it failed.
    pub fn ended(&self, exit_code: i32, error: Option<String>) {
        self.record(SessionState::Ended, |r| {
            r.exit_code = Some(exit_code);
            r.error = error;
            r.ended_at = Some(now());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("jobgate-jobfile-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).expect("temp dir");
        dir
    }

    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
    }

    #[test]
    fn records_round_trip_privately() {
        let base = temp_dir();
        let dir = base.join(".jobgate/jobs");
        let file = JobFile::in_dir(&dir, "4242").expect("valid id");
        assert_eq!(file.read().expect("read"), None);
        let mut record = JobRecord::new("4242", SessionState::Connected);
        record.url = Some("https://n.d/?jobgate_key=K".into());
        record.host = Some("node1".into());
        record.started_at = Some(1);
        file.write(&record).expect("write");
        assert_eq!(file.read().expect("read"), Some(record));
        assert_eq!(mode(file.path()), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&base.join(".jobgate")), 0o700);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind");
        file.remove().expect("remove");
        file.remove().expect("removing twice is fine");
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn updates_keep_other_fields_and_unknown_ones() {
        let base = temp_dir();
        let file = JobFile::in_dir(&base, "7").expect("valid id");
        std::fs::write(
            file.path(),
            r#"{"job_id":"7","state":"submitted","output":"/o/7.out","future_field":[1,2]}"#,
        )
        .expect("seed");
        let agent = AgentJobFile::new(file.clone());
        agent.starting(Some("node".into()));
        agent.connected("https://x.d/");
        let record = file.read().expect("read").expect("record");
        assert_eq!(record.state, SessionState::Connected);
        assert_eq!(record.url.as_deref(), Some("https://x.d/"));
        assert_eq!(record.output.as_deref(), Some("/o/7.out"));
        assert_eq!(record.host.as_deref(), Some("node"));
        assert_eq!(
            record.extra.get("future_field"),
            Some(&serde_json::json!([1, 2]))
        );
        agent.ended(3, Some("the relay refused this agent: bad token".into()));
        let record = file.read().expect("read").expect("record");
        assert_eq!(record.state, SessionState::Ended);
        assert_eq!(record.exit_code, Some(3));
        assert!(record
            .error
            .as_deref()
            .is_some_and(|e| e.contains("refused")));
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn unreadable_files_are_errors_not_panics() {
        let base = temp_dir();
        let file = JobFile::in_dir(&base, "8").expect("valid id");
        std::fs::write(file.path(), b"{not json").expect("seed");
        assert!(file.read().is_err());
        // An update starts afresh.
        let record = file.update(SessionState::Starting, |_| {}).expect("update");
        assert_eq!(record.job_id, "8");
        std::fs::remove_dir_all(&base).expect("cleanup");
    }

    #[test]
    fn job_ids_never_make_paths() {
        for ok in ["1", "123_4", "99.pbs-server", "12[3]"] {
            assert!(valid_job_id(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".hidden",
            "a/b",
            "../x",
            "1 2",
            "x\n",
            &"9".repeat(65),
        ] {
            assert!(!valid_job_id(bad), "{bad:?}");
            assert!(JobFile::in_dir(Path::new("/d"), bad).is_none());
        }
    }
}
