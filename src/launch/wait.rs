//! After `sbatch`: follow the job on one progress line until the agent has the URL, or
//! explain why the job ended without one.

use super::slurm::{is_over, slurm_output_path, squeue_job, tail, SlurmJob};
use super::{code, hints};
use jobgate_agent::jobfile::{JobFile, JobRecord, SessionState};
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

/// Lines of the job's output shown when it failed.
const TAIL_LINES: usize = 20;
/// How often the job file is read while waiting (cheap, local or NFS).
const FILE_POLL: Duration = Duration::from_millis(100);
/// How often `squeue` is asked in the first minute (a quick start shows at once)...
const SQUEUE_POLL_FAST: Duration = Duration::from_secs(1);
/// ... and after it (spare slurmctld while a job waits in the queue).
const SQUEUE_POLL_SLOW: Duration = Duration::from_secs(5);
/// Running this long without a word from the agent earns a hint.
const SILENT_HINT: Duration = Duration::from_secs(60);
/// Longest text on the live progress line.
const LIVE_LINE_MAX: usize = 100;
/// `squeue` failures in a row before launch gives up watching (the job may still run).
const SQUEUE_ERRORS_MAX: u32 = 5;

/// One live line on a terminal; one line per change otherwise (logs, pipes).
pub(super) struct Progress {
    tty: bool,
    last: String,
    start: Instant,
    /// What the live line shows now (empty: nothing drawn).
    drawn_line: String,
}

impl Progress {
    pub(super) fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: String::new(),
            start: Instant::now(),
            drawn_line: String::new(),
        }
    }

    pub(super) fn show(&mut self, text: &str) {
        use std::io::Write;
        if self.tty {
            // Short enough not to wrap (a wrapped line cannot be redrawn in place).
            let mut line: String = text.chars().take(LIVE_LINE_MAX).collect();
            if line.len() < text.len() {
                line.push('…');
            }
            let line = format!("jobgate: {line} [{} s]", self.start.elapsed().as_secs());
            if line != self.drawn_line {
                eprint!("\r\x1b[2K{line}");
                let _ = std::io::stderr().flush();
                self.drawn_line = line;
            }
        } else if text != self.last {
            eprintln!(
                "jobgate: {text} [{:.1} s]",
                self.start.elapsed().as_secs_f64()
            );
        }
        self.last = text.to_owned();
    }

    /// A message of its own line, below the live one.
    fn note(&mut self, text: &str) {
        self.finish();
        eprintln!("jobgate: {text}");
    }

    /// Ends the live line so that other output starts on a fresh line.
    fn finish(&mut self) {
        if self.tty && !self.drawn_line.is_empty() {
            eprintln!();
            self.drawn_line.clear();
        }
    }
}

/// Follows the job until the URL appears, the job fails, or Ctrl-C.
pub(super) async fn wait_for_url(
    job_id: &str,
    file: &JobFile,
    output: Option<String>,
    submitted: Instant,
    progress: &mut Progress,
) -> i32 {
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    let mut slurm_state: Option<SlurmJob> = None;
    let mut next_squeue = Instant::now();
    let mut running_since: Option<Instant> = None;
    let mut hinted = false;
    let mut squeue_errors = 0u32;
    loop {
        let record = file.read().ok().flatten();
        if let Some(record) = &record {
            if let (SessionState::Connected, Some(url)) = (record.state, &record.url) {
                progress.show(&format!(
                    "job {job_id} connected, {:.1} s after submission",
                    submitted.elapsed().as_secs_f64()
                ));
                progress.finish();
                println!("{url}");
                hints(job_id);
                return code::OK;
            }
            if record.state == SessionState::Ended {
                progress.finish();
                return job_failed(job_id, record, slurm_state.as_ref(), output.as_deref()).await;
            }
        }
        if Instant::now() >= next_squeue {
            let pace = if submitted.elapsed() < Duration::from_secs(60) {
                SQUEUE_POLL_FAST
            } else {
                SQUEUE_POLL_SLOW
            };
            next_squeue = Instant::now() + pace;
            match squeue_job(job_id).await {
                Ok(job) => {
                    squeue_errors = 0;
                    let over = job
                        .as_ref()
                        .is_none_or(|j| is_over(&j.state) || j.state == "COMPLETING");
                    if over {
                        // The agent's last word (its error) may have come just now.
                        progress.finish();
                        let record = file
                            .read()
                            .ok()
                            .flatten()
                            .unwrap_or_else(|| JobRecord::new(job_id, SessionState::Submitted));
                        return job_failed(job_id, &record, job.as_ref(), output.as_deref()).await;
                    }
                    slurm_state = job;
                }
                Err(e) => {
                    squeue_errors += 1;
                    if squeue_errors >= SQUEUE_ERRORS_MAX {
                        progress.finish();
                        eprintln!("jobgate: {e}");
                        eprintln!("jobgate: job {job_id} may still be running.");
                        hints(job_id);
                        return code::FAILED;
                    }
                }
            }
        }
        let running = slurm_state
            .as_ref()
            .is_some_and(|j| matches!(j.state.as_str(), "RUNNING" | "CONFIGURING"));
        let silent = record
            .as_ref()
            .is_none_or(|r| r.state == SessionState::Submitted);
        if running && silent {
            let since = *running_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= SILENT_HINT && !hinted {
                hinted = true;
                progress.note(&format!(
                    "job {job_id} has run for {} s without a word from its agent: is your home \
                     directory shared with the compute nodes? The job's output: {}",
                    SILENT_HINT.as_secs(),
                    output.as_deref().unwrap_or("see `scontrol show job`")
                ));
            }
        }
        progress.show(&progress_text(
            job_id,
            slurm_state.as_ref(),
            record.as_ref(),
        ));
        tokio::select! {
            _ = tokio::time::sleep(FILE_POLL) => {}
            _ = &mut interrupt => {
                progress.finish();
                eprintln!("jobgate: stopped watching; job {job_id} keeps running (it is not cancelled).");
                hints(job_id);
                return code::INTERRUPTED;
            }
        }
    }
}

