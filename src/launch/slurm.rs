//! Talking to Slurm: `sbatch`, `squeue`, `scontrol`, `scancel` as child processes, and
//! what their output means.

use super::LaunchError;
use std::collections::BTreeMap;
use std::path::Path;

/// A Slurm command's outcome.
pub(super) struct Output {
    /// Whether it exited 0.
    pub success: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error, trailing blanks trimmed.
    pub stderr: String,
}

/// Runs a Slurm command, `stdin` written to it.
pub(super) async fn slurm(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, LaunchError> {
    use tokio::io::AsyncWriteExt;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(if stdin.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| {
        LaunchError::Slurm(if e.kind() == std::io::ErrorKind::NotFound {
            format!("{program} is not on PATH: is this a Slurm login node?")
        } else {
            format!("cannot run {program}: {e}")
        })
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|e| LaunchError::Slurm(format!("cannot write to {program}: {e}")))?;
        drop(pipe);
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| LaunchError::Slurm(format!("{program} failed: {e}")))?;
    Ok(Output {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr)
            .trim_end()
            .to_owned(),
    })
}

/// A job as `squeue` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmJob {
    /// Job id (`%A`: unique per array element).
    pub id: String,
    /// PENDING, RUNNING, COMPLETED, ...
    pub state: String,
    /// Why it waits (Priority, Resources, ...), or `None`.
    pub reason: String,
    /// Start time (actual, or expected while pending).
    pub start: String,
    /// Time left.
    pub left: String,
    /// Node(s).
    pub nodes: String,
}

const SQUEUE_FORMAT: &str = "%A|%T|%r|%S|%L|%N";

/// Parses `squeue -h -o SQUEUE_FORMAT` output.
pub fn parse_squeue(text: &str) -> Vec<SlurmJob> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.trim().splitn(6, '|');
            Some(SlurmJob {
                id: f.next()?.trim().to_owned(),
                state: f.next()?.trim().to_owned(),
                reason: f.next()?.trim().to_owned(),
                start: f.next()?.trim().to_owned(),
                left: f.next()?.trim().to_owned(),
                nodes: f.next().unwrap_or("").trim().to_owned(),
            })
        })
        .filter(|job| !job.id.is_empty())
        .collect()
}

/// Whether a job in `state` is over (its processes are gone or going).
pub fn is_over(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED"
            | "CANCELLED"
            | "FAILED"
            | "TIMEOUT"
            | "NODE_FAIL"
            | "PREEMPTED"
            | "BOOT_FAIL"
            | "DEADLINE"
            | "OUT_OF_MEMORY"
            | "REVOKED"
            | "SPECIAL_EXIT"
    )
}

/// One job's state; `Ok(None)` when Slurm no longer knows it.
pub(super) async fn squeue_job(id: &str) -> Result<Option<SlurmJob>, LaunchError> {
    let out = slurm(
        "squeue",
        &["-h", "-t", "all", "-j", id, "-o", SQUEUE_FORMAT],
        None,
    )
    .await?;
    if !out.success {
        if out.stderr.contains("Invalid job id") {
            return Ok(None);
        }
        return Err(LaunchError::Slurm(format!("squeue failed: {}", out.stderr)));
    }
    Ok(parse_squeue(&out.stdout).into_iter().find(|j| j.id == id))
}

/// All my jobs Slurm still knows, by id.
pub(super) async fn squeue_mine() -> Result<BTreeMap<String, SlurmJob>, LaunchError> {
    let out = slurm(
        "squeue",
        &["-h", "--me", "-t", "all", "-o", SQUEUE_FORMAT],
        None,
    )
    .await?;
    if !out.success {
        return Err(LaunchError::Slurm(format!("squeue failed: {}", out.stderr)));
    }
    Ok(parse_squeue(&out.stdout)
        .into_iter()
        .map(|j| (j.id.clone(), j))
        .collect())
}

/// The job's output file, as Slurm has it.
pub(super) async fn slurm_output_path(id: &str) -> Option<String> {
    let out = slurm("scontrol", &["show", "job", id], None).await.ok()?;
    out.stdout.lines().find_map(|line| {
        line.trim_start()
            .strip_prefix("StdOut=")
            .map(|p| p.trim_end().to_owned())
    })
}

/// The last `lines` lines of a file (reading at most its last 64 KiB).
pub fn tail(path: &Path, lines: usize) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    Ok(all[from..].join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_lines_parse() {
        let jobs = parse_squeue(
            "12|RUNNING|None|2026-11-30T12:30:44|1:59:10|node1\n13|PENDING|Priority|N/A|2:00:00|\n\n",
        );
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].id, "12");
        assert_eq!(jobs[0].nodes, "node1");
        assert_eq!(jobs[1].reason, "Priority");
        assert!(is_over("CANCELLED") && is_over("TIMEOUT") && !is_over("COMPLETING"));
        assert!(!is_over("PENDING") && !is_over("RUNNING"));
    }

    #[test]
    fn tails_are_the_last_lines() {
        let path =
            std::env::temp_dir().join(format!("jobgate-tail-{:016x}", rand::random::<u64>()));
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).expect("write");
        let t = tail(&path, 3).expect("tail");
        assert_eq!(t, "line 98\nline 99\nline 100");
        std::fs::remove_file(&path).expect("cleanup");
        assert!(tail(&path, 3).is_err());
    }
}
