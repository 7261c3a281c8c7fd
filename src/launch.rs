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

use clap::Args;
use jobgate_agent::jobfile::{self, JobFile, JobRecord, SessionState};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The built-in template (also shipped as docs/examples/launch.sbatch for sites to copy).
pub const BUILTIN_TEMPLATE: &str = include_str!("../docs/examples/launch.sbatch");
/// The site's template.
pub const SITE_TEMPLATE: &str = "/etc/jobgate/launch.sbatch";
/// The user's template, below `$HOME`.
pub const USER_TEMPLATE: &str = ".config/jobgate/launch.sbatch";
/// Default time limit.
const DEFAULT_TIME: &str = "2:00:00";
/// Lines of the job's output shown when it failed.
const TAIL_LINES: usize = 20;
/// How often the job file is read while waiting (cheap, local or NFS).
const FILE_POLL: Duration = Duration::from_millis(100);
/// How often `squeue` is asked at first, and after the first minute (spare slurmctld).
const SQUEUE_POLL_FAST: Duration = Duration::from_secs(1);
const SQUEUE_POLL_SLOW: Duration = Duration::from_secs(5);
/// Running this long without a word from the agent earns a hint.
const SILENT_HINT: Duration = Duration::from_secs(60);
/// Longest text on the live progress line.
const LIVE_LINE_MAX: usize = 100;
/// How long `cancel` waits for the job to be gone.
const CANCEL_WAIT: Duration = Duration::from_secs(120);
/// Output files of ended jobs are kept this long (for `tail`), then removed.
const OUTPUT_KEEP: Duration = Duration::from_secs(7 * 24 * 3600);

/// Exit codes of `launch`, `jobs` and `cancel`.
mod code {
    pub const OK: i32 = 0;
    /// Slurm refused, the job failed, a Slurm command failed.
    pub const FAILED: i32 = 1;
    /// Bad flags or template.
    pub const USAGE: i32 = 2;
    /// Ctrl-C while waiting (the job keeps running).
    pub const INTERRUPTED: i32 = 130;
}

/// `jobgate launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Slurm partition.
    #[arg(long, short = 'p')]
    partition: Option<String>,
    /// Slurm account to charge.
    #[arg(long, short = 'A')]
    account: Option<String>,
    /// Time limit (Slurm's formats: 2:00:00, 1-12:00:00, 90).
    #[arg(long, short = 't', default_value = DEFAULT_TIME)]
    time: String,
    /// CPUs for the app (--cpus-per-task).
    #[arg(long, short = 'c')]
    cpus: Option<u32>,
    /// Memory for the job, e.g. 8G (--mem).
    #[arg(long)]
    mem: Option<String>,
    /// GPUs, e.g. 1 or a100:1 (--gpus).
    #[arg(long)]
    gpus: Option<String>,
    /// Job name [default: jupyter, or the app's program name].
    #[arg(long, short = 'J')]
    job_name: Option<String>,
    /// Run the app inside this Apptainer/Singularity image (the agent stays outside).
    #[arg(long, value_name = "IMAGE")]
    sif: Option<PathBuf>,
    /// An option for `apptainer exec`, e.g. --sif-option=--bind=/scratch (repeatable)
    /// [default with --gpus: --nv].
    #[arg(
        long,
        value_name = "OPTION",
        allow_hyphen_values = true,
        requires = "sif"
    )]
    sif_option: Vec<String>,
    /// Seconds the app has to accept connections once started: the agent's
    /// --ready-timeout, for apps slow to start (cold file systems, many extensions)
    /// [default: 300].
    #[arg(long, value_name = "SECS")]
    ready_timeout: Option<u64>,
    /// Directory the app starts in [default: the current directory].
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Template to use instead of the user's, the site's or the built-in one.
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
    /// Print the batch script instead of submitting it.
    #[arg(long)]
    dry_run: bool,
    /// Relay QUIC address, HOST:PORT, for the agent in the job.
    #[arg(long, env = "JOBGATE_RELAY")]
    relay: Option<String>,
    /// CA certificate (PEM) the agent trusts for the relay.
    #[arg(long, env = "JOBGATE_RELAY_CA")]
    relay_ca: Option<PathBuf>,
    /// Token file for the agent [default: ~/.config/jobgate/token].
    #[arg(long, env = "JOBGATE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Run JupyterLab (arguments after `--` go to `jupyter lab`).
    #[arg(long)]
    jupyter: bool,
    /// The app: `{port}` becomes a free loopback port, `{sock}` a private unix socket.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `jobgate jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {}

