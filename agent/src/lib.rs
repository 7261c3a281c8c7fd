//! The jobgate agent.
//!
//! It runs inside the batch job (`jobgate agent -- jupyter lab ...`): starts the app
//! ([`child`]), waits until it accepts connections, dials OUT to the relay over QUIC
//! ([`dial`]), prints the URL the relay granted, and serves every request stream the
//! relay opens by forwarding it to the app ([`serve`], [`target`]). It never listens on
//! any socket: its only sockets are its outbound QUIC socket and its connections to the
//! app.
//!
//! [`run`] is the whole lifecycle; the binary only parses flags.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// A line for the person running the agent (see [`USER_TARGET`]).
macro_rules! say {
    ($($arg:tt)*) => { tracing::info!(target: $crate::USER_TARGET, $($arg)*) };
}
/// A warning for the person running the agent (see [`USER_TARGET`]).
macro_rules! warn_user {
    ($($arg:tt)*) => { tracing::warn!(target: $crate::USER_TARGET, $($arg)*) };
}
pub(crate) use {say, warn_user};

pub mod child;
pub mod container;
pub mod dial;
pub mod guard;
pub mod jobfile;
pub mod jupyter;
pub mod listener;
pub mod serve;
mod supervisor;
pub mod target;
pub mod token;

use child::{App, ChildError};
use dial::{DialConfig, DialError, HelloParams, RelaySession};
use jobgate_protocol::{AccessMode, JobInfo, RefusalCode, Shares, Token};
use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use supervisor::{Reconnect, Supervisor};
use target::{Target, TargetPool};
use thiserror::Error;

/// The tracing target of what the person running the agent must read (the job's output:
/// the URL, reconnects, why it stopped). The binary prints these as `jobgate: <message>`
/// (or as JSON events with `--log-format json`); everything else is diagnostics.
pub const USER_TARGET: &str = "jobgate::user";

use tokio::signal::unix::{signal, SignalKind};

/// Default time the app has to accept connections after it starts.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time the app has to exit after SIGTERM/SIGINT before it is killed.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long [`dial::RelaySession::bye`] waits for the relay to close the connection after `Bye`.
pub(crate) const BYE_LINGER: Duration = Duration::from_secs(3);
/// How long [`dial::RelaySession::bye`] lingers so that its close reaches the relay.
pub(crate) const CLOSE_LINGER: Duration = Duration::from_millis(500);

/// Exit codes of `jobgate agent` besides the app's own (documented in the README).
pub mod exit {
    /// Bad usage or configuration (flags, token file permissions).
    pub const USAGE: i32 = 2;
    /// The relay refused the agent (token, limits, version).
    pub const REFUSED: i32 = 3;
    /// The relay could not be reached (DNS, UDP blocked, certificate).
    pub const UNREACHABLE: i32 = 4;
    /// The app could not be started or never became ready.
    pub const APP_FAILED: i32 = 5;
    /// The connection to the relay was lost.
    pub const CONNECTION_LOST: i32 = 6;
}

/// Why the agent stopped without an app exit code to report.
#[derive(Debug, Error)]
pub enum AgentError {
    /// Usage or configuration problem.
    #[error("{0}")]
    Usage(String),
    /// The app could not be started or never became ready.
    #[error(transparent)]
    App(#[from] ChildError),
    /// No session could be opened.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The relay connection was lost.
    #[error("lost the connection to the relay: {0}")]
    ConnectionLost(String),
}

impl AgentError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) | Self::App(ChildError::Usage(_)) => exit::USAGE,
            Self::App(_) => exit::APP_FAILED,
            Self::Dial(DialError::Refused { .. }) => exit::REFUSED,
            Self::Dial(_) => exit::UNREACHABLE,
            Self::ConnectionLost(_) => exit::CONNECTION_LOST,
        }
    }
}

/// What the agent forwards to.
#[derive(Debug, Clone)]
pub enum AppSource {
    /// An app that is already running.
    Existing(Target),
    /// A command the agent starts and supervises (`{port}`/`{sock}` or `to`).
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Explicit target, when the command has no placeholder.
        to: Option<Target>,
        /// Extra environment for the app.
        env: Vec<(String, String)>,
    },
}

