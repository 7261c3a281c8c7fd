//! The agent's life once its session is open: watch the app, the signals and the relay
//! connection; say `Bye` when the job ends; reconnect (same name, by resume ticket) when
//! the connection is lost; stop for good when the relay ends the session.

use crate::child::{self, App};
use crate::dial::{self, DialError, Dialed, HelloParams, RelaySession, TransportChoice};
use crate::serve;
use crate::target::TargetPool;
use crate::{announce, jobfile, AgentError, AgentOptions};
use jobgate_protocol::{CloseCode, ControlMessage};
use nix::sys::signal::Signal;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// First wait before reconnecting; doubled after each failed attempt.
const RECONNECT_INITIAL: Duration = Duration::from_millis(200);
/// Longest wait between reconnect attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Control messages buffered between the control-stream reader and the supervisor.
const CONTROL_QUEUE: usize = 8;

/// One live connection: the session plus the tasks serving it.
pub(crate) struct Live {
    session: RelaySession,
    serving: tokio::task::JoinHandle<jobgate_transport::ConnectionError>,
    control: tokio::sync::mpsc::Receiver<ControlMessage>,
}

impl Live {
    /// Keeps serving the streams this connection still carries (open WebSockets) until
    /// the relay closes it: the session has moved to another connection.
    fn retire(self) {
        let Live {
            session,
            serving,
            control,
        } = self;
        tokio::spawn(async move {
            let _ = serving.await;
            drop((session, control));
        });
    }

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
    mut recv: Option<jobgate_transport::RecvStream>,
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
    /// The connection ended: why, and the relay's close code if it ended the session
    /// for good (no reconnect).
    Lost(String, Option<CloseCode>),
    Control(Option<ControlMessage>),
    /// Time to try QUIC again (on TCP under `--transport auto`).
    ProbeDue,
    /// A QUIC probe ended.
    Probed(Result<Dialed, DialError>),
}

/// Waits for a running QUIC probe, if any.
async fn probe_done(
    probe: &mut Option<JoinHandle<Result<Dialed, DialError>>>,
) -> Result<Dialed, DialError> {
    let Some(running) = probe.as_mut() else {
        return std::future::pending().await;
    };
    let result = running
        .await
        .unwrap_or_else(|e| Err(DialError::Protocol(format!("probe task failed: {e}"))));
    *probe = None;
    result
}

/// Watches the app, the signals and the relay connection; reconnects when it is lost.
pub(crate) struct Supervisor<'a> {
    pub(crate) app: Option<App>,
    pub(crate) pool: Arc<TargetPool>,
    pub(crate) hello: HelloParams,
    pub(crate) options: &'a AgentOptions,
    /// Reconnect over TCP directly (the session was on TCP under `--transport auto`).
    pub(crate) tcp_first: bool,
    pub(crate) app_path: Option<&'a str>,
    pub(crate) job_file: Option<&'a jobfile::AgentJobFile>,
    pub(crate) terminate: tokio::signal::unix::Signal,
    pub(crate) interrupt: tokio::signal::unix::Signal,
}

