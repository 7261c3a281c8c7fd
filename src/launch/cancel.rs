//! `jobgate cancel`: `scancel`, then wait until Slurm says the job is gone.

use super::slurm::{is_over, slurm, squeue_job};
use super::{code, fail, CancelArgs, LaunchError, CANCEL_WAIT};
use jobgate_agent::jobfile::{self, JobFile};
use std::time::{Duration, Instant};

/// `jobgate cancel`.
pub async fn run_cancel(args: CancelArgs) -> i32 {
    let mut result = code::OK;
    for id in &args.jobs {
        if !jobfile::valid_job_id(id) {
            eprintln!("jobgate: {id:?} is not a job id");
            result = code::USAGE;
            continue;
        }
        let code = cancel_one(id).await;
        if code != code::OK {
            result = code;
        }
    }
    result
}

async fn cancel_one(id: &str) -> i32 {
    let start = Instant::now();
    let out = match slurm("scancel", &[id], None).await {
        Ok(out) => out,
        Err(e) => return fail(e),
    };
    if !out.success {
        // Already over is fine: the job is gone, which is what was asked.
        match squeue_job(id).await {
            Ok(job) if job.as_ref().is_none_or(|j| is_over(&j.state)) => {
                eprintln!("jobgate: job {id} had already ended");
                forget(id);
                return code::OK;
            }
            _ => {}
        }
        eprintln!("jobgate: scancel refused:");
        for line in out.stderr.lines() {
            eprintln!("  {line}");
        }
        return code::FAILED;
    }
    let mut interrupt = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        match squeue_job(id).await {
            Ok(job) if job.as_ref().is_none_or(|j| is_over(&j.state)) => {
                eprintln!(
                    "jobgate: job {id} cancelled; gone after {:.1} s (its URL is dead)",
                    start.elapsed().as_secs_f64()
                );
                forget(id);
                return code::OK;
            }
            Ok(_) => {}
            Err(e) => eprintln!("jobgate: {e}"),
        }
        if start.elapsed() >= CANCEL_WAIT {
            return fail(LaunchError::Slurm(format!(
                "job {id} is still not gone {} s after scancel (see squeue -j {id})",
                CANCEL_WAIT.as_secs()
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut interrupt => {
                eprintln!("jobgate: stopped waiting; job {id} was asked to end and will.");
                return code::INTERRUPTED;
            }
        }
    }
}

/// Removes a job's file once it is gone.
fn forget(id: &str) {
    if let Some(file) = JobFile::for_job(id) {
        let _ = file.remove();
    }
}