/// Everything `jobgate agent` needs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// How to reach the relay.
    pub dial: DialConfig,
    /// The user's token.
    pub token: Token,
    /// The reservation `jobgate launch` got at submit time, for the first `Hello`.
    pub reservation: Option<Token>,
    /// The access URL the relay gave with the reservation: the relay keeps only the
    /// access key's hash, so its `Welcome` for a reserved name carries no key.
    pub reserved_url: Option<String>,
    /// Requested access mode; `None`: the relay's default.
    pub access: Option<AccessMode>,
    /// Whom an `owner` session is shared with.
    pub share: Shares,
    /// Where to write the URL for scripts.
    pub url_file: Option<PathBuf>,
    /// The app.
    pub app: AppSource,
    /// Time the app has to become ready.
    pub ready_timeout: Duration,
    /// Time the app has to stop after a signal.
    pub stop_grace: Duration,
    /// Run the app inside this container image (`--sif`).
    pub container: Option<container::Container>,
    /// Keep this job file up to date (see [`jobfile`]).
    pub job_file: Option<jobfile::JobFile>,
    /// The `jobgate` binary, to run the app's [`guard`] (stops the app if the agent is
    /// killed); `None` runs no guard.
    pub app_guard: Option<PathBuf>,
}

/// Job metadata from the batch system's environment.
pub fn job_info() -> JobInfo {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    JobInfo {
        id: env("SLURM_JOB_ID").or_else(|| env("PBS_JOBID")),
        user: env("USER"),
        host: nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok()),
    }
}

/// Runs the agent until the app exits, a signal arrives, or the relay is lost.
/// Returns the exit code the process should end with.
pub async fn run(options: AgentOptions) -> Result<i32, AgentError> {
    run_opening(options, None).await
}

/// Like [`run`], but the printed URL opens `app_path` below the session's root (for
/// example `lab?token=...`, see [`jupyter`]), merged with the relay's access URL by
/// [`app_url`].
pub async fn run_opening(
    options: AgentOptions,
    app_path: Option<String>,
) -> Result<i32, AgentError> {
    let job_file = options.job_file.clone().map(jobfile::AgentJobFile::new);
    if let Some(job_file) = &job_file {
        job_file.starting(job_info().host);
    }
    let result = run_session(options, app_path, job_file.as_ref()).await;
    if let Some(job_file) = &job_file {
        match &result {
            Ok(code) => job_file.ended(*code, None),
            Err(e) => job_file.ended(e.exit_code(), Some(e.to_string())),
        }
    }
    result
}

async fn run_session(
    options: AgentOptions,
    app_path: Option<String>,
    job_file: Option<&jobfile::AgentJobFile>,
) -> Result<i32, AgentError> {
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| AgentError::Usage(e.to_string()))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| AgentError::Usage(e.to_string()))?;

    // Dial while the app starts: a relay problem shows at once, and the session opens the
    // moment the app is ready.
    let dial_config = options.dial.clone();
    let mut dialing = tokio::spawn(async move { dial::connect(&dial_config).await });
    let mut dial_result = None;
    let (app, target, private_dir) = match options.app.clone() {
        AppSource::Existing(target) => (None, target, None),
        AppSource::Command { argv, to, env } => {
            let mut prepared = child::prepare(argv, to)?;
            if let Some(container) = &options.container {
                prepared.argv = container.wrap_app(&prepared);
            }
            let mut app = App::spawn(&prepared.argv, &env)?;
            if let Some(exe) = &options.app_guard {
                if let Err(e) = guard::spawn(exe, app.pgid()) {
                    tracing::warn!("no app guard ({e}): the app would outlive a killed agent");
                }
            }
            let ready = {
                let wait = app.wait_ready(&prepared.target, options.ready_timeout);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        ready = &mut wait => break ready.map_err(AgentError::from),
                        _ = terminate.recv() => break Err(ChildError::ExitedEarly("agent terminated".into()).into()),
                        _ = interrupt.recv() => break Err(ChildError::ExitedEarly("agent interrupted".into()).into()),
                        dialed = &mut dialing, if dial_result.is_none() => match dialed {
                            Ok(Err(e)) => break Err(AgentError::from(e)),
                            other => dial_result = Some(other),
                        },
                    }
                }
            };
            if let Err(e) = ready {
                dialing.abort();
                app.stop(Signal::SIGTERM, options.stop_grace).await;
                cleanup(prepared.private_dir.as_deref());
                return Err(e);
            }
            (Some(app), prepared.target, prepared.private_dir)
        }
    };

    if let Some(job_file) = job_file {
        job_file.record(jobfile::SessionState::Connecting, |_| {});
    }
    let hello = HelloParams {
        token: options.token.clone(),
        access: options.access,
        share: options.share.clone(),
        job: job_info(),
        resume: None,
        reservation: options.reservation.clone(),
        moving: false,
    };
    let dialed = match dial_result {
        Some(result) => result,
        None => dialing.await,
    };
    let opened = match dialed {
        Ok(Ok(dialed)) => match dial::say_hello(dialed, &hello).await {
            // The early connection may have died while the app started: dial once more.
            Err(DialError::Protocol(_)) => dial::open_session(&options.dial, &hello).await,
            other => other,
        },
        Ok(Err(e)) => Err(e),
        Err(e) => Err(DialError::Protocol(format!("dialing task failed: {e}"))),
    };
    let mut supervisor = Supervisor {
        app,
        pool: Arc::new(TargetPool::new(target)),
        hello,
        options: &options,
        tcp_first: false,
        app_path: app_path.as_deref(),
        job_file,
        terminate,
        interrupt,
    };
    let outcome = match opened {
        Ok(session) => Ok(Reconnect::Connected(Box::new(session))),
        // Too many new sessions too fast (a job array starting), or a cluster of relays
        // whose shared store is away: temporary, so wait and retry like a reconnect
        // instead of failing the job.
        Err(DialError::Refused {
            code: RefusalCode::RateLimited | RefusalCode::TryAgain,
            message,
        }) => {
            say!("the relay asks this agent to wait: {message}");
            supervisor.reconnect("no session yet").await
        }
        Err(e) => {
            supervisor.stop_app(Signal::SIGTERM).await;
            Err(e.into())
        }
    };
    let outcome = match outcome {
        Ok(Reconnect::Connected(mut session)) => {
            if let Some(reserved) = &options.reserved_url {
                if reserved.starts_with(&session.welcome.url) {
                    session.welcome.access_url = reserved.clone();
                }
            }
            announce(
                &session,
                app_path.as_deref(),
                options.url_file.as_deref(),
                job_file,
            );
            supervisor.run(*session).await
        }
        Ok(Reconnect::Finished(code)) => Ok(code),
        Err(e) => Err(e),
    };
    cleanup(private_dir.as_deref());
    outcome
}

