//! What a reserved URL shows before its job's session is up.
//!
//! `jobgate launch` prints the URL when the job is submitted (see [`crate::reserve`]). Until
//! the job's agent connects, that URL answers with a small page that says where the job is
//! — queued (with Slurm's reason and expected start), starting, failed or cancelled — and
//! updates by itself: it polls [`STATUS_PATH`] and reloads into the app once the session is
//! live. The relay learns the job's state by running the command of the `slurm_status`
//! setting (e.g. `scontrol show job -o {job}`, or the same through `ssh` to a login node),
//! only while someone looks, cached for [`STATUS_CACHE`], bounded by [`STATUS_TIMEOUT`].
//!
//! The page is guarded as the session will be: a `link` reservation needs its key (then
//! the cookie), and anyone else gets exactly what an unknown name gets, so the page tells
//! no one that the name exists; an `owner` reservation needs its owner's sign-on (the
//! session's own gate); a `public` one shows the unknown-name page until the session is up.
//! A job that failed or was cancelled shows that for [`END_GRACE`], then its name ends.
//! The page is sent as `503` (with `Retry-After`) while the job is queued or starting and
//! `410` once it has failed or ended, never `200`: a script waiting for the URL to answer
//! must not take it for the app. Its JSON is `200`.

use crate::access::{self, Decision, SessionLock};
use crate::body::RelayBody;
use crate::names::SessionName;
use crate::pages::Page;
use crate::Shared;
use http::{header, HeaderValue, Request, Response, StatusCode};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The path, on the session's own host, of the page's JSON (relay-owned until the
/// session is live; then it is the app's like every other path).
pub const STATUS_PATH: &str = "/.jobgate/status";
/// How long one answer of the `slurm_status` command is reused.
pub const STATUS_CACHE: Duration = Duration::from_secs(3);
/// How long the `slurm_status` command may run.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a failed or cancelled job's page stays before its name ends (404).
pub const END_GRACE: Duration = Duration::from_secs(600);
/// Longest command output read (one `scontrol -o` line is far shorter).
const MAX_STATUS_OUTPUT: usize = 16 * 1024;
/// How often the page polls.
const POLL_MS: u64 = 2000;
/// `Retry-After` of the page while the job is queued or starting.
const RETRY_AFTER_SECS: &str = "5";

/// A reserved name whose job has no session yet.
struct Queued {
    user: String,
    job_id: String,
    lock: SessionLock,
    /// Unix time the reservation expires: then the name is forgotten even if nobody
    /// looked (a job cancelled before it ever ran).
    expires: u64,
    /// The last status and when it was asked.
    status: Option<(Instant, JobStatus)>,
    /// When the job was first seen failed or cancelled.
    finished: Option<Instant>,
}

/// Reserved names waiting for their job's agent.
#[derive(Default)]
pub struct QueuedNames {
    names: Mutex<HashMap<SessionName, Queued>>,
    /// Changes with every insert and removal (the state file is saved when it moves).
    generation: std::sync::atomic::AtomicU64,
}

/// A waiting name as the state file keeps it (the access key only as its SHA-256).
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueuedRecord {
    /// The session name.
    pub name: String,
    /// Its user.
    pub user: String,
    /// The batch job.
    pub job_id: String,
    /// `link` (with `key_sha256`), `owner` or `public`.
    pub access: String,
    /// Hex SHA-256 of the access key, for `link`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// Unix time the reservation expires.
    pub expires: u64,
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl QueuedNames {
    /// Remembers a reservation just issued.
    pub(crate) fn insert(
        &self,
        name: SessionName,
        user: &str,
        job_id: &str,
        lock: SessionLock,
        expires: u64,
    ) {
        self.bump();
        if let Ok(mut names) = self.names.lock() {
            // Expired reservations go whenever one comes: the table stays bounded by the
            // reservations of one lifetime.
            let now = crate::agents::unix_now();
            names.retain(|_, q| q.expires > now);
            names.insert(
                name,
                Queued {
                    user: user.to_owned(),
                    job_id: job_id.to_owned(),
                    lock,
                    expires,
                    status: None,
                    finished: None,
                },
            );
        }
    }

    /// Forgets a name (its session is up, or it ended).
    pub(crate) fn remove(&self, name: &SessionName) {
        if let Ok(mut names) = self.names.lock() {
            if names.remove(name).is_some() {
                self.bump();
            }
        }
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A number that changes whenever a name comes or goes.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every waiting name, for the state file.
    pub(crate) fn records(&self) -> Vec<QueuedRecord> {
        let Ok(names) = self.names.lock() else {
            return Vec::new();
        };
        let mut records: Vec<QueuedRecord> = names
            .iter()
            .map(|(name, q)| {
                let (access, key_sha256) = match &q.lock {
                    SessionLock::Link { key_hash } => ("link", Some(hex(key_hash))),
                    SessionLock::Owner => ("owner", None),
                    SessionLock::Public => ("public", None),
                };
                QueuedRecord {
                    name: name.to_string(),
                    user: q.user.clone(),
                    job_id: q.job_id.clone(),
                    access: access.into(),
                    key_sha256,
                    expires: q.expires,
                }
            })
            .collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    /// Brings back a waiting name from the state file, unless it ended meanwhile or the
    /// record is damaged; says whether it did.
    pub(crate) fn restore(
        &self,
        record: &QueuedRecord,
        is_ended: impl Fn(&SessionName) -> bool,
    ) -> bool {
        let Some(name) = SessionName::parse(record.name.as_bytes()) else {
            return false;
        };
        let lock = match (
            record.access.as_str(),
            record.key_sha256.as_deref().and_then(unhex),
        ) {
            ("link", Some(key_hash)) => SessionLock::Link { key_hash },
            ("owner", _) => SessionLock::Owner,
            ("public", _) => SessionLock::Public,
            _ => return false,
        };
        if is_ended(&name) || record.expires <= crate::agents::unix_now() {
            return false;
        }
        self.insert(name, &record.user, &record.job_id, lock, record.expires);
        true
    }

    /// Every waiting name.
    pub(crate) fn names(&self) -> Vec<SessionName> {
        self.names
            .lock()
            .map(|names| names.keys().copied().collect())
            .unwrap_or_default()
    }

    /// How many names wait.
    pub fn len(&self) -> usize {
        self.names.lock().map(|n| n.len()).unwrap_or(0)
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (lock copy, job id, user) of a waiting name.
    fn lookup(&self, name: &SessionName) -> Option<(SessionLock, String, String)> {
        let names = self.names.lock().ok()?;
        let q = names
            .get(name)
            .filter(|q| q.expires > crate::agents::unix_now())?;
        Some((q.lock.clone(), q.job_id.clone(), q.user.clone()))
    }

    fn cached(&self, name: &SessionName) -> Option<JobStatus> {
        let names = self.names.lock().ok()?;
        let (at, status) = names.get(name)?.status.as_ref()?;
        (at.elapsed() < STATUS_CACHE).then(|| status.clone())
    }

    /// Records `status`; returns whether the name's grace after a failed or cancelled job
    /// is over.
    fn record(&self, name: &SessionName, status: &JobStatus, grace: Duration) -> bool {
        let Ok(mut names) = self.names.lock() else {
            return false;
        };
        let Some(q) = names.get_mut(name) else {
            return false;
        };
        q.status = Some((Instant::now(), status.clone()));
        if status.phase.is_final() {
            let since = *q.finished.get_or_insert_with(Instant::now);
            return since.elapsed() >= grace;
        }
        false
    }
}

/// Where the job is, as the page says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting in the queue.
    Queued,
    /// Running, its agent not connected yet (the app is starting).
    Starting,
    /// Failed, timed out, or lost its node.
    Failed,
    /// Cancelled (`scancel`).
    Cancelled,
    /// Completed without a session, or no longer known to Slurm.
    Ended,
    /// The relay cannot tell (no `slurm_status`, or it failed).
    Unknown,
}

impl Phase {
    fn word(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Starting => "starting",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
            Phase::Ended => "ended",
            Phase::Unknown => "unknown",
        }
    }

    fn is_final(self) -> bool {
        matches!(self, Phase::Failed | Phase::Cancelled | Phase::Ended)
    }
}

/// What the relay knows of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobStatus {
    /// Where the job is.
    pub phase: Phase,
    /// Slurm's state (`PENDING`, `RUNNING`, `CANCELLED`…), when known.
    pub slurm_state: Option<String>,
    /// Slurm's reason (`Priority`, `Resources`, `JobHeldUser`…), when there is one.
    pub reason: Option<String>,
    /// When Slurm expects the job to start, when it says.
    pub expected_start: Option<String>,
    /// The job's exit code (`1:0`), once it has ended.
    pub exit_code: Option<String>,
    /// Why the relay cannot tell, for `Unknown`.
    pub problem: Option<String>,
}

impl JobStatus {
    fn unknown(problem: impl Into<String>) -> Self {
        Self {
            phase: Phase::Unknown,
            slurm_state: None,
            reason: None,
            expected_start: None,
            exit_code: None,
            problem: Some(problem.into()),
        }
    }

    /// The page's sentence for it.
    fn sentence(&self) -> String {
        let reason = self
            .reason
            .as_deref()
            .filter(|r| !r.is_empty() && *r != "None")
            .map(|r| format!(" (reason: {r})"))
            .unwrap_or_default();
        match self.phase {
            Phase::Queued => {
                let start = self
                    .expected_start
                    .as_deref()
                    .filter(|s| !s.is_empty() && *s != "Unknown" && *s != "N/A")
                    .map(|s| format!(" Slurm expects it to start at {s}."))
                    .unwrap_or_default();
                format!("The job is queued{reason}.{start} This page updates by itself and opens the app when it is up.")
            }
            Phase::Starting => "The job is running and its app is starting. This page opens it when it is up.".into(),
            Phase::Failed => format!(
                "The job failed ({}{}){reason}. Start a new one to get a new URL.",
                self.slurm_state.as_deref().unwrap_or("FAILED"),
                self.exit_code.as_deref().map(|c| format!(", exit code {c}")).unwrap_or_default()
            ),
            Phase::Cancelled => format!("The job was cancelled{reason}. Start a new one to get a new URL."),
            Phase::Ended => "The job has ended without opening its session. Start a new one to get a new URL.".into(),
            Phase::Unknown => format!(
                "The job is queued or starting; the relay cannot see the batch queue right now ({}). This page updates by itself.",
                self.problem.as_deref().unwrap_or("no status")
            ),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "state": self.phase.word(),
            "slurm_state": self.slurm_state,
            "reason": self.reason,
            "expected_start": self.expected_start,
            "exit_code": self.exit_code,
            "message": self.sentence(),
        })
    }
}

/// Reads one line of `scontrol show job -o` (`Key=Value` fields separated by spaces).
pub fn parse_scontrol(output: &str) -> JobStatus {
    let field = |key: &str| -> Option<String> {
        output
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let Some(state) = field("JobState") else {
        return JobStatus::unknown("the status command printed no JobState");
    };
    let phase = match state.as_str() {
        "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "SUSPENDED" | "RESV_DEL_HOLD" => Phase::Queued,
        "RUNNING" | "CONFIGURING" | "COMPLETING" | "RESIZING" | "SIGNALING" | "STAGE_OUT" => {
            Phase::Starting
        }
        "CANCELLED" => Phase::Cancelled,
        "COMPLETED" => Phase::Ended,
        "FAILED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY" | "BOOT_FAIL" | "DEADLINE"
        | "PREEMPTED" => Phase::Failed,
        _ => Phase::Unknown,
    };
    JobStatus {
        phase,
        slurm_state: Some(state),
        reason: field("Reason"),
        expected_start: matches!(phase, Phase::Queued)
            .then(|| field("StartTime"))
            .flatten(),
        exit_code: phase.is_final().then(|| field("ExitCode")).flatten(),
        problem: (phase == Phase::Unknown).then(|| "Slurm reported an unknown state".into()),
    }
}

/// Asks Slurm (the `slurm_status` command, `{job}` replaced) where `job_id` is.
async fn ask_slurm(command: &str, job_id: &str) -> JobStatus {
    let mut words = command
        .split_whitespace()
        .map(|w| w.replace("{job}", job_id));
    let Some(program) = words.next() else {
        return JobStatus::unknown("slurm_status is empty");
    };
    let mut child = tokio::process::Command::new(&program);
    child
        .args(words)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = match tokio::time::timeout(STATUS_TIMEOUT, child.output()).await {
        Err(_) => {
            return JobStatus::unknown(format!(
                "the status command took over {} s",
                STATUS_TIMEOUT.as_secs()
            ))
        }
        Ok(Err(e)) => return JobStatus::unknown(format!("cannot run {program}: {e}")),
        Ok(Ok(output)) => output,
    };
    let text =
        String::from_utf8_lossy(&output.stdout[..output.stdout.len().min(MAX_STATUS_OUTPUT)]);
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        // `scontrol` forgets a job some minutes after it ended.
        if err.contains("Invalid job id") {
            return JobStatus {
                phase: Phase::Ended,
                ..JobStatus::unknown("")
            };
        }
        let first = err
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(120)
            .collect::<String>();
        return JobStatus::unknown(format!("the status command failed: {first}"));
    }
    parse_scontrol(&text)
}

/// The answer for a request to a reserved name with no session yet, or `None` when the
/// name is not waiting (the caller answers as for an unknown name).
pub(crate) async fn serve(
    shared: &std::sync::Arc<Shared>,
    name: SessionName,
    req: Request<hyper::body::Incoming>,
) -> Option<Response<RelayBody>> {
    let (lock, job_id, user) = shared.queued.lookup(&name)?;
    let (mut parts, _body) = req.into_parts();
    match lock {
        SessionLock::Link { .. } => {
            let origin = shared.config.session_origin(name.as_str());
            match access::check(&lock, &name, &origin, &mut parts) {
                Decision::Forward => {}
                // Without the key the name does not exist, as far as anyone can tell.
                Decision::Answer(r) if r.status() == StatusCode::UNAUTHORIZED => return None,
                Decision::Answer(r) => return Some(r),
            }
        }
        SessionLock::Owner => {
            // The owner signs in as for the session itself (the same passes and paths).
            let origin = shared.config.session_origin(name.as_str());
            let shares = jobgate_protocol::Shares::default();
            let guarded = crate::signon::Guarded {
                name,
                user: &user,
                shares: &shares,
                origin: &origin,
            };
            match crate::signon::gate_for(shared, &guarded, &mut parts) {
                Decision::Forward => {}
                Decision::Answer(r) => return Some(r),
            }
        }
        // A public reservation's page would tell anyone about the job: none.
        SessionLock::Public => return None,
    }
    let status = job_status(shared, &name, &job_id).await;
    if status.phase.is_final() && shared.queued.record(&name, &status, end_grace(shared)) {
        // The grace is over: the name ends for good, as a session's would.
        shared.queued.remove(&name);
        crate::agents::mark_ended(shared, name);
        crate::cluster::end_queued_for_good(shared, name);
        crate::state::save_soon(shared);
        return None;
    }
    if parts.uri.path() == STATUS_PATH {
        return Some(json_response(&status));
    }
    Some(html_page(&job_id, &status))
}

fn end_grace(shared: &Shared) -> Duration {
    Duration::from_secs(shared.config.queued_end_grace_secs)
}

async fn job_status(shared: &Shared, name: &SessionName, job_id: &str) -> JobStatus {
    if let Some(status) = shared.queued.cached(name) {
        return status;
    }
    let status = match &shared.config.slurm_status {
        Some(command) => ask_slurm(command, job_id).await,
        None => JobStatus::unknown("this relay has no slurm_status command"),
    };
    shared.queued.record(name, &status, end_grace(shared));
    status
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<RelayBody> {
    let mut response = crate::pages::relay_response(status, content_type, body);
    response.extensions_mut().insert(Page::Queued);
    response
}

fn json_response(status: &JobStatus) -> Response<RelayBody> {
    respond(
        StatusCode::OK,
        "application/json",
        status.to_json().to_string(),
    )
}

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html_page(job_id: &str, status: &JobStatus) -> Response<RelayBody> {
    let title = match status.phase {
        Phase::Queued => "Queued",
        Phase::Starting | Phase::Unknown => "Starting",
        Phase::Failed => "The job failed",
        Phase::Cancelled => "The job was cancelled",
        Phase::Ended => "The job has ended",
    };
    // The script polls the status; when the path stops being the relay's (the session is
    // up and the app answers it), the page reloads into the app. No user action needed.
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title} · jobgate</title>\
         <style>{style}</style></head>\
         <body><h1 id=\"title\">{title}</h1><p id=\"state\" data-state=\"{state}\">{sentence}</p>\
         <p><small>batch job {job} · jobgate relay</small></p>\
         <script>\
         const done={{failed:1,cancelled:1,ended:1}};\
         const titles={{queued:'Queued',starting:'Starting',unknown:'Starting',failed:'The job failed',cancelled:'The job was cancelled',ended:'The job has ended'}};\
         async function poll(){{\
           try{{const r=await fetch('{path}',{{cache:'no-store'}});\
             if(r.headers.get('x-jobgate')!=='relay'){{location.reload();return;}}\
             if(r.status===404){{location.reload();return;}}\
             const s=await r.json();const p=document.getElementById('state');\
             p.textContent=s.message;p.dataset.state=s.state;\
             document.getElementById('title').textContent=titles[s.state]||'Starting';\
             if(done[s.state])return;}}catch(e){{}}\
           setTimeout(poll,{poll});}}\
         setTimeout(poll,{poll});\
         </script></body></html>\n",
        style = crate::pages::PAGE_STYLE,
        state = status.phase.word(),
        sentence = escape(&status.sentence()),
        job = escape(job_id),
        path = STATUS_PATH,
        poll = POLL_MS,
    );
    // Not 200: scripts that wait for the URL to answer must not take this page for the app.
    let code = if status.phase.is_final() {
        StatusCode::GONE
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = respond(code, "text/html; charset=utf-8", body);
    if code == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(RETRY_AFTER_SECS),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_lines_read_as_the_page_says_them() {
        let pending = parse_scontrol(
            "JobId=42 JobName=jupyter UserId=alice(1000) JobState=PENDING Reason=Priority Dependency=(null) StartTime=2026-12-05T13:00:00 EndTime=Unknown",
        );
        assert_eq!(pending.phase, Phase::Queued);
        assert_eq!(pending.reason.as_deref(), Some("Priority"));
        assert_eq!(
            pending.expected_start.as_deref(),
            Some("2026-12-05T13:00:00")
        );
        assert!(pending.sentence().contains("Priority"));

        let held = parse_scontrol("JobId=43 JobState=PENDING Reason=JobHeldUser StartTime=Unknown");
        assert!(held.sentence().contains("JobHeldUser"));
        assert!(!held.sentence().contains("expects"));

        let failed = parse_scontrol("JobId=44 JobState=FAILED Reason=NonZeroExitCode ExitCode=1:0");
        assert_eq!(failed.phase, Phase::Failed);
        assert!(failed.sentence().contains("exit code 1:0"));
        assert_eq!(
            parse_scontrol("JobState=CANCELLED Reason=None").phase,
            Phase::Cancelled
        );
        assert_eq!(parse_scontrol("JobState=RUNNING").phase, Phase::Starting);
        assert_eq!(parse_scontrol("garbage \u{0} = =").phase, Phase::Unknown);
        assert_eq!(parse_scontrol("").phase, Phase::Unknown);
    }

    #[test]
    fn the_page_escapes_what_slurm_says() {
        let status = JobStatus {
            reason: Some("<script>x</script>".into()),
            ..parse_scontrol("JobState=PENDING")
        };
        let response = html_page("42<b>", &status);
        let RelayBody::Full(Some(body)) = response.into_body() else {
            panic!("full body");
        };
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("<script>x"), "{text}");
        assert!(!text.contains("42<b>"), "{text}");
    }
}
