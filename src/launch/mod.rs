//! `jobgate launch`, `jobgate jobs`, `jobgate cancel`: from the login node to a working URL
//! in one command, on Slurm.
//!
//! `launch` renders a batch script from a template (built in, or the site's
//! `/etc/jobgate/launch.sbatch`, or the user's `~/.config/jobgate/launch.sbatch`), submits it
//! with `sbatch --parsable` (the script on stdin), and follows the job on one progress line
//! until the agent in the job writes the URL into the job file
//! (`~/.jobgate/jobs/<jobid>.json`, see [`jobgate_agent::jobfile`]). `jobs` lists the
//! sessions those files describe, with the state `squeue` gives; `cancel` runs `scancel`
//! and waits until the job is gone. Job files of ended jobs are removed by `jobs` and
//! `launch`.
//!
//! Templates use `{{name}}` placeholders. Every value is quoted for where it lands: for
//! `sbatch` on `#SBATCH` lines (double quotes, backslash escapes), for the shell elsewhere
//! (single quotes); `{{sbatch_options}}` and `{{agent}}` are ready-made, already quoted
//! text. An unknown placeholder is an error, so a typo never submits a broken job.
//!
//! One file per step: [`template`] (placeholders and quoting), [`spec`] (flags → a checked
//! [`spec::JobSpec`]), [`slurm`] (the Slurm commands and their output), [`wait`] (the progress
//! line until the URL), [`jobs`] and [`cancel`]. Every failure is a [`LaunchError`], whose
//! [`LaunchError::exit_code`] the binary exits with.

pub mod cancel;
pub mod jobs;
pub mod reserve;
pub mod slurm;
pub mod spec;
pub mod template;
pub mod wait;

pub use cancel::run_cancel;
pub use jobs::run_jobs;

use clap::Args;
use jobgate_agent::jobfile::{self, JobFile, JobRecord, SessionState};
use jobs::{clean_up, job_files};
use slurm::{slurm, squeue_mine};
use spec::job_spec;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};
use template::{
    load_template, render, template_candidates, template_source, TemplateError, TemplateSource,
};
use thiserror::Error;
use wait::{wait_for_url, Progress};

/// Default time limit.
const DEFAULT_TIME: &str = "2:00:00";
/// How long `cancel` waits for the job to be gone.
const CANCEL_WAIT: Duration = Duration::from_secs(120);
/// Output files of ended jobs are kept this long (for `tail`), then removed.
const OUTPUT_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// Exit codes of `launch`, `jobs` and `cancel`.
pub mod code {
    /// Done.
    pub const OK: i32 = 0;
    /// Slurm refused, the job failed, a Slurm command failed.
    pub const FAILED: i32 = 1;
    /// Bad flags or template: the same code as the agent's (one table, in the agent crate).
    pub const USAGE: i32 = jobgate_agent::exit::USAGE;
    /// Ctrl-C while waiting (the job keeps running).
    pub const INTERRUPTED: i32 = 130;
}

/// Why `launch`, `jobs` or `cancel` could not do what was asked.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// Bad flags or environment: nothing was submitted.
    #[error("{0}")]
    Usage(String),
    /// A config file (the site's or the user's jobgate.toml) cannot be used.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The template cannot be read or rendered: nothing was submitted.
    #[error("template {from}: {error}")]
    Template {
        /// Which template.
        from: TemplateSource,
        /// What is wrong with it.
        error: TemplateError,
    },
    /// A Slurm command could not run, or failed.
    #[error("{0}")]
    Slurm(String),
    /// A local file or directory could not be used.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was tried ("create", "read" ...).
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl LaunchError {
    /// The exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) | Self::Config(_) | Self::Template { .. } => code::USAGE,
            Self::Slurm(_) | Self::Io { .. } => code::FAILED,
        }
    }

    /// A usage error with this message.
    fn usage(message: impl Into<String>) -> Self {
        Self::Usage(message.into())
    }
}

