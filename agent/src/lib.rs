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
pub mod container;
pub mod dial;
pub mod guard;
pub mod jobfile;
pub mod jupyter;
pub mod listener;
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
/// How long the agent waits for the relay to close the connection after `Bye`.
const BYE_LINGER: Duration = Duration::from_secs(3);
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
    let (mut app, target, private_dir) = match options.app.clone() {
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
        job: job_info(),
        resume: None,
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
    let session = match opened {
        Ok(session) => session,
        Err(e) => {
            if let Some(app) = app.as_mut() {
                app.stop(Signal::SIGTERM, options.stop_grace).await;
            }
            cleanup(private_dir.as_deref());
            return Err(e.into());
        }
    };
    announce(
        &session,
        app_path.as_deref(),
        options.url_file.as_deref(),
        job_file,
    );

    let mut supervisor = Supervisor {
        app,
        pool: Arc::new(TargetPool::new(target)),
        hello,
        options: &options,
        app_path: app_path.as_deref(),
        job_file,
        terminate,
        interrupt,
    };
    let outcome = supervisor.run(session).await;
    cleanup(private_dir.as_deref());
    outcome
}

/// Prints the URL line and writes the URL file and the job file.
fn announce(
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
    eprintln!("jobgate: your app is at {url}");
    tracing::info!(name = %session.welcome.name, "session open");
    if let Some(path) = url_file {
        if let Err(e) = token::write_private(path, &format!("{url}\n")) {
            eprintln!("jobgate: cannot write the URL file {}: {e}", path.display());
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

/// First wait before reconnecting; doubled after each failed attempt.
const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
/// Longest wait between reconnect attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Control messages buffered between the control-stream reader and the supervisor.
const CONTROL_QUEUE: usize = 8;

/// One live connection: the session plus the tasks serving it.
struct Live {
    session: RelaySession,
    serving: tokio::task::JoinHandle<quinn::ConnectionError>,
    control: tokio::sync::mpsc::Receiver<ControlMessage>,
}

impl Live {
    fn start(mut session: RelaySession, pool: Arc<TargetPool>) -> Self {
        let serving = tokio::spawn(serve::serve_streams(session.connection.clone(), pool));
        let (tx, control) = tokio::sync::mpsc::channel(CONTROL_QUEUE);
        // The control stream is read by its own task: reading a frame is not cancel-safe.
        tokio::spawn(read_control(session.control_recv.take(), tx));
        Self {
            session,
            serving,
            control,
        }
    }
}

async fn read_control(
    mut recv: Option<quinn::RecvStream>,
    tx: tokio::sync::mpsc::Sender<ControlMessage>,
) {
    let Some(recv) = recv.as_mut() else { return };
    while let Ok(Some(payload)) =
        jobgate_protocol::read_frame(recv, jobgate_protocol::MAX_CONTROL_FRAME).await
    {
        match ControlMessage::from_payload(&payload) {
            Ok(message) => {
                if tx.send(message).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("ignoring an unreadable control message: {e}");
            }
        }
    }
}

/// What woke the supervisor.
enum Event {
    AppExited(Option<std::process::ExitStatus>),
    Signal(Signal),
    Lost(String, bool),
    Control(Option<ControlMessage>),
}

/// Watches the app, the signals and the relay connection; reconnects when it is lost.
struct Supervisor<'a> {
    app: Option<App>,
    pool: Arc<TargetPool>,
    hello: HelloParams,
    options: &'a AgentOptions,
    app_path: Option<&'a str>,
    job_file: Option<&'a jobfile::AgentJobFile>,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Supervisor<'_> {
    async fn run(&mut self, session: RelaySession) -> Result<i32, AgentError> {
        self.hello.resume = session.welcome.resume_ticket.clone();
        let mut name = session.welcome.name.clone();
        let mut live = Live::start(session, self.pool.clone());
        let mut control_open = true;
        loop {
            let event = tokio::select! {
                status = wait_app(&mut self.app) => Event::AppExited(status),
                _ = self.terminate.recv() => Event::Signal(Signal::SIGTERM),
                _ = self.interrupt.recv() => Event::Signal(Signal::SIGINT),
                error = &mut live.serving => {
                    let error = error.map_err(|e| e.to_string());
                    let revoked = matches!(&error, Ok(quinn::ConnectionError::ApplicationClosed(c))
                        if c.error_code == quinn::VarInt::from_u32(CloseCode::Revoked.as_u32()));
                    Event::Lost(error.map(|e| e.to_string()).unwrap_or_else(|e| e), revoked)
                }
                message = live.control.recv(), if control_open => Event::Control(message),
            };
            match event {
                Event::AppExited(status) => {
                    let code = status.map(child::exit_code).unwrap_or(1);
                    let reason = status
                        .map(child::describe)
                        .unwrap_or_else(|| "app status unknown".into());
                    eprintln!("jobgate: the app ended ({reason}); closing the session");
                    say_bye(&mut live.session, &reason).await;
                    return Ok(code);
                }
                Event::Signal(signal) => {
                    eprintln!(
                        "jobgate: received {signal}; stopping the app and closing the session"
                    );
                    // Bye first: the URL dies at once instead of failing requests while the app stops.
                    say_bye(&mut live.session, &format!("agent received {signal}")).await;
                    return Ok(self.stop_app(signal).await.unwrap_or(128 + signal as i32));
                }
                Event::Control(Some(ControlMessage::Ticket { resume_ticket })) => {
                    self.hello.resume = Some(resume_ticket);
                }
                Event::Control(Some(ControlMessage::Drain { reason })) => {
                    eprintln!("jobgate: the relay is going away ({reason}); will reconnect");
                }
                Event::Control(Some(other)) => {
                    tracing::debug!("ignoring control message {other:?}")
                }
                Event::Control(None) => control_open = false,
                Event::Lost(reason, true) => {
                    eprintln!(
                        "jobgate: the relay closed the session: the token was revoked ({reason})"
                    );
                    self.stop_app(Signal::SIGTERM).await;
                    return Err(AgentError::Dial(DialError::Refused {
                        code: jobgate_protocol::RefusalCode::BadToken,
                        message: "token revoked".into(),
                    }));
                }
                Event::Lost(reason, false) => {
                    eprintln!("jobgate: lost the connection to the relay ({reason}); reconnecting");
                    if let Some(job_file) = self.job_file {
                        job_file.record(jobfile::SessionState::Reconnecting, |_| {});
                    }
                    match self.reconnect().await? {
                        Reconnect::Connected(session) => {
                            if session.welcome.name == name {
                                eprintln!("jobgate: reconnected; the URL is unchanged");
                                if let Some(job_file) = self.job_file {
                                    job_file.record(jobfile::SessionState::Connected, |_| {});
                                }
                            } else {
                                eprintln!("jobgate: reconnected under a NEW name (the old one had expired)");
                                announce(
                                    &session,
                                    self.app_path,
                                    self.options.url_file.as_deref(),
                                    self.job_file,
                                );
                                name = session.welcome.name.clone();
                            }
                            if let Some(ticket) = &session.welcome.resume_ticket {
                                self.hello.resume = Some(ticket.clone());
                            }
                            live = Live::start(*session, self.pool.clone());
                            control_open = true;
                        }
                        Reconnect::Finished(code) => return Ok(code),
                    }
                }
            }
        }
    }

    /// Dials until a session opens, backing off with jitter; the app exiting or a signal
    /// ends the wait.
    async fn reconnect(&mut self) -> Result<Reconnect, AgentError> {
        let mut delay = RECONNECT_INITIAL;
        loop {
            let attempt = dial::open_session(&self.options.dial, &self.hello);
            let result = tokio::select! {
                result = attempt => Some(result),
                status = wait_app(&mut self.app) => {
                    let code = status.map(child::exit_code).unwrap_or(1);
                    eprintln!("jobgate: the app ended while reconnecting");
                    return Ok(Reconnect::Finished(code));
                }
                _ = self.terminate.recv() => return Ok(Reconnect::Finished(self.stop_app(Signal::SIGTERM).await.unwrap_or(143))),
                _ = self.interrupt.recv() => return Ok(Reconnect::Finished(self.stop_app(Signal::SIGINT).await.unwrap_or(130))),
            };
            match result {
                Some(Ok(session)) => return Ok(Reconnect::Connected(Box::new(session))),
                Some(Err(
                    e @ DialError::Refused {
                        code: jobgate_protocol::RefusalCode::BadToken,
                        ..
                    },
                )) => {
                    self.stop_app(Signal::SIGTERM).await;
                    return Err(e.into());
                }
                Some(Err(e)) => {
                    let jittered = delay.mul_f64(0.5 + rand::random::<f64>() / 2.0);
                    eprintln!(
                        "jobgate: reconnect failed ({e}); retrying in {:.1} s",
                        jittered.as_secs_f64()
                    );
                    tokio::time::sleep(jittered).await;
                    delay = (delay * 2).min(RECONNECT_MAX);
                }
                None => {}
            }
        }
    }

    /// Stops the app (if the agent runs one) and returns its exit code.
    async fn stop_app(&mut self, signal: Signal) -> Option<i32> {
        let app = self.app.as_mut()?;
        app.stop(signal, self.options.stop_grace)
            .await
            .map(child::exit_code)
    }
}

/// How a reconnect ended.
enum Reconnect {
    Connected(Box<RelaySession>),
    Finished(i32),
}

async fn wait_app(app: &mut Option<App>) -> Option<std::process::ExitStatus> {
    match app.as_mut() {
        Some(app) => app.wait().await.ok(),
        None => std::future::pending().await,
    }
}

/// Tells the relay the session is over and closes the connection.
async fn say_bye(session: &mut RelaySession, reason: &str) {
    let bye = ControlMessage::Bye {
        reason: reason.to_owned(),
    };
    // Bye goes ahead of any response data still queued, and the relay gets a moment to
    // take it and close: closing at once could lose both Bye and our close while a full
    // congestion window holds them back (then the name would wait out the resume grace).
    let _ = session.control.set_priority(i32::MAX);
    let _ = write_frame(&mut session.control, &bye.to_payload()).await;
    let _ = session.control.finish();
    let _ = tokio::time::timeout(BYE_LINGER, session.connection.closed()).await;
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