/// `jobgate cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Job ids (as `jobgate jobs` shows them).
    #[arg(required = true, value_name = "JOBID")]
    jobs: Vec<String>,
}

// --- quoting and templates ------------------------------------------------------------

/// Characters that need no quoting, for the shell and for sbatch alike.
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(c, '_' | '-' | '.' | '/' | ':' | ',' | '+' | '=' | '@' | '%')
}

/// Quotes `s` as one shell word: as is when plain, else in single quotes.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(is_plain) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Quotes `s` as one word of an `#SBATCH` line (sbatch knows double quotes and
/// backslashes, not single quotes); `None` if it cannot be written there (a line break).
pub fn sbatch_quote(s: &str) -> Option<String> {
    if s.contains(['\n', '\r', '\0']) {
        return None;
    }
    if !s.is_empty() && s.chars().all(is_plain) {
        return Some(s.to_owned());
    }
    Some(format!(
        "\"{}\"",
        s.replace('\\', r"\\").replace('"', "\\\"")
    ))
}

/// A template variable's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// One word, quoted where it lands.
    Word(String),
    /// Ready-made text, inserted as it is.
    Raw(String),
}

/// A template that cannot be rendered.
#[derive(Debug, PartialEq, Eq)]
pub struct TemplateError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Fills `{{name}}` placeholders from `vars`. `{{` always opens a placeholder; unknown
/// names, unclosed placeholders and values that cannot go where they stand are errors.
pub fn render(template: &str, vars: &BTreeMap<&str, Value>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 512);
    for (index, line) in template.split_inclusive('\n').enumerate() {
        let error = |message: String| TemplateError {
            line: index + 1,
            message,
        };
        let sbatch_line = line.starts_with("#SBATCH");
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| error("`{{` without a closing `}}`".into()))?;
            let name = after[..end].trim();
            if !is_name(name) {
                return Err(error(format!(
                    "`{{{{{}}}}}` is not a variable name",
                    &after[..end]
                )));
            }
            match vars.get(name) {
                None => {
                    let known: Vec<&str> = vars.keys().copied().collect();
                    return Err(error(format!(
                        "unknown variable `{{{{{name}}}}}` (known: {})",
                        known.join(", ")
                    )));
                }
                Some(Value::Raw(text)) => out.push_str(text),
                Some(Value::Word(word)) if sbatch_line => {
                    out.push_str(&sbatch_quote(word).ok_or_else(|| {
                        error(format!(
                            "the value of `{{{{{name}}}}}` cannot go on an #SBATCH line"
                        ))
                    })?)
                }
                Some(Value::Word(word)) => out.push_str(&shell_quote(word)),
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// Where the template comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// A file (`--template`, the user's, the site's).
    File(PathBuf),
    /// The built-in one.
    Builtin,
}

impl std::fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Builtin => f.write_str("the built-in template"),
        }
    }
}

/// The template in effect: `explicit`, else the first of `candidates` that exists, else
/// the built-in one.
pub fn template_source(explicit: Option<PathBuf>, candidates: &[PathBuf]) -> TemplateSource {
    explicit
        .or_else(|| candidates.iter().find(|p| p.is_file()).cloned())
        .map(TemplateSource::File)
        .unwrap_or(TemplateSource::Builtin)
}

/// The user's, then the site's template path.
fn template_candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        paths.push(PathBuf::from(home).join(USER_TEMPLATE));
    }
    paths.push(PathBuf::from(SITE_TEMPLATE));
    paths
}