/// `jobgate launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Slurm partition.
    #[arg(long, short = 'p')]
    pub(crate) partition: Option<String>,
    /// Slurm account to charge.
    #[arg(long, short = 'A')]
    pub(crate) account: Option<String>,
    /// Time limit (Slurm's formats: 2:00:00, 1-12:00:00, 90) [default: 2:00:00].
    #[arg(long, short = 't')]
    pub(crate) time: Option<String>,
    /// CPUs for the app (--cpus-per-task).
    #[arg(long, short = 'c')]
    pub(crate) cpus: Option<u32>,
    /// Memory for the job, e.g. 8G (--mem).
    #[arg(long)]
    pub(crate) mem: Option<String>,
    /// GPUs, e.g. 1 or a100:1 (--gpus).
    #[arg(long)]
    pub(crate) gpus: Option<String>,
    /// Job name [default: jupyter, or the app's program name].
    #[arg(long, short = 'J')]
    pub(crate) job_name: Option<String>,
    /// Run the app inside this Apptainer/Singularity image (the agent stays outside).
    #[arg(long, value_name = "IMAGE")]
    pub(crate) sif: Option<PathBuf>,
    /// An option for `apptainer exec`, e.g. --sif-option=--bind=/scratch (repeatable)
    /// [default with --gpus: --nv].
    #[arg(
        long,
        value_name = "OPTION",
        allow_hyphen_values = true,
        requires = "sif"
    )]
    pub(crate) sif_option: Vec<String>,
    /// Seconds the app has to accept connections once started: the agent's
    /// --ready-timeout, for apps slow to start (cold file systems, many extensions)
    /// [default: 300].
    #[arg(long, value_name = "SECS")]
    pub(crate) ready_timeout: Option<u64>,
    /// Directory the app starts in [default: the current directory].
    #[arg(long, value_name = "DIR")]
    pub(crate) workdir: Option<PathBuf>,
    /// Template to use instead of the user's, the site's or the built-in one.
    #[arg(long, value_name = "FILE")]
    pub(crate) template: Option<PathBuf>,
    /// Print the batch script instead of submitting it.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Print the URL (reserved by the relay for the job) as soon as `sbatch` returns and
    /// exit, instead of following the job until the app is up.
    #[arg(long)]
    pub(crate) no_wait: bool,
    /// Relay QUIC address, HOST:PORT, for the agent in the job.
    #[arg(long, env = "JOBGATE_RELAY")]
    pub(crate) relay: Option<String>,
    /// CA certificate (PEM) the agent trusts for the relay.
    #[arg(long, env = "JOBGATE_RELAY_CA")]
    pub(crate) relay_ca: Option<PathBuf>,
    /// Token file for the agent [default: ~/.config/jobgate/token].
    #[arg(long, env = "JOBGATE_TOKEN_FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// How `launch` reaches the relay to reserve the URL (the config files' `transport`,
    /// `relay_tcp` and `proxy`, as the agent's): login nodes may block UDP too.
    #[arg(skip)]
    pub(crate) transport: Option<jobgate_agent::dial::TransportChoice>,
    #[arg(skip)]
    pub(crate) relay_tcp: Option<String>,
    #[arg(skip)]
    pub(crate) proxy: Option<String>,
    /// The access mode the job's agent will ask for (the config files' `access`; unset:
    /// the relay's default), so that the reserved URL is guarded as the session will be.
    #[arg(skip)]
    pub(crate) access: Option<jobgate_protocol::AccessMode>,
    /// Run JupyterLab (arguments after `--` go to `jupyter lab`).
    #[arg(long)]
    pub(crate) jupyter: bool,
    /// The app: `{port}` becomes a free loopback port, `{sock}` a private unix socket.
    #[arg(last = true, value_name = "COMMAND")]
    pub(crate) command: Vec<String>,
}

impl LaunchArgs {
    /// Fills what the flags (and their environment variables) left open from the site's
    /// and the user's config files, then the built-in defaults.
    fn with_defaults(mut self, config: &crate::config::ClientConfig) -> Self {
        let defaults = &config.launch;
        self.partition = self.partition.or_else(|| defaults.partition.clone());
        self.account = self.account.or_else(|| defaults.account.clone());
        self.time = self
            .time
            .or_else(|| defaults.time.clone())
            .or_else(|| Some(DEFAULT_TIME.to_owned()));
        self.cpus = self.cpus.or(defaults.cpus);
        self.mem = self.mem.or_else(|| defaults.mem.clone());
        self.gpus = self.gpus.or_else(|| defaults.gpus.clone());
        self.template = self.template.or_else(|| defaults.template.clone());
        if self.sif.is_none() {
            self.sif = defaults.sif.clone();
            if self.sif_option.is_empty() {
                self.sif_option = defaults.sif_option.clone().unwrap_or_default();
            }
        }
        self.relay = self.relay.or_else(|| config.relay.clone());
        self.relay_ca = self.relay_ca.or_else(|| config.relay_ca.clone());
        self.token_file = self.token_file.or_else(|| config.token_file.clone());
        self.transport = config.transport;
        self.relay_tcp = config.relay_tcp.clone();
        self.proxy = config.proxy.clone();
        self.access = config.access;
        self.ready_timeout = self.ready_timeout.or(config.ready_timeout);
        self
    }
}

/// `jobgate jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {}

/// `jobgate cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Job ids (as `jobgate jobs` shows them).
    #[arg(required = true, value_name = "JOBID")]
    pub(crate) jobs: Vec<String>,
}

/// `jobgate launch`: returns the exit code.
pub async fn run_launch(args: LaunchArgs) -> i32 {
    match launch(args).await {
        Ok(code) => code,
        Err(error) => fail(error),
    }
}

