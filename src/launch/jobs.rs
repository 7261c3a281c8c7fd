//! `jobgate jobs` (the user's sessions, from their job files and `squeue`) and the
//! clean-up of files left by ended jobs.

use super::slurm::{is_over, squeue_mine, SlurmJob};
use super::{code, fail, JobsArgs, LaunchError, OUTPUT_KEEP};
use jobgate_agent::jobfile::{self, JobFile, JobRecord, SessionState};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Job files in `dir`: (job id, file), for names that are job ids.
pub(super) fn job_files(dir: &Path) -> Vec<(String, JobFile)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<(String, JobFile)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id = name.strip_suffix(".json")?;
            Some((id.to_owned(), JobFile::in_dir(dir, id)?))
        })
        .collect();
    files.sort_by_key(|(id, _)| numeric_key(id));
    files
}

fn numeric_key(id: &str) -> (u64, String) {
    let digits: String = id.chars().take_while(char::is_ascii_digit).collect();
    (digits.parse().unwrap_or(u64::MAX), id.to_owned())
}

fn modified_before(path: &Path, when: SystemTime) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map(|m| m < when)
        .unwrap_or(false)
}

/// Removes the files of jobs Slurm says are over: job files at once, output files after
/// [`OUTPUT_KEEP`]. `asked` is when `squeue` was asked: files written since are kept (a
/// launch that just submitted its job).
pub(super) fn clean_up(
    dir: &Path,
    live: &BTreeMap<String, SlurmJob>,
    asked: SystemTime,
) -> Vec<String> {
    let alive = |id: &str| live.get(id).is_some_and(|j| !is_over(&j.state));
    let mut removed = Vec::new();
    for (id, file) in job_files(dir) {
        if !alive(&id) && modified_before(file.path(), asked) && file.remove().is_ok() {
            removed.push(id);
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    let old = asked
        .checked_sub(OUTPUT_KEEP)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        // A reservation is useless once its job is over (and no secret should linger).
        if let Some(id) = name.strip_suffix(".reservation") {
            if jobfile::valid_job_id(id) && !alive(id) && modified_before(&entry.path(), asked) {
                let _ = std::fs::remove_file(entry.path());
            }
            continue;
        }
        let stale = match name.strip_suffix(".out") {
            Some(id) => {
                jobfile::valid_job_id(id) && !alive(id) && modified_before(&entry.path(), old)
            }
            // Temporary files of writers that died mid-write.
            None => {
                let hour_ago = asked
                    .checked_sub(Duration::from_secs(3600))
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                name.starts_with('.')
                    && name.ends_with(".tmp")
                    && modified_before(&entry.path(), hour_ago)
            }
        };
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    removed
}

/// `jobgate jobs`.
pub async fn run_jobs(_args: JobsArgs) -> i32 {
    let Some(dir) = jobfile::jobs_dir() else {
        return fail(LaunchError::usage("HOME is not set"));
    };
    let files = job_files(&dir);
    if files.is_empty() {
        eprintln!("jobgate: no sessions (start one with `jobgate launch`)");
        return code::OK;
    }
    let asked = SystemTime::now();
    let live = match squeue_mine().await {
        Ok(live) => live,
        Err(e) => return fail(e),
    };
    let mut rows = vec![[
        "JOBID".to_owned(),
        "STATE".to_owned(),
        "STARTED".to_owned(),
        "LEFT".to_owned(),
        "URL".to_owned(),
    ]];
    for (id, file) in &files {
        let record = match file.read() {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(e) => {
                rows.push([
                    id.clone(),
                    "?".into(),
                    "-".into(),
                    "-".into(),
                    format!("(unreadable job file: {e})"),
                ]);
                continue;
            }
        };
        rows.push(job_row(id, &record, live.get(id)));
    }
    print_table(&rows);
    let removed = clean_up(&dir, &live, asked);
    if !removed.is_empty() {
        eprintln!(
            "jobgate: forgot ended job{} {}",
            if removed.len() == 1 { "" } else { "s" },
            removed.join(", ")
        );
    }
    code::OK
}

/// One row of `jobgate jobs`.
pub fn job_row(id: &str, record: &JobRecord, job: Option<&SlurmJob>) -> [String; 5] {
    let dash = || "-".to_owned();
    let Some(job) = job.filter(|j| !is_over(&j.state)) else {
        let note = match &record.error {
            Some(error) => format!("({error})"),
            None => "(ended)".into(),
        };
        return [id.to_owned(), "ended".into(), dash(), dash(), note];
    };
    let state = job.state.to_lowercase();
    let url = match (job.state.as_str(), record.state, &record.url) {
        ("PENDING", _, _) => match job.reason.as_str() {
            "" | "None" => "(queued)".to_owned(),
            reason => format!("(queued: {reason})"),
        },
        (_, SessionState::Connected, Some(url)) => url.clone(),
        (_, SessionState::Reconnecting, Some(url)) => format!("{url} (reconnecting)"),
        (_, SessionState::Ended, _) => match &record.error {
            Some(error) => format!("(agent ended: {error})"),
            None => "(agent ended)".into(),
        },
        (_, SessionState::Submitted, _) => "(starting)".into(),
        (_, state, _) => format!("({})", state.describe()),
    };
    let started = match job.state.as_str() {
        "PENDING" => dash(),
        _ => job.start.replace('T', " "),
    };
    let left = match job.left.as_str() {
        "" | "INVALID" | "NOT_SET" => dash(),
        left => left.to_owned(),
    };
    [id.to_owned(), state, started, left, url]
}

fn print_table(rows: &[[String; 5]]) {
    let mut widths = [0usize; 5];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::test_util::strings;

    #[test]
    fn rows_say_where_each_session_stands() {
        let job = |state: &str, reason: &str| SlurmJob {
            id: "12".into(),
            state: state.into(),
            reason: reason.into(),
            start: "2026-11-30T12:30:44".into(),
            left: "1:59:10".into(),
            nodes: "n1".into(),
        };
        let mut record = JobRecord::new("12", SessionState::Connected);
        record.url = Some("https://a.d/?jobgate_key=K".into());
        let row = job_row("12", &record, Some(&job("RUNNING", "None")));
        assert_eq!(row[1], "running");
        assert_eq!(row[2], "2026-11-30 12:30:44");
        assert_eq!(row[4], "https://a.d/?jobgate_key=K");
        let row = job_row("12", &record, None);
        assert_eq!(row[1], "ended");
        let row = job_row("12", &record, Some(&job("CANCELLED", "None")));
        assert_eq!(row[1], "ended");
        let queued = JobRecord::new("12", SessionState::Submitted);
        let row = job_row("12", &queued, Some(&job("PENDING", "Resources")));
        assert_eq!(
            (row[1].as_str(), row[4].as_str()),
            ("pending", "(queued: Resources)")
        );
    }

    #[test]
    fn clean_up_forgets_ended_jobs_only() {
        let dir =
            std::env::temp_dir().join(format!("jobgate-clean-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).expect("dir");
        for id in ["1", "2", "3"] {
            JobFile::in_dir(&dir, id)
                .expect("id")
                .write(&JobRecord::new(id, SessionState::Connected))
                .expect("write");
        }
        std::fs::write(dir.join("notes.json.bak"), "keep").expect("other file");
        let asked = SystemTime::now() + Duration::from_secs(1);
        let live = BTreeMap::from([
            (
                "1".to_owned(),
                SlurmJob {
                    id: "1".into(),
                    state: "RUNNING".into(),
                    reason: String::new(),
                    start: String::new(),
                    left: String::new(),
                    nodes: String::new(),
                },
            ),
            (
                "2".to_owned(),
                SlurmJob {
                    id: "2".into(),
                    state: "COMPLETED".into(),
                    reason: String::new(),
                    start: String::new(),
                    left: String::new(),
                    nodes: String::new(),
                },
            ),
        ]);
        let mut removed = clean_up(&dir, &live, asked);
        removed.sort();
        assert_eq!(removed, strings(&["2", "3"]));
        assert!(dir.join("1.json").exists());
        assert!(dir.join("notes.json.bak").exists());
        // Files written after squeue was asked (a launch that just submitted) stay.
        JobFile::in_dir(&dir, "4")
            .expect("id")
            .write(&JobRecord::new("4", SessionState::Submitted))
            .expect("write");
        assert!(clean_up(&dir, &live, SystemTime::now() - Duration::from_secs(5)).is_empty());
        assert!(dir.join("4.json").exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