fn load_template(source: &TemplateSource) -> Result<String, String> {
    match source {
        TemplateSource::Builtin => Ok(BUILTIN_TEMPLATE.to_owned()),
        TemplateSource::File(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the template {}: {e}", path.display())),
    }
}

// --- what to launch -------------------------------------------------------------------

/// The settings a launch renders, checked and made absolute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobSpec {
    /// Job name.
    pub job_name: String,
    /// Time limit.
    pub time: String,
    /// Output file pattern (`%j` = job id).
    pub output: String,
    /// Partition, account, CPUs, memory, GPUs: only those given.
    pub partition: Option<String>,
    /// Account.
    pub account: Option<String>,
    /// CPUs per task.
    pub cpus: Option<u32>,
    /// Memory.
    pub mem: Option<String>,
    /// GPUs.
    pub gpus: Option<String>,
    /// Directory the app starts in.
    pub workdir: String,
    /// The jobgate binary the job runs.
    pub jobgate: String,
    /// Relay address, CA, token file, image: passed to the agent when known.
    pub relay: Option<String>,
    /// Relay CA.
    pub relay_ca: Option<String>,
    /// Token file.
    pub token_file: Option<String>,
    /// Container image.
    pub sif: Option<String>,
    /// Options for `apptainer exec`.
    pub sif_options: Vec<String>,
    /// The agent's --ready-timeout, when given.
    pub ready_timeout: Option<u64>,
    /// JupyterLab instead of a command.
    pub jupyter: bool,
    /// The command, or `jupyter lab`'s extra arguments.
    pub app: Vec<String>,
}

impl JobSpec {
    /// The `#SBATCH` lines for the options given.
    pub fn sbatch_options(&self) -> Result<String, String> {
        let mut options: Vec<(&str, String)> = vec![
            ("job-name", self.job_name.clone()),
            ("time", self.time.clone()),
            ("output", self.output.clone()),
        ];
        let optional = [
            ("partition", self.partition.clone()),
            ("account", self.account.clone()),
            ("cpus-per-task", self.cpus.map(|n| n.to_string())),
            ("mem", self.mem.clone()),
            ("gpus", self.gpus.clone()),
        ];
        options.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
        let lines: Result<Vec<String>, String> = options
            .into_iter()
            .map(|(flag, value)| {
                sbatch_quote(&value)
                    .map(|v| format!("#SBATCH --{flag}={v}"))
                    .ok_or_else(|| format!("--{flag} cannot hold a line break"))
            })
            .collect();
        Ok(lines?.join("\n"))
    }

    /// The agent's command line (each word shell-quoted).
    pub fn agent_argv(&self) -> Vec<String> {
        let mut argv = vec![self.jobgate.clone(), "agent".to_owned()];
        let mut flag = |name: &str, value: &Option<String>| {
            if let Some(value) = value {
                argv.push(format!("--{name}"));
                argv.push(value.clone());
            }
        };
        flag("relay", &self.relay);
        flag("relay-ca", &self.relay_ca);
        flag("token-file", &self.token_file);
        flag(
            "ready-timeout",
            &self.ready_timeout.map(|secs| secs.to_string()),
        );
        flag("sif", &self.sif);
        if self.sif.is_some() {
            for option in &self.sif_options {
                argv.push(format!("--sif-option={option}"));
            }
        }
        if self.jupyter {
            argv.push("--jupyter".to_owned());
        }
        if !self.app.is_empty() {
            argv.push("--".to_owned());
            argv.extend(self.app.iter().cloned());
        }
        argv
    }

    /// The template's variables.
    pub fn vars(&self) -> Result<BTreeMap<&'static str, Value>, String> {
        let word = |s: &str| Value::Word(s.to_owned());
        let opt = |s: &Option<String>| Value::Word(s.clone().unwrap_or_default());
        let quoted = |words: &[String]| {
            words
                .iter()
                .map(|w| shell_quote(w))
                .collect::<Vec<_>>()
                .join(" ")
        };
        Ok(BTreeMap::from([
            ("sbatch_options", Value::Raw(self.sbatch_options()?)),
            ("agent", Value::Raw(quoted(&self.agent_argv()))),
            ("app", Value::Raw(quoted(&self.app))),
            ("job_name", word(&self.job_name)),
            ("time", word(&self.time)),
            ("output", word(&self.output)),
            ("partition", opt(&self.partition)),
            ("account", opt(&self.account)),
            (
                "cpus",
                Value::Word(self.cpus.map(|n| n.to_string()).unwrap_or_default()),
            ),
            ("mem", opt(&self.mem)),
            ("gpus", opt(&self.gpus)),
            ("workdir", word(&self.workdir)),
            ("jobgate", word(&self.jobgate)),
            ("relay", opt(&self.relay)),
            ("relay_ca", opt(&self.relay_ca)),
            ("token_file", opt(&self.token_file)),
            ("sif", opt(&self.sif)),
            (
                "mode",
                word(if self.jupyter { "jupyter" } else { "command" }),
            ),
        ]))
    }

    /// What runs, for people.
    pub fn describe(&self) -> String {
        let app = self.app.join(" ");
        match (self.jupyter, app.is_empty()) {
            (true, true) => "jupyter lab".to_owned(),
            (true, false) => format!("jupyter lab {app}"),
            (false, _) => app,
        }
    }
}

