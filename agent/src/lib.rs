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

pub mod child;
pub mod dial;
pub mod jupyter;
pub mod serve;
pub mod target;
pub mod token;

use child::{App, ChildError};
use dial::{DialConfig, DialError, HelloParams, RelaySession};
use jobgate_protocol::{write_frame, AccessMode, CloseCode, ControlMessage, JobInfo, Token};
use nix::sys::signal::Signal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use target::{Target, TargetPool};
use thiserror::Error;
use tokio::signal::unix::{signal, SignalKind};

/// Default time the app has to accept connections after it starts.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Default time the app has to exit after SIGTERM/SIGINT before it is killed.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the agent lingers so that its close reaches the relay.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

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
    /// Requested access mode.
    pub access: AccessMode,
    /// Where to write the URL for scripts.
    pub url_file: Option<PathBuf>,
    /// The app.
    pub app: AppSource,
    /// Time the app has to become ready.
    pub ready_timeout: Duration,
    /// Time the app has to stop after a signal.
    pub stop_grace: Duration,
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
    let mut terminate =
        signal(SignalKind::terminate()).map_err(|e| AgentError::Usage(e.to_string()))?;
    let mut interrupt =
        signal(SignalKind::interrupt()).map_err(|e| AgentError::Usage(e.to_string()))?;

    let (mut app, target, private_dir) = match options.app.clone() {
        AppSource::Existing(target) => (None, target, None),
        AppSource::Command { argv, to, env } => {
            let prepared = child::prepare(argv, to)?;
            let mut app = App::spawn(&prepared.argv, &env)?;
            let ready = tokio::select! {
                ready = app.wait_ready(&prepared.target, options.ready_timeout) => ready,
                _ = terminate.recv() => Err(ChildError::ExitedEarly("agent terminated".into())),
                _ = interrupt.recv() => Err(ChildError::ExitedEarly("agent interrupted".into())),
            };
            if let Err(e) = ready {
                app.stop(Signal::SIGTERM, options.stop_grace).await;
                cleanup(prepared.private_dir.as_deref());
                return Err(e.into());
            }
            (Some(app), prepared.target, prepared.private_dir)
        }
    };

    let hello = HelloParams {
        token: options.token.clone(),
        access: options.access,
        job: job_info(),
    };
    let session = match dial::open_session(&options.dial, &hello).await {
        Ok(session) => session,
        Err(e) => {
            if let Some(app) = app.as_mut() {
                app.stop(Signal::SIGTERM, options.stop_grace).await;
            }
            cleanup(private_dir.as_deref());
            return Err(e.into());
        }
    };
    announce(&session, app_path.as_deref(), options.url_file.as_deref());

    let pool = Arc::new(TargetPool::new(target));
    let serving = tokio::spawn(serve::serve_streams(session.connection.clone(), pool));
    let outcome = supervise(
        &mut app,
        session,
        serving,
        &mut terminate,
        &mut interrupt,
        options.stop_grace,
    )
    .await;
    cleanup(private_dir.as_deref());
    outcome
}

/// Prints the URL line and writes the URL file.
fn announce(session: &RelaySession, app_path: Option<&str>, url_file: Option<&std::path::Path>) {
    let access_url = &session.welcome.access_url;
    let url = match app_path {
        Some(path) => app_url(access_url, path),
        None => access_url.clone(),
    };
    eprintln!("jobgate: your app is at {url}");
    tracing::info!(name = %session.welcome.name, "session open");
    if let Some(path) = url_file {
        if let Err(e) = token::write_private(path, &format!("{url}\n")) {
            eprintln!("jobgate: cannot write the URL file {}: {e}", path.display());
        }
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

async fn supervise(
    app: &mut Option<App>,
    mut session: RelaySession,
    serving: tokio::task::JoinHandle<quinn::ConnectionError>,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
    grace: Duration,
) -> Result<i32, AgentError> {
    let app_exit = async {
        match app.as_mut() {
            Some(app) => app.wait().await.ok(),
            None => std::future::pending().await,
        }
    };
    enum End {
        AppExited(Option<std::process::ExitStatus>),
        Signal(Signal),
        Lost(String),
    }
    let end = tokio::select! {
        status = app_exit => End::AppExited(status),
        _ = terminate.recv() => End::Signal(Signal::SIGTERM),
        _ = interrupt.recv() => End::Signal(Signal::SIGINT),
        error = serving => End::Lost(error.map(|e| e.to_string()).unwrap_or_else(|e| e.to_string())),
    };
    match end {
        End::AppExited(status) => {
            let code = status.map(child::exit_code).unwrap_or(1);
            let reason = status
                .map(child::describe)
                .unwrap_or_else(|| "app status unknown".into());
            eprintln!("jobgate: the app ended ({reason}); closing the session");
            say_bye(&mut session, &reason).await;
            Ok(code)
        }
        End::Signal(signal) => {
            eprintln!("jobgate: received {signal}; stopping the app and closing the session");
            // Bye first: the URL dies at once instead of failing requests while the app stops.
            say_bye(&mut session, &format!("agent received {signal}")).await;
            let code = match app.as_mut() {
                Some(app) => app
                    .stop(signal, grace)
                    .await
                    .map(child::exit_code)
                    .unwrap_or(1),
                None => 128 + signal as i32,
            };
            Ok(code)
        }
        End::Lost(reason) => {
            eprintln!("jobgate: lost the connection to the relay ({reason}); stopping the app");
            if let Some(app) = app.as_mut() {
                app.stop(Signal::SIGTERM, grace).await;
            }
            Err(AgentError::ConnectionLost(reason))
        }
    }
}

/// Tells the relay the session is over and closes the connection.
async fn say_bye(session: &mut RelaySession, reason: &str) {
    let bye = ControlMessage::Bye {
        reason: reason.to_owned(),
    };
    let _ = write_frame(&mut session.control, &bye.to_payload()).await;
    let _ = session.control.finish();
    session
        .connection
        .close(quinn::VarInt::from_u32(CloseCode::Normal.as_u32()), b"bye");
    let _ = tokio::time::timeout(CLOSE_LINGER, session.endpoint.wait_idle()).await;
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
