//! The harness's one error type: what went wrong, with the process's stderr where a
//! process is to blame, so a failed test or bench run explains itself.

use std::time::Duration;
use thiserror::Error;

/// Why a harness step failed.
#[derive(Debug, Error)]
pub enum Error {
    /// A program could not be started.
    #[error("starting {what}: {source}")]
    Spawn {
        /// The program and how it was called.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A process exited before it printed what it was waited for.
    #[error("{what} exited ({status}) before printing {needle:?}:\n{stderr}")]
    Exited {
        /// The process's label.
        what: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// The line it was expected to print.
        needle: String,
        /// Everything it printed on stderr.
        stderr: String,
    },
    /// Something did not happen in time.
    #[error("{what}: nothing within {timeout:?}:\n{stderr}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
        /// The stderr of the process concerned, if any.
        stderr: String,
    },
    /// A `jobgate` subcommand (or another tool) ran but failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The command.
        command: String,
        /// Its status and stderr.
        detail: String,
    },
    /// The relay's startup lines could not be read.
    #[error("relay startup line: {0}")]
    Startup(#[from] crate::startup::StartupError),
    /// A URL printed by an agent lacked a part.
    #[error("session URL {url:?}: {problem}")]
    Url {
        /// The URL.
        url: String,
        /// What is missing.
        problem: &'static str,
    },
    /// TLS configuration or handshake.
    #[error("TLS: {0}")]
    Tls(String),
    /// An HTTP client step.
    #[error("HTTP: {0}")]
    Http(String),
    /// A WebSocket client step.
    #[error("WebSocket: {0}")]
    WebSocket(String),
    /// A hand-made agent's exchange with the relay.
    #[error("agent protocol: {0}")]
    Agent(String),
}

impl Error {
    /// An [`Error::Io`] for `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// The harness's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;