/// Prints the URL line and writes the URL file and the job file.
pub(crate) fn announce(
    session: &RelaySession,
    app_path: Option<&str>,
    url_file: Option<&std::path::Path>,
    job_file: Option<&jobfile::AgentJobFile>,
) {
    let access_url = &session.welcome.access_url;
    let url = match app_path {
        Some(path) => app_url(access_url, path),
        None => access_url.clone(),
    };
    say!("connected over {}", session.via);
    say!("your app is at {url}");
    tracing::info!(name = %session.welcome.name, "session open");
    if let Some(path) = url_file {
        if let Err(e) = token::write_private(path, &format!("{url}\n")) {
            say!("cannot write the URL file {}: {e}", path.display());
        }
    }
    if let Some(job_file) = job_file {
        job_file.connected(&url);
    }
}

/// The URL that opens `app_path` (`path?query`) in the session at `access_url`.
///
/// The path goes below the access URL's path; the queries are merged, the app's first:
/// `https://n.d/?jobgate_key=K` + `lab?token=T` = `https://n.d/lab?token=T&jobgate_key=K`.
pub fn app_url(access_url: &str, app_path: &str) -> String {
    let (rest, fragment) = match access_url.split_once('#') {
        Some((rest, fragment)) => (rest, Some(fragment)),
        None => (access_url, None),
    };
    let (base, base_query) = rest.split_once('?').unwrap_or((rest, ""));
    let (path, path_query) = app_path.split_once('?').unwrap_or((app_path, ""));
    let mut url = base.to_owned();
    // `https://host` has no path at all (its root is `/`); `https://host/app` is a
    // directory for our purpose.
    if !url.ends_with('/') {
        url.push('/');
    }
    url.push_str(path.trim_start_matches('/'));
    let query: Vec<&str> = [path_query, base_query]
        .into_iter()
        .filter(|q| !q.is_empty())
        .collect();
    if !query.is_empty() {
        url.push('?');
        url.push_str(&query.join("&"));
    }
    if let Some(fragment) = fragment {
        url.push('#');
        url.push_str(fragment);
    }
    url
}

fn cleanup(private_dir: Option<&std::path::Path>) {
    if let Some(dir) = private_dir {
        child::remove_private_dir(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::app_url;

    #[test]
    fn app_paths_merge_into_access_urls() {
        let cases = [
            ("https://n.d/", "lab?token=T", "https://n.d/lab?token=T"),
            ("https://n.d", "lab?token=T", "https://n.d/lab?token=T"),
            ("https://n.d:8443/", "/lab", "https://n.d:8443/lab"),
            (
                "https://n.d/?jobgate_key=K",
                "lab?token=T",
                "https://n.d/lab?token=T&jobgate_key=K",
            ),
            (
                "https://n.d:8443?jobgate_key=K",
                "lab?token=T",
                "https://n.d:8443/lab?token=T&jobgate_key=K",
            ),
            (
                "https://n.d/base/?k=1#top",
                "lab?token=T",
                "https://n.d/base/lab?token=T&k=1#top",
            ),
            ("https://n.d/app", "lab", "https://n.d/app/lab"),
            ("https://n.d/?k=1", "", "https://n.d/?k=1"),
        ];
        for (access, path, want) in cases {
            assert_eq!(app_url(access, path), want, "{access} + {path}");
        }
    }
}
