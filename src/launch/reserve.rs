//! The URL at submit time: right after `sbatch`, `launch` asks the relay to reserve the
//! session's name for the job and prints the URL at once.
//!
//! The job is submitted held (`sbatch --hold`) so that its agent cannot start before the
//! reservation is in place; the reservation goes into `~/.jobgate/jobs/<jobid>.reservation`
//! (0600 in a 0700 directory, never in the batch script, the job's environment or a log,
//! since Slurm may store both and show them to admins), then the job is released. The
//! agent in the job finds the file by its `SLURM_JOB_ID` and presents the reservation.

use super::slurm::slurm;
use super::{LaunchArgs, LaunchError};
use jobgate_agent::dial::{reserve, DialConfig, Reserved};
use std::path::{Path, PathBuf};

/// The name of job `job_id`'s reservation file in the jobs directory.
pub fn reservation_path(dir: &Path, job_id: &str) -> PathBuf {
    dir.join(format!("{job_id}.reservation"))
}

/// Asks the relay for a name for `job_id` and stores the reservation for the job's agent.
/// `None` (with a warning) where it cannot: the job then runs as before, its URL known
/// only once it runs.
pub(super) async fn reserve_for_job(
    args: &LaunchArgs,
    dir: &Path,
    job_id: &str,
) -> Option<Reserved> {
    let relay = args.relay.clone()?;
    let token = match jobgate_agent::token::load_token(args.token_file.clone()) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("jobgate: warning: no URL before the job starts: {e}");
            return None;
        }
    };
    let config = DialConfig {
        transport: args.transport.unwrap_or_default(),
        relay_tcp: args.relay_tcp.clone(),
        proxy: args.proxy.clone(),
        ..DialConfig::new(relay, args.relay_ca.clone())
    };
    let reserved = match reserve(&config, token, args.access, job_id).await {
        Ok(reserved) => reserved,
        Err(e) => {
            eprintln!("jobgate: warning: the relay reserved no URL for job {job_id} ({e}): it shows once the job runs");
            return None;
        }
    };
    let path = reservation_path(dir, job_id);
    // The reservation, then the access URL (the agent's own copy of the URL needs its key).
    let contents = format!("{}\n{}\n", reserved.reservation.0, reserved.access_url);
    if let Err(e) = jobgate_agent::token::write_private(&path, &contents) {
        eprintln!("jobgate: warning: cannot write {}: {e}", path.display());
        return None;
    }
    Some(reserved)
}

/// Releases the job `launch` submitted held.
pub(super) async fn release(job_id: &str) -> Result<(), LaunchError> {
    let out = slurm("scontrol", &["release", job_id], None).await?;
    if out.success {
        return Ok(());
    }
    Err(LaunchError::Slurm(format!(
        "cannot release job {job_id} (submitted held): {}; run `scontrol release {job_id}` or `jobgate cancel {job_id}`",
        out.stderr
    )))
}