impl Supervisor<'_> {
    pub(crate) async fn run(&mut self, session: RelaySession) -> Result<i32, AgentError> {
        self.hello.resume = session.welcome.resume_ticket.clone();
        // The reservation has given the name; from now on the resume ticket keeps it, and
        // after a long outage the agent gets a new name like any other.
        self.hello.reservation = None;
        let mut name = session.welcome.name.clone();
        let mut live = Live::start(session, self.pool.clone());
        let mut control_open = true;
        // While on TCP under `auto`, QUIC is tried now and then: UDP may pass again.
        let reprobe = self.options.dial.quic_reprobe;
        let mut next_probe = Instant::now() + reprobe;
        let mut probe: Option<JoinHandle<Result<Dialed, DialError>>> = None;
        loop {
            let may_probe = self.options.dial.transport == TransportChoice::Auto
                && live.session.via.kind == jobgate_transport::TransportKind::Tcp;
            let event = tokio::select! {
                status = wait_app(&mut self.app) => Event::AppExited(status),
                _ = self.terminate.recv() => Event::Signal(Signal::SIGTERM),
                _ = self.interrupt.recv() => Event::Signal(Signal::SIGINT),
                error = &mut live.serving => {
                    let error = error.map_err(|e| e.to_string());
                    let ended = match &error {
                        Ok(error) => error
                            .peer_close_code()
                            .filter(|code| matches!(code, CloseCode::Revoked | CloseCode::ClosedByAdmin)),
                        _ => None,
                    };
                    Event::Lost(error.map(|e| e.to_string()).unwrap_or_else(|e| e), ended)
                }
                message = live.control.recv(), if control_open => Event::Control(message),
                _ = tokio::time::sleep_until(next_probe), if may_probe && probe.is_none() => Event::ProbeDue,
                probed = probe_done(&mut probe) => Event::Probed(probed),
            };
            match event {
                Event::AppExited(status) => {
                    let code = status.map(child::exit_code).unwrap_or(1);
                    let reason = status
                        .map(child::describe)
                        .unwrap_or_else(|| "app status unknown".into());
                    say!("the app ended ({reason}); closing the session");
                    live.session.bye(&reason).await;
                    return Ok(code);
                }
                Event::Signal(signal) => {
                    say!("received {signal}; stopping the app and closing the session");
                    // Bye first: the URL dies at once instead of failing requests while the app stops.
                    live.session.bye(&format!("agent received {signal}")).await;
                    return Ok(self.stop_app(signal).await.unwrap_or(128 + signal as i32));
                }
                Event::Control(Some(ControlMessage::Ticket { resume_ticket })) => {
                    self.hello.resume = Some(resume_ticket);
                }
                Event::Control(Some(ControlMessage::Drain { reason })) => {
                    say!("the relay is going away ({reason}); will reconnect");
                }
                Event::Control(Some(other)) => {
                    tracing::debug!("ignoring control message {other:?}")
                }
                Event::Control(None) => control_open = false,
                Event::ProbeDue => {
                    let config = self.options.dial.clone();
                    probe = Some(tokio::spawn(async move { dial::probe_quic(&config).await }));
                }
                Event::Probed(Err(e)) => {
                    tracing::debug!("QUIC still not answering: {e}");
                    next_probe = Instant::now() + reprobe;
                }
                Event::Probed(Ok(dialed)) => {
                    // The resume ticket moves the name to the QUIC connection; new requests
                    // go there at once, while the TCP one keeps carrying its open
                    // WebSockets until they end (the relay then closes it, `Replaced`).
                    self.hello.moving = true;
                    let moved = dial::say_hello(dialed, &self.hello).await;
                    self.hello.moving = false;
                    match moved {
                        Ok(session) if session.welcome.name == name => {
                            say!(
                                "QUIC answers again: moved to {}; the URL is unchanged",
                                session.via
                            );
                            if let Some(ticket) = &session.welcome.resume_ticket {
                                self.hello.resume = Some(ticket.clone());
                            }
                            let old = std::mem::replace(
                                &mut live,
                                Live::start(session, self.pool.clone()),
                            );
                            old.retire();
                            control_open = true;
                        }
                        Ok(mut session) => {
                            // Not our name (it cannot move): keep TCP, give the new one back.
                            session.bye("moved back to the first connection").await;
                            next_probe = Instant::now() + reprobe;
                        }
                        Err(e) => {
                            tracing::debug!("QUIC answered but the session did not move: {e}");
                            next_probe = Instant::now() + reprobe;
                        }
                    }
                }
                Event::Lost(reason, Some(CloseCode::ClosedByAdmin)) => {
                    say!("the relay's admin closed this session ({reason}); stopping the app");
                    self.stop_app(Signal::SIGTERM).await;
                    return Err(AgentError::Dial(DialError::Refused {
                        code: jobgate_protocol::RefusalCode::Unavailable,
                        message: "the session was closed by the relay's admin".into(),
                    }));
                }
                Event::Lost(reason, Some(_)) => {
                    say!("the relay closed the session: the token was revoked or replaced ({reason}); ask your admin for the new token"
                    );
                    self.stop_app(Signal::SIGTERM).await;
                    return Err(AgentError::Dial(DialError::Refused {
                        code: jobgate_protocol::RefusalCode::BadToken,
                        message: "token revoked".into(),
                    }));
                }
                Event::Lost(reason, None) => {
                    say!("lost the connection to the relay ({reason}); reconnecting");
                    if let Some(job_file) = self.job_file {
                        job_file.record(jobfile::SessionState::Reconnecting, |_| {});
                    }
                    // Where QUIC did not get through, the reconnect goes straight to TCP
                    // (no 3 s wait each time); the probes bring QUIC back when it works.
                    self.tcp_first = may_probe;
                    let reconnected = self.reconnect("reconnect failed").await;
                    self.tcp_first = false;
                    match reconnected? {
                        Reconnect::Connected(session) => {
                            next_probe = Instant::now() + reprobe;
                            if session.welcome.name == name {
                                say!("reconnected; the URL is unchanged (over {})", session.via);
                                if let Some(job_file) = self.job_file {
                                    job_file.record(jobfile::SessionState::Connected, |_| {});
                                }
                            } else {
                                say!("reconnected under a NEW name (the old one had expired)");
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
    /// ends the wait. `failed` starts the line printed after each failed attempt.
    pub(crate) async fn reconnect(&mut self, failed: &str) -> Result<Reconnect, AgentError> {
        let mut delay = RECONNECT_INITIAL;
        // The pause before each attempt is part of the attempt, so the app's end and the
        // signals are watched during the backoff too: an agent waiting 30 s to retry
        // must still stop its app at once on SIGTERM (scancel) and reap it if it exits.
        let mut pause = Duration::ZERO;
        loop {
            let attempt = async {
                tokio::time::sleep(pause).await;
                if self.tcp_first {
                    let tcp = dial::DialConfig {
                        transport: TransportChoice::Tcp,
                        ..self.options.dial.clone()
                    };
                    dial::open_session(&tcp, &self.hello).await
                } else {
                    dial::open_session(&self.options.dial, &self.hello).await
                }
            };
            let result = tokio::select! {
                result = attempt => Some(result),
                status = wait_app(&mut self.app) => {
                    let code = status.map(child::exit_code).unwrap_or(1);
                    say!("the app ended while reconnecting");
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
                    say!(
                        "{failed} ({e}); retrying in {:.1} s",
                        jittered.as_secs_f64()
                    );
                    pause = jittered;
                    delay = (delay * 2).min(RECONNECT_MAX);
                }
                None => {}
            }
        }
    }

    /// Stops the app (if the agent runs one) and returns its exit code.
    pub(crate) async fn stop_app(&mut self, signal: Signal) -> Option<i32> {
        let app = self.app.as_mut()?;
        app.stop(signal, self.options.stop_grace)
            .await
            .map(child::exit_code)
    }
}

/// How a reconnect ended.
pub(crate) enum Reconnect {
    Connected(Box<RelaySession>),
    Finished(i32),
}

async fn wait_app(app: &mut Option<App>) -> Option<std::process::ExitStatus> {
    match app.as_mut() {
        Some(app) => app.wait().await.ok(),
        None => std::future::pending().await,
    }
}