/// Renders the script, submits it and follows the job until its URL (or its failure).
async fn launch(args: LaunchArgs) -> Result<i32, LaunchError> {
    let args = args.with_defaults(&crate::config::ClientConfig::load()?);
    let source = template_source(args.template.clone(), &template_candidates());
    let template = load_template(&source)?;
    let (spec, warnings) = job_spec(&args, &template)?;
    let script = render(&template, &spec.vars()?).map_err(|error| LaunchError::Template {
        from: source.clone(),
        error,
    })?;
    for warning in &warnings {
        eprintln!("jobgate: warning: {warning}");
    }
    if args.dry_run {
        eprintln!("jobgate: the script from {source} (not submitted):");
        print!("{script}");
        return Ok(code::OK);
    }
    let dir = jobfile::jobs_dir().ok_or_else(|| LaunchError::usage("HOME is not set"))?;
    jobfile::ensure_private_dir(&dir).map_err(|source| LaunchError::Io {
        action: "create",
        path: dir.clone(),
        source,
    })?;
    // Tidy up after ended jobs (never fatal).
    if !job_files(&dir).is_empty() {
        let asked = SystemTime::now();
        if let Ok(live) = squeue_mine().await {
            clean_up(&dir, &live, asked);
        }
    }

    let submitted = Instant::now();
    // Held until its reservation is stored, so that its agent finds it (see `reserve`).
    let hold = args.relay.is_some();
    let job_id = submit(&script, hold).await?;
    let file = JobFile::in_dir(&dir, &job_id)
        .ok_or_else(|| LaunchError::Slurm(format!("sbatch answered {job_id:?}, not a job id")))?;
    let reserved = if hold {
        let reserved = reserve::reserve_for_job(&args, &dir, &job_id).await;
        reserve::release(&job_id).await?;
        reserved
    } else {
        None
    };
    // `--no-wait`: the URL is launch's only output, for scripts. Waiting: shown now, and
    // printed on stdout once the app is up, as the agent has it (with e.g. Jupyter's
    // token added).
    match (&reserved, args.no_wait) {
        (Some(reserved), true) => println!("{}", reserved.access_url),
        (Some(reserved), false) => eprintln!(
            "jobgate: job {job_id}'s URL (it shows the app once the job runs): {}",
            reserved.access_url
        ),
        (None, _) => {}
    }
    let output = (template.contains("{{output}}") || template.contains("{{sbatch_options}}"))
        .then(|| spec.output.replace("%j", &job_id));
    let recorded = file.read().ok().flatten();
    let mut record = recorded.unwrap_or_else(|| JobRecord::new(&job_id, SessionState::Submitted));
    record.submitted_at = Some(jobfile::now());
    record.output = output.clone();
    record.command = Some(spec.describe());
    if let Err(e) = file.write(&record) {
        eprintln!(
            "jobgate: warning: cannot write {}: {e}",
            file.path().display()
        );
    }
    if args.no_wait {
        if reserved.is_none() {
            eprintln!("jobgate: job {job_id} submitted; no URL was reserved, `jobgate jobs` shows it once the job runs.");
        }
        hints(&job_id);
        return Ok(code::OK);
    }
    let mut progress = Progress::new();
    progress.show(&format!("job {job_id} submitted"));
    Ok(wait_for_url(&job_id, &file, output, submitted, &mut progress).await)
}

/// `sbatch --parsable` with the script on stdin: the job id.
async fn submit(script: &str, hold: bool) -> Result<String, LaunchError> {
    let flags: &[&str] = if hold {
        &["--parsable", "--hold"]
    } else {
        &["--parsable"]
    };
    let out = slurm("sbatch", flags, Some(script)).await?;
    if !out.success {
        let said: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let said = if said.is_empty() {
            "(sbatch said nothing)".to_owned()
        } else {
            said.join("\n  ")
        };
        return Err(LaunchError::Slurm(format!(
            "sbatch refused the job:\n  {said}"
        )));
    }
    // sbatch's warnings (e.g. about defaults it applied) are worth seeing.
    for line in out.stderr.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("{line}");
    }
    // `--parsable` prints `<id>` or `<id>;<cluster>`.
    let first = out.stdout.lines().next().unwrap_or("");
    Ok(first.split(';').next().unwrap_or("").trim().to_owned())
}

/// Says what went wrong and returns the exit code for it.
fn fail(error: LaunchError) -> i32 {
    eprintln!("jobgate: {error}");
    error.exit_code()
}

fn hints(job_id: &str) {
    eprintln!(
        "jobgate: `jobgate jobs` shows the URL again; `jobgate cancel {job_id}` ends the job."
    );
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Owned strings from string slices.
    pub fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    /// What bash makes of `words` (run through `printf '%s\0'`).
    pub fn bash_words(words: &str) -> Vec<String> {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("printf '%s\\0' {words}"))
            .output()
            .expect("bash");
        assert!(out.status.success(), "bash failed on {words}");
        let text = String::from_utf8(out.stdout).expect("utf8");
        text.split_terminator('\0').map(str::to_owned).collect()
    }
}