fn absolute(path: &Path) -> Result<PathBuf, String> {
    if path.is_absolute() {
        return Ok(path.to_owned());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .map_err(|e| format!("cannot find the current directory: {e}"))
}

fn path_text(path: &Path) -> Result<String, String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("{} is not valid UTF-8", path.display()))
}

/// A job name from the program: letters, digits, `_.-`, at most 40.
fn default_job_name(jupyter: bool, app: &[String]) -> String {
    if jupyter {
        return "jupyter".into();
    }
    let program = app
        .first()
        .map(|p| p.rsplit('/').next().unwrap_or(p))
        .unwrap_or("jobgate");
    let name: String = program
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(40)
        .collect();
    if name.is_empty() {
        "jobgate".into()
    } else {
        name
    }
}

fn check_value(flag: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(format!(
            "--{flag} {value:?}: empty or with control characters"
        ));
    }
    Ok(())
}

/// Checks the flags and fills in defaults; `template` is the text (to see what it sets).
fn job_spec(args: &LaunchArgs, template: &str) -> Result<(JobSpec, Vec<String>), String> {
    let mut warnings = Vec::new();
    if !args.jupyter && args.command.is_empty() {
        return Err("say what to run: --jupyter, or a command after `--` \
                    (e.g. -- python3 -m http.server {port} --bind 127.0.0.1)"
            .into());
    }
    if !args.jupyter
        && !args
            .command
            .iter()
            .any(|a| a.contains("{port}") || a.contains("{sock}"))
    {
        return Err(
            "say where the app listens: put {port} (a free loopback port) or {sock} \
                    (a private unix socket) in its arguments"
                .into(),
        );
    }
    for (flag, value) in [
        ("partition", &args.partition),
        ("account", &args.account),
        ("mem", &args.mem),
        ("gpus", &args.gpus),
        ("job-name", &args.job_name),
    ] {
        if let Some(value) = value {
            check_value(flag, value)?;
        }
    }
    check_value("time", &args.time)?;
    if args.cpus == Some(0) {
        return Err("--cpus must be at least 1".into());
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or("HOME is not set: the job hands its URL back through ~/.jobgate/jobs")?;
    let jobs_dir = PathBuf::from(home).join(jobfile::JOBS_DIR);
    let output = path_text(&jobs_dir.join("%j.out"))?;

    let workdir = match &args.workdir {
        Some(dir) => absolute(dir)?,
        None => std::env::current_dir().map_err(|e| format!("no current directory: {e}"))?,
    };
    if !workdir.is_dir() {
        return Err(format!("--workdir {}: not a directory", workdir.display()));
    }
    let jobgate = std::env::current_exe()
        .map_err(|e| format!("cannot find the jobgate binary: {e}"))
        .and_then(|p| path_text(&p))?;

    // The relay: a flag or the environment, unless the template sets it itself.
    let relay = args.relay.clone().filter(|r| !r.is_empty());
    if relay.is_none() && !template.contains("JOBGATE_RELAY") {
        let message = "no relay: pass --relay HOST:PORT or set JOBGATE_RELAY (your admins \
                       know it)";
        if !args.dry_run {
            return Err(message.into());
        }
        warnings.push(message.to_owned());
    }
    let relay_ca = match &args.relay_ca {
        Some(ca) => {
            let ca = absolute(ca)?;
            if !ca.is_file() {
                return Err(format!("--relay-ca {}: no such file", ca.display()));
            }
            Some(path_text(&ca)?)
        }
        None => None,
    };
    // The token: refuse now what the agent would refuse after the queue wait.
    let token_file = match &args.token_file {
        Some(path) => Some(absolute(path)?),
        None => None,
    };
    if !template.contains("JOBGATE_TOKEN_FILE") {
        if let Err(e) = jobgate_agent::token::load_token(token_file.clone()) {
            if !args.dry_run {
                return Err(e.to_string());
            }
            warnings.push(e.to_string());
        }
    }
    let token_file = token_file.as_deref().map(path_text).transpose()?;
    let sif = match &args.sif {
        Some(image) => {
            let image = absolute(image)?;
            if !image.exists() {
                return Err(format!("--sif {}: no such image", image.display()));
            }
            Some(path_text(&image)?)
        }
        None => None,
    };
    let mut sif_options = args.sif_option.clone();
    if sif.is_some() && sif_options.is_empty() && args.gpus.is_some() {
        sif_options.push("--nv".into());
    }
    Ok((
        JobSpec {
            job_name: args
                .job_name
                .clone()
                .unwrap_or_else(|| default_job_name(args.jupyter, &args.command)),
            time: args.time.clone(),
            output,
            partition: args.partition.clone(),
            account: args.account.clone(),
            cpus: args.cpus,
            mem: args.mem.clone(),
            gpus: args.gpus.clone(),
            workdir: path_text(&workdir)?,
            jobgate,
            relay,
            relay_ca,
            token_file,
            sif,
            sif_options,
            ready_timeout: args.ready_timeout,
            jupyter: args.jupyter,
            app: args.command.clone(),
        },
        warnings,
    ))
}

// --- Slurm ----------------------------------------------------------------------------

/// A Slurm command's outcome.
struct Output {
    success: bool,
    stdout: String,
    stderr: String,
}

async fn slurm(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, String> {
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
        if e.kind() == std::io::ErrorKind::NotFound {
            format!("{program} is not on PATH: is this a Slurm login node?")
        } else {
            format!("cannot run {program}: {e}")
        }
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .map_err(|e| format!("cannot write to {program}: {e}"))?;
        drop(pipe);
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| format!("{program} failed: {e}"))?;
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
async fn squeue_job(id: &str) -> Result<Option<SlurmJob>, String> {
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
        return Err(format!("squeue failed: {}", out.stderr));
    }
    Ok(parse_squeue(&out.stdout).into_iter().find(|j| j.id == id))
}

/// All my jobs Slurm still knows, by id.
async fn squeue_mine() -> Result<BTreeMap<String, SlurmJob>, String> {
    let out = slurm(
        "squeue",
        &["-h", "--me", "-t", "all", "-o", SQUEUE_FORMAT],
        None,
    )
    .await?;
    if !out.success {
        return Err(format!("squeue failed: {}", out.stderr));
    }
    Ok(parse_squeue(&out.stdout)
        .into_iter()
        .map(|j| (j.id.clone(), j))
        .collect())
}

/// The job's output file, as Slurm has it.
async fn slurm_output_path(id: &str) -> Option<String> {
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

// --- job files ------------------------------------------------------------------------

/// Job files in `dir`: (job id, file), for names that are job ids.
fn job_files(dir: &Path) -> Vec<(String, JobFile)> {
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
fn clean_up(dir: &Path, live: &BTreeMap<String, SlurmJob>, asked: SystemTime) -> Vec<String> {
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

// --- the progress line ----------------------------------------------------------------

/// One live line on a terminal; one line per change otherwise (logs, pipes).
struct Progress {
    tty: bool,
    last: String,
    start: Instant,
    /// What the live line shows now (empty: nothing drawn).
    drawn_line: String,
}

impl Progress {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: String::new(),
            start: Instant::now(),
            drawn_line: String::new(),
        }
    }

    fn show(&mut self, text: &str) {
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

// --- launch ---------------------------------------------------------------------------

/// `jobgate launch`: returns the exit code.
pub async fn run_launch(args: LaunchArgs) -> i32 {
    let source = template_source(args.template.clone(), &template_candidates());
    let template = match load_template(&source) {
        Ok(text) => text,
        Err(e) => return fail(code::USAGE, &e),
    };
    let (spec, warnings) = match job_spec(&args, &template) {
        Ok(spec) => spec,
        Err(e) => return fail(code::USAGE, &e),
    };
    let script = match spec
        .vars()
        .and_then(|vars| render(&template, &vars).map_err(|e| format!("template {source}: {e}")))
    {
        Ok(script) => script,
        Err(e) => return fail(code::USAGE, &e),
    };
    for warning in &warnings {
        eprintln!("jobgate: warning: {warning}");
    }
    if args.dry_run {
        eprintln!("jobgate: the script from {source} (not submitted):");
        print!("{script}");
        return code::OK;
    }
    let Some(dir) = jobfile::jobs_dir() else {
        return fail(code::USAGE, "HOME is not set");
    };
    if let Err(e) = jobfile::ensure_private_dir(&dir) {
        return fail(
            code::FAILED,
            &format!("cannot create {}: {e}", dir.display()),
        );
    }
    // Tidy up after ended jobs (never fatal).
    if !job_files(&dir).is_empty() {
        let asked = SystemTime::now();
        if let Ok(live) = squeue_mine().await {
            clean_up(&dir, &live, asked);
        }
    }

    let submitted = Instant::now();
    let out = match slurm("sbatch", &["--parsable"], Some(&script)).await {
        Ok(out) => out,
        Err(e) => return fail(code::FAILED, &e),
    };
    if !out.success {
        eprintln!("jobgate: sbatch refused the job:");
        for line in out.stderr.lines().filter(|l| !l.trim().is_empty()) {
            eprintln!("  {line}");
        }
        if out.stderr.trim().is_empty() {
            eprintln!("  (sbatch said nothing)");
        }
        return code::FAILED;
    }
    // sbatch's warnings (e.g. about defaults it applied) are worth seeing.
    for line in out.stderr.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("{line}");
    }
    let job_id = out
        .stdout
        .lines()
        .next()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let Some(file) = JobFile::in_dir(&dir, &job_id) else {
        return fail(
            code::FAILED,
            &format!("sbatch answered {:?}, not a job id", out.stdout.trim()),
        );
    };
    let output = (template.contains("{{output}}") || template.contains("{{sbatch_options}}"))
        .then(|| spec.output.replace("%j", &job_id));
    let command = spec.describe();
    let recorded = file.read().ok().flatten();
    let mut record = recorded.unwrap_or_else(|| JobRecord::new(&job_id, SessionState::Submitted));
    record.submitted_at = Some(jobfile::now());
    record.output = output.clone();
    record.command = Some(command);
    if let Err(e) = file.write(&record) {
        eprintln!(
            "jobgate: warning: cannot write {}: {e}",
            file.path().display()
        );
    }
    let mut progress = Progress::new();
    progress.show(&format!("job {job_id} submitted"));
    wait_for_url(&job_id, &file, output, submitted, &mut progress).await
}

fn fail(code: i32, message: &str) -> i32 {
    eprintln!("jobgate: {message}");
    code
}

fn hints(job_id: &str) {
    eprintln!(
        "jobgate: `jobgate jobs` shows the URL again; `jobgate cancel {job_id}` ends the job."
    );
}

/// Follows the job until the URL appears, the job fails, or Ctrl-C.
async fn wait_for_url(
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
                    if squeue_errors >= 5 {
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

// --- jobs -----------------------------------------------------------------------------

/// `jobgate jobs`.
pub async fn run_jobs(_args: JobsArgs) -> i32 {
    let Some(dir) = jobfile::jobs_dir() else {
        return fail(code::USAGE, "HOME is not set");
    };
    let files = job_files(&dir);
    if files.is_empty() {
        eprintln!("jobgate: no sessions (start one with `jobgate launch`)");
        return code::OK;
    }
    let asked = SystemTime::now();
    let live = match squeue_mine().await {
        Ok(live) => live,
        Err(e) => return fail(code::FAILED, &e),
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

// --- cancel ---------------------------------------------------------------------------

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
        Err(e) => return fail(code::FAILED, &e),
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
            return fail(
                code::FAILED,
                &format!(
                    "job {id} is still not gone {} s after scancel (see squeue -j {id})",
                    CANCEL_WAIT.as_secs()
                ),
            );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&'static str, Value)]) -> BTreeMap<&'static str, Value> {
        pairs.iter().cloned().collect()
    }

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    /// What bash makes of `words` (run through `printf '%s\0'`).
    fn bash_words(words: &str) -> Vec<String> {
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("printf '%s\\0' {words}"))
            .output()
            .expect("bash");
        assert!(out.status.success(), "bash failed on {words}");
        let text = String::from_utf8(out.stdout).expect("utf8");
        text.split_terminator('\0').map(str::to_owned).collect()
    }

    #[test]
    fn shell_quoting_survives_bash() {
        let nasty = [
            "plain",
            "",
            "two words",
            "it's",
            "'",
            "$(touch /tmp/jobgate-pwned)",
            "`id`",
            "a\"b\\c",
            "line\nbreak",
            "{port}",
            "glob*?[x]",
            "~user",
            "semi;colon&amp|pipe>out",
            "ünïcode",
            "--flag=$HOME",
            "!bang",
        ];
        let line: Vec<String> = nasty.iter().map(|w| shell_quote(w)).collect();
        assert_eq!(bash_words(&line.join(" ")), strings(&nasty));
        assert_eq!(shell_quote("/usr/bin/jobgate"), "/usr/bin/jobgate");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn sbatch_quoting() {
        assert_eq!(sbatch_quote("gpu").as_deref(), Some("gpu"));
        assert_eq!(
            sbatch_quote("/h/u/.jobgate/jobs/%j.out").as_deref(),
            Some("/h/u/.jobgate/jobs/%j.out")
        );
        assert_eq!(sbatch_quote("a b").as_deref(), Some("\"a b\""));
        assert_eq!(
            sbatch_quote(r#"say "hi" \o/ # not a comment"#).as_deref(),
            Some(r#""say \"hi\" \\o/ # not a comment""#)
        );
        assert_eq!(sbatch_quote("x\ny"), None);
    }

    #[test]
    fn templates_fill_and_quote_by_context() {
        let v = vars(&[
            ("name", Value::Word("my job".into())),
            ("dir", Value::Word("/home/a b/it's".into())),
            (
                "block",
                Value::Raw("#SBATCH --time=1:00\n#SBATCH --mem=1G".into()),
            ),
        ]);
        let out = render(
            "#!/bin/bash\n#SBATCH --job-name={{name}}\n{{block}}\ncd {{ dir }} || exit 1\necho {{name}}\n",
            &v,
        )
        .expect("render");
        assert_eq!(
            out,
            "#!/bin/bash\n#SBATCH --job-name=\"my job\"\n#SBATCH --time=1:00\n#SBATCH --mem=1G\n\
             cd '/home/a b/it'\\''s' || exit 1\necho 'my job'\n"
        );
    }

    #[test]
    fn unknown_or_broken_placeholders_are_errors() {
        let v = vars(&[("time", Value::Word("1:00".into()))]);
        let err = render("#!/bin/bash\n\n#SBATCH --time={{tme}}\n", &v).expect_err("unknown");
        assert_eq!(err.line, 3);
        assert!(
            err.message.contains("unknown variable `{{tme}}`"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("time"),
            "lists the known ones: {}",
            err.message
        );
        let err = render("echo {{time\n", &v).expect_err("unclosed");
        assert_eq!(err.line, 1);
        assert!(render("echo {{$HOME}}\n", &v).is_err());
        assert!(render("echo {{}}\n", &v).is_err());
        // A line break cannot go on an #SBATCH line.
        let v = vars(&[("x", Value::Word("a\nb".into()))]);
        assert!(render("#SBATCH --comment={{x}}\n", &v).is_err());
        assert!(render("echo {{x}}\n", &v).is_ok());
        // Text without placeholders comes through unchanged, `${x}` and `{}` included.
        let plain = "#!/bin/bash\necho ${HOME} {} }}\n";
        assert_eq!(render(plain, &v).expect("plain"), plain);
    }

    fn spec() -> JobSpec {
        JobSpec {
            job_name: "python3".into(),
            time: "0:10:00".into(),
            output: "/home/u/.jobgate/jobs/%j.out".into(),
            partition: Some("debug".into()),
            cpus: Some(2),
            workdir: "/home/u/my project".into(),
            jobgate: "/usr/bin/jobgate".into(),
            relay: Some("relay.example.org:7443".into()),
            app: strings(&[
                "python3",
                "-m",
                "http.server",
                "{port}",
                "--bind",
                "127.0.0.1",
            ]),
            ..JobSpec::default()
        }
    }

    #[test]
    fn the_builtin_template_renders_a_valid_script() {
        let s = spec();
        let script = render(BUILTIN_TEMPLATE, &s.vars().expect("vars")).expect("render");
        assert!(script.starts_with("#!/bin/bash\n"));
        for line in [
            "#SBATCH --job-name=python3",
            "#SBATCH --time=0:10:00",
            "#SBATCH --output=/home/u/.jobgate/jobs/%j.out",
            "#SBATCH --partition=debug",
            "#SBATCH --cpus-per-task=2",
            "cd '/home/u/my project' || exit 1",
            "exec /usr/bin/jobgate agent --relay relay.example.org:7443 -- python3 -m http.server '{port}' --bind 127.0.0.1",
        ] {
            assert!(script.lines().any(|l| l == line), "{line:?} missing in:\n{script}");
        }
        assert!(!script.contains("--account"), "unset options stay out");
        assert!(!script.contains("--mem"));
        // sbatch reads #SBATCH lines only before the first command.
        let first_command = script
            .lines()
            .position(|l| !l.is_empty() && !l.starts_with('#'))
            .expect("a command");
        let last_sbatch = script
            .lines()
            .collect::<Vec<_>>()
            .iter()
            .rposition(|l| l.starts_with("#SBATCH"))
            .expect("sbatch");
        assert!(last_sbatch < first_command);
        let check = std::process::Command::new("bash")
            .args(["-n", "-c", &script])
            .status()
            .expect("bash -n");
        assert!(check.success());
    }

    #[test]
    fn the_agent_line_carries_the_app_word_for_word() {
        let mut s = spec();
        s.app = strings(&["app", "--title=it's $HOME", "{sock}"]);
        s.relay_ca = Some("/etc/ca dir/ca.pem".into());
        s.token_file = Some("/home/u/.tok".into());
        let vars = s.vars().expect("vars");
        let Some(Value::Raw(agent)) = vars.get("agent") else {
            panic!("agent is raw text")
        };
        assert_eq!(bash_words(agent), s.agent_argv());
        assert_eq!(
            s.agent_argv(),
            strings(&[
                "/usr/bin/jobgate",
                "agent",
                "--relay",
                "relay.example.org:7443",
                "--relay-ca",
                "/etc/ca dir/ca.pem",
                "--token-file",
                "/home/u/.tok",
                "--",
                "app",
                "--title=it's $HOME",
                "{sock}",
            ])
        );
    }

    #[test]
    fn a_slow_app_gets_its_ready_timeout_on_the_agent_line() {
        let mut s = spec();
        s.jupyter = true;
        s.app.clear();
        s.ready_timeout = Some(900);
        assert_eq!(
            s.agent_argv()[4..],
            strings(&["--ready-timeout", "900", "--jupyter"])
        );
    }

    #[test]
    fn jupyter_and_containers_on_the_agent_line() {
        let mut s = spec();
        s.jupyter = true;
        s.app = strings(&["--notebook-dir=/data"]);
        s.sif = Some("/images/lab.sif".into());
        s.sif_options = strings(&["--nv"]);
        assert_eq!(
            s.agent_argv()[4..],
            strings(&[
                "--sif",
                "/images/lab.sif",
                "--sif-option=--nv",
                "--jupyter",
                "--",
                "--notebook-dir=/data"
            ])
        );
        assert_eq!(s.describe(), "jupyter lab --notebook-dir=/data");
        s.app.clear();
        assert_eq!(s.agent_argv().last().map(String::as_str), Some("--jupyter"));
    }

    #[test]
    fn hostile_values_stay_inert_in_the_script() {
        let mut s = spec();
        s.job_name = "x\" --uid=0 \"".into();
        s.partition = Some("p q".into());
        s.workdir = "/tmp/$(touch /tmp/pwned)".into();
        let script = render(BUILTIN_TEMPLATE, &s.vars().expect("vars")).expect("render");
        assert!(
            script.contains(r#"#SBATCH --job-name="x\" --uid=0 \"""#),
            "{script}"
        );
        assert!(script.contains("cd '/tmp/$(touch /tmp/pwned)' || exit 1"));
        s.job_name = "a\nb".into();
        assert!(
            s.vars().is_err(),
            "a line break cannot become an #SBATCH line"
        );
    }

    #[test]
    fn template_precedence() {
        let dir = std::env::temp_dir().join(format!("jobgate-tpl-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).expect("dir");
        let user = dir.join("user.sbatch");
        let site = dir.join("site.sbatch");
        let candidates = [user.clone(), site.clone()];
        assert_eq!(template_source(None, &candidates), TemplateSource::Builtin);
        std::fs::write(&site, "#!/bin/bash\n").expect("site");
        assert_eq!(
            template_source(None, &candidates),
            TemplateSource::File(site.clone())
        );
        std::fs::write(&user, "#!/bin/bash\n").expect("user");
        assert_eq!(
            template_source(None, &candidates),
            TemplateSource::File(user)
        );
        let explicit = dir.join("mine");
        assert_eq!(
            template_source(Some(explicit.clone()), &candidates),
            TemplateSource::File(explicit)
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

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