fn progress_text(job_id: &str, job: Option<&SlurmJob>, record: Option<&JobRecord>) -> String {
    let node = job
        .map(|j| j.nodes.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| record.and_then(|r| r.host.clone()));
    let on = node.map(|n| format!(" on {n}")).unwrap_or_default();
    // The agent's own word is fresher than the last squeue.
    match record.map(|r| r.state) {
        Some(SessionState::Submitted) | None => {}
        Some(state) => return format!("job {job_id}{on}: {}", state.describe()),
    }
    let Some(job) = job else {
        return format!("job {job_id} submitted");
    };
    match job.state.as_str() {
        "PENDING" => match job.reason.as_str() {
            "" | "None" => format!("job {job_id} queued"),
            reason => format!("job {job_id} queued ({reason})"),
        },
        "RUNNING" | "CONFIGURING" => format!("job {job_id} starting{on}"),
        other => format!("job {job_id} {}", other.to_lowercase()),
    }
}

/// Explains why the job ended without a URL, with the tail of its output.
async fn job_failed(
    job_id: &str,
    record: &JobRecord,
    job: Option<&SlurmJob>,
    output: Option<&str>,
) -> i32 {
    match job.filter(|j| is_over(&j.state) || j.state == "COMPLETING") {
        Some(job) => eprintln!(
            "jobgate: job {job_id} ended ({}) before the URL appeared.",
            job.state
        ),
        None if record.state == SessionState::Ended => {
            eprintln!("jobgate: the agent in job {job_id} ended before the URL appeared.")
        }
        None => eprintln!("jobgate: job {job_id} ended before the URL appeared."),
    }
    if let Some(error) = &record.error {
        eprintln!("jobgate: the agent said: {error}");
        if error.contains("refused") && error.contains("token") {
            eprintln!(
                "jobgate: check your token (~/.config/jobgate/token, JOBGATE_TOKEN_FILE or \
                 --token-file); your admins issue a new one with `jobgate token issue`."
            );
        }
    }
    let path = match output {
        Some(path) => Some(path.to_owned()),
        None => slurm_output_path(job_id).await,
    };
    match path {
        Some(path) => {
            // Slurm may still be flushing the last lines.
            tokio::time::sleep(Duration::from_millis(200)).await;
            match tail(Path::new(&path), TAIL_LINES) {
                Ok(text) if !text.trim().is_empty() => {
                    eprintln!("jobgate: the last lines of {path}:");
                    for line in text.lines() {
                        eprintln!("  | {line}");
                    }
                }
                Ok(_) => eprintln!("jobgate: its output file {path} is empty."),
                Err(e) => eprintln!("jobgate: cannot read its output file {path}: {e}"),
            }
        }
        None => eprintln!("jobgate: Slurm no longer knows its output file."),
    }
    code::FAILED
}
